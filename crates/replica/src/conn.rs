//! One thread per connection: the handshake, then a client's requests.
//!
//! The reader thread owns the socket's read side. Frames going out share the write
//! side behind a mutex, so a download streamed by the reader and a push written by
//! the connection's writer thread interleave only at frame boundaries.

use crate::core::{ask, ConnId, CoreRequest, Event, Route, Welcome};
use crate::link::{DataSender, LinkOut};
use crossbeam_channel::{unbounded, Sender};
use replibox_proto::{
    read_frame, validate_path, validate_username, write_frame, DeviceId, Epoch, Frame, Hasher, Msg, Op, OpResult,
    ProtoError, Receipt, Seq, Who, CHUNK_SIZE, PROTOCOL_VERSION,
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

    /// Writes one frame.
    pub fn send(&self, msg: &Msg, payload: &[u8]) -> Result<(), ProtoError> {
        let mut s = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        write_frame(&mut *s, Epoch(self.epoch.load(Ordering::Relaxed)), msg, payload)
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
        }
    }
}

impl From<ProtoError> for End {
    fn from(e: ProtoError) -> Self {
        End::Proto(e)
    }
}

/// Serves one accepted connection until it ends.
pub fn serve(stream: TcpStream, conn: ConnId, ctx: Ctx) {
    let core = ctx.core.clone();
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
    // The hello is read unbuffered against one deadline for the whole frame, so a
    // peer trickling a byte at a time cannot hold this thread.
    let hello = match read_frame(&mut Deadline { stream: &stream, until: Instant::now() + HELLO_TIMEOUT }) {
        Ok(Some(f)) => f,
        Ok(None) => return,
        Err(e) if e.is_timeout() => {
            log::warn!("closing connection peer={peer}: no complete hello within {HELLO_TIMEOUT:?}");
            return;
        }
        Err(e) => {
            log::warn!("closing connection peer={peer}: bad hello: {e}");
            return;
        }
    };
    let mut reader = std::io::BufReader::with_capacity(64 * 1024, stream);
    let hello_epoch = hello.epoch;
    let (version, who) = match hello.msg {
        Msg::Hello { version, who } => (version, who),
        other => {
            log::warn!("closing connection peer={peer}: first frame is {} not hello", other.kind());
            let _ = writer.send(&Msg::Refused { reason: "the first frame must be a hello".into() }, &[]);
            return;
        }
    };
    if version != PROTOCOL_VERSION {
        log::warn!("closing connection peer={peer}: protocol version {version}, want {PROTOCOL_VERSION}");
        let reason = format!("protocol version {version} is not supported; this server speaks {PROTOCOL_VERSION}");
        let _ = writer.send(&Msg::Refused { reason }, &[]);
        return;
    }
    match who {
        Who::Status => {
            if let Some(status) = ask(&core, |reply| Event::Status { reply }) {
                let _ = writer.send(&Msg::Status { status }, &[]);
            }
        }
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
            let _ = reader.get_ref().set_read_timeout(Some(READ_TIMEOUT));
            let Ok(peer_ip) = reader.get_ref().peer_addr().map(|a| a.ip()) else { return };
            serve_fetch(&mut reader, &writer, &core, id, &peer, peer_ip);
        }
        Who::Primary { .. } => {
            let reason = "a server calls clients back; it is not called back".to_string();
            let _ = writer.send(&Msg::Refused { reason }, &[]);
        }
        Who::Client { user, device, callback_port } => {
            match ask(&core, |reply| Event::Route { reply }) {
                None => return,
                Some(Route::Here) => {}
                Some(Route::At(primary)) => {
                    log::info!("redirecting client user={user} peer={peer} to primary={primary}");
                    let _ = writer.send(&Msg::Redirect { primary }, &[]);
                    return;
                }
                Some(Route::Unknown) => {
                    let reason =
                        "this server knows no primary right now (an election may be under way); try again".to_string();
                    let _ = writer.send(&Msg::Refused { reason }, &[]);
                    return;
                }
            }
            let refusal = validate_username(&user).map_err(|e| e.to_string()).and_then(|_| device.validate());
            if let Err(reason) = refusal {
                log::warn!("refused client peer={peer}: {reason}");
                let _ = writer.send(&Msg::Refused { reason }, &[]);
                return;
            }
            let ip = reader.get_ref().peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
            let client = Client {
                conn,
                user,
                device,
                core: core.clone(),
                writer: writer.clone(),
                peer,
                ack_timeout: ctx.ack_timeout,
            };
            let _ = reader.get_ref().set_read_timeout(Some(READ_TIMEOUT));
            let stream = reader.get_ref().try_clone().ok();
            let (out_tx, out_rx) = unbounded::<Msg>();
            let login = |reply| Event::Login {
                conn,
                user: client.user.clone(),
                device: client.device.clone(),
                ip,
                callback_port,
                out: out_tx,
                stream,
                reply,
            };
            let end = match ask(&core, login) {
                None => End::CoreGone,
                Some(Err(reason)) => {
                    let _ = client.send(&Msg::Refused { reason: reason.clone() });
                    End::Refused(reason)
                }
                Some(Ok(Welcome { token, devices, last_seq })) => {
                    match client.send(&Msg::Welcome { token, devices, last_seq }) {
                        Err(e) => e,
                        Ok(()) => client.serve(&mut reader, out_rx),
                    }
                }
            };
            client.ended(&end);
        }
    }
    let _ = reader.get_ref().shutdown(Shutdown::Both);
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
}

