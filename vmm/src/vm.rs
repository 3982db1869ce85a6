//! Starting, watching and stopping VMs, the same way for every backend.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::net::UnixStream;

use crate::accel::Resolved;
use crate::backend::{Backend, LaunchPaths, LaunchRequest};
use crate::cgroup::{VmCgroup, VmLimits};
use crate::cid::{self, CidLease};
use crate::process::{Watched, describe};
pub use crate::readiness::GuestState;
use crate::readiness::Readiness;
use crate::{VmSpec, VmmError, console, control, vsock};

/// Unix socket paths are limited to 108 bytes, and the readiness socket
/// adds `_1027` to the vsock socket's path.
const MAX_UDS_PATH: usize = 100;
/// How many console lines boot errors carry.
const CONSOLE_TAIL_LINES: usize = 20;
/// Where the VMMs' own uids start (one per VM: this plus its CID). High,
/// to stay clear of the system's and its directory's users.
pub const VM_UID_BASE: u32 = 3_000_000_000;
/// The VM's size, in its run directory (for the cgroup of an adopted VM).
const LIMITS_FILE: &str = "limits";
/// Present in a run directory while its VM is paused: a daemon that
/// adopts it keeps it paused (the pause is its user's, not the daemon's).
const PAUSED_FILE: &str = "paused";
/// The VMM's console socket, in the run directory.
const CONSOLE_SOCKET: &str = "console.sock";
/// The hybrid-vsock socket, in the VM's vsock directory.
const VSOCK_SOCKET: &str = "vsock.sock";

/// Pauses and resumes one VM by stopping and continuing its host
/// processes (the VMM and its helpers together, so that no device is
/// caught half way). QEMU's own `stop` cannot be used here: after a
/// `cont`, vhost-device-vsock 0.3 no longer answers host connections.
/// The guest's clock jumps by the pause on resume (its TSC runs on).
#[derive(Debug, Clone)]
pub struct Machine {
    vm: String,
    /// The VMM first; each with its exit, so that a pid is only signalled
    /// while its process is unreaped (never a reused pid).
    processes: Vec<(u32, tokio::sync::watch::Receiver<Option<ExitStatus>>)>,
    paused: Arc<std::sync::atomic::AtomicBool>,
    /// Where the pause is recorded ([`PAUSED_FILE`]).
    run_dir: PathBuf,
}

impl Machine {
    /// Stops its processes; its memory stays. Nothing in the guest runs,
    /// and no connection to it is made, until [`Machine::resume`].
    pub async fn pause(&self) -> Result<(), VmmError> {
        // Marked first: nothing starts waiting on a guest about to stop.
        self.paused.store(true, std::sync::atomic::Ordering::SeqCst);
        let stopped = self.signal_all(Signal::SIGSTOP, self.processes.iter());
        if stopped.is_err() {
            let _ = self.signal_all(Signal::SIGCONT, self.processes.iter().rev());
            self.paused
                .store(false, std::sync::atomic::Ordering::SeqCst);
            return stopped;
        }
        // Unrecorded, a daemon that adopts it after a crash continues it.
        if let Err(e) = std::fs::write(self.run_dir.join(PAUSED_FILE), b"") {
            tracing::warn!(vm = self.vm, error = %e, "could not record the pause");
        }
        Ok(())
    }

    /// Continues its processes: helpers first, then the VMM.
    pub async fn resume(&self) -> Result<(), VmmError> {
        // Unrecorded first: a crash after it leaves a VM that is continued
        // when adopted, as asked.
        match std::fs::remove_file(self.run_dir.join(PAUSED_FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(vm = self.vm, error = %e, "could not unrecord the pause");
            }
            _ => {}
        }
        self.signal_all(Signal::SIGCONT, self.processes.iter().rev())?;
        self.paused
            .store(false, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Signals every process still running (one that ended is the
    /// VM's end, seen by its watcher); the first failure, if any.
    fn signal_all<'a>(
        &self,
        signal: Signal,
        processes: impl Iterator<Item = &'a (u32, tokio::sync::watch::Receiver<Option<ExitStatus>>)>,
    ) -> Result<(), VmmError> {
        let mut failed = None;
        for (pid, exit) in processes {
            // Unreaped until its exit is recorded: the pid is still its own.
            if exit.borrow().is_some() {
                failed.get_or_insert_with(|| format!("its process {pid} has exited"));
                continue;
            }
            if let Err(e) = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), signal)
            {
                failed.get_or_insert_with(|| format!("{signal} to its process {pid}: {e}"));
            }
        }
        match failed {
            Some(why) => Err(VmmError::Machine {
                vm: self.vm.clone(),
                why,
            }),
            None => Ok(()),
        }
    }
}

/// Where VMs keep their run-time files, and which programs run them.
#[derive(Debug, Clone)]
pub struct VmmConfig {
    /// One directory per running VM is created here and removed at stop.
    pub run_root: PathBuf,
    /// CID lock files, shared by every process that starts VMs on the host.
    pub cid_dir: PathBuf,
    /// How long each vsock handshake may take, and the whole power-off
    /// request a stop makes of the guest.
    pub connect_timeout: Duration,
    /// How long a guest has to power off when asked, before SIGTERM.
    pub graceful_timeout: Duration,
    /// How long the VMM has after SIGTERM, before SIGKILL.
    pub term_timeout: Duration,
    /// The most a VM's console log may take on disk (see `console`).
    pub console_cap_bytes: u64,
    /// VMMs run as uid (and gid) this plus their CID once set up, so that
    /// no two VMs share a user and none is root; None keeps them root.
    pub vm_uid_base: Option<u32>,
    /// The vsock sockets of each VM, in `<vsock_root>/<cid>/`: outside the
    /// state directory (owner-only), so that a vsock helper running as the
    /// VM's uid reaches them; the directory is that uid's alone.
    pub vsock_root: PathBuf,
}

