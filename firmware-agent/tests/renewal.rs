//! Sans-IO tests of the renewal state machine: an enrolled device renews at the
//! in-memory fake gateway, which checks the request's signature with p256
//! against the key of the certificate it issued, on a virtual clock, over a
//! link that can lose, repeat, forge and mangle messages.
// Helpers outside `#[test]` functions are test code too: a failure is a panic.
#![allow(clippy::unwrap_used)]

mod common;

use common::{
    ACCEPTED_ENROLL, ACCEPTED_RENEW as ACCEPTED, DEVICE, REJECTED_RENEW as REJECTED, VALID,
    enrolled_device, expire, fast_retry, gateway, promotion_failure_is_recovered, roots, transmit,
    truncations,
};
use idgate_agent::{
    Certified, Error, Event, HardwareError, KeyOperation, PeerError, RenewConfig, Renewal, Rid,
    UsageError,
};
use idgate_hal::{ErrorKind, KeySlot, KeyStore, P256PublicKey};
use idgate_pki::csr::p256_spki;
use idgate_pki::der::certificate_spki;
use idgate_pki::protocol::{RejectCode, RenewRequest};
use idgate_sim::fake_gateway::{Answer, NOT_AFTER};
use idgate_sim::{FakeGateway, Operation, SoftKeyStore};

/// An enrolled device at a fake gateway, ready to renew.
struct Device {
    gateway: FakeGateway,
    store: SoftKeyStore,
    serial: String,
    old_key: P256PublicKey,
}

fn device() -> Device {
    let mut gateway = gateway();
    let (store, serial) = enrolled_device(&mut gateway);
    let old_key = store.public_key(KeySlot::Current).unwrap();
    Device {
        gateway,
        store,
        serial,
        old_key,
    }
}

fn start<'a>(
    store: &'a mut SoftKeyStore,
    serial: &str,
    counter: u64,
    now: u64,
) -> Renewal<&'a mut SoftKeyStore> {
    let config = RenewConfig {
        device_id: DEVICE,
        serial,
        counter,
        retry: fast_retry(),
        pinned_roots: roots(),
    };
    let rid = Rid::random(&mut rand::rngs::OsRng);
    Renewal::start(&config, store, rid, now).unwrap()
}

/// The agent ended with a new certificate for a new, now current, key.
fn assert_renewed(agent: &mut Renewal<&mut SoftKeyStore>, old_key: &P256PublicKey, old: &str) {
    let certified = match agent.poll_event() {
        Some(Event::Renewed(certified)) => certified,
        other => panic!("expected Renewed, got {other:?}"),
    };
    let Certified {
        serial, not_after, ..
    } = &certified;
    assert_eq!(Some(serial.as_str()), agent.serial());
    assert_ne!(serial.as_str(), old);
    assert_eq!(*not_after, NOT_AFTER);
    assert_eq!(agent.poll_event(), None);
    assert!(agent.is_finished());
    assert_eq!(agent.poll_timeout(), None);
    assert_eq!(
        certificate_spki(agent.certificate().unwrap()).unwrap(),
        &p256_spki(agent.public_key())[..]
    );
    assert_ne!(agent.public_key(), old_key);
    assert_eq!(
        agent.key_store().public_key(KeySlot::Current).unwrap(),
        *agent.public_key()
    );
    assert!(agent.key_store().public_key(KeySlot::Next).is_err());
}

/// The renewal ended without touching the current key.
fn assert_key_kept(agent: &Renewal<&mut SoftKeyStore>, old_key: &P256PublicKey) {
    assert!(agent.is_finished());
    assert_eq!(agent.certificate(), None);
    assert_eq!(
        agent.key_store().public_key(KeySlot::Current).unwrap(),
        *old_key
    );
}

