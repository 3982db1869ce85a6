//! A running VM's life beyond the happy path: the VMM dying under us, a
//! guest port nobody listens on, and a VMM that ignores every polite request.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use nexus_integration::{Harness, process_alive, processes_mentioning};
use nexus_vmm::vm::StopMethod;
use nexus_vmm::{GuestState, VmmConfig};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unexpected_vmm_exit_is_detected_and_reported() {
    let harness = Harness::new().unwrap();
    let vm = harness.boot("dies-later").await.unwrap();
    let qemu = vm.pids()[0];
    kill(Pid::from_raw(qemu as i32), Signal::SIGKILL).unwrap();
    let how = tokio::time::timeout(Duration::from_secs(10), vm.exited())
        .await
        .expect("exit noticed");
    assert_eq!(how, "killed by signal 9");
    // The readiness connection's end follows the VMM's.
    for _ in 0..100 {
        if vm.guest_state() == GuestState::Gone {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(vm.guest_state(), GuestState::Gone);
    let err = vm.connect(1024).await.unwrap_err().to_string();
    assert!(
        err.contains("the VM has exited (killed by signal 9)"),
        "{err}"
    );
    let run_dir = vm.run_dir().to_path_buf();
    let report = vm.stop().await;
    assert_eq!(report.method, StopMethod::AlreadyExited);
    assert!(!run_dir.exists());
    assert!(processes_mentioning(run_dir.to_str().unwrap()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_nobody_listens_on_says_so_and_names_the_vm_and_port() {
    let harness = Harness::new().unwrap();
    let vm = harness.boot("noport").await.unwrap();
    let err = vm.connect(4321).await.unwrap_err().to_string();
    assert!(err.contains("VM noport, vsock port 4321"), "{err}");
    assert!(err.contains("nothing in the guest is listening"), "{err}");
    // The VM's vsock still works afterwards.
    nexus_integration::guest_client(&vm)
        .await
        .unwrap()
        .cancel()
        .await
        .unwrap();
    vm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_vmm_goes_through_graceful_then_sigterm_then_sigkill() {
    let mut harness = Harness::new().unwrap();
    harness.vmm = nexus_vmm::Vmm::new(
        std::sync::Arc::new(nexus_vmm::qemu::QemuBackend::locate(None, None).unwrap()),
        VmmConfig {
            connect_timeout: Duration::from_secs(1),
            graceful_timeout: Duration::from_secs(1),
            term_timeout: Duration::from_secs(1),
            ..harness.vmm.config().clone()
        },
    );
    let vm = harness.boot("frozen").await.unwrap();
    let pids = vm.pids();
    // A stopped QEMU answers nothing and leaves SIGTERM pending; only
    // SIGKILL ends it.
    kill(Pid::from_raw(pids[0] as i32), Signal::SIGSTOP).unwrap();
    let run_dir = vm.run_dir().to_path_buf();
    let report = vm.stop().await;
    assert_eq!(report.method, StopMethod::Killed, "{report:?}");
    assert!(report.graceful_error.is_some());
    assert_eq!(report.vmm_exit, "killed by signal 9");
    for pid in pids {
        assert!(!process_alive(pid), "process {pid} survived");
    }
    assert!(!run_dir.exists());
}
