//! Running one command to completion, with a deadline, output caps and
//! cancellation.
//!
//! Every command runs in a process group and a process tree (cgroup) of its
//! own. When the command ends, times out or is cancelled, the whole tree is
//! killed, `setsid` or not: background jobs an `exec` leaves behind would
//! otherwise hold its output pipes open (and the call) forever, and a
//! timeout that leaves processes running is no timeout.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine as _;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use crate::limits::Limits;
use crate::trees::{Tree, Trees};

/// How long output is still drained after the command's group was killed.
/// Only a process that left the group (setsid) can hold a pipe past this.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// The arguments of the `exec` tool.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Shell command line, run by `/bin/sh -c`. Give either this or `argv`.
    #[serde(default)]
    pub command: Option<String>,
    /// Program and its arguments, run directly without a shell. Give either
    /// this or `command`.
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    /// Working directory; defaults to guest-mcp's own (`/workspace` in a VM
    /// that has one).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Extra environment variables, added to guest-mcp's environment.
    #[serde(default)]
    pub env: Option<BTreeMap<String, String>>,
    /// Text written to the command's standard input, which is then closed.
    /// Without it, standard input is empty.
    #[serde(default)]
    pub stdin: Option<String>,
    /// Seconds before the command's whole process group is killed
    /// (default 60, capped by the guest's configuration).
    #[serde(default)]
    pub timeout_s: Option<u64>,
    /// Bytes kept of each of stdout and stderr; the rest is dropped and the
    /// matching `*_truncated` flag set (default 1 MiB, capped by the guest's
    /// configuration).
    #[serde(default)]
    pub max_output_bytes: Option<usize>,
}

/// How an output stream is encoded in the result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OutputEncoding {
    /// The bytes were valid UTF-8 and are given as they are.
    Utf8,
    /// The bytes were not valid UTF-8 and are given in standard base64.
    Base64,
}

/// The result of the `exec` tool.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ExecResult {
    /// Exit status, when the command exited on its own.
    pub exit_code: Option<i32>,
    /// Number of the signal that ended the command, when one did.
    pub signal: Option<i32>,
    /// Standard output, in `stdout_encoding`.
    pub stdout: String,
    /// Standard error, in `stderr_encoding`.
    pub stderr: String,
    pub stdout_encoding: OutputEncoding,
    pub stderr_encoding: OutputEncoding,
    /// Standard output went past `max_output_bytes`; the tail was dropped.
    pub stdout_truncated: bool,
    /// Standard error went past `max_output_bytes`; the tail was dropped.
    pub stderr_truncated: bool,
    /// The command ran past `timeout_s` and everything it started was killed.
    pub timed_out: bool,
    /// The command's process tree went past its memory limit and was killed.
    pub oom_killed: bool,
    /// Wall time from start to exit, in milliseconds.
    pub duration_ms: u64,
}

