//! guest-mcp: the MCP server inside every Nexus VM.
//!
//! An agent works with its computer through the tools served here on vsock
//! port 1024 (`exec`, with files and processes to come). A second server on
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
//! - `exec`: runs one command in its own process group, with limits.
//! - `tools`: the agent-facing rmcp server (port 1024).
//! - `control`: the host-only rmcp server (port 1023).
//! - `listen`: listen addresses (`vsock:PORT`, `unix:PATH`) and accept loops.
//! - `ready`: the readiness and liveness connection to the host.
//! - `power`: stopping every process and powering the VM off.

pub mod control;
pub mod exec;
pub mod listen;
pub mod power;
pub mod ready;
pub mod tools;

/// vsock port of the agent-facing tool server.
pub const TOOLS_PORT: u32 = 1024;
/// vsock port of the host-only control channel.
pub const CONTROL_PORT: u32 = 1023;
/// Host vsock port the guest connects to once it is ready.
pub const READY_PORT: u32 = 1027;
/// The host's vsock CID, as seen from a guest.
pub const HOST_CID: u32 = 2;
