//! `nexusctl secret set|ls|rm|grant|revoke`. A value comes from standard
//! input or a file, never from the command line (where `ps` and shell
//! history would keep it).

use std::io::{IsTerminal, Read};
use std::path::PathBuf;

use clap::Subcommand;
use nexus_types::{SecretInfo, SecretList};
use serde_json::json;

use super::{Out, call, parse};
use crate::connect::Client;
use crate::error::CtlError;
use crate::table::{or_dash, render};

#[derive(Debug, Subcommand)]
pub enum SecretCmd {
    /// Store (or replace) a secret, its value read from standard input or
    /// --from-file.
    #[command(
        after_help = "Examples:\n  printf %s \"$GITHUB_TOKEN\" | nexusctl secret set GITHUB --host github.com --host '*.github.com' --basic-user x-access-token\n  nexusctl secret set OPENAI --host api.openai.com --header 'Authorization: Bearer {secret}' --from-file ~/.openai-key"
    )]
    Set {
        /// A-Z, 0-9 and _; VMs granted it see NEXUS_SECRET_<NAME>.
        name: String,
        /// A host pattern it may be sent to (repeatable).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        /// A header set on every request to those hosts: `Name: ...{secret}...`.
        #[arg(long, conflicts_with = "basic_user")]
        header: Option<String>,
        /// Basic auth on every request to those hosts, with this user.
        #[arg(long)]
        basic_user: Option<String>,
        /// Read the value from this file instead of standard input.
        #[arg(long)]
        from_file: Option<PathBuf>,
    },
    /// List secrets: names, hosts, grants; never values.
    #[command(alias = "list", after_help = "Example: nexusctl secret ls")]
    Ls,
    /// Delete a secret and its grants.
    #[command(alias = "delete", after_help = "Example: nexusctl secret rm GITHUB")]
    Rm { name: String },
    /// Let a VM use a secret.
    #[command(after_help = "Example: nexusctl secret grant GITHUB agent1")]
    Grant { name: String, vm: String },
    /// Take a secret from a VM.
    #[command(after_help = "Example: nexusctl secret revoke GITHUB agent1")]
    Revoke { name: String, vm: String },
}

/// The value: a file's content or standard input's, less one final
/// newline.
fn value(from_file: Option<PathBuf>) -> Result<String, CtlError> {
    let mut text = match from_file {
        Some(path) => std::fs::read_to_string(&path)
            .map_err(|e| CtlError::Local(format!("the value's file {}: {e}", path.display())))?,
        None => {
            let mut stdin = std::io::stdin();
            if stdin.is_terminal() {
                eprintln!("nexusctl: reading the value from standard input (end with Ctrl-D)");
            }
            let mut text = String::new();
            stdin.read_to_string(&mut text).map_err(|e| {
                CtlError::Local(format!("reading the value from standard input: {e}"))
            })?;
            text
        }
    };
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if text.is_empty() {
        return Err(CtlError::Local(
            "the value is empty: pipe it on standard input or name a file with --from-file".into(),
        ));
    }
    Ok(text)
}

fn row(s: &SecretInfo) -> Vec<String> {
    let how = match (&s.header, &s.basic_user) {
        (Some(header), _) => format!("header {header}"),
        (None, Some(user)) => format!("basic auth as {user}"),
        (None, None) => "placeholder".to_owned(),
    };
    vec![
        s.name.clone(),
        s.hosts.join(","),
        how,
        or_dash((!s.vms.is_empty()).then(|| s.vms.join(","))),
    ]
}

async fn one(
    client: &Client,
    tool: &str,
    args: serde_json::Value,
    out: &Out,
    done: &str,
) -> Result<(), CtlError> {
    let answer = call(client, tool, args).await?;
    let secret: SecretInfo = parse(tool, &answer)?;
    out.print(&answer, || {
        format!(
            "secret {} {done}; VMs: {}",
            secret.name,
            or_dash((!secret.vms.is_empty()).then(|| secret.vms.join(", ")))
        )
    });
    Ok(())
}

pub async fn run(client: &Client, cmd: SecretCmd, out: &Out) -> Result<(), CtlError> {
    match cmd {
        SecretCmd::Set {
            name,
            hosts,
            header,
            basic_user,
            from_file,
        } => {
            let value = value(from_file)?;
            let mut args = json!({"name": name, "value": value, "hosts": hosts});
            if let Some(header) = header {
                args["header"] = header.into();
            }
            if let Some(user) = basic_user {
                args["basic_user"] = user.into();
            }
            let answer = call(client, "set_secret", args).await?;
            let secret: SecretInfo = parse("set_secret", &answer)?;
            let outcome = answer["outcome"].as_str().unwrap_or("set").to_owned();
            out.print(&answer, || {
                format!(
                    "secret {} {outcome}: for {}; VMs granted it see {}",
                    secret.name,
                    secret.hosts.join(", "),
                    secret.env
                )
            });
            Ok(())
        }
        SecretCmd::Ls => {
            let answer = call(client, "list_secrets", json!({})).await?;
            let list: SecretList = parse("list_secrets", &answer)?;
            out.print(&answer, || {
                if list.secrets.is_empty() {
                    "no secrets (store one with `nexusctl secret set`)".to_owned()
                } else {
                    let rows: Vec<Vec<String>> = list.secrets.iter().map(row).collect();
                    render(&["NAME", "HOSTS", "SENT AS", "VMS"], &rows)
                }
            });
            Ok(())
        }
        SecretCmd::Rm { name } => {
            one(
                client,
                "delete_secret",
                json!({"name": name}),
                out,
                "deleted",
            )
            .await
        }
        SecretCmd::Grant { name, vm } => {
            one(
                client,
                "grant_secret",
                json!({"name": name, "vm": vm}),
                out,
                "granted",
            )
            .await
        }
        SecretCmd::Revoke { name, vm } => {
            one(
                client,
                "revoke_secret",
                json!({"name": name, "vm": vm}),
                out,
                "revoked",
            )
            .await
        }
    }
}
