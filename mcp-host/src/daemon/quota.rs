//! Quotas per identity: what the VMs of one user may hold together
//! (admins have none). Checked where host limits are: booking a boot
//! (running VMs, vCPUs, memory), making a workspace, taking a snapshot.
//! Each refusal names the quota and changes nothing.

use super::{Daemon, DaemonError, Result};
use crate::identity::{Identity, Role};

/// `[quota]`: every user's, each unset one a default.
#[derive(Debug, Default, Clone, Copy, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    /// VMs of one user running at once (default 8).
    pub max_running_vms: Option<u32>,
    /// vCPUs of one user's running VMs (default 16).
    pub max_vcpus: Option<u32>,
    /// Memory of one user's running VMs, MiB (default 16384).
    pub max_memory_mib: Option<u64>,
    /// Workspace sizes of all one user's VMs, GiB (default 256).
    pub max_workspace_gib: Option<u64>,
    /// Snapshots of all one user's VMs (default 256).
    pub max_snapshots: Option<u32>,
}

/// The quota in force for every user.
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
}

fn refused(owner: &str, what: String, quota: &str) -> DaemonError {
    DaemonError::Refused(format!(
        "{owner}'s quota is reached: {what} ({quota} in [quota]); stop or destroy one of its VMs, or ask an admin"
    ))
}

impl Daemon {
    /// The quota binding `owner` (an identity's name): none for admins
    /// and for VMs no one owns.
    pub(super) fn quota_of(&self, owner: Option<&str>) -> Option<Quota> {
        let owner = owner?;
        let role = if let Some(name) = owner.strip_prefix("token:") {
            self.tokens.role_of(name)?
        } else if let Some(uid) = owner.strip_prefix("uid:") {
            Identity::local(uid.parse().ok()?, &self.config.admin_uids).role
        } else {
            Role::User
        };
        (role != Role::Admin).then_some(self.quota)
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
