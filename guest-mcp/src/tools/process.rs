//! Background processes: `process_start`, `process_list`, `process_status`,
//! `process_output`, `process_write_stdin`, `process_signal`,
//! `process_resize`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rmcp::handler::server::common::schema_for_output;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::CallToolResult;
use rmcp::{tool, tool_router};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{GuestTools, done};
use crate::exec::Program;
use crate::procs::{ProcessInfo, ProcessState, StreamChunk, TtySize};

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartParams {
    /// Shell command line, run by `/bin/sh -c`. Give either this or `argv`.
    #[serde(default)]
    pub command: Option<String>,
    /// Program and its arguments, run without a shell.
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    /// Working directory; defaults to /workspace.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: Option<BTreeMap<String, String>>,
    /// Keep standard input open for process_write_stdin (otherwise it is empty).
    #[serde(default)]
    pub stdin: bool,
    /// Run it on a pseudo-terminal of this size (an interactive shell,
    /// `top`, an editor): everything it prints comes as stdout, what
    /// process_write_stdin sends is typed (`\u0003` is Ctrl-C), and
    /// process_resize changes the size. TERM is xterm-256color unless
    /// `env` says otherwise.
    #[serde(default)]
    pub tty: Option<TtySize>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResizeParams {
    /// The process id (e.g. "p1"); it must have been started with `tty`.
    pub id: String,
    /// Rows, 1 to 1000.
    pub rows: u16,
    /// Columns, 1 to 1000.
    pub cols: u16,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IdParams {
    /// The process id from process_start or process_list (e.g. "p1").
    pub id: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OutputParams {
    /// The process id (e.g. "p1").
    pub id: String,
    /// Byte offset in stdout to read from: 0 at first, then the previous answer's next_offset.
    #[serde(default)]
    pub stdout_offset: u64,
    /// Byte offset in stderr to read from.
    #[serde(default)]
    pub stderr_offset: u64,
    /// Most bytes returned per stream (default: the buffer size).
    #[serde(default)]
    pub max_bytes: Option<usize>,
    /// Wait up to this many milliseconds (at most 30000) for new output or the
    /// process's end before answering.
    #[serde(default)]
    pub wait_ms: u64,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteStdinParams {
    /// The process id (e.g. "p1"); it must have been started with `stdin: true`.
    pub id: String,
    /// Text to write.
    pub data: String,
    /// Close standard input afterwards (the process sees end of file; on a
    /// terminal, Ctrl-D is typed instead).
    #[serde(default)]
    pub close: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalParams {
    /// The process id (e.g. "p1").
    pub id: String,
    /// TERM (default), KILL, INT, HUP, QUIT, USR1, USR2, STOP or CONT.
    #[serde(default)]
    pub signal: Option<String>,
    /// Signal the process's whole group (default), not just the process.
    #[serde(default = "yes")]
    pub group: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ProcessList {
    pub processes: Vec<ProcessInfo>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ProcessOutput {
    pub process: ProcessInfo,
    pub stdout: StreamChunk,
    pub stderr: StreamChunk,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Written {
    pub bytes_written: usize,
    pub stdin_open: bool,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Resized {
    pub id: String,
    pub rows: u16,
    pub cols: u16,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Signalled {
    pub id: String,
    pub signal: String,
}

const MAX_WAIT: Duration = Duration::from_secs(30);

fn describe(p: &ProcessInfo) -> String {
    let state = match &p.state {
        ProcessState::Running => "running".to_owned(),
        ProcessState::Exited {
            exit_code: Some(c), ..
        } => format!("exited with code {c}"),
        ProcessState::Exited {
            signal: Some(s), ..
        } => format!("killed by signal {s}"),
        ProcessState::Exited { .. } => "exited".to_owned(),
        ProcessState::Lost { reason } => format!("lost: {reason}"),
    };
    format!("{} (pid {}): {state}: {}", p.id, p.pid, p.argv.join(" "))
}

#[tool_router(router = process_router, vis = "pub(super)")]
impl GuestTools {
    #[tool(
        description = "Start a background process (a server, a watcher, a long build) and return its id at once. It keeps running after this call and after the MCP connection closes; read its output with process_output.",
        output_schema = schema_for_output::<ProcessInfo>()
    )]
    async fn process_start(
        &self,
        Parameters(p): Parameters<StartParams>,
    ) -> Result<CallToolResult, String> {
        let program = Program::new(p.command, p.argv, p.cwd, p.env, self.workdir())
            .map_err(|e| e.to_string())?;
        let info = self
            .shared
            .processes
            .start(program, p.stdin, p.tty)
            .await
            .map_err(|e| e.to_string())?;
        done(&info, format!("started {}", describe(&info)))
    }

    #[tool(
        description = "List the background processes: running ones, and finished ones until they are forgotten.",
        output_schema = schema_for_output::<ProcessList>()
    )]
    async fn process_list(&self) -> Result<CallToolResult, String> {
        let processes = self.shared.processes.list();
        let text = if processes.is_empty() {
            "no background processes".to_owned()
        } else {
            processes
                .iter()
                .map(describe)
                .collect::<Vec<_>>()
                .join("\n")
        };
        done(&ProcessList { processes }, text)
    }

    #[tool(
        description = "Show one background process: state, exit code or signal, runtime and output sizes.",
        output_schema = schema_for_output::<ProcessInfo>()
    )]
    async fn process_status(
        &self,
        Parameters(p): Parameters<IdParams>,
    ) -> Result<CallToolResult, String> {
        let info = self
            .shared
            .processes
            .status(&p.id)
            .map_err(|e| e.to_string())?;
        done(&info, describe(&info))
    }

    #[tool(
        description = "Read a background process's stdout and stderr from byte offsets (0, then each answer's next_offset). Output is kept in a bounded buffer: dropped_bytes says how much was lost before what is returned. With wait_ms, waits for new output or the end of the process.",
        output_schema = schema_for_output::<ProcessOutput>()
    )]
    async fn process_output(
        &self,
        Parameters(p): Parameters<OutputParams>,
    ) -> Result<CallToolResult, String> {
        let wait = Duration::from_millis(p.wait_ms);
        if wait > MAX_WAIT {
            return Err(format!(
                "`wait_ms` must be at most {}, got {}",
                MAX_WAIT.as_millis(),
                p.wait_ms
            ));
        }
        let deadline = Instant::now() + wait;
        let table = &self.shared.processes;
        let (process, stdout, stderr) = loop {
            let (process, stdout, stderr) = table
                .output(&p.id, p.stdout_offset, p.stderr_offset, p.max_bytes)
                .map_err(|e| e.to_string())?;
            let news = !stdout.data.is_empty() || !stderr.data.is_empty();
            if news || process.state != ProcessState::Running || Instant::now() >= deadline {
                break (process, stdout, stderr);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let mut text = describe(&process);
        for (name, chunk) in [("stdout", &stdout), ("stderr", &stderr)] {
            if chunk.dropped_bytes > 0 {
                text.push_str(&format!(
                    "\n({name}: {} earlier bytes were dropped)",
                    chunk.dropped_bytes
                ));
            }
            if !chunk.data.is_empty() {
                text.push_str(&format!("\n--- {name} ---\n{}", chunk.data));
            }
        }
        done(
            &ProcessOutput {
                process,
                stdout,
                stderr,
            },
            text,
        )
    }

    #[tool(
        description = "Write text to a background process's standard input (it must have been started with stdin: true); `close` ends its input.",
        output_schema = schema_for_output::<Written>()
    )]
    async fn process_write_stdin(
        &self,
        Parameters(p): Parameters<WriteStdinParams>,
    ) -> Result<CallToolResult, String> {
        let table = &self.shared.processes;
        // As of the write: a terminal stays open after `close` (it typed
        // Ctrl-D), even if the program then ends at once.
        let (n, stdin_open) = table
            .write_stdin(&p.id, p.data.as_bytes(), p.close)
            .await
            .map_err(|e| e.to_string())?;
        let written = Written {
            bytes_written: n,
            stdin_open,
        };
        done(&written, format!("wrote {n} bytes to {}", p.id))
    }

    #[tool(
        description = "Resize the terminal of a background process started with `tty`; it gets SIGWINCH.",
        output_schema = schema_for_output::<Resized>()
    )]
    async fn process_resize(
        &self,
        Parameters(p): Parameters<ResizeParams>,
    ) -> Result<CallToolResult, String> {
        let size = TtySize {
            rows: p.rows,
            cols: p.cols,
        };
        self.shared
            .processes
            .resize(&p.id, size)
            .map_err(|e| e.to_string())?;
        let text = format!("{} now has a {}x{} terminal", p.id, p.rows, p.cols);
        done(
            &Resized {
                id: p.id,
                rows: p.rows,
                cols: p.cols,
            },
            text,
        )
    }

    #[tool(
        description = "Send a signal (TERM by default) to a background process and, unless group is false, everything in its process group.",
        output_schema = schema_for_output::<Signalled>()
    )]
    async fn process_signal(
        &self,
        Parameters(p): Parameters<SignalParams>,
    ) -> Result<CallToolResult, String> {
        let signal = p.signal.unwrap_or_else(|| "TERM".into());
        self.shared
            .processes
            .signal(&p.id, &signal, p.group)
            .map_err(|e| e.to_string())?;
        let text = format!("sent {signal} to {}", p.id);
        done(&Signalled { id: p.id, signal }, text)
    }
}
