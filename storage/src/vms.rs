//! A VM's drives: created from an image, forked from a snapshot, destroyed.

use std::path::PathBuf;

use rusqlite::{OptionalExtension, params};

use crate::pool::{self, create_subvolume, delete_subvolume, snapshot_subvolume};
use crate::snapshots::REATTACH_OP;
use crate::{
    MAX_WORKSPACE_BYTES, ROOT_DRIVE, Result, Storage, StorageError, Usage, VmDrives,
    WORKSPACE_DRIVE, WorkspaceSource, names::validate_name, now,
};

/// Steps of `create_vm_drives`, in order.
pub const CREATE_STEPS: &[&str] = &[
    "create:recorded",
    "create:subvolume",
    "create:root",
    "create:workspace",
];
/// Steps of `fork`, in order.
pub const FORK_STEPS: &[&str] = &["fork:recorded", "fork:cloned"];
/// Steps of `destroy_vm_drives`, in order.
pub const DESTROY_STEPS: &[&str] = &["destroy:recorded", "destroy:snapshots", "destroy:subvolume"];

pub(crate) fn drive_file(drive: &str) -> String {
    format!("{drive}.ext4")
}

/// What the caller keeps with a new VM (opaque here), recorded in the
/// same statement as the VM itself: no crash leaves a VM without them.
#[derive(Debug, Clone, Copy)]
pub struct VmAttrs<'a> {
    /// JSON, the caller's.
    pub config: &'a str,
    /// Who the VM belongs to; None: no one.
    pub owner: Option<&'a str>,
}

impl Default for VmAttrs<'_> {
    fn default() -> Self {
        Self {
            config: "{}",
            owner: None,
        }
    }
}

/// Where a new VM's row takes its attributes from.
pub(crate) enum Attrs<'a> {
    Given(VmAttrs<'a>),
    /// A fork's: its source's image and config, and its owner unless
    /// one is given (`Some(None)`: no one).
    From(&'a str, Option<Option<&'a str>>),
    /// A pooled VM's: given, and only while its image is still the
    /// version (digest) its drives were made of.
    Warm(VmAttrs<'a>, &'a str),
}

impl Storage {
    /// Creates VM `vm`'s drives: root is a reflink clone of the image's root
    /// filesystem; the workspace is a new sparse ext4 or a clone of a
    /// snapshot's workspace.
    pub fn create_vm_drives(
        &self,
        vm: &str,
        image: &str,
        workspace: WorkspaceSource,
    ) -> Result<VmDrives> {
        self.create_vm_drives_as(vm, image, workspace, VmAttrs::default())
    }

    /// [`Storage::create_vm_drives`], recording `attrs` with the VM.
    pub fn create_vm_drives_as(
        &self,
        vm: &str,
        image: &str,
        workspace: WorkspaceSource,
        attrs: VmAttrs<'_>,
    ) -> Result<VmDrives> {
        validate_name("VM", vm)?;
        if self.image(image)?.is_none() {
            return Err(StorageError::NoImage(image.to_owned()));
        }
        let (ws_from, base) = match &workspace {
            WorkspaceSource::New { bytes } => {
                if !(1 << 20..=MAX_WORKSPACE_BYTES).contains(bytes) {
                    return Err(StorageError::BadSize {
                        got: *bytes,
                        max: MAX_WORKSPACE_BYTES,
                    });
                }
                (None, None)
            }
            WorkspaceSource::Snapshot { vm: from, snapshot } => {
                let snap = self.snapshot(from, snapshot)?;
                (
                    Some(snap.path.join(drive_file(WORKSPACE_DRIVE))),
                    Some(format!("{from}/{snapshot}")),
                )
            }
        };
        if self.vm_row_exists(vm)? {
            return Err(StorageError::VmExists(vm.to_owned()));
        }
        let dir = self.pool().vm_dir(vm);
        // The version is read in the transaction that records the VM: from
        // then on, no replace or cleanup takes its files away.
        let image_path = self
            .record_vm(vm, image, base.as_deref(), Attrs::Given(attrs))?
            .ok_or_else(|| StorageError::NoImage(image.to_owned()))?;
        let result = (|| {
            self.step("create:recorded")?;
            create_subvolume(&dir)?;
            self.step("create:subvolume")?;
            pool::reflink(
                &image_path.join("rootfs.ext4"),
                &dir.join(drive_file(ROOT_DRIVE)),
            )?;
            self.step("create:root")?;
            let ws = dir.join(drive_file(WORKSPACE_DRIVE));
            match (&workspace, &ws_from) {
                (WorkspaceSource::New { bytes }, _) => pool::make_ext4(&ws, *bytes)?,
                (_, Some(from)) => pool::reflink(from, &ws)?,
                _ => {}
            }
            self.step("create:workspace")?;
            self.finish_vm_record(vm)
        })();
        self.settle_vm(vm, result)?;
        self.vm_drives(vm)
    }

