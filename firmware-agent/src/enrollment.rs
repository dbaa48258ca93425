//! Enrollment: the first certificate for a fresh key, proven with the device's
//! one-time enrollment token. Only the request differs from a renewal; the
//! request/reply machine is [`Exchange`].

use core::fmt;

use idgate_hal::KeyStore;
use idgate_pki::protocol::{EnrollRequest, IdError, Op, enrollment_proof};

use crate::error::{Error, UsageError};
use crate::exchange::{Certified, Event, Exchange, Keep, RequestKind};
use crate::retry::RetryPolicy;
use crate::rid::Rid;

/// The [`RequestKind`] of a first enrollment.
#[derive(Debug)]
pub enum Enroll {}

impl RequestKind for Enroll {
    const OP: Op = Op::Enroll;
    const NAME: &'static str = "Enrollment";
    fn certified(certified: Certified) -> Event {
        Event::Enrolled(certified)
    }
}

/// One enrollment: from a fresh key to its first certificate. Ends with
/// [`Event::Enrolled`], [`Event::Rejected`] or [`Event::GaveUp`].
pub type Enrollment<K> = Exchange<K, Enroll>;

/// What the caller supplies to start an enrollment.
#[derive(Clone, Copy)]
pub struct Config<'a> {
    /// The device's id, as registered at the gateway; also the CSR's CN.
    pub device_id: &'a str,
    /// The one-time enrollment token, exactly as printed (its ASCII bytes). It is
    /// used once, to compute the proof, and not kept.
    pub token: &'a [u8],
    /// When to retransmit and when to give up.
    pub retry: RetryPolicy,
    /// The root CA certificates (DER) the device trusts, one or two (during a
    /// root rollover). A certificate is accepted only if its chain leads to one.
    pub pinned_roots: &'a [&'a [u8]],
}

impl fmt::Debug for Config<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token is a secret: never print it.
        f.debug_struct("Config")
            .field("device_id", &self.device_id)
            .field("token", &"<redacted>")
            .field("retry", &self.retry)
            .field("pinned_roots", &self.pinned_roots.len())
            .finish()
    }
}

impl<K: KeyStore, S: Keep> Exchange<K, Enroll, S> {
    /// Generates a fresh key in the key store's staging slot, builds and signs a
    /// CSR for it (CN = device id), computes the proof and encodes the request.
    /// The first transmission is ready at once.
    pub fn start(
        config: &Config<'_>,
        key_store: K,
        rid: Rid,
        now_ms: u64,
    ) -> Result<Exchange<K, Enroll, S>, Error> {
        let mut slot = None;
        Self::start_in(&mut slot, config, key_store, rid, now_ms)?;
        slot.ok_or(Error::Usage(UsageError::EmptyToken))
    }

    /// [`start`](Self::start), writing the machine into `slot` (replacing
    /// what it held) instead of returning it: on a small MCU that saves a
    /// second copy of its few KiB on the stack. On an error `slot` is left
    /// as it was.
    pub fn start_in(
        slot: &mut Option<Exchange<K, Enroll, S>>,
        config: &Config<'_>,
        key_store: K,
        rid: Rid,
        now_ms: u64,
    ) -> Result<(), Error> {
        if config.token.is_empty() {
            return Err(UsageError::EmptyToken.into());
        }
        Exchange::begin_in(
            slot,
            config.device_id,
            config.retry,
            config.pinned_roots,
            key_store,
            rid,
            now_ms,
            |_, rid, csr, buf| {
                let proof = enrollment_proof(config.token, csr);
                let request = EnrollRequest {
                    rid: rid.as_str(),
                    csr,
                    proof: &proof,
                };
                // MAX_REQUEST fits the largest CSR and rid.
                Ok(request
                    .encode_cbor(buf)
                    .map_err(|_| UsageError::BadRid(IdError::TooLong))?)
            },
        )
    }
}
