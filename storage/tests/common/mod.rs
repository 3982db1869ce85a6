//! A storage instance on a real, loop-mounted btrfs pool in a temp dir.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use nexus_storage::{Storage, StorageConfig};

/// Past the ext4 metadata of the test image's root filesystem.
pub const VARIANT_AT: u64 = 8 << 20;

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub config: StorageConfig,
    pub image_src: PathBuf,
}

/// Root and loop devices are what the embedded default needs; CI has both.
pub fn can_run() -> bool {
    let ok = nix::unistd::Uid::effective().is_root() && Path::new("/dev/loop-control").exists();
    if !ok {
        eprintln!("skipping: needs root and loop devices for a loop-mounted btrfs pool");
        assert!(
            std::env::var_os("NEXUS_NO_SKIP").is_none(),
            "this test cannot run here, and NEXUS_NO_SKIP (scripts/test.sh, as CI runs it) forbids skipping"
        );
    }
    ok
}

impl Fixture {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = StorageConfig::new(dir.path().join("state"));
        config.pool_image_bytes = 2 << 30;
        let image_src = dir.path().join("image");
        std::fs::create_dir_all(&image_src).unwrap();
        let rootfs = image_src.join("rootfs.ext4");
        std::fs::File::create(&rootfs)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&rootfs)
            .output()
            .unwrap();
        assert!(out.status.success());
        write_manifest(&image_src);
        Self {
            dir,
            config,
            image_src,
        }
    }

    /// An image whose manifest lists a root filesystem it lacks.
    pub fn broken_image(&self) -> PathBuf {
        let dir = self.dir.path().join("broken");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("manifest.json"),
            r#"{"files": {"rootfs.ext4": {"size": 1, "sha256": "0"}}}"#,
        )
        .unwrap();
        dir
    }

    /// The image with `mark` written into its root filesystem at
    /// [`VARIANT_AT`] (a rebuild with different content).
    pub fn image_variant(&self, mark: u8) -> PathBuf {
        let dir = self.dir.path().join(format!("image-{mark}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(self.image_src.join("rootfs.ext4"), dir.join("rootfs.ext4")).unwrap();
        scribble(&dir.join("rootfs.ext4"), VARIANT_AT, 1, mark);
        write_manifest(&dir);
        dir
    }

    pub fn open(&self) -> Storage {
        let (storage, _) = Storage::open(&self.config).unwrap();
        storage
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let pool = self.config.state_dir.join("pool");
        let _ = Command::new("umount").arg(&pool).status();
    }
}

/// The manifest of an image directory holding only rootfs.ext4, with
/// its real size and sha256 (imports check them).
fn write_manifest(dir: &Path) {
    use sha2::Digest;
    let bytes = std::fs::read(dir.join("rootfs.ext4")).unwrap();
    let manifest = serde_json::json!({
        "name": "test",
        "files": {"rootfs.ext4": {"size": bytes.len(), "sha256": hex::encode(sha2::Sha256::digest(&bytes))}},
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
}

/// Writes `bytes` of a repeated `fill` byte at `offset` of a file.
pub fn scribble(path: &Path, offset: u64, bytes: usize, fill: u8) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&vec![fill; bytes]).unwrap();
    f.sync_all().unwrap();
}

pub fn byte_at(path: &Path, offset: u64) -> u8 {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut b = [0u8; 1];
    f.read_exact(&mut b).unwrap();
    b[0]
}
