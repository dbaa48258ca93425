//! Renewal: a device with a certificate asks for the next one, for a new key.
//!
//! The request is authorized by a signature of the *current* certificate's key
//! over the renewal message (device id, rid, SHA-256 of the CSR, serial,
//! counter), checked against the certificate as the registry recorded it. The
//! counter must grow with every renewal: a counter that does not, or a second
//! renewal of one certificate with a different key, means a replay or a cloned
//! device, and the device is marked suspect.

use idgate_pki::check::check_csr;
use idgate_pki::protocol::{MAX_RENEW_MESSAGE, RejectCode, renew_message};
use idgate_pki::wire::RenewRequestBuf;
use sha2::{Digest, Sha256};
use tracing::{error, info, warn};
use x509_parser::oid_registry::{OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ED25519};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{Answer, Authority, Rejection, internal, key_reused, unknown_device};
use crate::registry::{AuditEntry, CertificateRecord, Device, DeviceStatus, IssuanceError};

const RENEW: &str = "renew";

/// Why a device in `status` may not renew, if it may not.
pub(crate) fn status_refusal(status: DeviceStatus) -> Option<Rejection> {
    let (code, message) = match status {
        DeviceStatus::Active => return None,
        DeviceStatus::Pending => (
            RejectCode::DeviceNotPending,
            "the device has not enrolled yet",
        ),
        DeviceStatus::Suspect => (
            RejectCode::DeviceSuspect,
            "the device is suspected of being cloned; an operator must resume it",
        ),
        DeviceStatus::Suspended => (RejectCode::DeviceSuspended, "the device is suspended"),
        DeviceStatus::Revoked | DeviceStatus::Retired => {
            (RejectCode::DeviceRevoked, "the device has been revoked")
        }
    };
    Some(Rejection::new(code, message))
}

impl Authority {
    /// Serves a `renew` request from `device_id` (taken from the topic).
    pub async fn renew(
        &self,
        device_id: &str,
        request: &RenewRequestBuf,
        now: i64,
    ) -> Result<Answer, Rejection> {
        match self.try_renew(device_id, request, now).await {
            Ok(answer) => Ok(answer),
            Err(rejection) => {
                self.audit_refusal_of(RENEW, device_id, &request.rid, &rejection, now)
                    .await;
                Err(rejection)
            }
        }
    }

