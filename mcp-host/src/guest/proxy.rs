//! Forwarding one tool call to a VM's guest-mcp: the guest's progress goes
//! back to the caller, a cancelled call cancels the guest's work (for exec:
//! its process group is killed), and the answer is re-expressed for the
//! caller's protocol era.

use std::sync::Arc;
use std::time::Duration;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ClientRequest, ContentBlock,
    JsonObject, Request, ResultType, ServerResult,
};
use rmcp::service::{PeerRequestOptions, RequestContext};
use rmcp::{ErrorData, RoleServer};

use super::{GuestSession, Guests};

/// How long progress still in flight may hold up a finished call's answer.
const PROGRESS_DRAIN: Duration = Duration::from_secs(2);
/// A call's deadline past its own (`timeout_s`, `wait_ms`), for the guest
/// to answer; and the deadline of a call that names none.
const DEADLINE_MARGIN: Duration = Duration::from_secs(15);
const DEFAULT_DEADLINE: Duration = Duration::from_secs(120);
/// The longest own deadline honoured (guest-mcp's longest exec timeout).
const MAX_OWN_DEADLINE: Duration = Duration::from_secs(3600);
/// The largest result passed on: one MCP message is at most 16 MiB on
/// every transport clients use.
pub const MAX_RESULT_BYTES: usize = 15 << 20;

/// Calls `tool` with `arguments` in VM `vm`'s guest for the caller of
/// `context`. Failures the caller can act on are tool errors; protocol
/// errors from the guest (bad arguments) stay protocol errors.
pub async fn call(
    guests: &Guests,
    vm: &str,
    tool: &str,
    arguments: Option<JsonObject>,
    context: RequestContext<RoleServer>,
) -> Result<CallToolResponse, ErrorData> {
    let failed = |why: String| Ok(CallToolResult::error(vec![ContentBlock::text(why)]).into());
    let session = match guests.session(vm, super::CALL_WAIT).await {
        Ok(session) => session,
        Err(e) => return failed(e.to_string()),
    };
    if !session.has_tool(tool) {
        let names: Vec<&str> = session.tools().iter().map(|t| t.name.as_ref()).collect();
        return Err(ErrorData::invalid_params(
            format!(
                "VM {vm:?} has no tool {tool:?}; its tools are: {}",
                names.join(", ")
            ),
            None,
        ));
    }
    let mut forwarded = CallToolRequestParams::new(tool.to_owned());
    forwarded.arguments = arguments;
    let send = |session: Arc<GuestSession>, params: CallToolRequestParams| async move {
        let sent = session
            .service
            .send_cancellable_request(
                ClientRequest::CallToolRequest(Request::new(params)),
                PeerRequestOptions::no_options(),
            )
            .await;
        (session, sent)
    };
    let deadline = deadline(forwarded.arguments.as_ref());
    let (mut session, mut sent) = send(session, forwarded.clone()).await;
    if matches!(sent, Err(rmcp::ServiceError::TransportClosed)) {
        // guest-mcp restarted under a session we had not yet seen close.
        match guests.reopen(vm, &session, super::CALL_WAIT).await {
            Ok(fresh) => (session, sent) = send(fresh, forwarded).await,
            Err(e) => return failed(e.to_string()),
        }
    }
    let mut handle = match sent {
        Ok(handle) => handle,
        Err(e) => {
            return failed(format!(
                "VM {vm:?}'s guest did not take {tool}: {}",
                super::checks::reason(&e.to_string())
            ));
        }
    };
    let (route, mut rx) = session.events.route(handle.progress_token.clone());
    let forwarder = context.meta.get_progress_token().map(|upstream| {
        let peer = context.peer.clone();
        tokio::spawn(async move {
            while let Some(mut progress) = rx.recv().await {
                progress.progress_token = upstream.clone();
                if peer.notify_progress(progress).await.is_err() {
                    break;
                }
            }
        })
    });
    let mut paused = false;
    let answer = tokio::select! {
        answer = &mut handle.rx => Some(Some(answer)),
        () = context.ct.cancelled() => None,
        () = tokio::time::sleep(deadline) => Some(None),
        // A paused guest answers nothing: the caller hears so now, and
        // the guest is not held unresponsive for it.
        () = guests.paused(vm) => {
            paused = true;
            None
        }
    };
    // Everything the guest reported before its answer is in the route's
    // queue (the tap routes progress as it is read); closing the route ends
    // the forwarder once it has sent all of it, so all progress goes out
    // before the result.
    drop(route);
    if let Some(forwarder) = forwarder {
        let _ = tokio::time::timeout(PROGRESS_DRAIN, forwarder).await;
    }
    match answer {
        None => {
            // A wedged guest does not read the cancellation either (a
            // paused one reads it when resumed).
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                handle.cancel(Some("cancelled by nexusd's client".into())),
            )
            .await;
            if paused {
                return failed(format!(
                    "VM {vm:?} was paused while {tool} ran: the call was cancelled; call it again after resume_vm {vm}"
                ));
            }
            failed(format!("{tool} in VM {vm:?} was cancelled"))
        }
        Some(None) => {
            let why = format!("did not answer {tool} within {deadline:?}");
            guests.unresponsive(vm, &session, why.clone());
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                handle.cancel(Some("no answer within nexusd's deadline".into())),
            )
            .await;
            failed(format!(
                "VM {vm:?}'s guest {why}; the call was cancelled in the guest"
            ))
        }
        Some(Some(Ok(Ok(ServerResult::CallToolResult(result))))) => {
            let size = serde_json::to_vec(&result).map_or(usize::MAX, |v| v.len());
            if size > MAX_RESULT_BYTES {
                return failed(format!(
                    "VM {vm:?}'s guest answered {tool} with {size} bytes, more than the {MAX_RESULT_BYTES} one message to a client may hold: ask for less (smaller max_output_bytes, a byte range, process_output in chunks)"
                ));
            }
            Ok(for_caller(result).into())
        }
        Some(Some(Ok(Ok(_)))) => failed(format!(
            "VM {vm:?}'s guest answered {tool} with something other than a tool result"
        )),
        // The guest's protocol error (bad arguments), its text bounded and
        // its data left behind.
        Some(Some(Ok(Err(rmcp::ServiceError::McpError(e))))) => Err(ErrorData::new(
            e.code,
            super::checks::bounded_text(&e.message, 2000),
            None,
        )),
        Some(Some(Ok(Err(e)))) => failed(format!(
            "VM {vm:?}'s guest did not answer {tool}: {}",
            super::checks::reason(&e.to_string())
        )),
        Some(Some(Err(_))) => failed(format!("VM {vm:?}'s guest went away during {tool}")),
    }
}

