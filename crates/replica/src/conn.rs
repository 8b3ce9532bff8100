//! One thread per connection: the opening (a server's cluster handshake, a
//! client's hello and password login, a status query), then what follows it.
//!
//! The reader thread owns the socket's read side. Frames going out share the write
//! side behind a mutex, so a download streamed by the replies thread and a push
//! written by the connection's push thread interleave only at frame boundaries.

use crate::cluster::ClusterAuth;
use crate::core::{ask, AccountOutcome, ConnId, CoreRequest, Event, Route, Welcome};
use crate::early::EarlyOut;
use crate::link::{DataSender, LinkOut};
use crate::uploads::{Temps, UploadRoute};
use crossbeam_channel::{unbounded, Sender};
use replibox_proto::auth::{accept_server, Admission, Frames, Refusal, ScramServer, ServerStep, SessionKey};
use replibox_proto::durable::{ReadBehind, WriteBehind};
use replibox_proto::{
    read_frame, validate_path, validate_username, write_frame, AuthError, AuthMsg, DeviceId, Epoch, Frame, Hasher, Msg,
    Op, OpResult, ProtoError, Purpose, Receipt, Seq, Who, CHUNK_SIZE, EARLY_MIN, PROTOCOL_VERSION,
};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a peer may stay silent before the connection is given up. Clients send
/// a ping every few seconds while idle.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the first frame may take.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a write may block before the peer is considered stuck.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one whole frame may take to arrive once its first byte has (after
/// the hello): a peer trickling a byte now and then, each within
/// [`READ_TIMEOUT`], cannot hold a connection's threads for ever. A frame is at
/// most 64 KiB of header and 1 MiB of payload, so this asks for about 35 KB/s.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(30);

/// The write side of a connection, shared by the threads that send on it.
#[derive(Clone)]
pub struct FrameWriter {
    stream: Arc<Mutex<TcpStream>>,
    epoch: Arc<AtomicU64>,
}

impl FrameWriter {
    /// Wraps a clone of the stream; frames carry the server's current epoch.
    pub fn new(stream: TcpStream, epoch: Arc<AtomicU64>) -> FrameWriter {
        FrameWriter { stream: Arc::new(Mutex::new(stream)), epoch }
    }

    /// Writes one frame, stamped with the highest epoch heard.
    pub fn send(&self, msg: &Msg, payload: &[u8]) -> Result<(), ProtoError> {
        self.send_at(self.heard(), msg, payload)
    }

    /// Writes one frame as [`FrameWriter::send`] does, but only if `still`
    /// holds once no other frame is being written: true if it was written.
    /// What `still` reads is decided before any frame written after this one.
    pub fn send_if(&self, still: impl FnOnce() -> bool, msg: &Msg, payload: &[u8]) -> Result<bool, ProtoError> {
        let mut s = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        if !still() {
            return Ok(false);
        }
        write_frame(&mut *s, self.heard(), msg, payload).map(|()| true)
    }

    /// The highest epoch heard, which frames are stamped with.
    fn heard(&self) -> Epoch {
        Epoch(self.epoch.load(Ordering::Relaxed))
    }

    /// Writes one frame stamped with `epoch`: the one its content was decided in.
    pub fn send_at(&self, epoch: Epoch, msg: &Msg, payload: &[u8]) -> Result<(), ProtoError> {
        let mut s = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        write_frame(&mut *s, epoch, msg, payload)
    }

    /// Another handle on the socket (to shut it down from elsewhere).
    pub fn stream(&self) -> Option<TcpStream> {
        self.stream.lock().unwrap_or_else(|p| p.into_inner()).try_clone().ok()
    }

    /// Shuts the connection down, both ways.
    pub fn shutdown(&self) {
        let s = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        let _ = s.shutdown(Shutdown::Both);
    }
}

/// Reads from a socket until a deadline for all the reads together.
struct Deadline<'a> {
    stream: &'a TcpStream,
    until: Instant,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut s = self.stream;
        s.read(buf)
    }
}

/// Where a connection's frames come from, one whole frame at a time.
pub trait FrameSource {
    /// The next frame; `Ok(None)` when the stream ends between frames.
    fn next_frame(&mut self) -> Result<Option<Frame>, ProtoError>;
    /// Why the last `next_frame` failed, when the source itself gave up (a frame
    /// that did not arrive whole in time), rather than the stream.
    fn gave_up(&self) -> Option<String> {
        None
    }
}

impl<R: Read> FrameSource for std::io::BufReader<R> {
    fn next_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
        read_frame(self)
    }
}

/// A socket read with two bounds: [`READ_TIMEOUT`] of silence between two
/// reads, and [`FRAME_TIMEOUT`] for a whole frame from its first byte.
struct Paced {
    stream: TcpStream,
    /// When the frame under way must be complete (None between frames).
    until: Option<Instant>,
    overdue: bool,
}

impl Read for Paced {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let wait = match self.until {
            None => READ_TIMEOUT,
            Some(t) => {
                let left = t.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    self.overdue = true;
                    return Err(std::io::ErrorKind::TimedOut.into());
                }
                left.min(READ_TIMEOUT)
            }
        };
        self.stream.set_read_timeout(Some(wait))?;
        let n = match (&self.stream).read(buf) {
            // The wait was the frame's deadline, not the silence bound: the
            // frame is overdue (else the log would name a bare i/o timeout).
            Err(e)
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
                    && wait < READ_TIMEOUT =>
            {
                self.overdue = true;
                return Err(std::io::ErrorKind::TimedOut.into());
            }
            other => other?,
        };
        if n > 0 && self.until.is_none() {
            self.until = Some(Instant::now() + FRAME_TIMEOUT);
        }
        Ok(n)
    }
}

/// The read side of a logged-in client's (or a fetching backup's) connection:
/// buffered, and with a deadline for each whole frame (see [`FRAME_TIMEOUT`]).
pub struct FrameReader {
    inner: std::io::BufReader<Paced>,
}

impl FrameReader {
    /// Reads frames from `stream` (which must hold no frame read in part).
    pub fn new(stream: TcpStream) -> FrameReader {
        FrameReader {
            inner: std::io::BufReader::with_capacity(64 * 1024, Paced { stream, until: None, overdue: false }),
        }
    }
}

impl FrameSource for FrameReader {
    fn next_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
        // Bytes already buffered belong to the next frame: it has begun.
        let begun = !self.inner.buffer().is_empty();
        let paced = self.inner.get_mut();
        paced.until = begun.then(|| Instant::now() + FRAME_TIMEOUT);
        paced.overdue = false;
        read_frame(&mut self.inner)
    }

    fn gave_up(&self) -> Option<String> {
        self.inner.get_ref().overdue.then(|| format!("a frame did not arrive whole within {FRAME_TIMEOUT:?}"))
    }
}

