//! The control channel on a real ext4 filesystem, loop-mounted as the
//! workspace is in a VM: freeze, thaw and the thaw deadline; unmount,
//! replacement of the drive's bytes by the "host", and mount again.
//!
//! Needs root and loop devices (CI has both); elsewhere these tests say so
//! and pass without running.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Server, call};
use serde_json::json;

/// An ext4 image on a loop device (attached without autoclear, so it stays
/// when unmounted, as a VM's drive does), mounted; cleaned up on drop.
struct LoopFs {
    image: PathBuf,
    mount: PathBuf,
    device: String,
}

impl LoopFs {
    fn new(dir: &Path, name: &str) -> Option<Self> {
        if !nix::unistd::Uid::effective().is_root() || !Path::new("/dev/loop-control").exists() {
            eprintln!("skipping: needs root and loop devices");
            assert!(
                std::env::var_os("NEXUS_NO_SKIP").is_none(),
                "this test cannot run here, and NEXUS_NO_SKIP (scripts/test.sh, as CI runs it) forbids skipping"
            );
            return None;
        }
        let image = dir.join(format!("{name}.ext4"));
        let mount = dir.join(name);
        make_ext4(&image, &[("marker", "original")]);
        std::fs::create_dir_all(&mount).unwrap();
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&image)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let device = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        run(Command::new("mount").arg(&device).arg(&mount));
        Some(Self {
            image,
            mount,
            device,
        })
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

fn make_ext4(image: &Path, files: &[(&str, &str)]) {
    let stage = tempfile::tempdir().unwrap();
    for (name, content) in files {
        std::fs::write(stage.path().join(name), content).unwrap();
    }
    std::fs::File::create(image)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(stage.path())
        .arg(image));
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts a write on another thread; returns when it finishes.
fn write_in_background(path: PathBuf) -> std::sync::mpsc::Receiver<Instant> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        std::fs::write(&path, "written").unwrap();
        let _ = tx.send(Instant::now());
    });
    rx
}

#[tokio::test]
async fn freeze_blocks_writers_until_thaw() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = LoopFs::new(dir.path(), "ws") else {
        return;
    };
    let server = Server::start(&[]).await;
    let control = server.control_client().await;
    let mount = fs.mount.display().to_string();

    call(&control, "freeze", json!({"mount": mount, "timeout_s": 30}))
        .await
        .ok();
    let err = call(&control, "freeze", json!({"mount": mount}))
        .await
        .err();
    assert!(err.contains("is already frozen"), "{err}");
    let done = write_in_background(fs.mount.join("during-freeze"));
    assert!(
        done.recv_timeout(Duration::from_millis(500)).is_err(),
        "a write went through a frozen filesystem"
    );
    call(&control, "thaw", json!({"mount": mount})).await.ok();
    done.recv_timeout(Duration::from_secs(10))
        .expect("the write finishes after thaw");
    let err = call(&control, "thaw", json!({"mount": mount})).await.err();
    assert!(err.contains("is not frozen"), "{err}");
    control.cancel().await.unwrap();
}

#[tokio::test]
async fn a_forgotten_freeze_thaws_by_itself_at_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = LoopFs::new(dir.path(), "ws") else {
        return;
    };
    let server = Server::start(&[]).await;
    let control = server.control_client().await;
    let frozen_at = Instant::now();
    call(
        &control,
        "freeze",
        json!({"mount": fs.mount, "timeout_s": 1}),
    )
    .await
    .ok();
    // The host goes away without thawing.
    control.cancel().await.unwrap();
    let done = write_in_background(fs.mount.join("after-deadline"));
    let finished = done
        .recv_timeout(Duration::from_secs(10))
        .expect("thawed by the deadline");
    assert!(
        finished - frozen_at >= Duration::from_millis(900),
        "thawed too early"
    );
}

#[tokio::test]
async fn unmount_then_mount_shows_content_the_host_put_on_the_drive() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = LoopFs::new(dir.path(), "ws") else {
        return;
    };
    let server = Server::start(&[]).await;
    let control = server.control_client().await;
    let mount = fs.mount.display().to_string();
    assert_eq!(
        std::fs::read_to_string(fs.mount.join("marker")).unwrap(),
        "original"
    );

    // A process working in the workspace keeps it busy.
    let mut busy = Command::new("sleep")
        .arg("300")
        .current_dir(&fs.mount)
        .spawn()
        .unwrap();
    let err = call(&control, "unmount", json!({"mount": mount}))
        .await
        .err();
    assert!(
        err.contains("is busy") && err.contains(&busy.id().to_string()),
        "{err}"
    );
    assert!(
        fs.mount.join("marker").exists(),
        "still mounted after the refusal"
    );
    call(&control, "unmount", json!({"mount": mount, "force": true}))
        .await
        .ok();
    assert!(
        busy.wait().unwrap().code().is_none(),
        "force killed the busy process"
    );
    assert!(!fs.mount.join("marker").exists(), "unmounted");

    // The host replaces the drive's bytes in place (same inode, as a
    // FICLONE rollback does) while the guest holds no mount.
    let replacement = dir.path().join("snapshot.ext4");
    make_ext4(&replacement, &[("marker", "from the snapshot")]);
    run(Command::new("dd")
        .arg(format!("if={}", replacement.display()))
        .arg(format!("of={}", fs.image.display()))
        .args(["bs=1M", "conv=notrunc", "status=none"]));

    call(&control, "mount", json!({"mount": mount})).await.ok();
    assert_eq!(
        std::fs::read_to_string(fs.mount.join("marker")).unwrap(),
        "from the snapshot",
        "the guest sees the drive's new content, not its page cache"
    );
    // Mounted already: success (a host finishing an interrupted rollback
    // does not know whether the unmount happened).
    let again = call(&control, "mount", json!({"mount": mount})).await.ok();
    assert!(
        again["detail"]
            .as_str()
            .unwrap()
            .contains("already mounted"),
        "{again}"
    );
    // Not mounted, never unmounted here, not /workspace: no device known.
    let elsewhere = fs.mount.with_extension("elsewhere");
    let err = call(
        &control,
        "mount",
        json!({"mount": elsewhere.display().to_string()}),
    )
    .await
    .err();
    assert!(err.contains("no device known"), "{err}");
    let r = call(&control, "remount", json!({"mount": mount}))
        .await
        .ok();
    assert!(r["detail"].as_str().unwrap().starts_with("remounted"));
    let err = call(&control, "unmount", json!({"mount": "/nonexistent"}))
        .await
        .err();
    assert!(err.contains("is not a mount point"), "{err}");
    control.cancel().await.unwrap();
}

#[tokio::test]
async fn control_tools_check_their_arguments() {
    let server = Server::start(&[]).await;
    let control = server.control_client().await;
    let err = call(&control, "freeze", json!({"mount": "/nonexistent"}))
        .await
        .err();
    assert!(
        err.contains("/nonexistent is not a mounted directory"),
        "{err}"
    );
    let err = call(&control, "freeze", json!({"mount": "/tmp", "timeout_s": 0}))
        .await
        .err();
    assert!(
        err.contains("`timeout_s` must be between 1 and 600"),
        "{err}"
    );
    let err = call(&control, "drop_caches", json!({"level": 7}))
        .await
        .err();
    assert!(err.contains("`level` must be 1, 2 or 3"), "{err}");
    let err = call(&control, "shutdown", json!({})).await.err();
    assert!(err.contains("will not power its host off"), "{err}");
    control.cancel().await.unwrap();
}
