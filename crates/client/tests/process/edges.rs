//! Corner cases of live sync: bursts, a file becoming a folder, symlinks, long
//! names.

use crate::harness::files::{put, seeded, tree};
use crate::harness::*;
use std::fs;

/// A burst like `cp -r` or an unpacked archive: many files written at once into
/// folders that did not exist a moment before. All arrive, by the watcher alone
/// (the harness sets the clients' periodic rescan far beyond every deadline).
#[test]
fn a_burst_of_files_in_new_folders_arrives_whole() {
    let t = TestDir::new("edges_burst");
    let (server, d1, d2) = server_and_two_devices(&t, "alice");
    let mut want = Want::new();
    for i in 0..120u64 {
        let path = format!("burst/d{}/e{}/file {i}.dat", i % 6, i % 4);
        let bytes = seeded(100 + i, (i * 997 % 20_000) as usize);
        put(&d1.path(&path), &bytes);
        want.insert(path, bytes);
    }
    let users = server.user_dir("alice");
    wait_trees("a burst of 120 files in new folders everywhere", &[&d2.sync_dir, &users], &want);
    fs::remove_dir_all(d1.path("burst")).unwrap();
    want.clear();
    wait_trees("the whole burst deleted everywhere", &[&d2.sync_dir, &users], &want);
}

/// A file replaced by a folder of the same name, and a folder replaced by a file.
#[test]
fn a_file_can_become_a_folder_and_a_folder_a_file() {
    let t = TestDir::new("edges_file_folder_swap");
    let (server, d1, d2) = server_and_two_devices(&t, "alice");
    let users = server.user_dir("alice");
    let roots = [d1.sync_dir.as_path(), d2.sync_dir.as_path(), users.as_path()];
    let mut want = Want::new();
    put(&d1.path("thing"), b"a file named thing");
    put(&d1.path("place/inside.txt"), b"a file inside the folder place");
    want.insert("thing".into(), b"a file named thing".to_vec());
    want.insert("place/inside.txt".into(), b"a file inside the folder place".to_vec());
    wait_trees("the first layout everywhere", &roots, &want);

    fs::remove_file(d1.path("thing")).unwrap();
    put(&d1.path("thing/now a folder.txt"), b"thing is a folder now");
    fs::remove_dir_all(d1.path("place")).unwrap();
    put(&d1.path("place"), b"place is a file now");
    want.clear();
    want.insert("thing/now a folder.txt".into(), b"thing is a folder now".to_vec());
    want.insert("place".into(), b"place is a file now".to_vec());
    wait_trees("the swapped layout everywhere", &roots, &want);
}

/// A folder in a sync dir that is a symlink to somewhere else is not followed:
/// what the other device puts under that name is not written outside the sync
/// dir, nothing outside is renamed or deleted through it, and the other device's
/// files under that name are not deleted because of it.
#[test]
fn a_symlinked_folder_in_the_sync_dir_is_not_written_through() {
    let t = TestDir::new("edges_symlinked_folder");
    let (server, d1, d2) = server_and_two_devices(&t, "alice");
    let outside = t.mkdir("outside");
    put(&outside.join("precious.txt"), b"must survive");
    std::os::unix::fs::symlink(&outside, d2.path("docs")).unwrap();

    put(&d1.path("docs/precious.txt"), b"written by device 1");
    put(&d1.path("docs/new.txt"), b"new from device 1");
    wait_until(DEADLINE, "docs/new.txt on the server", || {
        files::holds(&server.user_dir("alice").join("docs/new.txt"), b"new from device 1")
    });
    // A barrier through device 2: once this is stored, device 2 has handled the
    // notices for docs/ that came before it.
    put(&d1.path("z barrier.txt"), b"barrier");
    wait_until(DEADLINE, "the barrier file on device 2", || files::holds(&d2.path("z barrier.txt"), b"barrier"));
    put(&d2.path("z barrier 2.txt"), b"barrier 2");
    wait_until(DEADLINE, "device 2's barrier on the server", || {
        files::holds(&server.user_dir("alice").join("z barrier 2.txt"), b"barrier 2")
    });
    // Device 2 must not have deleted device 1's files either (they are simply not
    // in its sync dir, since the symlink is not followed).
    for (p, bytes) in [("docs/precious.txt", &b"written by device 1"[..]), ("docs/new.txt", b"new from device 1")] {
        assert!(files::holds(&d1.path(p), bytes), "device 1 lost {p} because of device 2's symlink");
        assert!(files::holds(&server.user_dir("alice").join(p), bytes), "the server lost {p}");
    }
    fs::remove_file(d1.path("docs/precious.txt")).unwrap();
    wait_until(DEADLINE, "the delete of docs/precious.txt on the server", || {
        !server.user_dir("alice").join("docs/precious.txt").exists()
    });
    put(&d1.path("z barrier 3.txt"), b"barrier 3");
    wait_until(DEADLINE, "the third barrier on device 2", || files::holds(&d2.path("z barrier 3.txt"), b"barrier 3"));

    let out = tree(&outside);
    assert_eq!(
        out.files.keys().collect::<Vec<_>>(),
        vec!["precious.txt"],
        "device 2 wrote or deleted through the symlinked folder docs -> {}",
        outside.display()
    );
    assert!(files::holds(&outside.join("precious.txt"), b"must survive"), "a file outside the sync dir was changed");
}

