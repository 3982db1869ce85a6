//! `nexusctl image ls`, `token create|ls|revoke`, `audit`: read as JSON
//! values (their types are not in nexus-types yet), shown as tables.

use clap::Subcommand;
use serde_json::{Value, json};

use super::{Out, call};
use crate::connect::Client;
use crate::error::CtlError;
use crate::table::render;

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// List images: name, version, userland, size, the VMs made from each.
    #[command(alias = "list", after_help = "Example: nexusctl image ls")]
    Ls,
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Make an API token (admin only); its secret is printed once.
    #[command(after_help = "Example: nexusctl token create ci-bot --role user --expires-in 86400")]
    Create {
        name: String,
        /// Its role (default `user`).
        #[arg(long)]
        role: Option<String>,
        /// Seconds until it stops working (default: until revoked).
        #[arg(long)]
        expires_in: Option<u64>,
    },
    /// List tokens (never their secrets).
    #[command(alias = "list", after_help = "Example: nexusctl token ls")]
    Ls,
    /// Revoke a token at once.
    #[command(after_help = "Example: nexusctl token revoke ci-bot")]
    Revoke { name: String },
}

/// `nexusctl audit`: the newest records first.
#[derive(Debug, clap::Args)]
#[command(after_help = "Example: nexusctl audit --vm agent1 --limit 20")]
pub struct AuditArgs {
    /// Only calls by this identity (`token:NAME`, `uid:N`, `vm:NAME`).
    #[arg(long)]
    pub identity: Option<String>,
    /// Only calls on this VM.
    #[arg(long)]
    pub vm: Option<String>,
    /// How many (default 50, at most 1000).
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
}

fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        Value::Array(items) if items.is_empty() => "-".to_owned(),
        Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// A table of `items`' `fields`.
fn table(items: &Value, header: &[&str], fields: &[&str], empty: &str) -> String {
    let items = items.as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        return empty.to_owned();
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|item| fields.iter().map(|f| cell(&item[*f])).collect())
        .collect();
    render(header, &rows)
}

pub async fn image(client: &Client, cmd: ImageCmd, out: &Out) -> Result<(), CtlError> {
    match cmd {
        ImageCmd::Ls => {
            let answer = call(client, "list_images", json!({})).await?;
            out.print(&answer, || {
                table(
                    &answer["images"],
                    &["NAME", "DIGEST", "USERLAND", "KERNEL", "DISK_BYTES", "VMS"],
                    &[
                        "name",
                        "digest",
                        "userland",
                        "kernel_version",
                        "disk_bytes",
                        "vms",
                    ],
                    "no images",
                )
            });
            Ok(())
        }
    }
}

pub async fn token(client: &Client, cmd: TokenCmd, out: &Out) -> Result<(), CtlError> {
    match cmd {
        TokenCmd::Create {
            name,
            role,
            expires_in,
        } => {
            let mut args = json!({"name": name});
            if let Some(role) = role {
                args["role"] = role.into();
            }
            if let Some(s) = expires_in {
                args["expires_in_s"] = s.into();
            }
            let answer = call(client, "create_token", args).await?;
            out.print(&answer, || {
                format!(
                    "token {} ({}): {}\nshown only now; send it as `Authorization: Bearer <token>`",
                    cell(&answer["name"]),
                    cell(&answer["role"]),
                    cell(&answer["token"])
                )
            });
            Ok(())
        }
        TokenCmd::Ls => {
            let answer = call(client, "list_tokens", json!({})).await?;
            out.print(&answer, || {
                table(
                    &answer["tokens"],
                    &["NAME", "ROLE", "STATE", "CREATED", "EXPIRES"],
                    &["name", "role", "state", "created_at", "expires_at"],
                    "no tokens",
                )
            });
            Ok(())
        }
        TokenCmd::Revoke { name } => {
            let answer = call(client, "revoke_token", json!({"name": name})).await?;
            out.print(&answer, || format!("token {name} revoked"));
            Ok(())
        }
    }
}

pub async fn audit(client: &Client, args: AuditArgs, out: &Out) -> Result<(), CtlError> {
    let mut query = json!({"limit": args.limit});
    if let Some(identity) = args.identity {
        query["identity"] = identity.into();
    }
    if let Some(vm) = args.vm {
        query["vm"] = vm.into();
    }
    let answer = call(client, "read_audit", query).await?;
    out.print(&answer, || {
        table(
            &answer["records"],
            &["ID", "AT", "IDENTITY", "TOOL", "VM", "OUTCOME", "US"],
            &[
                "id",
                "at",
                "identity",
                "tool",
                "vm",
                "outcome",
                "duration_us",
            ],
            "no records",
        )
    });
    Ok(())
}
