//! Process trees: everything one `exec` or background process starts,
//! found and killed whole, `setsid` or not.
//!
//! A process group is not enough: a command can leave its group (`setsid`,
//! daemons) and outlive a timeout. So each exec and background process
//! gets a cgroup (v2) of its own, entered by the child before it runs the
//! program; `cgroup.kill` ends every process in it at once, and pids and
//! memory limits apply to the whole tree. Where no cgroup v2 hierarchy is
//! writable (guest-mcp run natively without one), trees fall back to the
//! process group alone, and say so once.
//!
//! Layout: `<cgroup2 mount><guest-mcp own cgroup>/guest-mcp.<pid>.<n>/tree-<n>`.
//! guest-mcp itself stays outside (a cgroup with controllers enabled for
//! its children may hold no processes of its own).

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Limits applied to each tree (None: no limit).
#[derive(Debug, Clone, Copy, Default)]
pub struct TreeLimits {
    pub pids_max: Option<u64>,
    pub memory_max: Option<u64>,
}

/// Cgroups kept for reuse: making and removing one per command costs
/// milliseconds in an emulated guest (memcg setup, an RCU grace period).
#[derive(Debug, Default)]
struct Pool {
    /// Empty, ready for a command.
    free: Vec<PathBuf>,
    /// Killed, emptying.
    dying: Vec<PathBuf>,
}

/// A free tree charged with more memory than this (page cache its last
/// command left) is removed rather than reused.
const REUSE_MAX_CHARGE: u64 = 4 << 20;
/// Trees kept for reuse at most; more are removed.
const POOL_MAX: usize = 64;

/// Where trees are made.
#[derive(Debug)]
pub struct Trees {
    /// `guest-mcp.<pid>` under guest-mcp's own cgroup, if cgroup v2 works.
    base: Option<PathBuf>,
    pool: Arc<Mutex<Pool>>,
    next: AtomicU64,
    limits: TreeLimits,
    /// Whether a child resets its OOM score (guest-mcp itself is shielded).
    reset_oom_score: bool,
}

/// One command's tree. Dropping it kills everything still in it.
#[derive(Debug)]
pub struct Tree {
    dir: Option<PathBuf>,
    /// `cgroup.procs`, open before the fork so the child can enter it.
    procs: Option<std::fs::File>,
    /// Where the cgroup goes back when the tree is done.
    pool: Option<Arc<Mutex<Pool>>>,
    /// The cgroup's OOM kills before this tree (the count is the cgroup's).
    oom_base: u64,
}

impl Trees {
    /// Trees under a fresh cgroup of this guest-mcp. With `vm`, also kills
    /// what previous guest-mcp instances left in theirs, and shields this
    /// process from the OOM killer (commands are killed first).
    pub fn new(limits: TreeLimits, vm: bool) -> Self {
        let base = cgroup2_home().and_then(|home| {
            reap_previous(&home, vm);
            // Unique even across reused pids (a leftover of an earlier
            // process with this pid must not be taken for ours).
            static INSTANCE: AtomicU64 = AtomicU64::new(0);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let base = home.join(format!(
                "guest-mcp.{}.{nanos}-{}",
                std::process::id(),
                INSTANCE.fetch_add(1, Ordering::Relaxed)
            ));
            // Controllers for the children: best effort (a host's v2
            // hierarchy may have none; killing works without them).
            let _ = std::fs::write(home.join("cgroup.subtree_control"), "+pids +memory");
            match std::fs::create_dir(&base) {
                Ok(()) => {
                    let _ = std::fs::write(base.join("cgroup.subtree_control"), "+pids +memory");
                    Some(base)
                }
                Err(e) => {
                    tracing::warn!(path = %base.display(), error = %e, "no cgroup for process trees");
                    None
                }
            }
        });
        match &base {
            Some(base) => tracing::info!(cgroup = %base.display(), "process trees in cgroups"),
            None => tracing::warn!(
                "no writable cgroup v2 hierarchy: a command that leaves its process group (setsid) can outlive its exec, and pids/memory limits do not apply"
            ),
        }
        let reset_oom_score = vm
            && std::fs::write("/proc/self/oom_score_adj", "-1000")
                .inspect_err(
                    |e| tracing::warn!(error = %e, "cannot shield guest-mcp from the OOM killer"),
                )
                .is_ok();
        Self {
            base,
            pool: Arc::default(),
            next: AtomicU64::new(1),
            limits,
            reset_oom_score,
        }
    }

