//! When to renew: the renewal scheduler and the device's sense of time.
//!
//! [`TimeKeeper`] holds what the device knows about the wall clock: a
//! persisted floor, `not_earlier_than` (the maximum of the firmware's build
//! time, the last gateway time and the last certificate's `notBefore`), and,
//! once learned, the unix time at some monotonic instant (from a set RTC, or
//! from the gateway's reply: a device without an RTC sets its clock that way).
//!
//! [`Scheduler`] is sans-IO like the request machines: it says when the next
//! renewal should start ([`poll_timeout`](Scheduler::poll_timeout),
//! [`handle_timeout`](Scheduler::handle_timeout), [`poll_event`](Scheduler::poll_event))
//! and is told how each one ended ([`handle_event`](Scheduler::handle_event),
//! [`handle_failure`](Scheduler::handle_failure)).
//!
//! ```text
//!            certificate known, time known: a point in the renewal window
//!   Waiting ───────────────────────────────────────────────► Due ──► Renewing
//!     ▲  ▲    time unknown: now (a device that lost its clock,           │
//!     │  │    after an outage of any length, renews at once)             │
//!     │  └──── Renewed / Enrolled: next point in the new window ◄────────┤
//!     └─────── no answer, `internal`, busy (+ retry after), hardware: ◄──┤
//!              backoff with jitter, capped; also after expiry            │
//!   Stopped ◄──── any other rejection (final): reported, no more tries ◄─┘
//! ```

use rand_core::RngCore;

use crate::exchange::{Certified, Event, Rejection};
use idgate_pki::der::{DerError, Element, Reader, tag};
use idgate_pki::protocol::RejectCode;

/// What the device knows about the wall clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeKeeper {
    not_earlier_than: u64,
    /// (unix seconds, monotonic ms) of the last time learned.
    anchor: Option<(u64, u64)>,
}

impl TimeKeeper {
    /// A device that knows only a floor: the maximum of the firmware's build
    /// time and the `not_earlier_than` persisted in the credential store.
    pub fn new(not_earlier_than: u64) -> TimeKeeper {
        TimeKeeper {
            not_earlier_than,
            anchor: None,
        }
    }

    /// The floor to persist: the wall clock is known to be at least this.
    pub fn not_earlier_than(&self) -> u64 {
        self.not_earlier_than
    }

    /// Raises the floor (a certificate's `notBefore`, say); never lowers it.
    pub fn raise_floor(&mut self, unix: u64) {
        self.not_earlier_than = self.not_earlier_than.max(unix);
    }

    /// Learns the time: `unix` seconds at monotonic `now_ms`, from a set RTC or
    /// from a gateway reply (`gateway_time`, `received_at_ms`). A time below the
    /// floor is taken as the floor: the clock never goes back.
    pub fn set(&mut self, unix: u64, now_ms: u64) {
        let unix = unix.max(self.not_earlier_than);
        self.anchor = Some((unix, now_ms));
        self.not_earlier_than = unix;
    }

    /// Whether the time is known (learned since boot).
    pub fn is_set(&self) -> bool {
        self.anchor.is_some()
    }

    /// The unix time at monotonic `now_ms`, if known; never below the floor.
    pub fn now(&self, now_ms: u64) -> Option<u64> {
        let (unix, at_ms) = self.anchor?;
        Some(
            unix.saturating_add(now_ms.saturating_sub(at_ms) / 1000)
                .max(self.not_earlier_than),
        )
    }
}

/// How the scheduler chooses its times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedulePolicy {
    /// Without a usable window from the gateway: renew at this share of the
    /// lifetime (percent) …
    pub renew_at_percent: u8,
    /// … give or take this share of the lifetime (percent), chosen at random.
    pub window_jitter_percent: u8,
    /// The first retry after a failure, milliseconds; doubles per failure.
    pub backoff_initial_ms: u64,
    /// The longest wait between retries, milliseconds.
    pub backoff_max_ms: u64,
    /// The shortest wait after `device_suspended` (an operator may resume the
    /// device), milliseconds.
    pub suspended_retry_ms: u64,
    /// A gateway's "retry after" longer than this is cut to it, milliseconds.
    pub max_retry_after_ms: u64,
    /// A device that does not know the time renews at once, after a random
    /// delay up to this, milliseconds (a fleet that lost power together does
    /// not come back in step).
    pub unset_clock_jitter_ms: u64,
}

