//! Images as nexusd makes them: from a recipe, an OCI image layout, a
//! `docker save` / OCI archive, or a built image directory on the host.
//! A build takes its kernel and guest-mcp from an image at hand (`base`),
//! so nexusd needs neither a kernel source tree nor a Rust toolchain.
//! Builds are kept in `<state>/builds/NAME`, so an unchanged recipe
//! rebuilds in a moment. One image operation runs at a time (builds are
//! CPU- and disk-heavy, and a base must not change under a build).

use std::path::{Path, PathBuf};

use nexus_rootfs::{BuildOptions, Recipe};
use nexus_storage::{ImageChange, ImageInfo, StorageError, validate_name};

use super::{Daemon, DaemonError, Progress, Result};

/// Images tried, in order, for a build's kernel and guest-mcp when the
/// caller names none.
const BASE_CANDIDATES: [&str; 2] = ["default", "minimal"];

/// What an image is made from.
#[derive(Debug, Clone)]
pub enum ImageInput {
    /// A recipe's TOML text.
    Recipe(String),
    /// A path on the host: an image directory, an OCI layout, or an archive.
    Path(PathBuf),
    /// An image in an OCI registry; `plain_http` for one on loopback.
    Reference { reference: String, plain_http: bool },
}

/// How long a pull may take in all.
const PULL_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// What `build_image` / `import_image` did.
#[derive(Debug, Clone)]
pub struct ImageOutcome {
    pub image: ImageInfo,
    pub change: ImageChange,
    pub seconds: f64,
}

/// How an input becomes an image directory.
enum Plan {
    /// It is one already.
    Import(PathBuf),
    /// A root from a recipe and/or OCI layers.
    Build {
        recipe: Box<Recipe>,
        oci: Option<Oci>,
    },
}

enum Oci {
    Layout(PathBuf),
    Archive(PathBuf),
}

