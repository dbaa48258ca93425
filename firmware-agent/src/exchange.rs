//! The request/reply machine every certificate request shares: one request for
//! a fresh key, sent again unchanged until an answer comes, and the checks an
//! answer must pass before the new key is promoted. [`Enrollment`](crate::Enrollment)
//! and [`Renewal`](crate::Renewal) differ only in how the request is built
//! (their `start`) and in the event they end with; the rest lives here.
//!
//! ```text
//!   start ──► ExpectCertificate ──accepted──► Certified
//!                  │    ▲  │
//!        timeout ──┘    │  ├──rejected (final)──► Rejected
//!   (retransmit, same   │  └──last attempt timed out──► GaveUp
//!    bytes, same rid)   └── rejected `internal`: keep waiting
//! ```
//!
//! Anyone on the broker may publish on our reply topics, so a reply changes the
//! state only if it names our request id and, when accepted, certifies the very
//! key we generated. Everything else is counted and ignored.

use core::fmt;
use core::marker::PhantomData;

use idgate_hal::{KeySlot, KeyStore, P256PublicKey};
use idgate_pki::csr::{CsrError, MAX_P256_CSR, build_p256_csr, p256_spki};
use idgate_pki::der::certificate_spki;
use idgate_pki::protocol::{
    Format, IdError, Issued, MAX_CHAIN, MAX_ID, MAX_SERIAL_HEX, MAX_TOPIC, Op, RejectCode,
    Rejected, Reply, SIG_LEN, Topic, check_device_id,
};

use crate::chain::{self, Anchor, Anchors};
use crate::error::{Error, HardwareError, KeyOperation, PeerError, UsageError};
use crate::retry::{Jitter, RetryPolicy};
use crate::rid::Rid;

/// Largest device certificate (DER) the agent keeps.
pub const MAX_CERTIFICATE: usize = 1024;
/// Largest total size of the chain certificates (DER) the agent keeps.
pub const MAX_CHAIN_BYTES: usize = 2048;
/// Longest serial: 20 octets as lowercase hex.
pub const MAX_SERIAL: usize = MAX_SERIAL_HEX;
/// Largest encoded request: a CSR of at most [`MAX_P256_CSR`] bytes, a
/// 64-character rid, and for a renewal a serial, a counter and a signature,
/// with the CBOR framing around them.
pub const MAX_REQUEST: usize = 640;
/// Longest rejection code kept; longer (unknown) codes are cut.
pub const MAX_REJECT_CODE: usize = 32;
/// Longest rejection message kept; longer messages are cut.
pub const MAX_REJECT_MESSAGE: usize = 128;

// The request must fit whatever the CSR builder produces and the largest renewal
// fields: rid, serial, a 9-byte counter, the signature, and 64 bytes of keys
// and CBOR headers (the largest request needs 38).
const _: () = assert!(MAX_REQUEST >= MAX_P256_CSR + MAX_ID + MAX_SERIAL_HEX + 9 + SIG_LEN + 64);

/// A certificate serial number: lowercase hex, at most 20 octets.
pub type Serial = heapless::String<MAX_SERIAL>;
/// A topic name.
pub type TopicName = heapless::String<MAX_TOPIC>;

/// A message to publish: the payload is in the caller's buffer, `..len`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// The topic to publish on.
    pub topic: TopicName,
    /// How many bytes of the buffer to publish.
    pub len: usize,
    /// 1 for the first transmission, then 2, 3, … (the payload never changes).
    pub attempt: u32,
}

/// Something the firmware should know about; every event is final.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// An enrollment's certificate arrived and its key is now current.
    Enrolled(Certified),
    /// A renewal's certificate arrived and the new key is now current; the old
    /// key is gone.
    Renewed(Certified),
    /// The gateway refused the request for good. The key that was current
    /// before stays current; the staged key is abandoned.
    Rejected(Rejection),
    /// No answer came after the last attempt. As for a rejection, the current
    /// key is unchanged.
    GaveUp {
        /// How many times the request was sent.
        attempts: u32,
    },
}

