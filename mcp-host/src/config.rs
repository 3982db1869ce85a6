//! nexusd's configuration, in layers: built-in defaults, then a TOML file
//! (`--config`), then environment variables and flags (clap reads both).
//! Each layer is its own serde struct that refuses unknown keys; merging
//! and validation do no I/O.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::tools::Surface;

/// The embedded default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/nexus";
/// The embedded default HTTP address (loopback only).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7777";
/// Tools per `tools/list` page. Large on purpose: several popular clients
/// (Claude Code among them) read only the first page.
pub const DEFAULT_TOOLS_PAGE_SIZE: usize = 500;

/// The TOML file's keys; every one is optional.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Where images, drives, snapshots and the catalog live.
    pub state_dir: Option<PathBuf>,
    /// Where streamable HTTP listens.
    pub listen: Option<SocketAddr>,
    /// Allow `listen` on a non-loopback address without `[tls]` (only
    /// behind something that adds TLS).
    pub allow_non_loopback: Option<bool>,
    /// Host names (or addresses) requests may be addressed to besides
    /// the loopback names and a specific `listen` address: what remote
    /// clients put in the URL.
    pub allowed_hosts: Option<Vec<String>>,
    /// HTTPS on `listen` (`[tls]`: cert and key, PEM).
    pub tls: Option<crate::tls::TlsConfig>,
    /// Require a bearer token on the TCP port (default true). false is for
    /// local tools that cannot send one, and only on loopback.
    pub http_auth: Option<bool>,
    /// Local users (besides root) who are admins on the admin socket and
    /// through `nexusd stdio`.
    pub admin_uids: Option<Vec<u32>>,
    /// The admin Unix socket (default `<state_dir>/nexusd.sock`).
    pub admin_socket: Option<PathBuf>,
    /// A group (name or gid) whose members may connect to the admin
    /// socket too (mode 0660): each is identified by its uid, a user
    /// unless in `admin_uids`. The socket's directory must let them in
    /// (the state directory does not: set `admin_socket` elsewhere).
    pub admin_socket_group: Option<GroupRef>,
    /// How guest tools are listed when a connection does not choose:
    /// "per-vm" (VM__TOOL, the default) or "shared" (vm_TOOL with a `vm`
    /// argument).
    pub surface: Option<Surface>,
    /// Tools per `tools/list` page (default 500; 0: no pages).
    pub tools_page_size: Option<usize>,
    /// What the host may hold (`[limits]`).
    pub limits: Option<Limits>,
    /// What each user's VMs may hold together (`[quota]`).
    pub quota: Option<crate::daemon::quota::QuotaConfig>,
    /// The egress proxy (`[egress]`).
    pub egress: Option<EgressConfig>,
    /// Booted VMs kept ready for spawn_vm and fork_vm (`[[warm_pool]]`,
    /// one per image and shape; none by default).
    pub warm_pool: Option<Vec<WarmPoolConfig>>,
}

/// `[[warm_pool]]`: `size` VMs of `image` and this shape kept booted.
/// A spawn_vm (or a fork) asking for exactly this shape takes one.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmPoolConfig {
    /// The image (default "default").
    #[serde(default = "default_image")]
    pub image: String,
    /// How many to keep ready; 0 turns this pool off.
    pub size: u32,
    #[serde(default = "one")]
    pub vcpus: u32,
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    #[serde(default = "one_u64")]
    pub workspace_gib: u64,
}

/// The most VMs one `[[warm_pool]]` may keep.
pub const MAX_WARM_POOL_SIZE: u32 = 64;

fn default_image() -> String {
    crate::daemon::DEFAULT_IMAGE.to_owned()
}
fn one() -> u32 {
    1
}
fn one_u64() -> u64 {
    1
}
fn default_memory() -> u32 {
    256
}

/// `[egress]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressConfig {
    /// Tests only: let VMs reach loopback upstreams (the test's own
    /// servers) by name. Never set it on a real host: the guest would
    /// reach every service listening on the host's loopback.
    #[serde(default)]
    pub allow_loopback_upstreams: bool,
    /// Names the proxy resolves to these addresses instead of asking DNS
    /// (as /etc/hosts would; the addresses are checked like any others).
    #[serde(default)]
    pub hosts: std::collections::BTreeMap<String, Vec<std::net::IpAddr>>,
    /// PEM files of CAs trusted for upstreams besides the host's store,
    /// on connections the proxy intercepts (a private CA; tests' own).
    #[serde(default)]
    pub upstream_ca_files: Vec<std::path::PathBuf>,
}

/// A group, by name or number.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum GroupRef {
    Gid(u32),
    Name(String),
}

