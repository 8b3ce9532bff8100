//! Seeded random input on a live server's port (issue 11, "Bad input"): the frame
//! decoder and every message handler a connection can reach (client, status,
//! joining server and its link, fetch, peer, and hellos of every other kind), fed
//! thousands of cases.
//!
//! Each case is one connection: a hello (valid, for a random role, or mutated)
//! and then a few frames, each one of the protocol's own samples
//! (crates/proto/tests/samples) with its JSON header mutated (a value replaced by
//! one of another type or of an extreme size, a field removed or added, the kind
//! swapped), a payload that disagrees with its declared length, or bytes that are
//! no frame at all (random, truncated, an over-long length). Then the test half
//! closes the connection and waits for the server to close its side.
//!
//! Checked: the server never panics (its log), answers every case by closing the
//! connection (no thread is held), keeps its peak memory under the bound the
//! codec's limits allow, keeps every file stored before, and serves a real client
//! and `--status` after every batch and at the end.
//!
//! Peers are trusted by the protocol (a message of a later epoch is believed, and
//! a primary steps down on it, by design): frames on server connections carry
//! epochs up to the server's own, so that a case cannot stop the service by right.
//!
//! `RANDOM_INPUT_CASES` sets the number of cases (default 10,000),
//! `RANDOM_INPUT_SEED` the seed (default: from the clock; printed at the start and
//! on failure).

#[path = "../../../proto/tests/samples/mod.rs"]
mod samples;

use crate::harness::files::{check_tree, seeded};
use crate::harness::raw::{encode, LoginEnd, Raw};
use crate::harness::*;
use replibox_proto::{ClusterKey, ContentHash, DeviceId, Epoch, Msg, Op, OpResult, Purpose, ServerId, Who, MAX_HEADER};
use serde_json::{json, Value};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use replibox_proto::rng::SplitMix64 as Rng;

/// The draws this test makes beyond the shared generator's.
trait Draw {
    /// True one time in `one_in`.
    fn chance(&mut self, one_in: u64) -> bool;
    /// One of `items`.
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T;
}

