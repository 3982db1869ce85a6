//! Images through nexusd's tools: built from a recipe, imported from an
//! OCI layout and a `docker save` archive, pulled from a registry on
//! loopback (the same digest as the layout it was copied from), versioned (a rebuilt image
//! serves new VMs while the VMs of the old version keep booting it),
//! deleted only when no VM uses them; bad input changes nothing.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::{State, call, can_run};
use nexus_integration::ensure_minimal_image;
use nexus_integration::oci_fixture::{docker_archive, layout};
use serde_json::{Value, json};

type Client = rmcp::service::RunningService<rmcp::RoleClient, ()>;

async fn sh(client: &Client, vm: &str, command: &str) -> String {
    let out = call(
        client,
        &format!("{vm}__exec"),
        json!({"command": command, "timeout_s": 60}),
    )
    .await
    .ok();
    assert_eq!(out["exit_code"], 0, "{command}: {out}");
    out["stdout"].as_str().unwrap().to_owned()
}

async fn images(client: &Client) -> Vec<Value> {
    call(client, "list_images", json!({})).await.ok()["images"]
        .as_array()
        .unwrap()
        .clone()
}

/// What the pool's image directory holds (one entry per live version).
fn versions(state: &State) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(state.pool().join("images"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_built_versioned_imported_and_deleted_through_nexusd() {
    if !can_run() {
        return;
    }
    let (minimal, _) = ensure_minimal_image().unwrap();
    let state = State::new();
    state.with_image("minimal", &minimal);
    let client = state.client().await;
    let spawn = |name: &'static str, image: &'static str| {
        let client = &client;
        async move {
            call(
                client,
                "spawn_vm",
                json!({"name": name, "image": image, "memory_mib": 128}),
            )
            .await
            .ok()
        }
    };

    // A recipe, built on the minimal image's kernel and guest-mcp.
    let recipe = |greeting: &str| {
        format!(
            "env = {{ GREETING = \"{greeting}\" }}\n\
             [[files]]\npath = \"/etc/motd\"\ncontent = \"{greeting}\\n\"\n"
        )
    };
    let built = call(
        &client,
        "build_image",
        json!({"name": "tiny", "recipe": recipe("hello"), "base": "minimal"}),
    )
    .await
    .ok();
    assert_eq!(built["change"], "added", "{built}");
    let v1 = built["image"]["digest"].as_str().unwrap().to_owned();
    assert!(v1.starts_with("sha256:") && v1.len() == 71, "{v1}");
    assert_eq!(built["image"]["userland"], "busybox");
    assert_eq!(built["image"]["source"], "recipe (busybox)");
    assert_eq!(built["image"]["env"]["GREETING"], "hello");
    let minimal_info = images(&client)
        .await
        .into_iter()
        .find(|i| i["name"] == "minimal")
        .unwrap();
    assert_eq!(
        built["image"]["kernel_version"],
        minimal_info["kernel_version"]
    );
    assert_eq!(
        built["image"]["guest_mcp_version"],
        minimal_info["guest_mcp_version"]
    );

    let vm = spawn("old", "tiny").await;
    assert_eq!(vm["image_digest"], v1.as_str(), "{vm}");
    assert_eq!(
        sh(&client, "old", "echo $GREETING; cat /etc/motd").await,
        "hello\nhello\n"
    );

    // The same recipe again changes nothing.
    let again = call(
        &client,
        "build_image",
        json!({"name": "tiny", "recipe": recipe("hello"), "base": "minimal"}),
    )
    .await
    .ok();
    assert_eq!(again["change"], "unchanged", "{again}");
    assert_eq!(again["image"]["digest"], v1.as_str());

    // A changed recipe: new VMs get it, `old` keeps its version.
    let rebuilt = call(
        &client,
        "build_image",
        json!({"name": "tiny", "recipe": recipe("again"), "base": "minimal"}),
    )
    .await
    .ok();
    assert_eq!(rebuilt["change"], "replaced", "{rebuilt}");
    assert_eq!(rebuilt["previous_digest"], v1.as_str());
    assert_eq!(rebuilt["kept_for"], json!(["old"]));
    let v2 = rebuilt["image"]["digest"].as_str().unwrap().to_owned();
    assert_ne!(v2, v1);
    let vm = spawn("new", "tiny").await;
    assert_eq!(vm["image_digest"], v2.as_str());
    assert_eq!(sh(&client, "new", "cat /etc/motd").await, "again\n");
    call(&client, "stop_vm", json!({"vm": "old"})).await.ok();
    call(&client, "start_vm", json!({"vm": "old"})).await.ok();
    assert_eq!(
        sh(&client, "old", "echo $GREETING; cat /etc/motd").await,
        "hello\nhello\n",
        "a restarted VM boots the version it was made from"
    );
    let listed = images(&client).await;
    let tiny = listed.iter().find(|i| i["name"] == "tiny").unwrap();
    assert_eq!(tiny["digest"], v2.as_str());
    assert_eq!(tiny["vms"], json!(["new", "old"]));
    assert!(tiny["disk_bytes"].as_u64().unwrap() > 0, "{tiny}");

    // In use: refused, naming the VMs; nothing changes.
    let refused = call(&client, "delete_image", json!({"image": "tiny"}))
        .await
        .err();
    assert!(
        refused.contains("tiny") && refused.contains(r#"["new", "old"]"#),
        "{refused}"
    );
    assert_eq!(images(&client).await, listed);

    // The old version is gone with its last VM.
    let before = versions(&state);
    assert_eq!(
        before.iter().filter(|v| v.starts_with("tiny@")).count(),
        2,
        "{before:?}"
    );
    call(&client, "destroy_vm", json!({"vm": "old"})).await.ok();
    let after = versions(&state);
    assert_eq!(
        after.iter().filter(|v| v.starts_with("tiny@")).count(),
        1,
        "{after:?}"
    );

    // An OCI layout: layers in order, a whiteout, an opaque directory,
    // the config's Env and WorkingDir.
    let scratch = tempfile::tempdir().unwrap();
    let layers = vec![
        vec![
            ("data/", ""),
            ("data/keep", "kept\n"),
            ("data/gone", "whited out\n"),
            ("opq/", ""),
            ("opq/old", "hidden\n"),
        ],
        vec![
            ("data/.wh.gone", ""),
            ("opq/", ""),
            ("opq/.wh..wh..opq", ""),
            ("opq/new", "new\n"),
        ],
    ];
    let oci = scratch.path().join("layout");
    layout(&oci, &layers);
    let imported = call(
        &client,
        "import_image",
        json!({"name": "oci", "path": oci.display().to_string(), "base": "minimal"}),
    )
    .await
    .ok();
    assert_eq!(imported["change"], "added", "{imported}");
    assert_eq!(imported["image"]["source"], "OCI layout");
    assert!(
        imported["image"]["userland"]
            .as_str()
            .unwrap()
            .starts_with("oci sha256:")
    );
    spawn("layered", "oci").await;
    assert_eq!(
        sh(&client, "layered", "ls /data /opq; echo \"$FOO\"; pwd").await,
        "/data:\nkeep\n\n/opq:\nnew\nbar baz\n/srv\n"
    );

    // The same layers as a `docker save` archive.
    let archive = scratch.path().join("saved.tar");
    docker_archive(&archive, &layers);
    let saved = call(
        &client,
        "import_image",
        json!({"name": "saved", "path": archive.display().to_string()}),
    )
    .await
    .ok();
    assert_eq!(saved["image"]["source"], "image archive", "{saved}");
    assert_eq!(saved["image"]["env"]["FOO"], "from docker");
    spawn("docker", "saved").await;
    assert_eq!(
        sh(&client, "docker", "ls /data /opq; echo \"$FOO\"; pwd").await,
        "/data:\nkeep\n\n/opq:\nnew\nfrom docker\n/srv\n"
    );

    // Bad input: a clear error, and nothing changes.
    let listed = images(&client).await;
    let pool = versions(&state);
    let escaping = scratch.path().join("escaping");
    layout(
        &escaping,
        &[vec![("ok", "fine\n"), ("../../escaped", "out\n")]],
    );
    let bad: Vec<(Value, &str, &str)> = vec![
        (
            json!({"name": "x", "recipe": "base = \"sid2\""}),
            "build_image",
            "`base` \"sid2\" is not a Debian suite",
        ),
        (
            json!({"name": "x", "recipe": "packages = \"git\""}),
            "build_image",
            "recipe",
        ),
        (
            json!({"name": "x", "recipe": "", "base": "nope"}),
            "build_image",
            "`base` image \"nope\" does not exist",
        ),
        (
            json!({"name": "Bad", "recipe": ""}),
            "build_image",
            "image name \"Bad\" is invalid",
        ),
        (
            json!({"name": "x", "path": "relative/dir"}),
            "import_image",
            "must be absolute",
        ),
        (
            json!({"name": "x", "path": "/nonexistent/layout"}),
            "import_image",
            "/nonexistent/layout",
        ),
        (
            json!({"name": "x", "path": escaping.display().to_string()}),
            "import_image",
            "escapes the root",
        ),
        (
            json!({"name": "x", "path": "/etc/hostname"}),
            "import_image",
            "is not an image archive",
        ),
        (json!({"image": "nope"}), "delete_image", "\"nope\""),
    ];
    for (args, tool, expected) in bad {
        let err = call(&client, tool, args.clone()).await.err();
        assert!(err.contains(expected), "{tool} {args}: {err}");
    }
    // The build's root is <cache>/image-work-*/root: `../../escaped`
    // would have landed in the cache.
    assert!(!nexus_rootfs::default_cache_dir().join("escaped").exists());
    assert_eq!(
        images(&client).await,
        listed,
        "bad input changed the images"
    );
    assert_eq!(versions(&state), pool, "bad input left files in the pool");
    assert!(
        !state.path().join("builds/x").exists(),
        "a failed first build left its directory"
    );

    // Unused, it goes, with its files.
    for vm in ["new", "layered", "docker"] {
        call(&client, "destroy_vm", json!({"vm": vm})).await.ok();
    }
    call(&client, "delete_image", json!({"image": "tiny"}))
        .await
        .ok();
    assert!(!images(&client).await.iter().any(|i| i["name"] == "tiny"));
    assert!(
        !versions(&state).iter().any(|v| v.starts_with("tiny")),
        "{:?}",
        versions(&state)
    );
    client.cancel().await.unwrap();
}

/// The pulls' scratch directories in the shared cache.
fn pull_scratch() -> Vec<std::path::PathBuf> {
    std::fs::read_dir(nexus_rootfs::default_cache_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("pull-"))
        .map(|e| e.path())
        .collect()
}

/// `docker-registry` (Debian's distribution server) on a loopback port,
/// storing in `dir`; killed on drop.
struct Registry {
    child: std::process::Child,
    addr: String,
}

impl Registry {
    fn start(dir: &std::path::Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                dir.join("data").display()
            ),
        )
        .unwrap();
        let child = std::process::Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("docker-registry is missing: scripts/install-deps.sh installs it");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "docker-registry did not listen on {addr}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Self { child, addr }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_pulled_from_a_loopback_registry_is_the_layouts_image() {
    if !can_run() {
        return;
    }
    let (minimal, _) = ensure_minimal_image().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let registry = Registry::start(scratch.path());
    let oci = scratch.path().join("layout");
    layout(
        &oci,
        &[
            vec![("data/", ""), ("data/keep", "kept\n"), ("data/gone", "x\n")],
            vec![("data/.wh.gone", ""), ("data/new", "new\n")],
        ],
    );
    let reference = format!("{}/nexus/test:v1", registry.addr);
    let copied = std::process::Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
        ])
        .arg(format!("oci:{}", oci.display()))
        .arg(format!("docker://{reference}"))
        .output()
        .expect("skopeo is missing: scripts/install-deps.sh installs it");
    assert!(
        copied.status.success(),
        "skopeo copy: {}",
        String::from_utf8_lossy(&copied.stderr)
    );

    let state = State::new();
    state.with_image("minimal", &minimal);
    let client = state.client().await;
    let from_layout = call(
        &client,
        "import_image",
        json!({"name": "local", "path": oci.display().to_string(), "base": "minimal"}),
    )
    .await
    .ok();
    let pulled = call(
        &client,
        "pull_image",
        json!({"name": "pulled", "reference": reference, "plain_http": true, "base": "minimal"}),
    )
    .await
    .ok();
    assert_eq!(pulled["change"], "added", "{pulled}");
    assert_eq!(
        pulled["image"]["source"],
        format!("registry {reference}").as_str()
    );
    // The same OCI image: the same manifest digest.
    assert!(
        pulled["image"]["userland"]
            .as_str()
            .unwrap()
            .starts_with("oci sha256:")
    );
    assert_eq!(
        pulled["image"]["userland"],
        from_layout["image"]["userland"]
    );
    call(
        &client,
        "spawn_vm",
        json!({"name": "p1", "image": "pulled", "memory_mib": 128}),
    )
    .await
    .ok();
    assert_eq!(
        sh(&client, "p1", "ls /data; echo \"$FOO\"; pwd").await,
        "keep\nnew\nbar baz\n/srv\n"
    );

    // Bad references and unreachable registries: clear, and nothing changes.
    let listed = images(&client).await;
    let pool = versions(&state);
    let scratch_before = pull_scratch();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for (args, expected) in [
        (
            json!({"name": "x", "reference": "Not A Reference"}),
            "is not an image reference",
        ),
        (
            json!({"name": "x", "reference": format!("127.0.0.1:{closed}/nexus/test:v1"), "plain_http": true}),
            &*format!("pulling 127.0.0.1:{closed}/nexus/test:v1 from 127.0.0.1:{closed}"),
        ),
        (
            json!({"name": "x", "reference": format!("{}/nexus/test:nope", registry.addr), "plain_http": true}),
            "manifest",
        ),
        (
            json!({"name": "x", "reference": format!("{}/nexus/absent:v1", registry.addr), "plain_http": true}),
            "manifest",
        ),
    ] {
        let err = call(&client, "pull_image", args.clone()).await.err();
        assert!(err.contains(expected), "{args}: {err}");
    }
    assert_eq!(images(&client).await, listed);
    assert_eq!(versions(&state), pool);
    let leftovers: Vec<_> = pull_scratch()
        .into_iter()
        .filter(|p| !scratch_before.contains(p))
        .collect();
    assert!(leftovers.is_empty(), "pull scratch left: {leftovers:?}");
    client.cancel().await.unwrap();
}
