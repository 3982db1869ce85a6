//! Secrets that never enter the guest, through nexusd's egress proxy,
//! from a VM of the default image. The upstreams are the test's own
//! HTTPS server (a test CA nexusd is told to trust, names pinned to
//! loopback): `api.test` takes a secret where the guest put its
//! placeholder, `git.test` serves a git repository behind basic auth
//! the proxy adds. curl, Python's urllib and git work unchanged; the
//! upstream sees the value while the guest holds only the placeholder
//! (searched for in every guest process's environment and the guest's
//! whole filesystem: absent); a placeholder sent anywhere else is
//! blocked; a revoked grant counts from the next request on a connection
//! already open; no answer, audit row or debug log holds the value.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use common::{State, call, can_run, sh};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use nexus_integration::ensure_default_image;
use rmcp::ServiceExt;
use serde_json::{Value, json};

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
struct Seen {
    host: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A test CA, and a TLS acceptor for `names` signed by it.
fn test_ca(names: &[&str]) -> (tokio_rustls::TlsAcceptor, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls_pki_types::pem::PemObject;
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "secrets test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let leaf = CertificateParams::new(names)
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let certs = vec![leaf.der().clone()];
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(leaf_key.serialize_pem().as_bytes())
        .unwrap();
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    (
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        ca_cert.pem(),
    )
}

/// A bare git repository (one commit, README "hello from git") ready for
/// git's dumb HTTP protocol.
fn bare_repo(dir: &Path) -> PathBuf {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {out:?}");
    };
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(dir.join("src/README"), "hello from git\n").unwrap();
    run(&["-C", "src", "init", "-q", "-b", "main"]);
    run(&["-C", "src", "add", "README"]);
    run(&[
        "-C",
        "src",
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@t",
        "commit",
        "-qm",
        "init",
    ]);
    run(&["clone", "-q", "--bare", "src", "repo.git"]);
    run(&["-C", "repo.git", "update-server-info"]);
    dir.join("repo.git")
}

