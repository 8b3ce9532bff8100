//! Slow peers on every kind of connection cannot block anyone else (issue 11):
//! connections that trickle a byte at a time, on the servers' port (a client's
//! hello, a logged-in client's request, a joining server's link, a fetch, an
//! election, a status query) and on a device's callback port, plus a logged-in
//! client that never reads its notices, all held open while the cluster works:
//! devices sync, the primary is killed, a backup is elected, calls the devices
//! back and serves them, the dead server rejoins.

use crate::harness::cluster::*;
use crate::harness::files::put;
use crate::harness::raw::{hello, Raw};
use crate::harness::*;
use replibox_proto::{
    ClusterKey, DeviceId, Epoch, LogPos, Msg, Op, Purpose, Rank, Seq, ServerId, Who, PROTOCOL_VERSION,
};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn frame(epoch: u64, msg: &Msg) -> Vec<u8> {
    crate::harness::raw::encode(epoch, msg, &[])
}

/// One slow peer: connects to `at`, sends `prefix` at once, then `trickle` one
/// byte every 300 ms (looping over it) until `stop`. Counts the bytes it got
/// through (a peer whose connection the other side closed stops quietly).
/// With `gate`, it first passes the cluster key's handshake (as a server, for a
/// purpose), so that its trickle reaches the handler behind it.
fn trickler(
    at: SocketAddr,
    gate: Option<(ClusterKey, Purpose, ServerId)>,
    prefix: Vec<u8>,
    trickle: Vec<u8>,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut s = match gate {
            None => match TcpStream::connect_timeout(&at, Duration::from_secs(5)) {
                Ok(s) => s,
                Err(_) => return,
            },
            Some((key, purpose, id)) => Raw::authenticated(at, &key, Some(id), purpose, "a slow server").stream,
        };
        let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
        if s.write_all(&prefix).is_err() {
            return;
        }
        for b in trickle.iter().cycle() {
            if stop.load(Ordering::Relaxed) || s.write_all(&[*b]).is_err() {
                return;
            }
            sent.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(300));
        }
    })
}

/// Every kind of slow connection to a server at `at` (of epoch `epoch`), each
/// `n` times.
fn slow_server_peers(
    at: SocketAddr,
    key: &ClusterKey,
    epoch: u64,
    n: usize,
    stop: &Arc<AtomicBool>,
    sent: &Arc<AtomicUsize>,
) -> Vec<std::thread::JoinHandle<()>> {
    let election =
        Msg::Election { target: Epoch(epoch), rank: Rank { epoch: Epoch(epoch), pos: LogPos(0), id: ServerId(7) } };
    let gate = |purpose, id| Some((key.clone(), purpose, ServerId(id)));
    type Kind = (Option<(ClusterKey, Purpose, ServerId)>, Vec<u8>, Vec<u8>);
    let kinds: Vec<Kind> = vec![
        // A client's hello, a byte at a time.
        (None, Vec::new(), frame(0, &hello("slowpoke", "5105105105105105"))),
        // A status query's hello.
        (None, Vec::new(), frame(0, &Msg::Hello { version: PROTOCOL_VERSION, who: Who::Status })),
        // A server's hello without the cluster handshake, a byte at a time.
        (None, Vec::new(), frame(0, &Msg::Hello { version: PROTOCOL_VERSION, who: Who::Peer { id: ServerId(7) } })),
        // An election, after the handshake and a whole hello.
        (
            gate(Purpose::Election, 7),
            frame(epoch, &Msg::Hello { version: PROTOCOL_VERSION, who: Who::Peer { id: ServerId(7) } }),
            frame(epoch, &election),
        ),
        // A fetch, after the handshake and a whole hello.
        (
            gate(Purpose::Fetch, 2),
            frame(epoch, &Msg::Hello { version: PROTOCOL_VERSION, who: Who::Fetch { id: ServerId(2) } }),
            frame(epoch, &Msg::Fetch { user: "alice".into(), path: "a.txt".into() }),
        ),
        // A joining server's link: the handshake, its hello, then an ack a byte
        // at a time.
        (
            gate(Purpose::Link, 7),
            frame(
                epoch,
                &Msg::Hello {
                    version: PROTOCOL_VERSION,
                    who: Who::Server {
                        id: Some(ServerId(7)),
                        ip: Some("127.0.0.1".into()),
                        port: 9,
                        pos: LogPos(0),
                        last_epoch: Epoch(0),
                        member: false,
                    },
                },
            ),
            frame(epoch, &Msg::Ack { pos: LogPos(1) }),
        ),
    ];
    let mut handles = Vec::new();
    for (gate, prefix, trickle) in kinds {
        for _ in 0..n {
            handles.push(trickler(at, gate.clone(), prefix.clone(), trickle.clone(), stop.clone(), sent.clone()));
        }
    }
    handles
}

