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
        let registry = registry_url(database).await?;
        let dir = tempfile::tempdir().expect("temporary directory");
        let data = DataDir::new(dir.path().join("data"));
        let mut settings = Settings::new(data.clone());
        settings.database_url = Some(registry.url.clone());
        settings.mqtt_listen = "127.0.0.1:0".parse().expect("address");
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
}

/// TLS client configuration trusting only `root_pem`.
pub fn tls_trusting(root_pem: &std::path::Path) -> Arc<rustls::ClientConfig> {
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
    .with_root_certificates(roots)
    .with_no_client_auth();
    Arc::new(config)
}

/// An MQTT client that sends arbitrary request payloads and waits for replies.
#[allow(missing_debug_implementations)] // rumqttc's event loop is not Debug
pub struct RawClient {
    client: AsyncClient,
    events: EventLoop,
}

impl RawClient {
    /// Connects and waits for CONNACK.
    pub async fn connect(root_pem: &std::path::Path, port: u16, client_id: &str) -> RawClient {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(256 * 1024, 256 * 1024);
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            tls_trusting(root_pem),
        )));
        let (client, mut events) = AsyncClient::new(options, 16);
        loop {
            match tokio::time::timeout(Duration::from_secs(10), events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("MQTT connect failed: {e}"),
                Err(_) => panic!("MQTT connect timed out"),
            }
        }
        RawClient { client, events }
    }

    /// Publishes `payload` on `device`'s enroll topic in `format` and returns
    /// the reply kind and payload.
    pub async fn enroll(
        &mut self,
        device: &str,
        format: Format,
        payload: Vec<u8>,
    ) -> (Reply, Vec<u8>) {
        let request = Topic::request(device, Op::Enroll, format);
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