#[test]
fn happy_path_rotates_the_key() {
    let mut device = device();
    let (old_key, old_serial) = (device.old_key, device.serial.clone());
    let mut agent = start(&mut device.store, &device.serial, 1, 0);
    assert_eq!(
        agent.subscriptions().each_ref().map(|t| t.as_str()),
        [ACCEPTED, REJECTED]
    );
    assert_eq!(
        agent.request_topic(),
        "idgate/v1/devices/sensor-0042/renew/cbor"
    );
    // The new key waits in the Next slot; the old one is still current.
    assert_eq!(
        agent.key_store().public_key(KeySlot::Next).unwrap(),
        *agent.public_key()
    );
    assert_eq!(
        agent.key_store().public_key(KeySlot::Current).unwrap(),
        old_key
    );
    let (topic, payload) = transmit(&mut agent).unwrap();
    assert_eq!(transmit(&mut agent), None, "one transmission per attempt");
    let request = RenewRequest::decode_cbor(&payload).unwrap();
    assert_eq!(request.rid, agent.rid().as_str());
    assert_eq!((request.serial, request.counter), (old_serial.as_str(), 1));

    // The fake issues only if the signature verifies against the old
    // certificate's key.
    let (reply_topic, reply) = device.gateway.handle(&topic, &payload).unwrap();
    assert_eq!(reply_topic, ACCEPTED);
    agent.handle_message(300, &reply_topic, &reply).unwrap();
    assert_renewed(&mut agent, &old_key, &old_serial);
    assert_eq!(agent.ignored_messages(), 0);
    let new_serial = agent.serial().unwrap().to_owned();
    drop(agent);
    assert_eq!(device.gateway.issued, 2);
    assert_eq!(device.gateway.counter(DEVICE), Some(1));

    // And again, from the new certificate with the new key.
    let new_key = device.store.public_key(KeySlot::Current).unwrap();
    device.serial = new_serial.clone();
    let mut agent = start(&mut device.store, &device.serial, 2, 0);
    let (topic, payload) = transmit(&mut agent).unwrap();
    let (reply_topic, reply) = device.gateway.handle(&topic, &payload).unwrap();
    agent.handle_message(1, &reply_topic, &reply).unwrap();
    assert_renewed(&mut agent, &new_key, &new_serial);
}

#[test]
fn lost_request_and_lost_reply_are_recovered_unchanged() {
    let mut device = device();
    let old_key = device.old_key;
    let old_serial = device.serial.clone();
    let mut now = 5_000;
    let mut agent = start(&mut device.store, &device.serial, 7, now);
    let (_, first) = transmit(&mut agent).unwrap(); // lost on the way
    agent.handle_timeout(now + 1);
    assert_eq!(transmit(&mut agent), None, "early timers do nothing");
    expire(&mut agent, &mut now);
    let (topic, second) = transmit(&mut agent).unwrap();
    assert_eq!(first, second, "identical payload, same rid and signature");
    let lost = device.gateway.handle(&topic, &second).unwrap(); // reply lost
    expire(&mut agent, &mut now);
    let (topic, third) = transmit(&mut agent).unwrap();
    assert_eq!(first, third);
    assert_eq!(agent.attempts(), 3);
    let (reply_topic, reply) = device.gateway.handle(&topic, &third).unwrap();
    assert_eq!(lost.1, reply, "a repeated rid gets the same certificate");
    assert_eq!(device.gateway.issued, 2, "enrollment and one renewal");
    agent.handle_message(now, &reply_topic, &reply).unwrap();
    assert_renewed(&mut agent, &old_key, &old_serial);
}

