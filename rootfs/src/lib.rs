//! nexus-rootfs: builds Nexus guest images.
//!
//! An image is a directory holding `kernel` (bzImage), `vmlinux` (ELF, for
//! PVH entry and Firecracker), `rootfs.ext4`, an `initrd` only where the
//! kernel needs one, and `manifest.json`. The root filesystem is made
//! without mounting anything (`mkfs.ext4 -d`) and holds busybox, a static
//! guest-mcp and busybox init configured to mount the workspace and keep
//! guest-mcp running.
//!
//! Every step is cached: the kernel by the digest of its source version and
//! config fragment, the root filesystem by the digest of everything that
//! goes into it, so a rebuild with nothing changed does almost no work.
//!
//! # Layout
//!
//! - `kernel`: the default kernel build and supplied kernels.
//! - `guest_bin`: the static guest-mcp binary.
//! - `image`: the root filesystem and the whole image directory.
//! - `manifest`: `manifest.json`, read by nexusd and the tests.
//! - `recipe`: what goes into a root filesystem (TOML).
//! - `userland`: a recipe's Debian root, made by mmdebstrap and cached.
//! - `oci`: an OCI image layout's layers as a root.
//! - `registry`: an image pulled from a registry into an OCI layout.
//! - `inroot`: paths in a root being built, never followed out of it.
//! - `digest`: sha256 helpers.

/// Reports a progress line: to the sink [`with_progress`] set on this
/// thread, else on stderr (image builds are long and interactive).
macro_rules! progress {
    ($($arg:tt)*) => {
        $crate::report_progress(&format!($($arg)*))
    };
}

type ProgressSink = Box<dyn Fn(&str)>;

thread_local! {
    static PROGRESS: std::cell::RefCell<Option<ProgressSink>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `work` (a build, on this thread) with its progress lines going
/// to `sink` instead of stderr.
pub fn with_progress<T>(sink: impl Fn(&str) + 'static, work: impl FnOnce() -> T) -> T {
    let previous = PROGRESS.with(|p| p.borrow_mut().replace(Box::new(sink)));
    let out = work();
    PROGRESS.with(|p| *p.borrow_mut() = previous);
    out
}

#[doc(hidden)]
pub fn report_progress(line: &str) {
    PROGRESS.with(|p| match &*p.borrow() {
        Some(sink) => sink(line),
        None => eprintln!("[nexus-rootfs] {line}"),
    })
}

pub mod digest;
pub mod guest_bin;
pub mod image;
pub mod inroot;
pub mod kernel;
pub mod manifest;
pub mod oci;
pub mod recipe;
pub mod registry;
pub mod userland;

pub use image::{BuildOptions, build};
pub use manifest::Manifest;
pub use recipe::Recipe;

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("could not {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not run {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("kernel: {why}")]
    Kernel { why: String },
    #[error("guest-mcp: {why}")]
    GuestBinary { why: String },
    #[error("{what} not found at {path}: {hint}")]
    Missing {
        what: &'static str,
        path: PathBuf,
        hint: String,
    },
    #[error("recipe {path}: {why}")]
    Recipe { path: PathBuf, why: String },
    #[error("OCI image: {why}")]
    Oci { why: String },
    #[error("userland: {why}")]
    Userland { why: String },
    #[error("manifest {path}: {why}")]
    Manifest { path: PathBuf, why: String },
}

impl BuildError {
    pub(crate) fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        BuildError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Runs a command, failing with its stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<(), BuildError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.output().map_err(|source| BuildError::Spawn {
        program: program.clone(),
        source,
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(BuildError::Command {
            command: program,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Scratch directories builds and pulls make in the cache; one this old
/// is a dead process's.
const SCRATCH_PREFIXES: [&str; 4] = ["image-work-", "base-guest-", "archive-", "pull-"];
const STALE_SCRATCH: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Removes scratch directories that crashed builds left in `cache_dir`.
pub fn prune_scratch(cache_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(cache_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > STALE_SCRATCH));
        if stale && SCRATCH_PREFIXES.iter().any(|p| name.starts_with(p)) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Nexus's cache directory: `$NEXUS_CACHE_DIR`, else `$XDG_CACHE_HOME/nexus`,
/// else `~/.cache/nexus`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("NEXUS_CACHE_DIR") {
        return dir.into();
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("nexus");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/nexus")
}
