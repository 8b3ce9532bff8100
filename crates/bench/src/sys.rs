//! The machine and its processes as `/proc` shows them, the binaries under test,
//! seeded content, and waiting for a condition with a deadline.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The machine a run measured on, for the report.
#[derive(Clone, Debug)]
pub struct Machine {
    /// Cores the harness may use.
    pub cores: usize,
    /// CPU model name.
    pub cpu: String,
    /// Total memory in GiB.
    pub memory_gib: f64,
    /// Kernel release.
    pub kernel: String,
    /// File system type of the bench directory.
    pub fs: String,
    /// 1-minute load average when the run started and when it ended.
    pub load: (f64, f64),
    /// The commit measured (short hash, `+dirty` when the tree has changes).
    pub commit: String,
}

fn read(path: &str) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

/// The 1-minute load average.
pub fn load_average() -> f64 {
    read("/proc/loadavg").split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
}

/// The repository root: the bench crate is `crates/bench` inside it.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

impl Machine {
    /// What the machine is, with the bench directory `dir`.
    pub fn probe(dir: &Path) -> Machine {
        let cpu = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
            .unwrap_or_else(|| "unknown".into());
        let kib: f64 = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        let fs = Command::new("stat")
            .args(["-f", "-c", "%T"])
            .arg(dir)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let git = |args: &[&str]| {
            Command::new("git")
                .arg("-C")
                .arg(repo_root())
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        };
        let mut commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
        if git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty()) {
            commit.push_str("+dirty");
        }
        Machine {
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            cpu,
            memory_gib: kib / (1024.0 * 1024.0),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            fs,
            load: (load_average(), f64::NAN),
            commit,
        }
    }
}

/// What `/proc/PID/status` says about a process's memory and threads.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcStat {
    /// Resident set size now, KiB.
    pub rss_kib: u64,
    /// Peak resident set size since start (or since the peak was reset), KiB.
    pub hwm_kib: u64,
    /// Threads now.
    pub threads: u64,
}

/// Reads `/proc/PID/status`; None once the process is gone.
pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Some(ProcStat { rss_kib: field("VmRSS:"), hwm_kib: field("VmHWM:"), threads: field("Threads:") })
}

/// A process's CPU time so far (user and system, all its threads), in seconds.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let ticks = ticks_in(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    Some(ticks as f64 / clock_ticks_per_sec())
}

/// utime + stime, in clock ticks, from the text of `/proc/PID/stat`.
fn ticks_in(stat: &str) -> Option<u64> {
    // The fields after the command name, which is in parentheses and may hold
    // spaces and parentheses of its own.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 here.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// `getconf CLK_TCK` (100 on Linux's common architectures, where `/proc` counts
/// in USER_HZ).
fn clock_ticks_per_sec() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// Resets a process's peak RSS (VmHWM) to its current RSS, so that the peak read
/// later is the peak of what happened in between (Linux 4.0+; `clear_refs` 5).
pub fn reset_peak(pid: u32) -> Result<(), String> {
    fs::write(format!("/proc/{pid}/clear_refs"), "5").map_err(|e| format!("cannot reset the peak RSS of {pid}: {e}"))
}

/// A binary built beside this one (`target/release/NAME`).
pub fn bin(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the harness's own path: {e}"))?;
    let path = exe.parent().map(|d| d.join(name)).ok_or("the harness has no directory")?;
    if !path.is_file() {
        return Err(format!(
            "{} is missing: build it first (cargo build --release --workspace --bins)",
            path.display()
        ));
    }
    Ok(path)
}

/// The server's defaults for its timing options, read from its `--help`, so that the
/// report states the settings the run really had.
pub fn server_defaults(server: &Path) -> Vec<(String, String)> {
    let help = Command::new(server)
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    timing_defaults(&help)
}

/// The `[default: N]` of every `--*-ms` option in a clap help text.
fn timing_defaults(help: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in help.lines() {
        let t = line.trim();
        if let Some(flag) = t.strip_prefix("--").and_then(|r| r.split_whitespace().next()) {
            current = Some(flag.to_string());
        }
        if let (Some(flag), Some(i)) = (&current, t.find("[default: ")) {
            if flag.ends_with("-ms") {
                out.push((flag.clone(), t[i + 10..].trim_end_matches(']').to_string()));
            }
            current = None;
        }
    }
    out
}

/// SplitMix64: seeded content that is fresh for every case and run, fast enough to
/// write a GiB in about a second, and reproducible for the check afterwards.
pub use replibox_proto::rng::SplitMix64 as Content;

/// Writes `size` bytes of the stream `seed` to `path`.
pub fn write_content(path: &Path, seed: u64, size: u64) -> io::Result<()> {
    let mut f = io::BufWriter::with_capacity(1 << 20, fs::File::create(path)?);
    let mut c = Content::new(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        c.fill(&mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()
}

/// True when `path` holds exactly the `size` bytes of the stream `seed`.
pub fn has_content(path: &Path, seed: u64, size: u64) -> io::Result<bool> {
    // Buffers no larger than the file: case 9 checks 400,000 files of 1 KiB.
    let buf = size.clamp(1, 1 << 20) as usize;
    let mut f = io::BufReader::with_capacity(buf, fs::File::open(path)?);
    let mut c = Content::new(seed);
    let (mut want, mut got) = (vec![0u8; buf], vec![0u8; buf]);
    let mut left = size;
    while left > 0 {
        let n = left.min(want.len() as u64) as usize;
        c.fill(&mut want[..n]);
        if f.read_exact(&mut got[..n]).is_err() || want[..n] != got[..n] {
            return Ok(false);
        }
        left -= n as u64;
    }
    Ok(f.read(&mut got[..1])? == 0)
}

/// Polls `probe` every `every` until it gives a value, or fails after `deadline`
/// saying what it waited for.
pub fn wait_for<T>(
    what: &str,
    deadline: Duration,
    every: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Result<T, String> {
    let start = Instant::now();
    loop {
        if let Some(t) = probe() {
            return Ok(t);
        }
        if start.elapsed() > deadline {
            return Err(format!("gave up after {:.0} s waiting for {what}", deadline.as_secs_f64()));
        }
        std::thread::sleep(every);
    }
}

/// Free space in MiB on the file system holding `dir`.
pub fn free_mib(dir: &Path) -> Option<u64> {
    let out = Command::new("df").args(["-Pk"]).arg(dir).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let kib: u64 = text.lines().nth(1)?.split_whitespace().nth(3)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_is_reproducible_and_checked() {
        let dir = std::env::temp_dir().join(format!("replibox-bench-unit-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c");
        write_content(&f, 7, 3_000_001).unwrap();
        assert!(has_content(&f, 7, 3_000_001).unwrap());
        assert!(!has_content(&f, 8, 3_000_001).unwrap(), "another seed is other bytes");
        assert!(!has_content(&f, 7, 3_000_000).unwrap(), "a longer file is not the content");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn server_defaults_are_read_from_help_text() {
        // The shape clap prints: the flag line, its help, then the default.
        let help = "      --heartbeat-ms <N>\n          How often.\n          \n          [default: 100]\n      --port <PORT>\n          [default: 4000]\n";
        let out = timing_defaults(help);
        assert_eq!(out, vec![("heartbeat-ms".to_string(), "100".to_string())]);
    }

    #[test]
    fn cpu_time_is_read_after_a_name_with_spaces() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 1 0";
        assert_eq!(ticks_in(stat), Some(12));
        assert_eq!(ticks_in("42 (cut short"), None);
        assert!(cpu_secs(std::process::id()).is_some(), "the harness's own /proc/PID/stat reads");
    }
}
