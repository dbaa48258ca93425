//! The device agent's handling of the gateway's replies
//! (`idgate_agent::Exchange::handle_message`): the bytes a device receives on
//! its `accepted` and `rejected` topics (and any topic the broker delivers).
//! Nothing the gateway, or anyone who can publish there, sends may panic the
//! agent.
//!
//! Byte 0 picks the mode; the rest is the material:
//! - 0: the rest is the payload on the enroll `accepted` topic;
//! - 1: the rest is the payload on the enroll `rejected` topic;
//! - 2: a well-formed `Issued` reply with the right rid, whose certificate
//!   carries the agent's own public key (so the reply passes the rid and key
//!   checks) and whose other certificate fields, signature and chain are cut
//!   from the rest; with bit 7 of byte 0 set, the pinned root ends the chain;
//! - 3: the rest, up to the first NUL, is the topic; after it, the payload.
#![no_main]

use std::sync::OnceLock;

use idgate_agent::{Config, Enrollment, MAX_REQUEST, RetryPolicy, Rid};
use idgate_pki::csr::p256_spki;
use idgate_pki::protocol::{Issued, MAX_CHAIN};
use idgate_sim::{FakeGateway, SoftKeyStore};
use libfuzzer_sys::fuzz_target;

const DEVICE: &str = "dev-a";
const RID: &str = "fuzz-rid";
const ACCEPTED: &str = "idgate/v1/devices/dev-a/enroll/cbor/accepted";
const REJECTED: &str = "idgate/v1/devices/dev-a/enroll/cbor/rejected";

fn root() -> &'static [u8] {
    static ROOT: OnceLock<Vec<u8>> = OnceLock::new();
    ROOT.get_or_init(FakeGateway::shared_ca_der)
}

fn tlv(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = vec![tag];
    match len {
        0..=0x7f => out.push(len as u8),
        0x80..=0xff => out.extend([0x81, len as u8]),
        _ => out.extend([0x82, (len >> 8) as u8, len as u8]),
    }
    for p in parts {
        out.extend_from_slice(p);
    }
    out
}

/// Length-prefixed pieces of `data` (one length byte each); missing ones are empty.
struct Pieces<'a>(&'a [u8]);

impl<'a> Pieces<'a> {
    fn next(&mut self) -> &'a [u8] {
        let Some((&n, rest)) = self.0.split_first() else {
            return &[];
        };
        let n = usize::from(n).min(rest.len());
        let (piece, rest) = rest.split_at(n);
        self.0 = rest;
        piece
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let config = Config {
        device_id: DEVICE,
        token: b"abcdefghijklmnopqrstuvwxyz234567",
        retry: RetryPolicy::DEFAULT,
        pinned_roots: &[root()],
    };
    let rid = Rid::new(RID).expect("a valid rid");
    let mut agent = Enrollment::start(&config, SoftKeyStore::new(), rid, 0).expect("starts");
    let mut buf = [0u8; MAX_REQUEST];
    agent.poll_transmit(&mut buf).expect("the first request");

    match mode & 0x7f {
        0 => {
            let _ = agent.handle_message(1, ACCEPTED, rest);
        }
        1 => {
            let _ = agent.handle_message(1, REJECTED, rest);
        }
        2 => {
            let spki = p256_spki(agent.public_key());
            let mut pieces = Pieces(rest);
            let tbs = tlv(
                0x30,
                &[
                    &tlv(0xa0, &[&tlv(0x02, &[&[2]])]),
                    &tlv(0x02, &[pieces.next()]), // serial
                    &tlv(0x30, &[pieces.next()]), // signature algorithm
                    &tlv(0x30, &[pieces.next()]), // issuer
                    &tlv(0x30, &[pieces.next()]), // validity
                    &tlv(0x30, &[pieces.next()]), // subject
                    &spki,
                    pieces.next(), // extensions, raw
                ],
            );
            let certificate = tlv(
                0x30,
                &[
                    &tbs,
                    &tlv(0x30, &[pieces.next()]),
                    &tlv(0x03, &[&[0], pieces.next()]),
                ],
            );
            let serial = String::from_utf8_lossy(pieces.next()).into_owned();
            let mut chain = heapless::Vec::<&[u8], MAX_CHAIN>::new();
            let with_root = mode & 0x80 != 0;
            while !pieces.0.is_empty() && chain.len() + usize::from(with_root) < MAX_CHAIN {
                let _ = chain.push(pieces.next());
            }
            if with_root {
                let _ = chain.push(root());
            }
            let issued = Issued {
                rid: RID,
                certificate: &certificate,
                chain,
                serial: &serial,
                not_before: 1_700_000_000,
                not_after: 4_102_444_800,
                time: 1_700_000_100,
                renew_after: 1_800_000_000,
                renew_before: 1_900_000_000,
            };
            let mut payload = vec![0u8; 2 * data.len() + 4096];
            let Ok(n) = issued.encode_cbor(&mut payload) else {
                return;
            };
            let _ = agent.handle_message(1, ACCEPTED, &payload[..n]);
            // A duplicate delivery, whatever the state now.
            let _ = agent.handle_message(2, ACCEPTED, &payload[..n]);
        }
        _ => {
            let (topic, payload) = match rest.iter().position(|&b| b == 0) {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &[][..]),
            };
            let topic = String::from_utf8_lossy(topic);
            let _ = agent.handle_message(1, &topic, payload);
        }
    }
    while agent.poll_event().is_some() {}
    let _ = agent.poll_transmit(&mut buf);
    let _ = agent.poll_timeout();
});
