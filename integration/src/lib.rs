//! The harness shared by Nexus's end-to-end tests and benchmarks.
//!
//! One [`Harness`] owns a temporary directory and a [`Vmm`] whose run
//! directories live in it. It boots VMs of the one shared default image
//! (built once by scripts/build-image.sh, or here if missing), each with a
//! private copy of the root filesystem and a fresh workspace drive, as
//! nexusd will do with btrfs clones. [`nexusd`] runs the daemon itself
//! for the benchmarks.

pub mod nexusd;
pub mod oci_fixture;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use nexus_rootfs::{BuildOptions, Manifest};
use nexus_vmm::qemu::QemuBackend;
use nexus_vmm::{Drive, Vm, VmSpec, Vmm, VmmConfig};
use rmcp::model::CallToolRequestParams;
use rmcp::service::RunningService;
use rmcp::{RoleClient, ServiceExt};

/// The workspace root, from this crate's location.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Whether nexusd's embedded pool can be made here (root, loop devices);
/// says why not, and fails instead where NEXUS_NO_SKIP is set (the test
/// script, as CI runs it).
pub fn can_run_nexusd() -> bool {
    let ok = nix::unistd::Uid::effective().is_root() && Path::new("/dev/loop-control").exists();
    if !ok {
        eprintln!("skipping: nexusd's embedded pool needs root and loop devices");
        assert!(
            std::env::var_os("NEXUS_NO_SKIP").is_none(),
            "this test cannot run here, and NEXUS_NO_SKIP (scripts/test.sh, as CI runs it) forbids skipping"
        );
    }
    ok
}

/// `$NEXUS_IMAGE_DIR`, else `target/images/minimal` in the workspace.
pub fn minimal_image_dir() -> PathBuf {
    std::env::var_os("NEXUS_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/images/minimal"))
}

/// Loads the minimal image (busybox, the fastest boots: what tests that
/// need only a shell use), built or brought up to date first.
pub fn ensure_minimal_image() -> anyhow::Result<(PathBuf, Manifest)> {
    let dir = minimal_image_dir();
    // Ours is brought up to date like the default image: a test must not
    // run a guest-mcp or init older than the tree (an unchanged image is
    // checked in about a second). One named by NEXUS_IMAGE_DIR is the
    // caller's: built only if missing.
    if std::env::var_os("NEXUS_IMAGE_DIR").is_none() || Manifest::load(&dir).is_err() {
        nexus_rootfs::build(&BuildOptions::new(&dir, "minimal"))?;
    }
    let manifest = Manifest::load(&dir)?;
    manifest.verify(&dir, false)?;
    Ok((dir, manifest))
}

/// The default image, the agent's computer (rootfs/recipes/default.toml:
/// a Debian userland), in `target/images/default`, built or brought up to
/// date first (its userland is cached: an unchanged recipe re-packs in
/// seconds).
pub fn ensure_default_image() -> anyhow::Result<(PathBuf, Manifest)> {
    let dir = workspace_root().join("target/images/default");
    let recipe = nexus_rootfs::Recipe::load(&workspace_root().join("rootfs/recipes/default.toml"))?;
    nexus_rootfs::build(&BuildOptions {
        recipe,
        ..BuildOptions::new(&dir, "default")
    })?;
    let manifest = Manifest::load(&dir)?;
    manifest.verify(&dir, false)?;
    Ok((dir, manifest))
}

/// Boots VMs for one test, and removes everything of theirs at the end.
pub struct Harness {
    pub image_dir: PathBuf,
    pub manifest: Manifest,
    pub vmm: Vmm,
    /// Drives and console logs of this harness's VMs.
    pub dir: tempfile::TempDir,
}

/// The CID lock directory every process on the host shares.
pub const CID_DIR: &str = "/run/nexus/cid";

impl Harness {
    pub fn new() -> anyhow::Result<Self> {
        let (image_dir, manifest) = ensure_default_image()?;
        Self::with_image(image_dir, manifest)
    }

    pub fn with_image(image_dir: PathBuf, manifest: Manifest) -> anyhow::Result<Self> {
        // Short paths: Unix socket paths must fit in 108 bytes.
        let dir = tempfile::Builder::new().prefix("nx").tempdir_in("/tmp")?;
        let backend = QemuBackend::locate(None, None)?;
        let vmm = Vmm::new(
            Arc::new(backend),
            VmmConfig {
                run_root: dir.path().join("run"),
                cid_dir: CID_DIR.into(),
                ..VmmConfig::default()
            },
        );
        Ok(Self {
            image_dir,
            manifest,
            vmm,
            dir,
        })
    }

