//! Sans-IO tests of the enrollment state machine: the agent wired to an
//! in-memory fake gateway on a virtual clock, with a link that can lose, repeat,
//! forge and mangle messages. Nothing here touches a socket or sleeps.
// Helpers outside `#[test]` functions are test code too: a failure is a panic.
#![allow(clippy::unwrap_used)]

use idgate_agent::{
    Certified, ChainError, Config, Enroll, Enrollment, Error, Event, Exchange, HardwareError,
    KeepSerial, KeyOperation, PeerError, RetryPolicy, Rid, UsageError,
};
use idgate_hal::{ErrorKind, KeySlot, KeyStore};
use idgate_pki::csr::p256_spki;
use idgate_pki::der::certificate_spki;
use idgate_pki::protocol::{EnrollRequest, RejectCode};
use idgate_sim::{Operation, SoftKeyStore};

mod common;

use common::{
    ACCEPTED_ENROLL as ACCEPTED, DEVICE, REJECTED_ENROLL as REJECTED, TOKEN, VALID,
    answered_enrollment, expire, fast_retry, gateway, promotion_failure_is_recovered, roots,
    transmit, truncations,
};
use idgate_sim::FakeGateway;
use idgate_sim::fake_gateway::Answer;

fn start(store: &mut SoftKeyStore, now: u64) -> Enrollment<&mut SoftKeyStore> {
    start_with(store, TOKEN, now)
}

fn start_with<'a>(
    store: &'a mut SoftKeyStore,
    token: &[u8],
    now: u64,
) -> Enrollment<&'a mut SoftKeyStore> {
    let config = Config {
        device_id: DEVICE,
        token,
        retry: fast_retry(),
        pinned_roots: roots(),
    };
    let rid = Rid::random(&mut rand::rngs::OsRng);
    Enrollment::start(&config, store, rid, now).unwrap()
}

fn assert_enrolled(agent: &mut Enrollment<&mut SoftKeyStore>, gateway: &FakeGateway) {
    match agent.poll_event() {
        Some(Event::Enrolled(Certified {
            serial,
            not_after,
            gateway_time,
            ..
        })) => {
            assert_eq!(Some(serial.as_str()), agent.serial());
            assert_eq!(not_after, 1_700_086_400);
            assert_eq!(gateway_time, 1_700_000_300);
        }
        other => panic!("expected Enrolled, got {other:?}"),
    }
    assert_eq!(agent.poll_event(), None);
    assert!(agent.is_finished());
    assert_eq!(agent.poll_timeout(), None);
    let certificate = agent.certificate().unwrap();
    assert_eq!(
        certificate_spki(certificate).unwrap(),
        &p256_spki(agent.public_key())[..]
    );
    let chain: Vec<&[u8]> = agent.chain().collect();
    assert_eq!(chain, vec![gateway.ca_der()]);
    // The certified key is now the current one; nothing is staged.
    assert_eq!(
        agent.key_store().public_key(KeySlot::Current).unwrap(),
        *agent.public_key()
    );
    assert!(agent.key_store().public_key(KeySlot::Next).is_err());
}

#[test]
fn happy_path() {
    let mut store = SoftKeyStore::new();
    let mut gateway = gateway();
    let mut agent = start(&mut store, 0);
    assert_eq!(
        agent.subscriptions().each_ref().map(|t| t.as_str()),
        [ACCEPTED, REJECTED]
    );
    assert_eq!(agent.attempts(), 1);
    let (topic, payload) = transmit(&mut agent).unwrap();
    assert_eq!(transmit(&mut agent), None, "one transmission per attempt");
    let request = EnrollRequest::decode_cbor(&payload).unwrap();
    assert_eq!(request.rid, agent.rid().as_str());
    assert_eq!(request.rid.len(), 16);
    assert!(
        request
            .rid
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );

    let (reply_topic, reply) = gateway.handle(&topic, &payload).unwrap();
    agent.handle_message(300, &reply_topic, &reply).unwrap();
    assert_enrolled(&mut agent, &gateway);
    assert_eq!(agent.ignored_messages(), 0);
    assert_eq!(
        store.current_key_pem().unwrap().lines().next(),
        Some("-----BEGIN PRIVATE KEY-----")
    );
}

