//! nexusd: the Nexus daemon.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use nexus_host::config::{Config, DEFAULT_LISTEN, DEFAULT_STATE_DIR};
use nexus_host::daemon::Daemon;
use nexus_host::tools::NexusTools;
use rmcp::ServiceExt;

/// nexusd gives every AI agent its own microVM and is itself an MCP server.
///
/// State (the btrfs pool, the catalog, VM logs) lives in --state-dir; images
/// built into <state-dir>/images/<name> are imported at start. One nexusd
/// owns a state directory: a second one is refused.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Where images, drives, snapshots and the catalog live.
    #[arg(long, global = true, env = "NEXUS_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve MCP over streamable HTTP at http://ADDR/mcp (and /healthz).
    Serve {
        /// Loopback address to listen on.
        #[arg(long, env = "NEXUS_LISTEN", default_value = DEFAULT_LISTEN)]
        listen: SocketAddr,
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
    match cli.command {
        Cmd::Serve { listen } => {
            let config = Config::new(cli.state_dir, listen)?;
            let daemon = Daemon::open(config).await?;
            let state = daemon.storage().pool().root().display().to_string();
            nexus_host::http::serve(
                daemon.clone(),
                listen,
                async {
                    let _ = tokio::signal::ctrl_c().await;
                },
                |addr| {
                    tracing::info!(pool = %state, "nexusd listening on http://{addr}/mcp (health: http://{addr}/healthz)");
                },
            )
            .await
            .context("serving HTTP")?;
            daemon.shutdown().await;
            Ok(())
        }
        Cmd::Stdio => {
            let config = Config::new(cli.state_dir, DEFAULT_LISTEN.parse()?)?;
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
