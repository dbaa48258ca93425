//! End-to-end test support: an in-process gateway on `127.0.0.1:0` with a
//! throwaway data directory and registry, device registration, and a raw MQTT
//! client over real TLS for sending whatever bytes a test needs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use idgate_gateway::datadir::DataDir;
use idgate_gateway::gateway::{Gateway, Settings};
use idgate_gateway::registry::{NewDevice, Registry, now};
use idgate_gateway::testing::{TestDatabase, TestRegistryUrl, registry_url};
pub use idgate_pki;
use idgate_pki::protocol::{Format, Op, Reply, Topic};
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};

/// A gateway running in this process, and what it needs to stay alive.
#[allow(missing_debug_implementations)] // holds the gateway and temp dirs; nothing to print
pub struct Harness {
    /// The gateway.
    pub gateway: Gateway,
    /// Its data directory.
    pub data: DataDir,
    /// The registry URL it uses.
    pub database_url: String,
    _dir: tempfile::TempDir,
    _registry: TestRegistryUrl,
}

impl Harness {
    /// Starts a gateway on `database`; `None` when PostgreSQL tests are skipped.
    pub async fn start(database: TestDatabase) -> Option<Harness> {
        Harness::start_with(database, |_| {}).await
    }

    /// Starts a gateway on `database` with settings adjusted by `adjust`.
    pub async fn start_with(
        database: TestDatabase,
        adjust: impl FnOnce(&mut Settings),
    ) -> Option<Harness> {
        let registry = registry_url(database).await?;
        let dir = tempfile::tempdir().expect("temporary directory");
        let data = DataDir::new(dir.path().join("data"));
        let mut settings = Settings::new(data.clone());
        settings.database_url = Some(registry.url.clone());
        settings.mqtt_listen = "127.0.0.1:0".parse().expect("address");
        settings.http_listen = "127.0.0.1:0".parse().expect("address");
        settings.admin.listen = "127.0.0.1:0".parse().expect("address");
        adjust(&mut settings);
        let gateway = Gateway::start(settings).await.expect("gateway starts");
        Some(Harness {
            gateway,
            data,
            database_url: registry.url.clone(),
            _dir: dir,
            _registry: registry,
        })
    }

    /// The registry the gateway uses.
    pub fn registry(&self) -> &Arc<Registry> {
        self.gateway.registry()
    }

    /// `HOST:PORT` devices connect to.
    pub fn broker(&self) -> String {
        format!("127.0.0.1:{}", self.gateway.mqtt_address().port())
    }

    /// The root CA certificate file.
    pub fn root_ca(&self) -> PathBuf {
        self.data.root_certificate()
    }

    /// Registers a device as `idgate device add` does; returns its token.
    pub async fn add_device(&self, id: &str, site: &str) -> String {
        let tokens = self.data.tokens().expect("seal key");
        let new = tokens.generate(id);
        self.registry()
            .add_device(
                &NewDevice {
                    id: id.into(),
                    owner: "facilities@example.com".into(),
                    site: site.into(),
                    model: Some("th-1".into()),
                    label: None,
                    created_by: "test".into(),
                },
                &new.sealed,
                now(),
            )
            .await
            .expect("register device");
        new.token
    }

    /// A raw MQTT client connected over TLS, trusting the gateway's root.
    pub async fn client(&self, client_id: &str) -> RawClient {
        RawClient::connect(
            &self.root_ca(),
            self.gateway.mqtt_address().port(),
            client_id,
        )
        .await
    }

    /// A raw MQTT client presenting `identity` as its client certificate.
    pub async fn client_as(
        &self,
        client_id: &str,
        identity: &DeviceIdentity,
    ) -> Result<RawClient, rumqttc::ConnectionError> {
        RawClient::try_connect(
            &self.root_ca(),
            self.gateway.mqtt_address().port(),
            client_id,
            Some(identity),
        )
        .await
    }

    /// A certificate for `device_id` signed directly by the issuing CA (no
    /// registry record): for tests of the TLS front only.
    pub fn identity_for(&self, device_id: &str) -> DeviceIdentity {
        let (ca, _) = self.data.load_issuing_ca().expect("issuing CA");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())
            .expect("params")
            .serialize_request(&key)
            .expect("CSR");
        let checked = idgate_pki::check::check_csr(csr.der()).expect("CSR checks");
        let issued = ca
            .issue(
                device_id,
                &checked,
                &idgate_pki::profile::Profile::default(),
                now(),
            )
            .expect("issue");
        DeviceIdentity {
            certificate: issued.der,
            key_pkcs8: key.serialize_der(),
            serial: issued.serial.to_string(),
        }
    }

    /// Fetches `path` from the gateway's HTTP endpoint; returns status and body.
    pub async fn http_get(&self, path: &str) -> (u16, Vec<u8>) {
        http_request(self.gateway.http_address(), "GET", path, &[]).await
    }

    /// Posts an OCSP request body to `path`.
    pub async fn http_post(&self, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        http_request(self.gateway.http_address(), "POST", path, body).await
    }
}

