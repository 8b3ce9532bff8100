//! What the failover examples share: starting three servers and two devices of
//! one user, a narrated timeline, device 1's stream of timed changes, waiting on
//! a condition with a deadline, the check that every acknowledged change is
//! everywhere, and the `--runs N` loop with its outage summary.
//!
//! Each example includes it with `#[path = "scenario/mod.rs"] mod scenario;` (the
//! examples are built by the client package, so this is a module, not a crate).
//!
//! Hosts: server `i` (1-3), device 1 (host 4) and device 2 (host 5). On
//! [`Net::Loopback`] they are 127.0.0.`i` with one free port; on [`Net::Lab`]
//! each is a network namespace made by `scripts/lab.sh`, at `NET.i:4000`, started
//! with `ip netns exec` and the very command line of a workstation (no `--bind`).
//! Device 1 is the client's own front-end, driven in-process so that each change's
//! acknowledgement can be timed: on the lab, the example runs inside host c1.
//! Device 2 is a real `replibox-client`.

#![allow(dead_code)] // each example uses its own part of this module

use replibox_frontend::{Config, FrontEvent, Frontend, SharedPassword};
use replibox_proto::{DeviceId, OpResult};
use std::io::{Cursor, Read, Seek};
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A child process, SIGKILLed on drop so that no run leaves one behind.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A binary from beside this example (built first if missing).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir").to_path_buf();
    let path = dir.join(name);
    if !path.exists() {
        eprintln!("building {name} (cargo build --release --bins) ...");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let ok = Command::new(cargo).args(["build", "--release", "--bins"]).status().is_ok_and(|s| s.success());
        assert!(ok && path.exists(), "{} is missing: run `cargo build --release --workspace` first", path.display());
    }
    path
}

