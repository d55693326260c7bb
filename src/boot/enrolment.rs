//! Who may enrol unknown machines, and how fast: the `[boot] enrolment` switch and a token
//! bucket over the nodes enrolment creates.
//!
//! Anyone who reaches the node-facing listener can ask for the profile of a MAC nobody
//! knows, and each such request makes a node, a catalog and a discovery workflow. The
//! switch keeps that off where the operator has not asked for discovery (by default it
//! follows DHCP: on when metalgraph runs DHCP, off otherwise); the bucket bounds how many
//! nodes a flood can make — `burst` at once, then `rate` per minute.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

/// A token bucket: `capacity` tokens, refilled at `per_minute` tokens a minute. Pure: the
/// caller passes the time, so tests need no clock.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    per_sec: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens refilled at `per_minute`, as of `now`. Both are at
    /// least 1 (the configuration checks it; 0 is taken as 1 here).
    pub fn new(per_minute: u32, burst: u32, now: Instant) -> Self {
        let capacity = f64::from(burst.max(1));
        TokenBucket {
            capacity,
            per_sec: f64::from(per_minute.max(1)) / 60.0,
            tokens: capacity,
            last: now,
        }
    }

    /// Takes a token at `now`, or says how long until one is due.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.capacity);
        self.last = now;
        // A hair under one counts as one: refills summed over many short intervals may
        // fall short of a whole token by rounding alone.
        if self.tokens >= 1.0 - 1e-9 {
            self.tokens = (self.tokens - 1.0).max(0.0);
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.per_sec))
        }
    }
}

/// Whether unknown machines are enrolled, and the bucket every enrolment takes a token
/// from. One per server, shared by every request.
#[derive(Debug)]
pub struct Enrolment {
    enabled: bool,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    bucket: TokenBucket,
    /// Whether the last request was refused: the warning is logged once per episode.
    limited: bool,
}

impl Enrolment {
    /// Enrolment switched `enabled`, at most `burst` at once and `per_minute` after that.
    pub fn new(enabled: bool, per_minute: u32, burst: u32) -> Self {
        Enrolment {
            enabled,
            state: Mutex::new(State {
                bucket: TokenBucket::new(per_minute, burst, Instant::now()),
                limited: false,
            }),
        }
    }

    /// Whether the operator enabled enrolment.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Takes the token one enrolment needs, or says (in whole seconds, at least 1) when to
    /// ask again. The first refusal of an episode is logged as a warning.
    pub fn admit(&self) -> Result<(), u32> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match state.bucket.take(Instant::now()) {
            Ok(()) => {
                state.limited = false;
                Ok(())
            }
            Err(wait) => {
                let secs = u32::try_from(wait.as_secs().saturating_add(1)).unwrap_or(u32::MAX);
                if !state.limited {
                    state.limited = true;
                    warn!(
                        retry_after_s = secs,
                        "enrolment rate limit reached (boot.enrolment_rate, boot.enrolment_burst); unknown machines are told to retry"
                    );
                }
                Err(secs)
            }
        }
    }
}

impl Default for Enrolment {
    /// Enrolment on, at the default rate.
    fn default() -> Self {
        Enrolment::new(
            true,
            super::config::DEFAULT_ENROLMENT_RATE,
            super::config::DEFAULT_ENROLMENT_BURST,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_allows_a_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(20, 3, t0);
        for _ in 0..3 {
            b.take(t0).expect("the burst");
        }
        let wait = b.take(t0).expect_err("empty");
        assert_eq!(wait, Duration::from_secs(3), "20 a minute: one every 3 s");
        assert!(b.take(t0 + Duration::from_millis(2900)).is_err());
        b.take(t0 + Duration::from_secs(3)).expect("refilled");
        assert!(b.take(t0 + Duration::from_secs(3)).is_err());
        // A long quiet spell refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            b.take(later).expect("full again");
        }
        assert!(b.take(later).is_err());
    }

    #[test]
    fn enrolment_says_when_to_come_back() {
        let e = Enrolment::new(true, 1, 1);
        assert!(e.enabled());
        e.admit().expect("the first");
        let secs = e.admit().expect_err("the second, within the minute");
        assert!((59..=60).contains(&secs), "{secs}");
    }
}
