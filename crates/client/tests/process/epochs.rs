//! Epochs and failure detection as they are today, written against what should
//! survive the election: every start with `-p` is a new epoch, a server never
//! takes a lower epoch's state over its own, and a backup cut off from its primary
//! for longer than `--failure-timeout-ms` ends up following a primary again with
//! the same data as everyone.

use crate::harness::cluster::*;
use crate::harness::files::{contents, holds, put, seeded};
use crate::harness::*;

/// The epoch a server reports.
fn epoch(s: &Server) -> Option<u64> {
    s.try_status()?["epoch"].as_u64()
}

/// Every start with `-p` takes the data dir's epoch + 1, and a backup that joins
/// takes the primary's.
#[test]
fn every_start_as_primary_is_a_new_epoch() {
    let t = TestDir::new("epochs_plus_one");
    let mut s1 = primary(&t, &[]);
    wait_until(DEADLINE, "s1 to report epoch 1", || epoch(&s1) == Some(1));
    for want in [2, 3] {
        s1.restart(&t);
        wait_until(DEADLINE, &format!("s1 to report epoch {want}"), || epoch(&s1) == Some(want));
    }
    let s2 = backup(&t, "s2", 2, s1.addr, Some(2), &[]);
    wait_members(&[&s1, &s2], &[1, 2]);
    assert_eq!(epoch(&s2), Some(3), "a backup takes its primary's epoch");
}

/// A backup whose data dir is of a later epoch than a primary it is pointed at does
/// not take that primary's state (which would replace its files with the stale
/// primary's): it keeps its files and its epoch.
///
/// May need revisiting with the election: today the backup refuses to follow (and
/// logs why); the contract that stays is that it loses nothing to the stale server.
#[test]
fn a_backup_never_takes_the_state_of_a_primary_of_a_lower_epoch() {
    let t = TestDir::new("epochs_lower_refused");
    let mut s1 = primary(&t, &[]);
    let mut s2 = backup(&t, "s2", 2, s1.addr, Some(2), &[]);
    wait_members(&[&s1, &s2], &[1, 2]);
    let d1 = Client::headless(&t, "dev1", "alice", &s1, DEVICE1_IP);
    put(&d1.path("kept.txt"), b"from epoch 1");
    wait_until(DEADLINE, "kept.txt on s2", || holds(&s2.user_dir("alice").join("kept.txt"), b"from epoch 1"));
    drop(d1);
    s1.restart(&t); // epoch 2
    wait_members(&[&s1, &s2], &[1, 2]);
    assert_eq!(epoch(&s2), Some(2));
    s1.kill();
    s2.kill();

    // A brand-new primary, at epoch 1, with nothing in it.
    let mode = ["-p", "--id", "9"].map(String::from).to_vec();
    let s9 = Server::start(&t, ServerOpts { name: "s9".into(), ip: ip(7), mode, ..primary_opts(&[]) });
    wait_until(DEADLINE, "s9 to report epoch 1", || epoch(&s9) == Some(1));
    let opts = backup_opts("s2", 2, s9.addr, Some(2), &[]);
    let s2 = Server::start(&t, ServerOpts { data: Some(s2.data.clone()), ..opts });
    // Today s2 drops every frame of the lower epoch, the `joined` included, with a
    // warning (so it never reaches its "older than ours" refusal, and stays on
    // that link); either way it has heard from s9 and turned it down.
    let kept = s2.user_dir("alice").join("kept.txt");
    let turned_down = wait_for(DEADLINE, "s2 to turn the primary of a lower epoch down (or lose its files)", || {
        let log = s2.log();
        if !holds(&kept, b"from epoch 1") {
            Some(false)
        } else if log.contains("stale epoch=1") || log.contains("older than ours") {
            Some(true)
        } else {
            None
        }
    });
    assert!(turned_down && holds(&kept, b"from epoch 1"), "s2 lost its files to a stale primary");
    assert_eq!(epoch(&s2), Some(2), "s2 took a lower epoch");
    assert_eq!(members(&s9), Some(vec![9]), "s9 took s2 in");
}

/// A backup that hears nothing from its primary for `--failure-timeout-ms` (the
/// primary is stopped, SIGSTOP) gives up the link; once the primary is back, every
/// server follows one primary again, with the same data, and a new change reaches
/// all of them.
///
/// May need revisiting with the election: today the backups rejoin the same
/// primary; with failover one of them takes over, and the contract that stays is
/// the end state checked here.
#[test]
fn backups_cut_off_past_the_failure_timeout_end_up_following_with_the_same_data() {
    let t = TestDir::new("epochs_failure_timeout");
    let s1 = primary(&t, &[]);
    let timeout = ["--failure-timeout-ms", "800"];
    let s2 = backup(&t, "s2", 2, s1.addr, Some(2), &timeout);
    let s3 = backup(&t, "s3", 3, s1.addr, Some(3), &timeout);
    wait_members(&[&s1, &s2, &s3], &[1, 2, 3]);
    let mut d1 = Client::interactive(&t, "dev1", "alice", &s1, DEVICE1_IP);
    let outside = t.mkdir("outside");
    put(&outside.join("before.bin"), &seeded(1, 400_000));
    d1.ok(&format!("upload {}", outside.join("before.bin").display()));

    let gave_up = |s: &Server| s.log().matches("not following a primary").count();
    let before = [gave_up(&s2), gave_up(&s3)];
    let mut s1 = s1;
    s1.proc.signal("STOP");
    for (s, before) in [&s2, &s3].into_iter().zip(before) {
        wait_until(DEADLINE, &format!("{} to give up its silent primary", s.opts.name), || gave_up(s) > before);
    }
    s1.proc.signal("CONT");
    wait_members(&[&s1, &s2, &s3], &[1, 2, 3]);
    let want = contents(&s1.user_dir("alice"));
    assert_eq!(want.keys().collect::<Vec<_>>(), ["before.bin"]);
    wait_trees("every server to hold the same files", &[&s2.user_dir("alice"), &s3.user_dir("alice")], &want);

    put(&outside.join("after.bin"), &seeded(2, 300_000));
    d1.ok(&format!("upload {}", outside.join("after.bin").display()));
    let mut want = want;
    want.insert("after.bin".into(), seeded(2, 300_000));
    assert_on_all(&[&s1, &s2, &s3], &want, "after a change made once the primary was back");
}
