//! Line stations: their certificates, the batches each may enroll devices of,
//! their revocation, and the creation chain (which station relayed the
//! enrollment that issued a device certificate).

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{
    AuditEntry, CertificateRecord, Issuance, IssuanceError, Registry, RegistryError, insert_audit,
};

/// Lifecycle state of a station.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StationStatus {
    /// May relay enrollments.
    Active,
    /// Revoked for good: its certificates are on the CRL.
    Revoked,
}

impl StationStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            StationStatus::Active => "active",
            StationStatus::Revoked => "revoked",
        }
    }

    fn parse(text: &str) -> Result<StationStatus, RegistryError> {
        match text {
            "active" => Ok(StationStatus::Active),
            "revoked" => Ok(StationStatus::Revoked),
            other => Err(RegistryError::Corrupt(format!("station status {other:?}"))),
        }
    }
}

/// A station to register, with its first certificate.
#[derive(Clone, Debug)]
pub struct NewStation {
    /// Station id (device id syntax, already checked).
    pub id: String,
    /// The batches it may enroll devices of (each must exist).
    pub batches: Vec<String>,
    /// Who registers it.
    pub created_by: String,
    /// Its certificate.
    pub certificate: StationCertificate,
}

/// A certificate issued to a station.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StationCertificate {
    /// Serial, lowercase hex.
    pub serial: String,
    /// Validity start.
    pub not_before: i64,
    /// Validity end.
    pub not_after: i64,
    /// When it was issued.
    pub issued_at: i64,
    /// The certificate, DER.
    #[serde(skip)]
    pub der: Vec<u8>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<i64>,
}

/// A registered station.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Station {
    /// Station id.
    pub id: String,
    /// Status.
    pub status: StationStatus,
    /// The batches it may enroll devices of.
    pub batches: Vec<String>,
    /// Who registered it.
    pub created_by: String,
    /// When.
    pub created_at: i64,
    /// Last status change.
    pub updated_at: i64,
    /// Devices enrolled through it.
    pub enrolled: i64,
}

/// Which station enrolled a device certificate.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EnrolledBy {
    /// The device certificate's serial.
    pub serial: String,
    /// The station.
    pub station_id: String,
    /// When.
    pub at: i64,
}

/// A station operation was refused; nothing was written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StationError {
    /// The station id is taken (stations are never deleted, so an id is never
    /// reused: the audit trail stays unambiguous).
    #[error("station `{0}` already exists")]
    Exists(String),
    /// No such station.
    #[error("no station `{0}` is registered")]
    Unknown(String),
    /// A batch named for the station does not exist.
    #[error("no batch `{0}` (see `idgate batch list`)")]
    UnknownBatch(String),
    /// The station is revoked already.
    #[error("station `{0}` is already revoked")]
    AlreadyRevoked(String),
    /// The database failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl From<sqlx::Error> for StationError {
    fn from(e: sqlx::Error) -> Self {
        StationError::Registry(e.into())
    }
}

const SELECT_STATION: &str = "SELECT s.id, s.status, s.created_by, s.created_at, s.updated_at, \
     (SELECT COUNT(*) FROM station_enrollments e WHERE e.station_id = s.id) AS enrolled \
     FROM stations s";

