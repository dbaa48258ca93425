//! The simulator over real MQTT and real TLS, without the real gateway: rumqttd
//! routes, a tokio-rustls front terminates TLS with a test CA (verifying client
//! certificates when one is presented, as the gateway's front will), and the
//! sans-IO [`FakeGateway`] behind a plain MQTT client answers. This checks the
//! wiring of the agent to rumqttc: subscriptions before publishing,
//! retransmission on a lost request, TLS trust and client certificates, the
//! files written and the command line.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idgate_agent::RetryPolicy;
use idgate_hal::{KeySlot, KeyStore};
use idgate_sim::fake_gateway::Answer;
use idgate_sim::{EnrollOptions, FakeGateway, RenewOptions, SimError, SoftKeyStore, enroll, renew};
use rcgen::{CertificateParams, KeyPair};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const TOKEN: &str = "abcdefghijklmnopqrstuvwxyz234567";

/// The fake gateway, shared with its MQTT task.
type Gateway = Arc<Mutex<FakeGateway>>;
/// The client certificate each TLS connection presented (DER), in order.
type Presented = Arc<Mutex<Vec<Option<Vec<u8>>>>>;
/// What each TLS connection's client sent, decrypted, in order of
/// connection.
type Sent = Arc<Mutex<Vec<Vec<u8>>>>;

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

/// A TLS front for 127.0.0.1 with a certificate from the gateway's CA,
/// forwarding to `upstream`, and recording what each client sent. A client
/// certificate is optional; one that is presented must chain to the
/// gateway's CA.
async fn start_tls_front(gateway: &Gateway, upstream: SocketAddr) -> (SocketAddr, Presented, Sent) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let (certificate, roots) = {
        let gateway = gateway.lock().unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(gateway.ca_der().to_vec()))
            .unwrap();
        (params.signed_by(&key, gateway.issuer()).unwrap(), roots)
    };
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
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
    let presented = Presented::default();
    let sent = Sent::default();
    let (log, sent_log) = (presented.clone(), sent.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let (log, sent) = (log.clone(), sent_log.clone());
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let client = tls.get_ref().1.peer_certificates();
                let client = client.and_then(|chain| chain.first()).map(|c| c.to_vec());
                log.lock().unwrap().push(client);
                let Ok(plain) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let index = {
                    let mut sent = sent.lock().unwrap();
                    sent.push(Vec::new());
                    sent.len() - 1
                };
                let (mut tls_read, mut tls_write) = tokio::io::split(tls);
                let (mut plain_read, mut plain_write) = plain.into_split();
                let up = async {
                    let mut buffer = [0u8; 4096];
                    while let Ok(n @ 1..) = tls_read.read(&mut buffer).await {
                        sent.lock().unwrap()[index].extend_from_slice(&buffer[..n]);
                        if plain_write.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = plain_write.shutdown().await;
                };
                let down = async {
                    let _ = tokio::io::copy(&mut plain_read, &mut tls_write).await;
                    let _ = tls_write.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
    (address, presented, sent)
}

/// The MQTT packets in `bytes`, whole ones only.
fn packets(mut bytes: &[u8]) -> Vec<&[u8]> {
    let mut packets = Vec::new();
    while bytes.len() >= 2 {
        let (mut length, mut header) = (0usize, 1);
        loop {
            let Some(&byte) = bytes.get(header) else {
                return packets;
            };
            length |= usize::from(byte & 0x7f) << (7 * (header - 1));
            header += 1;
            if byte & 0x80 == 0 {
                break;
            }
        }
        let Some(packet) = bytes.get(..header + length) else {
            return packets;
        };
        packets.push(packet);
        bytes = &bytes[header + length..];
    }
    packets
}

/// Puts the fake gateway behind the broker: requests of every device and
/// operation in, replies out.
async fn start_fake_gateway(broker: SocketAddr, gateway: Gateway) {
    let mut options = MqttOptions::new("fake-gateway", "127.0.0.1", broker.port());
    options.set_max_packet_size(64 * 1024, 64 * 1024);
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    client
        .subscribe("idgate/v1/devices/+/+/cbor", QoS::AtLeastOnce)
        .await
        .unwrap();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut ready = Some(ready_tx);
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
                    let reply = gateway
                        .lock()
                        .unwrap()
                        .handle(&publish.topic, &publish.payload);
                    if let Some((topic, payload)) = reply {
                        client
                            .publish(topic, QoS::AtMostOnce, false, payload)
                            .await
                            .unwrap();
                    }
                }
                _ => {}
            }
        }
    });
    ready_rx.await.unwrap();
}