#[test]
fn lost_request_is_retransmitted_unchanged() {
    let mut store = SoftKeyStore::new();
    let mut gateway = gateway();
    let mut now = 10_000;
    let mut agent = start(&mut store, now);
    let (_, first) = transmit(&mut agent).unwrap(); // lost on the way
    assert_eq!(transmit(&mut agent), None);

    // Early timers do nothing.
    agent.handle_timeout(now + 1);
    assert_eq!(transmit(&mut agent), None);

    expire(&mut agent, &mut now);
    assert_eq!(agent.attempts(), 2);
    let (topic, second) = transmit(&mut agent).unwrap();
    assert_eq!(first, second, "identical payload, same rid");
    let (reply_topic, reply) = gateway.handle(&topic, &second).unwrap();
    agent.handle_message(now, &reply_topic, &reply).unwrap();
    assert_enrolled(&mut agent, &gateway);
}

#[test]
fn lost_reply_is_recovered_by_retransmission() {
    let mut store = SoftKeyStore::new();
    let mut gateway = gateway();
    let mut now = 0;
    let mut agent = start(&mut store, now);
    let (topic, payload) = transmit(&mut agent).unwrap();
    let lost = gateway.handle(&topic, &payload).unwrap();
    expire(&mut agent, &mut now);
    let (topic, again) = transmit(&mut agent).unwrap();
    let (reply_topic, reply) = gateway.handle(&topic, &again).unwrap();
    assert_eq!(
        lost.1, reply,
        "the gateway answers a repeated rid the same way"
    );
    assert_eq!(gateway.issued, 1);
    agent.handle_message(now, &reply_topic, &reply).unwrap();
    assert_enrolled(&mut agent, &gateway);
}

#[test]
fn duplicate_reply_is_ignored() {
    let mut store = SoftKeyStore::new();
    let mut gateway = gateway();
    let mut agent = start(&mut store, 0);
    let (topic, payload) = transmit(&mut agent).unwrap();
    let (reply_topic, reply) = gateway.handle(&topic, &payload).unwrap();
    agent.handle_message(1, &reply_topic, &reply).unwrap();
    assert_eq!(
        agent.handle_message(2, &reply_topic, &reply),
        Err(Error::Peer(PeerError::Finished))
    );
    assert_enrolled(&mut agent, &gateway);
    assert_eq!(agent.ignored_messages(), 1);
    assert_eq!(transmit(&mut agent), None);
}

#[test]
fn reply_with_another_rid_is_ignored() {
    let mut store = SoftKeyStore::new();
    let mut gateway = gateway();
    let mut agent = start(&mut store, 0);
    let (topic, payload) = transmit(&mut agent).unwrap();
    let public_key = agent.public_key().to_vec();
    let (certificate, serial) = gateway.forge(DEVICE, &public_key, VALID);
    let forged = gateway.issued_reply("0000000000000000", &certificate, &serial);
    assert_eq!(
        agent.handle_message(1, ACCEPTED, &forged),
        Err(Error::Peer(PeerError::OtherRid))
    );
    let forged = FakeGateway::rejected_reply("0000000000000000", "bad_proof");
    assert_eq!(
        agent.handle_message(1, REJECTED, &forged),
        Err(Error::Peer(PeerError::OtherRid))
    );
    let broken_request = FakeGateway::rejected_reply("", "malformed");
    assert_eq!(
        agent.handle_message(1, REJECTED, &broken_request),
        Err(Error::Peer(PeerError::OtherRid))
    );
    assert!(!agent.is_finished());
    assert_eq!(agent.poll_event(), None);
    let (reply_topic, reply) = gateway.handle(&topic, &payload).unwrap();
    agent.handle_message(2, &reply_topic, &reply).unwrap();
    assert_enrolled(&mut agent, &gateway);
    assert_eq!(agent.ignored_messages(), 3);
}

