//! The simulator over real MQTT and real TLS, without the real gateway: rumqttd
//! routes, a tokio-rustls front terminates TLS with a test CA, and a fake gateway
//! (a plain MQTT client issuing with rcgen) answers. This checks the wiring of
//! the agent to rumqttc: subscriptions before publishing, retransmission on a
//! lost request, TLS trust, the files written and the command line.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use idgate_agent::RetryPolicy;
use idgate_pki::protocol::{EnrollRequest, Issued, Rejected, Topic, verify_enrollment_proof};
use idgate_sim::{EnrollOptions, SimError, enroll};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256,
    PublicKeyData, SignatureAlgorithm,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const TOKEN: &str = "abcdefghijklmnopqrstuvwxyz234567";

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
    der: Vec<u8>,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let certificate = params.self_signed(&key).unwrap();
    Ca {
        pem: certificate.pem(),
        der: certificate.der().to_vec(),
        issuer: Issuer::new(params, key),
    }
}

struct CsrKey(Vec<u8>);

impl PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

fn free_port() -> SocketAddr {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Starts rumqttd (plain MQTT 3.1.1 on loopback); returns its address.
async fn start_broker() -> SocketAddr {
    let address = free_port();
    let server = ServerSettings {
        name: "v4".into(),
        listen: address,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: 64 * 1024,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 100,
            max_outgoing_packet_count: 200,
            max_segment_size: 1024 * 1024,
            max_segment_count: 4,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("v4".to_owned(), server)])),
        ..Config::default()
    };
    let mut broker = Broker::new(config);
    std::thread::spawn(move || {
        if let Err(e) = broker.start() {
            eprintln!("rumqttd stopped: {e}");
        }
    });
    for _ in 0..1000 {
        if tokio::net::TcpStream::connect(address).await.is_ok() {
            return address;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("rumqttd did not start");
}

/// A TLS front for 127.0.0.1 with a certificate from `ca`, forwarding to `upstream`.
async fn start_tls_front(ca: &Ca, upstream: SocketAddr) -> SocketAddr {
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let certificate = params.signed_by(&key, &ca.issuer).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from(certificate.der().to_vec())],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    address
}

/// Answers enroll requests: drops the first `drop_first`, then issues (or
/// rejects a bad proof), answering a repeated rid the same way.
async fn start_fake_gateway(broker: SocketAddr, ca: Ca, drop_first: usize) {
    let mut options = MqttOptions::new("fake-gateway", "127.0.0.1", broker.port());
    options.set_max_packet_size(64 * 1024, 64 * 1024);
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    client
        .subscribe("idgate/v1/devices/+/enroll/cbor", QoS::AtLeastOnce)
        .await
        .unwrap();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        let mut seen = 0;
        let mut replies: HashMap<String, (String, Vec<u8>)> = HashMap::new();
        loop {
            let event = match eventloop.poll().await {
                Ok(event) => event,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match event {
                Event::Incoming(Packet::SubAck(_)) => {
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(());
                    }
                }
                Event::Incoming(Packet::Publish(publish)) => {
                    seen += 1;
                    if seen <= drop_first {
                        continue;
                    }
                    let topic = Topic::parse(&publish.topic).unwrap();
                    let request = EnrollRequest::decode_cbor(&publish.payload).unwrap();
                    let reply = replies
                        .entry(request.rid.to_owned())
                        .or_insert_with(|| answer(&ca, topic, &request))
                        .clone();
                    client
                        .publish(reply.0, QoS::AtMostOnce, false, reply.1)
                        .await
                        .unwrap();
                }
                _ => {}
            }
        }
    });
    ready_rx.await.unwrap();
}

