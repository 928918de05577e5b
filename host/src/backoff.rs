//! The one retry policy: exponential back-off with jitter, capped.
//!
//! Invariant: a delay never exceeds `max`, and attempt numbers of any size neither overflow
//! nor panic. Every retry loop in the daemon (stage calls, adapter lookups, callbacks, the
//! Kafka consumer, Scout node rounds) draws its waits from a [`Backoff`].

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The step of attempt 0; it doubles with each attempt.
    pub min: Duration,
    /// No delay is longer.
    pub max: Duration,
    pub jitter: Jitter,
}

/// How a step is spread, so that many clients retrying together drift apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// 80–120 % of the step: spreads many jobs' retries without shortening any by much.
    Around,
    /// 50–100 % of the step ("equal jitter"): never waits longer than the step.
    LowerHalf,
}

impl Backoff {
    pub const fn new(min: Duration, max: Duration, jitter: Jitter) -> Backoff {
        Backoff { min, max, jitter }
    }

    /// The wait before retry number `attempt` (0 for the first retry).
    pub fn delay(&self, attempt: u32) -> Duration {
        let step = self
            .min
            .saturating_mul(2u32.saturating_pow(attempt.min(31)))
            .min(self.max);
        let (low, high) = match self.jitter {
            Jitter::Around => (0.8, 1.2),
            Jitter::LowerHalf => (0.5, 1.0),
        };
        // `mul_f64` panics when the product leaves Duration's range (a step near
        // `Duration::MAX` times 1.2), so the product is checked and capped instead.
        let factor: f64 = rand::random_range(low..=high);
        Duration::try_from_secs_f64(step.as_secs_f64() * factor)
            .unwrap_or(self.max)
            .min(self.max)
    }
}

/// An attempt count kept as a signed column, for [`Backoff::delay`].
pub fn attempt(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn grows_doubling_within_its_jitter() {
        let b = Backoff::new(100 * MS, Duration::from_secs(60), Jitter::LowerHalf);
        for _ in 0..200 {
            let d0 = b.delay(0);
            assert!(d0 >= 50 * MS && d0 <= 100 * MS, "{d0:?}");
            let d3 = b.delay(3);
            assert!(d3 >= 400 * MS && d3 <= 800 * MS, "{d3:?}");
        }
        let a = Backoff::new(100 * MS, Duration::from_secs(60), Jitter::Around);
        for _ in 0..200 {
            let d2 = a.delay(2);
            assert!(d2 >= 320 * MS && d2 <= 480 * MS, "{d2:?}");
        }
    }

    #[test]
    fn is_capped_and_never_overflows() {
        for jitter in [Jitter::Around, Jitter::LowerHalf] {
            let b = Backoff::new(Duration::from_secs(10), Duration::from_secs(600), jitter);
            for attempt in [6, 7, 20, 31, 32, 1000, u32::MAX] {
                let d = b.delay(attempt);
                assert!(d <= Duration::from_secs(600), "{attempt}: {d:?}");
                assert!(d >= Duration::from_secs(300), "{attempt}: {d:?}");
            }
            // Jitter is random, so one call may miss the factor above 1.0 that overflows.
            let huge = Backoff::new(Duration::MAX, Duration::MAX, jitter);
            for attempt in [0, 1, u32::MAX].into_iter().cycle().take(300) {
                assert!(huge.delay(attempt) <= Duration::MAX);
            }
        }
    }

    #[test]
    fn zero_steps_stay_zero() {
        let b = Backoff::new(Duration::ZERO, Duration::from_secs(1), Jitter::Around);
        assert_eq!(b.delay(5), Duration::ZERO);
    }

    #[test]
    fn signed_attempts_clamp() {
        assert_eq!(attempt(-3), 0);
        assert_eq!(attempt(7), 7);
        assert_eq!(attempt(i64::MAX), u32::MAX);
    }
}
