//! Real use at real scale: users with thousands of files.

use crate::harness::*;
use std::fs;
use std::time::{Duration, Instant};

/// The 400-file wall (issue 7, item 1): a user whose files and tombstones no
/// longer fit in one frame header still syncs. 5,000 files are put into the
/// server's data dir by hand and adopted when it starts; a fresh device receives
/// them all, `list_server` prints every one, a delete leaves a tombstone more, and
/// afterwards the cluster is quiet: its `seq` does not move while nothing happens
/// (before the fix, both devices reconnected in a tight loop, each login an entry).
#[test]
fn a_user_with_five_thousand_files_syncs_lists_and_goes_quiet() {
    let t = TestDir::new("scale_5000_files");
    const N: usize = 5000;
    let mut opts = ServerOpts::primary("server");
    let data = t.join("server-data");
    opts.data = Some(data.clone());
    let mut want = Want::new();
    for i in 0..N {
        let path = format!("d{}/file {i:05}.txt", i % 7);
        let bytes = format!("content of file {i}\n").into_bytes();
        files::put(&data.join("users/alice").join(&path), &bytes);
        want.insert(path, bytes);
    }
    let server = Server::start(&t, opts);
    wait_until(Duration::from_secs(120), "the server to adopt the 5000 files", || {
        server.try_status().is_some_and(|s| s["seq"].as_u64().is_some_and(|seq| seq as usize > N))
    });

    let mut d1 = Client::interactive(&t, "dev1", "alice", &server, DEVICE1_IP);
    wait_trees("the 5000 files on the fresh device", &[&d1.sync_dir], &want);
    assert_eq!(listed(&d1.ok("list_server")), sizes(&want), "list_server prints every file");

    // A tombstone more, past the old wall, and a second device.
    fs::remove_file(d1.path("d3/file 00003.txt")).unwrap();
    want.remove("d3/file 00003.txt");
    let d2 = Client::headless(&t, "dev2", "alice", &server, DEVICE2_IP);
    wait_trees(
        "the delete and the 4999 files everywhere",
        &[&d1.sync_dir, &d2.sync_dir, &server.user_dir("alice")],
        &want,
    );

    // Quiet: nothing happens, so nothing is committed. Two full rescans' worth of
    // time is not needed: a reconnect loop commits a login every few milliseconds.
    let seq = |s: &Server| s.status()["seq"].as_u64().unwrap_or_else(|| fail("no seq in --status"));
    let before = seq(&server);
    let since = Instant::now();
    wait_until(DEADLINE, "three seconds to pass", || since.elapsed() >= Duration::from_secs(3));
    assert_eq!(seq(&server), before, "the cluster committed entries while nothing happened");
    assert!(!d1.activity().contains("connection to the server lost"), "device 1 lost its connection");
}
