//! One device's enrollment over a real MQTT connection: the `idgate-agent` state
//! machine driven by a rumqttc event loop and a monotonic clock. This is the
//! reference for how firmware wires the agent to its own MQTT stack.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use idgate_agent::{Config, Enrollment, Error as AgentError, Event, MAX_REQUEST, RetryPolicy, Rid};
use idgate_pki::protocol::{Format, Op, Reply, Topic, check_device_id};
use p256::elliptic_curve::zeroize::Zeroizing;
use rumqttc::{
    AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS, SubscribeFilter,
    SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::time::{Instant, sleep_until, timeout_at};

use crate::SimError;
use crate::keystore::SoftKeyStore;
use crate::pem;
use crate::tls::{BrokerAddress, client_config};

/// What [`enroll`] needs.
#[derive(Clone)]
pub struct EnrollOptions {
    /// `HOST:PORT` of the gateway's MQTT front (TLS).
    pub broker: String,
    /// PEM with the CA certificate(s) to trust for the broker's TLS certificate.
    pub ca_pem: Vec<u8>,
    /// The device id registered at the gateway; also the MQTT client id.
    pub device_id: String,
    /// The one-time enrollment token.
    pub token: String,
    /// How long to try, from the first connection attempt to the certificate.
    pub timeout: Duration,
    /// The agent's retransmission policy.
    pub retry: RetryPolicy,
}

impl EnrollOptions {
    /// Options with a 60 s timeout and the agent's default retry policy.
    pub fn new(
        broker: impl Into<String>,
        ca_pem: impl Into<Vec<u8>>,
        device_id: impl Into<String>,
        token: impl Into<String>,
    ) -> EnrollOptions {
        EnrollOptions {
            broker: broker.into(),
            ca_pem: ca_pem.into(),
            device_id: device_id.into(),
            token: token.into(),
            timeout: Duration::from_secs(60),
            retry: RetryPolicy::DEFAULT,
        }
    }
}

impl fmt::Debug for EnrollOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrollOptions")
            .field("broker", &self.broker)
            .field("device_id", &self.device_id)
            .field("token", &"<redacted>")
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// A finished enrollment: the key and what the gateway sent for it.
#[derive(Clone)]
pub struct Enrolled {
    /// The request id used.
    pub rid: String,
    /// The device's new private key, PKCS#8 PEM.
    pub key_pem: Zeroizing<String>,
    /// The device certificate, DER.
    pub certificate: Vec<u8>,
    /// The issuer certificates, DER, issuer of `certificate` first.
    pub chain: Vec<Vec<u8>>,
    /// Certificate serial, lowercase hex.
    pub serial: String,
    /// Validity start, unix seconds.
    pub not_before: u64,
    /// Validity end, unix seconds.
    pub not_after: u64,
    /// The gateway's clock when it answered, unix seconds.
    pub gateway_time: u64,
    /// Suggested renewal window start, unix seconds.
    pub renew_after: u64,
    /// Suggested renewal window end, unix seconds.
    pub renew_before: u64,
    /// How many times the request was sent.
    pub attempts: u32,
}

impl fmt::Debug for Enrolled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Enrolled")
            .field("rid", &self.rid)
            .field("serial", &self.serial)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("chain", &self.chain.len())
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

impl Enrolled {
    /// The device certificate as PEM.
    pub fn certificate_pem(&self) -> String {
        pem::certificates([self.certificate.as_slice()])
    }

    /// The chain as PEM, issuer first.
    pub fn chain_pem(&self) -> String {
        pem::certificates(self.chain.iter().map(Vec::as_slice))
    }

    /// Writes `key.pem` (mode 0600), `cert.pem` and `chain.pem` into `dir`,
    /// creating it if needed.
    pub fn write_files(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        write_private(&dir.join("key.pem"), self.key_pem.as_bytes())?;
        std::fs::write(dir.join("cert.pem"), self.certificate_pem())?;
        std::fs::write(dir.join("chain.pem"), self.chain_pem())
    }
}

/// Writes a secret file readable by its owner only, from the moment it exists.
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    // An existing file keeps its old mode through open(); narrow it first.
    #[cfg(unix)]
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    file.write_all(contents)?;
    file.sync_all()
}

/// The reply topics of `device_id`'s CBOR enrollment (accepted, rejected).
fn reply_topics(device_id: &str) -> [String; 2] {
    let request = Topic::request(device_id, Op::Enroll, Format::Cbor);
    [
        request.with_reply(Reply::Accepted).to_string(),
        request.with_reply(Reply::Rejected).to_string(),
    ]
}

