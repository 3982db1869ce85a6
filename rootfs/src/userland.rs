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
    if tar.is_file() {
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
    let partial = tar.with_extension("tar.partial");
    let _ = std::fs::remove_file(&partial);
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
    Ok(tar)
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
