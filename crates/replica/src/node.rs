//! The replication protocol as a pure state machine.
//!
//! A [`Node`] is one server's part in the protocol: its role (primary or backup),
//! the epoch, the replicated [`State`], the recent entries, the backups' acks and
//! links, the join phases, the failure detector and the Bully election. Its inputs
//! are method calls (a message, a tick with a time, the result of disk work); its
//! outputs are an ordered list of [`Output`]s that the caller (the core thread, or
//! the simulation in `sim`) carries out in order.
//!
//! Rules that the order of outputs enforces:
//! - An entry is first an [`Output::Persist`]; the caller writes it to the log,
//!   carries out its file action and reports back with [`Node::persisted`] (or
//!   [`Node::persist_failed`]) before any other input. Only `persisted` applies
//!   the entry and produces the sends, acks and answers that depend on it.
//! - A primary answers an entry's client ([`Output::Complete`]) once every backup
//!   that was live when it was proposed has acknowledged it ("backups first";
//!   [`Acks`]). A backup acknowledges only what it persisted, content included.
//!
//! Role changes are the two named methods [`Node::become_primary`] and
//! [`Node::become_backup`], and every epoch heard of goes through
//! [`Node::see_epoch`]. Nothing here reads a clock, touches a disk or a socket, or
//! draws a random number: `now` is milliseconds from any fixed origin.

use crate::replicate::Acks;
use crate::state::{Change, Entry, LastRequest, Member, State};
use replibox_election::{Bully, Candidate, Detector, Out as BullyOut, Rank as BullyRank, Reply, Status, Verdict, View};
use replibox_proto::{Answer, DeviceId, Epoch, LogPos, Msg, Rank, ServerId};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// How many recent entries a node keeps in memory, so that a server whose history
/// is a prefix of this one's catches up with entries instead of a snapshot.
pub const TAIL_ENTRIES: usize = 10_000;

/// When a primary may acknowledge an entry (`--quorum`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Quorum {
    /// Once every backup it counts on (the live ones) holds it ("backups first").
    /// A backup that does not answer is fenced and then left out: a primary cut
    /// off from every backup goes on alone after the fence timeout, and what it
    /// acknowledges from then on is lost if the others elected a new primary
    /// meanwhile (docs/reliability.md, "Partitions").
    #[default]
    Live,
    /// Also only once a majority of the membership (itself included) holds it.
    /// The membership does not shrink when a backup is dropped, elections need a
    /// majority of promises, and a server that holds more than a candidate never
    /// promises it: nothing acknowledged is lost under any partition, and a
    /// primary that hears no majority for the fence timeout steps down. The price:
    /// with a majority of the servers down or cut off, nothing is acknowledged.
    Majority,
}

/// How often a new primary tells a server that its `coordinator` message did not
/// reach (its host cut off, not its process down) that there is a new epoch. A
/// primary cut off without a FIN goes on as primary of its old epoch, and once its
/// host is back nothing else would tell it: this is how it learns, steps down and
/// rejoins.
pub const ANNOUNCE_RETRY_MS: u64 = 1000;

/// Identifies a proposal whose completion the caller waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticket(pub u64);

/// Identifies one replication link on the primary's side (one connection).
pub type LinkNo = u64;

/// Timing and identity a node runs with. Times in milliseconds.
#[derive(Clone, Debug)]
pub struct Config {
    /// This server's id (0 while a backup waits for the primary to assign one).
    pub id: ServerId,
    /// Where this server listens, as other servers and clients reach it.
    pub addr: String,
    /// How often a primary sends a heartbeat to each backup.
    pub heartbeat_ms: u64,
    /// How long a primary waits for a backup's ack before dropping it.
    pub ack_timeout_ms: u64,
    /// How long a backup hears nothing from its primary before suspecting it.
    pub failure_timeout_ms: u64,
    /// How long a candidate waits for the answers to its election messages.
    pub election_timeout_ms: u64,
    /// How long a primary tries to fence a backup it dropped before it goes on
    /// without that backup's word (a backup cut off without a FIN).
    pub fence_timeout_ms: u64,
    /// The address given with `-b`, tried when no primary is known.
    pub seed: Option<String>,
    /// When an entry may be acknowledged.
    pub quorum: Quorum,
}

/// A server asking to join (or rejoin) as a backup, as its link's hello says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinRequest {
    /// Its id, if it has one.
    pub id: Option<ServerId>,
    /// Where it listens.
    pub addr: String,
    /// The position of its last entry.
    pub pos: LogPos,
    /// The epoch of its last entry.
    pub last_epoch: Epoch,
    /// The epoch its hello was stamped with.
    pub epoch: Epoch,
    /// The address this server was reached at (a primary bound to every address
    /// learns its own from it), if it differs from the configured one.
    pub local_addr: Option<String>,
    /// The joiner counts itself a caught-up member that may stand.
    pub member: bool,
}

/// Something for the caller to do, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// Write the entry to the log (fsync) and carry out its file action; then call
    /// [`Node::persisted`] or [`Node::persist_failed`] before anything else.
    Persist(Entry),
    /// Replace the data dir's state with this snapshot (a backup joining); then
    /// fetch the content it lacks, and call [`Node::installed`].
    Install(Box<State>),
    /// Send on a link to a backup.
    ToLink {
        /// The link.
        link: LinkNo,
        /// The epoch the frame carries: this node's when it decided to send, not
        /// when a writer thread gets to it (a step-down may come between, and an
        /// old primary's entry must never reach a backup as the next epoch's).
        epoch: Epoch,
        /// The message.
        msg: Msg,
    },
    /// Send this snapshot on a link (the state after its `pos`).
    SnapshotTo {
        /// The link.
        link: LinkNo,
        /// The epoch its frames carry (see [`Output::ToLink`]).
        epoch: Epoch,
        /// The snapshot.
        state: Box<State>,
    },
    /// Close a link once what was queued on it has gone out.
    CloseLink {
        /// The link.
        link: LinkNo,
    },
    /// Send on the link to this backup's primary.
    ToPrimary(Msg),
    /// Follow the primary (or a server that will redirect to it) at `addr`: stop
    /// any current follower and join there.
    Follow {
        /// Where.
        addr: String,
    },
    /// Stop following (the primary is suspected, or this server became primary).
    Unfollow,
    /// Send an election message to a server, on a connection of its own; report
    /// the answer with [`Node::peer_answer`] or [`Node::peer_unreachable`].
    ToPeer {
        /// The server.
        to: ServerId,
        /// Its address.
        addr: String,
        /// The epoch the frame carries: this node's when it decided to send (a
        /// fence decided as primary of epoch 1 that went out stamped with epoch 2,
        /// learnt meanwhile, once fenced a backup of the real primary of epoch 2).
        epoch: Epoch,
        /// The message.
        msg: Msg,
    },
    /// The entry of this ticket is stored on every backup it waited for.
    Complete(Ticket),
    /// This ticket's entry will not complete here (refused, failed, or this server
    /// stepped down): its client must try again.
    Abort(Ticket),
    /// This server is now primary of `epoch`: call the clients back.
    BecamePrimary {
        /// The epoch.
        epoch: Epoch,
    },
    /// This server was primary and learned of a later epoch: drop every client.
    SteppedDown {
        /// The later epoch.
        epoch: Epoch,
    },
    /// The primary accepted this server under this id: record it.
    SaveId(ServerId),
    /// The state describes a file whose content is not here (`true`), or every
    /// file is here again (`false`): mark or unmark the data dir.
    Incomplete(bool),
    /// Joining failed for good (a duplicate id): stop the server.
    Fatal(String),
    /// A later epoch than any before: record it, so that a restart with `-p`
    /// starts above it.
    SawEpoch(Epoch),
    /// A line for the operator.
    Log(log::Level, String),
}

/// Why another server could not be asked (see [`Node::peer_unreachable`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unreached {
    /// Its port refused the connection: its process is not running.
    Refused,
    /// The connection reached it and broke (reset, closed, garbage): its host
    /// answered, so it is not cut off, but its process could not answer (it is
    /// dying, stopping, or out of threads). A later try tells which.
    Broken,
    /// No answer in time: it is down, or cut off and perhaps alive.
    Silent,
}

/// How a fence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FenceEnd {
    /// The backup answered that it knows it was dropped.
    Answered,
    /// Its port refused: its process is down.
    Down,
    /// No answer within the fence timeout: down, or cut off.
    Silent,
}

/// A primary's view of one backup's link.
#[derive(Clone, Debug)]
struct LinkInfo {
    id: ServerId,
    addr: String,
    /// Entries wait for this backup's acks (it has caught up).
    live: bool,
    /// It said it caught up (it becomes live once any fence of it is over).
    caught_up: bool,
}

/// A backup the primary dropped and is fencing.
#[derive(Clone, Debug)]
struct Fence {
    addr: String,
    why: String,
    /// The last position proposed when the fence began.
    pos: LogPos,
    started: u64,
    /// When to ask again (None while a fence message waits for its answer).
    retry_at: Option<u64>,
    /// A fence message got no answer in time: the backup may be cut off, not
    /// down, and a refused port later says nothing of what it did meanwhile.
    silent: bool,
}

#[derive(Debug)]
struct PrimaryRole {
    links: BTreeMap<LinkNo, LinkInfo>,
    acks: Acks<Option<Ticket>>,
    next_heartbeat: u64,
    /// Proposed entries whose persist failed close these links (a join whose id
    /// reservation did not reach the log).
    reserving: BTreeMap<LogPos, LinkNo>,
    /// Backups being fenced: entries still wait for them until they are.
    fencing: BTreeMap<ServerId, Fence>,
    /// Every entry up to here is stored on every backup it waited for.
    committed: LogPos,
    /// A membership change (a join, a new epoch) whose commit its backups should
    /// hear of at once, not at the next heartbeat: until they do, a new member
    /// may not stand in an election.
    announce_at: Option<LogPos>,
    /// The last position each backup is known to hold in this primary's log (its
    /// acks, its caught-up, the prefix it came back with): the majority count.
    held: BTreeMap<ServerId, LogPos>,
    /// When each backup was last heard on its link (majority mode steps down
    /// when no majority has been heard for the fence timeout).
    heard: BTreeMap<ServerId, u64>,
    /// When this server became primary.
    since: u64,
    /// Servers this primary went on without, unheard (a fence that got no answer,
    /// or a port that refused), and when to call on them next. Each is told
    /// again, every fence timeout, that this server is primary of its epoch
    /// (a `coordinator`), until it follows or answers: a cut-off host that healed
    /// may have elected a later primary meanwhile, and nobody else would tell this
    /// one (issue 11's simulation: a stale primary served on after the heal).
    strays: BTreeMap<ServerId, (String, u64)>,
    /// Answers that wait until every entry up to a position is stored on every
    /// backup it waited for (see [`Node::barrier`]).
    barriers: Vec<(LogPos, Ticket)>,
    /// Servers of the membership this primary took over that its `coordinator`
    /// has not reached yet (their host did not answer), with where they listen
    /// and when to try again (None while a try waits for its outcome).
    unannounced: BTreeMap<ServerId, (String, Option<u64>)>,
}

/// Where a backup stands with its primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// No link: looking for a primary, or electing one.
    Detached,
    /// Connected, waiting for the primary's answer.
    Joining,
    /// Receiving a snapshot, installing it, fetching files.
    Installing,
    /// Following the live stream.
    Live,
}

#[derive(Debug)]
struct BackupRole {
    phase: Phase,
    /// Where this server follows (or tries to follow) a primary.
    target: Option<String>,
    /// The primary it follows, once known.
    primary: Option<(ServerId, String)>,
    /// The primary it suspects (not waited for in an election).
    suspect: Option<ServerId>,
    detector: Detector,
    /// When to try following again after a failure.
    retry_at: u64,
    retries: u32,
    /// The last entry acknowledged: every entry up to it is here with its content.
    acked: LogPos,
    /// An install ended with files missing: the primary still waits for this
    /// server's `caught_up`, which the first ack once they are settled must be.
    owes_caught_up: bool,
}

#[derive(Debug)]
enum Role {
    Primary(PrimaryRole),
    Backup(BackupRole),
}

/// One server's part in the replication protocol.
#[derive(Debug)]
pub struct Node {
    cfg: Config,
    state: State,
    /// The highest epoch this server knows of (the state's may be behind it).
    epoch: Epoch,
    /// Recent entries, for incremental catch-up; `base` is the position and epoch
    /// of the entry just before the first of them, when known.
    tail: VecDeque<Entry>,
    base: Option<(LogPos, Epoch)>,
    /// Ask for a snapshot when joining: this data dir may not hold what its state
    /// describes (an unfinished install, files changed by hand).
    want_snapshot: bool,
    /// Entries handed out to persist, in order, not yet reported persisted.
    unpersisted: VecDeque<(Entry, Option<Ticket>)>,
    role: Role,
    bully: Bully,
    /// This process has seen a primary count it as a live member (and nothing
    /// since made it doubt that): required, with the rest of [`Node::eligible`], to
    /// stand in an election. A restart, a snapshot or a drop clears it.
    verified: bool,
    /// The primary said it dropped this server: only a `Join` of it after
    /// `fenced_at` (the fencing primary's epoch and position then) makes it a
    /// member again. The epoch comes first: a later primary's log may be shorter.
    dropped: bool,
    fenced_at: (Epoch, LogPos),
    /// The last join of this server that counted (its primary's epoch and the
    /// entry's position): a fence from before it is a stale copy (see
    /// [`Node::fence`]).
    joined_at: (Epoch, LogPos),
    /// The position of the `Join` that made this server a member, until the
    /// primary says it is stored on every member (then every server that may
    /// stand knows of this one, and asks it in an election).
    pending_join: Option<(LogPos, Epoch)>,
    /// Paths whose content this server lacks for the version its state describes.
    missing: BTreeSet<(String, String)>,
    /// Servers that refused to follow this primary's epoch, by what they said.
    notes: Vec<String>,
    /// Every other server this one has known of (members past and present), by
    /// id: where a backup that may not stand looks for a primary. A primary that
    /// stepped down after dropping every backup holds a membership of itself
    /// alone, and would otherwise look nowhere (issue 11's simulation).
    contacts: BTreeMap<ServerId, String>,
    /// The time of the last input, to notice that this process was paused.
    last_now: u64,
    /// Times in a row this backup could not store what its primary sent, and
    /// when it last happened (see [`Node::storage_failed`]).
    storage_failures: u32,
    storage_failed_at: u64,
}

