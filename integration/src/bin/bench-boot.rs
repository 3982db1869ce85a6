//! Boot benchmark: how much nexus-vmm adds to a bare QEMU boot.
//!
//! Boots the same kernel and root filesystem to the same readiness point
//! (guest-mcp's READY line on host vsock port 1027) through `nexus-vmm` and
//! with the bare equivalent: vhost-device-vsock and qemu-system-x86_64
//! started by hand with the same command lines. Runs alternate between the
//! two so that machine noise falls on both alike.
//!
//!   cargo run --release -p nexus-integration --bin bench-boot [-- --runs N]
//!   ... -- --kernel PATH [--modules DIR]   also measures that kernel
//!
//! Measures the minimal image (busybox) and the default one (Debian).
//!
//! Last line: `boot ready_ms=<nexus-vmm median> raw_ms=<bare median> ratio=<ready/raw>`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nexus_integration::{CID_DIR, Harness, ensure_minimal_image, median_ms};
use nexus_rootfs::{BuildOptions, Manifest};
use nexus_vmm::accel::Accel;
use nexus_vmm::backend::{LaunchPaths, LaunchRequest};
use nexus_vmm::qemu::QemuBackend;
use tokio::io::AsyncBufReadExt;

struct Args {
    runs: usize,
    kernel: Option<PathBuf>,
    modules: Option<PathBuf>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        runs: 7,
        kernel: None,
        modules: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--runs" => args.runs = value()?.parse().context("--runs takes a number")?,
            "--kernel" => args.kernel = Some(value()?.into()),
            "--modules" => args.modules = Some(value()?.into()),
            other => {
                bail!("unknown argument {other:?}: use --runs N, --kernel PATH, --modules DIR")
            }
        }
    }
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    Ok(args)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let (dir, manifest) = ensure_minimal_image()?;
    let default = measure("minimal", dir, manifest, args.runs).await?;

    // The default image (a Debian userland) beside it.
    let (dir, manifest) = nexus_integration::ensure_default_image()?;
    let debian = measure("default", dir, manifest, args.runs).await?;
    println!(
        "default (Debian) image: median ready {:.0} ms vs minimal (busybox) {:.0} ms (x{:.2})",
        debian.0,
        default.0,
        debian.0 / default.0
    );

    if let Some(kernel) = &args.kernel {
        let out = nexus_integration::workspace_root().join("target/images/bench-kernel");
        let manifest = nexus_rootfs::build(&BuildOptions {
            out: out.clone(),
            name: "bench-kernel".into(),
            kernel: Some(kernel.clone()),
            modules: args.modules.clone(),
            acpi: args.modules.is_some(),
            guest_mcp: None,
            cache_dir: nexus_rootfs::default_cache_dir(),
            rootfs_mib: None,
            recipe: nexus_rootfs::Recipe::default(),
            oci: None,
            base: None,
        })?;
        let other = measure(&manifest.kernel_version.clone(), out, manifest, args.runs).await?;
        println!(
            "kernel comparison: minimal image {:.0} ms vs with {} {:.0} ms (x{:.2})",
            default.0,
            kernel.display(),
            other.0,
            other.0 / default.0
        );
    }
    println!(
        "boot ready_ms={:.0} raw_ms={:.0} ratio={:.3}",
        default.0,
        default.1,
        default.0 / default.1
    );
    Ok(())
}

/// Returns the medians (nexus-vmm, bare) in milliseconds.
async fn measure(
    label: &str,
    image_dir: PathBuf,
    manifest: Manifest,
    runs: usize,
) -> anyhow::Result<(f64, f64)> {
    let kernel_version = manifest.kernel_version.clone();
    let harness = Harness::with_image(image_dir, manifest)?;
    let mut via_vmm = Vec::new();
    let mut bare = Vec::new();
    for run in 0..runs {
        // Alternate which goes first.
        for which in [run % 2, 1 - run % 2] {
            let name = format!("bench-{run}-{which}");
            if which == 0 {
                let spec = harness.spec(&name)?;
                let started = Instant::now();
                let vm = harness.vmm.start(spec).await?;
                via_vmm.push(started.elapsed());
                vm.kill().await;
            } else {
                bare.push(bare_boot(&harness, &name).await?);
            }
        }
        println!(
            "{label} run {}: nexus-vmm {:.0} ms, bare {:.0} ms",
            run + 1,
            via_vmm[run].as_secs_f64() * 1000.0,
            bare[run].as_secs_f64() * 1000.0
        );
    }
    let ready = median_ms(&mut via_vmm);
    let raw = median_ms(&mut bare);
    println!(
        "{label} (kernel {kernel_version}): median ready {ready:.0} ms via nexus-vmm, {raw:.0} ms bare, ratio {:.3}",
        ready / raw
    );
    Ok((ready, raw))
}

/// The bare equivalent: the same two programs and command lines, started
/// by hand, timed from the first spawn to the READY line.
async fn bare_boot(harness: &Harness, name: &str) -> anyhow::Result<Duration> {
    let spec = harness.spec(name)?;
    let lease = nexus_vmm::cid::lease_any(std::path::Path::new(CID_DIR))?;
    let run_dir = harness.dir.path().join("bare").join(name);
    std::fs::create_dir_all(&run_dir)?;
    let req = LaunchRequest {
        spec: &spec,
        cid: lease.cid(),
        cid_lock: None,
        run_as: Some(nexus_vmm::vm::VM_UID_BASE + lease.cid()),
        accel: Accel::Auto.resolve()?,
        paths: LaunchPaths {
            run_dir: run_dir.clone(),
            vsock_uds: run_dir.join("vsock.sock"),
            console_log: spec.console_log.clone(),
            console_socket: run_dir.join("console.sock"),
        },
    };
    let vhost_socket = run_dir.join("vhost.sock");
    let ready = tokio::net::UnixListener::bind(run_dir.join("vsock.sock_1027"))?;
    let backend = QemuBackend::locate(None, None)?;

    let started = Instant::now();
    let mut vhost = tokio::process::Command::new(&backend.vhost_vsock)
        .args(QemuBackend::vhost_args(&req, &vhost_socket))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    while !vhost_socket.exists() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut qemu = tokio::process::Command::new(&backend.qemu)
        .args(QemuBackend::qemu_args(&req, &vhost_socket))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    // QEMU serves the console on a socket and waits for its reader.
    nexus_vmm::console::capture(
        run_dir.join("console.sock"),
        spec.console_log.clone(),
        4 << 20,
        true,
    );
    let (conn, _) = tokio::time::timeout(Duration::from_secs(90), ready.accept())
        .await
        .context("bare boot never became ready")??;
    let mut line = String::new();
    tokio::io::BufReader::new(conn).read_line(&mut line).await?;
    let took = started.elapsed();
    if !line.starts_with("READY ") {
        bail!("bare boot sent {line:?} instead of READY");
    }
    qemu.kill().await?;
    vhost.kill().await?;
    std::fs::remove_dir_all(&run_dir)?;
    Ok(took)
}
