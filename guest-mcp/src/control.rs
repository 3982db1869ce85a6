//! The host-only control channel (vsock port 1023).
//!
//! nexusd talks to this server directly and never proxies it to agents. It
//! holds the operations that affect the whole VM.

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::model::{Implementation, ServerCapabilities, ServerConfig};
use rmcp::{Json, ServerHandler, tool, tool_handler, tool_router};
use schemars::JsonSchema;
use serde::Serialize;

/// What guest-mcp does when the host asks it to power off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    /// Stop every process and power the VM off (inside a VM).
    Poweroff,
    /// Only acknowledge: guest-mcp runs natively, on a host it must not stop.
    Refuse,
}

#[derive(Clone)]
pub struct ControlTools {
    power: PowerAction,
    tool_router: ToolRouter<Self>,
}

/// The answer of `shutdown`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ShutdownResult {
    /// The guest accepted the request and is shutting down.
    pub accepted: bool,
}

/// The answer of `sync`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct SyncResult {
    pub synced: bool,
}

#[tool_router]
impl ControlTools {
    pub fn new(power: PowerAction) -> Self {
        Self {
            power,
            tool_router: Self::tool_router(),
        }
    }

    #[tool(description = "Flush every filesystem's dirty data to its disk.")]
    async fn sync(&self) -> Json<SyncResult> {
        tokio::task::spawn_blocking(nix::unistd::sync).await.ok();
        Json(SyncResult { synced: true })
    }

    #[tool(
        description = "Shut the guest down cleanly: processes are stopped, filesystems synced and the VM powers off. The answer comes before the power goes."
    )]
    async fn shutdown(&self) -> Result<Json<ShutdownResult>, String> {
        match self.power {
            PowerAction::Refuse => {
                Err("this guest-mcp runs outside a VM and will not power its host off".into())
            }
            PowerAction::Poweroff => {
                // Answer first: the reply must leave before the power goes.
                std::thread::spawn(|| {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    crate::power::poweroff(std::time::Duration::from_millis(500));
                });
                Ok(Json(ShutdownResult { accepted: true }))
            }
        }
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for ControlTools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build()).with_server_info(
            Implementation::new("guest-mcp-control", env!("CARGO_PKG_VERSION")),
        )
    }
}
