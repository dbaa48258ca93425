//! The fast path of a group commit: every record of the group written with a
//! handful of statements in all, instead of about ten per record.
//!
//! sqlx runs each SQLite statement on a worker thread of its own and hands
//! the result back through a channel, so a statement costs two thread
//! switches whatever it does; the group's committer ran ~11 of them per
//! certificate one after the other, and that serial chain bounded the
//! throughput (docs/performance.md). Here the group's conditions are checked
//! by the statements themselves — an update must touch exactly the rows of
//! the group, an insert must not collide — and anything unexpected (a token
//! used meanwhile, a repeated rid, a key bound elsewhere, two records for one
//! device) rolls the transaction back; the caller then records the group one
//! savepoint per record, as before, so each record still gets its own
//! outcome. The same statements run on SQLite and PostgreSQL
//! (`CAST(… AS BIGINT)` types the parameters PostgreSQL cannot infer). The
//! SQL text is built from fixed fragments and numbered placeholders only;
//! every value is bound.

use std::collections::HashMap;

use sqlx::{Any, AssertSqlSafe, Row, Transaction};

use super::{AuditEntry, Backend, Issuance, Queued, Record, RegistryError};

/// Placeholders `$1`, `$2`, … handed out in binding order.
#[derive(Default)]
struct Placeholders(usize);

impl Placeholders {
    fn next(&mut self) -> String {
        self.0 += 1;
        format!("${}", self.0)
    }
}

/// `CASE {column} WHEN $k THEN CAST($v AS BIGINT) … END`, for `(key, value)`
/// placeholders.
fn case(column: &str, pairs: &[(String, String)]) -> String {
    let mut sql = format!("CASE {column}");
    for (key, value) in pairs {
        sql.push_str(&format!(" WHEN {key} THEN CAST({value} AS BIGINT)"));
    }
    sql.push_str(" END");
    sql
}

/// `$1, $2, …` up to `$n`.
fn numbered(n: usize) -> String {
    let mut p = Placeholders::default();
    let placeholders: Vec<String> = (0..n).map(|_| p.next()).collect();
    placeholders.join(", ")
}

fn list(placeholders: &[(String, String)]) -> String {
    let keys: Vec<&str> = placeholders.iter().map(|(k, _)| k.as_str()).collect();
    keys.join(", ")
}

/// `(…), (…)` for `rows` rows of `columns` placeholders each, every one
/// bound once. SQLite gets anonymous `?`s: sqlx asks SQLite for the name of
/// each parameter as it binds it, and SQLite finds a `$n` name by walking the
/// statement's list of names, so numbered placeholders cost time quadratic
/// in their number (a group's certificates alone are 512).
fn values(backend: Backend, rows: usize, columns: usize) -> String {
    let mut p = Placeholders::default();
    let rows: Vec<String> = (0..rows)
        .map(|_| {
            let row: Vec<String> = (0..columns)
                .map(|_| match backend {
                    Backend::Sqlite => "?".to_owned(),
                    Backend::Postgres => p.next(),
                })
                .collect();
            format!("({})", row.join(", "))
        })
        .collect();
    rows.join(", ")
}

/// Activates `n` pending devices: binds (id, time) per device.
fn activate_sql(n: usize, status: &str) -> String {
    let mut p = Placeholders::default();
    let pairs: Vec<_> = (0..n).map(|_| (p.next(), p.next())).collect();
    format!(
        "UPDATE devices SET status = 'active', updated_at = {case}, last_seen_at = {case} \
         WHERE {status} = 'pending' AND id IN ({})",
        list(&pairs),
        case = case("id", &pairs),
    )
}

/// Raises the counters of `n` active devices: binds (id, counter, time) per
/// device.
fn raise_sql(n: usize, status: &str) -> String {
    let mut p = Placeholders::default();
    let mut counters = Vec::new();
    let mut times = Vec::new();
    for _ in 0..n {
        let (id, counter, at) = (p.next(), p.next(), p.next());
        counters.push((id.clone(), counter));
        times.push((id, at));
    }
    let at = case("id", &times);
    let counter = case("id", &counters);
    format!(
        "UPDATE devices SET renew_counter = {counter}, updated_at = {at}, \
         last_seen_at = CASE WHEN last_seen_at IS NULL OR last_seen_at < {at} \
         THEN {at} ELSE last_seen_at END \
         WHERE {status} = 'active' AND id IN ({}) AND renew_counter < {counter}",
        list(&times)
    )
}

