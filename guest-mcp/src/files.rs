//! File operations. Large files move in chunks by offset, so guest-mcp never
//! holds a whole large file in memory; whole-file writes are atomic
//! (temporary file in the same directory, then rename).

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Why a file operation failed. Each names the argument or path at fault.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("`{0}` is empty: give a path")]
    EmptyPath(&'static str),
    #[error("`{0}` contains a NUL byte, which no path can hold")]
    NulByte(&'static str),
    #[error("{0} does not exist")]
    NotFound(String),
    #[error("{0} is a directory: {1}")]
    IsDir(String, &'static str),
    #[error("{0} is not a directory")]
    NotDir(String),
    #[error("{0} already exists: set `overwrite` to replace it")]
    Exists(String),
    #[error("{path} is binary (not UTF-8 text{where_}): read it with `encoding: \"base64\"`")]
    Binary { path: String, where_: String },
    #[error(
        "`{arg}` must be at most {max} bytes per call, got {got}: move large files in chunks by offset"
    )]
    TooLarge {
        arg: &'static str,
        got: u64,
        max: u64,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("`old_string` was not found in {0}")]
    EditNotFound(String),
    #[error(
        "`old_string` occurs {count} times in {path}: add surrounding text to make it unique, or set `replace_all`"
    )]
    EditAmbiguous { path: String, count: usize },
    #[error("refusing to remove `/`")]
    RemoveRoot,
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, FileError>;

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FileError + 'a {
    move |source| match source.kind() {
        std::io::ErrorKind::NotFound => FileError::NotFound(path.display().to_string()),
        _ => FileError::Io {
            op,
            path: path.display().to_string(),
            source,
        },
    }
}

/// Resolves a path argument: relative paths are taken from `base` (the
/// workspace in a VM).
pub fn resolve(arg: &'static str, path: &str, base: Option<&Path>) -> Result<PathBuf> {
    if path.is_empty() {
        return Err(FileError::EmptyPath(arg));
    }
    if path.contains('\0') {
        return Err(FileError::NulByte(arg));
    }
    let path = Path::new(path);
    Ok(match base {
        Some(base) if path.is_relative() => base.join(path),
        _ => path.to_path_buf(),
    })
}

/// How `read_file` returns content.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReadEncoding {
    /// UTF-8 text; `offset` and `limit` count lines.
    #[default]
    Text,
    /// Raw bytes in base64; `offset` and `limit` count bytes.
    Base64,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ReadResult {
    pub path: String,
    pub content: String,
    pub encoding: ReadEncoding,
    /// First line (text, 0-based) or byte (base64) returned.
    pub offset: u64,
    /// Lines (text) or bytes (base64) returned.
    pub count: u64,
    /// Pass as `offset` to read on.
    pub next_offset: u64,
    /// Nothing follows what was returned.
    pub eof: bool,
    /// The file's size in bytes.
    pub size: u64,
}

/// Lines returned when `limit` is not given.
pub const DEFAULT_LINES: u64 = 2000;