/// A certificate for the new key arrived and the key was promoted. The
/// certificate and chain are available from [`Exchange::certificate`] and
/// [`Exchange::chain`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Certified {
    /// Serial number of the certificate.
    pub serial: Serial,
    /// Validity start, unix seconds.
    pub not_before: u64,
    /// Validity end, unix seconds.
    pub not_after: u64,
    /// The gateway's clock when it answered, unix seconds; a device without a
    /// real-time clock can set its clock from this and `received_at_ms`.
    pub gateway_time: u64,
    /// The caller's `now_ms` when the reply arrived.
    pub received_at_ms: u64,
    /// Suggested renewal window start, unix seconds.
    pub renew_after: u64,
    /// Suggested renewal window end, unix seconds.
    pub renew_before: u64,
}

/// A final rejection: the gateway's code and message.
#[derive(Clone, PartialEq, Eq)]
pub struct Rejection {
    code: heapless::String<MAX_REJECT_CODE>,
    message: heapless::String<MAX_REJECT_MESSAGE>,
}

impl Rejection {
    fn from_reply(reply: &Rejected<'_>) -> Rejection {
        Rejection {
            code: truncated(reply.code),
            message: truncated(reply.message),
        }
    }

    /// The code, if this version of the protocol knows it.
    pub fn code(&self) -> Option<RejectCode> {
        RejectCode::parse(&self.code)
    }

    /// The code as sent (cut to [`MAX_REJECT_CODE`] bytes).
    pub fn code_str(&self) -> &str {
        &self.code
    }

    /// The human-readable message (cut to [`MAX_REJECT_MESSAGE`] bytes).
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Debug for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rejection")
            .field("code", &self.code.as_str())
            .field("message", &self.message.as_str())
            .finish()
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// Copies as much of `s` as fits, cutting at a character boundary.
fn truncated<const N: usize>(s: &str) -> heapless::String<N> {
    let mut end = s.len().min(N);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = heapless::String::new();
    // `end` is at most N bytes, the capacity.
    let _ = out.push_str(&s[..end]);
    out
}

mod sealed {
    use idgate_pki::protocol::Issued;

    use crate::error::PeerError;

    pub trait Sealed {}

    /// How a finished request holds what it keeps of the reply.
    pub trait Storage {
        /// Nothing kept yet: lengths only, so it is put in place cheaply.
        fn empty() -> Self;
        /// Keeps what it keeps of a reply that passed every check.
        fn fill(&mut self, issued: &Issued<'_>) -> Result<(), PeerError>;
        fn certificate(&self) -> Option<&[u8]>;
        fn chain(&self) -> impl Iterator<Item = &[u8]>;
        fn serial(&self) -> &super::Serial;
    }
}

/// What a certified [`Exchange`] keeps of the reply: a copy of the
/// certificate and chain ([`KeepCopy`], the default, 3 KiB), or only the
/// serial ([`KeepSerial`]), for a caller that takes the certificate and chain
/// from the very payload it handed to
/// [`handle_message`](Exchange::handle_message), which certified the request.
/// Sealed.
pub trait Keep: sealed::Storage {}

/// What kind of certificate request an [`Exchange`] makes: [`Enroll`](crate::Enroll)
/// or [`Renew`](crate::Renew). Sealed: the protocol defines the kinds.
pub trait RequestKind: sealed::Sealed {
    /// The operation, which names the topics.
    const OP: Op;
    /// For `Debug` output.
    const NAME: &'static str;
    /// The event a successful request ends with.
    fn certified(certified: Certified) -> Event;
}

impl sealed::Sealed for crate::Enroll {}
impl sealed::Sealed for crate::Renew {}

/// The issuer certificates of a reply, packed into one fixed buffer.
#[derive(Clone, Debug, Default)]
struct Chain {
    bytes: heapless::Vec<u8, MAX_CHAIN_BYTES>,
    ends: heapless::Vec<u16, MAX_CHAIN>,
}

impl Chain {
    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let bytes = &self.bytes[..];
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let end = usize::from(end);
            let certificate = bytes.get(start..end).unwrap_or_default();
            start = end;
            certificate
        })
    }
}

/// Waiting for the answer to our request; retransmitting it on timeouts.
struct ExpectCertificate {
    /// The encoded request, sent byte for byte the same every time so the
    /// gateway's idempotence applies.
    request: heapless::Vec<u8, MAX_REQUEST>,
    deadline_ms: u64,
    transmit_pending: bool,
}

