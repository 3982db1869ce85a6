//! The image directory: kernel files, root filesystem, optional initrd and
//! manifest, each rebuilt only when its inputs changed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::manifest::{BootHints, FileEntry, Manifest};
use crate::recipe::Recipe;
use crate::{BuildError, digest, guest_bin, inroot, kernel, run, userland};

/// Bumped whenever the image layout or its init changes.
const RECIPE_VERSION: &str = "nexus-image-recipe-2";

/// The guest's init configuration, copied into every root filesystem.
const GUEST_FILES: &[(&str, &str, u32)] = &[
    ("etc/inittab", include_str!("../guest/inittab"), 0o644),
    ("etc/nexus/rcS", include_str!("../guest/rcS"), 0o755),
    ("etc/nexus/rcK", include_str!("../guest/rcK"), 0o755),
    (
        "etc/nexus/guest-mcp.sh",
        include_str!("../guest/guest-mcp.sh"),
        0o755,
    ),
    ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", 0o644),
    ("etc/group", "root:x:0:\ntty:x:5:\n", 0o644),
    ("etc/hostname", "nexus\n", 0o644),
];

/// The modular kernel's initrd loads these (and what they depend on), then
/// hands over to the root filesystem's init.
const INITRD_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "vmw_vsock_virtio_transport",
    "ext4",
    // Free page reporting (nexus-vmm attaches the balloon).
    "virtio_balloon",
];
const INITRD_INIT: &str = include_str!("../guest/initrd-init");

const BUSYBOX: &str = "/bin/busybox";

#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub out: PathBuf,
    pub name: String,
    /// A kernel to use instead of building the default one.
    pub kernel: Option<PathBuf>,
    /// The supplied kernel's module tree (`/lib/modules/<version>`).
    pub modules: Option<PathBuf>,
    /// The supplied kernel needs ACPI to find its devices.
    pub acpi: bool,
    pub guest_mcp: Option<PathBuf>,
    pub cache_dir: PathBuf,
    /// Size of the sparse root filesystem; None: the recipe's, else
    /// what the root holds plus room (a userland) or 128 MiB (busybox).
    pub rootfs_mib: Option<u64>,
    /// What goes into the root filesystem (default: busybox only).
    pub recipe: Recipe,
    /// An OCI image layout whose layers make the root (the recipe then
    /// may not name a base).
    pub oci: Option<PathBuf>,
    /// An image directory whose kernel and guest-mcp this image takes
    /// (when `kernel` and `guest_mcp` are not given): how nexusd builds
    /// without a kernel source tree or a Rust toolchain.
    pub base: Option<PathBuf>,
}

impl BuildOptions {
    /// Image `name` in `out`: Nexus's kernel and a workspace-built
    /// guest-mcp, busybox only, the default cache; callers change what
    /// they need with struct update syntax.
    pub fn new(out: impl Into<PathBuf>, name: impl Into<String>) -> Self {
        Self {
            out: out.into(),
            name: name.into(),
            kernel: None,
            modules: None,
            acpi: false,
            guest_mcp: None,
            cache_dir: crate::default_cache_dir(),
            rootfs_mib: None,
            recipe: Recipe::default(),
            oci: None,
            base: None,
        }
    }
}

