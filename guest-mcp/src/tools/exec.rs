//! `exec`: run a command to completion, streaming its output as progress.

use std::time::Duration;

use rmcp::handler::server::common::schema_for_output;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ProgressNotificationParam, ProgressToken};
use rmcp::service::{Peer, RequestContext};
use rmcp::{RoleServer, tool, tool_router};

use super::{GuestTools, done};
use crate::exec::{self, ExecRequest, ExecResult, OutputEncoding, Stream};

/// Progress messages are coalesced over this window.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);
/// The most output one progress message carries, per stream; what a
/// window holds beyond it is not shown (it is in the result).
const PROGRESS_BYTES: usize = 64 << 10;
/// The most of each stream the readable text repeats; the whole kept
/// output is in the structured result, once.
const TEXT_BYTES: usize = 64 << 10;
/// The most a result's structured content may take: one MCP message is
/// at most 16 MiB on every transport, and the text rendering comes too.
const RESULT_BUDGET: usize = 15 << 20;

#[tool_router(router = exec_router, vis = "pub(super)")]
impl GuestTools {
    #[tool(
        description = "Run a command in the VM and wait for it to finish. Give `command` (run by /bin/sh -c) or `argv`. Returns exit_code or signal, stdout, stderr (base64 when not UTF-8, see *_encoding), truncation flags, timed_out and duration_ms. Output is streamed as progress notifications when the request has a progress token. The command's whole process group is killed when it ends, times out or is cancelled: use process_start for servers and background jobs.",
        output_schema = schema_for_output::<ExecResult>()
    )]
    async fn exec(
        &self,
        Parameters(req): Parameters<ExecRequest>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, String> {
        let _slot = self.shared.exec_slots.clone().try_acquire_owned().map_err(|_| {
            format!(
                "{} execs are running already (the limit): wait for one to finish, or use process_start",
                self.shared.limits.max_concurrent_execs
            )
        })?;
        let (observer, forwarder) = match ctx.meta.get_progress_token() {
            Some(token) => {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                (
                    Some(tx),
                    Some(tokio::spawn(forward_progress(ctx.peer.clone(), token, rx))),
                )
            }
            None => (None, None),
        };
        let result = exec::run(
            req,
            &self.shared.limits,
            &self.shared.trees,
            self.workdir(),
            ctx.ct,
            observer,
        )
        .await;
        if let Some(forwarder) = forwarder {
            // Every progress message goes out before the result.
            let _ = forwarder.await;
        }
        let mut result = result.map_err(|e| e.to_string())?;
        exec::fit(&mut result, RESULT_BUDGET - 4 * TEXT_BYTES);
        done(&result, summary(&result))
    }
}

/// A readable rendering: status line, then the output.
fn summary(r: &ExecResult) -> String {
    let status = match (r.exit_code, r.signal, r.timed_out) {
        (_, _, true) => "timed out; process group killed".to_owned(),
        (Some(code), _, _) => format!("exit code {code}"),
        (None, Some(sig), _) => format!("killed by signal {sig}"),
        _ => "ended".to_owned(),
    };
    let mut text = format!("{status} ({} ms)", r.duration_ms);
    for (name, body, encoding, truncated) in [
        ("stdout", &r.stdout, r.stdout_encoding, r.stdout_truncated),
        ("stderr", &r.stderr, r.stderr_encoding, r.stderr_truncated),
    ] {
        if body.is_empty() {
            continue;
        }
        let note = match (encoding, truncated) {
            (OutputEncoding::Base64, true) => " (base64, truncated)",
            (OutputEncoding::Base64, false) => " (base64)",
            (OutputEncoding::Utf8, true) => " (truncated)",
            (OutputEncoding::Utf8, false) => "",
        };
        let mut shown = body.len().min(TEXT_BYTES);
        while !body.is_char_boundary(shown) {
            shown -= 1;
        }
        text.push_str(&format!("\n--- {name}{note} ---\n{}", &body[..shown]));
        if shown < body.len() {
            text.push_str(&format!(
                "\n[... {} more bytes of {name} in the structured result]",
                body.len() - shown
            ));
        }
    }
    text
}

/// Sends output chunks as progress notifications: `progress` counts bytes
/// so far, `message` carries the text (prefixed by its stream).
async fn forward_progress(
    peer: Peer<RoleServer>,
    token: ProgressToken,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(Stream, Vec<u8>)>,
) {
    let mut total = 0u64;
    let mut pending: Vec<(Stream, Vec<u8>)> = Vec::new();
    loop {
        let first = rx.recv().await;
        let closed = first.is_none();
        pending.extend(first);
        if !closed {
            tokio::time::sleep(PROGRESS_EVERY).await;
            while let Ok(more) = rx.try_recv() {
                pending.push(more);
            }
        }
        for stream in [Stream::Stdout, Stream::Stderr] {
            let mut bytes = Vec::new();
            let mut hidden = 0usize;
            for (_, chunk) in pending.iter().filter(|(s, _)| *s == stream) {
                let room = PROGRESS_BYTES.saturating_sub(bytes.len());
                bytes.extend_from_slice(&chunk[..chunk.len().min(room)]);
                hidden += chunk.len().saturating_sub(room);
            }
            if bytes.is_empty() {
                continue;
            }
            total += (bytes.len() + hidden) as u64;
            let name = if stream == Stream::Stdout {
                "stdout"
            } else {
                "stderr"
            };
            let mut message = format!("{name}: {}", String::from_utf8_lossy(&bytes));
            if hidden > 0 {
                message.push_str(&format!("\n[... {hidden} bytes not shown]"));
            }
            let param =
                ProgressNotificationParam::new(token.clone(), total as f64).with_message(message);
            if peer.notify_progress(param).await.is_err() {
                return;
            }
        }
        pending.clear();
        if closed {
            return;
        }
    }
}
