//! The agent-facing tool server (vsock port 1024).

use std::sync::Arc;

use rmcp::handler::server::{router::tool::ToolRouter, wrapper::Parameters};
use rmcp::model::{Implementation, ServerCapabilities, ServerConfig};
use rmcp::service::RequestContext;
use rmcp::{Json, RoleServer, ServerHandler, tool, tool_handler, tool_router};

use crate::exec::{self, ExecLimits, ExecRequest, ExecResult};

/// guest-mcp's tools. Cheap to clone: one per MCP connection.
#[derive(Clone)]
pub struct GuestTools {
    limits: Arc<ExecLimits>,
    tool_router: ToolRouter<Self>,
}

#[tool_router]
impl GuestTools {
    pub fn new(limits: ExecLimits) -> Self {
        Self {
            limits: Arc::new(limits),
            tool_router: Self::tool_router(),
        }
    }

    /// Runs a command to completion and returns its exit status and output.
    #[tool(
        description = "Run a command in the VM and wait for it to finish. Give `command` (run by /bin/sh -c) or `argv`. Returns exit_code or signal, stdout, stderr (base64 when not UTF-8, see *_encoding), truncation flags, timed_out and duration_ms. The command's whole process group is killed when it ends, times out or is cancelled: use background processes for servers."
    )]
    async fn exec(
        &self,
        Parameters(req): Parameters<ExecRequest>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<Json<ExecResult>, String> {
        exec::run(req, &self.limits, ctx.ct)
            .await
            .map(Json)
            .map_err(|e| e.to_string())
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for GuestTools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("guest-mcp", env!("CARGO_PKG_VERSION")))
            .with_instructions("The agent's own Linux computer: run commands with `exec`.")
    }
}
