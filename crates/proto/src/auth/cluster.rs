//! Mutual server-to-server authentication with the cluster key.
//!
//! ```text
//! connecting C                                            accepting A
//!   server_challenge {version, purpose, id_C, N_C}   ->
//!                                                    <-   server_response {id_A, N_A, mac_A}
//!   server_proof {mac_C}                             ->
//!                                                    <-   server_accepted
//!
//! mac_X = HMAC-SHA256(key, "replibox cluster auth v1" | role of X | version
//!                          | purpose | id_C | id_A | N_C | N_A)
//! ```
//!
//! Each field of the transcript is length-prefixed, so no two transcripts encode
//! alike. What each part stops:
//! - **Both nonces, fresh from both sides**: a recorded handshake cannot be replayed.
//!   A's proof covers C's fresh nonce, and C's proof covers A's, so an old proof
//!   matches no new transcript. A peer that echoes our own nonce is refused
//!   outright ([`AuthError::ReflectedNonce`]).
//! - **The role of the author** ("connecting" or "accepting"): A's proof can never
//!   be passed off as C's. Without it, an attacker could open a second connection
//!   to A, send A's own nonce pair back, and reflect A's proof into the first.
//! - **Purpose, both ids, version**: a proof made for a fetch connection, for
//!   another claimed id, or under another protocol version does not verify for a
//!   link. All members hold the same key, so an id says which member a key holder
//!   *claims* to be, not which it is (see docs/security.md).
//! - **A proves first**: a stranger learns A's MAC over a transcript it partly
//!   chose. With a 256-bit random key (not a password) that offers no offline
//!   guess.
//!
//! The handshake authenticates the peer at the start of the connection; the frames
//! after it are not authenticated one by one, so an attacker who can rewrite
//! traffic on the path (not merely connect and listen) could take the connection
//! over afterwards. docs/security.md says so.

use super::encoding::{hex_decode, hex_encode};
use super::key::{fresh_nonce, ClusterKey, Nonce};
use super::{drive, AuthError, AuthMsg, Side, Step, Transport};
use crate::ids::ServerId;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// What a server-to-server connection is for. Bound into both proofs, so a proof
/// made for one purpose is worthless for another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// A joiner's connection that becomes its replication link (joins and rejoins,
    /// after a failover too).
    Link,
    /// A backup's connection for fetching file contents.
    Fetch,
    /// Election traffic between members (ELECTION, OK, COORDINATOR).
    Election,
}

impl Purpose {
    /// The name bound into the transcript (and used on the wire).
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Link => "link",
            Purpose::Fetch => "fetch",
            Purpose::Election => "election",
        }
    }
}

/// A peer that proved it holds the cluster key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuthenticatedServer {
    /// The id it claims (any key holder can claim any id; see the module doc).
    pub id: Option<ServerId>,
    /// What the connection is for, as both sides proved.
    pub purpose: Purpose,
}

/// The transcript both sides MAC; `author` says whose proof this is.
#[allow(clippy::too_many_arguments)]
fn transcript_mac(
    key: &ClusterKey,
    author: Side,
    version: u32,
    purpose: Purpose,
    connecting_id: Option<ServerId>,
    accepting_id: Option<ServerId>,
    connecting_nonce: &Nonce,
    accepting_nonce: &Nonce,
) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key.bytes()).expect("HMAC takes a key of any length");
    let mut field = |bytes: &[u8]| {
        mac.update(&(bytes.len() as u32).to_be_bytes());
        mac.update(bytes);
    };
    field(b"replibox cluster auth v1");
    field(match author {
        Side::Connecting => b"connecting",
        Side::Accepting => b"accepting",
    });
    field(&version.to_be_bytes());
    field(purpose.as_str().as_bytes());
    field(&id_bytes(connecting_id));
    field(&id_bytes(accepting_id));
    field(connecting_nonce);
    field(accepting_nonce);
    mac
}

/// An optional id as bytes: none is empty, which no id's 8 bytes can be.
fn id_bytes(id: Option<ServerId>) -> Vec<u8> {
    id.map(|i| i.0.to_be_bytes().to_vec()).unwrap_or_default()
}

fn decode_nonce(text: &str) -> Result<Nonce, AuthError> {
    hex_decode(text).ok_or(AuthError::Malformed("a nonce must be 64 hex digits"))
}