/// How long a call may take: its own deadline (an exec's `timeout_s`, a
/// long poll's `wait_ms`) and a margin, or [`DEFAULT_DEADLINE`].
fn deadline(arguments: Option<&JsonObject>) -> Duration {
    let own = arguments.and_then(|args| {
        let seconds = args.get("timeout_s").and_then(serde_json::Value::as_u64);
        let millis = args.get("wait_ms").and_then(serde_json::Value::as_u64);
        match (seconds, millis) {
            (Some(s), _) => Some(Duration::from_secs(s)),
            (None, Some(ms)) => Some(Duration::from_millis(ms)),
            (None, None) => None,
        }
    });
    match own {
        Some(own) => own.min(MAX_OWN_DEADLINE) + DEADLINE_MARGIN,
        None => DEFAULT_DEADLINE,
    }
}

/// The guest's result as nexusd's own: the guest session may be of the
/// older era (no `resultType`), the caller of either. A complete result
/// carries `resultType: "complete"`, which rmcp removes again for callers
/// of the 2025-11-25 era, so each caller gets its own era's shape.
pub fn for_caller(mut result: CallToolResult) -> CallToolResult {
    result.result_type = Some(ResultType::COMPLETE);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_of_the_older_era_becomes_complete_for_every_caller() {
        let legacy: CallToolResult =
            serde_json::from_value(serde_json::json!({"content": [], "isError": false}))
                .expect("a 2025-11-25 tool result");
        assert_eq!(legacy.result_type, None);
        let mine = for_caller(legacy);
        let wire =
            serde_json::to_value(ServerResult::CallToolResult(mine.clone())).expect("serialisable");
        assert_eq!(wire["resultType"], "complete");
        let mut old = ServerResult::CallToolResult(mine);
        old.strip_result_type_for_legacy_peer();
        let wire = serde_json::to_value(old).expect("serialisable");
        assert!(wire.get("resultType").is_none(), "{wire}");
    }
}
