//! Who each VM belongs to (an identity's name; none: admins only), kept
//! in memory beside the catalog so that access checks and event filters
//! cost a map lookup, not a query.

use std::collections::HashMap;
use std::sync::RwLock;

use super::{Daemon, Result};

#[derive(Default)]
pub(super) struct Owners(RwLock<HashMap<String, Option<String>>>);

impl Owners {
    fn get(&self, vm: &str) -> Option<Option<String>> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(vm)
            .cloned()
    }

    pub(super) fn set(&self, vm: &str, owner: Option<String>) {
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(vm.to_owned(), owner);
    }

    pub(super) fn forget(&self, vm: &str) {
        self.0.write().unwrap_or_else(|e| e.into_inner()).remove(vm);
    }
}

impl Daemon {
    /// Who VM `vm` belongs to: None if no such VM, Some(None) if no one.
    pub fn owner_of(&self, vm: &str) -> Option<Option<String>> {
        self.owners.get(vm)
    }

    /// The VMs `owner` has.
    pub(super) fn owned_by(&self, owner: &str) -> Vec<String> {
        self.owners
            .0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, o)| o.as_deref() == Some(owner))
            .map(|(vm, _)| vm.clone())
            .collect()
    }

    /// Gives VM `vm` to `owner` (an identity's name), or to no one.
    /// `owner` must name an identity nexusd knows: `token:NAME` of an
    /// existing token, `uid:N` or `anonymous`.
    pub async fn give_vm(&self, vm: &str, owner: Option<String>) -> Result<super::VmInfo> {
        if let Some(owner) = &owner {
            self.known_identity(owner, "owner")?;
        }
        self.known(vm).await?;
        let _op = self.lock_vm(vm).await;
        let (name, to) = (vm.to_owned(), owner.clone());
        self.blocking(move |s| s.set_vm_owner(&name, to.as_deref()))
            .await?;
        // The owner that was hears of it, then the one that is.
        self.changed(vm);
        self.owners.set(vm, owner);
        self.changed(vm);
        self.info(vm).await
    }

    pub(super) async fn load_owners(&self) -> Result<()> {
        for (vm, owner) in self.blocking(|s| s.vm_owners()).await? {
            self.owners.set(&vm, owner);
        }
        Ok(())
    }
}
