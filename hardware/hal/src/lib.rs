//! The hardware traits the idgate firmware agent is generic over, in the style of
//! `embedded-hal`: each trait names its error type through [`ErrorType`], and
//! every error can be reduced to a portable [`ErrorKind`] so the agent can report
//! a fault without knowing which chip raised it.
//!
//! Implementations live elsewhere: `idgate-sim` for the host, the board crates for
//! real devices. The traits: [`KeyStore`] (a software key or a secure element),
//! [`flash`] (the `embedded-storage` NOR flash traits, re-exported), [`Clock`]
//! (monotonic milliseconds and, if the board has one, a wall clock) and [`Rng`]
//! (a cryptographic RNG, `rand_core`'s `RngCore + CryptoRng`).
#![no_std]

/// A NOR flash region: the `embedded-storage` 0.3 traits, re-exported so the
/// agent and the boards agree on one version. Erase sets bytes to `0xFF`, a
/// write can only clear bits, and both work in units of
/// [`ERASE_SIZE`](flash::NorFlash::ERASE_SIZE) and
/// [`WRITE_SIZE`](flash::NorFlash::WRITE_SIZE).
pub mod flash {
    pub use embedded_storage::nor_flash::{
        ErrorType, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash, check_erase,
        check_read, check_write,
    };

    /// The portable [`ErrorKind`](crate::ErrorKind) of a flash error.
    pub fn error_kind(e: &impl NorFlashError) -> crate::ErrorKind {
        match e.kind() {
            NorFlashErrorKind::NotAligned | NorFlashErrorKind::OutOfBounds => {
                crate::ErrorKind::Other
            }
            _ => crate::ErrorKind::Storage,
        }
    }
}

/// A cryptographically secure random number generator (key generation, request
/// ids, jitter). Every `RngCore + CryptoRng` is one.
pub trait Rng: rand_core::RngCore + rand_core::CryptoRng {}

impl<T: rand_core::RngCore + rand_core::CryptoRng + ?Sized> Rng for T {}

/// The device's sense of time.
///
/// `now_ms` is monotonic: it never goes back and keeps counting while the
/// device runs, but may restart from zero at boot. `unix_time` is the wall
/// clock, if the board has a real-time clock that is set; most sensors have
/// none, and the agent then sets its idea of the time from the gateway's
/// replies (see `idgate_agent::TimeKeeper`).
pub trait Clock {
    /// Milliseconds since an arbitrary point (usually boot); never decreasing.
    fn now_ms(&mut self) -> u64;

    /// Seconds since the Unix epoch, if a set real-time clock exists.
    fn unix_time(&mut self) -> Option<u64> {
        None
    }
}

impl<T: Clock + ?Sized> Clock for &mut T {
    fn now_ms(&mut self) -> u64 {
        T::now_ms(self)
    }

    fn unix_time(&mut self) -> Option<u64> {
        T::unix_time(self)
    }
}

use core::fmt;

/// Uncompressed SEC1 P-256 public key: `04 || X || Y` (the same layout as
/// `idgate_pki::csr::P256PublicKey`).
pub type P256PublicKey = [u8; 65];
/// ECDSA P-256 signature as fixed-size `r || s`, big-endian.
pub type P256Signature = [u8; 64];

/// A hardware error that can say, portably, what kind of failure it was.
pub trait Error: fmt::Debug {
    /// The portable kind of this error.
    fn kind(&self) -> ErrorKind;
}

impl Error for core::convert::Infallible {
    fn kind(&self) -> ErrorKind {
        match *self {}
    }
}

/// Portable kinds of hardware failure. New kinds may be added; match with a
/// wildcard arm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The addressed key slot holds no key.
    NoKey,
    /// The device is busy or did not answer in time; the operation may succeed
    /// if repeated.
    Busy,
    /// Talking to the device failed (bus error, bad checksum, protocol error).
    Communication,
    /// Persistent storage behind the device failed (worn out, write failed).
    Storage,
    /// Anything else; the implementation's own error carries the details.
    Other,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::NoKey => "the key slot is empty",
            ErrorKind::Busy => "the device is busy",
            ErrorKind::Communication => "communication with the device failed",
            ErrorKind::Storage => "the device's storage failed",
            ErrorKind::Other => "the device failed",
        })
    }
}

impl Error for ErrorKind {
    fn kind(&self) -> ErrorKind {
        *self
    }
}

/// Names the error type shared by a driver's traits.
pub trait ErrorType {
    /// The driver's error.
    type Error: Error;
}

impl<T: ErrorType + ?Sized> ErrorType for &mut T {
    type Error = T::Error;
}

/// Which key of a [`KeyStore`] an operation addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeySlot {
    /// The key the device's current certificate is for.
    Current,
    /// A staged key waiting for its certificate; it becomes current once one is
    /// issued, so a failed or abandoned renewal never loses the working key.
    Next,
    /// The key that was current before the last promotion, kept until the
    /// firmware has seen the new credential work once (then
    /// [`KeyStore::release_previous`]) or falls back to the old credential
    /// (then [`KeyStore::restore_previous`]): the old credential in the A/B
    /// store is worth nothing without its key.
    Previous,
}

