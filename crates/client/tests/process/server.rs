//! The server binary's own contract, as the README states it: exit codes, the
//! clean stop on SIGINT, SIGTERM and SIGHUP, and `--status`.

use crate::harness::cluster::*;
use crate::harness::files::{holds, seeded};
use crate::harness::raw::Raw;
use crate::harness::*;
use replibox_proto::{ContentHash, Msg, Op, OpResult, ServerId, Who, PROTOCOL_VERSION};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, ExitStatus};

/// Runs `replibox-server ARGS` as process `name` until it exits by itself; its exit
/// status and stderr.
pub(crate) fn run_to_exit(t: &TestDir, name: &str, args: &[&str]) -> (ExitStatus, String) {
    let mut cmd = Command::new(server_bin());
    cmd.args(args).env("RUST_LOG", "info").env_remove("RUST_BACKTRACE");
    let mut p = Proc::spawn(t, name, cmd, false);
    let status = p.wait_exit(DEADLINE);
    (status, p.stderr())
}

/// A server that refuses to start exits with 1 and says why: an `--id` other than
/// the one its data dir records (which stays as it was), `--id 0`, a timeout not
/// above the heartbeat, a port already taken, a data dir that cannot be one, and
/// `-p` on a data dir still marked as joining.
#[test]
fn start_up_refusals_exit_with_1_and_say_why() {
    let t = TestDir::new("server_refusals");
    let mut s1 = primary(&t, &[]);
    // Up (answering --status), so that it has recorded its id.
    wait_members(&[&s1], &[1]);
    s1.kill();
    let owned = s1.data.to_str().unwrap().to_string();
    let fresh = t.join("fresh-data").to_str().unwrap().to_string();
    let a_file = t.join("a file");
    std::fs::write(&a_file, b"not a directory").unwrap();
    let a_file = a_file.to_str().unwrap().to_string();
    let joining = t.join("joining-data");
    std::fs::create_dir_all(joining.join("meta")).unwrap();
    std::fs::write(joining.join("meta/installing"), b"joining a cluster: files are being fetched\n").unwrap();
    let joining = joining.to_str().unwrap().to_string();
    let taken = TcpListener::bind(SocketAddr::new(SERVER_IP, 0)).unwrap();
    let taken_port = taken.local_addr().unwrap().port().to_string();

    let port = free_port(SERVER_IP).to_string();
    let at = |data: &str| -> Vec<String> {
        ["--bind", "127.0.0.1", "--port", &port, "--data", data].iter().map(|s| s.to_string()).collect()
    };
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "an --id other than the data dir's",
            [vec!["-p".into(), "--id".into(), "7".into()], at(&owned)].concat(),
            "id 1",
        ),
        ("--id 0 for a primary", [vec!["-p".into(), "--id".into(), "0".into()], at(&fresh)].concat(), "--id"),
        (
            "--id 0 for a backup",
            [vec!["-b".into(), "127.0.0.1:1".into(), "--id".into(), "0".into()], at(&fresh)].concat(),
            "--id",
        ),
        (
            "an ack bound equal to the heartbeat",
            [
                vec!["-p".into(), "--heartbeat-ms".into(), "500".into(), "--ack-timeout-ms".into(), "500".into()],
                at(&fresh),
            ]
            .concat(),
            "heartbeat",
        ),
        (
            "a failure timeout below the heartbeat",
            [
                vec!["-p".into(), "--heartbeat-ms".into(), "500".into(), "--failure-timeout-ms".into(), "400".into()],
                at(&fresh),
            ]
            .concat(),
            "heartbeat",
        ),
        (
            "a heartbeat of 0",
            [vec!["-p".into(), "--heartbeat-ms".into(), "0".into()], at(&fresh)].concat(),
            "heartbeat",
        ),
        (
            "a port already taken",
            ["-p", "--bind", "127.0.0.1", "--port", &taken_port, "--data", &fresh]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            "cannot listen",
        ),
        ("a data dir that is a file", [vec!["-p".into()], at(&a_file)].concat(), "a file"),
        (
            "-p on a data dir still marked as joining",
            [vec!["-p".into()], at(&joining)].concat(),
            "stopped while joining",
        ),
    ];
    for (i, (what, args, says)) in cases.iter().enumerate() {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (status, err) = run_to_exit(&t, &format!("refused-{i}"), &args);
        assert_eq!(status.code(), Some(1), "{what}: exit status {status}, stderr:\n{err}");
        assert!(
            err.contains("replibox-server: ") && err.contains(says),
            "{what}: stderr should say why ({says:?}):\n{err}"
        );
    }
    drop(taken);
    let id = std::fs::read_to_string(s1.data.join("server.json")).unwrap();
    assert_eq!(id.trim(), r#"{"id":1}"#, "a refused --id changed the data dir's id");
    assert!(!Path::new(&fresh).join("server.json").exists(), "a refused start recorded an id");
}

