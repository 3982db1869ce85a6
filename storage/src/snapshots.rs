//! Snapshots of a VM's drives, in-place rollback, and deletion.

use rusqlite::{OptionalExtension, params};

use crate::pool::{self, delete_subvolume, snapshot_subvolume};
use crate::vms::drive_file;
use crate::{
    Quiesce, ROOT_DRIVE, Reattach, Result, SnapshotInfo, Storage, StorageError, WORKSPACE_DRIVE,
    names::validate_name, now,
};

/// Steps of `snapshot_drive`, in order.
pub const SNAPSHOT_STEPS: &[&str] = &["snapshot:recorded", "snapshot:taken"];
/// Steps of `rollback_drive`, in order.
pub const ROLLBACK_STEPS: &[&str] = &["rollback:recorded", "rollback:released", "rollback:cloned"];
/// A rollback's records in a VM's `op` (see [`Storage::rollback_drive`]).
pub(crate) const RELEASE_OP: &str = "release:";
pub(crate) const ROLLBACK_OP: &str = "rollback:";
pub(crate) const REATTACH_OP: &str = "reattach:";
/// Steps of `delete_snapshot`, in order.
pub const DELETE_STEPS: &[&str] = &["snapshot-delete:recorded"];

fn check_drive(vm: &str, drive: &str) -> Result<()> {
    if drive == ROOT_DRIVE || drive == WORKSPACE_DRIVE {
        Ok(())
    } else {
        Err(StorageError::NoDrive {
            vm: vm.to_owned(),
            drive: drive.to_owned(),
        })
    }
}

