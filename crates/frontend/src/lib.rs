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
use replibox_proto::auth::{callback::verify_callback_proof, fresh_nonce, AuthError, AuthMsg, Password, Refusal};
use replibox_proto::auth::{ScramClient, Step};
use replibox_proto::durable::WriteBehind;
use replibox_proto::{
    read_frame, write_frame, ContentHash, Damaged, DeviceId, Epoch, FileMeta, Frame, Hasher, Msg, Notice, Op, OpResult,
    Receipt, Seq, Version, Who, CHUNK_SIZE, PROTOCOL_VERSION, REQUEST_WINDOW, SMALL_UPLOAD,
};
use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub mod early;

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
/// A connection that dies sooner than this after it was made counts as a flap:
/// the next reconnection waits (twice as long after each flap in a row, from
/// [`RETRY_FIRST`] to [`RETRY_MAX`]) instead of logging in again at once, so that
/// a server that takes every login and then drops the connection (a request it
/// cannot serve, say) does not get a login storm.
const STABLE_AFTER: Duration = Duration::from_secs(10);

/// The pause before the first attempt to reconnect after `flaps` short-lived
/// connections in a row: none after a connection that lived, then doubling.
fn flap_pause(flaps: u32) -> Duration {
    match flaps {
        0 => Duration::ZERO,
        n => RETRY_FIRST.saturating_mul(1 << (n - 1).min(8)).min(RETRY_MAX),
    }
}

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
    /// The user's password (never sent: a login proves it).
    pub password: SharedPassword,
    /// Whether the first login may create the user's account when the server has
    /// none (a device that has logged in before says no: a server that "lost" the
    /// account is more likely a fake one collecting keys). Logins after it, to
    /// get the session back, never do.
    pub create_account: bool,
}

/// A user's password, shared by every login of one front-end (a reconnect reuses
/// the key derived from it) and replaced by `passwd`. `Debug` does not show it.
#[derive(Clone)]
pub struct SharedPassword(Arc<Mutex<Password>>);

impl SharedPassword {
    /// Wraps the password the user gave.
    pub fn new(text: impl Into<String>) -> SharedPassword {
        SharedPassword(Arc::new(Mutex::new(Password::new(text))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Password> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl fmt::Debug for SharedPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedPassword(..)")
    }
}

/// Why a request was not answered.
#[derive(Debug, Clone, PartialEq)]
pub enum FrontError {
    /// The server refused the login (third device, bad username, too many failed
    /// logins, ...), or could not prove it holds the account's keys.
    Refused(String),
    /// The server refused the password.
    WrongPassword,
    /// The server has no account for the user, and this login was not to
    /// create one (the device has logged in before): the sentence says so.
    NoAccount(String),
    /// The server could not be reached within the bound.
    Unavailable(String),
    /// The local source of an upload or destination of a download failed.
    Local(String),
    /// The server broke the protocol.
    Protocol(String),
    /// The server cannot take changes now (`the server is out of space`): the
    /// request may succeed later. The sync engine keeps the change and tries
    /// again, backing off.
    Busy(String),
}

impl fmt::Display for FrontError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrontError::Refused(r) => write!(f, "the server refused the login: {r}"),
            FrontError::WrongPassword => f.write_str("the server refused the login: wrong password"),
            FrontError::NoAccount(r) => write!(f, "the server refused the login: {r}"),
            FrontError::Unavailable(r) => write!(f, "the server is unavailable: {r}"),
            FrontError::Local(r) => f.write_str(r),
            FrontError::Protocol(r) => write!(f, "protocol error: {r}"),
            FrontError::Busy(r) => f.write_str(r),
        }
    }
}

impl std::error::Error for FrontError {}

impl FrontError {
    /// A local I/O failure of `what` (`cannot write f.bin`): a full disk or quota
    /// (ENOSPC, EDQUOT) is said as such first (`this device is out of space:
    /// ...`), so that a user reading the line knows what to do about it.
    pub fn local_io(what: impl fmt::Display, e: &std::io::Error) -> FrontError {
        FrontError::Local(if out_of_space(e) {
            format!("this device is out of space: {what}: {e}")
        } else {
            format!("{what}: {e}")
        })
    }
}

/// True for a full disk or quota (ENOSPC, EDQUOT).
pub fn out_of_space(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
}

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
    /// The request failed here (a local write), but every frame of its answer was
    /// read: the connection is clean and stays.
    Failed(FrontError),
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
    /// Serialises requests: one caller on the connection at a time, in order (a
    /// batch keeps up to [`REQUEST_WINDOW`] of its own requests in flight).
    turn: Mutex<Seq>,
    events: Sender<FrontEvent>,
    generation: Mutex<u64>,
    closing: Mutex<bool>,
    /// When the live connection was made, and how many connections in a row
    /// died young (see [`STABLE_AFTER`]).
    flaps: Mutex<(Instant, u32)>,
    /// A login after a loss was refused for its password (changed on another
    /// device, say): requests fail with this instead of waiting.
    denied: Mutex<Option<FrontError>>,
    /// Whole early copies of other devices' large uploads ([`early`]).
    early: Mutex<early::Held>,
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
    /// The session's secret: the key the password login derived (hex), which a
    /// new primary proves it holds when it calls back.
    pub token: String,
    /// The primary's epoch.
    pub epoch: u64,
    /// This login created the user's account.
    pub created: bool,
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