/// A server stops cleanly on SIGINT, SIGTERM and SIGHUP, backup and primary alike:
/// exit status 0 (not death by the signal), and a primary started again on its
/// data dir serves what it held.
#[test]
fn a_server_stops_cleanly_on_sigint_sigterm_and_sighup() {
    let t = TestDir::new("server_signals");
    for sig in ["INT", "TERM", "HUP"] {
        let s = sig.to_lowercase();
        let mut p = Server::start(&t, ServerOpts { name: format!("p-{s}"), ..primary_opts(&[]) });
        let mut b = Server::start(&t, backup_opts(&format!("b-{s}"), 2, p.addr, Some(2), &[]));
        wait_members(&[&p, &b], &[1, 2]);
        let mut a = Raw::login(p.addr, "alice", "00000000000000a1", "device A");
        let bytes = format!("stored before SIG{sig}").into_bytes();
        assert!(matches!(a.upload("kept.txt", &bytes, None), OpResult::Done { .. }), "the upload before SIG{sig}");
        drop(a);

        b.proc.signal(sig);
        let status = b.proc.wait_exit(DEADLINE);
        assert_eq!(status.code(), Some(0), "the backup on SIG{sig}: {status}\n{}", b.log());
        p.proc.signal(sig);
        let status = p.proc.wait_exit(DEADLINE);
        assert_eq!(status.code(), Some(0), "the primary on SIG{sig}: {status}\n{}", p.log());

        p.restart(&t);
        let mut a = Raw::login(p.addr, "alice", "00000000000000a1", "device A again");
        match a.request(Op::List { after: None }) {
            OpResult::Listing { files, .. } => {
                assert!(files.iter().any(|m| m.path == "kept.txt" && !m.deleted), "lost after SIG{sig}: {files:?}")
            }
            other => fail(format!("list after SIG{sig}: {other:?}")),
        }
        assert!(holds(&p.user_dir("alice").join("kept.txt"), &bytes));
    }
}

