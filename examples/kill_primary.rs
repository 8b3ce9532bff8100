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
    let killed = Instant::now();
    cluster.kill(1);
    tl.say(format!("killed the primary (SIGKILL) after {} changes were acknowledged", writer.count()));
    let (p, epoch) = cluster.wait_primary(&[2, 3], 1)?;
    tl.say(format!("server {p} reports itself primary of epoch {epoch}"));
    let (first, outage) = writer.first_after(killed)?;
    if let Some(line) = device1.resumed_since(killed) {
        tl.say(line);
    }
    tl.say(format!(
        "first change acknowledged after the kill: {first} — the outage a user sees: {} ms",
        outage.as_millis()
    ));
    writer.wait_more(20)?;
    let acked = writer.stop()?;
    tl.say(format!("stopped after {} acknowledged changes; checking every copy", acked.len()));

    let other = if p == 2 { 3 } else { 2 };
    let servers = [(p, format!("server {p} (primary)")), (other, format!("server {other} (backup)"))];
    check_everywhere(&cluster, &acked, &servers, &device2, tl)?;
    device1.front.logout();
    Ok(vec![("outage when the primary process dies".into(), outage)])
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let Some(runs) = scenario::runs_arg("kill_primary", &args) else { return ExitCode::from(2) };
    scenario::main_loop("kill_primary", runs, run)
}