fn decode_mac(text: &str) -> Result<[u8; 32], AuthError> {
    hex_decode(text).ok_or(AuthError::Malformed("a MAC must be 64 hex digits"))
}

/// The connecting side of the handshake, as a state machine with no I/O.
pub struct ClusterInitiator {
    key: ClusterKey,
    me: Option<ServerId>,
    purpose: Purpose,
    nonce: Nonce,
    state: InitiatorState,
}

#[derive(Debug, PartialEq)]
enum InitiatorState {
    AwaitResponse,
    AwaitAccepted(AuthenticatedServer),
    Finished,
}

impl ClusterInitiator {
    /// Starts a handshake as server `me` (none for a new joiner) for `purpose`;
    /// returns the machine and the challenge to send.
    pub fn start(key: &ClusterKey, me: Option<ServerId>, purpose: Purpose) -> Result<(Self, AuthMsg), AuthError> {
        Ok(Self::with_nonce(key, me, purpose, fresh_nonce()?))
    }

    pub(crate) fn with_nonce(
        key: &ClusterKey,
        me: Option<ServerId>,
        purpose: Purpose,
        nonce: Nonce,
    ) -> (Self, AuthMsg) {
        let first =
            AuthMsg::ServerChallenge { version: crate::PROTOCOL_VERSION, purpose, id: me, nonce: hex_encode(&nonce) };
        (ClusterInitiator { key: key.clone(), me, purpose, nonce, state: InitiatorState::AwaitResponse }, first)
    }

    /// Takes the peer's next message. Any error is final: send its
    /// [`AuthError::refusal`] if any, and close.
    pub fn step(&mut self, msg: AuthMsg) -> Result<Step<AuthenticatedServer>, AuthError> {
        let state = std::mem::replace(&mut self.state, InitiatorState::Finished);
        match (state, msg) {
            (InitiatorState::AwaitResponse, AuthMsg::ServerResponse { id, nonce, mac }) => {
                let theirs = decode_nonce(&nonce)?;
                let mac = decode_mac(&mac)?;
                if theirs == self.nonce {
                    return Err(AuthError::ReflectedNonce);
                }
                let v = crate::PROTOCOL_VERSION;
                transcript_mac(&self.key, Side::Accepting, v, self.purpose, self.me, id, &self.nonce, &theirs)
                    .verify_slice(&mac)
                    .map_err(|_| AuthError::KeyMismatch { peer: Side::Accepting })?;
                let ours =
                    transcript_mac(&self.key, Side::Connecting, v, self.purpose, self.me, id, &self.nonce, &theirs);
                self.state = InitiatorState::AwaitAccepted(AuthenticatedServer { id, purpose: self.purpose });
                Ok(Step::Send(AuthMsg::ServerProof { mac: hex_encode(&ours.finalize().into_bytes()) }))
            }
            (InitiatorState::AwaitAccepted(peer), AuthMsg::ServerAccepted) => Ok(Step::Done(None, peer)),
            (InitiatorState::AwaitResponse, other) => Err(AuthError::unexpected("server_response", other)),
            (InitiatorState::AwaitAccepted(_), other) => Err(AuthError::unexpected("server_accepted", other)),
            (InitiatorState::Finished, other) => Err(AuthError::unexpected("nothing (the handshake is over)", other)),
        }
    }
}

/// The accepting side of the handshake, as a state machine with no I/O.
pub struct ClusterResponder {
    key: ClusterKey,
    me: Option<ServerId>,
    nonce: Nonce,
    state: ResponderState,
}

#[derive(Debug, PartialEq)]
enum ResponderState {
    AwaitChallenge,
    AwaitProof { expected: [u8; 32], peer: AuthenticatedServer },
    Finished,
}

impl ClusterResponder {
    /// A responder for server `me` (none while it has no id yet); feed it the
    /// connection's first message.
    pub fn new(key: &ClusterKey, me: Option<ServerId>) -> Result<Self, AuthError> {
        Ok(Self::with_nonce(key, me, fresh_nonce()?))
    }

    pub(crate) fn with_nonce(key: &ClusterKey, me: Option<ServerId>, nonce: Nonce) -> Self {
        ClusterResponder { key: key.clone(), me, nonce, state: ResponderState::AwaitChallenge }
    }

