//! The daemon's core: VMs made of storage (drives) and vmm (processes).
//! MCP handlers call this and only translate.

mod access;
pub mod admission;
pub mod audit;
mod events;
mod hooks;
mod owners;
pub mod quota;
pub mod tokens;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use nexus_rootfs::Manifest;
use nexus_storage::{
    SnapshotInfo, Storage, StorageConfig, StorageError, WorkspaceSource, validate_name,
};
use nexus_vmm::qemu::QemuBackend;
use nexus_vmm::{Drive, Vm, VmSpec, Vmm, VmmConfig, VmmError};
use rmcp::service::RunningService;
use rmcp::{RoleClient, ServiceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

pub use access::RoleView;
pub use events::{EventKind, Severity, VmEvent};
use hooks::{GuestHooks, handshake};
use nexus_storage::Reattach;
pub use quota::QuotaConfig;

use crate::Config;
use crate::guest::Guests;
use crate::state_lock::StateLock;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error("{0}")]
    Invalid(String),
    #[error("VM {0:?} does not exist: list_vms shows the VMs there are")]
    NoVm(String),
    #[error("VM {0:?} is not running: start it with start_vm")]
    NotRunning(String),
    #[error("VM {0:?} is running already")]
    Running(String),
    #[error("VMs cannot be started here: {0}")]
    NoBackend(String),
    #[error("image {image:?} is damaged: {why}")]
    BadImage { image: String, why: String },
    #[error("VM {0:?} is being destroyed")]
    Destroying(String),
    #[error("VM {vm:?}: guest control channel: {why}")]
    Guest { vm: String, why: String },
    #[error("internal error: {0}")]
    Internal(String),
    /// The host's limits do not admit it.
    #[error("{0}")]
    Refused(String),
}

type Result<T> = std::result::Result<T, DaemonError>;

/// What nexusd keeps with a VM besides its drives.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct VmConfig {
    vcpus: u32,
    memory_mib: u32,
}

/// A VM as the management tools show it.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct VmInfo {
    pub name: String,
    /// `running` or `stopped`.
    pub state: String,
    pub image: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The VM whose snapshot its workspace came from, if any.
    pub from_vm: Option<String>,
    /// That snapshot.
    pub from_snapshot: Option<String>,
    /// vsock CID while running.
    pub cid: Option<u32>,
    /// Milliseconds from start to guest readiness, while running.
    pub ready_ms: Option<u64>,
    /// While running, how its guest's tools stand: "answering",
    /// "connecting", or "unresponsive for N s: why".
    pub guest: Option<String>,
    /// The identity it belongs to (none: admins only).
    pub owner: Option<String>,
}

/// What `spawn_vm` asks for; every field has a default.
#[derive(Debug, Clone, Default)]
pub struct SpawnRequest {
    pub name: Option<String>,
    pub image: Option<String>,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u32>,
    pub workspace_gib: Option<u64>,
    /// (VM, snapshot) to clone the workspace from.
    pub from_snapshot: Option<(String, String)>,
    /// The identity the VM belongs to.
    pub owner: Option<String>,
}

pub const DEFAULT_IMAGE: &str = "default";
/// Where a long operation reports its steps: (step number, message).
pub type Progress = tokio::sync::mpsc::UnboundedSender<(f64, String)>;
/// The steps `spawn` reports.
pub const SPAWN_STEPS: f64 = 3.0;
pub const MAX_WORKSPACE_GIB: u64 = 1024;

/// A VM nexusd runs, and which start of it this is (a watcher acts only on
/// the instance it watches).
struct Running {
    vm: Vm,
    id: u64,
    vcpus: u32,
    memory_mib: u64,
}

pub struct Daemon {
    config: Config,
    storage: Arc<Storage>,
    vmm: std::result::Result<Vmm, String>,
    running: Mutex<HashMap<String, Running>>,
    next_id: AtomicU64,
    /// VMs whose destruction is under way: nothing else may start on them.
    /// VMs a destroy_vm is under way for; what runs on one (a boot, a
    /// guest hook) gives up when it appears here.
    destroying: tokio::sync::watch::Sender<std::collections::HashSet<String>>,
    /// The API tokens, as the catalog has them.
    tokens: crate::identity::Tokens,
    token_reload: Mutex<()>,
    owners: owners::Owners,
    access: access::Access,
    audit: audit::AuditSender,
    /// Taken across a snapshot's quota count and the snapshot.
    snapshotting: Mutex<()>,
    /// Serialises the operations on one VM (spawn, start, stop, destroy,
    /// snapshot, restore), so none runs on a VM another is changing.
    vm_locks: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// The guest link of each running VM, for proxied tools.
    guests: Guests,
    /// Fires whenever the set of running VMs (and so of proxied tools) changes.
    changes: tokio::sync::broadcast::Sender<()>,
    /// What happens to VMs, for clients that listen (MCP log messages).
    events: tokio::sync::broadcast::Sender<VmEvent>,
    me: Weak<Daemon>,
    /// What the host may hold, and the VMs booting (not yet running) that
    /// count against it already.
    limits: admission::Limits,
    booting: std::sync::Mutex<HashMap<String, (u32, u64)>>,
    /// Held while counting VMs and making a new one's drives.
    creating: Mutex<()>,
    metrics: Arc<crate::metrics::Metrics>,
    _lock: StateLock,
}

