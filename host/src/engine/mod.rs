//! The job engine: takes each stored job from accepted to notified.
//!
//! ```text
//!  resolving --(adapter: observation -> paths)--> staging --(Scout accepts)--> waiting
//!      |                                              |                          |
//!      +-- lookup failed / no files (100/101) ---+    +-- refused (102) -------+  +-- every file ready
//!                                               v                           v  v   or failed (0/5),
//!                                                         done: callback queued       or expired (10)
//! ```
//!
//! Invariants:
//! - Every timer lives in the store (`next_stage_ms`, `expires_ms`, `next_attempt_ms`), never
//!   only in memory: a restarted daemon resumes exactly where the last one stopped.
//! - Work is claimed with leases (see `store::engine`), so several daemons sharing one
//!   PostgreSQL split the work, and a killed daemon's jobs are taken over when its lease
//!   lapses.
//! - A transient failure (Scout or the metadata service down) delays a job with backoff; only
//!   a refusal or a definite answer ends it early, always with a callback.
//! - Completion is event-driven: the ingest transaction that completes a job queues its
//!   callback and wakes the notifier. The periodic sweep only expires jobs and catches what a
//!   crashed daemon left behind.
//! - A restage (asking Scout again for files it accepted already) waits while the Kafka
//!   consumer is behind (more than a batch of messages queued, or stalled): the answers
//!   are likely queued already, and asking again for every waiting path would only add to
//!   the tape system's load. A first stage, or a retry after a failed one, never waits.
//!
//! The engine talks to its peers through the small traits below, so that tests and
//! `staged demo` can point it at simulators over real sockets.

mod notify;
pub mod peers;
pub mod wording;

use crate::backoff::{Backoff, Jitter};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{self, StreamExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, JobsConfig};
use crate::store::{JobState, StageWork, Store, StoreError, codes, now_ms};
pub use wording::{BuiltinWording, JobFacts, Wording};

/// Why staging a job's paths did not succeed.
#[derive(Debug, Clone)]
pub enum StageError {
    /// Worth retrying later (connection refused, timeout, 5xx, every node down).
    Transient(String),
    /// Scout said no (a 4xx other than 403): the job ends with code 102.
    Refused(String),
}

/// Asks the tape system to recall files (the Scout API).
pub trait Stager: Send + Sync {
    /// Requests recall of `paths` for `job_id`; `Ok` once Scout accepted all of them.
    fn stage<'a>(
        &'a self,
        job_id: i64,
        paths: &'a [String],
    ) -> BoxFuture<'a, Result<(), StageError>>;
    /// Best-effort cancel of recalls no job wants any more.
    fn cancel<'a>(&'a self, job_id: i64, paths: &'a [String]) -> BoxFuture<'a, Result<(), String>>;
}

/// Why an observation could not be turned into files.
#[derive(Debug, Clone)]
pub enum ResolveError {
    /// The lookup found no files: code 101.
    NotFound,
    /// The lookup failed definitively (bad request, bad answer): code 100.
    LookupFailed(String),
    /// The lookup could not be made now (service down): retried with backoff until expiry.
    Unavailable(String),
    /// The adapter itself failed (trap, timeout, bad output): code 199.
    Internal(String),
}

/// Turns an observation into paths (the telescope adapter).
pub trait Resolver: Send + Sync {
    fn resolve<'a>(
        &'a self,
        obs: &'a serde_json::Value,
    ) -> BoxFuture<'a, Result<Vec<String>, ResolveError>>;
}

/// Counters (and one histogram) for metrics; monotonic since start.
#[derive(Debug)]
pub struct EngineCounters {
    pub stage_calls_ok: AtomicU64,
    pub stage_calls_failed: AtomicU64,
    pub resolved: AtomicU64,
    pub callbacks_delivered: AtomicU64,
    pub callbacks_failed_attempts: AtomicU64,
    pub callbacks_abandoned: AtomicU64,
    pub expired: AtomicU64,
    /// Restages put off by an interval because the Kafka consumer was behind.
    pub restages_deferred: AtomicU64,
    /// Seconds from a callback being queued (its job decided) to its delivery, for each
    /// callback delivered: waits for a slot, for a destination and between retries count.
    pub callback_delivery_seconds: crate::histograms::Histogram,
}

