//! The content hash of a file version: XXH64 (seed 0), streamed.
//!
//! It only has to tell "same bytes" from "different bytes" between honest peers
//! (to skip a needless conflict copy, and to check every transfer end to end), so
//! a fast non-cryptographic 64-bit hash is enough. Every byte of every transfer is
//! hashed by each process it crosses, so speed matters: XXH64 consumes 32 bytes per
//! step in four independent lanes, several times faster than the byte-at-a-time
//! FNV-1a it replaced (which capped a primary with two backups on two cores). It is
//! written out here from the published algorithm rather than taken from a crate;
//! the tests pin it to the reference implementation's outputs.
//!
//! On the wire and on disk a hash is a string of 16 hex digits: as a JSON number it
//! would lose bits in parsers that read numbers as doubles.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

/// A finished content hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ContentHash(pub u64);

/// Hashes bytes fed to it in pieces of any size; [`Hasher::finish`] gives the same
/// hash as [`ContentHash::of`] over all of them at once.
#[derive(Clone, Debug)]
pub struct Hasher {
    lanes: [u64; 4],
    pending: [u8; 32],
    pending_len: usize,
    total: u64,
}

fn round(acc: u64, input: u64) -> u64 {
    acc.wrapping_add(input.wrapping_mul(P2)).rotate_left(31).wrapping_mul(P1)
}

fn merge(acc: u64, lane: u64) -> u64 {
    (acc ^ round(0, lane)).wrapping_mul(P1).wrapping_add(P4)
}

fn word(bytes: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(w)
}

impl Default for Hasher {
    fn default() -> Self {
        Hasher::new()
    }
}

impl Hasher {
    /// A hasher that has seen nothing.
    pub fn new() -> Hasher {
        Hasher {
            lanes: [P1.wrapping_add(P2), P2, 0, 0u64.wrapping_sub(P1)],
            pending: [0; 32],
            pending_len: 0,
            total: 0,
        }
    }

    fn stripe(&mut self, block: &[u8]) {
        for (i, lane) in self.lanes.iter_mut().enumerate() {
            *lane = round(*lane, word(&block[i * 8..]));
        }
    }

    /// Feeds more bytes.
    pub fn update(&mut self, mut bytes: &[u8]) {
        self.total += bytes.len() as u64;
        if self.pending_len > 0 {
            let take = (32 - self.pending_len).min(bytes.len());
            self.pending[self.pending_len..self.pending_len + take].copy_from_slice(&bytes[..take]);
            self.pending_len += take;
            bytes = &bytes[take..];
            if self.pending_len < 32 {
                return;
            }
            let block = self.pending;
            self.stripe(&block);
            self.pending_len = 0;
        }
        let mut blocks = bytes.chunks_exact(32);
        for block in &mut blocks {
            self.stripe(block);
        }
        let rest = blocks.remainder();
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }

    /// How many bytes were fed so far.
    pub fn bytes_hashed(&self) -> u64 {
        self.total
    }

    /// The hash of everything fed so far.
    pub fn finish(&self) -> ContentHash {
        let [v1, v2, v3, v4] = self.lanes;
        let mut h = if self.total >= 32 {
            let h = v1
                .rotate_left(1)
                .wrapping_add(v2.rotate_left(7))
                .wrapping_add(v3.rotate_left(12))
                .wrapping_add(v4.rotate_left(18));
            merge(merge(merge(merge(h, v1), v2), v3), v4)
        } else {
            P5
        };
        h = h.wrapping_add(self.total);
        let mut tail = &self.pending[..self.pending_len];
        while tail.len() >= 8 {
            h = (h ^ round(0, word(tail))).rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
            tail = &tail[8..];
        }
        if tail.len() >= 4 {
            let w = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]) as u64;
            h = (h ^ w.wrapping_mul(P1)).rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
            tail = &tail[4..];
        }
        for &b in tail {
            h = (h ^ (b as u64).wrapping_mul(P5)).rotate_left(11).wrapping_mul(P1);
        }
        h ^= h >> 33;
        h = h.wrapping_mul(P2);
        h ^= h >> 29;
        h = h.wrapping_mul(P3);
        h ^= h >> 32;
        ContentHash(h)
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
