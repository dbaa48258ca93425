//! The device certificate profile. Everything in a device certificate comes from
//! here except the public key, which a checked CSR supplies:
//! subject CN = device id, SAN URI `urn:idgate:device:{id}`, keyUsage
//! digitalSignature (critical), EKU clientAuth, basicConstraints CA:FALSE,
//! AKI/SKI, a 126-bit CSPRNG serial, `notBefore` backdated, a short lifetime.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rand::RngCore;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose,
    SanType, SerialNumber, SubjectPublicKeyInfo,
};

use crate::ca::{CaError, IssuingCa, hex};
use crate::check::CheckedCsr;
use crate::protocol::check_device_id;

/// Shortest device certificate lifetime the profile allows.
pub const MIN_LIFETIME: Duration = Duration::from_secs(5 * 60);
/// Longest device certificate lifetime the profile allows.
pub const MAX_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default device certificate lifetime.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How far `notBefore` is set in the past, for devices whose clocks run behind.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// A certificate serial number: 1–20 octets, positive. Valid by construction.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Serial(Vec<u8>);

impl Serial {
    /// 16 octets from the OS CSPRNG with the top bits forced to `01`: positive,
    /// always 16 octets long, 126 bits of entropy (RFC 5280 and CA/B ask ≥ 64).
    pub fn random() -> Serial {
        let mut bytes = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        bytes[0] = (bytes[0] & 0x3f) | 0x40;
        Serial(bytes.to_vec())
    }

    /// The big-endian octets.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// A string that is not a serial number.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a serial number: expected 1–40 hex digits of a positive number")]
pub struct BadSerial;

impl FromStr for Serial {
    type Err = BadSerial;

    fn from_str(s: &str) -> Result<Serial, BadSerial> {
        let s = s.trim().trim_start_matches("0x");
        let s: String = s.chars().filter(|c| *c != ':').collect();
        if s.is_empty() || s.len() > 40 || !s.len().is_multiple_of(2) {
            return Err(BadSerial);
        }
        let bytes = (0..s.len())
            .step_by(2)
            .map(|i| {
                u8::from_str_radix(s.get(i..i + 2).ok_or(BadSerial)?, 16).map_err(|_| BadSerial)
            })
            .collect::<Result<Vec<u8>, BadSerial>>()?;
        if bytes[0] & 0x80 != 0 {
            return Err(BadSerial);
        }
        Ok(Serial(bytes))
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({self})")
    }
}

impl From<Serial> for SerialNumber {
    fn from(serial: Serial) -> SerialNumber {
        SerialNumber::from_slice(&serial.0)
    }
}

/// The tunable part of the profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Profile {
    lifetime: Duration,
}

/// A lifetime outside [`MIN_LIFETIME`]..=[`MAX_LIFETIME`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("certificate lifetime must be between 5 minutes and 30 days")]
pub struct BadLifetime;

impl Profile {
    /// A profile issuing certificates valid for `lifetime`.
    pub fn new(lifetime: Duration) -> Result<Profile, BadLifetime> {
        if (MIN_LIFETIME..=MAX_LIFETIME).contains(&lifetime) {
            Ok(Profile { lifetime })
        } else {
            Err(BadLifetime)
        }
    }

    /// The certificate lifetime.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }
}

impl Default for Profile {
    fn default() -> Self {
        Profile {
            lifetime: DEFAULT_LIFETIME,
        }
    }
}

/// A signed device certificate and the facts the registry records about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceCertificate {
    /// The certificate, DER.
    pub der: Vec<u8>,
    /// Its serial.
    pub serial: Serial,
    /// Validity start, unix seconds.
    pub not_before: i64,
    /// Validity end, unix seconds.
    pub not_after: i64,
}

/// The SAN URI naming a device.
pub fn device_uri(device_id: &str) -> String {
    format!("urn:idgate:device:{device_id}")
}

