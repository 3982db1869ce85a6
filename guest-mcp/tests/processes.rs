//! Background processes: start, list, status, output by offset, stdin,
//! signals, limits, and what happens to them when guest-mcp restarts.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::time::Duration;

use common::{Server, call, dies, read_pid};
use rmcp::RoleClient;
use rmcp::service::RunningService;
use serde_json::{Value, json};

/// Polls `process_status` until the process is no longer running.
async fn wait_ended(client: &RunningService<RoleClient, ()>, id: &str) -> Value {
    for _ in 0..250 {
        let status = call(client, "process_status", json!({"id": id})).await.ok();
        if status["state"] != "running" {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("process {id} never ended");
}

#[tokio::test]
async fn a_process_fed_through_stdin_answers_and_exits() {
    let server = Server::start(&[]).await;
    let client = server.client().await;
    let started = call(
        &client,
        "process_start",
        json!({"argv": ["cat"], "stdin": true}),
    )
    .await
    .ok();
    let id = started["id"].as_str().unwrap().to_owned();
    assert_eq!(started["state"], "running");
    assert!(started["pid"].as_u64().unwrap() > 0);

    let w = call(
        &client,
        "process_write_stdin",
        json!({"id": id, "data": "hello\n"}),
    )
    .await
    .ok();
    assert_eq!(w["bytes_written"], 6);
    let out = call(
        &client,
        "process_output",
        json!({"id": id, "wait_ms": 5000}),
    )
    .await
    .ok();
    assert_eq!(out["stdout"]["data"], "hello\n");
    assert_eq!(out["stdout"]["next_offset"], 6);

    call(
        &client,
        "process_write_stdin",
        json!({"id": id, "data": "bye\n", "close": true}),
    )
    .await
    .ok();
    let status = wait_ended(&client, &id).await;
    assert_eq!(status["state"], "exited");
    assert_eq!(status["exit_code"], 0);
    assert_eq!(status["stdout_bytes"], 10);
    // Reading on from the previous offset returns only what is new.
    let out = call(
        &client,
        "process_output",
        json!({"id": id, "stdout_offset": 6}),
    )
    .await
    .ok();
    assert_eq!(out["stdout"]["data"], "bye\n");
    assert_eq!(out["stdout"]["at_end"], true);
    let err = call(
        &client,
        "process_write_stdin",
        json!({"id": id, "data": "x"}),
    )
    .await
    .err();
    assert!(err.contains("has no open stdin"), "{err}");
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn a_process_has_not_ended_while_a_child_still_writes_its_output() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipping: process trees (cgroups) need root");
        assert!(
            std::env::var_os("NEXUS_NO_SKIP").is_none(),
            "this test cannot run here, and NEXUS_NO_SKIP (scripts/test.sh, as CI runs it) forbids skipping"
        );
        return;
    }
    let server = Server::start(&[]).await;
    let client = server.client().await;
    let pidfile = server.dir.path().join("child");
    // The child leaves the process group, and writes after the leader exits.
    let started = call(
        &client,
        "process_start",
        json!({"command": format!(
            "setsid sh -c 'echo $$ > {}; sleep 0.5; echo late; exec sleep 300' & echo bye; exit 3",
            pidfile.display()
        )}),
    )
    .await
    .ok();
    let id = started["id"].as_str().unwrap().to_owned();
    let child = read_pid(&pidfile).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    let status = call(&client, "process_status", json!({"id": id}))
        .await
        .ok();
    assert_eq!(
        status["state"], "running",
        "its output is not complete while the child holds it: {status}"
    );
    let out = call(&client, "process_output", json!({"id": id}))
        .await
        .ok();
    assert_eq!(out["stdout"]["data"], "bye\nlate\n");
    // Signalling the whole of it reaches the child that left the group (its
    // tree); once the pipes close, the process has ended with the leader's
    // exit code and all of its output.
    call(
        &client,
        "process_signal",
        json!({"id": id, "signal": "KILL"}),
    )
    .await
    .ok();
    let status = wait_ended(&client, &id).await;
    assert_eq!(status["exit_code"], 3, "{status}");
    let err = call(&client, "process_signal", json!({"id": id, "group": false}))
        .await
        .err();
    assert!(err.contains("is not running"), "{err}");
    assert!(
        !std::path::Path::new(&format!("/proc/{child}")).exists()
            || std::fs::read_to_string(format!("/proc/{child}/stat"))
                .unwrap_or_default()
                .contains(") Z"),
        "the child that left the group was killed"
    );
    client.cancel().await.unwrap();
}

/// Regression: a process was reported exited before its output pumps had
/// drained, so output read right after the exit could miss its tail.
#[tokio::test]
async fn exited_means_the_output_is_complete() {
    let server = Server::start(&[]).await;
    let client = server.client().await;
    for round in 0..30 {
        let started = call(
            &client,
            "process_start",
            json!({"command": "head -c 300000 /dev/zero | tr '\\0' x; echo END"}),
        )
        .await
        .ok();
        let id = started["id"].as_str().unwrap().to_owned();
        let status = wait_ended(&client, &id).await;
        assert_eq!(status["exit_code"], 0, "round {round}: {status}");
        assert_eq!(status["stdout_bytes"], 300_004, "round {round}: {status}");
        let out = call(
            &client,
            "process_output",
            json!({"id": id, "stdout_offset": 299_000}),
        )
        .await
        .ok();
        let data = out["stdout"]["data"].as_str().unwrap();
        assert!(data.ends_with("xxEND\n"), "round {round}: {data:?}");
    }
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn processes_outlive_the_connection_that_started_them() {
    let server = Server::start(&[]).await;
    let first = server.client().await;
    let id = call(
        &first,
        "process_start",
        json!({"command": "for i in 1 2 3; do echo line $i; sleep 0.2; done"}),
    )
    .await
    .ok()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    first.cancel().await.unwrap();

    let second = server.client().await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let list = call(&second, "process_list", json!({})).await.ok();
    let entry = &list["processes"].as_array().unwrap()[0];
    assert_eq!(entry["id"], id.as_str());
    assert_eq!(entry["state"], "exited");
    let out = call(&second, "process_output", json!({"id": id}))
        .await
        .ok();
    assert_eq!(out["stdout"]["data"], "line 1\nline 2\nline 3\n");
    assert_eq!(out["process"]["exit_code"], 0);
    second.cancel().await.unwrap();
}

#[tokio::test]
async fn the_ring_buffer_says_how_much_it_dropped() {
    let server = Server::start(&["--process-buffer-bytes", "1000"]).await;
    let client = server.client().await;
    let id = call(
        &client,
        "process_start",
        json!({"command": "head -c 5000 /dev/zero | tr '\\0' x"}),
    )
    .await
    .ok()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut out = json!(null);
    for _ in 0..100 {
        out = call(&client, "process_output", json!({"id": id}))
            .await
            .ok();
        if out["process"]["state"] != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(out["stdout"]["dropped_bytes"], 4000);
    assert_eq!(out["stdout"]["offset"], 4000);
    assert_eq!(out["stdout"]["data"].as_str().unwrap().len(), 1000);
    assert!(out.to_string().contains("\"at_end\":true"));
    let text = call(&client, "process_output", json!({"id": id}))
        .await
        .text;
    assert!(text.contains("4000 earlier bytes were dropped"), "{text}");
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn signals_reach_the_whole_group() {
    let server = Server::start(&[]).await;
    let client = server.client().await;
    let pidfile = server.dir.path().join("child");
    let id = call(
        &client,
        "process_start",
        json!({"command": format!("sleep 300 & echo $! > {}; wait", pidfile.display())}),
    )
    .await
    .ok()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let child = read_pid(&pidfile).await;
    let sent = call(
        &client,
        "process_signal",
        json!({"id": id, "signal": "KILL"}),
    )
    .await
    .ok();
    assert_eq!(sent["signal"], "KILL");
    assert!(dies(child).await, "the group's other member survived");
    let status = wait_ended(&client, &id).await;
    assert_eq!(status["signal"], 9);
    let err = call(&client, "process_signal", json!({"id": id}))
        .await
        .err();
    assert!(err.contains("is not running"), "{err}");
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn bad_process_requests_are_clear_tool_errors() {
    let server = Server::start(&["--max-processes", "2"]).await;
    let client = server.client().await;
    let err = call(&client, "process_status", json!({"id": "p99"}))
        .await
        .err();
    assert!(err.contains("no background process \"p99\""), "{err}");
    let err = call(&client, "process_output", json!({"id": "nonsense"}))
        .await
        .err();
    assert!(err.contains("process_list shows the ids"), "{err}");
    let err = call(&client, "process_start", json!({})).await.err();
    assert!(err.contains("exactly one of `command`"), "{err}");
    let err = call(
        &client,
        "process_start",
        json!({"argv": ["/no/such/program"]}),
    )
    .await
    .err();
    assert!(
        err.contains("could not start \"/no/such/program\""),
        "{err}"
    );

    let a = call(&client, "process_start", json!({"argv": ["sleep", "300"]}))
        .await
        .ok();
    call(&client, "process_start", json!({"argv": ["sleep", "300"]}))
        .await
        .ok();
    let err = call(&client, "process_start", json!({"argv": ["true"]}))
        .await
        .err();
    assert!(
        err.contains("2 background processes are kept already"),
        "{err}"
    );
    let err = call(
        &client,
        "process_signal",
        json!({"id": a["id"], "signal": "BOOM"}),
    )
    .await
    .err();
    assert!(err.contains("`signal` \"BOOM\" is unknown"), "{err}");
    let err = call(
        &client,
        "process_output",
        json!({"id": a["id"], "wait_ms": 999999}),
    )
    .await
    .err();
    assert!(err.contains("`wait_ms` must be at most 30000"), "{err}");
    // A finished process makes room for a new one.
    call(
        &client,
        "process_signal",
        json!({"id": a["id"], "signal": "KILL"}),
    )
    .await
    .ok();
    tokio::time::sleep(Duration::from_millis(300)).await;
    call(&client, "process_start", json!({"argv": ["true"]}))
        .await
        .ok();
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn a_restarted_guest_mcp_kills_and_reports_the_processes_it_lost() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("processes.json");
    let pidfile = dir.path().join("sleep.pid");
    let state_arg = state.display().to_string();
    let mut server = Server::start_in(dir, &["--process-state", &state_arg]).await;
    let client = server.client().await;
    call(
        &client,
        "process_start",
        json!({"command": format!("echo $$ > {}; exec sleep 300", pidfile.display())}),
    )
    .await
    .ok();
    let sleeper = read_pid(&pidfile).await;
    drop(client);
    // guest-mcp crashes; the sleep is orphaned with its pipes gone.
    server.child.start_kill().unwrap();
    server.child.wait().await.unwrap();
    assert!(common::alive(sleeper));

    let server = Server::start_in(server.dir, &["--process-state", &state_arg]).await;
    assert!(
        dies(sleeper).await,
        "the lost process {sleeper} was left running"
    );
    let client = server.client().await;
    let list = call(&client, "process_list", json!({})).await.ok();
    let lost = &list["processes"].as_array().unwrap()[0];
    assert_eq!(lost["state"], "lost");
    assert_eq!(lost["pid"], sleeper);
    assert!(
        lost["reason"]
            .as_str()
            .unwrap()
            .contains("guest-mcp restarted while it ran"),
        "{lost}"
    );
    client.cancel().await.unwrap();
}

/// Reads a process's stdout from `at` until it holds `wanted` (10 s).
async fn read_until(
    client: &RunningService<RoleClient, ()>,
    id: &str,
    at: &mut u64,
    wanted: &str,
) -> String {
    let mut seen = String::new();
    for _ in 0..100 {
        let out = call(
            client,
            "process_output",
            json!({"id": id, "stdout_offset": *at, "wait_ms": 100}),
        )
        .await
        .ok();
        seen.push_str(out["stdout"]["data"].as_str().unwrap());
        *at = out["stdout"]["next_offset"].as_u64().unwrap();
        if seen.contains(wanted) {
            return seen;
        }
    }
    panic!("{wanted:?} never came; got {seen:?}");
}

#[tokio::test]
async fn a_process_on_a_terminal_is_typed_to_resized_and_interrupted() {
    let server = Server::start(&[]).await;
    let client = server.client().await;
    let started = call(
        &client,
        "process_start",
        json!({"argv": ["sh"], "tty": {"rows": 24, "cols": 80}, "env": {"PS1": "$ "}}),
    )
    .await
    .ok();
    let id = started["id"].as_str().unwrap().to_owned();
    assert_eq!(
        (started["tty"].as_bool(), started["stdin_open"].as_bool()),
        (Some(true), Some(true))
    );
    let mut at = 0;
    let type_ = |text: &str| {
        let (client, id, text) = (&client, id.clone(), text.to_owned());
        async move {
            call(
                client,
                "process_write_stdin",
                json!({"id": id, "data": text}),
            )
            .await
            .ok();
        }
    };
    // It is a terminal, of the size asked; the echo of what is typed
    // ("$((6*7))") is not what ran ("42").
    type_("tty -s && echo on-a-tty-$((6*7)); stty size\n").await;
    let seen = read_until(&client, &id, &mut at, "24 80").await;
    assert!(seen.contains("on-a-tty-42"), "{seen:?}");
    // Resized: the shell's next stty sees the new size.
    let resized = call(
        &client,
        "process_resize",
        json!({"id": id, "rows": 40, "cols": 120}),
    )
    .await
    .ok();
    assert_eq!(resized["rows"], 40);
    type_("stty size\n").await;
    read_until(&client, &id, &mut at, "40 120").await;
    // Ctrl-C, typed, interrupts the foreground command, not the shell
    // (typed once the command surely runs).
    type_("sh -c 'echo go-$((1+1)); exec sleep 100'\n").await;
    read_until(&client, &id, &mut at, "go-2").await;
    type_("\u{3}").await;
    type_("echo after-$((1+1))\n").await;
    read_until(&client, &id, &mut at, "after-2").await;
    // Neither side of the terminal leaked into what runs on it: no
    // descriptor but the terminal's own.
    type_("ls -l /proc/$$/fd; echo listed-$((2+2))\n").await;
    let fds = read_until(&client, &id, &mut at, "listed-4").await;
    assert!(!fds.contains("ptmx"), "the master leaked: {fds}");
    // Bad sizes and a process without a terminal are refused, by name.
    let bad = call(
        &client,
        "process_resize",
        json!({"id": id, "rows": 0, "cols": 80}),
    )
    .await
    .err();
    assert!(bad.contains("between 1 and 1000"), "{bad}");
    let bad = call(
        &client,
        "process_start",
        json!({"argv": ["true"], "tty": {"rows": 2000, "cols": 80}}),
    )
    .await
    .err();
    assert!(bad.contains("between 1 and 1000"), "{bad}");
    let plain = call(&client, "process_start", json!({"argv": ["sleep", "5"]}))
        .await
        .ok();
    let bad = call(
        &client,
        "process_resize",
        json!({"id": plain["id"], "rows": 10, "cols": 10}),
    )
    .await
    .err();
    assert!(bad.contains("has no terminal"), "{bad}");
    // exit: the process ends with the shell's code, though a background
    // job still holds the terminal (it is hung up, as a closed terminal's).
    type_("sleep 1000 & echo bg-$((3+3))\n").await;
    read_until(&client, &id, &mut at, "bg-6").await;
    type_("exit 7\n").await;
    let ended = wait_ended(&client, &id).await;
    assert_eq!(ended["exit_code"], 7, "{ended}");
    // close on a terminal types Ctrl-D: a reading program sees the end.
    let cat = call(
        &client,
        "process_start",
        json!({"argv": ["cat"], "tty": {"rows": 5, "cols": 20}}),
    )
    .await
    .ok();
    let closed = call(
        &client,
        "process_write_stdin",
        json!({"id": cat["id"], "data": "", "close": true}),
    )
    .await
    .ok();
    assert_eq!(closed["stdin_open"], true, "{closed}");
    let ended = wait_ended(&client, cat["id"].as_str().unwrap()).await;
    assert_eq!(ended["exit_code"], 0, "{ended}");
    client.cancel().await.unwrap();
}
