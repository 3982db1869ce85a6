//! Background processes: started by one MCP call, read and driven by later
//! ones, on any connection. They outlive the connection that started them.
//!
//! Each stream's output is kept in a ring buffer of bounded size; readers
//! ask from an absolute byte offset and are told how many bytes were
//! dropped before what they get.
//!
//! Each process and everything it starts live in a process tree of their
//! own (see `trees`): signals with `group` reach all of it, `setsid` or
//! not, and a process is reported ended only once its leader has exited
//! and its output pipes have closed, so its output is complete.
//!
//! If guest-mcp itself dies, the output pipes die with it, so its processes
//! cannot be adopted again. They are killed and reported instead: every
//! process is recorded in a state file, and a restarted guest-mcp kills the
//! process groups it finds there still alive and lists them with the status
//! `lost`, saying why.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{ChildStdin, Command};

use crate::exec::{Program, encode_chunk};
use crate::limits::Limits;
use crate::pty::Master;
use crate::trees::{Tree, Trees};

/// Where a process is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum ProcessState {
    Running,
    /// It ended on its own or by a signal.
    Exited {
        exit_code: Option<i32>,
        signal: Option<i32>,
    },
    /// guest-mcp restarted while it ran; it was killed then.
    Lost {
        reason: String,
    },
}

/// What the process tools report of one process.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ProcessInfo {
    /// The handle other process tools take.
    pub id: String,
    pub pid: u32,
    /// The program and its arguments.
    pub argv: Vec<String>,
    pub cwd: Option<String>,
    #[serde(flatten)]
    pub state: ProcessState,
    /// RFC 3339, UTC.
    pub started_at: String,
    /// Seconds it has run (until now, or until it ended).
    pub runtime_s: f64,
    /// Bytes it has written to stdout and stderr in all.
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    /// Its standard input is still open for `process_write_stdin`.
    pub stdin_open: bool,
    /// It runs on a pseudo-terminal: what it prints is all on stdout,
    /// what is written to its stdin is typed, process_resize resizes it.
    #[serde(default)]
    pub tty: bool,
}

/// The size of a process's terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TtySize {
    /// Rows, 1 to 1000.
    pub rows: u16,
    /// Columns, 1 to 1000.
    pub cols: u16,
}

impl TtySize {
    fn check(self) -> Result<Self, ProcessError> {
        let ok = |n: u16| (1..=crate::pty::MAX_SIDE).contains(&n);
        if ok(self.rows) && ok(self.cols) {
            Ok(self)
        } else {
            Err(ProcessError::BadSize(self.rows, self.cols))
        }
    }
}

/// One stream's output from an offset, as `process_output` returns it.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct StreamChunk {
    /// The bytes, in `encoding`.
    pub data: String,
    pub encoding: crate::exec::OutputEncoding,
    /// Offset of the first byte returned.
    pub offset: u64,
    /// Pass this as the next offset to continue where this chunk ends.
    pub next_offset: u64,
    /// Bytes between the requested offset and `offset` that the ring
    /// buffer had already dropped.
    pub dropped_bytes: u64,
    /// Everything written so far was returned.
    pub at_end: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("no background process {0:?}: process_list shows the ids that exist")]
    NotFound(String),
    #[error(
        "{0} background processes are kept already (the limit): wait for one to end, or signal one; finished ones are forgotten oldest first"
    )]
    TooMany(usize),
    #[error("could not start {program:?}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("process {0} has no open stdin: it was closed, or the process ended")]
    StdinClosed(String),
    #[error("writing to process {id}'s stdin failed: {source}")]
    Stdin {
        id: String,
        #[source]
        source: std::io::Error,
    },
    #[error("process {0} is not reading its stdin: the write did not finish within 10 s")]
    StdinFull(String),
    #[error("process {0} is not running")]
    NotRunning(String),
    #[error("`signal` {0:?} is unknown: use TERM, KILL, INT, HUP, QUIT, USR1, USR2, STOP or CONT")]
    BadSignal(String),
    #[error("signalling process {id} failed: {source}")]
    Signal {
        id: String,
        #[source]
        source: nix::Error,
    },
    #[error("`max_bytes` must be between 1 and {max}, got {got}")]
    BadMaxBytes { got: usize, max: usize },
    #[error("a terminal of {0} rows and {1} columns: each must be between 1 and 1000")]
    BadSize(u16, u16),
    #[error("process {0} has no terminal: start it with `tty` to resize it")]
    NoTty(String),
    #[error("could not make a terminal: {0}")]
    Pty(#[source] std::io::Error),
    #[error("resizing process {id}'s terminal failed: {source}")]
    Resize {
        id: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where `process_write_stdin` writes: a pipe, or a terminal.
enum Input {
    Pipe(ChildStdin),
    Tty(Arc<Master>),
}

impl Input {
    async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Input::Pipe(pipe) => {
                pipe.write_all(data).await?;
                pipe.flush().await
            }
            Input::Tty(master) => master.write_all(data).await,
        }
    }
}

