//! `nexusctl exec VM -- CMD...`: the command runs as a guest background
//! process whose output is read as it comes (lossless, by offsets), so
//! stdout and stderr stream live; nexusctl exits with the command's exit
//! code (128 + N for a signal). Ctrl-C sends the guest command SIGINT,
//! a second Ctrl-C SIGKILL.

use std::io::Write;

use base64::Engine;
use serde_json::{Value, json};

use super::{call, call_within};
use crate::connect::Client;
use crate::error::CtlError;

/// How long one read waits for output (the guest caps it at 30 s).
const WAIT_MS: u64 = 10_000;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  nexusctl exec agent1 -- uname -a\n  nexusctl exec agent1 --cwd /workspace -- sh -c 'make test'\nExit code: the command's own; 128+N when a signal N ended it."
)]
pub struct ExecArgs {
    /// The VM.
    pub vm: String,
    /// Working directory in the guest (default /workspace).
    #[arg(long)]
    pub cwd: Option<String>,
    /// An environment variable for the command, NAME=VALUE (repeatable).
    #[arg(long = "env", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// The program and its arguments.
    #[arg(last = true, required = true)]
    pub argv: Vec<String>,
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?} is not NAME=VALUE"))
}

/// One stream's chunk as bytes.
pub fn bytes(chunk: &Value) -> Vec<u8> {
    let data = chunk["data"].as_str().unwrap_or_default();
    if chunk["encoding"] == "base64" {
        base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap_or_default()
    } else {
        data.as_bytes().to_vec()
    }
}

/// Runs the command; its exit code.
pub async fn run(client: &Client, args: ExecArgs) -> Result<u8, CtlError> {
    let vm = &args.vm;
    let mut start = json!({"argv": args.argv});
    if let Some(cwd) = &args.cwd {
        start["cwd"] = cwd.clone().into();
    }
    if !args.env.is_empty() {
        start["env"] = json!(
            args.env
                .iter()
                .map(|(k, v)| (k.clone(), Value::from(v.clone())))
                .collect::<serde_json::Map<_, _>>()
        );
    }
    let started = call(client, &format!("{vm}__process_start"), start).await?;
    let id = started["id"]
        .as_str()
        .ok_or_else(|| CtlError::Local(format!("process_start answered no id: {started}")))?
        .to_owned();
    let (mut out_at, mut err_at) = (0u64, 0u64);
    let output_tool = format!("{vm}__process_output");
    let mut interrupts = 0;
    loop {
        let read = call_within(
            client,
            &output_tool,
            json!({"id": id, "stdout_offset": out_at, "stderr_offset": err_at, "wait_ms": WAIT_MS}),
            super::GUEST_CALL_TIMEOUT,
        );
        let answer = tokio::select! {
            answer = read => answer?,
            _ = tokio::signal::ctrl_c() => {
                interrupts += 1;
                let signal = if interrupts == 1 { "INT" } else { "KILL" };
                call(client, &format!("{vm}__process_signal"), json!({"id": id, "signal": signal})).await?;
                continue;
            }
        };
        for (stream, at) in [("stdout", &mut out_at), ("stderr", &mut err_at)] {
            let chunk = &answer[stream];
            let dropped = chunk["dropped_bytes"].as_u64().unwrap_or(0);
            if dropped > 0 {
                eprintln!(
                    "nexusctl: [{dropped} bytes of {stream} were dropped by the guest's buffer]"
                );
            }
            let data = bytes(chunk);
            if !data.is_empty() {
                let written = if stream == "stdout" {
                    std::io::stdout()
                        .write_all(&data)
                        .and_then(|()| std::io::stdout().flush())
                } else {
                    std::io::stderr()
                        .write_all(&data)
                        .and_then(|()| std::io::stderr().flush())
                };
                written.map_err(|e| CtlError::Local(format!("writing {stream}: {e}")))?;
            }
            *at = chunk["next_offset"].as_u64().unwrap_or(*at);
        }
        if let Some(code) = ended(&answer, out_at, err_at)? {
            return Ok(code);
        }
    }
}

/// The exit code once the process has ended and every byte up to
/// `out_at`/`err_at` was read (128 + N for signal N); None while it runs.
pub fn ended(answer: &Value, out_at: u64, err_at: u64) -> Result<Option<u8>, CtlError> {
    let process = &answer["process"];
    let all_read = process["stdout_bytes"]
        .as_u64()
        .is_some_and(|n| out_at >= n)
        && process["stderr_bytes"]
            .as_u64()
            .is_some_and(|n| err_at >= n);
    match process["state"].as_str() {
        Some("exited") if all_read => {
            if let Some(code) = process["exit_code"].as_i64() {
                return Ok(Some(u8::try_from(code).unwrap_or(1)));
            }
            let signal = process["signal"].as_i64().unwrap_or(0);
            Ok(Some(u8::try_from(128 + signal).unwrap_or(255)))
        }
        Some("lost") => Err(CtlError::Refused(format!(
            "the command was lost: {}",
            process["reason"].as_str().unwrap_or("guest-mcp restarted")
        ))),
        _ => Ok(None),
    }
}
