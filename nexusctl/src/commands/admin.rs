//! `nexusctl image ls|build|import|pull|rm`, `token create|ls|revoke`,
//! `audit [--follow]`: read as JSON values (their types are not in
//! nexus-types yet), shown as tables.

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::{Value, json};

use super::{Out, call, call_with_progress, say};
use crate::connect::Client;
use crate::error::CtlError;
use crate::table::render;

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// List images: name, version, userland, size, the VMs made from each.
    #[command(alias = "list", after_help = "Example: nexusctl image ls")]
    Ls,
    /// Build an image from a recipe file (TOML; `-` reads stdin), its
    /// build log shown as it goes. Admin only.
    #[command(
        after_help = "Example: nexusctl image build py --recipe py.toml   (py.toml: base = \"bookworm\"\npackages = [\"python3\"])"
    )]
    Build {
        name: String,
        #[arg(long)]
        recipe: PathBuf,
        /// The image whose kernel and guest-mcp it gets.
        #[arg(long)]
        base: Option<String>,
    },
    /// Import an image from a path on nexusd's host: an OCI layout, an
    /// image archive (`docker save`), or a built Nexus image directory.
    #[command(after_help = "Example: nexusctl image import tools /srv/images/tools.tar")]
    Import {
        name: String,
        /// Absolute path on nexusd's host.
        path: String,
        #[arg(long)]
        base: Option<String>,
    },
    /// Pull an image from an OCI registry.
    #[command(
        after_help = "Example: nexusctl image pull tools registry.example:5000/team/tools:1.2"
    )]
    Pull {
        name: String,
        reference: String,
        /// Plain HTTP to the registry (one on loopback).
        #[arg(long)]
        plain_http: bool,
        #[arg(long)]
        base: Option<String>,
    },
    /// Delete an image (refused while VMs use it).
    #[command(alias = "delete", after_help = "Example: nexusctl image rm tools")]
    Rm { name: String },
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
    /// Keep printing new records as they come, oldest first (reads of
    /// the trail itself are left out), until Ctrl-C.
    #[arg(long, short)]
    pub follow: bool,
}

pub(super) fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        Value::Array(items) if items.is_empty() => "-".to_owned(),
        Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// A table of `items`' `fields`.
pub(super) fn table(items: &Value, header: &[&str], fields: &[&str], empty: &str) -> String {
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
        ImageCmd::Build { name, recipe, base } => {
            let text = if recipe.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
            } else {
                std::fs::read_to_string(&recipe)
            }
            .map_err(|e| CtlError::Local(format!("the recipe {}: {e}", recipe.display())))?;
            let args = json!({"name": name, "recipe": text});
            made(
                client,
                "build_image",
                args,
                base,
                &format!("building {name}"),
                out,
            )
            .await
        }
        ImageCmd::Import { name, path, base } => {
            let args = json!({"name": name, "path": path});
            made(
                client,
                "import_image",
                args,
                base,
                &format!("importing {name}"),
                out,
            )
            .await
        }
        ImageCmd::Pull {
            name,
            reference,
            plain_http,
            base,
        } => {
            let args = json!({"name": name, "reference": reference, "plain_http": plain_http});
            made(
                client,
                "pull_image",
                args,
                base,
                &format!("pulling {name}"),
                out,
            )
            .await
        }
        ImageCmd::Rm { name } => {
            let answer = call(client, "delete_image", json!({"image": name})).await?;
            out.print(&answer, || format!("image {name} deleted"));
            Ok(())
        }
    }
}

