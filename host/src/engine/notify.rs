//! Callback delivery from the durable outbox.
//!
//! Invariants:
//! - At least once: a callback leaves the outbox only in the transaction that also removes
//!   its job, after a 200 answer (or, for an expired job, after its grace period, recorded
//!   as undelivered). A crash at any point leaves the row to be claimed again.
//! - No more than `per_minute` attempts start in any 60-second window (a sliding window,
//!   not a bucket that could allow twice the rate across a boundary).
//! - At most `concurrency` deliveries are in flight; each attempt has its own timeout, so a
//!   slow or dead endpoint holds one slot and never the ingest or other jobs' callbacks.
//! - The failure report (codes other than 0) is written before the job's files are removed,
//!   since it lists them.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use serde::Serialize;
use tokio::sync::{Mutex, Notify, Semaphore, watch};

use super::{EngineCounters, EngineTimings, JobFacts, Wording, backoff, idle};
use crate::config::CallbacksConfig;
use crate::engine::wording::BuiltinWording;
use crate::store::{OutboxRow, Store, StoreError, codes, now_ms};

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

/// Allows at most `limit` starts in any window of `window`.
pub(crate) struct RateLimiter {
    limit: usize,
    window: Duration,
    starts: Mutex<VecDeque<Instant>>,
}

impl RateLimiter {
    pub(crate) fn new(limit: usize, window: Duration) -> Self {
        Self {
            limit: limit.max(1),
            window,
            starts: Mutex::new(VecDeque::new()),
        }
    }

    pub(crate) async fn acquire(&self) {
        loop {
            let wait = {
                let mut starts = self.starts.lock().await;
                let now = Instant::now();
                while starts
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= self.window)
                {
                    starts.pop_front();
                }
                if starts.len() < self.limit {
                    starts.push_back(now);
                    return;
                }
                self.window - now.duration_since(starts[0])
            };
            tokio::time::sleep(wait).await;
        }
    }
}

pub(crate) struct Notifier {
    store: Store,
    owner: String,
    http: reqwest::Client,
    username: String,
    password: Option<String>,
    limiter: Arc<RateLimiter>,
    slots: Arc<Semaphore>,
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
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        store: Store,
        owner: String,
        cfg: &CallbacksConfig,
        expiry_secs: u64,
        reports_dir: PathBuf,
        wording: Arc<dyn Wording>,
        timings: EngineTimings,
        counters: Arc<EngineCounters>,
    ) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(cfg.timeout_secs))
            .connect_timeout(Duration::from_secs(cfg.timeout_secs.min(10)))
            .build()
            .expect("building the callback HTTP client");
        Self {
            store,
            owner,
            http,
            username: cfg.username.clone(),
            password: cfg.password.as_ref().map(|p| p.expose().to_string()),
            limiter: Arc::new(RateLimiter::new(
                cfg.per_minute as usize,
                Duration::from_secs(60),
            )),
            slots: Arc::new(Semaphore::new(cfg.concurrency)),
            slot_freed: Arc::new(Notify::new()),
            retry_min: Duration::from_secs(cfg.retry_min_secs),
            retry_max: Duration::from_secs(cfg.retry_max_secs),
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
            let free = this.slots.available_permits();
            if free > 0 {
                match this
                    .store
                    .claim_due_callbacks(
                        &this.owner,
                        this.timings.lease.as_millis() as i64,
                        free as i64,
                    )
                    .await
                {
                    Ok(rows) => {
                        for row in rows {
                            let Ok(permit) = this.slots.clone().acquire_owned().await else {
                                return;
                            };
                            let me = this.clone();
                            tokio::spawn(async move {
                                if let Err(e) = me.deliver(&row).await {
                                    tracing::error!(job_id = row.job_id, error = %e, "recording a callback outcome failed; it will be retried");
                                }
                                drop(permit);
                                me.slot_freed.notify_one();
                            });
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "claiming callbacks failed"),
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

    async fn deliver(&self, row: &OutboxRow) -> Result<(), StoreError> {
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

        self.limiter.acquire().await;
        let outcome = self.post(row, &comment).await;
        let now = now_ms();
        let delivered = match outcome {
            Ok(()) => {
                self.counters
                    .callbacks_delivered
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(job_id, return_code = row.return_code, "callback delivered");
                true
            }
            Err(why) => {
                self.counters
                    .callbacks_failed_attempts
                    .fetch_add(1, Ordering::Relaxed);
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

    async fn post(&self, row: &OutboxRow, comment: &str) -> Result<(), String> {
        let body = JobResult {
            job_id: row.job_id,
            return_code: row.return_code,
            total_files: row.total_files,
            ready_files: row.ready_files,
            error_files: row.error_files,
            comment,
        };
        let resp = self
            .http
            .post(&row.notify_url)
            .basic_auth(&self.username, self.password.as_deref())
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        if resp.status() == reqwest::StatusCode::OK {
            Ok(())
        } else {
            Err(format!("answered {}", resp.status()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_limiter_allows_the_limit_per_window() {
        let rl = RateLimiter::new(3, Duration::from_secs(60));
        let t0 = tokio::time::Instant::now();
        for _ in 0..3 {
            rl.acquire().await;
        }
        assert!(t0.elapsed() < Duration::from_millis(1));
        rl.acquire().await;
        assert!(
            t0.elapsed() >= Duration::from_secs(60),
            "the fourth waits a full window"
        );
    }
}
