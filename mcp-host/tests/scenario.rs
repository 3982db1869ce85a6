//! The end-to-end scenario through nexusd's MCP endpoint with rmcp's
//! client, in both protocol eras (2025-11-25 over stdio on the per-VM
//! surface, 2026-07-28 over HTTP on the shared surface), with real VMs:
//! spawn; work in /workspace through the proxied guest tools; snapshot;
//! change; restore in place while the VM runs; fork; the two diverge;
//! destroy both; nothing is left.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::{Outcome, State, call, can_run};
use nexus_integration::{ensure_minimal_image, processes_mentioning};
use rmcp::model::ProtocolVersion;
use rmcp::service::RunningService;
use rmcp::{ClientLifecycleMode, ClientServiceExt, RoleClient};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_restore_in_place_fork_and_diverge_in_the_2025_era_per_vm() {
    if !can_run() {
        return;
    }
    let (image_dir, _) = ensure_minimal_image().unwrap();
    let state = State::new();
    state.with_image("default", &image_dir);
    let client = state.client().await;
    scenario(&client, Surface::PerVm, &state).await;
    client.cancel().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_restore_in_place_fork_and_diverge_in_the_2026_era_shared() {
    if !can_run() {
        return;
    }
    let (image_dir, _) = ensure_minimal_image().unwrap();
    let state = State::new();
    state.with_image("default", &image_dir);
    let (_serve, url) = common::serve(&state).await;
    let client = ()
        .serve_with_lifecycle(
            state.http(format!("{url}?surface=shared")),
            ClientLifecycleMode::Discover {
                preferred_versions: vec![ProtocolVersion::V_2026_07_28],
            },
        )
        .await
        .unwrap();
    assert_eq!(
        client.peer_info().unwrap().protocol_version,
        ProtocolVersion::V_2026_07_28
    );
    scenario(&client, Surface::Shared, &state).await;
    client.cancel().await.unwrap();
}

#[derive(Clone, Copy, PartialEq)]
enum Surface {
    PerVm,
    Shared,
}

/// Guest tool `tool` of VM `vm`, called as the surface names it.
async fn guest(
    client: &RunningService<RoleClient, ()>,
    surface: Surface,
    vm: &str,
    tool: &str,
    args: Value,
) -> Outcome {
    match surface {
        Surface::PerVm => call(client, &format!("{vm}__{tool}"), args).await,
        Surface::Shared => {
            let mut args = args;
            args["vm"] = json!(vm);
            call(client, &format!("vm_{tool}"), args).await
        }
    }
}

async fn scenario(client: &RunningService<RoleClient, ()>, surface: Surface, state: &State) {
    let name = |vm: &str, tool: &str| match surface {
        Surface::PerVm => format!("{vm}__{tool}"),
        Surface::Shared => format!("vm_{tool}"),
    };
    let a = call(client, "spawn_vm", json!({"name": "a"})).await.ok();
    let cid = a["cid"].clone();

    // The VM's own tools appear (as a__<tool> or vm_<tool>), with their schemas.
    let tools = client.list_all_tools().await.unwrap();
    let exec = tools
        .iter()
        .find(|t| t.name == name("a", "exec"))
        .expect("exec is listed");
    assert!(serde_json::to_value(&exec.input_schema).unwrap()["properties"]["command"].is_object());
    assert!(tools.iter().any(|t| t.name == name("a", "read_file")));

    let out = guest(
        client,
        surface,
        "a",
        "exec",
        json!({"command": "echo v1 > notes.txt && uname -r"}),
    )
    .await
    .ok();
    assert_eq!(out["exit_code"], 0);
    call(client, "snapshot_drive", json!({"vm": "a", "name": "s1"}))
        .await
        .ok();
    guest(
        client,
        surface,
        "a",
        "write_file",
        json!({"path": "notes.txt", "content": "v2\n"}),
    )
    .await
    .ok();
    guest(
        client,
        surface,
        "a",
        "write_file",
        json!({"path": "extra.txt", "content": "later\n"}),
    )
    .await
    .ok();
    assert_eq!(
        guest(
            client,
            surface,
            "a",
            "read_file",
            json!({"path": "notes.txt"})
        )
        .await
        .ok()["content"],
        "v2\n"
    );

    let restored = call(
        client,
        "restore_snapshot",
        json!({"vm": "a", "snapshot": "s1"}),
    )
    .await
    .ok();
    assert_eq!(restored["name"], "s1");
    let info = call(client, "get_vm", json!({"vm": "a"})).await.ok();
    assert_eq!(info["state"], "running", "restore does not reboot the VM");
    assert_eq!(info["cid"], cid, "the same VM process");
    assert_eq!(
        (&info["from_vm"], &info["from_snapshot"]),
        (&json!("a"), &json!("s1"))
    );
    assert_eq!(
        guest(
            client,
            surface,
            "a",
            "read_file",
            json!({"path": "notes.txt"})
        )
        .await
        .ok()["content"],
        "v1\n"
    );
    let gone = guest(client, surface, "a", "stat", json!({"path": "extra.txt"}))
        .await
        .err();
    assert!(gone.contains("does not exist"), "{gone}");

    // The root drive cannot be swapped under a running guest.
    call(
        client,
        "snapshot_drive",
        json!({"vm": "a", "drive": "root", "name": "r1"}),
    )
    .await
    .ok();
    let err = call(
        client,
        "restore_snapshot",
        json!({"vm": "a", "snapshot": "r1"}),
    )
    .await
    .err();
    assert!(err.contains("stop_vm a first"), "{err}");
    call(
        client,
        "delete_snapshot",
        json!({"vm": "a", "snapshot": "r1"}),
    )
    .await
    .ok();

    let b = call(
        client,
        "fork_vm",
        json!({"vm": "a", "snapshot": "s1", "name": "b"}),
    )
    .await
    .ok();
    assert_eq!(b["state"], "running");
    assert_eq!(
        guest(
            client,
            surface,
            "b",
            "read_file",
            json!({"path": "notes.txt"})
        )
        .await
        .ok()["content"],
        "v1\n"
    );
    guest(
        client,
        surface,
        "b",
        "write_file",
        json!({"path": "notes.txt", "content": "b's\n"}),
    )
    .await
    .ok();
    guest(
        client,
        surface,
        "a",
        "write_file",
        json!({"path": "notes.txt", "content": "a's\n"}),
    )
    .await
    .ok();
    assert_eq!(
        guest(
            client,
            surface,
            "b",
            "read_file",
            json!({"path": "notes.txt"})
        )
        .await
        .ok()["content"],
        "b's\n"
    );
    assert_eq!(
        guest(
            client,
            surface,
            "a",
            "read_file",
            json!({"path": "notes.txt"})
        )
        .await
        .ok()["content"],
        "a's\n"
    );

    // A stopped VM's tools are gone and calling them says why; its drives
    // can still be snapshotted.
    call(client, "stop_vm", json!({"vm": "b"})).await.ok();
    if surface == Surface::PerVm {
        let tools = client.list_all_tools().await.unwrap();
        assert!(!tools.iter().any(|t| t.name.starts_with("b__")));
    }
    let err = guest(client, surface, "b", "exec", json!({"command": "true"}))
        .await
        .err();
    assert!(err.contains("VM \"b\" is not running"), "{err}");
    let snap = call(client, "snapshot_drive", json!({"vm": "b"}))
        .await
        .ok();
    assert_eq!(
        (&snap["parent_vm"], &snap["parent_snapshot"]),
        (&json!("a"), &json!("s1"))
    );
    let listed = call(client, "list_snapshots", json!({})).await.ok();
    assert_eq!(listed["snapshots"].as_array().unwrap().len(), 2);
    let err = call(
        client,
        "restore_snapshot",
        json!({"vm": "a", "snapshot": "nope"}),
    )
    .await
    .err();
    assert!(err.contains("has no snapshot \"nope\""), "{err}");
    let err = call(client, "fork_vm", json!({"snapshot": "s1"}))
        .await
        .err();
    assert!(err.contains("missing field `vm`"), "{err}");
    let err = call(client, "fork_vm", json!({"vm": "a", "snapshot": "s9"}))
        .await
        .err();
    assert!(err.contains("has no snapshot \"s9\""), "{err}");

    for vm in ["a", "b"] {
        call(client, "destroy_vm", json!({"vm": vm})).await.ok();
    }
    assert!(
        call(client, "list_vms", json!({})).await.ok()["vms"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(
        call(client, "list_snapshots", json!({})).await.ok()["snapshots"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    for dir in ["vms", "snapshots"] {
        assert_eq!(
            std::fs::read_dir(state.pool().join(dir)).unwrap().count(),
            0,
            "{dir} is empty"
        );
    }
    let run = state.path().join("run");
    assert!(
        processes_mentioning(run.to_str().unwrap()).is_empty(),
        "no VM process is left"
    );
}