    /// Takes the peer's next message. Any error is final: send its
    /// [`AuthError::refusal`] if any, and close.
    pub fn step(&mut self, msg: AuthMsg) -> Result<Step<AuthenticatedServer>, AuthError> {
        let state = std::mem::replace(&mut self.state, ResponderState::Finished);
        match (state, msg) {
            (ResponderState::AwaitChallenge, AuthMsg::ServerChallenge { version, purpose, id, nonce }) => {
                if version != crate::PROTOCOL_VERSION {
                    return Err(AuthError::Version { theirs: version });
                }
                let theirs = decode_nonce(&nonce)?;
                if theirs == self.nonce {
                    return Err(AuthError::ReflectedNonce);
                }
                let mine =
                    transcript_mac(&self.key, Side::Accepting, version, purpose, id, self.me, &theirs, &self.nonce);
                let expected =
                    transcript_mac(&self.key, Side::Connecting, version, purpose, id, self.me, &theirs, &self.nonce);
                self.state = ResponderState::AwaitProof {
                    expected: expected.finalize().into_bytes().into(),
                    peer: AuthenticatedServer { id, purpose },
                };
                Ok(Step::Send(AuthMsg::ServerResponse {
                    id: self.me,
                    nonce: hex_encode(&self.nonce),
                    mac: hex_encode(&mine.finalize().into_bytes()),
                }))
            }
            (ResponderState::AwaitProof { expected, peer }, AuthMsg::ServerProof { mac }) => {
                let mac = decode_mac(&mac)?;
                if subtle::ConstantTimeEq::ct_eq(&expected[..], &mac[..]).into() {
                    Ok(Step::Done(Some(AuthMsg::ServerAccepted), peer))
                } else {
                    Err(AuthError::KeyMismatch { peer: Side::Connecting })
                }
            }
            (ResponderState::AwaitChallenge, other) => Err(AuthError::unexpected("server_challenge", other)),
            (ResponderState::AwaitProof { .. }, other) => Err(AuthError::unexpected("server_proof", other)),
            (ResponderState::Finished, other) => Err(AuthError::unexpected("nothing (the handshake is over)", other)),
        }
    }
}

/// Runs the connecting side over `t`: call it first thing on a new connection to
/// another server, before anything else is sent or read. Set a read timeout first.
pub fn connect_to_server<T: Transport>(
    t: &mut T,
    key: &ClusterKey,
    me: Option<ServerId>,
    purpose: Purpose,
) -> Result<AuthenticatedServer, AuthError> {
    let (mut machine, first) = ClusterInitiator::start(key, me, purpose)?;
    drive(t, Some(first), None, |msg| machine.step(msg))
}

