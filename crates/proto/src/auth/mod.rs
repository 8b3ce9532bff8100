//! Authentication building blocks (issue 8): who may speak as a server, who may log
//! in as a user, and how a new primary proves itself to a client it calls back.
//!
//! Everything here is pure or generic over a [`Transport`]: no sockets, threads or
//! clocks of its own. The handshakes are state machines that take the peer's
//! message and return the next one to send, in the manner of the replication
//! `Node`; a thin blocking driver runs each over any [`Transport`].
//!
//! # Layout
//! - [`key`]: the cluster key, its file (hex, mode 0600) and fresh randomness.
//! - [`cluster`]: mutual server-to-server authentication with the cluster key, a
//!   challenge-response with HMAC-SHA256 over the whole transcript.
//! - [`scram`]: user passwords in the manner of SCRAM-SHA-256 (RFC 5802, RFC 7677):
//!   the server keeps derived keys, the password never crosses the wire, and the
//!   server proves itself back.
//! - [`throttle`]: a growing per-user delay after failed logins.
//! - [`callback`]: the proof a new primary shows when it calls a client back.
//! - [`frames`]: [`Frames`], the [`Transport`] over `Msg::Auth` frames that the
//!   binaries use.
//! - this file: the messages of all of them ([`AuthMsg`]), their error
//!   ([`AuthError`]), and the [`Transport`] the drivers run over.
//!
//! # Wire
//! [`AuthMsg`] is one serde enum tagged `"auth"`, meant to travel inside one
//! `Msg::Auth(AuthMsg)` variant of [`crate::Msg`], so a frame reads
//! `{"epoch":1,"msg":{"kind":"auth","auth":"server_challenge",...}}`.
//!
//! # Timeouts
//! The drivers block in [`Transport::recv`]. Bounding each read (a socket read
//! timeout, as for the hello) is the caller's job: a peer that says nothing must
//! not hold a thread for ever.
#![forbid(unsafe_code)]

pub mod callback;
pub mod cluster;
mod encoding;
pub mod frames;
pub mod key;
pub mod scram;
pub mod throttle;

use crate::error::ProtoError;
use crate::ids::{DeviceId, Epoch, ServerId};
use serde::{Deserialize, Serialize};
use std::fmt;

pub use callback::{callback_proof, verify_callback_proof};
pub use cluster::{accept_server, connect_to_server, AuthenticatedServer, ClusterInitiator, ClusterResponder, Purpose};
pub use frames::Frames;
pub use key::{fresh_nonce, ClusterKey, KeyError, Nonce};
pub use scram::{login, LoggedIn, Password, ScramClient, ScramServer, ServerStep, SessionKey, StoredCredentials};
pub use throttle::{Admission, LoginThrottle};

/// Every message of the handshakes in this module. Nonces and MACs of the cluster
/// and callback handshakes are lowercase hex; the SCRAM values are base64, as RFC
/// 5802 writes them, because they are signed in that form.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "auth", rename_all = "snake_case")]
pub enum AuthMsg {
    /// Server to server, first: the connecting server's challenge.
    ServerChallenge {
        /// The connecting server's [`crate::PROTOCOL_VERSION`].
        version: u32,
        /// What the connection is for; bound into both proofs.
        purpose: Purpose,
        /// The connecting server's id, if it has one yet (a new joiner has none).
        id: Option<ServerId>,
        /// 32 fresh random bytes, hex.
        nonce: String,
    },
    /// Server to server, second: the accepting server's nonce and its proof.
    ServerResponse {
        /// The accepting server's id, if it has one yet.
        id: Option<ServerId>,
        /// 32 fresh random bytes, hex.
        nonce: String,
        /// HMAC-SHA256 of the transcript by the accepting side, hex.
        mac: String,
    },
    /// Server to server, third: the connecting server's proof.
    ServerProof {
        /// HMAC-SHA256 of the transcript by the connecting side, hex.
        mac: String,
    },
    /// Server to server, last: the accepting server took the proof. Not itself
    /// authenticated (see docs/security.md); it only lets the connecting side tell a
    /// refusal from success without waiting for the next frame.
    ServerAccepted,
    /// Client to server, first: who logs in, and the client's nonce.
    ScramClientFirst {
        /// The username (checked by [`crate::validate_username`]).
        user: String,
        /// Printable ASCII without `,`, 16 to 128 characters.
        nonce: String,
    },
    /// Server to client: the user has no account yet. The client may create one
    /// with [`AuthMsg::ScramRegister`].
    ScramNoAccount,
    /// Client to server, after [`AuthMsg::ScramNoAccount`]: the new account's keys,
    /// derived from the password on the client.
    ScramRegister {
        /// Salt, iteration count and derived keys; never the password.
        credentials: StoredCredentials,
    },
    /// Server to client: the combined nonce, the salt and the iteration count.
    ScramServerFirst {
        /// The client's nonce followed by the server's.
        nonce: String,
        /// The account's salt, base64.
        salt: String,
        /// PBKDF2 iterations.
        iterations: u32,
    },
    /// Client to server: the proof that the client knows the password.
    ScramClientFinal {
        /// The combined nonce again.
        nonce: String,
        /// ClientKey XOR ClientSignature, base64.
        proof: String,
    },
    /// Server to client: the server's signature, proving it holds the account's keys.
    ScramServerFinal {
        /// ServerSignature, base64.
        signature: String,
    },
    /// Client to a server calling it back after a failover: prove you hold my token.
    CallbackChallenge {
        /// 32 fresh random bytes, hex.
        nonce: String,
    },
    /// Server to client: the proof of [`callback_proof`].
    CallbackProof {
        /// The calling primary's epoch; bound into the proof.
        epoch: Epoch,
        /// The device whose session this is; bound into the proof.
        device: DeviceId,
        /// HMAC-SHA256 keyed by the session token, hex.
        proof: String,
    },
    /// Either side: the handshake failed and the sender closes the connection.
    /// Unauthenticated, so only ever logged or shown, never trusted.
    Failed {
        /// What kind of failure, for the receiver to act on (exit codes, retries).
        why: Refusal,
        /// A sentence for the log or the user.
        detail: String,
    },
}

