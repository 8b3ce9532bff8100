//! The process-test harness: real binaries, real sockets, one directory per test.
//!
//! - [`TestDir`]: the test's own directory under the target dir; kept when the test
//!   fails, removed when it passes. Creating one makes it the test's "current"
//!   directory, whose processes and files every failure report shows.
//! - [`Proc`]: a child process whose stdout and stderr go to files in the test dir,
//!   SIGKILLed on drop so that no test leaves an orphan.
//! - [`Server`], [`Client`]: `replibox-server` and `replibox-client` on 127.0.0.x.
//! - [`wait_until`], [`wait_for`]: poll a condition until a deadline; on timeout the
//!   panic says what was awaited and shows every process's output and the test dir.
//! - [`files`]: seeded content, tree snapshots and comparisons.
//! - [`raw`]: a hand-driven protocol connection, for bad input.
//! - [`cluster`]: primaries and backups with timers that fit a loaded machine, and
//!   the membership they report.
//! - [`proxy`]: a proxy that loses a server's frame on purpose (a lost reply).
//! - [`chaos`]: the chaos suite's die, ledger and data-dir readers.
//! - [`fake`]: hostile peers: a fake server for a client, a fake primary for a
//!   backup.
//! - [`disk`]: (as root) a small tmpfs that fills up, a folder made read-only in
//!   place.
//!
//! No sleep is an assertion here: everything waits on a condition, with deadlines
//! generous enough for a loaded 2-core machine.

pub mod chaos;
pub mod cluster;
pub mod disk;
pub mod fake;
pub mod files;
pub mod proxy;
pub mod raw;

use replibox_proto::ClusterKey;
use std::cell::RefCell;
use std::fs::{self, File};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The deadline for anything that should happen "soon": generous, because a
/// timeout only ever turns a hang into a readable failure.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The clients' full-rescan period in tests: longer than any deadline, so that a
/// change the watcher missed makes a live-sync test fail instead of arriving by the
/// periodic rescan (30 s by default, as long as [`DEADLINE`]). A test of the rescan
/// itself sets a short one.
pub const NO_RESCAN: Duration = Duration::from_secs(3600);

/// The loopback address servers listen on (the first of the three servers later).
pub const SERVER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
/// The loopback address of a user's first device.
pub const DEVICE1_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4));
/// The loopback address of a user's second device.
pub const DEVICE2_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 5));
/// A further address, for a third device or a rogue client.
pub const DEVICE3_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6));
/// And one more.
pub const DEVICE4_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 7));

// ---------------------------------------------------------------------------
// Binaries

/// The client binary, built by cargo for this test.
pub fn client_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_replibox-client"))
}

/// The server binary: cargo only builds the tested package's binaries, so it is
/// looked for beside the client's, where `cargo build --workspace` puts it.
pub fn server_bin() -> PathBuf {
    static FOUND: OnceLock<PathBuf> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let client = client_bin();
            let dir = client.parent().expect("the client binary has a directory");
            let server = dir.join(format!("replibox-server{}", std::env::consts::EXE_SUFFIX));
            assert!(
                server.is_file(),
                "replibox-server not found at {}: cargo builds only the client's binary for these tests; \
                 run `cargo build --workspace` first (with the same CARGO_TARGET_DIR and profile)",
                server.display()
            );
            if let Some(newer) = newer_source_than(&server) {
                panic!(
                    "{} is older than {}: cargo test does not rebuild the server binary; \
                     run `cargo build --workspace` first (with the same CARGO_TARGET_DIR and profile)",
                    server.display(),
                    newer.display()
                );
            }
            server
        })
        .clone()
}

/// A source file of the server (its crate, or a crate it depends on, and their
/// manifests) modified after `binary` was built, if any. The workspace's
/// `Cargo.toml` and `Cargo.lock` are not looked at: a dependency added to
/// another crate changes them, and `cargo build --workspace` then rightly
/// leaves the server's binary as it was, which would refuse every test.
/// Sources compiled into unit tests only: cargo does not rebuild a binary when
/// they change, so they say nothing about its age.
const TEST_ONLY: &[&str] = &["crates/replica/src/sim.rs"];

fn newer_source_than(binary: &Path) -> Option<PathBuf> {
    let built = fs::metadata(binary).and_then(|m| m.modified()).ok()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?.parent()?;
    let mut stack: Vec<PathBuf> = ["crates/replica", "crates/proto", "crates/election"]
        .iter()
        .flat_map(|c| [root.join(c).join("src"), root.join(c).join("Cargo.toml")])
        .collect();
    while let Some(p) = stack.pop() {
        let Ok(md) = fs::metadata(&p) else { continue };
        if md.is_dir() {
            stack.extend(fs::read_dir(&p).into_iter().flatten().flatten().map(|e| e.path()));
        } else if md.modified().is_ok_and(|m| m > built) && !TEST_ONLY.iter().any(|t| p.ends_with(t)) {
            return Some(p);
        }
    }
    None
}

