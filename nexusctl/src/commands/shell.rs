//! `nexusctl shell VM`: an interactive terminal in the VM, like
//! `docker exec -it`. The command runs on a guest pseudo-terminal
//! (`process_start` with `tty`); this terminal goes raw, every key is
//! passed on as typed (Ctrl-C included: the guest's terminal turns it
//! into SIGINT there), what the guest prints is written here as it
//! comes, and a resize here resizes the guest's terminal. nexusctl exits
//! with the command's exit code. Ctrl-] ends the session from this side;
//! however it ends, the guest command does not outlive it.

use std::io::{IsTerminal, Read, Write};

use rmcp::RoleClient;
use rmcp::service::Peer;
use serde_json::{Value, json};

use super::exec::{bytes, ended};
use super::{GUEST_CALL_TIMEOUT, call, call_within};
use crate::connect::Client;
use crate::error::CtlError;

/// The shell started when no command is given: bash if the image has it.
const LOGIN_SHELL: &str =
    "if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi";

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  nexusctl shell agent1\n  nexusctl shell agent1 -- python3\nCtrl-] ends the session (the command is killed; exit code 130).\nExit code: the shell's own. Needs a terminal; scripts use `nexusctl exec`."
)]
pub struct ShellArgs {
    /// The VM.
    pub vm: String,
    /// Working directory in the guest (default /workspace).
    #[arg(long)]
    pub cwd: Option<String>,
    /// The program to run instead of a login shell.
    #[arg(last = true)]
    pub argv: Vec<String>,
}

/// Puts this terminal back as it was, however the shell ends.
struct RawMode;

impl RawMode {
    fn enter() -> Result<Self, CtlError> {
        crossterm::terminal::enable_raw_mode()
            .map_err(|e| CtlError::Local(format!("this terminal cannot go raw: {e}")))?;
        Ok(Self)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

fn size() -> (u16, u16) {
    // (columns, rows); a terminal that cannot say gets the classic size.
    crossterm::terminal::size().unwrap_or((80, 24))
}

/// Typed here, this key ends the session (the guest command is killed):
/// the way out of a guest that no longer listens. Ctrl-], as telnet's.
const ESCAPE: u8 = 0x1d;

pub async fn run(client: &Client, args: ShellArgs) -> Result<u8, CtlError> {
    if !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
        return Err(CtlError::Local(
            "shell needs a terminal on stdin and stdout; for scripts and pipes use `nexusctl exec VM -- CMD`".into(),
        ));
    }
    let vm = args.vm.clone();
    let argv = if args.argv.is_empty() {
        vec![
            "/bin/sh".to_owned(),
            "-c".to_owned(),
            LOGIN_SHELL.to_owned(),
        ]
    } else {
        args.argv
    };
    let (cols, rows) = size();
    let mut start = json!({"argv": argv, "tty": {"rows": rows, "cols": cols}});
    if let Ok(term) = std::env::var("TERM") {
        start["env"] = json!({"TERM": term});
    }
    if let Some(cwd) = args.cwd {
        start["cwd"] = cwd.into();
    }
    let started = call(client, &format!("{vm}__process_start"), start).await?;
    let id = started["id"]
        .as_str()
        .ok_or_else(|| CtlError::Local(format!("process_start answered no id: {started}")))?
        .to_owned();
    let peer = client.peer().clone();
    let result = match RawMode::enter() {
        Ok(raw) => {
            let result = session(&peer, &vm, &id).await;
            drop(raw);
            result
        }
        Err(e) => Err(e),
    };
    // However the session ended, nothing of it stays in the guest (a
    // command that ended on its own is refused this, harmlessly).
    let _ = call_within(
        &peer,
        &format!("{vm}__process_signal"),
        json!({"id": id, "signal": "KILL"}),
        std::time::Duration::from_secs(10),
    )
    .await;
    match result {
        Ok(Ended::Guest(code)) => Ok(code),
        Ok(Ended::Here(why)) => {
            eprintln!("nexusctl: {why}");
            Ok(130)
        }
        Err(e) => Err(e),
    }
}

/// How a session ended.
enum Ended {
    /// The command ended, with this exit code.
    Guest(u8),
    /// This side ended it (the escape key, a signal): why.
    Here(String),
}

/// Keys, resizes and output until the command or this side ends it.
async fn session(peer: &Peer<RoleClient>, vm: &str, id: &str) -> Result<Ended, CtlError> {
    use tokio::signal::unix::{SignalKind, signal};
    let watch = |kind| signal(kind).map_err(|e| CtlError::Local(format!("watching signals: {e}")));
    let mut resized = watch(SignalKind::window_change())?;
    let mut hangup = watch(SignalKind::hangup())?;
    let mut terminate = watch(SignalKind::terminate())?;
    let mut interrupt = watch(SignalKind::interrupt())?;
    let mut output = tokio::spawn(print_output(peer.clone(), vm.to_owned(), id.to_owned()));
    // Keys go out in order on a task of their own, so a slow write never
    // holds up a resize or the end.
    let (keys_tx, keys_rx) = tokio::sync::mpsc::channel::<String>(256);
    let writer = tokio::spawn(send_keys(
        peer.clone(),
        vm.to_owned(),
        id.to_owned(),
        keys_rx,
    ));
    let mut typed = typing();
    // A key's UTF-8 may arrive split across reads: its start waits here.
    let mut pending: Vec<u8> = Vec::new();
    let mut typing_open = true;
    let ended = loop {
        tokio::select! {
            done = &mut output => {
                break done
                    .map_err(|e| CtlError::Local(format!("the output task failed: {e}")))?
                    .map(Ended::Guest);
            }
            keys = typed.recv(), if typing_open => {
                let Some(keys) = keys else {
                    typing_open = false;
                    continue;
                };
                if let Some(at) = keys.iter().position(|&k| k == ESCAPE) {
                    pending.extend_from_slice(&keys[..at]);
                    let _ = keys_tx.send(take_text(&mut pending)).await;
                    break Ok(Ended::Here("session ended with Ctrl-]; the command was killed".into()));
                }
                pending.extend_from_slice(&keys);
                let text = take_text(&mut pending);
                if !text.is_empty() && keys_tx.send(text).await.is_err() {
                    typing_open = false;
                }
            }
            _ = resized.recv() => {
                let (cols, rows) = size();
                let _ = call_within(
                    peer,
                    &format!("{vm}__process_resize"),
                    json!({"id": id, "rows": rows, "cols": cols}),
                    GUEST_CALL_TIMEOUT,
                )
                .await;
            }
            _ = hangup.recv() => break Ok(Ended::Here("the terminal hung up".into())),
            _ = terminate.recv() => break Ok(Ended::Here("terminated".into())),
            _ = interrupt.recv() => break Ok(Ended::Here("interrupted".into())),
        }
    };
    output.abort();
    drop(keys_tx);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), writer).await;
    ended
}

