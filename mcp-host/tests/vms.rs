//! VM lifecycle through nexusd's MCP tools, with real VMs (QEMU backend)
//! on nexusd's own loop-mounted btrfs pool.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::{State, call, can_run};
use nexus_integration::{ensure_minimal_image, processes_mentioning};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_stop_start_and_destroy_leave_nothing_behind() {
    if !can_run() {
        return;
    }
    let (image_dir, manifest) = ensure_minimal_image().unwrap();
    let state = State::new();
    state.with_image("default", &image_dir);
    let client = state.client().await;

    let vm = call(
        &client,
        "spawn_vm",
        json!({"name": "alpha", "memory_mib": 256}),
    )
    .await;
    assert!(vm.text.starts_with("spawned alpha: running"), "{}", vm.text);
    let vm = vm.ok();
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["image"], "default");
    assert!(vm["cid"].as_u64().unwrap() >= 3);
    no_access_for_others(state.path());
    // The VMM and its vsock helper run as a user of the VM's own, not root.
    let run = state.path().join("run");
    let (mut qemus, mut helpers) = (0, 0);
    let vm_uid = (nexus_vmm::vm::VM_UID_BASE + vm["cid"].as_u64().unwrap() as u32).to_string();
    for pid in nexus_integration::processes_mentioning(run.to_str().unwrap()) {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        let groups = status.lines().find(|l| l.starts_with("Groups:")).unwrap();
        let own_user = uid.split_whitespace().skip(1).all(|u| u == vm_uid)
            && groups.split_whitespace().skip(1).all(|g| g == vm_uid);
        if cmdline.starts_with("qemu-system") || cmdline.contains("/qemu-system") {
            assert!(own_user, "QEMU runs as {uid} {groups}, not {vm_uid}");
            qemus += 1;
        }
        if cmdline.contains("vhost-device-vsock") {
            assert!(
                own_user,
                "the vsock helper runs as {uid} {groups}, not {vm_uid}"
            );
            helpers += 1;
        }
        // Each of the VM's host processes is under the VM's limits.
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let limited = cgroups
            .lines()
            .filter(|l| l.contains(&format!("/nexus-alpha.{}", vm["cid"])))
            .count();
        assert!(limited >= 1, "process {pid} is in no VM cgroup: {cgroups}");
    }
    assert_eq!(qemus, 1, "the VM's QEMU was found and checked");
    assert_eq!(helpers, 1, "the VM's vsock helper was found and checked");
    // Its sockets are in a directory of that user's alone.
    let vsock_dir = std::path::Path::new("/run/nexus/vsock").join(vm["cid"].to_string());
    let meta = std::fs::metadata(&vsock_dir).unwrap();
    assert_eq!(
        (
            std::os::unix::fs::MetadataExt::uid(&meta).to_string(),
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777
        ),
        (vm_uid.clone(), 0o700)
    );

    let console = call(
        &client,
        "read_console",
        json!({"vm": "alpha", "lines": 1000}),
    )
    .await
    .ok();
    assert!(
        console["text"]
            .as_str()
            .unwrap()
            .contains(&manifest.kernel_version),
        "the console shows the boot"
    );

    let list = call(&client, "list_vms", json!({})).await.ok();
    assert_eq!(list["vms"].as_array().unwrap().len(), 1);

    let stopped = call(&client, "stop_vm", json!({"vm": "alpha"})).await.ok();
    assert_eq!(stopped["state"], "stopped");
    assert_eq!(stopped["cid"], serde_json::Value::Null);
    let err = call(&client, "stop_vm", json!({"vm": "alpha"})).await.err();
    assert!(err.contains("VM \"alpha\" is not running"), "{err}");
    let started = call(&client, "start_vm", json!({"vm": "alpha"})).await.ok();
    assert_eq!(started["state"], "running");
    let err = call(&client, "start_vm", json!({"vm": "alpha"}))
        .await
        .err();
    assert!(err.contains("is running already"), "{err}");

    call(&client, "destroy_vm", json!({"vm": "alpha"}))
        .await
        .ok();
    let list = call(&client, "list_vms", json!({})).await.ok();
    assert!(list["vms"].as_array().unwrap().is_empty());
    assert_eq!(
        std::fs::read_dir(state.pool().join("vms")).unwrap().count(),
        0
    );
    let run = state.path().join("run");
    assert!(
        processes_mentioning(run.to_str().unwrap()).is_empty(),
        "no VM process is left"
    );
    assert_eq!(
        std::fs::read_dir(&run).unwrap().count(),
        0,
        "no run directory is left"
    );
    assert!(!state.path().join("logs/alpha.console").exists());
    // Another test's VM may lease the CID the moment it is free and make
    // its own directory there: a CID nobody holds must have none.
    let cid = vm["cid"].as_u64().unwrap() as u32;
    match nexus_vmm::cid::lease(std::path::Path::new("/run/nexus/cid"), cid) {
        Ok(_held) => assert!(!vsock_dir.exists(), "no vsock directory is left"),
        Err(_) => eprintln!("CID {cid} is another VM's now: its directory is that VM's"),
    }
    client.cancel().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_clear_errors_and_change_nothing() {
    if !can_run() {
        return;
    }
    let (image_dir, _) = ensure_minimal_image().unwrap();
    let state = State::new();
    state.with_image("default", &image_dir);
    let client = state.client().await;

    let cases = [
        (
            "spawn_vm",
            json!({"name": "Bad_Name"}),
            "VM name \"Bad_Name\" is invalid",
        ),
        ("spawn_vm", json!({"name": "../x"}), "is invalid"),
        (
            "spawn_vm",
            json!({"image": "nope"}),
            "image \"nope\" does not exist",
        ),
        (
            "spawn_vm",
            json!({"memory_mib": 100000000}),
            "`memory_mib` must be between 64 and this host's",
        ),
        (
            "spawn_vm",
            json!({"vcpus": 0}),
            "`vcpus` must be between 1 and 32",
        ),
        (
            "spawn_vm",
            json!({"workspace_gib": 0}),
            "`workspace_gib` must be between 1",
        ),
        (
            "spawn_vm",
            json!({"from_snapshot": "nosep"}),
            "`from_snapshot` needs `from_vm`",
        ),
        (
            "spawn_vm",
            json!({"from_vm": "ghost"}),
            "`from_vm` needs `from_snapshot`",
        ),
        (
            "spawn_vm",
            json!({"from_vm": "ghost", "from_snapshot": "snap"}),
            "VM \"ghost\" has no snapshot \"snap\"",
        ),
        ("spawn_vm", json!({"cpus": 2}), "unknown field `cpus`"),
        (
            "stop_vm",
            json!({"vm": "ghost"}),
            "VM \"ghost\" does not exist",
        ),
        (
            "destroy_vm",
            json!({"vm": "ghost"}),
            "VM \"ghost\" does not exist",
        ),
        (
            "get_vm",
            json!({"vm": "ghost"}),
            "does not exist: list_vms shows",
        ),
        (
            "read_console",
            json!({"vm": "ghost", "lines": 0}),
            "`lines` must be between 1 and 1000",
        ),
        (
            "ghost__exec",
            json!({"command": "true"}),
            "VM \"ghost\" does not exist",
        ),
        ("bad/name__exec", json!({"command": "true"}), "is invalid"),
    ];
    for (tool, args, expected) in cases {
        let err = call(&client, tool, args.clone()).await.err();
        assert!(
            err.contains(expected),
            "{tool} {args}: {err:?} lacks {expected:?}"
        );
    }
    let list = call(&client, "list_vms", json!({})).await.ok();
    assert!(
        list["vms"].as_array().unwrap().is_empty(),
        "nothing was created"
    );
    assert_eq!(
        std::fs::read_dir(state.pool().join("vms")).unwrap().count(),
        0
    );

    // A name that is taken stays taken, and its VM untouched.
    call(&client, "spawn_vm", json!({"name": "one"})).await.ok();
    let err = call(&client, "spawn_vm", json!({"name": "one"}))
        .await
        .err();
    assert!(err.contains("VM \"one\" has drives already"), "{err}");
    assert_eq!(
        call(&client, "get_vm", json!({"vm": "one"})).await.ok()["state"],
        "running"
    );

    // A second daemon on the same state directory is refused (a second
    // `nexusd stdio` attaches instead: tests/bridge.rs).
    let second = tokio::process::Command::new(env!("CARGO_BIN_EXE_nexusd"))
        .arg("--state-dir")
        .arg(state.path())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .output()
        .await
        .unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("already owns state directory"), "{stderr}");

    // A snapshot asked for while the VM is being destroyed is refused
    // clearly (the destroy, already under way, stops the VM first).
    let client = std::sync::Arc::new(client);
    let destroying = tokio::spawn({
        let client = client.clone();
        async move { call(&client, "destroy_vm", json!({"vm": "one"})).await.ok() }
    });
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    let err = call(&client, "snapshot_drive", json!({"vm": "one"}))
        .await
        .err();
    assert!(
        err.contains("VM \"one\" is being destroyed")
            || err.contains("is busy with destroy")
            // Under load the destroy may have finished already.
            || err.contains("VM \"one\" does not exist"),
        "{err}"
    );
    destroying.await.unwrap();
    let list = call(&client, "list_snapshots", json!({})).await.ok();
    assert!(
        list["snapshots"].as_array().unwrap().is_empty(),
        "no snapshot was half-made"
    );
}

