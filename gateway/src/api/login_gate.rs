//! What stands between an unauthenticated client and argon2: the attempts
//! under way, counted with the recorded failures so that parallel guesses
//! cannot all pass the rate limit before any of them is recorded, and a cap
//! on how many passwords are verified at once (argon2id takes 19 MiB each).
//!
//! Both are per process: with several replicas on one PostgreSQL registry,
//! each may let through at most its own attempts under way beyond the
//! recorded ones.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Semaphore, SemaphorePermit};

/// Passwords verified at once; more wait (up to [`MAX_WAITING`]).
pub const MAX_VERIFYING: usize = 4;
/// Logins waiting for a verification slot; beyond, 503 `busy` at once.
pub const MAX_WAITING: usize = 64;

/// The admin listener's login gate (one per process, in [`super::AdminState`]).
#[derive(Debug)]
pub struct LoginGate {
    /// Serializes "count, decide, reserve" so that two attempts cannot both
    /// see the last free place.
    turn: tokio::sync::Mutex<()>,
    /// Attempts under way per rate-limit subject.
    under_way: Mutex<HashMap<String, u32>>,
    verifying: Semaphore,
    waiting: AtomicUsize,
    max_waiting: usize,
}

impl Default for LoginGate {
    fn default() -> Self {
        LoginGate::new(MAX_VERIFYING, MAX_WAITING)
    }
}

/// Why an attempt may not go on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// A subject has reached its limit (recorded failures and attempts under way).
    RateLimited,
    /// Too many logins are already waiting for a verification slot.
    Busy,
}

/// An attempt under way: counted against its subjects until dropped. Drop
/// it only after its failure (if any) is recorded.
#[derive(Debug)]
pub struct Reservation<'a> {
    gate: &'a LoginGate,
    subjects: Vec<String>,
}

impl LoginGate {
    /// A gate verifying at most `verifying` passwords at once, with at most
    /// `waiting` logins waiting for a slot.
    pub fn new(verifying: usize, waiting: usize) -> LoginGate {
        LoginGate {
            turn: tokio::sync::Mutex::new(()),
            under_way: Mutex::new(HashMap::new()),
            verifying: Semaphore::new(verifying),
            waiting: AtomicUsize::new(0),
            max_waiting: waiting,
        }
    }

    /// Reserves a place for an attempt against each `(subject, limit)`, if
    /// `recorded(subjects)` (the failures in the registry) plus the attempts
    /// under way stay below every limit.
    pub async fn reserve<'a, F, E>(
        &'a self,
        limits: &[(&str, u32)],
        recorded: F,
    ) -> Result<Result<Reservation<'a>, Refused>, E>
    where
        F: AsyncFnOnce(&[&str]) -> Result<Vec<i64>, E>,
    {
        let _turn = self.turn.lock().await;
        // Under way first, recorded second: an attempt that ends in between
        // is counted twice (harmless), never not at all.
        let under_way: Vec<u32> = {
            let map = self.under_way.lock().unwrap_or_else(|p| p.into_inner());
            limits
                .iter()
                .map(|(s, _)| map.get(*s).copied().unwrap_or(0))
                .collect()
        };
        let subjects: Vec<&str> = limits.iter().map(|(s, _)| *s).collect();
        let counts = recorded(&subjects).await?;
        let full =
            limits
                .iter()
                .zip(&under_way)
                .zip(&counts)
                .any(|(((_, limit), pending), recorded)| {
                    recorded + i64::from(*pending) >= i64::from(*limit)
                });
        if full {
            return Ok(Err(Refused::RateLimited));
        }
        let mut map = self.under_way.lock().unwrap_or_else(|p| p.into_inner());
        for subject in &subjects {
            *map.entry((*subject).to_owned()).or_insert(0) += 1;
        }
        Ok(Ok(Reservation {
            gate: self,
            subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
        }))
    }

    /// A verification slot, waiting for one unless too many already wait.
    pub async fn verification_slot(&self) -> Result<SemaphorePermit<'_>, Refused> {
        if let Ok(permit) = self.verifying.try_acquire() {
            return Ok(permit);
        }
        /// Counts a waiter until dropped, also when the client goes away.
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let before = self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiting);
        if before >= self.max_waiting {
            return Err(Refused::Busy);
        }
        // The semaphore is never closed.
        self.verifying.acquire().await.map_err(|_| Refused::Busy)
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut map = self
            .gate
            .under_way
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for subject in &self.subjects {
            if let Some(count) = map.get_mut(subject) {
                *count -= 1;
                if *count == 0 {
                    map.remove(subject);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn none_recorded(subjects: &[&str]) -> Result<Vec<i64>, ()> {
        Ok(vec![0; subjects.len()])
    }

    #[tokio::test]
    async fn attempts_under_way_count_against_the_limit() {
        let gate = LoginGate::default();
        let limits = [("pair", 2), ("ip", 3)];
        let first = gate.reserve(&limits, none_recorded).await.unwrap().unwrap();
        let second = gate.reserve(&limits, none_recorded).await.unwrap().unwrap();
        assert_eq!(
            gate.reserve(&limits, none_recorded).await.unwrap().err(),
            Some(Refused::RateLimited)
        );
        // Another pair from the same address: one place left there.
        let other = gate
            .reserve(&[("other", 2), ("ip", 3)], none_recorded)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            gate.reserve(&[("third", 2), ("ip", 3)], none_recorded)
                .await
                .unwrap()
                .err(),
            Some(Refused::RateLimited)
        );
        drop((first, second, other));
        // Recorded failures count too.
        let recorded = async |s: &[&str]| -> Result<Vec<i64>, ()> { Ok(vec![1; s.len()]) };
        let one = gate.reserve(&limits, recorded).await.unwrap().unwrap();
        assert_eq!(
            gate.reserve(&limits, recorded).await.unwrap().err(),
            Some(Refused::RateLimited)
        );
        drop(one);
        assert!(gate.under_way.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn verifications_are_capped_and_waiters_bounded() {
        let gate = std::sync::Arc::new(LoginGate::new(2, 1));
        let a = gate.verification_slot().await.unwrap();
        let _b = gate.verification_slot().await.unwrap();
        // A third waits; a fourth is refused at once.
        let waiter = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.verification_slot().await.map(drop) })
        };
        while gate.waiting.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(gate.verification_slot().await.err(), Some(Refused::Busy));
        drop(a);
        assert_eq!(waiter.await.unwrap(), Ok(()));
    }
}