/// Bytes of one stream: the newest `cap` bytes, addressed by absolute offset.
#[derive(Debug, Default)]
struct Ring {
    buf: VecDeque<u8>,
    /// Absolute offset of `buf[0]`.
    start: u64,
    cap: usize,
}

impl Ring {
    fn new(cap: usize) -> Self {
        Self {
            buf: VecDeque::new(),
            start: 0,
            cap,
        }
    }

    fn total(&self) -> u64 {
        self.start + self.buf.len() as u64
    }

    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend(bytes);
        let excess = self.buf.len().saturating_sub(self.cap);
        if excess > 0 {
            self.buf.drain(..excess);
            self.start += excess as u64;
        }
    }

    fn read(&self, from: u64, max: usize) -> StreamChunk {
        let offset = from.clamp(self.start, self.total());
        let skip = (offset - self.start) as usize;
        let take = max.min(self.buf.len() - skip);
        let bytes: Vec<u8> = self.buf.range(skip..skip + take).copied().collect();
        let (data, encoding, used) = encode_chunk(bytes, offset + (take as u64) < self.total());
        let next_offset = offset + used as u64;
        StreamChunk {
            data,
            encoding,
            offset,
            next_offset,
            dropped_bytes: offset.saturating_sub(from),
            at_end: next_offset == self.total(),
        }
    }
}

struct Entry {
    info: ProcessInfo,
    started: Instant,
    ended: Option<Instant>,
    /// The leader has been reaped: its pid may be reused, never signal it.
    leader_exited: bool,
    /// Everything it started; dropping the entry kills what is left.
    tree: Option<Arc<Tree>>,
    stdin: Option<Arc<tokio::sync::Mutex<Input>>>,
    /// Its terminal, if it runs on one.
    tty: Option<Arc<Master>>,
    stdout: Ring,
    stderr: Ring,
}

/// The processes of this guest-mcp, shared by all its connections.
pub struct ProcessTable {
    entries: Mutex<BTreeMap<u64, Entry>>,
    next_id: Mutex<u64>,
    limits: Limits,
    trees: Arc<Trees>,
    state_file: Option<PathBuf>,
}

/// What a state file records of a process, to recognise it after a restart.
#[derive(Debug, Serialize, Deserialize)]
struct Recorded {
    id: String,
    pid: u32,
    /// Start time in clock ticks since boot (/proc/PID/stat field 22): a
    /// reused pid has another.
    start_ticks: u64,
    argv: Vec<String>,
    started_at: String,
}