/// Nothing of a state directory (outside the pool's own root) is open to
/// other users: its VMs' sockets would let them run commands in the VMs.
fn no_access_for_others(state: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::symlink_metadata(p).unwrap().permissions().mode();
    assert_eq!(mode(state) & 0o777, 0o700, "{}", state.display());
    let mut stack = vec![
        state.join("run"),
        state.join("logs"),
        state.join("pool/vms"),
    ];
    let mut checked = 0;
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.file_type().is_symlink() {
                continue;
            }
            assert_eq!(
                meta.permissions().mode() & 0o077,
                0,
                "{} is open to others: {:o}",
                path.display(),
                meta.permissions().mode()
            );
            checked += 1;
            if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    assert!(checked >= 6, "only {checked} entries checked");
}

/// Every listed name is one clients accept: at most 48 characters of
/// `[a-zA-Z0-9_-]`, so that a client's `mcp__<server>__` prefix keeps it
/// within 64. A VM whose name is too long for `<vm>__<tool>` is reached
/// through the shared `vm_<tool>` tools instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listed_name_fits_a_client_even_with_a_63_character_vm_name() {
    if !can_run() {
        return;
    }
    let (image_dir, _) = ensure_minimal_image().unwrap();
    let state = State::new();
    state.with_image("default", &image_dir);
    let client = state.client().await;
    let long = "a".repeat(50) + "-0123456789ab";
    assert_eq!(long.len(), 63);
    call(
        &client,
        "spawn_vm",
        json!({"name": long, "memory_mib": 128}),
    )
    .await
    .ok();
    call(
        &client,
        "spawn_vm",
        json!({"name": "short", "memory_mib": 128}),
    )
    .await
    .ok();
    let tools = client.list_all_tools().await.unwrap();
    for tool in &tools {
        assert!(
            tool.name.len() <= 48
                && tool
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "{} does not fit a client",
            tool.name
        );
    }
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    assert!(names.contains(&"short__exec"), "{names:?}");
    assert!(
        names.contains(&"vm_exec"),
        "the long-named VM's way in: {names:?}"
    );
    let out = call(
        &client,
        "vm_exec",
        json!({"vm": long, "command": "echo long"}),
    )
    .await
    .ok();
    assert_eq!(out["stdout"], "long\n");
    for vm in [long.as_str(), "short"] {
        call(&client, "destroy_vm", json!({"vm": vm})).await.ok();
    }
    client.cancel().await.unwrap();
}
