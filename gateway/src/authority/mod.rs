//! The one signing pipeline. Every certificate goes through the same fixed
//! steps: authorize (enrollment: device, request id, credential, proof;
//! renewal: device, request id, current certificate, signature, counter) →
//! check the CSR → build the profile and sign → record durably → answer.
//! Nothing is sent before it is recorded, and every refusal is audited.

mod renew;
mod station;

use std::sync::Arc;
use std::time::Duration;

use idgate_pki::ca::IssuingCa;
use idgate_pki::check::{CheckedCsr, check_csr};
use idgate_pki::profile::Profile;
use idgate_pki::protocol::RejectCode;
use idgate_pki::wire::EnrollRequestBuf;
use sha2::{Digest, Sha256};
use tracing::{error, info, warn};

use crate::provisioner::token::Tokens;
use crate::registry::{
    AuditEntry, CertificateRecord, DeviceStatus, Issuance, IssuanceError, Registry,
};

/// A refusal: the stable code for the device and a message for people. The
/// message never carries internal causes (those go to the log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The code.
    pub code: RejectCode,
    /// The explanation.
    pub message: String,
}

impl Rejection {
    /// A rejection with `code` and `message`.
    pub fn new(code: RejectCode, message: impl Into<String>) -> Rejection {
        Rejection {
            code,
            message: message.into(),
        }
    }

    pub(crate) fn internal() -> Rejection {
        Rejection::new(
            RejectCode::Internal,
            "the gateway could not complete the request; retry later with the same rid",
        )
    }
}

/// An issued (or re-sent) certificate and what the reply says about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The certificate record.
    pub certificate: CertificateRecord,
    /// The chain above it.
    pub chain: Arc<Vec<Vec<u8>>>,
    /// Suggested renewal window start.
    pub renew_after: i64,
    /// Suggested renewal window end.
    pub renew_before: i64,
}

/// What the authority allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The device certificate profile (lifetime).
    pub profile: Profile,
    /// How long after its expiry a certificate may still be renewed.
    pub renew_grace: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            profile: Profile::default(),
            renew_grace: DEFAULT_RENEW_GRACE,
        }
    }
}

/// Default renewal grace period after expiry.
pub const DEFAULT_RENEW_GRACE: Duration = Duration::from_secs(7 * 24 * 3600);

/// The issuing authority.
#[derive(Debug)]
pub struct Authority {
    ca: Arc<IssuingCa>,
    chain: Arc<Vec<Vec<u8>>>,
    policy: Policy,
    registry: Arc<Registry>,
    tokens: Tokens,
}

const ENROLL: &str = "enroll";

impl Authority {
    /// An authority signing with `ca` under `policy`, recording in `registry`.
    pub fn new(
        ca: Arc<IssuingCa>,
        chain: Vec<Vec<u8>>,
        policy: Policy,
        registry: Arc<Registry>,
        tokens: Tokens,
    ) -> Authority {
        Authority {
            ca,
            chain: Arc::new(chain),
            policy,
            registry,
            tokens,
        }
    }

