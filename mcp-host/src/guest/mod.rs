//! The guest link: nexusd's one MCP session with each running VM's
//! guest-mcp, shared by every caller, and the proxy that forwards tool
//! calls over it.
//!
//! Root in a guest controls everything this module reads, and when: so
//! every wait on a guest has a deadline, everything read from it is
//! bounded and checked, and no caller ever waits on one guest for another.
//!
//! - A VM is attached once it is ready and detached when it stops. Its
//!   session is opened by one background task at a time (callers wait for
//!   it within their own deadline, and give up without stopping it), after
//!   the guest's readiness signal, with a handshake and a tool listing
//!   each bounded. A failure is remembered for a moment, so a dead guest is
//!   not asked again by every listing; the VM shows as unresponsive.
//! - The guest's tools are listed once per session, checked (names,
//!   count, sizes) and cached; `tools/list` never talks to a guest that
//!   has an open session, and waits at most [`LIST_WAIT`] for one that
//!   does not.
//! - Where the image recorded guest-mcp's tools at build time (trusted,
//!   like the image), their definitions are the ones listed; a guest can
//!   only leave tools out, not rewrite what agents read about them.
//!
//! # Layout
//!
//! - `events`: progress from the guest, taken off its stream in order and
//!   routed back to the caller.
//! - `proxy`: forwarding one tool call (with its deadline), its progress
//!   and its cancellation, and re-expressing the guest's answer for the
//!   caller's protocol era.
//! - `checks`: what a guest's tool list must satisfy.

mod checks;
pub mod events;
pub mod proxy;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nexus_vmm::GuestEndpoint;
use rmcp::model::{PaginatedRequestParams, Tool};
use rmcp::service::RunningService;
use rmcp::{RoleClient, ServiceExt};
use tokio::sync::watch;

pub use events::GuestEvents;

/// How long an opening waits for a guest-mcp that is (re)starting.
const READY_WAIT: Duration = Duration::from_secs(10);
/// How long an MCP handshake with a guest may take (a loaded host running
/// many emulated guests answers slowly).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a guest has to list its tools.
const LIST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `tools/list` waits for a guest whose session is not open.
pub const LIST_WAIT: Duration = Duration::from_secs(1);
/// How long a proxied call waits for a session.
pub const CALL_WAIT: Duration = Duration::from_secs(15);
/// A failed opening is not retried for this long (callers are told why).
const RETRY_AFTER: Duration = Duration::from_secs(2);
/// A guest lists at most this many pages.
const MAX_TOOL_PAGES: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("VM {0:?} is not running")]
    NotAttached(String),
    #[error("VM {vm:?}'s tools are unreachable: {why}")]
    Unreachable { vm: String, why: String },
}

/// An open session with one VM's guest-mcp, and the tools it offers.
pub struct GuestSession {
    service: RunningService<RoleClient, ()>,
    /// Where progress the guest reports goes.
    events: GuestEvents,
    /// What is listed for this VM: the image's definitions of the tools
    /// the guest has, or (images without them) the guest's own, checked.
    tools: Vec<Tool>,
    /// The connection, to shut down when the session goes: a write the
    /// guest never reads would otherwise keep the session's task (and
    /// what it was writing) forever.
    socket: std::os::fd::OwnedFd,
}

impl Drop for GuestSession {
    fn drop(&mut self) {
        let _ = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&self.socket),
            nix::sys::socket::Shutdown::Both,
        );
    }
}

impl GuestSession {
    pub fn tools(&self) -> &[Tool] {
        &self.tools
    }

    pub fn has_tool(&self, name: &str) -> bool {
        self.tools.iter().any(|t| t.name == name)
    }

    fn is_closed(&self) -> bool {
        self.service.is_closed()
    }
}

/// How a VM's guest link stands.
#[derive(Clone)]
enum LinkState {
    Idle,
    Opening,
    Open(Arc<GuestSession>),
    Failed { at: Instant, why: String },
}

/// What `get_vm` and `list_vms` say of a running VM's guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Not asked yet, or being connected to.
    Connecting,
    Answering,
    /// Its vCPUs are stopped (pause_vm): it answers once resumed.
    Paused,
    /// The last attempt to reach it failed.
    Unresponsive {
        why: String,
        for_s: u64,
    },
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connecting => f.write_str("connecting"),
            Self::Answering => f.write_str("answering"),
            Self::Paused => f.write_str("paused"),
            Self::Unresponsive { why, for_s } => {
                write!(f, "unresponsive for {for_s} s: {why}")
            }
        }
    }
}