/// Serves a backup's fetches: each names a user's file, answered like a download
/// (seq 0): the metadata, the chunks, the end with the hash.
fn serve_fetch<R: Read>(
    reader: &mut R,
    writer: &FrameWriter,
    core: &Sender<Event>,
    id: replibox_proto::ServerId,
    peer: &str,
    peer_ip: std::net::IpAddr,
) {
    loop {
        let frame = match read_frame(reader) {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                log::warn!("fetch connection of backup id={id} peer={peer} closed: {e}");
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

/// Sends a file as a download: the metadata, its chunks, the end with the hash.
fn stream_file(
    writer: &FrameWriter,
    seq: Seq,
    meta: replibox_proto::FileMeta,
    mut file: std::fs::File,
) -> Result<(), End> {
    let size = meta.size;
    writer.send(&Msg::Reply { seq, result: OpResult::Data { meta } }, &[])?;
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut sent = 0u64;
    let mut hasher = Hasher::new();
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
    pub fn serve<R: Read>(&self, reader: &mut R, out_rx: crossbeam_channel::Receiver<Msg>) -> End {
        let w = self.writer.clone();
        let name = format!("conn-{}-push", self.conn);
        let _ = std::thread::Builder::new().name(name).spawn(move || {
            for msg in out_rx {
                if w.send(&msg, &[]).is_err() {
                    break;
                }
            }
        });
        loop {
            let frame = match read_frame(reader) {
                Ok(Some(f)) => f,
                Ok(None) => return End::Clean,
                Err(e) => return End::Proto(e),
            };
            let result = match frame.msg {
                Msg::Ping => self.send(&Msg::Pong),
                Msg::Bye => return End::Bye,
                Msg::Request { seq, op } => self.request(reader, seq, op),
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

    fn request<R: Read>(&self, reader: &mut R, seq: Seq, op: Op) -> Result<(), End> {
        let paths: Vec<&str> = match &op {
            Op::List { .. } => vec![],
            Op::Upload { path, .. } | Op::Download { path } | Op::Delete { path, .. } => vec![path],
            Op::Rename { from, to, .. } => vec![from, to],
        };
        for p in paths {
            if let Err(e) = validate_path(p) {
                log::warn!("refused request user={} device={} seq={seq}: {e}", self.user, self.device);
                // An upload's chunks would follow a refused header only after a
                // Proceed, which is never sent, so the session stays in step.
                return self.reply(seq, OpResult::Error { message: e.to_string() });
            }
        }
        match op {
            Op::List { after } => {
                let result = self.ask(seq, |reply| CoreRequest::List { after, reply })?;
                self.reply(seq, result)
            }
            Op::Delete { path, base } => {
                let result = self.ask(seq, |reply| CoreRequest::Delete { path, base, reply })?;
                self.reply(seq, result)
            }
            Op::Rename { from, to, base } => {
                let result = self.ask(seq, |reply| CoreRequest::Rename { from, to, base, reply })?;
                self.reply(seq, result)
            }
            Op::Download { path } => match self.ask(seq, |reply| CoreRequest::Open { path, reply })? {
                Err(result) => self.reply(seq, result),
                Ok((meta, file)) => self.download(seq, meta, file),
            },
            Op::Upload { path, size, mtime_ms, base } => {
                match self.ask(seq, |reply| CoreRequest::BeginUpload { path: path.clone(), base, reply })? {
                    Err(result) => self.reply(seq, result),
                    Ok(backups) => self.upload(reader, seq, path, size, mtime_ms, base, backups),
                }
            }
        }
    }

    fn download(&self, seq: Seq, meta: replibox_proto::FileMeta, file: std::fs::File) -> Result<(), End> {
        stream_file(&self.writer, seq, meta, file)
    }

    /// Receives an upload into a temporary file and, chunk by chunk as it arrives,
    /// forwards it to every backup (never storing the whole file before passing
    /// it on); then asks the core to commit it.
    #[allow(clippy::too_many_arguments)]
    fn upload<R: Read>(
        &self,
        reader: &mut R,
        seq: Seq,
        path: String,
        size: u64,
        mtime_ms: i64,
        base: Option<replibox_proto::Version>,
        mut backups: Vec<DataSender>,
    ) -> Result<(), End> {
        let (xfer, mut file) = {
            match ask(&self.core, |reply| Event::NewTemp { reply }).ok_or(End::CoreGone)? {
                Ok(t) => t,
                Err(message) => return self.reply(seq, OpResult::Error { message }),
            }
        };
        // The core tells every backup (on the control queue, which never drops a
        // message) that this transfer will not be committed.
        let abandon = |why: End| {
            let _ = self.core.send(Event::AbandonUpload { xfer: xfer.clone() });
            why
        };
        if let Err(e) = self.send(&Msg::Proceed { seq }) {
            return Err(abandon(e));
        }
        let mut receipt = Receipt::new(size);
        let sent_hash = loop {
            let frame: Frame = match read_frame(reader) {
                Ok(Some(f)) => f,
                Ok(None) => {
                    let got = receipt.got();
                    let why = End::Violation(format!("closed mid-upload of {path} ({got} of {size} bytes)"));
                    return Err(abandon(why));
                }
                Err(e) => return Err(abandon(End::Proto(e))),
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
                    if let Err(e) = file.write_all(&frame.payload) {
                        log::error!("cannot write upload user={} path={path}: {e}", self.user);
                        let why = End::Violation(format!("server cannot store the upload: {e}"));
                        return Err(abandon(why));
                    }
                    let chunk = Arc::new(frame.payload);
                    backups.retain(|b| {
                        let out = LinkOut { msg: Msg::XferChunk { xfer: xfer.clone() }, payload: Some(chunk.clone()) };
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
        let hash = match receipt.finish(sent_hash) {
            Ok(hash) => hash,
            Err(e) => {
                let _ = abandon(End::Clean);
                let message = format!("upload of {path} arrived damaged: {e}");
                log::warn!("{message}");
                return self.reply(seq, OpResult::Error { message });
            }
        };
        if let Err(e) = file.sync_all() {
            let _ = abandon(End::Clean);
            return self.reply(seq, OpResult::Error { message: format!("server cannot sync the upload: {e}") });
        }
        drop(file);
        for b in &backups {
            let _ = b.tx.send_timeout(LinkOut::msg(Msg::XferEnd { xfer: xfer.clone(), size, hash }), self.ack_timeout);
        }
        let result =
            self.ask(seq, |reply| CoreRequest::CommitUpload { path, base, xfer, size, mtime_ms, hash, reply })?;
        self.reply(seq, result)
    }
}
