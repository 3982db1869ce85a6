//! nexusctl against a real nexusd (`serve`, admin socket and HTTP) with
//! real VMs of the minimal image: every command, human and `--json`
//! output, exit codes, and bad input that says what to do and changes
//! nothing.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;

/// nexusd of this build, next to nexusctl (built first if it is not).
fn nexusd() -> PathBuf {
    let ctl = PathBuf::from(env!("CARGO_BIN_EXE_nexusctl"));
    let nexusd = ctl.with_file_name("nexusd");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let profile = if ctl.parent().unwrap().ends_with("release") {
        vec!["--release"]
    } else {
        vec![]
    };
    let status = Command::new(cargo)
        .current_dir(nexus_integration::workspace_root())
        .args([
            "build",
            "-q",
            "--locked",
            "-p",
            "nexus-host",
            "--bin",
            "nexusd",
        ])
        .args(profile)
        .status()
        .unwrap();
    assert!(status.success() && nexusd.is_file(), "building nexusd");
    nexusd
}

struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

fn ctl(args: &[&str], stdin: Option<&str>) -> Ran {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nexusctl"))
        .args(args)
        .env_remove("NEXUS_TOKEN_FILE")
        .env_remove("NEXUS_URL")
        .env_remove("NEXUS_TOKEN")
        .env_remove("NEXUS_SOCKET")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    Ran {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `nexusd serve` on a state directory of its own; stopped (SIGTERM) and
/// its pool unmounted on drop.
struct Daemon {
    child: std::process::Child,
    dir: tempfile::TempDir,
    url: String,
}

impl Daemon {
    fn start() -> Self {
        use std::io::BufRead;
        let (image, _) = nexus_integration::ensure_minimal_image().unwrap();
        let dir = tempfile::Builder::new()
            .prefix("nxc")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::create_dir_all(dir.path().join("images")).unwrap();
        std::os::unix::fs::symlink(&image, dir.path().join("images/default")).unwrap();
        let mut child = Command::new(nexusd())
            .arg("--state-dir")
            .arg(dir.path())
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let url = loop {
            let line = lines
                .next()
                .expect("nexusd exited before listening")
                .unwrap();
            if let Some(at) = line
                .contains("listening")
                .then(|| line.find("http://"))
                .flatten()
            {
                break line[at..].split_whitespace().next().unwrap().to_owned();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Self { child, dir, url }
    }

    fn socket(&self) -> String {
        self.dir.path().join("nexusd.sock").display().to_string()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        let pool = self.dir.path().join("pool");
        let _ = Command::new("umount")
            .arg(&pool)
            .stderr(Stdio::null())
            .status();
    }
}

#[test]
fn help_names_the_exit_codes_and_each_command_has_an_example() {
    let help = ctl(&["--help"], None);
    assert_eq!(help.code, 0);
    assert!(
        help.stdout.contains("Exit codes: 0 done"),
        "{}",
        help.stdout
    );
    for command in [
        &["health"][..],
        &["vm", "ls"],
        &["vm", "create"],
        &["vm", "info"],
        &["vm", "start"],
        &["vm", "stop"],
        &["vm", "rm"],
        &["vm", "console"],
        &["vm", "pause"],
        &["vm", "resume"],
        &["secret", "set"],
        &["secret", "ls"],
        &["secret", "rm"],
        &["secret", "grant"],
        &["secret", "revoke"],
        &["exec"],
        &["shell"],
        &["snapshot", "create"],
        &["snapshot", "ls"],
        &["snapshot", "restore"],
        &["snapshot", "rm"],
        &["fork"],
        &["console"],
        &["mcp-config"],
        &["image", "ls"],
        &["token", "create"],
        &["token", "ls"],
        &["token", "revoke"],
        &["audit"],
        &["status"],
        &["cp"],
        &["image", "build"],
        &["image", "import"],
        &["image", "pull"],
        &["image", "rm"],
        &["policy", "roles"],
        &["policy", "set-role"],
        &["policy", "rm-role"],
        &["policy", "grant"],
        &["policy", "revoke"],
        &["policy", "grants"],
        &["completions"],
    ] {
        let mut args = command.to_vec();
        args.push("--help");
        let out = ctl(&args, None);
        assert!(
            out.code == 0 && out.stdout.contains("Example"),
            "{command:?}: {}",
            out.stdout
        );
    }
    let bad = ctl(&["vm", "frobnicate"], None);
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    let config = ctl(&["mcp-config", "claude-code"], None);
    let config: Value = serde_json::from_str(&config.stdout).unwrap();
    assert_eq!(config["mcpServers"]["nexus"]["args"][0], "stdio");
}

#[test]
fn without_a_daemon_it_says_how_to_start_one() {
    let out = ctl(&["--socket", "/tmp/no-such-nexusd.sock", "vm", "ls"], None);
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(
        out.stderr.contains("no nexusd at /tmp/no-such-nexusd.sock")
            && out.stderr.contains("nexusd serve"),
        "{}",
        out.stderr
    );
}

#[test]
fn vms_and_secrets_through_the_admin_socket_and_http() {
    if !nexus_integration::can_run_nexusd() {
        return;
    }
    let d = Daemon::start();
    let socket = d.socket();
    let s = |args: &[&str]| {
        let mut all = vec!["--socket", socket.as_str()];
        all.extend_from_slice(args);
        all.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>()
    };
    let run = |args: &[&str], stdin: Option<&str>| {
        let all = s(args);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        ctl(&refs, stdin)
    };

    let out = run(&["vm", "ls"], None);
    assert_eq!(
        (out.code, out.stdout.trim()),
        (0, "no VMs (make one with `nexusctl vm create`)")
    );
    assert_eq!(
        run(&["--json", "vm", "ls"], None).json()["vms"],
        serde_json::json!([])
    );

    // Made, listed, shown, stopped, started.
    let made = run(
        &[
            "vm", "create", "c1", "--memory", "256", "--egress", "pypi.org",
        ],
        None,
    );
    assert_eq!(made.code, 0, "{}", made.stderr);
    assert!(
        made.stdout.contains("state:      running") && made.stdout.contains("egress:     pypi.org"),
        "{}",
        made.stdout
    );
    let listed = run(&["vm", "ls"], None);
    let lines: Vec<&str> = listed.stdout.lines().collect();
    assert!(
        lines[0].starts_with("NAME  STATE    IMAGE"),
        "{}",
        listed.stdout
    );
    assert!(
        lines[1].starts_with("c1    running  default"),
        "{}",
        listed.stdout
    );
    let info = run(&["--json", "vm", "info", "c1"], None).json();
    assert_eq!(
        (info["name"].as_str(), info["state"].as_str()),
        (Some("c1"), Some("running"))
    );
    assert_eq!(
        run(&["--json", "vm", "stop", "c1"], None).json()["state"],
        "stopped"
    );
    assert_eq!(
        run(&["--json", "vm", "start", "c1"], None).json()["state"],
        "running"
    );

    // Bad input: a clear message, exit 1, nothing changed.
    let out = run(&["vm", "info", "nope"], None);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("VM \"nope\" does not exist"),
        "{}",
        out.stderr
    );
    let out = run(&["--json", "vm", "info", "nope"], None);
    assert_eq!(out.code, 1);
    assert_eq!(
        out.json()["error"]["code"],
        1,
        "scripts read the error on stdout too"
    );
    // Another local user: the socket is the owner's (exit 4).
    let other = Command::new(env!("CARGO_BIN_EXE_nexusctl"))
        .args(["--socket", socket.as_str(), "vm", "ls"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(
        other.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&other.stderr)
    );
    assert!(String::from_utf8_lossy(&other.stderr).contains("permission denied"));
    let out = run(&["vm", "create", "c2", "--vcpus", "0"], None);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("`vcpus` must be between"),
        "{}",
        out.stderr
    );
    assert_eq!(
        run(&["--json", "vm", "ls"], None).json()["vms"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Secrets: the value from stdin or a file, never shown again.
    let value = "nexusctl-secret-value-4711";
    let set = run(
        &[
            "secret",
            "set",
            "API",
            "--host",
            "api.example.com",
            "--header",
            "Authorization: Bearer {secret}",
        ],
        Some(&format!("{value}\n")),
    );
    assert_eq!(set.code, 0, "{}", set.stderr);
    assert!(
        set.stdout.contains("secret API created") && set.stdout.contains("NEXUS_SECRET_API"),
        "{}",
        set.stdout
    );
    let empty = run(
        &["secret", "set", "EMPTY", "--host", "a.example.com"],
        Some("\n"),
    );
    assert_eq!(empty.code, 1);
    assert!(empty.stderr.contains("is empty"), "{}", empty.stderr);
    let inner = run(
        &["secret", "set", "INNER", "--host", "a.example.com"],
        Some("a\nb\n"),
    );
    assert_eq!(inner.code, 1);
    assert!(
        inner.stderr.contains("control characters"),
        "{}",
        inner.stderr
    );
    let missing = run(
        &[
            "secret",
            "set",
            "FILE",
            "--host",
            "a.example.com",
            "--from-file",
            "/nonexistent/key",
        ],
        None,
    );
    assert_eq!(missing.code, 1);
    assert!(
        missing.stderr.contains("/nonexistent/key"),
        "{}",
        missing.stderr
    );
    let key = d.dir.path().join("key");
    std::fs::write(&key, "from-a-file\n").unwrap();
    let from_file = run(
        &[
            "secret",
            "set",
            "FILE",
            "--host",
            "b.example.com",
            "--from-file",
            key.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(from_file.code, 0, "{}", from_file.stderr);
    assert!(
        run(&["secret", "grant", "API", "c1"], None)
            .stdout
            .contains("secret API granted; VMs: c1")
    );
    assert_eq!(
        run(&["--json", "vm", "info", "c1"], None).json()["secrets"],
        serde_json::json!(["API"])
    );
    let listed = run(&["secret", "ls"], None);
    assert!(
        listed.stdout.starts_with("NAME  HOSTS"),
        "{}",
        listed.stdout
    );
    assert!(
        listed
            .stdout
            .contains("API   api.example.com  header Authorization: Bearer {secret}  c1"),
        "{}",
        listed.stdout
    );
    let json = run(&["--json", "secret", "ls"], None);
    assert_eq!(json.json()["secrets"].as_array().unwrap().len(), 2);
    assert!(!json.stdout.contains(value) && !listed.stdout.contains(value));
    assert!(!set.stdout.contains(value) && !set.stderr.contains(value));
    let bad = run(&["secret", "grant", "NOPE", "c1"], None);
    assert_eq!(bad.code, 1);
    assert!(
        bad.stderr.contains("no secret named \"NOPE\""),
        "{}",
        bad.stderr
    );
    assert!(
        run(&["secret", "revoke", "API", "c1"], None)
            .stdout
            .contains("secret API revoked; VMs: -")
    );
    assert_eq!(run(&["secret", "rm", "API"], None).code, 0);
    assert_eq!(run(&["secret", "rm", "FILE"], None).code, 0);
    assert!(run(&["secret", "ls"], None).stdout.contains("no secrets"));

    // Over HTTP: a good token works, a bad one says so (exit 4).
    let token = std::fs::read_to_string(d.dir.path().join("admin.token")).unwrap();
    let token_file = d.dir.path().join("token");
    std::fs::write(&token_file, token.trim()).unwrap();
    let base = d.url.trim_end_matches("/mcp").to_owned();
    let out = ctl(
        &[
            "--url",
            &base,
            "--token-file",
            token_file.to_str().unwrap(),
            "--json",
            "vm",
            "ls",
        ],
        None,
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.json()["vms"][0]["name"], "c1");
    std::fs::write(&token_file, "nexus_not-a-token").unwrap();
    let out = ctl(
        &[
            "--url",
            &base,
            "--token-file",
            token_file.to_str().unwrap(),
            "vm",
            "ls",
        ],
        None,
    );
    assert_eq!(out.code, 4, "{} {}", out.stdout, out.stderr);
    assert!(out.stderr.contains("token"), "{}", out.stderr);

    // exec: output live on its own streams, the command's exit code.
    let out = run(
        &[
            "exec",
            "c1",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ],
        None,
    );
    assert_eq!(
        (out.code, out.stdout.as_str(), out.stderr.as_str()),
        (3, "out\n", "err\n")
    );
    assert_eq!(run(&["exec", "c1", "--", "true"], None).code, 0);
    assert_eq!(
        run(&["exec", "c1", "--", "sh", "-c", "kill -9 $$"], None).code,
        137
    );
    let out = run(
        &[
            "exec",
            "c1",
            "--env",
            "GREETING=hi",
            "--cwd",
            "/tmp",
            "--",
            "sh",
            "-c",
            "echo $GREETING $(pwd)",
        ],
        None,
    );
    assert_eq!(out.stdout, "hi /tmp\n", "{}", out.stderr);
    let out = run(&["exec", "nope", "--", "true"], None);
    assert_eq!(out.code, 1, "{}", out.stderr);
    // Ctrl-C: the guest command is interrupted, nothing of it left.
    {
        use std::io::BufRead;
        let all = s(&[
            "exec",
            "c1",
            "--",
            "sh",
            "-c",
            "echo started; exec sleep 300",
        ]);
        let mut child = Command::new(env!("CARGO_BIN_EXE_nexusctl"))
            .args(&all)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        assert_eq!(lines.next().unwrap().unwrap(), "started");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(130), "interrupted: 128 + SIGINT");
        let left = run(
            &[
                "exec",
                "c1",
                "--",
                "sh",
                "-c",
                "ps | grep '[s]leep 300' || echo none",
            ],
            None,
        );
        assert_eq!(left.stdout, "none\n");
    }

    // Images, tokens, the trail.
    let images = run(&["image", "ls"], None);
    assert!(
        images.stdout.starts_with("NAME") && images.stdout.contains("\ndefault "),
        "{}",
        images.stdout
    );
    let made = run(&["--json", "token", "create", "ctl-bot"], None).json();
    assert!(
        made["token"].as_str().unwrap().starts_with("nexus_"),
        "{made}"
    );
    let tokens = run(&["token", "ls"], None);
    assert!(
        tokens.stdout.contains("ctl-bot") && tokens.stdout.contains("active"),
        "{}",
        tokens.stdout
    );
    assert!(
        !tokens.stdout.contains(made["token"].as_str().unwrap()),
        "a token's secret is shown once"
    );
    assert!(
        run(&["token", "revoke", "ctl-bot"], None)
            .stdout
            .contains("token ctl-bot revoked")
    );
    let trail = run(&["audit", "--vm", "c1", "--limit", "5"], None);
    assert!(
        trail.stdout.starts_with("ID") && trail.stdout.contains(" c1 "),
        "{}",
        trail.stdout
    );
    assert_eq!(
        run(&["--json", "audit", "--limit", "3"], None).json()["records"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    // Snapshots, a fork, the console.
    let snap = run(&["snapshot", "create", "c1", "s1"], None);
    assert!(
        snap.stdout
            .starts_with("snapshot c1@s1 of its workspace drive"),
        "{} {}",
        snap.stdout,
        snap.stderr
    );
    let listed = run(&["snapshot", "ls", "c1"], None);
    assert!(
        listed
            .stdout
            .lines()
            .nth(1)
            .unwrap_or("")
            .starts_with("c1  s1    workspace"),
        "{}",
        listed.stdout
    );
    let fork = run(&["--json", "fork", "c1", "s1", "f1"], None).json();
    assert_eq!(
        (fork["name"].as_str(), fork["state"].as_str()),
        (Some("f1"), Some("running"))
    );
    // Without a snapshot: the VM as it is now.
    let now = run(&["fork", "c1", "--name", "g1"], None);
    assert!(
        now.stdout.contains("VM g1 forked from c1@fork-"),
        "{}",
        now.stdout
    );
    assert!(
        run(&["vm", "rm", "g1"], None)
            .stdout
            .contains("VM g1 destroyed")
    );
    assert_eq!(
        run(&["--json", "snapshot", "restore", "c1", "s1"], None).json()["name"],
        "s1"
    );
    assert!(
        run(&["vm", "rm", "f1"], None)
            .stdout
            .contains("VM f1 destroyed")
    );
    assert!(
        run(&["snapshot", "rm", "c1", "s1"], None)
            .stdout
            .contains("snapshot c1@s1 deleted")
    );
    assert!(
        run(&["snapshot", "ls"], None)
            .stdout
            .contains("no snapshots")
    );
    let console = run(&["console", "c1", "--lines", "20"], None);
    assert!(
        console.code == 0 && !console.stdout.trim().is_empty(),
        "{}",
        console.stderr
    );

    // Removed.
    assert!(
        run(&["vm", "rm", "c1"], None)
            .stdout
            .contains("VM c1 destroyed")
    );
    assert!(run(&["vm", "ls"], None).stdout.contains("no VMs"));
}

/// A running `nexusctl ... --follow`: its stdout lines, as they come.
struct Follower {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Follower {
    fn start(args: &[&str]) -> Self {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_nexusctl"))
            .args(args)
            .env_remove("NEXUS_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// The first line that `wanted` accepts within 60 s.
    fn wait_for(&self, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if wanted(&line) => return line,
                Ok(line) => seen.push(line),
                Err(_) => break,
            }
        }
        panic!("no such line within 60 s; saw {seen:#?}");
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nexusctl on a real pseudo-terminal of its own (its controlling
/// terminal, as in a terminal emulator): what it prints, collected.
struct Terminal {
    child: std::process::Child,
    master: std::fs::File,
    screen: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Terminal {
    fn start(args: &[&str], rows: u16, cols: u16) -> Self {
        use std::io::Read;
        let size = nix::pty::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&size), None).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nexusctl"));
        cmd.args(args)
            .env("TERM", "xterm")
            .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
            .stdout(Stdio::from(pty.slave.try_clone().unwrap()))
            .stderr(Stdio::from(pty.slave));
        // SAFETY: setsid(2) and ioctl(2) in the child before exec.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()?;
                if nix::libc::ioctl(0, nix::libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop(cmd);
        let master = std::fs::File::from(pty.master);
        let screen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut reader = master.try_clone().unwrap();
        let seen = screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Self {
            child,
            master,
            screen,
        }
    }

    fn type_(&mut self, text: &str) {
        self.master.write_all(text.as_bytes()).unwrap();
    }

    /// Waits (60 s) until the screen shows `wanted`, typing `retype`
    /// again every 2 s if given.
    fn expect(&mut self, wanted: &str, retype: Option<&str>) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut next = std::time::Instant::now();
        while std::time::Instant::now() < deadline {
            if self.screen.lock().unwrap().contains(wanted) {
                return;
            }
            if let Some(text) = retype.filter(|_| std::time::Instant::now() >= next) {
                self.type_(text);
                next = std::time::Instant::now() + std::time::Duration::from_secs(2);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!(
            "{wanted:?} never showed; the screen: {:?}",
            self.screen.lock().unwrap()
        );
    }

    fn resize(&self, rows: u16, cols: u16) {
        use std::os::fd::AsRawFd;
        let size = nix::libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: a valid winsize on an open terminal descriptor.
        let rc = unsafe { nix::libc::ioctl(self.master.as_raw_fd(), nix::libc::TIOCSWINSZ, &size) };
        assert_eq!(rc, 0);
    }

    /// Its exit code, within 60 s.
    fn wait(&mut self) -> i32 {
        for _ in 0..1200 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!(
            "nexusctl shell did not end; the screen: {:?}",
            self.screen.lock().unwrap()
        );
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `len` bytes that do not compress, the same each run.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn files_status_policy_images_and_following() {
    if !nexus_integration::can_run_nexusd() {
        return;
    }
    let d = Daemon::start();
    let socket = d.socket();
    let run = |args: &[&str], stdin: Option<&str>| {
        let mut all = vec!["--socket", socket.as_str()];
        all.extend_from_slice(args);
        ctl(&all, stdin)
    };
    let made = run(&["vm", "create", "f2", "--memory", "256"], None);
    assert_eq!(made.code, 0, "{}", made.stderr);

    // status: what the host runs, and why.
    let status = run(&["status"], None);
    assert_eq!(status.code, 0, "{}", status.stderr);
    for field in [
        "version:",
        "backend: qemu",
        "accel:",
        "pool:",
        "vms:     1 (1 running",
        "images:  default",
    ] {
        assert!(status.stdout.contains(field), "{field}: {}", status.stdout);
    }
    let json = run(&["--json", "status"], None).json();
    assert!(
        ["kvm", "tcg"].contains(&json["accel"].as_str().unwrap()),
        "{json}"
    );
    assert!(!json["accel_reason"].as_str().unwrap().is_empty(), "{json}");
    assert_eq!(
        (
            json["vms"]["running"].as_u64(),
            json["usage"]["memory_mib"].as_u64()
        ),
        (Some(1), Some(256))
    );
    assert!(json["pool"]["free_bytes"].as_u64().unwrap() > 0, "{json}");

    // Paused and resumed.
    let paused = run(&["vm", "pause", "f2"], None);
    assert!(
        paused.stdout.contains("state:      paused"),
        "{} {}",
        paused.stdout,
        paused.stderr
    );
    let refused = run(&["exec", "f2", "--", "true"], None);
    assert!(
        refused.code == 1 && refused.stderr.contains("is paused"),
        "{}",
        refused.stderr
    );
    let resumed = run(&["vm", "resume", "f2"], None);
    assert!(
        resumed.stdout.contains("state:      running"),
        "{}",
        resumed.stderr
    );

    // cp, 100 MiB each way, checksums compared on both sides.
    let work = tempfile::tempdir().unwrap();
    let big = noise(100 << 20);
    let local = work.path().join("big.bin");
    std::fs::write(&local, &big).unwrap();
    let local_arg = local.display().to_string();
    let up = run(&["--json", "cp", &local_arg, "f2:/workspace/"], None);
    assert_eq!(up.code, 0, "{}", up.stderr);
    let up = up.json();
    let sum = sha256_hex(&big);
    assert_eq!(
        (
            up["bytes"].as_u64(),
            up["sha256"].as_str(),
            up["to"].as_str()
        ),
        (
            Some(100 << 20),
            Some(sum.as_str()),
            Some("f2:/workspace/big.bin")
        )
    );
    let guest_sum = run(
        &["exec", "f2", "--", "sha256sum", "/workspace/big.bin"],
        None,
    );
    assert!(guest_sum.stdout.starts_with(&sum), "{}", guest_sum.stdout);
    let left = run(
        &[
            "exec",
            "f2",
            "--",
            "sh",
            "-c",
            "ls -A /workspace | grep -v lost+found",
        ],
        None,
    );
    assert_eq!(left.stdout.trim(), "big.bin", "no temporary file is left");
    let back = work.path().join("back.bin");
    let back_arg = back.display().to_string();
    let down = run(&["--json", "cp", "f2:big.bin", &back_arg], None);
    assert_eq!(down.code, 0, "{}", down.stderr);
    let down = down.json();
    assert_eq!(down["sha256"].as_str(), Some(sum.as_str()));
    assert!(
        std::fs::read(&back).unwrap() == big,
        "the file came back as it went"
    );
    eprintln!(
        "cp 100 MiB: up {:.1} MiB/s, down {:.1} MiB/s (debug build)",
        up["mib_per_s"].as_f64().unwrap(),
        down["mib_per_s"].as_f64().unwrap()
    );
    // Into a directory, by the source's name; a human line.
    let into = run(
        &[
            "cp",
            "f2:/etc/hostname",
            &format!("{}/", work.path().display()),
        ],
        None,
    );
    assert!(
        into.code == 0 && into.stdout.contains("sha256") && work.path().join("hostname").is_file(),
        "{}",
        into.stderr
    );
    // Bad input: says what, exits 1, leaves nothing behind.
    let before: Vec<_> = std::fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    for (args, says) in [
        (
            vec!["cp", "/nonexistent/file", "f2:/workspace/"],
            "/nonexistent/file: No such file",
        ),
        (
            vec!["cp", work.path().to_str().unwrap(), "f2:/workspace/"],
            "is a directory",
        ),
        (
            vec!["cp", "f2:/workspace/missing", back_arg.as_str()],
            "missing",
        ),
        (vec!["cp", "f2:/workspace", back_arg.as_str()], "not a file"),
        (
            vec!["cp", local_arg.as_str(), "nosuchvm:/workspace/"],
            "nosuchvm",
        ),
        (
            vec!["cp", local_arg.as_str(), back_arg.as_str()],
            "neither side is a VM",
        ),
    ] {
        let out = run(&args, None);
        assert!(
            out.code == 1 && out.stderr.contains(says),
            "{args:?}: {} {}",
            out.code,
            out.stderr
        );
    }
    let after: Vec<_> = std::fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before, after, "a failed copy leaves no file");
    // An empty file and one of exactly two chunks, both ways.
    for (name, len) in [("empty", 0usize), ("two-chunks", 8 << 20)] {
        let bytes = noise(len);
        let from = work.path().join(name);
        std::fs::write(&from, &bytes).unwrap();
        let up = run(&["cp", from.to_str().unwrap(), "f2:/tmp/"], None);
        assert_eq!(up.code, 0, "{name}: {}", up.stderr);
        let again = work.path().join(format!("{name}.back"));
        let down = run(
            &["cp", &format!("f2:/tmp/{name}"), again.to_str().unwrap()],
            None,
        );
        assert_eq!(down.code, 0, "{name}: {}", down.stderr);
        assert!(
            std::fs::read(&again).unwrap() == bytes,
            "{name} came back as it went"
        );
    }
    // Ctrl-C in the middle: exit 130, and the partial copy is gone.
    let child = Command::new(env!("CARGO_BIN_EXE_nexusctl"))
        .args([
            "--socket",
            &socket,
            "cp",
            &local_arg,
            "f2:/workspace/interrupted.bin",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once the partial copy is there (the transfer under way).
    let mut under_way = false;
    for _ in 0..100 {
        let listed = run(&["exec", "f2", "--", "ls", "-A", "/workspace"], None);
        if listed.stdout.contains(".interrupted.bin.nexusctl-") {
            under_way = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(under_way, "the upload never started");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left = run(
        &[
            "exec",
            "f2",
            "--",
            "sh",
            "-c",
            "ls -A /workspace | grep -v lost+found",
        ],
        None,
    );
    assert_eq!(left.stdout.trim(), "big.bin");

    // policy: a role, a grant, and back.
    let role = run(
        &[
            "policy",
            "set-role",
            "ctl-reader",
            "--tools",
            "list_*,get_vm",
            "--vms",
            "granted",
            "--egress",
            "none",
            "--max-vcpus",
            "2",
        ],
        None,
    );
    assert_eq!(
        (role.code, role.stdout.trim()),
        (0, "role ctl-reader created"),
        "{}",
        role.stderr
    );
    let roles = run(&["--json", "policy", "roles"], None).json();
    let reader = roles["roles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "ctl-reader")
        .unwrap()
        .clone();
    assert_eq!(
        (
            reader["vms"].as_str(),
            reader["egress"].clone(),
            reader["quota"]["max_vcpus"].as_u64()
        ),
        (Some("granted"), serde_json::json!([]), Some(2)),
        "{reader}"
    );
    assert!(
        run(&["policy", "roles"], None)
            .stdout
            .contains("ctl-reader")
    );
    assert_eq!(run(&["policy", "grant", "f2", "uid:4321"], None).code, 0);
    let grants = run(&["policy", "grants", "--vm", "f2"], None);
    assert!(
        grants
            .stdout
            .lines()
            .nth(1)
            .unwrap_or("")
            .starts_with("f2  uid:4321"),
        "{}",
        grants.stdout
    );
    assert_eq!(run(&["policy", "revoke", "f2", "uid:4321"], None).code, 0);
    assert!(
        run(&["policy", "grants"], None)
            .stdout
            .contains("no grants")
    );
    // Changing only its tools keeps its egress and quotas.
    let changed = run(
        &["policy", "set-role", "ctl-reader", "--tools", "list_*"],
        None,
    );
    assert_eq!(
        (changed.code, changed.stdout.trim()),
        (0, "role ctl-reader replaced"),
        "{}",
        changed.stderr
    );
    let roles = run(&["--json", "policy", "roles"], None).json();
    let reader = roles["roles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "ctl-reader")
        .unwrap()
        .clone();
    assert_eq!(
        (
            reader["egress"].clone(),
            reader["quota"]["max_vcpus"].as_u64(),
            reader["tools"].clone()
        ),
        (
            serde_json::json!([]),
            Some(2),
            serde_json::json!(["list_*"])
        ),
        "{reader}"
    );
    let bad = run(&["policy", "set-role", "Bad Name", "--tools", "x"], None);
    assert_eq!(bad.code, 1, "{}", bad.stderr);
    assert_eq!(run(&["policy", "rm-role", "ctl-reader"], None).code, 0);
    assert!(
        !run(&["policy", "roles"], None)
            .stdout
            .contains("ctl-reader")
    );

    // image build (its log on stderr), ls, rm; a recipe that does not read.
    let recipe = work.path().join("r.toml");
    std::fs::write(&recipe, "env = { BUILT = \"yes\" }\n").unwrap();
    let built = run(
        &[
            "image",
            "build",
            "ctl-img",
            "--recipe",
            recipe.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(built.code, 0, "{}", built.stderr);
    assert!(
        built.stdout.starts_with("image ctl-img added (sha256:"),
        "{}",
        built.stdout
    );
    assert!(!built.stderr.trim().is_empty(), "the build log is shown");
    assert!(run(&["image", "ls"], None).stdout.contains("ctl-img"));
    assert!(
        run(&["image", "rm", "ctl-img"], None)
            .stdout
            .contains("image ctl-img deleted")
    );
    assert!(!run(&["image", "ls"], None).stdout.contains("ctl-img"));
    let missing = run(
        &["image", "build", "x", "--recipe", "/nonexistent.toml"],
        None,
    );
    assert!(
        missing.code == 1 && missing.stderr.contains("/nonexistent.toml"),
        "{}",
        missing.stderr
    );
    assert_eq!(
        run(&["image", "rm", "default"], None).code,
        1,
        "refused while f2 uses it"
    );
    let import = run(&["image", "import", "ctl-x", "relative/layout"], None);
    assert!(
        import.code == 1 && import.stderr.contains("must be absolute"),
        "{}",
        import.stderr
    );
    let pull = run(&["image", "pull", "ctl-x", "Not A Reference"], None);
    assert!(
        pull.code == 1 && pull.stderr.contains("is not an image reference"),
        "{}",
        pull.stderr
    );
    assert!(!run(&["image", "ls"], None).stdout.contains("ctl-x"));

    // --follow: the console and the audit trail, as they happen.
    let console = Follower::start(&[
        "--socket", &socket, "vm", "console", "f2", "--lines", "1", "--follow",
    ]);
    let audit = Follower::start(&[
        "--socket", &socket, "--json", "audit", "--limit", "1", "--follow",
    ]);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let wrote = run(
        &[
            "exec",
            "f2",
            "--",
            "sh",
            "-c",
            "echo '<1>ctl-follow-marker' > /dev/kmsg",
        ],
        None,
    );
    assert_eq!(wrote.code, 0, "{}", wrote.stderr);
    console.wait_for(|l| l.contains("ctl-follow-marker"));
    assert_eq!(run(&["vm", "info", "f2"], None).code, 0);
    let row = audit.wait_for(|l| l.contains("\"get_vm\""));
    let row: Value = serde_json::from_str(&row).unwrap();
    assert_eq!(row["vm"], "f2");

    // shell, on a real terminal: typed to, resized, interrupted, its exit code.
    let mut term = Terminal::start(&["--socket", &socket, "shell", "f2"], 24, 80);
    term.expect("hi-42", Some("echo hi-$((6*7))\r"));
    term.type_("stty size\r");
    term.expect("24 80", None);
    term.resize(40, 120);
    term.expect("40 120", Some("stty size\r"));
    // Ctrl-C once the command surely runs.
    term.type_("sh -c 'echo go-$((1+1)); exec sleep 100'\r");
    term.expect("go-2", None);
    term.type_("\u{3}");
    term.expect("after-2", Some("echo after-$((1+1))\r"));
    term.type_("exit 7\r");
    assert_eq!(term.wait(), 7, "{:?}", term.screen.lock().unwrap());
    let mode = nix::sys::termios::tcgetattr(&term.master).unwrap();
    use nix::sys::termios::LocalFlags;
    assert!(
        mode.local_flags
            .contains(LocalFlags::ICANON | LocalFlags::ECHO),
        "the terminal is given back as it was: {:?}",
        mode.local_flags
    );
    // Ctrl-] ends a session from this side; its command goes with it.
    let mut term = Terminal::start(&["--socket", &socket, "shell", "f2", "--", "sh"], 24, 80);
    term.expect("ready-9", Some("echo ready-$((4+5)); sleep 200\r"));
    term.type_("\u{1d}");
    assert_eq!(term.wait(), 130, "{:?}", term.screen.lock().unwrap());
    assert!(
        term.screen
            .lock()
            .unwrap()
            .contains("session ended with Ctrl-]")
    );
    let left = run(
        &[
            "exec",
            "f2",
            "--",
            "sh",
            "-c",
            "command -v ps >/dev/null || exit 9; ps -o args | grep -E '^sleep (100|200)' || echo none",
        ],
        None,
    );
    assert_eq!(
        left.stdout.trim(),
        "none",
        "Ctrl-C and Ctrl-] ended the sleeps"
    );
    // Not on a terminal: a clear refusal, nothing started.
    let piped = run(&["shell", "f2"], None);
    assert!(
        piped.code == 1 && piped.stderr.contains("use `nexusctl exec"),
        "{}",
        piped.stderr
    );

    // Completions; flags win over the environment; --token-file needs --url.
    let bash = run(&["completions", "bash"], None);
    assert!(
        bash.code == 0 && bash.stdout.contains("_nexusctl()"),
        "{}",
        bash.stderr
    );
    let out = Command::new(env!("CARGO_BIN_EXE_nexusctl"))
        .args(["--socket", &socket, "vm", "ls"])
        .env("NEXUS_SOCKET", "/nonexistent.sock")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = work.path().join("token");
    std::fs::write(&token, "nexus_x\n").unwrap();
    let out = run(&["--token-file", token.to_str().unwrap(), "vm", "ls"], None);
    assert!(
        out.code == 1 && out.stderr.contains("--token-file is for --url"),
        "{}",
        out.stderr
    );
}
