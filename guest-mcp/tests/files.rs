//! File tools with good and bad input, the 100 MiB chunked round trip, and
//! protocol robustness.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use base64::Engine as _;
use common::{Server, call};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[tokio::test]
async fn text_files_are_written_atomically_and_read_by_lines() {
    let server = Server::start(&[]).await;
    let client = server.client().await;
    let body: String = (1..=10).map(|i| format!("line {i}\n")).collect();
    let w = call(
        &client,
        "write_file",
        json!({"path": "notes/a.txt", "content": body, "create_parents": true, "mode": "0600"}),
    )
    .await
    .ok();
    assert_eq!(w["bytes_written"], 71);
    let path = server.workdir.join("notes/a.txt");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), body);
    let stat = call(
        &client,
        "stat",
        json!({"path": "notes/a.txt", "sha256": true}),
    )
    .await
    .ok();
    assert_eq!(stat["mode"], "0600");
    assert_eq!(stat["type"], "file");
    assert_eq!(stat["sha256"], hex(&Sha256::digest(body.as_bytes())));

    let r = call(
        &client,
        "read_file",
        json!({"path": "notes/a.txt", "offset": 2, "limit": 3}),
    )
    .await;
    assert_eq!(r.text, "line 3\nline 4\nline 5\n");
    let r = r.ok();
    assert_eq!(
        (
            r["count"].as_u64(),
            r["next_offset"].as_u64(),
            r["eof"].as_bool()
        ),
        (Some(3), Some(5), Some(false))
    );
    let r = call(
        &client,
        "read_file",
        json!({"path": "notes/a.txt", "offset": 8}),
    )
    .await
    .ok();
    assert_eq!(r["content"], "line 9\nline 10\n");
    assert_eq!(r["eof"], true);

    // Rewriting keeps the mode; append and offset writes change in place.
    call(
        &client,
        "write_file",
        json!({"path": "notes/a.txt", "content": "new\n"}),
    )
    .await
    .ok();
    assert_eq!(
        call(&client, "stat", json!({"path": "notes/a.txt"}))
            .await
            .ok()["mode"],
        "0600"
    );
    call(
        &client,
        "write_file",
        json!({"path": "notes/a.txt", "content": "more\n", "append": true}),
    )
    .await
    .ok();
    call(
        &client,
        "write_file",
        json!({"path": "notes/a.txt", "content": "N", "offset": 0}),
    )
    .await
    .ok();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "New\nmore\n");
    // No temporary file is left beside it.
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn binary_files_need_base64_and_come_back_byte_exact() {
    let server = Server::start(&[]).await;
    let client = server.client().await;
    let bytes: Vec<u8> = (0..=255u8).collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    call(
        &client,
        "write_file",
        json!({"path": "bin", "content_base64": b64}),
    )
    .await
    .ok();
    let err = call(&client, "read_file", json!({"path": "bin"}))
        .await
        .err();
    assert!(
        err.contains("is binary (not UTF-8 text at line 1)") && err.contains("base64"),
        "{err}"
    );
    let r = call(
        &client,
        "read_file",
        json!({"path": "bin", "encoding": "base64", "offset": 250, "limit": 10}),
    )
    .await
    .ok();
    let got = base64::engine::general_purpose::STANDARD
        .decode(r["content"].as_str().unwrap())
        .unwrap();
    assert_eq!(got, &bytes[250..]);
    assert_eq!(r["eof"], true);
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn endless_lines_are_refused_and_writes_follow_symlinks() {
    let server = Server::start(&["--max-io-bytes", "1048576"]).await;
    let client = server.client().await;
    std::fs::write(server.workdir.join("one-line"), vec![b'x'; 3 << 20]).unwrap();
    let err = call(&client, "read_file", json!({"path": "one-line"}))
        .await
        .err();
    assert!(err.contains("must be at most 1048576 bytes"), "{err}");
    let r = call(
        &client,
        "read_file",
        json!({"path": "one-line", "encoding": "base64", "limit": 10}),
    )
    .await
    .ok();
    assert_eq!(r["count"], 10, "the bytes are still readable in chunks");

    std::fs::write(server.workdir.join("real.conf"), "old\n").unwrap();
    std::os::unix::fs::symlink("real.conf", server.workdir.join("link.conf")).unwrap();
    call(
        &client,
        "write_file",
        json!({"path": "link.conf", "content": "new\n"}),
    )
    .await
    .ok();
    call(
        &client,
        "edit_file",
        json!({"path": "link.conf", "old_string": "new", "new_string": "newer"}),
    )
    .await
    .ok();
    assert_eq!(
        std::fs::read_to_string(server.workdir.join("real.conf")).unwrap(),
        "newer\n"
    );
    assert!(
        server
            .workdir
            .join("link.conf")
            .symlink_metadata()
            .unwrap()
            .file_type()
            .is_symlink()
    );
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn edit_file_replaces_exactly_what_it_is_told() {
    let server = Server::start(&[]).await;
    let client = server.client().await;
    std::fs::write(server.workdir.join("f.py"), "a = 1\nb = 1\nc = 2\n").unwrap();
    let err = call(
        &client,
        "edit_file",
        json!({"path": "f.py", "old_string": "= 1", "new_string": "= 3"}),
    )
    .await
    .err();
    assert!(
        err.contains("occurs 2 times") && err.contains("replace_all"),
        "{err}"
    );
    let err = call(
        &client,
        "edit_file",
        json!({"path": "f.py", "old_string": "zzz", "new_string": ""}),
    )
    .await
    .err();
    assert!(err.contains("`old_string` was not found"), "{err}");
    assert_eq!(
        std::fs::read_to_string(server.workdir.join("f.py")).unwrap(),
        "a = 1\nb = 1\nc = 2\n"
    );
    let r = call(
        &client,
        "edit_file",
        json!({"path": "f.py", "old_string": "c = 2", "new_string": "c = 5"}),
    )
    .await
    .ok();
    assert_eq!(r["replacements"], 1);
    let r = call(
        &client,
        "edit_file",
        json!({"path": "f.py", "old_string": "= 1", "new_string": "= 0", "replace_all": true}),
    )
    .await
    .ok();
    assert_eq!(r["replacements"], 2);
    assert_eq!(
        std::fs::read_to_string(server.workdir.join("f.py")).unwrap(),
        "a = 0\nb = 0\nc = 5\n"
    );
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn directories_listed_made_moved_copied_and_removed() {
    let server = Server::start(&[]).await;
    let client = server.client().await;
    call(&client, "make_dir", json!({"path": "proj/src"}))
        .await
        .ok();
    std::fs::write(server.workdir.join("proj/src/main.rs"), "fn main() {}\n").unwrap();
    std::fs::write(server.workdir.join("proj/.hidden"), "x").unwrap();
    let l = call(&client, "list_dir", json!({"path": "proj", "depth": 2}))
        .await
        .ok();
    let paths: Vec<&str> = l["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["src", "src/main.rs"]);
    let l = call(&client, "list_dir", json!({"path": "proj", "hidden": true}))
        .await
        .ok();
    assert_eq!(l["entries"].as_array().unwrap().len(), 2);
    let l = call(
        &client,
        "list_dir",
        json!({"path": "proj", "depth": 2, "max_entries": 1}),
    )
    .await
    .ok();
    assert_eq!(l["truncated"], true);

    let c = call(
        &client,
        "copy",
        json!({"source": "proj", "destination": "copy", "recursive": true}),
    )
    .await
    .ok();
    assert_eq!(c["bytes"], 14);
    assert!(server.workdir.join("copy/src/main.rs").is_file());
    let err = call(
        &client,
        "copy",
        json!({"source": "proj", "destination": "copy", "recursive": true}),
    )
    .await
    .err();
    assert!(err.contains("already exists: set `overwrite`"), "{err}");
    let err = call(
        &client,
        "copy",
        json!({"source": "proj", "destination": "other"}),
    )
    .await
    .err();
    assert!(err.contains("is a directory: set `recursive`"), "{err}");
    call(
        &client,
        "move",
        json!({"source": "copy", "destination": "moved"}),
    )
    .await
    .ok();
    assert!(
        !server.workdir.join("copy").exists() && server.workdir.join("moved/src/main.rs").is_file()
    );

    let err = call(&client, "remove", json!({"path": "moved"}))
        .await
        .err();
    assert!(err.contains("set `recursive`"), "{err}");
    assert!(server.workdir.join("moved").exists(), "nothing was removed");
    call(
        &client,
        "remove",
        json!({"path": "moved", "recursive": true}),
    )
    .await
    .ok();
    assert!(!server.workdir.join("moved").exists());
    let err = call(&client, "remove", json!({"path": "/"})).await.err();
    assert!(err.contains("refusing to remove `/`"), "{err}");
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn glob_and_grep_find_files_and_lines() {
    let server = Server::start(&[]).await;
    let client = server.client().await;
    let w = &server.workdir;
    std::fs::create_dir_all(w.join("src/deep")).unwrap();
    std::fs::create_dir_all(w.join("target")).unwrap();
    std::fs::write(w.join(".gitignore"), "target/\n").unwrap();
    std::fs::write(w.join("src/lib.rs"), "one\nfn alpha() {}\ntwo\nthree\n").unwrap();
    std::fs::write(w.join("src/deep/mod.rs"), "fn beta() {}\n").unwrap();
    std::fs::write(w.join("src/notes.txt"), "fn gamma\n").unwrap();
    std::fs::write(w.join("target/gen.rs"), "fn ignored() {}\n").unwrap();

    let g = call(&client, "glob", json!({"pattern": "**/*.rs"}))
        .await
        .ok();
    assert_eq!(g["paths"], json!(["src/deep/mod.rs", "src/lib.rs"]));
    let g = call(
        &client,
        "glob",
        json!({"pattern": "**/*.rs", "respect_gitignore": false}),
    )
    .await
    .ok();
    assert_eq!(g["paths"].as_array().unwrap().len(), 3);

    let r = call(
        &client,
        "grep",
        json!({"pattern": "fn [a-z]+", "glob": "*.rs", "context": 1}),
    )
    .await;
    assert!(r.text.contains("src/lib.rs:2:fn alpha() {}"), "{}", r.text);
    let r = r.ok();
    assert_eq!(r["matches"], 2);
    let kinds: Vec<(&str, u64, &str)> = r["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["path"].as_str().unwrap(),
                l["line_number"].as_u64().unwrap(),
                l["kind"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("src/deep/mod.rs", 1, "match"),
            ("src/lib.rs", 1, "context"),
            ("src/lib.rs", 2, "match"),
            ("src/lib.rs", 3, "context")
        ]
    );
    let r = call(
        &client,
        "grep",
        json!({"pattern": "FN", "case_insensitive": true, "max_matches": 1}),
    )
    .await
    .ok();
    assert_eq!(
        (r["matches"].as_u64(), r["truncated"].as_bool()),
        (Some(1), Some(true))
    );

    let err = call(&client, "grep", json!({"pattern": "fn ("}))
        .await
        .err();
    assert!(
        err.contains("`pattern` \"fn (\" is not a valid regular expression"),
        "{err}"
    );
    let err = call(&client, "glob", json!({"pattern": "a[b"})).await.err();
    assert!(err.contains("is not a valid glob"), "{err}");
    let err = call(&client, "grep", json!({"pattern": "x", "path": "nowhere"}))
        .await
        .err();
    assert!(err.contains("does not exist"), "{err}");
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn bad_paths_and_arguments_name_what_is_wrong() {
    let server = Server::start(&[]).await;
    let client = server.client().await;
    let cases = [
        ("read_file", json!({"path": ""}), "`path` is empty"),
        (
            "read_file",
            json!({"path": "a\u{0}b"}),
            "`path` contains a NUL byte",
        ),
        (
            "read_file",
            json!({"path": "missing.txt"}),
            "missing.txt does not exist",
        ),
        (
            "read_file",
            json!({"path": "."}),
            "is a directory: use list_dir",
        ),
        (
            "read_file",
            json!({"path": "x", "encoding": "base64", "limit": 999999999}),
            "`limit` must be at most 8388608",
        ),
        (
            "write_file",
            json!({"path": "a"}),
            "give exactly one of `content`",
        ),
        (
            "write_file",
            json!({"path": "a", "content_base64": "!!"}),
            "`content_base64` is not valid base64",
        ),
        (
            "write_file",
            json!({"path": "no/dir/a", "content": "x"}),
            "set `create_parents`",
        ),
        (
            "write_file",
            json!({"path": "a", "content": "x", "mode": "999"}),
            "`mode` \"999\" is not an octal permission mode",
        ),
        (
            "write_file",
            json!({"path": "a", "content": "x", "append": true, "offset": 3}),
            "`append` and `offset` cannot be combined",
        ),
        (
            "list_dir",
            json!({"depth": 0}),
            "`depth` must be between 1 and 32",
        ),
        (
            "list_dir",
            json!({"max_entries": 0}),
            "`max_entries` must be between 1 and 10000",
        ),
        ("stat", json!({"path": "ghost"}), "ghost does not exist"),
        (
            "edit_file",
            json!({"path": "ghost", "old_string": "a", "new_string": "b"}),
            "does not exist",
        ),
        (
            "move",
            json!({"source": "ghost", "destination": "b"}),
            "ghost does not exist",
        ),
        (
            "grep",
            json!({"pattern": "x", "context": 50}),
            "`context` must be at most 20",
        ),
    ];
    for (tool, args, expected) in cases {
        let err = call(&client, tool, args.clone()).await.err();
        assert!(
            err.contains(expected),
            "{tool} {args}: {err:?} lacks {expected:?}"
        );
    }
    // An argument that is not in the schema is refused, not ignored.
    let err = call(&client, "stat", json!({"path": "x", "follow": true}))
        .await
        .err();
    assert!(err.contains("unknown field `follow`"), "{err}");
    assert_eq!(
        std::fs::read_dir(&server.workdir).unwrap().count(),
        0,
        "nothing was created"
    );
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn a_100_mib_file_round_trips_in_chunks_without_guest_mcp_holding_it() {
    const SIZE: usize = 100 << 20;
    const CHUNK: usize = 2 << 20;
    let server = Server::start(&[]).await;
    let client = server.client().await;
    let b64 = base64::engine::general_purpose::STANDARD;

    // Deterministic, incompressible-looking content.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut sent = Sha256::new();
    for i in 0..SIZE / CHUNK {
        let chunk: Vec<u8> = (0..CHUNK)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        sent.update(&chunk);
        let args = if i == 0 {
            json!({"path": "big.bin", "content_base64": b64.encode(&chunk)})
        } else {
            json!({"path": "big.bin", "content_base64": b64.encode(&chunk), "append": true})
        };
        call(&client, "write_file", args).await.ok();
    }
    let sent = hex(&sent.finalize());

    let mut received = Sha256::new();
    let mut offset = 0u64;
    loop {
        let r = call(
            &client,
            "read_file",
            json!({"path": "big.bin", "encoding": "base64", "offset": offset, "limit": CHUNK}),
        )
        .await
        .ok();
        let bytes = b64.decode(r["content"].as_str().unwrap()).unwrap();
        received.update(&bytes);
        offset = r["next_offset"].as_u64().unwrap();
        if r["eof"] == true {
            break;
        }
    }
    assert_eq!(offset, SIZE as u64);
    assert_eq!(hex(&received.finalize()), sent);
    let stat = call(&client, "stat", json!({"path": "big.bin", "sha256": true}))
        .await
        .ok();
    assert_eq!(stat["sha256"], sent.as_str());
    assert_eq!(stat["size"], SIZE);

    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    // Held whole, the file alone would take 100 MiB (133 MiB as base64).
    assert!(
        peak_kib < 64 * 1024,
        "guest-mcp peaked at {peak_kib} KiB for a 100 MiB file"
    );
    eprintln!("guest-mcp peak memory for a 100 MiB round trip in 2 MiB chunks: {peak_kib} KiB");
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn system_info_describes_the_machine() {
    let server = Server::start(&[]).await;
    let client = server.client().await;
    let info = call(&client, "system_info", json!({})).await.ok();
    assert!(info["cpus"].as_u64().unwrap() >= 1);
    assert!(
        info["memory_total_bytes"].as_u64().unwrap()
            > info["memory_available_bytes"].as_u64().unwrap()
    );
    assert!(!info["kernel"].as_str().unwrap().is_empty());
    assert!(info["uptime_s"].as_f64().unwrap() > 0.0);
    let mounts: Vec<&str> = info["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["mount"].as_str().unwrap())
        .collect();
    assert_eq!(mounts[0], "/");
    assert_eq!(mounts.len(), 2, "/ and the workspace");
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn malformed_messages_and_unknown_tools_get_errors_and_the_server_keeps_serving() {
    let server = Server::start(&[]).await;
    let stream = tokio::net::UnixStream::connect(&server.socket)
        .await
        .unwrap();
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}});
    write
        .write_all(format!("{init}\n").as_bytes())
        .await
        .unwrap();
    let answer: serde_json::Value =
        serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    assert_eq!(answer["result"]["serverInfo"]["name"], "guest-mcp");
    write
        .write_all(
            b"{\"jsonrpc\":\"2.0\",\"method\":\"notifications/initialized\"}\nthis is not json\n",
        )
        .await
        .unwrap();
    let unknown = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "teleport", "arguments": {}}});
    write
        .write_all(format!("{unknown}\n").as_bytes())
        .await
        .unwrap();
    let mut saw_unknown = None;
    while let Ok(Some(line)) = lines.next_line().await {
        let msg: serde_json::Value = serde_json::from_str(&line).unwrap();
        if msg["id"] == 2 {
            saw_unknown = Some(msg);
            break;
        }
    }
    let unknown = saw_unknown.expect("an answer to the unknown tool");
    let message = unknown["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("unknown tool \"teleport\": this server has"),
        "{unknown}"
    );
    assert!(
        message.contains("exec") && message.contains("read_file"),
        "{unknown}"
    );
    // Other connections, and new ones, are served as before.
    let client = server.client().await;
    assert_eq!(
        call(&client, "exec", json!({"command": "echo alive"}))
            .await
            .ok()["stdout"],
        "alive\n"
    );
    // A huge argument is refused with advice, not swallowed.
    let huge = "x".repeat(9 << 20);
    let err = call(
        &client,
        "write_file",
        json!({"path": "huge", "content": huge}),
    )
    .await
    .err();
    assert!(
        err.contains("must be at most 8388608 bytes per call") && err.contains("chunks"),
        "{err}"
    );
    client.cancel().await.unwrap();
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
