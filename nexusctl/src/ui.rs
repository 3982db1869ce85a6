//! What people see besides answers: colour (never with `NO_COLOR`, never
//! into a pipe) and progress on stderr (only when stderr is a terminal,
//! so scripts and logs get none).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// `NO_COLOR` set to anything but empty turns colour off (no-color.org).
pub fn no_color() -> bool {
    std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
}

/// Whether stdout gets colour.
pub fn colors() -> bool {
    !no_color() && std::io::stdout().is_terminal()
}

/// Whether progress is drawn (on stderr).
pub fn progress_shown() -> bool {
    std::io::stderr().is_terminal()
}

/// A spinner saying `what` while work goes on; hidden off a terminal.
pub fn spinner(what: &str) -> ProgressBar {
    let bar = if progress_shown() {
        ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// A bar over `total` bytes; hidden off a terminal.
pub fn bytes_bar(total: u64, what: &str) -> ProgressBar {
    let bar = if progress_shown() {
        ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

/// `text` in the colour its meaning takes (a VM's or token's state).
pub fn paint_state(text: &str) -> String {
    let code = match text {
        "running" | "answering" | "active" | "ok" => "32",
        "stopped" | "paused" | "expired" | "revoked" | "denied" => "33",
        t if t.starts_with("unresponsive") || t.ends_with("error") => "31",
        _ => return text.to_owned(),
    };
    format!("\u{1b}[{code}m{text}\u{1b}[0m")
}

/// Text a guest wrote, made safe to show: no escape sequences (a guest
/// must not drive the admin's terminal: titles, clipboard, cursor), no
/// carriage returns; line ends and tabs kept.
pub fn printable(text: &str) -> String {
    text.chars()
        .filter(|&c| c != '\r')
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                '\u{fffd}'
            } else {
                c
            }
        })
        .collect()
}

/// `text` painted where stdout takes colour.
pub fn paint_if(text: &str) -> String {
    if colors() {
        paint_state(text)
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_text_loses_its_escapes_but_keeps_its_lines() {
        assert_eq!(
            printable("ok\r\n\u{1b}]52;c;aGk=\u{7}next\tx\n"),
            "ok\n\u{fffd}]52;c;aGk=\u{fffd}next\tx\n"
        );
    }

    #[test]
    fn states_are_painted_and_the_rest_left_alone() {
        assert_eq!(paint_state("running"), "\u{1b}[32mrunning\u{1b}[0m");
        assert_eq!(paint_state("agent1"), "agent1");
    }
}
