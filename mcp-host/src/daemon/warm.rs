//! The warm pool: VMs booted ahead of need, per image and shape (vCPUs,
//! memory, workspace size), owned by no one and shown to no client. A
//! spawn of a pooled shape takes one over: its workspace (blank already,
//! or a snapshot's put in place while its guest lets go of /workspace,
//! as a restore does), its name, its owner; it is used once and never
//! goes back. One task refills the pools, one boot at a time so that
//! clients are never starved of CPU by spares. Spares count against the
//! host's limits from their boot's booking until they are stopped or
//! become a client's VM, and a client's VM that would not fit otherwise
//! evicts them. A spare that dies is replaced; an image replaced or
//! deleted drains its pools. Spares run apart (`run-warm/`), are never
//! adopted, and none outlives nexusd.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use nexus_storage::{VmAttrs, WarmDrives};
use nexus_vmm::Vm;
use rmcp::service::RunningService;
use rmcp::{RoleClient, ServiceExt};

use super::hooks::{control_call, handshake};
use super::spawn::{manifest_of, trusted_tools, vm_spec};
use super::{Daemon, DaemonError, EventKind, Result, VmEvent, admission, lock_std};
use crate::config::WarmPoolConfig;
use crate::guest::GuestSession;

/// Where spares' run directories are, under the state directory.
pub(super) const RUN_DIR: &str = "run-warm";
/// Where spares' console logs are, under the state directory.
pub(super) const CONSOLE_DIR: &str = "logs/warm";
/// How long a pooled VM's guest has to let go of /workspace or mount it.
const GUEST_STEP_TIMEOUT: Duration = Duration::from_secs(20);
/// What marks a spare's booking (never a VM name).
pub(super) const SPARE_SUFFIX: &str = " (pooled)";
/// The longest wait between refill attempts after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// What a pooled VM is: what a spawn must ask for to take it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Shape {
    pub image: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub workspace_bytes: u64,
}

impl Shape {
    fn of(pool: &WarmPoolConfig) -> Self {
        Self {
            image: pool.image.clone(),
            vcpus: pool.vcpus,
            memory_mib: pool.memory_mib,
            workspace_bytes: pool.workspace_gib << 30,
        }
    }
}

/// A booted spare, with its guest sessions open already (the handshakes
/// are not its user's wait).
pub(super) struct Pooled {
    shape: Shape,
    drives: WarmDrives,
    vm: Vm,
    tools: Option<Vec<rmcp::model::Tool>>,
    /// Its guest tools' session.
    session: Option<Arc<GuestSession>>,
    /// Its guest's control channel, for a snapshot's workspace.
    control: Option<RunningService<RoleClient, ()>>,
}

/// A spare taken for one new VM (its room still counted as a spare's
/// until it is booked as the VM's, or stopped).
pub(super) struct Prepared {
    spare: Pooled,
    /// Its workspace is not the blank one any more.
    changed: bool,
    started: Instant,
}

impl Prepared {
    pub fn shape(&self) -> &Shape {
        &self.spare.shape
    }
}

/// A control call to a spare's guest, within [`GUEST_STEP_TIMEOUT`].
async fn guest_step(
    spare: &Pooled,
    tool: &'static str,
    args: serde_json::Value,
) -> std::result::Result<(), String> {
    let client = spare
        .control
        .as_ref()
        .ok_or_else(|| format!("{tool}: no control session"))?;
    control_call(client, tool, args, GUEST_STEP_TIMEOUT)
        .await
        .map_err(|why| format!("{tool}: {why}"))
}

/// A session with a VM's guest control channel.
async fn control_session(
    label: &str,
    vm: &Vm,
) -> std::result::Result<RunningService<RoleClient, ()>, String> {
    let stream = vm
        .connect(nexus_vmm::GUEST_CONTROL_PORT)
        .await
        .map_err(|e| e.to_string())?;
    handshake(label, ().serve(stream))
        .await
        .map_err(|e| e.to_string())
}

