//! Three servers (and a fourth): a primary on 127.0.0.1, backups on 127.0.0.2 and
//! 127.0.0.3, the two devices on 127.0.0.4 and 127.0.0.5.
//!
//! The sharpest check is "backups first": once a client reports a change done, or
//! once the other device has received it, every server in the membership already
//! holds it, so those checks are made at once, without waiting.

use crate::harness::cluster::*;
use crate::harness::files::{check_layout, contents, holds, put, seeded, write_seeded};
use crate::harness::raw::{frame_bytes, Raw};
use crate::harness::*;
use replibox_proto::{ContentHash, Msg, OpResult, Who, PROTOCOL_VERSION};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Puts `bytes` in `dir/name` and has device `d` `upload` it: its outcome line
/// comes once the server stored the file.
pub(crate) fn upload(d: &mut Client, dir: &Path, name: &str, bytes: &[u8]) {
    put(&dir.join(name), bytes);
    d.ok(&format!("upload {}", dir.join(name).display()));
}

/// Like [`upload`], with `len` seeded bytes written in pieces (for big files).
pub(crate) fn upload_seeded(d: &mut Client, dir: &Path, name: &str, seed: u64, len: u64) {
    write_seeded(&dir.join(name), seed, len);
    d.ok(&format!("upload {}", dir.join(name).display()));
}

/// Device `d` moves `from` to `to` in its sync dir; waits until the primary has.
fn rename_on(d: &Client, primary: &Server, from: &str, to: &str) {
    std::fs::rename(d.path(from), d.path(to)).unwrap();
    wait_until(DEADLINE, &format!("the rename of {from} to {to} on the primary"), || {
        primary.user_dir("alice").join(to).exists() && !primary.user_dir("alice").join(from).exists()
    });
}

/// Waits until `backup` holds exactly what `primary` holds.
#[track_caller]
fn wait_like_primary(primary: &Server, backup: &Server, what: &str) {
    let want = contents(&primary.user_dir("alice"));
    wait_trees(what, &[&backup.user_dir("alice")], &want);
}

/// Checks that `backup` caught up on the snapshot it joined with and the entries
/// after it: a backup that got stuck would be fenced and rejoin with a fresh
/// snapshot, which hides what a test of catching up is about.
#[track_caller]
fn assert_one_install(backup: &Server) {
    let log = backup.log();
    let installs = log.matches("installing snapshot").count();
    let name = &backup.opts.name;
    assert_eq!(installs, 1, "{name} should catch up on one snapshot and the entries after it (a second means it was fenced, or its session broke):\n{log}");
}

/// A primary holding a 200 MiB file of alice's, uploaded by an interactive device,
/// and the folder that device uploads from.
fn primary_with_bulk(t: &TestDir, seed: u64) -> (Server, Client, PathBuf) {
    let s1 = primary(t, &[]);
    let mut d1 = Client::interactive(t, "dev1", "alice", &s1, DEVICE1_IP);
    let outside = t.mkdir("outside");
    upload_seeded(&mut d1, &outside, "bulk.bin", seed, 200 * 1024 * 1024);
    (s1, d1, outside)
}

/// Backup s2, joining `s1` and caught while it fetches the snapshot's files.
fn backup_fetching(t: &TestDir, s1: &Server) -> Server {
    let s2 = backup(t, "s2", 2, s1.addr, Some(2), &[]);
    wait_until(DEADLINE, "s2 to start fetching the snapshot's files", || s2.log().contains("; fetching "));
    s2
}

/// Stops backup `s` (SIGSTOP) and checks that it was still catching up: a test of
/// what happens mid-catch-up proves nothing if the catch-up had already ended.
#[track_caller]
fn stop_while_catching_up(s: &mut Server) {
    s.proc.signal("STOP");
    let log = s.log();
    assert!(!log.contains("caught up to pos"), "{} had caught up before it was stopped:\n{log}", s.opts.name);
}