/// The first pause before a backup that could not store an entry joins again;
/// it doubles with each failure in a row, up to [`STORAGE_PAUSE_MAX_MS`].
pub const STORAGE_PAUSE_FIRST_MS: u64 = 1_000;
/// The longest pause between two joins of a backup whose disk stays full.
pub const STORAGE_PAUSE_MAX_MS: u64 = 60_000;
/// Failures further apart than this are not "in a row": the pause starts over.
const STORAGE_FAILURES_FORGOTTEN_MS: u64 = 10 * 60_000;

fn rank_of(r: &Rank) -> BullyRank {
    BullyRank { epoch: r.epoch.0, pos: r.pos.0, id: r.id.0 }
}

fn answer_of(r: Reply) -> Answer {
    match r {
        Reply::Ok => Answer::Ok,
        Reply::Promise { member } => Answer::Promise { member },
        Reply::Primary { addr, .. } => Answer::Primary { addr },
        Reply::Following { addr, .. } => Answer::Following { addr },
        Reply::Stale { .. } => Answer::Stale,
        Reply::Promised { to } => Answer::Promised { to: ServerId(to) },
        Reply::Accepted => Answer::Accepted,
        Reply::Ahead => Answer::Ahead,
    }
}

fn reply_of(a: Answer, epoch: Epoch) -> Reply {
    match a {
        Answer::Ok => Reply::Ok,
        Answer::Promise { member } => Reply::Promise { member },
        Answer::Primary { addr } => Reply::Primary { addr, epoch: epoch.0 },
        Answer::Following { addr } => Reply::Following { addr, epoch: epoch.0 },
        Answer::Stale => Reply::Stale { epoch: epoch.0 },
        Answer::Promised { to } => Reply::Promised { to: to.0 },
        Answer::Ahead => Reply::Ahead,
        // Not an answer to an election: the Bully counts it as silence.
        Answer::Accepted | Answer::Fenced => Reply::Accepted,
    }
}

fn info(out: &mut Vec<Output>, line: String) {
    out.push(Output::Log(log::Level::Info, line));
}

fn warn(out: &mut Vec<Output>, line: String) {
    out.push(Output::Log(log::Level::Warn, line));
}

impl Node {
    /// A node over a recovered state and the entries recovered after its snapshot
    /// (oldest first). It starts detached, as a backup that has not joined:
    /// [`Node::start_primary`] or [`Node::start_backup`] comes next.
    pub fn new(cfg: Config, state: State, recent: Vec<Entry>, now: u64) -> Node {
        let mut tail: VecDeque<Entry> = recent.into_iter().filter(|e| e.pos <= state.pos).collect();
        while tail.len() > TAIL_ENTRIES {
            tail.pop_front();
        }
        // The entry before the tail: known when the tail is empty (it is the
        // state's last) or starts the history; otherwise unknown.
        let base = match tail.front() {
            Some(first) if first.pos == LogPos(1) => Some((LogPos(0), Epoch(0))),
            Some(_) => None,
            None => Some((state.pos, state.epoch)),
        };
        let epoch = state.epoch;
        let failure = cfg.failure_timeout_ms;
        let bully = Bully::new(cfg.id.0, cfg.election_timeout_ms);
        let contacts = state.members.values().filter(|m| m.id != cfg.id).map(|m| (m.id, m.addr.clone())).collect();
        Node {
            role: Role::Backup(BackupRole {
                phase: Phase::Detached,
                target: None,
                primary: None,
                suspect: None,
                detector: Detector::new(failure, now),
                retry_at: now,
                retries: 0,
                acked: state.pos,
                owes_caught_up: false,
            }),
            cfg,
            epoch,
            base,
            tail,
            want_snapshot: false,
            unpersisted: VecDeque::new(),
            state,
            bully,
            verified: false,
            dropped: false,
            fenced_at: (Epoch(0), LogPos(0)),
            joined_at: (Epoch(0), LogPos(0)),
            pending_join: None,
            missing: BTreeSet::new(),
            notes: Vec::new(),
            contacts,
            last_now: now,
            storage_failures: 0,
            storage_failed_at: 0,
        }
    }

    /// Every input starts here. A process that was paused (stopped, starved,
    /// frozen with its VM) for longer than the failure timeout may have been
    /// dropped and fenced meanwhile, and replaced: a backup then doubts its
    /// membership (a heartbeat that counts it as a member restores it), and any
    /// election it was running is abandoned.
    ///
    /// A primary that was paused that long steps down: its backups may have
    /// elected another meanwhile, and what it would do next on its old authority
    /// (complete entries, count a joiner as a member) could contradict that.
    fn clock(&mut self, now: u64, out: &mut Vec<Output>) {
        let gap = now.saturating_sub(self.last_now);
        self.last_now = self.last_now.max(now);
        if gap <= self.cfg.failure_timeout_ms {
            return;
        }
        if self.is_primary() {
            warn(out, format!("this primary was paused for {gap} ms; stepping down (a backup may have taken over)"));
            let epoch = self.epoch;
            self.become_backup(now, None, out);
            out.push(Output::SteppedDown { epoch });
        } else {
            // Whatever it hears next may have been sent before the pause; only the
            // answer to a hello sent after it is news: join again.
            let again = match &self.role {
                Role::Backup(b) if b.phase != Phase::Detached => b.primary.as_ref().map(|(_, a)| a.clone()),
                _ => None,
            };
            if self.verified || again.is_some() {
                warn(
                    out,
                    format!("this server was paused for {gap} ms; joining its primary again before it may stand"),
                );
            }
            self.verified = false;
            self.pending_join = None;
            self.bully.settle();
            if let Some(addr) = again {
                self.follow(now, addr, out);
            }
        }
    }

    /// The time, and nothing else: a pause longer than the failure timeout is
    /// noticed now (see `clock`) rather than at the next input. The core calls it
    /// before every event, many of which (listings, downloads) never reach the
    /// node.
    pub fn observe(&mut self, now: u64) -> Vec<Output> {
        let mut out = Vec::new();
        self.clock(now, &mut out);
        out
    }

    /// The caller was busy with this node's own work from `from` until `until`
    /// (an fsync on a slow disk, a listing): that was no pause. A primary is
    /// vouched for: its links kept pinging its backups meanwhile, so none of them
    /// suspected it. So is a backup installing a snapshot: it is joining, not a
    /// member the primary waits for, and has no membership to doubt. A backup
    /// otherwise that stalled may have been fenced by timeout, and must doubt.
    /// (Without the second case, a snapshot that took longer to install than the
    /// failure timeout, as one of 100,000 files does on a slow disk, sent the
    /// backup back to join again when it was done, for another snapshot, for
    /// ever: `make bench` case 9, 2026-12-03.)
    ///
    /// Only the work is vouched for, not the time before it: a process stopped
    /// between two events, whose first event after the stop never reaches the
    /// node (a client's connection closing), would otherwise have its pause
    /// taken for that work and go on as primary of an epoch its backups left
    /// (CI, `epochs::backups_cut_off_past_the_failure_timeout_...`).
    pub fn busy(&mut self, from: u64, until: u64) {
        let installing = matches!(&self.role, Role::Backup(b) if b.phase == Phase::Installing);
        if (self.is_primary() || installing) && from.saturating_sub(self.last_now) <= self.cfg.failure_timeout_ms {
            self.last_now = self.last_now.max(until);
        }
    }

    // -----------------------------------------------------------------------
    // Queries

    /// The replicated state (entries persisted and applied).
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The highest epoch this server knows of; frames are stamped with it.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// This server's id (0 before a primary assigned one).
    pub fn id(&self) -> ServerId {
        self.cfg.id
    }

    /// Where this server listens.
    pub fn addr(&self) -> &str {
        &self.cfg.addr
    }

    /// True when this server is the primary.
    pub fn is_primary(&self) -> bool {
        matches!(self.role, Role::Primary(_))
    }

    /// A backup's phase (None on the primary).
    pub fn phase(&self) -> Option<Phase> {
        match &self.role {
            Role::Backup(b) => Some(b.phase),
            Role::Primary(_) => None,
        }
    }

    /// The primary's address as this server knows it: its own on the primary; the
    /// one it follows on a backup (None while it knows none, or suspects it).
    pub fn primary_addr(&self) -> Option<String> {
        match &self.role {
            Role::Primary(_) => Some(self.cfg.addr.clone()),
            Role::Backup(b) if b.phase == Phase::Live => b.primary.as_ref().map(|(_, a)| a.clone()),
            Role::Backup(_) => None,
        }
    }

    /// May this server stand in an election: a caught-up member of the membership
    /// it holds, confirmed by a primary in this run, not dropped, missing nothing.
    ///
    /// Under `--quorum majority` neither a confirmation nor a fence matters (a
    /// majority election, in which no server promises a candidate behind it,
    /// keeps whatever a majority acknowledged): a member that holds the content
    /// its state describes may stand.
    pub fn eligible(&self) -> bool {
        let vouched = self.majority() || (self.verified && !self.dropped);
        vouched
            && !self.want_snapshot
            && self.missing.is_empty()
            && self.cfg.id.0 > 0
            && self.state.members.contains_key(&self.cfg.id)
            && !matches!(self.phase(), Some(Phase::Installing))
    }

    /// True under `--quorum majority`.
    pub fn majority(&self) -> bool {
        self.cfg.quorum == Quorum::Majority
    }

    /// How many servers (this one included) a majority of the membership is.
    fn majority_of_members(&self) -> usize {
        let mut n = self.state.members.len();
        if !self.state.members.contains_key(&self.cfg.id) {
            n += 1;
        }
        n / 2 + 1
    }

    /// An epoch heard of before this process started (recorded on disk).
    pub fn heard_of(&mut self, epoch: Epoch) {
        self.epoch = self.epoch.max(epoch);
        self.bully.saw_epoch(epoch.0);
    }

    /// Asks for a snapshot at the next join: this data dir may not hold what its
    /// state describes.
    pub fn want_snapshot(&mut self) {
        self.want_snapshot = true;
    }

    /// Whether a joining hello claims membership (see [`JoinRequest::member`]).
    pub fn join_as_member(&self) -> bool {
        self.eligible()
    }

    /// The position and epoch a joining hello announces: its last entry's, or a
    /// pair no primary's log holds when it wants a snapshot.
    pub fn join_point(&self) -> (LogPos, Epoch) {
        if self.want_snapshot {
            (LogPos(0), Epoch(u64::MAX))
        } else {
            (self.state.pos, self.state.epoch)
        }
    }

    /// This server's Bully rank.
    pub fn rank(&self) -> Rank {
        Rank { epoch: self.state.epoch, pos: self.state.pos, id: self.cfg.id }
    }

    /// On the primary, the last position every member it waits for has stored
    /// (None on a backup). Entries after it are applied to the state but not
    /// acknowledged: an answer read from the state must wait until this reaches
    /// the position it was read at, or it could show what a failover loses.
    pub fn committed(&self) -> Option<LogPos> {
        match &self.role {
            Role::Primary(p) => Some(p.committed),
            Role::Backup(_) => None,
        }
    }

    /// The live backups' ids (primary) or none.
    pub fn live_backups(&self) -> Vec<ServerId> {
        match &self.role {
            Role::Primary(p) => p.links.values().filter(|l| l.live && p.acks.is_live(l.id)).map(|l| l.id).collect(),
            Role::Backup(_) => Vec::new(),
        }
    }

    /// What the election says when this backup has no primary, for the operator.
    pub fn election_note(&self) -> Option<String> {
        match &self.role {
            Role::Primary(_) => None,
            Role::Backup(b) if b.phase != Phase::Detached => None,
            Role::Backup(_) if !self.eligible() => Some(self.ineligible_reason()),
            Role::Backup(_) => Some(match self.bully.last_setback() {
                Some(s) => format!("electing a primary (last round: {s:?})"),
                None => "electing a primary".to_string(),
            }),
        }
    }

    fn ineligible_reason(&self) -> String {
        let why = if self.dropped {
            "the primary dropped it from the membership"
        } else if !self.missing.is_empty() {
            "it lacks the content of some files"
        } else if !self.state.members.contains_key(&self.cfg.id) {
            "it is not a member of the membership it holds"
        } else {
            "it has not caught up with a primary since it started"
        };
        format!("no primary: this server may not stand ({why}); waiting for a primary to call or to be found")
    }

    /// Why a joiner whose last entry is (`pos`, `epoch`) holds another history of
    /// this primary's own epoch, if it does. Epochs are unique to one history in
    /// every run of the protocol; only two data dirs started with `-p` that did
    /// not know of each other can both have taken one number.
    fn diverges(&self, pos: LogPos, epoch: Epoch) -> Option<String> {
        if epoch != self.state.epoch || pos == LogPos(0) {
            return None;
        }
        let ours = if pos == self.state.pos {
            Some(self.state.epoch)
        } else if pos > self.state.pos {
            None
        } else if self.base == Some((pos, epoch)) {
            Some(epoch)
        } else {
            let first = self.tail.front()?.pos;
            let at = self.tail.get(pos.0.checked_sub(first.0)? as usize)?;
            (at.pos == pos).then_some(at.epoch)
        };
        (ours != Some(epoch)).then(|| {
            format!(
                "it holds entries of epoch {epoch} (up to position {pos}) that this primary does not: two data dirs \
                 were started with -p as the same epoch, and each may hold changes the other lacks. Neither is \
                 overwritten: keep the one to serve running, move the other data dir aside, and start that server \
                 again with an empty --data"
            )
        })
    }

