//! Storage operations on a real loop-mounted btrfs pool: the whole life of
//! a workspace, bad input, and a crash between every pair of steps.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};

use common::{Fixture, VARIANT_AT, byte_at, can_run, scribble};
use nexus_storage::{
    ImageChange, NoQuiesce, NoReattach, PoolKind, Quiesce, Reattach, Storage, StorageError,
    VmAttrs, WORKSPACE_DRIVE, WorkspaceSource, pool::is_btrfs, steps,
};

const WS: WorkspaceSource = WorkspaceSource::New { bytes: 64 << 20 };
/// Beyond the ext4 metadata at the start of the workspace drive.
const DATA_AT: u64 = 32 << 20;

/// Records the hook calls a storage operation makes.
#[derive(Clone, Default)]
struct Calls(Arc<Mutex<Vec<&'static str>>>, Option<&'static str>);

impl Calls {
    fn failing_at(step: &'static str) -> Self {
        Self(Arc::default(), Some(step))
    }
    fn note(&mut self, call: &'static str) -> Result<(), String> {
        self.0.lock().unwrap().push(call);
        if self.1 == Some(call) {
            Err(format!("{call} failed (test)"))
        } else {
            Ok(())
        }
    }
    fn list(&self) -> Vec<&'static str> {
        self.0.lock().unwrap().clone()
    }
}

impl Quiesce for Calls {
    fn freeze(&mut self) -> Result<(), String> {
        self.note("freeze")
    }
    fn thaw(&mut self) -> Result<(), String> {
        self.note("thaw")
    }
}

impl Reattach for Calls {
    fn release(&mut self) -> Result<(), String> {
        self.note("release")
    }
    fn reattach(&mut self) -> Result<(), String> {
        self.note("reattach")
    }
}

#[test]
fn the_pool_is_a_loop_mounted_btrfs_image_reused_after_a_restart() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let storage = fx.open();
    assert_eq!(storage.pool().kind(), PoolKind::LoopImage);
    assert!(is_btrfs(storage.pool().root()));
    let image = fx.config.state_dir.join("pool.img");
    let inode = std::fs::metadata(&image).unwrap().ino();
    storage.import_image("default", &fx.image_src).unwrap();
    storage.create_vm_drives("vm1", "default", WS).unwrap();
    storage.pool().unmount().unwrap();
    drop(storage);

    // A restart mounts the same image again and finds everything.
    let (storage, report) = Storage::open(&fx.config).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(
        std::fs::metadata(&image).unwrap().ino(),
        inode,
        "the image was not re-created"
    );
    assert_eq!(storage.list_vms().unwrap()[0].vm, "vm1");
    assert!(storage.vm_drives("vm1").unwrap().root.is_file());
    // Opening twice while mounted is fine too.
    let (again, _) = Storage::open(&fx.config).unwrap();
    assert_eq!(again.list_images().unwrap().len(), 1);
}

#[test]
fn a_pool_that_cannot_be_made_names_both_ways_out() {
    if !can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, "").unwrap();
    let mut config = nexus_storage::StorageConfig::new(dir.path().join("state"));
    // The pool directory cannot even be created under a file.
    config.pool_dir = Some(blocker.join("pool"));
    let err = Storage::open(&config).err().unwrap().to_string();
    assert!(err.contains("could not create"), "{err}");
    let mut config = nexus_storage::StorageConfig::new(dir.path().join("state2"));
    config.pool_image_bytes = 1 << 20; // too small for mkfs.btrfs
    let err = Storage::open(&config).err().unwrap().to_string();
    assert!(err.contains("no storage pool"), "{err}");
    assert!(
        err.contains("point the pool at a directory on a btrfs filesystem"),
        "{err}"
    );
    assert!(err.contains("run as root with loop devices"), "{err}");
    assert!(
        !dir.path().join("state2/pool.img").exists(),
        "no half-made image is left"
    );
}

