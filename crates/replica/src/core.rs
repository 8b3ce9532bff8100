//! The core thread: the one owner of the state and the store.
//!
//! Connection threads send it [`Event`]s and wait on a reply channel; it never
//! blocks on a socket (pushes to devices and frames to backups go through queues
//! that other threads drain), and it commits one entry at a time, which is what the
//! store's recovery relies on.
//!
//! As primary it runs the replication rule "backups first": every entry is
//! committed locally, sent to every backup, and only when every live backup has
//! acknowledged it (in order: acks are cumulative) is the client answered and the
//! change pushed to the user's other device. A backup that does not acknowledge
//! within the bound is dropped from the membership, and that drop is itself an
//! entry. As backup it applies the entries its follower thread receives.

use crate::link::{DataSender, LinkOut};
use crate::replicate::Acks;
use crate::state::{Change, Entry, LastRequest, Member, Session, State, MAX_DEVICES};
use crate::store::{new_meta, CommitError, Store, StoreError};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use replibox_proto::{ContentHash, DeviceId, FileMeta, Msg, Notice, OpResult, Seq, ServerId, Version};
use serde_json::json;
use std::collections::BTreeMap;
use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Identifies one connection to the server.
pub type ConnId = u64;

/// Settings the core runs with.
#[derive(Clone, Debug)]
pub struct Settings {
    /// This server's id.
    pub id: ServerId,
    /// The address this server listens on (its IP may be unspecified).
    pub listen: SocketAddr,
    /// How often the primary sends a heartbeat to each backup.
    pub heartbeat: Duration,
    /// How long the primary waits for a backup's acknowledgement before dropping it.
    pub ack_timeout: Duration,
}

/// A logged-in connection as the core sees it.
struct Live {
    user: String,
    device: DeviceId,
    out: Sender<Msg>,
}

/// A backup's link, as the primary holds it.
struct Link {
    no: u64,
    addr: String,
    peer_ip: std::net::IpAddr,
    ctl: Sender<LinkOut>,
    data: Sender<LinkOut>,
    stream: TcpStream,
}

/// What to do once an entry is stored on every backup.
enum Done {
    Nothing,
    Reply { reply: Sender<OpResult>, result: OpResult, push: Option<(ConnId, String, Notice)> },
    Login { reply: Sender<Result<(String, u32, Seq), String>>, answer: (String, u32, Seq) },
}

impl Done {
    fn fail(self, refusal: OpResult) {
        match self {
            Done::Nothing => {}
            Done::Reply { reply, .. } => {
                let _ = reply.send(refusal);
            }
            Done::Login { reply, .. } => {
                let _ = reply.send(Err("the server cannot store sessions right now".into()));
            }
        }
    }
}

