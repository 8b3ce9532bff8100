//! Confinement against hostile peers: a client does not rest its sync dir on the
//! server's good behaviour, nor a backup its data dir on the primary's. Here the
//! peer is a fake that sends `..`, absolute and reserved paths, bad usernames and
//! bad transfer names, and every file that would land outside is watched for.
//!
//! Also here, because only a fake primary can see exactly when an ack leaves a
//! backup: a backup acknowledges an entry only once it is in its log and its file
//! is in place.

use crate::harness::cluster::*;
use crate::harness::fake::{meta_of, FakePrimary, FakeServer};
use crate::harness::files::{holds, put, tree};
use crate::harness::raw::Raw;
use crate::harness::*;
use replibox_proto::repl::{Change, Entry};
use replibox_proto::{write_frame, ContentHash, Epoch, FileMeta, LogPos, Msg, Notice, ServerId, Version};
use std::collections::BTreeMap;
use std::path::Path;

/// Files anywhere in the test dir whose name says they escaped.
fn escaped(root: &Path) -> Vec<String> {
    tree(root)
        .files
        .into_keys()
        .filter(|p| p.contains("escape") || p.contains("moved-out") || p.contains("stolen"))
        .collect()
}

fn tombstone(path: &str, version: u64) -> FileMeta {
    FileMeta { size: 0, deleted: true, hash: ContentHash::default(), version: Version(version), ..meta_of(path, b"") }
}

/// A fake server lists, and pushes in notices, paths that leave the sync dir
/// (`..`, absolute) or name the client's own state (`.replibox`): the client
/// downloads, writes, moves and deletes none of them, and goes on syncing the valid
/// ones.
#[test]
fn a_hostile_server_cannot_make_a_client_write_move_or_delete_outside_its_sync_dir() {
    let t = TestDir::new("hostile_server");
    let precious = t.join("precious.txt");
    put(&precious, b"must survive");
    let absolute = t.join("escape-absolute.txt").to_str().unwrap().to_string();
    let hostile = b"bytes from a hostile server".to_vec();
    let mut files = BTreeMap::new();
    files.insert("ok/seed.txt".to_string(), b"a valid file".to_vec());
    for bad in [
        "../escape-listing.txt",
        "ok/../../escape-dotdot.txt",
        absolute.as_str(),
        ".replibox/index.json",
        "ok/.replibox/escape-reserved.txt",
        "ok\\..\\..\\escape-backslash.txt",
    ] {
        files.insert(bad.to_string(), hostile.clone());
    }
    let fake = FakeServer::start(SERVER_IP, files);
    let d1 = Client::spawn(&t, ClientOpts::at("dev1", "alice", fake.addr, DEVICE1_IP));
    d1.wait_logged_in();
    assert!(holds(&d1.path("ok/seed.txt"), b"a valid file"), "the valid file of the listing was not synced");
    let device = std::fs::read(d1.sync_dir.join(".replibox/device")).unwrap();

    for bad in ["../escape-put.txt", "ok/../../escape-put-dotdot.txt", ".replibox/device"] {
        fake.add(bad, &hostile);
        fake.push(Notice::Put { meta: meta_of(bad, &hostile) });
    }
    let abs_put = t.join("escape-absolute-put.txt").to_str().unwrap().to_string();
    fake.add(&abs_put, &hostile);
    fake.push(Notice::Put { meta: meta_of(&abs_put, &hostile) });
    fake.push(Notice::Delete { meta: tombstone("../precious.txt", 2) });
    fake.push(Notice::Delete { meta: tombstone(precious.to_str().unwrap(), 2) });
    // A valid file moved out, and a file outside moved in.
    let out = FileMeta { version: Version(2), ..meta_of("../moved-out.txt", b"a valid file") };
    fake.push(Notice::Rename { from: "ok/seed.txt".into(), meta: out });
    fake.add("stolen.txt", b"must survive");
    fake.push(Notice::Rename { from: "../precious.txt".into(), meta: meta_of("stolen.txt", b"must survive") });
    // A barrier: the client handles notices in order.
    fake.add("ok/barrier.txt", b"after the hostile notices");
    fake.push(Notice::Put { meta: meta_of("ok/barrier.txt", b"after the hostile notices") });
    wait_until(DEADLINE, "the barrier file on the client", || {
        holds(&d1.path("ok/barrier.txt"), b"after the hostile notices")
    });

    assert_eq!(escaped(&t.path), Vec::<String>::new(), "files written outside the sync dir (or moved there)");
    assert!(!Path::new(&absolute).exists() && !Path::new(&abs_put).exists(), "a file written at an absolute path");
    assert!(holds(&precious, b"must survive"), "a file outside the sync dir was deleted or changed");
    assert!(holds(&d1.path("ok/seed.txt"), b"a valid file"), "a file was moved out of the sync dir");
    assert_eq!(std::fs::read(d1.sync_dir.join(".replibox/device")).unwrap(), device, "the device id was overwritten");
    // The index is written at most every 500 ms: wait for it, then check it.
    let index_path = d1.sync_dir.join(".replibox/index.json");
    wait_until(DEADLINE, "the index to be written", || index_path.exists());
    let index = std::fs::read(&index_path).unwrap();
    assert!(serde_json::from_slice::<serde_json::Value>(&index).is_ok(), "the index was overwritten");
    let mut d1 = d1;
    assert!(d1.proc.running(), "the client gave up");
}

