//! vsock CIDs unique on the host, leased through lock files.
//!
//! Every VM on a host needs its own CID, whichever process started it
//! (nexusd, a test, a benchmark). A CID is held by an exclusive `flock` on
//! `<dir>/<cid>.lock` for as long as its [`CidLease`] lives; the kernel drops
//! the lock if the holder dies, so a crash never leaks a CID. The lock files
//! themselves stay: deleting a lock file someone may be opening is racy.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::VmmError;

/// CIDs 0-2 are reserved (hypervisor, local, host).
pub const FIRST_GUEST_CID: u32 = 3;
/// Upper bound of the automatic search; explicit CIDs may go higher.
pub const LAST_AUTO_CID: u32 = 65_535;

/// Proof that this process owns a CID until dropped.
#[derive(Debug)]
pub struct CidLease {
    cid: u32,
    /// The lock, or None where the VM's own VMM holds it (adopted VMs: the
    /// VMM inherited the lock at launch and keeps the CID leased for as
    /// long as it lives, whatever happens to the daemon that started it).
    lock: Option<Flock<File>>,
}

impl CidLease {
    pub fn cid(&self) -> u32 {
        self.cid
    }

    /// The lock's file descriptor, for the VMM to inherit.
    pub fn fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.lock.as_ref().map(|l| l.as_raw_fd())
    }

    /// The lease of a CID whose lock process `pid` (a VM's VMM) holds.
    pub fn held_by(dir: &Path, cid: u32, pid: u32) -> Result<Self, VmmError> {
        let lock = dir.join(format!("{cid}.lock"));
        let holds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|fds| {
                fds.flatten()
                    .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == lock))
            })
            .unwrap_or(false);
        if holds {
            Ok(Self { cid, lock: None })
        } else {
            Err(VmmError::CidInUse(cid))
        }
    }
}

/// Leases `cid`, or fails with [`VmmError::CidInUse`].
pub fn lease(dir: &Path, cid: u32) -> Result<CidLease, VmmError> {
    if cid < FIRST_GUEST_CID || cid == u32::MAX {
        return Err(VmmError::InvalidSpec(format!(
            "vsock CID {cid} is reserved: use {FIRST_GUEST_CID} to {}",
            u32::MAX - 1
        )));
    }
    try_lease(dir, cid)?.ok_or(VmmError::CidInUse(cid))
}

/// Leases the lowest free CID.
pub fn lease_any(dir: &Path) -> Result<CidLease, VmmError> {
    for cid in FIRST_GUEST_CID..=LAST_AUTO_CID {
        if let Some(lease) = try_lease(dir, cid)? {
            return Ok(lease);
        }
    }
    Err(VmmError::NoFreeCid {
        first: FIRST_GUEST_CID,
        last: LAST_AUTO_CID,
    })
}

fn try_lease(dir: &Path, cid: u32) -> Result<Option<CidLease>, VmmError> {
    let io = |action: String, source| VmmError::Io {
        vm: format!("with CID {cid}"),
        action,
        source,
    };
    std::fs::create_dir_all(dir).map_err(|e| io(format!("create {}", dir.display()), e))?;
    let path: PathBuf = dir.join(format!("{cid}.lock"));
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io(format!("open {}", path.display()), e))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(CidLease {
            cid,
            lock: Some(lock),
        })),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(io(format!("lock {}", path.display()), errno.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leased_cid_is_refused_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let first = lease(dir.path(), 7).unwrap();
        let err = lease(dir.path(), 7).unwrap_err();
        assert!(matches!(err, VmmError::CidInUse(7)), "{err}");
        assert!(err.to_string().contains("CID 7 is already in use"));
        drop(first);
        assert_eq!(lease(dir.path(), 7).unwrap().cid(), 7);
    }

    #[test]
    fn automatic_leases_skip_taken_cids() {
        let dir = tempfile::tempdir().unwrap();
        let a = lease_any(dir.path()).unwrap();
        let b = lease_any(dir.path()).unwrap();
        assert_eq!((a.cid(), b.cid()), (3, 4));
    }

    #[test]
    fn reserved_cids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for cid in [0, 1, 2] {
            let err = lease(dir.path(), cid).unwrap_err().to_string();
            assert!(err.contains("reserved"), "{err}");
        }
    }
}
