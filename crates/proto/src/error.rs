//! Errors raised while reading or writing frames.

use std::fmt;
use std::io;

/// Why a frame could not be read or written.
#[derive(Debug)]
pub enum ProtoError {
    /// The underlying stream failed (including read timeouts).
    Io(io::Error),
    /// The stream ended inside a frame.
    Truncated {
        /// What was being read when the stream ended.
        part: &'static str,
    },
    /// The declared header length is over [`crate::MAX_HEADER`] (or zero).
    HeaderLength(usize),
    /// The declared payload length is over [`crate::MAX_PAYLOAD`].
    PayloadTooLarge(usize),
    /// The header is not valid JSON for a known message.
    BadHeader(serde_json::Error),
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::Io(e) => write!(f, "i/o error: {e}"),
            ProtoError::Truncated { part } => write!(f, "stream ended inside a frame ({part})"),
            ProtoError::HeaderLength(n) => {
                write!(f, "frame header length {n} is outside 1..={} bytes", crate::MAX_HEADER)
            }
            ProtoError::PayloadTooLarge(n) => {
                write!(f, "frame payload of {n} bytes is over the limit of {} bytes", crate::MAX_PAYLOAD)
            }
            ProtoError::BadHeader(e) => write!(f, "malformed or unknown frame header: {e}"),
        }
    }
}

impl std::error::Error for ProtoError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ProtoError::Io(e) => Some(e),
            ProtoError::BadHeader(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for ProtoError {
    fn from(e: io::Error) -> Self {
        ProtoError::Io(e)
    }
}

impl ProtoError {
    /// True when the error is a read timeout rather than a broken stream.
    pub fn is_timeout(&self) -> bool {
        matches!(self, ProtoError::Io(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }
}
