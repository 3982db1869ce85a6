//! Child processes of a VM (the VMM and its helpers), watched for exit and
//! stopped with escalating signals.

use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::Child;
use tokio::sync::watch;

/// A child whose exit is published by a task that reaps it.
#[derive(Debug)]
pub struct Watched {
    pub name: &'static str,
    pid: Option<Pid>,
    exit: watch::Receiver<Option<ExitStatus>>,
    /// Not our child: we see that it ended, not how.
    adopted: bool,
}

impl Watched {
    pub fn new(name: &'static str, mut child: Child) -> Self {
        let pid = child.id().map(|p| Pid::from_raw(p as i32));
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            let status = child.wait().await;
            if let Ok(status) = status {
                tx.send_replace(Some(status));
            } else {
                tx.send_replace(Some(std::os::unix::process::ExitStatusExt::from_raw(0)));
            }
        });
        Self {
            name,
            pid,
            exit: rx,
            adopted: false,
        }
    }

    /// Watches a running process that is not our child (one a previous
    /// daemon started), through a pidfd that becomes readable when it ends.
    pub fn adopt(name: &'static str, pid: u32) -> std::io::Result<Self> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the syscall just returned this fd, owned by no one else.
        let fd =
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
        // SAFETY: the OwnedFd is a valid open pidfd that the AsyncFd owns and
        // keeps open, always returning the same fd, for its whole life.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(std::io::Error::from)?;
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            let _ = fd.readable().await;
            tx.send_replace(Some(std::os::unix::process::ExitStatusExt::from_raw(0)));
        });
        Ok(Self {
            name,
            pid: Some(Pid::from_raw(pid as i32)),
            exit: rx,
            adopted: true,
        })
    }

    /// How it ended, the way people read it.
    pub fn exit_description(&self) -> Option<String> {
        let status = self.exit_status()?;
        Some(if self.adopted {
            "ended (it was adopted, so its exit status is unknown)".to_owned()
        } else {
            describe(&status)
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.pid.map(|p| p.as_raw() as u32)
    }

    pub fn exit_status(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    pub fn exit_watch(&self) -> watch::Receiver<Option<ExitStatus>> {
        self.exit.clone()
    }

    /// Waits up to `timeout` for the process to end.
    pub async fn wait_for(&self, timeout: Duration) -> Option<ExitStatus> {
        let mut exit = self.exit.clone();
        let _ = tokio::time::timeout(timeout, exit.wait_for(Option::is_some)).await;
        *exit.borrow()
    }

    pub fn signal(&self, signal: Signal) {
        if self.exit_status().is_none()
            && let Some(pid) = self.pid
        {
            let _ = kill(pid, signal);
        }
    }

    /// SIGTERM, then SIGKILL after `grace`. Returns whether SIGKILL was needed.
    pub async fn terminate(&self, grace: Duration) -> bool {
        if self.exit_status().is_some() {
            return false;
        }
        self.signal(Signal::SIGTERM);
        if self.wait_for(grace).await.is_some() {
            return false;
        }
        tracing::warn!(
            process = self.name,
            ?grace,
            "did not end on SIGTERM; sending SIGKILL"
        );
        self.signal(Signal::SIGKILL);
        self.wait_for(Duration::from_secs(10)).await;
        true
    }
}

/// Describes an exit status the way people read it.
pub fn describe(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => status.to_string(),
    }
}