#[test]
fn snapshot_rollback_in_place_fork_and_destroy() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let storage = fx.open();
    storage.import_image("default", &fx.image_src).unwrap();
    let vm = storage.create_vm_drives("vm1", "default", WS).unwrap();
    assert_eq!(std::fs::metadata(&vm.workspace).unwrap().len(), 64 << 20);
    scribble(&vm.workspace, DATA_AT, 1 << 20, b'A');

    let mut quiesce = Calls::default();
    let snap = storage
        .snapshot_drive("vm1", WORKSPACE_DRIVE, Some("before"), &mut quiesce)
        .unwrap();
    assert_eq!(quiesce.list(), ["freeze", "thaw"]);
    assert_eq!(snap.size_bytes, 64 << 20);
    assert_eq!(snap.parent, None);
    // The snapshot is read-only.
    let write = std::fs::OpenOptions::new()
        .write(true)
        .open(snap.path.join("workspace.ext4"));
    assert!(write.is_err(), "a snapshot must not be writable");

    scribble(&vm.workspace, DATA_AT, 1 << 20, b'B');
    let inode = std::fs::metadata(&vm.workspace).unwrap().ino();
    let held_open = std::fs::File::open(&vm.workspace).unwrap();
    let mut hooks = Calls::default();
    storage.rollback_drive("vm1", "before", &mut hooks).unwrap();
    assert_eq!(hooks.list(), ["release", "reattach"]);
    assert_eq!(byte_at(&vm.workspace, DATA_AT), b'A', "rolled back");
    assert_eq!(
        std::fs::metadata(&vm.workspace).unwrap().ino(),
        inode,
        "in place: same inode"
    );
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = &held_open;
        f.seek(SeekFrom::Start(DATA_AT)).unwrap();
        let mut b = [0u8; 1];
        f.read_exact(&mut b).unwrap();
        assert_eq!(
            b[0], b'A',
            "a file held open (the VMM's) sees the snapshot's content"
        );
    }
    assert_eq!(
        storage.vm_drives("vm1").unwrap().base_snapshot.as_deref(),
        Some("vm1/before")
    );
    // A guest that cannot mount again: the rollback stands, the caller is
    // told, and the VM is free (its guest gets the drive at its next boot).
    scribble(&vm.workspace, DATA_AT, 1, b'B');
    let mut hooks = Calls::failing_at("reattach");
    let failed = storage.rollback_drive("vm1", "before", &mut hooks);
    assert!(
        matches!(failed, Err(StorageError::Reattach(_))),
        "{failed:?}"
    );
    assert_eq!(hooks.list(), ["release", "reattach"]);
    assert_eq!(byte_at(&vm.workspace, DATA_AT), b'A');
    assert!(storage.pending_reattach().unwrap().is_empty());
    assert!(storage.problems().unwrap().is_empty());

    let fork = storage.fork("vm1", "before", "vm2").unwrap();
    assert_eq!(byte_at(&fork.workspace, DATA_AT), b'A');
    scribble(&fork.workspace, DATA_AT, 1, b'C');
    assert_eq!(
        byte_at(&vm.workspace, DATA_AT),
        b'A',
        "a fork diverges without touching its source"
    );
    let second = storage
        .snapshot_drive("vm2", WORKSPACE_DRIVE, None, &mut NoQuiesce)
        .unwrap();
    assert!(second.name.starts_with("snap-"), "{}", second.name);
    assert_eq!(second.parent.as_deref(), Some("vm1/before"));
    let usage = storage.usage("vm2").unwrap();
    assert!(
        usage.shared_bytes > 0,
        "the fork shares extents with its source: {usage:?}"
    );

    let workspace_from_snapshot = storage
        .create_vm_drives(
            "vm3",
            "default",
            WorkspaceSource::Snapshot {
                vm: "vm1".into(),
                snapshot: "before".into(),
            },
        )
        .unwrap();
    assert_eq!(byte_at(&workspace_from_snapshot.workspace, DATA_AT), b'A');

    let listed: Vec<String> = storage
        .list_snapshots(None)
        .unwrap()
        .into_iter()
        .map(|s| format!("{}/{}", s.vm, s.name))
        .collect();
    assert_eq!(listed.len(), 2);
    storage.delete_snapshot("vm2", &second.name).unwrap();
    assert!(!second.path.exists());
    for vm in ["vm1", "vm2", "vm3"] {
        storage.destroy_vm_drives(vm).unwrap();
    }
    assert!(storage.list_vms().unwrap().is_empty());
    assert!(storage.list_snapshots(None).unwrap().is_empty());
    let root = storage.pool().root();
    assert_eq!(std::fs::read_dir(root.join("vms")).unwrap().count(), 0);
    assert_eq!(
        std::fs::read_dir(root.join("snapshots")).unwrap().count(),
        0
    );
    assert!(storage.problems().unwrap().is_empty());
    storage.delete_image("default").unwrap();
    assert!(storage.list_images().unwrap().is_empty());
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let storage = fx.open();
    storage.import_image("default", &fx.image_src).unwrap();
    storage.create_vm_drives("vm1", "default", WS).unwrap();
    storage
        .snapshot_drive("vm1", WORKSPACE_DRIVE, Some("s1"), &mut NoQuiesce)
        .unwrap();
    let before = state(&storage);

    let err = |r: Result<_, StorageError>| r.err().map(|e| e.to_string()).unwrap_or_default();
    for bad in ["../etc", "A", "a/b", "", "-x", "a.b"] {
        let e = err(storage.create_vm_drives(bad, "default", WS).map(|_| ()));
        assert!(e.contains("is invalid"), "{bad:?}: {e}");
        let e = err(storage
            .snapshot_drive("vm1", WORKSPACE_DRIVE, Some(bad), &mut NoQuiesce)
            .map(|_| ()));
        assert!(
            e.contains("snapshot name") && e.contains("is invalid"),
            "{bad:?}: {e}"
        );
    }
    let cases: Vec<(String, &str)> = vec![
        (
            err(storage.create_vm_drives("vm2", "nope", WS).map(|_| ())),
            "image \"nope\" does not exist",
        ),
        (
            err(storage.create_vm_drives("vm1", "default", WS).map(|_| ())),
            "VM \"vm1\" has drives already",
        ),
        (
            err(storage
                .create_vm_drives("vm2", "default", WorkspaceSource::New { bytes: 1 })
                .map(|_| ())),
            "workspace size must be between 1 MiB",
        ),
        (
            err(storage
                .snapshot_drive("vm1", WORKSPACE_DRIVE, Some("s1"), &mut NoQuiesce)
                .map(|_| ())),
            "has a snapshot named \"s1\" already",
        ),
        (
            err(storage
                .snapshot_drive("vm1", "swap", None, &mut NoQuiesce)
                .map(|_| ())),
            "has no drive \"swap\"",
        ),
        (
            err(storage
                .snapshot_drive("ghost", WORKSPACE_DRIVE, None, &mut NoQuiesce)
                .map(|_| ())),
            "VM \"ghost\" has no drives",
        ),
        (
            err(storage
                .rollback_drive("vm1", "nope", &mut NoReattach)
                .map(|_| ())),
            "has no snapshot \"nope\"",
        ),
        (
            err(storage.fork("vm1", "s1", "vm1").map(|_| ())),
            "VM \"vm1\" has drives already",
        ),
        (
            err(storage.fork("vm1", "nope", "vm9").map(|_| ())),
            "has no snapshot \"nope\"",
        ),
        (
            err(storage.delete_image("default")),
            "is used by VMs [\"vm1\"]",
        ),
        (
            err(storage
                .import_image("other", &fx.broken_image())
                .map(|_| ())),
            "lists rootfs.ext4, which is missing",
        ),
        (
            err(storage.import_image("Bad", &fx.image_src).map(|_| ())),
            "image name \"Bad\" is invalid",
        ),
        (
            err(storage.import_image("other", fx.dir.path()).map(|_| ())),
            "has no manifest.json",
        ),
        (
            err(storage
                .snapshot_drive(
                    "vm1",
                    WORKSPACE_DRIVE,
                    Some("s2"),
                    &mut Calls::failing_at("freeze"),
                )
                .map(|_| ())),
            "could not be quiesced",
        ),
        (
            err(storage
                .rollback_drive("vm1", "s1", &mut Calls::failing_at("release"))
                .map(|_| ())),
            "could not let go of drive \"workspace\"",
        ),
    ];
    for (got, expected) in cases {
        assert!(got.contains(expected), "{got:?} lacks {expected:?}");
    }
    // The same files again: nothing to do.
    let again = storage
        .import_image_from("default", &fx.image_src, "directory")
        .unwrap();
    assert_eq!(again.change, ImageChange::Unchanged);
    assert_eq!(state(&storage), before, "nothing changed");
    assert!(storage.problems().unwrap().is_empty());
}