impl Default for VmmConfig {
    fn default() -> Self {
        Self {
            run_root: PathBuf::from("/run/nexus/vms"),
            cid_dir: PathBuf::from("/run/nexus/cid"),
            connect_timeout: Duration::from_secs(3),
            graceful_timeout: Duration::from_secs(10),
            term_timeout: Duration::from_secs(3),
            console_cap_bytes: 4 << 20,
            vm_uid_base: Some(VM_UID_BASE),
            vsock_root: PathBuf::from("/run/nexus/vsock"),
        }
    }
}

/// Starts VMs through one backend.
#[derive(Debug, Clone)]
pub struct Vmm {
    backend: Arc<dyn Backend>,
    config: VmmConfig,
}

impl Vmm {
    pub fn new(backend: Arc<dyn Backend>, config: VmmConfig) -> Self {
        Self { backend, config }
    }

    pub fn config(&self) -> &VmmConfig {
        &self.config
    }

    /// The same VMM backend and settings, its VMs' run directories under
    /// `run_root` (VMs kept apart: booted ahead of need, say, never to be
    /// taken for another's leftovers).
    pub fn with_run_root(&self, run_root: PathBuf) -> Self {
        Self {
            backend: self.backend.clone(),
            config: VmmConfig {
                run_root,
                ..self.config.clone()
            },
        }
    }

    /// The uid VM `cid`'s processes run as, if not root.
    fn run_as(&self, cid: u32) -> Result<Option<u32>, VmmError> {
        match self.config.vm_uid_base {
            None => Ok(None),
            Some(base) => base.checked_add(cid).map(Some).ok_or_else(|| {
                VmmError::InvalidSpec(format!(
                    "vsock CID {cid} is too large for a VMM uid above {base}"
                ))
            }),
        }
    }

