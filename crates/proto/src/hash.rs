//! The content hash of a file version: XXH64 (seed 0), streamed.
//!
//! It only has to tell "same bytes" from "different bytes" between honest peers
//! (to skip a needless conflict copy, and to check every transfer end to end), so
//! a fast non-cryptographic 64-bit hash is enough. Every byte of every transfer is
//! hashed by each process it crosses, so speed matters. The algorithm comes from
//! the `xxhash-rust` crate (it replaced one written out here by hand: one less
//! thing to maintain); the tests pin it to the reference implementation's outputs,
//! which are the values every data dir and index already holds, so no stored hash
//! changes. XXH3 would be faster still, but it gives other values: every stored
//! hash (server states, client indexes) would have to be told apart or recomputed.
//!
//! On the wire and on disk a hash is a string of 16 hex digits: as a JSON number it
//! would lose bits in parsers that read numbers as doubles.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use xxhash_rust::xxh64::Xxh64;

/// A finished content hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ContentHash(pub u64);

/// Hashes bytes fed to it in pieces of any size; [`Hasher::finish`] gives the same
/// hash as [`ContentHash::of`] over all of them at once.
#[derive(Clone)]
pub struct Hasher {
    inner: Xxh64,
    total: u64,
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hasher").field("total", &self.total).finish_non_exhaustive()
    }
}

impl Default for Hasher {
    fn default() -> Self {
        Hasher::new()
    }
}

impl Hasher {
    /// A hasher that has seen nothing.
    pub fn new() -> Hasher {
        Hasher { inner: Xxh64::new(0), total: 0 }
    }

    /// Feeds more bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.total += bytes.len() as u64;
        self.inner.update(bytes);
    }

    /// How many bytes were fed so far.
    pub fn bytes_hashed(&self) -> u64 {
        self.total
    }

    /// The hash of everything fed so far.
    pub fn finish(&self) -> ContentHash {
        ContentHash(self.inner.digest())
    }
}

impl Default for ContentHash {
    /// The hash of no bytes at all (an empty file, a tombstone).
    fn default() -> Self {
        Hasher::new().finish()
    }
}

impl ContentHash {
    /// The hash of a whole buffer.
    pub fn of(bytes: &[u8]) -> Self {
        let mut h = Hasher::new();
        h.update(bytes);
        h.finish()
    }

    /// The hash of a file's content, read in chunks (memory stays flat whatever
    /// the file's size).
    pub fn of_file(path: &std::path::Path) -> std::io::Result<ContentHash> {
        use std::io::Read;
        let mut f = std::fs::File::open(path)?;
        let mut h = Hasher::new();
        let mut buf = vec![0u8; crate::CHUNK_SIZE];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok(h.finish());
            }
            h.update(&buf[..n]);
        }
    }
}

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

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference_input() -> Vec<u8> {
        (0..5).flat_map(|_| 0..=255u8).collect()
    }

    #[test]
    fn matches_the_reference_xxh64() {
        // Outputs of the reference implementation (xxhash, seed 0).
        assert_eq!(ContentHash::of(b"").0, 0xef46db3751d8e999);
        assert_eq!(ContentHash::of(b"a").0, 0xd24ec4f1a98c6e5b);
        assert_eq!(ContentHash::of(b"abc").0, 0x44bc2cf5ad770999);
        assert_eq!(ContentHash::of(&reference_input()).0, 0xafc184ad7938a354);
        assert_eq!(ContentHash::default(), ContentHash::of(b""));
    }

    #[test]
    fn any_split_gives_the_same_hash() {
        let input = reference_input();
        let whole = ContentHash::of(&input);
        for first in [0, 1, 7, 31, 32, 33, 100, 639, 1279, 1280] {
            for piece in [1, 3, 8, 31, 32, 64, 1000] {
                let mut h = Hasher::new();
                h.update(&input[..first]);
                for chunk in input[first..].chunks(piece) {
                    h.update(chunk);
                }
                assert_eq!(h.finish(), whole, "first={first} piece={piece}");
            }
        }
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
}