/// Keeps a copy of the certificate for our key and its chain once certified
/// (the default: [`Exchange::certificate`] and [`Exchange::chain`] return
/// them). The request's slot is then 3 KiB larger.
#[derive(Debug)]
pub struct KeepCopy {
    certificate: heapless::Vec<u8, MAX_CERTIFICATE>,
    chain: Chain,
    serial: Serial,
}

/// Keeps only the serial once certified: [`Exchange::certificate`] is `None`
/// and [`Exchange::chain`] empty. The caller takes them from the payload that
/// certified the request (decoded again with `Issued::decode_cbor`: same
/// bytes, same certificate, already checked), for instance straight from a
/// receive buffer, and the request's slot is 3 KiB smaller.
#[derive(Debug)]
pub struct KeepSerial {
    serial: Serial,
}

impl Keep for KeepCopy {}
impl Keep for KeepSerial {}

impl sealed::Storage for KeepCopy {
    fn empty() -> Self {
        KeepCopy::empty()
    }
    fn fill(&mut self, issued: &Issued<'_>) -> Result<(), PeerError> {
        KeepCopy::fill(self, issued)
    }
    fn certificate(&self) -> Option<&[u8]> {
        Some(&self.certificate)
    }
    fn chain(&self) -> impl Iterator<Item = &[u8]> {
        self.chain.iter()
    }
    fn serial(&self) -> &Serial {
        &self.serial
    }
}

impl sealed::Storage for KeepSerial {
    fn empty() -> Self {
        KeepSerial {
            serial: Serial::new(),
        }
    }
    fn fill(&mut self, issued: &Issued<'_>) -> Result<(), PeerError> {
        check_reply(issued)?;
        self.serial.clear();
        self.serial
            .push_str(issued.serial)
            .map_err(|_| PeerError::BadSerial)
    }
    fn certificate(&self) -> Option<&[u8]> {
        None
    }
    fn chain(&self) -> impl Iterator<Item = &[u8]> {
        core::iter::empty()
    }
    fn serial(&self) -> &Serial {
        &self.serial
    }
}

/// Checks that what the device keeps of a reply fits and makes sense,
/// without copying anything.
fn check_reply(issued: &Issued<'_>) -> Result<(), PeerError> {
    if issued.certificate.len() > MAX_CERTIFICATE {
        return Err(PeerError::CertificateTooLarge);
    }
    let chain_len: usize = issued.chain.iter().map(|c| c.len()).sum();
    if chain_len > MAX_CHAIN_BYTES || u16::try_from(chain_len).is_err() {
        return Err(PeerError::ChainTooLarge);
    }
    if issued.serial.is_empty()
        || issued.serial.len() > MAX_SERIAL
        || !issued
            .serial
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(PeerError::BadSerial);
    }
    if issued.not_before > issued.not_after || issued.renew_after > issued.renew_before {
        return Err(PeerError::BadValidity);
    }
    Ok(())
}

impl KeepCopy {
    /// An empty certificate: the buffers' lengths only, so it can be put in
    /// place without copying kilobytes.
    const fn empty() -> KeepCopy {
        KeepCopy {
            certificate: heapless::Vec::new(),
            chain: Chain {
                bytes: heapless::Vec::new(),
                ends: heapless::Vec::new(),
            },
            serial: Serial::new(),
        }
    }

    /// Copies what the device keeps out of a reply that passed
    /// [`check_reply`](Self::check_reply), into `self` (in place: the
    /// buffers are a few KiB, and a small MCU's stack should hold one copy).
    fn fill(&mut self, issued: &Issued<'_>) -> Result<(), PeerError> {
        check_reply(issued)?;
        self.certificate.clear();
        self.certificate
            .extend_from_slice(issued.certificate)
            .map_err(|_| PeerError::CertificateTooLarge)?;
        self.chain.bytes.clear();
        self.chain.ends.clear();
        for certificate in &issued.chain {
            self.chain
                .bytes
                .extend_from_slice(certificate)
                .map_err(|_| PeerError::ChainTooLarge)?;
            let end =
                u16::try_from(self.chain.bytes.len()).map_err(|_| PeerError::ChainTooLarge)?;
            self.chain
                .ends
                .push(end)
                .map_err(|_| PeerError::ChainTooLarge)?;
        }
        self.serial.clear();
        self.serial
            .push_str(issued.serial)
            .map_err(|_| PeerError::BadSerial)?;
        Ok(())
    }

