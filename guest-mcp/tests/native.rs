//! guest-mcp outside a VM, over a Unix socket and over stdio, driven by
//! rmcp's client: the same server a VM runs on vsock port 1024.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::{Server, call};
use rmcp::ServiceExt;
use rmcp::transport::TokioChildProcess;
use serde_json::json;
use tokio::process::Command;

#[tokio::test]
async fn exec_over_a_unix_socket_with_schemas_and_structured_output() {
    let server = Server::start(&[]).await;
    let client = server.client().await;
    let tools = client.list_all_tools().await.unwrap();
    let exec = tools.iter().find(|t| t.name == "exec").expect("exec tool");
    let input = serde_json::to_value(&exec.input_schema).unwrap();
    assert!(
        input["properties"]["command"]["description"].is_string(),
        "{input}"
    );
    assert!(
        exec.output_schema.is_some(),
        "exec declares its output schema"
    );
    for tool in &tools {
        assert!(
            tool.output_schema.is_some(),
            "{} has no output schema",
            tool.name
        );
        assert!(
            tool.description.as_deref().is_some_and(|d| d.len() > 20),
            "{} lacks a description",
            tool.name
        );
    }

    let out = call(&client, "exec", json!({"command": "echo hi; exit 4"})).await;
    assert!(
        out.text.starts_with("exit code 4"),
        "readable text: {}",
        out.text
    );
    let out = out.ok();
    assert_eq!(out["stdout"], "hi\n");
    assert_eq!(out["exit_code"], 4);
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn bad_arguments_are_tool_errors_naming_the_argument_and_the_server_keeps_serving() {
    let server = Server::start(&[]).await;
    let client = server.client().await;
    let err = call(&client, "exec", json!({"cwd": "/"})).await.err();
    assert!(err.contains("exactly one of `command`"), "{err}");
    let err = call(
        &client,
        "exec",
        json!({"command": "true", "timeout_s": 999999}),
    )
    .await
    .err();
    assert!(
        err.contains("`timeout_s` must be between 1 and 3600"),
        "{err}"
    );
    // A wrongly typed argument is a tool error too, so the model can fix it.
    let err = call(&client, "exec", json!({"command": 5})).await.err();
    assert!(err.contains("expected a string"), "{err}");
    let out = call(&client, "exec", json!({"command": "echo still here"}))
        .await
        .ok();
    assert_eq!(out["stdout"], "still here\n");
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn the_control_channel_has_its_own_tools_and_refuses_to_power_off_a_host() {
    let server = Server::start(&[]).await;
    let control = server.control_client().await;
    let mut names: Vec<String> = control
        .list_all_tools()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name.into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "drop_caches",
            "freeze",
            "mount",
            "remount",
            "set_network",
            "shutdown",
            "sync",
            "thaw",
            "unmount"
        ]
    );
    let err = call(&control, "shutdown", json!({})).await.err();
    assert!(err.contains("will not power its host off"), "{err}");
    // Nor does it touch its host's trust store.
    let err = call(
        &control,
        "set_network",
        json!({"ca_pem": "-----BEGIN CERTIFICATE-----\n", "env": {}}),
    )
    .await
    .err();
    assert!(err.contains("only inside a VM"), "{err}");
    assert_eq!(call(&control, "sync", json!({})).await.ok()["ok"], true);
    // Agent tools are not on the control channel, and vice versa.
    let agent = server.client().await;
    assert!(
        !agent
            .list_all_tools()
            .await
            .unwrap()
            .iter()
            .any(|t| t.name == "freeze")
    );
    control.cancel().await.unwrap();
    agent.cancel().await.unwrap();
}

#[tokio::test]
async fn exec_over_stdio() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_guest-mcp"));
    cmd.arg("--stdio");
    let client = ().serve(TokioChildProcess::new(cmd).unwrap()).await.unwrap();
    let out = call(&client, "exec", json!({"argv": ["printf", "%s", "stdio"]}))
        .await
        .ok();
    assert_eq!(out["stdout"], "stdio");
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn nothing_to_serve_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_guest-mcp"))
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("give --listen ADDR or --stdio"), "{stderr}");
    let out = Command::new(env!("CARGO_BIN_EXE_guest-mcp"))
        .args(["--listen", "tcp:1"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("use vsock:PORT or unix:PATH"), "{stderr}");
}
