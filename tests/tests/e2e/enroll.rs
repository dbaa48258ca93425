//! Devices enroll over MQTT/TLS with the simulator (the real agent state
//! machine), and every certificate checks out with independent verifiers.

use std::process::Command;

use idgate_gateway::registry::DeviceStatus;
use idgate_gateway::testing::TestDatabase;
use idgate_pki::ca::{pem_certificates, to_pem};
use idgate_sim::{EnrollOptions, enroll};
use idgate_tests::Harness;
use x509_parser::prelude::{FromDer, X509Certificate};

crate::on_both_backends!(fifty_devices_enroll_concurrently);

const DEVICES: usize = 50;

async fn fifty_devices_enroll_concurrently(db: TestDatabase) {
    let Some(harness) = Harness::start(db).await else {
        return;
    };
    let root_pem = std::fs::read(harness.root_ca()).unwrap();
    let mut tokens = Vec::new();
    for i in 0..DEVICES {
        let id = format!("sensor-{i:03}");
        let token = harness
            .add_device(&id, if i % 2 == 0 { "berlin" } else { "paris" })
            .await;
        tokens.push((id, token));
    }

    let mut tasks = tokio::task::JoinSet::new();
    for (id, token) in tokens.clone() {
        let options = EnrollOptions::new(harness.broker(), root_pem.clone(), id.clone(), token);
        tasks.spawn(async move { (id, enroll(&options).await) });
    }
    let mut enrolled = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (id, result) = joined.unwrap();
        let result = result.unwrap_or_else(|e| panic!("{id} failed to enroll: {e}"));
        enrolled.push((id, result));
    }
    assert_eq!(enrolled.len(), DEVICES);

    let dir = tempfile::tempdir().unwrap();
    let root_der = pem_certificates(std::str::from_utf8(&root_pem).unwrap())
        .unwrap()
        .remove(0);
    let mut files = Vec::new();
    for (id, result) in &enrolled {
        // The registry recorded exactly this certificate, and the device is active.
        let device = harness.registry().device(id).await.unwrap().unwrap();
        assert_eq!(device.status, DeviceStatus::Active, "{id}");
        let recorded = harness.registry().certificates(id).await.unwrap();
        assert_eq!(recorded.len(), 1, "{id}");
        assert_eq!(recorded[0].der, result.certificate, "{id}");
        assert_eq!(recorded[0].serial, result.serial, "{id}");
        let trail = harness.registry().audit_trail(id).await.unwrap();
        assert!(
            trail
                .iter()
                .any(|a| a.action == "enroll" && a.outcome == "ok"),
            "{id}"
        );

        // The profile: CN = id, ≤ 24 h, clientAuth, CA:FALSE, serial ≥ 64 bits.
        let (_, x509) = X509Certificate::from_der(&result.certificate).unwrap();
        let cn = x509.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), id);
        let validity = x509.validity();
        let lifetime = validity.not_after.timestamp() - validity.not_before.timestamp();
        assert!(lifetime <= 24 * 3600 + 300, "{id}: {lifetime} s");
        assert!(
            x509.extended_key_usage()
                .unwrap()
                .unwrap()
                .value
                .client_auth
        );
        assert!(!x509.basic_constraints().unwrap().unwrap().value.ca);
        assert!(x509.raw_serial().len() * 8 >= 64);

        // Independent verifier 1: webpki, for client authentication, now.
        let end_entity = rustls::pki_types::CertificateDer::from(result.certificate.as_slice());
        let anchor = webpki::anchor_from_trusted_cert(&rustls::pki_types::CertificateDer::from(
            root_der.as_slice(),
        ))
        .unwrap()
        .to_owned();
        let intermediates: Vec<_> = result
            .chain
            .iter()
            .map(|c| rustls::pki_types::CertificateDer::from(c.as_slice()))
            .collect();
        webpki::EndEntityCert::try_from(&end_entity)
            .unwrap()
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &[anchor],
                &intermediates,
                rustls::pki_types::UnixTime::now(),
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .unwrap_or_else(|e| panic!("{id}: webpki refuses the chain: {e}"));

        let file = dir.path().join(format!("{id}.pem"));
        std::fs::write(&file, to_pem(&[&result.certificate])).unwrap();
        files.push(file);
    }

    // Independent verifier 2: openssl, as the README tells users to check.
    let chain = dir.path().join("chain.pem");
    let chain_refs: Vec<&[u8]> = enrolled[0].1.chain.iter().map(Vec::as_slice).collect();
    std::fs::write(&chain, to_pem(&chain_refs)).unwrap();
    let output = Command::new("openssl")
        .arg("verify")
        .arg("-purpose")
        .arg("sslclient")
        .arg("-CAfile")
        .arg(harness.root_ca())
        .arg("-untrusted")
        .arg(&chain)
        .args(&files)
        .output()
        .expect("openssl is installed (.ci/run installs it)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "openssl verify: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| l.ends_with(": OK")).count(),
        DEVICES,
        "{stdout}"
    );

    // Every serial is distinct.
    let mut serials: Vec<_> = enrolled.iter().map(|(_, r)| r.serial.clone()).collect();
    serials.sort();
    serials.dedup();
    assert_eq!(serials.len(), DEVICES);
    harness.gateway.shutdown().await;
}
