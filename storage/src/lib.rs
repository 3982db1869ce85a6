//! nexus-storage: everything durable in Nexus.
//!
//! [`Storage`] owns the btrfs pool and the SQLite catalog, and offers the
//! operations nexusd builds on: import an image, create a VM's drives,
//! snapshot a drive (consistently, around a caller's quiesce hook), roll a
//! drive back in place (around a caller's release/reattach hooks), fork new
//! drives from a snapshot, destroy, and measure usage. It knows nothing of
//! VM processes or MCP.
//!
//! Layout in the pool (one subvolume per VM; snapshots are read-only
//! subvolume snapshots of it, so every drive of a snapshot is from the same
//! instant):
//!
//! ```text
//! <pool>/images/<image>/{manifest.json, kernel, vmlinux, rootfs.ext4, ...}
//! <pool>/vms/<vm>/{root.ext4, workspace.ext4}
//! <pool>/snapshots/<vm>/<snapshot>/{root.ext4, workspace.ext4}   read-only
//! ```
//!
//! Crash safety: every multi-step operation first records itself in the
//! catalog (`op` column), then changes the filesystem, then clears the
//! record. [`Storage::open`] reconciles: an interrupted creation is undone,
//! an interrupted deletion or rollback is finished, and directories no row
//! knows of are removed. Each step boundary is a named failpoint, so tests
//! can crash every operation between every pair of steps.
//!
//! # Layout
//!
//! - `names`: validation of names that become paths.
//! - `catalog`: SQLite (WAL, foreign keys) and its migrations.
//! - `pool`: finding or making the btrfs pool; subvolumes, reflinks, usage.
//! - `images`, `vms`, `snapshots`: the operations.
//! - `reconcile`: recovery at open, and the consistency check tests use.

mod audit;
pub mod catalog;
mod images;
pub mod names;
pub mod pool;
mod reconcile;
mod roles;
mod secrets;
mod snapshots;
mod tokens;
mod vms;
mod warm;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The named step boundaries of each multi-step operation, in order (for
/// crash-injection tests with [`Storage::set_failpoint`]).
#[doc(hidden)]
pub mod steps {
    pub use crate::images::{DELETE_IMAGE_STEPS, IMPORT_STEPS};
    pub use crate::snapshots::{DELETE_STEPS, ROLLBACK_STEPS, SNAPSHOT_STEPS};
    pub use crate::vms::{CREATE_STEPS, DESTROY_STEPS, FORK_STEPS};
    pub use crate::warm::ADOPT_STEPS;
}

pub use audit::{AuditQuery, AuditRecord};
pub use catalog::{Catalog, CatalogError};
pub use images::{ImageChange, Imported, manifest_digest};
pub use names::{NameError, validate_name};
pub use pool::{Pool, PoolConfig, PoolKind};
pub use reconcile::ReconcileReport;
pub use roles::{GrantRecord, RoleRecord};
pub use secrets::SecretRecord;
use serde::Serialize;
pub use tokens::TokenRecord;
pub use vms::VmAttrs;
pub use warm::WarmDrives;

/// The drive file names a VM has.
pub const ROOT_DRIVE: &str = "root";
pub const WORKSPACE_DRIVE: &str = "workspace";

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("no storage pool: {why}")]
    NoPool { why: String },
    #[error("could not {op} {path}: {why}")]
    Fs {
        op: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("could not {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image {0:?} does not exist: import it first (list_images shows what exists)")]
    NoImage(String),
    /// A pooled VM's image was replaced since it booted.
    #[error("image {0:?} changed since the pooled VM booted")]
    ImageChanged(String),
    #[error(
        "VM {vm:?} was made from a version of image {image:?} that is gone from the pool: destroy the VM and make it again"
    )]
    ImageVersionGone { vm: String, image: String },
    #[error("image {image:?} is used by VMs {vms:?}: destroy them first")]
    ImageInUse { image: String, vms: Vec<String> },
    #[error("{0} is not an image directory: {1}")]
    BadImage(PathBuf, String),
    #[error("VM {0:?} has no drives here")]
    NoVm(String),
    #[error("VM {0:?} has drives already")]
    VmExists(String),
    #[error("VM {vm:?} is busy with {op}; try again when it is done")]
    Busy { vm: String, op: String },
    #[error("VM {vm:?} has no drive {drive:?}: its drives are root and workspace")]
    NoDrive { vm: String, drive: String },
    #[error("VM {vm:?} has no snapshot {snapshot:?}")]
    NoSnapshot { vm: String, snapshot: String },
    #[error("VM {vm:?} has a snapshot named {snapshot:?} already")]
    SnapshotExists { vm: String, snapshot: String },
    #[error("workspace size must be between 1 MiB and {max} bytes, got {got}")]
    BadSize { got: u64, max: u64 },
    #[error("the guest could not be quiesced for a consistent snapshot: {0}")]
    Quiesce(String),
    #[error("the guest could not let go of drive {drive:?} for the rollback: {why}")]
    Release { drive: String, why: String },
    #[error("the drive was rolled back, but the guest could not attach it again: {0}")]
    Reattach(String),
    #[error("a token named {0:?} exists already (revoke_token frees no name: pick another)")]
    TokenExists(String),
    #[error("no token named {0:?} (list_tokens shows them)")]
    NoToken(String),
    #[error("no role named {0:?} (list_roles shows them)")]
    NoRole(String),
    #[error("VM {vm:?} is not granted to {identity:?} (list_grants shows the grants)")]
    NoGrant { vm: String, identity: String },
    #[error("no secret named {0:?} (list_secrets shows them)")]
    NoSecret(String),
    #[error("secret {secret:?} is not granted to VM {vm:?}")]
    NoSecretGrant { secret: String, vm: String },
    #[error("injected failure at {0} (test)")]
    Injected(&'static str),
}

