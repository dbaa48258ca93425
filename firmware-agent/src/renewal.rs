//! Renewal: the next certificate, for a new key, signed off by the current key.
//! The request binds the new key's CSR to the current certificate's serial and a
//! monotonic counter with a signature by the current key
//! ([`renew_message`](idgate_pki::protocol::renew_message)). Only the request
//! differs from an enrollment; the request/reply machine is [`Exchange`].
//!
//! The current key stays current until a certificate for the new one has
//! arrived: a rejection, a timeout or a power cut leaves the device with its
//! working key and certificate, and the staged key is simply abandoned.

use idgate_hal::{KeySlot, KeyStore};
use idgate_pki::protocol::{
    IdError, MAX_RENEW_MESSAGE, Op, RenewRequest, check_serial, renew_message,
};
use sha2::{Digest, Sha256};

use crate::error::{Error, KeyOperation, UsageError};
use crate::exchange::{Certified, Event, Exchange, RequestKind, key_error};
use crate::retry::RetryPolicy;
use crate::rid::Rid;

/// The [`RequestKind`] of a renewal.
#[derive(Debug)]
pub enum Renew {}

impl RequestKind for Renew {
    const OP: Op = Op::Renew;
    const NAME: &'static str = "Renewal";
    fn certified(certified: Certified) -> Event {
        Event::Renewed(certified)
    }
}

/// One renewal: from the current key and certificate to a new key and its
/// certificate. Ends with [`Event::Renewed`], [`Event::Rejected`] or
/// [`Event::GaveUp`].
pub type Renewal<K> = Exchange<K, Renew>;

/// What the caller supplies to start a renewal.
#[derive(Clone, Copy, Debug)]
pub struct RenewConfig<'a> {
    /// The device's id; also the CSR's CN.
    pub device_id: &'a str,
    /// Serial of the current certificate (the one for the key in
    /// [`KeySlot::Current`]), lowercase hex as the gateway sent it.
    pub serial: &'a str,
    /// Greater than the counter of every earlier renewal of this device; the
    /// gateway takes a counter that does not grow for a clone. Persist it
    /// **before** calling [`start`](Exchange::start), so that a power cut can
    /// never make it go back.
    pub counter: u64,
    /// When to retransmit and when to give up.
    pub retry: RetryPolicy,
    /// The root CA certificates (DER) the device trusts, one or two (during a
    /// root rollover). A certificate is accepted only if its chain leads to one.
    pub pinned_roots: &'a [&'a [u8]],
}

impl<K: KeyStore> Exchange<K, Renew> {
    /// Checks that the key store has a current key, generates a fresh key in its
    /// staging slot, builds a CSR for it (CN = device id, signed with the new
    /// key), signs the renewal message with the current key and encodes the
    /// request. The first transmission is ready at once.
    pub fn start(
        config: &RenewConfig<'_>,
        key_store: K,
        rid: Rid,
        now_ms: u64,
    ) -> Result<Renewal<K>, Error> {
        check_serial(config.serial).map_err(UsageError::BadSerial)?;
        // Without a current key there is nothing to renew; find out before a new
        // key is generated for nothing.
        key_store
            .public_key(KeySlot::Current)
            .map_err(|e| key_error(KeyOperation::SignRenewal, &e))?;
        let mut slot = None;
        Exchange::begin_in(
            &mut slot,
            config.device_id,
            config.retry,
            config.pinned_roots,
            key_store,
            rid,
            now_ms,
            |key_store, rid, csr, buf| {
                let mut message = [0u8; MAX_RENEW_MESSAGE];
                // Checked device id, rid and serial always fit.
                let len = renew_message(
                    config.device_id,
                    rid.as_str(),
                    csr,
                    config.serial,
                    config.counter,
                    &mut message,
                )
                .map_err(|_| UsageError::BadSerial(IdError::TooLong))?;
                let digest: [u8; 32] = Sha256::digest(&message[..len]).into();
                let sig = key_store
                    .sign_digest(KeySlot::Current, &digest)
                    .map_err(|e| key_error(KeyOperation::SignRenewal, &e))?;
                let request = RenewRequest {
                    rid: rid.as_str(),
                    csr,
                    serial: config.serial,
                    counter: config.counter,
                    sig: &sig,
                };
                Ok(request
                    .encode_cbor(buf)
                    .map_err(|_| UsageError::BadRid(IdError::TooLong))?)
            },
        )?;
        // `begin_in` filled the slot when it returned Ok.
        slot.ok_or(Error::Usage(UsageError::BadSerial(IdError::Empty)))
    }
}
