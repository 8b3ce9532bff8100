//! Changes made while a device was offline, reconciled when it logs in again.

use crate::harness::files::{put, tree};
use crate::harness::*;
use std::fs;

fn b(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

/// Device 2 logs out (SIGINT: a clean logout), both devices change files, device 2
/// comes back: every change on either side reaches everyone; a file edited on both
/// sides keeps the server's version under its name and device 2's as
/// `NAME (conflicted copy DEVICE DATE).EXT` on both devices and the server; an edit
/// wins over a delete made on the other side. Nothing is lost.
#[test]
fn offline_changes_reconcile_at_login_and_a_conflict_keeps_both_versions() {
    let t = TestDir::new("offline_reconcile");
    let (server, d1, mut d2) = server_and_two_devices(&t, "alice");
    let users = server.user_dir("alice");

    let initial = [
        "keep.txt",
        "edit offline.txt",
        "delete offline.txt",
        "edit online.txt",
        "delete online.txt",
        "both.txt",
        "deleted here, edited there.txt",
        "edited here, deleted there.txt",
        "rename offline.txt",
        "dir/nested.txt",
    ];
    let mut want = Want::new();
    for name in initial {
        let bytes = b(&format!("original {name}\n"));
        put(&d1.path(name), &bytes);
        want.insert(name.into(), bytes);
    }
    wait_trees("the initial files everywhere", &[&d1.sync_dir, &d2.sync_dir, &users], &want);

    let status = d2.stop();
    assert!(status.success(), "device 2 should log out cleanly on SIGINT, ended with {status}");
    let id2 = d2.device_id();
    wait_until(DEADLINE, "the server to log device 2 out", || {
        server.log().lines().any(|l| l.contains("logged out user=alice") && l.contains(&id2))
    });

    // Device 2, offline.
    put(&d2.path("edit offline.txt"), b"edited on device 2 while offline\n");
    fs::remove_file(d2.path("delete offline.txt")).unwrap();
    put(&d2.path("new offline.txt"), b"created on device 2 while offline\n");
    put(&d2.path("new dir/deep/new.txt"), b"created in new folders while offline\n");
    put(&d2.path("both.txt"), b"device 2's version of both.txt\n");
    put(&d2.path("deleted here, edited there.txt"), b"edited on device 2, deleted on device 1\n");
    fs::remove_file(d2.path("edited here, deleted there.txt")).unwrap();
    fs::rename(d2.path("rename offline.txt"), d2.path("renamed offline.txt")).unwrap();
    put(&d2.path("new on both.txt"), b"device 2 made this\n");

    // Device 1, online meanwhile.
    put(&d1.path("edit online.txt"), b"edited on device 1 while device 2 was away\n");
    fs::remove_file(d1.path("delete online.txt")).unwrap();
    put(&d1.path("new online.txt"), b"created on device 1\n");
    put(&d1.path("both.txt"), b"device 1's version of both.txt, stored first\n");
    fs::remove_file(d1.path("deleted here, edited there.txt")).unwrap();
    put(&d1.path("edited here, deleted there.txt"), b"edited on device 1, deleted on device 2\n");
    put(&d1.path("new on both.txt"), b"device 1 made this one\n");

    let mut on_server = want.clone();
    on_server.insert("edit online.txt".into(), b("edited on device 1 while device 2 was away\n"));
    on_server.remove("delete online.txt");
    on_server.insert("new online.txt".into(), b("created on device 1\n"));
    on_server.insert("both.txt".into(), b("device 1's version of both.txt, stored first\n"));
    on_server.remove("deleted here, edited there.txt");
    on_server.insert("edited here, deleted there.txt".into(), b("edited on device 1, deleted on device 2\n"));
    on_server.insert("new on both.txt".into(), b("device 1 made this one\n"));
    wait_trees("device 1's changes on the server while device 2 is away", &[&d1.sync_dir, &users], &on_server);

    d2.restart(&t);

    let mut want = on_server;
    want.insert("edit offline.txt".into(), b("edited on device 2 while offline\n"));
    want.remove("delete offline.txt");
    want.insert("new offline.txt".into(), b("created on device 2 while offline\n"));
    want.insert("new dir/deep/new.txt".into(), b("created in new folders while offline\n"));
    want.insert("deleted here, edited there.txt".into(), b("edited on device 2, deleted on device 1\n"));
    let moved = want.remove("rename offline.txt").unwrap();
    want.insert("renamed offline.txt".into(), moved);

    // The conflicted copies carry device 2's label and a date.
    let label = d2.device_label();
    let copy_of = |stem: &str| {
        let prefix = format!("{stem} (conflicted copy {label} ");
        wait_for(DEADLINE, &format!("a conflicted copy of {stem}.txt on device 2"), || {
            let names: Vec<String> = tree(&d2.sync_dir)
                .files
                .into_keys()
                .filter(|n| n.starts_with(&prefix) && n.ends_with(").txt"))
                .collect();
            (names.len() == 1).then(|| names[0].clone())
        })
    };
    for (stem, device2_version) in
        [("both", "device 2's version of both.txt\n"), ("new on both", "device 2 made this\n")]
    {
        let copy = copy_of(stem);
        let date = &copy[format!("{stem} (conflicted copy {label} ").len()..copy.len() - ").txt".len()];
        assert!(
            date.len() == 10 && date.as_bytes()[4] == b'-' && date.as_bytes()[7] == b'-',
            "the conflicted copy {copy:?} should name the date as YYYY-MM-DD"
        );
        want.insert(copy, b(device2_version));
    }
    wait_trees("both devices and the server to converge", &[&d1.sync_dir, &d2.sync_dir, &users], &want);

    let login = d2.proc.stdout();
    assert!(
        login.lines().any(|l| l.contains("in sync with the server") && l.contains("2 conflicts")),
        "device 2's login outcome should count 2 conflicts: {login}"
    );
}
