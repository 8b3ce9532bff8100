//! The "backups first" rule as a pure state machine.
//!
//! [`Acks`] tracks the entries a primary has committed but not yet answered: each
//! waits for every backup that was live when it was proposed. Acks are cumulative
//! (a backup applies entries in order), entries complete strictly in order, and a
//! backup that holds up the oldest entry past its deadline is reported overdue so
//! that the caller drops it. Time is an input in milliseconds; nothing here reads a
//! clock, touches a socket or spawns a thread, so a seeded simulation can drive it
//! (see the tests at the bottom).

use replibox_proto::{Seq, ServerId};
use std::collections::{BTreeSet, VecDeque};

struct Pending<D> {
    seq: Seq,
    waiting: BTreeSet<ServerId>,
    deadline_ms: u64,
    done: D,
}

/// Entries waiting for their acknowledgements, each with what to do when stored
/// everywhere (`D`: the reply to a client, say).
pub struct Acks<D> {
    pending: VecDeque<Pending<D>>,
    live: BTreeSet<ServerId>,
    timeout_ms: u64,
}

impl<D> Acks<D> {
    /// A tracker that gives a backup `timeout_ms` to acknowledge an entry.
    pub fn new(timeout_ms: u64) -> Acks<D> {
        Acks { pending: VecDeque::new(), live: BTreeSet::new(), timeout_ms }
    }

    /// A backup is live: entries proposed from now on wait for it.
    pub fn add(&mut self, id: ServerId) {
        self.live.insert(id);
    }

    /// A backup is gone: nothing waits for it any more.
    pub fn remove(&mut self, id: ServerId) {
        self.live.remove(&id);
        for p in &mut self.pending {
            p.waiting.remove(&id);
        }
    }

    /// True when entries wait for `id`.
    pub fn is_live(&self, id: ServerId) -> bool {
        self.live.contains(&id)
    }

    /// Entry `seq` (above every pending one) was committed at `now_ms`.
    pub fn propose(&mut self, seq: Seq, now_ms: u64, done: D) {
        debug_assert!(self.pending.back().is_none_or(|p| p.seq < seq), "entries are proposed in order");
        let waiting = self.live.clone();
        self.pending.push_back(Pending { seq, waiting, deadline_ms: now_ms + self.timeout_ms, done });
    }

    /// Backup `id` has applied every entry up to `seq`.
    pub fn ack(&mut self, id: ServerId, seq: Seq) {
        for p in self.pending.iter_mut().take_while(|p| p.seq <= seq) {
            p.waiting.remove(&id);
        }
    }

    /// The entries now stored on every backup they waited for, oldest first. An
    /// entry never completes before an older one.
    pub fn settle(&mut self) -> Vec<(Seq, D)> {
        let mut out = Vec::new();
        while self.pending.front().is_some_and(|p| p.waiting.is_empty()) {
            if let Some(p) = self.pending.pop_front() {
                out.push((p.seq, p.done));
            }
        }
        out
    }

    /// Backups holding up the oldest entry past its deadline.
    pub fn overdue(&self, now_ms: u64) -> Vec<ServerId> {
        match self.pending.front() {
            Some(p) if p.deadline_ms <= now_ms => p.waiting.iter().copied().collect(),
            _ => Vec::new(),
        }
    }

    /// When the oldest entry's deadline falls.
    pub fn next_deadline(&self) -> Option<u64> {
        self.pending.front().map(|p| p.deadline_ms)
    }

    /// How many entries are not yet complete.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// True when no entry waits.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Change, Entry, Member, Session, State};
    use replibox_proto::{ContentHash, DeviceId, FileMeta};
    use std::collections::{BTreeMap, VecDeque};

    #[test]
    fn waits_for_every_live_backup_and_completes_in_order() {
        let mut a: Acks<&str> = Acks::new(100);
        a.add(ServerId(2));
        a.add(ServerId(3));
        a.propose(Seq(1), 0, "one");
        a.propose(Seq(2), 0, "two");
        a.ack(ServerId(2), Seq(2));
        assert!(a.settle().is_empty(), "3 has acked nothing");
        a.ack(ServerId(3), Seq(1));
        assert_eq!(a.settle(), vec![(Seq(1), "one")]);
        assert_eq!(a.overdue(99), vec![]);
        assert_eq!(a.overdue(100), vec![ServerId(3)]);
        a.remove(ServerId(3));
        assert_eq!(a.settle(), vec![(Seq(2), "two")]);
    }

    #[test]
    fn a_backup_that_joins_later_is_not_waited_for_by_older_entries() {
        let mut a: Acks<u8> = Acks::new(100);
        a.propose(Seq(1), 0, 1);
        a.add(ServerId(2));
        a.propose(Seq(2), 0, 2);
        assert_eq!(a.settle(), vec![(Seq(1), 1)]);
        assert!(a.settle().is_empty());
        a.ack(ServerId(2), Seq(2));
        assert_eq!(a.settle(), vec![(Seq(2), 2)]);
    }

