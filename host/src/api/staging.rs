//! `/staging/`: create, read and delete jobs.

use std::collections::HashSet;

use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde_json::json;
use tracing::Span;

use super::access::Caller;
use super::error::ApiError;
use super::input::{QueryParams, json_body, null_body};
use super::models::{ErrorResult, FilesMap, JobStatus, NewJob};
use super::{AppState, Limits};
use crate::adapter::{AdapterError, Adapters, LoadedAdapter};
use crate::config::check_http_url;
use crate::store::{self, Intake};

/// Create a staging job.
///
/// The job is stored durably before the answer; its files are then staged in the
/// background and `notify_url` is called with the result. `files` wins over `obs`.
#[utoipa::path(
    post, path = "/staging/", tag = "staging",
    request_body = NewJob,
    responses(
        (status = 202, description = "Accepted and stored; the body is `null`"),
        (status = 400, description = "Neither files nor obs, obs without a telescope adapter, a bad path (empty, too long, a control character, or one the adapter would never recognise in a recall message) or a bad notify_url", body = ErrorResult),
        (status = 403, description = "The job id already exists", body = ErrorResult),
        (status = 413, description = "Body over the configured limit", body = ErrorResult),
        (status = 422, description = "Body is not a valid NewJob, or `obs` does not match the adapter's observation schema", body = ErrorResult),
        (status = 500, description = "Internal error", body = ErrorResult),
    )
)]
pub async fn create(
    State(app): State<AppState>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let req: NewJob = json_body(&headers, body, app.limits.max_body_bytes).await?;
    Span::current().record("job_id", req.job_id);
    let job_id = req.job_id;
    let Some(mut job) = validate(req, &app.limits, &app.callback_allow, &app.adapters)? else {
        // The original answers 403 before 400 when the id exists.
        if app
            .store
            .job_exists(job_id)
            .await
            .map_err(|e| ApiError::internal("checking for the job", e))?
        {
            return Err(duplicate(job_id));
        }
        return Err(ApiError::bad_request(format!(
            "Error for job {job_id}: Must specify either an observation, or a list of files"
        )));
    };
    if let Some(adapter) = app.adapters.current() {
        check_recognised(&adapter, job_id, &job.files).await?;
    }
    job.submitted_by = caller
        .and_then(|Extension(c)| c.token)
        .map(|t| t.to_string());
    let files = job.files.len();
    let with_obs = job.obs.is_some();
    match app.store.submit(job).await {
        Ok(Intake::Created) => {
            app.throughput
                .accepted
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(files, obs = with_obs, "job accepted");
            Ok(null_body(StatusCode::ACCEPTED))
        }
        Ok(Intake::Duplicate) => Err(duplicate(job_id)),
        Err(e) => Err(ApiError::internal(
            &format!("Exception creating job {job_id}"),
            e,
        )),
    }
}

/// Refuses a job naming a file the adapter would never recognise in a recall message: its
/// recall could never be seen, so the job would wait for its expiry. A path is recognised
/// when the adapter maps the path it sends Scout for it (`stage-paths`) back onto the same
/// job path (`map-event-paths`), which is exactly what the Kafka ingest will do with the
/// recall message's `Filename`.
async fn check_recognised(
    adapter: &LoadedAdapter,
    job_id: i64,
    files: &[String],
) -> Result<(), ApiError> {
    let failed = |e: AdapterError| {
        tracing::error!(error = %e, "checking the job's paths with the adapter failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "Error for job {job_id}: the {} adapter could not check the job's paths; see the daemon's log",
                adapter.info().name
            ),
        )
    };
    let known = recognised(adapter, files).await.map_err(failed)?;
    if let Some((i, path)) = files
        .iter()
        .zip(known)
        .enumerate()
        .find(|(_, (_, ok))| !ok)
        .map(|(i, (p, _))| (i, p))
    {
        return Err(ApiError::bad_request(format!(
            "Error for job {job_id}: file {i} ({path:?}) is not a path of the {} adapter's telescope: \
             its recall message would never be recognised, so the job could never complete",
            adapter.info().name
        )));
    }
    Ok(())
}

/// For each of `files`, whether the adapter maps the path it sends Scout for it
/// (`stage-paths`) back onto the same path (`map-event-paths`), which is exactly what the
/// Kafka ingest will do with the recall message's `Filename`.
pub(crate) async fn recognised(
    adapter: &LoadedAdapter,
    files: &[String],
) -> Result<Vec<bool>, AdapterError> {
    let mut known = Vec::with_capacity(files.len());
    for chunk in files.chunks(crate::adapter::PATHS_PER_CALL) {
        let staged = adapter.stage_paths(chunk).await?;
        let mapped = adapter.map_event_paths(&staged).await?;
        known.extend(
            chunk
                .iter()
                .zip(mapped.iter().map(Some).chain(std::iter::repeat(None)))
                .map(|(path, back)| back.and_then(|b| b.as_deref()) == Some(path.as_str())),
        );
    }
    Ok(known)
}

