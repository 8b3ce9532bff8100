//! The client side of the connection to the replibox primary.
//!
//! # Layout
//! - [`Frontend`]: connect, requests (list, delete, rename, upload, download),
//!   reconnection and resend.
//! - [`FrontEvent`]: what the front-end tells the sync engine (pushed notices,
//!   connection lost and regained).
//! - [`FrontError`]: why a request could not be answered.
//!
//! Threads: a reader per connection (routes replies to the one waiting request,
//! notices to the event channel), a keep-alive per connection, a reconnector that
//! runs while the server is unreachable, and the callback listener: after a
//! failover the new primary connects to it, proves that it holds the session's
//! token, and the connection becomes the session. The client never holds a list
//! of servers: it learns of a new primary only from the primary that calls it
//! (or from the server on its command line, which may redirect it).

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use replibox_proto::auth::{callback::verify_callback_proof, fresh_nonce, AuthMsg};
use replibox_proto::{
    read_frame, write_frame, Damaged, DeviceId, Epoch, FileMeta, Frame, Hasher, Msg, Notice, Op, OpResult, Receipt,
    Seq, Version, Who, CHUNK_SIZE, PROTOCOL_VERSION,
};
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How often an idle connection is pinged.
const PING_EVERY: Duration = Duration::from_secs(3);
/// How long the server may stay silent before the connection is considered dead.
const READ_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How many redirects a login follows before giving up.
const MAX_REDIRECTS: usize = 4;
/// How long a caller on the callback port has for its whole handshake.
const CALLBACK_TIMEOUT: Duration = Duration::from_secs(5);
/// The first and the longest pause between two attempts to reach the server on
/// the command line again: it grows twofold after each failure.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Where and as whom to connect.
#[derive(Clone, Debug)]
pub struct Config {
    /// The user.
    pub user: String,
    /// This device.
    pub device: DeviceId,
    /// `HOST:PORT` of the server given on the command line.
    pub server: String,
    /// Local address to connect from, and to listen on for a new primary's call.
    pub bind: Option<IpAddr>,
    /// The port to listen on for a new primary's call (0: any free port); the
    /// port actually taken is announced at login.
    pub callback_port: u16,
    /// How long a request waits for a primary (the lost one back, or a new one
    /// calling) before it fails; local changes stay to be sent later.
    pub failover_wait: Duration,
}

/// Why a request was not answered.
#[derive(Debug, Clone, PartialEq)]
pub enum FrontError {
    /// The server refused the login (third device, bad username, ...).
    Refused(String),
    /// The server could not be reached within the bound.
    Unavailable(String),
    /// The local source of an upload or destination of a download failed.
    Local(String),
    /// The server broke the protocol.
    Protocol(String),
}

impl fmt::Display for FrontError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrontError::Refused(r) => write!(f, "the server refused the login: {r}"),
            FrontError::Unavailable(r) => write!(f, "the server is unavailable: {r}"),
            FrontError::Local(r) => f.write_str(r),
            FrontError::Protocol(r) => write!(f, "protocol error: {r}"),
        }
    }
}

impl std::error::Error for FrontError {}

/// What the front-end tells the sync engine.
#[derive(Debug, Clone, PartialEq)]
pub enum FrontEvent {
    /// Another device changed something.
    Notice(Notice),
    /// The connection dropped; requests wait for it to come back.
    Lost(String),
    /// The session goes on after a loss; notices may have been missed meanwhile.
    Reconnected {
        /// The primary it goes on with (`IP:PORT`).
        server: String,
        /// That primary's epoch.
        epoch: u64,
        /// How long the session was without a primary.
        after: Duration,
        /// A new primary called this client back (a failover); otherwise the
        /// client logged in again at the address it was given.
        callback: bool,
    },
    /// No primary came back within the failover wait; requests fail until one
    /// does (the sync engine keeps the local changes to send then).
    NoPrimary {
        /// How long it has been.
        waited: Duration,
    },
}

/// Outcome of one attempt on one connection.
enum Attempt<T> {
    Done(T),
    /// The connection died: resend on the next one.
    Lost(String),
}