impl ProcessTable {
    /// A table; with `state_file`, processes left by a previous guest-mcp
    /// are killed and listed as lost.
    pub fn new(limits: Limits, trees: Arc<Trees>, state_file: Option<PathBuf>) -> Arc<Self> {
        let table = Arc::new(Self {
            entries: Mutex::new(BTreeMap::new()),
            next_id: Mutex::new(1),
            limits,
            trees,
            state_file,
        });
        table.reap_previous_incarnation();
        table
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry>> {
        // A panic while holding the lock leaves plain data: keep serving.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new_id(&self) -> (u64, String) {
        let mut next = self.next_id.lock().unwrap_or_else(|e| e.into_inner());
        let n = *next;
        *next += 1;
        (n, format!("p{n}"))
    }

    /// Starts `program` in a process group of its own; with `tty`, on a
    /// new terminal of that size, in a session of its own.
    pub async fn start(
        self: &Arc<Self>,
        program: Program,
        keep_stdin_open: bool,
        tty: Option<TtySize>,
    ) -> Result<ProcessInfo, ProcessError> {
        let tty = tty.map(TtySize::check).transpose()?;
        self.make_room()?;
        let mut cmd = Command::new(&program.argv[0]);
        cmd.args(&program.argv[1..]).envs(crate::network::env());
        let master = match tty {
            Some(size) => {
                let (master, [stdin, stdout, stderr]) =
                    crate::pty::open(size.rows, size.cols).map_err(ProcessError::Pty)?;
                // Programs on a terminal want to know which kind.
                cmd.env("TERM", "xterm-256color");
                cmd.stdin(stdin).stdout(stdout).stderr(stderr);
                crate::pty::become_session_leader(&mut cmd);
                Some(Arc::new(master))
            }
            None => {
                cmd.stdin(if keep_stdin_open {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0);
                None
            }
        };
        cmd.envs(&program.env);
        if let Some(cwd) = &program.cwd {
            cmd.current_dir(cwd);
        }
        let tree = self.trees.tree();
        self.trees.enter_on_spawn(&tree, &mut cmd);
        let mut child = cmd.spawn().map_err(|source| ProcessError::Spawn {
            program: program.argv[0].clone(),
            source,
        })?;
        // The terminal side is the child's alone now: with it closed here,
        // reading ours ends when the child's processes have all closed it.
        drop(cmd);
        let pid = child.id().unwrap_or_default();
        let (key, id) = self.new_id();
        let info = ProcessInfo {
            id: id.clone(),
            pid,
            argv: program.argv.clone(),
            cwd: program.cwd.clone(),
            state: ProcessState::Running,
            started_at: now_rfc3339(),
            runtime_s: 0.0,
            stdout_bytes: 0,
            stderr_bytes: 0,
            stdin_open: keep_stdin_open || master.is_some(),
            tty: master.is_some(),
        };
        let cap = self.limits.process_buffer_bytes;
        self.lock().insert(
            key,
            Entry {
                info: info.clone(),
                started: Instant::now(),
                ended: None,
                leader_exited: false,
                tree: Some(Arc::new(tree)),
                stdin: match &master {
                    Some(m) => Some(Input::Tty(m.clone())),
                    None => child.stdin.take().map(Input::Pipe),
                }
                .map(|input| Arc::new(tokio::sync::Mutex::new(input))),
                tty: master.clone(),
                stdout: Ring::new(cap),
                stderr: Ring::new(cap),
            },
        );
        self.save_state();
        let out = match master {
            Some(master) => tokio::spawn(pump_tty(self.clone(), key, master)),
            None => tokio::spawn(pump(self.clone(), key, child.stdout.take(), Stream::Stdout)),
        };
        let err = tokio::spawn(pump(self.clone(), key, child.stderr.take(), Stream::Stderr));
        let table = self.clone();
        let on_tty = info.tty;
        tokio::spawn(async move {
            let status = child.wait().await;
            use std::os::unix::process::ExitStatusExt;
            let state = match status {
                Ok(s) => ProcessState::Exited {
                    exit_code: s.code(),
                    signal: s.signal(),
                },
                Err(e) => ProcessState::Lost {
                    reason: format!("waiting for it failed: {e}"),
                },
            };
            // The leader is reaped, its pid free for reuse: from now on it
            // must not be signalled by pid.
            if let Some(entry) = table.lock().get_mut(&key) {
                entry.leader_exited = true;
                entry.stdin = None;
                entry.info.stdin_open = false;
            }
            if on_tty {
                // A terminal's session ends with its leader, as when a
                // terminal closes: what is printed by then is read, then
                // what is left on it (background jobs) is hung up.
                let mut out = out;
                if tokio::time::timeout(TTY_GRACE, &mut out).await.is_err() {
                    let tree = table.lock().get(&key).and_then(|e| e.tree.clone());
                    if let Some(tree) = tree {
                        tree.signal(Signal::SIGHUP);
                    }
                    if tokio::time::timeout(TTY_GRACE, &mut out).await.is_err() {
                        out.abort();
                    }
                }
                let _ = err.await;
            } else {
                // What its children still write keeps arriving until the
                // pipes close; only then is its output complete and the
                // process ended.
                let _ = tokio::join!(out, err);
            }
            if let Some(entry) = table.lock().get_mut(&key) {
                entry.info.state = state;
                entry.ended = Some(Instant::now());
            }
            table.save_state();
        });
        Ok(info)
    }

    /// Forgets the oldest finished processes past the limit; refuses when
    /// every kept process still runs.
    fn make_room(&self) -> Result<(), ProcessError> {
        let mut entries = self.lock();
        while entries.len() >= self.limits.max_processes {
            let oldest_done = entries
                .iter()
                .find(|(_, e)| e.info.state != ProcessState::Running)
                .map(|(k, _)| *k);
            match oldest_done {
                Some(key) => {
                    entries.remove(&key);
                }
                None => return Err(ProcessError::TooMany(self.limits.max_processes)),
            }
        }
        Ok(())
    }

    pub fn list(&self) -> Vec<ProcessInfo> {
        self.lock().values().map(snapshot).collect()
    }

    pub fn status(&self, id: &str) -> Result<ProcessInfo, ProcessError> {
        let key = parse_id(id)?;
        self.lock()
            .get(&key)
            .map(snapshot)
            .ok_or_else(|| ProcessError::NotFound(id.to_owned()))
    }

    pub fn output(
        &self,
        id: &str,
        stdout_offset: u64,
        stderr_offset: u64,
        max_bytes: Option<usize>,
    ) -> Result<(ProcessInfo, StreamChunk, StreamChunk), ProcessError> {
        let max = max_bytes.unwrap_or(self.limits.process_buffer_bytes);
        if max == 0 || max > self.limits.max_io_bytes {
            return Err(ProcessError::BadMaxBytes {
                got: max,
                max: self.limits.max_io_bytes,
            });
        }
        let key = parse_id(id)?;
        let entries = self.lock();
        let entry = entries
            .get(&key)
            .ok_or_else(|| ProcessError::NotFound(id.to_owned()))?;
        Ok((
            snapshot(entry),
            entry.stdout.read(stdout_offset, max),
            entry.stderr.read(stderr_offset, max),
        ))
    }

    /// Writes `data` to a process's input (`close`: then ends it); the
    /// bytes written, and whether its input is still open once written
    /// (a terminal's stays open: `close` typed Ctrl-D), as of the write,
    /// whatever the process does with it next.
    pub async fn write_stdin(
        &self,
        id: &str,
        data: &[u8],
        close: bool,
    ) -> Result<(usize, bool), ProcessError> {
        let key = parse_id(id)?;
        let stdin = {
            let entries = self.lock();
            let entry = entries
                .get(&key)
                .ok_or_else(|| ProcessError::NotFound(id.to_owned()))?;
            entry
                .stdin
                .clone()
                .ok_or_else(|| ProcessError::StdinClosed(id.to_owned()))?
        };
        let written = tokio::time::timeout(STDIN_TIMEOUT, async {
            stdin.lock().await.write_all(data).await
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(source)) => {
                return Err(ProcessError::Stdin {
                    id: id.to_owned(),
                    source,
                });
            }
            Err(_) => return Err(ProcessError::StdinFull(id.to_owned())),
        }
        let on_tty = matches!(&*stdin.lock().await, Input::Tty(_));
        if close && on_tty {
            // A terminal has no end of input: Ctrl-D at the start of a
            // line is what a program reading it takes for one.
            let eof = tokio::time::timeout(STDIN_TIMEOUT, async {
                stdin.lock().await.write_all(b"\x04").await
            })
            .await;
            return match eof {
                Ok(Ok(())) => Ok((data.len(), true)),
                Ok(Err(source)) => Err(ProcessError::Stdin {
                    id: id.to_owned(),
                    source,
                }),
                Err(_) => Err(ProcessError::StdinFull(id.to_owned())),
            };
        }
        if close && let Some(entry) = self.lock().get_mut(&key) {
            entry.stdin = None;
            entry.info.stdin_open = false;
        }
        Ok((data.len(), !close))
    }

    /// Gives a process's terminal a new size (it gets SIGWINCH).
    pub fn resize(&self, id: &str, size: TtySize) -> Result<(), ProcessError> {
        let size = size.check()?;
        let key = parse_id(id)?;
        let master = {
            let entries = self.lock();
            let entry = entries
                .get(&key)
                .ok_or_else(|| ProcessError::NotFound(id.to_owned()))?;
            if entry.info.state != ProcessState::Running {
                return Err(ProcessError::NotRunning(id.to_owned()));
            }
            entry
                .tty
                .clone()
                .ok_or_else(|| ProcessError::NoTty(id.to_owned()))?
        };
        master
            .resize(size.rows, size.cols)
            .map_err(|source| ProcessError::Resize {
                id: id.to_owned(),
                source,
            })
    }

    pub fn signal(&self, id: &str, signal: &str, whole_group: bool) -> Result<(), ProcessError> {
        let signal = parse_signal(signal)?;
        let key = parse_id(id)?;
        let (pid, leader_exited, tree) = {
            let entries = self.lock();
            let entry = entries
                .get(&key)
                .ok_or_else(|| ProcessError::NotFound(id.to_owned()))?;
            if entry.info.state != ProcessState::Running || entry.info.pid <= 1 {
                return Err(ProcessError::NotRunning(id.to_owned()));
            }
            (
                Pid::from_raw(entry.info.pid as i32),
                entry.leader_exited,
                entry.tree.clone(),
            )
        };
        // Once the leader is gone, only the tree still addresses what is left.
        let contained =
            (whole_group || leader_exited) && tree.as_ref().is_some_and(|t| t.signal(signal));
        let sent = match (contained, whole_group, leader_exited) {
            (true, _, _) => Ok(()),
            // Without a tree, only a live leader's pid or group is safe to signal.
            (false, _, true) => return Err(ProcessError::NotRunning(id.to_owned())),
            (false, true, false) => killpg(pid, signal),
            (false, false, false) => kill(pid, signal),
        };
        sent.map_err(|source| ProcessError::Signal {
            id: id.to_owned(),
            source,
        })
    }

    fn append(&self, key: u64, stream: Stream, bytes: &[u8]) {
        if let Some(entry) = self.lock().get_mut(&key) {
            match stream {
                Stream::Stdout => {
                    entry.stdout.push(bytes);
                    entry.info.stdout_bytes = entry.stdout.total();
                }
                Stream::Stderr => {
                    entry.stderr.push(bytes);
                    entry.info.stderr_bytes = entry.stderr.total();
                }
            }
        }
    }

    /// Records the running processes so a restarted guest-mcp finds them.
    fn save_state(&self) {
        let Some(path) = &self.state_file else { return };
        let records: Vec<Recorded> = self
            .lock()
            .values()
            // A reaped leader's pid may be someone else's by now: such a
            // process is never recorded for a successor to kill.
            .filter(|e| e.info.state == ProcessState::Running && !e.leader_exited)
            .filter_map(|e| {
                Some(Recorded {
                    id: e.info.id.clone(),
                    pid: e.info.pid,
                    start_ticks: start_ticks(e.info.pid)?,
                    argv: e.info.argv.clone(),
                    started_at: e.info.started_at.clone(),
                })
            })
            .collect();
        let tmp = path.with_extension("tmp");
        let written = serde_json::to_vec(&records)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "could not record background processes");
        }
    }

