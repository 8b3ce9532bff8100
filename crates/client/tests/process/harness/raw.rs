//! A protocol connection driven by hand, for sending what a real client never
//! would.

use super::{fail, password_of, DEADLINE};
use replibox_proto::auth::{connect_to_server, AuthenticatedServer, Frames, Password, ScramClient, Step};
use replibox_proto::{
    read_frame, write_frame, AuthError, ClusterKey, ContentHash, DeviceId, Epoch, Frame, Msg, Notice, Op, OpResult,
    ProtoError, Purpose, Seq, ServerId, Version, Who, CHUNK_SIZE, PROTOCOL_VERSION,
};
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// What a password login ended with.
#[derive(Debug)]
pub enum LoginEnd {
    /// Welcomed; the raw connection's device numbers its next requests after `last_seq`.
    Welcome {
        /// The device's last answered request.
        last_seq: Seq,
        /// The login created the account.
        created: bool,
    },
    /// The server said `refused`, a handshake `failed`, or the client side of the
    /// login failed: its sentence.
    Refused(AuthErrorOrText),
    /// Redirected to the primary.
    Redirect(String),
}

/// A login's failure: the handshake's error, or a `refused` sentence.
#[derive(Debug)]
pub enum AuthErrorOrText {
    /// The password login failed (a wrong password, too many failures, ...).
    Auth(AuthError),
    /// The server's `refused`.
    Text(String),
}

impl std::fmt::Display for AuthErrorOrText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthErrorOrText::Auth(e) => write!(f, "{e}"),
            AuthErrorOrText::Text(t) => f.write_str(t),
        }
    }
}

/// Passwords with the key last derived from them, by text: a test's raw logins
/// pay for the (deliberately slow) derivation once per password, not per login.
fn password(text: &str) -> std::sync::MutexGuard<'static, HashMap<String, Password>> {
    static CACHE: OnceLock<Mutex<HashMap<String, Password>>> = OnceLock::new();
    let mut cache = CACHE.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    cache.entry(text.to_string()).or_insert_with(|| Password::new(text));
    cache
}

/// Connects to `to` from `from` (any free port): a chosen 127.0.0.x address
/// stands for another machine.
pub fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(from, 0).into())?;
    socket.connect_timeout(&to.into(), Duration::from_secs(5))?;
    Ok(socket.into())
}

/// A raw connection to a server.
pub struct Raw {
    /// The socket.
    pub stream: TcpStream,
    /// What it is, for messages.
    pub what: String,
    seq: u64,
    /// Notices that arrived while a request waited for its reply, oldest first.
    notices: std::collections::VecDeque<Notice>,
}