// ---------------------------------------------------------------------------
// The current test: what a failure report shows

#[derive(Clone)]
struct ProcInfo {
    name: String,
    pid: u32,
    stdout: PathBuf,
    stderr: PathBuf,
}

#[derive(Default)]
struct Current {
    root: Option<PathBuf>,
    procs: Vec<ProcInfo>,
    reported: bool,
}

thread_local! {
    static CURRENT: RefCell<Current> = RefCell::new(Current::default());
}

fn register(info: ProcInfo) {
    CURRENT.with(|c| c.borrow_mut().procs.push(info));
}

fn tail(path: &Path, lines: usize) -> String {
    let text = match fs::read(path) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) => return format!("    (cannot read {}: {e})\n", path.display()),
    };
    let all: Vec<&str> = text.lines().collect();
    let skip = all.len().saturating_sub(lines);
    let mut out = String::new();
    if skip > 0 {
        out.push_str(&format!("    ... {skip} earlier lines in {}\n", path.display()));
    }
    for l in &all[skip..] {
        out.push_str("    ");
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// Every process's output and a listing of the test dir, for a failure message.
pub fn report() -> String {
    CURRENT.with(|c| {
        let c = c.borrow();
        let mut out = String::new();
        for p in &c.procs {
            out.push_str(&format!("\n--- {} (pid {}) stdout:\n", p.name, p.pid));
            out.push_str(&tail(&p.stdout, 40));
            out.push_str(&format!("--- {} (pid {}) stderr:\n", p.name, p.pid));
            out.push_str(&tail(&p.stderr, 80));
        }
        if let Some(root) = &c.root {
            out.push_str(&format!("\n--- files under {}:\n", root.display()));
            out.push_str(&files::listing(root, 300));
        }
        out
    })
}

fn mark_reported() {
    CURRENT.with(|c| c.borrow_mut().reported = true);
}

/// Panics with `msg` followed by the report.
#[track_caller]
pub fn fail(msg: impl std::fmt::Display) -> ! {
    let report = report();
    mark_reported();
    panic!("{msg}\n{report}");
}

// ---------------------------------------------------------------------------
// Waiting

/// Polls `cond` until it holds; on timeout panics saying what was awaited, with
/// every process's output and a listing of the test dir.
#[track_caller]
pub fn wait_until(deadline: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    wait_for(deadline, what, || cond().then_some(()))
}

/// Polls `probe` until it gives a value, and returns it; on timeout panics like
/// [`wait_until`].
#[track_caller]
pub fn wait_for<T>(deadline: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(t) = probe() {
            return t;
        }
        if start.elapsed() >= deadline {
            fail(format!("timed out after {deadline:?} waiting for: {what}"));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Polls a server's `DATA/tmp` every millisecond until it holds part of an upload
/// (more than 0 and fewer than `below` bytes), and returns that many bytes. Tests
/// that interrupt an upload need one slow enough to catch: when `finished` says the
/// upload completed first, the test could not arrange its scenario, and this fails
/// saying so (neither passing without the scenario nor blaming the guarantee).
#[track_caller]
pub fn catch_mid_upload(tmp: &Path, below: u64, finished: impl Fn() -> bool) -> u64 {
    let start = Instant::now();
    loop {
        let in_flight: Vec<u64> = files::tree(tmp).files.into_values().collect();
        if let Some(&n) = in_flight.iter().find(|&&n| n > 0 && n < below) {
            return n;
        }
        if finished() {
            fail(format!(
                "could not arrange this test's scenario: the upload finished before a poll every 1 ms saw it \
                 under way in {}; the test needs an upload slower than that (a loaded machine is fine, an \
                 extremely fast one is not)",
                tmp.display()
            ));
        }
        if start.elapsed() > DEADLINE {
            fail(format!("timed out after {DEADLINE:?} waiting for an upload to start in {}", tmp.display()));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Expected content of a tree: relative path -> bytes.
pub type Want = std::collections::BTreeMap<String, Vec<u8>>;

/// The file rows of a `list_server`/`list_client` table: name -> size (the
/// rows of empty folders, `name/` with `-` for a size, are [`listed_folders`]).
pub fn listed(table: &str) -> std::collections::BTreeMap<String, u64> {
    listing_rows(table).0
}

/// The empty folders a `list_server`/`list_client` table shows (`name/` rows).
pub fn listed_folders(table: &str) -> std::collections::BTreeSet<String> {
    listing_rows(table).1
}

/// A listing's file rows (name -> size) and folder rows.
fn listing_rows(table: &str) -> (std::collections::BTreeMap<String, u64>, std::collections::BTreeSet<String>) {
    let mut folders = std::collections::BTreeSet::new();
    let mut rows = std::collections::BTreeMap::new();
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines.len() >= 2 && lines[0].starts_with("NAME"), "not a listing: {table}");
    for line in &lines[1..lines.len() - 1] {
        // NAME (padded)  SIZE  MTIME-DATE MTIME-TIME  ATIME...  CTIME...
        let mut rest = line.trim_end();
        let mut tail = Vec::new();
        for _ in 0..7 {
            let i = rest.rfind(' ').unwrap_or_else(|| panic!("short listing row {line:?}"));
            tail.push(&rest[i + 1..]);
            rest = rest[..i].trim_end();
        }
        if tail[6] == "-" && rest.ends_with('/') {
            folders.insert(rest.to_string());
            continue;
        }
        let size = tail[6].parse().unwrap_or_else(|_| panic!("no size in listing row {line:?}"));
        rows.insert(rest.to_string(), size);
    }
    let count = lines[lines.len() - 1];
    assert!(count.starts_with(&format!("{} file", rows.len())), "the count line {count:?} does not match {rows:?}");
    let n = folders.len();
    let said = format!(", {n} empty folder");
    assert_eq!(count.contains(&said), n > 0, "the count line {count:?} does not match the folders {folders:?}");
    (rows, folders)
}

/// Sizes of the files in `want`.
pub fn sizes(want: &Want) -> std::collections::BTreeMap<String, u64> {
    want.iter().map(|(p, b)| (p.clone(), b.len() as u64)).collect()
}

/// Waits until every root holds exactly `want` (paths, bytes, and no folder the
/// files do not need; see [`files::check_tree`]); on timeout the panic shows the
/// last difference found.
#[track_caller]
pub fn wait_trees(what: &str, roots: &[&Path], want: &Want) {
    let start = Instant::now();
    loop {
        let last = match roots.iter().try_for_each(|r| files::check_tree(r, want)) {
            Ok(()) => return,
            Err(e) => e,
        };
        if start.elapsed() >= DEADLINE {
            fail(format!("timed out after {DEADLINE:?} waiting for: {what}\nlast difference: {last}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until every root holds exactly `want` and the empty folders `empty`
/// (see [`files::check_layout`]); on timeout the panic shows the last difference.
#[track_caller]
pub fn wait_layout(what: &str, roots: &[&Path], want: &Want, empty: &[&str]) {
    let start = Instant::now();
    loop {
        let last = match roots.iter().try_for_each(|r| files::check_layout(r, want, empty)) {
            Ok(()) => return,
            Err(e) => e,
        };
        if start.elapsed() >= DEADLINE {
            fail(format!("timed out after {DEADLINE:?} waiting for: {what}\nlast difference: {last}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// The test dir

/// A test's own directory, `target/tmp/process/NAME`. Kept when the test fails
/// (its path is printed), removed when it passes unless `REPLIBOX_KEEP_TEST_DIRS`
/// is set.
pub struct TestDir {
    /// Its path.
    pub path: PathBuf,
}

impl TestDir {
    /// Creates (emptied) the directory for test `name` and makes it the current one.
    pub fn new(name: &str) -> TestDir {
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("process").join(name);
        if path.exists() {
            fs::remove_dir_all(&path).unwrap_or_else(|e| panic!("cannot empty {}: {e}", path.display()));
        }
        fs::create_dir_all(path.join("logs")).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        CURRENT.with(|c| *c.borrow_mut() = Current { root: Some(path.clone()), procs: Vec::new(), reported: false });
        TestDir { path }
    }

    /// The test's cluster key file, `cluster.key` in the test dir (made, mode
    /// 0600, the first time it is asked for). [`Server::start`] gives it to every
    /// server with `--key-file` unless the test passes its own: the servers of one
    /// test form one cluster, as `make cluster`'s do with server 1's key.
    pub fn key_file(&self) -> PathBuf {
        let path = self.path.join("cluster.key");
        if !path.exists() {
            let key = ClusterKey::generate().unwrap_or_else(|e| panic!("cannot make a cluster key: {e}"));
            match key.save_new(&path) {
                Ok(()) | Err(replibox_proto::KeyError::Exists { .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }
        path
    }

    /// The test's cluster key (see [`TestDir::key_file`]).
    pub fn key(&self) -> ClusterKey {
        ClusterKey::load(&self.key_file()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A path inside the test dir.
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }

    /// Creates a subdirectory and returns its path.
    pub fn mkdir(&self, rel: impl AsRef<Path>) -> PathBuf {
        let p = self.path.join(rel);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("cannot create {}: {e}", p.display()));
        p
    }

    fn log_paths(&self, name: &str) -> (PathBuf, PathBuf) {
        let logs = self.path.join("logs");
        let mut n = 1;
        loop {
            let stem = if n == 1 { name.to_string() } else { format!("{name}.{n}") };
            let out = logs.join(format!("{stem}.stdout"));
            if !out.exists() {
                return (out, logs.join(format!("{stem}.stderr")));
            }
            n += 1;
        }
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let reported = CURRENT.with(|c| std::mem::take(&mut *c.borrow_mut()).reported);
        if std::thread::panicking() {
            if !reported {
                // Processes are already killed (they were created after the dir, so
                // dropped before it); their output stays in the files.
                eprintln!("{}", report_for(&self.path));
            }
            eprintln!("test dir kept for inspection: {}", self.path.display());
        } else if std::env::var_os("REPLIBOX_KEEP_TEST_DIRS").is_none() {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

fn report_for(root: &Path) -> String {
    let mut out = String::new();
    let logs = root.join("logs");
    let mut names: Vec<PathBuf> =
        fs::read_dir(&logs).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    names.sort();
    for p in names {
        out.push_str(&format!("\n--- {}:\n", p.file_name().unwrap_or_default().to_string_lossy()));
        out.push_str(&tail(&p, 80));
    }
    out.push_str(&format!("\n--- files under {}:\n", root.display()));
    out.push_str(&files::listing(root, 300));
    out
}

// ---------------------------------------------------------------------------
// Ports

/// A port on `ip` that nothing listens on now, outside the kernel's ephemeral
/// range (so no outgoing connection takes it meanwhile), different for every call
/// in this process and spread by pid between concurrent test processes.
pub fn free_port(ip: IpAddr) -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    const BASE: u16 = 20_000;
    const SPAN: u16 = 12_000; // below 32768, where Linux's ephemeral range starts
    let offset = ((std::process::id() % 97) as u16) * 120;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = BASE + (offset + n) % SPAN;
        if TcpListener::bind(SocketAddr::new(ip, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on {ip}");
}

// ---------------------------------------------------------------------------
// Processes

/// A child process with its output in files; SIGKILLed on drop.
pub struct Proc {
    /// Its name in reports.
    pub name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    status: Option<ExitStatus>,
    /// File holding its stdout.
    pub stdout_path: PathBuf,
    /// File holding its stderr.
    pub stderr_path: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr going to `logs/NAME.stdout|stderr` in the
    /// test dir, and stdin piped (kept open until [`Proc::close_stdin`]) or null.
    pub fn spawn(t: &TestDir, name: &str, mut cmd: Command, piped_stdin: bool) -> Proc {
        let (stdout_path, stderr_path) = t.log_paths(name);
        let out = File::create(&stdout_path).expect("create stdout file");
        let err = File::create(&stderr_path).expect("create stderr file");
        cmd.stdout(out).stderr(err).stdin(if piped_stdin { Stdio::piped() } else { Stdio::null() });
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        let stdin = child.stdin.take();
        register(ProcInfo {
            name: name.to_string(),
            pid: child.id(),
            stdout: stdout_path.clone(),
            stderr: stderr_path.clone(),
        });
        Proc { name: name.to_string(), child, stdin, status: None, stdout_path, stderr_path }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it wrote to stdout so far.
    pub fn stdout(&self) -> String {
        fs::read(&self.stdout_path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// Everything it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read(&self.stderr_path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// Writes one line to its stdin.
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap_or_else(|| fail(format!("{}: stdin is not open", self.name)));
        if let Err(e) = stdin.write_all(format!("{line}\n").as_bytes()).and_then(|_| stdin.flush()) {
            fail(format!("{}: cannot write {line:?} to its stdin: {e}", self.name));
        }
    }

    /// Writes raw bytes to its stdin (keys for a terminal, no newline added).
    pub fn send_bytes(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().unwrap_or_else(|| fail(format!("{}: stdin is not open", self.name)));
        if let Err(e) = stdin.write_all(bytes).and_then(|_| stdin.flush()) {
            fail(format!("{}: cannot write {bytes:?} to its stdin: {e}", self.name));
        }
    }

    /// Closes its stdin (end of input).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Its exit status if it has ended.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().unwrap_or_else(|e| panic!("waiting for {}: {e}", self.name));
        }
        self.status
    }

    /// True while it runs.
    pub fn running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Sends a signal by name (`INT`, `TERM`, `STOP`, `CONT`, `KILL`). After `STOP`
    /// it waits until every thread of the process has stopped: the signal is only
    /// queued when `kill` returns, and on a loaded machine a thread may still run
    /// for a while (and, say, see its primary die) before it stops.
    pub fn signal(&mut self, sig: &str) {
        if !self.running() {
            fail(format!("cannot send SIG{sig} to {}: it has already ended", self.name));
        }
        let ok = Command::new("kill")
            .args(["-s", sig, &self.pid().to_string()])
            .status()
            .unwrap_or_else(|e| panic!("cannot run kill: {e}"))
            .success();
        assert!(ok, "kill -s {sig} {} failed", self.pid());
        if sig == "STOP" {
            let pid = self.pid();
            wait_until(DEADLINE, &format!("every thread of {} to stop", self.name), || all_stopped(pid));
        }
    }

    /// SIGKILLs it (if still running) and reaps it.
    pub fn kill(&mut self) -> ExitStatus {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = Some(self.child.wait().unwrap_or_else(|e| panic!("waiting for {}: {e}", self.name)));
        }
        self.status.unwrap()
    }

    /// Waits for it to end on its own.
    #[track_caller]
    pub fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let what = format!("{} to exit", self.name);
        wait_for(deadline, &what, || self.try_status())
    }

    /// Peak resident set size (VmHWM) in KiB, from /proc.
    pub fn vm_hwm_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_else(|e| fail(format!("cannot read /proc status of {}: {e}", self.name)));
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| fail(format!("no VmHWM in /proc status of {}", self.name)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stdin = None;
        self.kill();
    }
}

// ---------------------------------------------------------------------------
// Servers

/// How to start a server.
#[derive(Clone, Debug)]
pub struct ServerOpts {
    /// Name in reports and log files.
    pub name: String,
    /// Address to listen on.
    pub ip: IpAddr,
    /// Port; None picks a free one.
    pub port: Option<u16>,
    /// Data dir; None is `NAME-data` in the test dir.
    pub data: Option<PathBuf>,
    /// Mode arguments, `["-p"]` for a primary (later `["-b", "HOST:PORT"]`).
    pub mode: Vec<String>,
    /// Further arguments.
    pub extra: Vec<String>,
}

impl ServerOpts {
    /// A primary named `name` on 127.0.0.1.
    pub fn primary(name: &str) -> ServerOpts {
        ServerOpts { name: name.into(), ip: SERVER_IP, port: None, data: None, mode: vec!["-p".into()], extra: vec![] }
    }
}

/// A running (or stopped) `replibox-server`.
pub struct Server {
    /// How it was started; `port` and `data` are filled in.
    pub opts: ServerOpts,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its data dir.
    pub data: PathBuf,
    /// The process of its current run.
    pub proc: Proc,
}

impl Server {
    /// The usual single primary on 127.0.0.1.
    pub fn primary(t: &TestDir) -> Server {
        Server::start(t, ServerOpts::primary("server"))
    }

    /// Starts a server and waits until it answers a status query: its port is
    /// bound before it opens its data dir (and redoes what a crash left), so a
    /// connection alone says nothing about its files yet.
    /// It is given the test's cluster key ([`TestDir::key_file`]) unless `opts`
    /// names a `--key-file`.
    pub fn start(t: &TestDir, opts: ServerOpts) -> Server {
        let mut opts = opts;
        if !opts.mode.iter().chain(&opts.extra).any(|a| a == "--key-file") {
            opts.extra.extend(["--key-file".to_string(), t.key_file().display().to_string()]);
        }
        let data = opts.data.clone().unwrap_or_else(|| t.join(format!("{}-data", opts.name)));
        let fixed = opts.port.is_some();
        for _attempt in 0..5 {
            let port = opts.port.unwrap_or_else(|| free_port(opts.ip));
            let opts = ServerOpts { port: Some(port), data: Some(data.clone()), ..opts.clone() };
            let mut proc = Proc::spawn(t, &opts.name, server_command(&opts), false);
            let addr = SocketAddr::new(opts.ip, port);
            let up = wait_for(DEADLINE, &format!("{} to answer on {addr}", opts.name), || {
                if query_status_at(addr).is_ok() {
                    return Some(true);
                }
                proc.try_status().map(|_| false)
            });
            if up {
                return Server { opts, addr, data, proc };
            }
            let err = proc.stderr();
            if fixed || !err.contains("cannot listen") {
                fail(format!("{} exited at start-up: {}", opts.name, err.trim()));
            }
            // Someone took the port between the probe and the bind: try another.
        }
        fail(format!("{} could not find a free port", opts.name));
    }

    /// SIGKILLs it.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Starts it again on the same address and data dir (SIGKILLing the old run
    /// first if it still runs).
    pub fn restart(&mut self, t: &TestDir) {
        self.proc.kill();
        let again = Server::start(t, self.opts.clone());
        self.proc = again.proc;
    }

    /// `DATA/users/USER`.
    pub fn user_dir(&self, user: &str) -> PathBuf {
        self.data.join("users").join(user)
    }

    /// `DATA/tmp`.
    pub fn tmp_dir(&self) -> PathBuf {
        self.data.join("tmp")
    }

    /// Its log (stderr) in this run.
    pub fn log(&self) -> String {
        self.proc.stderr()
    }

    /// The `stored user=U path=P ...` log lines of this run for one path, as
    /// (version within its epoch, size, device). A version is `epoch << 32` plus a
    /// count within the epoch (so that no two primaries ever give one version to
    /// two contents); the count is what a test within one epoch can predict.
    pub fn stored(&self, user: &str, path: &str) -> Vec<(u64, u64, String)> {
        let prefix = format!("stored user={user} path={path} version=");
        self.log()
            .lines()
            .filter_map(|l| {
                let rest = &l[l.find(&prefix)? + prefix.len()..];
                let (version, rest) = rest.split_once(" size=")?;
                let (size, device) = rest.split_once(" device=")?;
                let version: u64 = version.parse().ok()?;
                Some((version & 0xFFFF_FFFF, size.parse().ok()?, device.trim().to_string()))
            })
            .collect()
    }

    /// `replibox-server --status` of this server, parsed.
    pub fn status(&self) -> serde_json::Value {
        self.query_status().unwrap_or_else(|e| fail(e))
    }

    /// `--status` of this server, or None while it does not answer (or not in JSON).
    pub fn try_status(&self) -> Option<serde_json::Value> {
        self.query_status().ok()
    }

    fn query_status(&self) -> Result<serde_json::Value, String> {
        query_status_at(self.addr)
    }
}

/// The status query of `replibox-server --status`, done in-process (the
/// `server` tests check the command itself): one `hello` as `status`, one
/// `status` frame back, within 5 s.
pub fn query_status_at(addr: SocketAddr) -> Result<serde_json::Value, String> {
    use replibox_proto::{read_frame, write_frame, Epoch, Msg, Who, PROTOCOL_VERSION};
    let timeout = Duration::from_secs(5);
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("cannot reach {addr}: {e}"))?;
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    let hello = Msg::Hello { version: PROTOCOL_VERSION, who: Who::Status };
    write_frame(&mut stream, Epoch(0), &hello, &[]).map_err(|e| format!("cannot query {addr}: {e}"))?;
    match read_frame(&mut stream) {
        Ok(Some(f)) => match f.msg {
            Msg::Status { status } => Ok(status),
            other => Err(format!("{addr} answered a status query with {}", other.kind())),
        },
        Ok(None) => Err(format!("{addr} closed the connection without answering")),
        Err(e) => Err(format!("no status from {addr}: {e}")),
    }
}

fn server_command(opts: &ServerOpts) -> Command {
    let mut cmd = Command::new(server_bin());
    cmd.args(&opts.mode)
        .args(["--port", &opts.port.unwrap().to_string()])
        .args(["--bind", &opts.ip.to_string()])
        .arg("--data")
        .arg(opts.data.as_ref().unwrap())
        .args(&opts.extra)
        .env("RUST_LOG", std::env::var("REPLIBOX_TEST_SERVER_LOG").unwrap_or_else(|_| "info".into()))
        .env_remove("RUST_BACKTRACE");
    cmd
}

// ---------------------------------------------------------------------------
// Clients

/// How to start a client.
#[derive(Clone, Debug)]
pub struct ClientOpts {
    /// Name in reports and log files (and of its default directories).
    pub name: String,
    /// The user.
    pub user: String,
    /// The server it is given.
    pub server: SocketAddr,
    /// `--bind`.
    pub bind: IpAddr,
    /// `--sync-dir`; None is `NAME-sync` in the test dir.
    pub sync_dir: Option<PathBuf>,
    /// `--headless` (otherwise commands come on stdin).
    pub headless: bool,
    /// Working directory (where `download` writes); None is `NAME-cwd` in the test dir.
    pub cwd: Option<PathBuf>,
    /// `--device-name`; the test's name for the device unless a test clears it to
    /// see the default (the host name).
    pub device_name: Option<String>,
    /// Further arguments.
    pub extra: Vec<String>,
    /// The client's full-rescan period (`REPLIBOX_RESCAN_MS`); [`NO_RESCAN`] by
    /// default.
    pub rescan: Duration,
    /// The password given in `REPLIBOX_PASSWORD` ([`password_of`] the user by
    /// default); None leaves the variable unset.
    pub password: Option<String>,
}

impl ClientOpts {
    /// A device of `user` named `name`, connecting from `bind` to `server`.
    pub fn new(name: &str, user: &str, server: &Server, bind: IpAddr) -> ClientOpts {
        ClientOpts::at(name, user, server.addr, bind)
    }

    /// A device of `user` named `name`, connecting from `bind` to whatever listens
    /// at `server` (a fake server, a proxy).
    pub fn at(name: &str, user: &str, server: SocketAddr, bind: IpAddr) -> ClientOpts {
        ClientOpts {
            name: name.into(),
            user: user.into(),
            server,
            bind,
            sync_dir: None,
            headless: true,
            cwd: None,
            device_name: Some(name.into()),
            extra: Vec::new(),
            rescan: NO_RESCAN,
            password: Some(password_of(user)),
        }
    }

    /// Reads commands from stdin instead of running headless.
    pub fn interactive(mut self) -> ClientOpts {
        self.headless = false;
        self
    }
}

/// A command's outcome: its stdout lines, or its stderr message.
pub type Outcome = Result<String, String>;

/// A `replibox-client` process.
pub struct Client {
    /// How it was started; `sync_dir` and `cwd` are filled in.
    pub opts: ClientOpts,
    /// Its sync dir.
    pub sync_dir: PathBuf,
    /// Its working directory.
    pub cwd: PathBuf,
    /// The process of its current run.
    pub proc: Proc,
}

impl Client {
    /// Starts a headless device and waits until its login sync is done.
    pub fn headless(t: &TestDir, name: &str, user: &str, server: &Server, bind: IpAddr) -> Client {
        let c = Client::spawn(t, ClientOpts::new(name, user, server, bind));
        c.wait_logged_in();
        c
    }

    /// Starts a device reading commands from stdin and waits until its login sync
    /// is done.
    pub fn interactive(t: &TestDir, name: &str, user: &str, server: &Server, bind: IpAddr) -> Client {
        let c = Client::spawn(t, ClientOpts::new(name, user, server, bind).interactive());
        c.wait_logged_in();
        c
    }

    /// Starts a client without waiting for anything.
    pub fn spawn(t: &TestDir, opts: ClientOpts) -> Client {
        Client::start(t, opts, true)
    }

    /// Starts a client without `--sync-dir` (so it uses `./sync_dir_USER` in its
    /// working directory), without waiting for anything.
    pub fn spawn_without_sync_dir(t: &TestDir, opts: ClientOpts) -> Client {
        Client::start(t, opts, false)
    }

    fn start(t: &TestDir, opts: ClientOpts, give_sync_dir: bool) -> Client {
        let cwd = opts.cwd.clone().unwrap_or_else(|| t.join(format!("{}-cwd", opts.name)));
        let sync_dir = match (&opts.sync_dir, give_sync_dir) {
            (Some(d), _) => d.clone(),
            (None, true) => t.join(format!("{}-sync", opts.name)),
            (None, false) => cwd.join(format!("sync_dir_{}", opts.user)),
        };
        fs::create_dir_all(&cwd).unwrap_or_else(|e| panic!("cannot create {}: {e}", cwd.display()));
        let opts = ClientOpts { sync_dir: give_sync_dir.then(|| sync_dir.clone()), cwd: Some(cwd.clone()), ..opts };
        let mut cmd = Command::new(client_bin());
        cmd.arg(&opts.user).arg(opts.server.ip().to_string()).arg(opts.server.port().to_string());
        if give_sync_dir {
            cmd.arg("--sync-dir").arg(&sync_dir);
        }
        if let Some(name) = &opts.device_name {
            cmd.args(["--device-name", name]);
        }
        cmd.args(["--bind", &opts.bind.to_string()])
            .current_dir(&cwd)
            .env(replibox_client::engine::RESCAN_ENV, opts.rescan.as_millis().to_string())
            .env_remove(replibox_client::password::ENV)
            .env("RUST_LOG", std::env::var("REPLIBOX_TEST_CLIENT_LOG").unwrap_or_else(|_| "info".into()))
            .env_remove("RUST_BACKTRACE");
        if opts.headless {
            cmd.arg("--headless");
        }
        if let Some(password) = &opts.password {
            cmd.env(replibox_client::password::ENV, password);
        }
        cmd.args(&opts.extra);
        let proc = Proc::spawn(t, &opts.name, cmd, !opts.headless);
        Client { opts, sync_dir, cwd, proc }
    }

    /// Starts it again with the same options (the previous run must have ended).
    pub fn restart(&mut self, t: &TestDir) {
        if self.proc.running() {
            fail(format!("{} is still running; stop it before restarting it", self.opts.name));
        }
        let again = Client::start(t, self.opts.clone(), self.opts.sync_dir.is_some());
        self.proc = again.proc;
        self.wait_logged_in();
    }

    /// Waits for the outcome line of the login's get_sync_dir on stdout.
    #[track_caller]
    pub fn wait_logged_in(&self) {
        let name = &self.opts.name;
        let pid = self.proc.pid();
        wait_until(DEADLINE, &format!("{name} to log in and finish its first sync"), || {
            if self.proc.stdout().lines().any(|l| l.contains("in sync with the server")) {
                return true;
            }
            // try_status needs &mut; peek at /proc instead to notice an early exit.
            if !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid) {
                fail(format!("{name} ended before logging in"));
            }
            false
        });
    }

    /// A path inside its sync dir.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.sync_dir.join(rel)
    }

    /// The device name used in conflicted-copy names: its `--device-name`, or
    /// without one the host name up to its first dot.
    pub fn device_label(&self) -> String {
        match &self.opts.device_name {
            Some(name) => name.clone(),
            None => host_name(),
        }
    }

    /// The full device id, as the server logs it.
    pub fn device_id(&self) -> String {
        fs::read_to_string(self.sync_dir.join(".replibox/device"))
            .unwrap_or_else(|e| fail(format!("{} has no device id: {e}", self.opts.name)))
            .trim()
            .to_string()
    }

    /// Runs one command on an interactive client and returns its outcome: the new
    /// stdout (up to the `N files` line for the list commands, one line otherwise),
    /// or the new error line on stderr.
    #[track_caller]
    pub fn cmd(&mut self, line: &str) -> Outcome {
        let out_mark = self.proc.stdout().len();
        let err_mark = self.proc.stderr().len();
        self.proc.send_line(line);
        let is_list = line.trim_start().starts_with("list_");
        let what = format!("the outcome of {line:?} from {}", self.opts.name);
        let pid = self.proc.pid();
        wait_for(DEADLINE, &what, || {
            let out = self.proc.stdout();
            let new_out = &out[out_mark.min(out.len())..];
            let complete: Vec<&str> = match new_out.rfind('\n') {
                Some(i) => new_out[..i].lines().collect(),
                None => vec![],
            };
            if is_list {
                if let Some(end) = complete.iter().position(|l| is_count_line(l)) {
                    return Some(Ok(complete[..=end].join("\n")));
                }
            } else if let Some(first) = complete.first() {
                return Some(Ok(first.to_string()));
            }
            let err = self.proc.stderr();
            let new_err = &err[err_mark.min(err.len())..];
            let complete_err = new_err.rfind('\n').map_or("", |i| &new_err[..i]);
            if let Some(l) = complete_err.lines().find(|l| is_command_error(l)) {
                return Some(Err(l.to_string()));
            }
            if is_zombie(pid) || !Path::new(&format!("/proc/{pid}")).exists() {
                fail(format!("{} ended while running {line:?}", self.opts.name));
            }
            None
        })
    }

    /// Runs `status` and returns its lines (up to its last line, `device ...`).
    #[track_caller]
    pub fn status(&mut self) -> String {
        let out_mark = self.proc.stdout().len();
        self.proc.send_line("status");
        let what = format!("the outcome of status from {}", self.opts.name);
        wait_for(DEADLINE, &what, || {
            let out = self.proc.stdout();
            let new_out = &out[out_mark.min(out.len())..];
            let complete = &new_out[..new_out.rfind('\n').map_or(0, |i| i + 1)];
            let lines: Vec<&str> = complete.lines().collect();
            let end = lines.iter().position(|l| l.starts_with("device "))?;
            Some(lines[..=end].join("\n"))
        })
    }

    /// Runs a command that must succeed; returns its stdout.
    #[track_caller]
    pub fn ok(&mut self, line: &str) -> String {
        match self.cmd(line) {
            Ok(out) => out,
            Err(e) => fail(format!("{line:?} on {} failed: {e}", self.opts.name)),
        }
    }

    /// Runs a command that must fail; returns its error line.
    #[track_caller]
    pub fn err(&mut self, line: &str) -> String {
        match self.cmd(line) {
            Err(e) => e,
            Ok(out) => fail(format!("{line:?} on {} should have failed, printed: {out}", self.opts.name)),
        }
    }

    /// Stops a headless client with SIGINT (or an interactive one with `exit`) and
    /// waits for it to end; returns its exit status.
    #[track_caller]
    pub fn stop(&mut self) -> ExitStatus {
        if self.opts.headless {
            self.proc.signal("INT");
        } else {
            self.proc.send_line("exit");
        }
        self.proc.wait_exit(DEADLINE)
    }

    /// Background activity lines (stderr) so far.
    pub fn activity(&self) -> String {
        self.proc.stderr()
    }
}

/// Runs `cmd` to its exit, within [`DEADLINE`] (a bug that keeps it running
/// fails the test instead of hanging it): its status, stdout and stderr. The
/// output is kept in the test dir's logs under `name`.
pub fn run_bounded(t: &TestDir, name: &str, cmd: Command) -> (ExitStatus, String, String) {
    let mut p = Proc::spawn(t, name, cmd, false);
    let status = p.wait_exit(DEADLINE);
    (status, p.stdout(), p.stderr())
}

/// The password the harness gives `user`'s devices (and raw logins): every test
/// runs with passwords, and a user's first login creates the account with it.
pub fn password_of(user: &str) -> String {
    format!("{user}'s test password")
}

/// This machine's host name up to its first dot, as the kernel has it.
pub fn host_name() -> String {
    let name = fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_else(|e| fail(format!("cannot read /proc/sys/kernel/hostname: {e}")));
    name.trim().split('.').next().unwrap_or_default().to_string()
}

/// `N files`, or `N files, M empty folders` (singular for 1).
fn is_count_line(l: &str) -> bool {
    let (files, folders) = match l.split_once(", ") {
        Some((f, d)) => (f, Some(d)),
        None => (l, None),
    };
    let counted = |s: &str, one: &str, many: &str| {
        s.split_once(' ').is_some_and(|(n, what)| n.parse::<u64>().is_ok() && (what == one || what == many))
    };
    counted(files, "file", "files") && folders.is_none_or(|d| counted(d, "empty folder", "empty folders"))
}

/// Lines the client prints on stderr for a failed command (not background
/// activity, not log records).
fn is_command_error(l: &str) -> bool {
    l.starts_with("error: ")
}

/// True when every thread of process `pid` is stopped (state `T` in
/// `/proc/PID/task/TID/stat`).
fn all_stopped(pid: u32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks.flatten().all(|t| {
        fs::read_to_string(t.path().join("stat"))
            .map(|s| s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('T')))
            .unwrap_or(true)
    })
}

fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(true)
}

/// A server and two headless devices of `user` on 127.0.0.4 and 127.0.0.5.
pub fn server_and_two_devices(t: &TestDir, user: &str) -> (Server, Client, Client) {
    let server = Server::primary(t);
    let d1 = Client::headless(t, "dev1", user, &server, DEVICE1_IP);
    let d2 = Client::headless(t, "dev2", user, &server, DEVICE2_IP);
    (server, d1, d2)
}