/// Keys as typed, read on a thread of their own (a read of a terminal
/// cannot be cancelled; the thread ends with the process).
fn typing() -> tokio::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut stdin = std::io::stdin().lock();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    rx
}

/// Writes keys to the guest command's terminal, in order.
async fn send_keys(
    peer: Peer<RoleClient>,
    vm: String,
    id: String,
    mut keys: tokio::sync::mpsc::Receiver<String>,
) {
    let tool = format!("{vm}__process_write_stdin");
    while let Some(text) = keys.recv().await {
        if text.is_empty() {
            continue;
        }
        // The command may have just ended: its output task says so.
        let _ = call_within(
            &peer,
            &tool,
            json!({"id": id, "data": text}),
            GUEST_CALL_TIMEOUT,
        )
        .await;
    }
}

/// The complete UTF-8 at the start of `pending`, taken out; an
/// incomplete sequence at its end stays; invalid bytes become U+FFFD.
fn take_text(pending: &mut Vec<u8>) -> String {
    let complete = match std::str::from_utf8(pending) {
        Ok(_) => pending.len(),
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => pending.len(),
    };
    let text = String::from_utf8_lossy(&pending[..complete]).into_owned();
    pending.drain(..complete);
    text
}

/// Writes what the command prints as it comes; its exit code at the end.
async fn print_output(peer: Peer<RoleClient>, vm: String, id: String) -> Result<u8, CtlError> {
    let tool = format!("{vm}__process_output");
    let mut at = 0u64;
    loop {
        let answer: Value = call_within(
            &peer,
            &tool,
            json!({"id": id, "stdout_offset": at, "wait_ms": 10_000}),
            GUEST_CALL_TIMEOUT,
        )
        .await?;
        let data = bytes(&answer["stdout"]);
        if !data.is_empty() {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(&data)
                .and_then(|()| stdout.flush())
                .map_err(|e| CtlError::Local(format!("writing to the terminal: {e}")))?;
        }
        at = answer["stdout"]["next_offset"].as_u64().unwrap_or(at);
        if let Some(code) = ended(&answer, at, 0)? {
            return Ok(code);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_utf8_waits_for_its_end() {
        let mut pending = "aé".as_bytes().to_vec();
        pending.truncate(2);
        assert_eq!(take_text(&mut pending), "a");
        assert_eq!(pending, vec![0xc3]);
        pending.push(0xa9);
        assert_eq!(take_text(&mut pending), "é");
        assert!(pending.is_empty());
        let mut bad = vec![b'x', 0xff, b'y'];
        assert_eq!(take_text(&mut bad), "x\u{fffd}y");
    }
}
