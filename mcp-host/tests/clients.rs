//! Real MCP clients against nexusd: the official Python SDK (the `mcp`
//! package, installed into .venv by scripts/test.sh) over stdio and
//! streamable HTTP, in both protocol eras, and rmcp's HTTP client.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::path::PathBuf;

use common::{State, can_run};
use nexus_integration::{ensure_default_image, workspace_root};
use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;
use rmcp::transport::StreamableHttpClientTransport;

fn python() -> PathBuf {
    let python = workspace_root().join(".venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: scripts/test.sh installs the Python MCP client there",
        python.display()
    );
    python
}

async fn python_check(args: &[&str]) -> serde_json::Value {
    let out = tokio::process::Command::new(python())
        .arg(workspace_root().join("integration/python/check_nexusd.py"))
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "python client {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_rust_clients_over_stdio_and_http_in_both_protocol_eras() {
    if !can_run() {
        return;
    }
    let (image_dir, _) = ensure_default_image().unwrap();
    let state = State::new();
    state.with_image("default", &image_dir);
    let nexusd = env!("CARGO_BIN_EXE_nexusd");
    let state_dir = state.path().to_str().unwrap();

    for mode in ["legacy", "auto"] {
        let seen = python_check(&["stdio", mode, nexusd, state_dir]).await;
        assert_eq!(
            seen["images"],
            serde_json::json!(["default"]),
            "stdio {mode}"
        );
    }

    let (mut serve, url) = common::serve(&state).await;
    assert!(
        url.starts_with("http://127.0.0.1:") && url.ends_with("/mcp"),
        "{url}"
    );

    for mode in ["legacy", "auto"] {
        let seen = python_check(&["http", mode, &url]).await;
        assert_eq!(
            seen["images"],
            serde_json::json!(["default"]),
            "http {mode}"
        );
    }

    let client = ().serve(StreamableHttpClientTransport::from_uri(url.clone())).await.unwrap();
    let result = client
        .call_tool(CallToolRequestParams::new("list_images"))
        .await
        .unwrap();
    assert_eq!(
        result.structured_content.unwrap()["images"][0]["name"],
        "default"
    );
    client.cancel().await.unwrap();

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(serve.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = serve.wait().await.unwrap();
    assert!(
        status.success(),
        "nexusd serve ends cleanly on SIGINT: {status}"
    );
}
