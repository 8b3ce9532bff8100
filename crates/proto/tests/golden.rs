//! Golden frames: the wire format pinned byte for byte, and docs/protocol.md held to
//! the code.
//!
//! - Every message kind, operation, result, notice, entry change and `who.role`
//!   that docs/protocol.md lists has a sample here that round-trips through the
//!   codec, and every sample's kind is in the page's tables (so a kind added to the
//!   code and not to the page, or the reverse, fails here).
//! - Every complete frame header written out in the page (no `...` in it) decodes
//!   and encodes back to exactly the bytes the page shows.
//! - A few frames are pinned byte for byte here, independently of the page: a
//!   peer written against these bytes must keep working.
//!
//! The samples are in `samples/mod.rs`, which the server's random-input test
//! mutates too.

mod samples;

use replibox_proto::auth::AuthMsg;
use replibox_proto::repl::{Change, Entry};
use replibox_proto::{
    read_frame, write_frame, Answer, ContentHash, Epoch, LogPos, Msg, Op, OpResult, Purpose, Rank, Seq, ServerId, Who,
};
use samples::*;
use std::collections::BTreeSet;

fn encode(epoch: u64, msg: &Msg, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write_frame(&mut out, Epoch(epoch), msg, payload).unwrap();
    out
}

/// The position of a message's variant; exhaustive, so a new kind does not compile
/// until it is counted here (and then the test below wants a sample of it).
fn ordinal(m: &Msg) -> usize {
    match m {
        Msg::Hello { .. } => 0,
        Msg::Welcome { .. } => 1,
        Msg::Refused { .. } => 2,
        Msg::Redirect { .. } => 3,
        Msg::Request { .. } => 4,
        Msg::Proceed { .. } => 5,
        Msg::Chunk { .. } => 6,
        Msg::UploadEnd { .. } => 7,
        Msg::DownloadEnd { .. } => 8,
        Msg::Reply { .. } => 9,
        Msg::Notice { .. } => 10,
        Msg::Status { .. } => 11,
        Msg::Joined { .. } => 12,
        Msg::SnapshotChunk => 13,
        Msg::SnapshotEnd { .. } => 14,
        Msg::XferChunk { .. } => 15,
        Msg::XferEnd { .. } => 16,
        Msg::XferAbort { .. } => 17,
        Msg::Apply { .. } => 18,
        Msg::Heartbeat { .. } => 19,
        Msg::Ack { .. } => 20,
        Msg::CaughtUp { .. } => 21,
        Msg::Fetch { .. } => 22,
        Msg::Ping => 23,
        Msg::Pong => 24,
        Msg::Bye => 25,
        Msg::NotPrimary { .. } => 26,
        Msg::Fence { .. } => 27,
        Msg::Election { .. } => 28,
        Msg::Coordinator { .. } => 29,
        Msg::Answer { .. } => 30,
        Msg::Auth(_) => 31,
        Msg::Resume => 32,
        Msg::EarlyBegin { .. } => 33,
        Msg::EarlyChunk { .. } => 34,
        Msg::EarlyEnd { .. } => 35,
        Msg::EarlyAbort { .. } => 36,
    }
}
const KINDS: usize = 37;

/// The value of a serde tag (`"kind"`, `"op"`, ...) in a value's JSON.
fn tag(value: &impl serde::Serialize, field: &str) -> String {
    let v = serde_json::to_value(value).unwrap();
    v[field].as_str().unwrap_or_else(|| panic!("no {field} tag in {v}")).to_string()
}

/// docs/protocol.md.
fn protocol_page() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/protocol.md");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// The backticked first cells of the table bodies (not their header rows)
/// between heading `from` and the next heading of any level.
fn first_cells(page: &str, from: &str) -> BTreeSet<String> {
    let start = page.find(from).unwrap_or_else(|| panic!("no heading {from:?} in docs/protocol.md"));
    let rest = &page[start + from.len()..];
    let section = &rest[..rest.find("\n#").unwrap_or(rest.len())];
    let mut in_body = false;
    let mut cells = BTreeSet::new();
    for line in section.lines() {
        if !line.starts_with('|') {
            in_body = false;
        } else if line.starts_with("|---") {
            in_body = true;
        } else if let Some(name) = line.strip_prefix("| `").and_then(|l| l.split_once('`')).map(|(n, _)| n) {
            if in_body {
                cells.insert(name.to_string());
            }
        }
    }
    cells
}