/// An image build, import or pull (on `base`'s kernel and guest-mcp, if
/// given), its progress shown, and what it made.
async fn made(
    client: &Client,
    tool: &str,
    mut args: Value,
    base: Option<String>,
    what: &str,
    out: &Out,
) -> Result<(), CtlError> {
    if let Some(base) = base {
        args["base"] = base.into();
    }
    let answer = call_with_progress(client, tool, args, what, true).await?;
    out.print(&answer, || {
        format!(
            "image {} {} ({}, {}) in {:.1} s",
            cell(&answer["image"]["name"]),
            cell(&answer["change"]),
            cell(&answer["image"]["digest"]),
            cell(&answer["image"]["userland"]),
            answer["seconds"].as_f64().unwrap_or_default()
        )
    });
    Ok(())
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
    if args.follow {
        return follow_audit(client, args, out).await;
    }
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

/// One record as a line of `audit --follow`.
fn audit_line(r: &Value) -> String {
    format!(
        "{} {} {} {} vm={} {} {}us",
        cell(&r["id"]),
        cell(&r["at"]),
        cell(&r["identity"]),
        cell(&r["tool"]),
        cell(&r["vm"]),
        crate::ui::paint_if(&cell(&r["outcome"])),
        cell(&r["duration_us"])
    )
}

/// The most pages one poll of `audit --follow` reads back.
const FOLLOW_PAGES: usize = 20;

/// `audit --follow`: the last `limit` records, then each new one as it
/// comes (one JSON object per line with --json).
async fn follow_audit(client: &Client, args: AuditArgs, out: &Out) -> Result<(), CtlError> {
    let mut filter = json!({});
    if let Some(identity) = &args.identity {
        filter["identity"] = identity.clone().into();
    }
    if let Some(vm) = &args.vm {
        filter["vm"] = vm.clone().into();
    }
    let mut last: Option<i64> = None;
    let mut first = true;
    loop {
        // Newest first, page by page back to the last record shown.
        let mut fresh: Vec<Value> = Vec::new();
        let mut before: Option<i64> = None;
        for _ in 0..FOLLOW_PAGES {
            let mut query = filter.clone();
            query["limit"] = if first { args.limit.into() } else { 200.into() };
            if let Some(b) = before {
                query["before_id"] = b.into();
            }
            let answer = call(client, "read_audit", query).await?;
            let page = answer["records"].as_array().cloned().unwrap_or_default();
            let done = page.is_empty() || first;
            let mut reached = false;
            for r in page {
                let id = r["id"].as_i64().unwrap_or_default();
                if last.is_some_and(|l| id <= l) {
                    reached = true;
                    break;
                }
                before = Some(id);
                fresh.push(r);
            }
            if done || reached || last.is_none() {
                break;
            }
        }
        first = false;
        fresh.reverse();
        for r in &fresh {
            last = Some(last.unwrap_or(0).max(r["id"].as_i64().unwrap_or_default()));
            if r["tool"] == "read_audit" {
                continue;
            }
            if out.json {
                say(&r.to_string());
            } else {
                // Callers choose tool names and VM names: shown, not obeyed.
                say(&crate::ui::printable(&audit_line(r)));
            }
        }
        if last.is_none() {
            last = Some(0);
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_and_audit_tables_read_as_they_did() {
        let images = json!([
            {"name": "default", "digest": "sha256:aa11", "userland": "debian bookworm",
             "kernel_version": "6.1.192-nexus", "disk_bytes": 512_000_000u64, "vms": ["agent1", "agent2"]},
            {"name": "minimal", "digest": "sha256:bb22", "userland": "busybox",
             "kernel_version": "6.1.192-nexus", "disk_bytes": 9_000_000u64, "vms": []},
        ]);
        insta::assert_snapshot!(
            "image_ls",
            table(
                &images,
                &["NAME", "DIGEST", "USERLAND", "KERNEL", "DISK_BYTES", "VMS"],
                &[
                    "name",
                    "digest",
                    "userland",
                    "kernel_version",
                    "disk_bytes",
                    "vms"
                ],
                "no images",
            )
        );
        let record = json!({"id": 42, "at": "2026-11-30T09:31:02.123Z", "identity": "uid:0",
            "tool": "spawn_vm", "vm": "agent1", "outcome": "ok", "duration_us": 812345});
        insta::assert_snapshot!("audit_follow_line", audit_line(&record));
        assert_eq!(table(&json!([]), &["A"], &["a"], "no images"), "no images");
    }
}
