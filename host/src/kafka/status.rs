//! What the consumer has seen, shared with the API (`/get_stats/`) and metrics.
//!
//! Invariant: the figures come from the consumer itself (librdkafka's broker states, the
//! messages read, the batches applied), never from a constant; a stopped consumer is not
//! alive, and neither is one whose brokers stopped answering.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::store::now_ms;

/// Cheap to clone; all clones see the same consumer.
#[derive(Clone)]
pub struct IngestStatus {
    inner: Arc<Inner>,
}

struct Inner {
    running: AtomicBool,
    /// When a broker was last seen up or a message last arrived (Unix ms; 0 = never).
    heartbeat_ms: AtomicI64,
    /// When librdkafka last reported every broker down (Unix ms; 0 = not since the last up).
    all_down_ms: AtomicI64,
    /// When the last message about a file some job holds was applied (Unix ms; 0 = never).
    last_known_message_ms: AtomicI64,
    /// A heartbeat older than this means the broker is not answering.
    alive_window: Duration,
    messages: AtomicU64,
    batches: AtomicU64,
    handled: AtomicU64,
    events: AtomicU64,
    changed: AtomicU64,
    unknown: AtomicU64,
    malformed: AtomicU64,
    store_failures: AtomicU64,
    commit_failures: AtomicU64,
    consumer_errors: AtomicU64,
    mapping_errors: AtomicU64,
}

/// Counters since the consumer started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestCounters {
    /// Messages read from Kafka, redeliveries included.
    pub messages: u64,
    /// Batches applied (each in one transaction, then committed).
    pub batches: u64,
    /// Messages of those batches, whatever became of each (applied, unknown, malformed).
    pub handled: u64,
    /// Well-formed events handed to the store.
    pub events: u64,
    /// Job files whose state the events changed.
    pub changed: u64,
    /// Messages about files no job holds.
    pub unknown: u64,
    pub malformed: u64,
    /// Failed attempts to apply a batch (each retried).
    pub store_failures: u64,
    pub commit_failures: u64,
    pub consumer_errors: u64,
    pub mapping_errors: u64,
}

impl IngestStatus {
    pub(crate) fn new(alive_window: Duration) -> Self {
        IngestStatus {
            inner: Arc::new(Inner {
                running: AtomicBool::new(false),
                heartbeat_ms: AtomicI64::new(0),
                all_down_ms: AtomicI64::new(0),
                last_known_message_ms: AtomicI64::new(0),
                alive_window,
                messages: AtomicU64::new(0),
                batches: AtomicU64::new(0),
                handled: AtomicU64::new(0),
                events: AtomicU64::new(0),
                changed: AtomicU64::new(0),
                unknown: AtomicU64::new(0),
                malformed: AtomicU64::new(0),
                store_failures: AtomicU64::new(0),
                commit_failures: AtomicU64::new(0),
                consumer_errors: AtomicU64::new(0),
                mapping_errors: AtomicU64::new(0),
            }),
        }
    }

    /// The consumer runs and a broker answered within the window.
    pub fn alive(&self) -> bool {
        let i = &self.inner;
        let hb = i.heartbeat_ms.load(Ordering::Relaxed);
        i.running.load(Ordering::Relaxed)
            && hb > 0
            && i.all_down_ms.load(Ordering::Relaxed) == 0
            && now_ms() - hb <= i.alive_window.as_millis() as i64
    }

    /// Unix ms when the Kafka connection last answered.
    pub fn heartbeat_ms(&self) -> Option<i64> {
        Some(self.inner.heartbeat_ms.load(Ordering::Relaxed)).filter(|&t| t > 0)
    }

    /// Unix ms when the last message about a file some job holds was applied.
    pub fn last_message_ms(&self) -> Option<i64> {
        Some(self.inner.last_known_message_ms.load(Ordering::Relaxed)).filter(|&t| t > 0)
    }

    pub fn counters(&self) -> IngestCounters {
        let i = &self.inner;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        IngestCounters {
            messages: l(&i.messages),
            batches: l(&i.batches),
            handled: l(&i.handled),
            events: l(&i.events),
            changed: l(&i.changed),
            unknown: l(&i.unknown),
            malformed: l(&i.malformed),
            store_failures: l(&i.store_failures),
            commit_failures: l(&i.commit_failures),
            consumer_errors: l(&i.consumer_errors),
            mapping_errors: l(&i.mapping_errors),
        }
    }

    pub(crate) fn set_running(&self, running: bool) {
        self.inner.running.store(running, Ordering::Relaxed);
    }

    pub(crate) fn heartbeat(&self) {
        self.inner.heartbeat_ms.store(now_ms(), Ordering::Relaxed);
        self.inner.all_down_ms.store(0, Ordering::Relaxed);
    }

    pub(crate) fn all_brokers_down(&self) {
        self.inner.all_down_ms.store(now_ms(), Ordering::Relaxed);
    }

    pub(crate) fn message_received(&self) {
        self.inner.messages.fetch_add(1, Ordering::Relaxed);
        self.heartbeat();
    }

    pub(crate) fn batch_done(&self, messages: u64) {
        let i = &self.inner;
        i.batches.fetch_add(1, Ordering::Relaxed);
        i.handled.fetch_add(messages, Ordering::Relaxed);
    }

    pub(crate) fn batch_applied(&self, events: u64, changed: u64, unknown: u64, any_known: bool) {
        let i = &self.inner;
        i.events.fetch_add(events, Ordering::Relaxed);
        i.changed.fetch_add(changed, Ordering::Relaxed);
        i.unknown.fetch_add(unknown, Ordering::Relaxed);
        if any_known {
            i.last_known_message_ms.store(now_ms(), Ordering::Relaxed);
        }
    }

    pub(crate) fn count_malformed(&self) {
        self.inner.malformed.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_store_failure(&self) {
        self.inner.store_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_commit_failure(&self) {
        self.inner.commit_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_consumer_error(&self) {
        self.inner.consumer_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_mapping_error(&self) {
        self.inner.mapping_errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// Lets one log line through per period and tells it how many were held back.
pub(crate) struct RateLimited {
    period: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl RateLimited {
    pub fn new(period: Duration) -> Self {
        Self {
            period,
            last: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Calls `emit` with the number of lines suppressed since the last one, or counts it.
    pub fn log(&self, emit: impl FnOnce(u64)) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < self.period) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(Instant::now());
        drop(last);
        emit(self.suppressed.swap(0, Ordering::Relaxed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limited_log_counts_what_it_holds_back() {
        let r = RateLimited::new(Duration::from_secs(3600));
        let mut seen = Vec::new();
        for _ in 0..5 {
            r.log(|s| seen.push(s));
        }
        assert_eq!(seen, vec![0]);
        assert_eq!(r.suppressed.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn alive_needs_running_and_a_fresh_heartbeat() {
        let s = IngestStatus::new(Duration::from_secs(60));
        assert!(!s.alive());
        s.set_running(true);
        assert!(!s.alive(), "no heartbeat yet");
        s.heartbeat();
        assert!(s.alive());
        s.all_brokers_down();
        assert!(!s.alive());
        s.heartbeat();
        s.set_running(false);
        assert!(!s.alive());
    }
}
