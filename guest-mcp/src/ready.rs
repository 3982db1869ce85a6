//! The readiness and liveness connection to the host (vsock port 1027).
//!
//! The host must never connect to a guest before the guest's vsock driver is
//! up: early connections can break a VM's vsock for its whole life. So the
//! guest speaks first. Once every server socket is bound, guest-mcp connects
//! to the host on port 1027, writes one `READY guest-mcp <version>` line and
//! keeps the connection open; the host treats its end as the guest going
//! away. If the host closes it (nexusd restarting), guest-mcp connects again.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::sys::socket::{AddressFamily, SockFlag, SockType, VsockAddr, connect, socket};

/// In vhost-device-vsock, a connection to a host port nobody listens on is
/// not refused: it hangs until the connect timeout (2 s by default). A short
/// timeout and a retry loop make readiness arrive soon after the host listens.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// `SO_VM_SOCKETS_CONNECT_TIMEOUT` from linux/vm_sockets.h (the timeval form).
const SO_VM_SOCKETS_CONNECT_TIMEOUT: libc::c_int = 6;

/// The line the guest sends once it is ready.
pub fn ready_line() -> String {
    format!("READY guest-mcp {}\n", env!("CARGO_PKG_VERSION"))
}

/// Keeps a readiness connection to `(cid, port)` open, reconnecting whenever
/// it drops. Never returns; run it on a thread of its own.
pub fn hold_forever(cid: u32, port: u32) -> ! {
    let mut announced = false;
    loop {
        match connect_once(cid, port) {
            Ok(mut conn) => {
                if conn.write_all(ready_line().as_bytes()).is_ok() {
                    if !announced {
                        tracing::info!(cid, port, "readiness signalled to the host");
                        announced = true;
                    }
                    // Block until the host goes away; nothing is ever sent.
                    let mut buf = [0u8; 64];
                    while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
                    tracing::info!("host closed the readiness connection; reconnecting");
                }
            }
            Err(e) => tracing::trace!(error = %e, "readiness connect failed; retrying"),
        }
        std::thread::sleep(RETRY_PAUSE);
    }
}

fn connect_once(cid: u32, port: u32) -> std::io::Result<std::fs::File> {
    let fd: OwnedFd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let timeout = libc::timeval {
        tv_sec: CONNECT_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: CONNECT_TIMEOUT.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: `fd` is an open socket we own; the option value points to a
    // live timeval and its exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::AF_VSOCK,
            SO_VM_SOCKETS_CONNECT_TIMEOUT,
            (&raw const timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    connect(fd.as_raw_fd(), &VsockAddr::new(cid, port))?;
    Ok(std::fs::File::from(fd))
}
