//! Bad input to the VM layer: each gets a clear error that says what to do,
//! and leaves nothing behind (no process, run directory or CID lease).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use nexus_integration::{CID_DIR, Harness, processes_mentioning};
use nexus_rootfs::Manifest;
use nexus_vmm::qemu::QemuBackend;
use nexus_vmm::{VmmError, cid};

/// Nothing of a failed start may remain in the harness's run root.
fn assert_nothing_left(harness: &Harness) {
    let run_root = harness.vmm.config().run_root.clone();
    let leftovers: Vec<_> = std::fs::read_dir(&run_root)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    let strays = processes_mentioning(run_root.to_str().unwrap());
    assert!(strays.is_empty(), "processes left behind: {strays:?}");
}

#[test]
fn a_missing_image_names_the_path_and_the_build_command() {
    let err = Manifest::load(std::path::Path::new("/nonexistent/images/default"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("/nonexistent/images/default/manifest.json"),
        "{err}"
    );
    assert!(
        err.contains("nexus-rootfs -- build --out /nonexistent/images/default"),
        "{err}"
    );
}

#[tokio::test]
async fn a_missing_kernel_names_the_path_and_the_build_command() {
    let harness = Harness::new().unwrap();
    let mut spec = harness.spec("nokernel").unwrap();
    spec.kernel = "/nonexistent/vmlinux".into();
    let err = harness.vmm.start(spec).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, VmmError::MissingFile { .. }), "{msg}");
    assert!(
        msg.contains("kernel /nonexistent/vmlinux does not exist"),
        "{msg}"
    );
    assert!(msg.contains("nexus-rootfs -- build"), "{msg}");
    assert_nothing_left(&harness);
}

#[test]
fn a_missing_vhost_device_vsock_says_how_to_install_it() {
    let err = QemuBackend::locate(None, Some("/nonexistent/bin/vhost-device-vsock".into()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("vhost-device-vsock"), "{err}");
    assert!(
        err.contains("cargo install --locked vhost-device-vsock --version 0.3.0"),
        "{err}"
    );
}

#[tokio::test]
async fn a_cid_in_use_is_refused_before_anything_starts() {
    let harness = Harness::new().unwrap();
    let held = cid::lease_any(std::path::Path::new(CID_DIR)).unwrap();
    let mut spec = harness.spec("dupcid").unwrap();
    spec.cid = Some(held.cid());
    let err = harness.vmm.start(spec).await.unwrap_err();
    assert!(
        matches!(err, VmmError::CidInUse(c) if c == held.cid()),
        "{err}"
    );
    assert!(err.to_string().contains("already in use"), "{err}");
    assert_nothing_left(&harness);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_dies_during_boot_reports_its_last_console_lines() {
    let harness = Harness::new().unwrap();
    let mut spec = harness.spec("dies").unwrap();
    // init exits at once: the kernel panics, and panic=-1 ends the VM.
    spec.cmdline = "root=/dev/vda rw rootfstype=ext4 init=/bin/false".into();
    let err = harness.vmm.start(spec).await.unwrap_err();
    let msg = err.to_string();
    let VmmError::DiedDuringBoot { console, panic, .. } = &err else {
        panic!("expected DiedDuringBoot, got {msg}");
    };
    assert!(msg.contains("VM dies exited during boot"), "{msg}");
    let panic = panic.as_deref().unwrap_or_default();
    assert!(
        panic.contains("Kernel panic - not syncing: Attempted to kill init"),
        "{msg}"
    );
    assert!(msg.contains(panic), "the message names the panic: {msg}");
    assert!(!console.is_empty(), "{msg}");
    assert!(
        console.lines().count() <= 21,
        "at most 20 console lines: {console}"
    );
    assert_nothing_left(&harness);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_never_becomes_ready_times_out_and_is_cleaned_up() {
    let harness = Harness::new().unwrap();
    let mut spec = harness.spec("silent").unwrap();
    // A shell as init never starts guest-mcp, so readiness never comes.
    spec.cmdline = "root=/dev/vda rw rootfstype=ext4 init=/bin/sh".into();
    spec.ready_timeout = Duration::from_secs(5);
    let err = harness.vmm.start(spec).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, VmmError::ReadyTimeout { .. }), "{msg}");
    assert!(msg.contains("did not become ready within 5s"), "{msg}");
    assert!(msg.contains("the VM was stopped"), "{msg}");
    assert_nothing_left(&harness);
}

#[tokio::test]
async fn invalid_names_and_sizes_are_refused() {
    let harness = Harness::new().unwrap();
    let mut spec = harness.spec("ok").unwrap();
    spec.name = "Bad/Name".into();
    let err = harness.vmm.start(spec).await.unwrap_err().to_string();
    assert!(err.contains("VM name \"Bad/Name\" is invalid"), "{err}");
    let mut spec = harness.spec("ok2").unwrap();
    spec.vcpus = 99;
    let err = harness.vmm.start(spec).await.unwrap_err().to_string();
    assert!(
        err.contains("vcpus must be between 1 and 32, got 99"),
        "{err}"
    );
    assert_nothing_left(&harness);
}
