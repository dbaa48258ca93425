//! Host-side stand-ins for device hardware and a device simulator: a software
//! [`KeyStore`](idgate_hal::KeyStore) ([`SoftKeyStore`]), a NOR flash that can
//! lose power after any byte ([`SimFlash`]), [`enroll`] and
//! [`renew`], which run the real firmware agent over a real MQTT/TLS
//! connection, the device's files ([`files`]), and a sans-IO [`FakeGateway`]
//! for tests. The `idgate-sim` binary is a thin command line over this library.

mod enroll;
pub mod fake_gateway;
pub mod files;
mod flash;
mod keystore;
pub mod line_device;
mod pem;
mod renew;
mod session;
mod tls;

pub use enroll::{EnrollOptions, Enrolled, enroll};
pub use fake_gateway::FakeGateway;
pub use flash::{SimFlash, SimFlashError};
pub use keystore::{Operation, SoftKeyError, SoftKeyStore};
pub use line_device::{Behaviour, LineDeviceOptions, run_line_device};
pub use renew::{RenewOptions, Renewed, renew};
pub use tls::{BrokerAddress, client_config, client_config_with_certificate};

/// Why a simulated enrollment or renewal did not produce a certificate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The broker address is not `HOST:PORT` with a valid host.
    #[error("broker address {0:?} is not HOST:PORT")]
    BadBroker(String),
    /// The CA file is unusable.
    #[error("CA file: {0}")]
    Ca(String),
    /// The device's current key or certificate is unusable, or they do not
    /// belong together.
    #[error("current identity: {0}")]
    Identity(String),
    /// TLS could not be set up.
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    /// The agent refused its input (device id, token) or the key store failed.
    #[error("agent: {0}")]
    Agent(#[from] idgate_agent::Error),
    /// The key store failed.
    #[error("key store: {0}")]
    KeyStore(#[from] SoftKeyError),
    /// The MQTT connection failed (TLS handshake, refused, dropped).
    #[error("MQTT connection: {0}")]
    Connection(Box<rumqttc::ConnectionError>),
    /// The MQTT client could not queue a request.
    #[error("MQTT client: {0}")]
    Client(#[from] rumqttc::ClientError),
    /// The broker refused our subscription to the reply topics.
    #[error("the broker refused the subscription to the reply topics")]
    SubscribeRefused,
    /// The gateway refused the request.
    #[error("rejected: {code}: {message}")]
    Rejected {
        /// The rejection code as sent.
        code: String,
        /// The gateway's message.
        message: String,
    },
    /// No answer came after the last attempt.
    #[error("no answer from the gateway after {attempts} attempts")]
    GaveUp {
        /// How many times the request was sent.
        attempts: u32,
    },
    /// The overall timeout passed.
    #[error("no certificate within {0:?}")]
    Timeout(std::time::Duration),
    /// A bug in the simulator.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl From<rumqttc::ConnectionError> for SimError {
    fn from(e: rumqttc::ConnectionError) -> Self {
        // Boxed: the error is large and every other variant is small.
        SimError::Connection(Box::new(e))
    }
}