    /// Copies what the device keeps out of a reply, or says why it cannot.
    #[cfg(test)]
    fn from_reply(issued: &Issued<'_>) -> Result<KeepCopy, PeerError> {
        let mut done = KeepCopy::empty();
        done.fill(issued)?;
        Ok(done)
    }
}

// The states share one region of memory: the request buffer while waiting, the
// certificate buffers once certified. Without a heap there is nothing to box into.
#[allow(clippy::large_enum_variant, reason = "no heap; variants share memory")]
enum State<S> {
    ExpectCertificate(ExpectCertificate),
    Certified(S),
    Rejected,
    GaveUp,
}

/// One certificate request, from a fresh key to a certificate for it. Use it
/// through its kinds, [`Enrollment`](crate::Enrollment) and
/// [`Renewal`](crate::Renewal), which add the `start` that builds the request.
///
/// Drive it like this: publish nothing until the [`subscriptions`](Self::subscriptions)
/// are acknowledged, then loop: send everything [`poll_transmit`](Self::poll_transmit)
/// hands out, feed every message received to [`handle_message`](Self::handle_message),
/// call [`handle_timeout`](Self::handle_timeout) once [`poll_timeout`](Self::poll_timeout)
/// has passed, and stop at the first [`poll_event`](Self::poll_event).
///
/// `K` may be a `&mut` to a key store. The whole machine lives in a few KiB of
/// fixed buffers (see [`MAX_CERTIFICATE`], [`MAX_CHAIN_BYTES`], [`MAX_REQUEST`]);
/// `S` says what it keeps of the reply once certified ([`Keep`]).
pub struct Exchange<K, R, S = KeepCopy> {
    key_store: K,
    device_id: heapless::String<MAX_ID>,
    rid: Rid,
    /// The key being certified (generated into the Next slot at start).
    public_key: P256PublicKey,
    request_topic: TopicName,
    reply_topics: [TopicName; 2],
    retry: RetryPolicy,
    jitter: Jitter,
    /// The pinned roots a certificate's chain must lead to.
    anchors: Anchors,
    /// Transmissions handed out or pending, the first included.
    attempts: u32,
    state: State<S>,
    events: heapless::Deque<Event, 2>,
    ignored: u32,
    kind: PhantomData<fn() -> R>,
}

