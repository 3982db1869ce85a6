use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong running a VM. Messages say what to do.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("invalid VM spec: {0}")]
    InvalidSpec(String),
    #[error("{what} {path} does not exist{hint}")]
    MissingFile {
        what: &'static str,
        path: PathBuf,
        /// How to make it, starting with "; ".
        hint: String,
    },
    #[error("{program} not found{hint}")]
    MissingProgram { program: String, hint: String },
    #[error("vsock CID {0} is already in use by another VM on this host")]
    CidInUse(u32),
    #[error("no free vsock CID between {first} and {last}")]
    NoFreeCid { first: u32, last: u32 },
    #[error("acceleration {0}")]
    Accel(String),
    #[error("could not {action} for VM {vm}")]
    Io {
        vm: String,
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "VM {vm} exited during boot ({status}){}; last console lines:\n{console}",
        panic.as_ref().map(|p| format!(", {p}")).unwrap_or_default()
    )]
    DiedDuringBoot {
        vm: String,
        status: String,
        /// The kernel's panic line, when it panicked.
        panic: Option<String>,
        console: String,
    },
    #[error(
        "VM {vm} did not become ready within {timeout:?} (guest-mcp never connected to host port 1027); the VM was stopped; last console lines:\n{console}"
    )]
    ReadyTimeout {
        vm: String,
        timeout: Duration,
        console: String,
    },
    #[error("VM {vm} is not ready: {why}")]
    NotReady { vm: String, why: String },
    #[error("VM {vm}, vsock port {port}: {source}")]
    Vsock {
        vm: String,
        port: u32,
        #[source]
        source: crate::vsock::VsockError,
    },
    #[error("VM {vm}: control channel: {why}")]
    Control { vm: String, why: String },
    /// The VMM's own control (pause, resume) failed.
    #[error("VM {vm}: {why}")]
    Machine { vm: String, why: String },
    #[error("VM {vm} is paused: resume_vm first")]
    Paused { vm: String },
}
