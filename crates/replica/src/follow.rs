//! Both ends of a replication link.
//!
//! Primary side ([`serve_link`]): a joining server's connection is handed to the
//! core (which queues the snapshot and every later entry on the link) and then
//! read for the backup's acknowledgements.
//!
//! Backup side ([`follow`]): the follower thread joins through the address given
//! with `-b` (following a redirect to the primary), installs the snapshot, fetches
//! the files it lacks or holds at an older version, says it has caught up, then
//! applies the live stream in order: forwarded upload chunks go to temporary files
//! as they arrive; an entry is applied once its content is durable (fetched from
//! the primary when the chunks did not come, e.g. for an upload already under way
//! when this backup joined), and acknowledged after it is applied.

use crate::conn::{Ctx, FrameWriter};
use crate::core::{ask, Event, NewLink, Route};
use crate::link::{self, LinkOut, DATA_QUEUE};
use crate::state::{Change, State};
use crate::store::{tmp_file, user_file};
use crossbeam_channel::{bounded, unbounded, Sender};
use replibox_proto::{
    read_frame, validate_path, validate_username, write_frame, Damaged, Epoch, FileMeta, Frame, Hasher, Msg, OpResult,
    ProtoError, Receipt, Seq, ServerId, Who, PROTOCOL_VERSION,
};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Primary side: serves a server that said hello as a joining backup.
#[allow(clippy::too_many_arguments)]
pub fn serve_link(
    stream: TcpStream,
    writer: FrameWriter,
    ctx: Ctx,
    id: Option<ServerId>,
    ip: Option<String>,
    port: u16,
    seq: Seq,
    peer: String,
) {
    match ask(&ctx.core, |reply| Event::Route { reply }) {
        Some(Route::Here) => {}
        Some(Route::At(primary)) => {
            log::info!("redirecting joining server peer={peer} to primary={primary}");
            let _ = writer.send(&Msg::Redirect { primary }, &[]);
            return;
        }
        Some(Route::Unknown) | None => {
            // Not a refusal (which would make the joiner give up): close, and the
            // joiner tries again until this backup knows where the primary is.
            log::info!("closing join from peer={peer}: this backup does not know the primary yet");
            return;
        }
    }
    drop(writer);
    let no = ctx.links.fetch_add(1, Ordering::Relaxed) + 1;
    let (Ok(peer_addr), Ok(local)) = (stream.peer_addr(), stream.local_addr()) else { return };
    let ip = ip.and_then(|s| s.parse::<IpAddr>().ok()).filter(|i| !i.is_unspecified()).unwrap_or(peer_addr.ip());
    let addr = SocketAddr::new(ip, port).to_string();
    let (ctl_tx, ctl_rx) = unbounded();
    let (data_tx, data_rx) = bounded(DATA_QUEUE);
    let (Ok(write_half), Ok(shut_half)) = (stream.try_clone(), stream.try_clone()) else { return };
    let epoch = ctx.epoch.clone();
    let label = addr.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("link-{no}-writer"))
        .spawn(move || link::writer(write_half, ctl_rx, data_rx, epoch, label));
    if spawned.is_err() {
        return;
    }
    let link = NewLink {
        id,
        addr: addr.clone(),
        local_ip: local.ip(),
        peer_ip: peer_addr.ip(),
        no,
        ctl: ctl_tx.clone(),
        data: data_tx,
        stream: shut_half,
    };
    let id = match ask(&ctx.core, |reply| Event::Join { link, reply }) {
        Some(Ok(id)) => id,
        Some(Err(reason)) => {
            log::warn!("refused joining server peer={peer} addr={addr}: {reason}");
            let _ = ctl_tx.send(LinkOut::msg(Msg::Refused { reason }));
            return;
        }
        None => return,
    };
    drop(ctl_tx);
    log::info!("replication link up id={id} addr={addr} their_seq={seq}");
    // A joining backup may fetch files for a long while before it acks anything,
    // but it pings every second (KEEPALIVE); once caught up, its heartbeat acks
    // pace it and the ack bound applies.
    let _ = stream.set_read_timeout(Some(ctx.ack_timeout.max(JOINING_SILENCE)));
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let why = loop {
        let frame = match read_frame(&mut reader) {
            Ok(Some(f)) => f,
            Ok(None) => break "closed by the backup".to_string(),
            Err(e) if e.is_timeout() => {
                let silence = reader.get_ref().read_timeout().ok().flatten().unwrap_or(ctx.ack_timeout);
                break format!("silent for {silence:?}");
            }
            Err(e) => break e.to_string(),
        };
        let ours = ctx.epoch.load(Ordering::Relaxed);
        // A joiner pings with its old epoch until it has installed the snapshot.
        if frame.epoch.0 < ours && frame.msg != Msg::Ping {
            log::warn!(
                "dropping {} from backup id={id} with stale epoch={} (ours is {ours})",
                frame.msg.kind(),
                frame.epoch
            );
            continue;
        }
        let event = match frame.msg {
            Msg::Ack { seq } => Event::Ack { no, id, seq },
            Msg::CaughtUp { seq } => {
                // From now on a silent backup is a stalled one: its acks of the
                // heartbeats stop.
                let _ = reader.get_ref().set_read_timeout(Some(ctx.ack_timeout.max(Duration::from_millis(200))));
                Event::CaughtUp { no, id, seq }
            }
            Msg::Ping => continue,
            other => break format!("unexpected {} from the backup", other.kind()),
        };
        if ctx.core.send(event).is_err() {
            return;
        }
    };
    let _ = ctx.core.send(Event::LinkDown { no, id, why });
}

