//! The Bully election as a pure state machine.
//!
//! A server that suspects its primary (and may stand) asks every other server it
//! knows, with its [`Rank`]: the epoch and position of its last entry, then its id.
//! Each answers with a [`Reply`]:
//!
//! - a live primary says so ([`Reply::Primary`]), and so does a server that still
//!   hears its primary ([`Reply::Following`]): the candidate goes back to following
//!   (a false suspicion is harmless);
//! - a server that ranks higher and may stand answers [`Reply::Ok`] and runs its
//!   own election; the candidate then waits for a coordinator, and starts again if
//!   none comes in time;
//! - any other server *promises* the candidate the target epoch
//!   ([`Reply::Promise`]): it will not stand for that epoch, nor follow anyone
//!   else in it.
//!
//! The candidate wins once every server it asked has promised or is known to be
//! down (its port refused the connection). The one exception is the server it
//! suspects, the old primary, whose host may be cut off without a word: it is
//! waited for until the round's deadline only (a live one answers at once that it
//! is alive; a dead process refuses at once). Any other server that does not answer in time makes the round fail,
//! and the candidate tries again later: a server that may be alive might also be a
//! candidate, and two primaries of one epoch must never be. That is the safety
//! argument, in one line: two winners of one epoch would each need the other's
//! promise for it, and a server promises an epoch once.
//!
//! Nothing here reads a clock, opens a socket or draws a random number: time is an
//! input in milliseconds, and every output is data for the caller to carry out.

use std::collections::BTreeMap;

/// A server's id, as the election sees it.
pub type Id = u64;

/// Where a server stands: the most up-to-date ranks highest (the epoch of its last
/// entry, then its position), and among equals the highest id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rank {
    /// The epoch of its last entry.
    pub epoch: u64,
    /// The position of its last entry.
    pub pos: u64,
    /// Its id.
    pub id: Id,
}

/// What a server answers a candidate (and, for [`Reply::Accepted`], a coordinator).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// I rank higher and may stand: I take the election over.
    Ok,
    /// I promise not to stand for the target epoch nor to follow anyone else in it.
    Promise {
        /// I am a caught-up member: the new primary should count on me.
        member: bool,
    },
    /// I am the live primary, serving at this address.
    Primary {
        /// Where.
        addr: String,
        /// My epoch.
        epoch: u64,
    },
    /// I still hear my primary at this address.
    Following {
        /// Its address.
        addr: String,
        /// Its epoch.
        epoch: u64,
    },
    /// Your epoch is behind mine.
    Stale {
        /// Mine.
        epoch: u64,
    },
    /// I promised the target epoch (or a later one) to another candidate.
    Promised {
        /// That candidate.
        to: Id,
    },
    /// I follow you as the primary of the announced epoch.
    Accepted,
    /// My history goes further than yours and I may not stand: no promise (a
    /// majority election must not be won by a server behind a voter).
    Ahead,
}

/// How the server answering an election sees itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    /// Its rank.
    pub rank: Rank,
    /// The highest epoch it knows of.
    pub epoch: u64,
    /// It may stand: a caught-up member, not joining, not dropped, not missing files.
    pub eligible: bool,
    /// It is a caught-up member of the membership it holds.
    pub member: bool,
    /// Its relation to a primary.
    pub status: Status,
    /// The primary it followed and no longer hears, if any: when it takes an
    /// election over, its own round does not wait for that one beyond the
    /// deadline (as if it had suspected it first).
    pub suspect: Option<Id>,
    /// Elections need a majority (`--quorum majority`): a server whose history
    /// goes further than a candidate's never promises it (it answers Ok when it
    /// may stand, [`Reply::Ahead`] otherwise), so that no majority elects a
    /// server that lacks what a majority acknowledged.
    pub majority: bool,
}

/// A server's relation to a primary, when it answers an election.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// It is the primary, serving there.
    Primary(String),
    /// It hears its primary, alive, there.
    Following(String),
    /// It has no live primary.
    Lost,
}

