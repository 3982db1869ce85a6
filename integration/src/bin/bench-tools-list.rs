//! `tools/list` latency with 1, 10 and 50 running VMs, on both tool
//! surfaces (per-VM `VM__TOOL` and shared `vm_TOOL`), measured side by side
//! over streamable HTTP against a release nexusd (needs root for its
//! loop-mounted pool). Every page is fetched; the guests' tool lists are
//! cached per guest session, so this is nexusd's own cost of assembling,
//! renaming and paging the list.
//!
//!   cargo run --release -p nexus-integration --bin bench-tools-list [-- --lists N --vms 1,10,50]
//!
//! At 20 VMs, one guest-mcp is then restarted and stopped (SIGSTOP): the
//! list is timed again with one guest that never answers.
//!
//! Last line: `tools_list p50_us per_vm_1=.. shared_1=.. per_vm_10=.. ... wedged_20=..`.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nexus_integration::ensure_minimal_image;
use nexus_integration::nexusd::{
    StateDir, admin_token, build_release, http, percentiles_us, serve_with, stop,
};
use rmcp::model::CallToolRequestParams;
use rmcp::service::RunningService;
use rmcp::{ClientCacheConfig, RoleClient, ServiceExt};
use serde_json::json;

type Client = RunningService<RoleClient, ()>;

struct Args {
    lists: usize,
    vms: Vec<usize>,
    /// At this many VMs, wedge one and measure again.
    wedge_at: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        lists: 40,
        vms: vec![1, 10, 20, 50],
        wedge_at: 20,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--lists" => args.lists = value()?.parse()?,
            "--wedge-at" => args.wedge_at = value()?.parse()?,
            "--vms" => {
                args.vms = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?;
            }
            other => bail!("unknown argument {other:?}: use --lists N, --vms A,B,C, --wedge-at N"),
        }
    }
    if args.lists < 5 || args.vms.is_empty() || args.vms.windows(2).any(|w| w[0] >= w[1]) {
        bail!("--lists must be at least 5 and --vms counts rising");
    }
    Ok(args)
}

async fn spawn(client: &Client, name: &str) -> anyhow::Result<()> {
    let result = client
        .call_tool(
            CallToolRequestParams::new("spawn_vm").with_arguments(
                json!({"name": name, "memory_mib": 96})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            ),
        )
        .await?;
    if result.is_error == Some(true) {
        bail!("spawn_vm {name}: {:?}", result.content);
    }
    Ok(())
}

/// Restarts the first VM's guest-mcp and stops the new one (SIGSTOP), so
/// that its session must be opened again and never can be; then times
/// tools/list (one call of every few pays the wait for it; the rest skip
/// it while its failure is remembered).
async fn wedged(client: &Client, lists: usize) -> anyhow::Result<(f64, f64)> {
    let result = client
        .call_tool(
            CallToolRequestParams::new("b01__process_start").with_arguments(
                json!({"command": "echo $$ > /sys/fs/cgroup/cgroup.procs; kill -9 $(pidof guest-mcp); sleep 1.5; kill -STOP $(pidof guest-mcp)"})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            ),
        )
        .await?;
    if result.is_error == Some(true) {
        bail!("wedging b01: {:?}", result.content);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut samples = Vec::new();
    for _ in 0..lists {
        let started = Instant::now();
        client.list_all_tools().await?;
        samples.push(started.elapsed());
    }
    // A healthy b01 again for what follows.
    let destroyed = client
        .call_tool(
            CallToolRequestParams::new("destroy_vm").with_arguments(
                json!({"vm": "b01"})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            ),
        )
        .await?;
    if destroyed.is_error == Some(true) {
        bail!("destroying b01: {:?}", destroyed.content);
    }
    spawn(client, "b01").await?;
    Ok(percentiles_us(samples))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let (image, _) = ensure_minimal_image()?;
    let nexusd = build_release()?;
    let state = StateDir::new(&image)?;
    // Room for the VMs this bench boots, whatever the host's defaults.
    let (served, url) = serve_with(
        &nexusd,
        &state,
        "[limits]\nmax_vms = 1000\nmax_vcpus = 1000\nmax_memory_mib = 1000000\n",
    )
    .await?;
    let token = admin_token(state.path())?;
    let per_vm = ().serve(http(url.clone(), token.clone())).await?;
    let shared = ().serve(http(format!("{url}?surface=shared"), token)).await?;

    // rmcp's client would answer from its cache for the list's TTL.
    for client in [&per_vm, &shared] {
        client
            .set_response_cache_config(ClientCacheConfig::disabled())
            .await;
    }
    let mut running = 0;
    let mut summary = Vec::new();
    for &target in &args.vms {
        let booting = Instant::now();
        while running < target {
            running += 1;
            spawn(&per_vm, &format!("b{running:02}")).await?;
        }
        eprintln!(
            "{running} VMs running (booted the new ones in {:.1} s)",
            booting.elapsed().as_secs_f64()
        );
        // Warm: opens every guest session once.
        let (n_per_vm, n_shared) = (
            per_vm.list_all_tools().await?.len(),
            shared.list_all_tools().await?.len(),
        );
        let (mut a, mut b) = (Vec::<Duration>::new(), Vec::<Duration>::new());
        for i in 0..args.lists {
            for which in [i % 2, 1 - i % 2] {
                let started = Instant::now();
                if which == 0 {
                    per_vm.list_all_tools().await?;
                    a.push(started.elapsed());
                } else {
                    shared.list_all_tools().await?;
                    b.push(started.elapsed());
                }
            }
        }
        let ((a50, a99), (b50, b99)) = (percentiles_us(a), percentiles_us(b));
        println!(
            "{running:>2} VMs: per-vm {n_per_vm:>4} tools p50 {a50:>7.0} us p99 {a99:>7.0} us | shared {n_shared:>3} tools p50 {b50:>6.0} us p99 {b99:>6.0} us"
        );
        summary.push(format!(
            "per_vm_{running}={a50:.0} shared_{running}={b50:.0}"
        ));
        if running == args.wedge_at {
            let (w50, w99) = wedged(&per_vm, args.lists).await?;
            println!(
                "{running:>2} VMs, one wedged (guest-mcp restarted, then stopped): per-vm p50 {w50:>7.0} us p99 {w99:>7.0} us"
            );
            summary.push(format!("wedged_{running}={w50:.0}"));
        }
    }
    per_vm.cancel().await?;
    shared.cancel().await?;
    stop(served).await;
    println!("tools_list p50_us {}", summary.join(" "));
    Ok(())
}
