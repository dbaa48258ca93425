//! Bad input over the real MQTT/TLS path: each gets its rejection code,
//! nothing is issued, the refusal is audited, and the gateway goes on serving.

use std::process::Command;

use idgate_gateway::testing::TestDatabase;
use idgate_pki::protocol::{EnrollRequest, Format, MAX_PAYLOAD, Reply, enrollment_proof};
use idgate_pki::wire::{decode_issued, decode_rejected, encode_enroll};
use idgate_tests::{Harness, RawClient};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384};

crate::on_both_backends!(
    every_bad_request_is_refused_with_its_code,
    repeated_rid_returns_the_same_certificate,
);

fn csr(key: &KeyPair) -> Vec<u8> {
    CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(key)
        .unwrap()
        .der()
        .to_vec()
}

fn p256() -> KeyPair {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap()
}

fn request(format: Format, rid: &str, csr: &[u8], token: &str) -> Vec<u8> {
    let proof = enrollment_proof(token.as_bytes(), csr);
    encode_enroll(
        format,
        &EnrollRequest {
            rid,
            csr,
            proof: &proof,
        },
    )
}

/// An RSA CSR made by openssl (which also adds extensions to the request).
fn openssl_rsa_csr() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("rsa.csr");
    let status = Command::new("openssl")
        .args([
            "req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=rsa", "-outform", "DER",
        ])
        .arg("-keyout")
        .arg(dir.path().join("rsa.key"))
        .arg("-out")
        .arg(&out)
        .output()
        .expect("openssl is installed (.ci/run installs it)");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    std::fs::read(out).unwrap()
}

async fn expect_rejected(
    client: &mut RawClient,
    device: &str,
    format: Format,
    payload: Vec<u8>,
    code: &str,
    rid: &str,
) {
    let (reply, body) = client.enroll(device, format, payload).await;
    assert_eq!(reply, Reply::Rejected, "expected {code}");
    let rejected = decode_rejected(format, &body).unwrap();
    assert_eq!(rejected.code, code, "{}", rejected.message);
    assert_eq!(rejected.rid, rid, "the rejection names the request");
    assert!(!rejected.message.is_empty());
}

