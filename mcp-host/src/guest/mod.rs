//! The guest link: nexusd's one MCP session with each running VM's
//! guest-mcp, shared by every caller, and the proxy that forwards tool
//! calls over it.
//!
//! A VM is attached here once it is ready and detached when it stops; the
//! session is opened on first use (after the guest's readiness signal),
//! reopened when guest-mcp restarts, and the guest's tool list is fetched
//! once per session and cached. Listing every VM's tools asks the guests
//! concurrently, each within a deadline, so one silent guest never holds
//! up the others.
//!
//! # Layout
//!
//! - `events`: progress from the guest, routed back to the caller.
//! - `proxy`: forwarding one tool call, its progress and its cancellation,
//!   and re-expressing the guest's answer for the caller's protocol era.

pub mod events;
pub mod proxy;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nexus_vmm::GuestEndpoint;
use rmcp::model::{PaginatedRequestParams, Tool};
use rmcp::service::RunningService;
use rmcp::{RoleClient, ServiceExt};

pub use events::GuestEvents;

/// How long a call waits for a guest-mcp that is (re)starting.
const GUEST_RETURN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an MCP handshake with a guest may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a guest has to list its tools.
const LIST_TIMEOUT: Duration = Duration::from_secs(5);
/// A guest lists at most this many pages and tools; more is refused.
const MAX_TOOL_PAGES: usize = 8;
const MAX_TOOLS: usize = 256;

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
    tools: Vec<Tool>,
}

impl GuestSession {
    /// The guest's tools as it listed them when the session opened.
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

/// The guest link of every running VM.
#[derive(Default)]
pub struct Guests {
    /// Each running VM's endpoint, with the generation it was attached in
    /// (a session opened for a VM since restarted must not be kept).
    endpoints: Mutex<HashMap<String, (u64, GuestEndpoint)>>,
    sessions: Mutex<HashMap<String, Arc<GuestSession>>>,
    generation: std::sync::atomic::AtomicU64,
}

impl Guests {
    /// A VM is running: its guest may be reached through `endpoint`.
    pub fn attach(&self, vm: &str, endpoint: GuestEndpoint) {
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lock(&self.endpoints).insert(vm.to_owned(), (generation, endpoint));
        lock(&self.sessions).remove(vm);
    }

    /// The VM stopped: its session and endpoint go.
    pub fn detach(&self, vm: &str) {
        lock(&self.endpoints).remove(vm);
        lock(&self.sessions).remove(vm);
    }

    /// Names of the attached (running) VMs, sorted.
    pub fn attached(&self) -> Vec<String> {
        let mut names: Vec<String> = lock(&self.endpoints).keys().cloned().collect();
        names.sort();
        names
    }

    /// The VM's guest session, opened on first use and again after it closed
    /// (guest-mcp restarted). No lock is held while waiting for the guest.
    pub async fn session(&self, vm: &str) -> Result<Arc<GuestSession>, GuestError> {
        if let Some(session) = lock(&self.sessions).get(vm)
            && !session.is_closed()
        {
            return Ok(session.clone());
        }
        let (generation, endpoint) = lock(&self.endpoints)
            .get(vm)
            .cloned()
            .ok_or_else(|| GuestError::NotAttached(vm.to_owned()))?;
        let unreachable = |why: String| GuestError::Unreachable {
            vm: vm.to_owned(),
            why,
        };
        // A guest-mcp that just restarted is back within a second or two.
        endpoint.wait_ready(GUEST_RETURN_TIMEOUT).await;
        let stream = endpoint
            .connect(nexus_vmm::GUEST_TOOLS_PORT)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let events = GuestEvents::default();
        let (read, write) = tokio::io::split(stream);
        let tapped = events::Tapped::new(read, write, events.clone());
        let service = match tokio::time::timeout(HANDSHAKE_TIMEOUT, ().serve(tapped)).await {
            Ok(Ok(service)) => service,
            Ok(Err(e)) => return Err(unreachable(format!("MCP handshake failed: {e}"))),
            Err(_) => {
                return Err(unreachable(format!(
                    "no MCP handshake within {HANDSHAKE_TIMEOUT:?}"
                )));
            }
        };
        let tools = tokio::time::timeout(LIST_TIMEOUT, list_tools(&service))
            .await
            .map_err(|_| unreachable(format!("no tool list within {LIST_TIMEOUT:?}")))?
            .map_err(unreachable)?;
        let session = Arc::new(GuestSession {
            service,
            events,
            tools,
        });
        let mut sessions = lock(&self.sessions);
        // Detached meanwhile (the VM stopped, or stopped and started again):
        // do not keep a session for a VM that is gone.
        if lock(&self.endpoints).get(vm).map(|(g, _)| *g) != Some(generation) {
            return Err(GuestError::NotAttached(vm.to_owned()));
        }
        sessions.insert(vm.to_owned(), session.clone());
        Ok(session)
    }

    pub fn is_attached(&self, vm: &str) -> bool {
        lock(&self.endpoints).contains_key(vm)
    }

    /// Drops a session found dead (unless another caller has replaced it
    /// already) and opens a new one.
    pub async fn reopen(
        &self,
        vm: &str,
        dead: &Arc<GuestSession>,
    ) -> Result<Arc<GuestSession>, GuestError> {
        {
            let mut sessions = lock(&self.sessions);
            if sessions.get(vm).is_some_and(|s| Arc::ptr_eq(s, dead)) {
                sessions.remove(vm);
            }
        }
        self.session(vm).await
    }

    /// Every running VM's tools, asked of all guests at once. A guest that
    /// does not answer is left out (and logged).
    pub async fn all_tools(&self) -> Vec<(String, Arc<GuestSession>)> {
        let names = self.attached();
        let sessions = futures::future::join_all(names.iter().map(|vm| self.session(vm))).await;
        names
            .into_iter()
            .zip(sessions)
            .filter_map(|(vm, session)| match session {
                Ok(session) => Some((vm, session)),
                Err(e) => {
                    tracing::warn!(vm, error = %e, "guest tools unavailable");
                    None
                }
            })
            .collect()
    }
}

/// The guest's tools, page by page, within the bounds above, with
/// standard schemas.
async fn list_tools(service: &RunningService<RoleClient, ()>) -> Result<Vec<Tool>, String> {
    let mut tools = Vec::new();
    let mut cursor = None;
    for _ in 0..MAX_TOOL_PAGES {
        let page = service
            .list_tools(Some(PaginatedRequestParams::default().with_cursor(cursor)))
            .await
            .map_err(|e| format!("tools/list failed: {e}"))?;
        tools.extend(page.tools.into_iter().map(|mut tool| {
            crate::schema::standardise_tool(&mut tool);
            tool
        }));
        if tools.len() > MAX_TOOLS {
            return Err(format!("the guest lists more than {MAX_TOOLS} tools"));
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