#[test]
fn every_kind_the_protocol_page_lists_has_a_sample_that_round_trips() {
    let samples = messages();
    let seen: BTreeSet<usize> = samples.iter().map(|(m, _)| ordinal(m)).collect();
    assert_eq!(seen, (0..KINDS).collect(), "a message kind has no sample");
    for (msg, payload) in &samples {
        let bytes = encode(7, msg, payload);
        let mut r = &bytes[..];
        let frame = read_frame(&mut r).unwrap().unwrap();
        assert_eq!((frame.epoch, &frame.msg, &frame.payload), (Epoch(7), msg, payload), "{}", msg.kind());
        assert!(r.is_empty(), "{}: bytes left after the frame", msg.kind());
        assert_eq!(tag(msg, "kind"), msg.kind(), "the kind on the wire is the kind in logs");
    }

    let page = protocol_page();
    let kinds: BTreeSet<String> = samples.iter().map(|(m, _)| m.kind().to_string()).collect();
    assert_eq!(first_cells(&page, "## Message kinds"), kinds, "message kinds: docs/protocol.md vs the code");
    let of = |tags: Vec<String>| tags.into_iter().collect::<BTreeSet<String>>();
    assert_eq!(first_cells(&page, "### Operations"), of(ops().iter().map(|o| tag(o, "op")).collect()), "ops");
    assert_eq!(first_cells(&page, "### Results"), of(results().iter().map(|r| tag(r, "result")).collect()), "results");
    assert_eq!(first_cells(&page, "### Notices"), of(notices().iter().map(|n| tag(n, "change")).collect()), "notices");
    assert_eq!(
        first_cells(&page, "### Entries"),
        of(changes().iter().map(|c| tag(c, "change")).collect()),
        "entry changes"
    );
    assert_eq!(first_cells(&page, "## Connections"), of(whos().iter().map(|w| tag(w, "role")).collect()), "roles");
    assert_eq!(first_cells(&page, "### Answers"), of(answers().iter().map(|a| tag(a, "answer")).collect()), "answers");
    assert_eq!(
        first_cells(&page, "### Authentication messages"),
        of(auths().iter().map(|a| tag(a, "auth")).collect()),
        "authentication messages"
    );
}

/// The complete frame headers written in `text`: each `{"epoch":N...}` object,
/// balanced, with no `...` left out of it.
fn headers_in(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("{\"epoch\":") {
        let s = &rest[i..];
        let (mut depth, mut in_string, mut escaped, mut end) = (0, false, false, None);
        for (j, c) in s.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if in_string => escaped = true,
                '"' => in_string = !in_string,
                '{' if !in_string => depth += 1,
                '}' if !in_string => {
                    depth -= 1;
                    if depth == 0 {
                        end = Some(j + 1);
                        break;
                    }
                }
                '\n' => break,
                _ => {}
            }
        }
        let Some(end) = end else {
            rest = &s[1..];
            continue;
        };
        let header = &s[..end];
        let digit = header.as_bytes().get(9).is_some_and(|b| b.is_ascii_digit());
        if digit && !header.contains("...") && !header.contains('…') {
            found.push(header.to_string());
        }
        rest = &s[end..];
    }
    found
}

/// Decodes a header as written, with a payload of the length it declares, and
/// encodes the frame again.
fn reencode(header: &str) -> Vec<u8> {
    let v: serde_json::Value = serde_json::from_str(header).unwrap_or_else(|e| panic!("{header}: {e}"));
    let payload = vec![0u8; v["payload"].as_u64().unwrap_or(0) as usize];
    let mut bytes = (header.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&payload);
    let frame = read_frame(&mut &bytes[..]).unwrap_or_else(|e| panic!("docs/protocol.md: {header}: {e}")).unwrap();
    let again = encode(frame.epoch.0, &frame.msg, &frame.payload);
    again[4..4 + again.len() - 4 - payload.len()].to_vec()
}