/// Builds the image in `opts.out`, or leaves it as it is when nothing changed.
pub fn build(opts: &BuildOptions) -> Result<Manifest, BuildError> {
    let started = Instant::now();
    let recipe = &opts.recipe;
    recipe.check().map_err(|why| BuildError::Recipe {
        path: PathBuf::from(&opts.name),
        why,
    })?;
    if opts.oci.is_some() && recipe.base.is_some() {
        return Err(BuildError::Oci {
            why: "an image's root comes from an OCI layout or a recipe's base, not both".into(),
        });
    }
    let oci_digest = opts
        .oci
        .as_deref()
        .map(crate::oci::manifest_digest)
        .transpose()?;
    if opts.modules.is_some() && opts.kernel.is_none() {
        return Err(BuildError::Kernel {
            why: "--modules only makes sense with --kernel (the default kernel has no modules)"
                .into(),
        });
    }
    std::fs::create_dir_all(&opts.out).map_err(|e| BuildError::io("create", &opts.out, e))?;
    // One build of a directory at a time (tests of one run all make sure
    // of the shared images): a second waits, then finds it up to date.
    let lock_path = opts.out.join(".build.lock");
    let lock =
        std::fs::File::create(&lock_path).map_err(|e| BuildError::io("create", &lock_path, e))?;
    lock.lock()
        .map_err(|e| BuildError::io("lock", &lock_path, e))?;
    std::fs::create_dir_all(&opts.cache_dir)
        .map_err(|e| BuildError::io("create", &opts.cache_dir, e))?;
    crate::prune_scratch(&opts.cache_dir);
    let base_manifest = opts.base.as_deref().map(Manifest::load).transpose()?;
    let kernel = match (&opts.kernel, &opts.base) {
        (Some(path), _) => kernel::from_path(path)?,
        (None, Some(base)) => kernel::from_image(base)?,
        (None, None) => kernel::build_default(&opts.cache_dir)?,
    };
    // Where a base image's guest-mcp is copied to; removed with its guard.
    let base_guest = tempfile::Builder::new()
        .prefix("base-guest-")
        .tempdir_in(&opts.cache_dir)
        .map_err(|e| BuildError::io("create", &opts.cache_dir, e))?;
    let guest = match (&opts.guest_mcp, &opts.base) {
        (None, Some(base)) => guest_bin::from_image(base, base_guest.path())?,
        (explicit, _) => guest_bin::locate_or_build(explicit.as_deref())?,
    };
    // The init that starts guest-mcp goes with it: a base image's guest-mcp
    // gets the base's init (a newer init may pass it flags it lacks).
    let mut guest_files = Vec::new();
    for (path, content, mode) in GUEST_FILES {
        let from_base = match (&opts.base, opts.guest_mcp.is_none() && is_init(path)) {
            (Some(base), true) => {
                let out = base_guest.path().join(path.replace('/', "_"));
                if guest_bin::dump_from_image(base, path, &out)? {
                    Some(std::fs::read(&out).map_err(|e| BuildError::io("read", &out, e))?)
                } else {
                    None
                }
            }
            _ => None,
        };
        guest_files.push((
            *path,
            from_base.unwrap_or_else(|| content.as_bytes().to_vec()),
            *mode,
        ));
    }
    let acpi =
        opts.acpi || (opts.kernel.is_none() && base_manifest.as_ref().is_some_and(|m| m.boot.acpi));
    // A base image's guest-mcp is described by its manifest: a binary
    // out of an image is never run on the host.
    let (guest_mcp_version, guest_tools) = match (&opts.guest_mcp, base_manifest) {
        (None, Some(m)) => (m.guest_mcp_version, m.guest_tools),
        _ => (
            guest_bin::version_of(&guest)?,
            Some(guest_bin::tools_of(&guest)?),
        ),
    };
    let busybox = Path::new(BUSYBOX);
    let busybox_bytes = std::fs::read(busybox).map_err(|_| BuildError::Missing {
        what: "static busybox",
        path: busybox.into(),
        hint: "install it with `apt-get install busybox-static` (scripts/install-deps.sh does)"
            .into(),
    })?;
    if guest_bin::is_static_elf(&busybox_bytes) != Some(true) {
        return Err(BuildError::Missing {
            what: "static busybox",
            path: busybox.into(),
            hint: "it is dynamically linked: `apt-get install busybox-static`".into(),
        });
    }

    let kernel_files: Vec<(&str, &PathBuf)> =
        [("kernel", &kernel.bzimage), ("vmlinux", &kernel.vmlinux)]
            .into_iter()
            .filter_map(|(name, path)| path.as_ref().map(|p| (name, p)))
            .collect();
    let mut inputs = format!(
        "{RECIPE_VERSION}\nname {}\nkernel {} {}\nbusybox {}\nguest {}\nrootfs_mib {:?}\nacpi {}\nrecipe {}\n",
        opts.name,
        kernel.release,
        kernel.config_digest,
        digest::sha256_hex(&busybox_bytes),
        digest::file_sha256(&guest)?,
        opts.rootfs_mib,
        acpi,
        recipe.canonical(),
    );
    if recipe.base.is_some() {
        inputs.push_str(&format!("userland {}\n", userland::digest_of(recipe)));
    }
    if let Some(digest) = &oci_digest {
        inputs.push_str(&format!("oci {digest}\n"));
    }
    for (name, path) in &kernel_files {
        inputs.push_str(&format!("{name} {}\n", digest::file_sha256(path)?));
    }
    for (path, content, mode) in &guest_files {
        inputs.push_str(&format!(
            "{path} {mode:o} {}\n",
            digest::sha256_hex(content)
        ));
    }
    if let Some(modules) = &opts.modules {
        inputs.push_str(&format!(
            "modules {} {}\n",
            modules.display(),
            digest::sha256_hex(INITRD_INIT.as_bytes())
        ));
    }
    let inputs_digest = digest::sha256_hex(inputs.as_bytes());

    if let Ok(existing) = Manifest::load(&opts.out)
        && existing.inputs_digest == inputs_digest
        && existing.verify(&opts.out, false).is_ok()
    {
        progress!(
            "image {} is up to date ({}, checked in {:.1} s)",
            opts.name,
            opts.out.display(),
            started.elapsed().as_secs_f64()
        );
        return Ok(existing);
    }

    for (name, path) in &kernel_files {
        copy_atomic(path, &opts.out.join(name))?;
    }
    // A file the new image does not have must not linger from an old one.
    let keeps = |name: &str| {
        kernel_files.iter().any(|(n, _)| *n == name) || (name == "initrd" && opts.modules.is_some())
    };
    for stale in ["kernel", "vmlinux", "initrd"] {
        if !keeps(stale) {
            let _ = std::fs::remove_file(opts.out.join(stale));
        }
    }

    // Private (0700: it holds the image's setuid files) and unique per
    // build; removed with its guard.
    std::fs::create_dir_all(&opts.cache_dir)
        .map_err(|e| BuildError::io("create", &opts.cache_dir, e))?;
    let work_dir = tempfile::Builder::new()
        .prefix("image-work-")
        .tempdir_in(&opts.cache_dir)
        .map_err(|e| BuildError::io("create", &opts.cache_dir, e))?;
    let work = work_dir.path().to_path_buf();
    // What the root was made with: the recipe, with an OCI image's
    // defaults where it says nothing; and the OCI image's user.
    let result = (|| -> Result<(Recipe, Option<String>), BuildError> {
        let stage = work.join("root");
        let mut effective = recipe.clone();
        let mut oci_user = None;
        if recipe.base.is_some() {
            let tar = userland::tarball(recipe, &opts.cache_dir)?;
            progress!("rootfs: unpacking the userland");
            userland::unpack(&tar, &stage)?;
        }
        if let Some(layout) = &opts.oci {
            progress!("rootfs: unpacking OCI image {}", layout.display());
            let defaults = crate::oci::unpack(layout, &stage)?;
            // The image's Env under the recipe's; its WorkingDir unless
            // the recipe says otherwise.
            for (k, v) in defaults.env {
                effective.env.entry(k).or_insert(v);
            }
            if effective.workdir.is_none() {
                effective.workdir = defaults.workdir;
            }
            oci_user = defaults.user;
            // What the image brought is held to the recipe's rules.
            effective.check().map_err(|why| BuildError::Oci {
                why: format!("its config: {why}"),
            })?;
        }
        progress!("rootfs: staging busybox, guest-mcp and init");
        stage_root(&stage, &guest, &guest_files, &effective)?;
        let mib = match opts.rootfs_mib.or(recipe.rootfs_mib) {
            Some(mib) => mib,
            // What it holds, half again for what agents install, and a
            // little more: the file is sparse, so room costs nothing.
            None if recipe.base.is_some() || opts.oci.is_some() => tree_mib(&stage)? * 3 / 2 + 512,
            None => 128,
        };
        progress!("rootfs: mkfs.ext4 -d ({mib} MiB, sparse)");
        let tmp = opts
            .out
            .join(format!(".rootfs.ext4.tmp-{}", std::process::id()));
        let made = run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "nexus-root", "-E", "root_owner=0:0", "-d"])
            .arg(&stage)
            .arg(&tmp)
            .arg(format!("{mib}M")));
        if let Err(e) = made {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, opts.out.join("rootfs.ext4"))
            .map_err(|e| BuildError::io("rename", &tmp, e))?;
        if let Some(modules) = &opts.modules {
            progress!("initrd: packing {} modules' loader", modules.display());
            build_initrd(modules, &work.join("initrd"), &opts.out.join("initrd"))?;
        }
        Ok((effective, oci_user))
    })();
    drop(work_dir);
    let (effective, oci_user) = result?;
    if let Some(user) = oci_user
        .as_deref()
        .filter(|u| !matches!(*u, "root" | "0" | "0:0"))
    {
        progress!("the image's User is {user:?}: commands run as root for now");
    }

    let mut files = BTreeMap::new();
    let mut names: Vec<&str> = kernel_files.iter().map(|(n, _)| *n).collect();
    names.push("rootfs.ext4");
    if opts.modules.is_some() {
        names.push("initrd");
    }
    for name in names {
        let path = opts.out.join(name);
        let size = std::fs::metadata(&path)
            .map_err(|e| BuildError::io("stat", &path, e))?
            .len();
        files.insert(
            name.to_owned(),
            FileEntry {
                size,
                sha256: digest::file_sha256(&path)?,
            },
        );
    }
    let boot = if opts.modules.is_some() {
        BootHints {
            cmdline: "root=/dev/vda rw rootfstype=ext4 rdinit=/init".into(),
            acpi: true,
        }
    } else {
        BootHints {
            cmdline: "root=/dev/vda rw rootfstype=ext4 init=/sbin/init".into(),
            acpi,
        }
    };
    let manifest = Manifest {
        name: opts.name.clone(),
        kernel_version: kernel.release,
        kernel_config_digest: kernel.config_digest,
        kernel_source: kernel.source,
        guest_mcp_version,
        guest_tools,
        built_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        inputs_digest,
        boot,
        files,
        userland: match (&recipe.base, &oci_digest) {
            (Some(suite), _) => format!("debian {suite}"),
            (None, Some(digest)) => format!("oci {digest}"),
            (None, None) => "busybox".into(),
        },
        env: effective.env.clone(),
        workdir: effective
            .workdir
            .clone()
            .unwrap_or_else(|| DEFAULT_WORKDIR.into()),
        // Commands run as root whatever an OCI image's User says (shown
        // at build time).
        user: effective.user.clone().unwrap_or_else(|| "root".into()),
    };
    manifest.save(&opts.out)?;
    progress!(
        "image {} built in {:.1} s at {}",
        opts.name,
        started.elapsed().as_secs_f64(),
        opts.out.display()
    );
    Ok(manifest)
}

