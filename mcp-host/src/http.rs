//! The HTTP front door: streamable HTTP MCP at `/mcp`, `/healthz` and
//! `/metrics` (Prometheus text format), on TCP and on the admin Unix
//! socket; the admin socket also takes `nexusd stdio` front ends at
//! `/stdio` (see `bridge`).

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::response::IntoResponse;
use axum::routing::get;
use rmcp::transport::streamable_http_server::{
    StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
};
use tokio_util::sync::CancellationToken;

use crate::bridge::{self, Bridges};
use crate::daemon::Daemon;
use crate::tools::{NexusTools, Options};

/// Browser origins allowed to call `/mcp` (local tools such as the MCP
/// inspector); any other `Origin` is refused, against DNS rebinding. The
/// `Host` header must be a loopback name (rmcp's default).
pub const LOOPBACK_ORIGINS: [&str; 3] =
    ["http://localhost:*", "http://127.0.0.1:*", "http://[::1]:*"];

/// How a listener learns who calls.
#[derive(Debug, Clone, Copy)]
pub enum Callers {
    /// TCP: a bearer token (unless `http_auth = false`).
    Token,
    /// The admin socket: the peer's uid.
    Peer,
}

pub fn router(
    daemon: Arc<Daemon>,
    options: Options,
    shutdown: CancellationToken,
    callers: Callers,
) -> Router {
    let tools_daemon = daemon.clone();
    let hosts = Arc::new(daemon.config().hosts.clone());
    let mcp = StreamableHttpService::new(
        move || Ok(NexusTools::new(tools_daemon.clone(), options, None)),
        LocalSessionManager::default().into(),
        StreamableHttpServerConfig::default()
            .with_allowed_hosts(hosts.iter().cloned())
            .with_allowed_origins(LOOPBACK_ORIGINS)
            .enforce_origin_validation()
            .with_cancellation_token(shutdown),
    );
    let metrics_daemon = daemon.clone();
    let routes = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || {
                let daemon = metrics_daemon.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        daemon.render_metrics().await,
                    )
                }
            }),
        )
        .nest_service("/mcp", mcp);
    // Host first, then who calls.
    let routes = match callers {
        Callers::Token => routes.layer(axum::middleware::from_fn_with_state(
            Gate::new(daemon.clone()),
            token_identity,
        )),
        Callers::Peer => routes.layer(axum::middleware::from_fn_with_state(
            Gate::new(daemon.clone()),
            peer_identity,
        )),
    };
    routes
        .layer(axum::middleware::from_fn(session_end_has_no_content))
        .layer(axum::middleware::from_fn_with_state(hosts, known_host_only))
}

/// Every route answers only requests addressed to a loopback name or a
/// configured host (rmcp checks `/mcp` too): a web page that rebinds a
/// DNS name to 127.0.0.1 must not read `/metrics` or reach the admin
/// routes.
async fn known_host_only(
    axum::extract::State(hosts): axum::extract::State<Arc<Vec<String>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let host = request
        .headers()
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    if host_allowed(host, &hosts) {
        next.run(request).await
    } else {
        (
            axum::http::StatusCode::FORBIDDEN,
            format!(
                "Host must be one of {} (allowed_hosts in the config file adds names)\n",
                hosts.join(", ")
            ),
        )
            .into_response()
    }
}

/// TCP requests prove who makes them with a bearer token (`/healthz`
/// excepted). Any refusal is a bare 401 with `WWW-Authenticate: Bearer`
/// and no OAuth metadata (nexusd has none to offer).
async fn token_identity(
    axum::extract::State(gate): axum::extract::State<Gate>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let daemon = gate.daemon.clone();
    // Liveness, and the OAuth discovery paths clients probe (a clean 404:
    // nexusd offers no OAuth).
    let path = request.uri().path();
    if path == "/healthz" || path.starts_with("/.well-known/") {
        return next.run(request).await;
    }
    if !daemon.config().http_auth {
        request
            .extensions_mut()
            .insert(crate::identity::Identity::anonymous());
        return next.run(request).await;
    }
    let header = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok());
    match daemon.authenticate(header) {
        Ok(identity) => {
            let token = match &identity.proof {
                crate::identity::Proof::Token(name) => Some(name.clone()),
                _ => None,
            };
            let response = gate.serve_as(identity, request, next).await;
            match token {
                Some(name) => cut_off_when_ended(response, daemon, name),
                None => response,
            }
        }
        Err(refusal) => {
            warn_rated(&refusal);
            let challenge = match refusal {
                crate::identity::Refusal::Missing => "Bearer",
                _ => "Bearer error=\"invalid_token\"",
            };
            (
                axum::http::StatusCode::UNAUTHORIZED,
                [(axum::http::header::WWW_AUTHENTICATE, challenge)],
            )
                .into_response()
        }
    }
}

