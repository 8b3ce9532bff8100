//! Case 9: a user of many files (100,000 in a full run). They are moved into
//! device 1's sync dir at once, in folders of 1,000; once the three servers hold
//! them all, a fresh device 2 logs in and receives them; `list_server` typed at
//! it prints every one. From device 2's login on, no file changes, through two
//! of each device's periodic reconciliations (a scan and a full listing every
//! 30 s): the status `seq` must not move. Every process's peak memory is read
//! at the end.

use super::burst::group;
use super::{wait_files, Ctx, USER};
use crate::cluster::{self, Cluster, Device, Host};
use crate::report::{show_mib, show_ms, Row, Stands};
use crate::sys::{self, cpu_secs, has_content, proc_stat, write_content};
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Each file's size: small, as most of a real folder's files are.
const SIZE: u64 = 1024;

/// Files per folder.
const PER_FOLDER: usize = 1000;

/// How long the cluster is watched, from device 2's login on, while no file
/// changes: a device reconciles 30 s after its last reconciliation ended (the
/// client's `RESCAN_EVERY`), and one of 100,000 files takes a few seconds, so
/// each device's periodic pass runs twice in it.
const QUIET: Duration = Duration::from_secs(80);

/// The least time over which the primary's CPU is read, once the byte check
/// and `list_server` are done.
const CPU_WINDOW: Duration = Duration::from_secs(30);

/// How long each step may take before the case gives up.
const DEADLINE: Duration = Duration::from_secs(1800);

/// What one run found.
struct Found {
    n: usize,
    /// From the move to the last server holding every file.
    to_servers: Duration,
    /// From device 2's start to its login's reconciliation done, every file there.
    fresh_device: Duration,
    /// From `list_server` typed to its last line.
    listed: Duration,
    /// The status `seq` at device 2's login and at the end.
    seq: (u64, u64),
    /// How long that was (at least [`QUIET`]).
    still_for: Duration,
    /// The primary's CPU time at the end of it (at least [`CPU_WINDOW`]), as a
    /// share of one core.
    quiet_cpu: f64,
    /// Peak RSS, KiB: primary, backup 2, backup 3, device 1, device 2.
    peaks: [u64; 5],
}

/// Where file `i` goes, relative to the sync dir.
fn rel(i: usize) -> String {
    format!("many/d{:03}/f{i:06}.txt", i / PER_FOLDER)
}

fn seed_of(ctx: &Ctx, i: usize) -> u64 {
    ctx.seed(9_000_000 + i as u64)
}

/// How many lines of a client's stderr are errors (`error: ...`).
fn error_lines(err: &Path) -> usize {
    fs::read_to_string(err).map_or(0, |e| e.lines().filter(|l| l.starts_with("error")).count())
}

fn seq(addr: &str) -> Result<u64, String> {
    cluster::status(addr).and_then(|s| s["seq"].as_u64()).ok_or_else(|| format!("{addr} does not answer --status"))
}

