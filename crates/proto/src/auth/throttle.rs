//! A growing per-user delay after failed logins, so that guessing a password over
//! the network is slow. Pure: the caller passes the time in, and does the waiting.
//!
//! After n consecutive failures of a user, that user's next attempt waits
//! `FIRST_DELAY * 2^(n-1)`, capped at `CAP`: 0, 250 ms, 500 ms, 1 s, 2 s, 2 s, ...
//! Eight wrong guesses in a row therefore take about 10 s instead of milliseconds;
//! a success resets the count.
//!
//! Attempts are also spaced out when they overlap: each admitted attempt reserves
//! the next slot, so opening many connections at once does not multiply the rate.
//! An attempt whose slot would be more than `CAP` away is not queued but refused
//! ([`Admission::Busy`]): the queue, and a connection's wait, stay bounded.
//!
//! Why a cap of 2 s: the delay also falls on the real user while someone guesses
//! at their account. Two seconds a login is a nuisance, not a lock-out, and still
//! limits a guesser to about one try per 2 s per user, against thousands per
//! second unthrottled. The count is forgotten after [`FORGET_AFTER`] without a
//! failure, which also bounds the table.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The delay after the first failure.
pub const FIRST_DELAY: Duration = Duration::from_millis(250);
/// The longest delay between two attempts of one user.
pub const CAP: Duration = Duration::from_secs(2);
/// A user's failures are forgotten after this long without another.
pub const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);

/// What [`LoginThrottle::admit`] decides for one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Verify the attempt after waiting this long (zero: at once).
    After(Duration),
    /// Too many attempts of this user are waiting: refuse this one
    /// ([`super::Refusal::TryLater`]) and let the client try again after this long.
    Busy(Duration),
}

#[derive(Clone, Copy, Debug)]
struct Record {
    failures: u32,
    /// The earliest time the next attempt may be verified.
    next_slot: Instant,
    last_failure: Instant,
}

/// Failed logins per user, and when each user's next attempt may be verified.
#[derive(Debug)]
pub struct LoginThrottle {
    first: Duration,
    cap: Duration,
    users: HashMap<String, Record>,
}

impl Default for LoginThrottle {
    fn default() -> Self {
        Self::new()
    }
}

impl LoginThrottle {
    /// A throttle with the documented schedule ([`FIRST_DELAY`], [`CAP`]).
    pub fn new() -> Self {
        Self::with_schedule(FIRST_DELAY, CAP)
    }

    /// A throttle with another schedule: `first` after one failure, doubling, at
    /// most `cap`.
    pub fn with_schedule(first: Duration, cap: Duration) -> Self {
        LoginThrottle { first, cap, users: HashMap::new() }
    }

    /// The wait before the attempt that follows `failures` consecutive failures.
    pub fn delay(&self, failures: u32) -> Duration {
        schedule(self.first, self.cap, failures)
    }

    /// An attempt to log in as `user` arrives at `now` (call it before verifying
    /// the proof, for an existing account only). Reserves the attempt's slot.
    pub fn admit(&mut self, user: &str, now: Instant) -> Admission {
        self.expire(user, now);
        let Some(rec) = self.users.get_mut(user) else {
            return Admission::After(Duration::ZERO);
        };
        let slot = rec.next_slot.max(now);
        let wait = slot - now;
        if wait > self.cap {
            return Admission::Busy(wait);
        }
        rec.next_slot = slot + schedule(self.first, self.cap, rec.failures);
        Admission::After(wait)
    }

    /// The attempt of `user` verified at `now` failed.
    pub fn failed(&mut self, user: &str, now: Instant) {
        self.expire(user, now);
        let rec =
            self.users.entry(user.to_string()).or_insert(Record { failures: 0, next_slot: now, last_failure: now });
        rec.failures = rec.failures.saturating_add(1);
        rec.last_failure = now;
        rec.next_slot = rec.next_slot.max(now + schedule(self.first, self.cap, rec.failures));
    }

    /// The attempt of `user` succeeded: forget its failures.
    pub fn succeeded(&mut self, user: &str) {
        self.users.remove(user);
    }

    /// How long ago `user`'s last failed login was, if it has failures (for the
    /// log: an attempt not delayed says how long it came after the last one).
    pub fn since_last_failure(&self, user: &str, now: Instant) -> Option<Duration> {
        self.users.get(user).map(|r| now.saturating_duration_since(r.last_failure))
    }

    /// How many consecutive failures `user` has (for the log).
    pub fn failures(&self, user: &str) -> u32 {
        self.users.get(user).map_or(0, |r| r.failures)
    }

    /// Forgets every user whose last failure is [`FORGET_AFTER`] old and who has no
    /// reserved slot ahead; call it now and then (a tick) to bound the table.
    pub fn prune(&mut self, now: Instant) {
        self.users.retain(|_, r| !Self::stale(r, now));
    }