    fn reap_previous_incarnation(&self) {
        let Some(path) = &self.state_file else { return };
        let Ok(bytes) = std::fs::read(path) else {
            return;
        };
        let records: Vec<Recorded> = serde_json::from_slice(&bytes).unwrap_or_default();
        // Never signal pid 0 (our own group) or 1 (init), whatever the file says.
        for record in records.into_iter().filter(|r| r.pid > 1) {
            let alive = start_ticks(record.pid) == Some(record.start_ticks);
            let reason = if alive {
                let _ = killpg(Pid::from_raw(record.pid as i32), Signal::SIGKILL);
                "guest-mcp restarted while it ran; its output pipes were gone, so it was killed"
            } else {
                "guest-mcp restarted while it ran; it had ended by then, with an unknown status"
            };
            tracing::warn!(
                id = record.id,
                pid = record.pid,
                alive,
                "background process of a previous guest-mcp"
            );
            let (key, id) = self.new_id();
            self.lock().insert(
                key,
                Entry {
                    info: ProcessInfo {
                        id,
                        pid: record.pid,
                        argv: record.argv,
                        cwd: None,
                        state: ProcessState::Lost {
                            reason: format!("{reason} (it was {})", record.id),
                        },
                        started_at: record.started_at,
                        runtime_s: 0.0,
                        stdout_bytes: 0,
                        stderr_bytes: 0,
                        stdin_open: false,
                        tty: false,
                    },
                    started: Instant::now(),
                    ended: Some(Instant::now()),
                    leader_exited: true,
                    tree: None,
                    stdin: None,
                    tty: None,
                    stdout: Ring::new(0),
                    stderr: Ring::new(0),
                },
            );
        }
        self.save_state();
    }
}