/// One running VM's link.
struct Link {
    endpoint: GuestEndpoint,
    /// The image's record of guest-mcp's tools, if it has one.
    trusted: Option<Arc<Vec<Tool>>>,
    state: watch::Sender<LinkState>,
}

/// News that the tools some clients may list changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolsChanged {
    /// The VM whose tools came or went; None: what identities may call
    /// changed (a role), which anyone may be told.
    pub vm: Option<String>,
    /// Whom to tell besides those who reach `vm` when they hear it: its
    /// owner and grantees when it changed, one who just lost it.
    pub also: Vec<String>,
}

/// The guest link of every running VM.
pub struct Guests {
    links: Mutex<HashMap<String, Arc<Link>>>,
    /// Told whenever a session opens: the VM's tools are listed from then.
    opened: tokio::sync::broadcast::Sender<ToolsChanged>,
}

impl Guests {
    /// Guest links that say on `opened` when a VM's tools become listable.
    pub fn new(opened: tokio::sync::broadcast::Sender<ToolsChanged>) -> Self {
        Self {
            links: Mutex::default(),
            opened,
        }
    }

    /// A VM is running: its guest may be reached through `endpoint`.
    /// `trusted` is its image's record of guest-mcp's tools, if any.
    pub fn attach(&self, vm: &str, endpoint: GuestEndpoint, trusted: Option<Vec<Tool>>) {
        let link = Arc::new(Link {
            endpoint,
            trusted: trusted.map(|tools| Arc::new(checks::trusted(tools))),
            state: watch::channel(LinkState::Idle).0,
        });
        lock(&self.links).insert(vm.to_owned(), link);
    }

    /// [`Guests::attach`] with a session opened already ([`open_session`],
    /// a VM booted ahead of need): its tools are listable at once.
    pub fn attach_open(
        &self,
        vm: &str,
        endpoint: GuestEndpoint,
        trusted: Option<Vec<Tool>>,
        session: Arc<GuestSession>,
    ) {
        let open = !session.is_closed();
        let link = Arc::new(Link {
            endpoint,
            trusted: trusted.map(|tools| Arc::new(checks::trusted(tools))),
            state: watch::channel(if open {
                LinkState::Open(session)
            } else {
                LinkState::Idle
            })
            .0,
        });
        lock(&self.links).insert(vm.to_owned(), link);
        if open {
            let _ = self.opened.send(ToolsChanged {
                vm: Some(vm.to_owned()),
                also: Vec::new(),
            });
        }
    }

    /// The VM stopped: its session and endpoint go.
    pub fn detach(&self, vm: &str) {
        lock(&self.links).remove(vm);
    }

    /// Names of the attached (running) VMs, sorted.
    pub fn attached(&self) -> Vec<String> {
        let mut names: Vec<String> = lock(&self.links).keys().cloned().collect();
        names.sort();
        names
    }

    /// Whether some running VM's guest (with an open session) has `tool`.
    pub fn knows_tool(&self, tool: &str) -> bool {
        lock(&self.links).values().any(|link| {
            matches!(&*link.state.borrow(), LinkState::Open(session) if session.has_tool(tool))
        })
    }

    pub fn is_attached(&self, vm: &str) -> bool {
        lock(&self.links).contains_key(vm)
    }

    /// Whether the VM is paused (pause_vm): its guest answers nothing.
    pub fn is_paused(&self, vm: &str) -> bool {
        lock(&self.links)
            .get(vm)
            .is_some_and(|link| link.endpoint.is_paused())
    }

