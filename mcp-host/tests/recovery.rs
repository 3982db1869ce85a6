//! nexusd killed with SIGKILL while VMs run. The next nexusd adopts the
//! VMs whose processes are all alive (their guests reconnect, their tools
//! reappear) and marks the others stopped; nothing in the catalog is lost
//! and no process or file is orphaned.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::time::Duration;

use common::{State, call, can_run};
use nexus_integration::{ensure_minimal_image, process_alive, processes_mentioning};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;

async fn gone(pid: u32) -> bool {
    for _ in 0..250 {
        if !process_alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigkill_live_vms_are_adopted_and_dead_ones_marked_stopped() {
    if !can_run() {
        return;
    }
    let (image_dir, _) = ensure_minimal_image().unwrap();
    let state = State::new();
    state.with_image("default", &image_dir);
    let run = state.path().join("run");

    let (mut first, client) = state.stdio_child().await;
    let live = call(&client, "spawn_vm", json!({"name": "live"}))
        .await
        .ok();
    call(&client, "spawn_vm", json!({"name": "dead"}))
        .await
        .ok();
    call(
        &client,
        "live__write_file",
        json!({"path": "kept.txt", "content": "still here\n"}),
    )
    .await
    .ok();
    call(
        &client,
        "snapshot_drive",
        json!({"vm": "live", "name": "s"}),
    )
    .await
    .ok();
    let live_run = run.join(format!("live.{}", live["cid"]));
    let dead_run = std::fs::read_dir(&run)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("dead.")
        })
        .unwrap();
    let live_pids = processes_mentioning(live_run.to_str().unwrap());
    let dead_pids = processes_mentioning(dead_run.to_str().unwrap());
    assert!(!live_pids.is_empty() && !dead_pids.is_empty());

    // The daemon (which `nexusd stdio` started) dies; so does the front end.
    let daemon = state
        .daemon_pid()
        .expect("a daemon holds the state directory");
    kill(Pid::from_raw(daemon), Signal::SIGKILL).unwrap();
    assert!(state.wait_daemon_gone(std::time::Duration::from_secs(10)));
    let _ = first.wait().await;
    drop(client);
    assert!(
        live_pids
            .iter()
            .chain(&dead_pids)
            .all(|p| process_alive(*p)),
        "VMs outlive their daemon"
    );
    // Their CIDs stay leased (their VMMs hold the leases): no VM started
    // meanwhile, by any nexusd on this host, can take one.
    let cid = live["cid"].as_u64().unwrap() as u32;
    let taken = nexus_vmm::cid::lease(std::path::Path::new("/run/nexus/cid"), cid);
    assert!(
        taken.is_err(),
        "CID {cid} of a running VM was free to lease"
    );
    // While no daemon runs, one VM's QEMU dies.
    for pid in &dead_pids {
        let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
    }

    let client = state.client().await;
    let info = call(&client, "get_vm", json!({"vm": "live"})).await.ok();
    assert_eq!(
        info["state"], "running",
        "a VM whose processes live is adopted"
    );
    assert_eq!(info["cid"], live["cid"]);
    assert!(
        live_pids.iter().all(|p| process_alive(*p)),
        "the same processes, not a reboot"
    );
    let tools = client.list_all_tools().await.unwrap();
    assert!(
        tools.iter().any(|t| t.name == "live__exec"),
        "its guest tools reappear"
    );
    let read = call(&client, "live__read_file", json!({"path": "kept.txt"}))
        .await
        .ok();
    assert_eq!(read["content"], "still here\n");
    // Its way out is served again: the new daemon's egress proxy answers
    // (refusing a private address, which needs no upstream).
    let out = call(
        &client,
        "live__exec",
        json!({"command": "wget -q -O - http://10.1.2.3/ 2>&1; true"}),
    )
    .await
    .ok();
    assert!(
        out["stdout"].as_str().unwrap().contains("403"),
        "the adopted VM's egress proxy: {out}"
    );

    let info = call(&client, "get_vm", json!({"vm": "dead"})).await.ok();
    assert_eq!(
        info["state"], "stopped",
        "a VM whose processes died is marked stopped"
    );
    for pid in &dead_pids {
        assert!(
            gone(*pid).await,
            "process {pid} of the dead VM was left running"
        );
    }
    assert!(
        !dead_run.exists(),
        "the dead VM's run directory was removed"
    );
    let snaps = call(&client, "list_snapshots", json!({"vm": "live"}))
        .await
        .ok();
    assert_eq!(
        snaps["snapshots"][0]["name"], "s",
        "the catalog lost nothing"
    );

    // The adopted VM is fully driven: stopped and destroyed cleanly.
    let stopped = call(&client, "stop_vm", json!({"vm": "live"})).await.ok();
    assert_eq!(stopped["state"], "stopped");
    for pid in &live_pids {
        assert!(
            gone(*pid).await,
            "process {pid} outlived stop_vm of an adopted VM"
        );
    }
    call(&client, "start_vm", json!({"vm": "dead"})).await.ok();
    for vm in ["live", "dead"] {
        call(&client, "destroy_vm", json!({"vm": vm})).await.ok();
    }
    assert!(processes_mentioning(run.to_str().unwrap()).is_empty());
    assert_eq!(std::fs::read_dir(&run).unwrap().count(), 0);
    client.cancel().await.unwrap();
}