impl SchedulePolicy {
    /// 2/3 of the lifetime ± 5 %; retries from 1 min doubling to 1 h; 6 h
    /// when suspended; "retry after" up to 24 h; up to 1 min of start jitter.
    pub const DEFAULT: SchedulePolicy = SchedulePolicy {
        renew_at_percent: 67,
        window_jitter_percent: 5,
        backoff_initial_ms: 60_000,
        backoff_max_ms: 3_600_000,
        suspended_retry_ms: 6 * 3_600_000,
        max_retry_after_ms: 24 * 3_600_000,
        unset_clock_jitter_ms: 60_000,
    };
}

impl Default for SchedulePolicy {
    fn default() -> Self {
        SchedulePolicy::DEFAULT
    }
}

/// The times of the current certificate, unix seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CertificateTimes {
    /// Validity start.
    pub not_before: u64,
    /// Validity end.
    pub not_after: u64,
    /// The gateway's suggested window, if known (a reply carries it; a
    /// certificate read from flash at boot does not).
    pub window: Option<(u64, u64)>,
}

impl CertificateTimes {
    /// The validity of a certificate (DER), without a window: what a device
    /// knows at boot from the certificate in its store.
    pub fn from_certificate(certificate: &[u8]) -> Result<CertificateTimes, DerError> {
        let mut outer = Reader::new(certificate);
        let mut fields = Reader::new(outer.expect(tag::SEQUENCE)?.content);
        let mut tbs = Reader::new(fields.expect(tag::SEQUENCE)?.content);
        let mut element = tbs.any()?;
        if element.tag == tag::CONTEXT_0 {
            element = tbs.any()?; // version present: next is the serial
        }
        if element.tag != tag::INTEGER {
            return Err(DerError::Invalid);
        }
        tbs.expect(tag::SEQUENCE)?; // signature algorithm
        tbs.expect(tag::SEQUENCE)?; // issuer
        let mut validity = Reader::new(tbs.expect(tag::SEQUENCE)?.content);
        let not_before = x509_time(validity.any()?)?;
        let not_after = x509_time(validity.any()?)?;
        Ok(CertificateTimes {
            not_before,
            not_after,
            window: None,
        })
    }

    fn from_certified(certified: &Certified) -> CertificateTimes {
        CertificateTimes {
            not_before: certified.not_before,
            not_after: certified.not_after,
            window: Some((certified.renew_after, certified.renew_before)),
        }
    }
}

/// An X.509 Time (UTCTime `YYMMDDHHMMSSZ` or GeneralizedTime
/// `YYYYMMDDHHMMSSZ`) as unix seconds; times before 1970 are refused.
fn x509_time(element: Element<'_>) -> Result<u64, DerError> {
    let (year, rest) = match (element.tag, element.content.len()) {
        (0x17, 13) => {
            let yy = digits(&element.content[..2])?;
            (
                if yy < 50 { 2000 + yy } else { 1900 + yy },
                &element.content[2..],
            )
        }
        (0x18, 15) => (digits(&element.content[..4])?, &element.content[4..]),
        _ => return Err(DerError::Invalid),
    };
    if rest[10] != b'Z' {
        return Err(DerError::Invalid);
    }
    let month = digits(&rest[0..2])?;
    let day = digits(&rest[2..4])?;
    let hour = digits(&rest[4..6])?;
    let minute = digits(&rest[6..8])?;
    let second = digits(&rest[8..10])?;
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
        || year < 1970
    {
        return Err(DerError::Invalid);
    }
    // Days from civil (Howard Hinnant's algorithm), for years from 1970.
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let year_of_era = y - era * 400;
    let day_of_year = (153 * m + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    Ok(days * 86_400 + hour * 3_600 + minute * 60 + second)
}

fn digits(bytes: &[u8]) -> Result<u64, DerError> {
    bytes.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            Ok(n * 10 + u64::from(b - b'0'))
        } else {
            Err(DerError::Invalid)
        }
    })
}