impl Registry {
    /// Registers a station, its batches and its first certificate, and audits
    /// it (`station.add`), in one transaction.
    pub async fn add_station(&self, station: &NewStation, at: i64) -> Result<(), StationError> {
        let _turn = self.write_turn.lock().await;
        let mut tx = self.begin_write().await?;
        let taken = sqlx::query("SELECT 1 FROM stations WHERE id = $1")
            .bind(&station.id)
            .fetch_optional(&mut *tx)
            .await?;
        if taken.is_some() {
            return Err(StationError::Exists(station.id.clone()));
        }
        sqlx::query(
            "INSERT INTO stations (id, status, created_by, created_at, updated_at) \
             VALUES ($1, 'active', $2, $3, $3)",
        )
        .bind(&station.id)
        .bind(&station.created_by)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        for batch in &station.batches {
            let exists = sqlx::query("SELECT 1 FROM batches WHERE id = $1")
                .bind(batch)
                .fetch_optional(&mut *tx)
                .await?;
            if exists.is_none() {
                return Err(StationError::UnknownBatch(batch.clone()));
            }
            sqlx::query("INSERT INTO station_batches (station_id, batch_id) VALUES ($1, $2)")
                .bind(&station.id)
                .bind(batch)
                .execute(&mut *tx)
                .await?;
        }
        let certificate = &station.certificate;
        sqlx::query(
            "INSERT INTO station_certificates (serial, station_id, not_before, not_after, \
             issued_at, der) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&certificate.serial)
        .bind(&station.id)
        .bind(certificate.not_before)
        .bind(certificate.not_after)
        .bind(certificate.issued_at)
        .bind(certificate.der.clone())
        .execute(&mut *tx)
        .await?;
        let audit = AuditEntry::new(at, &station.created_by, "station.add")
            .serial(&certificate.serial)
            .detail(format!(
                "station={} batches={} not_after={}",
                station.id,
                station.batches.join(","),
                certificate.not_after
            ));
        insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Adds a new certificate to an active station (its old ones stay valid
    /// until they expire or the station is revoked), and audits it
    /// (`station.renew`).
    pub async fn add_station_certificate(
        &self,
        id: &str,
        certificate: &StationCertificate,
        actor: &str,
        at: i64,
    ) -> Result<(), StationError> {
        self.renew_station_certificate(id, certificate, None, actor, at)
            .await
            .map(drop)
    }

    /// Adds a new certificate to an active station and, with `revoke_old`
    /// (a CRL reason), revokes every other unrevoked certificate of it in
    /// the same transaction (they go on the CRL; gateways close their
    /// sessions). Audited as `station.renew`. Returns the serials revoked.
    pub async fn renew_station_certificate(
        &self,
        id: &str,
        certificate: &StationCertificate,
        revoke_old: Option<&str>,
        actor: &str,
        at: i64,
    ) -> Result<Vec<String>, StationError> {
        let _turn = self.write_turn.lock().await;
        let mut tx = self.begin_write().await?;
        require_live_station(&mut tx, id).await?;
        sqlx::query(
            "INSERT INTO station_certificates (serial, station_id, not_before, not_after, \
             issued_at, der) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&certificate.serial)
        .bind(id)
        .bind(certificate.not_before)
        .bind(certificate.not_after)
        .bind(certificate.issued_at)
        .bind(certificate.der.clone())
        .execute(&mut *tx)
        .await?;
        let mut revoked = Vec::new();
        if let Some(reason) = revoke_old {
            revoked =
                revoke_certificates(&mut tx, id, Some(&certificate.serial), reason, at).await?;
            if !revoked.is_empty() {
                sqlx::query(
                    "UPDATE registry_state SET value = value + 1 WHERE name = 'revocation'",
                )
                .execute(&mut *tx)
                .await?;
            }
        }
        let mut detail = format!("station={id} not_after={}", certificate.not_after);
        if let Some(reason) = revoke_old {
            detail.push_str(&format!(" revoked={} reason={reason}", revoked.join(",")));
        }
        let audit = AuditEntry::new(at, actor, "station.renew")
            .serial(&certificate.serial)
            .detail(detail);
        insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(revoked)
    }

    /// One station.
    pub async fn station(&self, id: &str) -> Result<Option<Station>, RegistryError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{SELECT_STATION} WHERE s.id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => Ok(Some(self.station_from_row(&row).await?)),
            None => Ok(None),
        }
    }

    /// Every station, by id.
    pub async fn stations(&self) -> Result<Vec<Station>, RegistryError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{SELECT_STATION} ORDER BY s.id"
        )))
        .fetch_all(&self.pool)
        .await?;
        let mut stations = Vec::with_capacity(rows.len());
        for row in &rows {
            stations.push(self.station_from_row(row).await?);
        }
        Ok(stations)
    }

    async fn station_from_row(&self, row: &AnyRow) -> Result<Station, RegistryError> {
        let id: String = row.try_get("id")?;
        let batches = sqlx::query(
            "SELECT batch_id FROM station_batches WHERE station_id = $1 ORDER BY batch_id",
        )
        .bind(&id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| r.try_get("batch_id"))
        .collect::<Result<Vec<String>, _>>()?;
        let status: String = row.try_get("status")?;
        Ok(Station {
            id,
            status: StationStatus::parse(&status)?,
            batches,
            created_by: row.try_get("created_by")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
            enrolled: row.try_get("enrolled")?,
        })
    }

    /// A station's certificates, newest first.
    pub async fn station_certificates(
        &self,
        station_id: &str,
    ) -> Result<Vec<StationCertificate>, RegistryError> {
        let rows = sqlx::query(
            "SELECT serial, not_before, not_after, issued_at, der, revoked_at \
             FROM station_certificates WHERE station_id = $1 ORDER BY issued_at DESC, serial",
        )
        .bind(station_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(StationCertificate {
                    serial: row.try_get("serial")?,
                    not_before: row.try_get("not_before")?,
                    not_after: row.try_get("not_after")?,
                    issued_at: row.try_get("issued_at")?,
                    der: row.try_get("der")?,
                    revoked_at: row.try_get("revoked_at")?,
                })
            })
            .collect()
    }

    /// Revokes a station for good: its certificates go on the CRL (every
    /// gateway refuses them at the TLS handshake and closes their sessions)
    /// and it may relay nothing more. Returns the serials revoked.
    pub async fn revoke_station(
        &self,
        id: &str,
        reason: &str,
        actor: &str,
        at: i64,
    ) -> Result<Vec<String>, StationError> {
        let _turn = self.write_turn.lock().await;
        let mut tx = self.begin_write().await?;
        require_live_station(&mut tx, id).await?;
        let serials = revoke_certificates(&mut tx, id, None, reason, at).await?;
        sqlx::query("UPDATE stations SET status = 'revoked', updated_at = $1 WHERE id = $2")
            .bind(at)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE registry_state SET value = value + 1 WHERE name = 'revocation'")
            .execute(&mut *tx)
            .await?;
        let audit = AuditEntry::new(at, actor, "station.revoke").detail(format!(
            "station={id} reason={reason} certificates={}",
            serials.join(",")
        ));
        insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(serials)
    }

    /// One station certificate by serial, as a [`CertificateRecord`] whose
    /// `device_id` is `station:{id}` (for the OCSP responder).
    pub async fn station_certificate_record(
        &self,
        serial: &str,
    ) -> Result<Option<CertificateRecord>, RegistryError> {
        let row = sqlx::query(
            "SELECT serial, station_id, not_before, not_after, issued_at, der, revoked_at, \
             revocation_reason FROM station_certificates WHERE serial = $1",
        )
        .bind(serial)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(station_record).transpose()
    }

    /// Revoked station certificates that have not expired at `now`, for the
    /// CRL. `device_id` holds `station:{id}` (these are not device
    /// certificates; only the serial and revocation fields matter to a CRL).
    pub async fn revoked_station_certificates(
        &self,
        now: i64,
    ) -> Result<Vec<CertificateRecord>, RegistryError> {
        let rows = sqlx::query(
            "SELECT serial, station_id, not_before, not_after, issued_at, der, revoked_at, \
             revocation_reason FROM station_certificates \
             WHERE revoked_at IS NOT NULL AND not_after > $1 ORDER BY serial",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(station_record).collect()
    }

    /// Whether station `station_id` may relay an enrollment for `device_id`:
    /// the station is active and the device belongs to one of its batches.
    /// `None` if the station is unknown or revoked.
    pub async fn station_may_enroll(
        &self,
        station_id: &str,
        device_id: &str,
    ) -> Result<Option<bool>, RegistryError> {
        let status: Option<String> = sqlx::query("SELECT status FROM stations WHERE id = $1")
            .bind(station_id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| r.try_get("status"))
            .transpose()?;
        if status.as_deref() != Some("active") {
            return Ok(None);
        }
        let allowed = sqlx::query(
            "SELECT 1 FROM devices d JOIN station_batches sb ON sb.batch_id = d.batch_id \
             WHERE d.id = $1 AND sb.station_id = $2",
        )
        .bind(device_id)
        .bind(station_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(Some(allowed.is_some()))
    }

    /// Which stations enrolled the device's certificates, oldest first.
    pub async fn enrolled_by(&self, device_id: &str) -> Result<Vec<EnrolledBy>, RegistryError> {
        let rows = sqlx::query(
            "SELECT serial, station_id, at FROM station_enrollments WHERE device_id = $1 \
             ORDER BY at, serial",
        )
        .bind(device_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(EnrolledBy {
                    serial: row.try_get("serial")?,
                    station_id: row.try_get("station_id")?,
                    at: row.try_get("at")?,
                })
            })
            .collect()
    }
}

