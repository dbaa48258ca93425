//! Checks a device's CSR before anything is signed: well-formed DER, an accepted
//! key type and signature algorithm, and a valid self-signature (proof that the
//! requester holds the private key). Only the public key survives the check; the
//! gateway ignores everything else a CSR asks for.

use sha2::{Digest, Sha256};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;

use crate::protocol::{MAX_CSR, RejectCode};

/// Key types the device certificate profile accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyType {
    /// ECDSA on NIST P-256, signatures with SHA-256.
    P256,
    /// Ed25519.
    Ed25519,
}

impl KeyType {
    /// Short name for logs and the registry.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::P256 => "p256",
            KeyType::Ed25519 => "ed25519",
        }
    }
}

/// A CSR that passed every check: what the gateway keeps of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedCsr {
    /// The DER SubjectPublicKeyInfo, copied into the certificate unchanged.
    pub spki: Vec<u8>,
    /// The key type.
    pub key_type: KeyType,
    /// SHA-256 of `spki`: the key's identity in the registry.
    pub key_fingerprint: [u8; 32],
}

/// Why a CSR was refused. Maps onto the wire codes `bad_csr`, `weak_key` and `too_large`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CsrRejection {
    /// Not DER PKCS#10, trailing bytes, or an unknown version.
    #[error("CSR is not a well-formed PKCS#10 request: {0}")]
    Malformed(String),
    /// The self-signature does not verify.
    #[error("CSR signature does not verify")]
    BadSignature,
    /// A key type or curve outside the profile.
    #[error("key type not accepted: {0} (use ECDSA P-256 or Ed25519)")]
    UnsupportedKey(String),
    /// A signature algorithm outside the profile, or one that does not match the key.
    #[error("signature algorithm not accepted: {0}")]
    UnsupportedSignature(String),
    /// Larger than [`MAX_CSR`].
    #[error("CSR is larger than {MAX_CSR} bytes")]
    TooLarge,
}

impl CsrRejection {
    /// The wire code for this rejection.
    pub fn code(&self) -> RejectCode {
        match self {
            CsrRejection::Malformed(_) | CsrRejection::BadSignature => RejectCode::BadCsr,
            CsrRejection::UnsupportedKey(_) | CsrRejection::UnsupportedSignature(_) => {
                RejectCode::WeakKey
            }
            CsrRejection::TooLarge => RejectCode::TooLarge,
        }
    }
}

/// Parses and checks a DER CSR.
pub fn check_csr(der: &[u8]) -> Result<CheckedCsr, CsrRejection> {
    if der.len() > MAX_CSR {
        return Err(CsrRejection::TooLarge);
    }
    let (rest, csr) = X509CertificationRequest::from_der(der)
        .map_err(|e| CsrRejection::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrRejection::Malformed(
            "trailing bytes after the CSR".into(),
        ));
    }
    let info = &csr.certification_request_info;
    if info.version.0 != 0 {
        return Err(CsrRejection::Malformed(format!(
            "version {} (only version 1 exists)",
            info.version.0
        )));
    }
    let spki = &info.subject_pki;
    let key_algorithm = &spki.algorithm.algorithm;
    let key_type = if *key_algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or_else(|| CsrRejection::UnsupportedKey("EC key without a named curve".into()))?;
        if curve != OID_EC_P256 {
            return Err(CsrRejection::UnsupportedKey(format!("EC curve {curve}")));
        }
        KeyType::P256
    } else if *key_algorithm == OID_SIG_ED25519 {
        KeyType::Ed25519
    } else {
        return Err(CsrRejection::UnsupportedKey(format!(
            "key algorithm {key_algorithm}"
        )));
    };
    let signature_algorithm = &csr.signature_algorithm.algorithm;
    let expected = match key_type {
        KeyType::P256 => &OID_SIG_ECDSA_WITH_SHA256,
        KeyType::Ed25519 => &OID_SIG_ED25519,
    };
    if signature_algorithm != expected {
        return Err(CsrRejection::UnsupportedSignature(format!(
            "{signature_algorithm} with a {} key",
            key_type.as_str()
        )));
    }
    csr.verify_signature()
        .map_err(|_| CsrRejection::BadSignature)?;
    Ok(CheckedCsr {
        spki: spki.raw.to_vec(),
        key_type,
        key_fingerprint: Sha256::digest(spki.raw).into(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rcgen::{
        CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PublicKeyData,
    };

    pub(crate) fn csr_for(key: &KeyPair, cn: &str) -> Vec<u8> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.serialize_request(key).unwrap().der().to_vec()
    }

    #[test]
    fn accepts_p256_and_ed25519() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let checked = check_csr(&csr_for(&key, "d1")).unwrap();
        assert_eq!(checked.key_type, KeyType::P256);
        assert_eq!(checked.spki, key.subject_public_key_info());
        assert_eq!(
            checked.key_fingerprint,
            <[u8; 32]>::from(Sha256::digest(key.subject_public_key_info()))
        );

        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        assert_eq!(
            check_csr(&csr_for(&key, "d1")).unwrap().key_type,
            KeyType::Ed25519
        );
    }

    #[test]
    fn refuses_other_curves() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        let err = check_csr(&csr_for(&key, "d1")).unwrap_err();
        assert!(matches!(err, CsrRejection::UnsupportedKey(_)), "{err}");
        assert_eq!(err.code(), RejectCode::WeakKey);
    }

    #[test]
    fn refuses_a_broken_signature() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut der = csr_for(&key, "d1");
        let last = der.len() - 3;
        der[last] ^= 0x01;
        let err = check_csr(&der).unwrap_err();
        assert_eq!(err.code(), RejectCode::BadCsr, "{err}");
    }

    #[test]
    fn refuses_a_tampered_subject() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let der = csr_for(&key, "device-a");
        let at = der.windows(8).position(|w| w == b"device-a").unwrap();
        let mut tampered = der.clone();
        tampered[at + 7] = b'b';
        assert_eq!(check_csr(&tampered), Err(CsrRejection::BadSignature));
    }

    #[test]
    fn garbage_truncation_and_trailing_bytes() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let der = csr_for(&key, "d1");
        for cut in 0..der.len() {
            let err = check_csr(&der[..cut]).unwrap_err();
            assert_eq!(err.code(), RejectCode::BadCsr, "cut at {cut}");
        }
        let mut long = der.clone();
        long.push(0);
        assert!(matches!(check_csr(&long), Err(CsrRejection::Malformed(_))));
        assert_eq!(check_csr(&[0u8; 5000]), Err(CsrRejection::TooLarge));
        assert_eq!(check_csr(b"hello").unwrap_err().code(), RejectCode::BadCsr);
    }
}