    /// A new, empty `<vsock_root>/<cid>`, owned by `run_as`. The CID is
    /// leased by the caller, so what is there is a dead VM's.
    fn vsock_dir(&self, cid: u32, run_as: Option<u32>) -> std::io::Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let root = &self.config.vsock_root;
        std::fs::create_dir_all(root)?;
        // Others may pass through, not list.
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711))?;
        let dir = root.join(cid.to_string());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        if let Some(uid) = run_as {
            std::os::unix::fs::chown(&dir, Some(uid), Some(uid))?;
        }
        Ok(dir)
    }

    /// Starts a VM and returns once its guest-mcp has signalled readiness.
    ///
    /// On any error nothing of the VM is left: no process, socket, run
    /// directory or CID lease.
    #[tracing::instrument(skip_all, fields(vm = %spec.name))]
    pub async fn start(&self, spec: VmSpec) -> Result<Vm, VmmError> {
        spec.validate()?;
        let accel = spec.accel.resolve()?;
        let lease = match spec.cid {
            Some(cid) => cid::lease(&self.config.cid_dir, cid)?,
            None => cid::lease_any(&self.config.cid_dir)?,
        };
        let io = |action: String| {
            let vm = spec.name.clone();
            move |source| VmmError::Io { vm, action, source }
        };
        // The CID is ours, so a directory with this name is a dead VM's.
        let run_dir = self
            .config
            .run_root
            .join(format!("{}.{}", spec.name, lease.cid()));
        if run_dir.join(CONSOLE_SOCKET).as_os_str().len() > MAX_UDS_PATH {
            return Err(VmmError::InvalidSpec(format!(
                "run directory {} is too long for Unix sockets: keep run_root under {} bytes",
                run_dir.display(),
                MAX_UDS_PATH - 30
            )));
        }
        let run_as = self.run_as(lease.cid())?;
        let vsock_uds = self
            .vsock_dir(lease.cid(), run_as)
            .map_err(io("create the VM's vsock directory".into()))?
            .join(VSOCK_SOCKET);
        let _ = std::fs::remove_dir_all(&run_dir);
        std::fs::create_dir_all(&run_dir).map_err(io(format!("create {}", run_dir.display())))?;
        if let Some(parent) = spec.console_log.parent() {
            std::fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
        }

        let mut pending = Pending {
            run_dir: run_dir.clone(),
            vsock_dir: vsock_uds.parent().map(Path::to_path_buf),
            processes: Vec::new(),
        };
        let readiness = listen_ready(&vsock_uds, run_as)
            .map_err(io("listen for the guest's readiness".into()))?;
        let started = Instant::now();
        let launched = self
            .backend
            .launch(LaunchRequest {
                spec: &spec,
                cid: lease.cid(),
                cid_lock: lease.fd(),
                run_as,
                accel,
                paths: LaunchPaths {
                    run_dir: run_dir.clone(),
                    vsock_uds: vsock_uds.clone(),
                    console_log: spec.console_log.clone(),
                    console_socket: run_dir.join(CONSOLE_SOCKET),
                },
            })
            .await?;
        // The VMM waits for this before it starts the guest.
        let console_log = console::LogPath::from(spec.console_log.clone());
        console::capture(
            run_dir.join(CONSOLE_SOCKET),
            console_log.clone(),
            self.config.console_cap_bytes,
            true,
        );
        let vmm = Watched::new("vmm", launched.vmm);
        let helpers: Vec<Watched> = launched
            .helpers
            .into_iter()
            .map(|(name, child)| Watched::new(name, child))
            .collect();
        pending.processes.push(vmm.pid());
        pending.processes.extend(helpers.iter().map(Watched::pid));
        let limits = VmLimits {
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
        };
        // Kept for a daemon that adopts the VM later.
        let _ = std::fs::write(
            run_dir.join(LIMITS_FILE),
            format!("{} {}\n", limits.vcpus, limits.memory_mib),
        );
        // Named once: a VM renamed later (a pooled one, claimed) keeps it.
        let cgroup_name = format!("{}.{}", spec.name, lease.cid());
        let _ = std::fs::write(run_dir.join(CGROUP_FILE), &cgroup_name);
        let cgroup = VmCgroup::create(&cgroup_name, limits);
        if let Some(cgroup) = &cgroup {
            for pid in pending.processes.iter().flatten() {
                if let Err(e) = cgroup.add(*pid) {
                    tracing::warn!(pid, error = %e, "could not put a VM process in its cgroup");
                }
            }
        }
        // Recorded so that a process that loses track of this VM (a
        // crashed daemon) can find and stop it later: see `reap_leftovers`.
        record_pids(&run_dir, std::iter::once(&vmm).chain(&helpers));

        let failure_context = |status: Option<ExitStatus>| {
            let mut text = console::tail(&spec.console_log, CONSOLE_TAIL_LINES, true);
            if let Some(log) = &launched.vmm_log {
                let vmm_said = console::file_tail(log, 5);
                if !vmm_said.is_empty() {
                    text.push_str(&format!("\n(VMM output: {vmm_said})"));
                }
            }
            (status.map(|s| describe(&s)).unwrap_or_default(), text)
        };

        let mut state = readiness.subscribe();
        let mut exit = vmm.exit_watch();
        let outcome = tokio::time::timeout(spec.ready_timeout, async {
            tokio::select! {
                ready = state.wait_for(|s| matches!(s, GuestState::Ready { .. })) => ready.is_ok(),
                _ = exit.wait_for(Option::is_some) => false,
            }
        })
        .await;
        match outcome {
            Ok(true) => {}
            Ok(false) => {
                let status = vmm.wait_for(Duration::from_secs(1)).await;
                let (status, console) = failure_context(status);
                pending.kill(&vmm, &helpers).await;
                return Err(VmmError::DiedDuringBoot {
                    vm: spec.name.clone(),
                    status,
                    panic: console::panic_line(&spec.console_log),
                    console,
                });
            }
            Err(_) => {
                pending.kill(&vmm, &helpers).await;
                let (_, console) = failure_context(None);
                return Err(VmmError::ReadyTimeout {
                    vm: spec.name.clone(),
                    timeout: spec.ready_timeout,
                    console,
                });
            }
        }
        let ready_after = started.elapsed();
        tracing::info!(
            cid = lease.cid(),
            ?accel,
            ready_ms = ready_after.as_millis() as u64,
            "VM ready"
        );
        pending.disarm();
        Ok(Vm::guarded(Vm {
            name: spec.name,
            lease,
            accel,
            run_dir,
            vsock_uds,
            console_log,
            vmm,
            helpers,
            readiness: Some(readiness),
            ready_after,
            config: self.config.clone(),
            cgroup,
            cut_off: Arc::default(),
            paused: Arc::default(),
            finished: false,
        }))
    }
}

const PIDS_FILE: &str = "pids";
/// The name of the VM's cgroup (its run directory's first name).
const CGROUP_FILE: &str = "cgroup";

/// The cgroup of the VM whose run directory is `run_dir`.
fn cgroup_name(run_dir: &Path) -> Option<String> {
    std::fs::read_to_string(run_dir.join(CGROUP_FILE))
        .ok()
        .map(|n| n.trim().to_owned())
        .filter(|n| !n.is_empty())
        .or_else(|| Some(run_dir.file_name()?.to_str()?.to_owned()))
}

/// Writes `pid start_ticks` lines for a VM's processes into its run dir.
fn record_pids<'a>(run_dir: &Path, processes: impl Iterator<Item = &'a Watched>) {
    let lines: String = processes
        .filter_map(|p| {
            let pid = p.pid()?;
            Some(format!("{pid} {}\n", start_ticks(pid)?))
        })
        .collect();
    if let Err(e) = std::fs::write(run_dir.join(PIDS_FILE), lines) {
        tracing::warn!(error = %e, "could not record the VM's process ids");
    }
}

/// A process's state letter (`T`: stopped, `Z`: ended) and field 22 of
/// /proc/PID/stat, its start time, which tells a process from a later one
/// that reuses its pid.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some((
        fields.first()?.chars().next()?,
        fields.get(19)?.parse().ok()?,
    ))
}

