//! Registry queries of the admin API: device listings with exact filters and
//! keyset paging (stable while devices are added), and owner, site and label
//! edits. Portable SQL like the rest of the registry.

use sqlx::{AssertSqlSafe, Row};

use super::{
    AuditEntry, Device, DeviceStatus, Registry, RegistryError, contains_condition,
    contains_patterns, device_from_row, ensure_owner, insert_audit,
};

/// Which devices a listing holds; `None` matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceListFilter {
    /// Exact site.
    pub site: Option<String>,
    /// Exact owner email.
    pub owner: Option<String>,
    /// Exact model.
    pub model: Option<String>,
    /// Status.
    pub status: Option<DeviceStatus>,
    /// Manufacturing batch.
    pub batch: Option<String>,
    /// Case-insensitive text found in the id, site, owner, model or label.
    pub text: Option<String>,
}

/// One page of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceListPage {
    /// Devices by id, after the cursor.
    pub devices: Vec<Device>,
    /// Devices matching the filter in all.
    pub total: i64,
    /// The cursor for the next page (the last id), when there are more.
    pub next: Option<String>,
}

/// A change to a device's owner, site or label; `None` leaves it as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceEdit {
    /// New owner email (syntax already checked).
    pub owner: Option<String>,
    /// New site.
    pub site: Option<String>,
    /// New label; `Some(None)` removes it.
    pub label: Option<Option<String>>,
}

