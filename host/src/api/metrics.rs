//! `GET /metrics`: the daemon's counters, gauges and histograms in the Prometheus
//! (OpenMetrics) text format, encoded by `prometheus-client`.
//!
//! Invariant: a scrape reads figures the daemon keeps as it works and never scans a table.
//! Counters and histograms live where the work is done (the engine's `EngineCounters`, the
//! store's intake writers, the Scout client, the Kafka consumer, the adapter's
//! `AdapterMetrics`); a scrape registers them, or a snapshot of them, in a registry of its
//! own. The store's pool gauges come from the pools' own counts, without a query. The
//! store's job, file and outbox totals are the one figure that needs a query: a scrape
//! serves the last snapshot and, when it is older than [`STORE_REFRESH`], starts one
//! refresh in the background, so a scrape costs the same with ten jobs or ten million. No
//! label grows with the data: labels are states, outcomes, the API's routes and status
//! codes, the configured Scout nodes and the Scout operations, the adapter's exports and
//! kinds of failure, and the store's pools. Durations are in seconds, their bucket edges
//! from [`crate::histograms`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use super::AppState;
use crate::store::{OutboxStats, Stats};

/// How old the store's totals may be before a scrape asks for new ones.
pub const STORE_REFRESH: Duration = Duration::from_secs(15);

/// The store's totals as last read together.
#[derive(Debug, Clone)]
pub(crate) struct Totals {
    pub(crate) stats: Stats,
    pub(crate) outbox: OutboxStats,
}

/// The store's totals as last read, shared by scrapes.
#[derive(Default)]
pub struct StoreSnapshot {
    inner: Mutex<SnapshotState>,
}

#[derive(Default)]
struct SnapshotState {
    totals: Option<(Instant, Totals)>,
    refreshing: bool,
}

impl StoreSnapshot {
    /// The last totals and their age; starts a refresh when they are missing or stale.
    pub(crate) fn read(
        self: &Arc<Self>,
        store: &crate::store::Store,
    ) -> Option<(Duration, Totals)> {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let current = s.totals.as_ref().map(|(at, t)| (at.elapsed(), t.clone()));
        let stale = current
            .as_ref()
            .is_none_or(|(age, _)| *age >= STORE_REFRESH);
        if stale && !s.refreshing {
            s.refreshing = true;
            let (me, store) = (self.clone(), store.clone());
            tokio::spawn(async move {
                let fresh = match store.stats().await {
                    Ok(stats) => store
                        .outbox_stats()
                        .await
                        .map(|outbox| Totals { stats, outbox }),
                    Err(e) => Err(e),
                };
                let mut s = me.inner.lock().unwrap_or_else(|e| e.into_inner());
                s.refreshing = false;
                match fresh {
                    Ok(totals) => s.totals = Some((Instant::now(), totals)),
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the store's totals for /metrics failed")
                    }
                }
            });
        }
        current
    }
}

type Labels = Vec<(String, String)>;

/// Answers by method, route and status code: bounded labels, since the route is one of
/// the API's paths (trailing slash dropped) or `other`.
pub type Responses = Family<Labels, prometheus_client::metrics::counter::Counter>;

fn route_of(path: &str) -> &'static str {
    let p = match path.trim_end_matches('/') {
        "" => "/",
        p => p,
    };
    if p.starts_with("/docs") {
        return "/docs";
    }
    if let Some(route) = super::tape_rest::route_label(p) {
        return route;
    }
    // The routes are the access table's (one list of the API's endpoints), without their
    // trailing slash.
    super::access::RULES
        .iter()
        .map(|(_, route, _)| match route.trim_end_matches('/') {
            "" => "/",
            r => r,
        })
        .find(|r| *r == p)
        .unwrap_or("other")
}

/// Middleware: counts every answer in [`Responses`].
pub async fn count_responses(
    State(responses): State<Responses>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method: &'static str = match req.method().as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        "PATCH" => "PATCH",
        _ => "other",
    };
    let route = route_of(req.uri().path());
    let resp = next.run(req).await;
    responses
        .get_or_create(&labels(&[
            ("method", method),
            ("route", route),
            ("status", resp.status().as_str()),
        ]))
        .inc();
    resp
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

fn counter(r: &mut Registry, name: &str, help: &str, v: u64) {
    r.register(name, help, ConstCounter::new(v));
}

fn gauge(r: &mut Registry, name: &str, help: &str, v: i64) {
    r.register(name, help, ConstGauge::new(v));
}

