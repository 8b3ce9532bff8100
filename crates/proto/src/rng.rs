//! SplitMix64: a small seeded generator for the simulation, the tests and the
//! benchmarks, where the same seed must give the same run (a failing case is
//! replayed from its seed). Not for anything secret: keys, nonces and salts come
//! from `getrandom`.

/// A SplitMix64 stream.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// The stream of `seed`.
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `percent` %.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// Fills `buf` with the next bytes. Each 8 bytes (and a shorter tail) take one
    /// draw, so filling a buffer in pieces of whole multiples of 8 gives the same
    /// bytes as filling it at once.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_reference_stream_and_pieces_fill_like_the_whole() {
        // The first outputs of SplitMix64 for seed 0 (the published reference).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        let whole = SplitMix64::new(7).bytes(20);
        let mut pieces = vec![0u8; 20];
        let mut r = SplitMix64::new(7);
        r.fill(&mut pieces[..16]);
        r.fill(&mut pieces[16..]);
        assert_eq!(whole, pieces);
    }
}
