//! guest-mcp's tools inside a real VM (QEMU backend): exec, files in the
//! workspace drive, and the control channel's freeze/thaw and the guest
//! half of an in-place rollback.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Command;
use std::time::Duration;

use nexus_integration::{Harness, call, control_client, exec, guest_client, make_workspace};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_written_in_the_workspace_read_back_and_land_on_the_drive() {
    let harness = Harness::new().unwrap();
    let vm = harness.boot("files").await.unwrap();
    let guest = guest_client(&vm).await.unwrap();

    let info = call(&guest, "system_info", json!({})).await.unwrap();
    assert_eq!(info["kernel"], harness.manifest.kernel_version.as_str());
    assert_eq!(info["disks"][1]["mount"], "/workspace");

    call(&guest, "write_file", json!({"path": "src/hello.txt", "content": "hello from the host\n", "create_parents": true}))
        .await
        .unwrap();
    let read = call(
        &guest,
        "read_file",
        json!({"path": "/workspace/src/hello.txt"}),
    )
    .await
    .unwrap();
    assert_eq!(read["content"], "hello from the host\n");
    let cat = exec(&guest, "cat src/hello.txt && ls -la /workspace/src")
        .await
        .unwrap();
    assert!(
        cat["stdout"]
            .as_str()
            .unwrap()
            .starts_with("hello from the host\n")
    );
    let found = call(&guest, "grep", json!({"pattern": "host"}))
        .await
        .unwrap();
    assert_eq!(found["lines"][0]["path"], "src/hello.txt");

    let ws_drive = vm_drive(&harness, "files");
    guest.cancel().await.unwrap();
    vm.stop().await;
    // After a clean stop the file is on the drive: read it without a VM.
    let out = Command::new("debugfs")
        .args(["-R", "cat /src/hello.txt"])
        .arg(&ws_drive)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the host\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_holds_writers_in_the_guest_until_thaw() {
    let harness = Harness::new().unwrap();
    let vm = harness.boot("freeze").await.unwrap();
    let guest = guest_client(&vm).await.unwrap();
    let control = control_client(&vm).await.unwrap();

    call(&control, "freeze", json!({"timeout_s": 60}))
        .await
        .unwrap();
    let writer = call(
        &guest,
        "process_start",
        json!({"command": "echo frozen-write > /workspace/during && echo done"}),
    )
    .await
    .unwrap();
    let id = writer["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = call(&guest, "process_status", json!({"id": id}))
        .await
        .unwrap();
    assert_eq!(
        status["state"], "running",
        "the write must wait while frozen: {status}"
    );

    call(&control, "thaw", json!({})).await.unwrap();
    let out = call(
        &guest,
        "process_output",
        json!({"id": id, "wait_ms": 10000}),
    )
    .await
    .unwrap();
    assert_eq!(out["stdout"]["data"], "done\n");
    let read = call(&guest, "read_file", json!({"path": "during"}))
        .await
        .unwrap();
    assert_eq!(read["content"], "frozen-write\n");
    guest.cancel().await.unwrap();
    control.cancel().await.unwrap();
    vm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_sees_workspace_content_the_host_replaced_while_unmounted() {
    let harness = Harness::new().unwrap();
    let vm = harness.boot("rollback").await.unwrap();
    let guest = guest_client(&vm).await.unwrap();
    let control = control_client(&vm).await.unwrap();
    call(
        &guest,
        "write_file",
        json!({"path": "state.txt", "content": "current\n"}),
    )
    .await
    .unwrap();

    call(&control, "unmount", json!({})).await.unwrap();
    // The host puts other content on the drive (a snapshot, in nexusd),
    // in place: QEMU keeps its open file.
    let snapshot = harness.dir.path().join("snapshot.ext4");
    make_workspace(&snapshot, 1024).unwrap();
    let payload = harness.dir.path().join("payload");
    std::fs::write(&payload, "from the snapshot\n").unwrap();
    let out = Command::new("debugfs")
        .args(["-w", "-R"])
        .arg(format!("write {} state.txt", payload.display()))
        .arg(&snapshot)
        .output();
    assert!(out.unwrap().status.success());
    let status = Command::new("dd")
        .arg(format!("if={}", snapshot.display()))
        .arg(format!("of={}", vm_drive(&harness, "rollback").display()))
        .args(["bs=4M", "conv=notrunc,sparse", "status=none"])
        .status()
        .unwrap();
    assert!(status.success());

    call(&control, "mount", json!({})).await.unwrap();
    let read = call(&guest, "read_file", json!({"path": "state.txt"}))
        .await
        .unwrap();
    assert_eq!(
        read["content"], "from the snapshot\n",
        "the guest reads the drive, not its old cache"
    );
    // Mounting what is mounted is no error: a host finishing a rollback
    // a crash interrupted cannot know whether the unmount happened.
    let again = call(&control, "mount", json!({})).await.unwrap();
    assert!(
        again["detail"]
            .as_str()
            .unwrap()
            .contains("already mounted"),
        "{again}"
    );
    guest.cancel().await.unwrap();
    control.cancel().await.unwrap();
    vm.stop().await;
}

fn vm_drive(harness: &Harness, name: &str) -> std::path::PathBuf {
    harness
        .dir
        .path()
        .join("vms")
        .join(name)
        .join("workspace.ext4")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_guest_mcp_is_restarted_and_reports_what_it_lost() {
    let harness = Harness::new().unwrap();
    let vm = harness.boot("crash").await.unwrap();
    let guest = guest_client(&vm).await.unwrap();
    let sleeper = call(&guest, "process_start", json!({"argv": ["sleep", "300"]}))
        .await
        .unwrap();
    let sleeper_pid = sleeper["pid"].as_u64().unwrap();
    // It dies in the middle of a snapshot: /workspace is frozen, with a
    // thaw deadline far away that dies with it.
    let control = control_client(&vm).await.unwrap();
    call(&control, "freeze", json!({"timeout_s": 600}))
        .await
        .unwrap();
    call(
        &guest,
        "process_start",
        json!({"command": "sleep 0.3; kill -9 $(pidof guest-mcp)"}),
    )
    .await
    .unwrap();

    // The readiness connection drops with guest-mcp and comes back with
    // the copy init starts.
    let mut state = vm.guest_state();
    for _ in 0..500 {
        state = vm.guest_state();
        if state == nexus_vmm::GuestState::Gone {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..1000 {
        state = vm.guest_state();
        if matches!(state, nexus_vmm::GuestState::Ready { .. }) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        matches!(state, nexus_vmm::GuestState::Ready { .. }),
        "{state:?}"
    );

    let guest = guest_client(&vm).await.unwrap();
    let list = call(&guest, "process_list", json!({})).await.unwrap();
    let lost: Vec<_> = list["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["state"] == "lost")
        .collect();
    assert!(lost.iter().any(|p| p["pid"] == sleeper_pid), "{list}");
    // Killed, then reaped by init a moment later (kill -0 succeeds on a zombie).
    let ps = exec(
        &guest,
        &format!(
            "for i in $(seq 100); do kill -0 {sleeper_pid} 2>/dev/null || {{ echo gone; exit; }}; sleep 0.05; done; echo alive"
        ),
    )
    .await
    .unwrap();
    assert_eq!(ps["stdout"], "gone\n", "the lost process was killed");
    let write = tokio::time::timeout(
        Duration::from_secs(20),
        call(
            &guest,
            "write_file",
            json!({"path": "after-crash", "content": "ok"}),
        ),
    )
    .await
    .expect("the restarted guest-mcp thawed the workspace its predecessor froze");
    write.unwrap();
    guest.cancel().await.unwrap();
    vm.stop().await;
}
