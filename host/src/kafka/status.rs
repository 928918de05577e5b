//! What the consumer has seen, shared with the API (`/get_stats/`) and metrics.
//!
//! Invariant: the figures come from the consumer itself (librdkafka's broker states, group
//! state and partition offsets, the messages read, the batches applied), never from a
//! constant. Alive means: running, a broker answering, a settled member of its group (its
//! partitions assigned), and not stalled. Stalled means: messages wait on the partitions
//! this member holds (the broker's high watermark is ahead of the committed offset) and no
//! batch has been committed for the stall window, or the member has not settled in its
//! group for that long. A stall is logged when it starts and when it ends.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::store::now_ms;

/// A member that has not settled in its group for this long while a broker answers is
/// re-created (a join normally takes a few seconds).
pub(crate) const REJOIN_AFTER: Duration = Duration::from_secs(8);
/// A daemon's consumer that has never settled in its group is given this long before it is
/// re-created: its first join waits out the group's initial rebalance delay (3 s by
/// default) and, in a group of several daemons, their rebalance. On a loaded 2-core
/// machine the mock broker's first joins took up to 8-9 s, and re-creating the client then
/// started the join over (and, with static membership, made the group wait for the old
/// member), so that nothing was read for 19 s and more. Once settled, a member out of its
/// group is re-created after [`REJOIN_AFTER`] as before.
pub(crate) const FIRST_JOIN_GRACE: Duration = Duration::from_secs(30);
/// The longest wait between two re-creations.
pub(crate) const REJOIN_MAX: Duration = Duration::from_secs(120);

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
    /// When a broker last answered again after every broker was down (Unix ms; 0 = never).
    answering_since_ms: AtomicI64,
    /// When the last message about a file some job holds was applied (Unix ms; 0 = never).
    last_known_message_ms: AtomicI64,
    /// A heartbeat older than this means the broker is not answering.
    alive_window: Duration,
    /// No progress for this long while there is lag, or no settled group membership for
    /// this long, is a stall.
    stall_after: Duration,
    /// A lag of this many messages (a batch) means the consumer is behind.
    behind_lag: i64,
    /// Partitions this member holds (-1: not known yet).
    assigned: AtomicI64,
    /// Messages waiting on those partitions past the committed offsets (-1: not known).
    lag: AtomicI64,
    /// A settled member of the group (joined, partitions assigned).
    in_group: AtomicBool,
    /// Since when the member has not been settled in its group (Unix ms; 0 = settled).
    unsettled_ms: AtomicI64,
    /// Whether the consumer has been settled in its group at least once.
    client_settled: AtomicBool,
    /// When the consumer last made progress: a batch committed, or nothing to read (Unix ms).
    progress_ms: AtomicI64,
    /// Messages read and not yet committed (the batch being filled and the one applied).
    in_hand: AtomicI64,
    /// Batches done at the last observation, to see progress between two.
    batches_seen: AtomicU64,
    /// Re-creations since the member was last settled.
    rejoins: AtomicI64,
    /// When the consumer was last re-created for want of a group (Unix ms; 0 = never).
    rejoined_ms: AtomicI64,
    /// Since when the consumer is stalled (Unix ms; 0 = not stalled).
    stalled_ms: AtomicI64,
    stalls: AtomicU64,
    stale: AtomicU64,
    messages: AtomicU64,
    batches: AtomicU64,
    handled: AtomicU64,
    events: AtomicU64,
    changed: AtomicU64,
    unknown: AtomicU64,
    malformed: AtomicU64,
    store_failures: AtomicU64,
    commits: AtomicU64,
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
    /// Offset commits the broker confirmed.
    pub commits: u64,
    /// Offset commits that failed: refused when asked, or by the broker (a redelivery of
    /// those messages follows, which changes nothing).
    pub commit_failures: u64,
    pub consumer_errors: u64,
    pub mapping_errors: u64,
    /// Events that completed before the job waiting for the file asked for it (a replayed
    /// topic, or clocks further apart than `kafka.clock_skew_secs`): not taken as its recall.
    pub stale: u64,
    /// Stalls seen (see the module documentation).
    pub stalls: u64,
}

/// Where the consumer stands in its group, as of librdkafka's last statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupState {
    /// A settled member of its group.
    pub in_group: bool,
    /// Partitions assigned to it (None: not known yet).
    pub assigned: Option<i64>,
    /// Messages waiting on them past the committed offsets (None: not known).
    pub lag: Option<i64>,
    /// Unix ms since when the consumer is stalled.
    pub stalled_since_ms: Option<i64>,
}

