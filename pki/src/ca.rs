//! The certificate authorities: creating a root and an issuing intermediate,
//! loading the issuing CA the gateway signs with, and describing a CA certificate
//! for people (`idgate ca show`).

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData,
};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Root CA lifetime.
pub const ROOT_LIFETIME_DAYS: i64 = 20 * 365;
/// Issuing CA lifetime; device certificates never outlive it.
pub const ISSUING_LIFETIME_DAYS: i64 = 5 * 365;

/// Something went wrong creating or loading a CA. These are operator or
/// installation errors, never device input.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// rcgen refused to build or sign.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A CA file is not what it should be.
    #[error("{what} is not valid: {why}")]
    Invalid {
        /// Which file or object.
        what: &'static str,
        /// Why.
        why: String,
    },
}

/// PEM texts of a freshly created CA pair.
#[derive(Debug)]
pub struct NewCa {
    /// Root certificate (distributed to devices and verifiers).
    pub root_certificate: String,
    /// Root private key (PKCS#8 PEM): to be kept offline.
    pub root_key: String,
    /// Issuing intermediate certificate.
    pub issuing_certificate: String,
    /// Issuing intermediate private key (PKCS#8 PEM): stays on the gateway.
    pub issuing_key: String,
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "idgate");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Creates a root CA and an issuing intermediate (pathLen 0, EKU clientAuth),
/// both ECDSA P-256. `label` distinguishes this installation in the subject names.
pub fn create(label: &str, now: OffsetDateTime) -> Result<NewCa, CaError> {
    let backdate = time::Duration::minutes(5);

    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut root = CertificateParams::default();
    root.distinguished_name = name(&format!("idgate Root CA {label}"));
    root.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    root.not_before = now - backdate;
    root.not_after = now + time::Duration::days(ROOT_LIFETIME_DAYS);
    root.serial_number = Some(crate::profile::Serial::random().into());
    let root_certificate = root.self_signed(&root_key)?;
    let root_issuer = Issuer::new(root, &root_key);

    let issuing_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut issuing = CertificateParams::default();
    issuing.distinguished_name = name(&format!("idgate Issuing CA {label}"));
    issuing.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    issuing.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    issuing.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    issuing.not_before = now - backdate;
    issuing.not_after = now + time::Duration::days(ISSUING_LIFETIME_DAYS);
    issuing.serial_number = Some(crate::profile::Serial::random().into());
    issuing.use_authority_key_identifier_extension = true;
    let issuing_certificate = issuing.signed_by(&issuing_key, &root_issuer)?;

    Ok(NewCa {
        root_certificate: root_certificate.pem(),
        root_key: root_key.serialize_pem(),
        issuing_certificate: issuing_certificate.pem(),
        issuing_key: issuing_key.serialize_pem(),
    })
}

/// Decodes every `CERTIFICATE` block of a PEM text.
pub fn pem_certificates(pem_text: &str) -> Result<Vec<Vec<u8>>, CaError> {
    let blocks = pem::parse_many(pem_text).map_err(|e| CaError::Invalid {
        what: "PEM file",
        why: e.to_string(),
    })?;
    let certificates: Vec<Vec<u8>> = blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| b.into_contents())
        .collect();
    if certificates.is_empty() {
        return Err(CaError::Invalid {
            what: "PEM file",
            why: "no CERTIFICATE block".into(),
        });
    }
    Ok(certificates)
}

/// Encodes DER certificates as PEM.
pub fn to_pem(certificates: &[&[u8]]) -> String {
    certificates
        .iter()
        .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec())))
        .collect()
}

/// The online issuing CA: its certificate, its key, and the chain above it.
pub struct IssuingCa {
    issuer: Issuer<'static, KeyPair>,
    certificate: Vec<u8>,
    not_after: i64,
}

