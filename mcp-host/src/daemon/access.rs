//! Who may do what, decided in one place: roles (catalog rows, compiled
//! here) and grants, kept in memory beside the catalog so that a decision
//! is a few map lookups. [`Daemon::decide`] runs before every tool call
//! on every transport; the listings (tools/list, list_vms, events) ask
//! the same questions.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};

use nexus_storage::GrantRecord;
use schemars::JsonSchema;
use serde::Serialize;
use tokio::sync::Mutex;

use super::{Daemon, DaemonError, Result, VmEvent};
use crate::guest::ToolsChanged;
use crate::identity::Identity;
use crate::policy::{ADMIN_ROLE, Action, Kind, Role, RoleSpec, VmScope};

#[derive(Default)]
pub(super) struct Access {
    roles: RwLock<HashMap<String, Arc<Role>>>,
    /// (VM, identity) pairs.
    grants: RwLock<HashSet<(String, String)>>,
    /// One reload at a time, so an older read never replaces a newer one.
    reload: Mutex<()>,
}

/// A role as list_roles and set_role show it.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct RoleView {
    pub name: String,
    #[serde(flatten)]
    pub spec: RoleSpec,
    /// Built in: `admin` cannot be changed, neither can be deleted.
    pub builtin: bool,
    pub created_at: String,
    pub updated_at: String,
}

