//! Freezing a filesystem for a consistent host-side snapshot, with a thaw
//! deadline: if the host goes away mid-snapshot, the filesystem thaws by
//! itself, so it can never stay frozen.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;

// linux/fs.h: FIFREEZE = _IOWR('X', 119, int), FITHAW = _IOWR('X', 120, int).
nix::ioctl_readwrite!(fifreeze, b'X', 119, libc::c_int);
nix::ioctl_readwrite!(fithaw, b'X', 120, libc::c_int);

#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("{0} is not a mounted directory")]
    NotMounted(String),
    #[error("{0} is already frozen: thaw it first")]
    AlreadyFrozen(String),
    #[error("{0} is not frozen")]
    NotFrozen(String),
    #[error("`timeout_s` must be between 1 and {max}, got {got}")]
    BadTimeout { got: u64, max: u64 },
    #[error("{op} {path}: {source}")]
    Ioctl {
        op: &'static str,
        path: String,
        #[source]
        source: nix::Error,
    },
}

pub const MAX_FREEZE_S: u64 = 600;

/// The filesystems this guest-mcp froze, each with its automatic thaw.
#[derive(Default)]
pub struct Freezer {
    frozen: Mutex<HashMap<PathBuf, JoinHandle<()>>>,
}

impl Freezer {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Freezes `mount` and arranges a thaw after `timeout`.
    pub fn freeze(self: &Arc<Self>, mount: &Path, timeout_s: u64) -> Result<(), FreezeError> {
        if timeout_s == 0 || timeout_s > MAX_FREEZE_S {
            return Err(FreezeError::BadTimeout {
                got: timeout_s,
                max: MAX_FREEZE_S,
            });
        }
        let mut frozen = self.frozen.lock().unwrap_or_else(|e| e.into_inner());
        if frozen.contains_key(mount) {
            return Err(FreezeError::AlreadyFrozen(mount.display().to_string()));
        }
        ioctl(mount, "freezing", Op::Freeze)?;
        let this = self.clone();
        let path = mount.to_path_buf();
        let deadline = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(timeout_s)).await;
            tracing::warn!(mount = %path.display(), timeout_s, "thaw deadline reached; thawing");
            this.frozen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&path);
            let _ = ioctl(&path, "thawing", Op::Thaw);
        });
        frozen.insert(mount.to_path_buf(), deadline);
        Ok(())
    }

    pub fn thaw(&self, mount: &Path) -> Result<(), FreezeError> {
        let deadline = self
            .frozen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(mount);
        if let Some(deadline) = deadline {
            deadline.abort();
        }
        match ioctl(mount, "thawing", Op::Thaw) {
            // EINVAL: the filesystem was not frozen.
            Err(FreezeError::Ioctl {
                source: nix::Error::EINVAL,
                ..
            }) => Err(FreezeError::NotFrozen(mount.display().to_string())),
            other => other,
        }
    }

    pub fn is_frozen(&self, mount: &Path) -> bool {
        self.frozen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(mount)
    }
}

/// Thaws `mount` if a previous guest-mcp left it frozen (its thaw deadline
/// died with it). Not being frozen is the normal case, not an error.
pub fn thaw_leftover(mount: &Path) {
    if ioctl(mount, "thawing", Op::Thaw).is_ok() {
        tracing::warn!(mount = %mount.display(), "thawed a filesystem a previous guest-mcp left frozen");
    }
}

enum Op {
    Freeze,
    Thaw,
}

fn ioctl(mount: &Path, op: &'static str, which: Op) -> Result<(), FreezeError> {
    let dir = std::fs::File::open(mount)
        .ok()
        .filter(|f| f.metadata().is_ok_and(|m| m.is_dir()))
        .ok_or_else(|| FreezeError::NotMounted(mount.display().to_string()))?;
    let mut arg: libc::c_int = 0;
    // SAFETY: the fd is an open directory owned by `dir` for the duration of
    // the call, and `arg` is a live int as the ioctl's definition requires.
    let result = unsafe {
        match which {
            Op::Freeze => fifreeze(dir.as_raw_fd(), &mut arg),
            Op::Thaw => fithaw(dir.as_raw_fd(), &mut arg),
        }
    };
    result.map(|_| ()).map_err(|source| FreezeError::Ioctl {
        op,
        path: mount.display().to_string(),
        source,
    })
}