/// The HTTPS upstream: records every request; `/repo.git/...` serves the
/// repository's files to basic auth `x-access-token:<git_value>` only;
/// `/echo` quotes the request's headers back (body, and `authorization`
/// in header `x-echo`); anything else answers "api ok".
async fn upstream(
    tls: tokio_rustls::TlsAcceptor,
    repo: PathBuf,
    git_value: String,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> u16 {
    use base64::Engine;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let want = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{git_value}"))
    );
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (tls, repo, want, seen) = (tls.clone(), repo.clone(), want.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(stream) = tls.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (repo, want, seen) = (repo.clone(), want.clone(), seen.clone());
                    async move {
                        let headers = req
                            .headers()
                            .iter()
                            .map(|(n, v)| {
                                (
                                    n.to_string(),
                                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                )
                            })
                            .collect();
                        let request = Seen {
                            host: req
                                .headers()
                                .get("host")
                                .and_then(|h| h.to_str().ok())
                                .unwrap_or("")
                                .to_owned(),
                            path: req.uri().path().to_owned(),
                            headers,
                        };
                        let authorized = request.header("authorization") == Some(want.as_str());
                        // What a careless API does: the request quoted
                        // back, in the body and in a header.
                        let echo: String = request
                            .headers
                            .iter()
                            .map(|(n, v)| format!("{n}: {v}\n"))
                            .collect();
                        seen.lock().unwrap().push(request);
                        let path = req.uri().path().to_owned();
                        let _ = req.into_body().collect().await;
                        let (status, body) = match path.strip_prefix("/repo.git/") {
                            Some(_) if !authorized => (StatusCode::UNAUTHORIZED, Vec::new()),
                            Some(file) if !file.contains("..") => {
                                match std::fs::read(repo.join(file)) {
                                    Ok(bytes) => (StatusCode::OK, bytes),
                                    Err(_) => (StatusCode::NOT_FOUND, Vec::new()),
                                }
                            }
                            Some(_) => (StatusCode::NOT_FOUND, Vec::new()),
                            None if path == "/echo" => (StatusCode::OK, echo.clone().into_bytes()),
                            None => (StatusCode::OK, b"api ok\n".to_vec()),
                        };
                        let mut response = Response::new(Full::new(Bytes::from(body)));
                        *response.status_mut() = status;
                        if path == "/echo"
                            && let Some(auth) =
                                echo.lines().find(|l| l.starts_with("authorization: "))
                            && let Ok(value) = hyper::header::HeaderValue::from_str(auth)
                        {
                            response.headers_mut().insert("x-echo", value);
                        }
                        if status == StatusCode::UNAUTHORIZED {
                            response.headers_mut().insert(
                                "www-authenticate",
                                hyper::header::HeaderValue::from_static("Basic realm=\"git\""),
                            );
                        }
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    port
}

/// A plain HTTP server answering "other" to anything.
async fn plain_upstream() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                        "other\n",
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_reach_bound_hosts_while_the_guest_holds_only_placeholders() {
    if !can_run() {
        return;
    }
    let (image_dir, _) = ensure_default_image().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let repo = bare_repo(scratch.path());
    // Unguessable values: found anywhere, they leaked.
    let api_value = format!("api-value-{}", hex_random());
    let git_value = format!("git-value-{}", hex_random());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (tls, test_ca_pem) = test_ca(&["api.test", "git.test"]);
    let port = upstream(tls, repo, git_value.clone(), seen.clone()).await;
    let plain = plain_upstream().await;
    let ca_file = scratch.path().join("test-ca.pem");
    std::fs::write(&ca_file, &test_ca_pem).unwrap();

    let state = State::new();
    state.with_image("default", &image_dir);
    let (_serve, url, log) = common::serve_logged(
        &state,
        &format!(
            "[egress]\nallow_loopback_upstreams = true\nupstream_ca_files = [{:?}]\nhosts = {{ \"api.test\" = [\"127.0.0.1\"], \"git.test\" = [\"127.0.0.1\"], \"other.test\" = [\"127.0.0.1\"] }}\n",
            ca_file.display().to_string()
        ),
        "debug",
    )
    .await;
    let client = ().serve(state.http(url.clone())).await.unwrap();
    call(
        &client,
        "spawn_vm",
        json!({"name": "sec", "memory_mib": 512}),
    )
    .await
    .ok();

    // Bad secrets: each says what is wrong, and nothing is kept.
    for (args, says) in [
        (
            json!({"name": "api", "value": "v", "hosts": ["api.test"]}),
            "`name` \"api\" must be",
        ),
        (
            json!({"name": "API", "value": "v", "hosts": []}),
            "`hosts` must name",
        ),
        (
            json!({"name": "API", "value": "a\nb", "hosts": ["api.test"]}),
            "no control characters",
        ),
        (
            json!({"name": "API", "value": "v", "hosts": ["api.test"], "header": "X-Key: v"}),
            "{secret}",
        ),
        (
            json!({"name": "API", "value": "v", "hosts": ["a b"]}),
            "`hosts`: egress pattern",
        ),
    ] {
        let err = call(&client, "set_secret", args.clone()).await.err();
        assert!(err.contains(says), "{args}: {err}");
    }
    assert_eq!(
        call(&client, "list_secrets", json!({})).await.ok()["secrets"],
        json!([])
    );

    let api = call(
        &client,
        "set_secret",
        json!({"name": "API", "value": api_value, "hosts": [format!("api.test:{port}")]}),
    )
    .await
    .ok();
    assert_eq!(api["outcome"], "created", "{api}");
    let placeholder = api["placeholder"].as_str().unwrap().to_owned();
    call(
        &client,
        "set_secret",
        json!({"name": "GIT", "value": git_value, "hosts": [format!("git.test:{port}")],
               "basic_user": "x-access-token"}),
    )
    .await
    .ok();
    for (args, says) in [
        (
            json!({"name": "NOPE", "vm": "sec"}),
            "no secret named \"NOPE\"",
        ),
        (
            json!({"name": "API", "vm": "nope"}),
            "VM \"nope\" does not exist",
        ),
    ] {
        let err = call(&client, "grant_secret", args.clone()).await.err();
        assert!(err.contains(says), "{args}: {err}");
    }
    for name in ["API", "GIT"] {
        let granted = call(&client, "grant_secret", json!({"name": name, "vm": "sec"}))
            .await
            .ok();
        assert_eq!(granted["vms"], json!(["sec"]), "{granted}");
    }
    let info = call(&client, "get_vm", json!({"vm": "sec"})).await.ok();
    assert_eq!(info["secrets"], json!(["API", "GIT"]), "{info}");

    // The guest holds the placeholder, and trusts Nexus's CA.
    let out = sh(
        &client,
        "sec",
        "echo \"$NEXUS_SECRET_API\"; echo \"$SSL_CERT_FILE\"",
    )
    .await;
    assert_eq!(
        out["stdout"],
        format!("{placeholder}\n/etc/nexus/ca-bundle.pem\n"),
        "{out}"
    );

    // curl, with the placeholder where the secret goes.
    let api_url = format!("https://api.test:{port}/v1/curl");
    let out = sh(
        &client,
        "sec",
        &format!("curl -sS -H \"X-Api-Key: $NEXUS_SECRET_API\" {api_url}"),
    )
    .await;
    assert_eq!(out["stdout"], "api ok\n", "{out}");
    // Python's urllib, the same.
    let out = sh(
        &client,
        "sec",
        &format!(
            "python3 -c \"import os, urllib.request as u; r = u.Request('https://api.test:{port}/v1/py', headers={{'X-Api-Key': os.environ['NEXUS_SECRET_API']}}); print(u.urlopen(r).read().decode(), end='')\""
        ),
    )
    .await;
    assert_eq!(out["stdout"], "api ok\n", "{out}");
    // git, over HTTPS with basic auth the proxy adds.
    let out = sh(
        &client,
        "sec",
        &format!("git clone -q https://git.test:{port}/repo.git /workspace/clone 2>&1 && cat /workspace/clone/README"),
    )
    .await;
    assert_eq!(out["stdout"], "hello from git\n", "{out}");
    {
        let seen = seen.lock().unwrap();
        for path in ["/v1/curl", "/v1/py"] {
            let r = seen.iter().find(|r| r.path == path).unwrap();
            assert_eq!(r.header("x-api-key"), Some(api_value.as_str()), "{r:?}");
            assert_eq!(r.host, format!("api.test:{port}"));
        }
        assert!(
            seen.iter()
                .any(|r| r.path.starts_with("/repo.git/") && r.header("authorization").is_some()),
            "{seen:?}"
        );
    }

    // An upstream that quotes the request back: what it echoes of the
    // secrets is masked (as sent, and basic auth's base64), in the body
    // and the headers; TRACE, which would do the same, is refused.
    for (host, header) in [
        ("api.test", "-H \"Authorization: Bearer $NEXUS_SECRET_API\""),
        ("git.test", ""),
    ] {
        let out = sh(
            &client,
            "sec",
            &format!("curl -sS -D - {header} https://{host}:{port}/echo"),
        )
        .await;
        let stdout = out["stdout"].as_str().unwrap();
        assert!(
            stdout.contains("authorization: ")
                && stdout.contains("x-echo: authorization: ")
                && stdout.contains("*****"),
            "{host}: {out}"
        );
        for value in [&api_value, &git_value] {
            assert!(
                !stdout.contains(value.as_str()),
                "{host}: the value came back: {out}"
            );
        }
        assert!(
            !stdout.contains("eC1hY2Nlc3MtdG9rZW46"),
            "{host}: basic auth came back: {out}"
        );
    }
    let out = sh(
        &client,
        "sec",
        &format!("curl -sS -w ' %{{http_code}}' -X TRACE https://api.test:{port}/"),
    )
    .await;
    assert!(out["stdout"].as_str().unwrap().ends_with(" 405"), "{out}");

    // A placeholder anywhere else is blocked: another host over plain
    // HTTP, a bound host it is not bound to, the request target.
    for command in [
        format!(
            "curl -sS -w ' %{{http_code}}' -H \"X-Api-Key: $NEXUS_SECRET_API\" http://other.test:{plain}/"
        ),
        format!(
            "curl -sS -w ' %{{http_code}}' -H \"X-Api-Key: $NEXUS_SECRET_API\" https://git.test:{port}/repo.git/HEAD"
        ),
        format!(
            "curl -sS -w ' %{{http_code}}' \"https://api.test:{port}/v1/q?k=$NEXUS_SECRET_API\""
        ),
    ] {
        let out = sh(&client, "sec", &command).await;
        let stdout = out["stdout"].as_str().unwrap();
        assert!(
            stdout.contains("exfiltration attempt") && stdout.ends_with(" 403"),
            "{command}: {out}"
        );
    }
    assert!(
        !seen.lock().unwrap().iter().any(|r| r.path == "/v1/q"),
        "a blocked request reached the upstream"
    );

    // Searched for in the guest: the value in no process's environment
    // and no file; the placeholder in the searching shell's own
    // environment and in guest-mcp's settings file (the search works).
    // The value comes on standard input,
    // so no command line or file of the guest holds it.
    let search = r#"read -r v
found=0; for f in /proc/[0-9]*/environ; do tr '\0' '\n' < "$f" 2>/dev/null | grep -qF -e "$v" && { echo "env: $f"; found=1; }; done
grep -rlsF -e "$v" / --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev && echo "file found"
echo "searched: $found""#;
    for (what, expect_found) in [
        (&api_value, false),
        (&git_value, false),
        (&placeholder, true),
    ] {
        let out = call(
            &client,
            "sec__exec",
            json!({"command": search, "stdin": format!("{what}\n"), "timeout_s": 900}),
        )
        .await
        .ok();
        let stdout = out["stdout"].as_str().unwrap();
        assert!(
            stdout.ends_with("searched: 0\n") || stdout.ends_with("searched: 1\n"),
            "{out}"
        );
        assert_eq!(
            stdout.contains("env: "),
            expect_found,
            "{}: {out}",
            if expect_found {
                "the placeholder"
            } else {
                "a secret's value"
            }
        );
        // The placeholder is in a file too (guest-mcp keeps its network
        // settings for a restart): the file search works.
        assert_eq!(stdout.contains("file found"), expect_found, "{out}");
    }

    // Revoked while a connection is open: its next request is refused
    // (the placeholder is no longer this VM's to use).
    let script = format!(
        r#"import http.client, os, ssl, time
c = http.client.HTTPSConnection("127.0.0.1", 3128, context=ssl.create_default_context())
c.set_tunnel("api.test", {port})
h = {{"X-Api-Key": "{placeholder}"}}
c.request("GET", "/v1/before", headers=h); r = c.getresponse(); print(r.status, r.read().decode().strip(), flush=True)
while not os.path.exists("/tmp/go"): time.sleep(0.1)
c.request("GET", "/v1/after", headers=h); r = c.getresponse(); print(r.status, r.read().decode().strip(), flush=True)
"#
    );
    call(
        &client,
        "sec__write_file",
        json!({"path": "/tmp/keepalive.py", "content": script}),
    )
    .await
    .ok();
    let started = call(
        &client,
        "sec__process_start",
        json!({"argv": ["python3", "/tmp/keepalive.py"]}),
    )
    .await
    .ok();
    let id = started["id"].as_str().unwrap().to_owned();
    let first = call(
        &client,
        "sec__process_output",
        json!({"id": id, "wait_ms": 30000}),
    )
    .await
    .ok();
    assert!(
        first["stdout"]["data"]
            .as_str()
            .unwrap()
            .starts_with("200 api ok"),
        "{first}"
    );
    call(
        &client,
        "revoke_secret",
        json!({"name": "API", "vm": "sec"}),
    )
    .await
    .ok();
    sh(&client, "sec", "touch /tmp/go").await;
    let mut output = String::new();
    for _ in 0..60 {
        let out = call(
            &client,
            "sec__process_output",
            json!({"id": id, "wait_ms": 1000}),
        )
        .await
        .ok();
        output = out["stdout"]["data"].as_str().unwrap().to_owned();
        if output.lines().count() >= 2 {
            break;
        }
    }
    let after = output.lines().nth(1).unwrap_or_default();
    assert!(
        after.starts_with("403 nexus egress: blocked") && after.contains("not granted to this VM"),
        "{output}"
    );
    assert!(!seen.lock().unwrap().iter().any(|r| r.path == "/v1/after"));
    // And new commands no longer hold its placeholder.
    let out = sh(&client, "sec", "echo \"[$NEXUS_SECRET_API]\"").await;
    assert_eq!(out["stdout"], "[]\n", "{out}");
    let err = call(
        &client,
        "revoke_secret",
        json!({"name": "API", "vm": "sec"}),
    )
    .await
    .err();
    assert!(err.contains("not granted"), "{err}");

    // The trail: intercepted connections with the secrets used, by
    // name; blocked requests as denied.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let rows = call(
            &client,
            "read_audit",
            json!({"identity": "vm:sec", "limit": 200}),
        )
        .await
        .ok();
        let rows: Vec<Value> = rows["records"].as_array().unwrap().clone();
        let args =
            |r: &Value| serde_json::from_str::<Value>(r["arguments"].as_str().unwrap()).unwrap();
        let used_api = rows
            .iter()
            .any(|r| r["outcome"] == "ok" && args(r)["secrets"] == json!(["API"]));
        let used_git = rows
            .iter()
            .any(|r| r["outcome"] == "ok" && args(r)["secrets"] == json!(["GIT"]));
        let blocked = rows
            .iter()
            .filter(|r| {
                r["outcome"] == "denied"
                    && args(r)["why"]
                        .as_str()
                        .unwrap_or("")
                        .contains("exfiltration")
            })
            .count();
        if used_api && used_git && blocked >= 4 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "api {used_api}, git {used_git}, blocked {blocked}: {rows:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }

    // Deleted: gone from the list and from the VM.
    let listed = call(&client, "list_secrets", json!({})).await.ok();
    assert_eq!(listed["secrets"].as_array().unwrap().len(), 2, "{listed}");
    call(&client, "delete_secret", json!({"name": "GIT"}))
        .await
        .ok();
    let err = call(&client, "delete_secret", json!({"name": "GIT"}))
        .await
        .err();
    assert!(err.contains("no secret named \"GIT\""), "{err}");
    let info = call(&client, "get_vm", json!({"vm": "sec"})).await.ok();
    assert_eq!(info["secrets"], json!([]), "{info}");

    // Destroyed while holding a secret: a new VM of the same name holds
    // nothing.
    call(&client, "grant_secret", json!({"name": "API", "vm": "sec"}))
        .await
        .ok();
    call(&client, "destroy_vm", json!({"vm": "sec"})).await.ok();
    call(
        &client,
        "spawn_vm",
        json!({"name": "sec", "memory_mib": 512}),
    )
    .await
    .ok();
    let info = call(&client, "get_vm", json!({"vm": "sec"})).await.ok();
    assert_eq!(info["secrets"], json!([]), "{info}");
    let out = sh(&client, "sec", "echo \"[$NEXUS_SECRET_API]\"").await;
    assert_eq!(out["stdout"], "[]\n", "{out}");

    // No answer, audit row or debug log line held a value.
    let everything = call(&client, "read_audit", json!({"limit": 1000}))
        .await
        .ok()
        .to_string()
        + &listed.to_string();
    let log = log.lock().unwrap().clone();
    for value in [&api_value, &git_value] {
        assert!(
            !everything.contains(value.as_str()),
            "a value in an answer or the trail"
        );
        assert!(
            !log.contains(value.as_str()),
            "a value in nexusd's debug log"
        );
    }
    assert!(log.contains("DEBUG"), "the log was at debug level");
    client.cancel().await.unwrap();
}

fn hex_random() -> String {
    let mut bytes = [0u8; 12];
    getrandom::fill(&mut bytes).unwrap();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
