//! nexusd's MCP tools, one module per group. Handlers only translate:
//! parse arguments, call the daemon, render the answer. Each running VM's
//! guest tools are proxied as `<vm>__<tool>`.

mod image;
mod snapshot;
mod vm;

use std::sync::Arc;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::ToolCallContext;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ClientRequest, ContentBlock,
    Implementation, ListToolsResult, PaginatedRequestParams, Request, ServerCapabilities,
    ServerConfig, ServerResult, SubscriptionFilter, Tool,
};
use rmcp::service::{NotificationContext, PeerRequestOptions, RequestContext, SubscriptionContext};
use rmcp::{ErrorData, RoleServer, ServerHandler, tool_handler};
use serde::Serialize;

use crate::daemon::{Daemon, GuestSession};
use crate::metrics::Outcome;

/// Proxied guest tools are named `<vm>__<tool>`.
pub const PROXY_SEPARATOR: &str = "__";
/// How long a client may cache `tools/list`.
pub const TOOLS_TTL_MS: u64 = 2000;

#[derive(Clone)]
pub struct NexusTools {
    daemon: Arc<Daemon>,
    tool_router: ToolRouter<Self>,
}

impl NexusTools {
    pub fn new(daemon: Arc<Daemon>) -> Self {
        Self {
            daemon,
            tool_router: Self::vm_router() + Self::snapshot_router() + Self::image_router(),
        }
    }

    /// Each running VM's guest tools, renamed `<vm>__<tool>`, schemas as
    /// the guest gives them. A VM whose guest does not answer is skipped.
    async fn guest_tools(&self) -> Vec<Tool> {
        let mut tools = Vec::new();
        for vm in self.daemon.running_names().await {
            let listed = match self.daemon.guest(&vm).await {
                Ok(client) => client.list_all_tools().await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match listed {
                Ok(list) => tools.extend(list.into_iter().map(|mut t| {
                    t.name = format!("{vm}{PROXY_SEPARATOR}{}", t.name).into();
                    t.description = t.description.map(|d| format!("[VM {vm}] {d}").into());
                    t
                })),
                Err(why) => tracing::warn!(vm, why, "guest tools unavailable"),
            }
        }
        tools
    }

    /// Forwards `<vm>__<tool>` to the VM's guest-mcp: the guest's progress
    /// goes back to the caller, and a cancelled call cancels the guest's
    /// work (for exec: its process group is killed).
    async fn proxy(
        &self,
        vm: &str,
        tool: &str,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let failed = |why: String| Ok(CallToolResult::error(vec![ContentBlock::text(why)]).into());
        let client = match self.daemon.guest(vm).await {
            Ok(client) => client,
            Err(e) => return failed(format!("cannot reach VM {vm:?}'s tools: {e}")),
        };
        let mut forwarded = CallToolRequestParams::new(tool.to_owned());
        forwarded.arguments = request.arguments;
        let send = |client: Arc<GuestSession>, params: CallToolRequestParams| async move {
            let sent = client
                .send_cancellable_request(
                    ClientRequest::CallToolRequest(Request::new(params)),
                    PeerRequestOptions::no_options(),
                )
                .await;
            (client, sent)
        };
        let (mut client, mut sent) = send(client, forwarded.clone()).await;
        if matches!(sent, Err(rmcp::ServiceError::TransportClosed)) {
            // guest-mcp restarted under a session we had not yet seen close.
            match self.daemon.reconnect_guest(vm).await {
                Ok(fresh) => (client, sent) = send(fresh, forwarded).await,
                Err(e) => return failed(format!("cannot reach VM {vm:?}'s tools: {e}")),
            }
        }
        let mut handle = match sent {
            Ok(handle) => handle,
            Err(e) => return failed(format!("VM {vm:?}'s guest did not take {tool}: {e}")),
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let route = client.service().route(handle.progress_token.clone(), tx);
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
        let answer = tokio::select! {
            answer = &mut handle.rx => Some(answer),
            () = context.ct.cancelled() => None,
        };
        // Closing the route ends the forwarder once it has sent everything
        // the guest reported, so all progress goes out before the result.
        drop(route);
        if let Some(forwarder) = forwarder {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), forwarder).await;
        }
        match answer {
            None => {
                let _ = handle
                    .cancel(Some("cancelled by nexusd's client".into()))
                    .await;
                failed(format!("{vm}{PROXY_SEPARATOR}{tool} was cancelled"))
            }
            Some(Ok(Ok(ServerResult::CallToolResult(result)))) => Ok(result.into()),
            Some(Ok(Ok(other))) => failed(format!(
                "VM {vm:?}'s guest answered {tool} oddly: {other:?}"
            )),
            Some(Ok(Err(rmcp::ServiceError::McpError(e)))) => Err(e),
            Some(Ok(Err(e))) => failed(format!("VM {vm:?}'s guest did not answer {tool}: {e}")),
            Some(Err(_)) => failed(format!("VM {vm:?}'s guest went away during {tool}")),
        }
    }
}

