//! The backup's side of a replication link: plain transport, which the core
//! starts (to follow a primary at an address) and stops.
//!
//! A follower session connects, proves the cluster key (and has the other side
//! prove it) before anything else, says hello as a server, follows a redirect to the
//! primary, and then reports to the core everything the primary sends, with the
//! frame's epoch: the core's [`crate::node::Node`] decides what it means (a stale
//! epoch ends the session, acks are the node's outputs). What stays here is the
//! content: forwarded upload chunks go to temporary files as they arrive; the
//! snapshot's files and the content of entries whose chunks did not come (an
//! upload already under way when this backup joined) are fetched from the
//! primary on a connection of their own, so that a long fetch never delays the
//! link; every user and path is checked before it touches the disk.

use crate::cluster::{self, ClusterAuth, ConnectError};
use crate::core::{ask, Event, FollowerEvent};
use crate::state::{Change, State};
use crate::store::{sync_temp, tmp_file, user_file};
use crossbeam_channel::{select, unbounded, Receiver, Sender};
use replibox_proto::durable::WriteBehind;
use replibox_proto::{
    read_frame, validate_path, validate_username, write_frame, Damaged, Epoch, FileMeta, Frame, Hasher, LogPos, Msg,
    OpResult, ProtoError, Purpose, Receipt, ServerId, Who, PROTOCOL_VERSION,
};
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{BufReader, Write};
use std::net::{IpAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often a backup pings its primary when it has nothing else to say (a long
/// fetch while joining, say), so that the primary can time out every read.
const KEEPALIVE: Duration = Duration::from_secs(1);
/// How long connecting to a primary may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Redirects followed per session.
const MAX_REDIRECTS: u32 = 4;

/// Where a follower session goes.
#[derive(Clone, Debug)]
pub struct FollowConfig {
    /// `HOST:PORT` of the primary, or of a server that redirects to it.
    pub target: String,
    /// Silence from the primary longer than this ends the session.
    pub failure_timeout: Duration,
    /// The data dir, where fetched and forwarded content waits in `tmp/`.
    pub data: PathBuf,
}

/// What a follower's hello says.
#[derive(Clone, Debug)]
pub struct JoinHello {
    /// Our id, if we have one.
    pub id: Option<ServerId>,
    /// The IP we listen on, when bound to one.
    pub ip: Option<IpAddr>,
    /// The port we listen on.
    pub port: u16,
    /// The position of our last entry.
    pub pos: LogPos,
    /// Its epoch.
    pub last_epoch: Epoch,
    /// We count ourselves a member that may stand.
    pub member: bool,
}

/// The core's handle on a running follower session.
pub struct FollowerHandle {
    /// The session's number (events of older sessions are dropped).
    pub session: u64,
    out: Sender<Msg>,
    stop: Arc<AtomicBool>,
    stream: Arc<Mutex<Option<TcpStream>>>,
}

impl FollowerHandle {
    /// Queues a message for the primary.
    pub fn send(&self, msg: Msg) {
        let _ = self.out.send(msg);
    }

    /// Ends the session: its socket is shut, its thread ends quietly.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(s) = self.stream.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Starts a follower session; None when its thread cannot start (the core is
/// told the session is down).
pub fn start(
    session: u64,
    cfg: FollowConfig,
    hello: JoinHello,
    core: Sender<Event>,
    epoch: Arc<AtomicU64>,
    cluster: Arc<ClusterAuth>,
) -> Option<FollowerHandle> {
    let (out_tx, out_rx) = unbounded();
    let stop = Arc::new(AtomicBool::new(false));
    let stream = Arc::new(Mutex::new(None));
    let (s2, st2, core2) = (stop.clone(), stream.clone(), core.clone());
    let spawned = std::thread::Builder::new().name(format!("follower-{session}")).spawn(move || {
        let mut f = Follower {
            session,
            cfg,
            core: core2,
            epoch,
            stop: s2,
            stream: st2,
            xfers: HashMap::new(),
            fetcher: None,
            id: hello.id.unwrap_or_default(),
            target: String::new(),
            storage: false,
            cluster,
            key_mismatch: false,
            applying: VecDeque::new(),
        };
        let why = f.run(hello, out_rx);
        f.cleanup();
        if !f.stop.load(Ordering::SeqCst) {
            let storage = f.storage;
            let event =
                if f.key_mismatch { FollowerEvent::KeyMismatch { why } } else { FollowerEvent::Down { why, storage } };
            let _ = f.core.send(Event::Follower { session, event });
        }
    });
    match spawned {
        Ok(_) => Some(FollowerHandle { session, out: out_tx, stop, stream }),
        Err(e) => {
            let why = format!("cannot start a follower thread: {e}");
            let _ = core.send(Event::Follower { session, event: FollowerEvent::Down { why, storage: false } });
            None
        }
    }
}

/// Checks the names an entry would touch on disk: a backup does not rely on the
/// primary for its own confinement.
pub fn check_names(change: &Change) -> Result<(), String> {
    let check = |user: &str, paths: &[&str]| -> Result<(), String> {
        validate_username(user).map_err(|e| e.to_string())?;
        paths.iter().try_for_each(|p| validate_path(p).map_err(|e| e.to_string()))
    };
    match change {
        Change::Put { user, meta, .. } | Change::Delete { user, meta } => check(user, &[&meta.path]),
        Change::Rename { user, from, to } => check(user, &[&from.path, &to.path]),
        Change::Login { session } => check(&session.user, &[]),
        Change::Account { user, credentials } => {
            check(user, &[])?;
            credentials.validate().map_err(|e| e.to_string())
        }
        _ => Ok(()),
    }
}

use replibox_proto::names::is_transfer_name as valid_xfer;

/// A forwarded upload arriving on the link; its size is known only at its end.
struct Incoming {
    file: WriteBehind<File>,
    hash: Hasher,
    complete: bool,
}

struct Follower {
    session: u64,
    cfg: FollowConfig,
    core: Sender<Event>,
    epoch: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    stream: Arc<Mutex<Option<TcpStream>>>,
    xfers: HashMap<String, Incoming>,
    fetcher: Option<Fetcher>,
    id: ServerId,
    /// The primary's address, after redirects.
    target: String,
    /// The session ended because this server could not write what it received
    /// (its disk is full, say): it leaves, and joins again later.
    storage: bool,
    /// The key and this server's id, for the handshakes.
    cluster: Arc<ClusterAuth>,
    /// The session ended because the server reached does not hold our key.
    key_mismatch: bool,
    /// Entries handed to the core whose answer has not been read yet: the core
    /// answers once their group commit is durable, so that many entries share
    /// one fsync (see `store`'s group commit).
    applying: VecDeque<(LogPos, Receiver<Result<(), String>>)>,
}

/// The most entries a follower hands to its core before it waits for the oldest.
const APPLYING_MAX: usize = 128;

impl Follower {
    fn report(&self, event: FollowerEvent) -> Result<(), String> {
        self.core.send(Event::Follower { session: self.session, event }).map_err(|_| "the core stopped".to_string())
    }

    /// Reads the answers to applied entries until at most `keep` are outstanding
    /// (and any that already came); an entry the core could not apply ends the
    /// session.
    fn settle_applies(&mut self, keep: usize) -> Result<(), String> {
        while let Some((pos, rx)) = self.applying.front() {
            let answer = if self.applying.len() > keep {
                rx.recv().map_err(|_| format!("the core stopped before applying entry pos={pos}"))?
            } else {
                match rx.try_recv() {
                    Ok(a) => a,
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(_) => return Err(format!("the core stopped before applying entry pos={pos}")),
                }
            };
            self.applying.pop_front();
            answer?;
        }
        Ok(())
    }

    fn ask<T>(&self, make: impl FnOnce(Sender<T>) -> FollowerEvent) -> Result<T, String> {
        ask(&self.core, |reply| Event::Follower { session: self.session, event: make(reply) })
            .ok_or_else(|| "the core stopped".to_string())
    }

    /// Connects (following redirects), then serves the session until it ends;
    /// says why it ended.
    fn run(&mut self, hello: JoinHello, out_rx: Receiver<Msg>) -> String {
        match self.session(hello, out_rx) {
            Ok(()) => "stopped".into(),
            Err(why) => why,
        }
    }

    fn session(&mut self, hello: JoinHello, out_rx: Receiver<Msg>) -> Result<(), String> {
        let mut target = self.cfg.target.clone();
        let mut hops = 0;
        let (stream, first) = loop {
            // Nothing is sent or read before both sides have proven the key.
            let epoch = Epoch(self.epoch.load(Ordering::Relaxed));
            let timeout = self.cfg.failure_timeout.max(CONNECT_TIMEOUT);
            let (stream, _) = match cluster::connect(&self.cluster, hello.id, &target, Purpose::Link, epoch, timeout) {
                Ok(x) => x,
                Err(ConnectError::KeyMismatch(why)) => {
                    self.key_mismatch = true;
                    return Err(why);
                }
                Err(e) => return Err(e.to_string()),
            };
            *self.stream.lock().unwrap_or_else(|p| p.into_inner()) = stream.try_clone().ok();
            if self.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            let _ = stream.set_read_timeout(Some(self.cfg.failure_timeout));
            let who = Who::Server {
                id: hello.id,
                ip: hello.ip.map(|i| i.to_string()),
                port: hello.port,
                pos: hello.pos,
                last_epoch: hello.last_epoch,
                member: hello.member,
            };
            let mut w = &stream;
            write_frame(
                &mut w,
                Epoch(self.epoch.load(Ordering::Relaxed)),
                &Msg::Hello { version: PROTOCOL_VERSION, who },
                &[],
            )
            .map_err(|e| format!("cannot say hello to {target}: {e}"))?;
            let mut r = &stream;
            let first = match read_frame(&mut r) {
                Ok(Some(f)) => f,
                Ok(None) => return Err(format!("{target} closed the connection (it may know no primary yet)")),
                Err(e) => return Err(format!("no answer from {target}: {e}")),
            };
            if let Msg::Redirect { primary } = &first.msg {
                hops += 1;
                if hops > MAX_REDIRECTS {
                    return Err("too many redirects".into());
                }
                log::info!("following redirect from {target} to primary={primary}");
                target = primary.clone();
                continue;
            }
            break (stream, first);
        };
        self.target = target.clone();
        let snapshot = match first.msg {
            Msg::Joined { id, primary, snapshot, member } => {
                self.id = id;
                let event =
                    FollowerEvent::Joined { epoch: first.epoch, id, primary, addr: target.clone(), snapshot, member };
                self.report(event)?;
                snapshot
            }
            Msg::Refused { reason } => {
                self.report(FollowerEvent::Msg { epoch: first.epoch, msg: Msg::Refused { reason: reason.clone() } })?;
                return Err(format!("{target} refused this server: {reason}"));
            }
            Msg::NotPrimary { reason } => return Err(format!("{target} is not the primary: {reason}")),
            other => return Err(format!("unexpected {} answering our hello", other.kind())),
        };
        let writer = stream.try_clone().map_err(|e| format!("cannot clone the link's socket: {e}"))?;
        spawn_writer(self.session, writer, out_rx, self.epoch.clone());
        let mut reader = BufReader::with_capacity(256 * 1024, stream);
        if snapshot {
            self.install(&mut reader)?;
        }
        loop {
            let frame = self.next(&mut reader)?;
            self.handle(frame)?;
        }
    }

    fn next(&self, reader: &mut BufReader<TcpStream>) -> Result<Frame, String> {
        match read_frame(reader) {
            Ok(Some(f)) => Ok(f),
            Ok(None) => Err(format!("the primary at {} closed the link", self.target)),
            Err(e) if e.is_timeout() => {
                Err(format!("no word from the primary at {} for {:?}", self.target, self.cfg.failure_timeout))
            }
            Err(e) => Err(format!("the link to {} failed: {e}", self.target)),
        }
    }

    /// The snapshot, its install by the core, and the files this server lacks.
    fn install(&mut self, reader: &mut BufReader<TcpStream>) -> Result<(), String> {
        let mut bytes = Vec::new();
        let (epoch, pos) = loop {
            let f = self.next(reader)?;
            match f.msg {
                Msg::SnapshotChunk => bytes.extend_from_slice(&f.payload),
                Msg::SnapshotEnd { pos } => break (f.epoch, pos),
                Msg::Ping | Msg::Heartbeat { .. } => {}
                other => return Err(format!("unexpected {} inside the snapshot", other.kind())),
            }
        };
        let state: State = serde_json::from_slice(&bytes).map_err(|e| format!("bad snapshot: {e}"))?;
        drop(bytes);
        for (user, files) in &state.files {
            for path in files.keys() {
                let ok = validate_username(user).and_then(|_| validate_path(path));
                ok.map_err(|e| format!("refusing the primary's snapshot: {e}"))?;
            }
        }
        for (user, credentials) in &state.accounts {
            validate_username(user).map_err(|e| format!("refusing the primary's snapshot: {e}"))?;
            credentials.validate().map_err(|e| format!("refusing the primary's snapshot: account {user}: {e}"))?;
        }
        let needed =
            self.ask(|reply| FollowerEvent::Snapshot { epoch, state: Box::new(state), reply })?.map_err(|e| {
                // Writing the snapshot and clearing the log are this disk's work.
                self.storage = true;
                format!("cannot install the snapshot: {e}")
            })?;
        log::info!("installed the snapshot of {} at pos={pos}; fetching {} files", self.target, needed.len());
        let (mut placed, mut size) = (0, 0);
        let mut lacks = Vec::new();
        for (n, (user, meta)) in needed.iter().enumerate() {
            let xfer = format!("f{}-{}-{n}", std::process::id(), self.session);
            let ok = match self.fetch(user, &meta.path, &xfer)? {
                Some(got) => {
                    let bytes = got.size;
                    let ok = self
                        .ask(|reply| FollowerEvent::PlaceFetched { user: user.clone(), meta: got, xfer, reply })?
                        .map_err(|e| {
                            self.storage = true;
                            format!("cannot place a fetched file: {e}")
                        })?;
                    if ok {
                        size += bytes;
                    }
                    ok
                }
                None => false,
            };
            if ok {
                placed += 1;
            } else {
                // The primary moved this file on since the snapshot (a later entry
                // says how): never keep an older copy under its name.
                lacks.push((user.clone(), meta.path.clone()));
            }
        }
        log::info!("fetched {placed} of {} files ({size} bytes) for pos={pos}", needed.len());
        // Waited for: the entries that follow judge a rename's source by what is on
        // the disk, and an older copy of a lacking file must be gone by then.
        self.ask(|reply| FollowerEvent::Installed { lacks, reply })?
    }

    /// The forwarded upload `xfer`, its temporary file created at its first frame.
    fn incoming(&mut self, xfer: &str) -> Result<&mut Incoming, String> {
        if !self.xfers.contains_key(xfer) {
            if !valid_xfer(xfer) {
                return Err(format!("invalid transfer name {xfer:?}"));
            }
            let path = tmp_file(&self.cfg.data, xfer);
            let file = File::create(&path).map_err(|e| {
                self.storage = true;
                format!("cannot create {}: {e}", path.display())
            })?;
            self.xfers.insert(
                xfer.to_string(),
                Incoming { file: WriteBehind::new(file), hash: Hasher::new(), complete: false },
            );
        }
        self.xfers.get_mut(xfer).ok_or_else(|| format!("transfer {xfer} vanished"))
    }

    fn handle(&mut self, frame: Frame) -> Result<(), String> {
        let epoch = frame.epoch;
        match frame.msg {
            Msg::XferChunk { xfer } => {
                let inc = self.incoming(&xfer)?;
                inc.hash.update(&frame.payload);
                if let Err(e) = inc.file.write_all(&frame.payload) {
                    self.storage = true;
                    return Err(format!("cannot write transfer {xfer}: {e}"));
                }
            }
            Msg::XferEnd { xfer, size, hash } => {
                // Created here for an empty upload, which has no chunks.
                let inc = self.incoming(&xfer)?;
                let got = inc.hash.bytes_hashed();
                if got != size || inc.hash.finish() != hash {
                    log::warn!("transfer {xfer} arrived incomplete ({got} of {size} bytes); will fetch it");
                } else {
                    // Its bytes are synced with the group its entry joins
                    // (`Store::flush`), before the entry is acknowledged.
                    inc.complete = true;
                }
            }
            Msg::XferAbort { xfer } => {
                if self.xfers.remove(&xfer).is_some() {
                    let _ = std::fs::remove_file(tmp_file(&self.cfg.data, &xfer));
                }
            }
            Msg::Apply { entry } => {
                check_names(&entry.change)
                    .map_err(|e| format!("refusing entry pos={} from the primary: {e}", entry.pos))?;
                let mut lacking = None;
                // A folder has no content to wait for or fetch.
                let content = match &entry.change {
                    Change::Put { user, meta, xfer } if !meta.dir => Some((user, meta, xfer)),
                    _ => None,
                };
                if let Some((user, meta, xfer)) = content {
                    let ready = self.xfers.remove(xfer).is_some_and(|inc| inc.complete);
                    if !ready {
                        if !valid_xfer(xfer) {
                            return Err(format!("invalid transfer name {xfer:?}"));
                        }
                        // Entries before it may still wait for their group commit,
                        // and one may place a file of the same transfer name
                        // (every adopted file's is "adopted"): they go first.
                        self.settle_applies(0)?;
                        // The chunks never came (the upload began before this backup
                        // was live): fetch the content before applying.
                        let _ = std::fs::remove_file(tmp_file(&self.cfg.data, xfer));
                        let exact = self
                            .fetch(user, &meta.path, xfer)?
                            .is_some_and(|got| got.hash == meta.hash && got.size == meta.size);
                        if !exact {
                            // This version is gone from the primary (a later entry moved
                            // or replaced it): leave the path empty rather than stale.
                            let _ = std::fs::remove_file(tmp_file(&self.cfg.data, xfer));
                            lacking = Some((user.clone(), meta.path.clone()));
                        }
                    }
                }
                // A rename whose source this backup never received: fetch the
                // destination's content, to be placed once the entry is applied.
                let mut refetch = None;
                if let Change::Rename { user, from, to } = &entry.change {
                    // What earlier entries moved into place is on the disk once
                    // they are answered.
                    self.settle_applies(0)?;
                    // A file, as the store moves only a file: a folder left at
                    // that path (the file's content lacking) is not its source.
                    let source = user_file(&self.cfg.data, user, &from.path);
                    if !std::fs::symlink_metadata(&source).is_ok_and(|m| m.is_file()) {
                        let xfer = format!("r{}-{}-{}", std::process::id(), self.session, entry.pos);
                        match self.fetch(user, &to.path, &xfer)? {
                            Some(got) => refetch = Some((user.clone(), got, xfer)),
                            None => lacking = Some((user.clone(), to.path.clone())),
                        }
                    }
                }
                let pos = entry.pos;
                let (reply, answer) = crossbeam_channel::bounded(1);
                self.report(FollowerEvent::Apply { epoch, entry, refetch, lacking, reply })?;
                self.applying.push_back((pos, answer));
                self.settle_applies(APPLYING_MAX)?;
            }
            msg @ (Msg::Heartbeat { .. } | Msg::Ping | Msg::Refused { .. }) => {
                self.report(FollowerEvent::Msg { epoch, msg })?;
            }
            other => return Err(format!("unexpected {} on the replication link", other.kind())),
        }
        Ok(())
    }

    /// Fetches a user's file into temporary file `xfer`; None when the primary no
    /// longer holds it (a later entry will say what became of it).
    fn fetch(&mut self, user: &str, path: &str, xfer: &str) -> Result<Option<FileMeta>, String> {
        let dest = tmp_file(&self.cfg.data, xfer);
        // A kept fetch connection may have been closed by the primary while idle:
        // one fresh attempt before giving up on the session.
        for attempt in 0..2 {
            if self.fetcher.is_none() {
                let epoch = self.epoch.load(Ordering::Relaxed);
                let f = Fetcher::open(&self.cluster, &self.target, self.id, epoch, self.cfg.failure_timeout)?;
                self.fetcher = Some(f);
            }
            let Some(f) = self.fetcher.as_mut() else { return Err("no fetch connection".into()) };
            match f.fetch(user, path, &dest) {
                Ok(got) => return Ok(got),
                Err(FetchError::Local(e)) => {
                    // Another attempt would meet the same disk.
                    self.storage = true;
                    let _ = std::fs::remove_file(&dest);
                    return Err(e);
                }
                Err(FetchError::Remote(e)) => {
                    self.fetcher = None;
                    let _ = std::fs::remove_file(&dest);
                    if attempt == 1 {
                        return Err(e);
                    }
                }
            }
        }
        Err(format!("cannot fetch {path} of user {user}"))
    }

    fn cleanup(&mut self) {
        for (xfer, _) in self.xfers.drain() {
            let _ = std::fs::remove_file(tmp_file(&self.cfg.data, &xfer));
        }
        if let Some(s) = self.stream.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Writes what the core sends the primary (acks, caught-up) and a ping when there
/// has been nothing to say for a while, stamped with the current epoch; ends when
/// the session's handle is dropped or a write fails.
fn spawn_writer(session: u64, stream: TcpStream, out: Receiver<Msg>, epoch: Arc<AtomicU64>) {
    let spawned = std::thread::Builder::new().name(format!("follower-{session}-writer")).spawn(move || {
        let mut w = std::io::BufWriter::with_capacity(16 * 1024, &stream);
        loop {
            let msg = select! {
                recv(out) -> m => match m { Ok(m) => m, Err(_) => break },
                default(KEEPALIVE) => Msg::Ping,
            };
            if write_frame(&mut w, Epoch(epoch.load(Ordering::Relaxed)), &msg, &[]).is_err() {
                break;
            }
        }
        let _ = stream.shutdown(std::net::Shutdown::Both);
    });
    if let Err(e) = spawned {
        log::warn!("cannot start the follower's writer thread: {e}");
    }
}

/// A backup's connection for fetching file contents.
/// Why a fetch failed: this server's own disk, or the primary and the link.
enum FetchError {
    Local(String),
    Remote(String),
}

impl From<String> for FetchError {
    fn from(e: String) -> FetchError {
        FetchError::Remote(e)
    }
}

impl From<&str> for FetchError {
    fn from(e: &str) -> FetchError {
        FetchError::Remote(e.to_string())
    }
}

struct Fetcher {
    stream: BufReader<TcpStream>,
    out: TcpStream,
    epoch: u64,
}

impl Fetcher {
    fn open(
        cluster: &ClusterAuth,
        target: &str,
        id: ServerId,
        epoch: u64,
        timeout: Duration,
    ) -> Result<Fetcher, String> {
        let timeout = timeout.max(Duration::from_secs(5));
        let (stream, _) = cluster::connect(cluster, Some(id), target, Purpose::Fetch, Epoch(epoch), timeout)
            .map_err(|e| format!("cannot open a fetch connection: {e}"))?;
        let mut out = stream.try_clone().map_err(|e| e.to_string())?;
        write_frame(&mut out, Epoch(epoch), &Msg::Hello { version: PROTOCOL_VERSION, who: Who::Fetch { id } }, &[])
            .map_err(|e| format!("cannot open a fetch connection to {target}: {e}"))?;
        Ok(Fetcher { stream: BufReader::with_capacity(256 * 1024, stream), out, epoch })
    }

    fn fetch(&mut self, user: &str, path: &str, dest: &std::path::Path) -> Result<Option<FileMeta>, FetchError> {
        let broken = |e: ProtoError| format!("fetch of {path} of user {user} failed: {e}");
        write_frame(&mut self.out, Epoch(self.epoch), &Msg::Fetch { user: user.into(), path: path.into() }, &[])
            .map_err(broken)?;
        let first = read_frame(&mut self.stream).map_err(broken)?.ok_or("fetch connection closed")?;
        let meta = match first.msg {
            Msg::Reply { result: OpResult::Data { meta }, .. } => meta,
            Msg::Reply { result: OpResult::Gone { .. }, .. } => {
                log::info!("primary no longer has {path} of user {user}");
                return Ok(None);
            }
            // Anything else (a refusal, a read error) says nothing about the file:
            // keep what this server has and start the session again.
            Msg::Reply { result, .. } => {
                return Err(format!("the primary would not send {path} of user {user}: {result:?}").into())
            }
            other => return Err(format!("unexpected {} answering a fetch", other.kind()).into()),
        };
        let local = |what: &str, e: std::io::Error| FetchError::Local(format!("cannot {what} {}: {e}", dest.display()));
        let mut file = WriteBehind::new(File::create(dest).map_err(|e| local("create", e))?);
        let mut receipt = Receipt::of_version(meta.size, meta.hash);
        let damaged = |e: Damaged| format!("fetch of {path} of user {user} arrived damaged: {e}");
        loop {
            let f = read_frame(&mut self.stream).map_err(broken)?.ok_or("fetch connection closed")?;
            match f.msg {
                Msg::Chunk { .. } => {
                    receipt.add(&f.payload).map_err(damaged)?;
                    file.write_all(&f.payload).map_err(|e| local("write", e))?;
                }
                Msg::DownloadEnd { hash: sent, .. } => {
                    receipt.finish(sent).map_err(damaged)?;
                    sync_temp(file.get_ref()).map_err(|e| local("sync", e))?;
                    return Ok(Some(meta));
                }
                other => return Err(format!("unexpected {} during a fetch", other.kind()).into()),
            }
        }
    }
}