pub fn read(
    path: &Path,
    encoding: ReadEncoding,
    offset: u64,
    limit: Option<u64>,
    max_bytes: usize,
) -> Result<ReadResult> {
    if encoding == ReadEncoding::Base64
        && let Some(limit) = limit
        && limit > max_bytes as u64
    {
        return Err(FileError::TooLarge {
            arg: "limit",
            got: limit,
            max: max_bytes as u64,
        });
    }
    let meta = std::fs::metadata(path).map_err(io("reading", path))?;
    if meta.is_dir() {
        return Err(FileError::IsDir(path.display().to_string(), "use list_dir"));
    }
    let mut file = std::fs::File::open(path).map_err(io("opening", path))?;
    let shown = path.display().to_string();
    match encoding {
        ReadEncoding::Base64 => {
            let limit = limit.unwrap_or(max_bytes as u64);
            file.seek(SeekFrom::Start(offset))
                .map_err(io("seeking", path))?;
            let mut bytes =
                Vec::with_capacity(limit.min(meta.len().saturating_sub(offset)) as usize);
            file.take(limit)
                .read_to_end(&mut bytes)
                .map_err(io("reading", path))?;
            let count = bytes.len() as u64;
            Ok(ReadResult {
                path: shown,
                content: base64::engine::general_purpose::STANDARD.encode(&bytes),
                encoding,
                offset,
                count,
                next_offset: offset + count,
                eof: offset + count >= meta.len(),
                size: meta.len(),
            })
        }
        ReadEncoding::Text => {
            let limit = limit.unwrap_or(DEFAULT_LINES);
            let mut reader = BufReader::new(file);
            let mut content = String::new();
            let mut line = Vec::new();
            let mut index = 0u64;
            let mut count = 0u64;
            let mut eof = false;
            loop {
                line.clear();
                // At most one chunk's worth of a line is ever held: a file
                // of one endless line (a device, a minified bundle) cannot
                // fill memory.
                let n = (&mut reader)
                    .take(max_bytes as u64 + 1)
                    .read_until(b'\n', &mut line)
                    .map_err(io("reading", path))?;
                if n == 0 {
                    eof = true;
                    break;
                }
                if line.len() > max_bytes && line.last() != Some(&b'\n') {
                    return Err(FileError::TooLarge {
                        arg: "limit",
                        got: line.len() as u64,
                        max: max_bytes as u64,
                    });
                }
                if index >= offset && count == 0 && line.len() > max_bytes {
                    return Err(FileError::TooLarge {
                        arg: "limit",
                        got: line.len() as u64,
                        max: max_bytes as u64,
                    });
                }
                if index >= offset && (count == limit || content.len() + line.len() > max_bytes) {
                    // This line is the first one not returned: more follows.
                    break;
                }
                let text = match std::str::from_utf8(&line) {
                    Ok(text) if !line.contains(&0) => text,
                    _ => {
                        return Err(FileError::Binary {
                            path: shown,
                            where_: format!(" at line {}", index + 1),
                        });
                    }
                };
                if index >= offset {
                    content.push_str(text);
                    count += 1;
                }
                index += 1;
            }
            Ok(ReadResult {
                path: shown,
                content,
                encoding,
                offset,
                count,
                next_offset: offset + count,
                eof,
                size: meta.len(),
            })
        }
    }
}

/// What `write_file` writes.
pub struct WriteRequest<'a> {
    pub data: &'a [u8],
    pub append: bool,
    /// Write at this byte offset, in place, without truncating.
    pub offset: Option<u64>,
    pub mode: Option<u32>,
    pub create_parents: bool,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct WriteResult {
    pub path: String,
    pub bytes_written: u64,
    /// The file's size afterwards.
    pub size: u64,
}

pub fn write(path: &Path, req: WriteRequest<'_>) -> Result<WriteResult> {
    if req.append && req.offset.is_some() {
        return Err(FileError::Invalid(
            "`append` and `offset` cannot be combined: append writes at the end".into(),
        ));
    }
    if let Some(mode) = req.mode
        && mode > 0o7777
    {
        return Err(FileError::Invalid(format!(
            "`mode` {mode:o} is not a permission mode (0 to 7777 octal)"
        )));
    }
    if path.is_dir() {
        return Err(FileError::IsDir(
            path.display().to_string(),
            "write to a file inside it",
        ));
    }
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        if req.create_parents {
            std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
        } else {
            return Err(FileError::NotFound(format!(
                "{} (the parent directory of {}; set `create_parents`)",
                parent.display(),
                path.display()
            )));
        }
    }
    if req.append || req.offset.is_some() {
        let mut options = std::fs::OpenOptions::new();
        options.create(true).write(true).append(req.append);
        if let Some(mode) = req.mode {
            options.mode(mode);
        }
        let mut file = options.open(path).map_err(io("opening", path))?;
        if let Some(offset) = req.offset {
            file.seek(SeekFrom::Start(offset))
                .map_err(io("seeking", path))?;
        }
        file.write_all(req.data).map_err(io("writing", path))?;
        if let Some(mode) = req.mode {
            file.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(io("chmod", path))?;
        }
        let size = file.metadata().map_err(io("stat", path))?.len();
        return Ok(WriteResult {
            path: path.display().to_string(),
            bytes_written: req.data.len() as u64,
            size,
        });
    }
    // Writing through a symlink replaces its target, not the link.
    let resolved = std::fs::canonicalize(path).ok();
    let path = resolved.as_deref().unwrap_or(path);
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // A new mode, or the existing file's, or the usual default.
    let mode = req
        .mode
        .or_else(|| {
            std::fs::metadata(path)
                .ok()
                .map(|m| m.permissions().mode() & 0o7777)
        })
        .unwrap_or(0o644);
    atomic_write(path, parent, req.data, mode)?;
    Ok(WriteResult {
        path: path.display().to_string(),
        bytes_written: req.data.len() as u64,
        size: req.data.len() as u64,
    })
}

