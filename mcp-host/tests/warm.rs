//! Warm pools (`[[warm_pool]]`): spawn_vm of a pooled shape takes a VM
//! booted ahead of need, blank or with a snapshot's workspace, each time
//! a fresh guest; the pool refills; claims faster than the refill boot
//! instead; spares make room for clients' VMs; an image deleted drains
//! its pool; spares go with nexusd, whether it stops or is killed.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::time::{Duration, Instant};

use common::{State, call, can_run, serve_with, sh};
use nexus_integration::ensure_minimal_image;
use rmcp::service::RunningService;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const POOL: &str = "[[warm_pool]]\nimage = \"default\"\nsize = 1\n";

async fn status(client: &RunningService<RoleClient, ()>) -> Value {
    call(client, "host_status", json!({})).await.ok()
}

/// Waits (up to two minutes) until the pool of `image` has `ready` spares.
async fn wait_ready(client: &RunningService<RoleClient, ()>, image: &str, ready: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = status(client).await;
        let pool = s["warm_pools"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["image"] == image)
            .cloned()
            .unwrap_or_else(|| panic!("no pool of {image}: {s}"));
        if pool["ready"].as_u64() == Some(ready) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pool of {image} never had {ready} ready: {pool}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Spares ready in every pool together, from a `host_status` answer.
fn ready_in_all(status: &Value) -> u64 {
    status["warm_pools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["ready"].as_u64().unwrap())
        .sum()
}

async fn metrics(url: &str, token: &str) -> String {
    let rest = url.trim_start_matches("http://");
    let addr = &rest[..rest.find('/').unwrap()];
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    out
}

/// The value of the metric line starting with `series`.
fn metric(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn spares_in(state: &State) -> Vec<String> {
    std::fs::read_dir(state.pool().join("warm"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_spawns_take_fresh_spares_blank_or_from_a_snapshot_and_the_pool_refills() {
    if !can_run() {
        return;
    }
    let (image_dir, _) = ensure_minimal_image().unwrap();
    let state = State::new();
    state.with_image("default", &image_dir);
    let (served, url) = serve_with(&state, POOL).await;
    let client = ().serve(state.http(url.as_str())).await.unwrap();
    wait_ready(&client, "default", 1).await;
    // Spares are no one's VMs.
    let listed = call(&client, "list_vms", json!({})).await.ok();
    assert_eq!(listed["vms"].as_array().unwrap().len(), 0, "{listed}");
    assert_eq!(spares_in(&state).len(), 1);

    let a = call(&client, "spawn_vm", json!({"name": "a"})).await.ok();
    assert_eq!(a["state"], "running");
    let m = metrics(&url, &state.admin_token()).await;
    assert_eq!(
        metric(&m, "nexus_warm_pool_claims_total{outcome=\"hit\"}"),
        Some(1),
        "{m}"
    );
    // Its drives are a's now, its console log too (the spare's boot).
    assert!(state.pool().join("vms/a/workspace.ext4").is_file());
    let console = call(&client, "read_console", json!({"vm": "a", "lines": 1000}))
        .await
        .ok();
    assert!(
        console["text"].as_str().unwrap().contains("nexus"),
        "{console}"
    );
    assert_eq!(
        sh(&client, "a", "ls -A /workspace").await["stdout"],
        "lost+found\n"
    );
    sh(
        &client,
        "a",
        "echo from-a > /workspace/a.txt && sync && (sleep 1000 > /dev/null 2>&1 &)",
    )
    .await;
    call(&client, "snapshot_drive", json!({"vm": "a", "name": "s1"}))
        .await
        .ok();

    // From a snapshot: the spare's guest lets go of /workspace, the
    // snapshot's content is put in place, the guest mounts it again. A
    // refused one uses up no spare.
    wait_ready(&client, "default", 1).await;
    let err = call(
        &client,
        "spawn_vm",
        json!({"name": "a", "from_vm": "a", "from_snapshot": "s1"}),
    )
    .await
    .err();
    assert!(err.contains("\"a\""), "{err}");
    let s = status(&client).await;
    assert_eq!(s["warm_pools"][0]["ready"], 1, "{s}");
    let b = call(
        &client,
        "spawn_vm",
        json!({"name": "b", "from_vm": "a", "from_snapshot": "s1"}),
    )
    .await
    .ok();
    assert_eq!(b["from_snapshot"], "s1");
    assert_eq!(
        sh(&client, "b", "cat /workspace/a.txt").await["stdout"],
        "from-a\n"
    );
    sh(&client, "b", "echo from-b > /workspace/b.txt").await;
    // Fresh: nothing of a's processes; a does not see b's writes.
    let ps = sh(&client, "b", "ps -o args | grep -c '[s]leep 1000' || true").await;
    assert_eq!(ps["stdout"], "0\n", "{ps}");
    assert_eq!(
        sh(&client, "a", "ls /workspace").await["stdout"],
        "a.txt\nlost+found\n"
    );

    // Blank again, from the refilled pool.
    wait_ready(&client, "default", 1).await;
    call(&client, "spawn_vm", json!({"name": "c"})).await.ok();
    assert_eq!(
        sh(&client, "c", "ls -A /workspace").await["stdout"],
        "lost+found\n"
    );
    let ps = sh(&client, "c", "ps -o args | grep -c '[s]leep 1000' || true").await;
    assert_eq!(ps["stdout"], "0\n", "{ps}");

    // Another shape is not pooled: booted, neither a hit nor a miss.
    call(&client, "spawn_vm", json!({"name": "d", "memory_mib": 320}))
        .await
        .ok();
    let m = metrics(&url, &state.admin_token()).await;
    assert_eq!(
        metric(&m, "nexus_warm_pool_claims_total{outcome=\"hit\"}"),
        Some(3),
        "{m}"
    );
    assert_eq!(
        metric(&m, "nexus_warm_pool_claims_total{outcome=\"miss\"}"),
        None,
        "{m}"
    );
    wait_ready(&client, "default", 1).await;
    let m = metrics(&url, &state.admin_token()).await;
    assert!(
        m.contains(
            "nexus_warm_pool_vms{image=\"default\",shape=\"1cpu-256mib-1gib\",state=\"ready\"} 1"
        ),
        "{m}"
    );
    let s = status(&client).await;
    assert_eq!(s["vms"]["running"], 4, "spares are not VMs: {s}");

    // A spare that dies is replaced.
    let before = spares_in(&state);
    let run = std::fs::read_dir(state.path().join("run-warm"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let vmm: i32 = std::fs::read_to_string(run.join("pids"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vmm),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let now = spares_in(&state);
        if now.len() == 1 && now != before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never replaced: {before:?} {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_ready(&client, "default", 1).await;

    // A stopping nexusd stops its spares and removes their drives.
    drop(client);
    served.stop().await;
    assert!(spares_in(&state).is_empty(), "{:?}", spares_in(&state));
    let run = state.path().join("run");
    assert!(
        nexus_integration::processes_mentioning(run.to_str().unwrap()).is_empty(),
        "no VM process is left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_faster_than_the_refill_boot_and_spares_give_way_and_go() {
    if !can_run() {
        return;
    }
    let (image_dir, _) = ensure_minimal_image().unwrap();
    let state = State::new();
    state.with_image("default", &image_dir);
    state.with_image("spare", &image_dir);
    // Room for three 256 MiB VMs and a little: the spares must give way.
    let config = format!(
        "{POOL}[[warm_pool]]\nimage = \"spare\"\nsize = 1\n[limits]\nmax_memory_mib = 900\n"
    );
    let (served, url) = serve_with(&state, &config).await;
    let client = ().serve(state.http(url.as_str())).await.unwrap();
    wait_ready(&client, "default", 1).await;
    wait_ready(&client, "spare", 1).await;

    // Three at once: one takes the spare, two boot (evicting spares that
    // hold the room they need); none fails.
    let spawns = ["x1", "x2", "x3"].map(|name| {
        let url = url.clone();
        let token = state.admin_token();
        tokio::spawn(async move {
            let client =
                ().serve(nexus_integration::nexusd::http(url.as_str(), token))
                    .await
                    .unwrap();
            call(&client, "spawn_vm", json!({"name": name})).await.ok()
        })
    });
    for spawn in spawns {
        assert_eq!(spawn.await.unwrap()["state"], "running");
    }
    let m = metrics(&url, &state.admin_token()).await;
    assert_eq!(
        metric(&m, "nexus_warm_pool_claims_total{outcome=\"hit\"}"),
        Some(1),
        "{m}"
    );
    assert_eq!(
        metric(&m, "nexus_warm_pool_claims_total{outcome=\"miss\"}"),
        Some(2),
        "{m}"
    );
    // The limit holds with spares counted: three VMs run, and no spare
    // fits beside them (768 + 256 > 900).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = status(&client).await;
    let ready = ready_in_all(&s);
    assert_eq!(ready, 0, "{s}");
    // Room again: the pools refill.
    call(&client, "destroy_vm", json!({"vm": "x1"})).await.ok();
    call(&client, "destroy_vm", json!({"vm": "x2"})).await.ok();
    wait_ready(&client, "default", 1).await;
    wait_ready(&client, "spare", 1).await;
    // A VM that would not fit even without spares stops none of them.
    let err = call(
        &client,
        "spawn_vm",
        json!({"name": "huge", "memory_mib": 1024}),
    )
    .await
    .err();
    assert!(err.contains("max_memory_mib"), "{err}");
    let s = status(&client).await;
    let ready = ready_in_all(&s);
    assert_eq!(ready, 2, "{s}");

    // An image deleted drains its pool, and nothing boots it again.
    call(&client, "delete_image", json!({"image": "spare"}))
        .await
        .ok();
    wait_ready(&client, "spare", 0).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = status(&client).await;
    let spare = s["warm_pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["image"] == "spare")
        .cloned()
        .unwrap();
    assert_eq!(spare["ready"], 0, "{spare}");
    assert_eq!(spares_in(&state).len(), 1, "{:?}", spares_in(&state));
    // A VM may be named as a spare is: it is never mistaken for one.
    call(&client, "spawn_vm", json!({"name": "pool-0"}))
        .await
        .ok();
    sh(&client, "pool-0", "echo mine > /workspace/kept && sync").await;
    wait_ready(&client, "default", 1).await;

    // A killed nexusd's spares are stopped and their drives removed by
    // the next one (its VMs are adopted).
    drop(client);
    served.kill().await;
    assert!(!spares_in(&state).is_empty());
    let (_served, url) = serve_with(&state, "").await;
    let client = ().serve(state.http(url.as_str())).await.unwrap();
    let listed = call(&client, "list_vms", json!({})).await.ok();
    let names: Vec<&str> = listed["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["pool-0", "x3"], "{listed}");
    assert!(
        listed["vms"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["state"] == "running"),
        "both adopted: {listed}"
    );
    assert_eq!(
        sh(&client, "pool-0", "cat /workspace/kept").await["stdout"],
        "mine\n"
    );
    assert!(spares_in(&state).is_empty(), "{:?}", spares_in(&state));
    let mut left = std::fs::read_dir(state.path().join("run"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    left.sort();
    assert!(
        left.len() == 2 && left[0].starts_with("pool-0.") && left[1].starts_with("x3."),
        "only pool-0 and x3 run: {left:?}"
    );
    let spare_runs = std::fs::read_dir(state.path().join("run-warm"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(spare_runs, 0, "no spare's run directory is left");
    let s = status(&client).await;
    assert_eq!(s["warm_pools"], json!([]), "{s}");
}

async fn snapshots_of(client: &RunningService<RoleClient, ()>, vm: &str) -> usize {
    call(client, "list_snapshots", json!({"vm": vm})).await.ok()["snapshots"]
        .as_array()
        .unwrap()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forks_of_a_running_vm_while_it_writes_are_consistent_and_diverge() {
    if !can_run() {
        return;
    }
    let (image_dir, _) = ensure_minimal_image().unwrap();
    let state = State::new();
    state.with_image("default", &image_dir);
    let config = "[[warm_pool]]\nimage = \"default\"\nsize = 2\n";
    let (_served, url) = serve_with(&state, config).await;
    let client = ().serve(state.http(url.as_str())).await.unwrap();
    call(&client, "spawn_vm", json!({"name": "src"})).await.ok();
    wait_ready(&client, "default", 2).await;
    // A writer that never stops: files rewritten, a big one appended.
    let writer = call(
        &client,
        "src__process_start",
        json!({"command": "i=0; while true; do i=$((i+1)); echo $i > /workspace/n-$((i % 20)); head -c 65536 /dev/urandom >> /workspace/big; [ $((i % 64)) = 0 ] && : > /workspace/big; done"}),
    )
    .await
    .ok();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Bad input changes nothing: no VM, no snapshot.
    for (args, says) in [
        (
            json!({"vm": "src", "count": 0}),
            "`count` must be between 1 and 16, got 0",
        ),
        (
            json!({"vm": "src", "count": 17}),
            "`count` must be between 1 and 16, got 17",
        ),
        (json!({"vm": "src", "name": "src"}), "\"src\""),
        (json!({"vm": "src", "name": "Bad Name"}), "`name`"),
        (json!({"vm": "nope"}), "\"nope\""),
    ] {
        let err = call(&client, "fork_vm", args.clone()).await.err();
        assert!(err.contains(says), "{args}: {err}");
    }
    assert_eq!(snapshots_of(&client, "src").await, 0);
    let listed = call(&client, "list_vms", json!({})).await.ok();
    assert_eq!(listed["vms"].as_array().unwrap().len(), 1, "{listed}");

    let claims = |m: &str| {
        (
            metric(m, "nexus_warm_pool_claims_total{outcome=\"hit\"}").unwrap_or(0),
            metric(m, "nexus_warm_pool_claims_total{outcome=\"miss\"}").unwrap_or(0),
        )
    };
    let before = claims(&metrics(&url, &state.admin_token()).await);
    let forked = call(
        &client,
        "fork_vm",
        json!({"vm": "src", "count": 5, "name": "f"}),
    )
    .await
    .ok();
    let names: Vec<String> = forked["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["f-1", "f-2", "f-3", "f-4", "f-5"], "{forked}");
    assert_eq!(forked["name"], "f-1", "the first fork's fields on top");
    let snapshot = forked["snapshot"].as_str().unwrap().to_owned();
    assert!(snapshot.starts_with("fork-"), "{snapshot}");
    // Two from the pool (more if it refilled meanwhile), the rest booted.
    let m = metrics(&url, &state.admin_token()).await;
    let after = claims(&m);
    let (hits, misses) = (after.0 - before.0, after.1 - before.1);
    assert!(hits >= 2 && hits + misses == 5, "{before:?} {m}");

    // The snapshot taken for them is gone (their workspaces are theirs).
    assert_eq!(snapshots_of(&client, "src").await, 0);
    // The source was thawed (a write to a frozen filesystem waits).
    assert_eq!(
        sh(
            &client,
            "src",
            "timeout 5 sh -c 'echo x > /workspace/thawed'; echo $?"
        )
        .await["stdout"],
        "0\n"
    );
    // It was taken frozen: each fork mounted a clean filesystem, with no
    // journal to replay (a snapshot of a mounted ext4 not frozen needs
    // recovery, which the kernel logs).
    for name in &names {
        let console = call(&client, "read_console", json!({"vm": name, "lines": 1000}))
            .await
            .ok();
        let text = console["text"].as_str().unwrap();
        assert!(
            text.contains("EXT4-fs (vdb)") && !text.contains("recovery"),
            "{name}: {text}"
        );
    }
    // Each fork has the workspace (the writer's files; its process not),
    // and diverges.
    for name in &names {
        let out = sh(
            &client,
            name,
            &format!("ls /workspace | grep -c '^n-' ; echo {name} > /workspace/mine; ps -o args | grep -c '[w]hile true' || true"),
        )
        .await;
        assert_eq!(out["stdout"], "20\n0\n", "{name}: {out}");
    }
    for name in &names {
        assert_eq!(
            sh(&client, name, "cat /workspace/mine").await["stdout"],
            format!("{name}\n")
        );
    }
    assert_eq!(
        sh(&client, "src", "test -e /workspace/mine; echo $?").await["stdout"],
        "1\n"
    );
    // A fork stopped cleanly has a clean workspace too.
    call(&client, "stop_vm", json!({"vm": "f-3"})).await.ok();
    let fsck = std::process::Command::new("e2fsck")
        .args(["-fn"])
        .arg(state.pool().join("vms/f-3/workspace.ext4"))
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    call(
        &client,
        "src__process_signal",
        json!({"id": writer["id"], "signal": "KILL"}),
    )
    .await
    .ok();

    // One fork, named, from the refilled pool.
    wait_ready(&client, "default", 2).await;
    let one = call(&client, "fork_vm", json!({"vm": "src", "name": "g"}))
        .await
        .ok();
    assert_eq!(one["vms"].as_array().unwrap().len(), 1);
    assert_eq!(one["name"], "g");
    assert_eq!(snapshots_of(&client, "src").await, 0);
}
