//! An OCI image layout as a root filesystem: its manifest's layers applied
//! in order (whiteouts delete what lower layers put, opaque directories
//! hide it all), every blob checked against its digest, and no entry
//! allowed outside the root. The config's Env, WorkingDir and User become
//! the image's defaults for commands.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType};
use sha2::{Digest as _, Sha256};

use crate::BuildError;

/// What an OCI image says about running its commands.
#[derive(Debug, Clone, Default)]
pub struct OciDefaults {
    /// `KEY=value` pairs, in order.
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    /// The manifest's digest (`sha256:...`): which image this is.
    pub manifest_digest: String,
}

fn bad(why: impl Into<String>) -> BuildError {
    BuildError::Oci { why: why.into() }
}

/// The manifest `layout` names (one image, or one for linux/amd64).
fn manifest_of(layout: &Path) -> Result<(ImageManifest, String), BuildError> {
    if !layout.join("oci-layout").is_file() {
        return Err(bad(format!(
            "{} is not an OCI image layout (no oci-layout file)",
            layout.display()
        )));
    }
    let index = ImageIndex::from_reader(blob_reader(&layout.join("index.json"))?)
        .map_err(|e| bad(format!("index.json: {e}")))?;
    let mut descriptor = pick(index.manifests())?;
    // A manifest list (an index) one level down.
    let docker_list = "application/vnd.docker.distribution.manifest.list.v2+json";
    if matches!(descriptor.media_type(), MediaType::ImageIndex)
        || matches!(descriptor.media_type(), MediaType::Other(t) if t == docker_list)
    {
        let nested = ImageIndex::from_reader(&read_blob(layout, &descriptor)?[..])
            .map_err(|e| bad(format!("nested index: {e}")))?;
        descriptor = pick(nested.manifests())?;
    }
    let bytes = read_blob(layout, &descriptor)?;
    let manifest =
        ImageManifest::from_reader(&bytes[..]).map_err(|e| bad(format!("manifest: {e}")))?;
    Ok((manifest, descriptor.digest().to_string()))
}

fn pick(manifests: &[Descriptor]) -> Result<Descriptor, BuildError> {
    let amd64 = |d: &&Descriptor| {
        d.platform().as_ref().is_none_or(|p| {
            p.architecture().to_string() == "amd64" && p.os().to_string() == "linux"
        })
    };
    let mut fitting = manifests.iter().filter(amd64);
    match (fitting.next(), fitting.next()) {
        (Some(one), None) => Ok(one.clone()),
        (None, _) => Err(bad("the layout has no image for linux/amd64")),
        (Some(_), Some(_)) => Err(bad(
            "the layout holds several images: import a layout of one",
        )),
    }
}

fn blob_reader(path: &Path) -> Result<std::fs::File, BuildError> {
    std::fs::File::open(path).map_err(|e| BuildError::io("open", path, e))
}

fn blob_path(layout: &Path, descriptor: &Descriptor) -> Result<PathBuf, BuildError> {
    let digest = descriptor.digest();
    let (algorithm, hex) = (digest.algorithm().to_string(), digest.digest().to_owned());
    if algorithm != "sha256" || hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad(format!("unsupported digest {digest}: only sha256")));
    }
    Ok(layout.join("blobs/sha256").join(hex))
}

/// The largest index, manifest or config read (they are JSON documents).
const MAX_DOCUMENT: u64 = 4 << 20;

/// A blob file: a regular file of the size its descriptor says.
fn blob_file(path: &Path, descriptor: &Descriptor) -> Result<std::fs::File, BuildError> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| BuildError::io("stat", path, e))?;
    if !meta.is_file() || meta.len() != descriptor.size() {
        return Err(bad(format!(
            "blob {} is not a regular file of {} bytes",
            descriptor.digest(),
            descriptor.size()
        )));
    }
    blob_reader(path)
}

/// A small blob (index, manifest, config), checked against its digest.
fn read_blob(layout: &Path, descriptor: &Descriptor) -> Result<Vec<u8>, BuildError> {
    let path = blob_path(layout, descriptor)?;
    if descriptor.size() > MAX_DOCUMENT {
        return Err(bad(format!("blob {} is too large", descriptor.digest())));
    }
    let mut bytes = Vec::new();
    blob_file(&path, descriptor)?
        .read_to_end(&mut bytes)
        .map_err(|e| BuildError::io("read", &path, e))?;
    if hex::encode(Sha256::digest(&bytes)) != descriptor.digest().digest() {
        return Err(bad(format!(
            "blob {} does not match its digest",
            descriptor.digest()
        )));
    }
    Ok(bytes)
}

/// The digest of the manifest `layout` holds: which image it is.
pub fn manifest_digest(layout: &Path) -> Result<String, BuildError> {
    Ok(manifest_of(layout)?.1)
}

