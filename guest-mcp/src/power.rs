//! Powering the guest off quickly and cleanly.
//!
//! busybox init's own shutdown sleeps a fixed second twice; a VM that stops
//! in 2 s is slow to destroy and to test. This does the same steps with a
//! short, bounded grace: every process gets SIGTERM, whatever is left after
//! the grace gets SIGKILL, the workspace is synced and unmounted, root goes
//! read-only, and the machine resets. A microVM has no power button: its
//! VMM exits when the guest resets (QEMU runs with `-no-reboot`; Firecracker
//! always does), so a reset is how a guest powers off.

use std::time::{Duration, Instant};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::reboot::{RebootMode, reboot};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Stops every process, flushes the disks and resets the machine.
pub fn poweroff(grace: Duration) -> ! {
    tracing::info!("powering off");
    // A workspace frozen for a snapshot or a pause would block the sync
    // below: it thaws first.
    crate::freeze::thaw_leftover(std::path::Path::new("/workspace"));
    // kill(-1) reaches every process but init and the caller.
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && other_processes_remain() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    nix::unistd::sync();
    let _ = umount2("/workspace", MntFlags::empty());
    let _ = mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    );
    nix::unistd::sync();
    let _ = reboot(RebootMode::RB_AUTOBOOT);
    // reboot only returns on failure; init will stop us all the same.
    std::process::exit(1)
}

/// Whether a user-space process other than init and this one still runs
/// (kernel threads have an empty command line).
fn other_processes_remain() -> bool {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            return false;
        };
        pid != 1
            && pid != me
            && std::fs::read(e.path().join("cmdline")).is_ok_and(|c| !c.is_empty())
    })
}
