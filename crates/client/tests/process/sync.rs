//! Live sync between two devices of one user.

use crate::harness::files::{holds, put, seeded};
use crate::harness::raw::Raw;
use crate::harness::*;
use replibox_proto::{Notice, Op, OpResult};
use std::fs;
use std::io::Write;
use std::time::Duration;

const MIB: usize = 1024 * 1024;

/// Every kind of change made in one sync dir arrives, byte for byte, in the other
/// device's sync dir and in `DATA/users/alice/`: creates in nested folders, an
/// empty file, an 8 MiB file (32 chunks), names with spaces and non-ASCII names, edits
/// (including same-size ones), renames of files and of folders, deletes of files
/// and of whole folders. Changes are made on both devices.
#[test]
fn creates_edits_renames_and_deletes_arrive_byte_identical_on_the_other_device_and_the_server() {
    let t = TestDir::new("sync_every_kind_of_change");
    let (server, d1, d2) = server_and_two_devices(&t, "alice");
    let users = server.user_dir("alice");
    let roots = [d1.sync_dir.as_path(), d2.sync_dir.as_path(), users.as_path()];
    let mut want = Want::new();

    // Creates, on device 1.
    let creates: Vec<(&str, Vec<u8>)> = vec![
        ("top.txt", b"top level\n".to_vec()),
        ("a/b/c/deep.txt", seeded(2, 10_000)),
        ("a/b/empty in a folder", vec![]),
        ("empty", vec![]),
        ("with space/name with spaces.txt", b"spaces in both names".to_vec()),
        ("ünïcödé/日本語 ファイル.txt", "non-ASCII content: żółć 🎉".as_bytes().to_vec()),
        ("ünïcödé/émoji 🎉.md", seeded(3, 777)),
        ("big/8 MiB.bin", seeded(4, 8 * MIB)),
    ];
    for (path, bytes) in creates {
        put(&d1.path(path), &bytes);
        want.insert(path.into(), bytes);
    }
    wait_trees("files created on device 1 to reach device 2 and the server", &roots, &want);

    // Edits, on device 2: longer, shorter, empty to non-empty, same size, and the
    // big file rewritten with other bytes of the same size.
    let edits: Vec<(&str, Vec<u8>)> = vec![
        ("top.txt", b"top level, edited on device 2 and longer now\n".to_vec()),
        ("a/b/c/deep.txt", seeded(5, 300)),
        ("empty", b"not empty any more".to_vec()),
        ("ünïcödé/émoji 🎉.md", seeded(6, 777)),
        ("big/8 MiB.bin", seeded(7, 8 * MIB)),
    ];
    for (path, bytes) in edits {
        put(&d2.path(path), &bytes);
        want.insert(path.into(), bytes);
    }
    wait_trees("edits made on device 2 to reach device 1 and the server", &roots, &want);

    // Renames, on device 1: a file into another folder, a folder into a new nested
    // folder, and the folder holding the big file.
    fs::rename(d1.path("top.txt"), d1.path("a/renamed top.txt")).unwrap();
    let moved = want.remove("top.txt").unwrap();
    want.insert("a/renamed top.txt".into(), moved);
    fs::create_dir_all(d1.path("renamed folder")).unwrap();
    fs::rename(d1.path("with space"), d1.path("renamed folder/with space moved")).unwrap();
    let moved = want.remove("with space/name with spaces.txt").unwrap();
    want.insert("renamed folder/with space moved/name with spaces.txt".into(), moved);
    fs::rename(d1.path("big"), d1.path("large")).unwrap();
    let moved = want.remove("big/8 MiB.bin").unwrap();
    want.insert("large/8 MiB.bin".into(), moved);
    wait_trees("files and folders renamed on device 1 to be renamed on device 2 and the server", &roots, &want);

    // Deletes: a file in a nested folder (and the folders it leaves empty) on
    // device 1, a top-level file on device 2, and a whole folder on device 1.
    fs::remove_dir_all(d1.path("a/b/c")).unwrap();
    want.remove("a/b/c/deep.txt");
    fs::remove_file(d2.path("empty")).unwrap();
    want.remove("empty");
    fs::remove_dir_all(d1.path("ünïcödé")).unwrap();
    want.remove("ünïcödé/日本語 ファイル.txt");
    want.remove("ünïcödé/émoji 🎉.md");
    wait_trees("deletes to disappear from the other device and the server", &roots, &want);

    // A file created on device 2 in a folder created on device 1 travels back.
    put(&d2.path("a/b/from device 2.txt"), b"the other way");
    want.insert("a/b/from device 2.txt".into(), b"the other way".to_vec());
    wait_trees("a file created on device 2 to reach device 1 and the server", &roots, &want);

    assert!(
        files::tree(&server.tmp_dir()).files.is_empty(),
        "uploads left temporary files behind: {:?}",
        files::tree(&server.tmp_dir())
    );
}

