//! Enrollments relayed by a line station: the station must be active and the
//! device must belong to one of its batches; then the request runs through
//! the same pipeline as a device's own, with the station recorded.

use idgate_pki::protocol::RejectCode;
use idgate_pki::wire::EnrollRequestBuf;

use tracing::{error, warn};

use super::{Answer, Authority, ENROLL, Rejection, internal};
use crate::registry::AuditEntry;

impl Authority {
    /// Serves an `enroll` request for `device_id` relayed by `station_id`
    /// (both taken from the topic, which the broker let only that station's
    /// certificate publish on).
    pub async fn enroll_for_station(
        &self,
        station_id: &str,
        device_id: &str,
        request: &EnrollRequestBuf,
        now: i64,
    ) -> Result<Answer, Rejection> {
        let refusal = match self
            .registry
            .station_may_enroll(station_id, device_id)
            .await
        {
            Ok(Some(true)) => {
                return self
                    .enroll_via(Some(station_id), device_id, request, now)
                    .await;
            }
            // The same answer whether the device does not exist or belongs to
            // another batch: a station learns nothing about devices not its own.
            Ok(Some(false)) => Rejection::new(
                RejectCode::UnknownDevice,
                "no device with this id in the batches of this station",
            ),
            Ok(None) => Rejection::new(
                RejectCode::UnknownDevice,
                "this station is not registered or has been revoked",
            ),
            Err(e) => internal(&e),
        };
        // Audited without the device column: a device of another batch must
        // not look "refused" in its own batch's counts because a station
        // asked for it.
        warn!(station_id, device_id, code = %refusal.code, reason = %refusal.message, "station enroll refused");
        let entry = AuditEntry::new(now, format!("station:{station_id}"), ENROLL)
            .outcome(refusal.code.as_str())
            .detail(format!(
                "device={device_id} rid={} {}",
                request.rid, refusal.message
            ));
        if let Err(e) = self.registry.audit(&entry).await {
            error!(error = %e, "could not audit a refusal");
        }
        Err(refusal)
    }
}
