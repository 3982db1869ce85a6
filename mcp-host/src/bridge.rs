//! `nexusd stdio` beside a running daemon.
//!
//! Agent harnesses launch `nexusd stdio`; the daemon may already run (as
//! `nexusd serve`, or another harness's `nexusd stdio`) and own the state
//! directory. Then the new process becomes a bridge: it connects to the
//! daemon's admin socket as the user who launched it, asks for `/stdio`
//! with an HTTP upgrade, and from then on copies bytes between its own
//! stdin/stdout and the socket. On the daemon's side the upgraded
//! connection is served exactly as stdio is (one MCP session, either
//! protocol era), so a bridged client sees what an in-process one does.
//!
//! `nexusd stdio` is always such a bridge: when no daemon runs, it starts
//! one (see `stdio`), which exits once the last bridged session ends.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::TokioIo;
use rmcp::ServiceExt;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

use crate::daemon::Daemon;
use crate::tools::{NexusTools, Surface, surface};

/// The protocol name of the upgrade, and the admin socket's path for it
/// (shared with clients: nexusctl upgrades the same way).
pub use nexus_types::admin::{MCP_PATH as PATH, UPGRADE_PROTOCOL};

/// Who is at the other end of an admin socket connection.
#[derive(Debug, Clone, Copy)]
pub struct AdminPeer {
    pub uid: Option<u32>,
    pub pid: Option<i32>,
}

impl
    axum::extract::connect_info::Connected<
        axum::serve::IncomingStream<'_, tokio::net::UnixListener>,
    > for AdminPeer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        let cred = stream.io().peer_cred().ok();
        Self {
            uid: cred.map(|c| c.uid()),
            pid: cred.and_then(|c| c.pid()),
        }
    }
}

/// How many bridged sessions are open; once closed (the daemon is on its
/// way out), new ones are turned away so they can wait for the next
/// daemon instead of attaching to a dying one.
#[derive(Clone, Default)]
pub struct Bridges(Arc<BridgesInner>);

#[derive(Default)]
struct BridgesInner {
    /// (open sessions, closed to new ones)
    state: Mutex<(usize, bool)>,
    idle: tokio::sync::Notify,
    /// A front end has attached at least once.
    ever: std::sync::atomic::AtomicBool,
    attached: tokio::sync::Notify,
}

impl Bridges {
    fn state(&self) -> std::sync::MutexGuard<'_, (usize, bool)> {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn enter(&self) -> Option<BridgeGuard> {
        let mut state = self.state();
        if state.1 {
            return None;
        }
        state.0 += 1;
        self.0.ever.store(true, std::sync::atomic::Ordering::SeqCst);
        self.0.attached.notify_waiters();
        Some(BridgeGuard(self.clone()))
    }

    pub fn open(&self) -> usize {
        self.state().0
    }

    /// Waits up to `timeout` for a first front end; whether one came.
    pub async fn wait_first(&self, timeout: Duration) -> bool {
        let first = async {
            loop {
                let notified = self.0.attached.notified();
                if self.0.ever.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, first).await.is_ok()
    }

    /// Resolves once no bridged session is open, and takes no more.
    pub async fn close_when_idle(&self) {
        loop {
            let notified = self.0.idle.notified();
            {
                let mut state = self.state();
                if state.0 == 0 {
                    state.1 = true;
                    return;
                }
            }
            notified.await;
        }
    }
}

struct BridgeGuard(Bridges);

impl Drop for BridgeGuard {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.0 -= 1;
        if state.0 == 0 {
            self.0.0.idle.notify_waiters();
        }
    }
}

#[derive(Clone)]
struct Bridge {
    daemon: Arc<Daemon>,
    bridges: Bridges,
    shutdown: CancellationToken,
}

/// The admin socket's `/stdio` route.
pub fn routes(daemon: Arc<Daemon>, bridges: Bridges, shutdown: CancellationToken) -> Router {
    Router::new().route(PATH, get(upgrade)).with_state(Bridge {
        daemon,
        bridges,
        shutdown,
    })
}

