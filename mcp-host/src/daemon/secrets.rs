//! Secrets on the host: stored in the catalog, held in memory for the
//! egress proxy, granted to VMs. A VM learns only placeholders
//! (`NEXUS_SECRET_<NAME>` in its commands' environment) and Nexus's CA,
//! both pushed over its control channel when it runs and whenever its
//! grants change. No answer, log line or audit row holds a value.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use super::{Daemon, DaemonError, Result, lock_std};
use crate::egress::secrets::{Binding, Granted, Secret, check_value, new_placeholder};

/// How long a guest has to take its network settings.
const PUSH_TIMEOUT: Duration = Duration::from_secs(20);

/// The secrets in memory: each compiled, who holds which.
#[derive(Default)]
pub(super) struct Table {
    by_vm: HashMap<String, Vec<Arc<Secret>>>,
    placeholders: Arc<HashMap<String, String>>,
}

pub use nexus_types::SecretInfo;

/// A secret's name: it becomes `NEXUS_SECRET_<NAME>`.
fn check_name(name: &str) -> Result<()> {
    let ok = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_uppercase())
        && name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(DaemonError::Invalid(format!(
            "`name` {name:?} must be 1-64 characters of A-Z, 0-9 and _, starting with a letter (it becomes NEXUS_SECRET_<NAME> in the VM)"
        )))
    }
}

fn env_name(name: &str) -> String {
    format!("NEXUS_SECRET_{name}")
}

fn info(record: &nexus_storage::SecretRecord) -> SecretInfo {
    let binding: Binding = serde_json::from_str(&record.binding).unwrap_or_default();
    SecretInfo {
        name: record.name.clone(),
        hosts: binding.hosts,
        header: binding.header,
        basic_user: binding.basic_user,
        placeholder: record.placeholder.clone(),
        env: env_name(&record.name),
        vms: record.vms.clone(),
        created_at: record.created_at.clone(),
        updated_at: record.updated_at.clone(),
    }
}

impl Daemon {
    /// Reads every secret from the catalog into memory again. Changes
    /// hold `secret_changes` from their write to their reload, so no
    /// older read lands after a newer one.
    pub(super) async fn reload_secrets(&self) -> Result<Vec<nexus_storage::SecretRecord>> {
        let records = self.blocking(|s| s.secrets()).await?;
        let mut table = Table::default();
        let mut placeholders = HashMap::new();
        for record in &records {
            placeholders.insert(record.placeholder.clone(), record.name.clone());
            let compiled = serde_json::from_str::<Binding>(&record.binding)
                .map_err(|e| e.to_string())
                .and_then(|b| Secret::new(&record.name, &record.value, &b, &record.placeholder));
            let secret = match compiled {
                Ok(secret) => Arc::new(secret),
                // A binding that no longer reads sends the secret nowhere;
                // its placeholder is still caught.
                Err(why) => {
                    tracing::error!(
                        secret = record.name,
                        why,
                        "a secret's binding does not read: it is sent nowhere"
                    );
                    continue;
                }
            };
            for vm in &record.vms {
                table
                    .by_vm
                    .entry(vm.clone())
                    .or_default()
                    .push(secret.clone());
            }
        }
        table.placeholders = Arc::new(placeholders);
        *lock_std(&self.secrets) = table;
        Ok(records)
    }

    /// What VM `vm`'s egress may use now.
    pub(super) fn granted(&self, vm: &str) -> Granted {
        let table = lock_std(&self.secrets);
        Granted {
            secrets: table.by_vm.get(vm).cloned().unwrap_or_default(),
            placeholders: table.placeholders.clone(),
        }
    }

    /// Makes or replaces secret `name`; its grants and placeholder stay.
    pub async fn set_secret(
        &self,
        name: &str,
        value: &str,
        binding: Binding,
    ) -> Result<(SecretInfo, bool)> {
        check_name(name)?;
        check_value(value).map_err(DaemonError::Invalid)?;
        binding.check().map_err(DaemonError::Invalid)?;
        let text =
            serde_json::to_string(&binding).map_err(|e| DaemonError::Internal(e.to_string()))?;
        let (owned, value) = (name.to_owned(), value.to_owned());
        let placeholder = new_placeholder();
        let _change = self.secret_changes.lock().await;
        let created = self
            .blocking(move |s| s.set_secret(&owned, &value, &text, &placeholder))
            .await?;
        let records = self.reload_secrets().await?;
        drop(_change);
        tracing::info!(secret = name, created, hosts = ?binding.hosts, "secret set");
        let record = records
            .iter()
            .find(|r| r.name == name)
            .ok_or_else(|| DaemonError::Internal(format!("secret {name} vanished")))?;
        Ok((info(record), created))
    }

