//! The guarantees the project leads with, where they can break: backups first held
//! against a stalled backup, at most once across a lost reply, bounded memory with
//! backups in the way.

use crate::harness::cluster::*;
use crate::harness::files::{check_tree, put, same_file, seeded, write_seeded};
use crate::harness::proxy::Proxy;
use crate::harness::raw::Raw;
use crate::harness::*;
use replibox_proto::{Msg, Op, OpResult};

/// How many times the primary's log says it dropped backup `id`.
fn dropped(primary: &Server, id: u64) -> usize {
    drops(primary).iter().filter(|l| l.contains(&format!("dropping backup id={id} "))).count()
}

/// One round of the test below: stalled backup s3 (stopped here), `change` made by
/// device A in a thread of its own while device B waits for the notice (when
/// `notice`). Each records how many drops of s3 the primary had logged at the
/// moment its frame arrived, and `held` is checked the moment A's answer came.
/// Then s3 resumes, and the round waits until it is back in the membership.
#[allow(clippy::too_many_arguments)]
fn held_round(
    servers: (&Server, &Server, &mut Server),
    a: &mut Raw,
    b: &mut Raw,
    what: &str,
    notice: bool,
    change: &mut (dyn FnMut(&mut Raw) -> OpResult + Send),
    held: &(dyn Fn() -> Result<(), String> + Sync),
) -> OpResult {
    let (s1, s2, s3) = servers;
    let before = dropped(s1, 3);
    s3.proc.signal("STOP");
    let (result, at_answer, held_then, at_notice) = std::thread::scope(|scope| {
        let answer = scope.spawn(|| {
            let result = change(a);
            (result, dropped(s1, 3), held())
        });
        let at_notice = notice.then(|| {
            let n = b.next_notice();
            (n, dropped(s1, 3))
        });
        let (result, at_answer, held_then) =
            answer.join().unwrap_or_else(|_| fail(format!("device A's {what} failed")));
        (result, at_answer, held_then, at_notice)
    });
    assert!(at_answer > before, "{what} was answered ({result:?}) before the primary dropped stalled backup s3");
    if let Some((n, at)) = at_notice {
        assert!(at > before, "device B was sent {n:?} before the primary dropped stalled backup s3");
    }
    if let Err(e) = held_then {
        let also = if dropped(s1, 2) > 0 { " (the primary dropped s2 too: a loaded machine?)" } else { "" };
        fail(format!("when {what} was answered, backup s2 did not hold it{also}: {e}"));
    }
    b.send(&Msg::Ping); // B's only traffic: keeps its session from the server's read timeout.
    s3.proc.signal("CONT");
    wait_members(&[s1, s2, s3], &[1, 2, 3]);
    result
}

