//! guest-mcp: the MCP server inside every Nexus VM.
//!
//! An agent works with its computer through the tools served here on vsock
//! port 1024: `exec`, background processes, files, glob/grep and
//! `system_info`. A second server on
//! port 1023 is the host's control channel (`shutdown`, `sync`); nexusd
//! never proxies it to agents. Once the tool server listens, guest-mcp tells
//! the host it is ready by connecting to the host on port 1027 and keeping
//! that connection open for as long as it lives (see `ready`).
//!
//! The same binary runs natively on a host (`--listen unix:PATH`, `--stdio`)
//! so that nearly all of its behaviour is tested without a VM.
//!
//! # Layout
//!
//! - `tools`: the agent-facing rmcp server (port 1024), one module per
//!   tool group; handlers only translate to the modules below.
//! - `exec`: runs one command in its own process tree, with limits.
//! - `procs`: background processes and their output ring buffers.
//! - `trees`: a cgroup per command, so that everything it starts can be
//!   killed and limited (pids, memory), `setsid` or not.
//! - `files`, `search`, `sysinfo`: files, glob/grep, the machine.
//! - `control`: the host-only rmcp server (port 1023), with `freeze`
//!   (FIFREEZE with a thaw deadline) and `mounts` (unmount/mount for
//!   in-place rollback).
//! - `limits`: the configurable bounds.
//! - `listen`: listen addresses (`vsock:PORT`, `unix:PATH`) and accept loops.
//! - `ready`: the readiness and liveness connection to the host.
//! - `power`: stopping every process and powering the VM off.

pub mod control;
pub mod egress;
pub mod exec;
pub mod files;
pub mod freeze;
pub mod limits;
pub mod listen;
pub mod mounts;
pub mod network;
pub mod power;
pub mod procs;
pub mod pty;
pub mod ready;
pub mod search;
pub mod sysinfo;
pub mod tools;
pub mod trees;

/// vsock port of the agent-facing tool server.
pub const TOOLS_PORT: u32 = 1024;
/// vsock port of the host-only control channel.
pub const CONTROL_PORT: u32 = 1023;
/// Host vsock port the guest connects to once it is ready.
pub const READY_PORT: u32 = 1027;
/// The host's vsock CID, as seen from a guest.
pub const HOST_CID: u32 = 2;