/// The start time of a process that has not ended (a zombie has: it is
/// not a process to adopt).
fn start_ticks(pid: u32) -> Option<u64> {
    proc_stat(pid)
        .filter(|(state, _)| *state != 'Z')
        .map(|(_, ticks)| ticks)
}

/// Stops the processes of VMs that nobody tracks any more (their run
/// directories are still under `run_root`, e.g. after the daemon that
/// started them was killed) and removes their run directories, except the
/// directories in `keep` (VMs this process tracks). Returns the names of
/// the VMs stopped.
pub fn reap_leftovers(run_root: &Path, keep: &[PathBuf]) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(run_root) else {
        return found;
    };
    for dir in entries
        .flatten()
        .map(|e| e.path())
        .filter(|d| !keep.contains(d))
    {
        for (pid, ticks) in read_pids(&dir) {
            if start_ticks(pid) == Some(ticks) {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
        let cgroup = cgroup_name(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        if let Some(run_name) = dir.file_name().and_then(|n| n.to_str()) {
            // Its cgroup goes too, once its killed processes are gone.
            if let Some(cgroup) = cgroup {
                drop(VmCgroup::existing(&cgroup));
            }
            if let Some((name, _cid)) = run_name.rsplit_once('.') {
                found.push(name.to_owned());
            }
        }
    }
    found.sort();
    found
}

impl Vmm {
    /// Takes over VM `name` left running by a process that is gone (a
    /// killed daemon): its processes, recorded in its run directory, must
    /// all be alive. The guest reconnects to the new readiness listener by
    /// itself; `None` means there was nothing alive to adopt, or the guest
    /// did not come back within `ready_timeout` (then it was stopped).
    pub async fn adopt(
        &self,
        name: &str,
        console_log: PathBuf,
        ready_timeout: Duration,
    ) -> Result<Option<Vm>, VmmError> {
        let Some((run_dir, cid)) = self.find_run_dir(name) else {
            return Ok(None);
        };
        let recorded = read_pids(&run_dir);
        let stats: Vec<Option<(char, u64)>> =
            recorded.iter().map(|(pid, _)| proc_stat(*pid)).collect();
        let alive = !recorded.is_empty()
            && recorded.iter().zip(&stats).all(|((_, ticks), stat)| {
                matches!(stat, Some((state, started)) if *state != 'Z' && started == ticks)
            });
        if !alive {
            return Ok(None);
        }
        // The VM's VMM holds its CID's lock (it inherited it at launch); a
        // VM started before it did has none, and takes it again here.
        let lease = match cid::lease(&self.config.cid_dir, cid) {
            Err(VmmError::CidInUse(_)) => {
                cid::CidLease::held_by(&self.config.cid_dir, cid, recorded[0].0)?
            }
            other => other?,
        };
        let io = |action: &str| {
            let (vm, action) = (name.to_owned(), action.to_owned());
            move |source| VmmError::Io { vm, action, source }
        };
        let mut processes = Vec::new();
        for (i, (pid, _)) in recorded.iter().enumerate() {
            let role = if i == 0 { "vmm" } else { "helper" };
            processes.push(Watched::adopt(role, *pid).map_err(io("watch its processes"))?);
        }
        let vmm = processes.remove(0);
        let run_as = self.run_as(cid)?;
        // VMs started before the sockets moved out of the run directory
        // keep them there.
        let vsock_uds = Some(run_dir.join(VSOCK_SOCKET))
            .filter(|legacy| legacy.exists())
            .unwrap_or_else(|| {
                self.config
                    .vsock_root
                    .join(cid.to_string())
                    .join(VSOCK_SOCKET)
            });
        // The console goes on where it was (the old capture ended with
        // the daemon that ran it; meanwhile the VMM dropped the output).
        let console_log = console::LogPath::from(console_log);
        console::capture(
            run_dir.join(CONSOLE_SOCKET),
            console_log.clone(),
            self.config.console_cap_bytes,
            false,
        );
        let readiness =
            listen_ready(&vsock_uds, run_as).map_err(io("listen for the guest's readiness"))?;
        let mut state = readiness.subscribe();
        let mut exit = vmm.exit_watch();
        // A VM paused by pause_vm stays paused if it still is (every
        // process stopped): its guest reconnects once resumed. One
        // continued meanwhile (its workspace may have thawed by itself),
        // or stopped by a pause cut short before it was recorded (it would
        // never answer), runs on: its guest thaws its workspace by itself
        // (see the daemon).
        let left_paused = run_dir.join(PAUSED_FILE).exists()
            && stats.iter().all(|stat| matches!(stat, Some(('T', _))));
        if !left_paused {
            let _ = std::fs::remove_file(run_dir.join(PAUSED_FILE));
            for (pid, _) in recorded.iter().rev() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid as i32),
                    Signal::SIGCONT,
                );
            }
        }
        let ready = left_paused || tokio::time::timeout(ready_timeout, async {
            tokio::select! {
                ready = state.wait_for(|s| matches!(s, GuestState::Ready { .. })) => ready.is_ok(),
                _ = exit.wait_for(Option::is_some) => false,
            }
        })
        .await
        .unwrap_or(false);
        // Limits again (a VMM adopted from a dead daemon is still in its
        // cgroup; the limits are written anew).
        let cgroup = VmCgroup::create(
            &cgroup_name(&run_dir).unwrap_or_else(|| format!("{name}.{cid}")),
            recorded_limits(&run_dir),
        );
        if let Some(cgroup) = &cgroup {
            for (pid, _) in &recorded {
                let _ = cgroup.add(*pid);
            }
        }
        let vm = Vm {
            name: name.to_owned(),
            lease,
            accel: Resolved::Tcg,
            run_dir,
            vsock_uds,
            console_log,
            vmm,
            helpers: processes,
            readiness: Some(readiness),
            ready_after: Duration::ZERO,
            config: self.config.clone(),
            cgroup,
            cut_off: Arc::default(),
            paused: Arc::new(std::sync::atomic::AtomicBool::new(left_paused)),
            finished: false,
        };
        if !ready {
            tracing::warn!(
                vm = name,
                "adopted VM's guest never reconnected; stopping it"
            );
            vm.kill().await;
            return Ok(None);
        }
        tracing::info!(vm = name, cid, paused = left_paused, "adopted a running VM");
        Ok(Some(Vm::guarded(vm)))
    }

    fn find_run_dir(&self, name: &str) -> Option<(PathBuf, u32)> {
        std::fs::read_dir(&self.config.run_root)
            .ok()?
            .flatten()
            .find_map(|e| {
                let file = e.file_name();
                let (vm, cid) = file.to_str()?.rsplit_once('.')?;
                (vm == name).then_some((e.path(), cid.parse().ok()?))
            })
    }
}

