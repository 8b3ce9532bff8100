//! The chaos suite: three servers, two users on two devices each, a workload of
//! creates, edits, renames and deletes (empty to 32 MiB, through the watcher and
//! through commands), and SIGKILLs of random servers at random moments, the
//! primary most, some aimed on purpose at the middle of an upload, of a state
//! transfer to a joining backup, of an election and of a takeover. Killed servers
//! come back as backups a little later. Never are more servers down than leave
//! one that may stand (the primary, or a backup that reports `eligible`).
//!
//! Then faults stop, every server comes back, and the checks run:
//! - every live server's `DATA/users/` is the same, byte for byte, and so is its
//!   replicated file table; every device's sync dir equals its user's folder
//!   there (conflicted copies are files like any other: allowed, and counted);
//! - every change a device reported acknowledged (its ledger, the client's
//!   `replibox::ledger` log lines) is there, or superseded by a later version;
//! - no partial or temporary file is visible: every file anywhere holds exactly
//!   the bytes of one whole write the test made;
//! - no epoch had two primaries (the servers' `became primary` log lines).
//!
//! Seeded: the seed is printed at the start and again on failure.
//! `CHAOS_SEED=N make chaos` makes the same decisions in the same order (which
//! file, how big, which server, which moment of a scenario); the processes'
//! timing is the machine's, so a replay retraces the run, not every interleaving.
//! `CHAOS_DURATION` (`90`, `40s`, `10m`) sets how long the faults go on; `make
//! test` runs [`DEFAULT_DURATION`].

use crate::harness::chaos::{
    diff, hashes, is_conflicted_copy, ledger, primaries_by_epoch, replicated_files, Ack, Dice, Files, LEDGER_LOG,
};
use crate::harness::cluster::ip;
use crate::harness::files::{self, Rng};
use crate::harness::*;
use replibox_proto::ContentHash;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// How long faults go on in `make test`.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(35);

/// Server timers: short enough that elections happen within the run, long enough
/// that a loaded 2-core machine does not spend the run in false suspicions.
const TIMERS: [&str; 8] = [
    "--heartbeat-ms",
    "100",
    "--ack-timeout-ms",
    "3000",
    "--failure-timeout-ms",
    "1000",
    "--election-timeout-ms",
    "300",
];

/// How long the cluster and the devices get to agree once faults stop.
const SETTLE: Duration = Duration::from_secs(180);

/// The largest file the workload writes.
const MAX_SIZE: u64 = 32 << 20;

/// Names the devices write: few enough that both devices of a user touch the
/// same ones (edits over edits, renames onto names in use, conflicts).
fn names() -> Vec<String> {
    let mut v: Vec<String> = (0..6).map(|i| format!("f{i}.bin")).collect();
    for d in 0..3 {
        v.extend((0..3).map(|i| format!("d{d}/g{i}.bin")));
    }
    v
}

/// The seed (CHAOS_SEED, else the clock) and the duration (CHAOS_DURATION).
fn settings() -> (u64, Duration) {
    let seed = std::env::var("CHAOS_SEED").ok().and_then(|s| s.trim().parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
            % 1_000_000_007
    });
    let duration = std::env::var("CHAOS_DURATION").ok().and_then(|s| parse_duration(&s)).unwrap_or(DEFAULT_DURATION);
    (seed, duration)
}

/// `90`, `90s`, `10m`, `1h`.
fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (n, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: u64 = n.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return None,
    };
    Some(Duration::from_secs(secs))
}

/// Prints the seed again when the test fails, after the report.
struct SeedOnFailure(u64);

impl Drop for SeedOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("chaos failed with seed {0}; replay: CHAOS_SEED={0} make chaos", self.0);
        }
    }
}

/// One of the three servers, across its runs.
struct Srv {
    name: String,
    id: u64,
    opts: ServerOpts,
    addr: SocketAddr,
    run: Option<Server>,
    restart_at: Option<Instant>,
}