impl Default for EngineCounters {
    fn default() -> Self {
        Self {
            stage_calls_ok: AtomicU64::default(),
            stage_calls_failed: AtomicU64::default(),
            resolved: AtomicU64::default(),
            callbacks_delivered: AtomicU64::default(),
            callbacks_failed_attempts: AtomicU64::default(),
            callbacks_abandoned: AtomicU64::default(),
            expired: AtomicU64::default(),
            restages_deferred: AtomicU64::default(),
            callback_delivery_seconds: crate::histograms::delivery_seconds(),
        }
    }
}

/// What the engine is built from.
pub struct EngineParts {
    pub stager: Option<Arc<dyn Stager>>,
    pub resolver: Option<Arc<dyn Resolver>>,
    pub wording: Arc<dyn Wording>,
    /// The Kafka consumer, when there is one: restages wait while it is behind.
    pub ingest: Option<crate::kafka::IngestStatus>,
}

/// The engine's timings, all from `[jobs]` (the notifier reads its own bounds from
/// `[callbacks]` in `notify`).
#[derive(Debug, Clone)]
pub struct EngineTimings {
    pub restage_interval: Duration,
    pub sweep_interval: Duration,
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub lease: Duration,
    pub history_keep: Duration,
    /// How often each loop looks for due work that no in-process signal announced
    /// (work left by another daemon or a crashed one, timers coming due;
    /// `jobs.poll_interval_ms`).
    pub poll: Duration,
}

impl EngineTimings {
    pub fn from_config(jobs: &JobsConfig) -> Self {
        Self {
            restage_interval: Duration::from_secs(jobs.restage_interval_secs),
            sweep_interval: Duration::from_secs(jobs.sweep_interval_secs),
            retry_min: Duration::from_secs(jobs.retry_min_secs),
            retry_max: Duration::from_secs(jobs.retry_max_secs),
            lease: Duration::from_secs(jobs.lease_secs),
            history_keep: Duration::from_secs(jobs.history_days * 86_400),
            poll: Duration::from_millis(jobs.poll_interval_ms),
        }
    }
}

/// The running engine.
pub struct Engine {
    pub counters: Arc<EngineCounters>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// The wait before a job's retry number `attempt`, between the `[jobs]` or `[callbacks]`
/// retry bounds.
pub(crate) fn backoff(attempt: i64, min: Duration, max: Duration) -> Duration {
    Backoff::new(min, max, Jitter::Around).delay(crate::backoff::attempt(attempt))
}

impl Engine {
    /// Starts the engine's loops on `store`.
    pub fn start(store: Store, config: &Config, parts: EngineParts) -> Engine {
        let timings = EngineTimings::from_config(&config.jobs);
        let counters = Arc::new(EngineCounters::default());
        let (stop, stopped) = watch::channel(false);
        if parts.stager.is_none() {
            tracing::warn!("no Scout nodes configured: jobs are stored but not staged");
        }
        let worker = StageWorker {
            store: store.clone(),
            parts: EngineParts {
                stager: parts.stager.clone(),
                resolver: parts.resolver.clone(),
                wording: parts.wording.clone(),
                ingest: parts.ingest.clone(),
            },
            timings: timings.clone(),
            error_delay: Duration::from_secs(config.callbacks.error_delay_secs),
            counters: counters.clone(),
        };
        let sweeper = Sweeper {
            store: store.clone(),
            timings: timings.clone(),
            expired_grace: Duration::from_secs(config.callbacks.expired_grace_secs),
            requests_keep: Duration::from_secs(config.tape_rest.keep_finished_secs),
            reports_dir: config.reports.dir.clone(),
            report_days: config.reports.expire_days,
            report_keep: config.reports.keep_newest,
            counters: counters.clone(),
        };
        let notifier =
            notify::Notifier::new(store, config, parts.wording, timings, counters.clone());
        let tasks = vec![
            tokio::spawn(worker.run(stopped.clone())),
            tokio::spawn(sweeper.run(stopped.clone())),
            tokio::spawn(notifier.run(stopped)),
        ];
        Engine {
            counters,
            stop,
            tasks,
        }
    }

