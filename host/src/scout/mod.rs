//! The client of the tape system's Scout API (Versity ScoutAM): stage, cancel, file status
//! and cache state, spread over every configured node with no load balancer in front.
//!
//! Invariants:
//! - One login serves every task. A 403 triggers one token refresh, shared by every call that
//!   saw the same stale token (a hundred concurrent 403s cause one login), then one retry.
//! - Only transient failures are retried (connect errors, timeouts, 5xx): on the next node at
//!   once, then round after round with exponential back-off and jitter. Any other 4xx is a
//!   refusal and is returned at once, never retried.
//! - A stage or cancel request never holds more than `max_paths_per_request` paths nor more
//!   than `max_body_bytes` of JSON: the body size is computed exactly before sending.
//! - Cancel is best effort: a failure is counted and logged, never returned.

mod nodes;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use reqwest::{Method, StatusCode};
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;
use tokio::sync::{Mutex, RwLock};
use url::Url;

use crate::config::ScoutConfig;
use nodes::NodePool;
pub use nodes::NodeStats;

#[derive(Debug, Error)]
pub enum ScoutError {
    /// Scout answered with a 4xx other than 403, or 403 again after a fresh login.
    #[error("Scout refused the request: HTTP {status}: {body}")]
    Refused { status: u16, body: String },
    /// Every attempt failed transiently.
    #[error("Scout unavailable after {attempts} attempts: {last}")]
    Unavailable { attempts: u32, last: String },
    /// A 2xx answer whose body is not what the API promises.
    #[error("unexpected answer from Scout: {0}")]
    BadAnswer(String),
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
}

#[derive(Default)]
struct Counters {
    logins: AtomicU64,
    stage_requests: AtomicU64,
    cancel_failures: AtomicU64,
    refusals: AtomicU64,
    retries: AtomicU64,
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
    pub ca_pem: Option<Vec<u8>>,
    pub insecure: bool,
}