/// Runs the accepting side over `t`, given the connection's first message (which
/// the caller read to see that a server is speaking). Set a read timeout first.
pub fn accept_server<T: Transport>(
    t: &mut T,
    key: &ClusterKey,
    me: Option<ServerId>,
    first: AuthMsg,
) -> Result<AuthenticatedServer, AuthError> {
    let mut machine = ClusterResponder::new(key, me)?;
    drive(t, None, Some(first), |msg| machine.step(msg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::test_rand::SplitMix64;
    use crate::auth::test_transport::{pipe, Tcp};
    use crate::auth::Refusal;
    use std::net::{TcpListener, TcpStream};
    use std::thread;

    fn key(b: u8) -> ClusterKey {
        ClusterKey::from_bytes([b; 32])
    }

    /// Runs both machines against each other in memory; returns both outcomes.
    fn run(
        c_key: &ClusterKey,
        a_key: &ClusterKey,
        c_nonce: Nonce,
        a_nonce: Nonce,
    ) -> (Result<AuthenticatedServer, AuthError>, Result<AuthenticatedServer, AuthError>) {
        let (mut c, first) = ClusterInitiator::with_nonce(c_key, Some(ServerId(2)), Purpose::Link, c_nonce);
        let mut a = ClusterResponder::with_nonce(a_key, Some(ServerId(1)), a_nonce);
        let response = match a.step(first) {
            Ok(Step::Send(m)) => m,
            other => panic!("{other:?}"),
        };
        let proof = match c.step(response) {
            Ok(Step::Send(m)) => m,
            Ok(Step::Done(..)) => panic!("initiator done too early"),
            Err(e) => return (Err(e), Err(AuthError::Closed)),
        };
        let accepted = match a.step(proof) {
            Ok(Step::Done(Some(m), peer)) => (m, peer),
            Ok(other) => panic!("{other:?}"),
            Err(e) => return (Err(AuthError::Closed), Err(e)),
        };
        match c.step(accepted.0) {
            Ok(Step::Done(None, peer)) => (Ok(peer), Ok(accepted.1)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_same_key_authenticates_both_sides_and_binds_ids_and_purpose() {
        let (c, a) = run(&key(1), &key(1), [3; 32], [4; 32]);
        assert_eq!(c.unwrap(), AuthenticatedServer { id: Some(ServerId(1)), purpose: Purpose::Link });
        assert_eq!(a.unwrap(), AuthenticatedServer { id: Some(ServerId(2)), purpose: Purpose::Link });
    }

    #[test]
    fn a_wrong_key_is_caught_by_the_connecting_side_first() {
        let (c, _) = run(&key(1), &key(2), [3; 32], [4; 32]);
        let e = c.unwrap_err();
        assert!(matches!(e, AuthError::KeyMismatch { peer: Side::Accepting }), "{e}");
        assert_eq!(
            e.to_string(),
            "the server we connected to does not hold this cluster's key (its proof does not match)"
        );
    }

    #[test]
    fn a_stranger_without_the_key_cannot_finish_as_the_connecting_side() {
        // The stranger sees the responder's proof, then must forge its own.
        let mut a = ClusterResponder::with_nonce(&key(1), Some(ServerId(1)), [4; 32]);
        let (_, first) = ClusterInitiator::with_nonce(&key(9), Some(ServerId(2)), Purpose::Link, [3; 32]);
        let Ok(Step::Send(AuthMsg::ServerResponse { mac, .. })) = a.step(first) else { panic!() };
        // Its best guess: send the responder's own MAC back (a reflection).
        let e = a.step(AuthMsg::ServerProof { mac }).unwrap_err();
        assert!(matches!(e, AuthError::KeyMismatch { peer: Side::Connecting }), "{e}");
        assert_eq!(e.refusal().unwrap().kind(), "failed");
    }

    #[test]
    fn reflecting_the_accepting_sides_proof_through_a_second_connection_fails() {
        // The attacker opens connection 1 to A with nonce X and gets A's nonce Y.
        // It opens connection 2 to A claiming nonce Y... but A2's nonce is fresh, and
        // A's MAC in either connection is labelled "accepting": it never verifies
        // where a "connecting" proof is expected.
        let k = key(1);
        let mut a1 = ClusterResponder::with_nonce(&k, Some(ServerId(1)), [0x11; 32]);
        let first1 = AuthMsg::ServerChallenge {
            version: crate::PROTOCOL_VERSION,
            purpose: Purpose::Link,
            id: Some(ServerId(1)),
            nonce: hex_encode(&[0x22; 32]),
        };
        let Ok(Step::Send(AuthMsg::ServerResponse { nonce: y, .. })) = a1.step(first1) else { panic!() };
        let mut a2 = ClusterResponder::with_nonce(&k, Some(ServerId(1)), [0x33; 32]);
        let first2 = AuthMsg::ServerChallenge {
            version: crate::PROTOCOL_VERSION,
            purpose: Purpose::Link,
            id: Some(ServerId(1)),
            nonce: y,
        };
        let Ok(Step::Send(AuthMsg::ServerResponse { mac: mac2, .. })) = a2.step(first2) else { panic!() };
        let e = a1.step(AuthMsg::ServerProof { mac: mac2 }).unwrap_err();
        assert!(matches!(e, AuthError::KeyMismatch { .. }), "{e}");
    }

    #[test]
    fn an_echoed_nonce_is_refused_on_both_sides() {
        let mut a = ClusterResponder::with_nonce(&key(1), None, [5; 32]);
        let first = AuthMsg::ServerChallenge {
            version: crate::PROTOCOL_VERSION,
            purpose: Purpose::Link,
            id: None,
            nonce: hex_encode(&[5; 32]),
        };
        assert!(matches!(a.step(first), Err(AuthError::ReflectedNonce)));
        let (mut c, _) = ClusterInitiator::with_nonce(&key(1), None, Purpose::Link, [6; 32]);
        let echo = AuthMsg::ServerResponse { id: None, nonce: hex_encode(&[6; 32]), mac: hex_encode(&[0; 32]) };
        assert!(matches!(c.step(echo), Err(AuthError::ReflectedNonce)));
    }

    #[test]
    fn a_recorded_handshake_does_not_replay_against_fresh_nonces() {
        // Record a good exchange, then replay the connecting side's messages to a
        // responder with a new nonce, and the accepting side's to a new initiator.
        let k = key(1);
        let (mut c, first) = ClusterInitiator::with_nonce(&k, Some(ServerId(2)), Purpose::Link, [1; 32]);
        let mut a = ClusterResponder::with_nonce(&k, Some(ServerId(1)), [2; 32]);
        let Ok(Step::Send(response)) = a.step(first.clone()) else { panic!() };
        let Ok(Step::Send(proof)) = c.step(response.clone()) else { panic!() };

        let mut a_again = ClusterResponder::with_nonce(&k, Some(ServerId(1)), [7; 32]);
        assert!(matches!(a_again.step(first), Ok(Step::Send(_))));
        assert!(matches!(a_again.step(proof), Err(AuthError::KeyMismatch { peer: Side::Connecting })));

        let (mut c_again, _) = ClusterInitiator::with_nonce(&k, Some(ServerId(2)), Purpose::Link, [8; 32]);
        assert!(matches!(c_again.step(response), Err(AuthError::KeyMismatch { peer: Side::Accepting })));
    }

    #[test]
    fn a_changed_purpose_id_or_version_breaks_the_proofs() {
        let k = key(1);
        let (mut c, first) = ClusterInitiator::with_nonce(&k, Some(ServerId(2)), Purpose::Fetch, [1; 32]);
        let AuthMsg::ServerChallenge { nonce, .. } = first else { panic!() };
        // An on-path rewrite of the purpose: A answers for a link, C expects fetch.
        let mut a = ClusterResponder::with_nonce(&k, Some(ServerId(1)), [2; 32]);
        let rewritten = AuthMsg::ServerChallenge {
            version: crate::PROTOCOL_VERSION,
            purpose: Purpose::Link,
            id: Some(ServerId(2)),
            nonce: nonce.clone(),
        };
        let Ok(Step::Send(response)) = a.step(rewritten) else { panic!() };
        assert!(matches!(c.step(response), Err(AuthError::KeyMismatch { .. })));
        // A rewritten claimed id.
        let (mut c, _) = ClusterInitiator::with_nonce(&k, Some(ServerId(2)), Purpose::Fetch, [1; 32]);
        let mut a = ClusterResponder::with_nonce(&k, Some(ServerId(1)), [2; 32]);
        let rewritten = AuthMsg::ServerChallenge {
            version: crate::PROTOCOL_VERSION,
            purpose: Purpose::Fetch,
            id: Some(ServerId(9)),
            nonce,
        };
        let Ok(Step::Send(response)) = a.step(rewritten) else { panic!() };
        assert!(matches!(c.step(response), Err(AuthError::KeyMismatch { .. })));
        // Another version is refused before any MAC.
        let mut a = ClusterResponder::with_nonce(&k, None, [2; 32]);
        let v2 = AuthMsg::ServerChallenge {
            version: crate::PROTOCOL_VERSION + 1,
            purpose: Purpose::Link,
            id: None,
            nonce: hex_encode(&[1; 32]),
        };
        let e = a.step(v2).unwrap_err();
        let (ours, theirs) = (crate::PROTOCOL_VERSION, crate::PROTOCOL_VERSION + 1);
        assert_eq!(e.to_string(), format!("the peer speaks protocol version {theirs}; we speak {ours}"));
    }

    #[test]
    fn out_of_order_and_malformed_messages_are_refused() {
        let k = key(1);
        let mut a = ClusterResponder::with_nonce(&k, None, [2; 32]);
        let e = a.step(AuthMsg::ServerProof { mac: hex_encode(&[0; 32]) }).unwrap_err();
        assert_eq!(e.to_string(), "the peer sent server_proof where the handshake expects server_challenge");
        let mut a = ClusterResponder::with_nonce(&k, None, [2; 32]);
        let short = AuthMsg::ServerChallenge {
            version: crate::PROTOCOL_VERSION,
            purpose: Purpose::Link,
            id: None,
            nonce: "abcd".into(),
        };
        assert!(matches!(a.step(short), Err(AuthError::Malformed(_))));
        let (mut c, _) = ClusterInitiator::with_nonce(&k, None, Purpose::Link, [1; 32]);
        let bad_mac = AuthMsg::ServerResponse { id: None, nonce: hex_encode(&[2; 32]), mac: "zz".into() };
        assert!(matches!(c.step(bad_mac), Err(AuthError::Malformed(_))));
        // After an error, the machine refuses everything.
        assert!(matches!(c.step(AuthMsg::ServerAccepted), Err(AuthError::Unexpected { .. })));
    }

    #[test]
    fn a_refusal_from_the_peer_becomes_its_reason() {
        let (mut c, _) = ClusterInitiator::with_nonce(&key(1), None, Purpose::Link, [1; 32]);
        let failed = AuthMsg::Failed { why: Refusal::KeyMismatch, detail: "the cluster keys do not match".into() };
        let e = c.step(failed).unwrap_err();
        assert!(matches!(e, AuthError::Refused { why: Refusal::KeyMismatch, .. }));
        assert_eq!(e.to_string(), r#"the peer refused: "the cluster keys do not match""#);
    }

    #[test]
    fn random_bit_flips_in_any_message_never_authenticate() {
        let k = key(1);
        for seed in 0..300u64 {
            let mut rng = SplitMix64::new(seed);
            let (mut c, first) = ClusterInitiator::with_nonce(&k, Some(ServerId(2)), Purpose::Election, [1; 32]);
            let mut a = ClusterResponder::with_nonce(&k, Some(ServerId(1)), [2; 32]);
            let which = rng.next_u64() % 3;
            let flip = |msg: AuthMsg, rng: &mut SplitMix64| -> AuthMsg {
                let mut json = serde_json::to_vec(&msg).unwrap();
                let i = (rng.next_u64() as usize) % json.len();
                json[i] ^= 1 << (rng.next_u64() % 7);
                serde_json::from_slice(&json).unwrap_or(AuthMsg::ServerAccepted)
            };
            let first = if which == 0 { flip(first, &mut rng) } else { first };
            let response = match a.step(first) {
                Ok(Step::Send(m)) => m,
                _ => continue,
            };
            let response = if which == 1 { flip(response, &mut rng) } else { response };
            let proof = match c.step(response) {
                Ok(Step::Send(m)) => m,
                _ => continue,
            };
            let proof = if which == 2 { flip(proof, &mut rng) } else { proof };
            // A flip that changes nothing the MAC covers (e.g. hex case) may pass;
            // any other must fail here.
            if let Ok(Step::Done(_, peer)) = a.step(proof) {
                assert_eq!(
                    peer,
                    AuthenticatedServer { id: Some(ServerId(2)), purpose: Purpose::Election },
                    "seed {seed}"
                );
            }
        }
    }

    #[test]
    fn the_drivers_agree_over_an_in_memory_pipe() {
        let (mut left, mut right) = pipe();
        let k = key(3);
        let k2 = k.clone();
        let acceptor = thread::spawn(move || {
            let first = crate::auth::Transport::recv(&mut right).unwrap();
            accept_server(&mut right, &k2, Some(ServerId(1)), first)
        });
        let peer = connect_to_server(&mut left, &k, None, Purpose::Fetch).unwrap();
        assert_eq!(peer, AuthenticatedServer { id: Some(ServerId(1)), purpose: Purpose::Fetch });
        assert_eq!(acceptor.join().unwrap().unwrap(), AuthenticatedServer { id: None, purpose: Purpose::Fetch });
    }

    #[test]
    fn over_tcp_a_wrong_key_is_refused_on_both_sides_with_reasons() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
            let mut t = Tcp(stream);
            let first = crate::auth::Transport::recv(&mut t).unwrap();
            accept_server(&mut t, &key(1), Some(ServerId(1)), first)
        });
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let e = connect_to_server(&mut Tcp(stream), &key(2), Some(ServerId(2)), Purpose::Link).unwrap_err();
        assert!(matches!(e, AuthError::KeyMismatch { peer: Side::Accepting }), "{e}");
        let e = acceptor.join().unwrap().unwrap_err();
        assert!(matches!(e, AuthError::Refused { why: Refusal::KeyMismatch, .. }), "{e}");
    }

    #[test]
    fn over_tcp_the_right_key_authenticates() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut t = Tcp(stream);
            let first = crate::auth::Transport::recv(&mut t).unwrap();
            accept_server(&mut t, &key(1), Some(ServerId(1)), first)
        });
        let mut t = Tcp(TcpStream::connect(addr).unwrap());
        let peer = connect_to_server(&mut t, &key(1), Some(ServerId(5)), Purpose::Election).unwrap();
        assert_eq!(peer.id, Some(ServerId(1)));
        assert_eq!(acceptor.join().unwrap().unwrap().id, Some(ServerId(5)));
    }
}