impl Raw {
    /// Connects (from 127.0.0.1).
    pub fn connect(addr: SocketAddr, what: &str) -> Raw {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| fail(format!("{what}: cannot connect to {addr}: {e}")));
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        stream.set_write_timeout(Some(DEADLINE)).unwrap();
        Raw { stream, what: what.to_string(), seq: 0, notices: Default::default() }
    }

    /// Wraps a connection opened elsewhere (one a fake server accepted).
    pub fn from_stream(stream: TcpStream, what: &str) -> Raw {
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        stream.set_write_timeout(Some(DEADLINE)).unwrap();
        Raw { stream, what: what.to_string(), seq: 0, notices: Default::default() }
    }

    /// Connects from `from` (see [`connect_from`]).
    pub fn connect_from(from: IpAddr, addr: SocketAddr, what: &str) -> Raw {
        let stream = connect_from(from, addr)
            .unwrap_or_else(|e| fail(format!("{what}: cannot connect to {addr} from {from}: {e}")));
        Raw::from_stream(stream, what)
    }

    /// Connects and logs in as a client of `user` with device id `device` and the
    /// harness's password for the user ([`password_of`]; a first login creates
    /// the account); panics unless welcomed.
    pub fn login(addr: SocketAddr, user: &str, device: &str, what: &str) -> Raw {
        let mut r = Raw::connect(addr, what);
        match r.password_login(user, device, &password_of(user)) {
            LoginEnd::Welcome { last_seq, .. } => {
                r.seq = last_seq.0;
                r
            }
            other => fail(format!("{what}: login of {user} not welcomed: {other:?}")),
        }
    }

    /// A client's hello and password login (SCRAM-style, as the front-end does
    /// it, creating the account if there is none) on this connection.
    pub fn password_login(&mut self, user: &str, device: &str, pw: &str) -> LoginEnd {
        let mut cache = password(pw);
        let password = cache.get_mut(pw).expect("cached above");
        let (mut scram, first) = ScramClient::start(user, password, true).unwrap_or_else(|e| fail(e));
        self.send(&hello(user, device));
        self.send(&Msg::Auth(first));
        let created = loop {
            match self.recv().map(|f| f.msg) {
                Some(Msg::Auth(m)) => match scram.step(m) {
                    Ok(Step::Send(reply)) => self.send(&Msg::Auth(reply)),
                    Ok(Step::Done(_, done)) => break done.created,
                    Err(e) => {
                        if let Some(refusal) = e.refusal() {
                            let _ = write_frame(&mut self.stream, Epoch(0), &Msg::Auth(refusal), &[]);
                        }
                        return LoginEnd::Refused(AuthErrorOrText::Auth(e));
                    }
                },
                Some(Msg::Refused { reason }) => return LoginEnd::Refused(AuthErrorOrText::Text(reason)),
                Some(Msg::Redirect { primary }) => return LoginEnd::Redirect(primary),
                other => fail(format!("{}: login of {user} answered with {other:?}", self.what)),
            }
        };
        match self.recv().map(|f| f.msg) {
            Some(Msg::Welcome { last_seq, .. }) => LoginEnd::Welcome { last_seq, created },
            Some(Msg::Refused { reason }) => LoginEnd::Refused(AuthErrorOrText::Text(reason)),
            other => fail(format!("{}: login of {user} ended with {other:?} instead of a welcome", self.what)),
        }
    }

    /// [`Raw::password_login`] for a connection the server may refuse and close at
    /// once (at its connection limit): None when a frame cannot be sent or the
    /// connection closes before an answer, instead of failing the test.
    pub fn try_password_login(&mut self, user: &str, device: &str) -> Option<LoginEnd> {
        let pw = password_of(user);
        let mut cache = password(&pw);
        let password = cache.get_mut(&pw).expect("cached above");
        let (mut scram, first) = ScramClient::start(user, password, true).unwrap_or_else(|e| fail(e));
        write_frame(&mut self.stream, Epoch(0), &hello(user, device), &[]).ok()?;
        write_frame(&mut self.stream, Epoch(0), &Msg::Auth(first), &[]).ok()?;
        let created = loop {
            match self.try_recv()?.msg {
                Msg::Auth(m) => match scram.step(m) {
                    Ok(Step::Send(reply)) => write_frame(&mut self.stream, Epoch(0), &Msg::Auth(reply), &[]).ok()?,
                    Ok(Step::Done(_, done)) => break done.created,
                    Err(e) => return Some(LoginEnd::Refused(AuthErrorOrText::Auth(e))),
                },
                Msg::Refused { reason } => return Some(LoginEnd::Refused(AuthErrorOrText::Text(reason))),
                Msg::Redirect { primary } => return Some(LoginEnd::Redirect(primary)),
                other => fail(format!("{}: login of {user} answered with {}", self.what, other.kind())),
            }
        };
        match self.try_recv()?.msg {
            Msg::Welcome { last_seq, .. } => {
                self.seq = last_seq.0;
                Some(LoginEnd::Welcome { last_seq, created })
            }
            Msg::Refused { reason } => Some(LoginEnd::Refused(AuthErrorOrText::Text(reason))),
            other => fail(format!("{}: login of {user} ended with {} instead of a welcome", self.what, other.kind())),
        }
    }

    /// The opening of a client's login as the front-end sends it (its hello and
    /// the first step of its password login), without waiting for an answer.
    pub fn begin_login(&mut self, user: &str, device: &str) {
        let mut pw = Password::new(password_of(user));
        let (_, first) = ScramClient::start(user, &mut pw, true).unwrap_or_else(|e| fail(e));
        self.send(&hello(user, device));
        self.send(&Msg::Auth(first));
    }

    /// Connects (from `from`, if given) and runs the connecting side of the
    /// cluster handshake with `key`, as server `id`, for `purpose`: what a server
    /// does before its hello. The handshake's outcome, and the connection.
    pub fn server(
        addr: SocketAddr,
        from: Option<IpAddr>,
        key: &ClusterKey,
        id: Option<ServerId>,
        purpose: Purpose,
        what: &str,
    ) -> (Raw, Result<AuthenticatedServer, AuthError>) {
        let r = match from {
            Some(ip) => Raw::connect_from(ip, addr, what),
            None => Raw::connect(addr, what),
        };
        let mut t = Frames { reader: &r.stream, writer: &r.stream, epoch: Epoch(0) };
        let proven = connect_to_server(&mut t, key, id, purpose);
        (r, proven)
    }

    /// [`Raw::server`] that must succeed.
    pub fn authenticated(
        addr: SocketAddr,
        key: &ClusterKey,
        id: Option<ServerId>,
        purpose: Purpose,
        what: &str,
    ) -> Raw {
        let (r, proven) = Raw::server(addr, None, key, id, purpose, what);
        if let Err(e) = proven {
            fail(format!("{what}: the cluster handshake failed: {e}"));
        }
        r
    }

    /// Writes bytes as they are.
    pub fn send_bytes(&mut self, bytes: &[u8]) {
        if let Err(e) = self.stream.write_all(bytes).and_then(|_| self.stream.flush()) {
            fail(format!("{}: cannot send: {e}", self.what));
        }
    }

    /// Writes one well-formed frame.
    pub fn send(&mut self, msg: &Msg) {
        self.send_with(msg, &[]);
    }

    /// Writes one well-formed frame stamped with `epoch` (as a server would).
    pub fn send_at(&mut self, epoch: Epoch, msg: &Msg) {
        if let Err(e) = write_frame(&mut self.stream, epoch, msg, &[]) {
            fail(format!("{}: cannot send {}: {e}", self.what, msg.kind()));
        }
    }

    /// Writes one well-formed frame with a payload, stamped with `epoch`.
    pub fn send_with_at(&mut self, epoch: Epoch, msg: &Msg, payload: &[u8]) {
        if let Err(e) = write_frame(&mut self.stream, epoch, msg, payload) {
            fail(format!("{}: cannot send {}: {e}", self.what, msg.kind()));
        }
    }

    /// Writes one well-formed frame with a payload.
    pub fn send_with(&mut self, msg: &Msg, payload: &[u8]) {
        if let Err(e) = write_frame(&mut self.stream, Epoch(0), msg, payload) {
            fail(format!("{}: cannot send {}: {e}", self.what, msg.kind()));
        }
    }

    /// Reads one frame (None: the server closed the connection cleanly).
    pub fn recv(&mut self) -> Option<Frame> {
        match read_frame(&mut self.stream) {
            Ok(f) => f,
            Err(ProtoError::Io(e)) if e.kind() == ErrorKind::ConnectionReset => None,
            Err(e) => fail(format!("{}: reading a frame: {e}", self.what)),
        }
    }

    /// Reads one frame; None when the connection closed (cleanly, reset, or with
    /// a frame cut short).
    pub fn try_recv(&mut self) -> Option<Frame> {
        match read_frame(&mut self.stream) {
            Ok(f) => f,
            Err(ProtoError::Io(e)) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                fail(format!("{}: no frame and no close for {DEADLINE:?}", self.what))
            }
            Err(_) => None,
        }
    }

    /// The next request sequence number of this connection's device.
    pub fn next_seq(&mut self) -> Seq {
        self.seq += 1;
        Seq(self.seq)
    }

    /// Sends a request with the next sequence number and returns the reply's result;
    /// notices pushed meanwhile are kept for [`Raw::next_notice`], pongs dropped.
    pub fn request(&mut self, op: Op) -> OpResult {
        let seq = self.next_seq();
        self.send(&Msg::Request { seq, op });
        self.reply_to(seq)
    }

    /// Like [`Raw::request`], but None when the server closed the connection
    /// instead of answering (a send or read error counts as closed).
    pub fn try_request(&mut self, op: Op) -> Option<OpResult> {
        let seq = self.next_seq();
        write_frame(&mut self.stream, Epoch(0), &Msg::Request { seq, op }, &[]).ok()?;
        self.try_reply_to(seq)
    }

    /// Like [`Raw::reply_to`], but None when the connection closed first.
    pub fn try_reply_to(&mut self, seq: Seq) -> Option<OpResult> {
        loop {
            match read_frame(&mut self.stream) {
                Ok(Some(Frame { msg: Msg::Reply { seq: s, result }, .. })) if s == seq => return Some(result),
                Ok(Some(Frame { msg: Msg::Notice { notice }, .. })) => self.notices.push_back(notice),
                Ok(Some(Frame { msg: Msg::Pong, .. })) => {}
                Ok(None) => return None,
                Err(ProtoError::Io(e)) if e.kind() != ErrorKind::WouldBlock && e.kind() != ErrorKind::TimedOut => {
                    return None
                }
                other => fail(format!("{}: expected the reply to request {seq}, got {other:?}", self.what)),
            }
        }
    }

    /// Reads up to the reply to `seq`, keeping notices and dropping pongs.
    pub fn reply_to(&mut self, seq: Seq) -> OpResult {
        loop {
            match self.recv() {
                Some(Frame { msg: Msg::Reply { seq: s, result }, .. }) if s == seq => return result,
                Some(Frame { msg: Msg::Notice { notice }, .. }) => self.notices.push_back(notice),
                Some(Frame { msg: Msg::Pong, .. }) => {}
                other => fail(format!("{}: expected the reply to request {seq}, got {other:?}", self.what)),
            }
        }
    }

    /// The next notice pushed to this connection (waiting up to the read timeout).
    pub fn next_notice(&mut self) -> Notice {
        if let Some(n) = self.notices.pop_front() {
            return n;
        }
        loop {
            match self.recv() {
                Some(Frame { msg: Msg::Notice { notice }, .. }) => return notice,
                Some(Frame { msg: Msg::Pong, .. }) => {}
                other => fail(format!("{}: expected a notice, got {other:?}", self.what)),
            }
        }
    }

    /// Starts an upload of `size` bytes to `path`: Ok(seq) once the server said
    /// `proceed`, or the server's immediate answer.
    pub fn begin_upload(&mut self, path: &str, size: u64, base: Option<Version>) -> Result<Seq, OpResult> {
        let seq = self.next_seq();
        self.send(&Msg::Request {
            seq,
            op: Op::Upload { path: path.into(), size, mtime_ms: 1_000, base, exec: false, eager: false },
        });
        loop {
            match self.recv() {
                Some(Frame { msg: Msg::Proceed { seq: s }, .. }) if s == seq => return Ok(seq),
                Some(Frame { msg: Msg::Reply { seq: s, result }, .. }) if s == seq => return Err(result),
                Some(Frame { msg: Msg::Notice { notice }, .. }) => self.notices.push_back(notice),
                Some(Frame { msg: Msg::Pong, .. }) => {}
                other => fail(format!("{}: upload of {path:?} answered with {other:?}", self.what)),
            }
        }
    }

    /// Sends bytes of upload `seq` as chunks.
    pub fn send_chunks(&mut self, seq: Seq, bytes: &[u8]) {
        for chunk in bytes.chunks(CHUNK_SIZE) {
            self.send_with(&Msg::Chunk { seq }, chunk);
        }
    }

    /// Ends upload `seq` with the hash of all its bytes and returns the answer.
    pub fn end_upload(&mut self, seq: Seq, hash: ContentHash) -> OpResult {
        self.send(&Msg::UploadEnd { seq, hash });
        self.reply_to(seq)
    }

    /// A whole upload of `bytes` to `path`: the server's answer.
    pub fn upload(&mut self, path: &str, bytes: &[u8], base: Option<Version>) -> OpResult {
        match self.begin_upload(path, bytes.len() as u64, base) {
            Err(answer) => answer,
            Ok(seq) => {
                self.send_chunks(seq, bytes);
                self.end_upload(seq, ContentHash::of(bytes))
            }
        }
    }

    /// An eager upload of `bytes` to `path` (its bytes right behind the request,
    /// no `proceed` awaited), as the front-end sends small files: the answer.
    /// A `proceed` for it fails the test.
    pub fn eager_upload(&mut self, path: &str, bytes: &[u8], base: Option<Version>) -> OpResult {
        let seq = self.next_seq();
        let size = bytes.len() as u64;
        self.send(&Msg::Request {
            seq,
            op: Op::Upload { path: path.into(), size, mtime_ms: 1_000, base, exec: false, eager: true },
        });
        self.send_chunks(seq, bytes);
        self.end_upload(seq, ContentHash::of(bytes))
    }

    /// Waits (up to [`DEADLINE`]) for the server to close the connection; returns
    /// the frames it sent first. Panics if the connection stays open.
    pub fn expect_closed(&mut self) -> Vec<Frame> {
        self.wait_closed(DEADLINE)
    }

    /// Like [`Raw::expect_closed`] with another deadline.
    pub fn wait_closed(&mut self, deadline: Duration) -> Vec<Frame> {
        let start = Instant::now();
        let _ = self.stream.set_read_timeout(Some(deadline));
        let mut frames = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        let mut buf = [0u8; 64 * 1024];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::ConnectionReset || e.kind() == ErrorKind::BrokenPipe => break,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    fail(format!("{}: the server kept the connection open for {:?}", self.what, start.elapsed()))
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => fail(format!("{}: waiting for the close: {e}", self.what)),
            }
        }
        let mut r = &pending[..];
        while let Ok(Some(f)) = read_frame(&mut r) {
            frames.push(f);
        }
        frames
    }

    /// Closes the sending side (the server then reads end of stream).
    pub fn shutdown_write(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }
}

/// A client hello of this protocol version.
pub fn hello(user: &str, device: &str) -> Msg {
    Msg::Hello {
        version: PROTOCOL_VERSION,
        who: Who::Client { user: user.into(), device: DeviceId(device.into()), callback_port: 9 },
    }
}

/// A frame as the codec writes it: length prefix, JSON header, payload.
pub fn encode(epoch: u64, msg: &Msg, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    replibox_proto::write_frame(&mut out, Epoch(epoch), msg, payload).expect("a frame encodes into memory");
    out
}

/// A frame built by hand: a length prefix and a header given as text.
pub fn frame_bytes(header: &str) -> Vec<u8> {
    let mut out = (header.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out
}

/// The refusal reason among frames, if any.
pub fn refusal(frames: &[Frame]) -> Option<String> {
    frames.iter().find_map(|f| match &f.msg {
        Msg::Refused { reason } => Some(reason.clone()),
        _ => None,
    })
}
