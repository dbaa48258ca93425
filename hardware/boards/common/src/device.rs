//! The firmware's main loop on the line: the device side of the line link
//! (`idgate_pki::link`, `docs/protocol.md` "Line link") around the agent's
//! [`Enrollment`] machine. Board-independent: a board supplies a [`Board`]
//! (serial port, clock, entropy) and a NOR flash region.
//!
//! ```text
//!  station                         device
//!  Hello            ──────────►
//!                   ◄──────────    HelloAck { blank | provisioned | enrolled }
//!  Provision{id,token} ───────►    new key (DRBG), CSR, proof
//!                   ◄──────────    Request { enroll, cbor, payload }   (again on timeout)
//!  Reply{accepted|rejected} ──►    agent checks rid, key, chain to the pinned root
//!                                  credential → A/B store, read back
//!                   ◄──────────    Done { serial }   or   Failed { code, message }
//! ```
//!
//! Anything else on the line (noise, bad frames, frames meant for a station,
//! replies for another device or request) is ignored, and counted.

use idgate_agent::{
    Choice, Commit, Config, Credential, CredentialStore, Enroll, Event, Exchange, KeepSerial,
    MAX_REQUEST, Rejection, RetryPolicy, Rid,
};
use idgate_hal::Clock;
use idgate_hal::flash::NorFlash;
use idgate_pki::link::{self, DeviceState, Frame};
use idgate_pki::protocol::{Format, Issued, MAX_ID, Op, Topic, check_device_id};
use sha2::{Digest, Sha256};

use crate::drbg::HmacDrbg;
use crate::factory::Factory;
use crate::keystore::SoftKeyStore;

/// What the agent reports as its version on the line.
pub const AGENT_VERSION: &str = concat!("idgate-agent ", env!("CARGO_PKG_VERSION"));

/// The largest frame body the device accepts: sized to the chain it expects
/// (the device certificate and one issuing CA under the pinned root), not to
/// the most the agent could keep ([`idgate_agent::MAX_CERTIFICATE`] +
/// [`idgate_agent::MAX_CHAIN_BYTES`]), which would cost 2 KiB more of stack
/// for the whole session. A real enrollment reply measures 1 164 B (frame
/// body; `docs/firmware.md` "Footprint"): this leaves a third for longer
/// names. A longer frame is skipped by the link decoder and counted as
/// ignored; the request then gives up after its retries (`gave_up`).
pub const RECEIVE_BODY: usize = 1536;

/// The largest frame the device sends: a request and its framing.
const SEND_FRAME: usize = link::wire_len_max(MAX_REQUEST + 16);

/// What a board provides besides flash.
pub trait Board: Clock {
    /// A received byte, if one is waiting (never blocks).
    fn read_byte(&mut self) -> Option<u8>;
    /// Sends `bytes`, blocking until they are queued.
    fn write_all(&mut self, bytes: &[u8]);
    /// Waits a little (until the next interrupt) when there is nothing to do.
    fn idle(&mut self);
    /// A fast-changing counter (a timer's current value): its low bits at
    /// the moment a frame arrives are mixed into the DRBG.
    fn jitter(&mut self) -> u32;
}

/// Where the credential store lives in the flash region.
#[derive(Clone, Copy, Debug)]
pub struct StoreLayout {
    /// Offset of slot A.
    pub base: u32,
    /// Size of each slot (a whole number of erase sectors, at least
    /// [`idgate_agent::MAX_RECORD`]).
    pub slot_size: u32,
}

/// How the session on the line ended.
#[derive(Debug)]
pub enum Outcome {
    /// Enrolled, the credential stored and read back.
    Enrolled {
        /// The certificate's serial.
        serial: idgate_agent::Serial,
        /// The store's generation after the write.
        generation: u32,
        /// Line frames that were ignored on the way.
        ignored_frames: u32,
        /// Messages the agent ignored (other rid, bad chain, …).
        ignored_messages: u32,
        /// How many times the request was sent.
        attempts: u32,
        /// The longest frame body received (the reply, normally): how much of
        /// [`RECEIVE_BODY`] a real session uses.
        largest_frame: usize,
    },
    /// A final failure, reported to the station as `Failed { code, .. }`.
    Failed {
        /// The code sent.
        code: &'static str,
    },
}

/// The key store; it lives in `run`'s frame and is lent to each request.
pub type Keys = SoftKeyStore<HmacDrbg>;

