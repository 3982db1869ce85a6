//! OCI images the tests make: layouts and `docker save` archives of
//! hand-written layers (hostile ones included: the tar builder itself
//! would refuse `..`).

#![allow(clippy::unwrap_used)] // test support: a panic is the failure report

use std::io::Write;
use std::path::Path;

use serde_json::json;
use sha2::{Digest, Sha256};

/// A layer: (path, content); a path ending in `/` is a directory, a
/// content `=>TARGET` a hard link to TARGET, `->TARGET` a symlink.
pub fn layer(entries: &[(&str, &str)]) -> (Vec<u8>, String) {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, content) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        if let Some(target) = content.strip_prefix("->") {
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_mode(0o777);
            header.set_size(0);
            let link = &mut header.as_old_mut().linkname;
            link[..target.len()].copy_from_slice(target.as_bytes());
        } else if let Some(target) = content.strip_prefix("=>") {
            header.set_entry_type(tar::EntryType::Link);
            header.set_mode(0o644);
            header.set_size(0);
            let link = &mut header.as_old_mut().linkname;
            link[..target.len()].copy_from_slice(target.as_bytes());
        } else if path.ends_with('/') {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
        } else {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(0o644);
            header.set_size(content.len() as u64);
        }
        // Raw name bytes: the builder itself refuses `..`, which a
        // hostile layer may well hold.
        let name = &mut header.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        header.set_cksum();
        let body = if content.starts_with("=>") {
            ""
        } else {
            content
        };
        builder.append(&header, body.as_bytes()).unwrap();
    }
    let tar = builder.into_inner().unwrap();
    let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(&tar)));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    (gz.finish().unwrap(), diff_id)
}

fn blob(layout: &Path, bytes: &[u8]) -> (String, usize) {
    let hex = hex::encode(Sha256::digest(bytes));
    std::fs::write(layout.join("blobs/sha256").join(&hex), bytes).unwrap();
    (format!("sha256:{hex}"), bytes.len())
}

/// Writes an OCI layout of `layers` with Env and WorkingDir.
pub fn layout(dir: &Path, layers: &[Vec<(&str, &str)>]) {
    layout_for(dir, layers, "amd64");
}

/// [`layout`] of an image for linux/`arch` (its index names no platform).
pub fn layout_for(dir: &Path, layers: &[Vec<(&str, &str)>], arch: &str) {
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let (mut descriptors, mut diff_ids) = (Vec::new(), Vec::new());
    for entries in layers {
        let (gz, diff_id) = layer(entries);
        let (digest, size) = blob(dir, &gz);
        descriptors.push(json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest, "size": size
        }));
        diff_ids.push(diff_id);
    }
    let config = json!({
        "architecture": arch, "os": "linux",
        "config": {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "FOO=bar baz"], "WorkingDir": "/srv"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    });
    let (config_digest, config_size) = blob(dir, config.to_string().as_bytes());
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": descriptors
    });
    let (manifest_digest, manifest_size) = blob(dir, manifest.to_string().as_bytes());
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": manifest_digest, "size": manifest_size}]
    });
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
}

/// Writes a `docker save` archive (Docker before 25: manifest.json, a
/// config file and one uncompressed tar per layer) of `layers` to `path`.
pub fn docker_archive(path: &Path, layers: &[Vec<(&str, &str)>]) {
    let mut out = tar::Builder::new(std::fs::File::create(path).unwrap());
    let mut add = |name: &str, bytes: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        out.append_data(&mut header, name, bytes).unwrap();
    };
    let (mut names, mut diff_ids) = (Vec::new(), Vec::new());
    for (i, entries) in layers.iter().enumerate() {
        let (gz, diff_id) = layer(entries);
        let mut tar = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut tar).unwrap();
        let name = format!("layer{i}/layer.tar");
        add(&name, &tar);
        names.push(name);
        diff_ids.push(diff_id);
    }
    let config = json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "FOO=from docker"], "WorkingDir": "/srv"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    })
    .to_string();
    let config_name = format!("{}.json", hex::encode(Sha256::digest(config.as_bytes())));
    add(&config_name, config.as_bytes());
    let manifest =
        json!([{"Config": config_name, "RepoTags": ["nexus/test:latest"], "Layers": names}]);
    add("manifest.json", manifest.to_string().as_bytes());
    out.into_inner().unwrap().flush().unwrap();
}
