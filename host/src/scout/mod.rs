//! The client of the tape system's Scout API (Versity ScoutAM): stage, cancel, file status
//! and cache state, spread over every configured node with no load balancer in front.
//!
//! Invariants:
//! - Each node has its own token, got by logging in on that node, so the client works
//!   whether the tape system's tokens are per node or cluster-wide. A 403 triggers one
//!   refresh of that node's token, shared by every call that saw the same stale token (a
//!   hundred concurrent 403s cause one login per node), then one retry on that node.
//! - Only a definite refusal ends a call early: a 4xx other than 403 (413 on a stage or
//!   cancel request first splits the request, see below), or a login refused with a 4xx.
//!   Anything else is a failure of the one node (connect error, timeout, 5xx, a 403 even
//!   with a fresh token, an answer that is not the JSON the API promises): the next node
//!   is tried at once, then round after round with exponential back-off and jitter.
//! - A stage or cancel request never holds more than `max_paths_per_request` paths nor more
//!   than `max_body_bytes` of JSON: the body size is computed exactly before sending. A node
//!   that still answers 413 gets the request again in halves, down to a single path; only a
//!   single path refused with 413 is a refusal.
//! - Nodes are picked by load: of two candidates from the rotation, the one with fewer
//!   calls in flight and the lower recent latency (see `nodes`), so a slow node carries
//!   less of the load without being dropped.
//! - Cancel is best effort: a failure is counted and logged, never returned.
//! - Every HTTP exchange with a node is timed once, labelled by the node (one of the
//!   configured ones) and the [`Operation`] (a fixed set), whatever its outcome: see
//!   [`ScoutClient::request_seconds`].

mod nodes;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};

use crate::backoff::{Backoff, Jitter};
use serde::de::{self, DeserializeOwned, Deserializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;
use tokio::sync::{Mutex, RwLock};
use url::Url;

use crate::config::ScoutConfig;
use crate::histograms::{self, RequestSeconds};
use nodes::NodePool;
pub use nodes::NodeStats;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};

/// What a request to Scout is for: the label of its latency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Login,
    FileStatus,
    Stage,
    Cancel,
    CacheState,
}

impl Operation {
    /// The HTTP method the Scout API takes for it.
    fn method(self) -> Method {
        match self {
            Operation::Login => Method::POST,
            Operation::FileStatus | Operation::CacheState => Method::GET,
            Operation::Stage | Operation::Cancel => Method::PUT,
        }
    }

    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Operation::Login => "login",
            Operation::FileStatus => "file_status",
            Operation::Stage => "stage",
            Operation::Cancel => "cancel",
            Operation::CacheState => "cache_state",
        }
    }
}

impl EncodeLabelValue for Operation {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// The labels of one Scout request's latency.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// The node's base URL, as configured (and as `NodeStats::base` spells it).
    pub node: String,
    pub operation: Operation,
}

#[derive(Debug, Error)]
pub enum ScoutError {
    /// Scout answered with a 4xx other than 403 (to a login: any 4xx but 403).
    #[error("Scout refused the request: HTTP {status}: {body}")]
    Refused { status: u16, body: String },
    /// Every attempt failed transiently.
    #[error("Scout unavailable after {attempts} attempts: {last}")]
    Unavailable { attempts: u32, last: String },
    /// One path alone makes a request body larger than the limit.
    #[error("a path of {len} bytes does not fit in a stage request of at most {limit} bytes")]
    PathTooLong { len: usize, limit: usize },
    #[error("Scout client setup: {0}")]
    Setup(String),
}

/// What Scout says about one file (`GET {file_path}?path=P`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct FileStatus {
    /// Blocks still only on tape; 0 means the file is on disk.
    #[serde(deserialize_with = "flex_i64")]
    pub offlineblocks: i64,
    #[serde(default, deserialize_with = "flex_opt_i64")]
    pub onlineblocks: Option<i64>,
    #[serde(default, deserialize_with = "flex_opt_i64")]
    pub size: Option<i64>,
    #[serde(default)]
    pub archdone: Option<bool>,
}

