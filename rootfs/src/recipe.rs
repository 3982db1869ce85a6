//! Image recipes: a small TOML file saying what goes into a root
//! filesystem. With a `base` (a Debian suite) the root is a Debian
//! userland made by `mmdebstrap` with the recipe's packages, files and
//! build-time commands; without one it is busybox alone (the minimal
//! image). Either way Nexus adds its init and a static guest-mcp.
//!
//! ```toml
//! base = "bookworm"
//! packages = ["python3", "git"]
//! run = ["git config --system init.defaultBranch main"]
//! workdir = "/workspace"
//! [env]
//! LANG = "C.UTF-8"
//! [[files]]
//! path = "/etc/motd"
//! content = "hello\n"
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::BuildError;

/// Debian suites a recipe may name (codenames and their aliases).
pub const SUITES: &[&str] = &[
    "bullseye",
    "bookworm",
    "trixie",
    "sid",
    "oldstable",
    "stable",
    "testing",
    "unstable",
];

/// The mirror when a recipe names none.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// The Debian suite the root is made of; none: busybox only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// Where Debian packages come from (default deb.debian.org).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<String>,
    /// Debian packages to install (with what they depend on).
    #[serde(default)]
    pub packages: Vec<String>,
    /// Files to add, after the packages.
    #[serde(default)]
    pub files: Vec<RecipeFile>,
    /// Shell commands run in the new root at build time, in order.
    #[serde(default)]
    pub run: Vec<String>,
    /// The environment every command in the guest starts with.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The user commands run as (root for now: the only one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Where commands start (default /workspace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Size of the sparse root filesystem; default: what it holds, plus
    /// room to install more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs_mib: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeFile {
    /// Absolute path in the guest.
    pub path: String,
    pub content: String,
    /// Permission bits (default 0o644).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

impl Recipe {
    /// Reads and checks a recipe file.
    pub fn load(path: &Path) -> Result<Self, BuildError> {
        let text = std::fs::read_to_string(path).map_err(|e| BuildError::io("read", path, e))?;
        Self::parse(&text, path)
    }

    /// Reads and checks a recipe's text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, BuildError> {
        let recipe: Recipe = toml::from_str(text).map_err(|e| BuildError::Recipe {
            path: path.to_owned(),
            why: e.to_string(),
        })?;
        recipe.check().map_err(|why| BuildError::Recipe {
            path: path.to_owned(),
            why,
        })?;
        Ok(recipe)
    }

    /// Every field within what the build can honour, or what is wrong.
    pub fn check(&self) -> Result<(), String> {
        match &self.base {
            Some(suite) if !SUITES.contains(&suite.as_str()) => {
                return Err(format!(
                    "`base` {suite:?} is not a Debian suite this builds: one of {}",
                    SUITES.join(", ")
                ));
            }
            None if !self.packages.is_empty() || !self.run.is_empty() || self.mirror.is_some() => {
                return Err(
                    "`packages`, `run` and `mirror` need a `base` (a Debian suite, e.g. \"bookworm\")"
                        .into(),
                );
            }
            _ => {}
        }
        if let Some(mirror) = &self.mirror
            && (!(mirror.starts_with("http://") || mirror.starts_with("https://"))
                || mirror.chars().any(char::is_whitespace))
        {
            return Err(format!(
                "`mirror` {mirror:?} must be an http:// or https:// URL"
            ));
        }
        for package in &self.packages {
            // Debian policy 5.6.1: lowercase letters, digits, + - . ; two
            // characters at least, starting alphanumeric.
            let ok = package.len() >= 2
                && package.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && package
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
            if !ok {
                return Err(format!("package {package:?} is not a Debian package name"));
            }
        }
        for file in &self.files {
            if !file.path.starts_with('/')
                || file.path.split('/').any(|part| part == "..")
                || file.path.contains('\0')
            {
                return Err(format!(
                    "file path {:?} must be absolute, without `..`",
                    file.path
                ));
            }
            if file.mode.is_some_and(|m| m > 0o7777) {
                return Err(format!("file {:?}: mode must be at most 0o7777", file.path));
            }
        }
        for (key, value) in &self.env {
            let ok = !key.is_empty()
                && !key.starts_with(|c: char| c.is_ascii_digit())
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok || value.contains('\0') || value.contains('\n') {
                return Err(format!(
                    "env {key:?}: names are letters, digits and `_`; values one line"
                ));
            }
        }
        if let Some(user) = &self.user
            && user != "root"
        {
            return Err(format!(
                "`user` {user:?}: only \"root\" for now (guest-mcp runs commands as itself)"
            ));
        }
        if let Some(dir) = &self.workdir
            && (!dir.starts_with('/') || dir.split('/').any(|p| p == "..") || dir.contains('\0'))
        {
            return Err(format!("`workdir` {dir:?} must be absolute, without `..`"));
        }
        if self
            .rootfs_mib
            .is_some_and(|m| !(64..=64 << 10).contains(&m))
        {
            return Err("`rootfs_mib` must be between 64 and 65536".into());
        }
        Ok(())
    }

    /// The recipe as the build digests it: every field, in a fixed order.
    pub fn canonical(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// `/etc/nexus/environment`: `KEY='value'` lines a shell reads.
    pub fn environment_file(&self) -> String {
        self.env
            .iter()
            .map(|(k, v)| format!("{k}={}\n", crate::image::shell_quote(v)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(toml: &str) -> Result<Recipe, String> {
        let recipe: Recipe = toml::from_str(toml).map_err(|e| e.to_string())?;
        recipe.check()?;
        Ok(recipe)
    }

    #[test]
    fn a_recipe_reads_and_bad_ones_say_what_is_wrong() {
        let ok = recipe(
            "base = \"bookworm\"\npackages = [\"python3\", \"g++\"]\n[env]\nLANG = \"C.UTF-8\"\n",
        )
        .unwrap();
        assert_eq!(ok.packages, ["python3", "g++"]);
        assert_eq!(ok.environment_file(), "LANG='C.UTF-8'\n");
        for (toml, says) in [
            ("base = \"buster-of-doom\"", "is not a Debian suite"),
            ("packages = [\"git\"]", "need a `base`"),
            (
                "base = \"bookworm\"\npackages = [\"Git\"]",
                "not a Debian package name",
            ),
            (
                "base = \"bookworm\"\npackages = [\"git; rm -rf /\"]",
                "not a Debian package name",
            ),
            (
                "[[files]]\npath = \"etc/x\"\ncontent = \"\"",
                "must be absolute",
            ),
            (
                "[[files]]\npath = \"/etc/../../x\"\ncontent = \"\"",
                "without `..`",
            ),
            ("[env]\n\"A B\" = \"x\"", "names are letters"),
            ("user = \"alice\"", "only \"root\""),
            ("packges = []", "unknown field `packges`"),
            ("base = \"bookworm\"\nmirror = \"ftp://x\"", "http://"),
        ] {
            let err = recipe(toml).unwrap_err();
            assert!(err.contains(says), "{toml}: {err}");
        }
    }

    #[test]
    fn the_default_recipe_is_valid() {
        let text = include_str!("../recipes/default.toml");
        let recipe: Recipe = toml::from_str(text).unwrap();
        recipe.check().unwrap();
        assert_eq!(recipe.base.as_deref(), Some("bookworm"));
        for needed in ["python3", "git", "build-essential", "nodejs", "npm", "jq"] {
            assert!(recipe.packages.iter().any(|p| p == needed), "{needed}");
        }
    }
}
