//! The core thread: the driver of this server's [`Node`].
//!
//! It owns the node, the store, the client connections, the backups' links, the
//! follower session and the tickets of pending requests. Connection threads send
//! it [`Event`]s (and wait on a reply channel when they need an answer); it turns
//! each into node inputs and carries the node's outputs out, in order: a persist
//! is written (log, fsync, file action) and reported back before the next output
//! runs, so every send, ack and answer that depends on an entry follows it. It
//! never blocks on a socket: frames go through queues that other threads drain.

use crate::cluster::ClusterAuth;
use crate::follow::{self, FollowerHandle, JoinHello};
use crate::link::{DataSender, LinkOut};
use crate::node::{Config as NodeConfig, JoinRequest, LinkNo, Node, Output, Phase, Quorum, Ticket};
use crate::peer;
use crate::state::{Change, Entry, LastRequest, Session, State, MAX_DEVICES};
use crate::store::{self, new_meta, CommitError, Store};
use crate::uploads::{Temps, UploadRoute};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use replibox_proto::auth::{Admission, LoginThrottle};
use replibox_proto::{
    Answer, ContentHash, DeviceId, Epoch, FileMeta, LogPos, Msg, Notice, OpResult, Seq, ServerId, StoredCredentials,
    Version,
};
use serde_json::json;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Identifies one connection to the server.
pub type ConnId = u64;

/// How long a client's session outlives its connection: a new primary calls the
/// client back at the session's address, so a connection that broke just before
/// the primary died must not have erased the row (the lease). A clean `bye` ends
/// the session at once.
pub const SESSION_LEASE: Duration = Duration::from_secs(60);

/// Settings the core runs with.
#[derive(Clone, Debug)]
pub struct Settings {
    /// This server's id (0 for a backup the primary has not given one yet).
    pub id: ServerId,
    /// The address this server listens on (its IP may be unspecified).
    pub listen: SocketAddr,
    /// How often the primary sends a heartbeat to each backup.
    pub heartbeat: Duration,
    /// How long the primary waits for a backup's acknowledgement before fencing it.
    pub ack_timeout: Duration,
    /// How long a backup hears nothing from its primary before suspecting it.
    pub failure_timeout: Duration,
    /// How long a candidate waits for the answers to its election messages.
    pub election_timeout: Duration,
    /// The address given with `-b`.
    pub seed: Option<String>,
    /// The data dir.
    pub data: PathBuf,
    /// When a change may be acknowledged (`--quorum`).
    pub quorum: Quorum,
    /// The cluster key and this server's id, for every server-to-server connection.
    pub cluster: Arc<ClusterAuth>,
}

impl Settings {
    /// The address other servers and clients reach this one at (its listen
    /// address; an unspecified IP is replaced once a backup's link tells which).
    pub fn advertised(&self) -> String {
        self.listen.to_string()
    }
}

/// Why the core stopped early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fatal {
    /// The cluster refused this server for good (a duplicate id).
    Refused(String),
    /// An entry reached the log but its file action failed: the disk and the
    /// state disagree, and the next start-up redoes it.
    Disk(String),
}

/// What the core answers a client's login or resumed session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// Devices of this user connected now, this one included.
    pub devices: u32,
    /// The device's last answered request.
    pub last_seq: Seq,
}

/// A logged-in connection as the core sees it.
struct Live {
    user: String,
    device: DeviceId,
    out: Sender<Msg>,
    /// Shut down when this server steps down, so that the client looks for the
    /// new primary.
    stream: Option<TcpStream>,
}

/// A backup's link, as the driver holds it.
struct LinkHandle {
    id: Option<ServerId>,
    peer_ip: IpAddr,
    ctl: Sender<LinkOut>,
    data: Sender<LinkOut>,
    stream: TcpStream,
}

/// What to do once an entry is stored on every backup. (A ticket's size does not
/// matter: one per request in flight.)
#[allow(clippy::large_enum_variant)]
enum Done {
    Reply {
        reply: Sender<OpResult>,
        result: OpResult,
        push: Option<(ConnId, String, Notice)>,
    },
    /// An upload's start answered from the request table.
    Begin {
        reply: Sender<Result<Vec<DataSender>, OpResult>>,
        answer: OpResult,
    },
    Login {
        reply: Sender<Result<Welcome, String>>,
        answer: Welcome,
    },
    Account {
        reply: Sender<Result<AccountOutcome, String>>,
    },
}

/// What became of a first login's account.
#[derive(Debug)]
pub enum AccountOutcome {
    /// This login created it.
    Created,
    /// Another login of the same new user created it meanwhile (two devices
    /// started at once): this login goes on against that account, whose
    /// password it must prove.
    Exists(StoredCredentials),
}

/// What the core answers a login's first step.
pub struct LoginStart {
    /// The user's account (None: the user has none yet, and may create it).
    pub account: Option<StoredCredentials>,
    /// When the login's proof may be checked (the failed-login throttle).
    pub admission: Admission,
    /// The user's failed logins in a row, for the log.
    pub failures: u32,
    /// How long ago the last of them was, for the log.
    pub since_failure: Option<Duration>,
}

/// What a connection, a link, the follower or a peer asks of the core.
pub enum Event {
    /// A client says hello.
    Login {
        /// The connection.
        conn: ConnId,
        /// Its user.
        user: String,
        /// Its device.
        device: DeviceId,
        /// Its IP as seen by this server.
        ip: String,
        /// Its callback port.
        callback_port: u16,
        /// The session's secret: the key the password login derived (hex), which
        /// a new primary proves it holds when it calls the client back.
        token: String,
        /// Where the core sends pushes for this connection.
        out: Sender<Msg>,
        /// The socket, to shut it down if this server steps down.
        stream: Option<TcpStream>,
        /// The answer, or a refusal.
        reply: Sender<Result<Welcome, String>>,
    },
    /// A client's login begins (its username is valid): the user's account, and
    /// when its proof may be checked.
    LoginStart {
        /// The user.
        user: String,
        /// The answer.
        reply: Sender<LoginStart>,
    },
    /// A login's proof was wrong: count it in the throttle, and log it.
    LoginFailed {
        /// The user.
        user: String,
        /// The client's address, for the log.
        peer: String,
    },
    /// A first login creates the user's account (replicated before the answer).
    CreateAccount {
        /// The user.
        user: String,
        /// The account's credentials, derived on the client.
        credentials: StoredCredentials,
        /// Stored (or found made by another login), or why not.
        reply: Sender<Result<AccountOutcome, String>>,
    },
    /// A client accepted this (new) primary's call: the connection becomes its
    /// session, which the replicated session table already holds.
    Resumed {
        /// The connection.
        conn: ConnId,
        /// The device.
        device: DeviceId,
        /// Where the core sends pushes for this connection.
        out: Sender<Msg>,
        /// The socket.
        stream: Option<TcpStream>,
        /// The answer, or a refusal.
        reply: Sender<Result<(String, Welcome), String>>,
    },
    /// A client could not be called back within the bound.
    CallbackFailed {
        /// The device.
        device: DeviceId,
        /// Why.
        why: String,
    },
    /// A client connection ended.
    Disconnect {
        /// The connection.
        conn: ConnId,
        /// It said bye: its session ends now (otherwise it lasts its lease).
        clean: bool,
    },
    /// A request of a logged-in client.
    Request {
        /// The connection.
        conn: ConnId,
        /// The request's sequence number.
        seq: Seq,
        /// What it asks.
        req: CoreRequest,
    },
    /// An upload will not be committed: remove its temporary file here and on
    /// every backup.
    AbandonUpload {
        /// Its id.
        xfer: String,
    },
    /// Where is the primary?
    Route {
        /// The answer.
        reply: Sender<Route>,
    },
    /// A status query.
    Status {
        /// The answer.
        reply: Sender<serde_json::Value>,
    },
    /// A server asks to join (its link's hello).
    LinkUp {
        /// Who it is, and its link's queues.
        link: Box<NewLink>,
    },
    /// A message from a backup on its link.
    LinkMsg {
        /// Link number.
        no: LinkNo,
        /// The frame's epoch.
        epoch: Epoch,
        /// The message.
        msg: Msg,
    },
    /// A backup's link ended.
    LinkDown {
        /// Link number.
        no: LinkNo,
        /// Why.
        why: String,
    },
    /// Open a user's file for a backup fetching it.
    OpenFor {
        /// The backup asking.
        id: ServerId,
        /// The IP its fetch connection comes from.
        peer_ip: IpAddr,
        /// Owner.
        user: String,
        /// Path.
        path: String,
        /// Metadata and handle, or why not.
        reply: Sender<Result<(FileMeta, File), OpResult>>,
    },
    /// Something from the follower session `session` (older sessions' events
    /// are dropped).
    Follower {
        /// The session.
        session: u64,
        /// What.
        event: FollowerEvent,
    },
    /// An election, coordinator or fence message from another server.
    Peer {
        /// The sender.
        from: ServerId,
        /// The frame's epoch.
        epoch: Epoch,
        /// The message.
        msg: Msg,
        /// Our answer and our epoch.
        reply: Sender<(Epoch, Answer)>,
    },
    /// The answer to one of our messages to another server.
    PeerAnswer {
        /// The server asked.
        to: ServerId,
        /// Its epoch.
        epoch: Epoch,
        /// What it said.
        answer: Answer,
    },
    /// Another server could not be asked.
    PeerUnreachable {
        /// The server.
        to: ServerId,
        /// Refused (its process is down), broken, or silent.
        how: crate::node::Unreached,
    },
    /// Stop the core.
    Shutdown,
}