/// A catalog role as the tools show it; None if its spec does not read.
fn view(r: nexus_storage::RoleRecord) -> Option<RoleView> {
    let spec = serde_json::from_str(&r.spec).ok()?;
    Some(RoleView {
        builtin: [ADMIN_ROLE, crate::policy::USER_ROLE].contains(&r.name.as_str()),
        name: r.name,
        spec,
        created_at: r.created_at,
        updated_at: r.updated_at,
    })
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

impl Daemon {
    /// `caller`'s role, compiled; a role the catalog no longer has
    /// allows nothing.
    pub fn role_of(&self, caller: &Identity) -> Arc<Role> {
        self.role_named(&caller.role)
    }

    pub(super) fn role_named(&self, name: &str) -> Arc<Role> {
        read(&self.access.roles)
            .get(name)
            .cloned()
            .unwrap_or_else(|| Arc::new(Role::none(name)))
    }

    /// Whether `caller` (of `role`) may see and drive VM `vm`.
    fn sees(&self, caller: &Identity, role: &Role, vm: &str, owner: Option<&str>) -> bool {
        match role.spec.vms {
            VmScope::All => true,
            VmScope::Own if owner == Some(caller.name.as_str()) => true,
            VmScope::Own | VmScope::Granted => {
                read(&self.access.grants).contains(&(vm.to_owned(), caller.name.clone()))
            }
        }
    }

    /// Whether `caller` may see and drive VM `vm`; another's VM and no
    /// VM read the same, so nobody learns which names others use.
    pub fn reach(&self, caller: &Identity, vm: &str) -> std::result::Result<(), String> {
        let role = self.role_of(caller);
        if role.spec.vms == VmScope::All {
            // The tool itself says whether there is such a VM.
            return Ok(());
        }
        let owner = self.owner_of(vm);
        if owner.is_some() && self.sees(caller, &role, vm, owner.clone().flatten().as_deref()) {
            return Ok(());
        }
        Err(format!(
            "VM {vm:?} does not exist among yours ({}): list_vms shows them",
            caller.name
        ))
    }

    /// Whether `caller` may hear of `change`.
    pub fn may_hear_change(&self, caller: &Identity, change: &ToolsChanged) -> bool {
        match &change.vm {
            None => true,
            Some(_) if change.also.contains(&caller.name) => true,
            Some(vm) => self.reach(caller, vm).is_ok(),
        }
    }

    /// Those VM `vm` is granted to.
    pub(super) fn grantees(&self, vm: &str) -> Vec<String> {
        read(&self.access.grants)
            .iter()
            .filter(|(v, _)| v == vm)
            .map(|(_, who)| who.clone())
            .collect()
    }

    /// Whether `caller` may hear of `event` (its VM's owner and grantees
    /// are in it: a destroyed VM has none left to look up).
    pub fn may_hear(&self, caller: &Identity, event: &VmEvent) -> bool {
        let role = self.role_of(caller);
        event.grantees.contains(&caller.name)
            || self.sees(caller, &role, &event.vm, event.owner.as_deref())
    }

    /// The one decision before any tool runs: `caller` may do `action`.
    /// The refusal says why, in words for the caller.
    pub fn decide(&self, caller: &Identity, action: &Action) -> std::result::Result<(), String> {
        if matches!(action.kind, Kind::Unknown) {
            // Nothing runs; dispatch says what there is.
            return Ok(());
        }
        let role = self.role_of(caller);
        let tool = action.policy_name();
        if crate::policy::ADMIN_TOOLS.contains(&tool.as_str()) && !role.is_admin() {
            return Err(format!(
                "{tool} needs the admin role; the caller ({}) has role {:?}",
                caller.name, role.name
            ));
        }
        if !role.allows(&tool) {
            return Err(format!(
                "role {:?} of {} does not allow tool {tool} (its tools: {}); an admin can change that with set_role",
                role.name,
                caller.name,
                role.spec.tools.join(", ")
            ));
        }
        for vm in &action.vms {
            self.reach(caller, vm)?;
        }
        if action.creates && role.spec.vms == VmScope::Granted {
            return Err(format!(
                "role {:?} of {} reaches only VMs granted to it, so it cannot make VMs",
                role.name, caller.name
            ));
        }
        Ok(())
    }

    /// Whether `who` names an identity nexusd knows: `token:NAME` of an
    /// existing token, `uid:N` or `anonymous`.
    pub(super) fn known_identity(&self, who: &str, what: &str) -> Result<()> {
        let known = match who.split_once(':') {
            Some(("token", name)) => self.tokens.role_of(name).is_some(),
            // Canonical only: `uid:01000` would never match `uid:1000`.
            Some(("uid", uid)) => uid.parse::<u32>().is_ok_and(|n| n.to_string() == uid),
            None => who == "anonymous",
            _ => false,
        };
        if known {
            return Ok(());
        }
        Err(DaemonError::Invalid(format!(
            "`{what}` must be an identity: token:NAME (list_tokens shows them), uid:N or anonymous, got {who:?}"
        )))
    }

    /// Creates role `name` or replaces what it allows; true if new.
    /// Identities of the role are decided by the new spec at once.
    pub async fn set_role(&self, name: &str, spec: RoleSpec) -> Result<(RoleView, bool)> {
        if name == ADMIN_ROLE {
            return Err(DaemonError::Invalid(
                "role \"admin\" is built in and cannot be changed".into(),
            ));
        }
        Role::new(name, spec.clone()).map_err(DaemonError::Invalid)?;
        super::quota::Quota::check(&spec.quota).map_err(DaemonError::Invalid)?;
        let json =
            serde_json::to_string(&spec).map_err(|e| DaemonError::Internal(e.to_string()))?;
        let key = name.to_owned();
        let new = self.blocking(move |s| s.put_role(&key, &json)).await?;
        self.reload_access().await?;
        self.roles_changed();
        tracing::info!(role = name, new, "role set");
        let key = name.to_owned();
        let view = self
            .blocking(move |s| s.role(&key))
            .await?
            .and_then(view)
            .ok_or_else(|| DaemonError::Internal(format!("role {name:?} vanished")))?;
        Ok((view, new))
    }

    pub async fn list_roles(&self) -> Result<Vec<RoleView>> {
        let records = self.blocking(|s| s.roles()).await?;
        Ok(records.into_iter().filter_map(view).collect())
    }

    /// Deletes role `name`, refused while a token that is not revoked
    /// has it (naming them) and for the built-in roles.
    pub async fn delete_role(&self, name: &str) -> Result<()> {
        if [ADMIN_ROLE, crate::policy::USER_ROLE].contains(&name) {
            return Err(DaemonError::Invalid(format!(
                "role {name:?} is built in and cannot be deleted"
            )));
        }
        let key = name.to_owned();
        if let Err(tokens) = self.blocking(move |s| s.delete_role(&key)).await? {
            return Err(DaemonError::Refused(format!(
                "role {name:?} is held by tokens {tokens:?}: revoke them first (revoke_token)"
            )));
        }
        self.reload_access().await?;
        tracing::info!(role = name, "role deleted");
        Ok(())
    }

    /// Lets `identity` reach VM `vm` (if its role's scope is `own` or
    /// `granted`).
    pub async fn grant_vm(&self, vm: &str, identity: &str) -> Result<GrantRecord> {
        self.known_identity(identity, "identity")?;
        self.known(vm).await?;
        let (v, who) = (vm.to_owned(), identity.to_owned());
        let grant = self.blocking(move |s| s.grant_vm(&v, &who)).await?;
        self.reload_access().await?;
        self.changed(vm);
        Ok(grant)
    }

    pub async fn revoke_grant(&self, vm: &str, identity: &str) -> Result<()> {
        let (v, who) = (vm.to_owned(), identity.to_owned());
        self.blocking(move |s| s.revoke_grant(&v, &who)).await?;
        self.reload_access().await?;
        // It no longer reaches the VM, and must still hear it went.
        let _ = self.changes.send(ToolsChanged {
            vm: Some(vm.to_owned()),
            also: vec![identity.to_owned()],
        });
        Ok(())
    }

    pub async fn list_grants(
        &self,
        vm: Option<&str>,
        identity: Option<&str>,
    ) -> Result<Vec<GrantRecord>> {
        let mut grants = self.blocking(|s| s.grants()).await?;
        grants.retain(|g| {
            vm.is_none_or(|vm| g.vm == vm) && identity.is_none_or(|who| g.identity == who)
        });
        Ok(grants)
    }

    /// Roles and grants from the catalog; the built-in roles are put
    /// there if missing (a fresh or older catalog).
    pub(super) async fn reload_access(&self) -> Result<()> {
        let _one = self.access.reload.lock().await;
        let records = self.blocking(|s| s.roles()).await?;
        // Built-ins are put back only when their row is gone: one that
        // does not read stays (its identities get nothing) rather than
        // being widened to the default.
        let names: std::collections::BTreeSet<String> =
            records.iter().map(|r| r.name.clone()).collect();
        let mut specs = BTreeMap::new();
        for record in records {
            match serde_json::from_str::<RoleSpec>(&record.spec) {
                Ok(spec) => {
                    specs.insert(record.name, spec);
                }
                // Its identities are then allowed nothing.
                Err(e) => tracing::error!(role = record.name, error = %e, "unreadable role"),
            }
        }
        for (name, spec) in crate::policy::missing_builtins(&names) {
            let json =
                serde_json::to_string(&spec).map_err(|e| DaemonError::Internal(e.to_string()))?;
            self.blocking(move |s| s.put_role(name, &json)).await?;
            specs.insert(name.to_owned(), spec);
        }
        // The admin role is what the code says, whatever its row holds.
        let mut roles = HashMap::from([(ADMIN_ROLE.to_owned(), Arc::new(Role::admin()))]);
        for (name, spec) in specs {
            if name == ADMIN_ROLE {
                continue;
            }
            match Role::new(&name, spec) {
                Ok(role) => {
                    roles.insert(name, Arc::new(role));
                }
                Err(e) => tracing::error!(role = name, error = e, "a role that does not compile"),
            }
        }
        let grants = self
            .blocking(|s| s.grants())
            .await?
            .into_iter()
            .map(|g| (g.vm, g.identity))
            .collect();
        *self.access.roles.write().unwrap_or_else(|e| e.into_inner()) = roles;
        *self
            .access
            .grants
            .write()
            .unwrap_or_else(|e| e.into_inner()) = grants;
        Ok(())
    }

    /// The identity of VM `vm` for connections its guest opens toward
    /// the host (egress, Portal VMs): `vm:NAME`, with its owner's role
    /// (a VM no one owns gets the user role). No tool is reachable that
    /// way yet.
    pub fn vm_identity(&self, vm: &str) -> Option<Identity> {
        let owner = self.owner_of(vm)?;
        let role = owner
            .as_deref()
            .and_then(|o| self.role_name_of_identity(o))
            .unwrap_or_else(|| crate::policy::USER_ROLE.to_owned());
        Some(Identity::of_vm(vm, role))
    }

    /// The role name identity `who` (`token:NAME`, `uid:N`, `anonymous`)
    /// has now.
    pub(super) fn role_name_of_identity(&self, who: &str) -> Option<String> {
        if let Some(name) = who.strip_prefix("token:") {
            self.tokens.role_of(name)
        } else if let Some(uid) = who.strip_prefix("uid:") {
            Some(Identity::local(uid.parse().ok()?, &self.config.admin_uids).role)
        } else {
            (who == "anonymous").then(|| crate::policy::USER_ROLE.to_owned())
        }
    }
}
