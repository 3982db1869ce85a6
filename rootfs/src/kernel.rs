//! The guest kernel: Nexus's own microVM build from Debian's
//! `linux-source-6.1`, or any kernel the caller supplies.
//!
//! The default build is cached by the digest of the source version and the
//! config fragment. The kernel tree is extracted once per source version and
//! built with `O=` in one build directory, so a changed fragment rebuilds
//! incrementally and an unchanged one does no kernel work at all.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{BuildError, digest, run};

/// The config fragment applied on top of `make allnoconfig`.
pub const FRAGMENT: &str = include_str!("../kernel/microvm.config");
/// Bumped whenever the way the kernel is built changes its output.
const RECIPE_VERSION: &str = "nexus-kernel-recipe-1";
const SOURCE_PACKAGE: &str = "linux-source-6.1";

/// A kernel ready to go into an image.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// Compressed bzImage (QEMU's classic entry); absent for ELF-only input.
    pub bzimage: Option<PathBuf>,
    /// Uncompressed ELF (PVH entry: Firecracker, and QEMU's faster path).
    pub vmlinux: Option<PathBuf>,
    /// `uname -r` inside the guest.
    pub release: String,
    /// sha256 of the kernel's `.config`, or of the kernel file if unknown.
    pub config_digest: String,
    /// Where it came from, for the manifest.
    pub source: String,
}

/// Builds (or finds in `cache`) the default microVM kernel.
pub fn build_default(cache: &Path) -> Result<Kernel, BuildError> {
    let tarball = find_source_tarball()?;
    let version = source_version(&tarball)?;
    let key = digest::sha256_hex(
        format!("{RECIPE_VERSION}\n{SOURCE_PACKAGE} {version}\n{FRAGMENT}").as_bytes(),
    );
    let root = cache.join("kernel");
    let out = root.join(format!("out-{}", &key[..16]));
    if let Some(kernel) = read_cached(&out, &version)? {
        progress!("kernel: cached {} ({})", kernel.release, out.display());
        return Ok(kernel);
    }

    let src = root.join(format!("src-{version}"));
    extract_source(&tarball, &src)?;
    let build = root.join("build");
    std::fs::create_dir_all(&build).map_err(|e| BuildError::io("create", &build, e))?;
    let fragment = root.join(format!("fragment-{}.config", &key[..16]));
    std::fs::write(&fragment, FRAGMENT).map_err(|e| BuildError::io("write", &fragment, e))?;

    progress!("kernel: configuring (allnoconfig + rootfs/kernel/microvm.config)");
    run(Command::new("make")
        .current_dir(&src)
        .env("KCONFIG_ALLCONFIG", &fragment)
        .arg(format!("O={}", build.display()))
        .args(["ARCH=x86_64", "-s", "allnoconfig"]))?;
    check_fragment_applied(&build.join(".config"))?;

    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    progress!("kernel: compiling with {jobs} jobs (about 5 minutes on 2 cores from clean)");
    let started = Instant::now();
    make_with_progress(&src, &build, jobs)?;
    progress!(
        "kernel: compiled in {:.0} s",
        started.elapsed().as_secs_f64()
    );

    let release = capture(
        Command::new("make")
            .current_dir(&src)
            .arg(format!("O={}", build.display()))
            .args(["ARCH=x86_64", "-s", "kernelrelease"]),
    )?;

    let staging = root.join(format!("out-{}.tmp", &key[..16]));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| BuildError::io("create", &staging, e))?;
    for (from, to) in [
        (build.join("arch/x86/boot/bzImage"), "bzImage"),
        (build.join("vmlinux"), "vmlinux"),
        (build.join(".config"), "config"),
    ] {
        std::fs::copy(&from, staging.join(to)).map_err(|e| BuildError::io("copy", &from, e))?;
    }
    std::fs::write(staging.join("release"), format!("{release}\n"))
        .map_err(|e| BuildError::io("write", &staging, e))?;
    std::fs::write(
        staging.join("source"),
        format!("{SOURCE_PACKAGE} {version}\n"),
    )
    .map_err(|e| BuildError::io("write", &staging, e))?;
    let _ = std::fs::remove_dir_all(&out);
    std::fs::rename(&staging, &out).map_err(|e| BuildError::io("rename", &staging, e))?;
    read_cached(&out, &version)?.ok_or_else(|| BuildError::Kernel {
        why: format!("{} is incomplete right after the build", out.display()),
    })
}