/// What a connection, a link or the follower asks of the core.
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
        /// Where the core sends pushes for this connection.
        out: Sender<Msg>,
        /// The answer: (token, devices connected, last seq answered) or a refusal.
        reply: Sender<Result<(String, u32, Seq), String>>,
    },
    /// A client connection ended.
    Disconnect {
        /// The connection.
        conn: ConnId,
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
    /// Create a temporary file for an incoming upload.
    NewTemp {
        /// Its id and handle, or why not.
        reply: Sender<Result<(String, File), String>>,
    },
    /// An upload will not be committed: remove its temporary file here and on
    /// every backup.
    AbandonUpload {
        /// Its id.
        xfer: String,
    },
    /// The seq of the last entry applied here.
    LastSeq {
        /// The answer.
        reply: Sender<Seq>,
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
    /// A server asks to join (primary only).
    Join {
        /// Who it is and its link's queues.
        link: NewLink,
        /// Accepted (its id) or refused (why).
        reply: Sender<Result<ServerId, String>>,
    },
    /// A backup acknowledged entries up to `seq`.
    Ack {
        /// Link number.
        no: u64,
        /// The backup.
        id: ServerId,
        /// Its last seq.
        seq: Seq,
    },
    /// A joining backup caught up.
    CaughtUp {
        /// Link number.
        no: u64,
        /// The backup.
        id: ServerId,
        /// Its last seq.
        seq: Seq,
    },
    /// A backup's link ended.
    LinkDown {
        /// Link number.
        no: u64,
        /// The backup.
        id: ServerId,
        /// Why.
        why: String,
    },
    /// Open a user's file for a backup fetching it.
    OpenFor {
        /// The backup asking.
        id: ServerId,
        /// The IP its fetch connection comes from.
        peer_ip: std::net::IpAddr,
        /// Owner.
        user: String,
        /// Path.
        path: String,
        /// Metadata and handle, or why not.
        reply: Sender<Result<(FileMeta, File), OpResult>>,
    },
    /// Backup: the primary accepted us under this id.
    Joined {
        /// Our id.
        id: ServerId,
    },
    /// Backup: replace the state with the primary's snapshot; answers the files
    /// whose content must be fetched.
    Install {
        /// The primary's state.
        state: Box<State>,
        /// Files to fetch, or why the snapshot could not be installed.
        reply: Sender<Result<Vec<(String, FileMeta)>, String>>,
    },
    /// Backup: apply the next entry (its content, if any, is in place in tmp/).
    Apply {
        /// The entry.
        entry: Entry,
        /// Our seq after it, or why not.
        reply: Sender<Result<Seq, String>>,
    },
    /// Backup: a fetched file sits in temporary file `xfer`; put it in place if it
    /// is the content the state expects.
    PlaceFetched {
        /// Owner.
        user: String,
        /// What was fetched.
        meta: FileMeta,
        /// Its temporary file.
        xfer: String,
        /// Whether it was put in place (false: not the content the state expects),
        /// or why it could not be.
        reply: Sender<Result<bool, String>>,
    },
    /// Backup: remove the local copy of a file whose content could not be had.
    DropContent {
        /// Owner.
        user: String,
        /// Path.
        path: String,
        /// Done.
        reply: Sender<()>,
    },
    /// Backup: the state describes a file whose content is not here (marks the data
    /// dir like an unfinished install, until [`Event::JoinComplete`]).
    MarkIncomplete {
        /// Done.
        reply: Sender<()>,
    },
    /// Backup: every file the state describes is here (the install is complete).
    JoinComplete {
        /// Done.
        reply: Sender<()>,
    },
    /// Backup: the follower knows the primary's address.
    PrimaryAt {
        /// `IP:PORT`.
        addr: String,
    },
    /// Stop the core.
    Shutdown,
}

/// A joining server and the link it came on.
pub struct NewLink {
    /// The id it has, if any.
    pub id: Option<ServerId>,
    /// `IP:PORT` it listens on.
    pub addr: String,
    /// The IP it reached this server on (to learn our own address).
    pub local_ip: std::net::IpAddr,
    /// The IP its connection comes from (its fetch connections must too).
    pub peer_ip: std::net::IpAddr,
    /// Link number (tells a stale link's events from the current one's).
    pub no: u64,
    /// Control queue of its link.
    pub ctl: Sender<LinkOut>,
    /// Data queue of its link.
    pub data: Sender<LinkOut>,
    /// The socket, to shut it down when the backup is dropped.
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
}

/// Primary or backup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Serves clients and replicates to backups.
    Primary,
    /// Follows the primary.
    Backup,
}

/// Where the primary is, as a server answers a client or a joining server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This server is the primary.
    Here,
    /// This server is a backup of the primary at that address.
    At(String),
    /// This server is a backup that does not know its primary yet.
    Unknown,
}

/// Sends the event `make` builds around a reply channel, and waits for the answer.
/// None when the core has stopped.
pub fn ask<T>(core: &Sender<Event>, make: impl FnOnce(Sender<T>) -> Event) -> Option<T> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    core.send(make(tx)).ok()?;
    rx.recv().ok()
}