/// The size a VM was started with (1 vCPU and 256 MiB if not recorded).
fn recorded_limits(run_dir: &Path) -> VmLimits {
    let text = std::fs::read_to_string(run_dir.join(LIMITS_FILE)).unwrap_or_default();
    let mut fields = text.split_whitespace().map(str::parse::<u32>);
    match (fields.next(), fields.next()) {
        (Some(Ok(vcpus)), Some(Ok(memory_mib))) => VmLimits { vcpus, memory_mib },
        _ => VmLimits {
            vcpus: 1,
            memory_mib: 256,
        },
    }
}

fn read_pids(run_dir: &Path) -> Vec<(u32, u64)> {
    std::fs::read_to_string(run_dir.join(PIDS_FILE))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .filter(|(pid, _)| *pid > 1)
        .collect()
}

/// The readiness listener, connectable by the vsock helper's uid.
fn listen_ready(vsock_uds: &Path, run_as: Option<u32>) -> std::io::Result<Readiness> {
    let path = ready_socket(vsock_uds);
    let readiness = Readiness::listen(&path)?;
    if let Some(uid) = run_as {
        // lchown: see listen_guest_port.
        std::os::unix::fs::lchown(&path, Some(uid), Some(uid))?;
    }
    Ok(readiness)
}

/// Hybrid vsock delivers guest connections to host port P on `<uds>_P`.
fn ready_socket(vsock_uds: &Path) -> PathBuf {
    let mut path = vsock_uds.as_os_str().to_owned();
    path.push(format!("_{}", crate::READY_PORT));
    PathBuf::from(path)
}

/// Cleans up a start that did not finish.
struct Pending {
    run_dir: PathBuf,
    vsock_dir: Option<PathBuf>,
    processes: Vec<Option<u32>>,
}

impl Pending {
    async fn kill(&mut self, vmm: &Watched, helpers: &[Watched]) {
        vmm.signal(Signal::SIGKILL);
        vmm.wait_for(Duration::from_secs(10)).await;
        for helper in helpers {
            helper.terminate(Duration::from_secs(2)).await;
        }
        self.processes.clear();
        let _ = std::fs::remove_dir_all(&self.run_dir);
        if let Some(dir) = self.vsock_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    fn disarm(&mut self) {
        self.processes.clear();
        self.run_dir = PathBuf::new();
        self.vsock_dir = None;
    }
}

impl Drop for Pending {
    /// The start future was dropped midway (cancelled): leave nothing.
    fn drop(&mut self) {
        for pid in self.processes.drain(..).flatten() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        if !self.run_dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.run_dir);
        }
        if let Some(dir) = self.vsock_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// What it takes to reach a running VM's guest: its vsock socket, and the
/// readiness and exit state to check first.
#[derive(Debug, Clone)]
pub struct GuestEndpoint {
    vm: String,
    uds: PathBuf,
    paused: Arc<std::sync::atomic::AtomicBool>,
    state: Option<tokio::sync::watch::Receiver<GuestState>>,
    exit: tokio::sync::watch::Receiver<Option<ExitStatus>>,
    connect_timeout: Duration,
}

impl GuestEndpoint {
    /// Waits up to `timeout` for the guest to be ready; returns whether it is.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let Some(mut state) = self.state.clone() else {
            return false;
        };
        tokio::time::timeout(
            timeout,
            state.wait_for(|s| matches!(s, GuestState::Ready { .. })),
        )
        .await
        .is_ok_and(|r| r.is_ok())
    }

    /// The guest's state as it changes (None when the VM has no readiness
    /// listener any more).
    pub fn guest_states(&self) -> Option<tokio::sync::watch::Receiver<GuestState>> {
        self.state.clone()
    }

    /// Its vCPUs are stopped (pause_vm): it cannot answer until resumed.
    pub fn is_paused(&self) -> bool {
        self.paused.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Resolves once the VMM process has exited.
    pub async fn exited(&self) {
        let mut exit = self.exit.clone();
        let _ = exit.wait_for(Option::is_some).await;
    }

    /// Connects to guest `port`, refusing unless the guest is ready.
    pub async fn connect(&self, port: u32) -> Result<UnixStream, VmmError> {
        let not_ready = |why: &str| VmmError::NotReady {
            vm: self.vm.clone(),
            why: why.to_owned(),
        };
        if self.exit.borrow().is_some() {
            return Err(not_ready("the VM has exited"));
        }
        if self.is_paused() {
            return Err(VmmError::Paused {
                vm: self.vm.clone(),
            });
        }
        match self.state.as_ref().map(|s| s.borrow().clone()) {
            Some(GuestState::Ready { .. }) => {}
            Some(GuestState::Booting) => {
                return Err(not_ready("the guest has not signalled readiness yet"));
            }
            _ => {
                return Err(not_ready(
                    "guest-mcp closed its readiness connection (restarting, or the guest is shutting down)",
                ));
            }
        }
        vsock::connect(&self.uds, port, self.connect_timeout)
            .await
            .map_err(|source| VmmError::Vsock {
                vm: self.vm.clone(),
                port,
                source,
            })
    }
}

