//! What a device's request needs to know before it can be signed, read in
//! one statement: the device, and for an enrollment its credential, for a
//! renewal the certificate it renews and that certificate's successors, and
//! in both cases the answer already given to the request's rid.
//!
//! One statement, not one per fact: with SQLite, sqlx runs every statement on
//! a connection's worker thread and hands the rows back through a channel, so
//! each statement is a round trip between threads (and a pool acquire), and
//! those threads held 44 % of the samples in a profile of `idgate bench
//! enroll` (docs/performance.md).

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{
    CertificateRecord, Credential, Device, PriorRequest, Registry, RegistryError, device_from_row,
};

/// The columns [`device_from_row`] reads, of the devices table as `d`.
macro_rules! device_columns {
    () => {
        "d.id, d.owner, d.site, d.model, d.status, d.created_by, d.created_at, d.updated_at, \
         d.renew_counter, d.label, d.last_seen_at"
    };
}

/// Every column [`certificate_at`] reads, of the certificates table as `$t`,
/// named `$t_<column>`.
#[rustfmt::skip]
macro_rules! certificate_columns {
    ($t:literal) => {
        concat!(
            $t, ".serial AS ", $t, "_serial, ",
            $t, ".device_id AS ", $t, "_device_id, ",
            $t, ".key_fingerprint AS ", $t, "_key_fingerprint, ",
            $t, ".not_before AS ", $t, "_not_before, ",
            $t, ".not_after AS ", $t, "_not_after, ",
            $t, ".issued_at AS ", $t, "_issued_at, ",
            $t, ".der AS ", $t, "_der, ",
            $t, ".revoked_at AS ", $t, "_revoked_at, ",
            $t, ".revocation_reason AS ", $t, "_revocation_reason, ",
            $t, ".renewed_from AS ", $t, "_renewed_from"
        )
    };
}

/// What an enrollment needs from the registry (see
/// [`Registry::enrollment_context`]).
#[derive(Clone, Debug)]
pub struct EnrollmentContext {
    /// The device.
    pub device: Device,
    /// Its enrollment credential, if it has one.
    pub credential: Option<Credential>,
    /// The answer already given to this rid, if it was answered.
    pub prior: Option<PriorRequest>,
}

/// What a renewal needs from the registry (see [`Registry::renewal_context`]).
#[derive(Clone, Debug)]
pub struct RenewalContext {
    /// The device.
    pub device: Device,
    /// The answer already given to this rid, if it was answered.
    pub prior: Option<PriorRequest>,
    /// The certificate the request names, if it was issued to this device.
    pub current: Option<CertificateRecord>,
    /// The keys of the certificates already renewed from `current`.
    pub successor_keys: SuccessorKeys,
}

/// The public keys of the certificates renewed from one certificate, as far
/// as a renewal needs them: a second renewal of a certificate must bring the
/// key of the first (a retry with a new rid), anything else means a clone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SuccessorKeys {
    /// Never renewed.
    None,
    /// Renewed, every time for this key (its fingerprint).
    One(Vec<u8>),
    /// Renewed for at least two different keys.
    Several,
}

impl SuccessorKeys {
    /// Whether a successor has a key other than `key_fingerprint`.
    pub fn any_other_than(&self, key_fingerprint: &[u8]) -> bool {
        match self {
            SuccessorKeys::None => false,
            SuccessorKeys::One(key) => key.as_slice() != key_fingerprint,
            SuccessorKeys::Several => true,
        }
    }
}