/// What a status query says of a server.
#[derive(Clone, Debug)]
struct Seen {
    role: String,
    eligible: bool,
    phase: String,
}

impl Srv {
    fn up(&self) -> bool {
        self.run.is_some()
    }

    fn seen(&self) -> Option<Seen> {
        let v = self.run.as_ref()?.try_status()?;
        Some(Seen {
            role: v["role"].as_str()?.to_string(),
            eligible: v["eligible"].as_bool().unwrap_or(false),
            phase: v["phase"].as_str().unwrap_or("").to_string(),
        })
    }

    fn log(&self) -> String {
        self.run.as_ref().map(|s| s.log()).unwrap_or_default()
    }
}

/// A device: an interactive client whose sync dir the workload also writes.
struct Dev {
    name: String,
    user: String,
    client: Client,
    outside: PathBuf,
    /// Commands sent on its stdin.
    issued: usize,
}

impl Dev {
    /// Outcomes printed so far: `uploaded`/`deleted` lines on stdout, `error:`
    /// lines on stderr.
    fn answered(&self) -> usize {
        let out = self.client.proc.stdout();
        let err = self.client.proc.stderr();
        out.lines().filter(|l| l.starts_with("uploaded ") || l.starts_with("deleted ")).count()
            + err.lines().filter(|l| l.starts_with("error: ")).count()
    }

    fn idle(&self) -> bool {
        self.answered() >= self.issued
    }
}

/// What the run did, for the closing line and docs/reliability.md.
#[derive(Default, Debug)]
struct Tally {
    writes: u64,
    bytes: u64,
    renames: u64,
    deletes: u64,
    upload_cmds: u64,
    delete_cmds: u64,
    kills: BTreeMap<&'static str, u64>,
    missed: BTreeMap<&'static str, u64>,
    restarts: u64,
}

/// The whole run.
struct Chaos<'t> {
    t: &'t TestDir,
    dice: Dice,
    seed: u64,
    servers: Vec<Srv>,
    devs: Vec<Dev>,
    names: Vec<String>,
    /// Content hash -> size of every whole write made.
    written: BTreeMap<String, u64>,
    serial: u64,
    tally: Tally,
}

