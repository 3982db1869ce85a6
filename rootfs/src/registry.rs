//! Pulling an image from an OCI distribution registry (oci-client) into
//! an OCI image layout, byte for byte: the manifest (or index) as the
//! registry serves it, so the image keeps its digest, and every blob
//! checked against its digest (by oci-client as it streams, and again
//! when the layout is unpacked).

use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt as _;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde_json::Value;
use tokio::io::AsyncWriteExt as _;

use crate::BuildError;

/// The largest manifest or index accepted (they are JSON documents).
const MAX_DOCUMENT: usize = 4 << 20;
/// The most layers an image may have.
const MAX_LAYERS: usize = 256;
/// The most an image's config and layers may hold together.
const MAX_IMAGE_BYTES: u64 = 32 << 30;

fn bad(why: impl Into<String>) -> BuildError {
    BuildError::Oci { why: why.into() }
}

/// Checks a reference's form (`registry/repository[:tag][@digest]`).
pub fn parse_reference(reference: &str) -> Result<Reference, BuildError> {
    reference.parse().map_err(|e| {
        bad(format!(
            "{reference:?} is not an image reference (REGISTRY/REPOSITORY[:TAG][@sha256:DIGEST]): {e}"
        ))
    })
}

/// Pulls `reference` into a new OCI layout at `layout`; `plain_http`
/// speaks HTTP instead of HTTPS (a registry on loopback). Returns the
/// digest of what the reference named (a manifest or an index).
pub async fn pull_to_layout(
    reference: &str,
    layout: &Path,
    plain_http: bool,
) -> Result<String, BuildError> {
    let image = parse_reference(reference)?;
    let client = Client::new(ClientConfig {
        protocol: if plain_http {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        connect_timeout: Some(Duration::from_secs(10)),
        read_timeout: Some(Duration::from_secs(60)),
        ..ClientConfig::default()
    });
    let auth = RegistryAuth::Anonymous;
    let registry = image.registry().to_owned();
    let failed = |what: &str, e: oci_client::errors::OciDistributionError| {
        bad(format!("pulling {reference} from {registry}: {what}: {e}"))
    };
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(|e| BuildError::io("create", &blobs, e))?;
    let accepted = [
        OCI_IMAGE_MEDIA_TYPE,
        OCI_IMAGE_INDEX_MEDIA_TYPE,
        IMAGE_MANIFEST_MEDIA_TYPE,
        IMAGE_MANIFEST_LIST_MEDIA_TYPE,
    ];
    crate::report_progress(&format!("registry: {reference}: manifest"));
    let (top, top_digest) = client
        .pull_manifest_raw(&image, &auth, &accepted)
        .await
        .map_err(|e| failed("manifest", e))?;
    let top_value = document(&top, &blobs, &top_digest)?;
    let top_type = media_type(&top_value);
    // An index: its linux/amd64 image, kept beside it in the layout.
    let manifest = if top_value.get("manifests").is_some() {
        let chosen = pick(&top_value)?;
        let (bytes, digest) = client
            .pull_manifest_raw(&image.clone_with_digest(chosen.clone()), &auth, &accepted)
            .await
            .map_err(|e| failed("manifest", e))?;
        if digest != chosen {
            return Err(bad(format!(
                "the registry served {digest} for manifest {chosen}"
            )));
        }
        document(&bytes, &blobs, &digest)?
    } else {
        top_value
    };
    let mut wanted = vec![descriptor(&manifest["config"], "config")?];
    let layers = manifest["layers"]
        .as_array()
        .ok_or_else(|| bad("the manifest has no layers"))?;
    if layers.len() > MAX_LAYERS {
        return Err(bad(format!(
            "the manifest has {} layers (at most {MAX_LAYERS})",
            layers.len()
        )));
    }
    for layer in layers {
        wanted.push(descriptor(layer, "layer")?);
    }
    let total: u64 = wanted.iter().map(|(_, size)| size).sum();
    if total > MAX_IMAGE_BYTES {
        return Err(bad(format!(
            "the image is {} MiB: at most {} MiB",
            total >> 20,
            MAX_IMAGE_BYTES >> 20
        )));
    }
    for (i, (digest, size)) in wanted.iter().enumerate() {
        let hex = digest_hex(digest)?;
        let path = blobs.join(hex);
        if i > 0 {
            crate::report_progress(&format!(
                "registry: layer {i}/{} ({} MiB)",
                wanted.len() - 1,
                size >> 20
            ));
        }
        // Streamed (oci-client checks the digest at its end) and held to
        // the descriptor's size as it comes: a registry cannot fill the disk.
        let mut stream = client
            .pull_blob_stream(&image, digest.as_str())
            .await
            .map_err(|e| failed(&format!("blob {digest}"), e))?;
        let mut file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| BuildError::io("create", &path, e))?;
        let mut got = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| bad(format!("pulling blob {digest}: {e}")))?;
            got += chunk.len() as u64;
            if got > *size {
                return Err(bad(format!(
                    "blob {digest} is larger than its descriptor's {size} bytes"
                )));
            }
            file.write_all(&chunk)
                .await
                .map_err(|e| BuildError::io("write", &path, e))?;
        }
        file.flush()
            .await
            .map_err(|e| BuildError::io("write", &path, e))?;
        if got != *size {
            return Err(bad(format!(
                "blob {digest} is {got} bytes, its descriptor says {size}"
            )));
        }
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": top_type, "digest": top_digest, "size": top.len()}],
    });
    let write = |name: &str, bytes: &[u8]| {
        let path = layout.join(name);
        std::fs::write(&path, bytes).map_err(|e| BuildError::io("write", &path, e))
    };
    write("index.json", index.to_string().as_bytes())?;
    write("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(top_digest)
}

