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

/// Connections spliced at once; past it, new ones wait in the listen
/// backlog (a runaway program must not take every descriptor guest-mcp
/// needs to serve its tools; the host allows a VM 256 anyway).
const MAX_CONNECTIONS: usize = 512;
/// How long the host's proxy has to take a connection.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Splices each connection on `listener` to `(cid, port)` until dropped.
pub async fn forward(listener: TcpListener, cid: u32, port: u32) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of descriptors, most likely: wait for some to free
                // rather than spin.
                tracing::warn!(error = %e, "egress: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        // Bytes go on as they come (a TLS flight in several records must
        // not wait on Nagle for the client's delayed ACK: 40 ms a time).
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let _slot = slot;
            let connected = tokio::time::timeout(
                CONNECT_TIMEOUT,
                VsockStream::connect(VsockAddr::new(cid, port)),
            )
            .await;
            match connected {
                Ok(Ok(mut vsock)) => {
                    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut vsock).await;
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, port, "egress: the host's proxy is not there")
                }
                Err(_) => tracing::warn!(port, "egress: the host's proxy did not answer in time"),
            }
        });
    }
}