#[test]
fn certificate_for_another_key_is_refused() {
    let mut store = SoftKeyStore::new();
    let mut gateway = gateway();
    let mut agent = start(&mut store, 0);
    let (topic, payload) = transmit(&mut agent).unwrap();

    let mut other = SoftKeyStore::new();
    let other_key = other.generate_next().unwrap();
    let (certificate, serial) = gateway.forge(DEVICE, &other_key, VALID);
    let forged = gateway.issued_reply(agent.rid().as_str(), &certificate, &serial);
    assert_eq!(
        agent.handle_message(1, ACCEPTED, &forged),
        Err(Error::Peer(PeerError::WrongKey))
    );
    // Not promoted: nothing current yet, our key still staged.
    assert!(agent.key_store().public_key(KeySlot::Current).is_err());
    assert_eq!(
        agent.key_store().public_key(KeySlot::Next).unwrap(),
        *agent.public_key()
    );
    // A "certificate" that is not one is refused too.
    let forged = gateway.issued_reply(agent.rid().as_str(), &[0x30, 0x03, 1, 2, 3], "01");
    assert!(matches!(
        agent.handle_message(1, ACCEPTED, &forged),
        Err(Error::Peer(PeerError::BadCertificate(_)))
    ));

    let (reply_topic, reply) = gateway.handle(&topic, &payload).unwrap();
    agent.handle_message(2, &reply_topic, &reply).unwrap();
    assert_enrolled(&mut agent, &gateway);
}

#[test]
fn certificate_from_an_unpinned_ca_is_refused() {
    let mut store = SoftKeyStore::new();
    let mut gateway = gateway();
    let mut impostor = FakeGateway::with_own_ca(std::str::from_utf8(TOKEN).unwrap());
    let mut agent = start(&mut store, 0);
    let (topic, payload) = transmit(&mut agent).unwrap();
    let chain_error = |result| match result {
        Err(Error::Peer(PeerError::Chain(e))) => e,
        other => panic!("expected a chain error, got {other:?}"),
    };

    // An impostor on the broker answers first, for our very key, from its own CA.
    let (reply_topic, forged) = impostor.handle(&topic, &payload).unwrap();
    assert_eq!(
        chain_error(agent.handle_message(1, &reply_topic, &forged)),
        ChainError::BadSignature
    );
    // Its certificate with the pinned root as the chain.
    let (certificate, serial) = impostor.forge(DEVICE, agent.public_key(), VALID);
    let forged = gateway.issued_reply(agent.rid().as_str(), &certificate, &serial);
    assert_eq!(
        chain_error(agent.handle_message(1, ACCEPTED, &forged)),
        ChainError::BadSignature
    );
    // A genuine certificate with the impostor's CA as its chain.
    let (certificate, serial) = gateway.forge(DEVICE, agent.public_key(), VALID);
    let forged = gateway.issued_reply_with_chain(
        agent.rid().as_str(),
        &certificate,
        &serial,
        &[impostor.ca_der()],
    );
    assert_eq!(
        chain_error(agent.handle_message(1, ACCEPTED, &forged)),
        ChainError::BadSignature
    );
    // With no chain at all the pinned root still signs it: accepted below.
    // A chain of garbage.
    let forged = gateway.issued_reply_with_chain(
        agent.rid().as_str(),
        &certificate,
        &serial,
        &[&[0x30, 0x00]],
    );
    assert!(matches!(
        chain_error(agent.handle_message(1, ACCEPTED, &forged)),
        ChainError::Malformed(_)
    ));
    // Nothing was promoted; the agent keeps waiting.
    assert!(agent.key_store().public_key(KeySlot::Current).is_err());
    assert!(!agent.is_finished());
    assert_eq!(agent.ignored_messages(), 4);
    assert_eq!(agent.poll_event(), None);

    let (reply_topic, reply) = gateway.handle(&topic, &payload).unwrap();
    agent.handle_message(2, &reply_topic, &reply).unwrap();
    assert_enrolled(&mut agent, &gateway);
}

