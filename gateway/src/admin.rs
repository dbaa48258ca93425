//! Operator actions on devices: revoke, suspend, resume. The CLI calls these
//! today and the HTTP API will; they only write the registry. Every running
//! gateway notices the change (it watches the registry's revocation counter)
//! and refreshes its CRL, its TLS verifier and its live MQTT sessions.

use std::fmt;
use std::str::FromStr;

use crate::registry::{AuditEntry, Registry, StatusChange, StatusError};

/// Why a device is revoked, in words facilities staff use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevokeReason {
    /// The device is lost.
    Lost,
    /// The device was stolen.
    Stolen,
    /// Its key is known or suspected to be compromised.
    Compromised,
    /// Taken out of service for good.
    Retired,
    /// Replaced by another device.
    Superseded,
}

impl RevokeReason {
    /// Every reason.
    pub const ALL: [RevokeReason; 5] = [
        RevokeReason::Lost,
        RevokeReason::Stolen,
        RevokeReason::Compromised,
        RevokeReason::Retired,
        RevokeReason::Superseded,
    ];

    /// The word.
    pub fn as_str(self) -> &'static str {
        match self {
            RevokeReason::Lost => "lost",
            RevokeReason::Stolen => "stolen",
            RevokeReason::Compromised => "compromised",
            RevokeReason::Retired => "retired",
            RevokeReason::Superseded => "superseded",
        }
    }

    /// The RFC 5280 CRLReason written to the certificates: a lost or stolen
    /// device's key must be assumed compromised.
    pub fn crl_reason(self) -> &'static str {
        match self {
            RevokeReason::Lost | RevokeReason::Stolen | RevokeReason::Compromised => {
                "keyCompromise"
            }
            RevokeReason::Retired => "cessationOfOperation",
            RevokeReason::Superseded => "superseded",
        }
    }
}

impl FromStr for RevokeReason {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        RevokeReason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!("unknown reason `{s}` (lost, stolen, compromised, retired, superseded)")
            })
    }
}

impl fmt::Display for RevokeReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Revokes a device for good: every unexpired certificate is revoked, and the
/// device can neither renew nor enroll again. Returns the revoked serials.
pub async fn revoke(
    registry: &Registry,
    device_id: &str,
    reason: RevokeReason,
    actor: &str,
    at: i64,
) -> Result<Vec<String>, StatusError> {
    let change = StatusChange::Revoke {
        crl_reason: reason.crl_reason().to_owned(),
        retire: reason == RevokeReason::Retired,
    };
    let audit = AuditEntry::new(at, actor, "device.revoke")
        .device(device_id)
        .detail(format!("reason={reason}"));
    registry.change_status(device_id, &change, &audit).await
}

/// Suspends a device: its certificates are put on hold until [`resume`].
pub async fn suspend(
    registry: &Registry,
    device_id: &str,
    actor: &str,
    at: i64,
) -> Result<Vec<String>, StatusError> {
    let audit = AuditEntry::new(at, actor, "device.suspend").device(device_id);
    registry
        .change_status(device_id, &StatusChange::Suspend, &audit)
        .await
}

/// Resumes a suspended device (its held certificates are valid again) or
/// clears a suspect one.
pub async fn resume(
    registry: &Registry,
    device_id: &str,
    actor: &str,
    at: i64,
) -> Result<Vec<String>, StatusError> {
    let audit = AuditEntry::new(at, actor, "device.resume").device(device_id);
    registry
        .change_status(device_id, &StatusChange::Resume, &audit)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_parse_and_map_to_crl_reasons() {
        for reason in RevokeReason::ALL {
            assert_eq!(reason.as_str().parse::<RevokeReason>(), Ok(reason));
        }
        assert!("misplaced".parse::<RevokeReason>().is_err());
        assert_eq!(RevokeReason::Stolen.crl_reason(), "keyCompromise");
        assert_eq!(RevokeReason::Retired.crl_reason(), "cessationOfOperation");
    }
}
