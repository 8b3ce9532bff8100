//! One sample of every message kind, operation, result, notice, entry change,
//! `who`, authentication step and election answer the protocol carries, with the
//! payload each travels with. Shared by the golden frames
//! (crates/proto/tests/golden.rs) and the server's random-input test
//! (crates/client/tests/process/random_input.rs, which mutates them), so that a
//! kind added to the protocol is fuzzed as soon as it has a sample.

// Each test binary uses only some of these.
#![allow(dead_code)]

use replibox_proto::auth::{AuthMsg, Refusal};
use replibox_proto::repl::{Change, Entry, LastRequest, Member, Session};
use replibox_proto::{
    Answer, ContentHash, DeviceId, Epoch, FileMeta, LogPos, Msg, Notice, Op, OpResult, Purpose, Rank, Seq, ServerId,
    StoredCredentials, Version, Who, PROTOCOL_VERSION,
};

pub fn meta(path: &str, version: u64) -> FileMeta {
    FileMeta {
        path: path.into(),
        version: Version(version),
        size: 5,
        mtime_ms: 1_764_150_000_000,
        hash: ContentHash::of(b"hello"),
        deleted: false,
        atime_ms: 0,
        ctime_ms: 0,
        exec: false,
        dir: false,
    }
}

pub fn tombstone(path: &str, version: u64) -> FileMeta {
    FileMeta { size: 0, deleted: true, hash: ContentHash::default(), ..meta(path, version) }
}

pub fn device() -> DeviceId {
    DeviceId("3f9a0c1e5b7d2468".into())
}

/// Every variant of every tagged enum the protocol carries.
pub fn ops() -> Vec<Op> {
    vec![
        Op::List { after: None },
        Op::Upload {
            path: "docs/a b.txt".into(),
            size: 5,
            mtime_ms: 1_764_150_000_000,
            base: Some(Version(2)),
            exec: true,
            eager: true,
        },
        Op::Download { path: "docs/a b.txt".into() },
        Op::Delete { path: "old.txt".into(), base: Some(Version(1)) },
        Op::Mkdir { path: "dir/empty".into(), base: None },
        Op::Rename { from: "a.txt".into(), to: "dir/b.txt".into(), base: None },
        Op::Passwd { credentials: credentials() },
    ]
}

/// Credentials of a sample account (few iterations: only their shape matters).
pub fn credentials() -> StoredCredentials {
    StoredCredentials::derive("pencil", b"a salt of 16 B!!", 4096).unwrap()
}

/// Every step of every authentication handshake (`msg.auth`).
pub fn auths() -> Vec<AuthMsg> {
    let hex = |b: &str| b.repeat(32);
    vec![
        AuthMsg::ServerChallenge {
            version: PROTOCOL_VERSION,
            purpose: Purpose::Link,
            id: Some(ServerId(2)),
            nonce: hex("a1"),
        },
        AuthMsg::ServerResponse { id: Some(ServerId(1)), nonce: hex("b2"), mac: hex("c3") },
        AuthMsg::ServerProof { mac: hex("d4") },
        AuthMsg::ServerAccepted,
        AuthMsg::ScramClientFirst { user: "alice".into(), nonce: "rOprNGfwEbeRWgbNEkqO".into() },
        AuthMsg::ScramNoAccount,
        AuthMsg::ScramRegister { credentials: credentials() },
        AuthMsg::ScramServerFirst {
            nonce: "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into(),
            salt: "W22ZaJ0SNY7soEsUEjb6gQ==".into(),
            iterations: 600_000,
        },
        AuthMsg::ScramClientFinal {
            nonce: "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into(),
            proof: "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=".into(),
        },
        AuthMsg::ScramServerFinal { signature: "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=".into() },
        AuthMsg::CallbackChallenge { nonce: hex("ab") },
        AuthMsg::CallbackProof { epoch: Epoch(3), device: device(), proof: hex("ef") },
        AuthMsg::Failed { why: Refusal::WrongPassword, detail: "wrong password".into() },
    ]
}

pub fn results() -> Vec<OpResult> {
    vec![
        OpResult::Done { meta: meta("docs/a b.txt", 3) },
        OpResult::Listing { files: vec![meta("a", 1), tombstone("b", 2)], more: true },
        OpResult::Data { meta: meta("a", 1) },
        OpResult::Conflict { current: Some(meta("a", 4)) },
        OpResult::Gone { path: "a".into() },
        OpResult::Error { message: "no such file on the server: a".into() },
        OpResult::Unavailable { message: "the server is out of space".into() },
        OpResult::PasswordChanged,
    ]
}

pub fn notices() -> Vec<Notice> {
    vec![
        Notice::Put { meta: meta("a", 2) },
        Notice::Put { meta: FileMeta { dir: true, size: 0, ..meta("folder", 1) } },
        Notice::Delete { meta: tombstone("a", 3) },
        Notice::Rename { from: "a".into(), meta: meta("b", 1) },
    ]
}

pub fn changes() -> Vec<Change> {
    let member = |id: u64, addr: &str| Member { id: ServerId(id), addr: addr.into() };
    vec![
        Change::Put { user: "alice".into(), meta: meta("a", 1), xfer: "x4242-1764150000000000000-7".into() },
        Change::Delete { user: "alice".into(), meta: tombstone("a", 2) },
        Change::Put {
            user: "alice".into(),
            meta: FileMeta { dir: true, size: 0, ..meta("folder", 1) },
            xfer: "dir".into(),
        },
        Change::Rename { user: "alice".into(), from: tombstone("a", 2), to: meta("b", 1) },
        Change::Login {
            session: Session {
                user: "alice".into(),
                device: device(),
                ip: "127.0.0.4".into(),
                callback_port: 41234,
                token: "9c2e".into(),
            },
        },
        Change::Logout { device: device() },
        Change::ClearSessions,
        Change::NewEpoch { epoch: Epoch(2), primary: ServerId(1), members: vec![member(1, "127.0.0.1:4000")] },
        Change::Join { member: member(2, "127.0.0.2:4000") },
        Change::Leave { id: ServerId(2) },
        Change::ReserveId { id: ServerId(4) },
        Change::Account { user: "alice".into(), credentials: credentials() },
    ]
}