/// What [`Daemon::claim_spare`] did.
pub(super) enum Claim<'a> {
    /// VM is made and runs.
    Taken,
    /// Nothing: the caller boots one, still holding `creating`.
    None(tokio::sync::MutexGuard<'a, ()>),
}

/// The pools' state.
#[derive(Default)]
pub(super) struct Warm {
    pools: Vec<WarmPoolConfig>,
    /// Where spares boot (run directories of their own).
    vmm: Option<nexus_vmm::Vmm>,
    ready: std::sync::Mutex<Vec<Pooled>>,
    /// Spares taken for a new VM, by id: their room, still held.
    taken: std::sync::Mutex<std::collections::HashMap<String, (u32, u64)>>,
    /// The shape being booted now, if one is (its room is booked).
    booting: std::sync::Mutex<Option<Shape>>,
    wake: Arc<tokio::sync::Notify>,
    /// Bumped to give up the spare's boot under way (a client's VM
    /// needs its room, nexusd stops, its image changed).
    give_up: tokio::sync::watch::Sender<u64>,
    /// Bumped by every drain: a spare booted across one is not kept.
    drains: AtomicU64,
    next_id: AtomicU64,
    closing: AtomicBool,
}

impl Warm {
    pub fn new(pools: Vec<WarmPoolConfig>, vmm: Option<nexus_vmm::Vmm>) -> Self {
        Self {
            pools,
            vmm,
            ..Self::default()
        }
    }

    pub fn enabled(&self) -> bool {
        !self.pools.is_empty()
    }

    /// What ready and taken spares hold: (vCPUs, MiB) each (a booting one
    /// is booked like any boot).
    pub fn sizes(&self) -> Vec<(u32, u64)> {
        // Both held: a spare moving between them is counted once.
        let ready = lock_std(&self.ready);
        let taken = lock_std(&self.taken);
        ready
            .iter()
            .map(|p| (p.shape.vcpus, u64::from(p.shape.memory_mib)))
            .chain(taken.values().copied())
            .collect()
    }

    /// Spares ready, taken or booting.
    pub fn count(&self) -> usize {
        let ready = lock_std(&self.ready);
        let taken = lock_std(&self.taken);
        ready.len() + taken.len() + usize::from(lock_std(&self.booting).is_some())
    }

    /// Takes a live spare of `shape`, if there is one; its room stays
    /// counted (as taken).
    fn take(&self, shape: &Shape) -> Option<Pooled> {
        let mut ready = lock_std(&self.ready);
        let at = ready
            .iter()
            .position(|p| &p.shape == shape && p.vm.exit_status().is_none())?;
        let spare = ready.remove(at);
        lock_std(&self.taken).insert(
            spare.drives.id.clone(),
            (spare.shape.vcpus, u64::from(spare.shape.memory_mib)),
        );
        Some(spare)
    }

    /// Puts a taken spare back; gives it back (to be stopped) if its pool
    /// is full meanwhile or nexusd is stopping.
    fn put_back(&self, spare: Pooled) -> Option<Pooled> {
        let mut ready = lock_std(&self.ready);
        let size = self
            .pools
            .iter()
            .find(|p| Shape::of(p) == spare.shape)
            .map_or(0, |p| p.size as usize);
        let have = ready.iter().filter(|p| p.shape == spare.shape).count();
        if have >= size || self.closing.load(Ordering::SeqCst) {
            return Some(spare);
        }
        lock_std(&self.taken).remove(&spare.drives.id);
        ready.push(spare);
        None
    }

    /// Taken spare `id` became a client's VM (booked as such).
    pub fn taken_over(&self, id: &str) {
        lock_std(&self.taken).remove(id);
    }

