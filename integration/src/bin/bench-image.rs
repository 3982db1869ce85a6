//! Image benchmark, in one run: the default image (rootfs/recipes/default.toml)
//! built from clean (no cached userland: mmdebstrap from the Debian
//! archive; the kernel cache is reused), cached (userland reused, root
//! filesystem packed again into a new directory) and unchanged (nothing to
//! do); its size, logical and on disk; and what each VM made from it costs
//! in a btrfs pool (exclusive bytes of its directory: root drive reflinked
//! from the image, fresh workspace); then, through a release nexusd,
//! `spawn_vm` to ready of the default image against the minimal one,
//! alternating. Needs root (mmdebstrap, loop mount).
//!
//!   cargo run --release -p nexus-integration --bin bench-image [-- --cached-only]
//!
//! `--cached-only` skips the clean build (it downloads ~200 MiB).
//! Last line: `image build_clean_s=.. build_cached_s=.. build_unchanged_s=..
//! rootfs_mib=.. rootfs_disk_mib=.. pool_image_disk_mib=.. root_exclusive_kib=..
//! vm_exclusive_kib=.. ready_default_ms=.. ready_minimal_ms=.. ready_ratio=..`.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context as _, bail};
use nexus_integration::workspace_root;
use nexus_rootfs::{BuildOptions, Recipe, default_cache_dir};
use nexus_storage::{Storage, StorageConfig, WorkspaceSource};

const VMS: usize = 3;
/// spawn_vm runs per image.
const SPAWNS: usize = 7;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut clean = true;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--cached-only" => clean = false,
            other => bail!("unknown argument {other:?}: use --cached-only"),
        }
    }
    if !nix::unistd::Uid::effective().is_root() {
        bail!("run as root: mmdebstrap --mode=root and the loop-mounted pool need it");
    }
    let recipe = Recipe::load(&workspace_root().join("rootfs/recipes/default.toml"))?;
    let scratch = tempfile::Builder::new()
        .prefix("bench-image")
        .tempdir_in(workspace_root().join("target"))?;
    let real_cache = default_cache_dir();
    // A cache with the kernel builds but no userland: a clean image build.
    let clean_cache = scratch.path().join("cache");
    std::fs::create_dir_all(&clean_cache)?;
    std::os::unix::fs::symlink(real_cache.join("kernel"), clean_cache.join("kernel"))
        .context("linking the kernel cache")?;
    let cache = if clean { &clean_cache } else { &real_cache };
    let opts = |out: &Path| BuildOptions {
        cache_dir: cache.clone(),
        recipe: recipe.clone(),
        ..BuildOptions::new(out, "default")
    };
    let timed = |out: &Path| -> anyhow::Result<f64> {
        let started = Instant::now();
        nexus_rootfs::build(&opts(out))?;
        Ok(started.elapsed().as_secs_f64())
    };
    let first = scratch.path().join("image-1");
    let clean_s = if clean {
        let s = timed(&first)?;
        std::fs::remove_dir_all(&first)?;
        Some(s)
    } else {
        None
    };
    let image = scratch.path().join("image");
    let cached_s = timed(&image)?;
    let unchanged_s = timed(&image)?;
    let rootfs = std::fs::metadata(image.join("rootfs.ext4"))?;
    let (rootfs_mib, rootfs_disk_mib) = (rootfs.len() >> 20, (rootfs.blocks() * 512) >> 20);

    let mut config = StorageConfig::new(scratch.path().join("state"));
    config.pool_image_bytes = 8 << 30;
    let (storage, _) = Storage::open(&config)?;
    let result = (|| -> anyhow::Result<(u64, u64, u64)> {
        let imported = storage.import_image("default", &image)?;
        let (mut root, mut all) = (Vec::new(), Vec::new());
        for i in 0..VMS {
            let vm = format!("vm{i}");
            let drives = storage.create_vm_drives(
                &vm,
                "default",
                WorkspaceSource::New { bytes: 1 << 30 },
            )?;
            root.push(nexus_storage::pool::usage(&drives.root)?.0);
            all.push(storage.usage(&vm)?.exclusive_bytes);
        }
        root.sort_unstable();
        all.sort_unstable();
        Ok((
            imported.disk_bytes() >> 20,
            root[VMS / 2] >> 10,
            all[VMS / 2] >> 10,
        ))
    })();
    let _ = storage.pool().unmount();
    let (pool_image_disk_mib, root_exclusive_kib, vm_exclusive_kib) = result?;

    let (ready_default, ready_minimal) = ready_times(&image).await?;

    let clean_text = clean_s.map_or("skipped".to_owned(), |s| format!("{s:.1}"));
    println!(
        "default image build: clean {clean_text} s, cached {cached_s:.1} s, unchanged {unchanged_s:.2} s"
    );
    println!(
        "rootfs.ext4: {rootfs_mib} MiB logical, {rootfs_disk_mib} MiB on disk; in the pool: {pool_image_disk_mib} MiB"
    );
    println!(
        "each VM made from it (median of {VMS}): root drive {root_exclusive_kib} KiB exclusive, \
         whole VM {vm_exclusive_kib} KiB (with a fresh 1 GiB workspace's ext4 metadata)"
    );
    println!(
        "image build_clean_s={clean_text} build_cached_s={cached_s:.1} build_unchanged_s={unchanged_s:.2} \
         rootfs_mib={rootfs_mib} rootfs_disk_mib={rootfs_disk_mib} pool_image_disk_mib={pool_image_disk_mib} \
         root_exclusive_kib={root_exclusive_kib} vm_exclusive_kib={vm_exclusive_kib} \
         ready_default_ms={ready_default} ready_minimal_ms={ready_minimal} ready_ratio={:.2}",
        ready_default as f64 / ready_minimal as f64
    );
    Ok(())
}