    /// Entries after (`pos`, `epoch`), if this node's log holds that entry (the
    /// other history is then a prefix of this one).
    fn entries_after(&self, pos: LogPos, epoch: Epoch) -> Option<Vec<Entry>> {
        if pos == self.state.pos {
            return (epoch == self.state.epoch).then(Vec::new);
        }
        if pos > self.state.pos {
            return None;
        }
        if self.base == Some((pos, epoch)) {
            return Some(self.tail.iter().cloned().collect());
        }
        let first = self.tail.front()?.pos;
        if pos < first {
            return None;
        }
        let i = (pos.0 - first.0) as usize;
        let at = self.tail.get(i)?;
        (at.pos == pos && at.epoch == epoch).then(|| self.tail.iter().skip(i + 1).cloned().collect())
    }

    // -----------------------------------------------------------------------
    // Epochs and roles

    /// Every epoch this server hears of goes through here. A later one than it
    /// knows is adopted; a primary that hears of one steps down (its backups have
    /// followed a newer primary, or will). Returns true when `epoch` is not behind
    /// this server's: the message it came with may be taken into account.
    pub fn see_epoch(&mut self, now: u64, epoch: Epoch, out: &mut Vec<Output>) -> bool {
        self.bully.saw_epoch(epoch.0);
        if epoch < self.epoch {
            return false;
        }
        if epoch > self.epoch {
            self.epoch = epoch;
            out.push(Output::SawEpoch(epoch));
            if !self.is_primary() && self.verified && self.bully.promise().is_none_or(|(e, _)| e != epoch.0) {
                // A later epoch this server did not promise: elected without it,
                // by servers it may not have heard (a silent partition). Its
                // history may lack what that epoch acknowledged, and its own
                // primary may be stale: it stands again only once a primary of
                // that epoch has counted it (issue 11's simulation: a member of a
                // stale primary's stood and would have won the same epoch twice).
                info(out, format!("heard of epoch={epoch} without having promised it; may not stand until it rejoins"));
                self.verified = false;
                self.pending_join = None;
            }
            if self.is_primary() {
                warn(out, format!("stepping down: heard of epoch={epoch}, later than ours"));
                self.become_backup(now, None, out);
                out.push(Output::SteppedDown { epoch });
            }
        }
        true
    }

    /// Makes this server primary of `epoch`, counting on `members` (backups that
    /// are expected to follow it at once). Commits the new epoch first; its
    /// clients are called back at once.
    pub fn become_primary(&mut self, now: u64, epoch: Epoch, members: &[ServerId]) -> Vec<Output> {
        let mut out = Vec::new();
        if matches!(self.role, Role::Backup(_)) {
            out.push(Output::Unfollow);
        }
        if epoch > self.epoch {
            out.push(Output::SawEpoch(epoch));
        }
        self.epoch = self.epoch.max(epoch);
        self.bully.saw_epoch(epoch.0);
        self.bully.settle();
        self.learn_own_addr(&mut out);
        let mut acks = Acks::new(self.cfg.ack_timeout_ms);
        let me = Member { id: self.cfg.id, addr: self.cfg.addr.clone() };
        let mut list = vec![me];
        for id in members {
            if let Some(m) = self.state.members.get(id) {
                acks.add(*id);
                list.push(m.clone());
            }
        }
        if self.majority() {
            // The membership stays whole: a majority is counted over every member,
            // those that did not promise (down, cut off) included.
            for m in self.state.members.values() {
                if !list.iter().any(|l| l.id == m.id) {
                    list.push(m.clone());
                }
            }
        }
        let announce: Vec<Member> = self.state.members.values().filter(|m| m.id != self.cfg.id).cloned().collect();
        self.role = Role::Primary(PrimaryRole {
            links: BTreeMap::new(),
            acks,
            next_heartbeat: now,
            reserving: BTreeMap::new(),
            fencing: BTreeMap::new(),
            committed: self.state.pos,
            announce_at: None,
            held: BTreeMap::new(),
            heard: BTreeMap::new(),
            since: now,
            strays: BTreeMap::new(),
            barriers: Vec::new(),
            unannounced: announce.iter().map(|m| (m.id, (m.addr.clone(), None))).collect(),
        });
        self.dropped = false;
        self.verified = true;
        info(
            &mut out,
            format!(
                "became primary id={} epoch={epoch} pos={} members={:?}",
                self.cfg.id,
                self.state.pos,
                list.iter().map(|m| m.id.0).collect::<Vec<_>>()
            ),
        );
        self.propose_internal(now, Change::NewEpoch { epoch, primary: self.cfg.id, members: list }, &mut out);
        for m in announce {
            let msg = Msg::Coordinator { epoch, id: self.cfg.id, addr: self.cfg.addr.clone() };
            out.push(Output::ToPeer { epoch: self.epoch, to: m.id, addr: m.addr, msg });
        }
        out.push(Output::BecamePrimary { epoch });
        out
    }

    /// A server listening on every address (`--bind` left at 0.0.0.0, as on a
    /// workstation) does not know the address others reach it at; the membership
    /// does: its primary recorded the IP its link came from. A backup taking over
    /// adopts it before it announces itself, else it would tell everyone to follow
    /// "0.0.0.0:4000", which every other server takes for itself (found in the
    /// five-host lab: the other backup followed itself and stood again and again).
    fn learn_own_addr(&mut self, out: &mut Vec<Output>) {
        let unspecified = self.cfg.addr.parse::<std::net::SocketAddr>().is_ok_and(|a| a.ip().is_unspecified());
        if !unspecified {
            return;
        }
        if let Some(m) = self.state.members.get(&self.cfg.id) {
            if m.addr != self.cfg.addr {
                info(out, format!("listening on {}; others reach this server at {}", self.cfg.addr, m.addr));
                self.cfg.addr = m.addr.clone();
            }
        }
    }

    /// Makes this server a backup: of the primary at `primary` when known (it
    /// follows it), or looking for one. A primary stepping down fails what waits
    /// for acks (the clients resend to the new primary) and closes its links.
    pub fn become_backup(&mut self, now: u64, primary: Option<String>, out: &mut Vec<Output>) {
        if let Role::Primary(p) = &mut self.role {
            while let Some((_, ticket)) = p.acks.pop_front() {
                out.extend(ticket.map(Output::Abort));
            }
            for (_, t) in p.barriers.drain(..) {
                out.push(Output::Abort(t));
            }
            for link in p.links.keys() {
                out.push(Output::CloseLink { link: *link });
            }
            self.verified = false;
        }
        self.role = Role::Backup(BackupRole {
            phase: Phase::Detached,
            target: None,
            primary: None,
            suspect: None,
            detector: Detector::new(self.cfg.failure_timeout_ms, now),
            retry_at: now,
            retries: 0,
            acked: self.state.pos,
            owes_caught_up: false,
        });
        if let Some(addr) = primary {
            self.follow(now, addr, out);
        }
    }

    /// Starts as the primary of a new epoch (`-p`): the epoch after every one this
    /// data dir knows, with a membership of itself; backups join it.
    ///
    /// The node's clock starts here, not when it was built: whatever the process
    /// did in between (opening the store) is no pause of a running primary.
    pub fn start_primary(&mut self, now: u64) -> Vec<Output> {
        self.last_now = self.last_now.max(now);
        let epoch = self.epoch.max(self.state.epoch).next();
        self.become_primary(now, epoch, &[])
    }

    /// Starts as a backup (`-b`): joins through the seed address.
    pub fn start_backup(&mut self, now: u64) -> Vec<Output> {
        self.last_now = self.last_now.max(now);
        let mut out = Vec::new();
        if let Some(seed) = self.cfg.seed.clone() {
            self.follow(now, seed, &mut out);
        }
        out
    }

    fn follow(&mut self, now: u64, addr: String, out: &mut Vec<Output>) {
        if let Role::Backup(b) = &mut self.role {
            // A snapshot not yet installed with its files: the state says more
            // than the data dir holds, so the next join asks for a snapshot
            // again. Joined with entries instead, the files still to fetch
            // were never fetched (CI, `lab_partition_promise_majority_quorum`:
            // a new primary's coordinator came while the old one installed).
            if b.phase == Phase::Installing {
                self.want_snapshot = true;
            }
            b.phase = Phase::Joining;
            b.target = Some(addr.clone());
            b.detector = Detector::new(self.cfg.failure_timeout_ms, now);
            out.push(Output::Follow { addr });
        }
    }

    // -----------------------------------------------------------------------
    // Proposals and persistence

    /// Proposes a change (primary only): `ticket` completes once it is stored on
    /// every backup that is live now, or is aborted.
    pub fn propose(
        &mut self,
        now: u64,
        change: Change,
        request: Option<(DeviceId, LastRequest)>,
        ticket: Ticket,
    ) -> Vec<Output> {
        let mut out = Vec::new();
        self.clock(now, &mut out);
        if !self.is_primary() {
            out.push(Output::Abort(ticket));
            return out;
        }
        self.push_entry(change, request, Some(ticket), &mut out);
        out
    }

    /// Completes `ticket` once every entry proposed so far is stored on every
    /// backup it waited for (and, under a majority quorum, on a majority); aborts
    /// it if this server steps down first. A request answered again from the
    /// request table waits here: its entry may be one this primary inherited from
    /// the one before, not yet on its backups, and an answer promises that the
    /// change survives (issue 11).
    pub fn barrier(&mut self, now: u64, ticket: Ticket) -> Vec<Output> {
        let mut out = Vec::new();
        self.clock(now, &mut out);
        let upto = self.unpersisted.back().map_or(self.state.pos, |(e, _)| e.pos);
        let Role::Primary(p) = &mut self.role else {
            out.push(Output::Abort(ticket));
            return out;
        };
        p.barriers.push((upto, ticket));
        self.settle(&mut out);
        out
    }

    fn propose_internal(&mut self, _now: u64, change: Change, out: &mut Vec<Output>) -> LogPos {
        self.push_entry(change, None, None, out)
    }

    fn push_entry(
        &mut self,
        change: Change,
        request: Option<(DeviceId, LastRequest)>,
        ticket: Option<Ticket>,
        out: &mut Vec<Output>,
    ) -> LogPos {
        let last = self.unpersisted.back().map_or(self.state.pos, |(e, _)| e.pos);
        let entry = Entry { pos: last.next(), epoch: self.epoch, change, request };
        let pos = entry.pos;
        self.unpersisted.push_back((entry.clone(), ticket));
        out.push(Output::Persist(entry));
        pos
    }

    /// The entry at `pos` is in the log and its file action done. `lacks` names
    /// paths whose content this backup could not get for it (always empty on the
    /// primary). Applies the entry and does what depends on it.
    pub fn persisted(&mut self, now: u64, pos: LogPos, lacks: Vec<(String, String)>) -> Vec<Output> {
        let mut out = Vec::new();
        let Some((entry, ticket)) = self.unpersisted.pop_front() else {
            warn(&mut out, format!("persisted pos={pos} reported, but nothing waits to be persisted"));
            return out;
        };
        if entry.pos != pos {
            warn(&mut out, format!("persisted pos={pos} reported, but pos={} was next", entry.pos));
        }
        if let Err(e) = self.state.apply(&entry) {
            // The caller checked the order; a gap here is a bug, not an input.
            warn(&mut out, format!("cannot apply a persisted entry: {e}"));
            return out;
        }
        self.remember(entry.clone());
        for m in self.state.members.values().filter(|m| m.id != self.cfg.id) {
            self.contacts.insert(m.id, m.addr.clone());
        }
        match &mut self.role {
            Role::Primary(p) => {
                p.reserving.remove(&pos);
                if matches!(entry.change, Change::Join { .. } | Change::NewEpoch { .. }) {
                    p.announce_at = Some(pos);
                }
                for (no, link) in &p.links {
                    let _ = link;
                    out.push(Output::ToLink {
                        epoch: self.epoch,
                        link: *no,
                        msg: Msg::Apply { entry: Box::new(entry.clone()) },
                    });
                }
                p.acks.propose(pos, now, ticket);
                self.settle(&mut out);
            }
            Role::Backup(_) => {
                self.settle_missing(&entry.change, lacks, &mut out);
                if let Change::Join { member } = &entry.change {
                    // Only a join by the primary of the current epoch counts (an
                    // older one replayed while catching up speaks for an old
                    // membership), and not one from before a fence.
                    if member.id == self.cfg.id
                        && (entry.epoch, entry.pos) > self.fenced_at
                        && entry.epoch == self.epoch
                    {
                        self.dropped = false;
                        self.joined_at = (entry.epoch, entry.pos);
                        if !self.verified {
                            self.pending_join = Some((entry.pos, entry.epoch));
                        }
                    }
                }
                if let Change::Leave { id } = &entry.change {
                    if *id == self.cfg.id {
                        self.verified = false;
                        self.pending_join = None;
                    }
                }
                if let Change::NewEpoch { members, .. } = &entry.change {
                    if !members.iter().any(|m| m.id == self.cfg.id) {
                        self.verified = false;
                        self.pending_join = None;
                    }
                }
                self.maybe_ack(&mut out);
            }
        }
        out
    }

    /// The entry at `pos` did not reach the log: nothing changed. It, and every
    /// entry proposed after it, is aborted.
    pub fn persist_failed(&mut self, _now: u64, pos: LogPos, why: &str) -> Vec<Output> {
        let mut out = Vec::new();
        warn(&mut out, format!("cannot store entry pos={pos}: {why}"));
        while let Some((entry, ticket)) = self.unpersisted.pop_back() {
            if let Some(t) = ticket {
                out.push(Output::Abort(t));
            }
            if let Role::Primary(p) = &mut self.role {
                if let Some(link) = p.reserving.remove(&entry.pos) {
                    out.push(Output::CloseLink { link });
                    p.links.remove(&link);
                }
            }
        }
        out
    }

    fn remember(&mut self, entry: Entry) {
        self.tail.push_back(entry);
        while self.tail.len() > TAIL_ENTRIES {
            if let Some(old) = self.tail.pop_front() {
                self.base = Some((old.pos, old.epoch));
            }
        }
    }