/// How a VM was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMethod {
    /// It had already exited by itself.
    AlreadyExited,
    /// The guest powered off when asked through its control channel.
    Graceful,
    /// The VMM ended on SIGTERM.
    Terminated,
    /// The VMM needed SIGKILL.
    Killed,
}

#[derive(Debug, Clone)]
pub struct StopReport {
    pub method: StopMethod,
    /// Why the graceful step was skipped or failed, if it was.
    pub graceful_error: Option<String>,
    pub vmm_exit: String,
    pub took: Duration,
}

/// A running VM. Dropping it without [`Vm::stop`] kills it at once.
pub struct Vm {
    name: String,
    lease: CidLease,
    accel: Resolved,
    run_dir: PathBuf,
    vsock_uds: PathBuf,
    console_log: console::LogPath,
    vmm: Watched,
    helpers: Vec<Watched>,
    readiness: Option<Readiness>,
    ready_after: Duration,
    config: VmmConfig,
    /// Its host processes' limits; removed with the VM.
    cgroup: Option<VmCgroup>,
    /// Set when a helper's death made nexusd kill the VMM: why.
    cut_off: Arc<std::sync::OnceLock<String>>,
    /// Its processes are stopped: nothing may wait on its guest.
    paused: Arc<std::sync::atomic::AtomicBool>,
    finished: bool,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("name", &self.name)
            .field("cid", &self.lease.cid())
            .field("run_dir", &self.run_dir)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// A VM whose vsock helper dies can never reach its guest again: its
    /// VMM is killed then, so that the VM exits (and is reaped, reported
    /// and startable) like one that died by itself.
    fn guarded(vm: Vm) -> Vm {
        for helper in &vm.helpers {
            let (role, mut gone) = (helper.name, helper.exit_watch());
            let mut vmm_exit = vm.vmm.exit_watch();
            let vmm_pid = vm.vmm.pid();
            let cut_off = vm.cut_off.clone();
            let name = vm.name.clone();
            tokio::spawn(async move {
                let helper_first = tokio::select! {
                    r = vmm_exit.wait_for(Option::is_some) => { drop(r); false }
                    r = gone.wait_for(Option::is_some) => { drop(r); true }
                };
                if !helper_first {
                    return;
                }
                // A helper ends by itself when its VMM does: the VMM may
                // be exiting already.
                let grace = tokio::time::timeout(
                    Duration::from_millis(500),
                    vmm_exit.wait_for(Option::is_some),
                )
                .await
                .is_ok();
                if grace {
                    return;
                }
                let why = format!(
                    "its {role} process ended, which cut it off from its guest; nexusd killed its VMM"
                );
                tracing::warn!(vm = name, why, "VM cut off from its guest");
                let _ = cut_off.set(why);
                if let Some(pid) = vmm_pid {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        Signal::SIGKILL,
                    );
                }
            });
        }
        vm
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn cid(&self) -> u32 {
        self.lease.cid()
    }

    pub fn accel(&self) -> Resolved {
        self.accel
    }

    /// The hybrid-vsock socket (Firecracker's `uds_path`).
    pub fn vsock_uds(&self) -> &Path {
        &self.vsock_uds
    }

    /// Listens for the guest's connections to host port `port` (hybrid
    /// vsock delivers them on `<uds>_<port>`), replacing a stale socket;
    /// connectable by the vsock helper's uid, as the readiness socket is.
    pub fn listen_guest_port(&self, port: u32) -> std::io::Result<tokio::net::UnixListener> {
        let mut path = self.vsock_uds.as_os_str().to_owned();
        path.push(format!("_{port}"));
        let path = PathBuf::from(path);
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path)?;
        if let Some(base) = self.config.vm_uid_base
            && let Some(uid) = base.checked_add(self.cid())
        {
            // lchown: the directory is the VMM's uid's, and a symlink put
            // there must not hand a host file to it.
            std::os::unix::fs::lchown(&path, Some(uid), Some(uid))?;
        }
        Ok(listener)
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    pub fn console_log(&self) -> PathBuf {
        self.console_log.get()
    }

