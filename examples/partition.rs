//! The primary cut off from its backups, on five hosts of their own (network
//! namespaces, as `make lab` makes them): device 1 makes a change every 10 ms;
//! then server 1, the primary, stops hearing servers 2 and 3 (and they it), while
//! both devices still reach every server. Nothing is closed: no FIN, no RST. The
//! backups notice the silence after `--failure-timeout-ms`, elect a new primary,
//! which calls both devices back. The cut-off primary, meanwhile, waits for its
//! silent backups, then drops them and would go on alone: it has no client left
//! to acknowledge anything to. Then the network heals: the new primary's repeated
//! announcement reaches the old one, which steps down, rejoins as a backup and
//! catches up. Prints a timeline, then checks that every acknowledged change is on
//! all three servers and on device 2. Exits non-zero on any loss.
//!
//! With `--host-down`, server 1's whole host is cut off instead (its link goes
//! down, as `make lab-crash s1` does): the same, but nothing reaches it at all.
//! `--runs N` prints the outage's min/median/max over N runs (docs/benchmarks.md).
//!
//! ```text
//! cargo run --release --example partition [-- --host-down] [-- --runs N]
//! ```
//!
//! Needs root (network namespaces) and iproute2; anywhere else it says so and
//! exits 0 without running. The namespaces are `rblabx-PID-*` with the addresses
//! 10.213.0.0/24 inside them only (`scripts/lab.sh net-up`), and are removed at
//! the end, also after a failure or Ctrl-C. Device 1, the in-process front-end,
//! needs to be on host c1: the example runs itself again inside that namespace.

#[path = "scenario/mod.rs"]
mod scenario;

use scenario::{check_everywhere, wait_for, Cluster, Device1, Device2, Measured, Net, Timeline, SOON};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

const NET: &str = "10.213.0";

fn lab_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/lab.sh")
}