    /// New VM `vm` whose drives (root and workspace) are those of snapshot
    /// `snapshot` of `from`, as a writable clone; its image, config and
    /// owner are `from`'s.
    pub fn fork(&self, from: &str, snapshot: &str, vm: &str) -> Result<VmDrives> {
        self.fork_inner(from, snapshot, vm, None)
    }

    /// [`Storage::fork`], the new VM belonging to `owner` (None: no one).
    pub fn fork_as(
        &self,
        from: &str,
        snapshot: &str,
        vm: &str,
        owner: Option<&str>,
    ) -> Result<VmDrives> {
        self.fork_inner(from, snapshot, vm, Some(owner))
    }

    fn fork_inner(
        &self,
        from: &str,
        snapshot: &str,
        vm: &str,
        owner: Option<Option<&str>>,
    ) -> Result<VmDrives> {
        validate_name("VM", vm)?;
        let snap = self.snapshot(from, snapshot)?;
        if self.vm_row_exists(vm)? {
            return Err(StorageError::VmExists(vm.to_owned()));
        }
        self.record_vm(
            vm,
            "",
            Some(&format!("{from}/{snapshot}")),
            Attrs::From(from, owner),
        )?;
        let result = (|| {
            self.step("fork:recorded")?;
            snapshot_subvolume(&snap.path, &self.pool().vm_dir(vm), false)?;
            self.step("fork:cloned")?;
            self.finish_vm_record(vm)
        })();
        self.settle_vm(vm, result)?;
        self.vm_drives(vm)
    }

    /// Removes a VM's drives and all its snapshots.
    pub fn destroy_vm_drives(&self, vm: &str) -> Result<()> {
        validate_name("VM", vm)?;
        self.vm_drives(vm)?;
        match self.claim_vm(vm, "destroy") {
            // A destroy that failed midway may be tried again.
            Err(StorageError::Busy { op, .. }) if op == "destroy" => {}
            // A drive owed to a guest that is going away.
            Err(StorageError::Busy { op, .. }) if op.starts_with(REATTACH_OP) => {
                self.set_vm_op(vm, Some("destroy"))?;
            }
            other => other?,
        }
        let result = self.step("destroy:recorded");
        self.settle_vm(vm, result)?;
        self.finish_vm_op(vm)?;
        self.collect_image_versions()
    }