/// Every change a device makes is on all three servers, byte-identical, by the
/// time the client reports it done (upload/delete commands) or the other device
/// has received it (sync-dir changes, pushed only after every backup stored them).
#[test]
fn every_change_is_on_all_three_servers_when_the_client_reports_it() {
    let t = TestDir::new("repl_backups_first");
    let (s1, s2, s3) = three_servers(&t, &[]);
    let all = [&s1, &s2, &s3];
    let mut d1 = Client::interactive(&t, "dev1", "alice", &s1, DEVICE1_IP);
    let d2 = Client::headless(&t, "dev2", "alice", &s1, DEVICE2_IP);

    let outside = t.mkdir("outside");
    let report = seeded(7, 3 * 1024 * 1024 + 17);
    upload(&mut d1, &outside, "report.pdf", &report);
    for s in all {
        assert!(
            holds(&s.user_dir("alice").join("report.pdf"), &report),
            "{} lacks an acknowledged upload",
            s.opts.name
        );
    }
    let mut want = Want::new();
    want.insert("report.pdf".into(), report.clone());

    // Sync-dir changes: nested, empty, unicode, an edit, a rename and a delete.
    put(&d1.path("docs/ünï côde.txt"), b"first");
    put(&d1.path("empty"), b"");
    write_seeded(&d1.path("media/clip.bin"), 11, 9 * 1024 * 1024);
    want.insert("docs/ünï côde.txt".into(), b"first".to_vec());
    want.insert("empty".into(), Vec::new());
    want.insert("media/clip.bin".into(), seeded(11, 9 * 1024 * 1024));
    wait_trees("the new files on device 2", &[&d2.sync_dir], &want);
    assert_on_all(&all, &want, "after creates reached device 2");

    put(&d1.path("docs/ünï côde.txt"), b"second, longer");
    want.insert("docs/ünï côde.txt".into(), b"second, longer".to_vec());
    std::fs::rename(d1.path("media/clip.bin"), d1.path("clip moved.bin")).unwrap();
    let clip = want.remove("media/clip.bin").unwrap();
    want.insert("clip moved.bin".into(), clip);
    std::fs::remove_file(d1.path("empty")).unwrap();
    want.remove("empty");
    // media/, emptied by the move, stays on device 1: an empty folder, which syncs.
    wait_layout("the edit, rename and delete on device 2", &[&d2.sync_dir], &want, &["media"]);
    for s in all {
        check_layout(&s.user_dir("alice"), &want, &["media"])
            .unwrap_or_else(|e| fail(format!("after edits reached device 2, {} lacks them: {e}", s.opts.name)));
    }
    std::fs::remove_dir(d1.path("media")).unwrap();
    let users: Vec<std::path::PathBuf> = all.iter().map(|s| s.user_dir("alice")).collect();
    let mut roots: Vec<&Path> = users.iter().map(|u| u.as_path()).collect();
    roots.push(&d2.sync_dir);
    wait_layout("media/ removed on device 2 and every server", &roots, &want, &[]);

    d1.ok("delete report.pdf");
    want.remove("report.pdf");
    assert_on_all(&all, &want, "after the delete command reported done");
}

/// A backup killed with SIGKILL and restarted with `-b` catches up, including the
/// changes made while it was down; `--status` reports one membership everywhere.
#[test]
fn a_killed_backup_restarted_with_b_catches_up() {
    let t = TestDir::new("repl_backup_restart");
    let (s1, s2, mut s3) = three_servers(&t, &[]);
    let mut d1 = Client::interactive(&t, "dev1", "alice", &s1, DEVICE1_IP);
    let outside = t.mkdir("outside");
    for (name, seed) in [("before.bin", 1u64), ("gone.bin", 2)] {
        upload(&mut d1, &outside, name, &seeded(seed, 300_000));
    }

    s3.kill();
    wait_members(&[&s1, &s2], &[1, 2]);
    upload(&mut d1, &outside, "while down.bin", &seeded(3, 2_000_000));
    d1.ok("delete gone.bin");
    upload(&mut d1, &outside, "before.bin", b"changed while s3 was down");

    s3.restart(&t);
    wait_members(&[&s1, &s2, &s3], &[1, 2, 3]);
    let want = contents(&s1.user_dir("alice"));
    assert_eq!(want.len(), 2, "the primary should hold before.bin and 'while down.bin'");
    wait_trees("s3 to hold what the primary holds", &[&s3.user_dir("alice")], &want);
    assert!(s3.log().contains("fetching"), "the restarted backup should report what it fetched");
    // Only what it lacked or held at an older version crossed: 2 files, not 3.
    assert!(s3.log().contains("fetching 2 files"), "s3 fetched more than it lacked:\n{}", s3.log());
}

/// A fourth server joining a cluster that holds files (through a backup, which
/// points it at the primary, and without --id) receives them, gets the next id, and
/// is then kept up to date like the others.
#[test]
fn a_fourth_server_joining_through_a_backup_receives_everything() {
    let t = TestDir::new("repl_fourth_joins");
    let (s1, s2, s3) = three_servers(&t, &[]);
    let mut d1 = Client::interactive(&t, "dev1", "alice", &s1, DEVICE1_IP);
    let outside = t.mkdir("outside");
    for i in 0..5u64 {
        let name = format!("f{i}.bin");
        upload(&mut d1, &outside, &name, &seeded(i, 100_000 * (i as usize + 1)));
    }

    let s4 = backup(&t, "s4", 6, s2.addr, None, &[]);
    wait_members(&[&s1, &s2, &s3, &s4], &[1, 2, 3, 4]);
    wait_like_primary(&s1, &s4, "s4 to hold the cluster's files");
    let id = std::fs::read_to_string(s4.data.join("server.json")).unwrap_or_default();
    assert!(id.contains("\"id\":4"), "s4 should keep its assigned id 4 in its data dir, has {id:?}");

    upload(&mut d1, &outside, "late.bin", b"after the fourth joined");
    assert!(
        holds(&s4.user_dir("alice").join("late.bin"), b"after the fourth joined"),
        "s4 missed an acknowledged change"
    );
}

