//! Kafka ingest: the tape system's recall messages, applied to the store in batches.
//!
//! Invariants:
//! - An offset is committed only after the transaction that applied its batch committed. A
//!   crash or a store failure before that means the batch is read again, and re-applying a
//!   batch changes nothing (the store's updates are idempotent): at-least-once delivery,
//!   exactly-once effect.
//! - One call to the [`PathMapper`] and one store transaction per batch, never per message.
//! - No message stalls or stops the consumer: a malformed one (not JSON, no `Filename`, wrong
//!   types, too large) is counted, logged at a bounded rate and skipped with its batch; one
//!   about a file no job wants is counted, not logged.
//! - A store failure is retried with back-off, the batch held in memory and uncommitted; a
//!   lost broker is reconnected forever (librdkafka's own back-off, capped at a few
//!   seconds so that a returning broker is used within seconds), and the API keeps serving
//!   meanwhile. [`IngestStatus`] reports what the consumer really sees, stalls included.
//! - A recall message never settles a file for a job that asked for it after the recall
//!   was requested and completed (`RequestTime` and `CompleteTime` both before the job,
//!   beyond `clock_skew_secs`): after a replay
//!   of the topic (a new group, expired offsets) an old recall is not this job's, and the
//!   file may have left the disk cache since. The job's own stage request brings a fresh
//!   message (see `store::ingest`); such events are counted as `stale`.
//! - A consumer that stays out of its group while the brokers answer (librdkafka did for
//!   25 s and more after an outage longer than the session) is re-created, after 8 s and
//!   then at doubling intervals.
//! - Each daemon is a static member of its group (`group.instance.id`, stable across its
//!   restarts and distinct between daemons): a restarted daemon takes its partitions back
//!   at once instead of waiting out its dead predecessor's session.

mod commit;
mod status;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use serde::Deserialize;
use thiserror::Error;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backoff::{Backoff, Jitter};
use crate::config::KafkaConfig;
use crate::store::{FileEvent, Store, now_ms};
use commit::Committer;
use status::RateLimited;
pub use status::{IngestCounters, IngestStatus};

#[derive(Debug, Error)]
pub enum IngestError {
    #[error("Kafka client configuration: {0}")]
    Config(#[source] KafkaError),
    #[error("subscribing to topic {topic}: {source}")]
    Subscribe {
        topic: String,
        #[source]
        source: KafkaError,
    },
}

/// Turns the tape system's file names into job paths, one batch at a time. `None`: the
/// file is not one this deployment stages (so no job can want it). The result has one entry
/// per name, in order. An error (the telescope adapter failed) leaves the batch unapplied
/// and uncommitted; it is retried.
pub trait PathMapper: Send + Sync + 'static {
    fn map_paths<'a>(
        &'a self,
        names: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<String>>, String>>;
}

/// Job paths are the tape system's file names (no adapter loaded).
pub struct IdentityMapper;

impl PathMapper for IdentityMapper {
    fn map_paths<'a>(
        &'a self,
        names: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<String>>, String>> {
        Box::pin(std::future::ready(Ok(names
            .iter()
            .cloned()
            .map(Some)
            .collect())))
    }
}

impl<F> PathMapper for F
where
    F: Fn(&[String]) -> Vec<Option<String>> + Send + Sync + 'static,
{
    fn map_paths<'a>(
        &'a self,
        names: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<String>>, String>> {
        Box::pin(std::future::ready(Ok(self(names))))
    }
}

/// Maps names with the telescope adapter in service (identity while none is configured),
/// looked up per batch so that a hot swap applies to the next batch.
pub struct AdapterMapper(pub crate::adapter::Adapters);

impl PathMapper for AdapterMapper {
    fn map_paths<'a>(
        &'a self,
        names: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<String>>, String>> {
        Box::pin(async move {
            match self.0.current() {
                Some(adapter) => adapter
                    .map_event_paths(names)
                    .await
                    .map_err(|e| e.to_string()),
                None => Ok(names.iter().cloned().map(Some).collect()),
            }
        })
    }
}

