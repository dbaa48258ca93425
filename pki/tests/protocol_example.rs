//! The worked example in `docs/protocol.md` is computed here, from a fixed test
//! key and token, and the document must contain every value. Run with
//! `IDGATE_PRINT_EXAMPLE=1 cargo test -p idgate-pki --test protocol_example -- --nocapture`
//! to print the values after a protocol change.

use idgate_pki::csr::{MAX_P256_CSR, build_p256_csr};
use idgate_pki::protocol::{
    EnrollRequest, Format, MAX_RENEW_MESSAGE, Op, RenewRequest, Topic, enrollment_proof,
    renew_message,
};
use idgate_pki::wire::{encode_enroll, encode_renew};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::signature::hazmat::PrehashSigner;
use p256::ecdsa::{Signature, SigningKey};
use sha2::{Digest, Sha256};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex wrapped at 64 characters, as the document prints long values.
fn wrapped(bytes: &[u8]) -> String {
    hex(bytes)
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("hex is ASCII"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn worked_example_in_the_protocol_document_is_true() {
    // TEST KEY: published in docs/protocol.md; never use it on a device.
    let key = SigningKey::from_bytes(&[0x11u8; 32].into()).unwrap();
    let public: [u8; 65] = key
        .verifying_key()
        .to_encoded_point(false)
        .as_bytes()
        .try_into()
        .unwrap();
    let device_id = "sensor-0001";
    let token = "abcdefghijklmnopqrstuvwxyz234567";
    let rid = "0123456789abcdef";

    let mut buf = [0u8; MAX_P256_CSR];
    // RFC 6979 signatures: the same key and message give the same bytes.
    let n = build_p256_csr(
        device_id,
        &public,
        |digest| {
            let signature: Signature = key.sign_prehash(digest)?;
            Ok::<_, p256::ecdsa::Error>(signature.to_bytes().into())
        },
        &mut buf,
    )
    .unwrap();
    let csr = &buf[..n];
    let csr_hash = Sha256::digest(csr);
    let proof = enrollment_proof(token.as_bytes(), csr);
    let request = EnrollRequest {
        rid,
        csr,
        proof: &proof,
    };
    let cbor = encode_enroll(Format::Cbor, &request);
    let json = String::from_utf8(encode_enroll(Format::Json, &request)).unwrap();
    let topic = Topic::request(device_id, Op::Enroll, Format::Cbor).to_string();

    // Renewal: the same key as the current one, renewing certificate
    // 4a1f…, for a new key 0x22…22, with counter 1.
    let new_key = SigningKey::from_bytes(&[0x22u8; 32].into()).unwrap();
    let new_public: [u8; 65] = new_key
        .verifying_key()
        .to_encoded_point(false)
        .as_bytes()
        .try_into()
        .unwrap();
    let mut new_buf = [0u8; MAX_P256_CSR];
    let n = build_p256_csr(
        device_id,
        &new_public,
        |digest| {
            let signature: Signature = new_key.sign_prehash(digest)?;
            Ok::<_, p256::ecdsa::Error>(signature.to_bytes().into())
        },
        &mut new_buf,
    )
    .unwrap();
    let new_csr = &new_buf[..n];
    let serial = "4a1f6b3c9d8e7f60514233241506f7e8";
    let renew_rid = "fedcba9876543210";
    let mut message = [0u8; MAX_RENEW_MESSAGE];
    let len = renew_message(device_id, renew_rid, new_csr, serial, 1, &mut message).unwrap();
    let message = &message[..len];
    let renew_signature: Signature = key.sign(message);
    let sig: [u8; 64] = renew_signature.to_bytes().into();
    let renew = RenewRequest {
        rid: renew_rid,
        csr: new_csr,
        serial,
        counter: 1,
        sig: &sig,
    };
    let renew_cbor = encode_renew(Format::Cbor, &renew);

    let values = [
        ("public key", wrapped(&public)),
        ("CSR", wrapped(csr)),
        ("SHA-256(CSR)", hex(&csr_hash)),
        ("proof", hex(&proof)),
        ("CBOR request", wrapped(&cbor)),
        ("JSON request", json),
        ("topic", topic),
        ("renewal CSR", wrapped(new_csr)),
        ("renewal message", wrapped(message)),
        ("renewal signature", wrapped(&sig)),
        ("CBOR renew request", wrapped(&renew_cbor)),
    ];
    if std::env::var_os("IDGATE_PRINT_EXAMPLE").is_some() {
        for (name, value) in &values {
            println!("--- {name}\n{value}");
        }
    }
    let document =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md"))
            .expect("docs/protocol.md");
    for (name, value) in &values {
        assert!(
            document.contains(value.as_str()),
            "docs/protocol.md does not contain the example's {name}:\n{value}"
        );
    }
}
