//! A simulator of the tape system's Scout API, served over real HTTP, with the Kafka side
//! effects of staging. It is a test double (tests, `staged-bench`, the demo), never on the
//! production path.
//!
//! What it keeps true, as the real system does:
//! - Every call but login needs a live Bearer token; a missing, unknown or expired one is 403.
//! - A body over `max_body_bytes` (4 MiB) is refused with 413 before it is parsed.
//! - Every staged path yields exactly one Kafka message in the production JSON format on the
//!   request's topic: at once for a file already on disk, otherwise after `recall_delay`
//!   (unless cancelled first), with an `Error` for a configurable fraction of recalls.
//! - All nodes share one tape system (files, and tokens unless `per_node_tokens`, when a
//!   token is good only on the node that issued it); latency and failures are per node.
//! - A node can be taught to misbehave: slow answers, 503s, 403s to valid tokens (a 403
//!   storm), and 200 answers whose body is not JSON (a proxy's error page).

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use futures::StreamExt;
use rand::Rng;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Recall messages in flight to the broker at once.
const PUBLISH_CONCURRENCY: usize = 1000;

/// How the simulated tape system behaves.
#[derive(Debug, Clone)]
pub struct SimSettings {
    pub username: String,
    pub password: String,
    pub token_ttl: Duration,
    pub max_body_bytes: usize,
    /// Time from a stage request to the message for a file that was on tape.
    pub recall_delay: Duration,
    /// Recalls of one request are reported one by one over this long (zero: all at once).
    pub recall_spread: Duration,
    /// Fraction (0..=1) of recalls that fail and are reported with an `Error`. Files set
    /// `Missing` always fail.
    pub error_fraction: f64,
    /// Bootstrap servers to publish recall messages to; `None`: no messages.
    pub kafka_brokers: Option<String>,
    /// Topic used when a stage request names none.
    pub default_topic: String,
    pub login_path: String,
    pub file_path: String,
    pub stage_path: String,
    pub cancel_path: String,
    pub cachestate_path: String,
    /// Tokens are good only on the node that issued them.
    pub per_node_tokens: bool,
    /// How long a file-status answer takes, counted as in flight (to see how many a client
    /// keeps open at once).
    pub file_status_delay: Duration,
}

