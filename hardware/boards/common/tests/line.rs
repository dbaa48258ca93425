//! The firmware's main loop (`device::run`) on the host, against a scripted
//! station: noise and damaged frames on the line, a reply that is garbage, a
//! lost reply (the agent retransmits the same request), a final rejection
//! (reported to the station with the gateway's code), and a device without a
//! factory page. The happy path runs on the emulated MCUs in
//! `tests/tests/e2e/qemu.rs`.
#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;

use idgate_board::device::{self, Board, Outcome, StoreLayout};
use idgate_board::factory::{FACTORY_PAGE, write_factory_page};
use idgate_board::ramflash::RamFlash;
use idgate_hal::Clock;
use idgate_pki::link::{self, DeviceState, Frame};
use idgate_pki::protocol::{EnrollRequest, Format, Op, Rejected, Reply};

const LAYOUT: StoreLayout = StoreLayout {
    base: 0,
    slot_size: 4096,
};

/// What the scripted station saw from the device.
#[derive(Debug, Default)]
struct Seen {
    hello_acks: Vec<DeviceState>,
    requests: Vec<Vec<u8>>,
    /// The line's clock when each request arrived.
    request_times: Vec<u64>,
    failed: Vec<(String, String)>,
    done: Vec<String>,
}

/// A line with a scripted station at the other end: it answers each frame the
/// device writes, and time passes a second whenever the device idles.
struct Line {
    inbox: VecDeque<u8>,
    decoder: link::Decoder<Vec<u8>>,
    now_ms: u64,
    seen: Seen,
}

impl Line {
    fn new() -> Line {
        let mut line = Line {
            inbox: VecDeque::new(),
            decoder: link::Decoder::new(vec![0; link::MAX_BODY]),
            now_ms: 0,
            seen: Seen::default(),
        };
        // Noise, then a frame damaged in transit, then the real Hello.
        line.inbox.extend([0x13, 0x37, 0x00, 0xFF, 0x00]);
        let mut damaged = encode(&Frame::Hello);
        damaged[1] ^= 0x40;
        line.inbox.extend(damaged);
        line.inbox.extend(encode(&Frame::Hello));
        line
    }

    fn station(&mut self, frame: Frame<'_>) {
        match frame {
            Frame::HelloAck { state, .. } => {
                self.seen.hello_acks.push(state);
                self.inbox.extend(encode(&Frame::Provision {
                    device_id: "sensor-7",
                    token: b"one-time-token",
                }));
            }
            Frame::Request {
                op: Op::Enroll,
                format: Format::Cbor,
                payload,
            } => {
                self.seen.requests.push(payload.to_vec());
                self.seen.request_times.push(self.now_ms);
                let rid = EnrollRequest::decode_cbor(payload).unwrap().rid.to_owned();
                match self.seen.requests.len() {
                    // Garbage on the accepted topic, then an accepted reply for
                    // another operation; the first request's answer is lost.
                    1 => {
                        self.reply(Op::Enroll, Reply::Accepted, &[0xA1, 0xFF, 0x00]);
                        self.reply(Op::Renew, Reply::Accepted, &[0xA0]);
                    }
                    // The retransmission is refused for good.
                    _ => {
                        let mut buf = [0u8; 256];
                        let len = Rejected {
                            rid: &rid,
                            code: "bad_proof",
                            message: "the proof does not match the token",
                        }
                        .encode_cbor(&mut buf)
                        .unwrap();
                        self.reply(Op::Enroll, Reply::Rejected, &buf[..len]);
                    }
                }
            }
            Frame::Failed { code, message } => {
                self.seen.failed.push((code.into(), message.into()));
            }
            Frame::Done { serial } => self.seen.done.push(serial.into()),
            other => panic!("the device sent {other:?}"),
        }
    }

    fn reply(&mut self, op: Op, outcome: Reply, payload: &[u8]) {
        self.inbox.extend(encode(&Frame::Reply {
            op,
            format: Format::Cbor,
            outcome,
            payload,
        }));
    }
}

fn encode(frame: &Frame<'_>) -> Vec<u8> {
    let mut out = vec![0; link::MAX_FRAME];
    let len = frame.encode(&mut out).unwrap();
    out.truncate(len);
    out
}

impl Clock for &mut Line {
    fn now_ms(&mut self) -> u64 {
        self.now_ms
    }
}

impl Board for &mut Line {
    fn read_byte(&mut self) -> Option<u8> {
        self.inbox.pop_front()
    }

    fn write_all(&mut self, bytes: &[u8]) {
        // The decoder is taken out while the station answers a frame that
        // borrows from it.
        let mut decoder = std::mem::replace(&mut self.decoder, link::Decoder::new(Vec::new()));
        for &byte in bytes {
            match decoder.push(byte) {
                Some(Ok(frame)) => self.station(frame),
                Some(Err(e)) => panic!("the device sent a bad frame: {e}"),
                None => {}
            }
        }
        self.decoder = decoder;
    }

    fn idle(&mut self) {
        self.now_ms += 1000;
        assert!(self.now_ms < 3_600_000, "the device hung for an hour");
    }

    fn jitter(&mut self) -> u32 {
        self.now_ms as u32
    }
}

fn root_certificate() -> Vec<u8> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test root");
    params.self_signed(&key).unwrap().der().to_vec()
}

#[test]
fn bad_input_is_ignored_lost_replies_are_retried_and_rejections_reported() {
    let root = root_certificate();
    let mut page = Box::new([0u8; FACTORY_PAGE]);
    write_factory_page(&[9; 32], &[&root], &mut page).unwrap();
    let mut memory = vec![0u8; 8192];
    let mut line = Line::new();

    let outcome = device::run(
        &mut line,
        RamFlash::new(&mut memory, true),
        LAYOUT,
        &page[..],
        b"test",
    );

    assert!(
        matches!(outcome, Outcome::Failed { code: "rejected" }),
        "{outcome:?}"
    );
    let seen = &line.seen;
    // The damaged Hello was skipped; the real one answered once.
    assert_eq!(seen.hello_acks, [DeviceState::Blank]);
    // The lost answer made the agent send the same request again, byte for byte.
    assert_eq!(seen.requests.len(), 2);
    assert_eq!(seen.requests[0], seen.requests[1]);
    // After the agent's first timeout: 5 s less up to 25 % jitter (the line's
    // clock moves in 1 s steps while the device idles).
    let waited = seen.request_times[1] - seen.request_times[0];
    assert!(
        (3_750..=6_000).contains(&waited),
        "retransmitted after {waited} ms"
    );
    // The gateway's code reaches the station unchanged; nothing was stored.
    assert_eq!(seen.failed.len(), 1);
    assert_eq!(seen.failed[0].0, "bad_proof");
    assert!(seen.done.is_empty());
    assert!(memory.iter().all(|&b| b == 0xFF), "no credential written");
}

#[test]
fn a_device_without_a_factory_page_refuses_to_enroll() {
    let mut memory = vec![0u8; 8192];
    let mut line = Line::new();
    let erased = [0xFFu8; FACTORY_PAGE];

    let outcome = device::run(
        &mut line,
        RamFlash::new(&mut memory, true),
        LAYOUT,
        &erased,
        b"",
    );

    assert!(
        matches!(
            outcome,
            Outcome::Failed {
                code: "not_provisioned"
            }
        ),
        "{outcome:?}"
    );
    assert_eq!(line.seen.failed[0].0, "not_provisioned");
    assert!(line.seen.requests.is_empty());
}