/// A P-256 key store that may be a secure element: it creates keys, signs
/// digests and reports public keys, and never reveals a private key.
///
/// Three slots make key rotation safe: a new key is generated into
/// [`KeySlot::Next`], its certificate is requested, and only when the
/// certificate has arrived is the key promoted to [`KeySlot::Current`]; the
/// key it replaces stays as [`KeySlot::Previous`] until the firmware has seen
/// the new credential work once. A power cut or a bad new certificate anywhere
/// in between leaves the device with a working key and the certificate for it.
///
/// A secure element keeps the three as key slots (or key handles) and only
/// ever destroys a key in [`release_previous`](KeyStore::release_previous),
/// [`restore_previous`](KeyStore::restore_previous) or when
/// [`generate_next`](KeyStore::generate_next) overwrites the staging slot.
pub trait KeyStore: ErrorType {
    /// Generates a fresh key into the staging slot, replacing any key there, and
    /// returns its public key.
    fn generate_next(&mut self) -> Result<P256PublicKey, Self::Error>;

    /// The public key in `slot`.
    fn public_key(&self, slot: KeySlot) -> Result<P256PublicKey, Self::Error>;

    /// Signs a SHA-256 digest with the key in `slot` (ECDSA, no further hashing).
    fn sign_digest(
        &mut self,
        slot: KeySlot,
        digest: &[u8; 32],
    ) -> Result<P256Signature, Self::Error>;

    /// Makes the staged key current; the old current key (if any) becomes
    /// [`KeySlot::Previous`], replacing an earlier previous key. The staging
    /// slot is then empty.
    fn promote_next(&mut self) -> Result<(), Self::Error>;

    /// The new credential has worked: destroys the previous key. Does nothing
    /// when there is none (a first enrollment, or already released).
    fn release_previous(&mut self) -> Result<(), Self::Error>;

    /// The new credential did not work: the previous key becomes current
    /// again and the key promoted over it is destroyed. Fails with
    /// [`ErrorKind::NoKey`] when there is no previous key, changing nothing.
    fn restore_previous(&mut self) -> Result<(), Self::Error>;
}

impl<T: KeyStore + ?Sized> KeyStore for &mut T {
    fn generate_next(&mut self) -> Result<P256PublicKey, Self::Error> {
        T::generate_next(self)
    }

    fn public_key(&self, slot: KeySlot) -> Result<P256PublicKey, Self::Error> {
        T::public_key(self, slot)
    }

    fn sign_digest(
        &mut self,
        slot: KeySlot,
        digest: &[u8; 32],
    ) -> Result<P256Signature, Self::Error> {
        T::sign_digest(self, slot, digest)
    }

    fn promote_next(&mut self) -> Result<(), Self::Error> {
        T::promote_next(self)
    }

    fn release_previous(&mut self) -> Result<(), Self::Error> {
        T::release_previous(self)
    }

    fn restore_previous(&mut self) -> Result<(), Self::Error> {
        T::restore_previous(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store that only counts calls, to show the `&mut` forwarding works.
    #[derive(Debug, Default)]
    struct Counting {
        promoted: u32,
        released: u32,
        restored: u32,
    }

    impl ErrorType for Counting {
        type Error = ErrorKind;
    }

    impl KeyStore for Counting {
        fn generate_next(&mut self) -> Result<P256PublicKey, ErrorKind> {
            Ok([4; 65])
        }
        fn public_key(&self, slot: KeySlot) -> Result<P256PublicKey, ErrorKind> {
            match slot {
                KeySlot::Current | KeySlot::Previous => Err(ErrorKind::NoKey),
                KeySlot::Next => Ok([4; 65]),
            }
        }
        fn sign_digest(&mut self, _: KeySlot, _: &[u8; 32]) -> Result<P256Signature, ErrorKind> {
            Err(ErrorKind::Busy)
        }
        fn promote_next(&mut self) -> Result<(), ErrorKind> {
            self.promoted += 1;
            Ok(())
        }
        fn release_previous(&mut self) -> Result<(), ErrorKind> {
            self.released += 1;
            Ok(())
        }
        fn restore_previous(&mut self) -> Result<(), ErrorKind> {
            self.restored += 1;
            Ok(())
        }
    }

    fn rotate(mut store: impl KeyStore) -> Result<(), ErrorKind> {
        store.generate_next().map_err(|e| e.kind())?;
        store.promote_next().map_err(|e| e.kind())?;
        store.restore_previous().map_err(|e| e.kind())?;
        store.release_previous().map_err(|e| e.kind())
    }

    struct Ticks(u64);

    impl Clock for Ticks {
        fn now_ms(&mut self) -> u64 {
            self.0 += 1;
            self.0
        }
    }

    #[test]
    fn clocks_forward_and_default_to_no_wall_clock() {
        let mut ticks = Ticks(0);
        let by_reference = &mut ticks;
        assert_eq!(Clock::now_ms(&mut &mut *by_reference), 1);
        assert_eq!(Clock::unix_time(&mut &mut *by_reference), None);
        assert_eq!(ticks.now_ms(), 2);
    }

    #[test]
    fn flash_errors_map_to_kinds() {
        use flash::NorFlashErrorKind;
        assert_eq!(
            flash::error_kind(&NorFlashErrorKind::Other),
            ErrorKind::Storage
        );
        assert_eq!(
            flash::error_kind(&NorFlashErrorKind::NotAligned),
            ErrorKind::Other
        );
    }

    #[test]
    fn mutable_references_forward() {
        let mut store = Counting::default();
        rotate(&mut store).unwrap();
        rotate(&mut store).unwrap();
        assert_eq!((store.promoted, store.restored, store.released), (2, 2, 2));
        let by_reference = &mut store;
        assert_eq!(
            KeyStore::public_key(&by_reference, KeySlot::Current)
                .unwrap_err()
                .kind(),
            ErrorKind::NoKey
        );
        assert_eq!(
            store
                .sign_digest(KeySlot::Next, &[0; 32])
                .unwrap_err()
                .kind(),
            ErrorKind::Busy
        );
    }
}
