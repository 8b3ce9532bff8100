//! The frame codec.
//!
//! ```text
//! +----------------+----------------------------+----------------------+
//! | u32 BE: H      | H bytes of JSON header     | P bytes of payload   |
//! +----------------+----------------------------+----------------------+
//! header = {"epoch": E, "payload": P (omitted when 0), "msg": {"kind": ...}}
//! ```
//!
//! Both lengths are checked against [`MAX_HEADER`] and [`MAX_PAYLOAD`] before any
//! buffer is allocated, so a hostile length costs nothing. A stream that ends
//! exactly at a frame boundary is a clean close (`Ok(None)`); one that ends inside
//! a frame is [`ProtoError::Truncated`].

use crate::error::ProtoError;
use crate::ids::Epoch;
use crate::msg::Msg;
use crate::{MAX_HEADER, MAX_PAYLOAD};
use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};

/// One decoded frame.
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    /// The sender's epoch.
    pub epoch: Epoch,
    /// The message.
    pub msg: Msg,
    /// Raw bytes following the header (file data); empty for most messages.
    pub payload: Vec<u8>,
}

impl Frame {
    /// A frame with no payload.
    pub fn new(epoch: Epoch, msg: Msg) -> Self {
        Frame { epoch, msg, payload: Vec::new() }
    }
}

#[derive(Serialize)]
struct HeaderOut<'a> {
    epoch: Epoch,
    #[serde(skip_serializing_if = "is_zero")]
    payload: usize,
    msg: &'a Msg,
}

#[derive(Deserialize)]
struct HeaderIn {
    epoch: Epoch,
    #[serde(default)]
    payload: usize,
    msg: Msg,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Writes one frame and flushes the writer.
pub fn write_frame<W: Write>(w: &mut W, epoch: Epoch, msg: &Msg, payload: &[u8]) -> Result<(), ProtoError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(ProtoError::PayloadTooLarge(payload.len()));
    }
    let header =
        serde_json::to_vec(&HeaderOut { epoch, payload: payload.len(), msg }).map_err(ProtoError::BadHeader)?;
    if header.is_empty() || header.len() > MAX_HEADER {
        return Err(ProtoError::HeaderLength(header.len()));
    }
    let mut head = Vec::with_capacity(4 + header.len());
    head.extend_from_slice(&(header.len() as u32).to_be_bytes());
    head.extend_from_slice(&header);
    w.write_all(&head)?;
    if !payload.is_empty() {
        w.write_all(payload)?;
    }
    w.flush()?;
    Ok(())
}