/// The header rmcp names a session with.
const SESSION_HEADER: &str = "mcp-session-id";
/// Sessions whose owner is remembered at most (the oldest are forgotten).
const MAX_OWNED_SESSIONS: usize = 65_536;

/// A listener's gate: the daemon (tokens, uids) and who opened which
/// session.
#[derive(Clone)]
struct Gate {
    daemon: Arc<Daemon>,
    owners: Arc<std::sync::Mutex<SessionOwners>>,
}

#[derive(Default)]
struct SessionOwners {
    by_id: std::collections::HashMap<String, String>,
    order: std::collections::VecDeque<String>,
}

impl Gate {
    fn new(daemon: Arc<Daemon>) -> Self {
        Self {
            daemon,
            owners: Arc::default(),
        }
    }

    /// Runs `request` as `identity`'s. A session is its opener's: another
    /// identity that learned its id finds no such session.
    async fn serve_as(
        &self,
        identity: crate::identity::Identity,
        mut request: axum::extract::Request,
        next: axum::middleware::Next,
    ) -> axum::response::Response {
        let session = request
            .headers()
            .get(SESSION_HEADER)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned);
        if let Some(id) = &session
            && self.owner(id).is_some_and(|owner| owner != identity.name)
        {
            return (
                axum::http::StatusCode::NOT_FOUND,
                "no such session for this caller\n",
            )
                .into_response();
        }
        let deleting = request.method() == axum::http::Method::DELETE;
        let name = identity.name.clone();
        request.extensions_mut().insert(identity);
        let response = next.run(request).await;
        match (&session, response.headers().get(SESSION_HEADER)) {
            (None, Some(opened)) => {
                if let Ok(opened) = opened.to_str() {
                    self.own(opened, name);
                }
            }
            (Some(id), _) if deleting && response.status().is_success() => self.disown(id),
            _ => {}
        }
        response
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SessionOwners> {
        self.owners.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn owner(&self, session: &str) -> Option<String> {
        self.lock().by_id.get(session).cloned()
    }

    fn own(&self, session: &str, identity: String) {
        let mut owners = self.lock();
        if owners.order.len() >= MAX_OWNED_SESSIONS
            && let Some(oldest) = owners.order.pop_front()
        {
            owners.by_id.remove(&oldest);
        }
        owners.order.push_back(session.to_owned());
        owners.by_id.insert(session.to_owned(), identity);
    }

    fn disown(&self, session: &str) {
        let mut owners = self.lock();
        owners.by_id.remove(session);
        owners.order.retain(|s| s != session);
    }
}

/// A response (an event stream, a long call) ends when the token that
/// asked for it is revoked or expires, not when the client next asks.
fn cut_off_when_ended(
    response: axum::response::Response,
    daemon: Arc<Daemon>,
    token: String,
) -> axum::response::Response {
    use futures::StreamExt;
    response.map(|body| {
        let ended: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> =
            Box::pin(async move { daemon.token_ended(&token).await });
        let data = body.into_data_stream();
        axum::body::Body::from_stream(futures::stream::unfold(
            (data, ended),
            |(mut data, mut ended)| async move {
                tokio::select! {
                    item = data.next() => item.map(|item| (item, (data, ended))),
                    () = &mut ended => None,
                }
            },
        ))
    })
}

/// A refused token is logged with what to do, at most every 10 s (anyone
/// who reaches the port can send them).
fn warn_rated(refusal: &crate::identity::Refusal) {
    static LAST: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if last.is_none_or(|at| at.elapsed() >= std::time::Duration::from_secs(10)) {
        *last = Some(std::time::Instant::now());
        tracing::warn!(
            why = %refusal,
            "refused an HTTP request: send `Authorization: Bearer <token>` (the first start wrote one to <state>/admin.token; create_token makes more)"
        );
    }
}

/// Admin socket requests are made by the peer's uid.
async fn peer_identity(
    axum::extract::State(gate): axum::extract::State<Gate>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let uid = request
        .extensions()
        .get::<axum::extract::ConnectInfo<bridge::AdminPeer>>()
        .and_then(|peer| peer.0.uid);
    let Some(uid) = uid else {
        return (
            axum::http::StatusCode::FORBIDDEN,
            "nexusd could not tell which user is connecting\n",
        )
            .into_response();
    };
    let identity = crate::identity::Identity::local(uid, &gate.daemon.config().admin_uids);
    gate.serve_as(identity, request, next).await
}

/// The names every listener answers to.
pub const LOOPBACK_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Whether a `Host` header names one of `allowed` (names or addresses,
/// IPv6 without brackets), with or without a port.
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = if let Some(v6) = host.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        host.rsplit_once(':').map_or(host, |(name, port)| {
            if port.chars().all(|c| c.is_ascii_digit()) {
                name
            } else {
                host
            }
        })
    };
    !name.is_empty() && allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
}