/// Locks, whether or not a thread panicked while holding it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Polls `probe` every 5 ms until it gives a value or `deadline` passes.
pub fn wait_for<T>(what: &str, deadline: Duration, mut probe: impl FnMut() -> Option<T>) -> Result<T, String> {
    let start = Instant::now();
    loop {
        if let Some(t) = probe() {
            return Ok(t);
        }
        if start.elapsed() > deadline {
            return Err(format!("timed out after {deadline:?} waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The deadline for anything that should happen "soon".
pub const SOON: Duration = Duration::from_secs(30);

/// Where the five hosts are.
#[derive(Clone, Debug)]
pub enum Net {
    /// 127.0.0.1-5 on one port.
    Loopback {
        /// The port every server listens on.
        port: u16,
    },
    /// The namespaces `PREFIX-s1` ... `PREFIX-c2` of `scripts/lab.sh`, at `NET.1-5`.
    Lab {
        /// The namespaces' prefix.
        prefix: String,
        /// The first three octets.
        net: String,
    },
}

/// The port servers listen on in the lab (the default).
pub const LAB_PORT: u16 = 4000;

/// Alice's password (her first login, device 1's or device 2's, creates the
/// account with it).
pub const PASSWORD: &str = "alice's scenario password";

/// A port free on 127.0.0.1-5.
pub fn free_port() -> u16 {
    for _ in 0..100 {
        let Ok(l) = TcpListener::bind("127.0.0.1:0") else { continue };
        let Ok(port) = l.local_addr().map(|a| a.port()) else { continue };
        drop(l);
        if (2..=5).all(|i| TcpListener::bind((Ipv4Addr::new(127, 0, 0, i), port)).is_ok()) {
            return port;
        }
    }
    panic!("no port free on 127.0.0.1-5");
}

impl Net {
    /// Loopback on a free port.
    pub fn loopback() -> Net {
        Net::Loopback { port: free_port() }
    }

    /// The IP address of host `i` (1-3 servers, 4 and 5 the devices).
    pub fn ip(&self, i: u8) -> String {
        match self {
            Net::Loopback { .. } => format!("127.0.0.{i}"),
            Net::Lab { net, .. } => format!("{net}.{i}"),
        }
    }

    /// The port servers listen on.
    pub fn port(&self) -> u16 {
        match self {
            Net::Loopback { port } => *port,
            Net::Lab { .. } => LAB_PORT,
        }
    }

    /// `IP:PORT` of server `i`.
    pub fn addr(&self, i: u8) -> String {
        format!("{}:{}", self.ip(i), self.port())
    }

    /// The lab's name of host `i`.
    pub fn host(i: u8) -> String {
        match i {
            1..=3 => format!("s{i}"),
            _ => format!("c{}", i - 3),
        }
    }

    /// A command that runs `program` on host `i`: as it is on loopback, under
    /// `ip netns exec` in the lab.
    pub fn command(&self, i: u8, program: &Path) -> Command {
        match self {
            Net::Loopback { .. } => Command::new(program),
            Net::Lab { prefix, .. } => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &format!("{prefix}-{}", Net::host(i))]).arg(program);
                c
            }
        }
    }

    /// The options that put a process on host `i`: `--bind` on loopback (and the
    /// port, for a server), none in the lab.
    fn place(&self, i: u8, server: bool) -> Vec<String> {
        match self {
            Net::Loopback { port } if server => {
                vec!["--bind".into(), self.ip(i), "--port".into(), port.to_string()]
            }
            Net::Loopback { .. } => vec!["--bind".into(), self.ip(i)],
            Net::Lab { .. } => Vec::new(),
        }
    }

    /// `replibox-server --status` of server `i`, parsed; None while it does not answer.
    pub fn status(&self, i: u8) -> Option<serde_json::Value> {
        let out = Command::new(bin("replibox-server")).args(["--status", &self.addr(i)]).output().ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }
}

/// A narrated timeline: each line with the milliseconds since the start.
#[derive(Clone)]
pub struct Timeline {
    t0: Instant,
    narrate: bool,
}

impl Timeline {
    /// Starts now; prints only when `narrate`.
    pub fn new(narrate: bool) -> Timeline {
        Timeline { t0: Instant::now(), narrate }
    }

    /// Prints one line of the timeline.
    pub fn say(&self, line: impl AsRef<str>) {
        if self.narrate {
            println!("{:>8.1} ms  {}", self.t0.elapsed().as_secs_f64() * 1000.0, line.as_ref());
        }
    }
}

/// Three servers: server 1 started with `-p`, 2 and 3 with `-b` server 1.
pub struct Cluster {
    /// Where the hosts are.
    pub net: Net,
    /// Where data dirs and sync dirs go.
    pub root: PathBuf,
    servers: [Option<Proc>; 3],
}

/// The member ids in a `--status` answer, sorted.
fn member_ids(status: &serde_json::Value) -> Option<Vec<u64>> {
    let mut ids: Vec<u64> = status["members"].as_array()?.iter().filter_map(|m| m["id"].as_u64()).collect();
    ids.sort();
    Some(ids)
}

impl Cluster {
    /// Starts the three servers (with the default timeouts) and waits until all
    /// three report the full membership.
    pub fn start(net: Net, root: &Path) -> Result<Cluster, String> {
        let _ = std::fs::remove_dir_all(root);
        std::fs::create_dir_all(root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
        let mut c = Cluster { net, root: root.to_path_buf(), servers: [None, None, None] };
        c.spawn(1, &["-p".into(), "--id".into(), "1".into()])?;
        wait_for("server 1 to serve", SOON, || c.net.status(1))?;
        // Server 1 made the cluster key in its data dir; the backups are given a
        // copy, as an operator copies it to the other workstations.
        std::fs::copy(c.data(1).join("cluster.key"), c.key_file())
            .map_err(|e| format!("cannot copy server 1's cluster key: {e}"))?;
        for i in 2..=3u8 {
            c.spawn(i, &["-b".into(), c.net.addr(1), "--id".into(), i.to_string()])?;
        }
        c.wait_members(&[1, 2, 3])?;
        Ok(c)
    }

    /// The loopback set-up of the demos: three servers on 127.0.0.1-3, device 2
    /// (replibox-client) on .5 and device 1 (in-process) on .4, each said on `tl`.
    pub fn on_loopback_with_devices(root: &Path, tl: &Timeline) -> Result<(Cluster, Device1, Device2), String> {
        let cluster = Cluster::start(Net::loopback(), root)?;
        let net = cluster.net.clone();
        tl.say(format!("three servers up: primary 127.0.0.1, backups 127.0.0.2 and .3 (port {})", net.port()));
        let device2 = Device2::start(&net, root)?;
        let device1 = Device1::login(&net)?;
        tl.say("device 1 (127.0.0.4, in-process front-end) and device 2 (127.0.0.5, replibox-client) logged in");
        Ok((cluster, device1, device2))
    }

    /// The member ids server `i` reports, sorted.
    pub fn members(&self, i: u8) -> Option<Vec<u64>> {
        member_ids(&self.net.status(i)?)
    }

    /// The copy of the cluster key that backups are given (`--key-file`).
    pub fn key_file(&self) -> PathBuf {
        self.root.join("cluster.key")
    }

    /// Server `i`'s data dir.
    pub fn data(&self, i: u8) -> PathBuf {
        self.root.join(format!("s{i}"))
    }

    /// Server `i`'s copy of alice's files.
    pub fn files(&self, i: u8) -> PathBuf {
        self.data(i).join("users/alice")
    }

    fn spawn(&mut self, i: u8, mode: &[String]) -> Result<(), String> {
        // Each run of a server logs to `ROOT/sI.log` (appended across restarts):
        // kept, with the data dirs, when a run fails.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join(format!("s{i}.log")))
            .map_err(|e| format!("cannot create server {i}'s log: {e}"))?;
        let mut cmd = self.net.command(i, &bin("replibox-server"));
        cmd.args(mode);
        if mode.first().is_some_and(|m| m == "-b") {
            cmd.arg("--key-file").arg(self.key_file());
        }
        cmd.args(self.net.place(i, true))
            .arg("--data")
            .arg(self.data(i))
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd.spawn().map_err(|e| format!("cannot start server {i}: {e}"))?;
        self.servers[usize::from(i - 1)] = Some(Proc(child));
        Ok(())
    }

    /// SIGKILLs server `i`.
    pub fn kill(&mut self, i: u8) {
        drop(self.servers[usize::from(i - 1)].take());
    }

    /// Sends a signal (`STOP`, `CONT`) to server `i`.
    pub fn signal(&self, i: u8, sig: &str) -> Result<(), String> {
        let p = self.servers[usize::from(i - 1)].as_ref().ok_or(format!("server {i} is not running"))?;
        let ok = Command::new("kill").args(["-s", sig, &p.0.id().to_string()]).status().is_ok_and(|s| s.success());
        ok.then_some(()).ok_or(format!("kill -s {sig} server {i} failed"))
    }

    /// Starts server `i` again on its data dir, as a backup joining through
    /// server `via`.
    pub fn restart_as_backup(&mut self, i: u8, via: u8) -> Result<(), String> {
        self.spawn(i, &["-b".into(), self.net.addr(via), "--id".into(), i.to_string()])
    }

    /// Waits until exactly one of `among` answers as primary of an epoch above
    /// `above`, and returns it with its epoch.
    pub fn wait_primary(&self, among: &[u8], above: u64) -> Result<(u8, u64), String> {
        wait_for(&format!("a primary of an epoch above {above} among servers {among:?}"), SOON, || {
            let found: Vec<(u8, u64)> = among
                .iter()
                .filter_map(|i| {
                    let s = self.net.status(*i)?;
                    (s["role"] == "primary").then(|| (*i, s["epoch"].as_u64().unwrap_or(0)))
                })
                .filter(|(_, e)| *e > above)
                .collect();
            match found[..] {
                [one] => Some(one),
                _ => None,
            }
        })
    }

    /// Waits until every server in `ids` reports exactly those members, at one
    /// seq and one epoch, and one of them answers as primary.
    pub fn wait_members(&self, ids: &[u8]) -> Result<(), String> {
        let mut want: Vec<u64> = ids.iter().map(|i| u64::from(*i)).collect();
        want.sort();
        wait_for(&format!("servers {ids:?} to report members {ids:?} at one seq"), SOON, || {
            let all: Vec<serde_json::Value> = ids.iter().map(|i| self.net.status(*i)).collect::<Option<_>>()?;
            let same = all.iter().all(|s| {
                member_ids(s).is_some_and(|m| m == want) && s["seq"] == all[0]["seq"] && s["epoch"] == all[0]["epoch"]
            });
            (same && all.iter().filter(|s| s["role"] == "primary").count() == 1).then_some(())
        })
    }

    /// The role and epoch server `i` reports.
    pub fn role(&self, i: u8) -> Option<(String, u64)> {
        let s = self.net.status(i)?;
        Some((s["role"].as_str()?.to_string(), s["epoch"].as_u64()?))
    }
}

/// Device 1: the client's front-end, in this process, from host 4.
pub struct Device1 {
    /// The front-end.
    pub front: Frontend,
    /// The latest resumption after a loss: when, and a sentence saying how.
    pub resumed: Arc<Mutex<Option<(Instant, String)>>>,
}

impl Device1 {
    /// Logs in to server 1.
    pub fn login(net: &Net) -> Result<Device1, String> {
        let bind = match net {
            Net::Loopback { .. } => Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4))),
            Net::Lab { .. } => None,
        };
        let cfg = Config {
            user: "alice".into(),
            device: DeviceId("00000000000000d1".into()),
            server: net.addr(1),
            bind,
            callback_port: 0,
            failover_wait: SOON,
            password: SharedPassword::new(PASSWORD),
            create_account: true,
        };
        let (front, events, _) = Frontend::connect(cfg).map_err(|e| format!("device 1 cannot log in: {e}"))?;
        let resumed: Arc<Mutex<Option<(Instant, String)>>> = Arc::new(Mutex::new(None));
        let r = resumed.clone();
        std::thread::spawn(move || {
            for ev in events {
                if let FrontEvent::Reconnected { server, epoch, after, callback } = ev {
                    let how = if callback { "called back by the new primary" } else { "logged in again to" };
                    let line = format!("device 1 {how} {server} (epoch {epoch}) after {} ms", after.as_millis());
                    *lock(&r) = Some((Instant::now(), line));
                }
            }
        });
        Ok(Device1 { front, resumed })
    }

    /// Uploads `size` bytes of `source` as `name`; Ok once acknowledged.
    pub fn upload<F: Read + Seek>(&self, name: &str, source: &mut F, size: u64) -> Result<(), String> {
        match self.front.upload(name, source, size, 0, None, false, &mut |_| {}) {
            Ok(OpResult::Done { .. }) => Ok(()),
            Ok(other) => Err(format!("{name} was answered {other:?}")),
            Err(e) => Err(format!("{name} failed: {e}")),
        }
    }

    /// Starts changing a file every 10 ms (`tick-NNNNN.txt`), each timed to its ack.
    pub fn start_writer(&self) -> Writer {
        let acked: Arc<Mutex<Vec<(String, Instant)>>> = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s, front) = (acked.clone(), stop.clone(), self.front.clone());
        let thread = std::thread::spawn(move || -> Result<(), String> {
            let mut n = 0u32;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                let name = format!("tick-{n:05}.txt");
                let body = format!("change {n}\n");
                let mut src = Cursor::new(body.as_bytes().to_vec());
                match front.upload(&name, &mut src, body.len() as u64, 0, None, false, &mut |_| {}) {
                    Ok(OpResult::Done { .. }) => lock(&a).push((name, Instant::now())),
                    Ok(other) => return Err(format!("{name} was answered {other:?}")),
                    Err(e) => return Err(format!("{name} failed: {e}")),
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(())
        });
        Writer { acked, stop, thread: Some(thread) }
    }

    /// The line saying how the session resumed, and how long after `since`, if it
    /// did after `since`.
    pub fn resumed_since(&self, since: Instant) -> Option<String> {
        lock(&self.resumed)
            .as_ref()
            .filter(|(t, _)| *t >= since)
            .map(|(t, l)| format!("{l} (at +{} ms)", (*t - since).as_millis()))
    }
}

