//! What the agent's computer is: OS, kernel, CPUs, memory, disks, uptime.

use std::path::Path;

use schemars::JsonSchema;
use serde::Serialize;

#[derive(Debug, Serialize, JsonSchema)]
pub struct SystemInfo {
    /// The distribution's name (os-release), or the kernel's.
    pub os: String,
    pub kernel: String,
    pub hostname: String,
    pub arch: String,
    pub cpus: usize,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub disks: Vec<DiskUsage>,
    pub uptime_s: f64,
    /// 1, 5 and 15 minute load averages.
    pub load_average: [f64; 3],
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct DiskUsage {
    pub mount: String,
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub available_bytes: u64,
}

/// Reads everything from /proc, uname and statvfs; parts that cannot be
/// read are reported as zero rather than failing the whole answer.
pub fn collect(workspace: Option<&Path>) -> SystemInfo {
    let uname = nix::sys::utsname::uname().ok();
    let field = |f: fn(&nix::sys::utsname::UtsName) -> &std::ffi::OsStr| {
        uname
            .as_ref()
            .map(|u| f(u).to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = |key: &str| {
        meminfo
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    let uptime = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut load = loadavg.split_whitespace().map(|v| v.parse().unwrap_or(0.0));
    let load_average = [
        load.next().unwrap_or(0.0),
        load.next().unwrap_or(0.0),
        load.next().unwrap_or(0.0),
    ];
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|r| {
            r.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| format!("{} (busybox)", field(|u| u.sysname())));
    let mut mounts = vec![Path::new("/")];
    if let Some(ws) = workspace
        && ws.is_dir()
    {
        mounts.push(ws);
    }
    SystemInfo {
        os,
        kernel: field(|u| u.release()),
        hostname: field(|u| u.nodename()),
        arch: field(|u| u.machine()),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_total_bytes: mem("MemTotal:"),
        memory_available_bytes: mem("MemAvailable:"),
        disks: mounts.into_iter().filter_map(disk_usage).collect(),
        uptime_s: uptime,
        load_average,
    }
}

fn disk_usage(mount: &Path) -> Option<DiskUsage> {
    let s = nix::sys::statvfs::statvfs(mount).ok()?;
    let frag = s.fragment_size() as u64;
    let total = s.blocks() as u64 * frag;
    let free = s.blocks_free() as u64 * frag;
    Some(DiskUsage {
        mount: mount.display().to_string(),
        total_bytes: total,
        used_bytes: total.saturating_sub(free),
        available_bytes: s.blocks_available() as u64 * frag,
    })
}
