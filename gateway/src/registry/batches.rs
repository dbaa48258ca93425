//! Manufacturing batches: many devices registered in one transaction, and
//! per-batch progress counts (registered, enrolled, failed, pending).

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{
    AuditEntry, NewDevice, Registry, RegistryError, ensure_owner, insert_audit, insert_device,
};

/// A batch to register.
#[derive(Clone, Debug)]
pub struct NewBatch {
    /// Batch id (syntax already checked).
    pub id: String,
    /// Default owner of its devices.
    pub owner: String,
    /// Default site.
    pub site: String,
    /// Default model.
    pub model: Option<String>,
    /// Who imports it.
    pub created_by: String,
}

/// A batch and where its devices stand.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BatchSummary {
    /// Batch id.
    pub id: String,
    /// Default owner.
    pub owner: String,
    /// Default site.
    pub site: String,
    /// Default model.
    pub model: Option<String>,
    /// Who imported it.
    pub created_by: String,
    /// When.
    pub created_at: i64,
    /// Devices imported.
    pub registered: i64,
    /// Devices that have received a certificate (whatever their status now).
    pub enrolled: i64,
    /// Devices still pending after at least one refused enrollment.
    pub failed: i64,
    /// Devices still pending that have not been refused yet.
    pub pending: i64,
}

/// A batch import was refused; nothing was written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    /// The batch id is taken.
    #[error("batch `{0}` already exists")]
    BatchExists(String),
    /// A device of the batch is registered already.
    #[error("device `{id}` is already registered")]
    DeviceExists {
        /// Position of the device in the slice given to [`Registry::import_batch`].
        index: usize,
        /// The device id.
        id: String,
    },
    /// The database failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl From<sqlx::Error> for BatchError {
    fn from(e: sqlx::Error) -> Self {
        BatchError::Registry(e.into())
    }
}

/// Per-batch counts. "Enrolled" means a certificate was ever issued, so a
/// device revoked later still counts as enrolled (it left the line working);
/// "failed" are devices the gateway refused and that never enrolled since,
/// the ones a line supervisor must look at.
const SUMMARY: &str = "SELECT b.id, b.owner, b.site, b.model, b.created_by, b.created_at, \
     b.device_count AS registered, \
     (SELECT COUNT(*) FROM devices d WHERE d.batch_id = b.id \
        AND EXISTS (SELECT 1 FROM certificates c WHERE c.device_id = d.id)) AS enrolled, \
     (SELECT COUNT(*) FROM devices d WHERE d.batch_id = b.id AND d.status = 'pending' \
        AND EXISTS (SELECT 1 FROM audit_log a WHERE a.device_id = d.id AND a.outcome <> 'ok')) AS failed, \
     (SELECT COUNT(*) FROM devices d WHERE d.batch_id = b.id AND d.status = 'pending' \
        AND NOT EXISTS (SELECT 1 FROM audit_log a WHERE a.device_id = d.id AND a.outcome <> 'ok')) AS pending \
     FROM batches b";

impl Registry {
    /// Registers a batch and all its devices with their sealed enrollment
    /// credentials, and audits it (`batch.import`, and `device.add` per
    /// device), in one transaction: either every device is registered or none.
    /// `progress` is called with the number of devices written so far.
    pub async fn import_batch(
        &self,
        batch: &NewBatch,
        devices: &[(NewDevice, Vec<u8>)],
        at: i64,
        progress: &(dyn Fn(usize) + Send + Sync),
    ) -> Result<(), BatchError> {
        let _turn = self.write_turn.lock().await;
        let mut tx = self.begin_write().await?;
        let taken = sqlx::query("SELECT 1 FROM batches WHERE id = $1")
            .bind(&batch.id)
            .fetch_optional(&mut *tx)
            .await?;
        if taken.is_some() {
            return Err(BatchError::BatchExists(batch.id.clone()));
        }
        sqlx::query(
            "INSERT INTO batches (id, owner, site, model, created_by, created_at, device_count) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&batch.id)
        .bind(&batch.owner)
        .bind(&batch.site)
        .bind(batch.model.clone())
        .bind(&batch.created_by)
        .bind(at)
        .bind(devices.len() as i64)
        .execute(&mut *tx)
        .await?;
        let mut owners: Vec<&str> = devices.iter().map(|(d, _)| d.owner.as_str()).collect();
        owners.push(&batch.owner);
        owners.sort_unstable();
        owners.dedup();
        for owner in owners {
            ensure_owner(&mut tx, owner, at).await?;
        }
        for (index, (device, sealed)) in devices.iter().enumerate() {
            let exists = sqlx::query("SELECT 1 FROM devices WHERE id = $1")
                .bind(&device.id)
                .fetch_optional(&mut *tx)
                .await?;
            if exists.is_some() {
                return Err(BatchError::DeviceExists {
                    index,
                    id: device.id.clone(),
                });
            }
            insert_device(&mut tx, device, sealed, at, Some(&batch.id)).await?;
            progress(index + 1);
        }
        let detail = format!(
            "batch={} devices={} owner={} site={} model={}",
            batch.id,
            devices.len(),
            batch.owner,
            batch.site,
            batch.model.as_deref().unwrap_or("-")
        );
        insert_audit(
            &mut tx,
            &AuditEntry::new(at, &batch.created_by, "batch.import").detail(detail),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Every batch with its counts, oldest first.
    pub async fn batches(&self) -> Result<Vec<BatchSummary>, RegistryError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{SUMMARY} ORDER BY b.created_at, b.id"
        )))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(summary_from_row).collect()
    }

    /// One batch with its counts.
    pub async fn batch(&self, id: &str) -> Result<Option<BatchSummary>, RegistryError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("{SUMMARY} WHERE b.id = $1")))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(summary_from_row).transpose()
    }

    /// Ids of the devices of a batch that are still pending, by id.
    pub async fn batch_pending(&self, id: &str) -> Result<Vec<String>, RegistryError> {
        let rows = sqlx::query(
            "SELECT id FROM devices WHERE batch_id = $1 AND status = 'pending' ORDER BY id",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| r.try_get("id"))
            .collect::<Result<_, _>>()?)
    }
}

fn summary_from_row(row: &AnyRow) -> Result<BatchSummary, RegistryError> {
    Ok(BatchSummary {
        id: row.try_get("id")?,
        owner: row.try_get("owner")?,
        site: row.try_get("site")?,
        model: row.try_get("model")?,
        created_by: row.try_get("created_by")?,
        created_at: row.try_get("created_at")?,
        registered: row.try_get("registered")?,
        enrolled: row.try_get("enrolled")?,
        failed: row.try_get("failed")?,
        pending: row.try_get("pending")?,
    })
}