/// Backups first, held as long as it takes: with backup s3 stopped on purpose
/// (SIGSTOP), the answer to an upload, a rename and a delete, the notice to the
/// user's other device and the welcome of a login all come only after the primary
/// has dropped s3, which it does after the ack bound: until then a live backup
/// lacks the change. The other backup, s2, holds the change the moment the answer
/// comes. After each round s3 resumes, rejoins and catches up.
#[test]
fn no_answer_notice_or_welcome_before_a_stalled_backup_is_dropped() {
    let t = TestDir::new("guarantee_backups_first_held");
    let (s1, s2, mut s3) = three_servers(&t, &["--ack-timeout-ms", "2500"]);
    let mut a = Raw::login(s1.addr, "alice", "00000000000000a1", "device A");
    let mut b = Raw::login(s1.addr, "alice", "00000000000000b1", "device B");
    let done = |what: &str, r: OpResult| match r {
        OpResult::Done { meta } => meta,
        other => fail(format!("{what} answered {other:?}")),
    };
    let s2_holds = |want: Want| {
        let dir = s2.user_dir("alice");
        move || check_tree(&dir, &want)
    };

    let bytes = seeded(5, 700_000);
    let mut want = Want::new();
    want.insert("x.bin".into(), bytes.clone());
    let upload = &mut |a: &mut Raw| a.upload("x.bin", &bytes, None);
    let r = held_round((&s1, &s2, &mut s3), &mut a, &mut b, "the upload", true, upload, &s2_holds(want.clone()));
    let meta = done("the upload", r);
    assert_on_all(&[&s1, &s2, &s3], &want, "once s3 caught up after the upload");

    let moved = want.remove("x.bin").unwrap();
    want.insert("y.bin".into(), moved);
    let rename =
        &mut |a: &mut Raw| a.request(Op::Rename { from: "x.bin".into(), to: "y.bin".into(), base: Some(meta.version) });
    let r = held_round((&s1, &s2, &mut s3), &mut a, &mut b, "the rename", true, rename, &s2_holds(want.clone()));
    let meta = done("the rename", r);
    assert_on_all(&[&s1, &s2, &s3], &want, "once s3 caught up after the rename");

    want.clear();
    let delete = &mut |a: &mut Raw| a.request(Op::Delete { path: "y.bin".into(), base: Some(meta.version) });
    let r = held_round((&s1, &s2, &mut s3), &mut a, &mut b, "the delete", true, delete, &s2_holds(want.clone()));
    done("the delete", r);
    assert_on_all(&[&s1, &s2, &s3], &want, "once s3 caught up after the delete");

    let sessions = |s: &Server| s.status()["sessions"].as_u64();
    let mut bob = None;
    let addr = s1.addr;
    let login = &mut |_: &mut Raw| {
        bob = Some(Raw::login(addr, "bob", "00000000000000c1", "bob's device"));
        OpResult::Listing { files: vec![], more: false }
    };
    let s2_has_bob = || match s2.try_status().and_then(|v| v["sessions"].as_u64()) {
        Some(3) => Ok(()),
        other => Err(format!("s2 reports {other:?} sessions, not alice's two and bob's")),
    };
    held_round((&s1, &s2, &mut s3), &mut a, &mut b, "bob's login", false, login, &s2_has_bob);
    assert!(bob.is_some());
    assert_eq!(sessions(&s3), Some(3), "s3 after catching up");
}

/// No dirty reads: while backup s3 is stopped (SIGSTOP) and lacks device A's
/// upload, a listing by device B, and a download by B of a file the upload
/// replaces, are answered only once the primary has dropped s3 (the upload is
/// then acknowledged): a listing or a download must never show a change that a
/// failover could still lose, although the primary has applied it already.
#[test]
fn a_listing_or_a_download_never_shows_a_change_that_is_not_acknowledged() {
    let t = TestDir::new("guarantee_no_dirty_read");
    let (s1, s2, mut s3) = three_servers(&t, &["--ack-timeout-ms", "2500"]);
    let mut a = Raw::login(s1.addr, "alice", "00000000000000a1", "device A");
    let mut b = Raw::login(s1.addr, "alice", "00000000000000b1", "device B");
    let first = match a.upload("x.bin", b"first version", None) {
        OpResult::Done { meta } => meta,
        other => fail(format!("the first upload answered {other:?}")),
    };
    let _ = b.next_notice();
    let before = dropped(&s1, 3);
    s3.proc.signal("STOP");
    let bytes = seeded(7, 200_000);
    let seq =
        a.begin_upload("x.bin", bytes.len() as u64, Some(first.version)).unwrap_or_else(|r| fail(format!("{r:?}")));
    a.send_chunks(seq, &bytes);
    a.send(&Msg::UploadEnd { seq, hash: replibox_proto::ContentHash::of(&bytes) });
    wait_until(DEADLINE, "the primary to apply the upload", || {
        s1.log().contains(&format!("stored user=alice path=x.bin version={}", first.version.0 + 1))
    });
    let listing = b.request(Op::List { after: None });
    let at_listing = dropped(&s1, 3);
    assert!(at_listing > before, "the listing ({listing:?}) was answered before the primary dropped stalled s3");
    match &listing {
        OpResult::Listing { files, .. } => {
            let x: Vec<_> = files.iter().filter(|m| m.path == "x.bin").map(|m| m.size).collect();
            assert_eq!(x, [bytes.len() as u64], "once acknowledged, the listing shows the new version");
        }
        other => fail(format!("the listing answered {other:?}")),
    }
    assert!(matches!(a.reply_to(seq), OpResult::Done { .. }), "the upload was acknowledged once s3 was dropped");
    s3.proc.signal("CONT");
    wait_members(&[&s1, &s2, &s3], &[1, 2, 3]);

    // The same for a download: s3 stopped again, A renames x.bin away, and B
    // opens x.bin; it learns that x.bin is gone only once the rename is
    // acknowledged (before that, "gone" is what a failover could undo).
    let before = dropped(&s1, 3);
    s3.proc.signal("STOP");
    let current = first.version.0 + 1;
    let rename = Op::Rename { from: "x.bin".into(), to: "y.bin".into(), base: Some(replibox_proto::Version(current)) };
    let rseq = a.next_seq();
    a.send(&Msg::Request { seq: rseq, op: rename });
    wait_until(DEADLINE, "the primary to apply the rename", || {
        s1.log().contains("renamed user=alice from=x.bin to=y.bin")
    });
    let opened = b.request(Op::Download { path: "x.bin".into() });
    assert!(dropped(&s1, 3) > before, "the download ({opened:?}) was answered before the primary dropped stalled s3");
    assert!(matches!(a.reply_to(rseq), OpResult::Done { .. }));
    s3.proc.signal("CONT");
}

