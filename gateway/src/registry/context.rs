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
//!
//! And one statement for many requests: the contexts asked for while a read
//! is under way are read together by the next one (up to [`MAX_READ`], at
//! most [`READ_TURNS`] reads at once), the way the group commit batches the
//! writes. A batch is padded to a power of two with repeats of its last key,
//! so each kind of read has seven SQL texts, all of which stay in sqlx's
//! statement cache.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};
use tokio::sync::{Semaphore, oneshot};

use super::{
    CertificateRecord, Credential, Device, PriorRequest, Registry, RegistryError, device_from_row,
};

/// The most requests one read serves.
const MAX_READ: usize = 64;

/// Reads under way at once. The pool has four SQLite connections; the group
/// commit holds one, and one stays free for everything else.
pub(super) const READ_TURNS: usize = 2;

/// An enrollment's question: device, op, rid.
type EnrollmentKey = (String, String, String);

/// A renewal's question: device, op, rid, serial of the certificate renewed.
type RenewalKey = (String, String, String, String);

/// A request waiting for the read that answers it; `None`: no such device.
type Waiting<K, V> = (K, oneshot::Sender<Result<Option<V>, RegistryError>>);

/// The contexts waiting to be read, by kind.
#[derive(Debug)]
pub(super) struct ReadQueue {
    enrollments: std::sync::Mutex<Vec<Waiting<EnrollmentKey, EnrollmentContext>>>,
    renewals: std::sync::Mutex<Vec<Waiting<RenewalKey, RenewalContext>>>,
    pub(super) turns: Semaphore,
    statements: AtomicU64,
    requests: AtomicU64,
}

impl Default for ReadQueue {
    fn default() -> ReadQueue {
        ReadQueue {
            enrollments: std::sync::Mutex::default(),
            renewals: std::sync::Mutex::default(),
            turns: Semaphore::new(READ_TURNS),
            statements: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        }
    }
}

/// How the requests' contexts were read since the registry was opened (see
/// [`Registry::context_reads`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ContextReads {
    /// Statements run.
    pub statements: u64,
    /// Requests they answered.
    pub requests: u64,
}

/// What a read found for one key: the context, or why its row could not be
/// read (that key's error only).
type Found<K, V> = HashMap<K, Result<V, String>>;

