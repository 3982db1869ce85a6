//! Making VMs: spawn (blank, from a snapshot, from an image), fork, and
//! the boot they share, booked against the host's limits and the owner's
//! quota; a failure undoes what was made.

use std::time::Duration;

use nexus_rootfs::Manifest;
use nexus_storage::WorkspaceSource;
use nexus_vmm::{Drive, VmSpec};

use nexus_storage::{StorageError, VmAttrs, validate_name};

use super::{
    DEFAULT_IMAGE, Daemon, DaemonError, EventKind, MAX_WORKSPACE_GIB, Progress, Result,
    SpawnRequest, VmConfig, VmEvent, VmInfo, admission, events, lock_std,
};

impl Daemon {
    /// The vCPUs and memory VM `name` is configured with.
    pub(super) async fn size(&self, name: &str) -> (u32, u64) {
        let owned = name.to_owned();
        let config = self
            .blocking(move |s| s.vm_config(&owned))
            .await
            .ok()
            .and_then(|c| serde_json::from_str::<VmConfig>(&c).ok())
            .unwrap_or(VmConfig {
                vcpus: 1,
                memory_mib: 256,
                egress: None,
            });
        (config.vcpus, u64::from(config.memory_mib))
    }

    /// Whether one more VM may exist; the caller holds `creating`.
    pub(super) async fn admit_new(&self) -> Result<()> {
        let existing = self.blocking(|s| s.list_vms()).await?.len();
        admission::admit_new(&self.limits, existing as u32)
    }

