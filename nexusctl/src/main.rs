//! nexusctl: the admin's command line for nexusd.
//!
//! A typed MCP client of nexusd's management tools, over the admin Unix
//! socket by default (the caller's uid is its identity) or HTTP with a
//! token. Tables for people, `--json` for scripts; exit codes say what
//! went wrong (see `--help`).
//!
//! - `connect`: reaching nexusd (socket upgrade, or HTTP).
//! - `error`: failures and their exit codes.
//! - `table`: the human output; `ui`: colour and progress.
//! - `commands`: one function per command.

mod commands;
mod connect;
mod error;
mod table;
mod ui;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use crate::connect::Endpoint;
use crate::error::CtlError;

const EXIT_CODES: &str = "Exit codes: 0 done; 1 nexusd refused or failed the operation, or a local file or value does not read (the message says why); 2 bad usage; 3 nexusd not reachable; 4 permission denied; exec and shell: the command's own (128+N for signal N).";

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Admin CLI for the Nexus daemon",
    after_help = EXIT_CODES
)]
struct Cli {
    /// nexusd's admin socket (the default way in: your uid is your identity).
    #[arg(long, global = true, env = "NEXUS_SOCKET", default_value = nexus_types::admin::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// nexusd's HTTP endpoint instead (`http://HOST:PORT`, `/mcp` added).
    #[arg(long, global = true, env = "NEXUS_URL")]
    url: Option<String>,
    /// A file holding the API token for --url (else NEXUS_TOKEN holds it).
    #[arg(long, global = true, env = "NEXUS_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Print nexusd's answer as JSON (for scripts).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Check that nexusd answers on its HTTP health endpoint.
    #[command(after_help = "Example: nexusctl --url http://127.0.0.1:7777 health")]
    Health,
    /// How the host stands: version, backend and acceleration (and why),
    /// pool space, VMs by state, what they use, images. Admin only.
    #[command(after_help = "Example: nexusctl status")]
    Status,
    /// VMs: list, create, show, start, stop, remove.
    #[command(subcommand)]
    Vm(commands::vm::VmCmd),
    /// Secrets for VMs' egress (admin only); values are read from stdin or
    /// a file, never from the command line.
    #[command(subcommand)]
    Secret(commands::secret::SecretCmd),
    /// Run a command in a VM, its output streamed live; exits with its
    /// exit code.
    Exec(commands::exec::ExecArgs),
    /// An interactive terminal in a VM (like `docker exec -it`): a login
    /// shell, or the command given; exits with its exit code.
    Shell(commands::shell::ShellArgs),
    /// Copy a file between this host and a VM, either way (VM:PATH),
    /// with a progress bar and a checksum check.
    Cp(commands::cp::CpArgs),
    /// Snapshots of VMs' drives: create, list, restore in place, remove.
    #[command(subcommand)]
    Snapshot(commands::snapshot::SnapshotCmd),
    /// A new VM whose workspace starts as a snapshot.
    Fork(commands::snapshot::ForkArgs),
    /// A VM's serial console, its last lines.
    #[command(after_help = "Example: nexusctl console agent1 --lines 50 --follow")]
    Console(commands::ConsoleArgs),
    /// Images: list, build from a recipe, import, pull, remove.
    #[command(subcommand)]
    Image(commands::admin::ImageCmd),
    /// Roles and grants: who may call which tools on which VMs (admin only).
    #[command(subcommand)]
    Policy(commands::policy::PolicyCmd),
    /// API tokens for HTTP clients (admin only).
    #[command(subcommand)]
    Token(commands::admin::TokenCmd),
    /// The audit trail, newest first (admin only).
    Audit(commands::admin::AuditArgs),
    /// MCP client configuration to paste (Claude Code, Claude Desktop,
    /// Python), for `nexusd stdio` or HTTP.
    McpConfig(commands::config::ConfigArgs),
    /// Shell completions: `source <(nexusctl completions bash)`.
    #[command(after_help = "Example: nexusctl completions zsh > ~/.zfunc/_nexusctl")]
    Completions { shell: clap_complete::Shell },
}

fn token(cli: &Cli) -> Result<Option<String>, CtlError> {
    if let Some(path) = &cli.token_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CtlError::Local(format!("the token file {}: {e}", path.display())))?;
        return Ok(Some(text.trim().to_owned()));
    }
    Ok(std::env::var("NEXUS_TOKEN").ok().filter(|t| !t.is_empty()))
}

