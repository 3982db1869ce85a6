//! nexusd as the benchmarks run it: a release build, on a state directory
//! of its own (its loop-mounted pool unmounted afterwards), served over
//! HTTP on a free loopback port.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::workspace_root;

/// A state directory with the default image; on drop, the pool nexusd
/// mounted there is unmounted.
pub struct StateDir(tempfile::TempDir);

impl StateDir {
    pub fn new(image: &Path) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("nxb").tempdir_in("/tmp")?;
        std::fs::create_dir_all(dir.path().join("images"))?;
        std::os::unix::fs::symlink(image, dir.path().join("images/default"))?;
        Ok(Self(dir))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        // A daemon a stdio front end started exits shortly after its last
        // front end: wait for it to let go of the pool, then detach it
        // anyway, so no deleted pool image stays mounted (and its space
        // held) after the benchmark.
        let pool = self.0.path().join("pool");
        for _ in 0..50 {
            let unmounted = std::process::Command::new("umount")
                .arg(&pool)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if unmounted || !is_mounted(&pool) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = std::process::Command::new("umount")
            .arg("--lazy")
            .arg(&pool)
            .status();
    }
}

fn is_mounted(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|mounts| {
        mounts
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(&*path.to_string_lossy()))
    })
}

/// Builds the release nexusd; returns its path.
pub fn build_release() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = std::process::Command::new(cargo)
        .current_dir(workspace_root())
        .args([
            "build",
            "--release",
            "--locked",
            "-q",
            "-p",
            "nexus-host",
            "--bin",
            "nexusd",
        ])
        .status()?;
    if !status.success() {
        bail!("building nexusd failed");
    }
    Ok(workspace_root().join("target/release/nexusd"))
}

/// `nexusd serve` on a free loopback port; returns the process (killed on
/// drop) and its `/mcp` URL. Its log keeps being drained.
pub async fn serve(
    nexusd: &Path,
    state: &StateDir,
) -> anyhow::Result<(tokio::process::Child, String)> {
    serve_with(nexusd, state, "").await
}

/// [`serve`] with a configuration file of `toml`.
pub async fn serve_with(
    nexusd: &Path,
    state: &StateDir,
    toml: &str,
) -> anyhow::Result<(tokio::process::Child, String)> {
    let config = state.path().join("nexusd.toml");
    std::fs::write(&config, toml)?;
    let mut serve = tokio::process::Command::new(nexusd)
        .arg("--state-dir")
        .arg(state.path())
        .arg("--config")
        .arg(&config)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info,rmcp=error")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(serve.stderr.take().context("no stderr")?).lines();
    let url = loop {
        let line = lines
            .next_line()
            .await?
            .context("nexusd exited before listening")?;
        if let Some(at) = line.find("http://") {
            break line[at..]
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((serve, url))
}

/// Calls tool `tool` of nexusd; its structured answer, or the tool's
/// error.
pub async fn call(
    client: &rmcp::service::RunningService<rmcp::RoleClient, ()>,
    tool: &str,
    args: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let mut params = rmcp::model::CallToolRequestParams::new(tool.to_owned());
    if let serde_json::Value::Object(map) = args {
        params = params.with_arguments(map);
    }
    let result = client.call_tool(params).await?;
    if result.is_error == Some(true) {
        bail!("{tool}: {:?}", result.content);
    }
    Ok(result.structured_content.unwrap_or_default())
}

/// Stops a served nexusd as a service manager would (SIGTERM) and waits.
pub async fn stop(mut serve: tokio::process::Child) {
    if let Some(pid) = serve.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let _ = tokio::time::timeout(Duration::from_secs(120), serve.wait()).await;
}

/// p50 and p99 of `samples`, in microseconds.
pub fn percentiles_us(mut samples: Vec<Duration>) -> (f64, f64) {
    if samples.is_empty() {
        return (0.0, 0.0);
    }
    samples.sort();
    let at = |p: f64| {
        samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)].as_secs_f64() * 1e6
    };
    (at(0.50), at(0.99))
}

/// The admin's API token the first start of a nexusd wrote into its
/// state directory.
pub fn admin_token(state: &Path) -> anyhow::Result<String> {
    let path = state.join("admin.token");
    Ok(std::fs::read_to_string(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_owned())
}

/// Installs the TLS crypto nexusd uses (ring) for this process's HTTP
/// clients: reqwest is built with rustls and no provider of its own
/// (nexusd's registry pulls), so every client needs one installed first.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// rmcp's HTTP client transport to `url`, sending `token`.
pub fn http(
    url: impl Into<std::sync::Arc<str>>,
    token: impl Into<String>,
) -> impl rmcp::transport::Transport<rmcp::RoleClient> + 'static {
    install_tls_provider();
    rmcp::transport::StreamableHttpClientTransport::from_config(
        rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig::with_uri(url)
            .auth_header(token),
    )
}
