//! One-time enrollment tokens.
//!
//! A token is 160 bits from the OS CSPRNG, printed once as 32 lowercase base32
//! characters. The device proves it holds the token with
//! `HMAC-SHA256(token, SHA-256(csr))`, so the token never crosses the broker.
//! Verifying an HMAC needs the key, so the registry cannot keep only a hash:
//! it keeps the token sealed (ChaCha20-Poly1305, the device id as associated
//! data) under a key in the data directory. A copy of the database alone
//! reveals no token.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use idgate_pki::protocol::verify_enrollment_proof;
use rand::RngCore;

/// The credential kind stored in the registry.
pub const KIND: &str = "token";
/// Length of the sealing key file.
pub const SEAL_KEY_LEN: usize = 32;
/// Random bytes in a token.
const TOKEN_BYTES: usize = 20;
const NONCE_LEN: usize = 12;

/// A sealed token could not be opened: the seal key is not the one it was
/// sealed with, or the row was altered. An operator problem, not the device's.
#[derive(Debug, thiserror::Error)]
#[error("enrollment credential of `{0}` cannot be unsealed (wrong seal key or altered row)")]
pub struct Unsealable(pub String);

/// A freshly made token: shown once, then only its sealed form exists.
pub struct NewToken {
    /// The token text to hand to the device.
    pub token: String,
    /// What the registry stores.
    pub sealed: Vec<u8>,
}

impl std::fmt::Debug for NewToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NewToken { .. }")
    }
}

/// Seals and checks tokens with the data directory's seal key.
#[derive(Clone)]
pub struct Tokens {
    cipher: ChaCha20Poly1305,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokens { .. }")
    }
}

impl Tokens {
    /// Uses `key` (32 bytes) to seal and unseal.
    pub fn new(key: &[u8; SEAL_KEY_LEN]) -> Tokens {
        Tokens {
            cipher: ChaCha20Poly1305::new(&Key::from(*key)),
        }
    }

    /// Makes a new token for `device_id`.
    pub fn generate(&self, device_id: &str) -> NewToken {
        let mut raw = [0u8; TOKEN_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        let token = base32(&raw);
        let sealed = self.seal(device_id, token.as_bytes());
        NewToken { token, sealed }
    }

    fn seal(&self, device_id: &str, token: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ciphertext = self
            .cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: token,
                    aad: device_id.as_bytes(),
                },
            )
            .expect("ChaCha20-Poly1305 encrypts any message under 256 GiB");
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&ciphertext);
        sealed
    }

    /// Checks an enrollment proof against the sealed token of `device_id`.
    pub fn verify(
        &self,
        device_id: &str,
        sealed: &[u8],
        csr: &[u8],
        proof: &[u8],
    ) -> Result<bool, Unsealable> {
        let unsealable = || Unsealable(device_id.to_owned());
        if sealed.len() < NONCE_LEN {
            return Err(unsealable());
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| unsealable())?;
        let token = self
            .cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad: device_id.as_bytes(),
                },
            )
            .map_err(|_| unsealable())?;
        Ok(verify_enrollment_proof(&token, csr, proof))
    }
}

/// RFC 4648 base32, lowercase, no padding (the input is a multiple of 5 bytes).
fn base32(bytes: &[u8; TOKEN_BYTES]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = String::with_capacity(TOKEN_BYTES * 8 / 5);
    for chunk in bytes.chunks(5) {
        let mut buffer = [0u8; 8];
        buffer[3..8].copy_from_slice(chunk);
        let bits = u64::from_be_bytes(buffer);
        for i in (0..8).rev() {
            out.push(ALPHABET[((bits >> (i * 5)) & 0x1f) as usize] as char);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use idgate_pki::protocol::enrollment_proof;

    #[test]
    fn base32_matches_rfc4648_vectors() {
        // RFC 4648 §10: BASE32("fooba") = "MZXW6YTB"; five such blocks.
        assert_eq!(base32(b"foobafoobafoobafooba"), "mzxw6ytb".repeat(4));
    }

    #[test]
    fn tokens_are_long_random_and_sealed() {
        let tokens = Tokens::new(&[9; 32]);
        let a = tokens.generate("d1");
        let b = tokens.generate("d1");
        assert_eq!(a.token.len(), 32);
        assert_ne!(a.token, b.token);
        assert!(
            !a.sealed
                .windows(a.token.len())
                .any(|w| w == a.token.as_bytes()),
            "the sealed form does not contain the token"
        );
    }

    #[test]
    fn proofs_verify_only_with_the_right_token_device_and_key() {
        let tokens = Tokens::new(&[9; 32]);
        let new = tokens.generate("d1");
        let csr = b"csr bytes";
        let proof = enrollment_proof(new.token.as_bytes(), csr);
        assert!(tokens.verify("d1", &new.sealed, csr, &proof).unwrap());
        assert!(
            !tokens
                .verify("d1", &new.sealed, b"other csr", &proof)
                .unwrap()
        );
        let wrong = enrollment_proof(b"wrong token", csr);
        assert!(!tokens.verify("d1", &new.sealed, csr, &wrong).unwrap());
        // Sealed for d1: useless for d2 or under another key.
        assert!(tokens.verify("d2", &new.sealed, csr, &proof).is_err());
        assert!(
            Tokens::new(&[8; 32])
                .verify("d1", &new.sealed, csr, &proof)
                .is_err()
        );
        assert!(tokens.verify("d1", &[1, 2, 3], csr, &proof).is_err());
    }
}
