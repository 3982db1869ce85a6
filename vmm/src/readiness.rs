//! The host end of the guest's readiness and liveness connection.
//!
//! The host listens on `<uds>_1027` before the VMM starts (hybrid vsock
//! delivers guest connections to host port P on `<uds>_P`). guest-mcp
//! connects once it listens, sends `READY guest-mcp <version>` and keeps the
//! connection open; its end means guest-mcp or the whole VM went away. If
//! guest-mcp is restarted by the guest's init, it connects again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the host knows of the guest's MCP server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestState {
    /// Not heard from yet.
    Booting,
    /// guest-mcp is up and holds the readiness connection.
    Ready { version: String },
    /// The readiness connection closed: guest-mcp restarting, or the VM gone.
    Gone,
}

/// Accepts readiness connections for one VM until dropped.
pub struct Readiness {
    path: PathBuf,
    state: watch::Receiver<GuestState>,
    task: JoinHandle<()>,
}

/// How long a connecting guest has to send its READY line.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest READY line taken (`READY guest-mcp <version>\n`); a longer
/// one is refused, and never logged.
pub const MAX_READY_LINE: usize = 128;

impl Readiness {
    /// Listens at `path`, replacing a stale socket file left by a dead VM.
    pub fn listen(path: &Path) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let (tx, rx) = watch::channel(GuestState::Booting);
        let task = tokio::spawn(accept_loop(listener, tx));
        Ok(Self {
            path: path.to_path_buf(),
            state: rx,
            task,
        })
    }

    pub fn state(&self) -> GuestState {
        self.state.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<GuestState> {
        self.state.clone()
    }
}

impl Drop for Readiness {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A guest can connect badly in a loop: one warning per this, counting
/// the rest, so that it cannot fill the host's log.
const WARN_EVERY: Duration = Duration::from_secs(10);

async fn accept_loop(listener: UnixListener, state: watch::Sender<GuestState>) {
    let mut last_warn: Option<std::time::Instant> = None;
    let mut unwarned = 0u64;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // The guest controls this line: read at most MAX_READY_LINE bytes.
        let mut stream = BufReader::new(stream);
        let mut line = Vec::new();
        let hello = tokio::time::timeout(
            HELLO_TIMEOUT,
            (&mut stream)
                .take(MAX_READY_LINE as u64)
                .read_until(b'\n', &mut line),
        )
        .await;
        let text = String::from_utf8_lossy(&line);
        let version = matches!(hello, Ok(Ok(n)) if n > 0 && line.ends_with(b"\n"))
            .then(|| text.trim().strip_prefix("READY ").map(str::to_owned))
            .flatten()
            .filter(|v| {
                v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-_+ ".contains(c))
            });
        let Some(version) = version else {
            if last_warn.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                last_warn = Some(std::time::Instant::now());
                tracing::warn!(
                    bytes = line.len(),
                    more_since_last = std::mem::take(&mut unwarned),
                    "ignoring a readiness connection without a well-formed READY line"
                );
            } else {
                unwarned += 1;
            }
            continue;
        };
        tracing::debug!(version, "guest ready");
        state.send_replace(GuestState::Ready { version });
        // Nothing more is ever sent; wait for the end of the connection.
        let mut sink = [0u8; 64];
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        tracing::debug!("guest readiness connection closed");
        state.send_replace(GuestState::Gone);
    }
}