/// Where commands start when the recipe does not say.
pub const DEFAULT_WORKDIR: &str = "/workspace";

/// Lays out the root filesystem's tree in `stage`: on top of a userland
/// if one is there (busybox then fills only what it lacks, and its users
/// and groups stay), else busybox alone.
/// Whether a guest file is part of the init that starts guest-mcp.
fn is_init(path: &str) -> bool {
    path == "etc/inittab" || path.starts_with("etc/nexus/")
}

fn stage_root(
    stage: &Path,
    guest: &Path,
    guest_files: &[(&str, Vec<u8>, u32)],
    recipe: &Recipe,
) -> Result<(), BuildError> {
    std::fs::create_dir_all(stage).map_err(|e| BuildError::io("create", stage, e))?;
    // Every path through `inroot`: a userland's symlinks lead somewhere
    // in the root, never out of it onto the host.
    let dir = |rel: &str| inroot::make_dir(stage, Path::new(rel)).map(|_| ());
    for rel in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc/nexus",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "root",
        "var/log",
        "workspace",
        "lib/modules",
    ] {
        dir(rel)?;
    }
    install_busybox(stage)?;
    let guest_target = inroot::for_writing(stage, Path::new(guest_bin::GUEST_PATH))?;
    guest_bin::strip_into(guest, &guest_target)?;
    for (path, content, mode) in guest_files {
        let target = inroot::resolve(stage, Path::new(path), true)?;
        if USERLAND_OWNS.contains(path) && std::fs::symlink_metadata(&target).is_ok() {
            continue;
        }
        write_in(stage, path, content, *mode)?;
    }
    for file in &recipe.files {
        write_in(
            stage,
            &file.path,
            file.content.as_bytes(),
            file.mode.unwrap_or(0o644),
        )?;
    }
    write_in(
        stage,
        "etc/nexus/environment",
        recipe.environment_file().as_bytes(),
        0o644,
    )?;
    let workdir = recipe.workdir.as_deref().unwrap_or(DEFAULT_WORKDIR);
    dir(workdir.trim_start_matches('/'))?;
    write_in(
        stage,
        "etc/nexus/image.conf",
        format!("NEXUS_WORKDIR={}\n", shell_quote(workdir)).as_bytes(),
        0o644,
    )?;
    Ok(())
}

