//! Empty folders sync like files (issue 9): made, renamed (a delete and a
//! create) and removed on one device, they are made, renamed and removed on the
//! other device and in `DATA/users/alice/` of every server.

use crate::harness::cluster::*;
use crate::harness::files::{check_layout, holds, put};
use crate::harness::*;
use std::fs;

/// Empty folders made, nested, renamed and removed on device 1 reach device 2
/// and all three servers, as empty directories (no marker file anywhere), and
/// `list_server`/`list_client` show them as `name/`.
#[test]
fn empty_folders_are_made_renamed_and_removed_on_the_other_device_and_all_three_servers() {
    let t = TestDir::new("folders_everywhere");
    let (s1, s2, s3) = three_servers(&t, &[]);
    let mut d1 = Client::interactive(&t, "dev1", "alice", &s1, DEVICE1_IP);
    let d2 = Client::headless(&t, "dev2", "alice", &s1, DEVICE2_IP);
    let (u1, u2, u3) = (s1.user_dir("alice"), s2.user_dir("alice"), s3.user_dir("alice"));
    let dir1 = d1.sync_dir.clone();
    let roots = [dir1.as_path(), d2.sync_dir.as_path(), u1.as_path(), u2.as_path(), u3.as_path()];
    let mut want = Want::new();

    // Made: a top-level empty folder, a nested one, and a folder beside a file.
    fs::create_dir(d1.path("empty")).unwrap();
    fs::create_dir_all(d1.path("nested/deeper/deepest")).unwrap();
    put(&d1.path("docs/a.txt"), b"a file beside an empty folder");
    fs::create_dir(d1.path("docs/drafts")).unwrap();
    want.insert("docs/a.txt".into(), b"a file beside an empty folder".to_vec());
    let empty = ["empty", "nested/deeper/deepest", "docs/drafts"];
    wait_layout("empty folders made on device 1 everywhere", &roots, &want, &empty);
    let listing = d1.ok("list_server");
    assert_eq!(
        listed_folders(&listing),
        ["docs/drafts/", "empty/", "nested/deeper/deepest/"].map(String::from).into(),
        "list_server shows the empty folders:\n{listing}"
    );
    assert_eq!(listed(&listing), sizes(&want), "list_server's files");
    assert!(listing.ends_with("1 file, 3 empty folders"), "{listing}");
    let listing = d1.ok("list_client");
    assert_eq!(listed_folders(&listing).len(), 3, "list_client shows the empty folders:\n{listing}");

    // Renamed: an empty folder, and a folder holding only empty folders.
    fs::rename(d1.path("empty"), d1.path("renamed")).unwrap();
    fs::rename(d1.path("nested"), d1.path("moved")).unwrap();
    let empty = ["renamed", "moved/deeper/deepest", "docs/drafts"];
    wait_layout("the renamed folders everywhere", &roots, &want, &empty);

    // Removed: the innermost folder (its parent, now empty, stays: it is still
    // on device 1), a top-level one, and a folder that held a file and an empty
    // folder.
    fs::remove_dir(d1.path("moved/deeper/deepest")).unwrap();
    fs::remove_dir(d1.path("renamed")).unwrap();
    fs::remove_dir_all(d1.path("docs")).unwrap();
    want.clear();
    wait_layout("the removed folders gone everywhere", &roots, &want, &["moved/deeper"]);
    fs::remove_dir_all(d1.path("moved")).unwrap();
    wait_layout("nothing left anywhere", &roots, &want, &[]);
}

