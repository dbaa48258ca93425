//! Sans-IO pair tests of a device's whole life: the agent's request machines,
//! the renewal scheduler and the credential store (on simulated flash) against
//! the fake gateway with a clock, over a link that drops, duplicates and
//! reorders messages, on a virtual clock. Weeks pass in milliseconds.
// Helpers outside `#[test]` functions are test code too: a failure is a panic.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;

use common::{DEVICE, TOKEN, roots, transmit};
use idgate_agent::{
    CertificateTimes, Choice, Commit, Config, Credential, CredentialStore, Enrollment, Event,
    Exchange, RenewConfig, Renewal, RequestKind, RetryPolicy, Rid, ScheduleEvent, SchedulePolicy,
    Scheduler, TimeKeeper,
};
use idgate_hal::{KeySlot, KeyStore};
use idgate_sim::fake_gateway::Answer;
use idgate_sim::{FakeGateway, SimFlash, SoftKeyStore};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const DAY_MS: u64 = 86_400_000;
/// The gateway's clock at the start of every test, unix seconds.
const T0: u64 = 1_800_000_000;
/// The firmware's build time: the first `not_earlier_than`.
const BUILD_TIME: u64 = T0 - 30 * 86_400;

/// A message in flight: when it arrives, whether to the gateway, topic, payload.
type Flight = (u64, bool, String, Vec<u8>);

/// The network: drops, duplicates, random delays (so reordering), and can
/// be cut altogether.
struct Link {
    rng: StdRng,
    drop: f64,
    duplicate: f64,
    up: bool,
    in_flight: Vec<Flight>,
    sent: usize,
}

impl Link {
    fn send(&mut self, now: u64, to_gateway: bool, topic: String, payload: Vec<u8>) {
        self.sent += 1;
        if !self.up || self.rng.gen_bool(self.drop) {
            return;
        }
        let copies = if self.rng.gen_bool(self.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let at = now + self.rng.gen_range(20..3_000);
            self.in_flight
                .push((at, to_gateway, topic.clone(), payload.clone()));
        }
    }

    fn next_at(&self) -> Option<u64> {
        self.in_flight.iter().map(|f| f.0).min()
    }

    fn pop_due(&mut self, now: u64) -> Option<Flight> {
        let (i, _) = self
            .in_flight
            .iter()
            .enumerate()
            .filter(|(_, f)| f.0 <= now)
            .min_by_key(|(_, f)| f.0)?;
        Some(self.in_flight.swap_remove(i))
    }
}

/// Everything outside the device.
struct World {
    gateway: FakeGateway,
    link: Link,
    /// Virtual time since the start, ms; the gateway's clock is T0 + now/1000.
    now: u64,
    /// When the device last booted (its monotonic clock starts there).
    boot: u64,
    rng: StdRng,
}

impl World {
    fn new(seed: u64, drop: f64, duplicate: f64) -> World {
        let mut gateway = FakeGateway::new(std::str::from_utf8(TOKEN).unwrap());
        gateway.clock = Some(T0);
        World {
            gateway,
            link: Link {
                rng: StdRng::seed_from_u64(seed),
                drop,
                duplicate,
                up: true,
                in_flight: Vec::new(),
                sent: 0,
            },
            now: 0,
            boot: 0,
            rng: StdRng::seed_from_u64(seed ^ 0x5eed),
        }
    }

    fn device_ms(&self) -> u64 {
        self.now - self.boot
    }

    fn unix(&self) -> u64 {
        T0 + self.now / 1000
    }

    fn advance_to(&mut self, now: u64) {
        self.now = self.now.max(now);
        self.gateway.clock = Some(self.unix());
    }

