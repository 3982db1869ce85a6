//! Root in a guest attacks nexusd, with its own program (uploaded with
//! write_file) and the shell: it stops guest-mcp, floods the readiness
//! port, serves MCP badly on guest-mcp's port (endless nextCursor, endless
//! 10 MiB progress), prints 9 and 20 MB, floods the console, forks without
//! end, fills its workspace and powers off. Throughout, another VM keeps
//! answering, every management call answers within its bound, nexusd's
//! memory stays bounded, the console log stays under its cap, and
//! afterwards nothing is left running. The figures are printed.

#![allow(clippy::unwrap_used, clippy::print_stderr)] // test code: a panic is the failure report

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{State, call, can_run};
use nexus_integration::{ensure_minimal_image, hostile_guest_binary, processes_mentioning};
use rmcp::service::RunningService;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Value, json};

type Client = RunningService<RoleClient, ()>;

/// Bounds this test holds nexusd to.
const MANAGEMENT_BOUND: Duration = Duration::from_secs(5);
const BYSTANDER_BOUND: Duration = Duration::from_secs(15);
const STOP_BOUND: Duration = Duration::from_secs(20);
/// nexusd (a debug build here) while guests send 10-16 MiB messages: its
/// largest transient copies of them, and what the allocator keeps.
const RSS_BOUND_KIB: u64 = 400 << 10;
const CONSOLE_CAP: u64 = 4 << 20;

