//! A guest-mcp process on a Unix socket, and rmcp clients for it.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use rmcp::model::CallToolRequestParams;
use rmcp::service::RunningService;
use rmcp::{ClientHandler, RoleClient, ServiceExt};
use serde_json::Value;
use tokio::process::{Child, Command};

pub struct Server {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub control: PathBuf,
    /// The working directory given to guest-mcp (its "/workspace").
    pub workdir: PathBuf,
}

pub async fn wait_for(path: &Path) {
    for _ in 0..500 {
        if path.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} never appeared", path.display());
}

impl Server {
    pub async fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, extra).await
    }

    pub async fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Self {
        let socket = dir.path().join("guest.sock");
        let control = dir.path().join("control.sock");
        let workdir = dir.path().join("workspace");
        std::fs::create_dir_all(&workdir).unwrap();
        // A killed predecessor leaves its sockets: waiting for them to
        // appear must wait for this one's.
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(&control);
        let child = Command::new(env!("CARGO_BIN_EXE_guest-mcp"))
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--control")
            .arg(format!("unix:{}", control.display()))
            .arg("--workdir")
            .arg(&workdir)
            .args(extra)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        wait_for(&socket).await;
        wait_for(&control).await;
        Self {
            child,
            dir,
            socket,
            control,
            workdir,
        }
    }

    pub async fn client(&self) -> RunningService<RoleClient, ()> {
        let stream = tokio::net::UnixStream::connect(&self.socket).await.unwrap();
        ().serve(stream).await.unwrap()
    }

    pub async fn client_with<H: ClientHandler>(&self, handler: H) -> RunningService<RoleClient, H> {
        let stream = tokio::net::UnixStream::connect(&self.socket).await.unwrap();
        handler.serve(stream).await.unwrap()
    }

    pub async fn control_client(&self) -> RunningService<RoleClient, ()> {
        let stream = tokio::net::UnixStream::connect(&self.control)
            .await
            .unwrap();
        ().serve(stream).await.unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap()
    }
}

/// The outcome of a tool call: whether it was a tool error, its structured
/// content and its text.
pub struct Outcome {
    pub is_error: bool,
    pub json: Value,
    pub text: String,
}

impl Outcome {
    /// The structured result of a call that must have succeeded.
    pub fn ok(self) -> Value {
        assert!(!self.is_error, "tool error: {}", self.text);
        self.json
    }

    /// The message of a call that must have failed as a tool error.
    pub fn err(self) -> String {
        assert!(self.is_error, "expected a tool error, got {}", self.json);
        self.text
    }
}

pub async fn call<H: ClientHandler>(
    client: &RunningService<RoleClient, H>,
    tool: &str,
    args: Value,
) -> Outcome {
    let result = client
        .call_tool(
            CallToolRequestParams::new(tool.to_owned())
                .with_arguments(args.as_object().unwrap().clone()),
        )
        .await
        .unwrap_or_else(|e| panic!("{tool} failed at the protocol level: {e}"));
    let text = result
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect::<Vec<_>>()
        .join("\n");
    Outcome {
        is_error: result.is_error == Some(true),
        json: result.structured_content.unwrap_or(Value::Null),
        text,
    }
}

/// Whether a process has ended (a zombie counts as ended).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
    })
}

/// Waits up to 15 s for a process to end.
pub async fn dies(pid: u32) -> bool {
    for _ in 0..750 {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Reads a pid a command wrote to a file, waiting for it to appear.
pub async fn read_pid(path: &Path) -> u32 {
    for _ in 0..500 {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(pid) = text.trim().parse()
        {
            return pid;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no pid in {}", path.display());
}
