//! Pseudo-terminals for interactive processes (`process_start` with
//! `tty`): the process gets the terminal side as its stdin, stdout and
//! stderr and as its controlling terminal; guest-mcp keeps the other
//! side, reading what it prints, writing what is typed, and resizing it
//! (which sends the process SIGWINCH).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::Stdio;

use nix::fcntl::OFlag;
use nix::pty::{Winsize, grantpt, posix_openpt, ptsname_r, unlockpt};
use nix::sys::stat::Mode;
use tokio::io::unix::AsyncFd;

/// The most rows or columns a terminal may have.
pub const MAX_SIDE: u16 = 1000;

nix::ioctl_write_ptr_bad!(set_winsize, libc::TIOCSWINSZ, Winsize);

/// guest-mcp's side of a terminal.
pub struct Master(AsyncFd<OwnedFd>);

/// A new terminal of `rows` x `cols`: guest-mcp's side, and the three
/// standard streams for the process.
///
/// Both sides are opened close-on-exec from the start (openpty(3) does
/// not): a process started meanwhile, or any later one, must not inherit
/// them, or the terminal would never be hung up and its process would
/// never be seen to end.
pub fn open(rows: u16, cols: u16) -> std::io::Result<(Master, [Stdio; 3])> {
    let flags = OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    let master = posix_openpt(flags | OFlag::O_NONBLOCK)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let slave_path = ptsname_r(&master)?;
    let slave: OwnedFd = nix::fcntl::open(slave_path.as_str(), flags, Mode::empty())?;
    let master = OwnedFd::from(master);
    let size = winsize(rows, cols);
    // SAFETY: the fd is open and `size` a valid winsize the kernel reads.
    unsafe { set_winsize(master.as_raw_fd(), &size) }?;
    let streams = [
        Stdio::from(slave.try_clone()?),
        Stdio::from(slave.try_clone()?),
        Stdio::from(slave),
    ];
    // SAFETY: an OwnedFd's descriptor is open and its own until it is
    // dropped, which only the AsyncFd does.
    let master = unsafe { AsyncFd::register(master) }.map_err(std::io::Error::from)?;
    Ok((Master(master), streams))
}

fn winsize(rows: u16, cols: u16) -> Winsize {
    Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Makes the child a session leader with the terminal on its stdin as
/// its controlling terminal (so that Ctrl-C typed there interrupts it).
pub fn become_session_leader(cmd: &mut tokio::process::Command) {
    // SAFETY: runs in the forked child before exec; setsid(2) and
    // ioctl(2) are async-signal-safe and nothing is allocated.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl Master {
    /// Reads what the process printed; 0 once the terminal is hung up
    /// (every process holding it has closed it).
    pub async fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let mut guard = self.0.readable().await?;
            match guard.try_io(|fd| Ok(nix::unistd::read(fd.get_ref(), buf)?)) {
                Ok(Ok(n)) => return Ok(n),
                // Linux answers EIO once the other side is closed.
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes all of `data`, as typed.
    pub async fn write_all(&self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.0.writable().await?;
            match guard.try_io(|fd| Ok(nix::unistd::write(fd.get_ref().as_fd(), data)?)) {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    /// Gives the terminal a new size; its foreground processes get SIGWINCH.
    pub fn resize(&self, rows: u16, cols: u16) -> std::io::Result<()> {
        let size = winsize(rows, cols);
        // SAFETY: the fd is open for the life of `self` and `size` is a
        // valid winsize the kernel only reads.
        unsafe { set_winsize(self.0.get_ref().as_raw_fd(), &size) }?;
        Ok(())
    }
}