fn duplicate(job_id: i64) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        format!("Can't create job {job_id}, because it already exists."),
    )
}

/// Checks a request and turns it into a job to store; `Ok(None)` when it names neither
/// files nor an observation.
fn validate(
    req: NewJob,
    limits: &Limits,
    callback_allow: &crate::allow_list::AllowList,
    adapters: &Adapters,
) -> Result<Option<store::NewJob>, ApiError> {
    let job_id = req.job_id;
    if req.notify_url.contains(|c: char| c.is_control()) {
        return Err(ApiError::bad_request(format!(
            "Error for job {job_id}: notify_url contains control characters"
        )));
    }
    let notify_url = check_http_url(&req.notify_url).map_err(|e| {
        ApiError::bad_request(format!(
            "Error for job {job_id}: notify_url must be an http(s) URL: {e}"
        ))
    })?;
    if let Err(why) = crate::net_guard::check_callback_url(&notify_url, callback_allow) {
        return Err(ApiError::bad_request(format!(
            "Error for job {job_id}: notify_url {why}"
        )));
    }
    let files = req.files.unwrap_or_default();
    if !files.is_empty() {
        if files.len() > limits.max_files_per_job {
            return Err(ApiError::bad_request(format!(
                "Error for job {job_id}: {} files is more than the limit of {} per job",
                files.len(),
                limits.max_files_per_job
            )));
        }
        for (i, path) in files.iter().enumerate() {
            let problem = if path.is_empty() {
                Some("is empty".to_string())
            } else if path.len() > limits.max_path_bytes {
                Some(format!("is longer than {} bytes", limits.max_path_bytes))
            } else if path.contains('\0') {
                Some("contains a NUL character".to_string())
            } else {
                // A newline or carriage return would forge lines in failure reports and
                // logs; no tape path needs any control character.
                path.chars()
                    .find(|c| c.is_control())
                    .map(|c| format!("contains the control character U+{:04X}", u32::from(c)))
            };
            if let Some(problem) = problem {
                return Err(ApiError::bad_request(format!(
                    "Error for job {job_id}: file {i} {problem}"
                )));
            }
        }
        // A path named twice is staged and counted once. Found by reference and removed in
        // place: a copy of every path would double what a 500,000-file job holds.
        let mut files = files;
        let keep: Vec<bool> = {
            let mut seen = HashSet::with_capacity(files.len());
            files.iter().map(|f| seen.insert(f.as_str())).collect()
        };
        if keep.contains(&false) {
            let mut keep = keep.into_iter();
            files.retain(|_| keep.next().unwrap_or(true));
        }
        return Ok(Some(store::NewJob {
            job_id,
            notify_url: req.notify_url,
            files,
            obs: None,
            submitted_by: None,
            ..Default::default()
        }));
    }
    match req.obs {
        Some(obs) if !obs.is_empty() => {
            let obs = serde_json::Value::Object(obs);
            // Checked against the schema now, so that a job the adapter cannot look up is
            // refused to the client rather than failed later by callback.
            let Some(adapter) = adapters.current() else {
                return Err(ApiError::bad_request(format!(
                    "Error for job {job_id}: this server has no telescope adapter configured, so it cannot look up an observation; send a list of files instead"
                )));
            };
            adapter.validate_observation(&obs).map_err(|reason| {
                ApiError::unprocessable(
                    "obs_invalid",
                    vec![json!("body"), json!("obs")],
                    format!(
                        "not a valid observation for the {} adapter: {reason}",
                        adapter.info().name
                    ),
                )
            })?;
            Ok(Some(store::NewJob {
                job_id,
                notify_url: req.notify_url,
                files: Vec::new(),
                obs: Some(obs.to_string()),
                submitted_by: None,
                ..Default::default()
            }))
        }
        _ => Ok(None),
    }
}