#[test]
fn certificate_for_another_key_is_ignored() {
    let mut device = device();
    let (old_key, old_serial) = (device.old_key, device.serial.clone());
    let mut agent = start(&mut device.store, &device.serial, 1, 0);
    let (topic, payload) = transmit(&mut agent).unwrap();
    let rid = agent.rid().as_str().to_owned();

    // A certificate for the current (old) key, or for someone else's key: not
    // what we asked for.
    let mut other = SoftKeyStore::new();
    for key in [old_key, other.generate_next().unwrap()] {
        let (certificate, serial) = device.gateway.forge(DEVICE, &key, VALID);
        let forged = device.gateway.issued_reply(&rid, &certificate, &serial);
        assert_eq!(
            agent.handle_message(1, ACCEPTED, &forged),
            Err(Error::Peer(PeerError::WrongKey))
        );
    }
    // A certificate for the right key on the enrollment topic is not a reply to
    // a renewal.
    let (certificate, serial) = device.gateway.forge(DEVICE, agent.public_key(), VALID);
    let misplaced = device.gateway.issued_reply(&rid, &certificate, &serial);
    assert_eq!(
        agent.handle_message(1, ACCEPTED_ENROLL, &misplaced),
        Err(Error::Peer(PeerError::NotOurReply))
    );
    // Nothing promoted.
    assert!(!agent.is_finished());
    assert_eq!(
        agent.key_store().public_key(KeySlot::Current).unwrap(),
        old_key
    );
    assert_eq!(
        agent.key_store().public_key(KeySlot::Next).unwrap(),
        *agent.public_key()
    );
    assert_eq!(agent.ignored_messages(), 3);

    let (reply_topic, reply) = device.gateway.handle(&topic, &payload).unwrap();
    agent.handle_message(2, &reply_topic, &reply).unwrap();
    assert_renewed(&mut agent, &old_key, &old_serial);
}

#[test]
fn final_rejection_keeps_the_current_key() {
    for (code, expected) in [
        ("device_revoked", RejectCode::DeviceRevoked),
        ("clone_suspected", RejectCode::CloneSuspected),
        ("expired", RejectCode::Expired),
    ] {
        let mut device = device();
        let old_key = device.old_key;
        device.gateway.answers.push_back(Answer::Reject(code));
        let mut agent = start(&mut device.store, &device.serial, 1, 0);
        let (topic, payload) = transmit(&mut agent).unwrap();
        let (reply_topic, reply) = device.gateway.handle(&topic, &payload).unwrap();
        assert_eq!(reply_topic, REJECTED);
        agent.handle_message(1, &reply_topic, &reply).unwrap();
        match agent.poll_event() {
            Some(Event::Rejected(rejection)) => assert_eq!(rejection.code(), Some(expected)),
            other => panic!("expected Rejected, got {other:?}"),
        }
        assert_key_kept(&agent, &old_key);
        assert_eq!(agent.poll_timeout(), None);
        agent.handle_timeout(u64::MAX);
        assert_eq!(transmit(&mut agent), None);
    }
}

