//! The certificate chain check: a new certificate is taken only if its
//! ECDSA P-256 / SHA-256 signatures lead, through the chain in the reply
//! (issuer first), to one of the device's pinned roots. Without it, anyone on
//! the broker who learns a request id could hand the device a certificate for
//! its own new key that no server would accept, and the device would drop a
//! working credential for it.
//!
//! Checked per link: the issuer's subject equals the subject's issuer (DER
//! bytes), both algorithms are ecdsa-with-SHA256, the issuer's key is a P-256
//! point, the signature verifies. Not checked: validity periods (the device
//! may not know the time; the gateway sent the certificate just now) and
//! extensions (basicConstraints, keyUsage) — the pinned root vouches for the
//! issuers it signed.

use core::fmt;

use idgate_pki::der::{DerError, Reader, certificate_parts, tag};
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use sha2::{Digest, Sha256};

/// Most CA certificates walked below the pinned root.
const MAX_DEPTH: usize = 3;

/// ecdsa-with-SHA256, 1.2.840.10045.4.3.2, as an AlgorithmIdentifier (no
/// parameters).
const ECDSA_WITH_SHA256: &[u8] = &[
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
];
/// id-ecPublicKey with namedCurve prime256v1, as an AlgorithmIdentifier.
const P256_KEY: &[u8] = &[
    0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48,
    0xce, 0x3d, 0x03, 0x01, 0x07,
];

/// Why a certificate chain was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChainError {
    /// A certificate in the chain (or a pinned root) could not be parsed.
    Malformed(DerError),
    /// A signature or key algorithm other than ECDSA P-256 with SHA-256.
    UnsupportedAlgorithm,
    /// A certificate's issuer name is not its issuer's subject name.
    NameMismatch,
    /// A signature does not verify.
    BadSignature,
    /// The chain is longer than the agent walks.
    TooLong,
}

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChainError::Malformed(e) => write!(f, "malformed certificate: {e}"),
            ChainError::UnsupportedAlgorithm => f.write_str("not ECDSA P-256 with SHA-256"),
            ChainError::NameMismatch => f.write_str("issuer name does not match"),
            ChainError::BadSignature => f.write_str("signature does not verify"),
            ChainError::TooLong => f.write_str("chain too long"),
        }
    }
}

impl core::error::Error for ChainError {}

impl From<DerError> for ChainError {
    fn from(e: DerError) -> Self {
        ChainError::Malformed(e)
    }
}

/// Most pinned roots a device keeps (two: the current root and its successor
/// during a root rollover).
pub const MAX_PINNED_ROOTS: usize = 2;

/// A pinned root, reduced to what a check needs (about 170 bytes instead of
/// the whole certificate): digests of its certificate and subject name, and
/// its public key.
#[derive(Clone, Debug)]
pub(crate) struct Anchor {
    certificate: [u8; 32],
    subject: [u8; 32],
    key: VerifyingKey,
}

impl Anchor {
    pub(crate) fn from_der(root: &[u8]) -> Result<Anchor, ChainError> {
        let (tbs, _, _) = certificate_parts(root)?;
        let tbs = tbs_fields(tbs)?;
        if tbs.key_algorithm != P256_KEY {
            return Err(ChainError::UnsupportedAlgorithm);
        }
        Ok(Anchor {
            certificate: Sha256::digest(root).into(),
            subject: Sha256::digest(tbs.subject).into(),
            key: VerifyingKey::from_sec1_bytes(tbs.public_key)
                .map_err(|_| ChainError::Malformed(DerError::Invalid))?,
        })
    }
}

/// The pinned roots of one request.
pub(crate) type Anchors = heapless::Vec<Anchor, MAX_PINNED_ROOTS>;

/// Checks that `certificate` leads through `chain` (issuer first) to one of
/// `anchors`. The walk stops at the first chain certificate that is itself a
/// pinned root (a gateway may or may not send the root along); otherwise the
/// last chain certificate must be signed by a pinned root.
pub(crate) fn verify<'a>(
    certificate: &[u8],
    chain: impl Iterator<Item = &'a [u8]>,
    anchors: &[Anchor],
) -> Result<(), ChainError> {
    let mut subject = certificate;
    for (depth, issuer) in chain.enumerate() {
        let digest: [u8; 32] = Sha256::digest(issuer).into();
        if let Some(anchor) = anchors.iter().find(|a| a.certificate == digest) {
            return verify_by_anchor(subject, anchor);
        }
        if depth >= MAX_DEPTH {
            return Err(ChainError::TooLong);
        }
        let (issuer_tbs, _, _) = certificate_parts(issuer)?;
        let issuer_tbs = tbs_fields(issuer_tbs)?;
        if issuer_tbs.key_algorithm != P256_KEY {
            return Err(ChainError::UnsupportedAlgorithm);
        }
        let key = VerifyingKey::from_sec1_bytes(issuer_tbs.public_key)
            .map_err(|_| ChainError::Malformed(DerError::Invalid))?;
        verify_signed(subject, |name| name == issuer_tbs.subject, &key)?;
        subject = issuer;
    }
    // The last certificate must be signed by a pinned root; report the most
    // telling failure if none signs it.
    let mut error = ChainError::NameMismatch;
    for anchor in anchors {
        match verify_by_anchor(subject, anchor) {
            Ok(()) => return Ok(()),
            Err(ChainError::NameMismatch) => {}
            Err(e) => error = e,
        }
    }
    Err(error)
}

