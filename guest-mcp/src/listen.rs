//! Where guest-mcp listens, and the accept loops that serve each connection.

use std::path::PathBuf;
use std::str::FromStr;

use rmcp::{ServerHandler, ServiceExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

/// A listen address: `vsock:PORT` inside a VM, `unix:PATH` on a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Vsock(u32),
    Unix(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("listen address {0:?} is invalid: use vsock:PORT or unix:PATH")]
    BadAddr(String),
    #[error("could not listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

impl FromStr for ListenAddr {
    type Err = ListenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some(("vsock", port)) => port
                .parse()
                .map(ListenAddr::Vsock)
                .map_err(|_| ListenError::BadAddr(s.to_owned())),
            Some(("unix", path)) if !path.is_empty() => Ok(ListenAddr::Unix(path.into())),
            _ => Err(ListenError::BadAddr(s.to_owned())),
        }
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Vsock(port) => write!(f, "vsock:{port}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A bound listener, so that callers learn of bind errors before serving
/// and readiness is only signalled once every socket is bound.
pub enum Listener {
    Vsock(tokio_vsock::VsockListener),
    Unix(tokio::net::UnixListener, PathBuf),
}

impl Listener {
    pub fn bind(addr: &ListenAddr) -> Result<Self, ListenError> {
        let err = |source| ListenError::Bind {
            addr: addr.to_string(),
            source,
        };
        match addr {
            ListenAddr::Vsock(port) => {
                let any = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, *port);
                tokio_vsock::VsockListener::bind(any)
                    .map(Listener::Vsock)
                    .map_err(err)
            }
            ListenAddr::Unix(path) => {
                // A socket file left by an earlier run would make bind fail.
                let _ = std::fs::remove_file(path);
                tokio::net::UnixListener::bind(path)
                    .map(|l| Listener::Unix(l, path.clone()))
                    .map_err(err)
            }
        }
    }

    /// Serves one MCP session per accepted connection until `shutdown`.
    pub async fn serve<S>(self, service: S, shutdown: CancellationToken)
    where
        S: ServerHandler + Clone + Send + 'static,
    {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = self.accept_one() => match accepted {
                    Ok(stream) => spawn_session(service.clone(), stream),
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                },
            }
        }
        if let Listener::Unix(_, path) = &self {
            let _ = std::fs::remove_file(path);
        }
    }

    async fn accept_one(&self) -> std::io::Result<BoxedStream> {
        Ok(match self {
            Listener::Vsock(l) => Box::new(l.accept().await?.0),
            Listener::Unix(l, _) => Box::new(l.accept().await?.0),
        })
    }
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}
type BoxedStream = Box<dyn Stream>;

fn spawn_session<S>(service: S, stream: BoxedStream)
where
    S: ServerHandler + Send + 'static,
{
    tokio::spawn(async move {
        match service.serve(stream).await {
            Ok(running) => {
                let _ = running.waiting().await;
            }
            Err(e) => tracing::debug!(error = %e, "mcp session ended during initialization"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listen_addresses() {
        assert_eq!(
            "vsock:1024".parse::<ListenAddr>().unwrap(),
            ListenAddr::Vsock(1024)
        );
        assert_eq!(
            "unix:/tmp/x.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/tmp/x.sock".into())
        );
        for bad in ["vsock:", "vsock:abc", "unix:", "tcp:1", "1024"] {
            let err = bad.parse::<ListenAddr>().unwrap_err().to_string();
            assert!(err.contains("use vsock:PORT or unix:PATH"), "{err}");
        }
    }
}
