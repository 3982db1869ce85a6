//! Images: imported into the pool, cloned into every VM's root drive.
//!
//! An image name points at its current version, named by a digest of its
//! files. Importing different files under a name makes them the current
//! version for new VMs; the VMs made from the old one keep booting it (its
//! directory stays, recorded in `image_versions`) until the last of them
//! is destroyed. A version's directory is put in place before any row
//! names it, so a crash leaves at most a directory no row knows, which
//! the reconciliation at open removes.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rusqlite::{OptionalExtension, params};
use sha2::{Digest, Sha256};

use crate::{ImageInfo, Result, Storage, StorageError, names::validate_name, now};

/// Steps of `import_image`, in order: a crash at any of them leaves the
/// image as it was.
pub const IMPORT_STEPS: &[&str] = &["import:copied", "import:moved"];

/// Steps of `delete_image`: a crash there leaves the image deleted.
pub const DELETE_IMAGE_STEPS: &[&str] = &["image-delete:recorded"];

/// What an import did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageChange {
    /// The name is new.
    Added,
    /// The name's files changed: new VMs get these; `kept_for` are the
    /// VMs that keep booting the previous version.
    Replaced {
        previous: String,
        kept_for: Vec<String>,
    },
    /// The name already had exactly these files.
    Unchanged,
}

#[derive(Debug, Clone)]
pub struct Imported {
    pub image: ImageInfo,
    pub change: ImageChange,
}

impl ImageInfo {
    /// Bytes the image's files take on disk (their allocated blocks; the
    /// root filesystem is sparse).
    pub fn disk_bytes(&self) -> u64 {
        std::fs::read_dir(&self.path)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.metadata().ok())
                    .filter(|m| m.is_file())
                    .map(|m| m.blocks() * 512)
                    .sum()
            })
            .unwrap_or(0)
    }
}

impl Storage {
    /// Copies an image directory (with its `manifest.json`) into the pool
    /// as `name`'s current version.
    pub fn import_image(&self, name: &str, src: &Path) -> Result<ImageInfo> {
        Ok(self.import_image_from(name, src, "directory")?.image)
    }

