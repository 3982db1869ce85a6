//! `nexusctl policy`: roles (what tools, which VMs, quotas, egress) and
//! grants of VMs to identities. The admin's.

use clap::Subcommand;
use serde_json::{Value, json};

use super::admin::{cell, table};
use super::{Out, call};
use crate::connect::Client;
use crate::error::CtlError;

#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// List roles: their tool patterns, VM scope, quotas and egress.
    #[command(after_help = "Example: nexusctl policy roles")]
    Roles,
    /// Create a role or change what it allows; its tokens follow at once.
    /// Changing one keeps its egress and quotas unless given again.
    #[command(
        after_help = "Example: nexusctl policy set-role reader --tools 'list_*,get_vm,vm_read_file' --vms granted --egress pypi.org,files.pythonhosted.org"
    )]
    SetRole {
        name: String,
        /// Tool patterns, comma-separated (`*`, `?`, `[abc]`; `!p` takes
        /// away; a VM's tools as `vm_TOOL`).
        #[arg(long, value_delimiter = ',', required = true)]
        tools: Vec<String>,
        /// Which VMs: own, granted or all.
        #[arg(long, default_value = "own", value_parser = ["own", "granted", "all"])]
        vms: String,
        /// Hosts its VMs may reach, comma-separated (default: the public
        /// web; `none` for no network).
        #[arg(long, value_delimiter = ',')]
        egress: Option<Vec<String>>,
        /// Running VMs per identity.
        #[arg(long)]
        max_running_vms: Option<u32>,
        /// vCPUs of one identity's running VMs.
        #[arg(long)]
        max_vcpus: Option<u32>,
        /// Memory of one identity's running VMs, MiB.
        #[arg(long)]
        max_memory_mib: Option<u64>,
        /// Snapshots of all one identity's VMs.
        #[arg(long)]
        max_snapshots: Option<u32>,
    },
    /// Delete a role (refused while tokens have it).
    #[command(after_help = "Example: nexusctl policy rm-role reader")]
    RmRole { role: String },
    /// Let an identity reach a VM it does not own.
    #[command(after_help = "Example: nexusctl policy grant agent1 token:ci-bot")]
    Grant {
        vm: String,
        /// `token:NAME`, `uid:N` or `anonymous`.
        identity: String,
    },
    /// Take a grant back.
    #[command(after_help = "Example: nexusctl policy revoke agent1 token:ci-bot")]
    Revoke { vm: String, identity: String },
    /// List grants, of one VM or one identity.
    #[command(after_help = "Example: nexusctl policy grants --vm agent1")]
    Grants {
        #[arg(long)]
        vm: Option<String>,
        #[arg(long)]
        identity: Option<String>,
    },
}

fn role_rows(answer: &Value) -> String {
    table(
        &answer["roles"],
        &["NAME", "TOOLS", "VMS", "EGRESS", "BUILTIN"],
        &["name", "tools", "vms", "egress", "builtin"],
        "no roles",
    )
}

pub async fn run(client: &Client, cmd: PolicyCmd, out: &Out) -> Result<(), CtlError> {
    match cmd {
        PolicyCmd::Roles => {
            let answer = call(client, "list_roles", json!({})).await?;
            out.print(&answer, || role_rows(&answer));
        }
        PolicyCmd::SetRole {
            name,
            tools,
            vms,
            egress,
            max_running_vms,
            max_vcpus,
            max_memory_mib,
            max_snapshots,
        } => {
            // Replacing a role keeps what is not given again (its egress,
            // its quotas): an edit of its tools must not open its network.
            let roles = call(client, "list_roles", json!({})).await?;
            let existing = roles["roles"]
                .as_array()
                .and_then(|r| r.iter().find(|r| r["name"] == name.as_str()))
                .cloned();
            let mut args = json!({"name": name, "tools": tools, "vms": vms, "quota": {}});
            if let Some(old) = &existing {
                if old["quota"].is_object() {
                    args["quota"] = old["quota"].clone();
                }
                if !old["egress"].is_null() {
                    args["egress"] = old["egress"].clone();
                }
            }
            if let Some(egress) = egress {
                let none = egress.len() == 1 && egress[0] == "none";
                args["egress"] = if none { json!([]) } else { json!(egress) };
            }
            for (key, value) in [
                ("max_running_vms", max_running_vms.map(u64::from)),
                ("max_vcpus", max_vcpus.map(u64::from)),
                ("max_memory_mib", max_memory_mib),
                ("max_snapshots", max_snapshots.map(u64::from)),
            ] {
                if let Some(v) = value {
                    args["quota"][key] = v.into();
                }
            }
            let answer = call(client, "set_role", args).await?;
            out.print(&answer, || {
                let verb = if answer["created"] == true {
                    "created"
                } else {
                    "replaced"
                };
                format!("role {} {verb}", cell(&answer["name"]))
            });
        }
        PolicyCmd::RmRole { role } => {
            let answer = call(client, "delete_role", json!({"role": role})).await?;
            out.print(&answer, || format!("role {role} deleted"));
        }
        PolicyCmd::Grant { vm, identity } => {
            let answer = call(client, "grant_vm", json!({"vm": vm, "identity": identity})).await?;
            out.print(&answer, || format!("{identity} may reach {vm}"));
        }
        PolicyCmd::Revoke { vm, identity } => {
            let answer = call(
                client,
                "revoke_grant",
                json!({"vm": vm, "identity": identity}),
            )
            .await?;
            out.print(&answer, || format!("{identity} no longer reaches {vm}"));
        }
        PolicyCmd::Grants { vm, identity } => {
            let mut args = json!({});
            if let Some(vm) = vm {
                args["vm"] = vm.into();
            }
            if let Some(identity) = identity {
                args["identity"] = identity.into();
            }
            let answer = call(client, "list_grants", args).await?;
            out.print(&answer, || {
                table(
                    &answer["grants"],
                    &["VM", "IDENTITY", "CREATED"],
                    &["vm", "identity", "created_at"],
                    "no grants",
                )
            });
        }
    }
    Ok(())
}
