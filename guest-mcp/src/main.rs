//! guest-mcp: serves the agent's tools and the host's control channel.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use nexus_guest::control::{ControlTools, PowerAction};
use nexus_guest::limits::Limits;
use nexus_guest::listen::{ListenAddr, Listener};
use nexus_guest::tools::{GuestTools, Shared};
use nexus_guest::{HOST_CID, ready};
use rmcp::ServiceExt;
use tokio_util::sync::CancellationToken;

/// The MCP server inside a Nexus VM. In a VM, init starts it with
/// `--vm --listen vsock:1024 --control vsock:1023 --ready-port 1027`; on a
/// host, `--listen unix:PATH` or `--stdio` serve the same tools for tests.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Where to serve the agent's tools: vsock:PORT or unix:PATH.
    #[arg(long, value_name = "ADDR")]
    listen: Option<ListenAddr>,
    /// Where to serve the host's control channel: vsock:PORT or unix:PATH.
    #[arg(long, value_name = "ADDR")]
    control: Option<ListenAddr>,
    /// Serve the agent's tools on standard input and output instead.
    #[arg(long, conflicts_with = "listen")]
    stdio: bool,
    /// Once listening, tell the host (vsock CID 2) on this port.
    #[arg(long, value_name = "PORT")]
    ready_port: Option<u32>,
    /// Listen here (loopback) for the guest's HTTP proxy clients and
    /// splice each connection to the host's egress proxy.
    #[arg(long, value_name = "ADDR", requires = "egress_port")]
    egress_listen: Option<std::net::SocketAddr>,
    /// The host's egress proxy port on vsock CID 2.
    #[arg(long, value_name = "PORT")]
    egress_port: Option<u32>,
    /// Running as a VM's guest: `shutdown` powers the machine off.
    #[arg(long)]
    vm: bool,
    /// Print the tools' definitions (JSON) and exit: image builds record
    /// them, and nexusd lists those rather than what a guest says.
    #[arg(long, exclusive = true)]
    print_tools: bool,
    /// Default working directory of commands and base of relative paths
    /// [default: /workspace when it exists].
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,
    /// Where background processes are recorded, so that a restarted
    /// guest-mcp kills and reports those it lost.
    #[arg(long, value_name = "FILE")]
    process_state: Option<PathBuf>,
    /// `exec` calls running at once.
    #[arg(long, default_value_t = Limits::default().max_concurrent_execs)]
    max_concurrent_execs: usize,
    /// Longest `timeout_s` an exec may ask for, in seconds.
    #[arg(long, default_value_t = Limits::default().max_exec_timeout_s)]
    max_exec_timeout_s: u64,
    /// Most output bytes an exec may keep per stream.
    #[arg(long, default_value_t = Limits::default().max_output_bytes)]
    max_output_bytes: usize,
    /// Background processes kept at once.
    #[arg(long, default_value_t = Limits::default().max_processes)]
    max_processes: usize,
    /// Output kept per background process and stream, in bytes.
    #[arg(long, default_value_t = Limits::default().process_buffer_bytes)]
    process_buffer_bytes: usize,
    /// Largest chunk one read_file returns or one write_file accepts.
    #[arg(long, default_value_t = Limits::default().max_io_bytes)]
    max_io_bytes: usize,
    /// Most processes (and threads) one exec or background process and
    /// everything it starts may have at once; 0 for no limit.
    #[arg(long, default_value_t = 4096)]
    tree_pids_max: u64,
    /// Most memory, in bytes, one exec or background process and
    /// everything it starts may use (its tree is killed past it); 0 for
    /// no limit beyond the VM's.
    #[arg(long, default_value_t = 0)]
    tree_memory_max: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rmcp=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    if args.print_tools {
        let tools = GuestTools::definitions();
        #[allow(clippy::print_stdout)] // the output is the point
        {
            println!("{}", serde_json::to_string(&tools)?);
        }
        return Ok(());
    }
    if args.listen.is_none() && !args.stdio {
        anyhow::bail!("nothing to serve: give --listen ADDR or --stdio");
    }
    let limits = Limits {
        max_concurrent_execs: args.max_concurrent_execs,
        max_exec_timeout_s: args.max_exec_timeout_s,
        max_output_bytes: args.max_output_bytes,
        default_output_bytes: Limits::default()
            .default_output_bytes
            .min(args.max_output_bytes),
        max_processes: args.max_processes,
        process_buffer_bytes: args.process_buffer_bytes,
        max_io_bytes: args.max_io_bytes,
        ..Limits::default()
    };
    let workdir = args
        .workdir
        .or_else(|| Some(PathBuf::from("/workspace")).filter(|w| w.is_dir()));
    let trees = nexus_guest::trees::Trees::new(
        nexus_guest::trees::TreeLimits {
            pids_max: (args.tree_pids_max > 0).then_some(args.tree_pids_max),
            memory_max: (args.tree_memory_max > 0).then_some(args.tree_memory_max),
        },
        args.vm,
    );
    let shared = Shared::new(
        limits,
        std::sync::Arc::new(trees),
        workdir,
        args.process_state,
    );
    let power = if args.vm {
        PowerAction::Poweroff
    } else {
        PowerAction::Refuse
    };
    if args.vm {
        nexus_guest::freeze::thaw_leftover(std::path::Path::new("/workspace"));
    }
    let shutdown = CancellationToken::new();
    if args.vm {
        nexus_guest::network::load();
    }

    // Bind everything before announcing readiness.
    let listener = args.listen.as_ref().map(Listener::bind).transpose()?;
    let control = args.control.as_ref().map(Listener::bind).transpose()?;
    if let Some(control) = control {
        tokio::spawn(control.serve(ControlTools::new(power), shutdown.clone()));
    }
    if let (Some(listen), Some(port)) = (args.egress_listen, args.egress_port) {
        let egress = nexus_guest::egress::bind(listen)
            .await
            .with_context(|| format!("binding the egress forwarder on {listen}"))?;
        tokio::spawn(nexus_guest::egress::forward(egress, HOST_CID, port));
    }
    if let Some(port) = args.ready_port {
        std::thread::Builder::new()
            .name("ready".into())
            .spawn(move || ready::hold_forever(HOST_CID, port))
            .context("starting the readiness thread")?;
    }

    if args.stdio {
        let running = GuestTools::new(shared)
            .serve(rmcp::transport::stdio())
            .await
            .context("starting the MCP session on stdio")?;
        running.waiting().await.context("serving on stdio")?;
        shutdown.cancel();
        return Ok(());
    }
    if let Some(listener) = listener {
        tracing::info!(addr = %args.listen.as_ref().map(ToString::to_string).unwrap_or_default(), "guest-mcp listening");
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            stop.cancel();
        });
        listener.serve(GuestTools::new(shared), shutdown).await;
    }
    Ok(())
}