    pub async fn list_secrets(&self) -> Result<Vec<SecretInfo>> {
        Ok(self
            .blocking(|s| s.secrets())
            .await?
            .iter()
            .map(info)
            .collect())
    }

    /// Deletes secret `name`; the VMs that held it are told.
    pub async fn delete_secret(&self, name: &str) -> Result<SecretInfo> {
        let change = self.secret_changes.lock().await;
        let records = self.blocking(|s| s.secrets()).await?;
        let record = records
            .iter()
            .find(|r| r.name == name)
            .ok_or_else(|| nexus_storage::StorageError::NoSecret(name.to_owned()))?;
        let owned = name.to_owned();
        self.blocking(move |s| s.delete_secret(&owned)).await?;
        self.reload_secrets().await?;
        drop(change);
        tracing::info!(secret = name, "secret deleted");
        // The VMs that held it, at once: one slow guest delays no other.
        futures::future::join_all(record.vms.iter().map(|vm| self.push_network(vm))).await;
        Ok(info(record))
    }

    /// Lets VM `vm` use secret `name` (from its next request; its next
    /// commands see the placeholder).
    pub async fn grant_secret(&self, name: &str, vm: &str) -> Result<SecretInfo> {
        self.known(vm).await?;
        let (secret, owned) = (name.to_owned(), vm.to_owned());
        let change = self.secret_changes.lock().await;
        self.blocking(move |s| s.grant_secret(&secret, &owned))
            .await?;
        self.secret_changed(name, vm, "granted", change).await
    }

    /// Takes secret `name` from VM `vm` (from its next request).
    pub async fn revoke_secret(&self, name: &str, vm: &str) -> Result<SecretInfo> {
        self.known(vm).await?;
        let (secret, owned) = (name.to_owned(), vm.to_owned());
        let change = self.secret_changes.lock().await;
        self.blocking(move |s| s.revoke_secret(&secret, &owned))
            .await?;
        self.secret_changed(name, vm, "revoked", change).await
    }

    /// After a grant or revoke (`change` held since the catalog was
    /// written): memory reloaded, then the VM told.
    async fn secret_changed(
        &self,
        name: &str,
        vm: &str,
        what: &str,
        change: tokio::sync::MutexGuard<'_, ()>,
    ) -> Result<SecretInfo> {
        let records = self.reload_secrets().await?;
        drop(change);
        tracing::info!(secret = name, vm, "secret {what}");
        self.push_network(vm).await;
        records
            .iter()
            .find(|r| r.name == name)
            .map(info)
            .ok_or_else(|| nexus_storage::StorageError::NoSecret(name.to_owned()).into())
    }

    /// The names of the secrets VM `vm` holds.
    pub(super) fn secrets_of(&self, vm: &str) -> Vec<String> {
        lock_std(&self.secrets)
            .by_vm
            .get(vm)
            .map(|s| s.iter().map(|s| s.name.clone()).collect())
            .unwrap_or_default()
    }

    /// Gives a VM that just came to run its network settings: awaited
    /// (within the push's deadline) when it holds secrets and `wait`, so
    /// its first command can use them; otherwise meanwhile.
    pub(super) async fn give_network(&self, vm: &str, wait: bool) {
        if wait && !self.granted(vm).secrets.is_empty() {
            self.push_network(vm).await;
        } else if let Some(me) = self.me.upgrade() {
            let vm = vm.to_owned();
            tokio::spawn(async move { me.push_network(&vm).await });
        }
    }

    /// Gives a running VM its network settings: Nexus's CA to trust and
    /// its placeholders. Logged, not returned, when the guest does not
    /// take them (it then has no secrets; the proxy decides regardless).
    pub(super) async fn push_network(&self, vm: &str) {
        let env: BTreeMap<String, String> = self
            .granted(vm)
            .secrets
            .iter()
            .map(|s| (env_name(&s.name), s.placeholder.clone()))
            .collect();
        let mut args = serde_json::Map::new();
        args.insert("env".into(), serde_json::json!(env));
        if let Some(ca) = &self.egress_settings.authority {
            args.insert("ca_pem".into(), ca.cert_pem().into());
        }
        let pushed = async {
            let Some(client) = self.control(vm).await.map_err(|e| e.to_string())? else {
                return Ok(());
            };
            super::hooks::control_call(&client, "set_network", args.into(), PUSH_TIMEOUT).await
        };
        if let Err(why) = pushed.await {
            tracing::warn!(vm, why, "the guest did not take its network settings");
        }
    }
}