/// A conflict on a file whose name is close to the 255-byte limit: the
/// conflicted-copy name would be too long, yet neither version may be lost.
#[test]
fn a_conflict_on_a_long_name_loses_nothing() {
    let t = TestDir::new("edges_long_name_conflict");
    let (server, d1, mut d2) = server_and_two_devices(&t, "alice");
    let users = server.user_dir("alice");
    let name = format!("{}.txt", "n".repeat(240));
    put(&d1.path(&name), b"original");
    wait_until(DEADLINE, "the long name on device 2", || files::holds(&d2.path(&name), b"original"));

    assert!(d2.stop().success());
    put(&d2.path(&name), b"device 2's edit, made offline");
    put(&d1.path(&name), b"device 1's edit");
    wait_until(DEADLINE, "device 1's edit on the server", || files::holds(&users.join(&name), b"device 1's edit"));
    d2.restart(&t);

    // Both versions must survive somewhere on device 2 and reach the server.
    let mine = b"device 2's edit, made offline".to_vec();
    wait_until(DEADLINE, "device 2's offline edit to survive on device 2 and reach the server and device 1", || {
        let has = |root: &std::path::Path| tree(root).files.keys().any(|p| files::holds(&root.join(p), &mine));
        has(&d2.sync_dir) && has(&users) && has(&d1.sync_dir)
    });
    assert!(files::holds(&users.join(&name), b"device 1's edit"), "the server's version keeps the name");
}

/// Both devices write different content to one file at the same moment, while
/// online: they converge, and both versions survive, once each: one under the name,
/// the other as exactly one conflicted copy named after the device that lost.
#[test]
fn simultaneous_edits_on_both_devices_keep_both_versions() {
    let t = TestDir::new("edges_simultaneous_edits");
    let (server, d1, d2) = server_and_two_devices(&t, "alice");
    let users = server.user_dir("alice");
    put(&d1.path("shared.txt"), b"the original");
    wait_until(DEADLINE, "shared.txt on device 2", || files::holds(&d2.path("shared.txt"), b"the original"));
    let (a, b) = (seeded(51, 300_000), seeded(52, 200_000));
    let (p1, p2) = (d1.path("shared.txt"), d2.path("shared.txt"));
    let (a2, b2) = (a.clone(), b.clone());
    let w1 = std::thread::spawn(move || put(&p1, &a2));
    let w2 = std::thread::spawn(move || put(&p2, &b2));
    w1.join().unwrap();
    w2.join().unwrap();
    wait_until(DEADLINE, "both devices and the server to agree, with both versions present", || {
        let t1 = files::contents(&d1.sync_dir);
        t1 == files::contents(&d2.sync_dir)
            && t1 == files::contents(&users)
            && t1.values().any(|v| *v == a)
            && t1.values().any(|v| *v == b)
    });
    let all = files::contents(&users);
    let names: Vec<&String> = all.keys().collect();
    assert_eq!(names.len(), 2, "shared.txt and one conflicted copy, not {names:?}");
    let copy = names.iter().find(|n| n.as_str() != "shared.txt").unwrap();
    let labels = [d1.device_label(), d2.device_label()];
    assert!(
        labels.iter().any(|l| copy.starts_with(&format!("shared (conflicted copy {l} ")) && copy.ends_with(").txt")),
        "{copy:?} is not a conflicted copy of shared.txt by {labels:?}"
    );
    let mut versions = vec![all["shared.txt"].clone(), all[copy.as_str()].clone()];
    versions.sort();
    let mut both = vec![a, b];
    both.sort();
    assert!(versions == both, "each version should survive once");
}

/// `mv a b` over an existing `b`: `a` is gone everywhere and `b` holds a's bytes.
#[test]
fn a_move_over_an_existing_file_replaces_it_everywhere() {
    let t = TestDir::new("edges_move_over");
    let (server, d1, d2) = server_and_two_devices(&t, "alice");
    let users = server.user_dir("alice");
    let roots = [d1.sync_dir.as_path(), d2.sync_dir.as_path(), users.as_path()];
    let mut want = Want::new();
    want.insert("a.txt".into(), b"content of a".to_vec());
    want.insert("b.txt".into(), b"content of b, to be replaced".to_vec());
    for (p, bytes) in &want {
        put(&d1.path(p), bytes);
    }
    wait_trees("a.txt and b.txt everywhere", &roots, &want);
    fs::rename(d1.path("a.txt"), d1.path("b.txt")).unwrap();
    want.remove("a.txt");
    want.insert("b.txt".into(), b"content of a".to_vec());
    wait_trees("b.txt replaced by a.txt everywhere", &roots, &want);
}

/// The server is killed while a device uploads a big file, and started again: the
/// device resends it by itself, and it arrives whole on the other device.
#[test]
fn an_upload_interrupted_by_a_server_restart_is_resent() {
    const SIZE: u64 = 128 * 1024 * 1024;
    let t = TestDir::new("edges_upload_across_restart");
    let (mut server, d1, d2) = server_and_two_devices(&t, "alice");
    let src = t.join("big.bin");
    files::write_seeded(&src, 61, SIZE);
    fs::rename(&src, d1.path("big.bin")).unwrap();
    let tmp = server.tmp_dir();
    let users = server.user_dir("alice");
    catch_mid_upload(&tmp, SIZE, || users.join("big.bin").exists());
    server.kill();
    server.restart(&t);
    wait_until(DEADLINE, "the resent upload to reach the server and device 2", || {
        files::same_file(&d1.path("big.bin"), &server.user_dir("alice").join("big.bin"))
            && files::same_file(&d1.path("big.bin"), &d2.path("big.bin"))
    });
    assert!(tree(&tmp).files.is_empty(), "temporary files left: {:?}", tree(&tmp));
}
