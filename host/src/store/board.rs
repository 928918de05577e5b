//! What the dashboard reads from the store: a page of the newest unfinished jobs with their
//! progress, the head and totals of the callback outbox, and (in `engine.rs`) the newest
//! finished jobs.
//!
//! Invariant: each read is a walk of an index bounded by its `LIMIT` (jobs by primary key,
//! the outbox by `next_attempt_ms`), whatever the tables hold, except the outbox totals,
//! a count over the outbox, which holds only callbacks not yet delivered. Progress comes
//! from the job row's own counters (`settled_files`, `failed_files`), never from counting
//! its files.

use super::{Backend, Store, StoreError, callback_origin, with_pool};

/// One unfinished job, as the dashboard shows it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct FlightRow {
    pub job_id: i64,
    pub created_ms: i64,
    pub state: String,
    pub total_files: i64,
    /// Ready, or failed and not ready.
    pub settled_files: i64,
    pub failed_files: i64,
    pub next_stage_ms: Option<i64>,
    pub submitted_by: Option<String>,
}

/// The outbox as a whole.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboxTotals {
    pub pending: i64,
    /// Callbacks with at least one failed attempt.
    pub failing: i64,
    pub next_attempt_ms: Option<i64>,
}

/// One callback due soonest. The destination is its origin (scheme, host, port) only: a
/// `notify_url`'s path and query are the client's business.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxHead {
    pub job_id: i64,
    pub return_code: i64,
    pub attempts: i64,
    pub next_attempt_ms: i64,
    pub destination: String,
    pub last_error: Option<String>,
}

impl Store {
    /// The `limit` newest unfinished jobs (by job id, newest first).
    pub async fn jobs_in_flight(&self, limit: i64) -> Result<Vec<FlightRow>, StoreError> {
        const SQL: &str = "SELECT job_id, created_ms, state, total_files, settled_files, \
                 failed_files, next_stage_ms, submitted_by \
             FROM jobs WHERE state <> 'done' ORDER BY job_id DESC LIMIT $1";
        Ok(with_pool!(&self.backend, p =>
            sqlx::query_as(SQL).bind(limit).fetch_all(p).await?))
    }

    /// The outbox's totals and the `limit` callbacks due soonest.
    pub async fn outbox_head(
        &self,
        limit: i64,
    ) -> Result<(OutboxTotals, Vec<OutboxHead>), StoreError> {
        const TOTALS: &str = "SELECT count(*), count(*) FILTER (WHERE attempts > 0), \
                 min(next_attempt_ms) FROM notify_outbox";
        const HEAD: &str = "SELECT job_id, return_code, attempts, next_attempt_ms, notify_url, \
                 last_error FROM notify_outbox ORDER BY next_attempt_ms LIMIT $1";
        type Head = (i64, i64, i64, i64, String, Option<String>);
        let ((pending, failing, next_attempt_ms), rows): ((i64, i64, Option<i64>), Vec<Head>) = with_pool!(&self.backend, p => (
            sqlx::query_as(TOTALS).fetch_one(p).await?,
            sqlx::query_as(HEAD).bind(limit).fetch_all(p).await?,
        ));
        let head = rows
            .into_iter()
            .map(
                |(job_id, return_code, attempts, next_attempt_ms, url, last_error)| OutboxHead {
                    job_id,
                    return_code,
                    attempts,
                    next_attempt_ms,
                    destination: callback_origin(&url),
                    last_error,
                },
            )
            .collect();
        Ok((
            OutboxTotals {
                pending,
                failing,
                next_attempt_ms,
            },
            head,
        ))
    }
}