/// Queues `key` and returns its answer: read by whichever caller holds a
/// turn when it comes up, this one included. `read` answers a batch of
/// distinct keys; a key it leaves out has no device. Reads change nothing,
/// so a key whose batch was abandoned (its caller went away) is queued again.
async fn batched<K, V, F, Fut>(
    queue: &std::sync::Mutex<Vec<Waiting<K, V>>>,
    turns: &Semaphore,
    key: K,
    read: F,
) -> Result<Option<V>, RegistryError>
where
    K: Clone + Eq + Hash,
    V: Clone,
    F: Fn(Vec<K>) -> Fut,
    Fut: Future<Output = Result<Found<K, V>, RegistryError>>,
{
    let lock = || {
        queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    let enqueue = || {
        let (done, answer) = oneshot::channel();
        lock().push((key.clone(), done));
        answer
    };
    let mut answer = enqueue();
    loop {
        let turn = turns
            .acquire()
            .await
            .map_err(|_| RegistryError::SharedRead("the registry is closing".into()))?;
        loop {
            match answer.try_recv() {
                Ok(result) => return result,
                Err(oneshot::error::TryRecvError::Closed) => answer = enqueue(),
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            let batch: Vec<Waiting<K, V>> = {
                let mut queue = lock();
                let take = queue.len().min(MAX_READ);
                queue.drain(..take).collect()
            };
            if batch.is_empty() {
                // The other turn took this key; its answer comes from there.
                break;
            }
            let mut keys: Vec<K> = Vec::with_capacity(batch.len());
            for (key, _) in &batch {
                if !keys.contains(key) {
                    keys.push(key.clone());
                }
            }
            match read(keys).await {
                Ok(found) => {
                    for (key, done) in batch {
                        let _ = done.send(match found.get(&key) {
                            None => Ok(None),
                            Some(Ok(context)) => Ok(Some(context.clone())),
                            Some(Err(why)) => Err(RegistryError::Corrupt(why.clone())),
                        });
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    for (_, done) in batch {
                        let _ = done.send(Err(RegistryError::SharedRead(message.clone())));
                    }
                }
            }
        }
        drop(turn);
        match (&mut answer).await {
            Ok(result) => return result,
            Err(_) => answer = enqueue(),
        }
    }
}

/// `(VALUES ($1, …, $columns), …) AS q` for `keys` keys padded to a power of
/// two; the columns are `q.column1`, `q.column2`, … in both backends.
fn values_of(keys: usize, columns: usize) -> String {
    let rows = keys.next_power_of_two();
    let mut sql = String::from("(VALUES ");
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for column in 0..columns {
            if column > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("${}", row * columns + column + 1));
        }
        sql.push(')');
    }
    sql.push_str(") AS q");
    sql
}

/// The keys of a batch, each as a row of strings, padded as [`values_of`]
/// counts them.
fn padded<K: Clone>(keys: &[K]) -> impl Iterator<Item = &K> {
    let pad = keys.len().next_power_of_two() - keys.len();
    keys.iter()
        .chain(std::iter::repeat_n(&keys[keys.len() - 1], pad))
}

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
    /// to its request (`op`, `rid`), read in one statement with the other
    /// enrollments waiting for a read; `None` if no such device is
    /// registered.
    pub async fn enrollment_context(
        &self,
        device_id: &str,
        op: &str,
        rid: &str,
    ) -> Result<Option<EnrollmentContext>, RegistryError> {
        let key = (device_id.to_owned(), op.to_owned(), rid.to_owned());
        batched(&self.reads.enrollments, &self.reads.turns, key, |keys| {
            self.count_read(keys.len());
            self.read_enrollment_contexts(keys)
        })
        .await
    }

    /// How the requests' contexts were read so far: statements, and the
    /// requests they answered.
    pub fn context_reads(&self) -> ContextReads {
        ContextReads {
            statements: self.reads.statements.load(Ordering::Relaxed),
            requests: self.reads.requests.load(Ordering::Relaxed),
        }
    }

    fn count_read(&self, keys: usize) {
        self.reads.statements.fetch_add(1, Ordering::Relaxed);
        self.reads
            .requests
            .fetch_add(keys as u64, Ordering::Relaxed);
    }

    async fn read_enrollment_contexts(
        &self,
        keys: Vec<EnrollmentKey>,
    ) -> Result<Found<EnrollmentKey, EnrollmentContext>, RegistryError> {
        let sql = enrollment_sql(keys.len());
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for (device_id, op, rid) in padded(&keys) {
            query = query.bind(device_id).bind(op).bind(rid);
        }
        let mut found = HashMap::with_capacity(keys.len());
        for row in query.fetch_all(&self.pool).await? {
            let key = (
                row.try_get("q_device")?,
                row.try_get("q_op")?,
                row.try_get("q_rid")?,
            );
            found.insert(key, enrollment_at(&row).map_err(|e| e.to_string()));
        }
        Ok(found)
    }

    /// Device `device_id` with the answer given to its request (`op`, `rid`),
    /// its certificate `serial` (`None` if that certificate was not issued to
    /// this device) and the keys of that certificate's successors, read in
    /// one statement with the other renewals waiting for a read; `None` if no
    /// such device is registered.
    pub async fn renewal_context(
        &self,
        device_id: &str,
        op: &str,
        rid: &str,
        serial: &str,
    ) -> Result<Option<RenewalContext>, RegistryError> {
        let key = (
            device_id.to_owned(),
            op.to_owned(),
            rid.to_owned(),
            serial.to_owned(),
        );
        batched(&self.reads.renewals, &self.reads.turns, key, |keys| {
            self.count_read(keys.len());
            self.read_renewal_contexts(keys)
        })
        .await
    }

    async fn read_renewal_contexts(
        &self,
        keys: Vec<RenewalKey>,
    ) -> Result<Found<RenewalKey, RenewalContext>, RegistryError> {
        let sql = renewal_sql(keys.len());
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for (device_id, op, rid, serial) in padded(&keys) {
            query = query.bind(device_id).bind(op).bind(rid).bind(serial);
        }
        let mut found = HashMap::with_capacity(keys.len());
        for row in query.fetch_all(&self.pool).await? {
            let key = (
                row.try_get("q_device")?,
                row.try_get("q_op")?,
                row.try_get("q_rid")?,
                row.try_get("q_serial")?,
            );
            found.insert(key, renewal_at(&row).map_err(|e| e.to_string()));
        }
        Ok(found)
    }
}