/// A download waits only for the last change to its own file (issue 7: a device
/// fetching a burst's files while the other device is still sending must not
/// wait for every change under way): with backup s3 stopped and device A's
/// upload of x.bin unacknowledged, device B's download of z.bin, which nothing
/// under way touches, is answered before the primary drops s3, with z.bin's
/// bytes; its download of x.bin still waits (the test above).
#[test]
fn a_download_waits_only_for_the_changes_to_its_own_file() {
    let t = TestDir::new("guarantee_download_own_file");
    let (s1, _s2, mut s3) = three_servers(&t, &["--ack-timeout-ms", "2500"]);
    let mut a = Raw::login(s1.addr, "alice", "00000000000000a1", "device A");
    let mut b = Raw::login(s1.addr, "alice", "00000000000000b1", "device B");
    let z = seeded(3, 50_000);
    assert!(matches!(a.upload("z.bin", &z, None), OpResult::Done { .. }), "the upload of z.bin");
    let _ = b.next_notice();
    let before = dropped(&s1, 3);
    s3.proc.signal("STOP");
    let x = seeded(4, 20_000);
    let seq = a.begin_upload("x.bin", x.len() as u64, None).unwrap_or_else(|r| fail(format!("{r:?}")));
    a.send_chunks(seq, &x);
    a.send(&Msg::UploadEnd { seq, hash: replibox_proto::ContentHash::of(&x) });
    wait_until(DEADLINE, "the primary to apply the upload of x.bin", || {
        s1.log().contains("stored user=alice path=x.bin")
    });
    let dseq = b.next_seq();
    b.send(&Msg::Request { seq: dseq, op: Op::Download { path: "z.bin".into() } });
    let meta = match b.reply_to(dseq) {
        OpResult::Data { meta } => meta,
        other => fail(format!("the download of z.bin answered {other:?}")),
    };
    assert_eq!(dropped(&s1, 3), before, "the download of z.bin waited for the primary to drop stalled s3");
    let mut got = Vec::new();
    loop {
        match b.recv().map(|f| (f.msg, f.payload)) {
            Some((Msg::Chunk { seq: s }, payload)) if s == dseq => got.extend_from_slice(&payload),
            Some((Msg::DownloadEnd { seq: s, .. }, _)) if s == dseq => break,
            Some((Msg::Pong | Msg::Notice { .. }, _)) => {}
            other => fail(format!("the download of z.bin went on with {other:?}")),
        }
    }
    assert_eq!((meta.size, got), (z.len() as u64, z), "z.bin's bytes");
    assert!(matches!(a.reply_to(seq), OpResult::Done { .. }), "the upload of x.bin, once s3 is dropped");
    s3.proc.signal("CONT");
}