    /// Stops the loops; work in progress is abandoned to its lease, so nothing is lost.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

/// Waits for `signal`, the poll interval, or stop; returns false when stopping.
async fn idle(
    signal: &tokio::sync::Notify,
    poll: Duration,
    stopped: &mut watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        _ = signal.notified() => {},
        _ = tokio::time::sleep(poll) => {},
        _ = stopped.changed() => {},
    }
    !*stopped.borrow()
}

/// Resolves observations and (re)stages waiting files.
struct StageWorker {
    store: Store,
    parts: EngineParts,
    timings: EngineTimings,
    error_delay: Duration,
    counters: Arc<EngineCounters>,
}

/// Jobs claimed at once. Their store updates are written together, so a burst of new jobs
/// costs a few statements per claim rather than a few per job.
const STAGE_CLAIM: i64 = 512;
/// How long the worker lets new work gather after it is woken. Tape recalls take minutes;
/// this is noise to them.
const STAGE_GATHER: Duration = Duration::from_millis(20);
/// Scout calls (and observation lookups) in flight at once.
const STAGE_CONCURRENCY: usize = 64;

impl StageWorker {
    async fn run(self, mut stopped: watch::Receiver<bool>) {
        let mut claims = self.store.stage_claims(self.timings.poll);
        loop {
            if *stopped.borrow() {
                return;
            }
            let claim = claims.claim(STAGE_CLAIM).await;
            if let Some(e) = claim.search_error {
                tracing::error!(error = %e, "claiming stage work failed");
            }
            let claimed = claim.work;
            let full = claimed.len() as i64 == STAGE_CLAIM;
            if let Err(e) = self.work(claimed).await {
                tracing::error!(error = %e, "recording stage work failed; its leases will lapse and it will be retried");
            }
            if full {
                continue;
            }
            if !idle(&self.store.signals().work, self.timings.poll, &mut stopped).await {
                return;
            }
            // Every intake batch wakes the worker; waiting a moment lets one claim and one
            // store update cover many batches of a burst instead of one each (a statement
            // per 15 jobs cost PostgreSQL about twice the CPU per job of one per 500).
            tokio::select! {
                _ = tokio::time::sleep(STAGE_GATHER) => {}
                _ = stopped.changed() => return,
            }
        }
    }

    /// Resolves the observations among `claimed`, then stages every job that has files.
    async fn work(&self, claimed: Vec<StageWork>) -> Result<(), StoreError> {
        // Only observations need a lookup; a job born with files goes straight to staging
        // (a lookup future per job, moved through the stream, cost a copy of a large state
        // machine for every new job).
        let (to_resolve, mut due): (Vec<&StageWork>, Vec<&StageWork>) =
            claimed.iter().partition(|w| w.state == JobState::Resolving);
        if !to_resolve.is_empty() {
            // Jobs are independent: one slow adapter call must not hold up the others.
            // Collected first: a lazy map inside the stream trips the compiler's lifetime
            // inference for the spawned task.
            let lookups: Vec<_> = to_resolve
                .into_iter()
                .map(|w| async move { (w, self.resolve(w).await) })
                .collect();
            let resolved: Vec<_> = stream::iter(lookups)
                .buffer_unordered(STAGE_CONCURRENCY)
                .collect()
                .await;
            for (w, r) in resolved {
                match r {
                    Ok(true) => due.push(w),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!(job_id = w.job_id, error = %e, "recording a resolved observation failed; its lease will lapse and it will be retried");
                    }
                }
            }
        }
        if due.is_empty() {
            return Ok(());
        }
        let Some(stager) = &self.parts.stager else {
            // Nothing can stage: look again after the restage interval.
            let next = now_ms() + self.timings.restage_interval.as_millis() as i64;
            let retry: Vec<_> = due
                .iter()
                .map(|w| (w.job_id, next, "no Scout nodes configured".to_string()))
                .collect();
            return self.store.mark_stage_retry(&retry).await;
        };
        // Jobs in `waiting` had their files accepted by Scout already: this is a restage.
        if let Some(ingest) = self.parts.ingest.as_ref().filter(|i| i.behind()) {
            let (restage, first): (Vec<&StageWork>, Vec<&StageWork>) =
                due.into_iter().partition(|w| w.state == JobState::Waiting);
            due = first;
            if !restage.is_empty() {
                let next = now_ms() + self.timings.restage_interval.as_millis() as i64;
                let deferred: Vec<(i64, i64)> = restage.iter().map(|w| (w.job_id, next)).collect();
                self.counters
                    .restages_deferred
                    .fetch_add(deferred.len() as u64, Ordering::Relaxed);
                let g = ingest.group();
                tracing::info!(
                    jobs = deferred.len(),
                    lag = g.lag.unwrap_or(-1),
                    stalled = g.stalled_since_ms.is_some(),
                    "restage put off: the Kafka consumer is behind, so the recall messages are likely queued"
                );
                self.store.mark_staged(&deferred).await?;
            }
            if due.is_empty() {
                return Ok(());
            }
        }
        let ids: Vec<i64> = due.iter().map(|w| w.job_id).collect();
        let mut paths = self.store.waiting_paths(&ids).await?;
        // A first stage asks only for paths no other waiting job has asked for already; a
        // restage asks for all its paths, so a lost recall is asked for again.
        let first: Vec<i64> = due
            .iter()
            .filter(|w| w.state == JobState::Staging)
            .map(|w| w.job_id)
            .collect();
        let mut elsewhere = self.store.requested_elsewhere(&first).await?;
        let calls: Vec<_> = due
            .into_iter()
            .map(|w| {
                let mut paths = paths.remove(&w.job_id).unwrap_or_default();
                let shared = elsewhere.remove(&w.job_id).unwrap_or_default();
                let waiting = paths.len();
                paths.retain(|p| !shared.contains(p));
                async move {
                    let result = if waiting == 0 {
                        // Nothing waiting: everything already arrived and the ingest queued
                        // completion.
                        None
                    } else if paths.is_empty() {
                        // Every path is on its way for another job already.
                        Some(Ok(()))
                    } else {
                        Some(stager.stage(w.job_id, &paths).await)
                    };
                    (w, paths.len(), result)
                }
            })
            .collect();
        let results: Vec<_> = stream::iter(calls)
            .buffer_unordered(STAGE_CONCURRENCY)
            .collect()
            .await;

