//! The daemon's core: VMs made of storage (drives) and vmm (processes).
//! MCP handlers call this and only translate.
//!
//! By concern: `spawn` (making VMs and booting them), `lifecycle`
//! (running, start, stop, destroy), `snapshots`, `recovery` (what a
//! previous nexusd left), `hooks` (the guest's part in snapshots and
//! rollbacks), `access` (roles, grants and the one decision before every
//! call), `owners`, `quota`, `tokens`, `audit`, `events`, `admission`
//! (the host's limits). This file: the daemon's state, its opening, and
//! what the tools read.

mod access;
pub mod admission;
pub mod audit;
mod egress;
mod events;
mod fork;
mod hooks;
mod images;
mod lifecycle;
mod owners;
mod pause;
pub mod quota;
mod recovery;
mod secrets;
mod snapshots;
mod spawn;
mod status;
pub mod tokens;
mod warm;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Weak};

use nexus_storage::{Storage, StorageConfig, StorageError, validate_name};
use nexus_vmm::qemu::QemuBackend;
use nexus_vmm::{Vm, Vmm, VmmConfig, VmmError};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

pub use access::RoleView;
pub use events::{EventKind, Severity, VmEvent};
pub use fork::{Forked, MAX_FORKS};
pub use images::{ImageInput, ImageOutcome};
pub use quota::QuotaConfig;
pub use secrets::SecretInfo;

use crate::Config;
use crate::guest::{Guests, ToolsChanged};
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
    /// A build or import that could not be done (told whole: only
    /// admins build and import).
    #[error("image {image:?} could not be made: {why}")]
    Image { image: String, why: String },
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
    /// Its own egress allowlist, narrowing its owner's role's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    egress: Option<Vec<String>>,
}

pub use nexus_types::VmInfo;

/// What `spawn_vm` asks for; every field has a default.
#[derive(Debug, Clone, Default)]
pub struct SpawnRequest {
    pub name: Option<String>,
    pub image: Option<String>,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u32>,
    pub workspace_gib: Option<u64>,
    /// Its own egress allowlist, narrowing its owner's role's.
    pub egress: Option<Vec<String>>,
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
    /// Its egress proxy, stopped with this entry.
    _egress: Option<egress::EgressTask>,
    /// Its guest's control session, kept open between uses (each call
    /// still has its own deadline).
    control: Arc<std::sync::Mutex<Option<Control>>>,
}