/// What the scheduler asks of the firmware.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ScheduleEvent {
    /// Start a renewal now: reserve a counter in the credential store, then
    /// [`Renewal::start`](crate::Renewal) with a new rid (and so a new key).
    Renew,
    /// The gateway refused for good; the scheduler stopped. The current
    /// credential stays; an operator must act.
    Stopped(Rejection),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    Waiting { at_ms: u64 },
    Renewing,
    Stopped,
}

/// The renewal scheduler. See the module documentation.
#[derive(Debug)]
pub struct Scheduler {
    policy: SchedulePolicy,
    time: TimeKeeper,
    certificate: Option<CertificateTimes>,
    failures: u32,
    state: State,
    event: Option<ScheduleEvent>,
}

impl Scheduler {
    /// A scheduler for a device whose current certificate has `certificate`'s
    /// times. With the time unknown the first renewal is due almost at once.
    pub fn new(
        policy: SchedulePolicy,
        time: TimeKeeper,
        certificate: CertificateTimes,
        now_ms: u64,
        rng: &mut impl RngCore,
    ) -> Scheduler {
        let mut time = time;
        time.raise_floor(certificate.not_before);
        let mut scheduler = Scheduler {
            policy,
            time,
            certificate: Some(certificate),
            failures: 0,
            state: State::Renewing,
            event: None,
        };
        scheduler.schedule_renewal(now_ms, rng);
        scheduler
    }

    /// The time keeper (persist its `not_earlier_than` with the next write).
    pub fn time(&self) -> &TimeKeeper {
        &self.time
    }

    /// The time keeper, to set it from a real-time clock.
    pub fn time_mut(&mut self) -> &mut TimeKeeper {
        &mut self.time
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Whether the current certificate has expired, as far as the device
    /// knows (`None`: the time is unknown).
    pub fn is_expired(&self, now_ms: u64) -> Option<bool> {
        let now = self.time.now(now_ms)?;
        Some(self.certificate.is_some_and(|c| now >= c.not_after))
    }

    /// Whether the scheduler stopped after a final rejection.
    pub fn is_stopped(&self) -> bool {
        self.state == State::Stopped
    }

    /// When to call [`handle_timeout`](Self::handle_timeout), monotonic ms;
    /// `None` while a renewal runs or once stopped.
    pub fn poll_timeout(&self) -> Option<u64> {
        match self.state {
            State::Waiting { at_ms } => Some(at_ms),
            _ => None,
        }
    }

    /// Advances the clock: once the renewal is due, hands out
    /// [`ScheduleEvent::Renew`] and waits for its outcome.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        if let State::Waiting { at_ms } = self.state
            && now_ms >= at_ms
        {
            self.state = State::Renewing;
            self.event = Some(ScheduleEvent::Renew);
        }
    }

    /// What the firmware should do next.
    pub fn poll_event(&mut self) -> Option<ScheduleEvent> {
        self.event.take()
    }

    /// The final event of a renewal (or enrollment) started on
    /// [`ScheduleEvent::Renew`]. A certificate learns the time from the
    /// gateway and schedules the next renewal inside its window; no answer and
    /// transient rejections back off; other rejections stop the scheduler.
    pub fn handle_event(&mut self, now_ms: u64, event: &Event, rng: &mut impl RngCore) {
        match event {
            Event::Enrolled(certified) | Event::Renewed(certified) => {
                self.time
                    .set(certified.gateway_time, certified.received_at_ms);
                self.time.raise_floor(certified.not_before);
                self.certificate = Some(CertificateTimes::from_certified(certified));
                self.failures = 0;
                self.schedule_renewal(now_ms, rng);
            }
            Event::GaveUp { .. } => self.handle_failure(now_ms, None, rng),
            Event::Rejected(rejection) => match rejection.code() {
                Some(RejectCode::Internal) => self.handle_failure(now_ms, None, rng),
                Some(RejectCode::DeviceSuspended) => {
                    let wait = self.policy.suspended_retry_ms;
                    self.handle_failure(now_ms, Some(wait), rng);
                }
                _ => {
                    self.state = State::Stopped;
                    self.event = Some(ScheduleEvent::Stopped(rejection.clone()));
                }
            },
        }
    }