/// A stopping primary turns new requests, logins and joins away (their connections
/// close), lets the change already under way finish replicating (here it waits for
/// a stalled backup, and stops once that backup resumed and stored the change),
/// and exits with 0.
#[test]
fn a_stopping_primary_turns_new_work_away_and_finishes_what_is_under_way() {
    let t = TestDir::new("server_stop_under_way");
    let mut s1 = primary(&t, &["--ack-timeout-ms", "20000"]);
    let mut s2 = backup(&t, "s2", 2, s1.addr, Some(2), &[]);
    wait_members(&[&s1, &s2], &[1, 2]);
    let mut a = Raw::login(s1.addr, "alice", "00000000000000a1", "device A");
    let mut b = Raw::login(s1.addr, "bob", "00000000000000b1", "device B");

    s2.proc.signal("STOP");
    let bytes = seeded(3, 600_000);
    let seq = a.begin_upload("under way.bin", bytes.len() as u64, None).unwrap_or_else(|r| fail(format!("{r:?}")));
    a.send_chunks(seq, &bytes);
    a.send(&Msg::UploadEnd { seq, hash: ContentHash::of(&bytes) });
    wait_until(DEADLINE, "the upload to be committed on the primary", || {
        holds(&s1.user_dir("alice").join("under way.bin"), &bytes)
    });

    s1.proc.signal("TERM");
    // A listing read before the signal is handled would show the upload, which
    // s2 (stopped) never acknowledges: it would wait for the ack bound (20 s).
    wait_until(DEADLINE, "the primary to start stopping", || s1.log().contains("shutting down:"));
    // Device B's requests are answered until the primary takes no new work; then
    // its connection closes.
    wait_until(DEADLINE, "the stopping primary to turn device B's requests away", || {
        match b.try_request(Op::List { after: None }) {
            Some(OpResult::Listing { .. }) => false,
            None => true,
            Some(other) => fail(format!("device B's list answered {other:?}")),
        }
    });
    let mut c = Raw::connect(s1.addr, "a login while stopping");
    c.begin_login("carol", "00000000000000c1");
    let frames = c.expect_closed();
    assert!(!frames.iter().any(|f| matches!(f.msg, Msg::Welcome { .. })), "a login was welcomed while stopping");
    let (mut j, proven) = Raw::server(
        s1.addr,
        Some(ip(9)),
        &t.key(),
        Some(ServerId(9)),
        replibox_proto::Purpose::Link,
        "a join while stopping",
    );
    proven.unwrap_or_else(|e| fail(format!("the joiner's handshake: {e}")));
    let who = Who::Server {
        id: Some(ServerId(9)),
        ip: Some("127.0.0.9".into()),
        port: 1,
        pos: replibox_proto::LogPos(0),
        last_epoch: replibox_proto::Epoch(u64::MAX),
        member: false,
    };
    j.send(&Msg::Hello { version: PROTOCOL_VERSION, who });
    let frames = j.expect_closed();
    assert!(!frames.iter().any(|f| matches!(f.msg, Msg::Joined { .. })), "a join was accepted while stopping");
    assert!(s1.proc.running(), "the primary stopped without waiting for the change under way");

    s2.proc.signal("CONT");
    let status = s1.proc.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(0), "the stopping primary: {status}");
    assert!(
        holds(&s2.user_dir("alice").join("under way.bin"), &bytes),
        "the change under way did not finish replicating"
    );
    // Device A got the answer, or (if the process ended before its connection
    // thread wrote it) a close, after which a real client resends.
    if let Some(result) = a.try_reply_to(seq) {
        assert!(matches!(result, OpResult::Done { .. }), "the upload under way was answered {result:?}");
    }
}

/// A stopping primary waits for a stalled backup at most the ack bound, then exits
/// with 0 all the same.
#[test]
fn a_stopping_primary_waits_for_a_stalled_backup_at_most_the_ack_bound() {
    let t = TestDir::new("server_stop_bounded");
    let mut s1 = primary(&t, &["--ack-timeout-ms", "3000"]);
    let mut s2 = backup(&t, "s2", 2, s1.addr, Some(2), &[]);
    wait_members(&[&s1, &s2], &[1, 2]);
    let mut a = Raw::login(s1.addr, "alice", "00000000000000a1", "device A");
    s2.proc.signal("STOP");
    let seq = a.next_seq();
    a.send(&Msg::Request { seq, op: Op::Delete { path: "nothing here".into(), base: None } });
    // Refused at once (nothing to delete): no entry, nothing waits. An upload does.
    assert!(matches!(a.reply_to(seq), OpResult::Error { .. }));
    let bytes = b"waiting for a stalled backup";
    let seq = a.begin_upload("w.txt", bytes.len() as u64, None).unwrap_or_else(|r| fail(format!("{r:?}")));
    a.send_chunks(seq, bytes);
    a.send(&Msg::UploadEnd { seq, hash: ContentHash::of(bytes) });
    wait_until(DEADLINE, "the upload to be committed on the primary", || {
        holds(&s1.user_dir("alice").join("w.txt"), bytes)
    });
    s1.proc.signal("TERM");
    let status = s1.proc.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(0), "a primary whose backup never answers still stops: {status}");
    s2.proc.signal("CONT");
}

