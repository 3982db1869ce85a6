//! nexusd's MCP tools.

use std::path::PathBuf;
use std::sync::Arc;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::model::{Implementation, ServerCapabilities, ServerConfig};
use rmcp::{Json, ServerHandler, tool, tool_handler, tool_router};
use schemars::JsonSchema;
use serde::Serialize;

use crate::images::{self, ImageInfo};

#[derive(Clone)]
pub struct NexusTools {
    images_dir: Arc<PathBuf>,
    tool_router: ToolRouter<Self>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ImageList {
    pub images: Vec<ImageInfo>,
}

#[tool_router]
impl NexusTools {
    pub fn new(images_dir: PathBuf) -> Self {
        Self {
            images_dir: Arc::new(images_dir),
            tool_router: Self::tool_router(),
        }
    }

    #[tool(
        description = "List the guest images VMs can be spawned from: name, kernel version, guest-mcp version, build time and size."
    )]
    async fn list_images(&self) -> Json<ImageList> {
        let dir = self.images_dir.clone();
        let images = tokio::task::spawn_blocking(move || images::list(&dir))
            .await
            .unwrap_or_default();
        Json(ImageList { images })
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for NexusTools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("nexusd", env!("CARGO_PKG_VERSION")))
            .with_instructions("Nexus gives each agent its own microVM. List the images VMs are made from with list_images.")
    }
}
