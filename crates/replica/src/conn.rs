//! One thread per connection: the handshake, then a client's requests.
//!
//! The reader thread owns the socket's read side. Frames going out share the write
//! side behind a mutex, so a download streamed by the reader and a push written by
//! the connection's writer thread interleave only at frame boundaries.

use crate::core::{ConnId, CoreRequest, Event};
use crossbeam_channel::{bounded, unbounded, Sender};
use replibox_proto::{
    read_frame, validate_path, validate_username, write_frame, ContentHash, DeviceId, Epoch, Frame, Msg, Op, OpResult,
    ProtoError, Seq, Who, CHUNK_SIZE, PROTOCOL_VERSION,
};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a peer may stay silent before the connection is given up. Clients send
/// a ping every few seconds while idle.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the first frame may take.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a write may block before the peer is considered stuck.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// The write side of a connection, shared by the threads that send on it.
#[derive(Clone)]
pub struct FrameWriter(Arc<Mutex<TcpStream>>);

impl FrameWriter {
    /// Wraps a clone of the stream.
    pub fn new(stream: TcpStream) -> FrameWriter {
        FrameWriter(Arc::new(Mutex::new(stream)))
    }

    /// Writes one frame.
    pub fn send(&self, epoch: Epoch, msg: &Msg, payload: &[u8]) -> Result<(), ProtoError> {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        write_frame(&mut *s, epoch, msg, payload)
    }
}

/// Why a client connection ended.
#[derive(Debug)]
enum End {
    Clean,
    Proto(ProtoError),
    Violation(String),
    Refused(String),
    CoreGone,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
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
pub fn serve(stream: TcpStream, conn: ConnId, core: Sender<Event>) {
    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let _ = stream.set_read_timeout(Some(HELLO_TIMEOUT));
    let writer = match stream.try_clone() {
        Ok(s) => FrameWriter::new(s),
        Err(e) => {
            log::warn!("dropping connection peer={peer}: cannot clone socket: {e}");
            return;
        }
    };
    let mut reader = std::io::BufReader::with_capacity(64 * 1024, stream);
    let hello = match read_frame(&mut reader) {
        Ok(Some(f)) => f,
        Ok(None) => return,
        Err(e) => {
            log::warn!("closing connection peer={peer}: bad hello: {e}");
            return;
        }
    };
    let (version, who) = match hello.msg {
        Msg::Hello { version, who } => (version, who),
        other => {
            log::warn!("closing connection peer={peer}: first frame is {} not hello", other.kind());
            let _ = writer.send(Epoch(0), &Msg::Refused { reason: "the first frame must be a hello".into() }, &[]);
            return;
        }
    };
    if version != PROTOCOL_VERSION {
        log::warn!("closing connection peer={peer}: protocol version {version}, want {PROTOCOL_VERSION}");
        let reason = format!("protocol version {version} is not supported; this server speaks {PROTOCOL_VERSION}");
        let _ = writer.send(Epoch(0), &Msg::Refused { reason }, &[]);
        return;
    }
    match who {
        Who::Status => {
            let (tx, rx) = bounded(1);
            if core.send(Event::Status { reply: tx }).is_ok() {
                if let Ok(status) = rx.recv() {
                    let _ = writer.send(Epoch(0), &Msg::Status { status }, &[]);
                }
            }
        }
        Who::Client { user, device, callback_port } => {
            let refusal = validate_username(&user).map_err(|e| e.to_string()).and_then(|_| device.validate());
            if let Err(reason) = refusal {
                log::warn!("refused client peer={peer}: {reason}");
                let _ = writer.send(Epoch(0), &Msg::Refused { reason }, &[]);
                return;
            }
            let ip = reader.get_ref().peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
            let client = Client { conn, user, device, core: core.clone(), writer: writer.clone(), peer };
            let _ = reader.get_ref().set_read_timeout(Some(READ_TIMEOUT));
            let end = client.run(&mut reader, ip, callback_port);
            match &end {
                End::Clean => log::info!("connection closed conn={conn} peer={}", client.peer),
                other => log::warn!("connection closed conn={conn} peer={}: {other}", client.peer),
            }
            let _ = core.send(Event::Disconnect { conn });
        }
    }
    let _ = reader.get_ref().shutdown(Shutdown::Both);
}

struct Client {
    conn: ConnId,
    user: String,
    device: DeviceId,
    core: Sender<Event>,
    writer: FrameWriter,
    peer: String,
}

impl Client {
    fn send(&self, msg: &Msg) -> Result<(), End> {
        self.writer.send(Epoch(0), msg, &[]).map_err(End::Proto)
    }

    fn ask<T>(&self, seq: Seq, make: impl FnOnce(Sender<T>) -> CoreRequest) -> Result<T, End> {
        let (tx, rx) = bounded(1);
        self.core.send(Event::Request { conn: self.conn, seq, req: make(tx) }).map_err(|_| End::CoreGone)?;
        rx.recv().map_err(|_| End::CoreGone)
    }

