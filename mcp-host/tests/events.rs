//! What happens to a VM reaches clients as MCP log messages, and nexusd
//! knows the truth about it: a guest-mcp that crashes and comes back, a
//! VM that powers off from inside or loses its vsock helper (it becomes
//! stopped, its tools leave the list, start_vm boots it again).

#![allow(clippy::unwrap_used, deprecated)] // test code; MCP logging is deprecated in 2026-07-28

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{State, call, can_run};
use nexus_integration::ensure_minimal_image;
use rmcp::model::{LoggingLevel, LoggingMessageNotificationParam, SetLevelRequestParams};
use rmcp::service::NotificationContext;
use rmcp::transport::TokioChildProcess;
use rmcp::{ClientHandler, RoleClient, ServiceExt};
use serde_json::{Value, json};

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<(LoggingLevel, Value)>>>);

impl ClientHandler for Logs {
    async fn on_logging_message(
        &self,
        params: LoggingMessageNotificationParam,
        _: NotificationContext<RoleClient>,
    ) {
        self.0.lock().unwrap().push((params.level, params.data));
    }
}

impl Logs {
    /// Waits for an event `event` of VM `vm`; returns its data.
    async fn wait(&self, vm: &str, event: &str) -> (LoggingLevel, Value) {
        self.wait_for(vm, event, "").await
    }

    /// Waits for an event `event` of VM `vm` whose message contains `text`.
    async fn wait_for(&self, vm: &str, event: &str, text: &str) -> (LoggingLevel, Value) {
        for _ in 0..600 {
            if let Some(found) = self.0.lock().unwrap().iter().find(|(_, d)| {
                d["vm"] == vm
                    && d["event"] == event
                    && d["message"].as_str().is_some_and(|m| m.contains(text))
            }) {
                return found.clone();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "no {event} event for {vm}; heard {:?}",
            self.0.lock().unwrap()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_crashes_and_a_vm_powering_off_are_reported_and_the_vm_is_stopped() {
    if !can_run() {
        return;
    }
    let (image_dir, _) = ensure_minimal_image().unwrap();
    let state = State::new();
    state.with_image("default", &image_dir);
    let logs = Logs::default();
    let client = logs
        .clone()
        .serve(TokioChildProcess::new(state.command()).unwrap())
        .await
        .unwrap();
    assert!(
        client.peer_info().unwrap().capabilities.logging.is_some(),
        "nexusd offers the logging capability"
    );
    client
        .set_level(SetLevelRequestParams::new(LoggingLevel::Info))
        .await
        .unwrap();

    call(
        &client,
        "spawn_vm",
        json!({"name": "ev", "memory_mib": 128}),
    )
    .await
    .ok();
    let (level, started) = logs.wait("ev", "started").await;
    assert_eq!(level, LoggingLevel::Info);
    assert!(
        started["message"].as_str().unwrap().contains("ready in"),
        "{started}"
    );

    // guest-mcp crashes; the guest's init restarts it.
    call(
        &client,
        "ev__process_start",
        json!({"command": "sleep 0.2; kill -9 $(pidof guest-mcp)"}),
    )
    .await
    .ok();
    let (level, _) = logs.wait("ev", "guest_lost").await;
    assert_eq!(level, LoggingLevel::Warning);
    logs.wait("ev", "guest_back").await;
    let out = call(&client, "ev__exec", json!({"command": "echo back"}))
        .await
        .ok();
    assert_eq!(out["stdout"], "back\n");

    // The guest powers off from inside: nexusd sees it, says so with the
    // console's last lines, and shows the VM stopped.
    call(
        &client,
        "ev__process_start",
        json!({"command": "sleep 0.2; echo going down > /dev/console; reboot -f"}),
    )
    .await
    .ok();
    let (level, died) = logs.wait("ev", "died").await;
    assert_eq!(level, LoggingLevel::Error);
    // Its vsock helper ends with it: not the cause.
    assert!(
        !died["message"].as_str().unwrap().contains("cut it off"),
        "{died}"
    );
    let console: Vec<&str> = died["console"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert!(
        console.iter().any(|l| l.contains("going down")),
        "{console:?}"
    );
    let info = call(&client, "get_vm", json!({"vm": "ev"})).await.ok();
    assert_eq!(info["state"], "stopped", "{info}");
    let tools = client.list_all_tools().await.unwrap();
    assert!(!tools.iter().any(|t| t.name.starts_with("ev__")));
    assert!(
        !logs
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|(_, d)| d["vm"] == "ev" && d["event"] == "stopped"),
        "a VM that died was not stopped by nexusd"
    );

    let info = call(&client, "start_vm", json!({"vm": "ev"})).await.ok();
    assert_eq!(info["state"], "running");
    let out = call(&client, "ev__exec", json!({"command": "echo again"}))
        .await
        .ok();
    assert_eq!(out["stdout"], "again\n");

    // Its vsock helper dies (outside the guest): the VM can never reach
    // its guest again, so nexusd kills it; it shows stopped, and boots.
    let run = state.path().join("run").join(format!("ev.{}", info["cid"]));
    let helper = nexus_integration::processes_mentioning(run.to_str().unwrap())
        .into_iter()
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .unwrap_or_default()
                .contains("vhost-device-vsock")
        })
        .expect("the VM's vsock helper");
    let killed = std::time::Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(helper as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let (_, died) = logs.wait_for("ev", "died", "cut it off").await;
    eprintln!(
        "a dead vsock helper seen, the VM stopped, in {:?}",
        killed.elapsed()
    );
    assert!(
        died["message"]
            .as_str()
            .unwrap()
            .contains("vhost-device-vsock"),
        "{died}"
    );
    let info = call(&client, "get_vm", json!({"vm": "ev"})).await.ok();
    assert_eq!(info["state"], "stopped", "{info}");
    let info = call(&client, "start_vm", json!({"vm": "ev"})).await.ok();
    assert_eq!(info["state"], "running");
    let out = call(&client, "ev__exec", json!({"command": "echo third"}))
        .await
        .ok();
    assert_eq!(out["stdout"], "third\n");

    // Below the level set: nothing. With warnings only, destroying (info)
    // is not reported; a later warning is the barrier (one session's
    // messages go out in order, each checked against the level then).
    call(
        &client,
        "spawn_vm",
        json!({"name": "ev2", "memory_mib": 128}),
    )
    .await
    .ok();
    logs.wait("ev2", "started").await;
    client
        .set_level(SetLevelRequestParams::new(LoggingLevel::Warning))
        .await
        .unwrap();
    call(&client, "destroy_vm", json!({"vm": "ev"})).await.ok();
    call(
        &client,
        "ev2__process_start",
        json!({"command": "sleep 0.2; kill -9 $(pidof guest-mcp)"}),
    )
    .await
    .ok();
    logs.wait("ev2", "guest_lost").await;
    assert!(
        !logs
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|(_, d)| d["vm"] == "ev" && d["event"] == "destroyed"),
        "an info event passed a warning level"
    );
    call(&client, "destroy_vm", json!({"vm": "ev2"})).await.ok();
    client.cancel().await.unwrap();
}
