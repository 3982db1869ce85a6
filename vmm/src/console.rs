//! The serial console: captured from the VMM into a size-capped log per VM.
//!
//! The guest controls what it writes to its console, and how much: a guest
//! writing /dev/urandom there must not fill the host's disk. So the VMM
//! writes the console to a Unix socket, not a file; one capture thread per
//! VM reads it and keeps at most `cap` bytes on disk, as two files: the
//! log and, once the log reaches half the cap, its previous half
//! (`<log>.1`). While nothing reads the socket (the daemon died), the VMM
//! drops the output.
//!
//! Each boot starts with a marker line, so that boot errors carry this
//! boot's lines only.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How much of the end of a log is read to find its last lines.
const TAIL_WINDOW: u64 = 64 * 1024;
/// How much of the end of a log is searched for a kernel panic.
const PANIC_WINDOW: u64 = 1 << 20;
/// The line each boot's output starts with.
pub const BOOT_MARKER: &str = "--- nexus: boot ---";
/// How long a capture tries to connect to a VMM's console socket.
const CONNECT_FOR: Duration = Duration::from_secs(10);

/// The previous half of a log.
pub fn older(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// Starts capturing the console socket `socket` into `log`, at most `cap`
/// bytes on disk. With `new_boot`, the output starts a fresh half, after a
/// boot marker. The thread ends when the VMM closes the socket.
pub fn capture(socket: PathBuf, log: impl Into<LogPath>, cap: u64, new_boot: bool) {
    let log = log.into();
    let spawned = std::thread::Builder::new()
        .name("console".into())
        .spawn(move || {
            if let Err(e) = run(&socket, &log, cap, new_boot) {
                tracing::warn!(log = %log.get().display(), error = %e, "console capture ended");
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not start the console capture");
    }
}

/// Where a capture writes: shared with its VM, which may move the log
/// (a pooled VM takes its user's name) while the capture runs.
#[derive(Debug, Clone)]
pub struct LogPath(Arc<Mutex<PathBuf>>);

impl From<PathBuf> for LogPath {
    fn from(path: PathBuf) -> Self {
        Self(Arc::new(Mutex::new(path)))
    }
}

impl LogPath {
    pub fn get(&self) -> PathBuf {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Moves the log and its previous half to `to` (and `to.1`); what the
    /// capture writes from then on goes there.
    pub fn rename(&self, to: &Path) -> std::io::Result<()> {
        let mut path = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let ignore_missing = |r: std::io::Result<()>| match r {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        ignore_missing(std::fs::rename(&*path, to))?;
        // A stale previous half of another log must not follow this one.
        ignore_missing(std::fs::remove_file(older(to)))?;
        ignore_missing(std::fs::rename(older(&path), older(to)))?;
        *path = to.to_path_buf();
        Ok(())
    }
}

fn run(socket: &Path, log: &LogPath, cap: u64, new_boot: bool) -> std::io::Result<()> {
    let started = Instant::now();
    let mut stream = loop {
        match UnixStream::connect(socket) {
            Ok(stream) => break stream,
            Err(e) if started.elapsed() > CONNECT_FOR => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let half = (cap / 2).max(4096);
    let mut ring = Ring::open(log, half)?;
    if new_boot {
        ring.rotate()?;
        ring.write(format!("{BOOT_MARKER}\n").as_bytes())?;
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        ring.write(&buf[..n])?;
    }
}

/// The log and its previous half.
struct Ring {
    log: LogPath,
    file: std::fs::File,
    len: u64,
    half: u64,
}

impl Ring {
    fn open(log: &LogPath, half: u64) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log.get())?;
        let len = file.metadata()?.len();
        Ok(Self {
            log: log.clone(),
            file,
            len,
            half,
        })
    }

    /// The log becomes the previous half; a new log starts.
    fn rotate(&mut self) -> std::io::Result<()> {
        // Held throughout: a rename of the log waits for the rotation.
        let path = self.log.0.lock().unwrap_or_else(|e| e.into_inner());
        match std::fs::rename(&*path, older(&path)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        self.file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&*path)?;
        self.len = 0;
        Ok(())
    }

    fn write(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            if self.len >= self.half {
                self.rotate()?;
            }
            let room = (self.half - self.len) as usize;
            let (now, later) = bytes.split_at(room.min(bytes.len()));
            self.file.write_all(now)?;
            self.len += now.len() as u64;
            bytes = later;
        }
        Ok(())
    }
}

/// The end of a log and its previous half, at most `window` bytes of it,
/// lossily decoded.
fn end_of(log: &Path, window: u64) -> String {
    let read = |path: &Path, max: u64| -> Vec<u8> {
        let Ok(mut file) = std::fs::File::open(path) else {
            return Vec::new();
        };
        let len = file.metadata().map_or(0, |m| m.len());
        if file.seek(SeekFrom::Start(len.saturating_sub(max))).is_err() {
            return Vec::new();
        }
        let mut bytes = Vec::new();
        let _ = file.take(max).read_to_end(&mut bytes);
        bytes
    };
    let newer = read(log, window);
    let mut bytes = if (newer.len() as u64) < window {
        read(&older(log), window - newer.len() as u64)
    } else {
        Vec::new()
    };
    bytes.extend_from_slice(&newer);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// What follows the last boot marker (all of `text` if there is none).
fn this_boot(text: &str) -> &str {
    match text.rfind(BOOT_MARKER) {
        Some(at) => &text[at + BOOT_MARKER.len()..],
        None => text,
    }
}

/// The last `lines` lines of a console log; with `boot_only`, of the
/// latest boot's output only.
pub fn tail(log: &Path, lines: usize, boot_only: bool) -> String {
    let text = end_of(log, TAIL_WINDOW);
    let text = if boot_only { this_boot(&text) } else { &text };
    let all: Vec<&str> = text
        .lines()
        .filter(|l| !l.is_empty() || !boot_only)
        .collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The last `lines` lines as written, line ends kept: a last line
/// without one is still being written (what follows a console needs).
pub fn tail_verbatim(log: &Path, lines: usize) -> String {
    let text = end_of(log, TAIL_WINDOW);
    let all: Vec<&str> = text.split_inclusive('\n').collect();
    all[all.len().saturating_sub(lines)..].concat()
}

/// The first line of the latest boot's output that says why the kernel
/// died (a panic's stack dump pushes it out of the last lines).
pub fn panic_line(log: &Path) -> Option<String> {
    let text = end_of(log, PANIC_WINDOW);
    this_boot(&text)
        .lines()
        .find(|l| l.contains("Kernel panic"))
        .map(|l| l.trim().to_owned())
}

/// The last lines of a plain file (a VMM's own log).
pub fn file_tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(TAIL_WINDOW)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_stays_within_the_cap_and_the_tail_is_this_boots() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("vm.console");
        let cap = 64 * 1024;
        let mut ring = Ring::open(&LogPath::from(log.clone()), cap / 2).unwrap();
        ring.write(b"old boot\nKernel panic - old\n").unwrap();
        ring.rotate().unwrap();
        ring.write(format!("{BOOT_MARKER}\n").as_bytes()).unwrap();
        for i in 0..10_000 {
            ring.write(format!("line {i}\n").as_bytes()).unwrap();
            let on_disk = std::fs::metadata(&log).map_or(0, |m| m.len())
                + std::fs::metadata(older(&log)).map_or(0, |m| m.len());
            assert!(on_disk <= cap, "{on_disk} bytes on disk, cap {cap}");
        }
        let last = tail(&log, 3, false);
        assert_eq!(last, "line 9997\nline 9998\nline 9999");
        assert_eq!(tail_verbatim(&log, 2), "line 9998\nline 9999\n");
        ring.write(b"half a li").unwrap();
        assert_eq!(tail_verbatim(&log, 2), "line 9999\nhalf a li");
        // Flooded past the marker: the tail is still this boot's, and the
        // old boot's panic is not this one's.
        assert_eq!(panic_line(&log), None);
    }

    #[test]
    fn boot_errors_carry_only_this_boots_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("vm.console");
        let mut ring = Ring::open(&LogPath::from(log.clone()), 1 << 20).unwrap();
        ring.write(b"previous boot\nKernel panic - previous\n")
            .unwrap();
        ring.rotate().unwrap();
        ring.write(
            format!("{BOOT_MARKER}\n[ 0.5] Kernel panic - not syncing: x\ntrace\n").as_bytes(),
        )
        .unwrap();
        assert_eq!(
            panic_line(&log).as_deref(),
            Some("[ 0.5] Kernel panic - not syncing: x")
        );
        let boot = tail(&log, 20, true);
        assert!(!boot.contains("previous"), "{boot}");
        assert!(boot.ends_with("trace"), "{boot}");
        assert!(tail(&log, 20, false).contains("previous boot"));
        assert_eq!(tail(&dir.path().join("none"), 20, true), "");
        assert_eq!(tail_verbatim(&dir.path().join("none"), 20), "");
    }

    #[test]
    fn a_log_moved_mid_capture_goes_on_at_its_new_path() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("pool-1.log"), dir.path().join("mine.log"));
        // A stale previous half at the new path must not be taken for ours.
        std::fs::write(older(&to), "someone else's\n").unwrap();
        let path = LogPath::from(from.clone());
        let mut ring = Ring::open(&path, 64).unwrap();
        ring.write(b"booted in the pool\n").unwrap();
        path.rename(&to).unwrap();
        assert_eq!(path.get(), to);
        ring.write(b"claimed\n").unwrap();
        assert!(!from.exists());
        assert_eq!(
            std::fs::read_to_string(&to).unwrap(),
            "booted in the pool\nclaimed\n"
        );
        assert!(!older(&to).exists());
        // Rotation follows the move.
        ring.write(&[b'x'; 100]).unwrap();
        assert!(older(&to).exists() && !older(&from).exists());
        assert!(tail(&to, 5, false).contains("xxxx"));
    }
}