impl Storage {
    /// A read-only, point-in-time snapshot of VM `vm`, taken for `drive`,
    /// with `quiesce` frozen around the instant it is taken. The name
    /// defaults to one made from the time.
    pub fn snapshot_drive(
        &self,
        vm: &str,
        drive: &str,
        name: Option<&str>,
        quiesce: &mut dyn Quiesce,
    ) -> Result<SnapshotInfo> {
        validate_name("VM", vm)?;
        check_drive(vm, drive)?;
        let name = match name {
            Some(n) => n.to_owned(),
            None => humantime::format_rfc3339_millis(std::time::SystemTime::now())
                .to_string()
                .chars()
                .filter(char::is_ascii_digit)
                .collect::<String>()
                .get(..17)
                .map(|d| format!("snap-{d}"))
                .unwrap_or_else(|| "snap".into()),
        };
        validate_name("snapshot", &name)?;
        let drives = self.vm_drives(vm)?;
        if self.snapshot_row(vm, &name)?.is_some() {
            return Err(StorageError::SnapshotExists {
                vm: vm.to_owned(),
                snapshot: name,
            });
        }
        let path = self.pool().snapshot_dir(vm, &name);
        self.db().connection().execute(
            "INSERT INTO snapshots (vm, name, drive, path, created_at, size_bytes, parent, op)
             VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6, 'create')",
            params![
                vm,
                name,
                drive,
                path.display().to_string(),
                now(),
                drives.base_snapshot
            ],
        )?;
        let result: Result<()> = (|| {
            self.step("snapshot:recorded")?;
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(StorageError::io("create", parent))?;
            }
            quiesce.freeze().map_err(StorageError::Quiesce)?;
            let taken = snapshot_subvolume(&self.pool().vm_dir(vm), &path, true);
            let thawed = quiesce.thaw();
            taken?;
            thawed.map_err(StorageError::Quiesce)?;
            self.step("snapshot:taken")?;
            let file = path.join(drive_file(drive));
            let size = std::fs::metadata(&file)
                .map_err(StorageError::io("stat", &file))?
                .len();
            self.db().connection().execute(
                "UPDATE snapshots SET op = NULL, size_bytes = ?3 WHERE vm = ?1 AND name = ?2",
                params![vm, name, size as i64],
            )?;
            Ok(())
        })();
        if let Err(e) = result {
            if !e.is_injected() {
                let _ = self.finish_snapshot_op(vm, &name);
            }
            return Err(e);
        }
        self.snapshot(vm, &name)
    }

    pub fn snapshot(&self, vm: &str, name: &str) -> Result<SnapshotInfo> {
        validate_name("VM", vm)?;
        validate_name("snapshot", name)?;
        self.snapshot_row(vm, name)?
            .filter(|(_, op)| op.is_none())
            .map(|(s, _)| s)
            .ok_or_else(|| StorageError::NoSnapshot {
                vm: vm.to_owned(),
                snapshot: name.to_owned(),
            })
    }

    /// Snapshots of one VM, or of all, oldest first.
    pub fn list_snapshots(&self, vm: Option<&str>) -> Result<Vec<SnapshotInfo>> {
        let db = self.db();
        let mut stmt = db.connection().prepare(
            "SELECT vm, name, drive, path, created_at, size_bytes, parent, op FROM snapshots
             WHERE op IS NULL AND (?1 IS NULL OR vm = ?1) ORDER BY created_at, vm, name",
        )?;
        let rows = stmt
            .query_map(params![vm], |r| snapshot_row(r).map(|(s, _)| s))?
            .collect::<std::result::Result<_, _>>()?;
        Ok(rows)
    }

    pub fn delete_snapshot(&self, vm: &str, name: &str) -> Result<()> {
        self.snapshot(vm, name)?;
        self.db().connection().execute(
            "UPDATE snapshots SET op = 'delete' WHERE vm = ?1 AND name = ?2",
            params![vm, name],
        )?;
        self.step("snapshot-delete:recorded")?;
        self.finish_snapshot_op(vm, name)
    }

    /// Makes VM `vm`'s drive (the one the snapshot was taken for) hold the
    /// snapshot's content again, in place: the drive file keeps its inode,
    /// so a running VMM keeps a valid open file. `hooks` lets the guest
    /// release the drive first and attach it again afterwards.
    ///
    /// Three records, so that a crash anywhere is finished correctly
    /// whether the VM survived it or not: `release:` while the guest may
    /// be letting go (nothing on disk changes yet), `rollback:` only once
    /// it has (recovery may redo the clone under no mounted filesystem),
    /// `reattach:` once the drive holds the snapshot. After a crash a VM
    /// left in `release:` or `rollback:` moves to `reattach:`, which stays
    /// until the caller has had the guest attach the drive again
    /// ([`Storage::pending_reattach`], [`Storage::reattached`]).
    pub fn rollback_drive(
        &self,
        vm: &str,
        snapshot: &str,
        hooks: &mut dyn Reattach,
    ) -> Result<SnapshotInfo> {
        let snap = self.snapshot(vm, snapshot)?;
        self.vm_drives(vm)?;
        self.claim_vm(vm, &format!("{RELEASE_OP}{snapshot}"))?;
        // Only an injected crash stops here.
        self.step("rollback:recorded")?;
        if let Err(why) = hooks.release() {
            // The guest did not let go: nothing changed, the VM is free.
            self.set_vm_op(vm, None)?;
            return Err(StorageError::Release {
                drive: snap.drive.clone(),
                why,
            });
        }
        let result: Result<()> = (|| {
            self.set_vm_op(vm, Some(&format!("{ROLLBACK_OP}{snapshot}")))?;
            self.step("rollback:released")?;
            self.clone_back(vm, &snap)?;
            self.rolled_back(vm, &snap)?;
            self.step("rollback:cloned")?;
            Ok(())
        })();
        if let Err(e) = result {
            if !e.is_injected() {
                // Finished as recovery would, then the guest gets its
                // drive back whatever it holds.
                let _ = self.finish_vm_op(vm);
                let _ = hooks.reattach();
                let _ = self.set_vm_op(vm, None);
            }
            return Err(e);
        }
        let reattached = hooks.reattach();
        // Done either way: a guest that could not mount again gets its
        // drive at its next boot, and the caller is told.
        self.set_vm_op(vm, None)?;
        reattached.map_err(StorageError::Reattach)?;
        Ok(snap)
    }

    /// VMs whose guest may have let go of a drive when a rollback was
    /// interrupted, and that drive: each running one needs it attached
    /// again (a stopped one attaches it when it boots); then
    /// [`Storage::reattached`].
    pub fn pending_reattach(&self) -> Result<Vec<(String, String)>> {
        let db = self.db();
        let mut stmt = db.connection().prepare(
            "SELECT name, substr(op, length(?1) + 1) FROM vms WHERE op LIKE ?1 || '%' ORDER BY name",
        )?;
        let rows = stmt
            .query_map(params![REATTACH_OP], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<std::result::Result<_, _>>()?;
        Ok(rows)
    }

    /// The guest of VM `vm` has its drive again (or the VM is stopped):
    /// the interrupted rollback is over.
    pub fn reattached(&self, vm: &str) -> Result<()> {
        self.db().connection().execute(
            "UPDATE vms SET op = NULL WHERE name = ?1 AND op LIKE ?2 || '%'",
            params![vm, REATTACH_OP],
        )?;
        Ok(())
    }

    /// The drive holds the snapshot: recorded, and the guest is owed it.
    pub(crate) fn rolled_back(&self, vm: &str, snap: &SnapshotInfo) -> Result<()> {
        self.db().connection().execute(
            "UPDATE vms SET op = ?3, base_snapshot = ?2 WHERE name = ?1",
            params![
                vm,
                format!("{vm}/{}", snap.name),
                format!("{REATTACH_OP}{}", snap.drive)
            ],
        )?;
        Ok(())
    }

    pub(crate) fn set_vm_op(&self, vm: &str, op: Option<&str>) -> Result<()> {
        self.db()
            .connection()
            .execute("UPDATE vms SET op = ?2 WHERE name = ?1", params![vm, op])?;
        Ok(())
    }

    /// The file work of a rollback; idempotent, so recovery can redo it.
    pub(crate) fn clone_back(&self, vm: &str, snap: &SnapshotInfo) -> Result<()> {
        pool::reflink(
            &snap.path.join(drive_file(&snap.drive)),
            &self.pool().vm_dir(vm).join(drive_file(&snap.drive)),
        )
    }

    pub(crate) fn snapshot_row(
        &self,
        vm: &str,
        name: &str,
    ) -> Result<Option<(SnapshotInfo, Option<String>)>> {
        Ok(self
            .db()
            .connection()
            .query_row(
                "SELECT vm, name, drive, path, created_at, size_bytes, parent, op FROM snapshots
                 WHERE vm = ?1 AND name = ?2",
                params![vm, name],
                snapshot_row,
            )
            .optional()?)
    }

    pub(crate) fn delete_snapshot_files(&self, vm: &str, name: &str) -> Result<()> {
        delete_subvolume(&self.pool().snapshot_dir(vm, name))
    }
}

fn snapshot_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(SnapshotInfo, Option<String>)> {
    Ok((
        SnapshotInfo {
            vm: r.get(0)?,
            name: r.get(1)?,
            drive: r.get(2)?,
            path: r.get::<_, String>(3)?.into(),
            created_at: r.get(4)?,
            size_bytes: r.get::<_, i64>(5)? as u64,
            parent: r.get(6)?,
        },
        r.get(7)?,
    ))
}
