//! `list_images`.

use nexus_rootfs::Manifest;
use rmcp::handler::server::common::schema_for_output;
use rmcp::model::CallToolResult;
use rmcp::{tool, tool_router};
use schemars::JsonSchema;
use serde::Serialize;

use super::{NexusTools, done};

/// One image, as `list_images` shows it.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct ImageInfo {
    pub name: String,
    pub kernel_version: String,
    pub guest_mcp_version: String,
    pub built_at: String,
    /// Total bytes of the image's files.
    pub size_bytes: u64,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ImageList {
    pub images: Vec<ImageInfo>,
}

#[tool_router(router = image_router, vis = "pub(super)")]
impl NexusTools {
    #[tool(
        description = "List the guest images VMs can be spawned from: name, kernel version, guest-mcp version, build time and size.",
        output_schema = schema_for_output::<ImageList>()
    )]
    async fn list_images(&self) -> Result<CallToolResult, String> {
        let imported = self.daemon.images().await.map_err(super::errors::shown)?;
        let images: Vec<ImageInfo> = imported
            .into_iter()
            .filter_map(|i| {
                let m: Manifest = serde_json::from_str(&i.manifest)
                    .inspect_err(
                        |e| tracing::warn!(image = i.name, error = %e, "unreadable manifest"),
                    )
                    .ok()?;
                Some(ImageInfo {
                    name: i.name,
                    size_bytes: m.files.values().map(|f| f.size).sum(),
                    kernel_version: m.kernel_version,
                    guest_mcp_version: m.guest_mcp_version,
                    built_at: m.built_at,
                })
            })
            .collect();
        let text = if images.is_empty() {
            "no images: build one with scripts/build-image.sh".to_owned()
        } else {
            images
                .iter()
                .map(|i| {
                    format!(
                        "{} (kernel {}, guest-mcp {})",
                        i.name, i.kernel_version, i.guest_mcp_version
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        done(&ImageList { images }, text)
    }
}