/// A backup that stops answering (SIGSTOP) is dropped after the ack bound and
/// fenced; once its fence goes unanswered the primary goes on without it (it stays
/// listed as a member, silent); resumed, it rejoins and catches up.
#[test]
fn a_stalled_backup_is_dropped_and_the_primary_goes_on() {
    let t = TestDir::new("repl_stalled_backup");
    let bound = ["--ack-timeout-ms", "1000"];
    let (s1, mut s2, s3) = three_servers(&t, &bound);
    let mut d1 = Client::interactive(&t, "dev1", "alice", &s1, DEVICE1_IP);
    let outside = t.mkdir("outside");

    s2.proc.signal("STOP");
    upload(&mut d1, &outside, "while stalled.bin", &seeded(5, 1_500_000));
    assert!(holds(&s3.user_dir("alice").join("while stalled.bin"), &seeded(5, 1_500_000)), "s3 lacks the upload");
    assert!(s1.log().contains("dropping backup id=2"), "the primary should log why it dropped s2");
    // Silent (not down), it stays listed in the membership, so that an election
    // must still ask it (docs/reliability.md, finding 7), but nothing waits for it.
    wait_until(DEADLINE, "the primary to go on without the stalled s2", || {
        s1.log().contains("going on without backup id=2")
    });
    assert_eq!(members(&s1), Some(vec![1, 2, 3]), "a silent backup stays listed until it comes back");
    upload(&mut d1, &outside, "after the fence.bin", &seeded(6, 1000));
    assert!(holds(&s3.user_dir("alice").join("after the fence.bin"), &seeded(6, 1000)), "s3 lacks the upload");

    s2.proc.signal("CONT");
    wait_members(&[&s1, &s2, &s3], &[1, 2, 3]);
    wait_like_primary(&s1, &s2, "s2 to catch up after it resumed");
}

/// A client started with a backup's address is sent to the primary; a server
/// joining with a duplicate id is refused with a clear message and exits.
#[test]
fn a_backup_redirects_clients_and_refuses_a_duplicate_id() {
    let t = TestDir::new("repl_redirect_dup");
    let s1 = primary(&t, &[]);
    let s2 = backup(&t, "s2", 2, s1.addr, Some(2), &[]);
    wait_members(&[&s1, &s2], &[1, 2]);
    let d1 = Client::headless(&t, "dev1", "alice", &s2, DEVICE1_IP);
    assert!(
        d1.proc.stderr().contains(&format!("at {}", s1.addr)),
        "the client should say it is logged in at the primary {}:\n{}",
        s1.addr,
        d1.proc.stderr()
    );
    put(&d1.path("hello.txt"), b"via a backup's address");
    let mut want = Want::new();
    want.insert("hello.txt".into(), b"via a backup's address".to_vec());
    wait_trees("the file on both servers", &[&s1.user_dir("alice"), &s2.user_dir("alice")], &want);

    let port = free_port(ip(3));
    let mut cmd = Command::new(server_bin());
    cmd.args(["-b", &s1.addr.to_string(), "--id", "2", "--port", &port.to_string(), "--bind", "127.0.0.3", "--data"])
        .arg(t.join("dup-data"))
        .arg("--key-file")
        .arg(t.key_file());
    let mut dup = Proc::spawn(&t, "dup", cmd, false);
    let code = dup.wait_exit(DEADLINE);
    assert_eq!(code.code(), Some(1), "a refused join must make the joiner exit with 1, not {code}");
    assert!(dup.stderr().contains("already in the cluster"), "no clear message:\n{}", dup.stderr());
    assert!(!t.join("dup-data/server.json").exists(), "a refused joiner must not keep the id it asked for");
    wait_members(&[&s1, &s2], &[1, 2]);
}

