//! A software key store: [`idgate_hal::KeyStore`] on the host, with the `p256`
//! crate doing the arithmetic. It stands in for a secure element in tests and in
//! the simulator, so it keeps the same rules (the agent never sees a private key)
//! and adds what a test needs: exporting the current key as PKCS#8 PEM, and
//! injected faults.

use std::fmt;

use idgate_hal::{ErrorKind, ErrorType, KeySlot, KeyStore, P256PublicKey, P256Signature};
use p256::ecdsa::signature::hazmat::PrehashSigner;
use p256::ecdsa::{Signature, SigningKey};
use p256::elliptic_curve::zeroize::Zeroizing;
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};

/// A key store operation, to name the one a fault is injected into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Operation {
    /// [`KeyStore::generate_next`].
    Generate,
    /// [`KeyStore::public_key`].
    PublicKey,
    /// [`KeyStore::sign_digest`].
    Sign,
    /// [`KeyStore::promote_next`].
    Promote,
    /// [`KeyStore::release_previous`].
    Release,
    /// [`KeyStore::restore_previous`].
    Restore,
}

/// Why a [`SoftKeyStore`] operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SoftKeyError {
    /// The slot is empty.
    NoKey(KeySlot),
    /// A fault injected with [`SoftKeyStore::fail_once`].
    Injected(Operation),
    /// The key could not be encoded.
    Encoding,
    /// A key given to the store is not a P-256 PKCS#8 key.
    BadKey,
}

impl fmt::Display for SoftKeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SoftKeyError::NoKey(slot) => write!(f, "no key in the {slot:?} slot"),
            SoftKeyError::Injected(operation) => write!(f, "injected fault in {operation:?}"),
            SoftKeyError::Encoding => f.write_str("the key could not be encoded"),
            SoftKeyError::BadKey => f.write_str("not a P-256 PKCS#8 private key"),
        }
    }
}

impl std::error::Error for SoftKeyError {}

impl idgate_hal::Error for SoftKeyError {
    fn kind(&self) -> ErrorKind {
        match self {
            SoftKeyError::NoKey(_) => ErrorKind::NoKey,
            // An injected fault plays a flaky bus to a secure element.
            SoftKeyError::Injected(_) => ErrorKind::Communication,
            SoftKeyError::Encoding | SoftKeyError::BadKey => ErrorKind::Other,
        }
    }
}

/// P-256 keys in memory, in the three slots of [`KeyStore`].
#[derive(Default)]
pub struct SoftKeyStore {
    current: Option<SigningKey>,
    next: Option<SigningKey>,
    previous: Option<SigningKey>,
    fault: Option<Operation>,
}

impl fmt::Debug for SoftKeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Private keys stay out of logs.
        f.debug_struct("SoftKeyStore")
            .field("current", &self.current.is_some())
            .field("next", &self.next.is_some())
            .field("previous", &self.previous.is_some())
            .field("fault", &self.fault)
            .finish()
    }
}

impl SoftKeyStore {
    /// An empty store, as a device leaves the factory.
    pub fn new() -> SoftKeyStore {
        SoftKeyStore::default()
    }

    /// A store whose current key is `key`.
    pub fn with_current(key: SigningKey) -> SoftKeyStore {
        SoftKeyStore {
            current: Some(key),
            ..SoftKeyStore::default()
        }
    }

    /// A store whose current key is the P-256 key in `pem` (PKCS#8,
    /// `-----BEGIN PRIVATE KEY-----`), as [`current_key_pem`](Self::current_key_pem)
    /// writes it.
    pub fn from_current_key_pem(pem: &str) -> Result<SoftKeyStore, SoftKeyError> {
        let key = SigningKey::from_pkcs8_pem(pem).map_err(|_| SoftKeyError::BadKey)?;
        Ok(SoftKeyStore::with_current(key))
    }

    /// Makes the next call of `operation` fail once.
    pub fn fail_once(&mut self, operation: Operation) {
        self.fault = Some(operation);
    }

    /// The current key as PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`). A real secure
    /// element cannot do this; the simulator needs it to hand the key to other tools.
    pub fn current_key_pem(&self) -> Result<Zeroizing<String>, SoftKeyError> {
        let key = self
            .current
            .as_ref()
            .ok_or(SoftKeyError::NoKey(KeySlot::Current))?;
        key.to_pkcs8_pem(LineEnding::LF)
            .map_err(|_| SoftKeyError::Encoding)
    }

    fn key(&self, slot: KeySlot) -> Result<&SigningKey, SoftKeyError> {
        match slot {
            KeySlot::Current => self.current.as_ref(),
            KeySlot::Next => self.next.as_ref(),
            KeySlot::Previous => self.previous.as_ref(),
        }
        .ok_or(SoftKeyError::NoKey(slot))
    }

    fn check_fault(&mut self, operation: Operation) -> Result<(), SoftKeyError> {
        if self.fault == Some(operation) {
            self.fault = None;
            return Err(SoftKeyError::Injected(operation));
        }
        Ok(())
    }
}

fn public_key_of(key: &SigningKey) -> Result<P256PublicKey, SoftKeyError> {
    key.verifying_key()
        .to_encoded_point(false)
        .as_bytes()
        .try_into()
        .map_err(|_| SoftKeyError::Encoding)
}

