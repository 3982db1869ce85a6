//! nexusd's HTTP surface: `/healthz`, `/metrics` after real calls, and the
//! Host and Origin checks that keep web pages from driving it.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::{State, can_run};
use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// [`raw`] with the head too: status, head (lowercased), body.
async fn raw_full(addr: &str, request: &str) -> (u16, String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_lowercase(), body.to_owned())
}

/// One raw HTTP/1.1 exchange (the test needs to send headers a well-behaved
/// client would not); returns the status code and the body.
async fn raw(addr: &str, request: &str) -> (u16, String) {
    let (status, _, body) = raw_full(addr, request).await;
    (status, body)
}

fn initialize(host: &str, origin: Option<&str>, token: Option<&str>) -> String {
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"raw","version":"0"}}}"#;
    let origin = origin
        .map(|o| format!("Origin: {o}\r\n"))
        .unwrap_or_default();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!(
        "POST /mcp HTTP/1.1\r\nHost: {host}\r\n{origin}{auth}Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_and_host_origin_checks() {
    if !can_run() {
        return;
    }
    let state = State::new();
    let (serve, url) = common::serve(&state).await;
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches("/mcp")
        .to_owned();

    let (status, body) = raw(
        &addr,
        &format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!((status, body.trim()), (200, "ok"));

    // A page on another site cannot reach /mcp, through rebinding (Host) or
    // directly (Origin); a local tool in a browser can.
    let token = state.admin_token();
    let t = Some(token.as_str());
    let (status, _) = raw(&addr, &initialize("evil.example", None, t)).await;
    assert!((400..500).contains(&status), "foreign Host got {status}");
    let (status, _) = raw(&addr, &initialize(&addr, Some("http://evil.example"), t)).await;
    assert!((400..500).contains(&status), "foreign Origin got {status}");
    let (status, _) = raw(&addr, &initialize(&addr, Some("http://localhost:6274"), t)).await;
    assert_eq!(status, 200, "a loopback origin is allowed");

    let client = ().serve(state.http(url.clone())).await.unwrap();
    client
        .call_tool(CallToolRequestParams::new("list_images"))
        .await
        .unwrap();
    let missing = client
        .call_tool(
            CallToolRequestParams::new("get_vm").with_arguments(
                serde_json::json!({"vm": "ghost"})
                    .as_object()
                    .unwrap()
                    .clone(),
            ),
        )
        .await
        .unwrap();
    assert_eq!(missing.is_error, Some(true));
    // Names nobody serves are counted together: clients cannot grow the
    // number of metric series.
    for bogus in ["ghost__made_up_1", "vm_made_up_2", "made_up_3"] {
        let _ = client
            .call_tool(CallToolRequestParams::new(bogus.to_owned()))
            .await;
    }
    client.cancel().await.unwrap();

    let (status, metrics) = raw(
        &addr,
        &format!(
            "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(status, 200);
    for line in [
        r#"nexus_tool_calls_total{tool="list_images",outcome="ok"} 1"#,
        r#"nexus_tool_calls_total{tool="get_vm",outcome="tool_error"} 1"#,
        r#"nexus_vms{state="running"} 0"#,
        r#"nexus_tool_call_duration_seconds_count{tool="list_images"} 1"#,
        r#"nexus_tool_calls_total{tool="unknown",outcome="protocol_error"} 2"#,
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
    assert!(!metrics.contains("made_up"), "{metrics}");
    // Every route checks the Host (a rebound name cannot read metrics).
    for path in ["/metrics", "/healthz"] {
        let (status, _) = raw(
            &addr,
            &format!("GET {path} HTTP/1.1\r\nHost: evil.example:80\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(status, 403, "{path} with a foreign Host");
    }

    // The admin Unix socket serves the same endpoints, to its owner only.
    let admin = state.path().join("nexusd.sock");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&admin).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let mut stream = tokio::net::UnixStream::connect(&admin).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok\n"),
        "{answer}"
    );

    assert!(serve.stop().await.success());
    assert!(!admin.exists(), "the admin socket is removed at shutdown");
}

#[tokio::test]
async fn a_config_file_sets_what_flags_do_not_and_bad_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("nexusd.toml");
    std::fs::write(&config, "listen = \"0.0.0.0:7777\"\n").unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_nexusd"))
        .arg("--config")
        .arg(&config)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("serve")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("0.0.0.0:7777 is not loopback"), "{stderr}");
    assert!(
        !dir.path().join("state").exists(),
        "a refused config changes nothing"
    );
    std::fs::write(&config, "listen = \"127.0.0.1:7777\"\nsecret = 1\n").unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_nexusd"))
        .arg("--config")
        .arg(&config)
        .arg("stdio")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is invalid") && stderr.contains("unknown field `secret`"),
        "{stderr}"
    );
    let help = tokio::process::Command::new(env!("CARGO_BIN_EXE_nexusd"))
        .arg("--help")
        .output()
        .await
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for documented in [
        "--config",
        "NEXUS_CONFIG",
        "--state-dir",
        "NEXUS_STATE_DIR",
        "allow_non_loopback",
        "admin_socket",
    ] {
        assert!(
            help.contains(documented),
            "--help does not document {documented}"
        );
    }
}

/// A raw request with an optional bearer token; status, headers, body.
async fn raw_with(addr: &str, method_path: &str, token: Option<&str>) -> (u16, String, String) {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    raw_full(
        addr,
        &format!("{method_path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"),
    )
    .await
}

async fn tool(
    client: &rmcp::service::RunningService<rmcp::RoleClient, ()>,
    name: &str,
    args: serde_json::Value,
) -> (bool, serde_json::Value, String) {
    let result = client
        .call_tool(
            CallToolRequestParams::new(name.to_owned())
                .with_arguments(args.as_object().unwrap().clone()),
        )
        .await
        .unwrap();
    let text = result
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect::<Vec<_>>()
        .join("\n");
    (
        result.is_error == Some(true),
        result.structured_content.unwrap_or_default(),
        text,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_decide_who_calls_and_every_refusal_is_a_bare_401() {
    if !can_run() {
        return;
    }
    let state = State::new();
    let (serve, url) = common::serve(&state).await;
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches("/mcp")
        .to_owned();

    // The first start left the admin's token, owner-only; the catalog
    // keeps only its digest.
    let file = state.path().join("admin.token");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let admin = state.admin_token();
    assert!(admin.starts_with("nexus_") && admin.len() == 70, "{admin}");
    let catalog = std::fs::read(state.path().join("catalog.db")).unwrap();
    let wal = std::fs::read(state.path().join("catalog.db-wal")).unwrap_or_default();
    for bytes in [&catalog, &wal] {
        assert!(
            !bytes.windows(admin.len()).any(|w| w == admin.as_bytes()),
            "the secret is in the catalog"
        );
    }

    // No token, an unknown one: 401, a bare Bearer challenge, no OAuth
    // metadata anywhere; liveness stays open.
    for (token, challenge) in [
        (None, "www-authenticate: bearer\r\n"),
        (
            Some("nexus_0000"),
            "www-authenticate: bearer error=\"invalid_token\"",
        ),
    ] {
        for path in ["POST /mcp", "GET /mcp", "DELETE /mcp", "GET /metrics"] {
            let (status, head, body) = raw_with(&addr, path, token).await;
            assert_eq!(status, 401, "{path} with {token:?}");
            assert!(head.contains(challenge), "{path}: {head}");
            assert!(!head.contains("resource_metadata"), "{head}");
            assert!(body.is_empty(), "{body}");
        }
    }
    let (status, _, _) = raw_with(&addr, "GET /healthz", None).await;
    assert_eq!(status, 200);
    let (status, _, _) = raw_with(&addr, "GET /.well-known/oauth-protected-resource", None).await;
    assert_eq!(status, 404);

    // The admin makes a user token, shown once; listing never shows it.
    let root = ().serve(state.http(url.clone())).await.unwrap();
    let (failed, made, text) = tool(&root, "create_token", json!({"name": "ci"})).await;
    assert!(!failed, "{text}");
    let user = made["token"].as_str().unwrap().to_owned();
    assert_eq!(
        (made["role"].as_str(), made["state"].as_str()),
        (Some("user"), Some("active"))
    );
    let (_, listed, _) = tool(&root, "list_tokens", json!({})).await;
    assert!(!listed.to_string().contains(&user) && !listed.to_string().contains(&admin));
    let names: Vec<&str> = listed["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["admin", "ci"]);
    // Bad requests are clear and change nothing.
    for (args, says) in [
        (json!({"name": "ci"}), "exists already"),
        (json!({"name": "Bad Name"}), "invalid"),
        (
            json!({"name": "x", "role": "root"}),
            "no role named \"root\"",
        ),
        (json!({"name": "x", "expires_in_s": 0}), "at least 1"),
        (
            json!({"name": "x", "expires_in_s": 400_000_000u64}),
            "at most 315360000",
        ),
    ] {
        let (failed, _, text) = tool(&root, "create_token", args.clone()).await;
        assert!(failed && text.contains(says), "{args}: {text}");
    }
    let (_, again, _) = tool(&root, "list_tokens", json!({})).await;
    assert_eq!(again["tokens"].as_array().unwrap().len(), 2);

    // A user drives VMs, not tokens.
    let ci = ().serve(nexus_integration::nexusd::http(url.clone(), user.clone())).await.unwrap();
    let (failed, _, text) = tool(&ci, "list_vms", json!({})).await;
    assert!(!failed, "{text}");
    for name in ["create_token", "list_tokens", "revoke_token"] {
        let (failed, _, text) = tool(&ci, name, json!({"name": "y"})).await;
        assert!(
            failed && text.contains("needs the admin role") && text.contains("token:ci"),
            "{name}: {text}"
        );
    }

    // A session is its opener's: the same id with another token is no
    // session at all.
    let (status, head, _) = raw_full(&addr, &initialize(&addr, None, Some(&user))).await;
    assert_eq!(status, 200);
    let session = head
        .lines()
        .find_map(|l| l.strip_prefix("mcp-session-id:"))
        .unwrap()
        .trim()
        .to_owned();
    let stream_request = |token: &str| {
        format!(
            "GET /mcp HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nMcp-Session-Id: {session}\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n"
        )
    };
    let (status, _) = raw(&addr, &stream_request(&admin)).await;
    assert_eq!(status, 404, "another token used the session");
    // The session's own event stream stays open until the token ends.
    let open = tokio::spawn({
        let (addr, request) = (addr.clone(), stream_request(&user));
        async move {
            tokio::time::timeout(std::time::Duration::from_secs(20), raw(&addr, &request)).await
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(!open.is_finished(), "the event stream did not stay open");

    // Revoked: refused at once, on its open session and any new one.
    let revoking = std::time::Instant::now();
    let (failed, revoked, text) = tool(&root, "revoke_token", json!({"name": "ci"})).await;
    assert!(!failed && revoked["state"] == "revoked", "{text}");
    let after = ci.call_tool(CallToolRequestParams::new("list_vms")).await;
    assert!(
        after.is_err(),
        "a revoked token's session still works: {after:?}"
    );
    let (status, _) = open
        .await
        .unwrap()
        .expect("a revoked token's event stream stayed open");
    assert_eq!(status, 200);
    eprintln!(
        "a revoked token's open event stream ended {:?} after revoke_token was called",
        revoking.elapsed()
    );
    let (status, head, _) = raw_with(&addr, "POST /mcp", Some(&user)).await;
    assert_eq!(status, 401);
    assert!(head.contains("invalid_token"), "{head}");
    let (failed, _, text) = tool(&root, "revoke_token", json!({"name": "nope"})).await;
    assert!(failed && text.contains("no token named"), "{text}");

    // Expired: refused once its time has passed.
    let (_, short, _) = tool(
        &root,
        "create_token",
        json!({"name": "brief", "expires_in_s": 2}),
    )
    .await;
    let brief = short["token"].as_str().unwrap().to_owned();
    let (status, _, _) = raw_with(&addr, "GET /metrics", Some(&brief)).await;
    assert_eq!(status, 200, "valid until it expires");
    tokio::time::sleep(std::time::Duration::from_millis(2200)).await;
    let (status, _, _) = raw_with(&addr, "GET /metrics", Some(&brief)).await;
    assert_eq!(status, 401, "expired");

    // The Python client, refused without a token.
    let out = tokio::process::Command::new(common::python())
        .arg("-c")
        .arg(
            "import asyncio, sys\nfrom mcp import Client\nasync def main():\n    async with Client(sys.argv[1]) as c:\n        await c.list_tools()\ntry:\n    asyncio.run(main())\n    print('CONNECTED')\nexcept BaseException as e:\n    print('REFUSED', repr(e)[:300])\n",
        )
        .arg(&url)
        .output()
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    // (It reports the 401 as "Server returned an error response".)
    assert!(said.starts_with("REFUSED"), "{said}");

    root.cancel().await.unwrap();
    assert!(serve.stop().await.success());
}

/// `[tls]`: nexusd serves HTTPS with the configured certificate (the
/// Python client verifies it), a connection that never says hello holds
/// up no one, and a certificate nexusd cannot read stops it at start
/// with the file named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_configured_certificate() {
    if !can_run() {
        return;
    }
    let state = State::new();
    let made =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert, key) = (state.path().join("cert.pem"), state.path().join("key.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();

    let bad = state.path().join("bad.toml");
    std::fs::write(
        &bad,
        format!("[tls]\ncert = {cert:?}\nkey = \"/nonexistent/key.pem\"\n"),
    )
    .unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_nexusd"))
        .arg("--state-dir")
        .arg(state.path())
        .arg("--config")
        .arg(&bad)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("cannot read the TLS private key /nonexistent/key.pem"),
        "{stderr}"
    );

    let (serve, url) =
        common::serve_with(&state, &format!("[tls]\ncert = {cert:?}\nkey = {key:?}\n")).await;
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    // A client that connects and never says hello.
    let addr = url
        .trim_start_matches("https://")
        .trim_end_matches("/mcp")
        .to_owned();
    let _silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let seen = common::python_script(
        "identities.py",
        &[
            "tls",
            &url,
            &state.admin_token(),
            &cert.display().to_string(),
        ],
        None,
    )
    .await;
    assert_eq!(seen["tls"], true, "{seen}");
    assert!(serve.stop().await.success());
}