/// The librdkafka settings for `[kafka]`: manual commits, earliest offset on a new group,
/// statistics for liveness, then the `extra` table on top.
pub fn client_config(c: &KafkaConfig) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", c.brokers.join(","))
        .set("group.id", &c.group_id)
        .set("client.id", &c.client_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", STATS_INTERVAL_MS.to_string())
        .set("reconnect.backoff.ms", "100")
        // librdkafka doubles the wait after every failed connection; with a broker gone
        // for a minute the wait grew to its cap, and that cap is how late the consumer
        // noticed the broker back.
        .set(
            "reconnect.backoff.max.ms",
            RECONNECT_BACKOFF_MAX_MS.to_string(),
        )
        .set("security.protocol", c.security_protocol.as_str());
    if !c.instance_id.is_empty() {
        cfg.set("group.instance.id", &c.instance_id);
    }
    if c.security_protocol.uses_sasl() {
        cfg.set("sasl.mechanism", c.sasl_mechanism.as_str())
            .set("sasl.username", &c.username)
            .set(
                "sasl.password",
                c.password.as_ref().map(|p| p.expose()).unwrap_or(""),
            );
    }
    if let Some(ca) = &c.ca_file {
        cfg.set("ssl.ca.location", ca.display().to_string());
    }
    for (k, v) in &c.extra {
        cfg.set(k, v);
    }
    cfg
}

/// librdkafka's `builtin.features` as built into this binary (e.g. `ssl,sasl_scram,...`).
pub fn builtin_features() -> Result<String, KafkaError> {
    ClientConfig::new()
        .create_native_config()?
        .get("builtin.features")
}

/// Longest a stopping (or re-created) consumer waits for its last offset commit.
const COMMIT_WAIT: Duration = Duration::from_secs(10);

/// How often librdkafka reports broker states; the liveness heartbeat follows it.
const STATS_INTERVAL_MS: u64 = 1000;

/// Longest wait between two connection attempts to a lost broker.
const RECONNECT_BACKOFF_MAX_MS: u64 = 2000;

/// The default `group.instance.id` of a daemon: its client id, host name and listen
/// address. A restart of the same daemon gives the same id (so Kafka hands its partitions
/// straight back); two daemons on one host listen on different addresses. Characters Kafka
/// does not accept in the id become `_`.
pub fn default_instance_id(client_id: &str, listen: std::net::SocketAddr) -> String {
    let id = format!("{client_id}-{}-{listen}", hostname());
    let id: String = id
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '_' | '-' => c,
            _ => '_',
        })
        .collect();
    id.chars().take(249).collect()
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Batch bounds and limits, from `[kafka]`.
#[derive(Debug, Clone)]
pub struct IngestSettings {
    pub topic: String,
    pub batch_max_messages: usize,
    pub batch_max_wait: Duration,
    pub max_message_bytes: usize,
    /// How far the tape system's clock may be behind ours (see [`Store::apply_ingest_batch`]).
    pub clock_skew: Duration,
    /// Lag without progress for this long is a stall.
    pub stall_after: Duration,
}

impl IngestSettings {
    pub fn from_config(c: &KafkaConfig) -> Self {
        Self {
            topic: c.topic.clone(),
            batch_max_messages: c.batch_max_messages,
            batch_max_wait: Duration::from_millis(c.batch_max_wait_ms),
            max_message_bytes: c.max_message_bytes,
            clock_skew: Duration::from_secs(c.clock_skew_secs),
            stall_after: Duration::from_secs(c.stall_secs),
        }
    }
}

