//! A server killed and started again on the same data dir.

use crate::harness::files::{check_tree, put, seeded};
use crate::harness::*;
use std::fs;

/// The server is SIGKILLed and started again on the same data dir and port: it
/// still has every file (on disk and in `list_server`), a deleted file stays
/// deleted, and both devices reconnect by themselves and keep syncing both ways.
#[test]
fn a_restarted_server_still_has_everything_and_devices_reconnect_by_themselves() {
    let t = TestDir::new("restart_server");
    let mut server = Server::primary(&t);
    let d1 = Client::headless(&t, "dev1", "alice", &server, DEVICE1_IP);
    let mut d2 = Client::interactive(&t, "dev2", "alice", &server, DEVICE2_IP);
    let users = server.user_dir("alice");

    let mut want = Want::new();
    for (path, bytes) in [
        ("a.txt", b"alpha".to_vec()),
        ("docs/b.md", b"# bee\n".to_vec()),
        ("empty", vec![]),
        ("data/blob.bin", seeded(21, 3 * 1024 * 1024 + 17)),
        ("ünï côdé.txt", "ünï".as_bytes().to_vec()),
        ("gone.txt", b"deleted before the restart".to_vec()),
    ] {
        put(&d1.path(path), &bytes);
        want.insert(path.into(), bytes);
    }
    wait_trees("the files everywhere", &[&d1.sync_dir, &d2.sync_dir, &users], &want);
    fs::remove_file(d1.path("gone.txt")).unwrap();
    want.remove("gone.txt");
    wait_trees("gone.txt deleted everywhere", &[&d1.sync_dir, &d2.sync_dir, &users], &want);
    assert_eq!(listed(&d2.ok("list_server")), sizes(&want), "list_server before the restart");

    server.kill();
    server.restart(&t);
    check_tree(&users, &want).unwrap_or_else(|e| fail(format!("the restarted server's data dir changed: {e}")));
    // dev2's request waits for its reconnection.
    assert_eq!(listed(&d2.ok("list_server")), sizes(&want), "list_server after the restart");
    for d in [&d1, &d2] {
        wait_until(DEADLINE, &format!("{} to reconnect", d.opts.name), || {
            d.activity().contains("connection to the server is back")
        });
    }

    put(&d1.path("after.txt"), b"created after the restart");
    want.insert("after.txt".into(), b"created after the restart".to_vec());
    put(&d1.path("a.txt"), b"alpha, edited after the restart");
    want.insert("a.txt".into(), b"alpha, edited after the restart".to_vec());
    fs::remove_dir_all(d1.path("docs")).unwrap();
    want.remove("docs/b.md");
    put(&d2.path("from 2.txt"), b"device 2 after the restart");
    want.insert("from 2.txt".into(), b"device 2 after the restart".to_vec());
    wait_trees("changes after the restart everywhere", &[&d1.sync_dir, &d2.sync_dir, &users], &want);
    assert_eq!(server.status()["sessions"], 2, "both devices should hold a session on the restarted server");
}
