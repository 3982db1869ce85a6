//! nexusd: the Nexus daemon.
//!
//! One rmcp server, [`tools::NexusTools`], is served over streamable HTTP at
//! `/mcp` and over stdio, on top of one [`daemon::Daemon`] per state
//! directory (a lock keeps a second nexusd out). The daemon makes VMs of
//! `nexus-storage` drives and `nexus-vmm` processes; each running VM's
//! guest tools are proxied as `<vm>__<tool>`.
//!
//! # Layout
//!
//! - `config`: the validated daemon configuration.
//! - `daemon`: VM lifecycle on storage + vmm.
//! - `guest_link`: the shared session with each VM's guest-mcp, routing
//!   progress back to the caller of a proxied tool.
//! - `state_lock`: one daemon per state directory.
//! - `tools`: the MCP tools (handlers only translate).
//! - `metrics`: Prometheus counters and histograms for `/metrics`.
//! - `http`: the axum router (`/mcp`, `/healthz`, `/metrics`) and the serve loop.

pub mod config;
pub mod daemon;
pub mod guest_link;
pub mod http;
pub mod metrics;
pub mod state_lock;
pub mod tools;

pub use config::Config;