/// What every connection thread needs.
#[derive(Clone)]
pub struct Ctx {
    /// The core's queue.
    pub core: Sender<Event>,
    /// The server's epoch, stamped on every frame.
    pub epoch: Arc<AtomicU64>,
    /// How long an upload waits for a backup's queue before leaving it out.
    pub ack_timeout: Duration,
    /// How often a link's writer pings an idle backup.
    pub heartbeat: Duration,
    /// Numbers replication links.
    pub links: Arc<AtomicU64>,
    /// Numbers connections (the accept loop's and the callbacks').
    pub conns: Arc<AtomicU64>,
    /// The server listens on every address (it learns its own from links).
    pub bound_to_any: bool,
    /// The port it listens on.
    pub port: u16,
    /// The cluster key and this server's id, for the handshake that opens every
    /// server-to-server connection.
    pub cluster: Arc<ClusterAuth>,
    /// Makes uploads' temporary files.
    pub temps: Arc<Temps>,
    /// The backups an upload streams to, as the core last published them.
    pub route: Arc<UploadRoute>,
    /// Every user's logged-in sessions, for early copies of large uploads.
    pub devices: Arc<crate::early::Devices>,
}

/// Why a client connection ended.
#[derive(Debug)]
pub enum End {
    /// The client said bye: its session ends.
    Bye,
    /// The stream ended between frames.
    Clean,
    Proto(ProtoError),
    Violation(String),
    Refused(String),
    CoreGone,
    /// The replies thread could not send an answer and closed the connection
    /// (its own log line says why).
    RepliesEnded,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Bye => f.write_str("the client logged out"),
            End::Clean => f.write_str("closed by peer"),
            End::Proto(e) => write!(f, "{e}"),
            End::Violation(s) => write!(f, "protocol violation: {s}"),
            End::Refused(r) => write!(f, "login refused: {r}"),
            End::CoreGone => f.write_str("server shutting down"),
            End::RepliesEnded => f.write_str("an answer could not be sent"),
        }
    }
}

impl From<ProtoError> for End {
    fn from(e: ProtoError) -> Self {
        End::Proto(e)
    }
}