/// A writer that keeps a file open and writes it in pieces with pauses (shorter and
/// longer than the client's settle time): the server only ever stores the whole
/// file, once.
#[test]
fn a_file_still_being_written_is_uploaded_only_when_complete() {
    let t = TestDir::new("sync_slow_writer");
    let (server, d1, d2) = server_and_two_devices(&t, "alice");
    const PIECES: usize = 10;
    const PIECE: usize = 64 * 1024;
    let writers: Vec<_> = [("slow 100ms.bin", 100u64, 11u64), ("slow 400ms.bin", 400, 12)]
        .into_iter()
        .map(|(name, pause_ms, seed)| {
            let path = d1.path(name);
            std::thread::spawn(move || {
                let bytes = seeded(seed, PIECES * PIECE);
                let mut f = fs::File::create(&path).unwrap();
                for piece in bytes.chunks(PIECE) {
                    f.write_all(piece).unwrap();
                    f.flush().unwrap();
                    // The pause simulates a slow writer; nothing is asserted on time.
                    std::thread::sleep(Duration::from_millis(pause_ms));
                }
                drop(f);
                (name, bytes)
            })
        })
        .collect();
    let mut want = Want::new();
    for w in writers {
        let (name, bytes) = w.join().unwrap();
        want.insert(name.to_string(), bytes);
    }
    let users = server.user_dir("alice");
    wait_trees("the slowly written files to arrive whole", &[&d1.sync_dir, &d2.sync_dir, &users], &want);
    let device = d1.device_id();
    for name in want.keys() {
        let stored = server.stored("alice", name);
        assert_eq!(
            stored,
            vec![(1, (PIECES * PIECE) as u64, device.clone())],
            "{name}: the server stored these versions (version, size, device); a half-written file was uploaded"
        );
    }
}

/// A file received from the server is not uploaded back: its stored version stays
/// at 1, an edit makes exactly one new version, a rename is not followed by a
/// re-upload, and a device does not receive its own changes back.
#[test]
fn a_received_change_is_not_sent_back() {
    let t = TestDir::new("sync_echo_suppression");
    let (server, d1, d2) = server_and_two_devices(&t, "alice");
    let (id1, id2) = (d1.device_id(), d2.device_id());
    let mut barrier_n = 0;
    // A barrier: a new file made on `dev` and stored by the server. The device's
    // engine handles its inputs in order, so once this is stored, any echo of what
    // it received before would have been sent (and logged) already.
    let mut barrier = |dev: &Client| {
        barrier_n += 1;
        let name = format!("barrier {barrier_n} from {}.txt", dev.opts.name);
        put(&dev.path(&name), name.as_bytes());
        let id = dev.device_id();
        wait_until(DEADLINE, &format!("the server to store {name}"), || {
            server.stored("alice", &name).iter().any(|(_, _, d)| *d == id)
        });
    };

    put(&d1.path("echo.txt"), b"version 1");
    wait_until(DEADLINE, "echo.txt to reach device 2", || files::holds(&d2.path("echo.txt"), b"version 1"));
    barrier(&d2);
    assert_eq!(server.stored("alice", "echo.txt"), vec![(1, 9, id1.clone())], "echo.txt bounced back");

    put(&d1.path("echo.txt"), b"version 2, edited");
    wait_until(DEADLINE, "the edit to reach device 2", || files::holds(&d2.path("echo.txt"), b"version 2, edited"));
    barrier(&d2);
    assert_eq!(
        server.stored("alice", "echo.txt"),
        vec![(1, 9, id1.clone()), (2, 17, id1.clone())],
        "the edit of echo.txt bounced back"
    );

    fs::rename(d1.path("echo.txt"), d1.path("echo renamed.txt")).unwrap();
    wait_until(DEADLINE, "the rename to reach device 2", || {
        files::holds(&d2.path("echo renamed.txt"), b"version 2, edited") && !d2.path("echo.txt").exists()
    });
    barrier(&d2);
    let reuploads: Vec<_> = server.stored("alice", "echo renamed.txt").into_iter().filter(|s| s.2 == id2).collect();
    assert_eq!(reuploads, vec![], "device 2 uploaded the file it had just renamed on the server's word");
    assert_eq!(server.log().matches("renamed user=alice from=echo.txt").count(), 1, "one rename on the server");

    // The other way: device 1 receives and must not bounce either.
    put(&d2.path("from 2.txt"), b"made on device 2");
    wait_until(DEADLINE, "from 2.txt to reach device 1", || files::holds(&d1.path("from 2.txt"), b"made on device 2"));
    barrier(&d1);
    assert_eq!(server.stored("alice", "from 2.txt"), vec![(1, 16, id2.clone())], "from 2.txt bounced back");

    // Neither device received its own changes back.
    for (dev, own) in [(&d1, "echo.txt"), (&d2, "from 2.txt")] {
        let received = dev.activity().lines().filter(|l| l.starts_with(&format!("received {own} "))).count();
        assert_eq!(received, 0, "{} received its own {own} back", dev.opts.name);
    }
}

