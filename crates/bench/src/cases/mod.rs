//! The cases of issue 12 and issue 7's user of many files (9), one module each,
//! and what they share: the run's plan, a cluster with two devices on loopback,
//! and waiting for files to arrive.

pub mod burst;
pub mod failover;
pub mod large;
pub mod many;
pub mod propagation;
pub mod users;

use crate::cluster::{self, Cluster, Credentials, Device, Host};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How much each case does: `--quick` or the full run.
#[derive(Clone, Debug)]
pub struct Plan {
    /// A short run.
    pub quick: bool,
    /// Failover trials per case (1, 2).
    pub failover_trials: usize,
    /// Files per way of saving (3).
    pub propagation_files: usize,
    /// Runs of the 1,000-file burst (4).
    pub burst_runs: usize,
    /// Files of the big burst, if it runs (4).
    pub burst_big: Option<usize>,
    /// Runs of the large file (5, 6).
    pub large_runs: usize,
    /// The large file's size, MiB (5, 6).
    pub large_mib: u64,
    /// Users, each with two devices (7).
    pub users: usize,
    /// How long every device makes changes, seconds (7).
    pub users_secs: u64,
    /// The files of the user of many files (9).
    pub many_files: usize,
}

impl Plan {
    /// The full run (about ten minutes on two cores) or the quick one (two or three).
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                failover_trials: 3,
                propagation_files: 20,
                burst_runs: 1,
                burst_big: None,
                large_runs: 1,
                large_mib: 256,
                users: 100,
                users_secs: 10,
                many_files: 20_000,
            }
        } else {
            Plan {
                quick,
                failover_trials: 10,
                propagation_files: 100,
                burst_runs: 3,
                burst_big: Some(10_000),
                large_runs: 3,
                large_mib: 1024,
                users: 100,
                users_secs: 30,
                many_files: 100_000,
            }
        }
    }

    /// The plan, for the report.
    pub fn describe(&self) -> String {
        format!(
            "{}: {} failover trials per case; {} files per way of saving; {} burst run(s) of 1,000 files{}; {} run(s) of \
             a {} MiB file; {} users x 2 devices for {} s; a user of {} files",
            if self.quick { "quick run (--quick)" } else { "full run" },
            self.failover_trials,
            self.propagation_files,
            self.burst_runs,
            match self.burst_big {
                Some(n) => format!(" and one of {}", burst::group(n)),
                None => ", no 10,000-file burst".into(),
            },
            self.large_runs,
            self.large_mib,
            self.users,
            self.users_secs,
            burst::group(self.many_files)
        )
    }
}

/// What every case gets.
pub struct Ctx {
    /// The run's working directory.
    pub dir: PathBuf,
    /// How much to do.
    pub plan: Plan,
    /// What lets processes in.
    pub creds: Credentials,
    /// When the run started, for progress lines.
    pub started: Instant,
    /// The run's seed (content differs between runs, reproducibly per seed).
    pub seed: u64,
}

impl Ctx {
    /// A progress line on stderr.
    pub fn say(&self, line: &str) {
        eprintln!("bench [{:>6.1} s] {line}", self.started.elapsed().as_secs_f64());
    }

    /// A seed for one use within the run.
    pub fn seed(&self, salt: u64) -> u64 {
        self.seed.wrapping_mul(0x100_0000_01b3).wrapping_add(salt)
    }
}

/// Something that syncs: files saved into `source` arrive in each of `places`,
/// the first of which is the other device. replibox (two devices and three
/// servers) and a pair of Syncthing instances both are one, so that the same
/// measurement runs on both.
pub trait Pair {
    /// The sync dir files are saved into.
    fn source(&self) -> PathBuf;
    /// Where they must arrive: the other device first.
    fn places(&self) -> Vec<PathBuf>;
    /// Err when a process of it has exited.
    fn check_alive(&mut self) -> Result<(), String>;
}

/// A cluster on 127.0.0.1-3 with user `bench` on two replibox-client devices,
/// 127.0.0.4 and .5.
pub struct Setup {
    /// The servers.
    pub cluster: Cluster,
    /// Device 1.
    pub dev1: Device,
    /// Device 2.
    pub dev2: Device,
}

/// The user of every loopback case.
pub const USER: &str = "bench";

impl Setup {
    /// Starts it under `root`.
    pub fn start(ctx: &Ctx, root: &Path) -> Result<Setup, String> {
        let _ = fs::remove_dir_all(root);
        let hosts: Vec<Host> = (1..=3).map(Host::loopback).collect();
        let port = cluster::free_port(&hosts)?;
        let cluster = Cluster::start(root, &hosts, port, &ctx.creds)?;
        let dev1 = Device::start(root, "dev1", USER, cluster.primary(), &Host::loopback(4), &ctx.creds)?;
        let dev2 = Device::start(root, "dev2", USER, cluster.primary(), &Host::loopback(5), &ctx.creds)?;
        Ok(Setup { cluster, dev1, dev2 })
    }

