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
use rmcp::model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{ServerHandler, tool_handler};
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::limits::Limits;
use crate::procs::ProcessTable;

/// State shared by every connection of one guest-mcp.
pub struct Shared {
    pub limits: Limits,
    /// Default working directory and base of relative paths.
    pub workdir: Option<PathBuf>,
    pub processes: Arc<ProcessTable>,
    pub exec_slots: Arc<Semaphore>,
}

impl Shared {
    pub fn new(
        limits: Limits,
        workdir: Option<PathBuf>,
        process_state: Option<PathBuf>,
    ) -> Arc<Self> {
        Arc::new(Self {
            exec_slots: Arc::new(Semaphore::new(limits.max_concurrent_execs)),
            processes: ProcessTable::new(limits.clone(), process_state),
            limits,
            workdir,
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

    fn workdir(&self) -> Option<&std::path::Path> {
        self.shared.workdir.as_deref()
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for GuestTools {
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

/// A successful tool result: `value` as structured content, `text` for
/// people and models that read text.
pub(crate) fn done<T: Serialize>(
    value: &T,
    text: impl Into<String>,
) -> Result<CallToolResult, String> {
    let json = serde_json::to_value(value)
        .map_err(|e| format!("internal error rendering the result: {e}"))?;
    let mut result = CallToolResult::structured(json);
    result.content = vec![ContentBlock::text(text.into())];
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