    /// Completes every entry at the front that waits for nobody.
    fn settle(&mut self, out: &mut Vec<Output>) {
        let me = self.cfg.id;
        let quorum: Option<(Vec<ServerId>, usize)> = self
            .majority()
            .then(|| (self.state.members.keys().copied().filter(|id| *id != me).collect(), self.majority_of_members()));
        if let Role::Primary(p) = &mut self.role {
            let held = &p.held;
            let enough = |pos: LogPos| match &quorum {
                None => true,
                Some((others, need)) => {
                    1 + others.iter().filter(|id| held.get(id).is_some_and(|h| *h >= pos)).count() >= *need
                }
            };
            for (pos, ticket) in p.acks.settle_while(enough) {
                p.committed = p.committed.max(pos);
                if let Some(t) = ticket {
                    out.push(Output::Complete(t));
                }
            }
            let committed = p.committed;
            p.barriers.retain(|(pos, t)| {
                if *pos <= committed {
                    out.push(Output::Complete(*t));
                }
                *pos > committed
            });
            if p.announce_at.is_some_and(|at| p.committed >= at) {
                p.announce_at = None;
                for no in p.links.keys() {
                    let msg = Msg::Heartbeat { pos: self.state.pos, committed: p.committed };
                    out.push(Output::ToLink { epoch: self.epoch, link: *no, msg });
                }
            }
        }
    }

    // -----------------------------------------------------------------------
    // Time

    /// Time passes: heartbeats and overdue backups on the primary; suspicion,
    /// elections and retries on a backup.
    pub fn tick(&mut self, now: u64) -> Vec<Output> {
        let mut out = Vec::new();
        self.clock(now, &mut out);
        match &mut self.role {
            Role::Primary(p) => {
                if now >= p.next_heartbeat {
                    p.next_heartbeat = now + self.cfg.heartbeat_ms;
                    for (no, l) in &p.links {
                        let _ = l;
                        let msg = Msg::Heartbeat { pos: self.state.pos, committed: p.committed };
                        out.push(Output::ToLink { epoch: self.epoch, link: *no, msg });
                    }
                    // Fences whose answer did not come: ask again.
                    let due: Vec<ServerId> = p
                        .fencing
                        .iter()
                        .filter(|(_, f)| f.retry_at.is_some_and(|t| now >= t))
                        .map(|(id, _)| *id)
                        .collect();
                    for id in due {
                        self.send_fence(id, &mut out);
                    }
                    self.call_strays(now, &mut out);
                    self.announce_again(now, &mut out);
                }
                if self.cfg.quorum == Quorum::Majority {
                    let window = self.cfg.fence_timeout_ms;
                    let need = self.majority_of_members();
                    let me = self.cfg.id;
                    let Role::Primary(p) = &self.role else { return out };
                    let recent = self
                        .state
                        .members
                        .keys()
                        .filter(|id| **id != me && p.heard.get(id).is_some_and(|t| t + window >= now))
                        .count();
                    if now >= p.since + window && 1 + recent < need {
                        warn(
                            &mut out,
                            format!(
                                "stepping down: heard {recent} of the other members within {window} ms, fewer than a \
                                 majority needs (--quorum majority)"
                            ),
                        );
                        let epoch = self.epoch;
                        self.become_backup(now, None, &mut out);
                        out.push(Output::SteppedDown { epoch });
                        return out;
                    }
                }
                // Dropping the backups that hold up the oldest entry may reveal the
                // next one overdue too: repeat until none is.
                loop {
                    self.settle(&mut out);
                    let late = match &self.role {
                        Role::Primary(p) => p.acks.overdue(now),
                        Role::Backup(_) => Vec::new(),
                    };
                    if late.is_empty() {
                        break;
                    }
                    let why = format!("no acknowledgement within {} ms", self.cfg.ack_timeout_ms);
                    let fencing: Vec<ServerId> = match &self.role {
                        Role::Primary(p) => p.fencing.keys().copied().collect(),
                        Role::Backup(_) => Vec::new(),
                    };
                    let fresh: Vec<ServerId> = late.into_iter().filter(|id| !fencing.contains(id)).collect();
                    if fresh.is_empty() {
                        break;
                    }
                    for id in fresh {
                        self.drop_backup(now, id, &why, &mut out);
                    }
                }
            }
            Role::Backup(b) => {
                if b.phase == Phase::Live && b.detector.tick(now) == Verdict::Suspected {
                    let silence = self.cfg.failure_timeout_ms;
                    let why = format!("no word from the primary for {silence} ms");
                    out.extend(self.lost_primary(now, &why));
                }
                out.extend(self.bully_tick(now));
                out.extend(self.maybe_stand(now));
            }
        }
        out
    }

    /// When the next tick is due, at the latest.
    pub fn next_tick(&self, now: u64) -> u64 {
        match &self.role {
            Role::Primary(p) => {
                let mut t = p.next_heartbeat;
                if let Some(d) = p.acks.next_deadline() {
                    t = t.min(d);
                }
                t.max(now)
            }
            Role::Backup(_) => now + (self.cfg.heartbeat_ms / 2).clamp(1, 50),
        }
    }

    fn bully_tick(&mut self, now: u64) -> Vec<Output> {
        let outs = self.bully.tick(now);
        self.bully_outputs(now, outs)
    }

    /// A backup without a live primary either stands (when it may) or retries
    /// following whatever address it knows.
    fn maybe_stand(&mut self, now: u64) -> Vec<Output> {
        let mut out = Vec::new();
        let Role::Backup(b) = &self.role else { return out };
        if b.phase != Phase::Detached {
            return out;
        }
        if self.eligible() {
            if !self.bully.may_stand(now) {
                return out;
            }
            let suspect = b.suspect;
            let others: Vec<u64> = self.state.members.keys().filter(|id| **id != self.cfg.id).map(|id| id.0).collect();
            if others.is_empty() {
                // The only member left: nobody else could hold anything newer.
                let epoch = Epoch(self.bully.next_target(self.epoch.0));
                return self.become_primary(now, epoch, &[]);
            }
            info(
                &mut out,
                format!(
                    "standing for election id={} epoch={} rank=({},{}) asking={others:?}",
                    self.cfg.id,
                    self.bully.next_target(self.epoch.0),
                    self.state.epoch,
                    self.state.pos
                ),
            );
            let need = if self.majority() { self.majority_of_members() - 1 } else { 0 };
            let outs = self.bully.stand_needing(now, self.epoch.0, &others, suspect.map(|s| s.0), need);
            out.extend(self.bully_outputs(now, outs));
            return out;
        }
        if now < b.retry_at {
            return out;
        }
        // May not stand: look for a primary through every address known.
        let mut targets: Vec<String> = Vec::new();
        targets.extend(b.primary.as_ref().map(|(_, a)| a.clone()));
        targets.extend(self.cfg.seed.clone());
        targets.extend(self.state.members.values().filter(|m| m.id != self.cfg.id).map(|m| m.addr.clone()));
        targets.extend(self.contacts.values().cloned());
        let mut seen = BTreeSet::new();
        targets.retain(|t| seen.insert(t.clone()));
        if targets.is_empty() {
            return out;
        }
        let retries = b.retries;
        let addr = targets[retries as usize % targets.len()].clone();
        if retries == 0 || retries.is_multiple_of(20) {
            info(&mut out, self.ineligible_reason());
        }
        if let Role::Backup(b) = &mut self.role {
            b.retries += 1;
            b.retry_at = now + (200u64 << b.retries.min(4)).min(2_000);
        }
        self.follow(now, addr, &mut out);
        out
    }

    fn bully_outputs(&mut self, now: u64, outs: Vec<BullyOut>) -> Vec<Output> {
        let mut out = Vec::new();
        for o in outs {
            match o {
                BullyOut::Ask { to, target } => {
                    let to = ServerId(to);
                    let Some(m) = self.state.members.get(&to) else { continue };
                    let msg = Msg::Election { target: Epoch(target), rank: self.rank() };
                    out.push(Output::ToPeer { epoch: self.epoch, to, addr: m.addr.clone(), msg });
                }
                BullyOut::Won { epoch, members } => {
                    if !self.eligible() || self.is_primary() {
                        warn(&mut out, format!("won epoch={epoch} but may no longer stand; not taking over"));
                        continue;
                    }
                    let members: Vec<ServerId> = members.into_iter().map(ServerId).collect();
                    info(&mut out, format!("won the election epoch={epoch} id={}", self.cfg.id));
                    out.extend(self.become_primary(now, Epoch(epoch), &members));
                }
                BullyOut::Follow { addr, epoch } => {
                    if Epoch(epoch) >= self.epoch && matches!(self.role, Role::Backup(_)) {
                        info(&mut out, format!("a primary is alive at {addr} (epoch={epoch}); following it"));
                        self.follow(now, addr, &mut out);
                    }
                }
                BullyOut::Behind { epoch } => {
                    self.see_epoch(now, Epoch(epoch), &mut out);
                }
            }
        }
        out
    }

    // -----------------------------------------------------------------------
    // Primary side: links to backups

    /// A server asks to join (on link `link`). Answers on the link: refused, or
    /// joined followed by the entries it lacks (its history is a prefix of this
    /// one's) or by a snapshot.
    pub fn link_join(&mut self, now: u64, link: LinkNo, req: JoinRequest) -> Vec<Output> {
        let mut out = Vec::new();
        self.clock(now, &mut out);
        let mine = self.epoch;
        if req.epoch > mine {
            self.see_epoch(now, req.epoch, &mut out);
        }
        let Role::Primary(p) = &self.role else {
            let reason = if req.epoch > mine {
                format!("this server, primary of epoch {mine}, learned of the later epoch {} from your hello and stepped down", req.epoch)
            } else {
                "this server is not the primary now".to_string()
            };
            out.push(Output::ToLink { epoch: self.epoch, link, msg: Msg::NotPrimary { reason } });
            out.push(Output::CloseLink { link });
            return out;
        };
        let me = self.cfg.id;
        let highest = p.links.values().map(|l| l.id).chain([me, self.state.max_id]).max().unwrap_or(me);
        let id = match req.id {
            Some(id) => id,
            None if highest.0 >= ServerId::MAX => {
                return self.refuse(link, format!("no server id is left below {}", ServerId::MAX), out)
            }
            None => highest.next(),
        };
        if let Err(e) = id.validate() {
            return self.refuse(link, e, out);
        }
        if id == me {
            let why = format!("server id {id} is taken by the primary; give the new server another --id");
            return self.refuse(link, why, out);
        }
        if let Some(why) = self.diverges(req.pos, req.last_epoch) {
            // Taking it in would install this primary's state over it, dropping
            // entries it holds of this very epoch: they may be acknowledged.
            warn(&mut out, format!("server id={id} at {}: {why}", req.addr));
            return self.refuse(link, why, out);
        }
        let existing: Vec<(LinkNo, String)> =
            p.links.iter().filter(|(_, l)| l.id == id).map(|(n, l)| (*n, l.addr.clone())).collect();
        if let Some((_, other)) = existing.iter().find(|(_, a)| *a != req.addr) {
            let why = format!("server id {id} is already in the cluster at {other}; give the new server another --id");
            return self.refuse(link, why, out);
        }
        // The same server back again (restarted, or its link broke): its old link
        // is left to end by itself (which of two hellos of one server is newer
        // cannot be told here: they come on different connections). Entries that
        // waited for it still do: it answers them on the new link, or is fenced
        // like any silent backup.
        if let Some(mine) = req.local_addr.clone() {
            if self.state.members.get(&me).is_some_and(|m| m.addr != mine) {
                self.cfg.addr = mine.clone();
                self.propose_internal(now, Change::Join { member: Member { id: me, addr: mine } }, &mut out);
            }
        }
        let mut reserved = None;
        if id > self.state.max_id {
            reserved = Some(self.propose_internal(now, Change::ReserveId { id }, &mut out));
        }
        let fencing = matches!(&self.role, Role::Primary(p) if p.fencing.contains_key(&id));
        // A stray (gone on without after a silent fence) missed what was
        // acknowledged meanwhile, whatever it claims: it comes back as a newcomer.
        let stray = match &mut self.role {
            Role::Primary(p) => p.strays.remove(&id).is_some(),
            Role::Backup(_) => false,
        };
        let mut member = self.state.members.contains_key(&id) && !fencing;
        let counted = matches!(&self.role, Role::Primary(p) if p.acks.is_live(id));
        if member && (!req.member || stray) && counted && !existing.is_empty() {
            // It is a live member on another link still: which of its two hellos
            // is the newer cannot be told, and closing the other link alone would
            // leave it sure it is a member (it never hears its Leave) while it lacks
            // what is acknowledged without it (issue 11's simulation, seed 2027: a
            // hello delayed by a pause came after the server's next one). It is
            // dropped like a silent backup: its links close and it is fenced, so it
            // knows before anything goes on without it, then joins again.
            self.drop_backup(now, id, "it joined again on another connection", &mut out);
            member = false;
        } else if member && (!req.member || stray) {
            // A member back with no claim to stand (it restarted, or was paused):
            // it is not standing, so nothing needs to wait for it any more, and it
            // joins again as a newcomer.
            info(
                &mut out,
                format!("server id={id} comes back as a newcomer; it leaves the membership until it has caught up"),
            );
            if let Role::Primary(p) = &mut self.role {
                p.acks.remove(id);
            }
            self.propose_leave(now, id, &mut out);
            member = false;
        }
        // Entries only for a member coming back (after a failover, or a broken
        // link): anyone else gets a snapshot, which costs what the current files
        // cost, where replaying history would fetch every version it ever held.
        let catch_up = if member { self.entries_after(req.pos, req.last_epoch) } else { None };
        let Role::Primary(p) = &mut self.role else { return out };
        if let Some(pos) = reserved {
            p.reserving.insert(pos, link);
        }
        match catch_up {
            Some(entries) => {
                info(
                    &mut out,
                    format!(
                        "backup joining id={id} addr={} from pos={} ({} entries to send){}",
                        req.addr,
                        req.pos,
                        entries.len(),
                        if member { "; a member: waited for at once" } else { "" }
                    ),
                );
                out.push(Output::ToLink {
                    epoch: self.epoch,
                    link,
                    msg: Msg::Joined { id, primary: me, snapshot: false, member },
                });
                for e in entries {
                    out.push(Output::ToLink { epoch: self.epoch, link, msg: Msg::Apply { entry: Box::new(e) } });
                }
                if member {
                    p.acks.add(id);
                    // Its last entry is ours: it holds our log up to there.
                    let h = p.held.entry(id).or_default();
                    *h = (*h).max(req.pos);
                }
                p.heard.insert(id, now);
                let live = p.acks.is_live(id);
                p.links.insert(link, LinkInfo { id, addr: req.addr, live, caught_up: member });
            }
            None => {
                info(
                    &mut out,
                    format!(
                        "backup joining id={id} addr={} with a snapshot at pos={} (its pos={} epoch={})",
                        req.addr, self.state.pos, req.pos, req.last_epoch
                    ),
                );
                out.push(Output::ToLink {
                    epoch: self.epoch,
                    link,
                    msg: Msg::Joined { id, primary: me, snapshot: true, member: false },
                });
                out.push(Output::SnapshotTo { link, epoch: self.epoch, state: Box::new(self.state.clone()) });
                // A member coming back through a snapshot stays waited for: it
                // acknowledges once installed, or is fenced when that takes too long.
                let live = p.acks.is_live(id);
                p.heard.insert(id, now);
                p.links.insert(link, LinkInfo { id, addr: req.addr, live, caught_up: false });
            }
        }
        out
    }

