//! Pause and resume of a running VM (its VMM and vsock helper stopped and
//! continued): its tools answer "paused" at once, a call under way when
//! it pauses is answered so, a snapshot of it is consistent and forks,
//! its processes carry on after resume (also when a nexusd killed meanwhile
//! adopted it, paused), and a paused VM stops and is destroyed cleanly.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::time::{Duration, Instant};

use common::{State, call, can_run, sh};
use nexus_integration::ensure_minimal_image;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_vm_answers_paused_snapshots_consistently_and_resumes_where_it_was() {
    if !can_run() {
        return;
    }
    let (image_dir, _) = ensure_minimal_image().unwrap();
    let state = State::new();
    state.with_image("default", &image_dir);
    let client = state.client().await;
    call(
        &client,
        "spawn_vm",
        json!({"name": "p1", "memory_mib": 256}),
    )
    .await
    .ok();
    // Written just before the pause, never synced by the test: the pause
    // flushes it.
    sh(&client, "p1", "echo kept > /workspace/before.txt").await;
    let counter = call(
        &client,
        "p1__process_start",
        json!({"command": "i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.1; done"}),
    )
    .await
    .ok();
    let counting = counter["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A call under way when the VM pauses is answered at once, saying so.
    let slow = {
        let client = state.client().await;
        tokio::spawn(async move {
            let started = Instant::now();
            let answer = call(
                &client,
                "p1__exec",
                json!({"command": "sleep 5; echo late"}),
            )
            .await;
            (answer.err(), started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let paused = call(&client, "pause_vm", json!({"vm": "p1"})).await.ok();
    assert_eq!(paused["state"], "paused");
    let (err, took) = slow.await.unwrap();
    assert!(err.contains("was paused while exec ran"), "{err}");
    assert!(took < Duration::from_secs(30), "{took:?}");
    // Its host processes are stopped (state T), not merely marked.
    let run = state.path().join("run");
    let pids = nexus_integration::processes_mentioning(run.to_str().unwrap());
    assert!(pids.len() >= 2, "the VMM and its helper: {pids:?}");
    let stopped = |pid: &u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with('T'))
            })
            .unwrap_or(false)
    };
    assert!(pids.iter().all(stopped), "all stopped: {pids:?}");
    let listed = call(&client, "list_vms", json!({})).await.ok();
    assert_eq!(listed["vms"][0]["state"], "paused");
    // Its guest is not said to answer.
    assert_eq!(listed["vms"][0]["guest"], "paused", "{listed}");
    // Its tools refuse at once, naming what to do; nothing waits on it.
    let asked = Instant::now();
    let err = call(&client, "p1__exec", json!({"command": "true"}))
        .await
        .err();
    assert!(err.contains("is paused: resume_vm p1 first"), "{err}");
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    // Twice, or a restore (which needs the guest): refused, said why.
    let err = call(&client, "pause_vm", json!({"vm": "p1"})).await.err();
    assert!(err.contains("paused already"), "{err}");

    // A snapshot while paused, forked: the fork has what was written.
    call(
        &client,
        "snapshot_drive",
        json!({"vm": "p1", "name": "asleep"}),
    )
    .await
    .ok();
    let err = call(
        &client,
        "restore_snapshot",
        json!({"vm": "p1", "snapshot": "asleep"}),
    )
    .await
    .err();
    assert!(err.contains("resume_vm p1 first"), "{err}");
    let fork = call(
        &client,
        "fork_vm",
        json!({"vm": "p1", "snapshot": "asleep", "name": "p2"}),
    )
    .await
    .ok();
    assert_eq!(fork["state"], "running");
    let seen = sh(&client, "p2", "cat /workspace/before.txt").await;
    assert_eq!(seen["stdout"], "kept\n", "{seen}");

    // A nexusd killed while they are paused: the next one adopts them
    // paused (their processes still stopped, their tools refusing), not
    // continued.
    call(&client, "pause_vm", json!({"vm": "p2"})).await.ok();
    let daemon = state
        .daemon_pid()
        .expect("a daemon holds the state directory");
    kill(Pid::from_raw(daemon), Signal::SIGKILL).unwrap();
    assert!(state.wait_daemon_gone(Duration::from_secs(10)));
    drop(client);
    let client = state.client().await;
    let adopted = call(&client, "get_vm", json!({"vm": "p1"})).await.ok();
    assert_eq!(adopted["state"], "paused", "{adopted}");
    assert_eq!(adopted["guest"], "paused", "{adopted}");
    assert!(pids.iter().all(stopped), "all still stopped: {pids:?}");
    let err = call(&client, "p1__exec", json!({"command": "true"}))
        .await
        .err();
    assert!(err.contains("is paused: resume_vm p1 first"), "{err}");

    // Resumed: the same process counts on; the workspace takes writes.
    let asked = Instant::now();
    let resumed = call(&client, "resume_vm", json!({"vm": "p1"})).await.ok();
    eprintln!(
        "resume_vm of a VM adopted paused took {:?}",
        asked.elapsed()
    );
    assert_eq!(resumed["state"], "running");
    assert_eq!(resumed["guest"], "answering", "{resumed}");
    assert!(!pids.iter().any(stopped), "none stopped after resume");
    let status = call(&client, "p1__process_status", json!({"id": counting}))
        .await
        .ok();
    assert_eq!(status["state"], "running", "{status}");
    let first = sh(&client, "p1", "cat /tmp/counter").await["stdout"]
        .as_str()
        .unwrap()
        .trim()
        .parse::<u64>()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let later = sh(
        &client,
        "p1",
        "cat /tmp/counter; echo more > /workspace/after.txt && echo wrote",
    )
    .await;
    let text = later["stdout"].as_str().unwrap();
    let next: u64 = text.lines().next().unwrap().trim().parse().unwrap();
    assert!(next > first, "the counter went on: {first} then {next}");
    assert!(text.ends_with("wrote\n"), "thawed: {text}");
    let err = call(&client, "resume_vm", json!({"vm": "p1"})).await.err();
    assert!(err.contains("is not paused"), "{err}");

    // A paused VM stops (cleanly: it runs again to power off).
    call(&client, "pause_vm", json!({"vm": "p1"})).await.ok();
    let stopped = call(&client, "stop_vm", json!({"vm": "p1"})).await.ok();
    assert_eq!(stopped["state"], "stopped");
    let err = call(&client, "pause_vm", json!({"vm": "p1"})).await.err();
    assert!(err.contains("not running"), "{err}");
    // Started again, its workspace is whole (written after the resume).
    call(&client, "start_vm", json!({"vm": "p1"})).await.ok();
    let after = sh(
        &client,
        "p1",
        "cat /workspace/after.txt /workspace/before.txt",
    )
    .await;
    assert_eq!(after["stdout"], "more\nkept\n", "{after}");
    // A paused VM (adopted so) is destroyed cleanly, nothing of it left
    // running.
    let p2 = call(&client, "get_vm", json!({"vm": "p2"})).await.ok();
    assert_eq!(p2["state"], "paused", "{p2}");
    let asked = Instant::now();
    call(&client, "destroy_vm", json!({"vm": "p2"})).await.ok();
    eprintln!(
        "destroy_vm of a VM adopted paused took {:?}",
        asked.elapsed()
    );
    call(&client, "destroy_vm", json!({"vm": "p1"})).await.ok();
    assert!(
        nexus_integration::processes_mentioning(run.to_str().unwrap()).is_empty(),
        "no VM process is left"
    );
}
