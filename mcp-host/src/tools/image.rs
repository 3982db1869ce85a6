//! Images: list_images, build_image, import_image, pull_image,
//! delete_image.

use std::path::PathBuf;

use nexus_rootfs::Manifest;
use nexus_storage::ImageChange;
use rmcp::RoleServer;
use rmcp::handler::server::common::schema_for_output;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ProgressNotificationParam};
use rmcp::service::RequestContext;
use rmcp::{tool, tool_router};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{NexusTools, done};
use crate::daemon::{ImageInput, ImageOutcome, Progress};

/// One image, as the image tools show it.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct ImageInfo {
    pub name: String,
    /// `sha256:HEX` over its files: which version new VMs get.
    pub digest: String,
    /// What it was made from: a recipe, an OCI layout or archive, an
    /// image directory.
    pub source: String,
    /// Its root: "busybox", "debian SUITE", or "oci sha256:..." (the OCI
    /// image's manifest digest).
    pub userland: String,
    pub kernel_version: String,
    pub guest_mcp_version: String,
    pub built_at: String,
    /// When this version became the image's.
    pub imported_at: String,
    /// Total logical bytes of its files (the root filesystem is sparse).
    pub size_bytes: u64,
    /// Bytes its files take on disk.
    pub disk_bytes: u64,
    /// The environment commands start with.
    pub env: std::collections::BTreeMap<String, String>,
    /// Where commands start.
    pub workdir: String,
    /// VMs made from it (any version).
    pub vms: Vec<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ImageList {
    pub images: Vec<ImageInfo>,
}

/// What build_image and import_image did.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ImageMade {
    pub image: ImageInfo,
    /// "added", "replaced" or "unchanged".
    pub change: String,
    /// The version it replaced, if it did.
    pub previous_digest: Option<String>,
    /// VMs that keep booting the replaced version.
    pub kept_for: Vec<String>,
    pub seconds: f64,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildImageParams {
    /// The image's name: 1-63 of a-z, 0-9 and '-'. An existing image of
    /// that name is replaced for new VMs; its VMs keep their version.
    pub name: String,
    /// The recipe, as TOML: `base` (a Debian suite, e.g. "bookworm"),
    /// `packages`, `files` ([[files]] path/content/mode), `run` (commands
    /// run as root at build time), `env`, `workdir`, `rootfs_mib`. Without
    /// `base`: busybox only.
    pub recipe: String,
    /// The image whose kernel and guest-mcp it gets (default: "default",
    /// else "minimal").
    #[serde(default)]
    pub base: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportImageParams {
    /// The image's name: 1-63 of a-z, 0-9 and '-'. An existing image of
    /// that name is replaced for new VMs; its VMs keep their version.
    pub name: String,
    /// An absolute path on nexusd's host: an OCI image layout directory,
    /// an image archive (`docker save`, `skopeo copy ... oci-archive:`),
    /// or a built Nexus image directory (with manifest.json).
    pub path: String,
    /// For OCI images: the image whose kernel and guest-mcp it gets
    /// (default: "default", else "minimal").
    #[serde(default)]
    pub base: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PullImageParams {
    /// The image's name: 1-63 of a-z, 0-9 and '-'. An existing image of
    /// that name is replaced for new VMs; its VMs keep their version.
    pub name: String,
    /// The image reference: REGISTRY/REPOSITORY[:TAG][@sha256:DIGEST]
    /// (e.g. "registry.example:5000/team/tools:1.2").
    pub reference: String,
    /// Speak plain HTTP to the registry (one on loopback); default HTTPS.
    #[serde(default)]
    pub plain_http: bool,
    /// The image whose kernel and guest-mcp it gets (default: "default",
    /// else "minimal").
    #[serde(default)]
    pub base: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteImageParams {
    /// The image to delete (refused while VMs use it).
    pub image: String,
}

#[tool_router(router = image_router, vis = "pub(super)")]
impl NexusTools {
    #[tool(
        description = "List the guest images VMs can be spawned from: name, digest (the version new VMs get), source, userland, kernel and guest-mcp versions, size, environment, and the VMs made from each.",
        output_schema = schema_for_output::<ImageList>()
    )]
    async fn list_images(&self) -> Result<CallToolResult, String> {
        let imported = self.daemon.images().await.map_err(super::errors::shown)?;
        let mut images = Vec::new();
        for image in imported {
            let vms = self
                .daemon
                .image_users(&image.name)
                .await
                .map_err(super::errors::shown)?;
            if let Some(info) = view(&image, vms) {
                images.push(info);
            }
        }
        let text = if images.is_empty() {
            "no images: build one with build_image or scripts/build-image.sh".to_owned()
        } else {
            images.iter().map(line).collect::<Vec<_>>().join("\n")
        };
        done(&ImageList { images }, text)
    }

    #[tool(
        description = "Build an image from a recipe (TOML: a Debian suite and packages, files, build commands, environment), with the kernel and guest-mcp of a base image; progress lines are sent as progress notifications. An unchanged recipe rebuilds in seconds. Admins only: recipe commands run as root on the host at build time.",
        output_schema = schema_for_output::<ImageMade>()
    )]
    async fn build_image(
        &self,
        Parameters(p): Parameters<BuildImageParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, String> {
        self.make(&ctx, &p.name, ImageInput::Recipe(p.recipe), p.base)
            .await
    }

    #[tool(
        description = "Import an image from a path on nexusd's host: an OCI image layout, an image archive (docker save or oci-archive) or a built Nexus image directory. OCI layers are applied in order (whiteouts, opaque directories; paths leaving the root refused) and the image's Env and WorkingDir become every command's; the kernel and guest-mcp come from a base image. Admins only.",
        output_schema = schema_for_output::<ImageMade>()
    )]
    async fn import_image(
        &self,
        Parameters(p): Parameters<ImportImageParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, String> {
        self.make(
            &ctx,
            &p.name,
            ImageInput::Path(PathBuf::from(p.path)),
            p.base,
        )
        .await
    }

    #[tool(
        description = "Pull an image from an OCI registry (anonymously) and make it a VM image: its linux/amd64 variant, layers applied in order, its Env and WorkingDir every command's; the kernel and guest-mcp come from a base image. The image's OCI manifest digest is its userland (`oci sha256:...`). Admins only.",
        output_schema = schema_for_output::<ImageMade>()
    )]
    async fn pull_image(
        &self,
        Parameters(p): Parameters<PullImageParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, String> {
        let input = ImageInput::Reference {
            reference: p.reference,
            plain_http: p.plain_http,
        };
        self.make(&ctx, &p.name, input, p.base).await
    }

    #[tool(
        description = "Delete an image and every version of it; refused while any VM (with its snapshots) uses it, naming them. Admins only."
    )]
    async fn delete_image(
        &self,
        Parameters(p): Parameters<DeleteImageParams>,
    ) -> Result<CallToolResult, String> {
        self.daemon
            .delete_image(&p.image)
            .await
            .map_err(super::errors::shown)?;
        done(
            &serde_json::json!({"deleted": p.image}),
            format!("deleted image {}", p.image),
        )
    }
}

