//! What happens to VMs, as it happens: started, stopped, destroyed, a boot
//! that failed, a guest-mcp that went away and came back, a VM that died.
//! Clients hear of these as MCP log messages; each running VM has a
//! watcher that notices a VMM exit nexusd did not ask for.

use std::sync::Weak;
use std::time::Duration;

use nexus_vmm::{GuestEndpoint, GuestState};
use serde::Serialize;

use super::Daemon;

/// How severe an event is, in the order of syslog (and MCP) levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Debug,
    Info,
    Notice,
    Warning,
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Started,
    Stopped,
    Destroyed,
    BootFailed,
    /// The VMM exited without being asked to: the guest powered off,
    /// crashed, or the process was killed.
    Died,
    /// guest-mcp closed its readiness connection while the VM ran on.
    GuestLost,
    /// guest-mcp is back (restarted by the guest's init).
    GuestBack,
    Paused,
    Resumed,
}

#[derive(Debug, Clone, Serialize)]
pub struct VmEvent {
    pub vm: String,
    pub event: EventKind,
    #[serde(skip)]
    pub severity: Severity,
    pub message: String,
    /// The console's last lines, for failures.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub console: Vec<String>,
    /// Who the VM belongs to: who may hear of it (admins hear of all).
    #[serde(skip)]
    pub owner: Option<String>,
    /// Whom it is granted to when it happened: they hear of it too (a
    /// destroyed VM's grants are gone by the time listeners look).
    #[serde(skip)]
    pub grantees: Vec<String>,
}

impl VmEvent {
    pub fn new(vm: &str, event: EventKind, message: impl Into<String>) -> Self {
        let severity = match event {
            EventKind::Started
            | EventKind::Stopped
            | EventKind::Destroyed
            | EventKind::Paused
            | EventKind::Resumed => Severity::Info,
            EventKind::GuestBack => Severity::Notice,
            EventKind::GuestLost => Severity::Warning,
            EventKind::BootFailed | EventKind::Died => Severity::Error,
        };
        Self {
            vm: vm.to_owned(),
            event,
            severity,
            message: message.into(),
            console: Vec::new(),
            owner: None,
            grantees: Vec::new(),
        }
    }

    pub fn with_console(mut self, text: &str) -> Self {
        self.console = text.lines().map(str::to_owned).collect();
        self
    }
}

/// The console lines a failure event carries.
pub const CONSOLE_LINES: usize = 20;
/// A guest that closes its readiness connection and whose VM exits within
/// this is powering off, not losing guest-mcp.
const POWER_OFF_GRACE: Duration = Duration::from_millis(500);
/// A guest can make its readiness connection flap: at most one
/// lost-and-back pair of events per VM in this window (the rest are
/// counted into the next message).
const FLAP_WINDOW: Duration = Duration::from_secs(10);

/// Watches one running VM (instance `id`) until its VMM exits: reports
/// guest-mcp going and coming back, and hands a VMM exit nexusd did not
/// ask for to the daemon.
pub(super) async fn watch(daemon: Weak<Daemon>, vm: String, id: u64, endpoint: GuestEndpoint) {
    let mut states = endpoint.guest_states();
    let mut lost = false;
    // Whether this loss was reported (and so its return will be), when the
    // last one was, and how many went unreported since.
    let mut reported = false;
    let mut last_report: Option<std::time::Instant> = None;
    let mut unreported = 0u64;
    loop {
        let changed = async {
            match states.as_mut() {
                Some(states) => states.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = endpoint.exited() => break,
            ok = changed => {
                if !ok {
                    states = None;
                    continue;
                }
                let state = states.as_ref().map(|s| s.borrow().clone());
                let Some(daemon) = daemon.upgrade() else { return };
                if !daemon.is_current(&vm, id).await {
                    // Being stopped by nexusd: nothing to report.
                    return;
                }
                match state {
                    Some(GuestState::Gone) if !lost => {
                        if tokio::time::timeout(POWER_OFF_GRACE, endpoint.exited()).await.is_ok() {
                            break;
                        }
                        lost = true;
                        reported = last_report.is_none_or(|at| at.elapsed() >= FLAP_WINDOW);
                        if !reported {
                            unreported += 1;
                            continue;
                        }
                        last_report = Some(std::time::Instant::now());
                        let again = match std::mem::take(&mut unreported) {
                            0 => String::new(),
                            n => format!(" ({n} more times since the last report)"),
                        };
                        daemon.emit(VmEvent::new(
                            &vm,
                            EventKind::GuestLost,
                            format!("guest-mcp of VM {vm} closed its connection{again}; the guest's init restarts it"),
                        ));
                    }
                    Some(GuestState::Ready { version }) if lost => {
                        lost = false;
                        if reported {
                            daemon.emit(VmEvent::new(
                                &vm,
                                EventKind::GuestBack,
                                format!("guest-mcp {version} of VM {vm} is back"),
                            ));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    if let Some(daemon) = daemon.upgrade() {
        daemon.reap(&vm, id).await;
    }
}
