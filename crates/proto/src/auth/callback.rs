//! The proof a new primary shows when it calls a client back after a failover
//! (DESIGN.md invariant 5).
//!
//! ```text
//! new primary P                                   client's callback listener C
//!   connects to the session's callback address  ->
//!                                               <-  callback_challenge {nonce}   (32 fresh bytes)
//!   callback_proof {epoch, device, proof}       ->
//!       proof = HMAC-SHA256(token, "replibox callback v1" | nonce | epoch | device)
//! ```
//!
//! The session token is the login's session key ([`super::SessionKey`], hex),
//! which both ends derive and which never crosses the wire: the caller
//! proves it holds the token without showing it, so a stranger who answers or
//! calls at the client's address learns nothing it could reuse. The client's fresh
//! nonce makes a recorded proof worthless; the epoch and the device are bound in,
//! so a proof for another session or an older primary does not verify.
//!
//! The client should also check, outside this module, that `device` is its own
//! and that `epoch` is higher than the last epoch it has seen.

use super::encoding::{hex_decode, hex_encode};
use super::key::Nonce;
use super::AuthError;
use crate::ids::{DeviceId, Epoch};
use hmac::{Hmac, Mac};
use sha2::Sha256;

fn mac(token: &str, client_nonce: &Nonce, epoch: Epoch, device: &DeviceId) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(token.as_bytes()).expect("HMAC takes a key of any length");
    // Each field length-prefixed, so no two transcripts encode alike.
    for field in [&b"replibox callback v1"[..], client_nonce, &epoch.0.to_be_bytes(), device.0.as_bytes()] {
        mac.update(&(field.len() as u32).to_be_bytes());
        mac.update(field);
    }
    mac
}

/// The proof that the caller holds the session's `token`, for the client's
/// `client_nonce`, as primary of `epoch`, calling `device`.
pub fn callback_proof(token: &str, client_nonce: &Nonce, epoch: Epoch, device: &DeviceId) -> [u8; 32] {
    mac(token, client_nonce, epoch, device).finalize().into_bytes().into()
}

/// Checks a [`callback_proof`] as it arrived (hex, from [`super::AuthMsg::CallbackProof`]),
/// in constant time.
pub fn verify_callback_proof(
    token: &str,
    client_nonce: &Nonce,
    epoch: Epoch,
    device: &DeviceId,
    proof_hex: &str,
) -> Result<(), AuthError> {
    let proof: [u8; 32] =
        hex_decode(proof_hex).ok_or(AuthError::Malformed("a callback proof must be 64 hex digits"))?;
    mac(token, client_nonce, epoch, device).verify_slice(&proof).map_err(|_| AuthError::BadCallbackProof)
}

/// [`callback_proof`] as the hex that [`super::AuthMsg::CallbackProof`] carries.
pub fn callback_proof_hex(token: &str, client_nonce: &Nonce, epoch: Epoch, device: &DeviceId) -> String {
    hex_encode(&callback_proof(token, client_nonce, epoch, device))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::test_rand::SplitMix64;

    fn dev(s: &str) -> DeviceId {
        DeviceId(s.into())
    }

    #[test]
    fn the_right_token_verifies() {
        let nonce = [7u8; 32];
        let proof = callback_proof_hex("tok", &nonce, Epoch(3), &dev("0123abcd"));
        assert_eq!(proof.len(), 64);
        verify_callback_proof("tok", &nonce, Epoch(3), &dev("0123abcd"), &proof).unwrap();
    }

    #[test]
    fn any_other_token_nonce_epoch_or_device_fails() {
        let nonce = [7u8; 32];
        let proof = callback_proof_hex("tok", &nonce, Epoch(3), &dev("0123abcd"));
        let cases: [(&str, [u8; 32], u64, &str); 4] = [
            ("tok2", nonce, 3, "0123abcd"),
            ("tok", [8; 32], 3, "0123abcd"),
            ("tok", nonce, 4, "0123abcd"),
            ("tok", nonce, 3, "0123abce"),
        ];
        for (token, n, epoch, device) in cases {
            let e = verify_callback_proof(token, &n, Epoch(epoch), &dev(device), &proof).unwrap_err();
            assert!(matches!(e, AuthError::BadCallbackProof), "{token} {epoch} {device}: {e}");
            assert_eq!(e.to_string(), "the caller's proof does not match this session's token (not our server)");
        }
        let e = verify_callback_proof("tok", &nonce, Epoch(3), &dev("0123abcd"), "abc").unwrap_err();
        assert!(matches!(e, AuthError::Malformed(_)), "{e}");
    }

    #[test]
    fn length_prefixes_keep_fields_from_running_together() {
        // Without prefixes, device "ab" + "cd" in one place could equal another split.
        let nonce = [1u8; 32];
        assert_ne!(
            callback_proof("t", &nonce, Epoch(1), &dev("abcdabcd")),
            callback_proof("t", &nonce, Epoch(1), &dev("abcdabcdab"))
        );
    }

    #[test]
    fn random_single_bit_flips_of_a_proof_never_verify() {
        let nonce = [9u8; 32];
        let proof = callback_proof("token", &nonce, Epoch(2), &dev("00112233"));
        for seed in 0..256u64 {
            let mut rng = SplitMix64::new(seed);
            let mut bad = proof;
            bad[(rng.next_u64() % 32) as usize] ^= 1 << (rng.next_u64() % 8);
            let r = verify_callback_proof("token", &nonce, Epoch(2), &dev("00112233"), &hex_encode(&bad));
            assert!(r.is_err(), "seed {seed}");
        }
    }
}