/// Peers that do not behave on the server port: a join that turns to garbage, a
/// frame with a stale epoch, a non-protocol speaker. Each is dropped with a logged
/// reason and the primary keeps serving.
#[test]
fn misbehaving_peers_are_dropped_and_the_primary_keeps_serving() {
    let t = TestDir::new("repl_bad_peers");
    let s1 = primary(&t, &[]);
    let s2 = backup(&t, "s2", 2, s1.addr, Some(2), &[]);
    wait_members(&[&s1, &s2], &[1, 2]);

    let mut http = Raw::connect(s1.addr, "an HTTP client");
    http.send_bytes(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    http.wait_closed(DEADLINE);

    // A member gone wrong: it holds the key and connects from the address it claims.
    let (mut fake, proven) = Raw::server(
        s1.addr,
        Some(ip(9)),
        &t.key(),
        Some(replibox_proto::ServerId(9)),
        replibox_proto::Purpose::Link,
        "a fake backup",
    );
    proven.unwrap_or_else(|e| fail(format!("the fake backup's handshake: {e}")));
    let who = Who::Server {
        id: Some(replibox_proto::ServerId(9)),
        ip: Some("127.0.0.9".into()),
        port: 1,
        // A history no primary holds: it gets a snapshot.
        pos: replibox_proto::LogPos(0),
        last_epoch: replibox_proto::Epoch(u64::MAX),
        member: false,
    };
    fake.send(&Msg::Hello { version: PROTOCOL_VERSION, who });
    // An ack stamped with epoch 0, older than the cluster's: dropped with a reason.
    fake.send_bytes(&frame_bytes(r#"{"epoch":0,"msg":{"kind":"ack","pos":1}}"#));
    wait_until(DEADLINE, "the primary to log the stale frame", || s1.log().contains("stale epoch"));
    fake.send_bytes(b"\x00\x00\x00\x05garbage and more garbage");
    wait_until(DEADLINE, "the primary to drop the fake backup", || s1.log().contains("dropping backup id=9"));

    // A fetch connection claiming to be a backup that is not one reads nothing.
    let d0 = Client::headless(&t, "dev0", "alice", &s1, DEVICE2_IP);
    put(&d0.path("secret.txt"), b"alice's");
    wait_until(DEADLINE, "secret.txt on the primary", || s1.user_dir("alice").join("secret.txt").exists());
    let mut thief = Raw::authenticated(
        s1.addr,
        &t.key(),
        Some(replibox_proto::ServerId(77)),
        replibox_proto::Purpose::Fetch,
        "a fetch from a non-member",
    );
    thief.send(&Msg::Hello { version: PROTOCOL_VERSION, who: Who::Fetch { id: replibox_proto::ServerId(77) } });
    thief.send(&Msg::Fetch { user: "alice".into(), path: "secret.txt".into() });
    match thief.recv().map(|f| f.msg) {
        Some(Msg::Reply { result: replibox_proto::OpResult::Error { .. }, .. }) => {}
        other => fail(format!("a non-member's fetch was answered with {other:?}")),
    }
    assert!(s1.log().contains("refused fetch"), "the refused fetch should be logged");
    drop(d0);

    // Still serving: a device logs in through the primary and its file reaches s2.
    let d1 = Client::headless(&t, "dev1", "alice", &s1, DEVICE1_IP);
    put(&d1.path("still.txt"), b"still serving");
    let mut want = Want::new();
    want.insert("still.txt".into(), b"still serving".to_vec());
    want.insert("secret.txt".into(), b"alice's".to_vec());
    wait_trees("the file on both servers", &[&s1.user_dir("alice"), &s2.user_dir("alice")], &want);
    wait_members(&[&s1, &s2], &[1, 2]);
}

/// A backup that joins while an upload is under way (it gets none of the upload's
/// forwarded chunks and must fetch the content when the upload's entry comes) ends
/// byte-identical, and holds the file by the time the upload is answered, since it
/// was live by then. The uploading device is driven by hand so that the upload
/// provably spans the join: part of the bytes go before the third server starts,
/// the rest once it has caught up.
#[test]
fn a_backup_joining_during_a_big_upload_ends_identical() {
    let t = TestDir::new("repl_join_during_upload");
    let s1 = primary(&t, &[]);
    let s2 = backup(&t, "s2", 2, s1.addr, Some(2), &[]);
    wait_members(&[&s1, &s2], &[1, 2]);
    let mut d1 = Raw::login(s1.addr, "alice", "00000000000000a1", "device 1 (raw)");
    let d2 = Client::headless(&t, "dev2", "alice", &s1, DEVICE2_IP);
    let bytes = seeded(21, 8 * 1024 * 1024 + 5);
    let (before, after) = bytes.split_at(3 * 1024 * 1024);
    let seq = d1.begin_upload("big.bin", bytes.len() as u64, None).unwrap_or_else(|r| fail(format!("refused: {r:?}")));
    d1.send_chunks(seq, before);
    wait_until(DEADLINE, "the first part of the upload in the primary's tmp/", || {
        files::tree(&s1.tmp_dir()).files.values().any(|&n| n == before.len() as u64)
    });
    let s3 = backup(&t, "s3", 3, s1.addr, Some(3), &[]);
    wait_members(&[&s1, &s2, &s3], &[1, 2, 3]);
    d1.send_chunks(seq, after);
    match d1.end_upload(seq, ContentHash::of(&bytes)) {
        OpResult::Done { .. } => {}
        other => fail(format!("the upload was answered {other:?}")),
    }
    let mut want = Want::new();
    want.insert("big.bin".into(), bytes);
    assert_on_all(&[&s1, &s2, &s3], &want, "when the upload was answered");
    // The scenario: the third server joined after the upload began and before it
    // was committed.
    let log = s1.log();
    let joined = log.find("backup joining id=3").unwrap_or_else(|| fail("the primary did not log s3's join"));
    let stored =
        log.find("stored user=alice path=big.bin").unwrap_or_else(|| fail("the primary did not log the upload"));
    assert!(joined < stored, "s3 joined after the upload was committed, not during it");
    wait_trees("big.bin on device 2", &[&d2.sync_dir], &want);
}

/// The answer to an upload waits for every live backup: with one backup stalled
/// (and a long ack bound, so it is not dropped), the other backup already holds
/// the file while the client still has no answer; once the stalled one resumes,
/// the answer comes and that backup holds the file too.
#[test]
fn an_upload_is_not_answered_while_a_live_backup_lacks_it() {
    let t = TestDir::new("repl_answer_waits");
    let bound = ["--ack-timeout-ms", "60000"];
    let (s1, s2, mut s3) = three_servers(&t, &bound);
    let mut d1 = Client::interactive(&t, "dev1", "alice", &s1, DEVICE1_IP);
    let outside = t.mkdir("outside");
    let bytes = seeded(31, 700_000);
    put(&outside.join("slow.bin"), &bytes);

    s3.proc.signal("STOP");
    d1.proc.send_line(&format!("upload {}", outside.join("slow.bin").display()));
    wait_until(DEADLINE, "s2 to hold slow.bin", || holds(&s2.user_dir("alice").join("slow.bin"), &bytes));
    assert!(
        !d1.proc.stdout().contains("uploaded slow.bin"),
        "the client was answered while backup s3 (live, stalled) did not hold the file"
    );
    s3.proc.signal("CONT");
    wait_until(DEADLINE, "the upload's answer", || d1.proc.stdout().contains("uploaded slow.bin"));
    assert!(holds(&s3.user_dir("alice").join("slow.bin"), &bytes), "answered before s3 stored the file");
    wait_members(&[&s1, &s2, &s3], &[1, 2, 3]);
}

/// A backup still catching up (stopped while it fetches a big file) is sent an
/// upload's entry without its chunks, and the upload is renamed before the backup
/// resumes: it can no longer fetch the file under its first name, and must fetch it
/// under the name the rename gives it. It ends byte-identical.
#[test]
fn a_backup_catching_up_gets_a_file_renamed_before_it_could_fetch_it() {
    let t = TestDir::new("repl_rename_before_fetch");
    let (s1, mut d1, outside) = primary_with_bulk(&t, 41);
    let mut s2 = backup_fetching(&t, &s1);
    stop_while_catching_up(&mut s2);
    upload(&mut d1, &outside, "x.bin", &seeded(42, 500_000));
    rename_on(&d1, &s1, "x.bin", "y.bin");
    s2.proc.signal("CONT");
    wait_members(&[&s1, &s2], &[1, 2]);
    wait_like_primary(&s1, &s2, "s2 to hold what the primary holds");
    assert_one_install(&s2);
}

/// Backups started before their primary: one joins through the other, which does
/// not know the primary yet; both keep trying (neither gives up) and both join
/// once the primary starts.
#[test]
fn backups_started_before_the_primary_join_when_it_comes() {
    let t = TestDir::new("repl_backups_first_start");
    let port = free_port(SERVER_IP);
    let future = ServerOpts { port: Some(port), ..primary_opts(&[]) };
    let s2 = backup(&t, "s2", 2, std::net::SocketAddr::new(SERVER_IP, port), Some(2), &[]);
    let s3 = backup(&t, "s3", 3, s2.addr, Some(3), &[]);
    wait_until(DEADLINE, "s2 to turn s3's join away", || s2.log().contains("does not know the primary yet"));
    let s1 = Server::start(&t, future);
    wait_members(&[&s1, &s2, &s3], &[1, 2, 3]);
}

/// Like the test above, but the uploaded file already existed (v1) on the backup
/// when it joined: the rename's source then exists with stale content. The backup
/// must not rename v1 into the new name; it ends byte-identical. (Found in review.)
#[test]
fn a_backup_catching_up_never_renames_a_stale_copy_into_place() {
    let t = TestDir::new("repl_rename_stale_source");
    let (s1, mut d1, outside) = primary_with_bulk(&t, 41);
    upload(&mut d1, &outside, "a.bin", &seeded(40, 300_000));
    let mut s2 = backup_fetching(&t, &s1);
    // The snapshot's files are fetched in name order: a.bin before bulk.bin.
    wait_until(DEADLINE, "s2 to hold a.bin and be fetching bulk.bin", || s2.user_dir("alice").join("a.bin").exists());
    stop_while_catching_up(&mut s2);
    upload(&mut d1, &outside, "a.bin", &seeded(42, 500_000));
    rename_on(&d1, &s1, "a.bin", "c.bin");
    s2.proc.signal("CONT");
    wait_members(&[&s1, &s2], &[1, 2]);
    wait_like_primary(&s1, &s2, "s2 to hold what the primary holds");
    assert_one_install(&s2);
}

/// A backup comes back holding an older copy of z.bin; the snapshot it joins with
/// has a newer one, renamed to c.bin before the backup could fetch it (it fetches
/// in name order, and is stopped while it fetches bulk.bin). The fetch is refused,
/// so the install reports z.bin lacking; the rename's entry comes next. The old
/// copy must count as missing, never as the rename's source: the backup fetches
/// c.bin and ends byte-identical. (Found by the chaos test, seed 80434042: the
/// follower checked the disk before the core had dropped the old copy.)
#[test]
fn a_backup_back_with_an_old_copy_gets_a_file_renamed_before_it_could_fetch_it() {
    let t = TestDir::new("repl_rename_old_copy");
    let s1 = primary(&t, &[]);
    let mut s2 = backup(&t, "s2", 2, s1.addr, Some(2), &[]);
    wait_members(&[&s1, &s2], &[1, 2]);
    let mut d1 = Client::interactive(&t, "dev1", "alice", &s1, DEVICE1_IP);
    let outside = t.mkdir("outside");
    upload(&mut d1, &outside, "z.bin", &seeded(40, 300_000));
    s2.kill();
    // No longer a member: it comes back through a snapshot, not entries.
    wait_members(&[&s1], &[1]);
    upload_seeded(&mut d1, &outside, "bulk.bin", 41, 200 * 1024 * 1024);
    upload(&mut d1, &outside, "z.bin", &seeded(42, 500_000));
    s2.restart(&t);
    wait_until(DEADLINE, "s2 to start fetching the snapshot's files", || s2.log().contains("; fetching 2 files"));
    stop_while_catching_up(&mut s2);
    let old = s2.user_dir("alice").join("z.bin");
    assert!(holds(&old, &seeded(40, 300_000)), "s2 should still hold its old copy of z.bin");
    rename_on(&d1, &s1, "z.bin", "c.bin");
    s2.proc.signal("CONT");
    wait_members(&[&s1, &s2], &[1, 2]);
    wait_like_primary(&s1, &s2, "s2 to hold what the primary holds");
    assert_one_install(&s2);
    let log = s2.log();
    assert!(log.contains("primary no longer has z.bin"), "s2's fetch of z.bin should have been refused:\n{log}");
}

/// Like the test above, but what the backup holds at z's path is a folder (z was
/// one when the backup left; then device 1 put a file there). A folder is never
/// what a rename moves: the backup must not take it for the renamed file's
/// source, and fetches c.bin. (Found in review.)
#[test]
fn a_backup_back_with_a_folder_where_a_renamed_file_was_gets_the_file() {
    let t = TestDir::new("repl_rename_old_folder");
    let s1 = primary(&t, &[]);
    let mut s2 = backup(&t, "s2", 2, s1.addr, Some(2), &[]);
    wait_members(&[&s1, &s2], &[1, 2]);
    let mut d1 = Client::interactive(&t, "dev1", "alice", &s1, DEVICE1_IP);
    let outside = t.mkdir("outside");
    std::fs::create_dir(d1.path("z")).unwrap();
    wait_until(DEADLINE, "s2 to hold the folder z", || s2.user_dir("alice").join("z").is_dir());
    s2.kill();
    wait_members(&[&s1], &[1]);
    upload_seeded(&mut d1, &outside, "bulk.bin", 41, 200 * 1024 * 1024);
    std::fs::remove_dir(d1.path("z")).unwrap();
    let bytes = seeded(42, 500_000);
    put(&d1.path("z"), &bytes);
    wait_until(DEADLINE, "the primary to hold the file z", || holds(&s1.user_dir("alice").join("z"), &bytes));
    s2.restart(&t);
    wait_until(DEADLINE, "s2 to start fetching the snapshot's files", || s2.log().contains("; fetching 2 files"));
    stop_while_catching_up(&mut s2);
    assert!(s2.user_dir("alice").join("z").is_dir(), "s2 should still hold the folder z");
    rename_on(&d1, &s1, "z", "c.bin");
    s2.proc.signal("CONT");
    wait_members(&[&s1, &s2], &[1, 2]);
    wait_like_primary(&s1, &s2, "s2 to hold what the primary holds");
    assert_one_install(&s2);
    let log = s2.log();
    assert!(log.contains("primary no longer has z "), "s2's fetch of z should have been refused:\n{log}");
}

/// A backup killed while it installs a snapshot (its state already describes files
/// it has not fetched) refuses to start as primary, which would serve or adopt
/// what it lacks; started again with `-b`, it finishes catching up.
#[test]
fn a_backup_killed_mid_install_refuses_to_start_as_primary() {
    let t = TestDir::new("repl_killed_mid_install");
    let (s1, _d1, _outside) = primary_with_bulk(&t, 51);
    let mut s2 = backup_fetching(&t, &s1);
    s2.kill();
    assert!(s2.data.join("meta/installing").exists(), "the unfinished install should be marked on disk");

    let port = free_port(ip(2));
    let mut cmd = Command::new(server_bin());
    cmd.args(["-p", "--id", "2", "--bind", "127.0.0.2", "--port", &port.to_string(), "--data"]).arg(&s2.data);
    let mut as_primary = Proc::spawn(&t, "s2-as-primary", cmd, false);
    let code = as_primary.wait_exit(DEADLINE);
    assert_eq!(code.code(), Some(1), "a data dir killed mid-install must not start as primary, and exit with 1");
    assert!(as_primary.stderr().contains("stopped while joining"), "no clear reason:\n{}", as_primary.stderr());

    s2.restart(&t);
    wait_members(&[&s1, &s2], &[1, 2]);
    wait_like_primary(&s1, &s2, "s2 to finish catching up");
    wait_until(DEADLINE, "the install marker to go", || !s2.data.join("meta/installing").exists());
}

/// A backup that takes the upload's chunks more slowly than the client sends them
/// (but answers every heartbeat and entry at once) keeps receiving heartbeats while
/// a big upload fills its link, and is not dropped as silent. (Found in review: the
/// link's writer used to drain the whole data queue before any control message.)
#[test]
fn a_slow_backup_still_gets_heartbeats_during_a_big_upload() {
    use replibox_proto::repl::Change;
    let t = TestDir::new("repl_slow_backup");
    // The default ack bound: a backup starved of heartbeats for longer is dropped.
    // The upload below takes the slow backup about 3 s, longer than the bound: that
    // is what the size is for.
    let s1 = primary(&t, &["--ack-timeout-ms", "2000"]);
    let addr = s1.addr;
    let key = t.key();
    let fake = std::thread::spawn(move || {
        let id = Some(replibox_proto::ServerId(9));
        let (mut r, proven) = Raw::server(addr, Some(ip(9)), &key, id, replibox_proto::Purpose::Link, "a slow backup");
        proven.expect("the slow backup's handshake");
        let who = Who::Server {
            id: Some(replibox_proto::ServerId(9)),
            ip: Some("127.0.0.9".into()),
            port: 1,
            // A history no primary holds: it gets a snapshot.
            pos: replibox_proto::LogPos(0),
            last_epoch: replibox_proto::Epoch(u64::MAX),
            member: false,
        };
        r.send(&Msg::Hello { version: PROTOCOL_VERSION, who });
        let (epoch, mut last) = loop {
            let f = r.recv().expect("the primary closed the link during the join");
            if let Msg::SnapshotEnd { pos } = f.msg {
                break (f.epoch, pos);
            }
        };
        r.send_at(epoch, &Msg::CaughtUp { pos: last });
        let (mut chunks, mut heartbeats_mid_upload) = (0u64, 0u64);
        loop {
            let Some(f) = r.recv() else { return (heartbeats_mid_upload, false, None) };
            match f.msg {
                Msg::XferChunk { .. } => {
                    chunks += 1;
                    // About 20 MB/s: slower than the upload over loopback.
                    std::thread::sleep(std::time::Duration::from_micros(f.payload.len() as u64 / 20));
                }
                Msg::Heartbeat { .. } => {
                    if chunks > 0 {
                        heartbeats_mid_upload += 1;
                    }
                    r.send_at(epoch, &Msg::Ack { pos: last });
                }
                Msg::Apply { entry } => {
                    last = entry.pos;
                    r.send_at(epoch, &Msg::Ack { pos: last });
                    if matches!(entry.change, Change::Put { .. }) {
                        // Handed back so that the link stays open while the test checks.
                        return (heartbeats_mid_upload, true, Some(r));
                    }
                }
                _ => {}
            }
        }
    });
    wait_members(&[&s1], &[1, 9]);
    let mut d1 = Client::interactive(&t, "dev1", "alice", &s1, DEVICE1_IP);
    let outside = t.mkdir("outside");
    upload_seeded(&mut d1, &outside, "big.bin", 61, 64 * 1024 * 1024);
    let (heartbeats, stayed, link) = fake.join().unwrap_or_else(|_| fail("the slow backup's thread failed"));
    assert!(stayed, "the slow backup's link was closed during the upload");
    assert!(heartbeats > 0, "no heartbeat reached the slow backup while the upload filled its link");
    assert!(!s1.log().contains("dropping backup id=9"), "the slow backup was dropped:\n{}", s1.log());
    wait_members(&[&s1], &[1, 9]);
    drop(link);
}

/// Every read from a peer has a timeout, a joining backup's link included: a
/// joiner that stops (SIGSTOP) in the middle of catching up is dropped by the
/// primary, and once resumed it joins again and catches up.
#[test]
fn a_joiner_that_stops_while_catching_up_is_dropped_then_rejoins() {
    let t = TestDir::new("repl_stalled_joiner");
    let (s1, _d1, _outside) = primary_with_bulk(&t, 71);
    let mut s2 = backup_fetching(&t, &s1);
    stop_while_catching_up(&mut s2);
    wait_until(DEADLINE, "the primary to drop the silent joiner", || s1.log().contains("dropping backup id=2"));
    s2.proc.signal("CONT");
    wait_members(&[&s1, &s2], &[1, 2]);
    wait_like_primary(&s1, &s2, "s2 to catch up after it resumed");
}

/// The primary restarts while a backup fetches the snapshot's files: the restarted
/// primary refuses the old link's fetches. A refusal says nothing about a file, so
/// the backup must keep its copies and its unfinished-install mark, not take them
/// for files the primary moved on from; it joins again and ends identical. (Found
/// in review.)
#[test]
fn a_refused_fetch_is_not_taken_for_a_file_gone() {
    let t = TestDir::new("repl_refused_fetch");
    let mut opts = primary_opts(&[]);
    let data = t.join("s1-data");
    for i in 0..100u64 {
        write_seeded(&data.join(format!("users/alice/f{i:03}.bin")), 100 + i, 4 * 1024 * 1024);
    }
    opts.data = Some(data);
    let mut s1 = Server::start(&t, opts);
    let mut s2 = backup(&t, "s2", 2, s1.addr, Some(2), &[]);
    wait_until(DEADLINE, "s2 to start fetching the snapshot's files", || s2.log().contains("fetching 100 files"));
    stop_while_catching_up(&mut s2);
    s1.restart(&t);
    s2.proc.signal("CONT");
    wait_members(&[&s1, &s2], &[1, 2]);
    let want = contents(&s1.user_dir("alice"));
    assert_eq!(want.len(), 100);
    wait_trees("s2 to hold what the primary holds", &[&s2.user_dir("alice")], &want);
    // The scenario: the restarted primary did refuse a fetch of the old session.
    assert!(s1.log().contains("refused fetch"), "the restarted primary refused no fetch:\n{}", s1.log());
    assert!(!s2.log().contains("dropping local copy"), "s2 dropped files over a refused fetch:\n{}", s2.log());
    wait_until(DEADLINE, "the install marker to go", || !s2.data.join("meta/installing").exists());
}

/// A primary whose stored copy no longer matches its state (changed on disk behind
/// its back, same size and mtime) sends those bytes to a backup fetching the file:
/// the backup refuses them, since they are not the version its state would then
/// describe, rather than store them as that version.
#[test]
fn a_backup_refuses_fetched_bytes_that_are_not_the_version_announced() {
    use std::os::unix::fs::FileExt;
    let t = TestDir::new("repl_fetch_damaged");
    let mut opts = primary_opts(&[]);
    let data = t.join("s1-data");
    let stored = data.join("users/alice/f.bin");
    write_seeded(&stored, 7, 64 * 1024);
    opts.data = Some(data);
    let s1 = Server::start(&t, opts);
    wait_until(DEADLINE, "s1 to adopt f.bin", || s1.log().contains("f.bin"));
    let mtime = std::fs::metadata(&stored).unwrap().modified().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&stored).unwrap();
    f.write_all_at(b"not the bytes the state describes", 1000).unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    let s2 = backup(&t, "s2", 2, s1.addr, Some(2), &[]);
    wait_until(DEADLINE, "s2 to refuse the damaged fetch", || s2.log().contains("f.bin of user alice arrived damaged"));
    let on_s2 = std::fs::read(s2.user_dir("alice").join("f.bin")).ok();
    assert!(on_s2.is_none_or(|b| b != std::fs::read(&stored).unwrap()), "s2 stored bytes that are not the version");
}
