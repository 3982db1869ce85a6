//! The serial console, captured to a log file per VM.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// How much of the end of a log is read to find its last lines.
const TAIL_WINDOW: u64 = 64 * 1024;
/// How much of the end of a log is searched for a kernel panic.
const PANIC_WINDOW: u64 = 1 << 20;

/// The last `lines` lines written to `path` after byte `from` (where this
/// boot's output starts), lossily decoded. Empty if there is no log.
pub fn tail(path: &Path, from: u64, lines: usize) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let start = from.max(len.saturating_sub(TAIL_WINDOW));
    if file.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The first line of this boot's output that says why the kernel died
/// (a panic's stack dump pushes it out of the last lines).
pub fn panic_line(path: &Path, from: u64) -> Option<String> {
    // A boot's panic is near its end: read at most the last window.
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let start = from.max(len.saturating_sub(PANIC_WINDOW));
    file.seek(SeekFrom::Start(start)).ok()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    text.lines()
        .find(|l| l.contains("Kernel panic"))
        .map(|l| l.trim().to_owned())
}

/// The current length of a log, where the next boot's output will start.
pub fn offset(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_reads_only_this_boots_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        std::fs::write(&log, "old boot\n").unwrap();
        let from = offset(&log);
        let body: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&log, format!("old boot\n{body}")).unwrap();
        let tail20 = tail(&log, from, 20);
        assert!(
            tail20.starts_with("line 11\n") && tail20.ends_with("line 30"),
            "{tail20}"
        );
        assert_eq!(tail(&log, from, 100).lines().count(), 30);
        assert_eq!(tail(&dir.path().join("none"), 0, 20), "");
        assert_eq!(panic_line(&log, from), None);
        std::fs::write(
            &log,
            "old Kernel panic\n[ 0.5] Kernel panic - not syncing: x\ntrace\n",
        )
        .unwrap();
        assert_eq!(
            panic_line(&log, 17).as_deref(),
            Some("[ 0.5] Kernel panic - not syncing: x")
        );
    }
}
