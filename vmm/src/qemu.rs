//! The QEMU `microvm` backend.
//!
//! vsock comes from `vhost-device-vsock` (rust-vmm), one process per VM: it
//! gives QEMU VMs exactly Firecracker's hybrid-vsock interface on the host,
//! and one process per VM keeps VMs from reaching each other directly
//! (VMs in one process that share a group can).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::accel::{Resolved, host_tsc_khz};
use crate::backend::{Backend, BackendKind, LaunchFuture, LaunchRequest, Launched};
use crate::{VmSpec, VmmError};

/// vhost-device-vsock creates its vhost-user socket shortly after start.
const VHOST_SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// The pinned vhost-device-vsock version scripts/install-deps.sh installs.
pub const VHOST_VSOCK_VERSION: &str = "0.3.0";

#[derive(Debug, Clone)]
pub struct QemuBackend {
    pub qemu: PathBuf,
    pub vhost_vsock: PathBuf,
}

impl QemuBackend {
    /// Finds both programs, explicitly given or on `PATH`.
    pub fn locate(qemu: Option<PathBuf>, vhost_vsock: Option<PathBuf>) -> Result<Self, VmmError> {
        let qemu = locate_program(
            qemu,
            "qemu-system-x86_64",
            "; install it with `apt-get install qemu-system-x86` (scripts/install-deps.sh does)",
        )?;
        let vhost_vsock = locate_program(
            vhost_vsock,
            "vhost-device-vsock",
            &format!(
                "; install it with `cargo install --locked vhost-device-vsock --version {VHOST_VSOCK_VERSION}` \
                 (scripts/install-deps.sh does) or set its path in the configuration"
            ),
        )?;
        Ok(Self { qemu, vhost_vsock })
    }

    /// The full QEMU command line for a request (without the program).
    pub fn qemu_args(req: &LaunchRequest<'_>, vhost_socket: &Path) -> Vec<String> {
        let spec = req.spec;
        let mem = spec.memory_mib;
        let acpi = if spec.acpi { "on" } else { "off" };
        let mut args: Vec<String> = vec![
            "-M".into(),
            format!(
                "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi={acpi},memory-backend=mem"
            ),
            // vhost-user devices need guest memory the helper can map.
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
            "-m".into(),
            format!("{mem}M"),
            "-smp".into(),
            spec.vcpus.to_string(),
        ];
        match req.accel {
            Resolved::Kvm => {
                args.extend(["-accel".into(), "kvm".into(), "-cpu".into(), "host".into()])
            }
            // The translation cache bounded: the VM's cgroup allows the
            // VMM 512 MiB beyond the guest's memory (see `cgroup`).
            Resolved::Tcg => args.extend([
                "-accel".into(),
                "tcg,tb-size=256".into(),
                "-cpu".into(),
                "max".into(),
            ]),
        }
        args.extend([
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-nographic".into(),
            // The guest powers off by resetting; make a reset end QEMU.
            "-no-reboot".into(),
            "-chardev".into(),
            format!(
                "socket,id=console,path={},server=on,wait=on",
                req.paths.console_socket.display()
            ),
            "-serial".into(),
            "chardev:console".into(),
            "-kernel".into(),
            spec.kernel.display().to_string(),
            "-append".into(),
            kernel_cmdline(spec, req.accel),
        ]);
        if let Some(initrd) = &spec.initrd {
            args.extend(["-initrd".into(), initrd.display().to_string()]);
        }
        for (i, drive) in spec.drives.iter().enumerate() {
            let ro = if drive.read_only { ",readonly=on" } else { "" };
            args.extend([
                "-drive".into(),
                // An I/O error (a full pool) is the guest's to see, not a
                // reason to pause the VM silently.
                format!(
                    "id=drive{i},file={},format=raw,if=none,cache=none,aio=threads,werror=report,rerror=report{ro}",
                    drive.path.display()
                ),
                "-device".into(),
                format!("virtio-blk-device,drive=drive{i}"),
            ]);
        }
        args.extend([
            "-chardev".into(),
            format!("socket,id=vsock,path={}", vhost_socket.display()),
            "-device".into(),
            "vhost-user-vsock-device,chardev=vsock".into(),
            // Entropy from the host's getrandom(): nothing in the guest
            // waits for its random pool to fill.
            "-object".into(),
            "rng-builtin,id=rng0".into(),
            "-device".into(),
            "virtio-rng-device,rng=rng0".into(),
            // Free page reporting: the guest reports memory it has freed
            // and QEMU punches it out of the memfd, so the host gets back
            // what a VM used once (a build, a test run). The guest's
            // early boot sets how small a run of free pages it reports
            // (rootfs/guest/rcS). The balloon itself is never inflated:
            // the guest's memory stays its own.
            "-device".into(),
            "virtio-balloon-device,free-page-reporting=on,deflate-on-oom=on".into(),
            // A guest that breaks out of the device models finds a process
            // that cannot run programs, use obsolete system calls or change
            // its limits...
            "-sandbox".into(),
            "on,obsolete=deny,spawn=deny,resourcecontrol=deny,elevateprivileges=allow".into(),
        ]);
        // ...and, once QEMU has opened what it needs, no root: a uid of
        // its own per VM (set*id stays allowed above only for this drop).
        if let Some(uid) = req.run_as {
            args.extend(["-runas".into(), format!("{uid}:{uid}")]);
        }
        args
    }