impl AuthMsg {
    /// The message's kind, for error messages (never its secrets).
    pub fn kind(&self) -> &'static str {
        match self {
            AuthMsg::ServerChallenge { .. } => "server_challenge",
            AuthMsg::ServerResponse { .. } => "server_response",
            AuthMsg::ServerProof { .. } => "server_proof",
            AuthMsg::ServerAccepted => "server_accepted",
            AuthMsg::ScramClientFirst { .. } => "scram_client_first",
            AuthMsg::ScramNoAccount => "scram_no_account",
            AuthMsg::ScramRegister { .. } => "scram_register",
            AuthMsg::ScramServerFirst { .. } => "scram_server_first",
            AuthMsg::ScramClientFinal { .. } => "scram_client_final",
            AuthMsg::ScramServerFinal { .. } => "scram_server_final",
            AuthMsg::CallbackChallenge { .. } => "callback_challenge",
            AuthMsg::CallbackProof { .. } => "callback_proof",
            AuthMsg::Failed { .. } => "failed",
        }
    }
}

/// Why a handshake was refused, as [`AuthMsg::Failed`] carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// The two servers do not hold the same cluster key.
    KeyMismatch,
    /// The user's password did not match.
    WrongPassword,
    /// No account, and this login did not create one.
    NoAccount,
    /// Too many failed logins of this user just now; try again after a pause.
    TryLater,
    /// A malformed, unexpected or mismatched message, or another version.
    Protocol,
    /// The server could not store a new account or password.
    Unavailable,
}

/// Longest `detail` of a [`AuthMsg::Failed`] kept from a peer; the rest is cut, so
/// a hostile peer cannot fill a log line.
pub const MAX_DETAIL: usize = 200;

/// Which side of a handshake; named in errors so a log says who failed to prove what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The side that opened the connection (a joiner, a fetcher, an elector).
    Connecting,
    /// The side that accepted it.
    Accepting,
}

impl Side {
    fn peer_name(self) -> &'static str {
        match self {
            Side::Connecting => "the server that connected to us",
            Side::Accepting => "the server we connected to",
        }
    }
}

