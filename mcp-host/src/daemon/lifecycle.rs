//! A VM's life after its boot: taken into the running set, watched,
//! started, stopped and destroyed (which preempts whatever runs on it),
//! and nexusd's own shutdown.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use nexus_vmm::Vm;
use rmcp::ServiceExt;

use super::hooks::{self, handshake};
use super::{Daemon, DaemonError, EventKind, Result, Running, VmEvent, VmInfo, events, lock_std};

impl Daemon {
    /// Takes a ready VM into the running set: its guest link, a watcher
    /// for its death, and news of it for clients.
    pub(super) async fn run(
        &self,
        name: &str,
        vm: Vm,
        tools: Option<Vec<rmcp::model::Tool>>,
        size: (u32, u64),
    ) {
        self.run_with(name, vm, tools, size, None).await;
    }

    /// [`Daemon::run`] with the guest's tools session open already.
    pub(super) async fn run_with(
        &self,
        name: &str,
        vm: Vm,
        tools: Option<Vec<rmcp::model::Tool>>,
        (vcpus, memory_mib): (u32, u64),
        session: Option<std::sync::Arc<crate::guest::GuestSession>>,
    ) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let endpoint = vm.endpoint();
        // The VM's own egress list (if it narrowed its role's), then its
        // proxy.
        let owned = name.to_owned();
        let own = self
            .blocking(move |s| s.vm_config(&owned))
            .await
            .map_err(|e| e.to_string())
            .and_then(|c| serde_json::from_str::<super::VmConfig>(&c).map_err(|e| e.to_string()))
            .map(|c| c.egress);
        // A list that cannot be read fails closed: no way out, not the
        // role's wider one.
        let own = own.unwrap_or_else(|why| {
            tracing::error!(
                vm = name,
                why,
                "egress: the VM's config does not read: no egress"
            );
            Some(Vec::new())
        });
        if let Err(why) = self.set_egress_list(name, own.as_deref()) {
            tracing::error!(
                vm = name,
                why,
                "egress: the VM's own list does not read: no egress"
            );
            let _ = self.set_egress_list(name, Some(&[]));
        }
        let egress = self.start_egress(name, &vm);
        match session {
            Some(session) => self
                .guests
                .attach_open(name, endpoint.clone(), tools, session),
            None => self.guests.attach(name, endpoint.clone(), tools),
        }
        self.running.lock().await.insert(
            name.to_owned(),
            Running {
                vm,
                id,
                vcpus,
                memory_mib,
                _egress: egress,
                control: Arc::default(),
            },
        );
        tokio::spawn(events::watch(
            self.me.clone(),
            name.to_owned(),
            id,
            endpoint,
        ));
        self.changed(name);
        // The guest's session opens now, not at the first listing: its
        // tools are listable as soon as the VM is (and clients are told
        // again when they are). One adopted paused: when resumed.
        if !self.guests.is_paused(name)
            && let Some(me) = self.me.upgrade()
        {
            let name = name.to_owned();
            tokio::spawn(async move {
                let _ = me.guests.session(&name, crate::guest::CALL_WAIT).await;
            });
        }
    }

    /// Whether instance `id` of VM `name` is still the one running.
    pub(super) async fn is_current(&self, name: &str, id: u64) -> bool {
        self.running
            .lock()
            .await
            .get(name)
            .is_some_and(|r| r.id == id)
    }

    /// The VMM of instance `id` of VM `name` exited without being asked
    /// to: the VM is stopped (and startable), and clients are told.
    pub(super) async fn reap(&self, name: &str, id: u64) {
        let _op = self.lock_vm(name).await;
        self.reap_locked(name, Some(id)).await;
    }

    /// Takes a VM whose VMM has exited (instance `id`, or whichever runs)
    /// out of the running set; the caller holds its operation lock.
    pub(super) async fn reap_locked(&self, name: &str, id: Option<u64>) {
        let running = {
            let mut map = self.running.lock().await;
            match map.get(name) {
                Some(r) if id.is_none_or(|id| r.id == id) && r.vm.exit_status().is_some() => {
                    map.remove(name)
                }
                _ => None,
            }
        };
        let Some(Running { vm, .. }) = running else {
            return;
        };
        self.guests.detach(name);
        let exit = vm.exit_status().unwrap_or_default();
        let report = vm.stop().await;
        tracing::warn!(vm = name, exit, ?report.method, "VM exited by itself");
        let console =
            nexus_vmm::console::tail(&self.console_log(name), events::CONSOLE_LINES, true);
        self.changed(name);
        self.emit(
            VmEvent::new(
                name,
                EventKind::Died,
                format!("VM {name} exited ({exit}); it is stopped and start_vm boots it again"),
            )
            .with_console(&console),
        );
    }

    pub async fn start(&self, name: &str) -> Result<VmInfo> {
        self.known(name).await?;
        self.check_not_destroying(name)?;
        let _op = self.lock_vm(name).await;
        self.known(name).await?;
        // Died, and its watcher has not been able to say so yet.
        self.reap_locked(name, None).await;
        if self.running.lock().await.contains_key(name) {
            return Err(DaemonError::Running(name.to_owned()));
        }
        self.boot(name).await?;
        self.info(name).await
    }

    pub async fn stop(&self, name: &str) -> Result<VmInfo> {
        self.known(name).await?;
        self.check_not_destroying(name)?;
        let _op = self.lock_vm(name).await;
        let Running { vm, .. } = self
            .running
            .lock()
            .await
            .remove(name)
            .ok_or_else(|| DaemonError::NotRunning(name.to_owned()))?;
        self.guests.detach(name);
        let report = vm.stop().await;
        tracing::info!(vm = name, ?report, "VM stopped");
        self.changed(name);
        self.emit(VmEvent::new(
            name,
            EventKind::Stopped,
            format!("VM {name} stopped ({:?})", report.method),
        ));
        self.info(name).await
    }

    /// Stops the VM if it runs, then removes its drives, snapshots and log.
    pub async fn destroy(&self, name: &str) -> Result<()> {
        self.known(name).await?;
        if !self
            .destroying
            .send_if_modified(|set| set.insert(name.to_owned()))
        {
            return Err(DaemonError::Destroying(name.to_owned()));
        }
        let _op = self.lock_vm(name).await;
        let result = async {
            // Take the VM out first: the map must not stay locked while it stops.
            let running = self.running.lock().await.remove(name);
            self.guests.detach(name);
            if let Some(Running { vm, .. }) = running {
                vm.stop().await;
                self.changed(name);
            }
            let doomed = name.to_owned();
            self.blocking(move |s| s.destroy_vm_drives(&doomed)).await?;
            self.remove_console(name);
            self.emit(VmEvent::new(
                name,
                EventKind::Destroyed,
                format!("VM {name} destroyed"),
            ));
            self.owners.forget(name);
            lock_std(&self.egress_own).remove(name);
            // Its secrets' grants went with it in the catalog: in memory
            // too, before any VM of the same name can be made.
            if let Err(e) = self.reload_secrets().await {
                tracing::error!(vm = name, error = %e, "could not reread secrets");
            }
            // The catalog dropped its grants with it; so does memory
            // (a reload, in turn with any other, never puts them back).
            if let Err(e) = self.reload_access().await {
                tracing::error!(vm = name, error = %e, "could not reread grants");
            }
            Ok(())
        }
        .await;
        self.destroying.send_modify(|set| {
            set.remove(name);
        });
        result
    }

    /// Waits for exclusive use of VM `name` for one operation.
    pub(super) async fn lock_vm(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .vm_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_owned())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    /// Resolves once a destroy of VM `name` is asked for.
    pub(super) fn destroy_asked(&self, name: &str) -> hooks::Abandon {
        hooks::Abandon::new(self.destroying.subscribe(), name)
    }

    pub(super) fn check_not_destroying(&self, name: &str) -> Result<()> {
        if self.destroying.borrow().contains(name) {
            Err(DaemonError::Destroying(name.to_owned()))
        } else {
            Ok(())
        }
    }

    /// Stops every running VM and spare (daemon shutdown).
    pub async fn shutdown(&self) {
        self.close_warm_pools().await;
        let vms: Vec<Vm> = self
            .running
            .lock()
            .await
            .drain()
            .map(|(_, r)| r.vm)
            .collect();
        for vm in vms {
            vm.stop().await;
        }
    }

    /// A session with a running VM's control channel, or None if it is
    /// stopped: the one kept open since its last use, or a new one (a
    /// guest-mcp restarted closed the old).
    pub(super) async fn control(&self, name: &str) -> Result<Option<super::Control>> {
        let found = self
            .running
            .lock()
            .await
            .get(name)
            .map(|r| (r.vm.endpoint(), r.control.clone()));
        let Some((endpoint, kept)) = found else {
            return Ok(None);
        };
        if let Some(open) = lock_std(&kept).clone()
            && !open.is_closed()
        {
            return Ok(Some(open));
        }
        let stream = endpoint.connect(nexus_vmm::GUEST_CONTROL_PORT).await?;
        let opened = Arc::new(handshake(name, ().serve(stream)).await?);
        *lock_std(&kept) = Some(opened.clone());
        Ok(Some(opened))
    }
}
