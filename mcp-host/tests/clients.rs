//! Real MCP clients against nexusd: the official Python SDK (the `mcp`
//! package, installed into .venv by scripts/test.sh) drives every tool,
//! management and proxied, through the full VM scenario, over stdio and
//! streamable HTTP, in both protocol eras ("legacy" 2025-11-25 and "auto",
//! which negotiates 2026-07-28), on both tool surfaces; and rmcp's HTTP
//! client.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::{State, can_run, python_scenario};
use nexus_integration::ensure_minimal_image;
use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;

const RUNS: [(&str, &str); 4] = [
    ("legacy", "per-vm"),
    ("legacy", "shared"),
    ("auto", "per-vm"),
    ("auto", "shared"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_over_stdio_drives_every_tool_in_both_eras_on_both_surfaces() {
    if !can_run() {
        return;
    }
    let (image_dir, _) = ensure_minimal_image().unwrap();
    let state = State::new();
    state.with_image("default", &image_dir);
    let nexusd = env!("CARGO_BIN_EXE_nexusd");
    let state_dir = state.path().to_str().unwrap();
    // One after the other: each run's `nexusd stdio` owns the state
    // directory while it runs, and ends with its client.
    for (mode, surface) in RUNS {
        let prefix = format!("s-{mode}-{surface}");
        let seen = python_scenario(&["stdio", mode, surface, &prefix, nexusd, state_dir]).await;
        assert_eq!(seen["mode"], mode);
        assert_eq!(seen["surface"], surface);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_over_http_drives_every_tool_in_both_eras_on_both_surfaces() {
    if !can_run() {
        return;
    }
    let (image_dir, _) = ensure_minimal_image().unwrap();
    let state = State::new();
    state.with_image("default", &image_dir);
    let (serve, url) = common::serve(&state).await;
    assert!(
        url.starts_with("http://127.0.0.1:") && url.ends_with("/mcp"),
        "{url}"
    );

    // All four at once, on one daemon.
    let runs = RUNS.map(|(mode, surface)| {
        let (url, token) = (url.clone(), state.admin_token());
        tokio::spawn(async move {
            let prefix = format!("h-{mode}-{surface}");
            python_scenario(&["http", mode, surface, &prefix, &url, &token]).await
        })
    });
    for run in runs {
        run.await.unwrap();
    }

    let client = ().serve(state.http(url.clone())).await.unwrap();
    let result = client
        .call_tool(CallToolRequestParams::new("list_images"))
        .await
        .unwrap();
    assert_eq!(
        result.structured_content.unwrap()["images"][0]["name"],
        "default"
    );
    client.cancel().await.unwrap();

    let status = serve.stop().await;
    assert!(
        status.success(),
        "nexusd serve ends cleanly on SIGTERM: {status}"
    );
}
