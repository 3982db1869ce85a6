//! nexusd: the Nexus daemon.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use nexus_host::config::{Config, FileConfig, FlagConfig};
use nexus_host::daemon::Daemon;
use nexus_host::tools::NexusTools;
use rmcp::ServiceExt;

/// nexusd gives every AI agent its own microVM and is itself an MCP server.
///
/// Configuration comes in layers: built-in defaults, then the TOML file
/// given by --config (keys: state_dir, listen, allow_non_loopback,
/// admin_socket), then environment variables and flags, which win.
///
/// State (the btrfs pool, the catalog, VM logs) lives in the state
/// directory; images built into <state-dir>/images/<name> are imported at
/// start. One nexusd owns a state directory: a second one (serve or stdio)
/// is refused with the first one's pid; connect to the running one
/// instead. VMs a killed nexusd left running are adopted at start.
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    /// A TOML configuration file.
    #[arg(long, global = true, env = "NEXUS_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where images, drives, snapshots and the catalog live [default: /var/lib/nexus].
    #[arg(long, global = true, env = "NEXUS_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
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
    /// Serve MCP over standard input and output (logs go to stderr).
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
        },
    )?;
    match cli.command {
        Cmd::Serve { .. } => {
            let (listen, admin) = (config.listen, config.admin_socket.clone());
            let daemon = Daemon::open(config).await?;
            let pool = daemon.storage().pool().root().display().to_string();
            nexus_host::http::serve(
                daemon.clone(),
                listen,
                &admin,
                async {
                    let _ = tokio::signal::ctrl_c().await;
                },
                |addr| {
                    tracing::info!(pool = %pool, admin = %admin.display(), "nexusd listening on http://{addr}/mcp (health: http://{addr}/healthz)");
                },
            )
            .await
            .context("serving HTTP")?;
            daemon.shutdown().await;
            Ok(())
        }
        Cmd::Stdio => {
            let daemon = Daemon::open(config).await?;
            let running = NexusTools::new(daemon.clone())
                .serve(rmcp::transport::stdio())
                .await
                .context("starting MCP on stdio")?;
            running.waiting().await.context("serving MCP on stdio")?;
            daemon.shutdown().await;
            Ok(())
        }
    }
}