    /// The registry.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub(crate) fn answer(&self, certificate: CertificateRecord) -> Answer {
        let (renew_after, renew_before) = renewal_window(&certificate);
        Answer {
            renew_after,
            renew_before,
            certificate,
            chain: self.chain.clone(),
        }
    }

    /// Serves an `enroll` request from `device_id` (taken from the topic).
    pub async fn enroll(
        &self,
        device_id: &str,
        request: &EnrollRequestBuf,
        now: i64,
    ) -> Result<Answer, Rejection> {
        self.enroll_via(None, device_id, request, now).await
    }

    /// Serves an `enroll` request for `device_id`, relayed by line station
    /// `station` if there is one (already authorized for this device): the
    /// station is audited as the actor and recorded with the certificate.
    pub(crate) async fn enroll_via(
        &self,
        station: Option<&str>,
        device_id: &str,
        request: &EnrollRequestBuf,
        now: i64,
    ) -> Result<Answer, Rejection> {
        match self.try_enroll(station, device_id, request, now).await {
            Ok(answer) => Ok(answer),
            Err(rejection) => {
                let actor = actor(station, device_id);
                self.audit_refusal_by(&actor, ENROLL, device_id, &request.rid, &rejection, now)
                    .await;
                Err(rejection)
            }
        }
    }

    /// Audits a request refused before it could be decoded (`malformed`,
    /// `too_large`); `rid` is empty when the payload carried none.
    pub async fn audit_undecodable(
        &self,
        op: &str,
        device_id: &str,
        rid: &str,
        rejection: &Rejection,
        now: i64,
    ) {
        self.audit_refusal_of(op, device_id, rid, rejection, now)
            .await;
    }

    pub(crate) async fn audit_refusal_of(
        &self,
        op: &str,
        device_id: &str,
        rid: &str,
        rejection: &Rejection,
        now: i64,
    ) {
        self.audit_refusal_by(&actor(None, device_id), op, device_id, rid, rejection, now)
            .await;
    }

    pub(crate) async fn audit_refusal_by(
        &self,
        actor: &str,
        op: &str,
        device_id: &str,
        rid: &str,
        rejection: &Rejection,
        now: i64,
    ) {
        warn!(code = %rejection.code, reason = %rejection.message, "{op} refused");
        let entry = AuditEntry::new(now, actor, op)
            .device(device_id)
            .outcome(rejection.code.as_str())
            .detail(format!("rid={rid} {}", rejection.message));
        if let Err(e) = self.registry.audit(&entry).await {
            error!(error = %e, "could not audit a refusal");
        }
    }

    async fn try_enroll(
        &self,
        station: Option<&str>,
        device_id: &str,
        request: &EnrollRequestBuf,
        now: i64,
    ) -> Result<Answer, Rejection> {
        let registry = &self.registry;
        // Everything the checks below need, in one read: the device, its
        // credential and the answer already given to this rid.
        let context = registry
            .enrollment_context(device_id, ENROLL, &request.rid)
            .await
            .map_err(|e| internal(&e))?
            .ok_or_else(unknown_device)?;
        let csr_sha256 = Sha256::digest(&request.csr).to_vec();
        if let Some(prior) = context.prior {
            return self.repeat(prior, &csr_sha256);
        }
        let device = context.device;
        let credential = context.credential.ok_or_else(|| {
            Rejection::new(
                RejectCode::DeviceNotPending,
                "the device has no enrollment credential",
            )
        })?;
        if credential.used_at.is_some() {
            return Err(Rejection::new(
                RejectCode::TokenUsed,
                "the enrollment token has already been used",
            ));
        }
        if device.status != DeviceStatus::Pending {
            return Err(Rejection::new(
                RejectCode::DeviceNotPending,
                format!("the device is {}, not pending", device.status),
            ));
        }
        let proof_ok = self
            .tokens
            .verify(device_id, &credential.secret, &request.csr, &request.proof)
            .map_err(|e| internal(&e))?;
        if !proof_ok {
            return Err(Rejection::new(
                RejectCode::BadProof,
                "the proof does not match this CSR and the device's token",
            ));
        }

        let csr = check_csr(&request.csr).map_err(|e| Rejection::new(e.code(), e.to_string()))?;
        let mut issuance = self.sign(
            ENROLL,
            device_id,
            &request.rid,
            &csr,
            &csr_sha256,
            None,
            now,
        )?;
        issuance.station = station.map(str::to_owned);
        let record = issuance.certificate.clone();
        let via = station.map(|s| format!(" station={s}")).unwrap_or_default();
        let audit = AuditEntry::new(now, actor(station, device_id), ENROLL)
            .device(device_id)
            .serial(&record.serial)
            .detail(format!(
                "rid={} key={} not_after={}{via}",
                request.rid,
                csr.key_type.as_str(),
                record.not_after
            ));
        match registry.record_enrollment(&issuance, &audit).await {
            Ok(()) => {
                info!(serial = %record.serial, not_after = record.not_after, "certificate issued");
                Ok(self.answer(record))
            }
            Err(IssuanceError::RidTaken) => {
                self.answered_meanwhile(ENROLL, device_id, &request.rid, &csr_sha256)
                    .await
            }
            Err(IssuanceError::TokenUsed) => Err(Rejection::new(
                RejectCode::TokenUsed,
                "the enrollment token has already been used",
            )),
            Err(IssuanceError::NotPending) => Err(Rejection::new(
                RejectCode::DeviceNotPending,
                "the device is no longer pending",
            )),
            Err(IssuanceError::KeyReused) => Err(key_reused()),
            Err(
                IssuanceError::NotActive
                | IssuanceError::CounterNotGreater
                | IssuanceError::RenewedElsewhere,
            ) => Err(Rejection::internal()),
            Err(IssuanceError::Registry(e)) => Err(internal(&e)),
        }
    }

    /// The shared last step before recording: sign under the profile and
    /// describe the record.
    ///
    /// Whether the key is bound to another device is not read beforehand:
    /// the recording transaction checks it (`IssuanceError::KeyReused`,
    /// answered `key_reused`), and a certificate signed and then refused
    /// there is never stored nor sent, so signing it first costs a signature
    /// on a rare refusal and saves a registry read on every request.
    #[allow(clippy::too_many_arguments)] // the request's parts, each needed once
    pub(crate) fn sign(
        &self,
        op: &'static str,
        device_id: &str,
        rid: &str,
        csr: &CheckedCsr,
        csr_sha256: &[u8],
        renewed_from: Option<String>,
        now: i64,
    ) -> Result<Issuance, Rejection> {
        let issued = self
            .ca
            .issue(device_id, csr, &self.policy.profile, now)
            .map_err(|e| internal(&e))?;
        Ok(Issuance {
            certificate: CertificateRecord {
                serial: issued.serial.to_string(),
                device_id: device_id.to_owned(),
                key_fingerprint: csr.key_fingerprint.to_vec(),
                not_before: issued.not_before,
                not_after: issued.not_after,
                issued_at: now,
                der: issued.der,
                revoked_at: None,
                revocation_reason: None,
                renewed_from,
            },
            op,
            rid: rid.to_owned(),
            csr_sha256: csr_sha256.to_vec(),
            station: None,
        })
    }

    /// A duplicate of this request was answered while we signed: answer as it was.
    pub(crate) async fn answered_meanwhile(
        &self,
        op: &str,
        device_id: &str,
        rid: &str,
        csr_sha256: &[u8],
    ) -> Result<Answer, Rejection> {
        let prior = self
            .registry
            .prior_request(device_id, op, rid)
            .await
            .map_err(|e| internal(&e))?
            .ok_or_else(Rejection::internal)?;
        self.repeat(prior, csr_sha256)
    }

    /// Answers a repeated rid: the same certificate for the same CSR.
    pub(crate) fn repeat(
        &self,
        prior: crate::registry::PriorRequest,
        csr_sha256: &[u8],
    ) -> Result<Answer, Rejection> {
        if prior.csr_sha256 == csr_sha256 {
            info!(serial = %prior.certificate.serial, "repeated rid: sending the same certificate");
            Ok(self.answer(prior.certificate))
        } else {
            Err(Rejection::new(
                RejectCode::RidConflict,
                "this rid was used before with a different CSR",
            ))
        }
    }
}

