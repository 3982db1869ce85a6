//! A cgroup per VM on the host: its VMM and helpers together get at most
//! their vCPUs' worth of CPU (plus one for the VMM's own threads), their
//! memory plus a margin for the VMM, and a bounded number of tasks. One VM
//! cannot starve the host or the others, whatever its guest does. Under
//! contention a VM's group weighs as much as its busy threads would on
//! their own (a group otherwise weighs as one process, and a loaded host
//! starved booting guests into timeouts).
//!
//! Production hosts have cgroup v2 (one hierarchy at /sys/fs/cgroup);
//! older ones, this build machine among them, have v1 controllers mounted
//! one per directory. Both are supported, by writing their control files;
//! where neither is writable, VMs run without limits and the start says so.

use std::path::{Path, PathBuf};

/// The VMM's own memory beyond the guest's (code, device models, the
/// emulator's translation cache under TCG).
const VMM_MEMORY_MARGIN_MIB: u64 = 512;
/// Tasks (processes and threads) of one VM's host processes.
const MAX_TASKS: u64 = 1024;
/// CPU accounting period, microseconds.
const PERIOD_US: u64 = 100_000;
/// VM cgroups are `nexus-<vm>.<cid>` directly under the hierarchy's root:
/// under a common parent, all VMs together would weigh as much as one
/// process of the host's when CPU is scarce.
const PREFIX: &str = "nexus-";

/// What one VM may use.
#[derive(Debug, Clone, Copy)]
pub struct VmLimits {
    pub vcpus: u32,
    pub memory_mib: u32,
}

/// The cgroup(s) of one VM; removed when dropped (once empty).
#[derive(Debug)]
pub struct VmCgroup {
    dirs: Vec<PathBuf>,
}

enum Hierarchy {
    V2(PathBuf),
    V1 {
        cpu: PathBuf,
        memory: PathBuf,
        pids: PathBuf,
    },
}

fn hierarchy() -> Option<Hierarchy> {
    let root = Path::new("/sys/fs/cgroup");
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    if ["cpu", "memory", "pids"]
        .iter()
        .all(|c| controllers.split_whitespace().any(|have| have == *c))
    {
        return Some(Hierarchy::V2(root.to_path_buf()));
    }
    let v1 = |c: &str| root.join(c);
    if ["cpu", "memory", "pids"]
        .iter()
        .all(|c| v1(c).join("cgroup.procs").is_file())
    {
        return Some(Hierarchy::V1 {
            cpu: v1("cpu"),
            memory: v1("memory"),
            pids: v1("pids"),
        });
    }
    None
}

impl VmCgroup {
    /// Makes `nexus-<name>` with `limits`; None (and a warning) where no
    /// cgroup hierarchy is writable.
    pub fn create(name: &str, limits: VmLimits) -> Option<Self> {
        let made = match hierarchy()? {
            Hierarchy::V2(root) => Self::v2(&root, name, limits),
            Hierarchy::V1 { cpu, memory, pids } => Self::v1(&cpu, &memory, &pids, name, limits),
        };
        match made {
            Ok(cgroup) => Some(cgroup),
            Err(e) => {
                tracing::warn!(vm = name, error = %e, "no cgroup for the VM's processes: they run without CPU, memory or task limits");
                None
            }
        }
    }

    fn v2(root: &Path, name: &str, limits: VmLimits) -> std::io::Result<Self> {
        std::fs::write(root.join("cgroup.subtree_control"), "+cpu +memory +pids")?;
        let dir = fresh(&root.join(format!("{PREFIX}{name}")))?;
        let cgroup = Self {
            dirs: vec![dir.clone()],
        };
        std::fs::write(
            dir.join("cpu.max"),
            format!("{} {PERIOD_US}", quota_us(limits)),
        )?;
        std::fs::write(dir.join("cpu.weight"), (100 * threads(limits)).to_string())?;
        std::fs::write(dir.join("memory.max"), memory_bytes(limits).to_string())?;
        std::fs::write(dir.join("pids.max"), MAX_TASKS.to_string())?;
        Ok(cgroup)
    }

    fn v1(
        cpu: &Path,
        memory: &Path,
        pids: &Path,
        name: &str,
        limits: VmLimits,
    ) -> std::io::Result<Self> {
        let mut cgroup = Self { dirs: Vec::new() };
        let dir = |root: &Path| fresh(&root.join(format!("{PREFIX}{name}")));
        let cpu = dir(cpu)?;
        cgroup.dirs.push(cpu.clone());
        std::fs::write(cpu.join("cpu.cfs_period_us"), PERIOD_US.to_string())?;
        std::fs::write(cpu.join("cpu.cfs_quota_us"), quota_us(limits).to_string())?;
        std::fs::write(cpu.join("cpu.shares"), (1024 * threads(limits)).to_string())?;
        let memory = dir(memory)?;
        cgroup.dirs.push(memory.clone());
        std::fs::write(
            memory.join("memory.limit_in_bytes"),
            memory_bytes(limits).to_string(),
        )?;
        let pids = dir(pids)?;
        cgroup.dirs.push(pids.clone());
        std::fs::write(pids.join("pids.max"), MAX_TASKS.to_string())?;
        Ok(cgroup)
    }

    /// The cgroup(s) `nexus-<name>` as they are, to remove them (drop).
    pub fn existing(name: &str) -> Self {
        let dirs = match hierarchy() {
            Some(Hierarchy::V2(root)) => vec![root.join(format!("{PREFIX}{name}"))],
            Some(Hierarchy::V1 { cpu, memory, pids }) => [cpu, memory, pids]
                .iter()
                .map(|root| root.join(format!("{PREFIX}{name}")))
                .collect(),
            None => Vec::new(),
        };
        Self {
            dirs: dirs.into_iter().filter(|d| d.is_dir()).collect(),
        }
    }

    /// Moves process `pid` (with its threads) into the VM's cgroup(s).
    pub fn add(&self, pid: u32) -> std::io::Result<()> {
        for dir in &self.dirs {
            std::fs::write(dir.join("cgroup.procs"), pid.to_string())?;
        }
        Ok(())
    }

    /// The directories, for checks.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }
}

impl Drop for VmCgroup {
    fn drop(&mut self) {
        // The VM's processes are gone by now (or going): a cgroup with none
        // left can be removed; try for a moment.
        let dirs = std::mem::take(&mut self.dirs);
        std::thread::spawn(move || {
            for dir in dirs {
                for _ in 0..200 {
                    if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        });
    }
}

/// A new, empty cgroup directory, replacing one a dead VM left.
fn fresh(dir: &Path) -> std::io::Result<PathBuf> {
    if dir.exists() {
        let _ = std::fs::remove_dir(dir);
    }
    std::fs::create_dir_all(dir)?;
    Ok(dir.to_path_buf())
}

/// The VM's busy threads: its vCPUs and one more for the VMM's own.
fn threads(limits: VmLimits) -> u64 {
    u64::from(limits.vcpus) + 1
}

/// The VM's CPU at most: a CPU per busy thread.
fn quota_us(limits: VmLimits) -> u64 {
    threads(limits) * PERIOD_US
}

fn memory_bytes(limits: VmLimits) -> u64 {
    (u64::from(limits.memory_mib) + VMM_MEMORY_MARGIN_MIB) << 20
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_vm() {
        let limits = VmLimits {
            vcpus: 2,
            memory_mib: 256,
        };
        assert_eq!(quota_us(limits), 300_000);
        assert_eq!(memory_bytes(limits), 768 << 20);
    }
}