/// A crash while an image is being replaced leaves the old version current,
/// its VM booting it, and no trace of the new one.
#[test]
fn a_crash_while_replacing_an_image_leaves_the_old_version() {
    if !can_run() {
        return;
    }
    for step in steps::IMPORT_STEPS {
        let fx = Fixture::new();
        let storage = fx.open();
        let v1 = storage.import_image("img", &fx.image_src).unwrap();
        storage.create_vm_drives("vm", "img", WS).unwrap();
        storage.set_failpoint(Some(step));
        let got = storage.import_image("img", &fx.image_variant(b'2'));
        assert!(
            matches!(got, Err(StorageError::Injected(_))),
            "{step}: {got:?}"
        );
        drop(storage);
        let (storage, report) = Storage::open(&fx.config).unwrap();
        assert!(!report.removed.is_empty(), "{step}: {report:?}");
        assert_eq!(storage.image("img").unwrap().unwrap().digest, v1.digest);
        assert_eq!(storage.vm_image("vm").unwrap().path, v1.path);
        assert!(storage.problems().unwrap().is_empty(), "{step}");
        let dirs = std::fs::read_dir(storage.pool().root().join("images"))
            .unwrap()
            .count();
        assert_eq!(dirs, 1, "{step}: the new version's files are gone");
    }
}

