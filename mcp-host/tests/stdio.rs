//! nexusd over stdio, driven by rmcp's client as an agent harness would.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::{State, call, can_run};
use serde_json::json;

fn write_image(dir: &std::path::Path, name: &str, kernel: &str) -> std::path::PathBuf {
    write_image_of(dir, name, kernel, 0)
}

/// An image whose root filesystem's recorded sha256 is `sha`.
fn write_image_of(dir: &std::path::Path, name: &str, kernel: &str, mark: u8) -> std::path::PathBuf {
    let image = dir.join("built").join(name);
    std::fs::create_dir_all(&image).unwrap();
    // Imports check the files against the manifest: its real sha256.
    let rootfs = vec![mark; 4096];
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&rootfs))
    };
    std::fs::write(image.join("rootfs.ext4"), &rootfs).unwrap();
    let manifest = json!({
        "name": name,
        "kernel_version": kernel,
        "kernel_config_digest": "0",
        "kernel_source": "test",
        "guest_mcp_version": "0.1.0",
        "built_at": "2026-11-24T00:00:00Z",
        "inputs_digest": "0",
        "boot": { "cmdline": "root=/dev/vda", "acpi": false },
        "files": { "rootfs.ext4": { "size": 4096, "sha256": sha } }
    });
    std::fs::write(image.join("manifest.json"), manifest.to_string()).unwrap();
    image
}

#[tokio::test]
async fn list_images_over_stdio_shows_the_imported_images() {
    if !can_run() {
        return;
    }
    let state = State::new();
    let built = tempfile::tempdir().unwrap();
    state.with_image(
        "default",
        &write_image(built.path(), "default", "6.1.192-nexus"),
    );
    state.with_image("other", &write_image(built.path(), "other", "6.1.0-test"));
    // A directory without a manifest is not an image.
    std::fs::create_dir_all(state.path().join("images/broken")).unwrap();

    let client = state.client().await;
    let info = client.peer_info().unwrap();
    assert_eq!(info.server_info.as_ref().unwrap().name, "nexusd");
    let tools = client.list_all_tools().await.unwrap();
    for name in [
        "list_images",
        "spawn_vm",
        "list_vms",
        "get_vm",
        "start_vm",
        "stop_vm",
        "destroy_vm",
        "read_console",
    ] {
        assert!(tools.iter().any(|t| t.name == name), "{name} missing");
    }
    let result = call(&client, "list_images", json!({})).await.ok();
    let images = result["images"].as_array().unwrap();
    let names: Vec<&str> = images.iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["default", "other"]);
    assert_eq!(images[0]["kernel_version"], "6.1.192-nexus");
    assert_eq!(images[0]["size_bytes"], 4096);
    // Imported into the pool (a directory per version): the build
    // directory can go.
    let digest = images[0]["digest"].as_str().unwrap().to_owned();
    let other = images[1].clone();
    let hex = &digest["sha256:".len()..];
    let prefix = format!("default@{}-", &hex[..16]);
    let copied: Vec<_> = std::fs::read_dir(state.pool().join("images"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .collect();
    assert_eq!(copied.len(), 1, "{prefix}");
    assert!(copied[0].path().join("rootfs.ext4").is_file());
    client.cancel().await.unwrap();

    // Rebuilt where it was built, it is imported again at the next start;
    // unchanged, it is left as it is.
    write_image_of(built.path(), "default", "6.1.999-rebuilt", 1);
    state.stop_daemon();
    let client = state.client().await;
    let result = call(&client, "list_images", json!({})).await.ok();
    let images = result["images"].as_array().unwrap();
    assert_eq!(images[0]["kernel_version"], "6.1.999-rebuilt");
    assert_ne!(images[0]["digest"], digest.as_str());
    assert_eq!(images[1], other, "an unchanged image is left as it is");

    // Deleted through the tools, it stays deleted across a restart (its
    // directory there is what was imported last).
    call(&client, "delete_image", json!({"image": "other"}))
        .await
        .ok();
    client.cancel().await.unwrap();
    state.stop_daemon();
    let client = state.client().await;
    let result = call(&client, "list_images", json!({})).await.ok();
    let names: Vec<&str> = result["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default"], "a deleted image came back");
    client.cancel().await.unwrap();
}
