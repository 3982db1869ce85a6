//! nexusctl: the admin's command line for nexusd.
//!
//! It speaks to a running nexusd over HTTP. For now it checks the daemon's
//! health; VM, snapshot and image commands arrive as typed MCP calls of
//! nexusd's tools, mirroring their names.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(version, about = "Admin CLI for the Nexus daemon")]
struct Cli {
    /// nexusd's HTTP address.
    #[arg(
        long,
        global = true,
        env = "NEXUS_URL",
        default_value = "http://127.0.0.1:7777"
    )]
    url: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Check that nexusd answers on its health endpoint.
    Health,
}

fn health(url: &str) -> anyhow::Result<String> {
    let endpoint = format!("{}/healthz", url.trim_end_matches('/'));
    let body = ureq::get(&endpoint)
        .call()
        .map_err(|e| {
            anyhow::anyhow!("nexusd did not answer at {endpoint}: {e} (is `nexusd serve` running?)")
        })?
        .body_mut()
        .read_to_string()?;
    Ok(body.trim().to_owned())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Health => match health(&cli.url) {
            Ok(status) => {
                println!("nexusd at {}: {status}", cli.url);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("nexusctl: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn health_reads_the_endpoint_and_explains_failures() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let n = conn.read(&mut buf).unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("GET /healthz "));
            conn.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n",
            )
            .unwrap();
        });
        assert_eq!(health(&url).unwrap(), "ok");
        server.join().unwrap();
        let err = health("http://127.0.0.1:1").unwrap_err().to_string();
        assert!(err.contains("is `nexusd serve` running?"), "{err}");
    }
}
