//! Benchmark: a large upload to a lone server vs. the same upload to a primary with
//! two backups, measured in the same run, alternating so that disk and CPU
//! conditions affect both alike. Prints the medians and their ratio.
//!
//! Run with `make bench` (or `cargo run --release -p replibox-frontend --example
//! bench_replication -- [SIZE_MIB] [ROUNDS]`); it needs the release build of
//! `replibox-server` beside it. Talks only to 127.0.0.1-127.0.0.4 and stops by itself.

use replibox_frontend::{Config, Frontend, SharedPassword};
use replibox_proto::{DeviceId, OpResult};
use std::fs::File;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

fn server_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("replibox-server");
    assert!(bin.exists(), "{} is missing: run `cargo build --release --workspace` first", bin.display());
    bin
}

fn status_seq(addr: &str) -> Option<(u64, usize)> {
    let out = Command::new(server_bin()).args(["--status", addr]).output().ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some((v["seq"].as_u64()?, v["members"].as_array()?.len()))
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts a cluster of `servers` (1 = lone primary) and returns its processes and
/// the primary's address.
fn cluster(root: &Path, servers: u8) -> (Vec<Proc>, String) {
    let port = free_port();
    let primary = format!("127.0.0.1:{port}");
    let mut procs = Vec::new();
    for i in 1..=servers {
        let data = root.join(format!("s{i}"));
        let ip = format!("127.0.0.{i}");
        let mut cmd = Command::new(server_bin());
        if i == 1 {
            cmd.args(["-p", "--id", "1"]);
        } else {
            // The primary created the cluster key in its data dir when it started.
            cmd.args(["-b", &primary, "--id", &i.to_string(), "--key-file"]).arg(root.join("s1").join("cluster.key"));
        }
        cmd.args(["--bind", &ip, "--port", &port.to_string(), "--data"]).arg(&data);
        cmd.env("RUST_LOG", "warn").stdout(Stdio::null()).stderr(Stdio::null());
        procs.push(Proc(cmd.spawn().expect("start server")));
        if i == 1 {
            wait_for("the primary", || status_seq(&primary).is_some());
        }
    }
    wait_for("every backup to join", || status_seq(&primary).is_some_and(|(_, m)| m == servers as usize));
    (procs, primary)
}

fn upload_once(primary: &str, file: &Path, size: u64) -> Duration {
    let cfg = Config {
        user: "bench".into(),
        device: DeviceId("0123456789abcdef".into()),
        server: primary.into(),
        bind: Some("127.0.0.4".parse().expect("ip")),
        callback_port: 9,
        failover_wait: Duration::from_secs(30),
        // The first login of a fresh cluster creates the account; the login's key
        // derivation is done before the timed upload starts.
        password: SharedPassword::new("bench password"),
        create_account: true,
    };
    let (front, _events, _login) = Frontend::connect(cfg).expect("login");
    let mut f = File::open(file).expect("open sample");
    let started = Instant::now();
    let result = front.upload("big.bin", &mut f, size, 0, None, false, &mut |_| {}).expect("upload");
    let took = started.elapsed();
    assert!(matches!(result, OpResult::Done { .. }), "upload answered {result:?}");
    front.logout();
    took
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(256);
    let rounds: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let root = std::env::temp_dir().join(format!("replibox-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).expect("bench dir");
    let sample = root.join("sample.bin");
    {
        let mut f = File::create(&sample).expect("sample");
        let mut x: u64 = 0x1234_5678;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..mib {
            for b in buf.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
            }
            f.write_all(&buf).expect("write sample");
        }
    }
    let size = mib << 20;
    let (mut lone, mut replicated) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for servers in [1u8, 3] {
            let dir = root.join(format!("r{round}-{servers}"));
            let (procs, primary) = cluster(&dir, servers);
            let took = upload_once(&primary, &sample, size);
            eprintln!("round {round}: {servers} server(s): {} MiB in {:.3} s", mib, took.as_secs_f64());
            if servers == 1 {
                lone.push(took)
            } else {
                replicated.push(took)
            }
            drop(procs);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    let (l, r) = (median(&mut lone), median(&mut replicated));
    let rate = |d: Duration| mib as f64 / d.as_secs_f64();
    println!("upload of {mib} MiB, median of {rounds} rounds:");
    println!("  lone server:              {:.3} s ({:.0} MiB/s)", l.as_secs_f64(), rate(l));
    println!("  primary + two backups:    {:.3} s ({:.0} MiB/s)", r.as_secs_f64(), rate(r));
    println!("  ratio replicated / lone:  {:.2}", r.as_secs_f64() / l.as_secs_f64());
    let _ = std::fs::remove_dir_all(&root);
}