/// rmcp answers a session's DELETE with 202 Accepted; the Python client
/// (and the HTTP meaning of a finished deletion) expect 200 or 204, and
/// it warns on every session end otherwise.
async fn session_end_has_no_content(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let delete = request.method() == axum::http::Method::DELETE;
    let mut response = next.run(request).await;
    if delete && response.status() == axum::http::StatusCode::ACCEPTED {
        *response.status_mut() = axum::http::StatusCode::NO_CONTENT;
    }
    response
}

/// Serves the endpoints on TCP `listen` (if given) and on the admin Unix
/// socket (owner-only, or its configured group's too) until `shutdown` resolves; the admin
/// socket also bridges `nexusd stdio` front ends, counted in `bridges`.
/// `on_listen` learns the bound TCP address.
pub async fn serve(
    daemon: Arc<Daemon>,
    listen: Option<std::net::SocketAddr>,
    admin_socket: &std::path::Path,
    bridges: Bridges,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_listen: impl FnOnce(Option<std::net::SocketAddr>),
) -> std::io::Result<()> {
    let options = daemon.config().tool_options();
    // Read before anything listens: a bad certificate is a clear error.
    let tls = match (&daemon.config().tls, listen) {
        (Some(config), Some(_)) => {
            Some(crate::tls::acceptor(config).map_err(std::io::Error::other)?)
        }
        _ => None,
    };
    let listener = match listen {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await?),
        None => None,
    };
    // A socket file left by a daemon that died is ours to replace: the
    // state-directory lock says no other daemon is alive.
    let _ = std::fs::remove_file(admin_socket);
    let admin = tokio::net::UnixListener::bind(admin_socket)?;
    // Owner-only, or the configured group's too (connecting needs write
    // permission on a socket).
    let gid = daemon.config().admin_socket_gid;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(admin_socket, None, Some(gid))?;
    }
    std::fs::set_permissions(
        admin_socket,
        std::os::unix::fs::PermissionsExt::from_mode(if gid.is_some() { 0o660 } else { 0o600 }),
    )?;
    on_listen(match &listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    });
    let cancel = CancellationToken::new();
    // Who calls: a bearer token on TCP, the peer's uid on the admin socket.
    let app = router(
        daemon.clone(),
        options,
        cancel.child_token(),
        Callers::Token,
    );
    let admin_app = router(daemon.clone(), options, cancel.child_token(), Callers::Peer)
        .merge(bridge::routes(daemon, bridges, cancel.child_token()));
    let (tcp_stop, unix_stop) = (cancel.clone(), cancel.clone());
    let tcp = async move {
        match (listener, tls) {
            (Some(listener), Some(acceptor)) => {
                axum::serve(crate::tls::TlsListener::new(listener, acceptor)?, app)
                    .with_graceful_shutdown(async move { tcp_stop.cancelled().await })
                    .await
            }
            (Some(listener), None) => {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move { tcp_stop.cancelled().await })
                    .await
            }
            (None, _) => Ok(()),
        }
    };
    let unix = axum::serve(
        admin,
        admin_app.into_make_service_with_connect_info::<bridge::AdminPeer>(),
    )
    .with_graceful_shutdown(async move { unix_stop.cancelled().await });
    tokio::spawn(async move {
        shutdown.await;
        cancel.cancel();
    });
    let (tcp, unix) = tokio::join!(tcp, unix);
    let _ = std::fs::remove_file(admin_socket);
    tcp.and(unix)
}

#[cfg(test)]
mod tests {
    use super::{LOOPBACK_HOSTS, host_allowed};

    fn is_loopback_host(host: &str) -> bool {
        host_allowed(host, &LOOPBACK_HOSTS.map(String::from))
    }

    #[test]
    fn configured_names_are_hosts_too() {
        let hosts = vec!["localhost".to_owned(), "nexus.example.com".to_owned()];
        assert!(host_allowed("Nexus.Example.com:8443", &hosts));
        assert!(!host_allowed("nexus.example.com.evil:1", &hosts));
    }

    #[test]
    fn only_loopback_names_are_hosts() {
        for ok in [
            "localhost",
            "localhost:7777",
            "127.0.0.1:1",
            "[::1]:7777",
            "[::1]",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "",
            "evil.com",
            "evil.com:7777",
            "127.0.0.1.evil.com",
            "localhost.evil:80",
            "[::2]:1",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }
}
