//! A fake gateway for tests, sans-IO: topic and payload in, reply out. It does
//! what the real gateway promises devices and nothing more: checks the
//! enrollment proof, or the renewal's certificate, signature (ECDSA-SHA256 by
//! the key of the certificate it issued) and counter; checks the CSR; issues
//! with rcgen from its own CA; answers a repeated rid with the very same bytes.
//! The agent's sans-IO tests call it directly; the simulator's MQTT tests put it
//! behind a broker.
//!
//! It is a test double: no registry, no revocation, every device id is known,
//! and the times in its replies are fixed ([`NOT_AFTER`] and friends).

use std::collections::{HashMap, VecDeque};
use std::sync::OnceLock;

use idgate_pki::protocol::{
    EnrollRequest, Issued, MAX_RENEW_MESSAGE, Op, Rejected, RenewRequest, Reply, Topic,
    renew_message, verify_enrollment_proof,
};
use p256::ecdsa::signature::Verifier;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256,
    PublicKeyData, SerialNumber, SignatureAlgorithm,
};
use x509_parser::prelude::FromDer;

/// `not_before` in every accepted reply.
pub const NOT_BEFORE: u64 = 1_700_000_000;
/// `not_after` in every accepted reply.
pub const NOT_AFTER: u64 = 1_700_086_400;
/// `time` in every accepted reply.
pub const GATEWAY_TIME: u64 = 1_700_000_300;

/// What the fake gateway does with a new request (not with a repeated rid,
/// which gets the first answer again).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Check the request and issue if it passes, as the real gateway would.
    Issue,
    /// Reject with this code, whatever the request.
    Reject(&'static str),
    /// Ignore the request: a lost message.
    Drop,
}

/// A P-256 public key taken from a CSR, in the form rcgen signs for.
struct RawKey(Vec<u8>);

impl PublicKeyData for RawKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

/// The test CA's certificate parameters (the same every time, so an issuer
/// can be rebuilt around a stored key).
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new())
        .expect("no subject alternative names to check");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "fake gateway CA");
    params
}

/// The fake gateway. See the module documentation.
pub struct FakeGateway {
    token: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
    ca_der: Vec<u8>,
    ca_pem: String,
    /// Answers for the next new requests, in order; [`Answer::Issue`] once empty.
    pub answers: VecDeque<Answer>,
    replies: HashMap<String, (String, Vec<u8>)>,
    /// Certificates issued, by serial: (device id, DER).
    certificates: HashMap<String, (String, Vec<u8>)>,
    counters: HashMap<String, u64>,
    next_serial: u64,
    /// How many certificates were issued.
    pub issued: usize,
    /// How many requests arrived, repeated ones included.
    pub requests: usize,
    /// The gateway's clock, unix seconds. `None`: the fixed times
    /// ([`NOT_BEFORE`], [`NOT_AFTER`], [`GATEWAY_TIME`]) in every reply. Set,
    /// replies carry it, `not_before` 5 minutes earlier, `not_after`
    /// [`lifetime`](Self::lifetime) later and a renewal window at 50–70 %.
    pub clock: Option<u64>,
    /// Certificate lifetime in seconds when [`clock`](Self::clock) is set.
    pub lifetime: u64,
    /// With a clock: how long after `not_after` a certificate may still
    /// renew (`None`: forever); later renewals get `expired`.
    pub grace: Option<u64>,
    /// `not_after` of each certificate issued with a clock, by serial.
    expiries: HashMap<String, u64>,
}

impl std::fmt::Debug for FakeGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeGateway")
            .field("issued", &self.issued)
            .field("requests", &self.requests)
            .finish_non_exhaustive()
    }
}

impl FakeGateway {
    /// A gateway that accepts `token` as every device's enrollment token,
    /// signing with the process-wide test CA ([`shared_ca_der`](Self::shared_ca_der)),
    /// so a device can pin that root before the gateway exists. Serials count
    /// up from `010203`.
    pub fn new(token: &str) -> FakeGateway {
        static SHARED: OnceLock<(Vec<u8>, Vec<u8>, String)> = OnceLock::new();
        let (key_der, ca_der, ca_pem) = SHARED.get_or_init(|| {
            let key = KeyPair::generate().expect("P-256 key generation");
            let ca = ca_params().self_signed(&key).expect("self-signing the CA");
            (key.serialize_der(), ca.der().to_vec(), ca.pem())
        });
        let key = KeyPair::try_from(key_der.as_slice()).expect("the shared CA key");
        FakeGateway::with_ca(token, key, ca_der.clone(), ca_pem.clone())
    }

    /// A gateway with a CA of its own, which no device pins: an impostor.
    pub fn with_own_ca(token: &str) -> FakeGateway {
        let key = KeyPair::generate().expect("P-256 key generation");
        let ca = ca_params().self_signed(&key).expect("self-signing the CA");
        FakeGateway::with_ca(token, key, ca.der().to_vec(), ca.pem())
    }

    /// The root every [`FakeGateway::new`] in this process signs with, DER.
    pub fn shared_ca_der() -> Vec<u8> {
        FakeGateway::new("").ca_der
    }

