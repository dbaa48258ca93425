//! Renewals that must be refused, each with its code, with nothing issued;
//! replays and clones mark the device suspect.

use std::sync::Arc;

use idgate_gateway::admin;
use idgate_gateway::authority::{Authority, Policy};
use idgate_gateway::registry::{DeviceStatus, now};
use idgate_gateway::testing::TestDatabase;
use idgate_pki::protocol::{Format, MAX_RENEW_MESSAGE, Op, Reply, Topic, renew_message};
use idgate_pki::wire::{RenewRequestBuf, decode_issued, decode_rejected, encode_renew};
use idgate_sim::{EnrollOptions, Enrolled, enroll};
use idgate_tests::{Harness, RawClient};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::DecodePrivateKey;
use rcgen::{CertificateParams, KeyPair};

crate::on_both_backends!(
    bad_renewals_are_refused,
    replays_and_clones_mark_the_device_suspect
);

struct Device {
    id: String,
    key: SigningKey,
    serial: String,
}

async fn enrolled(h: &Harness, id: &str) -> (Device, Enrolled) {
    let token = h.add_device(id, "paris").await;
    let root = std::fs::read(h.root_ca()).unwrap();
    let enrolled = enroll(&EnrollOptions::new(h.broker(), root, id, token))
        .await
        .unwrap();
    let device = Device {
        id: id.to_owned(),
        key: SigningKey::from_pkcs8_pem(&enrolled.key_pem).unwrap(),
        serial: enrolled.serial.clone(),
    };
    (device, enrolled)
}

/// A CSR for a new key.
fn new_csr() -> Vec<u8> {
    csr_of(&SigningKey::random(
        &mut p256::elliptic_curve::rand_core::OsRng,
    ))
}

/// A CSR for the key `key`.
fn csr_of(key: &SigningKey) -> Vec<u8> {
    let pem = p256::pkcs8::EncodePrivateKey::to_pkcs8_pem(key, Default::default()).unwrap();
    let key = KeyPair::from_pem(&pem).unwrap();
    CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec()
}

/// A renewal request signed by `signer` (normally the device's current key).
fn request(
    device: &str,
    rid: &str,
    csr: &[u8],
    serial: &str,
    counter: u64,
    signer: &SigningKey,
) -> RenewRequestBuf {
    let mut message = [0u8; MAX_RENEW_MESSAGE];
    let len = renew_message(device, rid, csr, serial, counter, &mut message).unwrap();
    let signature: Signature = signer.sign(&message[..len]);
    RenewRequestBuf {
        rid: rid.into(),
        csr: csr.to_vec(),
        serial: serial.into(),
        counter,
        sig: signature.to_bytes().to_vec(),
    }
}

async fn send(
    client: &mut RawClient,
    device: &str,
    format: Format,
    request: &RenewRequestBuf,
) -> Result<String, String> {
    let payload = encode_renew(format, &request.borrowed());
    let (reply, body) = client
        .request(Topic::request(device, Op::Renew, format), payload)
        .await;
    match reply {
        Reply::Accepted => Ok(decode_issued(format, &body).unwrap().serial),
        Reply::Rejected => Err(decode_rejected(format, &body).unwrap().code),
    }
}