    fn refuse(&mut self, link: LinkNo, reason: String, mut out: Vec<Output>) -> Vec<Output> {
        warn(&mut out, format!("refused joining server: {reason}"));
        out.push(Output::ToLink { epoch: self.epoch, link, msg: Msg::Refused { reason } });
        out.push(Output::CloseLink { link });
        out
    }

    /// A message from a backup on link `link`, stamped with `epoch`.
    pub fn link_msg(&mut self, now: u64, link: LinkNo, epoch: Epoch, msg: Msg) -> Vec<Output> {
        let mut out = Vec::new();
        self.clock(now, &mut out);
        if !self.see_epoch(now, epoch, &mut out) {
            // A backup of an older epoch: it has not learned of this one yet. Its
            // acks cannot be taken for ours, but it learns from our next frame.
            warn(
                &mut out,
                format!("dropping {} on link {link} with stale epoch={epoch} (ours is {})", msg.kind(), self.epoch),
            );
            return out;
        }
        let Role::Primary(p) = &mut self.role else { return out };
        let Some(info_) = p.links.get(&link).cloned() else { return out };
        p.heard.insert(info_.id, now);
        if let Msg::Ack { pos } | Msg::CaughtUp { pos } = &msg {
            let h = p.held.entry(info_.id).or_default();
            *h = (*h).max(*pos);
        }
        match msg {
            Msg::Ack { pos } => {
                p.acks.ack(info_.id, pos);
                self.settle(&mut out);
            }
            Msg::CaughtUp { pos } => {
                if info_.live && p.acks.is_live(info_.id) {
                    // A member that came back through a snapshot: its ack.
                    if let Some(l) = p.links.get_mut(&link) {
                        l.caught_up = true;
                    }
                    p.acks.ack(info_.id, pos);
                    // An install leaves a backup unsure it may stand; it may once it
                    // stores a Join of itself by this primary (issue 11's simulation,
                    // seed 1806 with cuts: a member that promised the new primary and
                    // came back through a snapshot followed it for good, never
                    // eligible, one standby fewer).
                    // (Not while it is fenced: the fence's end makes it live with a
                    // Join of its own, after it leaves the acks.)
                    if !p.fencing.contains_key(&info_.id) {
                        let member = Member { id: info_.id, addr: info_.addr.clone() };
                        self.propose_internal(now, Change::Join { member }, &mut out);
                    }
                    self.settle(&mut out);
                    return out;
                }
                if info_.caught_up {
                    return out;
                }
                if let Some(l) = p.links.get_mut(&link) {
                    l.caught_up = true;
                }
                // A backup still being fenced joins once the fence is over.
                if !p.fencing.contains_key(&info_.id) {
                    self.make_live(now, link, info_.id, info_.addr, &mut out);
                }
            }
            Msg::Ping => {}
            other => {
                let why = format!("unexpected {} from the backup", other.kind());
                self.drop_backup(now, info_.id, &why, &mut out);
            }
        }
        out
    }

    /// A backup's link ended.
    pub fn link_down(&mut self, now: u64, link: LinkNo, why: &str) -> Vec<Output> {
        let mut out = Vec::new();
        self.clock(now, &mut out);
        let Role::Primary(p) = &mut self.role else { return out };
        let Some(l) = p.links.remove(&link) else { return out };
        if p.links.values().any(|other| other.id == l.id) {
            // It is back on another link already.
            return out;
        }
        p.links.insert(link, l.clone());
        self.drop_backup(now, l.id, why, &mut out);
        self.settle(&mut out);
        out
    }

    /// Stops counting on a backup: its links close at once. A backup that entries
    /// wait for is fenced first (see [`Msg::Fence`]): entries complete without it
    /// only once it has answered that it knows, or is known to be down. Then it
    /// leaves the membership.
    fn drop_backup(&mut self, now: u64, id: ServerId, why: &str, out: &mut Vec<Output>) {
        let Role::Primary(p) = &mut self.role else { return };
        let links: Vec<(LinkNo, String)> =
            p.links.iter().filter(|(_, l)| l.id == id).map(|(n, l)| (*n, l.addr.clone())).collect();
        let mut addr = self.state.members.get(&id).map(|m| m.addr.clone());
        for (no, a) in links {
            warn(out, format!("dropping backup id={id} addr={a}: {why}"));
            out.push(Output::CloseLink { link: no });
            p.links.remove(&no);
            addr.get_or_insert(a);
        }
        if !p.acks.is_live(id) {
            // Nothing waits for it (it was joining): it may not stand either.
            if self.state.members.contains_key(&id) && !p.fencing.contains_key(&id) {
                self.propose_leave(now, id, out);
            }
            return;
        }
        if p.fencing.contains_key(&id) {
            return;
        }
        let Some(addr) = addr else {
            // No address to fence it at (cannot happen for a member): go on.
            p.acks.remove(id);
            return;
        };
        info(out, format!("fencing backup id={id} addr={addr}: entries wait until it knows it was dropped"));
        let pos = self.unpersisted.back().map_or(self.state.pos, |(e, _)| e.pos);
        p.fencing
            .insert(id, Fence { addr, why: why.to_string(), pos, started: now, retry_at: Some(now), silent: false });
        self.send_fence(id, out);
    }

    /// Tells each stray that is due (and has no link here) that this server is
    /// primary: one that knows a later epoch answers `stale`, and this one steps
    /// down; one of this epoch follows it.
    fn call_strays(&mut self, now: u64, out: &mut Vec<Output>) {
        let Role::Primary(p) = &mut self.role else { return };
        let linked: BTreeSet<ServerId> = p.links.values().map(|l| l.id).collect();
        p.strays.retain(|id, _| !linked.contains(id));
        let msg = Msg::Coordinator { epoch: self.epoch, id: self.cfg.id, addr: self.cfg.addr.clone() };
        for (id, (addr, at)) in p.strays.iter_mut() {
            if now >= *at {
                *at = now + self.cfg.fence_timeout_ms;
                out.push(Output::ToPeer { epoch: self.epoch, to: *id, addr: addr.clone(), msg: msg.clone() });
            }
        }
    }

    /// Tells each server that the `coordinator` did not reach, whose retry is due,
    /// again. One that follows this primary by now (it has a link) needs no more.
    fn announce_again(&mut self, now: u64, out: &mut Vec<Output>) {
        let Role::Primary(p) = &mut self.role else { return };
        let links = &p.links;
        p.unannounced.retain(|id, _| !links.values().any(|l| l.id == *id));
        for (id, (addr, retry_at)) in p.unannounced.iter_mut() {
            if retry_at.is_some_and(|t| now >= t) {
                *retry_at = None;
                let msg = Msg::Coordinator { epoch: self.epoch, id: self.cfg.id, addr: self.cfg.addr.clone() };
                out.push(Output::ToPeer { epoch: self.epoch, to: *id, addr: addr.clone(), msg });
            }
        }
    }

    fn send_fence(&mut self, id: ServerId, out: &mut Vec<Output>) {
        let Role::Primary(p) = &mut self.role else { return };
        let Some(f) = p.fencing.get_mut(&id) else { return };
        f.retry_at = None;
        let msg = Msg::Fence { reason: f.why.clone(), pos: f.pos };
        out.push(Output::ToPeer { epoch: self.epoch, to: id, addr: f.addr.clone(), msg });
    }

    /// A fence is over: `id` knows it was dropped, or is down. Entries stop
    /// waiting for it, and it leaves the membership (or, if it came back and
    /// caught up meanwhile, it is live again at once).
    fn fenced(&mut self, now: u64, id: ServerId, how: &str, end: FenceEnd, out: &mut Vec<Output>) {
        let Role::Primary(p) = &mut self.role else { return };
        let Some(fence) = p.fencing.remove(&id) else {
            return;
        };
        if end != FenceEnd::Answered {
            p.strays.insert(id, (fence.addr.clone(), now + self.cfg.fence_timeout_ms));
        }
        info(out, format!("fenced backup id={id}: {how}"));
        p.acks.remove(id);
        // Nothing waits for it now, on any link: a link it opened while it was
        // being fenced (a snapshot join counts as live while its acks are still
        // waited for) would otherwise take its `caught_up` for a member's ack and
        // never make it a member again.
        for l in p.links.values_mut().filter(|l| l.id == id) {
            l.live = false;
        }
        let back: Option<(LinkNo, String)> =
            p.links.iter().find(|(_, l)| l.id == id && l.caught_up).map(|(n, l)| (*n, l.addr.clone()));
        // A silent backup stays in the membership (elections on this side must
        // still ask it: it may have elected a primary of its own beyond a cut,
        // and a candidate here that left it out could take that very epoch
        // again); it leaves once it comes back (it joins again as a newcomer).
        if self.state.members.contains_key(&id) && (end != FenceEnd::Silent || back.is_some()) {
            self.propose_leave(now, id, out);
        }
        if let Some((no, addr)) = back {
            self.make_live(now, no, id, addr, out);
        }
        let remaining = self.live_backups().len();
        if remaining + 1 < self.state.members.len() || remaining == 0 {
            warn(out, format!("running with {remaining} live backups after dropping id={id}"));
        }
        self.settle(out);
    }

    fn propose_leave(&mut self, now: u64, id: ServerId, out: &mut Vec<Output>) {
        if self.majority() {
            // The majority is of the whole membership: a member dropped or down
            // stays counted (and asked in elections) until it is back.
            return;
        }
        if !self.unpersisted.iter().any(|(e, _)| e.change == (Change::Leave { id })) {
            self.propose_internal(now, Change::Leave { id }, out);
        }
    }

    fn make_live(&mut self, now: u64, link: LinkNo, id: ServerId, addr: String, out: &mut Vec<Output>) {
        let Role::Primary(p) = &mut self.role else { return };
        if let Some(l) = p.links.get_mut(&link) {
            l.live = true;
        }
        p.acks.add(id);
        info(out, format!("backup caught up id={id} addr={addr}; adding it to the membership"));
        self.propose_internal(now, Change::Join { member: Member { id, addr } }, out);
    }

    /// The primary (`from`, at `from_epoch`) fences this server: it stops counting
    /// on it. Unless this server knows a later epoch (then the fencer is stale),
    /// it stands in no election until it has joined again and caught up.
    pub fn fence(
        &mut self,
        now: u64,
        from: ServerId,
        from_epoch: Epoch,
        reason: &str,
        pos: LogPos,
    ) -> (Answer, Vec<Output>) {
        let mut out = Vec::new();
        self.clock(now, &mut out);
        self.see_epoch(now, from_epoch, &mut out);
        if from_epoch < self.epoch || self.is_primary() {
            warn(&mut out, format!("fence from id={from} of epoch={from_epoch} refused: ours is {}", self.epoch));
            return (Answer::Stale, out);
        }
        if self.joined_at > (from_epoch, pos) {
            // A copy of a fence that ended before this server joined again (a
            // retry delivered late): the primary has counted it since. Taking it
            // would leave it following, never eligible again (issue 11's
            // simulation, seed 8996 with cuts).
            info(&mut out, format!("fence from id={from} at pos={pos} predates this server's join; it stays a member"));
            return (Answer::Fenced, out);
        }
        warn(
            &mut out,
            format!("fenced by the primary id={from}: {reason}; this server may not stand until it rejoins"),
        );
        self.dropped = true;
        self.fenced_at = self.fenced_at.max((from_epoch, pos));
        self.verified = false;
        self.bully.settle();
        (Answer::Fenced, out)
    }

    // -----------------------------------------------------------------------
    // Backup side: the link to the primary

