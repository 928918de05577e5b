//! Liveness and readiness, for an orchestrator or a load balancer.
//!
//! - `/livez` (and `/healthz`, its alias): the process answers and its runtime runs tasks.
//!   It checks no dependency, so a database outage never makes a supervisor restart a
//!   daemon that would recover by itself.
//! - `/readyz`: whether this daemon can do its work now: the store answers with its
//!   migrations applied, and each configured part is up (the Kafka consumer alive, at least
//!   one Scout node not ejected, the adapter loaded). 503 with a JSON body naming what is not
//!   ready otherwise.
//!
//! Invariant: every check is bounded by [`CHECK_TIMEOUT`] and they run concurrently, so a
//! probe is answered within about that time whatever hangs behind it. Neither endpoint logs
//! at info level: probes every few seconds would drown the log.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;

/// Longest a single readiness check may take before it counts as failed.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The body of `/livez`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Liveness {
    /// Always `"ok"`: an answer at all is the proof.
    pub status: &'static str,
}

/// One part of readiness.
#[derive(Debug, Serialize, ToSchema)]
pub struct Check {
    /// `store`, `kafka`, `scout` or `adapter`.
    pub name: &'static str,
    pub ready: bool,
    /// Why it is not ready; absent when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The body of `/readyz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    pub ready: bool,
    /// Every check that applies to this daemon's configuration.
    pub checks: Vec<Check>,
    /// What is not ready, in one line; absent when ready (the `errormsg` every error has).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errormsg: Option<String>,
}

/// Liveness: 200 whenever the daemon answers at all.
#[utoipa::path(get, path = "/livez", tag = "service", responses((status = 200, body = Liveness)))]
pub async fn livez() -> Json<Liveness> {
    Json(Liveness { status: "ok" })
}

/// Readiness: 200 when the store and every configured part are up, else 503 naming them.
#[utoipa::path(
    get, path = "/readyz", tag = "service",
    responses((status = 200, body = Readiness), (status = 503, body = Readiness))
)]
pub async fn readyz(State(app): State<AppState>) -> Response {
    let (store, kafka, scout, adapter) = tokio::join!(
        bounded("store", store_check(&app)),
        bounded("kafka", async { kafka_check(&app) }),
        bounded("scout", async { scout_check(&app) }),
        bounded("adapter", async { adapter_check(&app) }),
    );
    let checks: Vec<Check> = [store, kafka, scout, adapter]
        .into_iter()
        .flatten()
        .collect();
    let failing: Vec<String> = checks
        .iter()
        .filter(|c| !c.ready)
        .map(|c| format!("{}: {}", c.name, c.reason.as_deref().unwrap_or("not ready")))
        .collect();
    let ready = failing.is_empty();
    let body = Readiness {
        ready,
        checks,
        errormsg: (!ready).then(|| format!("not ready: {}", failing.join("; "))),
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// Outcome of one check: `None` when it does not apply, else why it is not ready (or
/// nothing).
type Outcome = Option<Result<(), String>>;

async fn bounded(name: &'static str, check: impl Future<Output = Outcome>) -> Option<Check> {
    let outcome = match tokio::time::timeout(CHECK_TIMEOUT, check).await {
        Ok(outcome) => outcome?,
        Err(_) => Err(format!(
            "no answer within {} s",
            CHECK_TIMEOUT.as_secs_f64()
        )),
    };
    Some(Check {
        name,
        ready: outcome.is_ok(),
        reason: outcome.err(),
    })
}

async fn store_check(app: &AppState) -> Outcome {
    Some(
        app.store
            .check_ready()
            .await
            .map_err(|e| crate::error_text::chain(&e)),
    )
}

fn kafka_check(app: &AppState) -> Outcome {
    let status = app.kafka.as_ref()?;
    if status.alive() {
        return Some(Ok(()));
    }
    let group = status.group();
    Some(Err(if group.stalled_since_ms.is_some() {
        "the consumer is stalled: messages wait and its position does not move".into()
    } else if !group.in_group {
        "the consumer is not a settled member of its group (no broker, or still joining)".into()
    } else {
        "no broker answered within the liveness window".into()
    }))
}

fn scout_check(app: &AppState) -> Outcome {
    let scout = app.scout.as_ref()?;
    let nodes = scout.node_stats();
    if nodes.iter().any(|n| !n.ejected) {
        return Some(Ok(()));
    }
    Some(Err(format!(
        "every Scout node is ejected after failures ({})",
        nodes
            .iter()
            .map(|n| n.base.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

fn adapter_check(app: &AppState) -> Outcome {
    if !app.adapters.is_configured() {
        return None;
    }
    Some(match app.adapters.current() {
        Some(_) => Ok(()),
        None => Err("the configured adapter is not loaded".into()),
    })
}
