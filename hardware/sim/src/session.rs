//! What every simulated request does over MQTT, whatever it asks for: connect
//! over TLS (MQTT 3.1.1, client id = device id), subscribe to the reply topics
//! before publishing anything, then drive the agent's [`Exchange`] with a
//! rumqttc event loop and a monotonic clock until it reports an outcome, then
//! leave with DISCONNECT. This is the reference for how firmware wires the
//! agent to its own MQTT stack.

use std::sync::Arc;
use std::time::Duration;

use idgate_agent::{Error as AgentError, Event, Exchange, MAX_REQUEST, RequestKind, Rid};
use idgate_pki::protocol::{Format, Reply, Topic, check_device_id};
use rumqttc::{
    AsyncClient, Event as MqttEvent, EventLoop, MqttOptions, Outgoing, Packet, QoS,
    SubscribeFilter, SubscribeReasonCode, TlsConfiguration, Transport,
};
use rustls::ClientConfig;
use tokio::time::{Instant, sleep_until, timeout_at};

use crate::SimError;
use crate::enroll::Enrolled;
use crate::keystore::SoftKeyStore;
use crate::tls::BrokerAddress;

/// Where to connect, as whom, and for how long at most.
pub(crate) struct Target<'a> {
    address: BrokerAddress,
    device_id: &'a str,
    timeout: Duration,
}

impl<'a> Target<'a> {
    /// Checks what can be checked before anything else: the broker address and
    /// the device id (rumqttc panics on some client ids; the protocol's id
    /// syntax excludes them).
    pub(crate) fn new(
        broker: &str,
        device_id: &'a str,
        timeout: Duration,
    ) -> Result<Target<'a>, SimError> {
        let address = BrokerAddress::parse(broker)?;
        check_device_id(device_id)
            .map_err(|e| SimError::Agent(idgate_agent::UsageError::BadDeviceId(e).into()))?;
        Ok(Target {
            address,
            device_id,
            timeout,
        })
    }
}

/// The reply topics of `device_id`'s CBOR requests of kind `R` (accepted, rejected).
pub(crate) fn reply_topics<R: RequestKind>(device_id: &str) -> [String; 2] {
    let request = Topic::request(device_id, R::OP, Format::Cbor);
    [
        request.with_reply(Reply::Accepted).to_string(),
        request.with_reply(Reply::Rejected).to_string(),
    ]
}

