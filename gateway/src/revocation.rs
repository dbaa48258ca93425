//! Revocation state at run time: the current CRL and the set of revoked
//! serials, rebuilt whenever the registry's revocation counter moves (a
//! revoke, suspend or resume by any process or replica) and before the CRL's
//! nextUpdate. Everything that depends on it (the TLS client verifier, live
//! MQTT sessions, `GET /crl`, OCSP, the retained CRL topic) watches one
//! channel.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use idgate_pki::ca::IssuingCa;
use idgate_pki::profile::Serial;
use idgate_pki::revocation::{RevocationReason, RevokedCertificate};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::registry::{Registry, RegistryError, now};

/// How long a CRL is valid; it is re-signed well before.
pub const CRL_VALIDITY: Duration = Duration::from_secs(3600);
/// How often the registry's revocation counter is read.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// One consistent view of revocation.
#[derive(Clone, Debug)]
pub struct RevocationState {
    /// The registry's revocation counter this state was built from.
    pub epoch: i64,
    /// The CRL, DER, signed by the issuing CA.
    pub crl: Arc<Vec<u8>>,
    /// Serials (lowercase hex) revoked or on hold and not yet expired.
    pub revoked: Arc<HashSet<String>>,
    /// When the CRL was signed.
    pub this_update: i64,
    /// When the CRL stops being valid.
    pub next_update: i64,
}

/// Why a state could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RevocationError {
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// Signing the CRL failed.
    #[error("signing the CRL: {0}")]
    Crl(#[from] idgate_pki::ca::CaError),
}

/// Reads the registry and signs a fresh CRL.
pub async fn build(
    registry: &Registry,
    ca: &IssuingCa,
) -> Result<RevocationState, RevocationError> {
    // The counter is read first: a change that lands while we read the
    // certificates moves it again, and the next poll rebuilds.
    let epoch = registry.revocation_epoch().await?;
    let at = now();
    let mut records = registry.revoked_unexpired(at).await?;
    // Line stations' certificates come from the same issuing CA: one CRL.
    records.extend(registry.revoked_station_certificates(at).await?);
    let mut revoked = HashSet::new();
    let mut entries = Vec::with_capacity(records.len());
    for record in records {
        let Ok(serial) = record.serial.parse::<Serial>() else {
            warn!(serial = %record.serial, "registry holds an unparsable serial; not listed");
            continue;
        };
        let reason = record
            .revocation_reason
            .as_deref()
            .and_then(|r| r.parse::<RevocationReason>().ok())
            .unwrap_or(RevocationReason::Unspecified);
        entries.push(RevokedCertificate {
            serial,
            revoked_at: record.revoked_at.unwrap_or(at),
            reason,
        });
        revoked.insert(record.serial);
    }
    let next_update = at + CRL_VALIDITY.as_secs() as i64;
    // CRL numbers must grow: milliseconds since the epoch do, across restarts
    // and replicas, as long as clocks do not step back.
    let number = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let crl = ca.crl(&entries, number, at, next_update)?;
    Ok(RevocationState {
        epoch,
        crl: Arc::new(crl),
        revoked: Arc::new(revoked),
        this_update: at,
        next_update,
    })
}

/// Keeps `state` current until `shutdown`: rebuilds on every change of the
/// registry's revocation counter and when a quarter of the CRL's validity is
/// left.
pub async fn maintain(
    registry: Arc<Registry>,
    ca: Arc<IssuingCa>,
    state: watch::Sender<Arc<RevocationState>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let (epoch, refresh_at) = {
            let current = state.borrow();
            let validity = current.next_update - current.this_update;
            (current.epoch, current.next_update - validity / 4)
        };
        let changed = match registry.revocation_epoch().await {
            Ok(latest) => latest != epoch,
            Err(e) => {
                error!(error = %e, "cannot read the revocation counter; keeping the current CRL");
                continue;
            }
        };
        if !changed && now() < refresh_at {
            continue;
        }
        match build(&registry, &ca).await {
            Ok(fresh) => {
                info!(
                    epoch = fresh.epoch,
                    revoked = fresh.revoked.len(),
                    "revocation state refreshed"
                );
                state.send_replace(Arc::new(fresh));
            }
            Err(e) => error!(error = %e, "cannot rebuild the CRL; keeping the current one"),
        }
    }
}
