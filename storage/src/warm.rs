//! Drives of pooled VMs: made and booted ahead of need, no VM's until a
//! new VM takes them over whole ([`Storage::adopt_warm_drives`]). They
//! live under `<pool>/warm/`, outside the catalog: a pooled VM does not
//! outlive the daemon that booted it, so what is there at start is
//! discarded ([`Storage::discard_all_warm_drives`]).

use std::path::PathBuf;

use rusqlite::{OptionalExtension, params};

use crate::pool::{self, create_subvolume, delete_subvolume};
use crate::vms::{Attrs, drive_file};
use crate::{
    MAX_WORKSPACE_BYTES, ROOT_DRIVE, Result, Storage, StorageError, VmAttrs, VmDrives,
    WORKSPACE_DRIVE, names::validate_name,
};

/// The step boundaries of [`Storage::adopt_warm_drives`].
pub const ADOPT_STEPS: &[&str] = &["adopt:recorded", "adopt:moved"];

/// A pooled VM's drives, and the image version they were made of.
#[derive(Debug, Clone)]
pub struct WarmDrives {
    pub id: String,
    pub dir: PathBuf,
    pub root: PathBuf,
    pub workspace: PathBuf,
    pub image: String,
    pub digest: String,
}

impl Storage {
    fn warm_root(&self) -> PathBuf {
        self.pool().root().join("warm")
    }

    /// New drives for pooled VM `id`: root a clone of `image`'s current
    /// version, a blank workspace of `workspace_bytes`.
    pub fn make_warm_drives(
        &self,
        id: &str,
        image: &str,
        workspace_bytes: u64,
    ) -> Result<WarmDrives> {
        validate_name("pooled VM", id)?;
        if !(1 << 20..=MAX_WORKSPACE_BYTES).contains(&workspace_bytes) {
            return Err(StorageError::BadSize {
                got: workspace_bytes,
                max: MAX_WORKSPACE_BYTES,
            });
        }
        let (digest, path) = self
            .db()
            .connection()
            .query_row(
                "SELECT digest, path FROM images WHERE name = ?1 AND op IS NULL",
                params![image],
                |r| Ok((r.get::<_, Option<String>>(0)?, r.get::<_, String>(1)?)),
            )
            .optional()?
            .ok_or_else(|| StorageError::NoImage(image.to_owned()))?;
        let root = self.warm_root();
        std::fs::create_dir_all(&root).map_err(StorageError::io("create", &root))?;
        let dir = root.join(id);
        let drives = WarmDrives {
            id: id.to_owned(),
            root: dir.join(drive_file(ROOT_DRIVE)),
            workspace: dir.join(drive_file(WORKSPACE_DRIVE)),
            dir,
            image: image.to_owned(),
            digest: digest.unwrap_or_default(),
        };
        let made = (|| {
            create_subvolume(&drives.dir)?;
            pool::reflink(&PathBuf::from(&path).join("rootfs.ext4"), &drives.root)?;
            pool::make_ext4(&drives.workspace, workspace_bytes)
        })();
        if let Err(e) = made {
            let _ = self.discard_warm_drives(&drives);
            return Err(e);
        }
        Ok(drives)
    }

    /// The size of a pooled VM's workspace drive.
    pub fn warm_workspace_bytes(&self, drives: &WarmDrives) -> Result<u64> {
        Ok(std::fs::metadata(&drives.workspace)
            .map_err(StorageError::io("stat", &drives.workspace))?
            .len())
    }

    /// Puts the workspace of snapshot `snapshot` of `vm` on a pooled VM's
    /// workspace drive, in place (its VMM keeps the file open); the
    /// guest must have let go of it.
    pub fn warm_workspace_from(&self, drives: &WarmDrives, vm: &str, snapshot: &str) -> Result<()> {
        let snap = self.snapshot(vm, snapshot)?;
        pool::reflink(
            &snap.path.join(drive_file(WORKSPACE_DRIVE)),
            &drives.workspace,
        )
    }

    /// New VM `vm` made of a pooled VM's drives (moved, not copied),
    /// recorded with `attrs` and `base` (the snapshot its workspace came
    /// from). Refused, with the drives left as they were, if the name is
    /// taken or the image changed since they were made.
    pub fn adopt_warm_drives(
        &self,
        drives: &WarmDrives,
        vm: &str,
        base: Option<&str>,
        attrs: VmAttrs<'_>,
    ) -> Result<VmDrives> {
        validate_name("VM", vm)?;
        if self.vm_row_exists(vm)? {
            return Err(StorageError::VmExists(vm.to_owned()));
        }
        self.record_vm(vm, &drives.image, base, Attrs::Warm(attrs, &drives.digest))?;
        let target = self.pool().vm_dir(vm);
        let result = (|| {
            self.step("adopt:recorded")?;
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(StorageError::io("create", parent))?;
            }
            // A subvolume moves by rename, within the one filesystem.
            std::fs::rename(&drives.dir, &target).map_err(StorageError::io("move", &drives.dir))?;
            self.step("adopt:moved")?;
            self.finish_vm_record(vm)
        })();
        if let Err(e) = &result
            && !e.is_injected()
        {
            // Back where they were, for the caller to discard or retry.
            if target.exists() && !drives.dir.exists() {
                let _ = std::fs::rename(&target, &drives.dir);
            }
        }
        self.settle_vm(vm, result)?;
        self.vm_drives(vm)
    }

    /// Removes a pooled VM's drives.
    pub fn discard_warm_drives(&self, drives: &WarmDrives) -> Result<()> {
        if pool::is_subvolume(&drives.dir) {
            delete_subvolume(&drives.dir)
        } else {
            match std::fs::remove_dir_all(&drives.dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(StorageError::io("remove", &drives.dir)(e))
                }
                _ => Ok(()),
            }
        }
    }

    /// Removes every pooled VM's drives (none outlives the daemon that
    /// booted it); returns what was there.
    pub fn discard_all_warm_drives(&self) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.warm_root()) else {
            return Ok(removed);
        };
        for dir in entries.flatten().map(|e| e.path()) {
            let id = dir
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            self.discard_warm_drives(&WarmDrives {
                id,
                root: PathBuf::new(),
                workspace: PathBuf::new(),
                dir: dir.clone(),
                image: String::new(),
                digest: String::new(),
            })?;
            removed.push(dir);
        }
        Ok(removed)
    }
}
