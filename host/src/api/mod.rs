//! The HTTP API: the original service's endpoints, wire-compatible (every path answers with
//! and without the trailing slash), plus `/openapi.json`, `/docs`, and the probes `/livez`,
//! `/healthz` and `/readyz`.
//!
//! Invariant: whatever the input, the answer is a JSON body with a status code; errors carry
//! `errormsg`. Unknown paths, wrong methods and even a panicking handler end that way.

pub mod access;
mod admin;
pub mod dashboard;
mod error;
mod health;
mod info;
mod input;
pub mod metrics;
pub mod models;
mod rate_limit;
pub mod serve;
mod staging;
pub mod tape_rest;
pub mod throughput;
pub mod tls;

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::DefaultBodyLimit;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use serde_json::json;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

pub use error::ApiError;

use crate::adapter::Adapters;
use crate::config::{Config, ServerConfig};
use crate::kafka::IngestStatus;
use crate::scout::ScoutClient;
use crate::store::Store;

/// Input limits, from `[server]`.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_files_per_job: usize,
    pub max_filestatus_files: usize,
    pub max_path_bytes: usize,
}

impl Limits {
    pub fn from_config(server: &ServerConfig) -> Self {
        Limits {
            max_body_bytes: server.max_body_bytes,
            max_files_per_job: server.max_files_per_job,
            max_filestatus_files: server.max_filestatus_files,
            max_path_bytes: server.max_path_bytes,
        }
    }
}

/// What every handler can reach: one `Arc`, since axum clones the state for every request
/// (and cloning each shared part on its own was about 6 % of the daemon's CPU per
/// submission).
#[derive(Clone)]
pub struct AppState(Arc<AppParts>);

impl std::ops::Deref for AppState {
    type Target = AppParts;

    fn deref(&self) -> &AppParts {
        &self.0
    }
}

impl From<AppParts> for AppState {
    fn from(parts: AppParts) -> Self {
        AppState(Arc::new(parts))
    }
}

impl AppState {
    /// The state of a service with only a store (no adapter, Scout, Kafka or engine).
    pub fn new(store: Store, config: &Config) -> Self {
        AppParts::new(store, config).into()
    }
}

/// The parts of [`AppState`], filled in while the service is assembled.
pub struct AppParts {
    pub store: Store,
    pub limits: Arc<Limits>,
    pub reports_dir: Arc<PathBuf>,
    /// The telescope adapter in service, if one is configured.
    pub adapters: Adapters,
    /// The tape system's API, when `[scout]` names nodes.
    pub scout: Option<ScoutClient>,
    /// The Kafka consumer's state, when `[kafka]` names brokers.
    pub kafka: Option<IngestStatus>,
    /// Scout file-status calls in flight, shared by every `/filestatus/` request so that
    /// many requests at once cost Scout no more than one.
    pub filestatus_slots: Arc<tokio::sync::Semaphore>,
    /// `callbacks.allow`: where a job's `notify_url` may point.
    pub callback_allow: Arc<crate::allow_list::AllowList>,
    /// The engine's counters, once it runs (for `/metrics`).
    pub engine_counters: Option<Arc<crate::engine::EngineCounters>>,
    /// The store's totals as `/metrics` last read them.
    pub metrics_store: Arc<metrics::StoreSnapshot>,
    /// Answers given, by method, route and status (for `/metrics`).
    pub http_responses: metrics::Responses,
    /// `[server.auth]`'s tokens (replaced on SIGHUP) and the submission buckets.
    pub auth: access::Auth,
    /// The last hour's throughput, for the dashboard.
    pub throughput: Arc<throughput::Throughput>,
    /// The counters the throughput is sampled from, once the engine and ingest run.
    pub throughput_sources: throughput::Sources,
    /// Unsafe settings in force, shown on the dashboard.
    pub warnings: dashboard::Warnings,
    /// The WLCG Tape REST API, when `[tape_rest]` turns it on.
    pub tape_rest: Option<Arc<tape_rest::Facade>>,
}