/// A device certificate and its key.
#[derive(Clone, Debug)]
pub struct DeviceIdentity {
    /// Certificate, DER.
    pub certificate: Vec<u8>,
    /// Key, PKCS#8 DER.
    pub key_pkcs8: Vec<u8>,
    /// Serial, hex.
    pub serial: String,
}

/// A minimal HTTP/1.1 client (one request, `Connection: close`).
async fn http_request(
    address: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("HTTP connect");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: idgate\r\nConnection: close\r\n\
         Content-Type: application/ocsp-request\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("HTTP write");
    stream.write_all(body).await.expect("HTTP write");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("HTTP read");
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("HTTP header end");
    let header = String::from_utf8_lossy(&response[..split]).to_ascii_lowercase();
    let status = header
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("HTTP status");
    let body = &response[split + 4..];
    let body = if header.contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_vec()
    };
    (status, body)
}

/// Decodes a chunked HTTP body.
fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = body.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&body[..line_end]).trim(), 16)
            .unwrap_or(0);
        let start = line_end + 2;
        if size == 0 || body.len() < start + size + 2 {
            break;
        }
        out.extend_from_slice(&body[start..start + size]);
        body = &body[start + size + 2..];
    }
    out
}

/// TLS client configuration trusting only `root_pem`.
pub fn tls_trusting(root_pem: &std::path::Path) -> Arc<rustls::ClientConfig> {
    tls_config(root_pem, None)
}

/// TLS client configuration trusting only `root_pem`, presenting `identity`.
pub fn tls_with_identity(
    root_pem: &std::path::Path,
    identity: &DeviceIdentity,
) -> Arc<rustls::ClientConfig> {
    tls_config(root_pem, Some(identity))
}

fn tls_config(
    root_pem: &std::path::Path,
    identity: Option<&DeviceIdentity>,
) -> Arc<rustls::ClientConfig> {
    let pem = std::fs::read(root_pem).expect("read root CA");
    let mut roots = rustls::RootCertStore::empty();
    for certificate in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots
            .add(certificate.expect("PEM"))
            .expect("root certificate");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots);
    let config = match identity {
        None => config.with_no_client_auth(),
        Some(identity) => config
            .with_client_auth_cert(
                vec![rustls::pki_types::CertificateDer::from(
                    identity.certificate.clone(),
                )],
                rustls::pki_types::PrivateKeyDer::Pkcs8(identity.key_pkcs8.clone().into()),
            )
            .expect("client certificate"),
    };
    Arc::new(config)
}

/// An MQTT client that sends arbitrary request payloads and waits for replies.
#[allow(missing_debug_implementations)] // rumqttc's event loop is not Debug
pub struct RawClient {
    client: AsyncClient,
    events: EventLoop,
}

impl RawClient {
    /// Connects anonymously and waits for CONNACK.
    pub async fn connect(root_pem: &std::path::Path, port: u16, client_id: &str) -> RawClient {
        RawClient::try_connect(root_pem, port, client_id, None)
            .await
            .unwrap_or_else(|e| panic!("MQTT connect failed: {e}"))
    }

    /// Connects, presenting `identity` if given, and waits for CONNACK.
    pub async fn try_connect(
        root_pem: &std::path::Path,
        port: u16,
        client_id: &str,
        identity: Option<&DeviceIdentity>,
    ) -> Result<RawClient, rumqttc::ConnectionError> {
        RawClient::try_connect_with(root_pem, port, client_id, identity, |_| {}).await
    }

