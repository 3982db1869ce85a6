//! Egress from a VM of the default image, through nexusd's proxy only:
//! curl and Python reach an allowed upstream (plain HTTP as an
//! absolute-form request, HTTPS through a CONNECT tunnel the proxy does
//! not open); a host off the VM's allowlist, private and link-local
//! literals and a name resolving to a refused address are refused with
//! a clear proxy error; every connection is in the audit trail and in
//! /metrics. Upstreams are the test's own, on loopback, named
//! `upstream.test` in nexusd's `[egress] hosts` (which the test-only
//! `allow_loopback_upstreams` lets through; in the guest, `localhost`
//! is the guest itself and never proxied).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::sync::Arc;

use common::{State, call, can_run, sh};
use nexus_integration::ensure_default_image;
use rmcp::ServiceExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A tiny HTTP/1.1 server answering every request with `body`; with
/// `tls`, behind that TLS acceptor.
async fn upstream(body: &'static str, tls: Option<tokio_rustls::TlsAcceptor>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let tls = tls.clone();
            tokio::spawn(async move {
                let respond = |mut io: Box<dyn Io>| async move {
                    let mut buf = vec![0u8; 4096];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match io.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = io.write_all(reply.as_bytes()).await;
                    let _ = io.shutdown().await;
                };
                match tls {
                    Some(tls) => {
                        if let Ok(stream) = tls.accept(stream).await {
                            respond(Box::new(stream)).await;
                        }
                    }
                    None => respond(Box::new(stream)).await,
                }
            });
        }
    });
    port
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A TLS acceptor for `upstream.test` and the certificate (PEM) to
/// trust it by.
fn tls_for_upstream() -> (tokio_rustls::TlsAcceptor, String) {
    use rustls_pki_types::pem::PemObject;
    let made = rcgen::generate_simple_self_signed(vec!["upstream.test".into()]).unwrap();
    let pem = made.cert.pem();
    let certs = vec![rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()];
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(
        made.signing_key.serialize_pem().as_bytes(),
    )
    .unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    (tokio_rustls::TlsAcceptor::from(Arc::new(config)), pem)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_reaches_allowed_upstreams_through_the_proxy_and_nothing_else() {
    if !can_run() {
        return;
    }
    // A name that resolves to a private address (pinned in nexusd's
    // [egress.hosts], as a rebinding DNS server would answer).
    let refused_name = "rebound.test";

    let (image_dir, _) = ensure_default_image().unwrap();
    let http_port = upstream("hello from upstream\n", None).await;
    let other_port = upstream("other\n", None).await;
    let (tls, ca) = tls_for_upstream();
    let https_port = upstream("hello over tls\n", Some(tls)).await;

    let state = State::new();
    state.with_image("default", &image_dir);
    let (_serve, url) =
        common::serve_with(
            &state,
            "[egress]\nallow_loopback_upstreams = true\nhosts = { \"rebound.test\" = [\"192.168.7.7\"], \"upstream.test\" = [\"127.0.0.1\"] }\n",
        )
        .await;
    let client = ().serve(state.http(url.clone())).await.unwrap();
    // The admin's role allows every host and port; this VM narrows it.
    let vm = call(
        &client,
        "spawn_vm",
        json!({"name": "net", "memory_mib": 512,
               "egress": [format!("upstream.test:{http_port}"), format!("upstream.test:{https_port}"),
                          "10.1.2.3", "169.254.169.254", refused_name]}),
    )
    .await
    .ok();
    assert_eq!(vm["egress"].as_array().unwrap().len(), 5, "{vm}");
    let bad = call(
        &client,
        "spawn_vm",
        json!({"name": "bad", "egress": ["a/b"]}),
    )
    .await
    .err();
    assert!(bad.contains("`egress`: egress pattern \"a/b\""), "{bad}");

    // Allowed: plain HTTP (absolute form), HTTPS (a tunnel the guest's
    // curl verifies end to end), Python's urllib.
    let out = sh(
        &client,
        "net",
        &format!("curl -sS http://upstream.test:{http_port}/hi"),
    )
    .await;
    assert_eq!(out["stdout"], "hello from upstream\n", "{out}");
    call(
        &client,
        "net__write_file",
        json!({"path": "/tmp/ca.pem", "content": ca}),
    )
    .await
    .ok();
    let out = sh(
        &client,
        "net",
        &format!("curl -sS --cacert /tmp/ca.pem https://upstream.test:{https_port}/"),
    )
    .await;
    assert_eq!(out["stdout"], "hello over tls\n", "{out}");
    let out = sh(
        &client,
        "net",
        &format!(
            "python3 -c \"import urllib.request; print(urllib.request.urlopen('http://upstream.test:{http_port}/py').read().decode(), end='')\""
        ),
    )
    .await;
    assert_eq!(out["stdout"], "hello from upstream\n", "{out}");

    // Refused, each with the proxy's reason.
    for (target, says) in [
        (
            format!("http://upstream.test:{other_port}/"),
            "is not on VM net's egress allowlist",
        ),
        ("http://10.1.2.3/".to_owned(), "a private address"),
        (
            "http://169.254.169.254/latest/meta-data/".to_owned(),
            "link-local",
        ),
        (
            format!("http://{refused_name}/"),
            "rebound.test resolves to 192.168.7.7, a private address: refused",
        ),
    ] {
        let out = sh(
            &client,
            "net",
            &format!("curl -sS -w ' %{{http_code}}' {target}"),
        )
        .await;
        let stdout = out["stdout"].as_str().unwrap();
        assert!(
            stdout.starts_with("nexus egress: ")
                && stdout.contains(says)
                && stdout.ends_with(" 403"),
            "{target}: {out}"
        );
    }
    // HTTPS to a refused host: the tunnel is refused (curl says the
    // proxy's status).
    let out = sh(
        &client,
        "net",
        &format!("curl -sS https://upstream.test:{other_port}/ 2>&1; echo \" exit=$?\""),
    )
    .await;
    assert!(out["stdout"].as_str().unwrap().contains("403"), "{out}");

    // Narrowed again: the next connection follows.
    let set = call(
        &client,
        "set_egress",
        json!({"vm": "net", "egress": [format!("upstream.test:{http_port}")]}),
    )
    .await
    .ok();
    assert_eq!(set["egress"], json!([format!("upstream.test:{http_port}")]));
    let out = sh(
        &client,
        "net",
        &format!("curl -sS --cacert /tmp/ca.pem https://upstream.test:{https_port}/ 2>&1; echo \" exit=$?\""),
    )
    .await;
    assert!(out["stdout"].as_str().unwrap().contains("403"), "{out}");
    let err = call(
        &client,
        "set_egress",
        json!({"vm": "net", "egress": ["x y"]}),
    )
    .await
    .err();
    assert!(err.contains("may hold only"), "{err}");

    // A slow upstream (it takes the connection and never answers) holds
    // only its own request: another, meanwhile, is answered.
    let slow = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow_port = slow.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = slow.accept().await {
            held.push(s);
        }
    });
    call(
        &client,
        "set_egress",
        json!({"vm": "net", "egress": [format!("upstream.test:{http_port}"), format!("upstream.test:{slow_port}")]}),
    )
    .await
    .ok();
    let out = sh(
        &client,
        "net",
        &format!(
            "(curl -sS -m 30 http://upstream.test:{slow_port}/; touch /tmp/slow-done) >/dev/null 2>&1 & sleep 1; \
             curl -sS http://upstream.test:{http_port}/meanwhile; \
             [ -e /tmp/slow-done ] && echo slow-finished || echo slow-pending"
        ),
    )
    .await;
    assert_eq!(
        out["stdout"], "hello from upstream\nslow-pending\n",
        "{out}"
    );

    // Its owner's role with no egress at all: nothing gets out, whatever
    // the VM's own list says.
    call(
        &client,
        "set_role",
        json!({"name": "closed", "tools": ["*"], "vms": "own", "egress": []}),
    )
    .await
    .ok();
    call(
        &client,
        "create_token",
        json!({"name": "closed-bot", "role": "closed"}),
    )
    .await
    .ok();
    let before = call(&client, "get_vm", json!({"vm": "net"})).await.ok();
    call(
        &client,
        "give_vm",
        json!({"vm": "net", "owner": "token:closed-bot"}),
    )
    .await
    .ok();
    let out = sh(
        &client,
        "net",
        &format!("curl -sS -w ' %{{http_code}}' http://upstream.test:{http_port}/"),
    )
    .await;
    assert!(
        out["stdout"]
            .as_str()
            .unwrap()
            .contains("is not on VM net's egress allowlist")
            && out["stdout"].as_str().unwrap().ends_with(" 403"),
        "{out}"
    );
    call(
        &client,
        "give_vm",
        json!({"vm": "net", "owner": before["owner"]}),
    )
    .await
    .ok();

    // Stopped and started again: a new proxy, the VM's own list kept.
    call(&client, "stop_vm", json!({"vm": "net"})).await.ok();
    let started = call(&client, "start_vm", json!({"vm": "net"})).await.ok();
    assert_eq!(started["egress"].as_array().unwrap().len(), 2, "{started}");
    let out = sh(
        &client,
        "net",
        &format!("curl -sS http://upstream.test:{http_port}/again; curl -sS -w ' %{{http_code}}' http://upstream.test:{other_port}/"),
    )
    .await;
    let stdout = out["stdout"].as_str().unwrap();
    assert!(
        stdout.starts_with("hello from upstream\n")
            && stdout.contains("not on VM net's egress allowlist")
            && stdout.ends_with(" 403"),
        "{out}"
    );

    // Every connection is in the trail, as the VM's (written once each
    // connection ends: waited for).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let egress: Vec<Value> = loop {
        let rows = call(
            &client,
            "read_audit",
            json!({"identity": "vm:net", "limit": 100}),
        )
        .await
        .ok();
        let egress: Vec<Value> = rows["records"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["tool"] == "egress")
            .cloned()
            .collect();
        let ok = egress.iter().filter(|r| r["outcome"] == "ok").count();
        let denied = egress.iter().filter(|r| r["outcome"] == "denied").count();
        if ok >= 3 && denied >= 6 {
            break egress;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{ok} ok, {denied} denied: {egress:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let tunnelled = egress
        .iter()
        .find(|r| r["outcome"] == "ok" && r["arguments"].as_str().unwrap_or("").contains("CONNECT"))
        .unwrap();
    let args: Value = serde_json::from_str(tunnelled["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args["port"], https_port);
    assert!(args["bytes_down"].as_u64().unwrap() > 0, "{args}");
    // A plain request's row says what the upstream answered.
    let plain = egress
        .iter()
        .map(|r| serde_json::from_str::<Value>(r["arguments"].as_str().unwrap()).unwrap())
        .find(|a| a["method"] == "GET" && a["port"] == http_port)
        .unwrap();
    assert_eq!(plain["status"], 200, "{plain}");

    // And counted.
    let metrics = http_get(&url.replace("/mcp", "/metrics"), &state.admin_token()).await;
    assert!(
        metrics.contains(r#"nexus_egress_connections_total{vm="net",decision="deny"}"#),
        "{metrics}"
    );
    client.cancel().await.unwrap();
}

/// GET over a plain TCP connection (the metrics page).
async fn http_get(url: &str, token: &str) -> String {
    let rest = url.trim_start_matches("http://");
    let (addr, path) = rest.split_at(rest.find('/').unwrap());
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    out
}

/// The proxy alone, on a Unix socket as a VM's would be, with a gate
/// that allows every host: what the address checks refuse whatever the
/// lists say, that a tunnel holds its connection's slot, and that
/// stopping the VM's proxy cuts its tunnels.
mod proxy_alone {
    use std::sync::{Arc, Mutex};

    use nexus_host::egress::{Allowlist, Gate, Outcome, Record, Rules, Settings};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;
    use tokio_util::sync::CancellationToken;

    #[derive(Default)]
    struct Open(Mutex<Vec<Record>>);

    impl Gate for Open {
        fn rules(&self, vm: &str) -> Result<Rules, String> {
            Ok(Rules {
                identity: format!("vm:{vm}"),
                lists: vec![Allowlist::new(&["*:*".to_owned()])?],
                granted: Default::default(),
            })
        }
        fn record(&self, record: Record) {
            self.0.lock().unwrap().push(record);
        }
    }

    struct Proxy {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        gate: Arc<Open>,
        stop: CancellationToken,
    }

    async fn proxy(settings: Settings) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.sock_1026");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let gate = Arc::new(Open::default());
        let stop = CancellationToken::new();
        tokio::spawn(nexus_host::egress::proxy::serve(
            listener,
            "t".into(),
            gate.clone(),
            settings,
            stop.clone(),
        ));
        Proxy {
            _dir: dir,
            path,
            gate,
            stop,
        }
    }

    /// Sends `request` and reads the response head (and what follows).
    async fn ask(path: &std::path::Path, request: &str) -> (UnixStream, String) {
        let mut stream = UnixStream::connect(path).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("the proxy answered in time")
            .unwrap();
        (stream, String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    #[tokio::test]
    async fn loopback_in_any_spelling_is_refused_when_not_allowed() {
        let p = proxy(Settings::default()).await;
        for host in [
            "localhost",
            "127.1",
            "2130706433",
            "0x7f000001",
            "[::1]",
            "[::ffff:127.0.0.1]",
            "LOCALHOST.",
        ] {
            let (_, head) = ask(
                &p.path,
                &format!(
                    "GET http://{host}:9/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                ),
            )
            .await;
            assert!(
                head.starts_with("HTTP/1.1 403") && head.contains("refused"),
                "{host}: {head}"
            );
        }
        let records = p.gate.0.lock().unwrap().clone();
        assert_eq!(records.len(), 7);
        assert!(
            records
                .iter()
                .all(|r| matches!(r.outcome, Outcome::Denied(_)))
        );
    }

    #[tokio::test]
    async fn a_tunnel_holds_its_slot_and_stopping_the_proxy_cuts_it() {
        let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = upstream.local_addr().unwrap().port();
        tokio::spawn(async move {
            // Accepts and holds connections open, echoing nothing.
            let mut held = Vec::new();
            while let Ok((s, _)) = upstream.accept().await {
                held.push(s);
            }
        });
        let p = proxy(Settings {
            allow_loopback: true,
            max_connections: 1,
            ..Settings::default()
        })
        .await;
        let (mut tunnel, head) = ask(
            &p.path,
            &format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"),
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        // The one slot is the tunnel's: a second connection waits.
        let mut second = UnixStream::connect(&p.path).await.unwrap();
        second
            .write_all(format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(500), second.read(&mut buf))
                .await;
        assert!(
            waited.is_err(),
            "a second connection was served past the limit"
        );
        // Stopped: the tunnel is cut and recorded.
        p.stop.cancel();
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), tunnel.read(&mut buf))
            .await
            .expect("the tunnel was cut")
            .unwrap_or(0);
        assert_eq!(n, 0);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let records = p.gate.0.lock().unwrap().clone();
        assert!(
            records.iter().any(
                |r| matches!(&r.outcome, Outcome::Failed(why) if why.contains("egress stopped"))
            ),
            "{records:?}"
        );
    }
}
