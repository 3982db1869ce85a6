//! nexusd: the Nexus daemon.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use std::time::Duration;

use nexus_host::bridge::Bridges;
use nexus_host::config::{Config, FileConfig, FlagConfig};
use nexus_host::daemon::Daemon;
use nexus_host::state_lock::{LockError, StateLock};
use nexus_host::tools::Surface;

/// nexusd gives every AI agent its own microVM and is itself an MCP server.
///
/// Configuration comes in layers: built-in defaults, then the TOML file
/// given by --config (keys: state_dir, listen, allow_non_loopback,
/// http_auth (default true: a bearer token on TCP), admin_uids,
/// admin_socket, surface, tools_page_size, and a [limits] table: max_vms,
/// max_memory_mib, max_vcpus, max_snapshots_per_vm; a [quota] table for each
/// user: max_running_vms, max_vcpus, max_memory_mib, max_workspace_gib,
/// max_snapshots; [[warm_pool]] tables, VMs booted ahead of need that
/// spawn_vm and fork_vm take: image, size (0: off), vcpus, memory_mib,
/// workspace_gib), then environment variables and flags, which win.
///
/// State (the btrfs pool, the catalog, VM logs) lives in the state
/// directory; images built into <state-dir>/images/<name> are imported at
/// start. One nexusd owns a state directory: a second `serve` is refused
/// with the first one's pid, while `stdio` attaches to the running daemon
/// through its admin socket (and starts one when none runs).
/// VMs a killed nexusd left running are adopted at start.
///
/// Running VMs' tools are listed per VM (VM__TOOL, the default) or, on the
/// shared surface, once each as vm_TOOL with a `vm` argument: choose with
/// --surface, the config file's `surface`, or per HTTP request with
/// `?surface=shared` or the `Nexus-Surface` header.
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    /// A TOML configuration file.
    #[arg(long, global = true, env = "NEXUS_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where images, drives, snapshots and the catalog live [default: /var/lib/nexus].
    #[arg(long, global = true, env = "NEXUS_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// How running VMs' tools are listed: per-vm (VM__TOOL) or shared
    /// (vm_TOOL with a `vm` argument) [default: per-vm].
    #[arg(long, global = true, env = "NEXUS_SURFACE", value_name = "SURFACE")]
    surface: Option<Surface>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve MCP over streamable HTTP at http://ADDR/mcp (with /healthz and
    /// /metrics), and the same on the admin Unix socket.
    Serve {
        /// Address to listen on; loopback only unless the config file sets
        /// allow_non_loopback [default: 127.0.0.1:7777].
        #[arg(long, env = "NEXUS_LISTEN", value_name = "ADDR")]
        listen: Option<SocketAddr>,
        /// The admin Unix socket, owner-only [default: <state-dir>/nexusd.sock].
        #[arg(long, env = "NEXUS_ADMIN_SOCKET", value_name = "PATH")]
        admin_socket: Option<PathBuf>,
    },
    /// Serve MCP over standard input and output: attach to the nexusd that
    /// owns the state directory through its admin socket, starting one (in
    /// the background, logging to <state-dir>/logs/nexusd.log, gone once
    /// its last client leaves) if none runs.
    Stdio,
    /// The daemon `stdio` starts: the admin socket only, until the last
    /// front end leaves.
    #[command(hide = true)]
    Daemon {
        #[arg(long, env = "NEXUS_ADMIN_SOCKET", value_name = "PATH")]
        admin_socket: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Everything nexusd creates (state, sockets, logs, drives) is its own:
    // a local user who could open a VM's vsock socket could run commands
    // in it as root, bypassing nexusd.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let cli = Cli::parse();
    // TLS clients (registry pulls) use the same crypto as nexusd's server.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rmcp=warn".into())
                // rmcp logs whole requests at debug (set_secret's value
                // among them): never, whatever RUST_LOG says.
                .add_directive(
                    "rmcp::service=info"
                        .parse()
                        .expect("a constant directive parses"),
                ),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let file = match &cli.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let (listen, admin_socket) = match &cli.command {
        Cmd::Serve {
            listen,
            admin_socket,
        } => (*listen, admin_socket.clone()),
        Cmd::Daemon { admin_socket } => (None, admin_socket.clone()),
        Cmd::Stdio => (None, None),
    };
    // What the flag or the file chose, handed on to a daemon a bridge reaches.
    let surface = cli.surface.or(file.surface);
    let config = Config::merge(
        file,
        FlagConfig {
            state_dir: cli.state_dir,
            listen,
            admin_socket,
            surface: cli.surface,
        },
    )?;
    match cli.command {
        Cmd::Serve { .. } => serve(config).await,
        Cmd::Daemon { .. } => daemon(config).await,
        Cmd::Stdio => {
            let attached = nexus_host::stdio::run(nexus_host::stdio::Launch {
                config: &config,
                config_file: cli.config.as_deref(),
                surface,
            })
            .await;
            // stdin's reader thread would hold the runtime open.
            std::process::exit(match attached {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("nexusd stdio: {e}");
                    1
                }
            });
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let (listen, admin) = (config.listen, config.admin_socket.clone());
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let daemon = Daemon::open(config).await?;
    let pool = daemon.storage().pool().root().display().to_string();
    nexus_host::http::serve(
        daemon.clone(),
        Some(listen),
        &admin,
        Bridges::default(),
        shutdown_signal(),
        |addr| {
            if let Some(addr) = addr {
                tracing::info!(pool = %pool, admin = %admin.display(), "nexusd listening on {scheme}://{addr}/mcp (health: {scheme}://{addr}/healthz)");
            }
        },
    )
    .await
    .context("serving HTTP")?;
    daemon.shutdown().await;
    Ok(())
}

/// `nexusd daemon`: the daemon a `nexusd stdio` starts when none runs. It
/// serves the admin socket only, and ends once its last front end leaves
/// (or when none came within a minute).
async fn daemon(config: Config) -> anyhow::Result<()> {
    let admin = config.admin_socket.clone();
    let lock = acquire_patiently(&config).await?;
    let daemon = Daemon::open_locked(config, lock).await?;
    let bridges = Bridges::default();
    let idle = {
        let bridges = bridges.clone();
        async move {
            if bridges.wait_first(Duration::from_secs(60)).await {
                bridges.close_when_idle().await;
                tracing::info!("the last front end left");
            } else {
                tracing::warn!("no front end attached within a minute");
            }
        }
    };
    let shutdown = async move {
        tokio::select! {
            () = idle => {}
            () = shutdown_signal() => tracing::info!("signalled"),
        }
    };
    tracing::info!(admin = %admin.display(), pid = std::process::id(), "nexusd serving stdio front ends");
    nexus_host::http::serve(daemon.clone(), None, &admin, bridges, shutdown, |_| {})
        .await
        .context("serving the admin socket")?;
    daemon.shutdown().await;
    Ok(())
}

/// The state directory's lock; a front end probing it may hold it for a
/// moment, so a started daemon tries for a little while.
async fn acquire_patiently(config: &Config) -> anyhow::Result<StateLock> {
    let started = std::time::Instant::now();
    loop {
        match StateLock::acquire(&config.state_dir, &config.admin_socket) {
            Err(LockError::Held { .. }) if started.elapsed() < Duration::from_secs(2) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return Ok(other?),
        }
    }
}

/// SIGINT or SIGTERM (how service managers and harnesses stop a process).
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
