//! `nexusctl snapshot create|ls|restore|rm` and `nexusctl fork`.

use clap::Subcommand;
use nexus_types::{Snapshot, SnapshotList, VmInfo};
use serde_json::{Value, json};

use super::{Out, call, parse};
use crate::connect::Client;
use crate::error::CtlError;
use crate::table::{or_dash, render};

#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// Snapshot a VM's drive (the workspace by default), consistently.
    #[command(after_help = "Example: nexusctl snapshot create agent1 before-upgrade")]
    Create {
        vm: String,
        /// Its name (default: one is picked).
        name: Option<String>,
        /// `workspace` (default) or `root`.
        #[arg(long)]
        drive: Option<String>,
    },
    /// List snapshots, oldest first (one VM's, or all you may reach).
    #[command(alias = "list", after_help = "Example: nexusctl snapshot ls agent1")]
    Ls { vm: Option<String> },
    /// Roll a VM's drive back to a snapshot, in place (running or not).
    #[command(after_help = "Example: nexusctl snapshot restore agent1 before-upgrade")]
    Restore { vm: String, snapshot: String },
    /// Delete a snapshot.
    #[command(
        alias = "delete",
        after_help = "Example: nexusctl snapshot rm agent1 before-upgrade"
    )]
    Rm { vm: String, snapshot: String },
}

/// `nexusctl fork VM [SNAPSHOT [NAME]] [--name NAME] [--count N]`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  nexusctl fork agent1 before-upgrade agent1-try2   (root and workspace of a snapshot)\n  nexusctl fork agent1 --count 5 --name try        (its workspace now: try-1 .. try-5)"
)]
pub struct ForkArgs {
    pub vm: String,
    /// The snapshot to fork from; none: the VM's workspace as it is now
    /// (a snapshot is taken), on a fresh root of its image.
    pub snapshot: Option<String>,
    /// The new VM's name (default: one is picked; with --count, NAME-1
    /// to NAME-N).
    pub name: Option<String>,
    /// The new VM's name, when no snapshot is named.
    #[arg(long = "name", value_name = "NAME", conflicts_with = "name")]
    pub named: Option<String>,
    /// How many forks to make at once (1 to 16), all or none.
    #[arg(long, default_value_t = 1)]
    pub count: u32,
}

fn line(s: &Snapshot) -> String {
    format!(
        "snapshot {}@{} of its {} drive ({} bytes, {})",
        s.vm, s.name, s.drive, s.size_bytes, s.created_at
    )
}

async fn one(client: &Client, tool: &str, args: Value, out: &Out) -> Result<(), CtlError> {
    let answer = call(client, tool, args).await?;
    let snapshot: Snapshot = parse(tool, &answer)?;
    out.print(&answer, || line(&snapshot));
    Ok(())
}

pub async fn run(client: &Client, cmd: SnapshotCmd, out: &Out) -> Result<(), CtlError> {
    match cmd {
        SnapshotCmd::Create { vm, name, drive } => {
            let mut args = json!({"vm": vm});
            if let Some(name) = name {
                args["name"] = name.into();
            }
            if let Some(drive) = drive {
                args["drive"] = drive.into();
            }
            one(client, "snapshot_drive", args, out).await
        }
        SnapshotCmd::Ls { vm } => {
            let args = vm.map_or_else(|| json!({}), |vm| json!({"vm": vm}));
            let answer = call(client, "list_snapshots", args).await?;
            let list: SnapshotList = parse("list_snapshots", &answer)?;
            out.print(&answer, || {
                if list.snapshots.is_empty() {
                    return "no snapshots".to_owned();
                }
                let rows: Vec<Vec<String>> = list
                    .snapshots
                    .iter()
                    .map(|s| {
                        vec![
                            s.vm.clone(),
                            s.name.clone(),
                            s.drive.clone(),
                            s.size_bytes.to_string(),
                            s.created_at.clone(),
                            or_dash(
                                s.parent_vm
                                    .as_ref()
                                    .zip(s.parent_snapshot.as_ref())
                                    .map(|(v, s)| format!("{v}@{s}")),
                            ),
                        ]
                    })
                    .collect();
                render(&["VM", "NAME", "DRIVE", "BYTES", "CREATED", "FROM"], &rows)
            });
            Ok(())
        }
        SnapshotCmd::Restore { vm, snapshot } => {
            one(
                client,
                "restore_snapshot",
                json!({"vm": vm, "snapshot": snapshot}),
                out,
            )
            .await
        }
        SnapshotCmd::Rm { vm, snapshot } => {
            let answer = call(
                client,
                "delete_snapshot",
                json!({"vm": vm, "snapshot": snapshot}),
            )
            .await?;
            out.print(&answer, || format!("snapshot {vm}@{snapshot} deleted"));
            Ok(())
        }
    }
}

pub async fn fork(client: &Client, args: ForkArgs, out: &Out) -> Result<(), CtlError> {
    let mut call_args = json!({"vm": args.vm, "count": args.count});
    if let Some(snapshot) = &args.snapshot {
        call_args["snapshot"] = snapshot.clone().into();
    }
    if let Some(name) = args.name.or(args.named) {
        call_args["name"] = name.into();
    }
    let answer = super::call_with_progress(client, "fork_vm", call_args, "forking", false).await?;
    let forked: Forked = parse("fork_vm", &answer)?;
    out.print(&answer, || {
        forked
            .vms
            .iter()
            .map(|vm| {
                format!(
                    "VM {} forked from {}@{}: {}",
                    vm.name, args.vm, forked.snapshot, vm.state
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    Ok(())
}

/// What fork_vm answers (besides the first fork's fields).
#[derive(serde::Deserialize)]
struct Forked {
    snapshot: String,
    vms: Vec<VmInfo>,
}
