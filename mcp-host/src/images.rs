//! The images in the state directory: one directory each, with a manifest.

use std::path::Path;

use nexus_rootfs::Manifest;
use schemars::JsonSchema;
use serde::Serialize;

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

/// Every image directory under `dir` with a readable manifest; directories
/// without one are skipped with a warning.
pub fn list(dir: &Path) -> Vec<ImageInfo> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut images: Vec<ImageInfo> = entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| match Manifest::load(&e.path()) {
            Ok(m) => Some(ImageInfo {
                name: e.file_name().to_string_lossy().into_owned(),
                size_bytes: m.files.values().map(|f| f.size).sum(),
                kernel_version: m.kernel_version,
                guest_mcp_version: m.guest_mcp_version,
                built_at: m.built_at,
            }),
            Err(err) => {
                tracing::warn!(path = %e.path().display(), error = %err, "skipping image without a valid manifest");
                None
            }
        })
        .collect();
    images.sort_by(|a, b| a.name.cmp(&b.name));
    images
}