impl IngestStatus {
    pub(crate) fn new(alive_window: Duration, stall_after: Duration, behind_lag: i64) -> Self {
        IngestStatus {
            inner: Arc::new(Inner {
                running: AtomicBool::new(false),
                heartbeat_ms: AtomicI64::new(0),
                all_down_ms: AtomicI64::new(0),
                answering_since_ms: AtomicI64::new(0),
                last_known_message_ms: AtomicI64::new(0),
                alive_window,
                stall_after,
                behind_lag: behind_lag.max(1),
                assigned: AtomicI64::new(-1),
                lag: AtomicI64::new(-1),
                in_group: AtomicBool::new(false),
                unsettled_ms: AtomicI64::new(now_ms()),
                client_settled: AtomicBool::new(false),
                progress_ms: AtomicI64::new(now_ms()),
                in_hand: AtomicI64::new(0),
                batches_seen: AtomicU64::new(0),
                rejoins: AtomicI64::new(0),
                rejoined_ms: AtomicI64::new(0),
                stalled_ms: AtomicI64::new(0),
                stalls: AtomicU64::new(0),
                stale: AtomicU64::new(0),
                messages: AtomicU64::new(0),
                batches: AtomicU64::new(0),
                handled: AtomicU64::new(0),
                events: AtomicU64::new(0),
                changed: AtomicU64::new(0),
                unknown: AtomicU64::new(0),
                malformed: AtomicU64::new(0),
                store_failures: AtomicU64::new(0),
                commits: AtomicU64::new(0),
                commit_failures: AtomicU64::new(0),
                consumer_errors: AtomicU64::new(0),
                mapping_errors: AtomicU64::new(0),
            }),
        }
    }

    /// The consumer runs, a broker answered within the window, the member is settled in
    /// its group, and it is not stalled.
    pub fn alive(&self) -> bool {
        let i = &self.inner;
        let hb = i.heartbeat_ms.load(Ordering::Relaxed);
        i.running.load(Ordering::Relaxed)
            && hb > 0
            && i.all_down_ms.load(Ordering::Relaxed) == 0
            && now_ms() - hb <= i.alive_window.as_millis() as i64
            && i.in_group.load(Ordering::Relaxed)
            && i.stalled_ms.load(Ordering::Relaxed) == 0
    }

    /// Group membership, assignment, lag and stall, as last observed.
    pub fn group(&self) -> GroupState {
        let i = &self.inner;
        let known = |a: &AtomicI64| Some(a.load(Ordering::Relaxed)).filter(|&v| v >= 0);
        GroupState {
            in_group: i.in_group.load(Ordering::Relaxed),
            assigned: known(&i.assigned),
            lag: known(&i.lag),
            stalled_since_ms: Some(i.stalled_ms.load(Ordering::Relaxed)).filter(|&t| t > 0),
        }
    }

    /// Messages are known to wait for this consumer (more than a batch of them, or a
    /// stall): their files' jobs will hear of them without asking the tape system again.
    /// A consumer keeping up has less than a batch in hand at any time.
    pub fn behind(&self) -> bool {
        let g = self.group();
        g.lag.is_some_and(|l| l >= self.inner.behind_lag) || g.stalled_since_ms.is_some()
    }

    /// Whether to re-create the client so that it joins its group again: the member was
    /// last seen out of its group, and has not settled for [`REJOIN_AFTER`] (its statistics
    /// may have stopped meanwhile: a stuck client is re-created all the same), doubled after each
    /// re-creation that did not settle it (up to [`REJOIN_MAX`], so that a slow rebalance
    /// is never cut short for ever); a consumer that has never settled gets at least
    /// [`FIRST_JOIN_GRACE`], and no time counts before the brokers answer again after an
    /// outage. After every broker was gone for longer than the session,
    /// librdkafka stayed out of its group for 25 s and more; a new client joins in a few
    /// seconds. Marks the re-creation when it answers true.
    pub(crate) fn rejoin_due(&self) -> bool {
        let i = &self.inner;
        let now = now_ms();
        let unsettled = i.unsettled_ms.load(Ordering::Relaxed);
        if i.in_group.load(Ordering::Relaxed) || unsettled == 0 {
            return false;
        }
        let tries = i.rejoins.load(Ordering::Relaxed).min(8);
        let mut wait = REJOIN_AFTER.as_millis() as i64 * (1 << tries);
        if !i.client_settled.load(Ordering::Relaxed) {
            wait = wait.max(FIRST_JOIN_GRACE.as_millis() as i64);
        }
        let wait = wait.min(REJOIN_MAX.as_millis() as i64);
        // Counted from when the brokers answer again: librdkafka rejoins by itself within
        // seconds of most outages, and a client re-created the moment they are back (the
        // member having been out of its group all through the outage) joined later than
        // the old one would have.
        let since = unsettled
            .max(i.rejoined_ms.load(Ordering::Relaxed))
            .max(i.answering_since_ms.load(Ordering::Relaxed));
        let due = now - since > wait;
        if due {
            i.rejoined_ms.store(now, Ordering::Relaxed);
            i.rejoins.fetch_add(1, Ordering::Relaxed);
        }
        due
    }

