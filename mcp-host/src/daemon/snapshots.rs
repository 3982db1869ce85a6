//! Snapshots of a running or stopped VM's workspace: taken (quiesced),
//! listed, deleted and restored in place.

use nexus_storage::SnapshotInfo;

use super::hooks::GuestHooks;
use super::{Daemon, DaemonError, Result, admission};

impl Daemon {
    /// A consistent snapshot of a VM's drive; a running guest freezes
    /// /workspace around it.
    pub async fn snapshot(
        &self,
        name: &str,
        drive: Option<String>,
        snapshot: Option<String>,
    ) -> Result<SnapshotInfo> {
        self.known(name).await?;
        self.check_not_destroying(name)?;
        let _op = self.lock_vm(name).await;
        self.known(name).await?;
        let drive = drive.unwrap_or_else(|| nexus_storage::WORKSPACE_DRIVE.to_owned());
        let owned = name.to_owned();
        let existing = self
            .blocking(move |s| s.list_snapshots(Some(&owned)))
            .await?
            .len();
        admission::admit_snapshot(&self.limits, name, existing)?;
        // Held until the snapshot is taken: two snapshots of one owner's
        // VMs cannot both pass the count.
        let _counted = self.snapshotting.lock().await;
        self.admit_owner_snapshot(self.owner_of(name).flatten().as_deref())
            .await?;
        // A paused VM's workspace is frozen already, and its guest cannot
        // answer: nothing to ask of it.
        let control = if self.is_paused(name).await {
            None
        } else {
            self.control(name).await?
        };
        let vm = name.to_owned();
        let handle = tokio::runtime::Handle::current();
        let abandon = self.destroy_asked(name);
        self.blocking(move |s| {
            let mut hooks = GuestHooks {
                handle,
                client: control,
                vm: vm.clone(),
                abandon,
            };
            s.snapshot_drive(&vm, &drive, snapshot.as_deref(), &mut hooks)
        })
        .await
    }

    pub async fn list_snapshots(&self, vm: Option<String>) -> Result<Vec<SnapshotInfo>> {
        if let Some(vm) = &vm {
            self.known(vm).await?;
        }
        self.blocking(move |s| s.list_snapshots(vm.as_deref()))
            .await
    }

    pub async fn delete_snapshot(&self, vm: &str, snapshot: &str) -> Result<()> {
        let (vm, snapshot) = (vm.to_owned(), snapshot.to_owned());
        self.blocking(move |s| s.delete_snapshot(&vm, &snapshot))
            .await
    }

    /// Puts a snapshot's content back on its drive. A running VM keeps
    /// running: the guest unmounts /workspace (killing what holds it),
    /// the drive's content is replaced in place, the guest mounts it again.
    pub async fn restore(&self, name: &str, snapshot: &str) -> Result<SnapshotInfo> {
        self.known(name).await?;
        self.check_not_destroying(name)?;
        let _op = self.lock_vm(name).await;
        let (vm, snap) = (name.to_owned(), snapshot.to_owned());
        let target = self.blocking(move |s| s.snapshot(&vm, &snap)).await?;
        let running = self.running.lock().await.contains_key(name);
        if self.is_paused(name).await {
            return Err(DaemonError::Invalid(format!(
                "VM {name} is paused, and a restore needs its guest to unmount and mount /workspace: resume_vm {name} first"
            )));
        }
        if running && target.drive != nexus_storage::WORKSPACE_DRIVE {
            return Err(DaemonError::Invalid(format!(
                "snapshot {snapshot:?} is of the {} drive, which a running VM cannot give up: stop_vm {name} first",
                target.drive
            )));
        }
        let control = self.control(name).await?;
        let (vm, snap) = (name.to_owned(), snapshot.to_owned());
        let handle = tokio::runtime::Handle::current();
        let abandon = self.destroy_asked(name);
        self.blocking(move |s| {
            let mut hooks = GuestHooks {
                handle,
                client: control,
                vm: vm.clone(),
                abandon,
            };
            s.rollback_drive(&vm, &snap, &mut hooks)
        })
        .await
    }
}