fn atomic_write(path: &Path, dir: &Path, data: &[u8], mode: u32) -> Result<()> {
    let mut tmp = tempfile::Builder::new()
        .prefix(".guest-mcp-")
        .tempfile_in(dir)
        .map_err(io("creating a temporary file in", dir))?;
    tmp.write_all(data).map_err(io("writing", path))?;
    tmp.as_file().sync_all().map_err(io("syncing", path))?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io("chmod", path))?;
    tmp.persist(path).map_err(|e| FileError::Io {
        op: "renaming into place",
        path: path.display().to_string(),
        source: e.error,
    })?;
    Ok(())
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct EditResult {
    pub path: String,
    pub replacements: usize,
}

/// Largest file `edit_file` rewrites.
pub const MAX_EDIT_BYTES: u64 = 64 << 20;

pub fn edit(path: &Path, old: &str, new: &str, replace_all: bool) -> Result<EditResult> {
    if old.is_empty() {
        return Err(FileError::Invalid(
            "`old_string` is empty: give the exact text to replace".into(),
        ));
    }
    let meta = std::fs::metadata(path).map_err(io("reading", path))?;
    if meta.is_dir() {
        return Err(FileError::IsDir(
            path.display().to_string(),
            "edit a file inside it",
        ));
    }
    if !meta.is_file() {
        return Err(FileError::Invalid(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    // Replace the link's target, not the link.
    let resolved = std::fs::canonicalize(path).map_err(io("resolving", path))?;
    let path = resolved.as_path();
    if meta.len() > MAX_EDIT_BYTES {
        return Err(FileError::TooLarge {
            arg: "path",
            got: meta.len(),
            max: MAX_EDIT_BYTES,
        });
    }
    let bytes = std::fs::read(path).map_err(io("reading", path))?;
    let text = String::from_utf8(bytes).map_err(|_| FileError::Binary {
        path: path.display().to_string(),
        where_: String::new(),
    })?;
    let count = text.matches(old).count();
    let shown = path.display().to_string();
    match count {
        0 => return Err(FileError::EditNotFound(shown)),
        1 => {}
        _ if !replace_all => return Err(FileError::EditAmbiguous { path: shown, count }),
        _ => {}
    }
    let updated = text.replace(old, new);
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    atomic_write(
        path,
        parent,
        updated.as_bytes(),
        meta.permissions().mode() & 0o7777,
    )?;
    Ok(EditResult {
        path: shown,
        replacements: count,
    })
}

/// What a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FileType {
    File,
    Dir,
    Symlink,
    Other,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct StatResult {
    pub path: String,
    #[serde(rename = "type")]
    pub file_type: FileType,
    pub size: u64,
    /// Permission bits, octal (e.g. "0644").
    pub mode: String,
    /// Last modification, RFC 3339 UTC.
    pub mtime: String,
    pub uid: u32,
    pub gid: u32,
    /// Where a symlink points.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
    /// sha256 of the content, when asked for (files only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

pub fn stat(path: &Path, sha256: bool) -> Result<StatResult> {
    let meta = std::fs::symlink_metadata(path).map_err(io("stat", path))?;
    let file_type = file_type(&meta);
    let sha256 = if sha256 && file_type == FileType::File {
        Some(file_sha256(path)?)
    } else {
        None
    };
    Ok(StatResult {
        path: path.display().to_string(),
        file_type,
        size: meta.len(),
        mode: format!("{:04o}", meta.permissions().mode() & 0o7777),
        mtime: rfc3339(meta.modified().ok()),
        uid: meta.uid(),
        gid: meta.gid(),
        symlink_target: std::fs::read_link(path)
            .ok()
            .map(|t| t.display().to_string()),
        sha256,
    })
}

fn file_sha256(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(io("opening", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io("reading", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

pub fn file_type(meta: &std::fs::Metadata) -> FileType {
    let t = meta.file_type();
    if t.is_symlink() {
        FileType::Symlink
    } else if t.is_dir() {
        FileType::Dir
    } else if t.is_file() {
        FileType::File
    } else {
        FileType::Other
    }
}

pub fn rfc3339(time: Option<std::time::SystemTime>) -> String {
    time.map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_default()
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct DirEntry {
    /// Relative to the listed directory.
    pub path: String,
    #[serde(rename = "type")]
    pub file_type: FileType,
    pub size: u64,
    pub mode: String,
    pub mtime: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ListResult {
    pub path: String,
    pub entries: Vec<DirEntry>,
    /// More entries exist than `max_entries` allowed.
    pub truncated: bool,
}

pub const MAX_DEPTH: usize = 32;

pub fn list_dir(path: &Path, depth: usize, hidden: bool, max_entries: usize) -> Result<ListResult> {
    if depth == 0 || depth > MAX_DEPTH {
        return Err(FileError::Invalid(format!(
            "`depth` must be between 1 and {MAX_DEPTH}, got {depth}"
        )));
    }
    let meta = std::fs::metadata(path).map_err(io("listing", path))?;
    if !meta.is_dir() {
        return Err(FileError::NotDir(path.display().to_string()));
    }
    let walker = ignore::WalkBuilder::new(path)
        .standard_filters(false)
        .hidden(!hidden)
        .max_depth(Some(depth))
        .sort_by_file_path(|a, b| a.cmp(b))
        .build();
    let mut entries = Vec::new();
    let mut truncated = false;
    for entry in walker.flatten() {
        if entry.depth() == 0 {
            continue;
        }
        if entries.len() == max_entries {
            truncated = true;
            break;
        }
        let Ok(meta) = entry.path().symlink_metadata() else {
            continue;
        };
        entries.push(DirEntry {
            path: entry
                .path()
                .strip_prefix(path)
                .unwrap_or(entry.path())
                .display()
                .to_string(),
            file_type: file_type(&meta),
            size: meta.len(),
            mode: format!("{:04o}", meta.permissions().mode() & 0o7777),
            mtime: rfc3339(meta.modified().ok()),
        });
    }
    Ok(ListResult {
        path: path.display().to_string(),
        entries,
        truncated,
    })
}

pub fn make_dir(path: &Path, parents: bool, mode: Option<u32>) -> Result<()> {
    if path.is_dir() && parents {
        return Ok(());
    }
    if path.exists() {
        return Err(FileError::Exists(path.display().to_string()));
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(parents);
    if let Some(mode) = mode {
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, mode);
    }
    builder.create(path).map_err(io("creating", path))
}

pub fn remove(path: &Path, recursive: bool) -> Result<()> {
    if path == Path::new("/") {
        return Err(FileError::RemoveRoot);
    }
    let meta = std::fs::symlink_metadata(path).map_err(io("removing", path))?;
    if meta.is_dir() {
        if !recursive {
            return Err(FileError::IsDir(
                path.display().to_string(),
                "set `recursive` to remove it and everything in it",
            ));
        }
        std::fs::remove_dir_all(path).map_err(io("removing", path))
    } else {
        std::fs::remove_file(path).map_err(io("removing", path))
    }
}

pub fn rename(source: &Path, dest: &Path, overwrite: bool) -> Result<()> {
    std::fs::symlink_metadata(source).map_err(io("moving", source))?;
    if dest.symlink_metadata().is_ok() && !overwrite {
        return Err(FileError::Exists(dest.display().to_string()));
    }
    match std::fs::rename(source, dest) {
        Ok(()) => Ok(()),
        // Across filesystems: copy, then remove the source.
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            copy(source, dest, true, overwrite)?;
            remove(source, true)
        }
        Err(e) => Err(io("moving", source)(e)),
    }
}

pub fn copy(source: &Path, dest: &Path, recursive: bool, overwrite: bool) -> Result<u64> {
    let meta = std::fs::symlink_metadata(source).map_err(io("copying", source))?;
    if dest.symlink_metadata().is_ok() && !overwrite {
        return Err(FileError::Exists(dest.display().to_string()));
    }
    if !meta.is_dir() {
        return std::fs::copy(source, dest).map_err(io("copying", source));
    }
    if !recursive {
        return Err(FileError::IsDir(
            source.display().to_string(),
            "set `recursive` to copy it",
        ));
    }
    if dest.starts_with(source) {
        return Err(FileError::Invalid(format!(
            "cannot copy {} into itself ({})",
            source.display(),
            dest.display()
        )));
    }
    let mut bytes = 0;
    let walker = ignore::WalkBuilder::new(source)
        .standard_filters(false)
        .build();
    for entry in walker {
        let entry =
            entry.map_err(|e| FileError::Invalid(format!("walking {}: {e}", source.display())))?;
        let rel = entry.path().strip_prefix(source).unwrap_or(Path::new(""));
        let target = dest.join(rel);
        let meta = entry
            .path()
            .symlink_metadata()
            .map_err(io("copying", entry.path()))?;
        if meta.is_dir() {
            std::fs::create_dir_all(&target).map_err(io("creating", &target))?;
        } else if meta.file_type().is_symlink() {
            let link = std::fs::read_link(entry.path()).map_err(io("reading", entry.path()))?;
            let _ = std::fs::remove_file(&target);
            std::os::unix::fs::symlink(link, &target).map_err(io("linking", &target))?;
        } else {
            bytes += std::fs::copy(entry.path(), &target).map_err(io("copying", entry.path()))?;
        }
    }
    Ok(bytes)
}