async fn upgrade(
    State(bridge): State<Bridge>,
    ConnectInfo(peer): ConnectInfo<AdminPeer>,
    mut request: Request,
) -> Response {
    let wants = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok());
    if wants != Some(UPGRADE_PROTOCOL) {
        return (
            StatusCode::UPGRADE_REQUIRED,
            [(header::UPGRADE, UPGRADE_PROTOCOL)],
            format!("{PATH} is for `nexusd stdio`: send `Upgrade: {UPGRADE_PROTOCOL}`\n"),
        )
            .into_response();
    }
    let mut options = bridge.daemon.config().tool_options();
    if let Some(asked) = request.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|pair| pair.strip_prefix(&format!("{}=", surface::SURFACE_QUERY)))
    }) {
        match asked.parse::<Surface>() {
            Ok(surface) => options.surface = surface,
            Err(why) => return (StatusCode::BAD_REQUEST, format!("{why}\n")).into_response(),
        }
    }
    let Some(uid) = peer.uid else {
        return (
            StatusCode::FORBIDDEN,
            "nexusd could not tell which user is connecting\n",
        )
            .into_response();
    };
    let identity = crate::identity::Identity::local(uid, &bridge.daemon.config().admin_uids);
    let Some(guard) = bridge.bridges.enter() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "this nexusd is shutting down\n",
        )
            .into_response();
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let _guard = guard;
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::warn!(error = %e, "a stdio bridge's upgrade failed");
                return;
            }
        };
        tracing::info!(uid = ?peer.uid, pid = ?peer.pid, "stdio front end attached through the admin socket");
        let (read, write) = tokio::io::split(TokioIo::new(upgraded));
        let tools = NexusTools::new(bridge.daemon, options, Some(identity));
        match tools
            .serve_with_ct((read, write), bridge.shutdown.child_token())
            .await
        {
            Ok(running) => {
                let _ = running.waiting().await;
            }
            Err(e) => tracing::warn!(error = %e, "a bridged stdio session did not start"),
        }
        tracing::info!(uid = ?peer.uid, pid = ?peer.pid, "stdio front end detached");
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, UPGRADE_PROTOCOL)
        .body(Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("cannot connect to the admin socket {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon refused the stdio bridge: {0}")]
    Refused(String),
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error("the daemon did not answer the stdio bridge: {0}")]
    Unreachable(String),
    #[error("the stdio bridge failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Connects to the daemon at `admin_socket` and upgrades to a raw MCP
/// stream for this process's stdio.
pub async fn connect(
    admin_socket: &Path,
    surface: Option<Surface>,
) -> Result<hyper::upgrade::Upgraded, BridgeError> {
    let stream =
        UnixStream::connect(admin_socket)
            .await
            .map_err(|source| BridgeError::Connect {
                path: admin_socket.display().to_string(),
                source,
            })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| BridgeError::Unreachable(e.to_string()))?;
    tokio::spawn(connection.with_upgrades());
    let uri = match surface {
        Some(Surface::Shared) => format!("{PATH}?{}=shared", surface::SURFACE_QUERY),
        Some(Surface::PerVm) => format!("{PATH}?{}=per-vm", surface::SURFACE_QUERY),
        None => PATH.to_owned(),
    };
    let request = axum::http::Request::get(uri)
        .header(header::HOST, "localhost")
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, UPGRADE_PROTOCOL)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| BridgeError::Refused(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| BridgeError::Unreachable(e.to_string()))?;
    if response.status() == StatusCode::SERVICE_UNAVAILABLE {
        return Err(BridgeError::ShuttingDown);
    }
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = response.status();
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_owned())
            .unwrap_or_default();
        return Err(BridgeError::Refused(format!("{status}: {body}")));
    }
    hyper::upgrade::on(response)
        .await
        .map_err(|e| BridgeError::Unreachable(e.to_string()))
}

/// Copies stdin to the daemon and the daemon's output to stdout until the
/// daemon ends the session (it does once stdin closes).
pub async fn pipe(upgraded: hyper::upgrade::Upgraded) -> Result<(), BridgeError> {
    let (mut from_daemon, mut to_daemon) = tokio::io::split(TokioIo::new(upgraded));
    let upstream = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let copied = tokio::io::copy(&mut stdin, &mut to_daemon).await;
        // The client closed stdin: the session ends once the daemon sees it.
        let _ = to_daemon.shutdown().await;
        copied
    });
    let mut stdout = tokio::io::stdout();
    let downstream = tokio::io::copy(&mut from_daemon, &mut stdout).await;
    let _ = stdout.flush().await;
    upstream.abort();
    downstream?;
    Ok(())
}