/// Why a handshake failed. Display gives one lowercase sentence saying what was
/// wrong and with whom; [`AuthError::refusal`] gives what to tell the peer.
#[derive(Debug)]
pub enum AuthError {
    /// The connection failed (I/O, framing, or a timeout set by the caller).
    Transport(ProtoError),
    /// The peer closed the connection in the middle of the handshake.
    Closed,
    /// The operating system gave no random bytes.
    Random(getrandom::Error),
    /// A message arrived where another was expected.
    Unexpected {
        /// What the handshake waited for.
        expected: &'static str,
        /// The kind that came instead.
        got: String,
    },
    /// A field is malformed (bad hex or base64, a wrong length, a bad character).
    Malformed(&'static str),
    /// The peer speaks another protocol version.
    Version {
        /// The peer's version.
        theirs: u32,
    },
    /// The peer's proof does not match our cluster key.
    KeyMismatch {
        /// The peer's side.
        peer: Side,
    },
    /// The peer sent our own nonce back: a reflected or replayed handshake.
    ReflectedNonce,
    /// A SCRAM nonce does not extend or repeat the one it must.
    NonceMismatch(&'static str),
    /// The server asks for SCRAM parameters we refuse (too few iterations make an
    /// offline guess cheap; too many burn our CPU; a short salt).
    WeakParameters(String),
    /// The username is not valid.
    InvalidUser(String),
    /// The password's proof is wrong (server side).
    WrongPassword {
        /// The user who tried.
        user: String,
    },
    /// The user has no account and this login may not create one.
    NoAccount {
        /// The user.
        user: String,
    },
    /// The server's SCRAM signature is wrong: it does not hold this account's keys.
    ServerNotProven,
    /// The server refused a new account, or new credentials, as invalid.
    BadCredentials(String),
    /// A callback's proof does not match the session's token.
    BadCallbackProof,
    /// The peer sent [`AuthMsg::Failed`].
    Refused {
        /// What kind of refusal.
        why: Refusal,
        /// The peer's sentence, cut to [`MAX_DETAIL`] bytes.
        detail: String,
    },
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::Transport(e) => write!(f, "connection failed during authentication: {e}"),
            AuthError::Closed => f.write_str("the peer closed the connection during authentication"),
            AuthError::Random(e) => write!(f, "cannot get random bytes from the operating system: {e}"),
            AuthError::Unexpected { expected, got } => {
                write!(f, "the peer sent {got} where the handshake expects {expected}")
            }
            AuthError::Malformed(what) => write!(f, "malformed authentication message: {what}"),
            AuthError::Version { theirs } => {
                write!(f, "the peer speaks protocol version {theirs}; we speak {}", crate::PROTOCOL_VERSION)
            }
            AuthError::KeyMismatch { peer } => {
                write!(f, "{} does not hold this cluster's key (its proof does not match)", peer.peer_name())
            }
            AuthError::ReflectedNonce => {
                f.write_str("the peer sent our own nonce back (a reflected or replayed handshake)")
            }
            AuthError::NonceMismatch(what) => write!(f, "replayed or mismatched nonce: {what}"),
            AuthError::WeakParameters(what) => write!(f, "refusing the server's password parameters: {what}"),
            AuthError::InvalidUser(why) => write!(f, "{why}"),
            AuthError::WrongPassword { user } => write!(f, "wrong password for user {user}"),
            AuthError::NoAccount { user } => {
                write!(f, "the server has no account {user}, and this login may not create one")
            }
            AuthError::ServerNotProven => f.write_str(
                "the server could not prove it holds this account's keys (not the real server, or a forged reply)",
            ),
            AuthError::BadCredentials(why) => write!(f, "invalid credentials: {why}"),
            AuthError::BadCallbackProof => {
                f.write_str("the caller's proof does not match this session's token (not our server)")
            }
            AuthError::Refused { detail, .. } => write!(f, "the peer refused: {detail:?}"),
        }
    }
}

impl std::error::Error for AuthError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AuthError::Transport(e) => Some(e),
            AuthError::Random(e) => Some(e),
            _ => None,
        }
    }
}

impl From<ProtoError> for AuthError {
    fn from(e: ProtoError) -> Self {
        AuthError::Transport(e)
    }
}

impl AuthError {
    /// The [`AuthMsg::Failed`] to send the peer before closing, or `None` when there
    /// is nobody to tell (the connection broke, or the peer refused first).
    pub fn refusal(&self) -> Option<AuthMsg> {
        let (why, detail) = match self {
            AuthError::Transport(_) | AuthError::Closed | AuthError::Refused { .. } | AuthError::Random(_) => {
                return None
            }
            AuthError::KeyMismatch { .. } => (Refusal::KeyMismatch, "the cluster keys do not match".to_string()),
            AuthError::WrongPassword { .. } => (Refusal::WrongPassword, "wrong password".to_string()),
            AuthError::NoAccount { user } => (Refusal::NoAccount, format!("no account {user}")),
            AuthError::BadCredentials(why) => (Refusal::Unavailable, format!("invalid credentials: {why}")),
            // The rest are protocol failures; the Display sentence tells the peer
            // what it did wrong and gives away no secret.
            other => (Refusal::Protocol, other.to_string()),
        };
        Some(AuthMsg::Failed { why, detail })
    }

