//! Building a PKCS#10 certification request (RFC 2986) for a P-256 key on the
//! device: no heap, and the private key never needed (the caller signs a digest,
//! so a secure element can hold the key).
//!
//! The gateway takes only the public key and the proof of possession from a CSR;
//! the subject is written (CN = device id) for the benefit of people reading it.

use core::fmt;

use sha2::{Digest, Sha256};

use crate::der::{DerError, Writer, tag};

/// Uncompressed SEC1 P-256 public key: `04 || X || Y`.
pub type P256PublicKey = [u8; 65];
/// ECDSA P-256 signature as fixed-size `r || s`, big-endian.
pub type P256Signature = [u8; 64];

/// Largest CSR this module builds (a 64-byte device id gives ~ 300 bytes).
pub const MAX_P256_CSR: usize = 384;
/// Length of the DER SubjectPublicKeyInfo of a P-256 key.
pub const P256_SPKI_LEN: usize = 91;

const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_PRIME256V1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_ECDSA_WITH_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];

/// A CSR could not be built.
#[derive(Debug, PartialEq, Eq)]
pub enum CsrError<E> {
    /// The output buffer is too small.
    BufferTooSmall,
    /// The public key is not an uncompressed SEC1 point.
    BadPublicKey,
    /// The signer failed (a hardware fault, typically).
    Sign(E),
}

impl<E: fmt::Display> fmt::Display for CsrError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CsrError::BufferTooSmall => f.write_str("CSR buffer too small"),
            CsrError::BadPublicKey => f.write_str("public key is not an uncompressed P-256 point"),
            CsrError::Sign(e) => write!(f, "signing the CSR failed: {e}"),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> core::error::Error for CsrError<E> {}

impl<E> From<DerError> for CsrError<E> {
    fn from(_: DerError) -> Self {
        CsrError::BufferTooSmall
    }
}

/// Writes the DER SubjectPublicKeyInfo of a P-256 key (what a certificate issued
/// for the key will contain, byte for byte).
pub fn write_p256_spki(w: &mut Writer<'_>, public_key: &P256PublicKey) -> Result<(), DerError> {
    w.constructed(tag::SEQUENCE, |w| {
        w.constructed(tag::SEQUENCE, |w| {
            w.primitive(tag::OID, OID_EC_PUBLIC_KEY)?;
            w.primitive(tag::OID, OID_PRIME256V1)
        })?;
        w.bit_string(public_key)
    })
}

/// The DER SubjectPublicKeyInfo of a P-256 key.
pub fn p256_spki(public_key: &P256PublicKey) -> [u8; P256_SPKI_LEN] {
    let mut out = [0u8; P256_SPKI_LEN];
    let mut w = Writer::new(&mut out);
    // A fixed-size structure written into a buffer of exactly its size.
    let written = write_p256_spki(&mut w, public_key).map(|()| w.position());
    debug_assert_eq!(written, Ok(P256_SPKI_LEN));
    out
}