    /// Whether trees are real cgroups.
    pub fn contained(&self) -> bool {
        self.base.is_some()
    }

    /// An empty tree (a reused cgroup, or a new one).
    pub fn tree(&self) -> Tree {
        let none = Tree {
            dir: None,
            procs: None,
            pool: None,
            oom_base: 0,
        };
        let Some(base) = &self.base else {
            return none;
        };
        let reused = {
            let mut pool = lock(&self.pool);
            let Pool { free, dying } = &mut *pool;
            let (empty, still): (Vec<PathBuf>, Vec<PathBuf>) =
                dying.drain(..).partition(|d| !populated(d));
            *dying = still;
            free.extend(empty);
            free.pop()
        };
        // A cgroup still charged with its last command's page cache would
        // count that against the next command's memory limit: not reused.
        let reused = reused.filter(|dir| {
            let charged = std::fs::read_to_string(dir.join("memory.current"))
                .ok()
                .and_then(|t| t.trim().parse::<u64>().ok())
                .unwrap_or(0);
            let fit = charged <= REUSE_MAX_CHARGE;
            if !fit {
                let _ = std::fs::remove_dir(dir);
            }
            fit
        });
        if let Some(dir) = reused {
            match std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))
            {
                Ok(procs) => {
                    return Tree {
                        oom_base: oom_kills(&dir),
                        dir: Some(dir),
                        procs: Some(procs),
                        pool: Some(self.pool.clone()),
                    };
                }
                Err(_) => {
                    let _ = std::fs::remove_dir(&dir);
                }
            }
        }
        let dir = base.join(format!(
            "tree-{}",
            self.next.fetch_add(1, Ordering::Relaxed)
        ));
        let made = std::fs::create_dir(&dir).and_then(|()| {
            if let Some(pids) = self.limits.pids_max {
                write_if_present(&dir.join("pids.max"), &pids.to_string())?;
            }
            if let Some(bytes) = self.limits.memory_max {
                write_if_present(&dir.join("memory.max"), &bytes.to_string())?;
                // An OOM kill takes the whole tree, not one process of it.
                write_if_present(&dir.join("memory.oom.group"), "1")?;
            }
            std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))
        });
        match made {
            Ok(procs) => Tree {
                dir: Some(dir),
                procs: Some(procs),
                pool: Some(self.pool.clone()),
                oom_base: 0,
            },
            Err(e) => {
                tracing::warn!(path = %dir.display(), error = %e, "could not make a process tree; using the process group only");
                let _ = std::fs::remove_dir(&dir);
                none
            }
        }
    }

    /// Makes `cmd`'s child enter `tree` (and drop guest-mcp's OOM shield)
    /// before it runs its program.
    pub fn enter_on_spawn(&self, tree: &Tree, cmd: &mut tokio::process::Command) {
        let procs = tree.procs.as_ref().map(AsRawFd::as_raw_fd);
        let reset_oom = self.reset_oom_score;
        // SAFETY: the closure runs in the forked child before exec and only
        // makes raw write(2)/open(2)/close(2) calls on memory it owns, which
        // are async-signal-safe; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(fd) = procs {
                    // "0": the writing process itself.
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if reset_oom {
                    let path = c"/proc/self/oom_score_adj";
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd >= 0 {
                        libc::write(fd, b"0".as_ptr().cast(), 1);
                        libc::close(fd);
                    }
                }
                Ok(())
            });
        }
    }
}

