//! The line station certificate profile: what `idgate station add` issues to a
//! programming station so it can relay enrollments for its batches. Like a
//! device certificate (clientAuth, CA:FALSE, a CSPRNG serial, signed by the
//! issuing CA, so the gateway's TLS front and CRL cover it unchanged), but
//! named by the SAN URI `urn:idgate:station:{id}`, which no device certificate
//! carries, and longer-lived: a station is a fixed piece of factory equipment
//! revoked by an operator, not a fleet device that renews itself.

use std::time::Duration;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose,
    SanType, SubjectPublicKeyInfo,
};

use crate::ca::{CaError, IssuingCa};
use crate::profile::{BACKDATE, DeviceCertificate, Serial};
use crate::protocol::check_device_id;

/// The SAN URI prefix naming a station.
pub const STATION_URI_PREFIX: &str = "urn:idgate:station:";

/// Shortest station certificate lifetime.
pub const MIN_STATION_LIFETIME: Duration = Duration::from_secs(3600);
/// Longest station certificate lifetime.
pub const MAX_STATION_LIFETIME: Duration = Duration::from_secs(398 * 24 * 3600);
/// Default station certificate lifetime.
pub const DEFAULT_STATION_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);

/// The SAN URI naming station `station_id`.
pub fn station_uri(station_id: &str) -> String {
    format!("{STATION_URI_PREFIX}{station_id}")
}

impl IssuingCa {
    /// Issues a station certificate for `station_id` (device id syntax) and the
    /// public key `spki` (SubjectPublicKeyInfo, DER), valid from
    /// `now - BACKDATE` for `lifetime` (1 hour to 398 days), never past the
    /// issuing CA's own expiry.
    pub fn issue_station(
        &self,
        station_id: &str,
        spki: &[u8],
        lifetime: Duration,
        now: i64,
    ) -> Result<DeviceCertificate, CaError> {
        check_device_id(station_id).map_err(|e| CaError::Invalid {
            what: "station id",
            why: e.to_string(),
        })?;
        if !(MIN_STATION_LIFETIME..=MAX_STATION_LIFETIME).contains(&lifetime) {
            return Err(CaError::Invalid {
                what: "station certificate lifetime",
                why: "it must be between 1 hour and 398 days".into(),
            });
        }
        let not_before = now - BACKDATE.as_secs() as i64;
        let not_after = (now + lifetime.as_secs() as i64).min(self.not_after());
        if not_after <= now {
            return Err(CaError::Invalid {
                what: "issuing CA",
                why: "it has expired".into(),
            });
        }
        let clock = |t: i64| {
            time::OffsetDateTime::from_unix_timestamp(t).map_err(|e| CaError::Invalid {
                what: "clock",
                why: e.to_string(),
            })
        };
        let serial = Serial::random();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "idgate line station");
        dn.push(DnType::CommonName, station_id);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(station_uri(station_id).try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(serial.clone().into());
        params.not_before = clock(not_before)?;
        params.not_after = clock(not_after)?;
        let public_key = SubjectPublicKeyInfo::from_der(spki)?;
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
    use crate::ca::create;
    use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData};
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

    #[test]
    fn station_certificate_names_the_station_only() {
        let now = time::OffsetDateTime::now_utc();
        let ca = create("t", now).unwrap();
        let issuing = IssuingCa::from_pem(&ca.issuing_certificate, &ca.issuing_key).unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let at = now.unix_timestamp();
        let issued = issuing
            .issue_station(
                "line-1",
                &key.subject_public_key_info(),
                DEFAULT_STATION_LIFETIME,
                at,
            )
            .unwrap();
        let (_, x509) = X509Certificate::from_der(&issued.der).unwrap();
        let san = x509.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI("urn:idgate:station:line-1")]
        );
        assert!(!x509.basic_constraints().unwrap().unwrap().value.ca);
        assert!(
            x509.extended_key_usage()
                .unwrap()
                .unwrap()
                .value
                .client_auth
        );
        assert_eq!(x509.public_key().raw, key.subject_public_key_info());
        assert_eq!(
            issued.not_after,
            at + DEFAULT_STATION_LIFETIME.as_secs() as i64
        );

        for bad in ["", "a/b", "-x"] {
            assert!(
                issuing
                    .issue_station(
                        bad,
                        &key.subject_public_key_info(),
                        DEFAULT_STATION_LIFETIME,
                        at
                    )
                    .is_err()
            );
        }
        assert!(
            issuing
                .issue_station(
                    "s",
                    &key.subject_public_key_info(),
                    Duration::from_secs(60),
                    at
                )
                .is_err()
        );
    }
}
