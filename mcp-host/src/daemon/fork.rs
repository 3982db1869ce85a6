//! fork_vm: new VMs from a VM, one or several at once. From a named
//! snapshot, each gets its root and workspace (booted); from none, a
//! consistent snapshot of the VM is taken now and each gets its
//! workspace on a fresh root of the VM's image, as spawn_vm from that
//! snapshot would (from a warm pool when one fits). All are made, or
//! none: a fork that fails undoes the others (and the snapshot taken for
//! them).

use nexus_storage::{StorageError, validate_name};

use super::warm::{Prepared, Shape};
use super::{Daemon, DaemonError, Result, SpawnRequest, VmConfig, VmInfo, admission};
use crate::identity::Identity;

/// The most VMs one fork_vm makes.
pub const MAX_FORKS: u32 = 16;

/// What fork_vm made.
pub struct Forked {
    /// The snapshot they were made from (when none was named: the one
    /// taken for them, deleted once they exist).
    pub snapshot: String,
    pub vms: Vec<VmInfo>,
}

impl Daemon {
    /// `count` new VMs from VM `from_vm`: from its snapshot `snapshot`,
    /// or from one taken now. Named `name` (one), `name-1`.. (several),
    /// or picked. They belong to `from_vm`'s owner when its owner or an
    /// admin forks, else to `by`.
    /// Runs to the end even if its caller goes (a client that
    /// disconnects): forks half made would be left behind otherwise.
    pub async fn fork_many(
        &self,
        from_vm: &str,
        snapshot: Option<String>,
        name: Option<String>,
        count: u32,
        by: &Identity,
    ) -> Result<Forked> {
        let Some(me) = self.me.upgrade() else {
            return Err(DaemonError::Internal("nexusd is stopping".into()));
        };
        let (from_vm, by) = (from_vm.to_owned(), by.clone());
        tokio::spawn(async move {
            me.fork_many_here(&from_vm, snapshot, name, count, &by)
                .await
        })
        .await
        .map_err(|e| DaemonError::Internal(format!("fork task: {e}")))?
    }

    async fn fork_many_here(
        &self,
        from_vm: &str,
        snapshot: Option<String>,
        name: Option<String>,
        count: u32,
        by: &Identity,
    ) -> Result<Forked> {
        if count == 0 || count > MAX_FORKS {
            return Err(DaemonError::Invalid(format!(
                "`count` must be between 1 and {MAX_FORKS}, got {count}"
            )));
        }
        let names = self.fork_names(name, count).await?;
        self.known(from_vm).await?;
        if let Err(why) = &self.vmm {
            return Err(DaemonError::NoBackend(why.clone()));
        }
        let Some(snapshot) = snapshot else {
            return self.fork_now(from_vm, names, by).await;
        };
        let made = futures::future::join_all(
            names
                .iter()
                .map(|n| self.fork(from_vm, &snapshot, Some(n.clone()), by)),
        )
        .await;
        let vms = self.all_or_none(made).await?;
        Ok(Forked { snapshot, vms })
    }

