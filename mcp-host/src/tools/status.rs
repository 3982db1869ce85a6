//! `host_status`: the admin's view of the host.

use rmcp::handler::server::common::schema_for_output;
use rmcp::model::CallToolResult;
use rmcp::{tool, tool_router};

use super::{NexusTools, done};
use nexus_types::HostStatus;

fn gib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 30)
}

#[tool_router(router = status_router, vis = "pub(super)")]
impl NexusTools {
    #[tool(
        description = "How the host stands (admin only): nexusd's version and uptime, the VMM backend and acceleration new VMs run with (KVM or TCG) and why, the storage pool's size and free space, VMs by state, the vCPUs and memory running VMs use against the host's limits, and the images.",
        output_schema = schema_for_output::<HostStatus>()
    )]
    async fn host_status(&self) -> Result<CallToolResult, String> {
        let s = self.daemon.status().await.map_err(super::errors::shown)?;
        let backend = match &s.backend_problem {
            Some(problem) => format!("{} (cannot start VMs: {problem})", s.backend),
            None => s.backend.clone(),
        };
        let text = format!(
            "nexusd {} up {} s; backend {backend}, {} ({}); pool {:.1} GiB free of {:.1} GiB; VMs: {} running, {} stopped; using {}/{} vCPUs, {}/{} MiB; images: {}",
            s.version,
            s.uptime_s,
            s.accel,
            s.accel_reason,
            gib(s.pool.free_bytes),
            gib(s.pool.total_bytes),
            s.vms.running,
            s.vms.stopped,
            s.usage.vcpus,
            s.usage.max_vcpus,
            s.usage.memory_mib,
            s.usage.max_memory_mib,
            s.images.join(", ")
        );
        done(&s, text)
    }
}