    /// Runs one request over the link until it ends.
    fn run<K: KeyStore, R: RequestKind>(&mut self, agent: &mut Exchange<K, R>) -> Event {
        loop {
            while let Some((topic, payload)) = transmit(agent) {
                self.link.send(self.now, true, topic, payload);
            }
            if let Some(event) = agent.poll_event() {
                return event;
            }
            let next = [
                agent.poll_timeout().map(|t| t + self.boot),
                self.link.next_at(),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap();
            self.advance_to(next);
            while let Some((_, to_gateway, topic, payload)) = self.link.pop_due(self.now) {
                if to_gateway {
                    if let Some((topic, reply)) = self.gateway.handle(&topic, &payload) {
                        self.link.send(self.now, false, topic, reply);
                    }
                } else {
                    // Late duplicates and other requests' replies are refused.
                    let _ = agent.handle_message(self.device_ms(), &topic, &payload);
                }
            }
            agent.handle_timeout(self.device_ms());
        }
    }
}

/// The device: a key store (a simulated secure element, which survives
/// reboots), the credential store on flash, and the scheduler.
struct Device {
    keys: SoftKeyStore,
    flash: SimFlash,
    store: CredentialStore<SimFlash>,
    scheduler: Scheduler,
    serial: String,
    not_after: u64,
    keys_used: HashSet<Vec<u8>>,
    renewals: u32,
    failures: u32,
    stopped: Option<String>,
    late_renewals: u32,
}

fn retry() -> RetryPolicy {
    RetryPolicy::DEFAULT
}

fn credential<K: KeyStore, R: RequestKind>(agent: &Exchange<K, R>) -> Credential {
    let mut c = Credential::default();
    c.certificate
        .extend_from_slice(agent.certificate().unwrap())
        .unwrap();
    for certificate in agent.chain() {
        c.chain.extend_from_slice(certificate).unwrap();
    }
    // A key handle, as a secure element would have.
    c.key.push(1).unwrap();
    c
}

/// A new device enrolls (retrying with new rids until it succeeds) and
/// stores its first credential.
fn enroll(world: &mut World) -> Device {
    let mut keys = SoftKeyStore::new();
    let config = Config {
        device_id: DEVICE,
        token: TOKEN,
        retry: retry(),
        pinned_roots: roots(),
    };
    let (certified, credential) = loop {
        let rid = Rid::random(&mut world.rng);
        let mut agent = Enrollment::start(&config, &mut keys, rid, world.device_ms()).unwrap();
        match world.run(&mut agent) {
            Event::Enrolled(certified) => break (certified, credential(&agent)),
            Event::GaveUp { .. } => continue,
            other => panic!("enrollment: {other:?}"),
        }
    };
    let flash = SimFlash::new(2);
    let mut store = CredentialStore::open(flash.clone(), 0, SimFlash::SECTOR as u32).unwrap();
    let mut time = TimeKeeper::new(BUILD_TIME);
    time.set(certified.gateway_time, certified.received_at_ms);
    store
        .write(&credential, Commit::Confirmed, time.not_earlier_than())
        .unwrap();
    let times = CertificateTimes {
        not_before: certified.not_before,
        not_after: certified.not_after,
        window: Some((certified.renew_after, certified.renew_before)),
    };
    let scheduler = Scheduler::new(
        SchedulePolicy::DEFAULT,
        time,
        times,
        world.device_ms(),
        &mut world.rng,
    );
    let mut keys_used = HashSet::new();
    keys_used.insert(keys.public_key(KeySlot::Current).unwrap().to_vec());
    Device {
        keys,
        flash,
        store,
        scheduler,
        serial: certified.serial.to_string(),
        not_after: certified.not_after,
        keys_used,
        renewals: 0,
        failures: 0,
        stopped: None,
        late_renewals: 0,
    }
}

impl Device {
    /// One renewal as the firmware does it: reserve the counter, renew with a
    /// new key, store the new credential pending, confirm it once it worked
    /// (here: at once), tell the scheduler.
    fn renew(&mut self, world: &mut World) {
        let mut scratch = Credential::default();
        let counter = self
            .store
            .reserve_counter(&mut scratch, self.scheduler.time().not_earlier_than())
            .unwrap();
        let config = RenewConfig {
            device_id: DEVICE,
            serial: &self.serial,
            counter,
            retry: retry(),
            pinned_roots: roots(),
        };
        let rid = Rid::random(&mut world.rng);
        let mut agent = Renewal::start(&config, &mut self.keys, rid, world.device_ms()).unwrap();
        let event = world.run(&mut agent);
        match &event {
            Event::Renewed(certified) => {
                if world.unix() >= self.not_after {
                    self.late_renewals += 1;
                }
                let credential = credential(&agent);
                let new_key = agent.public_key().to_vec();
                assert!(self.keys_used.insert(new_key), "every renewal a new key");
                drop(agent);
                self.store
                    .write(
                        &credential,
                        Commit::Pending,
                        certified.gateway_time.max(certified.not_before),
                    )
                    .unwrap();
                self.store.confirm().unwrap();
                // It worked: the old credential and its key may go.
                self.keys.release_previous().unwrap();
                self.serial = certified.serial.to_string();
                self.not_after = certified.not_after;
                self.renewals += 1;
            }
            Event::GaveUp { .. } => self.failures += 1,
            Event::Rejected(rejection) => {
                // The current credential stays; the staged key is dropped.
                drop(agent);
                let mut current = Credential::default();
                self.store.load(Choice::Newest, &mut current).unwrap();
                assert_eq!(
                    idgate_pki::der::certificate_spki(&current.certificate).unwrap(),
                    &idgate_pki::csr::p256_spki(&self.keys.public_key(KeySlot::Current).unwrap())[..],
                    "{rejection}: the key that matches the stored certificate stays current"
                );
                self.failures += 1;
            }
            other => panic!("renewal: {other:?}"),
        }
        self.scheduler
            .handle_event(world.device_ms(), &event, &mut world.rng);
    }

