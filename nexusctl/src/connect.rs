//! Reaching nexusd: over its admin Unix socket (the default; the caller's
//! uid is its identity), upgraded to one raw MCP session as `nexusd stdio`
//! does, or over streamable HTTP with an API token.

use std::path::{Path, PathBuf};

use http_body_util::Empty;
use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use nexus_types::admin::{MCP_PATH, SURFACE_QUERY, UPGRADE_PROTOCOL};
use rmcp::model::ProgressNotificationParam;
use rmcp::service::{NotificationContext, RunningService};
use rmcp::{ClientHandler, RoleClient, ServiceExt};
use tokio::net::UnixStream;

use crate::error::CtlError;

pub type Client = RunningService<RoleClient, Handler>;

type Sink = tokio::sync::mpsc::UnboundedSender<String>;

/// Passes the progress lines of the calls under way (an image build's)
/// to whoever watches.
#[derive(Clone, Default)]
pub struct Handler {
    progress: std::sync::Arc<std::sync::Mutex<Option<Sink>>>,
}

impl Handler {
    /// From now on, progress messages arrive here.
    pub fn watch(&self) -> tokio::sync::mpsc::UnboundedReceiver<String> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        *self.progress.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        rx
    }
}

impl ClientHandler for Handler {
    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _: NotificationContext<RoleClient>,
    ) {
        let sink = self
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let (Some(sink), Some(message)) = (sink, params.message) {
            let _ = sink.send(message);
        }
    }
}

/// How long reaching nexusd and opening a session may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Where nexusd is (no Debug: it holds the token).
#[derive(Clone)]
pub enum Endpoint {
    Socket(PathBuf),
    Http { url: String, token: Option<String> },
}

/// An MCP session with nexusd, within [`CONNECT_TIMEOUT`].
pub async fn connect(endpoint: &Endpoint) -> Result<Client, CtlError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, open(endpoint)).await {
        Ok(result) => result,
        Err(_) => Err(CtlError::Unreachable(format!(
            "nexusd did not answer within {} s",
            CONNECT_TIMEOUT.as_secs()
        ))),
    }
}

async fn open(endpoint: &Endpoint) -> Result<Client, CtlError> {
    match endpoint {
        Endpoint::Socket(path) => {
            let stream = upgrade(path).await?;
            Handler::default()
                .serve(TokioIo::new(stream))
                .await
                .map_err(|e| CtlError::Unreachable(format!("MCP over {}: {e}", path.display())))
        }
        Endpoint::Http { url, token } => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let mut config =
                rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig::with_uri(
                    url.as_str(),
                );
            if let Some(token) = token {
                config = config.auth_header(token.clone());
            }
            let transport = rmcp::transport::StreamableHttpClientTransport::from_config(config);
            Handler::default().serve(transport).await.map_err(|e| {
                if e.auth_challenge().is_some() {
                    let which = if token.is_some() {
                        "refused the token"
                    } else {
                        "needs a token"
                    };
                    CtlError::Denied(format!(
                        "nexusd at {url} {which}: pass a valid one with --token-file or NEXUS_TOKEN (create_token makes one)"
                    ))
                } else {
                    CtlError::Unreachable(format!(
                        "nexusd did not answer at {url}: {e} (is `nexusd serve` running?)"
                    ))
                }
            })
        }
    }
}

/// Connects to the admin socket and upgrades to a raw MCP stream.
async fn upgrade(path: &Path) -> Result<hyper::upgrade::Upgraded, CtlError> {
    let stream = UnixStream::connect(path).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => CtlError::Denied(format!(
            "{}: permission denied: run as root or as a member of nexusd's admin_socket_group, or use --url with a token",
            path.display()
        )),
        _ => CtlError::Unreachable(format!(
            "no nexusd at {}: {e} (start it with `nexusd serve`, or name its socket with --socket or NEXUS_SOCKET)",
            path.display()
        )),
    })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| CtlError::Unreachable(format!("{}: {e}", path.display())))?;
    tokio::spawn(connection.with_upgrades());
    // Guest tools by their per-VM names, whatever the daemon's default.
    let request = hyper::Request::get(format!("{MCP_PATH}?{SURFACE_QUERY}=per-vm"))
        .header(hyper::header::HOST, "localhost")
        .header(hyper::header::CONNECTION, "upgrade")
        .header(hyper::header::UPGRADE, UPGRADE_PROTOCOL)
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| CtlError::Unreachable(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| CtlError::Unreachable(format!("{}: {e}", path.display())))?;
    let status = response.status();
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return hyper::upgrade::on(response)
            .await
            .map_err(|e| CtlError::Unreachable(format!("{}: {e}", path.display())));
    }
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_owned())
        .unwrap_or_default();
    Err(match status {
        StatusCode::SERVICE_UNAVAILABLE => {
            CtlError::Unreachable("nexusd is shutting down: try again in a moment".into())
        }
        StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => {
            CtlError::Denied(format!("{}: {status}: {body}", path.display()))
        }
        _ => CtlError::Unreachable(format!(
            "{} answered {status} ({body}): is it nexusd's admin socket?",
            path.display()
        )),
    })
}