impl AppParts {
    pub fn new(store: Store, config: &Config) -> Self {
        AppParts {
            store,
            limits: Arc::new(Limits::from_config(&config.server)),
            reports_dir: Arc::new(config.reports.dir.clone()),
            adapters: Adapters::none(),
            scout: None,
            kafka: None,
            callback_allow: Arc::new(config.callbacks.allow.clone()),
            engine_counters: None,
            metrics_store: Arc::default(),
            http_responses: metrics::Responses::default(),
            auth: access::Auth::new(crate::auth::TokenTable::from_config(&config.server.auth)),
            throughput: Arc::default(),
            throughput_sources: throughput::Sources::default(),
            warnings: Arc::new(config.warnings()),
            tape_rest: None,
            filestatus_slots: Arc::new(tokio::sync::Semaphore::new(
                config.server.filestatus_concurrency,
            )),
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "staged",
        description = "Stages radio-telescope data from the tape archive onto disk and calls back when it is ready. Wire-compatible with the MWA staging service."
    ),
    paths(
        staging::create,
        staging::status,
        staging::delete,
        info::ping,
        health::livez,
        health::readyz,
        metrics::metrics,
        info::stats,
        info::job_list,
        info::failed_list,
        info::failed_job,
        admin::reload_adapter,
        info::file_status,
        dashboard::data,
    ),
    components(schemas(
        models::NewJob,
        models::JobStatus,
        models::JobList,
        models::GlobalStatistics,
        models::KafkaConsumerStats,
        models::ErrorResult,
        health::Liveness,
        health::Readiness,
        health::Check,
        info::FileStatusRequest,
        dashboard::Dashboard,
        dashboard::Totals,
        dashboard::AdapterView,
        dashboard::KafkaView,
        dashboard::ScoutNode,
        dashboard::JobInFlight,
        dashboard::Outbox,
        dashboard::Callback,
        dashboard::FinishedJob,
        dashboard::ThroughputView
    ))
)]
struct ApiDoc;

/// The OpenAPI document of this API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    access::document(&mut doc);
    doc
}

/// Registers `path` (which ends in `/`) and its twin without the slash.
fn both(router: Router<AppState>, path: &str, route: MethodRouter<AppState>) -> Router<AppState> {
    let bare = path.trim_end_matches('/');
    router.route(path, route.clone()).route(bare, route)
}

pub fn router(state: AppState) -> Router {
    let responses = state.http_responses.clone();
    let auth = state.auth.clone();
    let mut r = Router::new();
    r = both(
        r,
        "/staging/",
        post(staging::create)
            .get(staging::status)
            .delete(staging::delete),
    );
    r = both(r, "/ping/", get(info::ping));
    r = r.route("/livez", get(health::livez));
    r = r.route("/healthz", get(health::livez));
    r = r.route("/readyz", get(health::readyz));
    r = r.route("/metrics", get(metrics::metrics));
    r = both(r, "/get_stats/", get(info::stats));
    r = both(r, "/get_joblist/", get(info::job_list));
    r = both(r, "/get_failed_joblist/", get(info::failed_list));
    r = both(r, "/get_failed_job/", get(info::failed_job));
    r = both(r, "/filestatus/", post(info::file_status));

    r = r.route("/admin/adapter/reload", post(admin::reload_adapter));
    r = r.route("/", get(dashboard::page));
    r = r.route("/dashboard.js", get(dashboard::script));
    r = r.route("/dashboard.json", get(dashboard::data));
    // Served by our handler, not SwaggerUi's, because the adapter's schema is part of it.
    r = r.route("/openapi.json", get(admin::openapi_json));
    // On the routes so far (so each request's matched path is known); the documentation
    // UI below is static and open.
    r = r.route_layer(axum::middleware::from_fn_with_state(auth, access::enforce));
    let docs: Router<AppState> = SwaggerUi::new("/docs")
        .config(utoipa_swagger_ui::Config::new(["/openapi.json"]))
        .into();
    // The Tape REST API decides its own access (by token and path, see its `principal`).
    if let Some(facade) = &state.tape_rest {
        r = r.merge(tape_rest::routes(&state, facade));
    }
    r.merge(docs)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        // Bodies are bounded by our own reader (413 as JSON), not axum's default.
        .layer(DefaultBodyLimit::disable())
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request<Body>| {
                    tracing::info_span!(
                        "request",
                        method = %req.method(),
                        path = %req.uri().path(),
                        job_id = tracing::field::Empty,
                        token = tracing::field::Empty,
                    )
                })
                .on_request(())
                .on_response(
                    tower_http::trace::DefaultOnResponse::new().level(tracing::Level::DEBUG),
                )
                .on_failure(()),
        )
        .layer(CatchPanicLayer::custom(panic_response))
        // Outermost, so that even a panic's 500 is counted.
        .layer(axum::middleware::from_fn_with_state(
            responses,
            metrics::count_responses,
        ))
}

async fn not_found() -> ApiError {
    ApiError::not_found("Not Found")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    // The panic message is logged by the panic hook; the client gets no internals.
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        axum::Json(json!({ "errormsg": "internal error, see the daemon's log" })),
    )
        .into_response()
}