#[test]
fn every_complete_header_in_the_protocol_page_is_what_the_code_sends() {
    let headers = headers_in(&protocol_page());
    assert!(headers.len() >= 20, "found only {} complete headers in docs/protocol.md", headers.len());
    let mut kinds = BTreeSet::new();
    for header in &headers {
        let again = reencode(header);
        assert_eq!(
            String::from_utf8_lossy(&again),
            header.as_str(),
            "docs/protocol.md shows a header the code does not send"
        );
        kinds.insert(serde_json::from_str::<serde_json::Value>(header).unwrap()["msg"]["kind"].to_string());
    }
    assert!(kinds.len() >= 15, "the page's headers cover only {kinds:?}");
}

/// Frames pinned here, not in the page: a change to any of these bytes breaks
/// every peer built against version 2 to 4 of the protocol. (The replication
/// frames were changed once on purpose, by the failover work: log positions apart
/// from request numbers, entries with their epoch; version 2, issue 8, added the
/// cluster handshake and password logins; version 3, issue 7, added the eager
/// upload, whose field a request without it leaves out, and a wider window;
/// version 4, issue 7, added the early copies' four message kinds.)
#[test]
fn pinned_frames_byte_for_byte() {
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ");
    // The upload chunk of docs/protocol.md, length prefix and payload included.
    let chunk = encode(0, &Msg::Chunk { seq: Seq(42) }, b"hello");
    let mut want = vec![0x00, 0x00, 0x00, 0x37];
    want.extend_from_slice(br#"{"epoch":0,"payload":5,"msg":{"kind":"chunk","seq":42}}"#);
    want.extend_from_slice(&[0x68, 0x65, 0x6c, 0x6c, 0x6f]);
    assert_eq!(hex(&chunk), hex(&want));
    assert_eq!(ContentHash::of(b"hello").to_string(), "26c7827d889f6da3");

    let pinned: Vec<(u64, Msg, &str)> = vec![
        (0, Msg::Ping, r#"{"epoch":0,"msg":{"kind":"ping"}}"#),
        (
            0,
            Msg::Hello { version: 2, who: Who::Status },
            r#"{"epoch":0,"msg":{"kind":"hello","version":2,"who":{"role":"status"}}}"#,
        ),
        (
            0,
            Msg::Hello {
                version: 2,
                who: Who::Client { user: "alice".into(), device: device(), callback_port: 41234 },
            },
            r#"{"epoch":0,"msg":{"kind":"hello","version":2,"who":{"role":"client","user":"alice","device":"3f9a0c1e5b7d2468","callback_port":41234}}}"#,
        ),
        (
            0,
            Msg::Auth(AuthMsg::ScramClientFirst { user: "alice".into(), nonce: "rOprNGfwEbeRWgbNEkqO".into() }),
            r#"{"epoch":0,"msg":{"kind":"auth","auth":"scram_client_first","user":"alice","nonce":"rOprNGfwEbeRWgbNEkqO"}}"#,
        ),
        (
            1,
            Msg::Auth(AuthMsg::ServerChallenge {
                version: 2,
                purpose: Purpose::Fetch,
                id: Some(ServerId(2)),
                nonce: "a1".repeat(32),
            }),
            r#"{"epoch":1,"msg":{"kind":"auth","auth":"server_challenge","version":2,"purpose":"fetch","id":2,"nonce":"a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1"}}"#,
        ),
        (
            3,
            Msg::Welcome { devices: 2, last_seq: Seq(41) },
            r#"{"epoch":3,"msg":{"kind":"welcome","devices":2,"last_seq":41}}"#,
        ),
        (
            0,
            Msg::Request {
                seq: Seq(45),
                op: Op::Upload { path: "a.txt".into(), size: 5, mtime_ms: 7, base: None, exec: false, eager: true },
            },
            r#"{"epoch":0,"msg":{"kind":"request","seq":45,"op":{"op":"upload","path":"a.txt","size":5,"mtime_ms":7,"base":null,"eager":true}}}"#,
        ),
        (
            0,
            Msg::Request { seq: Seq(44), op: Op::Delete { path: "old.txt".into(), base: None } },
            r#"{"epoch":0,"msg":{"kind":"request","seq":44,"op":{"op":"delete","path":"old.txt","base":null}}}"#,
        ),
        (
            3,
            Msg::Reply { seq: Seq(44), result: OpResult::Done { meta: tombstone("old.txt", 2) } },
            r#"{"epoch":3,"msg":{"kind":"reply","seq":44,"result":{"result":"done","meta":{"path":"old.txt","version":2,"size":0,"mtime_ms":1764150000000,"hash":"ef46db3751d8e999","deleted":true,"atime_ms":0,"ctime_ms":0}}}}"#,
        ),
        (
            3,
            Msg::Heartbeat { pos: LogPos(42), committed: LogPos(41) },
            r#"{"epoch":3,"msg":{"kind":"heartbeat","pos":42,"committed":41}}"#,
        ),
        (3, Msg::Ack { pos: LogPos(42) }, r#"{"epoch":3,"msg":{"kind":"ack","pos":42}}"#),
        (
            3,
            Msg::Apply {
                entry: Box::new(Entry {
                    pos: LogPos(41),
                    epoch: Epoch(3),
                    change: Change::Leave { id: ServerId(2) },
                    request: None,
                }),
            },
            r#"{"epoch":3,"msg":{"kind":"apply","entry":{"pos":41,"epoch":3,"change":{"change":"leave","id":2}}}}"#,
        ),
        (
            2,
            Msg::Election { target: Epoch(3), rank: Rank { epoch: Epoch(2), pos: LogPos(42), id: ServerId(3) } },
            r#"{"epoch":2,"msg":{"kind":"election","target":3,"rank":{"epoch":2,"pos":42,"id":3}}}"#,
        ),
        (
            2,
            Msg::Answer { answer: Answer::Promise { member: true } },
            r#"{"epoch":2,"msg":{"kind":"answer","answer":{"answer":"promise","member":true}}}"#,
        ),
    ];
    for (epoch, msg, header) in pinned {
        let bytes = encode(epoch, &msg, &[]);
        assert_eq!(&bytes[..4], &(header.len() as u32).to_be_bytes(), "{}: length prefix", msg.kind());
        assert_eq!(String::from_utf8_lossy(&bytes[4..]), header, "{}", msg.kind());
        assert_eq!(read_frame(&mut &bytes[..]).unwrap().unwrap().msg, msg, "{}", msg.kind());
    }
}

/// Writes the seed corpus of the cargo-fuzz targets (fuzz/): one file per sample
/// frame under `$FUZZ_SEEDS/frame`, and the same frames behind a step byte for
/// each receiver under `$FUZZ_SEEDS/node` (fuzz/fuzz_targets/node.rs). Ignored:
/// `make fuzz` runs it (`-- --ignored`) on stable before the nightly fuzzing.
#[test]
#[ignore = "writes the fuzz seed corpus; run by make fuzz"]
fn write_fuzz_seeds() {
    let dir = std::path::PathBuf::from(std::env::var("FUZZ_SEEDS").expect("FUZZ_SEEDS names the corpus folder"));
    for target in ["frame", "node"] {
        std::fs::create_dir_all(dir.join(target)).unwrap();
    }
    for (i, (msg, payload)) in messages().iter().enumerate() {
        let bytes = encode(2, msg, payload);
        assert_eq!(read_frame(&mut &bytes[..]).unwrap().unwrap().msg, *msg, "{}", msg.kind());
        std::fs::write(dir.join("frame").join(format!("seed-{i:03}-{}", msg.kind())), &bytes).unwrap();
        for step in [0u8, 1, 6] {
            let node = [&[step][..], &bytes].concat();
            std::fs::write(dir.join("node").join(format!("seed-{i:03}-{step}-{}", msg.kind())), node).unwrap();
        }
    }
}
