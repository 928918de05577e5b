//! The operator's dashboard: a page at `/` (HTML, CSS and script embedded in the binary, so
//! it works with no network) that polls `GET /dashboard.json`.
//!
//! Invariant: one poll costs the same with ten jobs in flight or a hundred thousand: the
//! totals come from the background snapshot `/metrics` keeps, the lists are bounded pages
//! read through indexes (see `store::board`), and the rest is in memory. The page holds no
//! data itself, so it is open; the JSON needs the `read` scope when tokens are configured.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::error::ApiError;
use super::models::ErrorResult;
use crate::store::now_ms;

/// Jobs in flight, callbacks and finished jobs listed per poll.
pub const PAGE: i64 = 50;

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/dashboard.js");

/// Its script, served apart so that the page's security policy can refuse inline script.
pub async fn script() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        SCRIPT,
    )
}

/// The dashboard page.
pub async fn page() -> impl IntoResponse {
    (
        [
            (header::CACHE_CONTROL, "no-cache"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        Html(INDEX_HTML),
    )
}

/// Everything the dashboard shows, at one moment.
#[derive(Debug, Serialize, ToSchema)]
pub struct Dashboard {
    /// Milliseconds since the Unix epoch when this was read.
    pub now_ms: i64,
    pub version: String,
    pub store: String,
    /// Unsafe settings in force (`staged check-config` lists the same).
    pub warnings: Vec<String>,
    /// The store's totals as last read in the background; `None` until the first read.
    pub totals: Option<Totals>,
    pub adapter: Option<AdapterView>,
    pub kafka: Option<KafkaView>,
    pub scout: Vec<ScoutNode>,
    /// The newest unfinished jobs (at most [`PAGE`]).
    pub jobs: Vec<JobInFlight>,
    pub outbox: Outbox,
    /// The newest finished jobs (at most [`PAGE`]).
    pub finished: Vec<FinishedJob>,
    pub throughput: ThroughputView,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Totals {
    /// Seconds since these were read.
    pub age_secs: u64,
    pub jobs_in_flight: i64,
    pub jobs_complete: i64,
    pub files_ready: i64,
    pub files_failed: i64,
    pub files_waiting: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AdapterView {
    pub name: String,
    pub version: String,
    pub telescope: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KafkaView {
    /// Consuming, in its group, and heard from a broker lately.
    pub connected: bool,
    pub in_group: bool,
    /// Messages waiting for this consumer, when known.
    pub lag: Option<i64>,
    /// Seconds since the last message, if one came.
    pub last_message_secs: Option<i64>,
    pub stalled: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ScoutNode {
    pub node: String,
    /// Left out of the rotation for now after failures.
    pub ejected: bool,
    /// Recent latency (moving average), milliseconds; `None` before the first answer.
    pub latency_ms: Option<f64>,
    pub successes: u64,
    pub failures: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobInFlight {
    pub job_id: i64,
    pub state: String,
    pub age_secs: i64,
    pub total: i64,
    pub ready: i64,
    pub failed: i64,
    pub waiting: i64,
    /// Seconds until the next (re)stage call, when one is scheduled (negative: overdue).
    pub next_stage_in_secs: Option<i64>,
    /// The token that submitted it, with auth on.
    pub submitted_by: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Outbox {
    pub pending: i64,
    pub failing: i64,
    pub next_attempt_in_secs: Option<i64>,
    /// The callbacks due soonest (at most [`PAGE`]).
    pub due: Vec<Callback>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Callback {
    pub job_id: i64,
    pub return_code: i64,
    pub attempts: i64,
    pub next_attempt_in_secs: i64,
    /// Scheme, host and port of the destination (never its path or query).
    pub destination: String,
    pub last_error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FinishedJob {
    pub job_id: i64,
    /// For a Tape REST stage request, its id (it has no failure report).
    pub request_id: Option<String>,
    pub return_code: i64,
    pub duration_secs: i64,
    pub finished_secs_ago: i64,
    pub total: i64,
    pub ready: i64,
    pub failed: i64,
    pub delivered: bool,
    /// Where its failure report is served, for a job that did not get code 0.
    pub report: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ThroughputView {
    pub interval_secs: u64,
    /// Per interval, oldest first, the last one in progress.
    pub accepted: Vec<u64>,
    pub files: Vec<u64>,
    pub callbacks: Vec<u64>,
}

/// The dashboard's data.
#[utoipa::path(
    get, path = "/dashboard.json", tag = "service",
    responses(
        (status = 200, body = Dashboard),
        (status = 500, body = ErrorResult),
    )
)]
pub async fn data(State(app): State<AppState>) -> Result<Json<Dashboard>, ApiError> {
    let now = now_ms();
    let secs_from_now = |ms: i64| (ms - now).div_euclid(1000);
    let internal = |e| ApiError::internal("reading the dashboard's data", e);
    let (jobs, (totals, due), finished) = tokio::try_join!(
        app.store.jobs_in_flight(PAGE),
        app.store.outbox_head(PAGE),
        app.store.history(PAGE),
    )
    .map_err(internal)?;
    let snapshot = app
        .metrics_store
        .read(&app.store)
        .map(|(age, t)| (age, t.stats));
    let snapshot = snapshot.map(|(age, s)| Totals {
        age_secs: age.as_secs(),
        jobs_in_flight: s.incomplete_jobs,
        jobs_complete: s.completed_jobs,
        files_ready: s.ready_files,
        files_failed: s.error_files,
        files_waiting: s.waiting_files,
    });
    let kafka = app.kafka.as_ref().map(|k| {
        let g = k.group();
        KafkaView {
            connected: k.alive(),
            in_group: g.in_group,
            lag: g.lag,
            last_message_secs: k.last_message_ms().map(|ms| (now - ms).max(0) / 1000),
            stalled: g.stalled_since_ms.is_some(),
        }
    });
    let scout = app
        .scout
        .as_ref()
        .map(|s| {
            s.node_stats()
                .into_iter()
                .map(|n| ScoutNode {
                    node: n.base,
                    ejected: n.ejected,
                    latency_ms: (n.answered > 0).then(|| n.recent_latency_us as f64 / 1000.0),
                    successes: n.successes,
                    failures: n.failures,
                })
                .collect()
        })
        .unwrap_or_default();
    let series = app.throughput.series(&app.throughput_sources);
    Ok(Json(Dashboard {
        now_ms: now,
        version: env!("CARGO_PKG_VERSION").to_string(),
        store: app.store.backend_name().to_string(),
        warnings: app.warnings.as_ref().clone(),
        totals: snapshot,
        adapter: app.adapters.current().map(|a| AdapterView {
            name: a.info().name.clone(),
            version: a.info().version.clone(),
            telescope: a.info().telescope.clone(),
        }),
        kafka,
        scout,
        jobs: jobs
            .into_iter()
            .map(|j| JobInFlight {
                job_id: j.job_id,
                state: j.state,
                age_secs: (now - j.created_ms).max(0) / 1000,
                total: j.total_files,
                ready: j.settled_files - j.failed_files,
                failed: j.failed_files,
                waiting: (j.total_files - j.settled_files).max(0),
                next_stage_in_secs: j.next_stage_ms.map(secs_from_now),
                submitted_by: j.submitted_by,
            })
            .collect(),
        outbox: Outbox {
            pending: totals.pending,
            failing: totals.failing,
            next_attempt_in_secs: totals.next_attempt_ms.map(secs_from_now),
            due: due
                .into_iter()
                .map(|c| Callback {
                    job_id: c.job_id,
                    return_code: c.return_code,
                    attempts: c.attempts,
                    next_attempt_in_secs: secs_from_now(c.next_attempt_ms),
                    destination: c.destination,
                    last_error: c.last_error,
                })
                .collect(),
        },
        finished: finished
            .into_iter()
            .map(|h| FinishedJob {
                job_id: h.job_id,
                report: (h.return_code != 0 && h.request_id.is_none())
                    .then(|| format!("/get_failed_job/?job_id={}", h.job_id)),
                request_id: h.request_id,
                return_code: h.return_code,
                duration_secs: (h.finished_ms - h.created_ms).max(0) / 1000,
                finished_secs_ago: (now - h.finished_ms).max(0) / 1000,
                total: h.total_files,
                ready: h.ready_files,
                failed: h.error_files,
                delivered: h.delivered,
            })
            .collect(),
        throughput: ThroughputView {
            interval_secs: series.interval_secs,
            accepted: series.accepted,
            files: series.files,
            callbacks: series.callbacks,
        },
    }))
}

/// Shared so that every poll serves the same list without rebuilding it.
pub type Warnings = Arc<Vec<String>>;