fn measure(ctx: &Ctx, n: usize) -> Result<Found, String> {
    let root = ctx.dir.join("many");
    let _ = fs::remove_dir_all(&root);
    let hosts: Vec<Host> = (1..=3).map(Host::loopback).collect();
    let port = cluster::free_port(&hosts)?;
    let cluster = Cluster::start(&root, &hosts, port, &ctx.creds)?;
    let mut dev1 = Device::start(&root, "dev1", USER, cluster.primary(), &Host::loopback(4), &ctx.creds)?;

    let staged = root.join("stage");
    for i in 0..n {
        let path = staged.join(rel(i));
        if i % PER_FOLDER == 0 {
            let parent = path.parent().unwrap_or(&staged);
            fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        write_content(&path, seed_of(ctx, i), SIZE).map_err(|e| format!("cannot stage {}: {e}", path.display()))?;
    }
    let files: Vec<(String, u64)> = (0..n).map(|i| (rel(i), SIZE)).collect();
    let servers: Vec<PathBuf> = (0..3).map(|i| cluster.user_dir(i, USER)).collect();
    let server_pids: Vec<Option<u32>> = (0..3).map(|i| cluster.pid(i)).collect();

    let t0 = Instant::now();
    fs::rename(staged.join("many"), dev1.dir.join("many")).map_err(|e| format!("cannot move the files in: {e}"))?;
    wait_files(&servers, &files, DEADLINE, Duration::from_millis(200), &mut || dev1.check_alive())?;
    let to_servers = t0.elapsed();
    ctx.say(&format!("case 9: the 3 servers hold all {} files after {}", group(n), secs(to_servers)));

    let t0 = Instant::now();
    let host2 = Host::loopback(5);
    let mut dev2 = Device::start_console(&root, "dev2", USER, cluster.primary(), &host2, &ctx.creds, DEADLINE)?;
    // Its login's reconciliation is done: every file must be there already.
    wait_files(std::slice::from_ref(&dev2.dir), &files, Duration::ZERO, Duration::ZERO, &mut || Ok(()))?;
    let fresh_device = t0.elapsed();
    // From here on no file changes: the byte check and the listing only read.
    let seq0 = seq(cluster.primary())?;
    let still_from = Instant::now();
    ctx.say(&format!("case 9: a fresh device 2 had every file {} after it started", secs(fresh_device)));
    for (i, (name, _)) in files.iter().enumerate() {
        for place in servers.iter().chain([&dev2.dir]) {
            let p = place.join(name);
            if !has_content(&p, seed_of(ctx, i), SIZE).map_err(|e| format!("{}: {e}", p.display()))? {
                return Err(format!("{} holds other bytes than were moved in", p.display()));
            }
        }
    }

    let before = fs::metadata(&dev2.out).map_or(0, |m| m.len());
    let errors_before = error_lines(&dev2.err);
    let t0 = Instant::now();
    dev2.command("list_server")?;
    // Its last line: "N files", then ", M empty folders" if there are any.
    let summary = format!("{n} files");
    let listing = sys::wait_for("list_server to print every file", DEADLINE, Duration::from_millis(100), || {
        if let Err(e) = dev2.check_alive() {
            return Some(Err(e));
        }
        if error_lines(&dev2.err) > errors_before {
            return Some(Err(format!("list_server failed; see {}", dev2.err.display())));
        }
        let out = fs::read_to_string(&dev2.out).ok()?;
        let new = out.get(before as usize..)?.to_string();
        new.lines().any(|l| l.starts_with(&summary)).then_some(Ok(new))
    })??;
    let listed = t0.elapsed();
    let names: BTreeSet<&str> = listing.lines().filter_map(|l| l.split_whitespace().next()).collect();
    if let Some((missing, _)) = files.iter().find(|(name, _)| !names.contains(name.as_str())) {
        return Err(format!("list_server printed {summary} but not {missing}; see {}", dev2.out.display()));
    }
    ctx.say(&format!("case 9: list_server printed all {} files in {}", group(n), secs(listed)));

    let primary = server_pids[0].ok_or("the primary is not running")?;
    let cpu0 = cpu_secs(primary).ok_or("cannot read the primary's CPU time")?;
    let t0 = Instant::now();
    while still_from.elapsed() < QUIET || t0.elapsed() < CPU_WINDOW {
        dev1.check_alive()?;
        dev2.check_alive()?;
        std::thread::sleep(Duration::from_millis(500));
    }
    let cpu1 = cpu_secs(primary).ok_or("cannot read the primary's CPU time")?;
    let seq1 = seq(cluster.primary())?;
    let still_for = still_from.elapsed();
    let quiet_cpu = (cpu1 - cpu0).max(0.0) / t0.elapsed().as_secs_f64();

    let mut peaks = [0u64; 5];
    let pids: Vec<Option<u32>> = server_pids.into_iter().chain([dev1.pid(), dev2.pid()]).collect();
    for (peak, pid) in peaks.iter_mut().zip(pids) {
        *peak = pid.and_then(proc_stat).map_or(0, |s| s.hwm_kib);
    }
    dev1.stop();
    dev2.stop();
    drop(cluster);
    // The files stay until the run ends (the run's directory goes then).
    Ok(Found { n, to_servers, fresh_device, listed, seq: (seq0, seq1), still_for, quiet_cpu, peaks })
}

fn secs(d: Duration) -> String {
    show_ms(d.as_secs_f64() * 1e3)
}

fn rows(f: &Found) -> Vec<Row> {
    let n = group(f.n);
    let still = f.seq.0 == f.seq.1;
    let per_sec = f.n as f64 / f.to_servers.as_secs_f64();
    let works = Row {
        case: 9,
        what: format!("a user of {n} files: servers, a fresh device, list_server, quiet"),
        figure: format!(
            "the 3 servers had every file {} after the move ({per_sec:.0} files/s); a fresh device 2 had them all {} \
             after it started; list_server printed all {n} in {}; seq {} over the {} s from device 2's login on (two \
             periodic reconciliations per device), the primary using {:.1}% of a core at the end of it",
            secs(f.to_servers),
            secs(f.fresh_device),
            secs(f.listed),
            if still { format!("still at {}", f.seq.0) } else { format!("moved from {} to {}", f.seq.0, f.seq.1) },
            f.still_for.as_secs(),
            f.quiet_cpu * 100.0
        ),
        baseline: "-".into(),
        ratio: None,
        target: "every file everywhere, all listed; seq still".into(),
        stands: Stands::from(still),
    };
    let names = ["primary", "backup 2", "backup 3", "device 1", "device 2"];
    let most = f.peaks.iter().copied().max().unwrap_or(0);
    let memory = Row {
        case: 9,
        what: format!("peak RSS, a user of {n} files"),
        figure: format!(
            "{}; the largest peak divided by the files: {} bytes a file",
            names
                .iter()
                .zip(f.peaks)
                .map(|(name, kib)| format!("{name} {}", show_mib(kib)))
                .collect::<Vec<_>>()
                .join(", "),
            most * 1024 / f.n.max(1) as u64
        ),
        baseline: "-".into(),
        ratio: None,
        target: "-".into(),
        stands: Stands::NoTarget,
    };
    vec![works, memory]
}

/// Runs case 9.
pub fn run(ctx: &Ctx) -> (Vec<Row>, String) {
    let n = ctx.plan.many_files;
    let how = format!(
        "one cluster on 127.0.0.1-3 and device 1 (127.0.0.4, headless); {} files of {SIZE} bytes of fresh content \
         in folders of {}, staged on the same file system, then moved (one rename) into device 1's sync \
         dir; the clock stops when the user's folder on each of the three servers holds every file at its full \
         size (polled every 200 ms). Then a fresh device 2 (127.0.0.5, reading commands as at its prompt) starts; \
         its clock stops when it says its login's reconciliation is done, and every file must be there then. The \
         bytes are compared on the servers and device 2. `list_server` is typed at device 2; its clock stops at the \
         listing's last line, and every name must be in it. From device 2's login on, no file changes for at least \
         {} s (the byte check and the listing only read): the primary's status `seq` must not move while each \
         device runs its periodic reconciliation (a scan and a full listing, 30 s after the last one ended) twice. \
         The primary's CPU time is read over the last {} s or more of that, while it serves only those \
         reconciliations. Peak RSS (VmHWM) of every process at the end covers the whole case. The files stay until \
         the run ends.",
        group(n),
        group(PER_FOLDER),
        QUIET.as_secs(),
        CPU_WINDOW.as_secs()
    );
    let target = "every file everywhere, all listed; seq still";
    let rows = match measure(ctx, n) {
        Ok(found) => rows(&found),
        Err(e) => {
            vec![Row::not_measured(9, &format!("a user of {} files", group(n)), target, &e)]
        }
    };
    (rows, how)
}

#[cfg(test)]
mod tests {
    #[test]
    fn files_go_in_folders_of_a_thousand() {
        assert_eq!(super::rel(0), "many/d000/f000000.txt");
        assert_eq!(super::rel(99_999), "many/d099/f099999.txt");
    }
}