/// See the module comment. Fails if a device or server waits on any slow peer:
/// every step has the usual deadline, far shorter than the slow peers' lives.
#[test]
fn slow_peers_on_every_kind_of_connection_block_nobody() {
    let t = TestDir::new("slow_peers");
    let (mut s1, s2, s3) = three_servers(&t, &[]);
    let port1 = free_port(DEVICE1_IP);
    let mut opts = ClientOpts::new("dev1", "alice", &s1, DEVICE1_IP);
    opts.extra = vec!["--callback-port".into(), port1.to_string()];
    let d1 = Client::spawn(&t, opts);
    d1.wait_logged_in();
    let d2 = Client::headless(&t, "dev2", "alice", &s1, DEVICE2_IP);
    let epoch = s1.status()["epoch"].as_u64().unwrap_or_else(|| fail("no epoch in --status"));

    let key = t.key();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for s in [&s1, &s2, &s3] {
        handles.extend(slow_server_peers(s.addr, &key, epoch, 3, &stop, &sent));
    }
    // The device's callback port: a primary's hello a byte at a time.
    let call = Msg::Hello {
        version: PROTOCOL_VERSION,
        who: Who::Primary { id: ServerId(9), addr: "127.0.0.9:4000".into(), device: DeviceId(d1.device_id()) },
    };
    for _ in 0..3 {
        handles.push(trickler(
            SocketAddr::new(DEVICE1_IP, port1),
            None,
            Vec::new(),
            frame(epoch + 1, &call),
            stop.clone(),
            sent.clone(),
        ));
    }
    // A logged-in client trickling a request (carol's), and one that never reads
    // (bob's: his other device makes changes he is told of).
    let mut slow_req = Raw::login(s1.addr, "carol", "ca20100000000001", "carol's trickling device");
    let _ = slow_req.stream.set_write_timeout(Some(Duration::from_secs(5)));
    let list = frame(epoch, &Msg::Request { seq: Seq(1), op: Op::List { after: None } });
    let _ = slow_req.stream.write_all(&list[..list.len() / 2]);
    let deaf = Raw::login(s1.addr, "bob", "b0b0000000000002", "bob's device that never reads");
    let mut bob = Raw::login(s1.addr, "bob", "b0b0000000000003", "bob's working device");

    // Devices sync, and bob's notices pile up at the deaf device.
    let mut want = Want::new();
    for i in 0..20 {
        let name = format!("during slow peers {i}.txt");
        let body = format!("file {i} while slow peers hang on").into_bytes();
        put(&(if i % 2 == 0 { &d1 } else { &d2 }).path(&name), &body);
        want.insert(name, body);
    }
    for i in 0..200 {
        let body = vec![b'b'; 4096];
        match bob.upload(&format!("bob/{i}.bin"), &body, None) {
            replibox_proto::OpResult::Done { .. } => {}
            other => fail(format!("bob's upload {i} while slow peers hang on: {other:?}")),
        }
    }
    wait_trees(
        "the changes on both devices and every server",
        &[&d1.sync_dir, &d2.sync_dir, &s1.user_dir("alice"), &s2.user_dir("alice"), &s3.user_dir("alice")],
        &want,
    );

    // The primary dies: an election among servers with slow peers hanging on, a
    // takeover, the devices called back past the slow callers.
    s1.kill();
    let p = wait_new_primary(&[&s2, &s3], epoch + 1);
    let (new, other) = if p == 0 { (&s2, &s3) } else { (&s3, &s2) };
    for i in 0..10 {
        let name = format!("after the kill {i}.txt");
        let body = format!("file {i} after the kill").into_bytes();
        put(&(if i % 2 == 0 { &d1 } else { &d2 }).path(&name), &body);
        want.insert(name, body);
    }
    wait_trees(
        "the changes after the kill everywhere",
        &[&d1.sync_dir, &d2.sync_dir, &new.user_dir("alice"), &other.user_dir("alice")],
        &want,
    );
    // More slow peers on the new primary, then the dead server rejoins through it.
    handles.extend(slow_server_peers(new.addr, &key, epoch + 1, 3, &stop, &sent));
    let s1b = restart_as_backup(&t, &s1, new.addr);
    let ids = {
        let mut v: Vec<u64> = [&s1b, new, other].iter().filter_map(|s| s.status()["id"].as_u64()).collect();
        v.sort();
        v
    };
    wait_members(&[&s1b, new, other], &ids);
    wait_trees("everything on the rejoined server", &[&s1b.user_dir("alice")], &want);
    for d in [&d1, &d2] {
        assert!(
            d.activity().contains("resumed with the new primary"),
            "{} did not resume:\n{}",
            d.opts.name,
            d.activity()
        );
    }

    stop.store(true, Ordering::Relaxed);
    let trickled = sent.load(Ordering::Relaxed);
    for h in handles {
        h.join().unwrap_or_else(|_| fail("a slow peer's thread failed (its handshake or its first bytes)"));
    }
    drop((slow_req, deaf));
    assert!(trickled > 0, "the slow peers sent nothing: the test tested nothing");
    eprintln!("slow peers: {trickled} bytes trickled while the cluster synced, failed over and rejoined");
}
