//! The commands, each a typed call of nexusd's tools.

pub mod admin;
pub mod config;
pub mod cp;
pub mod exec;
pub mod policy;
pub mod secret;
pub mod shell;
pub mod snapshot;
pub mod status;
pub mod vm;

use rmcp::model::CallToolRequestParams;
use serde::de::DeserializeOwned;
use serde_json::Value;

use rmcp::RoleClient;
use rmcp::service::Peer;

use crate::connect::Client;
use crate::error::CtlError;

/// How answers are printed.
pub struct Out {
    pub json: bool,
}

impl Out {
    /// `--json`: the answer as nexusd gave it; else `human`'s text.
    pub fn print(&self, answer: &Value, human: impl FnOnce() -> String) {
        if self.json {
            let text = serde_json::to_string_pretty(answer).unwrap_or_else(|_| answer.to_string());
            say(&text);
        } else {
            let text = human();
            if !text.is_empty() {
                say(text.trim_end());
            }
        }
    }
}

/// How long one tool call may take (a boot under TCG takes seconds; an
/// image build minutes).
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1800);

/// Refusals that are about who is asking, not what was asked.
fn denial(text: &str) -> bool {
    [
        "needs the admin role",
        "does not allow tool",
        "cannot make VMs",
        "carries no identity",
    ]
    .iter()
    .any(|m| text.contains(m))
}

/// Writes a line to stdout; a closed pipe (`| head`) is no error.
pub fn say(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{text}");
}

/// Calls tool `tool`; its structured answer, or why not.
pub async fn call(client: &Peer<RoleClient>, tool: &str, args: Value) -> Result<Value, CtlError> {
    call_within(client, tool, args, CALL_TIMEOUT).await
}

/// How long a guest call that answers at once (or within its own
/// `wait_ms`) may take before the guest counts as silent.
pub const GUEST_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// [`call`] with its own deadline.
pub async fn call_within(
    client: &Peer<RoleClient>,
    tool: &str,
    args: Value,
    timeout: std::time::Duration,
) -> Result<Value, CtlError> {
    let mut params = CallToolRequestParams::new(tool.to_owned());
    if let Value::Object(map) = args {
        params = params.with_arguments(map);
    }
    let result = match tokio::time::timeout(timeout, client.call_tool(params)).await {
        Err(_) => {
            return Err(CtlError::Unreachable(format!(
                "{tool}: no answer within {} s",
                timeout.as_secs()
            )));
        }
        Ok(Err(rmcp::ServiceError::McpError(e))) => {
            // nexusd answered: a refusal, not an outage.
            let text = e.message.to_string();
            return Err(if denial(&text) {
                CtlError::Denied(text)
            } else {
                CtlError::Refused(format!("{tool}: {text}"))
            });
        }
        Ok(Err(e)) if e.auth_challenge().is_some() => {
            return Err(CtlError::Denied(format!(
                "{tool}: nexusd no longer takes the token: pass a valid one with --token-file or NEXUS_TOKEN"
            )));
        }
        Ok(Err(e)) => return Err(CtlError::Unreachable(format!("nexusd: {e}"))),
        Ok(Ok(result)) => result,
    };
    let text: Vec<&str> = result
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.as_str()))
        .collect();
    let text = text.join(" ");
    if result.is_error == Some(true) {
        return Err(if denial(&text) {
            CtlError::Denied(text)
        } else {
            CtlError::Refused(text)
        });
    }
    result.structured_content.ok_or_else(|| {
        CtlError::Local(format!(
            "{tool} answered without structured content: {text}"
        ))
    })
}

/// [`call`] under a spinner saying `what` while it runs, where stderr is
/// a terminal. Its progress messages: with `log`, printed on stderr as
/// they come (a build log); else shown in the spinner only.
pub async fn call_with_progress(
    client: &Client,
    tool: &str,
    args: Value,
    what: &str,
    log: bool,
) -> Result<Value, CtlError> {
    let mut lines = client.service().watch();
    let bar = crate::ui::spinner(what);
    let call = call(client, tool, args);
    tokio::pin!(call);
    let result = loop {
        tokio::select! {
            result = &mut call => break result,
            Some(line) = lines.recv() => {
                let line = crate::ui::printable(line.trim_end()).replace(['\n', '\t'], " ");
                match (log, bar.is_hidden()) {
                    (true, true) => eprintln!("{line}"),
                    (true, false) => bar.println(line),
                    (false, false) => bar.set_message(format!("{what}: {line}")),
                    (false, true) => {}
                }
            }
        }
    };
    // The last lines (a failed build's reason) may still be queued.
    while let Ok(line) = lines.try_recv() {
        if log {
            let line = crate::ui::printable(line.trim_end());
            if bar.is_hidden() {
                eprintln!("{line}");
            } else {
                bar.println(line);
            }
        }
    }
    bar.finish_and_clear();
    result
}

/// Reads an answer as `T`.
pub fn parse<T: DeserializeOwned>(tool: &str, answer: &Value) -> Result<T, CtlError> {
    serde_json::from_value(answer.clone())
        .map_err(|e| CtlError::Local(format!("{tool}'s answer does not read: {e}")))
}

