//! Reaching nexusd: over its admin Unix socket (the default; the caller's
//! uid is its identity), upgraded to one raw MCP session as `nexusd stdio`
//! does, or over streamable HTTP with an API token.

use std::path::{Path, PathBuf};

use http_body_util::Empty;
use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use nexus_types::admin::{MCP_PATH, UPGRADE_PROTOCOL};
use rmcp::service::RunningService;
use rmcp::{RoleClient, ServiceExt};
use tokio::net::UnixStream;

use crate::error::CtlError;

pub type Client = RunningService<RoleClient, ()>;

/// Where nexusd is.
#[derive(Debug, Clone)]
pub enum Endpoint {
    Socket(PathBuf),
    Http { url: String, token: Option<String> },
}

/// An MCP session with nexusd.
pub async fn connect(endpoint: &Endpoint) -> Result<Client, CtlError> {
    match endpoint {
        Endpoint::Socket(path) => {
            let stream = upgrade(path).await?;
            ().serve(TokioIo::new(stream))
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
            ().serve(transport).await.map_err(|e| {
                let text = e.to_string();
                if ["401", "403", "nauthorized", "Auth required"]
                    .iter()
                    .any(|m| text.contains(m))
                {
                    CtlError::Denied(format!(
                        "nexusd at {url} refused the token ({text}): pass a valid one with --token-file or NEXUS_TOKEN"
                    ))
                } else {
                    CtlError::Unreachable(format!(
                        "nexusd did not answer at {url}: {text} (is `nexusd serve` running?)"
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
    let request = hyper::Request::get(MCP_PATH)
        .header(hyper::header::HOST, "localhost")
        .header(hyper::header::CONNECTION, "upgrade")
        .header(hyper::header::UPGRADE, UPGRADE_PROTOCOL)
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| CtlError::Unreachable(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| CtlError::Unreachable(format!("{}: {e}", path.display())))?;
    match response.status() {
        StatusCode::SWITCHING_PROTOCOLS => hyper::upgrade::on(response)
            .await
            .map_err(|e| CtlError::Unreachable(format!("{}: {e}", path.display()))),
        StatusCode::SERVICE_UNAVAILABLE => Err(CtlError::Unreachable(
            "nexusd is shutting down: try again in a moment".into(),
        )),
        status => Err(CtlError::Unreachable(format!(
            "{} answered {status}: is it nexusd's admin socket?",
            path.display()
        ))),
    }
}