    /// [`Storage::import_image`], recording where the image came from
    /// (`source`: a recipe, an OCI reference, a path; shown as it is).
    pub fn import_image_from(&self, name: &str, src: &Path, source: &str) -> Result<Imported> {
        validate_name("image", name)?;
        let manifest_path = src.join("manifest.json");
        let manifest = std::fs::read_to_string(&manifest_path).map_err(|_| {
            StorageError::BadImage(src.to_path_buf(), "it has no manifest.json".into())
        })?;
        let files =
            image_files(&manifest).map_err(|why| StorageError::BadImage(src.to_path_buf(), why))?;
        for file in &files {
            if !src.join(&file.name).is_file() {
                return Err(StorageError::BadImage(
                    src.to_path_buf(),
                    format!("its manifest lists {}, which is missing", file.name),
                ));
            }
        }
        let digest = manifest_digest(&manifest)
            .map_err(|why| StorageError::BadImage(src.to_path_buf(), why))?;
        if let Some(current) = self.image(name)?
            && current.digest == digest
        {
            return Ok(Imported {
                image: current,
                change: ImageChange::Unchanged,
            });
        }
        // The files are put in place first, in a directory of this
        // import's own; only then does a row name them.
        let dest = self.pool().image_version_dir(name, &digest);
        let staging = dest.with_extension("importing");
        let placed = (|| {
            std::fs::create_dir_all(&staging).map_err(StorageError::io("create", &staging))?;
            for file in &files {
                copy_verified(&src.join(&file.name), &staging.join(&file.name), file)?;
            }
            std::fs::write(staging.join("manifest.json"), &manifest)
                .map_err(StorageError::io("write", &staging))?;
            self.step("import:copied")?;
            std::fs::rename(&staging, &dest).map_err(StorageError::io("rename", &staging))?;
            self.step("import:moved")
        })();
        if let Err(e) = placed {
            // An injected failure stands for a crash: the sweep at open
            // removes what is left.
            if !e.is_injected() {
                let _ = std::fs::remove_dir_all(&staging);
                let _ = std::fs::remove_dir_all(&dest);
            }
            return Err(e);
        }
        let switched = self.switch_version(name, &dest, &manifest, &digest, source);
        let (change, unused) = match switched {
            Ok(done) => done,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dest);
                return Err(e);
            }
        };
        // What no row names any more: this import's copy when the version
        // was there already, an earlier copy of a version this one revives.
        for dir in unused {
            let _ = std::fs::remove_dir_all(dir);
        }
        if let Err(e) = self.collect_image_versions() {
            tracing::warn!(image = name, error = %e, "could not remove unused image versions");
        }
        let image = self
            .image(name)?
            .ok_or_else(|| StorageError::NoImage(name.to_owned()))?;
        Ok(Imported { image, change })
    }

    /// Makes the files at `dest` image `name`'s current version, in one
    /// transaction (so no VM creation, import or cleanup sees half of it);
    /// returns what changed and the directories no row names any more.
    fn switch_version(
        &self,
        name: &str,
        dest: &Path,
        manifest: &str,
        digest: &str,
        source: &str,
    ) -> Result<(ImageChange, Vec<PathBuf>)> {
        let mut db = self.db();
        let tx = db.connection_mut().transaction()?;
        let current = tx
            .query_row(
                &format!("SELECT {IMAGE_COLUMNS} FROM images WHERE name = ?1"),
                params![name],
                image_row,
            )
            .optional()?;
        let dest_text = dest.display().to_string();
        let change = match &current {
            // Imported meanwhile by another caller.
            Some(current) if current.digest == digest => {
                return Ok((ImageChange::Unchanged, vec![dest.to_path_buf()]));
            }
            None => {
                tx.execute(
                    "INSERT INTO images (name, path, manifest, imported_at, digest, source)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![name, dest_text, manifest, now(), digest, source],
                )?;
                ImageChange::Added
            }
            Some(old) => {
                let kept_for: Vec<String> = {
                    let mut stmt = tx.prepare(
                        "SELECT name FROM vms WHERE image = ?1 AND image_digest = ?2 ORDER BY name",
                    )?;
                    stmt.query_map(params![name, old.digest], |r| r.get(0))?
                        .collect::<std::result::Result<_, _>>()?
                };
                tx.execute(
                    "INSERT OR IGNORE INTO image_versions
                        (name, digest, path, manifest, source, imported_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![
                        name,
                        old.digest,
                        old.path.display().to_string(),
                        old.manifest,
                        old.source,
                        old.imported_at
                    ],
                )?;
                tx.execute(
                    "UPDATE images SET path = ?2, manifest = ?3, imported_at = ?4,
                         digest = ?5, source = ?6
                     WHERE name = ?1",
                    params![name, dest_text, manifest, now(), digest, source],
                )?;
                ImageChange::Replaced {
                    previous: old.digest.clone(),
                    kept_for,
                }
            }
        };
        // A retired copy of the version now current: its VMs boot the new
        // copy (same files) and the old one goes.
        let revived: Vec<PathBuf> = {
            let mut stmt = tx.prepare(
                "DELETE FROM image_versions WHERE name = ?1 AND digest = ?2 RETURNING path",
            )?;
            stmt.query_map(params![name, digest], |r| r.get::<_, String>(0))?
                .map(|p| p.map(PathBuf::from))
                .collect::<std::result::Result<_, _>>()?
        };
        tx.commit()?;
        Ok((change, revived))
    }

    /// The current version of image `name`.
    pub fn image(&self, name: &str) -> Result<Option<ImageInfo>> {
        Ok(self
            .db()
            .connection()
            .query_row(
                &format!("SELECT {IMAGE_COLUMNS} FROM images WHERE name = ?1 AND op IS NULL"),
                params![name],
                image_row,
            )
            .optional()?)
    }

    /// The image version VM `vm` was made from (and boots).
    pub fn vm_image(&self, vm: &str) -> Result<ImageInfo> {
        let (name, digest): (String, Option<String>) = self
            .db()
            .connection()
            .query_row(
                "SELECT image, image_digest FROM vms WHERE name = ?1",
                params![vm],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .ok_or_else(|| StorageError::NoVm(vm.to_owned()))?;
        let current = self
            .image(&name)?
            .ok_or_else(|| StorageError::NoImage(name.clone()))?;
        let Some(digest) = digest.filter(|d| *d != current.digest) else {
            return Ok(current);
        };
        self.db()
            .connection()
            .query_row(
                &format!(
                    "SELECT {IMAGE_COLUMNS} FROM image_versions WHERE name = ?1 AND digest = ?2"
                ),
                params![name, digest],
                image_row,
            )
            .optional()?
            .ok_or_else(|| StorageError::ImageVersionGone {
                vm: vm.to_owned(),
                image: name,
            })
    }

    pub fn list_images(&self) -> Result<Vec<ImageInfo>> {
        let db = self.db();
        let mut stmt = db.connection().prepare(&format!(
            "SELECT {IMAGE_COLUMNS} FROM images WHERE op IS NULL ORDER BY name"
        ))?;
        let rows = stmt
            .query_map([], image_row)?
            .collect::<std::result::Result<_, _>>()?;
        Ok(rows)
    }

    /// The VMs made from any version of image `name`.
    pub fn image_users(&self, name: &str) -> Result<Vec<String>> {
        let db = self.db();
        let mut stmt = db
            .connection()
            .prepare("SELECT name FROM vms WHERE image = ?1 ORDER BY name")?;
        let users = stmt
            .query_map(params![name], |r| r.get(0))?
            .collect::<std::result::Result<_, _>>()?;
        Ok(users)
    }

    /// Removes an image no VM uses (a VM's snapshots go with it, so they
    /// are named through their VMs).
    pub fn delete_image(&self, name: &str) -> Result<()> {
        validate_name("image", name)?;
        let Some(image) = self.image(name)? else {
            return Err(StorageError::NoImage(name.to_owned()));
        };
        let users = self.image_users(name)?;
        if !users.is_empty() {
            return Err(StorageError::ImageInUse {
                image: name.to_owned(),
                vms: users,
            });
        }
        let mut dirs = vec![image.path];
        {
            let mut db = self.db();
            let tx = db.connection_mut().transaction()?;
            {
                let mut stmt = tx.prepare("SELECT path FROM image_versions WHERE name = ?1")?;
                for path in stmt.query_map(params![name], |r| r.get::<_, String>(0))? {
                    dirs.push(path?.into());
                }
            }
            // A VM recorded meanwhile would hold the name (foreign key):
            // the delete then fails and changes nothing.
            tx.execute("DELETE FROM images WHERE name = ?1", params![name])
                .map_err(|e| match e {
                    rusqlite::Error::SqliteFailure(f, _)
                        if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                    {
                        StorageError::ImageInUse {
                            image: name.to_owned(),
                            vms: vec!["(a VM made meanwhile)".into()],
                        }
                    }
                    other => other.into(),
                })?;
            tx.commit()?;
        }
        self.step("image-delete:recorded")?;
        for dir in dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
        Ok(())
    }

    /// Forgets replaced image versions no VM boots any more, and removes
    /// their files. One statement: a VM recorded meanwhile either keeps
    /// its version's row or was not there to need it.
    pub fn collect_image_versions(&self) -> Result<()> {
        let unused: Vec<(String, String, String)> = {
            let db = self.db();
            let mut stmt = db.connection().prepare(
                "DELETE FROM image_versions AS v WHERE NOT EXISTS
                    (SELECT 1 FROM vms WHERE image = v.name AND image_digest = v.digest)
                 RETURNING name, digest, path",
            )?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<std::result::Result<_, _>>()?
        };
        for (name, digest, path) in unused {
            tracing::info!(image = name, digest, "removed an image version no VM uses");
            let _ = std::fs::remove_dir_all(path);
        }
        Ok(())
    }

    /// Gives images imported before versions existed their digest, and
    /// their VMs that version.
    pub(crate) fn backfill_image_digests(&self) -> Result<()> {
        let missing: Vec<(String, String)> = {
            let db = self.db();
            let mut stmt = db
                .connection()
                .prepare("SELECT name, manifest FROM images WHERE digest IS NULL")?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<std::result::Result<_, _>>()?
        };
        for (name, manifest) in missing {
            let digest = manifest_digest(&manifest)
                .unwrap_or_else(|_| format!("sha256:{}", hex::encode(Sha256::digest(&manifest))));
            let mut db = self.db();
            let tx = db.connection_mut().transaction()?;
            tx.execute(
                "UPDATE images SET digest = ?2 WHERE name = ?1",
                params![name, digest],
            )?;
            tx.execute(
                "UPDATE vms SET image_digest = ?2 WHERE image = ?1 AND image_digest IS NULL",
                params![name, digest],
            )?;
            tx.commit()?;
        }
        Ok(())
    }
}

const IMAGE_COLUMNS: &str = "name, path, manifest, imported_at, digest, source";

fn image_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ImageInfo> {
    Ok(ImageInfo {
        name: r.get(0)?,
        path: r.get::<_, String>(1)?.into(),
        manifest: r.get(2)?,
        imported_at: r.get(3)?,
        digest: r.get::<_, Option<String>>(4)?.unwrap_or_default(),
        source: r.get(5)?,
    })
}

/// Manifest fields that note how an image was built, not what it is.
const BUILD_NOTES: [&str; 3] = ["name", "built_at", "inputs_digest"];

/// An image's identity: sha256 over its manifest less its build notes
/// ([`BUILD_NOTES`]), as canonical JSON (keys sorted). The manifest holds
/// each file's size and sha256 (checked at import), the boot settings,
/// environment and tools: equal digests, the same image.
pub fn manifest_digest(manifest: &str) -> std::result::Result<String, String> {
    let mut value: serde_json::Value = serde_json::from_str(manifest)
        .map_err(|e| format!("its manifest.json is not JSON: {e}"))?;
    let object = value
        .as_object_mut()
        .ok_or("its manifest.json is not a JSON object")?;
    for note in BUILD_NOTES {
        object.remove(note);
    }
    let mut canonical = String::new();
    write_canonical(&value, &mut canonical);
    Ok(format!(
        "sha256:{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    ))
}

/// JSON with every object's keys in order, whatever the map type keeps.
fn write_canonical(value: &serde_json::Value, out: &mut String) {
    match value {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(&map[key], out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// A file an image's manifest lists.
struct ListedFile {
    name: String,
    size: u64,
    sha256: String,
}

/// The files a manifest lists (its `files` object), each a plain file
/// name with a size and a sha256.
fn image_files(manifest: &str) -> std::result::Result<Vec<ListedFile>, String> {
    let value: serde_json::Value = serde_json::from_str(manifest)
        .map_err(|e| format!("its manifest.json is not JSON: {e}"))?;
    let files = value
        .get("files")
        .and_then(|f| f.as_object())
        .ok_or("its manifest.json has no `files` object")?;
    if !files.contains_key("rootfs.ext4") {
        return Err("its manifest lists no rootfs.ext4".into());
    }
    let mut listed = Vec::new();
    for (name, entry) in files {
        if name.contains('/') || name.starts_with('.') || name == "manifest.json" {
            return Err(format!("its manifest lists an unsafe file name {name:?}"));
        }
        let (Some(size), Some(sha256)) = (
            entry.get("size").and_then(|s| s.as_u64()),
            entry.get("sha256").and_then(|s| s.as_str()),
        ) else {
            return Err(format!(
                "its manifest's entry for {name} lacks a size or sha256"
            ));
        };
        listed.push(ListedFile {
            name: name.clone(),
            size,
            sha256: sha256.to_owned(),
        });
    }
    Ok(listed)
}

/// Copies `from` to `to` and checks the copy against its manifest entry:
/// what the catalog records is what the manifest says.
fn copy_verified(from: &Path, to: &Path, file: &ListedFile) -> Result<()> {
    copy_file(from, to)?;
    let bad = |why: String| StorageError::BadImage(from.to_path_buf(), why);
    let mut copy = std::fs::File::open(to).map_err(StorageError::io("open", to))?;
    let mut hasher = Sha256::new();
    let size = std::io::copy(&mut copy, &mut hasher).map_err(StorageError::io("read", to))?;
    if size != file.size {
        return Err(bad(format!(
            "{} is {size} bytes, its manifest says {}",
            file.name, file.size
        )));
    }
    if hex::encode(hasher.finalize()) != file.sha256 {
        return Err(bad(format!(
            "{}'s sha256 differs from its manifest's",
            file.name
        )));
    }
    Ok(())
}

/// A reflink when source and pool share a btrfs filesystem, else a copy
/// that keeps the source's holes (a root filesystem is mostly holes: a
/// plain copy made the default image's 818 MiB take 1.7 GiB in the pool).
fn copy_file(from: &Path, to: &Path) -> Result<()> {
    if crate::pool::reflink(from, to).is_ok() {
        return Ok(());
    }
    sparse_copy(from, to).map_err(StorageError::io("copy", from))
}

/// Copies only the data extents (SEEK_DATA / SEEK_HOLE), then sets the
/// length: what is a hole in `from` stays one in `to`.
fn sparse_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::fd::AsRawFd;
    let mut src = std::fs::File::open(from)?;
    let len = src.metadata()?.len();
    let mut dst = std::fs::File::create(to)?;
    let seek = |fd: &std::fs::File, at: u64, whence: libc::c_int| -> std::io::Result<Option<u64>> {
        // SAFETY: lseek on an fd `fd` owns; no memory is passed.
        let got = unsafe { libc::lseek(fd.as_raw_fd(), at as libc::off_t, whence) };
        if got >= 0 {
            return Ok(Some(got as u64));
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENXIO) {
            Ok(None) // no data past `at`
        } else {
            Err(err)
        }
    };
    let mut at = 0;
    while at < len {
        let Some(data) = seek(&src, at, libc::SEEK_DATA)? else {
            break;
        };
        let hole = seek(&src, data, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        src.seek(SeekFrom::Start(data))?;
        dst.seek(SeekFrom::Start(data))?;
        std::io::copy(&mut (&mut src).take(hole - data), &mut dst)?;
        at = hole;
    }
    dst.set_len(len)?;
    dst.sync_all()
}