/// A client on a daemon that dies (SIGKILL) at storage step `crash_at`.
async fn client_crashing_at(
    state: &State,
    crash_at: &str,
) -> rmcp::service::RunningService<rmcp::RoleClient, ()> {
    use rmcp::ServiceExt;
    let mut cmd = state.command();
    cmd.env("NEXUSD_CRASH_AT", crash_at);
    ().serve(rmcp::transport::TokioChildProcess::new(cmd).unwrap())
        .await
        .unwrap()
}

/// What /workspace holds once the guest has it mounted again.
async fn mounted_content(
    client: &rmcp::service::RunningService<rmcp::RoleClient, ()>,
) -> Option<String> {
    let mut last = String::new();
    for _ in 0..150 {
        let out = call(
            client,
            "r__exec",
            json!({"command": "grep -q ' /workspace ' /proc/mounts && cat /workspace/v.txt"}),
        )
        .await;
        if !out.is_error && out.json["exit_code"] == 0 {
            return out.json["stdout"].as_str().map(str::to_owned);
        }
        last = format!("{} {}", out.text, out.json);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("/workspace not mounted: {last}");
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_a_crash_interrupted_is_finished_and_the_running_guest_gets_its_workspace_back() {
    if !can_run() {
        return;
    }
    let (image_dir, _) = ensure_minimal_image().unwrap();
    let state = State::new();
    state.with_image("default", &image_dir);

    let first = state.client().await;
    let vm = call(&first, "spawn_vm", json!({"name": "r"})).await.ok();
    call(
        &first,
        "r__write_file",
        json!({"path": "v.txt", "content": "snapshot\n"}),
    )
    .await
    .ok();
    call(&first, "snapshot_drive", json!({"vm": "r", "name": "s"}))
        .await
        .ok();
    let run = state.path().join("run").join(format!("r.{}", vm["cid"]));
    let pids = processes_mentioning(run.to_str().unwrap());
    assert!(!pids.is_empty());
    let crash = |state: &State| {
        let daemon = state.daemon_pid().expect("a daemon holds the state");
        kill(Pid::from_raw(daemon), Signal::SIGKILL).unwrap();
        assert!(state.wait_daemon_gone(Duration::from_secs(10)));
    };
    crash(&state);
    drop(first);

    // Before the guest lets go (it may or may not have): the drive keeps
    // its content. After: the rollback is finished. Either way the guest
    // has /workspace mounted again once the next nexusd has adopted it.
    for (step, expected) in [
        ("rollback:recorded", "changed\n"),
        ("rollback:released", "snapshot\n"),
        ("rollback:cloned", "snapshot\n"),
    ] {
        let doomed = client_crashing_at(&state, step).await;
        call(
            &doomed,
            "r__write_file",
            json!({"path": "v.txt", "content": "changed\n"}),
        )
        .await
        .ok();
        call(&doomed, "r__exec", json!({"command": "sync"}))
            .await
            .ok();
        // The daemon dies inside the call.
        let _ = doomed
            .call_tool(
                rmcp::model::CallToolRequestParams::new("restore_snapshot").with_arguments(
                    json!({"vm": "r", "snapshot": "s"})
                        .as_object()
                        .unwrap()
                        .clone(),
                ),
            )
            .await;
        assert!(
            state.wait_daemon_gone(Duration::from_secs(30)),
            "{step}: nexusd did not die at its crash point"
        );
        drop(doomed);
        assert!(
            pids.iter().all(|p| process_alive(*p)),
            "{step}: the VM outlives its daemon"
        );

        let client = state.client().await;
        assert_eq!(
            mounted_content(&client).await.as_deref(),
            Some(expected),
            "{step}: /workspace mounted again, with the right content"
        );
        assert!(
            pids.iter().all(|p| process_alive(*p)),
            "{step}: the same VM, not a reboot"
        );
        // Nothing is left pending: a restore works as usual.
        call(
            &client,
            "r__write_file",
            json!({"path": "v.txt", "content": "again\n"}),
        )
        .await
        .ok();
        call(
            &client,
            "restore_snapshot",
            json!({"vm": "r", "snapshot": "s"}),
        )
        .await
        .ok();
        assert_eq!(
            mounted_content(&client).await.as_deref(),
            Some("snapshot\n"),
            "{step}: a restore after recovery"
        );
        crash(&state);
        drop(client);
    }

    let client = state.client().await;
    call(&client, "destroy_vm", json!({"vm": "r"})).await.ok();
    assert!(processes_mentioning(run.to_str().unwrap()).is_empty());
    client.cancel().await.unwrap();
}
