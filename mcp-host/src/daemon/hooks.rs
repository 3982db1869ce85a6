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
}

impl GuestHooks {
    fn call(&self, tool: &'static str, args: serde_json::Value) -> std::result::Result<(), String> {
        let Some(client) = &self.client else {
            return Ok(());
        };
        let mut params = CallToolRequestParams::new(tool);
        if let serde_json::Value::Object(map) = args {
            params = params.with_arguments(map);
        }
        let abandon = Abandon::new(self.abandon.destroying.clone(), &self.vm);
        let result = self
            .handle
            .block_on(async {
                tokio::select! {
                    answer = tokio::time::timeout(HOOK_TIMEOUT, client.call_tool(params)) => {
                        answer.map_err(|_| {
                            format!("{tool} on VM {}: no answer within {HOOK_TIMEOUT:?}", self.vm)
                        })
                    }
                    () = abandon.wait() => {
                        Err(format!("{tool} on VM {}: given up, the VM is being destroyed", self.vm))
                    }
                }
            })?
            .map_err(|e| format!("{tool} on VM {}: {e}", self.vm))?;
        if result.is_error == Some(true) {
            return Err(format!(
                "{tool} on VM {}: {}",
                self.vm,
                result_text(&result)
            ));
        }
        Ok(())
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
