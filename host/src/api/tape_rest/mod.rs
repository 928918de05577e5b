//! The WLCG Tape REST API v1 (`[tape_rest]`): stage, poll, cancel, delete, release and
//! archiveinfo, for FTS, gfal2 and Rucio, on the same store, engine and ingest as the ASVO
//! API (see `store::requests` for how a stage request maps onto a job).
//!
//! Invariants:
//! - Every error is RFC 7807 `application/problem+json` with `status` and `title` (and
//!   `detail` where there is more to say), whatever produced it: a handler, an extractor,
//!   a body that could not be read. Unknown paths under the base path are 404 and wrong
//!   methods 405 with the route's `Allow`, in the same form.
//! - A 201 for a stage request is sent only after the request and all its files
//!   committed (the ASVO intake's group commit); a file that cannot be staged is stored
//!   failed and reported in the poll, never a reason to refuse the request.
//! - Who may do what is decided in [`principal`] only; the discovery document is open.
//! - Every path is given with and without a trailing slash.

mod handlers;
pub mod paths;
pub mod principal;
pub mod wire;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, any, get, post};

use super::{ApiError, AppState};
use crate::config::{Config, TapeRestConfig};
use paths::Mapping;

/// The discovery document's path, at the host root (RFC 8615; gfal2 never adds a prefix).
pub const WELL_KNOWN: &str = "/.well-known/wlcg-tape-rest-api";

/// The facade's settings in force.
pub struct Facade {
    pub cfg: TapeRestConfig,
    /// `{public_url}{base_path}`: the discovery document's endpoint.
    pub endpoint: String,
    pub mapping: Mapping,
    pub verifier: principal::Verifiers,
}

impl Facade {
    /// `None` when `[tape_rest]` is off. `listening` is the address the server is bound to
    /// (the public URL's default).
    pub fn from_config(
        config: &Config,
        listening: std::net::SocketAddr,
    ) -> anyhow::Result<Option<Facade>> {
        let cfg = &config.tape_rest;
        if !cfg.enabled {
            return Ok(None);
        }
        let public = if cfg.public_url.is_empty() {
            let scheme = if config.server.tls.is_some() {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{listening}")
        } else {
            cfg.public_url.trim_end_matches('/').to_string()
        };
        Ok(Some(Facade {
            cfg: cfg.clone(),
            endpoint: format!("{public}{}", cfg.base_path),
            mapping: Mapping::new(cfg, config.server.max_path_bytes),
            verifier: principal::Verifiers::from_config(config)?,
        }))
    }
}

/// A problem (RFC 7807), the facade's only error form.
#[derive(Debug)]
pub struct Problem {
    pub status: StatusCode,
    pub title: String,
    pub detail: Option<String>,
    /// For 405: the route's methods.
    pub allow: Option<&'static str>,
    /// For 401: ask for a bearer token.
    pub challenge: bool,
}

impl Problem {
    pub fn new(status: StatusCode, title: impl Into<String>) -> Problem {
        Problem {
            status,
            title: title.into(),
            detail: None,
            allow: None,
            challenge: false,
        }
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Problem {
        self.detail = Some(detail.into());
        self
    }

    pub fn bad_request(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::BAD_REQUEST, "JSON Validation error").detail(detail)
    }

    pub fn forbidden(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::FORBIDDEN, "Forbidden").detail(detail)
    }

    pub fn not_found(id: &str) -> Problem {
        Problem::new(StatusCode::NOT_FOUND, "Stage request not found")
            .detail(format!("No stage request with id {id}"))
    }

    /// A store failure: logged in full, answered without internals.
    pub fn internal(context: &str, err: crate::store::StoreError) -> Problem {
        let e = ApiError::internal(context, err);
        Problem::new(e.status, reason(e.status)).detail(e.message)
    }
}

fn reason(status: StatusCode) -> &'static str {
    status.canonical_reason().unwrap_or("Error")
}

impl From<ApiError> for Problem {
    fn from(e: ApiError) -> Problem {
        // A body that is not the expected JSON is a 400 here (422 is the ASVO API's).
        let status = match e.status {
            StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
            s => s,
        };
        let title = match status {
            StatusCode::BAD_REQUEST => "JSON Validation error",
            s => reason(s),
        };
        Problem::new(status, title).detail(e.message)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = wire::ProblemBody {
            kind: "about:blank",
            title: self.title,
            status: self.status.as_u16(),
            detail: self.detail,
        };
        let body = serde_json::to_string(&body).expect("strings and integers serialize");
        let mut resp = (self.status, body).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(allow) = self.allow {
            h.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        if self.challenge {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"staged\""),
            );
        }
        resp
    }
}