fn verify_by_anchor(subject: &[u8], anchor: &Anchor) -> Result<(), ChainError> {
    verify_signed(
        subject,
        |name| <[u8; 32]>::from(Sha256::digest(name)) == anchor.subject,
        &anchor.key,
    )
}

/// The fields of a TBSCertificate one link needs.
struct Tbs<'a> {
    signature_algorithm: &'a [u8],
    issuer: &'a [u8],
    subject: &'a [u8],
    key_algorithm: &'a [u8],
    public_key: &'a [u8],
}

fn tbs_fields(tbs: &[u8]) -> Result<Tbs<'_>, DerError> {
    let mut outer = Reader::new(tbs);
    let mut tbs = Reader::new(outer.expect(tag::SEQUENCE)?.content);
    let mut element = tbs.any()?;
    if element.tag == tag::CONTEXT_0 {
        element = tbs.any()?; // version present: next is the serial
    }
    if element.tag != tag::INTEGER {
        return Err(DerError::Invalid);
    }
    let signature_algorithm = tbs.expect(tag::SEQUENCE)?.encoded;
    let issuer = tbs.expect(tag::SEQUENCE)?.encoded;
    tbs.expect(tag::SEQUENCE)?; // validity
    let subject = tbs.expect(tag::SEQUENCE)?.encoded;
    let mut spki = Reader::new(tbs.expect(tag::SEQUENCE)?.content);
    let key_algorithm = spki.expect(tag::SEQUENCE)?.encoded;
    let key = spki.expect(tag::BIT_STRING)?.content;
    let public_key = match key.split_first() {
        Some((0, point)) => point,
        _ => return Err(DerError::Invalid),
    };
    Ok(Tbs {
        signature_algorithm,
        issuer,
        subject,
        key_algorithm,
        public_key,
    })
}

/// Checks that the holder of `key`, whose subject name `issuer_is` accepts,
/// signed `subject`.
fn verify_signed(
    subject: &[u8],
    issuer_is: impl Fn(&[u8]) -> bool,
    key: &VerifyingKey,
) -> Result<(), ChainError> {
    let (tbs_bytes, algorithm, signature) = certificate_parts(subject)?;
    let tbs = tbs_fields(tbs_bytes)?;
    if algorithm != ECDSA_WITH_SHA256 || tbs.signature_algorithm != ECDSA_WITH_SHA256 {
        return Err(ChainError::UnsupportedAlgorithm);
    }
    if !issuer_is(tbs.issuer) {
        return Err(ChainError::NameMismatch);
    }
    let signature = ecdsa_signature(signature)?;
    key.verify(tbs_bytes, &signature)
        .map_err(|_| ChainError::BadSignature)
}

/// An ECDSA-Sig-Value (`SEQUENCE { r INTEGER, s INTEGER }`) as a signature.
fn ecdsa_signature(der: &[u8]) -> Result<Signature, ChainError> {
    let mut outer = Reader::new(der);
    let sequence = outer.expect(tag::SEQUENCE)?;
    if !outer.is_empty() {
        return Err(DerError::Invalid.into());
    }
    let mut values = Reader::new(sequence.content);
    let r = scalar(values.expect(tag::INTEGER)?.content)?;
    let s = scalar(values.expect(tag::INTEGER)?.content)?;
    if !values.is_empty() {
        return Err(DerError::Invalid.into());
    }
    Signature::from_scalars(r, s).map_err(|_| ChainError::BadSignature)
}