impl Drop for Trees {
    fn drop(&mut self) {
        let Some(base) = self.base.take() else { return };
        {
            let mut pool = lock(&self.pool);
            let Pool { free, dying } = &mut *pool;
            for dir in free.drain(..).chain(dying.drain(..)) {
                let _ = std::fs::remove_dir(&dir);
            }
        }
        if std::fs::remove_dir(&base).is_ok() {
            return;
        }
        // Its trees remove themselves as their processes die.
        let _ = std::fs::write(base.join("cgroup.kill"), "1");
        std::thread::spawn(move || {
            for _ in 0..500 {
                if std::fs::remove_dir(&base).is_ok() || !base.exists() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
    }
}

impl Tree {
    /// Sends `signal` to every process of the tree; false if it is no
    /// cgroup (the caller then signals the process group).
    pub fn signal(&self, signal: Signal) -> bool {
        let Some(dir) = &self.dir else { return false };
        for pid in members(dir) {
            let _ = kill(Pid::from_raw(pid), signal);
        }
        true
    }

    /// Kills every process of the tree at once.
    pub fn kill(&self) {
        if let Some(dir) = &self.dir
            && std::fs::write(dir.join("cgroup.kill"), "1").is_err()
        {
            // Kernels before 5.14 have no cgroup.kill.
            self.signal(Signal::SIGKILL);
        }
    }

    /// Whether the tree's memory limit killed some of it.
    pub fn oom_killed(&self) -> bool {
        self.dir
            .as_ref()
            .is_some_and(|dir| oom_kills(dir) > self.oom_base)
    }

    /// Waits up to `timeout` for the tree to hold no process.
    pub async fn wait_empty(&self, timeout: Duration) -> bool {
        let Some(dir) = &self.dir else { return true };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if !populated(dir) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else { return };
        self.procs = None;
        let alive = populated(&dir);
        if alive {
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        }
        if let Some(pool) = self.pool.take() {
            let mut pool = lock(&pool);
            if pool.free.len() + pool.dying.len() < POOL_MAX {
                if alive {
                    pool.dying.push(dir);
                } else {
                    pool.free.push(dir);
                }
                return;
            }
        }
        if std::fs::remove_dir(&dir).is_ok() {
            return;
        }
        // A killed tree empties within milliseconds; its directory can go then.
        std::thread::spawn(move || {
            for _ in 0..500 {
                if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            tracing::warn!(path = %dir.display(), "a process tree's cgroup would not empty");
        });
    }
}

/// The cgroup2 directory guest-mcp itself is in, if cgroup v2 is mounted.
fn cgroup2_home() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let mount = mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, path, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == "cgroup2").then(|| PathBuf::from(path))
    })?;
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let relative = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(mount.join(relative.trim_start_matches('/')))
}

/// Kills and removes the trees of earlier guest-mcp instances: in a VM
/// (`all`) every other instance's (only one guest-mcp runs at a time, so
/// they are left over from a crash); on a host, those whose process is
/// gone.
fn reap_previous(home: &Path, all: bool) {
    let Ok(entries) = std::fs::read_dir(home) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("guest-mcp.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        let alive = kill(Pid::from_raw(pid), None).is_ok();
        if pid == std::process::id() as i32 || (!all && alive) {
            continue;
        }
        let base = entry.path();
        let _ = std::fs::write(base.join("cgroup.kill"), "1");
        if let Ok(trees) = std::fs::read_dir(&base) {
            for tree in trees.flatten().filter(|t| t.path().is_dir()) {
                for _ in 0..100 {
                    if std::fs::remove_dir(tree.path()).is_ok() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        let _ = std::fs::remove_dir(&base);
        tracing::warn!(cgroup = %base.display(), "killed what a previous guest-mcp left running");
    }
}

/// The OOM kills a cgroup has seen.
fn oom_kills(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("memory.events"))
        .ok()
        .and_then(|events| {
            events
                .lines()
                .find_map(|l| l.strip_prefix("oom_kill "))
                .and_then(|n| n.trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn members(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(|&pid: &i32| pid > 1)
        .collect()
}

fn populated(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .map(|events| events.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

/// Writes a control file that exists; a missing one (controller not
/// enabled here) is skipped.
fn write_if_present(path: &Path, value: &str) -> std::io::Result<()> {
    match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(mut file) => file.write_all(value.as_bytes()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