/// Unpacks the image of `layout` into `stage`; returns its defaults.
pub fn unpack(layout: &Path, stage: &Path) -> Result<OciDefaults, BuildError> {
    let (manifest, manifest_digest) = manifest_of(layout)?;
    let config_bytes = read_blob(layout, manifest.config())?;
    let config = ImageConfiguration::from_reader(&config_bytes[..])
        .map_err(|e| bad(format!("config: {e}")))?;
    // A layout whose index names no platform is taken at its config's word.
    let (arch, os) = (config.architecture().to_string(), config.os().to_string());
    if arch != "amd64" || os != "linux" {
        return Err(bad(format!(
            "the image is for {os}/{arch}: VMs here run linux/amd64"
        )));
    }
    std::fs::create_dir_all(stage).map_err(|e| BuildError::io("create", stage, e))?;
    let mut unpacked = 0u64;
    for (i, layer) in manifest.layers().iter().enumerate() {
        progress!(
            "oci: layer {}/{} ({} MiB)",
            i + 1,
            manifest.layers().len(),
            layer.size() >> 20
        );
        let path = blob_path(layout, layer)?;
        // One open file for the hash and both passes: what was checked is
        // what is unpacked, whatever happens to the path meanwhile.
        let mut blob = blob_file(&path, layer)?;
        let mut hasher = Sha256::new();
        std::io::copy(&mut blob, &mut hasher).map_err(|e| BuildError::io("read", &path, e))?;
        if hex::encode(hasher.finalize()) != layer.digest().digest() {
            return Err(bad(format!(
                "layer {} does not match its digest",
                layer.digest()
            )));
        }
        let packing = match layer.media_type() {
            MediaType::ImageLayer => Packing::Tar,
            MediaType::ImageLayerGzip => Packing::Gzip,
            MediaType::ImageLayerZstd => Packing::Zstd,
            MediaType::Other(t) if t == DOCKER_LAYER_GZIP => Packing::Gzip,
            MediaType::Other(t) if t == DOCKER_LAYER_TAR => Packing::Tar,
            other => {
                return Err(bad(format!(
                    "layer media type {other} is not supported (tar, tar+gzip, tar+zstd)"
                )));
            }
        };
        let label = layer.digest().to_string();
        // Deletions first (whiteouts, opaque directories) apply to the
        // layers below; then the entries.
        apply_whiteouts(&mut archive(&blob, &path, packing)?, stage, &label)?;
        extract(
            &mut archive(&blob, &path, packing)?,
            stage,
            &label,
            &mut unpacked,
        )?;
    }
    let mut defaults = OciDefaults {
        manifest_digest,
        ..OciDefaults::default()
    };
    if let Some(c) = config.config() {
        for pair in c.env().iter().flatten() {
            if let Some((k, v)) = pair.split_once('=') {
                defaults.env.push((k.to_owned(), v.to_owned()));
            }
        }
        defaults.workdir = c.working_dir().clone().filter(|w| !w.is_empty());
        defaults.user = c.user().clone().filter(|u| !u.is_empty());
    }
    Ok(defaults)
}

const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";

/// How a layer's tar is packed.
#[derive(Debug, Clone, Copy)]
enum Packing {
    Tar,
    Gzip,
    Zstd,
}

/// A tar reader over `blob` from its start (a clone of the same open file).
fn archive(
    blob: &std::fs::File,
    path: &Path,
    packing: Packing,
) -> Result<tar::Archive<Box<dyn Read>>, BuildError> {
    use std::io::Seek;
    let mut file = blob
        .try_clone()
        .map_err(|e| BuildError::io("reopen", path, e))?;
    file.rewind().map_err(|e| BuildError::io("seek", path, e))?;
    let file = std::io::BufReader::new(file);
    let reader: Box<dyn Read> = match packing {
        Packing::Tar => Box::new(file),
        Packing::Gzip => Box::new(flate2::read::GzDecoder::new(file)),
        Packing::Zstd => Box::new(
            ruzstd::decoding::StreamingDecoder::new(file)
                .map_err(|e| bad(format!("{}: not zstd: {e}", path.display())))?,
        ),
    };
    Ok(tar::Archive::new(reader))
}

/// The most entries an image archive may hold.
const MAX_ARCHIVE_ENTRIES: usize = 100_000;