    /// Forks of a consistent snapshot taken now: the VM's workspace, on
    /// fresh roots of its image.
    async fn fork_now(&self, from_vm: &str, names: Vec<String>, by: &Identity) -> Result<Forked> {
        let from = from_vm.to_owned();
        let (image, config, workspace_bytes) = self
            .blocking(move |s| {
                let workspace = s.vm_drives(&from)?.workspace;
                // Unreadable: no spare fits, the forks boot.
                let bytes = std::fs::metadata(&workspace).map_or(0, |m| m.len());
                Ok((s.vm_image(&from)?.name, s.vm_config(&from)?, bytes))
            })
            .await?;
        let config: VmConfig = serde_json::from_str(&config)
            .map_err(|e| DaemonError::Internal(format!("VM config: {e}")))?;
        let source_owner = self.owner_of(from_vm).flatten();
        let owner = self.fork_owner(source_owner.clone(), by);
        let shape = Shape {
            image: image.clone(),
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            workspace_bytes,
        };
        // What would refuse the snapshot or the forks is asked before a
        // spare is touched (and asked again as each is made).
        let from = from_vm.to_owned();
        let snapshots = self
            .blocking(move |s| s.list_snapshots(Some(&from)))
            .await?
            .len();
        admission::admit_snapshot(&self.limits, from_vm, snapshots)?;
        self.admit_owner_snapshot(source_owner.as_deref()).await?;
        let existing = self.blocking(|s| s.list_vms()).await?.len();
        admission::admit_new(&self.limits, (existing + names.len() - 1) as u32)?;
        self.admit_owner_workspace(owner.as_deref(), workspace_bytes * names.len() as u64)
            .await?;
        self.admit_owner_running(
            owner.as_deref(),
            &names[0],
            (config.vcpus, u64::from(config.memory_mib)),
        )
        .await?;
        // Spares of its shape let go of their blank workspaces while the
        // snapshot is taken.
        let spares: Vec<Option<Prepared>> = names.iter().map(|_| self.take_spare(&shape)).collect();
        let released = futures::future::join_all(spares.into_iter().map(|spare| async move {
            match spare {
                Some(spare) => self.release_spare(spare).await,
                None => None,
            }
        }));
        let (taken, released) = tokio::join!(
            self.snapshot(from_vm, None, Some(fork_snapshot_name())),
            released
        );
        let taken = match taken {
            Ok(taken) => taken,
            Err(e) => {
                for spare in released.into_iter().flatten() {
                    self.unprepare(spare).await;
                }
                return Err(e);
            }
        };
        let filled = futures::future::join_all(released.into_iter().map(|spare| {
            let snapshot = taken.name.clone();
            async move {
                match spare {
                    Some(spare) => self.fill_spare(spare, from_vm, &snapshot).await,
                    None => None,
                }
            }
        }))
        .await;
        let made = futures::future::join_all(names.iter().zip(filled).map(|(name, spare)| {
            self.spawn_with(
                SpawnRequest {
                    name: Some(name.clone()),
                    image: Some(image.clone()),
                    vcpus: Some(config.vcpus),
                    memory_mib: Some(config.memory_mib),
                    workspace_gib: None,
                    egress: config.egress.clone(),
                    from_snapshot: Some((from_vm.to_owned(), taken.name.clone())),
                    owner: owner.clone(),
                },
                None,
                Some(spare),
            )
        }))
        .await;
        let made = self.all_or_none(made).await;
        // The forks' workspaces are clones of it, theirs now: it goes
        // (it would count against the source's snapshots otherwise).
        if let Err(left) = self.delete_snapshot(from_vm, &taken.name).await {
            tracing::warn!(vm = from_vm, snapshot = taken.name, error = %left, "could not delete the snapshot taken for forks");
        }
        made.map(|vms| Forked {
            snapshot: taken.name,
            vms,
        })
    }

    /// Whose a fork of a VM owned by `source_owner` made by `by` is: the
    /// source's owner's when they or one who reaches every VM (an admin)
    /// fork it; else (one the source is granted to) `by`'s.
    pub(super) fn fork_owner(&self, source_owner: Option<String>, by: &Identity) -> Option<String> {
        if self.role_of(by).spec.vms == crate::policy::VmScope::All
            || source_owner.as_deref() == Some(by.name.as_str())
        {
            source_owner
        } else {
            Some(by.name.clone())
        }
    }

    /// The VMs made, or (when one failed) the first error, the made ones
    /// destroyed.
    async fn all_or_none(&self, made: Vec<Result<VmInfo>>) -> Result<Vec<VmInfo>> {
        if made.iter().all(Result::is_ok) {
            return Ok(made.into_iter().flatten().collect());
        }
        let mut first_error = None;
        for outcome in made {
            match outcome {
                Ok(vm) => {
                    if let Err(e) = self.destroy(&vm.name).await {
                        tracing::warn!(vm = vm.name, error = %e, "could not undo a fork");
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or_else(|| DaemonError::Internal("a fork failed".into())))
    }

    /// `name` (one fork), `name-1`..`name-N` (several), or as many free
    /// `vm-N` names.
    async fn fork_names(&self, name: Option<String>, count: u32) -> Result<Vec<String>> {
        let names: Vec<String> = match name {
            Some(name) if count == 1 => vec![name],
            Some(name) => (1..=count).map(|i| format!("{name}-{i}")).collect(),
            None => {
                let taken: Vec<String> = self.list().await?.into_iter().map(|v| v.name).collect();
                (1..)
                    .map(|i| format!("vm-{i}"))
                    .filter(|n| !taken.contains(n))
                    .take(count as usize)
                    .collect()
            }
        };
        for n in &names {
            validate_name("VM", n)
                .map_err(|e| DaemonError::Invalid(format!("`name`: {}", StorageError::from(e))))?;
            if self.info(n).await.is_ok() {
                return Err(DaemonError::Storage(StorageError::VmExists(n.clone())));
            }
        }
        Ok(names)
    }
}

/// A snapshot name for forks made now: `fork-`, the time to the
/// millisecond, and a count of this daemon's.
fn fork_snapshot_name() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let digits: String = humantime::format_rfc3339_millis(std::time::SystemTime::now())
        .to_string()
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    format!("fork-{}-{n}", digits.get(..17).unwrap_or(&digits))
}