    /// Gives the running VM a new name (a pooled VM taken by a user): its
    /// run directory moves into `run_root` (on the same filesystem) and
    /// its console log to `console_log`; its processes, sockets and CID
    /// stay as they are.
    pub fn rename(
        &mut self,
        name: &str,
        run_root: &Path,
        console_log: &Path,
    ) -> Result<(), VmmError> {
        crate::spec::validate_name(name)?;
        let io = |action: String| {
            let vm = name.to_owned();
            move |source| VmmError::Io { vm, action, source }
        };
        let run_dir = run_root.join(format!("{name}.{}", self.lease.cid()));
        if run_dir.join(CONSOLE_SOCKET).as_os_str().len() > MAX_UDS_PATH {
            return Err(VmmError::InvalidSpec(format!(
                "run directory {} is too long for Unix sockets: keep run_root under {} bytes",
                run_dir.display(),
                MAX_UDS_PATH - 30
            )));
        }
        std::fs::create_dir_all(run_root).map_err(io(format!("create {}", run_root.display())))?;
        std::fs::rename(&self.run_dir, &run_dir).map_err(io(format!(
            "move its run directory to {}",
            run_dir.display()
        )))?;
        if let Err(e) = self.console_log.rename(console_log) {
            let _ = std::fs::rename(&run_dir, &self.run_dir);
            return Err(io(format!(
                "move its console log to {}",
                console_log.display()
            ))(e));
        }
        self.run_dir = run_dir;
        self.config.run_root = run_root.to_path_buf();
        self.name = name.to_owned();
        Ok(())
    }

    /// Time from launching the VMM to the guest's readiness signal (for
    /// a VM booted ahead of need, what [`Vm::set_ready_after`] says).
    pub fn ready_after(&self) -> Duration {
        self.ready_after
    }

    /// A VM booted ahead of need and taken now: the time the taking took
    /// is how long its user waited for it.
    pub fn set_ready_after(&mut self, took: Duration) {
        self.ready_after = took;
    }

    /// Process ids of the VMM and its helpers, for checks and adoption.
    pub fn pids(&self) -> Vec<u32> {
        std::iter::once(&self.vmm)
            .chain(&self.helpers)
            .filter_map(Watched::pid)
            .collect()
    }

    /// A cheap handle for reaching the guest without holding the `Vm`
    /// (callers keep VMs in maps they should not lock across a connect).
    pub fn endpoint(&self) -> GuestEndpoint {
        GuestEndpoint {
            vm: self.name.clone(),
            uds: self.vsock_uds.clone(),
            paused: self.paused.clone(),
            state: self.readiness.as_ref().map(Readiness::subscribe),
            exit: self.vmm.exit_watch(),
            connect_timeout: self.config.connect_timeout,
        }
    }

    /// A handle that pauses and resumes it, to use without holding the
    /// `Vm` (callers keep VMs in maps they should not lock meanwhile).
    pub fn machine(&self) -> Result<Machine, VmmError> {
        if self.exit_status().is_some() {
            return Err(VmmError::Machine {
                vm: self.name.clone(),
                why: "it has exited".into(),
            });
        }
        let processes = std::iter::once(&self.vmm)
            .chain(&self.helpers)
            .filter_map(|w| Some((w.pid()?, w.exit_watch())))
            .collect();
        Ok(Machine {
            vm: self.name.clone(),
            processes,
            paused: self.paused.clone(),
            run_dir: self.run_dir.clone(),
        })
    }

