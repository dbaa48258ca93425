//! When to retransmit: exponential backoff with jitter, and when to give up.
//!
//! Replies travel at QoS 0 and may be lost, and the gateway answers a repeated
//! request id with the same result, so resending the identical request is always
//! safe. The jitter keeps a fleet that lost power together from retrying in step.

use crate::error::UsageError;

/// How an enrollment retransmits its request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Time to wait for a reply to the first transmission, in milliseconds.
    pub initial_timeout_ms: u32,
    /// The timeout doubles with every attempt up to this cap, in milliseconds.
    pub max_timeout_ms: u32,
    /// Each timeout is shortened by a pseudo-random amount up to this share of it
    /// (0–100); it is never lengthened, so the cap holds.
    pub jitter_percent: u8,
    /// Transmissions in all, the first included; after the last one times out the
    /// agent gives up.
    pub max_attempts: u32,
}

impl RetryPolicy {
    /// 5 s, doubling to at most 60 s, up to 25 % jitter, 8 attempts (about 4 min).
    pub const DEFAULT: RetryPolicy = RetryPolicy {
        initial_timeout_ms: 5_000,
        max_timeout_ms: 60_000,
        jitter_percent: 25,
        max_attempts: 8,
    };

    pub(crate) fn check(&self) -> Result<(), UsageError> {
        if self.max_attempts == 0 || self.initial_timeout_ms == 0 || self.jitter_percent > 100 {
            return Err(UsageError::BadRetryPolicy);
        }
        Ok(())
    }

    /// The timeout after transmission number `attempt` (1-based), before jitter.
    pub fn base_timeout_ms(&self, attempt: u32) -> u64 {
        let doublings = attempt.saturating_sub(1).min(32);
        let grown = u64::from(self.initial_timeout_ms) << doublings;
        grown.min(u64::from(self.max_timeout_ms.max(self.initial_timeout_ms)))
    }

    pub(crate) fn timeout_ms(&self, attempt: u32, jitter: &mut Jitter) -> u64 {
        let base = self.base_timeout_ms(attempt);
        let spread = base * u64::from(self.jitter_percent) / 100;
        // At least 1 ms, so a deadline always lies in the future.
        (base - u64::from(jitter.next()) % (spread + 1)).max(1)
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy::DEFAULT
    }
}

/// A tiny PRNG (xorshift32) for jitter only; it needs no quality beyond spreading
/// devices apart, and seeding it from the (random) request id saves asking the
/// hardware for more randomness.
#[derive(Clone, Debug)]
pub(crate) struct Jitter(u32);

impl Jitter {
    pub(crate) fn seeded_from(bytes: &[u8]) -> Jitter {
        // FNV-1a
        let mut hash: u32 = 0x811c_9dc5;
        for &b in bytes {
            hash ^= u32::from(b);
            hash = hash.wrapping_mul(0x0100_0193);
        }
        Jitter(if hash == 0 { 0x9e37_79b9 } else { hash })
    }

    fn next(&mut self) -> u32 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.0 = x;
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap() {
        let p = RetryPolicy::DEFAULT;
        let bases: [u64; 6] = core::array::from_fn(|i| p.base_timeout_ms(i as u32 + 1));
        assert_eq!(bases, [5_000, 10_000, 20_000, 40_000, 60_000, 60_000]);
        assert_eq!(p.base_timeout_ms(u32::MAX), 60_000);
    }

    #[test]
    fn jitter_only_shortens() {
        let p = RetryPolicy::DEFAULT;
        let mut jitter = Jitter::seeded_from(b"0123456789abcdef");
        let mut seen_short = false;
        for attempt in 1..200 {
            let base = p.base_timeout_ms(attempt);
            let t = p.timeout_ms(attempt, &mut jitter);
            assert!(t <= base && t >= base * 3 / 4, "{attempt}: {t}");
            seen_short |= t < base;
        }
        assert!(seen_short);
        let none = RetryPolicy {
            jitter_percent: 0,
            ..p
        };
        assert_eq!(none.timeout_ms(1, &mut jitter), 5_000);
    }

    #[test]
    fn different_rids_spread_apart() {
        let p = RetryPolicy::DEFAULT;
        let a = p.timeout_ms(1, &mut Jitter::seeded_from(b"aaaaaaaaaaaaaaaa"));
        let b = p.timeout_ms(1, &mut Jitter::seeded_from(b"aaaaaaaaaaaaaaab"));
        assert_ne!(a, b);
    }

    #[test]
    fn unusable_policies_are_refused() {
        for bad in [
            RetryPolicy {
                max_attempts: 0,
                ..RetryPolicy::DEFAULT
            },
            RetryPolicy {
                initial_timeout_ms: 0,
                ..RetryPolicy::DEFAULT
            },
            RetryPolicy {
                jitter_percent: 101,
                ..RetryPolicy::DEFAULT
            },
        ] {
            assert_eq!(bad.check(), Err(UsageError::BadRetryPolicy));
        }
        assert_eq!(RetryPolicy::DEFAULT.check(), Ok(()));
    }
}