/// A request that keeps only the serial (a device taking the certificate
/// from its receive buffer) runs the same checks: a forged chain is refused,
/// the genuine reply certifies, and its certificate is left in the reply.
#[test]
fn keeping_only_the_serial_checks_the_same() {
    let mut store = SoftKeyStore::new();
    let mut gateway = gateway();
    let mut impostor = FakeGateway::with_own_ca(std::str::from_utf8(TOKEN).unwrap());
    let config = Config {
        device_id: DEVICE,
        token: TOKEN,
        retry: fast_retry(),
        pinned_roots: roots(),
    };
    let rid = Rid::random(&mut rand::rngs::OsRng);
    let mut agent: Exchange<_, Enroll, KeepSerial> =
        Exchange::<_, Enroll, KeepSerial>::start(&config, &mut store, rid, 0).unwrap();
    let (topic, payload) = transmit(&mut agent).unwrap();
    let (reply_topic, forged) = impostor.handle(&topic, &payload).unwrap();
    assert!(matches!(
        agent.handle_message(1, &reply_topic, &forged),
        Err(Error::Peer(PeerError::Chain(ChainError::BadSignature)))
    ));
    assert!(!agent.is_finished());
    assert!(agent.key_store().public_key(KeySlot::Current).is_err());

    let (reply_topic, reply) = gateway.handle(&topic, &payload).unwrap();
    agent.handle_message(2, &reply_topic, &reply).unwrap();
    let Some(Event::Enrolled(certified)) = agent.poll_event() else {
        panic!("expected Enrolled");
    };
    assert_eq!(agent.serial(), Some(certified.serial.as_str()));
    assert_eq!(agent.certificate(), None);
    assert_eq!(agent.chain().count(), 0);
    let issued = idgate_pki::protocol::Issued::decode_cbor(&reply).unwrap();
    assert_eq!(issued.serial, certified.serial.as_str());
    assert_eq!(
        certificate_spki(issued.certificate).unwrap(),
        &p256_spki(agent.public_key())[..]
    );
    assert_eq!(
        agent.key_store().public_key(KeySlot::Current).unwrap(),
        *agent.public_key()
    );
}

#[test]
fn a_certificate_signed_by_the_root_needs_no_chain() {
    let mut store = SoftKeyStore::new();
    let mut gateway = gateway();
    let mut agent = start(&mut store, 0);
    let public_key = agent.public_key().to_vec();
    let (certificate, serial) = gateway.forge(DEVICE, &public_key, VALID);
    let reply = gateway.issued_reply_with_chain(agent.rid().as_str(), &certificate, &serial, &[]);
    agent.handle_message(1, ACCEPTED, &reply).unwrap();
    assert!(matches!(agent.poll_event(), Some(Event::Enrolled(_))));
}

#[test]
fn replies_on_foreign_topics_are_ignored() {
    let mut store = SoftKeyStore::new();
    let mut gateway = gateway();
    let mut agent = start(&mut store, 0);
    let (topic, payload) = transmit(&mut agent).unwrap();
    let (_, reply) = gateway.handle(&topic, &payload).unwrap();
    for (topic, expected) in [
        (
            "idgate/v1/devices/sensor-0043/enroll/cbor/accepted",
            PeerError::OtherDevice,
        ),
        (
            "idgate/v1/devices/sensor-0042/enroll/json/accepted",
            PeerError::NotOurReply,
        ),
        (
            "idgate/v1/devices/sensor-0042/enroll/cbor",
            PeerError::NotOurReply,
        ),
        (
            "idgate/v1/devices/sensor-0042/enroll/cbor/other",
            PeerError::UnknownTopic,
        ),
        ("sensors/temperature", PeerError::UnknownTopic),
        ("", PeerError::UnknownTopic),
    ] {
        assert_eq!(
            agent.handle_message(1, topic, &reply),
            Err(Error::Peer(expected)),
            "{topic}"
        );
    }
    assert!(!agent.is_finished());
    agent.handle_message(2, ACCEPTED, &reply).unwrap();
    assert_enrolled(&mut agent, &gateway);
}