/// One family of gauges, one per label set.
fn gauges(r: &mut Registry, name: &str, help: &str, values: &[(Labels, i64)]) {
    let family = Family::<Labels, Gauge>::default();
    for (l, v) in values {
        family.get_or_create(l).set(*v);
    }
    r.register(name, help, family);
}

/// The registry of one scrape, filled from the daemon's live figures.
fn collect(app: &AppState) -> Registry {
    let mut r = Registry::with_prefix("staged");
    r.register(
        "build",
        "The build serving",
        Info::new(labels(&[("version", env!("CARGO_PKG_VERSION"))])),
    );
    r.register(
        "adapter",
        "The telescope adapter in service",
        Info::new(match app.adapters.current() {
            Some(a) => labels(&[
                ("name", &a.info().name),
                ("version", &a.info().version),
                ("contract", a.wit_version()),
            ]),
            None => labels(&[("name", "")]),
        }),
    );

    r.register(
        "http_responses",
        "HTTP answers by method, route and status",
        app.http_responses.clone(),
    );

    store_figures(&mut r, app);
    if let Some((age, t)) = app.metrics_store.read(&app.store) {
        let s = &t.stats;
        gauges(
            &mut r,
            "jobs",
            "Jobs in the store by state",
            &[
                (labels(&[("state", "complete")]), s.completed_jobs),
                (labels(&[("state", "incomplete")]), s.incomplete_jobs),
            ],
        );
        gauges(
            &mut r,
            "files",
            "Files of stored jobs by state",
            &[
                (labels(&[("state", "ready")]), s.ready_files),
                (labels(&[("state", "failed")]), s.error_files),
                (labels(&[("state", "waiting")]), s.waiting_files),
            ],
        );
        gauge(
            &mut r,
            "callbacks_pending",
            "Callbacks queued, not yet delivered or given up",
            t.outbox.pending,
        );
        gauge(
            &mut r,
            "callbacks_overdue",
            "Queued callbacks due for over a minute that no one is attempting",
            t.outbox.overdue,
        );
        r.register_with_unit(
            "store_totals_age",
            "Age of the job, file and callback totals above",
            Unit::Seconds,
            ConstGauge::new(age.as_secs_f64()),
        );
    }

    if let Some(e) = &app.engine_counters {
        use std::sync::atomic::Ordering::Relaxed;
        let c = |a: &std::sync::atomic::AtomicU64| a.load(Relaxed);
        counter(
            &mut r,
            "stage_calls_ok",
            "Stage calls Scout accepted",
            c(&e.stage_calls_ok),
        );
        counter(
            &mut r,
            "stage_calls_failed",
            "Stage calls that failed (each retried)",
            c(&e.stage_calls_failed),
        );
        counter(
            &mut r,
            "observations_resolved",
            "Observations the adapter turned into files",
            c(&e.resolved),
        );
        counter(
            &mut r,
            "callbacks_delivered",
            "Callbacks answered 200",
            c(&e.callbacks_delivered),
        );
        counter(
            &mut r,
            "callback_attempts_failed",
            "Callback attempts that failed (retried)",
            c(&e.callbacks_failed_attempts),
        );
        counter(
            &mut r,
            "callbacks_abandoned",
            "Callbacks given up (an expired job's grace ran out)",
            c(&e.callbacks_abandoned),
        );
        counter(
            &mut r,
            "jobs_expired",
            "Jobs that expired before their files were staged",
            c(&e.expired),
        );
        counter(
            &mut r,
            "restages_deferred",
            "Restages put off while the Kafka consumer was behind",
            c(&e.restages_deferred),
        );
        r.register_with_unit(
            "callback_delivery",
            "Time from a callback being queued (its job decided) to its delivery",
            Unit::Seconds,
            e.callback_delivery_seconds.clone(),
        );
    }

    if let Some(k) = &app.kafka {
        let c = k.counters();
        counter(
            &mut r,
            "kafka_messages",
            "Recall messages read, redeliveries included",
            c.messages,
        );
        counter(
            &mut r,
            "kafka_batches",
            "Batches applied, each in one transaction",
            c.batches,
        );
        counter(
            &mut r,
            "kafka_events",
            "Well-formed events handed to the store",
            c.events,
        );
        counter(
            &mut r,
            "kafka_unknown",
            "Messages about files no job holds",
            c.unknown,
        );
        counter(
            &mut r,
            "kafka_malformed",
            "Messages that are not recall messages",
            c.malformed,
        );
        counter(
            &mut r,
            "kafka_stale",
            "Recalls older than the job waiting for the file",
            c.stale,
        );
        counter(
            &mut r,
            "kafka_store_failures",
            "Failed attempts to apply a batch",
            c.store_failures,
        );
        counter(
            &mut r,
            "kafka_commits",
            "Offset commits the broker confirmed",
            c.commits,
        );
        counter(
            &mut r,
            "kafka_commit_failures",
            "Offset commits that failed",
            c.commit_failures,
        );
        counter(
            &mut r,
            "kafka_consumer_errors",
            "Errors the consumer reported",
            c.consumer_errors,
        );
        gauge(
            &mut r,
            "kafka_alive",
            "1 when the consumer is alive in its group",
            i64::from(k.alive()),
        );
        let g = k.group();
        if let Some(lag) = g.lag {
            gauge(
                &mut r,
                "kafka_lag",
                "Messages waiting past the committed offsets",
                lag,
            );
        }
        if let Some(last) = k.last_message_ms() {
            let age = (crate::store::now_ms() - last).max(0) as f64 / 1000.0;
            r.register_with_unit(
                "kafka_last_message_age",
                "Time since the last recall message",
                Unit::Seconds,
                ConstGauge::new(age),
            );
        }
    }

    if let Some(scout) = &app.scout {
        let nodes = scout.node_stats();
        let node = |n: &crate::scout::NodeStats| labels(&[("node", &n.base)]);
        gauges(
            &mut r,
            "scout_node_ejected",
            "1 while a Scout node is out after failures",
            &nodes
                .iter()
                .map(|n| (node(n), i64::from(n.ejected)))
                .collect::<Vec<_>>(),
        );
        let calls = Family::<Labels, prometheus_client::metrics::counter::Counter>::default();
        for n in &nodes {
            let mut ok = node(n);
            ok.push(("outcome".into(), "success".into()));
            calls.get_or_create(&ok).inc_by(n.successes);
            let mut bad = node(n);
            bad.push(("outcome".into(), "failure".into()));
            calls.get_or_create(&bad).inc_by(n.failures);
        }
        r.register("scout_calls", "Scout calls by node and outcome", calls);
        let c = scout.counters();
        counter(&mut r, "scout_logins", "Scout logins", c.logins);
        counter(&mut r, "scout_retries", "Scout calls retried", c.retries);
        counter(
            &mut r,
            "scout_refusals",
            "Stage requests Scout refused for good",
            c.refusals,
        );
        r.register_with_unit(
            "scout_request",
            "Time of each HTTP exchange with a Scout node, by node and operation",
            Unit::Seconds,
            scout.request_seconds().clone(),
        );
    }

    if let Some(m) = app.adapters.metrics() {
        r.register_with_unit(
            "adapter_call",
            "Time of each adapter call, by export",
            Unit::Seconds,
            m.call_seconds.clone(),
        );
        r.register(
            "adapter_call_failures",
            "Adapter calls that failed, by export and reason (timeout, trap, over a limit...)",
            m.failures.clone(),
        );
    }
    r
}

