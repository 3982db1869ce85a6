//! What a VM is made of, checked before anything is started.

use std::path::PathBuf;
use std::time::Duration;

use crate::{Accel, VmmError};

/// One virtio-blk drive. The first drive of a spec is `vda`, the next `vdb`.
#[derive(Debug, Clone)]
pub struct Drive {
    pub path: PathBuf,
    pub read_only: bool,
}

/// Everything needed to start one VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// `[a-z0-9][a-z0-9-]{0,62}`; names the VM in logs, errors and its run directory.
    pub name: String,
    /// bzImage or ELF vmlinux.
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Kernel command line from the image (root device, init, ...). The
    /// backend adds what it needs itself (console, panic and reboot
    /// behaviour, TSC frequency under TCG).
    pub cmdline: String,
    pub drives: Vec<Drive>,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// A fixed vsock CID, or `None` for the lowest free one.
    pub cid: Option<u32>,
    pub accel: Accel,
    /// Whether the kernel needs ACPI to find its devices (Debian's cloud
    /// kernel does; Nexus's own finds them on the command line).
    pub acpi: bool,
    /// Where the serial console is appended.
    pub console_log: PathBuf,
    /// How long the guest has to signal readiness.
    pub ready_timeout: Duration,
}

pub const MAX_VCPUS: u32 = 32;
pub const MIN_MEMORY_MIB: u32 = 64;

/// What a missing kernel or drive should make the reader do.
const IMAGE_HINT: &str = "; build the default image with `cargo run --release -p nexus-rootfs -- build --out DIR` (scripts/build-image.sh does)";

impl VmSpec {
    /// A spec with the defaults of a small VM; callers set the paths.
    pub fn new(name: impl Into<String>, kernel: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            drives: Vec::new(),
            vcpus: 1,
            memory_mib: 256,
            cid: None,
            accel: Accel::Auto,
            acpi: false,
            console_log: PathBuf::new(),
            ready_timeout: Duration::from_secs(60),
        }
    }

    /// Checks the spec; does not touch anything but the file system's metadata.
    pub fn validate(&self) -> Result<(), VmmError> {
        validate_name(&self.name)?;
        let exists = |what, path: &PathBuf| {
            if path.is_file() {
                Ok(())
            } else {
                Err(VmmError::MissingFile {
                    what,
                    path: path.clone(),
                    hint: IMAGE_HINT.into(),
                })
            }
        };
        exists("kernel", &self.kernel)?;
        if let Some(initrd) = &self.initrd {
            exists("initrd", initrd)?;
        }
        for drive in &self.drives {
            exists("drive", &drive.path)?;
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(VmmError::InvalidSpec(format!(
                "vcpus must be between 1 and {MAX_VCPUS}, got {}",
                self.vcpus
            )));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(VmmError::InvalidSpec(format!(
                "memory_mib must be at least {MIN_MEMORY_MIB}, got {}",
                self.memory_mib
            )));
        }
        if self.cmdline.contains(['\n', '\0']) {
            return Err(VmmError::InvalidSpec(
                "cmdline must be one line without NUL bytes".into(),
            ));
        }
        if self.console_log.as_os_str().is_empty() {
            return Err(VmmError::InvalidSpec("console_log path is empty".into()));
        }
        if self.ready_timeout.is_zero() {
            return Err(VmmError::InvalidSpec(
                "ready_timeout must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// VM names become directory names: no separators, no dots, no surprises.
/// The same rule as `nexus_storage::names`, kept here on purpose: vmm and
/// storage must not depend on each other.
pub fn validate_name(name: &str) -> Result<(), VmmError> {
    let bytes = name.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 63
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
    if ok {
        Ok(())
    } else {
        Err(VmmError::InvalidSpec(format!(
            "VM name {name:?} is invalid: use 1 to 63 of a-z, 0-9 and '-', starting with a letter or digit"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with_kernel() -> (tempfile::TempDir, VmSpec) {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("kernel");
        std::fs::write(&kernel, b"k").unwrap();
        let mut spec = VmSpec::new("vm1", kernel);
        spec.console_log = dir.path().join("console.log");
        (dir, spec)
    }

    #[test]
    fn names_are_checked() {
        for good in ["a", "vm-1", "0abc", &"a".repeat(63)] {
            validate_name(good).unwrap();
        }
        for bad in ["", "-a", "A", "a_b", "a/b", "..", "a.b", &"a".repeat(64)] {
            let err = validate_name(bad).unwrap_err().to_string();
            assert!(err.contains("is invalid"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_missing_kernel_names_the_path_and_how_to_build_it() {
        let (_dir, mut spec) = spec_with_kernel();
        spec.kernel = "/nonexistent/kernel".into();
        let err = spec.validate().unwrap_err().to_string();
        assert!(
            err.contains("kernel /nonexistent/kernel does not exist"),
            "{err}"
        );
        assert!(err.contains("nexus-rootfs -- build"), "{err}");
    }

    #[test]
    fn sizes_and_drives_are_checked() {
        let (_dir, spec) = spec_with_kernel();
        spec.validate().unwrap();
        let err = VmSpec {
            vcpus: 0,
            ..spec.clone()
        }
        .validate()
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("vcpus must be between 1 and 32, got 0")
        );
        let err = VmSpec {
            memory_mib: 1,
            ..spec.clone()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("memory_mib must be at least 64"));
        let mut with_drive = spec.clone();
        with_drive.drives.push(Drive {
            path: "/nonexistent/root.ext4".into(),
            read_only: false,
        });
        let err = with_drive.validate().unwrap_err().to_string();
        assert!(
            err.contains("drive /nonexistent/root.ext4 does not exist"),
            "{err}"
        );
    }
}