/// The running consumer.
pub struct IngestHandle {
    status: IngestStatus,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl IngestHandle {
    pub fn status(&self) -> IngestStatus {
        self.status.clone()
    }

    /// Stops after the batch in hand (applied and committed, or left for redelivery).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Creates the consumer, subscribes and starts ingesting in a task of its own. Fails only
/// on a configuration librdkafka refuses; an unreachable broker is waited for.
pub fn start(
    config: &KafkaConfig,
    store: Store,
    mapper: Arc<dyn PathMapper>,
) -> Result<IngestHandle, IngestError> {
    start_with(
        client_config(config),
        IngestSettings::from_config(config),
        store,
        mapper,
    )
}

/// [`start`] with explicit librdkafka settings (tests and benchmarks shorten timeouts).
pub fn start_with(
    client: ClientConfig,
    settings: IngestSettings,
    store: Store,
    mapper: Arc<dyn PathMapper>,
) -> Result<IngestHandle, IngestError> {
    let status = IngestStatus::new(
        Duration::from_millis(STATS_INTERVAL_MS * 5),
        settings.stall_after,
        settings.batch_max_messages as i64,
    );
    let consumer = create_consumer(&client, &settings.topic, &status)?;
    let (stop, stopped) = watch::channel(false);
    let ingest = Ingest {
        client,
        settings,
        store,
        mapper,
        status: status.clone(),
        malformed_log: RateLimited::new(Duration::from_secs(10)),
        stale_log: RateLimited::new(Duration::from_secs(60)),
        error_log: RateLimited::new(Duration::from_secs(30)),
        stopped,
    };
    status.set_running(true);
    let task = tokio::spawn(ingest.run(Arc::new(consumer)));
    Ok(IngestHandle { status, stop, task })
}

fn create_consumer(
    client: &ClientConfig,
    topic: &str,
    status: &IngestStatus,
) -> Result<StreamConsumer<Context>, IngestError> {
    let consumer: StreamConsumer<Context> = client
        .create_with_context(Context {
            status: status.clone(),
            topic: topic.to_string(),
            log_limit: RateLimited::new(Duration::from_secs(30)),
            responses: AtomicU64::new(0),
        })
        .map_err(IngestError::Config)?;
    consumer
        .subscribe(&[topic])
        .map_err(|source| IngestError::Subscribe {
            topic: topic.to_string(),
            source,
        })?;
    Ok(consumer)
}

/// Sees librdkafka's broker states and errors: the source of the liveness figures.
struct Context {
    status: IngestStatus,
    topic: String,
    log_limit: RateLimited,
    /// Responses from every broker, as of the last statistics.
    responses: AtomicU64,
}

impl ClientContext for Context {
    fn stats(&self, stats: Statistics) {
        // Only a response proves that a broker answers: librdkafka went on showing a
        // connection UP for seconds after its broker went away, and the consumer, out of
        // its group through the outage, was re-created before the broker was back.
        let responses: u64 = stats.brokers.values().map(|b| b.rx).sum();
        let before = self.responses.swap(responses, Ordering::Relaxed);
        if responses <= before || !stats.brokers.values().any(|b| b.state == "UP") {
            return;
        }
        self.status.heartbeat();
        let (in_group, assigned) = match &stats.cgrp {
            Some(g) => (
                g.state == "up" && g.join_state == "steady",
                Some(i64::from(g.assignment_size)),
            ),
            None => (false, None),
        };
        // The messages not read yet on the partitions this member holds: from what was read,
        // or from the committed offsets before the first read.
        let unread = stats.topics.get(&self.topic).map(|t| {
            t.partitions
                .values()
                .filter(|p| p.partition >= 0 && p.desired)
                .map(|p| {
                    let end = p.hi_offset;
                    let at = if p.app_offset >= 0 {
                        p.app_offset
                    } else {
                        p.committed_offset
                    };
                    if end >= 0 && at >= 0 && end >= at {
                        end - at
                    } else {
                        0
                    }
                })
                .sum::<i64>()
        });
        self.status
            .observe(in_group, assigned, if in_group { unread } else { None });
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.status.all_brokers_down();
        }
        self.log_limit.log(|suppressed| {
            tracing::warn!(error = %error, reason, suppressed, "Kafka client error");
        });
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        // A lost broker makes librdkafka repeat itself every reconnect: bound the noise.
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning => self.log_limit.log(|suppressed| {
                tracing::warn!(facility = fac, suppressed, "librdkafka: {message}");
            }),
            _ => tracing::debug!(facility = fac, "librdkafka: {message}"),
        }
    }
}

impl ConsumerContext for Context {}

/// One message, read and checked; the broker's copy is not kept. Public, with [`parse`],
/// so that the fault suite can try the parser on arbitrary bytes.
#[derive(Debug)]
pub enum Parsed {
    Event {
        name: String,
        error: Option<String>,
        at_ms: i64,
    },
    Malformed(String),
}

/// The production message: `{"Inode":..,"Filename":..,"RequestTime":..,"CompleteTime":..,"Error":""}`.
#[derive(Deserialize)]
struct Recall {
    #[serde(rename = "Filename")]
    filename: String,
    #[serde(rename = "Error", default)]
    error: Option<String>,
    #[serde(rename = "RequestTime", default)]
    request_time: Option<String>,
    #[serde(rename = "CompleteTime", default)]
    complete_time: Option<String>,
}