    fn with_ca(token: &str, key: KeyPair, ca_der: Vec<u8>, ca_pem: String) -> FakeGateway {
        FakeGateway {
            token: token.as_bytes().to_vec(),
            ca_der,
            ca_pem,
            issuer: Issuer::new(ca_params(), key),
            answers: VecDeque::new(),
            replies: HashMap::new(),
            certificates: HashMap::new(),
            counters: HashMap::new(),
            next_serial: 0x01_0203,
            issued: 0,
            requests: 0,
            clock: None,
            lifetime: 86_400,
            grace: None,
            expiries: HashMap::new(),
        }
    }

    /// (not_before, not_after, time, renew_after, renew_before) of a reply.
    fn reply_times(&self) -> (u64, u64, u64, u64, u64) {
        match self.clock {
            None => (
                NOT_BEFORE,
                NOT_AFTER,
                GATEWAY_TIME,
                NOT_BEFORE + 43_200,
                NOT_BEFORE + 69_120,
            ),
            Some(now) => {
                let not_before = now.saturating_sub(300);
                let not_after = now + self.lifetime;
                let span = not_after - not_before;
                (
                    not_before,
                    not_after,
                    now,
                    not_before + span / 2,
                    not_before + span * 7 / 10,
                )
            }
        }
    }

