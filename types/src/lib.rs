//! nexus-types: what nexusd's management tools answer with, as its
//! clients read it (nexusctl), and how a local client reaches the daemon.
//! Types only: no daemon, no I/O. nexusd serializes these (and describes
//! them in its tools' output schemas); clients deserialize them, ignoring
//! fields they do not know, so a newer daemon keeps older clients working.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The admin socket: a local client's way in (its uid is its identity).
pub mod admin {
    /// Where nexusd's admin socket is by default (`<state>/nexusd.sock`).
    pub const DEFAULT_SOCKET: &str = "/var/lib/nexus/nexusd.sock";
    /// `GET` this with `Upgrade: UPGRADE_PROTOCOL` on the admin socket:
    /// after `101`, the connection is one raw MCP session.
    pub const MCP_PATH: &str = "/stdio";
    pub const UPGRADE_PROTOCOL: &str = "nexus-mcp-stdio";
    /// `MCP_PATH?surface=shared|per-vm` picks the tool surface.
    pub const SURFACE_QUERY: &str = "surface";
}

/// A VM as the management tools show it.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct VmInfo {
    pub name: String,
    /// `running`, `paused` (pause_vm) or `stopped`.
    pub state: String,
    pub image: String,
    /// The version of the image it was made from and boots
    /// (`sha256:HEX`; a rebuilt image serves new VMs, not this one).
    pub image_digest: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The VM whose snapshot its workspace came from, if any.
    pub from_vm: Option<String>,
    /// That snapshot.
    pub from_snapshot: Option<String>,
    /// vsock CID while running.
    pub cid: Option<u32>,
    /// Milliseconds from start to guest readiness, while running (for
    /// a VM taken from a warm pool: how long taking it took).
    pub ready_ms: Option<u64>,
    /// While running, how its guest's tools stand: "answering",
    /// "connecting", "paused" (pause_vm; it answers once resumed), or
    /// "unresponsive for N s: why".
    pub guest: Option<String>,
    /// Its own egress allowlist, narrowing its owner's role's; none: the
    /// role's alone.
    pub egress: Option<Vec<String>>,
    /// The identity it belongs to (none: admins only).
    pub owner: Option<String>,
    /// The secrets it may use (grant_secret), by name; it holds only
    /// their placeholders.
    #[serde(default)]
    pub secrets: Vec<String>,
}

/// A secret as tools show it: never its value.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct SecretInfo {
    pub name: String,
    /// Host patterns it may be sent to.
    pub hosts: Vec<String>,
    /// The header it sets (`{secret}` stands for the value), if any.
    pub header: Option<String>,
    /// Basic auth with this user, if so.
    pub basic_user: Option<String>,
    /// What a granted VM holds instead (`NEXUS_SECRET_<NAME>`).
    pub placeholder: String,
    pub env: String,
    /// The VMs granted it.
    pub vms: Vec<String>,
    pub created_at: String,
    pub updated_at: String,
}

/// `list_secrets`' answer.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct SecretList {
    pub secrets: Vec<SecretInfo>,
}

/// A snapshot of one of a VM's drives.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Snapshot {
    pub vm: String,
    pub name: String,
    pub drive: String,
    pub created_at: String,
    /// The drive's logical size in bytes.
    pub size_bytes: u64,
    /// The VM of the snapshot the drive's content came from before, if any.
    pub parent_vm: Option<String>,
    /// That snapshot.
    pub parent_snapshot: Option<String>,
}

/// `list_snapshots`' answer.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct SnapshotList {
    pub snapshots: Vec<Snapshot>,
}

/// `host_status`' answer: what the host runs and holds.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct HostStatus {
    /// nexusd's version.
    pub version: String,
    /// When this nexusd started (RFC 3339) and how long ago, in seconds.
    pub started_at: String,
    pub uptime_s: u64,
    /// The VMM backend ("qemu"), and whether it can start VMs.
    pub backend: String,
    /// Why VMs cannot start, when they cannot (what to install).
    pub backend_problem: Option<String>,
    /// "kvm" or "tcg": what new VMs run with.
    pub accel: String,
    /// Why that one.
    pub accel_reason: String,
    pub pool: PoolStatus,
    pub vms: VmCounts,
    /// What running VMs use, against what the host may hold.
    pub usage: Usage,
    /// The images VMs can be made from, by name.
    pub images: Vec<String>,
    /// The warm pools (`[[warm_pool]]`): spares booted ahead of need.
    #[serde(default)]
    pub warm_pools: Vec<WarmPool>,
}

/// One warm pool: spare VMs of one image and shape, kept booted for
/// spawn_vm and fork_vm to take.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct WarmPool {
    pub image: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub workspace_gib: u64,
    /// How many it keeps.
    pub size: u32,
    /// How many are booted and waiting.
    pub ready: u32,
    /// Whether one is booting now.
    pub booting: bool,
}

/// The storage pool (workspaces, snapshots).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct PoolStatus {
    pub path: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
}

/// VMs by state.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
pub struct VmCounts {
    pub total: u32,
    /// Paused ones included.
    pub running: u32,
    #[serde(default)]
    pub paused: u32,
    pub stopped: u32,
    /// Running VMs whose guest does not answer now.
    pub unresponsive: u32,
}

/// Running VMs' vCPUs and memory, and the limits they count against.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Usage {
    pub vcpus: u32,
    pub max_vcpus: u32,
    pub memory_mib: u64,
    pub max_memory_mib: u64,
    pub max_vms: u32,
}