/// A folder removed on device 1 while device 2 (stopped, so that it cannot
/// sync) adds a file in it: the file wins and its folder exists everywhere. A
/// folder removed on device 1 that holds a file device 2's rules ignore stays on
/// device 2 with that file (never deleted), and is gone from the server.
#[test]
fn a_folder_removed_while_the_other_device_adds_a_file_in_it_keeps_the_file() {
    let t = TestDir::new("folders_delete_vs_add");
    let (server, d1, mut d2) = server_and_two_devices(&t, "alice");
    let users = server.user_dir("alice");
    let roots = [d1.sync_dir.as_path(), d2.sync_dir.as_path(), users.as_path()];
    fs::create_dir(d1.path("shared")).unwrap();
    fs::create_dir(d1.path("junk")).unwrap();
    let mut want = Want::new();
    wait_layout("the folders everywhere", &roots, &want, &["shared", "junk"]);
    put(&d2.path("junk/.notes.swp"), b"ignored by default");

    d2.proc.signal("STOP");
    put(&d2.path("shared/new.txt"), b"added on device 2 meanwhile");
    fs::remove_dir(d1.path("shared")).unwrap();
    fs::remove_dir(d1.path("junk")).unwrap();
    wait_until(DEADLINE, "the folders' deletes on the server", || {
        !users.join("shared").exists() && !users.join("junk").exists()
    });
    d2.proc.signal("CONT");

    want.insert("shared/new.txt".into(), b"added on device 2 meanwhile".to_vec());
    wait_layout("device 2's new file, and its folder, everywhere", &[&d1.sync_dir, &users], &want, &[]);
    let mut on_d2 = want.clone();
    on_d2.insert("junk/.notes.swp".into(), b"ignored by default".to_vec());
    wait_layout("device 2 keeps its file and its ignored file", &[&d2.sync_dir], &on_d2, &[]);
    // Still so once device 2 has caught up with everything (a barrier through it).
    put(&d1.path("barrier.txt"), b"barrier");
    wait_until(DEADLINE, "the barrier on device 2", || holds(&d2.path("barrier.txt"), b"barrier"));
    want.insert("barrier.txt".into(), b"barrier".to_vec());
    on_d2.insert("barrier.txt".into(), b"barrier".to_vec());
    check_layout(&d2.sync_dir, &on_d2, &[]).unwrap_or_else(|e| fail(e));
    wait_layout("the same on device 1 and the server", &[&d1.sync_dir, &users], &want, &[]);
}

/// A new device receives the empty folders; a restarted server keeps them; a
/// folder replaced by a file and a file by a folder follow; an ignored folder
/// and a folder with an invalid name stay on their device.
#[test]
fn empty_folders_reach_a_new_device_and_survive_a_server_restart() {
    let t = TestDir::new("folders_new_device_restart");
    let mut server = Server::primary(&t);
    let d1 = Client::headless(&t, "dev1", "alice", &server, DEVICE1_IP);
    let users = server.user_dir("alice");
    put(&d1.path(".replibox-ignore"), b"build/\n");
    fs::create_dir_all(d1.path("a/b/c")).unwrap();
    fs::create_dir(d1.path("x")).unwrap();
    fs::create_dir(d1.path("build")).unwrap();
    fs::create_dir(d1.path("back\\slash")).unwrap();
    let mut want = Want::new();
    wait_layout("d1's folders on the server", &[&users], &want, &["a/b/c", "x"]);

    server.kill();
    server.restart(&t);
    check_layout(&users, &want, &["a/b/c", "x"])
        .unwrap_or_else(|e| fail(format!("the restarted server lost folders: {e}")));
    let d2 = Client::headless(&t, "dev2", "alice", &server, DEVICE2_IP);
    wait_layout("the empty folders on the new device", &[&d2.sync_dir], &want, &["a/b/c", "x"]);

    // A folder becomes a file, and a file a folder.
    fs::remove_dir(d1.path("x")).unwrap();
    put(&d1.path("x"), b"x is a file now");
    want.insert("x".into(), b"x is a file now".to_vec());
    wait_layout("x a file everywhere", &[&d2.sync_dir, &users], &want, &["a/b/c"]);
    fs::remove_file(d1.path("x")).unwrap();
    fs::create_dir(d1.path("x")).unwrap();
    want.remove("x");
    wait_layout("x a folder again everywhere", &[&d2.sync_dir, &users], &want, &["a/b/c", "x"]);
    assert!(d1.path("build").is_dir() && d1.path("back\\slash").is_dir(), "device 1's own folders are gone");
}