/// A rebuilt image serves new VMs; the VMs made from the old version
/// (and their forks) keep it until the last is gone; deleting is refused
/// while any VM uses the image, naming them.
#[test]
fn a_replaced_image_serves_new_vms_and_old_ones_keep_theirs() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let storage = fx.open();
    let v1 = storage
        .import_image_from("img", &fx.image_src, "recipe one")
        .unwrap();
    assert_eq!(v1.change, ImageChange::Added);
    // Copied (the source is not on the pool's filesystem) with its holes:
    // the same bytes, no more blocks.
    let (src, copy) = (
        fx.image_src.join("rootfs.ext4"),
        v1.image.path.join("rootfs.ext4"),
    );
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&copy).unwrap());
    let blocks = |p: &std::path::Path| std::fs::metadata(p).unwrap().blocks();
    assert!(
        blocks(&copy) <= blocks(&src) + 64,
        "the copy filled the holes: {} blocks for {}",
        blocks(&copy),
        blocks(&src)
    );
    assert!(
        v1.image.digest.starts_with("sha256:"),
        "{:?}",
        v1.image.digest
    );
    storage.create_vm_drives("old", "img", WS).unwrap();
    storage
        .snapshot_drive("old", WORKSPACE_DRIVE, Some("s"), &mut NoQuiesce)
        .unwrap();
    storage.fork("old", "s", "old-fork").unwrap();

    let v2_src = fx.image_variant(b'2');
    let v2 = storage
        .import_image_from("img", &v2_src, "recipe two")
        .unwrap();
    assert_eq!(
        v2.change,
        ImageChange::Replaced {
            previous: v1.image.digest.clone(),
            kept_for: vec!["old".into(), "old-fork".into()],
        }
    );
    assert_ne!(v2.image.digest, v1.image.digest);
    assert_eq!(v2.image.source, "recipe two");
    assert_eq!(
        storage.image("img").unwrap().unwrap().digest,
        v2.image.digest
    );
    storage.create_vm_drives("new", "img", WS).unwrap();
    for (vm, version) in [
        ("old", &v1.image),
        ("old-fork", &v1.image),
        ("new", &v2.image),
    ] {
        let booted = storage.vm_image(vm).unwrap();
        assert_eq!(booted.digest, version.digest, "{vm}");
        assert_eq!(booted.path, version.path, "{vm}");
        assert!(booted.path.join("rootfs.ext4").is_file(), "{vm}");
    }
    let root_byte = |vm: &str| byte_at(&storage.vm_drives(vm).unwrap().root, VARIANT_AT);
    assert_eq!(root_byte("new"), b'2');
    assert_ne!(root_byte("old"), b'2');
    assert_eq!(storage.list_images().unwrap().len(), 1);

    let refused = storage.delete_image("img").unwrap_err().to_string();
    assert!(
        refused.contains(r#"["new", "old", "old-fork"]"#),
        "{refused}"
    );

    // The old version lives as long as a VM boots it.
    storage.destroy_vm_drives("old").unwrap();
    assert!(v1.image.path.is_dir(), "old-fork still boots it");
    storage.destroy_vm_drives("old-fork").unwrap();
    assert!(!v1.image.path.exists(), "no VM boots it any more");
    drop(storage);
    let (storage, report) = Storage::open(&fx.config).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(storage.vm_image("new").unwrap().digest, v2.image.digest);

    storage.destroy_vm_drives("new").unwrap();
    storage.delete_image("img").unwrap();
    assert!(storage.image("img").unwrap().is_none());
    assert!(!v2.image.path.exists());
    assert!(storage.problems().unwrap().is_empty());
}

/// What the catalog and pool hold, for before/after comparisons.
fn state(storage: &Storage) -> (Vec<String>, Vec<String>, Vec<String>) {
    let vms = storage
        .list_vms()
        .unwrap()
        .into_iter()
        .map(|v| v.vm)
        .collect();
    let snaps = storage
        .list_snapshots(None)
        .unwrap()
        .into_iter()
        .map(|s| format!("{}/{}", s.vm, s.name))
        .collect();
    let mut files: Vec<String> = walk(storage.pool().root());
    files.sort();
    (vms, snaps, files)
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        out.push(entry.path().display().to_string());
        if entry.file_type().unwrap().is_dir() {
            out.extend(walk(&entry.path()));
        }
    }
    out
}