    /// The primary at `addr` (the follower's final address, after redirects)
    /// accepted this server under `id`.
    #[allow(clippy::too_many_arguments)]
    pub fn joined(
        &mut self,
        now: u64,
        epoch: Epoch,
        id: ServerId,
        primary: ServerId,
        addr: String,
        snapshot: bool,
        member: bool,
    ) -> Vec<Output> {
        let mut out = Vec::new();
        self.clock(now, &mut out);
        if !self.see_epoch(now, epoch, &mut out) || epoch < self.state.epoch {
            warn(&mut out, format!("not following {addr}: its epoch={epoch} is older than ours ({})", self.epoch));
            return self.follower_down(now, "stale primary");
        }
        let Role::Backup(b) = &mut self.role else { return out };
        if self.cfg.id != id {
            self.cfg.id = id;
            self.bully = Bully::new(id.0, self.cfg.election_timeout_ms);
        }
        // Recorded at every join: an id given with --id is kept in the data dir
        // only once a primary has accepted it.
        out.push(Output::SaveId(id));
        b.primary = Some((primary, addr.clone()));
        b.suspect = None;
        b.retries = 0;
        b.owes_caught_up = false;
        b.detector = Detector::new(self.cfg.failure_timeout_ms, now);
        self.bully.settle();
        if snapshot {
            b.phase = Phase::Installing;
            self.verified = false;
        } else {
            b.phase = Phase::Live;
            // Counted as a member: it stays one if it was (a fenced or restarted
            // server waits for its own Join entry instead).
            let _ = member;
            b.acked = self.state.pos;
        }
        info(
            &mut out,
            format!(
                "joined primary id={primary} at {addr} as id={id} epoch={epoch}{}",
                if snapshot { "; a snapshot follows" } else { "; catching up with entries" }
            ),
        );
        if !snapshot && !member {
            // Its history is a prefix of the primary's: it holds every file it
            // describes, so it has caught up already; the entries follow in order.
            self.caught_up(&mut out);
        }
        out
    }

    /// The primary's snapshot arrived (after [`Node::joined`] with a snapshot).
    pub fn snapshot(&mut self, now: u64, epoch: Epoch, state: State) -> Vec<Output> {
        let mut out = Vec::new();
        self.clock(now, &mut out);
        if !self.see_epoch(now, epoch, &mut out) {
            return self.follower_down(now, "a snapshot of an older epoch");
        }
        if let Role::Backup(b) = &mut self.role {
            b.detector.heard(now);
        }
        self.unpersisted.clear();
        self.tail.clear();
        self.base = Some((state.pos, state.epoch));
        self.want_snapshot = false;
        self.state = state.clone();
        self.verified = false;
        self.pending_join = None;
        info(&mut out, format!("installing snapshot pos={} epoch={}", state.pos, state.epoch));
        out.push(Output::Install(Box::new(state)));
        out
    }

    /// The snapshot is installed and its files fetched, but for `lacks` (files the
    /// primary had already moved on from).
    pub fn installed(&mut self, now: u64, lacks: Vec<(String, String)>) -> Vec<Output> {
        let mut out = Vec::new();
        self.clock(now, &mut out);
        self.missing = lacks.into_iter().collect();
        if let Role::Backup(b) = &mut self.role {
            b.phase = Phase::Live;
            // Fetching took as long as it took; the primary was heard meanwhile.
            b.detector = Detector::new(self.cfg.failure_timeout_ms, now);
            b.acked = b.acked.min(self.state.pos);
        }
        if self.missing.is_empty() {
            out.push(Output::Incomplete(false));
            self.caught_up(&mut out);
        } else {
            info(&mut out, format!("holding acks: {} files await a later entry", self.missing.len()));
            if let Role::Backup(b) = &mut self.role {
                b.owes_caught_up = true;
            }
        }
        out
    }

    fn caught_up(&mut self, out: &mut Vec<Output>) {
        if let Role::Backup(b) = &mut self.role {
            b.acked = self.state.pos;
            b.owes_caught_up = false;
            info(out, format!("caught up to pos={}", self.state.pos));
            out.push(Output::ToPrimary(Msg::CaughtUp { pos: self.state.pos }));
        }
    }

    /// The next entry from the primary (its content, if any, is in place in tmp/).
    pub fn apply(&mut self, now: u64, epoch: Epoch, entry: Entry) -> Vec<Output> {
        let mut out = Vec::new();
        self.clock(now, &mut out);
        if !self.see_epoch(now, epoch, &mut out) {
            return self.follower_down(now, "an entry of an older epoch");
        }
        let Role::Backup(b) = &mut self.role else { return out };
        b.detector.heard(now);
        let next = self.unpersisted.back().map_or(self.state.pos, |(e, _)| e.pos).next();
        if entry.pos != next || entry.epoch < self.state.epoch || entry.epoch > self.epoch {
            let why = format!(
                "entry pos={} epoch={} does not follow ours (pos={} epoch={})",
                entry.pos, entry.epoch, self.state.pos, self.state.epoch
            );
            warn(&mut out, why.clone());
            out.extend(self.follower_down(now, &why));
            return out;
        }
        self.unpersisted.push_back((entry.clone(), None));
        out.push(Output::Persist(entry));
        out
    }

    /// Settles what an applied entry says of missing content: a path it puts (with
    /// content), deletes or renames away is no longer missing; `lacks` are.
    fn settle_missing(&mut self, change: &Change, lacks: Vec<(String, String)>, out: &mut Vec<Output>) {
        let was = self.missing.is_empty();
        match change {
            Change::Put { user, meta, .. } | Change::Delete { user, meta } => {
                self.missing.remove(&(user.clone(), meta.path.clone()));
            }
            Change::Rename { user, from, .. } => {
                self.missing.remove(&(user.clone(), from.path.clone()));
            }
            _ => {}
        }
        self.missing.extend(lacks);
        if was && !self.missing.is_empty() {
            out.push(Output::Incomplete(true));
        } else if !was && self.missing.is_empty() {
            out.push(Output::Incomplete(false));
        }
    }

    /// Acknowledges (or, the first time after an install, reports caught up) once
    /// nothing is missing: an ack promises the content of every entry up to it.
    fn maybe_ack(&mut self, out: &mut Vec<Output>) {
        let Role::Backup(b) = &mut self.role else { return };
        if b.phase != Phase::Live {
            return;
        }
        if !self.missing.is_empty() {
            return;
        }
        if b.owes_caught_up {
            // The primary counts this server once it says it caught up, not on
            // an ack (issue 11's chaos run: such a joiner stayed out for good).
            self.caught_up(out);
            return;
        }
        let was = b.acked;
        b.acked = self.state.pos;
        if was < self.state.pos || self.state.pos == LogPos(0) {
            out.push(Output::ToPrimary(Msg::Ack { pos: b.acked }));
        }
    }

    /// A heartbeat, a ping answer or any other control message from the primary.
    pub fn from_primary(&mut self, now: u64, epoch: Epoch, msg: Msg) -> Vec<Output> {
        let mut out = Vec::new();
        self.clock(now, &mut out);
        if !self.see_epoch(now, epoch, &mut out) {
            return self.follower_down(now, "a message of an older epoch");
        }
        let Role::Backup(b) = &mut self.role else { return out };
        if b.phase == Phase::Detached {
            // Left over from a link this server gave up: it speaks for nothing.
            return out;
        }
        b.detector.heard(now);
        match msg {
            Msg::Heartbeat { committed, .. } => {
                let pos = b.acked;
                out.push(Output::ToPrimary(Msg::Ack { pos }));
                if let Some((join, join_epoch)) = self.pending_join {
                    // Only the primary that logged the join can say every member
                    // stored it: a later primary's positions count another log.
                    if committed >= join && epoch == join_epoch {
                        info(&mut out, format!("a member since pos={join}, now stored on every member"));
                        self.pending_join = None;
                        self.verified = true;
                    }
                }
            }
            // The link writer's own keep-alive: liveness only.
            Msg::Ping => {}
            Msg::Refused { reason } => out.push(Output::Fatal(reason)),
            other => {
                let why = format!("unexpected {} on the replication link", other.kind());
                out.extend(self.follower_down(now, &why));
            }
        }
        out
    }

    /// This backup could not store what its primary sent (an entry, a transfer, a
    /// fetched file: its disk is full, most often). Taking that for a lost primary
    /// would rejoin at once and fail again, several times a second, while the
    /// primary drops it each time. Instead it leaves: it stops following, may not
    /// stand in an election (it could not store what it would have to), and joins
    /// again after a pause that doubles with each failure in a row, from
    /// [`STORAGE_PAUSE_FIRST_MS`] to [`STORAGE_PAUSE_MAX_MS`].
    pub fn storage_failed(&mut self, now: u64, why: &str) -> Vec<Output> {
        let mut out = Vec::new();
        self.clock(now, &mut out);
        let Role::Backup(b) = &mut self.role else { return out };
        if self.storage_failures > 0 && now.saturating_sub(self.storage_failed_at) > STORAGE_FAILURES_FORGOTTEN_MS {
            self.storage_failures = 0;
        }
        let pause = STORAGE_PAUSE_FIRST_MS.saturating_mul(1 << self.storage_failures.min(16)).min(STORAGE_PAUSE_MAX_MS);
        self.storage_failures = self.storage_failures.saturating_add(1);
        self.storage_failed_at = now;
        if b.phase != Phase::Detached {
            out.push(Output::Unfollow);
        }
        b.phase = Phase::Detached;
        b.retry_at = now + pause;
        self.unpersisted.clear();
        self.verified = false;
        self.pending_join = None;
        out.push(Output::Log(
            log::Level::Error,
            format!(
                "leaving the cluster: this server cannot store what the primary sends ({why}); \
                 joining again in {} s (failure {} in a row)",
                pause / 1000,
                self.storage_failures
            ),
        ));
        out
    }

    /// The link to the primary ended (or could not be made). A backup that may
    /// stand starts an election; one that may not looks for a primary again.
    pub fn follower_down(&mut self, now: u64, why: &str) -> Vec<Output> {
        let mut out = Vec::new();
        self.clock(now, &mut out);
        self.unpersisted.clear();
        out.extend(self.lost_primary(now, why));
        out
    }

    fn lost_primary(&mut self, now: u64, why: &str) -> Vec<Output> {
        let mut out = Vec::new();
        let eligible = self.eligible();
        let Role::Backup(b) = &mut self.role else { return out };
        let was = b.phase;
        b.phase = Phase::Detached;
        if was == Phase::Live {
            b.suspect = b.primary.as_ref().map(|(id, _)| *id);
            let at = b.primary.as_ref().map_or("?".to_string(), |(_, a)| a.clone());
            warn(
                &mut out,
                format!(
                    "suspecting the primary at {at}: {why}; {}",
                    if eligible { "starting an election" } else { "looking for a primary" }
                ),
            );
            out.push(Output::Unfollow);
        } else {
            if was == Phase::Installing {
                // An install cut short leaves files missing: the data dir stays marked.
                self.verified = false;
            }
            if b.retries <= 1 || b.retries.is_multiple_of(20) {
                let at = b.target.clone().unwrap_or_default();
                warn(&mut out, format!("not following a primary (via {at}): {why}; retrying"));
            }
        }
        if let Role::Backup(b) = &mut self.role {
            if was != Phase::Live {
                b.retry_at = b.retry_at.max(now + 200);
            }
        }
        out.extend(self.maybe_stand(now));
        out
    }

    // -----------------------------------------------------------------------
    // Elections

    fn view(&self, now: u64) -> View {
        let status = match &self.role {
            Role::Primary(_) => Status::Primary(self.cfg.addr.clone()),
            Role::Backup(b)
                if b.phase == Phase::Live && b.detector.tick(now) == Verdict::Alive && b.primary.is_some() =>
            {
                Status::Following(b.primary.as_ref().map(|(_, a)| a.clone()).unwrap_or_default())
            }
            Role::Backup(_) => Status::Lost,
        };
        let suspect = match &self.role {
            Role::Backup(b) if status == Status::Lost => {
                b.suspect.or(b.primary.as_ref().map(|(id, _)| *id)).map(|id| id.0)
            }
            _ => None,
        };
        View {
            rank: rank_of(&self.rank()),
            epoch: self.epoch.0,
            eligible: self.eligible(),
            member: self.eligible(),
            status,
            suspect,
            majority: self.majority(),
        }
    }

    /// Server `from`, at epoch `from_epoch`, stands for `target` with `rank`:
    /// the answer, and what this server does about it.
    pub fn election(
        &mut self,
        now: u64,
        from: ServerId,
        from_epoch: Epoch,
        target: Epoch,
        rank: Rank,
    ) -> (Answer, Vec<Output>) {
        let mut out = Vec::new();
        self.clock(now, &mut out);
        self.see_epoch(now, from_epoch, &mut out);
        let view = self.view(now);
        let others: Vec<u64> = self.state.members.keys().filter(|id| **id != self.cfg.id).map(|id| id.0).collect();
        let candidate = Candidate { from: from.0, from_epoch: from_epoch.0, target: target.0, rank: rank_of(&rank) };
        let (reply, outs) = self.bully.on_election(now, &view, &candidate, &others);
        info(&mut out, format!("election from id={from} for epoch={target}: answering {reply:?}"));
        out.extend(self.bully_outputs(now, outs));
        if self.majority() && matches!(reply, Reply::Promise { .. }) {
            // A promise of `target` is a vote in it: from now on nothing from an
            // older primary is taken (its entries would go to a majority that no
            // longer elects it; issue 11's simulation: a promiser applied and
            // acknowledged the old primary's entries after promising, and the
            // winner lacked them).
            self.see_epoch(now, target, &mut out);
        }
        (answer_of(reply), out)
    }

    /// Server `from` announces itself primary of `epoch`, serving at `addr`.
    pub fn coordinator(&mut self, now: u64, from: ServerId, epoch: Epoch, addr: String) -> (Answer, Vec<Output>) {
        let mut out = Vec::new();
        self.clock(now, &mut out);
        let reply = self.bully.on_coordinator(self.epoch.0, from.0, epoch.0);
        if reply != Reply::Accepted {
            let why = match &reply {
                Reply::Stale { epoch: later } => format!("this server knows the later epoch {later}"),
                other => format!("{other:?}"),
            };
            warn(&mut out, format!("not following id={from} as primary of epoch={epoch}: {why}"));
            return (answer_of(reply), out);
        }
        if self.is_primary() && epoch == self.epoch {
            // Cannot happen when both won an election (a promise is given once);
            // two servers started with -p on the same epoch can.
            warn(&mut out, format!("id={from} claims epoch={epoch}, which is ours; refusing"));
            return (Answer::Stale, out);
        }
        info(&mut out, format!("new primary id={from} at {addr} epoch={epoch}; following it"));
        self.contacts.insert(from, addr.clone());
        self.see_epoch(now, epoch, &mut out);
        if let Role::Backup(b) = &mut self.role {
            b.primary = Some((from, addr.clone()));
        }
        self.follow(now, addr, &mut out);
        (Answer::Accepted, out)
    }

