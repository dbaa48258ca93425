//! The station's MQTT connection to the gateway: TLS with the station
//! certificate, one subscription to the replies of its station topics, and a
//! request/reply call per device (`docs/protocol.md` section 12.4).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idgate_pki::protocol::{Format, Op, Reply};
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeReasonCode, TlsConfiguration,
    Transport,
};
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::topic::{StationTopic, station_reply_filter};

/// How the station reaches the gateway, and as whom.
#[derive(Clone)]
pub struct RelayOptions {
    /// `HOST:PORT` of the gateway's MQTT/TLS front.
    pub broker: String,
    /// The station id its certificate names.
    pub station_id: String,
    /// Root CA certificate(s) to trust for the broker (PEM).
    pub root_pem: Vec<u8>,
    /// The station certificate, then the issuing CA (PEM).
    pub certificate_pem: Vec<u8>,
    /// The station's private key (PKCS#8 PEM).
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for RelayOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayOptions")
            .field("broker", &self.broker)
            .field("station_id", &self.station_id)
            .finish_non_exhaustive()
    }
}

/// The relay failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The options are unusable (address, PEM files).
    #[error("{0}")]
    Config(String),
    /// The gateway could not be reached or refused the station (a revoked
    /// or unknown station certificate fails here, at the TLS handshake).
    #[error("connecting to the gateway: {0}")]
    Connect(String),
    /// The broker refused the reply subscription.
    #[error("the gateway refused the station's reply subscription")]
    SubscribeRefused,
    /// No reply within the time allowed.
    #[error("no reply from the gateway within {0:?}")]
    Timeout(Duration),
    /// The connection is gone.
    #[error("the connection to the gateway is closed")]
    Closed,
}

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<(Reply, Vec<u8>)>>>>;

/// A connected relay.
#[derive(Debug)]
pub struct Relay {
    client: AsyncClient,
    station_id: String,
    waiting: Waiters,
    task: JoinHandle<()>,
}

impl Relay {
    /// Connects with the station certificate and subscribes to the station's
    /// reply topics; fails if either does not happen within `timeout`.
    pub async fn connect(options: &RelayOptions, timeout: Duration) -> Result<Relay, RelayError> {
        let (host, port) = options
            .broker
            .rsplit_once(':')
            .and_then(|(h, p)| {
                Some((
                    h.trim_start_matches('[').trim_end_matches(']'),
                    p.parse::<u16>().ok()?,
                ))
            })
            .ok_or_else(|| {
                RelayError::Config(format!(
                    "bad broker address {:?} (HOST:PORT)",
                    options.broker
                ))
            })?;
        let tls = client_config(options)?;
        let mut mqtt = MqttOptions::new(&options.station_id, host, port);
        mqtt.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)))
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_max_packet_size(64 * 1024, 64 * 1024);
        let (client, mut eventloop) = AsyncClient::new(mqtt, 64);
        let filter = station_reply_filter(&options.station_id);
        client
            .try_subscribe(filter.clone(), QoS::AtLeastOnce)
            .map_err(|e| RelayError::Connect(e.to_string()))?;
        let handshake = async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        if ack
                            .return_codes
                            .iter()
                            .any(|c| matches!(c, SubscribeReasonCode::Failure))
                        {
                            return Err(RelayError::SubscribeRefused);
                        }
                        return Ok(());
                    }
                    Ok(_) => {}
                    Err(e) => return Err(RelayError::Connect(e.to_string())),
                }
            }
        };
        tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| RelayError::Connect(format!("no answer within {timeout:?}")))??;
        let waiting: Waiters = Arc::default();
        let task = tokio::spawn(pump(
            eventloop,
            client.clone(),
            filter,
            options.station_id.clone(),
            waiting.clone(),
        ));
        Ok(Relay {
            client,
            station_id: options.station_id.clone(),
            waiting,
            task,
        })
    }

    /// Publishes `payload` as `device_id`'s `enroll` request and waits for the
    /// gateway's reply (outcome and payload, unchanged).
    pub async fn enroll(
        &self,
        device_id: &str,
        format: Format,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<(Reply, Vec<u8>), RelayError> {
        let topic = StationTopic::request(&self.station_id, device_id, Op::Enroll, format);
        let (tx, rx) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(device_id.to_owned(), tx);
        let sent = tokio::time::timeout(
            timeout,
            self.client
                .publish(topic.to_string(), QoS::AtLeastOnce, false, payload.to_vec()),
        )
        .await;
        let result = match sent {
            Err(_) => Err(RelayError::Timeout(timeout)),
            Ok(Err(_)) => Err(RelayError::Closed),
            Ok(Ok(())) => match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(reply)) => Ok(reply),
                Ok(Err(_)) => Err(RelayError::Closed),
                Err(_) => Err(RelayError::Timeout(timeout)),
            },
        };
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(device_id);
        result
    }

    /// Disconnects.
    pub async fn close(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.task).await;
    }
}

/// Runs the MQTT event loop: hands replies to whoever waits for them, and
/// after a reconnection subscribes again (the session is clean).
async fn pump(
    mut eventloop: EventLoop,
    client: AsyncClient,
    filter: String,
    station_id: String,
    waiting: Waiters,
) {
    let mut connected = true;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let Some(topic) = StationTopic::parse(&publish.topic) else {
                    continue;
                };
                let (Some(reply), true) = (topic.reply, topic.station_id == station_id) else {
                    continue;
                };
                let waiter = waiting
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(topic.device_id);
                match waiter {
                    Some(waiter) => {
                        let _ = waiter.send((reply, publish.payload.to_vec()));
                    }
                    None => debug!(device_id = topic.device_id, "reply nobody waits for"),
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) if !connected => {
                connected = true;
                let _ = client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(rumqttc::ConnectionError::RequestsDone) => return,
            Err(e) => {
                if connected {
                    warn!(error = %e, "connection to the gateway lost; reconnecting");
                }
                connected = false;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

fn client_config(options: &RelayOptions) -> Result<Arc<ClientConfig>, RelayError> {
    let certificates = |pem: &[u8], what: &str| {
        let list = rustls_pemfile::certs(&mut &pem[..])
            .collect::<Result<Vec<CertificateDer<'static>>, _>>()
            .map_err(|e| RelayError::Config(format!("{what}: {e}")))?;
        if list.is_empty() {
            return Err(RelayError::Config(format!("{what}: no certificate")));
        }
        Ok(list)
    };
    let mut roots = RootCertStore::empty();
    for root in certificates(&options.root_pem, "root CA")? {
        roots
            .add(root)
            .map_err(|e| RelayError::Config(format!("root CA: {e}")))?;
    }
    let chain = certificates(&options.certificate_pem, "station certificate")?;
    let key = rustls_pemfile::private_key(&mut &options.key_pem[..])
        .map_err(|e| RelayError::Config(format!("station key: {e}")))?
        .ok_or_else(|| RelayError::Config("station key: no private key".into()))?;
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| RelayError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| RelayError::Config(format!("station certificate and key: {e}")))?;
    Ok(Arc::new(config))
}