#[test]
fn a_crash_between_any_two_steps_leaves_catalog_and_pool_consistent() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let setup = fx.open();
    setup.import_image("default", &fx.image_src).unwrap();
    let base = setup.create_vm_drives("base", "default", WS).unwrap();
    scribble(&base.workspace, DATA_AT, 4096, b'S');
    setup
        .snapshot_drive("base", WORKSPACE_DRIVE, Some("snap"), &mut NoQuiesce)
        .unwrap();
    drop(setup);

    type Op = fn(&Storage, usize) -> Result<(), StorageError>;
    type Check = fn(&Storage, usize);
    let ops: Vec<(&str, &[&str], Op, Check)> = vec![
        (
            "delete image",
            steps::DELETE_IMAGE_STEPS,
            |s, i| {
                s.import_image(&format!("d{i}"), &s_image())?;
                s.delete_image(&format!("d{i}"))
            },
            |s, i| {
                assert!(
                    s.image(&format!("d{i}")).unwrap().is_none(),
                    "a delete recorded is finished"
                );
            },
        ),
        (
            "import",
            steps::IMPORT_STEPS,
            |s, i| s.import_image(&format!("img{i}"), &s_image()).map(|_| ()),
            |s, i| {
                assert!(
                    s.image(&format!("img{i}")).unwrap().is_none(),
                    "an interrupted import is undone"
                );
            },
        ),
        (
            "create",
            steps::CREATE_STEPS,
            |s, i| {
                s.create_vm_drives(&format!("c{i}"), "default", WS)
                    .map(|_| ())
            },
            |s, i| {
                assert!(
                    s.vm_drives(&format!("c{i}")).is_err(),
                    "an interrupted create is undone"
                );
            },
        ),
        (
            "fork",
            steps::FORK_STEPS,
            |s, i| s.fork("base", "snap", &format!("f{i}")).map(|_| ()),
            |s, i| {
                assert!(
                    s.vm_drives(&format!("f{i}")).is_err(),
                    "an interrupted fork is undone"
                );
            },
        ),
        (
            "adopt",
            steps::ADOPT_STEPS,
            |s, i| {
                let drives = s.make_warm_drives(&format!("w{i}"), "default", 64 << 20)?;
                s.adopt_warm_drives(&drives, &format!("a{i}"), None, VmAttrs::default())
                    .map(|_| ())
            },
            |s, i| {
                let vm = format!("a{i}");
                assert!(
                    s.vm_drives(&vm).is_err(),
                    "an interrupted adoption is undone"
                );
                assert!(!s.pool().vm_dir(&vm).exists(), "its drives are not a VM's");
                // What a pooled VM left is discarded at nexusd's next start
                // (its drives, where a crash before the move left them).
                let left = s.discard_all_warm_drives().unwrap();
                assert!(
                    left.iter().all(|p| p.ends_with(format!("w{i}"))),
                    "{left:?}"
                );
                let warm = s.pool().root().join("warm");
                let entries = std::fs::read_dir(&warm).map_or(0, |d| d.count());
                assert_eq!(entries, 0, "pooled drives are left in {}", warm.display());
            },
        ),
        (
            "snapshot",
            steps::SNAPSHOT_STEPS,
            |s, i| {
                s.snapshot_drive(
                    "base",
                    WORKSPACE_DRIVE,
                    Some(&format!("n{i}")),
                    &mut NoQuiesce,
                )
                .map(|_| ())
            },
            |s, i| {
                assert!(
                    s.snapshot("base", &format!("n{i}")).is_err(),
                    "an interrupted snapshot is undone"
                )
            },
        ),
        (
            "rollback",
            steps::ROLLBACK_STEPS,
            |s, _| {
                scribble(&s.vm_drives("base").unwrap().workspace, DATA_AT, 4096, b'X');
                s.rollback_drive("base", "snap", &mut NoReattach)
                    .map(|_| ())
            },
            // Checked below, by step.
            |_, _| {},
        ),
        (
            "delete snapshot",
            steps::DELETE_STEPS,
            |s, i| {
                let name = format!("d{i}");
                s.snapshot_drive("base", WORKSPACE_DRIVE, Some(&name), &mut NoQuiesce)?;
                s.delete_snapshot("base", &name)
            },
            |s, i| {
                assert!(
                    s.snapshot("base", &format!("d{i}")).is_err(),
                    "an interrupted delete is finished"
                )
            },
        ),
        (
            "destroy",
            steps::DESTROY_STEPS,
            |s, i| {
                let vm = format!("x{i}");
                s.create_vm_drives(&vm, "default", WS)?;
                s.snapshot_drive(&vm, WORKSPACE_DRIVE, Some("s"), &mut NoQuiesce)?;
                s.destroy_vm_drives(&vm)
            },
            |s, i| {
                assert!(
                    s.vm_drives(&format!("x{i}")).is_err(),
                    "an interrupted destroy is finished"
                )
            },
        ),
    ];
    thread_local! { static IMAGE: std::cell::RefCell<std::path::PathBuf> = Default::default(); }
    fn s_image() -> std::path::PathBuf {
        IMAGE.with(|i| i.borrow().clone())
    }
    IMAGE.with(|i| *i.borrow_mut() = fx.image_src.clone());

    let mut case = 0;
    for (name, steps, op, check) in ops {
        for step in steps {
            case += 1;
            let storage = fx.open();
            storage.set_failpoint(Some(step));
            match op(&storage, case) {
                Err(StorageError::Injected(at)) => assert_eq!(at, *step),
                other => panic!("{name} at {step}: expected the injected crash, got {other:?}"),
            }
            // The process "dies" here; the next open reconciles.
            drop(storage);
            let (mut storage, report) = Storage::open(&fx.config).unwrap();
            assert!(
                !report.recovered.is_empty()
                    || step.ends_with(":recorded")
                    || !report.removed.is_empty()
                    || !report.reattach.is_empty(),
                "{name} at {step}: nothing was recovered: {report:?}"
            );
            let problems = storage.problems().unwrap();
            assert!(problems.is_empty(), "{name} at {step}: {problems:?}");
            check(&storage, case);
            if name == "rollback" {
                // Finished only once the guest had let go of the drive (a
                // guest that may still have it mounted is not written
                // under); either way the guest is owed its drive.
                let ws = storage.vm_drives("base").unwrap().workspace;
                let expected = if *step == "rollback:recorded" {
                    b'X'
                } else {
                    b'S'
                };
                assert_eq!(byte_at(&ws, DATA_AT), expected, "rollback at {step}");
                assert_eq!(
                    storage.pending_reattach().unwrap(),
                    [("base".to_owned(), WORKSPACE_DRIVE.to_owned())],
                    "rollback at {step}: the guest is owed its drive"
                );
                // Another rollback waits for it.
                assert!(matches!(
                    storage.rollback_drive("base", "snap", &mut NoReattach),
                    Err(StorageError::Busy { .. })
                ));
                // The record outlives another crash before the reattach.
                drop(storage);
                storage = Storage::open(&fx.config).unwrap().0;
                assert_eq!(storage.pending_reattach().unwrap().len(), 1);
                storage.reattached("base").unwrap();
                assert!(storage.pending_reattach().unwrap().is_empty());
            }
            assert!(
                storage.vm_drives("base").is_ok() && storage.snapshot("base", "snap").is_ok(),
                "{name} at {step}: bystanders intact"
            );
        }
    }
}

