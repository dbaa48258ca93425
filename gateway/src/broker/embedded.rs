//! The embedded broker: stock rumqttd on loopback-only ports (MQTT 3.1.1 and 5),
//! with the enrollment service attached through an in-process link.
//!
//! rumqttd's link is synchronous on the sending side, so replies are published
//! from a thread of their own and never block the async runtime; the receiving
//! side answers `Unschedule` with `ready()`, or the router stops feeding it.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use rumqttd::protocol::{Packet, Publish};
use rumqttd::{Broker, Config, ConnectionSettings, Notification, RouterConfig, ServerSettings};
use tokio::sync::mpsc;
use tracing::{debug, error, warn};

use super::direct::DirectRoutes;
use super::{Bus, Message, REQUEST_FILTERS};

/// Largest MQTT payload rumqttd accepts; above this it drops the connection.
/// Larger than the protocol's limit so that oversized requests reach the
/// service and get a `too_large` answer instead of a silent disconnect.
pub const BROKER_MAX_PAYLOAD: usize = 64 * 1024;
/// Queue depth between the broker and the service, each way.
const QUEUE: usize = 4096;

/// Where the embedded broker's plain listeners are (loopback only), and the
/// connections that get the service's replies directly.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// MQTT 3.1.1 listener.
    pub v4: SocketAddr,
    /// MQTT 5 listener.
    pub v5: SocketAddr,
    /// Reply subscriptions held by the front instead of rumqttd.
    pub direct: Arc<DirectRoutes>,
    /// The service's request queue, for requests the front takes directly.
    pub requests: mpsc::Sender<Message>,
}

/// The embedded broker could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EmbeddedError {
    /// No loopback port could be reserved.
    #[error("no free loopback port: {0}")]
    Port(std::io::Error),
    /// rumqttd refused its configuration or the link.
    #[error("rumqttd: {0}")]
    Broker(String),
    /// rumqttd's listeners did not come up.
    #[error("rumqttd did not start listening on {0}")]
    NotListening(SocketAddr),
}

fn free_loopback_port() -> Result<SocketAddr, EmbeddedError> {
    // rumqttd binds its own listeners and cannot report an ephemeral port, so
    // one is reserved here and released just before rumqttd binds it.
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(EmbeddedError::Port)?;
    listener.local_addr().map_err(EmbeddedError::Port)
}

fn server(name: &str, listen: SocketAddr) -> ServerSettings {
    ServerSettings {
        name: name.to_owned(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: BROKER_MAX_PAYLOAD,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    }
}

/// Starts rumqttd and attaches the service link. Returns where rumqttd listens
/// and the service's [`Bus`].
pub async fn start() -> Result<(Upstream, Bus), EmbeddedError> {
    let (request_tx, requests) = mpsc::channel(QUEUE);
    let upstream = Upstream {
        v4: free_loopback_port()?,
        v5: free_loopback_port()?,
        direct: Arc::default(),
        requests: request_tx.clone(),
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 100_000,
            max_outgoing_packet_count: 1024,
            max_segment_size: 64 * 1024 * 1024,
            max_segment_count: 4,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([(
            "v4".to_owned(),
            server("v4", upstream.v4),
        )])),
        v5: Some(HashMap::from([(
            "v5".to_owned(),
            server("v5", upstream.v5),
        )])),
        ..Config::default()
    };
    let mut broker = Broker::new(config);
    let (mut link_tx, mut link_rx) = broker
        .link("idgate-service")
        .map_err(|e| EmbeddedError::Broker(e.to_string()))?;
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|e| EmbeddedError::Broker(e.to_string()))?;
    for filter in REQUEST_FILTERS {
        link_tx
            .subscribe(*filter)
            .map_err(|e| EmbeddedError::Broker(e.to_string()))?;
    }

    let (replies, mut reply_rx) = mpsc::channel::<Message>(QUEUE);
    tokio::spawn(async move {
        loop {
            match link_rx.next().await {
                Ok(Some(Notification::Forward(forward))) => {
                    let Ok(topic) = String::from_utf8(forward.publish.topic.to_vec()) else {
                        warn!("dropping a publish whose topic is not UTF-8");
                        continue;
                    };
                    let message = Message {
                        topic,
                        payload: forward.publish.payload.to_vec(),
                        retain: false,
                    };
                    if request_tx.send(message).await.is_err() {
                        break; // the service has stopped
                    }
                }
                Ok(Some(Notification::Unschedule)) => {
                    if link_rx.ready().is_err() {
                        break;
                    }
                }
                Ok(Some(other)) => debug!(?other, "ignoring broker notification"),
                Ok(None) => {}
                Err(e) => {
                    error!(error = %e, "broker link closed");
                    break;
                }
            }
        }
    });
    // Replies go straight to the connections that subscribed to them through
    // the front; only those rumqttd has subscribers for (and the retained
    // CRL) cross to the publishing thread.
    let (to_broker, mut broker_rx) = mpsc::channel::<Message>(QUEUE);
    let direct = upstream.direct.clone();
    tokio::spawn(async move {
        while let Some(reply) = reply_rx.recv().await {
            let delivered = if reply.retain {
                0
            } else {
                direct.deliver(&reply.topic, &reply.payload)
            };
            if reply.retain || direct.broker_wants(&reply.topic) {
                if to_broker.send(reply).await.is_err() {
                    break;
                }
            } else if delivered == 0 {
                debug!(topic = %reply.topic, "nobody waits for this reply");
            }
        }
    });
    let runtime = tokio::runtime::Handle::current();
    std::thread::Builder::new()
        .name("idgate-replies".into())
        .spawn(move || {
            while let Some(reply) = broker_rx.blocking_recv() {
                let sent = if reply.retain {
                    // `publish` never retains; a retained message goes as a packet.
                    let publish = Publish::new(reply.topic.into_bytes(), reply.payload, true);
                    runtime
                        .block_on(link_tx.send(Packet::Publish(publish, None)))
                        .map(|_| ())
                } else {
                    link_tx.publish(reply.topic, reply.payload).map(|_| ())
                };
                if let Err(e) = sent {
                    error!(error = %e, "could not publish a reply");
                    break;
                }
            }
        })
        .map_err(|e| EmbeddedError::Broker(e.to_string()))?;

    for address in [upstream.v4, upstream.v5] {
        wait_listening(address).await?;
    }
    Ok((upstream, Bus { requests, replies }))
}

/// rumqttd announces nothing when its listener is bound; connecting is the
/// only signal, so try until it answers.
async fn wait_listening(address: SocketAddr) -> Result<(), EmbeddedError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if tokio::net::TcpStream::connect(address).await.is_ok() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(EmbeddedError::NotListening(address));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