/// Device 1's stream of changes.
pub struct Writer {
    acked: Arc<Mutex<Vec<(String, Instant)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl Writer {
    /// How many changes are acknowledged so far.
    pub fn count(&self) -> usize {
        lock(&self.acked).len()
    }

    /// Waits for the first change acknowledged after `t`; returns its name and
    /// how long after `t` it was acknowledged: the outage a user sees.
    pub fn first_after(&self, t: Instant) -> Result<(String, Duration), String> {
        wait_for("the first change acknowledged after it", SOON, || {
            lock(&self.acked).iter().find(|(_, at)| *at > t).map(|(n, at)| (n.clone(), *at - t))
        })
    }

    /// Waits until `n` more changes are acknowledged.
    pub fn wait_more(&self, n: usize) -> Result<(), String> {
        let from = self.count();
        wait_for(&format!("{n} more acknowledged changes"), SOON, || (self.count() >= from + n).then_some(()))
    }

    /// Stops and returns the names of every acknowledged change.
    pub fn stop(mut self) -> Result<Vec<String>, String> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().map_err(|_| "the writer panicked".to_string())??;
        }
        Ok(lock(&self.acked).iter().map(|(n, _)| n.clone()).collect())
    }
}

/// Device 2: a real `replibox-client`, headless, from host 5.
pub struct Device2 {
    /// Its sync dir.
    pub dir: PathBuf,
    _proc: Proc,
}

