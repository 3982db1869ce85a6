//! Recovery: finishing or undoing operations a crash interrupted, and
//! removing what no catalog row knows of. Runs at every open.
//!
//! The rule per operation: an interrupted creation (import, create, fork,
//! snapshot) is undone; an interrupted deletion (destroy, snapshot or image
//! delete) is finished; an interrupted rollback is finished if the guest
//! had let go of the drive (redoing the clone is idempotent, and the
//! caller had already asked for it), left as it was if not, and either
//! way the VM is marked as owed its drive (`Storage::pending_reattach`).

use std::path::{Path, PathBuf};

use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use crate::pool::{delete_subvolume, is_subvolume};
use crate::snapshots::{REATTACH_OP, RELEASE_OP, ROLLBACK_OP};
use crate::vms::drive_file;
use crate::{ROOT_DRIVE, Result, Storage, WORKSPACE_DRIVE};

/// What the reconciliation at open did and found.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ReconcileReport {
    /// Interrupted operations, finished or undone (`"vm1: create undone"`).
    pub recovered: Vec<String>,
    /// Files and directories no catalog row knew of, removed.
    pub removed: Vec<PathBuf>,
    /// Catalog rows whose files are gone (kept, for an admin to decide).
    pub missing: Vec<String>,
    /// VMs whose guest is owed a drive by an interrupted rollback
    /// ([`Storage::pending_reattach`]), as `(vm, drive)`.
    pub reattach: Vec<(String, String)>,
}

impl ReconcileReport {
    pub fn is_clean(&self) -> bool {
        self.recovered.is_empty()
            && self.removed.is_empty()
            && self.missing.is_empty()
            && self.reattach.is_empty()
    }
}

impl Storage {
    pub(crate) fn reconcile(&self) -> Result<ReconcileReport> {
        let mut report = ReconcileReport::default();
        // An operation that cannot be recovered now is reported and the rest
        // go on: one bad row must not keep the whole storage from opening.
        let mut unfinished = Vec::new();
        let mut note = |what: String, op: &str, outcome: Result<()>| match outcome {
            Ok(()) => report.recovered.push(format!("{what}: {op} {}", verb(op))),
            Err(e) => unfinished.push(format!("{what}: could not finish {op}: {e}")),
        };
        for (name, op) in self.pending("SELECT name, op FROM images WHERE op IS NOT NULL")? {
            note(format!("image {name}"), &op, self.finish_image_op(&name));
        }
        // A VM owed a reattach waits for its caller (pending_reattach).
        for (name, op) in self
            .pending("SELECT name, op FROM vms WHERE op IS NOT NULL AND op NOT LIKE 'reattach:%'")?
        {
            note(format!("VM {name}"), &op, self.finish_vm_op(&name));
        }
        for (key, op) in
            self.pending("SELECT vm || '/' || name, op FROM snapshots WHERE op IS NOT NULL")?
        {
            if let Some((vm, name)) = key.split_once('/') {
                note(
                    format!("snapshot {key}"),
                    &op,
                    self.finish_snapshot_op(vm, name),
                );
            }
        }
        // Replaced versions whose last VM went in a crash.
        self.collect_image_versions()?;
        report.removed = self.remove_orphans()?;
        // What could not be finished, then every other inconsistency.
        report.missing = unfinished;
        report.missing.extend(self.problems()?);
        report.reattach = self.pending_reattach()?;
        for line in &report.recovered {
            tracing::warn!(what = %line, "recovered an interrupted storage operation");
        }
        for path in &report.removed {
            tracing::warn!(path = %path.display(), "removed a leftover no catalog row knew of");
        }
        for line in &report.missing {
            tracing::error!(what = %line, "catalog entry whose files are missing");
        }
        Ok(report)
    }

    fn pending(&self, sql: &str) -> Result<Vec<(String, String)>> {
        let db = self.db();
        let mut stmt = db.connection().prepare(sql)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<std::result::Result<_, _>>()?;
        Ok(rows)
    }

