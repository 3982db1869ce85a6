//! guest-mcp outside a VM, over a Unix socket and over stdio, driven by
//! rmcp's client: the same server a VM runs on vsock port 1024.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use rmcp::model::CallToolRequestParams;
use rmcp::service::RunningService;
use rmcp::transport::TokioChildProcess;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

struct Server {
    // Held so the server lives as long as the test (kill_on_drop).
    _child: Child,
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
}

impl Server {
    async fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("guest.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_guest-mcp"))
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .args(extra)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        for _ in 0..500 {
            if socket.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Self {
            _child: child,
            _dir: dir,
            socket,
        }
    }

    async fn client(&self) -> RunningService<RoleClient, ()> {
        let stream = tokio::net::UnixStream::connect(&self.socket).await.unwrap();
        ().serve(stream).await.unwrap()
    }
}

async fn call(
    client: &RunningService<RoleClient, ()>,
    tool: &str,
    args: Value,
) -> (bool, Value, String) {
    let result = client
        .call_tool(
            CallToolRequestParams::new(tool.to_owned())
                .with_arguments(args.as_object().unwrap().clone()),
        )
        .await
        .unwrap();
    let text = result
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect::<Vec<_>>()
        .join("\n");
    (
        result.is_error == Some(true),
        result.structured_content.unwrap_or(Value::Null),
        text,
    )
}

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

    let (is_error, out, _) = call(&client, "exec", json!({"command": "echo hi; exit 4"})).await;
    assert!(!is_error);
    assert_eq!(out["stdout"], "hi\n");
    assert_eq!(out["exit_code"], 4);
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn bad_arguments_are_tool_errors_naming_the_argument_and_the_server_keeps_serving() {
    let server = Server::start(&[]).await;
    let client = server.client().await;
    let (is_error, _, text) = call(&client, "exec", json!({"cwd": "/"})).await;
    assert!(is_error);
    assert!(text.contains("exactly one of `command`"), "{text}");
    let (is_error, _, text) = call(
        &client,
        "exec",
        json!({"command": "true", "timeout_s": 999999}),
    )
    .await;
    assert!(is_error);
    assert!(
        text.contains("`timeout_s` must be between 1 and 3600"),
        "{text}"
    );
    // A wrongly typed argument is a tool error too, so the model can fix it.
    let (is_error, _, text) = call(&client, "exec", json!({"command": 5})).await;
    assert!(is_error);
    assert!(text.contains("expected a string"), "{text}");
    let (is_error, out, _) = call(&client, "exec", json!({"command": "echo still here"})).await;
    assert!(!is_error);
    assert_eq!(out["stdout"], "still here\n");
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn the_control_channel_refuses_to_power_off_a_host() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let server = Server::start(&["--control", &format!("unix:{}", control.display())]).await;
    for _ in 0..500 {
        if control.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stream = tokio::net::UnixStream::connect(&control).await.unwrap();
    let client = ().serve(stream).await.unwrap();
    let names: Vec<String> = client
        .list_all_tools()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name.into_owned())
        .collect();
    assert!(names.contains(&"shutdown".to_owned()) && names.contains(&"sync".to_owned()));
    let (is_error, _, text) = call(&client, "shutdown", json!({})).await;
    assert!(is_error);
    assert!(text.contains("will not power its host off"), "{text}");
    let (is_error, out, _) = call(&client, "sync", json!({})).await;
    assert!(!is_error && out["ok"] == true);
    client.cancel().await.unwrap();
    drop(server);
}

#[tokio::test]
async fn exec_over_stdio() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_guest-mcp"));
    cmd.arg("--stdio");
    let client = ().serve(TokioChildProcess::new(cmd).unwrap()).await.unwrap();
    let (is_error, out, _) =
        call(&client, "exec", json!({"argv": ["printf", "%s", "stdio"]})).await;
    assert!(!is_error);
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
