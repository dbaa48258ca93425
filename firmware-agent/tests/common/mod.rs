//! What the sans-IO tests share: the device, helpers that drive an agent on a
//! virtual clock, and a device enrolled at the fake gateway
//! ([`idgate_sim::FakeGateway`]).
// Helpers outside `#[test]` functions are test code too: a failure is a panic;
// and not every test binary uses every helper.
#![allow(clippy::unwrap_used, dead_code)]

use idgate_agent::{
    Config, Enrollment, Error, Event, Exchange, HardwareError, KeyOperation, MAX_REQUEST,
    PeerError, RequestKind, RetryPolicy, Rid,
};
use idgate_hal::{ErrorKind, KeyStore};
use idgate_sim::{FakeGateway, Operation, SoftKeyStore};

pub const DEVICE: &str = "sensor-0042";
pub const TOKEN: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
pub const ACCEPTED_ENROLL: &str = "idgate/v1/devices/sensor-0042/enroll/cbor/accepted";
pub const REJECTED_ENROLL: &str = "idgate/v1/devices/sensor-0042/enroll/cbor/rejected";
pub const ACCEPTED_RENEW: &str = "idgate/v1/devices/sensor-0042/renew/cbor/accepted";
pub const REJECTED_RENEW: &str = "idgate/v1/devices/sensor-0042/renew/cbor/rejected";
/// A validity for forged certificates (unix seconds): 2023 to 2100.
pub const VALID: (i64, i64) = (1_700_000_000, 4_102_444_800);

/// The root every device in these tests pins: the fake gateways' shared CA.
pub fn roots() -> &'static [&'static [u8]] {
    static ROOTS: std::sync::OnceLock<[&'static [u8]; 1]> = std::sync::OnceLock::new();
    ROOTS.get_or_init(|| [Box::leak(FakeGateway::shared_ca_der().into_boxed_slice())])
}

/// A fake gateway that knows `TOKEN`.
pub fn gateway() -> FakeGateway {
    FakeGateway::new(std::str::from_utf8(TOKEN).unwrap())
}

pub fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        initial_timeout_ms: 1_000,
        max_timeout_ms: 8_000,
        jitter_percent: 20,
        max_attempts: 5,
    }
}

/// The next transmission's topic and payload.
pub fn transmit<K: KeyStore, R: RequestKind, S: idgate_agent::Keep>(
    agent: &mut Exchange<K, R, S>,
) -> Option<(String, Vec<u8>)> {
    let mut buf = [0u8; MAX_REQUEST];
    let t = agent.poll_transmit(&mut buf)?;
    Some((t.topic.to_string(), buf[..t.len].to_vec()))
}

/// Advances the virtual clock to the agent's deadline and fires it.
pub fn expire<K: KeyStore, R: RequestKind>(agent: &mut Exchange<K, R>, now: &mut u64) {
    let deadline = agent.poll_timeout().expect("agent is waiting");
    assert!(deadline > *now);
    *now = deadline;
    agent.handle_timeout(*now);
}

/// Feeds every proper prefix of `reply`, then garbage: each is refused and
/// changes nothing.
pub fn truncations<K: KeyStore, R: RequestKind>(
    agent: &mut Exchange<K, R>,
    topic: &str,
    reply: &[u8],
) {
    for cut in 0..reply.len() {
        let result = agent.handle_message(1, topic, &reply[..cut]);
        assert!(
            matches!(result, Err(Error::Peer(PeerError::Decode(_)))),
            "cut {cut}: {result:?}"
        );
        assert!(!agent.is_finished());
    }
    for garbage in [
        &b"\xff"[..],
        b"\xa0\xa0",
        b"\xbf\xff",
        b"{\"rid\":1}",
        &[0u8; 3000],
    ] {
        assert!(agent.handle_message(1, topic, garbage).is_err());
        assert!(!agent.is_finished());
    }
    assert_eq!(agent.poll_event(), None);
}

/// A new device's enrollment whose request `gateway` has answered, and the
/// answer (topic, payload), not yet delivered.
pub fn answered_enrollment(
    gateway: &mut FakeGateway,
) -> (Enrollment<SoftKeyStore>, (String, Vec<u8>)) {
    let config = Config {
        device_id: DEVICE,
        token: TOKEN,
        retry: fast_retry(),
        pinned_roots: roots(),
    };
    let rid = Rid::random(&mut rand::rngs::OsRng);
    let mut agent = Enrollment::start(&config, SoftKeyStore::new(), rid, 0).unwrap();
    let (topic, payload) = transmit(&mut agent).unwrap();
    let reply = gateway.handle(&topic, &payload).unwrap();
    (agent, reply)
}

/// A device enrolled at `gateway`: its key store (the certified key current)
/// and its certificate's serial.
pub fn enrolled_device(gateway: &mut FakeGateway) -> (SoftKeyStore, String) {
    let (mut agent, (reply_topic, reply)) = answered_enrollment(gateway);
    agent.handle_message(1, &reply_topic, &reply).unwrap();
    let Some(Event::Enrolled(certified)) = agent.poll_event() else {
        panic!("not enrolled");
    };
    (agent.into_key_store(), certified.serial.to_string())
}

/// Answers the agent's request, makes the key store fail to promote the key
/// when the good reply arrives, and checks that the agent keeps waiting and
/// takes the same reply again after its next retransmission.
pub fn promotion_failure_is_recovered<R: RequestKind>(
    agent: &mut Exchange<&mut SoftKeyStore, R>,
    gateway: &mut FakeGateway,
) {
    let mut now = agent.poll_timeout().unwrap() - 1;
    let (topic, payload) = transmit(agent).unwrap();
    let (reply_topic, reply) = gateway.handle(&topic, &payload).unwrap();
    agent.key_store_mut().fail_once(Operation::Promote);
    assert_eq!(
        agent.handle_message(now, &reply_topic, &reply),
        Err(Error::Hardware(HardwareError::KeyStore {
            operation: KeyOperation::Promote,
            kind: ErrorKind::Communication
        }))
    );
    assert!(!agent.is_finished());
    assert_eq!(agent.poll_event(), None);
    assert_eq!(
        agent.ignored_messages(),
        0,
        "a good reply is not counted as ignored"
    );
    // The next retransmission brings the same certificate back.
    expire(agent, &mut now);
    let (topic, payload) = transmit(agent).unwrap();
    let (reply_topic, again) = gateway.handle(&topic, &payload).unwrap();
    assert_eq!(again, reply);
    agent.handle_message(now, &reply_topic, &again).unwrap();
}
