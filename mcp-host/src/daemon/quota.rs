//! Quotas per identity: what the VMs of one identity may hold together,
//! by its role (each unset limit `[quota]`'s; admins have none). Checked where host limits are: booking a boot
//! (running VMs, vCPUs, memory), making a workspace, taking a snapshot.
//! Each refusal names the quota and changes nothing.

use super::{Daemon, DaemonError, Result};

/// `[quota]`, or a role's `quota`: each unset one the next level's
/// (role, then `[quota]`, then the defaults).
#[derive(
    Debug,
    Default,
    Clone,
    Copy,
    PartialEq,
    serde::Deserialize,
    serde::Serialize,
    schemars::JsonSchema,
)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    /// VMs of one identity running at once (default 8).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_running_vms: Option<u32>,
    /// vCPUs of one identity's running VMs (default 16).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_vcpus: Option<u32>,
    /// Memory of one identity's running VMs, MiB (default 16384).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_memory_mib: Option<u64>,
    /// Workspace sizes of all one identity's VMs, GiB (default 256).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_workspace_gib: Option<u64>,
    /// Snapshots of all one identity's VMs (default 256).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_snapshots: Option<u32>,
}

impl QuotaConfig {
    /// This one's limits, each unset one `base`'s.
    pub fn over(self, base: &QuotaConfig) -> QuotaConfig {
        QuotaConfig {
            max_running_vms: self.max_running_vms.or(base.max_running_vms),
            max_vcpus: self.max_vcpus.or(base.max_vcpus),
            max_memory_mib: self.max_memory_mib.or(base.max_memory_mib),
            max_workspace_gib: self.max_workspace_gib.or(base.max_workspace_gib),
            max_snapshots: self.max_snapshots.or(base.max_snapshots),
        }
    }
}

/// The quota in force for one identity.
#[derive(Debug, Clone, Copy)]
pub struct Quota {
    pub max_running_vms: u32,
    pub max_vcpus: u32,
    pub max_memory_mib: u64,
    pub max_workspace_gib: u64,
    pub max_snapshots: u32,
}

impl Quota {
    pub fn resolve(config: &QuotaConfig) -> Self {
        Self {
            max_running_vms: config.max_running_vms.unwrap_or(8),
            max_vcpus: config.max_vcpus.unwrap_or(16),
            max_memory_mib: config.max_memory_mib.unwrap_or(16 << 10),
            max_workspace_gib: config.max_workspace_gib.unwrap_or(256),
            max_snapshots: config.max_snapshots.unwrap_or(256),
        }
    }

    /// Refuses limits no one could use (a role's quota of 0 VMs is
    /// better said by its tool patterns).
    pub fn check(config: &QuotaConfig) -> std::result::Result<(), String> {
        let zero = [
            ("max_running_vms", config.max_running_vms.map(u64::from)),
            ("max_vcpus", config.max_vcpus.map(u64::from)),
            ("max_memory_mib", config.max_memory_mib),
            ("max_workspace_gib", config.max_workspace_gib),
        ]
        .into_iter()
        .find(|(_, v)| *v == Some(0));
        match zero {
            Some((key, _)) => Err(format!(
                "quota `{key}` must be at least 1 (to keep a role from making VMs, leave spawn_vm and fork_vm out of its tools)"
            )),
            None => Ok(()),
        }
    }
}

fn refused(owner: &str, what: String, quota: &str) -> DaemonError {
    DaemonError::Refused(format!(
        "{owner}'s quota is reached: {what} ({quota}, from its role or [quota]); stop or destroy one of its VMs, or ask an admin"
    ))
}

impl Daemon {
    /// The quota binding `owner` (an identity's name), by its role:
    /// none for admins and for VMs no one owns.
    pub(super) fn quota_of(&self, owner: Option<&str>) -> Option<Quota> {
        let role = self.role_named(&self.role_name_of_identity(owner?)?);
        (!role.is_admin()).then(|| Quota::resolve(&role.spec.quota.over(&self.config.quota)))
    }

    /// Whether VM `name` of `owner` may boot beside `others`, the owner's
    /// VMs running or booting: (vCPUs, memory).
    pub(super) fn admit_owner_start(
        &self,
        owner: Option<&str>,
        others: &[(u32, u64)],
        (vcpus, memory_mib): (u32, u64),
    ) -> Result<()> {
        let (Some(quota), Some(who)) = (self.quota_of(owner), owner) else {
            return Ok(());
        };
        let running = others.len() as u32;
        if running + 1 > quota.max_running_vms {
            return Err(refused(
                who,
                format!(
                    "{running} of its VMs run, and it may run {}",
                    quota.max_running_vms
                ),
                "max_running_vms",
            ));
        }
        let used_vcpus: u32 = others.iter().map(|o| o.0).sum();
        if used_vcpus + vcpus > quota.max_vcpus {
            return Err(refused(
                who,
                format!(
                    "its running VMs have {used_vcpus} vCPUs, this one needs {vcpus}, it may have {}",
                    quota.max_vcpus
                ),
                "max_vcpus",
            ));
        }
        let used_mib: u64 = others.iter().map(|o| o.1).sum();
        if used_mib + memory_mib > quota.max_memory_mib {
            return Err(refused(
                who,
                format!(
                    "its running VMs have {used_mib} MiB, this one needs {memory_mib}, it may have {}",
                    quota.max_memory_mib
                ),
                "max_memory_mib",
            ));
        }
        Ok(())
    }

    /// Whether `owner` may have a new workspace of `bytes`.
    pub(super) async fn admit_owner_workspace(
        &self,
        owner: Option<&str>,
        bytes: u64,
    ) -> Result<()> {
        let (Some(quota), Some(who)) = (self.quota_of(owner), owner) else {
            return Ok(());
        };
        let files: Vec<std::path::PathBuf> = self
            .owned_by(who)
            .into_iter()
            .map(|vm| self.storage.pool().vm_dir(&vm).join("workspace.ext4"))
            .collect();
        let used: u64 = tokio::task::spawn_blocking(move || {
            files
                .iter()
                .filter_map(|p| std::fs::metadata(p).ok())
                .map(|m| m.len())
                .sum()
        })
        .await
        .map_err(|e| DaemonError::Internal(e.to_string()))?;
        if used.saturating_add(bytes) > quota.max_workspace_gib.saturating_mul(1 << 30) {
            return Err(refused(
                who,
                format!(
                    "its workspaces take {:.1} GiB, this one {:.1} GiB, it may have {} GiB",
                    used as f64 / f64::from(1 << 30),
                    bytes as f64 / f64::from(1 << 30),
                    quota.max_workspace_gib
                ),
                "max_workspace_gib",
            ));
        }
        Ok(())
    }

    /// Whether `owner` may keep one more snapshot.
    pub(super) async fn admit_owner_snapshot(&self, owner: Option<&str>) -> Result<()> {
        let (Some(quota), Some(who)) = (self.quota_of(owner), owner) else {
            return Ok(());
        };
        let mine = self.owned_by(who);
        let count = self
            .blocking(|s| s.list_snapshots(None))
            .await?
            .into_iter()
            .filter(|s| mine.contains(&s.vm))
            .count() as u32;
        if count + 1 > quota.max_snapshots {
            return Err(refused(
                who,
                format!(
                    "its VMs keep {count} snapshots, and it may keep {}",
                    quota.max_snapshots
                ),
                "max_snapshots",
            ));
        }
        Ok(())
    }
}
