//! One daemon per state directory. Two nexusd driving the same catalog and
//! pool would each believe it owns the VMs; the one that holds the lock
//! owns them, and the lock file says where its admin socket is, so a
//! `nexusd stdio` started later can attach to it instead (see `bridge`).

use std::io::Write;
use std::path::{Path, PathBuf};

use std::os::unix::fs::OpenOptionsExt;

use nix::fcntl::{Flock, FlockArg};

pub struct StateLock {
    _lock: Flock<std::fs::File>,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another nexusd (pid {pid}) already owns state directory {state_dir}: connect to it (HTTP, its admin socket, or `nexusd stdio`, which attaches to it) instead of starting a second one, or give this one another --state-dir"
    )]
    Held {
        pid: String,
        state_dir: PathBuf,
        /// The holder's admin socket, if it said.
        admin_socket: Option<PathBuf>,
    },
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl StateLock {
    /// Takes `state_dir` for this process, recording its pid and where its
    /// admin socket will be.
    pub fn acquire(state_dir: &Path, admin_socket: &Path) -> Result<Self, LockError> {
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| LockError::Io { what, path, source }
        };
        std::fs::create_dir_all(state_dir).map_err(io("create state directory", state_dir))?;
        // Owner-only, whatever made it: it holds every VM's sockets.
        if nix::unistd::Uid::effective().is_root()
            || std::fs::metadata(state_dir).is_ok_and(|m| {
                std::os::unix::fs::MetadataExt::uid(&m) == nix::unistd::Uid::effective().as_raw()
            })
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o700));
        }
        let path = state_dir.join("nexusd.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            // Readable by others: a `nexusd stdio` of another user learns
            // from it that a daemon runs, and is told to use HTTP.
            .mode(0o644)
            .open(&path)
            .or_else(|e| match e.kind() {
                // Another user's daemon: reading is enough to learn it holds
                // the directory and where its admin socket is.
                std::io::ErrorKind::PermissionDenied => std::fs::File::open(&path),
                _ => Err(e),
            })
            .map_err(io("open", &path))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                lock.set_len(0).map_err(io("write", &path))?;
                writeln!(lock, "{}\n{}", std::process::id(), admin_socket.display())
                    .map_err(io("write", &path))?;
                Ok(Self { _lock: lock })
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let mut lines = holder.lines();
                Err(LockError::Held {
                    pid: lines.next().unwrap_or("?").trim().to_owned(),
                    state_dir: state_dir.to_path_buf(),
                    admin_socket: lines
                        .next()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(PathBuf::from),
                })
            }
            Err((_, e)) => Err(LockError::Io {
                what: "lock",
                path,
                source: e.into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_learns_the_first_ones_pid_and_admin_socket() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("admin.sock");
        let _first = StateLock::acquire(dir.path(), &socket).unwrap();
        // flock locks belong to open files: a second open in this process conflicts too.
        match StateLock::acquire(dir.path(), Path::new("/elsewhere")) {
            Err(LockError::Held {
                pid, admin_socket, ..
            }) => {
                assert_eq!(pid, std::process::id().to_string());
                assert_eq!(admin_socket, Some(socket));
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("a second lock was granted"),
        }
    }
}
