//! The proxied guest tools beyond a plain call: the tool list changes (and
//! clients are told) as VMs come and go, a guest's progress reaches the
//! caller, and cancelling a proxied call kills the guest's work.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{State, call, can_run};
use nexus_integration::ensure_minimal_image;
use rmcp::model::{CallToolRequestParams, ClientRequest, ProgressNotificationParam, Request};
use rmcp::service::{NotificationContext, PeerRequestOptions};
use rmcp::transport::TokioChildProcess;
use rmcp::{ClientHandler, RoleClient, ServiceExt};
use serde_json::json;

#[derive(Clone, Default)]
struct Watcher {
    list_changed: Arc<AtomicUsize>,
    progress: Arc<Mutex<Vec<String>>>,
}

impl ClientHandler for Watcher {
    async fn on_tool_list_changed(&self, _: NotificationContext<RoleClient>) {
        self.list_changed.fetch_add(1, Ordering::SeqCst);
    }
    async fn on_progress(&self, p: ProgressNotificationParam, _: NotificationContext<RoleClient>) {
        self.progress
            .lock()
            .unwrap()
            .push(p.message.unwrap_or_default());
    }
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..250 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_changes_progress_and_cancellation_cross_the_proxy() {
    if !can_run() {
        return;
    }
    let (image_dir, _) = ensure_minimal_image().unwrap();
    let state = State::new();
    state.with_image("default", &image_dir);
    let watcher = Watcher::default();
    let client = watcher
        .clone()
        .serve(TokioChildProcess::new(state.command()).unwrap())
        .await
        .unwrap();
    let caps = client
        .peer_info()
        .unwrap()
        .capabilities
        .tools
        .clone()
        .unwrap();
    assert_eq!(caps.list_changed, Some(true));

    // spawn_vm reports its steps to a client that asks for progress.
    let handle = client
        .send_cancellable_request(
            ClientRequest::CallToolRequest(Request::new(
                CallToolRequestParams::new("spawn_vm")
                    .with_arguments(json!({"name": "p"}).as_object().unwrap().clone()),
            )),
            PeerRequestOptions::no_options(),
        )
        .await
        .unwrap();
    handle.await_response().await.unwrap();
    // Sent before the result, but handled by the client on its own task.
    wait_for("spawn's three steps", || {
        watcher.progress.lock().unwrap().len() >= 3
    })
    .await;
    let steps = std::mem::take(&mut *watcher.progress.lock().unwrap());
    assert_eq!(steps.len(), 3, "{steps:?}");
    assert!(
        steps[0].starts_with("creating the drives of p") && steps[1].starts_with("booting p"),
        "{steps:?}"
    );
    assert!(steps[2].starts_with("p is ready"), "{steps:?}");
    wait_for("list_changed after spawn", || {
        watcher.list_changed.load(Ordering::SeqCst) >= 1
    })
    .await;

    // Progress of the guest's exec reaches this client, before the result.
    let handle = client
        .send_cancellable_request(
            ClientRequest::CallToolRequest(Request::new(
                CallToolRequestParams::new("p__exec").with_arguments(
                    json!({"command": "echo one; sleep 0.3; echo two"})
                        .as_object()
                        .unwrap()
                        .clone(),
                ),
            )),
            PeerRequestOptions::no_options(),
        )
        .await
        .unwrap();
    handle.await_response().await.unwrap();
    // nexusd sends all of it before the result, but rmcp's client hands
    // each notification to a task of its own: the last may be handled
    // after the response (seen once under load).
    wait_for("both lines of progress", || {
        let progress = watcher.progress.lock().unwrap();
        progress.contains(&"stdout: one\n".to_owned())
            && progress.contains(&"stdout: two\n".to_owned())
    })
    .await;

    // Cancelling a proxied call kills the command in the guest.
    let handle = client
        .send_cancellable_request(
            ClientRequest::CallToolRequest(Request::new(
                CallToolRequestParams::new("p__exec").with_arguments(
                    json!({"command": "echo $$ > /workspace/pid; exec sleep 300"})
                        .as_object()
                        .unwrap()
                        .clone(),
                ),
            )),
            PeerRequestOptions::no_options(),
        )
        .await
        .unwrap();
    let mut pid = String::new();
    for _ in 0..250 {
        let read = client
            .call_tool(
                CallToolRequestParams::new("p__read_file")
                    .with_arguments(json!({"path": "pid"}).as_object().unwrap().clone()),
            )
            .await
            .unwrap();
        if read.is_error != Some(true) {
            pid = read.structured_content.unwrap()["content"]
                .as_str()
                .unwrap()
                .trim()
                .to_owned();
            if !pid.is_empty() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!pid.is_empty(), "the command started");
    handle.cancel(Some("test".into())).await.unwrap();
    let check = format!(
        "for i in $(seq 100); do kill -0 {pid} 2>/dev/null || {{ echo gone; exit; }}; sleep 0.05; done; echo alive"
    );
    let out = call(&client, "p__exec", json!({"command": check}))
        .await
        .ok();
    assert_eq!(
        out["stdout"], "gone\n",
        "the cancelled command was killed in the guest"
    );

    // guest-mcp crashes; init restarts it; the next proxied call reopens
    // the session by itself.
    call(
        &client,
        "p__process_start",
        json!({"command": "sleep 0.2; kill -9 $(pidof guest-mcp)"}),
    )
    .await
    .ok();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let out = call(&client, "p__exec", json!({"command": "echo back"}))
        .await
        .ok();
    assert_eq!(out["stdout"], "back\n");

    let before = watcher.list_changed.load(Ordering::SeqCst);
    call(&client, "destroy_vm", json!({"vm": "p"})).await.ok();
    wait_for("list_changed after destroy", || {
        watcher.list_changed.load(Ordering::SeqCst) > before
    })
    .await;
    client.cancel().await.unwrap();
}
