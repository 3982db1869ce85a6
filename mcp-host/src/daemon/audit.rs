//! The audit trail: every tool call, allowed or denied, goes to the
//! catalog (through one writer task, in batches, so a call waits on a
//! channel, not on SQLite) and to the log as a structured line. Arguments
//! are kept with secret-looking values redacted and long values cut: the
//! trail says what was asked, not what was written.

use nexus_storage::{AuditQuery, AuditRecord};
use serde_json::{Map, Value};

use super::{Daemon, DaemonError, Result};

/// Rows the catalog keeps (the oldest go first).
pub const AUDIT_ROWS: u64 = 100_000;
/// Calls waiting for the writer at most; past it a call waits (the trail
/// is not lossy).
const QUEUE: usize = 4096;
/// String values longer than this are cut in the trail.
const MAX_VALUE_CHARS: usize = 64;
/// The whole argument text at most.
const MAX_ARGUMENTS_CHARS: usize = 1024;
/// Argument names whose values are never kept.
const SECRET_NAMES: [&str; 7] = [
    "token",
    "secret",
    "password",
    "passwd",
    "key",
    "auth",
    "credential",
];
/// Marks of well-known secrets anywhere in a value.
const SECRET_MARKS: [&str; 7] = [
    "nexus_",
    "sk-",
    "ghp_",
    "gho_",
    "xoxb-",
    "AKIA",
    "-----BEGIN",
];
/// Arguments that carry data, not instructions: only their size is kept.
const PAYLOAD_NAMES: [&str; 4] = ["content", "data", "stdin", "input"];
/// Tool and VM names are cut to this in the trail (a caller chooses them).
pub const MAX_NAME_CHARS: usize = 128;

/// The writer's end: calls send records here.
pub(super) type AuditSender = tokio::sync::mpsc::Sender<AuditRecord>;

/// Starts the writer; returns its sender.
pub(super) fn writer(storage: std::sync::Arc<nexus_storage::Storage>) -> AuditSender {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<AuditRecord>(QUEUE);
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < 256 {
                match rx.try_recv() {
                    Ok(record) => batch.push(record),
                    Err(_) => break,
                }
            }
            let storage = storage.clone();
            let written = tokio::task::spawn_blocking(move || {
                storage
                    .append_audit(&batch, AUDIT_ROWS)
                    .map(|()| batch.len())
            })
            .await;
            match written {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "could not write audit records"),
                Err(e) => tracing::error!(error = %e, "the audit writer failed"),
            }
        }
    });
    tx
}

impl Daemon {
    /// Records one call (and logs it).
    pub async fn audit(&self, record: AuditRecord) {
        tracing::info!(
            target: "nexus_audit",
            identity = record.identity,
            transport = record.transport,
            tool = record.tool,
            vm = record.vm,
            arguments = record.arguments,
            outcome = record.outcome,
            duration_us = record.duration_us,
            "call"
        );
        if self.audit.send(record).await.is_err() {
            tracing::error!("the audit writer is gone: a call went unrecorded");
        }
    }

    /// Recorded calls, newest first.
    pub async fn read_audit(&self, mut query: AuditQuery) -> Result<Vec<AuditRecord>> {
        if let Some(since) = &query.since {
            // One format, so that text order is time order.
            let at = humantime::parse_rfc3339_weak(since).map_err(|e| {
                DaemonError::Invalid(format!(
                    "`since` must be a time like 2026-11-29T12:00:00Z, got {since:?}: {e}"
                ))
            })?;
            query.since = Some(humantime::format_rfc3339_millis(at).to_string());
        }
        self.blocking(move |s| s.read_audit(&query)).await
    }
}