impl Default for SimSettings {
    fn default() -> Self {
        Self {
            username: "scout".into(),
            password: "scout-pw".into(),
            token_ttl: Duration::from_secs(3600),
            max_body_bytes: 4 * 1024 * 1024,
            recall_delay: Duration::from_millis(100),
            recall_spread: Duration::ZERO,
            error_fraction: 0.0,
            kafka_brokers: None,
            default_topic: "recalls".into(),
            login_path: "/v1/security/login".into(),
            file_path: "/v1/file".into(),
            stage_path: "/v1/request/batchstage".into(),
            cancel_path: "/v1/request/cancelbatchstage".into(),
            cachestate_path: "/v1/fscache".into(),
            per_node_tokens: false,
            file_status_delay: Duration::ZERO,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileState {
    Offline,
    Online,
    /// Unknown to the tape system: file status answers 404.
    Missing,
}

/// The simulated tape system; serve it on as many listeners (nodes) as wanted.
#[derive(Clone)]
pub struct ScoutSim {
    shared: Arc<Shared>,
}

struct Shared {
    settings: SimSettings,
    /// Token to (issued, issuing node).
    tokens: Mutex<HashMap<String, (Instant, usize)>>,
    nodes_served: AtomicUsize,
    files: Mutex<HashMap<String, FileState>>,
    cancelled: Mutex<HashSet<String>>,
    cache_state: Mutex<Value>,
    producer: Option<FutureProducer>,
    logins: AtomicU64,
    stage_requests: AtomicU64,
    staged_paths: AtomicU64,
    largest_stage_paths: AtomicUsize,
    largest_stage_body: AtomicUsize,
    cancel_requests: AtomicU64,
    published: AtomicU64,
    publish_failures: AtomicU64,
    file_status_requests: AtomicU64,
    file_status_in_flight: AtomicUsize,
    most_file_status_in_flight: AtomicUsize,
}

/// Per-node behaviour and counters.
#[derive(Default)]
pub struct NodeControl {
    id: usize,
    latency_ms: AtomicU64,
    /// Failure fraction in millionths; failures answer 503.
    fail_ppm: AtomicU64,
    /// Fraction in millionths of authenticated requests answered 403 whatever the token.
    forbid_ppm: AtomicU64,
    /// Fraction in millionths of requests answered 200 with a body that is not JSON.
    garbage_ppm: AtomicU64,
    hits: AtomicU64,
    forbidden: AtomicU64,
}

fn ppm(fraction: f64) -> u64 {
    (fraction.clamp(0.0, 1.0) * 1e6) as u64
}

fn happens(ppm: &AtomicU64) -> bool {
    let ppm = ppm.load(Ordering::Relaxed);
    ppm > 0 && rand::rng().random_range(0..1_000_000) < ppm
}

/// One node serving the simulator on a listener.
pub struct SimNode {
    pub addr: SocketAddr,
    control: Arc<NodeControl>,
    task: JoinHandle<()>,
}

impl SimNode {
    /// The node's base URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Delay every answer of this node by `latency`.
    pub fn set_latency(&self, latency: Duration) {
        self.control
            .latency_ms
            .store(latency.as_millis() as u64, Ordering::Relaxed);
    }

    /// Answer this fraction (0..=1) of requests with 503.
    pub fn set_failure_fraction(&self, fraction: f64) {
        self.control
            .fail_ppm
            .store(ppm(fraction), Ordering::Relaxed);
    }

    /// Answer this fraction (0..=1) of authenticated requests with 403, however fresh the
    /// token (logins still work).
    pub fn set_forbidden_fraction(&self, fraction: f64) {
        self.control
            .forbid_ppm
            .store(ppm(fraction), Ordering::Relaxed);
    }

    /// Answer this fraction (0..=1) of requests, logins included, with 200 and an HTML page.
    pub fn set_garbage_fraction(&self, fraction: f64) {
        self.control
            .garbage_ppm
            .store(ppm(fraction), Ordering::Relaxed);
    }

    /// Requests this node answered with 403.
    pub fn forbidden(&self) -> u64 {
        self.control.forbidden.load(Ordering::Relaxed)
    }

    /// Requests this node received.
    pub fn hits(&self) -> u64 {
        self.control.hits.load(Ordering::Relaxed)
    }

    /// Stops serving; later connections are refused. Returns once the serving task is gone,
    /// and with it its hold on the simulator (and so on its Kafka producer).
    pub async fn shutdown(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for SimNode {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Counters of what the simulator was asked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimCounters {
    pub logins: u64,
    pub stage_requests: u64,
    pub staged_paths: u64,
    pub largest_stage_paths: usize,
    pub largest_stage_body: usize,
    pub cancel_requests: u64,
    pub published: u64,
    pub publish_failures: u64,
    pub file_status_requests: u64,
    /// The most file-status requests in flight at once, on all nodes.
    pub most_file_status_in_flight: usize,
}

impl ScoutSim {
    /// A simulator with no files known (every file is on tape) and no node serving yet.
    /// Fails only if the Kafka producer for `settings.kafka_brokers` cannot be created.
    pub fn new(settings: SimSettings) -> Result<ScoutSim, rdkafka::error::KafkaError> {
        let producer = match &settings.kafka_brokers {
            Some(brokers) => Some(
                ClientConfig::new()
                    .set("bootstrap.servers", brokers)
                    .set("linger.ms", "5")
                    .set("message.timeout.ms", "30000")
                    .create::<FutureProducer>()?,
            ),
            None => None,
        };
        let cache = json!({
            "availdatasz": "500000000000", "health": 1, "healthstatus": "ok",
            "releaseable": "1000", "nonreleaseable": 2000, "pending": "0",
            "totdatasz": 900000000000_i64,
        });
        Ok(ScoutSim {
            shared: Arc::new(Shared {
                settings,
                tokens: Mutex::new(HashMap::new()),
                nodes_served: AtomicUsize::new(0),
                files: Mutex::new(HashMap::new()),
                cancelled: Mutex::new(HashSet::new()),
                cache_state: Mutex::new(cache),
                producer,
                logins: AtomicU64::new(0),
                stage_requests: AtomicU64::new(0),
                staged_paths: AtomicU64::new(0),
                largest_stage_paths: AtomicUsize::new(0),
                largest_stage_body: AtomicUsize::new(0),
                cancel_requests: AtomicU64::new(0),
                published: AtomicU64::new(0),
                publish_failures: AtomicU64::new(0),
                file_status_requests: AtomicU64::new(0),
                file_status_in_flight: AtomicUsize::new(0),
                most_file_status_in_flight: AtomicUsize::new(0),
            }),
        })
    }

    /// Serves the API on `listener` as one more node.
    pub fn serve(&self, listener: TcpListener) -> std::io::Result<SimNode> {
        let addr = listener.local_addr()?;
        let control = Arc::new(NodeControl {
            id: self.shared.nodes_served.fetch_add(1, Ordering::Relaxed),
            ..NodeControl::default()
        });
        let s = &self.shared.settings;
        let state = NodeState {
            shared: self.shared.clone(),
            control: control.clone(),
        };
        let app = Router::new()
            .route(&s.login_path, post(login))
            .route(&s.file_path, get(file_status))
            .route(&s.stage_path, put(stage))
            .route(&s.cancel_path, put(cancel))
            .route(&s.cachestate_path, get(cache_state))
            .layer(DefaultBodyLimit::max(s.max_body_bytes))
            .with_state(state.clone())
            // Outermost, so that latency, failures and hits apply even to refused bodies.
            .layer(axum::middleware::from_fn_with_state(state, node_gate));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(SimNode {
            addr,
            control,
            task,
        })
    }

    /// Binds a node on a free loopback port.
    pub async fn serve_loopback(&self) -> std::io::Result<SimNode> {
        self.serve(TcpListener::bind("127.0.0.1:0").await?)
    }

    /// Invalidates every token, as a token's expiry would.
    pub fn expire_tokens(&self) {
        self.shared.tokens.lock().unwrap().clear();
    }

    pub fn set_file(&self, path: &str, state: FileState) {
        self.shared
            .files
            .lock()
            .unwrap()
            .insert(path.to_string(), state);
    }

    /// Whether a cancel request named `path`.
    pub fn was_cancelled(&self, path: &str) -> bool {
        self.shared.cancelled.lock().unwrap().contains(path)
    }

    pub fn file_state(&self, path: &str) -> FileState {
        file_state(&self.shared, path)
    }

    /// Replaces the cache-state answer.
    pub fn set_cache_state(&self, v: Value) {
        *self.shared.cache_state.lock().unwrap() = v;
    }

    pub fn counters(&self) -> SimCounters {
        let s = &self.shared;
        SimCounters {
            logins: s.logins.load(Ordering::Relaxed),
            stage_requests: s.stage_requests.load(Ordering::Relaxed),
            staged_paths: s.staged_paths.load(Ordering::Relaxed),
            largest_stage_paths: s.largest_stage_paths.load(Ordering::Relaxed),
            largest_stage_body: s.largest_stage_body.load(Ordering::Relaxed),
            cancel_requests: s.cancel_requests.load(Ordering::Relaxed),
            published: s.published.load(Ordering::Relaxed),
            publish_failures: s.publish_failures.load(Ordering::Relaxed),
            file_status_requests: s.file_status_requests.load(Ordering::Relaxed),
            most_file_status_in_flight: s.most_file_status_in_flight.load(Ordering::Relaxed),
        }
    }

    /// Waits until queued Kafka messages are delivered (or `timeout`).
    pub fn flush(&self, timeout: Duration) {
        if let Some(p) = &self.shared.producer {
            let _ = p.flush(timeout);
        }
    }
}

fn file_state(shared: &Shared, path: &str) -> FileState {
    shared
        .files
        .lock()
        .unwrap()
        .get(path)
        .copied()
        .unwrap_or(FileState::Offline)
}

#[derive(Clone)]
struct NodeState {
    shared: Arc<Shared>,
    control: Arc<NodeControl>,
}

impl NodeState {
    /// The node's own behaviour, before any handler runs: latency, then an injected
    /// failure or non-JSON answer. Returns the answer that replaces the handler's, if any.
    async fn gate(&self) -> Option<Response> {
        self.control.hits.fetch_add(1, Ordering::Relaxed);
        let latency = self.control.latency_ms.load(Ordering::Relaxed);
        if latency > 0 {
            tokio::time::sleep(Duration::from_millis(latency)).await;
        }
        if happens(&self.control.fail_ppm) {
            return Some(
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    axum::Json(json!({"response": "injected failure"})),
                )
                    .into_response(),
            );
        }
        if happens(&self.control.garbage_ppm) {
            return Some(
                (
                    StatusCode::OK,
                    [(axum::http::header::CONTENT_TYPE, "text/html")],
                    "<html><body>502 Bad Gateway (from a proxy)</body></html>",
                )
                    .into_response(),
            );
        }
        None
    }

    /// Whether the request carries a live token good on this node.
    fn authorize(&self, headers: &HeaderMap) -> bool {
        if happens(&self.control.forbid_ppm) {
            self.control.forbidden.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let token = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let ok = token.is_some_and(|t| {
            self.shared
                .tokens
                .lock()
                .unwrap()
                .get(t)
                .is_some_and(|(issued, node)| {
                    issued.elapsed() < self.shared.settings.token_ttl
                        && (!self.shared.settings.per_node_tokens || *node == self.control.id)
                })
        });
        if !ok {
            self.control.forbidden.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }
}

fn forbidden() -> Response {
    (
        StatusCode::FORBIDDEN,
        axum::Json(json!({"response": "invalid or expired token"})),
    )
        .into_response()
}

async fn node_gate(
    State(node): State<NodeState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match node.gate().await {
        Some(answer) => answer,
        None => next.run(req).await,
    }
}

async fn login(State(node): State<NodeState>, body: Bytes) -> Response {
    #[derive(Deserialize)]
    struct Creds {
        acct: String,
        pass: String,
    }
    let s = &node.shared.settings;
    match serde_json::from_slice::<Creds>(&body) {
        Ok(c) if c.acct == s.username && c.pass == s.password => {
            node.shared.logins.fetch_add(1, Ordering::Relaxed);
            let token = format!("tok-{:032x}", rand::rng().random::<u128>());
            node.shared
                .tokens
                .lock()
                .unwrap()
                .insert(token.clone(), (Instant::now(), node.control.id));
            axum::Json(json!({ "response": token })).into_response()
        }
        Ok(_) => (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"response": "bad credentials"})),
        )
            .into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

#[derive(Deserialize)]
struct PathQuery {
    path: String,
}

async fn file_status(
    State(node): State<NodeState>,
    headers: HeaderMap,
    Query(q): Query<PathQuery>,
) -> Response {
    if !node.authorize(&headers) {
        return forbidden();
    }
    let sh = &node.shared;
    sh.file_status_requests.fetch_add(1, Ordering::Relaxed);
    let now = sh.file_status_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    sh.most_file_status_in_flight
        .fetch_max(now, Ordering::SeqCst);
    tokio::time::sleep(sh.settings.file_status_delay).await;
    sh.file_status_in_flight.fetch_sub(1, Ordering::SeqCst);
    let (offline, online) = match file_state(&node.shared, &q.path) {
        FileState::Online => (0, 16),
        FileState::Offline => (16, 0),
        FileState::Missing => {
            return (
                StatusCode::NOT_FOUND,
                axum::Json(json!({"response": "no such file"})),
            )
                .into_response();
        }
    };
    axum::Json(json!({
        "path": q.path, "offlineblocks": offline, "onlineblocks": online,
        "archdone": true, "size": "16777216",
    }))
    .into_response()
}

async fn cache_state(State(node): State<NodeState>, headers: HeaderMap) -> Response {
    if !node.authorize(&headers) {
        return forbidden();
    }
    axum::Json(node.shared.cache_state.lock().unwrap().clone()).into_response()
}

#[derive(Deserialize)]
struct StageBody {
    path: Vec<String>,
    #[serde(default)]
    topic: Option<String>,
}

async fn stage(State(node): State<NodeState>, headers: HeaderMap, body: Bytes) -> Response {
    if !node.authorize(&headers) {
        return forbidden();
    }
    let req: StageBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let sh = &node.shared;
    sh.stage_requests.fetch_add(1, Ordering::Relaxed);
    sh.staged_paths
        .fetch_add(req.path.len() as u64, Ordering::Relaxed);
    sh.largest_stage_paths
        .fetch_max(req.path.len(), Ordering::Relaxed);
    sh.largest_stage_body
        .fetch_max(body.len(), Ordering::Relaxed);
    let topic = req
        .topic
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| sh.settings.default_topic.clone());
    let requested = chrono::Utc::now();
    let (online, offline): (Vec<String>, Vec<String>) = req
        .path
        .into_iter()
        .partition(|p| file_state(sh, p) == FileState::Online);
    {
        let mut cancelled = sh.cancelled.lock().unwrap();
        for p in &offline {
            cancelled.remove(p);
        }
    }
    // Files already on disk are reported at once, as the real system does.
    futures::stream::iter(&online)
        .for_each_concurrent(PUBLISH_CONCURRENCY, |p| {
            publish(sh, &topic, p, requested, "")
        })
        .await;
    if !offline.is_empty() {
        let shared = sh.clone();
        tokio::spawn(async move {
            tokio::time::sleep(shared.settings.recall_delay).await;
            let recalls: Vec<(String, &str)> = offline
                .into_iter()
                .filter(|p| !shared.cancelled.lock().unwrap().remove(p))
                .map(|p| {
                    // A file the tape system does not have fails its recall.
                    let failed = file_state(&shared, &p) == FileState::Missing
                        || shared.settings.error_fraction > 0.0
                            && rand::rng().random::<f64>() < shared.settings.error_fraction;
                    if failed {
                        (p, "simulated recall failure: media error")
                    } else {
                        shared
                            .files
                            .lock()
                            .unwrap()
                            .insert(p.clone(), FileState::Online);
                        (p, "")
                    }
                })
                .collect();
            if shared.settings.recall_spread.is_zero() {
                futures::stream::iter(&recalls)
                    .for_each_concurrent(PUBLISH_CONCURRENCY, |(p, error)| {
                        publish(&shared, &topic, p, requested, error)
                    })
                    .await;
            } else {
                // One file after another, as a tape drive delivers them.
                let gap = shared.settings.recall_spread / recalls.len().max(1) as u32;
                for (p, error) in &recalls {
                    tokio::time::sleep(gap).await;
                    publish(&shared, &topic, p, requested, error).await;
                }
            }
        });
    }
    axum::Json(json!({"response": "batch stage request accepted"})).into_response()
}

async fn cancel(State(node): State<NodeState>, headers: HeaderMap, body: Bytes) -> Response {
    if !node.authorize(&headers) {
        return forbidden();
    }
    let req: StageBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    node.shared.cancel_requests.fetch_add(1, Ordering::Relaxed);
    let mut cancelled = node.shared.cancelled.lock().unwrap();
    for p in req.path {
        if file_state(&node.shared, &p) != FileState::Online {
            cancelled.insert(p);
        }
    }
    axum::Json(json!({"response": "batch cancel request accepted"})).into_response()
}

/// One recall message, in the production format.
pub fn recall_message(
    path: &str,
    requested: chrono::DateTime<chrono::Utc>,
    completed: chrono::DateTime<chrono::Utc>,
    error: &str,
) -> String {
    const FMT: &str = "%Y-%m-%d %H:%M:%S +0000 GMT";
    let mut h = std::collections::hash_map::DefaultHasher::new();
    path.hash(&mut h);
    json!({
        "Inode": h.finish() % 10_000_000,
        "Filename": path,
        "RequestTime": requested.format(FMT).to_string(),
        "CompleteTime": completed.format(FMT).to_string(),
        "Error": error,
    })
    .to_string()
}

async fn publish(
    sh: &Shared,
    topic: &str,
    path: &str,
    requested: chrono::DateTime<chrono::Utc>,
    error: &str,
) {
    let Some(producer) = &sh.producer else {
        return;
    };
    let payload = recall_message(path, requested, chrono::Utc::now(), error);
    let record = FutureRecord::to(topic).payload(&payload).key(path);
    match producer.send(record, Duration::from_secs(10)).await {
        Ok(_) => {
            sh.published.fetch_add(1, Ordering::Relaxed);
        }
        Err((e, _)) => {
            sh.publish_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, path, "simulator: publishing a recall message failed");
        }
    }
}