/// `[limits]`: each unset one is derived from the host.
#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// VMs that may exist, running or stopped (default 256).
    pub max_vms: Option<u32>,
    /// Memory of all running VMs together, MiB (default 80 % of the host's).
    pub max_memory_mib: Option<u64>,
    /// vCPUs of all running VMs together (default 16 per host CPU).
    pub max_vcpus: Option<u32>,
    /// Snapshots one VM may keep (default 128).
    pub max_snapshots_per_vm: Option<u32>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            why: e.to_string(),
        })
    }
}

/// What flags and environment variables set (clap fills this).
#[derive(Debug, Default, Clone)]
pub struct FlagConfig {
    pub state_dir: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub admin_socket: Option<PathBuf>,
    pub surface: Option<Surface>,
}

/// The validated configuration the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    pub listen: SocketAddr,
    pub admin_socket: PathBuf,
    pub surface: Surface,
    pub tools_page_size: usize,
    pub limits: Limits,
    pub quota: crate::daemon::quota::QuotaConfig,
    pub egress: EgressConfig,
    pub http_auth: bool,
    pub admin_uids: Vec<u32>,
    /// The group that may connect to the admin socket besides its owner.
    pub admin_socket_gid: Option<u32>,
    /// HTTPS on `listen`, if configured.
    pub tls: Option<crate::tls::TlsConfig>,
    /// The names requests may be addressed to (`Host`).
    pub hosts: Vec<String>,
    /// The warm pools, checked; those of size 0 left out.
    pub warm_pools: Vec<WarmPoolConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {why}")]
    Read { path: PathBuf, why: String },
    #[error("config file {path} is invalid: {why}")]
    Parse { path: PathBuf, why: String },
    #[error(
        "listen address {0} is not loopback: give nexusd a certificate ([tls] cert and key in the config file), or set allow_non_loopback = true only behind a proxy that adds TLS"
    )]
    NotLoopback(SocketAddr),
    #[error(
        "http_auth = false needs a loopback listen address, not {0}: anyone who reaches the port would drive every VM"
    )]
    OpenNotLoopback(SocketAddr),
    #[error(
        "admin_socket_group {0:?} is not a group on this host (getent group lists them; a gid works too)"
    )]
    NoGroup(String),
    #[error(
        "allowed_hosts entry {0:?} is not a host name or address (a name, an IPv4 or IPv6 address; no port: any port is accepted)"
    )]
    BadHost(String),
    #[error("{what} {path:?} must be an absolute path")]
    Relative { what: &'static str, path: PathBuf },
    #[error("[[warm_pool]] for image {image:?}: {why}")]
    WarmPool { image: String, why: String },
}

/// Each pool's image name, size and shape are ones spawn_vm would take;
/// no two pools share an image and shape.
fn check_warm_pools(pools: Vec<WarmPoolConfig>) -> Result<Vec<WarmPoolConfig>, ConfigError> {
    let mut kept: Vec<WarmPoolConfig> = Vec::new();
    for pool in pools {
        let bad = |why: String| ConfigError::WarmPool {
            image: pool.image.clone(),
            why,
        };
        if let Err(e) = nexus_storage::validate_name("image", &pool.image) {
            return Err(bad(e.to_string()));
        }
        if pool.size > MAX_WARM_POOL_SIZE {
            return Err(bad(format!(
                "`size` must be at most {MAX_WARM_POOL_SIZE}, got {}",
                pool.size
            )));
        }
        if pool.vcpus == 0 || pool.vcpus > nexus_vmm::spec::MAX_VCPUS {
            return Err(bad(format!(
                "`vcpus` must be between 1 and {}, got {}",
                nexus_vmm::spec::MAX_VCPUS,
                pool.vcpus
            )));
        }
        if pool.memory_mib < nexus_vmm::spec::MIN_MEMORY_MIB {
            return Err(bad(format!(
                "`memory_mib` must be at least {}, got {}",
                nexus_vmm::spec::MIN_MEMORY_MIB,
                pool.memory_mib
            )));
        }
        if pool.workspace_gib == 0 || pool.workspace_gib > crate::daemon::MAX_WORKSPACE_GIB {
            return Err(bad(format!(
                "`workspace_gib` must be between 1 and {}, got {}",
                crate::daemon::MAX_WORKSPACE_GIB,
                pool.workspace_gib
            )));
        }
        let same_shape = |p: &WarmPoolConfig| {
            (&p.image, p.vcpus, p.memory_mib, p.workspace_gib)
                == (&pool.image, pool.vcpus, pool.memory_mib, pool.workspace_gib)
        };
        if kept.iter().any(same_shape) {
            return Err(bad(
                "another [[warm_pool]] has the same image, vcpus, memory_mib and workspace_gib: give one pool the sum of their sizes".into(),
            ));
        }
        if pool.size > 0 {
            kept.push(pool);
        }
    }
    Ok(kept)
}