impl Registry {
    /// Up to `limit` devices matching `filter` with ids after `after`, by id.
    pub async fn device_list_page(
        &self,
        filter: &DeviceListFilter,
        after: Option<&str>,
        limit: u32,
    ) -> Result<DeviceListPage, RegistryError> {
        let mut clause = String::from(" WHERE 1 = 1");
        let mut values: Vec<String> = Vec::new();
        for (column, value) in [
            ("site", &filter.site),
            ("owner", &filter.owner),
            ("model", &filter.model),
            ("batch_id", &filter.batch),
        ] {
            if let Some(value) = value {
                values.push(value.clone());
                clause.push_str(&format!(" AND {column} = ${}", values.len()));
            }
        }
        if let Some(status) = filter.status {
            values.push(status.as_str().to_owned());
            clause.push_str(&format!(" AND status = ${}", values.len()));
        }
        if let Some(text) = filter
            .text
            .as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            let [ascii, unicode] = contains_patterns(text);
            values.push(ascii);
            let first = values.len();
            values.push(unicode);
            clause.push_str(&contains_condition(
                &[
                    "id",
                    "site",
                    "owner",
                    "COALESCE(model, '')",
                    "COALESCE(label, '')",
                ],
                first,
            ));
        }
        let mut count = sqlx::query(AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM devices{clause}"
        )));
        for value in &values {
            count = count.bind(value.clone());
        }
        let total: i64 = count.fetch_one(&self.pool).await?.try_get(0)?;
        if let Some(after) = after {
            values.push(after.to_owned());
            clause.push_str(&format!(" AND id > ${}", values.len()));
        }
        // One more than asked tells whether another page follows.
        let sql = format!(
            "SELECT id, owner, site, model, status, created_by, created_at, updated_at, \
             renew_counter, label, last_seen_at FROM devices{clause} ORDER BY id LIMIT {}",
            i64::from(limit) + 1
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for value in values {
            query = query.bind(value);
        }
        let rows = query.fetch_all(&self.pool).await?;
        let mut devices: Vec<Device> =
            rows.iter().map(device_from_row).collect::<Result<_, _>>()?;
        let next = if devices.len() > limit as usize {
            devices.truncate(limit as usize);
            devices.last().map(|d| d.id.clone())
        } else {
            None
        };
        Ok(DeviceListPage {
            devices,
            total,
            next,
        })
    }

    /// Changes a device's owner, site or label and audits it
    /// (`device.update`, with the old and new values). `None` when there is no
    /// such device; nothing is written then.
    pub async fn edit_device(
        &self,
        id: &str,
        edit: &DeviceEdit,
        actor: &str,
        at: i64,
    ) -> Result<Option<Device>, RegistryError> {
        let _turn = self.write_turn.lock().await;
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(
            "SELECT id, owner, site, model, status, created_by, created_at, updated_at, \
             renew_counter, label, last_seen_at FROM devices WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(before) = row.as_ref().map(device_from_row).transpose()? else {
            return Ok(None);
        };
        let mut after = before.clone();
        let mut changes = Vec::new();
        if let Some(owner) = edit.owner.as_ref().filter(|o| **o != before.owner) {
            ensure_owner(&mut tx, owner, at).await?;
            changes.push(format!("owner: {} -> {owner}", before.owner));
            after.owner = owner.clone();
        }
        if let Some(site) = edit.site.as_ref().filter(|s| **s != before.site) {
            changes.push(format!("site: {} -> {site}", before.site));
            after.site = site.clone();
        }
        if let Some(label) = edit.label.as_ref().filter(|l| **l != before.label) {
            changes.push(format!(
                "label: {} -> {}",
                before.label.as_deref().unwrap_or("-"),
                label.as_deref().unwrap_or("-")
            ));
            after.label = label.clone();
        }
        if changes.is_empty() {
            return Ok(Some(before));
        }
        after.updated_at = at;
        sqlx::query(
            "UPDATE devices SET owner = $1, site = $2, label = $3, updated_at = $4 WHERE id = $5",
        )
        .bind(&after.owner)
        .bind(&after.site)
        .bind(after.label.clone())
        .bind(at)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let audit = AuditEntry::new(at, actor, "device.update")
            .device(id)
            .detail(changes.join("; "));
        insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(Some(after))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::NewDevice;
    use crate::testing::{TestDatabase, registry};

    on_both_backends!(filters_and_pages, edits_are_audited);

    async fn add(registry: &Registry, id: &str, site: &str, owner: &str, model: &str) {
        let device = NewDevice {
            id: id.into(),
            owner: owner.into(),
            site: site.into(),
            model: Some(model.into()),
            label: Some(format!("Label {id}")),
            created_by: "cli:test".into(),
        };
        registry.add_device(&device, b"sealed", 10).await.unwrap();
    }

    fn ids(page: &DeviceListPage) -> Vec<&str> {
        page.devices.iter().map(|d| d.id.as_str()).collect()
    }

    async fn filters_and_pages(db: TestDatabase) {
        let Some((registry, _keep)) = registry(db).await else {
            return;
        };
        for i in 0..7 {
            let site = if i % 2 == 0 { "berlin" } else { "paris" };
            let owner = if i < 3 { "a@x.io" } else { "b@x.io" };
            add(&registry, &format!("d{i}"), site, owner, "th-1").await;
        }
        add(&registry, "z_100%", "berlin", "a@x.io", "th-2").await;

        let all = DeviceListFilter::default();
        let first = registry.device_list_page(&all, None, 3).await.unwrap();
        assert_eq!(ids(&first), ["d0", "d1", "d2"]);
        assert_eq!((first.total, first.next.as_deref()), (8, Some("d2")));
        let second = registry
            .device_list_page(&all, first.next.as_deref(), 3)
            .await
            .unwrap();
        assert_eq!(ids(&second), ["d3", "d4", "d5"]);
        let last = registry
            .device_list_page(&all, second.next.as_deref(), 3)
            .await
            .unwrap();
        assert_eq!(ids(&last), ["d6", "z_100%"]);
        assert_eq!(last.next, None);

        let filter = DeviceListFilter {
            site: Some("berlin".into()),
            owner: Some("b@x.io".into()),
            model: Some("th-1".into()),
            status: Some(DeviceStatus::Pending),
            ..Default::default()
        };
        let page = registry.device_list_page(&filter, None, 50).await.unwrap();
        assert_eq!((ids(&page), page.total), (vec!["d4", "d6"], 2));

        // Text is matched literally (a `%` or `_` is no wildcard), any case.
        let text = |t: &str| DeviceListFilter {
            text: Some(t.into()),
            ..Default::default()
        };
        let page = registry
            .device_list_page(&text("0%"), None, 50)
            .await
            .unwrap();
        assert_eq!(ids(&page), ["z_100%"]);
        let page = registry
            .device_list_page(&text("LABEL D5"), None, 50)
            .await
            .unwrap();
        assert_eq!(ids(&page), ["d5"]);
        let page = registry
            .device_list_page(&text("_"), None, 50)
            .await
            .unwrap();
        assert_eq!(ids(&page), ["z_100%"]);
        let page = registry
            .device_list_page(
                &DeviceListFilter {
                    status: Some(DeviceStatus::Active),
                    ..Default::default()
                },
                None,
                50,
            )
            .await
            .unwrap();
        assert_eq!((page.total, page.devices.len()), (0, 0));
    }

    async fn edits_are_audited(db: TestDatabase) {
        let Some((registry, _keep)) = registry(db).await else {
            return;
        };
        add(&registry, "d1", "berlin", "a@x.io", "th-1").await;
        let edit = DeviceEdit {
            owner: Some("<script>@x.io".into()),
            site: Some("paris".into()),
            label: Some(None),
        };
        let device = registry
            .edit_device("d1", &edit, "user:alice", 50)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (
                device.owner.as_str(),
                device.site.as_str(),
                device.label.as_deref()
            ),
            ("<script>@x.io", "paris", None)
        );
        let stored = registry.device("d1").await.unwrap().unwrap();
        assert_eq!(stored, device);
        let trail = registry.audit_trail("d1").await.unwrap();
        let last = trail.last().unwrap();
        assert_eq!(
            (last.action.as_str(), last.actor.as_str()),
            ("device.update", "user:alice")
        );
        assert_eq!(
            last.detail,
            "owner: a@x.io -> <script>@x.io; site: berlin -> paris; label: Label d1 -> -"
        );
        // No change writes nothing.
        registry
            .edit_device("d1", &edit, "user:alice", 60)
            .await
            .unwrap();
        assert_eq!(registry.audit_trail("d1").await.unwrap().len(), trail.len());
        assert!(
            registry
                .edit_device("nope", &edit, "user:alice", 60)
                .await
                .unwrap()
                .is_none()
        );
    }
}