    async fn try_renew(
        &self,
        device_id: &str,
        request: &RenewRequestBuf,
        now: i64,
    ) -> Result<Answer, Rejection> {
        let registry = &self.registry;
        // Everything the checks below need, in one read: the device, the
        // answer already given to this rid, the certificate being renewed
        // and the keys of its successors.
        let context = registry
            .renewal_context(device_id, RENEW, &request.rid, &request.serial)
            .await
            .map_err(|e| internal(&e))?
            .ok_or_else(unknown_device)?;
        let csr_sha256 = Sha256::digest(&request.csr).to_vec();
        if let Some(prior) = context.prior {
            return self.repeat(prior, &csr_sha256);
        }
        let device = context.device;
        if let Some(refusal) = status_refusal(device.status) {
            return Err(refusal);
        }

        let current = context.current.ok_or_else(|| {
            Rejection::new(
                RejectCode::UnknownCertificate,
                "no certificate with this serial was issued to this device",
            )
        })?;
        if current.revoked_at.is_some() {
            return Err(Rejection::new(
                RejectCode::CertificateRevoked,
                "this certificate has been revoked",
            ));
        }
        let grace = self.policy.renew_grace.as_secs() as i64;
        if now > current.not_after.saturating_add(grace) {
            return Err(Rejection::new(
                RejectCode::Expired,
                format!(
                    "the certificate expired more than {} days ago; the device must be re-registered",
                    grace / 86_400
                ),
            ));
        }
        if !signature_valid(device_id, request, &current) {
            return Err(Rejection::new(
                RejectCode::BadSignature,
                "the signature does not verify with this certificate's key",
            ));
        }
        let counter = i64::try_from(request.counter).map_err(|_| {
            Rejection::new(RejectCode::Malformed, "the counter is larger than 2^63 - 1")
        })?;
        if counter <= device.renew_counter {
            let rejection = Rejection::new(
                RejectCode::CounterReplay,
                format!(
                    "counter {counter} is not greater than {} (replay or cloned device); the device is now suspect",
                    device.renew_counter
                ),
            );
            self.suspect(&device, &rejection, now).await;
            return Err(rejection);
        }

        let csr = check_csr(&request.csr).map_err(|e| Rejection::new(e.code(), e.to_string()))?;
        if csr.key_fingerprint.as_slice() == current.key_fingerprint.as_slice() {
            return Err(Rejection::new(
                RejectCode::KeyReused,
                "a renewal must bring a new key, not the current one",
            ));
        }
        // Checked again in the recording transaction, for a renewal of this
        // certificate recorded in between (`RenewedElsewhere`).
        if context.successor_keys.any_other_than(&csr.key_fingerprint) {
            return Err(self.clone_suspected(&device, now).await);
        }
        let issuance = self.sign(
            RENEW,
            device_id,
            &request.rid,
            &csr,
            &csr_sha256,
            Some(current.serial.clone()),
            now,
        )?;
        let record = issuance.certificate.clone();
        let audit = AuditEntry::new(now, format!("device:{device_id}"), RENEW)
            .device(device_id)
            .serial(&record.serial)
            .detail(format!(
                "rid={} from={} counter={counter} key={} not_after={}",
                request.rid,
                current.serial,
                csr.key_type.as_str(),
                record.not_after
            ));
        match registry.record_renewal(&issuance, counter, &audit).await {
            Ok(()) => {
                info!(serial = %record.serial, from = %current.serial, "certificate renewed");
                Ok(self.answer(record))
            }
            Err(IssuanceError::RidTaken) => {
                self.answered_meanwhile(RENEW, device_id, &request.rid, &csr_sha256)
                    .await
            }
            Err(IssuanceError::CounterNotGreater) => {
                let rejection = Rejection::new(
                    RejectCode::CounterReplay,
                    "a concurrent renewal used this counter (replay or cloned device); the device is now suspect",
                );
                self.suspect(&device, &rejection, now).await;
                Err(rejection)
            }
            Err(IssuanceError::NotActive) => {
                let status = registry
                    .device(device_id)
                    .await
                    .map_err(|e| internal(&e))?
                    .map(|d| d.status);
                Err(status
                    .and_then(status_refusal)
                    .unwrap_or_else(Rejection::internal))
            }
            Err(IssuanceError::RenewedElsewhere) => Err(self.clone_suspected(&device, now).await),
            Err(IssuanceError::KeyReused) => Err(key_reused()),
            Err(IssuanceError::TokenUsed | IssuanceError::NotPending) => Err(Rejection::internal()),
            Err(IssuanceError::Registry(e)) => Err(internal(&e)),
        }
    }

    /// The refusal of a second renewal of one certificate for another key:
    /// the device is marked suspect.
    async fn clone_suspected(&self, device: &Device, now: i64) -> Rejection {
        let rejection = Rejection::new(
            RejectCode::CloneSuspected,
            "this certificate was already renewed for a different key (cloned device?); the device is now suspect",
        );
        self.suspect(device, &rejection, now).await;
        rejection
    }

    /// Marks the device suspect and audits why.
    async fn suspect(&self, device: &Device, rejection: &Rejection, now: i64) {
        warn!(code = %rejection.code, "device marked suspect");
        let entry = AuditEntry::new(now, "gateway", "device.suspect")
            .device(&device.id)
            .outcome(rejection.code.as_str())
            .detail(rejection.message.clone());
        if let Err(e) = self.registry.mark_suspect(&device.id, &entry).await {
            error!(error = %e, "could not mark a device suspect");
        }
    }
}

/// Checks the renewal signature against the public key of `current`.
fn signature_valid(
    device_id: &str,
    request: &RenewRequestBuf,
    current: &CertificateRecord,
) -> bool {
    let mut message = [0u8; MAX_RENEW_MESSAGE];
    let Ok(len) = renew_message(
        device_id,
        &request.rid,
        &request.csr,
        &request.serial,
        request.counter,
        &mut message,
    ) else {
        return false;
    };
    let Ok((_, certificate)) = X509Certificate::from_der(&current.der) else {
        return false;
    };
    let spki = certificate.public_key();
    let algorithm: &'static dyn ring::signature::VerificationAlgorithm =
        if spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
            &ring::signature::ECDSA_P256_SHA256_FIXED
        } else if spki.algorithm.algorithm == OID_SIG_ED25519 {
            &ring::signature::ED25519
        } else {
            return false;
        };
    ring::signature::UnparsedPublicKey::new(algorithm, &spki.subject_public_key.data)
        .verify(&message[..len], &request.sig)
        .is_ok()
}
