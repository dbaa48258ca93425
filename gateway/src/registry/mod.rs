//! The registry: devices, owners, certificates, enrollment credentials and the
//! audit log, in SQLite (one file, the default) or PostgreSQL (several gateway
//! replicas). One schema and one set of runtime queries serve both through
//! `sqlx::Any`; times are unix seconds.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rand::RngCore;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, AssertSqlSafe, Row};
use tokio::sync::Mutex;

/// Defines each named `async fn name(db: TestDatabase)` test of the module
/// twice, as `sqlite::name` and `postgres::name`: every registry test runs on
/// both backends. Defined before the submodules so that all of them see it.
#[cfg(test)]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(crate::testing::TestDatabase::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(crate::testing::TestDatabase::Postgres).await;
                }
            )*
        }
    };
}

mod accounts;
mod batches;
mod context;
mod devices;
mod group;
pub use accounts::{
    Account, AccountError, ApiToken, NewApiToken, NewSession, Role, SessionRecord,
    check_account_name,
};
pub use batches::{BatchError, BatchSummary, NewBatch};
pub use context::{ContextReads, EnrollmentContext, RenewalContext, SuccessorKeys};
pub use devices::{DeviceEdit, DeviceListFilter, DeviceListPage};
pub mod console;
mod stations;
pub use stations::{
    EnrolledBy, NewStation, Station, StationCertificate, StationError, StationStatus,
};

/// A `SELECT` of every column [`certificate_from_row`] reads, then `$tail`.
macro_rules! select_certificates {
    ($tail:literal) => {
        concat!(
            "SELECT serial, device_id, key_fingerprint, not_before, not_after, issued_at, der, \
             revoked_at, revocation_reason, renewed_from FROM certificates ",
            $tail
        )
    };
}

/// The schema, in order. A migration never changes once released.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "initial", include_str!("migrations/0001_initial.sql")),
    (2, "batches", include_str!("migrations/0002_batches.sql")),
    (3, "accounts", include_str!("migrations/0003_accounts.sql")),
    (4, "stations", include_str!("migrations/0004_stations.sql")),
    (5, "console", include_str!("migrations/0005_console.sql")),
];

/// A registry failure: our fault or the database's, never the device's.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The database refused or went away.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The database URL is not one we support.
    #[error("unsupported database URL `{0}` (use sqlite://PATH or postgres://…)")]
    UnsupportedUrl(String),
    /// The device id is registered already.
    #[error("device `{0}` already exists")]
    DeviceExists(String),
    /// The database holds a schema newer than this gateway knows.
    #[error("the database schema is version {0}, newer than this idgate ({1}); upgrade idgate")]
    SchemaTooNew(i64, i64),
    /// A stored value is not what the schema allows.
    #[error("corrupt registry row: {0}")]
    Corrupt(String),
    /// The group commit holding this record failed (every record in it was
    /// rolled back).
    #[error("database error (group commit): {0}")]
    GroupCommit(String),
    /// The read shared by this request and others failed (each of them gets
    /// this error).
    #[error("database error (read shared with other requests): {0}")]
    SharedRead(String),
    /// The thread that runs the group commits could not be started.
    #[error("cannot start the group commit thread: {0}")]
    CommitThread(#[source] std::io::Error),
}

/// Which database is behind the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// Lifecycle state of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceStatus {
    /// Registered, waiting for its first enrollment.
    Pending,
    /// Enrolled; may renew.
    Active,
    /// Possibly cloned (a renewal counter went backwards, or one certificate
    /// was renewed twice with different keys): renewals are refused until an
    /// operator resumes the device.
    Suspect,
    /// Temporarily cut off.
    Suspended,
    /// Permanently cut off.
    Revoked,
    /// Taken out of service.
    Retired,
}

impl DeviceStatus {
    /// Every status.
    pub const ALL: [DeviceStatus; 6] = [
        DeviceStatus::Pending,
        DeviceStatus::Active,
        DeviceStatus::Suspect,
        DeviceStatus::Suspended,
        DeviceStatus::Revoked,
        DeviceStatus::Retired,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::Pending => "pending",
            DeviceStatus::Active => "active",
            DeviceStatus::Suspect => "suspect",
            DeviceStatus::Suspended => "suspended",
            DeviceStatus::Revoked => "revoked",
            DeviceStatus::Retired => "retired",
        }
    }
}

impl FromStr for DeviceStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        DeviceStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown status `{s}` (pending, active, suspect, suspended, revoked, retired)"
                )
            })
    }
}

impl fmt::Display for DeviceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A device to register.
#[derive(Clone, Debug)]
pub struct NewDevice {
    /// Device id (syntax already checked).
    pub id: String,
    /// Owner's email.
    pub owner: String,
    /// Site.
    pub site: String,
    /// Model, if known.
    pub model: Option<String>,
    /// The label on its case, if any.
    pub label: Option<String>,
    /// Who registers it.
    pub created_by: String,
}

/// A registered device.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Device {
    /// Device id.
    pub id: String,
    /// Owner's email.
    pub owner: String,
    /// Site.
    pub site: String,
    /// Model.
    pub model: Option<String>,
    /// Status.
    pub status: DeviceStatus,
    /// Who registered it.
    pub created_by: String,
    /// When it was registered.
    pub created_at: i64,
    /// Last status change.
    pub updated_at: i64,
    /// Highest renewal counter accepted.
    pub renew_counter: i64,
    /// The label on its case.
    pub label: Option<String>,
    /// When it was last heard from: enrolled, renewed, or connected with its
    /// certificate (see `broker::presence`).
    pub last_seen_at: Option<i64>,
}

/// Filters for [`Registry::list_devices`]; `None` matches everything.
#[derive(Clone, Debug, Default)]
pub struct DeviceFilter {
    /// Exact site.
    pub site: Option<String>,
    /// Exact owner email.
    pub owner: Option<String>,
    /// Status.
    pub status: Option<DeviceStatus>,
}

/// A stored enrollment credential.
#[derive(Clone, Debug)]
pub struct Credential {
    /// Kind of credential (`token`).
    pub kind: String,
    /// The sealed secret.
    pub secret: Vec<u8>,
    /// When it was used, if it was.
    pub used_at: Option<i64>,
}

