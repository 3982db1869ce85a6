//! `exec` through a real MCP client: progress streaming, cancellation by
//! notification and by the client going away, timeouts, truncation,
//! concurrency and its limit.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Server, call, dies, read_pid};
use rmcp::model::{CallToolRequestParams, ClientRequest, ProgressNotificationParam, Request};
use rmcp::service::{NotificationContext, PeerRequestOptions};
use rmcp::{ClientHandler, RoleClient};
use serde_json::json;

/// A client that records the progress notifications it gets.
#[derive(Clone, Default)]
struct Recorder {
    progress: Arc<Mutex<Vec<ProgressNotificationParam>>>,
}

impl ClientHandler for Recorder {
    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _: NotificationContext<RoleClient>,
    ) {
        self.progress.lock().unwrap().push(params);
    }
}

fn exec_request(args: serde_json::Value) -> ClientRequest {
    ClientRequest::CallToolRequest(Request::new(
        CallToolRequestParams::new("exec").with_arguments(args.as_object().unwrap().clone()),
    ))
}

#[tokio::test]
async fn output_streams_as_progress_notifications_before_the_result() {
    let server = Server::start(&[]).await;
    let recorder = Recorder::default();
    let client = server.client_with(recorder.clone()).await;
    let handle = client
        .send_cancellable_request(
            exec_request(
                json!({"command": "echo one; sleep 0.3; echo two >&2; sleep 0.3; echo three"}),
            ),
            PeerRequestOptions::no_options(),
        )
        .await
        .unwrap();
    handle.await_response().await.unwrap();
    let progress = recorder.progress.lock().unwrap().clone();
    let messages: Vec<String> = progress.iter().filter_map(|p| p.message.clone()).collect();
    assert!(
        messages.len() >= 3,
        "one notification per burst of output: {messages:?}"
    );
    assert_eq!(messages[0], "stdout: one\n");
    assert!(
        messages.contains(&"stderr: two\n".to_owned()),
        "{messages:?}"
    );
    assert!(
        messages.contains(&"stdout: three\n".to_owned()),
        "{messages:?}"
    );
    let counts: Vec<f64> = progress.iter().map(|p| p.progress).collect();
    assert!(
        counts.windows(2).all(|w| w[0] < w[1]),
        "progress increases: {counts:?}"
    );
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn cancellation_kills_the_whole_process_group() {
    let server = Server::start(&[]).await;
    let client = server.client().await;
    let pidfile = server.dir.path().join("pid");
    let handle = client
        .send_cancellable_request(
            exec_request(
                json!({"command": format!("sleep 300 & echo $! > {}; wait", pidfile.display())}),
            ),
            PeerRequestOptions::no_options(),
        )
        .await
        .unwrap();
    let pid = read_pid(&pidfile).await;
    handle.cancel(Some("test".into())).await.unwrap();
    assert!(
        dies(pid).await,
        "the background sleep {pid} survived cancellation"
    );
    // The server is still there for the next call.
    assert_eq!(
        call(&client, "exec", json!({"command": "echo ok"}))
            .await
            .ok()["stdout"],
        "ok\n"
    );
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn a_client_that_goes_away_takes_its_commands_with_it() {
    let server = Server::start(&[]).await;
    let client = server.client().await;
    let pidfile = server.dir.path().join("pid");
    let _handle = client
        .send_cancellable_request(
            exec_request(
                json!({"command": format!("sleep 300 & echo $! > {}; wait", pidfile.display())}),
            ),
            PeerRequestOptions::no_options(),
        )
        .await
        .unwrap();
    let pid = read_pid(&pidfile).await;
    drop(_handle);
    client.cancel().await.unwrap();
    assert!(
        dies(pid).await,
        "the background sleep {pid} outlived its client"
    );
}

#[tokio::test]
async fn timeouts_and_truncation_are_reported_in_the_result() {
    let server = Server::start(&[]).await;
    let client = server.client().await;
    let r = call(
        &client,
        "exec",
        json!({"command": "echo start; sleep 30", "timeout_s": 1}),
    )
    .await
    .ok();
    assert_eq!(r["timed_out"], true);
    assert_eq!(r["signal"], 9);
    assert_eq!(r["stdout"], "start\n");
    let r = call(
        &client,
        "exec",
        json!({"command": "seq 100000; seq 10 >&2", "max_output_bytes": 100}),
    )
    .await;
    assert!(r.text.contains("(truncated)"), "{}", r.text);
    let r = r.ok();
    assert_eq!(r["stdout"].as_str().unwrap().len(), 100);
    assert_eq!(r["stdout_truncated"], true);
    assert_eq!(r["stderr_truncated"], false);
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn twenty_concurrent_execs_all_answer_correctly() {
    let server = Arc::new(Server::start(&[]).await);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let server = server.clone();
        tasks.push(tokio::spawn(async move {
            let client = server.client().await;
            let r = call(
                &client,
                "exec",
                json!({"command": format!("sleep 0.5; echo {i}")}),
            )
            .await
            .ok();
            client.cancel().await.unwrap();
            r["stdout"].as_str().unwrap().to_owned()
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        assert_eq!(task.await.unwrap(), format!("{i}\n"));
    }
}

#[tokio::test]
async fn the_concurrent_exec_limit_is_a_clear_error_not_a_hang() {
    let server = Server::start(&["--max-concurrent-execs", "2"]).await;
    let client = Arc::new(server.client().await);
    let mut running = Vec::new();
    for _ in 0..2 {
        let client = client.clone();
        running.push(tokio::spawn(async move {
            call(&client, "exec", json!({"command": "sleep 2"}))
                .await
                .ok();
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let err = call(&client, "exec", json!({"command": "true"}))
        .await
        .err();
    assert!(err.contains("2 execs are running already"), "{err}");
    for task in running {
        task.await.unwrap();
    }
    call(&client, "exec", json!({"command": "true"})).await.ok();
}