/// Enrolls one simulated device: connects over TLS (MQTT 3.1.1, client id =
/// device id), subscribes to the reply topics, and runs the agent until it
/// reports an outcome or `options.timeout` passes.
pub async fn enroll(options: &EnrollOptions) -> Result<Enrolled, SimError> {
    let deadline = Instant::now() + options.timeout;
    let address = BrokerAddress::parse(&options.broker)?;
    // rumqttc panics on some client ids; the protocol's id syntax excludes them.
    check_device_id(&options.device_id)
        .map_err(|e| SimError::Agent(idgate_agent::UsageError::BadDeviceId(e).into()))?;
    let tls = client_config(&options.ca_pem)?;

    let mut mqtt = MqttOptions::new(&options.device_id, &address.host, address.port);
    mqtt.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)))
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true);
    let (client, mut eventloop) = AsyncClient::new(mqtt, 16);

    // Subscribe before publishing anything: replies are not retained, so one
    // that arrived before the subscription would be lost.
    let topics = reply_topics(&options.device_id);
    client.try_subscribe_many(
        topics
            .iter()
            .map(|topic| SubscribeFilter::new(topic.clone(), QoS::AtLeastOnce)),
    )?;
    loop {
        let event = timeout_at(deadline, eventloop.poll())
            .await
            .map_err(|_| SimError::Timeout(options.timeout))??;
        match event {
            MqttEvent::Incoming(Packet::ConnAck(_)) => {
                tracing::debug!(broker = %options.broker, "connected");
            }
            MqttEvent::Incoming(Packet::SubAck(ack)) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|code| matches!(code, SubscribeReasonCode::Failure))
                {
                    return Err(SimError::SubscribeRefused);
                }
                break;
            }
            _ => {}
        }
    }

    let clock = Instant::now();
    let now_ms = || u64::try_from(clock.elapsed().as_millis()).unwrap_or(u64::MAX);
    let mut key_store = SoftKeyStore::new();
    let config = Config {
        device_id: &options.device_id,
        token: options.token.as_bytes(),
        retry: options.retry,
    };
    let rid = Rid::random(&mut rand::rngs::OsRng);
    let mut agent = Enrollment::start(&config, &mut key_store, rid, now_ms())?;
    debug_assert_eq!(
        agent.subscriptions().each_ref().map(|t| t.to_string()),
        topics
    );
    tracing::info!(device_id = %options.device_id, rid = %agent.rid(), "enrolling");

    let mut buf = [0u8; MAX_REQUEST];
    let (event, attempts) = loop {
        while let Some(transmit) = agent.poll_transmit(&mut buf) {
            tracing::debug!(attempt = transmit.attempt, "publishing enroll request");
            client.try_publish(
                transmit.topic.as_str(),
                QoS::AtLeastOnce,
                false,
                buf[..transmit.len].to_vec(),
            )?;
        }
        if let Some(event) = agent.poll_event() {
            break (event, agent.attempts());
        }
        // The agent is waiting whenever it has no event, so it has a deadline.
        let wake = clock + Duration::from_millis(agent.poll_timeout().unwrap_or(u64::MAX / 2));
        tokio::select! {
            () = sleep_until(deadline) => return Err(SimError::Timeout(options.timeout)),
            () = sleep_until(wake) => agent.handle_timeout(now_ms()),
            polled = eventloop.poll() => {
                if let MqttEvent::Incoming(Packet::Publish(publish)) = polled? {
                    match agent.handle_message(now_ms(), &publish.topic, &publish.payload) {
                        Ok(()) => {}
                        Err(AgentError::Peer(reason)) => {
                            tracing::warn!(topic = %publish.topic, %reason, "ignored a message");
                        }
                        // The agent keeps waiting; a retransmission brings the
                        // same certificate back and promotion is tried again.
                        Err(e) => tracing::error!(error = %e, "agent error"),
                    }
                }
            }
        }
    };
    let rid = agent.rid().to_string();
    let certificate = agent.certificate().map(<[u8]>::to_vec);
    let chain: Vec<Vec<u8>> = agent.chain().map(<[u8]>::to_vec).collect();
    drop(agent);
    // Leave the broker politely; the outcome does not depend on it.
    let _ = client.try_disconnect();

    match event {
        Event::Enrolled {
            serial,
            not_before,
            not_after,
            gateway_time,
            renew_after,
            renew_before,
            ..
        } => Ok(Enrolled {
            rid,
            key_pem: key_store.current_key_pem()?,
            certificate: certificate.ok_or(SimError::Internal("enrolled without a certificate"))?,
            chain,
            serial: serial.to_string(),
            not_before,
            not_after,
            gateway_time,
            renew_after,
            renew_before,
            attempts,
        }),
        Event::Rejected(rejection) => Err(SimError::Rejected {
            code: rejection.code_str().to_owned(),
            message: rejection.message().to_owned(),
        }),
        Event::GaveUp { attempts } => Err(SimError::GaveUp { attempts }),
        _ => Err(SimError::Internal("unknown agent event")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_topics_match_the_protocol() {
        assert_eq!(
            reply_topics("sensor-1"),
            [
                "idgate/v1/devices/sensor-1/enroll/cbor/accepted",
                "idgate/v1/devices/sensor-1/enroll/cbor/rejected"
            ]
        );
    }

    #[test]
    fn options_hide_the_token() {
        let options = EnrollOptions::new("h:1", "", "d", "s3cret-token");
        assert!(!format!("{options:?}").contains("s3cret"));
    }

    #[tokio::test]
    async fn bad_options_fail_before_connecting() {
        let mut options = EnrollOptions::new("nohost", "", "d", "t");
        assert!(matches!(
            enroll(&options).await,
            Err(SimError::BadBroker(_))
        ));
        options.broker = "127.0.0.1:1".into();
        assert!(matches!(enroll(&options).await, Err(SimError::Ca(_))));
        options.device_id = "-bad".into();
        assert!(matches!(enroll(&options).await, Err(SimError::Agent(_))));
    }

    #[test]
    fn files_are_written_with_a_private_key_mode() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("new/sub");
        let enrolled = Enrolled {
            rid: "r".into(),
            key_pem: Zeroizing::new("-----BEGIN PRIVATE KEY-----\n".into()),
            certificate: vec![0x30, 0x00],
            chain: vec![vec![0x30, 0x01, 0x00], vec![0x30, 0x00]],
            serial: "01".into(),
            not_before: 0,
            not_after: 1,
            gateway_time: 0,
            renew_after: 0,
            renew_before: 1,
            attempts: 1,
        };
        enrolled.write_files(&out).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(out.join("key.pem"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let chain = std::fs::read_to_string(out.join("chain.pem")).unwrap();
        assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
        assert_eq!(
            std::fs::read_to_string(out.join("cert.pem")).unwrap(),
            "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n"
        );
    }
}
