//! nexus-vmm: runs microVMs.
//!
//! A [`Vmm`] starts VMs from a [`VmSpec`] through one [`Backend`] (QEMU
//! `microvm` here; Firecracker fits behind the same trait) and hands back a
//! running [`Vm`]. The parts every backend shares live here, once:
//!
//! - a CID unique on the host, leased through a lock file ([`cid`]);
//! - readiness without races: before the VMM starts, the host listens on
//!   `<uds>_1027`; the guest connects there once guest-mcp listens, and only
//!   then does the host connect to the guest ([`readiness`]). The open
//!   connection doubles as a liveness signal;
//! - the hybrid-vsock client, Firecracker's `CONNECT <port>` handshake on the
//!   VM's Unix socket ([`vsock`]);
//! - console capture and the tail of it that boot errors carry ([`console`]);
//! - stopping: a graceful power-off through the guest's control channel,
//!   then SIGTERM, then SIGKILL, then removal of every socket and file of
//!   the VM ([`vm`]).
//!
//! # Layout
//!
//! - `accel`: choosing KVM or TCG without hanging to find out.
//! - `backend`: the [`Backend`] trait and what a launch returns.
//! - `qemu`: the QEMU `microvm` backend and its vhost-device-vsock helper.
//! - `spec`: [`VmSpec`], checked before anything starts.
//! - `cid`, `readiness`, `vsock`, `console`, `process`: the shared parts.
//! - `cgroup`: each VM's host processes under CPU, memory and task limits.
//! - `vm`: [`Vmm`] and [`Vm`], starting, watching and stopping.

pub mod accel;
pub mod backend;
pub mod cgroup;
pub mod cid;
pub mod console;
mod control;
mod error;
mod process;
pub mod qemu;
pub mod readiness;
pub mod spec;
pub mod vm;
pub mod vsock;

pub use accel::Accel;
pub use backend::{Backend, BackendKind};
pub use error::VmmError;
pub use spec::{Drive, VmSpec};
pub use vm::{GuestEndpoint, GuestState, Machine, StopReport, Vm, Vmm, VmmConfig};

/// Guest vsock port of the agent-facing MCP server.
pub const GUEST_TOOLS_PORT: u32 = 1024;
/// Guest vsock port of the host-only control channel.
pub const GUEST_CONTROL_PORT: u32 = 1023;
/// Host vsock port the guest connects to once it is ready.
pub const READY_PORT: u32 = 1027;
/// The host port the guest reaches nexusd's egress proxy on.
pub const EGRESS_PORT: u32 = 1026;
