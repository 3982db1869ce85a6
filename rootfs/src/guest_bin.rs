//! The guest-mcp binary that goes into the image: statically linked, since
//! the root filesystem has no C library.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{BuildError, run};

/// The target guest binaries are built for; giving `--target` also keeps
/// `crt-static` away from build scripts and proc macros.
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// The workspace this builder was compiled from, if it is still there.
fn workspace_root() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()?
        .to_path_buf();
    root.join("Cargo.toml").is_file().then_some(root)
}

/// Uses `explicit`, or builds guest-mcp from this workspace.
pub fn locate_or_build(explicit: Option<&Path>) -> Result<PathBuf, BuildError> {
    let path = match explicit {
        Some(path) => path.to_path_buf(),
        None => build_from_workspace()?,
    };
    let bytes = std::fs::read(&path).map_err(|e| BuildError::io("read", &path, e))?;
    match is_static_elf(&bytes) {
        Some(true) => Ok(path),
        Some(false) => Err(BuildError::GuestBinary {
            why: format!(
                "{} is dynamically linked; the guest has no C library: build it with \
                 RUSTFLAGS=\"-C target-feature=+crt-static\" --target {GUEST_TARGET}",
                path.display()
            ),
        }),
        None => Err(BuildError::GuestBinary {
            why: format!("{} is not a 64-bit ELF executable", path.display()),
        }),
    }
}

/// Copies the guest-mcp out of an image's root filesystem into `into`
/// (debugfs reads ext4 without mounting it).
pub fn from_image(dir: &Path, into: &Path) -> Result<PathBuf, BuildError> {
    let out = into.join("guest-mcp");
    if !dump_from_image(dir, GUEST_PATH, &out)? {
        return Err(BuildError::GuestBinary {
            why: format!(
                "{} holds no /{GUEST_PATH}",
                dir.join("rootfs.ext4").display()
            ),
        });
    }
    locate_or_build(Some(&out))
}

/// Copies `/path` (relative to the root) out of an image's root
/// filesystem to `out`; false if the root has no such file.
pub fn dump_from_image(dir: &Path, path: &str, out: &Path) -> Result<bool, BuildError> {
    let _ = std::fs::remove_file(out);
    run(Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump -p \"/{path}\" \"{}\"", out.display()))
        .arg(dir.join("rootfs.ext4")))?;
    Ok(out.is_file())
}

/// Where guest-mcp lives in every root filesystem.
pub const GUEST_PATH: &str = "usr/sbin/guest-mcp";

fn build_from_workspace() -> Result<PathBuf, BuildError> {
    let root = workspace_root().ok_or_else(|| BuildError::GuestBinary {
        why: "this nexus-rootfs was not run from its source tree: pass --guest-mcp PATH".into(),
    })?;
    let target_dir = root.join("target/guest");
    progress!(
        "guest-mcp: building a static binary (cargo, target dir {})",
        target_dir.display()
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "nexus-guest",
            "--bin",
            "guest-mcp",
        ])
        .args(["--target", GUEST_TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        // Progress of cargo itself goes straight to the terminal.
        .stdout(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::inherit());
    let status = cmd.status().map_err(|source| BuildError::Spawn {
        program: "cargo".into(),
        source,
    })?;
    if !status.success() {
        return Err(BuildError::GuestBinary {
            why: format!("cargo build failed ({status}); see its output above"),
        });
    }
    Ok(target_dir.join(GUEST_TARGET).join("release/guest-mcp"))
}

/// `Some(true)` for an ELF64 without an interpreter (static or static-pie).
pub fn is_static_elf(bytes: &[u8]) -> Option<bool> {
    if bytes.get(0..5)? != b"\x7fELF\x02" {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(bytes.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(bytes.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(bytes.get(o..o + 8)?.try_into().ok()?));
    let phoff = u64_at(0x20)? as usize;
    let phentsize = u16_at(0x36)? as usize;
    let phnum = u16_at(0x38)? as usize;
    const PT_INTERP: u32 = 3;
    for i in 0..phnum {
        if u32_at(phoff + i * phentsize)? == PT_INTERP {
            return Some(false);
        }
    }
    Some(true)
}

/// What `guest-mcp --version` says of itself (e.g. `0.1.0`).
pub fn version_of(binary: &Path) -> Result<String, BuildError> {
    let out = Command::new(binary)
        .arg("--version")
        .output()
        .map_err(|source| BuildError::Spawn {
            program: binary.display().to_string(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(1)
        .map(str::to_owned)
        .ok_or_else(|| BuildError::GuestBinary {
            why: format!("{} --version printed {text:?}", binary.display()),
        })
}

/// The tool definitions a guest-mcp binary serves (`--print-tools`).
pub fn tools_of(binary: &Path) -> Result<Vec<serde_json::Value>, BuildError> {
    let out = Command::new(binary)
        .arg("--print-tools")
        .output()
        .map_err(|source| BuildError::Spawn {
            program: binary.display().to_string(),
            source,
        })?;
    if !out.status.success() {
        return Err(BuildError::GuestBinary {
            why: format!(
                "{} --print-tools failed: {}",
                binary.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    serde_json::from_slice(&out.stdout).map_err(|e| BuildError::GuestBinary {
        why: format!(
            "{} --print-tools printed no tool list: {e}",
            binary.display()
        ),
    })
}

/// Strips symbols into `to`: the binary is copied into every VM's root.
pub fn strip_into(from: &Path, to: &Path) -> Result<(), BuildError> {
    run(Command::new("strip").arg("-o").arg(to).arg(from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_static_from_dynamic_executables() {
        // Whatever this test binary is, /bin/busybox from busybox-static is
        // static and the system's sh is dynamic.
        let sh = std::fs::read("/bin/sh").unwrap();
        let sh_real = std::fs::canonicalize("/bin/sh").unwrap();
        let dash_static = is_static_elf(&sh);
        assert_eq!(
            dash_static,
            Some(false),
            "{} should be dynamic",
            sh_real.display()
        );
        if let Ok(busybox) = std::fs::read("/bin/busybox") {
            assert_eq!(is_static_elf(&busybox), Some(true));
        }
        assert_eq!(is_static_elf(b"#!/bin/sh\n"), None);
    }
}
