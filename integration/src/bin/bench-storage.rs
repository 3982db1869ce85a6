//! Storage benchmark: snapshot, rollback and fork of workspaces holding
//! 100 MiB, 1 GiB and 4 GiB of written data, next to a plain full copy of
//! the same data, in one run on a loop-mounted btrfs pool (needs root).
//!
//!   cargo run --release -p nexus-integration --bin bench-storage [-- --runs N]
//!
//! Deleted subvolumes are cleaned up by btrfs in the background; each run
//! waits for that (untimed) so every timed snapshot starts from the same
//! state. Without the wait, a 4 GiB snapshot measured ~5.4 ms against
//! 2.7 ms at 100 MiB: the cleanup of the previous run, not the snapshot.
//!
//! Last line: `storage snap_ms_100m=.. snap_ms_1g=.. snap_ms_4g=.. flat_ratio=<4g/100m> copy_ratio_4g=<copy/snapshot>`.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nexus_integration::median_ms;
use nexus_storage::{
    NoQuiesce, NoReattach, Storage, StorageConfig, WORKSPACE_DRIVE, WorkspaceSource,
};

const SIZES: [(&str, u64); 3] = [("100m", 100 << 20), ("1g", 1 << 30), ("4g", 4 << 30)];
/// Data starts past the ext4 metadata at the head of the drive.
const DATA_AT: u64 = 64 << 20;
const BLOCK: usize = 4 << 20;

fn main() -> anyhow::Result<()> {
    let mut runs = 7usize;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--runs" => runs = it.next().context("--runs needs a value")?.parse()?,
            other => bail!("unknown argument {other:?}: use --runs N"),
        }
    }
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let dir = tempfile::Builder::new()
        .prefix("nexus-bench-storage")
        .tempdir_in("/var/tmp")?;
    let mut config = StorageConfig::new(dir.path().join("state"));
    config.pool_image_bytes = 32 << 30;
    let (storage, _) = Storage::open(&config)?;
    let result = run(&storage, dir.path(), runs);
    storage.pool().unmount()?;
    result
}

fn run(storage: &Storage, dir: &Path, runs: usize) -> anyhow::Result<()> {
    let image = dir.join("image");
    std::fs::create_dir_all(&image)?;
    let rootfs = image.join("rootfs.ext4");
    std::fs::File::create(&rootfs)?.set_len(16 << 20)?;
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&rootfs)
        .status()?;
    if !ok.success() {
        bail!("mkfs.ext4 failed");
    }
    std::fs::write(
        image.join("manifest.json"),
        r#"{"files": {"rootfs.ext4": {}}}"#,
    )?;
    storage.import_image("bench", &image)?;

    println!("size   snapshot_ms rollback_ms fork_ms  full_copy_ms (medians of {runs})");
    let mut snap_ms = Vec::new();
    let mut copy_4g = 0.0;
    for (label, bytes) in SIZES {
        let vm = format!("ws-{label}");
        let drives = storage.create_vm_drives(
            &vm,
            "bench",
            WorkspaceSource::New {
                bytes: DATA_AT + bytes + (64 << 20),
            },
        )?;
        write_data(&drives.workspace, bytes)?;

        let (mut snaps, mut rollbacks, mut forks) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..runs {
            let name = format!("r{i}");
            let started = Instant::now();
            storage.snapshot_drive(&vm, WORKSPACE_DRIVE, Some(&name), &mut NoQuiesce)?;
            snaps.push(started.elapsed());

            // Change something, then roll it back.
            scribble(&drives.workspace, DATA_AT, i as u8)?;
            let started = Instant::now();
            storage.rollback_drive(&vm, &name, &mut NoReattach)?;
            rollbacks.push(started.elapsed());

            let fork = format!("{vm}-f{i}");
            let started = Instant::now();
            storage.fork(&vm, &name, &fork)?;
            forks.push(started.elapsed());
            storage.destroy_vm_drives(&fork)?;
            storage.delete_snapshot(&vm, &name)?;
            // btrfs drops deleted subvolumes' extents in the background;
            // let it finish so each run starts from the same state.
            settle(storage.pool().root())?;
        }
        let copy = full_copy(&drives.workspace, &dir.join("copy.ext4"))?;
        let (s, r, f) = (
            median_ms(&mut snaps),
            median_ms(&mut rollbacks),
            median_ms(&mut forks),
        );
        let c = copy.as_secs_f64() * 1000.0;
        println!("{label:<6} {s:>11.1} {r:>11.1} {f:>7.1} {c:>13.0}");
        snap_ms.push(s);
        if label == "4g" {
            copy_4g = c;
        }
        storage.destroy_vm_drives(&vm)?;
    }
    let usage_note = "(snapshot = read-only btrfs subvolume snapshot; rollback = FICLONE into the live file; fork = writable snapshot)";
    println!("{usage_note}");
    println!(
        "storage snap_ms_100m={:.1} snap_ms_1g={:.1} snap_ms_4g={:.1} flat_ratio={:.2} copy_ratio_4g={:.0}",
        snap_ms[0],
        snap_ms[1],
        snap_ms[2],
        snap_ms[2] / snap_ms[0],
        copy_4g / snap_ms[2]
    );
    Ok(())
}

/// Writes `bytes` of varied data into the drive, then flushes it.
fn write_data(path: &Path, bytes: u64) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
    file.seek(SeekFrom::Start(DATA_AT))?;
    let mut block = vec![0u8; BLOCK];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for b in block.iter_mut() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *b = state as u8;
    }
    let mut written = 0u64;
    while written < bytes {
        // Vary each block a little so no two are alike.
        block[..8].copy_from_slice(&written.to_le_bytes());
        let n = (bytes - written).min(BLOCK as u64) as usize;
        file.write_all(&block[..n])?;
        written += n as u64;
    }
    file.sync_all()?;
    Ok(())
}

fn settle(pool: &Path) -> anyhow::Result<()> {
    let ok = Command::new("btrfs")
        .args(["subvolume", "sync"])
        .arg(pool)
        .stdout(std::process::Stdio::null())
        .status()?;
    if !ok.success() {
        bail!("btrfs subvolume sync failed");
    }
    let ok = Command::new("sync").arg("-f").arg(pool).status()?;
    if !ok.success() {
        bail!("sync failed");
    }
    Ok(())
}

fn scribble(path: &Path, offset: u64, fill: u8) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    file.write_all(&[fill; 4096])?;
    file.sync_all()?;
    Ok(())
}

/// A plain copy of every byte (no reflink), flushed to disk.
fn full_copy(src: &Path, dst: &Path) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let status = Command::new("cp")
        .args(["--reflink=never", "--sparse=always"])
        .arg(src)
        .arg(dst)
        .status()?;
    if !status.success() {
        bail!("cp failed");
    }
    std::fs::File::open(dst)?.sync_all()?;
    let took = started.elapsed();
    std::fs::remove_file(dst)?;
    Ok(took)
}
