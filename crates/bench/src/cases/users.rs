//! Case 7: many users at once. Every user has two devices, each the client's own
//! front-end in-process (two hundred client processes would measure the machine's
//! scheduler more than the server); every device uploads a small file once a
//! second, on a schedule spread over the second, for the whole period.

use super::Ctx;
use crate::cluster::{self, upload_small, Cluster, FrontDevice, Host};
use crate::report::{median, ms, percentile, show_mib, show_ms, Row, Stands};
use crate::sys::proc_stat;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Every device's results.
#[derive(Default)]
struct Tally {
    latencies: Vec<f64>,
    errors: Vec<String>,
}

fn measure(ctx: &Ctx) -> Result<(Tally, Duration, u64, u64, u64, usize), String> {
    let root = ctx.dir.join("users");
    let _ = std::fs::remove_dir_all(&root);
    let hosts: Vec<Host> = (1..=3).map(Host::loopback).collect();
    let port = cluster::free_port(&hosts)?;
    let c = Cluster::start(&root, &hosts, port, &ctx.creds)?;
    let users = ctx.plan.users;
    let mut devices = Vec::with_capacity(users * 2);
    for u in 0..users {
        for d in 0..2 {
            // Devices spread over 127.0.1.0/24 so that no one address holds them all.
            let bind = IpAddr::V4(Ipv4Addr::new(127, 0, 1, ((2 * u + d) % 250 + 1) as u8));
            let id = format!("{:08x}{:08x}", u, d);
            devices.push((u, d, FrontDevice::connect(&ctx.creds, &format!("user{u:03}"), &id, c.primary(), bind)?));
        }
    }
    ctx.say(&format!("case 7: {} devices of {users} users logged in", devices.len()));
    let period = Duration::from_secs(ctx.plan.users_secs);
    let tally = Arc::new(Mutex::new(Tally::default()));
    let n = devices.len();
    let start = Instant::now() + Duration::from_millis(200);
    let mut threads = Vec::new();
    for (k, (u, d, dev)) in devices.iter().enumerate() {
        let (front, tally) = (dev.front.clone(), tally.clone());
        let name = format!("u{u:03}-d{d}");
        // Device k's changes fall at k/n of each second.
        let offset = Duration::from_secs(1).mul_f64(k as f64 / n as f64);
        threads.push(std::thread::spawn(move || {
            let mut i = 0u32;
            loop {
                let at = start + offset + Duration::from_secs(i as u64);
                if at >= start + period {
                    return;
                }
                let now = Instant::now();
                if at > now {
                    std::thread::sleep(at - now);
                }
                let t0 = Instant::now();
                let r =
                    upload_small(&front, &format!("{name}-{i:03}.txt"), format!("change {i} of {name}\n").as_bytes());
                let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                match r {
                    Ok(()) => t.latencies.push(ms(t0.elapsed())),
                    Err(e) => t.errors.push(e),
                }
                i += 1;
            }
        }));
    }
    // Sample the primary while it runs.
    let pid = c.pid(0).ok_or("the primary is not running")?;
    let (mut threads_max, mut rss_max) = (0, 0);
    while threads.iter().any(|t| !t.is_finished()) {
        if let Some(s) = proc_stat(pid) {
            threads_max = threads_max.max(s.threads);
            rss_max = rss_max.max(s.rss_kib);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let took = start.elapsed();
    for t in threads {
        let _ = t.join();
    }
    let hwm = proc_stat(pid).map(|s| s.hwm_kib).unwrap_or(0);
    for (_, _, dev) in &devices {
        dev.front.logout();
    }
    drop(c);
    let _ = std::fs::remove_dir_all(&root);
    let tally = std::mem::take(&mut *tally.lock().unwrap_or_else(|p| p.into_inner()));
    Ok((tally, took, threads_max, rss_max, hwm, n))
}

/// Runs case 7.
pub fn run(ctx: &Ctx) -> (Row, String) {
    let (users, secs) = (ctx.plan.users, ctx.plan.users_secs);
    let how = format!(
        "one cluster on 127.0.0.1-3; {users} users with two devices each, every device the client's front-end \
         in-process (from 127.0.1.x), all logged in before the clock starts; each device uploads a new small file \
         once a second for {secs} s, the devices' turns spread evenly over each second; latency is from the upload \
         call to its acknowledgement. The primary's threads and RSS sampled every 250 ms (/proc/PID/status)."
    );
    let target = "no error, p95 < 100 ms";
    let what = format!("{users} users x 2 devices, a change per device per second");
    match measure(ctx) {
        Ok((tally, took, threads, rss, hwm, devices)) => {
            let p95 = percentile(&tally.latencies, 95.0);
            let rate = tally.latencies.len() as f64 / took.as_secs_f64();
            let mut figure = format!(
                "{rate:.0} changes/s acknowledged ({} by {devices} devices), median {}, p95 {}, {} errors; \
                 primary: {threads} threads, RSS {} (peak {})",
                tally.latencies.len(),
                show_ms(median(&tally.latencies)),
                show_ms(p95),
                tally.errors.len(),
                show_mib(rss),
                show_mib(hwm)
            );
            if let Some(e) = tally.errors.first() {
                figure.push_str(&format!("; first error: {e}"));
            }
            let offered = devices as f64;
            (
                Row {
                    case: 7,
                    what,
                    figure,
                    baseline: format!("offered: {offered:.0} changes/s"),
                    ratio: Some(rate / offered),
                    target: target.into(),
                    stands: Stands::from(tally.errors.is_empty() && p95 < 100.0),
                },
                how,
            )
        }
        Err(e) => (Row::not_measured(7, &what, target, &e), how),
    }
}
