//! `nexusd stdio`, what agent harnesses launch, is always a bridge to a
//! daemon (see `bridge`): the one that owns the state directory, or one it
//! starts for the purpose.
//!
//! A started daemon (`nexusd daemon`, hidden) runs in a session of its own,
//! logs to `<state>/logs/nexusd.log`, serves only the admin socket, and
//! exits once the last front end has left. So a harness that stops its
//! `nexusd stdio` the usual way (close stdin, SIGTERM, SIGKILL) ends its own
//! session only, never another harness's VMs.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Config;
use crate::bridge::{self, BridgeError};
use crate::state_lock::{LockError, StateLock};
use crate::tools::Surface;

/// How long to wait for a daemon someone else is starting (or stopping).
const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a daemon this front end started may take to open (it imports
/// images and adopts running VMs first).
const START_TIMEOUT: Duration = Duration::from_secs(300);
/// One attempt to attach.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The daemon log is rotated (to `.1`) past this size when a daemon starts.
const LOG_ROTATE_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error(
        "state directory {state_dir} and its admin socket {socket} are owner-only, and another user owns them: launch `nexusd stdio` as that user, or connect over HTTP"
    )]
    NotOwner { state_dir: String, socket: String },
    #[error(
        "the nexusd this front end started exited ({status}); its log {log} ends with:\n{tail}"
    )]
    DaemonDied {
        status: String,
        log: String,
        tail: String,
    },
    #[error(
        "no nexusd answered on the admin socket of state directory {state_dir} within {waited:?}: {why}"
    )]
    NoAnswer {
        state_dir: String,
        waited: Duration,
        why: String,
    },
    #[error("cannot start a nexusd for state directory {state_dir}: {why}")]
    Start { state_dir: String, why: String },
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Bridge(#[from] BridgeError),
}

/// Where `nexusd stdio` finds or starts its daemon.
pub struct Launch<'a> {
    pub config: &'a Config,
    /// The config file, handed to a daemon it starts.
    pub config_file: Option<&'a Path>,
    /// The surface asked for by flag or config file, if any.
    pub surface: Option<Surface>,
}

/// Attaches this process's stdio to the daemon of the state directory,
/// starting one if none runs; returns once the session has ended.
pub async fn run(launch: Launch<'_>) -> Result<(), StdioError> {
    let config = launch.config;
    let state_dir = config.state_dir.display().to_string();
    let mut started: Option<Child> = None;
    let mut since = Instant::now();
    let mut last_error = String::from("nothing tried yet");
    loop {
        let limit = if started.is_some() {
            START_TIMEOUT
        } else {
            ATTACH_TIMEOUT
        };
        if since.elapsed() > limit {
            return Err(StdioError::NoAnswer {
                state_dir,
                waited: limit,
                why: last_error,
            });
        }
        if let Some(child) = &mut started
            && let Ok(Some(status)) = child.try_wait()
        {
            // Lost a race to another front end's daemon, or failed.
            started = None;
            if !held(config) {
                let log = log_path(config);
                return Err(StdioError::DaemonDied {
                    status: status.to_string(),
                    tail: tail(&log, 20),
                    log: log.display().to_string(),
                });
            }
        }
        // Only probe the lock before starting a daemon: holding it even
        // for a moment could turn the starting daemon away.
        let socket = if started.is_none() {
            match StateLock::acquire(&config.state_dir, &config.admin_socket) {
                Ok(lock) => {
                    drop(lock);
                    started = Some(spawn_daemon(config, launch.config_file)?);
                    since = Instant::now();
                    continue;
                }
                Err(LockError::Held {
                    admin_socket: Some(socket),
                    ..
                }) => socket,
                Err(LockError::Held { .. }) => config.admin_socket.clone(),
                Err(LockError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::PermissionDenied =>
                {
                    return Err(StdioError::NotOwner {
                        state_dir: state_dir.clone(),
                        socket: config.admin_socket.display().to_string(),
                    });
                }
                Err(e) => return Err(e.into()),
            }
        } else {
            config.admin_socket.clone()
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, bridge::connect(&socket, launch.surface)).await
        {
            Ok(Ok(upgraded)) => {
                tracing::debug!(admin = %socket.display(), "attached to nexusd");
                return Ok(bridge::pipe(upgraded).await?);
            }
            Ok(Err(BridgeError::Connect { path, source }))
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                return Err(StdioError::NotOwner {
                    state_dir,
                    socket: path,
                });
            }
            Ok(Err(e @ BridgeError::Refused(_))) => return Err(e.into()),
            Ok(Err(e)) => last_error = e.to_string(),
            Err(_) => last_error = format!("no answer within {CONNECT_TIMEOUT:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether a daemon holds the state directory (read from the lock file,
/// without taking the lock).
fn held(config: &Config) -> bool {
    std::fs::read_to_string(config.state_dir.join("nexusd.lock"))
        .ok()
        .and_then(|text| text.lines().next()?.trim().parse::<i32>().ok())
        .is_some_and(|pid| {
            pid > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        })
}

fn log_path(config: &Config) -> PathBuf {
    config.state_dir.join("logs").join("nexusd.log")
}

/// Starts `nexusd daemon` in a session of its own, logging to the state
/// directory.
fn spawn_daemon(config: &Config, config_file: Option<&Path>) -> Result<Child, StdioError> {
    let failed = |why: String| StdioError::Start {
        state_dir: config.state_dir.display().to_string(),
        why,
    };
    let log = log_path(config);
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).map_err(|e| failed(format!("{}: {e}", dir.display())))?;
    }
    if std::fs::metadata(&log).is_ok_and(|m| m.len() > LOG_ROTATE_BYTES) {
        let _ = std::fs::rename(&log, log.with_extension("log.1"));
    }
    let output = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| failed(format!("{}: {e}", log.display())))?;
    let exe = std::env::current_exe().map_err(|e| failed(format!("where am I: {e}")))?;
    let mut cmd = Command::new(exe);
    cmd.arg("--state-dir").arg(&config.state_dir);
    if let Some(file) = config_file {
        cmd.arg("--config").arg(file);
    }
    cmd.arg("daemon")
        .arg("--admin-socket")
        .arg(&config.admin_socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(output);
    // SAFETY: setsid(2) is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
    let child = cmd.spawn().map_err(|e| failed(e.to_string()))?;
    tracing::info!(pid = child.id(), log = %log.display(), "started a nexusd for this state directory");
    Ok(child)
}

/// The last `lines` lines of a log file.
fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(16 << 10)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
