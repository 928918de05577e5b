//! Per-token submission rates: a token bucket per token name.
//!
//! Invariant: a token with a [`Rate`] is admitted at most `burst` submissions at once and
//! `per_second` on average; a refusal says when the next one would be admitted. Buckets are
//! keyed by token name, of which there are as many as the config lists, so the map is
//! bounded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::auth::Rate;

#[derive(Debug, Default, Clone)]
pub struct SubmitLimiter {
    buckets: Arc<Mutex<HashMap<Arc<str>, Bucket>>>,
}

#[derive(Debug)]
struct Bucket {
    rate: Rate,
    tokens: f64,
    at: Instant,
}

impl SubmitLimiter {
    /// Takes one submission from `name`'s bucket, or says how long until one is free.
    pub fn admit(&self, name: &Arc<str>, rate: Rate) -> Result<(), Duration> {
        self.admit_at(name, rate, Instant::now())
    }

    fn admit_at(&self, name: &Arc<str>, rate: Rate, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let burst = f64::from(rate.burst);
        let b = buckets.entry(name.clone()).or_insert(Bucket {
            rate,
            tokens: burst,
            at: now,
        });
        if b.rate != rate {
            // The config was reloaded with another rate: start the token afresh on it.
            *b = Bucket {
                rate,
                tokens: burst,
                at: now,
            };
        }
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate.per_second).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / rate.per_second))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_the_burst_then_the_rate() {
        let l = SubmitLimiter::default();
        let name: Arc<str> = Arc::from("asvo");
        let other: Arc<str> = Arc::from("other");
        let rate = Rate {
            per_second: 2.0,
            burst: 3,
        };
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.admit_at(&name, rate, t0).is_ok());
        }
        let wait = l.admit_at(&name, rate, t0).unwrap_err();
        assert!(
            wait > Duration::from_millis(450) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        // Another token's bucket is its own.
        assert!(l.admit_at(&other, rate, t0).is_ok());
        // Half a second later one more is due, and only one.
        let t1 = t0 + Duration::from_millis(500);
        assert!(l.admit_at(&name, rate, t1).is_ok());
        assert!(l.admit_at(&name, rate, t1).is_err());
        // Idle for long, the bucket holds no more than the burst.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(l.admit_at(&name, rate, t2).is_ok());
        }
        assert!(l.admit_at(&name, rate, t2).is_err());
    }
}
