//! Images: imported into the pool once, cloned into every VM's root drive.

use std::path::Path;

use rusqlite::{OptionalExtension, params};

use crate::{ImageInfo, Result, Storage, StorageError, names::validate_name, now};

/// Steps of `import_image`, in order.
pub const IMPORT_STEPS: &[&str] = &["import:recorded", "import:copied", "import:moved"];

impl Storage {
    /// Copies an image directory (with its `manifest.json`) into the pool.
    pub fn import_image(&self, name: &str, src: &Path) -> Result<ImageInfo> {
        validate_name("image", name)?;
        let manifest_path = src.join("manifest.json");
        let manifest = std::fs::read_to_string(&manifest_path).map_err(|_| {
            StorageError::BadImage(src.to_path_buf(), "it has no manifest.json".into())
        })?;
        let files =
            image_files(&manifest).map_err(|why| StorageError::BadImage(src.to_path_buf(), why))?;
        for file in &files {
            if !src.join(file).is_file() {
                return Err(StorageError::BadImage(
                    src.to_path_buf(),
                    format!("its manifest lists {file}, which is missing"),
                ));
            }
        }
        if self.image(name)?.is_some() {
            return Err(StorageError::ImageExists(name.to_owned()));
        }
        let dest = self.pool().image_dir(name);
        let staging = dest.with_extension("importing");
        self.db().connection().execute(
            "INSERT INTO images (name, path, manifest, imported_at, op) VALUES (?1, ?2, ?3, ?4, 'import')",
            params![name, dest.display().to_string(), manifest, now()],
        )?;
        let result = (|| {
            self.step("import:recorded")?;
            let _ = std::fs::remove_dir_all(&staging);
            std::fs::create_dir_all(&staging).map_err(StorageError::io("create", &staging))?;
            for file in files.iter().map(String::as_str).chain(["manifest.json"]) {
                copy_file(&src.join(file), &staging.join(file))?;
            }
            self.step("import:copied")?;
            std::fs::rename(&staging, &dest).map_err(StorageError::io("rename", &staging))?;
            self.step("import:moved")?;
            self.db()
                .connection()
                .execute("UPDATE images SET op = NULL WHERE name = ?1", params![name])?;
            Ok(())
        })();
        self.settle_image(name, result)?;
        self.image(name)?
            .ok_or_else(|| StorageError::NoImage(name.to_owned()))
    }

    pub fn image(&self, name: &str) -> Result<Option<ImageInfo>> {
        Ok(self
            .db()
            .connection()
            .query_row(
                "SELECT name, path, manifest, imported_at FROM images WHERE name = ?1 AND op IS NULL",
                params![name],
                image_row,
            )
            .optional()?)
    }

    pub fn list_images(&self) -> Result<Vec<ImageInfo>> {
        let db = self.db();
        let mut stmt = db.connection().prepare(
            "SELECT name, path, manifest, imported_at FROM images WHERE op IS NULL ORDER BY name",
        )?;
        let rows = stmt
            .query_map([], image_row)?
            .collect::<std::result::Result<_, _>>()?;
        Ok(rows)
    }

    /// Removes an image no VM uses.
    pub fn delete_image(&self, name: &str) -> Result<()> {
        validate_name("image", name)?;
        if self.image(name)?.is_none() {
            return Err(StorageError::NoImage(name.to_owned()));
        }
        let users: Vec<String> = {
            let db = self.db();
            let mut stmt = db
                .connection()
                .prepare("SELECT name FROM vms WHERE image = ?1 ORDER BY name")?;
            stmt.query_map(params![name], |r| r.get(0))?
                .collect::<std::result::Result<_, _>>()?
        };
        if !users.is_empty() {
            return Err(StorageError::ImageInUse {
                image: name.to_owned(),
                vms: users,
            });
        }
        self.db().connection().execute(
            "UPDATE images SET op = 'delete' WHERE name = ?1",
            params![name],
        )?;
        let result = self.step("image-delete:recorded");
        self.settle_image(name, result)?;
        self.finish_image_op(name)
    }

    /// After an operation on an image: on a real error, recover at once
    /// (an injected one stands for a crash: recovery waits for `open`).
    fn settle_image(&self, name: &str, result: Result<()>) -> Result<()> {
        if let Err(e) = result {
            if !e.is_injected() {
                let _ = self.finish_image_op(name);
            }
            return Err(e);
        }
        Ok(())
    }
}

fn image_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ImageInfo> {
    Ok(ImageInfo {
        name: r.get(0)?,
        path: r.get::<_, String>(1)?.into(),
        manifest: r.get(2)?,
        imported_at: r.get(3)?,
    })
}

/// The file names a manifest lists (its `files` object's keys), each a
/// plain file name.
fn image_files(manifest: &str) -> std::result::Result<Vec<String>, String> {
    let value: serde_json::Value = serde_json::from_str(manifest)
        .map_err(|e| format!("its manifest.json is not JSON: {e}"))?;
    let files = value
        .get("files")
        .and_then(|f| f.as_object())
        .ok_or("its manifest.json has no `files` object")?;
    let names: Vec<String> = files.keys().cloned().collect();
    if !names.iter().any(|n| n == "rootfs.ext4") {
        return Err("its manifest lists no rootfs.ext4".into());
    }
    for name in &names {
        if name.contains('/') || name.starts_with('.') || name == "manifest.json" {
            return Err(format!("its manifest lists an unsafe file name {name:?}"));
        }
    }
    Ok(names)
}

/// A reflink when source and pool share a btrfs filesystem, a copy otherwise.
fn copy_file(from: &Path, to: &Path) -> Result<()> {
    if crate::pool::reflink(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(StorageError::io("copy", from))
}
