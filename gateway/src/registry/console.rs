//! Registry queries for the web console: searching devices the way facilities
//! staff know them (id, site, owner, model or the label on the case), the
//! fleet overview counts, the audit log newest first, and when devices were
//! last seen. Portable SQL for SQLite and PostgreSQL like the rest of the
//! registry.

use sqlx::{AssertSqlSafe, Row};

use super::{
    AuditEntry, Device, DeviceStatus, Registry, RegistryError, audit_entry_from_row,
    contains_condition, contains_patterns, device_from_row,
};

/// Most rows one page of devices or audit entries may hold.
pub const MAX_PAGE: i64 = 200;

/// Which devices a listing shows, besides the text query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Condition {
    /// Every device.
    All,
    /// Devices in this status.
    Status(DeviceStatus),
    /// Active devices whose newest certificate ends before `before` but has
    /// not ended at `now`.
    Expiring {
        /// Now, unix seconds.
        now: i64,
        /// The end of the window, unix seconds.
        before: i64,
    },
    /// Active devices whose newest certificate ended before `now`: they
    /// stopped renewing.
    Expired {
        /// Now, unix seconds.
        now: i64,
    },
    /// Active devices not seen since `since` (a device whose seen time was
    /// never recorded counts from its last certificate).
    NotSeenSince {
        /// Unix seconds.
        since: i64,
    },
    /// Devices of a manufacturing batch.
    Batch(String),
}

/// A device listing: an optional text query, a condition, and a page.
#[derive(Clone, Debug)]
pub struct DeviceQuery {
    /// Case-insensitive text found in the id, site, owner, model or label.
    pub text: Option<String>,
    /// Which devices.
    pub condition: Condition,
    /// Rows to skip.
    pub offset: i64,
    /// Rows to return (clamped to 1..=[`MAX_PAGE`]).
    pub limit: i64,
}

/// One page of a device listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevicePage {
    /// The devices on this page: exact id or label matches first, then by id.
    pub devices: Vec<Device>,
    /// How many devices match in all.
    pub total: i64,
}

/// Counts for the fleet overview.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FleetCounts {
    /// Devices in each status.
    pub by_status: Vec<(DeviceStatus, i64)>,
    /// Active devices whose newest certificate ends within the window.
    pub expiring: i64,
    /// Active devices whose newest certificate has ended.
    pub expired: i64,
    /// Active devices not seen within the window.
    pub not_seen: i64,
}

impl FleetCounts {
    /// The count for `status`.
    pub fn status(&self, status: DeviceStatus) -> i64 {
        self.by_status
            .iter()
            .find(|(s, _)| *s == status)
            .map_or(0, |(_, n)| *n)
    }

    /// Every device.
    pub fn total(&self) -> i64 {
        self.by_status.iter().map(|(_, n)| n).sum()
    }
}

/// The end of a device's newest certificate (NULL when it has none).
const NEWEST_NOT_AFTER: &str =
    "(SELECT MAX(c.not_after) FROM certificates c WHERE c.device_id = d.id)";
/// When a device was last seen: its last connection, else its last certificate.
const LAST_SEEN: &str = "COALESCE(d.last_seen_at, \
     (SELECT MAX(c.issued_at) FROM certificates c WHERE c.device_id = d.id))";

