//! The hybrid-vsock client: Firecracker's host-side interface to a guest's
//! vsock, which vhost-device-vsock offers QEMU VMs too.
//!
//! The host connects to the VM's Unix socket, writes `CONNECT <port>\n` and
//! reads `OK <host port>\n`; from then on the stream is the guest
//! connection. The reply is read byte by byte so that nothing the guest
//! sends right after it is swallowed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("nothing is listening on the VM's vsock socket {path}: is the VM running?")]
    NoVmSocket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "nothing in the guest is listening on this port (the connection was closed during the handshake)"
    )]
    NoGuestListener,
    #[error("unexpected handshake reply {0:?} (expected \"OK <port>\")")]
    BadReply(String),
    #[error("no handshake reply within {0:?}")]
    Timeout(Duration),
    #[error("handshake I/O failed")]
    Io(#[source] std::io::Error),
}

/// Connects to guest `port` through the hybrid-vsock socket at `uds`.
pub async fn connect(uds: &Path, port: u32, timeout: Duration) -> Result<UnixStream, VsockError> {
    let mut stream = UnixStream::connect(uds)
        .await
        .map_err(|source| VsockError::NoVmSocket {
            path: uds.to_path_buf(),
            source,
        })?;
    tokio::time::timeout(timeout, handshake(&mut stream, port))
        .await
        .map_err(|_| VsockError::Timeout(timeout))??;
    Ok(stream)
}

async fn handshake(stream: &mut UnixStream, port: u32) -> Result<(), VsockError> {
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(VsockError::Io)?;
    let mut line = Vec::with_capacity(16);
    loop {
        let mut byte = [0u8; 1];
        match stream.read(&mut byte).await {
            Ok(0) => return Err(VsockError::NoGuestListener),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() >= 64 => {
                return Err(VsockError::BadReply(String::from_utf8_lossy(&line).into()));
            }
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Err(VsockError::NoGuestListener);
            }
            Err(e) => return Err(VsockError::Io(e)),
        }
    }
    let reply = String::from_utf8_lossy(&line);
    match reply.strip_prefix("OK ") {
        Some(n) if n.trim().parse::<u32>().is_ok() => Ok(()),
        _ => Err(VsockError::BadReply(reply.into_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::UnixListener;

    /// A stand-in for vhost-device-vsock's side of the handshake.
    async fn fake_vmm(listener: UnixListener, reply: &'static [u8]) -> String {
        let (stream, _) = listener.accept().await.unwrap();
        let mut stream = tokio::io::BufReader::new(stream);
        let mut line = String::new();
        stream.read_line(&mut line).await.unwrap();
        stream.get_mut().write_all(reply).await.unwrap();
        line
    }

    #[tokio::test]
    async fn handshake_leaves_the_guests_first_bytes_in_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vm.vsock");
        let server = tokio::spawn(fake_vmm(
            UnixListener::bind(&uds).unwrap(),
            b"OK 1073741824\nhello",
        ));
        let mut stream = connect(&uds, 1024, Duration::from_secs(5)).await.unwrap();
        assert_eq!(server.await.unwrap(), "CONNECT 1024\n");
        let mut rest = [0u8; 5];
        stream.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"hello");
    }

    #[tokio::test]
    async fn a_closed_handshake_means_no_guest_listener() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vm.vsock");
        let server = tokio::spawn(fake_vmm(UnixListener::bind(&uds).unwrap(), b""));
        let err = connect(&uds, 1024, Duration::from_secs(5))
            .await
            .unwrap_err();
        server.await.unwrap();
        assert!(matches!(err, VsockError::NoGuestListener), "{err}");
    }

    #[tokio::test]
    async fn a_missing_socket_says_the_vm_may_not_run() {
        let err = connect(
            Path::new("/nonexistent/vm.vsock"),
            1024,
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("is the VM running?"), "{err}");
    }

    #[tokio::test]
    async fn garbage_replies_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vm.vsock");
        let server = tokio::spawn(fake_vmm(UnixListener::bind(&uds).unwrap(), b"NO\n"));
        let err = connect(&uds, 1024, Duration::from_secs(5))
            .await
            .unwrap_err();
        server.await.unwrap();
        assert!(
            matches!(err, VsockError::BadReply(ref r) if r == "NO"),
            "{err}"
        );
    }
}
