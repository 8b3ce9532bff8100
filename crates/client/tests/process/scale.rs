//! Real use at real scale: users with thousands of files.

use crate::harness::cluster::*;
use crate::harness::raw::Raw;
use crate::harness::*;
use replibox_proto::{ContentHash, Msg, Op, OpResult, Seq, REQUEST_WINDOW};
use std::collections::BTreeMap;
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

/// Sends upload `seq` of `bytes` to `path` on a raw connection without waiting
/// for its answer (only for its `proceed`); answers of earlier requests that come
/// meanwhile go into `answers`. None when the server answered at once (no
/// `proceed`): that answer is in `answers`.
fn upload_in_flight(
    r: &mut Raw,
    seq: Seq,
    path: &str,
    bytes: &[u8],
    answers: &mut BTreeMap<Seq, OpResult>,
) -> Option<()> {
    let op = Op::Upload {
        path: path.into(),
        size: bytes.len() as u64,
        mtime_ms: 1_000,
        base: None,
        exec: false,
        eager: false,
    };
    r.send(&Msg::Request { seq, op });
    loop {
        match r.recv().map(|f| f.msg) {
            Some(Msg::Proceed { seq: s }) if s == seq => break,
            Some(Msg::Reply { seq: s, result }) => {
                answers.insert(s, result);
                if s == seq {
                    return None;
                }
            }
            Some(Msg::Pong | Msg::Notice { .. }) => {}
            other => fail(format!("{}: upload {seq} of {path} answered with {other:?}", r.what)),
        }
    }
    r.send_chunks(seq, bytes);
    r.send(&Msg::UploadEnd { seq, hash: ContentHash::of(bytes) });
    Some(())
}

/// Reads frames until every seq in `want` has its answer in `answers`.
fn answers_for(r: &mut Raw, want: &[Seq], answers: &mut BTreeMap<Seq, OpResult>) {
    while !want.iter().all(|s| answers.contains_key(s)) {
        match r.recv().map(|f| f.msg) {
            Some(Msg::Reply { seq, result }) => {
                answers.insert(seq, result);
            }
            Some(Msg::Pong | Msg::Notice { .. }) => {}
            other => fail(format!("{}: waiting for the answers to {want:?}, got {other:?}", r.what)),
        }
    }
}

/// At most once with a window of requests in flight (issue 7, speed): a device
/// sends three uploads, each one's bytes before any answer is read; the primary
/// is killed; resent to the new primary with their seqs, each gets its first
/// answer (the same version, no `proceed`) and none is stored twice. A seq below
/// the window is refused; one within it that was never applied is served.
#[test]
fn uploads_in_flight_resent_after_a_failover_are_each_answered_once() {
    let t = TestDir::new("scale_window_at_most_once");
    let (mut s1, s2, s3) = three_servers(&t, &[]);
    let device = "00000000000000d1";
    let mut a = Raw::login(s1.addr, "alice", device, "device A");
    let files: Vec<(String, Vec<u8>)> =
        (1..=3).map(|i| (format!("w{i}.txt"), format!("file {i}\n").into_bytes())).collect();
    let mut first = BTreeMap::new();
    let seqs: Vec<Seq> = (1..=3).map(Seq).collect();
    for ((path, bytes), seq) in files.iter().zip(&seqs) {
        assert!(upload_in_flight(&mut a, *seq, path, bytes, &mut first).is_some(), "{path} answered at once");
    }
    answers_for(&mut a, &seqs, &mut first);
    for seq in &seqs {
        assert!(matches!(first[seq], OpResult::Done { .. }), "upload {seq}: {:?}", first[seq]);
    }
    // Every upload went out before the first answer was read: three in flight.
    drop(a);

    s1.kill();
    let others = [&s2, &s3];
    let p = wait_new_primary(&others, 2);
    let primary = others[p];
    let mut b = Raw::login(primary.addr, "alice", device, "device A after the failover");
    let mut again = BTreeMap::new();
    for ((path, bytes), seq) in files.iter().zip(&seqs) {
        assert!(
            upload_in_flight(&mut b, *seq, path, bytes, &mut again).is_none(),
            "resent upload {seq} of {path} was taken as new (a proceed)"
        );
    }
    assert_eq!(again, first, "each resent upload gets its first answer");
    for (path, _) in &files {
        assert!(primary.stored("alice", path).is_empty(), "{path} was stored again by the new primary");
    }

    // More changes, seqs 4 to 2 + REQUEST_WINDOW: seq 1 and 2 fall out of the
    // window, seq 3 is its oldest.
    let mut more = BTreeMap::new();
    let later: Vec<Seq> = (4..=2 + REQUEST_WINDOW).map(Seq).collect();
    for seq in &later {
        upload_in_flight(&mut b, *seq, &format!("m{}.txt", seq.0), b"more", &mut more);
        answers_for(&mut b, &[*seq], &mut more);
    }
    let mut old = BTreeMap::new();
    assert!(upload_in_flight(&mut b, Seq(2), "w2.txt", b"file 2\n", &mut old).is_none());
    assert!(matches!(&old[&Seq(2)], OpResult::Error { message } if message.contains("older")), "{old:?}");
    assert!(upload_in_flight(&mut b, Seq(3), "w3.txt", b"file 3\n", &mut old).is_none());
    assert_eq!(old[&Seq(3)], first[&Seq(3)], "seq 3 is still within the window");
}