        let next = now_ms() + self.timings.restage_interval.as_millis() as i64;
        let mut staged = Vec::new();
        let mut retry = Vec::new();
        let mut settled = Vec::new();
        for (w, files, result) in results {
            let job_id = w.job_id;
            match result {
                None => {
                    staged.push((job_id, i64::MAX));
                    settled.push(job_id);
                }
                Some(Ok(())) => {
                    self.counters.stage_calls_ok.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(job_id, files, "staging requested");
                    staged.push((job_id, next));
                }
                Some(Err(StageError::Transient(reason))) => {
                    self.counters
                        .stage_calls_failed
                        .fetch_add(1, Ordering::Relaxed);
                    let wait = backoff(
                        w.stage_attempts,
                        self.timings.retry_min,
                        self.timings.retry_max,
                    );
                    tracing::warn!(job_id, %reason, retry_in = ?wait, "staging failed; will retry");
                    retry.push((job_id, now_ms() + wait.as_millis() as i64, reason));
                }
                Some(Err(StageError::Refused(reason))) => {
                    self.counters
                        .stage_calls_failed
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(job_id, %reason, "Scout refused the staging request");
                    self.decide_error(
                        job_id,
                        codes::SCOUT_FAILED,
                        &format!("Scout refused to stage the files: {reason}"),
                    )
                    .await?;
                }
            }
        }
        self.store.mark_staged(&staged).await?;
        // Usually the ingest completed these already; a stage request whose files all
        // failed at submission had no event to complete it.
        self.store.complete_settled(&settled).await?;
        self.store.mark_stage_retry(&retry).await
    }