    /// Stops the devices (logging out), then the servers.
    pub fn stop(self) {
        self.dev1.stop();
        self.dev2.stop();
        drop(self.cluster);
    }
}

impl Pair for Setup {
    fn source(&self) -> PathBuf {
        self.dev1.dir.clone()
    }

    /// Device 2's sync dir, then each server's copy of the user's files.
    fn places(&self) -> Vec<PathBuf> {
        let mut v = vec![self.dev2.dir.clone()];
        v.extend((0..3).map(|i| self.cluster.user_dir(i, USER)));
        v
    }

    fn check_alive(&mut self) -> Result<(), String> {
        self.dev1.check_alive()?;
        self.dev2.check_alive()?;
        for s in self.cluster.servers.iter_mut().flatten() {
            if let Some(status) = s.exited() {
                return Err(format!("{} exited ({status})", s.name));
            }
        }
        Ok(())
    }
}

/// When a change had arrived, in ms from its start: at the other device (the first
/// place), at the last of the other places (replibox's servers; None when there
/// are none), and everywhere.
#[derive(Clone, Copy, Debug)]
pub struct Arrival {
    /// At the other device.
    pub to_device: f64,
    /// At the last of the other places.
    pub to_servers: Option<f64>,
    /// At every place.
    pub everywhere: f64,
}

impl Arrival {
    /// From the start and `wait_files`'s completion times.
    pub fn new(t0: Instant, done: &[Instant]) -> Arrival {
        let at = |t: &Instant| t.saturating_duration_since(t0).as_secs_f64() * 1000.0;
        Arrival {
            to_device: done.first().map_or(f64::NAN, at),
            to_servers: done[1..].iter().max().map(at),
            everywhere: done.iter().max().map_or(f64::NAN, at),
        }
    }
}

/// Waits until each of `places` holds every file of `files` (relative path, size)
/// at its full size, and returns when each place was complete. Polls every
/// `every`; each poll checks a place's files in order from the first one not yet
/// complete, and stops at the first one still missing, so that the poller's own
/// work over a whole burst grows with the files, not with files times polls (it
/// shares the cores with what it measures). `alive` is asked between polls.
pub fn wait_files(
    places: &[PathBuf],
    files: &[(String, u64)],
    deadline: Duration,
    every: Duration,
    alive: &mut dyn FnMut() -> Result<(), String>,
) -> Result<Vec<Instant>, String> {
    // Per place, how many of `files` (in order) are known complete: a file that
    // arrived stays (nothing else writes there while a case waits).
    let mut checked: Vec<usize> = vec![0; places.len()];
    let mut complete = |i: usize, place: &Path| -> bool {
        while let Some((rel, size)) = files.get(checked[i]) {
            if !fs::metadata(place.join(rel)).is_ok_and(|m| m.len() == *size) {
                return false;
            }
            checked[i] += 1;
        }
        true
    };
    let start = Instant::now();
    let mut done: Vec<Option<Instant>> = vec![None; places.len()];
    loop {
        for (i, place) in places.iter().enumerate() {
            if done[i].is_none() && complete(i, place) {
                done[i] = Some(Instant::now());
            }
        }
        if done.iter().all(Option::is_some) {
            return Ok(done.into_iter().flatten().collect());
        }
        alive()?;
        if start.elapsed() > deadline {
            let missing: Vec<String> =
                places.iter().zip(&done).filter(|(_, d)| d.is_none()).map(|(p, _)| p.display().to_string()).collect();
            return Err(format!(
                "after {:.0} s, {} files were still not complete in {}",
                deadline.as_secs_f64(),
                files.len(),
                missing.join(", ")
            ));
        }
        std::thread::sleep(every);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_for_files_sees_each_place_complete() {
        let root = std::env::temp_dir().join(format!("replibox-bench-wait-{}", std::process::id()));
        let (a, b) = (root.join("a"), root.join("b"));
        for d in [&a, &b] {
            fs::create_dir_all(d.join("sub")).unwrap();
        }
        let files: Vec<(String, u64)> = (0..10).map(|i| (format!("sub/f{i}"), 3)).collect();
        for (rel, _) in &files {
            fs::write(a.join(rel), b"abc").unwrap();
            fs::write(b.join(rel), b"abc").unwrap();
        }
        let r = wait_files(&[a.clone(), b.clone()], &files, Duration::ZERO, Duration::ZERO, &mut || Ok(()));
        assert_eq!(r.unwrap().len(), 2);
        // One file short in b: not complete, and the error names b only.
        fs::write(b.join("sub/f3"), b"ab").unwrap();
        let e = wait_files(&[a.clone(), b.clone()], &files, Duration::ZERO, Duration::ZERO, &mut || Ok(()));
        let e = e.unwrap_err();
        assert!(e.contains(&b.display().to_string()) && !e.contains(&a.display().to_string()), "{e}");
        fs::remove_dir_all(&root).unwrap();
    }
}