/// Writes `rel` in the root at `stage` (see `inroot`).
fn write_in(stage: &Path, rel: &str, content: &[u8], mode: u32) -> Result<(), BuildError> {
    let path = inroot::for_writing(stage, Path::new(rel.trim_start_matches('/')))?;
    write_mode(&path, content, mode)
}

/// Files a userland (Debian's, an OCI image's) may have its own of.
const USERLAND_OWNS: &[&str] = &["etc/passwd", "etc/group"];

/// MiB the tree at `dir` takes.
fn tree_mib(dir: &Path) -> Result<u64, BuildError> {
    let out = Command::new("du")
        .args(["-s", "-m", "-x"])
        .arg(dir)
        .output()
        .map_err(|source| BuildError::Spawn {
            program: "du".into(),
            source,
        })?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| BuildError::Userland {
            why: format!("could not measure {}", dir.display()),
        })
}

/// Copies busybox into `stage/bin` and links every applet to it.
fn install_busybox(stage: &Path) -> Result<(), BuildError> {
    let target = inroot::for_writing(stage, Path::new("bin/busybox"))?;
    std::fs::copy(BUSYBOX, &target).map_err(|e| BuildError::io("copy", Path::new(BUSYBOX), e))?;
    let out = Command::new(BUSYBOX)
        .arg("--list-full")
        .output()
        .map_err(|source| BuildError::Spawn {
            program: BUSYBOX.into(),
            source,
        })?;
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        let link = inroot::resolve(stage, Path::new(applet.trim_start_matches('/')), true)?;
        if link.symlink_metadata().is_ok() {
            continue;
        }
        std::os::unix::fs::symlink("/bin/busybox", &link)
            .map_err(|e| BuildError::io("link", &link, e))?;
    }
    Ok(())
}

