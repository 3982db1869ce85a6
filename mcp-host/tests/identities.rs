//! Two identities on one nexusd: each sees and drives only its own VMs
//! (list_vms, tools/list, every way a call names a VM), an admin sees all,
//! and a fork belongs to its source's owner.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{State, call, can_run, python_script};
use nexus_integration::ensure_minimal_image;
use rmcp::service::NotificationContext;
use rmcp::{ClientHandler, RoleClient, ServiceExt};
use serde_json::json;

/// Counts tools/list_changed notifications.
#[derive(Clone, Default)]
struct Changes(Arc<AtomicUsize>);

impl ClientHandler for Changes {
    async fn on_tool_list_changed(&self, _: NotificationContext<RoleClient>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Changes {
    fn seen(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// Waits until no notification has come for 300 ms.
    async fn settle(&self) {
        let mut last = self.seen();
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let now = self.seen();
            if now == last {
                return;
            }
            last = now;
        }
    }

    async fn wait_above(&self, n: usize, what: &str) {
        for _ in 0..200 {
            if self.seen() > n {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("no tools/list_changed {what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_identity_sees_and_drives_only_its_own_vms() {
    if !can_run() {
        return;
    }
    let (image_dir, _) = ensure_minimal_image().unwrap();
    let state = State::new();
    state.with_image("default", &image_dir);
    let (serve, url) = common::serve_with(
        &state,
        "[quota]\nmax_running_vms = 2\nmax_memory_mib = 256\nmax_workspace_gib = 3\nmax_snapshots = 1\n",
    )
    .await;
    let admin = ().serve(state.http(url.clone())).await.unwrap();
    let mut users = Vec::new();
    for name in ["alice", "bob"] {
        let made = call(&admin, "create_token", json!({"name": name}))
            .await
            .ok();
        let token = made["token"].as_str().unwrap().to_owned();
        users.push(
            ().serve(nexus_integration::nexusd::http(url.clone(), token))
                .await
                .unwrap(),
        );
    }
    let (alice, bob) = (&users[0], &users[1]);
    let (a, b) = tokio::join!(
        call(alice, "spawn_vm", json!({"name": "a1", "memory_mib": 128})),
        call(bob, "spawn_vm", json!({"name": "b1", "memory_mib": 128})),
    );
    assert_eq!(a.ok()["owner"], "token:alice");
    assert_eq!(b.ok()["owner"], "token:bob");

    let names = |list: serde_json::Value| -> Vec<String> {
        list["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(call(alice, "list_vms", json!({})).await.ok()), ["a1"]);
    assert_eq!(names(call(bob, "list_vms", json!({})).await.ok()), ["b1"]);
    assert_eq!(
        names(call(&admin, "list_vms", json!({})).await.ok()),
        ["a1", "b1"]
    );
    let tools: Vec<String> = alice
        .list_all_tools()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name.to_string())
        .collect();
    assert!(tools.contains(&"a1__exec".to_owned()), "{tools:?}");
    assert!(
        !tools
            .iter()
            .any(|t| t.starts_with("b1__") || t.ends_with("_token") || t == "list_tokens"),
        "alice sees another's VM or the admin's tools: {tools:?}"
    );

    // Bob's snapshot, then every way alice could name his VM (by name
    // prefix, `vm` argument on either surface, snapshot reference).
    call(bob, "snapshot_drive", json!({"vm": "b1", "name": "s"}))
        .await
        .ok();
    for (tool, args) in [
        ("b1__exec", json!({"command": "true"})),
        ("vm_exec", json!({"vm": "b1", "command": "true"})),
        ("get_vm", json!({"vm": "b1"})),
        ("stop_vm", json!({"vm": "b1"})),
        ("destroy_vm", json!({"vm": "b1"})),
        ("read_console", json!({"vm": "b1"})),
        ("snapshot_drive", json!({"vm": "b1"})),
        ("list_snapshots", json!({"vm": "b1"})),
        ("restore_snapshot", json!({"vm": "b1", "snapshot": "s"})),
        ("delete_snapshot", json!({"vm": "b1", "snapshot": "s"})),
        (
            "fork_vm",
            json!({"vm": "b1", "snapshot": "s", "name": "stolen"}),
        ),
        (
            "spawn_vm",
            json!({"name": "stolen", "from_vm": "b1", "from_snapshot": "s"}),
        ),
    ] {
        let err = call(alice, tool, args.clone()).await.err();
        assert!(
            err.contains("does not exist among yours (token:alice)"),
            "{tool} {args}: {err}"
        );
    }
    // Nothing changed: bob's VM runs, his snapshot is there, no "stolen".
    let info = call(bob, "get_vm", json!({"vm": "b1"})).await.ok();
    assert_eq!(info["state"], "running");
    let snaps = call(bob, "list_snapshots", json!({})).await.ok();
    assert_eq!(snaps["snapshots"].as_array().unwrap().len(), 1);
    let mine = call(alice, "list_snapshots", json!({})).await.ok();
    assert!(mine["snapshots"].as_array().unwrap().is_empty(), "{mine}");
    assert_eq!(
        names(call(&admin, "list_vms", json!({})).await.ok()),
        ["a1", "b1"]
    );

    // A fork is its source's owner's, even made by an admin.
    let fork = call(
        &admin,
        "fork_vm",
        json!({"vm": "b1", "snapshot": "s", "name": "b2"}),
    )
    .await
    .ok();
    assert_eq!(fork["owner"], "token:bob");
    assert_eq!(
        names(call(bob, "list_vms", json!({})).await.ok()),
        ["b1", "b2"]
    );
    let out = call(bob, "b2__exec", json!({"command": "echo mine"}))
        .await
        .ok();
    assert_eq!(out["stdout"], "mine\n");

    // The trail: every call alice made, allowed and denied, each with its
    // VM and outcome; no secret anywhere in it.
    let out = call(
        alice,
        "a1__exec",
        json!({"command": "echo nexus_notreallyasecret"}),
    )
    .await
    .ok();
    assert_eq!(out["stdout"], "nexus_notreallyasecret\n");
    // spawn_vm, list_vms, 12 denied, list_snapshots, the exec.
    let alice_calls = 16;
    let mut rows = Vec::new();
    for _ in 0..100 {
        let trail = call(
            &admin,
            "read_audit",
            json!({"identity": "token:alice", "limit": 1000}),
        )
        .await
        .ok();
        rows = trail["records"].as_array().unwrap().clone();
        if rows.len() >= alice_calls {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(rows.len(), alice_calls, "{rows:#?}");
    let denied: Vec<&serde_json::Value> =
        rows.iter().filter(|r| r["outcome"] == "denied").collect();
    assert_eq!(denied.len(), 12, "{rows:#?}");
    assert!(denied.iter().all(|r| r["vm"] == "b1"), "{denied:#?}");
    assert!(
        rows.iter()
            .any(|r| r["tool"] == "spawn_vm" && r["vm"] == "a1" && r["outcome"] == "ok"),
        "{rows:#?}"
    );
    let exec = rows.iter().find(|r| r["tool"] == "a1__exec").unwrap();
    assert!(
        exec["arguments"].as_str().unwrap().contains("[redacted]") && exec["transport"] == "http",
        "{exec}"
    );
    let everything = call(&admin, "read_audit", json!({"limit": 1000})).await;
    assert!(
        !everything.json.to_string().contains("nexus_"),
        "a secret in the trail"
    );
    let err = call(alice, "read_audit", json!({})).await.err();
    assert!(err.contains("needs the admin role"), "{err}");
    let err = call(&admin, "read_audit", json!({"since": "yesterday"}))
        .await
        .err();
    assert!(err.contains("`since` must be a time"), "{err}");

    // Quotas: each refusal names its quota and changes nothing.
    call(alice, "snapshot_drive", json!({"vm": "a1", "name": "q1"}))
        .await
        .ok();
    for (tool, args, quota) in [
        (
            "snapshot_drive",
            json!({"vm": "a1", "name": "q2"}),
            "max_snapshots",
        ),
        (
            "spawn_vm",
            json!({"name": "a2", "workspace_gib": 5}),
            "max_workspace_gib",
        ),
        (
            "spawn_vm",
            json!({"name": "a2", "memory_mib": 256}),
            "max_memory_mib",
        ),
    ] {
        let err = call(alice, tool, args.clone()).await.err();
        assert!(
            err.contains("token:alice's quota is reached") && err.contains(quota),
            "{tool} {args}: {err}"
        );
    }
    assert_eq!(names(call(alice, "list_vms", json!({})).await.ok()), ["a1"]);
    let snaps = call(alice, "list_snapshots", json!({})).await.ok();
    assert_eq!(snaps["snapshots"].as_array().unwrap().len(), 1);
    call(alice, "spawn_vm", json!({"name": "a2", "memory_mib": 128}))
        .await
        .ok();
    let err = call(alice, "spawn_vm", json!({"name": "a3", "memory_mib": 128}))
        .await
        .err();
    assert!(err.contains("max_running_vms"), "{err}");
    assert_eq!(
        names(call(alice, "list_vms", json!({})).await.ok()),
        ["a1", "a2"]
    );
    // An admin gives a VM to another identity (and nothing to a name
    // nexusd does not know); a user cannot.
    let given = call(&admin, "give_vm", json!({"vm": "a2", "owner": "token:bob"}))
        .await
        .ok();
    assert_eq!(given["owner"], "token:bob");
    assert_eq!(names(call(alice, "list_vms", json!({})).await.ok()), ["a1"]);
    assert!(names(call(bob, "list_vms", json!({})).await.ok()).contains(&"a2".to_owned()));
    let err = call(&admin, "give_vm", json!({"vm": "a1", "owner": "mallory"}))
        .await
        .err();
    assert!(err.contains("`owner` must be an identity"), "{err}");
    let err = call(
        alice,
        "give_vm",
        json!({"vm": "a1", "owner": "token:alice"}),
    )
    .await
    .err();
    assert!(err.contains("needs the admin role"), "{err}");
    // An admin has none.
    call(&admin, "spawn_vm", json!({"name": "x1", "memory_mib": 128}))
        .await
        .ok();

    for vm in ["a1", "a2", "b1", "b2", "x1"] {
        call(&admin, "destroy_vm", json!({"vm": vm})).await.ok();
    }
    for client in users {
        client.cancel().await.unwrap();
    }
    admin.cancel().await.unwrap();
    assert!(serve.stop().await.success());
}

/// Roles as data: tool patterns (guest tools included), VM scope and
/// grants, quotas per role; each change applies at once, each bad input
/// is refused by name and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_and_grants_decide_which_tools_and_vms_an_identity_reaches() {
    if !can_run() {
        return;
    }
    let (image_dir, _) = ensure_minimal_image().unwrap();
    let state = State::new();
    state.with_image("default", &image_dir);
    let (serve, url) = common::serve(&state).await;
    let admin = ().serve(state.http(url.clone())).await.unwrap();
    let reviewer = json!({
        "name": "reviewer",
        "tools": ["list_*", "get_vm", "vm_read_file", "vm_list_dir"],
        "vms": "granted",
    });
    let made = call(&admin, "set_role", reviewer.clone()).await.ok();
    assert_eq!(made["created"], true);
    assert_eq!(made["vms"], "granted");
    // Bad roles: each refused by name; nothing changes.
    for (args, says) in [
        (
            json!({"name": "admin", "tools": ["*"], "vms": "all"}),
            "built in",
        ),
        (
            json!({"name": "r2", "tools": [], "vms": "own"}),
            "at least one pattern",
        ),
        (
            json!({"name": "r2", "tools": ["a;b"], "vms": "own"}),
            "\"a;b\" is not allowed",
        ),
        (
            json!({"name": "r2", "tools": ["*"], "vms": "some"}),
            "unknown variant `some`",
        ),
        (
            json!({"name": "r2", "tools": ["*"], "vms": "own", "quota": {"max_vcpus": 0}}),
            "`max_vcpus` must be at least 1",
        ),
        (
            json!({"name": "R 2", "tools": ["*"], "vms": "own"}),
            "invalid",
        ),
    ] {
        let err = call(&admin, "set_role", args.clone()).await.err();
        assert!(err.contains(says), "{args}: {err}");
    }
    let roles = call(&admin, "list_roles", json!({})).await.ok();
    let names: Vec<&str> = roles["roles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["admin", "reviewer", "user"]);

    let token = |name: &'static str, role: &'static str| {
        let admin = &admin;
        async move {
            let made = call(admin, "create_token", json!({"name": name, "role": role}))
                .await
                .ok();
            made["token"].as_str().unwrap().to_owned()
        }
    };
    let (dev_token, rev_token) = (token("dev", "user").await, token("rev", "reviewer").await);
    let dev = ()
        .serve(nexus_integration::nexusd::http(
            url.clone(),
            dev_token.clone(),
        ))
        .await
        .unwrap();
    let rev = ()
        .serve(nexus_integration::nexusd::http(
            url.clone(),
            rev_token.clone(),
        ))
        .await
        .unwrap();
    // A second session of each, counting tools/list_changed.
    let (dev_changes, rev_changes) = (Changes::default(), Changes::default());
    let dev_watch = dev_changes
        .clone()
        .serve(nexus_integration::nexusd::http(url.clone(), dev_token))
        .await
        .unwrap();
    let rev_watch = rev_changes
        .clone()
        .serve(nexus_integration::nexusd::http(url.clone(), rev_token))
        .await
        .unwrap();
    call(&dev, "spawn_vm", json!({"name": "d1", "memory_mib": 128}))
        .await
        .ok();
    call(
        &dev,
        "d1__write_file",
        json!({"path": "/workspace/notes.txt", "content": "for review\n"}),
    )
    .await
    .ok();

    async fn listed(client: &rmcp::Peer<rmcp::RoleClient>) -> Vec<String> {
        client
            .list_all_tools()
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.name.to_string())
            .collect()
    }
    // Its owner hears that d1's tools came; the reviewer, who does not
    // reach d1, is not told.
    dev_changes.wait_above(0, "for d1's owner").await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(rev_changes.seen(), 0, "told of a VM it does not reach");

    // Before a grant: nothing of d1, and only the tools the role names.
    let tools = listed(rev.peer()).await;
    assert!(
        tools
            .iter()
            .all(|t| t.starts_with("list_") || t == "get_vm"),
        "{tools:?}"
    );
    let err = call(&rev, "get_vm", json!({"vm": "d1"})).await.err();
    assert!(
        err.contains("does not exist among yours (token:rev)"),
        "{err}"
    );
    let err = call(&rev, "spawn_vm", json!({"name": "r1"})).await.err();
    assert!(
        err.contains("role \"reviewer\" of token:rev does not allow tool spawn_vm"),
        "{err}"
    );
    for (args, says) in [
        (
            json!({"vm": "d1", "identity": "token:nobody"}),
            "`identity` must be an identity",
        ),
        (
            json!({"vm": "ghost", "identity": "token:rev"}),
            "\"ghost\" does not exist",
        ),
    ] {
        let err = call(&admin, "grant_vm", args.clone()).await.err();
        assert!(err.contains(says), "{args}: {err}");
    }
    let err = call(
        &dev,
        "grant_vm",
        json!({"vm": "d1", "identity": "token:rev"}),
    )
    .await
    .err();
    assert!(err.contains("needs the admin role"), "{err}");

    // Granted: d1's reading tools, on both surfaces; not its exec.
    call(
        &admin,
        "grant_vm",
        json!({"vm": "d1", "identity": "token:rev"}),
    )
    .await
    .ok();
    rev_changes.wait_above(0, "for a grant").await;
    // Told once: anything about d1 before the grant would have come first.
    rev_changes.settle().await;
    assert_eq!(rev_changes.seen(), 1, "told of a VM before it was granted");
    let tools = listed(rev.peer()).await;
    assert!(tools.contains(&"d1__read_file".to_owned()), "{tools:?}");
    assert!(!tools.iter().any(|t| t.ends_with("exec")), "{tools:?}");
    let vms = call(&rev, "list_vms", json!({})).await.ok();
    assert_eq!(vms["vms"][0]["name"], "d1");
    let read = call(
        &rev,
        "d1__read_file",
        json!({"path": "/workspace/notes.txt"}),
    )
    .await
    .ok();
    assert!(read.to_string().contains("for review"), "{read}");
    for (tool, args) in [
        ("d1__exec", json!({"command": "touch /workspace/x"})),
        (
            "vm_exec",
            json!({"vm": "d1", "command": "touch /workspace/x"}),
        ),
        (
            "d1__write_file",
            json!({"path": "/workspace/x", "content": ""}),
        ),
    ] {
        let err = call(&rev, tool, args).await.err();
        assert!(err.contains("does not allow tool vm_"), "{tool}: {err}");
    }
    // A change to the role applies to its tokens at once; a role that
    // reaches only granted VMs makes none.
    let mut wider = reviewer.clone();
    wider["tools"] = json!(["*", "!vm_write_*"]);
    assert_eq!(call(&admin, "set_role", wider).await.ok()["created"], false);
    let out = call(&rev, "d1__exec", json!({"command": "echo reviewed"}))
        .await
        .ok();
    assert_eq!(out["stdout"], "reviewed\n");
    call(&dev, "snapshot_drive", json!({"vm": "d1", "name": "s"}))
        .await
        .ok();
    for (tool, args) in [
        ("spawn_vm", json!({"name": "r1"})),
        ("spawn_vm", json!({})),
        ("fork_vm", json!({"vm": "d1", "snapshot": "s"})),
    ] {
        let err = call(&rev, tool, args.clone()).await.err();
        assert!(
            err.contains("reaches only VMs granted to it"),
            "{args}: {err}"
        );
    }
    assert_eq!(
        call(&admin, "list_vms", json!({})).await.ok()["vms"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // A fork made by one the source is granted to is the maker's (and
    // charged to it), not the source owner's.
    let dev2 = ()
        .serve(nexus_integration::nexusd::http(
            url.clone(),
            token("dev2", "user").await,
        ))
        .await
        .unwrap();
    call(
        &admin,
        "grant_vm",
        json!({"vm": "d1", "identity": "token:dev2"}),
    )
    .await
    .ok();
    let fork = call(
        &dev2,
        "fork_vm",
        json!({"vm": "d1", "snapshot": "s", "name": "d2"}),
    )
    .await
    .ok();
    assert_eq!(fork["owner"], "token:dev2");
    let mine = call(&dev, "list_vms", json!({})).await.ok();
    assert_eq!(mine["vms"].as_array().unwrap().len(), 1, "{mine}");
    call(&dev2, "destroy_vm", json!({"vm": "d2"})).await.ok();
    let err = call(&rev, "create_token", json!({"name": "mine"}))
        .await
        .err();
    assert!(err.contains("needs the admin role"), "{err}");

    // A role's quota is its identities'.
    call(
        &admin,
        "set_role",
        json!({"name": "user", "tools": ["*"], "vms": "own", "quota": {"max_workspace_gib": 1}}),
    )
    .await
    .ok();
    let err = call(&dev, "spawn_vm", json!({"name": "d2", "workspace_gib": 2}))
        .await
        .err();
    assert!(
        err.contains("token:dev's quota is reached") && err.contains("max_workspace_gib"),
        "{err}"
    );

    // A role held by a token stays; grants are listed and taken back.
    let err = call(&admin, "delete_role", json!({"role": "reviewer"}))
        .await
        .err();
    assert!(err.contains("held by tokens [\"rev\"]"), "{err}");
    let err = call(&admin, "delete_role", json!({"role": "user"}))
        .await
        .err();
    assert!(err.contains("built in"), "{err}");
    let grants = call(&admin, "list_grants", json!({"identity": "token:rev"}))
        .await
        .ok();
    assert_eq!(grants["grants"].as_array().unwrap().len(), 1);
    rev_changes.settle().await;
    let before = rev_changes.seen();
    call(
        &admin,
        "revoke_grant",
        json!({"vm": "d1", "identity": "token:rev"}),
    )
    .await
    .ok();
    rev_changes
        .wait_above(before, "for a grant taken back")
        .await;
    let err = call(
        &rev,
        "d1__read_file",
        json!({"path": "/workspace/notes.txt"}),
    )
    .await
    .err();
    assert!(err.contains("does not exist among yours"), "{err}");
    call(&admin, "revoke_token", json!({"name": "rev"}))
        .await
        .ok();
    call(&admin, "delete_role", json!({"role": "reviewer"}))
        .await
        .ok();

    // Every call rev made is in the trail, denied ones as denied.
    let trail = call(
        &admin,
        "read_audit",
        json!({"identity": "token:rev", "limit": 1000}),
    )
    .await
    .ok();
    let rows = trail["records"].as_array().unwrap();
    let denied = rows.iter().filter(|r| r["outcome"] == "denied").count();
    assert!(denied >= 7, "{rows:#?}");

    // Grants go with their VM: a new VM of the same name is not granted.
    let grants = call(&admin, "list_grants", json!({})).await.ok();
    assert_eq!(grants["grants"][0]["identity"], "token:dev2", "{grants}");
    call(&admin, "destroy_vm", json!({"vm": "d1"})).await.ok();
    let grants = call(&admin, "list_grants", json!({})).await.ok();
    assert!(grants["grants"].as_array().unwrap().is_empty(), "{grants}");
    call(&dev, "spawn_vm", json!({"name": "d1", "memory_mib": 128}))
        .await
        .ok();
    let err = call(&dev2, "get_vm", json!({"vm": "d1"})).await.err();
    assert!(
        err.contains("does not exist among yours (token:dev2)"),
        "{err}"
    );
    call(&dev, "destroy_vm", json!({"vm": "d1"})).await.ok();
    for client in [dev, rev, dev2] {
        client.cancel().await.unwrap();
    }
    for client in [dev_watch, rev_watch] {
        client.cancel().await.unwrap();
    }
    admin.cancel().await.unwrap();
    assert!(serve.stop().await.success());
}

/// The Python client meets every refusal over HTTP (tokens missing,
/// unknown, revoked, expired; a tool the role does not allow; another's
/// VM by prefix, argument and snapshot reference; a quota), and a second
/// local user (uid 65534, in the socket's group) is a plain user on the
/// admin socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_meets_each_refusal_over_http_and_as_another_local_user() {
    if !can_run() {
        return;
    }
    const NOBODY: u32 = 65534;
    let (image_dir, _) = ensure_minimal_image().unwrap();
    let state = State::new();
    state.with_image("default", &image_dir);
    // The state directory is owner-only: the shared socket lives beside it.
    let shared = tempfile::Builder::new()
        .prefix("nxs")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(
        shared.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let socket = shared.path().join("nexusd.sock");
    let (serve, url) = common::serve_with(
        &state,
        &format!(
            "admin_socket = {:?}\nadmin_socket_group = {NOBODY}\n",
            socket.display().to_string()
        ),
    )
    .await;
    let mode = std::fs::metadata(&socket).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o660
    );
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&mode), NOBODY);

    let admin = ().serve(state.http(url.clone())).await.unwrap();
    call(
        &admin,
        "spawn_vm",
        json!({"name": "rootvm", "memory_mib": 128}),
    )
    .await
    .ok();
    let seen = python_script(
        "identities.py",
        &["socket", &socket.display().to_string()],
        Some(NOBODY),
    )
    .await;
    assert_eq!(seen["uid"], NOBODY);
    let seen = python_script("identities.py", &["http", &url, &state.admin_token()], None).await;
    assert_eq!(seen["denied"]["py-reader"], 12, "{seen}");

    // The second local user's calls are in the trail, by uid and socket.
    let trail = call(
        &admin,
        "read_audit",
        json!({"identity": format!("uid:{NOBODY}"), "limit": 1000}),
    )
    .await
    .ok();
    let rows = trail["records"].as_array().unwrap();
    assert_eq!(
        rows.iter().filter(|r| r["outcome"] == "denied").count(),
        3,
        "{rows:#?}"
    );
    assert!(
        rows.iter().all(|r| r["transport"] == "admin-socket"),
        "{rows:#?}"
    );
    let vm = call(&admin, "get_vm", json!({"vm": "rootvm"})).await.ok();
    assert_eq!(vm["state"], "running");
    call(&admin, "destroy_vm", json!({"vm": "rootvm"}))
        .await
        .ok();
    admin.cancel().await.unwrap();
    assert!(serve.stop().await.success());
}