/// No notice goes back to the device that made a change, checked on the wire (a
/// device that received its own notice would ignore it, so the test above cannot
/// see one): device A, driven by hand, uploads, edits, renames and deletes; after
/// each, device 2 (a real client) makes a change of its own. Notices to one
/// connection go out in order, so a notice of A's own change would reach A before
/// the notice of device 2's.
#[test]
fn a_device_is_not_sent_its_own_changes_back() {
    let t = TestDir::new("sync_no_echo_on_the_wire");
    let server = Server::primary(&t);
    let mut a = Raw::login(server.addr, "alice", "00000000000000a1", "device A (raw)");
    let d2 = Client::headless(&t, "dev2", "alice", &server, DEVICE2_IP);
    let mut n = 0;
    let mut barrier = |a: &mut Raw, after: &str| {
        n += 1;
        let name = format!("from dev2 {n}.txt");
        put(&d2.path(&name), name.as_bytes());
        match a.next_notice() {
            Notice::Put { meta } if meta.path == name => {}
            other => fail(format!(
                "after {after}, device A was sent {other:?} before the notice of {name}: its own change came back"
            )),
        }
    };
    let done = |what: &str, result: OpResult| match result {
        OpResult::Done { meta } => meta,
        other => fail(format!("{what} on device A answered {other:?}")),
    };

    let v = done("the upload", a.upload("mine.txt", b"made on A", None)).version;
    wait_until(DEADLINE, "mine.txt on device 2", || holds(&d2.path("mine.txt"), b"made on A"));
    barrier(&mut a, "its upload");

    let v = done("the edit", a.upload("mine.txt", b"edited on A", Some(v))).version;
    wait_until(DEADLINE, "the edit on device 2", || holds(&d2.path("mine.txt"), b"edited on A"));
    barrier(&mut a, "its edit");

    let rename = Op::Rename { from: "mine.txt".into(), to: "moved/mine.txt".into(), base: Some(v) };
    let v = done("the rename", a.request(rename)).version;
    wait_until(DEADLINE, "the rename on device 2", || {
        holds(&d2.path("moved/mine.txt"), b"edited on A") && !d2.path("mine.txt").exists()
    });
    barrier(&mut a, "its rename");

    // A version carries the epoch that gave it in its high 32 bits.
    assert_eq!(v.0 & 0xffff_ffff, 1, "moved/mine.txt is a new path: {v:?}");
    done("the delete", a.request(Op::Delete { path: "moved/mine.txt".into(), base: Some(v) }));
    wait_until(DEADLINE, "the delete on device 2", || !d2.path("moved/mine.txt").exists());
    barrier(&mut a, "its delete");
}

/// A file edited and then renamed on device 1 while device 2 is stopped: device
/// 2 cannot fetch the edit under the old name (gone by then), and must not take
/// its own older copy for the renamed version. It ends with the edit under the
/// new name, and no conflicted copy (a stale copy recorded as the new version
/// made the next full pass see a conflict; an edit of it overwrote the other
/// device's edit).
#[test]
fn an_edit_then_a_rename_received_late_gives_the_edit_under_the_new_name() {
    let t = TestDir::new("edit_then_rename_late");
    let (server, d1, mut d2) = server_and_two_devices(&t, "alice");
    let users = server.user_dir("alice");
    put(&d1.path("a.txt"), b"first");
    wait_until(DEADLINE, "a.txt on device 2", || holds(&d2.path("a.txt"), b"first"));

    d2.proc.signal("STOP");
    put(&d1.path("a.txt"), b"edited on device 1");
    wait_until(DEADLINE, "the edit on the server", || holds(&users.join("a.txt"), b"edited on device 1"));
    fs::rename(d1.path("a.txt"), d1.path("b.txt")).unwrap();
    wait_until(DEADLINE, "the rename on the server", || {
        holds(&users.join("b.txt"), b"edited on device 1") && !users.join("a.txt").exists()
    });
    d2.proc.signal("CONT");

    let mut want = Want::new();
    want.insert("b.txt".into(), b"edited on device 1".to_vec());
    wait_trees("the edit under its new name on device 2", &[&d2.sync_dir], &want);
    // Still so after a barrier through device 2.
    put(&d1.path("barrier.txt"), b"barrier");
    wait_until(DEADLINE, "the barrier on device 2", || holds(&d2.path("barrier.txt"), b"barrier"));
    want.insert("barrier.txt".into(), b"barrier".to_vec());
    wait_trees("device 2 as device 1 and the server", &[&d1.sync_dir, &d2.sync_dir, &users], &want);
}
