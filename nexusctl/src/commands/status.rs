//! `nexusctl status`: how the host stands, from `host_status`.

use nexus_types::HostStatus;
use serde_json::json;

use super::{Out, call, parse};
use crate::connect::Client;
use crate::error::CtlError;

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1 << 30))
}

/// What `status` prints for people.
pub fn render(s: &HostStatus) -> String {
    let backend = match &s.backend_problem {
        Some(problem) => format!("{} (cannot start VMs: {problem})", s.backend),
        None => s.backend.clone(),
    };
    let used = s.pool.total_bytes.saturating_sub(s.pool.free_bytes);
    let warm = if s.warm_pools.is_empty() {
        "none ([[warm_pool]] in the configuration)".to_owned()
    } else {
        s.warm_pools
            .iter()
            .map(|w| {
                format!(
                    "{} {} vCPU {} MiB {} GiB: {}/{} ready{}",
                    w.image,
                    w.vcpus,
                    w.memory_mib,
                    w.workspace_gib,
                    w.ready,
                    w.size,
                    if w.booting { ", 1 booting" } else { "" }
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let lines = [
        (
            "version",
            format!(
                "{} (up {} s, since {})",
                s.version, s.uptime_s, s.started_at
            ),
        ),
        ("backend", backend),
        ("accel", format!("{}: {}", s.accel, s.accel_reason)),
        (
            "pool",
            format!(
                "{} free of {} ({} used) at {}",
                gib(s.pool.free_bytes),
                gib(s.pool.total_bytes),
                gib(used),
                s.pool.path
            ),
        ),
        (
            "vms",
            format!(
                "{} ({} running of which {} paused, {} stopped, {} unresponsive; at most {})",
                s.vms.total,
                s.vms.running,
                s.vms.paused,
                s.vms.stopped,
                s.vms.unresponsive,
                s.usage.max_vms
            ),
        ),
        (
            "in use",
            format!(
                "{}/{} vCPUs, {}/{} MiB",
                s.usage.vcpus, s.usage.max_vcpus, s.usage.memory_mib, s.usage.max_memory_mib
            ),
        ),
        (
            "images",
            if s.images.is_empty() {
                "none (scripts/build-image.sh or `nexusctl image build`)".to_owned()
            } else {
                s.images.join(", ")
            },
        ),
        ("warm", warm),
    ];
    lines
        .iter()
        .map(|(k, v)| format!("{:<8} {v}", format!("{k}:")))
        .collect::<Vec<_>>()
        .join("\n")
}

pub async fn run(client: &Client, out: &Out) -> Result<(), CtlError> {
    let answer = call(client, "host_status", json!({})).await?;
    let status: HostStatus = parse("host_status", &answer)?;
    out.print(&answer, || render(&status));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_types::{PoolStatus, Usage, VmCounts};

    #[test]
    fn status_reads_as_it_did() {
        let status = HostStatus {
            version: "0.1.0".into(),
            started_at: "2026-11-30T09:30:36Z".into(),
            uptime_s: 23,
            backend: "qemu".into(),
            backend_problem: None,
            accel: "tcg".into(),
            accel_reason:
                "emulation, as KVM cannot be used: neither kvm_intel nor kvm_amd is loaded".into(),
            pool: PoolStatus {
                path: "/var/lib/nexus/pool".into(),
                total_bytes: 32 << 30,
                free_bytes: 31 << 30,
            },
            vms: VmCounts {
                total: 3,
                running: 2,
                paused: 1,
                stopped: 1,
                unresponsive: 0,
            },
            usage: Usage {
                vcpus: 3,
                max_vcpus: 32,
                memory_mib: 768,
                max_memory_mib: 19284,
                max_vms: 256,
            },
            images: vec!["default".into(), "minimal".into()],
            warm_pools: vec![nexus_types::WarmPool {
                image: "default".into(),
                vcpus: 1,
                memory_mib: 256,
                workspace_gib: 1,
                size: 2,
                ready: 1,
                booting: true,
            }],
        };
        insta::assert_snapshot!("status", render(&status));
        let broken = HostStatus {
            backend_problem: Some("qemu-system-x86_64 is not installed".into()),
            images: vec![],
            warm_pools: vec![],
            ..status
        };
        insta::assert_snapshot!("status_without_backend", render(&broken));
    }
}
