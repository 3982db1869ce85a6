//! One daemon per state directory. Two nexusd driving the same catalog and
//! pool would each believe it owns the VMs; the second one to start is
//! refused, with the holder's pid.

use std::io::Write;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

pub struct StateLock {
    _lock: Flock<std::fs::File>,
}

impl StateLock {
    pub fn acquire(state_dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(state_dir).map_err(|e| {
            anyhow::anyhow!("cannot create state directory {}: {e}", state_dir.display())
        })?;
        let path = state_dir.join("nexusd.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                lock.set_len(0)?;
                writeln!(lock, "{}", std::process::id())?;
                Ok(Self { _lock: lock })
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                anyhow::bail!(
                    "another nexusd (pid {}) already owns state directory {}: connect to it \
                     (HTTP, or its admin socket) instead of starting a second one, or give this \
                     one another --state-dir",
                    holder.trim(),
                    state_dir.display()
                )
            }
            Err((_, e)) => anyhow::bail!("cannot lock {}: {e}", path.display()),
        }
    }
}
