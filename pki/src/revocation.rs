//! Revocation as relying parties see it: the X.509 v2 CRL the issuing CA signs,
//! and the core of an OCSP responder (RFC 6960) in [`ocsp`]. Nothing here does
//! I/O or knows the registry: the gateway looks up serials and serves the bytes.

use std::fmt;
use std::str::FromStr;

use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::ca::{CaError, IssuingCa};
use crate::profile::Serial;

/// Why a certificate was revoked: the RFC 5280 CRLReason codes a gateway has a
/// use for. `cACompromise`, `removeFromCRL` and the attribute-authority codes
/// are left out on purpose: a device certificate is never revoked for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RevocationReason {
    /// No reason given. Encoded by leaving the reason out (RFC 5280 §5.3.1).
    Unspecified,
    /// The device key is or may be known to someone else (a stolen sensor).
    KeyCompromise,
    /// The device changed owner or site.
    AffiliationChanged,
    /// A newer certificate replaces this one.
    Superseded,
    /// The device was retired.
    CessationOfOperation,
    /// Suspended; the only reason that may later be lifted.
    CertificateHold,
}

impl RevocationReason {
    /// Every reason, in code order.
    pub const ALL: [RevocationReason; 6] = [
        RevocationReason::Unspecified,
        RevocationReason::KeyCompromise,
        RevocationReason::AffiliationChanged,
        RevocationReason::Superseded,
        RevocationReason::CessationOfOperation,
        RevocationReason::CertificateHold,
    ];

    /// The CRLReason ENUMERATED value.
    pub fn code(self) -> u8 {
        match self {
            RevocationReason::Unspecified => 0,
            RevocationReason::KeyCompromise => 1,
            RevocationReason::AffiliationChanged => 3,
            RevocationReason::Superseded => 4,
            RevocationReason::CessationOfOperation => 5,
            RevocationReason::CertificateHold => 6,
        }
    }

    /// The reason with CRLReason value `code`, if it is one of ours.
    pub fn from_code(code: u8) -> Option<RevocationReason> {
        RevocationReason::ALL.into_iter().find(|r| r.code() == code)
    }

    /// The ASN.1 name (`keyCompromise`), as openssl prints it in `-text` and as
    /// the registry and the admin API spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            RevocationReason::Unspecified => "unspecified",
            RevocationReason::KeyCompromise => "keyCompromise",
            RevocationReason::AffiliationChanged => "affiliationChanged",
            RevocationReason::Superseded => "superseded",
            RevocationReason::CessationOfOperation => "cessationOfOperation",
            RevocationReason::CertificateHold => "certificateHold",
        }
    }

    fn to_rcgen(self) -> rcgen::RevocationReason {
        match self {
            RevocationReason::Unspecified => rcgen::RevocationReason::Unspecified,
            RevocationReason::KeyCompromise => rcgen::RevocationReason::KeyCompromise,
            RevocationReason::AffiliationChanged => rcgen::RevocationReason::AffiliationChanged,
            RevocationReason::Superseded => rcgen::RevocationReason::Superseded,
            RevocationReason::CessationOfOperation => rcgen::RevocationReason::CessationOfOperation,
            RevocationReason::CertificateHold => rcgen::RevocationReason::CertificateHold,
        }
    }
}

impl fmt::Display for RevocationReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no [`RevocationReason`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "not a revocation reason: expected one of unspecified, keyCompromise, affiliationChanged, \
     superseded, cessationOfOperation, certificateHold"
)]
pub struct BadReason;

impl FromStr for RevocationReason {
    type Err = BadReason;

    /// Exact ASN.1 names only: the names are stored, and one spelling per
    /// reason keeps registry queries simple.
    fn from_str(s: &str) -> Result<RevocationReason, BadReason> {
        RevocationReason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or(BadReason)
    }
}

/// One entry of a CRL, as the registry records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevokedCertificate {
    /// The revoked certificate's serial.
    pub serial: Serial,
    /// When the gateway processed the revocation, unix seconds.
    pub revoked_at: i64,
    /// Why.
    pub reason: RevocationReason,
}

impl IssuingCa {
    /// Signs a full (not delta) X.509 v2 CRL listing `revoked`, with the CRL
    /// number and an authority key identifier equal to the issuing CA's subject
    /// key identifier, so verifiers pick the right CA when several are loaded.
    /// Times are unix seconds; `next_update` must be after `this_update`.
    pub fn crl(
        &self,
        revoked: &[RevokedCertificate],
        crl_number: u64,
        this_update: i64,
        next_update: i64,
    ) -> Result<Vec<u8>, CaError> {
        let mut seen = std::collections::HashSet::new();
        let mut revoked_certs = Vec::with_capacity(revoked.len());
        for entry in revoked {
            // A duplicate means the caller's query is wrong; a CRL that lists a
            // serial twice with different reasons would be ambiguous.
            if !seen.insert(entry.serial.as_bytes()) {
                return Err(CaError::Invalid {
                    what: "revocation list",
                    why: format!("serial {} is listed twice", entry.serial),
                });
            }
            revoked_certs.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(entry.serial.as_bytes()),
                revocation_time: datetime(entry.revoked_at)?,
                reason_code: Some(entry.reason.to_rcgen()),
                invalidity_date: None,
            });
        }
        let params = CertificateRevocationListParams {
            this_update: datetime(this_update)?,
            next_update: datetime(next_update)?,
            crl_number: SerialNumber::from(crl_number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::PreSpecified(self.subject_key_identifier()?),
        };
        Ok(params.signed_by(self.issuer())?.der().to_vec())
    }

    /// The issuing CA certificate's subject key identifier. rcgen would
    /// otherwise derive a fresh one from the key, which differs from the SKI of a
    /// CA certificate made by another tool.
    fn subject_key_identifier(&self) -> Result<Vec<u8>, CaError> {
        let certificate = self.parsed_certificate()?;
        certificate
            .iter_extensions()
            .find_map(|extension| match extension.parsed_extension() {
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(id) => {
                    Some(id.0.to_vec())
                }
                _ => None,
            })
            .ok_or_else(|| CaError::Invalid {
                what: "issuing CA certificate",
                why: "it has no subject key identifier".into(),
            })
    }

    fn parsed_certificate(&self) -> Result<X509Certificate<'_>, CaError> {
        let (_, certificate) =
            X509Certificate::from_der(self.certificate()).map_err(|e| CaError::Invalid {
                what: "issuing CA certificate",
                why: e.to_string(),
            })?;
        Ok(certificate)
    }
}

fn datetime(unix: i64) -> Result<OffsetDateTime, CaError> {
    OffsetDateTime::from_unix_timestamp(unix).map_err(|e| CaError::Invalid {
        what: "timestamp",
        why: e.to_string(),
    })
}

