//! The default image (rootfs/recipes/default.toml, a Debian userland) is
//! an agent's computer: through
//! nexusd's tools, Python (and a venv), git, Node, a C toolchain, make and
//! a pseudo-terminal work in /workspace, with the image's environment.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::{State, call, can_run};
use nexus_integration::ensure_default_image;
use rmcp::ServiceExt;
use serde_json::{Value, json};

async fn sh(client: &rmcp::service::RunningService<rmcp::RoleClient, ()>, command: &str) -> Value {
    let out = call(
        client,
        "box__exec",
        json!({"command": command, "timeout_s": 120}),
    )
    .await
    .ok();
    assert_eq!(out["exit_code"], 0, "{command}: {out}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_debian_userland_runs_what_agents_reach_for() {
    if !can_run() {
        return;
    }
    let (image_dir, manifest) = ensure_default_image().unwrap();
    assert_eq!(manifest.userland, "debian bookworm");
    let state = State::new();
    state.with_image("default", &image_dir);
    let (serve, url) = common::serve(&state).await;
    let client = ().serve(state.http(url)).await.unwrap();
    call(
        &client,
        "spawn_vm",
        json!({"name": "box", "memory_mib": 1024}),
    )
    .await
    .ok();

    // The image's environment, in /workspace.
    let out = sh(
        &client,
        "echo \"$LANG $HOME $(pwd)\"; for t in python3 node gcc jq rg; do command -v $t; done",
    )
    .await;
    let stdout = out["stdout"].as_str().unwrap();
    assert!(
        stdout.starts_with("C.UTF-8 /workspace /workspace\n"),
        "{stdout}"
    );
    for tool in ["python3", "node", "gcc", "jq", "rg"] {
        assert!(
            stdout.contains(&format!("/usr/bin/{tool}")),
            "{tool}: {stdout}"
        );
    }
    let out = sh(&client, "python3 -c 'print(sum(i * i for i in range(10)))'").await;
    assert_eq!(out["stdout"], "285\n");
    let out = sh(
        &client,
        "python3 -m venv venv && venv/bin/python -c 'import sys; print(sys.prefix)'",
    )
    .await;
    assert_eq!(out["stdout"], "/workspace/venv\n");
    let out = sh(
        &client,
        "git init -q repo && cd repo && echo hi > a && git add a \
         && git -c user.name=agent -c user.email=a@b commit -qm first && git log --format=%s",
    )
    .await;
    assert_eq!(out["stdout"], "first\n");
    let out = sh(&client, "node -e 'console.log(6 * 7)'").await;
    assert_eq!(out["stdout"], "42\n");
    call(
        &client,
        "box__write_file",
        json!({"path": "c/hello.c", "create_parents": true, "content": "#include <stdio.h>\nint main(void) { printf(\"hello %d\\n\", 6 * 7); return 0; }\n"}),
    )
    .await
    .ok();
    call(
        &client,
        "box__write_file",
        json!({"path": "c/Makefile", "content": "hello: hello.c\n\tcc -O2 -o hello hello.c\n"}),
    )
    .await
    .ok();
    let out = sh(&client, "cd c && make -s && ./hello").await;
    assert_eq!(out["stdout"], "hello 42\n");
    let out = sh(&client, "script -qc tty /dev/null").await;
    assert!(
        out["stdout"].as_str().unwrap().contains("/dev/pts/"),
        "{out}"
    );
    let out = sh(&client, "echo '{\"a\": [1, 2]}' | jq -c '.a | add'").await;
    assert_eq!(out["stdout"], "3\n");
    // The kernel has what such tools expect: entropy from the host,
    // namespaces (a user namespace run as root), seccomp, overlayfs, FUSE.
    let out = sh(
        &client,
        "cat /sys/class/misc/hw_random/rng_current; \
         unshare --user --map-root-user --pid --fork --mount-proc sh -c 'id -u; echo $$'; \
         grep -E '^Seccomp:' /proc/self/status; \
         grep -wE 'overlay|fuse' /proc/filesystems | awk '{print $NF}' | sort",
    )
    .await;
    assert_eq!(
        out["stdout"],
        "virtio_rng.0\n0\n1\nSeccomp:\t0\nfuse\noverlay\n"
    );

    call(&client, "destroy_vm", json!({"vm": "box"})).await.ok();
    client.cancel().await.unwrap();
    assert!(serve.stop().await.success());
}
