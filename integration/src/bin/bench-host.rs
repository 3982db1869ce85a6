//! nexusd benchmark (needs root for its loop-mounted pool):
//! - `list_vms` round trip p50/p99 over streamable HTTP and over stdio;
//! - a proxied `<vm>__exec true` through nexusd next to the same call made
//!   directly to the guest over vsock, alternating, in one run;
//! - 50 concurrent HTTP MCP sessions of mixed calls for 30 s, with an
//!   error count.
//!
//!   cargo run --release -p nexus-integration --bin bench-host [-- --calls N --seconds S --sessions K]
//!
//! Last line: `host list_p50_us=.. proxy_overhead_p50_us=.. sessions=50 errors=..`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nexus_integration::ensure_minimal_image;
use nexus_integration::nexusd::{
    StateDir, admin_token, build_release, call, http as nexus_http, percentiles_us, serve,
    serve_with, stop,
};
use rmcp::model::CallToolRequestParams;
use rmcp::service::RunningService;
use rmcp::transport::TokioChildProcess;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Value, json};

type Client = RunningService<RoleClient, ()>;

struct Args {
    calls: usize,
    seconds: u64,
    sessions: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        calls: 300,
        seconds: 30,
        sessions: 50,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--calls" => args.calls = value()?.parse()?,
            "--seconds" => args.seconds = value()?.parse()?,
            "--sessions" => args.sessions = value()?.parse()?,
            other => bail!("unknown argument {other:?}: use --calls N, --seconds S, --sessions K"),
        }
    }
    if args.calls < 10 || args.seconds == 0 || args.sessions == 0 {
        bail!("--calls must be at least 10, --seconds and --sessions at least 1");
    }
    Ok(args)
}