/// Logs in on a fresh connection, following redirects: the hello, then the
/// password login (the server proves itself too), then `welcome`. Returns the
/// stream and login.
/// `create`: whether the login may create the account (only a front-end's first
/// login, and only as the config allows: once logged in, the account exists, and
/// a server that has none is not to be given keys).
fn login(cfg: &Config, callback_port: u16, create: bool) -> Result<(TcpStream, Login), FrontError> {
    let mut target = resolve(&cfg.server).map_err(FrontError::Unavailable)?;
    for _ in 0..=MAX_REDIRECTS {
        let mut stream = connect_from(cfg.bind, target).map_err(FrontError::Unavailable)?;
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
        let _ = stream.set_write_timeout(Some(READ_TIMEOUT));
        let at = target;
        let unavailable = move |e: &dyn fmt::Display| FrontError::Unavailable(format!("{at}: {e}"));
        let mut password = cfg.password.lock();
        let (mut scram, first) =
            ScramClient::start(&cfg.user, &mut password, create).map_err(|e| FrontError::Local(e.to_string()))?;
        let hello = Msg::Hello {
            version: PROTOCOL_VERSION,
            who: Who::Client { user: cfg.user.clone(), device: cfg.device.clone(), callback_port },
        };
        write_frame(&mut stream, Epoch(0), &hello, &[]).map_err(|e| unavailable(&e))?;
        write_frame(&mut stream, Epoch(0), &Msg::Auth(first), &[]).map_err(|e| unavailable(&e))?;
        let next = |stream: &mut TcpStream| {
            read_frame(stream)
                .map_err(|e| unavailable(&e))?
                .ok_or_else(|| FrontError::Unavailable(format!("{at} closed the connection during login")))
        };
        let proven = loop {
            let frame = next(&mut stream)?;
            match frame.msg {
                Msg::Auth(m) => match scram.step(m) {
                    Ok(Step::Send(reply)) => {
                        write_frame(&mut stream, Epoch(0), &Msg::Auth(reply), &[]).map_err(|e| unavailable(&e))?
                    }
                    Ok(Step::Done(_, proven)) => break Some((proven, frame.epoch)),
                    Err(e) => {
                        if let Some(refusal) = e.refusal() {
                            let _ = write_frame(&mut stream, Epoch(0), &Msg::Auth(refusal), &[]);
                        }
                        return Err(login_error(e));
                    }
                },
                Msg::Refused { reason } => return Err(FrontError::Refused(reason)),
                Msg::Redirect { primary } => {
                    log::info!("redirected to primary={primary} by server={target}");
                    target = resolve(&primary).map_err(FrontError::Unavailable)?;
                    break None;
                }
                other => return Err(FrontError::Protocol(format!("{target} answered a login with {}", other.kind()))),
            }
        };
        let Some((proven, _)) = proven else { continue };
        drop(scram);
        drop(password);
        let frame = next(&mut stream)?;
        return match frame.msg {
            Msg::Welcome { devices, last_seq } => {
                let token = proven.session_key.to_hex();
                let login =
                    Login { devices, server: target, last_seq, token, epoch: frame.epoch.0, created: proven.created };
                Ok((stream, login))
            }
            Msg::Refused { reason } => Err(FrontError::Refused(reason)),
            other => Err(FrontError::Protocol(format!("{target} answered a login with {}", other.kind()))),
        };
    }
    Err(FrontError::Protocol("too many redirects".into()))
}

