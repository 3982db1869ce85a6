//! nexusd's configuration, validated without I/O.

use std::net::SocketAddr;
use std::path::PathBuf;

/// The embedded default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/nexus";
/// The embedded default HTTP address (loopback only).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7777";

#[derive(Debug, Clone)]
pub struct Config {
    /// Where images, drives and the catalog live.
    pub state_dir: PathBuf,
    /// Where streamable HTTP listens.
    pub listen: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("listen address {0} is not loopback: nexusd only listens on loopback for now")]
    NotLoopback(SocketAddr),
    #[error("state directory {0:?} must be an absolute path")]
    RelativeStateDir(PathBuf),
}

impl Config {
    pub fn new(state_dir: PathBuf, listen: SocketAddr) -> Result<Self, ConfigError> {
        if !listen.ip().is_loopback() {
            return Err(ConfigError::NotLoopback(listen));
        }
        if !state_dir.is_absolute() {
            return Err(ConfigError::RelativeStateDir(state_dir));
        }
        Ok(Self { state_dir, listen })
    }

    pub fn images_dir(&self) -> PathBuf {
        self.state_dir.join("images")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_and_absolute_paths_are_accepted() {
        let ok = Config::new("/var/lib/nexus".into(), DEFAULT_LISTEN.parse().unwrap()).unwrap();
        assert_eq!(ok.images_dir(), PathBuf::from("/var/lib/nexus/images"));
        let err = Config::new("/x".into(), "0.0.0.0:7777".parse().unwrap()).unwrap_err();
        assert!(err.to_string().contains("not loopback"));
        let err = Config::new("rel".into(), DEFAULT_LISTEN.parse().unwrap()).unwrap_err();
        assert!(err.to_string().contains("absolute"));
    }
}