fn endpoint(cli: &Cli) -> Result<Endpoint, CtlError> {
    if cli.url.is_none() && cli.token_file.is_some() {
        return Err(CtlError::Local(
            "--token-file is for --url (HTTP); over the admin socket your uid is your identity"
                .into(),
        ));
    }
    Ok(match &cli.url {
        Some(url) => {
            let url = url.trim_end_matches('/');
            let url = if url.ends_with("/mcp") {
                url.to_owned()
            } else {
                format!("{url}/mcp")
            };
            // Guest tools by their per-VM names, whatever the daemon's
            // default surface.
            let url = format!("{url}?{}=per-vm", nexus_types::admin::SURFACE_QUERY);
            Endpoint::Http {
                url,
                token: token(cli)?,
            }
        }
        None => Endpoint::Socket(cli.socket.clone()),
    })
}

/// Runs the command; the exit code it ends with.
async fn run(mut cli: Cli) -> Result<u8, CtlError> {
    if let Cmd::Completions { shell } = cli.command {
        clap_complete::generate(
            shell,
            &mut Cli::command(),
            "nexusctl",
            &mut std::io::stdout(),
        );
        return Ok(0);
    }
    if let Cmd::McpConfig(args) = &cli.command {
        commands::say(&commands::config::render(args));
        return Ok(0);
    }
    if let Cmd::Health = cli.command {
        let url = cli.url.as_deref().unwrap_or("http://127.0.0.1:7777");
        let status = commands::health(url)?;
        commands::Out { json: cli.json }
            .print(&serde_json::json!({"url": url, "status": status}), || {
                format!("nexusd at {url}: {status}")
            });
        return Ok(0);
    }
    if let Cmd::Secret(cmd) = &mut cli.command {
        commands::secret::prepare(cmd)?;
    }
    let client = connect::connect(&endpoint(&cli)?).await?;
    let out = commands::Out { json: cli.json };
    let result = match cli.command {
        Cmd::Health | Cmd::McpConfig(_) | Cmd::Completions { .. } => Ok(0),
        Cmd::Cp(args) => commands::cp::run(&client, args, &out).await.map(|()| 0),
        Cmd::Status => commands::status::run(&client, &out).await.map(|()| 0),
        Cmd::Policy(cmd) => commands::policy::run(&client, cmd, &out).await.map(|()| 0),
        Cmd::Snapshot(cmd) => commands::snapshot::run(&client, cmd, &out)
            .await
            .map(|()| 0),
        Cmd::Fork(args) => commands::snapshot::fork(&client, args, &out)
            .await
            .map(|()| 0),
        Cmd::Image(cmd) => commands::admin::image(&client, cmd, &out).await.map(|()| 0),
        Cmd::Token(cmd) => commands::admin::token(&client, cmd, &out).await.map(|()| 0),
        Cmd::Audit(args) => commands::admin::audit(&client, args, &out)
            .await
            .map(|()| 0),
        Cmd::Console(args) => commands::console(&client, args, &out).await.map(|()| 0),
        Cmd::Vm(cmd) => commands::vm::run(&client, cmd, &out).await.map(|()| 0),
        Cmd::Secret(cmd) => commands::secret::run(&client, cmd, &out).await.map(|()| 0),
        Cmd::Exec(args) => commands::exec::run(&client, args).await,
        Cmd::Shell(args) => commands::shell::run(&client, args).await,
    };
    let _ = client.cancel().await;
    result
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if ui::no_color() {
        console::set_colors_enabled(false);
        console::set_colors_enabled_stderr(false);
    }
    let json = cli.json;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            // Messages may quote a guest (a file name, its error): shown,
            // never obeyed by the terminal.
            eprintln!("nexusctl: {}", ui::printable(&e.to_string()));
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // Messages may quote a guest (a file name, its error): shown,
            // never obeyed by the terminal.
            eprintln!("nexusctl: {}", ui::printable(&e.to_string()));
            if json {
                // Scripts read stdout: the error is there too.
                commands::say(
                    &serde_json::json!({"error": {"code": e.code(), "message": e.to_string()}})
                        .to_string(),
                );
            }
            ExitCode::from(e.code())
        }
    }
}
