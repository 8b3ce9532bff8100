//! Backups that fail: device 1 makes a change every 10 ms. First a backup is
//! killed (SIGKILL): its port refuses at once, so the primary knows it is down and
//! goes on without it; a user should see hardly a pause. Then the other backup
//! hangs (SIGSTOP): it holds its connections open and answers nothing, so the
//! primary waits for its acknowledgement for `--ack-timeout-ms`, asks it to
//! accept being dropped (a fence) until the fence timeout, and only then goes on
//! alone, the silent backup still a member (it may be alive and cut off); the
//! user sees that pause. Then the killed backup is started again with
//! `-b`, the hung one resumes (SIGCONT) and rejoins, and both catch up. Prints a
//! timeline with both pauses, then checks that every acknowledged change is on
//! all three servers and on device 2. Exits non-zero on any loss.
//!
//! ```text
//! cargo run --release --example backup_dies [-- --runs N]
//! ```
//!
//! Talks only to 127.0.0.1-127.0.0.5.

#[path = "scenario/mod.rs"]
mod scenario;

use scenario::{check_everywhere, wait_for, Cluster, Measured, Timeline, SOON};
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

fn run(root: &Path, tl: &Timeline) -> Result<Measured, String> {
    let (mut cluster, device1, device2) = Cluster::on_loopback_with_devices(root, tl)?;
    let writer = device1.start_writer();
    writer.wait_more(20)?;

    // A backup's process dies.
    let killed = Instant::now();
    cluster.kill(3);
    tl.say(format!("killed backup 3 (SIGKILL) after {} acknowledged changes", writer.count()));
    let (first, pause_kill) = writer.first_after(killed)?;
    tl.say(format!("first change acknowledged after it: {first}, {} ms after the kill", pause_kill.as_millis()));
    wait_for("the primary to report members [1, 2]", SOON, || (cluster.members(1)? == [1, 2]).then_some(()))?;
    tl.say("the primary dropped backup 3 (it refused connections: down) and committed its leave: members [1, 2]");
    writer.wait_more(20)?;

    // The other backup hangs.
    let stopped = Instant::now();
    cluster.signal(2, "STOP")?;
    tl.say(format!(
        "stopped backup 2 (SIGSTOP): it holds its sockets open and answers nothing ({} acknowledged so far)",
        writer.count()
    ));
    let (first, pause_hang) = writer.first_after(stopped)?;
    tl.say(format!(
        "first change acknowledged after it: {first}, {} ms later (--ack-timeout-ms 2000, then the fence timeout, 2000)",
        pause_hang.as_millis()
    ));
    // A backup that went silent stays a member (it may be alive and cut off, and
    // must not stand unseen): the primary goes on without waiting for it, and
    // its status says how few servers now hold each change.
    let note = wait_for("the primary to say it runs with 0 of its 2 backups", SOON, || {
        let note = cluster.net.status(1)?["note"].as_str()?.to_string();
        note.starts_with("running with 0 of the 2 backups").then_some(note)
    })?;
    tl.say(format!("the primary goes on alone, its hung backup still a member: \"{note}\""));
    writer.wait_more(20)?;

    // Both come back.
    let back = Instant::now();
    cluster.restart_as_backup(3, 1)?;
    cluster.signal(2, "CONT")?;
    tl.say("started backup 3 again with -b (same data dir), and let backup 2 run on (SIGCONT)");
    cluster.wait_members(&[1, 2, 3])?;
    let rejoin = back.elapsed();
    tl.say(format!("both caught up: members [1, 2, 3] at one seq, {} ms later", rejoin.as_millis()));
    writer.wait_more(20)?;
    let acked = writer.stop()?;
    tl.say(format!("stopped after {} acknowledged changes; checking every copy", acked.len()));
    let servers = [
        (1, "server 1 (primary)".to_string()),
        (2, "server 2 (hung, then rejoined)".to_string()),
        (3, "server 3 (killed, then rejoined)".to_string()),
    ];
    check_everywhere(&cluster, &acked, &servers, &device2, tl)?;
    device1.front.logout();
    Ok(vec![
        ("pause when a backup's process dies".into(), pause_kill),
        ("pause when a backup hangs".into(), pause_hang),
        ("both backups caught up".into(), rejoin),
    ])
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let Some(runs) = scenario::runs_arg("backup_dies", &args) else { return ExitCode::from(2) };
    scenario::main_loop("backup_dies", runs, run)
}
