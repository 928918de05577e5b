//! Read-only endpoints: liveness, totals, the job list, failure reports and file status.

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::Span;
use utoipa::ToSchema;

use super::AppState;
use super::error::ApiError;
use super::input::{QueryParams, json_body, null_body};
use super::models::{
    ErrorResult, FilesMap, GlobalStatistics, JobList, JobStatus, KafkaConsumerStats,
};
use crate::reports;

/// Liveness: 200 with a `null` body.
#[utoipa::path(get, path = "/ping/", tag = "service", responses((status = 200, description = "Alive; the body is `null`")))]
pub async fn ping() -> impl IntoResponse {
    null_body(StatusCode::OK)
}

/// Job and file totals, Kafka liveness and the tape cache's state.
#[utoipa::path(
    get, path = "/get_stats/", tag = "service",
    responses((status = 200, body = GlobalStatistics), (status = 500, body = ErrorResult))
)]
pub async fn stats(State(app): State<AppState>) -> Result<Json<GlobalStatistics>, ApiError> {
    let s = app
        .store
        .stats()
        .await
        .map_err(|e| ApiError::internal("Exception getting staging system status", e))?;
    let mut out = GlobalStatistics {
        completed_jobs: s.completed_jobs,
        incomplete_jobs: s.incomplete_jobs,
        ready_files: s.ready_files,
        error_files: s.error_files,
        waiting_files: s.waiting_files,
        ..GlobalStatistics::default()
    };
    if let Some(k) = &app.kafka {
        let secs = |ms: i64| ms as f64 / 1000.0;
        out.kafka_alive = k.alive();
        out.kafkad_heartbeat = k.heartbeat_ms().map(secs);
        out.last_message = k.last_message_ms().map(secs);
        let g = k.group();
        let c = k.counters();
        out.kafka_consumer = Some(KafkaConsumerStats {
            in_group: g.in_group,
            assigned_partitions: g.assigned,
            lag: g.lag,
            stalled_since: g.stalled_since_ms.map(secs),
            stalls: c.stalls,
            stale_messages: c.stale,
            malformed_messages: c.malformed,
            commit_failures: c.commit_failures,
        });
    }
    // The cache figures stay null when Scout is not configured or does not answer in time:
    // the rest of the statistics must not wait on the tape system.
    if let Some(scout) = &app.scout {
        match tokio::time::timeout(SCOUT_STATS_TIMEOUT, scout.cache_state()).await {
            Ok(Ok(c)) => {
                out.availdatasz = c.availdatasz;
                out.health = c.health;
                out.healthstatus = c.healthstatus;
                out.releaseable = c.releaseable;
                out.totdatasz = c.totdatasz;
                out.nonreleaseable = c.nonreleaseable;
                out.pending = c.pending;
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "Scout cache state unavailable"),
            Err(_) => tracing::warn!("Scout cache state: no answer in time"),
        }
    }
    Ok(Json(out))
}

/// Longest `/get_stats/` waits for Scout's cache figures.
const SCOUT_STATS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The body of `POST /filestatus/`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct FileStatusRequest {
    pub files: Vec<String>,
}