/// Parses the tape system's time, e.g. `2022-02-04 03:02:32 +0000 GMT`.
fn parse_time_ms(s: &str) -> Option<i64> {
    let s = s.trim();
    let s = s
        .strip_suffix(" GMT")
        .or_else(|| s.strip_suffix(" UTC"))
        .unwrap_or(s);
    chrono::DateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f %z")
        .ok()
        .map(|t| t.timestamp_millis())
}

/// Reads one message body: an event, or why it is malformed (the consumer counts and skips
/// those). Never panics, whatever the bytes. The event's time is the later of
/// `RequestTime` and `CompleteTime`; `fallback_ms` when the body gives neither readably
/// (the consumer passes the broker's timestamp).
pub fn parse(payload: Option<&[u8]>, max_bytes: usize, fallback_ms: i64) -> Parsed {
    let Some(bytes) = payload else {
        return Parsed::Malformed("no payload".into());
    };
    if bytes.len() > max_bytes {
        return Parsed::Malformed(format!("{} bytes, over the {max_bytes} limit", bytes.len()));
    }
    // serde reads a struct from a JSON array too, by position: `["mwa/x"]` would be an
    // event. A recall message is an object.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Parsed::Malformed("not a JSON object".into());
    }
    match serde_json::from_slice::<Recall>(bytes) {
        Ok(r) if r.filename.is_empty() => Parsed::Malformed("empty Filename".into()),
        Ok(r) => Parsed::Event {
            // The later of the two times: a file already on disk may be reported to a fresh
            // request with the time it was recalled long ago, and the fresh `RequestTime`
            // is what shows the message answers this request and is no replay.
            at_ms: [&r.request_time, &r.complete_time]
                .into_iter()
                .filter_map(|t| t.as_deref().and_then(parse_time_ms))
                .max()
                .unwrap_or(fallback_ms),
            name: r.filename,
            error: r.error.filter(|e| !e.is_empty()),
        },
        Err(e) => Parsed::Malformed(e.to_string()),
    }
}

struct Ingest {
    client: ClientConfig,
    settings: IngestSettings,
    store: Store,
    mapper: Arc<dyn PathMapper>,
    status: IngestStatus,
    malformed_log: RateLimited,
    stale_log: RateLimited,
    /// A lost broker can make every read fail: bound the noise.
    error_log: RateLimited,
    stopped: watch::Receiver<bool>,
}

/// A batch read from the consumer: parsed messages and the offsets to commit after it.
#[derive(Default)]
struct Batch {
    messages: Vec<Parsed>,
    /// partition -> next offset to read.
    next_offsets: HashMap<i32, i64>,
}