/// `nexusctl console` and `nexusctl vm console`.
#[derive(Debug, clap::Args)]
pub struct ConsoleArgs {
    pub vm: String,
    /// How many lines (1-1000, default 100).
    #[arg(long, default_value_t = 100)]
    pub lines: u32,
    /// Keep printing what the console says, until Ctrl-C.
    #[arg(long, short)]
    pub follow: bool,
}

/// `nexusctl console VM`: the last lines of its serial console; with
/// `follow`, what it says next, until Ctrl-C.
pub async fn console(client: &Client, args: ConsoleArgs, out: &Out) -> Result<(), CtlError> {
    let ConsoleArgs { vm, lines, follow } = args;
    let vm = vm.as_str();
    let window = if follow { FOLLOW_WINDOW } else { lines };
    let answer = call(
        client,
        "read_console",
        serde_json::json!({"vm": vm, "lines": window}),
    )
    .await?;
    if !follow {
        out.print(&answer, || {
            crate::ui::printable(answer["text"].as_str().unwrap_or_default())
        });
        return Ok(());
    }
    // Complete lines only: a line still being written is shown once done.
    let mut seen = complete_lines(&answer);
    let show = |line: &str| {
        if out.json {
            say(&serde_json::json!({"vm": vm, "line": line}).to_string());
        } else {
            say(&crate::ui::printable(line));
        }
    };
    for line in &seen[seen.len().saturating_sub(lines as usize)..] {
        show(line);
    }
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let answer = call(
            client,
            "read_console",
            serde_json::json!({"vm": vm, "lines": FOLLOW_WINDOW}),
        )
        .await?;
        let now = complete_lines(&answer);
        for line in new_lines(&seen, &now) {
            show(line);
        }
        seen = now;
    }
}

/// Lines `console --follow` reads each time: more than a burst of boot
/// messages between two reads.
const FOLLOW_WINDOW: u32 = 1000;

/// The console's lines that are complete (ended by a line feed).
fn complete_lines(answer: &Value) -> Vec<String> {
    let text = answer["text"].as_str().unwrap_or_default();
    let done = text.rfind('\n').map_or("", |end| &text[..end]);
    done.lines().map(str::to_owned).collect()
}

/// The lines of `now` (the console's last lines) after those of `before`:
/// where `before`'s last lines reappear in `now`, what follows them is
/// new. If they do not (more came than the window holds), all of `now`.
fn new_lines<'a>(before: &[String], now: &'a [String]) -> &'a [String] {
    if before.is_empty() {
        return now;
    }
    // The latest place `before`'s last lines (up to 20) appear in `now`.
    let anchor = before.len().min(20);
    let tail = &before[before.len() - anchor..];
    (0..=now.len().saturating_sub(anchor))
        .rev()
        .find(|&i| now[i..].starts_with(tail))
        .map_or(now, |i| &now[i + anchor..])
}

/// nexusd's HTTP health endpoint's answer.
pub fn health(url: &str) -> Result<String, CtlError> {
    // The URL nexusd logs ends in /mcp; its health is beside it.
    let base = url.trim_end_matches('/').trim_end_matches("/mcp");
    let endpoint = format!("{base}/healthz");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_secs(10)))
        .build()
        .into();
    let body = agent
        .get(&endpoint)
        .call()
        .map_err(|e| {
            CtlError::Unreachable(format!(
                "nexusd did not answer at {endpoint}: {e} (is `nexusd serve` running?)"
            ))
        })?
        .body_mut()
        .read_to_string()
        .map_err(|e| CtlError::Unreachable(e.to_string()))?;
    Ok(body.trim().to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn follow_prints_only_what_came_after_the_last_lines_seen() {
        let lines = |s: &str| s.lines().map(str::to_owned).collect::<Vec<_>>();
        let before = lines("a\nb\nc");
        assert_eq!(
            new_lines(&before, &lines("a\nb\nc\nd\ne")),
            &lines("d\ne")[..]
        );
        assert!(new_lines(&before, &lines("a\nb\nc")).is_empty());
        // A repeated line does not fool it: the whole tail must match.
        assert_eq!(
            new_lines(&lines("x\nc"), &lines("x\nc\ny\nc")),
            &lines("y\nc")[..]
        );
        // Nothing in common: everything is new.
        assert_eq!(new_lines(&before, &lines("x\ny")), &lines("x\ny")[..]);
        assert_eq!(new_lines(&[], &lines("x")), &lines("x")[..]);
    }

    #[test]
    fn a_line_still_being_written_waits() {
        let answer = serde_json::json!({"text": "one\ntwo\nlogin: "});
        assert_eq!(complete_lines(&answer), vec!["one", "two"]);
        assert!(complete_lines(&serde_json::json!({"text": "partial"})).is_empty());
    }

    #[test]
    fn health_reads_the_endpoint_and_explains_failures() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let n = conn.read(&mut buf).unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("GET /healthz "));
            conn.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n",
            )
            .unwrap();
        });
        assert_eq!(health(&url).unwrap(), "ok");
        server.join().unwrap();
        let err = health("http://127.0.0.1:1").unwrap_err();
        assert_eq!(err.code(), 3);
        assert!(
            err.to_string().contains("is `nexusd serve` running?"),
            "{err}"
        );
    }
}