    /// Where vhost-device-vsock serves QEMU: beside the vsock socket, in
    /// the directory the helper's uid owns.
    pub fn vhost_socket(req: &LaunchRequest<'_>) -> PathBuf {
        req.paths.vsock_uds.with_file_name("vhost.sock")
    }

    /// The vhost-device-vsock arguments for a request.
    pub fn vhost_args(req: &LaunchRequest<'_>, vhost_socket: &Path) -> Vec<String> {
        vec![
            "--guest-cid".into(),
            req.cid.to_string(),
            "--socket".into(),
            vhost_socket.display().to_string(),
            "--uds-path".into(),
            req.paths.vsock_uds.display().to_string(),
        ]
    }
}

/// The image's command line plus what this backend needs: the console on
/// the first UART, a panic that resets (and so ends QEMU) at once, a reset
/// by triple fault (microvm has no keyboard controller), and under TCG the
/// host's TSC frequency, without which boots sometimes hang, and no timer
/// IRQ check: on a loaded host an emulated CPU can miss the check's window
/// and the kernel panics ("IO-APIC + timer doesn't work!", seen in CI-like
/// runs with both cores busy).
pub fn kernel_cmdline(spec: &VmSpec, accel: Resolved) -> String {
    let mut cmdline = format!("console=ttyS0 panic=-1 reboot=t {}", spec.cmdline.trim());
    if accel == Resolved::Tcg {
        cmdline.push_str(" no_timer_check");
        if let Some(khz) = host_tsc_khz() {
            cmdline.push_str(&format!(" tsc_early_khz={khz}"));
        }
    }
    cmdline.trim().to_owned()
}

impl Backend for QemuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    fn launch<'a>(&'a self, req: LaunchRequest<'a>) -> LaunchFuture<'a> {
        Box::pin(async move {
            let vm = req.spec.name.clone();
            let run_dir = req.paths.run_dir.clone();
            let vhost_socket = Self::vhost_socket(&req);
            let vhost_log = run_dir.join("vhost-device-vsock.log");
            // The helper parses what the guest puts on the virtqueues: it
            // runs as the VM's uid, which owns the vsock directory and the
            // host listeners there. Its working directory is the run
            // directory (it can do nothing there; `ps` and tests see whose
            // helper it is).
            let mut vhost = spawn_logged(
                &self.vhost_vsock,
                &Self::vhost_args(&req, &vhost_socket),
                &vhost_log,
                None,
                Some(&run_dir),
                req.run_as,
            )
            .map_err(|source| VmmError::Io {
                vm: vm.clone(),
                action: format!("start {}", self.vhost_vsock.display()),
                source,
            })?;
            if let Err(e) = wait_for_socket(&mut vhost, &vhost_socket, &vhost_log, &vm).await {
                kill_now(&mut vhost).await;
                return Err(e);
            }

            let qemu_log = run_dir.join("qemu.log");
            let qemu = spawn_logged(
                &self.qemu,
                &Self::qemu_args(&req, &vhost_socket),
                &qemu_log,
                req.cid_lock,
                None,
                None,
            );
            match qemu {
                Ok(qemu) => Ok(Launched {
                    vmm: qemu,
                    helpers: vec![("vhost-device-vsock", vhost)],
                    vmm_log: Some(qemu_log),
                }),
                Err(source) => {
                    kill_now(&mut vhost).await;
                    Err(VmmError::Io {
                        vm,
                        action: format!("start {}", self.qemu.display()),
                        source,
                    })
                }
            }
        })
    }
}

