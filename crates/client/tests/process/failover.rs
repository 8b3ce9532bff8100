//! Failover: the primary dies (SIGKILL), the backups elect a new one, the new
//! primary calls the clients back, and nothing acknowledged is lost.
//!
//! Three servers on 127.0.0.1-3, the two devices on 127.0.0.4 and 127.0.0.5.

use crate::harness::cluster::{restart_as_backup, three_servers, wait_members, wait_new_primary};
use crate::harness::files::{contents, put, seeded, write_seeded};
use crate::harness::*;
use crate::replication::upload;
use replibox_proto::auth::AuthMsg;
use replibox_proto::{read_frame, write_frame, DeviceId, Epoch, Msg, ServerId, Who, PROTOCOL_VERSION};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The scenario of the issue, end to end: the primary is killed; exactly one
/// backup takes over with the next epoch; a file made on device 1 right after the
/// kill reaches device 2 and both live servers byte for byte, and device 1 saw a
/// failover, not an error. Then the new primary is killed too and the last server
/// serves alone. Both dead servers come back with -b, catch up as backups, and
/// every acknowledged file is everywhere.
#[test]
fn a_killed_primary_is_replaced_and_nothing_acknowledged_is_lost() {
    let t = TestDir::new("failover_kill_primary");
    let (mut s1, s2, s3) = three_servers(&t, &[]);
    let mut d1 = Client::interactive(&t, "dev1", "alice", &s1, DEVICE1_IP);
    let d2 = Client::headless(&t, "dev2", "alice", &s1, DEVICE2_IP);
    let outside = t.mkdir("outside");
    let mut want = Want::new();
    upload(&mut d1, &outside, "before.txt", b"acknowledged before the kill");
    want.insert("before.txt".into(), b"acknowledged before the kill".to_vec());
    let epoch = s1.status()["epoch"].as_u64().unwrap_or_else(|| fail("no epoch in --status"));

    s1.kill();
    put(&d1.path("after kill.txt"), b"made right after the kill");
    want.insert("after kill.txt".into(), b"made right after the kill".to_vec());
    let p = wait_new_primary(&[&s2, &s3], epoch + 1);
    let (mut new, other) = if p == 0 { (s2, s3) } else { (s3, s2) };
    wait_trees(
        "the file made after the kill on device 2 and both live servers",
        &[&d2.sync_dir, &new.user_dir("alice"), &other.user_dir("alice")],
        &want,
    );
    for d in [&d1, &d2] {
        let log = d.activity();
        assert!(
            log.contains("resumed with the new primary"),
            "{} did not resume with the new primary:\n{log}",
            d.opts.name
        );
        assert!(!log.contains("error:"), "{} showed an error for a failover that succeeded:\n{log}", d.opts.name);
    }
    upload(&mut d1, &outside, "via new primary.txt", b"acknowledged by the new primary");
    want.insert("via new primary.txt".into(), b"acknowledged by the new primary".to_vec());

    // The new primary dies too: the last server serves alone.
    new.kill();
    let last = other;
    wait_new_primary(&[&last], epoch + 2);
    put(&d2.path("from 2 alone.txt"), b"the last server stored this");
    want.insert("from 2 alone.txt".into(), b"the last server stored this".to_vec());
    wait_trees("the change on the last server and device 1", &[&d1.sync_dir, &last.user_dir("alice")], &want);

    // Both come back as backups and catch up.
    let s1b = restart_as_backup(&t, &s1, last.addr);
    let newb = restart_as_backup(&t, &new, last.addr);
    let ids = {
        let mut v: Vec<u64> = [&s1b, &newb, &last].iter().filter_map(|s| s.status()["id"].as_u64()).collect();
        v.sort();
        v
    };
    wait_members(&[&s1b, &newb, &last], &ids);
    wait_trees(
        "every acknowledged file on every server and device",
        &[&d1.sync_dir, &d2.sync_dir, &s1b.user_dir("alice"), &newb.user_dir("alice"), &last.user_dir("alice")],
        &want,
    );
    assert_eq!(contents(&last.user_dir("alice")), want);
}