impl IssuingCa {
    /// Issues a device certificate for `device_id` and the key of `csr`, valid
    /// from `now - BACKDATE` for the profile's lifetime, never past the issuing
    /// CA's own expiry.
    pub fn issue(
        &self,
        device_id: &str,
        csr: &CheckedCsr,
        profile: &Profile,
        now: i64,
    ) -> Result<DeviceCertificate, CaError> {
        check_device_id(device_id).map_err(|e| CaError::Invalid {
            what: "device id",
            why: e.to_string(),
        })?;
        let not_before = now - BACKDATE.as_secs() as i64;
        let not_after = (now + profile.lifetime.as_secs() as i64).min(self.not_after());
        if not_after <= now {
            return Err(CaError::Invalid {
                what: "issuing CA",
                why: "it has expired".into(),
            });
        }
        let serial = Serial::random();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, device_id);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(device_uri(device_id).try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(serial.clone().into());
        params.not_before = time::OffsetDateTime::from_unix_timestamp(not_before).map_err(|e| {
            CaError::Invalid {
                what: "clock",
                why: e.to_string(),
            }
        })?;
        params.not_after =
            time::OffsetDateTime::from_unix_timestamp(not_after).map_err(|e| CaError::Invalid {
                what: "clock",
                why: e.to_string(),
            })?;
        let public_key = SubjectPublicKeyInfo::from_der(&csr.spki)?;
        let certificate = params.signed_by(&public_key, self.issuer())?;
        Ok(DeviceCertificate {
            der: certificate.der().to_vec(),
            serial,
            not_before,
            not_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{create, pem_certificates};
    use crate::check::{check_csr, tests::csr_for};
    use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData};
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

    #[test]
    fn serials_are_positive_sixteen_octets_and_parse_back() {
        for _ in 0..100 {
            let serial = Serial::random();
            assert_eq!(serial.as_bytes().len(), 16);
            assert_eq!(serial.as_bytes()[0] & 0xc0, 0x40);
            assert_eq!(serial.to_string().parse::<Serial>().unwrap(), serial);
        }
        assert_eq!("".parse::<Serial>(), Err(BadSerial));
        assert_eq!("80".parse::<Serial>(), Err(BadSerial), "negative");
        assert_eq!("abc".parse::<Serial>(), Err(BadSerial));
        assert_eq!("zz".parse::<Serial>(), Err(BadSerial));
        assert_eq!("7f".repeat(21).parse::<Serial>(), Err(BadSerial));
    }

    #[test]
    fn lifetimes_are_bounded() {
        assert!(Profile::new(Duration::from_secs(60)).is_err());
        assert!(Profile::new(MAX_LIFETIME + Duration::from_secs(1)).is_err());
        assert_eq!(Profile::default().lifetime(), DEFAULT_LIFETIME);
    }

    #[test]
    fn device_certificate_follows_the_profile() {
        let now = time::OffsetDateTime::now_utc();
        let ca = create("t", now).unwrap();
        let issuing = IssuingCa::from_pem(&ca.issuing_certificate, &ca.issuing_key).unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = check_csr(&csr_for(&key, "ignored-cn")).unwrap();
        let t = now.unix_timestamp();
        let cert = issuing
            .issue("sensor-7", &csr, &Profile::default(), t)
            .unwrap();
        assert_eq!(cert.not_before, t - 300);
        assert_eq!(cert.not_after, t + 24 * 3600);

        let (_, x509) = X509Certificate::from_der(&cert.der).unwrap();
        assert_eq!(x509.raw_serial(), cert.serial.as_bytes());
        assert_eq!(
            x509.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "sensor-7",
            "the CN comes from the registry, not from the CSR"
        );
        assert_eq!(
            x509.public_key().raw,
            key.subject_public_key_info().as_slice()
        );
        let san = x509.subject_alternative_name().unwrap().unwrap().value;
        assert_eq!(
            san.general_names,
            vec![GeneralName::URI("urn:idgate:device:sensor-7")]
        );
        let ku = x509.key_usage().unwrap().unwrap();
        assert!(ku.critical);
        assert!(ku.value.digital_signature() && !ku.value.key_cert_sign());
        let eku = x509.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        let bc = x509.basic_constraints().unwrap().unwrap().value;
        assert!(!bc.ca);
        assert!(
            x509.get_extension_unique(
                &x509_parser::oid_registry::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER
            )
            .unwrap()
            .is_some()
        );
        let aki = x509
            .get_extension_unique(&x509_parser::oid_registry::OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER)
            .unwrap();
        assert!(aki.is_some());

        let issuing_der = pem_certificates(&ca.issuing_certificate).unwrap().remove(0);
        let (_, issuer) = X509Certificate::from_der(&issuing_der).unwrap();
        x509.verify_signature(Some(issuer.public_key())).unwrap();
        assert_eq!(x509.issuer(), issuer.subject());
    }

    #[test]
    fn certificates_do_not_outlive_the_issuing_ca() {
        let now = time::OffsetDateTime::now_utc();
        let ca = create("t", now).unwrap();
        let issuing = IssuingCa::from_pem(&ca.issuing_certificate, &ca.issuing_key).unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = check_csr(&csr_for(&key, "x")).unwrap();
        let late = issuing.not_after() - 3600;
        let cert = issuing.issue("d", &csr, &Profile::default(), late).unwrap();
        assert_eq!(cert.not_after, issuing.not_after());
        assert!(
            issuing
                .issue("d", &csr, &Profile::default(), issuing.not_after())
                .is_err()
        );
        assert!(
            issuing
                .issue("bad/id", &csr, &Profile::default(), late)
                .is_err()
        );
    }
}