/// Opens an image archive (`docker save` or `skopeo copy oci-archive:`):
/// unpacks its plain files into `into` and returns the OCI layout there.
/// A Docker archive (`manifest.json` naming a config and layer tars, as
/// Docker before 25 writes) is made into a layout of the same layers.
pub fn layout_from_archive(tar_path: &Path, into: &Path) -> Result<PathBuf, BuildError> {
    let file = blob_reader(tar_path)?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    let raw = into.join("archive");
    std::fs::create_dir_all(&raw).map_err(|e| BuildError::io("create", &raw, e))?;
    let label = tar_path.display().to_string();
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("{label}: not a tar archive: {e}")))?;
    for (count, entry) in entries.enumerate() {
        if count >= MAX_ARCHIVE_ENTRIES {
            return Err(bad(format!(
                "{label}: more than {MAX_ARCHIVE_ENTRIES} entries"
            )));
        }
        let mut entry = entry.map_err(|e| {
            bad(format!(
                "{label} is not an image archive (a tar from docker save or oci-archive): {e}"
            ))
        })?;
        let kind = entry.header().entry_type();
        // An image archive holds files and directories; links and devices
        // are left out (nothing in one needs them).
        if !(kind.is_file() || kind.is_dir()) {
            continue;
        }
        let path = entry
            .path()
            .map_err(|e| bad(format!("{label}: {e}")))?
            .into_owned();
        let rel = inside(&path, &label)?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let dest = raw.join(&rel);
        if kind.is_dir() {
            std::fs::create_dir_all(&dest).map_err(|e| BuildError::io("create", &dest, e))?;
            continue;
        }
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| BuildError::io("create", parent, e))?;
        }
        let mut out =
            std::fs::File::create(&dest).map_err(|e| BuildError::io("create", &dest, e))?;
        std::io::copy(&mut entry, &mut out).map_err(|e| BuildError::io("write", &dest, e))?;
    }
    if raw.join("oci-layout").is_file() {
        return Ok(raw);
    }
    if raw.join("manifest.json").is_file() {
        return layout_from_docker(&raw, &into.join("layout"));
    }
    Err(bad(format!(
        "{label} is neither an OCI archive (no oci-layout) nor a `docker save` archive (no manifest.json)"
    )))
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerImage {
    config: String,
    layers: Vec<String>,
}

/// A Docker archive's one image as an OCI layout in `layout`.
fn layout_from_docker(raw: &Path, layout: &Path) -> Result<PathBuf, BuildError> {
    let manifest_path = raw.join("manifest.json");
    let text =
        std::fs::read(&manifest_path).map_err(|e| BuildError::io("read", &manifest_path, e))?;
    let images: Vec<DockerImage> = serde_json::from_slice(&text)
        .map_err(|e| bad(format!("docker archive manifest.json: {e}")))?;
    let [image] = &images[..] else {
        return Err(bad(format!(
            "the docker archive holds {} images: save one",
            images.len()
        )));
    };
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(|e| BuildError::io("create", &blobs, e))?;
    // Moves a member into the layout's blobs; returns (digest, size). A
    // member named twice (two images sharing a layer) is moved once.
    let mut placed = std::collections::HashMap::<PathBuf, (String, u64)>::new();
    let mut put = |member: &str| -> Result<(String, u64), BuildError> {
        let from = raw.join(inside(Path::new(member), "docker archive")?);
        if let Some(done) = placed.get(&from) {
            return Ok(done.clone());
        }
        let mut file = blob_reader(&from)?;
        let mut hasher = Sha256::new();
        let size =
            std::io::copy(&mut file, &mut hasher).map_err(|e| BuildError::io("read", &from, e))?;
        let hex = hex::encode(hasher.finalize());
        let to = blobs.join(&hex);
        std::fs::rename(&from, &to).map_err(|e| BuildError::io("move", &from, e))?;
        let done = (format!("sha256:{hex}"), size);
        placed.insert(from, done.clone());
        Ok(done)
    };
    let (config_digest, config_size) = put(&image.config)?;
    let mut layers = Vec::new();
    for member in &image.layers {
        let (digest, size) = put(member)?;
        let mut magic = [0u8; 4];
        let path = blobs.join(digest.trim_start_matches("sha256:"));
        let _ = blob_reader(&path)?.read(&mut magic);
        let media = match magic {
            [0x1f, 0x8b, ..] => "application/vnd.oci.image.layer.v1.tar+gzip",
            [0x28, 0xb5, 0x2f, 0xfd] => "application/vnd.oci.image.layer.v1.tar+zstd",
            _ => "application/vnd.oci.image.layer.v1.tar",
        };
        layers.push(serde_json::json!({"mediaType": media, "digest": digest, "size": size}));
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": layers,
    })
    .to_string();
    let hex = hex::encode(Sha256::digest(manifest.as_bytes()));
    let write = |path: PathBuf, bytes: &[u8]| {
        std::fs::write(&path, bytes).map_err(|e| BuildError::io("write", &path, e))
    };
    write(blobs.join(&hex), manifest.as_bytes())?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": format!("sha256:{hex}"), "size": manifest.len()}],
    });
    write(layout.join("index.json"), index.to_string().as_bytes())?;
    write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    Ok(layout.to_path_buf())
}

