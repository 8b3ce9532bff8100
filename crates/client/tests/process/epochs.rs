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
/// primary's): it keeps its files and its epoch, and the stale primary does not
/// take it in.
///
/// With the election the later epoch comes from a failover: s1 dies, s2 takes over
/// with epoch 2, then s2 dies and is pointed at a brand-new primary of epoch 1.
#[test]
fn a_backup_never_takes_the_state_of_a_primary_of_a_lower_epoch() {
    let t = TestDir::new("epochs_lower_refused");
    let mut s1 = primary(&t, &[]);
    let s2 = backup(&t, "s2", 2, s1.addr, Some(2), &[]);
    wait_members(&[&s1, &s2], &[1, 2]);
    let d1 = Client::headless(&t, "dev1", "alice", &s1, DEVICE1_IP);
    put(&d1.path("kept.txt"), b"from epoch 1");
    wait_until(DEADLINE, "kept.txt on s2", || holds(&s2.user_dir("alice").join("kept.txt"), b"from epoch 1"));
    drop(d1);
    s1.kill();
    wait_new_primary(&[&s2], 2);
    let mut s2 = s2;
    s2.kill();

    // A brand-new primary, at epoch 1, with nothing in it.
    let mode = ["-p", "--id", "9"].map(String::from).to_vec();
    let s9 = Server::start(&t, ServerOpts { name: "s9".into(), ip: ip(7), mode, ..primary_opts(&[]) });
    wait_until(DEADLINE, "s9 to report epoch 1", || epoch(&s9) == Some(1));
    let s2 = restart_as_backup(&t, &s2, s9.addr);
    let kept = s2.user_dir("alice").join("kept.txt");
    let turned_down = wait_for(DEADLINE, "s9 to learn of s2's later epoch (or s2 to lose its files)", || {
        if !holds(&kept, b"from epoch 1") {
            Some(false)
        } else if s9.log().contains("later than ours") {
            Some(true)
        } else {
            None
        }
    });
    assert!(turned_down && holds(&kept, b"from epoch 1"), "s2 lost its files to a stale primary");
    assert_eq!(epoch(&s2), Some(2), "s2 took a lower epoch");
    assert!(!members(&s9).unwrap_or_else(|| fail("s9 gave no --status")).contains(&2), "s9 took s2 in");
}

/// A primary that stops answering (SIGSTOP) for longer than the backups'
/// `--failure-timeout-ms` is replaced: the backups elect a new primary of the next
/// epoch; once the old one runs again it learns of that epoch, steps down and
/// follows, every server holds the same data, and a new change made on the
/// device (which the new primary called back) reaches all of them.
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

    let mut s1 = s1;
    s1.proc.signal("STOP");
    let p = wait_new_primary(&[&s2, &s3], 2);
    s1.proc.signal("CONT");
    let (new, other) = if p == 0 { (&s2, &s3) } else { (&s3, &s2) };
    let all = [new, other, &s1];
    wait_new_primary(&all, 2);
    wait_members(&all, &[1, 2, 3]);
    let want = contents(&new.user_dir("alice"));
    assert_eq!(want.keys().collect::<Vec<_>>(), ["before.bin"]);
    wait_trees("every server to hold the same files", &[&s1.user_dir("alice"), &other.user_dir("alice")], &want);

    put(&outside.join("after.bin"), &seeded(2, 300_000));
    d1.ok(&format!("upload {}", outside.join("after.bin").display()));
    let mut want = want;
    want.insert("after.bin".into(), seeded(2, 300_000));
    assert_on_all(&all, &want, "after a change made once the old primary was back");
}

/// Two histories of one epoch never merge silently: after a failover (s2 takes
/// over as epoch 2 and acknowledges a change) every server stops; s1 is started
/// first with -p on its older data dir (the others are down, so nothing stops
/// it) and takes epoch 2 as well. s2, started with -b, is refused (exit 1) with
/// the reason, instead of installing s1's state over its own: the change it
/// acknowledged is still in its data dir.
#[test]
fn a_backup_with_another_history_of_the_same_epoch_is_refused_not_overwritten() {
    let t = TestDir::new("epochs_same_epoch_two_histories");
    let mut s1 = primary(&t, &[]);
    let s2 = backup(&t, "s2", 2, s1.addr, Some(2), &[]);
    wait_members(&[&s1, &s2], &[1, 2]);
    s1.kill();
    wait_new_primary(&[&s2], 2);
    let mut d2 = Client::interactive(&t, "dev1", "alice", &s2, DEVICE1_IP);
    let outside = t.mkdir("outside");
    put(&outside.join("y.txt"), b"acknowledged in epoch 2");
    d2.ok(&format!("upload {}", outside.join("y.txt").display()));
    drop(d2);
    let mut s2 = s2;
    s2.kill();

    s1.restart(&t);
    wait_until(DEADLINE, "s1 to serve epoch 2 too", || epoch(&s1) == Some(2));
    let port = s2.addr.port().to_string();
    let data = s2.data.to_str().unwrap_or_else(|| fail("the data dir is not UTF-8")).to_string();
    let via = s1.addr.to_string();
    let args = ["-b", via.as_str(), "--id", "2", "--bind", "127.0.0.2", "--port", &port, "--data", &data];
    let (status, err) = crate::server::run_to_exit(&t, "s2-refused", &args);
    assert_eq!(status.code(), Some(1), "s2 joining a second history of its epoch: {status}\n{err}");
    assert!(err.contains("two data dirs were started with -p as the same epoch"), "no clear reason:\n{err}");
    assert!(holds(&s2.user_dir("alice").join("y.txt"), b"acknowledged in epoch 2"), "s2 lost its acknowledged change");
    assert!(!members(&s1).unwrap_or_else(|| fail("s1 gave no --status")).contains(&2), "s1 took s2 in");
}