/// How a backup follows its primary.
#[derive(Clone, Debug)]
pub struct FollowConfig {
    /// `HOST:PORT` given with `-b`.
    pub join: String,
    /// The IP this server listens on, when bound to one.
    pub ip: Option<IpAddr>,
    /// The port this server listens on.
    pub port: u16,
    /// The id from `--id` or the data dir.
    pub id: Option<ServerId>,
    /// Silence from the primary longer than this means the link is lost.
    pub failure_timeout: Duration,
    /// The data dir, where fetched and forwarded content waits in `tmp/`.
    pub data: PathBuf,
}

enum Stop {
    /// Go to that server instead.
    Redirect(String),
    /// Refused for good (a duplicate id): the server must stop.
    Fatal(String),
    /// Lost or failed: try again.
    Retry(String),
}

impl From<ProtoError> for Stop {
    fn from(e: ProtoError) -> Self {
        Stop::Retry(e.to_string())
    }
}

fn connect(addr: &str, timeout: Duration) -> Result<TcpStream, Stop> {
    let sock = addr
        .to_socket_addrs()
        .map_err(|e| Stop::Retry(format!("cannot resolve {addr}: {e}")))?
        .next()
        .ok_or_else(|| Stop::Retry(format!("cannot resolve {addr}")))?;
    let s = TcpStream::connect_timeout(&sock, timeout).map_err(|e| Stop::Retry(format!("cannot reach {addr}: {e}")))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Backup side: follows the primary for as long as the process runs.
pub fn follow(cfg: FollowConfig, core: Sender<Event>, epoch: Arc<AtomicU64>) {
    let mut target = cfg.join.clone();
    let mut id = cfg.id;
    let mut failures = 0u32;
    loop {
        let (stop, joined) = session(&cfg, &core, &epoch, &target, &mut id);
        if joined {
            failures = 0;
        }
        match stop {
            Stop::Redirect(primary) => {
                log::info!("following redirect to primary={primary}");
                target = primary;
            }
            Stop::Fatal(reason) => {
                log::error!("cannot join the cluster: {reason}");
                eprintln!("replibox-server: cannot join the cluster through {target}: {reason}");
                std::process::exit(1);
            }
            Stop::Retry(why) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(20) {
                    log::warn!("not following a primary (via {target}): {why}; retrying");
                }
                // After a few failures at a primary learnt from a redirect, go back
                // to the address given on the command line.
                if failures.is_multiple_of(5) {
                    target = cfg.join.clone();
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// One connection to the primary, from hello to its end; says how it ended and
/// whether the primary accepted this server on the way.
fn session(
    cfg: &FollowConfig,
    core: &Sender<Event>,
    epoch: &Arc<AtomicU64>,
    target: &str,
    id: &mut Option<ServerId>,
) -> (Stop, bool) {
    let stream = match connect(target, Duration::from_secs(2)) {
        Ok(s) => s,
        Err(stop) => return (stop, false),
    };
    let seq = ask(core, |reply| Event::LastSeq { reply }).unwrap_or_default();
    let Ok(mut out) = stream.try_clone() else { return (Stop::Retry("cannot clone socket".into()), false) };
    let _ = stream.set_read_timeout(Some(cfg.failure_timeout));
    let hello = Msg::Hello {
        version: PROTOCOL_VERSION,
        who: Who::Server {
            id: *id,
            ip: cfg.ip.filter(|i| !i.is_unspecified()).map(|i| i.to_string()),
            port: cfg.port,
            seq,
        },
    };
    if let Err(e) = write_frame(&mut out, Epoch(epoch.load(Ordering::Relaxed)), &hello, &[]) {
        return (Stop::Retry(e.to_string()), false);
    }
    let mut reader = BufReader::with_capacity(256 * 1024, stream);
    let out = Arc::new(Mutex::new(out));
    let keepalive = keepalive(out.clone(), epoch.clone());
    let mut follower = Follower {
        cfg,
        core,
        epoch,
        out,
        target: target.to_string(),
        fetcher: None,
        xfers: HashMap::new(),
        joined: false,
        id: ServerId::default(),
        missing: Default::default(),
        complete: Seq(0),
        acked: Seq(0),
        keepalive: keepalive.clone(),
        marked: false,
    };
    let stop = follower.run(&mut reader, id);
    follower.cleanup();
    keepalive.store(true, Ordering::Relaxed);
    let _ = follower.out.lock().unwrap_or_else(|p| p.into_inner()).shutdown(std::net::Shutdown::Both);
    (stop, follower.joined)
}

/// How often a backup pings its primary, whatever else it is doing (a long fetch
/// while joining, say), so that the primary can time out every read on the link.
const KEEPALIVE: Duration = Duration::from_secs(1);
/// How long the primary lets a joining backup's link stay silent.
const JOINING_SILENCE: Duration = Duration::from_secs(10);

/// Pings on `out` every [`KEEPALIVE`] until the returned flag is set.
fn keepalive(out: Arc<Mutex<TcpStream>>, epoch: Arc<AtomicU64>) -> Arc<std::sync::atomic::AtomicBool> {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let spawned = std::thread::Builder::new().name("follower-keepalive".into()).spawn(move || loop {
        std::thread::sleep(KEEPALIVE);
        if flag.load(Ordering::Relaxed) {
            return;
        }
        // The epoch changes when the snapshot is installed: stamp the current one.
        let now = Epoch(epoch.load(Ordering::Relaxed));
        let mut s = out.lock().unwrap_or_else(|p| p.into_inner());
        if write_frame(&mut *s, now, &Msg::Ping, &[]).is_err() {
            return;
        }
    });
    if let Err(e) = spawned {
        log::warn!("cannot start the keep-alive thread: {e}");
    }
    stop
}

/// A forwarded upload arriving on the link; its size is known only at its end.
struct Incoming {
    file: File,
    hash: Hasher,
    complete: bool,
}

struct Follower<'a> {
    cfg: &'a FollowConfig,
    core: &'a Sender<Event>,
    epoch: &'a AtomicU64,
    /// The link's write side, shared with the keep-alive thread.
    out: Arc<Mutex<TcpStream>>,
    target: String,
    fetcher: Option<Fetcher>,
    xfers: HashMap<String, Incoming>,
    /// This session has caught up (sent `CaughtUp`).
    joined: bool,
    /// Paths whose content this server lacks for the version its state describes;
    /// acks are held while any remain.
    missing: std::collections::BTreeSet<(String, String)>,
    /// The last entry applied.
    complete: Seq,
    /// The last seq acknowledged: every entry up to it is here with its content.
    acked: Seq,
    /// A live-phase lack marked the data dir incomplete.
    marked: bool,
    /// Stops the keep-alive thread (once caught up, heartbeat acks pace the link).
    keepalive: Arc<std::sync::atomic::AtomicBool>,
    /// Our id, once the primary accepted us.
    id: ServerId,
}

/// Checks the names an entry would touch on disk: a backup does not rely on the
/// primary for its own confinement.
fn check_names(change: &Change) -> Result<(), String> {
    let check = |user: &str, paths: &[&str]| -> Result<(), String> {
        validate_username(user).map_err(|e| e.to_string())?;
        paths.iter().try_for_each(|p| validate_path(p).map_err(|e| e.to_string()))
    };
    match change {
        Change::Put { user, meta, .. } | Change::Delete { user, meta } => check(user, &[&meta.path]),
        Change::Rename { user, from, to } => check(user, &[&from.path, &to.path]),
        Change::Login { session } => check(&session.user, &[]),
        _ => Ok(()),
    }
}

fn valid_xfer(xfer: &str) -> bool {
    !xfer.is_empty() && xfer.len() <= 128 && xfer.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Follower<'_> {
    fn send(&mut self, msg: &Msg) -> Result<(), Stop> {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        write_frame(&mut *out, Epoch(self.epoch.load(Ordering::Relaxed)), msg, &[]).map_err(Stop::from)
    }

    fn next(&self, reader: &mut BufReader<TcpStream>) -> Result<Frame, Stop> {
        loop {
            match read_frame(reader) {
                Ok(Some(f)) => {
                    let mine = self.epoch.load(Ordering::Relaxed);
                    if f.epoch.0 < mine {
                        log::warn!(
                            "dropping {} from {} with stale epoch={} (ours is {mine})",
                            f.msg.kind(),
                            self.target,
                            f.epoch
                        );
                        continue;
                    }
                    return Ok(f);
                }
                Ok(None) => return Err(Stop::Retry("the primary closed the link".into())),
                Err(e) if e.is_timeout() => {
                    return Err(Stop::Retry(format!("no word from the primary for {:?}", self.cfg.failure_timeout)))
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn run(&mut self, reader: &mut BufReader<TcpStream>, id: &mut Option<ServerId>) -> Stop {
        match self.join(reader, id) {
            Ok(()) => {}
            Err(stop) => return stop,
        }
        loop {
            let frame = match self.next(reader) {
                Ok(f) => f,
                Err(stop) => return stop,
            };
            if let Err(stop) = self.handle(frame) {
                return stop;
            }
        }
    }

    /// Hello's answer, the snapshot, and the files this server lacks.
    fn join(&mut self, reader: &mut BufReader<TcpStream>, id: &mut Option<ServerId>) -> Result<(), Stop> {
        let first = self.next(reader)?;
        let primary_epoch = first.epoch;
        let (my_id, primary) = match first.msg {
            Msg::Redirect { primary } => return Err(Stop::Redirect(primary)),
            Msg::Refused { reason } => return Err(Stop::Fatal(reason)),
            Msg::Joined { id, primary } => (id, primary),
            other => return Err(Stop::Retry(format!("unexpected {} answering our hello", other.kind()))),
        };
        let mine = self.epoch.load(Ordering::Relaxed);
        if primary_epoch.0 < mine {
            return Err(Stop::Retry(format!(
                "the server at {} is primary of epoch {primary_epoch}, older than ours ({mine}); not following it",
                self.target
            )));
        }
        *id = Some(my_id);
        self.id = my_id;
        let _ = self.core.send(Event::Joined { id: my_id });
        let _ = self.core.send(Event::PrimaryAt { addr: self.target.clone() });
        let mut snapshot = Vec::new();
        let snap_seq = loop {
            let f = self.next(reader)?;
            match f.msg {
                Msg::SnapshotChunk => snapshot.extend_from_slice(&f.payload),
                Msg::SnapshotEnd { seq } => break seq,
                other => return Err(Stop::Retry(format!("unexpected {} inside the snapshot", other.kind()))),
            }
        };
        let state: State = serde_json::from_slice(&snapshot).map_err(|e| Stop::Retry(format!("bad snapshot: {e}")))?;
        for (user, files) in &state.files {
            for path in files.keys() {
                let ok = validate_username(user).and_then(|_| validate_path(path));
                ok.map_err(|e| Stop::Retry(format!("refusing the primary's snapshot: {e}")))?;
            }
        }
        drop(snapshot);
        let needed = ask(self.core, |reply| Event::Install { state: Box::new(state), reply })
            .ok_or_else(|| Stop::Retry("core stopped".into()))?
            .map_err(|e| Stop::Retry(format!("cannot install the snapshot: {e}")))?;
        log::info!(
            "joined primary id={primary} at {} as id={my_id}; snapshot seq={snap_seq}; fetching {} files",
            self.target,
            needed.len()
        );
        let (mut placed, mut bytes) = (0, 0);
        for (n, (user, meta)) in needed.iter().enumerate() {
            let xfer = format!("f{}-{n}", std::process::id());
            let ok = match self.fetch(user, &meta.path, &xfer)? {
                Some(got) => {
                    let size = got.size;
                    let ok = self.place(user.clone(), got, xfer)?;
                    if ok {
                        bytes += size;
                    }
                    ok
                }
                None => false,
            };
            if ok {
                placed += 1;
            } else {
                // The primary has moved this file on since the snapshot (a later
                // entry says how): never keep an older copy under its name.
                self.lack(user, &meta.path);
            }
        }
        log::info!("fetched {placed} of {} files ({bytes} bytes) for seq={snap_seq}", needed.len());
        self.complete = snap_seq;
        self.maybe_caught_up()
    }

    /// Has the core put a fetched file in place; false when it is not the content
    /// the state expects (the primary has moved on).
    fn place(&self, user: String, meta: FileMeta, xfer: String) -> Result<bool, Stop> {
        ask(self.core, |reply| Event::PlaceFetched { user, meta, xfer, reply })
            .ok_or_else(|| Stop::Retry("core stopped".into()))?
            .map_err(|e| Stop::Retry(format!("cannot place a fetched file: {e}")))
    }

    /// This server lacks the content its state describes at `path`: it removes any
    /// older copy (a stale file must never be renamed into place later), marks the
    /// data dir incomplete, and holds its acks until an entry resolves the path.
    fn lack(&mut self, user: &str, path: &str) {
        log::info!("dropping local copy of user={user} path={path}: the primary no longer has that version");
        let _ = ask(self.core, |reply| Event::DropContent { user: user.into(), path: path.into(), reply });
        if self.joined && !self.marked {
            // Joining, the install already marked the data dir; live, mark it now.
            let _ = ask(self.core, |reply| Event::MarkIncomplete { reply });
            self.marked = true;
        }
        self.missing.insert((user.to_string(), path.to_string()));
    }

    /// Acknowledges (and, the first time, reports caught up) once nothing is
    /// missing: an ack promises the content of every entry up to it.
    fn maybe_caught_up(&mut self) -> Result<(), Stop> {
        if !self.missing.is_empty() {
            log::info!("holding acks at seq={}: {} files await a later entry", self.acked, self.missing.len());
            return Ok(());
        }
        self.acked = self.complete;
        if !self.joined {
            let _ = ask(self.core, |reply| Event::JoinComplete { reply });
            self.send(&Msg::CaughtUp { seq: self.acked })?;
            log::info!("caught up to seq={}", self.acked);
            self.joined = true;
            // From now on the heartbeat acks pace the link.
            self.keepalive.store(true, Ordering::Relaxed);
            Ok(())
        } else {
            if self.marked {
                let _ = ask(self.core, |reply| Event::JoinComplete { reply });
                self.marked = false;
            }
            self.send(&Msg::Ack { seq: self.acked })
        }
    }

    /// The forwarded upload `xfer`, its temporary file created at its first frame.
    fn incoming(&mut self, xfer: &str) -> Result<&mut Incoming, Stop> {
        if !self.xfers.contains_key(xfer) {
            if !valid_xfer(xfer) {
                return Err(Stop::Retry(format!("invalid transfer name {xfer:?}")));
            }
            let path = tmp_file(&self.cfg.data, xfer);
            let file =
                File::create(&path).map_err(|e| Stop::Retry(format!("cannot create {}: {e}", path.display())))?;
            let fresh = Incoming { file, hash: Hasher::new(), complete: false };
            self.xfers.insert(xfer.to_string(), fresh);
        }
        self.xfers.get_mut(xfer).ok_or_else(|| Stop::Retry(format!("transfer {xfer} vanished")))
    }

    fn handle(&mut self, frame: Frame) -> Result<(), Stop> {
        match frame.msg {
            Msg::XferChunk { xfer } => {
                let inc = self.incoming(&xfer)?;
                inc.hash.update(&frame.payload);
                inc.file
                    .write_all(&frame.payload)
                    .map_err(|e| Stop::Retry(format!("cannot write transfer {xfer}: {e}")))?;
            }
            Msg::XferEnd { xfer, size, hash } => {
                // Created here for an empty upload, which has no chunks.
                let inc = self.incoming(&xfer)?;
                let got = inc.hash.bytes_hashed();
                if got == size && inc.hash.finish() == hash && inc.file.sync_all().is_ok() {
                    inc.complete = true;
                } else {
                    log::warn!("transfer {xfer} arrived incomplete ({got} of {size} bytes); will fetch it");
                }
            }
            Msg::XferAbort { xfer } => {
                if self.xfers.remove(&xfer).is_some() {
                    let _ = std::fs::remove_file(tmp_file(&self.cfg.data, &xfer));
                }
            }
            Msg::Apply { entry } => {
                if let Err(e) = check_names(&entry.change) {
                    return Err(Stop::Retry(format!("refusing entry seq={} from the primary: {e}", entry.seq)));
                }
                let mut lacking = None;
                if let Change::Put { user, meta, xfer } = &entry.change {
                    let ready = self.xfers.remove(xfer).is_some_and(|inc| inc.complete);
                    if !ready {
                        if !valid_xfer(xfer) {
                            return Err(Stop::Retry(format!("invalid transfer name {xfer:?}")));
                        }
                        // The chunks never came (the upload began before this backup
                        // was live): fetch the content before applying.
                        let _ = std::fs::remove_file(tmp_file(&self.cfg.data, xfer));
                        let exact = self
                            .fetch(user, &meta.path, xfer)?
                            .is_some_and(|got| got.hash == meta.hash && got.size == meta.size);
                        if !exact {
                            // This version is gone from the primary (a later entry moved
                            // or replaced it): leave the path empty rather than stale, so
                            // that a later rename of it fetches the content it names.
                            let _ = std::fs::remove_file(tmp_file(&self.cfg.data, xfer));
                            lacking = Some((user.clone(), meta.path.clone()));
                        }
                    }
                }
                // A rename whose source this backup never received (its content was
                // to be fetched, but the primary had already moved it on): fetch the
                // destination's content, to be placed once the entry is applied.
                let mut refetched = None;
                let mut source_missing = false;
                if let Change::Rename { user, from, to } = &entry.change {
                    source_missing = !user_file(&self.cfg.data, user, &from.path).exists();
                    if source_missing {
                        let xfer = format!("r{}-{}", std::process::id(), entry.seq);
                        if let Some(got) = self.fetch(user, &to.path, &xfer)? {
                            refetched = Some((user.clone(), got, xfer));
                        }
                    }
                }
                let seq = entry.seq;
                let change = entry.change.clone();
                match ask(self.core, |reply| Event::Apply { entry: *entry, reply }) {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(Stop::Retry(format!("cannot apply entry seq={seq}: {e}"))),
                    None => return Err(Stop::Retry("core stopped".into())),
                }
                // What this entry settles: a path it puts (with its content), deletes
                // or renames away is no longer missing.
                match &change {
                    Change::Put { user, meta, .. } | Change::Delete { user, meta } => {
                        self.missing.remove(&(user.clone(), meta.path.clone()));
                    }
                    Change::Rename { user, from, .. } => {
                        self.missing.remove(&(user.clone(), from.path.clone()));
                    }
                    _ => {}
                }
                if let Some((user, path)) = lacking {
                    self.lack(&user, &path);
                }
                if let Change::Rename { user, to, .. } = &change {
                    // The destination's content came by fetch (its source was missing
                    // here): placed, or else lacking too.
                    let placed = match refetched {
                        Some((user, meta, xfer)) => self.place(user, meta, xfer)?,
                        None => !source_missing,
                    };
                    if !placed {
                        self.lack(user, &to.path);
                    }
                }
                self.complete = seq;
                self.maybe_caught_up()?;
            }
            Msg::Heartbeat { .. } => {
                let seq = self.acked;
                self.send(&Msg::Ack { seq })?;
            }
            other => return Err(Stop::Retry(format!("unexpected {} on the replication link", other.kind()))),
        }
        Ok(())
    }

    /// Fetches a user's file into temporary file `xfer`; None when the primary no
    /// longer holds it (a later entry will say what became of it).
    fn fetch(&mut self, user: &str, path: &str, xfer: &str) -> Result<Option<FileMeta>, Stop> {
        let dest = tmp_file(&self.cfg.data, xfer);
        // A kept fetch connection may have been closed by the primary while idle:
        // one fresh attempt before giving up on the session.
        for attempt in 0..2 {
            if self.fetcher.is_none() {
                let epoch = self.epoch.load(Ordering::Relaxed);
                self.fetcher = Some(Fetcher::open(&self.target, self.id, epoch, self.cfg.failure_timeout)?);
            }
            let Some(f) = self.fetcher.as_mut() else { return Err(Stop::Retry("no fetch connection".into())) };
            match f.fetch(user, path, &dest) {
                Ok(got) => return Ok(got),
                Err(e) => {
                    self.fetcher = None;
                    let _ = std::fs::remove_file(&dest);
                    if attempt == 1 {
                        return Err(e);
                    }
                }
            }
        }
        Err(Stop::Retry(format!("cannot fetch {path} of user {user}")))
    }

    fn cleanup(&mut self) {
        for (xfer, _) in self.xfers.drain() {
            let _ = std::fs::remove_file(tmp_file(&self.cfg.data, &xfer));
        }
    }
}

/// A backup's connection for fetching file contents.
struct Fetcher {
    stream: BufReader<TcpStream>,
    out: TcpStream,
    epoch: u64,
}

impl Fetcher {
    fn open(target: &str, id: ServerId, epoch: u64, timeout: Duration) -> Result<Fetcher, Stop> {
        let stream = connect(target, Duration::from_secs(2))?;
        let _ = stream.set_read_timeout(Some(timeout.max(Duration::from_secs(5))));
        let mut out = stream.try_clone().map_err(|e| Stop::Retry(e.to_string()))?;
        write_frame(&mut out, Epoch(epoch), &Msg::Hello { version: PROTOCOL_VERSION, who: Who::Fetch { id } }, &[])?;
        Ok(Fetcher { stream: BufReader::with_capacity(256 * 1024, stream), out, epoch })
    }

    fn fetch(&mut self, user: &str, path: &str, dest: &std::path::Path) -> Result<Option<FileMeta>, Stop> {
        write_frame(&mut self.out, Epoch(self.epoch), &Msg::Fetch { user: user.into(), path: path.into() }, &[])?;
        let first = read_frame(&mut self.stream)?.ok_or_else(|| Stop::Retry("fetch connection closed".into()))?;
        let meta = match first.msg {
            Msg::Reply { result: OpResult::Data { meta }, .. } => meta,
            Msg::Reply { result: OpResult::Gone { .. }, .. } => {
                log::info!("primary no longer has {path} of user {user}");
                return Ok(None);
            }
            // Anything else (a refusal, a read error) says nothing about the file:
            // keep what this server has and try the whole session again.
            Msg::Reply { result, .. } => {
                return Err(Stop::Retry(format!("the primary would not send {path} of user {user}: {result:?}")))
            }
            other => return Err(Stop::Retry(format!("unexpected {} answering a fetch", other.kind()))),
        };
        let mut file = File::create(dest).map_err(|e| Stop::Retry(format!("cannot create {}: {e}", dest.display())))?;
        let mut receipt = Receipt::of_version(meta.size, meta.hash);
        let damaged = |e: Damaged| Stop::Retry(format!("fetch of {path} of user {user} arrived damaged: {e}"));
        loop {
            let f = read_frame(&mut self.stream)?.ok_or_else(|| Stop::Retry("fetch connection closed".into()))?;
            match f.msg {
                Msg::Chunk { .. } => {
                    receipt.add(&f.payload).map_err(damaged)?;
                    file.write_all(&f.payload)
                        .map_err(|e| Stop::Retry(format!("cannot write {}: {e}", dest.display())))?;
                }
                Msg::DownloadEnd { hash: sent, .. } => {
                    receipt.finish(sent).map_err(damaged)?;
                    file.sync_all().map_err(|e| Stop::Retry(format!("cannot sync {}: {e}", dest.display())))?;
                    return Ok(Some(meta));
                }
                other => return Err(Stop::Retry(format!("unexpected {} during a fetch", other.kind()))),
            }
        }
    }
}