/// One live connection.
struct Conn {
    writer: Arc<Mutex<TcpStream>>,
    replies: Receiver<Frame>,
    generation: u64,
}

impl Conn {
    fn send(&self, msg: &Msg, payload: &[u8]) -> Result<(), String> {
        let mut s = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        write_frame(&mut *s, Epoch(0), msg, payload).map_err(|e| e.to_string())
    }

    fn recv(&self) -> Result<Frame, String> {
        // The reader thread times out reads itself; a closed channel means it ended.
        self.replies.recv().map_err(|_| "connection closed".to_string())
    }
}

struct Shared {
    cfg: Config,
    /// The session's secret, which a new primary proves it holds.
    token: Mutex<String>,
    /// The highest epoch heard from a server: a caller must come from a later one.
    epoch: AtomicU64,
    /// The primary the session is with (or was, while lost).
    server: Mutex<String>,
    /// When the current loss began.
    lost_at: Mutex<Option<Instant>>,
    /// The port the callback listener took.
    callback_port: u16,
    /// The live connection, or None while the server is unreachable.
    conn: Mutex<Option<Arc<Conn>>>,
    changed: Condvar,
    /// Serialises requests: one on the wire at a time, in order.
    turn: Mutex<Seq>,
    events: Sender<FrontEvent>,
    generation: Mutex<u64>,
    closing: Mutex<bool>,
}

/// The front-end: cheap to clone, safe to share between threads.
#[derive(Clone)]
pub struct Frontend {
    shared: Arc<Shared>,
}

/// What a successful login says.
#[derive(Clone, Debug)]
pub struct Login {
    /// Devices of this user connected now, this one included.
    pub devices: u32,
    /// Where the session is (the server given, or the primary it redirected to).
    pub server: SocketAddr,
    /// The last request of this device the server answered.
    pub last_seq: Seq,
    /// The session's secret.
    pub token: String,
    /// The primary's epoch.
    pub epoch: u64,
}

fn resolve(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("cannot resolve {addr}"))
}

fn connect_from(bind: Option<IpAddr>, to: SocketAddr) -> Result<TcpStream, String> {
    match bind {
        None => TcpStream::connect_timeout(&to, CONNECT_TIMEOUT).map_err(|e| format!("cannot reach {to}: {e}")),
        Some(ip) => {
            // std cannot bind before connect; a socket bound to the chosen local IP is
            // what makes 127.0.0.4 and 127.0.0.5 look like two machines.
            let stream = bind_connect::connect(ip, to, CONNECT_TIMEOUT)
                .map_err(|e| format!("cannot reach {to} from {ip}: {e}"))?;
            Ok(stream)
        }
    }
}

mod bind_connect;

/// Logs in on a fresh connection, following redirects. Returns the stream and login.
fn login(cfg: &Config, callback_port: u16) -> Result<(TcpStream, Login), FrontError> {
    let mut target = resolve(&cfg.server).map_err(FrontError::Unavailable)?;
    for _ in 0..=MAX_REDIRECTS {
        let mut stream = connect_from(cfg.bind, target).map_err(FrontError::Unavailable)?;
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
        let _ = stream.set_write_timeout(Some(READ_TIMEOUT));
        let hello = Msg::Hello {
            version: PROTOCOL_VERSION,
            who: Who::Client { user: cfg.user.clone(), device: cfg.device.clone(), callback_port },
        };
        write_frame(&mut stream, Epoch(0), &hello, &[])
            .map_err(|e| FrontError::Unavailable(format!("{target}: {e}")))?;
        let frame = read_frame(&mut stream)
            .map_err(|e| FrontError::Unavailable(format!("{target}: {e}")))?
            .ok_or_else(|| FrontError::Unavailable(format!("{target} closed the connection during login")))?;
        match frame.msg {
            Msg::Welcome { devices, last_seq, token } => {
                let login = Login { devices, server: target, last_seq, token, epoch: frame.epoch.0 };
                return Ok((stream, login));
            }
            Msg::Refused { reason } => return Err(FrontError::Refused(reason)),
            Msg::Redirect { primary } => {
                log::info!("redirected to primary={primary} by server={target}");
                target = resolve(&primary).map_err(FrontError::Unavailable)?;
            }
            other => return Err(FrontError::Protocol(format!("{target} answered hello with {}", other.kind()))),
        }
    }
    Err(FrontError::Protocol("too many redirects".into()))
}