    /// A renewal that failed without a final answer: the broker refused the
    /// connection, the link is down, the key store failed, or the gateway said
    /// it is busy. `retry_after_ms` is the gateway's hint, if it gave one (it
    /// is honoured up to [`SchedulePolicy::max_retry_after_ms`]). Backs off
    /// exponentially with jitter, capped; expiry changes nothing (the gateway
    /// decides whether an expired certificate may still renew).
    pub fn handle_failure(
        &mut self,
        now_ms: u64,
        retry_after_ms: Option<u64>,
        rng: &mut impl RngCore,
    ) {
        if self.state == State::Stopped {
            return;
        }
        self.failures = self.failures.saturating_add(1);
        let doublings = (self.failures - 1).min(40);
        let base = self
            .policy
            .backoff_initial_ms
            .saturating_mul(1 << doublings)
            .min(self.policy.backoff_max_ms)
            .max(1);
        // "Equal jitter": half fixed, half random, so retries neither bunch
        // nor come too soon.
        let wait = base / 2 + rng.next_u64() % (base - base / 2 + 1);
        let hint = retry_after_ms.map_or(0, |ms| ms.min(self.policy.max_retry_after_ms));
        self.state = State::Waiting {
            at_ms: now_ms.saturating_add(wait.max(hint)),
        };
    }

    fn schedule_renewal(&mut self, now_ms: u64, rng: &mut impl RngCore) {
        let (Some(now), Some(certificate)) = (self.time.now(now_ms), self.certificate) else {
            let jitter = rng.next_u64() % (self.policy.unset_clock_jitter_ms + 1);
            self.state = State::Waiting {
                at_ms: now_ms.saturating_add(jitter),
            };
            return;
        };
        let (start, end) = self.window(&certificate);
        let point = start + rng.next_u64() % (end - start + 1);
        let wait_ms = point.saturating_sub(now).saturating_mul(1000);
        self.state = State::Waiting {
            at_ms: now_ms.saturating_add(wait_ms),
        };
    }

