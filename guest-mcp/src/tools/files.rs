//! File tools: read_file, write_file, edit_file, list_dir, stat, make_dir,
//! remove, move, copy, glob, grep.

use base64::Engine as _;
use rmcp::handler::server::common::schema_for_output;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::CallToolResult;
use rmcp::{tool, tool_router};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{GuestTools, done, parse_mode};
use crate::files::{
    self, EditResult, ListResult, ReadEncoding, ReadResult, StatResult, WriteRequest, WriteResult,
};
use crate::search::{self, GlobResult, GrepLineKind, GrepQuery, GrepResult, Walk};

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadParams {
    /// File to read; relative paths start in /workspace.
    pub path: String,
    /// `text` (default): offset and limit count lines. `base64`: they count bytes.
    #[serde(default)]
    pub encoding: ReadEncoding,
    /// First line (0-based) or byte to return.
    #[serde(default)]
    pub offset: u64,
    /// Most lines (default 2000) or bytes (default and maximum: the chunk size, 8 MiB) to return.
    #[serde(default)]
    pub limit: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteParams {
    /// File to write; relative paths start in /workspace.
    pub path: String,
    /// Text to write. Give this or `content_base64`.
    #[serde(default)]
    pub content: Option<String>,
    /// Bytes to write, in base64.
    #[serde(default)]
    pub content_base64: Option<String>,
    /// Add to the end of the file instead of replacing it.
    #[serde(default)]
    pub append: bool,
    /// Write at this byte offset in place (for large files sent in chunks).
    #[serde(default)]
    pub offset: Option<u64>,
    /// Permission mode, octal text such as "0644"; an existing file keeps its own.
    #[serde(default)]
    pub mode: Option<String>,
    /// Create missing parent directories.
    #[serde(default)]
    pub create_parents: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EditParams {
    /// File to edit.
    pub path: String,
    /// Exact text to replace; it must occur once unless `replace_all`.
    pub old_string: String,
    /// Replacement text.
    pub new_string: String,
    /// Replace every occurrence.
    #[serde(default)]
    pub replace_all: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// Directory to list (default: /workspace).
    #[serde(default)]
    pub path: Option<String>,
    /// How many levels down to go (default 1: the directory's own entries).
    #[serde(default = "one")]
    pub depth: usize,
    /// Include entries whose names start with a dot.
    #[serde(default)]
    pub hidden: bool,
    /// Most entries to return (default and maximum: 10000).
    #[serde(default)]
    pub max_entries: Option<usize>,
}

fn one() -> usize {
    1
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StatParams {
    /// Path to describe (symlinks are not followed).
    pub path: String,
    /// Also compute the sha256 of a file's content.
    #[serde(default)]
    pub sha256: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MakeDirParams {
    /// Directory to create.
    pub path: String,
    /// Create missing parents too, and succeed if it exists (default true).
    #[serde(default = "yes")]
    pub parents: bool,
    /// Permission mode, octal text such as "0755".
    #[serde(default)]
    pub mode: Option<String>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoveParams {
    /// File, symlink or directory to remove.
    pub path: String,
    /// Required to remove a directory and everything in it.
    #[serde(default)]
    pub recursive: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveParams {
    /// What to move or copy.
    pub source: String,
    /// Where to.
    pub destination: String,
    /// Replace an existing destination.
    #[serde(default)]
    pub overwrite: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CopyParams {
    /// What to copy.
    pub source: String,
    /// Where to.
    pub destination: String,
    /// Required to copy a directory and everything in it.
    #[serde(default)]
    pub recursive: bool,
    /// Replace an existing destination.
    #[serde(default)]
    pub overwrite: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GlobParams {
    /// Glob over paths relative to `path`, e.g. "**/*.rs" or "src/*.toml".
    pub pattern: String,
    /// Directory to search (default: /workspace).
    #[serde(default)]
    pub path: Option<String>,
    /// Include hidden files and directories.
    #[serde(default)]
    pub hidden: bool,
    /// Skip what .gitignore and .ignore files exclude (default true).
    #[serde(default = "yes")]
    pub respect_gitignore: bool,
    /// Most paths to return (default and maximum: 10000).
    #[serde(default)]
    pub max_entries: Option<usize>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GrepParams {
    /// Regular expression (Rust regex syntax) to search for.
    pub pattern: String,
    /// File or directory to search (default: /workspace).
    #[serde(default)]
    pub path: Option<String>,
    /// Only search files matching this glob (e.g. "*.py" or "src/**/*.rs").
    #[serde(default)]
    pub glob: Option<String>,
    /// Match without regard to case.
    #[serde(default)]
    pub case_insensitive: bool,
    /// Lines of context before and after each match (at most 20).
    #[serde(default)]
    pub context: usize,
    /// Stop after this many matching lines (default 1000).
    #[serde(default)]
    pub max_matches: Option<usize>,
    /// Include hidden files.
    #[serde(default)]
    pub hidden: bool,
    /// Skip what .gitignore and .ignore files exclude (default true).
    #[serde(default = "yes")]
    pub respect_gitignore: bool,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Done {
    pub path: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Moved {
    pub source: String,
    pub destination: String,
    /// Bytes copied (copy only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

const DEFAULT_MAX_MATCHES: usize = 1000;

impl GuestTools {
    fn path(&self, arg: &'static str, path: &str) -> Result<std::path::PathBuf, String> {
        files::resolve(arg, path, self.workdir()).map_err(|e| e.to_string())
    }

    fn dir_or_workdir(&self, path: Option<&str>) -> Result<std::path::PathBuf, String> {
        match path {
            Some(p) => self.path("path", p),
            None => Ok(self
                .workdir()
                .map(std::path::Path::to_path_buf)
                .unwrap_or_else(|| ".".into())),
        }
    }

    fn max_entries(&self, asked: Option<usize>) -> Result<usize, String> {
        let max = self.shared.limits.max_entries;
        match asked {
            Some(n) if n == 0 || n > max => Err(format!(
                "`max_entries` must be between 1 and {max}, got {n}"
            )),
            Some(n) => Ok(n),
            None => Ok(max),
        }
    }
}

/// File work is blocking I/O: keep it off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("internal error: {e}"))?
}

#[tool_router(router = files_router, vis = "pub(super)")]
impl GuestTools {
    #[tool(
        description = "Read a file. Text (default): `offset`/`limit` count lines, and a binary file is an error that says to use base64. `encoding: base64`: they count bytes, for binary files and large files read in chunks (next_offset continues).",
        output_schema = schema_for_output::<ReadResult>()
    )]
    async fn read_file(
        &self,
        Parameters(p): Parameters<ReadParams>,
    ) -> Result<CallToolResult, String> {
        let path = self.path("path", &p.path)?;
        let max = self.shared.limits.max_io_bytes;
        let r = blocking(move || {
            files::read(&path, p.encoding, p.offset, p.limit, max).map_err(|e| e.to_string())
        })
        .await?;
        let text = match r.encoding {
            ReadEncoding::Text => r.content.clone(),
            ReadEncoding::Base64 => format!(
                "{} bytes of {} from offset {} (base64 in structured content){}",
                r.count,
                r.path,
                r.offset,
                if r.eof { ", end of file" } else { "" }
            ),
        };
        done(&r, text)
    }

    #[tool(
        description = "Write a file: replaced atomically (temporary file, then rename) unless `append` or `offset` is given. Give `content` (text) or `content_base64`. Large files go in chunks: the first without offset, then `append` (or `offset`) for each next chunk.",
        output_schema = schema_for_output::<WriteResult>()
    )]
    async fn write_file(
        &self,
        Parameters(p): Parameters<WriteParams>,
    ) -> Result<CallToolResult, String> {
        let path = self.path("path", &p.path)?;
        let mode = parse_mode("mode", p.mode.as_deref())?;
        let data = match (p.content, p.content_base64) {
            (Some(text), None) => text.into_bytes(),
            (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|e| format!("`content_base64` is not valid base64: {e}"))?,
            _ => return Err("give exactly one of `content` (text) or `content_base64`".into()),
        };
        let max = self.shared.limits.max_io_bytes;
        if data.len() > max {
            return Err(files::FileError::TooLarge {
                arg: "content",
                got: data.len() as u64,
                max: max as u64,
            }
            .to_string());
        }
        let (append, offset, create_parents) = (p.append, p.offset, p.create_parents);
        let r = blocking(move || {
            files::write(
                &path,
                WriteRequest {
                    data: &data,
                    append,
                    offset,
                    mode,
                    create_parents,
                },
            )
            .map_err(|e| e.to_string())
        })
        .await?;
        let text = format!(
            "wrote {} bytes to {} (now {} bytes)",
            r.bytes_written, r.path, r.size
        );
        done(&r, text)
    }

    #[tool(
        description = "Replace exact text in a file: `old_string` must occur exactly once (add surrounding lines to make it unique) unless `replace_all`. The file is rewritten atomically.",
        output_schema = schema_for_output::<EditResult>()
    )]
    async fn edit_file(
        &self,
        Parameters(p): Parameters<EditParams>,
    ) -> Result<CallToolResult, String> {
        let path = self.path("path", &p.path)?;
        let r = blocking(move || {
            files::edit(&path, &p.old_string, &p.new_string, p.replace_all)
                .map_err(|e| e.to_string())
        })
        .await?;
        let text = format!("replaced {} occurrence(s) in {}", r.replacements, r.path);
        done(&r, text)
    }

    #[tool(
        description = "List a directory's entries (type, size, mode, mtime), `depth` levels down, sorted by path.",
        output_schema = schema_for_output::<ListResult>()
    )]
    async fn list_dir(
        &self,
        Parameters(p): Parameters<ListParams>,
    ) -> Result<CallToolResult, String> {
        let path = self.dir_or_workdir(p.path.as_deref())?;
        let max = self.max_entries(p.max_entries)?;
        let r = blocking(move || {
            files::list_dir(&path, p.depth, p.hidden, max).map_err(|e| e.to_string())
        })
        .await?;
        let mut text: String = r
            .entries
            .iter()
            .map(|e| {
                let slash = if e.file_type == files::FileType::Dir {
                    "/"
                } else {
                    ""
                };
                format!("{}{slash}\t{}\n", e.path, e.size)
            })
            .collect();
        if r.truncated {
            text.push_str("(truncated: raise max_entries or list a subdirectory)\n");
        }
        done(&r, text)
    }

    #[tool(
        description = "Describe a path: type, size, mode, owner, mtime, symlink target, and the content's sha256 when asked.",
        output_schema = schema_for_output::<StatResult>()
    )]
    async fn stat(&self, Parameters(p): Parameters<StatParams>) -> Result<CallToolResult, String> {
        let path = self.path("path", &p.path)?;
        let r = blocking(move || files::stat(&path, p.sha256).map_err(|e| e.to_string())).await?;
        let text = format!(
            "{} {:?} {} bytes mode {} mtime {}",
            r.path, r.file_type, r.size, r.mode, r.mtime
        );
        done(&r, text)
    }

    #[tool(description = "Create a directory (and its parents, by default).", output_schema = schema_for_output::<Done>())]
    async fn make_dir(
        &self,
        Parameters(p): Parameters<MakeDirParams>,
    ) -> Result<CallToolResult, String> {
        let path = self.path("path", &p.path)?;
        let mode = parse_mode("mode", p.mode.as_deref())?;
        let shown = path.display().to_string();
        blocking(move || files::make_dir(&path, p.parents, mode).map_err(|e| e.to_string()))
            .await?;
        done(
            &Done {
                path: shown.clone(),
            },
            format!("created {shown}"),
        )
    }

    #[tool(
        description = "Remove a file or symlink; a directory only with `recursive`.",
        output_schema = schema_for_output::<Done>()
    )]
    async fn remove(
        &self,
        Parameters(p): Parameters<RemoveParams>,
    ) -> Result<CallToolResult, String> {
        let path = self.path("path", &p.path)?;
        let shown = path.display().to_string();
        blocking(move || files::remove(&path, p.recursive).map_err(|e| e.to_string())).await?;
        done(
            &Done {
                path: shown.clone(),
            },
            format!("removed {shown}"),
        )
    }

    #[tool(
        name = "move",
        description = "Move or rename a file or directory (across filesystems too). An existing destination is an error unless `overwrite`.",
        output_schema = schema_for_output::<Moved>()
    )]
    async fn move_path(
        &self,
        Parameters(p): Parameters<MoveParams>,
    ) -> Result<CallToolResult, String> {
        let source = self.path("source", &p.source)?;
        let dest = self.path("destination", &p.destination)?;
        let moved = Moved {
            source: source.display().to_string(),
            destination: dest.display().to_string(),
            bytes: None,
        };
        blocking(move || files::rename(&source, &dest, p.overwrite).map_err(|e| e.to_string()))
            .await?;
        let text = format!("moved {} to {}", moved.source, moved.destination);
        done(&moved, text)
    }

    #[tool(
        description = "Copy a file, or a directory with `recursive` (symlinks are copied as links). An existing destination is an error unless `overwrite`.",
        output_schema = schema_for_output::<Moved>()
    )]
    async fn copy(&self, Parameters(p): Parameters<CopyParams>) -> Result<CallToolResult, String> {
        let source = self.path("source", &p.source)?;
        let dest = self.path("destination", &p.destination)?;
        let mut copied = Moved {
            source: source.display().to_string(),
            destination: dest.display().to_string(),
            bytes: None,
        };
        let bytes = blocking(move || {
            files::copy(&source, &dest, p.recursive, p.overwrite).map_err(|e| e.to_string())
        })
        .await?;
        copied.bytes = Some(bytes);
        let text = format!(
            "copied {} to {} ({bytes} bytes)",
            copied.source, copied.destination
        );
        done(&copied, text)
    }

    #[tool(
        description = "Find paths matching a glob (e.g. \"**/*.rs\") under a directory, skipping what .gitignore excludes unless told otherwise.",
        output_schema = schema_for_output::<GlobResult>()
    )]
    async fn glob(&self, Parameters(p): Parameters<GlobParams>) -> Result<CallToolResult, String> {
        let root = self.dir_or_workdir(p.path.as_deref())?;
        let max = self.max_entries(p.max_entries)?;
        let r = blocking(move || {
            let walk = Walk {
                root: &root,
                hidden: p.hidden,
                respect_gitignore: p.respect_gitignore,
            };
            search::glob(&walk, &p.pattern, max).map_err(|e| e.to_string())
        })
        .await?;
        let mut text = r.paths.join("\n");
        if r.paths.is_empty() {
            text = "no matches".into();
        }
        if r.truncated {
            text.push_str("\n(truncated)");
        }
        done(&r, text)
    }

    #[tool(
        description = "Search file contents for a regular expression (ripgrep's engine), with optional glob filter and context lines. Skips binary files and what .gitignore excludes unless told otherwise.",
        output_schema = schema_for_output::<GrepResult>()
    )]
    async fn grep(&self, Parameters(p): Parameters<GrepParams>) -> Result<CallToolResult, String> {
        let root = self.dir_or_workdir(p.path.as_deref())?;
        let max = p.max_matches.unwrap_or(DEFAULT_MAX_MATCHES);
        if max == 0 || max > self.shared.limits.max_entries {
            return Err(format!(
                "`max_matches` must be between 1 and {}, got {max}",
                self.shared.limits.max_entries
            ));
        }
        let r = blocking(move || {
            let walk = Walk {
                root: &root,
                hidden: p.hidden,
                respect_gitignore: p.respect_gitignore,
            };
            let query = GrepQuery {
                pattern: &p.pattern,
                glob: p.glob.as_deref(),
                case_insensitive: p.case_insensitive,
                context: p.context,
                max_matches: max,
            };
            search::grep(&walk, &query).map_err(|e| e.to_string())
        })
        .await?;
        let mut text: String = r
            .lines
            .iter()
            .map(|l| {
                let sep = if l.kind == GrepLineKind::Match {
                    ':'
                } else {
                    '-'
                };
                format!("{}{sep}{}{sep}{}\n", l.path, l.line_number, l.text)
            })
            .collect();
        text.push_str(&format!(
            "{} matching line(s) in {} file(s) searched{}",
            r.matches,
            r.files_searched,
            if r.truncated {
                " (stopped at max_matches)"
            } else {
                ""
            }
        ));
        done(&r, text)
    }
}