/// A `station_certificates` row as a [`CertificateRecord`].
fn station_record(row: &AnyRow) -> Result<CertificateRecord, RegistryError> {
    let station: String = row.try_get("station_id")?;
    Ok(CertificateRecord {
        serial: row.try_get("serial")?,
        device_id: format!("station:{station}"),
        key_fingerprint: Vec::new(),
        not_before: row.try_get("not_before")?,
        not_after: row.try_get("not_after")?,
        issued_at: row.try_get("issued_at")?,
        der: row.try_get("der")?,
        revoked_at: row.try_get("revoked_at")?,
        revocation_reason: row.try_get("revocation_reason")?,
        renewed_from: None,
    })
}

/// Inside an enrollment's transaction: records the station that relayed it.
pub(super) async fn record_enrolled_by(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    issuance: &Issuance,
) -> Result<(), IssuanceError> {
    let Some(station) = &issuance.station else {
        return Ok(());
    };
    sqlx::query(
        "INSERT INTO station_enrollments (serial, device_id, station_id, at) \
         VALUES ($1, $2, $3, $4)",
    )
    .bind(&issuance.certificate.serial)
    .bind(&issuance.certificate.device_id)
    .bind(station)
    .bind(issuance.certificate.issued_at)
    .execute(&mut **tx)
    .await
    .map_err(RegistryError::from)?;
    Ok(())
}

