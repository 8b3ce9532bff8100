//! The two-device limit, and what a device's death leaves behind.

use crate::harness::files::{put, tree, write_seeded};
use crate::harness::*;
use std::fs;

/// A third device of one user is refused with a clear message and a non-zero
/// exit; it syncs nothing; the first two keep syncing both ways; another user is
/// not affected by alice's limit; once device 2 logs out (SIGTERM), a new device
/// takes its slot.
#[test]
fn a_third_device_is_refused_and_the_first_two_keep_syncing() {
    let t = TestDir::new("devices_third_refused");
    let (server, d1, mut d2) = server_and_two_devices(&t, "alice");
    let users = server.user_dir("alice");
    put(&d1.path("before.txt"), b"there before the third device");
    let mut want = Want::new();
    want.insert("before.txt".into(), b"there before the third device".to_vec());
    wait_trees("before.txt everywhere", &[&d1.sync_dir, &d2.sync_dir, &users], &want);

    for interactive in [false, true] {
        let name = if interactive { "dev3-interactive" } else { "dev3-headless" };
        let mut opts = ClientOpts::new(name, "alice", &server, DEVICE3_IP);
        if interactive {
            opts = opts.interactive();
        }
        let mut d3 = Client::spawn(&t, opts);
        let status = d3.proc.wait_exit(DEADLINE);
        let err = d3.proc.stderr();
        assert_eq!(status.code(), Some(2), "{name} could not start, so it should exit with 2; stderr: {err}");
        assert!(
            err.contains("login refused") && err.contains("2 devices"),
            "{name} should say that the login was refused because alice has 2 devices connected: {err}"
        );
        assert_eq!(d3.proc.stdout(), "", "{name} printed an outcome although refused");
        assert!(tree(&d3.sync_dir).files.is_empty(), "{name} received files although refused");
    }

    put(&d1.path("after/from 1.txt"), b"from device 1 after the refusal");
    put(&d2.path("from 2.txt"), b"from device 2 after the refusal");
    want.insert("after/from 1.txt".into(), b"from device 1 after the refusal".to_vec());
    want.insert("from 2.txt".into(), b"from device 2 after the refusal".to_vec());
    wait_trees("the first two devices to keep syncing", &[&d1.sync_dir, &d2.sync_dir, &users], &want);
    assert_eq!(server.status()["sessions"], 2, "the server should hold alice's two sessions only");

    // The refused device really connected from its own address (--bind).
    assert!(
        server.log().lines().any(|l| l.contains("login refused") && l.contains(&format!("peer={DEVICE3_IP}:"))),
        "the server should log the refusal of the device connecting from {DEVICE3_IP}"
    );

    // The limit is per user.
    let bob = Client::headless(&t, "bob", "bob", &server, DEVICE3_IP);
    put(&bob.path("bob.txt"), b"bob's");
    wait_until(DEADLINE, "bob's file on the server", || {
        files::holds(&server.user_dir("bob").join("bob.txt"), b"bob's")
    });
    wait_trees("alice's files untouched by bob", &[&d1.sync_dir, &d2.sync_dir, &users], &want);

    // SIGTERM logs device 2 out cleanly, which frees its slot for a third device.
    d2.proc.signal("TERM");
    let status = d2.proc.wait_exit(DEADLINE);
    assert!(status.success(), "device 2 should log out cleanly on SIGTERM, ended with {status}");
    let d3 = Client::headless(&t, "dev3", "alice", &server, DEVICE4_IP);
    wait_trees("the new device to get alice's files", &[&d3.sync_dir], &want);
    put(&d3.path("from 3.txt"), b"from the device that took the freed slot");
    want.insert("from 3.txt".into(), b"from the device that took the freed slot".to_vec());
    wait_trees("the new device to sync with device 1", &[&d1.sync_dir, &d3.sync_dir, &users], &want);
}

/// A client SIGKILLed in the middle of uploading a 256 MiB file: nothing partial
/// appears under `DATA/users`, `DATA/tmp` is emptied, no other device receives
/// anything of it, and its device slot is freed (two other devices log in).
#[test]
fn a_client_killed_mid_upload_leaves_no_partial_file_and_frees_its_slot() {
    let t = TestDir::new("devices_killed_mid_upload");
    let server = Server::primary(&t);
    let mut d1 = Client::headless(&t, "dev1", "alice", &server, DEVICE1_IP);
    let users = server.user_dir("alice");
    put(&d1.path("before.txt"), b"stored before the crash");
    let mut want = Want::new();
    want.insert("before.txt".into(), b"stored before the crash".to_vec());
    wait_trees("before.txt on the server", &[&users], &want);

    // Written outside, then moved in: the upload starts as soon as it is seen.
    const SIZE: u64 = 256 * 1024 * 1024;
    let src = t.join("big.bin");
    write_seeded(&src, 9, SIZE);
    fs::rename(&src, d1.path("big.bin")).unwrap();

    // Kill the client while the server holds part of the file in DATA/tmp (the
    // transfer takes about a second on an idle machine).
    let tmp = server.tmp_dir();
    let partial = catch_mid_upload(&tmp, SIZE / 2, || users.join("big.bin").exists());
    d1.proc.kill();
    eprintln!("killed the client with {partial} bytes in DATA/tmp");

    wait_until(DEADLINE, "DATA/tmp to be emptied after the crash", || tree(&tmp).files.is_empty());
    files::check_tree(&users, &want).unwrap_or_else(|e| fail(format!("a partial file is visible: {e}")));
    assert!(server.stored("alice", "big.bin").is_empty(), "the server logged storing big.bin");

    // Two other devices can log in: the dead device's slot was freed.
    let d2 = Client::headless(&t, "dev2", "alice", &server, DEVICE2_IP);
    let d3 = Client::headless(&t, "dev3", "alice", &server, DEVICE3_IP);
    wait_trees("the new devices to hold only what was stored", &[&d2.sync_dir, &d3.sync_dir, &users], &want);
    assert_eq!(server.status()["sessions"], 2, "the dead device's session should be gone");
}