impl StorageError {
    pub(crate) fn io<'a>(
        op: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(std::io::Error) -> Self + 'a {
        move |source| StorageError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// A crash a test asked for ([`Storage::set_failpoint`]).
    pub fn is_injected(&self) -> bool {
        matches!(self, StorageError::Injected(_))
    }
}

impl From<rusqlite::Error> for StorageError {
    fn from(e: rusqlite::Error) -> Self {
        StorageError::Catalog(CatalogError::Query(e))
    }
}

pub type Result<T> = std::result::Result<T, StorageError>;

/// Where storage lives.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub state_dir: PathBuf,
    /// The pool directory (default `<state_dir>/pool`).
    pub pool_dir: Option<PathBuf>,
    /// Size of the sparse pool image when the pool directory is not on btrfs.
    pub pool_image_bytes: u64,
}

impl StorageConfig {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            pool_dir: None,
            pool_image_bytes: 32 << 30,
        }
    }
}

/// What a caller does around a snapshot of a running VM: freeze the guest's
/// filesystem, and thaw it (always called once `freeze` succeeded).
pub trait Quiesce {
    fn freeze(&mut self) -> std::result::Result<(), String>;
    fn thaw(&mut self) -> std::result::Result<(), String>;
}

/// No guest to quiesce (a stopped VM).
pub struct NoQuiesce;

impl Quiesce for NoQuiesce {
    fn freeze(&mut self) -> std::result::Result<(), String> {
        Ok(())
    }
    fn thaw(&mut self) -> std::result::Result<(), String> {
        Ok(())
    }
}

/// What a caller does around an in-place rollback of a running VM's drive:
/// the guest lets go of it (unmount, flush buffers), then attaches it again.
pub trait Reattach {
    fn release(&mut self) -> std::result::Result<(), String>;
    fn reattach(&mut self) -> std::result::Result<(), String>;
}

/// No guest attached (a stopped VM).
pub struct NoReattach;

impl Reattach for NoReattach {
    fn release(&mut self) -> std::result::Result<(), String> {
        Ok(())
    }
    fn reattach(&mut self) -> std::result::Result<(), String> {
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    pub name: String,
    pub path: PathBuf,
    /// The image's manifest.json, as imported.
    pub manifest: String,
    pub imported_at: String,
    /// `sha256:HEX` over the files its manifest lists.
    pub digest: String,
    /// Where it came from: "directory", "recipe NAME", an OCI reference.
    pub source: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct VmDrives {
    pub vm: String,
    pub image: String,
    /// The version of the image it was made from (and boots).
    pub image_digest: String,
    pub root: PathBuf,
    pub workspace: PathBuf,
    /// The snapshot its workspace last came from (`vm/snapshot`), if any.
    pub base_snapshot: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    pub vm: String,
    pub name: String,
    /// The drive it was taken for (rollback restores that one).
    pub drive: String,
    pub path: PathBuf,
    pub created_at: String,
    /// The drive's logical size.
    pub size_bytes: u64,
    /// The snapshot the drive's content came from before (`vm/snapshot`).
    pub parent: Option<String>,
}

/// Where a new VM's workspace comes from.
#[derive(Debug, Clone)]
pub enum WorkspaceSource {
    /// A fresh, empty ext4 filesystem of this many bytes (sparse).
    New { bytes: u64 },
    /// A clone of a snapshot's workspace drive.
    Snapshot { vm: String, snapshot: String },
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Usage {
    /// Bytes no other file shares.
    pub exclusive_bytes: u64,
    /// Bytes shared with snapshots, forks or the image.
    pub shared_bytes: u64,
}

/// The largest workspace a VM can ask for.
pub const MAX_WORKSPACE_BYTES: u64 = 16 << 40;

/// Storage: the pool and the catalog.
pub struct Storage {
    pool: Pool,
    catalog: Mutex<Catalog>,
    failpoint: Mutex<Option<String>>,
}

impl Storage {
    /// Opens the pool and the catalog, and reconciles them.
    pub fn open(config: &StorageConfig) -> Result<(Self, ReconcileReport)> {
        std::fs::create_dir_all(&config.state_dir)
            .map_err(StorageError::io("create", &config.state_dir))?;
        let pool = Pool::open(&PoolConfig {
            path: config
                .pool_dir
                .clone()
                .unwrap_or_else(|| config.state_dir.join("pool")),
            image: config.state_dir.join("pool.img"),
            image_size_bytes: config.pool_image_bytes,
        })?;
        let catalog = Catalog::open(&config.state_dir.join("catalog.db"))?;
        let storage = Self {
            pool,
            catalog: Mutex::new(catalog),
            failpoint: Mutex::new(None),
        };
        storage.backfill_image_digests()?;
        let report = storage.reconcile()?;
        Ok((storage, report))
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Catalog> {
        self.catalog.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Testing only: make the next pass through `step` fail as if the
    /// process died there.
    #[doc(hidden)]
    pub fn set_failpoint(&self, step: Option<&str>) {
        *self.failpoint.lock().unwrap_or_else(|e| e.into_inner()) = step.map(str::to_owned);
    }

    /// A step boundary of a multi-step operation.
    fn step(&self, name: &'static str) -> Result<()> {
        let mut failpoint = self.failpoint.lock().unwrap_or_else(|e| e.into_inner());
        if failpoint.as_deref() == Some(name) {
            *failpoint = None;
            return Err(StorageError::Injected(name));
        }
        Ok(())
    }
}

pub(crate) fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}