struct Setup {
    front: SocketAddr,
    ca_pem: String,
    gateway: Gateway,
    presented: Presented,
    sent: Sent,
}

/// A broker behind TLS with a fake gateway that drops the first `drop_first`
/// requests.
async fn setup(drop_first: usize) -> Setup {
    let mut fake = FakeGateway::new(TOKEN);
    fake.answers
        .extend(std::iter::repeat_n(Answer::Drop, drop_first));
    let ca_pem = fake.ca_pem().to_owned();
    let gateway = Arc::new(Mutex::new(fake));
    let broker = start_broker().await;
    let (front, presented, sent) = start_tls_front(&gateway, broker).await;
    start_fake_gateway(broker, gateway.clone()).await;
    Setup {
        front,
        ca_pem,
        gateway,
        presented,
        sent,
    }
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        initial_timeout_ms: 300,
        max_timeout_ms: 1_000,
        ..RetryPolicy::DEFAULT
    }
}

fn enroll_options(setup: &Setup, device_id: &str, token: &str) -> EnrollOptions {
    let mut options = EnrollOptions::new(
        setup.front.to_string(),
        setup.ca_pem.clone(),
        device_id,
        token,
    );
    options.timeout = Duration::from_secs(20);
    options.retry = fast_retry();
    options
}

/// The SPKI of the public key of a PKCS#8 PEM private key.
fn spki_of_key(key_pem: &str) -> Vec<u8> {
    let store = SoftKeyStore::from_current_key_pem(key_pem).unwrap();
    idgate_pki::csr::p256_spki(&store.public_key(KeySlot::Current).unwrap()).to_vec()
}