    /// The CA certificate, DER; the whole chain of every reply.
    pub fn ca_der(&self) -> &[u8] {
        &self.ca_der
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The CA, to sign other certificates (a TLS server's) with.
    pub fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// The highest renewal counter accepted from `device_id`.
    pub fn counter(&self, device_id: &str) -> Option<u64> {
        self.counters.get(device_id).copied()
    }

    /// Pretends `device_id` renewed with `counter` before.
    pub fn set_counter(&mut self, device_id: &str, counter: u64) {
        self.counters.insert(device_id.to_owned(), counter);
    }

    /// A certificate for `public_key` (uncompressed P-256 point) with CN
    /// `device_id`, valid between the two unix times, and its serial; the
    /// gateway does not record it, so to it this is a forgery.
    pub fn forge(
        &mut self,
        device_id: &str,
        public_key: &[u8],
        validity: (i64, i64),
    ) -> (Vec<u8>, String) {
        let mut params = CertificateParams::new(Vec::<String>::new())
            .expect("no subject alternative names to check");
        params
            .distinguished_name
            .push(DnType::CommonName, device_id);
        let serial = self.next_serial.to_be_bytes();
        self.next_serial += 1;
        let serial = &serial[serial.iter().position(|&b| b != 0).unwrap_or(7)..];
        params.serial_number = Some(SerialNumber::from_slice(serial));
        let time = |t| time::OffsetDateTime::from_unix_timestamp(t).expect("a valid unix time");
        params.not_before = time(validity.0);
        params.not_after = time(validity.1);
        let certificate = params
            .signed_by(&RawKey(public_key.to_vec()), &self.issuer)
            .expect("signing a certificate");
        let hex = serial.iter().map(|b| format!("{b:02x}")).collect();
        (certificate.der().to_vec(), hex)
    }

    /// Like [`forge`](Self::forge), but recorded as issued to `device_id`, so
    /// the device can renew with it.
    pub fn issue(
        &mut self,
        device_id: &str,
        public_key: &[u8],
        validity: (i64, i64),
    ) -> (Vec<u8>, String) {
        let (certificate, serial) = self.forge(device_id, public_key, validity);
        self.certificates
            .insert(serial.clone(), (device_id.to_owned(), certificate.clone()));
        self.issued += 1;
        (certificate, serial)
    }

    /// An accepted reply for `rid` carrying `certificate`, with the fixed times.
    pub fn issued_reply(&self, rid: &str, certificate: &[u8], serial: &str) -> Vec<u8> {
        let mut chain = heapless::Vec::new();
        let _ = chain.push(&self.ca_der[..]);
        let (not_before, not_after, time, renew_after, renew_before) = self.reply_times();
        encode(|out| {
            Issued {
                rid,
                certificate,
                chain,
                serial,
                not_before,
                not_after,
                time,
                renew_after,
                renew_before,
            }
            .encode_cbor(out)
        })
    }

    /// Like [`issued_reply`](Self::issued_reply) with another chain.
    pub fn issued_reply_with_chain(
        &self,
        rid: &str,
        certificate: &[u8],
        serial: &str,
        chain: &[&[u8]],
    ) -> Vec<u8> {
        let mut list = heapless::Vec::new();
        for certificate in chain {
            let _ = list.push(*certificate);
        }
        let (not_before, not_after, time, renew_after, renew_before) = self.reply_times();
        encode(|out| {
            Issued {
                rid,
                certificate,
                chain: list,
                serial,
                not_before,
                not_after,
                time,
                renew_after,
                renew_before,
            }
            .encode_cbor(out)
        })
    }

    /// A rejection of `rid` with `code`.
    pub fn rejected_reply(rid: &str, code: &str) -> Vec<u8> {
        encode(|out| {
            Rejected {
                rid,
                code,
                message: "fake gateway says no",
            }
            .encode_cbor(out)
        })
    }

    /// Handles a message published on `topic`: the reply topic and payload, or
    /// `None` if it is not a request (or an undecodable one, or
    /// [`Answer::Drop`]).
    pub fn handle(&mut self, topic: &str, payload: &[u8]) -> Option<(String, Vec<u8>)> {
        let topic = Topic::parse(topic).filter(|topic| topic.reply.is_none())?;
        self.requests += 1;
        let device_id = topic.device_id;
        let (rid, checked) = match topic.op {
            Op::Enroll => {
                let request = EnrollRequest::decode_cbor(payload).ok()?;
                let proven = verify_enrollment_proof(&self.token, request.csr, request.proof);
                (
                    request.rid,
                    proven.then_some(request.csr).ok_or("bad_proof"),
                )
            }
            Op::Renew => {
                let request = RenewRequest::decode_cbor(payload).ok()?;
                let checked = self.check_renewal(device_id, &request);
                (request.rid, checked.map(|()| request.csr))
            }
            _ => return None,
        };
        if let Some(reply) = self.replies.get(rid) {
            return Some(reply.clone());
        }
        let answer = self.answers.pop_front().unwrap_or(Answer::Issue);
        let csr_key = checked.and_then(|csr| csr_public_key(device_id, csr).ok_or("bad_csr"));
        let (reply, body) = match (answer, csr_key) {
            (Answer::Drop, _) => return None,
            (Answer::Reject(code), _) | (Answer::Issue, Err(code)) => {
                (Reply::Rejected, Self::rejected_reply(rid, code))
            }
            (Answer::Issue, Ok(public_key)) => {
                let validity = match self.clock {
                    Some(_) => {
                        let (not_before, not_after, ..) = self.reply_times();
                        (not_before as i64, not_after as i64)
                    }
                    None => (0, 4_102_444_800),
                };
                let (certificate, serial) = self.issue(device_id, &public_key, validity);
                if let Ok(request) = RenewRequest::decode_cbor(payload) {
                    self.counters.insert(device_id.to_owned(), request.counter);
                }
                if self.clock.is_some() {
                    let (_, not_after, ..) = self.reply_times();
                    self.expiries.insert(serial.clone(), not_after);
                }
                (
                    Reply::Accepted,
                    self.issued_reply(rid, &certificate, &serial),
                )
            }
        };
        let reply = (topic.with_reply(reply).to_string(), body);
        // Only final answers are remembered: `internal` asks for a retry.
        if answer != Answer::Reject("internal") {
            self.replies.insert(rid.to_owned(), reply.clone());
        }
        Some(reply)
    }

    /// The renewal checks: a certificate we issued to this device, a signature
    /// by its key over the renewal message, a counter that grew.
    fn check_renewal(
        &self,
        device_id: &str,
        request: &RenewRequest<'_>,
    ) -> Result<(), &'static str> {
        let (owner, certificate) = self
            .certificates
            .get(request.serial)
            .ok_or("unknown_certificate")?;
        if owner != device_id {
            return Err("unknown_certificate");
        }
        if let (Some(now), Some(grace), Some(&not_after)) =
            (self.clock, self.grace, self.expiries.get(request.serial))
            && now > not_after.saturating_add(grace)
        {
            return Err("expired");
        }
        let (_, certificate) = x509_parser::certificate::X509Certificate::from_der(certificate)
            .map_err(|_| "internal")?;
        let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(
            &certificate.public_key().subject_public_key.data,
        )
        .map_err(|_| "internal")?;
        let mut message = [0u8; MAX_RENEW_MESSAGE];
        let len = renew_message(
            device_id,
            request.rid,
            request.csr,
            request.serial,
            request.counter,
            &mut message,
        )
        .map_err(|_| "malformed")?;
        let signature =
            p256::ecdsa::Signature::from_slice(request.sig).map_err(|_| "bad_signature")?;
        // `verify` hashes with SHA-256 itself: ECDSA-SHA256 over the message.
        key.verify(&message[..len], &signature)
            .map_err(|_| "bad_signature")?;
        if self
            .counter(device_id)
            .is_some_and(|last| request.counter <= last)
        {
            return Err("counter_replay");
        }
        Ok(())
    }
}

/// The public key (uncompressed point) of a CSR whose self-signature holds and
/// whose CN is `device_id`.
fn csr_public_key(device_id: &str, csr: &[u8]) -> Option<Vec<u8>> {
    let (rest, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(csr).ok()?;
    csr.verify_signature().ok()?;
    let info = &csr.certification_request_info;
    let cn = info.subject.iter_common_name().next()?;
    (rest.is_empty() && cn.as_str().ok()? == device_id)
        .then(|| info.subject_pki.subject_public_key.data.to_vec())
}

fn encode(
    f: impl FnOnce(&mut [u8]) -> Result<usize, idgate_pki::protocol::EncodeError>,
) -> Vec<u8> {
    let mut out = vec![0u8; 8192];
    // 8 KiB holds any reply this fake builds.
    let n = f(&mut out).unwrap_or(0);
    out.truncate(n);
    out
}
