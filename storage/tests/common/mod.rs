//! A storage instance on a real, loop-mounted btrfs pool in a temp dir.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use nexus_storage::{Storage, StorageConfig};

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
        std::fs::write(
            image_src.join("manifest.json"),
            r#"{"name": "test", "files": {"rootfs.ext4": {"size": 16777216, "sha256": "0"}}}"#,
        )
        .unwrap();
        Self {
            dir,
            config,
            image_src,
        }
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
