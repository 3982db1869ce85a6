//! `system_info`.

use rmcp::handler::server::common::schema_for_output;
use rmcp::model::CallToolResult;
use rmcp::{tool, tool_router};

use super::{GuestTools, done};
use crate::sysinfo::{self, SystemInfo};

#[tool_router(router = system_router, vis = "pub(super)")]
impl GuestTools {
    #[tool(
        description = "Describe the VM: OS, kernel, CPUs, memory, disk use of / and /workspace, uptime and load.",
        output_schema = schema_for_output::<SystemInfo>()
    )]
    async fn system_info(&self) -> Result<CallToolResult, String> {
        let workdir = self.shared.workdir.clone();
        let info = tokio::task::spawn_blocking(move || sysinfo::collect(workdir.as_deref()))
            .await
            .map_err(|e| format!("internal error: {e}"))?;
        let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
        let mut text = format!(
            "{} (kernel {}, {}), {} CPUs, {:.2} of {:.2} GiB memory available, up {:.0} s",
            info.os,
            info.kernel,
            info.arch,
            info.cpus,
            gib(info.memory_available_bytes),
            gib(info.memory_total_bytes),
            info.uptime_s
        );
        for d in &info.disks {
            text.push_str(&format!(
                "\n{}: {:.2} of {:.2} GiB used",
                d.mount,
                gib(d.used_bytes),
                gib(d.total_bytes)
            ));
        }
        done(&info, text)
    }
}