/// Reads exactly `buf.len()` bytes; returns how many were read before a clean EOF.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Reads one frame. `Ok(None)` means the peer closed the stream between frames.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<Frame>, ProtoError> {
    let mut len = [0u8; 4];
    match read_full(r, &mut len)? {
        0 => return Ok(None),
        4 => {}
        _ => return Err(ProtoError::Truncated { part: "length prefix" }),
    }
    let header_len = u32::from_be_bytes(len) as usize;
    if header_len == 0 || header_len > MAX_HEADER {
        return Err(ProtoError::HeaderLength(header_len));
    }
    let mut header = vec![0u8; header_len];
    if read_full(r, &mut header)? != header_len {
        return Err(ProtoError::Truncated { part: "header" });
    }
    let header: HeaderIn = serde_json::from_slice(&header).map_err(ProtoError::BadHeader)?;
    if header.payload > MAX_PAYLOAD {
        return Err(ProtoError::PayloadTooLarge(header.payload));
    }
    let mut payload = vec![0u8; header.payload];
    if read_full(r, &mut payload)? != header.payload {
        return Err(ProtoError::Truncated { part: "payload" });
    }
    Ok(Some(Frame { epoch: header.epoch, msg: header.msg, payload }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::ContentHash;
    use crate::ids::{DeviceId, Seq, Version};
    use crate::msg::*;

    fn encode(epoch: u64, msg: &Msg, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame(&mut out, Epoch(epoch), msg, payload).unwrap();
        out
    }

    fn samples() -> Vec<(Msg, Vec<u8>)> {
        let meta = FileMeta {
            path: "dir/ünï code.txt".into(),
            version: Version(3),
            size: 5,
            mtime_ms: 1_700_000_000_000,
            hash: ContentHash::of(b"hello"),
            deleted: false,
            atime_ms: 1,
            ctime_ms: 2,
            exec: false,
            dir: false,
        };
        vec![
            (
                Msg::Hello {
                    version: 1,
                    who: Who::Client { user: "alice".into(), device: DeviceId("0123abcd".into()), callback_port: 4100 },
                },
                vec![],
            ),
            (Msg::Hello { version: 1, who: Who::Status }, vec![]),
            (Msg::Welcome { devices: 2, last_seq: Seq(9) }, vec![]),
            (
                Msg::Request {
                    seq: Seq(7),
                    op: Op::Upload {
                        path: "a".into(),
                        size: 5,
                        mtime_ms: -3,
                        base: Some(Version(2)),
                        exec: false,
                        eager: false,
                    },
                },
                vec![],
            ),
            (Msg::Chunk { seq: Seq(7) }, b"hello".to_vec()),
            (Msg::UploadEnd { seq: Seq(7), hash: ContentHash::of(b"hello") }, vec![]),
            (Msg::Reply { seq: Seq(7), result: OpResult::Done { meta: meta.clone() } }, vec![]),
            (Msg::Reply { seq: Seq(8), result: OpResult::Listing { files: vec![meta.clone()], more: true } }, vec![]),
            (Msg::Reply { seq: Seq(9), result: OpResult::Conflict { current: None } }, vec![]),
            (Msg::Notice { notice: Notice::Rename { from: "x".into(), meta } }, vec![]),
            (Msg::Ping, vec![]),
            (Msg::Chunk { seq: Seq(1) }, vec![0xAB; MAX_PAYLOAD]),
        ]
    }

    #[test]
    fn round_trip_every_sample() {
        for (msg, payload) in samples() {
            let bytes = encode(42, &msg, &payload);
            let mut r = &bytes[..];
            let frame = read_frame(&mut r).unwrap().unwrap();
            assert_eq!(frame.epoch, Epoch(42));
            assert_eq!(frame.msg, msg);
            assert_eq!(frame.payload, payload);
            assert!(read_frame(&mut r).unwrap().is_none(), "clean end after one frame");
        }
    }

    #[test]
    fn every_truncation_is_an_error_not_a_frame() {
        for (msg, payload) in samples().into_iter().take(10) {
            let bytes = encode(1, &msg, &payload);
            for cut in 1..bytes.len() {
                let mut r = &bytes[..cut];
                match read_frame(&mut r) {
                    Err(ProtoError::Truncated { .. }) => {}
                    other => panic!("cut at {cut} of {}: {other:?}", bytes.len()),
                }
            }
        }
    }

    #[test]
    fn oversized_header_refused_before_allocating() {
        let mut bytes = (u32::MAX).to_be_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        assert!(matches!(read_frame(&mut &bytes[..]), Err(ProtoError::HeaderLength(_))));
        let zero = 0u32.to_be_bytes();
        assert!(matches!(read_frame(&mut &zero[..]), Err(ProtoError::HeaderLength(0))));
    }

    #[test]
    fn oversized_payload_refused() {
        let header = format!(r#"{{"epoch":0,"payload":{},"msg":{{"kind":"ping"}}}}"#, MAX_PAYLOAD + 1);
        let mut bytes = (header.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        assert!(matches!(read_frame(&mut &bytes[..]), Err(ProtoError::PayloadTooLarge(_))));
        let mut sink = Vec::new();
        let big = vec![0u8; MAX_PAYLOAD + 1];
        assert!(write_frame(&mut sink, Epoch(0), &Msg::Ping, &big).is_err());
    }

    #[test]
    fn unknown_kind_and_garbage_are_bad_headers() {
        for header in
            [r#"{"epoch":0,"msg":{"kind":"launch_missiles"}}"#, "not json at all", r#"{"msg":{"kind":"ping"}}"#]
        {
            let mut bytes = (header.len() as u32).to_be_bytes().to_vec();
            bytes.extend_from_slice(header.as_bytes());
            assert!(matches!(read_frame(&mut &bytes[..]), Err(ProtoError::BadHeader(_))), "{header}");
        }
    }

    /// A reader over bytes that records the largest buffer it was asked to fill.
    /// The codec reads a header and a payload each into a buffer of its declared
    /// size, asking for all of it at once, so this is the largest buffer a frame
    /// made the codec allocate (whether or not the bytes ever came to fill it).
    struct Asking<'a> {
        bytes: &'a [u8],
        largest: usize,
    }

    impl Read for Asking<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.largest = self.largest.max(buf.len());
            self.bytes.read(buf)
        }
    }

    /// Reads frames from `bytes` until the end or an error; returns the largest
    /// buffer asked for and the first error.
    fn read_all(bytes: &[u8]) -> (usize, Option<ProtoError>) {
        let mut r = Asking { bytes, largest: 0 };
        let err = loop {
            match read_frame(&mut r) {
                Ok(Some(_)) => {}
                Ok(None) => break None,
                Err(e) => break Some(e),
            }
        };
        (r.largest, err)
    }

    /// A length prefix and a header declaring `payload` bytes.
    fn declaring(payload: u64) -> Vec<u8> {
        let header = format!(r#"{{"epoch":0,"payload":{payload},"msg":{{"kind":"ping"}}}}"#);
        let mut bytes = (header.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes
    }

    #[test]
    fn random_input_never_panics_nor_allocates_past_limits() {
        for seed in 0..4000u64 {
            let mut s = crate::rng::SplitMix64::new(seed);
            let len = (s.next_u64() % 64) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| s.next_u64() as u8).collect();
            let declared = match seed % 5 {
                // A plausible small length prefix, so the JSON parser is reached.
                0 if bytes.len() >= 4 => {
                    let n = (bytes.len() - 4) as u32;
                    bytes[..4].copy_from_slice(&n.to_be_bytes());
                    None
                }
                // A header length anywhere up to 32 MiB, often just past the limit.
                1 => {
                    let n = if s.next_u64().is_multiple_of(2) {
                        MAX_HEADER as u64 + 1 + s.next_u64() % 16
                    } else {
                        s.next_u64() % (32 << 20)
                    };
                    let mut b = (n as u32).to_be_bytes().to_vec();
                    b.extend_from_slice(&bytes);
                    bytes = b;
                    Some(("header", n))
                }
                // A well-formed header declaring a payload anywhere up to 64 MiB,
                // often just past the limit.
                2 => {
                    let n = if s.next_u64().is_multiple_of(2) {
                        MAX_PAYLOAD as u64 + 1 + s.next_u64() % 16
                    } else {
                        s.next_u64() % (64 << 20)
                    };
                    let mut b = declaring(n);
                    b.extend_from_slice(&bytes);
                    bytes = b;
                    Some(("payload", n))
                }
                _ => None,
            };
            let (largest, err) = read_all(&bytes);
            assert!(largest <= MAX_PAYLOAD, "seed {seed}: the codec asked for a {largest}-byte buffer");
            match declared {
                Some(("header", n)) if n == 0 || n > MAX_HEADER as u64 => {
                    assert!(matches!(err, Some(ProtoError::HeaderLength(_))), "seed {seed}: {err:?}")
                }
                Some(("payload", n)) if n > MAX_PAYLOAD as u64 => {
                    assert!(matches!(err, Some(ProtoError::PayloadTooLarge(_))), "seed {seed}: {err:?}")
                }
                _ => {}
            }
        }
        // A length of 4 GiB costs nothing either.
        let (largest, err) = read_all(&u32::MAX.to_be_bytes());
        assert!(largest <= 4 && matches!(err, Some(ProtoError::HeaderLength(_))), "{largest} {err:?}");
    }

    #[test]
    fn mutated_valid_frames_never_panic() {
        let bytes = encode(3, &samples()[3].0, b"");
        for seed in 0..2000u64 {
            let mut s = crate::rng::SplitMix64::new(seed);
            let mut b = bytes.clone();
            for _ in 0..3 {
                let i = (s.next_u64() as usize) % b.len();
                b[i] = s.next_u64() as u8;
            }
            let (largest, _) = read_all(&b);
            assert!(largest <= MAX_HEADER, "seed {seed}: the codec asked for a {largest}-byte buffer");
        }
    }

    /// The limits are inclusive: a header of exactly 64 KiB and a payload of
    /// exactly 1 MiB pass both ways; one byte more is refused both ways.
    #[test]
    fn limits_are_exact() {
        let refused = |n: usize| Msg::Refused { reason: "x".repeat(n) };
        let base = encode(0, &refused(0), &[]).len() - 4;
        let at_limit = refused(MAX_HEADER - base);
        let bytes = encode(0, &at_limit, &[]);
        assert_eq!(bytes.len(), 4 + MAX_HEADER);
        assert_eq!(read_frame(&mut &bytes[..]).unwrap().unwrap().msg, at_limit);
        let mut sink = Vec::new();
        let over = refused(MAX_HEADER - base + 1);
        assert!(
            matches!(write_frame(&mut sink, Epoch(0), &over, &[]), Err(ProtoError::HeaderLength(n)) if n == MAX_HEADER + 1)
        );
        assert!(sink.is_empty(), "nothing is written for a frame that is refused");
        let mut too_long = ((MAX_HEADER + 1) as u32).to_be_bytes().to_vec();
        too_long.extend_from_slice(&bytes[4..]);
        too_long.push(b' ');
        assert!(matches!(read_frame(&mut &too_long[..]), Err(ProtoError::HeaderLength(n)) if n == MAX_HEADER + 1));

        let mut full = declaring(MAX_PAYLOAD as u64);
        full.extend(std::iter::repeat_n(7u8, MAX_PAYLOAD));
        assert_eq!(read_frame(&mut &full[..]).unwrap().unwrap().payload.len(), MAX_PAYLOAD);
        let over = declaring(MAX_PAYLOAD as u64 + 1);
        assert!(matches!(read_frame(&mut &over[..]), Err(ProtoError::PayloadTooLarge(n)) if n == MAX_PAYLOAD + 1));
    }

    /// `payload` is left out of a header when it is 0, and only then.
    #[test]
    fn an_empty_payload_is_not_declared() {
        let bytes = encode(7, &Msg::Ping, &[]);
        assert_eq!(&bytes[4..], br#"{"epoch":7,"msg":{"kind":"ping"}}"#);
        let bytes = encode(7, &Msg::Chunk { seq: Seq(1) }, b"ab");
        assert_eq!(&bytes[4..], br#"{"epoch":7,"payload":2,"msg":{"kind":"chunk","seq":1}}ab"#);
    }

    /// A reader that fails once with `kind`, then gives `bytes` in one-byte reads.
    struct Flaky<'a> {
        first: Option<io::ErrorKind>,
        bytes: &'a [u8],
    }

    impl Read for Flaky<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if let Some(kind) = self.first.take() {
                return Err(kind.into());
            }
            let n = buf.len().min(1);
            self.bytes.read(&mut buf[..n])
        }
    }

    /// A read interrupted by a signal is retried; any other error ends the frame
    /// (a read timeout is how connections notice a silent peer).
    #[test]
    fn an_interrupted_read_is_retried_and_other_errors_end_the_frame() {
        let bytes = encode(1, &Msg::Pong, &[]);
        let mut r = Flaky { first: Some(io::ErrorKind::Interrupted), bytes: &bytes };
        assert_eq!(read_frame(&mut r).unwrap().unwrap().msg, Msg::Pong);
        let mut r = Flaky { first: Some(io::ErrorKind::TimedOut), bytes: &bytes };
        match read_frame(&mut r) {
            Err(e) => assert!(e.is_timeout(), "{e:?}"),
            Ok(f) => panic!("a timed-out read gave {f:?}"),
        }
    }
}
