//! Finding files by name (`glob`) and content (`grep`), with the ripgrep
//! family of crates: `ignore` walks (honouring .gitignore unless told not
//! to), `globset` matches names, `grep-searcher` and `grep-regex` search.

use std::path::Path;

use grep_regex::RegexMatcherBuilder;
use grep_searcher::{Searcher, SearcherBuilder, Sink, SinkContext, SinkMatch};
use schemars::JsonSchema;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error("`{arg}` {pattern:?} is not a valid glob: {why}")]
    BadGlob {
        arg: &'static str,
        pattern: String,
        why: String,
    },
    #[error("`pattern` {pattern:?} is not a valid regular expression: {why}")]
    BadRegex { pattern: String, why: String },
    #[error("{0} does not exist")]
    NotFound(String),
    #[error("`context` must be at most {max}, got {got}")]
    BadContext { got: usize, max: usize },
}

/// Where and how to walk.
pub struct Walk<'a> {
    pub root: &'a Path,
    pub hidden: bool,
    pub respect_gitignore: bool,
}

impl Walk<'_> {
    fn walker(&self) -> Result<ignore::Walk, SearchError> {
        if !self.root.exists() {
            return Err(SearchError::NotFound(self.root.display().to_string()));
        }
        Ok(ignore::WalkBuilder::new(self.root)
            .standard_filters(self.respect_gitignore)
            .hidden(!self.hidden)
            .require_git(false)
            .sort_by_file_path(|a, b| a.cmp(b))
            // Kernel pseudo-filesystems hold files that block when read
            // (/proc/kmsg) or never end; searching them is never meant.
            .filter_entry(|e| !PSEUDO_FS.iter().any(|p| e.path() == Path::new(p)))
            .build())
    }
}

fn glob_matcher(arg: &'static str, pattern: &str) -> Result<globset::GlobMatcher, SearchError> {
    globset::GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| SearchError::BadGlob {
            arg,
            pattern: pattern.to_owned(),
            why: e.kind().to_string(),
        })
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct GlobResult {
    /// Matching paths, relative to the searched directory.
    pub paths: Vec<String>,
    pub truncated: bool,
}

/// Paths under `walk.root` whose relative path matches `pattern`
/// (`**/*.rs`, `src/*.toml`, ...).
pub fn glob(walk: &Walk<'_>, pattern: &str, max: usize) -> Result<GlobResult, SearchError> {
    let matcher = glob_matcher("pattern", pattern)?;
    let mut paths = Vec::new();
    let mut truncated = false;
    for entry in walk.walker()?.flatten() {
        let rel = entry.path().strip_prefix(walk.root).unwrap_or(entry.path());
        if rel.as_os_str().is_empty() || !matcher.is_match(rel) {
            continue;
        }
        if paths.len() == max {
            truncated = true;
            break;
        }
        paths.push(rel.display().to_string());
    }
    Ok(GlobResult { paths, truncated })
}

/// One line of `grep`'s answer.
#[derive(Debug, Serialize, JsonSchema)]
pub struct GrepLine {
    /// Relative to the searched directory (or the file searched).
    pub path: String,
    pub line_number: u64,
    pub text: String,
    /// `match` for a matching line, `context` for lines around one.
    pub kind: GrepLineKind,
}

#[derive(Debug, Clone, Copy, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum GrepLineKind {
    Match,
    Context,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct GrepResult {
    pub lines: Vec<GrepLine>,
    /// Matching lines found (at most `max_matches`).
    pub matches: usize,
    pub files_searched: usize,
    /// The search stopped at `max_matches`.
    pub truncated: bool,
}

pub struct GrepQuery<'a> {
    pub pattern: &'a str,
    pub glob: Option<&'a str>,
    pub case_insensitive: bool,
    pub context: usize,
    pub max_matches: usize,
}

pub const MAX_CONTEXT: usize = 20;
/// Directories a walk never enters.
const PSEUDO_FS: [&str; 3] = ["/proc", "/sys", "/dev"];
/// Longest line text returned; longer lines (minified code) are cut.
const MAX_LINE_CHARS: usize = 2000;

pub fn grep(walk: &Walk<'_>, query: &GrepQuery<'_>) -> Result<GrepResult, SearchError> {
    if query.context > MAX_CONTEXT {
        return Err(SearchError::BadContext {
            got: query.context,
            max: MAX_CONTEXT,
        });
    }
    let matcher = RegexMatcherBuilder::new()
        .case_insensitive(query.case_insensitive)
        .build(query.pattern)
        .map_err(|e| SearchError::BadRegex {
            pattern: query.pattern.to_owned(),
            why: e.to_string(),
        })?;
    let filter = query.glob.map(|g| glob_matcher("glob", g)).transpose()?;
    let mut searcher = SearcherBuilder::new()
        .line_number(true)
        .before_context(query.context)
        .after_context(query.context)
        .binary_detection(grep_searcher::BinaryDetection::quit(0))
        .build();
    let mut result = GrepResult {
        lines: Vec::new(),
        matches: 0,
        files_searched: 0,
        truncated: false,
    };
    for entry in walk.walker()?.flatten() {
        if !entry.file_type().is_some_and(|t| t.is_file()) {
            continue;
        }
        let rel = entry.path().strip_prefix(walk.root).unwrap_or(entry.path());
        let shown = if rel.as_os_str().is_empty() {
            entry.path()
        } else {
            rel
        };
        if let Some(filter) = &filter
            && !filter.is_match(shown)
            && !entry.path().file_name().is_some_and(|n| filter.is_match(n))
        {
            continue;
        }
        result.files_searched += 1;
        let mut sink = Collect {
            path: shown.display().to_string(),
            out: &mut result,
            max: query.max_matches,
        };
        // An unreadable file is skipped, as ripgrep does.
        let _ = searcher.search_path(&matcher, entry.path(), &mut sink);
        if result.truncated {
            break;
        }
    }
    Ok(result)
}

struct Collect<'a> {
    path: String,
    out: &'a mut GrepResult,
    max: usize,
}

impl Collect<'_> {
    fn push(&mut self, line_number: Option<u64>, bytes: &[u8], kind: GrepLineKind) {
        self.out.lines.push(GrepLine {
            path: self.path.clone(),
            line_number: line_number.unwrap_or(0),
            text: String::from_utf8_lossy(bytes)
                .trim_end_matches(['\n', '\r'])
                .chars()
                .take(MAX_LINE_CHARS)
                .collect(),
            kind,
        });
    }
}

impl Sink for Collect<'_> {
    type Error = std::io::Error;

    fn matched(&mut self, _: &Searcher, m: &SinkMatch<'_>) -> Result<bool, Self::Error> {
        if self.out.matches == self.max {
            self.out.truncated = true;
            return Ok(false);
        }
        self.out.matches += 1;
        self.push(m.line_number(), m.bytes(), GrepLineKind::Match);
        Ok(true)
    }

    fn context(&mut self, _: &Searcher, c: &SinkContext<'_>) -> Result<bool, Self::Error> {
        self.push(c.line_number(), c.bytes(), GrepLineKind::Context);
        Ok(true)
    }
}