impl NexusTools {
    /// build_image, import_image and pull_image: makes the image, its
    /// progress lines sent as notifications when the caller asked, and
    /// answers with what was made.
    async fn make(
        &self,
        ctx: &RequestContext<RoleServer>,
        name: &str,
        input: ImageInput,
        base: Option<String>,
    ) -> Result<CallToolResult, String> {
        let (progress, forwarder) = progress_lines(ctx);
        let made = self.daemon.make_image(name, input, base, progress).await;
        if let Some(forwarder) = forwarder {
            // The sender went with make_image: the forwarder drains and ends.
            let _ = forwarder.await;
        }
        self.made(made.map_err(super::errors::shown)?).await
    }

    async fn made(&self, outcome: ImageOutcome) -> Result<CallToolResult, String> {
        let vms = self
            .daemon
            .image_users(&outcome.image.name)
            .await
            .map_err(super::errors::shown)?;
        let image = view(&outcome.image, vms)
            .ok_or_else(|| format!("image {} has an unreadable manifest", outcome.image.name))?;
        let (change, previous_digest, kept_for) = match outcome.change {
            ImageChange::Added => ("added", None, Vec::new()),
            ImageChange::Replaced { previous, kept_for } => ("replaced", Some(previous), kept_for),
            ImageChange::Unchanged => ("unchanged", None, Vec::new()),
        };
        let mut text = format!("{change} {} in {:.1} s", line(&image), outcome.seconds);
        if !kept_for.is_empty() {
            text.push_str(&format!(
                "; {} keep the previous version",
                kept_for.join(", ")
            ));
        }
        done(
            &ImageMade {
                image,
                change: change.to_owned(),
                previous_digest,
                kept_for,
                seconds: outcome.seconds,
            },
            text,
        )
    }
}

/// Progress lines of a long image operation as progress notifications,
/// numbered (MCP progress must increase), when the caller asked for them.
fn progress_lines(
    ctx: &RequestContext<RoleServer>,
) -> (Option<Progress>, Option<tokio::task::JoinHandle<()>>) {
    let Some(token) = ctx.meta.get_progress_token() else {
        return (None, None);
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(f64, String)>();
    let peer = ctx.peer.clone();
    let forwarder = tokio::spawn(async move {
        let mut step = 0.0;
        while let Some((_, message)) = rx.recv().await {
            step += 1.0;
            let param = ProgressNotificationParam::new(token.clone(), step).with_message(message);
            if peer.notify_progress(param).await.is_err() {
                break;
            }
        }
    });
    (Some(tx), Some(forwarder))
}

fn view(image: &nexus_storage::ImageInfo, vms: Vec<String>) -> Option<ImageInfo> {
    let m: Manifest = serde_json::from_str(&image.manifest)
        .inspect_err(|e| tracing::warn!(image = image.name, error = %e, "unreadable manifest"))
        .ok()?;
    Some(ImageInfo {
        name: image.name.clone(),
        digest: image.digest.clone(),
        source: image.source.clone(),
        userland: m.userland,
        size_bytes: m.files.values().map(|f| f.size).sum(),
        disk_bytes: image.disk_bytes(),
        kernel_version: m.kernel_version,
        guest_mcp_version: m.guest_mcp_version,
        built_at: m.built_at,
        imported_at: image.imported_at.clone(),
        env: m.env,
        workdir: m.workdir,
        vms,
    })
}

fn line(i: &ImageInfo) -> String {
    format!(
        "{} {} ({}, kernel {}, guest-mcp {}, {} MiB on disk, {} VMs)",
        i.name,
        &i.digest[..i.digest.len().min(19)],
        i.userland,
        i.kernel_version,
        i.guest_mcp_version,
        i.disk_bytes >> 20,
        i.vms.len()
    )
}
