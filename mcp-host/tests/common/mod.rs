//! A nexusd process on a state directory of its own, driven over stdio by
//! rmcp's client.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command as StdCommand;

use rmcp::model::CallToolRequestParams;
use rmcp::service::RunningService;
use rmcp::transport::TokioChildProcess;
use rmcp::{RoleClient, ServiceExt};
use serde_json::Value;
use tokio::process::Command;

/// A state directory; on drop, the pool nexusd mounted there is unmounted.
pub struct State {
    pub dir: tempfile::TempDir,
}

impl State {
    pub fn new() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("nxd")
                .tempdir_in("/tmp")
                .unwrap(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Makes `image_dir` available as image `name` (imported at start).
    pub fn with_image(&self, name: &str, image_dir: &Path) {
        std::fs::create_dir_all(self.path().join("images")).unwrap();
        std::os::unix::fs::symlink(image_dir, self.path().join("images").join(name)).unwrap();
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nexusd"));
        cmd.arg("--state-dir").arg(self.path()).arg("stdio");
        cmd
    }

    /// `nexusd stdio` as a child whose stdin the caller closes (by
    /// cancelling the client), and a client on it.
    pub async fn stdio_child(&self) -> (tokio::process::Child, RunningService<RoleClient, ()>) {
        let mut child = self
            .command()
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let io = (child.stdout.take().unwrap(), child.stdin.take().unwrap());
        (child, ().serve(io).await.unwrap())
    }

    pub async fn client(&self) -> RunningService<RoleClient, ()> {
        ().serve(TokioChildProcess::new(self.command()).unwrap())
            .await
            .unwrap()
    }

    pub fn pool(&self) -> PathBuf {
        self.path().join("pool")
    }
}

impl State {
    /// The admin token nexusd's first start wrote here.
    pub fn admin_token(&self) -> String {
        nexus_integration::nexusd::admin_token(self.path()).unwrap()
    }

    /// rmcp's HTTP client transport to `url`, as the admin.
    pub fn http(
        &self,
        url: impl Into<std::sync::Arc<str>>,
    ) -> impl rmcp::transport::Transport<RoleClient> + 'static {
        nexus_integration::nexusd::http(url, self.admin_token())
    }

    /// The pid of the nexusd holding this state directory, if one does.
    pub fn daemon_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.path().join("nexusd.lock")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok()?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
            .is_ok()
            .then_some(pid)
    }

    /// Stops the nexusd holding the state directory as a service manager
    /// would (SIGTERM) and waits for it to let go.
    pub fn stop_daemon(&self) {
        let pid = self
            .daemon_pid()
            .expect("a nexusd holds the state directory");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        assert!(self.wait_daemon_gone(std::time::Duration::from_secs(30)));
    }

    /// Waits up to `timeout` for no nexusd to hold the state directory.
    pub fn wait_daemon_gone(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while self.daemon_pid().is_some() {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        true
    }
}

impl Drop for State {
    /// A daemon `nexusd stdio` started ends once its last client has left;
    /// one that does not (a failed test) is stopped, so that its VMs and
    /// the pool go with the test.
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The daemon `nexusd stdio` started logs here, not to the test.
            let log =
                std::fs::read_to_string(self.path().join("logs/nexusd.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(150).collect();
            eprintln!("--- nexusd.log (last 150 lines) ---");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        if !self.wait_daemon_gone(std::time::Duration::from_secs(30))
            && let Some(pid) = self.daemon_pid()
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
            self.wait_daemon_gone(std::time::Duration::from_secs(60));
        }
        let _ = StdCommand::new("umount").arg(self.pool()).status();
    }
}

pub struct Outcome {
    pub is_error: bool,
    pub json: Value,
    pub text: String,
}

impl Outcome {
    pub fn ok(self) -> Value {
        assert!(!self.is_error, "tool error: {}", self.text);
        self.json
    }

    pub fn err(self) -> String {
        assert!(self.is_error, "expected a tool error, got {}", self.json);
        self.text
    }
}

