//! Fast-start benchmark (needs root for its loop-mounted pool), one
//! release nexusd with a warm pool of the minimal image, in one run:
//! - spawn_vm to ready (its answer: the guest's tools answer), and to the
//!   first command's answer, from the pool and cold (a shape the pool
//!   does not hold: a 2 GiB workspace), alternating;
//! - fork_vm of a running VM (a snapshot taken now) into 1 and into 5
//!   ready VMs, with the pool full;
//! - the pool's idle host memory per VM: the RSS of each spare's
//!   processes (VMM and vsock helper), after they idled.
//!
//!   cargo run --release -p nexus-integration --bin bench-spawn [-- --samples N --forks M --pool P]
//!
//! Last line: `spawn pool_p50_ms=.. cold_p50_ms=.. fork_p50_ms=.. fork5_p50_ms=.. pool_idle_rss_mib=..`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nexus_integration::ensure_minimal_image;
use nexus_integration::nexusd::{
    StateDir, admin_token, build_release, call, http as nexus_http, serve_with, stop,
};
use rmcp::service::RunningService;
use rmcp::{RoleClient, ServiceExt};
use serde_json::json;

type Client = RunningService<RoleClient, ()>;

struct Args {
    samples: usize,
    forks: usize,
    pool: u32,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        samples: 15,
        forks: 5,
        pool: 5,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--samples" => args.samples = value()?.parse()?,
            "--forks" => args.forks = value()?.parse()?,
            "--pool" => args.pool = value()?.parse()?,
            other => bail!("unknown argument {other:?}: use --samples N, --forks M, --pool P"),
        }
    }
    if args.samples < 2 || args.forks < 1 || args.pool < 5 {
        bail!("--samples must be at least 2, --forks at least 1, --pool at least 5");
    }
    Ok(args)
}