/// An initrd for a modular kernel: busybox, the modules the guest needs in
/// `modules.dep` order, and an init that loads them and switches to the
/// root drive.
fn build_initrd(modules: &Path, stage: &Path, out: &Path) -> Result<(), BuildError> {
    let dep_file = modules.join("modules.dep");
    if !dep_file.is_file() {
        return Err(BuildError::Missing {
            what: "modules.dep",
            path: dep_file,
            hint: format!(
                "generate it with `depmod -b <root> <version>` for the tree that holds {}",
                modules.display()
            ),
        });
    }
    let deps =
        std::fs::read_to_string(&dep_file).map_err(|e| BuildError::io("read", &dep_file, e))?;
    let order = load_order(&deps, INITRD_MODULES).map_err(|why| BuildError::Kernel { why })?;
    for dir in ["bin", "sbin", "proc", "sys", "dev", "newroot", "modules"] {
        let path = stage.join(dir);
        std::fs::create_dir_all(&path).map_err(|e| BuildError::io("create", &path, e))?;
    }
    install_busybox(stage)?;
    let mut list = String::new();
    for (i, rel) in order.iter().enumerate() {
        let src = modules.join(rel);
        let name = format!(
            "{i:02}-{}",
            Path::new(rel)
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        );
        let name = name
            .trim_end_matches(".xz")
            .trim_end_matches(".zst")
            .to_owned();
        let dest = stage.join("modules").join(&name);
        if rel.ends_with(".xz") {
            let raw = Command::new("xz")
                .arg("-dc")
                .arg(&src)
                .output()
                .map_err(|source| BuildError::Spawn {
                    program: "xz".into(),
                    source,
                })?;
            std::fs::write(&dest, raw.stdout).map_err(|e| BuildError::io("write", &dest, e))?;
        } else {
            std::fs::copy(&src, &dest).map_err(|e| BuildError::io("copy", &src, e))?;
        }
        list.push_str(&name);
        list.push('\n');
    }
    write_mode(&stage.join("modules/order"), list.as_bytes(), 0o644)?;
    write_mode(&stage.join("init"), INITRD_INIT.as_bytes(), 0o755)?;
    let tmp = out.with_extension("tmp");
    let script = format!(
        "cd {} && find . | cpio -o -H newc --quiet | gzip -1 > {}",
        shell_quote(&stage.display().to_string()),
        shell_quote(&tmp.display().to_string())
    );
    run(Command::new("sh").arg("-c").arg(script))?;
    std::fs::rename(&tmp, out).map_err(|e| BuildError::io("rename", &tmp, e))
}