fn snapshot(entry: &Entry) -> ProcessInfo {
    let mut info = entry.info.clone();
    let end = entry.ended.unwrap_or_else(Instant::now);
    info.runtime_s = end.duration_since(entry.started).as_secs_f64();
    info
}

#[derive(Debug, Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

async fn pump<R: AsyncRead + Unpin>(
    table: Arc<ProcessTable>,
    key: u64,
    pipe: Option<R>,
    stream: Stream,
) {
    let Some(mut pipe) = pipe else { return };
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = pipe.read(&mut buf).await {
        if n == 0 {
            break;
        }
        table.append(key, stream, &buf[..n]);
    }
}

/// What a process on a terminal prints, all of it as stdout.
async fn pump_tty(table: Arc<ProcessTable>, key: u64, master: Arc<Master>) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = master.read(&mut buf).await {
        if n == 0 {
            break;
        }
        table.append(key, Stream::Stdout, &buf[..n]);
    }
}

fn parse_id(id: &str) -> Result<u64, ProcessError> {
    id.strip_prefix('p')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| ProcessError::NotFound(id.to_owned()))
}

fn parse_signal(name: &str) -> Result<Signal, ProcessError> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    Ok(match bare {
        "TERM" | "15" => Signal::SIGTERM,
        "KILL" | "9" => Signal::SIGKILL,
        "INT" | "2" => Signal::SIGINT,
        "HUP" | "1" => Signal::SIGHUP,
        "QUIT" | "3" => Signal::SIGQUIT,
        "USR1" | "10" => Signal::SIGUSR1,
        "USR2" | "12" => Signal::SIGUSR2,
        "STOP" | "19" => Signal::SIGSTOP,
        "CONT" | "18" => Signal::SIGCONT,
        _ => return Err(ProcessError::BadSignal(name.to_owned())),
    })
}