/// The disk cache's state (`GET {cachestate_path}`); numbers come as strings or integers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct CacheState {
    #[serde(default, deserialize_with = "flex_opt_i64")]
    pub availdatasz: Option<i64>,
    /// 0 unknown, 1 ok, 2 warning, 3 error.
    #[serde(default, deserialize_with = "flex_opt_i64")]
    pub health: Option<i64>,
    #[serde(default, deserialize_with = "flex_opt_string")]
    pub healthstatus: Option<String>,
    #[serde(default, deserialize_with = "flex_opt_i64")]
    pub releaseable: Option<i64>,
    #[serde(default, deserialize_with = "flex_opt_i64")]
    pub nonreleaseable: Option<i64>,
    #[serde(default, deserialize_with = "flex_opt_i64")]
    pub pending: Option<i64>,
    #[serde(default, deserialize_with = "flex_opt_i64")]
    pub totdatasz: Option<i64>,
}

/// Call counters, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScoutCounters {
    pub logins: u64,
    pub stage_requests: u64,
    pub cancel_failures: u64,
    pub refusals: u64,
    pub retries: u64,
    /// 403s that a fresh token from the same node did not cure (the node's failure).
    pub forbidden_after_login: u64,
    /// Stage or cancel requests split in two after a 413.
    pub splits: u64,
}

#[derive(Default)]
struct Counters {
    logins: AtomicU64,
    stage_requests: AtomicU64,
    cancel_failures: AtomicU64,
    refusals: AtomicU64,
    retries: AtomicU64,
    forbidden_after_login: AtomicU64,
    splits: AtomicU64,
}

/// Timeouts, limits and retry policy, from `[scout]`.
#[derive(Debug, Clone)]
pub struct ScoutSettings {
    pub nodes: Vec<Url>,
    pub username: String,
    pub password: String,
    pub login_path: String,
    pub file_path: String,
    pub stage_path: String,
    pub cancel_path: String,
    pub cachestate_path: String,
    /// Merged into every stage and cancel body.
    pub stage_extra: Map<String, Value>,
    /// The Kafka topic Scout is asked to report recalls on.
    pub topic: String,
    pub max_paths_per_request: usize,
    pub max_body_bytes: usize,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub retries: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub eject: Duration,
    /// How Scout's certificate is checked (`scout.ca_file`, `insecure_skip_tls_verify`).
    pub trust: crate::tls_trust::Trust,
}