impl ScoutSettings {
    /// Settings from the config file; `topic` is the Kafka topic (`[kafka].topic`).
    pub fn from_config(c: &ScoutConfig, topic: &str) -> Result<ScoutSettings, ScoutError> {
        let nodes = c
            .nodes
            .iter()
            .map(|n| Url::parse(n).map_err(|e| ScoutError::Setup(format!("node {n:?}: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let ca_pem = match &c.ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                ScoutError::Setup(format!("cannot read CA file {}: {e}", path.display()))
            })?),
            None => None,
        };
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
            ca_pem,
            insecure: c.insecure_skip_tls_verify,
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
    /// The current token and its generation; the generation tells a caller whether the
    /// token it saw fail has already been replaced.
    token: RwLock<(Option<String>, u64)>,
    /// Held while logging in, so that concurrent refreshes collapse into one.
    login: Mutex<()>,
    counters: Counters,
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
        if let Some(pem) = &settings.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| ScoutError::Setup(format!("CA file: {e}")))?;
            if certs.is_empty() {
                return Err(ScoutError::Setup("CA file holds no certificate".into()));
            }
            builder = builder.tls_certs_merge(certs);
        }
        if settings.insecure {
            tracing::warn!(
                "scout.insecure_skip_tls_verify is on: Scout's TLS certificates are NOT checked; \
                 anyone on the path can read the Scout password"
            );
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        let http = builder
            .build()
            .map_err(|e| ScoutError::Setup(e.to_string()))?;
        let pool = NodePool::new(settings.nodes.clone(), settings.eject);
        Ok(ScoutClient {
            inner: Arc::new(Inner {
                http,
                settings,
                pool,
                token: RwLock::new((None, 0)),
                login: Mutex::new(()),
                counters: Counters::default(),
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
        }
    }

    /// Asks Scout to bring `paths` online and report each on Kafka, in as many requests as
    /// the limits need. `key` is the job id. Returns the number of requests sent. On error,
    /// the batches before it were accepted; staging again is harmless.
    pub async fn stage(&self, paths: &[String], key: &str) -> Result<usize, ScoutError> {
        let batches = self.batches(paths, key)?;
        let n = batches.len();
        for body in batches {
            let path = self.inner.settings.stage_path.clone();
            self.call(Method::PUT, &path, None, Some(body), Retry::Full)
                .await?;
            self.inner
                .counters
                .stage_requests
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(n)
    }

    /// Asks Scout to drop pending recalls of `paths`. Best effort: returns whether every
    /// request succeeded; failures are counted and logged.
    pub async fn cancel(&self, paths: &[String], key: &str) -> bool {
        let batches = match self.batches(paths, key) {
            Ok(b) => b,
            Err(e) => {
                self.cancel_failed(key, &e);
                return false;
            }
        };
        let mut all = true;
        for body in batches {
            let path = self.inner.settings.cancel_path.clone();
            if let Err(e) = self
                .call(Method::PUT, &path, None, Some(body), Retry::Full)
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
        let body = self
            .call(Method::GET, &ep, Some(("path", path)), None, Retry::Full)
            .await?;
        serde_json::from_slice(&body)
            .map_err(|e| ScoutError::BadAnswer(format!("file status: {e}")))
    }

    /// The disk cache's figures. Tries each node once, without back-off: a caller showing
    /// them would rather show nothing than wait.
    pub async fn cache_state(&self) -> Result<CacheState, ScoutError> {
        let ep = self.inner.settings.cachestate_path.clone();
        let body = self
            .call(Method::GET, &ep, None, None, Retry::OnePass)
            .await?;
        serde_json::from_slice(&body)
            .map_err(|e| ScoutError::BadAnswer(format!("cache state: {e}")))
    }

    /// Splits `paths` into stage/cancel bodies within both limits.
    fn batches(&self, paths: &[String], key: &str) -> Result<Vec<Vec<u8>>, ScoutError> {
        let s = &self.inner.settings;
        let body_for = |chunk: &[String]| -> Vec<u8> {
            let mut body = s.stage_extra.clone();
            body.insert("path".into(), Value::from(chunk.to_vec()));
            body.insert("copy".into(), Value::from(0));
            body.insert("inode".into(), Value::Array(Vec::new()));
            body.insert("key".into(), Value::from(key));
            body.insert("topic".into(), Value::from(s.topic.as_str()));
            serde_json::to_vec(&body).expect("strings serialize")
        };
        let overhead = body_for(&[]).len();
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
                out.push(body_for(&paths[start..i]));
                start = i;
                size = overhead + len;
            } else {
                size += cost;
            }
        }
        if start < paths.len() {
            out.push(body_for(&paths[start..]));
        }
        debug_assert!(out.iter().all(|b| b.len() <= s.max_body_bytes));
        Ok(out)
    }

    /// The current token, logging in if there is none.
    async fn token(&self) -> Result<(String, u64), ScoutError> {
        {
            let t = self.inner.token.read().await;
            if let (Some(tok), generation) = &*t {
                return Ok((tok.clone(), *generation));
            }
        }
        self.refresh(0).await
    }

    /// Replaces the token known as generation `stale`. Callers that saw the same stale
    /// token wait on one login and share its result.
    async fn refresh(&self, stale: u64) -> Result<(String, u64), ScoutError> {
        let _one_login = self.inner.login.lock().await;
        {
            let t = self.inner.token.read().await;
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
        let ep = s.login_path.clone();
        self.inner.counters.logins.fetch_add(1, Ordering::Relaxed);
        let answer = self.exchange_all(Method::POST, &ep, None, Some(&body), None, Retry::Full);
        let bytes = match answer.await? {
            Some(b) => b,
            None => {
                return Err(ScoutError::Refused {
                    status: 403,
                    body: "login refused".into(),
                });
            }
        };
        #[derive(Deserialize)]
        struct Login {
            response: String,
        }
        let token = serde_json::from_slice::<Login>(&bytes)
            .map_err(|e| ScoutError::BadAnswer(format!("login: {e}")))?
            .response;
        let mut t = self.inner.token.write().await;
        t.0 = Some(token.clone());
        t.1 += 1;
        Ok((token, t.1))
    }

    /// One authenticated call: the token, the exchange, and on 403 one refresh and retry.
    async fn call(
        &self,
        method: Method,
        endpoint: &str,
        query: Option<(&str, &str)>,
        body: Option<Vec<u8>>,
        retry: Retry,
    ) -> Result<Vec<u8>, ScoutError> {
        let (token, generation) = self.token().await?;
        let first = self
            .exchange_all(
                method.clone(),
                endpoint,
                query,
                body.as_deref(),
                Some(&token),
                retry,
            )
            .await?;
        if let Some(b) = first {
            return Ok(b);
        }
        let (token, _) = self.refresh(generation).await?;
        match self
            .exchange_all(
                method,
                endpoint,
                query,
                body.as_deref(),
                Some(&token),
                retry,
            )
            .await?
        {
            Some(b) => Ok(b),
            None => {
                self.inner.counters.refusals.fetch_add(1, Ordering::Relaxed);
                Err(ScoutError::Refused {
                    status: 403,
                    body: "forbidden even after a fresh login".into(),
                })
            }
        }
    }

    /// The exchange over the nodes with fail-over and retries. `Ok(None)` is a 403.
    async fn exchange_all(
        &self,
        method: Method,
        endpoint: &str,
        query: Option<(&str, &str)>,
        body: Option<&[u8]>,
        token: Option<&str>,
        retry: Retry,
    ) -> Result<Option<Vec<u8>>, ScoutError> {
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
                tokio::time::sleep(backoff(s.backoff_initial, s.backoff_max, round - 1)).await;
            }
            let mut tried = Vec::with_capacity(pool.len());
            for _ in 0..pool.len() {
                let i = pool.pick(&tried);
                tried.push(i);
                if attempts > 0 {
                    self.inner.counters.retries.fetch_add(1, Ordering::Relaxed);
                }
                attempts += 1;
                let started = Instant::now();
                let outcome = self
                    .exchange(
                        &pool.node(i).base,
                        method.clone(),
                        endpoint,
                        query,
                        body,
                        token,
                    )
                    .await;
                match outcome {
                    Outcome::Ok(b) => {
                        pool.answered(i, started.elapsed(), true);
                        return Ok(Some(b));
                    }
                    Outcome::Forbidden => {
                        pool.answered(i, started.elapsed(), false);
                        return Ok(None);
                    }
                    Outcome::Refused(status, body) => {
                        pool.answered(i, started.elapsed(), false);
                        self.inner.counters.refusals.fetch_add(1, Ordering::Relaxed);
                        return Err(ScoutError::Refused { status, body });
                    }
                    Outcome::Transient(why) => {
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

    async fn exchange(
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
            Err(e) => return Outcome::Transient(error_chain(&e)),
        };
        let status = resp.status();
        let bytes = match resp.bytes().await {
            Ok(b) => b.to_vec(),
            Err(e) => return Outcome::Transient(error_chain(&e)),
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

/// Exponential back-off with jitter: between half and all of `initial * 2^round`, capped.
fn backoff(initial: Duration, max: Duration, round: u32) -> Duration {
    let full = initial.saturating_mul(1u32 << round.min(20)).min(max);
    let ms = full.as_millis() as u64;
    if ms == 0 {
        return full;
    }
    Duration::from_millis(rand::rng().random_range(ms / 2..=ms))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
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

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let i = Duration::from_millis(100);
        let m = Duration::from_secs(1);
        for _ in 0..50 {
            let b0 = backoff(i, m, 0);
            assert!(b0 >= Duration::from_millis(50) && b0 <= i);
            let b3 = backoff(i, m, 3);
            assert!(b3 >= Duration::from_millis(400) && b3 <= Duration::from_millis(800));
            assert!(backoff(i, m, 30) <= m);
        }
    }
}
