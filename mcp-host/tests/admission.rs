//! The host's limits: each refusal names the limit, and changes nothing.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::{State, call, can_run};
use nexus_integration::ensure_minimal_image;
use rmcp::ServiceExt;
use rmcp::transport::TokioChildProcess;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_limit_refuses_clearly_and_changes_nothing() {
    if !can_run() {
        return;
    }
    let (image_dir, _) = ensure_minimal_image().unwrap();
    let state = State::new();
    state.with_image("default", &image_dir);
    let config = state.path().join("nexusd.toml");
    std::fs::write(
        &config,
        "[limits]\nmax_vms = 2\nmax_memory_mib = 400\nmax_vcpus = 2\nmax_snapshots_per_vm = 1\n",
    )
    .unwrap();
    let mut command = state.command();
    command.arg("--config").arg(&config);
    let client = ().serve(TokioChildProcess::new(command).unwrap()).await.unwrap();

    let names = |list: &serde_json::Value| -> Vec<String> {
        list["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_owned())
            .collect()
    };
    call(&client, "spawn_vm", json!({"name": "a", "memory_mib": 256}))
        .await
        .ok();
    let listed = call(&client, "list_vms", json!({})).await.ok();
    assert_eq!(listed["limits"]["max_memory_mib"], 400, "{listed}");
    assert!(
        listed["pool"]["free_bytes"].as_u64().unwrap() > 0,
        "{listed}"
    );

    let refusals = [
        (json!({"name": "b", "memory_mib": 256}), "max_memory_mib"),
        (
            json!({"name": "b", "memory_mib": 64, "vcpus": 2}),
            "max_vcpus",
        ),
        (
            json!({"name": "b", "memory_mib": 64, "workspace_gib": 1000}),
            "cannot fit",
        ),
    ];
    for (args, limit) in refusals {
        let err = call(&client, "spawn_vm", args.clone()).await.err();
        assert!(err.contains(limit), "{args}: {err}");
        let listed = call(&client, "list_vms", json!({})).await.ok();
        assert_eq!(names(&listed), ["a"], "{args} changed nothing");
        assert!(!state.pool().join("vms/b").exists(), "{args} left drives");
    }

    call(&client, "spawn_vm", json!({"name": "b", "memory_mib": 128}))
        .await
        .ok();
    let err = call(&client, "spawn_vm", json!({"name": "c", "memory_mib": 64}))
        .await
        .err();
    assert!(err.contains("max_vms"), "{err}");
    let err = call(
        &client,
        "fork_vm",
        json!({"vm": "a", "snapshot": "none", "name": "c"}),
    )
    .await
    .err();
    assert!(err.contains("max_vms"), "{err}");

    call(&client, "snapshot_drive", json!({"vm": "a", "name": "s1"}))
        .await
        .ok();
    let err = call(&client, "snapshot_drive", json!({"vm": "a", "name": "s2"}))
        .await
        .err();
    assert!(err.contains("max_snapshots_per_vm"), "{err}");
    let snaps = call(&client, "list_snapshots", json!({"vm": "a"}))
        .await
        .ok();
    assert_eq!(snaps["snapshots"].as_array().unwrap().len(), 1);

    // Within the limits, VMs stop and start again.
    call(&client, "stop_vm", json!({"vm": "a"})).await.ok();
    call(&client, "stop_vm", json!({"vm": "b"})).await.ok();
    call(&client, "start_vm", json!({"vm": "a"})).await.ok();
    call(&client, "start_vm", json!({"vm": "b"})).await.ok();
    for vm in ["a", "b"] {
        call(&client, "destroy_vm", json!({"vm": vm})).await.ok();
    }
    client.cancel().await.unwrap();
}