/// The store's figures that need no query: the intake writers' histograms and the
/// connection pools' counts.
fn store_figures(r: &mut Registry, app: &AppState) {
    let intake = app.store.intake_metrics();
    r.register(
        "intake_batch_jobs",
        "Jobs per intake transaction (the group commit's batch)",
        intake.batch_jobs.clone(),
    );
    r.register_with_unit(
        "intake_commit",
        "Time to write and commit one intake transaction",
        Unit::Seconds,
        intake.commit_seconds.clone(),
    );
    let pools = app.store.pool_stats();
    let conns = Family::<Labels, Gauge>::default();
    let max = Family::<Labels, Gauge>::default();
    for p in &pools {
        let at = |state: &str| labels(&[("pool", p.pool), ("state", state)]);
        conns
            .get_or_create(&at("in_use"))
            .set(gauge_value(p.in_use));
        conns.get_or_create(&at("idle")).set(gauge_value(p.idle));
        max.get_or_create(&labels(&[("pool", p.pool)]))
            .set(gauge_value(p.max));
    }
    r.register(
        "store_connections",
        "The store's database connections by pool and state",
        conns,
    );
    r.register(
        "store_connections_max",
        "The most connections each pool opens",
        max,
    );
}

fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The daemon's metrics, OpenMetrics text.
#[utoipa::path(get, path = "/metrics", tag = "service", responses((status = 200, description = "Prometheus/OpenMetrics text exposition", content_type = "application/openmetrics-text")))]
pub async fn metrics(State(app): State<AppState>) -> Response {
    let registry = collect(&app);
    let mut text = String::new();
    if let Err(e) = encode(&mut text, &registry) {
        return super::error::ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the metrics failed: {e}"),
        )
        .into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