    /// The error for a [`AuthMsg::Failed`] that arrived, with its text bounded.
    pub(crate) fn from_refusal(why: Refusal, mut detail: String) -> Self {
        if detail.len() > MAX_DETAIL {
            let mut cut = MAX_DETAIL;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
        }
        AuthError::Refused { why, detail }
    }

    /// The error for `msg` arriving where `expected` should: the peer's refusal if
    /// it is one, an unexpected message otherwise.
    fn unexpected(expected: &'static str, msg: AuthMsg) -> Self {
        match msg {
            AuthMsg::Failed { why, detail } => AuthError::from_refusal(why, detail),
            other => AuthError::Unexpected { expected, got: other.kind().to_string() },
        }
    }
}

/// A connection that carries [`AuthMsg`]s, one per frame: [`Frames`] in the
/// binaries; an in-memory pipe and a stand-in codec over TCP in this module's tests.
pub trait Transport {
    /// Sends one message (and flushes it).
    fn send(&mut self, msg: AuthMsg) -> Result<(), AuthError>;
    /// Receives the next message. A clean close is [`AuthError::Closed`]; a frame
    /// that is not an authentication message is [`AuthError::Unexpected`].
    fn recv(&mut self) -> Result<AuthMsg, AuthError>;
}

/// What a handshake machine wants done after taking a message.
#[derive(Debug, PartialEq)]
pub enum Step<T> {
    /// Send this and wait for the peer's answer.
    Send(AuthMsg),
    /// The handshake succeeded: send the message, if any, and carry on with `T`.
    Done(Option<AuthMsg>, T),
}