async fn every_bad_request_is_refused_with_its_code(db: TestDatabase) {
    let Some(h) = Harness::start(db).await else {
        return;
    };
    let token = h.add_device("victim", "berlin").await;
    let other_token = h.add_device("bystander", "berlin").await;
    let mut c = h.client("tester").await;

    // Garbage and truncated payloads, in both formats.
    expect_rejected(
        &mut c,
        "victim",
        Format::Json,
        b"{not json".to_vec(),
        "malformed",
        "",
    )
    .await;
    expect_rejected(
        &mut c,
        "victim",
        Format::Cbor,
        vec![0xff, 0x00, 0x13],
        "malformed",
        "",
    )
    .await;
    let good = request(Format::Cbor, "r1", &csr(&p256()), &token);
    expect_rejected(
        &mut c,
        "victim",
        Format::Cbor,
        good[..good.len() / 2].to_vec(),
        "malformed",
        "",
    )
    .await;
    expect_rejected(
        &mut c,
        "victim",
        Format::Json,
        br#"{"rid":"r1","csr":"MAA="}"#.to_vec(),
        "malformed",
        "r1",
    )
    .await;

    // Oversized payload.
    let huge = vec![b'x'; MAX_PAYLOAD + 4096];
    expect_rejected(&mut c, "victim", Format::Json, huge, "too_large", "").await;

    // Unknown device.
    let stranger = csr(&p256());
    expect_rejected(
        &mut c,
        "nobody",
        Format::Json,
        request(Format::Json, "r1", &stranger, &token),
        "unknown_device",
        "r1",
    )
    .await;

    // Wrong proof: bystander's token on victim's topic.
    let key = p256();
    let victim_csr = csr(&key);
    expect_rejected(
        &mut c,
        "victim",
        Format::Json,
        request(Format::Json, "r2", &victim_csr, &other_token),
        "bad_proof",
        "r2",
    )
    .await;

    // A CSR whose self-signature is broken (the proof covers the broken bytes).
    let mut broken = csr(&p256());
    let at = broken.len() - 5;
    broken[at] ^= 0x40;
    expect_rejected(
        &mut c,
        "victim",
        Format::Cbor,
        request(Format::Cbor, "r3", &broken, &token),
        "bad_csr",
        "r3",
    )
    .await;
    expect_rejected(
        &mut c,
        "victim",
        Format::Cbor,
        request(Format::Cbor, "r4", b"\x30\x03\x02\x01\x00", &token),
        "bad_csr",
        "r4",
    )
    .await;

    // Unsupported curve and algorithm.
    let p384 = csr(&KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap());
    expect_rejected(
        &mut c,
        "victim",
        Format::Json,
        request(Format::Json, "r5", &p384, &token),
        "weak_key",
        "r5",
    )
    .await;
    expect_rejected(
        &mut c,
        "victim",
        Format::Json,
        request(Format::Json, "r6", &openssl_rsa_csr(), &token),
        "weak_key",
        "r6",
    )
    .await;

    // None of that issued anything or consumed the token: a proper request works.
    assert_eq!(h.registry().certificate_count("victim").await.unwrap(), 0);
    let (reply, body) = c
        .enroll(
            "victim",
            Format::Json,
            request(Format::Json, "ok", &victim_csr, &token),
        )
        .await;
    assert_eq!(reply, Reply::Accepted, "{}", String::from_utf8_lossy(&body));
    decode_issued(Format::Json, &body).unwrap();

    // The token works once.
    expect_rejected(
        &mut c,
        "victim",
        Format::Json,
        request(Format::Json, "again", &csr(&p256()), &token),
        "token_used",
        "again",
    )
    .await;
    // A reused rid with a different CSR.
    expect_rejected(
        &mut c,
        "victim",
        Format::Json,
        request(Format::Json, "ok", &csr(&p256()), &token),
        "rid_conflict",
        "ok",
    )
    .await;
    // The victim's key, presented by another device.
    expect_rejected(
        &mut c,
        "bystander",
        Format::Cbor,
        request(Format::Cbor, "b1", &victim_csr, &other_token),
        "key_reused",
        "b1",
    )
    .await;
    assert_eq!(
        h.registry().certificate_count("bystander").await.unwrap(),
        0
    );
    assert_eq!(h.registry().certificate_count("victim").await.unwrap(), 1);

    // Every refusal is in the audit log with its code.
    let outcomes: Vec<String> = h
        .registry()
        .audit_trail("victim")
        .await
        .unwrap()
        .into_iter()
        .filter(|a| a.action == "enroll")
        .map(|a| a.outcome)
        .collect();
    for code in [
        "malformed",
        "too_large",
        "bad_proof",
        "bad_csr",
        "weak_key",
        "token_used",
        "rid_conflict",
        "ok",
    ] {
        assert!(
            outcomes.iter().any(|o| o == code),
            "{code} not audited: {outcomes:?}"
        );
    }
    let unknown = h.registry().audit_trail("nobody").await.unwrap();
    assert_eq!(unknown[0].outcome, "unknown_device");
    let bystander = h.registry().audit_trail("bystander").await.unwrap();
    assert!(bystander.iter().any(|a| a.outcome == "key_reused"));

    // And the bystander still enrolls with its own key.
    let (reply, _) = c
        .enroll(
            "bystander",
            Format::Cbor,
            request(Format::Cbor, "b2", &csr(&p256()), &other_token),
        )
        .await;
    assert_eq!(reply, Reply::Accepted);
    h.gateway.shutdown().await;
}

async fn repeated_rid_returns_the_same_certificate(db: TestDatabase) {
    let Some(h) = Harness::start(db).await else {
        return;
    };
    let token = h.add_device("d1", "paris").await;
    let mut c = h.client("d1").await;
    let der = csr(&p256());
    let mut serials = Vec::new();
    for format in [Format::Json, Format::Cbor, Format::Json] {
        let (reply, body) = c
            .enroll("d1", format, request(format, "same", &der, &token))
            .await;
        assert_eq!(reply, Reply::Accepted);
        let issued = decode_issued(format, &body).unwrap();
        assert_eq!(issued.rid, "same");
        serials.push(issued.serial);
    }
    assert!(serials.windows(2).all(|w| w[0] == w[1]), "{serials:?}");
    assert_eq!(h.registry().certificate_count("d1").await.unwrap(), 1);
    h.gateway.shutdown().await;
}
