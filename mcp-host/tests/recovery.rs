//! nexusd killed with SIGKILL while a VM runs: the next nexusd finds the
//! VM's processes, stops them (nothing stays orphaned), shows the VM as
//! stopped with its drives and snapshots intact, and can start it again.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{State, call, can_run};
use nexus_integration::{ensure_default_image, process_alive, processes_mentioning};
use rmcp::ServiceExt;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_of_a_killed_daemon_are_stopped_not_orphaned_and_start_again() {
    if !can_run() {
        return;
    }
    let (image_dir, _) = ensure_default_image().unwrap();
    let state = State::new();
    state.with_image("default", &image_dir);
    let run = state.path().join("run");

    let mut first = state
        .command()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let io = (first.stdout.take().unwrap(), first.stdin.take().unwrap());
    let client = ().serve(io).await.unwrap();
    call(&client, "spawn_vm", json!({"name": "keep"}))
        .await
        .ok();
    call(
        &client,
        "keep__write_file",
        json!({"path": "kept.txt", "content": "still here\n"}),
    )
    .await
    .ok();
    call(
        &client,
        "snapshot_drive",
        json!({"vm": "keep", "name": "s"}),
    )
    .await
    .ok();
    let vm_processes = processes_mentioning(run.to_str().unwrap());
    assert!(!vm_processes.is_empty());

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    first.wait().await.unwrap();
    drop(client);
    assert!(
        vm_processes.iter().all(|p| process_alive(*p)),
        "the VM outlives its daemon"
    );

    let client = state.client().await;
    for pid in &vm_processes {
        for _ in 0..250 {
            if !process_alive(*pid) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            !process_alive(*pid),
            "process {pid} of the old daemon's VM was left running"
        );
    }
    assert!(processes_mentioning(run.to_str().unwrap()).is_empty());
    let info = call(&client, "vm_info", json!({"vm": "keep"})).await.ok();
    assert_eq!(info["state"], "stopped");
    let snaps = call(&client, "list_snapshots", json!({"vm": "keep"}))
        .await
        .ok();
    assert_eq!(snaps["snapshots"][0]["name"], "s");

    call(&client, "start_vm", json!({"vm": "keep"})).await.ok();
    let read = call(&client, "keep__read_file", json!({"path": "kept.txt"}))
        .await
        .ok();
    assert_eq!(read["content"], "still here\n");
    call(&client, "destroy_vm", json!({"vm": "keep"}))
        .await
        .ok();
    client.cancel().await.unwrap();
}