/// The `WHERE` clause for `query` and the values it binds, in order.
fn where_clause(query: &DeviceQuery) -> (String, Vec<Value>) {
    let mut sql = String::from(" WHERE 1 = 1");
    let mut values = Vec::new();
    let bind = |values: &mut Vec<Value>, value: Value| {
        values.push(value);
        format!("${}", values.len())
    };
    if let Some(text) = query
        .text
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        let [ascii, unicode] = contains_patterns(text);
        values.push(Value::Text(ascii));
        let first = values.len();
        values.push(Value::Text(unicode));
        sql.push_str(&contains_condition(
            &[
                "d.id",
                "d.site",
                "d.owner",
                "COALESCE(d.model, '')",
                "COALESCE(d.label, '')",
            ],
            first,
        ));
    }
    match &query.condition {
        Condition::All => {}
        Condition::Status(status) => {
            let p = bind(&mut values, Value::Text(status.as_str().to_owned()));
            sql.push_str(&format!(" AND d.status = {p}"));
        }
        Condition::Expiring { now, before } => {
            let n = bind(&mut values, Value::Int(*now));
            let b = bind(&mut values, Value::Int(*before));
            sql.push_str(&format!(
                " AND d.status = 'active' AND {NEWEST_NOT_AFTER} > {n} AND {NEWEST_NOT_AFTER} <= {b}"
            ));
        }
        Condition::Expired { now } => {
            let n = bind(&mut values, Value::Int(*now));
            sql.push_str(&format!(
                " AND d.status = 'active' AND {NEWEST_NOT_AFTER} <= {n}"
            ));
        }
        Condition::NotSeenSince { since } => {
            let s = bind(&mut values, Value::Int(*since));
            sql.push_str(&format!(" AND d.status = 'active' AND {LAST_SEEN} < {s}"));
        }
        Condition::Batch(batch) => {
            let p = bind(&mut values, Value::Text(batch.clone()));
            sql.push_str(&format!(" AND d.batch_id = {p}"));
        }
    }
    (sql, values)
}

#[derive(Clone, Debug)]
enum Value {
    Text(String),
    Int(i64),
}

fn bind_all<'q>(
    mut query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    values: &[Value],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    for value in values {
        query = match value {
            Value::Text(text) => query.bind(text.clone()),
            Value::Int(int) => query.bind(*int),
        };
    }
    query
}

impl Registry {
    /// One page of the devices matching `query`, and how many match in all.
    pub async fn search_devices(&self, query: &DeviceQuery) -> Result<DevicePage, RegistryError> {
        let (clause, mut values) = where_clause(query);
        let total: i64 = bind_all(
            sqlx::query(AssertSqlSafe(format!(
                "SELECT COUNT(*) FROM devices d{clause}"
            ))),
            &values,
        )
        .fetch_one(&self.pool)
        .await?
        .try_get(0)?;
        let exact = query
            .text
            .as_deref()
            .map(|t| t.trim().to_lowercase())
            .unwrap_or_default();
        values.push(Value::Text(exact));
        let e = values.len();
        values.push(Value::Int(query.limit.clamp(1, MAX_PAGE)));
        values.push(Value::Int(query.offset.max(0)));
        let sql = format!(
            "SELECT d.id, d.owner, d.site, d.model, d.status, d.created_by, d.created_at, \
             d.updated_at, d.renew_counter, d.label, d.last_seen_at FROM devices d{clause} \
             ORDER BY CASE WHEN LOWER(d.id) = ${e} OR LOWER(COALESCE(d.label, '')) = ${e} \
             THEN 0 ELSE 1 END, d.id LIMIT ${} OFFSET ${}",
            e + 1,
            e + 2
        );
        let rows = bind_all(sqlx::query(AssertSqlSafe(sql)), &values)
            .fetch_all(&self.pool)
            .await?;
        Ok(DevicePage {
            devices: rows.iter().map(device_from_row).collect::<Result<_, _>>()?,
            total,
        })
    }

