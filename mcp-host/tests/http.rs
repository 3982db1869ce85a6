//! nexusd's HTTP surface: `/healthz`, `/metrics` after real calls, and the
//! Host and Origin checks that keep web pages from driving it.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::{State, can_run};
use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;
use rmcp::transport::StreamableHttpClientTransport;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One raw HTTP/1.1 exchange (the test needs to send headers a well-behaved
/// client would not); returns the status code and the body.
async fn raw(addr: &str, request: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn initialize(host: &str, origin: Option<&str>) -> String {
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"raw","version":"0"}}}"#;
    let origin = origin
        .map(|o| format!("Origin: {o}\r\n"))
        .unwrap_or_default();
    format!(
        "POST /mcp HTTP/1.1\r\nHost: {host}\r\n{origin}Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_and_host_origin_checks() {
    if !can_run() {
        return;
    }
    let state = State::new();
    let (serve, url) = common::serve(&state).await;
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches("/mcp")
        .to_owned();

    let (status, body) = raw(
        &addr,
        &format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!((status, body.trim()), (200, "ok"));

    // A page on another site cannot reach /mcp, through rebinding (Host) or
    // directly (Origin); a local tool in a browser can.
    let (status, _) = raw(&addr, &initialize("evil.example", None)).await;
    assert!((400..500).contains(&status), "foreign Host got {status}");
    let (status, _) = raw(&addr, &initialize(&addr, Some("http://evil.example"))).await;
    assert!((400..500).contains(&status), "foreign Origin got {status}");
    let (status, _) = raw(&addr, &initialize(&addr, Some("http://localhost:6274"))).await;
    assert_eq!(status, 200, "a loopback origin is allowed");

    let client = ().serve(StreamableHttpClientTransport::from_uri(url.clone())).await.unwrap();
    client
        .call_tool(CallToolRequestParams::new("list_images"))
        .await
        .unwrap();
    let missing = client
        .call_tool(
            CallToolRequestParams::new("get_vm").with_arguments(
                serde_json::json!({"vm": "ghost"})
                    .as_object()
                    .unwrap()
                    .clone(),
            ),
        )
        .await
        .unwrap();
    assert_eq!(missing.is_error, Some(true));
    // Names nobody serves are counted together: clients cannot grow the
    // number of metric series.
    for bogus in ["ghost__made_up_1", "vm_made_up_2", "made_up_3"] {
        let _ = client
            .call_tool(CallToolRequestParams::new(bogus.to_owned()))
            .await;
    }
    client.cancel().await.unwrap();

    let (status, metrics) = raw(
        &addr,
        &format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 200);
    for line in [
        r#"nexus_tool_calls_total{tool="list_images",outcome="ok"} 1"#,
        r#"nexus_tool_calls_total{tool="get_vm",outcome="tool_error"} 1"#,
        r#"nexus_vms{state="running"} 0"#,
        r#"nexus_tool_call_duration_seconds_count{tool="list_images"} 1"#,
        r#"nexus_tool_calls_total{tool="unknown",outcome="protocol_error"} 2"#,
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
    assert!(!metrics.contains("made_up"), "{metrics}");
    // Every route checks the Host (a rebound name cannot read metrics).
    for path in ["/metrics", "/healthz"] {
        let (status, _) = raw(
            &addr,
            &format!("GET {path} HTTP/1.1\r\nHost: evil.example:80\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(status, 403, "{path} with a foreign Host");
    }

    // The admin Unix socket serves the same endpoints, to its owner only.
    let admin = state.path().join("nexusd.sock");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&admin).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let mut stream = tokio::net::UnixStream::connect(&admin).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok\n"),
        "{answer}"
    );

    assert!(serve.stop().await.success());
    assert!(!admin.exists(), "the admin socket is removed at shutdown");
}

#[tokio::test]
async fn a_config_file_sets_what_flags_do_not_and_bad_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("nexusd.toml");
    std::fs::write(&config, "listen = \"0.0.0.0:7777\"\n").unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_nexusd"))
        .arg("--config")
        .arg(&config)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("serve")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("0.0.0.0:7777 is not loopback"), "{stderr}");
    assert!(
        !dir.path().join("state").exists(),
        "a refused config changes nothing"
    );
    std::fs::write(&config, "listen = \"127.0.0.1:7777\"\nsecret = 1\n").unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_nexusd"))
        .arg("--config")
        .arg(&config)
        .arg("stdio")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is invalid") && stderr.contains("unknown field `secret`"),
        "{stderr}"
    );
    let help = tokio::process::Command::new(env!("CARGO_BIN_EXE_nexusd"))
        .arg("--help")
        .output()
        .await
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for documented in [
        "--config",
        "NEXUS_CONFIG",
        "--state-dir",
        "NEXUS_STATE_DIR",
        "allow_non_loopback",
        "admin_socket",
    ] {
        assert!(
            help.contains(documented),
            "--help does not document {documented}"
        );
    }
}