/// How long a terminal's output is read after its leader exited before
/// what still holds the terminal is hung up.
const TTY_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// How long a stdin write may wait for a process that is not reading.
const STDIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Field 22 of /proc/PID/stat: when the process started, in clock ticks.
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; count from after its ')'.
    let rest = stat.rsplit_once(')')?.1;
    let state = rest.split_whitespace().next()?;
    if state == "Z" {
        return None;
    }
    rest.split_whitespace().nth(19)?.parse().ok()
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_bytes_and_reports_what_it_dropped() {
        let mut ring = Ring::new(10);
        ring.push(b"0123456789abcdef");
        assert_eq!(ring.total(), 16);
        let chunk = ring.read(0, 100);
        assert_eq!(chunk.data, "6789abcdef");
        assert_eq!(
            (chunk.offset, chunk.dropped_bytes, chunk.next_offset),
            (6, 6, 16)
        );
        assert!(chunk.at_end);
        let chunk = ring.read(8, 3);
        assert_eq!(chunk.data, "89a");
        assert_eq!((chunk.dropped_bytes, chunk.next_offset), (0, 11));
        assert!(!chunk.at_end);
        let chunk = ring.read(99, 3);
        assert_eq!((chunk.data.as_str(), chunk.offset), ("", 16));
    }

    #[test]
    fn a_split_utf8_character_waits_for_the_next_read() {
        let mut ring = Ring::new(100);
        ring.push("aé!".as_bytes());
        let chunk = ring.read(0, 2);
        assert_eq!((chunk.data.as_str(), chunk.next_offset), ("a", 1));
        let chunk = ring.read(1, 2);
        assert_eq!((chunk.data.as_str(), chunk.next_offset), ("é", 3));
        // A chunk too small for even one character still makes progress.
        let chunk = ring.read(1, 1);
        assert_eq!(chunk.encoding, crate::exec::OutputEncoding::Base64);
        assert_eq!((chunk.data.as_str(), chunk.next_offset), ("ww==", 2));
    }

    #[test]
    fn signals_parse_by_name_and_number() {
        assert_eq!(parse_signal("term").unwrap(), Signal::SIGTERM);
        assert_eq!(parse_signal("SIGKILL").unwrap(), Signal::SIGKILL);
        assert_eq!(parse_signal("2").unwrap(), Signal::SIGINT);
        assert!(
            parse_signal("NOPE")
                .unwrap_err()
                .to_string()
                .contains("use TERM, KILL")
        );
    }

    #[test]
    fn start_ticks_read_this_process() {
        assert!(start_ticks(std::process::id()).is_some());
        assert_eq!(start_ticks(u32::MAX), None);
    }
}