    fn stale(r: &Record, now: Instant) -> bool {
        now.saturating_duration_since(r.last_failure) >= FORGET_AFTER && r.next_slot <= now
    }

    fn expire(&mut self, user: &str, now: Instant) {
        if self.users.get(user).is_some_and(|r| Self::stale(r, now)) {
            self.users.remove(user);
        }
    }
}

/// `first * 2^(failures-1)`, at most `cap`; zero before any failure. The shift is
/// bounded so it cannot overflow: the cap is reached long before.
fn schedule(first: Duration, cap: Duration, failures: u32) -> Duration {
    match failures {
        0 => Duration::ZERO,
        n => first.saturating_mul(1u32 << (n - 1).min(20)).min(cap),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::test_rand::SplitMix64;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_schedule_doubles_from_250ms_to_the_cap() {
        let t = LoginThrottle::new();
        let want = [0, 250, 500, 1000, 2000, 2000, 2000];
        for (n, ms) in want.iter().enumerate() {
            assert_eq!(t.delay(n as u32), Duration::from_millis(*ms), "after {n} failures");
        }
        assert_eq!(t.delay(u32::MAX), CAP, "no overflow");
    }

    #[test]
    fn sequential_wrong_guesses_wait_longer_each_time_and_eight_take_seconds() {
        let mut t = LoginThrottle::new();
        let mut now = Instant::now();
        let start = now;
        let mut waits = Vec::new();
        for _ in 0..8 {
            let Admission::After(wait) = t.admit("alice", now) else { panic!() };
            waits.push(wait.as_millis());
            now += wait;
            t.failed("alice", now);
            now += MS; // the guesser answers at once
        }
        assert_eq!(waits, [0, 249, 499, 999, 1999, 1999, 1999, 1999]);
        assert!(now - start >= Duration::from_secs(9), "{:?}", now - start);
        assert_eq!(t.failures("alice"), 8);
    }

    #[test]
    fn success_resets_and_other_users_are_not_slowed() {
        let mut t = LoginThrottle::new();
        let now = Instant::now();
        t.failed("alice", now);
        t.failed("alice", now);
        assert_eq!(t.admit("bob", now), Admission::After(Duration::ZERO));
        assert_eq!(t.admit("alice", now), Admission::After(500 * MS));
        t.succeeded("alice");
        assert_eq!(t.admit("alice", now), Admission::After(Duration::ZERO));
        assert_eq!(t.failures("alice"), 0);
    }

    #[test]
    fn parallel_attempts_are_spaced_out_and_the_queue_is_bounded() {
        let mut t = LoginThrottle::new();
        let now = Instant::now();
        for _ in 0..5 {
            t.failed("alice", now);
        }
        // Twenty connections at once: slots 2 s apart, and only those within the
        // cap wait; the rest are told to come back.
        let verdicts: Vec<Admission> = (0..20).map(|_| t.admit("alice", now)).collect();
        assert_eq!(verdicts[0], Admission::After(2000 * MS));
        assert!(matches!(verdicts[1], Admission::Busy(d) if d == 4000 * MS), "{:?}", verdicts[1]);
        assert!(verdicts[2..].iter().all(|v| matches!(v, Admission::Busy(_))));
    }

    #[test]
    fn failures_are_forgotten_after_a_quiet_while() {
        let mut t = LoginThrottle::new();
        let now = Instant::now();
        for _ in 0..6 {
            t.failed("alice", now);
        }
        let later = now + FORGET_AFTER + MS;
        assert_eq!(t.admit("alice", later), Admission::After(Duration::ZERO));
        t.failed("bob", now);
        t.prune(later);
        assert_eq!(t.failures("bob"), 0);
        assert!(t.users.is_empty());
    }

    #[test]
    fn random_schedules_never_wait_past_the_cap_nor_panic() {
        for seed in 0..200u64 {
            let mut rng = SplitMix64::new(seed);
            let mut t = LoginThrottle::new();
            let mut now = Instant::now();
            for _ in 0..200 {
                now += Duration::from_millis(rng.next_u64() % 3000);
                let user = ["a", "b", "c"][(rng.next_u64() % 3) as usize];
                match t.admit(user, now) {
                    Admission::After(wait) => {
                        assert!(wait <= CAP, "seed {seed}: {wait:?}");
                        if rng.next_u64().is_multiple_of(4) {
                            t.succeeded(user);
                        } else {
                            t.failed(user, now + wait);
                        }
                    }
                    Admission::Busy(retry) => assert!(retry > CAP, "seed {seed}"),
                }
                if rng.next_u64().is_multiple_of(50) {
                    t.prune(now);
                }
            }
        }
    }
}