impl Frontend {
    /// Opens the callback listener, connects and logs in. Returns the front-end,
    /// its event stream and the login.
    pub fn connect(cfg: Config) -> Result<(Frontend, Receiver<FrontEvent>, Login), FrontError> {
        let at = (cfg.bind.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)), cfg.callback_port);
        let listener = TcpListener::bind(at)
            .map_err(|e| FrontError::Local(format!("cannot listen for callbacks on {}:{}: {e}", at.0, at.1)))?;
        let callback_port =
            listener.local_addr().map_err(|e| FrontError::Local(format!("callback listener: {e}")))?.port();
        let (stream, login) = login(&cfg, callback_port)?;
        let (events, events_rx) = unbounded();
        let shared = Arc::new(Shared {
            cfg,
            token: Mutex::new(login.token.clone()),
            epoch: AtomicU64::new(login.epoch),
            server: Mutex::new(login.server.to_string()),
            lost_at: Mutex::new(None),
            callback_port,
            conn: Mutex::new(None),
            changed: Condvar::new(),
            turn: Mutex::new(login.last_seq),
            events,
            generation: Mutex::new(0),
            closing: Mutex::new(false),
        });
        install(&shared, stream).map_err(FrontError::Unavailable)?;
        let s = shared.clone();
        std::thread::Builder::new()
            .name("frontend-callback".into())
            .spawn(move || callbacks(s, listener))
            .map_err(|e| FrontError::Local(format!("cannot start the callback listener: {e}")))?;
        Ok((Frontend { shared }, events_rx, login))
    }

    /// The primary the session is with (or was, while it is lost).
    pub fn server(&self) -> String {
        self.shared.server.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The highest epoch heard from a primary.
    pub fn epoch(&self) -> u64 {
        self.shared.epoch.load(Ordering::Relaxed)
    }

    /// The port this client listens on for a new primary's call.
    pub fn callback_port(&self) -> u16 {
        self.shared.callback_port
    }

    /// True while the session has no primary.
    pub fn is_lost(&self) -> bool {
        self.shared.conn.lock().unwrap_or_else(|p| p.into_inner()).is_none()
    }

    /// Ends the session cleanly.
    pub fn logout(&self) {
        *self.shared.closing.lock().unwrap_or_else(|p| p.into_inner()) = true;
        let conn = self.shared.conn.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(conn) = conn {
            let _ = conn.send(&Msg::Bye, &[]);
            let s = conn.writer.lock().unwrap_or_else(|p| p.into_inner());
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        self.shared.changed.notify_all();
    }

    /// Waits for a live connection, up to the failover wait (counted from when
    /// the session lost its primary, if it has).
    fn live(&self) -> Result<Arc<Conn>, FrontError> {
        // Once the wait is over, later requests fail at once instead of each
        // waiting it out again.
        let lost = *self.shared.lost_at.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = lost.unwrap_or_else(Instant::now) + self.shared.cfg.failover_wait;
        let mut guard = self.shared.conn.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if *self.shared.closing.lock().unwrap_or_else(|p| p.into_inner()) {
                return Err(FrontError::Unavailable("the session was closed".into()));
            }
            if let Some(c) = guard.as_ref() {
                return Ok(c.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                let at = self.shared.server.lock().unwrap_or_else(|p| p.into_inner()).clone();
                return Err(FrontError::Unavailable(format!(
                    "no primary for {:?} (the last one was at {at}); local changes wait until one is back",
                    self.shared.cfg.failover_wait
                )));
            }
            guard = self.shared.changed.wait_timeout(guard, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Runs one request to completion, resending it on a new connection if the
    /// current one dies before the answer arrives. `attempt` must be repeatable.
    fn with_retry<T>(
        &self,
        mut attempt: impl FnMut(&Conn, Seq) -> Result<Attempt<T>, FrontError>,
    ) -> Result<T, FrontError> {
        let mut turn = self.shared.turn.lock().unwrap_or_else(|p| p.into_inner());
        *turn = turn.next();
        let seq = *turn;
        loop {
            let conn = self.live()?;
            match attempt(&conn, seq) {
                Ok(Attempt::Done(t)) => return Ok(t),
                Ok(Attempt::Lost(why)) => {
                    log::info!("resending request seq={seq} after losing the connection: {why}");
                    lost(&self.shared, conn.generation, why);
                }
                Err(e) => {
                    // The attempt stopped part-way (a local write failed, the server
                    // broke the protocol): frames of this request may still be on
                    // their way, and would be taken for the answers to the next
                    // requests. Only a new connection is known to be clean.
                    lost(&self.shared, conn.generation, format!("request seq={seq} failed: {e}"));
                    return Err(e);
                }
            }
        }
    }

    /// A request answered by one reply: list, delete or rename.
    pub fn request(&self, op: Op) -> Result<OpResult, FrontError> {
        self.with_retry(|conn, seq| {
            if let Err(e) = conn.send(&Msg::Request { seq, op: op.clone() }, &[]) {
                return Ok(Attempt::Lost(e));
            }
            Ok(match wait_reply(conn, seq)? {
                Ok(r) => Attempt::Done(r),
                Err(e) => Attempt::Lost(e),
            })
        })
    }

    /// Every file and tombstone of the user, in path order, asked for page by page
    /// (a user may hold more files than one frame can list).
    pub fn list_all(&self) -> Result<Vec<FileMeta>, FrontError> {
        let mut files: Vec<FileMeta> = Vec::new();
        loop {
            let after = files.last().map(|m| m.path.clone());
            match self.request(Op::List { after: after.clone() })? {
                OpResult::Listing { files: page, more } => {
                    // Each page must move past the last one, or a faulty server
                    // could keep the client asking for ever.
                    if page.first().is_some_and(|m| after.as_ref().is_some_and(|a| &m.path <= a)) {
                        return Err(FrontError::Protocol("a listing page went backwards".into()));
                    }
                    if more && page.is_empty() {
                        return Err(FrontError::Protocol("an empty listing page said more follow".into()));
                    }
                    files.extend(page);
                    if !more {
                        return Ok(files);
                    }
                }
                other => return Err(FrontError::Protocol(format!("list answered with {}", result_kind(&other)))),
            }
        }
    }

    /// Uploads `size` bytes of `source` (read from its start) to `path`.
    /// `progress` is called with the bytes sent so far.
    pub fn upload<F: Read + Seek>(
        &self,
        path: &str,
        source: &mut F,
        size: u64,
        mtime_ms: i64,
        base: Option<Version>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<OpResult, FrontError> {
        self.with_retry(|conn, seq| {
            let op = Op::Upload { path: path.to_string(), size, mtime_ms, base };
            if let Err(e) = conn.send(&Msg::Request { seq, op }, &[]) {
                return Ok(Attempt::Lost(e));
            }
            let first = match conn.recv() {
                Ok(f) => f,
                Err(e) => return Ok(Attempt::Lost(e)),
            };
            match first.msg {
                Msg::Proceed { seq: s } if s == seq => {}
                Msg::Reply { seq: s, result } if s == seq => return Ok(Attempt::Done(result)),
                other => return Err(FrontError::Protocol(format!("unexpected {} answering an upload", other.kind()))),
            }
            source.seek(SeekFrom::Start(0)).map_err(|e| FrontError::Local(format!("cannot read {path}: {e}")))?;
            let mut buf = vec![0u8; CHUNK_SIZE];
            let mut sent = 0u64;
            let mut hasher = Hasher::new();
            while sent < size {
                let want = (size - sent).min(CHUNK_SIZE as u64) as usize;
                let n =
                    source.read(&mut buf[..want]).map_err(|e| FrontError::Local(format!("cannot read {path}: {e}")))?;
                if n == 0 {
                    break; // the file shrank: the server sees a short upload and refuses it
                }
                hasher.update(&buf[..n]);
                if let Err(e) = conn.send(&Msg::Chunk { seq }, &buf[..n]) {
                    return Ok(Attempt::Lost(e));
                }
                sent += n as u64;
                progress(sent);
            }
            if let Err(e) = conn.send(&Msg::UploadEnd { seq, hash: hasher.finish() }, &[]) {
                return Ok(Attempt::Lost(e));
            }
            Ok(match wait_reply(conn, seq)? {
                Ok(r) => Attempt::Done(r),
                Err(e) => Attempt::Lost(e),
            })
        })
    }

    /// Downloads `path` into `dest` (rewound and truncated on every attempt).
    /// Returns the metadata of the version received, or the server's refusal.
    pub fn download(
        &self,
        path: &str,
        dest: &mut File,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Result<FileMeta, OpResult>, FrontError> {
        self.with_retry(|conn, seq| {
            dest.seek(SeekFrom::Start(0))
                .and_then(|_| dest.set_len(0))
                .map_err(|e| FrontError::Local(format!("cannot write {path}: {e}")))?;
            if let Err(e) = conn.send(&Msg::Request { seq, op: Op::Download { path: path.to_string() } }, &[]) {
                return Ok(Attempt::Lost(e));
            }
            let meta = match wait_reply(conn, seq)? {
                Err(e) => return Ok(Attempt::Lost(e)),
                Ok(OpResult::Data { meta }) => meta,
                Ok(other) => return Ok(Attempt::Done(Err(other))),
            };
            let mut receipt = Receipt::of_version(meta.size, meta.hash);
            let damaged = |e: Damaged| FrontError::Protocol(format!("download of {path} arrived damaged: {e}"));
            loop {
                let frame = match conn.recv() {
                    Ok(f) => f,
                    Err(e) => return Ok(Attempt::Lost(e)),
                };
                match frame.msg {
                    Msg::Chunk { seq: s } if s == seq => {
                        receipt.add(&frame.payload).map_err(damaged)?;
                        dest.write_all(&frame.payload)
                            .map_err(|e| FrontError::Local(format!("cannot write {path}: {e}")))?;
                        progress(receipt.got(), meta.size);
                    }
                    Msg::DownloadEnd { seq: s, hash: sent } if s == seq => {
                        receipt.finish(sent).map_err(damaged)?;
                        dest.flush().map_err(|e| FrontError::Local(format!("cannot write {path}: {e}")))?;
                        return Ok(Attempt::Done(Ok(meta)));
                    }
                    other => return Err(FrontError::Protocol(format!("unexpected {} during download", other.kind()))),
                }
            }
        })
    }
}

/// A short name of a result, for errors.
fn result_kind(r: &OpResult) -> &'static str {
    match r {
        OpResult::Done { .. } => "done",
        OpResult::Listing { .. } => "listing",
        OpResult::Data { .. } => "data",
        OpResult::Conflict { .. } => "conflict",
        OpResult::Gone { .. } => "gone",
        OpResult::Error { .. } => "error",
    }
}

/// Waits for the reply to `seq`. `Ok(Err(_))` means the connection died first.
fn wait_reply(conn: &Conn, seq: Seq) -> Result<Result<OpResult, String>, FrontError> {
    let frame = match conn.recv() {
        Ok(f) => f,
        Err(e) => return Ok(Err(e)),
    };
    match frame.msg {
        Msg::Reply { seq: s, result } if s == seq => Ok(Ok(result)),
        other => Err(FrontError::Protocol(format!("unexpected {} waiting for reply {seq}", other.kind()))),
    }
}

/// Makes `stream` the live connection and starts its reader and keep-alive.
fn install(shared: &Arc<Shared>, stream: TcpStream) -> Result<(), String> {
    let generation = {
        let mut g = shared.generation.lock().unwrap_or_else(|p| p.into_inner());
        *g += 1;
        *g
    };
    let read_half = stream.try_clone().map_err(|e| format!("cannot clone socket: {e}"))?;
    // A few frames of slack between the socket and the caller: at most 8 MiB even
    // with payloads at the protocol's 1 MiB limit.
    let (replies_tx, replies) = bounded::<Frame>(8);
    let writer = Arc::new(Mutex::new(stream));
    let conn = Arc::new(Conn { writer: writer.clone(), replies, generation });
    let old = shared.conn.lock().unwrap_or_else(|p| p.into_inner()).replace(conn);
    if let Some(old) = old {
        // A new primary called while the old connection still looked alive (its
        // server is stale): its requests resend on the new one.
        let _ = old.writer.lock().unwrap_or_else(|p| p.into_inner()).shutdown(std::net::Shutdown::Both);
    }
    *shared.lost_at.lock().unwrap_or_else(|p| p.into_inner()) = None;
    shared.changed.notify_all();

    let s = shared.clone();
    std::thread::Builder::new()
        .name(format!("frontend-reader-{generation}"))
        .spawn(move || read_loop(s, read_half, replies_tx, generation))
        .map_err(|e| e.to_string())?;
    let s = shared.clone();
    std::thread::Builder::new()
        .name(format!("frontend-ping-{generation}"))
        .spawn(move || loop {
            std::thread::sleep(PING_EVERY);
            if *s.generation.lock().unwrap_or_else(|p| p.into_inner()) != generation {
                return;
            }
            let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
            if write_frame(&mut *w, Epoch(0), &Msg::Ping, &[]).is_err() {
                return;
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn read_loop(shared: Arc<Shared>, mut stream: TcpStream, replies: Sender<Frame>, generation: u64) {
    let mut reader = std::io::BufReader::with_capacity(64 * 1024, &mut stream);
    let why = loop {
        // The epoch known rises only with a welcome or a callback: a primary
        // that has just heard of a later epoch (and is about to step down)
        // stamps its last frames with it, and taking that for the epoch served
        // would refuse the real primary of that epoch when it calls.
        let frame = read_frame(&mut reader);
        match frame {
            Ok(None) => break "the server closed the connection".to_string(),
            Err(e) if e.is_timeout() => break format!("no word from the server for {READ_TIMEOUT:?}"),
            Err(e) => break e.to_string(),
            Ok(Some(frame)) => match frame.msg {
                Msg::Pong => {}
                Msg::Notice { notice } => {
                    let _ = shared.events.send(FrontEvent::Notice(notice));
                }
                _ => {
                    if replies.send(frame).is_err() {
                        break "front-end closed".into();
                    }
                }
            },
        }
    };
    drop(replies);
    lost(&shared, generation, why);
}

/// Marks connection `generation` dead (once) and starts reconnecting.
fn lost(shared: &Arc<Shared>, generation: u64, why: String) {
    {
        let mut conn = shared.conn.lock().unwrap_or_else(|p| p.into_inner());
        match conn.as_ref() {
            Some(c) if c.generation == generation => {
                let _ = c.writer.lock().unwrap_or_else(|p| p.into_inner()).shutdown(std::net::Shutdown::Both);
                *conn = None;
            }
            _ => return, // already handled, or a newer connection is live
        }
    }
    if *shared.closing.lock().unwrap_or_else(|p| p.into_inner()) {
        return;
    }
    shared.lost_at.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(Instant::now);
    let server = shared.server.lock().unwrap_or_else(|p| p.into_inner()).clone();
    log::info!("lost connection to server={server}: {why}");
    let _ = shared.events.send(FrontEvent::Lost(why));
    let s = shared.clone();
    let _ = std::thread::Builder::new().name("frontend-reconnect".into()).spawn(move || reconnect(s));
}

/// While the session has no primary: waits for a new primary's call, and tries
/// the server given on the command line again (it may be back, or redirect to
/// the new primary), with a pause that doubles after each failure.
fn reconnect(shared: Arc<Shared>) {
    let mut delay = RETRY_FIRST;
    let mut said_no_primary = false;
    loop {
        if *shared.closing.lock().unwrap_or_else(|p| p.into_inner()) {
            return;
        }
        if shared.conn.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
            return; // a new primary called back
        }
        let since = *shared.lost_at.lock().unwrap_or_else(|p| p.into_inner());
        let waited = since.map_or(Duration::ZERO, |t| t.elapsed());
        if waited >= shared.cfg.failover_wait && !said_no_primary {
            said_no_primary = true;
            let _ = shared.events.send(FrontEvent::NoPrimary { waited });
        }
        match login(&shared.cfg, shared.callback_port) {
            Ok((stream, login)) => {
                if shared.conn.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
                    return; // called back meanwhile: that session stands
                }
                *shared.token.lock().unwrap_or_else(|p| p.into_inner()) = login.token.clone();
                shared.epoch.fetch_max(login.epoch, Ordering::Relaxed);
                *shared.server.lock().unwrap_or_else(|p| p.into_inner()) = login.server.to_string();
                if install(&shared, stream).is_ok() {
                    log::info!("reconnected to server={} epoch={}", login.server, login.epoch);
                    let event = FrontEvent::Reconnected {
                        server: login.server.to_string(),
                        epoch: login.epoch,
                        after: waited,
                        callback: false,
                    };
                    let _ = shared.events.send(event);
                    return;
                }
            }
            Err(FrontError::Refused(r)) => log::warn!("server refused the new login: {r}"),
            Err(e) => log::debug!("reconnect failed: {e}"),
        }
        // Wait for the pause, or for a callback to end the loss early.
        let guard = shared.conn.lock().unwrap_or_else(|p| p.into_inner());
        let _ = shared.changed.wait_timeout_while(guard, delay, |c| c.is_none());
        delay = (delay * 2).min(RETRY_MAX);
    }
}

/// Accepts new primaries' calls, each on a thread of its own (with a deadline,
/// so that garbage on the port holds nothing).
fn callbacks(shared: Arc<Shared>, listener: TcpListener) {
    let mut n = 0u64;
    for stream in listener.incoming() {
        if *shared.closing.lock().unwrap_or_else(|p| p.into_inner()) {
            return;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                log::warn!("callback listener: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        n += 1;
        let s = shared.clone();
        let spawned = std::thread::Builder::new().name(format!("frontend-callback-{n}")).spawn(move || {
            let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            if let Err(why) = callback(&s, stream) {
                log::warn!("refused a call on the callback port from {peer}: {why}");
            }
        });
        if let Err(e) = spawned {
            log::warn!("cannot start a thread for a callback: {e}");
        }
    }
}

/// One call: the caller must be a primary of a later epoch than any this client
/// has heard of, calling this device, and prove that it holds the session's
/// token; then the connection becomes the session.
fn callback(shared: &Arc<Shared>, stream: TcpStream) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(CALLBACK_TIMEOUT));
    let _ = stream.set_write_timeout(Some(CALLBACK_TIMEOUT));
    let mut r = &stream;
    let mut w = &stream;
    let refuse = |w: &mut &TcpStream, reason: &str| {
        let _ = write_frame(w, Epoch(0), &Msg::Refused { reason: reason.to_string() }, &[]);
        Err::<(), String>(reason.to_string())
    };
    let hello = read_frame(&mut r).map_err(|e| e.to_string())?.ok_or("closed before its hello")?;
    let (id, addr, device) = match hello.msg {
        Msg::Hello { version: PROTOCOL_VERSION, who: Who::Primary { id, addr, device } } => (id, addr, device),
        other => return refuse(&mut w, &format!("expected a primary's hello, got {}", other.kind())),
    };
    if device != shared.cfg.device {
        return refuse(&mut w, &format!("this is not device {device}"));
    }
    let nonce = fresh_nonce().map_err(|e| e.to_string())?;
    let hex: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    write_frame(&mut w, Epoch(0), &Msg::Auth(AuthMsg::CallbackChallenge { nonce: hex }), &[])
        .map_err(|e| e.to_string())?;
    let proof = read_frame(&mut r).map_err(|e| e.to_string())?.ok_or("closed before its proof")?;
    let (epoch, proof) = match proof.msg {
        Msg::Auth(AuthMsg::CallbackProof { epoch, device: d, proof }) if d == device => (epoch, proof),
        other => return refuse(&mut w, &format!("expected a proof, got {}", other.kind())),
    };
    let token = shared.token.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if verify_callback_proof(&token, &nonce, epoch, &device, &proof).is_err() {
        return refuse(&mut w, &format!("server id={id} at {addr} does not hold this session's token"));
    }
    let known = shared.epoch.load(Ordering::Relaxed);
    if epoch.0 <= known {
        return refuse(&mut w, &format!("server id={id} at {addr} calls for epoch {epoch}, not later than {known}"));
    }
    write_frame(&mut w, Epoch(0), &Msg::Resume, &[]).map_err(|e| e.to_string())?;
    let welcome = read_frame(&mut r).map_err(|e| e.to_string())?.ok_or("closed before its welcome")?;
    match welcome.msg {
        Msg::Welcome { .. } => {}
        Msg::Refused { reason } => return Err(format!("server id={id} at {addr} would not resume: {reason}")),
        other => return Err(format!("expected a welcome, got {}", other.kind())),
    }
    let after = shared.lost_at.lock().unwrap_or_else(|p| p.into_inner()).map_or(Duration::ZERO, |t| t.elapsed());
    shared.epoch.fetch_max(epoch.0, Ordering::Relaxed);
    *shared.server.lock().unwrap_or_else(|p| p.into_inner()) = addr.clone();
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let _ = stream.set_write_timeout(Some(READ_TIMEOUT));
    install(shared, stream)?;
    log::info!("called back by the new primary id={id} at {addr} epoch={epoch} after {after:?}");
    let _ = shared.events.send(FrontEvent::Reconnected { server: addr, epoch: epoch.0, after, callback: true });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A server that speaks just enough of the protocol: every download is answered
    /// with more bytes than it announced (then the rest of the download), every list
    /// with an empty listing. It accepts any number of connections.
    fn overlong_download_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { return };
                std::thread::spawn(move || {
                    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    let welcome = Msg::Welcome { token: "t".into(), devices: 1, last_seq: Seq(0) };
                    let Ok(Some(_hello)) = read_frame(&mut s) else { return };
                    write_frame(&mut s, Epoch(0), &welcome, &[]).unwrap();
                    while let Ok(Some(frame)) = read_frame(&mut s) {
                        let Msg::Request { seq, op } = frame.msg else { continue };
                        let result = match op {
                            Op::Download { path } => {
                                let meta = FileMeta {
                                    path,
                                    version: Version(1),
                                    size: 1,
                                    mtime_ms: 0,
                                    hash: Hasher::new().finish(),
                                    deleted: false,
                                    atime_ms: 0,
                                    ctime_ms: 0,
                                };
                                write_frame(
                                    &mut s,
                                    Epoch(0),
                                    &Msg::Reply { seq, result: OpResult::Data { meta } },
                                    &[],
                                )
                                .unwrap();
                                for _ in 0..3 {
                                    write_frame(&mut s, Epoch(0), &Msg::Chunk { seq }, b"four").unwrap();
                                }
                                Msg::DownloadEnd { seq, hash: Hasher::new().finish() }
                            }
                            _ => Msg::Reply { seq, result: OpResult::Listing { files: Vec::new(), more: false } },
                        };
                        write_frame(&mut s, Epoch(0), &result, &[]).unwrap();
                    }
                });
            }
        });
        addr
    }

    /// A request that fails part-way leaves frames of its own on the connection;
    /// the next request must not take them for its answer.
    #[test]
    fn a_request_that_fails_part_way_leaves_nothing_for_the_next_one() {
        let server = overlong_download_server();
        let cfg = Config {
            user: "alice".into(),
            device: DeviceId("0123456789abcdef".into()),
            server: server.to_string(),
            bind: None,
            callback_port: 0,
            failover_wait: Duration::from_secs(30),
        };
        let (front, _events, _login) = Frontend::connect(cfg).unwrap();
        let dir = std::env::temp_dir().join(format!("replibox-frontend-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut dest = File::create(dir.join("dest")).unwrap();
        let got = front.download("x", &mut dest, &mut |_, _| {});
        assert!(matches!(got, Err(FrontError::Protocol(ref m)) if m.contains("longer than")), "{got:?}");
        for i in 0..5 {
            let listed = front.list_all();
            assert_eq!(listed, Ok(Vec::new()), "list {i} after the failed download");
        }
        front.logout();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
