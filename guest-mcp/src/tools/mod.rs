//! The agent-facing tool server (vsock port 1024).
//!
//! One router per tool group (`exec`, `process`, `files`, `system`), joined
//! into one. Handlers only translate: they parse arguments, call the core
//! module, and render a structured result with a readable text summary.
//! Failures the model should act on come back as tool errors (`isError`)
//! whose message names the argument at fault.

mod exec;
mod files;
mod process;
mod system;

use std::path::PathBuf;
use std::sync::Arc;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::ToolCallContext;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler, tool_handler};
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::limits::Limits;
use crate::procs::ProcessTable;
use crate::trees::Trees;

/// State shared by every connection of one guest-mcp.
pub struct Shared {
    pub limits: Limits,
    /// Default working directory and base of relative paths.
    pub workdir: Option<PathBuf>,
    pub processes: Arc<ProcessTable>,
    pub exec_slots: Arc<Semaphore>,
    /// Where each command's process tree is made.
    pub trees: Arc<Trees>,
}

impl Shared {
    pub fn new(
        limits: Limits,
        trees: Arc<Trees>,
        workdir: Option<PathBuf>,
        process_state: Option<PathBuf>,
    ) -> Arc<Self> {
        Arc::new(Self {
            exec_slots: Arc::new(Semaphore::new(limits.max_concurrent_execs)),
            processes: ProcessTable::new(limits.clone(), trees.clone(), process_state),
            limits,
            workdir,
            trees,
        })
    }
}

/// guest-mcp's tools. Cheap to clone: one per MCP connection.
#[derive(Clone)]
pub struct GuestTools {
    shared: Arc<Shared>,
    tool_router: ToolRouter<Self>,
}

impl GuestTools {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            tool_router: Self::exec_router()
                + Self::process_router()
                + Self::files_router()
                + Self::system_router(),
        }
    }

    /// Every tool's definition (name, description, schemas), as listed.
    pub fn definitions() -> Vec<rmcp::model::Tool> {
        (Self::exec_router()
            + Self::process_router()
            + Self::files_router()
            + Self::system_router())
        .list_all()
    }

    fn workdir(&self) -> Option<&std::path::Path> {
        self.shared.workdir.as_deref()
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for GuestTools {
    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        route(&self.tool_router, self, request, context).await
    }

    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("guest-mcp", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "The agent's own Linux computer. Run commands with exec (or process_start for \
                 servers and long jobs), and work with files with read_file, write_file, \
                 edit_file, list_dir, glob and grep. Relative paths start in /workspace.",
            )
    }
}

/// Dispatches a call, answering an unknown tool name with the names that
/// exist (a protocol error, as MCP specifies for unknown tools).
pub(crate) async fn route<S: Send + Sync + 'static>(
    router: &ToolRouter<S>,
    service: &S,
    request: CallToolRequestParams,
    context: RequestContext<RoleServer>,
) -> Result<CallToolResponse, ErrorData> {
    if !router.has_route(&request.name) {
        let mut names: Vec<String> = router
            .list_all()
            .into_iter()
            .map(|t| t.name.into_owned())
            .collect();
        names.sort();
        return Err(ErrorData::invalid_params(
            format!(
                "unknown tool {:?}: this server has {}",
                request.name,
                names.join(", ")
            ),
            None,
        ));
    }
    router
        .call(ToolCallContext::new(service, request, context))
        .await
}

/// A successful tool result: `value` as structured content, `text` for
/// people and models that read text. (Built by hand: the stock helper also
/// renders the whole JSON as text, a second copy of every large result.)
pub(crate) fn done<T: Serialize>(
    value: &T,
    text: impl Into<String>,
) -> Result<CallToolResult, String> {
    let json = serde_json::to_value(value)
        .map_err(|e| format!("internal error rendering the result: {e}"))?;
    let mut result = CallToolResult::success(vec![ContentBlock::text(text.into())]);
    result.structured_content = Some(json);
    Ok(result)
}

/// Parses an octal permission mode given as text ("644", "0755").
pub(crate) fn parse_mode(arg: &str, mode: Option<&str>) -> Result<Option<u32>, String> {
    mode.map(|m| {
        u32::from_str_radix(m.trim_start_matches("0o"), 8)
            .ok()
            .filter(|v| *v <= 0o7777)
            .ok_or_else(|| {
                format!("`{arg}` {m:?} is not an octal permission mode such as \"0644\"")
            })
    })
    .transpose()
}