fn spki_of_certificate(der: &[u8]) -> Vec<u8> {
    idgate_pki::der::certificate_spki(der).unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolls_over_tls_after_a_lost_request() {
    let setup = setup(1).await;
    let enrolled = enroll(&enroll_options(&setup, "sim-0001", TOKEN))
        .await
        .unwrap();
    assert_eq!(enrolled.attempts, 2);
    assert_eq!(enrolled.serial, "010203");
    assert_eq!(enrolled.chain.len(), 1);
    // The exported key is the certified one.
    assert_eq!(
        spki_of_certificate(&enrolled.certificate),
        spki_of_key(&enrolled.key_pem)
    );
    // No client certificate to present yet.
    assert_eq!(*setup.presented.lock().unwrap(), vec![None]);
}

/// The device leaves with an MQTT DISCONNECT, the last thing it sends,
/// and before `enroll` returns: the broker ends the session as asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_says_disconnect_before_it_closes() {
    let setup = setup(0).await;
    enroll(&enroll_options(&setup, "sim-0004", TOKEN))
        .await
        .unwrap();
    let sent = setup.sent.lock().unwrap();
    assert_eq!(sent.len(), 1);
    let packets = packets(&sent[0]);
    assert_eq!(packets.first().map(|p| p[0]), Some(0x10), "CONNECT first");
    assert_eq!(
        packets.last(),
        Some(&&[0xe0, 0][..]),
        "DISCONNECT last, of {} packets",
        packets.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejection_is_reported() {
    let setup = setup(0).await;
    match enroll(&enroll_options(&setup, "sim-0002", "wrong")).await {
        Err(e @ SimError::Rejected { .. }) => {
            assert_eq!(e.to_string(), "rejected: bad_proof: fake gateway says no")
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_server_is_refused() {
    let setup = setup(0).await;
    let mut options = enroll_options(&setup, "sim-0003", TOKEN);
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    (params.distinguished_name).push(rcgen::DnType::CommonName, "someone else");
    let other = params.self_signed(&KeyPair::generate().unwrap()).unwrap();
    options.ca_pem = other.pem().into_bytes();
    match enroll(&options).await {
        Err(SimError::Connection(e)) => assert!(e.to_string().contains("UnknownIssuer"), "{e}"),
        other => panic!("expected a TLS failure, got {other:?}"),
    }
}

fn renew_options(
    setup: &Setup,
    device_id: &str,
    key_pem: &str,
    certificate_pem: String,
    counter: u64,
) -> RenewOptions {
    let mut options = RenewOptions::new(
        setup.front.to_string(),
        setup.ca_pem.clone(),
        device_id,
        key_pem,
        certificate_pem,
        counter,
    );
    options.timeout = Duration::from_secs(20);
    options.retry = fast_retry();
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renews_with_the_current_certificate_as_client_certificate() {
    let setup = setup(0).await;
    let enrolled = enroll(&enroll_options(&setup, "sim-0010", TOKEN))
        .await
        .unwrap();
    // A lost renew request on the way, to see the retransmission over MQTT.
    setup
        .gateway
        .lock()
        .unwrap()
        .answers
        .push_back(Answer::Drop);
    let certificate_pem = enrolled.certificate_pem() + &enrolled.chain_pem();
    let options = renew_options(&setup, "sim-0010", &enrolled.key_pem, certificate_pem, 1);
    let renewed = renew(&options).await.unwrap();
    assert!(renewed.client_certificate);
    assert_eq!(renewed.previous_serial, enrolled.serial);
    assert_eq!(renewed.serial, renewed.certified.serial);
    assert_eq!(renewed.counter, 1);
    let certified = &renewed.certified;
    assert_eq!(certified.attempts, 2);
    assert_ne!(certified.serial, enrolled.serial);
    // A new key, and the new certificate is for it.
    assert_ne!(
        spki_of_key(&certified.key_pem),
        spki_of_key(&enrolled.key_pem)
    );
    assert_eq!(
        spki_of_certificate(&certified.certificate),
        spki_of_key(&certified.key_pem)
    );
    // The front saw the old certificate on the renewal's connection; the fake
    // issued only after checking the signature against it.
    assert_eq!(
        *setup.presented.lock().unwrap(),
        vec![None, Some(enrolled.certificate.clone())]
    );
    let gateway = setup.gateway.lock().unwrap();
    assert_eq!((gateway.issued, gateway.counter("sim-0010")), (2, Some(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_certificate_renews_anonymously() {
    let setup = setup(0).await;
    let mut store = SoftKeyStore::new();
    store.generate_next().unwrap();
    store.promote_next().unwrap();
    let key_pem = store.current_key_pem().unwrap();
    let public_key = store.public_key(KeySlot::Current).unwrap();
    // Valid for one hour in 2023.
    let (certificate, serial) = setup.gateway.lock().unwrap().issue(
        "sim-0011",
        &public_key,
        (1_700_000_000, 1_700_003_600),
    );
    let certificate_pem = idgate_pki::ca::to_pem(&[&certificate]);
    let options = renew_options(&setup, "sim-0011", &key_pem, certificate_pem, 5);
    let renewed = renew(&options).await.unwrap();
    assert!(!renewed.client_certificate);
    assert_eq!(renewed.previous_serial, serial);
    assert_eq!(*setup.presented.lock().unwrap(), vec![None]);
    assert_eq!(
        spki_of_certificate(&renewed.certified.certificate),
        spki_of_key(&renewed.certified.key_pem)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_rejection_is_reported() {
    let setup = setup(0).await;
    let enrolled = enroll(&enroll_options(&setup, "sim-0012", TOKEN))
        .await
        .unwrap();
    setup.gateway.lock().unwrap().set_counter("sim-0012", 9);
    let options = renew_options(
        &setup,
        "sim-0012",
        &enrolled.key_pem,
        enrolled.certificate_pem(),
        9,
    );
    match renew(&options).await {
        Err(e @ SimError::Rejected { .. }) => {
            assert_eq!(
                e.to_string(),
                "rejected: counter_replay: fake gateway says no"
            )
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
}

/// Runs the `idgate-sim` binary.
fn sim(args: &[&str], ca_file: &Path, token: &str) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_idgate-sim"))
        .args(args)
        .arg("--ca")
        .arg(ca_file)
        .args(["--timeout", "20"])
        .env("IDGATE_TOKEN", token)
        .output()
        .unwrap()
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap()
}

fn key_mode(dir: &Path) -> u32 {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(dir.join("key.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    }
    #[cfg(not(unix))]
    0o600
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_line_enrolls_and_reports_rejections() {
    let setup = setup(0).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &setup.ca_pem).unwrap();
    let out = dir.path().join("device");
    let broker = setup.front.to_string();
    let (ok, rejected) = tokio::task::spawn_blocking({
        let (ca_file, out) = (ca_file.clone(), out.clone());
        move || {
            let args = [
                "enroll",
                "--broker",
                &broker,
                "--id",
                "sim-0004",
                "--out",
                out.to_str().unwrap(),
            ];
            (sim(&args, &ca_file, TOKEN), sim(&args, &ca_file, "wrong"))
        }
    })
    .await
    .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("serial: 010203"));
    for file in ["key.pem", "cert.pem", "chain.pem"] {
        assert!(out.join(file).exists(), "{file}");
    }
    assert_eq!(key_mode(&out), 0o600);
    assert_eq!(rejected.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&rejected.stderr).trim(),
        "rejected: bad_proof: fake gateway says no"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_line_renews_and_keeps_the_counter_growing() {
    let setup = setup(0).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &setup.ca_pem).unwrap();
    let device = dir.path().join("device");
    enroll(&enroll_options(&setup, "sim-0020", TOKEN))
        .await
        .unwrap()
        .write_files(&device)
        .unwrap();
    let enrolled_cert = read(&device, "cert.pem");
    let broker = setup.front.to_string();
    let run = {
        let (ca_file, device) = (ca_file.clone(), device.clone());
        move |broker: &str| {
            let args = [
                "renew",
                "--broker",
                broker,
                "--id",
                "sim-0020",
                "--dir",
                device.to_str().unwrap(),
            ];
            sim(&args, &ca_file, "")
        }
    };

    // Two renewals: counter 1, then 2; files replaced each time.
    let (first, before_second, second) = tokio::task::spawn_blocking({
        let (run, broker, device) = (run.clone(), broker.clone(), device.clone());
        move || {
            let first = run(&broker);
            let before_second = (read(&device, "key.pem"), read(&device, "cert.pem"));
            (first, before_second, run(&broker))
        }
    })
    .await
    .unwrap();
    for output in [&first, &second] {
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            stdout.contains("connected: with the current certificate"),
            "{stdout}"
        );
    }
    assert!(String::from_utf8_lossy(&first.stdout).contains("counter: 1"));
    assert!(String::from_utf8_lossy(&second.stdout).contains("counter: 2"));
    assert_eq!(read(&device, "counter"), "2\n");
    assert_ne!(before_second.1, enrolled_cert);
    assert_ne!(read(&device, "cert.pem"), before_second.1);
    assert_ne!(read(&device, "key.pem"), before_second.0);
    assert_eq!(key_mode(&device), 0o600);
    let certificate = rustls_pemfile::certs(&mut read(&device, "cert.pem").as_bytes())
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(
        spki_of_certificate(&certificate),
        spki_of_key(&read(&device, "key.pem"))
    );
    assert!(read(&device, "chain.pem").contains("BEGIN CERTIFICATE"));
    assert_eq!(setup.gateway.lock().unwrap().counter("sim-0020"), Some(2));

    // A rejection (the gateway has seen counter 50) and an unreachable broker:
    // exit 2 and 1, the files untouched, the counter advanced all the same.
    setup.gateway.lock().unwrap().set_counter("sim-0020", 50);
    let files = ["key.pem", "cert.pem", "chain.pem"].map(|name| read(&device, name));
    let unreachable = format!("127.0.0.1:{}", free_port().port());
    let (rejected, failed) = tokio::task::spawn_blocking(move || (run(&broker), run(&unreachable)))
        .await
        .unwrap();
    assert_eq!(rejected.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&rejected.stderr).trim(),
        "rejected: counter_replay: fake gateway says no"
    );
    assert_eq!(
        failed.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&failed.stderr)
    );
    assert_eq!(
        ["key.pem", "cert.pem", "chain.pem"].map(|name| read(&device, name)),
        files
    );
    assert_eq!(read(&device, "counter"), "4\n");
    // No temporary files left behind.
    let mut names: Vec<String> = std::fs::read_dir(&device)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["cert.pem", "chain.pem", "counter", "key.pem"]);
}