    /// Per pool: (config, ready, booting).
    pub fn status(&self) -> Vec<(WarmPoolConfig, u32, bool)> {
        let ready = lock_std(&self.ready);
        let booting = lock_std(&self.booting);
        self.pools
            .iter()
            .map(|pool| {
                let shape = Shape::of(pool);
                let n = ready.iter().filter(|p| p.shape == shape).count() as u32;
                (pool.clone(), n, booting.as_ref() == Some(&shape))
            })
            .collect()
    }
}

impl Daemon {
    /// Starts the refill task, if any pool is configured.
    pub(super) fn start_warm_pools(self: &Arc<Self>) {
        if !self.warm.enabled() || self.warm.vmm.is_none() {
            return;
        }
        for pool in &self.warm.pools {
            if u64::from(pool.memory_mib) > self.limits.max_memory_mib
                || pool.vcpus > self.limits.max_vcpus
            {
                tracing::warn!(
                    image = pool.image,
                    vcpus = pool.vcpus,
                    memory_mib = pool.memory_mib,
                    "a [[warm_pool]] shape exceeds the host's limits: it stays empty"
                );
            }
        }
        tokio::spawn(refill(Arc::downgrade(self)));
    }

    /// Stops refilling and stops every spare (shutdown).
    pub(super) async fn close_warm_pools(&self) {
        self.warm.closing.store(true, Ordering::SeqCst);
        self.warm.give_up.send_modify(|n| *n += 1);
        let spares: Vec<Pooled> = lock_std(&self.warm.ready).drain(..).collect();
        for spare in spares {
            self.discard(spare).await;
        }
    }

    /// Stops a spare and removes its drives and console; its room is
    /// free.
    async fn discard(&self, spare: Pooled) {
        let id = spare.drives.id.clone();
        let console = spare.vm.console_log();
        spare.vm.kill().await;
        lock_std(&self.warm.taken).remove(&id);
        let _ = std::fs::remove_file(nexus_vmm::console::older(&console));
        let _ = std::fs::remove_file(&console);
        let drives = spare.drives;
        if let Err(e) = self.blocking(move |s| s.discard_warm_drives(&drives)).await {
            tracing::warn!(error = %e, "could not remove a pooled VM's drives");
        }
    }

    /// [`Daemon::discard`] in the background (the caller holds a lock
    /// others wait on).
    fn discard_later(&self, spare: Pooled) {
        if let Some(me) = self.me.upgrade() {
            tokio::spawn(async move { me.discard(spare).await });
        }
    }

    /// Stops one spare, or the boot of one, to make room for a client's
    /// VM; false if there was none.
    pub(super) async fn evict_warm(&self) -> bool {
        let spare = lock_std(&self.warm.ready).pop();
        if let Some(spare) = spare {
            tracing::info!(
                image = spare.shape.image,
                "stopping a pooled VM to make room for a client's VM"
            );
            self.discard(spare).await;
            return true;
        }
        if lock_std(&self.warm.booting).is_none() {
            return false;
        }
        tracing::info!("giving up a pooled VM's boot to make room for a client's VM");
        self.warm.give_up.send_modify(|n| *n += 1);
        // Its room is free once its boot has let go of it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while lock_std(&self.warm.booting).is_some() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        lock_std(&self.warm.booting).is_none()
    }

    /// Drains the pools of `image` (replaced or deleted), and gives up a
    /// spare's boot under way: the refill boots its new version, if it
    /// still exists.
    pub(super) async fn drain_warm(&self, image: &str) {
        if !self.warm.enabled() {
            return;
        }
        self.warm.drains.fetch_add(1, Ordering::SeqCst);
        if lock_std(&self.warm.booting)
            .as_ref()
            .is_some_and(|s| s.image == image)
        {
            self.warm.give_up.send_modify(|n| *n += 1);
        }
        let drained: Vec<Pooled> = {
            let mut ready = lock_std(&self.warm.ready);
            let (gone, kept) = ready.drain(..).partition(|p| p.shape.image == image);
            *ready = kept;
            gone
        };
        if !drained.is_empty() {
            tracing::info!(
                image,
                count = drained.len(),
                "image changed: its pooled VMs are replaced"
            );
        }
        for spare in drained {
            self.discard(spare).await;
        }
        self.warm.wake.notify_one();
    }