/// The enrollment contexts of `keys` keys (see [`values_of`]).
fn enrollment_sql(keys: usize) -> String {
    format!(
        concat!(
            "SELECT q.column1 AS q_device, q.column2 AS q_op, q.column3 AS q_rid, ",
            device_columns!(),
            ", k.kind AS credential_kind, k.secret AS credential_secret, \
             k.used_at AS credential_used_at, r.csr_sha256 AS prior_csr_sha256, ",
            certificate_columns!("p"),
            " FROM {} JOIN devices d ON d.id = q.column1 \
             LEFT JOIN enrollment_credentials k ON k.device_id = d.id \
             LEFT JOIN requests r ON r.device_id = d.id AND r.op = q.column2 \
             AND r.rid = q.column3 \
             LEFT JOIN certificates p ON p.serial = r.serial"
        ),
        values_of(keys, 3)
    )
}

/// The renewal contexts of `keys` keys (see [`values_of`]).
fn renewal_sql(keys: usize) -> String {
    // The successors' keys as a count of distinct keys and one of them:
    // enough to tell none / one key / several, with aggregates that both
    // backends have for binary values.
    format!(
        concat!(
            "SELECT q.column1 AS q_device, q.column2 AS q_op, q.column3 AS q_rid, \
             q.column4 AS q_serial, ",
            device_columns!(),
            ", r.csr_sha256 AS prior_csr_sha256, ",
            certificate_columns!("p"),
            ", ",
            certificate_columns!("c"),
            ", (SELECT COUNT(DISTINCT s.key_fingerprint) FROM certificates s \
             WHERE s.renewed_from = c.serial) AS successor_key_count, \
             (SELECT s.key_fingerprint FROM certificates s \
             WHERE s.renewed_from = c.serial LIMIT 1) AS successor_key \
             FROM {} JOIN devices d ON d.id = q.column1 \
             LEFT JOIN requests r ON r.device_id = d.id AND r.op = q.column2 \
             AND r.rid = q.column3 \
             LEFT JOIN certificates p ON p.serial = r.serial \
             LEFT JOIN certificates c ON c.serial = q.column4 AND c.device_id = d.id"
        ),
        values_of(keys, 4)
    )
}

/// An enrollment context row.
fn enrollment_at(row: &AnyRow) -> Result<EnrollmentContext, RegistryError> {
    let kind: Option<String> = row.try_get("credential_kind")?;
    let credential = match kind {
        None => None,
        Some(kind) => Some(Credential {
            kind,
            secret: row.try_get("credential_secret")?,
            used_at: row.try_get("credential_used_at")?,
        }),
    };
    Ok(EnrollmentContext {
        device: device_from_row(row)?,
        credential,
        prior: prior_at(row)?,
    })
}

/// A renewal context row.
fn renewal_at(row: &AnyRow) -> Result<RenewalContext, RegistryError> {
    let count: i64 = row.try_get("successor_key_count")?;
    let successor_keys = match count {
        0 => SuccessorKeys::None,
        1 => SuccessorKeys::One(row.try_get("successor_key")?),
        _ => SuccessorKeys::Several,
    };
    Ok(RenewalContext {
        device: device_from_row(row)?,
        prior: prior_at(row)?,
        current: certificate_at(row, "c")?,
        successor_keys,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch read finds each request's rows by key: SQLite scans only the
    /// batch's own `VALUES` (named differently by SQLite versions), never a
    /// table.
    #[tokio::test]
    async fn sqlite_reads_a_batch_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(&super::super::sqlite_url(&dir.path().join("registry.db")))
            .await
            .unwrap();
        for (sql, columns) in [(enrollment_sql(64), 3), (renewal_sql(64), 4)] {
            let mut query = sqlx::query(AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")));
            for i in 0..64 * columns {
                query = query.bind(format!("v{i}"));
            }
            let plan = registry.plan_steps(query).await;
            assert!(
                plan.iter()
                    .any(|step| step.contains("sqlite_autoindex_devices_1 (id=?)")),
                "{plan:?}"
            );
            for step in &plan {
                assert!(
                    !step.starts_with("SCAN")
                        || step == "SCAN q"
                        || step.contains("VALUES CLAUSE")
                        || step.contains("CONSTANT ROWS"),
                    "{step} in {plan:?}"
                );
            }
        }
    }

    #[test]
    fn batches_are_padded_to_powers_of_two() {
        assert_eq!(values_of(1, 2), "(VALUES ($1, $2)) AS q");
        assert_eq!(values_of(3, 1), "(VALUES ($1), ($2), ($3), ($4)) AS q");
        let keys = ["a", "b", "c"];
        assert_eq!(padded(&keys).collect::<Vec<_>>(), [&"a", &"b", &"c", &"c"]);
        assert_eq!(padded(&keys[..1]).count(), 1);
        assert_eq!(values_of(64, 1).matches('$').count(), 64);
    }
}