/// A pooled VM's drives become a new VM's whole (moved, not copied), or
/// stay as they were when the adoption is refused.
#[test]
fn pooled_drives_are_adopted_whole_or_left_as_they_were() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let storage = fx.open();
    storage.import_image("default", &fx.image_src).unwrap();
    storage.create_vm_drives("taken", "default", WS).unwrap();
    let drives = storage
        .make_warm_drives("pool-0", "default", 64 << 20)
        .unwrap();
    assert!(drives.root.is_file() && drives.workspace.is_file());
    scribble(&drives.workspace, DATA_AT, 4096, b'W');
    let before = state(&storage);

    let refused = [
        ("taken", "has drives already"),
        ("Bad Name", "VM name"),
        ("", "VM name"),
    ];
    for (name, expected) in refused {
        let err = storage
            .adopt_warm_drives(&drives, name, None, VmAttrs::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{name:?}: {err}");
        assert_eq!(state(&storage), before, "{name:?} changed something");
        assert!(drives.dir.is_dir(), "{name:?}: the drives moved");
        assert_eq!(byte_at(&drives.workspace, DATA_AT), b'W', "{name:?}");
    }
    // An image rebuilt since the drives were made: they are not the
    // image's any more.
    let replaced = storage
        .import_image("default", &fx.image_variant(b'2'))
        .unwrap();
    let err = storage
        .adopt_warm_drives(&drives, "late", None, VmAttrs::default())
        .unwrap_err();
    assert!(matches!(err, StorageError::ImageChanged(_)), "{err:?}");
    assert!(storage.vm_drives("late").is_err() && drives.dir.is_dir());
    assert_eq!(byte_at(&drives.workspace, DATA_AT), b'W');
    storage.discard_warm_drives(&drives).unwrap();
    assert!(!drives.dir.exists());

    let fresh = storage
        .make_warm_drives("pool-1", "default", 64 << 20)
        .unwrap();
    scribble(&fresh.workspace, DATA_AT, 4096, b'F');
    let owner = VmAttrs {
        config: "{}",
        owner: Some("alice"),
    };
    let vm = storage
        .adopt_warm_drives(&fresh, "mine", None, owner)
        .unwrap();
    assert!(!fresh.dir.exists(), "moved, not copied");
    assert_eq!(byte_at(&vm.workspace, DATA_AT), b'F');
    assert_eq!(storage.vm_image("mine").unwrap().digest, replaced.digest);
    assert!(storage.discard_all_warm_drives().unwrap().is_empty());
    drop(storage);
    let (storage, report) = Storage::open(&fx.config).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert!(storage.vm_drives("mine").is_ok());
    assert!(storage.problems().unwrap().is_empty());
}

#[test]
fn a_pool_directory_already_on_btrfs_is_used_as_it_is() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    // An admin's btrfs filesystem, mounted by them.
    let fs_image = fx.dir.path().join("admin-btrfs.img");
    std::fs::File::create(&fs_image)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let mkfs = std::process::Command::new("mkfs.btrfs")
        .arg("-q")
        .arg(&fs_image)
        .output()
        .unwrap();
    assert!(mkfs.status.success());
    let mount = fx.dir.path().join("admin-mount");
    std::fs::create_dir_all(&mount).unwrap();
    let mounted = std::process::Command::new("mount")
        .arg("-o")
        .arg("loop")
        .arg(&fs_image)
        .arg(&mount)
        .status()
        .unwrap();
    assert!(mounted.success());

    let mut config = fx.config.clone();
    config.pool_dir = Some(mount.join("nexus"));
    let (storage, _) = Storage::open(&config).unwrap();
    assert_eq!(storage.pool().kind(), PoolKind::Native);
    assert!(
        !config.state_dir.join("pool.img").exists(),
        "no image is made for a btrfs directory"
    );
    storage.import_image("default", &fx.image_src).unwrap();
    storage.create_vm_drives("vm1", "default", WS).unwrap();
    storage
        .snapshot_drive("vm1", WORKSPACE_DRIVE, Some("s"), &mut NoQuiesce)
        .unwrap();
    assert!(mount.join("nexus/snapshots/vm1/s/workspace.ext4").is_file());
    storage.pool().unmount().unwrap(); // a no-op for a pool we did not mount
    assert!(mount.join("nexus/vms/vm1").exists());
    drop(storage);
    let _ = std::process::Command::new("umount").arg(&mount).status();
}

