//! The enrollment wire protocol shared by the gateway and the device agent: topic
//! names, identifier syntax, rejection codes, the enrollment proof and the CBOR
//! codec. `no_std` and heap-free: decoded messages borrow from the payload.
//!
//! `docs/protocol.md` is the normative description; this module is its reference
//! implementation, and the two must agree.

use core::fmt;

use hmac::{Hmac, Mac};
use minicbor::data::Type;
use minicbor::encode::write::{Cursor, EndOfSlice};
use minicbor::{Decoder, Encoder};
use sha2::{Digest, Sha256};

/// Every topic of protocol version 1 starts with this.
pub const TOPIC_PREFIX: &str = "idgate/v1/devices/";
/// Largest request payload the gateway reads; larger ones are rejected `too_large`.
pub const MAX_PAYLOAD: usize = 16 * 1024;
/// Largest CSR (DER) the gateway accepts.
pub const MAX_CSR: usize = 4096;
/// Longest device id and longest request id, in bytes.
pub const MAX_ID: usize = 64;
/// Most certificates a reply's `chain` may hold.
pub const MAX_CHAIN: usize = 4;
/// Length of an enrollment proof (HMAC-SHA256).
pub const PROOF_LEN: usize = 32;
/// Longest topic this version produces: prefix, id, op, format and reply kind.
pub const MAX_TOPIC: usize = TOPIC_PREFIX.len() + MAX_ID + 32;

/// What a request asks for; the `{op}` topic level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Op {
    /// First certificate, proven with a one-time enrollment token.
    Enroll,
    /// Next certificate, for a new key, proven with the current certificate's key.
    Renew,
}

impl Op {
    /// The topic level naming this operation.
    pub const fn as_str(self) -> &'static str {
        match self {
            Op::Enroll => "enroll",
            Op::Renew => "renew",
        }
    }

    fn parse(s: &str) -> Option<Op> {
        match s {
            "enroll" => Some(Op::Enroll),
            "renew" => Some(Op::Renew),
            _ => None,
        }
    }
}

/// The payload encoding; the `{fmt}` topic level. Field names are the same in both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// JSON object; byte fields are base64 (RFC 4648 §4, padded) strings.
    Json,
    /// CBOR map with text keys; byte fields are byte strings.
    Cbor,
}

impl Format {
    /// The topic level naming this format.
    pub const fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Cbor => "cbor",
        }
    }

    fn parse(s: &str) -> Option<Format> {
        match s {
            "json" => Some(Format::Json),
            "cbor" => Some(Format::Cbor),
            _ => None,
        }
    }
}

/// Which answer a reply topic carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reply {
    /// The request succeeded; the payload is the operation's result.
    Accepted,
    /// The request was refused; the payload is a [`Rejected`].
    Rejected,
}

impl Reply {
    /// The topic level naming this reply kind.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reply::Accepted => "accepted",
            Reply::Rejected => "rejected",
        }
    }
}

/// A parsed protocol topic: `idgate/v1/devices/{id}/{op}/{fmt}[/{reply}]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topic<'a> {
    /// The device the topic belongs to (syntax already checked).
    pub device_id: &'a str,
    /// The operation.
    pub op: Op,
    /// The payload encoding.
    pub format: Format,
    /// `None` for a request, the reply kind for a reply.
    pub reply: Option<Reply>,
}

impl<'a> Topic<'a> {
    /// Parses a topic name; `None` if it is not a well-formed v1 protocol topic.
    pub fn parse(topic: &'a str) -> Option<Topic<'a>> {
        Topic::parse_levels(topic.strip_prefix(TOPIC_PREFIX)?)
    }

    /// Parses the levels after [`TOPIC_PREFIX`], `{id}/{op}/{fmt}[/{reply}]`,
    /// wherever they stand (a line station's topics end with them too).
    pub fn parse_levels(rest: &'a str) -> Option<Topic<'a>> {
        let mut levels = rest.split('/');
        let device_id = levels.next()?;
        check_device_id(device_id).ok()?;
        let op = Op::parse(levels.next()?)?;
        let format = Format::parse(levels.next()?)?;
        let reply = match levels.next() {
            None => None,
            Some("accepted") => Some(Reply::Accepted),
            Some("rejected") => Some(Reply::Rejected),
            Some(_) => return None,
        };
        if levels.next().is_some() {
            return None;
        }
        Some(Topic {
            device_id,
            op,
            format,
            reply,
        })
    }

    /// The request topic of `device_id` for `op` in `format`.
    pub fn request(device_id: &'a str, op: Op, format: Format) -> Topic<'a> {
        Topic {
            device_id,
            op,
            format,
            reply: None,
        }
    }

    /// The same topic with `reply` as its reply kind.
    pub fn with_reply(self, reply: Reply) -> Topic<'a> {
        Topic {
            reply: Some(reply),
            ..self
        }
    }

    /// Writes the topic name into a fixed-capacity string.
    pub fn to_heapless(&self) -> Result<heapless::String<MAX_TOPIC>, EncodeError> {
        use core::fmt::Write;
        let mut out = heapless::String::new();
        write!(out, "{self}").map_err(|_| EncodeError::BufferTooSmall)?;
        Ok(out)
    }
}

impl fmt::Display for Topic<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{TOPIC_PREFIX}{}/{}/{}",
            self.device_id,
            self.op.as_str(),
            self.format.as_str()
        )?;
        if let Some(reply) = self.reply {
            write!(f, "/{}", reply.as_str())?;
        }
        Ok(())
    }
}