    /// Resolves an observation job into files. Returns true when it now has files to stage.
    async fn resolve(&self, w: &StageWork) -> Result<bool, StoreError> {
        let job_id = w.job_id;
        let obs: serde_json::Value = match w.request_obs.as_deref().map(serde_json::from_str) {
            Some(Ok(v)) => v,
            other => {
                let why = format!("stored observation is unreadable: {other:?}");
                self.decide_error(
                    job_id,
                    codes::INTERNAL,
                    &format!("Exception while trying to create job {job_id}: {why}"),
                )
                .await?;
                return Ok(false);
            }
        };
        let Some(resolver) = &self.parts.resolver else {
            self.decide_error(
                job_id,
                codes::LOOKUP_FAILED,
                "Failed to get files associated with the given observation: no telescope adapter is configured.",
            )
            .await?;
            return Ok(false);
        };
        match resolver.resolve(&obs).await {
            Ok(paths) if paths.is_empty() => {
                self.decide_error(job_id, codes::NO_FILES, "No files to stage.")
                    .await?;
                Ok(false)
            }
            Ok(mut paths) => {
                paths.sort();
                paths.dedup();
                self.counters.resolved.fetch_add(1, Ordering::Relaxed);
                tracing::info!(job_id, files = paths.len(), "observation resolved");
                self.store.set_resolved_files(job_id, &paths).await
            }
            Err(ResolveError::NotFound) => {
                self.decide_error(job_id, codes::NO_FILES, "No files to stage.")
                    .await?;
                Ok(false)
            }
            Err(ResolveError::LookupFailed(why)) => {
                tracing::warn!(job_id, %why, "observation lookup failed");
                self.decide_error(
                    job_id,
                    codes::LOOKUP_FAILED,
                    &format!("Failed to get files associated with the given observation: {why}"),
                )
                .await?;
                Ok(false)
            }
            Err(ResolveError::Unavailable(why)) => {
                let wait = backoff(
                    w.stage_attempts,
                    self.timings.retry_min,
                    self.timings.retry_max,
                );
                tracing::warn!(job_id, %why, retry_in = ?wait, "observation lookup unavailable; will retry");
                let next = now_ms() + wait.as_millis() as i64;
                self.store.mark_stage_retry(&[(job_id, next, why)]).await?;
                Ok(false)
            }
            Err(ResolveError::Internal(why)) => {
                tracing::error!(job_id, %why, "adapter failed resolving the observation");
                self.decide_error(
                    job_id,
                    codes::INTERNAL,
                    &format!("Exception while trying to create job {job_id}: {why}"),
                )
                .await?;
                Ok(false)
            }
        }
    }

    async fn decide_error(&self, job_id: i64, code: i64, comment: &str) -> Result<(), StoreError> {
        let at = now_ms() + self.error_delay.as_millis() as i64;
        self.store.decide(job_id, code, comment, at, None).await?;
        Ok(())
    }
}

/// Periodic housekeeping: expiry, history and report retention.
struct Sweeper {
    store: Store,
    timings: EngineTimings,
    expired_grace: Duration,
    /// How long a finished Tape REST stage request is kept for its client to poll.
    requests_keep: Duration,
    reports_dir: std::path::PathBuf,
    report_days: u64,
    report_keep: usize,
    counters: Arc<EngineCounters>,
}

impl Sweeper {
    async fn run(self, mut stopped: watch::Receiver<bool>) {
        loop {
            self.sweep().await;
            tokio::select! {
                _ = tokio::time::sleep(self.timings.sweep_interval) => {},
                _ = stopped.changed() => {},
            }
            if *stopped.borrow() {
                return;
            }
        }
    }

    async fn sweep(&self) {
        match self
            .store
            .expire_due(self.expired_grace.as_millis() as i64)
            .await
        {
            Ok(0) => {}
            Ok(n) => {
                self.counters.expired.fetch_add(n, Ordering::Relaxed);
                tracing::info!(jobs = n, "jobs expired");
            }
            Err(e) => tracing::error!(error = %e, "expiry sweep failed"),
        }
        let before = now_ms() - self.requests_keep.as_millis() as i64;
        match self.store.forget_finished_requests(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(requests = n, "finished stage requests forgotten"),
            Err(e) => tracing::error!(error = %e, "forgetting finished stage requests failed"),
        }
        let before = now_ms() - self.timings.history_keep.as_millis() as i64;
        if let Err(e) = self.store.prune_history(before).await {
            tracing::error!(error = %e, "pruning history failed");
        }
        let (dir, days, keep) = (self.reports_dir.clone(), self.report_days, self.report_keep);
        match tokio::task::spawn_blocking(move || crate::reports::prune(&dir, days, keep)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(reports = n, "old failure reports removed"),
            Ok(Err(e)) => tracing::error!(error = %e, "pruning failure reports failed"),
            Err(e) => tracing::error!(error = %e, "pruning failure reports panicked"),
        }
    }
}
