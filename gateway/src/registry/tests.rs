//! Registry tests, each run on SQLite and on PostgreSQL.

use super::*;
use crate::testing::{TestDatabase, registry};

on_both_backends!(
    add_list_and_show,
    batch_import_is_all_or_nothing,
    batch_counts_follow_enrollment,
    concurrent_context_reads_share_statements,
    a_group_outlives_the_caller_that_started_it,
    a_read_abandoned_by_its_caller_is_read_again,
    group_commit_refuses_records_alone,
    group_commit_writes_a_clean_group_at_once,
    a_certificate_is_renewed_for_one_key,
    duplicate_devices_are_refused,
    enrollment_is_recorded_once,
    enrollment_context_reads_device_credential_and_rid,
    keys_bind_to_one_device,
    reopening_keeps_data_and_schema,
    a_migration_applied_meanwhile_is_skipped,
    renewal_context_reads_certificate_successors_and_rid,
    renewal_counter_must_grow,
    revoke_suspend_resume_track_certificates,
    status_changes_are_checked,
);

fn new_device(id: &str, site: &str, owner: &str) -> NewDevice {
    NewDevice {
        id: id.into(),
        owner: owner.into(),
        site: site.into(),
        model: Some("th-1".into()),
        label: None,
        created_by: "cli:test".into(),
    }
}

fn issuance(device: &str, serial: &str, key: u8, rid: &str) -> Issuance {
    Issuance {
        certificate: CertificateRecord {
            serial: serial.into(),
            device_id: device.into(),
            key_fingerprint: vec![key; 32],
            not_before: 100,
            not_after: 200,
            issued_at: 150,
            der: vec![0x30, 0x00],
            revoked_at: None,
            revocation_reason: None,
            renewed_from: None,
        },
        op: "enroll",
        rid: rid.into(),
        csr_sha256: vec![key; 32],
        station: None,
    }
}

fn audit(device: &str) -> AuditEntry {
    AuditEntry::new(150, format!("device:{device}"), "enroll").device(device)
}

/// The audit entry of a renewal by device d1.
fn renew_audit() -> AuditEntry {
    AuditEntry::new(160, "device:d1", "renew").device("d1")
}

async fn add_list_and_show(db: TestDatabase) {
    let Some((registry, _keep)) = registry(db).await else {
        return;
    };
    registry
        .add_device(&new_device("d1", "berlin", "a@x.io"), b"sealed", 10)
        .await
        .unwrap();
    registry
        .add_device(&new_device("d2", "paris", "a@x.io"), b"sealed", 11)
        .await
        .unwrap();
    registry
        .add_device(&new_device("d3", "berlin", "b@x.io"), b"sealed", 12)
        .await
        .unwrap();

    let all = registry
        .list_devices(&DeviceFilter::default())
        .await
        .unwrap();
    assert_eq!(
        all.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        ["d1", "d2", "d3"]
    );
    let filter = DeviceFilter {
        site: Some("berlin".into()),
        owner: Some("b@x.io".into()),
        status: Some(DeviceStatus::Pending),
    };
    let found = registry.list_devices(&filter).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].id, "d3");
    let active = DeviceFilter {
        status: Some(DeviceStatus::Active),
        ..Default::default()
    };
    assert!(registry.list_devices(&active).await.unwrap().is_empty());

    let d1 = registry.device("d1").await.unwrap().unwrap();
    assert_eq!(d1.status, DeviceStatus::Pending);
    assert_eq!(d1.model.as_deref(), Some("th-1"));
    assert_eq!(d1.created_at, 10);
    assert!(registry.device("nope").await.unwrap().is_none());

    let credential = registry.credential("d1").await.unwrap().unwrap();
    assert_eq!(credential.secret, b"sealed");
    assert_eq!(credential.used_at, None);

    let trail = registry.audit_trail("d1").await.unwrap();
    assert_eq!(trail.len(), 1);
    assert_eq!(trail[0].action, "device.add");
    assert_eq!(trail[0].actor, "cli:test");
}

async fn duplicate_devices_are_refused(db: TestDatabase) {
    let Some((registry, _keep)) = registry(db).await else {
        return;
    };
    registry
        .add_device(&new_device("d1", "s", "a@x.io"), b"one", 10)
        .await
        .unwrap();
    let again = registry
        .add_device(&new_device("d1", "other", "b@x.io"), b"two", 11)
        .await;
    assert!(matches!(again, Err(RegistryError::DeviceExists(id)) if id == "d1"));
    let d1 = registry.device("d1").await.unwrap().unwrap();
    assert_eq!(d1.site, "s", "the first registration is untouched");
    assert_eq!(
        registry.credential("d1").await.unwrap().unwrap().secret,
        b"one"
    );
}

