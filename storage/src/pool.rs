//! The btrfs pool: where it lives, and the few filesystem primitives every
//! storage operation is made of (subvolumes, read-only snapshots, reflink
//! clones, usage).
//!
//! The pool is the configured directory when that is on btrfs. Otherwise a
//! sparse btrfs image file in the state directory is created once and
//! loop-mounted (again after a restart), which needs root.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::StorageError;

// linux/fs.h: FICLONE = _IOW(0x94, 9, int).
nix::ioctl_write_int!(ficlone, 0x94, 9);

/// How the pool was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    /// The configured directory is on btrfs already.
    Native,
    /// A sparse image file in the state directory, loop-mounted by us.
    LoopImage,
}

#[derive(Debug)]
pub struct Pool {
    root: PathBuf,
    kind: PoolKind,
}

/// Where the pool goes.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The pool's directory. If it is not on btrfs, a btrfs image is
    /// loop-mounted here.
    pub path: PathBuf,
    /// The image file used when `path` is not on btrfs.
    pub image: PathBuf,
    /// Size of that (sparse) image.
    pub image_size_bytes: u64,
}

pub fn is_btrfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BTRFS_SUPER_MAGIC)
}

impl Pool {
    /// Finds or makes the pool. Idempotent: an image made earlier is
    /// mounted again, never re-created.
    pub fn open(config: &PoolConfig) -> Result<Self, StorageError> {
        std::fs::create_dir_all(&config.path).map_err(StorageError::io("create", &config.path))?;
        let pool = if is_btrfs(&config.path) && !mounted_from(&config.path, &config.image) {
            tracing::info!(path = %config.path.display(), "pool directory is on btrfs");
            Pool {
                root: config.path.clone(),
                kind: PoolKind::Native,
            }
        } else {
            Self::loop_image(config)?
        };
        for dir in ["images", "vms", "snapshots"] {
            let path = pool.root.join(dir);
            std::fs::create_dir_all(&path).map_err(StorageError::io("create", &path))?;
        }
        Ok(pool)
    }

    fn loop_image(config: &PoolConfig) -> Result<Self, StorageError> {
        let pool = Pool {
            root: config.path.clone(),
            kind: PoolKind::LoopImage,
        };
        if mounted_from(&config.path, &config.image) {
            return Ok(pool);
        }
        let ways_out = format!(
            "point the pool at a directory on a btrfs filesystem, or run as root with loop devices \
             so that a btrfs image can be created at {} and mounted at {}",
            config.image.display(),
            config.path.display()
        );
        if !nix::unistd::Uid::effective().is_root() || !Path::new("/dev/loop-control").exists() {
            return Err(StorageError::NoPool { why: ways_out });
        }
        if !config.image.exists() {
            tracing::info!(image = %config.image.display(), size = config.image_size_bytes, "creating the btrfs pool image");
            let tmp = config.image.with_extension("tmp");
            let file = std::fs::File::create(&tmp).map_err(StorageError::io("create", &tmp))?;
            file.set_len(config.image_size_bytes)
                .map_err(StorageError::io("size", &tmp))?;
            run(Command::new("mkfs.btrfs")
                .args(["-q", "-L", "nexus-pool"])
                .arg(&tmp))
            .map_err(|why| StorageError::NoPool {
                why: format!("mkfs.btrfs failed ({why}); {ways_out}"),
            })?;
            std::fs::rename(&tmp, &config.image).map_err(StorageError::io("rename", &tmp))?;
        }
        run(Command::new("mount")
            .args(["-o", "loop,noatime"])
            .arg(&config.image)
            .arg(&config.path))
        .map_err(|why| StorageError::NoPool {
            why: format!(
                "mounting {} failed ({why}); {ways_out}",
                config.image.display()
            ),
        })?;
        Ok(pool)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn kind(&self) -> PoolKind {
        self.kind
    }

    /// Unmounts a pool this process loop-mounted (tests, shutdown). The
    /// loop device is detached with it.
    pub fn unmount(&self) -> Result<(), StorageError> {
        if self.kind == PoolKind::LoopImage {
            run(Command::new("umount").arg(&self.root)).map_err(|why| StorageError::Fs {
                op: "unmount the pool",
                path: self.root.clone(),
                why,
            })?;
        }
        Ok(())
    }

    /// Where an image imported before versions existed lives.
    pub fn image_dir(&self, image: &str) -> PathBuf {
        self.root.join("images").join(image)
    }

    /// A new directory for version `digest` (`sha256:HEX`) of an image:
    /// `NAME@HEX16-N`, N unique to this import (two imports never share
    /// one; a row records which is whose).
    pub fn image_version_dir(&self, image: &str, digest: &str) -> PathBuf {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        let unique = format!(
            "{:x}{:x}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        self.root
            .join("images")
            .join(format!("{image}@{}-{unique}", &hex[..hex.len().min(16)]))
    }

    pub fn vm_dir(&self, vm: &str) -> PathBuf {
        self.root.join("vms").join(vm)
    }

    pub fn snapshot_dir(&self, vm: &str, snapshot: &str) -> PathBuf {
        self.root.join("snapshots").join(vm).join(snapshot)
    }
}

/// Whether `path` is a mount of `image` (through a loop device).
fn mounted_from(path: &Path, image: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/mounts") else {
        return false;
    };
    let Ok(image) = image.canonicalize() else {
        return false;
    };
    mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (Some(dev), Some(at)) = (f.next(), f.next()) else {
            return false;
        };
        Path::new(at) == path && loop_backing(dev).is_some_and(|b| b == image)
    })
}

