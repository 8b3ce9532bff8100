//! Server-to-server connections: each one leaves from this server's own address
//! and opens with the cluster key's mutual challenge-response
//! (`replibox_proto::auth::cluster`), before anything else is read or sent.
//!
//! Why the own address: a primary records a member's address from the connection
//! its link comes from (or checks the address the hello claims against it), so a
//! server bound to 127.0.0.2 must connect from 127.0.0.2. The kernel would pick
//! 127.0.0.1 for a connection to 127.0.0.1.

use crate::node::Unreached;
use replibox_proto::auth::{connect_to_server, AuthError, AuthenticatedServer, Frames, Refusal};
use replibox_proto::{ClusterKey, Epoch, Purpose, ServerId};
use socket2::{Domain, Socket, Type};
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// What this server needs to speak to other servers.
#[derive(Debug)]
pub struct ClusterAuth {
    /// The cluster key.
    pub key: ClusterKey,
    /// This server's id (0 until a joining backup is given one), bound into
    /// every handshake.
    pub id: AtomicU64,
    /// The address outgoing connections leave from (None when bound to every
    /// address: the kernel picks).
    pub bind: Option<IpAddr>,
    /// `DATA/cluster.key`, where a joiner keeps the key once a primary accepts it.
    pub key_path: PathBuf,
    /// The key is in the data dir: this server was accepted by (or started) the
    /// cluster with it. Until then, a key mismatch is the operator's mistake and
    /// ends the process; afterwards it is a stranger at a member's address, which
    /// must not be able to stop the server.
    pub kept: AtomicBool,
}

impl ClusterAuth {
    /// This server's id, if it has one yet.
    pub fn me(&self) -> Option<ServerId> {
        Some(ServerId(self.id.load(Ordering::Relaxed))).filter(|i| i.0 > 0)
    }

    /// Keeps the key in the data dir, once (a joiner the primary accepted).
    pub fn keep(&self) {
        if self.kept.load(Ordering::Relaxed) {
            return;
        }
        match self.key.save_new(&self.key_path) {
            Ok(()) => log::info!(
                "kept the cluster key in {} (fingerprint {})",
                self.key_path.display(),
                self.key.fingerprint()
            ),
            Err(replibox_proto::KeyError::Exists { .. }) => {}
            Err(e) => {
                log::error!("{e}; a restart of this server will need --key-file again");
                return;
            }
        }
        self.kept.store(true, Ordering::Relaxed);
    }
}

/// Why a connection to another server failed.
#[derive(Debug)]
pub enum ConnectError {
    /// The server could not be reached, or its connection broke before the
    /// handshake ended.
    Unreachable {
        /// How: refused, broken, or silent.
        how: Unreached,
        /// Why, for the log.
        why: String,
    },
    /// The peer does not hold this cluster's key (whichever side found out).
    KeyMismatch(String),
    /// The handshake failed otherwise (a timeout, garbage, another version).
    Handshake(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Unreachable { why, .. } | ConnectError::Handshake(why) => f.write_str(why),
            ConnectError::KeyMismatch(why) => f.write_str(why),
        }
    }
}

/// True when an error says the peer's process is not running: its port refused
/// the connection, so nothing there can act on our message. Anything else (a
/// reset, a close without an answer, a timeout) may come from a live process
/// that could not answer (out of threads, stopping) and that may still stand in
/// an election: it counts as silence, and a later try finds out.
pub fn is_down(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::ConnectionRefused)
}

/// What an I/O error on a connection to another server says of it: refused
/// (its process is not running), broken (its host answered with a reset or a
/// close, so it is not cut off), or silent (a timeout, no route: it may be cut
/// off and alive). Anything unknown counts as silence, the cautious reading.
pub fn unreached(e: &std::io::Error) -> Unreached {
    match e.kind() {
        ErrorKind::ConnectionRefused => Unreached::Refused,
        ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe
        | ErrorKind::UnexpectedEof => Unreached::Broken,
        _ => Unreached::Silent,
    }
}

/// Connects to `to` from `from` when given (any free port).
fn connect_from(from: Option<IpAddr>, to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    match from {
        Some(ip) if ip.is_ipv4() == to.is_ipv4() => {
            let domain = if to.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
            let socket = Socket::new(domain, Type::STREAM, None)?;
            socket.bind(&SocketAddr::new(ip, 0).into())?;
            socket.connect_timeout(&to.into(), timeout)?;
            Ok(socket.into())
        }
        _ => TcpStream::connect_timeout(&to, timeout),
    }
}

/// Connects to the server at `addr` for `purpose`, and authenticates both ways
/// with the cluster key, as server `me` (the id the hello that follows will
/// carry: the other side checks that they agree). Every read and write on the
/// stream returned times out after `timeout` (the caller may set other bounds
/// afterwards).
pub fn connect(
    auth: &ClusterAuth,
    me: Option<ServerId>,
    addr: &str,
    purpose: Purpose,
    epoch: Epoch,
    timeout: Duration,
) -> Result<(TcpStream, AuthenticatedServer), ConnectError> {
    let unreachable = |how, why| ConnectError::Unreachable { how, why };
    let sock = addr
        .to_socket_addrs()
        .map_err(|e| unreachable(Unreached::Silent, format!("cannot resolve {addr}: {e}")))?
        .next()
        .ok_or_else(|| unreachable(Unreached::Silent, format!("cannot resolve {addr}")))?;
    let stream = connect_from(auth.bind, sock, timeout)
        .map_err(|e| unreachable(unreached(&e), format!("cannot reach {addr}: {e}")))?;
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    let mut t = Frames { reader: &stream, writer: &stream, epoch };
    match connect_to_server(&mut t, &auth.key, me, purpose) {
        Ok(peer) => Ok((stream, peer)),
        Err(e) => Err(classify(addr, e)),
    }
}

/// A handshake failure as the connecting side reports it.
fn classify(addr: &str, e: AuthError) -> ConnectError {
    match e {
        AuthError::KeyMismatch { .. } | AuthError::Refused { why: Refusal::KeyMismatch, .. } => {
            ConnectError::KeyMismatch(format!("the cluster key does not match the one of the server at {addr}: {e}"))
        }
        AuthError::Transport(replibox_proto::ProtoError::Io(io)) if unreached(&io) != Unreached::Silent => {
            ConnectError::Unreachable { how: unreached(&io), why: format!("{addr} closed the connection: {io}") }
        }
        AuthError::Closed => ConnectError::Unreachable {
            how: Unreached::Broken,
            why: format!(
                "{addr} closed the connection during the cluster handshake (it may refuse server connections now)"
            ),
        },
        other => ConnectError::Handshake(format!("cluster handshake with {addr} failed: {other}")),
    }
}