/// Why a command could not be run. Each message names the argument at fault.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(
        "give exactly one of `command` (a shell command line) or `argv` (a program and its arguments)"
    )]
    NeitherOrBoth,
    #[error("`argv` is empty: its first element must be the program to run")]
    EmptyArgv,
    #[error("`{0}` contains a NUL byte, which no program argument, path or variable can hold")]
    NulByte(&'static str),
    #[error("`env` key {0:?} is invalid: keys must be non-empty and contain no `=`")]
    BadEnvKey(String),
    #[error("`timeout_s` must be between 1 and {max}, got {got}")]
    BadTimeout { got: u64, max: u64 },
    #[error("`max_output_bytes` must be at most {max}, got {got}")]
    BadOutputCap { got: usize, max: usize },
    #[error("`cwd` {path:?} is not a directory in the guest")]
    BadCwd { path: String },
    #[error("could not start {program:?}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("lost track of the command: {0}")]
    Wait(#[source] std::io::Error),
    #[error("cancelled by the client; everything the command started was killed")]
    Cancelled,
}

/// Which stream a chunk of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Receives output as it is produced (for progress notifications).
pub type OutputObserver = tokio::sync::mpsc::UnboundedSender<(Stream, Vec<u8>)>;

/// Runs `req` under `limits`; `cancel` kills it early; `observer`, when
/// given, sees every chunk of output as it arrives.
pub async fn run(
    req: ExecRequest,
    limits: &Limits,
    trees: &Trees,
    default_cwd: Option<&Path>,
    cancel: CancellationToken,
    observer: Option<OutputObserver>,
) -> Result<ExecResult, ExecError> {
    let plan = Plan::validate(req, limits, default_cwd)?;
    let started = Instant::now();

    let program = &plan.program;
    let mut cmd = Command::new(&program.argv[0]);
    cmd.args(&program.argv[1..])
        .envs(crate::network::env())
        .envs(&program.env)
        .stdin(if plan.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(cwd) = &program.cwd {
        cmd.current_dir(cwd);
    }
    let tree = trees.tree();
    trees.enter_on_spawn(&tree, &mut cmd);
    let mut child = cmd.spawn().map_err(|source| ExecError::Spawn {
        program: program.argv[0].clone(),
        source,
    })?;
    // A group id is the leader's pid; the guard kills the group and the
    // tree however this function is left (including the future being
    // dropped on cancellation).
    let group = GroupGuard {
        leader: child.id().map(|pid| Pid::from_raw(pid as i32)),
        tree,
    };

    if let (Some(input), Some(mut pipe)) = (plan.stdin, child.stdin.take()) {
        // A command that exits without reading its input is not an error.
        tokio::spawn(async move {
            let _ = pipe.write_all(input.as_bytes()).await;
        });
    }
    // Fired a grace period after the command ends: a process that left
    // the group may hold the pipes open, and must not hold the call.
    let stop_reading = CancellationToken::new();
    let stdout = tokio::spawn(read_capped(
        child.stdout.take(),
        plan.max_output,
        observer.clone().map(|o| (o, Stream::Stdout)),
        stop_reading.clone(),
    ));
    let stderr = tokio::spawn(read_capped(
        child.stderr.take(),
        plan.max_output,
        observer.map(|o| (o, Stream::Stderr)),
        stop_reading.clone(),
    ));
    // Readers also stop if this call is dropped (cancelled) midway.
    let _stop_guard = stop_reading.clone().drop_guard();

    let deadline = tokio::time::sleep(Duration::from_secs(plan.timeout_s));
    let (status, timed_out) = tokio::select! {
        status = child.wait() => (status.map_err(ExecError::Wait)?, false),
        () = deadline => {
            group.kill();
            (child.wait().await.map_err(ExecError::Wait)?, true)
        }
        () = cancel.cancelled() => {
            group.kill();
            let _ = child.wait().await;
            return Err(ExecError::Cancelled);
        }
    };
    // The command is over: whatever it left running in its group goes too.
    group.kill();
    let duration_ms = started.elapsed().as_millis() as u64;
    let oom_killed = group.tree.oom_killed();
    tokio::spawn({
        let stop = stop_reading.clone();
        async move {
            tokio::time::sleep(DRAIN_GRACE).await;
            stop.cancel();
        }
    });

    let (out, out_truncated) = drain(stdout).await;
    let (err, err_truncated) = drain(stderr).await;
    let (stdout, stdout_encoding) = encode(out, out_truncated);
    let (stderr, stderr_encoding) = encode(err, err_truncated);
    Ok(ExecResult {
        exit_code: status.code(),
        signal: status.signal(),
        stdout,
        stderr,
        stdout_encoding,
        stderr_encoding,
        stdout_truncated: out_truncated,
        stderr_truncated: err_truncated,
        timed_out,
        oom_killed,
        duration_ms,
    })
}

/// A validated program: what `exec` and `process_start` both run.
#[derive(Debug, Clone)]
pub struct Program {
    pub argv: Vec<String>,
    pub cwd: Option<String>,
    pub env: BTreeMap<String, String>,
}

impl Program {
    /// Checks `command` xor `argv`, `cwd` and `env`; `default_cwd` applies
    /// when no `cwd` is given and it exists.
    pub fn new(
        command: Option<String>,
        argv: Option<Vec<String>>,
        cwd: Option<String>,
        env: Option<BTreeMap<String, String>>,
        default_cwd: Option<&Path>,
    ) -> Result<Self, ExecError> {
        let argv = match (command, argv) {
            (Some(command), None) => {
                no_nul("command", &command)?;
                vec!["/bin/sh".to_owned(), "-c".to_owned(), command]
            }
            (None, Some(argv)) => {
                if argv.is_empty() {
                    return Err(ExecError::EmptyArgv);
                }
                for arg in &argv {
                    no_nul("argv", arg)?;
                }
                argv
            }
            _ => return Err(ExecError::NeitherOrBoth),
        };
        let env = env.unwrap_or_default();
        for (key, value) in &env {
            if key.is_empty() || key.contains('=') {
                return Err(ExecError::BadEnvKey(key.clone()));
            }
            no_nul("env", key)?;
            no_nul("env", value)?;
        }
        let cwd = match cwd {
            Some(cwd) => {
                no_nul("cwd", &cwd)?;
                if !Path::new(&cwd).is_dir() {
                    return Err(ExecError::BadCwd { path: cwd });
                }
                Some(cwd)
            }
            None => default_cwd
                .filter(|d| d.is_dir())
                .map(|d| d.to_string_lossy().into_owned()),
        };
        Ok(Self { argv, cwd, env })
    }
}

/// A request checked against the limits, ready to spawn.
struct Plan {
    program: Program,
    stdin: Option<String>,
    timeout_s: u64,
    max_output: usize,
}

impl Plan {
    fn validate(
        req: ExecRequest,
        limits: &Limits,
        default_cwd: Option<&Path>,
    ) -> Result<Self, ExecError> {
        let program = Program::new(req.command, req.argv, req.cwd, req.env, default_cwd)?;
        let timeout_s = req.timeout_s.unwrap_or(limits.default_exec_timeout_s);
        if timeout_s == 0 || timeout_s > limits.max_exec_timeout_s {
            return Err(ExecError::BadTimeout {
                got: timeout_s,
                max: limits.max_exec_timeout_s,
            });
        }
        let max_output = req.max_output_bytes.unwrap_or(limits.default_output_bytes);
        if max_output > limits.max_output_bytes {
            return Err(ExecError::BadOutputCap {
                got: max_output,
                max: limits.max_output_bytes,
            });
        }
        Ok(Self {
            program,
            stdin: req.stdin,
            timeout_s,
            max_output,
        })
    }
}

fn no_nul(arg: &'static str, value: &str) -> Result<(), ExecError> {
    if value.contains('\0') {
        Err(ExecError::NulByte(arg))
    } else {
        Ok(())
    }
}

/// Kills a process group when asked and when dropped.
struct GroupGuard {
    leader: Option<Pid>,
    tree: Tree,
}

impl GroupGuard {
    fn kill(&self) {
        if let Some(pgid) = self.leader {
            // ESRCH (the group is already gone) is the expected case.
            let _ = killpg(pgid, Signal::SIGKILL);
        }
        self.tree.kill();
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads a pipe to its end, keeping at most `cap` bytes; the rest is read
/// and dropped so the writer never blocks on a full pipe.
async fn read_capped<R: AsyncRead + Unpin>(
    pipe: Option<R>,
    cap: usize,
    observer: Option<(OutputObserver, Stream)>,
    stop: CancellationToken,
) -> (Vec<u8>, bool) {
    let Some(mut pipe) = pipe else {
        return (Vec::new(), false);
    };
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let read = tokio::select! {
            read = pipe.read(&mut buf) => read,
            () = stop.cancelled() => {
                // Something still holds the pipe: say the output may go on.
                truncated = true;
                break;
            }
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                if n > room {
                    truncated = true;
                }
                let keep = &buf[..n.min(room)];
                // Progress carries only what the result keeps: output past
                // the cap must not pile up in memory on its way out.
                if let Some((observer, stream)) = &observer
                    && !keep.is_empty()
                {
                    let _ = observer.send((*stream, keep.to_vec()));
                }
                kept.extend_from_slice(keep);
            }
        }
    }
    (kept, truncated)
}

/// A reader's output; it returns by itself within the drain grace.
async fn drain(reader: tokio::task::JoinHandle<(Vec<u8>, bool)>) -> (Vec<u8>, bool) {
    reader.await.unwrap_or((Vec::new(), true))
}

/// UTF-8 text is returned as it is; anything else as base64, so no byte is
/// lost. A cut at the cap may split a character: that partial character is
/// dropped rather than forcing the whole stream into base64.
/// Shrinks a result's output until its JSON takes at most `budget` bytes
/// (what one MCP message may carry, less room for the rest): the longer
/// stream is cut in half, and flagged truncated, until it fits. JSON
/// escaping can make text up to six times its size, so the bytes kept are
/// not enough to know.
pub fn fit(result: &mut ExecResult, budget: usize) {
    fn halve(text: &mut String, encoding: OutputEncoding) {
        let mut at = text.len() / 2;
        match encoding {
            // Whole base64 quads only.
            OutputEncoding::Base64 => at -= at % 4,
            OutputEncoding::Utf8 => {
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
            }
        }
        text.truncate(at);
    }
    while serde_json::to_vec(result).map_or(0, |v| v.len()) > budget {
        if result.stdout.is_empty() && result.stderr.is_empty() {
            return;
        }
        if result.stdout.len() >= result.stderr.len() {
            halve(&mut result.stdout, result.stdout_encoding);
            result.stdout_truncated = true;
        } else {
            halve(&mut result.stderr, result.stderr_encoding);
            result.stderr_truncated = true;
        }
    }
}

fn encode(bytes: Vec<u8>, truncated: bool) -> (String, OutputEncoding) {
    let (text, encoding, _) = encode_chunk(bytes, truncated);
    (text, encoding)
}

/// Encodes a chunk of a longer byte stream. When `cut` (more bytes follow),
/// a character split at the end is left for the next chunk. Returns the
/// text, its encoding and how many bytes it holds.
pub fn encode_chunk(mut bytes: Vec<u8>, cut: bool) -> (String, OutputEncoding, usize) {
    if cut
        && let Err(e) = std::str::from_utf8(&bytes)
        && e.error_len().is_none()
        && e.valid_up_to() > 0
    {
        bytes.truncate(e.valid_up_to());
    }
    let used = bytes.len();
    match String::from_utf8(bytes) {
        Ok(text) => (text, OutputEncoding::Utf8, used),
        Err(e) => (
            base64::engine::general_purpose::STANDARD.encode(e.into_bytes()),
            OutputEncoding::Base64,
            used,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trees() -> Trees {
        Trees::new(Default::default(), false)
    }

    fn sh(command: &str) -> ExecRequest {
        ExecRequest {
            command: Some(command.to_owned()),
            ..Default::default()
        }
    }

    async fn run_ok(req: ExecRequest) -> ExecResult {
        run(
            req,
            &Limits::default(),
            &trees(),
            None,
            CancellationToken::new(),
            None,
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn runs_a_shell_command_and_captures_both_streams() {
        let r = run_ok(sh("echo out; echo err >&2; exit 3")).await;
        assert_eq!(r.exit_code, Some(3));
        assert_eq!(r.signal, None);
        assert_eq!(r.stdout, "out\n");
        assert_eq!(r.stderr, "err\n");
        assert!(!r.timed_out && !r.stdout_truncated && !r.stderr_truncated);
    }

    #[tokio::test]
    async fn argv_cwd_env_and_stdin_reach_the_program() {
        let dir = tempfile::tempdir().unwrap();
        let r = run_ok(ExecRequest {
            argv: Some(vec![
                "/bin/sh".into(),
                "-c".into(),
                "pwd; echo $GREETING; cat".into(),
            ]),
            cwd: Some(dir.path().to_str().unwrap().into()),
            env: Some([("GREETING".to_owned(), "hello".to_owned())].into()),
            stdin: Some("from stdin".into()),
            ..Default::default()
        })
        .await;
        let expected = format!(
            "{}\nhello\nfrom stdin",
            dir.path().canonicalize().unwrap().display()
        );
        assert_eq!(r.stdout, expected);
    }

    #[tokio::test]
    async fn output_past_the_cap_is_truncated_and_flagged() {
        let mut req = sh("head -c 100000 /dev/zero | tr '\\0' a");
        req.max_output_bytes = Some(1000);
        let r = run_ok(req).await;
        assert_eq!(r.stdout.len(), 1000);
        assert!(r.stdout_truncated);
        assert_eq!(r.exit_code, Some(0));
    }

    #[tokio::test]
    async fn non_utf8_output_comes_back_as_base64() {
        let r = run_ok(sh("printf '\\377\\376ok'")).await;
        assert_eq!(r.stdout_encoding, OutputEncoding::Base64);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&r.stdout)
            .unwrap();
        assert_eq!(bytes, b"\xff\xfeok");
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let mut req = sh(&format!(
            "sleep 300 & echo $! > {}; wait",
            pidfile.display()
        ));
        req.timeout_s = Some(1);
        let r = run_ok(req).await;
        assert!(r.timed_out);
        assert_eq!(r.signal, Some(libc::SIGKILL));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            dies_soon(pid),
            "background sleep {pid} survived the timeout"
        );
    }

    #[tokio::test]
    async fn background_jobs_do_not_hold_the_call_open() {
        let started = Instant::now();
        let r = run_ok(sh("sleep 300 & echo started")).await;
        assert_eq!(r.stdout, "started\n");
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[tokio::test]
    async fn a_process_that_leaves_the_group_does_not_hold_the_call_nor_outlive_it() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let started = Instant::now();
        let contained = trees().contained();
        let r = run_ok(sh(&format!(
            "setsid sh -c 'echo $$ > {}; exec sleep 300' & sleep 0.3; echo hi",
            pidfile.display()
        )))
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "held by the escaped process"
        );
        assert_eq!(r.stdout, "hi\n");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        if contained {
            // Its tree was killed with the command: the output is complete.
            assert!(!r.stdout_truncated);
            assert!(dies_soon(pid), "the setsid'd sleep {pid} outlived the exec");
        } else {
            eprintln!("no cgroup v2 here: only the process group is killed");
            assert!(r.stdout_truncated, "output may go on past the call");
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }

    #[tokio::test]
    async fn a_timeout_kills_a_setsid_process_too() {
        if !trees().contained() {
            eprintln!("skipping: no writable cgroup v2 hierarchy here");
            assert!(
                !nix::unistd::Uid::effective().is_root(),
                "as root (CI), cgroup v2 must be usable"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let mut req = sh(&format!(
            "setsid sh -c 'echo $$ > {}; exec sleep 1000' & sleep 1000",
            pidfile.display()
        ));
        req.timeout_s = Some(1);
        let r = run_ok(req).await;
        assert!(r.timed_out);
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            dies_soon(pid),
            "the setsid'd sleep {pid} survived the timeout"
        );
    }

    #[tokio::test]
    async fn cancellation_kills_the_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let cancel = CancellationToken::new();
        let req = sh(&format!(
            "sleep 300 & echo $! > {}; wait",
            pidfile.display()
        ));
        let task = tokio::spawn({
            let cancel = cancel.clone();
            async move { run(req, &Limits::default(), &trees(), None, cancel, None).await }
        });
        while !pidfile.exists() || std::fs::read_to_string(&pidfile).unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cancel.cancel();
        assert!(matches!(task.await.unwrap(), Err(ExecError::Cancelled)));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            dies_soon(pid),
            "background sleep {pid} survived cancellation"
        );
    }

    #[tokio::test]
    async fn bad_requests_name_the_argument_at_fault() {
        let limits = Limits::default();
        let cases: Vec<(ExecRequest, &str)> = vec![
            (ExecRequest::default(), "exactly one of `command`"),
            (
                ExecRequest {
                    command: Some("true".into()),
                    argv: Some(vec!["true".into()]),
                    ..Default::default()
                },
                "exactly one of `command`",
            ),
            (
                ExecRequest {
                    argv: Some(vec![]),
                    ..Default::default()
                },
                "`argv` is empty",
            ),
            (sh("echo a\0b"), "`command` contains a NUL"),
            (
                ExecRequest {
                    cwd: Some("/no/such/dir".into()),
                    ..sh("true")
                },
                "`cwd` \"/no/such/dir\" is not a directory",
            ),
            (
                ExecRequest {
                    env: Some([("A=B".to_owned(), "x".to_owned())].into()),
                    ..sh("true")
                },
                "`env` key \"A=B\"",
            ),
            (
                ExecRequest {
                    timeout_s: Some(0),
                    ..sh("true")
                },
                "`timeout_s` must be between 1 and 3600, got 0",
            ),
            (
                ExecRequest {
                    max_output_bytes: Some(usize::MAX),
                    ..sh("true")
                },
                "`max_output_bytes` must be at most",
            ),
            (
                ExecRequest {
                    argv: Some(vec!["/no/such/program".into()]),
                    ..Default::default()
                },
                "could not start \"/no/such/program\"",
            ),
        ];
        for (req, expected) in cases {
            let err = run(req, &limits, &trees(), None, CancellationToken::new(), None)
                .await
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(expected),
                "{err:?} does not contain {expected:?}"
            );
        }
    }

    /// A killed process takes a moment to finish dying and be reaped.
    fn dies_soon(pid: i32) -> bool {
        for _ in 0..250 {
            if !process_alive(pid) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn process_alive(pid: i32) -> bool {
        // A zombie still answers kill(0); its /proc state says it is dead.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => !stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z')),
            Err(_) => false,
        }
    }
}