impl Daemon {
    /// Takes the state directory (refusing if another nexusd has it), opens
    /// storage, and imports any image built into `<state>/images/`.
    pub async fn open(config: Config) -> anyhow::Result<Arc<Self>> {
        let lock = StateLock::acquire(&config.state_dir, &config.admin_socket)?;
        Self::open_locked(config, lock).await
    }

    /// [`Daemon::open`] with the state directory's lock already taken.
    pub async fn open_locked(config: Config, lock: StateLock) -> anyhow::Result<Arc<Self>> {
        let limits = config.limits;
        let storage_config = StorageConfig::new(&config.state_dir);
        let (storage, report) =
            tokio::task::spawn_blocking(move || Storage::open(&storage_config)).await??;
        if !report.is_clean() {
            tracing::warn!(?report, "storage recovered from an interrupted run");
        }
        // Testing only: die at this storage step (crash-recovery tests).
        if let Ok(step) = std::env::var("NEXUSD_CRASH_AT") {
            tracing::warn!(step, "NEXUSD_CRASH_AT is set: nexusd dies there");
            storage.set_failpoint(Some(&step));
        }
        let storage = Arc::new(storage);
        import_built_images(&storage, &config.images_dir()).await?;
        let vmm = QemuBackend::locate(None, None)
            .map(|backend| {
                Vmm::new(
                    Arc::new(backend),
                    VmmConfig {
                        run_root: config.state_dir.join("run"),
                        ..VmmConfig::default()
                    },
                )
            })
            .map_err(|e| e.to_string());
        if let Err(why) = &vmm {
            tracing::warn!(why, "VMs cannot be started until this is fixed");
        }
        // A daemon killed before it could stop its VMs left them running:
        // adopt those whose processes all live (their guests reconnect),
        // and stop the rest, which then show as stopped.
        let mut running = HashMap::new();
        if let Ok(vmm) = &vmm {
            let names: Vec<String> = {
                let storage = storage.clone();
                tokio::task::spawn_blocking(move || storage.list_vms())
                    .await??
                    .into_iter()
                    .map(|d| d.vm)
                    .collect()
            };
            // All at once: each waits (bounded) for its guest to reconnect.
            let adopted = futures::future::join_all(names.iter().map(|name| {
                let console = console_log_path(&config.state_dir, name);
                vmm.adopt(name, console, Duration::from_secs(15))
            }))
            .await;
            for (name, adopted) in names.into_iter().zip(adopted) {
                match adopted {
                    Ok(Some(vm)) => {
                        running.insert(name, vm);
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(vm = name, error = %e, "could not adopt a running VM"),
                }
            }
        }
        let keep: Vec<PathBuf> = running
            .values()
            .map(|vm: &Vm| vm.run_dir().to_path_buf())
            .collect();
        let stopped = nexus_vmm::vm::reap_leftovers(&config.state_dir.join("run"), &keep);
        if !running.is_empty() {
            tracing::info!(vms = ?running.keys().collect::<Vec<_>>(), "adopted VMs a previous nexusd left running");
        }
        if !stopped.is_empty() {
            tracing::warn!(vms = ?stopped, "stopped leftovers of VMs that could not be adopted");
        }
        let changes = tokio::sync::broadcast::channel(16).0;
        let audit_writer = audit::writer(storage.clone());
        let daemon = Arc::new_cyclic(|me| Self {
            config,
            storage,
            vmm,
            running: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            destroying: tokio::sync::watch::Sender::default(),
            tokens: crate::identity::Tokens::default(),
            token_reload: Mutex::new(()),
            owners: owners::Owners::default(),
            access: access::Access::default(),
            audit: audit_writer,
            snapshotting: Mutex::new(()),
            vm_locks: std::sync::Mutex::default(),
            guests: Guests::new(changes.clone()),
            changes,
            events: tokio::sync::broadcast::channel(256).0,
            metrics: crate::metrics::Metrics::new(),
            me: me.clone(),
            limits: admission::Limits::resolve(&limits),
            booting: std::sync::Mutex::default(),
            creating: Mutex::new(()),
            _lock: lock,
        });
        for (name, vm) in running {
            let tools = daemon.image_tools(&name).await;
            let size = daemon.size(&name).await;
            daemon.run(&name, vm, tools, size).await;
        }
        daemon
            .reload_tokens()
            .await
            .map_err(|e| anyhow::anyhow!("reading API tokens: {e}"))?;
        daemon
            .load_owners()
            .await
            .map_err(|e| anyhow::anyhow!("reading VM owners: {e}"))?;
        daemon
            .reload_access()
            .await
            .map_err(|e| anyhow::anyhow!("reading roles and grants: {e}"))?;
        if let Some(path) = daemon
            .first_admin_token()
            .await
            .map_err(|e| anyhow::anyhow!("making the first admin token: {e}"))?
        {
            tracing::info!(
                path = %path.display(),
                "made the admin's API token (send it as `Authorization: Bearer <token>`)"
            );
        }
        for (name, drive) in report.reattach {
            let daemon = daemon.clone();
            tokio::spawn(async move { daemon.give_back_drive(&name, &drive).await });
        }
        Ok(daemon)
    }

    /// Finishes a rollback a crash interrupted: the guest of a VM that
    /// survived gets its drive back (it may have unmounted it); a stopped
    /// VM mounts it at its next boot.
    async fn give_back_drive(&self, name: &str, drive: &str) {
        let _op = self.lock_vm(name).await;
        if self.running.lock().await.contains_key(name) {
            let handle = tokio::runtime::Handle::current();
            let control = self.control(name).await;
            let vm = name.to_owned();
            let abandon = self.destroy_asked(name);
            let outcome = match control {
                Ok(control) => tokio::task::spawn_blocking(move || {
                    GuestHooks {
                        handle,
                        client: control,
                        vm,
                        abandon,
                    }
                    .reattach()
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string())),
                Err(e) => Err(e.to_string()),
            };
            match outcome {
                Ok(()) => tracing::info!(
                    vm = name,
                    drive,
                    "attached again the drive an interrupted rollback took"
                ),
                // The VM runs on without it; a restart mounts it.
                Err(why) => tracing::error!(
                    vm = name,
                    drive,
                    why,
                    "could not attach again the drive an interrupted rollback took: restart the VM"
                ),
            }
        }
        let vm = name.to_owned();
        if let Err(e) = self.blocking(move |s| s.reattached(&vm)).await {
            tracing::error!(vm = name, error = %e, "could not record a drive given back");
        }
    }

    /// Takes a ready VM into the running set: its guest link, a watcher
    /// for its death, and news of it for clients.
    async fn run(
        &self,
        name: &str,
        vm: Vm,
        tools: Option<Vec<rmcp::model::Tool>>,
        (vcpus, memory_mib): (u32, u64),
    ) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let endpoint = vm.endpoint();
        self.guests.attach(name, endpoint.clone(), tools);
        self.running.lock().await.insert(
            name.to_owned(),
            Running {
                vm,
                id,
                vcpus,
                memory_mib,
            },
        );
        tokio::spawn(events::watch(
            self.me.clone(),
            name.to_owned(),
            id,
            endpoint,
        ));
        self.changed();
        // The guest's session opens now, not at the first listing: its
        // tools are listable as soon as the VM is (and clients are told
        // again when they are).
        if let Some(me) = self.me.upgrade() {
            let name = name.to_owned();
            tokio::spawn(async move {
                let _ = me.guests.session(&name, crate::guest::CALL_WAIT).await;
            });
        }
    }

