//! Storage's hooks (freeze and thaw, release and reattach), done by a
//! running guest over its control channel, each within a deadline.

use std::collections::HashSet;
use std::time::Duration;

use nexus_storage::{Quiesce, Reattach};
use rmcp::model::CallToolRequestParams;

use super::{DaemonError, Result};
use crate::guest::HANDSHAKE_TIMEOUT;

/// How long a guest has to freeze, thaw, unmount or mount.
const HOOK_TIMEOUT: Duration = Duration::from_secs(60);

/// Finishes an MCP session setup with a guest, within a bound.
pub(super) async fn handshake<S>(
    vm: &str,
    setup: impl std::future::Future<
        Output = std::result::Result<S, rmcp::service::ClientInitializeError>,
    >,
) -> Result<S> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, setup).await {
        Ok(Ok(session)) => Ok(session),
        Ok(Err(e)) => Err(DaemonError::Guest {
            vm: vm.to_owned(),
            why: e.to_string(),
        }),
        Err(_) => Err(DaemonError::Guest {
            vm: vm.to_owned(),
            why: format!("no MCP handshake within {HANDSHAKE_TIMEOUT:?}"),
        }),
    }
}

/// A tool result's text, joined (what a refusing guest said).
pub(super) fn result_text(result: &rmcp::model::CallToolResult) -> String {
    result
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.as_str()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Calls tool `tool` of a guest's control channel with `args`, within
/// `deadline`; the error says why (a refusal: the guest's own text).
pub(super) async fn control_call(
    client: &rmcp::service::RunningService<rmcp::RoleClient, ()>,
    tool: &str,
    args: serde_json::Value,
    deadline: Duration,
) -> std::result::Result<(), String> {
    let mut params = CallToolRequestParams::new(tool.to_owned());
    if let serde_json::Value::Object(map) = args {
        params = params.with_arguments(map);
    }
    let result = tokio::time::timeout(deadline, client.call_tool(params))
        .await
        .map_err(|_| format!("no answer within {deadline:?}"))?
        .map_err(|e| e.to_string())?;
    if result.is_error == Some(true) {
        return Err(result_text(&result));
    }
    Ok(())
}

/// Storage's hooks, done by a running guest over its control channel.
pub(super) struct GuestHooks {
    pub handle: tokio::runtime::Handle,
    /// The guest's control channel; `None` for a stopped VM, which has
    /// nothing to freeze or release.
    pub client: Option<super::Control>,
    pub vm: String,
    /// A destroy of the VM ends a hook's wait on its guest.
    pub abandon: Abandon,
}

/// Resolves once a destroy of one VM is asked for.
pub(super) struct Abandon {
    destroying: tokio::sync::watch::Receiver<HashSet<String>>,
    vm: String,
}

impl Abandon {
    pub fn new(destroying: tokio::sync::watch::Receiver<HashSet<String>>, vm: &str) -> Self {
        Self {
            destroying,
            vm: vm.to_owned(),
        }
    }

    pub async fn wait(mut self) {
        let vm = self.vm;
        if self
            .destroying
            .wait_for(|set| set.contains(&vm))
            .await
            .is_err()
        {
            // The daemon is going away: nothing to wait for.
            std::future::pending::<()>().await;
        }
    }

    /// `work`'s outcome, or `None` once a destroy of the VM is asked for
    /// ([`GIVEN_UP`] says so): a destroy waits for the VM's lock, and a
    /// guest that never answers must not hold it.
    pub async fn race<F: Future>(self, work: F) -> Option<F::Output> {
        tokio::select! {
            done = work => Some(done),
            () = self.wait() => None,
        }
    }
}

/// Why a wait on a guest ended early ([`Abandon::race`]).
pub(super) const GIVEN_UP: &str = "given up, the VM is being destroyed";

impl GuestHooks {
    fn call(&self, tool: &'static str, args: serde_json::Value) -> std::result::Result<(), String> {
        let Some(client) = &self.client else {
            return Ok(());
        };
        let abandon = Abandon::new(self.abandon.destroying.clone(), &self.vm);
        self.handle
            .block_on(abandon.race(control_call(client, tool, args, HOOK_TIMEOUT)))
            .unwrap_or_else(|| Err(GIVEN_UP.to_owned()))
            .map_err(|why| format!("{tool} on VM {}: {why}", self.vm))
    }
}

impl Quiesce for GuestHooks {
    fn freeze(&mut self) -> std::result::Result<(), String> {
        // A thaw deadline: the guest thaws by itself if nexusd dies here.
        self.call("freeze", serde_json::json!({"timeout_s": 30}))
    }
    fn thaw(&mut self) -> std::result::Result<(), String> {
        self.call("thaw", serde_json::json!({}))
    }
}

impl Reattach for GuestHooks {
    fn release(&mut self) -> std::result::Result<(), String> {
        self.call("unmount", serde_json::json!({"force": true}))
    }
    fn reattach(&mut self) -> std::result::Result<(), String> {
        self.call("mount", serde_json::json!({}))
    }
}