impl<'t> Chaos<'t> {
    fn start(t: &'t TestDir, seed: u64) -> Chaos<'t> {
        let mut servers = Vec::new();
        for (i, id) in [1u64, 2, 3].iter().enumerate() {
            let last = i as u8 + 1;
            let port = free_port(ip(last));
            let mode = if *id == 1 {
                vec!["-p".to_string()]
            } else {
                vec!["-b".to_string(), format!("127.0.0.1:{}", servers.first().map_or(0, |s: &Srv| s.addr.port()))]
            };
            let mut mode = mode;
            mode.extend(["--id".to_string(), id.to_string()]);
            let opts = ServerOpts {
                name: format!("s{id}"),
                ip: ip(last),
                port: Some(port),
                data: Some(t.join(format!("s{id}-data"))),
                mode,
                extra: TIMERS.iter().map(|s| s.to_string()).collect(),
            };
            let run = Server::start(t, opts.clone());
            servers.push(Srv {
                name: format!("s{id}"),
                id: *id,
                addr: run.addr,
                opts,
                run: Some(run),
                restart_at: None,
            });
        }
        let refs: Vec<&Server> = servers.iter().filter_map(|s| s.run.as_ref()).collect();
        crate::harness::cluster::wait_members(&refs, &[1, 2, 3]);
        let first = servers[0].addr;
        let mut devs = Vec::new();
        for user in ["alice", "bob"] {
            for (n, bind) in [(1, DEVICE1_IP), (2, DEVICE2_IP)] {
                let name = format!("{user}{n}");
                let client = spawn_client(t, ClientOpts::at(&name, user, first, bind).interactive());
                client.wait_logged_in();
                let outside = t.mkdir(format!("{name}-outside"));
                devs.push(Dev { name, user: user.to_string(), client, outside, issued: 0 });
            }
        }
        Chaos {
            t,
            dice: Dice::new(seed),
            seed,
            servers,
            devs,
            names: names(),
            written: BTreeMap::new(),
            serial: 0,
            tally: Tally::default(),
        }
    }

    // -------------------------------------------------------------------
    // The workload

    fn size(&mut self) -> u64 {
        match self.dice.below(100) {
            0..=4 => 0,
            5..=24 => self.dice.below(200),
            25..=59 => self.dice.below(64 << 10),
            60..=84 => self.dice.below(1 << 20),
            85..=96 => self.dice.below(6 << 20),
            _ => (8 << 20) + self.dice.below(MAX_SIZE - (8 << 20) + 1),
        }
    }

    /// New bytes, each write its own (a header names it when there is room).
    fn content(&mut self, size: u64) -> Vec<u8> {
        self.serial += 1;
        let mut bytes = vec![0u8; size as usize];
        Rng::new(self.seed ^ (self.serial << 20)).fill(&mut bytes);
        let head = format!("chaos {} write {}\n", self.seed, self.serial);
        let n = head.len().min(bytes.len());
        bytes[..n].copy_from_slice(&head.as_bytes()[..n]);
        self.written.insert(ContentHash::of(&bytes).to_string(), size);
        self.tally.writes += 1;
        self.tally.bytes += size;
        bytes
    }

    fn files_of(&self, d: usize) -> Vec<String> {
        files::tree(&self.devs[d].client.sync_dir).files.into_keys().collect()
    }

    /// Writes a file in device `d`'s sync dir (the watcher sends it).
    fn write(&mut self, d: usize, name: &str, size: u64) {
        let bytes = self.content(size);
        let path = self.devs[d].client.path(name);
        if let Some(parent) = path.parent() {
            let _ = fs::create_dir_all(parent);
        }
        // A name whose folder is a file here (or the reverse) is skipped.
        if let Ok(mut f) = fs::File::create(&path) {
            let _ = f.write_all(&bytes);
        }
    }

    fn step(&mut self) {
        let d = self.dice.below(self.devs.len() as u64) as usize;
        let name = self.dice.pick(&self.names).cloned().unwrap_or_default();
        let have = self.files_of(d);
        match self.dice.below(100) {
            0..=39 => {
                let size = self.size();
                self.write(d, &name, size);
            }
            40..=52 => {
                let Some(from) = self.dice.pick(&have).cloned() else { return };
                let dev = &self.devs[d];
                let to = dev.client.path(&name);
                if to.exists() || is_conflicted_copy(&from) {
                    return;
                }
                if let Some(parent) = to.parent() {
                    let _ = fs::create_dir_all(parent);
                }
                if fs::rename(dev.client.path(&from), &to).is_ok() {
                    self.tally.renames += 1;
                }
            }
            53..=66 => {
                let Some(victim) = self.dice.pick(&have).cloned() else { return };
                if fs::remove_file(self.devs[d].client.path(&victim)).is_ok() {
                    self.tally.deletes += 1;
                }
            }
            67..=76 if self.devs[d].idle() => {
                let top = format!("f{}.bin", self.dice.below(6));
                let size = self.size().min(8 << 20);
                let bytes = self.content(size);
                let source = self.devs[d].outside.join(&top);
                if fs::write(&source, &bytes).is_err() {
                    return;
                }
                let dev = &mut self.devs[d];
                dev.client.proc.send_line(&format!("upload {}", source.display()));
                dev.issued += 1;
                self.tally.upload_cmds += 1;
            }
            77..=81 if self.devs[d].idle() => {
                let Some(victim) = self.dice.pick(&have).cloned() else { return };
                if victim.contains(' ') {
                    return;
                }
                let dev = &mut self.devs[d];
                dev.client.proc.send_line(&format!("delete {victim}"));
                dev.issued += 1;
                self.tally.delete_cmds += 1;
            }
            _ => {}
        }
    }

    // -------------------------------------------------------------------
    // Faults

    fn primary(&self) -> Option<usize> {
        (0..self.servers.len()).find(|i| self.servers[*i].seen().is_some_and(|s| s.role == "primary"))
    }

    /// Another live server than `i` may stand (or serve): killing `i` leaves the
    /// cluster one that can go on.
    fn may_kill(&self, i: usize) -> bool {
        if !self.servers[i].up() {
            return false;
        }
        (0..self.servers.len()).filter(|j| *j != i).any(|j| self.servers[j].seen().is_some_and(|s| s.eligible))
    }

    fn kill(&mut self, i: usize, why: &'static str) -> bool {
        if !self.may_kill(i) {
            *self.tally.missed.entry(why).or_default() += 1;
            return false;
        }
        let s = &mut self.servers[i];
        if let Some(mut run) = s.run.take() {
            run.kill();
            eprintln!("chaos: killed {} ({why})", s.name);
        }
        let after = Duration::from_millis(1000 + self.dice.below(5000));
        self.servers[i].restart_at = Some(Instant::now() + after);
        *self.tally.kills.entry(why).or_default() += 1;
        true
    }

    fn restart(&mut self, i: usize) {
        let live: Vec<SocketAddr> = self.servers.iter().filter(|s| s.up()).map(|s| s.addr).collect();
        let all: Vec<SocketAddr> = self.servers.iter().filter(|s| s.id != self.servers[i].id).map(|s| s.addr).collect();
        let via = *self.dice.pick(if live.is_empty() { &all } else { &live }).unwrap_or(&all[0]);
        let s = &mut self.servers[i];
        let mut opts = s.opts.clone();
        opts.mode = vec!["-b".into(), via.to_string(), "--id".into(), s.id.to_string()];
        s.run = Some(Server::start(self.t, opts));
        s.restart_at = None;
        self.tally.restarts += 1;
        eprintln!("chaos: restarted {} as a backup via {via}", s.name);
    }

    fn restarts_due(&mut self) {
        for i in 0..self.servers.len() {
            if self.servers[i].restart_at.is_some_and(|t| Instant::now() >= t) {
                self.restart(i);
            }
        }
    }

    /// Polls `probe` (with the workload going on) for up to `limit`.
    fn watch<T>(&mut self, limit: Duration, mut probe: impl FnMut(&Self) -> Option<T>) -> Option<T> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Some(v) = probe(self) {
                return Some(v);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }

    /// The first of the servers other than `except` whose log gained a line with
    /// `needle` after the marks.
    fn new_line(&self, marks: &[usize], except: Option<usize>, needle: &str) -> Option<usize> {
        (0..self.servers.len())
            .filter(|i| Some(*i) != except && self.servers[*i].up())
            .find(|i| self.servers[*i].log().get(marks[*i]..).is_some_and(|l| l.contains(needle)))
    }

    fn marks(&self) -> Vec<usize> {
        self.servers.iter().map(|s| s.log().len()).collect()
    }

    fn fault(&mut self) {
        let Some(p) = self.primary() else { return };
        match self.dice.below(12) {
            0..=2 => {
                self.kill(p, "primary");
            }
            3..=4 => {
                let live: Vec<usize> = (0..self.servers.len()).filter(|i| *i != p && self.servers[*i].up()).collect();
                if let Some(&b) = self.dice.pick(&live) {
                    self.kill(b, "backup");
                }
            }
            5..=6 => {
                // Mid-upload: a big file on its way, the primary killed once its
                // temporary file holds part of it.
                let d = self.dice.below(self.devs.len() as u64) as usize;
                let name = self.dice.pick(&self.names).cloned().unwrap_or_default();
                let size = (8 << 20) + self.dice.below(MAX_SIZE - (8 << 20));
                self.write(d, &name, size);
                let tmp = self.servers[p].run.as_ref().map(|s| s.tmp_dir()).unwrap_or_default();
                let caught = self.watch(Duration::from_secs(10), |_| {
                    files::tree(&tmp).files.values().any(|n| *n > 0 && *n < size).then_some(())
                });
                match caught {
                    Some(()) => {
                        self.kill(p, "primary mid-upload");
                    }
                    None => *self.tally.missed.entry("primary mid-upload").or_default() += 1,
                }
            }
            7..=8 => {
                // Mid-election: the primary dies, then the first backup to stand.
                let marks = self.marks();
                if !self.kill(p, "primary before an election") {
                    return;
                }
                let found =
                    self.watch(Duration::from_secs(5), |c| c.new_line(&marks, Some(p), "standing for election"));
                match found {
                    Some(c) => {
                        self.kill(c, "candidate mid-election");
                    }
                    None => *self.tally.missed.entry("candidate mid-election").or_default() += 1,
                }
            }
            9..=10 => {
                // Mid-takeover: the primary dies, then its successor as soon as it
                // says it won (before its backups and clients have followed).
                let marks = self.marks();
                if !self.kill(p, "primary before a takeover") {
                    return;
                }
                let found = self.watch(Duration::from_secs(8), |c| c.new_line(&marks, Some(p), "became primary"));
                match found {
                    Some(c) => {
                        self.kill(c, "new primary mid-takeover");
                    }
                    None => *self.tally.missed.entry("new primary mid-takeover").or_default() += 1,
                }
            }
            _ => {
                // Mid-transfer: a dead server comes back now, and the joiner or its
                // primary dies while the snapshot or its files cross.
                let Some(dead) = (0..self.servers.len()).find(|i| !self.servers[*i].up()) else {
                    let live: Vec<usize> =
                        (0..self.servers.len()).filter(|i| *i != p && self.servers[*i].up()).collect();
                    if let Some(&b) = self.dice.pick(&live) {
                        self.kill(b, "backup");
                    }
                    return;
                };
                self.restart(dead);
                let joining = self.watch(Duration::from_secs(8), |c| {
                    let s = &c.servers[dead];
                    let log = s.log();
                    (log.contains("installing snapshot") || s.seen().is_some_and(|v| v.phase == "catching up"))
                        .then_some(())
                });
                let Some(()) = joining else {
                    *self.tally.missed.entry("mid state transfer").or_default() += 1;
                    return;
                };
                if self.dice.chance(50) {
                    self.kill(dead, "joiner mid state transfer");
                } else if let Some(p) = self.primary() {
                    self.kill(p, "primary mid state transfer");
                }
            }
        }
    }

    // -------------------------------------------------------------------
    // Settling and the checks

    fn running(&self) -> Vec<&Server> {
        self.servers.iter().filter_map(|s| s.run.as_ref()).collect()
    }

    fn settle(&mut self) {
        for i in 0..self.servers.len() {
            if !self.servers[i].up() {
                self.restart(i);
            }
        }
        let servers = self.running();
        wait_for(SETTLE, "one primary followed by both backups, all three members at one seq", || {
            let st: Vec<serde_json::Value> = servers.iter().map(|s| s.try_status()).collect::<Option<_>>()?;
            let primaries = st.iter().filter(|v| v["role"] == "primary").count();
            let ids = st.iter().all(|v| crate::harness::cluster::member_ids(v).as_deref() == Some(&[1, 2, 3][..]));
            let seqs: BTreeSet<u64> = st.iter().filter_map(|v| v["seq"].as_u64()).collect();
            let following = st.iter().all(|v| v["phase"] == "serving" || v["phase"] == "following");
            (primaries == 1 && ids && seqs.len() == 1 && following).then_some(())
        });
        // The devices finish what they were doing, and everything agrees.
        let start = Instant::now();
        loop {
            let pending: Vec<&str> =
                self.devs.iter().filter(|d| !d.idle()).map(|d| d.name.as_str()).collect::<Vec<_>>();
            let disagreement = if pending.is_empty() { self.disagreement() } else { Some(format!("{pending:?} busy")) };
            let Some(why) = disagreement else { return };
            if start.elapsed() > SETTLE {
                fail(format!("after {SETTLE:?} of quiet, servers and devices still disagree: {why}"));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// What still differs between the servers' users/ and the devices' sync dirs.
    fn disagreement(&self) -> Option<String> {
        let servers = self.running();
        let first = &servers[0];
        let reference = hashes(&first.data.join("users"));
        for s in &servers[1..] {
            if let Some(d) = diff(&reference, &hashes(&s.data.join("users"))) {
                return Some(format!("{} vs {}: {d}", first.opts.name, s.opts.name));
            }
        }
        for dev in &self.devs {
            let want = hashes(&first.user_dir(&dev.user));
            if let Some(d) = diff(&want, &hashes(&dev.client.sync_dir)) {
                return Some(format!("{}'s users/{} vs {}: {d}", first.opts.name, dev.user, dev.name));
            }
        }
        None
    }

    fn check(&self) -> (usize, usize) {
        let servers = self.running();
        // The replicated file tables agree, and match the files. (Read until two
        // reads agree: a compaction may rewrite snapshot and log under a read.)
        let table: Files = wait_for(DEADLINE, "the servers' replicated file tables to agree", || {
            let tables: Vec<Files> = servers.iter().map(|s| replicated_files(&s.data).ok()).collect::<Option<_>>()?;
            tables.windows(2).all(|w| w[0] == w[1]).then(|| tables[0].clone())
        });
        let table = &table;
        for (user, paths) in table {
            let on_disk = hashes(&servers[0].user_dir(user));
            let live: BTreeMap<String, (u64, String)> = paths
                .iter()
                .filter(|(_, r)| !r.deleted && !r.dir)
                .map(|(p, r)| (p.clone(), (r.size, r.hash.clone())))
                .collect();
            if let Some(d) = diff(&live, &on_disk) {
                fail(format!("users/{user} on {} does not match its replicated state: {d}", servers[0].opts.name));
            }
            // A live folder entry is a directory there.
            for (p, _) in paths.iter().filter(|(_, r)| !r.deleted && r.dir) {
                if !servers[0].user_dir(user).join(p).is_dir() {
                    fail(format!("users/{user} on {} lacks the folder {p} its state holds", servers[0].opts.name));
                }
            }
        }
        // Every acknowledged change is there, or superseded by a later version.
        let mut acks: Vec<Ack> = Vec::new();
        for dev in &self.devs {
            acks.extend(ledger(&dev.name, &dev.user, &dev.client.proc.stderr()));
        }
        for a in &acks {
            let now = table.get(&a.user).and_then(|t| t.get(&a.path));
            let ok = match now {
                None => false,
                Some(r) if r.version > a.version => true,
                Some(r) if r.version == a.version => {
                    r.deleted == a.deleted && (a.deleted || (r.hash == a.hash && r.size == a.size))
                }
                Some(_) => false,
            };
            if !ok {
                fail(format!("acknowledged change lost: {a:?}; the servers hold {now:?}"));
            }
        }
        // Every file anywhere is one whole write.
        let mut roots: Vec<(String, PathBuf)> =
            servers.iter().map(|s| (s.opts.name.clone(), s.data.join("users"))).collect();
        roots.extend(self.devs.iter().map(|d| (d.name.clone(), d.client.sync_dir.clone())));
        let mut copies = BTreeSet::new();
        for (name, root) in &roots {
            for (path, (size, hash)) in hashes(root) {
                if self.written.get(&hash) != Some(&size) {
                    fail(format!("{name}: {path} ({size} bytes) holds bytes that no whole write made"));
                }
                if is_conflicted_copy(&path) {
                    copies.insert(path);
                }
            }
        }
        // One primary per epoch.
        for (epoch, ids) in primaries_by_epoch(&self.t.join("logs"), "s") {
            assert!(ids.len() == 1, "epoch {epoch} had {} primaries: {ids:?}", ids.len());
        }
        (acks.len(), copies.len())
    }
}

/// Starts an interactive client whose log carries the ledger lines.
fn spawn_client(t: &TestDir, opts: ClientOpts) -> Client {
    let cwd = t.join(format!("{}-cwd", opts.name));
    let sync_dir = t.join(format!("{}-sync", opts.name));
    fs::create_dir_all(&cwd).unwrap_or_else(|e| fail(format!("cannot create {}: {e}", cwd.display())));
    let mut cmd = Command::new(client_bin());
    cmd.arg(&opts.user)
        .arg(opts.server.ip().to_string())
        .arg(opts.server.port().to_string())
        .arg("--sync-dir")
        .arg(&sync_dir)
        .args(["--device-name", &opts.name, "--bind", &opts.bind.to_string()])
        .current_dir(&cwd)
        .env(replibox_client::engine::RESCAN_ENV, NO_RESCAN.as_millis().to_string())
        .env(replibox_client::password::ENV, password_of(&opts.user))
        .env("RUST_LOG", LEDGER_LOG)
        .env_remove("RUST_BACKTRACE");
    let proc = Proc::spawn(t, &opts.name, cmd, true);
    let opts = ClientOpts { sync_dir: Some(sync_dir.clone()), cwd: Some(cwd.clone()), ..opts };
    Client { opts, sync_dir, cwd, proc }
}

/// Runs the chaos for `duration` with `seed`, then settles and checks.
fn run(name: &str, seed: u64, duration: Duration) {
    eprintln!("chaos seed {seed} for {duration:?} (replay: CHAOS_SEED={seed} make chaos)");
    let _guard = SeedOnFailure(seed);
    let t = TestDir::new(name);
    let mut c = Chaos::start(&t, seed);
    let start = Instant::now();
    let mut next_fault = Instant::now() + Duration::from_millis(1500 + c.dice.below(2500));
    let mut steps = 0u64;
    while start.elapsed() < duration {
        c.step();
        steps += 1;
        c.restarts_due();
        if Instant::now() >= next_fault {
            c.fault();
            next_fault = Instant::now() + Duration::from_millis(1500 + c.dice.below(4000));
        }
        std::thread::sleep(Duration::from_millis(40 + c.dice.below(120)));
    }
    eprintln!("chaos: {steps} steps; faults stop, settling");
    c.settle();
    let (acks, copies) = c.check();
    let kills: u64 = c.tally.kills.values().sum();
    let epochs = primaries_by_epoch(&t.join("logs"), "s").len();
    // The run exercised what it claims to check.
    assert!(kills > 0, "seed {seed}: no server was killed");
    assert!(acks > 0, "seed {seed}: no acknowledged change was checked");
    let primaries_killed: u64 =
        c.tally.kills.iter().filter(|(why, _)| why.starts_with("primary")).map(|(_, n)| n).sum();
    assert!(primaries_killed == 0 || epochs > 1, "seed {seed}: a primary was killed, yet there was one epoch");
    eprintln!(
        "chaos seed {seed}: passed after {:?}: {} writes ({} MiB), {} renames, {} deletes, {} upload and {} delete \
         commands; {kills} kills {:?}, scenarios missed {:?}, {} restarts, {epochs} epochs; {acks} acknowledged \
         changes checked, {copies} conflicted copies",
        start.elapsed(),
        c.tally.writes,
        c.tally.bytes >> 20,
        c.tally.renames,
        c.tally.deletes,
        c.tally.upload_cmds,
        c.tally.delete_cmds,
        c.tally.kills,
        c.tally.missed,
        c.tally.restarts,
    );
}

/// The chaos run of `make test` (DEFAULT_DURATION) or of `make chaos`
/// (CHAOS_DURATION, CHAOS_SEED).
#[test]
fn chaos_nothing_acknowledged_is_lost() {
    let (seed, duration) = settings();
    run("chaos", seed, duration);
}