/// Why an identifier was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdError {
    /// Zero length.
    Empty,
    /// Longer than [`MAX_ID`] bytes.
    TooLong,
    /// A character outside `A–Z a–z 0–9 . _ -`, or a first character that is not a letter or digit.
    BadCharacter,
}

impl fmt::Display for IdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdError::Empty => "is empty",
            IdError::TooLong => "is longer than 64 characters",
            IdError::BadCharacter => {
                "may use only letters, digits, '.', '_' and '-', and must start with a letter or digit"
            }
        })
    }
}

impl core::error::Error for IdError {}

/// Checks the syntax of a device id: 1–64 bytes of `A–Z a–z 0–9 . _ -`, starting
/// with a letter or digit. The set keeps ids safe as MQTT topic levels, file
/// names, URIs and certificate subjects.
pub fn check_device_id(id: &str) -> Result<(), IdError> {
    check_id(id)
}

/// Checks the syntax of a request id (`rid`): the same rules as a device id.
pub fn check_rid(rid: &str) -> Result<(), IdError> {
    check_id(rid)
}

fn check_id(id: &str) -> Result<(), IdError> {
    let bytes = id.as_bytes();
    let first = *bytes.first().ok_or(IdError::Empty)?;
    if bytes.len() > MAX_ID {
        return Err(IdError::TooLong);
    }
    if !first.is_ascii_alphanumeric() {
        return Err(IdError::BadCharacter);
    }
    if bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Ok(())
    } else {
        Err(IdError::BadCharacter)
    }
}

/// Stable, machine-readable reasons for a rejection. New codes may be added; a
/// client must treat a code it does not know as a failure of the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectCode {
    /// The payload could not be decoded, or a field is missing or invalid.
    Malformed,
    /// The payload or the CSR is larger than the gateway accepts.
    TooLarge,
    /// No device with this id is registered.
    UnknownDevice,
    /// The device exists but is not waiting for enrollment.
    DeviceNotPending,
    /// The device's enrollment token has already been used.
    TokenUsed,
    /// The proof does not match the CSR and the device's token.
    BadProof,
    /// The CSR is not a valid PKCS#10 request or its self-signature fails.
    BadCsr,
    /// The CSR's key type, curve or signature algorithm is not accepted.
    WeakKey,
    /// The CSR's public key is already bound to another device.
    KeyReused,
    /// The request id was used before with a different CSR.
    RidConflict,
    /// The gateway could not serve the request; retry later with the same `rid`.
    Internal,
    /// Renewal: `serial` is not a certificate issued to this device.
    UnknownCertificate,
    /// Renewal: `sig` does not verify with the key of certificate `serial`.
    BadSignature,
    /// Renewal: the counter did not grow: a replay or a cloned device. The
    /// device is marked suspect.
    CounterReplay,
    /// Renewal: a second renewal of the same certificate with a different key:
    /// a cloned device. The device is marked suspect.
    CloneSuspected,
    /// Renewal: the certificate has expired longer ago than the grace period.
    Expired,
    /// Renewal: the certificate presented has been revoked or put on hold.
    CertificateRevoked,
    /// The device has been revoked or retired.
    DeviceRevoked,
    /// The device is suspended.
    DeviceSuspended,
    /// The device is marked suspect (possible clone) until an operator clears it.
    DeviceSuspect,
}

impl RejectCode {
    /// Every code, for documentation and tests.
    pub const ALL: [RejectCode; 20] = [
        RejectCode::Malformed,
        RejectCode::TooLarge,
        RejectCode::UnknownDevice,
        RejectCode::DeviceNotPending,
        RejectCode::TokenUsed,
        RejectCode::BadProof,
        RejectCode::BadCsr,
        RejectCode::WeakKey,
        RejectCode::KeyReused,
        RejectCode::RidConflict,
        RejectCode::Internal,
        RejectCode::UnknownCertificate,
        RejectCode::BadSignature,
        RejectCode::CounterReplay,
        RejectCode::CloneSuspected,
        RejectCode::Expired,
        RejectCode::CertificateRevoked,
        RejectCode::DeviceRevoked,
        RejectCode::DeviceSuspended,
        RejectCode::DeviceSuspect,
    ];

