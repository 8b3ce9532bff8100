//! The "backups first" rule as a pure state machine.
//!
//! [`Acks`] tracks the entries a primary has committed but not yet answered: each
//! waits for every backup that was live when it was proposed. Acks are cumulative
//! (a backup applies entries in order), entries complete strictly in order, and a
//! backup that holds up the oldest entry past its deadline is reported overdue so
//! that the caller drops it. Time is an input in milliseconds; nothing here reads a
//! clock, touches a socket or spawns a thread. The [`crate::node::Node`] holds one
//! on a primary, and the seeded simulation (`crate::sim`) checks the rule it
//! serves against an oracle of its own.

use replibox_proto::{LogPos, ServerId};
use std::collections::{BTreeSet, VecDeque};

#[derive(Debug)]
struct Pending<D> {
    pos: LogPos,
    waiting: BTreeSet<ServerId>,
    deadline_ms: u64,
    done: D,
}

/// Entries waiting for their acknowledgements, each with what to do when stored
/// everywhere (`D`: the reply to a client, say).
#[derive(Debug)]
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

    /// Entry `pos` (above every pending one) was committed at `now_ms`.
    pub fn propose(&mut self, pos: LogPos, now_ms: u64, done: D) {
        debug_assert!(self.pending.back().is_none_or(|p| p.pos < pos), "entries are proposed in order");
        let waiting = self.live.clone();
        self.pending.push_back(Pending { pos, waiting, deadline_ms: now_ms + self.timeout_ms, done });
    }

    /// Backup `id` has applied every entry up to `pos`.
    pub fn ack(&mut self, id: ServerId, pos: LogPos) {
        for p in self.pending.iter_mut().take_while(|p| p.pos <= pos) {
            p.waiting.remove(&id);
        }
    }

    /// The entries now stored on every backup they waited for, oldest first. An
    /// entry never completes before an older one.
    pub fn settle(&mut self) -> Vec<(LogPos, D)> {
        let mut out = Vec::new();
        while self.pending.front().is_some_and(|p| p.waiting.is_empty()) {
            if let Some(p) = self.pending.pop_front() {
                out.push((p.pos, p.done));
            }
        }
        out
    }

    /// Like [`Acks::settle`], but an entry also waits until `enough` says so of
    /// its position (a majority holds it, say): it stops at the first that is not.
    pub fn settle_while(&mut self, enough: impl Fn(LogPos) -> bool) -> Vec<(LogPos, D)> {
        let mut out = Vec::new();
        while self.pending.front().is_some_and(|p| p.waiting.is_empty() && enough(p.pos)) {
            if let Some(p) = self.pending.pop_front() {
                out.push((p.pos, p.done));
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

    /// Takes the oldest entry out, complete or not (a primary stepping down fails
    /// every entry still waiting).
    pub fn pop_front(&mut self) -> Option<(LogPos, D)> {
        self.pending.pop_front().map(|p| (p.pos, p.done))
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

    #[test]
    fn waits_for_every_live_backup_and_completes_in_order() {
        let mut a: Acks<&str> = Acks::new(100);
        a.add(ServerId(2));
        a.add(ServerId(3));
        a.propose(LogPos(1), 0, "one");
        a.propose(LogPos(2), 0, "two");
        a.ack(ServerId(2), LogPos(2));
        assert!(a.settle().is_empty(), "3 has acked nothing");
        a.ack(ServerId(3), LogPos(1));
        assert_eq!(a.settle(), vec![(LogPos(1), "one")]);
        assert_eq!(a.overdue(99), vec![]);
        assert_eq!(a.overdue(100), vec![ServerId(3)]);
        a.remove(ServerId(3));
        assert_eq!(a.settle(), vec![(LogPos(2), "two")]);
    }

    #[test]
    fn a_backup_that_joins_later_is_not_waited_for_by_older_entries() {
        let mut a: Acks<u8> = Acks::new(100);
        a.propose(LogPos(1), 0, 1);
        a.add(ServerId(2));
        a.propose(LogPos(2), 0, 2);
        assert_eq!(a.settle(), vec![(LogPos(1), 1)]);
        assert!(a.settle().is_empty());
        a.ack(ServerId(2), LogPos(2));
        assert_eq!(a.settle(), vec![(LogPos(2), 2)]);
    }
}