pub async fn call<H: rmcp::ClientHandler>(
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

pub use nexus_integration::can_run_nexusd as can_run;

/// `nexusd serve`; dropped, it is stopped as a service manager would
/// (SIGTERM: its VMs are stopped), not killed.
pub struct Served(tokio::process::Child);

impl Served {
    /// SIGTERM, and its exit status.
    pub async fn stop(mut self) -> std::process::ExitStatus {
        self.terminate();
        self.0.wait().await.unwrap()
    }

    /// SIGKILL (it leaves its VMs running), and its exit status.
    pub async fn kill(mut self) -> std::process::ExitStatus {
        self.0.start_kill().unwrap();
        self.0.wait().await.unwrap()
    }

    fn terminate(&self) {
        if let Some(pid) = self.0.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        // The State (dropped after) waits for it to let go of the directory.
        self.terminate();
    }
}

/// `nexusd serve` on a free loopback port; returns the process and its
/// `http://127.0.0.1:PORT/mcp` URL. Its log keeps being drained.
pub async fn serve(state: &State) -> (Served, String) {
    serve_with(state, "").await
}

/// [`serve`] with a configuration file of `toml`.
pub async fn serve_with(state: &State, toml: &str) -> (Served, String) {
    let (served, url, _) = serve_logged(state, toml, "info").await;
    (served, url)
}

/// [`serve_with`] at log level `level`; the log so far is in the third.
pub async fn serve_logged(
    state: &State,
    toml: &str,
    level: &str,
) -> (Served, String, std::sync::Arc<std::sync::Mutex<String>>) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let config = state.path().join("nexusd.toml");
    std::fs::write(&config, toml).unwrap();
    let mut serve = Command::new(env!("CARGO_BIN_EXE_nexusd"))
        .arg("--state-dir")
        .arg(state.path())
        .arg("--config")
        .arg(&config)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", level)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(serve.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("nexusd exited before listening");
        if let Some(at) = line.find("http://").or_else(|| line.find("https://")) {
            break line[at..].split_whitespace().next().unwrap().to_owned();
        }
    };
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let kept = log.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let mut log = kept.lock().unwrap();
            // Bounded: a long test's log is kept to its last 64 MiB.
            if log.len() > 64 << 20 {
                log.clear();
            }
            log.push_str(&line);
            log.push('\n');
        }
    });
    (Served(serve), url, log)
}

/// The Python client of the `mcp` package, in the .venv scripts/test.sh makes.
pub fn python() -> PathBuf {
    let python = nexus_integration::workspace_root().join(".venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: scripts/test.sh installs the Python MCP client there",
        python.display()
    );
    python
}

/// Runs integration/python/scenario.py (every tool, the full VM scenario)
/// with `args`; returns the JSON line it prints last.
pub async fn python_scenario(args: &[&str]) -> Value {
    python_script("scenario.py", args, None).await
}

/// Runs integration/python/`script` with `args` (as `uid`, group and
/// supplementary groups `uid` too, if given); returns the JSON line it
/// prints last.
pub async fn python_script(script: &str, args: &[&str], uid: Option<u32>) -> Value {
    let mut command = Command::new(python());
    command
        .arg(
            nexus_integration::workspace_root()
                .join("integration/python")
                .join(script),
        )
        .args(args);
    if let Some(uid) = uid {
        // std drops supplementary groups when it sets the uid.
        command.uid(uid).gid(uid).env("HOME", "/tmp");
    }
    let out = command.output().await.unwrap();
    assert!(
        out.status.success(),
        "python {script} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

/// `command` by guest tool `<vm>__exec` (10 minutes at most); its answer.
pub async fn sh<H: rmcp::ClientHandler>(
    client: &RunningService<RoleClient, H>,
    vm: &str,
    command: &str,
) -> Value {
    call(
        client,
        &format!("{vm}__exec"),
        serde_json::json!({"command": command, "timeout_s": 600}),
    )
    .await
    .ok()
}