impl Config {
    /// Flags and environment over the file over the defaults.
    pub fn merge(file: FileConfig, flags: FlagConfig) -> Result<Self, ConfigError> {
        let state_dir = flags
            .state_dir
            .or(file.state_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        let listen = flags
            .listen
            .or(file.listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7777)));
        let admin_socket = flags
            .admin_socket
            .or(file.admin_socket)
            .unwrap_or_else(|| state_dir.join("nexusd.sock"));
        if !listen.ip().is_loopback() && file.tls.is_none() && file.allow_non_loopback != Some(true)
        {
            return Err(ConfigError::NotLoopback(listen));
        }
        let http_auth = file.http_auth.unwrap_or(true);
        if !http_auth && !listen.ip().is_loopback() {
            return Err(ConfigError::OpenNotLoopback(listen));
        }
        for (what, path) in [
            ("state directory", &state_dir),
            ("admin socket", &admin_socket),
        ] {
            if !path.is_absolute() {
                return Err(ConfigError::Relative {
                    what,
                    path: path.clone(),
                });
            }
        }
        let admin_socket_gid = match file.admin_socket_group {
            None => None,
            Some(GroupRef::Gid(gid)) => Some(gid),
            Some(GroupRef::Name(name)) => match nix::unistd::Group::from_name(&name) {
                Ok(Some(group)) => Some(group.gid.as_raw()),
                _ => return Err(ConfigError::NoGroup(name)),
            },
        };
        let mut hosts: Vec<String> = crate::http::LOOPBACK_HOSTS.map(String::from).into();
        if !listen.ip().is_loopback() && !listen.ip().is_unspecified() {
            hosts.push(listen.ip().to_string());
        }
        for host in file.allowed_hosts.unwrap_or_default() {
            // A name or an address, never a port: Host is matched
            // without its port.
            let name = host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-".contains(c));
            if host.is_empty() || !(name || host.parse::<std::net::Ipv6Addr>().is_ok()) {
                return Err(ConfigError::BadHost(host));
            }
            hosts.push(host.to_ascii_lowercase());
        }
        let warm_pools = check_warm_pools(file.warm_pool.unwrap_or_default())?;
        Ok(Self {
            warm_pools,
            tls: file.tls,
            hosts,
            admin_socket_gid,
            state_dir,
            listen,
            admin_socket,
            surface: flags.surface.or(file.surface).unwrap_or_default(),
            tools_page_size: file.tools_page_size.unwrap_or(DEFAULT_TOOLS_PAGE_SIZE),
            limits: file.limits.unwrap_or_default(),
            quota: file.quota.unwrap_or_default(),
            egress: file.egress.unwrap_or_default(),
            http_auth,
            admin_uids: file.admin_uids.unwrap_or_default(),
        })
    }

    /// The defaults, with a state directory.
    pub fn with_state_dir(state_dir: PathBuf) -> Result<Self, ConfigError> {
        Self::merge(
            FileConfig::default(),
            FlagConfig {
                state_dir: Some(state_dir),
                ..FlagConfig::default()
            },
        )
    }

    pub fn images_dir(&self) -> PathBuf {
        self.state_dir.join("images")
    }

    /// What each MCP connection is served with.
    pub fn tool_options(&self) -> crate::tools::Options {
        crate::tools::Options {
            surface: self.surface,
            page_size: self.tools_page_size,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> FileConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn flags_beat_the_file_which_beats_the_defaults() {
        let defaults = Config::merge(FileConfig::default(), FlagConfig::default()).unwrap();
        assert_eq!(defaults.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(defaults.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(
            defaults.admin_socket,
            PathBuf::from("/var/lib/nexus/nexusd.sock")
        );

        let from_file = file(
            "state_dir = \"/srv/nexus\"\nlisten = \"127.0.0.1:9000\"\nsurface = \"shared\"\ntools_page_size = 50\n",
        );
        let merged = Config::merge(from_file.clone(), FlagConfig::default()).unwrap();
        assert_eq!(merged.state_dir, PathBuf::from("/srv/nexus"));
        assert_eq!(merged.listen.port(), 9000);
        assert_eq!(merged.admin_socket, PathBuf::from("/srv/nexus/nexusd.sock"));
        assert_eq!(merged.surface, Surface::Shared);
        assert_eq!(merged.tools_page_size, 50);
        assert_eq!(defaults.surface, Surface::PerVm);
        assert_eq!(defaults.tools_page_size, DEFAULT_TOOLS_PAGE_SIZE);

        let flags = FlagConfig {
            listen: Some("127.0.0.1:9100".parse().unwrap()),
            ..FlagConfig::default()
        };
        let merged = Config::merge(from_file, flags).unwrap();
        assert_eq!(merged.listen.port(), 9100);
        assert_eq!(merged.state_dir, PathBuf::from("/srv/nexus"));
    }

    #[test]
    fn warm_pools_are_checked_and_empty_ones_left_out() {
        let merged = Config::merge(
            file("[[warm_pool]]\nsize = 2\n[[warm_pool]]\nimage = \"py\"\nsize = 0\n"),
            FlagConfig::default(),
        )
        .unwrap();
        assert_eq!(
            merged.warm_pools,
            [WarmPoolConfig {
                image: "default".into(),
                size: 2,
                vcpus: 1,
                memory_mib: 256,
                workspace_gib: 1,
            }]
        );
        for (toml, says) in [
            ("size = 65", "`size` must be at most 64, got 65"),
            (
                "size = 1\nvcpus = 0",
                "`vcpus` must be between 1 and 32, got 0",
            ),
            (
                "size = 1\nmemory_mib = 8",
                "`memory_mib` must be at least 64, got 8",
            ),
            (
                "size = 1\nworkspace_gib = 0",
                "`workspace_gib` must be between 1 and 1024, got 0",
            ),
            (
                "size = 1\nimage = \"Bad Name\"",
                "[[warm_pool]] for image \"Bad Name\"",
            ),
        ] {
            let err = Config::merge(
                file(&format!("[[warm_pool]]\n{toml}\n")),
                FlagConfig::default(),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains(says), "{toml}: {err}");
        }
        let err = Config::merge(
            file("[[warm_pool]]\nsize = 1\n[[warm_pool]]\nsize = 3\nmemory_mib = 256\n"),
            FlagConfig::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("same image, vcpus, memory_mib and workspace_gib"),
            "{err}"
        );
        let err = toml::from_str::<FileConfig>("[[warm_pool]]\nsize = 1\nshape = 2\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `shape`"), "{err}");
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let err = toml::from_str::<FileConfig>("stat_dir = \"/x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `stat_dir`"), "{err}");
        let err = toml::from_str::<FileConfig>("surface = \"flat\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("per-vm") && err.contains("shared"), "{err}");
        let err = Config::merge(
            file("admin_socket_group = \"no-such-group-here\""),
            FlagConfig::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("is not a group on this host"), "{err}");
        for (toml, gid) in [
            ("admin_socket_group = 4242", 4242),
            ("admin_socket_group = \"root\"", 0),
        ] {
            let merged = Config::merge(file(toml), FlagConfig::default()).unwrap();
            assert_eq!(merged.admin_socket_gid, Some(gid));
        }
        for bad in ["a b", "nexus.example.com:8443", ""] {
            let err = Config::merge(
                file(&format!("allowed_hosts = [{bad:?}]")),
                FlagConfig::default(),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("is not a host name"), "{err}");
        }
        let v6 =
            Config::merge(file("allowed_hosts = [\"fd00::1\"]"), FlagConfig::default()).unwrap();
        assert!(v6.hosts.contains(&"fd00::1".to_owned()));
        let open = FlagConfig {
            listen: Some("0.0.0.0:7777".parse().unwrap()),
            ..FlagConfig::default()
        };
        let err = Config::merge(FileConfig::default(), open.clone())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("is not loopback") && err.contains("allow_non_loopback"),
            "{err}"
        );
        assert!(Config::merge(file("allow_non_loopback = true"), open.clone()).is_ok());
        let tls = Config::merge(
            file("allowed_hosts = [\"nexus.example.com\"]\n[tls]\ncert = \"/c.pem\"\nkey = \"/k.pem\"\n"),
            open.clone(),
        )
        .unwrap();
        assert!(tls.tls.is_some());
        assert_eq!(
            tls.hosts,
            ["localhost", "127.0.0.1", "::1", "nexus.example.com"]
        );
        let err = Config::merge(file("allow_non_loopback = true\nhttp_auth = false"), open)
            .unwrap_err()
            .to_string();
        assert!(err.contains("http_auth = false needs a loopback"), "{err}");
        let err = Config::with_state_dir("relative".into())
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be an absolute path"), "{err}");
        let err = FileConfig::load(Path::new("/nonexistent/nexusd.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot read config file /nonexistent/nexusd.toml"),
            "{err}"
        );
    }
}
