//! The HTTP front door: streamable HTTP MCP at `/mcp`, and `/healthz`.

use std::future::Future;

use axum::Router;
use axum::routing::get;
use rmcp::transport::streamable_http_server::{
    StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
};
use tokio_util::sync::CancellationToken;

use crate::Config;
use crate::tools::NexusTools;

pub fn router(config: &Config, shutdown: CancellationToken) -> Router {
    let images_dir = config.images_dir();
    let mcp = StreamableHttpService::new(
        move || Ok(NexusTools::new(images_dir.clone())),
        LocalSessionManager::default().into(),
        StreamableHttpServerConfig::default().with_cancellation_token(shutdown),
    );
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .nest_service("/mcp", mcp)
}

/// Serves HTTP until `shutdown` resolves. `on_listen` learns the bound address.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_listen: impl FnOnce(std::net::SocketAddr),
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    on_listen(listener.local_addr()?);
    let cancel = CancellationToken::new();
    let app = router(&config, cancel.child_token());
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            cancel.cancel();
        })
        .await
}