/// Paths noted in `Core::changed_at` beyond which the acknowledged ones are
/// forgotten (a burst of changes under way holds fewer).
const CHANGED_AT_PRUNE: usize = 4096;

/// How long the core waits for more entries before a group commit, in a burst.
const LINGER: Duration = Duration::from_millis(2);

/// A change this soon after the last group commit ended is part of a burst. A
/// device's changes one at a time (a user saving files) come further apart than
/// this, and must not pay the linger on every server they cross.
const BURST: Duration = Duration::from_millis(10);

/// Something held back until the group commit under way is durable.
enum Later {
    /// A message or an answer the node produced.
    Out(Box<Output>),
    /// An answer read from the state.
    Answer(Held),
    /// A backup's entry applied (the follower waits for this before it may read
    /// the files that entry changed).
    Applied(Sender<Result<(), String>>, Result<(), String>),
}

enum Held {
    /// A listing, a refusal, or a request's stored result.
    Result(Sender<OpResult>, OpResult),
    /// A file opened for download, or why not.
    Open(Sender<Result<(FileMeta, File), OpResult>>, Result<(FileMeta, File), OpResult>),
    /// An upload refused before its bytes.
    Begin(Sender<Result<Vec<DataSender>, OpResult>>, OpResult),
}

impl Held {
    fn send(self) {
        match self {
            Held::Result(tx, r) => {
                let _ = tx.send(r);
            }
            Held::Open(tx, r) => {
                let _ = tx.send(r);
            }
            Held::Begin(tx, r) => {
                let _ = tx.send(Err(r));
            }
        }
    }
}

impl Event {
    /// A name for logs.
    fn kind(&self) -> &'static str {
        match self {
            Event::Login { .. } => "login",
            Event::LoginStart { .. } => "login start",
            Event::LoginFailed { .. } => "login failed",
            Event::CreateAccount { .. } => "create account",
            Event::Resumed { .. } => "resumed",
            Event::CallbackFailed { .. } => "callback failed",
            Event::Disconnect { .. } => "disconnect",
            Event::Request { .. } => "request",
            Event::AbandonUpload { .. } => "abandon upload",
            Event::Route { .. } => "route",
            Event::Status { .. } => "status",
            Event::LinkUp { .. } => "link up",
            Event::LinkMsg { .. } => "link msg",
            Event::LinkDown { .. } => "link down",
            Event::OpenFor { .. } => "open for",
            Event::Follower { .. } => "follower",
            Event::Peer { .. } => "peer",
            Event::PeerAnswer { .. } => "peer answer",
            Event::PeerUnreachable { .. } => "peer unreachable",
            Event::Shutdown => "shutdown",
        }
    }
}

/// What the follower session reports.
pub enum FollowerEvent {
    /// The primary at `addr` accepted this server.
    Joined {
        /// The frame's epoch.
        epoch: Epoch,
        /// Our id.
        id: ServerId,
        /// The primary's id.
        primary: ServerId,
        /// Where the follower reached it (after redirects).
        addr: String,
        /// A snapshot follows.
        snapshot: bool,
        /// The primary counts this server as a member already.
        member: bool,
    },
    /// The primary's snapshot: install it, and answer the files to fetch.
    Snapshot {
        /// The frame's epoch.
        epoch: Epoch,
        /// The state.
        state: Box<State>,
        /// Files to fetch, or why the snapshot could not be installed.
        reply: Sender<FetchList>,
    },
    /// A fetched file sits in temporary file `xfer`: put it in place if it is the
    /// content the state expects.
    PlaceFetched {
        /// Owner.
        user: String,
        /// What was fetched.
        meta: FileMeta,
        /// Its temporary file.
        xfer: String,
        /// Placed (false: not the content the state expects), or why not.
        reply: Sender<Result<bool, String>>,
    },
    /// The snapshot's files are fetched, but for these.
    Installed {
        /// Files the primary no longer had at the snapshot's version.
        lacks: Vec<(String, String)>,
        /// Answered once their local copies are dropped.
        reply: Sender<Result<(), String>>,
    },
    /// The next entry, its content ready in `tmp/` as far as it could be.
    Apply {
        /// The frame's epoch.
        epoch: Epoch,
        /// The entry.
        entry: Box<Entry>,
        /// A rename whose source is missing here: the destination's content,
        /// fetched into this temporary file, to place once the entry is applied.
        refetch: Option<(String, FileMeta, String)>,
        /// A put whose content could not be had.
        lacking: Option<(String, String)>,
        /// Applied, or why not (the follower then ends its session).
        reply: Sender<Result<(), String>>,
    },
    /// A heartbeat, a ping or a refusal.
    Msg {
        /// The frame's epoch.
        epoch: Epoch,
        /// The message.
        msg: Msg,
    },
    /// The server at the address does not hold this cluster's key (the session
    /// ended).
    KeyMismatch {
        /// Why, as the handshake found it.
        why: String,
    },
    /// The session ended.
    Down {
        /// Why.
        why: String,
        /// Because this server could not write what it received (its disk is
        /// full, say).
        storage: bool,
    },
}

/// A joining server and the link it came on.
pub struct NewLink {
    /// Link number.
    pub no: LinkNo,
    /// Its hello, as the node reads it.
    pub request: JoinRequest,
    /// The IP its connection comes from (its fetch connections must too).
    pub peer_ip: IpAddr,
    /// Control queue of its link.
    pub ctl: Sender<LinkOut>,
    /// Data queue of its link.
    pub data: Sender<LinkOut>,
    /// The socket, to shut it down when the link closes.
    pub stream: TcpStream,
}

/// A request of a logged-in client.
pub enum CoreRequest {
    /// One page of the user's files.
    List {
        /// The last path of the previous page.
        after: Option<String>,
        /// The answer.
        reply: Sender<OpResult>,
    },
    /// Open a file for a download.
    Open {
        /// Path.
        path: String,
        /// The metadata and an open handle, or the reason why not.
        reply: Sender<Result<(FileMeta, File), OpResult>>,
    },
    /// May an upload start? Ok carries the backups to forward its chunks to.
    BeginUpload {
        /// Path.
        path: String,
        /// Base version.
        base: Option<Version>,
        /// The answer.
        reply: Sender<Result<Vec<DataSender>, OpResult>>,
    },
    /// An upload's bytes are durable in temporary file `xfer`.
    CommitUpload {
        /// Path.
        path: String,
        /// Base version.
        base: Option<Version>,
        /// Temporary file id.
        xfer: String,
        /// Size of the bytes.
        size: u64,
        /// Modification time to record.
        mtime_ms: i64,
        /// The file is executable.
        exec: bool,
        /// Their hash.
        hash: ContentHash,
        /// The answer.
        reply: Sender<OpResult>,
    },
    /// Delete a file.
    Delete {
        /// Path.
        path: String,
        /// Base version.
        base: Option<Version>,
        /// The answer.
        reply: Sender<OpResult>,
    },
    /// Create a folder.
    Mkdir {
        /// Path.
        path: String,
        /// Base version (of a file the folder replaces).
        base: Option<Version>,
        /// The answer.
        reply: Sender<OpResult>,
    },
    /// Rename a file.
    Rename {
        /// Old path.
        from: String,
        /// New path.
        to: String,
        /// Base version.
        base: Option<Version>,
        /// The answer.
        reply: Sender<OpResult>,
    },
    /// Change the user's password.
    Passwd {
        /// The new credentials.
        credentials: StoredCredentials,
        /// The answer.
        reply: Sender<OpResult>,
    },
}

/// How this server starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// `-p`: primary of a new epoch.
    Primary,
    /// `-b`: a backup joining through the seed address.
    Backup,
}

/// Where the primary is, as a server answers a client or a joining server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This server is the primary.
    Here,
    /// This server is a backup of the primary at that address.
    At(String),
    /// This server knows no live primary now (joining, or electing one).
    Unknown,
}

/// Sends the event `make` builds around a reply channel, and waits for the answer.
/// None when the core has stopped, or dropped the request (it stepped down).
pub fn ask<T>(core: &Sender<Event>, make: impl FnOnce(Sender<T>) -> Event) -> Option<T> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    core.send(make(tx)).ok()?;
    rx.recv().ok()
}

/// The files a backup must fetch after installing a snapshot, or why it could not
/// install it.
pub type FetchList = Result<Vec<(String, FileMeta)>, String>;

/// A backup's entry being applied: what to do with its content once persisted.
struct Applying {
    pos: LogPos,
    refetch: Option<(String, FileMeta, String)>,
    lacking: Option<(String, String)>,
}

impl Applying {
    /// Its content needs disk work beyond the entry's own action (a fetched copy
    /// to place, a stale one to drop): committed on its own, not in a group.
    fn needs_disk(&self) -> bool {
        self.refetch.is_some() || self.lacking.is_some()
    }
}

