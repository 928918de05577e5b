//! Callback delivery from the durable outbox.
//!
//! Invariants:
//! - At least once: a callback leaves the outbox only in the transaction that also removes
//!   its job, after a 200 answer to the POST itself (redirects are not followed: a 3xx is a
//!   failed attempt), or, for an expired job, after its grace period, recorded as
//!   undelivered. A crash at any point leaves the row to be claimed again.
//! - One bad destination costs only its own jobs. Limits are kept per destination (the
//!   notify_url's scheme, host and port, see [`Hosts`]): at most `per_host_concurrency`
//!   attempts in flight, at most `per_minute` starts in any 60-second window (a sliding
//!   window, not a bucket that could allow twice the rate across a boundary), and after a
//!   connection error, timeout, 5xx or 429 a backoff, then one probe at a time until it
//!   answers again. A destination with no room is left out of the claim, so its rows hold
//!   neither a lease nor a slot and never stand in front of other destinations' rows.
//! - At most `concurrency` attempts hold a delivery slot; an attempt still unanswered after
//!   `slow_after_ms` gives its slot back (up to `slow_max` such attempts), so endpoints that
//!   accept and never answer cannot hold every slot for the timeout.
//! - The failure report (codes other than 0) is written before the job's files are removed,
//!   since it lists them.
//! - Every delivered callback is timed once, from its queueing (`created_ms`, when its job
//!   was decided) to the 200, in `EngineCounters::callback_delivery_seconds`.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use serde::Serialize;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};

use super::{EngineCounters, EngineTimings, JobFacts, Wording, backoff, idle};
use crate::config::Config;
use crate::engine::wording::BuiltinWording;
use crate::store::{CallbackGate, OutboxRow, Store, StoreError, codes, now_ms};

/// The body of a callback (the original's `JobResult`).
#[derive(Debug, Serialize)]
struct JobResult<'a> {
    job_id: i64,
    return_code: i64,
    total_files: i64,
    ready_files: i64,
    error_files: i64,
    comment: &'a str,
}

/// Why an attempt did not deliver.
#[derive(Debug)]
struct Failure {
    why: String,
    /// The destination itself is in trouble (no connection, no answer in time, 5xx, 429),
    /// as opposed to an answer about this one request (3xx, other 4xx).
    host: bool,
}

/// What an attempt's end tells about its destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Delivered,
    /// An answer other than 200 that says nothing about the destination's health.
    Refused,
    HostFailed,
}

/// One destination's state.
#[derive(Debug, Default)]
struct HostState {
    in_flight: usize,
    /// Host failures since the last answer that was not one.
    failures: u32,
    /// No new attempt before this (backing off).
    until: Option<Instant>,
    /// Starts within the budget window, oldest first.
    starts: VecDeque<Instant>,
}

/// Per-destination concurrency, budget and backoff, in this daemon's memory: a restart
/// forgets them, which costs at most one more round of attempts.
pub(crate) struct Hosts {
    per_host: usize,
    per_window: usize,
    window: Duration,
    retry_min: Duration,
    retry_max: Duration,
    map: std::sync::Mutex<HashMap<String, HostState>>,
}

