//! A protocol connection driven by hand, for sending what a real client never
//! would.

use super::{fail, DEADLINE};
use replibox_proto::{
    read_frame, write_frame, ContentHash, DeviceId, Epoch, Frame, Msg, Notice, Op, OpResult, ProtoError, Seq, Version,
    Who, CHUNK_SIZE,
};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

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

    /// Connects and logs in as a client of `user` with device id `device`;
    /// panics unless welcomed.
    pub fn login(addr: SocketAddr, user: &str, device: &str, what: &str) -> Raw {
        let mut r = Raw::connect(addr, what);
        r.send(&hello(user, device));
        match r.recv() {
            Some(Frame { msg: Msg::Welcome { last_seq, .. }, .. }) => {
                r.seq = last_seq.0;
                r
            }
            other => fail(format!("{what}: login of {user} not welcomed: {other:?}")),
        }
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
        self.send(&Msg::Request { seq, op: Op::Upload { path: path.into(), size, mtime_ms: 1_000, base } });
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

/// A client hello with protocol version 1.
pub fn hello(user: &str, device: &str) -> Msg {
    Msg::Hello {
        version: replibox_proto::PROTOCOL_VERSION,
        who: Who::Client { user: user.into(), device: DeviceId(device.into()), callback_port: 9 },
    }
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