impl ScoutSettings {
    /// Settings from the config file; `topic` is the Kafka topic (`[kafka].topic`).
    pub fn from_config(c: &ScoutConfig, topic: &str) -> Result<ScoutSettings, ScoutError> {
        let nodes = c
            .nodes
            .iter()
            .map(|n| Url::parse(n).map_err(|e| ScoutError::Setup(format!("node {n:?}: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let trust = crate::tls_trust::Trust::from_config(
            "scout",
            c.ca_file.as_deref(),
            c.insecure_skip_tls_verify,
        )
        .map_err(ScoutError::Setup)?;
        let stage_extra = serde_json::to_value(&c.stage_extra)
            .ok()
            .and_then(|v| v.as_object().cloned())
            .unwrap_or_default();
        Ok(ScoutSettings {
            nodes,
            username: c.username.clone(),
            password: c
                .password
                .as_ref()
                .map(|p| p.expose().to_string())
                .unwrap_or_default(),
            login_path: c.login_path.clone(),
            file_path: c.file_path.clone(),
            stage_path: c.stage_path.clone(),
            cancel_path: c.cancel_path.clone(),
            cachestate_path: c.cachestate_path.clone(),
            stage_extra,
            topic: topic.to_string(),
            max_paths_per_request: c.max_paths_per_request,
            max_body_bytes: c.max_body_bytes,
            connect_timeout: Duration::from_secs_f64(c.connect_timeout_secs),
            request_timeout: Duration::from_secs_f64(c.request_timeout_secs),
            retries: c.retries,
            backoff_initial: Duration::from_millis(c.backoff_initial_ms),
            backoff_max: Duration::from_millis(c.backoff_max_ms),
            eject: Duration::from_secs_f64(c.eject_secs),
            trust,
        })
    }
}

/// Handle to the Scout API; cheap to clone, shared by every task.
#[derive(Clone)]
pub struct ScoutClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    settings: ScoutSettings,
    pool: NodePool,
    /// One per node, in the pool's order.
    tokens: Vec<NodeToken>,
    counters: Counters,
    /// Seconds per HTTP exchange, by node and operation.
    request_seconds: RequestSeconds<RequestLabels>,
}

/// A node's token.
#[derive(Default)]
struct NodeToken {
    /// The current token and its generation; the generation tells a caller whether the
    /// token it saw fail has already been replaced.
    token: RwLock<(Option<String>, u64)>,
    /// Held while logging in, so that concurrent refreshes collapse into one.
    login: Mutex<()>,
}

/// Why a call did not succeed on one node.
enum NodeFailure {
    /// Definite: the call ends with this error.
    Refused(ScoutError),
    /// This node's failure: try another.
    Transient(String),
}

/// How a call retries.
#[derive(Clone, Copy)]
enum Retry {
    /// Every node, then `retries` more rounds with back-off.
    Full,
    /// Every node once, no back-off: for figures a caller wants now or not at all.
    OnePass,
}

/// The result of one HTTP exchange with one node.
enum Outcome {
    Ok(Vec<u8>),
    Forbidden,
    Refused(u16, String),
    Transient(String),
}

impl ScoutClient {
    pub fn new(settings: ScoutSettings) -> Result<ScoutClient, ScoutError> {
        if settings.nodes.is_empty() {
            return Err(ScoutError::Setup("no Scout nodes configured".into()));
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.request_timeout)
            .user_agent(concat!("staged/", env!("CARGO_PKG_VERSION")));
        builder = settings.trust.apply(builder);
        let http = builder
            .build()
            .map_err(|e| ScoutError::Setup(e.to_string()))?;
        let pool = NodePool::new(settings.nodes.clone(), settings.eject);
        let tokens = (0..pool.len()).map(|_| NodeToken::default()).collect();
        Ok(ScoutClient {
            inner: Arc::new(Inner {
                http,
                settings,
                pool,
                tokens,
                counters: Counters::default(),
                request_seconds: histograms::request_seconds_family(),
            }),
        })
    }

    pub fn node_stats(&self) -> Vec<NodeStats> {
        self.inner.pool.stats()
    }

    pub fn counters(&self) -> ScoutCounters {
        let c = &self.inner.counters;
        ScoutCounters {
            logins: c.logins.load(Ordering::Relaxed),
            stage_requests: c.stage_requests.load(Ordering::Relaxed),
            cancel_failures: c.cancel_failures.load(Ordering::Relaxed),
            refusals: c.refusals.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            forbidden_after_login: c.forbidden_after_login.load(Ordering::Relaxed),
            splits: c.splits.load(Ordering::Relaxed),
        }
    }

    /// The latency of every HTTP exchange with a node (a 403 retried after a fresh token
    /// is two exchanges; a login is its own operation), answered or not.
    pub fn request_seconds(&self) -> &RequestSeconds<RequestLabels> {
        &self.inner.request_seconds
    }

    /// Asks Scout to bring `paths` online and report each on Kafka, in as many requests as
    /// the limits need. `key` is the job id. Returns the number of requests sent. On error,
    /// the batches before it were accepted; staging again is harmless.
    pub async fn stage(&self, paths: &[String], key: &str) -> Result<usize, ScoutError> {
        let path = self.inner.settings.stage_path.clone();
        self.send_batches(Operation::Stage, &path, paths, key).await
    }

    /// Sends `paths` in batches within the limits, splitting a batch a node refuses as too
    /// large (413) into halves. Returns the number of requests accepted.
    async fn send_batches(
        &self,
        op: Operation,
        endpoint: &str,
        paths: &[String],
        key: &str,
    ) -> Result<usize, ScoutError> {
        let mut todo: Vec<std::ops::Range<usize>> = self.batches(paths, key)?;
        // Sent in order: the queue's front is the next batch.
        todo.reverse();
        let mut sent = 0;
        while let Some(range) = todo.pop() {
            let body = self.body_for(&paths[range.clone()], key);
            match self
                .call::<Value>(op, endpoint, None, Some(&body), Retry::Full)
                .await
            {
                Ok(_) => {
                    sent += 1;
                    self.inner
                        .counters
                        .stage_requests
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(ScoutError::Refused { status: 413, .. }) if range.len() > 1 => {
                    self.inner.counters.splits.fetch_add(1, Ordering::Relaxed);
                    let mid = range.start + range.len() / 2;
                    tracing::info!(
                        key,
                        paths = range.len(),
                        bytes = body.len(),
                        "Scout refused a request as too large; sending it in halves"
                    );
                    todo.push(mid..range.end);
                    todo.push(range.start..mid);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(sent)
    }

    /// Asks Scout to drop pending recalls of `paths`. Best effort: returns whether every
    /// request succeeded; failures are counted and logged.
    pub async fn cancel(&self, paths: &[String], key: &str) -> bool {
        let path = self.inner.settings.cancel_path.clone();
        let batches = match self.batches(paths, key) {
            Ok(b) => b,
            Err(e) => {
                self.cancel_failed(key, &e);
                return false;
            }
        };
        // Each batch on its own: one that fails does not keep the others from being sent.
        let mut all = true;
        for range in batches {
            if let Err(e) = self
                .send_batches(Operation::Cancel, &path, &paths[range], key)
                .await
            {
                self.cancel_failed(key, &e);
                all = false;
            }
        }
        all
    }

    fn cancel_failed(&self, key: &str, e: &ScoutError) {
        self.inner
            .counters
            .cancel_failures
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(key, error = %e, "Scout cancel failed (ignored: best effort)");
    }

    /// The state of one file.
    pub async fn file_status(&self, path: &str) -> Result<FileStatus, ScoutError> {
        let ep = self.inner.settings.file_path.clone();
        self.call(
            Operation::FileStatus,
            &ep,
            Some(("path", path)),
            None,
            Retry::Full,
        )
        .await
    }

    /// The disk cache's figures. Tries each node once, without back-off: a caller showing
    /// them would rather show nothing than wait.
    pub async fn cache_state(&self) -> Result<CacheState, ScoutError> {
        let ep = self.inner.settings.cachestate_path.clone();
        self.call(Operation::CacheState, &ep, None, None, Retry::OnePass)
            .await
    }

    /// One stage or cancel body.
    fn body_for(&self, chunk: &[String], key: &str) -> Vec<u8> {
        let s = &self.inner.settings;
        let mut body = s.stage_extra.clone();
        body.insert("path".into(), Value::from(chunk.to_vec()));
        body.insert("copy".into(), Value::from(0));
        body.insert("inode".into(), Value::Array(Vec::new()));
        body.insert("key".into(), Value::from(key));
        body.insert("topic".into(), Value::from(s.topic.as_str()));
        serde_json::to_vec(&body).expect("strings serialize")
    }

    /// Splits `paths` into ranges whose stage/cancel bodies (with `key`) are within both
    /// limits.
    fn batches(
        &self,
        paths: &[String],
        key: &str,
    ) -> Result<Vec<std::ops::Range<usize>>, ScoutError> {
        let s = &self.inner.settings;
        let overhead = self.body_for(&[], key).len();
        let mut out = Vec::new();
        let mut start = 0;
        let mut size = overhead;
        for (i, p) in paths.iter().enumerate() {
            let len = serde_json::to_string(p).expect("strings serialize").len();
            if overhead + len > s.max_body_bytes {
                return Err(ScoutError::PathTooLong {
                    len: p.len(),
                    limit: s.max_body_bytes,
                });
            }
            let count = i - start;
            // Every path but a request's first is preceded by a comma.
            let cost = len + usize::from(count > 0);
            if count == s.max_paths_per_request || size + cost > s.max_body_bytes {
                out.push(start..i);
                start = i;
                size = overhead + len;
            } else {
                size += cost;
            }
        }
        if start < paths.len() {
            out.push(start..paths.len());
        }
        Ok(out)
    }

    /// Node `i`'s current token and its generation, logging in there if it has none.
    async fn token(&self, i: usize) -> Result<(String, u64), NodeFailure> {
        {
            let t = self.inner.tokens[i].token.read().await;
            if let (Some(tok), generation) = &*t {
                return Ok((tok.clone(), *generation));
            }
        }
        self.refresh(i, 0).await
    }

    /// Replaces node `i`'s token known as generation `stale` by logging in on that node.
    /// Callers that saw the same stale token wait on one login and share its result.
    async fn refresh(&self, i: usize, stale: u64) -> Result<(String, u64), NodeFailure> {
        let slot = &self.inner.tokens[i];
        let _one_login = slot.login.lock().await;
        {
            let t = slot.token.read().await;
            if let (Some(tok), generation) = &*t
                && *generation != stale
            {
                return Ok((tok.clone(), *generation));
            }
        }
        let s = &self.inner.settings;
        let body = serde_json::to_vec(&serde_json::json!({
            "acct": s.username,
            "pass": s.password,
        }))
        .expect("strings serialize");
        self.inner.counters.logins.fetch_add(1, Ordering::Relaxed);
        let base = &self.inner.pool.node(i).base;
        let bytes = match self
            .exchange(
                base,
                Operation::Login,
                &s.login_path,
                None,
                Some(&body),
                None,
            )
            .await
        {
            Outcome::Ok(b) => b,
            // A login is not authenticated: a 403 to it is the node misbehaving, not our
            // credentials being wrong (that is a 401).
            Outcome::Forbidden => {
                return Err(NodeFailure::Transient("login answered HTTP 403".into()));
            }
            Outcome::Refused(status, body) => {
                return Err(NodeFailure::Refused(ScoutError::Refused { status, body }));
            }
            Outcome::Transient(why) => return Err(NodeFailure::Transient(format!("login: {why}"))),
        };
        #[derive(Deserialize)]
        struct Login {
            response: String,
        }
        let token = serde_json::from_slice::<Login>(&bytes)
            .map_err(|e| NodeFailure::Transient(format!("login answer is not a token: {e}")))?
            .response;
        let mut t = slot.token.write().await;
        t.0 = Some(token.clone());
        t.1 += 1;
        Ok((token, t.1))
    }

    /// One authenticated call, over the nodes with fail-over and retries. On each node: its
    /// token (logging in there if needed), the exchange, and on 403 one refresh of that
    /// node's token and one retry there. A 403 even after the refresh, a login that did not
    /// work, or an answer that does not parse as `T` is a failure of that node, and the next
    /// node is tried: only a definite refusal (a 4xx other than 403) ends the call early.
    async fn call<T: DeserializeOwned>(
        &self,
        op: Operation,
        endpoint: &str,
        query: Option<(&str, &str)>,
        body: Option<&[u8]>,
        retry: Retry,
    ) -> Result<T, ScoutError> {
        let s = &self.inner.settings;
        let pool = &self.inner.pool;
        let rounds = match retry {
            Retry::Full => 1 + s.retries,
            Retry::OnePass => 1,
        };
        let mut attempts = 0;
        let mut last = String::new();
        for round in 0..rounds {
            if round > 0 {
                tokio::time::sleep(
                    Backoff::new(s.backoff_initial, s.backoff_max, Jitter::LowerHalf)
                        .delay(round - 1),
                )
                .await;
            }
            let mut tried = Vec::with_capacity(pool.len());
            for _ in 0..pool.len() {
                let i = pool.pick(&tried);
                tried.push(i);
                if attempts > 0 {
                    self.inner.counters.retries.fetch_add(1, Ordering::Relaxed);
                }
                attempts += 1;
                let _busy = pool.busy(i);
                let mut started = Instant::now();
                match self
                    .on_node::<T>(i, op, endpoint, query, body, &mut started)
                    .await
                {
                    Ok(v) => {
                        pool.answered(i, started.elapsed(), true);
                        return Ok(v);
                    }
                    Err(NodeFailure::Refused(e)) => {
                        pool.answered(i, started.elapsed(), false);
                        self.inner.counters.refusals.fetch_add(1, Ordering::Relaxed);
                        return Err(e);
                    }
                    Err(NodeFailure::Transient(why)) => {
                        pool.failed(i);
                        tracing::debug!(node = %pool.node(i).base, endpoint, error = %why, "Scout call failed, trying another node");
                        last = format!("{}: {why}", pool.node(i).base);
                    }
                }
            }
        }
        tracing::warn!(endpoint, attempts, error = %last, "Scout unavailable");
        Err(ScoutError::Unavailable { attempts, last })
    }

    /// The call on node `i`, with at most one token refresh. `started` is reset once the
    /// node's token is at hand, so that a login does not count as the node's latency.
    async fn on_node<T: DeserializeOwned>(
        &self,
        i: usize,
        op: Operation,
        endpoint: &str,
        query: Option<(&str, &str)>,
        body: Option<&[u8]>,
        started: &mut Instant,
    ) -> Result<T, NodeFailure> {
        let base = &self.inner.pool.node(i).base;
        let (token, generation) = self.token(i).await?;
        *started = Instant::now();
        let mut outcome = self
            .exchange(base, op, endpoint, query, body, Some(&token))
            .await;
        if matches!(outcome, Outcome::Forbidden) {
            let (token, _) = self.refresh(i, generation).await?;
            outcome = self
                .exchange(base, op, endpoint, query, body, Some(&token))
                .await;
        }
        match outcome {
            Outcome::Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                let text: String = String::from_utf8_lossy(&bytes).chars().take(80).collect();
                NodeFailure::Transient(format!("answer is not the JSON expected ({e}): {text:?}"))
            }),
            Outcome::Forbidden => {
                self.inner
                    .counters
                    .forbidden_after_login
                    .fetch_add(1, Ordering::Relaxed);
                Err(NodeFailure::Transient(
                    "HTTP 403 even with a fresh token from this node".into(),
                ))
            }
            Outcome::Refused(status, body) => {
                Err(NodeFailure::Refused(ScoutError::Refused { status, body }))
            }
            Outcome::Transient(why) => Err(NodeFailure::Transient(why)),
        }
    }

    /// One exchange, timed into [`ScoutClient::request_seconds`].
    async fn exchange(
        &self,
        base: &Url,
        op: Operation,
        endpoint: &str,
        query: Option<(&str, &str)>,
        body: Option<&[u8]>,
        token: Option<&str>,
    ) -> Outcome {
        let started = Instant::now();
        let outcome = self
            .exchange_untimed(base, op.method(), endpoint, query, body, token)
            .await;
        self.inner
            .request_seconds
            .get_or_create(&RequestLabels {
                node: base.to_string(),
                operation: op,
            })
            .observe(histograms::since(started));
        outcome
    }

    async fn exchange_untimed(
        &self,
        base: &Url,
        method: Method,
        endpoint: &str,
        query: Option<(&str, &str)>,
        body: Option<&[u8]>,
        token: Option<&str>,
    ) -> Outcome {
        let mut url = match base.join(endpoint) {
            Ok(u) => u,
            Err(e) => return Outcome::Refused(0, format!("bad endpoint URL: {e}")),
        };
        if let Some((k, v)) = query {
            url.query_pairs_mut().append_pair(k, v);
        }
        let mut req = self.inner.http.request(method, url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b.to_vec());
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return Outcome::Transient(crate::error_text::chain(&e)),
        };
        let status = resp.status();
        let bytes = match resp.bytes().await {
            Ok(b) => b.to_vec(),
            Err(e) => return Outcome::Transient(crate::error_text::chain(&e)),
        };
        if status.is_success() {
            Outcome::Ok(bytes)
        } else if status == StatusCode::FORBIDDEN {
            Outcome::Forbidden
        } else if status.is_server_error() {
            Outcome::Transient(format!("HTTP {status}"))
        } else {
            let text = String::from_utf8_lossy(&bytes);
            let text: String = text.chars().take(500).collect();
            Outcome::Refused(status.as_u16(), text)
        }
    }
}

/// An integer given as a JSON number or a string of digits.
fn flex_value_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => s.trim().parse::<i64>().ok().or_else(|| {
            s.trim()
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .map(|f| f as i64)
        }),
        _ => None,
    }
}

fn flex_i64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    let v = Value::deserialize(d)?;
    flex_value_i64(&v).ok_or_else(|| de::Error::custom(format!("not an integer: {v}")))
}

fn flex_opt_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let v = Value::deserialize(d)?;
    if v.is_null() {
        return Ok(None);
    }
    flex_value_i64(&v)
        .map(Some)
        .ok_or_else(|| de::Error::custom(format!("not an integer: {v}")))
}

fn flex_opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Null => None,
        Value::String(s) => Some(s),
        other => Some(other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_as_strings_or_integers() {
        let c: CacheState = serde_json::from_str(
            r#"{"availdatasz":"123","health":1,"healthstatus":"ok","releaseable":"4",
                "nonreleaseable":5,"pending":"0","totdatasz":1e3,"other":"x"}"#,
        )
        .unwrap();
        assert_eq!(c.availdatasz, Some(123));
        assert_eq!(c.health, Some(1));
        assert_eq!(c.releaseable, Some(4));
        assert_eq!(c.pending, Some(0));
        assert_eq!(c.totdatasz, Some(1000));
        let f: FileStatus = serde_json::from_str(r#"{"offlineblocks":"0","size":"10"}"#).unwrap();
        assert_eq!(f.offlineblocks, 0);
        assert!(serde_json::from_str::<FileStatus>(r#"{"offlineblocks":"lots"}"#).is_err());
    }
}