impl NexusTools {
    async fn dispatch(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        if self.tool_router.has_route(&request.name) {
            return self
                .tool_router
                .call(ToolCallContext::new(self, request, context))
                .await;
        }
        if let Some((vm, tool)) = request.name.split_once(PROXY_SEPARATOR) {
            let (vm, tool) = (vm.to_owned(), tool.to_owned());
            return self.proxy(&vm, &tool, request, context).await;
        }
        Err(ErrorData::invalid_params(
            format!(
                "unknown tool {:?}: nexusd's tools are listed by tools/list; a VM's own tools are named VM__TOOL",
                request.name
            ),
            None,
        ))
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for NexusTools {
    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let mut tools = self.tool_router.list_all();
        tools.extend(self.guest_tools().await);
        // Tools come and go with VMs: a client that does not listen for
        // changes should not cache the list for long.
        Ok(ListToolsResult::with_all_items(tools).with_ttl_ms(TOOLS_TTL_MS))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let tool = request.name.clone();
        let started = std::time::Instant::now();
        let response = self.dispatch(request, context).await;
        let outcome = match &response {
            Ok(CallToolResponse::Complete(r)) if r.is_error == Some(true) => Outcome::ToolError,
            Ok(_) => Outcome::Ok,
            Err(_) => Outcome::ProtocolError,
        };
        self.daemon
            .metrics()
            .record_call(&tool, outcome, started.elapsed());
        response
    }

    /// 2026-07-28 clients learn of tool list changes on a
    /// `subscriptions/listen` stream.
    fn accepted_subscription_filter(
        &self,
        _requested: &SubscriptionFilter,
    ) -> Option<SubscriptionFilter> {
        // The SDK intersects this with what was requested and advertised.
        Some(SubscriptionFilter::builder().tools_list_changed().build())
    }

    async fn listen(&self, context: SubscriptionContext) -> Result<(), ErrorData> {
        let mut changes = self.daemon.subscribe_changes();
        loop {
            tokio::select! {
                () = context.cancelled() => return Ok(()),
                changed = changes.recv() => {
                    if matches!(changed, Err(tokio::sync::broadcast::error::RecvError::Closed))
                        || context.sink().notify_tool_list_changed().await.is_err()
                    {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Tells a legacy (2025-11-25) session's client whenever VMs (and so
    /// tools) come and go.
    async fn on_initialized(&self, context: NotificationContext<RoleServer>) {
        let mut changes = self.daemon.subscribe_changes();
        let peer = context.peer;
        tokio::spawn(async move {
            while changes.recv().await.is_ok() {
                if peer.notify_tool_list_changed().await.is_err() {
                    break;
                }
            }
        });
    }

    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tool_list_changed()
                .build(),
        )
        .with_server_info(Implementation::new("nexusd", env!("CARGO_PKG_VERSION")))
        .with_instructions(
            "Nexus gives each agent its own microVM. spawn_vm makes one (list_images shows \
                 what it can be made from); each running VM's own tools (exec, files, processes) \
                 appear as VM__TOOL. snapshot_drive, restore_snapshot and fork_vm checkpoint, roll \
                 back and branch a VM's workspace.",
        )
    }
}

/// A result as structured content plus a readable text.
fn done<T: Serialize>(value: &T, text: impl Into<String>) -> Result<CallToolResult, String> {
    let json = serde_json::to_value(value).map_err(|e| format!("internal error: {e}"))?;
    let mut result = CallToolResult::success(vec![ContentBlock::text(text.into())]);
    result.structured_content = Some(json);
    Ok(result)
}