/// A 64 MiB upload in flight when the primary dies completes: the front-end sends
/// it again to the new primary, which stores it once, on every live server.
#[test]
fn an_upload_in_flight_when_the_primary_dies_completes() {
    let t = TestDir::new("failover_upload_in_flight");
    let (mut s1, s2, s3) = three_servers(&t, &[]);
    let mut d1 = Client::interactive(&t, "dev1", "alice", &s1, DEVICE1_IP);
    let outside = t.mkdir("outside");
    const SIZE: u64 = 64 * 1024 * 1024;
    write_seeded(&outside.join("big.bin"), 17, SIZE);
    d1.proc.send_line(&format!("upload {}", outside.join("big.bin").display()));
    let tmp = s1.tmp_dir();
    let seen = wait_for(DEADLINE, "the upload to be under way on the primary", || {
        let in_flight: Vec<u64> = files::tree(&tmp).files.into_values().collect();
        in_flight.into_iter().find(|n| *n > 0 && *n < SIZE).map(Some).or_else(|| {
            // Finished before it could be caught: the scenario did not happen.
            s1.user_dir("alice").join("big.bin").exists().then_some(None)
        })
    });
    let Some(partial) = seen else {
        fail("the upload finished before the primary could be killed mid-way; the machine was too fast for this test");
    };
    s1.kill();
    eprintln!("killed the primary with {partial} of {SIZE} bytes of big.bin in DATA/tmp");
    wait_until(DEADLINE, "the upload's outcome", || d1.proc.stdout().contains("uploaded big.bin"));
    let want = seeded(17, SIZE as usize);
    for s in [&s2, &s3] {
        wait_until(DEADLINE, &format!("big.bin complete on {}", s.opts.name), || {
            files::holds(&s.user_dir("alice").join("big.bin"), &want)
        });
    }
    assert!(files::holds(&d1.path("big.bin"), &want), "device 1's copy differs");
    let stored: Vec<_> = [&s2, &s3].iter().flat_map(|s| s.stored("alice", "big.bin")).collect();
    assert!(stored.len() <= 1, "big.bin was stored more than once: {stored:?}");
}

/// The callback port refuses whoever does not prove the session's token: a caller
/// with a wrong proof, one calling for another device, and garbage, each get
/// nothing, and the session goes on.
#[test]
fn a_callback_without_the_sessions_token_is_refused() {
    let t = TestDir::new("failover_fake_callback");
    let (s1, _s2, _s3) = three_servers(&t, &[]);
    let port = free_port(DEVICE1_IP);
    let mut opts = ClientOpts::new("dev1", "alice", &s1, DEVICE1_IP);
    opts.extra = vec!["--callback-port".into(), port.to_string()];
    let d1 = Client::spawn(&t, opts);
    d1.wait_logged_in();
    let d2 = Client::headless(&t, "dev2", "alice", &s1, DEVICE2_IP);
    let device = DeviceId(d1.device_id());
    let at = SocketAddr::new(DEVICE1_IP, port);
    let call = || {
        let s = TcpStream::connect_timeout(&at, Duration::from_secs(5)).unwrap_or_else(|e| fail(format!("{at}: {e}")));
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s
    };
    let hello = |device: &DeviceId| Msg::Hello {
        version: PROTOCOL_VERSION,
        who: Who::Primary { id: ServerId(9), addr: "127.0.0.9:4000".into(), device: device.clone() },
    };

    // A wrong proof for this device.
    let mut s = call();
    write_frame(&mut s, Epoch(99), &hello(&device), &[]).unwrap();
    let challenge = read_frame(&mut s).ok().flatten().map(|f| f.msg);
    assert!(matches!(challenge, Some(Msg::Auth(AuthMsg::CallbackChallenge { .. }))), "no challenge: {challenge:?}");
    let proof = Msg::Auth(AuthMsg::CallbackProof { epoch: Epoch(99), device: device.clone(), proof: "00".repeat(32) });
    write_frame(&mut s, Epoch(99), &proof, &[]).unwrap();
    match read_frame(&mut s).ok().flatten().map(|f| f.msg) {
        Some(Msg::Refused { reason }) => assert!(reason.contains("token"), "refusal without the reason: {reason}"),
        other => fail(format!("a wrong proof was answered with {other:?}")),
    }

    // Another device's call.
    let mut s = call();
    write_frame(&mut s, Epoch(99), &hello(&DeviceId("00000000deadbeef".into())), &[]).unwrap();
    assert!(matches!(read_frame(&mut s).ok().flatten().map(|f| f.msg), Some(Msg::Refused { .. })));

    // Garbage.
    let mut s = call();
    std::io::Write::write_all(&mut s, b"\x00\x00\x00\x10garbage garbage!").unwrap();
    let _ = read_frame(&mut s);

    wait_until(DEADLINE, "the refusals in device 1's log", || {
        d1.activity().contains("refused a call on the callback port")
    });
    put(&d1.path("still syncing.txt"), b"the session goes on");
    wait_until(DEADLINE, "the file on device 2", || {
        files::holds(&d2.path("still syncing.txt"), b"the session goes on")
    });
    assert!(!d1.activity().contains("resumed with"), "device 1 resumed with a fake primary");
}