/// Connects, subscribes to the reply topics of `R` and then runs the agent
/// that `start` makes (given the clock's `now_ms` and a fresh random rid) until
/// it reports an outcome or `timeout` passes.
pub(crate) async fn run<R: RequestKind>(
    target: &Target<'_>,
    tls: Arc<ClientConfig>,
    start: impl FnOnce(u64, Rid) -> Result<Exchange<SoftKeyStore, R>, AgentError>,
) -> Result<Enrolled, SimError> {
    let Target {
        address,
        device_id,
        timeout,
    } = target;
    let deadline = Instant::now() + *timeout;
    let timed_out = || SimError::Timeout(*timeout);
    let mut mqtt = MqttOptions::new(*device_id, &address.host, address.port);
    mqtt.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)))
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true);
    let (client, mut eventloop) = AsyncClient::new(mqtt, 16);

    // Subscribe before publishing anything: replies are not retained, so one
    // that arrived before the subscription would be lost.
    let topics = reply_topics::<R>(device_id);
    client.try_subscribe_many(
        topics
            .iter()
            .map(|topic| SubscribeFilter::new(topic.clone(), QoS::AtLeastOnce)),
    )?;
    loop {
        let event = timeout_at(deadline, eventloop.poll())
            .await
            .map_err(|_| timed_out())??;
        match event {
            MqttEvent::Incoming(Packet::ConnAck(_)) => {
                tracing::debug!(host = %address.host, port = address.port, "connected");
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
    let mut agent = start(now_ms(), Rid::random(&mut rand::rngs::OsRng))?;
    debug_assert_eq!(
        agent.subscriptions().each_ref().map(|t| t.to_string()),
        topics
    );
    tracing::info!(%device_id, op = R::OP.as_str(), rid = %agent.rid(), "requesting a certificate");
    let event = drive(&mut agent, &client, &mut eventloop, clock, deadline)
        .await
        .map_err(|e| e.unwrap_or_else(timed_out))?;
    // The outcome does not depend on it.
    leave(&client, &mut eventloop).await;
    outcome(event, agent)
}

/// How long leaving the broker may take.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Leaves the broker politely: MQTT DISCONNECT, which the event loop writes
/// and flushes through TLS before it reports it, so the broker ends the
/// session as the device asked (a will is discarded, MQTT 3.1.1 §3.14.4);
/// then the broker's close, which MQTT has it make after DISCONNECT (and
/// which brings its TLS close_notify), so that the socket is not dropped
/// while the DISCONNECT may still be unread. rumqttc 0.25 keeps its TLS
/// stream to itself and never shuts it down, so the device's own
/// close_notify is not sent: dropping the event loop closes the socket.
/// Gives up after [`LEAVE_TIMEOUT`].
async fn leave(client: &AsyncClient, eventloop: &mut EventLoop) {
    if client.try_disconnect().is_err() {
        return;
    }
    let leaving = async {
        loop {
            match eventloop.poll().await {
                Ok(MqttEvent::Outgoing(Outgoing::Disconnect)) => break,
                Ok(_) => {}
                Err(_) => return,
            }
        }
        tracing::debug!("DISCONNECT sent");
        // Nothing may follow a DISCONNECT (MQTT 5 §3.14.4, 3.1.1 §3.14.4):
        // rumqttc's keep-alive timer would still send a PINGREQ while the
        // loop is polled, unless the keep-alive is off.
        eventloop
            .mqtt_options
            .set_keep_alive(std::time::Duration::ZERO);
        // Until the broker closes: the first error is the end of the
        // stream (polling past it would connect again).
        while eventloop.poll().await.is_ok() {}
    };
    if tokio::time::timeout(LEAVE_TIMEOUT, leaving).await.is_err() {
        tracing::debug!("the broker did not close the connection after DISCONNECT");
    }
}

/// The agent's loop: publish what it hands out, feed it what arrives, fire its
/// timer. `Err(None)` when the overall deadline passes.
async fn drive<R: RequestKind>(
    agent: &mut Exchange<SoftKeyStore, R>,
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    clock: Instant,
    deadline: Instant,
) -> Result<Event, Option<SimError>> {
    let now_ms = || u64::try_from(clock.elapsed().as_millis()).unwrap_or(u64::MAX);
    let mut buf = [0u8; MAX_REQUEST];
    loop {
        while let Some(transmit) = agent.poll_transmit(&mut buf) {
            tracing::debug!(attempt = transmit.attempt, topic = %transmit.topic, "publishing request");
            client
                .try_publish(
                    transmit.topic.as_str(),
                    QoS::AtLeastOnce,
                    false,
                    buf[..transmit.len].to_vec(),
                )
                .map_err(|e| Some(e.into()))?;
        }
        if let Some(event) = agent.poll_event() {
            return Ok(event);
        }
        // The agent is waiting whenever it has no event, so it has a deadline.
        let wake = clock + Duration::from_millis(agent.poll_timeout().unwrap_or(u64::MAX / 2));
        tokio::select! {
            () = sleep_until(deadline) => return Err(None),
            () = sleep_until(wake) => agent.handle_timeout(now_ms()),
            polled = eventloop.poll() => {
                let polled = polled.map_err(|e| Some(e.into()))?;
                if let MqttEvent::Incoming(Packet::Publish(publish)) = polled {
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
    }
}

/// The agent's final event as the simulator reports it.
pub(crate) fn outcome<R: RequestKind>(
    event: Event,
    agent: Exchange<SoftKeyStore, R>,
) -> Result<Enrolled, SimError> {
    let certified = match event {
        Event::Enrolled(certified) | Event::Renewed(certified) => certified,
        Event::Rejected(rejection) => {
            return Err(SimError::Rejected {
                code: rejection.code_str().to_owned(),
                message: rejection.message().to_owned(),
            });
        }
        Event::GaveUp { attempts } => return Err(SimError::GaveUp { attempts }),
        _ => return Err(SimError::Internal("unknown agent event")),
    };
    let rid = agent.rid().to_string();
    let attempts = agent.attempts();
    let certificate = agent
        .certificate()
        .ok_or(SimError::Internal("certified without a certificate"))?
        .to_vec();
    let chain = agent.chain().map(<[u8]>::to_vec).collect();
    Ok(Enrolled {
        rid,
        key_pem: agent.into_key_store().current_key_pem()?,
        certificate,
        chain,
        serial: certified.serial.to_string(),
        not_before: certified.not_before,
        not_after: certified.not_after,
        gateway_time: certified.gateway_time,
        renew_after: certified.renew_after,
        renew_before: certified.renew_before,
        attempts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use idgate_agent::{Enroll, Renew};

    #[test]
    fn reply_topics_match_the_protocol() {
        assert_eq!(
            reply_topics::<Enroll>("sensor-1"),
            [
                "idgate/v1/devices/sensor-1/enroll/cbor/accepted",
                "idgate/v1/devices/sensor-1/enroll/cbor/rejected"
            ]
        );
        assert_eq!(
            reply_topics::<Renew>("sensor-1")[1],
            "idgate/v1/devices/sensor-1/renew/cbor/rejected"
        );
    }
}
