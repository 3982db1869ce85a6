//! What a previous nexusd left: VMs still running (adopted or stopped),
//! images built into the state directory, a rollback a crash cut short.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nexus_storage::{ImageChange, Reattach, Storage, manifest_digest, validate_name};
use nexus_vmm::{Vm, Vmm};

use super::hooks::GuestHooks;
use super::{Daemon, console_log_path};
use crate::Config;

/// A daemon killed before it could stop its VMs left them running:
/// those whose processes all live are adopted (their guests reconnect),
/// the rest stopped, so that they show as stopped.
pub(super) async fn adopt_leftovers(
    config: &Config,
    storage: &Arc<Storage>,
    vmm: &std::result::Result<Vmm, String>,
) -> anyhow::Result<HashMap<String, Vm>> {
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
    // Spares are never adopted: a previous nexusd's are stopped, their
    // drives and consoles removed.
    let spares = nexus_vmm::vm::reap_leftovers(&config.state_dir.join(super::warm::RUN_DIR), &[]);
    if !spares.is_empty() {
        tracing::info!(
            count = spares.len(),
            "stopped a previous nexusd's pooled VMs"
        );
    }
    let _ = std::fs::remove_dir_all(config.state_dir.join(super::warm::CONSOLE_DIR));
    if !running.is_empty() {
        tracing::info!(vms = ?running.keys().collect::<Vec<_>>(), "adopted VMs a previous nexusd left running");
    }
    if !stopped.is_empty() {
        tracing::warn!(vms = ?stopped, "stopped leftovers of VMs that could not be adopted");
    }
    // Pooled VMs are never adopted (their processes were just stopped):
    // their drives go.
    let storage = storage.clone();
    let discarded = tokio::task::spawn_blocking(move || storage.discard_all_warm_drives()).await?;
    match discarded {
        Ok(gone) if !gone.is_empty() => {
            tracing::info!(
                count = gone.len(),
                "removed a previous nexusd's pooled VMs' drives"
            )
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "could not remove a previous nexusd's pooled VMs' drives")
        }
    }
    Ok(running)
}

/// Images built into `<state>/images/<name>` (scripts/run-nexusd.sh does)
/// are imported into the pool, and imported again when rebuilt there (new
/// VMs get the new version; the VMs of the old one keep it). What was
/// last imported from there is noted beside it (`.<name>.imported`), so
/// an image an admin replaced or deleted through the tools since does
/// not come back at the next start.
pub(super) async fn import_built_images(
    storage: &Arc<Storage>,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
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
            let note = path.with_file_name(format!(".{name}.imported"));
            let digest = std::fs::read_to_string(path.join("manifest.json"))
                .ok()
                .and_then(|m| manifest_digest(&m).ok());
            if digest.is_some() && std::fs::read_to_string(&note).ok() == digest {
                return Ok(());
            }
            match storage.import_image_from(&name, &path, "state images directory") {
                Ok(done) => {
                    if done.change != ImageChange::Unchanged {
                        tracing::info!(
                            image = name,
                            digest = done.image.digest,
                            change = ?done.change,
                            from = %path.display(),
                            "imported image"
                        );
                    }
                    if let Err(e) = std::fs::write(&note, &done.image.digest) {
                        tracing::warn!(path = %note.display(), error = %e, "could not note an import");
                    }
                }
                Err(e) => tracing::warn!(image = name, error = %e, "could not import image"),
            }
            Ok(())
        })
        .await??;
    }
    Ok(())
}

impl Daemon {
    /// Finishes a rollback a crash interrupted: the guest of a VM that
    /// survived gets its drive back (it may have unmounted it); a stopped
    /// VM mounts it at its next boot.
    pub(super) async fn give_back_drive(&self, name: &str, drive: &str) {
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
}