/// `scripts/lab.sh ARGS` on the namespaces of `prefix`.
fn lab(prefix: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(lab_script())
        .args(args)
        .env("LAB_PREFIX", prefix)
        .env("LAB_NET", NET)
        .output()
        .map_err(|e| format!("cannot run scripts/lab.sh: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("scripts/lab.sh {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Why this machine cannot run the example, if it cannot.
fn cannot_run() -> Option<String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Uid:").map(|r| r.split_whitespace().next() == Some("0"))));
    if uid != Some(true) {
        return Some("it needs root to create network namespaces (run it with sudo)".into());
    }
    // Creating one is the only real test: a container may run root without
    // the right to make namespaces.
    let probe = format!("rblabp-{}", std::process::id());
    match Command::new("ip").args(["netns", "add", &probe]).output() {
        Err(e) => return Some(format!("cannot run `ip` (iproute2): {e}")),
        Ok(o) if !o.status.success() => {
            let why = String::from_utf8_lossy(&o.stderr).trim().to_string();
            return Some(format!("this machine does not let root create network namespaces ({why})"));
        }
        Ok(_) => {
            let _ = Command::new("ip").args(["netns", "del", &probe]).output();
        }
    }
    None
}

fn members(cluster: &Cluster, i: u8) -> Option<Vec<u64>> {
    let s = cluster.net.status(i)?;
    let mut ids: Vec<u64> = s["members"].as_array()?.iter().filter_map(|m| m["id"].as_u64()).collect();
    ids.sort();
    Some(ids)
}

/// One run, inside host c1.
fn run(prefix: &str, host_down: bool, root: &Path, tl: &Timeline) -> Result<Measured, String> {
    let net = Net::Lab { prefix: prefix.to_string(), net: NET.to_string() };
    let cluster = Cluster::start(net.clone(), root)?;
    tl.say(format!("three servers up, each on its own host: s1 {NET}.1 (primary), s2 {NET}.2, s3 {NET}.3"));
    let device2 = Device2::start(&net, root)?;
    let device1 = Device1::login(&net)?;
    tl.say(format!("device 1 (host c1, {NET}.4, in-process) and device 2 (host c2, {NET}.5) logged in"));
    let writer = device1.start_writer();
    writer.wait_more(20)?;

    // The clock starts once the cut is in place (`ip` has returned): acks that
    // were already on their way before it do not count as service after it.
    let before = Instant::now();
    let cut_with = |args: &[&str]| lab(prefix, args).map(|()| Instant::now());
    let cut;
    if host_down {
        cut = cut_with(&["crash", "s1"])?;
        tl.say(format!("(cutting took {} ms)", (cut - before).as_millis()));
        tl.say(format!("s1's link is down (no FIN): nothing reaches it ({} acknowledged so far)", writer.count()));
    } else {
        cut = cut_with(&["cut", "s1", "s2", "s3"])?;
        tl.say(format!("(cutting took {} ms)", (cut - before).as_millis()));
        tl.say(format!(
            "s1 and the backups no longer hear each other (no FIN); both devices reach every server ({} acknowledged so far)",
            writer.count()
        ));
    }
    let (p, epoch) = cluster.wait_primary(&[2, 3], 1)?;
    tl.say(format!("s{p} reports itself primary of epoch {epoch}"));
    let (first, outage) = writer.first_after(cut)?;
    if let Some(line) = device1.resumed_since(cut) {
        tl.say(line);
    }
    tl.say(format!(
        "first change acknowledged after the cut: {first} — the outage a user sees: {} ms",
        outage.as_millis()
    ));
    if !host_down {
        if let Some((role, e)) = cluster.role(1) {
            tl.say(format!("s1 still answers the devices' side as {role} of epoch {e}: it has heard of no election"));
        }
        // Its backups are silent: after --ack-timeout-ms and the fence timeout it
        // drops them and runs alone (it logs that what it acknowledges from now
        // on could be lost); no client is left to acknowledge anything to.
        wait_for("s1 to drop its silent backups", SOON, || (members(&cluster, 1)? == [1]).then_some(()))?;
        tl.say(format!(
            "s1 dropped its silent backups after {} ms: it runs alone, with no client",
            cut.elapsed().as_millis()
        ));
    }
    writer.wait_more(20)?;

    let healed = Instant::now();
    lab(prefix, &["heal", "s1"])?;
    tl.say("the network is whole again");
    wait_for("s1 to step down", SOON, || {
        let (role, e) = cluster.role(1)?;
        (role == "backup" && e >= epoch).then_some(())
    })?;
    let step_down = healed.elapsed();
    tl.say(format!("s1 heard of epoch {epoch} and stepped down, {} ms after the heal", step_down.as_millis()));
    cluster.wait_members(&[1, 2, 3])?;
    tl.say(format!("s1 caught up: members [1, 2, 3] at one seq, {} ms after the heal", healed.elapsed().as_millis()));
    writer.wait_more(20)?;
    let acked = writer.stop()?;
    tl.say(format!("stopped after {} acknowledged changes; checking every copy", acked.len()));
    let servers: Vec<(u8, String)> = (1..=3u8)
        .map(|i| {
            let what = match i {
                1 => "s1 (the old primary)".to_string(),
                _ if i == p => format!("s{i} (primary)"),
                _ => format!("s{i} (backup)"),
            };
            (i, what)
        })
        .collect();
    check_everywhere(&cluster, &acked, &servers, &device2, tl)?;
    device1.front.logout();
    let what = if host_down {
        "outage when the primary's host is cut off"
    } else {
        "outage when the primary is cut off from its backups"
    };
    Ok(vec![(what.into(), outage), ("old primary stepped down after the heal".into(), step_down)])
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let host_down = args.iter().any(|a| a == "--host-down");
    let Some(runs) = scenario::runs_arg("partition", &args) else { return ExitCode::from(2) };
    // Inside host c1: `--inside PREFIX`.
    if let Some(i) = args.iter().position(|a| a == "--inside") {
        let Some(prefix) = args.get(i + 1).cloned() else { return ExitCode::from(2) };
        return scenario::main_loop("partition", runs, |root, tl| run(&prefix, host_down, root, tl));
    }
    if let Some(why) = cannot_run() {
        println!("partition: SKIPPED, not run: {why}. The same scenario runs by hand in `make lab`: make lab-cut s1 s2 s3, then make lab-heal s1.");
        return ExitCode::SUCCESS;
    }
    let prefix = format!("rblabx-{}", std::process::id());
    if let Err(e) = lab(&prefix, &["net-up"]) {
        eprintln!("partition: cannot create the lab network: {e}");
        return ExitCode::FAILURE;
    }
    // Ctrl-C: the child dies with it; the namespaces must go too.
    let p = prefix.clone();
    let _ = ctrlc::set_handler(move || {
        let _ = lab(&p, &["net-down"]);
        std::process::exit(130);
    });
    let status = Command::new("ip")
        .args(["netns", "exec", &format!("{prefix}-c1")])
        .arg(std::env::current_exe().expect("own path"))
        .args(&args[1..])
        .args(["--inside", &prefix])
        .status();
    let down = lab(&prefix, &["net-down"]);
    if let Err(e) = down {
        eprintln!("partition: {e}; remove the namespaces {prefix}-* with: LAB_PREFIX={prefix} scripts/lab.sh net-down");
    }
    match status {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("partition: cannot run inside host c1: {e}");
            ExitCode::FAILURE
        }
    }
}