/// The OCSP responder core (RFC 6960): parse a request, tell whether each
/// CertID names a certificate of this issuing CA, and sign the answer.
///
/// The issuing CA signs responses itself (RFC 6960 §4.2.2.2, "the CA who
/// issued the certificate"), so no delegated OCSP signing certificate is needed
/// and none is included in the response. A CertID of another issuer is
/// answered `unknown` rather than with an `unauthorized` error: one request may
/// mix CertIDs, and `unknown` tells the client exactly which ones we cannot
/// speak for while still answering the others.
pub mod ocsp {
    use rcgen::SigningKey;
    use sha1::Sha1;
    use sha2::{Digest, Sha256};
    use x509_parser::prelude::{FromDer, X509Certificate};

    use super::{RevocationReason, RevokedCertificate, datetime};
    use crate::ca::{CaError, IssuingCa};
    use crate::der::{DerError, Element, Reader, tag};

    /// Requests larger than this are refused before parsing. Real requests are
    /// ~100 bytes per CertID; the limit leaves room for a signed request.
    pub const MAX_REQUEST_LEN: usize = 4096;
    /// CertIDs answered in one request; each costs hashing and a registry lookup.
    pub const MAX_CERT_IDS: usize = 16;
    /// Longest accepted nonce extension value. RFC 8954 asks for at most 32
    /// octets of nonce; the slack covers its OCTET STRING wrapping.
    pub const MAX_NONCE_LEN: usize = 64;

    const OCTET_STRING: u8 = 0x04;
    const NULL: u8 = 0x05;
    const BOOLEAN: u8 = 0x01;
    const ENUMERATED: u8 = 0x0a;
    const GENERALIZED_TIME: u8 = 0x18;
    const CONTEXT_1: u8 = 0xa1;
    const CONTEXT_2: u8 = 0xa2;
    const IMPLICIT_0_PRIMITIVE: u8 = 0x80;
    const IMPLICIT_1_CONSTRUCTED: u8 = 0xa1;
    const IMPLICIT_2_PRIMITIVE: u8 = 0x82;