impl Device2 {
    /// Starts it against server 1.
    pub fn start(net: &Net, root: &Path) -> Result<Device2, String> {
        let dir = root.join("device2");
        let log = std::fs::File::create(root.join("device2.log"))
            .map_err(|e| format!("cannot create device 2's log: {e}"))?;
        let mut cmd = net.command(5, &bin("replibox-client"));
        cmd.args(["alice", &net.ip(1), &net.port().to_string()])
            .args(net.place(5, false))
            .args(["--headless", "--device-name", "device2", "--sync-dir"])
            .arg(&dir)
            .env("REPLIBOX_PASSWORD", PASSWORD)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd.spawn().map_err(|e| format!("cannot start device 2: {e}"))?;
        Ok(Device2 { dir, _proc: Proc(child) })
    }
}

/// Checks that every change in `acked` is on each of `servers` (id, and what to
/// call it) and on device 2. The servers are checked once they agree (every one
/// of them a member, at one seq, one of them primary): a backup that was dropped
/// meanwhile (a false suspicion under load, say) is not waited for by the
/// acknowledgements until it has caught up again, so only a settled cluster must
/// hold every acknowledged change at once. Device 2 gets [`SOON`] to receive them.
/// Says which place lacks how many.
pub fn check_everywhere(
    cluster: &Cluster,
    acked: &[String],
    servers: &[(u8, String)],
    device2: &Device2,
    tl: &Timeline,
) -> Result<(), String> {
    let ids: Vec<u8> = servers.iter().map(|(i, _)| *i).collect();
    cluster.wait_members(&ids)?;
    let mut places: Vec<(String, PathBuf, Duration)> =
        servers.iter().map(|(i, what)| (what.clone(), cluster.files(*i), Duration::ZERO)).collect();
    places.push(("device 2".into(), device2.dir.clone(), SOON));
    for (what, dir, deadline) in &places {
        let missing = || acked.iter().filter(|n| !dir.join(n).is_file()).count();
        wait_for(&format!("every acknowledged change on {what}"), *deadline, || (missing() == 0).then_some(()))
            .map_err(|_| {
                format!("LOSS: {} of {} acknowledged changes are missing on {what}", missing(), acked.len())
            })?;
        tl.say(format!("{what} holds all {} acknowledged changes", acked.len()));
    }
    Ok(())
}

