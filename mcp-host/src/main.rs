//! nexusd: the Nexus daemon.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use nexus_host::bridge::{self, Bridges};
use nexus_host::config::{Config, FileConfig, FlagConfig};
use nexus_host::daemon::Daemon;
use nexus_host::state_lock::{LockError, StateLock};
use nexus_host::tools::{NexusTools, Surface};
use rmcp::ServiceExt;

/// nexusd gives every AI agent its own microVM and is itself an MCP server.
///
/// Configuration comes in layers: built-in defaults, then the TOML file
/// given by --config (keys: state_dir, listen, allow_non_loopback,
/// admin_socket), then environment variables and flags, which win.
///
/// State (the btrfs pool, the catalog, VM logs) lives in the state
/// directory; images built into <state-dir>/images/<name> are imported at
/// start. One nexusd owns a state directory: a second `serve` is refused
/// with the first one's pid, while `stdio` attaches to the running daemon
/// through its admin socket (and runs the daemon itself when none runs).
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
    /// Serve MCP over standard input and output (logs go to stderr); if a
    /// nexusd already owns the state directory, attach to it through its
    /// admin socket instead.
    Stdio,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rmcp=warn".into()),
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
        Cmd::Stdio => (None, None),
    };
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
        Cmd::Stdio => stdio(config, cli.surface).await,
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let (listen, admin) = (config.listen, config.admin_socket.clone());
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
                tracing::info!(pool = %pool, admin = %admin.display(), "nexusd listening on http://{addr}/mcp (health: http://{addr}/healthz)");
            }
        },
    )
    .await
    .context("serving HTTP")?;
    daemon.shutdown().await;
    Ok(())
}

/// How long `nexusd stdio` keeps trying to reach a daemon that holds the
/// state directory but is not answering on its admin socket yet (it may
/// be starting: opening storage, adopting VMs).
const ATTACH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// `nexusd stdio`: the daemon itself when none owns the state directory,
/// else a bridge to the one that does.
async fn stdio(config: Config, surface: Option<Surface>) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mut last_error = None;
    while started.elapsed() < ATTACH_TIMEOUT {
        let admin_socket = match StateLock::acquire(&config.state_dir, &config.admin_socket) {
            Ok(lock) => return own_stdio(config, lock).await,
            Err(LockError::Held {
                admin_socket: Some(admin_socket),
                ..
            }) => admin_socket,
            Err(LockError::Held {
                admin_socket: None, ..
            }) => config.admin_socket.clone(),
            Err(e) => return Err(e.into()),
        };
        match bridge::connect(&admin_socket, surface).await {
            Ok(upgraded) => {
                tracing::debug!(admin = %admin_socket.display(), "attached to the running nexusd");
                let piped = bridge::pipe(upgraded).await;
                // stdin's reader thread would hold the runtime open.
                std::process::exit(match piped {
                    Ok(()) => 0,
                    Err(e) => {
                        tracing::error!("{e}");
                        1
                    }
                });
            }
            Err(e @ bridge::BridgeError::Refused(_)) => return Err(e.into()),
            Err(bridge::BridgeError::Connect { path, source })
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                anyhow::bail!(
                    "another nexusd owns state directory {} and its admin socket {path} is owner-only: launch `nexusd stdio` as that user, or connect over HTTP",
                    config.state_dir.display()
                );
            }
            Err(e) => last_error = Some(e),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Err(anyhow::anyhow!(
        "another nexusd owns state directory {} but its admin socket did not answer within {ATTACH_TIMEOUT:?}: {}",
        config.state_dir.display(),
        last_error.map(|e| e.to_string()).unwrap_or_default()
    ))
}

/// The daemon, serving this process's stdio and its admin socket (for
/// other front ends); it ends once its own client and every attached one
/// have gone.
async fn own_stdio(config: Config, lock: StateLock) -> anyhow::Result<()> {
    let admin = config.admin_socket.clone();
    let options = config.tool_options();
    let daemon = Daemon::open_locked(config, lock).await?;
    let bridges = Bridges::default();
    let stop_admin = tokio_util::sync::CancellationToken::new();
    let admin_server = {
        let (daemon, bridges, stop) = (daemon.clone(), bridges.clone(), stop_admin.clone());
        tokio::spawn(async move {
            nexus_host::http::serve(
                daemon,
                None,
                &admin,
                bridges,
                async move { stop.cancelled().await },
                |_| {},
            )
            .await
        })
    };
    let running = NexusTools::with_options(daemon.clone(), options)
        .serve(rmcp::transport::stdio())
        .await
        .context("starting MCP on stdio")?;
    let served = async {
        let served = running.waiting().await.context("serving MCP on stdio");
        if bridges.open() > 0 {
            tracing::info!(
                open = bridges.open(),
                "this client left; serving the attached front ends until they leave"
            );
        }
        bridges.close_when_idle().await;
        served
    };
    let served = tokio::select! {
        served = served => served.map(|_| ()),
        () = shutdown_signal() => {
            tracing::info!("signalled: stopping VMs and leaving");
            Ok(())
        }
    };
    stop_admin.cancel();
    match admin_server.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "the admin socket failed"),
        Err(e) => tracing::warn!(error = %e, "the admin socket task failed"),
        Ok(Ok(())) => {}
    }
    daemon.shutdown().await;
    served
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
