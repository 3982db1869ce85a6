//! nexusd's MCP tools, one module per group. Handlers only translate:
//! parse arguments, call the daemon, render the answer.

mod image;
mod snapshot;
mod vm;

use std::sync::Arc;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::ToolCallContext;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler, tool_handler};
use serde::Serialize;

use crate::daemon::Daemon;

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
}

/// Proxied guest tools are named `<vm>__<tool>`.
pub const PROXY_SEPARATOR: &str = "__";

impl NexusTools {
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

    /// Forwards `<vm>__<tool>` to the VM's guest-mcp.
    async fn proxy(
        &self,
        vm: &str,
        tool: &str,
        request: CallToolRequestParams,
    ) -> Result<CallToolResponse, ErrorData> {
        let client = match self.daemon.guest(vm).await {
            Ok(client) => client,
            Err(e) => {
                return Ok(CallToolResult::error(vec![ContentBlock::text(format!(
                    "cannot reach VM {vm:?}'s tools: {e}"
                ))])
                .into());
            }
        };
        let mut forwarded = CallToolRequestParams::new(tool.to_owned());
        forwarded.arguments = request.arguments;
        match client.call_tool(forwarded).await {
            Ok(result) => Ok(result.into()),
            Err(rmcp::ServiceError::McpError(e)) => Err(e),
            Err(e) => Ok(CallToolResult::error(vec![ContentBlock::text(format!(
                "VM {vm:?}'s guest did not answer {tool}: {e}"
            ))])
            .into()),
        }
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
        Ok(ListToolsResult::with_all_items(tools))
    }

    async fn call_tool(
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
            return self.proxy(&vm, &tool, request).await;
        }
        Err(ErrorData::invalid_params(
            format!(
                "unknown tool {:?}: nexusd's tools are listed by tools/list; a VM's own tools are named VM__TOOL",
                request.name
            ),
            None,
        ))
    }

    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("nexusd", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Nexus gives each agent its own microVM. spawn_vm makes one (list_images shows \
                 what it can be made from); list_vms, vm_info, stop_vm, start_vm, destroy_vm and \
                 vm_console manage them.",
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