    pub(crate) fn set_in_hand(&self, messages: usize) {
        self.inner.in_hand.store(messages as i64, Ordering::Relaxed);
    }

    /// Takes in one observation of the group (from librdkafka's statistics): whether the
    /// member is settled, its partitions, and the messages on them not read yet (`unread`;
    /// the messages read and not committed are added here). Decides, and logs, stalls.
    pub(crate) fn observe(&self, in_group: bool, assigned: Option<i64>, unread: Option<i64>) {
        let i = &self.inner;
        let now = now_ms();
        let lag = unread.map(|u| u + i.in_hand.load(Ordering::Relaxed));
        i.in_group.store(in_group, Ordering::Relaxed);
        i.assigned.store(assigned.unwrap_or(-1), Ordering::Relaxed);
        i.lag.store(lag.unwrap_or(-1), Ordering::Relaxed);
        if in_group {
            i.client_settled.store(true, Ordering::Relaxed);
            i.rejoins.store(0, Ordering::Relaxed);
            i.rejoined_ms.store(0, Ordering::Relaxed);
            let since = i.unsettled_ms.swap(0, Ordering::Relaxed);
            if since > 0 {
                tracing::info!(
                    after_ms = now - since,
                    assigned = assigned.unwrap_or(-1),
                    "Kafka consumer settled in its group"
                );
            }
        } else {
            let _ = i
                .unsettled_ms
                .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        }
        let batches = i.batches.load(Ordering::Relaxed);
        let advanced = i.batches_seen.swap(batches, Ordering::Relaxed) != batches;
        if advanced || lag.is_none_or(|l| l <= 0) {
            i.progress_ms.store(now, Ordering::Relaxed);
        }
        let window = i.stall_after.as_millis() as i64;
        let unsettled = i.unsettled_ms.load(Ordering::Relaxed);
        let why = if unsettled > 0 && now - unsettled > window {
            Some("no partitions assigned: the member has not settled in its group")
        } else if now - i.progress_ms.load(Ordering::Relaxed) > window {
            Some("messages wait on the assigned partitions and none was committed")
        } else {
            None
        };
        let was = i.stalled_ms.load(Ordering::Relaxed);
        match (why, was) {
            (Some(why), 0) => {
                i.stalled_ms.store(now, Ordering::Relaxed);
                i.stalls.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    reason = why,
                    lag = lag.unwrap_or(-1),
                    assigned = assigned.unwrap_or(-1),
                    window_secs = i.stall_after.as_secs(),
                    "Kafka consumer stalled"
                );
            }
            (None, since) if since > 0 => {
                i.stalled_ms.store(0, Ordering::Relaxed);
                tracing::info!(
                    stalled_ms = now - since,
                    lag = lag.unwrap_or(-1),
                    assigned = assigned.unwrap_or(-1),
                    "Kafka consumer resumed"
                );
            }
            _ => {}
        }
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
            commits: l(&i.commits),
            commit_failures: l(&i.commit_failures),
            consumer_errors: l(&i.consumer_errors),
            mapping_errors: l(&i.mapping_errors),
            stale: l(&i.stale),
            stalls: l(&i.stalls),
        }
    }

    pub(crate) fn set_running(&self, running: bool) {
        self.inner.running.store(running, Ordering::Relaxed);
    }

    pub(crate) fn heartbeat(&self) {
        let now = now_ms();
        self.inner.heartbeat_ms.store(now, Ordering::Relaxed);
        if self.inner.all_down_ms.swap(0, Ordering::Relaxed) != 0 {
            self.inner.answering_since_ms.store(now, Ordering::Relaxed);
        }
    }

    /// Keeps the start of the outage: librdkafka repeats the report while it lasts.
    pub(crate) fn all_brokers_down(&self) {
        let _ = self.inner.all_down_ms.compare_exchange(
            0,
            now_ms(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
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

    pub(crate) fn count_stale(&self, events: u64) {
        self.inner.stale.fetch_add(events, Ordering::Relaxed);
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

    pub(crate) fn count_commit(&self) {
        self.inner.commits.fetch_add(1, Ordering::Relaxed);
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

    /// Sets when the member was first seen out of its group, `ago` before now.
    fn unsettled_for(s: &IngestStatus, ago: Duration) {
        s.inner
            .unsettled_ms
            .store(now_ms() - ago.as_millis() as i64, Ordering::Relaxed);
    }

    #[test]
    fn a_first_join_is_given_longer_than_a_rejoin() {
        let s = IngestStatus::new(Duration::from_secs(60), Duration::from_secs(600), 10);
        s.heartbeat();
        s.observe(false, None, None);
        unsettled_for(&s, REJOIN_AFTER + Duration::from_secs(2));
        assert!(
            !s.rejoin_due(),
            "a new daemon's consumer still joining is left to join"
        );
        unsettled_for(&s, FIRST_JOIN_GRACE + Duration::from_secs(1));
        assert!(s.rejoin_due(), "one that never joins is re-created");

        // Settled, then out of the group (every broker gone for longer than the session).
        s.observe(true, Some(2), Some(0));
        s.observe(false, None, None);
        unsettled_for(&s, REJOIN_AFTER - Duration::from_secs(1));
        assert!(!s.rejoin_due());
        unsettled_for(&s, REJOIN_AFTER + Duration::from_secs(1));
        assert!(
            s.rejoin_due(),
            "a member that lost its group is re-created within seconds"
        );
        // The re-created client did not settle either: the next try waits twice as long.
        let ago = |d: Duration| now_ms() - d.as_millis() as i64;
        unsettled_for(&s, REJOIN_AFTER * 4);
        s.inner.rejoined_ms.store(
            ago(REJOIN_AFTER + Duration::from_secs(1)),
            Ordering::Relaxed,
        );
        assert!(!s.rejoin_due());
        s.inner.rejoined_ms.store(
            ago(REJOIN_AFTER * 2 + Duration::from_secs(1)),
            Ordering::Relaxed,
        );
        assert!(s.rejoin_due());
        s.observe(true, Some(2), Some(0));

        // Out of the group all through an outage: the wait starts when the brokers answer.
        s.observe(false, None, None);
        unsettled_for(&s, REJOIN_AFTER * 2);
        s.all_brokers_down();
        s.heartbeat();
        assert!(
            !s.rejoin_due(),
            "re-created the moment the brokers came back"
        );
        s.inner.answering_since_ms.store(
            ago(REJOIN_AFTER + Duration::from_secs(1)),
            Ordering::Relaxed,
        );
        assert!(
            s.rejoin_due(),
            "out of the group for long after the brokers came back"
        );
    }

    #[test]
    fn alive_needs_running_and_a_fresh_heartbeat() {
        let s = IngestStatus::new(Duration::from_secs(60), Duration::from_secs(60), 10);
        assert!(!s.alive());
        s.set_running(true);
        assert!(!s.alive(), "no heartbeat yet");
        s.heartbeat();
        assert!(!s.alive(), "not in the group yet");
        s.observe(true, Some(2), Some(0));
        assert!(s.alive());
        s.all_brokers_down();
        assert!(!s.alive());
        s.heartbeat();
        s.set_running(false);
        assert!(!s.alive());
    }

    #[test]
    fn lag_without_commits_is_a_stall_and_commits_end_it() {
        let s = IngestStatus::new(Duration::from_secs(60), Duration::ZERO, 100);
        s.set_running(true);
        s.heartbeat();
        s.observe(true, Some(2), Some(0));
        assert!(s.alive() && !s.behind());
        std::thread::sleep(Duration::from_millis(5));
        s.observe(true, Some(2), Some(7));
        assert!(!s.alive(), "lag and no batch committed");
        assert!(s.behind());
        assert_eq!(s.counters().stalls, 1);
        s.batch_done(7);
        s.observe(true, Some(2), Some(3));
        assert!(s.alive(), "a batch was committed since");
        s.set_in_hand(4);
        s.observe(true, Some(2), Some(0));
        assert_eq!(s.group().lag, Some(4), "read and not committed is lag too");
        assert!(s.alive(), "a batch was committed since");
        std::thread::sleep(Duration::from_millis(5));
        s.observe(false, None, None);
        assert!(!s.alive(), "left its group");
    }
}