impl Ingest {
    /// Fills the next batch while the last one is being applied, so that the broker and the
    /// store work at the same time. Offsets are still committed strictly after their batch's
    /// transaction, one batch at a time and in order.
    async fn run(self, mut consumer: Arc<StreamConsumer<Context>>) {
        let mut stopped = self.stopped.clone();
        let mut committer = self.committer(&consumer);
        let mut recv_errors = 0u32;
        // The batch being filled, and when it is handed over (set by its first message).
        let mut next = Batch::default();
        let mut deadline: Option<Instant> = None;
        // Set by each message read: whether the client holds more is yet to be seen.
        let mut check_held = false;
        // After a read error, no read before this.
        let mut paused_until: Option<Instant> = None;
        // The batch being applied; it gives the batch back with whether it was applied.
        let mut inflight: Option<BoxFuture<'_, (Batch, bool)>> = None;
        let mut inflight_len = 0usize;
        let mut group_check = tokio::time::interval(Duration::from_secs(1));
        group_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.status
                .set_in_hand(next.messages.len() + inflight.as_ref().map_or(0, |_| inflight_len));
            let full = next.messages.len() >= self.settings.batch_max_messages;
            let due = full || deadline.is_some_and(|d| Instant::now() >= d);
            if inflight.is_none() && due {
                let batch = std::mem::take(&mut next);
                deadline = None;
                inflight_len = batch.messages.len();
                inflight = Some(Box::pin(self.apply(batch, stopped.clone())));
                continue;
            }
            let may_read = !full && paused_until.is_none_or(|t| Instant::now() >= t);
            // Set when this client is to be replaced by a new one.
            let mut replace = false;
            tokio::select! {
                biased;
                _ = stopped.changed() => break,
                (batch, applied) = async { inflight.as_mut().expect("guarded").await },
                    if inflight.is_some() =>
                {
                    inflight = None;
                    if !applied {
                        // Stopped before it was applied: it stays uncommitted, for redelivery.
                        break;
                    }
                    self.finish_batch(&committer, &batch);
                }
                m = consumer.recv(), if may_read => {
                    let mut error = None;
                    match m {
                        Ok(m) => {
                            recv_errors = 0;
                            paused_until = None;
                            self.take(&mut next, &m);
                            deadline.get_or_insert_with(|| Instant::now() + self.settings.batch_max_wait);
                            check_held = true;
                        }
                        Err(e) => error = Some(e),
                    }
                    if let Some(e) = error {
                        self.status.count_consumer_error();
                        recv_errors += 1;
                        let fatal = e.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal);
                        self.error_log.log(|suppressed| {
                            tracing::warn!(error = %e, fatal, suppressed, "Kafka consumer error");
                        });
                        if !fatal {
                            // The batch in hand stays good; reading resumes after a pause
                            // of a few milliseconds. librdkafka queues an error for every
                            // failed connection while a broker is gone, and the group's
                            // rebalance comes through the same queue: paused up to 1.6 s
                            // an error, the consumer was still working through the outage's
                            // errors 25 s after the broker was back, its partitions not yet
                            // taken (librdkafka waiting for the assignment to be served).
                            paused_until = Some(Instant::now() + READ_BACKOFF.delay(recv_errors));
                            continue;
                        }
                        // A fatal error ends this client.
                        replace = true;
                    }
                }
                // Reached only when no message is ready (the branch above comes first): the
                // client holds nothing more, so the batch is due at once and a message never
                // waits for others that are not there. Under load batches still grow,
                // filling while the one before is applied; `batch_max_wait` only caps how
                // long a steady stream keeps a batch open.
                _ = std::future::ready(()), if check_held && may_read => {
                    check_held = false;
                    let now = Instant::now();
                    deadline = deadline.map(|d| d.min(now));
                }
                _ = group_check.tick() => {
                    if !self.status.rejoin_due() {
                        continue;
                    }
                    tracing::warn!(
                        "the Kafka consumer stays out of its group while the brokers answer; re-creating it"
                    );
                    replace = true;
                }
                _ = sleep_until_some(deadline), if deadline.is_some() && inflight.is_none() => {}
                _ = sleep_until_some(paused_until), if paused_until.is_some() && !may_read => {
                    paused_until = None;
                }
            }
            if replace {
                // The old client's batch being applied is finished and committed through
                // it; what it read beyond that is dropped uncommitted and read again by the
                // new client.
                if let Some(f) = inflight.take() {
                    let (batch, applied) = f.await;
                    if !applied {
                        break;
                    }
                    self.finish_batch(&committer, &batch);
                }
                next = Batch::default();
                deadline = None;
                committer.close(COMMIT_WAIT).await;
                consumer = match self.recreate(consumer, &mut stopped).await {
                    Some(c) => c,
                    None => {
                        self.status.set_running(false);
                        return;
                    }
                };
                committer = self.committer(&consumer);
            }
        }
        // Stopping: the batch being applied is finished (the store's retries give up on stop)
        // and committed if it was applied; the one being filled is left for redelivery. The
        // last commit is waited for: one still on its way when the client closes may never
        // reach the broker, and the next daemon would read those messages again.
        if let Some(f) = inflight.take() {
            let (batch, applied) = f.await;
            if applied {
                self.finish_batch(&committer, &batch);
            }
        }
        committer.close(COMMIT_WAIT).await;
        self.status.set_running(false);
        // Leaving the group blocks in librdkafka; keep it off the async workers.
        let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
    }

    fn committer(&self, consumer: &Arc<StreamConsumer<Context>>) -> Committer {
        Committer::start(
            consumer.clone(),
            self.settings.topic.clone(),
            self.status.clone(),
        )
    }

    async fn recreate(
        &self,
        old: Arc<StreamConsumer<Context>>,
        stopped: &mut watch::Receiver<bool>,
    ) -> Option<Arc<StreamConsumer<Context>>> {
        let _ = tokio::task::spawn_blocking(move || drop(old)).await;
        let mut attempt = 0;
        loop {
            match create_consumer(&self.client, &self.settings.topic, &self.status) {
                Ok(c) => return Some(Arc::new(c)),
                Err(e) => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "recreating the Kafka consumer failed");
                    if sleep_or_stop(CREATE_BACKOFF.delay(attempt), stopped).await {
                        return None;
                    }
                }
            }
        }
    }

    fn take(&self, batch: &mut Batch, m: &BorrowedMessage<'_>) {
        self.status.message_received();
        let fallback = m.timestamp().to_millis().unwrap_or_else(now_ms);
        let parsed = parse(m.payload(), self.settings.max_message_bytes, fallback);
        if let Parsed::Malformed(why) = &parsed {
            self.status.count_malformed();
            let (partition, offset) = (m.partition(), m.offset());
            self.malformed_log.log(|suppressed| {
                tracing::warn!(partition, offset, reason = %why, suppressed, "skipping a malformed Kafka message");
            });
        }
        batch.messages.push(parsed);
        let next = batch.next_offsets.entry(m.partition()).or_insert(0);
        *next = (*next).max(m.offset() + 1);
    }

    /// Maps names and applies the batch, retrying store failures until it succeeds.
    /// Gives the batch back, with false if asked to stop first.
    async fn apply(&self, batch: Batch, mut stopped: watch::Receiver<bool>) -> (Batch, bool) {
        let applied = self.apply_inner(&batch, &mut stopped).await;
        (batch, applied)
    }

    async fn apply_inner(&self, batch: &Batch, stopped: &mut watch::Receiver<bool>) -> bool {
        let mut names = Vec::with_capacity(batch.messages.len());
        let mut which = Vec::with_capacity(batch.messages.len());
        for (i, m) in batch.messages.iter().enumerate() {
            if let Parsed::Event { name, .. } = m {
                names.push(name.clone());
                which.push(i);
            }
        }
        let mut mapped = Vec::new();
        let mut map_failures = 0u32;
        while !names.is_empty() {
            match self.mapper.map_paths(&names).await {
                Ok(m) => {
                    mapped = m;
                    break;
                }
                Err(e) => {
                    map_failures += 1;
                    self.status.count_mapping_error();
                    tracing::error!(error = %e, failures = map_failures, "mapping Kafka file names failed; retrying (offsets not committed)");
                    if sleep_or_stop(APPLY_BACKOFF.delay(map_failures), stopped).await {
                        return false;
                    }
                }
            }
        }
        if mapped.len() != names.len() {
            tracing::error!(
                names = names.len(),
                answers = mapped.len(),
                "the path mapper answered for a different number of files; using the names as paths"
            );
            self.status.count_mapping_error();
            mapped = names.into_iter().map(Some).collect();
        }
        let mut events = Vec::with_capacity(mapped.len());
        let mut not_ours = 0u64;
        for (i, path) in which.into_iter().zip(mapped) {
            let Parsed::Event { error, at_ms, .. } = &batch.messages[i] else {
                continue;
            };
            match path {
                Some(path) => events.push(FileEvent {
                    path,
                    at_ms: *at_ms,
                    error: error.clone(),
                }),
                None => not_ours += 1,
            }
        }
        let mut failures = 0u32;
        loop {
            if events.is_empty() {
                break;
            }
            let skew_ms = self.settings.clock_skew.as_millis() as i64;
            match self.store.apply_ingest_batch(&events, skew_ms).await {
                Ok(outcome) => {
                    if outcome.stale > 0 {
                        self.status.count_stale(outcome.stale);
                        self.stale_log.log(|suppressed| {
                            tracing::warn!(
                                events = outcome.stale,
                                suppressed,
                                clock_skew_secs = self.settings.clock_skew.as_secs(),
                                "recall messages older than the jobs waiting for their files were not taken as their recall (a replayed topic, or the tape system's clock behind ours)"
                            );
                        });
                    }
                    self.status.batch_applied(
                        events.len() as u64,
                        outcome.changed,
                        outcome.unknown + not_ours,
                        outcome.unknown < events.len() as u64,
                    );
                    return true;
                }
                Err(e) => {
                    failures += 1;
                    self.status.count_store_failure();
                    tracing::error!(error = %e, failures, events = events.len(), "applying a Kafka batch failed; retrying (offsets not committed)");
                    if sleep_or_stop(APPLY_BACKOFF.delay(failures), stopped).await {
                        return false;
                    }
                }
            }
        }
        self.status.batch_applied(0, 0, not_ours, false);
        true
    }

    /// Hands an applied batch's offsets to the committer and counts it done.
    fn finish_batch(&self, committer: &Committer, batch: &Batch) {
        committer.commit(&batch.next_offsets);
        self.status.batch_done(batch.messages.len() as u64);
    }
}