    /// [`RawClient::try_connect`] with the MQTT options adjusted (a
    /// persistent session, say).
    pub async fn try_connect_with(
        root_pem: &std::path::Path,
        port: u16,
        client_id: &str,
        identity: Option<&DeviceIdentity>,
        adjust: impl FnOnce(&mut MqttOptions),
    ) -> Result<RawClient, rumqttc::ConnectionError> {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(256 * 1024, 256 * 1024);
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            tls_config(root_pem, identity),
        )));
        adjust(&mut options);
        let (client, mut events) = AsyncClient::new(options, 16);
        loop {
            match tokio::time::timeout(Duration::from_secs(20), events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => panic!("MQTT connect timed out"),
            }
        }
        Ok(RawClient { client, events })
    }

    /// Subscribes and returns whether the connection survived until SUBACK
    /// (the gateway closes connections that ask for what they may not).
    pub async fn subscribe(&mut self, filter: &str) -> Result<(), rumqttc::ConnectionError> {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("queue subscribe");
        self.wait_result(|p| matches!(p, Packet::SubAck(_)).then_some(()))
            .await
    }

    /// Publishes and then pings: Ok if the connection is still up after the
    /// ping's answer.
    pub async fn publish_and_ping(
        &mut self,
        topic: &str,
        payload: Vec<u8>,
    ) -> Result<(), rumqttc::ConnectionError> {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("queue publish");
        self.wait_result(|p| matches!(p, Packet::PubAck(_)).then_some(()))
            .await
    }

    /// Waits for the first retained or live message on `filter`.
    pub async fn first_message(&mut self, filter: &str) -> Vec<u8> {
        self.client
            .subscribe(filter, QoS::AtMostOnce)
            .await
            .expect("queue subscribe");
        self.wait(|p| match p {
            Packet::Publish(publish) => Some(publish.payload.to_vec()),
            _ => None,
        })
        .await
    }

    /// Queues a QoS 1 publish (its PUBACK is not waited for).
    pub async fn send(&mut self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("queue publish");
    }

    /// The next message the gateway delivers: topic and payload.
    pub async fn next_publish(&mut self) -> (String, Vec<u8>) {
        self.wait(|p| match p {
            Packet::Publish(publish) => Some((publish.topic.clone(), publish.payload.to_vec())),
            _ => None,
        })
        .await
    }

    /// Waits until the connection ends; returns how it ended.
    pub async fn closed(&mut self) -> rumqttc::ConnectionError {
        loop {
            match tokio::time::timeout(Duration::from_secs(20), self.events.poll()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return e,
                Err(_) => panic!("the connection stayed open for 20 s"),
            }
        }
    }

    async fn wait_result<T>(
        &mut self,
        mut want: impl FnMut(&Packet) -> Option<T>,
    ) -> Result<T, rumqttc::ConnectionError> {
        loop {
            match tokio::time::timeout(Duration::from_secs(20), self.events.poll()).await {
                Ok(Ok(Event::Incoming(packet))) => {
                    if let Some(found) = want(&packet) {
                        return Ok(found);
                    }
                }
                Ok(Ok(Event::Outgoing(_))) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => panic!("no answer from the gateway within 20 s"),
            }
        }
    }

    /// Publishes `payload` on `device`'s enroll topic in `format` and returns
    /// the reply kind and payload.
    pub async fn enroll(
        &mut self,
        device: &str,
        format: Format,
        payload: Vec<u8>,
    ) -> (Reply, Vec<u8>) {
        self.request(Topic::request(device, Op::Enroll, format), payload)
            .await
    }

    /// Publishes `payload` on the request topic and returns the reply kind
    /// and payload.
    pub async fn request(&mut self, request: Topic<'_>, payload: Vec<u8>) -> (Reply, Vec<u8>) {
        let filter = format!("{request}/+");
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        self.wait(|p| matches!(p, Packet::SubAck(_)).then_some(()))
            .await;
        self.client
            .publish(request.to_string(), QoS::AtLeastOnce, false, payload)
            .await
            .expect("publish");
        let accepted = request.with_reply(Reply::Accepted).to_string();
        let rejected = request.with_reply(Reply::Rejected).to_string();
        self.wait(|p| match p {
            Packet::Publish(publish) if publish.topic == accepted => {
                Some((Reply::Accepted, publish.payload.to_vec()))
            }
            Packet::Publish(publish) if publish.topic == rejected => {
                Some((Reply::Rejected, publish.payload.to_vec()))
            }
            _ => None,
        })
        .await
    }

    async fn wait<T>(&mut self, mut want: impl FnMut(&Packet) -> Option<T>) -> T {
        loop {
            match tokio::time::timeout(Duration::from_secs(20), self.events.poll()).await {
                Ok(Ok(Event::Incoming(packet))) => {
                    if let Some(found) = want(&packet) {
                        return found;
                    }
                }
                Ok(Ok(Event::Outgoing(_))) => {}
                Ok(Err(e)) => panic!("MQTT connection failed: {e}"),
                Err(_) => panic!("no reply from the gateway within 20 s"),
            }
        }
    }
}