/// Starts `program` in a session (and so a process group) of its own,
/// output to `log`; `inherit` is a descriptor it keeps open (the CID
/// lock); in `cwd` (entered as root), then as uid and gid `run_as` with no
/// supplementary groups. A group of its own: a signal meant for the
/// caller's group does not reach it. A session of its own: when the
/// caller dies, the kernel does not treat the group as newly orphaned,
/// which would send a paused (stopped) VM SIGHUP, ending QEMU, and then
/// SIGCONT; the VM outlives its daemon paused, to be adopted so.
fn spawn_logged(
    program: &Path,
    args: &[String],
    log: &Path,
    inherit: Option<std::os::fd::RawFd>,
    cwd: Option<&Path>,
    run_as: Option<u32>,
) -> std::io::Result<Child> {
    let out = std::fs::File::create(log)?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: setsid(2) is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    if let Some(fd) = inherit {
        // SAFETY: fcntl(2) is async-signal-safe; it only clears the
        // close-on-exec flag of a descriptor this process owns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    if let Some(cwd) = cwd {
        cmd.current_dir(cwd);
    }
    if let Some(uid) = run_as {
        // The program is opened here, as root, and executed from that
        // descriptor: where it is installed (say /root/.cargo/bin) need
        // not be reachable by the uid it runs as.
        let exe = std::fs::File::open(program)?;
        let exec = ExecFrom::new(&exe, program, args)?;
        // SAFETY: between fork and exec this only makes async-signal-safe
        // system calls (setgroups, setgid, setuid, execveat) on memory
        // prepared before the fork; pre_exec runs after the working
        // directory is entered, so root enters it first.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(0, std::ptr::null()) == -1
                    || libc::setgid(uid) == -1
                    || libc::setuid(uid) == -1
                {
                    return Err(std::io::Error::last_os_error());
                }
                exec.exec();
                Err(std::io::Error::last_os_error())
            });
        }
        let child = cmd.spawn();
        drop(exe);
        return child;
    }
    cmd.spawn()
}

/// A program to execute from an open descriptor, its argument and
/// environment vectors built before the fork.
struct ExecFrom {
    fd: std::os::fd::RawFd,
    _strings: Vec<std::ffi::CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
}

// SAFETY: the pointers point into `_strings`, owned by the same value and
// never changed; the child only reads them.
unsafe impl Send for ExecFrom {}
// SAFETY: as for Send: nothing is ever written through the pointers.
unsafe impl Sync for ExecFrom {}

impl ExecFrom {
    fn new(exe: &std::fs::File, program: &Path, args: &[String]) -> std::io::Result<Self> {
        use std::os::unix::ffi::OsStrExt;
        let c = |bytes: &[u8]| {
            std::ffi::CString::new(bytes).map_err(|e| std::io::Error::other(e.to_string()))
        };
        let name = program.file_name().unwrap_or(program.as_os_str());
        let mut strings = vec![c(name.as_bytes())?];
        for arg in args {
            strings.push(c(arg.as_bytes())?);
        }
        let argc = strings.len();
        for (key, value) in std::env::vars_os() {
            let mut entry = key.as_bytes().to_vec();
            entry.push(b'=');
            entry.extend_from_slice(value.as_bytes());
            strings.push(c(&entry)?);
        }
        let ptrs = |range: &[std::ffi::CString]| {
            range
                .iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect::<Vec<_>>()
        };
        let (argv, envp) = (ptrs(&strings[..argc]), ptrs(&strings[argc..]));
        Ok(Self {
            fd: std::os::fd::AsRawFd::as_raw_fd(exe),
            _strings: strings,
            argv,
            envp,
        })
    }

    /// Replaces the calling process; returns only on failure (errno set).
    fn exec(&self) {
        // SAFETY: execveat with AT_EMPTY_PATH on an open descriptor and
        // NULL-terminated vectors of valid C strings.
        unsafe {
            libc::syscall(
                libc::SYS_execveat,
                self.fd,
                c"".as_ptr(),
                self.argv.as_ptr(),
                self.envp.as_ptr(),
                libc::AT_EMPTY_PATH,
            );
        }
    }
}