    /// The code as it appears on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            RejectCode::Malformed => "malformed",
            RejectCode::TooLarge => "too_large",
            RejectCode::UnknownDevice => "unknown_device",
            RejectCode::DeviceNotPending => "device_not_pending",
            RejectCode::TokenUsed => "token_used",
            RejectCode::BadProof => "bad_proof",
            RejectCode::BadCsr => "bad_csr",
            RejectCode::WeakKey => "weak_key",
            RejectCode::KeyReused => "key_reused",
            RejectCode::RidConflict => "rid_conflict",
            RejectCode::Internal => "internal",
            RejectCode::UnknownCertificate => "unknown_certificate",
            RejectCode::BadSignature => "bad_signature",
            RejectCode::CounterReplay => "counter_replay",
            RejectCode::CloneSuspected => "clone_suspected",
            RejectCode::Expired => "expired",
            RejectCode::CertificateRevoked => "certificate_revoked",
            RejectCode::DeviceRevoked => "device_revoked",
            RejectCode::DeviceSuspended => "device_suspended",
            RejectCode::DeviceSuspect => "device_suspect",
        }
    }

    /// The code named `s`, if this version knows it.
    pub fn parse(s: &str) -> Option<RejectCode> {
        RejectCode::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// Whether the same request may succeed later unchanged (only gateway faults).
    pub const fn is_transient(self) -> bool {
        matches!(self, RejectCode::Internal)
    }
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

type HmacSha256 = Hmac<Sha256>;

/// The enrollment proof: `HMAC-SHA256(key = token, message = SHA-256(csr_der))`.
/// `token` is the enrollment token exactly as printed (its ASCII bytes).
pub fn enrollment_proof(token: &[u8], csr_der: &[u8]) -> [u8; PROOF_LEN] {
    let mut mac = HmacSha256::new_from_slice(token).expect("HMAC takes keys of any length");
    mac.update(&Sha256::digest(csr_der));
    mac.finalize().into_bytes().into()
}

/// Checks an enrollment proof in constant time.
pub fn verify_enrollment_proof(token: &[u8], csr_der: &[u8], proof: &[u8]) -> bool {
    let mut mac = HmacSha256::new_from_slice(token).expect("HMAC takes keys of any length");
    mac.update(&Sha256::digest(csr_der));
    mac.verify_slice(proof).is_ok()
}

/// An `enroll` request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnrollRequest<'a> {
    /// Client-chosen request id; a repeated `rid` gets the same answer.
    pub rid: &'a str,
    /// PKCS#10 certification request, DER.
    pub csr: &'a [u8],
    /// [`enrollment_proof`] over `csr`.
    pub proof: &'a [u8],
}

/// A `renew` request: a CSR for a new key, signed off by the current key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RenewRequest<'a> {
    /// Client-chosen request id; a repeated `rid` gets the same answer.
    pub rid: &'a str,
    /// PKCS#10 certification request for the **new** key, DER.
    pub csr: &'a [u8],
    /// Serial of the current certificate, lowercase hex as in [`Issued::serial`].
    pub serial: &'a str,
    /// Monotonic counter: greater than in every earlier renewal of this device.
    pub counter: u64,
    /// Signature by the current certificate's key over [`renew_message`]:
    /// P-256: `r || s` (64 bytes, big-endian); Ed25519: the 64-byte signature.
    pub sig: &'a [u8],
}

/// Domain separation prefix of the renewal message.
pub const RENEW_CONTEXT: &[u8] = b"idgate/v1/renew";
/// Longest serial text accepted (20 octets in hex).
pub const MAX_SERIAL_HEX: usize = 40;
/// Longest [`renew_message`].
pub const MAX_RENEW_MESSAGE: usize =
    RENEW_CONTEXT.len() + 1 + MAX_ID + 1 + MAX_ID + 32 + 1 + MAX_SERIAL_HEX + 8;
/// Length of a renewal signature.
pub const SIG_LEN: usize = 64;

