//! Two failovers in a row, then both dead servers back: device 1 makes a change
//! every 10 ms; the primary is killed (SIGKILL) and a backup takes over; then the
//! new primary is killed too, and the last server serves alone; then both dead
//! servers are started again with `-b` and catch up. Prints a timeline with the
//! outage a user sees at each kill and how long the two took to rejoin, then
//! checks that every acknowledged change is on all three servers and on device 2.
//! Exits non-zero on any loss.
//!
//! ```text
//! cargo run --release --example cascade [-- --runs N]
//! ```
//!
//! Talks only to 127.0.0.1-127.0.0.5.

#[path = "scenario/mod.rs"]
mod scenario;

use scenario::{check_everywhere, Cluster, Measured, Timeline};
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

fn run(root: &Path, tl: &Timeline) -> Result<Measured, String> {
    let (mut cluster, device1, device2) = Cluster::on_loopback_with_devices(root, tl)?;
    let writer = device1.start_writer();
    writer.wait_more(20)?;

    // First failover.
    let killed1 = Instant::now();
    cluster.kill(1);
    tl.say(format!("killed the primary, server 1 (SIGKILL), after {} acknowledged changes", writer.count()));
    let (p, e2) = cluster.wait_primary(&[2, 3], 1)?;
    tl.say(format!("server {p} reports itself primary of epoch {e2}"));
    let (first, outage1) = writer.first_after(killed1)?;
    if let Some(line) = device1.resumed_since(killed1) {
        tl.say(line);
    }
    tl.say(format!("first change acknowledged after the first kill: {first}, {} ms after it", outage1.as_millis()));
    writer.wait_more(20)?;

    // Second failover: the new primary dies; the last server is alone.
    let last = if p == 2 { 3 } else { 2 };
    let killed2 = Instant::now();
    cluster.kill(p);
    tl.say(format!("killed the new primary, server {p} (SIGKILL), after {} acknowledged changes", writer.count()));
    let (_, e3) = cluster.wait_primary(&[last], e2)?;
    tl.say(format!("server {last}, the last one, reports itself primary of epoch {e3}"));
    let (first, outage2) = writer.first_after(killed2)?;
    if let Some(line) = device1.resumed_since(killed2) {
        tl.say(line);
    }
    tl.say(format!("first change acknowledged after the second kill: {first}, {} ms after it", outage2.as_millis()));
    writer.wait_more(20)?;

    // Both come back as backups, through the last server.
    let restarted = Instant::now();
    cluster.restart_as_backup(1, last)?;
    cluster.restart_as_backup(p, last)?;
    tl.say(format!("started servers 1 and {p} again with -b {} on their data dirs", cluster.net.addr(last)));
    cluster.wait_members(&[1, 2, 3])?;
    let rejoin = restarted.elapsed();
    tl.say(format!(
        "all three report members [1, 2, 3] at one seq, {} ms after the restarts; writes never stopped",
        rejoin.as_millis()
    ));
    writer.wait_more(20)?;
    let acked = writer.stop()?;
    tl.say(format!("stopped after {} acknowledged changes; checking every copy", acked.len()));
    let servers: Vec<(u8, String)> = (1..=3u8)
        .map(|i| (i, if i == last { format!("server {i} (primary)") } else { format!("server {i} (restarted)") }))
        .collect();
    check_everywhere(&cluster, &acked, &servers, &device2, tl)?;
    device1.front.logout();
    Ok(vec![
        ("outage at the first kill".into(), outage1),
        ("outage at the second kill".into(), outage2),
        ("both restarted servers caught up".into(), rejoin),
    ])
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let Some(runs) = scenario::runs_arg("cascade", &args) else { return ExitCode::from(2) };
    scenario::main_loop("cascade", runs, run)
}
