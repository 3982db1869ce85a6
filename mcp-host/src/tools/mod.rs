//! nexusd's MCP tools, one module per group. Handlers only translate:
//! parse arguments, call the daemon, render the answer.

mod image;
mod vm;

use std::sync::Arc;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{ServerHandler, tool_handler};
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
            tool_router: Self::vm_router() + Self::image_router(),
        }
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for NexusTools {
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
