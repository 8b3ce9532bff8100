//! The [`Transport`] the binaries use: each [`AuthMsg`] travels in one frame as
//! `Msg::Auth`, stamped with the sender's epoch (which the receiver of a handshake
//! frame ignores: nothing a peer says counts before it has proven itself).

use super::{AuthError, AuthMsg, Transport};
use crate::frame::{read_frame, write_frame, Frame};
use crate::ids::Epoch;
use crate::msg::Msg;
use std::io::{Read, Write};

/// Handshake messages over a reader and a writer of frames (often both halves of
/// one `TcpStream`, through `&TcpStream`). Time every read out on the socket first.
pub struct Frames<R, W> {
    /// Where frames come from.
    pub reader: R,
    /// Where frames go (each write is flushed).
    pub writer: W,
    /// The epoch stamped on the frames sent.
    pub epoch: Epoch,
}

impl<R: Read, W: Write> Transport for Frames<R, W> {
    fn send(&mut self, msg: AuthMsg) -> Result<(), AuthError> {
        Ok(write_frame(&mut self.writer, self.epoch, &Msg::Auth(msg), &[])?)
    }

    fn recv(&mut self) -> Result<AuthMsg, AuthError> {
        match read_frame(&mut self.reader)? {
            None => Err(AuthError::Closed),
            Some(Frame { msg: Msg::Auth(m), payload, .. }) if payload.is_empty() => Ok(m),
            // A server that refuses the connection before any handshake (another
            // version, say) says why in a `refused`: keep its sentence.
            Some(Frame { msg: Msg::Refused { reason }, .. }) => {
                Err(AuthError::from_refusal(super::Refusal::Protocol, reason))
            }
            Some(f) => {
                Err(AuthError::Unexpected { expected: "an authentication message", got: f.msg.kind().to_string() })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{accept_server, connect_to_server, ClusterKey, Purpose, Refusal};
    use crate::ids::ServerId;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn the_cluster_handshake_runs_over_frames_on_tcp() {
        let key = ClusterKey::from_bytes([7; 32]);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let k = key.clone();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut t = Frames { reader: &s, writer: &s, epoch: Epoch(3) };
            let first = t.recv().unwrap();
            accept_server(&mut t, &k, Some(ServerId(1)), first)
        });
        let s = TcpStream::connect(addr).unwrap();
        let mut t = Frames { reader: &s, writer: &s, epoch: Epoch(0) };
        let peer = connect_to_server(&mut t, &key, Some(ServerId(2)), Purpose::Fetch).unwrap();
        assert_eq!(peer.id, Some(ServerId(1)));
        let theirs = server.join().unwrap().unwrap();
        assert_eq!((theirs.id, theirs.purpose), (Some(ServerId(2)), Purpose::Fetch));
    }

    #[test]
    fn a_refusal_or_another_message_instead_of_a_step_is_an_error_that_says_so() {
        let mut bytes = Vec::new();
        write_frame(&mut bytes, Epoch(1), &Msg::Refused { reason: "protocol version 2 is not supported".into() }, &[])
            .unwrap();
        write_frame(&mut bytes, Epoch(1), &Msg::Ping, &[]).unwrap();
        let mut t = Frames { reader: &bytes[..], writer: Vec::new(), epoch: Epoch(0) };
        match t.recv() {
            Err(AuthError::Refused { why: Refusal::Protocol, detail }) => assert!(detail.contains("version 2")),
            other => panic!("{other:?}"),
        }
        let e = t.recv().unwrap_err();
        assert_eq!(e.to_string(), "the peer sent ping where the handshake expects an authentication message");
        assert!(matches!(t.recv(), Err(AuthError::Closed)));
    }
}
