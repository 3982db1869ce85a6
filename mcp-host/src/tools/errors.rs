//! The one place a daemon error becomes what a tool's caller reads.
//!
//! Errors about what the caller asked for (a name taken, no such VM or
//! snapshot, a quota) are told as they are. Failures on the host (a file
//! operation, a missing program, the catalog, anything internal) carry
//! host paths and setup details a client has no use for and should not
//! see: the caller gets what failed and a reference, nexusd's log the
//! whole error under that reference.

use std::sync::atomic::{AtomicU64, Ordering};

use nexus_storage::StorageError;
use nexus_vmm::VmmError;

use crate::daemon::DaemonError;

/// What the caller of a failed tool reads.
pub fn shown(error: DaemonError) -> String {
    match hidden_as(&error) {
        None => error.to_string(),
        Some(what) => {
            static NEXT: AtomicU64 = AtomicU64::new(1);
            let reference = format!(
                "{:x}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            tracing::error!(reference, error = %error, source = ?std::error::Error::source(&error), "a tool failed on the host");
            format!(
                "{what} on the host; nexusd's log has the details under reference {reference} (an admin can look)"
            )
        }
    }
}

/// The summary of an error whose details stay on the host; None if the
/// caller may read it all.
fn hidden_as(error: &DaemonError) -> Option<&'static str> {
    match error {
        DaemonError::Storage(e) => match e {
            StorageError::Fs { .. } | StorageError::Io { .. } | StorageError::Catalog(_) => {
                Some("a storage operation failed")
            }
            StorageError::NoPool { .. } => Some("the storage pool is not available"),
            StorageError::BadImage(..) => Some("an image is not usable"),
            _ => None,
        },
        DaemonError::Vmm(e) => match e {
            // nexusd checks what callers give (vCPUs, memory) itself: a
            // spec vmm refuses is the host's (a run directory too long).
            VmmError::DiedDuringBoot { .. }
            | VmmError::ReadyTimeout { .. }
            | VmmError::NoFreeCid { .. }
            | VmmError::NotReady { .. } => None,
            _ => Some("running the VM failed"),
        },
        DaemonError::NoBackend(_) => {
            Some("VMs cannot be started (the host is not set up for them)")
        }
        DaemonError::BadImage { .. } => Some("the VM's image is damaged"),
        DaemonError::Internal(_) => Some("an internal error happened"),
        DaemonError::Invalid(_)
        | DaemonError::NoVm(_)
        | DaemonError::NotRunning(_)
        | DaemonError::Running(_)
        | DaemonError::Destroying(_)
        | DaemonError::Guest { .. }
        | DaemonError::Image { .. }
        | DaemonError::Refused(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_failures_keep_their_paths_on_the_host() {
        let io = DaemonError::Storage(StorageError::Io {
            op: "create",
            path: "/var/lib/nexus/pool/secret-place".into(),
            source: std::io::Error::other("disk full"),
        });
        let shown_io = shown(io);
        assert!(!shown_io.contains("/var/lib"), "{shown_io}");
        assert!(shown_io.contains("a storage operation failed") && shown_io.contains("reference"));
        let internal = shown(DaemonError::Internal("at /root/.cache/x".into()));
        assert!(!internal.contains("/root"), "{internal}");
        // What the caller asked for is told as it is.
        assert_eq!(
            shown(DaemonError::NoVm("x".into())),
            "VM \"x\" does not exist: list_vms shows the VMs there are"
        );
        let busy = shown(DaemonError::Storage(StorageError::NoSnapshot {
            vm: "a".into(),
            snapshot: "s".into(),
        }));
        assert!(busy.contains("has no snapshot \"s\""), "{busy}");
    }
}