/// A failed password login as the caller sees it.
fn login_error(e: AuthError) -> FrontError {
    match e {
        AuthError::Refused { why: Refusal::WrongPassword, .. } => FrontError::WrongPassword,
        e @ AuthError::NoAccount { .. } => FrontError::NoAccount(e.to_string()),
        // Too many failed logins, or the account could not be stored: the
        // server's sentence says which.
        AuthError::Refused { detail, .. } => FrontError::Refused(detail),
        AuthError::Transport(e) => FrontError::Unavailable(e.to_string()),
        AuthError::Closed => FrontError::Unavailable("the server closed the connection during login".into()),
        // The server could not prove it holds the account's keys, asked for weak
        // parameters, or has no account that this device knows exists.
        other => FrontError::Refused(other.to_string()),
    }
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
        let (stream, login) = login(&cfg, callback_port, cfg.create_account)?;
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
            flaps: Mutex::new((Instant::now(), 0)),
            denied: Mutex::new(None),
            early: Mutex::new(early::Held::default()),
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
            if let Some(e) = self.shared.denied.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                return Err(e);
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
                Ok(Attempt::Failed(e)) => return Err(e),
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

    /// Uploads several files with up to [`REQUEST_WINDOW`] requests in flight:
    /// the next file's bytes go out while the server replicates the ones before,
    /// instead of one round trip and one replication after another. Answers come
    /// in the same order as `items`. A connection lost on the way is replaced,
    /// and every file not answered yet is sent again with its seq (the server's
    /// request table answers those it had stored, whichever ones they are).
    pub fn upload_batch(&self, items: &mut [UploadItem]) -> Result<Vec<OpResult>, FrontError> {
        let mut turn = self.shared.turn.lock().unwrap_or_else(|p| p.into_inner());
        let mut seqs: Vec<Option<Seq>> = vec![None; items.len()];
        let mut answers: Vec<Option<OpResult>> = vec![None; items.len()];
        loop {
            let conn = self.live()?;
            match pipeline(&conn, items, &mut seqs, &mut answers, &mut turn) {
                Ok(None) => {
                    return Ok(answers
                        .into_iter()
                        .map(|a| a.unwrap_or(OpResult::Gone { path: String::new() }))
                        .collect())
                }
                Ok(Some(why)) => {
                    log::info!("resending the unanswered uploads of a batch after losing the connection: {why}");
                    lost(&self.shared, conn.generation, why);
                }
                Err(e) => {
                    lost(&self.shared, conn.generation, format!("a batch of uploads failed: {e}"));
                    return Err(e);
                }
            }
        }
    }

    /// Uploads `size` bytes of `source` (read from its start) to `path`, as an
    /// executable file when `exec`. `progress` is called with the bytes sent so far.
    #[allow(clippy::too_many_arguments)] // each is one field of the request
    pub fn upload<F: Read + Seek>(
        &self,
        path: &str,
        source: &mut F,
        size: u64,
        mtime_ms: i64,
        base: Option<Version>,
        exec: bool,
        progress: &mut dyn FnMut(u64),
    ) -> Result<OpResult, FrontError> {
        self.with_retry(|conn, seq| {
            let eager = size < SMALL_UPLOAD;
            let op = Op::Upload { path: path.to_string(), size, mtime_ms, base, exec, eager };
            if let Err(e) = conn.send(&Msg::Request { seq, op }, &[]) {
                return Ok(Attempt::Lost(e));
            }
            // A small file's bytes follow at once; a larger one's wait for the
            // server's go-ahead (or its refusal, which saves sending them).
            if !eager {
                let first = match conn.recv() {
                    Ok(f) => f,
                    Err(e) => return Ok(Attempt::Lost(e)),
                };
                match first.msg {
                    Msg::Proceed { seq: s } if s == seq => {}
                    Msg::Reply { seq: s, result } if s == seq => return Ok(Attempt::Done(result)),
                    other => {
                        return Err(FrontError::Protocol(format!("unexpected {} answering an upload", other.kind())))
                    }
                }
            }
            source
                .seek(SeekFrom::Start(0))
                .map_err(|e| FrontError::local_io(format_args!("cannot read {path}"), &e))?;
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

    /// From now on, early copies of the user's other devices' large uploads are
    /// received into `dir` (on the sync dir's file system, so that a copy is
    /// placed by a rename); until this is called they are ignored.
    pub fn keep_early_in(&self, dir: PathBuf) {
        self.shared.early.lock().unwrap_or_else(|p| p.into_inner()).keep_in(dir);
    }

    /// From now on, early copies are taken only of the paths `wanted` says yes
    /// to (the device's ignore rules, which it gives again when they change).
    pub fn want_early_only(&self, wanted: early::Wanted) {
        self.shared.early.lock().unwrap_or_else(|p| p.into_inner()).want_only(wanted);
    }

    /// The whole early copy of `path` with this size and hash, if one arrived:
    /// its file is the caller's (to place, or delete). See [`early`].
    pub fn take_early(&self, path: &str, size: u64, hash: ContentHash) -> Option<PathBuf> {
        self.shared.early.lock().unwrap_or_else(|p| p.into_inner()).take(path, size, hash)
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
            // Before the request is sent: the connection is clean whatever happens.
            if let Err(e) = dest.seek(SeekFrom::Start(0)).and_then(|_| dest.set_len(0)) {
                return Ok(Attempt::Failed(FrontError::local_io(format_args!("cannot write {path}"), &e)));
            }
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
            // A write that fails here (a full disk) does not end the request: the
            // rest of the file is read and dropped, so that the connection stays
            // clean and the retry (with its back-off) costs no new login.
            let mut failed: Option<FrontError> = None;
            let mut out = WriteBehind::new(&*dest);
            loop {
                let frame = match conn.recv() {
                    Ok(f) => f,
                    Err(e) => return Ok(Attempt::Lost(e)),
                };
                match frame.msg {
                    Msg::Chunk { seq: s } if s == seq => {
                        receipt.add(&frame.payload).map_err(damaged)?;
                        if failed.is_none() {
                            if let Err(e) = out.write_all(&frame.payload) {
                                failed = Some(FrontError::local_io(format_args!("cannot write {path}"), &e));
                            }
                        }
                        progress(receipt.got(), meta.size);
                    }
                    Msg::DownloadEnd { seq: s, hash: sent } if s == seq => {
                        receipt.finish(sent).map_err(damaged)?;
                        if let Some(e) = failed {
                            return Ok(Attempt::Failed(e));
                        }
                        if let Err(e) = out.flush() {
                            return Ok(Attempt::Failed(FrontError::local_io(format_args!("cannot write {path}"), &e)));
                        }
                        return Ok(Attempt::Done(Ok(meta)));
                    }
                    other => return Err(FrontError::Protocol(format!("unexpected {} during download", other.kind()))),
                }
            }
        })
    }
}

/// One file of [`Frontend::download_batch`].
pub struct DownloadItem {
    /// Its path on the server.
    pub path: String,
    /// Where its bytes go (rewound and truncated before every attempt).
    pub file: File,
}

impl Frontend {
    /// Downloads several files with up to [`REQUEST_WINDOW`] requests in flight:
    /// the server streams one file after another without waiting for the next
    /// request, instead of one round trip per file. Answers come in the order of
    /// `items`: each the metadata of the version received, or the server's
    /// refusal. A connection lost on the way is replaced and the files not
    /// received yet are asked for again (a download changes nothing, so a fresh
    /// request is safe). A local write that fails (a full disk) fails the batch
    /// but keeps the connection: no more files are asked for, and the rest of
    /// those in flight is read and dropped. Meant for small files: it reports no
    /// progress.
    pub fn download_batch(&self, items: &mut [DownloadItem]) -> Result<Vec<Result<FileMeta, OpResult>>, FrontError> {
        let mut turn = self.shared.turn.lock().unwrap_or_else(|p| p.into_inner());
        let mut answers: Vec<Option<Result<FileMeta, OpResult>>> = (0..items.len()).map(|_| None).collect();
        loop {
            let conn = self.live()?;
            let mut failed = None;
            match pipeline_downloads(&conn, items, &mut answers, &mut turn, &mut failed) {
                Ok(None) => {
                    // A local write failed (a full disk), but every request in
                    // flight was answered and read to its end: the connection is
                    // clean and stays, as for one download.
                    if let Some(e) = failed {
                        return Err(e);
                    }
                    return Ok(answers
                        .into_iter()
                        .map(|a| a.unwrap_or(Err(OpResult::Gone { path: String::new() })))
                        .collect());
                }
                Ok(Some(why)) => {
                    if failed.is_none() {
                        log::info!(
                            "asking again for the files of a batch not received before losing the connection: {why}"
                        );
                    }
                    lost(&self.shared, conn.generation, why);
                    if let Some(e) = failed {
                        return Err(e);
                    }
                }
                Err(e) => {
                    lost(&self.shared, conn.generation, format!("a batch of downloads failed: {e}"));
                    return Err(e);
                }
            }
        }
    }
}

/// Asks for the unanswered downloads of a batch on one connection, keeping up to
/// [`REQUEST_WINDOW`] requests ahead of the file being received. The server
/// answers a connection's requests in order, so the frames that arrive belong to
/// the oldest request in flight. `Ok(None)`: every one is answered, or, when
/// `failed` is set, every one in flight when a local write failed (a full disk):
/// no more are asked for, and the rest of each answer is read and dropped, so
/// that the connection stays clean. `Ok(Some(why))`: the connection died first.
fn pipeline_downloads(
    conn: &Conn,
    items: &mut [DownloadItem],
    answers: &mut [Option<Result<FileMeta, OpResult>>],
    turn: &mut Seq,
    failed: &mut Option<FrontError>,
) -> Result<Option<String>, FrontError> {
    let todo: Vec<usize> = (0..items.len()).filter(|&i| answers[i].is_none()).collect();
    let mut in_flight: std::collections::VecDeque<(Seq, usize)> = std::collections::VecDeque::new();
    let mut next = 0;
    while next < todo.len() || !in_flight.is_empty() {
        while failed.is_none() && next < todo.len() && (in_flight.len() as u64) < REQUEST_WINDOW {
            let i = todo[next];
            let item = &mut items[i];
            let path = item.path.clone();
            // Before the request is sent: those in flight are still read whole.
            if let Err(e) = item.file.seek(SeekFrom::Start(0)).and_then(|_| item.file.set_len(0)) {
                *failed = Some(FrontError::local_io(format_args!("cannot write {path}"), &e));
                break;
            }
            *turn = turn.next();
            if let Err(e) = conn.send(&Msg::Request { seq: *turn, op: Op::Download { path } }, &[]) {
                return Ok(Some(e));
            }
            in_flight.push_back((*turn, i));
            next += 1;
        }
        let Some((seq, i)) = in_flight.pop_front() else { break };
        let item = &mut items[i];
        let path = item.path.clone();
        let meta = match wait_reply(conn, seq)? {
            Err(e) => return Ok(Some(e)),
            Ok(OpResult::Data { meta }) => meta,
            Ok(other) => {
                answers[i] = Some(Err(other));
                continue;
            }
        };
        let mut receipt = Receipt::of_version(meta.size, meta.hash);
        let damaged = |e: Damaged| FrontError::Protocol(format!("download of {path} arrived damaged: {e}"));
        loop {
            let frame = match conn.recv() {
                Ok(f) => f,
                Err(e) => return Ok(Some(e)),
            };
            match frame.msg {
                Msg::Chunk { seq: s } if s == seq => {
                    receipt.add(&frame.payload).map_err(damaged)?;
                    if failed.is_none() {
                        if let Err(e) = item.file.write_all(&frame.payload) {
                            *failed = Some(FrontError::local_io(format_args!("cannot write {path}"), &e));
                        }
                    }
                }
                Msg::DownloadEnd { seq: s, hash: sent } if s == seq => {
                    receipt.finish(sent).map_err(damaged)?;
                    if failed.is_none() {
                        answers[i] = Some(Ok(meta));
                    }
                    break;
                }
                other => {
                    return Err(FrontError::Protocol(format!(
                        "unexpected {} during the download of {path}",
                        other.kind()
                    )))
                }
            }
        }
    }
    Ok(None)
}

/// One file of [`Frontend::upload_batch`].
pub struct UploadItem {
    /// Its path in the sync dir.
    pub path: String,
    /// The open file (read from its start on every attempt).
    pub file: File,
    /// The bytes to send.
    pub size: u64,
    /// Its modification time.
    pub mtime_ms: i64,
    /// Its owner's execute bit.
    pub exec: bool,
    /// The version it replaces.
    pub base: Option<Version>,
}

/// Sends the unanswered uploads of a batch on one connection, keeping up to
/// [`REQUEST_WINDOW`] in flight, and collects their answers. `Ok(None)`: every
/// one is answered; `Ok(Some(why))`: the connection died first.
fn pipeline(
    conn: &Conn,
    items: &mut [UploadItem],
    seqs: &mut [Option<Seq>],
    answers: &mut [Option<OpResult>],
    turn: &mut Seq,
) -> Result<Option<String>, FrontError> {
    let mut waiting: BTreeMap<Seq, usize> = BTreeMap::new();
    // Takes one frame off the connection: the answer of a request in flight.
    let take = |frame: Frame, waiting: &mut BTreeMap<Seq, usize>, answers: &mut [Option<OpResult>]| match frame.msg {
        Msg::Reply { seq, result } => match waiting.remove(&seq) {
            Some(i) => {
                answers[i] = Some(result);
                Ok(())
            }
            None => Err(FrontError::Protocol(format!("a reply to request {seq}, which is not in flight"))),
        },
        other => Err(FrontError::Protocol(format!("unexpected {} answering a batch of uploads", other.kind()))),
    };
    let mut buf = vec![0u8; CHUNK_SIZE];
    for i in 0..items.len() {
        if answers[i].is_some() {
            continue;
        }
        while waiting.len() as u64 >= REQUEST_WINDOW {
            match conn.recv() {
                Ok(f) => take(f, &mut waiting, answers)?,
                Err(e) => return Ok(Some(e)),
            }
        }
        let seq = *seqs[i].get_or_insert_with(|| {
            *turn = turn.next();
            *turn
        });
        let item = &mut items[i];
        let eager = item.size < SMALL_UPLOAD;
        let op = Op::Upload {
            path: item.path.clone(),
            size: item.size,
            mtime_ms: item.mtime_ms,
            base: item.base,
            exec: item.exec,
            eager,
        };
        if let Err(e) = conn.send(&Msg::Request { seq, op }, &[]) {
            return Ok(Some(e));
        }
        // A small file's bytes follow its request at once (eager). A larger
        // one's wait for its proceed (or its answer, when refused or answered
        // before), which comes after the answers of requests before it that are
        // ready by then.
        if !eager {
            loop {
                let frame = match conn.recv() {
                    Ok(f) => f,
                    Err(e) => return Ok(Some(e)),
                };
                match frame.msg {
                    Msg::Proceed { seq: s } if s == seq => break,
                    Msg::Reply { seq: s, result } if s == seq => {
                        answers[i] = Some(result);
                        break;
                    }
                    _ => take(frame, &mut waiting, answers)?,
                }
            }
        }
        if answers[i].is_some() {
            continue;
        }
        let path = item.path.clone();
        let local = |e: std::io::Error| FrontError::Local(format!("cannot read {path}: {e}"));
        item.file.seek(SeekFrom::Start(0)).map_err(local)?;
        let (mut sent, mut hasher) = (0u64, Hasher::new());
        while sent < item.size {
            let want = (item.size - sent).min(CHUNK_SIZE as u64) as usize;
            let n = item.file.read(&mut buf[..want]).map_err(local)?;
            if n == 0 {
                break; // the file shrank: the server sees a short upload and refuses it
            }
            hasher.update(&buf[..n]);
            if let Err(e) = conn.send(&Msg::Chunk { seq }, &buf[..n]) {
                return Ok(Some(e));
            }
            sent += n as u64;
        }
        if let Err(e) = conn.send(&Msg::UploadEnd { seq, hash: hasher.finish() }, &[]) {
            return Ok(Some(e));
        }
        waiting.insert(seq, i);
    }
    while !waiting.is_empty() {
        match conn.recv() {
            Ok(f) => take(f, &mut waiting, answers)?,
            Err(e) => return Ok(Some(e)),
        }
    }
    Ok(None)
}

impl Frontend {
    /// Changes the user's password: the account's new keys, derived here from
    /// `new`, go to the server (never the password); once it has stored them, the
    /// front-end's later logins use `new`. The server's answer
    /// ([`OpResult::PasswordChanged`], or an error).
    pub fn change_password(&self, new: &str) -> Result<OpResult, FrontError> {
        let mut fresh = Password::new(new);
        let credentials = fresh.credentials().map_err(|e| FrontError::Local(e.to_string()))?;
        let result = self.request(Op::Passwd { credentials })?;
        if result == OpResult::PasswordChanged {
            *self.shared.cfg.password.lock() = fresh;
        }
        Ok(result)
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
        OpResult::PasswordChanged => "password_changed",
        OpResult::Error { .. } => "error",
        OpResult::Unavailable { .. } => "unavailable",
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
    // A working session again (a new primary's callback needs no password): a
    // wrong password refused earlier says nothing about the next loss.
    *shared.denied.lock().unwrap_or_else(|p| p.into_inner()) = None;
    if let Some(old) = old {
        // A new primary called while the old connection still looked alive (its
        // server is stale): its requests resend on the new one.
        let _ = old.writer.lock().unwrap_or_else(|p| p.into_inner()).shutdown(std::net::Shutdown::Both);
    }
    *shared.lost_at.lock().unwrap_or_else(|p| p.into_inner()) = None;
    shared.flaps.lock().unwrap_or_else(|p| p.into_inner()).0 = Instant::now();
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
    // Early copies still arriving are deleted when this connection ends.
    let mut arrivals = early::Arrivals::default();
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
                Msg::EarlyBegin { xfer, path, size } => {
                    // Chunks of a copy not begun here are ignored, and so is its end.
                    let dir = shared.early.lock().unwrap_or_else(|p| p.into_inner()).dir_for(&path);
                    match dir.and_then(|dir| arrivals.begin(&dir, &xfer, &path, size)) {
                        Ok(()) => log::debug!("receiving an early copy of {path} ({size} bytes)"),
                        Err(why) => log::info!("not taking an early copy of {path}: {why}"),
                    }
                }
                Msg::EarlyChunk { xfer } => {
                    if let Err(why) = arrivals.chunk(&xfer, &frame.payload) {
                        log::info!("dropping an early copy: {why}");
                    }
                }
                Msg::EarlyEnd { xfer, hash } => match arrivals.end(&xfer, hash) {
                    Ok(Some(copy)) => {
                        log::debug!("early copy of {} whole", copy.path);
                        shared.early.lock().unwrap_or_else(|p| p.into_inner()).put(copy);
                    }
                    Ok(None) => {}
                    Err(why) => log::warn!("dropping an early copy: {why}"),
                },
                Msg::EarlyAbort { xfer } => arrivals.abort(&xfer),
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
    let pause = {
        let mut flaps = shared.flaps.lock().unwrap_or_else(|p| p.into_inner());
        flaps.1 = if flaps.0.elapsed() < STABLE_AFTER { flaps.1.saturating_add(1) } else { 0 };
        flap_pause(flaps.1)
    };
    let s = shared.clone();
    let _ = std::thread::Builder::new().name("frontend-reconnect".into()).spawn(move || reconnect(s, pause));
}

/// While the session has no primary: waits for a new primary's call, and tries
/// the server given on the command line again (it may be back, or redirect to
/// the new primary), with a pause that doubles after each failure.
fn reconnect(shared: Arc<Shared>, first_pause: Duration) {
    let mut delay = first_pause.max(RETRY_FIRST);
    let mut said_no_primary = false;
    if !first_pause.is_zero() {
        log::info!(
            "the last connection lasted less than {STABLE_AFTER:?}: waiting {first_pause:?} before logging in again"
        );
        let guard = shared.conn.lock().unwrap_or_else(|p| p.into_inner());
        let _ = shared.changed.wait_timeout_while(guard, first_pause, |c| {
            c.is_none() && !*shared.closing.lock().unwrap_or_else(|p| p.into_inner())
        });
    }
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
        match login(&shared.cfg, shared.callback_port, false) {
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
            Err(FrontError::WrongPassword) => {
                // Trying again would only feed the server's failed-login throttle
                // (and slow the user's other devices down).
                log::warn!("server refused the new login: wrong password (changed on another device?); giving up");
                *shared.denied.lock().unwrap_or_else(|p| p.into_inner()) = Some(FrontError::WrongPassword);
                shared.changed.notify_all();
                let _ = shared.events.send(FrontEvent::Lost("login refused: wrong password".into()));
                return;
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
    use std::sync::atomic::AtomicUsize;

    /// A server that speaks just enough of the protocol: every download is answered
    /// with more bytes than it announced (then the rest of the download), every list
    /// with an empty listing. It accepts any number of connections.
    fn overlong_download_server() -> SocketAddr {
        let (addr, _) = fake_server(|mut s, _| {
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
                            exec: false,
                            dir: false,
                        };
                        write_frame(&mut s, Epoch(0), &Msg::Reply { seq, result: OpResult::Data { meta } }, &[])
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
        addr
    }

    /// A fake server on 127.0.0.1 that takes any number of connections, each on
    /// its own thread: the hello, a password login with "pw" ([`fake_login`]),
    /// `welcome`, then `serve` with the stream and the connection's number (from
    /// 0). It counts the connections it took.
    fn fake_server(serve: impl Fn(TcpStream, usize) + Clone + Send + 'static) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        std::thread::spawn(move || {
            for (n, stream) in listener.incoming().enumerate() {
                let Ok(mut s) = stream else { return };
                counted.fetch_add(1, Ordering::SeqCst);
                let serve = serve.clone();
                std::thread::spawn(move || {
                    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    let Ok(Some(_hello)) = read_frame(&mut s) else { return };
                    if !fake_login(&mut s) {
                        return;
                    }
                    let welcome = Msg::Welcome { devices: 1, last_seq: Seq(0) };
                    write_frame(&mut s, Epoch(0), &welcome, &[]).unwrap();
                    serve(s, n);
                });
            }
        });
        (addr, connections)
    }

    /// The bytes the batch server holds for `path`.
    fn batch_content(path: &str) -> Vec<u8> {
        format!("the bytes of {path}\n").repeat(50).into_bytes()
    }

    /// A server for batched downloads: it has every path but "missing"; with
    /// `hang_up`, on its first connection it serves three downloads whole, then
    /// the start of the fourth, and hangs up. It counts the connections it took.
    fn batch_server(hang_up: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        fake_server(move |mut s, n| {
            let mut served = 0;
            while let Ok(Some(frame)) = read_frame(&mut s) {
                let Msg::Request { seq, op: Op::Download { path } } = frame.msg else { continue };
                if path == "missing" {
                    let result = OpResult::Gone { path };
                    write_frame(&mut s, Epoch(0), &Msg::Reply { seq, result }, &[]).unwrap();
                    continue;
                }
                let bytes = batch_content(&path);
                let mut h = Hasher::new();
                h.update(&bytes);
                let meta = FileMeta {
                    path,
                    version: Version(1),
                    size: bytes.len() as u64,
                    mtime_ms: 0,
                    hash: h.finish(),
                    deleted: false,
                    atime_ms: 0,
                    ctime_ms: 0,
                    exec: false,
                    dir: false,
                };
                let _ = write_frame(&mut s, Epoch(0), &Msg::Reply { seq, result: OpResult::Data { meta } }, &[]);
                let (first, rest) = bytes.split_at(bytes.len() / 2);
                let _ = write_frame(&mut s, Epoch(0), &Msg::Chunk { seq }, first);
                if hang_up && n == 0 && served == 3 {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                    return;
                }
                let _ = write_frame(&mut s, Epoch(0), &Msg::Chunk { seq }, rest);
                let _ = write_frame(&mut s, Epoch(0), &Msg::DownloadEnd { seq, hash: h.finish() }, &[]);
                served += 1;
            }
        })
    }

    /// A front-end's settings for alice (password "pw") at a fake server.
    fn test_config(server: SocketAddr) -> Config {
        Config {
            user: "alice".into(),
            device: DeviceId("0123456789abcdef".into()),
            server: server.to_string(),
            bind: None,
            callback_port: 0,
            failover_wait: Duration::from_secs(30),
            password: SharedPassword::new("pw"),
            create_account: false,
        }
    }

    /// A batch of downloads whose connection dies in the middle of a file gets
    /// every file whole (the unfinished one started afresh), and a refusal in its
    /// own place.
    #[test]
    fn a_batch_of_downloads_survives_a_lost_connection_and_keeps_its_order() {
        let (server, _) = batch_server(true);
        let (front, _events, _login) = Frontend::connect(test_config(server)).unwrap();
        let dir = std::env::temp_dir().join(format!("replibox-frontend-batch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let paths: Vec<String> = (0..20).map(|i| if i == 5 { "missing".into() } else { format!("f{i}") }).collect();
        let mut items: Vec<DownloadItem> = paths
            .iter()
            .enumerate()
            .map(|(i, p)| DownloadItem { path: p.clone(), file: File::create(dir.join(i.to_string())).unwrap() })
            .collect();
        let answers = front.download_batch(&mut items).unwrap();
        assert_eq!(answers.len(), paths.len());
        for (i, (path, answer)) in paths.iter().zip(&answers).enumerate() {
            if path == "missing" {
                assert_eq!(answer, &Err(OpResult::Gone { path: path.clone() }), "the refusal, in its place");
                continue;
            }
            let meta = answer.as_ref().unwrap_or_else(|e| panic!("{path}: {e:?}"));
            assert_eq!(&meta.path, path, "answer {i} is for its own file");
            assert_eq!(std::fs::read(dir.join(i.to_string())).unwrap(), batch_content(path), "{path} arrived whole");
        }
        front.logout();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Issue 11: a batch whose files cannot be written here (a full disk; here a
    /// destination that cannot be truncated) fails plainly but keeps its
    /// connection: the downloads already in flight are read to their end, no
    /// more are asked for, and the next batch goes out on the same connection.
    #[test]
    fn a_batch_that_cannot_write_here_fails_but_keeps_its_connection() {
        let (server, connections) = batch_server(false);
        let (front, _events, _login) = Frontend::connect(test_config(server)).unwrap();
        let dir = std::env::temp_dir().join(format!("replibox-frontend-batch-fail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str| File::create(dir.join(name)).unwrap();
        // ftruncate(2) of /dev/full fails (EINVAL): the third file's destination
        // cannot be prepared while the first two are in flight.
        let full = File::options().write(true).open("/dev/full").unwrap();
        let mut items = vec![
            DownloadItem { path: "f0".into(), file: file("0") },
            DownloadItem { path: "f1".into(), file: file("1") },
            DownloadItem { path: "f2".into(), file: full },
            DownloadItem { path: "f3".into(), file: file("3") },
        ];
        let got = front.download_batch(&mut items);
        assert!(matches!(got, Err(FrontError::Local(ref m)) if m.contains("cannot write f2")), "{got:?}");

        let mut again = vec![DownloadItem { path: "f4".into(), file: file("4") }];
        let answers = front.download_batch(&mut again).unwrap();
        assert!(matches!(answers.as_slice(), [Ok(meta)] if meta.path == "f4"), "{answers:?}");
        assert_eq!(std::fs::read(dir.join("4")).unwrap(), batch_content("f4"), "f4 arrived whole");
        assert_eq!(connections.load(Ordering::SeqCst), 1, "the failed batch cost a new connection");
        front.logout();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The server's side of a password login of any user with password "pw" (few
    /// iterations, so that the test stays fast). False if the login failed.
    fn fake_login(s: &mut TcpStream) -> bool {
        use replibox_proto::auth::{ScramServer, ServerStep, StoredCredentials};
        let next = |s: &mut TcpStream| match read_frame(s) {
            Ok(Some(Frame { msg: Msg::Auth(m), .. })) => Some(m),
            _ => None,
        };
        let Some(first) = next(s) else { return false };
        let mut login = ScramServer::new(first).unwrap();
        let credentials = StoredCredentials::derive("pw", b"0123456789abcdef", 4096).unwrap();
        let challenge = login.challenge(Some(credentials)).unwrap();
        write_frame(&mut *s, Epoch(0), &Msg::Auth(challenge), &[]).unwrap();
        let Some(last) = next(s) else { return false };
        match login.step(last) {
            Ok(ServerStep::LoggedIn { reply, .. }) => write_frame(&mut *s, Epoch(0), &Msg::Auth(reply), &[]).is_ok(),
            _ => false,
        }
    }

    /// A request that fails part-way leaves frames of its own on the connection;
    /// the next request must not take them for its answer.
    #[test]
    fn a_request_that_fails_part_way_leaves_nothing_for_the_next_one() {
        let server = overlong_download_server();
        let (front, _events, _login) = Frontend::connect(test_config(server)).unwrap();
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