    /// A spec for VM `name` of the image: a private root drive (a reflink
    /// or sparse copy of the image's) and a fresh 1 GiB ext4 workspace.
    pub fn spec(&self, name: &str) -> anyhow::Result<VmSpec> {
        let vm_dir = self.dir.path().join("vms").join(name);
        std::fs::create_dir_all(&vm_dir)?;
        let root = vm_dir.join("root.ext4");
        let status = Command::new("cp")
            .args(["--reflink=auto", "--sparse=always"])
            .arg(self.image_dir.join("rootfs.ext4"))
            .arg(&root)
            .status()?;
        if !status.success() {
            bail!("copying the root filesystem failed");
        }
        let workspace = vm_dir.join("workspace.ext4");
        make_workspace(&workspace, 1024)?;
        let mut spec = VmSpec::new(name, self.manifest.boot_kernel(&self.image_dir));
        spec.initrd = self.manifest.initrd(&self.image_dir);
        spec.cmdline = self.manifest.boot.cmdline.clone();
        spec.acpi = self.manifest.boot.acpi;
        spec.drives = vec![
            Drive {
                path: root,
                read_only: false,
            },
            Drive {
                path: workspace,
                read_only: false,
            },
        ];
        spec.memory_mib = 256;
        spec.console_log = vm_dir.join("console.log");
        spec.ready_timeout = Duration::from_secs(90);
        Ok(spec)
    }

    pub async fn boot(&self, name: &str) -> anyhow::Result<Vm> {
        let spec = self.spec(name)?;
        self.vmm
            .start(spec)
            .await
            .with_context(|| format!("booting {name}"))
    }
}

/// A sparse ext4 file of `mib` MiB, made without mounting anything.
pub fn make_workspace(path: &Path, mib: u64) -> anyhow::Result<()> {
    let file = std::fs::File::create(path)?;
    file.set_len(mib << 20)?;
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "workspace", "-E", "root_owner=0:0"])
        .arg(path)
        .output()?;
    if !out.status.success() {
        bail!("mkfs.ext4 failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// An MCP client session with the VM's guest-mcp (port 1024).
pub async fn guest_client(vm: &Vm) -> anyhow::Result<RunningService<RoleClient, ()>> {
    let stream = vm.connect(nexus_vmm::GUEST_TOOLS_PORT).await?;
    Ok(().serve(stream).await?)
}

/// An MCP client session with the VM's control channel (port 1023).
pub async fn control_client(vm: &Vm) -> anyhow::Result<RunningService<RoleClient, ()>> {
    let stream = vm.connect(nexus_vmm::GUEST_CONTROL_PORT).await?;
    Ok(().serve(stream).await?)
}

/// Calls a tool and returns its structured result, failing on a tool error.
pub async fn call(
    client: &RunningService<RoleClient, ()>,
    tool: &str,
    args: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let mut params = CallToolRequestParams::new(tool.to_owned());
    if let serde_json::Value::Object(map) = args {
        params = params.with_arguments(map);
    }
    let result = client.call_tool(params).await?;
    if result.is_error == Some(true) {
        bail!("{tool} failed: {:?}", result.content);
    }
    Ok(result.structured_content.unwrap_or_default())
}

/// Calls `exec` with a shell command and returns its structured result.
pub async fn exec(
    client: &RunningService<RoleClient, ()>,
    command: &str,
) -> anyhow::Result<serde_json::Value> {
    call(client, "exec", serde_json::json!({ "command": command })).await
}

/// Whether a process is alive (a zombie counts as dead).
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
    })
}

/// Processes whose command line or working directory mentions `needle`
/// (a VM's run directory).
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        // By its command line, or by its working directory (a VM's vsock
        // helper runs in its run directory, its sockets elsewhere).
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
                || std::fs::read_link(format!("/proc/{pid}/cwd"))
                    .is_ok_and(|cwd| cwd.to_string_lossy().contains(needle))
        })
        .filter(|pid| process_alive(*pid))
        .collect()
}

/// Keeps every core busy until dropped: the load CI runs under.
pub struct CpuHog {
    children: Vec<std::process::Child>,
}

impl CpuHog {
    pub fn start() -> anyhow::Result<Self> {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let children = (0..cores)
            .map(|_| {
                Command::new("sh")
                    .args(["-c", "while :; do :; done"])
                    .spawn()
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { children })
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Median of a set of durations, in milliseconds.
pub fn median_ms(samples: &mut [Duration]) -> f64 {
    samples.sort();
    if samples.is_empty() {
        return 0.0;
    }
    let mid = samples.len() / 2;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    if samples.len() % 2 == 1 {
        ms(samples[mid])
    } else {
        (ms(samples[mid - 1]) + ms(samples[mid])) / 2.0
    }
}

/// The hostile guest program (integration/hostile-guest), built static so
/// it runs in a guest, for tests that attack nexusd from inside a VM.
pub fn hostile_guest_binary() -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    let target_dir = root.join("target/guest");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "--locked",
            "-q",
            "-p",
            "nexus-hostile-guest",
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("building the hostile guest program failed ({status})");
    }
    Ok(target_dir.join("x86_64-unknown-linux-gnu/release/hostile-guest"))
}