    /// Resolves once the VM is paused (checked every 100 ms).
    pub async fn paused(&self, vm: &str) {
        while !self.is_paused(vm) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How the VM's guest stands, if it is attached.
    pub fn health(&self, vm: &str) -> Option<Health> {
        let link = lock(&self.links).get(vm).cloned()?;
        if link.endpoint.is_paused() {
            return Some(Health::Paused);
        }
        let state = link.state.borrow().clone();
        Some(match state {
            LinkState::Idle | LinkState::Opening => Health::Connecting,
            LinkState::Open(session) if !session.is_closed() => Health::Answering,
            LinkState::Open(_) => Health::Connecting,
            LinkState::Failed { at, why } => Health::Unresponsive {
                why,
                for_s: at.elapsed().as_secs(),
            },
        })
    }

    /// The VM's guest session, waiting at most `wait` for one to open. The
    /// opening goes on in the background if the wait ends first.
    pub async fn session(&self, vm: &str, wait: Duration) -> Result<Arc<GuestSession>, GuestError> {
        let link = lock(&self.links)
            .get(vm)
            .cloned()
            .ok_or_else(|| GuestError::NotAttached(vm.to_owned()))?;
        let unreachable = |why: String| GuestError::Unreachable {
            vm: vm.to_owned(),
            why,
        };
        let mut state = link.state.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let current = state.borrow_and_update().clone();
            match current {
                LinkState::Open(session) if !session.is_closed() => return Ok(session),
                LinkState::Failed { at, why } if at.elapsed() < RETRY_AFTER => {
                    return Err(unreachable(why));
                }
                LinkState::Opening => {}
                // A paused guest answers nothing: no opening is tried (it
                // would wait out its deadlines and be remembered as a
                // failure after the resume).
                _ if link.endpoint.is_paused() => {
                    return Err(unreachable("the VM is paused".to_owned()));
                }
                // Idle, closed (guest-mcp restarted) or failed long enough ago.
                _ => {
                    // Checked again under the lock: another caller may
                    // have opened a session since (never overwritten).
                    let start = link.state.send_if_modified(|s| {
                        let stale = match s {
                            LinkState::Idle => true,
                            LinkState::Opening => false,
                            LinkState::Open(session) => session.is_closed(),
                            LinkState::Failed { at, .. } => at.elapsed() >= RETRY_AFTER,
                        };
                        if stale {
                            *s = LinkState::Opening;
                        }
                        stale
                    });
                    if start {
                        tokio::spawn(open(link.clone(), vm.to_owned(), self.opened.clone()));
                    }
                }
            }
            match tokio::time::timeout_at(deadline, state.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(GuestError::NotAttached(vm.to_owned())),
                Err(_) => {
                    return Err(unreachable(format!(
                        "no MCP session within {wait:?} (still trying)"
                    )));
                }
            }
        }
    }

    /// Forgets a failure to reach the guest (a VM just resumed): the next
    /// caller opens a session at once.
    pub fn retry_now(&self, vm: &str) {
        if let Some(link) = lock(&self.links).get(vm) {
            link.state.send_if_modified(|s| {
                let failed = matches!(s, LinkState::Failed { .. });
                if failed {
                    *s = LinkState::Idle;
                }
                failed
            });
        }
    }

    /// Drops a session found dead (unless another caller has replaced it
    /// already) and opens a new one.
    pub async fn reopen(
        &self,
        vm: &str,
        dead: &Arc<GuestSession>,
        wait: Duration,
    ) -> Result<Arc<GuestSession>, GuestError> {
        if let Some(link) = lock(&self.links).get(vm) {
            link.state.send_if_modified(|s| match s {
                LinkState::Open(open) if Arc::ptr_eq(open, dead) => {
                    *s = LinkState::Idle;
                    true
                }
                _ => false,
            });
        }
        self.session(vm, wait).await
    }

    /// A call on `session` found the guest not answering: the VM shows as
    /// unresponsive, and the next caller opens a new session (whose own
    /// deadlines then say whether the guest is back).
    pub fn unresponsive(&self, vm: &str, session: &Arc<GuestSession>, why: String) {
        if let Some(link) = lock(&self.links).get(vm) {
            link.state.send_if_modified(|s| match s {
                LinkState::Open(open) if Arc::ptr_eq(open, session) => {
                    *s = LinkState::Failed {
                        at: Instant::now(),
                        why: checks::reason(&why),
                    };
                    true
                }
                _ => false,
            });
        }
    }

    /// Every running VM's tools, asked of all guests at once, each within
    /// [`LIST_WAIT`]; a guest that does not answer is left out (its VM
    /// shows as unresponsive).
    pub async fn all_tools(&self) -> Vec<(String, Arc<GuestSession>)> {
        let names = self.attached();
        let sessions =
            futures::future::join_all(names.iter().map(|vm| self.session(vm, LIST_WAIT))).await;
        names
            .into_iter()
            .zip(sessions)
            .filter_map(|(vm, session)| match session {
                Ok(session) => Some((vm, session)),
                Err(e) => {
                    tracing::debug!(vm, error = %e, "guest tools left out of the list");
                    None
                }
            })
            .collect()
    }
}

