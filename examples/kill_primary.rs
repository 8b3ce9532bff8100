//! The failover demo: three servers and two devices of one user on 127.0.0.1-5;
//! device 1 makes a change every 10 ms; the primary is killed with SIGKILL; the
//! backups elect a new primary, which calls the devices back. Prints a timeline
//! with the outage a user sees (from the kill to the first change acknowledged
//! after it), then checks that every acknowledged change is on both live servers
//! and on device 2. Exits non-zero if anything acknowledged is missing.
//!
//! ```text
//! cargo run --release --example kill_primary              # one narrated run
//! cargo run --release --example kill_primary -- --runs 10 # outage min/median/max
//! ```
//!
//! Device 1 is the client's own front-end, driven in-process so that each change's
//! acknowledgement can be timed; device 2 is a real `replibox-client`. The server
//! and client binaries are taken from beside this example (built first if they
//! are missing). Talks only to 127.0.0.1-127.0.0.5 and cleans up after itself.

use replibox_frontend::{Config, FrontEvent, Frontend};
use replibox_proto::{DeviceId, OpResult};
use std::io::Cursor;
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bin(name: &str) -> PathBuf {
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

fn free_port() -> u16 {
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

fn status(addr: &str) -> Option<serde_json::Value> {
    let out = Command::new(bin("replibox-server")).args(["--status", addr]).output().ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

fn wait_for<T>(what: &str, deadline: Duration, mut probe: impl FnMut() -> Option<T>) -> Result<T, String> {
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

/// What one run measured.
struct Run {
    outage: Duration,
    acknowledged: usize,
}

/// One run of the scenario, printing its timeline when `narrate`.
fn run(root: &Path, narrate: bool) -> Result<Run, String> {
    let _ = std::fs::remove_dir_all(root);
    std::fs::create_dir_all(root).map_err(|e| e.to_string())?;
    let port = free_port();
    let addr = |i: u8| format!("127.0.0.{i}:{port}");
    let t0 = Instant::now();
    let say = |line: String| {
        if narrate {
            println!("{:>7.1} ms  {line}", t0.elapsed().as_secs_f64() * 1000.0);
        }
    };
    let mut servers: Vec<Option<Proc>> = Vec::new();
    for i in 1..=3u8 {
        let mut cmd = Command::new(bin("replibox-server"));
        if i == 1 {
            cmd.args(["-p", "--id", "1"]);
        } else {
            cmd.args(["-b", &addr(1), "--id", &i.to_string()]);
        }
        cmd.args(["--bind", &format!("127.0.0.{i}"), "--port", &port.to_string(), "--data"])
            .arg(root.join(format!("s{i}")))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        servers.push(Some(Proc(cmd.spawn().map_err(|e| format!("cannot start server {i}: {e}"))?)));
        if i == 1 {
            wait_for("server 1 to serve", Duration::from_secs(30), || status(&addr(1)))?;
        }
    }
    wait_for("three members", Duration::from_secs(30), || {
        (1..=3)
            .all(|i| status(&addr(i)).is_some_and(|s| s["members"].as_array().is_some_and(|m| m.len() == 3)))
            .then_some(())
    })?;
    say(format!("three servers up: primary 127.0.0.1, backups 127.0.0.2 and .3 (port {port})"));

    let d2_dir = root.join("device2");
    let device2 = Proc(
        Command::new(bin("replibox-client"))
            .args(["alice", "127.0.0.1", &port.to_string(), "--bind", "127.0.0.5", "--headless", "--sync-dir"])
            .arg(&d2_dir)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start device 2: {e}"))?,
    );
    let cfg = Config {
        user: "alice".into(),
        device: DeviceId("00000000000000d1".into()),
        server: addr(1),
        bind: Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4))),
        callback_port: 0,
        failover_wait: Duration::from_secs(30),
    };
    let (front, events, _) = Frontend::connect(cfg).map_err(|e| format!("device 1 cannot log in: {e}"))?;
    say("device 1 (127.0.0.4, in-process front-end) and device 2 (127.0.0.5, replibox-client) logged in".into());
    let resumed: Arc<Mutex<Option<(Instant, String)>>> = Arc::new(Mutex::new(None));
    let r2 = resumed.clone();
    std::thread::spawn(move || {
        for ev in events {
            if let FrontEvent::Reconnected { server, epoch, after, callback } = ev {
                let how = if callback { "called back by the new primary" } else { "logged in again" };
                *r2.lock().unwrap_or_else(|p| p.into_inner()) = Some((
                    Instant::now(),
                    format!("device 1 {how} {server} (epoch {epoch}) after {} ms", after.as_millis()),
                ));
            }
        }
    });

    // Device 1 changes a file every 10 ms; each change is timed to its ack.
    let acked: Arc<Mutex<Vec<(String, Instant)>>> = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (a2, s2, f2) = (acked.clone(), stop.clone(), front.clone());
    let writer = std::thread::spawn(move || -> Result<(), String> {
        let mut n = 0u32;
        while !s2.load(Ordering::Relaxed) {
            n += 1;
            let name = format!("tick-{n:05}.txt");
            let body = format!("change {n}\n");
            let mut src = Cursor::new(body.as_bytes().to_vec());
            match f2.upload(&name, &mut src, body.len() as u64, 0, None, &mut |_| {}) {
                Ok(OpResult::Done { .. }) => a2.lock().unwrap_or_else(|p| p.into_inner()).push((name, Instant::now())),
                Ok(other) => return Err(format!("{name} was answered {other:?}")),
                Err(e) => return Err(format!("{name} failed: {e}")),
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    });
    std::thread::sleep(Duration::from_millis(300));
    let before = acked.lock().unwrap_or_else(|p| p.into_inner()).len();
    let killed = Instant::now();
    drop(servers[0].take());
    say(format!("killed the primary (SIGKILL) after {before} changes were acknowledged"));
    let newp = wait_for("a new primary", Duration::from_secs(30), || {
        (2..=3u8).find(|i| status(&addr(*i)).is_some_and(|s| s["role"] == "primary"))
    })?;
    let epoch = status(&addr(newp)).map(|s| s["epoch"].clone()).unwrap_or_default();
    say(format!("server {newp} reports itself primary of epoch {epoch}"));
    let first = wait_for("the first change acknowledged after the kill", Duration::from_secs(30), || {
        acked.lock().unwrap_or_else(|p| p.into_inner()).iter().find(|(_, t)| *t > killed).cloned()
    })?;
    let outage = first.1 - killed;
    if let Some((_, line)) = resumed.lock().unwrap_or_else(|p| p.into_inner()).clone() {
        say(line);
    }
    say(format!(
        "first change acknowledged after the kill: {} — the outage a user sees: {} ms",
        first.0,
        outage.as_millis()
    ));
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    writer.join().map_err(|_| "the writer panicked".to_string())??;
    let acked = acked.lock().unwrap_or_else(|p| p.into_inner()).clone();
    say(format!("stopped after {} acknowledged changes; checking every copy", acked.len()));

    // Every acknowledged change is on both live servers and on device 2.
    let other = if newp == 2 { 3 } else { 2 };
    let places = [
        (format!("server {newp} (primary)"), root.join(format!("s{newp}/users/alice"))),
        (format!("server {other} (backup)"), root.join(format!("s{other}/users/alice"))),
        ("device 2".to_string(), d2_dir.clone()),
    ];
    for (what, dir) in &places {
        let missing = |dir: &Path| acked.iter().filter(|(n, _)| !dir.join(n).is_file()).count();
        // The servers hold an acknowledged change at once; device 2 receives it.
        let deadline = if what.starts_with("device") { Duration::from_secs(30) } else { Duration::ZERO };
        wait_for(&format!("every acknowledged change on {what}"), deadline, || (missing(dir) == 0).then_some(()))
            .map_err(|_| format!("{} acknowledged changes are missing on {what}", missing(dir)))?;
        say(format!("{what} holds all {} acknowledged changes", acked.len()));
    }
    front.logout();
    drop(device2);
    drop(servers);
    let _ = TcpStream::connect(addr(newp));
    Ok(Run { outage, acknowledged: acked.len() })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let runs: usize = match args.iter().position(|a| a == "--runs") {
        Some(i) => match args.get(i + 1).and_then(|n| n.parse().ok()) {
            Some(n) if n > 0 => n,
            _ => {
                eprintln!("usage: kill_primary [--runs N]");
                return ExitCode::from(2);
            }
        },
        None => 1,
    };
    let root = std::env::temp_dir().join(format!("replibox-kill-primary-{}", std::process::id()));
    let mut outages = Vec::new();
    for r in 1..=runs {
        if runs > 1 {
            println!("run {r} of {runs}");
        }
        match run(&root.join(format!("run{r}")), runs == 1) {
            Ok(m) => {
                if runs > 1 {
                    println!(
                        "  outage {} ms, {} changes acknowledged, none lost",
                        m.outage.as_millis(),
                        m.acknowledged
                    );
                }
                outages.push(m.outage);
            }
            Err(e) => {
                eprintln!("kill_primary: FAILED in run {r}: {e}");
                eprintln!("(data kept in {})", root.display());
                return ExitCode::FAILURE;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&root);
    outages.sort();
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    println!(
        "outage when the primary process dies, over {} run{}: min {:.0} ms, median {:.0} ms, max {:.0} ms; nothing acknowledged was lost",
        outages.len(),
        if outages.len() == 1 { "" } else { "s" },
        ms(&outages[0]),
        ms(&outages[outages.len() / 2]),
        ms(&outages[outages.len() - 1])
    );
    ExitCode::SUCCESS
}
