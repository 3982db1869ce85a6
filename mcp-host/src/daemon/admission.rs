//! Admission: what the host can hold. Every VM that starts (spawned,
//! forked or started again), every workspace and every snapshot is checked
//! against the limits first; a refusal names the limit, what is in use and
//! what to do, and changes nothing.

use std::path::Path;

use serde::Serialize;

use super::DaemonError;

/// The limits in force (the configuration's, or derived from the host).
#[derive(Debug, Clone, Copy, Serialize, schemars::JsonSchema)]
pub struct Limits {
    /// VMs that may exist (running or stopped).
    pub max_vms: u32,
    /// Memory all running VMs may have in all, in MiB.
    pub max_memory_mib: u64,
    /// vCPUs all running VMs may have in all.
    pub max_vcpus: u32,
    /// Snapshots one VM may keep.
    pub max_snapshots_per_vm: u32,
}

impl Limits {
    /// The configured limits; unset ones from the host: 80 % of its memory
    /// and sixteen vCPUs per CPU for running VMs (agents' VMs idle most of
    /// the time).
    pub fn resolve(config: &crate::config::Limits) -> Self {
        let host_mib = host_memory_mib();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        Self {
            max_vms: config.max_vms.unwrap_or(256),
            max_memory_mib: config.max_memory_mib.unwrap_or(host_mib * 4 / 5),
            max_vcpus: config.max_vcpus.unwrap_or(cpus * 16),
            max_snapshots_per_vm: config.max_snapshots_per_vm.unwrap_or(128),
        }
    }
}

/// What the running VMs use now.
#[derive(Debug, Clone, Copy, Default)]
pub struct InUse {
    pub vms: u32,
    pub memory_mib: u64,
    pub vcpus: u32,
}

/// Whether a new VM may be made (`VM count`).
pub fn admit_new(limits: &Limits, existing: u32) -> Result<(), DaemonError> {
    if existing >= limits.max_vms {
        return Err(DaemonError::Refused(format!(
            "{existing} VMs exist, the most this host allows (max_vms): destroy one first, or raise max_vms in the configuration"
        )));
    }
    Ok(())
}

/// Whether a VM of `vcpus` and `memory_mib` may start beside `running`.
pub fn admit_start(
    limits: &Limits,
    running: InUse,
    name: &str,
    vcpus: u32,
    memory_mib: u64,
) -> Result<(), DaemonError> {
    if running.memory_mib + memory_mib > limits.max_memory_mib {
        return Err(DaemonError::Refused(format!(
            "VM {name} needs {memory_mib} MiB, and the {} running VMs have {} of the {} MiB this host allows them (max_memory_mib): stop a VM, give this one less memory, or raise the limit",
            running.vms, running.memory_mib, limits.max_memory_mib
        )));
    }
    if running.vcpus + vcpus > limits.max_vcpus {
        return Err(DaemonError::Refused(format!(
            "VM {name} needs {vcpus} vCPUs, and the {} running VMs have {} of the {} this host allows them (max_vcpus): stop a VM, give this one fewer vCPUs, or raise the limit",
            running.vms, running.vcpus, limits.max_vcpus
        )));
    }
    Ok(())
}

/// Whether a workspace of `bytes` can ever fit in the pool.
pub fn admit_workspace(pool: &Path, bytes: u64) -> Result<(), DaemonError> {
    let space = pool_space(pool);
    if bytes > space.free_bytes {
        return Err(DaemonError::Refused(format!(
            "a {} GiB workspace cannot fit: the pool has {:.1} GiB free of {:.1} GiB: ask for less (workspace_gib), or free space (delete snapshots, destroy VMs)",
            bytes >> 30,
            space.free_bytes as f64 / f64::from(1 << 30),
            space.total_bytes as f64 / f64::from(1 << 30),
        )));
    }
    Ok(())
}

/// Whether VM `vm`, with `existing` snapshots, may take one more.
pub fn admit_snapshot(limits: &Limits, vm: &str, existing: usize) -> Result<(), DaemonError> {
    if existing >= limits.max_snapshots_per_vm as usize {
        return Err(DaemonError::Refused(format!(
            "VM {vm} has {existing} snapshots, the most one VM may keep (max_snapshots_per_vm): delete one first (delete_snapshot)"
        )));
    }
    Ok(())
}

/// How full the pool is.
#[derive(Debug, Clone, Copy, Default, Serialize, schemars::JsonSchema)]
pub struct PoolSpace {
    pub total_bytes: u64,
    pub free_bytes: u64,
}

pub fn pool_space(pool: &Path) -> PoolSpace {
    match nix::sys::statvfs::statvfs(pool) {
        Ok(s) => PoolSpace {
            total_bytes: s.blocks() * s.fragment_size(),
            free_bytes: s.blocks_available() * s.fragment_size(),
        },
        Err(_) => PoolSpace::default(),
    }
}

pub fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kb| kb / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_vms: 2,
            max_memory_mib: 1024,
            max_vcpus: 4,
            max_snapshots_per_vm: 1,
        }
    }

    #[test]
    fn each_limit_refuses_with_its_name() {
        let l = limits();
        assert!(admit_new(&l, 1).is_ok());
        let e = admit_new(&l, 2).unwrap_err().to_string();
        assert!(e.contains("max_vms"), "{e}");
        let running = InUse {
            vms: 2,
            memory_mib: 768,
            vcpus: 3,
        };
        assert!(admit_start(&l, running, "a", 1, 256).is_ok());
        let e = admit_start(&l, running, "a", 1, 512)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("max_memory_mib") && e.contains("768 of the 1024"),
            "{e}"
        );
        let e = admit_start(&l, running, "a", 2, 64)
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_vcpus"), "{e}");
        let e = admit_snapshot(&l, "a", 1).unwrap_err().to_string();
        assert!(e.contains("max_snapshots_per_vm"), "{e}");
        let e = admit_workspace(Path::new("/"), u64::MAX / 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot fit"), "{e}");
    }
}
