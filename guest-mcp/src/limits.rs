//! The limits that keep guest-mcp responsive whatever agents ask of it.
//! Hitting one is a clear tool error, never a hang.

/// Configurable bounds (guest-mcp's command-line flags set them).
#[derive(Debug, Clone)]
pub struct Limits {
    /// `exec` calls running at once; one more is refused.
    pub max_concurrent_execs: usize,
    /// Default and longest `timeout_s` of an `exec`.
    pub default_exec_timeout_s: u64,
    pub max_exec_timeout_s: u64,
    /// Default and largest `max_output_bytes` of an `exec`, per stream.
    pub default_output_bytes: usize,
    pub max_output_bytes: usize,
    /// Background processes kept (running or finished, until removed).
    pub max_processes: usize,
    /// Output kept per background process and stream (a ring buffer).
    pub process_buffer_bytes: usize,
    /// Largest chunk one `read_file` returns and one `write_file` accepts.
    pub max_io_bytes: usize,
    /// Most entries a `list_dir` or `glob` returns, and matches a `grep` returns.
    pub max_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_concurrent_execs: 64,
            default_exec_timeout_s: 60,
            max_exec_timeout_s: 3600,
            default_output_bytes: 1 << 20,
            max_output_bytes: 16 << 20,
            max_processes: 256,
            process_buffer_bytes: 1 << 20,
            max_io_bytes: 8 << 20,
            max_entries: 10_000,
        }
    }
}