/// Runs a handshake machine over `t`: sends `send_first` (if any), then feeds
/// `received` (a message the caller already read, if any) and every message
/// received after it to `step`, until it is done. On a local failure the peer is
/// told why ([`AuthError::refusal`]), best effort, before the error is returned.
fn drive<T: Transport, D>(
    t: &mut T,
    send_first: Option<AuthMsg>,
    mut received: Option<AuthMsg>,
    mut step: impl FnMut(AuthMsg) -> Result<Step<D>, AuthError>,
) -> Result<D, AuthError> {
    if let Some(msg) = send_first {
        t.send(msg)?;
    }
    loop {
        let msg = match received.take() {
            Some(msg) => msg,
            None => t.recv()?,
        };
        match step(msg) {
            Ok(Step::Send(reply)) => t.send(reply)?,
            Ok(Step::Done(reply, done)) => {
                if let Some(reply) = reply {
                    t.send(reply)?;
                }
                return Ok(done);
            }
            Err(e) => {
                if let Some(refusal) = e.refusal() {
                    // The error we return matters more than whether the peer heard it.
                    let _ = t.send(refusal);
                }
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod test_rand {
    pub(crate) use crate::rng::SplitMix64;
}

#[cfg(test)]
pub(crate) mod test_transport {
    //! Two transports for the tests: an in-memory pipe between two threads, and a
    //! stand-in codec over a real `TcpStream` (a 4-byte big-endian length, then the
    //! JSON of the message: the frame layout, until `Msg::Auth` exists).
    use super::{AuthError, AuthMsg, Transport};
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::sync::mpsc::{channel, Receiver, Sender};

    /// One end of an in-memory pipe.
    pub(crate) struct Pipe {
        tx: Sender<AuthMsg>,
        rx: Receiver<AuthMsg>,
        /// Every message this end sent, for tests that replay or tamper.
        pub(crate) sent: Vec<AuthMsg>,
    }

    /// Both ends of a pipe.
    pub(crate) fn pipe() -> (Pipe, Pipe) {
        let (a_tx, b_rx) = channel();
        let (b_tx, a_rx) = channel();
        (Pipe { tx: a_tx, rx: a_rx, sent: Vec::new() }, Pipe { tx: b_tx, rx: b_rx, sent: Vec::new() })
    }

    impl Transport for Pipe {
        fn send(&mut self, msg: AuthMsg) -> Result<(), AuthError> {
            self.sent.push(msg.clone());
            // A peer that has hung up is seen on the next recv, as with TCP.
            let _ = self.tx.send(msg);
            Ok(())
        }
        fn recv(&mut self) -> Result<AuthMsg, AuthError> {
            self.rx.recv().map_err(|_| AuthError::Closed)
        }
    }

    /// The stand-in codec over TCP.
    pub(crate) struct Tcp(pub(crate) TcpStream);

    impl Transport for Tcp {
        fn send(&mut self, msg: AuthMsg) -> Result<(), AuthError> {
            let body = serde_json::to_vec(&msg).map_err(crate::ProtoError::BadHeader)?;
            let mut out = (body.len() as u32).to_be_bytes().to_vec();
            out.extend_from_slice(&body);
            self.0.write_all(&out).map_err(crate::ProtoError::Io)?;
            Ok(())
        }
        fn recv(&mut self) -> Result<AuthMsg, AuthError> {
            let mut len = [0u8; 4];
            if let Err(e) = self.0.read_exact(&mut len) {
                return Err(match e.kind() {
                    std::io::ErrorKind::UnexpectedEof => AuthError::Closed,
                    _ => crate::ProtoError::Io(e).into(),
                });
            }
            let len = u32::from_be_bytes(len) as usize;
            if len == 0 || len > crate::MAX_HEADER {
                return Err(crate::ProtoError::HeaderLength(len).into());
            }
            let mut body = vec![0u8; len];
            self.0.read_exact(&mut body).map_err(crate::ProtoError::Io)?;
            Ok(serde_json::from_slice(&body).map_err(crate::ProtoError::BadHeader)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape `Msg::Auth(AuthMsg)` will have once the lead adds it: an internally
    /// tagged newtype variant holding this internally tagged enum.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "kind", rename_all = "snake_case")]
    enum Outer {
        Auth(AuthMsg),
        Ping,
    }

    #[test]
    fn every_message_nests_in_a_kind_tagged_enum_and_round_trips() {
        let creds = StoredCredentials::derive("pw", b"0123456789abcdef", 4096).unwrap();
        let msgs = vec![
            AuthMsg::ServerChallenge { version: 1, purpose: Purpose::Link, id: None, nonce: "ab".into() },
            AuthMsg::ServerResponse { id: Some(ServerId(3)), nonce: "cd".into(), mac: "ef".into() },
            AuthMsg::ServerProof { mac: "01".into() },
            AuthMsg::ServerAccepted,
            AuthMsg::ScramClientFirst { user: "alice".into(), nonce: "n".into() },
            AuthMsg::ScramNoAccount,
            AuthMsg::ScramRegister { credentials: creds },
            AuthMsg::ScramServerFirst { nonce: "nn".into(), salt: "c2FsdA==".into(), iterations: 4096 },
            AuthMsg::ScramClientFinal { nonce: "nn".into(), proof: "cA==".into() },
            AuthMsg::ScramServerFinal { signature: "cw==".into() },
            AuthMsg::CallbackChallenge { nonce: "00".into() },
            AuthMsg::CallbackProof { epoch: Epoch(4), device: DeviceId("0123abcd".into()), proof: "ff".into() },
            AuthMsg::Failed { why: Refusal::WrongPassword, detail: "wrong password".into() },
        ];
        for msg in msgs {
            let json = serde_json::to_string(&Outer::Auth(msg.clone())).unwrap();
            assert!(json.starts_with(r#"{"kind":"auth","auth":""#), "{json}");
            assert_eq!(serde_json::from_str::<Outer>(&json).unwrap(), Outer::Auth(msg), "{json}");
        }
        assert_eq!(serde_json::from_str::<Outer>(r#"{"kind":"ping"}"#).unwrap(), Outer::Ping);
    }

    #[test]
    fn a_peer_refusal_is_cut_to_the_bound_on_a_char_boundary() {
        let long = "é".repeat(MAX_DETAIL);
        let e = AuthError::unexpected("x", AuthMsg::Failed { why: Refusal::Protocol, detail: long });
        match e {
            AuthError::Refused { detail, .. } => assert!(detail.len() <= MAX_DETAIL && !detail.is_empty()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_read_as_lowercase_sentences_and_leak_no_secret() {
        let e = AuthError::KeyMismatch { peer: Side::Connecting };
        assert_eq!(
            e.to_string(),
            "the server that connected to us does not hold this cluster's key (its proof does not match)"
        );
        assert_eq!(
            e.refusal(),
            Some(AuthMsg::Failed { why: Refusal::KeyMismatch, detail: "the cluster keys do not match".into() })
        );
        assert_eq!(AuthError::Closed.refusal(), None);
        let refused = AuthError::Refused { why: Refusal::WrongPassword, detail: "wrong\npassword".into() };
        assert_eq!(refused.to_string(), r#"the peer refused: "wrong\npassword""#, "control characters escaped");
        assert_eq!(refused.refusal(), None, "a refusal is not answered with another");
    }
}
