//! A 2026-07-28 client (no initialize handshake; `server/discover`) gets
//! tool list changes on a `subscriptions/listen` stream, and `tools/list`
//! carries a short TTL for clients that do not listen.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::time::Duration;

use common::{State, can_run};
use nexus_integration::ensure_minimal_image;
use rmcp::model::{CallToolRequestParams, ProtocolVersion, ServerNotification, SubscriptionFilter};
use rmcp::transport::TokioChildProcess;
use rmcp::{ClientLifecycleMode, ClientServiceExt};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2026_client_hears_of_new_tools_on_its_subscription() {
    if !can_run() {
        return;
    }
    let (image_dir, _) = ensure_minimal_image().unwrap();
    let state = State::new();
    state.with_image("default", &image_dir);
    let client = ()
        .serve_with_lifecycle(
            TokioChildProcess::new(state.command()).unwrap(),
            ClientLifecycleMode::Discover {
                preferred_versions: vec![ProtocolVersion::V_2026_07_28],
            },
        )
        .await
        .unwrap();

    let listed = client.list_tools(None).await.unwrap();
    assert_eq!(listed.ttl_ms, Some(nexus_host::tools::TOOLS_TTL_MS));
    let mut changes = client
        .listen(SubscriptionFilter::builder().tools_list_changed().build())
        .await
        .unwrap();

    let args = json!({"name": "modern"}).as_object().unwrap().clone();
    let spawned = client
        .call_tool(CallToolRequestParams::new("spawn_vm").with_arguments(args))
        .await
        .unwrap();
    assert_ne!(spawned.is_error, Some(true), "{:?}", spawned.content);
    let heard = tokio::time::timeout(Duration::from_secs(30), changes.next())
        .await
        .expect("a tools/list_changed on the subscription")
        .unwrap()
        .expect("the subscription stays open");
    assert!(
        matches!(heard, ServerNotification::ToolListChangedNotification(_)),
        "{heard:?}"
    );
    let tools = client.list_all_tools().await.unwrap();
    assert!(tools.iter().any(|t| t.name == "modern__exec"));

    let args = json!({"vm": "modern"}).as_object().unwrap().clone();
    client
        .call_tool(CallToolRequestParams::new("destroy_vm").with_arguments(args))
        .await
        .unwrap();
    client.cancel().await.unwrap();
}

#[derive(Clone, Default)]
struct Logs(std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>);

impl rmcp::ClientHandler for Logs {
    #[allow(deprecated)] // MCP logging: deprecated in 2026-07-28, still how events reach clients
    async fn on_logging_message(
        &self,
        params: rmcp::model::LoggingMessageNotificationParam,
        _: rmcp::service::NotificationContext<rmcp::RoleClient>,
    ) {
        self.0.lock().unwrap().push(params.data);
    }
}

/// A 2026-07-28 rmcp client that asks for log messages on one
/// subscription keeps its typed subscription to tool changes working: log
/// messages reach its log handler, never end a subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(deprecated)] // LoggingLevel: see on_logging_message
async fn a_2026_client_gets_vm_events_as_log_messages_without_losing_its_subscription() {
    use rmcp::model::{
        ClientRequest, LoggingLevel, RequestMetaObject, SubscriptionsListenRequest,
        SubscriptionsListenRequestParams,
    };
    use rmcp::service::PeerRequestOptions;
    if !can_run() {
        return;
    }
    let (image_dir, _) = ensure_minimal_image().unwrap();
    let state = State::new();
    state.with_image("default", &image_dir);
    let logs = Logs::default();
    let client = logs
        .clone()
        .serve_with_lifecycle(
            TokioChildProcess::new(state.command()).unwrap(),
            ClientLifecycleMode::Discover {
                preferred_versions: vec![ProtocolVersion::V_2026_07_28],
            },
        )
        .await
        .unwrap();
    let mut changes = client
        .listen(SubscriptionFilter::builder().tools_list_changed().build())
        .await
        .unwrap();
    // The era's opt-in to log messages: a level in the listen request's _meta.
    let mut meta = RequestMetaObject::new();
    meta.set_log_level(LoggingLevel::Info);
    let _events = client
        .send_cancellable_request(
            ClientRequest::SubscriptionsListenRequest(SubscriptionsListenRequest::new(
                SubscriptionsListenRequestParams::new(SubscriptionFilter::new()),
            )),
            PeerRequestOptions::no_options().with_meta(meta),
        )
        .await
        .unwrap();

    for name in ["log-a", "log-b"] {
        let args = json!({"name": name, "memory_mib": 128})
            .as_object()
            .unwrap()
            .clone();
        let spawned = client
            .call_tool(CallToolRequestParams::new("spawn_vm").with_arguments(args))
            .await
            .unwrap();
        assert_ne!(spawned.is_error, Some(true), "{:?}", spawned.content);
        let heard = tokio::time::timeout(Duration::from_secs(30), changes.next())
            .await
            .expect("a tools/list_changed on the subscription")
            .unwrap()
            .expect("the subscription stays open after log messages");
        assert!(
            matches!(heard, ServerNotification::ToolListChangedNotification(_)),
            "{heard:?}"
        );
        let mut started = false;
        for _ in 0..300 {
            started = logs
                .0
                .lock()
                .unwrap()
                .iter()
                .any(|d| d["vm"] == name && d["event"] == "started");
            if started {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            started,
            "no started event for {name}: {:?}",
            logs.0.lock().unwrap()
        );
    }
    for name in ["log-a", "log-b"] {
        let args = json!({"vm": name}).as_object().unwrap().clone();
        client
            .call_tool(CallToolRequestParams::new("destroy_vm").with_arguments(args))
            .await
            .unwrap();
    }
    client.cancel().await.unwrap();
}