/// Fails unless station `id` exists and is not revoked.
async fn require_live_station(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    id: &str,
) -> Result<(), StationError> {
    let status: Option<String> = sqlx::query("SELECT status FROM stations WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?
        .map(|r| r.try_get("status"))
        .transpose()?;
    match status.as_deref() {
        None => Err(StationError::Unknown(id.to_owned())),
        Some("revoked") => Err(StationError::AlreadyRevoked(id.to_owned())),
        Some(_) => Ok(()),
    }
}

/// Revokes every unrevoked certificate of station `id` but `keep` (the one
/// just issued, on a renewal) with the CRL `reason`; returns their serials.
/// The caller bumps the revocation counter.
async fn revoke_certificates(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    id: &str,
    keep: Option<&str>,
    reason: &str,
    at: i64,
) -> Result<Vec<String>, StationError> {
    let except = if keep.is_some() {
        " AND serial <> $2"
    } else {
        ""
    };
    let mut select = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT serial FROM station_certificates WHERE station_id = $1 AND revoked_at IS NULL\
         {except} ORDER BY serial"
    )))
    .bind(id);
    if let Some(keep) = keep {
        select = select.bind(keep);
    }
    let serials = select
        .fetch_all(&mut **tx)
        .await?
        .iter()
        .map(|r| r.try_get("serial"))
        .collect::<Result<Vec<String>, _>>()?;
    let except = if keep.is_some() {
        " AND serial <> $4"
    } else {
        ""
    };
    let mut update = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE station_certificates SET revoked_at = $1, revocation_reason = $2 \
         WHERE station_id = $3 AND revoked_at IS NULL{except}"
    )))
    .bind(at)
    .bind(reason)
    .bind(id);
    if let Some(keep) = keep {
        update = update.bind(keep);
    }
    update.execute(&mut **tx).await?;
    Ok(serials)
}