async fn time_calls(
    client: &Client,
    tool: &str,
    args: &Value,
    n: usize,
) -> anyhow::Result<(f64, f64)> {
    for _ in 0..10 {
        call(client, tool, args.clone()).await?;
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        call(client, tool, args.clone()).await?;
        samples.push(started.elapsed());
    }
    Ok(percentiles_us(samples))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let (image, _) = ensure_minimal_image()?;
    let nexusd = build_release()?;

    // stdio: list latency, and the proxy overhead with a VM.
    let stdio_state = StateDir::new(&image)?;
    let mut cmd = tokio::process::Command::new(&nexusd);
    cmd.arg("--state-dir")
        .arg(stdio_state.path())
        .arg("stdio")
        .env("RUST_LOG", "warn");
    let stdio = ().serve(TokioChildProcess::new(cmd)?).await?;
    let (stdio_p50, stdio_p99) = time_calls(&stdio, "list_vms", &json!({}), args.calls).await?;
    println!("list_vms over stdio: p50 {stdio_p50:.0} us, p99 {stdio_p99:.0} us");

    let vm = call(&stdio, "spawn_vm", json!({"name": "bench"})).await?;
    let cid = vm["cid"].as_u64().context("no cid")?;
    // The VM's vsock directory (nexus-vmm's default root).
    let uds = nexus_vmm::VmmConfig::default()
        .vsock_root
        .join(format!("{cid}/vsock.sock"));
    let stream =
        nexus_vmm::vsock::connect(&uds, nexus_vmm::GUEST_TOOLS_PORT, Duration::from_secs(5))
            .await?;
    let direct = ().serve(stream).await?;
    let exec = json!({"argv": ["true"]});
    for _ in 0..10 {
        call(&stdio, "bench__exec", exec.clone()).await?;
        call(&direct, "exec", exec.clone()).await?;
    }
    let (mut proxied, mut straight) = (Vec::new(), Vec::new());
    for i in 0..args.calls {
        for which in [i % 2, 1 - i % 2] {
            let started = Instant::now();
            if which == 0 {
                call(&stdio, "bench__exec", exec.clone()).await?;
                proxied.push(started.elapsed());
            } else {
                call(&direct, "exec", exec.clone()).await?;
                straight.push(started.elapsed());
            }
        }
    }
    let (proxy_p50, proxy_p99) = percentiles_us(proxied);
    let (direct_p50, direct_p99) = percentiles_us(straight);
    let overhead = proxy_p50 - direct_p50;
    println!(
        "exec true: through nexusd p50 {proxy_p50:.0} us (p99 {proxy_p99:.0}), direct over vsock p50 {direct_p50:.0} us (p99 {direct_p99:.0}); overhead p50 {overhead:.0} us"
    );
    direct.cancel().await?;
    call(&stdio, "destroy_vm", json!({"vm": "bench"})).await?;
    stdio.cancel().await?;

    // HTTP: list latency, then many sessions at once.
    let http_state = StateDir::new(&image)?;
    let (serve, url) = serve(&nexusd, &http_state).await?;
    let token = admin_token(http_state.path())?;
    let http = ().serve(nexus_http(url.clone(), token.clone())).await?;
    let (http_p50, http_p99) = time_calls(&http, "list_vms", &json!({}), args.calls).await?;
    println!("list_vms over HTTP: p50 {http_p50:.0} us, p99 {http_p99:.0} us");
    http.cancel().await?;

    let errors = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    for i in 0..args.sessions {
        let (url, token, errors, calls) =
            (url.clone(), token.clone(), errors.clone(), calls.clone());
        tasks.push(tokio::spawn(async move {
            let client = match ().serve(nexus_http(url, token)).await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("session {i}: {e}");
                    errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            let mix = [
                ("list_vms", json!({})),
                ("list_images", json!({})),
                ("list_snapshots", json!({})),
                ("get_vm", json!({"vm": "ghost"})),
            ];
            let mut n = 0usize;
            while Instant::now() < deadline {
                let (tool, args) = &mix[n % mix.len()];
                let outcome = client.call_tool(
                    CallToolRequestParams::new(tool.to_owned())
                        .with_arguments(args.as_object().cloned().unwrap_or_default()),
                );
                match outcome.await {
                    // get_vm of a missing VM is meant to be a tool error.
                    Ok(r) if (r.is_error == Some(true)) == (*tool == "get_vm") => {}
                    Ok(r) => {
                        eprintln!("session {i}: {tool} unexpected: {:?}", r.content);
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("session {i}: {tool}: {e}");
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                calls.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
            let _ = client.cancel().await;
        }));
    }
    for task in tasks {
        task.await?;
    }
    let (total, errors) = (
        calls.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
    );
    println!(
        "{} sessions for {} s: {total} calls ({:.0}/s), {errors} errors",
        args.sessions,
        args.seconds,
        total as f64 / args.seconds as f64
    );

    // What checking a token costs: the same call on a nexusd without
    // authentication, alternating, in one run.
    let open_state = StateDir::new(&image)?;
    let (open_serve, open_url) = serve_with(&nexusd, &open_state, "http_auth = false\n").await?;
    let open = ().serve(nexus_http(open_url, "")).await?;
    let authed = ().serve(nexus_http(url.clone(), token.clone())).await?;
    let (mut with_token, mut without) = (Vec::new(), Vec::new());
    for i in 0..args.calls {
        for which in [i % 2, 1 - i % 2] {
            let started = Instant::now();
            if which == 0 {
                call(&authed, "list_vms", json!({})).await?;
                with_token.push(started.elapsed());
            } else {
                call(&open, "list_vms", json!({})).await?;
                without.push(started.elapsed());
            }
        }
    }
    let (token_p50, _) = percentiles_us(with_token);
    let (open_p50, _) = percentiles_us(without);
    println!(
        "list_vms over HTTP with a token p50 {token_p50:.0} us, without authentication {open_p50:.0} us: the check costs {:.0} us",
        token_p50 - open_p50
    );
    open.cancel().await?;
    stop(open_serve).await;

    // The choke point: an admin (whose decision is short) beside a user
    // whose role has ten patterns and reaches the VM by a grant, calling
    // the same tools alternately; and the decision itself, from /metrics.
    let (policy_list, policy_exec, decision_us) =
        policy_cost(&authed, &url, &token, args.calls).await?;
    authed.cancel().await?;
    stop(serve).await;

    println!("(list_p50_us below is over HTTP; over stdio it was {stdio_p50:.0})");
    println!(
        "host list_p50_us={http_p50:.0} proxy_overhead_p50_us={overhead:.0} sessions={} errors={errors} policy_list_added_p50_us={policy_list:.0} policy_exec_added_p50_us={policy_exec:.0} decision_mean_us={decision_us:.1}",
        args.sessions
    );
    Ok(())
}

/// (list_vms and proxied exec p50 added for a restricted user over an
/// admin, the mean decision time in us.)
async fn policy_cost(
    admin: &Client,
    url: &str,
    admin_token: &str,
    calls: usize,
) -> anyhow::Result<(f64, f64, f64)> {
    let tools = [
        "list_*",
        "get_vm",
        "spawn_vm",
        "destroy_vm",
        "snapshot_*",
        "restore_snapshot",
        "vm_exec",
        "vm_read_file",
        "vm_write_file",
        "!vm_process_*",
    ];
    call(
        admin,
        "set_role",
        json!({"name": "bench", "tools": tools, "vms": "own"}),
    )
    .await?;
    let made = call(
        admin,
        "create_token",
        json!({"name": "bench-user", "role": "bench"}),
    )
    .await?;
    let user_token = made["token"].as_str().context("no token")?.to_owned();
    let user = ().serve(nexus_http(url.to_owned(), user_token)).await?;
    call(admin, "spawn_vm", json!({"name": "policy"})).await?;
    call(
        admin,
        "grant_vm",
        json!({"vm": "policy", "identity": "token:bench-user"}),
    )
    .await?;
    let before = decisions(url, admin_token).await?;
    let mut added = Vec::new();
    for (tool, args) in [
        ("list_vms", json!({})),
        ("policy__exec", json!({"argv": ["true"]})),
    ] {
        let (mut as_admin, mut as_user) = (Vec::new(), Vec::new());
        for i in 0..calls {
            for which in [i % 2, 1 - i % 2] {
                let started = Instant::now();
                if which == 0 {
                    call(admin, tool, args.clone()).await?;
                    as_admin.push(started.elapsed());
                } else {
                    call(&user, tool, args.clone()).await?;
                    as_user.push(started.elapsed());
                }
            }
        }
        let (admin_p50, _) = percentiles_us(as_admin);
        let (user_p50, _) = percentiles_us(as_user);
        println!(
            "{tool} over HTTP: admin p50 {admin_p50:.0} us, user with a 10-pattern role and a grant p50 {user_p50:.0} us: {:.0} us more",
            user_p50 - admin_p50
        );
        added.push(user_p50 - admin_p50);
    }
    let after = decisions(url, admin_token).await?;
    let mean_us = (after.0 - before.0) / (after.1 - before.1).max(1.0) * 1e6;
    println!(
        "policy decision (read the call, decide): mean {mean_us:.1} us over {:.0} calls",
        after.1 - before.1
    );
    call(admin, "destroy_vm", json!({"vm": "policy"})).await?;
    user.cancel().await?;
    Ok((added[0], added[1], mean_us))
}

/// nexusd's policy decision histogram: (sum of seconds, count).
async fn decisions(url: &str, token: &str) -> anyhow::Result<(f64, f64)> {
    let metrics = url.trim_end_matches("/mcp").to_owned() + "/metrics";
    nexus_integration::nexusd::install_tls_provider();
    let text = reqwest::Client::new()
        .get(&metrics)
        .bearer_auth(token)
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let value = |name: &str| -> anyhow::Result<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .with_context(|| format!("{name} missing from /metrics"))
    };
    Ok((
        value("nexus_policy_decision_duration_seconds_sum")?,
        value("nexus_policy_decision_duration_seconds_count")?,
    ))
}
