//! The commands, each a typed call of nexusd's tools.

pub mod secret;
pub mod vm;

use rmcp::model::CallToolRequestParams;
use serde::de::DeserializeOwned;
use serde_json::Value;

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
            println!(
                "{}",
                serde_json::to_string_pretty(answer).unwrap_or_else(|_| answer.to_string())
            );
        } else {
            let text = human();
            if !text.is_empty() {
                println!("{}", text.trim_end());
            }
        }
    }
}

/// Calls tool `tool`; its structured answer, or why not.
pub async fn call(client: &Client, tool: &str, args: Value) -> Result<Value, CtlError> {
    let mut params = CallToolRequestParams::new(tool.to_owned());
    if let Value::Object(map) = args {
        params = params.with_arguments(map);
    }
    let result = client.call_tool(params).await.map_err(|e| {
        let text = e.to_string();
        if text.contains("needs the admin role") || text.contains("does not allow") {
            CtlError::Denied(text)
        } else {
            CtlError::Unreachable(format!("nexusd: {text}"))
        }
    })?;
    let text: Vec<&str> = result
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.as_str()))
        .collect();
    let text = text.join(" ");
    if result.is_error == Some(true) {
        return Err(
            if text.contains("needs the admin role") || text.contains("does not allow tool") {
                CtlError::Denied(text)
            } else {
                CtlError::Refused(text)
            },
        );
    }
    result.structured_content.ok_or_else(|| {
        CtlError::Local(format!(
            "{tool} answered without structured content: {text}"
        ))
    })
}

/// Reads an answer as `T`.
pub fn parse<T: DeserializeOwned>(tool: &str, answer: &Value) -> Result<T, CtlError> {
    serde_json::from_value(answer.clone())
        .map_err(|e| CtlError::Local(format!("{tool}'s answer does not read: {e}")))
}

/// nexusd's HTTP health endpoint's answer.
pub fn health(url: &str) -> Result<String, CtlError> {
    let endpoint = format!("{}/healthz", url.trim_end_matches('/'));
    let body = ureq::get(&endpoint)
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