/// What one run measured: named durations (outages), in order.
pub type Measured = Vec<(String, Duration)>;

/// `--runs N` (default 1), or None after printing the usage.
pub fn runs_arg(name: &str, args: &[String]) -> Option<usize> {
    match args.iter().position(|a| a == "--runs") {
        Some(i) => match args.get(i + 1).and_then(|n| n.parse().ok()) {
            Some(n) if n > 0 => Some(n),
            _ => {
                eprintln!("usage: {name} [--runs N]");
                None
            }
        },
        None => Some(1),
    }
}

/// The median (the mean of the two middle values of an even count).
pub fn median(sorted: &[Duration]) -> Duration {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2
    }
}

/// Runs `run` `runs` times (narrating when once), each in its own directory under
/// the temp dir (server logs `sI.log`, device 2's `device2.log`, the data dirs and
/// device 2's sync dir; `KEEP=1` keeps them after a success too), then prints min/median/max of each measure. Exits non-zero on the
/// first failed run, keeping its directory.
pub fn main_loop(
    name: &str,
    runs: usize,
    mut run: impl FnMut(&Path, &Timeline) -> Result<Measured, String>,
) -> ExitCode {
    let root = std::env::temp_dir().join(format!("replibox-{name}-{}", std::process::id()));
    let mut all: Vec<Measured> = Vec::new();
    for r in 1..=runs {
        if runs > 1 {
            println!("run {r} of {runs}");
        }
        let tl = Timeline::new(runs == 1);
        match run(&root.join(format!("run{r}")), &tl) {
            Ok(m) => {
                if runs > 1 {
                    let line: Vec<String> = m.iter().map(|(k, d)| format!("{k} {} ms", d.as_millis())).collect();
                    println!("  {}; nothing acknowledged was lost", line.join(", "));
                }
                all.push(m);
            }
            Err(e) => {
                eprintln!("{name}: FAILED in run {r}: {e}");
                eprintln!("(data kept in {})", root.display());
                return ExitCode::FAILURE;
            }
        }
    }
    if std::env::var_os("KEEP").is_some() {
        println!("(data and logs kept in {})", root.display());
    } else {
        let _ = std::fs::remove_dir_all(&root);
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    for (k, (key, _)) in all[0].iter().enumerate() {
        let mut v: Vec<Duration> = all.iter().filter_map(|m| m.get(k).map(|(_, d)| *d)).collect();
        v.sort();
        let list: Vec<String> = v.iter().map(|d| format!("{:.0}", ms(*d))).collect();
        println!(
            "{key}, over {} run{}: min {:.0} ms, median {:.0} ms, max {:.0} ms (sorted: {})",
            v.len(),
            if v.len() == 1 { "" } else { "s" },
            ms(v[0]),
            ms(median(&v)),
            ms(v[v.len() - 1]),
            list.join(" ")
        );
    }
    println!("{name}: every acknowledged change was everywhere it should be, in every run");
    ExitCode::SUCCESS
}