/// A positive DER INTEGER as 32 big-endian bytes.
fn scalar(integer: &[u8]) -> Result<[u8; 32], ChainError> {
    let magnitude = match integer {
        [0, rest @ ..] => rest,
        _ => integer,
    };
    if magnitude.len() > 32 || integer.first().is_some_and(|&b| b & 0x80 != 0) {
        return Err(ChainError::BadSignature);
    }
    let mut out = [0u8; 32];
    out[32 - magnitude.len()..].copy_from_slice(magnitude);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    extern crate std;
    use std::vec::Vec;

    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

    /// A CA (root or intermediate) named `name`: its DER and its issuer.
    fn ca(name: &str, parent: Option<&Issuer<'_, KeyPair>>) -> (Vec<u8>, Issuer<'static, KeyPair>) {
        let mut params = CertificateParams::new(Vec::<std::string::String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let certificate = match parent {
            Some(parent) => params.signed_by(&key, parent).unwrap(),
            None => params.self_signed(&key).unwrap(),
        };
        (certificate.der().to_vec(), Issuer::new(params, key))
    }

    fn leaf(issuer: &Issuer<'_, KeyPair>) -> Vec<u8> {
        let mut params = CertificateParams::new(Vec::<std::string::String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "sensor");
        let key = KeyPair::generate().unwrap();
        params.signed_by(&key, issuer).unwrap().der().to_vec()
    }

    fn chain<'a, 'b>(certificates: &'b [&'a [u8]]) -> impl Iterator<Item = &'a [u8]> + 'b {
        certificates.iter().copied()
    }

    fn anchors(roots: &[&[u8]]) -> Vec<Anchor> {
        roots.iter().map(|r| Anchor::from_der(r).unwrap()).collect()
    }

    #[test]
    fn chains_through_an_intermediate() {
        let (root, root_issuer) = ca("root", None);
        let (intermediate, intermediate_issuer) = ca("issuing", Some(&root_issuer));
        let device = leaf(&intermediate_issuer);
        let (other_root, other_issuer) = ca("root", None);
        let pinned = anchors(&[&root]);

        // The gateway may or may not send the root along.
        assert_eq!(verify(&device, chain(&[&intermediate]), &pinned), Ok(()));
        assert_eq!(
            verify(&device, chain(&[&intermediate, &root]), &pinned),
            Ok(())
        );
        // Either of two pinned roots will do (a root rollover).
        assert_eq!(
            verify(
                &device,
                chain(&[&intermediate]),
                &anchors(&[&other_root, &root])
            ),
            Ok(())
        );
        // The intermediate left out: its name is not the root's.
        assert_eq!(
            verify(&device, chain(&[]), &pinned),
            Err(ChainError::NameMismatch)
        );
        // Another root of the same name did not sign the intermediate.
        assert_eq!(
            verify(&device, chain(&[&intermediate]), &anchors(&[&other_root])),
            Err(ChainError::BadSignature)
        );
        // An intermediate of the same name under another root.
        let (fake_intermediate, fake_issuer) = ca("issuing", Some(&other_issuer));
        assert_eq!(
            verify(&leaf(&fake_issuer), chain(&[&fake_intermediate]), &pinned),
            Err(ChainError::BadSignature)
        );
        assert_eq!(
            verify(&device, chain(&[&fake_intermediate]), &pinned),
            Err(ChainError::BadSignature)
        );
        // A flipped bit anywhere in the signed part.
        let mut tampered = device.clone();
        let at = tampered.len() / 2;
        tampered[at] ^= 1;
        assert!(verify(&tampered, chain(&[&intermediate]), &pinned).is_err());
        // Chains longer than MAX_DEPTH are not walked: three CAs below the root
        // are accepted, four are not.
        let (i1, i1_issuer) = ca("i1", Some(&root_issuer));
        let (i2, i2_issuer) = ca("i2", Some(&i1_issuer));
        let (i3, i3_issuer) = ca("i3", Some(&i2_issuer));
        let (i4, i4_issuer) = ca("i4", Some(&i3_issuer));
        let three_below = leaf(&i3_issuer);
        assert_eq!(
            verify(&three_below, chain(&[&i3, &i2, &i1]), &pinned),
            Ok(())
        );
        assert_eq!(
            verify(&three_below, chain(&[&i3, &i2, &i1, &root]), &pinned),
            Ok(())
        );
        assert_eq!(
            verify(&leaf(&i4_issuer), chain(&[&i4, &i3, &i2, &i1]), &pinned),
            Err(ChainError::TooLong)
        );
    }

    #[test]
    fn every_truncation_is_refused_without_panic() {
        let (root, root_issuer) = ca("root", None);
        let device = leaf(&root_issuer);
        let pinned = anchors(&[&root]);
        for cut in 0..device.len() {
            assert!(verify(&device[..cut], core::iter::empty(), &pinned).is_err());
            assert!(verify(&device, core::iter::once(&root[..cut]), &pinned).is_err());
        }
        assert_eq!(verify(&device, core::iter::empty(), &pinned), Ok(()));
    }

    #[test]
    fn scalars_are_padded_and_bounded() {
        assert_eq!(scalar(&[0x01]).unwrap()[31], 1);
        let mut high = [0u8; 33];
        high[1] = 0x80;
        assert_eq!(scalar(&high).unwrap()[0], 0x80);
        assert_eq!(scalar(&[0x80]), Err(ChainError::BadSignature));
        assert_eq!(scalar(&[1u8; 33]), Err(ChainError::BadSignature));
    }

    #[test]
    fn garbage_never_verifies() {
        for bad in [&[][..], &[0x30, 0x00], &[0x30, 0x03, 0x30, 0x01, 0x00]] {
            assert!(Anchor::from_der(bad).is_err());
            assert!(verify(bad, core::iter::once(bad), &[]).is_err());
        }
        assert!(ecdsa_signature(&[0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x00]).is_err());
    }
}
