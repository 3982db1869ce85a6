//! Egress benchmark (needs root for nexusd's loop-mounted pool): one VM
//! of the default image behind nexusd's proxy, and an HTTPS server of the
//! benchmark's own on loopback (a test CA nexusd is told to trust), on
//! two ports: one tunnelled, one with a secret bound (intercepted). In
//! one run, alternating:
//! - download MiB/s of a 100 MiB file: from the host directly (curl),
//!   from the guest tunnelled, from the guest intercepted;
//! - per-request latency p50 (a new connection and one small GET each,
//!   Python's http.client): host direct, guest tunnelled, guest
//!   intercepted. Interception's cost is intercepted minus tunnelled (the
//!   same guest, client and TLS work); tunnelled minus host direct is the
//!   whole path (vsock, the forwarder, the proxy) and the guest's slower
//!   CPU under TCG together.
//!
//!   cargo run --release -p nexus-integration --bin bench-egress [-- --rounds N --requests N]
//!
//! Last line: `egress host_mib_s=.. tunnel_mib_s=.. intercept_mib_s=..
//! host_p50_ms=.. tunnel_p50_ms=.. intercept_p50_ms=.. tunnel_mean_ms=..
//! intercept_mean_ms=..`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use nexus_integration::ensure_default_image;
use nexus_integration::nexusd::{
    StateDir, admin_token, build_release, call, http as nexus_http, serve_with, stop,
};
use rmcp::ServiceExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Client = rmcp::service::RunningService<rmcp::RoleClient, ()>;

const BIG: u64 = 100 << 20;

async fn sh(client: &Client, command: &str) -> anyhow::Result<String> {
    let out = call(
        client,
        "bench__exec",
        json!({"command": command, "timeout_s": 600}),
    )
    .await?;
    if out["exit_code"] != 0 {
        bail!("{command}: {out}");
    }
    Ok(out["stdout"].as_str().unwrap_or_default().to_owned())
}

/// A CA and a TLS acceptor for `bench.test` signed by it.
fn tls() -> anyhow::Result<(tokio_rustls::TlsAcceptor, String)> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "bench-egress CA");
    let ca_pem = ca.self_signed(&ca_key)?.pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let leaf = CertificateParams::new(vec!["bench.test".to_owned()])?.signed_by(&key, &issuer)?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(vec![leaf.der().clone()], key)?;
    Ok((tokio_rustls::TlsAcceptor::from(Arc::new(config)), ca_pem))
}

/// An HTTPS server: `/big` is 100 MiB of zeros, anything else 2 bytes;
/// one request per connection.
async fn server(tls: tokio_rustls::TlsAcceptor) -> anyhow::Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tls = tls.clone();
            tokio::spawn(async move {
                let Ok(mut io) = tls.accept(stream).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match io.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let big = head.starts_with(b"GET /big ");
                let len = if big { BIG } else { 2 };
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n"
                );
                if io.write_all(reply.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![0u8; 256 << 10];
                let mut left = len;
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    if io.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    left -= n as u64;
                }
                let _ = io.shutdown().await;
            });
        }
    });
    Ok(port)
}