    /// A spare of `shape` for a new VM, if one is ready, with the
    /// workspace of `from_snapshot` put in place (else the blank one it
    /// booted with). None: no spare of it, or it could not take the
    /// workspace (logged; discarded): the caller boots one. Done before
    /// the caller takes `creating`: several spares take their workspaces
    /// at once.
    pub(super) async fn prepare_spare(
        &self,
        shape: &Shape,
        from_snapshot: Option<&(String, String)>,
    ) -> Option<Prepared> {
        let taken = self.take_spare(shape)?;
        match from_snapshot {
            None => Some(taken),
            Some((vm, snapshot)) => {
                let released = self.release_spare(taken).await?;
                self.fill_spare(released, vm, snapshot).await
            }
        }
    }

    /// A ready spare of `shape`, taken out of its pool.
    pub(super) fn take_spare(&self, shape: &Shape) -> Option<Prepared> {
        if !self.warm.pools.iter().any(|p| &Shape::of(p) == shape) {
            return None;
        }
        let started = Instant::now();
        let taken = self.warm.take(shape);
        self.warm.wake.notify_one();
        let Some(spare) = taken else {
            self.metrics.record_warm_claim(false);
            return None;
        };
        Some(Prepared {
            spare,
            changed: false,
            started,
        })
    }

    /// The spare's guest lets go of its blank /workspace (which may go
    /// on while the snapshot it will hold is taken).
    pub(super) async fn release_spare(&self, mut taken: Prepared) -> Option<Prepared> {
        taken.changed = true;
        let released = async {
            if taken.spare.control.is_none() {
                taken.spare.control =
                    Some(control_session(&taken.spare.drives.id, &taken.spare.vm).await?);
            }
            guest_step(&taken.spare, "unmount", serde_json::json!({"force": true})).await
        }
        .await;
        match released {
            Ok(()) => Some(taken),
            Err(why) => {
                self.spare_failed(taken, why).await;
                None
            }
        }
    }

    /// Puts the workspace of snapshot `snapshot` of `vm` on a released
    /// spare's drive, in place, and its guest mounts it.
    pub(super) async fn fill_spare(
        &self,
        mut released: Prepared,
        vm: &str,
        snapshot: &str,
    ) -> Option<Prepared> {
        let filled = async {
            let (drives, from, snap) = (
                released.spare.drives.clone(),
                vm.to_owned(),
                snapshot.to_owned(),
            );
            self.blocking(move |s| s.warm_workspace_from(&drives, &from, &snap))
                .await
                .map_err(|e| e.to_string())?;
            guest_step(&released.spare, "mount", serde_json::json!({})).await
        }
        .await;
        match filled {
            Ok(()) => {
                // The control session served its purpose.
                released.spare.control = None;
                Some(released)
            }
            Err(why) => {
                self.spare_failed(released, why).await;
                None
            }
        }
    }

    async fn spare_failed(&self, taken: Prepared, why: String) {
        tracing::warn!(
            why,
            "a pooled VM could not take a snapshot's workspace; booting one instead"
        );
        self.metrics.record_warm_claim(false);
        self.discard(taken.spare).await;
    }

    /// A prepared spare not taken after all (the new VM was refused): a
    /// blank one goes back to its pool (unless it is full), one that took
    /// a workspace goes.
    pub(super) async fn unprepare(&self, prepared: Prepared) {
        if prepared.changed {
            self.discard(prepared.spare).await;
        } else if let Some(spare) = self.warm.put_back(prepared.spare) {
            self.discard(spare).await;
        }
    }

