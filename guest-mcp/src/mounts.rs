//! Unmounting and mounting the workspace for an in-place rollback: the
//! guest lets go of the filesystem and flushes the block device's buffers,
//! the host replaces the drive's content, the guest mounts it again and
//! sees the new content, with no stale page cache.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, umount2};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

// linux/fs.h: BLKFLSBUF = _IO(0x12, 97).
nix::ioctl_none!(blkflsbuf, 0x12, 97);

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{0} is not a mount point (see /proc/mounts)")]
    NotMounted(String),
    #[error("{0} is already mounted")]
    AlreadyMounted(String),
    #[error(
        "{path} is busy: processes {pids:?} have files or working directories there; stop them or set `force` to kill them"
    )]
    Busy { path: String, pids: Vec<u32> },
    #[error("no device known for {0}: give `device`")]
    NoDevice(String),
    #[error("{op} {path}: {source}")]
    Sys {
        op: &'static str,
        path: String,
        #[source]
        source: nix::Error,
    },
    #[error("flushing {path}'s buffers: {source}")]
    Flush {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The device and filesystem type mounted at `mount`, from /proc/mounts.
pub fn mounted_device(mount: &Path) -> Option<(PathBuf, String)> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().rev().find_map(|l| {
        let mut f = l.split_whitespace();
        let (dev, at, fstype) = (f.next()?, f.next()?, f.next()?);
        (Path::new(at) == mount).then(|| (PathBuf::from(dev), fstype.to_owned()))
    })
}

/// Processes with a working directory, root or open file under `mount`.
pub fn users_of(mount: &Path) -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me && *pid != 1)
        .filter(|pid| {
            let base = PathBuf::from(format!("/proc/{pid}"));
            let under = |p: PathBuf| std::fs::read_link(p).is_ok_and(|t| t.starts_with(mount));
            under(base.join("cwd"))
                || under(base.join("root"))
                || std::fs::read_dir(base.join("fd"))
                    .map(|fds| fds.flatten().any(|fd| under(fd.path())))
                    .unwrap_or(false)
        })
        .collect()
}

/// Unmounts `mount` and flushes its device's buffers; returns the device.
pub fn unmount(mount: &Path, force: bool) -> Result<(PathBuf, String), MountError> {
    let shown = mount.display().to_string();
    let (device, fstype) =
        mounted_device(mount).ok_or_else(|| MountError::NotMounted(shown.clone()))?;
    let users = users_of(mount);
    if !users.is_empty() {
        if !force {
            return Err(MountError::Busy {
                path: shown,
                pids: users,
            });
        }
        for pid in &users {
            let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
        }
        // Give the kernel a moment to release what the killed processes held.
        for _ in 0..100 {
            if users_of(mount).is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    nix::unistd::sync();
    umount2(mount, MntFlags::empty()).map_err(|source| match source {
        nix::Error::EBUSY => MountError::Busy {
            path: shown.clone(),
            pids: users_of(mount),
        },
        source => MountError::Sys {
            op: "unmounting",
            path: shown.clone(),
            source,
        },
    })?;
    flush_buffers(&device)?;
    Ok((device, fstype))
}

/// Drops the block device's cached pages, so the next mount reads what the
/// host put on the disk.
fn flush_buffers(device: &Path) -> Result<(), MountError> {
    let err = |source| MountError::Flush {
        path: device.display().to_string(),
        source,
    };
    let dev = std::fs::File::open(device).map_err(err)?;
    // SAFETY: the fd is an open block device owned by `dev` for the call;
    // BLKFLSBUF takes no argument.
    unsafe { blkflsbuf(dev.as_raw_fd()) }
        .map(|_| ())
        .map_err(|e| err(std::io::Error::from(e)))
}

pub fn mount_at(device: &Path, mount: &Path, fstype: &str) -> Result<(), MountError> {
    if mounted_device(mount).is_some() {
        return Err(MountError::AlreadyMounted(mount.display().to_string()));
    }
    std::fs::create_dir_all(mount).map_err(|e| MountError::Flush {
        path: mount.display().to_string(),
        source: e,
    })?;
    nix::mount::mount(
        Some(device),
        mount,
        Some(fstype),
        MsFlags::MS_NOATIME,
        None::<&str>,
    )
    .map_err(|source| MountError::Sys {
        op: "mounting",
        path: format!("{} at {}", device.display(), mount.display()),
        source,
    })
}
