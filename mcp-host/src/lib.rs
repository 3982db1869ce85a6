//! nexusd: the Nexus daemon.
//!
//! One rmcp server, [`tools::NexusTools`], is served over streamable HTTP at
//! `/mcp` and over stdio. At this stage it serves the image catalog; VM
//! management, proxied guest tools and durable state come with the daemon
//! issue, on top of `nexus-vmm` and `nexus-storage`.
//!
//! # Layout
//!
//! - `config`: the validated daemon configuration.
//! - `tools`: the MCP tools (handlers only translate).
//! - `images`: reading image directories and their manifests.
//! - `http`: the axum router (`/mcp`, `/healthz`) and the serve loop.

pub mod config;
pub mod http;
pub mod images;
pub mod tools;

pub use config::Config;
