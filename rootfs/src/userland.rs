//! A recipe's Debian userland: `mmdebstrap` makes it (packages, then the
//! recipe's build-time commands) as a tarball cached by the digest of
//! what goes into it, so a new guest-mcp or init re-packs the root in
//! seconds instead of downloading and installing it again.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::recipe::{DEFAULT_MIRROR, Recipe};
use crate::{BuildError, digest};

/// Bumped whenever the bootstrap's own options change.
const USERLAND_VERSION: &str = "nexus-userland-1";

/// Documentation the guest does not need (copyright files stay).
const EXCLUDED: &[&str] = &[
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
];

/// What the userland of `recipe` (which has a base) depends on.
pub fn digest_of(recipe: &Recipe) -> String {
    let suite = recipe.base.as_deref().unwrap_or_default();
    let inputs = format!(
        "{USERLAND_VERSION}\nsuite {suite}\nmirror {}\npackages {}\nrun {}\n",
        recipe.mirror.as_deref().unwrap_or(DEFAULT_MIRROR),
        recipe.packages.join(","),
        serde_json::to_string(&recipe.run).unwrap_or_default(),
    );
    digest::sha256_hex(inputs.as_bytes())
}

/// The userland tarball of `recipe`, made if the cache lacks it.
pub fn tarball(recipe: &Recipe, cache_dir: &Path) -> Result<PathBuf, BuildError> {
    let Some(suite) = recipe.base.as_deref() else {
        return Err(BuildError::Userland {
            why: "a userland needs a `base`".into(),
        });
    };
    let dir = cache_dir.join("userland");
    std::fs::create_dir_all(&dir).map_err(|e| BuildError::io("create", &dir, e))?;
    let digest = digest_of(recipe);
    let tar = dir.join(format!("{}-{}.tar", suite, &digest[..16]));
    // A userland is made again after a while: a suite's packages get
    // security updates the cached tarball would never see.
    let made_at = std::fs::metadata(&tar).and_then(|m| m.created()).ok();
    if let Some(age) = made_at.and_then(|t| t.elapsed().ok())
        && age > MAX_AGE
    {
        progress!(
            "userland: {} is {} days old: making it again for package updates",
            tar.display(),
            age.as_secs() / 86_400
        );
        let _ = std::fs::remove_file(&tar);
    }
    if tar.is_file() {
        // Used now: the pruning below goes by last use.
        let _ =
            std::fs::File::open(&tar).and_then(|f| f.set_modified(std::time::SystemTime::now()));
        progress!(
            "userland: Debian {suite} with {} packages, cached ({})",
            recipe.packages.len(),
            tar.display()
        );
        return Ok(tar);
    }
    which(
        "mmdebstrap",
        "apt-get install mmdebstrap (scripts/install-deps.sh does)",
    )?;
    // Each build its own partial file: two builds of one recipe at once
    // must not write into the same one.
    let partial = dir.join(format!(
        ".{}-{}.partial-{}-{}",
        suite,
        &digest[..16],
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let started = Instant::now();
    progress!(
        "userland: mmdebstrap Debian {suite} with {} packages (downloads; a few minutes)",
        recipe.packages.len()
    );
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(["--mode=root", "--variant=minbase", "--format=tar"])
        .arg("--aptopt=Acquire::Retries \"3\"");
    for option in EXCLUDED {
        cmd.arg(format!("--dpkgopt={option}"));
    }
    if !recipe.packages.is_empty() {
        cmd.arg(format!("--include={}", recipe.packages.join(",")));
    }
    for command in &recipe.run {
        cmd.arg(format!(
            "--customize-hook=chroot \"$1\" /bin/sh -ec {}",
            crate::image::shell_quote(command)
        ));
    }
    // The apt lists and caches are of no use in an image.
    cmd.arg("--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/*.bin");
    cmd.arg(suite)
        .arg(&partial)
        .arg(recipe.mirror.as_deref().unwrap_or(DEFAULT_MIRROR));
    let result = run_showing(&mut cmd, suite);
    if let Err(e) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, &tar).map_err(|e| BuildError::io("rename", &partial, e))?;
    progress!(
        "userland: made in {:.0} s ({} MiB)",
        started.elapsed().as_secs_f64(),
        std::fs::metadata(&tar).map(|m| m.len() >> 20).unwrap_or(0)
    );
    prune(&dir, &tar);
    Ok(tar)
}

/// How long a userland tarball is used before it is made again.
const MAX_AGE: std::time::Duration = std::time::Duration::from_secs(14 * 86_400);

/// How many userland tarballs the cache keeps (each some hundreds of MiB).
const KEEP_TARBALLS: usize = 4;
/// A partial file this old is a dead build's.
const STALE_PARTIAL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Keeps the [`KEEP_TARBALLS`] most recently used tarballs (`keep` among
/// them) and removes dead builds' partial files.
fn prune(dir: &Path, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut tarballs = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = entry.metadata() else { continue };
        let modified = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.contains(".partial-") {
            if modified.elapsed().is_ok_and(|age| age > STALE_PARTIAL) {
                let _ = std::fs::remove_file(&path);
            }
        } else if name.ends_with(".tar") && path != keep {
            tarballs.push((modified, path));
        }
    }
    tarballs.sort_by_key(|t| std::cmp::Reverse(t.0));
    for (_, path) in tarballs.into_iter().skip(KEEP_TARBALLS - 1) {
        progress!(
            "userland: removing {} (least recently used)",
            path.display()
        );
        let _ = std::fs::remove_file(path);
    }
}

/// Unpacks a userland tarball into `stage` (as root: owners kept).
pub fn unpack(tar: &Path, stage: &Path) -> Result<(), BuildError> {
    std::fs::create_dir_all(stage).map_err(|e| BuildError::io("create", stage, e))?;
    crate::run(
        Command::new("tar")
            .args([
                "--extract",
                "--numeric-owner",
                "--preserve-permissions",
                "--file",
            ])
            .arg(tar)
            .arg("--directory")
            .arg(stage),
    )
}

fn which(program: &str, hint: &str) -> Result<(), BuildError> {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(program).is_file()))
        .unwrap_or(false);
    if found {
        Ok(())
    } else {
        Err(BuildError::Missing {
            what: "program",
            path: program.into(),
            hint: hint.into(),
        })
    }
}

/// Runs mmdebstrap showing its progress lines; a failure says what apt
/// said, and which package it could not find.
fn run_showing(cmd: &mut Command, suite: &str) -> Result<(), BuildError> {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| BuildError::Spawn {
            program: "mmdebstrap".into(),
            source,
        })?;
    let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(news) = line.strip_prefix("I: ") {
                progress!("userland: {news}");
            }
            if tail.len() == 40 {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
    let status = child.wait().map_err(|source| BuildError::Spawn {
        program: "mmdebstrap".into(),
        source,
    })?;
    if status.success() {
        return Ok(());
    }
    let said: Vec<String> = tail.into_iter().collect();
    if let Some(package) = said
        .iter()
        .find_map(|l| l.split("Unable to locate package ").nth(1))
    {
        return Err(BuildError::Userland {
            why: format!(
                "package {:?} is not in Debian {suite}: check the recipe's `packages`",
                package.trim()
            ),
        });
    }
    Err(BuildError::Command {
        command: "mmdebstrap".into(),
        status: status.to_string(),
        stderr: said.join("\n"),
    })
}