/// The running enrollment. It keeps only the serial of its certificate: the
/// certificate and chain are taken from the reply where it was received (the
/// receive buffer), not from a 3 KiB copy in the request.
type Request<'k> = Exchange<&'k mut Keys, Enroll, KeepSerial>;

/// The device's state between frames.
struct Device<'a, 'k, B, F: NorFlash> {
    board: B,
    factory: Result<Factory<'a>, crate::factory::FactoryError>,
    store: Result<CredentialStore<F>, idgate_agent::StoreError>,
    /// The key store, while no request runs (the request holds it meanwhile).
    keys: Option<&'k mut Keys>,
    /// The running request. It is a few KiB: it is dropped in place, never
    /// moved, so the stack holds one copy.
    enrollment: Option<Request<'k>>,
    device_id: heapless::String<MAX_ID>,
    enrolled: bool,
    ignored_frames: u32,
    largest_frame: usize,
    /// Set when the session ended; `run` returns it.
    outcome: Option<Outcome>,
}

/// Runs the device on the line until it has enrolled (or failed for good).
///
/// `factory_page` is the flash page the programming station wrote
/// ([`Factory`]); `boot_entropy` is whatever the board could gather at boot
/// (it is mixed with the factory seed; see `docs/firmware.md` on the RNG).
pub fn run<B: Board, F: NorFlash>(
    mut board: B,
    flash: F,
    layout: StoreLayout,
    factory_page: &[u8],
    boot_entropy: &[u8],
) -> Outcome {
    let factory = Factory::parse(factory_page);
    let seed: &[u8] = match &factory {
        Ok(f) => f.seed,
        Err(_) => &[],
    };
    let boot = board.jitter().to_le_bytes();
    let drbg = HmacDrbg::new(&[seed, boot_entropy, &boot, AGENT_VERSION.as_bytes()]);
    let mut keys = SoftKeyStore::new(drbg);
    let mut store = CredentialStore::open(flash, layout.base, layout.slot_size);
    let mut enrolled = false;
    if let Ok(store) = &mut store {
        let mut credential = Credential::default();
        if store.load(Choice::Newest, &mut credential).is_ok()
            && keys.restore_current(&credential.key).is_ok()
        {
            enrolled = true;
        }
    }
    let mut device = Device {
        board,
        factory,
        store,
        keys: Some(&mut keys),
        enrollment: None,
        device_id: heapless::String::new(),
        enrolled,
        ignored_frames: 0,
        largest_frame: 0,
        outcome: None,
    };
    let mut rx = [0u8; RECEIVE_BODY];
    let mut decoder = link::Decoder::new(&mut rx[..]);
    loop {
        let now = device.board.now_ms();
        device.poll_enrollment(now);
        if let Some(outcome) = device.outcome.take() {
            return outcome;
        }
        let mut busy = false;
        while let Some(byte) = device.board.read_byte() {
            busy = true;
            match decoder.push(byte) {
                None => {}
                Some(Ok(frame)) => {
                    let now = device.board.now_ms();
                    device.on_frame(now, frame);
                    break;
                }
                Some(Err(_)) => device.ignored_frames = device.ignored_frames.saturating_add(1),
            }
        }
        if !busy {
            device.board.idle();
        }
    }
}

