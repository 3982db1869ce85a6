//! `nexusd stdio` beside a daemon that already owns the state directory:
//! it attaches to it through the admin socket, and what is made through
//! one front end is seen through the other.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{State, call, can_run, python_scenario};
use nexus_integration::{ensure_minimal_image, processes_mentioning};
use rmcp::ServiceExt;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_attaches_to_a_running_serve_and_both_see_the_same_vms() {
    if !can_run() {
        return;
    }
    let (image_dir, _) = ensure_minimal_image().unwrap();
    let state = State::new();
    state.with_image("default", &image_dir);
    let (serve, url) = common::serve(&state).await;

    // The same command line as when no daemon runs.
    let stdio = state.client().await;
    let http = ().serve(state.http(url.clone())).await.unwrap();

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

    // Another user cannot attach (the state directory and the admin socket
    // are owner-only): told at once, not after a minute of retries.
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
        stderr.contains("are owner-only, and another user owns them"),
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
    assert!(serve.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harnesses_share_the_daemon_one_starts_and_leaving_ends_only_their_own_session() {
    if !can_run() {
        return;
    }
    let (image_dir, _) = ensure_minimal_image().unwrap();
    let state = State::new();
    state.with_image("default", &image_dir);

    // Two harnesses launch `nexusd stdio` the usual way (rmcp's child
    // process transport: on leaving it closes stdin, then SIGTERM, then
    // SIGKILL). The first starts a daemon; the second attaches to it.
    let first = state.client().await;
    let daemon = state
        .daemon_pid()
        .expect("the first front end started a daemon");
    let second = state.client().await;
    assert_eq!(state.daemon_pid(), Some(daemon), "one daemon for both");

    call(
        &second,
        "spawn_vm",
        json!({"name": "shared", "memory_mib": 128}),
    )
    .await
    .ok();
    assert_eq!(
        call(&first, "get_vm", json!({"vm": "shared"})).await.ok()["state"],
        "running"
    );
    let out = call(&first, "shared__exec", json!({"command": "echo first"}))
        .await
        .ok();
    assert_eq!(out["stdout"], "first\n");

    // The harness that started the daemon leaves: the other one's session
    // and VMs are untouched.
    first.cancel().await.unwrap();
    let out = call(
        &second,
        "shared__exec",
        json!({"command": "echo still here"}),
    )
    .await
    .ok();
    assert_eq!(out["stdout"], "still here\n");
    assert_eq!(state.daemon_pid(), Some(daemon));

    // The last one leaves: the daemon stops its VMs and ends.
    second.cancel().await.unwrap();
    assert!(
        state.wait_daemon_gone(Duration::from_secs(60)),
        "the daemon ends once no front end is left"
    );
    let left = processes_mentioning(state.path().to_str().unwrap());
    assert!(left.is_empty(), "processes left running: {left:?}");
    let log = std::fs::read_to_string(state.path().join("logs/nexusd.log")).unwrap();
    assert!(log.contains("the last front end left"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_cannot_start_is_reported_by_stdio_with_its_log() {
    let state = State::new();
    // A state directory whose pool cannot be made: a file where it goes.
    std::fs::write(state.path().join("pool.img"), b"not a filesystem").unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        state.command().stdin(Stdio::null()).output(),
    )
    .await
    .expect("stdio gives up on a dead daemon at once")
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the nexusd this front end started exited")
            && stderr.contains("nexusd.log"),
        "{stderr}"
    );
}
