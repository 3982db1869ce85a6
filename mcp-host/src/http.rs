//! The HTTP front door: streamable HTTP MCP at `/mcp`, `/healthz` and
//! `/metrics` (Prometheus text format).

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use rmcp::transport::streamable_http_server::{
    StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
};
use tokio_util::sync::CancellationToken;

use crate::daemon::Daemon;
use crate::tools::NexusTools;

/// Browser origins allowed to call `/mcp` (local tools such as the MCP
/// inspector); any other `Origin` is refused, against DNS rebinding. The
/// `Host` header must be a loopback name (rmcp's default).
pub const LOOPBACK_ORIGINS: [&str; 3] =
    ["http://localhost:*", "http://127.0.0.1:*", "http://[::1]:*"];

pub fn router(daemon: Arc<Daemon>, shutdown: CancellationToken) -> Router {
    let tools_daemon = daemon.clone();
    let mcp = StreamableHttpService::new(
        move || Ok(NexusTools::new(tools_daemon.clone())),
        LocalSessionManager::default().into(),
        StreamableHttpServerConfig::default()
            .with_allowed_origins(LOOPBACK_ORIGINS)
            .enforce_origin_validation()
            .with_cancellation_token(shutdown),
    );
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || {
                let daemon = daemon.clone();
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
        .nest_service("/mcp", mcp)
}

/// Serves the same endpoints on TCP `listen` and on the admin Unix socket
/// (owner-only permissions) until `shutdown` resolves. `on_listen` learns
/// the bound TCP address.
pub async fn serve(
    daemon: Arc<Daemon>,
    listen: std::net::SocketAddr,
    admin_socket: &std::path::Path,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_listen: impl FnOnce(std::net::SocketAddr),
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    // A socket file left by a daemon that died is ours to replace: the
    // state-directory lock says no other daemon is alive.
    let _ = std::fs::remove_file(admin_socket);
    let admin = tokio::net::UnixListener::bind(admin_socket)?;
    std::fs::set_permissions(
        admin_socket,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    on_listen(listener.local_addr()?);
    let cancel = CancellationToken::new();
    let app = router(daemon, cancel.child_token());
    let (tcp_stop, unix_stop) = (cancel.clone(), cancel.clone());
    let tcp = axum::serve(listener, app.clone())
        .with_graceful_shutdown(async move { tcp_stop.cancelled().await });
    let unix =
        axum::serve(admin, app).with_graceful_shutdown(async move { unix_stop.cancelled().await });
    tokio::spawn(async move {
        shutdown.await;
        cancel.cancel();
    });
    let (tcp, unix) = tokio::join!(tcp, unix);
    let _ = std::fs::remove_file(admin_socket);
    tcp.and(unix)
}
