//! nexusd over stdio, driven by rmcp's client as an agent harness would.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;
use rmcp::transport::TokioChildProcess;
use tokio::process::Command;

fn write_image(dir: &std::path::Path, name: &str, kernel: &str) {
    let image = dir.join("images").join(name);
    std::fs::create_dir_all(&image).unwrap();
    std::fs::write(image.join("rootfs.ext4"), vec![0u8; 4096]).unwrap();
    let manifest = serde_json::json!({
        "name": name,
        "kernel_version": kernel,
        "kernel_config_digest": "0",
        "kernel_source": "test",
        "guest_mcp_version": "0.1.0",
        "built_at": "2026-11-24T00:00:00Z",
        "inputs_digest": "0",
        "boot": { "cmdline": "root=/dev/vda", "acpi": false },
        "files": { "rootfs.ext4": { "size": 4096, "sha256": "0" } }
    });
    std::fs::write(image.join("manifest.json"), manifest.to_string()).unwrap();
}

#[tokio::test]
async fn list_images_over_stdio_shows_the_state_dirs_images() {
    let state = tempfile::tempdir().unwrap();
    write_image(state.path(), "default", "6.1.192-nexus");
    write_image(state.path(), "other", "6.1.0-test");
    // A directory without a manifest is not an image.
    std::fs::create_dir_all(state.path().join("images/broken")).unwrap();

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nexusd"));
    cmd.arg("--state-dir").arg(state.path()).arg("stdio");
    let client = ().serve(TokioChildProcess::new(cmd).unwrap()).await.unwrap();
    let info = client.peer_info().unwrap();
    assert_eq!(info.server_info.as_ref().unwrap().name, "nexusd");

    let tools = client.list_all_tools().await.unwrap();
    assert!(tools.iter().any(|t| t.name == "list_images"));
    let result = client
        .call_tool(CallToolRequestParams::new("list_images"))
        .await
        .unwrap();
    let images = &result.structured_content.unwrap()["images"];
    let names: Vec<&str> = images
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default", "other"]);
    assert_eq!(images[0]["kernel_version"], "6.1.192-nexus");
    assert_eq!(images[0]["size_bytes"], 4096);
    client.cancel().await.unwrap();
}