#[test]
fn internal_rejection_is_retried() {
    let mut store = SoftKeyStore::new();
    let mut gateway = gateway();
    gateway
        .answers
        .extend([Answer::Reject("internal"), Answer::Reject("internal")]);
    let mut now = 0;
    let mut agent = start(&mut store, now);
    for attempt in 1..=3 {
        let (topic, payload) = transmit(&mut agent).unwrap();
        let (reply_topic, reply) = gateway.handle(&topic, &payload).unwrap();
        agent.handle_message(now, &reply_topic, &reply).unwrap();
        if attempt < 3 {
            assert_eq!(reply_topic, REJECTED);
            assert_eq!(agent.poll_event(), None);
            // Not resent at once: the backoff still applies.
            assert_eq!(transmit(&mut agent), None);
            expire(&mut agent, &mut now);
        }
    }
    assert_enrolled(&mut agent, &gateway);
}

#[test]
fn final_rejection_stops() {
    let mut store = SoftKeyStore::new();
    let mut gateway = gateway();
    let mut agent = start_with(&mut store, b"wrong token", 0);
    let (topic, payload) = transmit(&mut agent).unwrap();
    let (reply_topic, reply) = gateway.handle(&topic, &payload).unwrap();
    agent.handle_message(1, &reply_topic, &reply).unwrap();
    match agent.poll_event() {
        Some(Event::Rejected(rejection)) => {
            assert_eq!(rejection.code(), Some(RejectCode::BadProof));
            assert_eq!(rejection.code_str(), "bad_proof");
            assert_eq!(rejection.message(), "fake gateway says no");
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert!(agent.is_finished());
    assert_eq!(agent.poll_timeout(), None);
    agent.handle_timeout(u64::MAX);
    assert_eq!(transmit(&mut agent), None);
    assert_eq!(agent.poll_event(), None);
    assert_eq!(agent.certificate(), None);
    // Key never promoted.
    assert!(agent.key_store().public_key(KeySlot::Current).is_err());
}

#[test]
fn unknown_rejection_codes_are_final() {
    let mut store = SoftKeyStore::new();
    let mut agent = start(&mut store, 0);
    let rid = agent.rid().as_str().to_owned();
    let code = "quota_exceeded_for_this_device_in_this_region";
    agent
        .handle_message(1, REJECTED, &FakeGateway::rejected_reply(&rid, code))
        .unwrap();
    match agent.poll_event() {
        Some(Event::Rejected(rejection)) => {
            assert_eq!(rejection.code(), None);
            assert!(code.starts_with(rejection.code_str()));
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
}

#[test]
fn truncated_and_garbage_replies_are_ignored() {
    let mut store = SoftKeyStore::new();
    let mut gateway = gateway();
    let mut agent = start(&mut store, 0);
    let (topic, payload) = transmit(&mut agent).unwrap();
    let (reply_topic, reply) = gateway.handle(&topic, &payload).unwrap();
    let rejection = FakeGateway::rejected_reply(agent.rid().as_str(), "bad_proof");
    truncations(&mut agent, REJECTED, &rejection);
    truncations(&mut agent, &reply_topic, &reply);
    agent.handle_message(2, &reply_topic, &reply).unwrap();
    assert_enrolled(&mut agent, &gateway);
}

#[test]
fn bit_flipped_replies_never_panic() {
    // A flipped bit may leave a valid reply (another serial, a changed chain, an
    // unknown rejection code) that ends the enrollment, so only panics are
    // checked, with a fresh device whenever a flip finished the previous one.
    let mut gateway = gateway();
    let fresh = |gateway: &mut FakeGateway| {
        let (agent, (_, reply)) = answered_enrollment(gateway);
        let rejection = FakeGateway::rejected_reply(agent.rid().as_str(), "internal");
        (agent, reply, rejection)
    };
    let (mut agent, mut reply, mut rejection) = fresh(&mut gateway);
    let mut restarts = 0;
    for accepted in [true, false] {
        let len = if accepted {
            reply.len()
        } else {
            rejection.len()
        };
        for i in 0..len {
            let (topic, mut message) = if accepted {
                (ACCEPTED, reply.clone())
            } else {
                (REJECTED, rejection.clone())
            };
            // A restart brings a reply of another length (ECDSA signatures vary).
            let Some(byte) = message.get_mut(i) else {
                break;
            };
            *byte ^= 0x01;
            let _ = agent.handle_message(1, topic, &message);
            if agent.is_finished() {
                restarts += 1;
                (agent, reply, rejection) = fresh(&mut gateway);
            }
        }
    }
    // Many flips are accepted: the agent checks that a certificate is for its key,
    // not who signed it (see the crate docs), so a flip outside the key and the
    // rid yields a certificate the agent takes.
    eprintln!("{restarts} flipped replies ended an enrollment");
}

#[test]
fn gives_up_after_the_last_attempt() {
    let mut store = SoftKeyStore::new();
    let policy = fast_retry();
    let mut now = 1_000;
    let mut agent = start(&mut store, now);
    let mut sent = Vec::new();
    let mut waits = Vec::new();
    while !agent.is_finished() {
        if let Some((_, payload)) = transmit(&mut agent) {
            sent.push(payload);
        }
        let before = now;
        expire(&mut agent, &mut now);
        waits.push(now - before);
    }
    assert_eq!(sent.len(), policy.max_attempts as usize);
    assert!(sent.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(
        agent.poll_event(),
        Some(Event::GaveUp {
            attempts: policy.max_attempts
        })
    );
    // Exponential, within the jitter, capped.
    for (i, wait) in waits.iter().enumerate() {
        let base = policy.base_timeout_ms(i as u32 + 1);
        assert!(
            *wait <= base && *wait >= base * 8 / 10,
            "wait {i}: {wait} vs {base}"
        );
    }
    assert_eq!(policy.base_timeout_ms(5), 8_000);
    assert_eq!(agent.poll_timeout(), None);
}

#[test]
fn promotion_failure_keeps_waiting() {
    let mut store = SoftKeyStore::new();
    let mut gateway = gateway();
    let mut agent = start(&mut store, 0);
    promotion_failure_is_recovered(&mut agent, &mut gateway);
    assert_enrolled(&mut agent, &gateway);
}

#[test]
fn key_store_faults_are_reported() {
    let config = Config {
        device_id: DEVICE,
        token: TOKEN,
        retry: fast_retry(),
        pinned_roots: roots(),
    };
    let rid = || Rid::new("r-1").unwrap();
    for (operation, expected) in [
        (Operation::Generate, KeyOperation::Generate),
        (Operation::Sign, KeyOperation::Sign),
    ] {
        let mut store = SoftKeyStore::new();
        store.fail_once(operation);
        assert_eq!(
            Enrollment::start(&config, &mut store, rid(), 0).unwrap_err(),
            Error::Hardware(HardwareError::KeyStore {
                operation: expected,
                kind: ErrorKind::Communication
            })
        );
    }
}

#[test]
fn misuse_is_refused() {
    let mut store = SoftKeyStore::new();
    let rid = || Rid::new("r-1").unwrap();
    let good = Config {
        device_id: DEVICE,
        token: TOKEN,
        retry: RetryPolicy::default(),
        pinned_roots: roots(),
    };
    for (config, expected) in [
        (
            Config {
                device_id: "a/b",
                ..good
            },
            "BadDeviceId",
        ),
        (Config { token: b"", ..good }, "EmptyToken"),
        (
            Config {
                pinned_roots: &[],
                ..good
            },
            "BadPinnedRoots",
        ),
        (
            Config {
                pinned_roots: &[&[0x30, 0x00]],
                ..good
            },
            "BadPinnedRoots",
        ),
        (
            Config {
                pinned_roots: &[roots()[0], roots()[0], roots()[0]],
                ..good
            },
            "BadPinnedRoots",
        ),
        (
            Config {
                retry: RetryPolicy {
                    max_attempts: 0,
                    ..RetryPolicy::DEFAULT
                },
                ..good
            },
            "BadRetryPolicy",
        ),
    ] {
        let err = Enrollment::start(&config, &mut store, rid(), 0).unwrap_err();
        assert!(matches!(err, Error::Usage(_)), "{err:?}");
        assert!(format!("{err:?}").contains(expected), "{err:?}");
    }
    assert!(matches!(Rid::new("has space"), Err(UsageError::BadRid(_))));
    // Refused before the key store is touched.
    assert!(store.public_key(KeySlot::Next).is_err());
}