/// The modules (paths relative to the module tree) that load `wanted`, each
/// after everything it depends on.
pub fn load_order(modules_dep: &str, wanted: &[&str]) -> Result<Vec<String>, String> {
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in modules_dep.lines() {
        let Some((module, rest)) = line.split_once(':') else {
            continue;
        };
        deps.insert(
            module_name(module),
            (
                module.to_owned(),
                rest.split_whitespace().map(str::to_owned).collect(),
            ),
        );
    }
    let mut order: Vec<String> = Vec::new();
    fn visit(
        path: &str,
        deps: &BTreeMap<String, (String, Vec<String>)>,
        order: &mut Vec<String>,
        depth: usize,
    ) -> Result<(), String> {
        if depth > 64 {
            return Err(format!("dependency loop at {path}"));
        }
        if order.iter().any(|p| p == path) {
            return Ok(());
        }
        if let Some((_, requires)) = deps.get(&module_name(path)) {
            // modules.dep lists what a module needs; each of those first.
            for dep in requires.iter().rev() {
                visit(dep, deps, order, depth + 1)?;
            }
        }
        order.push(path.to_owned());
        Ok(())
    }
    for name in wanted {
        // A module missing from modules.dep is built in: nothing to load.
        if let Some((path, _)) = deps.get(*name) {
            visit(&path.clone(), &deps, &mut order, 0)?;
        }
    }
    Ok(order)
}

/// `kernel/drivers/virtio/virtio_mmio.ko.xz` -> `virtio_mmio` (and `-` -> `_`).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

pub(crate) fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn write_mode(path: &Path, content: &[u8], mode: u32) -> Result<(), BuildError> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| BuildError::io("create", parent, e))?;
    }
    std::fs::write(path, content).map_err(|e| BuildError::io("write", path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| BuildError::io("chmod", path, e))
}

fn copy_atomic(from: &Path, to: &Path) -> Result<(), BuildError> {
    let tmp = to.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::copy(from, &tmp).map_err(|e| BuildError::io("copy", from, e))?;
    std::fs::rename(&tmp, to).map_err(|e| BuildError::io("rename", &tmp, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_load_after_their_dependencies() {
        let dep = "\
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko kernel/net/vmw_vsock/vsock.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko
kernel/net/vmw_vsock/vsock.ko:
kernel/drivers/virtio/virtio_balloon.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
";
        let order = load_order(dep, INITRD_MODULES).unwrap();
        let names: Vec<String> = order.iter().map(|p| module_name(p)).collect();
        assert_eq!(
            names,
            [
                "virtio_ring",
                "virtio",
                "virtio_mmio",
                "virtio_blk",
                "vsock",
                "vmw_vsock_virtio_transport_common",
                "vmw_vsock_virtio_transport",
                "virtio_balloon",
            ]
        );
    }

    #[test]
    fn module_names_drop_paths_and_compression() {
        assert_eq!(module_name("kernel/fs/ext4/ext4.ko.xz"), "ext4");
        assert_eq!(module_name("a/b/crc32c-intel.ko"), "crc32c_intel");
    }
}