    /// Lives until `until` (virtual ms): renews whenever the scheduler says.
    fn live(&mut self, world: &mut World, until: u64) {
        while let Some(at) = self.scheduler.poll_timeout() {
            if at + world.boot > until {
                break;
            }
            world.advance_to(at + world.boot);
            self.scheduler.handle_timeout(world.device_ms());
            while let Some(event) = self.scheduler.poll_event() {
                match event {
                    ScheduleEvent::Renew => self.renew(world),
                    ScheduleEvent::Stopped(rejection) => {
                        self.stopped = Some(rejection.code_str().to_owned());
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
        world.advance_to(until);
    }

    /// A power cut and reboot: the monotonic clock restarts, RAM is lost,
    /// the time is unknown; the store and the secure element survive.
    fn reboot(&mut self, world: &mut World) {
        world.boot = world.now;
        self.store =
            CredentialStore::open(self.flash.restart(), 0, SimFlash::SECTOR as u32).unwrap();
        let status = self.store.status();
        let mut current = Credential::default();
        self.store.load(Choice::Newest, &mut current).unwrap();
        let times = CertificateTimes::from_certificate(&current.certificate).unwrap();
        assert_eq!(times.not_after, self.not_after);
        self.scheduler = Scheduler::new(
            SchedulePolicy::DEFAULT,
            TimeKeeper::new(BUILD_TIME.max(status.not_earlier_than)),
            times,
            world.device_ms(),
            &mut world.rng,
        );
    }
}

#[test]
fn a_month_of_renewals_over_a_lossy_link() {
    let mut world = World::new(1, 0.2, 0.1);
    let mut device = enroll(&mut world);
    device.live(&mut world, 30 * DAY_MS);
    println!(
        "month: {} renewals, {} given up, {} messages sent",
        device.renewals, device.failures, world.link.sent
    );
    // 24 h certificates renewed at 50–70 % of their lifetime: 43 to 60 a month.
    assert!(
        (43..=62).contains(&device.renewals),
        "{} renewals",
        device.renewals
    );
    assert_eq!(device.late_renewals, 0, "never expired");
    assert_eq!(device.stopped, None);
    assert_eq!(device.keys_used.len() as u32, device.renewals + 1);
    // The counter the gateway saw grew with every renewal, and the store
    // kept it.
    let counter = world.gateway.counter(DEVICE).unwrap();
    assert_eq!(device.store.status().counter, counter);
    assert!(world.link.sent > 2 * device.renewals as usize);
}

#[test]
fn a_week_long_outage_is_ridden_out() {
    let mut world = World::new(2, 0.1, 0.05);
    let mut device = enroll(&mut world);
    device.live(&mut world, 2 * DAY_MS);
    let renewed_before = device.renewals;
    let expiry_at_outage = device.not_after;
    world.link.up = false;
    device.live(&mut world, 9 * DAY_MS);
    assert_eq!(device.renewals, renewed_before);
    assert!(world.unix() > expiry_at_outage, "expired during the outage");
    assert_eq!(device.scheduler.is_expired(world.device_ms()), Some(true));
    println!("outage: {} failed renewals", device.failures);
    // It kept trying through the week, no more often than the capped backoff
    // allows (1 h at most between tries, 30 min at least once capped).
    assert!(
        (100..=400).contains(&device.failures),
        "{} failures",
        device.failures
    );
    world.link.up = true;
    // The gateway lets an expired certificate renew (no grace limit set): the
    // device is back within the longest backoff.
    let back = world.now;
    device.live(&mut world, back + 2 * 3_600_000);
    assert_eq!(device.renewals, renewed_before + 1);
    assert_eq!(device.scheduler.failures(), 0);
    assert_eq!(device.scheduler.is_expired(world.device_ms()), Some(false));
    device.live(&mut world, 14 * DAY_MS);
    assert_eq!(device.late_renewals, 1, "only the renewal after the outage");
}

#[test]
fn an_expired_certificate_the_gateway_refuses_stops_the_scheduler() {
    let mut world = World::new(3, 0.0, 0.0);
    world.gateway.grace = Some(3_600);
    let mut device = enroll(&mut world);
    world.link.up = false;
    device.live(&mut world, 3 * DAY_MS);
    world.link.up = true;
    device.live(&mut world, 4 * DAY_MS);
    assert_eq!(device.stopped.as_deref(), Some("expired"));
    assert_eq!(device.scheduler.poll_timeout(), None);
    assert_eq!(device.renewals, 0);
    // The old credential is still there for an operator to see.
    let mut current = Credential::default();
    device.store.load(Choice::Newest, &mut current).unwrap();
}

#[test]
fn a_device_without_a_clock_renews_after_boot_and_learns_the_time() {
    let mut world = World::new(4, 0.2, 0.2);
    let mut device = enroll(&mut world);
    device.live(&mut world, DAY_MS);
    let renewals = device.renewals;
    // Off for three days; back with no idea of the time.
    world.advance_to(4 * DAY_MS);
    device.reboot(&mut world);
    assert!(!device.scheduler.time().is_set());
    assert!(device.scheduler.time().not_earlier_than() >= T0);
    let due = device.scheduler.poll_timeout().unwrap();
    assert!(due <= 60_000, "renews at once: {due}");
    let until = world.now + 3_600_000;
    device.live(&mut world, until);
    assert_eq!(device.renewals, renewals + 1);
    let time = device.scheduler.time();
    let now = time.now(world.device_ms()).unwrap();
    assert!(
        now.abs_diff(world.unix()) <= 5,
        "clock set from the gateway"
    );
    // The next renewal is inside the new certificate's window, not at once.
    let next = device.scheduler.poll_timeout().unwrap();
    assert!(next - world.device_ms() > 10 * 3_600_000);
}

#[test]
fn rejections_keep_the_credential_and_follow_the_rules() {
    let mut world = World::new(5, 0.0, 0.0);
    let mut device = enroll(&mut world);
    // Busy (`internal`) twice: the request machine retries by itself.
    world.gateway.answers.push_back(Answer::Reject("internal"));
    world.gateway.answers.push_back(Answer::Reject("internal"));
    device.live(&mut world, DAY_MS);
    assert!(device.renewals >= 1);
    assert_eq!(device.stopped, None);
    // Suspended: back off for hours, then try again.
    world
        .gateway
        .answers
        .push_back(Answer::Reject("device_suspended"));
    let before = device.renewals;
    device.live(&mut world, 2 * DAY_MS);
    assert_eq!(device.failures, 1);
    assert!(device.renewals > before);
    // A final rejection: stop, keep the credential.
    world
        .gateway
        .answers
        .push_back(Answer::Reject("certificate_revoked"));
    device.live(&mut world, 5 * DAY_MS);
    assert_eq!(device.stopped.as_deref(), Some("certificate_revoked"));
    assert_eq!(device.scheduler.poll_timeout(), None);
}