/// A backup restarted from a data dir of a later epoch than the primary's (the
/// old primary was started anew with -p on its older data dir while the others
/// were down) does not follow it and does not wait silently: it says why, the
/// primary learns of the later epoch and steps down. Started again with -p, the
/// old primary now finds the backup's later history and refuses; with --force it
/// takes an epoch above every one it heard of, and the backup joins it.
#[test]
fn a_backup_with_a_later_epoch_than_the_primary_does_not_wedge() {
    let t = TestDir::new("failover_later_epoch_backup");
    // Two failovers: s1 dies (epoch 2 under a new primary), then that one dies
    // too, and the last server is primary of epoch 3.
    let (mut s1, s2, s3) = three_servers(&t, &[]);
    let mut d1 = Client::interactive(&t, "dev1", "alice", &s1, DEVICE1_IP);
    let outside = t.mkdir("outside");
    upload(&mut d1, &outside, "one.txt", b"epoch one");
    drop(d1);
    s1.kill();
    let p = wait_new_primary(&[&s2, &s3], 2);
    let (mut new, last) = if p == 0 { (s2, s3) } else { (s3, s2) };
    new.kill();
    wait_new_primary(&[&last], 3);
    let mut last = last;
    last.kill();
    // s1 is started again as primary of a new cluster: epoch 2 by its data dir.
    let mut opts = s1.opts.clone();
    opts.name = "s1-again".into();
    let mut s1b = Server::start(&t, opts.clone());
    assert_eq!(s1b.status()["epoch"], 2, "s1's data dir was at epoch 1");
    let lastb = restart_as_backup(&t, &last, s1b.addr);
    // Whichever comes first tells the backup: its join hello (s1 answers why it
    // stepped down), or s1's coordinator message (the backup answers stale).
    wait_until(DEADLINE, "the backup to say why it does not follow s1", || {
        let log = lastb.log();
        log.contains("learned of the later epoch 3 from your hello")
            || log.contains("not following id=1 as primary of epoch=2: this server knows the later epoch 3")
    });
    wait_until(DEADLINE, "s1 to learn of the later epoch", || s1b.log().contains("later than ours"));
    s1b.kill();
    // Started again with -p, s1 knows it heard of epoch 3 but holds only epoch
    // 2: it refuses (the backup, not a member of its membership, is not asked,
    // but its later history exists somewhere). With --force, the operator makes
    // s1's data dir the truth: it takes an epoch above every one it heard of.
    let port = s1b.addr.port().to_string();
    let data = s1b.data.to_str().unwrap_or_else(|| fail("the data dir is not UTF-8")).to_string();
    let args = ["-p", "--id", "1", "--bind", "127.0.0.1", "--port", &port, "--data", &data];
    let (status, err) = crate::server::run_to_exit(&t, "s1-refused", &args);
    assert_eq!(status.code(), Some(1), "-p below a later history: {status}\n{err}");
    assert!(
        err.contains("heard of epoch 3") && err.contains("later history"),
        "the refusal should say that a later history exists:\n{err}"
    );
    opts.name = "s1-third".into();
    opts.extra.push("--force".into());
    let s1c = Server::start(&t, opts);
    let e = s1c.status()["epoch"].as_u64().unwrap_or(0);
    assert!(e > 3, "s1 started again with -p --force took epoch {e}, not above epoch 3 it had heard of");
    let ids: Vec<u64> = {
        let mut v = vec![1, lastb.status()["id"].as_u64().unwrap_or(0)];
        v.sort();
        v
    };
    wait_members(&[&s1c, &lastb], &ids);
    let want = contents(&s1c.user_dir("alice"));
    wait_trees("the backup to hold what s1 holds", &[&lastb.user_dir("alice")], &want);
}

/// The old primary started again with `-p` while the cluster runs on under the
/// primary elected in its place would be a second primary of the next epoch with
/// another history: it refuses (exit 1), names the server to rejoin through, and
/// leaves the running cluster as it was; started with `-b` as told, it follows.
#[test]
fn a_former_primary_started_with_p_while_the_cluster_runs_refuses_and_says_how_to_rejoin() {
    let t = TestDir::new("failover_p_refused");
    let (mut s1, s2, s3) = three_servers(&t, &[]);
    s1.kill();
    let p = wait_new_primary(&[&s2, &s3], 2);
    let new = [&s2, &s3][p];
    let port = s1.addr.port().to_string();
    let data = s1.data.to_str().unwrap_or_else(|| fail("the data dir is not UTF-8")).to_string();
    let args = ["-p", "--id", "1", "--bind", "127.0.0.1", "--port", &port, "--data", &data];
    let (status, err) = crate::server::run_to_exit(&t, "s1-as-primary", &args);
    assert_eq!(status.code(), Some(1), "-p while the cluster runs on: {status}\n{err}");
    assert!(err.contains(&format!("-b {}", new.addr)), "the refusal should name the primary to rejoin through:\n{err}");
    assert_eq!(crate::harness::cluster::role(new).map(|r| (r.0, r.1)), Some(("primary".to_string(), 2)));
    let s1b = restart_as_backup(&t, &s1, new.addr);
    wait_members(&[new, &s1b], &[1, 2, 3]);
}
