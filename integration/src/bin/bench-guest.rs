//! guest-mcp benchmark: `exec` round trip and file read throughput,
//! natively over a Unix socket and inside a TCG VM over vsock, in one run.
//!
//!   cargo run --release -p nexus-integration --bin bench-guest [-- --execs N --read-mib M]
//!
//! Both sides run the same static guest-mcp binary the image holds. Read
//! throughput is end to end: `read_file` in base64 chunks of the guest's
//! chunk size, decoded by the client.
//! Last line: `guest native_exec_p50_us=.. vm_exec_p50_us=.. native_read_mib_s=.. vm_read_mib_s=..`.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use nexus_integration::{Harness, call, exec, guest_client};
use rmcp::service::RunningService;
use rmcp::{RoleClient, ServiceExt};
use serde_json::json;

struct Args {
    execs: usize,
    read_mib: u64,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        execs: 300,
        read_mib: 256,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--execs" => args.execs = value()?.parse().context("--execs takes a number")?,
            "--read-mib" => {
                args.read_mib = value()?.parse().context("--read-mib takes a number")?
            }
            other => bail!("unknown argument {other:?}: use --execs N, --read-mib M"),
        }
    }
    if args.execs < 10 || args.read_mib == 0 {
        bail!("--execs must be at least 10 and --read-mib at least 1");
    }
    Ok(args)
}

struct Figures {
    exec_p50_us: f64,
    exec_p99_us: f64,
    read_mib_s: f64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let guest_bin = nexus_rootfs::guest_bin::locate_or_build(None)?;

    // Native: the binary on a Unix socket, its workspace in a temp dir.
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("guest.sock");
    let workdir = dir.path().join("workspace");
    std::fs::create_dir_all(&workdir)?;
    let mut server = tokio::process::Command::new(&guest_bin)
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .arg("--workdir")
        .arg(&workdir)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()?;
    while !socket.exists() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let native = ().serve(tokio::net::UnixStream::connect(&socket).await?).await?;
    let native_figures = measure("native", &native, &args).await?;
    native.cancel().await?;
    server.kill().await?;

    // In a VM, over vsock.
    let harness = Harness::new()?;
    let vm = harness.boot("bench-guest").await?;
    let client = guest_client(&vm).await?;
    let vm_figures = measure("vm (TCG)", &client, &args).await?;
    client.cancel().await?;
    vm.stop().await;

    println!(
        "exec p99: native {:.0} us, vm {:.0} us; vm/native exec p50 x{:.1}, read x{:.2}",
        native_figures.exec_p99_us,
        vm_figures.exec_p99_us,
        vm_figures.exec_p50_us / native_figures.exec_p50_us,
        vm_figures.read_mib_s / native_figures.read_mib_s
    );
    println!(
        "guest native_exec_p50_us={:.0} vm_exec_p50_us={:.0} native_read_mib_s={:.0} vm_read_mib_s={:.0}",
        native_figures.exec_p50_us,
        vm_figures.exec_p50_us,
        native_figures.read_mib_s,
        vm_figures.read_mib_s
    );
    Ok(())
}

async fn measure(
    label: &str,
    client: &RunningService<RoleClient, ()>,
    args: &Args,
) -> anyhow::Result<Figures> {
    // Warm up, then time `exec true` round trips.
    for _ in 0..10 {
        exec(client, "true").await?;
    }
    let mut samples = Vec::with_capacity(args.execs);
    for _ in 0..args.execs {
        let started = Instant::now();
        let r = call(client, "exec", json!({"argv": ["true"]})).await?;
        samples.push(started.elapsed());
        if r["exit_code"] != 0 {
            bail!("{label}: `true` failed: {r}");
        }
    }
    samples.sort();
    let pct = |p: f64| {
        samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)].as_secs_f64() * 1e6
    };
    let (p50, p99) = (pct(0.50), pct(0.99));

    let size = args.read_mib << 20;
    let made = exec(
        client,
        &format!("head -c {size} /dev/zero > bench.bin && echo ok"),
    )
    .await?;
    if made["stdout"] != "ok\n" {
        bail!("{label}: could not create the test file: {made}");
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let started = Instant::now();
    let mut offset = 0u64;
    let mut received = 0u64;
    loop {
        let r = call(
            client,
            "read_file",
            json!({"path": "bench.bin", "encoding": "base64", "offset": offset}),
        )
        .await?;
        let bytes = b64.decode(r["content"].as_str().unwrap_or_default())?;
        received += bytes.len() as u64;
        offset = r["next_offset"].as_u64().unwrap_or(offset);
        if r["eof"] == true {
            break;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    if received != size {
        bail!("{label}: read {received} bytes of {size}");
    }
    exec(client, "rm -f bench.bin").await?;
    let read_mib_s = args.read_mib as f64 / secs;
    println!(
        "{label}: exec `true` p50 {p50:.0} us, p99 {p99:.0} us ({} calls); read {} MiB in {secs:.2} s = {read_mib_s:.0} MiB/s",
        args.execs, args.read_mib
    );
    Ok(Figures {
        exec_p50_us: p50,
        exec_p99_us: p99,
        read_mib_s,
    })
}
