//! The guest end of egress: a TCP listener on loopback (what HTTP_PROXY
//! names in the guest) whose connections are spliced, byte for byte, to
//! nexusd's egress proxy on vsock CID 2. The guest has no other way out:
//! no network device, no IP stack towards the host.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_vsock::{VsockAddr, VsockStream};

/// Binds `listen` (before readiness is announced, like every server).
pub async fn bind(listen: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(listen).await
}

/// Splices each connection on `listener` to `(cid, port)` until dropped.
pub async fn forward(listener: TcpListener, cid: u32, port: u32) {
    loop {
        let Ok((mut tcp, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            match VsockStream::connect(VsockAddr::new(cid, port)).await {
                Ok(mut vsock) => {
                    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut vsock).await;
                }
                Err(e) => tracing::warn!(error = %e, port, "egress: the host's proxy is not there"),
            }
        });
    }
}