/// A session with a VM guest's control channel.
type Control = Arc<rmcp::service::RunningService<rmcp::RoleClient, ()>>;

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
    /// Fires whenever the set of running VMs (and so of proxied tools),
    /// or who may reach them, changes.
    changes: tokio::sync::broadcast::Sender<ToolsChanged>,
    /// What happens to VMs, for clients that listen (MCP log messages).
    events: tokio::sync::broadcast::Sender<VmEvent>,
    me: Weak<Daemon>,
    /// What the host may hold, and the VMs booting (not yet running) that
    /// count against it already.
    limits: admission::Limits,
    booting: std::sync::Mutex<HashMap<String, (u32, u64)>>,
    /// Held while counting VMs and making a new one's drives.
    creating: Mutex<()>,
    /// Held by an image build, import or delete.
    image_ops: Mutex<()>,
    /// VMs' own egress allowlists (those that narrowed their role's).
    egress_own: std::sync::Mutex<HashMap<String, crate::egress::Allowlist>>,
    egress_settings: crate::egress::Settings,
    egress_audit: egress::AuditBudget,
    /// Secrets, compiled, by the VMs granted them.
    secrets: std::sync::Mutex<secrets::Table>,
    /// Held by a secret's change from its write to its reload.
    secret_changes: Mutex<()>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Spare VMs, booted ahead of need.
    warm: warm::Warm,
    /// When this nexusd opened its state (for status).
    started_at: std::time::SystemTime,
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
        recovery::import_built_images(&storage, &config.images_dir()).await?;
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
        let running = recovery::adopt_leftovers(&config, &storage, &vmm).await?;
        let warm_pools = config.warm_pools.clone();
        // Spares run apart: never adopted, never taken for a VM's leftovers.
        let warm_vmm = vmm
            .as_ref()
            .ok()
            .map(|vmm| vmm.with_run_root(config.state_dir.join(warm::RUN_DIR)));
        let changes = tokio::sync::broadcast::channel(16).0;
        let audit_writer = audit::writer(storage.clone());
        let egress_settings = crate::egress::Settings {
            allow_loopback: config.egress.allow_loopback_upstreams,
            hosts: config
                .egress
                .hosts
                .iter()
                .map(|(name, addrs)| (name.to_ascii_lowercase(), addrs.clone()))
                .collect(),
            authority: Some(Arc::new(
                crate::egress::ca::Authority::load_or_create(&config.state_dir.join("egress-ca"))
                    .map_err(|e| anyhow::anyhow!(e))?,
            )),
            upstream_tls: Some(
                crate::egress::ca::upstream_config(&config.egress.upstream_ca_files)
                    .map_err(|e| anyhow::anyhow!(e))?,
            ),
            ..crate::egress::Settings::default()
        };
        if egress_settings.allow_loopback {
            tracing::warn!(
                "[egress] allow_loopback_upstreams is set: VMs can reach this host's loopback services (tests only)"
            );
        }
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
            warm: warm::Warm::new(warm_pools, warm_vmm),
            me: me.clone(),
            limits: admission::Limits::resolve(&limits),
            started_at: std::time::SystemTime::now(),
            booting: std::sync::Mutex::default(),
            creating: Mutex::new(()),
            image_ops: Mutex::new(()),
            egress_own: std::sync::Mutex::default(),
            egress_settings,
            egress_audit: egress::AuditBudget::default(),
            secrets: std::sync::Mutex::default(),
            secret_changes: Mutex::new(()),
            _lock: lock,
        });
        daemon
            .reload_secrets()
            .await
            .map_err(|e| anyhow::anyhow!("reading secrets: {e}"))?;
        for (name, vm) in running {
            let tools = daemon.image_tools(&name).await;
            let size = daemon.size(&name).await;
            // One left paused gets its network settings when resumed.
            let paused = vm.is_paused();
            daemon.run(&name, vm, tools, size).await;
            if !paused {
                daemon.give_network(&name, false).await;
            }
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
        daemon.start_warm_pools();
        Ok(daemon)
    }

    /// The limits in force.
    pub fn limits(&self) -> &admission::Limits {
        &self.limits
    }

    /// How full the pool is.
    pub fn pool_space(&self) -> admission::PoolSpace {
        admission::pool_space(self.storage.pool().root())
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
        event.grantees = self.grantees(&event.vm);
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
        let warm: Vec<crate::metrics::WarmGauge> = self
            .warm
            .status()
            .into_iter()
            .map(|(p, ready, booting)| crate::metrics::WarmGauge {
                shape: format!("{}cpu-{}mib-{}gib", p.vcpus, p.memory_mib, p.workspace_gib),
                image: p.image,
                size: p.size,
                ready,
                booting,
            })
            .collect();
        self.metrics.render(
            running,
            total.saturating_sub(running),
            (pool.total_bytes, pool.free_bytes),
            &warm,
        )
    }

    /// Notified whenever VMs start or stop (or who reaches them changes),
    /// so sessions can tell their clients that the tool list changed.
    pub fn subscribe_changes(&self) -> tokio::sync::broadcast::Receiver<ToolsChanged> {
        self.changes.subscribe()
    }

    /// VM `vm`'s tools came or went: for those who reach it, its owner
    /// and grantees now (a destroyed VM's are forgotten soon after).
    fn changed(&self, vm: &str) {
        let mut also: Vec<String> = self.owner_of(vm).flatten().into_iter().collect();
        also.extend(self.grantees(vm));
        let _ = self.changes.send(ToolsChanged {
            vm: Some(vm.to_owned()),
            also,
        });
    }

    /// What a role allows changed: anyone may be told.
    fn roles_changed(&self) {
        let _ = self.changes.send(ToolsChanged {
            vm: None,
            also: Vec::new(),
        });
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
            egress: None,
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
            state: match vm {
                Some(vm) if vm.is_paused() => "paused",
                Some(_) => "running",
                None => "stopped",
            }
            .to_owned(),
            image: drives.image,
            image_digest: drives.image_digest,
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
            egress: config.egress,
            secrets: self.secrets_of(name),
        })
    }

    /// The last `lines` lines of a VM's serial console.
    pub async fn console(&self, name: &str, lines: usize) -> Result<String> {
        self.known(name).await?;
        Ok(nexus_vmm::console::tail_verbatim(
            &self.console_log(name),
            lines,
        ))
    }

    async fn known(&self, name: &str) -> Result<()> {
        validate_name("VM", name).map_err(StorageError::from)?;
        self.info(name).await.map(|_| ())
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

fn lock_std<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