async fn wait_for_socket(
    helper: &mut Child,
    socket: &Path,
    log: &Path,
    vm: &str,
) -> Result<(), VmmError> {
    let started = Instant::now();
    while !socket.exists() {
        if let Ok(Some(status)) = helper.try_wait() {
            return Err(VmmError::Io {
                vm: vm.to_owned(),
                action: format!(
                    "start vhost-device-vsock (it exited with {status}: {})",
                    std::fs::read_to_string(log).unwrap_or_default().trim()
                ),
                source: std::io::Error::other("helper exited"),
            });
        }
        if started.elapsed() > VHOST_SOCKET_TIMEOUT {
            return Err(VmmError::Io {
                vm: vm.to_owned(),
                action: format!("wait for vhost-device-vsock to create {}", socket.display()),
                source: std::io::Error::from(std::io::ErrorKind::TimedOut),
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

async fn kill_now(child: &mut Child) {
    let _ = child.start_kill();
    let _ = child.wait().await;
}

fn locate_program(explicit: Option<PathBuf>, name: &str, hint: &str) -> Result<PathBuf, VmmError> {
    if let Some(path) = explicit {
        return if path.is_file() {
            Ok(path)
        } else {
            Err(VmmError::MissingProgram {
                program: format!("{name} (configured as {})", path.display()),
                hint: hint.into(),
            })
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let home_cargo = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin"));
    std::env::split_paths(&path)
        .chain(home_cargo)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| VmmError::MissingProgram {
            program: format!("{name} (searched PATH and ~/.cargo/bin)"),
            hint: hint.into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LaunchPaths;
    use crate::spec::Drive;

    #[test]
    fn command_line_carries_drives_in_order_vsock_and_tsc_under_tcg() {
        let mut spec = VmSpec::new("vm1", "/img/vmlinux");
        spec.cmdline = "root=/dev/vda rw".into();
        spec.drives = vec![
            Drive {
                path: "/vms/vm1/root.ext4".into(),
                read_only: false,
            },
            Drive {
                path: "/vms/vm1/workspace.ext4".into(),
                read_only: true,
            },
        ];
        spec.memory_mib = 512;
        spec.vcpus = 2;
        let req = LaunchRequest {
            spec: &spec,
            cid: 9,
            cid_lock: None,
            run_as: Some(3_000_000_009),
            accel: Resolved::Tcg,
            paths: LaunchPaths {
                run_dir: "/run/vm1".into(),
                vsock_uds: "/run/vm1/vsock.sock".into(),
                console_socket: "/run/vm1/console.sock".into(),
                console_log: "/log/vm1.console".into(),
            },
        };
        let args = QemuBackend::qemu_args(&req, Path::new("/run/vm1/vhost.sock")).join(" ");
        assert!(args.contains("-accel tcg,tb-size=256 -cpu max"), "{args}");
        assert!(args.contains("size=512M,share=on"), "{args}");
        assert!(args.contains("-smp 2"), "{args}");
        assert!(args.contains("acpi=off"), "{args}");
        let root = args.find("file=/vms/vm1/root.ext4").unwrap();
        let ws = args.find("file=/vms/vm1/workspace.ext4").unwrap();
        assert!(root < ws, "root must be vda");
        assert!(
            args.contains("workspace.ext4,format=raw,if=none,cache=none,aio=threads,werror=report,rerror=report,readonly=on")
        );
        assert!(args.contains("path=/run/vm1/vhost.sock"));
        assert!(
            args.contains("-object rng-builtin,id=rng0 -device virtio-rng-device,rng=rng0"),
            "{args}"
        );
        assert!(
            args.contains("-device virtio-balloon-device,free-page-reporting=on"),
            "{args}"
        );
        assert!(
            args.contains("-sandbox on,obsolete=deny,spawn=deny"),
            "{args}"
        );
        assert!(args.contains("-runas 3000000009:3000000009"), "{args}");
        assert!(args.contains("werror=report,rerror=report"), "{args}");
        let cmdline = kernel_cmdline(&spec, Resolved::Tcg);
        assert!(cmdline.starts_with("console=ttyS0 panic=-1 reboot=t root=/dev/vda rw"));
        assert!(cmdline.contains("no_timer_check"), "{cmdline}");
        if host_tsc_khz().is_some() {
            assert!(cmdline.contains("tsc_early_khz="), "{cmdline}");
        }
        assert!(!kernel_cmdline(&spec, Resolved::Kvm).contains("tsc_early_khz"));
        let vhost = QemuBackend::vhost_args(&req, Path::new("/run/vm1/vhost.sock")).join(" ");
        assert_eq!(
            vhost,
            "--guest-cid 9 --socket /run/vm1/vhost.sock --uds-path /run/vm1/vsock.sock"
        );
    }

    #[test]
    fn a_missing_vhost_device_vsock_says_how_to_install_it() {
        let err = QemuBackend::locate(None, Some("/nonexistent/vhost-device-vsock".into()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cargo install --locked vhost-device-vsock --version 0.3.0"),
            "{err}"
        );
    }
}
