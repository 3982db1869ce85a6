//! The host-only control channel (vsock port 1023).
//!
//! nexusd talks to this server directly and never proxies it to agents. It
//! holds the operations that affect the whole VM: freezing the workspace
//! for a consistent snapshot, letting go of it for a rollback, flushing,
//! and powering off.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rmcp::handler::server::common::schema_for_output;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{ServerHandler, tool, tool_handler, tool_router};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::freeze::Freezer;
use crate::mounts;
use crate::tools::done;

/// What guest-mcp does when the host asks it to power off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    /// Stop every process and power the VM off (inside a VM).
    Poweroff,
    /// Refuse: guest-mcp runs natively, on a host it must not stop.
    Refuse,
}

#[derive(Clone)]
pub struct ControlTools {
    power: PowerAction,
    freezer: Arc<Freezer>,
    /// Devices of filesystems this guest-mcp unmounted, for `mount`.
    unmounted: Arc<Mutex<HashMap<PathBuf, (PathBuf, String)>>>,
    tool_router: ToolRouter<Self>,
}

const WORKSPACE: &str = "/workspace";
/// The workspace drive: the host attaches root first (vda), workspace
/// second (vdb), and init mounts it as ext4.
const WORKSPACE_DEVICE: &str = "/dev/vdb";