    pub(crate) fn finish_image_op(&self, name: &str) -> Result<()> {
        let op: Option<Option<String>> = self
            .db()
            .connection()
            .query_row(
                "SELECT op FROM images WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()?;
        let dir = self.pool().image_dir(name);
        match op.flatten().as_deref() {
            Some("import") | Some("delete") => {
                let _ = std::fs::remove_dir_all(dir.with_extension("importing"));
                let _ = std::fs::remove_dir_all(&dir);
                self.db()
                    .connection()
                    .execute("DELETE FROM images WHERE name = ?1", params![name])?;
            }
            _ => {}
        }
        Ok(())
    }

    pub(crate) fn finish_vm_op(&self, vm: &str) -> Result<()> {
        let op: Option<Option<String>> = self
            .db()
            .connection()
            .query_row("SELECT op FROM vms WHERE name = ?1", params![vm], |r| {
                r.get(0)
            })
            .optional()?;
        match op.flatten().as_deref() {
            Some("create") => {
                delete_subvolume(&self.pool().vm_dir(vm))?;
                self.db()
                    .connection()
                    .execute("DELETE FROM vms WHERE name = ?1", params![vm])?;
            }
            Some("destroy") => {
                self.destroy_files(vm)?;
                self.db()
                    .connection()
                    .execute("DELETE FROM vms WHERE name = ?1", params![vm])?;
            }
            // The guest may have let go of the drive, or not: the content
            // stays, and the guest is owed its drive.
            Some(op) if op.starts_with(RELEASE_OP) => {
                let snapshot = &op[RELEASE_OP.len()..];
                let drive = self
                    .snapshot(vm, snapshot)
                    .map(|s| s.drive)
                    .unwrap_or_else(|_| WORKSPACE_DRIVE.to_owned());
                self.set_vm_op(vm, Some(&format!("{REATTACH_OP}{drive}")))?;
            }
            // The guest had let go: the clone is redone (idempotent).
            Some(op) if op.starts_with(ROLLBACK_OP) => {
                let snapshot = &op[ROLLBACK_OP.len()..];
                match self.snapshot(vm, snapshot) {
                    Ok(snap) => {
                        self.clone_back(vm, &snap)?;
                        self.rolled_back(vm, &snap)?;
                    }
                    Err(_) => {
                        self.set_vm_op(vm, Some(&format!("{REATTACH_OP}{WORKSPACE_DRIVE}")))?;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    pub(crate) fn finish_snapshot_op(&self, vm: &str, name: &str) -> Result<()> {
        let op = self.snapshot_row(vm, name)?.and_then(|(_, op)| op);
        if matches!(op.as_deref(), Some("create") | Some("delete")) {
            self.delete_snapshot_files(vm, name)?;
            self.db().connection().execute(
                "DELETE FROM snapshots WHERE vm = ?1 AND name = ?2",
                params![vm, name],
            )?;
            let _ = std::fs::remove_dir(self.pool().root().join("snapshots").join(vm));
        }
        Ok(())
    }

    fn names(&self, sql: &str) -> Result<Vec<String>> {
        let db = self.db();
        let mut stmt = db.connection().prepare(sql)?;
        let rows = stmt
            .query_map([], |r| r.get(0))?
            .collect::<std::result::Result<_, _>>()?;
        Ok(rows)
    }

    fn remove_orphans(&self) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        // An image version's directory is known by the path its row holds.
        let images: Vec<String> = self
            .names("SELECT path FROM images UNION SELECT path FROM image_versions")?
            .iter()
            .filter_map(|p| Some(Path::new(p).file_name()?.to_string_lossy().into_owned()))
            .collect();
        let vms = self.names("SELECT name FROM vms")?;
        let snapshots = self.names("SELECT vm || '/' || name FROM snapshots")?;
        let root = self.pool().root();
        for entry in read_dir(&root.join("images")) {
            let name = entry
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if !images.contains(&name) {
                let _ = std::fs::remove_dir_all(&entry);
                let _ = std::fs::remove_file(&entry);
                removed.push(entry);
            }
        }
        for entry in read_dir(&root.join("vms")) {
            let name = entry
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if !vms.contains(&name) {
                remove_any(&entry)?;
                removed.push(entry);
            }
        }
        for vm_dir in read_dir(&root.join("snapshots")) {
            let vm = vm_dir
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            for entry in read_dir(&vm_dir) {
                let name = entry
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                if !snapshots.contains(&format!("{vm}/{name}")) {
                    remove_any(&entry)?;
                    removed.push(entry);
                }
            }
            if read_dir(&vm_dir).is_empty() {
                let _ = std::fs::remove_dir(&vm_dir);
            }
        }
        Ok(removed)
    }

    /// Every inconsistency between the catalog and the pool; empty when
    /// they agree. Reconciliation reports these as `missing`; tests use it
    /// to check that no crash leaves a trace.
    #[doc(hidden)]
    pub fn problems(&self) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        for (what, op) in self.pending(
            "SELECT 'image ' || name, op FROM images WHERE op IS NOT NULL
             UNION ALL SELECT 'VM ' || name, op FROM vms
                 WHERE op IS NOT NULL AND op NOT LIKE 'reattach:%'
             UNION ALL SELECT 'snapshot ' || vm || '/' || name, op FROM snapshots WHERE op IS NOT NULL",
        )? {
            problems.push(format!("{what} is still marked {op}"));
        }
        for path in self.names("SELECT path FROM images UNION SELECT path FROM image_versions")? {
            if !Path::new(&path).join("rootfs.ext4").is_file() {
                problems.push(format!("image at {path}: files missing"));
            }
        }
        for vm in self.names(
            "SELECT v.name FROM vms v JOIN images i ON i.name = v.image
             WHERE v.image_digest IS NOT i.digest AND NOT EXISTS
                (SELECT 1 FROM image_versions x WHERE x.name = v.image AND x.digest = v.image_digest)",
        )? {
            problems.push(format!("VM {vm}: its image version is gone"));
        }
        for vm in self.names("SELECT name FROM vms")? {
            let dir = self.pool().vm_dir(&vm);
            if !is_subvolume(&dir) {
                problems.push(format!("VM {vm}: subvolume {} missing", dir.display()));
            }
            for drive in [ROOT_DRIVE, WORKSPACE_DRIVE] {
                if !dir.join(drive_file(drive)).is_file() {
                    problems.push(format!("VM {vm}: drive {drive} missing"));
                }
            }
        }
        for key in self.names("SELECT vm || '/' || name FROM snapshots")? {
            if let Some((vm, name)) = key.split_once('/')
                && !is_subvolume(&self.pool().snapshot_dir(vm, name))
            {
                problems.push(format!("snapshot {key}: subvolume missing"));
            }
        }
        Ok(problems)
    }
}

fn verb(op: &str) -> &'static str {
    match op {
        "import" | "create" => "undone",
        _ => "finished",
    }
}

fn read_dir(path: &std::path::Path) -> Vec<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    entries.sort();
    entries
}

fn remove_any(path: &std::path::Path) -> Result<()> {
    if is_subvolume(path) {
        delete_subvolume(path)
    } else {
        let _ = std::fs::remove_dir_all(path);
        let _ = std::fs::remove_file(path);
        Ok(())
    }
}