/// The arguments as the trail keeps them: JSON, secret-looking values
/// replaced, long strings cut, the whole bounded.
/// [`redact`], and a secret's value whatever its name.
pub fn redact_call(tool: &str, arguments: Option<&Map<String, Value>>) -> String {
    if tool == "set_secret"
        && let Some(args) = arguments
    {
        let mut args = args.clone();
        if args.contains_key("value") {
            args.insert("value".into(), Value::String("[redacted]".into()));
        }
        // A header without its {secret} may hold the value pasted in.
        if args
            .get("header")
            .is_some_and(|h| !h.as_str().is_some_and(|h| h.contains("{secret}")))
        {
            args.insert("header".into(), Value::String("[redacted]".into()));
        }
        return redact(Some(&args));
    }
    redact(arguments)
}

pub fn redact(arguments: Option<&Map<String, Value>>) -> String {
    let Some(arguments) = arguments else {
        return "{}".into();
    };
    let kept = Value::Object(
        arguments
            .iter()
            .map(|(k, v)| (k.clone(), redact_value(Some(k), v)))
            .collect(),
    );
    let text = kept.to_string();
    if text.chars().count() > MAX_ARGUMENTS_CHARS {
        let cut: String = text.chars().take(MAX_ARGUMENTS_CHARS).collect();
        format!("{cut}...")
    } else {
        text
    }
}

/// A name that says its value is a secret (`API_KEY`, `password`...).
fn secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_NAMES.iter().any(|s| name.contains(s))
}

/// A value that holds a secret: a known mark, or `NAME=value` with a
/// secret name (an environment assignment in a command).
fn secret_value(value: &str) -> bool {
    SECRET_MARKS.iter().any(|m| value.contains(m))
        || value.split_whitespace().any(|word| {
            word.split_once('=')
                .is_some_and(|(name, v)| !v.is_empty() && secret_name(name))
        })
}

/// A caller-chosen name as the trail keeps it.
pub fn cut_name(name: &str) -> String {
    if name.chars().count() > MAX_NAME_CHARS {
        let cut: String = name.chars().take(MAX_NAME_CHARS).collect();
        format!("{cut}...")
    } else {
        name.to_owned()
    }
}

fn redact_value(name: Option<&str>, value: &Value) -> Value {
    let secret = name.is_some_and(secret_name);
    let payload = name.is_some_and(|n| PAYLOAD_NAMES.contains(&n));
    match value {
        _ if secret => Value::String("[redacted]".into()),
        Value::String(s) if payload => Value::String(format!("[{} bytes]", s.len())),
        Value::String(s) => {
            if secret_value(s) {
                Value::String("[redacted]".into())
            } else if s.chars().count() > MAX_VALUE_CHARS {
                let cut: String = s.chars().take(MAX_VALUE_CHARS).collect();
                Value::String(format!("{cut}... ({} bytes)", s.len()))
            } else {
                value.clone()
            }
        }
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), redact_value(Some(k), v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(|v| redact_value(None, v)).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_and_long_values_cut() {
        let args = serde_json::json!({
            "command": "curl -H 'Authorization: Bearer nexus_abcdef' x",
            "env": {"API_KEY": "plain", "HOME": "/root"},
            "content": "-----BEGIN OPENSSH PRIVATE KEY-----\nabc",
            "path": "y".repeat(500),
            "name": "ci",
            "timeout_s": 5,
            "list": ["sk-123", "fine", "DB_PASSWORD=hunter2"],
            "other": "PASSWORD=hunter3 ./run",
        });
        let text = redact(args.as_object());
        for secret in [
            "nexus_abcdef",
            "sk-123",
            "plain",
            "hunter2",
            "hunter3",
            "BEGIN",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(text.contains("/root") && text.contains("\"ci\"") && text.contains("fine"));
        assert!(text.contains("(500 bytes)") && text.len() < 500, "{text}");
        assert!(
            text.contains("[39 bytes]"),
            "content keeps only its size: {text}"
        );
        assert_eq!(cut_name(&"z".repeat(300)).len(), MAX_NAME_CHARS + 3);
        let huge: Map<String, Value> = (0..100)
            .map(|i| (format!("k{i}"), Value::String("v".repeat(60))))
            .collect();
        assert!(redact(Some(&huge)).chars().count() <= MAX_ARGUMENTS_CHARS + 3);
    }
}