#[test]
fn tokens_are_kept_by_digest_named_once_and_revoked_for_good() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let storage = fx.open();
    let digest = [7u8; 32];
    assert!(matches!(
        storage.add_token("ci", &digest, "admin", None),
        Err(StorageError::NoRole(_))
    ));
    storage.put_role("admin", "{}").unwrap();
    storage.put_role("user", "{}").unwrap();
    let added = storage
        .add_token("ci", &digest, "admin", Some("2030-01-01T00:00:00Z"))
        .unwrap();
    assert_eq!(added.digest, digest);
    assert_eq!(added.expires_at.as_deref(), Some("2030-01-01T00:00:00Z"));
    assert!(matches!(
        storage.add_token("ci", &[8u8; 32], "user", None),
        Err(StorageError::TokenExists(_))
    ));
    assert!(matches!(
        storage.add_token("Bad Name", &[9u8; 32], "user", None),
        Err(StorageError::Name(_))
    ));
    // The same digest twice would make a token two identities.
    assert!(storage.add_token("other", &digest, "user", None).is_err());
    let revoked = storage.revoke_token("ci").unwrap();
    let at = revoked.revoked_at.clone().unwrap();
    assert_eq!(storage.revoke_token("ci").unwrap().revoked_at, Some(at));
    assert!(matches!(
        storage.revoke_token("nope"),
        Err(StorageError::NoToken(_))
    ));
    drop(storage);
    let storage = fx.open();
    let all = storage.tokens().unwrap();
    assert_eq!(all.len(), 1);
    assert!(all[0].revoked_at.is_some(), "revocation survives a restart");
}