    /// Makes new VM `name` of a prepared spare, recorded with `config`,
    /// `owner` and `base` (the snapshot its workspace came from), and
    /// returns once its tools are listable. The caller holds `creating`
    /// and VM `name`'s lock, and has admitted the VM and its workspace;
    /// the owner's running quota is checked here. `Claim::None`: it could
    /// not be taken (logged; it is discarded): the caller boots one.
    pub(super) async fn claim_spare<'a>(
        &self,
        creating: tokio::sync::MutexGuard<'a, ()>,
        prepared: Prepared,
        name: &str,
        config: &str,
        owner: Option<&str>,
        base: Option<String>,
    ) -> Result<Claim<'a>> {
        let size = (
            prepared.spare.shape.vcpus,
            u64::from(prepared.spare.shape.memory_mib),
        );
        // Its owner from now: a concurrent booking of the owner's counts it.
        self.owners.set(name, owner.map(str::to_owned));
        // Counted from here as the client's VM, no longer as a spare;
        // refused if its owner may not run one more.
        let booking = match self
            .book_claimed(name, owner, size, &prepared.spare.drives.id)
            .await
        {
            Ok(booking) => booking,
            Err(e) => {
                self.owners.forget(name);
                self.unprepare(prepared).await;
                return Err(e);
            }
        };
        let Prepared {
            mut spare, started, ..
        } = prepared;
        let missed = |why: String| {
            tracing::warn!(
                vm = name,
                why,
                "a pooled VM could not be taken; booting one instead"
            );
            self.metrics.record_warm_claim(false);
            self.owners.forget(name);
        };
        let run_root = self.config.state_dir.join("run");
        if let Err(e) = spare.vm.rename(name, &run_root, &self.console_log(name)) {
            missed(e.to_string());
            self.discard_later(spare);
            return Ok(Claim::None(creating));
        }
        let (drives, vm, config, who) = (
            spare.drives.clone(),
            name.to_owned(),
            config.to_owned(),
            owner.map(str::to_owned),
        );
        let adopted = self
            .blocking(move |s| {
                let attrs = VmAttrs {
                    config: &config,
                    owner: who.as_deref(),
                };
                s.adopt_warm_drives(&drives, &vm, base.as_deref(), attrs)
            })
            .await;
        if let Err(e) = adopted {
            missed(format!("its drives: {e}"));
            self.discard_later(spare);
            return Ok(Claim::None(creating));
        }
        // It exists in the catalog: other spawns count it from here.
        drop(creating);
        self.metrics.record_warm_claim(true);
        spare.vm.set_ready_after(started.elapsed());
        let session = spare.session.take();
        self.run_with(name, spare.vm, spare.tools, size, session)
            .await;
        drop(booking);
        self.give_network(name, true).await;
        if let Err(e) = self.guests.session(name, crate::guest::CALL_WAIT).await {
            tracing::warn!(vm = name, error = %e, "a new VM's tools are not reachable yet");
        }
        let took = started.elapsed().as_millis();
        self.emit(VmEvent::new(
            name,
            EventKind::Started,
            format!("VM {name} started from the warm pool in {took} ms"),
        ));
        Ok(Claim::Taken)
    }

    /// Boots one spare of `pool` into its pool.
    async fn boot_spare(&self, pool: &WarmPoolConfig) -> Result<()> {
        let vmm = self
            .warm
            .vmm
            .as_ref()
            .ok_or_else(|| DaemonError::NoBackend("no VMM for pooled VMs".into()))?;
        let shape = Shape::of(pool);
        let id = format!("pool-{}", self.warm.next_id.fetch_add(1, Ordering::Relaxed));
        // Subscribed before it books: no give-up after that is missed.
        let mut give_up = self.warm.give_up.subscribe();
        let drains = self.warm.drains.load(Ordering::SeqCst);
        // Pooled VMs count as VMs that exist: spares never take the last
        // places from clients.
        let existing = self.blocking(|s| s.list_vms()).await?.len() + self.warm.count();
        admission::admit_new(&self.limits, existing as u32)?;
        // Marked before it books: an eviction sees it from then on.
        *lock_std(&self.warm.booting) = Some(shape.clone());
        let size = (shape.vcpus, u64::from(shape.memory_mib));
        let booking = match self.book_spare(&id, size).await {
            Ok(booking) => booking,
            Err(e) => {
                *lock_std(&self.warm.booting) = None;
                return Err(e);
            }
        };
        let (image, wid, bytes) = (shape.image.clone(), id.clone(), shape.workspace_bytes);
        let drives = match self
            .blocking(move |s| s.make_warm_drives(&wid, &image, bytes))
            .await
        {
            Ok(drives) => drives,
            Err(e) => {
                drop(booking);
                *lock_std(&self.warm.booting) = None;
                return Err(e);
            }
        };
        let console = self.warm_console_log(&id);
        let booted = async {
            let image_name = shape.image.clone();
            let image = self
                .blocking(move |s| {
                    s.image(&image_name)?
                        .ok_or(nexus_storage::StorageError::NoImage(image_name))
                })
                .await?;
            let manifest = manifest_of(&image)?;
            let spec = vm_spec(
                &id,
                &manifest,
                &image.path,
                (drives.root.clone(), drives.workspace.clone()),
                (shape.vcpus, shape.memory_mib),
                console.clone(),
            );
            let tools = trusted_tools(&manifest);
            // Given up, the start future is dropped: it kills what it
            // launched.
            let ready = async {
                let vm = vmm.start(spec).await?;
                let guest = |why: String| DaemonError::Guest {
                    vm: id.clone(),
                    why,
                };
                let session = crate::guest::open_session(&id, vm.endpoint(), tools.clone())
                    .await
                    .map_err(guest)?;
                let control = control_session(&id, &vm).await.map_err(guest)?;
                Ok::<_, DaemonError>((vm, session, control))
            };
            let (vm, session, control) = tokio::select! {
                ready = ready => ready?,
                _ = give_up.changed() => {
                    return Err(DaemonError::Refused("given up: its room was needed, or its image changed".into()));
                }
            };
            Ok::<_, DaemonError>((vm, tools, session, control))
        }
        .await;
        let (vm, tools, session, control) = match booted {
            Ok(booted) => booted,
            Err(e) => {
                drop(booking);
                *lock_std(&self.warm.booting) = None;
                let _ = std::fs::remove_file(nexus_vmm::console::older(&console));
                let _ = std::fs::remove_file(&console);
                let _ = self.blocking(move |s| s.discard_warm_drives(&drives)).await;
                return Err(e);
            }
        };
        let spare = Pooled {
            shape,
            drives,
            vm,
            tools,
            session: Some(session),
            control: Some(control),
        };
        tracing::debug!(
            image = spare.shape.image,
            ready_ms = spare.vm.ready_after().as_millis() as u64,
            "pooled VM ready"
        );
        // Kept only if nothing changed meanwhile; into the pool while its
        // booking still counts it (never counted nowhere).
        let stale = self.warm.closing.load(Ordering::SeqCst)
            || self.warm.drains.load(Ordering::SeqCst) != drains;
        if stale {
            // Counted as taken until it is stopped.
            lock_std(&self.warm.taken).insert(
                spare.drives.id.clone(),
                (spare.shape.vcpus, u64::from(spare.shape.memory_mib)),
            );
            drop(booking);
            *lock_std(&self.warm.booting) = None;
            self.discard(spare).await;
        } else {
            lock_std(&self.warm.ready).push(spare);
            drop(booking);
            *lock_std(&self.warm.booting) = None;
        }
        Ok(())
    }

    /// A spare's console, apart from any VM's (a VM may be named `pool-1`).
    fn warm_console_log(&self, id: &str) -> std::path::PathBuf {
        self.config
            .state_dir
            .join(CONSOLE_DIR)
            .join(format!("{id}.console"))
    }

    /// Spares whose VM died, taken out.
    fn dead_spares(&self) -> Vec<Pooled> {
        let mut ready = lock_std(&self.warm.ready);
        let (dead, alive) = ready
            .drain(..)
            .partition(|p: &Pooled| p.vm.exit_status().is_some());
        *ready = alive;
        dead
    }

    fn clients_booting(&self) -> bool {
        lock_std(&self.booting)
            .keys()
            .any(|k| !k.ends_with(SPARE_SUFFIX))
    }

    /// The pools short of their size, by index.
    fn short_pools(&self) -> Vec<usize> {
        let ready = lock_std(&self.warm.ready);
        self.warm
            .pools
            .iter()
            .enumerate()
            .filter(|(_, pool)| {
                let shape = Shape::of(pool);
                (ready.iter().filter(|p| p.shape == shape).count() as u32) < pool.size
            })
            .map(|(i, _)| i)
            .collect()
    }
}