    /// Whether instance `id` of VM `name` is still the one running.
    async fn is_current(&self, name: &str, id: u64) -> bool {
        self.running
            .lock()
            .await
            .get(name)
            .is_some_and(|r| r.id == id)
    }

    /// The VMM of instance `id` of VM `name` exited without being asked
    /// to: the VM is stopped (and startable), and clients are told.
    async fn reap(&self, name: &str, id: u64) {
        let _op = self.lock_vm(name).await;
        self.reap_locked(name, Some(id)).await;
    }

    /// Takes a VM whose VMM has exited (instance `id`, or whichever runs)
    /// out of the running set; the caller holds its operation lock.
    async fn reap_locked(&self, name: &str, id: Option<u64>) {
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
        self.changed();
        self.emit(
            VmEvent::new(
                name,
                EventKind::Died,
                format!("VM {name} exited ({exit}); it is stopped and start_vm boots it again"),
            )
            .with_console(&console),
        );
    }

    /// The vCPUs and memory VM `name` is configured with.
    async fn size(&self, name: &str) -> (u32, u64) {
        let owned = name.to_owned();
        let config = self
            .blocking(move |s| s.vm_config(&owned))
            .await
            .ok()
            .and_then(|c| serde_json::from_str::<VmConfig>(&c).ok())
            .unwrap_or(VmConfig {
                vcpus: 1,
                memory_mib: 256,
            });
        (config.vcpus, u64::from(config.memory_mib))
    }