impl ErrorType for SoftKeyStore {
    type Error = SoftKeyError;
}

impl KeyStore for SoftKeyStore {
    fn generate_next(&mut self) -> Result<P256PublicKey, SoftKeyError> {
        self.check_fault(Operation::Generate)?;
        let key = SigningKey::random(&mut rand::rngs::OsRng);
        let public_key = public_key_of(&key)?;
        self.next = Some(key);
        Ok(public_key)
    }

    fn public_key(&self, slot: KeySlot) -> Result<P256PublicKey, SoftKeyError> {
        if self.fault == Some(Operation::PublicKey) {
            // `&self` cannot clear the fault: it stays until another operation.
            return Err(SoftKeyError::Injected(Operation::PublicKey));
        }
        public_key_of(self.key(slot)?)
    }

    fn sign_digest(
        &mut self,
        slot: KeySlot,
        digest: &[u8; 32],
    ) -> Result<P256Signature, SoftKeyError> {
        self.check_fault(Operation::Sign)?;
        let signature: Signature = self
            .key(slot)?
            .sign_prehash(digest)
            .map_err(|_| SoftKeyError::Encoding)?;
        Ok(signature.to_bytes().into())
    }

    fn promote_next(&mut self) -> Result<(), SoftKeyError> {
        self.check_fault(Operation::Promote)?;
        let next = self.next.take().ok_or(SoftKeyError::NoKey(KeySlot::Next))?;
        self.previous = self.current.replace(next);
        Ok(())
    }

    fn release_previous(&mut self) -> Result<(), SoftKeyError> {
        self.check_fault(Operation::Release)?;
        self.previous = None;
        Ok(())
    }

    fn restore_previous(&mut self) -> Result<(), SoftKeyError> {
        self.check_fault(Operation::Restore)?;
        let previous = self
            .previous
            .take()
            .ok_or(SoftKeyError::NoKey(KeySlot::Previous))?;
        self.current = Some(previous);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::VerifyingKey;
    use p256::ecdsa::signature::hazmat::PrehashVerifier;

    #[test]
    fn rotation_keeps_the_current_key_until_promotion() {
        let mut store = SoftKeyStore::new();
        assert_eq!(
            store.public_key(KeySlot::Current),
            Err(SoftKeyError::NoKey(KeySlot::Current))
        );
        let next = store.generate_next().unwrap();
        assert_eq!(store.public_key(KeySlot::Next).unwrap(), next);
        assert!(store.current_key_pem().is_err());
        store.promote_next().unwrap();
        assert_eq!(store.public_key(KeySlot::Current).unwrap(), next);
        assert_eq!(
            store.promote_next(),
            Err(SoftKeyError::NoKey(KeySlot::Next))
        );

        let pem = store.current_key_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let back = SoftKeyStore::from_current_key_pem(&pem).unwrap();
        assert_eq!(back.public_key(KeySlot::Current).unwrap(), next);
        assert_eq!(
            SoftKeyStore::from_current_key_pem("-----BEGIN PRIVATE KEY-----\n").err(),
            Some(SoftKeyError::BadKey)
        );
    }

    #[test]
    fn the_replaced_key_stays_until_released_or_restored() {
        let mut store = SoftKeyStore::new();
        let first = store.generate_next().unwrap();
        store.promote_next().unwrap();
        // A first enrollment replaces no key.
        assert_eq!(
            store.public_key(KeySlot::Previous),
            Err(SoftKeyError::NoKey(KeySlot::Previous))
        );
        let second = store.generate_next().unwrap();
        store.promote_next().unwrap();
        assert_eq!(store.public_key(KeySlot::Current).unwrap(), second);
        assert_eq!(store.public_key(KeySlot::Previous).unwrap(), first);
        // The new credential did not work: back to the first key, the second
        // one is gone for good.
        store.restore_previous().unwrap();
        assert_eq!(store.public_key(KeySlot::Current).unwrap(), first);
        assert_eq!(
            store.restore_previous(),
            Err(SoftKeyError::NoKey(KeySlot::Previous))
        );
        assert_eq!(store.public_key(KeySlot::Current).unwrap(), first);
        // Rotate again and keep the new key this time.
        let third = store.generate_next().unwrap();
        store.promote_next().unwrap();
        store.release_previous().unwrap();
        assert_eq!(store.public_key(KeySlot::Current).unwrap(), third);
        assert!(store.public_key(KeySlot::Previous).is_err());
        store.release_previous().unwrap();
    }

    #[test]
    fn signatures_verify() {
        let mut store = SoftKeyStore::new();
        let public = store.generate_next().unwrap();
        let digest = [7u8; 32];
        let signature = store.sign_digest(KeySlot::Next, &digest).unwrap();
        let key = VerifyingKey::from_sec1_bytes(&public).unwrap();
        let signature = Signature::from_slice(&signature).unwrap();
        key.verify_prehash(&digest, &signature).unwrap();
    }

    #[test]
    fn injected_faults_fire_once() {
        let mut store = SoftKeyStore::new();
        store.fail_once(Operation::Generate);
        let err = store.generate_next().unwrap_err();
        assert_eq!(idgate_hal::Error::kind(&err), ErrorKind::Communication);
        store.generate_next().unwrap();
    }
}
