//! Egress: the one way out of a VM. The guest's forwarder (guest-mcp on
//! 127.0.0.1:3128, named by HTTP_PROXY in every guest command) splices
//! each connection to vsock port 1026; nexusd serves an HTTP proxy there,
//! one listener per VM, so every connection is known to be that VM's.
//! CONNECT tunnels and absolute-form HTTP requests are allowed when the
//! VM's allowlists (its owner's role's, then its own) allow the host and
//! port; the name is resolved here once and every address checked
//! ([`addresses`]), then the connection goes to a checked address only.
//! Each connection is a row in the audit trail and counted in /metrics.
//!
//! A VM granted secrets holds placeholders; for a host with one of its
//! secrets bound, the proxy terminates the guest's TLS with a leaf of
//! Nexus's own CA (which guests trust), puts the secrets into the
//! request headers and opens its own verified TLS connection upstream.
//! Every other host is tunnelled untouched.
//!
//! - `allowlist`: host and port patterns.
//! - `addresses`: which upstream addresses are never reachable.
//! - `secrets`: bindings, placeholders, injection, exfiltration checks.
//! - `ca`: Nexus's CA and its leaves; the upstream trust store.
//! - `proxy`: the HTTP proxy on one VM's listener.
//! - `intercept`: a terminated TLS connection's requests.

pub mod addresses;
pub mod allowlist;
pub mod ca;
mod intercept;
pub mod proxy;
pub mod secrets;

use std::time::Duration;

pub use allowlist::Allowlist;

/// What a request must pass, as nexusd says for one VM at one moment.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Who the VM acts for (`vm:NAME`, its owner's role), for the trail.
    pub identity: String,
    /// Every list must allow the host and port: the role's, and the VM's
    /// own when it narrowed them.
    pub lists: Vec<Allowlist>,
    /// The secrets the VM may use, and every placeholder.
    pub granted: secrets::Granted,
}

/// One egress connection (a tunnel) or request, as it ended.
#[derive(Debug, Clone)]
pub struct Record {
    pub vm: String,
    pub identity: String,
    pub method: String,
    pub host: String,
    pub port: u16,
    pub outcome: Outcome,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub took: Duration,
    /// Whether the proxy terminated its TLS (a host with a secret bound).
    pub intercepted: bool,
    /// Requests on an intercepted connection.
    pub requests: u64,
    /// The secrets sent upstream, by name.
    pub secrets: Vec<String>,
    /// A plain HTTP request's answer from upstream.
    pub status: Option<u16>,
}

/// How an egress connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Through, and ended normally.
    Ok,
    /// Refused: not allowed, or an address the host never lets out to.
    Denied(String),
    /// Allowed, but it failed (resolving, connecting, upstream).
    Failed(String),
}

/// What the proxy asks of nexusd.
pub trait Gate: Send + Sync + 'static {
    /// The rules for VM `vm` now (role and grants change at any time).
    fn rules(&self, vm: &str) -> Result<Rules, String>;
    /// An egress connection ended: audit it, count it.
    fn record(&self, record: Record);
}

/// Settings of the proxy itself.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Tests only: loopback upstreams (a test's servers) may be reached
    /// by name. Never a default.
    pub allow_loopback: bool,
    /// Names resolved to these addresses instead of by DNS (lowercase).
    pub hosts: std::collections::BTreeMap<String, Vec<std::net::IpAddr>>,
    /// Connections one VM may have open at once.
    pub max_connections: usize,
    /// How long a guest has to send a request's head.
    pub header_timeout: Duration,
    /// How long resolving a name and connecting upstream may take.
    pub connect_timeout: Duration,
    /// Nexus's CA, for hosts with a secret bound (none: never intercept).
    pub authority: Option<std::sync::Arc<ca::Authority>>,
    /// How upstream TLS is verified on intercepted connections.
    pub upstream_tls: Option<std::sync::Arc<tokio_rustls::rustls::ClientConfig>>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            allow_loopback: false,
            hosts: Default::default(),
            max_connections: 256,
            header_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            authority: None,
            upstream_tls: None,
        }
    }
}

/// A std mutex's guard, poisoned or not (the data stays consistent: no
/// holder panics midway).
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
