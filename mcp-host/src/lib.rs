//! nexusd: the Nexus daemon.
//!
//! One rmcp server, [`tools::NexusTools`], is served over streamable HTTP at
//! `/mcp` and over stdio, on top of one [`daemon::Daemon`] per state
//! directory (a lock keeps a second nexusd out). The daemon makes VMs of
//! `nexus-storage` drives and `nexus-vmm` processes; each running VM's
//! guest tools are proxied as `<vm>__<tool>` (or once, as `vm_<tool>`
//! with a `vm` argument, on the shared surface).
//!
//! # Layout
//!
//! - `config`: the validated daemon configuration.
//! - `daemon`: VM lifecycle on storage + vmm, and the events of it.
//! - `guest`: the guest link (one session per VM, its cached tool list,
//!   deadlines) and the proxy that forwards tool calls over it.
//! - `identity`: who calls (bearer tokens over TCP, the peer's uid on the
//!   admin socket and stdio bridges) and roles.
//! - `state_lock`: one daemon per state directory.
//! - `tools`: the MCP tools (handlers only translate), the two guest tool
//!   surfaces, standard schemas, log messages.
//! - `metrics`: Prometheus counters and histograms for `/metrics`.
//! - `schema`: tool schemas as JSON Schema 2020-12 validators take them.
//! - `http`: the axum router (`/mcp`, `/healthz`, `/metrics`) and the serve loop.
//! - `bridge`: the admin socket's `/stdio` upgrade, both ends.
//! - `stdio`: `nexusd stdio`, a bridge to the daemon (started if none runs).

pub mod bridge;
pub mod config;
pub mod daemon;
pub mod egress;
pub mod guest;
pub mod http;
pub mod identity;
pub mod metrics;
pub mod policy;
pub mod schema;
pub mod state_lock;
pub mod stdio;
pub mod tls;
pub mod tools;

pub use config::Config;