/// The core's state.
pub struct Core {
    settings: Settings,
    role: Role,
    state: State,
    store: Store,
    live: BTreeMap<ConnId, Live>,
    links: BTreeMap<ServerId, Link>,
    /// Entries waiting for the backups; a link is live here once it caught up.
    acks: Acks<Done>,
    /// Origin of the milliseconds `acks` counts in.
    started: Instant,
    /// The epoch frames are stamped with, shared with the connection threads.
    epoch: Arc<AtomicU64>,
    /// Backup: the primary's address as the follower last reached it.
    primary_addr: Option<String>,
    next_heartbeat: Instant,
}

fn refusal(message: impl Into<String>) -> OpResult {
    OpResult::Error { message: message.into() }
}

impl Core {
    /// A core over a recovered store.
    pub fn new(store: Store, state: State, settings: Settings, role: Role) -> Core {
        let epoch = Arc::new(AtomicU64::new(state.epoch.0));
        let ack_ms = settings.ack_timeout.as_millis() as u64;
        Core {
            settings,
            role,
            state,
            store,
            live: BTreeMap::new(),
            acks: Acks::new(ack_ms),
            started: Instant::now(),
            links: BTreeMap::new(),
            epoch,
            primary_addr: None,
            next_heartbeat: Instant::now(),
        }
    }

    /// How long a backup may take to acknowledge (`--ack-timeout-ms`).
    pub fn ack_timeout(&self) -> Duration {
        self.settings.ack_timeout
    }

    /// The epoch shared with the connection threads, which stamp it on every frame.
    pub fn epoch_handle(&self) -> Arc<AtomicU64> {
        self.epoch.clone()
    }

    fn my_addr(&self) -> String {
        self.settings.listen.to_string()
    }

    /// Starts a new epoch as primary of a cluster of one: backups (re)join it.
    /// Also forgets every session (nobody is connected to a server that just
    /// started) and adopts files found on disk that the state does not describe.
    pub fn start_as_primary(&mut self) -> Result<(), String> {
        if self.store.install_unfinished() {
            return Err(format!(
                "this data dir stopped while joining a cluster ({}/meta/installing): some files may be missing; \
                 start it with -b to finish catching up, or delete that file to start from what it holds",
                self.store.root().display()
            ));
        }
        let epoch = self.state.epoch.next();
        let me = Member { id: self.settings.id, addr: self.my_addr() };
        self.commit(Change::NewEpoch { epoch, primary: self.settings.id, members: vec![me] })
            .map_err(|e| format!("cannot start epoch {epoch}: {e:?}"))?;
        if !self.state.sessions.is_empty() {
            self.commit(Change::ClearSessions).map_err(|e| format!("cannot clear sessions: {e:?}"))?;
        }
        for (user, meta) in self.store.check_against(&self.state).map_err(|e| e.to_string())? {
            self.store.adopt(&mut self.state, user, meta).map_err(|e| e.to_string())?;
        }
        self.epoch.store(self.state.epoch.0, Ordering::Relaxed);
        log::info!("became primary id={} epoch={} seq={}", self.settings.id, self.state.epoch, self.state.seq);
        Ok(())
    }

    /// Runs until [`Event::Shutdown`] or until every sender is gone.
    pub fn run(mut self, events: Receiver<Event>) {
        // On shutdown, new work is turned away (its connections close and clients
        // resend after the restart) while the entries already under way finish
        // replicating, for at most the ack bound.
        let mut stopping: Option<Instant> = None;
        loop {
            if let Some(deadline) = stopping {
                if self.acks.is_empty() || Instant::now() >= deadline {
                    break;
                }
            }
            let wait = self.next_timer().saturating_duration_since(Instant::now());
            match events.recv_timeout(wait) {
                Err(RecvTimeoutError::Disconnected) => break,
                Ok(Event::Shutdown) => {
                    log::info!("shutting down: {} entries still replicating", self.acks.len());
                    stopping.get_or_insert(Instant::now() + self.settings.ack_timeout);
                }
                Ok(Event::Login { .. } | Event::Request { .. } | Event::Join { .. }) if stopping.is_some() => {}
                Ok(event) => self.handle(event),
                Err(RecvTimeoutError::Timeout) => {}
            }
            self.timers();
        }
        log::info!("core stopped seq={}", self.state.seq);
    }