/// A certificate as the registry knows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CertificateRecord {
    /// Serial, lowercase hex.
    pub serial: String,
    /// The device it was issued to.
    pub device_id: String,
    /// SHA-256 of its SubjectPublicKeyInfo.
    #[serde(skip)]
    pub key_fingerprint: Vec<u8>,
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
    /// Why (RFC 5280 CRLReason name).
    pub revocation_reason: Option<String>,
    /// The certificate this one renewed.
    pub renewed_from: Option<String>,
}

/// A certificate to record together with the request that asked for it.
#[derive(Clone, Debug)]
pub struct Issuance {
    /// The certificate.
    pub certificate: CertificateRecord,
    /// The operation (`enroll`).
    pub op: &'static str,
    /// The request id.
    pub rid: String,
    /// SHA-256 of the CSR, to tell a retry from a conflicting reuse of the rid.
    pub csr_sha256: Vec<u8>,
    /// The line station that relayed the request, if one did (recorded with
    /// the certificate: the creation chain).
    pub station: Option<String>,
}

/// Why an issuance could not be recorded (nothing was written).
#[derive(Debug, thiserror::Error)]
pub enum IssuanceError {
    /// The enrollment credential was used meanwhile.
    #[error("the enrollment token has been used")]
    TokenUsed,
    /// The device is no longer pending.
    #[error("the device is not pending")]
    NotPending,
    /// The key belongs to another device.
    #[error("the key is bound to another device")]
    KeyReused,
    /// The rid was answered meanwhile (a concurrent duplicate).
    #[error("the request id has been answered")]
    RidTaken,
    /// Renewal: the device is no longer active.
    #[error("the device is not active")]
    NotActive,
    /// Renewal: a renewal with an equal or greater counter was recorded meanwhile.
    #[error("the renewal counter did not grow")]
    CounterNotGreater,
    /// Renewal: the certificate was renewed meanwhile for a different key.
    #[error("the certificate was already renewed for a different key")]
    RenewedElsewhere,
    /// The database failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// An operator's change to a device's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StatusChange {
    /// Revoke for good.
    Revoke {
        /// RFC 5280 CRLReason name written to the certificates.
        crl_reason: String,
        /// Whether the device becomes `retired` rather than `revoked`.
        retire: bool,
    },
    /// Suspend (certificates on hold).
    Suspend,
    /// Resume a suspended or suspect device.
    Resume,
}

impl StatusChange {
    fn verb(&self) -> &'static str {
        match self {
            StatusChange::Revoke { retire: true, .. } => "retire",
            StatusChange::Revoke { .. } => "revoke",
            StatusChange::Suspend => "suspend",
            StatusChange::Resume => "resume",
        }
    }
}

/// A status change was refused; nothing was written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StatusError {
    /// No such device.
    #[error("no device `{0}` is registered")]
    UnknownDevice(String),
    /// The change does not apply to the device's current status.
    #[error("cannot {action} device `{device}`: it is {status}")]
    NotAllowed {
        /// The device.
        device: String,
        /// Its status.
        status: DeviceStatus,
        /// What was asked.
        action: &'static str,
    },
    /// The database failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// A request answered before.
#[derive(Clone, Debug)]
pub struct PriorRequest {
    /// SHA-256 of the CSR it carried.
    pub csr_sha256: Vec<u8>,
    /// The certificate it was answered with.
    pub certificate: CertificateRecord,
}

/// One audit log entry.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AuditEntry {
    /// Time-ordered id (set by [`Registry::audit`] when empty).
    pub id: String,
    /// When, unix seconds.
    pub at: i64,
    /// Who: `device:ID`, `cli:USER`, …
    pub actor: String,
    /// What: `enroll`, `device.add`, …
    pub action: String,
    /// Which device, if any.
    pub device_id: Option<String>,
    /// Which certificate, if any.
    pub serial: Option<String>,
    /// `ok`, or the rejection code.
    pub outcome: String,
    /// Free text for people.
    pub detail: String,
}

impl AuditEntry {
    /// An entry with a fresh time-ordered id.
    pub fn new(at: i64, actor: impl Into<String>, action: impl Into<String>) -> AuditEntry {
        AuditEntry {
            id: audit_id(),
            at,
            actor: actor.into(),
            action: action.into(),
            device_id: None,
            serial: None,
            outcome: "ok".into(),
            detail: String::new(),
        }
    }

    /// Sets the device.
    pub fn device(mut self, id: impl Into<String>) -> Self {
        self.device_id = Some(id.into());
        self
    }

    /// Sets the certificate serial.
    pub fn serial(mut self, serial: impl Into<String>) -> Self {
        self.serial = Some(serial.into());
        self
    }

    /// Sets the outcome.
    pub fn outcome(mut self, outcome: impl Into<String>) -> Self {
        self.outcome = outcome.into();
        self
    }

    /// Sets the detail text.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }
}

/// Milliseconds since the epoch (14 digits) then 64 random bits: sorts by time.
fn audit_id() -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("{millis:014}{:016x}", rand::rngs::OsRng.next_u64())
}

/// The registry.
#[derive(Debug)]
pub struct Registry {
    pool: AnyPool,
    backend: Backend,
    /// SQLite has one writer; the registry's transactions take turns
    /// in-process rather than wait on SQLite's lock (other processes'
    /// writers are waited for by `BEGIN IMMEDIATE`: see [`begin_write`]).
    /// Single-statement writes (a session or token touched) do not take a
    /// turn: they wait on SQLite's lock through its busy handler.
    write_turn: std::sync::Arc<Mutex<()>>,
    /// Certificates waiting to be recorded by the next group commit.
    commit_queue: std::sync::Mutex<Vec<Queued>>,
    commits: std::sync::Arc<CommitStats>,
    /// Where the group commits' transactions run.
    committer: Committer,
    /// Requests' contexts waiting to be read together.
    reads: context::ReadQueue,
}

/// How group commits went since the registry was opened.
#[derive(Debug, Default)]
struct CommitStats {
    groups: std::sync::atomic::AtomicU64,
    per_record: std::sync::atomic::AtomicU64,
    records: std::sync::atomic::AtomicU64,
}

