//! `nexusd stdio` beside a daemon that already owns the state directory:
//! it attaches to it through the admin socket, and what is made through
//! one front end is seen through the other.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{State, call, can_run, python_scenario};
use nexus_integration::{ensure_default_image, processes_mentioning};
use rmcp::ServiceExt;
use rmcp::transport::StreamableHttpClientTransport;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_attaches_to_a_running_serve_and_both_see_the_same_vms() {
    if !can_run() {
        return;
    }
    let (image_dir, _) = ensure_default_image().unwrap();
    let state = State::new();
    state.with_image("default", &image_dir);
    let (mut serve, url) = common::serve(&state).await;

    // The same command line as when no daemon runs.
    let stdio = state.client().await;
    let http = ().serve(StreamableHttpClientTransport::from_uri(url.clone())).await.unwrap();

    call(
        &stdio,
        "spawn_vm",
        json!({"name": "via-stdio", "memory_mib": 128}),
    )
    .await
    .ok();
    let listed = call(&http, "list_vms", json!({})).await.ok();
    assert_eq!(listed["vms"][0]["name"], "via-stdio", "{listed}");
    let out = call(
        &http,
        "via-stdio__exec",
        json!({"command": "echo over http"}),
    )
    .await
    .ok();
    assert_eq!(out["stdout"], "over http\n");

    call(
        &http,
        "spawn_vm",
        json!({"name": "via-http", "memory_mib": 128}),
    )
    .await
    .ok();
    assert_eq!(
        call(&stdio, "get_vm", json!({"vm": "via-http"})).await.ok()["state"],
        "running"
    );
    let out = call(
        &stdio,
        "vm_exec",
        json!({"vm": "via-http", "command": "echo over the bridge"}),
    )
    .await
    .ok();
    assert_eq!(out["stdout"], "over the bridge\n");

    // Another user cannot attach (the admin socket is owner-only): told at
    // once, not after a minute of retries.
    std::fs::set_permissions(
        state.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let other_user = tokio::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_nexusd"))
        .arg("--state-dir")
        .arg(state.path())
        .arg("stdio")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(!other_user.status.success());
    let stderr = String::from_utf8_lossy(&other_user.stderr);
    assert!(
        stderr.contains("is owner-only: launch `nexusd stdio` as that user"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(20), "no retrying");

    // Every tool, 2026-07-28 era, shared surface, through a bridge.
    python_scenario(&[
        "stdio",
        "auto",
        "shared",
        "br",
        env!("CARGO_BIN_EXE_nexusd"),
        state.path().to_str().unwrap(),
    ])
    .await;

    for vm in ["via-stdio", "via-http"] {
        call(&stdio, "destroy_vm", json!({"vm": vm})).await.ok();
    }
    stdio.cancel().await.unwrap();
    http.cancel().await.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(serve.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(serve.wait().await.unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stdio_attaches_to_the_first_which_outlives_its_own_client_for_it() {
    if !can_run() {
        return;
    }
    let (image_dir, _) = ensure_default_image().unwrap();
    let state = State::new();
    state.with_image("default", &image_dir);

    // The first `nexusd stdio` runs the daemon; its stdin is ours to close.
    let (mut first, first_client) = state.stdio_child().await;
    let second_client = state.client().await;

    call(
        &second_client,
        "spawn_vm",
        json!({"name": "shared", "memory_mib": 128}),
    )
    .await
    .ok();
    assert_eq!(
        call(&first_client, "get_vm", json!({"vm": "shared"}))
            .await
            .ok()["state"],
        "running"
    );
    let out = call(
        &first_client,
        "shared__exec",
        json!({"command": "echo first"}),
    )
    .await
    .ok();
    assert_eq!(out["stdout"], "first\n");

    // The first client leaves; the daemon stays for the attached one.
    first_client.cancel().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        first.try_wait().unwrap().is_none(),
        "the daemon waits for the attached front end"
    );
    let out = call(
        &second_client,
        "shared__exec",
        json!({"command": "echo still here"}),
    )
    .await
    .ok();
    assert_eq!(out["stdout"], "still here\n");

    // The last one leaves: the daemon stops its VMs and ends.
    second_client.cancel().await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(60), first.wait())
        .await
        .expect("the daemon ends once no front end is left")
        .unwrap();
    assert!(status.success(), "{status}");
    let left = processes_mentioning(state.path().to_str().unwrap());
    assert!(left.is_empty(), "processes left running: {left:?}");
}