    /// Server `from`, at `epoch`, answered this server's election or coordinator
    /// message.
    pub fn peer_answer(&mut self, now: u64, from: ServerId, epoch: Epoch, answer: Answer) -> Vec<Output> {
        let mut out = Vec::new();
        self.clock(now, &mut out);
        if answer == Answer::Stale || answer == Answer::Accepted || matches!(answer, Answer::Primary { .. }) {
            self.see_epoch(now, epoch, &mut out);
        }
        if let Role::Primary(p) = &mut self.role {
            // Whatever it answered, the coordinator reached it.
            p.unannounced.remove(&from);
        }
        if self.is_primary() {
            if answer == Answer::Fenced {
                self.fenced(now, from, "it knows it was dropped", FenceEnd::Answered, &mut out);
                return out;
            }
            // Answers to our coordinator message.
            if answer == Answer::Accepted {
                if let Role::Primary(p) = &mut self.role {
                    p.strays.remove(&from);
                }
            } else {
                let note = format!("id={from} did not accept this primary: {answer:?} (its epoch={epoch})");
                if !self.notes.contains(&note) {
                    warn(&mut out, note.clone());
                    self.notes.push(note);
                    if self.notes.len() > 16 {
                        self.notes.remove(0);
                    }
                }
            }
            return out;
        }
        let outs = self.bully.reply(now, from.0, reply_of(answer, epoch));
        out.extend(self.bully_outputs(now, outs));
        out
    }