/// A good snapshot from the fake primary: no files, epoch 1, the two servers.
fn snapshot(fake: &FakePrimary, backup: &Server, files: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "seq": 10,
        "files": files,
        "sessions": {},
        "requests": {},
        "epoch": 1,
        "primary": 1,
        "members": {
            "1": {"id": 1, "addr": fake.addr.to_string()},
            "2": {"id": 2, "addr": backup.addr.to_string()},
        },
        "max_id": 2,
    })
}

/// Answers the backup's next join with `snapshot`; returns the link.
fn join_with(fake: &FakePrimary, snapshot: &serde_json::Value) -> Raw {
    let (mut link, _who) = fake.next_link();
    link.send_at(Epoch(1), &Msg::Joined { id: ServerId(2), primary: ServerId(1), snapshot: true, member: false });
    link.send_with_at(Epoch(1), &Msg::SnapshotChunk, &serde_json::to_vec(snapshot).unwrap());
    link.send_at(Epoch(1), &Msg::SnapshotEnd { pos: LogPos(10) });
    link
}

/// Reads the link until the backup says it caught up.
fn caught_up(link: &mut Raw) {
    loop {
        match link.recv().map(|f| f.msg) {
            Some(Msg::CaughtUp { .. }) => return,
            Some(Msg::Ping) => {}
            other => fail(format!("expected caught_up from the backup, got {other:?}")),
        }
    }
}

/// Forwards an upload's bytes on the link, as a primary does before its entry.
fn forward(link: &mut Raw, xfer: &str, bytes: &[u8]) {
    link.send_with_at(Epoch(1), &Msg::XferChunk { xfer: xfer.into() }, bytes);
    link.send_at(Epoch(1), &Msg::XferEnd { xfer: xfer.into(), size: bytes.len() as u64, hash: ContentHash::of(bytes) });
}

fn apply(link: &mut Raw, seq: u64, change: Change) {
    link.send_at(
        Epoch(1),
        &Msg::Apply { entry: Box::new(Entry { pos: LogPos(seq), epoch: Epoch(1), change, request: None }) },
    );
}