    /// The drives of a VM.
    pub fn vm_drives(&self, vm: &str) -> Result<VmDrives> {
        let row = self
            .db()
            .connection()
            .query_row(
                "SELECT image, base_snapshot, op, image_digest FROM vms WHERE name = ?1",
                params![vm],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, Option<String>>(1)?,
                        r.get::<_, Option<String>>(2)?,
                        r.get::<_, Option<String>>(3)?,
                    ))
                },
            )
            .optional()?;
        match row {
            // A VM still being created has no drives yet.
            Some((image, base_snapshot, op, image_digest)) if op.as_deref() != Some("create") => {
                let dir = self.pool().vm_dir(vm);
                Ok(VmDrives {
                    vm: vm.to_owned(),
                    image,
                    image_digest: image_digest.unwrap_or_default(),
                    root: dir.join(drive_file(ROOT_DRIVE)),
                    workspace: dir.join(drive_file(WORKSPACE_DRIVE)),
                    base_snapshot,
                })
            }
            _ => Err(StorageError::NoVm(vm.to_owned())),
        }
    }

    /// Every VM with drives, by name.
    pub fn list_vms(&self) -> Result<Vec<VmDrives>> {
        let names: Vec<String> = {
            let db = self.db();
            let mut stmt = db
                .connection()
                .prepare("SELECT name FROM vms WHERE op IS NULL OR op != 'create' ORDER BY name")?;
            stmt.query_map([], |r| r.get(0))?
                .collect::<std::result::Result<_, _>>()?
        };
        names.iter().map(|n| self.vm_drives(n)).collect()
    }

    /// How much of the pool a VM's drives use alone, and share.
    pub fn usage(&self, vm: &str) -> Result<Usage> {
        self.vm_drives(vm)?;
        let (exclusive_bytes, shared_bytes) = pool::usage(&self.pool().vm_dir(vm))?;
        Ok(Usage {
            exclusive_bytes,
            shared_bytes,
        })
    }

    /// Keeps `config` (opaque to storage) with a VM.
    pub fn set_vm_config(&self, vm: &str, config: &str) -> Result<()> {
        self.vm_drives(vm)?;
        self.db().connection().execute(
            "UPDATE vms SET config = ?2 WHERE name = ?1",
            params![vm, config],
        )?;
        Ok(())
    }

    /// Gives VM `vm` to `owner` (None: to no one).
    pub fn set_vm_owner(&self, vm: &str, owner: Option<&str>) -> Result<()> {
        self.vm_drives(vm)?;
        self.db().connection().execute(
            "UPDATE vms SET owner = ?2 WHERE name = ?1",
            params![vm, owner],
        )?;
        Ok(())
    }

    /// Every VM with drives and who it belongs to.
    pub fn vm_owners(&self) -> Result<Vec<(String, Option<String>)>> {
        let db = self.db();
        let mut stmt = db.connection().prepare(
            "SELECT name, owner FROM vms WHERE op IS NULL OR op != 'create' ORDER BY name",
        )?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<std::result::Result<_, _>>()?;
        Ok(rows)
    }

    /// Who VM `vm` belongs to, if anyone.
    pub fn vm_owner(&self, vm: &str) -> Result<Option<String>> {
        self.vm_drives(vm)?;
        Ok(self.db().connection().query_row(
            "SELECT owner FROM vms WHERE name = ?1",
            params![vm],
            |r| r.get(0),
        )?)
    }

    /// What `set_vm_config` kept (`{}` when nothing was).
    pub fn vm_config(&self, vm: &str) -> Result<String> {
        self.vm_drives(vm)?;
        Ok(self.db().connection().query_row(
            "SELECT config FROM vms WHERE name = ?1",
            params![vm],
            |r| r.get(0),
        )?)
    }

    pub(crate) fn vm_row_exists(&self, vm: &str) -> Result<bool> {
        Ok(self
            .db()
            .connection()
            .query_row("SELECT 1 FROM vms WHERE name = ?1", params![vm], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Records a VM being created; for a new one (`Attrs::Given`), with
    /// the current version of `image`, whose directory it returns.
    pub(crate) fn record_vm(
        &self,
        vm: &str,
        image: &str,
        base: Option<&str>,
        attrs: Attrs<'_>,
    ) -> Result<Option<PathBuf>> {
        let dir = self.pool().vm_dir(vm);
        let mut db = self.db();
        let tx = db.connection_mut().transaction()?;
        let mut image_path = None;
        let made_of = match attrs {
            Attrs::Warm(_, digest) => Some(digest),
            _ => None,
        };
        match attrs {
            Attrs::Given(attrs) | Attrs::Warm(attrs, _) => {
                let Some((digest, path)) = tx
                    .query_row(
                        "SELECT digest, path FROM images WHERE name = ?1 AND op IS NULL",
                        params![image],
                        |r| Ok((r.get::<_, Option<String>>(0)?, r.get::<_, String>(1)?)),
                    )
                    .optional()?
                else {
                    return Err(StorageError::NoImage(image.to_owned()));
                };
                if made_of.is_some_and(|made_of| digest.as_deref() != Some(made_of)) {
                    return Err(StorageError::ImageChanged(image.to_owned()));
                }
                tx.execute(
                    "INSERT INTO vms
                        (name, image, created_at, base_snapshot, op, config, owner, image_digest)
                     VALUES (?1, ?2, ?3, ?4, 'create', ?5, ?6, ?7)",
                    params![vm, image, now(), base, attrs.config, attrs.owner, digest],
                )?;
                image_path = Some(PathBuf::from(path));
            }
            Attrs::From(from, owner) => {
                let added = tx.execute(
                    "INSERT INTO vms
                        (name, image, created_at, base_snapshot, op, config, owner, image_digest)
                     SELECT ?1, image, ?3, ?4, 'create', config,
                            CASE WHEN ?5 THEN ?6 ELSE owner END, image_digest
                     FROM vms WHERE name = ?2",
                    params![vm, from, now(), base, owner.is_some(), owner.flatten()],
                )?;
                if added == 0 {
                    return Err(StorageError::NoVm(from.to_owned()));
                }
            }
        }
        for drive in [ROOT_DRIVE, WORKSPACE_DRIVE] {
            tx.execute(
                "INSERT INTO drives (vm, name, path, size_bytes) VALUES (?1, ?2, ?3, 0)",
                params![vm, drive, dir.join(drive_file(drive)).display().to_string()],
            )?;
        }
        tx.commit()?;
        Ok(image_path)
    }

    pub(crate) fn finish_vm_record(&self, vm: &str) -> Result<()> {
        let dir = self.pool().vm_dir(vm);
        let mut db = self.db();
        let tx = db.connection_mut().transaction()?;
        for drive in [ROOT_DRIVE, WORKSPACE_DRIVE] {
            let path = dir.join(drive_file(drive));
            let size = std::fs::metadata(&path)
                .map_err(StorageError::io("stat", &path))?
                .len();
            tx.execute(
                "UPDATE drives SET size_bytes = ?3 WHERE vm = ?1 AND name = ?2",
                params![vm, drive, size as i64],
            )?;
        }
        tx.execute("UPDATE vms SET op = NULL WHERE name = ?1", params![vm])?;
        tx.commit()?;
        Ok(())
    }

    /// Marks an idle VM busy with `op`; refuses when another op runs.
    pub(crate) fn claim_vm(&self, vm: &str, op: &str) -> Result<()> {
        let changed = self.db().connection().execute(
            "UPDATE vms SET op = ?2 WHERE name = ?1 AND op IS NULL",
            params![vm, op],
        )?;
        if changed == 1 {
            return Ok(());
        }
        let current: Option<Option<String>> = self
            .db()
            .connection()
            .query_row("SELECT op FROM vms WHERE name = ?1", params![vm], |r| {
                r.get(0)
            })
            .optional()?;
        match current {
            Some(Some(op)) => Err(StorageError::Busy {
                vm: vm.to_owned(),
                op,
            }),
            _ => Err(StorageError::NoVm(vm.to_owned())),
        }
    }

    /// After an operation on a VM: a real error is recovered from at once;
    /// an injected one stands for a crash, recovered by the next `open`.
    pub(crate) fn settle_vm(&self, vm: &str, result: Result<()>) -> Result<()> {
        if let Err(e) = result {
            if !e.is_injected() {
                let _ = self.finish_vm_op(vm);
            }
            return Err(e);
        }
        Ok(())
    }

    pub(crate) fn destroy_files(&self, vm: &str) -> Result<()> {
        let snapshots_dir = self.pool().root().join("snapshots").join(vm);
        if let Ok(entries) = std::fs::read_dir(&snapshots_dir) {
            for entry in entries.flatten() {
                delete_subvolume(&entry.path())?;
            }
        }
        self.step("destroy:snapshots")?;
        let _ = std::fs::remove_dir(&snapshots_dir);
        delete_subvolume(&self.pool().vm_dir(vm))?;
        self.step("destroy:subvolume")?;
        Ok(())
    }
}
