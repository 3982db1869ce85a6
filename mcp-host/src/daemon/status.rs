//! `host_status`: what the host runs and holds, in one answer.

use std::time::SystemTime;

use nexus_types::{HostStatus, PoolStatus, Usage, VmCounts};

use super::{Daemon, Result};

impl Daemon {
    pub async fn status(&self) -> Result<HostStatus> {
        let vms = self.list().await?;
        let mut counts = VmCounts::default();
        let (mut vcpus, mut memory_mib) = (0u32, 0u64);
        for vm in &vms {
            counts.total += 1;
            if vm.state == "running" || vm.state == "paused" {
                counts.running += 1;
                if vm.state == "paused" {
                    counts.paused += 1;
                }
                vcpus += vm.vcpus;
                memory_mib += u64::from(vm.memory_mib);
                if vm
                    .guest
                    .as_deref()
                    .is_some_and(|g| g.starts_with("unresponsive"))
                {
                    counts.unresponsive += 1;
                }
            } else {
                counts.stopped += 1;
            }
        }
        let images = self.images().await?.into_iter().map(|i| i.name).collect();
        let space = self.pool_space();
        let (accel, accel_reason) = nexus_vmm::accel::auto_choice();
        let accel = match accel {
            nexus_vmm::accel::Resolved::Kvm => "kvm",
            nexus_vmm::accel::Resolved::Tcg => "tcg",
        };
        let uptime = SystemTime::now()
            .duration_since(self.started_at)
            .unwrap_or_default();
        Ok(HostStatus {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at: humantime::format_rfc3339_seconds(self.started_at).to_string(),
            uptime_s: uptime.as_secs(),
            backend: "qemu".to_owned(),
            backend_problem: self.vmm.as_ref().err().cloned(),
            accel: accel.to_owned(),
            accel_reason,
            pool: PoolStatus {
                path: self.storage.pool().root().display().to_string(),
                total_bytes: space.total_bytes,
                free_bytes: space.free_bytes,
            },
            vms: counts,
            usage: Usage {
                vcpus,
                max_vcpus: self.limits.max_vcpus,
                memory_mib,
                max_memory_mib: self.limits.max_memory_mib,
                max_vms: self.limits.max_vms,
            },
            images,
            warm_pools: self
                .warm
                .status()
                .into_iter()
                .map(|(pool, ready, booting)| nexus_types::WarmPool {
                    image: pool.image,
                    vcpus: pool.vcpus,
                    memory_mib: pool.memory_mib,
                    workspace_gib: pool.workspace_gib,
                    size: pool.size,
                    ready,
                    booting,
                })
                .collect(),
        })
    }
}
