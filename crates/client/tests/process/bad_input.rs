//! Hostile input on the server port, and paths that try to leave a user's directory.

use crate::harness::files::{check_tree, put, seeded, tree};
use crate::harness::raw::{frame_bytes, hello, refusal, Raw};
use crate::harness::*;
use replibox_proto::{ContentHash, Msg, Op, OpResult, Seq, PROTOCOL_VERSION as V};
use std::net::SocketAddr;

fn encode(msg: &Msg, payload: &[u8]) -> Vec<u8> {
    crate::harness::raw::encode(0, msg, payload)
}

/// What the server must do with one connection.
enum Expect {
    /// Close it, with or without a refusal frame first.
    Closed,
    /// Send a refusal whose reason contains this, then close.
    Refused(&'static str),
}

/// Uploads `bytes` to `path` over a raw logged-in connection.
fn raw_upload(r: &mut Raw, path: &str, bytes: &[u8]) -> OpResult {
    r.upload(path, bytes, None)
}

/// Connects, sends `bytes`, and checks the server's answer.
fn expect(addr: SocketAddr, what: &str, bytes: &[u8], close_after: bool, expect: Expect) {
    let mut r = Raw::connect(addr, what);
    r.send_bytes(bytes);
    if close_after {
        r.shutdown_write();
    }
    let frames = r.expect_closed();
    match expect {
        Expect::Closed => {
            let others: Vec<_> = frames.iter().filter(|f| !matches!(f.msg, Msg::Refused { .. })).collect();
            assert!(others.is_empty(), "{what}: the server answered {others:?} before closing");
        }
        Expect::Refused(needle) => {
            let reason =
                refusal(&frames).unwrap_or_else(|| fail(format!("{what}: closed without a refusal: {frames:?}")));
            assert!(reason.to_lowercase().contains(needle), "{what}: the refusal {reason:?} should mention {needle:?}");
        }
    }
}

/// Sends `prefix` and then `total` bytes of spaces, as fast as the server takes
/// them, stopping quietly when it closes the connection; then waits for the close.
/// A server that believed the prefix's length would fill (and so really use) a
/// buffer of that size, which its peak memory shows.
fn flood(addr: SocketAddr, what: &str, prefix: &[u8], total: usize) {
    use std::io::Write;
    let mut r = Raw::connect(addr, what);
    let piece = vec![b' '; 1 << 20];
    let sent =
        r.stream.write_all(prefix).is_ok() && (0..total / piece.len()).all(|_| r.stream.write_all(&piece).is_ok());
    eprintln!("{what}: the server took {} the flood", if sent { "all of" } else { "only part of" });
    r.shutdown_write();
    r.expect_closed();
}

/// Garbage, an over-long length prefix, truncated frames, unknown kinds, a wrong
/// protocol version, invalid usernames, and bad frames from a logged-in client:
/// each connection is closed (refused with a reason where a frame can be
/// answered), the server keeps serving, nothing stored is lost, nothing big is
/// allocated (even when the bytes to fill a declared 200 MiB do follow), and a real
/// client is served afterwards.
#[test]
fn bad_input_on_the_server_port_closes_that_connection_only() {
    let t = TestDir::new("bad_input_server_port");
    let server = Server::primary(&t);
    let addr = server.addr;
    let d1 = Client::headless(&t, "dev1", "alice", &server, DEVICE1_IP);
    let users = server.user_dir("alice");
    let mut want = Want::new();
    want.insert("keep.txt".into(), b"stored before the attack".to_vec());
    want.insert("keep/blob.bin".into(), seeded(31, 2 * 1024 * 1024 + 5));
    for (p, bytes) in &want {
        put(&d1.path(p), bytes);
    }
    wait_trees("the files stored before the bad input", &[&users], &want);

    // A hello cut short and then silence: the server must not wait forever.
    let good_hello = encode(&hello("alice", "00000000000000a1"), &[]);
    let mut silent = Raw::connect(addr, "a hello cut short, then silence");
    silent.send_bytes(&good_hello[..10]);

    let json = |h: &str| frame_bytes(h);
    let hello_with = |version: u32, user: &str, device: &str| {
        json(&format!(
            r#"{{"epoch":0,"msg":{{"kind":"hello","version":{version},"who":{{"role":"client","user":{},"device":"{device}","callback_port":9}}}}}}"#,
            serde_json::to_string(user).unwrap()
        ))
    };
    let mut over_limit = u32::MAX.to_be_bytes().to_vec();
    over_limit.extend_from_slice(b"{}");
    let mut just_over = (64 * 1024u32 + 1).to_be_bytes().to_vec();
    just_over.extend_from_slice(&[b' '; 1000]);
    let cases: Vec<(&str, Vec<u8>, bool, Expect)> = vec![
        ("random garbage", seeded(66, 300), false, Expect::Closed),
        ("an HTTP request", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".to_vec(), false, Expect::Closed),
        ("a length prefix of 4 GiB", over_limit, false, Expect::Closed),
        ("a length prefix one byte over 64 KiB", just_over, false, Expect::Closed),
        ("a zero length prefix", vec![0, 0, 0, 0, b'{', b'}'], false, Expect::Closed),
        ("a length prefix cut short", vec![0, 0], true, Expect::Closed),
        ("a hello cut short", good_hello[..good_hello.len() - 3].to_vec(), true, Expect::Closed),
        ("a header that is not JSON", json("not json at all"), false, Expect::Closed),
        ("JSON that is not a frame header", json(r#"{"hello":1}"#), false, Expect::Closed),
        ("an unknown message kind", json(r#"{"epoch":0,"msg":{"kind":"launch_missiles"}}"#), false, Expect::Closed),
        (
            "a hello declaring a 2 MiB payload",
            json(&format!(
                r#"{{"epoch":0,"payload":{},"msg":{{"kind":"hello","version":1,"who":{{"role":"status"}}}}}}"#,
                2 * 1024 * 1024
            )),
            false,
            Expect::Closed,
        ),
        ("a first frame that is not a hello", encode(&Msg::Ping, &[]), false, Expect::Refused("hello")),
        (
            "the next protocol version",
            hello_with(V + 1, "alice", "00000000000000a2"),
            false,
            Expect::Refused("version"),
        ),
        ("protocol version 1", hello_with(1, "alice", "00000000000000a2"), false, Expect::Refused("version")),
        ("protocol version 0", hello_with(0, "alice", "00000000000000a2"), false, Expect::Refused("version")),
        ("the username ../bob", hello_with(V, "../bob", "00000000000000a3"), false, Expect::Refused("username")),
        ("an empty username", hello_with(V, "", "00000000000000a3"), false, Expect::Refused("username")),
        ("a username starting with a dot", hello_with(V, ".alice", "00000000000000a3"), false, Expect::Refused("dot")),
        ("a username with a slash", hello_with(V, "a/b", "00000000000000a3"), false, Expect::Refused("username")),
        ("a username with NUL", hello_with(V, "al\0ice", "00000000000000a3"), false, Expect::Refused("username")),
        ("a 65-byte username", hello_with(V, &"u".repeat(65), "00000000000000a3"), false, Expect::Refused("username")),
        ("an invalid device id", hello_with(V, "alice", "../../x"), false, Expect::Refused("device")),
    ];
    let n_cases = cases.len();
    for (what, bytes, close_after, e) in cases {
        expect(addr, what, &bytes, close_after, e);
    }
    // Lengths over the limits, followed by 100 MiB that would fill them: refused at
    // the length, so the peak memory checked at the end stays small.
    flood(addr, "a 200 MiB header, and 100 MiB of it", &(200u32 << 20).to_be_bytes(), 100 << 20);
    let big_payload = json(&format!(
        r#"{{"epoch":0,"payload":{},"msg":{{"kind":"hello","version":1,"who":{{"role":"status"}}}}}}"#,
        200 << 20
    ));
    flood(addr, "a hello declaring a 200 MiB payload, and 100 MiB of it", &big_payload, 100 << 20);

    // A logged-in client of alice (the second device slot) misbehaving. Each login
    // must be welcomed: a session left behind by the previous one would take the
    // slot.
    let device = "00000000000000b1";
    let logged_in: Vec<(&str, Vec<u8>)> = vec![
        ("an unknown kind after login", json(r#"{"epoch":0,"msg":{"kind":"launch_missiles"}}"#)),
        ("a 4 GiB length prefix after login", u32::MAX.to_be_bytes().to_vec()),
        (
            "a chunk declaring a 2 MiB payload",
            json(&format!(r#"{{"epoch":0,"payload":{},"msg":{{"kind":"chunk","seq":1}}}}"#, 2 * 1024 * 1024)),
        ),
        ("a chunk outside any upload", encode(&Msg::Chunk { seq: Seq(1) }, b"stray bytes")),
        ("a second hello", good_hello.clone()),
        ("garbage after login", seeded(67, 100)),
    ];
    for (what, bytes) in logged_in {
        let mut r = Raw::login(addr, "alice", device, what);
        r.send_bytes(&bytes);
        r.expect_closed();
    }

    // Uploads gone wrong: more bytes than declared; the connection dropped halfway;
    // a hash that does not match (refused, the connection goes on).
    let mut r = Raw::login(addr, "alice", device, "an upload longer than declared");
    let seq = r.next_seq();
    r.send(&Msg::Request {
        seq,
        op: Op::Upload { path: "long.bin".into(), size: 10, mtime_ms: 0, base: None, exec: false, eager: false },
    });
    assert!(matches!(r.recv().map(|f| f.msg), Some(Msg::Proceed { .. })), "upload of long.bin not accepted");
    r.send_with(&Msg::Chunk { seq }, &[7u8; 20]);
    r.expect_closed();

    let mut r = Raw::login(addr, "alice", device, "an upload cut off halfway");
    let seq = r.next_seq();
    r.send(&Msg::Request {
        seq,
        op: Op::Upload { path: "keep.txt".into(), size: 1000, mtime_ms: 0, base: None, exec: false, eager: false },
    });
    // keep.txt exists at version 1: uploading without a base is a conflict. Use the base.
    let base = match r.recv().map(|f| f.msg) {
        Some(Msg::Reply { result: OpResult::Conflict { current: Some(current) }, .. }) => current.version,
        other => fail(format!("an upload over keep.txt without a base should conflict, got {other:?}")),
    };
    let seq = r.next_seq();
    r.send(&Msg::Request {
        seq,
        op: Op::Upload {
            path: "keep.txt".into(),
            size: 1000,
            mtime_ms: 0,
            base: Some(base),
            exec: false,
            eager: false,
        },
    });
    assert!(matches!(r.recv().map(|f| f.msg), Some(Msg::Proceed { .. })), "upload over keep.txt not accepted");
    r.send_with(&Msg::Chunk { seq }, &[9u8; 500]);
    r.shutdown_write();
    r.expect_closed();

    let mut r = Raw::login(addr, "alice", device, "an upload with a wrong hash");
    let seq = r.next_seq();
    r.send(&Msg::Request {
        seq,
        op: Op::Upload { path: "bad hash.bin".into(), size: 5, mtime_ms: 0, base: None, exec: false, eager: false },
    });
    assert!(matches!(r.recv().map(|f| f.msg), Some(Msg::Proceed { .. })), "upload of bad hash.bin not accepted");
    r.send_with(&Msg::Chunk { seq }, b"hello");
    r.send(&Msg::UploadEnd { seq, hash: ContentHash::of(b"other") });
    match r.recv().map(|f| f.msg) {
        Some(Msg::Reply { result: OpResult::Error { .. }, .. }) => {}
        other => fail(format!("an upload with a wrong hash should be refused, got {other:?}")),
    }
    assert!(
        matches!(r.request(Op::List { after: None }), OpResult::Listing { .. }),
        "the session should go on after a refusal"
    );
    drop(r);

    // Eager uploads (issue 7: the bytes right behind the request, as the
    // front-end sends small files). Refused before the server read the bytes (a
    // conflict; a bad path; a wrong hash after them): the bytes are read and
    // dropped, the refusal comes, and the session stays in step. More bytes than
    // declared still ends the connection.
    let mut r = Raw::login(addr, "alice", device, "eager uploads refused");
    match r.eager_upload("keep.txt", b"no base given", None) {
        OpResult::Conflict { current: Some(c) } => assert_eq!(c.path, "keep.txt"),
        other => fail(format!("an eager upload over keep.txt without a base should conflict, got {other:?}")),
    }
    match r.eager_upload("../escape.txt", b"outside", None) {
        OpResult::Error { message } => assert!(message.contains(".."), "{message}"),
        other => fail(format!("an eager upload to ../escape.txt should be refused, got {other:?}")),
    }
    let seq = r.next_seq();
    let op = Op::Upload { path: "bad hash 2.bin".into(), size: 5, mtime_ms: 0, base: None, exec: false, eager: true };
    r.send(&Msg::Request { seq, op });
    r.send_with(&Msg::Chunk { seq }, b"hello");
    assert!(
        matches!(r.end_upload(seq, ContentHash::of(b"other")), OpResult::Error { .. }),
        "an eager upload with a wrong hash should be refused"
    );
    assert!(
        matches!(r.request(Op::List { after: None }), OpResult::Listing { .. }),
        "the session should go on after refused eager uploads"
    );
    let seq = r.next_seq();
    let op = Op::Upload { path: "long2.bin".into(), size: 10, mtime_ms: 0, base: None, exec: false, eager: true };
    r.send(&Msg::Request { seq, op });
    r.send_with(&Msg::Chunk { seq }, &[7u8; 20]);
    r.expect_closed();

    silent.wait_closed(DEADLINE);

    // The server still runs, lost nothing, left no temporary file, and serves a
    // real device (which takes the second slot, so no bad session lingers).
    let mut server = server;
    assert!(server.proc.running(), "the server died");
    wait_until(DEADLINE, "DATA/tmp to be empty", || tree(&server.tmp_dir()).files.is_empty());
    check_tree(&users, &want).unwrap_or_else(|e| fail(format!("stored files changed: {e}")));
    let d2 = Client::headless(&t, "dev2", "alice", &server, DEVICE2_IP);
    put(&d2.path("after.txt"), b"served after the bad input");
    want.insert("after.txt".into(), b"served after the bad input".to_vec());
    wait_trees("a real device to be served after the bad input", &[&d1.sync_dir, &d2.sync_dir, &users], &want);

    let log = server.log();
    let reasons = log.lines().filter(|l| l.contains("closing connection") || l.contains("refused client")).count();
    assert!(reasons >= n_cases, "the server should log a reason for each of the {n_cases} refused connections:\n{log}");
    let hwm = server.proc.vm_hwm_kib();
    assert!(hwm < 64 * 1024, "the server peaked at {hwm} KiB: something big was allocated");
}

/// Files of a data dir outside `users/` and the server's own `meta/` and `tmp/`
/// (whose contents change with every request).
fn outside_users(data: &std::path::Path) -> Vec<String> {
    tree(data)
        .files
        .into_keys()
        .filter(|p| !p.starts_with("users/") && !p.starts_with("meta/") && !p.starts_with("tmp/"))
        .collect()
}

/// Paths with `..`, absolute paths, NUL and other malformed names are refused in
/// every request (download, upload, delete, rename) with an error reply, the
/// session goes on, and another user's files are untouched. Through the CLI too:
/// `download ../bob/x` prints an error and the next command works.
#[test]
fn paths_leaving_the_users_directory_are_refused_and_other_users_files_untouched() {
    let error_of = |what: &str, result: OpResult| match result {
        OpResult::Error { message } if !message.is_empty() => {}
        other => fail(format!("{what} should be refused with an error, got {other:?}")),
    };
    let t = TestDir::new("bad_input_confinement");
    let server = Server::primary(&t);
    let bob = Client::headless(&t, "bob", "bob", &server, DEVICE3_IP);
    let mut bobs = Want::new();
    bobs.insert("x".into(), b"bob's secret".to_vec());
    bobs.insert("secret/y".into(), b"bob's other secret".to_vec());
    for (p, b) in &bobs {
        put(&bob.path(p), b);
    }
    let bob_dir = server.user_dir("bob");
    wait_trees("bob's files on the server", &[&bob_dir], &bobs);

    let outside_before = outside_users(&server.data);
    let mut r = Raw::login(server.addr, "alice", "00000000000000c1", "alice, raw");
    match raw_upload(&mut r, "mine.txt", b"alice's") {
        OpResult::Done { .. } => {}
        other => fail(format!("alice's own upload refused: {other:?}")),
    }
    let bad = [
        "../bob/x",
        "../bob/secret/y",
        "a/../../bob/x",
        "../../meta/log.jsonl",
        "..",
        ".",
        "./mine.txt",
        "/etc/passwd",
        "/bob/x",
        "mine.txt\0",
        "a\0b",
        "",
        "a//b",
        "a/",
        "..\\bob\\x",
        ".replibox/device",
    ];
    for path in bad {
        let error = |what: &str, result: OpResult| match result {
            OpResult::Error { message } if !message.is_empty() => {}
            other => fail(format!("{what} of {path:?} should be refused with an error, got {other:?}")),
        };
        error("a download", r.request(Op::Download { path: path.into() }));
        error("a delete", r.request(Op::Delete { path: path.into(), base: None }));
        error("a rename to it", r.request(Op::Rename { from: "mine.txt".into(), to: path.into(), base: None }));
        error("a rename from it", r.request(Op::Rename { from: path.into(), to: "stolen".into(), base: None }));
        error("an upload", raw_upload(&mut r, path, b"overwrite"));
        error("a mkdir", r.request(Op::Mkdir { path: path.into(), base: None }));
    }
    // Nor through a file: a folder under a file is refused.
    error_of("a mkdir under a file", r.request(Op::Mkdir { path: "mine.txt/sub".into(), base: None }));
    match r.request(Op::List { after: None }) {
        OpResult::Listing { files, .. } => {
            let names: Vec<_> = files.iter().map(|m| m.path.as_str()).collect();
            assert_eq!(names, ["mine.txt"], "alice's listing");
        }
        other => fail(format!("the session should go on after refusals; list answered {other:?}")),
    }
    drop(r);

    check_tree(&bob_dir, &bobs).unwrap_or_else(|e| fail(format!("bob's files changed: {e}")));
    let mut alices = Want::new();
    alices.insert("mine.txt".into(), b"alice's".to_vec());
    check_tree(&server.user_dir("alice"), &alices).unwrap_or_else(|e| fail(format!("alice's files: {e}")));
    assert_eq!(
        outside_users(&server.data),
        outside_before,
        "files appeared (or vanished) in the data dir outside users/, meta/ and tmp/"
    );
    let user_dirs: Vec<String> =
        tree(&server.data.join("users")).dirs.into_iter().filter(|d| !d.contains('/')).collect();
    assert_eq!(user_dirs, ["alice", "bob"], "directories under DATA/users");

    // Through the CLI.
    let mut alice = Client::interactive(&t, "alice", "alice", &server, DEVICE1_IP);
    for line in ["download ../bob/x", "download /etc/passwd", "delete ../bob/x", "delete ../bob/secret/y"] {
        let e = alice.err(line);
        assert!(!e.trim().is_empty(), "{line}: empty error");
        assert!(alice.ok("list_server").contains("mine.txt"), "the session should go on after {line:?}");
    }
    let cwd = tree(&alice.cwd);
    assert!(cwd.files.is_empty(), "a refused download left files in the working directory: {cwd:?}");
    check_tree(&bob_dir, &bobs).unwrap_or_else(|e| fail(format!("bob's files changed through the CLI: {e}")));
}
