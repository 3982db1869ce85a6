//! Snapshots: snapshot_drive, list_snapshots, restore_snapshot,
//! delete_snapshot, fork_vm.

use nexus_storage::SnapshotInfo;
use rmcp::RoleServer;
use rmcp::handler::server::common::schema_for_output;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::CallToolResult;
use rmcp::service::RequestContext;
use rmcp::{tool, tool_router};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{NexusTools, done};
use crate::daemon::VmInfo;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotParams {
    /// The VM to snapshot.
    pub vm: String,
    /// Which drive a restore brings back: "workspace" (default) or "root".
    #[serde(default)]
    pub drive: Option<String>,
    /// Name for the snapshot (default: one made from the time).
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListSnapshotsParams {
    /// Only this VM's snapshots (default: every VM's).
    #[serde(default)]
    pub vm: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRef {
    /// The VM the snapshot belongs to.
    pub vm: String,
    /// The snapshot's name.
    pub snapshot: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkParams {
    /// The VM to fork.
    pub vm: String,
    /// Its snapshot to fork from (list_snapshots shows them); none: a
    /// snapshot of its workspace is taken now.
    #[serde(default)]
    pub snapshot: Option<String>,
    /// Name for the new VM (default: vm-N); with `count`, the forks are
    /// NAME-1 to NAME-count.
    #[serde(default)]
    pub name: Option<String>,
    /// How many forks to make, each its own VM (1 to 16; default 1).
    #[serde(default)]
    pub count: Option<u32>,
}

/// What fork_vm made: the first fork's fields, the snapshot they came
/// from, and every fork.
#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct Forked {
    #[serde(flatten)]
    pub first: VmInfo,
    /// The snapshot of `vm` the forks were made from (when none was
    /// named: the one taken for them, deleted once they exist).
    pub snapshot: String,
    /// Every fork, in order.
    pub vms: Vec<VmInfo>,
}

pub use nexus_types::{Snapshot, SnapshotList};

fn snapshot(s: SnapshotInfo) -> Snapshot {
    let (parent_vm, parent_snapshot) = crate::daemon::split_reference(s.parent.as_deref());
    Snapshot {
        vm: s.vm,
        name: s.name,
        drive: s.drive,
        created_at: s.created_at,
        size_bytes: s.size_bytes,
        parent_vm: parent_vm.map(str::to_owned),
        parent_snapshot: parent_snapshot.map(str::to_owned),
    }
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Deleted {
    pub vm: String,
    pub snapshot: String,
}

#[tool_router(router = snapshot_router, vis = "pub(super)")]
impl NexusTools {
    #[tool(
        description = "Take a read-only snapshot of a VM's drives in milliseconds. A running VM's /workspace is frozen around it, so the snapshot is consistent. Works on stopped VMs too.",
        output_schema = schema_for_output::<Snapshot>()
    )]
    async fn snapshot_drive(
        &self,
        Parameters(p): Parameters<SnapshotParams>,
    ) -> Result<CallToolResult, String> {
        let snap = self
            .daemon
            .snapshot(&p.vm, p.drive, p.name)
            .await
            .map_err(super::errors::shown)?;
        let text = format!(
            "snapshot {}/{} of drive {} taken",
            snap.vm, snap.name, snap.drive
        );
        done(&snapshot(snap), text)
    }

    #[tool(description = "List snapshots, oldest first.", output_schema = schema_for_output::<SnapshotList>())]
    async fn list_snapshots(
        &self,
        Parameters(p): Parameters<ListSnapshotsParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, String> {
        let caller = self.caller(&ctx)?;
        let snapshots: Vec<Snapshot> = self
            .daemon
            .list_snapshots(p.vm)
            .await
            .map_err(super::errors::shown)?
            .into_iter()
            .map(snapshot)
            .filter(|s| self.daemon.reach(&caller, &s.vm).is_ok())
            .collect();
        let text = if snapshots.is_empty() {
            "no snapshots".to_owned()
        } else {
            snapshots
                .iter()
                .map(|s| format!("{}/{} ({}, {})", s.vm, s.name, s.drive, s.created_at))
                .collect::<Vec<_>>()
                .join("\n")
        };
        done(&SnapshotList { snapshots }, text)
    }

    #[tool(
        description = "Roll a VM's drive back to a snapshot, in place. A running VM keeps running: its /workspace is unmounted (processes using it are killed), replaced and mounted again, and shows the snapshot's content when this returns.",
        output_schema = schema_for_output::<Snapshot>()
    )]
    async fn restore_snapshot(
        &self,
        Parameters(p): Parameters<SnapshotRef>,
    ) -> Result<CallToolResult, String> {
        let snap = self
            .daemon
            .restore(&p.vm, &p.snapshot)
            .await
            .map_err(super::errors::shown)?;
        let text = format!("{} drive {} restored to {}", snap.vm, snap.drive, snap.name);
        done(&snapshot(snap), text)
    }

    #[tool(description = "Delete a snapshot.", output_schema = schema_for_output::<Deleted>())]
    async fn delete_snapshot(
        &self,
        Parameters(p): Parameters<SnapshotRef>,
    ) -> Result<CallToolResult, String> {
        self.daemon
            .delete_snapshot(&p.vm, &p.snapshot)
            .await
            .map_err(super::errors::shown)?;
        let text = format!("deleted snapshot {}/{}", p.vm, p.snapshot);
        done(
            &Deleted {
                vm: p.vm,
                snapshot: p.snapshot,
            },
            text,
        )
    }

    #[tool(
        description = "Make new VMs from a VM; each then diverges from it. With `snapshot`: each fork gets that snapshot's root and workspace, booted. Without: a consistent snapshot of the VM's /workspace is taken now (frozen for the instant, as snapshot_drive does; the VM runs on) and each fork gets that workspace on a fresh root of the VM's image, like spawn_vm from that snapshot (the snapshot is deleted once the forks exist), so a running VM forks in milliseconds when a warm pool has its shape. Memory is not copied: no process of the VM carries over, each fork's guest starts fresh. `count` makes several at once (all or none).",
        output_schema = schema_for_output::<Forked>()
    )]
    async fn fork_vm(
        &self,
        Parameters(p): Parameters<ForkParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, String> {
        let caller = self.caller(&ctx)?;
        let forked = self
            .daemon
            .fork_many(&p.vm, p.snapshot, p.name, p.count.unwrap_or(1), &caller)
            .await
            .map_err(super::errors::shown)?;
        let names: Vec<&str> = forked.vms.iter().map(|v| v.name.as_str()).collect();
        let text = format!(
            "forked {}/{} into {}",
            p.vm,
            forked.snapshot,
            names.join(", ")
        );
        let first = forked
            .vms
            .first()
            .cloned()
            .ok_or_else(|| "no fork was made".to_owned())?;
        done(
            &Forked {
                first,
                snapshot: forked.snapshot,
                vms: forked.vms,
            },
            text,
        )
    }
}