impl<K: KeyStore, R: RequestKind, S: Keep> Exchange<K, R, S> {
    /// What every `start` does: checks the device id and the retry policy,
    /// generates a fresh key in the key store's staging slot and builds a CSR for
    /// it (CN = device id, signed with that key). `encode` then writes the
    /// request around the CSR; the first transmission is ready at once.
    ///
    /// The machine is written into `slot` (replacing what it held) rather
    /// than returned: it is a few KiB, and returning it by value costs a
    /// small MCU's stack a second copy. On an error `slot` is left as it was.
    #[expect(
        clippy::too_many_arguments,
        reason = "the slot, then what every kind of request shares"
    )]
    pub(crate) fn begin_in(
        slot: &mut Option<Exchange<K, R, S>>,
        device_id: &str,
        retry: RetryPolicy,
        pinned_roots: &[&[u8]],
        mut key_store: K,
        rid: Rid,
        now_ms: u64,
        encode: impl FnOnce(&mut K, &Rid, &[u8], &mut [u8; MAX_REQUEST]) -> Result<usize, Error>,
    ) -> Result<(), Error> {
        check_device_id(device_id).map_err(UsageError::BadDeviceId)?;
        retry.check()?;
        check_roots(pinned_roots)?;
        // Three steps, the last two not inlined: the deep one (key
        // generation and signing) runs while the caller's frame holds only
        // the request, not the topics and anchors the machine is made of.
        let mut request = [0u8; MAX_REQUEST];
        let (public_key, len) =
            Self::sign_request(device_id, &mut key_store, &rid, encode, &mut request)?;
        let request = request.get(..len).unwrap_or_default();
        Self::place(
            slot,
            device_id,
            retry,
            pinned_roots,
            key_store,
            rid,
            now_ms,
            public_key,
            request,
        )
    }

    /// Generates the key in the staging slot, builds and signs the CSR, and
    /// has `encode` write the request around it into `request`.
    #[inline(never)]
    fn sign_request(
        device_id: &str,
        key_store: &mut K,
        rid: &Rid,
        encode: impl FnOnce(&mut K, &Rid, &[u8], &mut [u8; MAX_REQUEST]) -> Result<usize, Error>,
        request: &mut [u8; MAX_REQUEST],
    ) -> Result<(P256PublicKey, usize), Error> {
        let public_key = key_store
            .generate_next()
            .map_err(|e| key_error(KeyOperation::Generate, &e))?;
        let mut csr = [0u8; MAX_P256_CSR];
        let csr_len = build_p256_csr(
            device_id,
            &public_key,
            |digest| key_store.sign_digest(KeySlot::Next, digest),
            &mut csr,
        )
        .map_err(|e| match e {
            CsrError::Sign(e) => key_error(KeyOperation::Sign, &e),
            CsrError::BadPublicKey => HardwareError::BadPublicKey.into(),
            // A checked device id (≤ 64 bytes) always fits MAX_P256_CSR.
            CsrError::BufferTooSmall => UsageError::BadDeviceId(IdError::TooLong).into(),
        })?;
        let len = encode(key_store, rid, &csr[..csr_len], request)?;
        if len > MAX_REQUEST {
            return Err(UsageError::BadRid(IdError::TooLong).into());
        }
        Ok((public_key, len))
    }

    /// Builds the machine in `slot` around a signed request.
    #[inline(never)]
    #[expect(
        clippy::too_many_arguments,
        reason = "the slot, then what the machine is made of"
    )]
    fn place(
        slot: &mut Option<Exchange<K, R, S>>,
        device_id: &str,
        retry: RetryPolicy,
        pinned_roots: &[&[u8]],
        key_store: K,
        rid: Rid,
        now_ms: u64,
        public_key: P256PublicKey,
        request: &[u8],
    ) -> Result<(), Error> {
        let mut anchors = Anchors::new();
        for root in pinned_roots {
            let anchor = Anchor::from_der(root).map_err(|_| UsageError::BadPinnedRoots)?;
            anchors
                .push(anchor)
                .map_err(|_| UsageError::BadPinnedRoots)?;
        }
        let too_long = |_| UsageError::BadDeviceId(IdError::TooLong);
        let topic = Topic::request(device_id, R::OP, Format::Cbor);
        let request_topic = topic.to_heapless().map_err(too_long)?;
        let reply_topics = [
            topic
                .with_reply(Reply::Accepted)
                .to_heapless()
                .map_err(too_long)?,
            topic
                .with_reply(Reply::Rejected)
                .to_heapless()
                .map_err(too_long)?,
        ];
        let mut id = heapless::String::new();
        id.push_str(device_id)
            .map_err(|_| UsageError::BadDeviceId(IdError::TooLong))?;

        let mut jitter = Jitter::seeded_from(rid.as_str().as_bytes());
        let deadline_ms = now_ms.saturating_add(retry.timeout_ms(1, &mut jitter));
        debug!("{}: request ready, rid {}", R::OP.as_str(), rid.as_str());
        *slot = Some(Exchange {
            key_store,
            device_id: id,
            rid,
            public_key,
            request_topic,
            reply_topics,
            retry,
            jitter,
            anchors,
            attempts: 1,
            // Filled in place below: a `State` built here would be a
            // temporary of its largest variant.
            state: State::GaveUp,
            events: heapless::Deque::new(),
            ignored: 0,
            kind: PhantomData,
        });
        if let Some(exchange) = slot.as_mut() {
            exchange.state = State::ExpectCertificate(ExpectCertificate {
                request: heapless::Vec::new(),
                deadline_ms,
                transmit_pending: true,
            });
            if let State::ExpectCertificate(waiting) = &mut exchange.state {
                // Checked by `sign_request`: the request fits.
                let _ = waiting.request.extend_from_slice(request);
            }
        }
        Ok(())
    }

    /// The topics to subscribe to (accepted, rejected) before the first transmission.
    pub fn subscriptions(&self) -> &[TopicName; 2] {
        &self.reply_topics
    }

    /// The topic requests are published on.
    pub fn request_topic(&self) -> &str {
        &self.request_topic
    }

    /// The device id.
    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// The request id.
    pub fn rid(&self) -> &Rid {
        &self.rid
    }

    /// The public key being certified (in the Next slot until certified, then current).
    pub fn public_key(&self) -> &P256PublicKey {
        &self.public_key
    }

    /// How many times the request has been handed out for sending, or is about
    /// to be (the first transmission included). Kept after the request ends.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Whether the request has ended, one way or another.
    pub fn is_finished(&self) -> bool {
        !matches!(self.state, State::ExpectCertificate(_))
    }

    /// How many incoming messages were ignored (each also returned an error).
    pub fn ignored_messages(&self) -> u32 {
        self.ignored
    }

    /// The issued certificate (DER), once certified.
    pub fn certificate(&self) -> Option<&[u8]> {
        match &self.state {
            State::Certified(done) => done.certificate(),
            _ => None,
        }
    }

    /// The issuer certificates (DER), issuer of the device certificate first;
    /// empty until certified.
    pub fn chain(&self) -> impl Iterator<Item = &[u8]> {
        let chain = match &self.state {
            State::Certified(done) => Some(done.chain()),
            _ => None,
        };
        chain.into_iter().flatten()
    }

    /// The serial of the issued certificate, once certified.
    pub fn serial(&self) -> Option<&str> {
        match &self.state {
            State::Certified(done) => Some(done.serial()),
            _ => None,
        }
    }

    /// The key store.
    pub fn key_store(&self) -> &K {
        &self.key_store
    }

    /// The key store, for other work while the request runs (signing with the
    /// current key, say). Leave the Next slot alone until the request ends.
    pub fn key_store_mut(&mut self) -> &mut K {
        &mut self.key_store
    }

    /// Ends the request and gives the key store back.
    pub fn into_key_store(self) -> K {
        self.key_store
    }

    /// The next message to publish, written into `buf`. The request is handed out
    /// once per attempt.
    pub fn poll_transmit(&mut self, buf: &mut [u8; MAX_REQUEST]) -> Option<Transmit> {
        let State::ExpectCertificate(waiting) = &mut self.state else {
            return None;
        };
        if !waiting.transmit_pending {
            return None;
        }
        waiting.transmit_pending = false;
        let len = waiting.request.len();
        buf[..len].copy_from_slice(&waiting.request);
        trace!("{}: transmit attempt {}", R::OP.as_str(), self.attempts);
        Some(Transmit {
            topic: self.request_topic.clone(),
            len,
            attempt: self.attempts,
        })
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called, in
    /// the caller's milliseconds; `None` once finished.
    pub fn poll_timeout(&self) -> Option<u64> {
        match &self.state {
            State::ExpectCertificate(waiting) => Some(waiting.deadline_ms),
            _ => None,
        }
    }

    /// Advances the clock: retransmits, or gives up after the last attempt.
    /// Calling it early does nothing.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        let State::ExpectCertificate(waiting) = &mut self.state else {
            return;
        };
        if now_ms < waiting.deadline_ms {
            return;
        }
        if self.attempts >= self.retry.max_attempts {
            let attempts = self.attempts;
            warn!(
                "{}: no answer after {} attempts, giving up",
                R::OP.as_str(),
                attempts
            );
            self.finish(State::GaveUp, Event::GaveUp { attempts });
            return;
        }
        self.attempts += 1;
        waiting.transmit_pending = true;
        let timeout = self.retry.timeout_ms(self.attempts, &mut self.jitter);
        waiting.deadline_ms = now_ms.saturating_add(timeout);
        debug!(
            "{}: no answer, retransmitting (attempt {})",
            R::OP.as_str(),
            self.attempts
        );
    }

    /// Takes a message received on any topic. `Ok` if it answered our request
    /// (including a transient rejection, after which the agent keeps retrying);
    /// `Err(Error::Peer(_))` if it was ignored; `Err(Error::Hardware(_))` if the
    /// certificate was good but the key store failed to promote the key (the agent
    /// keeps waiting, and the next retransmission fetches the same certificate).
    pub fn handle_message(
        &mut self,
        now_ms: u64,
        topic: &str,
        payload: &[u8],
    ) -> Result<(), Error> {
        let result = self.dispatch(now_ms, topic, payload);
        if let Err(Error::Peer(reason)) = &result {
            self.ignored = self.ignored.saturating_add(1);
            let _ = reason;
            debug!(
                "{}: ignored a message ({} so far)",
                R::OP.as_str(),
                self.ignored
            );
        }
        result
    }

    /// The next event; each request produces exactly one.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn dispatch(&mut self, now_ms: u64, topic: &str, payload: &[u8]) -> Result<(), Error> {
        let topic = Topic::parse(topic).ok_or(PeerError::UnknownTopic)?;
        if topic.device_id != self.device_id.as_str() {
            return Err(PeerError::OtherDevice.into());
        }
        if topic.op != R::OP || topic.format != Format::Cbor {
            return Err(PeerError::NotOurReply.into());
        }
        let State::ExpectCertificate(_) = &self.state else {
            return Err(PeerError::Finished.into());
        };
        match topic.reply {
            Some(Reply::Accepted) => self.on_accepted(now_ms, payload),
            Some(Reply::Rejected) => self.on_rejected(payload),
            None => Err(PeerError::NotOurReply.into()),
        }
    }

    fn on_accepted(&mut self, now_ms: u64, payload: &[u8]) -> Result<(), Error> {
        let issued = Issued::decode_cbor(payload)?;
        if issued.rid != self.rid.as_str() {
            return Err(PeerError::OtherRid.into());
        }
        let spki = certificate_spki(issued.certificate).map_err(PeerError::BadCertificate)?;
        if spki != p256_spki(&self.public_key) {
            warn!("{}: certificate for another key ignored", R::OP.as_str());
            return Err(PeerError::WrongKey.into());
        }
        check_reply(&issued)?;
        // The costly check last: two ECDSA verifications on a small MCU. It
        // reads the reply in place; nothing is copied before it passed.
        if let Err(e) = chain::verify(
            issued.certificate,
            issued.chain.iter().copied(),
            &self.anchors,
        ) {
            warn!("{}: certificate chain not trusted", R::OP.as_str());
            return Err(PeerError::Chain(e).into());
        }
        // Only now is the new key worth keeping; before this the old one (if any)
        // stays current.
        self.key_store
            .promote_next()
            .map_err(|e| key_error(KeyOperation::Promote, &e))?;
        // Switch state in place, then copy: the checks above make the copy
        // infallible, so the request buffer is not needed any more.
        self.state = State::Certified(S::empty());
        let State::Certified(done) = &mut self.state else {
            return Err(PeerError::Finished.into());
        };
        done.fill(&issued)?;
        info!(
            "{}: certified, serial {}",
            R::OP.as_str(),
            done.serial().as_str()
        );
        let event = R::certified(Certified {
            serial: done.serial().clone(),
            not_before: issued.not_before,
            not_after: issued.not_after,
            gateway_time: issued.time,
            received_at_ms: now_ms,
            renew_after: issued.renew_after,
            renew_before: issued.renew_before,
        });
        // There is one final event per request and room for two.
        let _ = self.events.push_back(event);
        Ok(())
    }

    fn on_rejected(&mut self, payload: &[u8]) -> Result<(), Error> {
        let rejected = Rejected::decode_cbor(payload)?;
        // An empty rid means the gateway could not read a request; ours is always
        // readable, so such a rejection answers someone else's bytes.
        if rejected.rid != self.rid.as_str() {
            return Err(PeerError::OtherRid.into());
        }
        match rejected.reject_code() {
            Some(code) if code.is_transient() => {
                // The gateway asks us to come back later with the same rid: the
                // running retransmission timer does just that.
                debug!("{}: transient rejection, will retry", R::OP.as_str());
                Ok(())
            }
            _ => {
                // The staged key stays in the Next slot, unused; the next
                // request's generate_next replaces it.
                warn!("{}: rejected: {}", R::OP.as_str(), rejected.code);
                self.finish(
                    State::Rejected,
                    Event::Rejected(Rejection::from_reply(&rejected)),
                );
                Ok(())
            }
        }
    }

    // Inlined so the state is written in place: passed by value, a `State`
    // is a 3 KiB temporary on a small MCU's stack.
    #[inline(always)]
    fn finish(&mut self, state: State<S>, event: Event) {
        self.state = state;
        // There is one final event per request and room for two.
        let _ = self.events.push_back(event);
    }
}