/// The bytes a renewal signature covers:
///
/// ```text
/// "idgate/v1/renew"
/// || len(device_id) (1 byte) || device_id
/// || len(rid)       (1 byte) || rid
/// || SHA-256(csr)   (32 bytes)
/// || len(serial)    (1 byte) || serial (lowercase hex text)
/// || counter        (8 bytes, big-endian)
/// ```
///
/// Writes it to `out` and returns its length.
pub fn renew_message(
    device_id: &str,
    rid: &str,
    csr: &[u8],
    serial: &str,
    counter: u64,
    out: &mut [u8],
) -> Result<usize, EncodeError> {
    let mut at = 0;
    let mut put = |bytes: &[u8]| -> Result<(), EncodeError> {
        let end = at + bytes.len();
        out.get_mut(at..end)
            .ok_or(EncodeError::BufferTooSmall)?
            .copy_from_slice(bytes);
        at = end;
        Ok(())
    };
    let length = |s: &str, max: usize| -> Result<u8, EncodeError> {
        if s.len() > max {
            Err(EncodeError::BufferTooSmall)
        } else {
            Ok(s.len() as u8)
        }
    };
    put(RENEW_CONTEXT)?;
    put(&[length(device_id, MAX_ID)?])?;
    put(device_id.as_bytes())?;
    put(&[length(rid, MAX_ID)?])?;
    put(rid.as_bytes())?;
    put(&Sha256::digest(csr))?;
    put(&[length(serial, MAX_SERIAL_HEX)?])?;
    put(serial.as_bytes())?;
    put(&counter.to_be_bytes())?;
    Ok(at)
}

/// Checks the syntax of a serial in a request: 2–40 lowercase hex digits.
pub fn check_serial(serial: &str) -> Result<(), IdError> {
    if serial.is_empty() {
        return Err(IdError::Empty);
    }
    if serial.len() > MAX_SERIAL_HEX {
        return Err(IdError::TooLong);
    }
    if serial.len().is_multiple_of(2)
        && serial
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        Ok(())
    } else {
        Err(IdError::BadCharacter)
    }
}

impl<'a> RenewRequest<'a> {
    /// Checks the fields' syntax and sizes (not the CSR or the signature).
    pub fn check(&self) -> Result<(), DecodeError> {
        check_rid(self.rid).map_err(|_| DecodeError::Invalid("rid"))?;
        check_serial(self.serial).map_err(|_| DecodeError::Invalid("serial"))?;
        if self.csr.len() > MAX_CSR {
            return Err(DecodeError::TooLarge);
        }
        if self.csr.is_empty() {
            return Err(DecodeError::Invalid("csr"));
        }
        if self.sig.len() != SIG_LEN {
            return Err(DecodeError::Invalid("sig"));
        }
        Ok(())
    }

    /// Encodes the request as a CBOR map into `out`; returns the length written.
    pub fn encode_cbor(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        let mut e = Encoder::new(Cursor::new(out));
        e.map(5)?
            .str("rid")?
            .str(self.rid)?
            .str("csr")?
            .bytes(self.csr)?
            .str("serial")?
            .str(self.serial)?
            .str("counter")?
            .u64(self.counter)?
            .str("sig")?
            .bytes(self.sig)?;
        Ok(e.writer().position())
    }

    /// Decodes and [checks](Self::check) a CBOR request.
    pub fn decode_cbor(payload: &'a [u8]) -> Result<RenewRequest<'a>, DecodeError> {
        let request = Self::decode_cbor_unchecked(payload)?;
        request.check()?;
        Ok(request)
    }

    /// Decodes a CBOR request without [checking](Self::check) its fields.
    pub fn decode_cbor_unchecked(payload: &'a [u8]) -> Result<RenewRequest<'a>, DecodeError> {
        let mut d = Decoder::new(payload);
        let (mut rid, mut csr, mut serial, mut counter, mut sig) = (None, None, None, None, None);
        for _ in 0..map_len(&mut d, payload)? {
            match text(&mut d, "key")? {
                "rid" => once(&mut rid, "rid", text(&mut d, "rid")?)?,
                "csr" => once(&mut csr, "csr", bytes(&mut d, "csr")?)?,
                "serial" => once(&mut serial, "serial", text(&mut d, "serial")?)?,
                "counter" => once(&mut counter, "counter", uint(&mut d, "counter")?)?,
                "sig" => once(&mut sig, "sig", bytes(&mut d, "sig")?)?,
                _ => d.skip()?,
            }
        }
        finish(&d, payload)?;
        Ok(RenewRequest {
            rid: required(rid, "rid")?,
            csr: required(csr, "csr")?,
            serial: required(serial, "serial")?,
            counter: required(counter, "counter")?,
            sig: required(sig, "sig")?,
        })
    }
}

/// An accepted request's reply: the new certificate and what the device needs with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issued<'a> {
    /// The request id this answers.
    pub rid: &'a str,
    /// The device certificate, DER.
    pub certificate: &'a [u8],
    /// Issuer certificates, DER, starting with the issuer of `certificate`, up to
    /// but excluding the root (which the device has pinned).
    pub chain: heapless::Vec<&'a [u8], MAX_CHAIN>,
    /// The certificate serial number, lowercase hex.
    pub serial: &'a str,
    /// Validity start, unix seconds.
    pub not_before: u64,
    /// Validity end, unix seconds.
    pub not_after: u64,
    /// The gateway's clock when it answered, unix seconds.
    pub time: u64,
    /// Suggested renewal window start, unix seconds.
    pub renew_after: u64,
    /// Suggested renewal window end, unix seconds.
    pub renew_before: u64,
}

/// A rejected request's reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejected<'a> {
    /// The request id this answers; empty if the request was too broken to carry one.
    pub rid: &'a str,
    /// A [`RejectCode`] string; may be one this version does not know.
    pub code: &'a str,
    /// A human-readable explanation, for logs; not for parsing.
    pub message: &'a str,
}

