//! A VM's memory on the host (QEMU backend): what the guest frees comes
//! back to the host (free page reporting), so a VM that once ran a big job
//! does not keep that memory for the rest of its life.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::{Duration, Instant};

use nexus_integration::{Harness, ensure_minimal_image, exec, guest_client};

/// The guest's memory the VMM holds on the host, MiB: the resident pages
/// of its shared memory (the memfd the guest's RAM lives in). Panics if
/// the VMM is gone.
fn guest_memory_mib(vmm_pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{vmm_pid}/status"))
        .unwrap_or_else(|e| panic!("the VMM (pid {vmm_pid}) is gone: {e}"));
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssShmem:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kib / 1024
}

/// The guest's memory once it has stopped changing (boot's own frees
/// reported): two readings 3 s apart within 2 MiB.
async fn settled_mib(vmm_pid: u32) -> u64 {
    let mut last = guest_memory_mib(vmm_pid);
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = guest_memory_mib(vmm_pid);
        if now.abs_diff(last) <= 2 {
            return now;
        }
        last = now;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_the_guest_frees_goes_back_to_the_host() {
    let (image, manifest) = ensure_minimal_image().unwrap();
    let harness = Harness::with_image(image, manifest).unwrap();
    let vm = harness.boot("mem").await.unwrap();
    let guest = guest_client(&vm).await.unwrap();
    let vmm = vm.pids()[0];
    // The guest reports runs of 128 KiB and up, not the kernel's 4 MiB.
    let order = exec(
        &guest,
        "cat /sys/module/page_reporting/parameters/page_reporting_order",
    )
    .await
    .unwrap();
    assert_eq!(order["stdout"], "5\n", "{order}");
    let idle = settled_mib(vmm).await;
    assert!(idle > 0, "no guest memory seen for the VMM (pid {vmm})");

    // 100 MiB held in the guest's tmpfs: the host holds it too.
    let out = exec(
        &guest,
        "dd if=/dev/zero of=/dev/shm/big bs=1M count=100 2>&1",
    )
    .await
    .unwrap();
    assert_eq!(out["exit_code"], 0, "{out}");
    let held = guest_memory_mib(vmm);
    assert!(
        held >= idle + 90,
        "100 MiB written in the guest's RAM, the host holds {held} MiB (idle: {idle})"
    );

    // Freed in the guest: reported (2 s after the guest frees it) and
    // punched out of the memfd: at least 80 of the 100 MiB come back.
    let out = exec(&guest, "rm /dev/shm/big").await.unwrap();
    assert_eq!(out["exit_code"], 0, "{out}");
    let freed_at = Instant::now();
    let mut now = guest_memory_mib(vmm);
    while now + 80 > held && freed_at.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        now = guest_memory_mib(vmm);
    }
    eprintln!(
        "guest memory on the host: idle {idle} MiB, holding 100 MiB {held} MiB, \
         {now} MiB {:.1} s after it was freed",
        freed_at.elapsed().as_secs_f64()
    );
    assert!(
        now + 80 <= held,
        "the guest freed 100 MiB a minute ago, the host still holds {now} MiB (idle: {idle}, holding: {held})"
    );
    // And the VM lives on.
    let out = exec(&guest, "echo alive").await.unwrap();
    assert_eq!(out["stdout"], "alive\n");

    guest.cancel().await.unwrap();
    vm.stop().await;
}