    /// The renewal window, unix seconds: the gateway's if it lies inside the
    /// validity, else the policy's share of the lifetime.
    fn window(&self, certificate: &CertificateTimes) -> (u64, u64) {
        let CertificateTimes {
            not_before,
            not_after,
            window,
        } = *certificate;
        if let Some((after, before)) = window
            && not_before <= after
            && after <= before
            && before <= not_after
        {
            return (after, before);
        }
        let lifetime = not_after.saturating_sub(not_before);
        let at = u64::from(self.policy.renew_at_percent.min(100));
        let jitter = u64::from(self.policy.window_jitter_percent);
        let start = not_before + lifetime * at.saturating_sub(jitter) / 100;
        let end = not_before + lifetime * (at + jitter).min(100) / 100;
        (start, end.max(start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic RNG for tests (xorshift64).
    struct TestRng(u64);

    impl RngCore for TestRng {
        fn next_u32(&mut self) -> u32 {
            self.next_u64() as u32
        }
        fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            for b in dest {
                *b = self.next_u64() as u8;
            }
        }
        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
            self.fill_bytes(dest);
            Ok(())
        }
    }

    const DAY: u64 = 86_400;
    const T0: u64 = 1_800_000_000;

    fn times() -> CertificateTimes {
        CertificateTimes {
            not_before: T0,
            not_after: T0 + DAY,
            window: None,
        }
    }

    #[test]
    fn x509_times_convert_to_unix_seconds() {
        let time = |tag, s: &[u8]| {
            x509_time(Element {
                tag,
                content: s,
                encoded: s,
            })
        };
        assert_eq!(time(0x17, b"700101000000Z"), Ok(0));
        assert_eq!(time(0x17, b"240229123456Z"), Ok(1_709_210_096));
        assert_eq!(time(0x18, b"20991231235959Z"), Ok(4_102_444_799));
        assert_eq!(time(0x18, b"21000101000000Z"), Ok(4_102_444_800));
        for (tag, bad) in [
            (0x17, &b"240229123456"[..]),
            (0x17, b"241329123456Z"),
            (0x17, b"24022912345aZ"),
            (0x18, b"19691231235959Z"),
            (0x04, b"240229123456Z"),
        ] {
            assert!(time(tag, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn time_never_goes_back() {
        let mut time = TimeKeeper::new(T0);
        assert_eq!(time.now(5), None);
        time.set(T0 - 1000, 1_000);
        assert_eq!(time.now(1_000), Some(T0), "below the floor: the floor");
        assert_eq!(time.now(11_000), Some(T0 + 10));
        time.set(T0 + 100, 12_000);
        assert_eq!(time.not_earlier_than(), T0 + 100);
        time.raise_floor(T0 + 50);
        assert_eq!(time.not_earlier_than(), T0 + 100);
    }

    #[test]
    fn renews_inside_the_default_window_with_jitter() {
        let mut seen = [false; 2];
        for seed in 1..200 {
            let mut rng = TestRng(seed);
            let mut time = TimeKeeper::new(0);
            time.set(T0, 0);
            let scheduler = Scheduler::new(SchedulePolicy::DEFAULT, time, times(), 0, &mut rng);
            let at = scheduler.poll_timeout().unwrap() / 1000;
            // 2/3 of a day ± 5 %: 62 % to 72 %.
            assert!((DAY * 62 / 100..=DAY * 72 / 100).contains(&at), "{at}");
            seen[usize::from(at > DAY * 67 / 100)] = true;
        }
        assert_eq!(seen, [true, true], "jitter spreads both ways");
    }

    #[test]
    fn unknown_time_renews_at_once_and_learns_the_time() {
        let mut rng = TestRng(7);
        let mut scheduler = Scheduler::new(
            SchedulePolicy::DEFAULT,
            TimeKeeper::new(T0 - DAY),
            times(),
            0,
            &mut rng,
        );
        let at = scheduler.poll_timeout().unwrap();
        assert!(at <= 60_000);
        assert_eq!(scheduler.is_expired(at), None);
        scheduler.handle_timeout(at);
        assert_eq!(scheduler.poll_event(), Some(ScheduleEvent::Renew));
        assert_eq!(scheduler.poll_timeout(), None);
        // The time floor already includes the certificate's notBefore.
        assert_eq!(scheduler.time().not_earlier_than(), T0);
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_honours_retry_after() {
        let mut rng = TestRng(3);
        let mut time = TimeKeeper::new(0);
        time.set(T0, 0);
        let policy = SchedulePolicy::DEFAULT;
        let mut scheduler = Scheduler::new(policy, time, times(), 0, &mut rng);
        let mut now = scheduler.poll_timeout().unwrap();
        let mut waits = [0u64; 10];
        for wait in &mut waits {
            scheduler.handle_timeout(now);
            assert_eq!(scheduler.poll_event(), Some(ScheduleEvent::Renew));
            scheduler.handle_event(now, &Event::GaveUp { attempts: 8 }, &mut rng);
            let next = scheduler.poll_timeout().unwrap();
            *wait = next - now;
            now = next;
        }
        for (i, &wait) in waits.iter().enumerate() {
            let base = (policy.backoff_initial_ms << i).min(policy.backoff_max_ms);
            assert!((base / 2..=base).contains(&wait), "{i}: {wait}");
        }
        // A busy gateway's "retry after" is honoured, up to the cap.
        scheduler.handle_timeout(now);
        scheduler.poll_event();
        scheduler.handle_failure(now, Some(5 * 3_600_000), &mut rng);
        assert_eq!(scheduler.poll_timeout(), Some(now + 5 * 3_600_000));
        scheduler.handle_failure(now, Some(u64::MAX), &mut rng);
        assert_eq!(
            scheduler.poll_timeout(),
            Some(now + policy.max_retry_after_ms)
        );
    }
}