    /// 1.3.14.3.2.26
    const OID_SHA1: &[u8] = &[0x2b, 0x0e, 0x03, 0x02, 0x1a];
    /// 2.16.840.1.101.3.4.2.1
    const OID_SHA256: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01];
    /// id-pkix-ocsp-nonce, 1.3.6.1.5.5.7.48.1.2
    const OID_NONCE: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x30, 0x01, 0x02];
    /// id-pkix-ocsp-basic, 1.3.6.1.5.5.7.48.1.1
    const OID_BASIC: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x30, 0x01, 0x01];
    /// ecdsa-with-SHA256, 1.2.840.10045.4.3.2 (parameters absent, RFC 5758)
    const OID_ECDSA_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
    /// ecdsa-with-SHA384, 1.2.840.10045.4.3.3
    const OID_ECDSA_SHA384: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
    /// id-Ed25519, 1.3.101.112
    const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];

    /// The hash a CertID was computed with.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    #[non_exhaustive]
    pub enum OcspHash {
        /// SHA-1: what openssl and most clients still send.
        Sha1,
        /// SHA-256.
        Sha256,
    }

    impl OcspHash {
        fn oid(self) -> &'static [u8] {
            match self {
                OcspHash::Sha1 => OID_SHA1,
                OcspHash::Sha256 => OID_SHA256,
            }
        }

        fn from_oid(oid: &[u8]) -> Option<OcspHash> {
            [OcspHash::Sha1, OcspHash::Sha256]
                .into_iter()
                .find(|h| h.oid() == oid)
        }

        /// Output length in octets.
        pub fn output_len(self) -> usize {
            match self {
                OcspHash::Sha1 => 20,
                OcspHash::Sha256 => 32,
            }
        }

        /// Hashes `data`.
        pub fn digest(self, data: &[u8]) -> Vec<u8> {
            match self {
                OcspHash::Sha1 => Sha1::digest(data).to_vec(),
                OcspHash::Sha256 => Sha256::digest(data).to_vec(),
            }
        }
    }

    /// Which certificate a client asks about (RFC 6960 §4.1.1).
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct CertId {
        /// The hash of the two issuer hashes.
        pub hash: OcspHash,
        /// Hash of the issuer's DER-encoded subject Name.
        pub issuer_name_hash: Vec<u8>,
        /// Hash of the issuer's subjectPublicKey BIT STRING value.
        pub issuer_key_hash: Vec<u8>,
        /// The serial's magnitude, big-endian, without the sign octet DER adds
        /// before a high bit; equal to [`crate::profile::Serial::as_bytes`] for
        /// our certificates.
        pub serial: Vec<u8>,
        /// The CertID exactly as the client encoded it. Responses echo it, because
        /// some clients compare CertIDs byte for byte (an AlgorithmIdentifier with
        /// or without NULL parameters hashes the same but encodes differently).
        der: Vec<u8>,
    }

    impl CertId {
        /// A CertID for the certificate with `serial` issued by the holder of
        /// `issuer_certificate` (DER), encoded the way openssl does.
        pub fn new(
            hash: OcspHash,
            issuer_certificate: &[u8],
            serial: &[u8],
        ) -> Result<CertId, CaError> {
            let (name, key) = issuer_parts(issuer_certificate)?;
            let mut id = CertId {
                hash,
                issuer_name_hash: hash.digest(name),
                issuer_key_hash: hash.digest(key),
                serial: serial.to_vec(),
                der: Vec::new(),
            };
            id.der = id.canonical_der();
            Ok(id)
        }

        /// The encoding a response carries: the client's own bytes, unless the
        /// public fields were changed since parsing.
        pub fn der(&self) -> Vec<u8> {
            match parse_cert_id(&self.der) {
                Ok(parsed) if parsed.same_fields(self) => self.der.clone(),
                _ => self.canonical_der(),
            }
        }

        fn same_fields(&self, other: &CertId) -> bool {
            self.hash == other.hash
                && self.issuer_name_hash == other.issuer_name_hash
                && self.issuer_key_hash == other.issuer_key_hash
                && self.serial == other.serial
        }

        fn canonical_der(&self) -> Vec<u8> {
            let algorithm = tlv(
                tag::SEQUENCE,
                &[&tlv(tag::OID, &[self.hash.oid()]), &tlv(NULL, &[])],
            );
            tlv(
                tag::SEQUENCE,
                &[
                    &algorithm,
                    &tlv(OCTET_STRING, &[&self.issuer_name_hash]),
                    &tlv(OCTET_STRING, &[&self.issuer_key_hash]),
                    &unsigned_integer(&self.serial),
                ],
            )
        }
    }

    /// A parsed OCSP request.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct OcspRequest {
        /// The certificates asked about, in request order (1 to [`MAX_CERT_IDS`]).
        pub certs: Vec<CertId>,
        /// The value of the nonce extension (the extnValue contents, normally a
        /// DER OCTET STRING per RFC 8954), to be echoed unchanged.
        pub nonce: Option<Vec<u8>>,
    }

    /// Why a request was refused. Every variant is bad input from a client;
    /// [`OcspError::status`] says what to answer.
    #[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
    #[non_exhaustive]
    pub enum OcspError {
        /// Over [`MAX_REQUEST_LEN`] bytes.
        #[error("OCSP request of {0} bytes is too large")]
        TooLarge(usize),
        /// Over [`MAX_CERT_IDS`] CertIDs.
        #[error("OCSP request asks about more than {MAX_CERT_IDS} certificates")]
        TooManyCertIds,
        /// Not DER, not an OCSPRequest, or trailing bytes.
        #[error("OCSP request is malformed: {0}")]
        Malformed(&'static str),
        /// A version other than v1.
        #[error("OCSP request version is not v1")]
        UnsupportedVersion,
        /// A CertID hash other than SHA-1 or SHA-256.
        #[error("OCSP CertID hash algorithm is not SHA-1 or SHA-256")]
        UnsupportedHash,
        /// A critical extension we do not implement (RFC 6960 §4.4).
        #[error("OCSP request carries an unsupported critical extension")]
        UnsupportedCriticalExtension,
    }

    impl OcspError {
        /// The error response status for this refusal.
        pub fn status(&self) -> OcspResponseStatus {
            OcspResponseStatus::MalformedRequest
        }
    }

    impl From<DerError> for OcspError {
        fn from(error: DerError) -> OcspError {
            OcspError::Malformed(match error {
                DerError::Truncated => "truncated",
                DerError::Invalid | DerError::BufferTooSmall => "invalid DER",
            })
        }
    }

    /// The unsuccessful OCSPResponseStatus values (RFC 6960 §4.2.1).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    #[non_exhaustive]
    pub enum OcspResponseStatus {
        /// The request did not parse.
        MalformedRequest,
        /// Our own fault (registry down, signing failed).
        InternalError,
        /// Try again later (overloaded, shutting down).
        TryLater,
        /// The client may not ask this responder.
        Unauthorized,
    }

    impl OcspResponseStatus {
        /// The ENUMERATED value.
        pub fn code(self) -> u8 {
            match self {
                OcspResponseStatus::MalformedRequest => 1,
                OcspResponseStatus::InternalError => 2,
                OcspResponseStatus::TryLater => 3,
                OcspResponseStatus::Unauthorized => 6,
            }
        }
    }

    /// An OCSPResponse without responseBytes: the whole answer for a request that
    /// could not be served.
    pub fn ocsp_error(status: OcspResponseStatus) -> Vec<u8> {
        tlv(tag::SEQUENCE, &[&tlv(ENUMERATED, &[&[status.code()]])])
    }

    /// What a response says about one certificate.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum CertStatus {
        /// Issued by us and not revoked.
        Good,
        /// Revoked at `revoked_at` (unix seconds).
        Revoked {
            /// When the revocation was processed.
            revoked_at: i64,
            /// Why, if known. `Unspecified` is sent as no reason, as in the CRL.
            reason: Option<RevocationReason>,
        },
        /// Not a certificate we know: another issuer's, or a serial we never issued.
        Unknown,
    }

    impl From<&RevokedCertificate> for CertStatus {
        fn from(revoked: &RevokedCertificate) -> CertStatus {
            CertStatus::Revoked {
                revoked_at: revoked.revoked_at,
                reason: Some(revoked.reason),
            }
        }
    }

    /// Parses a DER OCSPRequest. A signed request is accepted and its signature
    /// ignored: the answer is public information and signed by us anyway.
    pub fn parse_request(der: &[u8]) -> Result<OcspRequest, OcspError> {
        if der.len() > MAX_REQUEST_LEN {
            return Err(OcspError::TooLarge(der.len()));
        }
        let mut outer = Reader::new(der);
        let request = outer.expect(tag::SEQUENCE)?;
        if !outer.is_empty() {
            return Err(OcspError::Malformed("trailing bytes"));
        }
        let mut fields = Reader::new(request.content);
        let tbs = fields.expect(tag::SEQUENCE)?;
        if !fields.is_empty() {
            fields.expect(tag::CONTEXT_0)?; // optionalSignature
        }
        if !fields.is_empty() {
            return Err(OcspError::Malformed("unexpected field after the signature"));
        }

        let mut tbs = Reader::new(tbs.content);
        let mut element = tbs.any()?;
        if element.tag == tag::CONTEXT_0 {
            let mut version = Reader::new(element.content);
            let number = version.expect(tag::INTEGER)?;
            if number.content != [0] || !version.is_empty() {
                return Err(OcspError::UnsupportedVersion);
            }
            element = tbs.any()?;
        }
        if element.tag == CONTEXT_1 {
            element = tbs.any()?; // requestorName: we answer anyone
        }
        if element.tag != tag::SEQUENCE {
            return Err(OcspError::Malformed("no request list"));
        }
        let certs = parse_request_list(element.content)?;
        let mut nonce = None;
        if !tbs.is_empty() {
            nonce = parse_extensions(tbs.expect(CONTEXT_2)?.content)?;
        }
        if !tbs.is_empty() {
            return Err(OcspError::Malformed(
                "unexpected field after the extensions",
            ));
        }
        Ok(OcspRequest { certs, nonce })
    }

    fn parse_request_list(content: &[u8]) -> Result<Vec<CertId>, OcspError> {
        let mut list = Reader::new(content);
        let mut certs = Vec::new();
        while !list.is_empty() {
            if certs.len() == MAX_CERT_IDS {
                return Err(OcspError::TooManyCertIds);
            }
            let request = list.expect(tag::SEQUENCE)?;
            let mut fields = Reader::new(request.content);
            let cert_id = fields.expect(tag::SEQUENCE)?;
            if !fields.is_empty() {
                // singleRequestExtensions: only checked for critical ones.
                parse_extensions(fields.expect(tag::CONTEXT_0)?.content)?;
            }
            if !fields.is_empty() {
                return Err(OcspError::Malformed("unexpected field in a Request"));
            }
            certs.push(parse_cert_id(cert_id.encoded)?);
        }
        if certs.is_empty() {
            return Err(OcspError::Malformed("empty request list"));
        }
        Ok(certs)
    }

    fn parse_cert_id(der: &[u8]) -> Result<CertId, OcspError> {
        let mut outer = Reader::new(der);
        let cert_id = outer.expect(tag::SEQUENCE)?;
        if !outer.is_empty() {
            return Err(OcspError::Malformed("trailing bytes after a CertID"));
        }
        let mut fields = Reader::new(cert_id.content);
        let mut algorithm = Reader::new(fields.expect(tag::SEQUENCE)?.content);
        let oid = algorithm.expect(tag::OID)?;
        if !algorithm.is_empty() && !algorithm.expect(NULL)?.content.is_empty() {
            return Err(OcspError::Malformed("hash parameters are not NULL"));
        }
        if !algorithm.is_empty() {
            return Err(OcspError::Malformed("hash algorithm has extra fields"));
        }
        let hash = OcspHash::from_oid(oid.content).ok_or(OcspError::UnsupportedHash)?;
        let issuer_name_hash = hash_value(fields.expect(OCTET_STRING)?, hash)?;
        let issuer_key_hash = hash_value(fields.expect(OCTET_STRING)?, hash)?;
        let serial = integer_magnitude(fields.expect(tag::INTEGER)?.content)?;
        if !fields.is_empty() {
            return Err(OcspError::Malformed("CertID has extra fields"));
        }
        Ok(CertId {
            hash,
            issuer_name_hash,
            issuer_key_hash,
            serial,
            der: der.to_vec(),
        })
    }

    fn hash_value(element: Element<'_>, hash: OcspHash) -> Result<Vec<u8>, OcspError> {
        if element.content.len() == hash.output_len() {
            Ok(element.content.to_vec())
        } else {
            Err(OcspError::Malformed("issuer hash has the wrong length"))
        }
    }

    /// The magnitude of a DER INTEGER that must be positive or zero: serials of
    /// our certificates always are, and DER allows exactly one encoding.
    fn integer_magnitude(content: &[u8]) -> Result<Vec<u8>, OcspError> {
        match content {
            [] => Err(OcspError::Malformed("empty INTEGER")),
            [first, ..] if first & 0x80 != 0 => Err(OcspError::Malformed("negative serial")),
            [0, second, ..] if second & 0x80 == 0 => {
                Err(OcspError::Malformed("INTEGER is not minimally encoded"))
            }
            [0, rest @ ..] if !rest.is_empty() => Ok(rest.to_vec()),
            _ => Ok(content.to_vec()),
        }
    }

    /// Walks an `[n] EXPLICIT Extensions` body; returns the nonce if present.
    fn parse_extensions(content: &[u8]) -> Result<Option<Vec<u8>>, OcspError> {
        let mut wrapper = Reader::new(content);
        let list = wrapper.expect(tag::SEQUENCE)?;
        if !wrapper.is_empty() {
            return Err(OcspError::Malformed("trailing bytes after extensions"));
        }
        let mut list = Reader::new(list.content);
        let mut nonce = None;
        while !list.is_empty() {
            let mut fields = Reader::new(list.expect(tag::SEQUENCE)?.content);
            let oid = fields.expect(tag::OID)?;
            let mut value = fields.any()?;
            let mut critical = false;
            if value.tag == BOOLEAN {
                critical = match value.content {
                    [byte] => *byte != 0,
                    _ => return Err(OcspError::Malformed("bad BOOLEAN")),
                };
                value = fields.any()?;
            }
            if value.tag != OCTET_STRING || !fields.is_empty() {
                return Err(OcspError::Malformed("bad extension"));
            }
            if oid.content == OID_NONCE {
                if nonce.is_some() {
                    return Err(OcspError::Malformed("two nonces"));
                }
                if value.content.is_empty() || value.content.len() > MAX_NONCE_LEN {
                    return Err(OcspError::Malformed("nonce length out of range"));
                }
                nonce = Some(value.content.to_vec());
            } else if critical {
                return Err(OcspError::UnsupportedCriticalExtension);
            }
        }
        Ok(nonce)
    }

    impl IssuingCa {
        /// Whether `id` names a certificate issued by this CA: its issuer hashes
        /// match our subject Name and public key, with the hash the client chose.
        /// The serial is not looked at: that is the registry's job.
        pub fn ocsp_issued_by_me(&self, id: &CertId) -> bool {
            match issuer_parts(self.certificate()) {
                Ok((name, key)) => {
                    id.issuer_name_hash == id.hash.digest(name)
                        && id.issuer_key_hash == id.hash.digest(key)
                }
                Err(_) => false,
            }
        }

        /// Signs a successful OCSP response answering `answers`, with the
        /// issuing CA's key and a responder ID by key hash. A CertID that
        /// [`IssuingCa::ocsp_issued_by_me`] rejects is answered `unknown`
        /// whatever status it comes with, so a serial that collides with another
        /// CA's is never vouched for. Times are unix seconds; `nonce` is
        /// [`OcspRequest::nonce`], echoed unchanged.
        pub fn ocsp_response(
            &self,
            answers: &[(CertId, CertStatus)],
            produced_at: i64,
            this_update: i64,
            next_update: Option<i64>,
            nonce: Option<&[u8]>,
        ) -> Result<Vec<u8>, CaError> {
            if answers.is_empty() {
                return Err(invalid("OCSP answers", "there are none"));
            }
            if next_update.is_some_and(|next| next <= this_update) {
                return Err(invalid(
                    "OCSP validity",
                    "nextUpdate is not after thisUpdate",
                ));
            }
            let (_, public_key) = issuer_parts(self.certificate())?;
            let responder_id = tlv(
                CONTEXT_2,
                &[&tlv(OCTET_STRING, &[&OcspHash::Sha1.digest(public_key)])],
            );
            let this_update = generalized_time(this_update)?;
            let next_update = next_update
                .map(|next| Ok::<_, CaError>(tlv(tag::CONTEXT_0, &[&generalized_time(next)?])))
                .transpose()?
                .unwrap_or_default();
            let mut responses = Vec::new();
            for (id, status) in answers {
                let status = if self.ocsp_issued_by_me(id) {
                    *status
                } else {
                    CertStatus::Unknown
                };
                responses.extend(tlv(
                    tag::SEQUENCE,
                    &[&id.der(), &status_der(status)?, &this_update, &next_update],
                ));
            }
            let extensions = match nonce {
                Some(nonce) => {
                    let extension = tlv(
                        tag::SEQUENCE,
                        &[&tlv(tag::OID, &[OID_NONCE]), &tlv(OCTET_STRING, &[nonce])],
                    );
                    tlv(CONTEXT_1, &[&tlv(tag::SEQUENCE, &[&extension])])
                }
                None => Vec::new(),
            };
            let response_data = tlv(
                tag::SEQUENCE,
                &[
                    &responder_id,
                    &generalized_time(produced_at)?,
                    &tlv(tag::SEQUENCE, &[&responses]),
                    &extensions,
                ],
            );

            let key = self.issuer().key();
            let algorithm = signature_algorithm(key.algorithm())?;
            let signature = key.sign(&response_data)?;
            let basic = tlv(
                tag::SEQUENCE,
                &[
                    &response_data,
                    &algorithm,
                    &tlv(tag::BIT_STRING, &[&[0], &signature]),
                ],
            );
            let response_bytes = tlv(
                tag::SEQUENCE,
                &[&tlv(tag::OID, &[OID_BASIC]), &tlv(OCTET_STRING, &[&basic])],
            );
            Ok(tlv(
                tag::SEQUENCE,
                &[
                    &tlv(ENUMERATED, &[&[0]]),
                    &tlv(tag::CONTEXT_0, &[&response_bytes]),
                ],
            ))
        }
    }

    fn status_der(status: CertStatus) -> Result<Vec<u8>, CaError> {
        Ok(match status {
            CertStatus::Good => tlv(IMPLICIT_0_PRIMITIVE, &[]),
            CertStatus::Revoked { revoked_at, reason } => {
                let reason = match reason {
                    Some(reason) if reason != RevocationReason::Unspecified => {
                        tlv(tag::CONTEXT_0, &[&tlv(ENUMERATED, &[&[reason.code()]])])
                    }
                    _ => Vec::new(),
                };
                tlv(
                    IMPLICIT_1_CONSTRUCTED,
                    &[&generalized_time(revoked_at)?, &reason],
                )
            }
            CertStatus::Unknown => tlv(IMPLICIT_2_PRIMITIVE, &[]),
        })
    }

    /// The AlgorithmIdentifier for the issuing key. ECDSA and EdDSA identifiers
    /// carry no parameters (RFC 5758, RFC 8410).
    fn signature_algorithm(algorithm: &rcgen::SignatureAlgorithm) -> Result<Vec<u8>, CaError> {
        let oid = if algorithm == &rcgen::PKCS_ECDSA_P256_SHA256 {
            OID_ECDSA_SHA256
        } else if algorithm == &rcgen::PKCS_ECDSA_P384_SHA384 {
            OID_ECDSA_SHA384
        } else if algorithm == &rcgen::PKCS_ED25519 {
            OID_ED25519
        } else {
            return Err(invalid(
                "issuing CA key",
                "OCSP signing supports ECDSA P-256, P-384 and Ed25519 keys only",
            ));
        };
        Ok(tlv(tag::SEQUENCE, &[&tlv(tag::OID, &[oid])]))
    }

    /// The issuer's DER subject Name and subjectPublicKey BIT STRING value: the
    /// two inputs of a CertID's issuer hashes.
    fn issuer_parts(certificate: &[u8]) -> Result<(&[u8], &[u8]), CaError> {
        let (_, parsed) = X509Certificate::from_der(certificate)
            .map_err(|e| invalid("issuer certificate", &e.to_string()))?;
        Ok((
            parsed.tbs_certificate.subject.as_raw(),
            crate::der::certificate_spki(certificate)
                .ok()
                .and_then(spki_key_bits)
                .ok_or_else(|| invalid("issuer certificate", "unreadable public key"))?,
        ))
    }

    fn spki_key_bits(spki: &[u8]) -> Option<&[u8]> {
        let mut outer = Reader::new(spki);
        let mut fields = Reader::new(outer.expect(tag::SEQUENCE).ok()?.content);
        fields.expect(tag::SEQUENCE).ok()?;
        let bits = fields.expect(tag::BIT_STRING).ok()?.content;
        // The hash covers the key bits without the unused-bits octet (RFC 6960).
        bits.split_first().map(|(_, key)| key)
    }

    fn invalid(what: &'static str, why: &str) -> CaError {
        CaError::Invalid {
            what,
            why: why.into(),
        }
    }

    /// DER GeneralizedTime `YYYYMMDDHHMMSSZ`: UTC, no fractional seconds, as
    /// RFC 5280 §4.1.2.5.2 requires of every time in a response.
    pub(super) fn generalized_time(unix: i64) -> Result<Vec<u8>, CaError> {
        let t = datetime(unix)?;
        if !(0..=9999).contains(&t.year()) {
            return Err(invalid("timestamp", "year out of range"));
        }
        let text = format!(
            "{:04}{:02}{:02}{:02}{:02}{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        );
        Ok(tlv(GENERALIZED_TIME, &[text.as_bytes()]))
    }

    /// A DER INTEGER from a non-negative magnitude.
    pub(super) fn unsigned_integer(magnitude: &[u8]) -> Vec<u8> {
        let start = magnitude
            .iter()
            .position(|&b| b != 0)
            .unwrap_or(magnitude.len().saturating_sub(1));
        let trimmed = magnitude.get(start..).unwrap_or(&[]);
        let pad: &[u8] = if trimmed.first().is_none_or(|&b| b & 0x80 != 0) {
            &[0]
        } else {
            &[]
        };
        tlv(tag::INTEGER, &[pad, trimmed])
    }

    /// One DER element whose content is the concatenation of `parts`. Responses
    /// are built bottom-up in memory: small, and the signature needs the
    /// finished ResponseData before the outer layers exist.
    pub(super) fn tlv(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut out = Vec::with_capacity(len + 6);
        out.push(tag);
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes = len.to_be_bytes();
            let skip = bytes.iter().take_while(|&&b| b == 0).count();
            out.push(0x80 | (bytes.len() - skip) as u8);
            out.extend_from_slice(&bytes[skip..]);
        }
        for part in parts {
            out.extend_from_slice(part);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::ocsp::*;
    use super::ocsp::{generalized_time, tlv, unsigned_integer};
    use super::*;
    use crate::ca::{create, pem_certificates};
    use crate::check::{check_csr, tests::csr_for};
    use crate::profile::{DeviceCertificate, Profile};
    use rand::{Rng, SeedableRng};
    use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
    use std::path::Path;
    use std::process::Command;

    struct Fixture {
        ca: crate::ca::NewCa,
        issuing: IssuingCa,
        now: i64,
    }

    fn fixture(label: &str) -> Fixture {
        let now = OffsetDateTime::now_utc();
        let ca = create(label, now).unwrap();
        let issuing = IssuingCa::from_pem(&ca.issuing_certificate, &ca.issuing_key).unwrap();
        Fixture {
            ca,
            issuing,
            now: now.unix_timestamp(),
        }
    }

    impl Fixture {
        fn device(&self, id: &str) -> DeviceCertificate {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
            let csr = check_csr(&csr_for(&key, id)).unwrap();
            self.issuing
                .issue(id, &csr, &Profile::default(), self.now)
                .unwrap()
        }

        /// Writes root.pem and issuing.pem into `dir`.
        fn write_chain(&self, dir: &Path) {
            std::fs::write(dir.join("root.pem"), &self.ca.root_certificate).unwrap();
            std::fs::write(dir.join("issuing.pem"), &self.ca.issuing_certificate).unwrap();
        }
    }

    fn write_pem(path: &Path, tag: &str, der: &[u8]) {
        std::fs::write(path, pem::encode(&pem::Pem::new(tag, der.to_vec()))).unwrap();
    }

    /// Runs openssl in `dir`; returns (success, stdout + stderr).
    fn openssl(dir: &Path, args: &[&str]) -> (bool, String) {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl is installed");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), text)
    }

    #[test]
    fn reasons_have_rfc_5280_codes_and_names() {
        let codes: Vec<u8> = RevocationReason::ALL.iter().map(|r| r.code()).collect();
        assert_eq!(codes, [0, 1, 3, 4, 5, 6]);
        for reason in RevocationReason::ALL {
            assert_eq!(reason.as_str().parse::<RevocationReason>(), Ok(reason));
            assert_eq!(RevocationReason::from_code(reason.code()), Some(reason));
            assert_eq!(reason.to_rcgen() as u8, reason.code());
        }
        assert_eq!(RevocationReason::from_code(2), None, "cACompromise");
        assert_eq!("KeyCompromise".parse::<RevocationReason>(), Err(BadReason));
        assert_eq!("".parse::<RevocationReason>(), Err(BadReason));
    }

    #[test]
    fn crl_is_accepted_by_openssl() {
        let f = fixture("crl");
        let good = f.device("good-1");
        let revoked = f.device("stolen-1");
        let held = f.device("held-1");
        let entries = [
            RevokedCertificate {
                serial: revoked.serial.clone(),
                revoked_at: f.now - 60,
                reason: RevocationReason::KeyCompromise,
            },
            RevokedCertificate {
                serial: held.serial.clone(),
                revoked_at: f.now - 30,
                reason: RevocationReason::CertificateHold,
            },
        ];
        let crl = f.issuing.crl(&entries, 42, f.now, f.now + 3600).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        f.write_chain(d);
        std::fs::write(d.join("crl.der"), &crl).unwrap();
        write_pem(&d.join("crl.pem"), "X509 CRL", &crl);
        write_pem(&d.join("good.pem"), "CERTIFICATE", &good.der);
        write_pem(&d.join("revoked.pem"), "CERTIFICATE", &revoked.der);

        let (ok, text) = openssl(
            d,
            &["crl", "-inform", "DER", "-in", "crl.der", "-noout", "-text"],
        );
        assert!(ok, "{text}");
        assert!(text.contains("Version 2"), "{text}");
        assert!(text.contains("X509v3 CRL Number"), "{text}");
        assert!(text.contains("42"), "{text}");
        assert!(text.contains("X509v3 Authority Key Identifier"), "{text}");
        let upper = |s: &crate::profile::Serial| s.to_string().to_uppercase();
        assert!(text.contains(&upper(&revoked.serial)), "{text}");
        assert!(text.contains(&upper(&held.serial)), "{text}");
        assert!(!text.contains(&upper(&good.serial)), "{text}");
        assert!(text.contains("Key Compromise"), "{text}");
        assert!(text.contains("Certificate Hold"), "{text}");

        // The CRL's signature and issuer match the issuing CA.
        let (ok, text) = openssl(
            d,
            &["crl", "-in", "crl.pem", "-noout", "-CAfile", "issuing.pem"],
        );
        assert!(ok && text.contains("verify OK"), "{text}");

        let verify = |cert: &str| {
            openssl(
                d,
                &[
                    "verify",
                    "-crl_check",
                    "-CAfile",
                    "root.pem",
                    "-untrusted",
                    "issuing.pem",
                    "-CRLfile",
                    "crl.pem",
                    cert,
                ],
            )
        };
        let (ok, text) = verify("good.pem");
        assert!(ok && text.contains("good.pem: OK"), "{text}");
        let (ok, text) = verify("revoked.pem");
        assert!(!ok && text.contains("certificate revoked"), "{text}");

        // openssl 3 detects the format, so the DER file as served over HTTP works too.
        let (ok, text) = openssl(
            d,
            &[
                "verify",
                "-crl_check",
                "-CAfile",
                "root.pem",
                "-untrusted",
                "issuing.pem",
                "-CRLfile",
                "crl.der",
                "revoked.pem",
            ],
        );
        assert!(!ok && text.contains("certificate revoked"), "{text}");
    }

    #[test]
    fn crl_refuses_duplicates_and_backwards_validity() {
        let f = fixture("crl2");
        let serial = crate::profile::Serial::random();
        let entry = RevokedCertificate {
            serial,
            revoked_at: f.now,
            reason: RevocationReason::Superseded,
        };
        assert!(
            f.issuing
                .crl(&[entry.clone(), entry.clone()], 1, f.now, f.now + 60)
                .is_err()
        );
        assert!(f.issuing.crl(&[entry], 1, f.now, f.now).is_err());
        let empty = f.issuing.crl(&[], u64::MAX, f.now, f.now + 60).unwrap();
        let (_, parsed) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(&empty).unwrap();
        assert_eq!(parsed.iter_revoked_certificates().count(), 0);
        assert_eq!(
            parsed.crl_number().map(|n| n.to_string()),
            Some(u64::MAX.to_string())
        );
    }

    /// `openssl ocsp -reqout` for `cert` issued by `issuer` (file names in `dir`).
    fn openssl_request(
        dir: &Path,
        issuer: &str,
        certs: &[&str],
        nonce: bool,
        out: &str,
    ) -> Vec<u8> {
        let mut args = vec!["ocsp", "-issuer", issuer];
        for cert in certs {
            args.extend(["-cert", cert]);
        }
        args.extend(["-reqout", out]);
        if !nonce {
            args.push("-no_nonce");
        }
        let (ok, text) = openssl(dir, &args);
        assert!(ok, "{text}");
        std::fs::read(dir.join(out)).unwrap()
    }

    /// `openssl ocsp -respin` printing the status of `cert` (issued by
    /// `issuer`). `-cert` makes openssl build a request of its own, so the
    /// nonce is checked apart, in [`openssl_check_request`].
    fn openssl_status(dir: &Path, response: &str, issuer: &str, cert: &str) -> String {
        openssl_status_with(dir, "-sha1", response, issuer, cert)
    }

    /// [`openssl_status`] with the CertID hash `-sha1` or `-sha256` (it must
    /// match the response's, or openssl finds no status).
    fn openssl_status_with(
        dir: &Path,
        hash: &str,
        response: &str,
        issuer: &str,
        cert: &str,
    ) -> String {
        let (ok, text) = openssl(
            dir,
            &[
                "ocsp",
                hash,
                "-respin",
                response,
                "-issuer",
                issuer,
                "-cert",
                cert,
                "-no_nonce",
                "-CAfile",
                "root.pem",
                "-verify_other",
                "issuing.pem",
                "-resp_text",
            ],
        );
        assert!(ok, "{text}");
        text
    }

    /// `openssl ocsp -reqin -respin`: checks the response against the request
    /// it answers (nonce included), and its signature through the chain to
    /// root.pem only (no `-issuer`, so openssl cannot fall back to trusting the
    /// issuer directly).
    fn openssl_check_request(dir: &Path, request: &str, response: &str) -> String {
        let (ok, text) = openssl(
            dir,
            &[
                "ocsp",
                "-reqin",
                request,
                "-respin",
                response,
                "-CAfile",
                "root.pem",
                "-verify_other",
                "issuing.pem",
                "-resp_text",
            ],
        );
        assert!(ok, "{text}");
        text
    }

    #[test]
    fn ocsp_answers_openssl_good_and_revoked() {
        let f = fixture("ocsp");
        let good = f.device("good-2");
        let revoked = f.device("stolen-2");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        f.write_chain(d);
        write_pem(&d.join("good.pem"), "CERTIFICATE", &good.der);
        write_pem(&d.join("revoked.pem"), "CERTIFICATE", &revoked.der);

        for nonce in [false, true] {
            let request_der = openssl_request(
                d,
                "issuing.pem",
                &["good.pem", "revoked.pem"],
                nonce,
                "req.der",
            );
            let request = parse_request(&request_der).unwrap();
            assert_eq!(request.nonce.is_some(), nonce);
            assert_eq!(request.certs.len(), 2);
            assert_eq!(request.certs[0].serial, good.serial.as_bytes());
            assert_eq!(request.certs[1].serial, revoked.serial.as_bytes());
            assert_eq!(request.certs[0].hash, OcspHash::Sha1);

            let answers: Vec<(CertId, CertStatus)> = request
                .certs
                .iter()
                .map(|id| {
                    assert!(f.issuing.ocsp_issued_by_me(id));
                    let status = if id.serial == revoked.serial.as_bytes() {
                        CertStatus::Revoked {
                            revoked_at: f.now - 120,
                            reason: Some(RevocationReason::KeyCompromise),
                        }
                    } else {
                        CertStatus::Good
                    };
                    (id.clone(), status)
                })
                .collect();
            let response = f
                .issuing
                .ocsp_response(
                    &answers,
                    f.now,
                    f.now,
                    Some(f.now + 3600),
                    request.nonce.as_deref(),
                )
                .unwrap();
            std::fs::write(d.join("resp.der"), &response).unwrap();

            let text = openssl_check_request(d, "req.der", "resp.der");
            assert!(text.contains("Response verify OK"), "{text}");
            assert!(
                !text.contains("WARNING"),
                "nonce echoed, times valid: {text}"
            );
            assert!(!text.contains("Nonce Verify error"), "{text}");
            assert_eq!(text.contains("OCSP Nonce"), nonce, "{text}");
            assert!(text.contains("Cert Status: good"), "{text}");
            assert!(text.contains("Cert Status: revoked"), "{text}");
            assert!(text.contains("Revocation Reason: keyCompromise"), "{text}");

            let text = openssl_status(d, "resp.der", "issuing.pem", "good.pem");
            assert!(text.contains("Response verify OK"), "{text}");
            assert!(text.contains("good.pem: good"), "{text}");
            let text = openssl_status(d, "resp.der", "issuing.pem", "revoked.pem");
            assert!(text.contains("Response verify OK"), "{text}");
            assert!(text.contains("revoked.pem: revoked"), "{text}");
            assert!(text.contains("Reason: keyCompromise"), "{text}");
        }

        // SHA-256 CertIDs match too.
        let (ok, text) = openssl(
            d,
            &[
                "ocsp",
                "-sha256",
                "-issuer",
                "issuing.pem",
                "-cert",
                "good.pem",
                "-reqout",
                "req256.der",
                "-no_nonce",
            ],
        );
        assert!(ok, "{text}");
        let request = parse_request(&std::fs::read(d.join("req256.der")).unwrap()).unwrap();
        assert_eq!(request.certs[0].hash, OcspHash::Sha256);
        assert!(f.issuing.ocsp_issued_by_me(&request.certs[0]));
        let response = f
            .issuing
            .ocsp_response(
                &[(request.certs[0].clone(), CertStatus::Good)],
                f.now,
                f.now,
                None,
                None,
            )
            .unwrap();
        std::fs::write(d.join("resp256.der"), &response).unwrap();
        let text = openssl_status_with(d, "-sha256", "resp256.der", "issuing.pem", "good.pem");
        assert!(
            text.contains("Response verify OK") && text.contains("good.pem: good"),
            "{text}"
        );
    }

    #[test]
    fn ocsp_answers_unknown_for_another_issuer() {
        let ours = fixture("ours");
        let theirs = fixture("theirs");
        let foreign = theirs.device("foreign-1");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        ours.write_chain(d);
        std::fs::write(d.join("their-issuing.pem"), &theirs.ca.issuing_certificate).unwrap();
        write_pem(&d.join("foreign.pem"), "CERTIFICATE", &foreign.der);

        let request_der =
            openssl_request(d, "their-issuing.pem", &["foreign.pem"], true, "req.der");
        let request = parse_request(&request_der).unwrap();
        let id = &request.certs[0];
        assert!(!ours.issuing.ocsp_issued_by_me(id));
        assert!(theirs.issuing.ocsp_issued_by_me(id));
        // Even if the registry wrongly says good (a serial collision), the
        // answer for another issuer's CertID is unknown.
        let response = ours
            .issuing
            .ocsp_response(
                &[(id.clone(), CertStatus::Good)],
                ours.now,
                ours.now,
                Some(ours.now + 600),
                request.nonce.as_deref(),
            )
            .unwrap();
        std::fs::write(d.join("resp.der"), &response).unwrap();
        // openssl rightly refuses to chain-verify an answer about a certificate
        // the signer did not issue ("root ca not trusted"): RFC 6960 §4.2.2.2
        // authorizes only the issuer or its delegate. `-VAfile` trusts our
        // issuing CA as a responder outright, which is what an operator who
        // points clients at this responder for all CAs would configure.
        let (ok, text) = openssl(
            d,
            &[
                "ocsp",
                "-reqin",
                "req.der",
                "-respin",
                "resp.der",
                "-VAfile",
                "issuing.pem",
                "-resp_text",
            ],
        );
        assert!(ok, "{text}");
        assert!(text.contains("Response verify OK"), "{text}");
        assert!(text.contains("Cert Status: unknown"), "{text}");
        assert!(
            !text.contains("WARNING") && !text.contains("Nonce Verify error"),
            "{text}"
        );
        let (ok, text) = openssl(
            d,
            &[
                "ocsp",
                "-respin",
                "resp.der",
                "-VAfile",
                "issuing.pem",
                "-issuer",
                "their-issuing.pem",
                "-cert",
                "foreign.pem",
                "-no_nonce",
            ],
        );
        assert!(ok && text.contains("Response verify OK"), "{text}");
        assert!(text.contains("foreign.pem: unknown"), "{text}");
    }

    #[test]
    fn ocsp_errors_are_bare_statuses() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for (status, code, name) in [
            (OcspResponseStatus::MalformedRequest, 1, "malformedrequest"),
            (OcspResponseStatus::InternalError, 2, "internalerror"),
            (OcspResponseStatus::TryLater, 3, "trylater"),
            (OcspResponseStatus::Unauthorized, 6, "unauthorized"),
        ] {
            let der = ocsp_error(status);
            assert_eq!(der, [0x30, 0x03, 0x0a, 0x01, code]);
            std::fs::write(d.join("err.der"), &der).unwrap();
            let (_, text) = openssl(
                d,
                &["ocsp", "-respin", "err.der", "-resp_text", "-noverify"],
            );
            assert!(text.to_lowercase().contains(name), "{text}");
        }
    }

    #[test]
    fn parsed_cert_ids_are_echoed_byte_for_byte() {
        let f = fixture("echo");
        let serial = [0x80, 0x01];
        let built = CertId::new(OcspHash::Sha256, f.issuing.certificate(), &serial).unwrap();
        assert!(f.issuing.ocsp_issued_by_me(&built));
        let canonical = built.der();
        assert_eq!(
            &canonical[canonical.len() - 5..],
            &[0x02, 0x03, 0x00, 0x80, 0x01]
        );

        // A client that leaves out the NULL parameters gets its encoding back.
        let algorithm = tlv(
            0x30,
            &[&tlv(
                0x06,
                &[&[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01]],
            )],
        );
        let no_null = tlv(
            0x30,
            &[
                &algorithm,
                &tlv(0x04, &[&built.issuer_name_hash]),
                &tlv(0x04, &[&built.issuer_key_hash]),
                &unsigned_integer(&serial),
            ],
        );
        let request = request_with(&[&no_null], None);
        let parsed = parse_request(&request).unwrap();
        assert_eq!(parsed.certs[0].der(), no_null);
        assert_eq!(parsed.certs[0].serial, serial);

        // Changing a field drops the stale encoding.
        let mut changed = parsed.certs[0].clone();
        changed.serial = vec![0x05];
        assert_ne!(changed.der(), no_null);
        assert_eq!(
            parse_request(&request_with(&[&changed.der()], None))
                .unwrap()
                .certs[0]
                .serial,
            [5]
        );
    }

    /// A minimal unsigned OCSPRequest around `cert_ids` and an optional nonce
    /// extension value.
    fn request_with(cert_ids: &[&[u8]], nonce: Option<&[u8]>) -> Vec<u8> {
        let requests: Vec<u8> = cert_ids.iter().flat_map(|id| tlv(0x30, &[id])).collect();
        let extensions = nonce
            .map(|n| {
                let nonce_oid = [0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x30, 0x01, 0x02];
                let ext = tlv(0x30, &[&tlv(0x06, &[&nonce_oid]), &tlv(0x04, &[n])]);
                tlv(0xa2, &[&tlv(0x30, &[&ext])])
            })
            .unwrap_or_default();
        tlv(
            0x30,
            &[&tlv(0x30, &[&tlv(0x30, &[&requests]), &extensions])],
        )
    }

    fn sample_cert_id() -> Vec<u8> {
        CertId::new(OcspHash::Sha1, &fixture_certificate(), &[0x42; 16])
            .unwrap()
            .der()
    }

    fn fixture_certificate() -> Vec<u8> {
        let ca = create("sample", OffsetDateTime::now_utc()).unwrap();
        pem_certificates(&ca.issuing_certificate).unwrap().remove(0)
    }

    #[test]
    fn requests_over_the_limits_are_refused() {
        let id = sample_cert_id();
        let seventeen: Vec<&[u8]> = (0..=MAX_CERT_IDS).map(|_| id.as_slice()).collect();
        assert_eq!(
            parse_request(&request_with(&seventeen, None)),
            Err(OcspError::TooManyCertIds)
        );
        assert_eq!(
            parse_request(&request_with(&seventeen[..MAX_CERT_IDS], None))
                .unwrap()
                .certs
                .len(),
            MAX_CERT_IDS
        );
        assert_eq!(
            parse_request(&vec![0u8; MAX_REQUEST_LEN + 1]),
            Err(OcspError::TooLarge(MAX_REQUEST_LEN + 1))
        );
        assert!(
            parse_request(&request_with(&[], None)).is_err(),
            "no CertID"
        );
        assert!(parse_request(&request_with(&[&id], Some(&[]))).is_err());
        assert!(parse_request(&request_with(&[&id], Some(&[1; MAX_NONCE_LEN + 1]))).is_err());
        let nonce = [0x04, 0x02, 0xaa, 0xbb];
        assert_eq!(
            parse_request(&request_with(&[&id], Some(&nonce)))
                .unwrap()
                .nonce,
            Some(nonce.to_vec())
        );

        let mut trailing = request_with(&[&id], None);
        trailing.push(0);
        assert_eq!(
            parse_request(&trailing),
            Err(OcspError::Malformed("trailing bytes"))
        );

        // A critical extension we do not know is refused; a non-critical one is ignored.
        let extension = |critical: &[u8]| {
            let ext = tlv(
                0x30,
                &[
                    &tlv(0x06, &[&[0x2a, 0x03]]),
                    critical,
                    &tlv(0x04, &[&[0x05, 0x00]]),
                ],
            );
            let tbs = tlv(
                0x30,
                &[
                    &tlv(0x30, &[&tlv(0x30, &[&id])]),
                    &tlv(0xa2, &[&tlv(0x30, &[&ext])]),
                ],
            );
            tlv(0x30, &[&tbs])
        };
        assert_eq!(
            parse_request(&extension(&[0x01, 0x01, 0xff])),
            Err(OcspError::UnsupportedCriticalExtension)
        );
        assert!(parse_request(&extension(&[])).is_ok());

        let mut sha512 = id.clone();
        let at = sha512
            .windows(5)
            .position(|w| w == [0x2b, 0x0e, 0x03, 0x02, 0x1a])
            .unwrap();
        sha512[at + 4] = 0x1b;
        assert_eq!(
            parse_request(&request_with(&[&sha512], None)),
            Err(OcspError::UnsupportedHash)
        );
        assert_eq!(
            OcspError::UnsupportedHash.status(),
            OcspResponseStatus::MalformedRequest
        );
    }

    #[test]
    fn garbage_never_panics() {
        let id = sample_cert_id();
        let valid = request_with(&[&id, &id], Some(&[0x04, 0x01, 0x07]));
        parse_request(&valid).unwrap();
        for len in 0..valid.len() {
            assert!(parse_request(&valid[..len]).is_err(), "truncated at {len}");
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x1d_6a7e);
        for _ in 0..20_000 {
            // Half pure noise, half single-byte mutations of a valid request,
            // which get past the outer layers and reach the inner parsers.
            let input: Vec<u8> = if rng.r#gen() {
                let len = rng.gen_range(0..200);
                (0..len).map(|_| rng.r#gen()).collect()
            } else {
                let mut mutated = valid.clone();
                let at = rng.gen_range(0..mutated.len());
                mutated[at] = rng.r#gen();
                mutated
            };
            let _ = parse_request(&input);
        }
    }

    #[test]
    fn generalized_time_is_der() {
        let encoded = generalized_time(0).unwrap();
        assert_eq!(encoded, b"\x18\x0f19700101000000Z");
        let encoded = generalized_time(4_102_444_799).unwrap();
        assert_eq!(&encoded[2..], b"20991231235959Z");
        assert!(generalized_time(i64::MAX).is_err());
    }

    #[test]
    fn ocsp_response_refuses_bad_arguments() {
        let f = fixture("args");
        let id = CertId::new(OcspHash::Sha1, f.issuing.certificate(), &[1]).unwrap();
        assert!(
            f.issuing
                .ocsp_response(&[], f.now, f.now, None, None)
                .is_err()
        );
        assert!(
            f.issuing
                .ocsp_response(&[(id, CertStatus::Good)], f.now, f.now, Some(f.now), None)
                .is_err()
        );
    }
}
