//! The receiving end of a chunked transfer (an upload on the primary, a download
//! on a client, a fetch on a backup): the bytes are counted and hashed as they
//! arrive and checked against what the sender announced, so that every receiver
//! refuses the same damaged transfers.

use crate::hash::{ContentHash, Hasher};
use std::fmt;

/// Counts and hashes one transfer's bytes against its announced size (and hash,
/// when the sender announced it before the bytes).
#[derive(Clone, Debug)]
pub struct Receipt {
    size: u64,
    announced: Option<ContentHash>,
    hasher: Hasher,
}

/// How a transfer differs from what its sender announced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Damaged {
    /// More bytes than announced arrived (the rest is not worth reading).
    TooLong {
        /// The announced size.
        size: u64,
    },
    /// The end came before the announced size.
    Short {
        /// Bytes received.
        got: u64,
        /// The announced size.
        size: u64,
    },
    /// The bytes hash to something else than the sender said.
    Hash {
        /// The hash of the bytes received.
        got: ContentHash,
        /// The hash the sender announced.
        sent: ContentHash,
    },
}

impl fmt::Display for Damaged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Damaged::TooLong { size } => write!(f, "longer than its announced {size} bytes"),
            Damaged::Short { got, size } => write!(f, "ended after {got} of its announced {size} bytes"),
            Damaged::Hash { got, sent } => write!(f, "its bytes hash to {got}, not the announced {sent}"),
        }
    }
}

impl Receipt {
    /// A transfer of `size` bytes whose hash comes only at its end (an upload).
    pub fn new(size: u64) -> Receipt {
        Receipt { size, announced: None, hasher: Hasher::new() }
    }

    /// A transfer of a stored version whose size and hash were announced first (a
    /// download or a fetch): the bytes must match those too, not only the end frame.
    pub fn of_version(size: u64, hash: ContentHash) -> Receipt {
        Receipt { size, announced: Some(hash), hasher: Hasher::new() }
    }

    /// Counts and hashes one chunk; refuses it if it runs past the announced size.
    pub fn add(&mut self, chunk: &[u8]) -> Result<(), Damaged> {
        if self.got() + chunk.len() as u64 > self.size {
            return Err(Damaged::TooLong { size: self.size });
        }
        self.hasher.update(chunk);
        Ok(())
    }

    /// Bytes received so far.
    pub fn got(&self) -> u64 {
        self.hasher.bytes_hashed()
    }

    /// Checks the end of the transfer, where the sender gives its hash `sent`:
    /// returns the hash of the bytes when all of them arrived and match.
    pub fn finish(&self, sent: ContentHash) -> Result<ContentHash, Damaged> {
        if self.got() != self.size {
            return Err(Damaged::Short { got: self.got(), size: self.size });
        }
        let got = self.hasher.finish();
        for claimed in std::iter::once(sent).chain(self.announced) {
            if claimed != got {
                return Err(Damaged::Hash { got, sent: claimed });
            }
        }
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_transfer_in_any_chunks_is_accepted_with_its_hash() {
        let bytes: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let hash = ContentHash::of(&bytes);
        for chunk in [1, 31, 32, 333, 1000] {
            let mut r = Receipt::of_version(1000, hash);
            for c in bytes.chunks(chunk) {
                r.add(c).unwrap();
            }
            assert_eq!(r.got(), 1000);
            assert_eq!(r.finish(hash), Ok(hash));
        }
        let mut empty = Receipt::new(0);
        assert_eq!(empty.add(&[]), Ok(()));
        assert_eq!(empty.finish(ContentHash::of(b"")), Ok(ContentHash::of(b"")));
    }

    #[test]
    fn too_long_short_and_mismatched_transfers_are_refused() {
        let hash = ContentHash::of(b"abcd");
        let mut r = Receipt::new(4);
        r.add(b"abc").unwrap();
        assert_eq!(r.add(b"de"), Err(Damaged::TooLong { size: 4 }));
        assert_eq!(r.finish(hash), Err(Damaged::Short { got: 3, size: 4 }));
        r.add(b"d").unwrap();
        assert_eq!(r.finish(hash), Ok(hash));
        let other = ContentHash::of(b"abce");
        assert_eq!(r.finish(other), Err(Damaged::Hash { got: hash, sent: other }));
        // A version announced up front must match too, whatever the end frame says.
        let mut v = Receipt::of_version(4, other);
        v.add(b"abcd").unwrap();
        assert_eq!(v.finish(hash), Err(Damaged::Hash { got: hash, sent: other }));
    }

    /// The sentences that end up in logs and error replies.
    #[test]
    fn damage_is_described() {
        let (a, b) = (ContentHash::of(b"a"), ContentHash::of(b"b"));
        assert_eq!(Damaged::TooLong { size: 4 }.to_string(), "longer than its announced 4 bytes");
        assert_eq!(Damaged::Short { got: 3, size: 4 }.to_string(), "ended after 3 of its announced 4 bytes");
        assert_eq!(
            Damaged::Hash { got: a, sent: b }.to_string(),
            format!("its bytes hash to {a}, not the announced {b}")
        );
    }
}