impl Rejected<'_> {
    /// The code, if this version knows it.
    pub fn reject_code(&self) -> Option<RejectCode> {
        RejectCode::parse(self.code)
    }
}

/// A message could not be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// The output buffer is too small.
    BufferTooSmall,
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("output buffer too small")
    }
}

impl core::error::Error for EncodeError {}

impl From<minicbor::encode::Error<EndOfSlice>> for EncodeError {
    fn from(_: minicbor::encode::Error<EndOfSlice>) -> Self {
        EncodeError::BufferTooSmall
    }
}

/// A payload could not be decoded: it came from the network, so this is bad
/// input from a peer, never a reason to panic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Not a well-formed CBOR map (or JSON object) of the expected shape.
    Syntax,
    /// A required field is absent.
    Missing(&'static str),
    /// A field appears twice.
    Duplicate(&'static str),
    /// A field has the wrong type or an invalid value.
    Invalid(&'static str),
    /// More bytes than the protocol allows.
    TooLarge,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Syntax => f.write_str("payload is not a well-formed message"),
            DecodeError::Missing(field) => write!(f, "field `{field}` is missing"),
            DecodeError::Duplicate(field) => write!(f, "field `{field}` appears twice"),
            DecodeError::Invalid(field) => write!(f, "field `{field}` is invalid"),
            DecodeError::TooLarge => f.write_str("payload is too large"),
        }
    }
}

impl core::error::Error for DecodeError {}

impl From<minicbor::decode::Error> for DecodeError {
    fn from(_: minicbor::decode::Error) -> Self {
        DecodeError::Syntax
    }
}

/// Sets a field once; a second occurrence is an error.
fn once<T>(slot: &mut Option<T>, name: &'static str, value: T) -> Result<(), DecodeError> {
    if slot.replace(value).is_some() {
        return Err(DecodeError::Duplicate(name));
    }
    Ok(())
}

/// Starts decoding a definite-length CBOR map that must be the whole payload.
fn map_len(d: &mut Decoder<'_>, payload: &[u8]) -> Result<u64, DecodeError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(DecodeError::TooLarge);
    }
    match d.map()? {
        Some(n) => Ok(n),
        None => Err(DecodeError::Syntax),
    }
}

fn finish(d: &Decoder<'_>, payload: &[u8]) -> Result<(), DecodeError> {
    if d.position() == payload.len() {
        Ok(())
    } else {
        Err(DecodeError::Syntax)
    }
}

fn text<'b>(d: &mut Decoder<'b>, name: &'static str) -> Result<&'b str, DecodeError> {
    if d.datatype()? != Type::String {
        return Err(DecodeError::Invalid(name));
    }
    Ok(d.str()?)
}

fn bytes<'b>(d: &mut Decoder<'b>, name: &'static str) -> Result<&'b [u8], DecodeError> {
    if d.datatype()? != Type::Bytes {
        return Err(DecodeError::Invalid(name));
    }
    Ok(d.bytes()?)
}

fn uint(d: &mut Decoder<'_>, name: &'static str) -> Result<u64, DecodeError> {
    match d.datatype()? {
        Type::U8 | Type::U16 | Type::U32 | Type::U64 => Ok(d.u64()?),
        _ => Err(DecodeError::Invalid(name)),
    }
}

fn required<T>(slot: Option<T>, name: &'static str) -> Result<T, DecodeError> {
    slot.ok_or(DecodeError::Missing(name))
}

impl<'a> EnrollRequest<'a> {
    /// Checks the fields' syntax and sizes (not the CSR's contents).
    pub fn check(&self) -> Result<(), DecodeError> {
        check_rid(self.rid).map_err(|_| DecodeError::Invalid("rid"))?;
        if self.csr.len() > MAX_CSR {
            return Err(DecodeError::TooLarge);
        }
        if self.csr.is_empty() {
            return Err(DecodeError::Invalid("csr"));
        }
        if self.proof.len() != PROOF_LEN {
            return Err(DecodeError::Invalid("proof"));
        }
        Ok(())
    }

    /// Encodes the request as a CBOR map into `out`; returns the length written.
    pub fn encode_cbor(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        let mut e = Encoder::new(Cursor::new(out));
        e.map(3)?
            .str("rid")?
            .str(self.rid)?
            .str("csr")?
            .bytes(self.csr)?
            .str("proof")?
            .bytes(self.proof)?;
        Ok(e.writer().position())
    }

