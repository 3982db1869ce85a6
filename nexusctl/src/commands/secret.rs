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
        /// The value, read before nexusd is reached (see [`prepare`]).
        #[arg(skip)]
        value: Option<String>,
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

/// The longest value read (nexusd takes at most 8 KiB).
const MAX_VALUE_BYTES: u64 = 16 * 1024;

/// The value: a file's content or standard input's (never a terminal's:
/// it would be echoed), less its final line ends.
fn value(from_file: Option<&PathBuf>) -> Result<String, CtlError> {
    let mut text = String::new();
    match from_file {
        Some(path) => {
            let file = std::fs::File::open(path).map_err(|e| {
                CtlError::Local(format!("the value's file {}: {e}", path.display()))
            })?;
            file.take(MAX_VALUE_BYTES)
                .read_to_string(&mut text)
                .map_err(|e| {
                    CtlError::Local(format!("the value's file {}: {e}", path.display()))
                })?;
        }
        None => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                return Err(CtlError::Local(
                    "the value is read from standard input, which is a terminal here (it would be echoed): pipe it in, or name a file with --from-file".into(),
                ));
            }
            stdin
                .take(MAX_VALUE_BYTES)
                .read_to_string(&mut text)
                .map_err(|e| {
                    CtlError::Local(format!("reading the value from standard input: {e}"))
                })?;
        }
    }
    Ok(trimmed(text))
}

/// A value less its final line ends (files and `echo` add them; a value
/// never holds control characters).
fn trimmed(mut text: String) -> String {
    while text.ends_with(['\n', '\r']) {
        text.pop();
    }
    text
}

/// Reads `set`'s value before nexusd is reached (so no session waits on
/// it); checks it here, where the file's name is known.
pub fn prepare(cmd: &mut SecretCmd) -> Result<(), CtlError> {
    if let SecretCmd::Set {
        from_file,
        value: slot,
        ..
    } = cmd
    {
        let text = value(from_file.as_ref())?;
        let from = from_file
            .as_ref()
            .map_or("standard input".to_owned(), |p| p.display().to_string());
        if text.is_empty() {
            return Err(CtlError::Local(format!(
                "the value from {from} is empty: pipe it on standard input or name a file with --from-file"
            )));
        }
        if text.len() > 8192 {
            return Err(CtlError::Local(format!(
                "the value from {from} is over 8 KiB"
            )));
        }
        if text.chars().any(char::is_control) {
            return Err(CtlError::Local(format!(
                "the value from {from} holds control characters (inner newlines?): a value goes into one header"
            )));
        }
        *slot = Some(text);
    }
    Ok(())
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
            value,
            ..
        } => {
            let value = value.ok_or_else(|| CtlError::Local("the value was not read".into()))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_ends_go_and_nothing_else() {
        for (given, kept) in [
            ("v\n", "v"),
            ("v\r\n", "v"),
            ("v\r", "v"),
            ("v\n\n", "v"),
            (" v ", " v "),
            ("a\nb\n", "a\nb"),
        ] {
            assert_eq!(trimmed(given.to_owned()), kept, "{given:?}");
        }
    }
}
