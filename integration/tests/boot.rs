//! The foundation's end-to-end proof: the default image boots under the QEMU
//! backend, guest-mcp answers `exec` over vsock, and stopping the VM leaves
//! nothing behind.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use nexus_integration::{Harness, exec, guest_client, process_alive, processes_mentioning};
use nexus_vmm::vm::StopMethod;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_image_boots_and_exec_reports_the_manifest_kernel() {
    let harness = Harness::new().expect("harness");
    let vm = harness.boot("boot").await.expect("boot");

    let client = guest_client(&vm).await.expect("guest-mcp session");
    let uname = exec(&client, "uname -r").await.expect("exec uname");
    assert_eq!(uname["exit_code"], 0);
    assert_eq!(
        uname["stdout"].as_str().unwrap().trim(),
        harness.manifest.kernel_version,
        "the guest runs the image's kernel"
    );
    let ws = exec(&client, "echo hi > /workspace/f && cat /workspace/f && pwd")
        .await
        .unwrap();
    assert_eq!(
        ws["stdout"], "hi\n/workspace\n",
        "the workspace drive is mounted and is the cwd"
    );
    client.cancel().await.unwrap();

    let pids = vm.pids();
    let run_dir = vm.run_dir().to_path_buf();
    let vsock = vm.vsock_uds().to_path_buf();
    assert!(vsock.exists());
    let console = vm.console_log().to_path_buf();
    let ready_after = vm.ready_after();
    let report = vm.stop().await;
    eprintln!("ready after {ready_after:?}; {report:?}");
    let console = std::fs::read_to_string(console).unwrap();
    assert!(
        console.contains("Linux version"),
        "the console was captured"
    );
    assert_eq!(report.method, StopMethod::Graceful, "{report:?}");
    for pid in pids {
        assert!(!process_alive(pid), "process {pid} outlived the VM");
    }
    assert!(!run_dir.exists(), "{} was left behind", run_dir.display());
    assert!(
        !vsock.parent().unwrap().exists(),
        "{} was left behind",
        vsock.display()
    );
    let strays = processes_mentioning(run_dir.to_str().unwrap());
    assert!(strays.is_empty(), "processes left behind: {strays:?}");
}
