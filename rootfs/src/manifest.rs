//! `manifest.json`: what an image holds and how to boot it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{BuildError, digest};

pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    /// `uname -r` in the guest.
    pub kernel_version: String,
    /// sha256 of the kernel's `.config` (of the kernel file when supplied).
    pub kernel_config_digest: String,
    /// Where the kernel came from (package and version, or a path).
    pub kernel_source: String,
    pub guest_mcp_version: String,
    /// RFC 3339, UTC.
    pub built_at: String,
    /// Digest of every input; equal digests mean an identical image.
    pub inputs_digest: String,
    pub boot: BootHints,
    /// Each file of the image: size and sha256.
    pub files: BTreeMap<String, FileEntry>,
    /// guest-mcp's tool definitions (`guest-mcp --print-tools`), recorded at
    /// build time: nexusd lists these, not what a running guest says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_tools: Option<Vec<serde_json::Value>>,
    /// What the root is: "busybox" or "debian SUITE".
    #[serde(default = "busybox")]
    pub userland: String,
    /// The environment guest commands start with (the recipe's `env`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Where guest commands start.
    #[serde(default = "workspace")]
    pub workdir: String,
    /// Who guest commands run as.
    #[serde(default = "root")]
    pub user: String,
}

fn busybox() -> String {
    "busybox".into()
}

fn workspace() -> String {
    crate::image::DEFAULT_WORKDIR.into()
}

fn root() -> String {
    "root".into()
}

/// How the image's kernel must be booted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootHints {
    /// The image's part of the kernel command line.
    pub cmdline: String,
    /// The kernel finds its devices through ACPI (no virtio-mmio cmdline devices).
    pub acpi: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub size: u64,
    pub sha256: String,
}

impl Manifest {
    /// Reads `<dir>/manifest.json`; the error says how to build an image.
    pub fn load(dir: &Path) -> Result<Self, BuildError> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|_| BuildError::Missing {
            what: "image manifest",
            path: path.clone(),
            hint: format!(
                "build the image with `cargo run --release -p nexus-rootfs -- build --out {}` \
                 (scripts/build-image.sh does)",
                dir.display()
            ),
        })?;
        serde_json::from_str(&text).map_err(|e| BuildError::Manifest {
            path,
            why: e.to_string(),
        })
    }

    pub fn save(&self, dir: &Path) -> Result<(), BuildError> {
        let path = dir.join(MANIFEST_FILE);
        let tmp = dir.join(".manifest.json.tmp");
        let text = serde_json::to_string_pretty(self).map_err(|e| BuildError::Manifest {
            path: path.clone(),
            why: e.to_string(),
        })?;
        std::fs::write(&tmp, text + "\n").map_err(|e| BuildError::io("write", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| BuildError::io("rename", &tmp, e))
    }

    /// The kernel a VMM should boot: the ELF where there is one (PVH entry
    /// is faster, and Firecracker needs it), else the bzImage.
    pub fn boot_kernel(&self, dir: &Path) -> PathBuf {
        if self.files.contains_key("vmlinux") {
            dir.join("vmlinux")
        } else {
            dir.join("kernel")
        }
    }

    pub fn initrd(&self, dir: &Path) -> Option<PathBuf> {
        self.files
            .contains_key("initrd")
            .then(|| dir.join("initrd"))
    }

    /// Checks that each file is there with the recorded size (cheap); with
    /// `digests`, also re-hashes each one.
    pub fn verify(&self, dir: &Path, digests: bool) -> Result<(), BuildError> {
        for (name, entry) in &self.files {
            let path = dir.join(name);
            let size = std::fs::metadata(&path)
                .map_err(|e| BuildError::io("stat", &path, e))?
                .len();
            if size != entry.size {
                return Err(BuildError::Manifest {
                    path,
                    why: format!("size {size} differs from the manifest's {}", entry.size),
                });
            }
            if digests && digest::file_sha256(&path)? != entry.sha256 {
                return Err(BuildError::Manifest {
                    path,
                    why: "sha256 differs from the manifest's".into(),
                });
            }
        }
        Ok(())
    }
}