/// Sleeps unless asked to stop first; returns whether to stop.
async fn sleep_or_stop(d: Duration, stopped: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *stopped.borrow(),
        _ = stopped.changed() => true,
    }
}

/// Waits until `at`; a select branch guarded by `at.is_some()`.
async fn sleep_until_some(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

/// Waits after a failed read (a few milliseconds: the errors queued during an outage are
/// read one by one before what follows them), a failed mapping or store transaction, and a
/// failed consumer creation.
const READ_BACKOFF: Backoff = Backoff::new(
    Duration::from_millis(1),
    Duration::from_millis(20),
    Jitter::LowerHalf,
);
const APPLY_BACKOFF: Backoff =
    Backoff::new(MS_100, Duration::from_millis(12_800), Jitter::LowerHalf);
const CREATE_BACKOFF: Backoff =
    Backoff::new(MS_100, Duration::from_millis(25_600), Jitter::LowerHalf);
const MS_100: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_production_format() {
        let m = br#"{"Inode":45871,"Filename":"nfs/file1","RequestTime":"2022-02-04 03:01:38 +0000 GMT","CompleteTime":"2022-02-04 03:02:32 +0000 GMT","Error":""}"#;
        match parse(Some(m), 1000, 0) {
            Parsed::Event { name, error, at_ms } => {
                assert_eq!(name, "nfs/file1");
                assert_eq!(error, None);
                assert_eq!(at_ms, 1_643_943_752_000);
            }
            Parsed::Malformed(w) => panic!("{w}"),
        }
        // A file already on disk, reported to a fresh request with its old recall time:
        // the message's time is the request's, so that it is not taken for a replay.
        let m = br#"{"Filename":"f","RequestTime":"2026-12-02 10:00:00 +0000 GMT","CompleteTime":"2022-02-04 03:02:32 +0000 GMT","Error":""}"#;
        match parse(Some(m), 1000, 0) {
            Parsed::Event { at_ms, .. } => assert_eq!(at_ms, 1_796_205_600_000),
            Parsed::Malformed(w) => panic!("{w}"),
        }
        let m = br#"{"Filename":"f","Error":"tape error","CompleteTime":"garbage"}"#;
        match parse(Some(m), 1000, 7) {
            Parsed::Event { error, at_ms, .. } => {
                assert_eq!(error.as_deref(), Some("tape error"));
                assert_eq!(at_ms, 7, "an unreadable time falls back");
            }
            Parsed::Malformed(w) => panic!("{w}"),
        }
    }

    #[test]
    fn instance_ids_are_stable_per_daemon_and_distinct_between_daemons() {
        let a: std::net::SocketAddr = "127.0.0.1:8000".parse().unwrap();
        let b: std::net::SocketAddr = "[::1]:8001".parse().unwrap();
        let id = default_instance_id("staged", a);
        assert_eq!(
            id,
            default_instance_id("staged", a),
            "the same after a restart"
        );
        assert_ne!(
            id,
            default_instance_id("staged", b),
            "two daemons on one host"
        );
        for id in [id, default_instance_id("staged", b)] {
            assert!(
                id.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')),
                "{id}"
            );
            assert!(id.starts_with("staged-") && id.ends_with("8000") || id.ends_with("8001"));
        }
        let cfg = client_config(&KafkaConfig {
            instance_id: "daemon-1".into(),
            ..KafkaConfig::default()
        });
        assert_eq!(cfg.get("group.instance.id"), Some("daemon-1"));
    }

    #[test]
    fn malformed_messages_are_recognised() {
        for bad in [
            &b"not json"[..],
            br#"{"Inode":1}"#,
            br#"{"Filename":12}"#,
            br#"{"Filename":"x","Error":5}"#,
            br#"{"Filename":""}"#,
            br#"[1,2]"#,
            br#"["mwa/1/1_ch001.fits"]"#,
            br#" ["f", "", "2022-02-04 03:02:32 +0000 GMT"]"#,
        ] {
            assert!(
                matches!(parse(Some(bad), 1000, 0), Parsed::Malformed(_)),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(parse(None, 1000, 0), Parsed::Malformed(_)));
        let huge = format!(r#"{{"Filename":"{}"}}"#, "a".repeat(2000));
        assert!(matches!(
            parse(Some(huge.as_bytes()), 1000, 0),
            Parsed::Malformed(_)
        ));
    }
}