pub fn whos() -> Vec<Who> {
    vec![
        Who::Client { user: "alice".into(), device: device(), callback_port: 41234 },
        Who::Status,
        Who::Server {
            id: Some(ServerId(2)),
            ip: Some("127.0.0.2".into()),
            port: 4000,
            pos: LogPos(17),
            last_epoch: Epoch(1),
            member: true,
        },
        Who::Fetch { id: ServerId(2) },
        Who::Peer { id: ServerId(3) },
        Who::Primary { id: ServerId(3), addr: "127.0.0.3:4000".into(), device: device() },
    ]
}

/// One sample of every message kind, with the payload it travels with.
pub fn messages() -> Vec<(Msg, Vec<u8>)> {
    let mut v: Vec<(Msg, Vec<u8>)> =
        whos().into_iter().map(|who| (Msg::Hello { version: PROTOCOL_VERSION, who }, vec![])).collect();
    v.extend([
        (Msg::Welcome { devices: 2, last_seq: Seq(41) }, vec![]),
        (Msg::Refused { reason: "user alice already has 2 devices connected".into() }, vec![]),
        (Msg::Redirect { primary: "127.0.0.1:4000".into() }, vec![]),
        (Msg::Proceed { seq: Seq(42) }, vec![]),
        (Msg::Chunk { seq: Seq(42) }, b"hello".to_vec()),
        (Msg::UploadEnd { seq: Seq(42), hash: ContentHash::of(b"hello") }, vec![]),
        (Msg::DownloadEnd { seq: Seq(43), hash: ContentHash::of(b"hello") }, vec![]),
        (Msg::Status { status: serde_json::json!({"epoch": 1, "id": 2, "role": "backup"}) }, vec![]),
        (Msg::Joined { id: ServerId(2), primary: ServerId(1), snapshot: true, member: false }, vec![]),
        (Msg::SnapshotChunk, br#"{"pos":40}"#.to_vec()),
        (Msg::SnapshotEnd { pos: LogPos(40) }, vec![]),
        (Msg::XferChunk { xfer: "x1".into() }, b"hello".to_vec()),
        (Msg::XferEnd { xfer: "x1".into(), size: 5, hash: ContentHash::of(b"hello") }, vec![]),
        (Msg::XferAbort { xfer: "x1".into() }, vec![]),
        (Msg::EarlyBegin { xfer: "x1".into(), path: "big.bin".into(), size: 5 }, vec![]),
        (Msg::EarlyChunk { xfer: "x1".into() }, b"hello".to_vec()),
        (Msg::EarlyEnd { xfer: "x1".into(), hash: ContentHash::of(b"hello") }, vec![]),
        (Msg::EarlyAbort { xfer: "x1".into() }, vec![]),
        (Msg::Heartbeat { pos: LogPos(42), committed: LogPos(41) }, vec![]),
        (Msg::Ack { pos: LogPos(42) }, vec![]),
        (Msg::CaughtUp { pos: LogPos(40) }, vec![]),
        (Msg::NotPrimary { reason: "this server does not know the primary yet".into() }, vec![]),
        (Msg::Fence { reason: "no acknowledgement within 2000 ms".into(), pos: LogPos(42) }, vec![]),
        (Msg::Election { target: Epoch(3), rank: Rank { epoch: Epoch(2), pos: LogPos(42), id: ServerId(3) } }, vec![]),
        (Msg::Coordinator { epoch: Epoch(3), id: ServerId(3), addr: "127.0.0.3:4000".into() }, vec![]),
        (Msg::Resume, vec![]),
        (Msg::Fetch { user: "alice".into(), path: "docs/a b.txt".into() }, vec![]),
        (Msg::Ping, vec![]),
        (Msg::Pong, vec![]),
        (Msg::Bye, vec![]),
    ]);
    v.extend(ops().into_iter().enumerate().map(|(i, op)| (Msg::Request { seq: Seq(i as u64 + 1), op }, vec![])));
    v.extend(results().into_iter().map(|result| (Msg::Reply { seq: Seq(44), result }, vec![])));
    v.extend(notices().into_iter().map(|notice| (Msg::Notice { notice }, vec![])));
    for (i, change) in changes().into_iter().enumerate() {
        let request =
            (i == 0).then(|| (device(), LastRequest { seq: Seq(42), result: OpResult::Done { meta: meta("a", 1) } }));
        let pos = LogPos(41 + i as u64);
        (v).push((Msg::Apply { entry: Box::new(Entry { pos, epoch: Epoch(2), change, request }) }, vec![]));
    }
    v.extend(answers().into_iter().map(|answer| (Msg::Answer { answer }, vec![])));
    v.extend(auths().into_iter().map(|auth| (Msg::Auth(auth), vec![])));
    v
}

pub fn answers() -> Vec<Answer> {
    vec![
        Answer::Ok,
        Answer::Promise { member: true },
        Answer::Primary { addr: "127.0.0.1:4000".into() },
        Answer::Following { addr: "127.0.0.1:4000".into() },
        Answer::Stale,
        Answer::Promised { to: ServerId(2) },
        Answer::Accepted,
        Answer::Fenced,
        Answer::Ahead,
    ]
}
