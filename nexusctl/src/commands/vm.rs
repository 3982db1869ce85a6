//! `nexusctl vm ls|create|info|start|stop|pause|resume|rm|console`.

use clap::Subcommand;
use nexus_types::VmInfo;
use serde_json::{Value, json};

use super::{Out, call, call_with_progress, parse};
use crate::connect::Client;
use crate::error::CtlError;
use crate::table::{or_dash, render};

#[derive(Debug, Subcommand)]
pub enum VmCmd {
    /// List the VMs you may reach.
    #[command(
        alias = "list",
        after_help = "Example: nexusctl vm ls --json | jq '.vms[].name'"
    )]
    Ls,
    /// Make a VM and boot it; prints it once its guest answers.
    #[command(
        alias = "spawn",
        after_help = "Example: nexusctl vm create agent1 --image default --memory 1024 --egress pypi.org --egress '*.github.com'"
    )]
    Create {
        /// Its name (default: one is picked).
        name: Option<String>,
        /// The image (list_images; default: `default`).
        #[arg(long)]
        image: Option<String>,
        #[arg(long)]
        vcpus: Option<u32>,
        /// Memory in MiB.
        #[arg(long)]
        memory: Option<u32>,
        /// Workspace size in GiB.
        #[arg(long)]
        workspace_gib: Option<u64>,
        /// Narrow where it may connect (repeatable; its owner's role's list
        /// otherwise).
        #[arg(long)]
        egress: Vec<String>,
    },
    /// Show one VM.
    #[command(after_help = "Example: nexusctl vm info agent1")]
    Info { vm: String },
    /// Boot a stopped VM.
    #[command(after_help = "Example: nexusctl vm start agent1")]
    Start { vm: String },
    /// Stop a running VM (its drives stay).
    #[command(after_help = "Example: nexusctl vm stop agent1")]
    Stop { vm: String },
    /// Pause a running VM: its vCPUs stop, its memory and processes stay.
    #[command(
        after_help = "Example: nexusctl vm pause agent1 && nexusctl snapshot create agent1 now"
    )]
    Pause { vm: String },
    /// Resume a paused VM where it was.
    #[command(after_help = "Example: nexusctl vm resume agent1")]
    Resume { vm: String },
    /// Destroy a VM: its drives, snapshots and log go.
    #[command(alias = "destroy", after_help = "Example: nexusctl vm rm agent1")]
    Rm { vm: String },
    /// Its serial console (the same as `nexusctl console`).
    #[command(after_help = "Example: nexusctl vm console agent1 --follow")]
    Console(super::ConsoleArgs),
}

fn rows(vms: &[VmInfo]) -> String {
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.state.clone(),
                v.image.clone(),
                v.vcpus.to_string(),
                v.memory_mib.to_string(),
                or_dash(v.owner.clone()),
                or_dash(v.ready_ms),
            ]
        })
        .collect();
    render(
        &[
            "NAME",
            "STATE",
            "IMAGE",
            "VCPUS",
            "MEMORY_MIB",
            "OWNER",
            "READY_MS",
        ],
        &rows,
    )
}

fn details(v: &VmInfo) -> String {
    let mut lines = vec![
        format!("name:       {}", v.name),
        format!("state:      {}", v.state),
        format!("image:      {} ({})", v.image, v.image_digest),
        format!("vcpus:      {}", v.vcpus),
        format!("memory:     {} MiB", v.memory_mib),
        format!("owner:      {}", or_dash(v.owner.clone())),
    ];
    if let Some(cid) = v.cid {
        lines.push(format!("cid:        {cid}"));
    }
    if let Some(ms) = v.ready_ms {
        lines.push(format!("ready in:   {ms} ms"));
    }
    if let Some(guest) = &v.guest {
        lines.push(format!("guest:      {guest}"));
    }
    if let (Some(vm), Some(snapshot)) = (&v.from_vm, &v.from_snapshot) {
        lines.push(format!("from:       {vm}@{snapshot}"));
    }
    lines.push(format!(
        "egress:     {}",
        v.egress
            .as_ref()
            .map_or("its owner's role's".to_owned(), |e| e.join(", "))
    ));
    if !v.secrets.is_empty() {
        lines.push(format!("secrets:    {}", v.secrets.join(", ")));
    }
    lines.join("\n")
}

