//! A software P-256 key store for an MCU without a secure element:
//! `idgate_hal::KeyStore` over the `p256` crate, keys in RAM, the current key
//! handed to the credential store as a 32-byte blob (the scalar) so it lives
//! in flash beside its certificate.
//!
//! The blob is not wrapped: the LM3S6965 has no key to wrap it with. On such a
//! part the flash read-out protection is what keeps the key; a part with a
//! hardware-unique key (or a secure element) should wrap it, or keep it out of
//! the MCU entirely. Signatures are RFC 6979 deterministic, so a weak RNG can
//! never leak the key through a repeated nonce.

use idgate_hal::{ErrorKind, ErrorType, KeySlot, KeyStore, P256PublicKey, P256Signature, Rng};
use p256::ecdsa::SigningKey;
use p256::ecdsa::signature::hazmat::PrehashSigner;

/// Why a [`SoftKeyStore`] operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyError {
    /// The slot holds no key.
    NoKey,
    /// A stored key blob is not a valid P-256 scalar.
    BadBlob,
    /// The signing primitive refused (cannot happen for a valid key).
    Sign,
}

impl idgate_hal::Error for KeyError {
    fn kind(&self) -> ErrorKind {
        match self {
            KeyError::NoKey => ErrorKind::NoKey,
            KeyError::BadBlob => ErrorKind::Storage,
            KeyError::Sign => ErrorKind::Other,
        }
    }
}

/// Three P-256 keys (current, next, previous) and the RNG that makes them.
pub struct SoftKeyStore<R> {
    rng: R,
    current: Option<SigningKey>,
    next: Option<SigningKey>,
    previous: Option<SigningKey>,
}

impl<R> core::fmt::Debug for SoftKeyStore<R> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // Private keys stay out of any output.
        f.debug_struct("SoftKeyStore")
            .field("current", &self.current.is_some())
            .field("next", &self.next.is_some())
            .field("previous", &self.previous.is_some())
            .finish_non_exhaustive()
    }
}

impl<R: Rng> SoftKeyStore<R> {
    /// An empty store (a device that never enrolled).
    pub fn new(rng: R) -> Self {
        SoftKeyStore {
            rng,
            current: None,
            next: None,
            previous: None,
        }
    }

    /// The RNG, for request ids and jitter.
    pub fn rng(&mut self) -> &mut R {
        &mut self.rng
    }

    /// Restores the current key from a blob written by [`current_blob`](Self::current_blob).
    pub fn restore_current(&mut self, blob: &[u8]) -> Result<(), KeyError> {
        let key = SigningKey::from_slice(blob).map_err(|_| KeyError::BadBlob)?;
        self.current = Some(key);
        Ok(())
    }

    /// The current key as a 32-byte blob for the credential store.
    pub fn current_blob(&self) -> Result<[u8; 32], KeyError> {
        let key = self.current.as_ref().ok_or(KeyError::NoKey)?;
        Ok(key.to_bytes().into())
    }

    fn key(&self, slot: KeySlot) -> Result<&SigningKey, KeyError> {
        match slot {
            KeySlot::Current => self.current.as_ref(),
            KeySlot::Next => self.next.as_ref(),
            KeySlot::Previous => self.previous.as_ref(),
        }
        .ok_or(KeyError::NoKey)
    }
}

impl<R> ErrorType for SoftKeyStore<R> {
    type Error = KeyError;
}

impl<R: Rng> KeyStore for SoftKeyStore<R> {
    fn generate_next(&mut self) -> Result<P256PublicKey, KeyError> {
        let key = SigningKey::random(&mut self.rng);
        let public = public_key(&key);
        self.next = Some(key);
        Ok(public)
    }

    fn public_key(&self, slot: KeySlot) -> Result<P256PublicKey, KeyError> {
        self.key(slot).map(public_key)
    }

    fn sign_digest(&mut self, slot: KeySlot, digest: &[u8; 32]) -> Result<P256Signature, KeyError> {
        let signature: p256::ecdsa::Signature = self
            .key(slot)?
            .sign_prehash(digest)
            .map_err(|_| KeyError::Sign)?;
        Ok(signature.to_bytes().into())
    }

    fn promote_next(&mut self) -> Result<(), KeyError> {
        let next = self.next.take().ok_or(KeyError::NoKey)?;
        self.previous = self.current.replace(next);
        Ok(())
    }

    fn release_previous(&mut self) -> Result<(), KeyError> {
        self.previous = None;
        Ok(())
    }

    fn restore_previous(&mut self) -> Result<(), KeyError> {
        let previous = self.previous.take().ok_or(KeyError::NoKey)?;
        self.current = Some(previous);
        Ok(())
    }
}

fn public_key(key: &SigningKey) -> P256PublicKey {
    let point = key.verifying_key().to_encoded_point(false);
    let mut out = [0u8; 65];
    // An uncompressed P-256 point is always 65 bytes.
    out.copy_from_slice(point.as_bytes());
    out
}