/// Python: `n` requests, each a new connection, printing each one's
/// milliseconds: through the proxy's tunnel when `proxy`, else straight
/// to 127.0.0.1 (the certificate checked against `ca`, not its name).
fn latency_script(port: u16, n: usize, proxy: bool, ca: &str) -> String {
    let connect = if proxy {
        format!(
            "c = http.client.HTTPSConnection('127.0.0.1', 3128, context=ctx); c.set_tunnel('bench.test', {port})"
        )
    } else {
        format!("c = http.client.HTTPSConnection('127.0.0.1', {port}, context=ctx)")
    };
    let context = match (ca.is_empty(), proxy) {
        (true, _) => "ctx = ssl.create_default_context()".to_owned(),
        (false, true) => format!("ctx = ssl.create_default_context(cafile={ca:?})"),
        (false, false) => {
            format!("ctx = ssl.create_default_context(cafile={ca:?}); ctx.check_hostname = False")
        }
    };
    format!(
        r#"import http.client, ssl, time
{context}
out = []
for i in range({n}):
    t = time.perf_counter()
    {connect}
    c.request("GET", "/small"); c.getresponse().read(); c.close()
    out.append((time.perf_counter() - t) * 1000)
print(" ".join("%.3f" % x for x in out))
"#
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn parse_ms(text: &str) -> Vec<f64> {
    text.split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut rounds = 3usize;
    let mut requests = 40usize;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let value: usize = it
            .next()
            .with_context(|| format!("{arg} needs a value"))?
            .parse()?;
        match arg.as_str() {
            "--rounds" => rounds = value.max(1),
            "--requests" => requests = value.max(5),
            other => bail!("unknown argument {other:?}: use --rounds N, --requests N"),
        }
    }
    nexus_integration::nexusd::install_tls_provider();
    let (image, _) = ensure_default_image()?;
    let nexusd = build_release()?;
    let (acceptor, ca_pem) = tls()?;
    let tunnel_port = server(acceptor.clone()).await?;
    let intercept_port = server(acceptor).await?;
    let state = StateDir::new(&image)?;
    let ca_file = state.path().join("bench-ca.pem");
    std::fs::write(&ca_file, &ca_pem)?;
    let (serve, url) = serve_with(
        &nexusd,
        &state,
        &format!(
            "[egress]\nallow_loopback_upstreams = true\nupstream_ca_files = [{:?}]\nhosts = {{ \"bench.test\" = [\"127.0.0.1\"] }}\n",
            ca_file.display().to_string()
        ),
    )
    .await?;
    let client = ().serve(nexus_http(url, admin_token(state.path())?)).await?;
    eprintln!("bench-egress: booting a VM of the default image");
    call(
        &client,
        "spawn_vm",
        json!({"name": "bench", "memory_mib": 1024, "vcpus": 2}),
    )
    .await?;
    call(
        &client,
        "set_secret",
        json!({"name": "BENCH", "value": "bench-value", "hosts": [format!("bench.test:{intercept_port}")],
               "header": "Authorization: Bearer {secret}"}),
    )
    .await?;
    call(
        &client,
        "grant_secret",
        json!({"name": "BENCH", "vm": "bench"}),
    )
    .await?;
    call(
        &client,
        "bench__write_file",
        json!({"path": "/tmp/bench-ca.pem", "content": ca_pem}),
    )
    .await?;
    for (name, port, ca) in [
        ("tunnel.py", tunnel_port, "/tmp/bench-ca.pem"),
        ("intercept.py", intercept_port, ""),
    ] {
        call(
            &client,
            "bench__write_file",
            json!({"path": format!("/tmp/{name}"), "content": latency_script(port, requests, true, ca)}),
        )
        .await?;
    }
    let host_script = state.path().join("host.py");
    std::fs::write(
        &host_script,
        latency_script(tunnel_port, requests, false, &ca_file.display().to_string()),
    )?;
    let (mut host_mib, mut tunnel_mib, mut intercept_mib) = (Vec::new(), Vec::new(), Vec::new());
    let (mut host_ms, mut tunnel_ms, mut intercept_ms) = (Vec::new(), Vec::new(), Vec::new());
    let mib =
        |bytes_per_s: &str| bytes_per_s.trim().parse::<f64>().unwrap_or(0.0) / f64::from(1 << 20);
    for round in 1..=rounds {
        // Download: host curl, then the guest's curl through the proxy.
        let out = tokio::process::Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{speed_download}",
                "--cacert",
            ])
            .arg(&ca_file)
            .args(["--resolve", &format!("bench.test:{tunnel_port}:127.0.0.1")])
            .arg(format!("https://bench.test:{tunnel_port}/big"))
            .output()
            .await?;
        if !out.status.success() {
            bail!("host curl: {}", String::from_utf8_lossy(&out.stderr));
        }
        host_mib.push(mib(&String::from_utf8_lossy(&out.stdout)));
        tunnel_mib.push(mib(&sh(
            &client,
            &format!("curl -sS -o /dev/null -w '%{{speed_download}}' --cacert /tmp/bench-ca.pem https://bench.test:{tunnel_port}/big"),
        )
        .await?));
        intercept_mib.push(mib(&sh(
            &client,
            &format!("curl -sS -o /dev/null -w '%{{speed_download}}' https://bench.test:{intercept_port}/big"),
        )
        .await?));
        // Latency: host direct, guest tunnelled, guest intercepted.
        let out = tokio::process::Command::new("python3")
            .arg(&host_script)
            .output()
            .await?;
        if !out.status.success() {
            bail!("host python: {}", String::from_utf8_lossy(&out.stderr));
        }
        host_ms.extend(parse_ms(&String::from_utf8_lossy(&out.stdout)));
        tunnel_ms.extend(parse_ms(&sh(&client, "python3 /tmp/tunnel.py").await?));
        intercept_ms.extend(parse_ms(&sh(&client, "python3 /tmp/intercept.py").await?));
        eprintln!(
            "round {round}/{rounds}: MiB/s host {:.1} tunnel {:.1} intercept {:.1}",
            host_mib.last().copied().unwrap_or(0.0),
            tunnel_mib.last().copied().unwrap_or(0.0),
            intercept_mib.last().copied().unwrap_or(0.0)
        );
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), client.cancel()).await;
    stop(serve).await;
    // The guest's clock may tick in 4 ms steps under TCG (jiffies): the
    // mean is printed beside each median.
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (hm, tm, im) = (mean(&host_ms), mean(&tunnel_ms), mean(&intercept_ms));
    let (h, t, i) = (median(host_ms), median(tunnel_ms), median(intercept_ms));
    println!(
        "download of 100 MiB, median of {rounds}: host direct {:.1} MiB/s, guest tunnelled {:.1} MiB/s, guest intercepted {:.1} MiB/s",
        median(host_mib.clone()),
        median(tunnel_mib.clone()),
        median(intercept_mib.clone())
    );
    println!(
        "per request (new connection, small GET), p50 of {}: host direct {h:.2} ms, guest tunnelled {t:.2} ms (+{:.2}), guest intercepted {i:.2} ms (interception adds {:.2} ms)",
        rounds * requests,
        t - h,
        i - t
    );
    println!(
        "per request, mean: host direct {hm:.2} ms, guest tunnelled {tm:.2} ms, guest intercepted {im:.2} ms (interception adds {:.2} ms)",
        im - tm
    );
    println!(
        "egress host_mib_s={:.1} tunnel_mib_s={:.1} intercept_mib_s={:.1} host_p50_ms={h:.2} tunnel_p50_ms={t:.2} intercept_p50_ms={i:.2} tunnel_mean_ms={tm:.2} intercept_mean_ms={im:.2}",
        median(host_mib),
        median(tunnel_mib),
        median(intercept_mib)
    );
    Ok(())
}