/// At most once, end to end: a request that the server applied but whose reply was
/// lost (the network cut the connection instead of delivering it) is resent by the
/// client's front-end after it reconnects, gets its first answer, and is not
/// applied again. For an upload (a second application would make a second
/// version), a delete (it would be refused: nothing left to delete) and a rename
/// made in the sync dir (it would be refused, and the client would fall back to a
/// delete and an upload).
#[test]
fn a_resent_request_whose_reply_was_lost_gets_its_first_answer_and_is_not_applied_twice() {
    let t = TestDir::new("guarantee_at_most_once");
    let (s1, s2, s3) = three_servers(&t, &[]);
    let proxy = Proxy::start(SERVER_IP, s1.addr);
    let mut opts = ClientOpts::new("dev1", "alice", &s1, DEVICE1_IP).interactive();
    opts.server = proxy.addr;
    let mut d1 = Client::spawn(&t, opts);
    d1.wait_logged_in();
    let outside = t.mkdir("outside");
    let once = seeded(1, 300_000);
    put(&outside.join("once.bin"), &once);
    let done_for = |path: &'static str| move |f: &replibox_proto::Frame| matches!(&f.msg, Msg::Reply { result: OpResult::Done { meta }, .. } if meta.path == path);

    proxy.lose_next(done_for("once.bin"));
    let out = d1.ok(&format!("upload {}", outside.join("once.bin").display()));
    assert_eq!(proxy.cuts(), 1, "the upload's reply was not lost: the test did not reach its scenario");
    assert_eq!(out, "uploaded once.bin (300000 bytes)");
    let device = d1.device_id();
    assert_eq!(s1.stored("alice", "once.bin"), vec![(1, 300_000, device.clone())], "stored (version, size, device)");
    let mut want = Want::new();
    want.insert("once.bin".into(), once);
    assert_on_all(&[&s1, &s2, &s3], &want, "after the resent upload");

    proxy.lose_next(done_for("once.bin"));
    let out = d1.ok("delete once.bin");
    assert_eq!(proxy.cuts(), 2, "the delete's reply was not lost: the test did not reach its scenario");
    assert_eq!(out, "deleted once.bin");
    assert_eq!(s1.log().matches("deleted user=alice path=once.bin ").count(), 1, "the delete was applied twice");
    want.clear();
    assert_on_all(&[&s1, &s2, &s3], &want, "after the resent delete");

    put(&d1.path("r.txt"), b"renamed while its reply is lost");
    wait_until(DEADLINE, "r.txt on the primary", || s1.user_dir("alice").join("r.txt").exists());
    proxy.lose_next(done_for("moved.txt"));
    std::fs::rename(d1.path("r.txt"), d1.path("moved.txt")).unwrap();
    wait_until(DEADLINE, "the rename's reply to be lost", || proxy.cuts() == 3);
    wait_until(DEADLINE, "the client to reconnect", || {
        d1.activity().matches("connection to the server is back").count() == 3
    });
    // A barrier through the client's engine, which handles one thing at a time:
    // once this is answered, the resent rename has been answered too.
    d1.ok("get_sync_dir");
    want.insert("moved.txt".into(), b"renamed while its reply is lost".to_vec());
    assert_on_all(&[&s1, &s2, &s3], &want, "after the resent rename");
    assert_eq!(s1.log().matches("renamed user=alice from=r.txt to=moved.txt").count(), 1, "renamed twice");
    assert!(s1.stored("alice", "moved.txt").is_empty(), "the client fell back to an upload: the resend was refused");
}

/// Bounded memory with two backups, one of them stalled: the primary queues at
/// most 16 chunks for a backup and an upload waits for room at most the ack bound,
/// so a 128 MiB upload through it keeps its peak memory far below the file's size;
/// the upload completes (answered once the stalled backup was dropped) and the
/// backup catches up once it resumes.
#[test]
fn peak_memory_stays_bounded_with_two_backups_one_stalled() {
    const SIZE: u64 = 128 * 1024 * 1024;
    const BOUND_KIB: u64 = 64 * 1024;
    let t = TestDir::new("guarantee_memory_two_backups");
    let (s1, s2, mut s3) = three_servers(&t, &["--ack-timeout-ms", "3000"]);
    let mut d1 = Client::interactive(&t, "dev1", "alice", &s1, DEVICE1_IP);
    let outside = t.mkdir("outside");
    let src = outside.join("big.bin");
    write_seeded(&src, 9, SIZE);
    s3.proc.signal("STOP");
    d1.ok(&format!("upload {}", src.display()));
    assert!(dropped(&s1, 3) > 0, "the upload was answered while stalled backup s3 was still live");
    assert!(same_file(&src, &s2.user_dir("alice").join("big.bin")), "s2 lacks the answered upload");
    let kib = s1.proc.vm_hwm_kib();
    eprintln!("primary's peak memory (VmHWM): {kib} KiB");
    assert!(
        kib < BOUND_KIB,
        "the primary peaked at {kib} KiB while 128 MiB went to two backups (bound {BOUND_KIB} KiB)"
    );
    s3.proc.signal("CONT");
    wait_members(&[&s1, &s2, &s3], &[1, 2, 3]);
    wait_until(DEADLINE, "s3 to catch up with big.bin", || same_file(&src, &s3.user_dir("alice").join("big.bin")));
}