impl Hosts {
    pub(crate) fn new(
        per_host: usize,
        per_window: usize,
        window: Duration,
        retry_min: Duration,
        retry_max: Duration,
    ) -> Self {
        Self {
            per_host: per_host.max(1),
            per_window: per_window.max(1),
            window,
            retry_min,
            retry_max,
            map: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// What the claim may take now. Forgets destinations with nothing left to remember.
    pub(crate) fn gate(&self) -> CallbackGate {
        let now = Instant::now();
        let mut map = self.map.lock().expect("host state lock");
        let mut gate = CallbackGate {
            busy: Vec::new(),
            backing_off: Vec::new(),
            room: HashMap::new(),
            default_room: self.per_host.min(self.per_window),
        };
        map.retain(|origin, h| {
            while h
                .starts
                .front()
                .is_some_and(|t| now.duration_since(*t) >= self.window)
            {
                h.starts.pop_front();
            }
            if h.until.is_some_and(|u| u <= now) {
                h.until = None;
            }
            if h.until.is_some() {
                gate.backing_off.push(origin.clone());
                return true;
            }
            // A failing destination is probed one attempt at a time.
            let cap = if h.failures > 0 { 1 } else { self.per_host };
            let room = cap
                .saturating_sub(h.in_flight)
                .min(self.per_window.saturating_sub(h.starts.len()));
            if room == 0 {
                gate.busy.push(origin.clone());
            } else if room < gate.default_room {
                gate.room.insert(origin.clone(), room);
            }
            // A failing destination with nothing started for a window has no rows left
            // to probe with; forgetting it bounds the map by the destinations in use.
            h.in_flight > 0 || !h.starts.is_empty()
        });
        gate
    }

    /// An attempt to `origin` starts now.
    pub(crate) fn start(&self, origin: &str) {
        let mut map = self.map.lock().expect("host state lock");
        let h = map.entry(origin.to_string()).or_default();
        h.in_flight += 1;
        h.starts.push_back(Instant::now());
    }

    /// Starts an attempt that ends when the returned value drops, whatever way the
    /// delivery ends (an error recording it, a panic), so a destination's count of
    /// attempts in flight never leaks.
    fn attempt(self: &Arc<Self>, origin: &str, freed: &Arc<Notify>) -> Attempt {
        self.start(origin);
        Attempt {
            hosts: self.clone(),
            origin: origin.to_string(),
            seen: Outcome::Refused,
            freed: freed.clone(),
        }
    }

    /// An attempt to `origin` ended. Attempts in flight together that all fail count as
    /// one failure, so a burst of timeouts backs off one step, not several.
    fn finish(&self, origin: &str, outcome: Outcome) -> Option<Duration> {
        let now = Instant::now();
        let mut map = self.map.lock().expect("host state lock");
        let h = map.entry(origin.to_string()).or_default();
        h.in_flight = h.in_flight.saturating_sub(1);
        match outcome {
            Outcome::Delivered => {
                h.failures = 0;
                h.until = None;
                None
            }
            Outcome::Refused => None,
            Outcome::HostFailed if h.until.is_some_and(|u| u > now) => None,
            Outcome::HostFailed => {
                let wait = backoff(h.failures as i64, self.retry_min, self.retry_max);
                h.failures = h.failures.saturating_add(1);
                h.until = Some(now + wait);
                Some(wait)
            }
        }
    }
}

/// An attempt in flight to a destination; see [`Hosts::attempt`].
struct Attempt {
    hosts: Arc<Hosts>,
    origin: String,
    /// What the attempt told about the destination; neutral until it ends.
    seen: Outcome,
    /// Wakes the claim: the destination has room again.
    freed: Arc<Notify>,
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if let Some(wait) = self.hosts.finish(&self.origin, self.seen) {
            tracing::warn!(origin = %self.origin, backoff = ?wait, "callback destination failing; backing off");
        }
        self.freed.notify_one();
    }
}

pub(crate) struct Notifier {
    store: Store,
    owner: String,
    http: reqwest::Client,
    username: String,
    password: Option<String>,
    /// `callbacks.allow`, checked again before each attempt.
    allow: crate::allow_list::AllowList,
    /// `callbacks.credentials`: (hosts, username, password), the first match wins.
    credentials: Vec<(crate::allow_list::AllowList, String, Option<String>)>,
    hosts: Arc<Hosts>,
    slots: Arc<Semaphore>,
    slow: Arc<Semaphore>,
    slow_after: Duration,
    slot_freed: Arc<Notify>,
    retry_min: Duration,
    retry_max: Duration,
    reports_dir: PathBuf,
    wording: Arc<dyn Wording>,
    timings: EngineTimings,
    counters: Arc<EngineCounters>,
    expiry_secs: u64,
}

impl Notifier {
    /// A notifier for `config`'s `[callbacks]`, with the job expiry and the report
    /// directory its callbacks refer to.
    pub(crate) fn new(
        store: Store,
        config: &Config,
        wording: Arc<dyn Wording>,
        timings: EngineTimings,
        counters: Arc<EngineCounters>,
    ) -> Self {
        let cfg = &config.callbacks;
        let owner = store.owner().to_string();
        let expiry_secs = config.jobs.expiry_secs;
        let reports_dir = config.reports.dir.clone();
        // Only a 200 to the POST itself is a delivery: following a redirect would turn it
        // into a bodiless GET to wherever the answer points.
        // Checked at config load; a CA file gone since then leaves the system's roots only,
        // which refuses a private CA's destinations rather than trusting anyone.
        let trust = crate::tls_trust::Trust::from_config(
            "callbacks",
            cfg.ca_file.as_deref(),
            cfg.insecure_skip_tls_verify,
        )
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "callbacks: checking destinations with the system's roots only");
            crate::tls_trust::Trust::from_config("callbacks", None, false)
                .expect("no file, nothing to fail")
        });
        let http = trust
            .apply(reqwest::Client::builder())
            .timeout(Duration::from_secs(cfg.timeout_secs))
            .connect_timeout(Duration::from_secs(cfg.timeout_secs.min(10)))
            .redirect(reqwest::redirect::Policy::none())
            // Names are resolved once per connection and only checked addresses used.
            .dns_resolver(std::sync::Arc::new(crate::net_guard::GuardedResolver))
            .build()
            .expect("building the callback HTTP client");
        let retry_min = Duration::from_secs(cfg.retry_min_secs);
        let retry_max = Duration::from_secs(cfg.retry_max_secs);
        Self {
            store,
            owner,
            http,
            username: cfg.username.clone(),
            password: cfg.password.as_ref().map(|p| p.expose().to_string()),
            allow: cfg.allow.clone(),
            credentials: cfg
                .credentials
                .iter()
                .map(|c| {
                    (
                        c.hosts.clone(),
                        c.username.clone(),
                        c.password.as_ref().map(|p| p.expose().to_string()),
                    )
                })
                .collect(),
            hosts: Arc::new(Hosts::new(
                cfg.per_host_concurrency,
                cfg.per_minute as usize,
                Duration::from_secs(60),
                retry_min,
                retry_max,
            )),
            slots: Arc::new(Semaphore::new(cfg.concurrency)),
            slow: Arc::new(Semaphore::new(cfg.slow_max)),
            slow_after: Duration::from_millis(cfg.slow_after_ms),
            slot_freed: Arc::new(Notify::new()),
            retry_min,
            retry_max,
            reports_dir,
            wording,
            timings,
            counters,
            expiry_secs,
        }
    }

    pub(crate) async fn run(self, mut stopped: watch::Receiver<bool>) {
        let this = Arc::new(self);
        loop {
            // Claim until the slots are full or nothing more may go now: each claim leaves
            // out the destinations the last one filled.
            while this.slots.available_permits() > 0 {
                let gate = this.hosts.gate();
                let free = this.slots.available_permits();
                let rows = match this
                    .store
                    .claim_callbacks(
                        &this.owner,
                        this.timings.lease.as_millis() as i64,
                        free as i64,
                        &gate,
                    )
                    .await
                {
                    Ok(rows) => rows,
                    Err(e) => {
                        tracing::error!(error = %e, "claiming callbacks failed");
                        break;
                    }
                };
                if rows.is_empty() {
                    break;
                }
                for row in rows {
                    let Ok(permit) = this.slots.clone().acquire_owned().await else {
                        return;
                    };
                    // A destination backing off gets no attempt; what the claim gave of
                    // it is past its grace and is removed undelivered.
                    let attempt = (!gate.backing_off.contains(&row.origin))
                        .then(|| this.hosts.attempt(&row.origin, &this.slot_freed));
                    let me = this.clone();
                    tokio::spawn(async move {
                        if let Err(e) = me.deliver(&row, attempt, permit).await {
                            tracing::error!(job_id = row.job_id, error = %e, "recording a callback outcome failed; it will be retried");
                        }
                        me.slot_freed.notify_one();
                    });
                }
            }
            let signal = &this.store.signals().outbox;
            let proceed = tokio::select! {
                go = idle(signal, this.timings.poll, &mut stopped) => go,
                _ = this.slot_freed.notified() => true,
            };
            if !proceed {
                return;
            }
        }
    }

    /// Makes `attempt` and records the outcome; without one, removes an expired job whose
    /// destination is backing off. `permit` is the delivery slot.
    async fn deliver(
        &self,
        row: &OutboxRow,
        attempt: Option<Attempt>,
        mut permit: OwnedSemaphorePermit,
    ) -> Result<(), StoreError> {
        let job_id = row.job_id;
        let mut facts = JobFacts {
            job_id,
            return_code: row.return_code,
            total_files: row.total_files,
            ready_files: row.ready_files,
            error_files: row.error_files,
            expiry_secs: self.expiry_secs,
            error_paths: Vec::new(),
            missing_paths: Vec::new(),
        };
        // The adapter words both comment and report from the lists of bad files.
        if row.return_code != codes::SUCCESS {
            let (errors, missing) = self.store.report_lists(job_id).await?;
            facts.error_paths = errors;
            facts.missing_paths = missing;
        }
        let comment = if row.comment.is_empty() {
            match self.wording.callback_comment(&facts).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(job_id, error = %e, "adapter wording failed; using the built-in comment");
                    BuiltinWording::comment(&facts)
                }
            }
        } else {
            row.comment.clone()
        };

        let attempted = attempt.is_some();
        let outcome = if let Some(mut attempt) = attempt {
            let outcome = self.post_in_slot(row, &comment, &mut permit).await;
            attempt.seen = match &outcome {
                Ok(()) => Outcome::Delivered,
                Err(f) if f.host => Outcome::HostFailed,
                Err(_) => Outcome::Refused,
            };
            // The destination has room again from here, not after the bookkeeping.
            drop(attempt);
            outcome.map_err(|f| f.why)
        } else {
            Err("its destination is backing off".to_string())
        };
        let now = now_ms();
        let delivered = match outcome {
            Ok(()) => {
                self.counters
                    .callbacks_delivered
                    .fetch_add(1, Ordering::Relaxed);
                // Wall clocks: the row may have been queued by another daemon, whose clock
                // can be a little ahead of ours.
                let waited_ms = (now - row.created_ms).max(0);
                self.counters
                    .callback_delivery_seconds
                    .observe(waited_ms as f64 / 1000.0);
                tracing::info!(job_id, return_code = row.return_code, "callback delivered");
                true
            }
            Err(why) => {
                if attempted {
                    self.counters
                        .callbacks_failed_attempts
                        .fetch_add(1, Ordering::Relaxed);
                }
                match row.give_up_ms {
                    Some(give_up) if now >= give_up => {
                        self.counters
                            .callbacks_abandoned
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(job_id, %why, "callback for an expired job still failing after its grace period; removing the job");
                        false
                    }
                    _ => {
                        let wait = backoff(row.attempts, self.retry_min, self.retry_max);
                        tracing::warn!(job_id, %why, attempt = row.attempts + 1, retry_in = ?wait, "callback failed");
                        return self
                            .store
                            .callback_retry(
                                job_id,
                                &self.owner,
                                now + wait.as_millis() as i64,
                                &why,
                            )
                            .await;
                    }
                }
            }
        };

        if row.return_code != codes::SUCCESS {
            let text = match self.wording.failure_report(&facts).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(job_id, error = %e, "adapter report wording failed; using the built-in one");
                    BuiltinWording::report(&facts)
                }
            };
            let dir = self.reports_dir.clone();
            match tokio::task::spawn_blocking(move || crate::reports::write(&dir, job_id, &text))
                .await
            {
                Ok(Ok(path)) => {
                    tracing::info!(job_id, path = %path.display(), "failure report written")
                }
                Ok(Err(e)) => {
                    tracing::error!(job_id, error = %e, "writing the failure report failed")
                }
                Err(e) => {
                    tracing::error!(job_id, error = %e, "writing the failure report panicked")
                }
            }
        }
        if !self
            .store
            .finish_callback(row, &self.owner, delivered, &comment)
            .await?
        {
            tracing::warn!(job_id, "callback finished elsewhere (lease lost)");
        }
        Ok(())
    }

    /// Posts holding `permit`, one of the delivery slots. Once the attempt is slow, the
    /// slot goes back for others if there is room among the slow attempts: `permit` then
    /// holds one of those instead.
    async fn post_in_slot(
        &self,
        row: &OutboxRow,
        comment: &str,
        permit: &mut OwnedSemaphorePermit,
    ) -> Result<(), Failure> {
        let post = self.post(row, comment);
        tokio::pin!(post);
        tokio::select! {
            r = &mut post => return r,
            _ = tokio::time::sleep(self.slow_after) => {}
        }
        if let Ok(slow) = self.slow.clone().try_acquire_owned() {
            // The slot is released here, as the old permit drops.
            *permit = slow;
            self.slot_freed.notify_one();
        }
        post.await
    }

    async fn post(&self, row: &OutboxRow, comment: &str) -> Result<(), Failure> {
        let body = JobResult {
            job_id: row.job_id,
            return_code: row.return_code,
            total_files: row.total_files,
            ready_files: row.ready_files,
            error_files: row.error_files,
            comment,
        };
        // Intake refuses these; a row stored before the list changed may still hold one.
        let url = url::Url::parse(&row.notify_url).map_err(|e| e.to_string());
        let checked =
            url.and_then(|u| crate::net_guard::check_callback_url(&u, &self.allow).map(|()| u));
        let url = match checked {
            Ok(url) => url,
            Err(why) => {
                return Err(Failure {
                    why: format!("not sent: notify_url {why}"),
                    host: true,
                });
            }
        };
        let (username, password) = self
            .credentials
            .iter()
            .find(|(hosts, _, _)| hosts.allows(&url))
            .map(|(_, u, p)| (u.as_str(), p.as_deref()))
            .unwrap_or((self.username.as_str(), self.password.as_deref()));
        let resp = self
            .http
            .post(&row.notify_url)
            .basic_auth(username, password)
            .json(&body)
            .send()
            .await
            .map_err(|e| Failure {
                why: format!("request failed: {e}"),
                host: true,
            })?;
        let status = resp.status();
        if status == reqwest::StatusCode::OK {
            return Ok(());
        }
        let why = if status.is_redirection() {
            format!("answered {status} (redirects are not followed)")
        } else {
            format!("answered {status}")
        };
        Err(Failure {
            why,
            host: status.is_server_error()
                || status == reqwest::StatusCode::TOO_MANY_REQUESTS
                || status == reqwest::StatusCode::REQUEST_TIMEOUT,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "http://a:80";

    fn hosts(per_host: usize, per_window: usize) -> Hosts {
        Hosts::new(
            per_host,
            per_window,
            Duration::from_secs(60),
            Duration::from_secs(10),
            Duration::from_secs(600),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn budget_is_per_destination_and_slides() {
        let h = hosts(100, 3);
        for _ in 0..3 {
            h.start(A);
            h.finish(A, Outcome::Refused);
        }
        let gate = h.gate();
        assert_eq!(gate.busy, vec![A.to_string()], "the budget of a is spent");
        assert_eq!(gate.default_room, 3, "others keep theirs");
        tokio::time::advance(Duration::from_secs(60)).await;
        let gate = h.gate();
        assert!(gate.busy.is_empty() && gate.room.is_empty(), "{gate:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_is_per_destination() {
        let h = hosts(2, 100);
        h.start(A);
        assert_eq!(h.gate().room.get(A), Some(&1));
        h.start(A);
        assert_eq!(h.gate().busy, vec![A.to_string()]);
        h.finish(A, Outcome::Delivered);
        assert_eq!(h.gate().room.get(A), Some(&1));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_once_per_burst_then_probe_one_at_a_time() {
        let h = hosts(4, 100);
        for _ in 0..4 {
            h.start(A);
        }
        let first = h.finish(A, Outcome::HostFailed).expect("backs off");
        assert!(first >= Duration::from_secs(8) && first <= Duration::from_secs(12));
        for _ in 0..3 {
            assert_eq!(h.finish(A, Outcome::HostFailed), None, "same burst");
        }
        assert_eq!(h.gate().backing_off, vec![A.to_string()]);
        tokio::time::advance(Duration::from_secs(13)).await;
        let gate = h.gate();
        assert!(gate.backing_off.is_empty());
        assert_eq!(gate.room.get(A), Some(&1), "one probe");
        h.start(A);
        let second = h.finish(A, Outcome::HostFailed).expect("backs off again");
        assert!(second >= Duration::from_secs(16), "doubled: {second:?}");
        tokio::time::advance(Duration::from_secs(30)).await;
        h.start(A);
        h.finish(A, Outcome::Delivered);
        let gate = h.gate();
        assert!(
            gate.room.is_empty() && gate.busy.is_empty(),
            "healthy again: {gate:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_destinations_are_forgotten() {
        let h = hosts(4, 100);
        h.start(A);
        h.finish(A, Outcome::Delivered);
        tokio::time::advance(Duration::from_secs(61)).await;
        h.gate();
        assert!(h.map.lock().unwrap().is_empty());
    }
}