impl Draw for Rng {
    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// A frame built from a header given as JSON and the payload bytes that follow.
fn raw_frame(header: &Value, payload: &[u8]) -> Vec<u8> {
    let text = header.to_string();
    let mut out = (text.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(payload);
    out
}

/// The JSON header of an encoded frame.
fn header_of(frame: &[u8]) -> Value {
    let len = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
    serde_json::from_slice(&frame[4..4 + len]).expect("a sample's header is JSON")
}

/// A value of a random type, often an extreme one.
fn random_value(rng: &mut Rng, depth: u32) -> Value {
    match rng.below(if depth > 2 { 9 } else { 11 }) {
        0 => Value::Null,
        1 => json!(rng.chance(2)),
        2 => json!(*rng.pick(&[0u64, 1, 2, 7, u64::MAX, u64::MAX - 1, 1 << 53, (1 << 53) + 1, u32::MAX as u64])),
        3 => json!(*rng.pick(&[-1i64, i64::MIN, -(1 << 40)])),
        4 => json!(*rng.pick(&[0.5f64, -1e300, 1e300, 3.0])),
        5 => json!(rng.next_u64()),
        6 => json!(*rng.pick(&[
            "",
            ".",
            "..",
            "../x",
            "a/../../b",
            "/etc/passwd",
            "a\u{0}b",
            "a\\b",
            "CON",
            "a/",
            "//",
            "é/ü",
            "\u{202e}x",
            "x.replibox-part",
            "alice",
            "127.0.0.1:1",
            "0.0.0.0:0",
            "ffffffffffffffff",
            "not hex",
            "a b",
        ])),
        7 => {
            // A long string, up to a little over the header limit.
            let n = *rng.pick(&[255usize, 256, 4096, MAX_HEADER / 2, MAX_HEADER]);
            json!("x".repeat(n))
        }
        8 => {
            let n = rng.below(40) as usize;
            json!(String::from_utf8_lossy(&rng.bytes(n)).into_owned())
        }
        9 => Value::Array((0..rng.below(4)).map(|_| random_value(rng, depth + 1)).collect()),
        _ => {
            let mut m = serde_json::Map::new();
            for _ in 0..rng.below(4) {
                m.insert(format!("k{}", rng.below(5)), random_value(rng, depth + 1));
            }
            Value::Object(m)
        }
    }
}

/// Every node of a JSON value, as paths of keys and indices.
fn paths(v: &Value, at: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    out.push(at.clone());
    match v {
        Value::Object(m) => {
            for k in m.keys() {
                at.push(Step::Key(k.clone()));
                paths(&m[k], at, out);
                at.pop();
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                at.push(Step::Index(i));
                paths(x, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

#[derive(Clone)]
enum Step {
    Key(String),
    Index(usize),
}

fn node<'a>(v: &'a mut Value, path: &[Step]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |v, s| match s {
        Step::Key(k) => v.get_mut(k.as_str()),
        Step::Index(i) => v.get_mut(*i),
    })
}

/// One to three mutations of a header: a node replaced, a field removed or added,
/// the message's kind swapped for another.
fn mutate(rng: &mut Rng, header: &mut Value, kinds: &[String]) {
    for _ in 0..=rng.below(3) {
        let mut all = Vec::new();
        paths(header, &mut Vec::new(), &mut all);
        let at = rng.pick(&all).clone();
        match rng.below(5) {
            0 | 1 => {
                if let Some(n) = node(header, &at) {
                    *n = random_value(rng, 0);
                }
            }
            2 => {
                if let Some((Step::Key(k), parent)) = at.split_last() {
                    if let Some(Value::Object(m)) = node(header, parent) {
                        m.remove(k.as_str());
                    }
                }
            }
            3 => {
                if let Some(Value::Object(m)) = node(header, &at) {
                    let key = rng.pick(&["kind", "op", "path", "seq", "size", "user", "epoch", "extra"]).to_string();
                    m.insert(key, random_value(rng, 1));
                }
            }
            _ => {
                if let Some(Value::Object(m)) = header.get_mut("msg") {
                    m.insert("kind".into(), json!(rng.pick(kinds)));
                }
            }
        }
    }
}

/// Epochs in a frame for a server connection stay at most `max` (see the module
/// comment): every numeric field that names one is lowered to it.
fn cap_epochs(v: &mut Value, max: u64) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if matches!(k.as_str(), "epoch" | "target" | "last_epoch") && x.as_u64().is_some_and(|e| e > max) {
                    *x = json!(max);
                } else {
                    cap_epochs(x, max);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| cap_epochs(x, max)),
        _ => {}
    }
}

/// What a case says first.
#[derive(Clone, Copy, Debug)]
enum Role {
    Client,
    Status,
    Server,
    Fetch,
    Peer,
    Primary,
    /// A mutated hello.
    Mutated,
    /// No hello: frames or garbage from the first byte.
    None,
}

const ROLES: [Role; 8] =
    [Role::Client, Role::Status, Role::Server, Role::Fetch, Role::Peer, Role::Primary, Role::Mutated, Role::None];

/// How a case opens its connection before its bytes.
#[derive(Clone, Debug)]
enum Opening {
    /// Nothing: the bytes are the first thing the server reads.
    Raw,
    /// A client's real password login (the harness's password for the user).
    Login { user: String, device: String },
    /// The cluster key's handshake, as a server does before its hello.
    Handshake { purpose: Purpose, id: Option<ServerId> },
}

/// The bytes of one case, its role (for the failure report) and its opening.
fn case(
    rng: &mut Rng,
    worker: usize,
    epoch: u64,
    free: u16,
    samples: &[(Msg, Vec<u8>)],
    kinds: &[String],
) -> (Role, Opening, Vec<u8>) {
    let role = *rng.pick(&ROLES);
    let device = DeviceId(format!("{:016x}", (worker as u64) << 8 | rng.below(3)));
    let user = format!("fuzz{worker}");
    let who = match role {
        Role::Client | Role::Mutated | Role::None => Who::Client { user, device: device.clone(), callback_port: free },
        Role::Status => Who::Status,
        Role::Server => Who::Server {
            id: Some(ServerId(2 + rng.below(4))).filter(|_| !rng.chance(4)),
            ip: Some("127.0.0.1".into()),
            port: free,
            pos: replibox_proto::LogPos(rng.below(50)),
            last_epoch: Epoch(rng.below(epoch + 1)),
            member: rng.chance(2),
        },
        Role::Fetch => Who::Fetch { id: ServerId(rng.below(5)) },
        Role::Peer => Who::Peer { id: ServerId(rng.below(5)) },
        Role::Primary => Who::Primary { id: ServerId(2), addr: format!("127.0.0.1:{free}"), device },
    };
    // Most cases of a role get past its gate (a login, the cluster handshake), so
    // that what follows reaches the handler behind it; the others try without.
    let gated = !rng.chance(8);
    let opening = match (&role, &who) {
        (Role::Client, Who::Client { user, device, .. }) if gated => {
            Opening::Login { user: user.clone(), device: device.0.clone() }
        }
        (Role::Server, Who::Server { id, .. }) if gated => Opening::Handshake { purpose: Purpose::Link, id: *id },
        (Role::Fetch, Who::Fetch { id }) if gated => Opening::Handshake { purpose: Purpose::Fetch, id: Some(*id) },
        (Role::Peer, Who::Peer { id }) if gated => Opening::Handshake { purpose: Purpose::Election, id: Some(*id) },
        _ => Opening::Raw,
    };
    let hello = Msg::Hello { version: replibox_proto::PROTOCOL_VERSION, who };
    let mut bytes = Vec::new();
    match role {
        Role::None => {}
        // The login sent the hello.
        Role::Client if matches!(opening, Opening::Login { .. }) => {}
        Role::Mutated => {
            let mut h = header_of(&encode(epoch, &hello, &[]));
            mutate(rng, &mut h, kinds);
            cap_epochs(&mut h, epoch);
            bytes.extend(raw_frame(&h, &[]));
        }
        _ => bytes.extend(encode(rng.below(epoch + 1), &hello, &[])),
    }
    for _ in 0..rng.below(8) {
        if matches!(role, Role::Client) && rng.chance(4) {
            // A whole upload, as a client sends it (chunks before the proceed):
            // stored when its seq and path are right.
            let seq = replibox_proto::Seq(1 + rng.below(8));
            let n = *rng.pick(&[0usize, 3, 300, 70_000]);
            let body = rng.bytes(n);
            let exec = rng.chance(4);
            let op = Op::Upload {
                path: random_path(rng),
                size: body.len() as u64,
                mtime_ms: 0,
                base: None,
                exec,
                eager: false,
            };
            bytes.extend(encode(epoch, &Msg::Request { seq, op }, &[]));
            bytes.extend(encode(epoch, &Msg::Chunk { seq }, &body));
            let hash = if rng.chance(4) { ContentHash(rng.next_u64()) } else { ContentHash::of(&body) };
            bytes.extend(encode(epoch, &Msg::UploadEnd { seq, hash }, &[]));
            continue;
        }
        if rng.chance(2) {
            // What this role's handler expects, with random values.
            let msg = role_msg(rng, role, epoch);
            let payload = if matches!(msg, Msg::Chunk { .. } | Msg::XferChunk { .. }) {
                let n = *rng.pick(&[0usize, 1, 5, 1000, 70_000]);
                rng.bytes(n)
            } else {
                Vec::new()
            };
            let mut h = header_of(&encode(rng.below(epoch + 1), &msg, &payload));
            if rng.chance(4) {
                mutate(rng, &mut h, kinds);
            }
            cap_epochs(&mut h, epoch);
            bytes.extend(raw_frame(&h, &payload));
            continue;
        }
        let (msg, payload) = rng.pick(samples);
        let frame_epoch = rng.below(epoch + 1);
        match rng.below(10) {
            // A sample as it is, in whatever place it lands.
            0 | 1 => {
                let mut h = header_of(&encode(frame_epoch, msg, payload));
                cap_epochs(&mut h, epoch);
                bytes.extend(raw_frame(&h, payload));
            }
            // Mutated, with its payload or another.
            2..=6 => {
                let mut h = header_of(&encode(frame_epoch, msg, payload));
                mutate(rng, &mut h, kinds);
                cap_epochs(&mut h, epoch);
                let declared = h.get("payload").and_then(Value::as_u64).unwrap_or(0).min(64 * 1024) as usize;
                let len = match rng.below(3) {
                    0 => declared,
                    1 => declared.saturating_sub(1 + rng.below(8) as usize),
                    _ => declared + rng.below(8) as usize,
                };
                let body = rng.bytes(len);
                bytes.extend(raw_frame(&h, &body));
            }
            // Random bytes.
            7 => {
                let n = rng.below(300) as usize;
                bytes.extend(rng.bytes(n));
            }
            // A frame cut short.
            8 => {
                let mut h = header_of(&encode(frame_epoch, msg, payload));
                cap_epochs(&mut h, epoch);
                let f = raw_frame(&h, payload);
                let n = rng.below(f.len() as u64) as usize;
                bytes.extend_from_slice(&f[..n]);
            }
            // A length prefix over the limit, or a header that is not JSON.
            _ => {
                if rng.chance(2) {
                    bytes.extend(((MAX_HEADER as u32) + 1 + rng.below(1 << 20) as u32).to_be_bytes());
                } else {
                    let n = 1 + rng.below(200) as u32;
                    bytes.extend(n.to_be_bytes());
                    bytes.extend(rng.bytes(n as usize));
                }
            }
        }
    }
    (role, opening, bytes)
}

/// A path that is often hostile, sometimes fine.
fn random_path(rng: &mut Rng) -> String {
    rng.pick(&[
        "a.txt",
        "dir/b.txt",
        "dir",
        "",
        ".",
        "..",
        "../escape",
        "a/../../b",
        "/abs",
        "a//b",
        "a/./b",
        "a\u{0}b",
        "tmp",
        "x.replibox-part",
        "é ü.txt",
        "dir/sub/deep.txt",
        "a/",
    ])
    .to_string()
}

/// A message that the handler of `role` expects (a request, its chunks and end;
/// a link's acks and transfers; an election, coordinator or fence; a fetch), with
/// random values in it.
fn role_msg(rng: &mut Rng, role: Role, epoch: u64) -> Msg {
    use replibox_proto::{LogPos, Rank, Seq, Version};
    let seq = Seq(rng.below(6));
    let base = [None, Some(Version(rng.below(4))), Some(Version(u64::MAX))][rng.below(3) as usize];
    let hash = ContentHash(rng.next_u64());
    match role {
        Role::Server => match rng.below(6) {
            0 => Msg::Ack { pos: LogPos(rng.below(60)) },
            1 => Msg::CaughtUp { pos: LogPos(rng.below(60)) },
            2 => Msg::XferChunk { xfer: format!("x{}", rng.below(3)) },
            3 => Msg::XferEnd { xfer: format!("x{}", rng.below(3)), size: rng.below(2000), hash },
            4 => Msg::XferAbort { xfer: format!("x{}", rng.below(3)) },
            _ => Msg::Ping,
        },
        Role::Peer => match rng.below(3) {
            0 => Msg::Election {
                target: Epoch(rng.below(epoch + 1)),
                rank: Rank {
                    epoch: Epoch(rng.below(epoch + 1)),
                    pos: LogPos(rng.below(100)),
                    id: ServerId(rng.below(5)),
                },
            },
            1 => Msg::Coordinator {
                epoch: Epoch(rng.below(epoch + 1)),
                id: ServerId(rng.below(5)),
                addr: format!("127.0.0.1:{}", rng.below(65536)),
            },
            _ => Msg::Fence { reason: "random".into(), pos: LogPos(rng.below(100)) },
        },
        Role::Fetch => match rng.below(3) {
            0 => Msg::Ping,
            _ => Msg::Fetch { user: rng.pick(&["alice", "fuzz0", "..", ""]).to_string(), path: random_path(rng) },
        },
        _ => match rng.below(9) {
            0 => Msg::Chunk { seq },
            1 => Msg::UploadEnd { seq, hash },
            2 => Msg::Resume,
            3 => Msg::Ping,
            4 => Msg::Request {
                seq,
                op: Op::List { after: [None, Some(random_path(rng))][rng.below(2) as usize].clone() },
            },
            5 => Msg::Request { seq, op: Op::Download { path: random_path(rng) } },
            6 => Msg::Request { seq, op: Op::Delete { path: random_path(rng), base } },
            7 => Msg::Request { seq, op: Op::Rename { from: random_path(rng), to: random_path(rng), base } },
            _ => Msg::Request {
                seq,
                op: Op::Upload {
                    path: random_path(rng),
                    size: *rng.pick(&[0u64, 5, 1000, 70_000, u64::MAX, 1 << 40]),
                    mtime_ms: rng.next_u64() as i64,
                    base,
                    exec: rng.chance(2),
                    eager: rng.chance(2),
                },
            },
        },
    }
}

/// Sends one case and waits for the server to close the connection. A server
/// that stops reading (it closed after a bad frame) may reset the rest: fine.
fn run_case(addr: SocketAddr, key: &ClusterKey, opening: &Opening, bytes: &[u8]) -> Result<(), String> {
    let mut s = match opening {
        Opening::Raw => {
            TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(|e| format!("connect: {e}"))?
        }
        Opening::Login { user, device } => {
            let mut r = Raw::connect(addr, "a random case");
            match r.password_login(user, device, &password_of(user)) {
                LoginEnd::Welcome { .. } => {}
                // Refused (the device limit): the case is over.
                _ => return Ok(()),
            }
            r.stream
        }
        Opening::Handshake { purpose, id } => {
            let (r, proven) = Raw::server(addr, None, key, *id, *purpose, "a random case");
            if let Err(e) = proven {
                return Err(format!("the cluster handshake failed: {e}"));
            }
            r.stream
        }
    };
    s.set_write_timeout(Some(DEADLINE)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(DEADLINE)).map_err(|e| e.to_string())?;
    match s.write_all(bytes) {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => return Ok(()),
        Err(e) => return Err(format!("send: {e}")),
    }
    let _ = s.shutdown(Shutdown::Write);
    let start = Instant::now();
    let mut buf = [0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => return Ok(()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(format!(
                    "the server kept the connection open for {:?} after the input ended",
                    start.elapsed()
                ))
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// The server still serves: a real client logs in, lists, uploads and reads back.
fn still_serves(server: &mut Server, what: &str, round: usize) {
    assert!(server.proc.running(), "{what}: the server died");
    let status = server.try_status().unwrap_or_else(|| fail(format!("{what}: --status got no answer")));
    assert_eq!(status["role"], "primary", "{what}: the server is no longer primary: {status}");
    let mut r = Raw::login(server.addr, "alice", "a11ce00000000001", what);
    assert!(matches!(r.request(Op::List { after: None }), OpResult::Listing { .. }), "{what}: no listing");
    let body = format!("round {round}");
    let path = format!("after/{round}.txt");
    match r.upload(&path, body.as_bytes(), None) {
        OpResult::Done { meta } => assert_eq!(meta.hash, ContentHash::of(body.as_bytes()), "{what}"),
        other => fail(format!("{what}: an upload after the random input got {other:?}")),
    }
}

/// Thousands of seeded random cases on a live primary's port; see the module
/// comment for what is sent and what is checked.
#[test]
fn random_input_on_every_handler_never_stops_the_server() {
    let seed: u64 = std::env::var("RANDOM_INPUT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    let cases: usize = std::env::var("RANDOM_INPUT_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    eprintln!("random input: seed {seed}, {cases} cases (RANDOM_INPUT_SEED={seed} replays)");
    let t = TestDir::new("random_input");
    let mut server = Server::primary(&t);
    let addr = server.addr;
    let epoch = server.status()["epoch"].as_u64().unwrap_or(1);
    // A port nothing listens on: callbacks and fences to the cases' servers are
    // refused at once.
    let free = free_port(SERVER_IP);
    let users = server.user_dir("alice");
    let mut want = Want::new();
    want.insert("keep.txt".into(), b"stored before the random input".to_vec());
    want.insert("keep/blob.bin".into(), seeded(77, 300 * 1024 + 3));
    {
        let mut r = Raw::login(addr, "alice", "a11ce00000000001", "setup");
        for (p, b) in &want {
            assert!(matches!(r.upload(p, b, None), OpResult::Done { .. }), "setup upload of {p}");
        }
    }
    let key = t.key();
    let samples = samples::messages();
    let kinds: Vec<String> = samples
        .iter()
        .filter_map(|(m, _)| serde_json::to_value(m).ok()?.get("kind")?.as_str().map(str::to_string))
        .collect();
    let workers = 6;
    let rounds = 4;
    let per = cases.div_ceil(workers * rounds);
    let mut done = 0;
    for round in 0..rounds {
        let results: Vec<Result<usize, String>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|w| {
                    let (samples, kinds, key) = (&samples, &kinds, &key);
                    scope.spawn(move || {
                        let mut rng =
                            Rng::new(seed ^ ((round * workers + w) as u64).wrapping_mul(0xA076_1D64_78BD_642F));
                        for i in 0..per {
                            let (role, opening, bytes) = case(&mut rng, w, epoch, free, samples, kinds);
                            run_case(addr, key, &opening, &bytes).map_err(|e| {
                                format!(
                                    "seed {seed}, round {round}, worker {w}, case {i} ({role:?}, {} bytes): {e}",
                                    bytes.len()
                                )
                            })?;
                        }
                        Ok(per)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("a worker panicked".into()))).collect()
        });
        for r in results {
            done += r.unwrap_or_else(|e| fail(format!("random input: {e} (RANDOM_INPUT_SEED={seed} replays)")));
        }
        still_serves(&mut server, &format!("after round {round} (seed {seed})"), round);
        want.insert(format!("after/{round}.txt"), format!("round {round}").into_bytes());
    }
    let log = server.log();
    if let Ok(to) = std::env::var("RANDOM_INPUT_LOG") {
        let _ = std::fs::write(to, &log);
    }
    assert!(!log.contains("panicked"), "seed {seed}: a server thread panicked:\n{log}");
    // The cases reached every handler, not only the decoder (so that a generator
    // gone wrong fails here rather than testing nothing).
    for (needle, what) in [
        ("logged in user=fuzz", "a client login"),
        ("stored user=fuzz", "a stored upload"),
        ("refused request user=fuzz", "a refused request"),
        ("backup joining id=", "a joining server's link"),
        ("election from id=", "an election"),
        ("fetch", "a fetch connection"),
        ("closing connection", "a bad hello"),
        ("protocol violation", "a client's protocol violation"),
    ] {
        assert!(log.contains(needle), "seed {seed}: no {what} in the server's log ({needle:?}) after {done} cases");
    }
    check_tree(&users, &want).unwrap_or_else(|e| fail(format!("seed {seed}: stored files changed: {e}")));
    let hwm = server.proc.vm_hwm_kib();
    assert!(
        hwm < 96 * 1024,
        "seed {seed}: the server peaked at {hwm} KiB after {done} cases: something big was allocated"
    );
    eprintln!("random input: seed {seed}: {done} cases, the server served on; peak {hwm} KiB");
}