impl Registry {
    /// Device `device_id` with its enrollment credential and the answer given
    /// to its request (`op`, `rid`), in one statement; `None` if no such
    /// device is registered.
    pub async fn enrollment_context(
        &self,
        device_id: &str,
        op: &str,
        rid: &str,
    ) -> Result<Option<EnrollmentContext>, RegistryError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            device_columns!(),
            ", k.kind AS credential_kind, k.secret AS credential_secret, \
             k.used_at AS credential_used_at, r.csr_sha256 AS prior_csr_sha256, ",
            certificate_columns!("p"),
            " FROM devices d \
             LEFT JOIN enrollment_credentials k ON k.device_id = d.id \
             LEFT JOIN requests r ON r.device_id = d.id AND r.op = $2 AND r.rid = $3 \
             LEFT JOIN certificates p ON p.serial = r.serial \
             WHERE d.id = $1"
        ))
        .bind(device_id)
        .bind(op)
        .bind(rid)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let kind: Option<String> = row.try_get("credential_kind")?;
        let credential = match kind {
            None => None,
            Some(kind) => Some(Credential {
                kind,
                secret: row.try_get("credential_secret")?,
                used_at: row.try_get("credential_used_at")?,
            }),
        };
        Ok(Some(EnrollmentContext {
            device: device_from_row(&row)?,
            credential,
            prior: prior_at(&row)?,
        }))
    }

    /// Device `device_id` with the answer given to its request (`op`, `rid`),
    /// its certificate `serial` (`None` if that certificate was not issued to
    /// this device) and the keys of that certificate's successors, in one
    /// statement; `None` if no such device is registered.
    pub async fn renewal_context(
        &self,
        device_id: &str,
        op: &str,
        rid: &str,
        serial: &str,
    ) -> Result<Option<RenewalContext>, RegistryError> {
        // The successors' keys as a count of distinct keys and one of them:
        // enough to tell none / one key / several, with aggregates that both
        // backends have for binary values.
        let row = sqlx::query(concat!(
            "SELECT ",
            device_columns!(),
            ", r.csr_sha256 AS prior_csr_sha256, ",
            certificate_columns!("p"),
            ", ",
            certificate_columns!("c"),
            ", (SELECT COUNT(DISTINCT s.key_fingerprint) FROM certificates s \
             WHERE s.renewed_from = c.serial) AS successor_key_count, \
             (SELECT s.key_fingerprint FROM certificates s \
             WHERE s.renewed_from = c.serial LIMIT 1) AS successor_key \
             FROM devices d \
             LEFT JOIN requests r ON r.device_id = d.id AND r.op = $2 AND r.rid = $3 \
             LEFT JOIN certificates p ON p.serial = r.serial \
             LEFT JOIN certificates c ON c.serial = $4 AND c.device_id = d.id \
             WHERE d.id = $1"
        ))
        .bind(device_id)
        .bind(op)
        .bind(rid)
        .bind(serial)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let count: i64 = row.try_get("successor_key_count")?;
        let successor_keys = match count {
            0 => SuccessorKeys::None,
            1 => SuccessorKeys::One(row.try_get("successor_key")?),
            _ => SuccessorKeys::Several,
        };
        Ok(Some(RenewalContext {
            device: device_from_row(&row)?,
            prior: prior_at(&row)?,
            current: certificate_at(&row, "c")?,
            successor_keys,
        }))
    }
}

/// The prior request of a context row (`r` and `p`), if there was one.
fn prior_at(row: &AnyRow) -> Result<Option<PriorRequest>, RegistryError> {
    let csr_sha256: Option<Vec<u8>> = row.try_get("prior_csr_sha256")?;
    let (Some(csr_sha256), Some(certificate)) = (csr_sha256, certificate_at(row, "p")?) else {
        return Ok(None);
    };
    Ok(Some(PriorRequest {
        csr_sha256,
        certificate,
    }))
}

/// The certificate named `table_*` in `row` (see [`certificate_columns`]),
/// `None` where the join found none.
fn certificate_at(row: &AnyRow, table: &str) -> Result<Option<CertificateRecord>, RegistryError> {
    let column = |name: &str| format!("{table}_{name}");
    let serial: Option<String> = row.try_get(column("serial").as_str())?;
    let Some(serial) = serial else {
        return Ok(None);
    };
    Ok(Some(CertificateRecord {
        serial,
        device_id: row.try_get(column("device_id").as_str())?,
        key_fingerprint: row.try_get(column("key_fingerprint").as_str())?,
        not_before: row.try_get(column("not_before").as_str())?,
        not_after: row.try_get(column("not_after").as_str())?,
        issued_at: row.try_get(column("issued_at").as_str())?,
        der: row.try_get(column("der").as_str())?,
        revoked_at: row.try_get(column("revoked_at").as_str())?,
        revocation_reason: row.try_get(column("revocation_reason").as_str())?,
        renewed_from: row.try_get(column("renewed_from").as_str())?,
    }))
}
