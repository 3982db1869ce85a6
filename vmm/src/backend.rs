//! The seam between Nexus and a VMM program.
//!
//! A backend only turns a checked spec into running processes; readiness,
//! supervision, stopping and cleanup are the same for every backend and
//! live in [`crate::vm`].

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use tokio::process::Child;

use crate::accel::Resolved;
use crate::{VmSpec, VmmError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// QEMU's `microvm` machine (KVM or TCG), vsock via vhost-device-vsock.
    Qemu,
}

/// Where a launch puts its files, all inside the VM's run directory.
#[derive(Debug, Clone)]
pub struct LaunchPaths {
    pub run_dir: PathBuf,
    /// The hybrid-vsock socket (Firecracker's `uds_path`).
    pub vsock_uds: PathBuf,
    pub console_log: PathBuf,
    /// Where the VMM serves the serial console for the capture to read
    /// (see `console`); it waits for the capture before starting the guest.
    pub console_socket: PathBuf,
}

/// What the backend must start.
#[derive(Debug)]
pub struct LaunchRequest<'a> {
    pub spec: &'a VmSpec,
    pub cid: u32,
    /// The CID lease's lock, for the VMM to inherit: the CID stays leased
    /// for as long as the VM runs, even if the daemon dies.
    pub cid_lock: Option<std::os::fd::RawFd>,
    /// The uid (and gid) the VMM drops to once set up; None: it stays root.
    pub run_as: Option<u32>,
    pub accel: Resolved,
    pub paths: LaunchPaths,
}

/// The processes a launch started. The VMM's exit is the VM's exit; helpers
/// live and die with it.
#[derive(Debug)]
pub struct Launched {
    pub vmm: Child,
    pub helpers: Vec<(&'static str, Child)>,
    /// A log of the VMM's own messages, for errors (not the guest console).
    pub vmm_log: Option<PathBuf>,
}

pub type LaunchFuture<'a> = Pin<Box<dyn Future<Output = Result<Launched, VmmError>> + Send + 'a>>;

/// A VMM program Nexus can drive.
pub trait Backend: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> BackendKind;
    /// Starts the VM's processes. On error, nothing it started may remain.
    fn launch<'a>(&'a self, req: LaunchRequest<'a>) -> LaunchFuture<'a>;
}