fn answer(ca: &Ca, topic: Topic<'_>, request: &EnrollRequest<'_>) -> (String, Vec<u8>) {
    let mut out = vec![0u8; 8192];
    if !verify_enrollment_proof(TOKEN.as_bytes(), request.csr, request.proof) {
        let n = Rejected {
            rid: request.rid,
            code: "bad_proof",
            message: "the proof does not match",
        }
        .encode_cbor(&mut out)
        .unwrap();
        out.truncate(n);
        let topic = topic.with_reply(idgate_pki::protocol::Reply::Rejected);
        return (topic.to_string(), out);
    }
    use x509_parser::prelude::FromDer;
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(request.csr)
            .unwrap();
    csr.verify_signature().unwrap();
    let public_key = csr
        .certification_request_info
        .subject_pki
        .subject_public_key
        .data
        .to_vec();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, topic.device_id);
    params.serial_number = Some(vec![0x01, 0x02, 0x03].into());
    let certificate = params.signed_by(&CsrKey(public_key), &ca.issuer).unwrap();
    let mut chain = heapless::Vec::new();
    chain.push(&ca.der[..]).unwrap();
    let n = Issued {
        rid: request.rid,
        certificate: certificate.der(),
        chain,
        serial: "010203",
        not_before: 1_700_000_000,
        not_after: 1_700_086_400,
        time: 1_700_000_300,
        renew_after: 1_700_043_200,
        renew_before: 1_700_069_120,
    }
    .encode_cbor(&mut out)
    .unwrap();
    out.truncate(n);
    let topic = topic.with_reply(idgate_pki::protocol::Reply::Accepted);
    (topic.to_string(), out)
}

/// A broker behind TLS with a fake gateway; returns the TLS address and the CA PEM.
async fn setup(drop_first: usize) -> (SocketAddr, String) {
    let ca = ca("test root");
    let broker = start_broker().await;
    let front = start_tls_front(&ca, broker).await;
    let pem = ca.pem.clone();
    start_fake_gateway(broker, ca, drop_first).await;
    (front, pem)
}

fn fast(options: &mut EnrollOptions) {
    options.timeout = Duration::from_secs(20);
    options.retry = RetryPolicy {
        initial_timeout_ms: 300,
        max_timeout_ms: 1_000,
        ..RetryPolicy::DEFAULT
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolls_over_tls_after_a_lost_request() {
    let (front, ca_pem) = setup(1).await;
    let mut options = EnrollOptions::new(front.to_string(), ca_pem, "sim-0001", TOKEN);
    fast(&mut options);
    let enrolled = enroll(&options).await.unwrap();
    assert_eq!(enrolled.attempts, 2);
    assert_eq!(enrolled.serial, "010203");
    assert_eq!(enrolled.chain.len(), 1);

    // The exported key is the certified one.
    use p256::pkcs8::DecodePrivateKey;
    let key = p256::ecdsa::SigningKey::from_pkcs8_pem(&enrolled.key_pem).unwrap();
    let point = key.verifying_key().to_encoded_point(false);
    let spki = idgate_pki::der::certificate_spki(&enrolled.certificate).unwrap();
    assert_eq!(
        spki,
        &idgate_pki::csr::p256_spki(point.as_bytes().try_into().unwrap())[..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejection_is_reported() {
    let (front, ca_pem) = setup(0).await;
    let mut options = EnrollOptions::new(front.to_string(), ca_pem, "sim-0002", "wrong");
    fast(&mut options);
    match enroll(&options).await {
        Err(e @ SimError::Rejected { .. }) => assert_eq!(
            e.to_string(),
            "rejected: bad_proof: the proof does not match"
        ),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_server_is_refused() {
    let (front, _) = setup(0).await;
    let other = ca("someone else");
    let mut options = EnrollOptions::new(front.to_string(), other.pem, "sim-0003", TOKEN);
    fast(&mut options);
    match enroll(&options).await {
        Err(SimError::Connection(e)) => assert!(e.to_string().contains("UnknownIssuer"), "{e}"),
        other => panic!("expected a TLS failure, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_line_writes_files_and_reports_rejections() {
    let (front, ca_pem) = setup(0).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let out = dir.path().join("device");
    let run = move |token: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_idgate-sim"))
            .args(["enroll", "--broker", &front.to_string(), "--id", "sim-0004"])
            .arg("--ca")
            .arg(&ca_file)
            .arg("--out")
            .arg(&out)
            .args(["--timeout", "20"])
            .env("IDGATE_TOKEN", token)
            .output()
            .unwrap()
    };
    let output = tokio::task::spawn_blocking(move || (run(TOKEN), run("wrong")))
        .await
        .unwrap();
    let (ok, rejected) = output;
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("serial: 010203"));
    let out = dir.path().join("device");
    for file in ["key.pem", "cert.pem", "chain.pem"] {
        assert!(out.join(file).exists(), "{file}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert_eq!(rejected.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&rejected.stderr).trim(),
        "rejected: bad_proof: the proof does not match"
    );
}