#[test]
fn a_vm_is_recorded_with_its_config_and_owner_and_a_fork_inherits_them() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let storage = fx.open();
    storage.import_image("default", &fx.image_src).unwrap();
    let attrs = nexus_storage::VmAttrs {
        config: r#"{"vcpus":2}"#,
        owner: Some("token:ci"),
    };
    storage
        .create_vm_drives_as("vm1", "default", WS, attrs)
        .unwrap();
    storage
        .snapshot_drive("vm1", WORKSPACE_DRIVE, Some("s"), &mut NoQuiesce)
        .unwrap();
    storage.fork("vm1", "s", "vm2").unwrap();
    for vm in ["vm1", "vm2"] {
        assert_eq!(storage.vm_owner(vm).unwrap().as_deref(), Some("token:ci"));
        assert_eq!(storage.vm_config(vm).unwrap(), r#"{"vcpus":2}"#);
    }
    storage
        .fork_as("vm1", "s", "vm4", Some("token:other"))
        .unwrap();
    assert_eq!(
        storage.vm_owner("vm4").unwrap().as_deref(),
        Some("token:other")
    );
    assert_eq!(storage.vm_config("vm4").unwrap(), r#"{"vcpus":2}"#);
    storage.fork_as("vm1", "s", "vm5", None).unwrap();
    assert_eq!(storage.vm_owner("vm5").unwrap(), None);
    storage.create_vm_drives("vm3", "default", WS).unwrap();
    assert_eq!(storage.vm_owner("vm3").unwrap(), None);
    assert_eq!(storage.vm_config("vm3").unwrap(), "{}");
}

#[test]
fn roles_are_kept_while_tokens_hold_them_and_grants_go_with_their_vm() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let storage = fx.open();
    assert!(storage.put_role("ci", r#"{"tools":["*"]}"#).unwrap());
    assert!(!storage.put_role("ci", r#"{"tools":["list_*"]}"#).unwrap());
    assert!(matches!(
        storage.put_role("Bad Role", "{}"),
        Err(StorageError::Name(_))
    ));
    assert_eq!(
        storage.role("ci").unwrap().unwrap().spec,
        r#"{"tools":["list_*"]}"#
    );
    storage.add_token("bot", &[1u8; 32], "ci", None).unwrap();
    assert_eq!(
        storage.delete_role("ci").unwrap(),
        Err(vec!["bot".to_owned()])
    );
    storage.revoke_token("bot").unwrap();
    assert_eq!(storage.delete_role("ci").unwrap(), Ok(()));
    assert!(matches!(
        storage.delete_role("ci"),
        Err(StorageError::NoRole(_))
    ));
    assert!(storage.roles().unwrap().is_empty());

    storage.import_image("default", &fx.image_src).unwrap();
    storage.create_vm_drives("vm1", "default", WS).unwrap();
    assert!(matches!(
        storage.grant_vm("nope", "token:bot"),
        Err(StorageError::NoVm(_))
    ));
    let grant = storage.grant_vm("vm1", "token:bot").unwrap();
    assert_eq!(storage.grant_vm("vm1", "token:bot").unwrap(), grant);
    storage.grant_vm("vm1", "uid:1000").unwrap();
    assert_eq!(storage.grants().unwrap().len(), 2);
    storage.revoke_grant("vm1", "uid:1000").unwrap();
    assert!(matches!(
        storage.revoke_grant("vm1", "uid:1000"),
        Err(StorageError::NoGrant { .. })
    ));
    storage.destroy_vm_drives("vm1").unwrap();
    assert!(
        storage.grants().unwrap().is_empty(),
        "grants go with the VM"
    );
}

#[test]
fn secrets_keep_their_placeholder_and_grants_go_with_the_vm_or_the_secret() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let storage = fx.open();
    assert!(storage.set_secret("API", "v1", "{}", "ph-1").unwrap());
    assert!(
        !storage
            .set_secret("API", "v2", "{\"x\":1}", "ph-2")
            .unwrap()
    );
    let all = storage.secrets().unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(
        (
            all[0].value.as_str(),
            all[0].binding.as_str(),
            all[0].placeholder.as_str()
        ),
        ("v2", "{\"x\":1}", "ph-1"),
        "a replaced secret keeps its placeholder"
    );
    assert!(
        !format!("{:?}", all[0]).contains("v2"),
        "Debug never shows the value"
    );
    assert!(!serde_json::to_string(&all[0]).unwrap().contains("v2"));
    storage.import_image("default", &fx.image_src).unwrap();
    storage.create_vm_drives("vm1", "default", WS).unwrap();
    storage.create_vm_drives("vm2", "default", WS).unwrap();
    assert!(matches!(
        storage.grant_secret("API", "nope"),
        Err(StorageError::NoVm(_))
    ));
    assert!(matches!(
        storage.grant_secret("NOPE", "vm1"),
        Err(StorageError::NoSecret(_))
    ));
    storage.grant_secret("API", "vm1").unwrap();
    storage.grant_secret("API", "vm1").unwrap();
    storage.grant_secret("API", "vm2").unwrap();
    assert_eq!(storage.secrets().unwrap()[0].vms, ["vm1", "vm2"]);
    storage.revoke_secret("API", "vm2").unwrap();
    assert!(matches!(
        storage.revoke_secret("API", "vm2"),
        Err(StorageError::NoSecretGrant { .. })
    ));
    storage.destroy_vm_drives("vm1").unwrap();
    assert!(
        storage.secrets().unwrap()[0].vms.is_empty(),
        "grants go with the VM"
    );
    storage.grant_secret("API", "vm2").unwrap();
    storage.delete_secret("API").unwrap();
    assert!(matches!(
        storage.delete_secret("API"),
        Err(StorageError::NoSecret(_))
    ));
    assert!(storage.secrets().unwrap().is_empty());
    storage.set_secret("API", "v3", "{}", "ph-3").unwrap();
    assert!(
        storage.secrets().unwrap()[0].vms.is_empty(),
        "grants went with the secret"
    );
}

#[test]
fn the_audit_trail_keeps_its_newest_rows_and_answers_by_identity_vm_and_time() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let storage = fx.open();
    let record = |i: i64, who: &str, vm: Option<&str>| nexus_storage::AuditRecord {
        id: 0,
        at: format!("2026-11-29T10:00:{i:02}.000Z"),
        identity: who.into(),
        transport: "http".into(),
        tool: "get_vm".into(),
        vm: vm.map(str::to_owned),
        arguments: "{}".into(),
        outcome: "ok".into(),
        duration_us: i,
    };
    let batch: Vec<_> = (0..10)
        .map(|i| {
            record(
                i,
                if i % 2 == 0 { "token:a" } else { "token:b" },
                Some("vm1"),
            )
        })
        .collect();
    storage.append_audit(&batch, 6).unwrap();
    let all = storage
        .read_audit(&nexus_storage::AuditQuery {
            limit: 100,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        all.iter().map(|r| r.duration_us).collect::<Vec<_>>(),
        [9, 8, 7, 6, 5, 4],
        "the newest 6, newest first"
    );
    let query = |identity: Option<&str>, since: Option<&str>, before: Option<i64>| {
        storage
            .read_audit(&nexus_storage::AuditQuery {
                identity: identity.map(str::to_owned),
                vm: Some("vm1".into()),
                since: since.map(str::to_owned),
                before_id: before,
                limit: 2,
            })
            .unwrap()
            .iter()
            .map(|r| r.duration_us)
            .collect::<Vec<_>>()
    };
    assert_eq!(query(Some("token:a"), None, None), [8, 6]);
    assert_eq!(query(None, Some("2026-11-29T10:00:08.000Z"), None), [9, 8]);
    assert_eq!(query(None, None, Some(all[1].id)), [7, 6]);
}