/// The file behind a loop device, from sysfs.
fn loop_backing(dev: &str) -> Option<PathBuf> {
    let name = dev.strip_prefix("/dev/")?;
    let backing = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    Some(PathBuf::from(backing.trim()))
}

pub(crate) fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} exited with {}: {}",
            cmd.get_program().to_string_lossy(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn btrfs(op: &'static str, path: &Path, args: &[&std::ffi::OsStr]) -> Result<(), StorageError> {
    run(Command::new("btrfs").args(args)).map_err(|why| StorageError::Fs {
        op,
        path: path.to_path_buf(),
        why,
    })
}

pub fn create_subvolume(path: &Path) -> Result<(), StorageError> {
    btrfs(
        "create subvolume",
        path,
        &["subvolume".as_ref(), "create".as_ref(), path.as_os_str()],
    )
}

/// A snapshot of subvolume `src` at `dst`; read-only when asked.
pub fn snapshot_subvolume(src: &Path, dst: &Path, read_only: bool) -> Result<(), StorageError> {
    let mut args: Vec<&std::ffi::OsStr> = vec!["subvolume".as_ref(), "snapshot".as_ref()];
    if read_only {
        args.push("-r".as_ref());
    }
    args.push(src.as_os_str());
    args.push(dst.as_os_str());
    btrfs("snapshot subvolume", dst, &args)
}

/// Deletes a subvolume; a missing one is not an error (idempotent undo).
pub fn delete_subvolume(path: &Path) -> Result<(), StorageError> {
    if !path.exists() {
        return Ok(());
    }
    btrfs(
        "delete subvolume",
        path,
        &["subvolume".as_ref(), "delete".as_ref(), path.as_os_str()],
    )
}

pub fn is_subvolume(path: &Path) -> bool {
    // A subvolume's root directory has inode number 256.
    std::fs::metadata(path).is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == 256)
}

/// Makes `dst`'s content that of `src` by sharing extents (FICLONE). When
/// `dst` exists it keeps its inode: a VMM holding it open keeps a valid
/// file, now with the new content.
pub fn reflink(src: &Path, dst: &Path) -> Result<(), StorageError> {
    let from = std::fs::File::open(src).map_err(StorageError::io("open", src))?;
    let to = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(dst)
        .map_err(StorageError::io("open", dst))?;
    // SAFETY: both fds are open and owned by `from` and `to` for the call;
    // FICLONE takes the source fd as its integer argument.
    unsafe { ficlone(to.as_raw_fd(), from.as_raw_fd() as libc::c_ulong) }.map_err(|e| {
        StorageError::Fs {
            op: "reflink",
            path: dst.to_path_buf(),
            why: format!("FICLONE from {}: {e}", src.display()),
        }
    })?;
    // A longer old file keeps its tail past a shorter clone: cut it.
    let len = from
        .metadata()
        .map_err(StorageError::io("stat", src))?
        .len();
    to.set_len(len).map_err(StorageError::io("truncate", dst))?;
    to.sync_all().map_err(StorageError::io("sync", dst))
}

/// Bytes used only by `path` and bytes it shares with other files
/// (snapshots, clones, the image), from `btrfs filesystem du`.
pub fn usage(path: &Path) -> Result<(u64, u64), StorageError> {
    let out = Command::new("btrfs")
        .args(["filesystem", "du", "-s", "--raw"])
        .arg(path)
        .output()
        .map_err(StorageError::io("run btrfs filesystem du on", path))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let numbers: Vec<u64> = text
        .lines()
        .nth(1)
        .map(|l| {
            l.split_whitespace()
                .take(3)
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    match numbers[..] {
        [_, exclusive, shared] => Ok((exclusive, shared)),
        _ => Err(StorageError::Fs {
            op: "measure usage",
            path: path.to_path_buf(),
            why: format!(
                "unexpected btrfs output: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }),
    }
}

/// A new sparse ext4 file of `bytes`, made without mounting anything.
pub fn make_ext4(path: &Path, bytes: u64) -> Result<(), StorageError> {
    let file = std::fs::File::create(path).map_err(StorageError::io("create", path))?;
    file.set_len(bytes)
        .map_err(StorageError::io("size", path))?;
    drop(file);
    run(Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-L",
            "workspace",
            "-E",
            "root_owner=0:0,lazy_itable_init=1",
        ])
        .arg(path))
    .map_err(|why| StorageError::Fs {
        op: "make an ext4 filesystem",
        path: path.to_path_buf(),
        why,
    })
}