/// `--status` prints one JSON line with the keys in alphabetical order, for a
/// primary, a backup, and a backup that has not joined yet, and exits 0; a server
/// that cannot be reached makes it exit 1 with a message on stderr.
#[test]
fn the_status_contract() {
    let t = TestDir::new("server_status");
    let status_line = |addr: &str| -> (Option<i32>, String, String) {
        let mut cmd = Command::new(server_bin());
        cmd.args(["--status", addr]);
        let (status, out, err) = run_bounded(&t, "status", cmd);
        (status.code(), out, err)
    };
    let status_of = |s: &Server| -> serde_json::Value {
        let (code, out, err) = status_line(&s.addr.to_string());
        assert_eq!(code, Some(0), "--status {}: {err}", s.addr);
        assert!(out.ends_with('\n') && out.lines().count() == 1, "--status should print one line:\n{out}");
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| fail(format!("not JSON ({e}): {out}")));
        // Compact, every object's keys in alphabetical order: what serde_json writes
        // from its sorted map.
        assert_eq!(serde_json::to_string(&v).unwrap(), out.trim_end(), "--status keys out of order or not compact");
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["eligible", "epoch", "id", "last_epoch", "members", "note", "phase", "primary", "role", "seq", "sessions"],
            "--status fields"
        );
        v
    };
    let member =
        |id: u64, s: &Server, role: &str| serde_json::json!({"addr": s.addr.to_string(), "id": id, "role": role});

    let s1 = primary(&t, &[]);
    let v = status_of(&s1);
    assert_eq!(
        (&v["role"], &v["id"], &v["epoch"], &v["primary"], &v["sessions"]),
        (
            &serde_json::json!("primary"),
            &serde_json::json!(1),
            &serde_json::json!(1),
            &serde_json::json!(s1.addr.to_string()),
            &serde_json::json!(0)
        ),
        "{v}"
    );
    assert_eq!(v["members"], serde_json::json!([member(1, &s1, "primary")]));
    assert_eq!((&v["phase"], &v["note"]), (&serde_json::json!("serving"), &serde_json::Value::Null), "{v}");
    let seq = v["seq"].as_u64().unwrap_or_else(|| fail(format!("no seq: {v}")));
    assert!(seq >= 1, "starting an epoch is an entry: {v}");

    let _a = Raw::login(s1.addr, "alice", "00000000000000a1", "device A");
    let v = status_of(&s1);
    assert_eq!(v["sessions"], 1, "{v}");
    assert!(v["seq"].as_u64().unwrap() > seq, "a login counts in seq: {v}");

    let s2 = backup(&t, "s2", 2, s1.addr, Some(2), &[]);
    wait_members(&[&s1, &s2], &[1, 2]);
    let (p, b) = (status_of(&s1), status_of(&s2));
    let both = serde_json::json!([member(1, &s1, "primary"), member(2, &s2, "backup")]);
    assert_eq!((&p["members"], &b["members"]), (&both, &both), "the membership, from the primary and from the backup");
    assert_eq!(
        (&b["role"], &b["id"], &b["epoch"]),
        (&serde_json::json!("backup"), &serde_json::json!(2), &serde_json::json!(1))
    );
    assert_eq!(b["primary"], serde_json::json!(s1.addr.to_string()));
    assert_eq!((&b["phase"], &b["note"]), (&serde_json::json!("following"), &serde_json::Value::Null), "{b}");
    assert_eq!(
        (&b["seq"], &b["sessions"]),
        (&p["seq"], &p["sessions"]),
        "a caught-up backup reports the primary's seq and sessions"
    );

    // A backup whose primary is not there (yet).
    let nowhere = SocketAddr::new(SERVER_IP, free_port(SERVER_IP));
    let s4 = backup(&t, "s4", 6, nowhere, Some(4), &[]);
    let v = status_of(&s4);
    assert_eq!(
        (&v["role"], &v["members"], &v["primary"]),
        (&serde_json::json!("backup"), &serde_json::json!([]), &serde_json::Value::Null),
        "{v}"
    );
    assert_eq!(
        (&v["epoch"], &v["seq"], &v["sessions"], &v["id"]),
        (&serde_json::json!(0), &serde_json::json!(0), &serde_json::json!(0), &serde_json::json!(4))
    );
    // It keeps trying the address it was given: joining, or between two tries,
    // waiting with a note that says why it may not stand.
    match v["phase"].as_str() {
        Some("joining") => assert_eq!(v["note"], serde_json::Value::Null, "{v}"),
        Some("no primary") => assert!(v["note"].as_str().is_some_and(|n| n.contains("may not stand")), "{v}"),
        _ => fail(format!("a backup that never joined: {v}")),
    }

    let (code, out, err) = status_line(&nowhere.to_string());
    assert_eq!(code, Some(1), "--status of nothing: stdout {out:?}, stderr {err:?}");
    assert!(
        out.is_empty() && !err.trim().is_empty(),
        "--status of nothing should say why on stderr only: {out:?} {err:?}"
    );
}