/// Median spawn_vm-to-ready (nexusd's own `ready_ms`) of the default
/// image at `image` and of the minimal one, spawned alternately.
async fn ready_times(image: &Path) -> anyhow::Result<(u64, u64)> {
    use nexus_integration::nexusd;
    let (minimal, _) = nexus_integration::ensure_minimal_image()?;
    let nexusd_bin = nexusd::build_release()?;
    let state = nexusd::StateDir::new(image)?;
    std::os::unix::fs::symlink(&minimal, state.path().join("images/minimal"))?;
    let (serve, url) = nexusd::serve(&nexusd_bin, &state).await?;
    let result = async {
        use rmcp::ServiceExt as _;
        let client = ().serve(nexusd::http(url, nexusd::admin_token(state.path())?)).await?;
        let (mut default, mut small) = (Vec::new(), Vec::new());
        for run in 0..SPAWNS {
            for (image, out) in [("default", &mut default), ("minimal", &mut small)] {
                let name = format!("{image}-{run}");
                let vm = nexus_integration::call(
                    &client,
                    "spawn_vm",
                    serde_json::json!({"name": name, "image": image}),
                )
                .await?;
                let ms = vm["ready_ms"]
                    .as_u64()
                    .context("spawn_vm gave no ready_ms")?;
                println!("{image} spawn {}: ready in {ms} ms", run + 1);
                out.push(ms);
                nexus_integration::call(&client, "destroy_vm", serde_json::json!({"vm": name}))
                    .await?;
            }
        }
        client.cancel().await?;
        default.sort_unstable();
        small.sort_unstable();
        anyhow::Ok((default[SPAWNS / 2], small[SPAWNS / 2]))
    }
    .await;
    nexusd::stop(serve).await;
    let (ready_default, ready_minimal) = result?;
    println!(
        "spawn_vm to ready through nexusd (median of {SPAWNS}): default {ready_default} ms, minimal {ready_minimal} ms"
    );
    Ok((ready_default, ready_minimal))
}
