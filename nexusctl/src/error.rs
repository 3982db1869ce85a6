//! What can go wrong, each with its exit code (documented in `--help`).

/// Exit codes: 0 done; 1 nexusd refused or failed the operation, or what
/// was given here does not read (a file, a value); 2 bad usage (clap's);
/// 3 nexusd not reachable; 4 permission denied.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// nexusd answered, and said no (an unknown VM, a bad argument...).
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    Denied(String),
    /// On this side: a file that does not read, an answer that does not
    /// parse.
    #[error("{0}")]
    Local(String),
    /// Ctrl-C: what was under way was undone.
    #[error("interrupted; nothing was left half done")]
    Interrupted,
}

impl CtlError {
    pub fn code(&self) -> u8 {
        match self {
            Self::Refused(_) | Self::Local(_) => 1,
            Self::Unreachable(_) => 3,
            Self::Denied(_) => 4,
            Self::Interrupted => 130,
        }
    }
}