/// Waits until the pool has `ready` spares (two minutes at most).
async fn pool_ready(client: &Client, ready: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = call(client, "host_status", json!({})).await?;
        if status["warm_pools"][0]["ready"].as_u64() == Some(ready) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the pool never had {ready} ready: {status}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn p(samples: &mut [Duration], at: f64) -> f64 {
    samples.sort();
    let i = ((samples.len() as f64 * at) as usize).min(samples.len().saturating_sub(1));
    samples.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// Host memory of each spare's processes (VMM and vsock helper), MiB:
/// (RSS, of which guest memory (shared), of which the VMM's own
/// (anonymous: TCG's translation cache among it), and PSS: its share of
/// the host's memory, pages shared with other processes divided among
/// them (the guest memory both processes map counted once, the QEMU
/// binary shared by all spares)).
fn spare_rss_mib(state: &Path) -> Vec<(f64, f64, f64, f64)> {
    let Ok(dirs) = std::fs::read_dir(state.join("run-warm")) else {
        return Vec::new();
    };
    let field = |status: &str, name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    dirs.flatten()
        .map(|d| {
            let pids = std::fs::read_to_string(d.path().join("pids")).unwrap_or_default();
            let (mut rss, mut shmem, mut anon, mut pss) = (0u64, 0u64, 0u64, 0u64);
            for pid in pids.lines().filter_map(|l| l.split_whitespace().next()) {
                let status =
                    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                rss += field(&status, "VmRSS:");
                shmem += field(&status, "RssShmem:");
                anon += field(&status, "RssAnon:");
                let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
                    .unwrap_or_default();
                pss += field(&rollup, "Pss:");
            }
            let mib = |kib: u64| kib as f64 / 1024.0;
            (mib(rss), mib(shmem), mib(anon), mib(pss))
        })
        .collect()
}

/// Times `spawn_vm` (to its answer) and then the first `exec true`.
async fn spawn(client: &Client, args: serde_json::Value) -> anyhow::Result<(Duration, Duration)> {
    let name = args["name"].as_str().unwrap_or_default().to_owned();
    let started = Instant::now();
    call(client, "spawn_vm", args).await?;
    let ready = started.elapsed();
    call(client, &format!("{name}__exec"), json!({"argv": ["true"]})).await?;
    Ok((ready, started.elapsed()))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let (image, _) = ensure_minimal_image()?;
    let nexusd = build_release()?;
    let state = StateDir::new(&image)?;
    let config = format!(
        "[[warm_pool]]\nimage = \"default\"\nsize = {}\n[limits]\nmax_vms = 64\n",
        args.pool
    );
    let (serve, url) = serve_with(&nexusd, &state, &config).await?;
    let client = ().serve(nexus_http(url, admin_token(state.path())?)).await?;
    let full = u64::from(args.pool);
    println!(
        "warm pool of {} (1 vCPU, 256 MiB, 1 GiB workspace), minimal image; filling it",
        args.pool
    );
    pool_ready(&client, full).await?;

    // Idle host memory of a spare, once they have all idled a while.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss = spare_rss_mib(state.path());
    let mean = |f: fn(&(f64, f64, f64, f64)) -> f64| {
        rss.iter().map(f).sum::<f64>() / rss.len().max(1) as f64
    };
    let rss_mib = mean(|r| r.0);
    println!(
        "pool idle RSS per VM: {rss_mib:.0} MiB (VMM and vsock helper, {} spares), of which guest memory {:.0} MiB, the VMM's own {:.0} MiB (TCG's translation cache among it), the rest mapped files (binaries, shared); PSS (its share of host memory) {:.0} MiB",
        rss.len(),
        mean(|r| r.1),
        mean(|r| r.2),
        mean(|r| r.3),
    );

    // Spawns, pooled and cold alternating; the pool is refilled (not
    // timed) before each pooled one.
    let (mut pooled, mut pooled_cmd, mut cold, mut cold_cmd) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..args.samples {
        pool_ready(&client, full).await?;
        let (ready, first) = spawn(&client, json!({"name": format!("p{i}")})).await?;
        pooled.push(ready);
        pooled_cmd.push(first);
        let (ready, first) = spawn(
            &client,
            json!({"name": format!("c{i}"), "workspace_gib": 2}),
        )
        .await?;
        cold.push(ready);
        cold_cmd.push(first);
        for vm in [format!("p{i}"), format!("c{i}")] {
            call(&client, "destroy_vm", json!({"vm": vm})).await?;
        }
    }
    let (pool_p50, pool_p99) = (p(&mut pooled, 0.5), p(&mut pooled, 0.99));
    let (cold_p50, cold_p99) = (p(&mut cold, 0.5), p(&mut cold, 0.99));
    println!(
        "spawn_vm to ready: pool p50 {pool_p50:.1} ms (p99 {pool_p99:.1}), cold p50 {cold_p50:.1} ms (p99 {cold_p99:.1}); {} samples each",
        args.samples
    );
    println!(
        "spawn_vm to the first command's answer: pool p50 {:.1} ms (p99 {:.1}), cold p50 {:.1} ms (p99 {:.1})",
        p(&mut pooled_cmd, 0.5),
        p(&mut pooled_cmd, 0.99),
        p(&mut cold_cmd, 0.5),
        p(&mut cold_cmd, 0.99)
    );

    // Forks of a running VM with something in its workspace.
    pool_ready(&client, full).await?;
    call(&client, "spawn_vm", json!({"name": "src"})).await?;
    call(
        &client,
        "src__exec",
        json!({"command": "head -c 4194304 /dev/urandom > /workspace/data && sync"}),
    )
    .await?;
    let (mut one, mut five) = (Vec::new(), Vec::new());
    for i in 0..args.forks {
        pool_ready(&client, full).await?;
        let started = Instant::now();
        let forked = call(
            &client,
            "fork_vm",
            json!({"vm": "src", "name": format!("f{i}")}),
        )
        .await?;
        one.push(started.elapsed());
        pool_ready(&client, full).await?;
        let started = Instant::now();
        let forked5 = call(
            &client,
            "fork_vm",
            json!({"vm": "src", "name": format!("g{i}"), "count": 5}),
        )
        .await?;
        five.push(started.elapsed());
        for vm in forked["vms"]
            .as_array()
            .into_iter()
            .chain(forked5["vms"].as_array())
            .flatten()
        {
            let name = vm["name"].as_str().unwrap_or_default();
            call(&client, "destroy_vm", json!({"vm": name})).await?;
        }
    }
    let (fork_p50, fork5_p50) = (p(&mut one, 0.5), p(&mut five, 0.5));
    println!(
        "fork_vm of a running VM to ready: 1 fork p50 {fork_p50:.1} ms (p99 {:.1}), 5 forks p50 {fork5_p50:.1} ms (p99 {:.1}); {} samples each",
        p(&mut one, 0.99),
        p(&mut five, 0.99),
        args.forks
    );
    client.cancel().await?;
    stop(serve).await;
    println!(
        "spawn pool_p50_ms={pool_p50:.1} cold_p50_ms={cold_p50:.1} fork_p50_ms={fork_p50:.1} fork5_p50_ms={fork5_p50:.1} pool_idle_rss_mib={rss_mib:.0}"
    );
    Ok(())
}