/// An entry's path inside the root, or an error if it leaves it.
fn inside(raw: &Path, layer: &str) -> Result<PathBuf, BuildError> {
    let mut out = PathBuf::new();
    for part in raw.components() {
        match part {
            Component::Normal(p) => out.push(p),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(bad(format!(
                    "layer {layer}: entry {} escapes the root",
                    raw.display()
                )));
            }
        }
    }
    Ok(out)
}

fn remove_any(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(path);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
}

fn apply_whiteouts(
    archive: &mut tar::Archive<Box<dyn Read>>,
    stage: &Path,
    layer: &str,
) -> Result<(), BuildError> {
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("layer {layer}: {e}")))?;
    for entry in entries {
        let entry = entry.map_err(|e| bad(format!("layer {layer}: {e}")))?;
        let raw = entry
            .path()
            .map_err(|e| bad(format!("layer {layer}: {e}")))?
            .into_owned();
        let rel = inside(&raw, layer)?;
        let Some(name) = rel.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let parent = rel.parent().unwrap_or(Path::new(""));
        if name == ".wh..wh..opq" {
            // Everything lower layers put in this directory goes; a
            // symlink there is not a directory to empty (this layer's
            // own entry for it replaces it).
            let dir = crate::inroot::resolve(stage, parent, false)?;
            if std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir())
                && let Ok(children) = std::fs::read_dir(&dir)
            {
                for child in children.flatten() {
                    remove_any(&child.path());
                }
            }
        } else if let Some(hidden) = name.strip_prefix(".wh.") {
            if matches!(hidden, "" | "." | "..") {
                return Err(bad(format!(
                    "layer {layer}: whiteout {} names no entry",
                    raw.display()
                )));
            }
            remove_any(&crate::inroot::resolve(stage, &parent.join(hidden), false)?);
        }
    }
    Ok(())
}

/// The most an image's layers may unpack to (a compressed layer can
/// claim far more than it weighs).
const MAX_UNPACKED_BYTES: u64 = 64 << 30;

fn extract(
    archive: &mut tar::Archive<Box<dyn Read>>,
    stage: &Path,
    layer: &str,
    unpacked: &mut u64,
) -> Result<(), BuildError> {
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_overwrite(true);
    archive.set_unpack_xattrs(false);
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("layer {layer}: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("layer {layer}: {e}")))?;
        *unpacked += entry.header().size().unwrap_or(0);
        if *unpacked > MAX_UNPACKED_BYTES {
            return Err(bad(format!(
                "the layers unpack to more than {} GiB",
                MAX_UNPACKED_BYTES >> 30
            )));
        }
        let raw = entry
            .path()
            .map_err(|e| bad(format!("layer {layer}: {e}")))?
            .into_owned();
        let rel = inside(&raw, layer)?;
        if rel
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(".wh."))
            || rel.as_os_str().is_empty()
        {
            continue;
        }
        // A directory over a file, or a file over a directory: the new
        // entry replaces what was there.
        if let Ok(target) = crate::inroot::resolve(stage, &rel, false)
            && let Ok(existing) = std::fs::symlink_metadata(&target)
            && (existing.is_dir() != entry.header().entry_type().is_dir())
        {
            remove_any(&target);
        }
        // A hard link is made here, not by tar: its target must be a file
        // of this root (tar would join an absolute or `..` target outside
        // it, and the host file would end up in the image).
        if entry.header().entry_type() == tar::EntryType::Link {
            let target = entry
                .link_name()
                .map_err(|e| bad(format!("layer {layer}: {e}")))?
                .ok_or_else(|| {
                    bad(format!(
                        "layer {layer}: hard link {} has no target",
                        raw.display()
                    ))
                })?
                .into_owned();
            let to = inside(&target, layer)?;
            let src = crate::inroot::resolve(stage, &to, false)?;
            let dst = crate::inroot::for_writing(stage, &rel)?;
            if !std::fs::symlink_metadata(&src).is_ok_and(|m| m.is_file()) {
                return Err(bad(format!(
                    "layer {layer}: hard link {} to {}: no such file in the image",
                    raw.display(),
                    target.display()
                )));
            }
            remove_any(&dst);
            std::fs::hard_link(&src, &dst).map_err(|e| BuildError::io("link", &dst, e))?;
            continue;
        }
        // unpack_in refuses entries whose path, through symlinks already
        // unpacked, would land outside `stage`.
        let unpacked = entry.unpack_in(stage).map_err(|e| {
            let cause = std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            bad(format!(
                "layer {layer}: entry {}: {e}{cause}",
                raw.display()
            ))
        })?;
        if !unpacked {
            return Err(bad(format!(
                "layer {layer}: entry {} escapes the root",
                raw.display()
            )));
        }
    }
    Ok(())
}
