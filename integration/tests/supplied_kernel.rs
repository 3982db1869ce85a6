//! `nexus-rootfs build --kernel --modules`: a modular kernel (Debian's
//! cloud kernel, fetched by scripts/fetch-cloud-kernel.sh) boots through the
//! generated initrd, which loads virtio, vsock and ext4 in modules.dep order.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::PathBuf;
use std::process::Command;

use nexus_integration::{Harness, exec, guest_client, workspace_root};
use nexus_rootfs::{BuildOptions, Manifest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_cloud_kernel_boots_through_the_module_loading_initrd() {
    let out = Command::new(workspace_root().join("scripts/fetch-cloud-kernel.sh"))
        .output()
        .expect("running scripts/fetch-cloud-kernel.sh");
    assert!(
        out.status.success(),
        "fetch-cloud-kernel.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let args = String::from_utf8(out.stdout).unwrap();
    let words: Vec<&str> = args.split_whitespace().collect();
    let [_, kernel, _, modules] = words[..] else {
        panic!("unexpected output {args:?}");
    };

    let image = tempfile::tempdir().unwrap();
    let manifest = nexus_rootfs::build(&BuildOptions {
        out: image.path().to_path_buf(),
        name: "cloud".into(),
        kernel: Some(PathBuf::from(kernel)),
        modules: Some(PathBuf::from(modules)),
        acpi: true,
        guest_mcp: None,
        cache_dir: nexus_rootfs::default_cache_dir(),
        rootfs_mib: None,
        recipe: nexus_rootfs::Recipe::default(),
        oci: None,
        base: None,
    })
    .expect("building the cloud-kernel image");
    assert!(manifest.files.contains_key("initrd"));
    assert!(manifest.boot.acpi);
    assert_eq!(Manifest::load(image.path()).unwrap(), manifest);

    let harness = Harness::with_image(image.path().to_path_buf(), manifest).unwrap();
    let vm = harness.boot("cloud").await.expect("boot");
    let client = guest_client(&vm).await.unwrap();
    let uname = exec(&client, "uname -r").await.unwrap();
    assert_eq!(
        uname["stdout"].as_str().unwrap().trim(),
        harness.manifest.kernel_version
    );
    let modules = exec(
        &client,
        "cat /proc/modules | cut -d' ' -f1 | sort | tr '\\n' ' '",
    )
    .await
    .unwrap();
    let loaded = modules["stdout"].as_str().unwrap();
    for needed in ["virtio_blk", "virtio_mmio", "vmw_vsock_virtio_transport"] {
        assert!(loaded.contains(needed), "{needed} not loaded: {loaded}");
    }
    client.cancel().await.unwrap();
    vm.stop().await;
}