impl Daemon {
    /// Makes image `name` from `input` and makes it the version new VMs
    /// get; VMs made from an earlier version keep theirs. On failure the
    /// catalog and the pool are as they were.
    pub async fn make_image(
        &self,
        name: &str,
        input: ImageInput,
        base: Option<String>,
        progress: Option<Progress>,
    ) -> Result<ImageOutcome> {
        validate_name("image", name).map_err(StorageError::from)?;
        let started = std::time::Instant::now();
        let (plan, source, pulled) = match input {
            ImageInput::Reference {
                reference,
                plain_http,
            } => {
                nexus_rootfs::registry::parse_reference(&reference)
                    .map_err(|e| DaemonError::Invalid(chain(&e)))?;
                let _one_at_a_time = self.image_ops.lock().await;
                // A base that is not there is said before minutes of pulling.
                self.base_dir(base.as_deref()).await?;
                let scratch = pull(name, &reference, plain_http, progress.clone()).await?;
                let plan = Plan::Build {
                    recipe: Box::default(),
                    oci: Some(Oci::Layout(scratch.path().join("layout"))),
                };
                (plan, format!("registry {reference}"), Some(scratch))
            }
            input => {
                let (plan, source) = plan(input)?;
                if base.is_some() && matches!(plan, Plan::Import(_)) {
                    return Err(DaemonError::Invalid(
                        "`base` is for recipes and OCI images: a built image directory has its \
                         own kernel and guest-mcp"
                            .into(),
                    ));
                }
                (plan, source, None)
            }
        };
        let _one_at_a_time = self.image_ops.lock().await;
        let base_dir = match &plan {
            Plan::Build { .. } => Some(self.base_dir(base.as_deref()).await?),
            Plan::Import(_) => None,
        };
        let out = self.config.state_dir.join("builds").join(name);
        let storage = self.storage.clone();
        let name = name.to_owned();
        let task = tokio::task::spawn_blocking(move || -> Result<nexus_storage::Imported> {
            // The pulled layout lives until the build is done with it.
            let _pulled = pulled;
            let dir = match plan {
                Plan::Import(dir) => dir,
                Plan::Build { recipe, oci } => {
                    build(&name, *recipe, oci, base_dir, &out, progress)?;
                    out
                }
            };
            storage
                .import_image_from(&name, &dir, &source)
                .map_err(|e| match e {
                    // Told whole: the caller is an admin, the path theirs.
                    StorageError::BadImage(path, why) => DaemonError::Image {
                        image: name.clone(),
                        why: format!("{}: {why}", path.display()),
                    },
                    other => other.into(),
                })
        });
        let imported = task
            .await
            .map_err(|e| DaemonError::Internal(format!("image task: {e}")))??;
        if let ImageChange::Replaced { kept_for, .. } = &imported.change {
            tracing::info!(
                image = imported.image.name,
                digest = imported.image.digest,
                kept_for = ?kept_for,
                "image replaced: new VMs get the new version"
            );
        }
        if !matches!(imported.change, ImageChange::Unchanged) {
            self.drain_warm(&imported.image.name).await;
        }
        Ok(ImageOutcome {
            image: imported.image,
            change: imported.change,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Deletes image `name`: refused while a VM (with its snapshots)
    /// uses it, naming them.
    pub async fn delete_image(&self, name: &str) -> Result<()> {
        validate_name("image", name).map_err(StorageError::from)?;
        let _one_at_a_time = self.image_ops.lock().await;
        let owned = name.to_owned();
        self.blocking(move |s| s.delete_image(&owned)).await?;
        self.drain_warm(name).await;
        let _ = std::fs::remove_dir_all(self.config.state_dir.join("builds").join(name));
        Ok(())
    }

    /// The VMs made from image `name` (any version).
    pub async fn image_users(&self, name: &str) -> Result<Vec<String>> {
        let owned = name.to_owned();
        self.blocking(move |s| s.image_users(&owned)).await
    }

    /// The directory of the image a build takes its kernel and guest-mcp
    /// from: `base`, else the first of [`BASE_CANDIDATES`] there is.
    async fn base_dir(&self, base: Option<&str>) -> Result<PathBuf> {
        let wanted: Vec<String> = match base {
            Some(base) => {
                validate_name("image", base).map_err(StorageError::from)?;
                vec![base.to_owned()]
            }
            None => BASE_CANDIDATES.iter().map(|s| (*s).to_owned()).collect(),
        };
        for name in &wanted {
            let owned = name.clone();
            if let Some(image) = self.blocking(move |s| s.image(&owned)).await? {
                return Ok(image.path);
            }
        }
        Err(DaemonError::Invalid(match base {
            Some(base) => format!(
                "`base` image {base:?} does not exist: list_images shows the images there are"
            ),
            None => "no image to take a kernel and guest-mcp from: name one as `base`, or \
                     build `default` with scripts/build-image.sh"
                .to_owned(),
        }))
    }
}

/// Pulls `reference` into a layout in a scratch directory (gone with the
/// guard returned).
async fn pull(
    name: &str,
    reference: &str,
    plain_http: bool,
    progress: Option<Progress>,
) -> Result<tempfile::TempDir> {
    let scratch = scratch("pull-")?;
    let layout = scratch.path().join("layout");
    let failed = |why: String| DaemonError::Image {
        image: name.to_owned(),
        why,
    };
    let say = reporter(progress);
    // The registry module's own lines (per layer) go to nexusd's log: a
    // thread-local sink cannot follow an async task between threads.
    say(&format!("pulling {reference}"));
    match tokio::time::timeout(
        PULL_DEADLINE,
        nexus_rootfs::registry::pull_to_layout(reference, &layout, plain_http),
    )
    .await
    {
        Ok(Ok(digest)) => {
            say(&format!("pulled {reference} ({digest})"));
            Ok(scratch)
        }
        Ok(Err(e)) => Err(failed(chain(&e))),
        Err(_) => Err(failed(format!(
            "pulling {reference} took longer than {} minutes",
            PULL_DEADLINE.as_secs() / 60
        ))),
    }
}

/// What `input` asks for, and how the image's source is recorded.
fn plan(input: ImageInput) -> Result<(Plan, String)> {
    match input {
        ImageInput::Recipe(text) => {
            let recipe = Recipe::parse(&text, Path::new("recipe"))
                .map_err(|e| DaemonError::Invalid(chain(&e)))?;
            let source = match &recipe.base {
                Some(suite) => format!("recipe (debian {suite})"),
                None => "recipe (busybox)".to_owned(),
            };
            Ok((
                Plan::Build {
                    recipe: Box::new(recipe),
                    oci: None,
                },
                source,
            ))
        }
        ImageInput::Reference { .. } => Err(DaemonError::Internal(
            "a reference is pulled before it is planned".into(),
        )),
        ImageInput::Path(path) => {
            if !path.is_absolute() {
                return Err(DaemonError::Invalid(format!(
                    "`path` {} must be absolute (a path on nexusd's host)",
                    path.display()
                )));
            }
            let meta = std::fs::metadata(&path)
                .map_err(|e| DaemonError::Invalid(format!("`path` {}: {e}", path.display())))?;
            let build = |oci| Plan::Build {
                recipe: Box::default(),
                oci: Some(oci),
            };
            // An unpacked `docker save` (Docker 25 on) holds both an
            // oci-layout and a Docker manifest.json: a layout first.
            if meta.is_dir() && path.join("oci-layout").is_file() {
                Ok((build(Oci::Layout(path)), "OCI layout".into()))
            } else if meta.is_dir() && path.join("manifest.json").is_file() {
                Ok((Plan::Import(path), "image directory".into()))
            } else if meta.is_file() {
                Ok((build(Oci::Archive(path)), "image archive".into()))
            } else {
                Err(DaemonError::Invalid(format!(
                    "`path` {} is neither an image directory (manifest.json), an OCI layout \
                     (oci-layout) nor an image archive (docker save, oci-archive)",
                    path.display()
                )))
            }
        }
    }
}

/// Builds into `out` (blocking), reporting progress lines.
fn build(
    name: &str,
    recipe: Recipe,
    oci: Option<Oci>,
    base: Option<PathBuf>,
    out: &Path,
    progress: Option<Progress>,
) -> Result<()> {
    let failed = |e: nexus_rootfs::BuildError| DaemonError::Image {
        image: name.to_owned(),
        why: chain(&e),
    };
    // An archive is unpacked here, and gone with the guard.
    let scratch = scratch("archive-")?;
    let layout = match oci {
        None => None,
        Some(Oci::Layout(path)) => Some(path),
        Some(Oci::Archive(path)) => {
            Some(nexus_rootfs::oci::layout_from_archive(&path, scratch.path()).map_err(failed)?)
        }
    };
    let opts = BuildOptions {
        recipe,
        oci: layout,
        base,
        ..BuildOptions::new(out, name)
    };
    let fresh = !out.join("manifest.json").exists();
    let built = nexus_rootfs::with_progress(reporter(progress), || nexus_rootfs::build(&opts));
    if built.is_err() && fresh {
        // Nothing of a first build that failed is kept.
        let _ = std::fs::remove_dir_all(out);
    }
    built.map(|_| ()).map_err(failed)
}

/// A new scratch directory in the image cache (crash leftovers are
/// removed by the next build's pruning), gone with its guard.
fn scratch(prefix: &str) -> Result<tempfile::TempDir> {
    let cache_dir = nexus_rootfs::default_cache_dir();
    let failed = |e: std::io::Error| DaemonError::Internal(format!("{}: {e}", cache_dir.display()));
    std::fs::create_dir_all(&cache_dir).map_err(failed)?;
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&cache_dir)
        .map_err(failed)
}

/// Where an image operation's progress lines go: nexusd's log, and the
/// caller's progress notifications when it asked for them.
fn reporter(progress: Option<Progress>) -> impl Fn(&str) + 'static {
    move |line: &str| {
        tracing::info!(target: "nexus_host::image_build", "{line}");
        if let Some(progress) = &progress {
            let _ = progress.send((0.0, line.to_owned()));
        }
    }
}

/// An error with its causes, in one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}