    /// Decodes and [checks](Self::check) a CBOR request. Unknown fields are ignored.
    pub fn decode_cbor(payload: &'a [u8]) -> Result<EnrollRequest<'a>, DecodeError> {
        let request = Self::decode_cbor_unchecked(payload)?;
        request.check()?;
        Ok(request)
    }

    /// Decodes a CBOR request without [checking](Self::check) its fields, so that
    /// a rejection can still name the `rid`.
    pub fn decode_cbor_unchecked(payload: &'a [u8]) -> Result<EnrollRequest<'a>, DecodeError> {
        let mut d = Decoder::new(payload);
        let (mut rid, mut csr, mut proof) = (None, None, None);
        for _ in 0..map_len(&mut d, payload)? {
            match text(&mut d, "key")? {
                "rid" => once(&mut rid, "rid", text(&mut d, "rid")?)?,
                "csr" => once(&mut csr, "csr", bytes(&mut d, "csr")?)?,
                "proof" => once(&mut proof, "proof", bytes(&mut d, "proof")?)?,
                _ => d.skip()?,
            }
        }
        finish(&d, payload)?;
        Ok(EnrollRequest {
            rid: required(rid, "rid")?,
            csr: required(csr, "csr")?,
            proof: required(proof, "proof")?,
        })
    }
}

impl<'a> Issued<'a> {
    /// Encodes the reply as a CBOR map into `out`; returns the length written.
    pub fn encode_cbor(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        let mut e = Encoder::new(Cursor::new(out));
        e.map(9)?
            .str("rid")?
            .str(self.rid)?
            .str("certificate")?
            .bytes(self.certificate)?
            .str("chain")?
            .array(self.chain.len() as u64)?;
        for certificate in &self.chain {
            e.bytes(certificate)?;
        }
        e.str("serial")?
            .str(self.serial)?
            .str("not_before")?
            .u64(self.not_before)?
            .str("not_after")?
            .u64(self.not_after)?
            .str("time")?
            .u64(self.time)?
            .str("renew_after")?
            .u64(self.renew_after)?
            .str("renew_before")?
            .u64(self.renew_before)?;
        Ok(e.writer().position())
    }

    /// Decodes a CBOR reply. Unknown fields are ignored.
    pub fn decode_cbor(payload: &'a [u8]) -> Result<Issued<'a>, DecodeError> {
        let mut d = Decoder::new(payload);
        let (mut rid, mut certificate, mut chain, mut serial) = (None, None, None, None);
        let (mut not_before, mut not_after, mut time) = (None, None, None);
        let (mut renew_after, mut renew_before) = (None, None);
        for _ in 0..map_len(&mut d, payload)? {
            match text(&mut d, "key")? {
                "rid" => once(&mut rid, "rid", text(&mut d, "rid")?)?,
                "certificate" => once(
                    &mut certificate,
                    "certificate",
                    bytes(&mut d, "certificate")?,
                )?,
                "chain" => {
                    if d.datatype()? != Type::Array {
                        return Err(DecodeError::Invalid("chain"));
                    }
                    let n = d.array()?.ok_or(DecodeError::Invalid("chain"))?;
                    let mut list = heapless::Vec::new();
                    for _ in 0..n {
                        list.push(bytes(&mut d, "chain")?)
                            .map_err(|_| DecodeError::Invalid("chain"))?;
                    }
                    once(&mut chain, "chain", list)?;
                }
                "serial" => once(&mut serial, "serial", text(&mut d, "serial")?)?,
                "not_before" => once(&mut not_before, "not_before", uint(&mut d, "not_before")?)?,
                "not_after" => once(&mut not_after, "not_after", uint(&mut d, "not_after")?)?,
                "time" => once(&mut time, "time", uint(&mut d, "time")?)?,
                "renew_after" => once(
                    &mut renew_after,
                    "renew_after",
                    uint(&mut d, "renew_after")?,
                )?,
                "renew_before" => once(
                    &mut renew_before,
                    "renew_before",
                    uint(&mut d, "renew_before")?,
                )?,
                _ => d.skip()?,
            }
        }
        finish(&d, payload)?;
        Ok(Issued {
            rid: required(rid, "rid")?,
            certificate: required(certificate, "certificate")?,
            chain: required(chain, "chain")?,
            serial: required(serial, "serial")?,
            not_before: required(not_before, "not_before")?,
            not_after: required(not_after, "not_after")?,
            time: required(time, "time")?,
            renew_after: required(renew_after, "renew_after")?,
            renew_before: required(renew_before, "renew_before")?,
        })
    }
}

impl<'a> Rejected<'a> {
    /// Encodes the rejection as a CBOR map into `out`; returns the length written.
    pub fn encode_cbor(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        let mut e = Encoder::new(Cursor::new(out));
        e.map(3)?
            .str("rid")?
            .str(self.rid)?
            .str("code")?
            .str(self.code)?
            .str("message")?
            .str(self.message)?;
        Ok(e.writer().position())
    }

    /// Decodes a CBOR rejection. Unknown fields are ignored; `rid` may be absent.
    pub fn decode_cbor(payload: &'a [u8]) -> Result<Rejected<'a>, DecodeError> {
        let mut d = Decoder::new(payload);
        let (mut rid, mut code, mut message) = (None, None, None);
        for _ in 0..map_len(&mut d, payload)? {
            match text(&mut d, "key")? {
                "rid" => once(&mut rid, "rid", text(&mut d, "rid")?)?,
                "code" => once(&mut code, "code", text(&mut d, "code")?)?,
                "message" => once(&mut message, "message", text(&mut d, "message")?)?,
                _ => d.skip()?,
            }
        }
        finish(&d, payload)?;
        Ok(Rejected {
            rid: rid.unwrap_or(""),
            code: required(code, "code")?,
            message: message.unwrap_or(""),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip() {
        let topic = Topic::request("sensor-42", Op::Enroll, Format::Cbor);
        let name = topic.to_heapless().unwrap();
        assert_eq!(name.as_str(), "idgate/v1/devices/sensor-42/enroll/cbor");
        assert_eq!(Topic::parse(&name), Some(topic));
        let reply = topic.with_reply(Reply::Rejected).to_heapless().unwrap();
        assert_eq!(
            reply.as_str(),
            "idgate/v1/devices/sensor-42/enroll/cbor/rejected"
        );
        assert_eq!(Topic::parse(&reply).unwrap().reply, Some(Reply::Rejected));
    }

    #[test]
    fn bad_topics_are_refused() {
        for bad in [
            "idgate/v1/devices/+/enroll/json",
            "idgate/v1/devices/a/enroll/xml",
            "idgate/v1/devices/a/fly/json",
            "idgate/v1/devices/a/enroll/json/accepted/x",
            "idgate/v1/devices/a/enroll/json/maybe",
            "idgate/v2/devices/a/enroll/json",
            "idgate/v1/devices//enroll/json",
        ] {
            assert_eq!(Topic::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn device_id_syntax() {
        assert_eq!(check_device_id("SN-0001_a.b"), Ok(()));
        assert_eq!(check_device_id(""), Err(IdError::Empty));
        assert_eq!(check_device_id("-lead"), Err(IdError::BadCharacter));
        assert_eq!(check_device_id("a/b"), Err(IdError::BadCharacter));
        assert_eq!(check_device_id("a+b"), Err(IdError::BadCharacter));
        assert_eq!(check_device_id("a#"), Err(IdError::BadCharacter));
        assert_eq!(check_device_id("é"), Err(IdError::BadCharacter));
        assert_eq!(check_device_id(&"a".repeat(64)), Ok(()));
        assert_eq!(check_device_id(&"a".repeat(65)), Err(IdError::TooLong));
    }

    #[test]
    fn proof_matches_rfc4231_construction() {
        // Independent computation: HMAC-SHA256 by hand from the RFC 2104 definition.
        let token = b"abcdefghijklmnopqrstuvwxyz234567";
        let csr = b"not really a csr";
        let digest = Sha256::digest(csr);
        let mut key = [0u8; 64];
        key[..token.len()].copy_from_slice(token);
        let inner: [u8; 64] = key.map(|k| k ^ 0x36);
        let outer: [u8; 64] = key.map(|k| k ^ 0x5c);
        let mut h = Sha256::new();
        h.update(inner);
        h.update(digest);
        let inner_hash = h.finalize();
        let mut h = Sha256::new();
        h.update(outer);
        h.update(inner_hash);
        let expected: [u8; 32] = h.finalize().into();
        assert_eq!(enrollment_proof(token, csr), expected);
        assert!(verify_enrollment_proof(token, csr, &expected));
        assert!(!verify_enrollment_proof(b"other", csr, &expected));
        assert!(!verify_enrollment_proof(token, csr, &expected[..31]));
    }

    #[test]
    fn enroll_request_round_trip() {
        let proof = [7u8; 32];
        let request = EnrollRequest {
            rid: "r1",
            csr: &[0x30, 0x03, 1, 2, 3],
            proof: &proof,
        };
        let mut buf = [0u8; 128];
        let n = request.encode_cbor(&mut buf).unwrap();
        assert_eq!(EnrollRequest::decode_cbor(&buf[..n]), Ok(request));
        // Every truncation is an error, never a panic.
        for cut in 0..n {
            assert!(
                EnrollRequest::decode_cbor(&buf[..cut]).is_err(),
                "cut {cut}"
            );
        }
        // Trailing bytes are refused.
        buf[n] = 0;
        assert_eq!(
            EnrollRequest::decode_cbor(&buf[..n + 1]),
            Err(DecodeError::Syntax)
        );
        assert_eq!(
            request.encode_cbor(&mut [0u8; 8]),
            Err(EncodeError::BufferTooSmall)
        );
    }

    #[test]
    fn enroll_request_field_errors() {
        let mut buf = [0u8; 128];
        let mut e = Encoder::new(Cursor::new(&mut buf[..]));
        e.map(2).unwrap().str("rid").unwrap().str("r").unwrap();
        e.str("rid").unwrap().str("r").unwrap();
        let n = e.writer().position();
        assert_eq!(
            EnrollRequest::decode_cbor(&buf[..n]),
            Err(DecodeError::Duplicate("rid"))
        );

        let mut e = Encoder::new(Cursor::new(&mut buf[..]));
        e.map(3).unwrap().str("rid").unwrap().str("r").unwrap();
        e.str("csr").unwrap().str("text, not bytes").unwrap();
        e.str("proof").unwrap().bytes(&[0; 32]).unwrap();
        let n = e.writer().position();
        assert_eq!(
            EnrollRequest::decode_cbor(&buf[..n]),
            Err(DecodeError::Invalid("csr"))
        );

        let mut e = Encoder::new(Cursor::new(&mut buf[..]));
        e.map(3).unwrap().str("rid").unwrap().str("r/1").unwrap();
        e.str("csr").unwrap().bytes(&[1]).unwrap();
        e.str("proof").unwrap().bytes(&[0; 32]).unwrap();
        let n = e.writer().position();
        assert_eq!(
            EnrollRequest::decode_cbor(&buf[..n]),
            Err(DecodeError::Invalid("rid"))
        );
    }

    #[test]
    fn issued_and_rejected_round_trip() {
        let mut chain = heapless::Vec::new();
        chain.push(&[1u8, 2][..]).unwrap();
        let issued = Issued {
            rid: "r",
            certificate: &[9, 9, 9],
            chain,
            serial: "4a1b",
            not_before: 1,
            not_after: 2,
            time: 3,
            renew_after: 4,
            renew_before: 5,
        };
        let mut buf = [0u8; 256];
        let n = issued.encode_cbor(&mut buf).unwrap();
        assert_eq!(Issued::decode_cbor(&buf[..n]), Ok(issued));
        for cut in 0..n {
            assert!(Issued::decode_cbor(&buf[..cut]).is_err());
        }

        let rejected = Rejected {
            rid: "r",
            code: "bad_proof",
            message: "no",
        };
        let n = rejected.encode_cbor(&mut buf).unwrap();
        let back = Rejected::decode_cbor(&buf[..n]).unwrap();
        assert_eq!(back, rejected);
        assert_eq!(back.reject_code(), Some(RejectCode::BadProof));
    }

    #[test]
    fn renew_request_round_trip_and_message_layout() {
        let sig = [3u8; 64];
        let request = RenewRequest {
            rid: "r2",
            csr: &[0x30, 0x01, 0x00],
            serial: "4a0b",
            counter: 7,
            sig: &sig,
        };
        let mut buf = [0u8; 256];
        let n = request.encode_cbor(&mut buf).unwrap();
        assert_eq!(RenewRequest::decode_cbor(&buf[..n]), Ok(request));
        for cut in 0..n {
            assert!(RenewRequest::decode_cbor(&buf[..cut]).is_err());
        }

        let mut message = [0u8; MAX_RENEW_MESSAGE];
        let len = renew_message("dev", "r2", &[0x30, 0x01, 0x00], "4a0b", 7, &mut message).unwrap();
        let mut expected = std::vec::Vec::new();
        expected.extend_from_slice(b"idgate/v1/renew");
        expected.extend_from_slice(&[3, b'd', b'e', b'v', 2, b'r', b'2']);
        expected.extend_from_slice(&Sha256::digest([0x30, 0x01, 0x00]));
        expected.extend_from_slice(&[4, b'4', b'a', b'0', b'b']);
        expected.extend_from_slice(&7u64.to_be_bytes());
        assert_eq!(&message[..len], expected.as_slice());
        // The longest fields fit.
        let long = "a".repeat(64);
        let serial = "7f".repeat(20);
        assert!(renew_message(&long, &long, &[], &serial, u64::MAX, &mut message).is_ok());

        assert_eq!(check_serial("4a0b"), Ok(()));
        for bad in ["", "4A0B", "4a0", "xyz0", &"00".repeat(21)] {
            assert!(check_serial(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn codes_are_stable() {
        for code in RejectCode::ALL {
            assert_eq!(RejectCode::parse(code.as_str()), Some(code));
        }
        assert_eq!(RejectCode::parse("no_such_code"), None);
    }
}