/// The suggested renewal window of a certificate: from a point between 50 % and
/// 70 % of its lifetime, chosen from its serial so that a fleet enrolled at the
/// same moment spreads its renewals, to 90 % of the lifetime. The same
/// certificate always gets the same window (a repeated rid gets the same answer).
pub fn renewal_window(certificate: &CertificateRecord) -> (i64, i64) {
    let lifetime = (certificate.not_after - certificate.issued_at).max(0);
    let digest = Sha256::digest(certificate.serial.as_bytes());
    let spread = i64::from(u16::from_be_bytes([digest[0], digest[1]]) % 200);
    (
        certificate.issued_at + lifetime * (500 + spread) / 1000,
        certificate.issued_at + lifetime * 9 / 10,
    )
}

/// Who a request is audited as: the device itself, or the line station that
/// relayed it.
fn actor(station: Option<&str>, device_id: &str) -> String {
    match station {
        Some(station) => format!("station:{station}"),
        None => format!("device:{device_id}"),
    }
}

/// Logs a failure of ours (registry, signing) and gives the device `internal`.
pub(crate) fn internal(e: &dyn std::fmt::Display) -> Rejection {
    error!(error = %e, "gateway failure while serving a request");
    Rejection::internal()
}

pub(crate) fn unknown_device() -> Rejection {
    Rejection::new(RejectCode::UnknownDevice, "no such device is registered")
}

pub(crate) fn key_reused() -> Rejection {
    Rejection::new(
        RejectCode::KeyReused,
        "this public key is already bound to another device",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(serial: &str, issued_at: i64, lifetime: i64) -> CertificateRecord {
        CertificateRecord {
            serial: serial.into(),
            device_id: "d".into(),
            key_fingerprint: vec![],
            not_before: issued_at - 300,
            not_after: issued_at + lifetime,
            issued_at,
            der: vec![],
            revoked_at: None,
            revocation_reason: None,
            renewed_from: None,
        }
    }

    #[test]
    fn renewal_windows_spread_between_half_and_seventy_percent() {
        let lifetime = 86_400;
        let mut starts = std::collections::HashSet::new();
        for i in 0..500 {
            let serial = format!("{:032x}", 0x4000_0000_0000_0000_0000_0000_0000_0000u128 + i);
            let (after, before) = renewal_window(&record(&serial, 1_000_000, lifetime));
            assert!(after >= 1_000_000 + lifetime / 2, "{after}");
            assert!(after < 1_000_000 + lifetime * 7 / 10, "{after}");
            assert_eq!(before, 1_000_000 + lifetime * 9 / 10);
            starts.insert(after);
        }
        // A fleet enrolled in the same second does not renew in the same second.
        assert!(starts.len() > 150, "only {} distinct starts", starts.len());
        // The same certificate always gets the same window.
        let r = record("4abc", 5, 1000);
        assert_eq!(renewal_window(&r), renewal_window(&r.clone()));
    }
}