/// The kernel of an existing image (its files and what its manifest says
/// of them): images built by nexusd reuse the kernel of one at hand.
pub fn from_image(dir: &Path) -> Result<Kernel, BuildError> {
    let manifest = crate::Manifest::load(dir)?;
    if manifest.files.contains_key("initrd") {
        return Err(BuildError::Kernel {
            why: format!(
                "image {} boots a modular kernel through an initrd: build on an image \
                 with Nexus's kernel",
                manifest.name
            ),
        });
    }
    let file = |name: &str| manifest.files.contains_key(name).then(|| dir.join(name));
    let (bzimage, vmlinux) = (file("kernel"), file("vmlinux"));
    if bzimage.is_none() && vmlinux.is_none() {
        return Err(BuildError::Kernel {
            why: format!("image {} lists no kernel file", manifest.name),
        });
    }
    Ok(Kernel {
        bzimage,
        vmlinux,
        release: manifest.kernel_version,
        config_digest: manifest.kernel_config_digest,
        source: manifest.kernel_source,
    })
}

/// Describes a kernel the caller supplied with `--kernel`.
pub fn from_path(path: &Path) -> Result<Kernel, BuildError> {
    let bytes = std::fs::read(path).map_err(|e| BuildError::io("read", path, e))?;
    let release = release_of(&bytes).ok_or_else(|| BuildError::Kernel {
        why: format!(
            "{} is neither a bzImage nor an ELF vmlinux with a Linux version string",
            path.display()
        ),
    })?;
    let is_elf = bytes.starts_with(b"\x7fELF");
    let path = path.to_path_buf();
    Ok(Kernel {
        bzimage: (!is_elf).then(|| path.clone()),
        vmlinux: is_elf.then(|| path.clone()),
        release,
        config_digest: digest::sha256_hex(&bytes),
        source: format!("path {}", path.display()),
    })
}

fn read_cached(out: &Path, version: &str) -> Result<Option<Kernel>, BuildError> {
    let (bzimage, vmlinux) = (out.join("bzImage"), out.join("vmlinux"));
    let (config, release) = (out.join("config"), out.join("release"));
    if ![&bzimage, &vmlinux, &config, &release]
        .iter()
        .all(|p| p.is_file())
    {
        return Ok(None);
    }
    let config_bytes = std::fs::read(&config).map_err(|e| BuildError::io("read", &config, e))?;
    let release = std::fs::read_to_string(&release)
        .map_err(|e| BuildError::io("read", &release, e))?
        .trim()
        .to_owned();
    Ok(Some(Kernel {
        bzimage: Some(bzimage),
        vmlinux: Some(vmlinux),
        release,
        config_digest: digest::sha256_hex(&config_bytes),
        source: format!("{SOURCE_PACKAGE} {version}"),
    }))
}

fn find_source_tarball() -> Result<PathBuf, BuildError> {
    let path = PathBuf::from(format!("/usr/src/{SOURCE_PACKAGE}.tar.xz"));
    if path.is_file() {
        Ok(path)
    } else {
        Err(BuildError::Kernel {
            why: format!(
                "{} is missing: install it with `apt-get install {SOURCE_PACKAGE}` \
                 (scripts/install-deps.sh does), or pass --kernel PATH",
                path.display()
            ),
        })
    }
}

/// The package version (e.g. `6.1.192-2`) names the source without reading
/// 140 MB; a tarball from elsewhere is named by its size and mtime.
fn source_version(tarball: &Path) -> Result<String, BuildError> {
    let dpkg = Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", SOURCE_PACKAGE])
        .stderr(Stdio::null())
        .output();
    if let Ok(out) = dpkg
        && out.status.success()
        && !out.stdout.is_empty()
    {
        return Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned());
    }
    let meta = std::fs::metadata(tarball).map_err(|e| BuildError::io("read", tarball, e))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    Ok(format!("file-{}-{mtime}", meta.len()))
}

fn extract_source(tarball: &Path, src: &Path) -> Result<(), BuildError> {
    let marker = src.join(".nexus-extracted");
    if marker.is_file() {
        return Ok(());
    }
    progress!(
        "kernel: extracting {} (once per source version)",
        tarball.display()
    );
    let tmp = src.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| BuildError::io("create", &tmp, e))?;
    run(Command::new("tar")
        .arg("-xf")
        .arg(tarball)
        .arg("-C")
        .arg(&tmp)
        .arg("--strip-components=1"))?;
    std::fs::write(tmp.join(".nexus-extracted"), b"")
        .map_err(|e| BuildError::io("write", &tmp, e))?;
    let _ = std::fs::remove_dir_all(src);
    std::fs::rename(&tmp, src).map_err(|e| BuildError::io("rename", &tmp, e))
}

