//! Pausing and resuming a running VM: its vCPUs stop and its memory
//! stays. Its workspace is frozen first (everything written is on the
//! drive, and nothing more is), so a snapshot taken while it is paused is
//! consistent without the guest's help; resuming thaws it.

use std::time::Duration;

use super::events::{EventKind, VmEvent};
use super::{Daemon, DaemonError, Result, VmInfo};

/// How long the guest has to freeze or thaw its workspace.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(60);
/// The guest thaws by itself after this long if nexusd never does. The
/// VM is stopped right after the freeze, and its clock jumps by the pause
/// on resume: a long pause thaws at once, and a VM whose pause a crash cut
/// short (continued when adopted) thaws within this.
const FREEZE_DEADLINE_S: u64 = 30;
/// How long a resumed guest has to reconnect (one adopted paused).
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(15);

impl Daemon {
    /// Pauses a running VM; its guest tools answer "paused" until resumed.
    pub async fn pause(&self, name: &str) -> Result<VmInfo> {
        self.known(name).await?;
        self.check_not_destroying(name)?;
        let _op = self.lock_vm(name).await;
        let machine = self.machine(name).await?;
        if self.is_paused(name).await {
            return Err(DaemonError::Invalid(format!(
                "VM {name} is paused already: resume_vm resumes it"
            )));
        }
        let frozen = self
            .guest_control(
                name,
                "freeze",
                serde_json::json!({"timeout_s": FREEZE_DEADLINE_S}),
            )
            .await;
        if let Err(e) = frozen {
            // It may have frozen after nexusd gave up waiting.
            let _ = self
                .guest_control(name, "thaw", serde_json::json!({}))
                .await;
            return Err(e);
        }
        if let Err(e) = machine.pause().await {
            let _ = self
                .guest_control(name, "thaw", serde_json::json!({}))
                .await;
            return Err(e.into());
        }
        tracing::info!(vm = name, "VM paused");
        self.emit(VmEvent::new(
            name,
            EventKind::Paused,
            format!("VM {name} paused"),
        ));
        self.info(name).await
    }

    /// Resumes a paused VM where it was.
    pub async fn resume(&self, name: &str) -> Result<VmInfo> {
        self.known(name).await?;
        self.check_not_destroying(name)?;
        let _op = self.lock_vm(name).await;
        let machine = self.machine(name).await?;
        if !self.is_paused(name).await {
            return Err(DaemonError::Invalid(format!(
                "VM {name} is not paused: pause_vm pauses it"
            )));
        }
        machine.resume().await?;
        // A VM adopted paused (a previous nexusd paused it) reconnects its
        // guest only now; any other is ready already. Its tools are
        // listable again before the answer (one adopted paused had no
        // session yet). Neither wait holds up a destroy.
        let endpoint = self.running.lock().await.get(name).map(|r| r.vm.endpoint());
        self.guests.retry_now(name);
        let reconnected = async {
            if let Some(endpoint) = endpoint
                && !endpoint.wait_ready(RECONNECT_TIMEOUT).await
            {
                tracing::warn!(vm = name, "the resumed guest has not reconnected yet");
                return;
            }
            let _ = self.guests.session(name, crate::guest::CALL_WAIT).await;
        };
        let _ = self.destroy_asked(name).race(reconnected).await;
        // Thawed by the guest's own deadline already if the pause was
        // long ("not frozen"); anything else is tried once more.
        for attempt in 0..2 {
            match self
                .guest_control(name, "thaw", serde_json::json!({}))
                .await
            {
                Err(e) if !e.to_string().contains("not frozen") => {
                    tracing::warn!(vm = name, attempt, error = %e, "thaw after resume failed");
                }
                _ => break,
            }
        }
        // What changed while it was paused (a secret granted or revoked)
        // reaches it now.
        self.push_network(name).await;
        tracing::info!(vm = name, "VM resumed");
        self.emit(VmEvent::new(
            name,
            EventKind::Resumed,
            format!("VM {name} resumed"),
        ));
        self.info(name).await
    }

    /// Whether a running VM is paused.
    pub async fn is_paused(&self, name: &str) -> bool {
        self.running
            .lock()
            .await
            .get(name)
            .is_some_and(|r| r.vm.is_paused() && r.vm.exit_status().is_none())
    }

    async fn machine(&self, name: &str) -> Result<nexus_vmm::Machine> {
        let running = self.running.lock().await;
        let vm = running
            .get(name)
            .map(|r| &r.vm)
            .filter(|vm| vm.exit_status().is_none())
            .ok_or_else(|| DaemonError::NotRunning(name.to_owned()))?;
        Ok(vm.machine()?)
    }

    /// Calls a tool of the guest's control channel, within a deadline.
    async fn guest_control(
        &self,
        name: &str,
        tool: &'static str,
        args: serde_json::Value,
    ) -> Result<()> {
        let failed = |why: String| DaemonError::Guest {
            vm: name.to_owned(),
            why: format!("{tool}: {why}"),
        };
        let called = async {
            let client = self
                .control(name)
                .await?
                .ok_or_else(|| DaemonError::NotRunning(name.to_owned()))?;
            super::hooks::control_call(&client, tool, args, FREEZE_TIMEOUT)
                .await
                .map_err(failed)
        };
        self.destroy_asked(name)
            .race(called)
            .await
            .unwrap_or_else(|| Err(failed(super::hooks::GIVEN_UP.to_owned())))
    }
}