async fn enrollment_is_recorded_once(db: TestDatabase) {
    let Some((registry, _keep)) = registry(db).await else {
        return;
    };
    registry
        .add_device(&new_device("d1", "s", "a@x.io"), b"sealed", 10)
        .await
        .unwrap();
    registry
        .record_enrollment(&issuance("d1", "4001", 1, "r1"), &audit("d1"))
        .await
        .unwrap();

    let device = registry.device("d1").await.unwrap().unwrap();
    assert_eq!(device.status, DeviceStatus::Active);
    assert_eq!(
        registry.credential("d1").await.unwrap().unwrap().used_at,
        Some(150)
    );
    let prior = registry
        .prior_request("d1", "enroll", "r1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(prior.certificate.serial, "4001");
    assert_eq!(prior.csr_sha256, vec![1; 32]);
    assert!(
        registry
            .prior_request("d1", "enroll", "r2")
            .await
            .unwrap()
            .is_none()
    );

    // The same rid again, and a second enrollment with a new rid: both refused,
    // and nothing more is written.
    assert!(matches!(
        registry
            .record_enrollment(&issuance("d1", "4002", 2, "r1"), &audit("d1"))
            .await,
        Err(IssuanceError::RidTaken)
    ));
    assert!(matches!(
        registry
            .record_enrollment(&issuance("d1", "4003", 3, "r2"), &audit("d1"))
            .await,
        Err(IssuanceError::TokenUsed)
    ));
    assert_eq!(registry.certificate_count("d1").await.unwrap(), 1);
    let certificates = registry.certificates("d1").await.unwrap();
    assert_eq!(certificates[0].der, vec![0x30, 0x00]);
    assert_eq!(registry.audit_trail("d1").await.unwrap().len(), 2);
}

async fn enrollment_context_reads_device_credential_and_rid(db: TestDatabase) {
    let Some((registry, _keep)) = registry(db).await else {
        return;
    };
    assert!(
        registry
            .enrollment_context("d1", "enroll", "r1")
            .await
            .unwrap()
            .is_none(),
        "no such device"
    );
    registry
        .add_device(&new_device("d1", "s", "a@x.io"), b"sealed", 10)
        .await
        .unwrap();
    let fresh = registry
        .enrollment_context("d1", "enroll", "r1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fresh.device, registry.device("d1").await.unwrap().unwrap());
    let credential = fresh.credential.unwrap();
    assert_eq!(
        (credential.kind.as_str(), credential.secret.as_slice()),
        ("token", b"sealed".as_slice())
    );
    assert_eq!(credential.used_at, None);
    assert!(fresh.prior.is_none());

    registry
        .record_enrollment(&issuance("d1", "4001", 1, "r1"), &audit("d1"))
        .await
        .unwrap();
    let repeated = registry
        .enrollment_context("d1", "enroll", "r1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(repeated.device.status, DeviceStatus::Active);
    assert_eq!(repeated.credential.unwrap().used_at, Some(150));
    let prior = repeated.prior.unwrap();
    assert_eq!(prior.csr_sha256, vec![1; 32]);
    assert_eq!(
        prior.certificate,
        registry.certificate("4001").await.unwrap().unwrap()
    );
    // Another rid, or the same rid for another operation: not answered.
    for (op, rid) in [("enroll", "r2"), ("renew", "r1")] {
        let context = registry
            .enrollment_context("d1", op, rid)
            .await
            .unwrap()
            .unwrap();
        assert!(context.prior.is_none(), "{op} {rid}");
    }

    // A device without a credential row still has a context.
    registry
        .add_device(&new_device("d2", "s", "a@x.io"), b"sealed", 10)
        .await
        .unwrap();
    sqlx::query("DELETE FROM enrollment_credentials WHERE device_id = 'd2'")
        .execute(&registry.pool)
        .await
        .unwrap();
    let bare = registry
        .enrollment_context("d2", "enroll", "r1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(bare.device.id, "d2");
    assert!(bare.credential.is_none());
}

async fn renewal_context_reads_certificate_successors_and_rid(db: TestDatabase) {
    let Some((registry, _keep)) = registry(db).await else {
        return;
    };
    assert!(
        registry
            .renewal_context("d1", "renew", "r1", "4001")
            .await
            .unwrap()
            .is_none(),
        "no such device"
    );
    enrolled(&registry, "d1", "4001", 1).await;
    enrolled(&registry, "d2", "5001", 9).await;
    let context = |rid: &'static str, serial: &'static str| {
        let registry = &registry;
        async move {
            registry
                .renewal_context("d1", "renew", rid, serial)
                .await
                .unwrap()
                .unwrap()
        }
    };

    let fresh = context("r1", "4001").await;
    assert_eq!(fresh.device, registry.device("d1").await.unwrap().unwrap());
    assert!(fresh.prior.is_none());
    assert_eq!(
        fresh.current,
        Some(registry.certificate("4001").await.unwrap().unwrap())
    );
    assert_eq!(fresh.successor_keys, SuccessorKeys::None);
    // Another device's certificate, or one never issued: none.
    for serial in ["5001", "ffff"] {
        let other = context("r1", serial).await;
        assert_eq!(other.current, None, "{serial}");
        assert_eq!(other.successor_keys, SuccessorKeys::None, "{serial}");
    }

    registry
        .record_renewal(
            &renewal("d1", "4002", "4001", 2, "r1", 1_000),
            1,
            &renew_audit(),
        )
        .await
        .unwrap();
    let repeated = context("r1", "4001").await;
    assert_eq!(repeated.device.renew_counter, 1);
    let prior = repeated.prior.unwrap();
    assert_eq!(prior.csr_sha256, vec![2; 32]);
    assert_eq!(prior.certificate.serial, "4002");
    assert_eq!(prior.certificate.renewed_from.as_deref(), Some("4001"));
    assert_eq!(repeated.successor_keys, SuccessorKeys::One(vec![2; 32]));
    assert!(!repeated.successor_keys.any_other_than(&[2; 32]));
    assert!(repeated.successor_keys.any_other_than(&[3; 32]));
    // The enrollment's rid is not a renewal's.
    assert!(context("e", "4002").await.prior.is_none());

    // Renewed again for the same key (a retry under a new rid), then for
    // another key.
    registry
        .record_renewal(
            &renewal("d1", "4003", "4001", 2, "r2", 1_000),
            2,
            &renew_audit(),
        )
        .await
        .unwrap();
    assert_eq!(
        context("r9", "4001").await.successor_keys,
        SuccessorKeys::One(vec![2; 32])
    );
    // A second key for 4001: a clone's renewal that raced the device's. The
    // registry refuses to record one (`RenewedElsewhere`), so the row is
    // written directly, as a registry from before that check may hold it.
    sqlx::query(
        "INSERT INTO certificates (serial, device_id, key_fingerprint, not_before, not_after, \
         issued_at, der, renewed_from) VALUES ('4004', 'd1', $1, 100, 1000, 150, $2, '4001')",
    )
    .bind(vec![3u8; 32])
    .bind(vec![0x30u8, 0x00])
    .execute(&registry.pool)
    .await
    .unwrap();
    let several = context("r9", "4001").await.successor_keys;
    assert_eq!(several, SuccessorKeys::Several);
    assert!(several.any_other_than(&[2; 32]));
    assert_eq!(
        context("r9", "4004").await.successor_keys,
        SuccessorKeys::None
    );
}

async fn keys_bind_to_one_device(db: TestDatabase) {
    let Some((registry, _keep)) = registry(db).await else {
        return;
    };
    for id in ["d1", "d2"] {
        registry
            .add_device(&new_device(id, "s", "a@x.io"), b"sealed", 10)
            .await
            .unwrap();
    }
    registry
        .record_enrollment(&issuance("d1", "4001", 7, "r"), &audit("d1"))
        .await
        .unwrap();
    assert_eq!(
        registry.key_owner(&[7; 32]).await.unwrap().as_deref(),
        Some("d1")
    );
    let reused = registry
        .record_enrollment(&issuance("d2", "4002", 7, "r"), &audit("d2"))
        .await;
    assert!(matches!(reused, Err(IssuanceError::KeyReused)));
    let d2 = registry.device("d2").await.unwrap().unwrap();
    assert_eq!(
        d2.status,
        DeviceStatus::Pending,
        "the refused enrollment rolled back"
    );
    assert_eq!(
        registry.credential("d2").await.unwrap().unwrap().used_at,
        None
    );
    assert_eq!(registry.certificate_count("d2").await.unwrap(), 0);
}

async fn reopening_keeps_data_and_schema(db: TestDatabase) {
    let Some((registry, keep)) = registry(db).await else {
        return;
    };
    registry
        .add_device(&new_device("d1", "s", "a@x.io"), b"sealed", 10)
        .await
        .unwrap();
    registry.close().await;
    let again = Registry::open(&keep.url).await.unwrap();
    assert!(again.device("d1").await.unwrap().is_some());
}

/// Many requests asking at once: each gets its own answer, from a few
/// statements.
async fn concurrent_context_reads_share_statements(db: TestDatabase) {
    let Some((registry, _keep)) = registry(db).await else {
        return;
    };
    for i in 0..30 {
        enrolled(
            &registry,
            &format!("d{i}"),
            &format!("40{i:02}"),
            i as u8 + 1,
        )
        .await;
    }
    let registry = std::sync::Arc::new(registry);
    let before = registry.context_reads();
    let mut asked = tokio::task::JoinSet::new();
    for i in 0..100usize {
        let registry = registry.clone();
        asked.spawn(async move {
            // Registered devices with an answered rid ("e") or a new one,
            // devices that do not exist, and the same question asked twice.
            let device = match i % 4 {
                3 => format!("nobody{i}"),
                _ => format!("d{}", i % 30),
            };
            let rid = if i % 5 == 0 {
                "e".to_owned()
            } else {
                format!("r{}", i % 50)
            };
            let enrollment = registry.enrollment_context(&device, "enroll", &rid).await;
            let renewal = registry
                .renewal_context(&device, "renew", &rid, &format!("40{:02}", i % 30))
                .await;
            (i, device, rid, enrollment.unwrap(), renewal.unwrap())
        });
    }
    let mut answered = 0;
    while let Some(joined) = asked.join_next().await {
        let (i, device, rid, enrollment, renewal) = joined.unwrap();
        answered += 1;
        if device.starts_with("nobody") {
            assert!(enrollment.is_none() && renewal.is_none(), "{device}");
            continue;
        }
        let enrollment = enrollment.unwrap();
        assert_eq!(enrollment.device.id, device);
        assert_eq!(enrollment.credential.unwrap().used_at, Some(150));
        match enrollment.prior {
            Some(prior) => {
                assert_eq!(rid, "e", "{i}");
                assert_eq!(prior.certificate.device_id, device);
                assert_eq!(prior.certificate.serial, format!("40{:02}", i % 30));
            }
            None => assert_ne!(rid, "e", "{i}"),
        }
        let renewal = renewal.unwrap();
        assert_eq!(renewal.device.id, device);
        assert!(renewal.prior.is_none(), "no renewal was answered");
        assert_eq!(
            renewal.current.unwrap().serial,
            format!("40{:02}", i % 30),
            "the device's own certificate"
        );
    }
    assert_eq!(answered, 100);
    let after = registry.context_reads();
    let statements = after.statements - before.statements;
    assert!(
        statements <= 12,
        "{statements} statements for 200 questions: the reads were not batched"
    );
    assert!(after.requests - before.requests >= 2 * 90, "{after:?}");
}

/// A group's transaction runs on the committer's thread: when the caller
/// that started it goes away, the group is still written and its other
/// records still get their answer.
async fn a_group_outlives_the_caller_that_started_it(db: TestDatabase) {
    let Some((registry, _keep)) = registry(db).await else {
        return;
    };
    for id in ["a", "b"] {
        registry
            .add_device(&new_device(id, "s", "a@x.io"), b"sealed", 10)
            .await
            .unwrap();
    }
    // Both records queue while the turn is held here, so one group takes both.
    let held = registry.write_turn.lock().await;
    let (first, second) = (issuance("a", "a001", 1, "r"), issuance("b", "b001", 2, "r"));
    let (audit_a, audit_b) = (audit("a"), audit("b"));
    // Boxed, so that dropping `a` drops the future itself.
    let mut a = Box::pin(registry.record_enrollment(&first, &audit_a));
    let mut b = Box::pin(registry.record_enrollment(&second, &audit_b));
    poll_pending(a.as_mut()).await;
    poll_pending(b.as_mut()).await;
    assert_eq!(registry.queue().len(), 2);
    drop(held);
    // `a` takes the turn, hands the group to the committer and waits for it.
    poll_pending(a.as_mut()).await;
    assert!(registry.queue().is_empty(), "the group was taken");
    drop(a);
    b.await.unwrap();
    for id in ["a", "b"] {
        let device = registry.device(id).await.unwrap().unwrap();
        assert_eq!(device.status, DeviceStatus::Active, "{id}");
    }
    let commits = registry.commit_stats();
    assert_eq!((commits.groups, commits.records), (1, 2));
}

/// A batched read runs in the future of the caller that took the turn: when
/// that caller goes away mid-read, the other requests of its batch are read
/// again rather than failed.
async fn a_read_abandoned_by_its_caller_is_read_again(db: TestDatabase) {
    let Some((registry, _keep)) = registry(db).await else {
        return;
    };
    enrolled(&registry, "x", "x001", 1).await;
    enrolled(&registry, "y", "y001", 2).await;
    // Both turns held here, so both requests queue for one batch.
    let held = registry
        .reads
        .turns
        .acquire_many(context::READ_TURNS as u32)
        .await
        .unwrap();
    let mut x = Box::pin(registry.enrollment_context("x", "enroll", "e"));
    let mut y = Box::pin(registry.enrollment_context("y", "enroll", "e"));
    poll_pending(x.as_mut()).await;
    poll_pending(y.as_mut()).await;
    drop(held);
    // `x` takes a turn and both keys, starts the statement, and goes away.
    poll_pending(x.as_mut()).await;
    drop(x);
    let y = y.await.unwrap().unwrap();
    assert_eq!(y.device.id, "y");
    assert_eq!(y.prior.unwrap().certificate.serial, "y001");
}

/// Polls `future` once, which must leave it pending.
async fn poll_pending<F: std::future::Future>(mut future: std::pin::Pin<&mut F>) {
    std::future::poll_fn(|cx| {
        assert!(future.as_mut().poll(cx).is_pending());
        std::task::Poll::Ready(())
    })
    .await
}

fn renewal(device: &str, serial: &str, from: &str, key: u8, rid: &str, not_after: i64) -> Issuance {
    let mut issuance = issuance(device, serial, key, rid);
    issuance.op = "renew";
    issuance.certificate.renewed_from = Some(from.into());
    issuance.certificate.not_after = not_after;
    issuance
}

async fn enrolled(registry: &Registry, id: &str, serial: &str, key: u8) {
    registry
        .add_device(&new_device(id, "s", "a@x.io"), b"sealed", 10)
        .await
        .unwrap();
    let mut issuance = issuance(id, serial, key, "e");
    issuance.certificate.not_after = 1_000;
    registry
        .record_enrollment(&issuance, &audit(id))
        .await
        .unwrap();
}

async fn renewal_counter_must_grow(db: TestDatabase) {
    let Some((registry, _keep)) = registry(db).await else {
        return;
    };
    enrolled(&registry, "d1", "4001", 1).await;
    registry
        .record_renewal(
            &renewal("d1", "4002", "4001", 2, "r1", 1_000),
            5,
            &renew_audit(),
        )
        .await
        .unwrap();
    assert_eq!(
        registry.device("d1").await.unwrap().unwrap().renew_counter,
        5
    );
    let next = registry.successors("4001").await.unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].serial, "4002");
    assert_eq!(
        registry
            .certificate("4002")
            .await
            .unwrap()
            .unwrap()
            .renewed_from
            .as_deref(),
        Some("4001")
    );
    assert!(registry.certificate("ffff").await.unwrap().is_none());

    for counter in [5, 4] {
        let again = registry
            .record_renewal(
                &renewal("d1", "4003", "4002", 3, "r2", 1_000),
                counter,
                &renew_audit(),
            )
            .await;
        assert!(
            matches!(again, Err(IssuanceError::CounterNotGreater)),
            "{counter}"
        );
    }
    assert!(
        registry.certificate("4003").await.unwrap().is_none(),
        "nothing written"
    );

    let suspect = || AuditEntry::new(170, "gateway", "device.suspect").device("d1");
    assert!(registry.mark_suspect("d1", &suspect()).await.unwrap());
    assert!(
        !registry.mark_suspect("d1", &suspect()).await.unwrap(),
        "already suspect"
    );
    let suspect_entries = registry
        .audit_trail("d1")
        .await
        .unwrap()
        .into_iter()
        .filter(|a| a.action == "device.suspect")
        .count();
    assert_eq!(suspect_entries, 1, "audited once, when it changed");
    let refused = registry
        .record_renewal(
            &renewal("d1", "4003", "4002", 3, "r2", 1_000),
            9,
            &renew_audit(),
        )
        .await;
    assert!(matches!(refused, Err(IssuanceError::NotActive)));
}

async fn revoke_suspend_resume_track_certificates(db: TestDatabase) {
    let Some((registry, _keep)) = registry(db).await else {
        return;
    };
    enrolled(&registry, "d1", "4001", 1).await;
    registry
        .record_renewal(
            &renewal("d1", "4002", "4001", 2, "r1", 1_000),
            1,
            &renew_audit(),
        )
        .await
        .unwrap();
    // An expired certificate is left alone by every change.
    registry
        .record_renewal(
            &renewal("d1", "4000", "4002", 3, "r0", 50),
            2,
            &renew_audit(),
        )
        .await
        .unwrap();
    let epoch = registry.revocation_epoch().await.unwrap();

    let held = registry
        .change_status(
            "d1",
            &StatusChange::Suspend,
            &AuditEntry::new(200, "cli:op", "device.suspend").device("d1"),
        )
        .await
        .unwrap();
    assert_eq!(held, ["4001", "4002"]);
    assert_eq!(
        registry.device("d1").await.unwrap().unwrap().status,
        DeviceStatus::Suspended
    );
    let listed = registry.revoked_unexpired(200).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(
        listed
            .iter()
            .all(|c| c.revocation_reason.as_deref() == Some("certificateHold"))
    );
    assert!(registry.revocation_epoch().await.unwrap() > epoch);

    let released = registry
        .change_status(
            "d1",
            &StatusChange::Resume,
            &AuditEntry::new(210, "cli:op", "device.resume").device("d1"),
        )
        .await
        .unwrap();
    assert_eq!(released, ["4001", "4002"]);
    assert!(registry.revoked_unexpired(210).await.unwrap().is_empty());
    assert_eq!(
        registry.device("d1").await.unwrap().unwrap().status,
        DeviceStatus::Active
    );

    let revoke = StatusChange::Revoke {
        crl_reason: "keyCompromise".into(),
        retire: false,
    };
    let revoked = registry
        .change_status(
            "d1",
            &revoke,
            &AuditEntry::new(220, "cli:op", "device.revoke").device("d1"),
        )
        .await
        .unwrap();
    assert_eq!(revoked, ["4001", "4002"]);
    let listed = registry.revoked_unexpired(220).await.unwrap();
    assert!(
        listed.iter().all(|c| c.revoked_at == Some(220)
            && c.revocation_reason.as_deref() == Some("keyCompromise"))
    );
    assert!(
        registry.revoked_unexpired(2_000).await.unwrap().is_empty(),
        "expired ones drop off"
    );
    assert!(
        registry
            .certificate("4000")
            .await
            .unwrap()
            .unwrap()
            .revoked_at
            .is_none()
    );
    assert_eq!(
        registry.device("d1").await.unwrap().unwrap().status,
        DeviceStatus::Revoked
    );

    let trail = registry.audit_trail("d1").await.unwrap();
    let revoke_entry = trail.iter().find(|a| a.action == "device.revoke").unwrap();
    assert_eq!(revoke_entry.actor, "cli:op");
    assert!(
        revoke_entry.detail.contains("active -> revoked"),
        "{}",
        revoke_entry.detail
    );
}

async fn status_changes_are_checked(db: TestDatabase) {
    let Some((registry, _keep)) = registry(db).await else {
        return;
    };
    enrolled(&registry, "d1", "4001", 1).await;
    let revoke = StatusChange::Revoke {
        crl_reason: "cessationOfOperation".into(),
        retire: true,
    };
    let entry = AuditEntry::new(200, "cli:op", "device.revoke").device("d1");
    assert!(matches!(
        registry.change_status("nope", &revoke, &entry).await,
        Err(StatusError::UnknownDevice(_))
    ));
    assert!(matches!(
        registry
            .change_status("d1", &StatusChange::Resume, &entry)
            .await,
        Err(StatusError::NotAllowed {
            status: DeviceStatus::Active,
            ..
        })
    ));
    registry.change_status("d1", &revoke, &entry).await.unwrap();
    assert_eq!(
        registry.device("d1").await.unwrap().unwrap().status,
        DeviceStatus::Retired
    );
    for change in [revoke.clone(), StatusChange::Suspend, StatusChange::Resume] {
        assert!(matches!(
            registry.change_status("d1", &change, &entry).await,
            Err(StatusError::NotAllowed {
                status: DeviceStatus::Retired,
                ..
            })
        ));
    }
}

#[tokio::test]
async fn sqlite_is_durable_wal_with_foreign_keys() {
    let Some((registry, _keep)) = registry(TestDatabase::Sqlite).await else {
        return;
    };
    // Every pooled connection gets the settings; check a few at once.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut conn = registry.pool.acquire().await.unwrap();
        let synchronous: i64 = sqlx::query("PRAGMA synchronous")
            .fetch_one(&mut *conn)
            .await
            .unwrap()
            .try_get(0)
            .unwrap();
        assert_eq!(synchronous, 2, "synchronous = FULL");
        let journal: String = sqlx::query("PRAGMA journal_mode")
            .fetch_one(&mut *conn)
            .await
            .unwrap()
            .try_get(0)
            .unwrap();
        assert_eq!(journal, "wal");
        let foreign_keys: i64 = sqlx::query("PRAGMA foreign_keys")
            .fetch_one(&mut *conn)
            .await
            .unwrap()
            .try_get(0)
            .unwrap();
        assert_eq!(foreign_keys, 1);
        held.push(conn);
    }
}

fn batch(id: &str) -> NewBatch {
    NewBatch {
        id: id.into(),
        owner: "line@x.io".into(),
        site: "plant".into(),
        model: Some("th-1".into()),
        created_by: "cli:test".into(),
    }
}

fn batch_devices(ids: &[&str]) -> Vec<(NewDevice, Vec<u8>)> {
    ids.iter()
        .map(|id| (new_device(id, "plant", "line@x.io"), id.as_bytes().to_vec()))
        .collect()
}

async fn batch_import_is_all_or_nothing(db: TestDatabase) {
    let Some((registry, _keep)) = registry(db).await else {
        return;
    };
    registry
        .add_device(&new_device("old", "s", "a@x.io"), b"sealed", 10)
        .await
        .unwrap();
    let progress = std::sync::atomic::AtomicUsize::new(0);
    let report = |n: usize| progress.store(n, std::sync::atomic::Ordering::Relaxed);
    // The third device exists: nothing of the batch is written.
    let refused = registry
        .import_batch(
            &batch("b1"),
            &batch_devices(&["n1", "n2", "old"]),
            20,
            &report,
        )
        .await;
    assert!(
        matches!(&refused, Err(BatchError::DeviceExists { index: 2, id }) if id == "old"),
        "{refused:?}"
    );
    assert!(registry.device("n1").await.unwrap().is_none());
    assert!(registry.batch("b1").await.unwrap().is_none());
    assert!(registry.batches().await.unwrap().is_empty());

    registry
        .import_batch(
            &batch("b1"),
            &batch_devices(&["n1", "n2", "n3"]),
            20,
            &report,
        )
        .await
        .unwrap();
    assert_eq!(progress.load(std::sync::atomic::Ordering::Relaxed), 3);
    let n2 = registry.device("n2").await.unwrap().unwrap();
    assert_eq!(n2.status, DeviceStatus::Pending);
    assert_eq!(
        registry.credential("n2").await.unwrap().unwrap().secret,
        b"n2"
    );
    let trail = registry.audit_trail("n2").await.unwrap();
    assert_eq!(trail.len(), 1);
    assert!(trail[0].detail.contains("batch=b1"), "{}", trail[0].detail);

    let again = registry
        .import_batch(&batch("b1"), &batch_devices(&["n9"]), 30, &report)
        .await;
    assert!(matches!(again, Err(BatchError::BatchExists(id)) if id == "b1"));
    assert!(registry.device("n9").await.unwrap().is_none());
}

async fn batch_counts_follow_enrollment(db: TestDatabase) {
    let Some((registry, _keep)) = registry(db).await else {
        return;
    };
    registry
        .import_batch(
            &batch("b1"),
            &batch_devices(&["e1", "f1", "p1", "p2"]),
            20,
            &|_| {},
        )
        .await
        .unwrap();
    registry
        .import_batch(&batch("b2"), &batch_devices(&["x1"]), 21, &|_| {})
        .await
        .unwrap();
    registry
        .record_enrollment(&issuance("e1", "0a01", 1, "r1"), &audit("e1"))
        .await
        .unwrap();
    registry
        .audit(&audit("f1").outcome("bad_proof"))
        .await
        .unwrap();
    let b1 = registry.batch("b1").await.unwrap().unwrap();
    assert_eq!(
        (b1.registered, b1.enrolled, b1.failed, b1.pending),
        (4, 1, 1, 2)
    );
    assert_eq!(b1.owner, "line@x.io");
    assert_eq!(b1.created_at, 20);
    assert_eq!(
        registry.batch_pending("b1").await.unwrap(),
        ["f1", "p1", "p2"]
    );
    let all = registry.batches().await.unwrap();
    assert_eq!(
        all.iter()
            .map(|b| (b.id.as_str(), b.registered))
            .collect::<Vec<_>>(),
        [("b1", 4), ("b2", 1)]
    );
    assert!(registry.batch("nope").await.unwrap().is_none());
}

async fn group_commit_refuses_records_alone(db: TestDatabase) {
    let Some((registry, _keep)) = registry(db).await else {
        return;
    };
    for id in ["g1", "g2", "g3", "g4"] {
        registry
            .add_device(&new_device(id, "s", "a@x.io"), b"sealed", 10)
            .await
            .unwrap();
    }
    // Recorded concurrently, so they share transactions: g2 reuses g1's key
    // and g3 enrolls twice; each refusal must leave the others committed.
    let records = [
        issuance("g1", "0b01", 1, "r1"),
        issuance("g2", "0b02", 1, "r1"),
        issuance("g3", "0b03", 3, "r1"),
        issuance("g3", "0b04", 4, "r2"),
        issuance("g4", "0b05", 5, "r1"),
    ];
    let (registry, outcomes) = futures_join(registry, &records).await;
    let ok = |i: usize| outcomes[i].is_ok();
    assert!(ok(0) ^ ok(1), "one of g1 and g2 gets key 1: {outcomes:?}");
    assert!(ok(2) ^ ok(3), "g3 enrolls once: {outcomes:?}");
    assert!(ok(4), "{outcomes:?}");
    for (i, record) in records.iter().enumerate() {
        let stored = registry
            .certificate(&record.certificate.serial)
            .await
            .unwrap();
        assert_eq!(stored.is_some(), ok(i), "record {i}");
    }
    assert_eq!(
        registry.device("g4").await.unwrap().unwrap().status,
        DeviceStatus::Active
    );
    // A refusal is only ever decided record by record.
    assert!(registry.commit_stats().per_record >= 1);
}

async fn group_commit_writes_a_clean_group_at_once(db: TestDatabase) {
    let Some((registry, _keep)) = registry(db).await else {
        return;
    };
    let ids: Vec<String> = (0..12).map(|i| format!("c{i:02}")).collect();
    for id in &ids {
        registry
            .add_device(&new_device(id, "s", "a@x.io"), b"sealed", 10)
            .await
            .unwrap();
    }
    let records: Vec<Issuance> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| issuance(id, &format!("0c{i:02}"), 100 + i as u8, "r1"))
        .collect();
    let (registry, outcomes) = futures_join(registry, &records).await;
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    let stats = registry.commit_stats();
    assert_eq!(stats.records, 12);
    assert_eq!(stats.per_record, 0, "{stats:?}");
    assert!(
        stats.groups < 12,
        "concurrent records share groups: {stats:?}"
    );
    // Everything a record writes is there, as the per-record path writes it.
    for (record, id) in records.iter().zip(&ids) {
        let device = registry.device(id).await.unwrap().unwrap();
        assert_eq!(device.status, DeviceStatus::Active);
        assert_eq!(device.updated_at, 150);
        assert_eq!(device.last_seen_at, Some(150));
        let used = registry.credential(id).await.unwrap().unwrap().used_at;
        assert_eq!(used, Some(150));
        let key = &record.certificate.key_fingerprint;
        assert_eq!(
            registry.key_owner(key).await.unwrap().as_deref(),
            Some(id.as_str())
        );
        let prior = registry
            .prior_request(id, "enroll", "r1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(prior.certificate, record.certificate);
        assert_eq!(prior.csr_sha256, record.csr_sha256);
        let trail = registry.audit_trail(id).await.unwrap();
        assert!(trail.iter().any(|e| e.action == "enroll"), "{trail:?}");
    }

    // Renewals of several devices at once, then one whose counter does not
    // grow: that group goes record by record and refuses it alone.
    let registry = std::sync::Arc::new(registry);
    let renew = |i: usize, counter: i64| {
        let registry = registry.clone();
        let id = ids[i].clone();
        tokio::spawn(async move {
            let mut record = renewal(
                &id,
                &format!("1c{i:02}{counter}"),
                &format!("0c{i:02}"),
                200 + i as u8,
                &format!("n{counter}"),
                1_000,
            );
            record.certificate.issued_at = 160;
            let audit = AuditEntry::new(160, format!("device:{id}"), "renew").device(&id);
            registry.record_renewal(&record, counter, &audit).await
        })
    };
    let tasks: Vec<_> = (0..6).map(|i| renew(i, 3)).collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(registry.commit_stats().per_record, 0);
    for id in &ids[..6] {
        let device = registry.device(id).await.unwrap().unwrap();
        assert_eq!((device.renew_counter, device.updated_at), (3, 160));
        assert_eq!(device.last_seen_at, Some(160));
    }
    let stale = renew(0, 2).await.unwrap();
    assert!(
        matches!(stale, Err(IssuanceError::CounterNotGreater)),
        "{stale:?}"
    );
    assert_eq!(registry.commit_stats().per_record, 1);
    assert!(registry.certificate("1c002").await.unwrap().is_none());
}

async fn futures_join(
    registry: Registry,
    records: &[Issuance],
) -> (Registry, Vec<Result<(), IssuanceError>>) {
    let registry = std::sync::Arc::new(registry);
    let tasks: Vec<_> = records
        .iter()
        .cloned()
        .map(|record| {
            let registry = registry.clone();
            tokio::spawn(async move {
                let audit = audit(&record.certificate.device_id);
                registry.record_enrollment(&record, &audit).await
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    let registry = std::sync::Arc::into_inner(registry).unwrap();
    (registry, outcomes)
}

async fn a_certificate_is_renewed_for_one_key(db: TestDatabase) {
    let Some((registry, _keep)) = registry(db).await else {
        return;
    };
    enrolled(&registry, "d1", "5001", 1).await;
    let audit = || AuditEntry::new(160, "device:d1", "renew").device("d1");
    registry
        .record_renewal(&renewal("d1", "5002", "5001", 2, "r1", 1_000), 2, &audit())
        .await
        .unwrap();
    // A second renewal of 5001 for another key, its counter greater (a
    // clone that read before the first was recorded): refused in the
    // transaction, alone or in a group.
    let again = registry
        .record_renewal(&renewal("d1", "5003", "5001", 3, "r2", 1_000), 3, &audit())
        .await;
    assert!(
        matches!(again, Err(IssuanceError::RenewedElsewhere)),
        "{again:?}"
    );
    assert!(registry.certificate("5003").await.unwrap().is_none());
    assert_eq!(
        registry.device("d1").await.unwrap().unwrap().renew_counter,
        2
    );
    assert_eq!(
        registry.commit_stats().per_record,
        1,
        "found by the group path"
    );
}

/// While a group's transaction is being opened or is open, no other writer
/// gets the write turn, even after the caller that started the group went
/// away (SQLite: a second writer would wait on SQLite's lock behind it).
#[tokio::test]
async fn sqlite_the_write_turn_stays_with_an_open_group() {
    use sqlx::Connection;
    let Some((registry, keep)) = registry(TestDatabase::Sqlite).await else {
        unreachable!("SQLite needs no server");
    };
    registry
        .add_device(&new_device("a", "s", "a@x.io"), b"sealed", 10)
        .await
        .unwrap();
    // Another connection holds SQLite's write lock, so the group's
    // transaction waits for it (`BEGIN IMMEDIATE`, busy_timeout) as it opens.
    let mut lock = sqlx::SqliteConnection::connect(&keep.url).await.unwrap();
    sqlx::raw_sql("BEGIN IMMEDIATE")
        .execute(&mut lock)
        .await
        .unwrap();
    let (first, audit_a) = (issuance("a", "a001", 1, "r"), audit("a"));
    let mut a = Box::pin(registry.record_enrollment(&first, &audit_a));
    poll_pending(a.as_mut()).await;
    assert!(registry.queue().is_empty(), "the group was handed over");
    drop(a);
    assert!(
        registry.write_turn.try_lock().is_err(),
        "the turn went free with the group's transaction open"
    );
    sqlx::raw_sql("ROLLBACK").execute(&mut lock).await.unwrap();
    // The group commits, then the turn is free again.
    let _turn = registry.write_turn.lock().await;
    let device = registry.device("a").await.unwrap().unwrap();
    assert_eq!(device.status, DeviceStatus::Active);
}

/// A transaction that writes holds SQLite's write lock from its first
/// statement on, so another process's writer waits for it (and it for them)
/// instead of a read-then-write transaction being refused at once
/// (SQLITE_BUSY_SNAPSHOT) when the other committed in between: what an
/// `idgate batch import` run beside `idgate serve` met.
#[tokio::test]
async fn sqlite_a_write_holds_the_lock_from_its_start() {
    use sqlx::Connection;
    let Some((registry, keep)) = registry(TestDatabase::Sqlite).await else {
        unreachable!("SQLite needs no server");
    };
    let mut other = sqlx::SqliteConnection::connect(&keep.url).await.unwrap();
    sqlx::raw_sql("PRAGMA busy_timeout = 0")
        .execute(&mut other)
        .await
        .unwrap();
    let mut tx = registry.begin_write().await.unwrap();
    // Only a read so far: a deferred transaction would hold no lock yet.
    sqlx::query("SELECT count(*) FROM devices")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    let refused = sqlx::raw_sql("BEGIN IMMEDIATE").execute(&mut other).await;
    let Err(sqlx::Error::Database(e)) = refused else {
        panic!("another writer got the lock: {refused:?}");
    };
    assert!(e.message().contains("locked"), "{e}");
    tx.rollback().await.unwrap();
    // Free again once the transaction ends.
    sqlx::raw_sql("BEGIN IMMEDIATE; ROLLBACK")
        .execute(&mut other)
        .await
        .unwrap();
}

/// A gateway and an `idgate` command (or two replicas) starting at once on
/// an older schema both see a migration missing; the one that applies it
/// second finds its version row and skips it, instead of failing to open.
async fn a_migration_applied_meanwhile_is_skipped(db: TestDatabase) {
    let Some((registry, _keep)) = registry(db).await else {
        return;
    };
    let (version, name, sql) = MIGRATIONS[0];
    // Everything is applied: as if another process had just done it.
    let again = registry.apply_migration(version, name, sql).await;
    assert!(matches!(again, Ok(false)), "{again:?}");
    let rows: i64 = sqlx::query("SELECT count(*) FROM idgate_schema WHERE version = $1")
        .bind(version)
        .fetch_one(&registry.pool)
        .await
        .unwrap()
        .try_get(0)
        .unwrap();
    assert_eq!(rows, 1);
    // Nothing was rolled back with the skipped one: the registry works.
    registry
        .add_device(&new_device("m1", "s", "a@x.io"), b"sealed", 10)
        .await
        .unwrap();
}