/// Writes `group` in one go. `Ok(true)`: written; `Ok(false)`: some
/// condition did not hold; then, or on an error (a unique key taken by
/// another replica, say), the caller rolls the transaction back and records
/// the group one record at a time, which tells the records apart (or fails
/// the same way). No savepoint: SQLite would copy every page the group
/// touches to a statement journal first.
pub(super) async fn write(
    tx: &mut Transaction<'_, Any>,
    group: &[Queued],
    backend: Backend,
) -> Result<bool, RegistryError> {
    // The devices are found by id. Without statistics, SQLite's planner
    // estimates an equality on an indexed column at ten rows, cheaper than
    // 64 lookups by id, and walks the `devices_status` index instead: every
    // pending (or active) device in the registry, for each group. A unary
    // `+` keeps the status test out of its index choice; PostgreSQL plans
    // from its statistics and has no such operator on text.
    let status = match backend {
        Backend::Sqlite => "+status",
        Backend::Postgres => "status",
    };
    statements(tx, group, backend, status).await
}

/// The statements of [`write`]; `Ok(false)` as soon as a condition fails.
async fn statements(
    tx: &mut Transaction<'_, Any>,
    group: &[Queued],
    backend: Backend,
    status: &str,
) -> Result<bool, RegistryError> {
    // Two records of one device (a replay racing its original, say) are the
    // per-record path's to tell apart.
    let mut devices = std::collections::HashSet::new();
    for queued in group {
        let (Record::Enrollment(issuance, _) | Record::Renewal(issuance, _, _)) = &queued.record;
        if !devices.insert(issuance.certificate.device_id.as_str()) {
            return Ok(false);
        }
    }
    let mut enrollments = Vec::new();
    let mut renewals = Vec::new();
    let mut issuances = Vec::new();
    let mut audits: Vec<&AuditEntry> = Vec::new();
    for queued in group {
        match &queued.record {
            Record::Enrollment(issuance, audit) => {
                enrollments.push(issuance);
                issuances.push(issuance);
                audits.push(audit);
            }
            Record::Renewal(issuance, counter, audit) => {
                renewals.push((issuance, *counter));
                issuances.push(issuance);
                audits.push(audit);
            }
        }
    }

    if !enrollments.is_empty() {
        // The tokens: unused until now, one per device of the group.
        let mut p = Placeholders::default();
        let pairs: Vec<_> = enrollments.iter().map(|_| (p.next(), p.next())).collect();
        let sql = format!(
            "UPDATE enrollment_credentials SET used_at = {} \
             WHERE used_at IS NULL AND device_id IN ({})",
            case("device_id", &pairs),
            list(&pairs)
        );
        // Then the devices: pending until now. Both bind (id, time) per device.
        for sql in [sql, activate_sql(enrollments.len(), status)] {
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for issuance in &enrollments {
                query = query
                    .bind(&issuance.certificate.device_id)
                    .bind(issuance.certificate.issued_at);
            }
            if query.execute(&mut **tx).await?.rows_affected() != enrollments.len() as u64 {
                return Ok(false);
            }
        }
    }

    if !renewals.is_empty() {
        // Active devices whose counter grows.
        let mut query = sqlx::query(AssertSqlSafe(raise_sql(renewals.len(), status)));
        for (issuance, counter) in &renewals {
            query = query
                .bind(&issuance.certificate.device_id)
                .bind(*counter)
                .bind(issuance.certificate.issued_at);
        }
        if query.execute(&mut **tx).await?.rows_affected() != renewals.len() as u64 {
            return Ok(false);
        }
    }

    // No certificate renewed meanwhile for another key (see write_renewal).
    if !renewals.is_empty() {
        let sql = format!(
            "SELECT renewed_from, key_fingerprint FROM certificates WHERE renewed_from IN ({})",
            numbered(renewals.len())
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for (issuance, _) in &renewals {
            query = query.bind(issuance.certificate.renewed_from.clone());
        }
        for row in query.fetch_all(&mut **tx).await? {
            let from: String = row.try_get("renewed_from")?;
            let key: Vec<u8> = row.try_get("key_fingerprint")?;
            let same_key = renewals.iter().any(|(i, _)| {
                i.certificate.renewed_from.as_deref() == Some(from.as_str())
                    && i.certificate.key_fingerprint == key
            });
            if !same_key {
                return Ok(false);
            }
        }
    }

    // The keys: each bound to its own device only. A key already bound (a
    // renewal that kept its key) must be bound to the same device.
    let mut keys: HashMap<&[u8], &Issuance> = HashMap::new();
    for issuance in &issuances {
        let key = issuance.certificate.key_fingerprint.as_slice();
        if let Some(other) = keys.insert(key, issuance)
            && other.certificate.device_id != issuance.certificate.device_id
        {
            return Ok(false);
        }
    }
    let sql = format!(
        "SELECT key_fingerprint, device_id FROM device_keys WHERE key_fingerprint IN ({})",
        numbered(keys.len())
    );
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for key in keys.keys() {
        query = query.bind(key.to_vec());
    }
    for row in query.fetch_all(&mut **tx).await? {
        let key: Vec<u8> = row.try_get("key_fingerprint")?;
        let owner: String = row.try_get("device_id")?;
        match keys.remove(key.as_slice()) {
            Some(issuance) if issuance.certificate.device_id == owner => {}
            _ => return Ok(false),
        }
    }
    if !keys.is_empty() {
        let sql = format!(
            "INSERT INTO device_keys (key_fingerprint, device_id, bound_at) VALUES {}",
            values(backend, keys.len(), 3)
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for (key, issuance) in &keys {
            query = query
                .bind(key.to_vec())
                .bind(&issuance.certificate.device_id)
                .bind(issuance.certificate.issued_at);
        }
        query.execute(&mut **tx).await?;
    }

    // The certificates, then the requests (a repeated rid collides here).
    let sql = format!(
        "INSERT INTO certificates (serial, device_id, key_fingerprint, not_before, not_after, \
         issued_at, der, renewed_from) VALUES {}",
        values(backend, issuances.len(), 8)
    );
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for issuance in &issuances {
        let c = &issuance.certificate;
        query = query
            .bind(&c.serial)
            .bind(&c.device_id)
            .bind(c.key_fingerprint.clone())
            .bind(c.not_before)
            .bind(c.not_after)
            .bind(c.issued_at)
            .bind(c.der.clone())
            .bind(c.renewed_from.clone());
    }
    query.execute(&mut **tx).await?;
    let sql = format!(
        "INSERT INTO requests (device_id, op, rid, csr_sha256, serial, at) VALUES {}",
        values(backend, issuances.len(), 6)
    );
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for issuance in &issuances {
        let c = &issuance.certificate;
        query = query
            .bind(&c.device_id)
            .bind(issuance.op)
            .bind(&issuance.rid)
            .bind(issuance.csr_sha256.clone())
            .bind(&c.serial)
            .bind(c.issued_at);
    }
    query.execute(&mut **tx).await?;

    // Which station enrolled which device (the creation chain).
    let relayed: Vec<(&Issuance, &str)> = enrollments
        .iter()
        .filter_map(|i| i.station.as_deref().map(|s| (*i, s)))
        .collect();
    if !relayed.is_empty() {
        let sql = format!(
            "INSERT INTO station_enrollments (serial, device_id, station_id, at) VALUES {}",
            values(backend, relayed.len(), 4)
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for (issuance, station) in relayed {
            let c = &issuance.certificate;
            query = query
                .bind(&c.serial)
                .bind(&c.device_id)
                .bind(station)
                .bind(c.issued_at);
        }
        query.execute(&mut **tx).await?;
    }
    let sql = format!(
        "INSERT INTO audit_log (id, at, actor, action, device_id, serial, outcome, detail) \
         VALUES {}",
        values(backend, audits.len(), 8)
    );
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for entry in audits {
        query = super::bind_audit(query, entry);
    }
    query.execute(&mut **tx).await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The planner must find a group's devices by id, not walk every pending
    /// or active device through `devices_status` (what it did for groups of
    /// more than a few records without the `+`).
    #[tokio::test]
    async fn sqlite_finds_a_groups_devices_by_id() {
        let dir = tempfile::tempdir().unwrap();
        let registry = super::super::Registry::open(&super::super::sqlite_url(
            &dir.path().join("registry.db"),
        ))
        .await
        .unwrap();
        for sql in [activate_sql(64, "+status"), raise_sql(64, "+status")] {
            let mut query = sqlx::query(AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")));
            for i in 0..64 {
                query = query.bind(format!("d{i}")).bind(i as i64);
                if sql.contains("renew_counter") {
                    query = query.bind(i as i64);
                }
            }
            let plan = registry.plan_steps(query).await;
            assert!(
                plan.iter()
                    .any(|step| step.contains("sqlite_autoindex_devices_1 (id=?)")),
                "{plan:?}"
            );
        }
        // Without the `+`, SQLite's choice (the reason for it).
        let mut query = sqlx::query(AssertSqlSafe(format!(
            "EXPLAIN QUERY PLAN {}",
            activate_sql(64, "status")
        )));
        for i in 0..64 {
            query = query.bind(format!("d{i}")).bind(i as i64);
        }
        let plan = query.fetch_all(&registry.pool).await.unwrap();
        let detail: String = plan[0].try_get("detail").unwrap();
        assert!(detail.contains("devices_status"), "{detail}");
    }
}