/// A session with the guest behind `endpoint` (VM `vm`, for logs), its
/// tools checked against `trusted` (the image's record) if given.
pub async fn open_session(
    vm: &str,
    endpoint: GuestEndpoint,
    trusted: Option<Vec<Tool>>,
) -> Result<Arc<GuestSession>, String> {
    let link = Arc::new(Link {
        endpoint,
        trusted: trusted.map(|tools| Arc::new(checks::trusted(tools))),
        state: watch::channel(LinkState::Opening).0,
    });
    connect(&link, vm).await
}

/// Opens a VM's session (one at a time per VM) and says how it went.
async fn open(link: Arc<Link>, vm: String, opened: tokio::sync::broadcast::Sender<ToolsChanged>) {
    let state = match connect(&link, &vm).await {
        Ok(session) => {
            let _ = opened.send(ToolsChanged {
                vm: Some(vm.clone()),
                also: Vec::new(),
            });
            LinkState::Open(session)
        }
        Err(why) => {
            let why = checks::reason(&why);
            tracing::warn!(vm, why, "guest tools unreachable");
            LinkState::Failed {
                at: Instant::now(),
                why,
            }
        }
    };
    link.state.send_replace(state);
}

/// Connects to a VM's guest-mcp and opens an MCP session with it.
async fn connect(link: &Link, vm: &str) -> Result<Arc<GuestSession>, String> {
    async {
        // A guest-mcp that just restarted is back within a second or two.
        if !link.endpoint.wait_ready(READY_WAIT).await {
            return Err(format!(
                "guest-mcp did not signal readiness within {READY_WAIT:?}"
            ));
        }
        let stream = link
            .endpoint
            .connect(nexus_vmm::GUEST_TOOLS_PORT)
            .await
            .map_err(|e| match e {
                // Its path is the host's business (logged), not the caller's.
                nexus_vmm::VmmError::Vsock {
                    source: nexus_vmm::vsock::VsockError::NoVmSocket { path, source },
                    ..
                } => {
                    tracing::warn!(path = %path.display(), error = %source, "no vsock socket");
                    "nothing listens on the VM's vsock socket: is the VM running?".to_owned()
                }
                e => e.to_string(),
            })?;
        let socket = std::os::fd::AsFd::as_fd(&stream)
            .try_clone_to_owned()
            .map_err(|e| format!("guest connection: {e}"))?;
        let events = GuestEvents::default();
        let (read, write) = tokio::io::split(stream);
        let tapped = events::Tapped::new(read, write, events.clone());
        let service = match tokio::time::timeout(HANDSHAKE_TIMEOUT, ().serve(tapped)).await {
            Ok(Ok(service)) => service,
            Ok(Err(e)) => return Err(format!("MCP handshake failed: {e}")),
            Err(_) => return Err(format!("no MCP handshake within {HANDSHAKE_TIMEOUT:?}")),
        };
        let listed = tokio::time::timeout(LIST_TIMEOUT, list_tools(&service))
            .await
            .map_err(|_| format!("no tool list within {LIST_TIMEOUT:?}"))??;
        let tools = match &link.trusted {
            Some(trusted) => checks::available(trusted, &listed),
            None => checks::own(vm, listed),
        };
        Ok(Arc::new(GuestSession {
            service,
            events,
            tools,
            socket,
        }))
    }
    .await
}

/// The guest's tools, page by page, within the bounds of `checks`.
async fn list_tools(service: &RunningService<RoleClient, ()>) -> Result<Vec<Tool>, String> {
    let mut tools = Vec::new();
    let mut cursor = None;
    for _ in 0..MAX_TOOL_PAGES {
        let page = service
            .list_tools(Some(PaginatedRequestParams::default().with_cursor(cursor)))
            .await
            .map_err(|e| format!("tools/list failed: {e}"))?;
        tools.extend(page.tools);
        if tools.len() > checks::MAX_TOOLS {
            return Err(format!(
                "the guest lists more than {} tools",
                checks::MAX_TOOLS
            ));
        }
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => return Ok(tools),
        }
    }
    Err(format!(
        "the guest's tool list goes on past {MAX_TOOL_PAGES} pages"
    ))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