/// Serves one accepted connection until it ends. Its first frame says who
/// speaks: a server opens with the cluster key's challenge (`auth`
/// `server_challenge`), anyone else with a `hello` (a client's is followed by the
/// first step of its password login).
pub fn serve(stream: TcpStream, conn: ConnId, ctx: Ctx) {
    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let writer = match stream.try_clone() {
        Ok(s) => FrameWriter::new(s, ctx.epoch.clone()),
        Err(e) => {
            log::warn!("dropping connection peer={peer}: cannot clone socket: {e}");
            return;
        }
    };
    // The opening frames are read unbuffered against one deadline for all of
    // them, so a peer trickling a byte at a time cannot hold this thread.
    let until = Instant::now() + HELLO_TIMEOUT;
    let first = match read_opening(&stream, until, &peer, "hello") {
        Some(f) => f,
        None => return,
    };
    match first.msg {
        Msg::Auth(challenge @ AuthMsg::ServerChallenge { .. }) => {
            serve_server(stream, writer, ctx, challenge, until, peer);
            return;
        }
        Msg::Hello { version, .. } if version != PROTOCOL_VERSION => {
            log::warn!("closing connection peer={peer}: protocol version {version}, want {PROTOCOL_VERSION}");
            let reason = format!("protocol version {version} is not supported; this server speaks {PROTOCOL_VERSION}");
            let _ = writer.send(&Msg::Refused { reason }, &[]);
        }
        Msg::Hello { who: Who::Status, .. } => {
            if let Some(status) = ask(&ctx.core, |reply| Event::Status { reply }) {
                let _ = writer.send(&Msg::Status { status }, &[]);
            }
        }
        Msg::Hello { who: Who::Client { user, device, callback_port }, .. } => {
            let refusal = validate_username(&user).map_err(|e| e.to_string()).and_then(|_| device.validate());
            if let Err(reason) = refusal {
                log::warn!("refused client peer={peer}: {reason}");
                let _ = writer.send(&Msg::Refused { reason }, &[]);
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
            // A client sends its first login step right behind a valid hello:
            // read it before answering anything else, so that no answer is
            // written while a frame of the client's sits unread (closing then
            // would reset the connection, and the client could lose the answer).
            let Some(next) = read_opening(&stream, until, &peer, "first login step") else { return };
            let hello = ClientHello { user, device, callback_port };
            // A login step may take the client a while (it derives a key from
            // the password, slow on purpose); then its session's pings pace it.
            // Each frame has FRAME_TIMEOUT to arrive whole once begun.
            let mut reader = FrameReader::new(stream);
            serve_client(&mut reader, &writer, conn, &ctx, hello, next.msg, peer);
            writer.shutdown();
            return;
        }
        Msg::Hello { who: Who::Primary { .. }, .. } => {
            let reason = "a server calls clients back; it is not called back".to_string();
            let _ = writer.send(&Msg::Refused { reason }, &[]);
        }
        Msg::Hello { who, .. } => {
            // A server role without the cluster handshake first: a server of
            // another version, or a stranger. It reads nothing.
            log::warn!(
                "refused an unauthenticated server connection peer={peer} role={}: servers open with the cluster key's handshake",
                role(&who)
            );
            let reason = "server connections must open with the cluster key's handshake".to_string();
            let _ = writer.send(&Msg::Refused { reason }, &[]);
        }
        other => {
            log::warn!("closing connection peer={peer}: first frame is {} not hello", other.kind());
            let _ = writer.send(&Msg::Refused { reason: "the first frame must be a hello".into() }, &[]);
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
}

/// Reads one of a connection's opening frames before the deadline; None (logged)
/// when the connection ends or fails first.
fn read_opening(stream: &TcpStream, until: Instant, peer: &str, what: &str) -> Option<Frame> {
    match read_frame(&mut Deadline { stream, until }) {
        Ok(Some(f)) => Some(f),
        Ok(None) => None,
        Err(e) if e.is_timeout() => {
            log::warn!("closing connection peer={peer}: no complete {what} within {HELLO_TIMEOUT:?}");
            None
        }
        Err(e) => {
            log::warn!("closing connection peer={peer}: bad {what}: {e}");
            None
        }
    }
}

/// A hello's role, for logs.
fn role(who: &Who) -> &'static str {
    match who {
        Who::Client { .. } => "client",
        Who::Status => "status",
        Who::Server { .. } => "server",
        Who::Peer { .. } => "peer",
        Who::Primary { .. } => "primary",
        Who::Fetch { .. } => "fetch",
    }
}

/// Another server: the cluster handshake, then its hello, which must be for the
/// purpose and the id the handshake proved; then its link, fetches or election
/// message. Nothing is read or sent before the handshake but the handshake.
fn serve_server(stream: TcpStream, writer: FrameWriter, ctx: Ctx, challenge: AuthMsg, until: Instant, peer: String) {
    let epoch = Epoch(ctx.epoch.load(Ordering::Relaxed));
    let mut t = Frames { reader: Deadline { stream: &stream, until }, writer: &stream, epoch };
    let proven = match accept_server(&mut t, &ctx.cluster.key, ctx.cluster.me(), challenge) {
        Ok(p) => p,
        Err(e) => {
            log::warn!("refused a server connection peer={peer}: {e}");
            return;
        }
    };
    let Some(hello) = read_opening(&stream, until, &peer, "hello after the cluster handshake") else { return };
    let hello_epoch = hello.epoch;
    let who = match hello.msg {
        Msg::Hello { who, .. } => who,
        other => {
            log::warn!("closing server connection peer={peer}: {} instead of a hello", other.kind());
            return;
        }
    };
    let matches = match (&who, proven.purpose) {
        (Who::Server { id, .. }, Purpose::Link) => *id == proven.id,
        (Who::Fetch { id }, Purpose::Fetch) | (Who::Peer { id }, Purpose::Election) => Some(*id) == proven.id,
        _ => false,
    };
    if !matches {
        log::warn!(
            "refused a server connection peer={peer}: its hello (role {}) is not what its handshake proved \
             (purpose {}, id {:?})",
            role(&who),
            proven.purpose.as_str(),
            proven.id
        );
        let reason = "the hello does not match the cluster handshake".to_string();
        let _ = writer.send(&Msg::Refused { reason }, &[]);
        return;
    }
    let core = ctx.core.clone();
    let mut reader = std::io::BufReader::with_capacity(64 * 1024, stream);
    match who {
        Who::Server { id, ip, port, pos, last_epoch, member } => {
            match ask(&core, |reply| Event::Route { reply }) {
                Some(Route::Here) => {}
                Some(Route::At(primary)) => {
                    log::info!("redirecting joining server peer={peer} to primary={primary}");
                    let _ = writer.send(&Msg::Redirect { primary }, &[]);
                    return;
                }
                Some(Route::Unknown) | None => {
                    // Not a refusal (which would make the joiner give up): it tries
                    // again until this server knows the primary.
                    log::info!("closing join from peer={peer}: this backup does not know the primary yet");
                    let reason = "this server does not know the primary yet".to_string();
                    let _ = writer.send(&Msg::NotPrimary { reason }, &[]);
                    return;
                }
            }
            drop(writer);
            let stream = reader.into_inner();
            let hello = crate::link::Hello { id, ip, port, pos, last_epoch, member };
            crate::link::serve_link(stream, ctx, hello_epoch, hello, peer);
            return;
        }
        Who::Peer { id } => {
            let _ = reader.get_ref().set_read_timeout(Some(HELLO_TIMEOUT));
            crate::peer::serve(&mut reader, &writer, &core, id, &peer);
        }
        Who::Fetch { id } => {
            if let Ok(peer_ip) = reader.get_ref().peer_addr().map(|a| a.ip()) {
                let mut reader = FrameReader::new(reader.into_inner());
                serve_fetch(&mut reader, &writer, &core, id, &peer, peer_ip);
            }
        }
        // `matches` above admits no other role.
        Who::Client { .. } | Who::Status | Who::Primary { .. } => {}
    }
    writer.shutdown();
}

/// What a client's hello says.
struct ClientHello {
    user: String,
    device: DeviceId,
    callback_port: u16,
}

/// A client: its password login (the first step of which came behind its hello),
/// then its session.
fn serve_client<R: FrameSource>(
    reader: &mut R,
    writer: &FrameWriter,
    conn: ConnId,
    ctx: &Ctx,
    hello: ClientHello,
    first: Msg,
    peer: String,
) {
    let core = &ctx.core;
    let ClientHello { user, device, callback_port } = hello;
    let refuse = |reason: String| {
        let _ = writer.send(&Msg::Refused { reason }, &[]);
    };
    let first = match first {
        Msg::Auth(first @ AuthMsg::ScramClientFirst { .. }) => first,
        other => {
            log::warn!("refused client peer={peer}: {} after its hello, not a password login", other.kind());
            return refuse("a client's hello must be followed by scram_client_first (a password login)".into());
        }
    };
    match ask(core, |reply| Event::Route { reply }) {
        None => return,
        Some(Route::Here) => {}
        Some(Route::At(primary)) => {
            log::info!("redirecting client user={user} peer={peer} to primary={primary}");
            let _ = writer.send(&Msg::Redirect { primary }, &[]);
            return;
        }
        Some(Route::Unknown) => {
            return refuse("this server knows no primary right now (an election may be under way); try again".into());
        }
    }
    let Some(session_key) = password_login(reader, writer, core, &user, first, &peer) else { return };
    let ip = match peer.parse::<std::net::SocketAddr>() {
        Ok(a) => a.ip().to_string(),
        Err(_) => String::new(),
    };
    let client = Client {
        conn,
        user,
        device,
        core: core.clone(),
        writer: writer.clone(),
        peer,
        ack_timeout: ctx.ack_timeout,
        temps: ctx.temps.clone(),
        route: ctx.route.clone(),
        devices: ctx.devices.clone(),
    };
    let (out_tx, out_rx) = unbounded::<Msg>();
    let login = |reply| Event::Login {
        conn,
        user: client.user.clone(),
        device: client.device.clone(),
        ip,
        callback_port,
        token: session_key.to_hex(),
        out: out_tx,
        stream: writer.stream(),
        reply,
    };
    let end = match ask(core, login) {
        None => End::CoreGone,
        Some(Err(reason)) => {
            let _ = client.send(&Msg::Refused { reason: reason.clone() });
            End::Refused(reason)
        }
        Some(Ok(Welcome { devices, last_seq })) => match client.send(&Msg::Welcome { devices, last_seq }) {
            Err(e) => e,
            Ok(()) => client.serve(reader, out_rx),
        },
    };
    client.ended(&end);
}

/// The server's side of a password login (SCRAM-SHA-256 style; see
/// `replibox_proto::auth::scram`): a new user's account is created (replicated)
/// before the login goes on; an existing one's proof is checked no sooner than the
/// failed-login throttle allows, and a wrong one is counted there and logged. The
/// session key when the password is proven (the server's proof is sent); None when
/// the login ended (the client was told why).
fn password_login<R: FrameSource>(
    reader: &mut R,
    writer: &FrameWriter,
    core: &Sender<Event>,
    user: &str,
    first: AuthMsg,
    peer: &str,
) -> Option<SessionKey> {
    let tell = |msg: AuthMsg| {
        let _ = writer.send(&Msg::Auth(msg), &[]);
    };
    let fail = |e: &AuthError| {
        if let Some(refusal) = e.refusal() {
            tell(refusal);
        }
    };
    let mut login = match ScramServer::new(first) {
        Ok(l) => l,
        Err(e) => {
            log::warn!("refused login peer={peer}: {e}");
            fail(&e);
            return None;
        }
    };
    if login.user() != user {
        log::warn!("refused login peer={peer}: its hello names user {user}, its login {}", login.user());
        let e = AuthError::InvalidUser("the hello and the login name two different users".into());
        fail(&e);
        return None;
    }
    let start = ask(core, |reply| Event::LoginStart { user: user.to_string(), reply })?;
    let verify_at = match start.admission {
        Admission::Busy(wait) => {
            log::warn!(
                "refused login user={user} peer={peer}: too many failed logins ({} in a row); the next may come in {} ms",
                start.failures,
                wait.as_millis()
            );
            let secs = wait.as_secs_f64().ceil().max(1.0);
            tell(AuthMsg::Failed {
                why: Refusal::TryLater,
                detail: format!("too many failed logins of user {user} just now; try again in {secs} s"),
            });
            return None;
        }
        Admission::After(wait) => {
            if !wait.is_zero() {
                log::info!(
                    "delaying login user={user} peer={peer} by {} ms after {} failed logins",
                    wait.as_millis(),
                    start.failures
                );
            } else if let (1.., Some(since)) = (start.failures, start.since_failure) {
                // Said too, so that the log shows every attempt after failures
                // kept its wait, whether the server or the client's own pace made it.
                log::info!(
                    "login user={user} peer={peer} after {} failed logins came {} ms after the last; not delayed",
                    start.failures,
                    since.as_millis()
                );
            }
            Instant::now() + wait
        }
    };
    let challenge = match login.challenge(start.account) {
        Ok(m) => m,
        Err(e) => {
            fail(&e);
            return None;
        }
    };
    tell(challenge);
    loop {
        let msg = match reader.next_frame() {
            Ok(Some(Frame { msg: Msg::Auth(m), .. })) => m,
            Ok(Some(f)) => {
                log::warn!("login of user={user} peer={peer} ended: {} in the middle of it", f.msg.kind());
                return None;
            }
            Ok(None) => return None,
            Err(e) => {
                log::warn!("login of user={user} peer={peer} ended: {e}");
                return None;
            }
        };
        if matches!(msg, AuthMsg::ScramClientFinal { .. }) {
            // The throttle's delay falls between the guess and its verdict.
            std::thread::sleep(verify_at.saturating_duration_since(Instant::now()));
        }
        match login.step(msg) {
            Ok(ServerStep::CreateAccount { credentials, reply }) => {
                let made = ask(core, |r| Event::CreateAccount { user: user.to_string(), credentials, reply: r })?;
                match made {
                    Ok(AccountOutcome::Created) => tell(reply),
                    Ok(AccountOutcome::Exists(existing)) => match login.challenge_existing(existing) {
                        Ok(challenge) => {
                            log::info!("account user={user} was created by another login meanwhile; peer={peer} goes on against it");
                            tell(challenge)
                        }
                        Err(e) => {
                            fail(&e);
                            return None;
                        }
                    },
                    Err(reason) => {
                        log::warn!("refused login user={user} peer={peer}: cannot create the account: {reason}");
                        tell(AuthMsg::Failed { why: Refusal::Unavailable, detail: reason });
                        return None;
                    }
                }
            }
            Ok(ServerStep::LoggedIn { reply, session_key }) => {
                tell(reply);
                return Some(session_key);
            }
            Err(e) => {
                if let AuthError::WrongPassword { .. } = e {
                    let _ = core.send(Event::LoginFailed { user: user.to_string(), peer: peer.to_string() });
                } else {
                    log::warn!("login of user={user} peer={peer} failed: {e}");
                }
                fail(&e);
                return None;
            }
        }
    }
}

/// How many downloads a connection may have opened and not yet sent. A device
/// asks for a burst's files up to [`replibox_proto::REQUEST_WINDOW`] at a time;
/// asked one after the other, each waited for the core to come round to it
/// (behind a group commit's fsyncs), and the other device fell seconds behind
/// the servers in a burst of 10,000 files. Each holds an open file
/// ([`crate::server::FDS_PER_CONNECTION`]).
pub const DOWNLOADS_AHEAD: usize = 8;

/// An answer a connection's replies thread sends, in request order.
enum Answer {
    /// Known at once (a refusal before the core is asked): it only keeps its turn.
    Ready(OpResult),
    /// A change's result, once stored everywhere.
    Change(crossbeam_channel::Receiver<OpResult>),
    /// A download: the file the core opened (or why not), then sent whole.
    Download(crossbeam_channel::Receiver<Result<(replibox_proto::FileMeta, std::fs::File), OpResult>>),
}

/// Where a connection's requests wait for their answers, in order.
struct Pending {
    /// The answers, in request order.
    queue: Sender<(Seq, Answer)>,
    /// A token per download asked for and not yet sent: at most
    /// [`DOWNLOADS_AHEAD`].
    ahead: Sender<()>,
}

impl Pending {
    /// Queues an answer behind those still on their way.
    fn push(&self, seq: Seq, answer: Answer) -> Result<(), End> {
        self.queue.send((seq, answer)).map_err(|_| End::RepliesEnded)
    }
}

/// A logged-in client's connection (or a called-back one, once resumed).
pub struct Client {
    /// The connection.
    pub conn: ConnId,
    /// Its user.
    pub user: String,
    /// Its device.
    pub device: DeviceId,
    /// The core.
    pub core: Sender<Event>,
    /// The connection's write side.
    pub writer: FrameWriter,
    /// Its peer address, for logs.
    pub peer: String,
    /// How long an upload waits for a backup's queue.
    pub ack_timeout: Duration,
    /// Makes uploads' temporary files.
    pub temps: Arc<Temps>,
    /// The backups an eager upload streams to without asking the core.
    pub route: Arc<UploadRoute>,
    /// Every user's logged-in sessions: this one joins while it serves, and a
    /// large upload is sent on early to the others.
    pub devices: Arc<crate::early::Devices>,
}

/// Serves a backup's fetches: each names a user's file, answered like a download
/// (seq 0): the metadata, the chunks, the end with the hash.
fn serve_fetch(
    reader: &mut FrameReader,
    writer: &FrameWriter,
    core: &Sender<Event>,
    id: replibox_proto::ServerId,
    peer: &str,
    peer_ip: std::net::IpAddr,
) {
    loop {
        let frame = match reader.next_frame() {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                let why = reader.gave_up().unwrap_or_else(|| e.to_string());
                log::warn!("fetch connection of backup id={id} peer={peer} closed: {why}");
                return;
            }
        };
        let (user, path) = match frame.msg {
            Msg::Fetch { user, path } => (user, path),
            Msg::Ping => {
                let _ = writer.send(&Msg::Pong, &[]);
                continue;
            }
            other => {
                log::warn!("fetch connection of backup id={id} peer={peer}: unexpected {}", other.kind());
                return;
            }
        };
        let valid = validate_username(&user)
            .map_err(|e| e.to_string())
            .and_then(|_| validate_path(&path).map_err(|e| e.to_string()));
        let answer = match valid {
            Err(message) => Err(OpResult::Error { message }),
            Ok(()) => match ask(core, |reply| Event::OpenFor { id, peer_ip, user, path, reply }) {
                Some(a) => a,
                None => return,
            },
        };
        let sent = match answer {
            Err(result) => writer.send(&Msg::Reply { seq: Seq(0), result }, &[]).is_ok(),
            Ok((meta, file)) => stream_file(writer, Seq(0), meta, file).is_ok(),
        };
        if !sent {
            return;
        }
    }
}

/// The replies thread of a client connection: sends each answer in request
/// order, a download's file whole, and takes back a download's token once it is
/// sent. The first answer that cannot be sent ends the connection (the device
/// then asks again, elsewhere if need be), with a line saying why.
fn send_answers(
    answers: crossbeam_channel::Receiver<(Seq, Answer)>,
    sent: crossbeam_channel::Receiver<()>,
    w: FrameWriter,
    conn: ConnId,
    peer: String,
) {
    // Why an answer was not sent, and how loud to say it: a device that went
    // away, or a core that stepped down (it says so itself), is routine; a
    // stored file that cannot be sent is the server's own trouble.
    let dropped = || Some((log::Level::Info, "the core dropped it (stepping down, or stopping)".to_string()));
    let socket = |e: ProtoError| (log::Level::Info, format!("writing to the device failed: {e}"));
    for (seq, answer) in answers {
        let reply = |result| w.send(&Msg::Reply { seq, result }, &[]).err().map(socket);
        let failed = match answer {
            Answer::Ready(result) => reply(result),
            Answer::Change(answer) => answer.recv().map_or_else(|_| dropped(), reply),
            Answer::Download(answer) => {
                let failed = match answer.recv() {
                    Ok(Err(result)) => reply(result),
                    Ok(Ok((meta, file))) => stream_file(&w, seq, meta, file).err().map(|end| match end {
                        End::Proto(e) => socket(e),
                        other => (log::Level::Warn, other.to_string()),
                    }),
                    Err(_) => dropped(),
                };
                // Sent (or given up): another download may be opened.
                let _ = sent.try_recv();
                failed
            }
        };
        if let Some((level, why)) = failed {
            log::log!(level, "closing conn={conn} peer={peer}: the answer to seq={seq} was not sent: {why}");
            w.shutdown();
            break;
        }
    }
}

/// Sends a file as a download: the metadata, its chunks, the end with the hash.
fn stream_file(writer: &FrameWriter, seq: Seq, meta: replibox_proto::FileMeta, file: std::fs::File) -> Result<(), End> {
    let size = meta.size;
    writer.send(&Msg::Reply { seq, result: OpResult::Data { meta } }, &[])?;
    // A small file's buffer is its size: a burst's downloads are mostly small.
    let mut buf = vec![0u8; size.min(CHUNK_SIZE as u64) as usize];
    let mut sent = 0u64;
    let mut hasher = Hasher::new();
    let mut file = ReadBehind::new(file);
    while sent < size {
        let want = (size - sent).min(CHUNK_SIZE as u64) as usize;
        let n = match file.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(End::Violation(format!("stored file shorter than its metadata ({sent} of {size} bytes)")))
            }
            Ok(n) => n,
            Err(e) => return Err(End::Violation(format!("reading stored file: {e}"))),
        };
        hasher.update(&buf[..n]);
        writer.send(&Msg::Chunk { seq }, &buf[..n])?;
        sent += n as u64;
    }
    writer.send(&Msg::DownloadEnd { seq, hash: hasher.finish() }, &[])?;
    Ok(())
}