/// Read a job's status.
#[utoipa::path(
    get, path = "/staging/", tag = "staging",
    params(
        ("job_id" = i64, Query, description = "Job id"),
        ("include_files" = Option<bool>, Query, description = "Include every file's state (default false)"),
    ),
    responses(
        (status = 200, body = JobStatus),
        (status = 404, description = "No such job", body = ErrorResult),
        (status = 422, description = "Bad job_id or include_files", body = ErrorResult),
        (status = 500, body = ErrorResult),
    )
)]
pub async fn status(
    State(app): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<JobStatus>, ApiError> {
    let q = QueryParams::parse(query.as_deref());
    let job_id = q.required_i64("job_id")?;
    Span::current().record("job_id", job_id);
    let include_files = q.bool_or("include_files", false)?;
    let internal = |e| ApiError::internal(&format!("Exception getting status for job {job_id}"), e);
    let summary = app
        .store
        .job_summary(job_id)
        .await
        .map_err(internal)?
        .ok_or_else(|| ApiError::not_found(format!("Job {job_id} not found")))?;
    let files = if include_files {
        FilesMap::Rows(app.store.job_files(job_id).await.map_err(internal)?)
    } else {
        FilesMap::Empty
    };
    Ok(Json(JobStatus {
        job_id,
        created: summary.created_ms / 1000,
        completed: summary.completed(),
        total_files: summary.total_files,
        ready_files: summary.ready_files,
        error_files: summary.error_files,
        last_readytime: summary.last_ready_ms.map(|ms| ms / 1000).unwrap_or(0),
        files,
    }))
}

/// Delete a job.
#[utoipa::path(
    delete, path = "/staging/", tag = "staging",
    params(("job_id" = i64, Query, description = "Job id")),
    responses(
        (status = 200, description = "Deleted; the body is `null`"),
        (status = 403, description = "With tokens configured: the job was submitted by another token, and this one is not `admin`", body = ErrorResult),
        (status = 404, description = "No such job", body = ErrorResult),
        (status = 422, description = "Bad job_id", body = ErrorResult),
        (status = 500, body = ErrorResult),
    )
)]
pub async fn delete(
    State(app): State<AppState>,
    caller: Option<Extension<Caller>>,
    RawQuery(query): RawQuery,
) -> Result<impl IntoResponse, ApiError> {
    let job_id = QueryParams::parse(query.as_deref()).required_i64("job_id")?;
    Span::current().record("job_id", job_id);
    let caller = caller.map_or_else(Caller::anonymous, |Extension(c)| c);
    if !caller.admin {
        let owner = app
            .store
            .job_owner(job_id)
            .await
            .map_err(|e| ApiError::internal(&format!("Exception deleting job {job_id}"), e))?
            .ok_or_else(|| ApiError::not_found(format!("Job {job_id} not found")))?;
        if owner.as_deref() != caller.token.as_deref() {
            tracing::warn!(
                owner = owner.as_deref(),
                "refused: deleting another token's job"
            );
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "Job {job_id} was not submitted by this token; only its submitter or an admin token may delete it"
                ),
            ));
        }
    }
    if let Some(scout) = &app.scout {
        cancel_unshared(&app, scout, job_id).await;
    }
    let existed = app
        .store
        .delete_job(job_id)
        .await
        .map_err(|e| ApiError::internal(&format!("Exception deleting job {job_id}"), e))?;
    if !existed {
        return Err(ApiError::not_found(format!("Job {job_id} not found")));
    }
    tracing::info!("job deleted");
    Ok(null_body(StatusCode::OK))
}

/// Cancels at Scout the recalls of this job's paths that no other unfinished job wants.
/// Best effort and bounded in time: a slow Scout must not hold the DELETE, and a recall
/// left running only costs tape time.
async fn cancel_unshared(app: &AppState, scout: &crate::scout::ScoutClient, job_id: i64) {
    let paths = match app.store.exclusive_paths(job_id).await {
        Ok(p) if p.is_empty() => return,
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "listing paths to cancel failed; deleting without cancel");
            return;
        }
    };
    cancel_at_scout(app, scout, job_id, &paths).await;
}

/// Cancels the recalls of `paths` (of job `job_id`) at Scout, best effort and bounded in
/// time.
pub(crate) async fn cancel_at_scout(
    app: &AppState,
    scout: &crate::scout::ScoutClient,
    job_id: i64,
    paths: &[String],
) {
    use crate::engine::Stager;
    let stager = crate::engine::peers::ScoutStager {
        scout: scout.clone(),
        adapters: app.adapters.clone(),
    };
    match tokio::time::timeout(CANCEL_TIMEOUT, stager.cancel(job_id, paths)).await {
        Ok(Ok(())) => tracing::info!(files = paths.len(), "recalls cancelled"),
        Ok(Err(e)) => tracing::warn!(error = %e, files = paths.len(), "cancel at Scout failed"),
        Err(_) => tracing::warn!(files = paths.len(), "cancel at Scout timed out"),
    }
}

const CANCEL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);