/// A change that reached the write-ahead log but could not be carried out stops
/// the server with exit status 3 instead of serving a state its disk disagrees
/// with; the next start-up redoes the change (it refuses to start, with 1, while
/// the obstacle is still there). The obstacle: a file put by hand where the
/// upload needs a folder, unknown to the state.
#[test]
fn a_logged_change_that_cannot_be_carried_out_stops_the_server_with_3_and_is_redone() {
    let t = TestDir::new("server_exit_3");
    let mut s = primary(&t, &[]);
    let mut a = Raw::login(s.addr, "alice", "00000000000000a1", "device A");
    assert!(matches!(a.upload("first.txt", b"first", None), OpResult::Done { .. }));
    let blocker = s.user_dir("alice").join("blocker");
    std::fs::write(&blocker, b"put here by hand").unwrap();
    let bytes = b"into a folder that is a file";
    let seq = a.begin_upload("blocker/x.txt", bytes.len() as u64, None).unwrap_or_else(|r| fail(format!("{r:?}")));
    a.send_chunks(seq, bytes);
    a.send(&Msg::UploadEnd { seq, hash: ContentHash::of(bytes) });
    let status = s.proc.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(3), "the server should stop with 3: {status}\n{}", s.log());
    assert!(a.try_reply_to(seq).is_none(), "the change was answered although it was not carried out");
    let log = std::fs::read_to_string(s.data.join("meta/log.jsonl")).unwrap();
    assert!(log.contains("blocker/x.txt"), "the change should be in the write-ahead log:\n{log}");

    // With the obstacle still there, the redo fails and the server does not start.
    let args = ["-p", "--id", "1", "--bind", "127.0.0.1", "--port", &s.addr.port().to_string(), "--data"];
    let mut args: Vec<&str> = args.to_vec();
    let data = s.data.to_str().unwrap().to_string();
    args.push(&data);
    let (status, err) = run_to_exit(&t, "s1-blocked", &args);
    assert_eq!(status.code(), Some(1), "a start-up whose redo fails: {status}\n{err}");

    std::fs::remove_file(&blocker).unwrap();
    s.restart(&t);
    // Its port takes connections before the start-up is over; the answer to a
    // status query comes after it.
    wait_until(DEADLINE, "the restarted server to answer", || s.try_status().is_some());
    assert!(holds(&s.user_dir("alice").join("blocker/x.txt"), bytes), "the start-up did not redo the change");
    let mut a = Raw::login(s.addr, "alice", "00000000000000a1", "device A again");
    match a.request(Op::List { after: None }) {
        OpResult::Listing { files, .. } => {
            let live: Vec<&str> = files.iter().filter(|m| !m.deleted).map(|m| m.path.as_str()).collect();
            assert_eq!(live, ["blocker/x.txt", "first.txt"], "after the redo");
        }
        other => fail(format!("list after the redo: {other:?}")),
    }
}