/// A snapshot of [`Registry::commit_stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupCommits {
    /// Transactions that recorded certificates.
    pub groups: u64,
    /// Of those, the groups written one record at a time, because the
    /// statements for the whole group found a condition that did not hold.
    pub per_record: u64,
    /// Certificate records they held, refused ones included.
    pub records: u64,
}

/// The thread that runs the group commits' transactions.
///
/// A group's transaction is a chain of statements, each a round trip to
/// sqlx's SQLite worker thread, and nothing else can be written while it is
/// open. On the gateway's runtime, each step of that chain waited behind
/// whatever else was ready to run there (under load, the CSR checks and
/// signatures of the requests in flight), with the write lock held. On a
/// thread of its own, the next statement goes out as soon as the last one
/// returns.
#[derive(Debug)]
struct Committer {
    handle: tokio::runtime::Handle,
    /// Dropped with the registry, which ends the thread.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Committer {
    fn start() -> Result<Committer, RegistryError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(RegistryError::CommitThread)?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("idgate-commit".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })
            .map_err(RegistryError::CommitThread)?;
        Ok(Committer {
            handle,
            _stop: stop,
        })
    }
}

/// One transaction for `group`, run on the [`Committer`]'s thread while
/// holding the registry's write turn; each record's outcome goes to its
/// caller.
async fn commit_group(
    pool: AnyPool,
    backend: Backend,
    stats: std::sync::Arc<CommitStats>,
    group: Vec<Queued>,
    _turn: tokio::sync::OwnedMutexGuard<()>,
) {
    match write_group(&pool, backend, &stats, &group).await {
        Ok(results) => {
            for (queued, result) in group.into_iter().zip(results) {
                let _ = queued.done.send(result);
            }
        }
        Err(e) => {
            let message = e.to_string();
            for queued in group {
                let _ = queued
                    .done
                    .send(Err(RegistryError::GroupCommit(message.clone()).into()));
            }
        }
    }
}

/// A transaction that writes. On SQLite it takes the write lock as it
/// begins (`BEGIN IMMEDIATE`), waiting up to the busy timeout while another
/// process writes (an `idgate` command run beside `idgate serve`, say). A
/// deferred transaction that read first could not take it while that other
/// process writes or after it committed: SQLite refuses the upgrade at once
/// (SQLITE_BUSY, SQLITE_BUSY_SNAPSHOT) without calling the busy handler,
/// because what the transaction read may have changed.
/// In-process writers also take turns ([`Registry::write_turn`]).
async fn begin_write(
    pool: &AnyPool,
    backend: Backend,
) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
    match backend {
        Backend::Sqlite => pool.begin_with("BEGIN IMMEDIATE").await,
        Backend::Postgres => pool.begin().await,
    }
}

async fn write_group(
    pool: &AnyPool,
    backend: Backend,
    stats: &CommitStats,
    group: &[Queued],
) -> Result<Vec<Result<(), IssuanceError>>, RegistryError> {
    let mut tx = begin_write(pool, backend).await?;
    stats
        .groups
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    stats
        .records
        .fetch_add(group.len() as u64, std::sync::atomic::Ordering::Relaxed);
    match group::write(&mut tx, group, backend).await {
        Ok(true) => {
            tx.commit().await?;
            return Ok(group.iter().map(|_| Ok(())).collect());
        }
        Ok(false) => {}
        // A unique key taken by another replica, or a database error the
        // per-record path will meet too; either way it decides.
        Err(e) => tracing::warn!(error = %e, "group commit: writing the group at once failed"),
    }
    tx.rollback().await?;
    stats
        .per_record
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut tx = begin_write(pool, backend).await?;
    let mut results = Vec::with_capacity(group.len());
    for queued in group {
        sqlx::query("SAVEPOINT idgate_record")
            .execute(&mut *tx)
            .await?;
        let result = match &queued.record {
            Record::Enrollment(issuance, audit) => write_enrollment(&mut tx, issuance, audit).await,
            Record::Renewal(issuance, counter, audit) => {
                write_renewal(&mut tx, issuance, *counter, audit).await
            }
        };
        if result.is_err() {
            sqlx::query("ROLLBACK TO SAVEPOINT idgate_record")
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("RELEASE SAVEPOINT idgate_record")
            .execute(&mut *tx)
            .await?;
        results.push(result);
    }
    tx.commit().await?;
    Ok(results)
}

/// Most records in one group commit: bounds how long one transaction holds
/// the write lock.
const MAX_GROUP: usize = 64;

/// A certificate to record, and where its outcome goes.
struct Queued {
    record: Record,
    done: tokio::sync::oneshot::Sender<Result<(), IssuanceError>>,
}

impl fmt::Debug for Queued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Queued { .. }")
    }
}

enum Record {
    Enrollment(Issuance, AuditEntry),
    Renewal(Issuance, i64, AuditEntry),
}

/// The URL of the default SQLite registry in a data directory.
pub fn sqlite_url(path: &std::path::Path) -> String {
    format!("sqlite://{}?mode=rwc", path.display())
}