    fn next_timer(&self) -> Instant {
        let mut t = Instant::now() + Duration::from_secs(1);
        if self.role == Role::Primary {
            t = t.min(self.next_heartbeat);
            if let Some(ms) = self.acks.next_deadline() {
                t = t.min(self.started + Duration::from_millis(ms));
            }
        }
        t
    }

    fn timers(&mut self) {
        if self.role != Role::Primary {
            return;
        }
        let now = Instant::now();
        if now >= self.next_heartbeat {
            self.next_heartbeat = now + self.settings.heartbeat;
            let seq = self.state.seq;
            for link in self.links.values() {
                let _ = link.ctl.send(LinkOut::msg(Msg::Heartbeat { seq }));
            }
        }
        // Dropping the backups that hold up the oldest entry may reveal the next one
        // overdue too: repeat until none is.
        loop {
            self.settle();
            let late = self.acks.overdue(self.now_ms());
            if late.is_empty() {
                break;
            }
            let ms = self.settings.ack_timeout.as_millis();
            for id in late {
                self.drop_backup(id, &format!("no acknowledgement within {ms} ms"));
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Shutdown => {}
            Event::Login { conn, user, device, ip, callback_port, out, reply } => {
                self.login(conn, user, device, ip, callback_port, out, reply)
            }
            Event::Disconnect { conn } => self.disconnect(conn),
            Event::Request { conn, seq, req } => self.request(conn, seq, req),
            Event::NewTemp { reply } => {
                let _ = reply.send(self.store.create_temp().map_err(|e| {
                    log::error!("cannot create temporary file: {e}");
                    "the server cannot store uploads right now".to_string()
                }));
            }
            Event::AbandonUpload { xfer } => self.abandon_upload(&xfer),
            Event::LastSeq { reply } => {
                let _ = reply.send(self.state.seq);
            }
            Event::Route { reply } => {
                let answer = match self.role {
                    Role::Primary => Route::Here,
                    Role::Backup => self.known_primary().map_or(Route::Unknown, Route::At),
                };
                let _ = reply.send(answer);
            }
            Event::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Event::Join { link, reply } => {
                let answer = self.join(link);
                let _ = reply.send(answer);
            }
            Event::Ack { no, id, seq } => self.acked(no, id, seq),
            Event::CaughtUp { no, id, seq } => self.caught_up(no, id, seq),
            Event::LinkDown { no, id, why } => {
                if self.links.get(&id).is_some_and(|l| l.no == no) {
                    self.drop_backup(id, &why);
                    self.settle();
                }
            }
            Event::OpenFor { id, peer_ip, user, path, reply } => {
                // Only a server this primary is replicating to (from the host its
                // link comes from) may read users' files this way.
                let answer = match self.links.get(&id) {
                    Some(link) if link.peer_ip == peer_ip => match self.state.live(&user, &path) {
                        None => Err(OpResult::Gone { path }),
                        Some(_) => self.open(&user, &path),
                    },
                    _ => {
                        log::warn!(
                            "refused fetch of user={user} path={path}: id={id} from {peer_ip} is not a backup here"
                        );
                        Err(refusal("fetching is for this cluster's backups"))
                    }
                };
                let _ = reply.send(answer);
            }
            Event::Joined { id } => {
                if let Err(e) = crate::store::save_id(self.store.root(), id) {
                    log::error!("cannot record server id={id}: {e}");
                }
                self.settings.id = id;
            }
            Event::Install { state, reply } => {
                let answer = self.store.install(&self.state, &state).map_err(|e| e.to_string());
                if answer.is_ok() {
                    self.state = *state;
                    self.epoch.store(self.state.epoch.0, Ordering::Relaxed);
                    log::info!("installed snapshot seq={} epoch={}", self.state.seq, self.state.epoch);
                }
                let _ = reply.send(answer);
            }
            Event::Apply { entry, reply } => {
                let seq = entry.seq;
                let answer = self.store_entry(entry).map(|()| seq).map_err(|e| e.to_string());
                self.epoch.store(self.state.epoch.0, Ordering::Relaxed);
                let _ = reply.send(answer);
            }
            Event::PlaceFetched { user, meta, xfer, reply } => {
                let wanted = self.state.live(&user, &meta.path).cloned();
                let placed = match wanted {
                    Some(w) if w.hash == meta.hash && w.size == meta.size => {
                        self.store.place_temp(&user, &w, &xfer).map(|()| true).map_err(|e| {
                            log::error!("cannot place fetched file user={user} path={}: {e}", w.path);
                            e.to_string()
                        })
                    }
                    _ => {
                        self.store.discard_temp(&xfer);
                        Ok(false)
                    }
                };
                let _ = reply.send(placed);
            }
            Event::PrimaryAt { addr } => self.primary_addr = Some(addr),
            Event::DropContent { user, path, reply } => {
                self.store.drop_content(&user, &path);
                let _ = reply.send(());
            }
            Event::MarkIncomplete { reply } => {
                if let Err(e) = self.store.mark_incomplete() {
                    log::error!("cannot mark the data dir incomplete: {e}");
                }
                let _ = reply.send(());
            }
            Event::JoinComplete { reply } => {
                if let Err(e) = self.store.finish_install() {
                    log::error!("cannot record the end of the join: {e}");
                }
                let _ = reply.send(());
            }
        }
    }

    fn status(&self) -> serde_json::Value {
        let primary = self.state.primary;
        let members: Vec<_> = self
            .state
            .members
            .values()
            .map(|m| {
                let role = if Some(m.id) == primary { "primary" } else { "backup" };
                json!({"id": m.id.0, "addr": m.addr, "role": role})
            })
            .collect();
        let primary_addr = match self.role {
            Role::Primary => Some(self.state.primary_addr().map(str::to_string).unwrap_or_else(|| self.my_addr())),
            Role::Backup => self.known_primary(),
        };
        json!({
            // A backup has no id until the primary accepts it.
            "id": (self.settings.id.0 > 0).then_some(self.settings.id.0),
            "role": match self.role { Role::Primary => "primary", Role::Backup => "backup" },
            "epoch": self.state.epoch.0,
            "primary": primary_addr,
            "members": members,
            "seq": self.state.seq.0,
            "sessions": self.state.sessions.len(),
        })
    }

    /// Backup: the primary's address, as the follower last reached it or else as
    /// the replicated membership names it.
    fn known_primary(&self) -> Option<String> {
        self.primary_addr.clone().or_else(|| self.state.primary_addr().map(str::to_string))
    }

    /// Commits an entry locally. An entry that did not reach the log changed
    /// nothing and is refused; one that reached the log but whose action failed
    /// leaves the disk and the state disagreeing, so the server stops rather than
    /// serve a lie (start-up redoes the action).
    fn commit(&mut self, change: Change) -> Result<Entry, OpResult> {
        self.commit_for(change, None)
    }

    fn commit_for(&mut self, change: Change, request: Option<(DeviceId, LastRequest)>) -> Result<Entry, OpResult> {
        let entry = Entry { seq: self.state.seq.next(), change, request };
        match self.store_entry(entry.clone()) {
            Ok(()) => Ok(entry),
            Err(e) => {
                log::error!("cannot commit: {e}");
                Err(refusal("the server cannot store changes right now"))
            }
        }
    }

    /// Logs and applies `entry`. An entry that is logged but could not be carried
    /// out leaves the store behind its own log: the process stops, and the redo at
    /// start-up finishes it. Only an entry that never reached the log comes back.
    fn store_entry(&mut self, entry: Entry) -> Result<(), StoreError> {
        match self.store.commit(&mut self.state, entry) {
            Ok(()) => Ok(()),
            Err(CommitError::Unlogged(e)) => Err(e),
            Err(e @ CommitError::Logged(_)) => {
                log::error!("stopping: {e}");
                std::process::exit(3);
            }
        }
    }

    /// Commits an entry here, sends it to every backup, and runs `done` once every
    /// live backup has acknowledged it. False when the commit failed (`done` has
    /// then been failed already).
    fn propose(&mut self, change: Change, request: Option<(DeviceId, LastRequest)>, done: Done) -> bool {
        let entry = match self.commit_for(change, request) {
            Ok(e) => e,
            Err(r) => {
                done.fail(r);
                return false;
            }
        };
        // Joining backups get every entry too, but are not waited for yet.
        for link in self.links.values() {
            let _ = link.ctl.send(LinkOut::msg(Msg::Apply { entry: Box::new(entry.clone()) }));
        }
        self.acks.propose(entry.seq, self.now_ms(), done);
        self.settle();
        true
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Runs the `done` of every entry at the front that no backup is waited for.
    fn settle(&mut self) {
        for (_, done) in self.acks.settle() {
            match done {
                Done::Nothing => {}
                Done::Login { reply, answer } => {
                    let _ = reply.send(Ok(answer));
                }
                Done::Reply { reply, result, push } => {
                    let _ = reply.send(result);
                    if let Some((conn, user, notice)) = push {
                        self.push(conn, &user, notice);
                    }
                }
            }
        }
    }

    fn acked(&mut self, no: u64, id: ServerId, seq: Seq) {
        if self.links.get(&id).is_none_or(|l| l.no != no) {
            return;
        }
        self.acks.ack(id, seq);
        self.settle();
    }

    fn caught_up(&mut self, no: u64, id: ServerId, seq: Seq) {
        let Some(link) = self.links.get(&id).filter(|l| l.no == no) else { return };
        if self.acks.is_live(id) {
            return;
        }
        self.acks.add(id);
        let member = Member { id, addr: link.addr.clone() };
        log::info!("backup caught up id={id} addr={} seq={seq}; adding it to the membership", member.addr);
        self.propose(Change::Join { member }, None, Done::Nothing);
    }

    /// Removes a backup from the links and the membership.
    fn drop_backup(&mut self, id: ServerId, why: &str) {
        if let Some(link) = self.links.remove(&id) {
            log::warn!("dropping backup id={id} addr={}: {why}", link.addr);
            let _ = link.stream.shutdown(std::net::Shutdown::Both);
        }
        self.acks.remove(id);
        if self.state.members.contains_key(&id) {
            self.propose(Change::Leave { id }, None, Done::Nothing);
        }
    }

    fn join(&mut self, link: NewLink) -> Result<ServerId, String> {
        let NewLink { id, addr, local_ip, peer_ip, no, ctl, data, stream } = link;
        if self.role != Role::Primary {
            return Err("this server is not the primary".into());
        }
        let me = self.settings.id;
        let highest = self.links.keys().copied().chain([me, self.state.max_id]).max().unwrap_or(me);
        let id = id.unwrap_or(highest.next());
        if id == me || id.0 == 0 {
            return Err(format!("server id {id} is taken by the primary; give the new server another --id"));
        }
        let known =
            self.links.get(&id).map(|l| l.addr.clone()).or_else(|| self.state.members.get(&id).map(|m| m.addr.clone()));
        if let Some(other) = known {
            if other != addr && self.links.contains_key(&id) {
                return Err(format!(
                    "server id {id} is already in the cluster at {other}; give the new server another --id"
                ));
            }
            // The same server back again (restarted): it rejoins from scratch.
            self.drop_backup(id, "it is joining again");
        }
        // A primary bound to 0.0.0.0 learns the address backups reach it on.
        if self.settings.listen.ip().is_unspecified() {
            let mine = SocketAddr::new(local_ip, self.settings.listen.port()).to_string();
            if self.state.members.get(&me).is_some_and(|m| m.addr != mine) {
                self.propose(Change::Join { member: Member { id: me, addr: mine } }, None, Done::Nothing);
            }
        }
        if id > self.state.max_id {
            self.propose(Change::ReserveId { id }, None, Done::Nothing);
        }
        // Joined, then the snapshot: the state after seq S. Every entry after S
        // follows on the same queue, in order.
        let _ = ctl.send(LinkOut::msg(Msg::Joined { id, primary: me }));
        let snapshot = match serde_json::to_vec(&self.state) {
            Ok(s) => s,
            Err(e) => return Err(format!("cannot encode the snapshot: {e}")),
        };
        for chunk in snapshot.chunks(replibox_proto::MAX_PAYLOAD) {
            let _ = ctl.send(LinkOut { msg: Msg::SnapshotChunk, payload: Some(Arc::new(chunk.to_vec())) });
        }
        let _ = ctl.send(LinkOut::msg(Msg::SnapshotEnd { seq: self.state.seq }));
        log::info!("backup joining id={id} addr={addr} from seq={}", self.state.seq);
        self.links.insert(id, Link { no, addr, peer_ip, ctl, data, stream });
        Ok(id)
    }

    #[allow(clippy::too_many_arguments)]
    fn login(
        &mut self,
        conn: ConnId,
        user: String,
        device: DeviceId,
        ip: String,
        callback_port: u16,
        out: Sender<Msg>,
        reply: Sender<Result<(String, u32, Seq), String>>,
    ) {
        if self.role != Role::Primary {
            let _ = reply.send(Err("this server is a backup".into()));
            return;
        }
        let others = self.state.devices_of(&user, &device);
        if others >= MAX_DEVICES {
            log::warn!("refused login user={user} device={device}: {others} devices already connected");
            let _ = reply.send(Err(format!(
                "user {user} already has {MAX_DEVICES} devices connected; log out of one of them first"
            )));
            return;
        }
        let token = match replibox_proto::random_hex(16) {
            Ok(t) => t,
            Err(e) => {
                log::error!("refused login user={user} device={device}: no session token: /dev/urandom: {e}");
                let _ = reply.send(Err("the server cannot make a session token right now".to_string()));
                return;
            }
        };
        // The same device logging in again (a restarted client whose old connection
        // is not yet known to be dead) replaces its old connection.
        let stale: Vec<ConnId> = self.live.iter().filter(|(_, l)| l.device == device).map(|(c, _)| *c).collect();
        for c in stale {
            log::info!("replacing old connection conn={c} of device={device}");
            self.live.remove(&c);
        }
        let session = Session { user: user.clone(), device: device.clone(), ip, callback_port, token: token.clone() };
        self.live.insert(conn, Live { user: user.clone(), device: device.clone(), out });
        let devices = self.state.devices_of(&user, &device) as u32 + 1;
        let last = self.state.requests.get(&device).map(|l| l.seq).unwrap_or_default();
        log::info!("logged in user={user} device={device} conn={conn} devices={devices}");
        self.propose(Change::Login { session }, None, Done::Login { reply, answer: (token, devices, last) });
    }

    fn disconnect(&mut self, conn: ConnId) {
        let Some(live) = self.live.remove(&conn) else { return };
        let still_connected = self.live.values().any(|l| l.device == live.device);
        if !still_connected && self.state.sessions.contains_key(&live.device) {
            self.propose(Change::Logout { device: live.device.clone() }, None, Done::Nothing);
        }
        log::info!("logged out user={} device={} conn={conn}", live.user, live.device);
    }

    fn open(&self, user: &str, path: &str) -> Result<(FileMeta, File), OpResult> {
        match self.state.live(user, path) {
            None => Err(refusal(format!("no such file on the server: {path}"))),
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
        let answered = |state: &State| state.already_answered(&device, seq);
        match req {
            CoreRequest::List { after, reply } => {
                let (mut files, more) = self.state.listing_page(&user, after.as_deref());
                for m in files.iter_mut().filter(|m| !m.deleted) {
                    (m.atime_ms, m.ctime_ms) = self.store.times(&user, &m.path);
                }
                let _ = reply.send(OpResult::Listing { files, more });
            }
            CoreRequest::Open { path, reply } => {
                let _ = reply.send(self.open(&user, &path));
            }
            CoreRequest::BeginUpload { path, base, reply } => {
                let answer = match answered(&self.state).or_else(|| self.state.check_upload(&user, &path, base).err()) {
                    Some(r) => Err(r),
                    None => Ok(self
                        .links
                        .iter()
                        .filter(|(id, _)| self.acks.is_live(**id))
                        .map(|(id, l)| DataSender { id: *id, tx: l.data.clone() })
                        .collect()),
                };
                let _ = reply.send(answer);
            }
            CoreRequest::CommitUpload { path, base, xfer, size, mtime_ms, hash, reply } => {
                let early = answered(&self.state).or_else(|| self.state.check_upload(&user, &path, base).err());
                if let Some(answer) = early {
                    self.abandon_upload(&xfer);
                    let _ = reply.send(answer);
                    return;
                }
                let meta = new_meta(&path, self.state.next_version(&user, &path), size, mtime_ms, hash);
                let result = OpResult::Done { meta: meta.clone() };
                log::info!("stored user={user} path={path} version={} size={size} device={device}", meta.version);
                let change = Change::Put { user: user.clone(), meta: meta.clone(), xfer: xfer.clone() };
                let request = Some((device, LastRequest { seq, result: result.clone() }));
                let push = Some((conn, user.clone(), Notice::Put { meta }));
                if !self.propose(change, request, Done::Reply { reply, result, push }) {
                    // Nothing will move the bytes into place.
                    self.abandon_upload(&xfer);
                }
            }
            CoreRequest::Delete { path, base, reply } => {
                if let Some(answer) = answered(&self.state) {
                    let _ = reply.send(answer);
                    return;
                }
                match self.state.check_delete(&user, &path, base) {
                    Err(answer) => {
                        let _ = reply.send(answer);
                    }
                    Ok(meta) => {
                        log::info!("deleted user={user} path={path} version={} device={device}", meta.version);
                        let result = OpResult::Done { meta: meta.clone() };
                        let change = Change::Delete { user: user.clone(), meta: meta.clone() };
                        let request = Some((device, LastRequest { seq, result: result.clone() }));
                        let push = Some((conn, user, Notice::Delete { meta }));
                        self.propose(change, request, Done::Reply { reply, result, push });
                    }
                }
            }
            CoreRequest::Rename { from, to, base, reply } => {
                if let Some(answer) = answered(&self.state) {
                    let _ = reply.send(answer);
                    return;
                }
                match self.state.check_rename(&user, &from, &to, base) {
                    Err(answer) => {
                        let _ = reply.send(answer);
                    }
                    Ok((gone, moved)) => {
                        log::info!("renamed user={user} from={from} to={to} device={device}");
                        let result = OpResult::Done { meta: moved.clone() };
                        let change = Change::Rename { user: user.clone(), from: gone, to: moved.clone() };
                        let request = Some((device, LastRequest { seq, result: result.clone() }));
                        let push = Some((conn, user, Notice::Rename { from, meta: moved }));
                        self.propose(change, request, Done::Reply { reply, result, push });
                    }
                }
            }
        }
    }

    /// Forgets an upload that will not be committed, here and on every backup
    /// its chunks were forwarded to.
    fn abandon_upload(&self, xfer: &str) {
        self.store.discard_temp(xfer);
        for link in self.links.values() {
            let _ = link.ctl.send(LinkOut::msg(Msg::XferAbort { xfer: xfer.to_string() }));
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
