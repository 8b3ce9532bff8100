//! The content hash of a file version.
//!
//! It only has to tell "same bytes" from "different bytes" between honest peers
//! (to skip a needless conflict copy, and to check a transfer end to end), so a
//! 64-bit FNV-1a is enough; a cryptographic hash would need a new dependency.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// A streaming 64-bit FNV-1a hash. On the wire and on disk it is a string of 16
/// hex digits: as a JSON number it would lose bits in parsers that read numbers
/// as doubles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ContentHash(pub u64);

impl Serialize for ContentHash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ContentHash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text.len() != 16 {
            return Err(serde::de::Error::custom(format!("content hash {text:?} is not 16 hex digits")));
        }
        u64::from_str_radix(&text, 16)
            .map(ContentHash)
            .map_err(|_| serde::de::Error::custom(format!("content hash {text:?} is not 16 hex digits")))
    }
}

const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0000_0100_0000_01b3;

impl Default for ContentHash {
    fn default() -> Self {
        ContentHash(OFFSET)
    }
}

impl ContentHash {
    /// Feeds more bytes into the hash.
    pub fn update(&mut self, bytes: &[u8]) {
        let mut h = self.0;
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(PRIME);
        }
        self.0 = h;
    }

    /// The hash of a file's content, read in chunks (memory stays flat whatever
    /// the file's size).
    pub fn of_file(path: &std::path::Path) -> std::io::Result<ContentHash> {
        use std::io::Read;
        let mut f = std::fs::File::open(path)?;
        let mut h = ContentHash::default();
        let mut buf = vec![0u8; crate::CHUNK_SIZE];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok(h);
            }
            h.update(&buf[..n]);
        }
    }

    /// The hash of a whole buffer.
    pub fn of(bytes: &[u8]) -> Self {
        let mut h = ContentHash::default();
        h.update(bytes);
        h
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        assert_eq!(ContentHash::of(b"").0, 0xcbf29ce484222325);
        assert_eq!(ContentHash::of(b"a").0, 0xaf63dc4c8601ec8c);
    }

    #[test]
    fn json_form_is_sixteen_hex_digits() {
        let h = ContentHash(u64::MAX - 1);
        let text = serde_json::to_string(&h).unwrap();
        assert_eq!(text, "\"fffffffffffffffe\"");
        assert_eq!(serde_json::from_str::<ContentHash>(&text).unwrap(), h);
        assert!(serde_json::from_str::<ContentHash>("12").is_err());
        assert!(serde_json::from_str::<ContentHash>("\"xyz\"").is_err());
    }

    #[test]
    fn streaming_equals_whole() {
        let mut h = ContentHash::default();
        h.update(b"hello ");
        h.update(b"world");
        assert_eq!(h, ContentHash::of(b"hello world"));
    }
}