async fn one(client: &Client, tool: &str, args: Value, out: &Out) -> Result<(), CtlError> {
    // Booting takes seconds: a spinner on a terminal, with nexusd's steps.
    let what = match tool {
        "spawn_vm" => "creating the VM",
        "start_vm" => "booting",
        "stop_vm" => "stopping",
        _ => "",
    };
    let answer = if what.is_empty() {
        call(client, tool, args).await?
    } else {
        call_with_progress(client, tool, args, what, false).await?
    };
    let vm: VmInfo = parse(tool, &answer)?;
    out.print(&answer, || details(&vm));
    Ok(())
}

pub async fn run(client: &Client, cmd: VmCmd, out: &Out) -> Result<(), CtlError> {
    match cmd {
        VmCmd::Ls => {
            #[derive(serde::Deserialize)]
            struct Listed {
                vms: Vec<VmInfo>,
            }
            let answer = call(client, "list_vms", json!({})).await?;
            let listed: Listed = parse("list_vms", &answer)?;
            out.print(&answer, || {
                if listed.vms.is_empty() {
                    "no VMs (make one with `nexusctl vm create`)".to_owned()
                } else {
                    rows(&listed.vms)
                }
            });
            Ok(())
        }
        VmCmd::Create {
            name,
            image,
            vcpus,
            memory,
            workspace_gib,
            egress,
        } => {
            let mut args = serde_json::Map::new();
            let mut put = |key: &str, value: Option<Value>| {
                if let Some(value) = value {
                    args.insert(key.to_owned(), value);
                }
            };
            put("name", name.map(Value::from));
            put("image", image.map(Value::from));
            put("vcpus", vcpus.map(Value::from));
            put("memory_mib", memory.map(Value::from));
            put("workspace_gib", workspace_gib.map(Value::from));
            put("egress", (!egress.is_empty()).then(|| json!(egress)));
            one(client, "spawn_vm", Value::Object(args), out).await
        }
        VmCmd::Info { vm } => one(client, "get_vm", json!({"vm": vm}), out).await,
        VmCmd::Start { vm } => one(client, "start_vm", json!({"vm": vm}), out).await,
        VmCmd::Stop { vm } => one(client, "stop_vm", json!({"vm": vm}), out).await,
        VmCmd::Pause { vm } => one(client, "pause_vm", json!({"vm": vm}), out).await,
        VmCmd::Resume { vm } => one(client, "resume_vm", json!({"vm": vm}), out).await,
        VmCmd::Rm { vm } => {
            let answer = call(client, "destroy_vm", json!({"vm": vm})).await?;
            out.print(&answer, || format!("VM {vm} destroyed"));
            Ok(())
        }
        VmCmd::Console(args) => super::console(client, args, out).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, state: &str, owner: Option<&str>, ready_ms: Option<u64>) -> VmInfo {
        VmInfo {
            name: name.into(),
            state: state.into(),
            image: "default".into(),
            image_digest: "sha256:0123abcd".into(),
            vcpus: 2,
            memory_mib: 512,
            from_vm: None,
            from_snapshot: None,
            cid: ready_ms.map(|_| 7),
            ready_ms,
            guest: ready_ms.map(|_| "answering".into()),
            egress: Some(vec!["pypi.org".into()]),
            owner: owner.map(str::to_owned),
            secrets: vec!["API".into()],
        }
    }

    #[test]
    fn the_vm_table_and_details_read_as_they_did() {
        let vms = [
            vm("agent1", "running", Some("uid:1000"), Some(812)),
            vm("build-box", "stopped", None, None),
        ];
        insta::assert_snapshot!("vm_ls", rows(&vms));
        insta::assert_snapshot!("vm_info", details(&vms[0]));
    }
}
