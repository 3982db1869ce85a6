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
    if matches!(descriptor.media_type(), MediaType::ImageIndex) {
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
    std::fs::create_dir_all(stage).map_err(|e| BuildError::io("create", stage, e))?;
    for (i, layer) in manifest.layers().iter().enumerate() {
        progress!(
            "oci: layer {}/{} ({} MiB)",
            i + 1,
            manifest.layers().len(),
            layer.size() >> 20
        );
        let path = blob_path(layout, layer)?;
        let mut hasher = Sha256::new();
        std::io::copy(&mut blob_file(&path, layer)?, &mut hasher)
            .map_err(|e| BuildError::io("read", &path, e))?;
        if hex::encode(hasher.finalize()) != layer.digest().digest() {
            return Err(bad(format!(
                "layer {} does not match its digest",
                layer.digest()
            )));
        }
        let gzip = match layer.media_type() {
            MediaType::ImageLayer => false,
            MediaType::ImageLayerGzip => true,
            MediaType::Other(t) if t == "application/vnd.docker.image.rootfs.diff.tar.gzip" => true,
            other => return Err(bad(format!("layer media type {other} is not supported"))),
        };
        let label = layer.digest().to_string();
        // Deletions first (whiteouts, opaque directories) apply to the
        // layers below; then the entries.
        apply_whiteouts(&mut archive(&path, gzip)?, stage, &label)?;
        extract(&mut archive(&path, gzip)?, stage, &label)?;
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

fn archive(path: &Path, gzip: bool) -> Result<tar::Archive<Box<dyn Read>>, BuildError> {
    let file = blob_reader(path)?;
    let reader: Box<dyn Read> = if gzip {
        Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)))
    } else {
        Box::new(std::io::BufReader::new(file))
    };
    Ok(tar::Archive::new(reader))
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

fn extract(
    archive: &mut tar::Archive<Box<dyn Read>>,
    stage: &Path,
    layer: &str,
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