impl std::fmt::Debug for IssuingCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuingCa")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl IssuingCa {
    /// Loads the issuing CA from its certificate and PKCS#8 key (PEM), checking
    /// that they belong together and that the certificate is a CA.
    pub fn from_pem(certificate_pem: &str, key_pem: &str) -> Result<IssuingCa, CaError> {
        let certificate = pem_certificates(certificate_pem)?
            .into_iter()
            .next()
            .ok_or_else(|| CaError::Invalid {
                what: "issuing CA certificate",
                why: "empty".into(),
            })?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::Invalid {
            what: "issuing CA key",
            why: e.to_string(),
        })?;
        let (_, parsed) =
            X509Certificate::from_der(&certificate).map_err(|e| CaError::Invalid {
                what: "issuing CA certificate",
                why: e.to_string(),
            })?;
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(CaError::Invalid {
                what: "issuing CA key",
                why: "it does not match the issuing CA certificate".into(),
            });
        }
        if !parsed.is_ca() {
            return Err(CaError::Invalid {
                what: "issuing CA certificate",
                why: "it is not a CA certificate".into(),
            });
        }
        let not_after = parsed.validity().not_after.timestamp();
        let issuer = Issuer::from_ca_cert_der(&certificate.clone().into(), key)?;
        Ok(IssuingCa {
            issuer,
            certificate,
            not_after,
        })
    }

    /// The issuing CA certificate, DER.
    pub fn certificate(&self) -> &[u8] {
        &self.certificate
    }

    /// When the issuing CA certificate expires, unix seconds.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }
}

/// What `idgate ca show` prints about a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// Subject DN, RFC 4514 style.
    pub subject: String,
    /// Issuer DN.
    pub issuer: String,
    /// Serial, lowercase hex.
    pub serial: String,
    /// SHA-256 of the DER certificate, uppercase hex with colons (as openssl prints it).
    pub fingerprint_sha256: String,
    /// Validity start, unix seconds.
    pub not_before: i64,
    /// Validity end, unix seconds.
    pub not_after: i64,
    /// basicConstraints CA flag and path length.
    pub ca: Option<Option<u32>>,
}

/// Describes a DER certificate.
pub fn summarize(der: &[u8]) -> Result<Summary, CaError> {
    let (_, certificate) = X509Certificate::from_der(der).map_err(|e| CaError::Invalid {
        what: "certificate",
        why: e.to_string(),
    })?;
    let ca = certificate
        .basic_constraints()
        .ok()
        .flatten()
        .filter(|bc| bc.value.ca)
        .map(|bc| bc.value.path_len_constraint);
    Ok(Summary {
        subject: certificate.subject().to_string(),
        issuer: certificate.issuer().to_string(),
        serial: hex(certificate.raw_serial()),
        fingerprint_sha256: Sha256::digest(der)
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":"),
        not_before: certificate.validity().not_before.timestamp(),
        not_after: certificate.validity().not_after.timestamp(),
        ca,
    })
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_a_root_and_a_constrained_intermediate() {
        let now = OffsetDateTime::now_utc();
        let ca = create("test", now).unwrap();
        let root_der = pem_certificates(&ca.root_certificate).unwrap().remove(0);
        let issuing_der = pem_certificates(&ca.issuing_certificate).unwrap().remove(0);

        let root = summarize(&root_der).unwrap();
        assert_eq!(root.subject, root.issuer);
        assert_eq!(root.ca, Some(Some(1)));
        let issuing = summarize(&issuing_der).unwrap();
        assert_eq!(issuing.issuer, root.subject);
        assert_eq!(issuing.ca, Some(Some(0)));
        assert_eq!(issuing.fingerprint_sha256.len(), 32 * 3 - 1);

        let (_, parsed) = X509Certificate::from_der(&issuing_der).unwrap();
        let eku = parsed.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        let (_, root_parsed) = X509Certificate::from_der(&root_der).unwrap();
        parsed
            .verify_signature(Some(root_parsed.public_key()))
            .unwrap();

        let loaded = IssuingCa::from_pem(&ca.issuing_certificate, &ca.issuing_key).unwrap();
        assert_eq!(loaded.certificate(), issuing_der.as_slice());
        assert!(
            IssuingCa::from_pem(&ca.issuing_certificate, &ca.root_key).is_err(),
            "a key that does not match the certificate is refused"
        );
    }
}
