//! nexusd's side of egress: the rules a VM's connections pass (its
//! owner's role's allowlist, then the VM's own narrower one) and the
//! record of each (audit trail, metrics). The proxy is `crate::egress`.

use std::sync::{Arc, Weak};

use nexus_storage::AuditRecord;
use nexus_vmm::Vm;

use super::{Daemon, lock_std};
use crate::egress::{Allowlist, Gate, Outcome, Record, Rules};

/// A VM's egress proxy; stopped with the VM's entry, its connections
/// and tunnels with it.
pub(super) struct EgressTask(tokio_util::sync::CancellationToken);

impl Drop for EgressTask {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Audit rows one VM's egress may write per second; past that its
/// connections are only counted (a guest could otherwise flood the
/// trail, which keeps only its newest rows, and delay every other call's
/// record).
const ROWS_PER_SECOND: u32 = 20;
/// The longest host or reason kept in a row.
const MAX_FIELD_CHARS: usize = 256;

/// Per VM: the second being counted and the rows written in it.
#[derive(Default)]
pub(super) struct AuditBudget(std::sync::Mutex<std::collections::HashMap<String, (u64, u32)>>);

impl AuditBudget {
    /// Whether VM `vm` may write one more row now; the first refusal in
    /// a second is logged.
    fn take(&self, vm: &str) -> bool {
        let second = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut counts = lock_std(&self.0);
        let entry = counts.entry(vm.to_owned()).or_insert((second, 0));
        if entry.0 != second {
            *entry = (second, 0);
        }
        entry.1 += 1;
        if entry.1 == ROWS_PER_SECOND + 1 {
            tracing::warn!(
                vm,
                "egress: more than {ROWS_PER_SECOND} connections this second; the rest are counted, not recorded"
            );
        }
        entry.1 <= ROWS_PER_SECOND
    }
}

fn cut(s: &str) -> String {
    match s.char_indices().nth(MAX_FIELD_CHARS) {
        Some((at, _)) => format!("{}...", &s[..at]),
        None => s.to_owned(),
    }
}

struct DaemonGate(Weak<Daemon>);

impl Gate for DaemonGate {
    fn rules(&self, vm: &str) -> Result<Rules, String> {
        let daemon = self.0.upgrade().ok_or("nexusd is stopping")?;
        // An owner whose role cannot be told (a revoked token) gets no
        // way out, not the user role's.
        if let Some(Some(owner)) = daemon.owner_of(vm)
            && daemon.role_name_of_identity(&owner).is_none()
        {
            return Err(format!(
                "VM {vm}'s owner {owner} has no role now: no egress"
            ));
        }
        let identity = daemon
            .vm_identity(vm)
            .ok_or_else(|| format!("VM {vm} is not known"))?;
        let mut lists = vec![daemon.role_of(&identity).egress.clone()];
        if let Some(own) = lock_std(&daemon.egress_own).get(vm) {
            lists.push(own.clone());
        }
        Ok(Rules {
            identity: identity.name,
            lists,
            granted: daemon.granted(vm),
        })
    }

    fn record(&self, r: Record) {
        let Some(daemon) = self.0.upgrade() else {
            return;
        };
        let (decision, outcome, why) = match &r.outcome {
            Outcome::Ok => ("allow", "ok", None),
            Outcome::Denied(why) => ("deny", "denied", Some(why.clone())),
            Outcome::Failed(why) => ("error", "error", Some(why.clone())),
        };
        daemon
            .metrics
            .record_egress(&r.vm, decision, r.bytes_up, r.bytes_down);
        if !daemon.egress_audit.take(&r.vm) {
            return;
        }
        // Logged too, within the same budget (a guest chooses the rate).
        if let Some(why) = why.as_deref().filter(|w| w.contains("exfiltration")) {
            tracing::warn!(
                vm = r.vm,
                host = cut(&r.host),
                port = r.port,
                "egress: {}",
                cut(why)
            );
        }
        let arguments = serde_json::json!({
            "method": cut(&r.method),
            "host": cut(&r.host),
            "port": r.port,
            "bytes_up": r.bytes_up,
            "bytes_down": r.bytes_down,
            "why": why.as_deref().map(cut),
        });
        let mut arguments = arguments;
        if let Some(status) = r.status {
            arguments["status"] = status.into();
        }
        if r.intercepted {
            arguments["intercepted"] = true.into();
            arguments["requests"] = r.requests.into();
            arguments["secrets"] = serde_json::json!(r.secrets);
        }
        let record = AuditRecord {
            id: 0,
            at: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            identity: r.identity,
            transport: "egress".into(),
            tool: "egress".into(),
            vm: Some(r.vm),
            arguments: arguments.to_string(),
            outcome: outcome.into(),
            duration_us: r.took.as_micros().min(i64::MAX as u128) as i64,
        };
        tokio::spawn(async move { daemon.audit(record).await });
    }
}

impl Daemon {
    /// Serves VM `name`'s egress listener (`<uds>_1026`); None (logged)
    /// if it cannot listen: the VM then has no way out.
    pub(super) fn start_egress(&self, name: &str, vm: &Vm) -> Option<EgressTask> {
        let listener = vm
            .listen_guest_port(nexus_vmm::EGRESS_PORT)
            .inspect_err(|e| tracing::error!(vm = name, error = %e, "egress: cannot listen"))
            .ok()?;
        let gate: Arc<dyn Gate> = Arc::new(DaemonGate(self.me.clone()));
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(crate::egress::proxy::serve(
            listener,
            name.to_owned(),
            gate,
            self.egress_settings.clone(),
            stop.clone(),
        ));
        Some(EgressTask(stop))
    }

    /// Sets VM `vm`'s own egress allowlist (None: its owner's role's
    /// alone), kept with the VM; the next connection follows it.
    pub async fn set_egress(
        &self,
        vm: &str,
        patterns: Option<Vec<String>>,
    ) -> super::Result<super::VmInfo> {
        if let Some(patterns) = &patterns {
            Allowlist::new(patterns)
                .map_err(|why| super::DaemonError::Invalid(format!("`egress`: {why}")))?;
        }
        let _op = self.lock_vm(vm).await;
        let owned = vm.to_owned();
        let text = self.blocking(move |s| s.vm_config(&owned)).await?;
        let mut config: super::VmConfig = serde_json::from_str(&text)
            .map_err(|e| super::DaemonError::Internal(format!("VM config: {e}")))?;
        config.egress = patterns.clone();
        let text = serde_json::to_string(&config)
            .map_err(|e| super::DaemonError::Internal(e.to_string()))?;
        let owned = vm.to_owned();
        self.blocking(move |s| s.set_vm_config(&owned, &text))
            .await?;
        self.set_egress_list(vm, patterns.as_deref())
            .map_err(super::DaemonError::Invalid)?;
        tracing::info!(vm, egress = ?patterns, "egress allowlist set");
        self.info(vm).await
    }

    /// Narrows VM `vm`'s egress to `patterns` (None: its owner's role's
    /// alone) in memory; checked here, kept with the VM by the caller.
    pub(super) fn set_egress_list(
        &self,
        vm: &str,
        patterns: Option<&[String]>,
    ) -> Result<(), String> {
        let mut own = lock_std(&self.egress_own);
        match patterns {
            Some(patterns) => {
                own.insert(vm.to_owned(), Allowlist::new(patterns)?);
            }
            None => {
                own.remove(vm);
            }
        }
        Ok(())
    }
}