impl Client {
    /// Writes one frame.
    pub fn send(&self, msg: &Msg) -> Result<(), End> {
        self.writer.send(msg, &[]).map_err(End::Proto)
    }

    fn ask<T>(&self, seq: Seq, make: impl FnOnce(Sender<T>) -> CoreRequest) -> Result<T, End> {
        ask(&self.core, |reply| Event::Request { conn: self.conn, seq, req: make(reply) }).ok_or(End::CoreGone)
    }

    /// Logs the end of the session and tells the core (a clean `bye` ends the
    /// session; anything else leaves it to its lease).
    pub fn ended(&self, end: &End) {
        match end {
            End::Clean => log::info!("connection closed conn={} peer={}", self.conn, self.peer),
            other => log::warn!("connection closed conn={} peer={}: {other}", self.conn, self.peer),
        }
        if !matches!(end, End::Refused(_)) {
            let _ = self.core.send(Event::Disconnect { conn: self.conn, clean: matches!(end, End::Bye) });
        }
    }

    /// Serves a logged-in session: pushes from the core go out through their own
    /// thread (the core never waits on this socket); requests are read here.
    pub fn serve<R: FrameSource>(&self, reader: &mut R, out_rx: crossbeam_channel::Receiver<Msg>) -> End {
        let _joined = self.devices.join(&self.user, self.conn, &self.device, self.writer.clone());
        let w = self.writer.clone();
        let name = format!("conn-{}-push", self.conn);
        let _ = std::thread::Builder::new().name(name).spawn(move || {
            for msg in out_rx {
                if w.send(&msg, &[]).is_err() {
                    break;
                }
            }
        });
        // Changing requests are answered by their own thread, in order, once the
        // core has stored them everywhere: meanwhile this thread reads the next
        // request, so a device may keep several in flight (a window) and their
        // replication overlaps. Bounded, so that a client that sends without
        // reading waits here instead of piling up work.
        // Downloads are answered by the same thread, in their turn: the reader
        // asks the core for the next files while one is sent.
        let (queue, answers) = crossbeam_channel::bounded::<(Seq, Answer)>(4 * crate::state::REQUEST_WINDOW as usize);
        let (ahead, sent_rx) = crossbeam_channel::bounded::<()>(DOWNLOADS_AHEAD);
        let pending = Pending { queue, ahead };
        let (w, conn, peer) = (self.writer.clone(), self.conn, self.peer.clone());
        let name = format!("conn-{}-replies", self.conn);
        let _ = std::thread::Builder::new().name(name).spawn(move || send_answers(answers, sent_rx, w, conn, peer));
        loop {
            let frame = match reader.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => return End::Clean,
                Err(e) => return reader.gave_up().map_or(End::Proto(e), End::Violation),
            };
            let result = match frame.msg {
                Msg::Ping => self.send(&Msg::Pong),
                Msg::Bye => return End::Bye,
                Msg::Request { seq, op } => self.request(reader, &pending, seq, op),
                other => Err(End::Violation(format!("unexpected {} outside a request", other.kind()))),
            };
            if let Err(end) = result {
                return end;
            }
        }
    }

    fn reply(&self, seq: Seq, result: OpResult) -> Result<(), End> {
        self.send(&Msg::Reply { seq, result })
    }

    /// Asks the core for a change and leaves its answer to the replies thread.
    fn ask_later(
        &self,
        pending: &Pending,
        seq: Seq,
        make: impl FnOnce(Sender<OpResult>) -> CoreRequest,
    ) -> Result<(), End> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.core.send(Event::Request { conn: self.conn, seq, req: make(tx) }).map_err(|_| End::CoreGone)?;
        pending.push(seq, Answer::Change(rx))
    }

    /// Asks the core to open a file for a download and leaves sending it to the
    /// replies thread; waits while [`DOWNLOADS_AHEAD`] are opened and unsent.
    fn download_later(&self, pending: &Pending, seq: Seq, path: String) -> Result<(), End> {
        pending.ahead.send(()).map_err(|_| End::RepliesEnded)?;
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.core
            .send(Event::Request { conn: self.conn, seq, req: CoreRequest::Open { path, reply: tx } })
            .map_err(|_| End::CoreGone)?;
        pending.push(seq, Answer::Download(rx))
    }

    fn request<R: FrameSource>(&self, reader: &mut R, pending: &Pending, seq: Seq, op: Op) -> Result<(), End> {
        let paths: Vec<&str> = match &op {
            Op::List { .. } | Op::Passwd { .. } => vec![],
            Op::Upload { path, .. } | Op::Download { path } | Op::Delete { path, .. } | Op::Mkdir { path, .. } => {
                vec![path]
            }
            Op::Rename { from, to, .. } => vec![from, to],
        };
        for p in paths {
            if let Err(e) = validate_path(p) {
                log::warn!("refused request user={} device={} seq={seq}: {e}", self.user, self.device);
                // An upload's chunks would follow a refused header only after a
                // Proceed, which is never sent; an eager one's are on their way.
                self.skip_eager_upload(reader, seq, &op)?;
                // In its turn: a device reads a batch of downloads' answers in order.
                return pending.push(seq, Answer::Ready(OpResult::Error { message: e.to_string() }));
            }
        }
        match op {
            Op::List { after } => {
                let result = self.ask(seq, |reply| CoreRequest::List { after, reply })?;
                self.reply(seq, result)
            }
            Op::Delete { path, base } => {
                self.ask_later(pending, seq, |reply| CoreRequest::Delete { path, base, reply })
            }
            Op::Mkdir { path, base } => self.ask_later(pending, seq, |reply| CoreRequest::Mkdir { path, base, reply }),
            Op::Rename { from, to, base } => {
                self.ask_later(pending, seq, |reply| CoreRequest::Rename { from, to, base, reply })
            }
            // A change like the others: answered in order by the replies thread.
            Op::Passwd { credentials } => {
                self.ask_later(pending, seq, |reply| CoreRequest::Passwd { credentials, reply })
            }
            Op::Download { path } => self.download_later(pending, seq, path),
            Op::Upload { path, size, mtime_ms, base, exec, eager } => {
                // An eager upload's bytes are on their way: it begins at once,
                // with the backups the core last published (its commit checks it
                // anyway). Any other asks the core first, whose refusal (a
                // conflict, a resend already answered) saves sending the bytes.
                let published = if eager { self.route.backups() } else { None };
                let backups = match published {
                    Some(backups) => backups,
                    None => {
                        match self.ask(seq, |reply| CoreRequest::BeginUpload { path: path.clone(), base, reply })? {
                            Err(result) => {
                                if eager {
                                    self.skip_upload(reader, seq, size)?;
                                }
                                return self.reply(seq, result);
                            }
                            Ok(backups) => backups,
                        }
                    }
                };
                self.upload(reader, pending, seq, path, size, (mtime_ms, exec, eager), base, backups)
            }
        }
    }

    /// After a refusal that came before the bytes: reads and drops them when
    /// `op` is an eager upload (they follow its request unasked).
    fn skip_eager_upload<R: FrameSource>(&self, reader: &mut R, seq: Seq, op: &Op) -> Result<(), End> {
        match op {
            Op::Upload { size, eager: true, .. } => self.skip_upload(reader, seq, *size),
            _ => Ok(()),
        }
    }

    /// Reads an eager upload's chunks and end and drops them, so that the session
    /// stays in step after a refusal; more bytes than announced, or any other
    /// frame before the end, is a protocol violation.
    fn skip_upload<R: FrameSource>(&self, reader: &mut R, seq: Seq, size: u64) -> Result<(), End> {
        let mut got = 0u64;
        loop {
            let frame = match reader.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => return Err(End::Violation(format!("closed mid-upload ({got} of {size} bytes)"))),
                Err(e) => return Err(reader.gave_up().map_or(End::Proto(e), End::Violation)),
            };
            match frame.msg {
                Msg::Ping => self.send(&Msg::Pong)?,
                Msg::Chunk { seq: s } if s == seq => {
                    got += frame.payload.len() as u64;
                    if got > size {
                        return Err(End::Violation(format!("upload seq={seq} sent {got} bytes, more than its {size}")));
                    }
                }
                Msg::UploadEnd { seq: s, .. } if s == seq => return Ok(()),
                other => return Err(End::Violation(format!("unexpected {} during upload seq={seq}", other.kind()))),
            }
        }
    }

    /// Receives an upload into a temporary file and, chunk by chunk as it arrives,
    /// forwards it to every backup (never storing the whole file before passing
    /// it on); then asks the core to commit it.
    #[allow(clippy::too_many_arguments)]
    fn upload<R: FrameSource>(
        &self,
        reader: &mut R,
        pending: &Pending,
        seq: Seq,
        path: String,
        size: u64,
        (mtime_ms, exec, eager): (i64, bool, bool),
        base: Option<replibox_proto::Version>,
        mut backups: Vec<DataSender>,
    ) -> Result<(), End> {
        let (xfer, file) = match self.temps.create() {
            Ok(t) => t,
            Err(e) => {
                log::error!("cannot create temporary file for user={} path={path}: {e}", self.user);
                // No Proceed is sent: the chunks never come, or, for an eager
                // upload, are read and dropped.
                if eager {
                    self.skip_upload(reader, seq, size)?;
                }
                let message = crate::store::storage_trouble(&e.source);
                return self.reply(seq, OpResult::Unavailable { message });
            }
        };
        let mut file = WriteBehind::new(file);
        // The core tells every backup (on the control queue, which never drops a
        // message) that this transfer will not be committed.
        let abandon = |why: End| {
            let _ = self.core.send(Event::AbandonUpload { xfer: xfer.clone() });
            why
        };
        if !eager {
            if let Err(e) = self.send(&Msg::Proceed { seq }) {
                return Err(abandon(e));
            }
        }
        // The user's other devices get the bytes as they arrive (early copies);
        // dropped, as on every early return below, they are told to let them go.
        let mut early: Vec<EarlyOut> = if size >= EARLY_MIN {
            self.devices
                .others(&self.user, &self.device)
                .into_iter()
                .filter_map(|(conn, writer)| EarlyOut::start(conn, writer, &xfer, &path, size))
                .collect()
        } else {
            Vec::new()
        };
        let mut receipt = Receipt::new(size);
        // Set when this server cannot store the bytes (its disk is full): the
        // rest of the upload is read and dropped, so that the session stays in
        // step, and the client is told why instead of losing its connection.
        let mut trouble: Option<String> = None;
        let sent_hash = loop {
            let frame: Frame = match reader.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => {
                    let got = receipt.got();
                    let why = End::Violation(format!("closed mid-upload of {path} ({got} of {size} bytes)"));
                    return Err(abandon(why));
                }
                Err(e) => return Err(abandon(reader.gave_up().map_or(End::Proto(e), End::Violation))),
            };
            match frame.msg {
                Msg::Ping => {
                    if let Err(e) = self.send(&Msg::Pong) {
                        return Err(abandon(e));
                    }
                }
                Msg::Chunk { seq: s } if s == seq => {
                    if let Err(e) = receipt.add(&frame.payload) {
                        return Err(abandon(End::Violation(format!("upload of {path} is {e}"))));
                    }
                    if trouble.is_some() {
                        continue;
                    }
                    if let Err(e) = file.write_all(&frame.payload) {
                        log::error!("cannot write upload user={} path={path}: {e}", self.user);
                        trouble = Some(crate::store::storage_trouble(&e));
                        let _ = abandon(End::Clean);
                        early.clear();
                        continue;
                    }
                    let chunk = Arc::new(frame.payload);
                    early.retain_mut(|d| d.push(&chunk));
                    backups.retain(|b| {
                        let out = LinkOut {
                            epoch: b.epoch,
                            msg: Msg::XferChunk { xfer: xfer.clone() },
                            payload: Some(chunk.clone()),
                        };
                        match b.tx.send_timeout(out, self.ack_timeout) {
                            Ok(()) => true,
                            Err(_) => {
                                // The core drops a backup that stalls; this upload
                                // stops waiting for it now.
                                log::warn!("backup id={} is not taking upload chunks of {path}; leaving it out", b.id);
                                false
                            }
                        }
                    });
                }
                Msg::UploadEnd { seq: s, hash } if s == seq => break hash,
                other => {
                    let why = End::Violation(format!("unexpected {} during upload of {path}", other.kind()));
                    return Err(abandon(why));
                }
            }
        };
        if let Some(message) = trouble {
            return self.reply(seq, OpResult::Unavailable { message });
        }
        let hash = match receipt.finish(sent_hash) {
            Ok(hash) => hash,
            Err(e) => {
                let _ = abandon(End::Clean);
                let message = format!("upload of {path} arrived damaged: {e}");
                log::warn!("{message}");
                return self.reply(seq, OpResult::Error { message });
            }
        };
        // Its bytes are synced with the group its entry joins (`Store::flush`),
        // many files at once: this thread goes on to the next upload.
        drop(file);
        for b in &backups {
            let _ = b
                .tx
                .send_timeout(LinkOut::msg(b.epoch, Msg::XferEnd { xfer: xfer.clone(), size, hash }), self.ack_timeout);
        }
        // Before the commit, whose notice would otherwise overtake the copy's
        // last frames: a device that lags longer than its allowance (see
        // `early`) downloads the file as before.
        let deadline = Instant::now() + self.ack_timeout;
        for d in early {
            d.finish(hash, deadline);
        }
        self.ask_later(pending, seq, |reply| CoreRequest::CommitUpload {
            path,
            base,
            xfer,
            size,
            mtime_ms,
            exec,
            hash,
            reply,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::CoreRequest;
    use crossbeam_channel::Receiver;
    use replibox_proto::{ContentHash, FileMeta, Version};
    use std::net::TcpListener;
    use std::path::PathBuf;

    /// What the core is asked to open, and where its answer goes.
    type Open = (Seq, String, Sender<Result<(FileMeta, std::fs::File), OpResult>>);

    /// A session of one device served on a loopback connection, with a core
    /// that is a channel the test answers. Its files live in a scratch folder,
    /// removed when the session is dropped.
    struct Session {
        dir: PathBuf,
        device: TcpStream,
        events: Receiver<Event>,
    }

    impl Session {
        fn start(name: &str) -> Session {
            let dir = std::env::temp_dir().join(format!("replibox-conn-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let device = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            device.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let (server, peer) = listener.accept().unwrap();
            let (core, events) = unbounded();
            let client = Client {
                conn: 1,
                user: "alice".into(),
                device: DeviceId("0123456789abcdef".into()),
                core,
                writer: FrameWriter::new(server.try_clone().unwrap(), Arc::new(AtomicU64::new(1))),
                peer: peer.to_string(),
                ack_timeout: Duration::from_secs(2),
                temps: Arc::new(Temps::new(&dir)),
                route: Arc::new(UploadRoute::default()),
                devices: Arc::new(crate::early::Devices::default()),
            };
            std::thread::spawn(move || {
                let (_pushes, out_rx) = unbounded();
                let end = client.serve(&mut FrameReader::new(server), out_rx);
                client.writer.shutdown();
                end
            });
            Session { dir, device, events }
        }

        fn ask_download(&self, seq: u64, path: &str) {
            let op = Op::Download { path: path.into() };
            write_frame(&mut &self.device, Epoch(1), &Msg::Request { seq: Seq(seq), op }, &[]).unwrap();
        }

        /// The core's next event, which must be a request to open a file.
        fn next_open(&self) -> Open {
            match self.events.recv_timeout(Duration::from_secs(30)) {
                Ok(Event::Request { seq, req: CoreRequest::Open { path, reply }, .. }) => (seq, path, reply),
                Ok(_) => panic!("expected a download's open, got another event"),
                Err(e) => panic!("no download's open reached the core: {e}"),
            }
        }

        /// Stores `content` as `path` and opens it, with its metadata.
        fn stored(&self, path: &str, content: &[u8]) -> (FileMeta, std::fs::File) {
            let file = self.dir.join(path);
            std::fs::write(&file, content).unwrap();
            let meta = FileMeta {
                path: path.into(),
                version: Version(1),
                size: content.len() as u64,
                mtime_ms: 0,
                hash: ContentHash::of(content),
                deleted: false,
                atime_ms: 0,
                ctime_ms: 0,
                exec: false,
                dir: false,
            };
            (meta, std::fs::File::open(file).unwrap())
        }

        /// Reads one download's answer: the file's bytes, or the refusal.
        fn read_download(&self, seq: u64) -> Result<Vec<u8>, OpResult> {
            let read = || read_frame(&mut &self.device).unwrap().expect("the connection closed mid-answer");
            let meta = match read().msg {
                Msg::Reply { seq: s, result: OpResult::Data { meta } } if s == Seq(seq) => meta,
                Msg::Reply { seq: s, result } if s == Seq(seq) => return Err(result),
                other => panic!("expected the answer to seq={seq}, got {other:?}"),
            };
            let mut bytes = Vec::new();
            loop {
                let frame = read();
                match frame.msg {
                    Msg::Chunk { seq: s } if s == Seq(seq) => bytes.extend_from_slice(&frame.payload),
                    Msg::DownloadEnd { seq: s, hash } if s == Seq(seq) => {
                        assert_eq!(hash, meta.hash, "seq={seq}: the end's hash is not the file's");
                        return Ok(bytes);
                    }
                    other => panic!("expected seq={seq}'s chunks, got {other:?}"),
                }
            }
        }
    }

    impl Drop for Session {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn downloads_are_opened_ahead_and_answered_in_request_order() {
        // Asked one after the other, each download waited for the core to come
        // round to it, behind a group commit's fsyncs: in a burst of 10,000
        // files the other device fell seconds behind the servers. The core must
        // see every open before it answers the first.
        let s = Session::start("ahead");
        let paths = ["a.txt", "b.txt", "c.txt"];
        for (k, p) in paths.iter().enumerate() {
            s.ask_download(k as u64 + 1, p);
        }
        let opens: Vec<Open> = paths.iter().map(|_| s.next_open()).collect();
        let asked: Vec<&str> = opens.iter().map(|(_, p, _)| p.as_str()).collect();
        assert_eq!(asked, paths, "opened in another order");
        // Answered last first (the core answers a download once its file's entry
        // is committed): the device still gets them in its order. The second is
        // refused.
        for (seq, path, reply) in opens.into_iter().rev() {
            let answer = if path == "b.txt" {
                Err(OpResult::Gone { path })
            } else {
                Ok(s.stored(&path, format!("content of {path} ({seq})").as_bytes()))
            };
            reply.send(answer).unwrap();
        }
        assert_eq!(s.read_download(1).unwrap(), b"content of a.txt (1)");
        assert_eq!(s.read_download(2), Err(OpResult::Gone { path: "b.txt".into() }));
        assert_eq!(s.read_download(3).unwrap(), b"content of c.txt (3)");
    }

    #[test]
    fn more_downloads_than_are_opened_ahead_all_arrive_in_order() {
        // Each download sent gives its place back: the reader opens the next
        // once one is sent, never stopping at DOWNLOADS_AHEAD for good.
        let s = Session::start("window");
        let n = DOWNLOADS_AHEAD as u64 + 4;
        for seq in 1..=n {
            s.ask_download(seq, &format!("f{seq}.txt"));
        }
        for _ in 1..=n {
            let (seq, path, reply) = s.next_open();
            reply.send(Ok(s.stored(&path, format!("{path} is seq {seq}").as_bytes()))).unwrap();
        }
        for seq in 1..=n {
            assert_eq!(s.read_download(seq).unwrap(), format!("f{seq}.txt is seq {seq}").as_bytes());
        }
    }

    #[test]
    fn a_download_refused_at_once_keeps_its_turn() {
        // A path the server refuses before asking its core is answered in
        // order, behind the downloads asked before it: a device reads a batch
        // of downloads' answers in order.
        let s = Session::start("refused");
        s.ask_download(1, "a.txt");
        s.ask_download(2, "../escape");
        let (_, path, reply) = s.next_open();
        let opened = s.stored(&path, b"first");
        // Seq 3's open reaching the core shows that seq 2 was read and
        // refused; only then is seq 1 answered.
        s.ask_download(3, "b.txt");
        let (_, path3, reply3) = s.next_open();
        reply.send(Ok(opened)).unwrap();
        reply3.send(Ok(s.stored(&path3, b"third"))).unwrap();
        assert_eq!(s.read_download(1).unwrap(), b"first");
        assert!(matches!(s.read_download(2), Err(OpResult::Error { .. })), "seq 2 should be refused");
        assert_eq!(s.read_download(3).unwrap(), b"third");
    }

    #[test]
    fn a_stored_file_that_cannot_be_sent_ends_the_connection() {
        // The device would otherwise wait for the rest of a file that never
        // comes; once the connection ends it asks again.
        let s = Session::start("short");
        // Well within the server's own READ_TIMEOUT, after which its reader
        // would end the connection anyway.
        s.device.set_read_timeout(Some(READ_TIMEOUT / 3)).unwrap();
        s.ask_download(1, "a.txt");
        let (_, path, reply) = s.next_open();
        let (mut meta, file) = s.stored(&path, b"four");
        meta.size = 1000;
        reply.send(Ok((meta, file))).unwrap();
        let mut frames = 0;
        loop {
            match read_frame(&mut &s.device) {
                Ok(Some(_)) => frames += 1,
                Ok(None) => break,
                Err(e) => panic!("the connection failed instead of ending: {e}"),
            }
            assert!(frames < 10, "the server keeps sending a file it cannot read");
        }
    }
}