    /// SplitMix64, so that every run of a seed is the same run.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// A backup in the simulation: its state, the link's queue towards it (TCP:
    /// ordered, lost only when the link breaks), and its acks on the way back.
    struct Backup {
        state: State,
        inbox: VecDeque<Entry>,
        acks: VecDeque<Seq>,
        up: bool,
        stalled: bool,
        /// Installed a snapshot and receives entries, but has not caught up: no
        /// entry waits for it yet.
        joining: bool,
    }

    struct Sim {
        rng: Rng,
        now: u64,
        primary: State,
        /// The primary's state after every seq, to check backups hold a prefix.
        history: BTreeMap<Seq, State>,
        backups: BTreeMap<ServerId, Backup>,
        acks: Acks<Seq>,
        /// Highest seq answered to a client.
        answered: Seq,
        /// The backups each waiting entry waits for (those live when it was proposed).
        waited: BTreeMap<Seq, Vec<ServerId>>,
        trace: Vec<String>,
    }

    const PATHS: [&str; 4] = ["a", "b", "d/c", "d/e"];

    impl Sim {
        fn new(seed: u64) -> Sim {
            let mut primary = State::default();
            let members = vec![Member { id: ServerId(1), addr: "p".into() }];
            let first = Entry {
                seq: Seq(1),
                change: Change::NewEpoch { epoch: replibox_proto::Epoch(1), primary: ServerId(1), members },
                request: None,
            };
            primary.apply(&first).unwrap();
            let mut history = BTreeMap::new();
            history.insert(Seq(1), primary.clone());
            let mut backups = BTreeMap::new();
            for id in 2..=4 {
                backups.insert(
                    ServerId(id),
                    Backup {
                        state: primary.clone(),
                        inbox: VecDeque::new(),
                        acks: VecDeque::new(),
                        up: true,
                        stalled: false,
                        joining: false,
                    },
                );
            }
            let mut acks = Acks::new(50);
            for id in backups.keys() {
                acks.add(*id);
            }
            Sim {
                rng: Rng(seed),
                now: 0,
                primary,
                history,
                backups,
                acks,
                answered: Seq(1),
                waited: BTreeMap::new(),
                trace: Vec::new(),
            }
        }

        /// A change a client could ask for now, checked by the same rules the core uses.
        fn random_change(&mut self) -> Option<Change> {
            let path = PATHS[self.rng.below(PATHS.len() as u64) as usize];
            let other = PATHS[self.rng.below(PATHS.len() as u64) as usize];
            let user = "u".to_string();
            Some(match self.rng.below(5) {
                0 | 1 => {
                    let base = self.primary.live(&user, path).map(|m| m.version);
                    self.primary.check_upload(&user, path, base).ok()?;
                    let n = self.rng.next();
                    let meta = FileMeta {
                        path: path.into(),
                        version: self.primary.next_version(&user, path),
                        size: n % 100,
                        mtime_ms: n as i64 % 1000,
                        hash: ContentHash(n),
                        deleted: false,
                        atime_ms: 0,
                        ctime_ms: 0,
                    };
                    Change::Put { user, meta, xfer: "x".into() }
                }
                2 => Change::Delete { meta: self.primary.check_delete(&user, path, None).ok()?, user },
                3 => {
                    let (from, to) = self.primary.check_rename(&user, path, other, None).ok()?;
                    Change::Rename { user, from, to }
                }
                _ => {
                    let device = DeviceId(format!("{:08x}", self.rng.below(3)));
                    if self.primary.sessions.contains_key(&device) {
                        Change::Logout { device }
                    } else {
                        let session =
                            Session { user, device, ip: "127.0.0.4".into(), callback_port: 1, token: "t".into() };
                        Change::Login { session }
                    }
                }
            })
        }

        fn propose(&mut self, change: Change) {
            let entry = Entry { seq: self.primary.seq.next(), change, request: None };
            self.primary.apply(&entry).unwrap();
            self.history.insert(entry.seq, self.primary.clone());
            // Every connected backup gets every entry, joining ones included.
            for b in self.backups.values_mut() {
                if b.up {
                    b.inbox.push_back(entry.clone());
                }
            }
            let live: Vec<ServerId> = self.backups.keys().copied().filter(|id| self.acks.is_live(*id)).collect();
            self.waited.insert(entry.seq, live);
            self.acks.propose(entry.seq, self.now, entry.seq);
            self.trace.push(format!("t={} propose seq={}", self.now, entry.seq));
        }

        fn drop_backup(&mut self, id: ServerId, why: &str) {
            self.trace.push(format!("t={} drop {id}: {why}", self.now));
            self.acks.remove(id);
            if let Some(b) = self.backups.get_mut(&id) {
                b.inbox.clear();
                b.acks.clear();
                b.up = false;
            }
            if self.primary.members.contains_key(&id) {
                self.propose(Change::Leave { id });
            }
        }