/// The core's state.
pub struct Core {
    settings: Settings,
    node: Node,
    store: Store,
    started: Instant,
    live: BTreeMap<ConnId, Live>,
    /// Sessions whose connection ended uncleanly, and when their lease runs out.
    leases: BTreeMap<DeviceId, Instant>,
    links: BTreeMap<LinkNo, LinkHandle>,
    tickets: BTreeMap<Ticket, Done>,
    /// Answers read from the state while it held entries not yet acknowledged,
    /// each with the position it was read at: sent once that position is
    /// committed, dropped if this server steps down (the client asks again).
    held: VecDeque<(LogPos, Held)>,
    /// What waits for the group commit under way (see [`Store::flush`]): every
    /// message and answer produced while entries are logged but not yet fsynced,
    /// in order.
    later: VecDeque<Later>,
    /// When the last group commit ended (see [`Core::linger`]).
    last_flush: Option<Instant>,
    next_ticket: u64,
    follower: Option<FollowerHandle>,
    next_session: u64,
    /// The epoch frames are stamped with, shared with the connection threads.
    epoch: Arc<AtomicU64>,
    /// The core's own queue, for the threads it starts.
    events: Option<Sender<Event>>,
    /// What connection threads need (for callbacks that become sessions).
    ctx: Option<crate::conn::Ctx>,
    applying: Option<Applying>,
    /// The state a snapshot replaces, and the result of installing it.
    installing: Option<(State, Option<FetchList>)>,
    /// The longest the core spent on one event (logged when it stops).
    longest_stall: Duration,
    /// Tickets aborted because their entry did not reach the log: answered with
    /// this error instead of a dropped connection.
    persist_error: Option<String>,
    fatal: Option<Fatal>,
    stopping: Option<Instant>,
    /// As primary: the most live backups it has had in this term, and since when
    /// (and when it last said so) it runs with fewer.
    most_backups: usize,
    fewer_since: Option<Instant>,
    fewer_said: Option<Instant>,
    /// Failed logins per user (only the primary checks passwords).
    throttle: LoginThrottle,
    /// The backups' queues as upload threads read them (published after every
    /// round of events).
    route: Arc<UploadRoute>,
    /// Per user and path, the position of the last entry this primary logged
    /// that changed it (pruned once acknowledged): a download waits for that
    /// entry alone, not for every change under way ([`Core::answer_download`]).
    changed_at: HashMap<(String, String), LogPos>,
    /// The log's position when this server last became primary: entries up to
    /// it are not in `changed_at`, and count as changing every path.
    primary_from: LogPos,
}

/// How often a primary running with fewer backups than it had says so again.
const FEWER_BACKUPS_REPEAT: Duration = Duration::from_secs(30);