/// A server standing in an election, as its message says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Its id.
    pub from: Id,
    /// The epoch it knows of.
    pub from_epoch: u64,
    /// The epoch it stands for.
    pub target: u64,
    /// Its rank.
    pub rank: Rank,
}

/// What the election asks of its caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Out {
    /// Send an election message for `target` (with this server's rank) to `to`, and
    /// report its answer with [`Bully::reply`] or [`Bully::unreachable`].
    Ask {
        /// The server asked.
        to: Id,
        /// The epoch this server stands for.
        target: u64,
    },
    /// This server won `epoch`: it becomes primary, counting on `members` (the
    /// servers that promised and are caught-up members).
    Won {
        /// The new epoch.
        epoch: u64,
        /// The members that promised.
        members: Vec<Id>,
    },
    /// A primary is alive there: follow it instead.
    Follow {
        /// Its address.
        addr: String,
        /// Its epoch.
        epoch: u64,
    },
    /// A server knows of a later epoch than this one did.
    Behind {
        /// That epoch.
        epoch: u64,
    },
}

/// How a round ended without a winner, kept for the log and for `--status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Setback {
    /// A server that may be alive did not answer in time.
    NoAnswer(Id),
    /// A server promised the epoch to another candidate.
    PromisedElsewhere(Id),
    /// A higher-ranked server took over, and no coordinator came in time.
    NoCoordinator,
    /// A server knows of a later epoch than this one.
    Behind(u64),
    /// A server's history goes further than this one's, and it may not stand.
    Ahead(Id),
    /// Too few servers promised for a majority of the membership.
    NoMajority {
        /// Promises heard (this server's own not counted).
        promises: usize,
        /// Promises needed.
        needed: usize,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Heard {
    Reply(Reply),
    /// The connection was refused or closed: that server's process is down.
    Down,
    /// No answer (a timeout): the server may be alive.
    Silent,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    Idle,
    Electing {
        target: u64,
        deadline: u64,
        exempt: Option<Id>,
        heard: BTreeMap<Id, Option<Heard>>,
        /// Promises needed from the others (a majority election; 0 otherwise).
        need: usize,
    },
    /// A higher-ranked server took over (or this one promised): wait for its
    /// coordinator until the deadline.
    Deferred {
        deadline: u64,
    },
    /// The last round failed: stand again no earlier than `until`.
    Backoff {
        until: u64,
    },
}

/// One server's part in elections.
#[derive(Clone, Debug)]
pub struct Bully {
    me: Id,
    timeout_ms: u64,
    phase: Phase,
    /// The one candidate this server promised an epoch to (the latest promise).
    promised: Option<(u64, Id)>,
    /// The highest epoch heard of, so that a new target is above every epoch any
    /// server may already have promised or started.
    highest: u64,
    last_setback: Option<Setback>,
}

impl Bully {
    /// A server `me` that waits `timeout_ms` for answers, and as long again for a
    /// coordinator after an Ok.
    pub fn new(me: Id, timeout_ms: u64) -> Bully {
        Bully { me, timeout_ms: timeout_ms.max(1), phase: Phase::Idle, promised: None, highest: 0, last_setback: None }
    }

    /// True while a round runs, or while this server waits for a coordinator.
    pub fn running(&self) -> bool {
        matches!(self.phase, Phase::Electing { .. } | Phase::Deferred { .. })
    }

    /// True when this server may start a round at `now` (none runs, and any
    /// back-off after a failed one is over).
    pub fn may_stand(&self, now: u64) -> bool {
        match self.phase {
            Phase::Idle => true,
            Phase::Backoff { until } => now >= until,
            _ => false,
        }
    }

    /// The epoch this server last promised, and to whom.
    pub fn promise(&self) -> Option<(u64, Id)> {
        self.promised
    }

    /// Why the last round did not end with a primary.
    pub fn last_setback(&self) -> Option<&Setback> {
        self.last_setback.as_ref()
    }

    /// The epoch this server's next round would stand for, given that it knows of
    /// `epoch`.
    pub fn next_target(&self, epoch: u64) -> u64 {
        let promised = self.promised.map_or(0, |(e, _)| e);
        epoch.max(self.highest).max(promised) + 1
    }

    /// Records an epoch heard of anywhere.
    pub fn saw_epoch(&mut self, epoch: u64) {
        self.highest = self.highest.max(epoch);
    }

    /// Forgets any round: a primary is known again (or this server became one).
    pub fn settle(&mut self) {
        self.phase = Phase::Idle;
        self.last_setback = None;
    }

    /// Starts a round for the epoch after `epoch`, asking `others`; `suspect` (the
    /// old primary, if any) is not waited for. Does nothing while a round runs or a
    /// back-off lasts.
    pub fn stand(&mut self, now: u64, epoch: u64, others: &[Id], suspect: Option<Id>) -> Vec<Out> {
        self.stand_needing(now, epoch, others, suspect, 0)
    }

    /// [`Bully::stand`], for a majority election: the round is won only once
    /// `need` of the others have promised (besides everything `stand` asks).
    pub fn stand_needing(&mut self, now: u64, epoch: u64, others: &[Id], suspect: Option<Id>, need: usize) -> Vec<Out> {
        if !self.may_stand(now) {
            return Vec::new();
        }
        let target = self.next_target(epoch);
        let heard: BTreeMap<Id, Option<Heard>> =
            others.iter().copied().filter(|id| *id != self.me).map(|id| (id, None)).collect();
        let asks = heard.keys().map(|&to| Out::Ask { to, target }).collect();
        self.phase = Phase::Electing { target, deadline: now + self.timeout_ms, exempt: suspect, heard, need };
        let mut out: Vec<Out> = asks;
        out.extend(self.decide(now, false));
        out
    }

    /// The answer of `from` to this server's election message.
    pub fn reply(&mut self, now: u64, from: Id, reply: Reply) -> Vec<Out> {
        self.heard(now, from, Heard::Reply(reply))
    }

    /// `from` could not be asked: `down` when its port refused the connection (its
    /// process is not running), false when it did not answer in time.
    pub fn unreachable(&mut self, now: u64, from: Id, down: bool) -> Vec<Out> {
        self.heard(now, from, if down { Heard::Down } else { Heard::Silent })
    }

    fn heard(&mut self, now: u64, from: Id, what: Heard) -> Vec<Out> {
        if let Phase::Electing { heard, .. } = &mut self.phase {
            if let Some(slot @ None) = heard.get_mut(&from) {
                *slot = Some(what);
                return self.decide(now, false);
            }
        }
        Vec::new()
    }

    /// Deadlines: a round whose answers are not all in, or a wait for a coordinator
    /// that did not come.
    pub fn tick(&mut self, now: u64) -> Vec<Out> {
        match self.phase {
            Phase::Electing { deadline, .. } if now >= deadline => self.decide(now, true),
            Phase::Deferred { deadline } if now >= deadline => {
                self.fail(now, Setback::NoCoordinator);
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    fn fail(&mut self, now: u64, why: Setback) {
        // Servers that failed together should not retry together: the pause grows
        // with the id, deterministically (no randomness in here).
        let spread = self.timeout_ms / 4 * (self.me % 4);
        self.phase = Phase::Backoff { until: now + self.timeout_ms + spread };
        self.last_setback = Some(why);
    }

    /// Looks at the answers so far (and, past the deadline, at the silences).
    fn decide(&mut self, now: u64, timed_out: bool) -> Vec<Out> {
        let Phase::Electing { target, exempt, heard, need, .. } = &self.phase else { return Vec::new() };
        let (target, exempt, need) = (*target, *exempt, *need);
        let mut members = Vec::new();
        let mut promises = 0;
        let mut waiting = None;
        let mut failed = None;
        let mut behind = None;
        for (&id, h) in heard {
            match h {
                Some(Heard::Reply(Reply::Primary { addr, epoch }))
                | Some(Heard::Reply(Reply::Following { addr, epoch })) => {
                    let out = Out::Follow { addr: addr.clone(), epoch: *epoch };
                    self.phase = Phase::Idle;
                    return vec![out];
                }
                Some(Heard::Reply(Reply::Ok)) => {
                    self.phase = Phase::Deferred { deadline: now + 2 * self.timeout_ms };
                    return Vec::new();
                }
                Some(Heard::Reply(Reply::Promise { member: true })) => {
                    members.push(id);
                    promises += 1;
                }
                // A promise from a server that may not stand: it cannot be a
                // candidate for this epoch, but its promise counts towards a majority.
                Some(Heard::Reply(Reply::Promise { member: false })) => promises += 1,
                Some(Heard::Reply(Reply::Ahead)) => failed = Some(Setback::Ahead(id)),
                // A process that is down: it can be neither a candidate nor a vote.
                Some(Heard::Down) => {}
                Some(Heard::Reply(Reply::Stale { epoch })) => {
                    behind = Some(behind.map_or(*epoch, |b: u64| b.max(*epoch)));
                }
                Some(Heard::Reply(Reply::Promised { to })) => failed = Some(Setback::PromisedElsewhere(*to)),
                // Not an answer to an election: count it as silence. The suspect's
                // silence never fails the round.
                Some(Heard::Reply(Reply::Accepted)) | Some(Heard::Silent) => {
                    if Some(id) != exempt {
                        failed = failed.or(Some(Setback::NoAnswer(id)))
                    }
                }
                // Not answered yet. A live suspect answers in time that it is
                // alive: it is waited for until the deadline, and no longer.
                None => {
                    if Some(id) != exempt || !timed_out {
                        waiting = waiting.or(Some(id))
                    }
                }
            }
        }
        if let Some(epoch) = behind {
            self.highest = self.highest.max(epoch);
            self.fail(now, Setback::Behind(epoch));
            return vec![Out::Behind { epoch }];
        }
        if let Some(why) = failed {
            self.highest = self.highest.max(target);
            self.fail(now, why);
            return Vec::new();
        }
        if let Some(id) = waiting {
            if timed_out && Some(id) != exempt {
                self.highest = self.highest.max(target);
                self.fail(now, Setback::NoAnswer(id));
            }
            return Vec::new();
        }
        if promises < need {
            // Every server answered or was given up on, and too few promised: a
            // minority may not elect a primary.
            self.highest = self.highest.max(target);
            self.fail(now, Setback::NoMajority { promises, needed: need });
            return Vec::new();
        }
        // Everyone that may be alive promised: this server takes `target`. Its own
        // promise goes to itself, so that it refuses any other candidate for it.
        self.promised = Some((target, self.me));
        self.highest = self.highest.max(target);
        self.phase = Phase::Idle;
        self.last_setback = None;
        vec![Out::Won { epoch: target, members }]
    }

    /// Answers a candidate (see [`Candidate`]). A higher-ranked server that may
    /// stand also starts its own round, asking `others` (those outputs come with
    /// the answer).
    pub fn on_election(&mut self, now: u64, view: &View, candidate: &Candidate, others: &[Id]) -> (Reply, Vec<Out>) {
        let Candidate { from, from_epoch, target, rank } = *candidate;
        self.highest = self.highest.max(from_epoch);
        if from_epoch < view.epoch {
            return (Reply::Stale { epoch: view.epoch }, Vec::new());
        }
        match &view.status {
            Status::Primary(addr) => return (Reply::Primary { addr: addr.clone(), epoch: view.epoch }, Vec::new()),
            Status::Following(addr) => return (Reply::Following { addr: addr.clone(), epoch: view.epoch }, Vec::new()),
            Status::Lost => {}
        }
        if view.majority && !view.eligible && (view.rank.epoch, view.rank.pos) > (rank.epoch, rank.pos) {
            return (Reply::Ahead, Vec::new());
        }
        if view.eligible && view.rank > rank {
            // Take the election over, unless a round already runs (it asks `from`
            // too, or already did).
            let out = if self.running() { Vec::new() } else { self.take_over(now, view.epoch, others, view.suspect) };
            return (Reply::Ok, out);
        }
        if let Some((epoch, to)) = self.promised {
            if to != from && epoch >= target {
                return (Reply::Promised { to }, Vec::new());
            }
        }
        self.promised = Some((target, from));
        self.highest = self.highest.max(target);
        // A promise ends this server's own candidacy for that epoch (it could not
        // win it any more): wait for the coordinator instead.
        if matches!(self.phase, Phase::Electing { .. }) || !self.running() {
            self.phase = Phase::Deferred { deadline: now + 2 * self.timeout_ms };
        }
        (Reply::Promise { member: view.member }, Vec::new())
    }

    fn take_over(&mut self, now: u64, epoch: u64, others: &[Id], suspect: Option<Id>) -> Vec<Out> {
        // An Ok obliges this server to run now, back-off or not.
        if let Phase::Backoff { .. } = self.phase {
            self.phase = Phase::Idle;
        }
        self.stand(now, epoch, others, suspect)
    }

    /// Whether this server may follow `from` as primary of `epoch` (its epoch is
    /// not behind `known`, and no promise stands against it). Accepting settles
    /// any round.
    pub fn on_coordinator(&mut self, known: u64, from: Id, epoch: u64) -> Reply {
        self.highest = self.highest.max(epoch);
        if epoch < known {
            return Reply::Stale { epoch: known };
        }
        if let Some((e, to)) = self.promised {
            if e == epoch && to != from {
                return Reply::Promised { to };
            }
        }
        self.settle();
        Reply::Accepted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rank(epoch: u64, pos: u64, id: Id) -> Rank {
        Rank { epoch, pos, id }
    }

    fn lost(rank: Rank, epoch: u64) -> View {
        View { rank, epoch, eligible: true, member: true, status: Status::Lost, suspect: None, majority: false }
    }

    #[test]
    fn the_highest_ranked_wins_once_every_live_server_promised() {
        let mut b3 = Bully::new(3, 100);
        let out = b3.stand(0, 5, &[1, 2, 3], Some(1));
        assert_eq!(out, vec![Out::Ask { to: 1, target: 6 }, Out::Ask { to: 2, target: 6 }]);
        let mut b2 = Bully::new(2, 100);
        let (answer, out) = b2.on_election(
            1,
            &lost(rank(5, 9, 2), 5),
            &Candidate { from: 3, from_epoch: 5, target: 6, rank: rank(5, 9, 3) },
            &[1, 3],
        );
        assert_eq!(answer, Reply::Promise { member: true });
        assert!(out.is_empty());
        assert!(b3.reply(2, 2, answer).is_empty(), "the old primary's host may still answer: not yet");
        // The old primary's port refuses: it is down, and 3 wins at once.
        assert_eq!(b3.unreachable(3, 1, true), vec![Out::Won { epoch: 6, members: vec![2] }]);
        assert_eq!(b2.on_coordinator(5, 3, 6), Reply::Accepted);
    }

    #[test]
    fn the_suspected_primary_is_not_waited_for_but_any_other_server_is() {
        let mut b = Bully::new(3, 100);
        b.stand(0, 1, &[1, 2], Some(1));
        assert!(b.reply(10, 2, Reply::Promise { member: true }).is_empty(), "1 may still say it is alive");
        assert_eq!(b.tick(100), vec![Out::Won { epoch: 2, members: vec![2] }], "but its silence is no objection");
        let mut b = Bully::new(3, 100);
        b.stand(0, 1, &[1, 2], Some(1));
        assert!(b.tick(99).is_empty());
        assert!(b.tick(100).is_empty(), "2 said nothing: it may be a candidate too");
        assert_eq!(b.last_setback(), Some(&Setback::NoAnswer(2)));
        assert!(!b.may_stand(150) && b.may_stand(400), "a back-off follows");
        assert_eq!(b.next_target(1), 3, "the next round stands above the failed target");
    }

    #[test]
    fn a_higher_ranked_server_answers_ok_and_runs_its_own_round() {
        let mut b3 = Bully::new(3, 100);
        let (answer, out) = b3.on_election(
            0,
            &lost(rank(2, 10, 3), 2),
            &Candidate { from: 2, from_epoch: 2, target: 3, rank: rank(2, 10, 2) },
            &[1, 2],
        );
        assert_eq!(answer, Reply::Ok);
        assert_eq!(out, vec![Out::Ask { to: 1, target: 3 }, Out::Ask { to: 2, target: 3 }]);
        // The lower one defers, then stands again if no coordinator comes.
        let mut b2 = Bully::new(2, 100);
        b2.stand(0, 2, &[1, 3], Some(1));
        assert!(b2.reply(1, 3, Reply::Ok).is_empty());
        assert!(b2.running());
        b2.tick(150);
        assert!(b2.running(), "still waiting for the coordinator");
        b2.tick(201);
        assert_eq!(b2.last_setback(), Some(&Setback::NoCoordinator));
    }

    #[test]
    fn a_longer_log_outranks_a_higher_id_and_an_ineligible_server_never_answers_ok() {
        assert!(rank(3, 1, 1) > rank(2, 99, 9), "a later epoch first");
        assert!(rank(3, 5, 1) > rank(3, 4, 9), "then the longer log");
        let mut joining = Bully::new(9, 100);
        let view = View {
            rank: rank(3, 50, 9),
            epoch: 3,
            eligible: false,
            member: false,
            status: Status::Lost,
            suspect: None,
            majority: false,
        };
        let (answer, out) =
            joining.on_election(0, &view, &Candidate { from: 2, from_epoch: 3, target: 4, rank: rank(3, 1, 2) }, &[2]);
        assert_eq!(answer, Reply::Promise { member: false });
        assert!(out.is_empty());
    }

    #[test]
    fn a_majority_election_needs_promises_and_no_voter_ahead_of_the_candidate() {
        // Three members: a candidate needs one promise besides its own.
        let mut b3 = Bully::new(3, 100);
        b3.stand_needing(0, 1, &[1, 2], Some(1), 1);
        assert!(b3.unreachable(1, 2, true).is_empty(), "2 is down: no promise yet");
        assert!(b3.tick(100).is_empty(), "the suspect's silence alone leaves no majority");
        assert!(matches!(b3.last_setback(), Some(Setback::NoMajority { promises: 0, needed: 1 })));
        // A server that holds more than the candidate and may not stand refuses.
        let mut b2 = Bully::new(2, 100);
        let view = View { eligible: false, member: false, majority: true, ..lost(rank(1, 9, 2), 1) };
        let (answer, _) =
            b2.on_election(0, &view, &Candidate { from: 3, from_epoch: 1, target: 2, rank: rank(1, 8, 3) }, &[1, 3]);
        assert_eq!(answer, Reply::Ahead);
        // Without a majority quorum it promises, as before.
        let view = View { majority: false, ..view };
        let (answer, _) =
            b2.on_election(0, &view, &Candidate { from: 3, from_epoch: 1, target: 2, rank: rank(1, 8, 3) }, &[1, 3]);
        assert_eq!(answer, Reply::Promise { member: false });
    }

    #[test]
    fn a_live_primary_or_a_server_that_hears_it_ends_a_false_suspicion() {
        let mut p = Bully::new(1, 100);
        let view = View {
            rank: rank(4, 7, 1),
            epoch: 4,
            eligible: true,
            member: true,
            status: Status::Primary("p".into()),
            suspect: None,
            majority: false,
        };
        assert_eq!(
            p.on_election(0, &view, &Candidate { from: 3, from_epoch: 4, target: 5, rank: rank(4, 7, 3) }, &[]).0,
            Reply::Primary { addr: "p".into(), epoch: 4 }
        );
        let mut b = Bully::new(3, 100);
        b.stand(0, 4, &[1, 2], Some(1));
        let out = b.reply(1, 2, Reply::Following { addr: "p".into(), epoch: 4 });
        assert_eq!(out, vec![Out::Follow { addr: "p".into(), epoch: 4 }]);
        assert!(!b.running());
    }

    #[test]
    fn a_server_that_takes_over_does_not_wait_for_the_primary_it_no_longer_hears() {
        // 3 has not suspected primary 1 itself yet, but no longer hears it when 2's
        // election arrives: its own round treats 1 as the suspect, so a silent
        // (stopped) 1 does not fail it, and it wins the same epoch 2 stood for.
        let mut b3 = Bully::new(3, 100);
        let view = View { suspect: Some(1), ..lost(rank(1, 7, 3), 1) };
        let (answer, out) =
            b3.on_election(0, &view, &Candidate { from: 2, from_epoch: 1, target: 2, rank: rank(1, 7, 2) }, &[1, 2]);
        assert_eq!(answer, Reply::Ok);
        assert_eq!(out, vec![Out::Ask { to: 1, target: 2 }, Out::Ask { to: 2, target: 2 }]);
        assert!(b3.reply(1, 2, Reply::Promise { member: true }).is_empty(), "1 may still answer");
        assert_eq!(b3.tick(100), vec![Out::Won { epoch: 2, members: vec![2] }]);
    }

    #[test]
    fn an_epoch_is_promised_once() {
        let mut b1 = Bully::new(1, 100);
        let low = lost(rank(1, 1, 1), 1);
        assert_eq!(
            b1.on_election(0, &low, &Candidate { from: 2, from_epoch: 1, target: 2, rank: rank(1, 5, 2) }, &[]).0,
            Reply::Promise { member: true }
        );
        assert_eq!(
            b1.on_election(0, &low, &Candidate { from: 3, from_epoch: 1, target: 2, rank: rank(1, 9, 3) }, &[]).0,
            Reply::Promised { to: 2 }
        );
        assert_eq!(b1.on_coordinator(1, 3, 2), Reply::Promised { to: 2 }, "3 cannot be followed in epoch 2");
        assert_eq!(
            b1.on_election(0, &low, &Candidate { from: 3, from_epoch: 1, target: 3, rank: rank(1, 9, 3) }, &[]).0,
            Reply::Promise { member: true }
        );
        assert_eq!(b1.on_coordinator(1, 3, 3), Reply::Accepted);
        assert_eq!(b1.on_coordinator(3, 2, 2), Reply::Stale { epoch: 3 });
    }

    #[test]
    fn a_candidate_that_promises_a_higher_one_gives_up_its_own_round() {
        let mut b2 = Bully::new(2, 100);
        b2.stand(0, 1, &[1, 3], Some(1));
        let (answer, _) = b2.on_election(
            1,
            &lost(rank(1, 5, 2), 1),
            &Candidate { from: 3, from_epoch: 1, target: 2, rank: rank(1, 5, 3) },
            &[1, 3],
        );
        assert_eq!(answer, Reply::Promise { member: true });
        // 3 answers 2's own question with Ok too late: 2 is no candidate any more.
        assert!(b2.reply(2, 3, Reply::Promise { member: true }).is_empty());
        assert!(b2.unreachable(3, 1, true).is_empty(), "2 promised epoch 2 to 3: it must not win it");
    }

    #[test]
    fn a_round_waits_for_every_answer_until_its_deadline_and_no_longer() {
        let mut b = Bully::new(3, 100);
        b.stand(10, 1, &[1, 2], Some(1));
        assert!(b.tick(109).is_empty());
        assert!(b.running(), "the deadline is 10 + 100");
        assert!(b.tick(110).is_empty());
        assert_eq!(b.last_setback(), Some(&Setback::NoAnswer(2)), "2 never answered");
        // The back-off grows with the id: 100 + 100 / 4 * (3 % 4) = 175 ms.
        assert!(!b.may_stand(284));
        assert!(b.may_stand(285));
        // Knowing a primary again ends any back-off at once.
        b.settle();
        assert!(b.may_stand(111));
        assert_eq!(b.last_setback(), None);
    }

    #[test]
    fn the_suspects_silence_never_fails_a_round_and_anyone_elses_does() {
        let mut b = Bully::new(3, 100);
        b.stand(0, 1, &[1, 2], Some(1));
        assert!(b.unreachable(1, 1, false).is_empty(), "the suspect (1) timed out: no harm");
        assert_eq!(b.reply(2, 2, Reply::Promise { member: true }), vec![Out::Won { epoch: 2, members: vec![2] }]);

        let mut b = Bully::new(3, 100);
        b.stand(0, 1, &[1, 2], Some(1));
        assert!(b.reply(1, 1, Reply::Promise { member: false }).is_empty());
        assert!(b.unreachable(2, 2, false).is_empty(), "2 may be alive, and a candidate too");
        assert!(!b.running());
        assert_eq!(b.last_setback(), Some(&Setback::NoAnswer(2)));

        // An answer that is no answer to an election counts as silence.
        let mut b = Bully::new(3, 100);
        b.stand(0, 1, &[2], None);
        assert!(b.reply(1, 2, Reply::Accepted).is_empty());
        assert_eq!(b.last_setback(), Some(&Setback::NoAnswer(2)));
    }

    #[test]
    fn a_promise_to_another_candidate_fails_the_round() {
        let mut b = Bully::new(3, 100);
        b.stand(0, 1, &[1, 2], None);
        assert!(b.reply(1, 1, Reply::Promised { to: 9 }).is_empty());
        assert!(b.reply(2, 2, Reply::Promise { member: true }).is_empty(), "1 promised epoch 2 to 9");
        assert_eq!(b.last_setback(), Some(&Setback::PromisedElsewhere(9)));
        assert!(!b.running());
    }

    #[test]
    fn an_ok_or_a_promise_waits_for_the_coordinator_twice_the_timeout() {
        let mut b = Bully::new(2, 100);
        b.stand(0, 1, &[3], None);
        assert!(b.reply(10, 3, Reply::Ok).is_empty());
        b.tick(209);
        assert!(b.running(), "deferred until 10 + 2 * 100");
        b.tick(210);
        assert_eq!(b.last_setback(), Some(&Setback::NoCoordinator));

        // An idle server that promises waits for that candidate's coordinator.
        let mut idle = Bully::new(1, 100);
        let (answer, _) = idle.on_election(
            10,
            &lost(rank(1, 1, 1), 1),
            &Candidate { from: 2, from_epoch: 1, target: 2, rank: rank(1, 5, 2) },
            &[2],
        );
        assert_eq!(answer, Reply::Promise { member: true });
        assert!(idle.running());
        assert!(!idle.may_stand(100), "it promised: no round of its own meanwhile");
        idle.tick(209);
        assert!(idle.running());
        idle.tick(210);
        assert_eq!(idle.last_setback(), Some(&Setback::NoCoordinator));
    }

    #[test]
    fn epochs_seen_raise_the_next_target_and_stale_candidates_are_told() {
        let mut b = Bully::new(1, 100);
        b.saw_epoch(7);
        assert_eq!(b.next_target(1), 8);
        let view = lost(rank(3, 1, 1), 3);
        let stale = Candidate { from: 2, from_epoch: 2, target: 3, rank: rank(2, 9, 2) };
        assert_eq!(b.on_election(0, &view, &stale, &[2]).0, Reply::Stale { epoch: 3 });
        let later = Candidate { from: 2, from_epoch: 4, target: 9, rank: rank(3, 9, 2) };
        assert_eq!(b.on_election(0, &view, &later, &[2]).0, Reply::Promise { member: true });
        // A coordinator of the epoch this server knows (it adopted it from the
        // candidate's messages) is followed.
        assert_eq!(b.on_coordinator(9, 2, 9), Reply::Accepted);
    }

    #[test]
    fn a_stale_candidate_learns_the_later_epoch() {
        let mut b = Bully::new(2, 100);
        b.stand(0, 1, &[3], None);
        assert_eq!(b.reply(1, 3, Reply::Stale { epoch: 7 }), vec![Out::Behind { epoch: 7 }]);
        assert_eq!(b.next_target(1), 8);
    }
}