/// When a pool may be tried again after failing, and how long it waits
/// after its next failure.
#[derive(Clone, Copy)]
struct Retry {
    at: Instant,
    backoff: Duration,
}

/// Keeps the pools full, one boot at a time, until the daemon goes. A
/// pool that cannot boot (its image gone, its shape too big for what is
/// free) backs off alone: the others go on.
async fn refill(daemon: Weak<Daemon>) {
    let first = Duration::from_secs(1);
    let mut retries: Vec<Retry> = Vec::new();
    loop {
        let Some(me) = daemon.upgrade() else { return };
        if me.warm.closing.load(Ordering::SeqCst) {
            return;
        }
        let now = Instant::now();
        retries.resize(
            me.warm.pools.len(),
            Retry {
                at: now,
                backoff: first,
            },
        );
        for dead in me.dead_spares() {
            tracing::warn!(
                image = dead.shape.image,
                exit = dead.vm.exit_status().unwrap_or_default(),
                "a pooled VM died; it is replaced"
            );
            // Counted as taken until it is stopped.
            lock_std(&me.warm.taken).insert(
                dead.drives.id.clone(),
                (dead.shape.vcpus, u64::from(dead.shape.memory_mib)),
            );
            me.discard(dead).await;
        }
        let short = me.short_pools();
        let due = short.iter().copied().find(|&i| retries[i].at <= now);
        let wait = match due {
            None => short
                .iter()
                .map(|&i| retries[i].at.saturating_duration_since(now))
                .min()
                .unwrap_or(Duration::from_secs(2))
                .max(Duration::from_millis(50)),
            // Clients' boots first: a spare waits for them to finish.
            Some(_) if me.clients_booting() => Duration::from_millis(200),
            Some(i) => {
                let pool = me.warm.pools[i].clone();
                match me.boot_spare(&pool).await {
                    Ok(()) => {
                        retries[i].backoff = first;
                        continue;
                    }
                    // A full host (or a boot given up) is no fault: it
                    // waits for room, at a steady pace.
                    Err(e @ DaemonError::Refused(_)) => {
                        tracing::debug!(image = pool.image, error = %e, "a pooled VM did not boot");
                        retries[i].at = Instant::now() + first;
                        Duration::ZERO
                    }
                    Err(e) => {
                        let backoff = retries[i].backoff;
                        tracing::warn!(image = pool.image, error = %e, retry_in = ?backoff, "could not boot a pooled VM");
                        retries[i] = Retry {
                            at: Instant::now() + backoff,
                            backoff: (backoff * 2).min(MAX_BACKOFF),
                        };
                        Duration::ZERO
                    }
                }
            }
        };
        let wake = me.warm.wake.clone();
        drop(me);
        if !wait.is_zero() {
            let _ = tokio::time::timeout(wait, wake.notified()).await;
        }
    }
}