/// Whether each file is on disk (no offline blocks), as Scout says.
#[utoipa::path(
    post, path = "/filestatus/", tag = "staging",
    request_body = FileStatusRequest,
    responses(
        (status = 200, description = "path -> true when the file has no offline blocks", body = Object),
        (status = 400, description = "More files than `server.max_filestatus_files`", body = ErrorResult),
        (status = 404, description = "Scout failed for a file", body = ErrorResult),
        (status = 422, body = ErrorResult),
    )
)]
pub async fn file_status(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<BTreeMap<String, bool>>, ApiError> {
    let req: FileStatusRequest = json_body(&headers, body, app.limits.max_body_bytes).await?;
    let most = app.limits.max_filestatus_files;
    if req.files.len() > most {
        return Err(ApiError::bad_request(format!(
            "A file status request may name at most {most} files (server.max_filestatus_files); this one names {}",
            req.files.len()
        )));
    }
    let Some(scout) = app.scout.clone() else {
        return Err(ApiError::not_found("Scout is not configured"));
    };
    let slots = app.filestatus_slots.clone();
    // Order kept, calls bounded by the shared slots rather than per request.
    let answers: Vec<(String, Result<bool, String>)> = futures::stream::iter(req.files)
        .map(|path| {
            let (scout, slots) = (scout.clone(), slots.clone());
            async move {
                let Ok(_slot) = slots.acquire_owned().await else {
                    return (path, Err("the server is stopping".to_string()));
                };
                let r = scout
                    .file_status(&path)
                    .await
                    .map(|s| s.offlineblocks == 0)
                    .map_err(|e| e.to_string());
                (path, r)
            }
        })
        .buffered(most.min(64))
        .collect()
        .await;
    let mut out = BTreeMap::new();
    for (path, r) in answers {
        match r {
            Ok(online) => {
                out.insert(path, online);
            }
            Err(e) => {
                tracing::warn!(path, error = %e, "Scout file status failed");
                return Err(ApiError::not_found(format!(
                    "Error getting file status for {path}: {e}"
                )));
            }
        }
    }
    Ok(Json(out))
}

/// Every job: id -> [job_id, created, ready_files, total_files, completed, last_readytime,
/// error_files, sample_filename].
#[utoipa::path(
    get, path = "/get_joblist/", tag = "staging",
    responses((status = 200, body = JobList), (status = 500, body = ErrorResult))
)]
pub async fn job_list(State(app): State<AppState>) -> Result<Json<JobList>, ApiError> {
    let jobs = app
        .store
        .job_list()
        .await
        .map_err(|e| ApiError::internal("Exception getting staging job list", e))?;
    // Times as float seconds and a null last_readytime, as the original's SQL gave them.
    let jobs = jobs
        .into_iter()
        .map(|j| {
            let completed = j.completed();
            let row = vec![
                json!(j.job_id),
                json!(j.created_ms as f64 / 1000.0),
                json!(j.ready_files),
                json!(j.total_files),
                json!(completed),
                j.last_ready_ms
                    .map(|ms| json!(ms as f64 / 1000.0))
                    .unwrap_or(Value::Null),
                json!(j.error_files),
                j.sample_path.map(Value::String).unwrap_or(Value::Null),
            ];
            (j.job_id, row)
        })
        .collect::<BTreeMap<_, _>>();
    Ok(Json(JobList { jobs }))
}

/// Recent failure reports: id -> [job_id, report mtime, 0, 0, 0, 0, 0] (the original's shape).
#[utoipa::path(
    get, path = "/get_failed_joblist/", tag = "reports",
    responses((status = 200, body = JobList), (status = 500, body = ErrorResult))
)]
pub async fn failed_list(State(app): State<AppState>) -> Result<Json<JobList>, ApiError> {
    let dir = app.reports_dir.clone();
    let listed = tokio::task::spawn_blocking(move || reports::list(&dir))
        .await
        .map_err(|e| io_error("listing failure reports", std::io::Error::other(e)))?
        .map_err(|e| io_error("listing failure reports", e))?;
    let jobs = listed
        .into_iter()
        .map(|(id, mtime)| {
            (
                id,
                vec![
                    json!(id),
                    json!(mtime),
                    json!(0),
                    json!(0),
                    json!(0),
                    json!(0),
                    json!(0),
                ],
            )
        })
        .collect();
    Ok(Json(JobList { jobs }))
}

/// A failed job's status, rebuilt from its failure report.
#[utoipa::path(
    get, path = "/get_failed_job/", tag = "reports",
    params(("job_id" = i64, Query, description = "Job id")),
    responses(
        (status = 200, body = JobStatus),
        (status = 404, description = "No report for this job", body = ErrorResult),
        (status = 422, description = "Bad job_id", body = ErrorResult),
        (status = 500, body = ErrorResult),
    )
)]
pub async fn failed_job(
    State(app): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<JobStatus>, ApiError> {
    let job_id = QueryParams::parse(query.as_deref()).required_i64("job_id")?;
    Span::current().record("job_id", job_id);
    let dir = app.reports_dir.clone();
    let report = tokio::task::spawn_blocking(move || reports::read(&dir, job_id))
        .await
        .map_err(|e| io_error("reading a failure report", std::io::Error::other(e)))?
        .map_err(|e| io_error("reading a failure report", e))?
        .ok_or_else(|| ApiError::not_found(format!("Failed job {job_id} not found")))?;
    let error_files = report.files.len() as i64;
    let rows = report
        .files
        .into_iter()
        .map(|f| (f, false, true, Some(report.mtime)))
        .collect();
    Ok(Json(JobStatus {
        job_id,
        created: 0,
        completed: false,
        total_files: report.total_files,
        ready_files: 0,
        error_files,
        last_readytime: report.mtime,
        files: FilesMap::Report(rows),
    }))
}

fn io_error(what: &str, e: std::io::Error) -> ApiError {
    tracing::error!(error = %e, "{what}");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("Exception {what}: internal error, see the daemon's log"),
    )
}