/// Checks that the pinned roots are one or two certificates the agent can
/// verify with, before a key is generated; `place` parses them again into
/// the machine (cheap next to key generation, and keeps the two apart).
#[inline(never)]
fn check_roots(pinned_roots: &[&[u8]]) -> Result<(), UsageError> {
    if pinned_roots.is_empty() || pinned_roots.len() > crate::chain::MAX_PINNED_ROOTS {
        return Err(UsageError::BadPinnedRoots);
    }
    for root in pinned_roots {
        Anchor::from_der(root).map_err(|_| UsageError::BadPinnedRoots)?;
    }
    Ok(())
}

/// A key store failure as the agent reports it.
pub(crate) fn key_error(operation: KeyOperation, e: &impl idgate_hal::Error) -> Error {
    HardwareError::KeyStore {
        operation,
        kind: e.kind(),
    }
    .into()
}

impl<K, R: RequestKind, S> fmt::Debug for Exchange<K, R, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::ExpectCertificate(_) => "ExpectCertificate",
            State::Certified(_) => "Certified",
            State::Rejected => "Rejected",
            State::GaveUp => "GaveUp",
        };
        f.debug_struct(R::NAME)
            .field("device_id", &self.device_id.as_str())
            .field("rid", &self.rid)
            .field("state", &state)
            .field("ignored", &self.ignored)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_respects_characters() {
        let s: heapless::String<4> = truncated("abcé");
        assert_eq!(s.as_str(), "abc");
        let s: heapless::String<5> = truncated("abcé");
        assert_eq!(s.as_str(), "abcé");
        let s: heapless::String<4> = truncated("ab");
        assert_eq!(s.as_str(), "ab");
    }

    #[test]
    fn chains_unpack_in_order() {
        let mut chain_in = heapless::Vec::new();
        chain_in.push(&[1u8, 2, 3][..]).unwrap();
        chain_in.push(&[4u8][..]).unwrap();
        let issued = Issued {
            rid: "r",
            certificate: &[0x30, 0],
            chain: chain_in,
            serial: "01ab",
            not_before: 1,
            not_after: 2,
            time: 1,
            renew_after: 1,
            renew_before: 2,
        };
        let done = KeepCopy::from_reply(&issued).unwrap();
        let mut chain = done.chain.iter();
        assert_eq!(chain.next(), Some(&[1u8, 2, 3][..]));
        assert_eq!(chain.next(), Some(&[4u8][..]));
        assert_eq!(chain.next(), None);

        for (serial, ok) in [("", false), ("01AB", false), ("0g", false), ("00ff", true)] {
            let issued = Issued {
                serial,
                ..issued.clone()
            };
            assert_eq!(KeepCopy::from_reply(&issued).is_ok(), ok, "{serial}");
        }
        let long = [b'a'; MAX_SERIAL + 1];
        let long = core::str::from_utf8(&long).unwrap();
        let issued_long = Issued {
            serial: long,
            ..issued.clone()
        };
        assert_eq!(
            KeepCopy::from_reply(&issued_long).err(),
            Some(PeerError::BadSerial)
        );
        let backwards = Issued {
            not_before: 3,
            ..issued.clone()
        };
        assert_eq!(
            KeepCopy::from_reply(&backwards).err(),
            Some(PeerError::BadValidity)
        );
        let big = [0u8; MAX_CERTIFICATE + 1];
        let too_big = Issued {
            certificate: &big,
            ..issued.clone()
        };
        assert_eq!(
            KeepCopy::from_reply(&too_big).err(),
            Some(PeerError::CertificateTooLarge)
        );
        let big_chain = [0u8; MAX_CHAIN_BYTES / 2 + 1];
        let mut chain_in = heapless::Vec::new();
        chain_in.push(&big_chain[..]).unwrap();
        chain_in.push(&big_chain[..]).unwrap();
        let too_big = Issued {
            chain: chain_in,
            ..issued
        };
        assert_eq!(
            KeepCopy::from_reply(&too_big).err(),
            Some(PeerError::ChainTooLarge)
        );
    }
}