#[test]
fn replayed_counter_is_rejected_and_the_old_key_still_works() {
    let mut device = device();
    let old_key = device.old_key;
    device.gateway.set_counter(DEVICE, 10);
    let mut agent = start(&mut device.store, &device.serial, 10, 0);
    let (topic, payload) = transmit(&mut agent).unwrap();
    let (reply_topic, reply) = device.gateway.handle(&topic, &payload).unwrap();
    agent.handle_message(1, &reply_topic, &reply).unwrap();
    match agent.poll_event() {
        Some(Event::Rejected(rejection)) => {
            assert_eq!(rejection.code(), Some(RejectCode::CounterReplay));
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert_key_kept(&agent, &old_key);
    drop(agent);

    // The abandoned staged key is replaced by the next attempt's; the current
    // key still signs a renewal the gateway accepts.
    let old_serial = device.serial.clone();
    let mut agent = start(&mut device.store, &device.serial, 11, 0);
    let (topic, payload) = transmit(&mut agent).unwrap();
    let (reply_topic, reply) = device.gateway.handle(&topic, &payload).unwrap();
    agent.handle_message(1, &reply_topic, &reply).unwrap();
    assert_renewed(&mut agent, &old_key, &old_serial);
}

#[test]
fn unknown_serial_is_rejected() {
    let mut device = device();
    let old_key = device.old_key;
    device.serial = "00ff".into();
    let mut agent = start(&mut device.store, &device.serial, 1, 0);
    let (topic, payload) = transmit(&mut agent).unwrap();
    let (reply_topic, reply) = device.gateway.handle(&topic, &payload).unwrap();
    agent.handle_message(1, &reply_topic, &reply).unwrap();
    assert!(matches!(
        agent.poll_event(),
        Some(Event::Rejected(r)) if r.code() == Some(RejectCode::UnknownCertificate)
    ));
    assert_key_kept(&agent, &old_key);
}

#[test]
fn internal_rejection_is_retried() {
    let mut device = device();
    let (old_key, old_serial) = (device.old_key, device.serial.clone());
    device
        .gateway
        .answers
        .extend([Answer::Reject("internal"), Answer::Reject("internal")]);
    let mut now = 0;
    let mut agent = start(&mut device.store, &device.serial, 1, now);
    let mut sent = Vec::new();
    for attempt in 1..=3 {
        let (topic, payload) = transmit(&mut agent).unwrap();
        let (reply_topic, reply) = device.gateway.handle(&topic, &payload).unwrap();
        agent.handle_message(now, &reply_topic, &reply).unwrap();
        sent.push(payload);
        if attempt < 3 {
            assert_eq!(reply_topic, REJECTED);
            assert_eq!(agent.poll_event(), None);
            assert_eq!(transmit(&mut agent), None, "the backoff still applies");
            expire(&mut agent, &mut now);
        }
    }
    assert!(sent.windows(2).all(|w| w[0] == w[1]));
    assert_renewed(&mut agent, &old_key, &old_serial);
}

#[test]
fn giving_up_keeps_the_current_key() {
    let mut device = device();
    let old_key = device.old_key;
    let mut now = 0;
    let mut agent = start(&mut device.store, &device.serial, 1, now);
    while !agent.is_finished() {
        let _ = transmit(&mut agent);
        expire(&mut agent, &mut now);
    }
    assert_eq!(
        agent.poll_event(),
        Some(Event::GaveUp {
            attempts: fast_retry().max_attempts
        })
    );
    assert_key_kept(&agent, &old_key);
}

#[test]
fn truncated_and_garbage_replies_are_ignored() {
    let mut device = device();
    let (old_key, old_serial) = (device.old_key, device.serial.clone());
    let mut agent = start(&mut device.store, &device.serial, 1, 0);
    let (topic, payload) = transmit(&mut agent).unwrap();
    let (reply_topic, reply) = device.gateway.handle(&topic, &payload).unwrap();
    let rejection = FakeGateway::rejected_reply(agent.rid().as_str(), "bad_signature");
    truncations(&mut agent, REJECTED, &rejection);
    truncations(&mut agent, &reply_topic, &reply);
    // Bit flips: anything may happen but a panic or a promotion of a key whose
    // certificate we did not get.
    for i in 0..reply.len() {
        let mut flipped = reply.clone();
        flipped[i] ^= 0x01;
        let _ = agent.handle_message(1, ACCEPTED, &flipped);
        if agent.is_finished() {
            break;
        }
    }
    if !agent.is_finished() {
        agent.handle_message(2, &reply_topic, &reply).unwrap();
    }
    match agent.poll_event() {
        // A flip outside the key and the rid may yield a certificate the agent
        // takes; it is still for our new key.
        Some(Event::Renewed(_)) => {
            assert_eq!(
                certificate_spki(agent.certificate().unwrap()).unwrap(),
                &p256_spki(agent.public_key())[..]
            );
            assert_ne!(*agent.public_key(), old_key);
            let _ = old_serial;
        }
        other => panic!("expected Renewed, got {other:?}"),
    }
}

#[test]
fn promotion_failure_keeps_waiting() {
    let mut device = device();
    let (old_key, old_serial) = (device.old_key, device.serial.clone());
    let mut agent = start(&mut device.store, &device.serial, 1, 0);
    promotion_failure_is_recovered(&mut agent, &mut device.gateway);
    assert_renewed(&mut agent, &old_key, &old_serial);
}

#[test]
fn start_failures_leave_the_key_store_alone() {
    let rid = || Rid::new("r-1").unwrap();
    let config = RenewConfig {
        device_id: DEVICE,
        serial: "01ab",
        counter: 1,
        retry: fast_retry(),
        pinned_roots: roots(),
    };
    // Nothing to renew without a current key; no key generated for nothing.
    let mut empty = SoftKeyStore::new();
    assert_eq!(
        Renewal::start(&config, &mut empty, rid(), 0).unwrap_err(),
        Error::Hardware(HardwareError::KeyStore {
            operation: KeyOperation::SignRenewal,
            kind: ErrorKind::NoKey
        })
    );
    assert!(empty.public_key(KeySlot::Next).is_err());

    let mut device = device();
    for serial in ["", "01AB", "abc", &"00".repeat(21)] {
        let bad = RenewConfig { serial, ..config };
        assert!(matches!(
            Renewal::start(&bad, &mut device.store, rid(), 0),
            Err(Error::Usage(UsageError::BadSerial(_)))
        ));
    }
    let bad = RenewConfig {
        device_id: "a/b",
        ..config
    };
    assert!(matches!(
        Renewal::start(&bad, &mut device.store, rid(), 0),
        Err(Error::Usage(UsageError::BadDeviceId(_)))
    ));
    // Signing with the current key fails: reported, current key untouched.
    device.store.fail_once(Operation::Sign);
    assert!(matches!(
        Renewal::start(&config, &mut device.store, rid(), 0),
        Err(Error::Hardware(HardwareError::KeyStore { .. }))
    ));
    assert_eq!(
        device.store.public_key(KeySlot::Current).unwrap(),
        device.old_key
    );
}

#[test]
fn longest_fields_fit_the_request_buffer() {
    let mut device = device();
    let long_id = "d".repeat(64);
    let config = RenewConfig {
        device_id: &long_id,
        serial: &"7f".repeat(20),
        counter: u64::MAX,
        retry: fast_retry(),
        pinned_roots: roots(),
    };
    let rid = Rid::new(&"r".repeat(64)).unwrap();
    let mut agent = Renewal::start(&config, &mut device.store, rid, 0).unwrap();
    let (_, payload) = transmit(&mut agent).unwrap();
    let request = RenewRequest::decode_cbor(&payload).unwrap();
    assert_eq!(request.counter, u64::MAX);
}

#[test]
fn a_new_credential_that_does_not_work_falls_back_to_the_old_key() {
    let mut device = device();
    let (old_key, old_serial) = (device.old_key, device.serial.clone());
    let mut agent = start(&mut device.store, &device.serial, 1, 0);
    let (topic, payload) = transmit(&mut agent).unwrap();
    let (reply_topic, reply) = device.gateway.handle(&topic, &payload).unwrap();
    agent.handle_message(300, &reply_topic, &reply).unwrap();
    assert_renewed(&mut agent, &old_key, &old_serial);
    let new_key = *agent.public_key();
    drop(agent);
    // Until the firmware has seen the new credential work, the old key is
    // kept beside it: the A/B store's fallback credential needs it.
    assert_eq!(device.store.public_key(KeySlot::Previous).unwrap(), old_key);
    assert_eq!(device.store.public_key(KeySlot::Current).unwrap(), new_key);

    // The new certificate did not work (say the broker refused it): the
    // firmware discards the pending credential and restores the old key.
    device.store.restore_previous().unwrap();
    assert_eq!(device.store.public_key(KeySlot::Current).unwrap(), old_key);
    assert!(device.store.public_key(KeySlot::Previous).is_err());

    // The old credential works again: a renewal signed with the restored key
    // passes the gateway's check against the old certificate's key.
    let mut agent = start(&mut device.store, &old_serial, 2, 1_000);
    let (topic, payload) = transmit(&mut agent).unwrap();
    let (reply_topic, reply) = device.gateway.handle(&topic, &payload).unwrap();
    assert_eq!(reply_topic, ACCEPTED);
    agent.handle_message(1_300, &reply_topic, &reply).unwrap();
    assert_renewed(&mut agent, &old_key, &old_serial);
    drop(agent);
    // This time it works: the firmware confirms and the old key goes.
    device.store.release_previous().unwrap();
    assert!(device.store.public_key(KeySlot::Previous).is_err());
}