/// Builds a DER PKCS#10 request with subject `CN=common_name` for `public_key`,
/// signed with ECDSA-SHA256 by `sign`, which receives the SHA-256 digest of the
/// CertificationRequestInfo. Returns the length written to `out`.
pub fn build_p256_csr<E>(
    common_name: &str,
    public_key: &P256PublicKey,
    sign: impl FnOnce(&[u8; 32]) -> Result<P256Signature, E>,
    out: &mut [u8],
) -> Result<usize, CsrError<E>> {
    if public_key[0] != 0x04 {
        return Err(CsrError::BadPublicKey);
    }
    // The info is written after room for the largest outer header (4 bytes), then
    // the header is written just before it and everything moved to the start.
    const HEADER_ROOM: usize = 4;
    let info_region = out.get_mut(HEADER_ROOM..).ok_or(CsrError::BufferTooSmall)?;
    let mut w = Writer::new(info_region);
    w.constructed(tag::SEQUENCE, |w| {
        w.unsigned_integer(&[0])?; // version 1
        w.constructed(tag::SEQUENCE, |w| {
            w.constructed(tag::SET, |w| {
                w.constructed(tag::SEQUENCE, |w| {
                    w.primitive(tag::OID, OID_COMMON_NAME)?;
                    w.primitive(tag::UTF8_STRING, common_name.as_bytes())
                })
            })
        })?;
        write_p256_spki(w, public_key)?;
        w.primitive(tag::CONTEXT_0, &[]) // no attributes
    })?;
    let info_len = w.position();
    let digest: [u8; 32] = Sha256::digest(&out[HEADER_ROOM..HEADER_ROOM + info_len]).into();
    let signature = sign(&digest).map_err(CsrError::Sign)?;

    let tail_start = HEADER_ROOM + info_len;
    let tail = out.get_mut(tail_start..).ok_or(CsrError::BufferTooSmall)?;
    let mut w = Writer::new(tail);
    w.constructed(tag::SEQUENCE, |w| {
        w.primitive(tag::OID, OID_ECDSA_WITH_SHA256)
    })?;
    let mut signature_der = [0u8; 72];
    let mut sw = Writer::new(&mut signature_der);
    sw.constructed(tag::SEQUENCE, |w| {
        w.unsigned_integer(&signature[..32])?;
        w.unsigned_integer(&signature[32..])
    })?;
    let signature_len = sw.position();
    w.bit_string(&signature_der[..signature_len])?;
    let content_len = info_len + w.position();

    let mut header = [0u8; HEADER_ROOM];
    let mut hw = Writer::new(&mut header);
    write_length_header(&mut hw, content_len)?;
    let header_len = hw.position();
    let start = HEADER_ROOM - header_len;
    out[start..HEADER_ROOM].copy_from_slice(&header[..header_len]);
    out.copy_within(start..HEADER_ROOM + content_len, 0);
    Ok(header_len + content_len)
}

fn write_length_header(w: &mut Writer<'_>, len: usize) -> Result<(), DerError> {
    match len {
        0..=0x7f => w.raw(&[tag::SEQUENCE, len as u8]),
        0x80..=0xff => w.raw(&[tag::SEQUENCE, 0x81, len as u8]),
        0x100..=0xffff => {
            let [hi, lo] = (len as u16).to_be_bytes();
            w.raw(&[tag::SEQUENCE, 0x82, hi, lo])
        }
        _ => Err(DerError::Invalid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::hazmat::PrehashSigner;
    use p256::ecdsa::{Signature, SigningKey};

    fn key() -> SigningKey {
        SigningKey::random(&mut rand::rngs::OsRng)
    }

    fn public(key: &SigningKey) -> P256PublicKey {
        let point = key.verifying_key().to_encoded_point(false);
        point.as_bytes().try_into().unwrap()
    }

    fn build(id: &str, key: &SigningKey) -> std::vec::Vec<u8> {
        let mut out = [0u8; MAX_P256_CSR];
        let n = build_p256_csr(
            id,
            &public(key),
            |digest| {
                let signature: Signature = key.sign_prehash(digest)?;
                Ok::<_, p256::ecdsa::Error>(signature.to_bytes().into())
            },
            &mut out,
        )
        .unwrap();
        out[..n].to_vec()
    }

    #[test]
    fn csr_verifies_with_an_independent_parser() {
        use x509_parser::prelude::FromDer;
        for id in ["a", "sensor-0001", &"x".repeat(64)] {
            let key = key();
            let der = build(id, &key);
            let (rest, csr) =
                x509_parser::certification_request::X509CertificationRequest::from_der(&der)
                    .unwrap();
            assert!(rest.is_empty());
            csr.verify_signature().unwrap();
            let cn = csr
                .certification_request_info
                .subject
                .iter_common_name()
                .next()
                .unwrap();
            assert_eq!(cn.as_str().unwrap(), id);
            assert_eq!(
                csr.certification_request_info.subject_pki.raw,
                &p256_spki(&public(&key))[..]
            );
        }
    }

    #[test]
    fn small_buffers_and_bad_keys_are_errors() {
        let key = key();
        let sign = |_: &[u8; 32]| Ok::<_, ()>([1u8; 64]);
        assert_eq!(
            build_p256_csr("a", &public(&key), sign, &mut [0u8; 100]),
            Err(CsrError::BufferTooSmall)
        );
        assert_eq!(
            build_p256_csr("a", &[0u8; 65], sign, &mut [0u8; MAX_P256_CSR]),
            Err(CsrError::BadPublicKey)
        );
        assert_eq!(
            build_p256_csr(
                "a",
                &public(&key),
                |_| Err::<P256Signature, _>("no"),
                &mut [0u8; MAX_P256_CSR]
            ),
            Err(CsrError::Sign("no"))
        );
    }
}
