//! The MQTT side, and the only module that knows rumqttd.
//!
//! The enrollment service sees the broker through [`Bus`]: a stream of request
//! messages in and a sender for replies out. The embedded broker
//! ([`embedded`]) provides one; an external broker client can provide another
//! without the service changing.
//!
//! Devices never reach rumqttd directly: [`front`] terminates TLS with a
//! current rustls (handshake timeout, a cap on concurrent handshakes, one
//! accept loop that spawns per connection) and relays the plain MQTT bytes to
//! rumqttd on a loopback port.

pub mod direct;
pub mod embedded;
pub mod front;
pub mod guard;
pub mod presence;

use tokio::sync::mpsc;

/// One MQTT message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Topic name.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Whether the broker keeps it for later subscribers.
    pub retain: bool,
}

/// Where the gateway publishes its current CRL (DER), retained.
pub const CRL_TOPIC: &str = "idgate/v1/crl";

/// The service's view of a broker.
#[derive(Debug)]
pub struct Bus {
    /// Requests published by devices on the subscribed request topics.
    pub requests: mpsc::Receiver<Message>,
    /// Replies to publish.
    pub replies: mpsc::Sender<Message>,
}

/// Topic filters the service subscribes to.
pub const REQUEST_FILTERS: &[&str] = &[
    "idgate/v1/devices/+/enroll/+",
    "idgate/v1/devices/+/renew/+",
    crate::line::topic::STATION_REQUEST_FILTER,
];