impl<'k, B: Board, F: NorFlash> Device<'_, 'k, B, F> {
    fn state(&self) -> DeviceState {
        if self.enrolled {
            DeviceState::Enrolled
        } else if self.device_id.is_empty() {
            DeviceState::Blank
        } else {
            DeviceState::Provisioned
        }
    }

    // Not inlined, and the transmit buffer is its own: it is on the stack
    // only while a frame is sent, never while a request starts (the deepest
    // path), instead of in `run`'s frame for the whole session.
    #[inline(never)]
    fn send(&mut self, frame: &Frame<'_>) {
        let mut tx = [0u8; SEND_FRAME];
        // Every frame the device builds fits SEND_FRAME; one that does not
        // (cannot happen) is dropped rather than sent cut.
        if let Ok(len) = frame.encode(&mut tx) {
            self.board.write_all(&tx[..len]);
        }
    }

    fn fail(&mut self, code: &'static str, message: &str) {
        self.send(&Frame::Failed { code, message });
        self.outcome = Some(Outcome::Failed { code });
    }

    // Not inlined: its locals then live only while it runs, instead of
    // adding to `run`'s frame for the whole session.
    #[inline(never)]
    fn on_frame(&mut self, now: u64, frame: Frame<'_>) {
        // When frames arrive depends on the station and the host; the timer's
        // low bits at that moment are a little entropy, never a lot.
        let jitter = self.board.jitter().to_le_bytes();
        self.largest_frame = self.largest_frame.max(frame.body_len());
        let keys = match (&mut self.keys, &mut self.enrollment) {
            (Some(keys), _) => Some(&mut **keys),
            (None, Some(running)) => Some(&mut **running.key_store_mut()),
            (None, None) => None,
        };
        if let Some(keys) = keys {
            keys.rng().reseed(&[&jitter, &now.to_le_bytes()]);
        }
        match frame {
            Frame::Hello => {
                let state = self.state();
                let id = self.device_id.clone();
                self.send(&Frame::HelloAck {
                    state,
                    device_id: &id,
                    agent_version: AGENT_VERSION,
                });
            }
            Frame::Provision { device_id, token } => self.on_provision(now, device_id, token),
            Frame::Reply {
                op,
                format,
                outcome,
                payload,
            } => {
                let Some(enrollment) = self.enrollment.as_mut() else {
                    self.ignored_frames = self.ignored_frames.saturating_add(1);
                    return;
                };
                // The agent checks the topic like any MQTT message: one for
                // another operation or device is refused there.
                let topic = Topic::request(enrollment.device_id(), op, format).with_reply(outcome);
                match topic.to_heapless() {
                    Ok(topic) => {
                        // An ignored reply is counted by the agent itself.
                        if enrollment.handle_message(now, &topic, payload).is_ok() {
                            // While the reply is still in the receive buffer.
                            self.on_event(Some(payload));
                        }
                    }
                    Err(_) => self.ignored_frames = self.ignored_frames.saturating_add(1),
                }
            }
            // Frames a device sends, not receives.
            Frame::HelloAck { .. }
            | Frame::Request { .. }
            | Frame::Done { .. }
            | Frame::Failed { .. } => {
                self.ignored_frames = self.ignored_frames.saturating_add(1);
            }
        }
    }

    // Not inlined: its locals then live only while it runs, instead of
    // adding to `run`'s frame for the whole session.
    #[inline(never)]
    fn on_provision(&mut self, now: u64, device_id: &str, token: &[u8]) {
        if self.enrolled {
            self.fail("already_enrolled", "the device holds a certificate");
            return;
        }
        let roots: heapless::Vec<&[u8], 2> = match &self.factory {
            Ok(factory) => factory.roots().iter().copied().collect(),
            Err(_) => {
                self.fail(
                    "not_provisioned",
                    "no valid factory page (pinned root, seed)",
                );
                return;
            }
        };
        if check_device_id(device_id).is_err() || token.is_empty() {
            self.fail("bad_provision", "device id or token refused by the agent");
            return;
        }
        // A second Provision before the answer starts over with a new key.
        let keys = match reclaim(&mut self.enrollment) {
            Some(keys) => keys,
            None => match self.keys.take() {
                Some(keys) => keys,
                None => return,
            },
        };
        let rid = Rid::random(keys.rng());
        let config = Config {
            device_id,
            token,
            retry: RetryPolicy::DEFAULT,
            pinned_roots: &roots,
        };
        // Straight into its place: the machine is a few KiB, and returning
        // it by value would hold a second copy on the stack.
        if Request::start_in(&mut self.enrollment, &config, keys, rid, now).is_ok() {
            self.device_id.clear();
            // `start` checked the id, which fits MAX_ID.
            let _ = self.device_id.push_str(device_id);
        } else {
            // The id and token were checked: only the key store can fail.
            self.fail("key_store", "key generation or CSR signing failed");
        }
    }

    // Not inlined: its locals then live only while it runs, instead of
    // adding to `run`'s frame for the whole session.
    #[inline(never)]
    fn poll_enrollment(&mut self, now: u64) {
        let Some(enrollment) = self.enrollment.as_mut() else {
            return;
        };
        if enrollment.poll_timeout().is_some_and(|t| now >= t) {
            enrollment.handle_timeout(now);
        }
        let mut request = [0u8; MAX_REQUEST];
        if let Some(transmit) = enrollment.poll_transmit(&mut request) {
            self.send(&Frame::Request {
                op: Op::Enroll,
                format: Format::Cbor,
                payload: &request[..transmit.len],
            });
        }
        self.on_event(None);
    }

    /// Handles the request's event, if any. `reply` is the payload that was
    /// just accepted, still where it was received; an enrollment can only end
    /// in `Enrolled` with it.
    fn on_event(&mut self, reply: Option<&[u8]>) {
        let Some(enrollment) = self.enrollment.as_mut() else {
            return;
        };
        let Some(event) = enrollment.poll_event() else {
            return;
        };
        match (event, reply) {
            (Event::Enrolled(certified), Some(reply)) => self.on_enrolled(&certified, reply),
            (event, _) => self.on_end(&event),
        }
    }

    fn on_end(&mut self, event: &Event) {
        match event {
            Event::Rejected(rejection) => self.on_rejected(rejection),
            Event::GaveUp { .. } => self.fail("gave_up", "no answer from the gateway"),
            _ => self.fail("internal", "unexpected agent event"),
        }
    }

    // Not inlined: its locals then live only while it runs, instead of
    // adding to `run`'s frame for the whole session.
    #[inline(never)]
    fn on_enrolled(&mut self, certified: &idgate_agent::Certified, reply: &[u8]) {
        let Some(enrollment) = self.enrollment.as_ref() else {
            return;
        };
        let ignored_messages = enrollment.ignored_messages();
        let attempts = enrollment.attempts();
        // The reply the agent just checked (rid, key, chain to the pinned
        // root), decoded again where it was received: the same bytes, so the
        // same certificate and chain, with the serial it certified.
        let Ok(issued) = Issued::decode_cbor(reply) else {
            self.fail("internal", "the accepted reply does not decode again");
            return;
        };
        if issued.serial != certified.serial.as_str() {
            self.fail("internal", "the accepted reply does not decode again");
            return;
        }
        let mut credential = Credential::default();
        let copied = credential
            .certificate
            .extend_from_slice(issued.certificate)
            .is_ok()
            && issued
                .chain
                .iter()
                .all(|c| credential.chain.extend_from_slice(c).is_ok());
        let blob = enrollment.key_store().current_blob();
        // Drop the request in place: its buffers are not needed any more.
        self.enrollment = None;
        let Ok(blob) = blob else {
            self.fail("key_store", "the new key is missing");
            return;
        };
        if !copied || credential.key.extend_from_slice(&blob).is_err() {
            self.fail("storage", "the credential does not fit a record");
            return;
        }
        let not_earlier_than = certified.gateway_time.max(certified.not_before);
        let Ok(store) = self.store.as_mut() else {
            self.fail("storage", "the credential store cannot be opened");
            return;
        };
        if store
            .write(&credential, Commit::Confirmed, not_earlier_than)
            .is_err()
        {
            self.fail("storage", "writing the credential failed");
            return;
        }
        // Read it back as the next boot will (the newest valid record) into
        // the same buffer, and compare digests: a second 3 KiB buffer would
        // not fit the RAM budget.
        let written = digest(&credential);
        if store.load(Choice::Newest, &mut credential).is_err() || digest(&credential) != written {
            self.fail("storage", "the stored credential does not read back");
            return;
        }
        let generation = store.status().generation;
        self.enrolled = true;
        let serial = certified.serial.clone();
        self.send(&Frame::Done { serial: &serial });
        self.outcome = Some(Outcome::Enrolled {
            serial,
            generation,
            ignored_frames: self.ignored_frames,
            ignored_messages,
            attempts,
            largest_frame: self.largest_frame,
        });
    }

    // Not inlined: its locals then live only while it runs, instead of
    // adding to `run`'s frame for the whole session.
    #[inline(never)]
    fn on_rejected(&mut self, rejection: &Rejection) {
        self.enrollment = None;
        let code = rejection.code_str();
        let message = rejection.message();
        self.send(&Frame::Failed { code, message });
        self.outcome = Some(Outcome::Failed { code: "rejected" });
    }
}

/// Ends a running request and takes the key store back. Apart, and not
/// inlined, so the request moved out of its slot occupies the stack only here,
/// not while the next request starts.
#[inline(never)]
fn reclaim<'k>(slot: &mut Option<Request<'k>>) -> Option<&'k mut Keys> {
    slot.take().map(Request::into_key_store)
}

/// SHA-256 over a credential's fields, each with its length.
fn digest(credential: &Credential) -> [u8; 32] {
    let mut hash = Sha256::new();
    for part in [
        &credential.certificate[..],
        &credential.chain,
        &credential.key,
    ] {
        hash.update((part.len() as u32).to_le_bytes());
        hash.update(part);
    }
    hash.finalize().into()
}