    /// Whether one more VM may exist; the caller holds `creating`.
    async fn admit_new(&self) -> Result<()> {
        let existing = self.blocking(|s| s.list_vms()).await?.len();
        admission::admit_new(&self.limits, existing as u32)
    }

    /// Counts a booting VM against the host's limits until it runs (or
    /// fails), if they admit it.
    async fn book(&self, name: &str, (vcpus, memory_mib): (u32, u64)) -> Result<Booking<'_>> {
        // Both held at once: two bookings cannot each miss the other.
        let running = self.running.lock().await;
        let mut booting = lock_std(&self.booting);
        let mut used = admission::InUse::default();
        let sizes = running
            .values()
            .map(|r| (r.vcpus, r.memory_mib))
            .chain(booting.values().copied());
        for (vcpus, memory_mib) in sizes {
            used.vms += 1;
            used.vcpus += vcpus;
            used.memory_mib += memory_mib;
        }
        admission::admit_start(&self.limits, used, name, vcpus, memory_mib)?;
        let owner = self.owner_of(name).flatten();
        if let Some(who) = owner.as_deref() {
            let owned = self.owned_by(who);
            let theirs: Vec<(u32, u64)> = running
                .iter()
                .map(|(vm, r)| (vm, (r.vcpus, r.memory_mib)))
                .chain(booting.iter().map(|(vm, size)| (vm, *size)))
                .filter(|(vm, _)| owned.contains(vm) && vm.as_str() != name)
                .map(|(_, size)| size)
                .collect();
            self.admit_owner_start(Some(who), &theirs, (vcpus, memory_mib))?;
        }
        booting.insert(name.to_owned(), (vcpus, memory_mib));
        Ok(Booking {
            daemon: self,
            name: name.to_owned(),
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> &admission::Limits {
        &self.limits
    }

    /// How full the pool is.
    pub fn pool_space(&self) -> admission::PoolSpace {
        admission::pool_space(self.storage.pool().root())
    }

    /// The tools the image of VM `name` recorded, if it did.
    async fn image_tools(&self, name: &str) -> Option<Vec<rmcp::model::Tool>> {
        let owned = name.to_owned();
        let image = self
            .blocking(move |s| {
                let drives = s.vm_drives(&owned)?;
                s.image(&drives.image)
            })
            .await
            .ok()
            .flatten()?;
        let manifest: Manifest = serde_json::from_str(&image.manifest).ok()?;
        trusted_tools(&manifest)
    }

    pub fn guests(&self) -> &Guests {
        &self.guests
    }

    /// What happens to VMs, as it happens.
    pub fn subscribe_events(&self) -> tokio::sync::broadcast::Receiver<VmEvent> {
        self.events.subscribe()
    }

    fn emit(&self, mut event: VmEvent) {
        event.owner = self.owner_of(&event.vm).flatten();
        let _ = self.events.send(event);
    }

    /// Why a VM's guest tools cannot be reached: it does not exist, or it
    /// is not running.
    pub async fn why_unreachable(&self, name: &str) -> DaemonError {
        match self.known(name).await {
            Err(e) => e,
            Ok(()) => DaemonError::NotRunning(name.to_owned()),
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// The Prometheus text exposition of this daemon's metrics.
    pub async fn render_metrics(&self) -> String {
        let running = self.running.lock().await.len();
        let total = self.list().await.map_or(running, |l| l.len());
        let pool = self.pool_space();
        self.metrics.render(
            running,
            total.saturating_sub(running),
            (pool.total_bytes, pool.free_bytes),
        )
    }

    /// Notified whenever VMs start or stop, so sessions can tell their
    /// clients that the tool list changed.
    pub fn subscribe_changes(&self) -> tokio::sync::broadcast::Receiver<()> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        let _ = self.changes.send(());
    }

    /// The images in the catalog.
    pub async fn images(&self) -> Result<Vec<nexus_storage::ImageInfo>> {
        self.blocking(|s| s.list_images()).await
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Storage) -> std::result::Result<T, StorageError> + Send + 'static,
    ) -> Result<T> {
        let storage = self.storage.clone();
        tokio::task::spawn_blocking(move || {
            let result = f(&storage);
            if let Err(e) = &result
                && e.is_injected()
            {
                // NEXUSD_CRASH_AT: the crash a test asked for, as a crash.
                tracing::error!(error = %e, "dying at the injected crash point");
                let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
            }
            result
        })
        .await
        .map_err(|e| DaemonError::Internal(e.to_string()))?
        .map_err(DaemonError::from)
    }

    /// Creates a VM's drives and boots it; returns once its guest is ready.
    /// On any failure nothing of the VM remains.
    pub async fn spawn(&self, req: SpawnRequest, progress: Option<Progress>) -> Result<VmInfo> {
        let say = |step: f64, message: String| {
            if let Some(progress) = &progress {
                let _ = progress.send((step, message));
            }
        };
        let name = match req.name {
            Some(name) => name,
            None => self.free_name().await?,
        };
        validate_name("VM", &name).map_err(StorageError::from)?;
        let image = req.image.unwrap_or_else(|| DEFAULT_IMAGE.to_owned());
        let vcpus = req.vcpus.unwrap_or(1);
        if vcpus == 0 || vcpus > nexus_vmm::spec::MAX_VCPUS {
            return Err(DaemonError::Invalid(format!(
                "`vcpus` must be between 1 and {}, got {vcpus}",
                nexus_vmm::spec::MAX_VCPUS
            )));
        }
        let memory_mib = req.memory_mib.unwrap_or(256);
        let host_mib = admission::host_memory_mib();
        if memory_mib < nexus_vmm::spec::MIN_MEMORY_MIB || memory_mib as u64 > host_mib {
            return Err(DaemonError::Invalid(format!(
                "`memory_mib` must be between {} and this host's {host_mib}, got {memory_mib}",
                nexus_vmm::spec::MIN_MEMORY_MIB
            )));
        }
        let gib = req.workspace_gib.unwrap_or(1);
        if gib == 0 || gib > MAX_WORKSPACE_GIB {
            return Err(DaemonError::Invalid(format!(
                "`workspace_gib` must be between 1 and {MAX_WORKSPACE_GIB}, got {gib}"
            )));
        }
        let workspace = match req.from_snapshot {
            None => {
                admission::admit_workspace(self.storage.pool().root(), gib << 30)?;
                WorkspaceSource::New { bytes: gib << 30 }
            }
            Some((vm, snapshot)) => WorkspaceSource::Snapshot { vm, snapshot },
        };
        if let Err(why) = &self.vmm {
            return Err(DaemonError::NoBackend(why.clone()));
        }
        say(
            1.0,
            format!("creating the drives of {name} from image {image}"),
        );
        let config = serde_json::to_string(&VmConfig { vcpus, memory_mib })
            .map_err(|e| DaemonError::Internal(e.to_string()))?;
        let _op = self.lock_vm(&name).await;
        {
            let creating = self.creating.lock().await;
            self.admit_new().await?;
            // Under `creating`: two spawns of one owner see each other.
            let bytes = match &workspace {
                WorkspaceSource::New { bytes } => *bytes,
                WorkspaceSource::Snapshot { vm, snapshot } => {
                    self.snapshot_workspace_bytes(vm, snapshot).await?
                }
            };
            self.admit_owner_workspace(req.owner.as_deref(), bytes)
                .await?;
            let (vm, image, owner) = (name.clone(), image.clone(), req.owner.clone());
            self.blocking(move |s| {
                s.create_vm_drives(&vm, &image, workspace)?;
                let configured = s
                    .set_vm_config(&vm, &config)
                    .and_then(|()| s.set_vm_owner(&vm, owner.as_deref()));
                if configured.is_err() {
                    let _ = s.destroy_vm_drives(&vm);
                }
                configured
            })
            .await?;
            self.owners.set(&name, req.owner.clone());
            drop(creating);
        }
        say(
            2.0,
            format!("booting {name} ({vcpus} vCPU, {memory_mib} MiB)"),
        );
        if let Err(e) = self.boot(&name).await {
            self.undo_new(&name).await;
            return Err(e);
        }
        let info = self.info(&name).await?;
        say(
            3.0,
            format!("{name} is ready ({} ms)", info.ready_ms.unwrap_or_default()),
        );
        Ok(info)
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
        self.changed();
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
                self.changed();
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
            self.forget_grants(name);
            Ok(())
        }
        .await;
        self.destroying.send_modify(|set| {
            set.remove(name);
        });
        result
    }

    /// Waits for exclusive use of VM `name` for one operation.
    async fn lock_vm(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
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
    fn destroy_asked(&self, name: &str) -> hooks::Abandon {
        hooks::Abandon::new(self.destroying.subscribe(), name)
    }

    fn check_not_destroying(&self, name: &str) -> Result<()> {
        if self.destroying.borrow().contains(name) {
            Err(DaemonError::Destroying(name.to_owned()))
        } else {
            Ok(())
        }
    }

    /// A consistent snapshot of a VM's drive; a running guest freezes
    /// /workspace around it.
    pub async fn snapshot(
        &self,
        name: &str,
        drive: Option<String>,
        snapshot: Option<String>,
    ) -> Result<SnapshotInfo> {
        self.known(name).await?;
        self.check_not_destroying(name)?;
        let _op = self.lock_vm(name).await;
        self.known(name).await?;
        let drive = drive.unwrap_or_else(|| nexus_storage::WORKSPACE_DRIVE.to_owned());
        let owned = name.to_owned();
        let existing = self
            .blocking(move |s| s.list_snapshots(Some(&owned)))
            .await?
            .len();
        admission::admit_snapshot(&self.limits, name, existing)?;
        // Held until the snapshot is taken: two snapshots of one owner's
        // VMs cannot both pass the count.
        let _counted = self.snapshotting.lock().await;
        self.admit_owner_snapshot(self.owner_of(name).flatten().as_deref())
            .await?;
        let control = self.control(name).await?;
        let vm = name.to_owned();
        let handle = tokio::runtime::Handle::current();
        let abandon = self.destroy_asked(name);
        self.blocking(move |s| {
            let mut hooks = GuestHooks {
                handle,
                client: control,
                vm: vm.clone(),
                abandon,
            };
            s.snapshot_drive(&vm, &drive, snapshot.as_deref(), &mut hooks)
        })
        .await
    }

    pub async fn list_snapshots(&self, vm: Option<String>) -> Result<Vec<SnapshotInfo>> {
        if let Some(vm) = &vm {
            self.known(vm).await?;
        }
        self.blocking(move |s| s.list_snapshots(vm.as_deref()))
            .await
    }

    pub async fn delete_snapshot(&self, vm: &str, snapshot: &str) -> Result<()> {
        let (vm, snapshot) = (vm.to_owned(), snapshot.to_owned());
        self.blocking(move |s| s.delete_snapshot(&vm, &snapshot))
            .await
    }

    /// Puts a snapshot's content back on its drive. A running VM keeps
    /// running: the guest unmounts /workspace (killing what holds it),
    /// the drive's content is replaced in place, the guest mounts it again.
    pub async fn restore(&self, name: &str, snapshot: &str) -> Result<SnapshotInfo> {
        self.known(name).await?;
        self.check_not_destroying(name)?;
        let _op = self.lock_vm(name).await;
        let (vm, snap) = (name.to_owned(), snapshot.to_owned());
        let target = self.blocking(move |s| s.snapshot(&vm, &snap)).await?;
        let running = self.running.lock().await.contains_key(name);
        if running && target.drive != nexus_storage::WORKSPACE_DRIVE {
            return Err(DaemonError::Invalid(format!(
                "snapshot {snapshot:?} is of the {} drive, which a running VM cannot give up: stop_vm {name} first",
                target.drive
            )));
        }
        let control = self.control(name).await?;
        let (vm, snap) = (name.to_owned(), snapshot.to_owned());
        let handle = tokio::runtime::Handle::current();
        let abandon = self.destroy_asked(name);
        self.blocking(move |s| {
            let mut hooks = GuestHooks {
                handle,
                client: control,
                vm: vm.clone(),
                abandon,
            };
            s.rollback_drive(&vm, &snap, &mut hooks)
        })
        .await
    }

    /// A new VM from a snapshot (its root and workspace as they were), booted.
    pub async fn fork(
        &self,
        from_vm: &str,
        snapshot: &str,
        name: Option<String>,
    ) -> Result<VmInfo> {
        let name = match name {
            Some(name) => name,
            None => self.free_name().await?,
        };
        validate_name("VM", &name).map_err(StorageError::from)?;
        if let Err(why) = &self.vmm {
            return Err(DaemonError::NoBackend(why.clone()));
        }
        let _op = self.lock_vm(&name).await;
        let creating = self.creating.lock().await;
        self.admit_new().await?;
        let bytes = self.snapshot_workspace_bytes(from_vm, snapshot).await?;
        self.admit_owner_workspace(self.owner_of(from_vm).flatten().as_deref(), bytes)
            .await?;
        let (from, snap, new) = (from_vm.to_owned(), snapshot.to_owned(), name.clone());
        // A fork is its source's owner's.
        let owner = self
            .blocking(move |s| {
                let config = s.vm_config(&from)?;
                let owner = s.vm_owner(&from)?;
                s.fork(&from, &snap, &new)?;
                s.set_vm_config(&new, &config)?;
                s.set_vm_owner(&new, owner.as_deref())?;
                Ok(owner)
            })
            .await?;
        self.owners.set(&name, owner);
        drop(creating);
        if let Err(e) = self.boot(&name).await {
            self.undo_new(&name).await;
            return Err(e);
        }
        self.info(&name).await
    }

    /// A session with a running VM's control channel, or None if it is stopped.
    async fn control(&self, name: &str) -> Result<Option<RunningService<RoleClient, ()>>> {
        let endpoint = self.running.lock().await.get(name).map(|r| r.vm.endpoint());
        let Some(endpoint) = endpoint else {
            return Ok(None);
        };
        let stream = endpoint.connect(nexus_vmm::GUEST_CONTROL_PORT).await?;
        handshake(name, ().serve(stream)).await.map(Some)
    }

    /// Names of the running VMs.
    pub async fn running_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.running.lock().await.keys().cloned().collect();
        names.sort();
        names
    }

    pub async fn list(&self) -> Result<Vec<VmInfo>> {
        let names: Vec<String> = self
            .blocking(|s| s.list_vms())
            .await?
            .into_iter()
            .map(|d| d.vm)
            .collect();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            match self.info(&name).await {
                Ok(info) => out.push(info),
                // Destroyed since it was listed.
                Err(DaemonError::NoVm(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    pub async fn info(&self, name: &str) -> Result<VmInfo> {
        let owned = name.to_owned();
        let (drives, config) = self
            .blocking(move |s| Ok((s.vm_drives(&owned)?, s.vm_config(&owned)?)))
            .await
            .map_err(|e| match e {
                DaemonError::Storage(StorageError::NoVm(vm)) => DaemonError::NoVm(vm),
                other => other,
            })?;
        let config: VmConfig = serde_json::from_str(&config).unwrap_or(VmConfig {
            vcpus: 1,
            memory_mib: 256,
        });
        let (from_vm, from_snapshot) = split_reference(drives.base_snapshot.as_deref());
        let running = self.running.lock().await;
        // A VM whose VMM has exited is stopped, even before it is reaped.
        let vm = running
            .get(name)
            .map(|r| &r.vm)
            .filter(|vm| vm.exit_status().is_none());
        Ok(VmInfo {
            name: name.to_owned(),
            state: if vm.is_some() { "running" } else { "stopped" }.to_owned(),
            image: drives.image,
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            from_vm: from_vm.map(str::to_owned),
            from_snapshot: from_snapshot.map(str::to_owned),
            cid: vm.map(Vm::cid),
            ready_ms: vm.map(|v| v.ready_after().as_millis() as u64),
            guest: vm
                .and_then(|_| self.guests.health(name))
                .map(|h| h.to_string()),
            owner: self.owner_of(name).flatten(),
        })
    }

    /// The last `lines` lines of a VM's serial console.
    pub async fn console(&self, name: &str, lines: usize) -> Result<String> {
        self.known(name).await?;
        Ok(nexus_vmm::console::tail(
            &self.console_log(name),
            lines,
            false,
        ))
    }

    /// Stops every running VM (daemon shutdown).
    pub async fn shutdown(&self) {
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

    async fn known(&self, name: &str) -> Result<()> {
        validate_name("VM", name).map_err(StorageError::from)?;
        self.info(name).await.map(|_| ())
    }

    async fn free_name(&self) -> Result<String> {
        let taken: Vec<String> = self.list().await?.into_iter().map(|v| v.name).collect();
        Ok((1..)
            .map(|i| format!("vm-{i}"))
            .find(|n| !taken.contains(n))
            .unwrap_or_else(|| "vm".into()))
    }

    /// The size of a snapshot's workspace drive (what a VM made from it
    /// starts with).
    async fn snapshot_workspace_bytes(&self, vm: &str, snapshot: &str) -> Result<u64> {
        let (vm, snapshot) = (vm.to_owned(), snapshot.to_owned());
        self.blocking(move |s| {
            let snap = s.snapshot(&vm, &snapshot)?;
            let file = snap.path.join("workspace.ext4");
            Ok(std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0))
        })
        .await
    }

    /// A new VM that did not boot goes again, whole.
    async fn undo_new(&self, name: &str) {
        let doomed = name.to_owned();
        if self
            .blocking(move |s| s.destroy_vm_drives(&doomed))
            .await
            .is_ok()
        {
            // The catalog still has it otherwise: so does the map.
            self.owners.forget(name);
            self.forget_grants(name);
        }
        self.remove_console(name);
    }

    /// A VM's console log and its previous half.
    fn remove_console(&self, name: &str) {
        let log = self.console_log(name);
        let _ = std::fs::remove_file(nexus_vmm::console::older(&log));
        let _ = std::fs::remove_file(log);
    }

    fn console_log(&self, name: &str) -> PathBuf {
        self.config
            .state_dir
            .join("logs")
            .join(format!("{name}.console"))
    }

    async fn boot(&self, name: &str) -> Result<()> {
        let vmm = self
            .vmm
            .as_ref()
            .map_err(|why| DaemonError::NoBackend(why.clone()))?;
        let owned = name.to_owned();
        let (drives, config) = self
            .blocking(move |s| Ok((s.vm_drives(&owned)?, s.vm_config(&owned)?)))
            .await?;
        let config: VmConfig = serde_json::from_str(&config)
            .map_err(|e| DaemonError::Internal(format!("VM config: {e}")))?;
        let size = (config.vcpus, u64::from(config.memory_mib));
        let booking = self.book(name, size).await?;
        let image_name = drives.image.clone();
        let image = self
            .blocking(move |s| s.image(&image_name))
            .await?
            .ok_or_else(|| DaemonError::Storage(StorageError::NoImage(drives.image.clone())))?;
        let manifest: Manifest =
            serde_json::from_str(&image.manifest).map_err(|e| DaemonError::BadImage {
                image: image.name.clone(),
                why: e.to_string(),
            })?;
        let mut spec = VmSpec::new(name, manifest.boot_kernel(&image.path));
        spec.initrd = manifest.initrd(&image.path);
        spec.cmdline = manifest.boot.cmdline.clone();
        spec.acpi = manifest.boot.acpi;
        spec.vcpus = config.vcpus;
        spec.memory_mib = config.memory_mib;
        spec.drives = vec![
            Drive {
                path: drives.root,
                read_only: false,
            },
            Drive {
                path: drives.workspace,
                read_only: false,
            },
        ];
        spec.console_log = self.console_log(name);
        spec.ready_timeout = Duration::from_secs(120);
        // A destroy asked for meanwhile ends the boot (the start future,
        // dropped, kills what it launched).
        let started = tokio::select! {
            started = vmm.start(spec) => started,
            () = self.destroy_asked(name).wait() => {
                return Err(DaemonError::Destroying(name.to_owned()));
            }
        };
        let vm = match started {
            Ok(vm) => vm,
            Err(e) => {
                self.emit(
                    VmEvent::new(
                        name,
                        EventKind::BootFailed,
                        format!("VM {name} did not boot: {e}"),
                    )
                    .with_console(&nexus_vmm::console::tail(
                        &self.console_log(name),
                        events::CONSOLE_LINES,
                        true,
                    )),
                );
                return Err(e.into());
            }
        };
        let ready_ms = vm.ready_after().as_millis();
        self.run(name, vm, trusted_tools(&manifest), size).await;
        // Counted as running from here.
        drop(booking);
        // Returns with the VM's tools listable (a guest that does not
        // answer shows as unresponsive; the VM runs all the same).
        if let Err(e) = self.guests.session(name, crate::guest::CALL_WAIT).await {
            tracing::warn!(vm = name, error = %e, "a new VM's tools are not reachable yet");
        }
        self.emit(VmEvent::new(
            name,
            EventKind::Started,
            format!("VM {name} started, ready in {ready_ms} ms"),
        ));
        Ok(())
    }
}

/// Images built into `<state>/images/<name>` (scripts/run-nexusd.sh does)
/// are imported into the pool once.
async fn import_built_images(storage: &Arc<Storage>, dir: &std::path::Path) -> anyhow::Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !path.join("manifest.json").is_file() || validate_name("image", &name).is_err() {
            continue;
        }
        let storage = storage.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            if storage.image(&name)?.is_none() {
                tracing::info!(image = name, from = %path.display(), "importing image");
                if let Err(e) = storage.import_image(&name, &path) {
                    tracing::warn!(image = name, error = %e, "could not import image");
                }
            }
            Ok(())
        })
        .await??;
    }
    Ok(())
}

/// The guest tools an image recorded at build time (see `guest::checks`).
fn trusted_tools(manifest: &Manifest) -> Option<Vec<rmcp::model::Tool>> {
    let recorded = manifest.guest_tools.as_ref()?;
    let tools: Vec<rmcp::model::Tool> = recorded
        .iter()
        .filter_map(|t| serde_json::from_value(t.clone()).ok())
        .collect();
    (!tools.is_empty()).then_some(tools)
}

/// Storage's "VM/SNAPSHOT" reference as its two names.
pub fn split_reference(reference: Option<&str>) -> (Option<&str>, Option<&str>) {
    match reference.and_then(|r| r.split_once('/')) {
        Some((vm, snapshot)) => (Some(vm), Some(snapshot)),
        None => (None, None),
    }
}

fn console_log_path(state_dir: &std::path::Path, name: &str) -> PathBuf {
    state_dir.join("logs").join(format!("{name}.console"))
}

/// A booting VM's hold on the host's limits; released when dropped.
struct Booking<'a> {
    daemon: &'a Daemon,
    name: String,
}

impl Drop for Booking<'_> {
    fn drop(&mut self) {
        lock_std(&self.daemon.booting).remove(&self.name);
    }
}

fn lock_std<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
