//! The replication state machine (`replibox_replica::node::Node`, the handler of
//! every message between servers) fed arbitrary frames, with no socket: a
//! primary with one backup's link receives them on that link (`link_msg`), and
//! a backup receives them from its primary (`from_primary`); entries it asks to
//! persist are reported persisted. The first byte of each step says who gets the
//! next frame and how far the clock moves. Never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use replibox_proto::{read_frame, Epoch, LogPos, ServerId};
use replibox_replica::node::{Config, JoinRequest, Node, Output, Quorum};
use replibox_replica::state::State;
use std::io::{Cursor, Read};

fn config(id: u64, seed: Option<String>) -> Config {
    Config {
        id: ServerId(id),
        addr: format!("s{id}"),
        heartbeat_ms: 20,
        ack_timeout_ms: 200,
        failure_timeout_ms: 80,
        election_timeout_ms: 40,
        fence_timeout_ms: 240,
        seed,
        quorum: Quorum::Live,
    }
}

/// Reports every entry the node asks to persist as persisted (what the core does
/// once the store has it), until it asks for nothing more.
fn drive(node: &mut Node, now: u64, mut out: Vec<Output>) {
    for _ in 0..64 {
        let entries: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                Output::Persist(e) => Some(e.pos),
                _ => None,
            })
            .collect();
        if entries.is_empty() {
            return;
        }
        out = entries.into_iter().flat_map(|pos| node.persisted(now, pos, Vec::new())).collect();
    }
}

fuzz_target!(|data: &[u8]| {
    let mut now = 1_000;
    let mut primary = Node::new(config(1, None), State::default(), Vec::new(), now);
    let out = primary.start_primary(now);
    drive(&mut primary, now, out);
    let join = JoinRequest {
        id: Some(ServerId(2)),
        addr: "s2".into(),
        pos: LogPos(0),
        last_epoch: Epoch(0),
        epoch: primary.epoch(),
        local_addr: None,
        member: false,
    };
    let out = primary.link_join(now, 7, join);
    drive(&mut primary, now, out);
    let mut backup = Node::new(config(2, Some("s1".into())), State::default(), Vec::new(), now);
    let out = backup.start_backup(now);
    drive(&mut backup, now, out);

    let mut r = Cursor::new(data);
    let mut step = [0u8; 1];
    while r.read_exact(&mut step).is_ok() {
        now += u64::from(step[0] >> 2) * 5;
        let Ok(Some(frame)) = read_frame(&mut r) else { return };
        match step[0] & 3 {
            0 => {
                let out = primary.link_msg(now, 7, frame.epoch, frame.msg);
                drive(&mut primary, now, out);
            }
            1 => {
                let out = backup.from_primary(now, frame.epoch, frame.msg);
                drive(&mut backup, now, out);
            }
            _ => {
                let out = primary.tick(now);
                drive(&mut primary, now, out);
                let out = backup.tick(now);
                drive(&mut backup, now, out);
            }
        }
    }
});