/// Kconfig silently drops a symbol whose dependencies are unmet; a fragment
/// line that did not stick would give a kernel that cannot boot, so refuse.
fn check_fragment_applied(config: &Path) -> Result<(), BuildError> {
    let text = std::fs::read_to_string(config).map_err(|e| BuildError::io("read", config, e))?;
    let missing: Vec<&str> = FRAGMENT
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("CONFIG_"))
        .filter(|l| !text.lines().any(|c| c == *l))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(BuildError::Kernel {
            why: format!(
                "these lines of rootfs/kernel/microvm.config did not apply (unmet dependencies?): {}",
                missing.join(", ")
            ),
        })
    }
}

/// Runs the kernel build, turning make's stream of `CC` lines into a
/// progress line every few seconds.
fn make_with_progress(src: &Path, build: &Path, jobs: usize) -> Result<(), BuildError> {
    let mut child = Command::new("make")
        .current_dir(src)
        .arg(format!("O={}", build.display()))
        .args(["ARCH=x86_64", &format!("-j{jobs}"), "bzImage", "vmlinux"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| BuildError::Spawn {
            program: "make".into(),
            source: e,
        })?;
    let stderr = child.stderr.take();
    let errors = std::thread::spawn(move || {
        let mut tail = std::collections::VecDeque::new();
        if let Some(stderr) = stderr {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tail.len() == 30 {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        }
        tail.into_iter().collect::<Vec<_>>().join("\n")
    });
    let mut compiled = 0usize;
    let mut last_report = Instant::now();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.trim_start().starts_with("CC") {
                compiled += 1;
            }
            if last_report.elapsed() > Duration::from_secs(10) {
                progress!("kernel: {compiled} files compiled ({})", line.trim());
                last_report = Instant::now();
            }
        }
    }
    let status = child.wait().map_err(|e| BuildError::Spawn {
        program: "make".into(),
        source: e,
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(BuildError::Kernel {
            why: format!(
                "make failed ({status}); its last lines:\n{}",
                errors.join().unwrap_or_default()
            ),
        })
    }
}

fn capture(cmd: &mut Command) -> Result<String, BuildError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.output().map_err(|source| BuildError::Spawn {
        program: program.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(BuildError::Command {
            command: program,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The `uname -r` of a kernel file: from the bzImage setup header, or the
/// `Linux version` banner of an ELF.
pub fn release_of(bytes: &[u8]) -> Option<String> {
    if bytes.get(0x202..0x206) == Some(b"HdrS") {
        let ptr = u16::from_le_bytes([*bytes.get(0x20e)?, *bytes.get(0x20f)?]) as usize;
        let start = ptr + 0x200;
        let end = bytes
            .get(start..)?
            .iter()
            .position(|b| *b == b' ' || *b == 0)?;
        return std::str::from_utf8(&bytes[start..start + end])
            .ok()
            .map(str::to_owned);
    }
    let banner = b"Linux version ";
    let at = bytes.windows(banner.len()).position(|w| w == banner)? + banner.len();
    let end = bytes.get(at..)?.iter().position(|b| *b == b' ')?;
    std::str::from_utf8(&bytes[at..at + end])
        .ok()
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_release_of_a_bzimage_header() {
        let mut image = vec![0u8; 0x600];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x20e..0x210].copy_from_slice(&0x300u16.to_le_bytes());
        image[0x500..0x520].copy_from_slice(b"6.1.192-nexus (root@x) #1 SMP\0\0\0");
        assert_eq!(release_of(&image).as_deref(), Some("6.1.192-nexus"));
    }

    #[test]
    fn reads_the_release_of_an_elf_banner() {
        let mut elf = b"\x7fELF....".to_vec();
        elf.extend_from_slice(b"junk Linux version 6.1.0-28-cloud-amd64 (debian-kernel@");
        assert_eq!(release_of(&elf).as_deref(), Some("6.1.0-28-cloud-amd64"));
        assert_eq!(release_of(b"not a kernel"), None);
    }

    #[test]
    fn every_fragment_line_is_a_config_assignment() {
        for line in FRAGMENT.lines().map(str::trim) {
            assert!(
                line.is_empty() || line.starts_with('#') || line.starts_with("CONFIG_"),
                "unexpected fragment line {line:?}"
            );
        }
    }
}
