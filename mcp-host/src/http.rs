//! The HTTP front door: streamable HTTP MCP at `/mcp`, and `/healthz`.

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

pub fn router(daemon: Arc<Daemon>, shutdown: CancellationToken) -> Router {
    let mcp = StreamableHttpService::new(
        move || Ok(NexusTools::new(daemon.clone())),
        LocalSessionManager::default().into(),
        StreamableHttpServerConfig::default().with_cancellation_token(shutdown),
    );
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .nest_service("/mcp", mcp)
}

/// Serves HTTP on `listen` until `shutdown` resolves. `on_listen` learns
/// the bound address.
pub async fn serve(
    daemon: Arc<Daemon>,
    listen: std::net::SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_listen: impl FnOnce(std::net::SocketAddr),
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    on_listen(listener.local_addr()?);
    let cancel = CancellationToken::new();
    let app = router(daemon, cancel.child_token());
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            cancel.cancel();
        })
        .await
}
