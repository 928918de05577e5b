//! The facade's endpoints. Shapes follow the WLCG Tape REST API v1 and, where its clients
//! differ, gfal2 (what FTS uses): see `shared/spec/tape-rest.md` in the project's notes and
//! the README's "Tape REST API" section.

use std::collections::HashSet;

use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tracing::Span;

use super::principal::Principal;
use super::wire::{
    ArchiveInfo, Discovery, Endpoint, FileState, FileStatus, Locality, PathsRequest, StageCreated,
    StageRequest, StageStatus,
};
use super::{Facade, Problem, empty_ok};
use crate::api::AppState;
use crate::api::input::json_body;
use crate::store::{self, Intake, JobState, RequestFile, RequestView};

/// Tries at a fresh job id when a random one is taken (ids are 52 random bits).
const ID_TRIES: usize = 4;

fn facade(app: &AppState) -> &Facade {
    app.tape_rest
        .as_deref()
        .expect("the facade's routes are mounted only when it is configured")
}

/// `GET /.well-known/wlcg-tape-rest-api`
pub async fn discovery(State(app): State<AppState>) -> Response {
    let f = facade(&app);
    let body = Discovery {
        sitename: f.cfg.sitename.clone(),
        description: f.cfg.description.clone(),
        endpoints: vec![Endpoint {
            uri: f.endpoint.clone(),
            version: "v1".into(),
            metadata: Default::default(),
        }],
    };
    let mut resp = Json(body).into_response();
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    resp
}

/// Reads a `{"paths": [...]}` body (cancel, release, archiveinfo): at least one path.
async fn paths_body(
    app: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Vec<String>, Problem> {
    let body: PathsRequest = json_body(headers, body, app.limits.max_body_bytes).await?;
    match body.paths {
        Some(p) if !p.is_empty() => Ok(p),
        _ => Err(Problem::bad_request(
            "paths: the field does not exist or is not a valid non-empty array",
        )),
    }
}

/// The store's paths for `paths`, every one of which the caller may stage, cancel or
/// release; `doing` words a refusal ("staging", "releasing").
fn stageable(
    f: &Facade,
    who: &Principal,
    paths: &[String],
    doing: &str,
) -> Result<Vec<String>, Problem> {
    paths
        .iter()
        .map(|p| {
            let m = f.mapping.to_store(p);
            if who.may_stage(&m.client) {
                Ok(m.stored)
            } else {
                Err(Problem::forbidden(format!(
                    "the token does not allow {doing} {}",
                    m.client
                )))
            }
        })
        .collect()
}

/// A UUID (version 4) for a new request.
fn new_request_id() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A job id for a new request: negative, so never one of ASVO's.
fn new_job_id() -> i64 {
    -1 - (rand::random::<u64>() >> 12) as i64
}

/// `POST {base}/stage`
pub async fn stage(
    State(app): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let f = facade(&app);
    let req: StageRequest = json_body(&headers, body, app.limits.max_body_bytes).await?;
    let files = match req.files {
        Some(files) if !files.is_empty() => files,
        _ => {
            return Err(Problem::bad_request(
                "files: the field does not exist or is not a valid non-empty array",
            ));
        }
    };
    let most = f.cfg.max_files_per_request;
    if files.len() > most {
        return Err(Problem::bad_request(format!(
            "a stage request may name at most {most} files (tape_rest.max_files_per_request); this one names {}",
            files.len()
        )));
    }
    let mut seen = HashSet::with_capacity(files.len());
    let mut mapped = Vec::with_capacity(files.len());
    for (i, file) in files.into_iter().enumerate() {
        let Some(path) = file.path else {
            return Err(Problem::bad_request(format!(
                "files[{i}].path: the field does not exist"
            )));
        };
        let m = f.mapping.to_store(&path);
        if !who.may_stage(&m.client) {
            return Err(Problem::forbidden(format!(
                "the token does not allow staging {}",
                m.client
            )));
        }
        // Duplicates go: each path appears once in the request and in its poll.
        if seen.insert(m.client.clone()) {
            mapped.push(m);
        }
    }
    let mut good = Vec::new();
    let mut failed = Vec::new();
    for m in mapped {
        match m.refused {
            Some(why) => failed.push((m.stored, why)),
            None => good.push(m.stored),
        }
    }
    // Paths the adapter would never see in a recall message fail in the result.
    if let Some(adapter) = app.adapters.current()
        && !good.is_empty()
    {
        let known = crate::api::staging::recognised(&adapter, &good)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "checking a stage request's paths with the adapter failed");
                Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error")
                    .detail("the adapter could not check the request's paths; see the daemon's log")
            })?;
        let name = adapter.info().name.clone();
        let mut kept = Vec::with_capacity(good.len());
        for (path, ok) in good.into_iter().zip(known) {
            if ok {
                kept.push(path);
            } else {
                failed.push((
                    path,
                    format!("not a path of the {name} adapter's telescope: the tape system's recall of it could never be recognised"),
                ));
            }
        }
        good = kept;
    }
    good.sort();
    let request_id = new_request_id();
    Span::current().record("job_id", request_id.as_str());
    let (stageable, refused) = (good.len(), failed.len());
    let mut job = store::NewJob {
        job_id: new_job_id(),
        notify_url: String::new(),
        files: good,
        obs: None,
        submitted_by: who.identity(),
        request_id: Some(request_id.clone()),
        failed,
    };
    for _ in 0..ID_TRIES {
        match app.store.submit(job.clone()).await {
            Ok(Intake::Created) => {
                app.throughput
                    .accepted
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(
                    request_id,
                    files = stageable,
                    refused,
                    "stage request accepted"
                );
                let location = format!("{}/stage/{request_id}", f.endpoint);
                let mut resp = (
                    StatusCode::CREATED,
                    Json(StageCreated {
                        request_id: request_id.clone(),
                    }),
                )
                    .into_response();
                if let Ok(v) = HeaderValue::from_str(&location) {
                    resp.headers_mut().insert(header::LOCATION, v);
                }
                return Ok(resp);
            }
            Ok(Intake::Duplicate) => job.job_id = new_job_id(),
            Err(e) => return Err(Problem::internal("storing the stage request", e)),
        }
    }
    Err(
        Problem::new(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable")
            .detail("no free request id was found; try again"),
    )
}