async fn bad_renewals_are_refused(db: TestDatabase) {
    let Some(h) = Harness::start(db).await else {
        return;
    };
    let (a, _) = enrolled(&h, "meter-a").await;
    let (b, _) = enrolled(&h, "meter-b").await;
    let mut c = h.client("tester").await;
    let count = |id: &'static str| {
        let registry = h.registry().clone();
        async move { registry.certificate_count(id).await.unwrap() }
    };

    // Signed by the wrong key.
    let wrong = SigningKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
    let r = request(&a.id, "w1", &new_csr(), &a.serial, 1, &wrong);
    assert_eq!(
        send(&mut c, &a.id, Format::Cbor, &r).await,
        Err("bad_signature".into())
    );
    // Another device's serial (signed by that device's key, even).
    let r = request(&a.id, "w2", &new_csr(), &b.serial, 1, &b.key);
    assert_eq!(
        send(&mut c, &a.id, Format::Json, &r).await,
        Err("unknown_certificate".into())
    );
    // A serial never issued.
    let r = request(&a.id, "w3", &new_csr(), "4abcdef0", 1, &a.key);
    assert_eq!(
        send(&mut c, &a.id, Format::Cbor, &r).await,
        Err("unknown_certificate".into())
    );
    // The current key again, not a new one.
    let r = request(&a.id, "w4", &csr_of(&a.key), &a.serial, 1, &a.key);
    assert_eq!(
        send(&mut c, &a.id, Format::Cbor, &r).await,
        Err("key_reused".into())
    );
    // Another device's key: refused by the recording transaction (the key
    // is bound to meter-b), and the counter it carried is not spent.
    let r = request(&a.id, "w4b", &csr_of(&b.key), &a.serial, 1, &a.key);
    assert_eq!(
        send(&mut c, &a.id, Format::Json, &r).await,
        Err("key_reused".into())
    );
    // A broken CSR and garbage.
    let r = request(&a.id, "w5", b"\x30\x03\x02\x01\x00", &a.serial, 1, &a.key);
    assert_eq!(
        send(&mut c, &a.id, Format::Cbor, &r).await,
        Err("bad_csr".into())
    );
    let (reply, body) = c
        .request(
            Topic::request(&a.id, Op::Renew, Format::Json),
            b"{\"rid\":\"x\"}".to_vec(),
        )
        .await;
    assert_eq!(reply, Reply::Rejected);
    assert_eq!(
        decode_rejected(Format::Json, &body).unwrap().code,
        "malformed"
    );
    // For an unknown device.
    let r = request("ghost", "w6", &new_csr(), &a.serial, 1, &a.key);
    assert_eq!(
        send(&mut c, "ghost", Format::Cbor, &r).await,
        Err("unknown_device".into())
    );
    assert_eq!(count("meter-a").await, 1, "nothing issued");

    // A good renewal, then its verbatim replay: the same certificate, nothing new.
    let good = request(&a.id, "ok-1", &new_csr(), &a.serial, 1, &a.key);
    let serial = send(&mut c, &a.id, Format::Cbor, &good).await.unwrap();
    assert_eq!(
        send(&mut c, &a.id, Format::Cbor, &good).await,
        Ok(serial.clone())
    );
    assert_eq!(count("meter-a").await, 2);

    // After the grace period (checked at the library level with a clock a
    // month ahead): expired.
    let (ca, chain) = h.data.load_issuing_ca().unwrap();
    let authority = Authority::new(
        Arc::new(ca),
        chain,
        Policy::default(),
        h.registry().clone(),
        h.data.tokens().unwrap(),
    );
    let late = now() + 31 * 24 * 3600;
    let r = request(&b.id, "late", &new_csr(), &b.serial, 1, &b.key);
    let refused = authority.renew(&b.id, &r, late).await.unwrap_err();
    assert_eq!(refused.code.as_str(), "expired");
    // Within the grace period (two days after expiry): renewed.
    let within = now() + 3 * 24 * 3600;
    let r = request(&b.id, "grace", &new_csr(), &b.serial, 1, &b.key);
    authority.renew(&b.id, &r, within).await.unwrap();

    // A revoked device's renewal.
    admin::revoke(
        h.registry(),
        &b.id,
        admin::RevokeReason::Stolen,
        "test",
        now(),
    )
    .await
    .unwrap();
    let r = request(&b.id, "after", &new_csr(), &b.serial, 2, &b.key);
    assert_eq!(
        send(&mut c, &b.id, Format::Cbor, &r).await,
        Err("device_revoked".into())
    );

    // Every refusal is audited with its code.
    let outcomes: Vec<String> = h
        .registry()
        .audit_trail(&a.id)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.action == "renew")
        .map(|e| e.outcome)
        .collect();
    for code in [
        "bad_signature",
        "unknown_certificate",
        "key_reused",
        "bad_csr",
        "malformed",
        "ok",
    ] {
        assert!(
            outcomes.iter().any(|o| o == code),
            "{code} not audited: {outcomes:?}"
        );
    }
    h.gateway.shutdown().await;
}

async fn replays_and_clones_mark_the_device_suspect(db: TestDatabase) {
    let Some(h) = Harness::start(db).await else {
        return;
    };
    let (a, _) = enrolled(&h, "valve-1").await;
    let mut c = h.client("tester").await;

    let first = request(&a.id, "r1", &new_csr(), &a.serial, 5, &a.key);
    send(&mut c, &a.id, Format::Cbor, &first).await.unwrap();
    // A new request with an old counter: a replay or a clone.
    let old = request(&a.id, "r2", &new_csr(), &a.serial, 5, &a.key);
    assert_eq!(
        send(&mut c, &a.id, Format::Cbor, &old).await,
        Err("counter_replay".into())
    );
    let device = h.registry().device(&a.id).await.unwrap().unwrap();
    assert_eq!(device.status, DeviceStatus::Suspect);
    let next = request(&a.id, "r3", &new_csr(), &a.serial, 9, &a.key);
    assert_eq!(
        send(&mut c, &a.id, Format::Cbor, &next).await,
        Err("device_suspect".into())
    );
    let trail = h.registry().audit_trail(&a.id).await.unwrap();
    assert!(
        trail
            .iter()
            .any(|e| e.action == "device.suspect" && e.outcome == "counter_replay")
    );

    // The operator clears it. The same certificate renewed again for a
    // different key, with a fresh counter: a clone.
    admin::resume(h.registry(), &a.id, "test:ops", now())
        .await
        .unwrap();
    let clone = request(&a.id, "r4", &new_csr(), &a.serial, 10, &a.key);
    assert_eq!(
        send(&mut c, &a.id, Format::Cbor, &clone).await,
        Err("clone_suspected".into())
    );
    assert_eq!(
        h.registry().device(&a.id).await.unwrap().unwrap().status,
        DeviceStatus::Suspect
    );
    assert_eq!(
        h.registry().certificate_count(&a.id).await.unwrap(),
        2,
        "nothing issued"
    );
    h.gateway.shutdown().await;
}