    /// Server `from` could not be asked, for the reason `how`.
    pub fn peer_unreachable(&mut self, now: u64, from: ServerId, how: Unreached) -> Vec<Output> {
        let down = how == Unreached::Refused;
        let mut out = Vec::new();
        self.clock(now, &mut out);
        if let Role::Primary(p) = &mut self.role {
            if let Some((_, retry_at)) = p.unannounced.get_mut(&from) {
                if down {
                    // Its process is not running: restarted, it joins with -b
                    // (or -p finds this cluster running and refuses).
                    p.unannounced.remove(&from);
                } else if retry_at.is_none() {
                    *retry_at = Some(now + ANNOUNCE_RETRY_MS);
                }
            }
            let Some(f) = p.fencing.get_mut(&from) else { return out };
            let risk = if self.cfg.quorum == Quorum::Majority {
                "changes still wait for a majority of the membership (--quorum majority)"
            } else {
                "if it is alive but cut off, changes acknowledged from now on could be lost should it become primary"
            };
            if down && f.silent {
                // Down now, but silent before: it may have been cut off, alive,
                // and elected a primary of its own before it died (issue 11's
                // simulation). Going on is as blind as after a timeout.
                let waited = now - f.started;
                warn(
                    &mut out,
                    format!(
                        "going on without backup id={from}: its port refuses connections now, after {waited} ms \
                         without an answer to its fence; {risk}"
                    ),
                );
                self.fenced(now, from, "down after a silence (treated as cut off)", FenceEnd::Silent, &mut out);
            } else if down {
                self.fenced(now, from, "its port refuses connections: it is down", FenceEnd::Down, &mut out);
            } else if now >= f.started + self.cfg.fence_timeout_ms {
                warn(
                    &mut out,
                    format!(
                        "going on without backup id={from}: no answer to its fence for {} ms; {risk}",
                        now - f.started
                    ),
                );
                self.fenced(now, from, "no answer (treated as down)", FenceEnd::Silent, &mut out);
            } else {
                // Only silence may hide a cut: a connection that reached the
                // backup and broke (a process dying under SIGKILL resets the
                // handshake it had accepted) says its host answers, so a refusal
                // after it says no more than a refusal at the first try.
                if how == Unreached::Silent {
                    f.silent = true;
                }
                f.retry_at = Some(now + self.cfg.election_timeout_ms.max(1));
            }
            return out;
        }
        let outs = self.bully.unreachable(now, from.0, down);
        out.extend(self.bully_outputs(now, outs));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use replibox_proto::{ContentHash, FileMeta, Version};

    fn cfg(id: u64) -> Config {
        Config {
            id: ServerId(id),
            addr: format!("s{id}"),
            heartbeat_ms: 100,
            ack_timeout_ms: 1000,
            failure_timeout_ms: 300,
            election_timeout_ms: 100,
            fence_timeout_ms: 900,
            seed: Some("s1".into()),
            quorum: Quorum::Live,
        }
    }

    fn put(path: &str, version: u64) -> Change {
        let meta = FileMeta {
            path: path.into(),
            version: Version(version),
            size: 1,
            mtime_ms: 0,
            hash: ContentHash::of(b"x"),
            deleted: false,
            atime_ms: 0,
            ctime_ms: 0,
            exec: false,
            dir: false,
        };
        Change::Put { user: "u".into(), meta, xfer: "x".into() }
    }

    /// Calls `f` on the node, then carries out its outputs like [`run`].
    fn step(node: &mut Node, now: u64, f: impl FnOnce(&mut Node) -> Vec<Output>) -> Vec<Output> {
        let batch = f(node);
        run(node, now, batch)
    }

    /// Carries out a batch of outputs as an always-successful disk would, and
    /// returns what was left for the network.
    fn run(node: &mut Node, now: u64, mut batch: Vec<Output>) -> Vec<Output> {
        let mut rest = Vec::new();
        let mut queue: VecDeque<Output> = batch.drain(..).collect();
        while let Some(o) = queue.pop_front() {
            match o {
                Output::Persist(e) => queue.extend(node.persisted(now, e.pos, Vec::new())),
                Output::Log(..) => {}
                other => rest.push(other),
            }
        }
        rest
    }

    /// The core vouches for its own work, never for a pause before it: a primary
    /// stopped between two events, whose first event after the stop is one the
    /// node never sees, still steps down at its next input (CI failure of
    /// 2026-12-02: it went on as primary of an old epoch and fenced the others).
    #[test]
    fn only_the_cores_own_work_is_vouched_for_never_a_pause_before_it() {
        let mut p = Node::new(cfg(1), State::default(), Vec::new(), 0);
        step(&mut p, 0, |n| n.start_primary(0));
        step(&mut p, 50, |n| n.tick(50));
        // Busy from 60 to 2000 (a listing of many files): no pause.
        p.busy(60, 2000);
        let out = step(&mut p, 2010, |n| n.tick(2010));
        assert!(p.is_primary(), "its own work taken for a pause: {out:?}");
        // Stopped from 2010 to 5000; the first event after it never reached the
        // node and took 5 ms.
        p.busy(5000, 5005);
        let out = step(&mut p, 5010, |n| n.tick(5010));
        assert!(!p.is_primary(), "a pause taken for work: {out:?}");
        assert!(out.contains(&Output::SteppedDown { epoch: Epoch(1) }), "{out:?}");
    }

    /// Backup 2 joined primary 1 (epoch 1) as a newcomer and was handed a
    /// snapshot at pos 3 at time 2: installing, not yet told it is installed.
    /// Returns it and the snapshot's outputs.
    fn backup_given_a_snapshot() -> (Node, Vec<Output>) {
        let mut b = Node::new(cfg(2), State::default(), Vec::new(), 0);
        b.start_backup(0);
        step(&mut b, 1, |n| n.joined(1, Epoch(1), ServerId(2), ServerId(1), "s1".into(), true, false));
        let primary_state = State { pos: LogPos(3), epoch: Epoch(1), ..Default::default() };
        let out = step(&mut b, 2, |n| n.snapshot(2, Epoch(1), primary_state));
        (b, out)
    }

    /// Regression (CI, `lab_partition_promise_majority_quorum`): a backup told of
    /// a new primary while it still fetched a snapshot's files joined it with
    /// entries from the snapshot's position, and the files were never fetched.
    #[test]
    fn a_join_restarted_while_installing_asks_for_a_snapshot_again() {
        let (mut b, _) = backup_given_a_snapshot();
        assert_eq!(b.join_point(), (LogPos(3), Epoch(1)));
        let (_, out) = b.coordinator(5, ServerId(3), Epoch(2), "s3".into());
        assert!(out.contains(&Output::Follow { addr: "s3".into() }), "{out:?}");
        assert_eq!(b.join_point(), (LogPos(0), Epoch(u64::MAX)), "the files not fetched must be asked for again");
    }

    /// Regression (`make bench` case 9, a user of 100,000 files): a backup whose
    /// snapshot took longer to install than the failure timeout took its own
    /// work for a pause, joined again, got another snapshot, and so on for ever.
    /// Installing is joining: that work is vouched for. A live backup's long
    /// stall still makes it join again.
    #[test]
    fn a_long_snapshot_install_is_no_pause_but_a_live_backups_stall_is() {
        let (mut b, out) = backup_given_a_snapshot();
        assert!(out.iter().any(|o| matches!(o, Output::Install(_))), "{out:?}");
        // Installing took 1.5 s, five times the failure timeout.
        b.busy(2, 1502);
        let out = step(&mut b, 1510, |n| n.installed(1510, Vec::new()));
        assert!(!out.contains(&Output::Follow { addr: "s1".into() }), "the install taken for a pause: {out:?}");
        assert!(out.contains(&Output::ToPrimary(Msg::CaughtUp { pos: LogPos(3) })), "{out:?}");
        // Live now: a stall as long makes it doubt and join again.
        b.busy(1520, 3020);
        let out = step(&mut b, 3030, |n| n.tick(3030));
        assert!(out.contains(&Output::Follow { addr: "s1".into() }), "a live backup's stall must doubt: {out:?}");
    }

    /// A primary that hears the time after a pause steps down there and then,
    /// before it would serve a read on its old authority.
    #[test]
    fn a_primary_observing_the_time_after_a_pause_steps_down_at_once() {
        let mut p = Node::new(cfg(1), State::default(), Vec::new(), 0);
        step(&mut p, 0, |n| n.start_primary(0));
        let out = step(&mut p, 100, |n| n.observe(100));
        assert!(p.is_primary() && out.is_empty(), "{out:?}");
        let out = step(&mut p, 5000, |n| n.observe(5000));
        assert!(!p.is_primary(), "{out:?}");
        assert!(out.contains(&Output::SteppedDown { epoch: Epoch(1) }), "{out:?}");
    }

    /// A primary started a while after its node was built (the store took that
    /// long to open) has not been paused: it does not step down at its first tick.
    #[test]
    fn a_slow_start_is_no_pause() {
        let mut p = Node::new(cfg(1), State::default(), Vec::new(), 0);
        step(&mut p, 5000, |n| n.start_primary(5000));
        let out = step(&mut p, 5010, |n| n.tick(5010));
        assert!(p.is_primary(), "the start taken for a pause: {out:?}");
    }

    #[test]
    fn persist_comes_before_every_send_and_answer_that_depends_on_it() {
        let mut p = Node::new(cfg(1), State::default(), Vec::new(), 0);
        step(&mut p, 0, |n| n.start_primary(0));
        let out = p.propose(1, put("a", 1), None, Ticket(7));
        assert!(matches!(out.as_slice(), [Output::Persist(_)]), "only the persist comes first: {out:?}");
        let Output::Persist(e) = &out[0] else { unreachable!() };
        let after = p.persisted(1, e.pos, Vec::new());
        assert!(after.contains(&Output::Complete(Ticket(7))), "no backups: complete once persisted");
        let failed = p.propose(2, put("b", 1), None, Ticket(8));
        let Output::Persist(e) = &failed[0] else { unreachable!() };
        assert!(p.persist_failed(2, e.pos, "disk full").contains(&Output::Abort(Ticket(8))));
        assert_eq!(p.state().pos, LogPos(2), "the failed entry changed nothing");
    }

    #[test]
    fn a_member_whose_history_is_a_prefix_catches_up_with_entries_and_is_waited_for() {
        let mut p = Node::new(cfg(1), State::default(), Vec::new(), 0);
        step(&mut p, 0, |n| n.start_primary(0));
        // Backup 2 joins with a history of its own: a snapshot.
        let out = step(&mut p, 1, |n| {
            n.link_join(
                1,
                10,
                JoinRequest {
                    id: Some(ServerId(2)),
                    addr: "s2".into(),
                    pos: LogPos(1),
                    last_epoch: Epoch(7),
                    epoch: Epoch(0),
                    local_addr: None,
                    member: false,
                },
            )
        });
        assert!(out.iter().any(|o| matches!(o, Output::SnapshotTo { link: 10, .. })), "{out:?}");
        let out = step(&mut p, 2, |n| n.link_msg(2, 10, Epoch(1), Msg::CaughtUp { pos: LogPos(2) }));
        assert!(out.iter().any(|o| matches!(o, Output::ToLink { link: 10, msg: Msg::Apply { .. }, .. })));
        assert_eq!(p.live_backups(), vec![ServerId(2)]);
        let state_at = p.state().clone();
        // It comes back on a new link (its old one not yet known to be dead), a
        // member holding the primary's last entry: entries only.
        let out = step(&mut p, 4, |n| {
            n.link_join(
                4,
                11,
                JoinRequest {
                    id: Some(ServerId(2)),
                    addr: "s2".into(),
                    pos: state_at.pos,
                    last_epoch: state_at.epoch,
                    epoch: Epoch(1),
                    local_addr: None,
                    member: true,
                },
            )
        });
        assert!(!out.iter().any(|o| matches!(o, Output::SnapshotTo { .. })), "a prefix needs no snapshot: {out:?}");
        assert!(out
            .iter()
            .any(|o| matches!(o, Output::ToLink { link: 11, msg: Msg::Joined { snapshot: false, .. }, .. })));
        let applies =
            out.iter().filter(|o| matches!(o, Output::ToLink { link: 11, msg: Msg::Apply { .. }, .. })).count();
        assert_eq!(applies, (p.state().pos.0 - state_at.pos.0) as usize, "exactly the entries it lacks");
    }

    /// Server 2 (at "s2") joining with nothing: no log, never a member.
    fn fresh_join() -> JoinRequest {
        JoinRequest {
            id: Some(ServerId(2)),
            addr: "s2".into(),
            pos: LogPos(0),
            last_epoch: Epoch(0),
            epoch: Epoch(0),
            local_addr: None,
            member: false,
        }
    }

    #[test]
    fn a_primary_that_hears_of_a_later_epoch_steps_down_and_fails_what_waits() {
        let mut p = Node::new(cfg(1), State::default(), Vec::new(), 0);
        step(&mut p, 0, |n| n.start_primary(0));
        step(&mut p, 0, |n| n.link_join(0, 10, fresh_join()));
        step(&mut p, 1, |n| n.link_msg(1, 10, Epoch(1), Msg::CaughtUp { pos: LogPos(2) }));
        let out = step(&mut p, 2, |n| n.propose(2, put("a", 1), None, Ticket(1)));
        assert!(!out.contains(&Output::Complete(Ticket(1))), "waits for backup 2");
        let (answer, out) = p.coordinator(3, ServerId(3), Epoch(5), "s3".into());
        assert_eq!(answer, Answer::Accepted);
        assert!(out.contains(&Output::Abort(Ticket(1))), "{out:?}");
        assert!(out.contains(&Output::SteppedDown { epoch: Epoch(5) }));
        assert!(out.contains(&Output::Follow { addr: "s3".into() }));
        assert!(!p.is_primary());
        assert!(!p.eligible(), "a stepped-down primary stands again only once it caught up");
    }

    /// A request answered again from the request table (a resend after a
    /// failover) is answered only once what is logged is stored on the backups:
    /// the entry holding its answer may be one this primary has not replicated yet.
    #[test]
    fn a_barrier_completes_only_once_the_backups_hold_everything_logged() {
        let mut p = Node::new(cfg(1), State::default(), Vec::new(), 0);
        step(&mut p, 0, |n| n.start_primary(0));
        let join = fresh_join();
        step(&mut p, 0, |n| n.link_join(0, 10, join));
        step(&mut p, 1, |n| n.link_msg(1, 10, Epoch(1), Msg::CaughtUp { pos: LogPos(2) }));
        step(&mut p, 2, |n| n.propose(2, put("a", 1), None, Ticket(1)));
        let out = step(&mut p, 3, |n| n.barrier(3, Ticket(2)));
        assert!(!out.contains(&Output::Complete(Ticket(2))), "backup 2 holds nothing yet: {out:?}");
        let pos = p.state().pos;
        let out = step(&mut p, 4, |n| n.link_msg(4, 10, Epoch(1), Msg::Ack { pos }));
        assert!(out.contains(&Output::Complete(Ticket(1))) && out.contains(&Output::Complete(Ticket(2))), "{out:?}");
        let out = step(&mut p, 5, |n| n.barrier(5, Ticket(3)));
        assert!(out.contains(&Output::Complete(Ticket(3))), "nothing waits: at once: {out:?}");
    }

    /// Regression (issue 11's chaos run): a joiner whose snapshot install lacked a
    /// file held its acks until a later entry settled the path, as it should,
    /// but then sent an ack where the primary waited for `caught_up`: the
    /// primary never counted it, and it never became a member again.
    #[test]
    fn a_joiner_missing_files_reports_caught_up_once_a_later_entry_settles_them() {
        let (mut b, _) = backup_given_a_snapshot();
        let out = step(&mut b, 3, |n| n.installed(3, vec![("u".into(), "a".into())]));
        assert!(
            !out.iter().any(|o| matches!(o, Output::ToPrimary(_))),
            "nothing said while a file is missing: {out:?}"
        );
        let entry = Entry { pos: LogPos(4), epoch: Epoch(1), change: put("a", 5), request: None };
        let out = step(&mut b, 4, |n| n.apply(4, Epoch(1), entry));
        assert!(
            out.contains(&Output::ToPrimary(Msg::CaughtUp { pos: LogPos(4) })),
            "the entry settled the missing file: the primary must hear caught_up: {out:?}"
        );
        let out =
            step(&mut b, 5, |n| n.from_primary(5, Epoch(1), Msg::Heartbeat { pos: LogPos(4), committed: LogPos(4) }));
        assert!(out.contains(&Output::ToPrimary(Msg::Ack { pos: LogPos(4) })), "then plain acks: {out:?}");
    }

    /// The coordinators a batch of outputs sends, as (to, epoch).
    fn coordinators(out: &[Output]) -> Vec<(u64, u64)> {
        out.iter()
            .filter_map(|o| match o {
                Output::ToPeer { to, msg: Msg::Coordinator { epoch, .. }, .. } => Some((to.0, epoch.0)),
                _ => None,
            })
            .collect()
    }

    /// Regression (issue 10, the five-host lab): a primary cut off without a FIN
    /// ran on as primary of its old epoch after its host came back, because the
    /// new primary's one `coordinator` had not reached it and nothing else ever
    /// told it. The new primary tells it again until it answers; a server whose
    /// port refuses (its process is down) is not asked again.
    #[test]
    fn a_new_primary_tells_a_server_its_coordinator_did_not_reach_again_until_it_answers() {
        let mut state = State::default();
        for id in 1..=4 {
            state.members.insert(ServerId(id), Member { id: ServerId(id), addr: format!("s{id}") });
        }
        let mut p = Node::new(cfg(3), state, Vec::new(), 0);
        let out = step(&mut p, 0, |n| n.become_primary(0, Epoch(2), &[ServerId(2)]));
        assert_eq!(coordinators(&out), vec![(1, 2), (2, 2), (4, 2)]);
        // Server 2 accepts, 1's host does not answer, 4's port refuses.
        step(&mut p, 10, |n| n.peer_answer(10, ServerId(2), Epoch(2), Answer::Accepted));
        step(&mut p, 20, |n| n.peer_unreachable(20, ServerId(4), Unreached::Refused));
        step(&mut p, 160, |n| n.peer_unreachable(160, ServerId(1), Unreached::Silent));
        let mut again = Vec::new();
        for now in (200..=160 + ANNOUNCE_RETRY_MS + 100).step_by(100) {
            again.extend(coordinators(&step(&mut p, now, |n| n.tick(now))));
        }
        assert_eq!(again, vec![(1, 2)], "only the server whose host did not answer is told again, once per retry");
        // It is still cut off: told again after the next pause; then it answers.
        let t = 160 + ANNOUNCE_RETRY_MS + 200;
        step(&mut p, t, |n| n.peer_unreachable(t, ServerId(1), Unreached::Silent));
        let mut again = Vec::new();
        for now in (t..=t + ANNOUNCE_RETRY_MS + 100).step_by(100) {
            again.extend(coordinators(&step(&mut p, now, |n| n.tick(now))));
        }
        assert_eq!(again, vec![(1, 2)]);
        let t = t + ANNOUNCE_RETRY_MS + 200;
        step(&mut p, t, |n| n.peer_answer(t, ServerId(1), Epoch(2), Answer::Accepted));
        let mut after = Vec::new();
        for now in (t..=t + 3 * ANNOUNCE_RETRY_MS).step_by(100) {
            after.extend(coordinators(&step(&mut p, now, |n| n.tick(now))));
        }
        assert_eq!(after, vec![], "an answer ends the retries");
    }

    /// Regression (issue 10, the five-host lab): a backup started without
    /// `--bind` took over and announced "0.0.0.0:4000"; the other backup took
    /// that for itself and never followed. It announces the address the
    /// membership holds for it.
    #[test]
    fn a_backup_listening_on_every_address_takes_over_under_the_address_the_membership_holds() {
        let mut state = State::default();
        for id in 1..=3 {
            state.members.insert(ServerId(id), Member { id: ServerId(id), addr: format!("10.213.0.{id}:4000") });
        }
        let mut c = cfg(3);
        c.addr = "0.0.0.0:4000".into();
        let mut p = Node::new(c, state, Vec::new(), 0);
        let out = step(&mut p, 0, |n| n.become_primary(0, Epoch(2), &[ServerId(2)]));
        let announced: Vec<&str> = out
            .iter()
            .filter_map(|o| match o {
                Output::ToPeer { msg: Msg::Coordinator { addr, .. }, .. } => Some(addr.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(announced, vec!["10.213.0.3:4000", "10.213.0.3:4000"]);
        assert_eq!(p.addr(), "10.213.0.3:4000");
        assert_eq!(p.primary_addr().as_deref(), Some("10.213.0.3:4000"));
    }

    /// Regression (issue 10, kill_primary_mid_upload): a backup dropped during a
    /// big upload came back with a snapshot join while the primary was still
    /// fencing it; its `caught_up` was taken for a live member's ack, and it never
    /// became a member again (one backup fewer until its link broke).
    #[test]
    fn a_backup_that_rejoins_while_it_is_fenced_becomes_a_member_once_caught_up() {
        let join = |pos: u64, last_epoch: u64, epoch: u64| JoinRequest {
            id: Some(ServerId(2)),
            addr: "s2".into(),
            pos: LogPos(pos),
            last_epoch: Epoch(last_epoch),
            epoch: Epoch(epoch),
            local_addr: None,
            member: false,
        };
        let mut p = Node::new(cfg(1), State::default(), Vec::new(), 0);
        step(&mut p, 0, |n| n.start_primary(0));
        step(&mut p, 0, |n| n.link_join(0, 10, join(0, 0, 0)));
        step(&mut p, 1, |n| n.link_msg(1, 10, Epoch(1), Msg::CaughtUp { pos: LogPos(1) }));
        assert_eq!(p.live_backups(), vec![ServerId(2)]);
        // Backup 2 acknowledges nothing: dropped and fenced after the ack bound.
        step(&mut p, 5, |n| n.propose(5, put("a", 1), None, Ticket(1)));
        let mut out = Vec::new();
        for now in (100..=1100).step_by(100) {
            out.extend(step(&mut p, now, |n| n.tick(now)));
        }
        // The fence carries the epoch it was decided in, whatever the core
        // learns before a thread sends it.
        assert!(
            out.iter().any(|o| matches!(o, Output::ToPeer { epoch: Epoch(1), msg: Msg::Fence { .. }, .. })),
            "{out:?}"
        );
        // It comes back on a new link, with a history of its own: a snapshot.
        let out = step(&mut p, 1110, |n| n.link_join(1110, 11, join(1, 7, 1)));
        assert!(out.iter().any(|o| matches!(o, Output::SnapshotTo { link: 11, .. })), "{out:?}");
        step(&mut p, 1120, |n| n.peer_answer(1120, ServerId(2), Epoch(1), Answer::Fenced));
        assert_eq!(p.live_backups(), Vec::<ServerId>::new());
        let pos = p.state().pos;
        let out = step(&mut p, 1200, |n| n.link_msg(1200, 11, Epoch(1), Msg::CaughtUp { pos }));
        let joined = out.iter().any(|o| {
            matches!(o, Output::ToLink { link: 11, msg: Msg::Apply { entry }, .. }
                if matches!(&entry.change, Change::Join { member } if member.id == ServerId(2)))
        });
        assert!(joined, "no Join of backup 2 after it caught up: {out:?}");
        assert_eq!(p.live_backups(), vec![ServerId(2)]);
    }

    /// Regression (CI, `a_killed_backup_restarted_with_b_catches_up`): a backup
    /// killed with SIGKILL closed its link; the first fence reached its dying
    /// process and was reset, the second was refused. The reset was taken for
    /// silence, so the refusal was read as "perhaps cut off" and the dead backup
    /// stayed a member for good. Only a fence that got no answer in time may
    /// keep it.
    #[test]
    fn a_fence_reset_then_refused_is_a_dead_backup_and_only_silence_keeps_it_a_member() {
        for (first, stays) in [(Unreached::Broken, false), (Unreached::Silent, true), (Unreached::Refused, false)] {
            let join = fresh_join();
            let mut p = Node::new(cfg(1), State::default(), Vec::new(), 0);
            step(&mut p, 0, |n| n.start_primary(0));
            step(&mut p, 0, |n| n.link_join(0, 10, join));
            step(&mut p, 1, |n| n.link_msg(1, 10, Epoch(1), Msg::CaughtUp { pos: LogPos(1) }));
            assert!(p.state().members.contains_key(&ServerId(2)));
            let out = step(&mut p, 10, |n| n.link_down(10, 10, "closed by the backup"));
            assert!(out.iter().any(|o| matches!(o, Output::ToPeer { msg: Msg::Fence { .. }, .. })), "{out:?}");
            let mut out = step(&mut p, 11, |n| n.peer_unreachable(11, ServerId(2), first));
            if first != Unreached::Refused {
                for now in (20..=400).step_by(20) {
                    out.extend(step(&mut p, now, |n| n.tick(now)));
                }
                let asked = out.iter().any(|o| matches!(o, Output::ToPeer { msg: Msg::Fence { .. }, .. }));
                assert!(asked, "{first:?}: the fence was not sent again: {out:?}");
                step(&mut p, 401, |n| n.peer_unreachable(401, ServerId(2), Unreached::Refused));
            }
            assert_eq!(p.live_backups(), Vec::<ServerId>::new(), "{first:?}");
            assert_eq!(p.state().members.contains_key(&ServerId(2)), stays, "{first:?} then refused");
        }
    }

    #[test]
    fn a_lone_member_takes_over_and_an_ineligible_one_only_looks_for_a_primary() {
        let mut b = Node::new(cfg(2), State::default(), Vec::new(), 0);
        let out = b.start_backup(0);
        assert_eq!(out, vec![Output::Follow { addr: "s1".into() }]);
        let out = b.follower_down(1, "refused");
        assert!(!out.iter().any(|o| matches!(o, Output::ToPeer { .. } | Output::BecamePrimary { .. })), "{out:?}");
        assert!(b.election_note().is_some_and(|n| n.contains("may not stand")));
    }
}