    fn run<R: Read>(&self, reader: &mut R, ip: String, callback_port: u16) -> End {
        let (out_tx, out_rx) = unbounded::<Msg>();
        let (tx, rx) = bounded(1);
        let login = Event::Login {
            conn: self.conn,
            user: self.user.clone(),
            device: self.device.clone(),
            ip,
            callback_port,
            out: out_tx,
            reply: tx,
        };
        if self.core.send(login).is_err() {
            return End::CoreGone;
        }
        match rx.recv() {
            Err(_) => return End::CoreGone,
            Ok(Err(reason)) => {
                let _ = self.send(&Msg::Refused { reason: reason.clone() });
                return End::Refused(reason);
            }
            Ok(Ok((token, devices, last_seq))) => {
                if let Err(e) = self.send(&Msg::Welcome { token, devices, last_seq }) {
                    return e;
                }
            }
        }
        // Pushes from the core go out through their own thread: the core never waits
        // on this socket.
        let w = self.writer.clone();
        let name = format!("conn-{}-push", self.conn);
        let _ = std::thread::Builder::new().name(name).spawn(move || {
            for msg in out_rx {
                if w.send(Epoch(0), &msg, &[]).is_err() {
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
                Msg::Bye => return End::Clean,
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
            Op::List => vec![],
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
            Op::List => {
                let result = self.ask(seq, |reply| CoreRequest::List { reply })?;
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
                let pre = self.ask(seq, |reply| CoreRequest::BeginUpload { path: path.clone(), base, reply })?;
                if let Some(result) = pre {
                    return self.reply(seq, result);
                }
                self.upload(reader, seq, path, size, mtime_ms, base)
            }
        }
    }

    fn download(&self, seq: Seq, meta: replibox_proto::FileMeta, mut file: std::fs::File) -> Result<(), End> {
        let size = meta.size;
        self.reply(seq, OpResult::Data { meta })?;
        let mut buf = vec![0u8; CHUNK_SIZE];
        let mut sent = 0u64;
        let mut hash = ContentHash::default();
        while sent < size {
            let want = (size - sent).min(CHUNK_SIZE as u64) as usize;
            let n = match file.read(&mut buf[..want]) {
                Ok(0) => {
                    return Err(End::Violation(format!(
                        "stored file shorter than its metadata ({sent} of {size} bytes)"
                    )))
                }
                Ok(n) => n,
                Err(e) => return Err(End::Violation(format!("reading stored file: {e}"))),
            };
            hash.update(&buf[..n]);
            self.writer.send(Epoch(0), &Msg::Chunk { seq }, &buf[..n])?;
            sent += n as u64;
        }
        self.send(&Msg::DownloadEnd { seq, hash })
    }

    fn upload<R: Read>(
        &self,
        reader: &mut R,
        seq: Seq,
        path: String,
        size: u64,
        mtime_ms: i64,
        base: Option<replibox_proto::Version>,
    ) -> Result<(), End> {
        let (xfer, mut file) = {
            let (tx, rx) = bounded(1);
            self.core.send(Event::NewTemp { reply: tx }).map_err(|_| End::CoreGone)?;
            match rx.recv().map_err(|_| End::CoreGone)? {
                Ok(t) => t,
                Err(message) => return self.reply(seq, OpResult::Error { message }),
            }
        };
        let discard = |why: End| {
            let _ = self.core.send(Event::DiscardTemp { xfer: xfer.clone() });
            why
        };
        self.send(&Msg::Proceed { seq }).map_err(discard)?;
        let mut got = 0u64;
        let mut hash = ContentHash::default();
        let sent_hash = loop {
            let frame: Frame = match read_frame(reader) {
                Ok(Some(f)) => f,
                Ok(None) => {
                    return Err(discard(End::Violation(format!("closed mid-upload of {path} ({got} of {size} bytes)"))))
                }
                Err(e) => return Err(discard(End::Proto(e))),
            };
            match frame.msg {
                Msg::Ping => self.send(&Msg::Pong).map_err(discard)?,
                Msg::Chunk { seq: s } if s == seq => {
                    got += frame.payload.len() as u64;
                    if got > size {
                        return Err(discard(End::Violation(format!(
                            "upload of {path} exceeds its declared {size} bytes"
                        ))));
                    }
                    hash.update(&frame.payload);
                    if let Err(e) = file.write_all(&frame.payload) {
                        log::error!("cannot write upload user={} path={path}: {e}", self.user);
                        return Err(discard(End::Violation(format!("server cannot store the upload: {e}"))));
                    }
                }
                Msg::UploadEnd { seq: s, hash } if s == seq => break hash,
                other => {
                    return Err(discard(End::Violation(format!("unexpected {} during upload of {path}", other.kind()))))
                }
            }
        };
        if got != size || sent_hash != hash {
            let _ = self.core.send(Event::DiscardTemp { xfer });
            let message =
                format!("upload of {path} arrived damaged ({got} of {size} bytes, hash {hash} vs {sent_hash})");
            log::warn!("{message}");
            return self.reply(seq, OpResult::Error { message });
        }
        if let Err(e) = file.sync_all() {
            let _ = self.core.send(Event::DiscardTemp { xfer });
            return self.reply(seq, OpResult::Error { message: format!("server cannot sync the upload: {e}") });
        }
        drop(file);
        let result =
            self.ask(seq, |reply| CoreRequest::CommitUpload { path, base, xfer, size, mtime_ms, hash, reply })?;
        self.reply(seq, result)
    }
}