fn refusal(message: impl Into<String>) -> OpResult {
    OpResult::Error { message: message.into() }
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

impl Core {
    /// A core over a recovered store (its state and the entries after its snapshot).
    pub fn new(store: Store, state: State, recent: Vec<Entry>, settings: Settings) -> Core {
        let failure = ms(settings.failure_timeout);
        let cfg = NodeConfig {
            id: settings.id,
            addr: settings.advertised(),
            heartbeat_ms: ms(settings.heartbeat),
            ack_timeout_ms: ms(settings.ack_timeout),
            failure_timeout_ms: failure,
            election_timeout_ms: ms(settings.election_timeout),
            fence_timeout_ms: (3 * failure).max(ms(settings.ack_timeout)),
            seed: settings.seed.clone(),
            quorum: settings.quorum,
        };
        let seen = store::load_epoch_seen(store.root());
        let epoch = Arc::new(AtomicU64::new(state.epoch.0.max(seen.0)));
        let mut node = Node::new(cfg, state, recent, 0);
        node.heard_of(seen);
        if store.install_unfinished() {
            // This data dir may lack files its state describes: join with a snapshot.
            node.want_snapshot();
        }
        Core {
            settings,
            node,
            store,
            started: Instant::now(),
            live: BTreeMap::new(),
            leases: BTreeMap::new(),
            links: BTreeMap::new(),
            tickets: BTreeMap::new(),
            held: VecDeque::new(),
            later: VecDeque::new(),
            last_flush: None,
            next_ticket: 1,
            follower: None,
            next_session: 0,
            epoch,
            events: None,
            ctx: None,
            applying: None,
            installing: None,
            longest_stall: Duration::ZERO,
            persist_error: None,
            fatal: None,
            stopping: None,
            most_backups: 0,
            fewer_since: None,
            fewer_said: None,
            throttle: LoginThrottle::new(),
            route: Arc::new(UploadRoute::default()),
            changed_at: HashMap::new(),
            primary_from: LogPos(0),
        }
    }

    /// How long a backup may take to acknowledge (`--ack-timeout-ms`).
    pub fn ack_timeout(&self) -> Duration {
        self.settings.ack_timeout
    }

    /// The cluster key and this server's id, shared with the connection threads.
    pub fn cluster(&self) -> Arc<ClusterAuth> {
        self.settings.cluster.clone()
    }

    /// The backups' queues the core publishes for the connection threads' uploads.
    pub fn upload_route(&self) -> Arc<UploadRoute> {
        self.route.clone()
    }

    /// The maker of temporary files, shared with the connection threads.
    pub fn temps(&self) -> Arc<Temps> {
        self.store.temps()
    }

    /// The epoch shared with the connection threads, which stamp it on every frame.
    pub fn epoch_handle(&self) -> Arc<AtomicU64> {
        self.epoch.clone()
    }

    fn now_ms(&self) -> u64 {
        ms(self.started.elapsed())
    }

    /// Runs until [`Event::Shutdown`] or until every sender is gone. `events` is
    /// the sending side of `rx`, for the threads the core starts.
    pub fn run(
        mut self,
        start: Start,
        events: Sender<Event>,
        rx: Receiver<Event>,
        ctx: crate::conn::Ctx,
    ) -> Result<(), Fatal> {
        self.events = Some(events);
        self.ctx = Some(ctx);
        let now = self.now_ms();
        let out = match start {
            Start::Primary => self.node.start_primary(now),
            Start::Backup => self.node.start_backup(now),
        };
        self.execute(out);
        if start == Start::Primary {
            self.adopt_files();
        }
        self.flush();
        self.publish_route();
        loop {
            if let Some(f) = self.fatal.take() {
                self.stop_threads();
                return Err(f);
            }
            if let Some(deadline) = self.stopping {
                if self.tickets.is_empty() || Instant::now() >= deadline {
                    break;
                }
            }
            let wait = self.next_wake().saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Err(RecvTimeoutError::Disconnected) => break,
                Ok(Event::Shutdown) => {
                    log::info!("shutting down: {} requests still replicating", self.tickets.len());
                    self.stopping.get_or_insert(Instant::now() + self.settings.ack_timeout);
                }
                Ok(event) if self.stopping.is_some() && Self::new_work(&event) => {}
                Ok(event) => {
                    self.timed(event);
                    // What queued up meanwhile (pings from the primary, acks) comes
                    // before the timers, or a busy core would take its own delay
                    // for silence.
                    for _ in 0..1000 {
                        match rx.try_recv() {
                            Ok(Event::Shutdown) => {
                                self.stopping.get_or_insert(Instant::now() + self.settings.ack_timeout);
                            }
                            Ok(event) if self.stopping.is_none() || !Self::new_work(&event) => self.timed(event),
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            self.linger(&rx);
            // One fsync for every entry this round of events logged.
            self.flush();
            self.timers();
            self.flush();
            self.publish_route();
        }
        self.stop_threads();
        log::info!("core stopped pos={} longest_stall_ms={}", self.node.state().pos, self.longest_stall.as_millis());
        Ok(())
    }

    /// Handles one event, and says so when it held the core up long enough to
    /// matter: while the core is busy, nothing else it owns moves (the links'
    /// heartbeats do, on their own timer).
    fn timed(&mut self, event: Event) {
        let kind = event.kind();
        let started = Instant::now();
        let from = self.now_ms();
        // The node hears the time first: a primary stopped (SIGSTOP, a frozen VM)
        // just before this event steps down before it answers anything on its
        // old authority, even when the event itself never reaches the node (a
        // listing, a download).
        let out = self.node.observe(from);
        self.execute(out);
        self.handle(event);
        // The core's own work (a listing's stat per file, a snapshot) is no
        // pause of this process: the links kept pinging the backups meanwhile.
        let now = self.now_ms();
        self.node.busy(from, now);
        let took = started.elapsed();
        if took > self.longest_stall {
            self.longest_stall = took;
        }
        if took >= self.settings.failure_timeout / 4 {
            log::warn!("core busy for {} ms on one {kind} event", took.as_millis());
        }
    }

    /// Work a stopping server turns away (its connections close; clients resend).
    /// In a burst of changes, waits up to [`LINGER`] for more entries before the
    /// group commit: a device's uploads come one after the other (each waits for
    /// the core's answers on its way), so without the wait every group would hold
    /// one entry. A change after a quiet spell is flushed at once.
    fn linger(&mut self, rx: &Receiver<Event>) {
        let burst = self.last_flush.is_some_and(|t| t.elapsed() < BURST);
        if !self.store.has_pending() || !burst || self.stopping.is_some() {
            return;
        }
        let until = Instant::now() + LINGER;
        while self.store.can_grow() && self.fatal.is_none() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match rx.recv_timeout(left) {
                Ok(Event::Shutdown) => {
                    log::info!("shutting down: {} requests still replicating", self.tickets.len());
                    self.stopping.get_or_insert(Instant::now() + self.settings.ack_timeout);
                    break;
                }
                Ok(event) => self.timed(event),
                Err(_) => break,
            }
        }
    }

    fn new_work(event: &Event) -> bool {
        matches!(
            event,
            Event::Login { .. }
                | Event::LoginStart { .. }
                | Event::Request { .. }
                | Event::LinkUp { .. }
                | Event::Resumed { .. }
                | Event::CreateAccount { .. }
        )
    }

    fn stop_threads(&mut self) {
        if let Some(f) = self.follower.take() {
            f.stop();
        }
        for (_, l) in std::mem::take(&mut self.links) {
            let _ = l.stream.shutdown(std::net::Shutdown::Both);
        }
    }

    fn next_wake(&self) -> Instant {
        let now_ms = self.now_ms();
        let due = self.node.next_tick(now_ms).saturating_sub(now_ms).min(50);
        let mut t = Instant::now() + Duration::from_millis(due);
        if let Some(l) = self.leases.values().min() {
            t = t.min(*l);
        }
        t
    }

    fn timers(&mut self) {
        self.throttle.prune(Instant::now());
        let now = self.now_ms();
        let out = self.node.tick(now);
        self.execute(out);
        // Sessions whose lease ran out without their device coming back.
        let expired: Vec<DeviceId> =
            self.leases.iter().filter(|(_, t)| **t <= Instant::now()).map(|(d, _)| d.clone()).collect();
        for device in expired {
            self.leases.remove(&device);
            if self.node.is_primary() && !self.live.values().any(|l| l.device == device) {
                self.end_session(&device, "its lease ran out");
            }
        }
        self.epoch.store(self.node.epoch().0, Ordering::Relaxed);
        self.watch_backups();
    }

    /// A primary that runs with fewer live backups than it has had in this term
    /// (one left with a full disk, or was dropped) says so loudly, at once and
    /// every [`FEWER_BACKUPS_REPEAT`] while it lasts: every change is stored on
    /// fewer servers than before. `--status` shows it in its `note`.
    fn watch_backups(&mut self) {
        if !self.node.is_primary() {
            self.most_backups = 0;
            self.fewer_since = None;
            return;
        }
        let live = self.node.live_backups().len();
        if live >= self.most_backups {
            if let Some(since) = self.fewer_since.take() {
                log::info!("all {live} backups are live again after {:?}", since.elapsed());
            }
            self.most_backups = live;
            return;
        }
        let now = Instant::now();
        let since = *self.fewer_since.get_or_insert(now);
        if self.fewer_said.is_none_or(|t| now.duration_since(t) >= FEWER_BACKUPS_REPEAT) || since == now {
            self.fewer_said = Some(now);
            log::warn!(
                "running with {live} of the {} backups this primary had (for {:?}): every change is stored on {} \
                 servers only",
                self.most_backups,
                since.elapsed(),
                live + 1
            );
        }
    }

    /// What `--status` says of a primary with fewer backups than it had.
    fn fewer_backups_note(&self) -> Option<String> {
        let since = self.fewer_since?;
        let live = self.node.live_backups().len();
        Some(format!(
            "running with {live} of the {} backups it had, for {} s: changes are stored on {} servers only",
            self.most_backups,
            since.elapsed().as_secs(),
            live + 1
        ))
    }

    fn end_session(&mut self, device: &DeviceId, why: &str) {
        if self.node.state().sessions.contains_key(device) {
            log::info!("ending session device={device}: {why}");
            self.propose(Change::Logout { device: device.clone() }, None, None);
        }
    }

    /// Files put into `users/` by hand while the server was down become entries.
    fn adopt_files(&mut self) {
        let from = self.now_ms();
        let found = match self.store.check_against(self.node.state()) {
            Ok(f) => f,
            Err(e) => {
                log::error!("cannot compare users/ with the state: {e}");
                return;
            }
        };
        // Hashing every file found (hundreds of MiB, on a busy machine) can take
        // longer than the failure timeout: the node must not take its own start-up
        // work for a pause and step down (it then waited for a primary for ever).
        let now = self.now_ms();
        self.node.busy(from, now);
        for (user, meta) in found {
            self.propose(Store::adoption(user, meta), None, None);
        }
    }

    // -----------------------------------------------------------------------
    // Carrying out the node's outputs

    fn execute(&mut self, out: Vec<Output>) {
        let from = self.now_ms();
        let mut queue: VecDeque<Output> = out.into();
        while let Some(o) = queue.pop_front() {
            if self.store.has_pending() {
                match o {
                    Output::Persist(_) | Output::Log(..) | Output::SawEpoch(_) => {}
                    Output::ToLink { .. }
                    | Output::SnapshotTo { .. }
                    | Output::CloseLink { .. }
                    | Output::ToPrimary(_)
                    | Output::ToPeer { .. }
                    | Output::Complete(_)
                    | Output::Abort(_) => {
                        // Depends on, or comes after, an entry not yet durable.
                        self.later.push_back(Later::Out(Box::new(o)));
                        continue;
                    }
                    // A role change, an install, ...: the group first.
                    _ => self.flush(),
                }
            }
            match o {
                Output::Persist(entry) => queue.extend(self.persist(entry)),
                Output::Install(state) => {
                    let result = match &self.installing {
                        Some((old, _)) => self.store.install(old, &state).map_err(|e| e.to_string()),
                        None => Err("no snapshot was being installed".to_string()),
                    };
                    if let Some((_, slot)) = &mut self.installing {
                        *slot = Some(result);
                    }
                }
                Output::ToLink { link, epoch, msg } => {
                    if let Msg::Joined { id, .. } = &msg {
                        if let Some(h) = self.links.get_mut(&link) {
                            h.id = Some(*id);
                        }
                    }
                    if let Some(h) = self.links.get(&link) {
                        let _ = h.ctl.send(LinkOut::msg(epoch, msg));
                    }
                }
                Output::SnapshotTo { link, epoch, state } => self.send_snapshot(link, epoch, &state),
                Output::CloseLink { link } => {
                    // Dropping the queues lets the writer send what they hold, then
                    // shut the socket.
                    self.links.remove(&link);
                }
                Output::ToPrimary(msg) => {
                    if let Some(f) = &self.follower {
                        f.send(msg);
                    }
                }
                Output::Follow { addr } => self.start_follower(addr),
                Output::Unfollow => {
                    if let Some(f) = self.follower.take() {
                        f.stop();
                    }
                }
                Output::ToPeer { to, addr, epoch, msg } => {
                    if let Some(events) = &self.events {
                        let timeout = match msg {
                            Msg::Fence { .. } => self.settings.failure_timeout,
                            _ => self.settings.election_timeout,
                        };
                        let cluster = self.settings.cluster.clone();
                        peer::send(events.clone(), cluster, to, addr, epoch, msg, timeout);
                    }
                }
                Output::Complete(t) => self.complete(t),
                Output::Abort(t) => self.abort(t),
                Output::BecamePrimary { epoch } => self.became_primary(epoch),
                Output::SteppedDown { epoch } => self.stepped_down(epoch),
                Output::SaveId(id) => {
                    if let Err(e) = store::save_id(self.store.root(), id) {
                        log::error!("cannot record server id={id}: {e}");
                    }
                    self.settings.id = id;
                    self.settings.cluster.id.store(id.0, Ordering::Relaxed);
                }
                Output::Incomplete(true) => {
                    if let Err(e) = self.store.mark_incomplete() {
                        log::error!("cannot mark the data dir incomplete: {e}");
                    }
                }
                Output::Incomplete(false) => {
                    if let Err(e) = self.store.finish_install() {
                        log::error!("cannot record that every file is here: {e}");
                    }
                }
                Output::Fatal(reason) => self.fatal = Some(Fatal::Refused(reason)),
                Output::SawEpoch(e) => {
                    if let Err(err) = store::save_epoch_seen(self.store.root(), e) {
                        log::error!("cannot record epoch={e}: {err}");
                    }
                }
                Output::Log(level, line) => log::log!(level, "{line}"),
            }
            self.epoch.store(self.node.epoch().0, Ordering::Relaxed);
        }
        let now = self.now_ms();
        self.node.busy(from, now);
        if !self.held.is_empty() && !self.store.has_pending() {
            self.release_held();
        }
    }

    /// The live backups' data queues, with the epoch an upload's chunks carry.
    fn upload_senders(&self) -> Vec<DataSender> {
        let live: Vec<ServerId> = self.node.live_backups();
        self.links
            .values()
            .filter_map(|l| l.id.filter(|id| live.contains(id)).map(|id| (id, l)))
            .map(|(id, l)| DataSender { id, epoch: self.node.epoch(), tx: l.data.clone() })
            .collect()
    }

    /// Tells the connection threads where an upload begun now streams to: the
    /// live backups while this server serves as primary, else nothing (they ask
    /// the core, which refuses or answers).
    fn publish_route(&self) {
        let serving = self.node.is_primary() && self.stopping.is_none() && self.fatal.is_none();
        self.route.publish(serving.then(|| self.upload_senders()));
    }

    /// Ends the group commit under way: its entries durable and their actions
    /// done ([`Store::flush`]), what waited for them goes out. On failure the
    /// core stops, and nothing that waited is sent.
    fn flush(&mut self) {
        if !self.store.has_pending() {
            return;
        }
        let started = Instant::now();
        let from = self.now_ms();
        let entries = self.store.pending_len();
        if let Err(e) = self.store.flush(self.node.state()) {
            log::error!("stopping: cannot make logged entries durable: {e}");
            self.fatal = Some(Fatal::Disk(e.to_string()));
            self.later.clear();
            return;
        }
        log::debug!("group commit of {entries} entries took {} us", started.elapsed().as_micros());
        self.last_flush = Some(Instant::now());
        self.store.maybe_compact(self.node.state());
        // The flush is the core's own work, not a silence of its peers.
        let now = self.now_ms();
        self.node.busy(from, now);
        while let Some(l) = self.later.pop_front() {
            match l {
                Later::Out(o) => self.execute(vec![*o]),
                Later::Answer(h) => self.answer_committed(h),
                Later::Applied(reply, result) => {
                    let _ = reply.send(result);
                }
            }
            if self.store.has_pending() {
                // What went out began a new group (an answer that logs an
                // entry): the rest waits for it, in order.
                break;
            }
        }
        if !self.held.is_empty() && !self.store.has_pending() {
            self.release_held();
        }
    }

    /// Writes an entry (log, fsync, file action) and reports to the node. An entry
    /// that did not reach the log changed nothing: its request is refused. One
    /// that reached the log but whose action failed leaves disk and state
    /// disagreeing: the core stops (the next start-up redoes the action).
    fn persist(&mut self, entry: Entry) -> Vec<Output> {
        if self.node.is_primary() {
            self.note_changed(&entry);
        }
        let now = self.now_ms();
        let pos = entry.pos;
        let refetching = self.applying.as_ref().is_some_and(|a| a.pos == pos && a.needs_disk());
        if !refetching && self.fatal.is_none() && self.store.can_defer(&entry.change) {
            // Group commit: logged now, made durable (and its action done) by the
            // flush that ends this round of events; what depends on it waits.
            return match self.store.append_deferred(self.node.state(), &entry) {
                Ok(()) => self.node.persisted(now, pos, Vec::new()),
                Err(CommitError::Unlogged(e)) => self.unlogged(now, pos, e),
                Err(e @ CommitError::Logged(_)) => {
                    log::error!("stopping: {e}");
                    self.fatal = Some(Fatal::Disk(e.to_string()));
                    Vec::new()
                }
            };
        }
        self.flush();
        if self.fatal.is_some() {
            return Vec::new();
        }
        match self.store.persist(self.node.state(), &entry) {
            Ok(()) => {}
            Err(CommitError::Unlogged(e)) => return self.unlogged(now, pos, e),
            Err(e @ CommitError::Logged(_)) => {
                log::error!("stopping: {e}");
                self.fatal = Some(Fatal::Disk(e.to_string()));
                return Vec::new();
            }
        }
        let mut lacks = Vec::new();
        if let Some(a) = self.applying.take() {
            if a.pos == pos {
                lacks.extend(a.lacking);
                if let Some((user, got, xfer)) = a.refetch {
                    // The node applies the entry after this: what the rename puts
                    // in place is what the entry names, not the state's yet.
                    let want = match &entry.change {
                        Change::Rename { to, .. } => Some(to),
                        _ => None,
                    };
                    match self.place_fetched(&user, &got, want, &xfer) {
                        Ok(true) => {}
                        _ => lacks.push((user, got.path)),
                    }
                }
                for (user, path) in &lacks {
                    log::info!(
                        "dropping local copy of user={user} path={path}: the primary no longer has that version"
                    );
                    self.store.drop_content(self.node.state(), user, path);
                }
            } else {
                self.applying = Some(a);
            }
        }
        let out = self.node.persisted(now, pos, lacks);
        self.store.maybe_compact(self.node.state());
        out
    }

    /// An entry did not reach the log: nothing changed, its request is refused.
    fn unlogged(&mut self, now: u64, pos: LogPos, e: store::StoreError) -> Vec<Output> {
        log::error!("cannot store entry pos={pos}: {e}");
        self.persist_error = Some(store::storage_trouble(&e.source));
        let mut out = self.node.persist_failed(now, pos, &e.to_string());
        if !self.node.is_primary() {
            // A backup that cannot store its primary's entries leaves
            // (and joins again later) rather than fail every entry.
            out.extend(self.node.storage_failed(now, &e.to_string()));
        }
        out
    }

    /// Puts fetched file `got` (in temporary file `xfer`) in place as `want`, when
    /// its content is what `want` describes; else discards it and says false.
    fn place_fetched(&self, user: &str, got: &FileMeta, want: Option<&FileMeta>, xfer: &str) -> Result<bool, String> {
        match want {
            Some(w) if !w.deleted && w.path == got.path && w.hash == got.hash && w.size == got.size => {
                self.store.place_temp(user, w, xfer).map(|()| true).map_err(|e| {
                    log::error!("cannot place fetched file user={user} path={}: {e}", w.path);
                    e.to_string()
                })
            }
            _ => {
                self.store.discard_temp(xfer);
                Ok(false)
            }
        }
    }

    fn send_snapshot(&mut self, link: LinkNo, epoch: Epoch, state: &State) {
        let Some(h) = self.links.get(&link) else { return };
        let bytes = match serde_json::to_vec(state) {
            Ok(b) => b,
            Err(e) => {
                log::error!("cannot encode the snapshot: {e}");
                self.links.remove(&link);
                return;
            }
        };
        for chunk in bytes.chunks(replibox_proto::MAX_PAYLOAD) {
            let _ = h.ctl.send(LinkOut { epoch, msg: Msg::SnapshotChunk, payload: Some(Arc::new(chunk.to_vec())) });
        }
        let _ = h.ctl.send(LinkOut::msg(epoch, Msg::SnapshotEnd { pos: state.pos }));
    }

    fn complete(&mut self, t: Ticket) {
        match self.tickets.remove(&t) {
            Some(Done::Login { reply, answer }) => {
                let _ = reply.send(Ok(answer));
            }
            Some(Done::Account { reply }) => {
                let _ = reply.send(Ok(AccountOutcome::Created));
            }
            Some(Done::Reply { reply, result, push }) => {
                let _ = reply.send(result);
                if let Some((conn, user, notice)) = push {
                    self.push(conn, &user, notice);
                }
            }
            Some(Done::Begin { reply, answer }) => {
                let _ = reply.send(Err(answer));
            }
            None => {}
        }
    }

    fn abort(&mut self, t: Ticket) {
        let Some(done) = self.tickets.remove(&t) else { return };
        match (&self.persist_error, done) {
            (Some(e), Done::Reply { reply, .. }) => {
                let _ = reply.send(OpResult::Unavailable { message: e.clone() });
            }
            (Some(e), Done::Login { reply, .. }) => {
                let _ = reply.send(Err(format!("{e}: cannot store the session")));
            }
            (Some(e), Done::Begin { reply, .. }) => {
                let _ = reply.send(Err(refusal(e.clone())));
            }
            (Some(e), Done::Account { reply }) => {
                let _ = reply.send(Err(format!("{e}: cannot store the account")));
            }
            // Stepped down: dropping the reply channel closes the client's
            // connection, and it resends to the new primary.
            (None, _) => {}
        }
    }

    fn became_primary(&mut self, epoch: Epoch) {
        log::info!("serving as primary id={} epoch={epoch} addr={}", self.node.id(), self.node.addr());
        self.primary_from = self.node.state().pos;
        self.changed_at.clear();
        let (Some(events), Some(ctx)) = (self.events.clone(), self.ctx.clone()) else { return };
        let sessions: Vec<Session> = self.node.state().sessions.values().cloned().collect();
        for s in sessions {
            // Each session lasts its lease unless its device answers the call.
            self.leases.insert(s.device.clone(), Instant::now() + SESSION_LEASE);
            log::info!("calling back device={} user={} at {}:{}", s.device, s.user, s.ip, s.callback_port);
            peer::call_back(events.clone(), ctx.clone(), self.node.id(), self.node.addr().to_string(), epoch, s);
        }
    }

    fn stepped_down(&mut self, epoch: Epoch) {
        log::warn!("stepped down: epoch={epoch} has another primary; dropping {} client connections", self.live.len());
        for (_, l) in std::mem::take(&mut self.live) {
            if let Some(s) = l.stream {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
        // Links close as the node says (it may still answer a joiner first).
        self.leases.clear();
    }

    fn start_follower(&mut self, addr: String) {
        if let Some(f) = self.follower.take() {
            f.stop();
        }
        let Some(events) = self.events.clone() else { return };
        self.next_session += 1;
        let (pos, last_epoch) = self.node.join_point();
        let hello = JoinHello {
            id: (self.node.id().0 > 0).then_some(self.node.id()),
            ip: Some(self.settings.listen.ip()).filter(|i| !i.is_unspecified()),
            port: self.settings.listen.port(),
            pos,
            last_epoch,
            member: self.node.join_as_member(),
        };
        let cfg = follow::FollowConfig {
            target: addr,
            failure_timeout: self.settings.failure_timeout,
            data: self.settings.data.clone(),
        };
        let cluster = self.settings.cluster.clone();
        self.follower = follow::start(self.next_session, cfg, hello, events, self.epoch.clone(), cluster);
    }

    // -----------------------------------------------------------------------
    // Events

    fn handle(&mut self, event: Event) {
        let now = self.now_ms();
        match event {
            Event::Shutdown => {}
            Event::Login { conn, user, device, ip, callback_port, token, out, stream, reply } => {
                let session = Session { user, device, ip, callback_port, token };
                self.login(conn, session, out, stream, reply)
            }
            Event::LoginStart { user, reply } => {
                let account = self.node.state().accounts.get(&user).cloned();
                // Only a proof against an account can be a guess worth slowing.
                let now = Instant::now();
                let since_failure = self.throttle.since_last_failure(&user, now);
                let admission = match account {
                    Some(_) => self.throttle.admit(&user, now),
                    None => Admission::After(Duration::ZERO),
                };
                let failures = self.throttle.failures(&user);
                let _ = reply.send(LoginStart { account, admission, failures, since_failure });
            }
            Event::LoginFailed { user, peer } => {
                self.throttle.failed(&user, Instant::now());
                let failures = self.throttle.failures(&user);
                let next = self.throttle.delay(failures);
                log::warn!(
                    "failed login user={user} peer={peer}: wrong password ({failures} in a row; the next attempt \
                     waits {} ms)",
                    next.as_millis()
                );
            }
            Event::CreateAccount { user, credentials, reply } => self.create_account(user, credentials, reply),
            Event::Resumed { conn, device, out, stream, reply } => {
                let answer = self.resumed(conn, device, out, stream);
                let _ = reply.send(answer);
            }
            Event::CallbackFailed { device, why } => {
                log::warn!("could not call back device={device}: {why}");
                if !self.live.values().any(|l| l.device == device) && self.node.is_primary() {
                    self.leases.remove(&device);
                    self.end_session(&device, "it could not be called back");
                }
            }
            Event::Disconnect { conn, clean } => self.disconnect(conn, clean),
            Event::Request { conn, seq, req } => self.request(conn, seq, req),
            Event::AbandonUpload { xfer } => self.abandon_upload(&xfer),
            Event::Route { reply } => {
                let answer = if self.node.is_primary() {
                    Route::Here
                } else {
                    self.node.primary_addr().map_or(Route::Unknown, Route::At)
                };
                let _ = reply.send(answer);
            }
            Event::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Event::LinkUp { link } => {
                let NewLink { no, request, peer_ip, ctl, data, stream } = *link;
                self.links.insert(no, LinkHandle { id: None, peer_ip, ctl, data, stream });
                let out = self.node.link_join(now, no, request);
                self.execute(out);
            }
            Event::LinkMsg { no, epoch, msg } => {
                let out = self.node.link_msg(now, no, epoch, msg);
                self.execute(out);
            }
            Event::LinkDown { no, why } => {
                let out = self.node.link_down(now, no, &why);
                self.links.remove(&no);
                self.execute(out);
            }
            Event::OpenFor { id, peer_ip, user, path, reply } => {
                self.flush();
                // Only a server this primary is replicating to (from the host its
                // link comes from) may read users' files this way.
                let allowed =
                    self.node.is_primary() && self.links.values().any(|l| l.id == Some(id) && l.peer_ip == peer_ip);
                let answer = if allowed {
                    match self.node.state().live(&user, &path) {
                        None => Err(OpResult::Gone { path }),
                        Some(_) => self.open(&user, &path),
                    }
                } else {
                    log::warn!("refused fetch of user={user} path={path}: id={id} from {peer_ip} is not a backup here");
                    Err(refusal("fetching is for this cluster's backups"))
                };
                let _ = reply.send(answer);
            }
            Event::Follower { session, event } => self.follower_event(now, session, event),
            Event::Peer { from, epoch, msg, reply } => {
                let (answer, out) = match msg {
                    Msg::Election { target, rank } => self.node.election(now, from, epoch, target, rank),
                    Msg::Coordinator { epoch: e, id, addr } => self.node.coordinator(now, id, e, addr),
                    Msg::Fence { reason, pos } => self.node.fence(now, from, epoch, &reason, pos),
                    other => {
                        log::warn!("unexpected {} from server id={from}", other.kind());
                        (Answer::Stale, Vec::new())
                    }
                };
                // The answer carries the epoch it was decided in (see Output::ToPeer).
                let decided = self.node.epoch();
                self.execute(out);
                let _ = reply.send((decided, answer));
            }
            Event::PeerAnswer { to, epoch, answer } => {
                let out = self.node.peer_answer(now, to, epoch, answer);
                self.execute(out);
            }
            Event::PeerUnreachable { to, how } => {
                let out = self.node.peer_unreachable(now, to, how);
                self.execute(out);
            }
        }
    }

    fn follower_event(&mut self, now: u64, session: u64, event: FollowerEvent) {
        if !matches!(event, FollowerEvent::Apply { .. } | FollowerEvent::Msg { .. }) {
            // Installs, fetched files placed, a session's end: on a disk and a
            // state that hold the whole group.
            self.flush();
        }
        let current = self.follower.as_ref().is_some_and(|f| f.session == session);
        if !current {
            // An old session's last words: answer whoever waits, and ignore them.
            match event {
                FollowerEvent::Snapshot { reply, .. } => {
                    let _ = reply.send(Err("this session was stopped".into()));
                }
                FollowerEvent::PlaceFetched { reply, .. } => {
                    let _ = reply.send(Err("this session was stopped".into()));
                }
                FollowerEvent::Apply { reply, .. } => {
                    let _ = reply.send(Err("this session was stopped".into()));
                }
                FollowerEvent::Installed { reply, .. } => {
                    let _ = reply.send(Err("this session was stopped".into()));
                }
                _ => {}
            }
            return;
        }
        match event {
            FollowerEvent::Joined { epoch, id, primary, addr, snapshot, member } => {
                // Accepted by a primary that holds this key: keep it, so that a
                // restart (or a takeover as primary) needs no --key-file.
                self.settings.cluster.keep();
                let out = self.node.joined(now, epoch, id, primary, addr, snapshot, member);
                self.execute(out);
            }
            FollowerEvent::Snapshot { epoch, state, reply } => {
                self.installing = Some((self.node.state().clone(), None));
                let out = self.node.snapshot(now, epoch, *state);
                self.execute(out);
                let result = match self.installing.take() {
                    Some((_, Some(r))) => r,
                    _ => Err("the snapshot was not installed".to_string()),
                };
                let _ = reply.send(result);
            }
            FollowerEvent::PlaceFetched { user, meta, xfer, reply } => {
                let want = self.node.state().live(&user, &meta.path);
                let _ = reply.send(self.place_fetched(&user, &meta, want, &xfer));
            }
            FollowerEvent::Installed { lacks, reply } => {
                for (user, path) in &lacks {
                    self.store.drop_content(self.node.state(), user, path);
                }
                let _ = reply.send(Ok(()));
                let out = self.node.installed(now, lacks);
                self.execute(out);
            }
            FollowerEvent::Apply { epoch, entry, refetch, mut lacking, reply } => {
                let pos = entry.pos;
                if let Change::Rename { user, from, to } = &entry.change {
                    // The follower judged the source present (the entries before
                    // are on the disk: it waited for them). Should that be wrong, the
                    // destination is missing, never silently absent.
                    if refetch.is_none() && lacking.is_none() && !self.store.holds_file(user, &from.path) {
                        log::warn!(
                            "entry pos={pos} renames user={user} path={} to {}, which this server does not hold; \
                             its acks wait until a later entry settles it",
                            from.path,
                            to.path
                        );
                        lacking = Some((user.clone(), to.path.clone()));
                    }
                }
                self.applying = Some(Applying { pos, refetch, lacking });
                let out = self.node.apply(now, epoch, *entry);
                self.execute(out);
                self.applying = None;
                let ok = self.node.state().pos >= pos;
                let result = if ok { Ok(()) } else { Err(format!("entry pos={pos} was not applied")) };
                if self.store.has_pending() {
                    self.later.push_back(Later::Applied(reply, result));
                } else {
                    let _ = reply.send(result);
                }
            }
            FollowerEvent::Msg { epoch, msg } => {
                let out = self.node.from_primary(now, epoch, msg);
                self.execute(out);
            }
            FollowerEvent::KeyMismatch { why } if !self.settings.cluster.kept.load(Ordering::Relaxed) => {
                // Never accepted with this key: the operator gave the wrong one
                // (or none matching); waiting would not fix it.
                log::error!("{why}");
                self.follower = None;
                self.fatal = Some(Fatal::Refused(format!(
                    "{why}; start this server with --key-file PATH naming the cluster's key (the primary's \
                     DATA/cluster.key)"
                )));
            }
            FollowerEvent::KeyMismatch { why } => {
                // This server holds the cluster's key: whoever answered at that
                // address is not a member. Not a reason to stop; look again.
                log::warn!("{why}; not following it");
                self.follower = None;
                let out = self.node.follower_down(now, &why);
                self.execute(out);
            }
            FollowerEvent::Down { why, storage } => {
                self.follower = None;
                let out =
                    if storage { self.node.storage_failed(now, &why) } else { self.node.follower_down(now, &why) };
                self.execute(out);
            }
        }
    }

    fn status(&self) -> serde_json::Value {
        let state = self.node.state();
        let primary = state.primary;
        let members: Vec<_> = state
            .members
            .values()
            .map(|m| {
                let role = if Some(m.id) == primary { "primary" } else { "backup" };
                json!({"id": m.id.0, "addr": m.addr, "role": role})
            })
            .collect();
        let phase = match self.node.phase() {
            None => "serving",
            Some(Phase::Live) => "following",
            Some(Phase::Joining) => "joining",
            Some(Phase::Installing) => "catching up",
            Some(Phase::Detached) if self.node.eligible() => "electing",
            Some(Phase::Detached) => "no primary",
        };
        json!({
            // A backup has no id until the primary accepts it.
            "id": (self.node.id().0 > 0).then_some(self.node.id().0),
            "role": if self.node.is_primary() { "primary" } else { "backup" },
            "epoch": self.node.epoch().0,
            // The epoch of the last entry: with seq, how far its history goes.
            "last_epoch": state.epoch.0,
            "primary": self.node.primary_addr(),
            "members": members,
            "seq": state.pos.0,
            "sessions": state.sessions.len(),
            "phase": phase,
            // May this server stand in an election now (it holds every change
            // acknowledged so far); the primary counts as able to go on.
            "eligible": self.node.is_primary() || self.node.eligible(),
            "note": self.node.election_note().or_else(|| self.fewer_backups_note()),
        })
    }

    // -----------------------------------------------------------------------
    // Clients

    /// Answers a request from the request table once everything logged so far is
    /// stored as an entry's answer would be (see [`Node::barrier`]).
    fn answer_when_stored(&mut self, done: Done) {
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        self.tickets.insert(ticket, done);
        let now = self.now_ms();
        let out = self.node.barrier(now, ticket);
        self.execute(out);
    }

    fn propose(&mut self, change: Change, request: Option<(DeviceId, LastRequest)>, done: Option<Done>) {
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        if let Some(d) = done {
            self.tickets.insert(ticket, d);
        }
        let now = self.now_ms();
        let out = self.node.propose(now, change, request, ticket);
        self.persist_error = None;
        self.execute(out);
        self.persist_error = None;
    }

    /// A client whose password is proven logs in as `session` (its device, the
    /// address to call it back at, and its token).
    fn login(
        &mut self,
        conn: ConnId,
        session: Session,
        out: Sender<Msg>,
        stream: Option<TcpStream>,
        reply: Sender<Result<Welcome, String>>,
    ) {
        let (user, device) = (session.user.clone(), session.device.clone());
        if !self.node.is_primary() {
            let _ = reply.send(Err("this server is not the primary".into()));
            return;
        }
        self.throttle.succeeded(&user);
        // Only devices connected now count; a session that outlives its
        // connection (its lease, kept for a new primary's call) gives way.
        let mut connected: Vec<&DeviceId> =
            self.live.values().filter(|l| l.user == user && l.device != device).map(|l| &l.device).collect();
        connected.dedup();
        if connected.len() >= MAX_DEVICES {
            let others = connected.len();
            log::warn!("refused login user={user} device={device}: {others} devices already connected");
            let _ = reply.send(Err(format!(
                "user {user} already has {MAX_DEVICES} devices connected; log out of one of them first"
            )));
            return;
        }
        let leased: Vec<DeviceId> = self
            .node
            .state()
            .sessions
            .values()
            .filter(|s| s.user == user && s.device != device && !self.live.values().any(|l| l.device == s.device))
            .map(|s| s.device.clone())
            .collect();
        let excess = (self.node.state().devices_of(&user, &device) + 1).saturating_sub(MAX_DEVICES);
        for old in leased.into_iter().take(excess) {
            self.leases.remove(&old);
            self.end_session(&old, "another device of its user logs in while it is away");
        }
        // The same device logging in again (a restarted client whose old connection
        // is not yet known to be dead) replaces its old connection: it has just
        // proven the user's password, as any takeover of a session must.
        let stale: Vec<ConnId> = self.live.iter().filter(|(_, l)| l.device == device).map(|(c, _)| *c).collect();
        for c in stale {
            log::info!("replacing old connection conn={c} of device={device}");
            self.live.remove(&c);
        }
        self.leases.remove(&device);
        self.live.insert(conn, Live { user: user.clone(), device: device.clone(), out, stream });
        let devices = self.node.state().devices_of(&user, &device) as u32 + 1;
        let last_seq = self.node.state().requests.get(&device).map(|l| l.seq).unwrap_or_default();
        log::info!("logged in user={user} device={device} conn={conn} devices={devices}");
        let answer = Welcome { devices, last_seq };
        self.propose(Change::Login { session }, None, Some(Done::Login { reply, answer }));
    }

    /// A first login creates its user's account, stored on every backup before
    /// the login goes on.
    fn create_account(
        &mut self,
        user: String,
        credentials: StoredCredentials,
        reply: Sender<Result<AccountOutcome, String>>,
    ) {
        if !self.node.is_primary() {
            let _ = reply.send(Err("this server is not the primary".into()));
            return;
        }
        if let Some(existing) = self.node.state().accounts.get(&user) {
            // Two first logins of one name at once: the first one made it. No
            // dirty read: this login's own entry comes after that one in the log.
            let _ = reply.send(Ok(AccountOutcome::Exists(existing.clone())));
            return;
        }
        if let Err(e) = credentials.validate() {
            let _ = reply.send(Err(e.to_string()));
            return;
        }
        log::info!("created account user={user}");
        self.propose(Change::Account { user, credentials }, None, Some(Done::Account { reply }));
    }

    fn resumed(
        &mut self,
        conn: ConnId,
        device: DeviceId,
        out: Sender<Msg>,
        stream: Option<TcpStream>,
    ) -> Result<(String, Welcome), String> {
        if !self.node.is_primary() {
            return Err("this server is not the primary any more".into());
        }
        let Some(session) = self.node.state().sessions.get(&device).cloned() else {
            return Err("this device's session has ended; log in again".into());
        };
        let stale: Vec<ConnId> = self.live.iter().filter(|(_, l)| l.device == device).map(|(c, _)| *c).collect();
        for c in stale {
            self.live.remove(&c);
        }
        self.leases.remove(&device);
        self.live.insert(conn, Live { user: session.user.clone(), device: device.clone(), out, stream });
        let devices = self.node.state().devices_of(&session.user, &device) as u32 + 1;
        let last_seq = self.node.state().requests.get(&device).map(|l| l.seq).unwrap_or_default();
        log::info!("called back user={} device={device} conn={conn}: session resumed", session.user);
        Ok((session.user, Welcome { devices, last_seq }))
    }

    fn disconnect(&mut self, conn: ConnId, clean: bool) {
        let Some(live) = self.live.remove(&conn) else { return };
        if self.live.values().any(|l| l.device == live.device) {
            return;
        }
        if clean {
            log::info!("logged out user={} device={} conn={conn}", live.user, live.device);
            self.leases.remove(&live.device);
            if self.node.is_primary() {
                self.end_session(&live.device, "it logged out");
            }
        } else {
            log::info!(
                "connection lost user={} device={} conn={conn}; its session lasts {}s",
                live.user,
                live.device,
                SESSION_LEASE.as_secs()
            );
            self.leases.insert(live.device, Instant::now() + SESSION_LEASE);
        }
    }

    fn open(&self, user: &str, path: &str) -> Result<(FileMeta, File), OpResult> {
        match self.node.state().live(user, path) {
            None => Err(refusal(format!("no such file on the server: {path}"))),
            Some(meta) if meta.dir => Err(refusal(format!("{path} is a folder on the server, not a file"))),
            Some(meta) => self.store.open_file(user, path).map(|f| (meta.clone(), f)).map_err(|e| {
                log::error!("cannot open stored file user={user}: {e}");
                refusal(format!("the server cannot read {path}"))
            }),
        }
    }

    fn request(&mut self, conn: ConnId, seq: Seq, req: CoreRequest) {
        let Some(live) = self.live.get(&conn) else {
            log::warn!("request from unknown conn={conn}; dropped");
            return;
        };
        let (user, device) = (live.user.clone(), live.device.clone());
        // A listing reads every file's times, and a download the file's content:
        // what the waiting group's actions change. A download of a file the group
        // leaves alone is opened now, and answered with the group (its answer
        // waits for the commit anyway): a burst's downloads do not cut its groups
        // short.
        let reads_group = match &req {
            CoreRequest::List { .. } => true,
            CoreRequest::Open { path, .. } => self.store.touches_pending(&user, path),
            _ => false,
        };
        if reads_group {
            self.flush();
        }
        let state = self.node.state();
        let answered = state.already_answered(&device, seq);
        match req {
            CoreRequest::List { after, reply } => {
                let (mut files, more) = state.listing_page(&user, after.as_deref());
                for m in files.iter_mut().filter(|m| !m.deleted) {
                    let t = self.store.all_times(&user, &m.path);
                    (m.atime_ms, m.ctime_ms) = (t.atime_ms, t.ctime_ms);
                    if m.dir {
                        // A folder's mtime does not sync: the server's own is shown.
                        m.mtime_ms = t.mtime_ms;
                    }
                }
                self.answer_committed(Held::Result(reply, OpResult::Listing { files, more }));
            }
            CoreRequest::Open { path, reply } => {
                let opened = self.open(&user, &path);
                self.answer_download(&user, &path, Held::Open(reply, opened));
            }
            CoreRequest::BeginUpload { path, base, reply } => {
                if let Some(answer) = answered {
                    self.answer_when_stored(Done::Begin { reply, answer });
                    return;
                }
                match state.check_upload(&user, &path, base).err() {
                    Some(r) => self.answer_committed(Held::Begin(reply, r)),
                    None => {
                        let _ = reply.send(Ok(self.upload_senders()));
                    }
                }
            }
            CoreRequest::CommitUpload { path, base, xfer, size, mtime_ms, exec, hash, reply } => {
                if let Some(answer) = answered {
                    self.abandon_upload(&xfer);
                    self.answer_when_stored(Done::Reply { reply, result: answer, push: None });
                    return;
                }
                if let Some(answer) = state.check_upload(&user, &path, base).err() {
                    self.abandon_upload(&xfer);
                    self.answer_committed(Held::Result(reply, answer));
                    return;
                }
                let meta = FileMeta { exec, ..new_meta(&path, state.next_version(&user, &path), size, mtime_ms, hash) };
                let result = OpResult::Done { meta: meta.clone() };
                log::info!("stored user={user} path={path} version={} size={size} device={device}", meta.version);
                let change = Change::Put { user: user.clone(), meta: meta.clone(), xfer: xfer.clone() };
                let request = Some((device, LastRequest { seq, result: result.clone() }));
                let push = Some((conn, user, Notice::Put { meta }));
                let before = self.node.state().pos;
                self.propose(change, request, Some(Done::Reply { reply, result, push }));
                if self.node.state().pos == before {
                    // Not stored: nothing will move the bytes into place.
                    self.abandon_upload(&xfer);
                }
            }
            CoreRequest::Delete { path, base, reply } => {
                if let Some(answer) = answered {
                    self.answer_when_stored(Done::Reply { reply, result: answer, push: None });
                    return;
                }
                match state.check_delete(&user, &path, base) {
                    Err(answer) => self.answer_committed(Held::Result(reply, answer)),
                    Ok(meta) => {
                        log::info!("deleted user={user} path={path} version={} device={device}", meta.version);
                        let result = OpResult::Done { meta: meta.clone() };
                        let change = Change::Delete { user: user.clone(), meta: meta.clone() };
                        let request = Some((device, LastRequest { seq, result: result.clone() }));
                        let push = Some((conn, user, Notice::Delete { meta }));
                        self.propose(change, request, Some(Done::Reply { reply, result, push }));
                    }
                }
            }
            CoreRequest::Mkdir { path, base, reply } => {
                if let Some(answer) = answered {
                    self.answer_when_stored(Done::Reply { reply, result: answer, push: None });
                    return;
                }
                match state.check_mkdir(&user, &path, base) {
                    Err(answer) => self.answer_committed(Held::Result(reply, answer)),
                    // There already: nothing changes, the folder's entry answers.
                    Ok(None) => {
                        let current = state.live_dir(&user, &path).cloned();
                        let answer = current.map_or_else(
                            || refusal(format!("no folder {path} on the server")),
                            |meta| OpResult::Done { meta },
                        );
                        self.answer_committed(Held::Result(reply, answer));
                    }
                    Ok(Some(meta)) => {
                        log::info!("made folder user={user} path={path} version={} device={device}", meta.version);
                        let result = OpResult::Done { meta: meta.clone() };
                        // No content: the transfer name is never a temporary file.
                        let change = Change::Put { user: user.clone(), meta: meta.clone(), xfer: "dir".into() };
                        let request = Some((device, LastRequest { seq, result: result.clone() }));
                        let push = Some((conn, user, Notice::Put { meta }));
                        self.propose(change, request, Some(Done::Reply { reply, result, push }));
                    }
                }
            }
            CoreRequest::Passwd { credentials, reply } => {
                if let Some(answer) = answered {
                    self.answer_when_stored(Done::Reply { reply, result: answer, push: None });
                    return;
                }
                if let Err(e) = credentials.validate() {
                    self.answer_committed(Held::Result(reply, refusal(e.to_string())));
                    return;
                }
                log::info!("changed password user={user} device={device}");
                let result = OpResult::PasswordChanged;
                let change = Change::Account { user: user.clone(), credentials };
                let request = Some((device, LastRequest { seq, result: result.clone() }));
                self.propose(change, request, Some(Done::Reply { reply, result, push: None }));
            }
            CoreRequest::Rename { from, to, base, reply } => {
                if let Some(answer) = answered {
                    self.answer_when_stored(Done::Reply { reply, result: answer, push: None });
                    return;
                }
                match state.check_rename(&user, &from, &to, base) {
                    Err(answer) => self.answer_committed(Held::Result(reply, answer)),
                    Ok((gone, moved)) => {
                        log::info!("renamed user={user} from={from} to={to} device={device}");
                        let result = OpResult::Done { meta: moved.clone() };
                        let change = Change::Rename { user: user.clone(), from: gone, to: moved.clone() };
                        let request = Some((device, LastRequest { seq, result: result.clone() }));
                        let push = Some((conn, user, Notice::Rename { from, meta: moved }));
                        self.propose(change, request, Some(Done::Reply { reply, result, push }));
                    }
                }
            }
        }
    }

    /// Sends an answer read from the state now if everything the state holds is
    /// acknowledged, else once it is. A resent request's stored result, a listing,
    /// a download or a refusal must not show an entry that a failover could still
    /// lose (the primary applies entries before its backups have them).
    fn answer_committed(&mut self, held: Held) {
        if self.store.has_pending() {
            self.later.push_back(Later::Answer(held));
            return;
        }
        let read_at = self.node.state().pos;
        match self.node.committed() {
            Some(c) if c < read_at => self.held.push_back((read_at, held)),
            Some(_) => held.send(),
            // No longer primary (it stepped down while the answer waited for a
            // flush): what it read may not be on the backups; the client asks
            // the next primary, as for the answers `release_held` drops.
            None => {}
        }
    }

    /// Notes the paths an entry logged on this primary changes, for
    /// [`Core::answer_download`]; forgets those acknowledged since, now and then.
    fn note_changed(&mut self, entry: &Entry) {
        let pos = entry.pos;
        let mut note = |user: &str, path: &str| {
            self.changed_at.insert((user.to_string(), path.to_string()), pos);
        };
        match &entry.change {
            Change::Put { user, meta, .. } | Change::Delete { user, meta } => note(user, &meta.path),
            Change::Rename { user, from, to } => {
                note(user, &from.path);
                note(user, &to.path);
            }
            _ => {}
        }
        if self.changed_at.len() > CHANGED_AT_PRUNE {
            let committed = self.node.committed().unwrap_or(LogPos(0));
            self.changed_at.retain(|_, at| *at > committed);
        }
    }

    /// Sends a download's answer (the file's version, or that there is none)
    /// once the last entry that changed that path is acknowledged: now, when it
    /// is. Only that entry shows in the answer, so the rest of a burst of
    /// changes under way does not hold it up, while a change that a failover
    /// could still lose is never shown (see [`Core::answer_committed`]). The
    /// file was opened after any group that touches it was flushed.
    fn answer_download(&mut self, user: &str, path: &str, held: Held) {
        let Some(committed) = self.node.committed() else {
            // Not primary: the client asks the next one (as answer_committed).
            return;
        };
        let changed = self.changed_at.get(&(user.to_string(), path.to_string())).copied();
        let at = changed.unwrap_or(LogPos(0)).max(self.primary_from);
        if at <= committed {
            held.send();
        } else {
            // In position order, as release_held expects.
            let i = self.held.iter().position(|(p, _)| *p > at).unwrap_or(self.held.len());
            self.held.insert(i, (at, held));
        }
    }

    /// Sends the held answers whose position is now committed.
    fn release_held(&mut self) {
        let Some(committed) = self.node.committed() else {
            // Not (or no longer) primary: the clients ask the next one.
            self.held.clear();
            return;
        };
        while self.held.front().is_some_and(|(at, _)| *at <= committed) {
            if let Some((_, h)) = self.held.pop_front() {
                h.send();
            }
        }
    }

    /// Forgets an upload that will not be committed, here and on every backup
    /// its chunks were forwarded to.
    fn abandon_upload(&self, xfer: &str) {
        if self.fatal.is_some() {
            // Stopping on an entry that is logged but not carried out: that
            // entry may name this very file, and the next start moves it into
            // place. Leave tmp/ as it is.
            return;
        }
        self.store.discard_temp(xfer);
        for link in self.links.values() {
            let _ = link.ctl.send(LinkOut::msg(self.node.epoch(), Msg::XferAbort { xfer: xfer.to_string() }));
        }
    }

    /// Tells the user's other connected devices about a change.
    fn push(&self, from: ConnId, user: &str, notice: Notice) {
        for (c, live) in &self.live {
            if *c != from && live.user == user {
                let _ = live.out.send(Msg::Notice { notice: notice.clone() });
            }
        }
    }
}