        fn step(&mut self) {
            let ids: Vec<ServerId> = self.backups.keys().copied().collect();
            let id = ids[self.rng.below(ids.len() as u64) as usize];
            match self.rng.below(21) {
                0..=5 => {
                    if let Some(c) = self.random_change() {
                        self.propose(c);
                    }
                }
                6..=10 => {
                    let b = self.backups.get_mut(&id).unwrap();
                    if b.up && !b.stalled {
                        if let Some(e) = b.inbox.pop_front() {
                            b.state.apply(&e).unwrap_or_else(|err| panic!("backup {id}: {err}"));
                            b.acks.push_back(e.seq);
                        }
                    }
                }
                11..=14 => {
                    let b = self.backups.get_mut(&id).unwrap();
                    if let Some(s) = b.acks.pop_front() {
                        self.acks.ack(id, s);
                    }
                }
                15 => self.now += self.rng.below(30),
                // A crash: the primary sees the link close.
                16 if self.backups[&id].up => self.drop_backup(id, "crashed"),
                17 => {
                    // A rejoin: the primary's snapshot, then entries while it catches
                    // up; nothing waits for it until it says it has caught up (19).
                    let b = self.backups.get_mut(&id).unwrap();
                    if !b.up {
                        b.state = self.primary.clone();
                        b.up = true;
                        b.stalled = false;
                        b.joining = true;
                        self.trace.push(format!("t={} rejoin {id} at seq={}", self.now, self.primary.seq));
                    }
                }
                19 => {
                    let b = self.backups.get_mut(&id).unwrap();
                    if b.up && b.joining && !b.stalled {
                        b.joining = false;
                        self.trace.push(format!("t={} {id} caught up at seq={}", self.now, b.state.seq));
                        self.acks.add(id);
                        self.propose(Change::Join { member: Member { id, addr: format!("b{id}") } });
                    }
                }
                18 => {
                    let b = self.backups.get_mut(&id).unwrap();
                    b.stalled = !b.stalled;
                }
                _ => {}
            }
            // Dropping the backups that hold up the oldest entry may reveal the next
            // entry overdue too: repeat until none is.
            let mut settled = Vec::new();
            loop {
                settled.extend(self.acks.settle());
                let late = self.acks.overdue(self.now);
                if late.is_empty() {
                    break;
                }
                for id in late {
                    self.drop_backup(id, "overdue");
                }
            }
            for (seq, _) in settled {
                // Invariant 1, backups first: answered only once every backup it
                // waited for, and still live, holds it.
                for bid in self.waited.remove(&seq).unwrap_or_default() {
                    if self.acks.is_live(bid) {
                        let at = self.backups[&bid].state.seq;
                        assert!(at >= seq, "seq={seq} answered but live backup {bid} is at {at}");
                    }
                }
                assert!(seq > self.answered, "answers out of order: {seq} after {}", self.answered);
                self.answered = seq;
            }
            // A stalled backup delays answers by at most the bound: nothing still
            // waits past its deadline.
            assert!(
                self.acks.next_deadline().is_none_or(|d| d > self.now),
                "an entry waits past its deadline at t={}",
                self.now
            );
            // Every backup holds exactly a prefix of the primary's history.
            for (bid, b) in &self.backups {
                if b.up {
                    assert_eq!(&b.state, &self.history[&b.state.seq], "backup {bid} diverged at seq={}", b.state.seq);
                }
            }
        }

        /// Lets every message through; every live backup must end equal to the primary.
        fn drain(&mut self) {
            for b in self.backups.values_mut() {
                b.stalled = false;
            }
            loop {
                let mut moved = false;
                for (id, b) in self.backups.iter_mut() {
                    while let Some(e) = b.inbox.pop_front() {
                        b.state.apply(&e).unwrap();
                        b.acks.push_back(e.seq);
                        moved = true;
                    }
                    while let Some(s) = b.acks.pop_front() {
                        self.acks.ack(*id, s);
                        moved = true;
                    }
                }
                for (seq, _) in self.acks.settle() {
                    self.answered = seq;
                    self.waited.remove(&seq);
                }
                if !moved {
                    break;
                }
            }
            assert!(self.acks.is_empty(), "entries still waiting after every message was delivered");
            // Every connected backup, a joining one too, ends equal to the primary.
            for (id, b) in &self.backups {
                if b.up {
                    assert_eq!(b.state, self.primary, "backup {id} differs from the primary after draining");
                }
            }
        }
    }

    #[test]
    fn seeded_simulation_keeps_backups_first_and_prefix_invariants() {
        for seed in 0..300u64 {
            let mut sim = Sim::new(seed);
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                for _ in 0..400 {
                    sim.step();
                }
                sim.drain();
            }));
            if let Err(e) = outcome {
                let tail: Vec<_> = sim.trace.iter().rev().take(30).rev().cloned().collect();
                panic!("seed {seed} failed: {e:?}\nlast events:\n{}", tail.join("\n"));
            }
        }
    }
}