/// Registers `path` with and without a trailing slash; other methods get 405 with `allow`.
fn both(
    router: Router<AppState>,
    path: &str,
    route: MethodRouter<AppState>,
    allow: &'static str,
) -> Router<AppState> {
    let route = route.fallback(move || async move {
        let mut p = Problem::new(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
            .detail(format!("this endpoint accepts {allow}"));
        p.allow = Some(allow);
        p
    });
    router
        .route(path, route.clone())
        .route(&format!("{path}/"), route)
}

/// The facade's routes, to merge into the API's router.
pub fn routes(state: &AppState, facade: &Facade) -> Router<AppState> {
    let base = facade.cfg.base_path.as_str();
    let mut r = Router::new();
    r = both(r, &format!("{base}/stage"), post(handlers::stage), "POST");
    r = both(
        r,
        &format!("{base}/stage/{{id}}"),
        get(handlers::poll).delete(handlers::delete),
        "GET, DELETE",
    );
    r = both(
        r,
        &format!("{base}/stage/{{id}}/cancel"),
        post(handlers::cancel),
        "POST",
    );
    r = both(
        r,
        &format!("{base}/release/{{id}}"),
        post(handlers::release),
        "POST",
    );
    r = both(
        r,
        &format!("{base}/archiveinfo"),
        post(handlers::archive_info),
        "POST",
    );
    r = r.route(&format!("{base}/{{*rest}}"), any(unknown));
    r = r.route(base, any(unknown));
    let r = r.route_layer(axum::middleware::from_fn_with_state(
        state.clone(),
        principal::authenticate,
    ));
    // The discovery document is open: a client reads it before it knows where to send a
    // token.
    let discovery = Router::new().route(
        WELL_KNOWN,
        get(handlers::discovery).fallback(|| async {
            let mut p = Problem::new(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
            p.allow = Some("GET");
            p
        }),
    );
    r.merge(discovery)
        .layer(axum::middleware::from_fn(as_problem))
}

/// The facade's route for `/metrics`' labels (bounded: one per endpoint, ids left out),
/// from the path's last segments, since the base path is configured.
pub fn route_label(path: &str) -> Option<&'static str> {
    if path == WELL_KNOWN {
        return Some(WELL_KNOWN);
    }
    let segments: Vec<&str> = path.rsplit('/').take(3).collect();
    match segments.as_slice() {
        ["stage", ..] => Some("tape_rest:/stage"),
        ["archiveinfo", ..] => Some("tape_rest:/archiveinfo"),
        ["cancel", _, "stage"] => Some("tape_rest:/stage/{id}/cancel"),
        [_, "stage", ..] => Some("tape_rest:/stage/{id}"),
        [_, "release", ..] => Some("tape_rest:/release/{id}"),
        _ => None,
    }
}

async fn unknown() -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "Not Found").detail("no such Tape REST API endpoint")
}

/// Most bytes of a non-problem error body read to turn it into a problem.
const ERROR_BODY_MAX: usize = 64 * 1024;

/// Turns any error answer not already a problem (an extractor's rejection, a body the
/// reader refused) into one, keeping its status and message.
async fn as_problem(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_problem = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
    if status.as_u16() < 400 || is_problem {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, ERROR_BODY_MAX)
        .await
        .unwrap_or_default();
    let detail = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| {
            v.get("errormsg")
                .and_then(|m| m.as_str())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| String::from_utf8_lossy(&bytes).trim().to_string());
    let mut p = Problem::new(status, reason(status));
    if !detail.is_empty() {
        p = p.detail(detail);
    }
    let mut out = p.into_response();
    // Keep what the original answer said about retrying or closing.
    for name in [header::RETRY_AFTER, header::CONNECTION, header::ALLOW] {
        if let Some(v) = parts.headers.get(&name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    out
}

/// An empty 200, the specification's answer to cancel, delete and release.
fn empty_ok() -> Response {
    (StatusCode::OK, Body::empty()).into_response()
}

#[cfg(test)]
mod tests {
    use super::route_label;

    #[test]
    fn metrics_labels_leave_ids_out() {
        for (path, label) in [
            ("/api/v1/stage", Some("tape_rest:/stage")),
            ("/api/v1/stage/6f1c-id", Some("tape_rest:/stage/{id}")),
            (
                "/api/v1/stage/6f1c-id/cancel",
                Some("tape_rest:/stage/{id}/cancel"),
            ),
            (
                "/api/v1/release/gfal2-placeholder-id",
                Some("tape_rest:/release/{id}"),
            ),
            ("/api/v1/archiveinfo", Some("tape_rest:/archiveinfo")),
            (super::WELL_KNOWN, Some(super::WELL_KNOWN)),
            ("/staging", None),
            ("/get_stats", None),
        ] {
            assert_eq!(route_label(path), label, "{path}");
        }
    }
}