    /// Its vCPUs are stopped ([`Machine::pause`]).
    pub fn is_paused(&self) -> bool {
        self.paused.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn guest_state(&self) -> GuestState {
        self.readiness
            .as_ref()
            .map_or(GuestState::Gone, Readiness::state)
    }

    /// Why the VMM exited, if it has.
    pub fn exit_status(&self) -> Option<String> {
        let status = self.vmm.exit_description()?;
        Some(match self.cut_off.get() {
            Some(why) => why.clone(),
            None => status,
        })
    }

    /// Resolves when the VMM exits, with how it exited.
    pub async fn exited(&self) -> String {
        let mut exit = self.vmm.exit_watch();
        let _ = exit.wait_for(Option::is_some).await;
        self.vmm.exit_description().unwrap_or_default()
    }

    /// Opens a connection to guest vsock `port`. Refused unless the guest has
    /// signalled readiness: an early connection can break a VM's vsock.
    pub async fn connect(&self, port: u32) -> Result<UnixStream, VmmError> {
        if let Some(status) = self.exit_status() {
            return Err(VmmError::NotReady {
                vm: self.name.clone(),
                why: format!("the VM has exited ({status})"),
            });
        }
        self.endpoint().connect(port).await
    }

    /// Stops the VM: power-off through the guest's control channel, then
    /// SIGTERM, then SIGKILL. Afterwards no process, socket or run-time file
    /// of the VM is left (the console log is kept).
    #[tracing::instrument(skip_all, fields(vm = %self.name))]
    pub async fn stop(mut self) -> StopReport {
        let started = Instant::now();
        let mut graceful_error = None;
        // A paused guest cannot power off: it runs again first. If it
        // cannot, it is killed (a stopped process would only take its
        // SIGTERM once continued).
        if self.is_paused() {
            let resumed = match self.machine() {
                Ok(machine) => machine.resume().await,
                Err(e) => Err(e),
            };
            if let Err(e) = resumed {
                tracing::warn!(error = %e, "could not resume the paused VM to stop it; killing it");
                self.vmm.signal(Signal::SIGKILL);
                for helper in &self.helpers {
                    helper.signal(Signal::SIGCONT);
                }
            } else {
                // One adopted paused reconnects its guest only now (within
                // the time a power-off has; else it is escalated).
                self.endpoint()
                    .wait_ready(self.config.graceful_timeout)
                    .await;
            }
        }
        let method = if self.vmm.exit_status().is_some() {
            StopMethod::AlreadyExited
        } else {
            let asked = match self.guest_state() {
                GuestState::Ready { .. } => {
                    control::request_poweroff(&self.vsock_uds, self.config.connect_timeout).await
                }
                other => Err(format!("guest not ready ({other:?})")),
            };
            match asked {
                Ok(())
                    if self
                        .vmm
                        .wait_for(self.config.graceful_timeout)
                        .await
                        .is_some() =>
                {
                    StopMethod::Graceful
                }
                Ok(()) => {
                    graceful_error = Some(format!(
                        "the guest accepted but did not power off within {:?}",
                        self.config.graceful_timeout
                    ));
                    self.escalate().await
                }
                Err(e) => {
                    graceful_error = Some(e);
                    self.escalate().await
                }
            }
        };
        if let Some(why) = &graceful_error {
            tracing::warn!(why, "graceful stop failed; used signals");
        }
        let vmm_exit = self.exit_status().unwrap_or_default();
        self.cleanup().await;
        StopReport {
            method,
            graceful_error,
            vmm_exit,
            took: started.elapsed(),
        }
    }

    /// Kills the VM at once, without asking the guest.
    pub async fn kill(mut self) {
        self.vmm.signal(Signal::SIGKILL);
        self.vmm.wait_for(Duration::from_secs(10)).await;
        self.cleanup().await;
    }

    async fn escalate(&self) -> StopMethod {
        if self.vmm.terminate(self.config.term_timeout).await {
            StopMethod::Killed
        } else {
            StopMethod::Terminated
        }
    }

    /// The VM's vsock directory (not a legacy one in the run directory,
    /// which goes with it).
    fn remove_vsock_dir(&self) {
        if let Some(dir) = self.vsock_uds.parent()
            && dir.starts_with(&self.config.vsock_root)
        {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    async fn cleanup(&mut self) {
        for helper in &self.helpers {
            helper.terminate(Duration::from_secs(2)).await;
        }
        // Empty now: it goes.
        self.cgroup = None;
        self.readiness = None;
        let _ = std::fs::remove_dir_all(&self.run_dir);
        self.remove_vsock_dir();
        self.finished = true;
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // No runtime to wait on here: kill everything and remove the files.
        self.vmm.signal(Signal::SIGKILL);
        for helper in &self.helpers {
            helper.signal(Signal::SIGKILL);
        }
        self.readiness = None;
        let _ = std::fs::remove_dir_all(&self.run_dir);
        self.remove_vsock_dir();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(pid: u32) -> char {
        proc_stat(pid).map_or('?', |(state, _)| state)
    }

    #[tokio::test]
    async fn a_machine_stops_and_continues_all_its_processes_even_past_one_that_ended() {
        let dir = tempfile::tempdir().unwrap();
        let mut children: Vec<std::process::Child> = (0..2)
            .map(|_| {
                std::process::Command::new("sleep")
                    .arg("30")
                    .spawn()
                    .unwrap()
            })
            .collect();
        let (ended_tx, ended_rx) = tokio::sync::watch::channel(None);
        let live = tokio::sync::watch::channel(None).1;
        let machine = Machine {
            vm: "t".into(),
            processes: vec![(children[0].id(), live.clone()), (children[1].id(), live)],
            paused: Arc::default(),
            run_dir: dir.path().to_path_buf(),
        };
        machine.pause().await.unwrap();
        assert!(machine.paused.load(std::sync::atomic::Ordering::SeqCst));
        assert!(
            dir.path().join(PAUSED_FILE).exists(),
            "the pause is recorded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(children.iter().all(|c| state(c.id()) == 'T'));
        machine.resume().await.unwrap();
        assert!(!dir.path().join(PAUSED_FILE).exists(), "and unrecorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(children.iter().all(|c| state(c.id()) != 'T'));

        // One process has ended (its exit recorded): the other is still
        // stopped and continued, and the failure names the ended one.
        let (a, b) = (children[0].id(), children[1].id());
        let with_ended = Machine {
            vm: "t".into(),
            processes: vec![(a, ended_rx), (b, tokio::sync::watch::channel(None).1)],
            paused: Arc::default(),
            run_dir: dir.path().to_path_buf(),
        };
        ended_tx.send_replace(Some(std::os::unix::process::ExitStatusExt::from_raw(0)));
        let err = with_ended.pause().await.unwrap_err().to_string();
        assert!(
            err.contains(&format!("its process {a} has exited")),
            "{err}"
        );
        assert!(!with_ended.paused.load(std::sync::atomic::Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_ne!(state(b), 'T', "a failed pause continues what it stopped");
        for child in &mut children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