/// A fake primary sends a backup snapshots and entries whose users, paths or
/// transfer names leave the data dir: the backup refuses each (it ends the link and
/// joins again) and nothing is written, moved or removed outside its data dir.
#[test]
fn a_hostile_primary_cannot_make_a_backup_write_move_or_delete_outside_its_data_dir() {
    let t = TestDir::new("hostile_primary");
    let precious = t.join("precious.txt");
    put(&precious, b"must survive");
    let fake = FakePrimary::start(&t, SERVER_IP);
    let s2 = backup(&t, "s2", 2, fake.addr, Some(2), &[]);
    let content = FakePrimary::CONTENT;
    let live = |path: &str| serde_json::to_value(meta_of(path, content)).unwrap();
    let good = snapshot(&fake, &s2, serde_json::json!({}));
    let alice = |meta: FileMeta| (String::from("alice"), meta);

    type Case<'a> = (&'a str, serde_json::Value, Box<dyn Fn(&mut Raw) + 'a>);
    let cases: Vec<Case> = vec![
        (
            "a snapshot with a path leaving the data dir",
            snapshot(
                &fake,
                &s2,
                serde_json::json!({"alice": {"../../../escape-snapshot.txt": live("../../../escape-snapshot.txt")}}),
            ),
            Box::new(|_| {}),
        ),
        (
            "a snapshot with a username leaving users/",
            snapshot(&fake, &s2, serde_json::json!({"../../escape-user": {"x.txt": live("x.txt")}})),
            Box::new(|_| {}),
        ),
        (
            "an upload to a path leaving the data dir",
            good.clone(),
            Box::new(|link| {
                caught_up(link);
                forward(link, "x1", content);
                let (user, meta) = alice(meta_of("../../../escape-put.txt", content));
                apply(link, 11, Change::Put { user, meta, xfer: "x1".into() });
            }),
        ),
        (
            "an upload for a username leaving users/",
            good.clone(),
            Box::new(|link| {
                caught_up(link);
                forward(link, "x2", content);
                apply(
                    link,
                    11,
                    Change::Put {
                        user: "../../escape-put-user".into(),
                        meta: meta_of("x.txt", content),
                        xfer: "x2".into(),
                    },
                );
            }),
        ),
        (
            "a delete of a file outside the data dir",
            good.clone(),
            Box::new(|link| {
                caught_up(link);
                let (user, meta) = alice(tombstone("../../../precious.txt", 2));
                apply(link, 11, Change::Delete { user, meta });
            }),
        ),
        (
            "a rename of a file outside the data dir into it",
            good.clone(),
            Box::new(|link| {
                caught_up(link);
                let (user, to) = alice(meta_of("stolen.txt", b"must survive"));
                apply(link, 11, Change::Rename { user, from: tombstone("../../../precious.txt", 2), to });
            }),
        ),
        (
            "a transfer named to leave tmp/",
            good.clone(),
            Box::new(|link| {
                caught_up(link);
                forward(link, "../../escape-xfer", content);
            }),
        ),
        (
            "an upload whose transfer name points outside tmp/",
            good.clone(),
            Box::new(|link| {
                caught_up(link);
                let (user, meta) = alice(meta_of("taken.txt", b"must survive"));
                apply(link, 11, Change::Put { user, meta, xfer: "../../precious.txt".into() });
            }),
        ),
    ];
    for (what, snap, then) in &cases {
        let mut link = join_with(&fake, snap);
        then(&mut link);
        // The backup ends the link (and joins again: the next case). A backup that
        // took the bad input in answers this heartbeat instead; the disk is checked
        // before it could clean anything up.
        let _ = write_frame(&mut link.stream, Epoch(1), &Msg::Heartbeat { pos: LogPos(10), committed: LogPos(0) }, &[]);
        let accepted = loop {
            match link.try_recv().map(|f| f.msg) {
                Some(Msg::Ack { .. }) => break true,
                Some(_) => {}
                None => break false,
            }
        };
        assert_eq!(escaped(&t.path), Vec::<String>::new(), "after {what}: files outside the data dir");
        assert!(holds(&precious, b"must survive"), "after {what}: a file outside the data dir was deleted or moved");
        assert!(!accepted, "the backup went on after {what}");
    }
    let s2_users = tree(&s2.user_dir("alice"));
    assert!(s2_users.files.is_empty(), "the backup took in files: {s2_users:?}");
    let mut s2 = s2;
    assert!(s2.proc.running(), "the backup gave up");
}

/// A backup acknowledges an entry only once the entry is in its log and the file
/// in place: SIGKILLed the moment its ack arrives, it holds both on disk, and a
/// start on that data dir serves the acknowledged state.
#[test]
fn a_backup_acknowledges_only_after_its_log_write_and_rename() {
    let t = TestDir::new("hostile_ack_after_rename");
    let fake = FakePrimary::start(&t, SERVER_IP);
    let mut s2 = backup(&t, "s2", 2, fake.addr, Some(2), &[]);
    let mut link = join_with(&fake, &snapshot(&fake, &s2, serde_json::json!({})));
    caught_up(&mut link);
    let bytes = b"acknowledged means stored";
    forward(&mut link, "x1", bytes);
    apply(&mut link, 11, Change::Put { user: "alice".into(), meta: meta_of("acked.txt", bytes), xfer: "x1".into() });
    loop {
        match link.recv().map(|f| f.msg) {
            Some(Msg::Ack { pos }) if pos >= LogPos(11) => break,
            Some(Msg::Ack { .. } | Msg::Ping) => {}
            other => fail(format!("expected the backup's ack of seq 11, got {other:?}")),
        }
    }
    s2.kill();
    let log = std::fs::read_to_string(s2.data.join("meta/log.jsonl")).unwrap_or_default();
    assert!(
        log.lines().any(|l| l.starts_with(r#"{"pos":11,"#) && l.contains("acked.txt")),
        "the backup acknowledged seq 11 before its log held it:\n{log}"
    );
    assert!(
        holds(&s2.user_dir("alice").join("acked.txt"), bytes),
        "the backup acknowledged seq 11 before its file was in place"
    );

    s2.restart(&t);
    let v = s2.status();
    assert_eq!(v["seq"], 11, "restarted on its data dir, the backup should be at the seq it acknowledged: {v}");
    assert!(holds(&s2.user_dir("alice").join("acked.txt"), bytes));
}
