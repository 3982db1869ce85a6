//! An OCI image layout becomes a root filesystem: layers in order, a
//! whiteout deletes what a lower layer put, an opaque directory hides all
//! of it, the config's Env and WorkingDir are every command's, and a layer
//! whose entry leaves the root is refused with nothing written outside.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nexus_integration::oci_fixture::layout;
use nexus_integration::{Harness, exec, guest_client};
use nexus_rootfs::{BuildOptions, Manifest};

fn options(out: &Path, oci: &Path) -> BuildOptions {
    BuildOptions {
        oci: Some(oci.to_owned()),
        ..BuildOptions::new(out, "oci")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oci_layout_boots_with_its_layers_whiteouts_and_env() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "unpacking layers with their owners needs root (CI runs as root)"
    );
    let dir = tempfile::tempdir().unwrap();
    let (oci, out) = (dir.path().join("layout"), dir.path().join("image"));
    layout(
        &oci,
        &[
            vec![
                ("data/", ""),
                ("data/keep", "kept\n"),
                ("data/gone", "whited out\n"),
                ("opq/", ""),
                ("opq/old", "hidden\n"),
            ],
            vec![
                ("data/.wh.gone", ""),
                ("opq/", ""),
                ("opq/.wh..wh..opq", ""),
                ("opq/new", "new\n"),
                ("data/again", "=>data/keep"),
            ],
        ],
    );
    let manifest = nexus_rootfs::build(&options(&out, &oci)).unwrap();
    assert!(
        manifest.userland.starts_with("oci sha256:"),
        "{}",
        manifest.userland
    );
    assert_eq!(manifest.env["FOO"], "bar baz");
    assert_eq!(manifest.workdir, "/srv");
    // The same layout again is the same image: nothing rebuilt.
    let again = nexus_rootfs::build(&options(&out, &oci)).unwrap();
    assert_eq!(again.inputs_digest, manifest.inputs_digest);
    assert_eq!(again.built_at, manifest.built_at);

    let manifest = Manifest::load(&out).unwrap();
    let harness = Harness::with_image(out, manifest).unwrap();
    let vm = harness.boot("oci1").await.unwrap();
    let client = guest_client(&vm).await.unwrap();
    let out = exec(
        &client,
        "ls /data /opq; echo \"$FOO\"; pwd; cat /data/keep /opq/new /data/again",
    )
    .await
    .unwrap();
    assert_eq!(
        out["stdout"], "/data:\nagain\nkeep\n\n/opq:\nnew\nbar baz\n/srv\nkept\nnew\nkept\n",
        "{out}"
    );
    client.cancel().await.unwrap();
    vm.kill().await;
}

#[test]
fn a_layer_leaving_the_root_is_refused_and_writes_nothing_outside() {
    let dir = tempfile::tempdir().unwrap();
    let (oci, out) = (dir.path().join("layout"), dir.path().join("image"));
    layout(&oci, &[vec![("ok", "fine\n"), ("../../escaped", "out\n")]]);
    let err = nexus_rootfs::build(&options(&out, &oci))
        .unwrap_err()
        .to_string();
    assert!(err.contains("escapes the root"), "{err}");
    assert!(!dir.path().join("escaped").exists());
    assert!(!out.join("rootfs.ext4").exists());

    // A hard link to a host file, absolute or by `..`, is refused too.
    let secret = dir.path().join("host-secret");
    std::fs::write(&secret, "host only\n").unwrap();
    for target in [secret.display().to_string(), "../host-secret".to_owned()] {
        let link = format!("=>{target}");
        let oci = dir.path().join(format!("link-{}", target.len()));
        layout(&oci, &[vec![("stolen", link.as_str())]]);
        let err = nexus_rootfs::build(&options(&out, &oci))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no such file in the image") || err.contains("escapes the root"),
            "{target}: {err}"
        );
    }
    assert_eq!(
        std::fs::metadata(&secret).unwrap().nlink(),
        1,
        "a link to the host file was made"
    );

    // An image for another architecture (the index names no platform:
    // its config says).
    let arm = dir.path().join("arm");
    nexus_integration::oci_fixture::layout_for(&arm, &[vec![("ok", "fine\n")]], "arm64");
    let err = nexus_rootfs::build(&options(&out, &arm))
        .unwrap_err()
        .to_string();
    assert!(err.contains("the image is for linux/arm64"), "{err}");

    // Not a layout at all.
    let err = nexus_rootfs::build(&options(&out, dir.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not an OCI image layout"), "{err}");
}

/// Symlinks a layer plants lead nowhere outside the root: not for a later
/// layer's opaque marker or whiteout, nor for the files the build itself
/// writes (init, guest-mcp, busybox).
#[test]
fn planted_symlinks_do_not_lead_the_build_onto_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("precious"), "mine\n").unwrap();
    let v = format!("->{}", victim.display());
    let precious = format!("->{}", victim.join("precious").display());
    for (i, layers) in [
        vec![vec![("x", v.as_str())], vec![("x/.wh..wh..opq", "")]],
        vec![vec![("x", v.as_str())], vec![("x/.wh.precious", "")]],
        vec![vec![("etc/", ""), ("etc/nexus", v.as_str())]],
        vec![vec![("bin/", ""), ("bin/busybox", precious.as_str())]],
        vec![vec![("usr/", ""), ("usr/sbin", v.as_str())]],
    ]
    .into_iter()
    .enumerate()
    {
        let oci = dir.path().join(format!("layout-{i}"));
        let out = dir.path().join(format!("image-{i}"));
        layout(&oci, &layers);
        let built = nexus_rootfs::build(&options(&out, &oci));
        let names: Vec<_> = std::fs::read_dir(&victim)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            names,
            ["precious"],
            "layout {i} ({built:?}) reached the host"
        );
        assert_eq!(
            std::fs::read_to_string(victim.join("precious")).unwrap(),
            "mine\n"
        );
    }
    // A whiteout of `..` names nothing in the layer: refused.
    let oci = dir.path().join("layout-dotdot");
    layout(&oci, &[vec![("a/", "")], vec![("a/.wh..", "")]]);
    let err = nexus_rootfs::build(&options(&dir.path().join("image-dotdot"), &oci))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("names no entry") || err.contains("escapes"),
        "{err}"
    );
}