/// A manifest or index as served: bounded, stored as a blob, parsed.
fn document(bytes: &[u8], blobs: &Path, digest: &str) -> Result<Value, BuildError> {
    if bytes.len() > MAX_DOCUMENT {
        return Err(bad(format!("manifest {digest} is too large")));
    }
    let path = blobs.join(digest_hex(digest)?);
    std::fs::write(&path, bytes).map_err(|e| BuildError::io("write", &path, e))?;
    serde_json::from_slice(bytes).map_err(|e| bad(format!("manifest {digest}: {e}")))
}

/// A manifest's or index's media type: as it says, else what its shape is.
fn media_type(value: &Value) -> String {
    match value["mediaType"].as_str() {
        Some(t) => t.to_owned(),
        None if value.get("manifests").is_some() => OCI_IMAGE_INDEX_MEDIA_TYPE.to_owned(),
        None => OCI_IMAGE_MEDIA_TYPE.to_owned(),
    }
}

/// The linux/amd64 manifest an index names.
fn pick(index: &Value) -> Result<String, BuildError> {
    let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
    let fits = |m: &&Value| {
        m["platform"]["os"].as_str() == Some("linux")
            && m["platform"]["architecture"].as_str() == Some("amd64")
    };
    let mut fitting = manifests.iter().filter(fits);
    match (fitting.next(), fitting.next()) {
        (Some(one), None) => {
            let digest = one["digest"]
                .as_str()
                .ok_or_else(|| bad("the index's linux/amd64 entry has no digest"))?;
            digest_hex(digest)?;
            Ok(digest.to_owned())
        }
        (None, _) => Err(bad("the image has no linux/amd64 variant")),
        (Some(_), Some(_)) => Err(bad("the index names several linux/amd64 images")),
    }
}

/// (digest, size) of a descriptor.
fn descriptor(value: &Value, what: &str) -> Result<(String, u64), BuildError> {
    match (value["digest"].as_str(), value["size"].as_u64()) {
        (Some(digest), Some(size)) => {
            digest_hex(digest)?;
            Ok((digest.to_owned(), size))
        }
        _ => Err(bad(format!("the manifest's {what} lacks a digest or size"))),
    }
}

/// The hex of a sha256 digest; anything else is refused (it becomes a
/// file name).
fn digest_hex(digest: &str) -> Result<&str, BuildError> {
    match digest.strip_prefix("sha256:") {
        Some(hex) if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) => Ok(hex),
        _ => Err(bad(format!("unsupported digest {digest:?}: only sha256"))),
    }
}