fn workspace() -> String {
    WORKSPACE.into()
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FreezeParams {
    /// Mount point to freeze (default /workspace).
    #[serde(default = "workspace")]
    pub mount: String,
    /// Thaw automatically after this many seconds if nobody does (default 30, at most 600).
    #[serde(default = "thirty")]
    pub timeout_s: u64,
}

fn thirty() -> u64 {
    30
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MountParams {
    /// Mount point (default /workspace).
    #[serde(default = "workspace")]
    pub mount: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UnmountParams {
    /// Mount point (default /workspace).
    #[serde(default = "workspace")]
    pub mount: String,
    /// Kill the processes that keep it busy instead of failing.
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemountParams {
    /// Mount point (default /workspace).
    #[serde(default = "workspace")]
    pub mount: String,
    /// Device to mount; by default the one that was mounted there.
    #[serde(default)]
    pub device: Option<String>,
    /// Kill the processes that keep it busy instead of failing.
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DropCachesParams {
    /// 1: page cache, 2: dentries and inodes, 3: both (default).
    #[serde(default = "three")]
    pub level: u8,
}

fn three() -> u8 {
    3
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Outcome {
    pub ok: bool,
    /// What was done, for the log.
    pub detail: String,
}

fn ok(detail: String) -> Result<CallToolResult, String> {
    done(
        &Outcome {
            ok: true,
            detail: detail.clone(),
        },
        detail,
    )
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkParams {
    /// Nexus's CA certificate (PEM), for the trust store.
    #[serde(default)]
    pub ca_pem: Option<String>,
    /// The secrets' placeholders: NEXUS_SECRET_<NAME> variables, every
    /// command's from now on (the whole set: others are dropped).
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
}

#[tool_router]
impl ControlTools {
    pub fn new(power: PowerAction) -> Self {
        Self {
            power,
            freezer: Freezer::new(),
            unmounted: Arc::default(),
            tool_router: Self::tool_router(),
        }
    }

    #[tool(description = "Flush every filesystem's dirty data to its disk.", output_schema = schema_for_output::<Outcome>())]
    async fn sync(&self) -> Result<CallToolResult, String> {
        tokio::task::spawn_blocking(nix::unistd::sync)
            .await
            .map_err(|e| e.to_string())?;
        ok("synced".into())
    }

    #[tool(
        description = "Freeze a filesystem (FIFREEZE) so the host can take a consistent snapshot; it thaws by itself after timeout_s if thaw never comes.",
        output_schema = schema_for_output::<Outcome>()
    )]
    async fn freeze(
        &self,
        Parameters(p): Parameters<FreezeParams>,
    ) -> Result<CallToolResult, String> {
        let mount = PathBuf::from(&p.mount);
        let freezer = self.freezer.clone();
        // FIFREEZE syncs the filesystem first: blocking work.
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let _guard = handle.enter();
            freezer.freeze(&mount, p.timeout_s)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        ok(format!(
            "froze {} (thaws by itself in {} s)",
            p.mount, p.timeout_s
        ))
    }

    #[tool(
        description = "Take the host's network settings: trust Nexus's egress CA, and give every command from now on these secret placeholders.",
        output_schema = schema_for_output::<Outcome>()
    )]
    async fn set_network(
        &self,
        Parameters(p): Parameters<NetworkParams>,
    ) -> Result<CallToolResult, String> {
        // It writes the trust store: a guest-mcp on a host leaves the
        // host's alone.
        if self.power == PowerAction::Refuse {
            return Err(
                "set_network changes the trust store and the environment: only inside a VM".into(),
            );
        }
        let names =
            tokio::task::spawn_blocking(move || crate::network::apply(p.ca_pem.as_deref(), &p.env))
                .await
                .map_err(|e| e.to_string())??;
        ok(format!("network settings taken: {}", names.join(", ")))
    }

    #[tool(description = "Thaw a filesystem frozen with freeze.", output_schema = schema_for_output::<Outcome>())]
    async fn thaw(&self, Parameters(p): Parameters<MountParams>) -> Result<CallToolResult, String> {
        self.freezer
            .thaw(&PathBuf::from(&p.mount))
            .map_err(|e| e.to_string())?;
        ok(format!("thawed {}", p.mount))
    }

    #[tool(
        description = "Drop the kernel's clean caches (1: page cache, 2: dentries and inodes, 3: both).",
        output_schema = schema_for_output::<Outcome>()
    )]
    async fn drop_caches(
        &self,
        Parameters(p): Parameters<DropCachesParams>,
    ) -> Result<CallToolResult, String> {
        if !(1..=3).contains(&p.level) {
            return Err(format!("`level` must be 1, 2 or 3, got {}", p.level));
        }
        let level = p.level;
        tokio::task::spawn_blocking(move || {
            nix::unistd::sync();
            std::fs::write("/proc/sys/vm/drop_caches", format!("{level}\n"))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("writing /proc/sys/vm/drop_caches: {e}"))?;
        ok(format!("dropped caches (level {})", p.level))
    }

    #[tool(
        description = "Unmount a filesystem (default /workspace) and flush its block device's buffers, so the host can replace the drive's content (rollback). Busy is an error unless `force` kills the processes using it.",
        output_schema = schema_for_output::<Outcome>()
    )]
    async fn unmount(
        &self,
        Parameters(p): Parameters<UnmountParams>,
    ) -> Result<CallToolResult, String> {
        let mount = PathBuf::from(&p.mount);
        let (device, fstype) = {
            let mount = mount.clone();
            tokio::task::spawn_blocking(move || mounts::unmount(&mount, p.force))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?
        };
        let detail = format!("unmounted {} ({})", p.mount, device.display());
        self.unmounted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(mount, (device, fstype));
        ok(detail)
    }

    #[tool(
        description = "Mount again a filesystem unmounted with unmount (default /workspace). Already mounted is success; /workspace is known to be /dev/vdb (ext4) even to a guest-mcp that did not unmount it.",
        output_schema = schema_for_output::<Outcome>()
    )]
    async fn mount(
        &self,
        Parameters(p): Parameters<MountParams>,
    ) -> Result<CallToolResult, String> {
        let mount = PathBuf::from(&p.mount);
        // A host finishing a rollback a crash interrupted does not know
        // whether the unmount happened: mounting twice is no error.
        if let Some((device, _)) = mounts::mounted_device(&mount) {
            return ok(format!(
                "{} is already mounted ({})",
                p.mount,
                device.display()
            ));
        }
        let known = self
            .unmounted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&mount)
            .cloned()
            // Unmounted by a guest-mcp since restarted.
            .or_else(|| {
                (mount == Path::new(WORKSPACE))
                    .then(|| (PathBuf::from(WORKSPACE_DEVICE), "ext4".to_owned()))
            });
        let (device, fstype) =
            known.ok_or_else(|| mounts::MountError::NoDevice(p.mount.clone()).to_string())?;
        mounts::mount_at(&device, &mount, &fstype).map_err(|e| e.to_string())?;
        self.unmounted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&mount);
        ok(format!("mounted {} at {}", device.display(), p.mount))
    }

    #[tool(
        description = "Unmount, flush the device's buffers and mount again (default /workspace), so the guest sees the drive's current content.",
        output_schema = schema_for_output::<Outcome>()
    )]
    async fn remount(
        &self,
        Parameters(p): Parameters<RemountParams>,
    ) -> Result<CallToolResult, String> {
        let mount = PathBuf::from(&p.mount);
        let device = p.device.map(PathBuf::from);
        let detail = tokio::task::spawn_blocking(move || {
            let (was, fstype) = mounts::unmount(&mount, p.force)?;
            let device = device.unwrap_or(was);
            mounts::mount_at(&device, &mount, &fstype)?;
            Ok::<_, mounts::MountError>(format!(
                "remounted {} at {}",
                device.display(),
                mount.display()
            ))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        ok(detail)
    }

    #[tool(
        description = "Shut the guest down cleanly: processes are stopped, filesystems synced and the VM powers off. The answer comes before the power goes.",
        output_schema = schema_for_output::<Outcome>()
    )]
    async fn shutdown(&self) -> Result<CallToolResult, String> {
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
                ok("powering off".into())
            }
        }
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for ControlTools {
    async fn call_tool(
        &self,
        request: rmcp::model::CallToolRequestParams,
        context: rmcp::service::RequestContext<rmcp::RoleServer>,
    ) -> Result<rmcp::model::CallToolResponse, rmcp::ErrorData> {
        crate::tools::route(&self.tool_router, self, request, context).await
    }

    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build()).with_server_info(
            Implementation::new("guest-mcp-control", env!("CARGO_PKG_VERSION")),
        )
    }
}
