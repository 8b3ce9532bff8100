//! Hex and base64 (RFC 4648, standard alphabet, padded), written out because each is
//! a dozen lines: hex for the cluster key file, nonces and MACs (like the project's
//! tokens), base64 where SCRAM (RFC 5802) puts it into the signed `AuthMessage`.
//!
//! Decoding is strict: one encoding per byte string (lowercase or uppercase hex;
//! base64 with exact padding and zero pad bits), so that no two strings on the
//! wire stand for the same bytes. These encode public values or values compared in
//! constant time after decoding; the encoders themselves need not be constant-time.

const HEX: &[u8; 16] = b"0123456789abcdef";
const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Lowercase hex of `bytes`.
pub(crate) fn hex_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 15)] as char);
    }
    out
}

/// Exactly `N` bytes from `2N` hex digits (either case); `None` for anything else.
pub(crate) fn hex_decode<const N: usize>(text: &str) -> Option<[u8; N]> {
    let text = text.as_bytes();
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        out[i] = (hex_digit(pair[0])? << 4) | hex_digit(pair[1])?;
    }
    Some(out)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Base64 of `bytes`, with `=` padding.
pub(crate) fn b64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The bytes of a padded base64 string; `None` unless it is the one canonical
/// encoding of those bytes.
pub(crate) fn b64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.as_bytes();
    if !text.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let quads = text.len() / 4;
    for (q, quad) in text.chunks_exact(4).enumerate() {
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        // Padding only at the very end, and at most two characters of it.
        if pad > 2 || (pad > 0 && q + 1 != quads) {
            return None;
        }
        let mut n = 0u32;
        for &c in &quad[..4 - pad] {
            n = (n << 6) | b64_digit(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        let keep = 3 - pad;
        // The bits below the last whole byte must be zero, or two strings would
        // decode to the same bytes.
        if bytes[keep..].iter().any(|&b| b != 0) {
            return None;
        }
        out.extend_from_slice(&bytes[..keep]);
    }
    Some(out)
}

fn b64_digit(c: u8) -> Option<u32> {
    let v = match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => return None,
    };
    Some(u32::from(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::test_rand::SplitMix64;

    #[test]
    fn base64_matches_rfc_4648_section_10() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in vectors {
            assert_eq!(b64_encode(plain.as_bytes()), encoded);
            assert_eq!(b64_decode(encoded).as_deref(), Some(plain.as_bytes()), "{encoded}");
        }
    }

    #[test]
    fn base64_refuses_non_canonical_and_malformed_input() {
        for bad in ["Zg", "Zg=", "Zh==", "Zm9=", "Z===", "Zg==Zg==", "Zm9v\n", "Zm 9", "Zm9-", "=Zm9", "Zg=a"] {
            assert_eq!(b64_decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn hex_round_trip_and_refusals() {
        assert_eq!(hex_encode(&[0x00, 0xab, 0xff]), "00abff");
        assert_eq!(hex_decode::<3>("00abff"), Some([0x00, 0xab, 0xff]));
        assert_eq!(hex_decode::<3>("00ABFF"), Some([0x00, 0xab, 0xff]));
        for bad in ["00abf", "00abffff", "00abfg", "+0abff", " 0abff"] {
            assert_eq!(hex_decode::<3>(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn random_bytes_round_trip_through_both_encodings() {
        for seed in 0..500u64 {
            let mut rng = SplitMix64::new(seed);
            let len = (rng.next_u64() % 70) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            assert_eq!(b64_decode(&b64_encode(&bytes)).as_deref(), Some(&bytes[..]), "seed {seed}");
            let mut fixed = [0u8; 32];
            fixed.iter_mut().for_each(|b| *b = rng.next_u64() as u8);
            assert_eq!(hex_decode::<32>(&hex_encode(&fixed)), Some(fixed), "seed {seed}");
        }
    }

    #[test]
    fn random_strings_never_panic_the_decoders() {
        const CHARS: &[u8] = b"AZaz09+/=-_ \n\0\xc3";
        for seed in 0..2000u64 {
            let mut rng = SplitMix64::new(seed);
            let len = (rng.next_u64() % 16) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| CHARS[(rng.next_u64() % CHARS.len() as u64) as usize]).collect();
            let text = String::from_utf8_lossy(&bytes);
            if let Some(decoded) = b64_decode(&text) {
                assert_eq!(b64_encode(&decoded), text, "seed {seed}: only canonical strings decode");
            }
            let _ = hex_decode::<4>(&text);
        }
    }
}