/// A management call, timed against its bound.
async fn managed(client: &Client, tool: &str, args: Value) -> (Value, Duration) {
    let started = Instant::now();
    let out = tokio::time::timeout(MANAGEMENT_BOUND * 4, call(client, tool, args.clone()))
        .await
        .unwrap_or_else(|_| panic!("{tool} {args} did not answer"));
    let took = started.elapsed();
    assert!(took < MANAGEMENT_BOUND, "{tool} took {took:?}");
    (out.json, took)
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

async fn upload_helper(client: &Client, vm: &str) {
    let binary = std::fs::read(hostile_guest_binary().unwrap()).unwrap();
    // In chunks: one HTTP request body is at most 4 MiB.
    for (i, chunk) in binary.chunks(1 << 20).enumerate() {
        let encoded = base64::engine::general_purpose::STANDARD.encode(chunk);
        call(
            client,
            &format!("{vm}__write_file"),
            json!({"path": "/workspace/hg", "content_base64": encoded, "mode": "755", "append": i > 0}),
        )
        .await
        .ok();
    }
}

async fn tools_list_within(client: &Client, bound: Duration) -> usize {
    let started = Instant::now();
    let tools = tokio::time::timeout(bound * 4, client.list_all_tools())
        .await
        .expect("tools/list answers")
        .unwrap();
    let took = started.elapsed();
    assert!(took < bound, "tools/list took {took:?}");
    tools.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_guest_cannot_stall_flood_or_outlive_nexusd() {
    if !can_run() {
        return;
    }
    let (image_dir, _) = ensure_minimal_image().unwrap();
    let state = State::new();
    state.with_image("default", &image_dir);
    let (serve, url) = common::serve(&state).await;
    let nexusd = state.daemon_pid().unwrap();
    let client = ().serve(state.http(url.clone())).await.unwrap();
    client
        .set_response_cache_config(rmcp::ClientCacheConfig::disabled())
        .await;

    for vm in ["bystander", "h"] {
        call(&client, "spawn_vm", json!({"name": vm, "memory_mib": 192}))
            .await
            .ok();
    }
    upload_helper(&client, "h").await;

    // Another VM keeps answering all along; nexusd's memory is watched.
    let done = Arc::new(AtomicBool::new(false));
    let worst_ms = Arc::new(AtomicU64::new(0));
    let peak_rss = Arc::new(AtomicU64::new(0));
    let bystander = {
        let (url, token, done, worst_ms, peak_rss) = (
            url.clone(),
            state.admin_token(),
            done.clone(),
            worst_ms.clone(),
            peak_rss.clone(),
        );
        tokio::spawn(async move {
            let client = ().serve(nexus_integration::nexusd::http(url, token)).await.unwrap();
            let mut calls = 0u64;
            while !done.load(Ordering::SeqCst) {
                let started = Instant::now();
                let out = tokio::time::timeout(
                    BYSTANDER_BOUND,
                    call(&client, "bystander__exec", json!({"command": "echo ok"})),
                )
                .await
                .expect("the bystander answers within its bound")
                .ok();
                assert_eq!(out["stdout"], "ok\n");
                worst_ms.fetch_max(started.elapsed().as_millis() as u64, Ordering::SeqCst);
                peak_rss.fetch_max(rss_kib(nexusd), Ordering::SeqCst);
                calls += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            client.cancel().await.unwrap();
            calls
        })
    };

    // 1. guest-mcp stopped (SIGSTOP): listing and management do not wait
    // on it; a call to it ends at its deadline and marks it unresponsive;
    // destroying it is bounded.
    call(
        &client,
        "h__process_start",
        json!({"command": "sleep 0.3; kill -STOP $(pidof guest-mcp)"}),
    )
    .await
    .ok();
    tokio::time::sleep(Duration::from_millis(800)).await;
    tools_list_within(&client, MANAGEMENT_BOUND).await;
    let started = Instant::now();
    let err = call(
        &client,
        "h__exec",
        json!({"command": "true", "timeout_s": 1}),
    )
    .await
    .err();
    assert!(err.contains("did not answer exec within"), "{err}");
    eprintln!(
        "a call to a stopped guest-mcp ended after {:?}",
        started.elapsed()
    );
    let (info, _) = managed(&client, "get_vm", json!({"vm": "h"})).await;
    assert!(
        info["guest"].as_str().unwrap().starts_with("unresponsive"),
        "{info}"
    );
    tools_list_within(&client, MANAGEMENT_BOUND).await;
    // A pause waits on its freeze (which the stopped guest-mcp never
    // answers) holding the VM: a destroy does not wait for it.
    let pausing = {
        let client = ().serve(state.http(url.clone())).await.unwrap();
        tokio::spawn(async move { call(&client, "pause_vm", json!({"vm": "h"})).await.err() })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    call(&client, "destroy_vm", json!({"vm": "h"})).await.ok();
    let destroy = started.elapsed();
    assert!(
        destroy < STOP_BOUND,
        "destroying a wedged VM took {destroy:?}"
    );
    let err = pausing.await.unwrap();
    assert!(err.contains("being destroyed"), "{err}");
    eprintln!("the pause under way when the VM was destroyed: {err}");
    eprintln!(
        "destroying a VM whose guest-mcp is stopped took {destroy:?}; nexusd RSS now {} MiB",
        rss_kib(nexusd) >> 10
    );

    // 2. The readiness port flooded (4 GiB, no newline), then guest-mcp's
    // port served badly: an endless tool list, endless 10 MiB progress.
    call(&client, "spawn_vm", json!({"name": "h", "memory_mib": 192}))
        .await
        .ok();
    upload_helper(&client, "h").await;
    // A process out of guest-mcp's reach (its own session, the root
    // cgroup) kills guest-mcp and floods the readiness port while init
    // starts guest-mcp again.
    call(
        &client,
        "h__exec",
        json!({"command": "setsid sh -c 'echo $$ > /sys/fs/cgroup/cgroup.procs; sleep 0.3; kill -9 $(pidof guest-mcp); exec /workspace/hg flood-ready > /workspace/flood.out 2>&1' > /dev/null 2>&1 & sleep 0.1"}),
    )
    .await
    .ok();
    let flooded = Instant::now();
    let mut back = None;
    while flooded.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let out = call(
            &client,
            "h__exec",
            json!({"command": "cat /workspace/flood.out; pidof hg"}),
        )
        .await;
        if !out.is_error && flooded.elapsed() > Duration::from_secs(1) {
            back = Some((
                flooded.elapsed(),
                out.json["stdout"].as_str().unwrap_or("").to_owned(),
            ));
            break;
        }
    }
    let (after, flood_report) =
        back.expect("guest-mcp answers again while its readiness port is flooded");
    eprintln!(
        "guest-mcp killed and readiness flooded: tools answer again after {after:?} (flooder: {flood_report:?}); nexusd RSS now {} MiB",
        rss_kib(nexusd) >> 10
    );
    managed(&client, "list_vms", json!({})).await;
    tools_list_within(&client, MANAGEMENT_BOUND).await;
    // Root replaces guest-mcp; init starts the fake in its place. Its tool
    // list never ends at first; then its calls answer with endless 10 MiB
    // progress notifications.
    call(
        &client,
        "h__process_start",
        json!({"command": "cp /workspace/hg /usr/sbin/guest-mcp.new; mv /usr/sbin/guest-mcp.new /usr/sbin/guest-mcp; sleep 0.2; kill -9 $(pidof guest-mcp)"}),
    )
    .await
    .ok();
    tokio::time::sleep(Duration::from_secs(2)).await;
    tools_list_within(&client, MANAGEMENT_BOUND).await;
    managed(&client, "list_vms", json!({})).await;
    let err = call(&client, "h__exec", json!({"command": "true"}))
        .await
        .err();
    assert!(err.contains("tool list goes on past"), "{err}");
    let (info, _) = managed(&client, "get_vm", json!({"vm": "h"})).await;
    assert!(
        info["guest"].as_str().unwrap().starts_with("unresponsive"),
        "{info}"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let started = Instant::now();
    let err = call(
        &client,
        "h__exec",
        json!({"command": "true", "timeout_s": 1}),
    )
    .await
    .err();
    assert!(err.contains("did not answer exec within"), "{err}");
    eprintln!(
        "fake guest-mcp flooding 10 MiB progress: the call ended after {:?}; nexusd RSS now {} MiB",
        started.elapsed(),
        rss_kib(nexusd) >> 10
    );
    tools_list_within(&client, MANAGEMENT_BOUND).await;
    let started = Instant::now();
    call(&client, "destroy_vm", json!({"vm": "h"})).await.ok();
    assert!(started.elapsed() < STOP_BOUND);

    // 3. Output, console, processes and disk, from the shell.
    call(&client, "spawn_vm", json!({"name": "h", "memory_mib": 192}))
        .await
        .ok();
    for mb in [9, 20] {
        let started = Instant::now();
        let out = call(
            &client,
            "h__exec",
            json!({"command": format!("head -c {mb}000000 /dev/zero | tr '\\0' x"), "max_output_bytes": 16_777_216}),
        )
        .await
        .ok();
        let kept = out["stdout"].as_str().unwrap().len();
        assert!(kept > 4_000_000, "{mb} MB: kept {kept}");
        eprintln!(
            "{mb} MB of output: answered in {:?}, {kept} bytes kept, truncated {}",
            started.elapsed(),
            out["stdout_truncated"]
        );
    }
    call(
        &client,
        "h__exec",
        json!({"command": "timeout 5 cat /dev/urandom > /dev/console; true", "timeout_s": 30}),
    )
    .await
    .ok();
    let console = state.path().join("logs/h.console");
    let on_disk = std::fs::metadata(&console).map_or(0, |m| m.len())
        + std::fs::metadata(nexus_vmm::console::older(&console)).map_or(0, |m| m.len());
    assert!(on_disk <= CONSOLE_CAP, "console log {on_disk} bytes");
    let (console_text, took) =
        managed(&client, "read_console", json!({"vm": "h", "lines": 100})).await;
    assert!(console_text["text"].is_string());
    eprintln!(
        "console flood: {on_disk} bytes on disk (cap {CONSOLE_CAP}); read_console took {took:?}"
    );

    let bomb = call(
        &client,
        "h__exec",
        json!({"command": "b() { b | b & }; b; sleep 30", "timeout_s": 5}),
    )
    .await
    .ok();
    assert_eq!(bomb["timed_out"], true, "{bomb}");
    let out = call(
        &client,
        "h__exec",
        json!({"command": "sleep 1; ps | wc -l"}),
    )
    .await
    .ok();
    let left: u32 = out["stdout"].as_str().unwrap().trim().parse().unwrap();
    assert!(left < 100, "{left} processes left after the fork bomb");
    eprintln!("fork bomb: contained, {left} processes in the VM afterwards");

    let fill = call(
        &client,
        "h__exec",
        json!({"command": "dd if=/dev/zero of=/workspace/fill bs=1M 2>&1; df -k /workspace | tail -1", "timeout_s": 120}),
    )
    .await
    .ok();
    let said = format!("{}{}", fill["stdout"], fill["stderr"]);
    assert!(said.contains("No space left"), "{said}");
    let out = call(
        &client,
        "h__exec",
        json!({"command": "rm /workspace/fill; echo freed"}),
    )
    .await
    .ok();
    assert_eq!(out["stdout"], "freed\n");

    // 4. It powers off: nexusd sees it at once. (It sabotages its next
    // boot first: guest-mcp will never start.)
    call(
        &client,
        "h__process_start",
        json!({"command": "echo 'exec sleep 1000000' > /etc/nexus/guest-mcp.sh; sync; sleep 0.2; reboot -f"}),
    )
    .await
    .ok();
    let started = Instant::now();
    loop {
        let (info, _) = managed(&client, "get_vm", json!({"vm": "h"})).await;
        if info["state"] == "stopped" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{info}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "a VM that powered off was seen stopped after {:?} (including the 0.2 s before it did)",
        started.elapsed()
    );
    let tools = client.list_all_tools().await.unwrap();
    assert!(!tools.iter().any(|t| t.name.starts_with("h__")));

    done.store(true, Ordering::SeqCst);
    let calls = bystander.await.unwrap();
    let (worst, peak) = (
        worst_ms.load(Ordering::SeqCst),
        peak_rss.load(Ordering::SeqCst),
    );
    eprintln!(
        "bystander: {calls} execs, the slowest {worst} ms; nexusd peak RSS {} MiB",
        peak >> 10
    );
    assert!(peak < RSS_BOUND_KIB, "nexusd RSS peaked at {peak} KiB");

    // 5. Its boot never gets ready (nexusd would wait 120 s): a destroy
    // ends the boot at once.
    let peer = client.peer().clone();
    let booting = tokio::spawn(async move {
        peer.call_tool(
            rmcp::model::CallToolRequestParams::new("start_vm")
                .with_arguments(json!({"vm": "h"}).as_object().unwrap().clone()),
        )
        .await
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = Instant::now();
    call(&client, "destroy_vm", json!({"vm": "h"})).await.ok();
    let destroy = started.elapsed();
    let boot = booting.await.unwrap().unwrap();
    assert_eq!(boot.is_error, Some(true), "{boot:?}");
    assert!(format!("{boot:?}").contains("being destroyed"), "{boot:?}");
    assert!(
        destroy < STOP_BOUND,
        "destroying a VM mid-boot took {destroy:?}"
    );
    eprintln!("destroying a VM whose boot never gets ready took {destroy:?}");

    call(&client, "destroy_vm", json!({"vm": "bystander"}))
        .await
        .ok();
    client.cancel().await.unwrap();
    assert!(serve.stop().await.success());
    let left = processes_mentioning(state.path().to_str().unwrap());
    assert!(left.is_empty(), "processes left running: {left:?}");
}
