//! Cases 1 and 2: the outage a user sees when the primary goes, from the moment it
//! goes to the first change acknowledged after it, while device 1 makes a change
//! every 10 ms. Case 1 kills the primary's process (its sockets close at once);
//! case 2 cuts its host off in the lab (nothing closes: the backups notice only
//! through the heartbeat timeout, and device 1's connection just goes quiet).

use super::Ctx;
use crate::cluster::{self, upload_small, Cluster, Credentials, Device, FrontDevice, Host};
use crate::lab::Lab;
use crate::report::{median, min_max, ms, show_ms, Row, Stands};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What one trial measured.
struct Trial {
    /// From the cut to the first change acknowledged after it.
    outage: Duration,
    /// From the cut to a remaining server reporting itself primary.
    elected: Option<Duration>,
    /// Acknowledged changes not found on the new primary (must be 0).
    lost: usize,
}

/// How the primary is taken away.
enum Cut<'a> {
    Kill,
    Host(&'a Lab),
}

fn trial(root: &Path, servers: &[Host], devices: [Host; 2], creds: &Credentials, cut: &Cut) -> Result<Trial, String> {
    let _ = std::fs::remove_dir_all(root);
    let port = if servers[0].netns.is_some() { 7400 } else { cluster::free_port(servers)? };
    let mut c = Cluster::start(root, servers, port, creds)?;
    let dev2 = Device::start(root, "dev2", "alice", c.primary(), &devices[1], creds)?;
    let d1 = FrontDevice::connect(creds, "alice", "00000000000000d1", c.primary(), devices[0].ip)?;
    let front = d1.front.clone();

    // Each acknowledged change with when, and the epoch of the primary the front-end
    // was with right after: an answer from the old primary that was on its way at
    // the cut must not count as the first one after it.
    let acked: Arc<Mutex<Vec<(String, Instant, u64)>>> = Arc::new(Mutex::new(Vec::new()));
    let failed: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let stop = Arc::new(AtomicBool::new(false));
    let (a, f, s, fr) = (acked.clone(), failed.clone(), stop.clone(), front.clone());
    let writer = std::thread::spawn(move || {
        let mut n = 0u32;
        while !s.load(Ordering::Relaxed) {
            n += 1;
            let name = format!("tick-{n:05}.txt");
            match upload_small(&fr, &name, format!("change {n}\n").as_bytes()) {
                Ok(()) => {
                    let at = Instant::now();
                    a.lock().unwrap_or_else(|p| p.into_inner()).push((name, at, fr.epoch()));
                }
                Err(e) => {
                    *f.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let before = front.epoch();
    let t0 = Instant::now();
    match cut {
        Cut::Kill => c.kill(0),
        Cut::Host(lab) => lab.cut(0)?,
    }
    let others = &c.addrs[1..];
    let mut elected = None;
    let first = crate::sys::wait_for(
        "the first change acknowledged after the primary went",
        Duration::from_secs(60),
        Duration::from_millis(2),
        || {
            if elected.is_none() && others.iter().any(|a| cluster::status(a).is_some_and(|s| s["role"] == "primary")) {
                elected = Some(t0.elapsed());
            }
            if failed.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
                return Some(None);
            }
            let acked = acked.lock().unwrap_or_else(|p| p.into_inner());
            acked.iter().find(|(_, t, epoch)| *t > t0 && *epoch > before).map(|(_, t, _)| Some(*t))
        },
    );
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let _ = writer.join();
    if let Some(e) = failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(format!("device 1's change failed: {e}"));
    }
    let first = first?.ok_or("device 1's writer stopped")?;
    // Every acknowledged change must be on the server that serves now.
    let newp = (1..c.addrs.len())
        .find(|i| cluster::status(&c.addrs[*i]).is_some_and(|s| s["role"] == "primary"))
        .ok_or("no server reports itself primary after the failover")?;
    let dir = c.user_dir(newp, "alice");
    let lost =
        acked.lock().unwrap_or_else(|p| p.into_inner()).iter().filter(|(n, _, _)| !dir.join(n).is_file()).count();
    front.logout();
    dev2.stop();
    c.servers.clear();
    // The trial's files stay until the run ends (the run's directory goes then):
    // on a file system without a journal, ext4 checks every inode freed within
    // the last minute each time it makes a file, and thousands deleted here
    // would slow case 4's bursts that follow.
    Ok(Trial { outage: first - t0, elected, lost })
}

fn summarize(case: u8, what: &str, target_ms: f64, baseline: (&str, f64), trials: &[Trial]) -> Row {
    let outages: Vec<f64> = trials.iter().map(|t| ms(t.outage)).collect();
    let elected: Vec<f64> = trials.iter().filter_map(|t| t.elected.map(ms)).collect();
    let lost: usize = trials.iter().map(|t| t.lost).sum();
    let med = median(&outages);
    let (lo, hi) = min_max(&outages);
    let mut figure = format!(
        "median {} (min {}, max {}; {} trials); a new primary reported after {} (median)",
        show_ms(med),
        show_ms(lo),
        show_ms(hi),
        trials.len(),
        show_ms(median(&elected))
    );
    if lost > 0 {
        figure.push_str(&format!("; {lost} ACKNOWLEDGED CHANGES LOST"));
    }
    Row {
        case,
        what: what.into(),
        figure,
        baseline: format!("{}: {} (cited, not measured here)", baseline.0, show_ms(baseline.1)),
        ratio: Some(med / baseline.1),
        target: format!("median < {}", show_ms(target_ms)),
        stands: Stands::from(med < target_ms),
    }
}

const HOW: &str = "three servers and two devices of one user; device 1 is the client's own front-end in-process, \
uploading a small new file every 10 ms and noting when each is acknowledged; device 2 is a replibox-client. \
300 ms after the start the primary goes; the outage is from then to the first change acknowledged after it \
by the new primary (an answer of the old one still on its way does not count). \
A fresh cluster per trial. Every acknowledged change is then looked for on the new primary.";

/// Case 1: the primary's process is SIGKILLed.
pub fn process_death(ctx: &Ctx) -> (Row, String) {
    let what = "failover outage, process death";
    let servers: Vec<Host> = (1..=3).map(Host::loopback).collect();
    let devices = [Host::loopback(4), Host::loopback(5)];
    let mut trials = Vec::new();
    for t in 1..=ctx.plan.failover_trials {
        match trial(
            &ctx.dir.join("failover").join(format!("trial-{t}")),
            &servers,
            devices.clone(),
            &ctx.creds,
            &Cut::Kill,
        ) {
            Ok(tr) => {
                ctx.say(&format!("case 1 trial {t}: outage {}", show_ms(ms(tr.outage))));
                trials.push(tr);
            }
            Err(e) => {
                return (Row::not_measured(1, what, "median < 100 ms", &format!("trial {t} failed: {e}")), HOW.into())
            }
        }
    }
    let how = format!("{HOW} Servers on 127.0.0.1-3, devices on 127.0.0.4-5; kill -9.");
    (summarize(1, what, 100.0, ("etcd 3.4, tuned 50/250 ms", 360.0), &trials), how)
}

/// Case 2: the primary's host is cut off (root only).
pub fn host_loss(ctx: &Ctx) -> (Row, String) {
    let what = "failover outage, host loss";
    let target = "median < 600 ms";
    let how = format!(
        "{HOW} Servers in network namespaces {p}s1-3 (10.212.12.1-3 on the bridge {p}br), devices in the \
         harness's namespace at 10.212.12.254 and .253; the primary's veth is set down (no FIN, no reset), so the \
         backups learn of it only through the failure timeout.",
        p = crate::lab::PREFIX
    );
    if let Some(why) = Lab::unavailable() {
        ctx.say(&format!("case 2 skipped: {why}"));
        return (Row::not_measured(2, what, target, &why), how);
    }
    let lab = match Lab::create(3) {
        Ok(l) => l,
        Err(e) => return (Row::not_measured(2, what, target, &format!("cannot set up the lab: {e}")), how),
    };
    let servers = lab.server_hosts();
    let devices = [lab.device_host(1), lab.device_host(2)];
    let mut trials = Vec::new();
    for t in 1..=ctx.plan.failover_trials {
        let r = trial(
            &ctx.dir.join("hostloss").join(format!("trial-{t}")),
            &servers,
            devices.clone(),
            &ctx.creds,
            &Cut::Host(&lab),
        );
        if let Err(e) = lab.heal() {
            return (Row::not_measured(2, what, target, &e), how);
        }
        match r {
            Ok(tr) => {
                ctx.say(&format!("case 2 trial {t}: outage {}", show_ms(ms(tr.outage))));
                trials.push(tr);
            }
            Err(e) => return (Row::not_measured(2, what, target, &format!("trial {t} failed: {e}")), how),
        }
    }
    drop(lab);
    (summarize(2, what, 600.0, ("etcd 3.4, default timeouts", 1100.0), &trials), how)
}