    /// Counts a booting VM against the host's limits until it runs (or
    /// fails), if they admit it. Pooled VMs count too; with `evict`, as
    /// many as it takes make room (a client's VM comes before a spare).
    pub(super) async fn book(&self, name: &str, size: (u32, u64)) -> Result<Booking<'_>> {
        loop {
            match self.try_book(name, Some(name), size).await {
                Ok(booking) => return Ok(booking),
                // It would fit without spares: they give way, one by one.
                Err(Refusal::Spares(e)) => {
                    if !self.evict_warm().await {
                        return Err(e);
                    }
                }
                Err(Refusal::Other(e)) => return Err(e),
            }
        }
    }

    /// Counts a booting spare (a pooled VM, `id`) against the host's
    /// limits, if they admit it; no owner's, and it evicts nothing.
    pub(super) async fn book_spare(&self, id: &str, size: (u32, u64)) -> Result<Booking<'_>> {
        // Not a VM name: a spare never counts as a VM of the same name.
        self.try_book(&format!("{id}{}", super::warm::SPARE_SUFFIX), None, size)
            .await
            .map_err(Refusal::into_error)
    }

    /// Books `key`; `vm`: the VM it is, whose owner's quota applies.
    async fn try_book(
        &self,
        key: &str,
        vm: Option<&str>,
        (vcpus, memory_mib): (u32, u64),
    ) -> std::result::Result<Booking<'_>, Refusal> {
        // Both held at once: two bookings cannot each miss the other.
        let running = self.running.lock().await;
        let mut booting = lock_std(&self.booting);
        // The owner's quota first: spares give way only to a VM that may run.
        if let Some(vm) = vm {
            let owner = self.owner_of(vm).flatten();
            self.admit_owner_locked(
                owner.as_deref(),
                vm,
                (vcpus, memory_mib),
                &running,
                &booting,
            )
            .map_err(Refusal::Other)?;
        }
        let sum = |sizes: &mut dyn Iterator<Item = (u32, u64)>| {
            let mut used = admission::InUse::default();
            for (vcpus, memory_mib) in sizes {
                used.vms += 1;
                used.vcpus += vcpus;
                used.memory_mib += memory_mib;
            }
            used
        };
        let spare = |key: &String| key.ends_with(super::warm::SPARE_SUFFIX);
        let clients = |with_spares: bool| {
            running.values().map(|r| (r.vcpus, r.memory_mib)).chain(
                booting
                    .iter()
                    .filter(move |(key, _)| with_spares || !spare(key))
                    .map(|(_, size)| *size),
            )
        };
        let label = vm.unwrap_or("pooled");
        if let Err(e) = admission::admit_start(
            &self.limits,
            sum(&mut clients(true).chain(self.warm.sizes())),
            label,
            vcpus,
            memory_mib,
        ) {
            let without_spares = admission::admit_start(
                &self.limits,
                sum(&mut clients(false)),
                label,
                vcpus,
                memory_mib,
            );
            return Err(if vm.is_some() && without_spares.is_ok() {
                Refusal::Spares(e)
            } else {
                Refusal::Other(e)
            });
        }
        booting.insert(key.to_owned(), (vcpus, memory_mib));
        Ok(Booking {
            daemon: self,
            name: key.to_owned(),
        })
    }

    /// Whether `owner`'s quota lets VM `name` run, beside the owner's
    /// other VMs that run or boot.
    fn admit_owner_locked(
        &self,
        owner: Option<&str>,
        name: &str,
        (vcpus, memory_mib): (u32, u64),
        running: &std::collections::HashMap<String, super::Running>,
        booting: &std::collections::HashMap<String, (u32, u64)>,
    ) -> Result<()> {
        if let Some(who) = owner {
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
        Ok(())
    }

    /// Counts VM `name`, about to run, against the host's limits in place
    /// of taken spare `spare` (whose room it takes over: no check) and
    /// against `owner`'s quota (checked).
    pub(super) async fn book_claimed(
        &self,
        name: &str,
        owner: Option<&str>,
        size: (u32, u64),
        spare: &str,
    ) -> Result<Booking<'_>> {
        let running = self.running.lock().await;
        let mut booting = lock_std(&self.booting);
        self.admit_owner_locked(owner, name, size, &running, &booting)?;
        booting.insert(name.to_owned(), size);
        self.warm.taken_over(spare);
        Ok(Booking {
            daemon: self,
            name: name.to_owned(),
        })
    }

    /// Whether `owner` may run one more VM of `size` now (checked again
    /// when it is booked).
    pub(super) async fn admit_owner_running(
        &self,
        owner: Option<&str>,
        name: &str,
        size: (u32, u64),
    ) -> Result<()> {
        let running = self.running.lock().await;
        let booting = lock_std(&self.booting);
        self.admit_owner_locked(owner, name, size, &running, &booting)
    }

    /// The tools the image of VM `name` recorded, if it did.
    pub(super) async fn image_tools(&self, name: &str) -> Option<Vec<rmcp::model::Tool>> {
        let owned = name.to_owned();
        let image = self.blocking(move |s| s.vm_image(&owned)).await.ok()?;
        let manifest: Manifest = serde_json::from_str(&image.manifest).ok()?;
        trusted_tools(&manifest)
    }

    /// Creates a VM's drives and boots it; returns once its guest is ready.
    /// On any failure nothing of the VM remains.
    /// Runs to the end even if its caller goes (a client that
    /// disconnects): a spare half taken would be left behind otherwise.
    pub async fn spawn(&self, req: SpawnRequest, progress: Option<Progress>) -> Result<VmInfo> {
        let Some(me) = self.me.upgrade() else {
            return Err(DaemonError::Internal("nexusd is stopping".into()));
        };
        tokio::spawn(async move { me.spawn_with(req, progress, None).await })
            .await
            .map_err(|e| DaemonError::Internal(format!("spawn task: {e}")))?
    }

    /// [`Daemon::spawn`]; `given`: the spare to use, taken and prepared
    /// already (`Some(None)`: none, boot one), instead of looking for one.
    /// A given spare not used goes back (or, changed, goes).
    pub(super) async fn spawn_with(
        &self,
        req: SpawnRequest,
        progress: Option<Progress>,
        given: Option<Option<super::warm::Prepared>>,
    ) -> Result<VmInfo> {
        let look = given.is_none();
        let mut spare = given.flatten();
        let made = self.spawn_inner(req, progress, &mut spare, look).await;
        if let Some(unused) = spare {
            self.unprepare(unused).await;
        }
        made
    }

    /// [`Daemon::spawn_with`], taking the spare out of `spare` when it
    /// uses it; with `look`, looking for one itself.
    async fn spawn_inner(
        &self,
        req: SpawnRequest,
        progress: Option<Progress>,
        spare: &mut Option<super::warm::Prepared>,
        look: bool,
    ) -> Result<VmInfo> {
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
        let workspace = match req.from_snapshot.clone() {
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
        if let Some(patterns) = &req.egress {
            crate::egress::Allowlist::new(patterns)
                .map_err(|why| DaemonError::Invalid(format!("`egress`: {why}")))?;
        }
        let config = serde_json::to_string(&VmConfig {
            vcpus,
            memory_mib,
            egress: req.egress.clone(),
        })
        .map_err(|e| DaemonError::Internal(e.to_string()))?;
        let _op = self.lock_vm(&name).await;
        if self.info(&name).await.is_ok() {
            return Err(StorageError::VmExists(name).into());
        }
        let bytes = match &workspace {
            WorkspaceSource::New { bytes } => *bytes,
            WorkspaceSource::Snapshot { vm, snapshot } => {
                self.snapshot_workspace_bytes(vm, snapshot).await?
            }
        };
        let shape = super::warm::Shape {
            image: image.clone(),
            vcpus,
            memory_mib,
            workspace_bytes: bytes,
        };
        // What would refuse it is asked before a spare is touched (and
        // asked again under `creating`): a refused spawn uses up none.
        self.admit_new().await?;
        self.admit_owner_workspace(req.owner.as_deref(), bytes)
            .await?;
        self.admit_owner_running(req.owner.as_deref(), &name, (vcpus, u64::from(memory_mib)))
            .await?;
        // A given spare of another shape is not this VM's.
        if spare.as_ref().is_some_and(|s| s.shape() != &shape)
            && let Some(other) = spare.take()
        {
            self.unprepare(other).await;
        }
        // A spare of this shape takes its workspace before `creating`:
        // spawns of several at once do that side by side.
        if look {
            *spare = self.prepare_spare(&shape, req.from_snapshot.as_ref()).await;
        }
        {
            let creating = self.creating.lock().await;
            // Under `creating`: two spawns of one owner see each other.
            self.admit_new().await?;
            self.admit_owner_workspace(req.owner.as_deref(), bytes)
                .await?;
            let creating = match spare.take() {
                None => creating,
                Some(spare) => {
                    let base = req
                        .from_snapshot
                        .as_ref()
                        .map(|(vm, snapshot)| format!("{vm}/{snapshot}"));
                    let claimed = self
                        .claim_spare(creating, spare, &name, &config, req.owner.as_deref(), base)
                        .await?;
                    match claimed {
                        super::warm::Claim::Taken => {
                            let info = self.info(&name).await?;
                            say(
                                3.0,
                                format!(
                                    "{name} is ready, from the warm pool ({} ms)",
                                    info.ready_ms.unwrap_or_default()
                                ),
                            );
                            return Ok(info);
                        }
                        super::warm::Claim::None(creating) => creating,
                    }
                }
            };
            let (vm, image, owner) = (name.clone(), image.clone(), req.owner.clone());
            self.blocking(move |s| {
                let attrs = VmAttrs {
                    config: &config,
                    owner: owner.as_deref(),
                };
                s.create_vm_drives_as(&vm, &image, workspace, attrs)
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

    /// A new VM from a snapshot (its root and workspace as they were), booted.
    /// It is its source's owner's when its source's owner or one who
    /// reaches every VM (an admin) makes it; else (one the source is
    /// granted to) `by`'s, charged to `by`'s quota.
    pub async fn fork(
        &self,
        from_vm: &str,
        snapshot: &str,
        name: Option<String>,
        by: &crate::identity::Identity,
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
        let owner = self.fork_owner(self.owner_of(from_vm).flatten(), by);
        self.admit_owner_workspace(owner.as_deref(), bytes).await?;
        let (from, snap, new, to) = (
            from_vm.to_owned(),
            snapshot.to_owned(),
            name.clone(),
            owner.clone(),
        );
        self.blocking(move |s| s.fork_as(&from, &snap, &new, to.as_deref()))
            .await?;
        self.owners.set(&name, owner);
        drop(creating);
        if let Err(e) = self.boot(&name).await {
            self.undo_new(&name).await;
            return Err(e);
        }
        self.info(&name).await
    }

    pub(super) async fn free_name(&self) -> Result<String> {
        let taken: Vec<String> = self.list().await?.into_iter().map(|v| v.name).collect();
        Ok((1..)
            .map(|i| format!("vm-{i}"))
            .find(|n| !taken.contains(n))
            .unwrap_or_else(|| "vm".into()))
    }

    /// The size of a snapshot's workspace drive (what a VM made from it
    /// starts with).
    pub(super) async fn snapshot_workspace_bytes(&self, vm: &str, snapshot: &str) -> Result<u64> {
        let (vm, snapshot) = (vm.to_owned(), snapshot.to_owned());
        self.blocking(move |s| {
            let snap = s.snapshot(&vm, &snapshot)?;
            let file = snap.path.join("workspace.ext4");
            Ok(std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0))
        })
        .await
    }

    /// A new VM that did not boot goes again, whole.
    pub(super) async fn undo_new(&self, name: &str) {
        let doomed = name.to_owned();
        if self
            .blocking(move |s| s.destroy_vm_drives(&doomed))
            .await
            .is_ok()
        {
            // The catalog still has it otherwise: so does the map.
            self.owners.forget(name);
            // The catalog dropped its grants with it; so does memory
            // (a reload, in turn with any other, never puts them back).
            if let Err(e) = self.reload_access().await {
                tracing::error!(vm = name, error = %e, "could not reread grants");
            }
        }
        self.remove_console(name);
    }

    pub(super) async fn boot(&self, name: &str) -> Result<()> {
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
        let owned = name.to_owned();
        let image = self.blocking(move |s| s.vm_image(&owned)).await?;
        let manifest = manifest_of(&image)?;
        let spec = vm_spec(
            name,
            &manifest,
            &image.path,
            (drives.root, drives.workspace),
            (config.vcpus, config.memory_mib),
            self.console_log(name),
        );
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
        self.give_network(name, true).await;
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

pub(super) fn manifest_of(image: &nexus_storage::ImageInfo) -> Result<Manifest> {
    serde_json::from_str(&image.manifest).map_err(|e| DaemonError::BadImage {
        image: image.name.clone(),
        why: e.to_string(),
    })
}

/// How VM `name` boots: `image`'s kernel, its drives, its size.
pub(super) fn vm_spec(
    name: &str,
    manifest: &Manifest,
    image_path: &std::path::Path,
    (root, workspace): (std::path::PathBuf, std::path::PathBuf),
    (vcpus, memory_mib): (u32, u32),
    console_log: std::path::PathBuf,
) -> VmSpec {
    let mut spec = VmSpec::new(name, manifest.boot_kernel(image_path));
    spec.initrd = manifest.initrd(image_path);
    spec.cmdline = manifest.boot.cmdline.clone();
    spec.acpi = manifest.boot.acpi;
    spec.vcpus = vcpus;
    spec.memory_mib = memory_mib;
    spec.drives = vec![
        Drive {
            path: root,
            read_only: false,
        },
        Drive {
            path: workspace,
            read_only: false,
        },
    ];
    spec.console_log = console_log;
    spec.ready_timeout = Duration::from_secs(120);
    spec
}

/// The guest tools an image recorded at build time (see `guest::checks`).
pub(super) fn trusted_tools(manifest: &Manifest) -> Option<Vec<rmcp::model::Tool>> {
    let recorded = manifest.guest_tools.as_ref()?;
    let tools: Vec<rmcp::model::Tool> = recorded
        .iter()
        .filter_map(|t| serde_json::from_value(t.clone()).ok())
        .collect();
    (!tools.is_empty()).then_some(tools)
}

/// Why a booking was refused: the host is full but would not be without
/// spares (they may make room), or anything else.
enum Refusal {
    Spares(DaemonError),
    Other(DaemonError),
}

impl Refusal {
    fn into_error(self) -> DaemonError {
        match self {
            Self::Spares(e) | Self::Other(e) => e,
        }
    }
}

/// A booting VM's hold on the host's limits; released when dropped.
pub(super) struct Booking<'a> {
    daemon: &'a Daemon,
    name: String,
}

impl Drop for Booking<'_> {
    fn drop(&mut self) {
        lock_std(&self.daemon.booting).remove(&self.name);
    }
}