/// Looks a request up and checks the caller may see it.
async fn visible(app: &AppState, who: &Principal, id: &str) -> Result<RequestView, Problem> {
    let view = app
        .store
        .request(id)
        .await
        .map_err(|e| Problem::internal("reading the stage request", e))?
        .ok_or_else(|| Problem::not_found(id))?;
    if !who.may_see(view.submitted_by.as_deref()) {
        // Not told apart from a missing one: ids are not to be probed.
        return Err(Problem::not_found(id));
    }
    Ok(view)
}

/// `GET {base}/stage/{id}`
pub async fn poll(
    State(app): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<StageStatus>, Problem> {
    Span::current().record("job_id", id.as_str());
    let view = visible(&app, &who, &id).await?;
    Ok(Json(poll_body(facade(&app), &id, &view)))
}

fn secs(ms: i64) -> i64 {
    ms.max(0) / 1000
}

/// The poll's answer: times in Unix seconds, `state` on every file, `error` only on a
/// failed one.
fn poll_body(f: &Facade, id: &str, v: &RequestView) -> StageStatus {
    let done = v.state == JobState::Done;
    let started = v.started_ms.unwrap_or(v.created_ms);
    StageStatus {
        id: id.to_string(),
        created_at: secs(v.created_ms),
        started_at: secs(started),
        completed_at: done.then(|| secs(v.updated_ms)),
        files: v
            .files
            .iter()
            .map(|file| file_body(f, v, file, done))
            .collect(),
    }
}

fn file_body(f: &Facade, v: &RequestView, file: &RequestFile, done: bool) -> FileStatus {
    let started = v.started_ms.map(secs);
    let (state, finished, error) = if file.cancelled {
        (FileState::Canceled, file.error_ms, None)
    } else if file.ready {
        (FileState::Completed, file.ready_ms, None)
    } else if file.error {
        let msg = match file.error_msg.as_deref() {
            Some(m) if !m.is_empty() => m.to_string(),
            _ => "the tape system reported an error recalling the file".to_string(),
        };
        (FileState::Failed, file.error_ms, Some(msg))
    } else if done {
        let why = v
            .last_error
            .clone()
            .unwrap_or_else(|| format!("the request ended (code {})", v.return_code.unwrap_or(-1)));
        (FileState::Failed, Some(v.updated_ms), Some(why))
    } else if started.is_some() {
        (FileState::Started, None, None)
    } else {
        (FileState::Submitted, None, None)
    };
    FileStatus {
        path: f.mapping.to_client(&file.path),
        state,
        error,
        started_at: (state != FileState::Submitted).then(|| started.unwrap_or(secs(v.created_ms))),
        finished_at: finished.map(secs),
    }
}

/// `POST {base}/stage/{id}/cancel`
pub async fn cancel(
    State(app): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    Span::current().record("job_id", id.as_str());
    let f = facade(&app);
    let paths = paths_body(&app, &headers, body).await?;
    let view = visible(&app, &who, &id).await?;
    if !who.may_change(view.submitted_by.as_deref()) {
        return Err(Problem::forbidden(
            "only the request's submitter may cancel its files",
        ));
    }
    let stored = stageable(f, &who, &paths, "staging")?;
    let outcome = app
        .store
        .cancel_request_files(&id, &stored)
        .await
        .map_err(|e| Problem::internal("cancelling files of the stage request", e))?;
    match outcome {
        store::CancelOutcome::NoSuchRequest => Err(Problem::not_found(&id)),
        store::CancelOutcome::NotInRequest(missing) => {
            let missing: Vec<String> = missing.iter().map(|p| f.mapping.to_client(p)).collect();
            Err(
                Problem::new(StatusCode::BAD_REQUEST, "File missing from stage request").detail(
                    format!(
                        "The files {} do not belong to the STAGE request {id}. No modification has been made to this request.",
                        missing.join(", ")
                    ),
                ),
            )
        }
        store::CancelOutcome::Cancelled { job_id, unwanted } => {
            tracing::info!(
                request_id = id,
                files = paths.len(),
                "stage request files cancelled"
            );
            cancel_at_tape(&app, job_id, unwanted).await;
            Ok(empty_ok())
        }
    }
}

/// Best effort: asks the tape system to stop recalling paths nobody wants any more.
async fn cancel_at_tape(app: &AppState, job_id: i64, paths: Vec<String>) {
    if let Some(scout) = &app.scout
        && !paths.is_empty()
    {
        crate::api::staging::cancel_at_scout(app, scout, job_id, &paths).await;
    }
}

/// `DELETE {base}/stage/{id}`
pub async fn delete(
    State(app): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    Span::current().record("job_id", id.as_str());
    let view = visible(&app, &who, &id).await?;
    if !who.may_change(view.submitted_by.as_deref()) {
        return Err(Problem::forbidden(
            "only the request's submitter may delete it",
        ));
    }
    let waiting: Vec<String> = view
        .files
        .iter()
        .filter(|f| !f.ready && !f.error && view.state != JobState::Done)
        .map(|f| f.path.clone())
        .collect();
    let unwanted = app
        .store
        .unwanted_elsewhere(view.job_id, &waiting)
        .await
        .map_err(|e| Problem::internal("deleting the stage request", e))?;
    let existed = app
        .store
        .delete_job(view.job_id)
        .await
        .map_err(|e| Problem::internal("deleting the stage request", e))?;
    if !existed {
        return Err(Problem::not_found(&id));
    }
    tracing::info!(request_id = id, "stage request deleted");
    cancel_at_tape(&app, view.job_id, unwanted).await;
    Ok(empty_ok())
}

/// `POST {base}/release/{id}`: 200 whatever the id (gfal2 releases with a placeholder id,
/// and the specification makes a release fire-and-forget).
pub async fn release(
    State(app): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    Span::current().record("job_id", id.as_str());
    let f = facade(&app);
    let paths = paths_body(&app, &headers, body).await?;
    let stored = stageable(f, &who, &paths, "releasing")?;
    let owner = app
        .store
        .request_owner(&id)
        .await
        .map_err(|e| Problem::internal("releasing files", e))?;
    match owner {
        Some((_, owner)) if who.may_change(owner.as_deref()) => {
            app.store
                .release_request_files(&id, &stored)
                .await
                .map_err(|e| Problem::internal("releasing files", e))?;
            tracing::info!(request_id = id, files = paths.len(), "files released");
        }
        Some(_) => {
            return Err(Problem::forbidden(
                "only the request's submitter may release its files",
            ));
        }
        None => tracing::debug!(
            request_id = id,
            "release for an unknown request: nothing to do"
        ),
    }
    Ok(empty_ok())
}

/// `POST {base}/archiveinfo`: each path's locality from the tape system's file status,
/// asked concurrently within the slots `/filestatus/` shares; past
/// `archiveinfo_max_paths`, the rest of the list is left out of the answer.
pub async fn archive_info(
    State(app): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Vec<ArchiveInfo>>, Problem> {
    let f = facade(&app);
    let mut paths = paths_body(&app, &headers, body).await?;
    paths.truncate(f.cfg.archiveinfo_max_paths);
    let mut asked = Vec::with_capacity(paths.len());
    for p in paths {
        let m = f.mapping.to_store(&p);
        if !who.may_read(&m.client) {
            return Err(Problem::forbidden(format!(
                "the token does not allow reading {}",
                m.client
            )));
        }
        // Answered with the path as sent, which is how a client matches its files.
        asked.push((p, m));
    }
    let Some(scout) = app.scout.clone() else {
        let out = asked
            .into_iter()
            .map(|(p, _)| ArchiveInfo::error(p, "no tape system is configured"))
            .collect();
        return Ok(Json(out));
    };
    // The tape system's own paths, through the adapter's stage-path mapping.
    let to_map: Vec<String> = asked
        .iter()
        .filter(|(_, m)| m.refused.is_none())
        .map(|(_, m)| m.stored.clone())
        .collect();
    let scout_paths = match app.adapters.current() {
        Some(a) if !to_map.is_empty() => a.stage_paths(&to_map).await.map_err(|e| {
            tracing::error!(error = %e, "mapping archiveinfo paths with the adapter failed");
            Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error")
                .detail("the adapter could not map the paths; see the daemon's log")
        })?,
        _ => to_map,
    };
    let mut scout_paths = scout_paths.into_iter();
    let jobs: Vec<(String, Result<String, String>)> = asked
        .into_iter()
        .map(|(p, m)| match m.refused {
            Some(why) => (p, Err(why)),
            None => (p, Ok(scout_paths.next().unwrap_or_default())),
        })
        .collect();
    let slots = app.filestatus_slots.clone();
    let answers: Vec<ArchiveInfo> = futures::stream::iter(jobs)
        .map(|(path, target)| {
            let (scout, slots) = (scout.clone(), slots.clone());
            async move {
                let target = match target {
                    Ok(t) => t,
                    Err(why) => return ArchiveInfo::error(path, why),
                };
                let Ok(_slot) = slots.acquire_owned().await else {
                    return ArchiveInfo::error(path, "the server is stopping");
                };
                match scout.file_status(&target).await {
                    Ok(s) => ArchiveInfo::locality(path, locality(&s)),
                    Err(crate::scout::ScoutError::Refused { status: 404, .. }) => {
                        ArchiveInfo::error(path, "no such file")
                    }
                    Err(e) => {
                        tracing::warn!(path, error = %e, "Scout file status failed");
                        ArchiveInfo::locality(path, Locality::Unavailable)
                    }
                }
            }
        })
        .buffered(64)
        .collect()
        .await;
    Ok(Json(answers))
}

/// The specification's locality for Scout's file status: blocks still offline mean on tape
/// only; all online and archived mean both; online and not (yet) archived disk only.
fn locality(s: &crate::scout::FileStatus) -> Locality {
    match (s.offlineblocks > 0, s.archdone) {
        (true, _) => Locality::Tape,
        (false, Some(true)) => Locality::DiskAndTape,
        (false, _) => Locality::Disk,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_uuids_gfal2_can_hold() {
        let id = new_request_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert_ne!(id, new_request_id());
    }

    #[test]
    fn job_ids_of_requests_are_negative() {
        for _ in 0..1000 {
            assert!(new_job_id() < 0);
        }
    }

    #[test]
    fn locality_follows_the_specification() {
        let s = |off, arch| crate::scout::FileStatus {
            offlineblocks: off,
            onlineblocks: None,
            size: None,
            archdone: arch,
        };
        assert_eq!(locality(&s(3, Some(true))), Locality::Tape);
        assert_eq!(locality(&s(0, Some(true))), Locality::DiskAndTape);
        assert_eq!(locality(&s(0, Some(false))), Locality::Disk);
    }
}