    /// The fleet overview at `now`: devices per status, active devices whose
    /// certificate ends within `expiring_within` seconds or has ended, and
    /// active devices not seen for `not_seen_for` seconds.
    pub async fn fleet_counts(
        &self,
        now: i64,
        expiring_within: i64,
        not_seen_for: i64,
    ) -> Result<FleetCounts, RegistryError> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM devices GROUP BY status")
            .fetch_all(&self.pool)
            .await?;
        let mut counts = FleetCounts::default();
        for row in &rows {
            let status: String = row.try_get("status")?;
            let status = status.parse().map_err(RegistryError::Corrupt)?;
            counts.by_status.push((status, row.try_get("n")?));
        }
        counts
            .by_status
            .sort_by_key(|(s, _)| DeviceStatus::ALL.iter().position(|a| a == s));
        let count = |condition: Condition| {
            let query = DeviceQuery {
                text: None,
                condition,
                offset: 0,
                limit: 1,
            };
            async move {
                let (clause, values) = where_clause(&query);
                let n: i64 = bind_all(
                    sqlx::query(AssertSqlSafe(format!(
                        "SELECT COUNT(*) FROM devices d{clause}"
                    ))),
                    &values,
                )
                .fetch_one(&self.pool)
                .await?
                .try_get(0)?;
                Ok::<i64, RegistryError>(n)
            }
        };
        counts.expiring = count(Condition::Expiring {
            now,
            before: now.saturating_add(expiring_within),
        })
        .await?;
        counts.expired = count(Condition::Expired { now }).await?;
        counts.not_seen = count(Condition::NotSeenSince {
            since: now.saturating_sub(not_seen_for),
        })
        .await?;
        Ok(counts)
    }

    /// The batch a device was registered in, if any.
    pub async fn device_batch(&self, device_id: &str) -> Result<Option<String>, RegistryError> {
        let row = sqlx::query("SELECT batch_id FROM devices WHERE id = $1")
            .bind(device_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("batch_id")).transpose()?.flatten())
    }

    /// Audit entries newest first: up to `limit` (clamped to 1..=[`MAX_PAGE`])
    /// older than the entry `before` (an entry id; `None` for the newest),
    /// optionally only those whose actor, action or device contains `text`.
    pub async fn audit_log(
        &self,
        text: Option<&str>,
        before: Option<&str>,
        limit: i64,
    ) -> Result<Vec<AuditEntry>, RegistryError> {
        let mut sql = String::from(
            "SELECT id, at, actor, action, device_id, serial, outcome, detail FROM audit_log \
             WHERE 1 = 1",
        );
        let mut values = Vec::new();
        if let Some(text) = text.map(str::trim).filter(|t| !t.is_empty()) {
            let [ascii, unicode] = contains_patterns(text);
            values.push(Value::Text(ascii));
            let first = values.len();
            values.push(Value::Text(unicode));
            sql.push_str(&contains_condition(
                &["actor", "action", "COALESCE(device_id, '')"],
                first,
            ));
        }
        if let Some(before) = before {
            values.push(Value::Text(before.to_owned()));
            sql.push_str(&format!(" AND id < ${}", values.len()));
        }
        values.push(Value::Int(limit.clamp(1, MAX_PAGE)));
        sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", values.len()));
        let rows = bind_all(sqlx::query(AssertSqlSafe(sql)), &values)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(audit_entry_from_row).collect()
    }

    /// Records when devices were seen, in one transaction; a time never moves
    /// backwards.
    pub async fn record_last_seen(&self, seen: &[(String, i64)]) -> Result<(), RegistryError> {
        if seen.is_empty() {
            return Ok(());
        }
        let _turn = self.write_turn.lock().await;
        let mut tx = self.begin_write().await?;
        for (device_id, at) in seen {
            sqlx::query(
                "UPDATE devices SET last_seen_at = $1 WHERE id = $2 \
                 AND (last_seen_at IS NULL OR last_seen_at < $1)",
            )
            .bind(*at)
            .bind(device_id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{CertificateRecord, Issuance, NewDevice, StatusChange};
    use crate::testing::{TestDatabase, registry};

    on_both_backends!(
        search_finds_by_every_field,
        search_pages_and_conditions,
        fleet_counts_follow_certificates_and_presence,
        audit_log_pages_newest_first,
    );

    fn device(id: &str, site: &str, owner: &str, label: Option<&str>) -> NewDevice {
        NewDevice {
            id: id.into(),
            owner: owner.into(),
            site: site.into(),
            model: Some("TH-2 Thermo".into()),
            label: label.map(Into::into),
            created_by: "cli:test".into(),
        }
    }

    async fn add(registry: &Registry, device: NewDevice, at: i64) {
        registry
            .add_device(&device, device.id.as_bytes(), at)
            .await
            .expect("add device");
    }

    /// Enrolls `id` with a certificate valid from `issued_at` to `not_after`.
    async fn enroll(registry: &Registry, id: &str, key: u8, issued_at: i64, not_after: i64) {
        let certificate = CertificateRecord {
            serial: format!("{key:02x}"),
            device_id: id.into(),
            key_fingerprint: vec![key; 32],
            not_before: issued_at,
            not_after,
            issued_at,
            der: vec![0x30],
            revoked_at: None,
            revocation_reason: None,
            renewed_from: None,
        };
        let issuance = Issuance {
            certificate,
            op: "enroll",
            rid: format!("rid-{key}"),
            csr_sha256: vec![key; 32],
            station: None,
        };
        let audit = AuditEntry::new(issued_at, format!("device:{id}"), "enroll").device(id);
        registry
            .record_enrollment(&issuance, &audit)
            .await
            .expect("record enrollment");
    }

    fn query(text: Option<&str>, condition: Condition) -> DeviceQuery {
        DeviceQuery {
            text: text.map(Into::into),
            condition,
            offset: 0,
            limit: 50,
        }
    }

    fn ids(page: &DevicePage) -> Vec<&str> {
        page.devices.iter().map(|d| d.id.as_str()).collect()
    }

    async fn search_finds_by_every_field(database: TestDatabase) {
        let Some((registry, _url)) = registry(database).await else {
            return;
        };
        add(
            &registry,
            device("th-100", "Berlin HQ", "anna@x.io", Some("R2-17")),
            1,
        )
        .await;
        add(
            &registry,
            device("th-101", "Munich", "bob@x.io", Some("KITCHEN 3")),
            1,
        )
        .await;
        add(
            &registry,
            device("r2-17-spare", "Munich", "bob@x.io", None),
            1,
        )
        .await;
        add(&registry, device("pct_50", "Munich", "bob@x.io", None), 1).await;
        add(&registry, device("th-102", "Étage 2", "eve@x.io", None), 1).await;

        let search = |text: &'static str| {
            let registry = &registry;
            async move {
                registry
                    .search_devices(&query(Some(text), Condition::All))
                    .await
                    .expect("search")
            }
        };
        // Site, case-insensitively and in part.
        assert_eq!(ids(&search("berlin").await), ["th-100"]);
        // A site with a non-ASCII capital, as typed and in capitals, on both
        // backends (SQLite's LOWER folds ASCII only).
        assert_eq!(ids(&search("Étage").await), ["th-102"]);
        assert_eq!(ids(&search("ÉTAGE 2").await), ["th-102"]);
        // Owner, model, label.
        assert_eq!(
            ids(&search("BOB@").await),
            ["pct_50", "r2-17-spare", "th-101"]
        );
        assert_eq!(search("thermo").await.total, 5);
        assert_eq!(ids(&search("kitchen").await), ["th-101"]);
        // An exact label match comes before ids that merely contain it.
        assert_eq!(ids(&search("r2-17").await), ["th-100", "r2-17-spare"]);
        // LIKE wildcards are taken literally.
        assert_eq!(ids(&search("h_1").await), Vec::<&str>::new());
        assert_eq!(ids(&search("t_5").await), ["pct_50"]);
        assert_eq!(ids(&search("%").await), Vec::<&str>::new());
        // Script in a query is only text.
        assert_eq!(search("<script>").await.total, 0);
        // The label is stored and read back.
        let stored = registry.device("th-101").await.unwrap().unwrap();
        assert_eq!(stored.label.as_deref(), Some("KITCHEN 3"));
        assert_eq!(stored.last_seen_at, None);
    }

    async fn search_pages_and_conditions(database: TestDatabase) {
        let Some((registry, _url)) = registry(database).await else {
            return;
        };
        for i in 0..7 {
            add(
                &registry,
                device(&format!("d-{i}"), "plant", "x@x.io", None),
                1,
            )
            .await;
        }
        let mut page = query(None, Condition::All);
        page.limit = 3;
        page.offset = 3;
        let second = registry.search_devices(&page).await.unwrap();
        assert_eq!(ids(&second), ["d-3", "d-4", "d-5"]);
        assert_eq!(second.total, 7);
        // Huge and negative pages are clamped, not refused.
        page.limit = i64::MAX;
        page.offset = -5;
        let all = registry.search_devices(&page).await.unwrap();
        assert_eq!(all.devices.len(), 7);
        page.limit = 0;
        assert_eq!(
            registry.search_devices(&page).await.unwrap().devices.len(),
            1
        );

        enroll(&registry, "d-1", 1, 100, 1000).await;
        registry
            .change_status(
                "d-1",
                &StatusChange::Suspend,
                &AuditEntry::new(200, "web:op", "device.suspend").device("d-1"),
            )
            .await
            .unwrap();
        let suspended = registry
            .search_devices(&query(None, Condition::Status(DeviceStatus::Suspended)))
            .await
            .unwrap();
        assert_eq!(ids(&suspended), ["d-1"]);
        let pending = registry
            .search_devices(&query(Some("d-"), Condition::Status(DeviceStatus::Pending)))
            .await
            .unwrap();
        assert_eq!(pending.total, 6);
        assert_eq!(
            registry
                .search_devices(&query(None, Condition::Batch("none".into())))
                .await
                .unwrap()
                .total,
            0
        );
    }

    async fn fleet_counts_follow_certificates_and_presence(database: TestDatabase) {
        let Some((registry, _url)) = registry(database).await else {
            return;
        };
        let day = 86_400;
        let now = 100 * day;
        for id in ["fresh", "expiring", "expired", "quiet", "never"] {
            add(&registry, device(id, "plant", "x@x.io", None), 1).await;
        }
        // Issued now, valid for a week.
        enroll(&registry, "fresh", 1, now, now + 7 * day).await;
        // Ends in 12 hours.
        enroll(&registry, "expiring", 2, now - day, now + day / 2).await;
        // Ended yesterday, issued ten days ago.
        enroll(&registry, "expired", 3, now - 10 * day, now - day).await;
        // Issued ten days ago, valid for a month, but connected yesterday.
        enroll(&registry, "quiet", 4, now - 10 * day, now + 20 * day).await;
        registry
            .record_last_seen(&[("quiet".into(), now - day), ("fresh".into(), now)])
            .await
            .unwrap();
        // Times never move backwards.
        registry
            .record_last_seen(&[("fresh".into(), now - 5 * day)])
            .await
            .unwrap();
        assert_eq!(
            registry
                .device("fresh")
                .await
                .unwrap()
                .unwrap()
                .last_seen_at,
            Some(now)
        );

        // Enrolling counts as being seen.
        assert_eq!(
            registry
                .device("expiring")
                .await
                .unwrap()
                .unwrap()
                .last_seen_at,
            Some(now - day)
        );
        let counts = registry.fleet_counts(now, day, 3 * day).await.unwrap();
        assert_eq!(counts.status(DeviceStatus::Active), 4);
        assert_eq!(counts.status(DeviceStatus::Pending), 1);
        assert_eq!(counts.status(DeviceStatus::Revoked), 0);
        assert_eq!(counts.total(), 5);
        assert_eq!(counts.expiring, 1);
        assert_eq!(counts.expired, 1);
        // `expired` was last heard of ten days ago; `quiet` connected yesterday.
        assert_eq!(counts.not_seen, 1);
        let not_seen = registry
            .search_devices(&query(
                None,
                Condition::NotSeenSince {
                    since: now - 3 * day,
                },
            ))
            .await
            .unwrap();
        assert_eq!(ids(&not_seen), ["expired"]);
        let expiring = registry
            .search_devices(&query(
                None,
                Condition::Expiring {
                    now,
                    before: now + day,
                },
            ))
            .await
            .unwrap();
        assert_eq!(ids(&expiring), ["expiring"]);
    }

    async fn audit_log_pages_newest_first(database: TestDatabase) {
        let Some((registry, _url)) = registry(database).await else {
            return;
        };
        let mut written = Vec::new();
        for i in 0..5 {
            let entry = AuditEntry {
                id: format!("{i:030}"),
                ..AuditEntry::new(i, format!("web:user{i}"), "device.suspend")
            };
            registry.audit(&entry).await.unwrap();
            written.push(entry);
        }
        let first = registry.audit_log(None, None, 2).await.unwrap();
        assert_eq!(first, [written[4].clone(), written[3].clone()]);
        let next = registry
            .audit_log(None, Some(&first[1].id), 10)
            .await
            .unwrap();
        assert_eq!(next.len(), 3);
        assert_eq!(next[0], written[2]);
        let filtered = registry.audit_log(Some("USER2"), None, 10).await.unwrap();
        assert_eq!(filtered, [written[2].clone()]);
        assert!(
            registry
                .audit_log(None, None, 1_000_000)
                .await
                .unwrap()
                .len()
                <= 5
        );
    }
}