impl Registry {
    /// Connects and brings the schema up to date. For SQLite: WAL,
    /// `synchronous=FULL` (an issued certificate survives a power cut),
    /// foreign keys on.
    pub async fn open(url: &str) -> Result<Registry, RegistryError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(RegistryError::UnsupportedUrl(url.to_owned()));
        };
        let mut options = AnyPoolOptions::new().acquire_timeout(Duration::from_secs(10));
        options = match backend {
            // A connection to a local file cannot go stale, so no ping
            // before each use: on SQLite that ping is one more round trip
            // to sqlx's worker thread before every read and every group.
            Backend::Sqlite => options
                .max_connections(4)
                .test_before_acquire(false)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        sqlx::raw_sql(
                            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                             PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000;",
                        )
                        .execute(conn)
                        .await?;
                        Ok(())
                    })
                }),
            Backend::Postgres => options.max_connections(16),
        };
        let pool = options.connect(url).await?;
        let registry = Registry {
            pool,
            backend,
            write_turn: std::sync::Arc::default(),
            commit_queue: std::sync::Mutex::new(Vec::new()),
            commits: std::sync::Arc::default(),
            committer: Committer::start()?,
            reads: context::ReadQueue::default(),
        };
        registry.migrate().await?;
        Ok(registry)
    }

    /// A transaction that writes: see [`begin_write`].
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        begin_write(&self.pool, self.backend).await
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Closes the pool, waiting for connections to finish.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn migrate(&self) -> Result<(), RegistryError> {
        let _turn = self.write_turn.lock().await;
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS idgate_schema (version BIGINT PRIMARY KEY, \
             name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
        )
        .execute(&self.pool)
        .await?;
        let latest = MIGRATIONS.last().map_or(0, |m| m.0);
        let applied: Vec<i64> = sqlx::query("SELECT version FROM idgate_schema")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()?;
        let current = applied.iter().copied().max().unwrap_or(0);
        if current > latest {
            return Err(RegistryError::SchemaTooNew(current, latest));
        }
        // Every migration not applied yet, not only those above the highest:
        // migrations numbered in parallel may land out of order.
        for (version, name, sql) in MIGRATIONS.iter().filter(|m| !applied.contains(&m.0)) {
            self.apply_migration(*version, name, sql).await?;
        }
        Ok(())
    }

    /// Applies one migration with its version row, in one transaction;
    /// `Ok(false)` if another process applied it since `migrate` looked
    /// (a gateway and an `idgate` command, or two replicas, starting at
    /// once on an older schema): its version row is there, so is its schema.
    /// On SQLite the transaction holds the write lock from its start, so the
    /// other's commit is already visible; on PostgreSQL the insert waits for
    /// the other's transaction and does nothing if it committed.
    async fn apply_migration(
        &self,
        version: i64,
        name: &str,
        sql: &'static str,
    ) -> Result<bool, RegistryError> {
        let mut tx = self.begin_write().await?;
        let claimed = sqlx::query(
            "INSERT INTO idgate_schema (version, name, applied_at) VALUES ($1, $2, $3) \
             ON CONFLICT (version) DO NOTHING",
        )
        .bind(version)
        .bind(name)
        .bind(now())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if claimed == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::raw_sql(sql).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Registers a device with its owner and sealed enrollment credential, and
    /// audits it, in one transaction.
    pub async fn add_device(
        &self,
        device: &NewDevice,
        sealed_secret: &[u8],
        at: i64,
    ) -> Result<(), RegistryError> {
        let _turn = self.write_turn.lock().await;
        let mut tx = self.begin_write().await?;
        let exists = sqlx::query("SELECT 1 FROM devices WHERE id = $1")
            .bind(&device.id)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_some() {
            return Err(RegistryError::DeviceExists(device.id.clone()));
        }
        ensure_owner(&mut tx, &device.owner, at).await?;
        insert_device(&mut tx, device, sealed_secret, at, None).await?;
        tx.commit().await?;
        Ok(())
    }

    /// One device.
    pub async fn device(&self, id: &str) -> Result<Option<Device>, RegistryError> {
        let row = sqlx::query(
            "SELECT id, owner, site, model, status, created_by, created_at, updated_at, renew_counter, \
             label, last_seen_at FROM devices WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(device_from_row).transpose()
    }

    /// Devices matching `filter`, by id.
    pub async fn list_devices(&self, filter: &DeviceFilter) -> Result<Vec<Device>, RegistryError> {
        let mut sql = String::from(
            "SELECT id, owner, site, model, status, created_by, created_at, updated_at, renew_counter, \
             label, last_seen_at FROM devices WHERE 1 = 1",
        );
        let mut values: Vec<String> = Vec::new();
        for (column, value) in [
            ("site", filter.site.clone()),
            ("owner", filter.owner.clone()),
            ("status", filter.status.map(|s| s.as_str().to_owned())),
        ] {
            if let Some(value) = value {
                values.push(value);
                sql.push_str(&format!(" AND {column} = ${}", values.len()));
            }
        }
        sql.push_str(" ORDER BY id");
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for value in values {
            query = query.bind(value);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(device_from_row).collect()
    }

    /// The device's enrollment credential.
    pub async fn credential(&self, device_id: &str) -> Result<Option<Credential>, RegistryError> {
        let row = sqlx::query(
            "SELECT kind, secret, used_at FROM enrollment_credentials WHERE device_id = $1",
        )
        .bind(device_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            None => None,
            Some(row) => Some(Credential {
                kind: row.try_get("kind")?,
                secret: row.try_get("secret")?,
                used_at: row.try_get("used_at")?,
            }),
        })
    }

    /// The device that `key_fingerprint` is bound to, if any.
    pub async fn key_owner(&self, key_fingerprint: &[u8]) -> Result<Option<String>, RegistryError> {
        let row = sqlx::query("SELECT device_id FROM device_keys WHERE key_fingerprint = $1")
            .bind(key_fingerprint.to_vec())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("device_id")).transpose()?)
    }

    /// The answer given to an earlier request with this rid, if any.
    pub async fn prior_request(
        &self,
        device_id: &str,
        op: &str,
        rid: &str,
    ) -> Result<Option<PriorRequest>, RegistryError> {
        let row = sqlx::query(
            "SELECT r.csr_sha256, c.serial, c.device_id, c.key_fingerprint, c.not_before, \
             c.not_after, c.issued_at, c.der, c.revoked_at, c.revocation_reason, c.renewed_from \
             FROM requests r JOIN certificates c ON c.serial = r.serial \
             WHERE r.device_id = $1 AND r.op = $2 AND r.rid = $3",
        )
        .bind(device_id)
        .bind(op)
        .bind(rid)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            None => None,
            Some(row) => Some(PriorRequest {
                csr_sha256: row.try_get("csr_sha256")?,
                certificate: certificate_from_row(&row)?,
            }),
        })
    }

    /// Records an enrollment: consumes the token, activates the device, binds
    /// the key, stores the certificate and the request, and audits it, all in
    /// one durable transaction. Nothing is written if any step is refused.
    ///
    /// Group commit: concurrent records share one transaction and one fsync
    /// (see [`Registry::group_commit`]); this returns once the transaction
    /// holding this record has committed.
    pub async fn record_enrollment(
        &self,
        issuance: &Issuance,
        audit: &AuditEntry,
    ) -> Result<(), IssuanceError> {
        self.group_commit(Record::Enrollment(issuance.clone(), audit.clone()))
            .await
    }

    /// Records a renewal: raises the device's counter (which must grow, and
    /// the device must be active), binds the new key, stores the certificate
    /// and the request, and audits it, in one durable transaction (shared
    /// with concurrent records, as [`Registry::record_enrollment`]).
    pub async fn record_renewal(
        &self,
        issuance: &Issuance,
        counter: i64,
        audit: &AuditEntry,
    ) -> Result<(), IssuanceError> {
        self.group_commit(Record::Renewal(issuance.clone(), counter, audit.clone()))
            .await
    }

    /// Queues `record`, then takes the write turn: whoever holds it commits
    /// every queued record (up to [`MAX_GROUP`]) in one transaction, each
    /// checked on its own inside a savepoint so that a refused record is
    /// rolled back alone and the others still commit. While one group's fsync
    /// runs, the next group gathers in the queue, so the number of fsyncs
    /// follows the load instead of the number of certificates. Each caller
    /// returns only after the commit that holds its record.
    async fn group_commit(&self, record: Record) -> Result<(), IssuanceError> {
        let (done, mut outcome) = tokio::sync::oneshot::channel();
        self.queue().push(Queued { record, done });
        let abandoned = || {
            IssuanceError::from(RegistryError::GroupCommit(
                "the transaction holding this record was abandoned".into(),
            ))
        };
        loop {
            let turn = self.write_turn.clone().lock_owned().await;
            match outcome.try_recv() {
                Ok(result) => return result,
                // Its group's committer failed before answering.
                Err(tokio::sync::oneshot::error::TryRecvError::Closed) => return Err(abandoned()),
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {}
            }
            let group: Vec<Queued> = {
                let mut queue = self.queue();
                let take = queue.len().min(MAX_GROUP);
                queue.drain(..take).collect()
            };
            if group.is_empty() {
                // Not expected (a record is either queued or answered by the
                // time the turn is free), but its answer can only come from
                // whoever took it.
                drop(turn);
                return outcome.await.unwrap_or_else(|_| Err(abandoned()));
            }
            // The task holds the write turn until the group is committed and
            // answered, and answers the group's callers itself: a caller
            // that goes away meanwhile (this one included) neither abandons
            // the others' records nor lets another writer in while the
            // transaction is open.
            let _ = self
                .committer
                .handle
                .spawn(commit_group(
                    self.pool.clone(),
                    self.backend,
                    self.commits.clone(),
                    group,
                    turn,
                ))
                .await;
        }
    }

    /// How the certificate records were committed so far.
    pub fn commit_stats(&self) -> GroupCommits {
        let load = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
        GroupCommits {
            groups: load(&self.commits.groups),
            per_record: load(&self.commits.per_record),
            records: load(&self.commits.records),
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Vec<Queued>> {
        // Nothing panics while holding it; a poisoned queue is still a queue.
        self.commit_queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Marks an active device suspect (possible clone) and audits why.
    /// Returns false if the device was not active (nothing changed, nothing
    /// audited).
    pub async fn mark_suspect(
        &self,
        device_id: &str,
        audit: &AuditEntry,
    ) -> Result<bool, RegistryError> {
        let _turn = self.write_turn.lock().await;
        let mut tx = self.begin_write().await?;
        let changed = sqlx::query(
            "UPDATE devices SET status = 'suspect', updated_at = $1 WHERE id = $2 AND status = 'active'",
        )
        .bind(audit.at)
        .bind(device_id)
        .execute(&mut *tx)
        .await?;
        let changed = changed.rows_affected() == 1;
        if changed {
            insert_audit(&mut tx, audit).await?;
        }
        tx.commit().await?;
        Ok(changed)
    }

    /// Changes a device's status as an operator asked, updating its
    /// certificates' revocation state to match, and audits it:
    ///
    /// - [`StatusChange::Revoke`]: every unexpired certificate is revoked
    ///   (a held one gets the final reason); the device becomes revoked or retired;
    /// - [`StatusChange::Suspend`]: every unexpired, unrevoked certificate is put
    ///   on hold (`certificateHold`);
    /// - [`StatusChange::Resume`]: held certificates are released; a suspended or
    ///   suspect device becomes active again.
    ///
    /// Returns the serials whose revocation state changed.
    pub async fn change_status(
        &self,
        device_id: &str,
        change: &StatusChange,
        audit: &AuditEntry,
    ) -> Result<Vec<String>, StatusError> {
        let _turn = self.write_turn.lock().await;
        let mut tx = self.begin_write().await.map_err(RegistryError::from)?;
        let at = audit.at;
        let row = sqlx::query("SELECT status FROM devices WHERE id = $1")
            .bind(device_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(RegistryError::from)?
            .ok_or_else(|| StatusError::UnknownDevice(device_id.to_owned()))?;
        let status: String = row.try_get("status").map_err(RegistryError::from)?;
        let status: DeviceStatus = status.parse().map_err(RegistryError::Corrupt)?;
        let allowed: &[DeviceStatus] = match change {
            StatusChange::Revoke { .. } => &[
                DeviceStatus::Pending,
                DeviceStatus::Active,
                DeviceStatus::Suspect,
                DeviceStatus::Suspended,
            ],
            StatusChange::Suspend => &[DeviceStatus::Active, DeviceStatus::Suspect],
            StatusChange::Resume => &[DeviceStatus::Suspended, DeviceStatus::Suspect],
        };
        if !allowed.contains(&status) {
            return Err(StatusError::NotAllowed {
                device: device_id.to_owned(),
                status,
                action: change.verb(),
            });
        }
        let (new_status, affected_sql, update_sql) = match change {
            StatusChange::Revoke { retire, .. } => (
                if *retire {
                    DeviceStatus::Retired
                } else {
                    DeviceStatus::Revoked
                },
                "SELECT serial FROM certificates WHERE device_id = $1 AND not_after > $2 \
                 AND (revoked_at IS NULL OR revocation_reason = 'certificateHold') ORDER BY serial",
                "UPDATE certificates SET revoked_at = COALESCE(revoked_at, $3), revocation_reason = $4 \
                 WHERE device_id = $1 AND not_after > $2 \
                 AND (revoked_at IS NULL OR revocation_reason = 'certificateHold')",
            ),
            StatusChange::Suspend => (
                DeviceStatus::Suspended,
                "SELECT serial FROM certificates WHERE device_id = $1 AND not_after > $2 \
                 AND revoked_at IS NULL ORDER BY serial",
                "UPDATE certificates SET revoked_at = $3, revocation_reason = $4 \
                 WHERE device_id = $1 AND not_after > $2 AND revoked_at IS NULL",
            ),
            StatusChange::Resume => (
                DeviceStatus::Active,
                "SELECT serial FROM certificates WHERE device_id = $1 AND not_after > $2 \
                 AND revocation_reason = 'certificateHold' ORDER BY serial",
                "UPDATE certificates SET revoked_at = NULL, revocation_reason = NULL \
                 WHERE device_id = $1 AND not_after > $2 AND revocation_reason = 'certificateHold'",
            ),
        };
        let reason = match change {
            StatusChange::Revoke { crl_reason, .. } => crl_reason.clone(),
            StatusChange::Suspend | StatusChange::Resume => "certificateHold".to_owned(),
        };
        let serials: Vec<String> = sqlx::query(affected_sql)
            .bind(device_id)
            .bind(at)
            .fetch_all(&mut *tx)
            .await
            .map_err(RegistryError::from)?
            .iter()
            .map(|r| r.try_get("serial"))
            .collect::<Result<_, _>>()
            .map_err(RegistryError::from)?;
        let mut update = sqlx::query(update_sql).bind(device_id).bind(at);
        if *change != StatusChange::Resume {
            update = update.bind(at).bind(reason);
        }
        update
            .execute(&mut *tx)
            .await
            .map_err(RegistryError::from)?;
        sqlx::query("UPDATE devices SET status = $1, updated_at = $2 WHERE id = $3")
            .bind(new_status.as_str())
            .bind(at)
            .bind(device_id)
            .execute(&mut *tx)
            .await
            .map_err(RegistryError::from)?;
        sqlx::query("UPDATE registry_state SET value = value + 1 WHERE name = 'revocation'")
            .execute(&mut *tx)
            .await
            .map_err(RegistryError::from)?;
        let mut audit = audit.clone();
        if audit.detail.is_empty() {
            audit.detail = format!("{status} -> {new_status}");
        } else {
            audit.detail = format!("{status} -> {new_status}; {}", audit.detail);
        }
        if !serials.is_empty() {
            audit
                .detail
                .push_str(&format!("; certificates: {}", serials.join(",")));
        }
        insert_audit(&mut tx, &audit).await?;
        tx.commit().await.map_err(RegistryError::from)?;
        Ok(serials)
    }

    /// A grows-only number that changes whenever any certificate's revocation
    /// state changes (in any replica).
    pub async fn revocation_epoch(&self) -> Result<i64, RegistryError> {
        Ok(
            sqlx::query("SELECT value FROM registry_state WHERE name = 'revocation'")
                .fetch_one(&self.pool)
                .await?
                .try_get("value")?,
        )
    }

    /// Revoked (or held) certificates that have not expired at `now`: what a
    /// CRL must list.
    pub async fn revoked_unexpired(
        &self,
        now: i64,
    ) -> Result<Vec<CertificateRecord>, RegistryError> {
        let rows = sqlx::query(select_certificates!(
            "WHERE revoked_at IS NOT NULL AND not_after > $1 ORDER BY serial"
        ))
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(certificate_from_row).collect()
    }

    /// One certificate by serial.
    pub async fn certificate(
        &self,
        serial: &str,
    ) -> Result<Option<CertificateRecord>, RegistryError> {
        let row = sqlx::query(select_certificates!("WHERE serial = $1"))
            .bind(serial)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(certificate_from_row).transpose()
    }

    /// Certificates issued by renewing `serial`.
    pub async fn successors(&self, serial: &str) -> Result<Vec<CertificateRecord>, RegistryError> {
        let rows = sqlx::query(select_certificates!("WHERE renewed_from = $1"))
            .bind(serial)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(certificate_from_row).collect()
    }

    /// Appends an audit entry on its own.
    pub async fn audit(&self, entry: &AuditEntry) -> Result<(), RegistryError> {
        let _turn = self.write_turn.lock().await;
        let mut tx = self.begin_write().await?;
        insert_audit(&mut tx, entry).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The device's certificates, newest first.
    pub async fn certificates(
        &self,
        device_id: &str,
    ) -> Result<Vec<CertificateRecord>, RegistryError> {
        let rows = sqlx::query(select_certificates!(
            "WHERE device_id = $1 ORDER BY issued_at DESC, serial"
        ))
        .bind(device_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(certificate_from_row).collect()
    }

    /// The device's audit trail, oldest first.
    pub async fn audit_trail(&self, device_id: &str) -> Result<Vec<AuditEntry>, RegistryError> {
        let rows = sqlx::query(
            "SELECT id, at, actor, action, device_id, serial, outcome, detail FROM audit_log \
             WHERE device_id = $1 ORDER BY id",
        )
        .bind(device_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(audit_entry_from_row).collect()
    }

    /// Number of certificates issued to all devices (for reports).
    pub async fn certificate_total(&self) -> Result<i64, RegistryError> {
        Ok(sqlx::query("SELECT COUNT(*) FROM certificates")
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?)
    }

    /// Number of certificates issued to a device (for tests and reports).
    pub async fn certificate_count(&self, device_id: &str) -> Result<i64, RegistryError> {
        Ok(
            sqlx::query("SELECT COUNT(*) FROM certificates WHERE device_id = $1")
                .bind(device_id)
                .fetch_one(&self.pool)
                .await?
                .try_get(0)?,
        )
    }
}

/// The statements of one enrollment record (see [`Registry::record_enrollment`]).
async fn write_enrollment(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    issuance: &Issuance,
    audit: &AuditEntry,
) -> Result<(), IssuanceError> {
    let device_id = &issuance.certificate.device_id;
    let at = issuance.certificate.issued_at;
    ensure_rid_free(tx, issuance).await?;
    let used = sqlx::query(
        "UPDATE enrollment_credentials SET used_at = $1 WHERE device_id = $2 AND used_at IS NULL",
    )
    .bind(at)
    .bind(device_id)
    .execute(&mut **tx)
    .await
    .map_err(RegistryError::from)?;
    if used.rows_affected() != 1 {
        return Err(IssuanceError::TokenUsed);
    }
    let activated = sqlx::query(
        "UPDATE devices SET status = 'active', updated_at = $1, last_seen_at = $1 \
         WHERE id = $2 AND status = 'pending'",
    )
    .bind(at)
    .bind(device_id)
    .execute(&mut **tx)
    .await
    .map_err(RegistryError::from)?;
    if activated.rows_affected() != 1 {
        return Err(IssuanceError::NotPending);
    }
    store_issuance(tx, issuance).await?;
    stations::record_enrolled_by(tx, issuance).await?;
    insert_audit(tx, audit).await?;
    Ok(())
}

/// The statements of one renewal record (see [`Registry::record_renewal`]).
async fn write_renewal(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    issuance: &Issuance,
    counter: i64,
    audit: &AuditEntry,
) -> Result<(), IssuanceError> {
    let device_id = &issuance.certificate.device_id;
    ensure_rid_free(tx, issuance).await?;
    let raised = sqlx::query(
        "UPDATE devices SET renew_counter = $1, updated_at = $2, \
         last_seen_at = CASE WHEN last_seen_at IS NULL OR last_seen_at < $2 THEN $2 ELSE last_seen_at END \
         WHERE id = $3 AND status = 'active' AND renew_counter < $1",
    )
    .bind(counter)
    .bind(issuance.certificate.issued_at)
    .bind(device_id)
    .execute(&mut **tx)
    .await
    .map_err(RegistryError::from)?;
    if raised.rows_affected() != 1 {
        // Something changed since the checks: tell which.
        let row = sqlx::query("SELECT status FROM devices WHERE id = $1")
            .bind(device_id)
            .fetch_one(&mut **tx)
            .await
            .map_err(RegistryError::from)?;
        let status: String = row.try_get("status").map_err(RegistryError::from)?;
        return Err(if status == "active" {
            IssuanceError::CounterNotGreater
        } else {
            IssuanceError::NotActive
        });
    }
    if let Some(from) = &issuance.certificate.renewed_from {
        // The renewal's context read saw no successor with another key; one
        // recorded since then (a clone racing the device) is caught here.
        let other = sqlx::query(
            "SELECT 1 FROM certificates WHERE renewed_from = $1 AND key_fingerprint <> $2",
        )
        .bind(from)
        .bind(issuance.certificate.key_fingerprint.clone())
        .fetch_optional(&mut **tx)
        .await
        .map_err(RegistryError::from)?;
        if other.is_some() {
            return Err(IssuanceError::RenewedElsewhere);
        }
    }
    store_issuance(tx, issuance).await?;
    insert_audit(tx, audit).await?;
    Ok(())
}

/// Records an owner the first time one of its devices is registered.
pub(super) async fn ensure_owner(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    email: &str,
    at: i64,
) -> Result<(), RegistryError> {
    let known = sqlx::query("SELECT 1 FROM owners WHERE email = $1")
        .bind(email)
        .fetch_optional(&mut **tx)
        .await?;
    if known.is_none() {
        sqlx::query("INSERT INTO owners (email, created_at) VALUES ($1, $2)")
            .bind(email)
            .bind(at)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Inserts a pending device (its owner already recorded), its sealed
/// enrollment credential and its `device.add` audit entry.
pub(super) async fn insert_device(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    device: &NewDevice,
    sealed_secret: &[u8],
    at: i64,
    batch_id: Option<&str>,
) -> Result<(), RegistryError> {
    sqlx::query(
        "INSERT INTO devices (id, owner, site, model, status, created_by, created_at, \
         updated_at, batch_id, label) VALUES ($1, $2, $3, $4, 'pending', $5, $6, $6, $7, $8)",
    )
    .bind(&device.id)
    .bind(&device.owner)
    .bind(&device.site)
    .bind(device.model.clone())
    .bind(&device.created_by)
    .bind(at)
    .bind(batch_id.map(str::to_owned))
    .bind(device.label.clone())
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO enrollment_credentials (device_id, kind, secret, created_at) \
         VALUES ($1, 'token', $2, $3)",
    )
    .bind(&device.id)
    .bind(sealed_secret.to_vec())
    .bind(at)
    .execute(&mut **tx)
    .await?;
    let batch = batch_id.map(|b| format!("batch={b} ")).unwrap_or_default();
    let label = device
        .label
        .as_deref()
        .map(|l| format!(" label={l}"))
        .unwrap_or_default();
    let detail = format!(
        "{batch}owner={} site={} model={}{label}",
        device.owner,
        device.site,
        device.model.as_deref().unwrap_or("-")
    );
    insert_audit(
        tx,
        &AuditEntry::new(at, &device.created_by, "device.add")
            .device(&device.id)
            .detail(detail),
    )
    .await
}

async fn insert_audit(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    entry: &AuditEntry,
) -> Result<(), RegistryError> {
    let query = sqlx::query(
        "INSERT INTO audit_log (id, at, actor, action, device_id, serial, outcome, detail) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    );
    bind_audit(query, entry).execute(&mut **tx).await?;
    Ok(())
}

/// Binds the eight `audit_log` columns of `entry`, in table order.
fn bind_audit<'q>(
    query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    entry: &'q AuditEntry,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    query
        .bind(&entry.id)
        .bind(entry.at)
        .bind(&entry.actor)
        .bind(&entry.action)
        .bind(entry.device_id.clone())
        .bind(entry.serial.clone())
        .bind(&entry.outcome)
        .bind(&entry.detail)
}

/// Refuses a rid that was answered meanwhile (a concurrent duplicate).
async fn ensure_rid_free(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    issuance: &Issuance,
) -> Result<(), IssuanceError> {
    let taken = sqlx::query("SELECT 1 FROM requests WHERE device_id = $1 AND op = $2 AND rid = $3")
        .bind(&issuance.certificate.device_id)
        .bind(issuance.op)
        .bind(&issuance.rid)
        .fetch_optional(&mut **tx)
        .await
        .map_err(RegistryError::from)?;
    if taken.is_some() {
        return Err(IssuanceError::RidTaken);
    }
    Ok(())
}

/// Binds the key to the device, stores the certificate and the request.
async fn store_issuance(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    issuance: &Issuance,
) -> Result<(), IssuanceError> {
    let certificate = &issuance.certificate;
    let device_id = &certificate.device_id;
    let at = certificate.issued_at;
    let bound: Option<String> =
        sqlx::query("SELECT device_id FROM device_keys WHERE key_fingerprint = $1")
            .bind(certificate.key_fingerprint.clone())
            .fetch_optional(&mut **tx)
            .await
            .map_err(RegistryError::from)?
            .map(|r| r.try_get("device_id"))
            .transpose()
            .map_err(RegistryError::from)?;
    match bound {
        Some(owner) if owner != *device_id => return Err(IssuanceError::KeyReused),
        Some(_) => {}
        None => {
            let inserted = sqlx::query(
                "INSERT INTO device_keys (key_fingerprint, device_id, bound_at) VALUES ($1, $2, $3)",
            )
            .bind(certificate.key_fingerprint.clone())
            .bind(device_id)
            .bind(at)
            .execute(&mut **tx)
            .await;
            if let Err(e) = inserted {
                // A concurrent request on another replica bound it first.
                let unique = e
                    .as_database_error()
                    .is_some_and(|d| d.is_unique_violation());
                return Err(if unique {
                    IssuanceError::KeyReused
                } else {
                    RegistryError::from(e).into()
                });
            }
        }
    }
    sqlx::query(
        "INSERT INTO certificates (serial, device_id, key_fingerprint, not_before, not_after, \
         issued_at, der, renewed_from) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&certificate.serial)
    .bind(device_id)
    .bind(certificate.key_fingerprint.clone())
    .bind(certificate.not_before)
    .bind(certificate.not_after)
    .bind(at)
    .bind(certificate.der.clone())
    .bind(certificate.renewed_from.clone())
    .execute(&mut **tx)
    .await
    .map_err(RegistryError::from)?;
    sqlx::query(
        "INSERT INTO requests (device_id, op, rid, csr_sha256, serial, at) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(device_id)
    .bind(issuance.op)
    .bind(&issuance.rid)
    .bind(issuance.csr_sha256.clone())
    .bind(&certificate.serial)
    .bind(at)
    .execute(&mut **tx)
    .await
    .map_err(RegistryError::from)?;
    Ok(())
}

fn device_from_row(row: &AnyRow) -> Result<Device, RegistryError> {
    let status: String = row.try_get("status")?;
    Ok(Device {
        id: row.try_get("id")?,
        owner: row.try_get("owner")?,
        site: row.try_get("site")?,
        model: row.try_get("model")?,
        status: status.parse().map_err(RegistryError::Corrupt)?,
        created_by: row.try_get("created_by")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        renew_counter: row.try_get("renew_counter")?,
        label: row.try_get("label")?,
        last_seen_at: row.try_get("last_seen_at")?,
    })
}

fn certificate_from_row(row: &AnyRow) -> Result<CertificateRecord, RegistryError> {
    Ok(CertificateRecord {
        serial: row.try_get("serial")?,
        device_id: row.try_get("device_id")?,
        key_fingerprint: row.try_get("key_fingerprint")?,
        not_before: row.try_get("not_before")?,
        not_after: row.try_get("not_after")?,
        issued_at: row.try_get("issued_at")?,
        der: row.try_get("der")?,
        revoked_at: row.try_get("revoked_at")?,
        revocation_reason: row.try_get("revocation_reason")?,
        renewed_from: row.try_get("renewed_from")?,
    })
}

/// Now, unix seconds.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
impl Registry {
    /// The steps of SQLite's plan for `explain` (an `EXPLAIN QUERY PLAN`).
    async fn plan_steps(
        &self,
        explain: sqlx::query::Query<'_, sqlx::Any, sqlx::any::AnyArguments>,
    ) -> Vec<String> {
        explain
            .fetch_all(&self.pool)
            .await
            .unwrap()
            .iter()
            .map(|row| row.try_get::<String, _>("detail").unwrap())
            .collect()
    }
}

#[cfg(test)]
mod tests;

/// An [`AuditEntry`] from a row of every `audit_log` column.
pub(crate) fn audit_entry_from_row(row: &AnyRow) -> Result<AuditEntry, RegistryError> {
    Ok(AuditEntry {
        id: row.try_get("id")?,
        at: row.try_get("at")?,
        actor: row.try_get("actor")?,
        action: row.try_get("action")?,
        device_id: row.try_get("device_id")?,
        serial: row.try_get("serial")?,
        outcome: row.try_get("outcome")?,
        detail: row.try_get("detail")?,
    })
}

/// `text` as the two LIKE patterns of a case-insensitive "contains" search,
/// with `%`, `_` and `\` taken literally: one lowercased by ASCII rules only
/// (SQLite's `LOWER`, and PostgreSQL's in the C locale, fold nothing else),
/// one by Unicode rules (PostgreSQL's `LOWER` in a UTF-8 locale). With both,
/// a site typed as stored ("Étage 2") is found on either backend.
pub(crate) fn contains_patterns(text: &str) -> [String; 2] {
    let pattern = |folded: String| {
        let mut pattern = String::with_capacity(folded.len() + 2);
        pattern.push('%');
        for c in folded.chars() {
            if matches!(c, '%' | '_' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push('%');
        pattern
    };
    [
        pattern(text.to_ascii_lowercase()),
        pattern(text.to_lowercase()),
    ]
}

/// The SQL condition ` AND (…)` that any of `columns` contains the text
/// whose [`contains_patterns`] are bound as `$first` and `$first + 1`.
pub(crate) fn contains_condition(columns: &[&str], first: usize) -> String {
    let (a, b) = (first, first + 1);
    let terms: Vec<String> = columns
        .iter()
        .map(|c| format!("LOWER({c}) LIKE ${a} ESCAPE '\\' OR LOWER({c}) LIKE ${b} ESCAPE '\\'"))
        .collect();
    format!(" AND ({})", terms.join(" OR "))
}
