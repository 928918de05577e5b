//! Kafka ingest against a real Kafka-protocol broker in the test process (librdkafka's mock
//! cluster), applied to a real SQLite file and a real PostgreSQL database.
//!
//! Every test has its own broker, topic and consumer group, so tests run in parallel.
//! Commits are checked by resuming with a new member of the same group (calling
//! `committed()` on the mock and then dropping the consumer hangs librdkafka).

use std::sync::Arc;
use std::time::Duration;

use crate::common::{Kind, TestApp, TestDb};
use crate::common::{files_job, wait_for};
use rdkafka::ClientConfig;
use rdkafka::consumer::BaseConsumer;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use serde_json::json;
use staged::config::{Config, KafkaConfig};
use staged::kafka::{self, IdentityMapper, IngestHandle, PathMapper};
use staged::scout::{ScoutClient, ScoutSettings};
use staged::store::{NewJob, Store, StoreOptions};
use staged_testkit::scout::{FileState, ScoutSim, SimSettings, recall_message};

const TOPIC: &str = "recalls";

/// Fields drop in order: the producer before the cluster it talks to.
struct Broker {
    producer: FutureProducer,
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl Broker {
    fn new() -> Broker {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic(TOPIC, 3, 1).unwrap();
        let producer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("linger.ms", "1")
            .create()
            .unwrap();
        Broker { cluster, producer }
    }

    fn servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// Sends with a random key: any partition.
    async fn send(&self, payload: &[u8]) {
        self.send_keyed(&rand::random::<u32>().to_string(), payload)
            .await
    }

    async fn send_keyed(&self, key: &str, payload: &[u8]) {
        self.producer
            .send(
                FutureRecord::to(TOPIC).payload(payload).key(key),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }

    /// Keyed by path, so that the messages about one file stay in order (one partition).
    async fn ready(&self, path: &str, at: &str) {
        self.send_keyed(path, message(path, at, "").as_bytes())
            .await;
    }

    async fn failed(&self, path: &str, at: &str, error: &str) {
        self.send_keyed(path, message(path, at, error).as_bytes())
            .await;
    }

    /// `[kafka]` for this broker, with test-sized group timeouts.
    fn config(&self, group: &str) -> KafkaConfig {
        KafkaConfig {
            batch_max_messages: 500,
            batch_max_wait_ms: 50,
            ..crate::common::pipeline::kafka_config(&self.servers(), group)
        }
    }
}

/// The day the recall times of these tests fall on: tomorrow (fixed for the run), so that
/// every recall completed after the jobs it settles were created.
fn day() -> chrono::NaiveDate {
    static DAY: std::sync::OnceLock<chrono::NaiveDate> = std::sync::OnceLock::new();
    *DAY.get_or_init(|| (chrono::Utc::now() + chrono::Duration::days(1)).date_naive())
}

/// A message in the production format, with `at` (`HH:MM:SS` on [`day`]) as CompleteTime
/// and, as the tape system sends them, a RequestTime before it (the message's time is the
/// later of the two).
fn message(path: &str, at: &str, error: &str) -> String {
    json!({
        "Inode": 45871,
        "Filename": path,
        "RequestTime": format!("{} 00:00:00 +0000 GMT", day()),
        "CompleteTime": format!("{} {at} +0000 GMT", day()),
        "Error": error,
    })
    .to_string()
}

/// Unix ms of `HH:MM:SS` on [`day`], UTC.
fn at_ms(at: &str) -> i64 {
    let t = chrono::NaiveTime::parse_from_str(at, "%H:%M:%S").unwrap();
    day().and_time(t).and_utc().timestamp_millis()
}

async fn open_store(db: &TestDb) -> Store {
    let jobs = staged::config::JobsConfig {
        expiry_secs: 3600,
        ..Default::default()
    };
    Store::open(&StoreOptions::from_config(&db.config().database, &jobs))
        .await
        .unwrap()
}

async fn submit(store: &Store, id: i64, files: &[&str]) {
    store
        .submit(NewJob {
            job_id: id,
            notify_url: "http://127.0.0.1:9/cb".into(),
            files: files.iter().map(|s| s.to_string()).collect(),
            obs: None,
            submitted_by: None,
            ..Default::default()
        })
        .await
        .unwrap();
}

fn consume(broker: &Broker, group: &str, store: &Store) -> IngestHandle {
    consume_mapped(broker, group, store, Arc::new(IdentityMapper))
}

fn consume_mapped(
    broker: &Broker,
    group: &str,
    store: &Store,
    mapper: Arc<dyn PathMapper>,
) -> IngestHandle {
    kafka::start(&broker.config(group), store.clone(), mapper).unwrap()
}

fn group() -> String {
    format!("g{}", rand::random::<u64>())
}

/// Waits until `ingest` has read `n` messages in all.
async fn read_messages(ingest: &IngestHandle, n: u64) {
    let status = ingest.status();
    wait_for(
        &format!("{n} messages"),
        Duration::from_secs(30),
        async || status.counters().messages >= n,
    )
    .await;
}

/// Waits until `ingest` has applied everything it read.
async fn settle(ingest: &IngestHandle, n: u64) {
    read_messages(ingest, n).await;
    let status = ingest.status();
    wait_for("batches applied", Duration::from_secs(30), async || {
        status.counters().handled >= n
    })
    .await;
}

both_backends!(
    batched_apply,
    shared_paths_across_jobs,
    error_then_ready,
    duplicates_and_redelivery,
    malformed_messages_are_skipped,
    store_failure_mid_batch_is_redelivered_and_applied_once,
    names_are_mapped_once_per_batch,
    stats_report_the_consumer_state,
    simulator_publishes_what_scout_stages,
    stopping_commits_the_last_batch,
);

async fn batched_apply(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = open_store(&db).await;
    let files: Vec<String> = (0..300).map(|i| format!("obs/{i:04}")).collect();
    let refs: Vec<&str> = files.iter().map(String::as_str).collect();
    submit(&store, 1, &refs).await;
    let broker = Broker::new();
    for f in &files {
        broker.ready(f, "03:02:32").await;
    }
    for i in 0..50 {
        broker.ready(&format!("not/ours/{i}"), "03:02:32").await;
    }
    let ingest = consume(&broker, &group(), &store);
    settle(&ingest, 350).await;
    let s = store.job_summary(1).await.unwrap().unwrap();
    assert_eq!((s.ready_files, s.error_files), (300, 0));
    assert_eq!(s.last_ready_ms, Some(at_ms("03:02:32")));
    let c = ingest.status().counters();
    assert_eq!(c.events, 350);
    assert_eq!(c.changed, 300);
    assert_eq!(c.unknown, 50);
    assert!(c.batches < 50, "messages are applied in batches: {c:?}");
    assert_eq!(c.store_failures + c.malformed, 0);
    ingest.stop().await;
    store.close().await;
}

async fn shared_paths_across_jobs(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = open_store(&db).await;
    submit(&store, 1, &["a", "shared"]).await;
    submit(&store, 2, &["shared", "b"]).await;
    let broker = Broker::new();
    broker.ready("shared", "03:02:32").await;
    broker.failed("b", "03:02:33", "tape error").await;
    let ingest = consume(&broker, &group(), &store);
    settle(&ingest, 2).await;
    let f1 = store.job_files(1).await.unwrap();
    let f2 = store.job_files(2).await.unwrap();
    let shared1 = f1.iter().find(|f| f.path == "shared").unwrap();
    let shared2 = f2.iter().find(|f| f.path == "shared").unwrap();
    assert!(shared1.ready && shared2.ready);
    assert_eq!(shared1.ready_ms, Some(at_ms("03:02:32")));
    assert_eq!(shared2.ready_ms, shared1.ready_ms);
    assert!(!f1.iter().find(|f| f.path == "a").unwrap().ready);
    let b = f2.iter().find(|f| f.path == "b").unwrap();
    assert!(b.error && !b.ready);
    assert_eq!(ingest.status().counters().changed, 3);
    ingest.stop().await;
    store.close().await;
}

async fn error_then_ready(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = open_store(&db).await;
    submit(&store, 1, &["retried", "kept"]).await;
    let broker = Broker::new();
    // A failed recall later succeeds: ready wins.
    broker.failed("retried", "03:00:00", "drive busy").await;
    // A ready file is never undone by a later error.
    broker.ready("kept", "03:00:01").await;
    let ingest = consume(&broker, &group(), &store);
    settle(&ingest, 2).await;
    let s = store.job_summary(1).await.unwrap().unwrap();
    assert_eq!((s.ready_files, s.error_files), (1, 1));
    broker.ready("retried", "03:00:05").await;
    broker.failed("kept", "03:00:06", "late error").await;
    settle(&ingest, 4).await;
    let files = store.job_files(1).await.unwrap();
    for f in &files {
        assert!(f.ready, "{f:?}");
    }
    assert_eq!(files[0].path, "kept");
    assert_eq!(files[0].ready_ms, Some(at_ms("03:00:01")));
    assert_eq!(files[1].ready_ms, Some(at_ms("03:00:05")));
    let s = store.job_summary(1).await.unwrap().unwrap();
    assert_eq!((s.ready_files, s.error_files), (2, 0));
    assert!(s.completed());
    ingest.stop().await;
    store.close().await;
}

async fn duplicates_and_redelivery(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = open_store(&db).await;
    submit(&store, 1, &["p", "q"]).await;
    let broker = Broker::new();
    broker.ready("p", "03:00:01").await;
    broker.ready("p", "03:00:09").await;
    broker.failed("q", "03:00:02", "x").await;
    broker.failed("q", "03:00:03", "x").await;
    let g = group();
    let ingest = consume(&broker, &g, &store);
    settle(&ingest, 4).await;
    let changed = ingest.status().counters().changed;
    assert_eq!(changed, 2, "one change per file, duplicates change nothing");
    ingest.stop().await;
    let before = store.job_files(1).await.unwrap();
    assert_eq!(
        before[0].ready_ms,
        Some(at_ms("03:00:01")),
        "the first ready time stays"
    );

    // Every message again (a new group reads from the start): nothing changes.
    let again = consume(&broker, &group(), &store);
    settle(&again, 4).await;
    assert_eq!(again.status().counters().changed, 0);
    assert_eq!(store.job_files(1).await.unwrap(), before);
    again.stop().await;

    // The first group committed after applying: a new member resumes after those offsets.
    broker.ready("new", "03:00:10").await;
    let resumed = consume(&broker, &g, &store);
    read_messages(&resumed, 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        resumed.status().counters().messages,
        1,
        "only the new message"
    );
    resumed.stop().await;
    store.close().await;
}

async fn malformed_messages_are_skipped(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = open_store(&db).await;
    submit(&store, 1, &["good"]).await;
    let broker = Broker::new();
    let huge = json!({"Filename": "x".repeat(100_000), "Error": ""}).to_string();
    for bad in [
        "not json at all".to_string(),
        json!({"Inode": 1, "Error": ""}).to_string(),
        json!({"Filename": 42, "Error": ""}).to_string(),
        json!({"Filename": "good", "Error": 7}).to_string(),
        huge,
        String::new(),
    ] {
        broker.send(bad.as_bytes()).await;
    }
    broker.ready("good", "03:00:00").await;
    let ingest = consume(&broker, &group(), &store);
    settle(&ingest, 7).await;
    let c = ingest.status().counters();
    assert_eq!(c.malformed, 6, "{c:?}");
    assert_eq!(c.events, 1);
    assert!(store.job_files(1).await.unwrap()[0].ready);
    // Still consuming after them.
    submit(&store, 2, &["later"]).await;
    broker.ready("later", "03:00:00").await;
    settle(&ingest, 8).await;
    assert!(store.job_files(2).await.unwrap()[0].ready);
    ingest.stop().await;
    store.close().await;
}

/// Makes every update of `job_files` fail inside the database, until [`heal`] (a trigger
/// raising an error: the store's transaction really fails and rolls back).
async fn break_store(db: &TestDb) {
    for sql in match db.kind {
        Kind::Sqlite => vec![
            "CREATE TRIGGER break_updates BEFORE UPDATE ON job_files \
             BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
        ],
        Kind::Postgres => vec![
            "CREATE FUNCTION break_updates() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$",
            "CREATE TRIGGER break_updates BEFORE UPDATE ON job_files \
             FOR EACH ROW EXECUTE FUNCTION break_updates()",
        ],
    } {
        raw_sql(db, sql).await;
    }
}

async fn heal(db: &TestDb) {
    match db.kind {
        Kind::Sqlite => raw_sql(db, "DROP TRIGGER break_updates").await,
        Kind::Postgres => raw_sql(db, "DROP TRIGGER break_updates ON job_files").await,
    }
}

async fn raw_sql(db: &TestDb, sql: &'static str) {
    use sqlx::Connection;
    match db.kind {
        Kind::Sqlite => {
            let mut c = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
        }
        Kind::Postgres => {
            let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
        }
    }
}

async fn store_failure_mid_batch_is_redelivered_and_applied_once(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = open_store(&db).await;
    submit(&store, 1, &["f1", "f2", "f3"]).await;
    let broker = Broker::new();
    broker.ready("f1", "03:00:01").await;
    broker.failed("f2", "03:00:02", "bad tape").await;
    broker.ready("f3", "03:00:03").await;
    break_store(&db).await;
    let g = group();

    // The first consumer reads the batch, fails to apply it, and stops (as a crash would)
    // without committing.
    let first = consume(&broker, &g, &store);
    let status = first.status();
    wait_for("a store failure", Duration::from_secs(30), async || {
        status.counters().store_failures >= 1
    })
    .await;
    first.stop().await;
    let s = store.job_summary(1).await.unwrap().unwrap();
    assert_eq!(
        (s.ready_files, s.error_files),
        (0, 0),
        "nothing half-applied"
    );

    // The next member of the group gets the same messages again; it too meets the failure,
    // retries, and applies the batch once the database is back. Its first batch may close
    // before all three have arrived (a batch is handed over as soon as the client holds
    // nothing more), so the rest are read while that batch is retried.
    let second = consume(&broker, &g, &store);
    let status = second.status();
    wait_for("a store failure", Duration::from_secs(30), async || {
        status.counters().store_failures >= 1
    })
    .await;
    read_messages(&second, 3).await;
    assert_eq!(status.counters().messages, 3, "redelivered, each once");
    assert_eq!(
        status.counters().handled,
        0,
        "nothing applied while the store is broken"
    );
    heal(&db).await;
    settle(&second, 3).await;
    let files = store.job_files(1).await.unwrap();
    assert!(files[0].ready && files[2].ready && files[1].error);
    assert_eq!(files[0].ready_ms, Some(at_ms("03:00:01")));
    assert_eq!(second.status().counters().changed, 3);
    second.stop().await;

    // Committed after the transaction: a third member reads only what is new.
    broker.ready("f9", "03:00:09").await;
    let third = consume(&broker, &g, &store);
    read_messages(&third, 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(third.status().counters().messages, 1);
    third.stop().await;
    store.close().await;
}

async fn names_are_mapped_once_per_batch(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = open_store(&db).await;
    submit(&store, 1, &["mwa/bucket/f1", "mwa/bucket/f2"]).await;
    let broker = Broker::new();
    for name in ["nfs/f1", "nfs/f2", "other/f3"] {
        broker.ready(name, "03:00:00").await;
    }
    let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = calls.clone();
    let mapper = move |names: &[String]| -> Vec<Option<String>> {
        counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        names
            .iter()
            .map(|n| n.strip_prefix("nfs/").map(|f| format!("mwa/bucket/{f}")))
            .collect()
    };
    let ingest = consume_mapped(&broker, &group(), &store, Arc::new(mapper));
    settle(&ingest, 3).await;
    let s = store.job_summary(1).await.unwrap().unwrap();
    assert_eq!(s.ready_files, 2);
    let c = ingest.status().counters();
    assert_eq!(c.unknown, 1, "the mapper said other/f3 is not ours");
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::Relaxed),
        c.batches,
        "one mapper call per batch"
    );
    ingest.stop().await;
    store.close().await;
}

async fn stats_report_the_consumer_state(kind: Kind) {
    let broker = Broker::new();
    let g = group();
    let kafka = broker.config(&g);
    let app = TestApp::start_with(kind, move |c| c.kafka = kafka).await;
    let (_, stats) = app.get("/get_stats/").await;
    assert_eq!(stats["last_message"], json!(null));
    let alive = async |want: bool| {
        wait_for(
            &format!("kafka_alive = {want}"),
            Duration::from_secs(30),
            async || app.get("/get_stats/").await.1["kafka_alive"] == json!(want),
        )
        .await
    };
    alive(true).await;
    let (_, stats) = app.get("/get_stats/").await;
    let hb = stats["kafkad_heartbeat"].as_f64().unwrap();
    assert!((hb - staged::store::now_ms() as f64 / 1000.0).abs() < 30.0);

    let (status, _) = app
        .post_job(files_job(5, ["x/1"], "http://127.0.0.1:9/"))
        .await;
    assert_eq!(status, 202);
    broker.ready("x/1", "03:00:00").await;
    wait_for("last_message", Duration::from_secs(30), async || {
        app.get("/get_stats/").await.1["last_message"].is_f64()
    })
    .await;
    let (_, job) = app.get("/staging/?job_id=5").await;
    assert_eq!(job["ready_files"], json!(1));

    // The broker goes away: the API keeps answering and says Kafka is not alive; it comes
    // back and the consumer reconnects by itself.
    broker.cluster.broker_down(1).unwrap();
    alive(false).await;
    broker.cluster.broker_up(1).unwrap();
    alive(true).await;
    app.stop().await;
}

/// The daemon stopped right after applying a batch: the group's offsets on the broker
/// include that batch, so the next member reads only what came after.
async fn stopping_commits_the_last_batch(kind: Kind) {
    let broker = Broker::new();
    let g = group();
    let kafka = broker.config(&g);
    let mut app = TestApp::start_with(kind, move |c| c.kafka = kafka).await;
    let files: Vec<String> = (0..20).map(|i| format!("c/{i}")).collect();
    let (status, _) = app
        .post_job(files_job(9, &files, "http://127.0.0.1:9/"))
        .await;
    assert_eq!(status, 202);
    for f in &files {
        broker.ready(f, "03:00:00").await;
    }
    let server = app.server.take().unwrap();
    let status = server.kafka_status().unwrap();
    wait_for("the messages read", Duration::from_secs(30), async || {
        status.counters().messages >= 20
    })
    .await;
    // From now the broker answers slowly, so the batch's commit is still on its way when
    // the daemon stops.
    broker
        .cluster
        .broker_round_trip_time(1, Duration::from_millis(300))
        .unwrap();
    wait_for("the batch applied", Duration::from_secs(30), async || {
        status.counters().handled >= 20
    })
    .await;
    server.stop().await.unwrap();
    let c = status.counters();
    assert_eq!(c.commit_failures, 0, "{c:?}");
    assert!(c.commits >= 1, "the broker confirmed the commits: {c:?}");

    broker
        .cluster
        .broker_round_trip_time(1, Duration::ZERO)
        .unwrap();
    broker.ready("after/stop", "03:00:01").await;
    let store = open_store(&app.db).await;
    let resumed = consume(&broker, &g, &store);
    read_messages(&resumed, 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        resumed.status().counters().messages,
        1,
        "only the message after the stop is read again"
    );
    resumed.stop().await;
    store.close().await;
}

/// A commit the broker refuses is counted (it costs only a redelivery) and later commits
/// go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_commits_are_counted() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let db = TestDb::new(Kind::Sqlite).await;
    let store = open_store(&db).await;
    submit(&store, 1, &["r/1", "r/2"]).await;
    let broker = Broker::new();
    broker.cluster.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_METADATA_TOO_LARGE; 3],
    );
    broker.ready("r/1", "03:00:00").await;
    let ingest = consume(&broker, &group(), &store);
    settle(&ingest, 1).await;
    let status = ingest.status();
    wait_for(
        "a refused commit counted",
        Duration::from_secs(30),
        async || status.counters().commit_failures >= 1,
    )
    .await;
    broker
        .cluster
        .clear_request_errors(RDKafkaApiKey::OffsetCommit);
    broker.ready("r/2", "03:00:01").await;
    wait_for("a confirmed commit", Duration::from_secs(30), async || {
        status.counters().commits >= 1
    })
    .await;
    ingest.stop().await;
    store.close().await;
}

async fn simulator_publishes_what_scout_stages(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = open_store(&db).await;
    let broker = Broker::new();
    let sim = ScoutSim::new(SimSettings {
        kafka_brokers: Some(broker.servers()),
        recall_delay: Duration::from_millis(200),
        default_topic: TOPIC.into(),
        ..SimSettings::default()
    })
    .unwrap();
    let node = sim.serve_loopback().await.unwrap();
    sim.set_file("on/disk", FileState::Online);
    let files = ["on/disk", "t/1", "t/2", "t/3"];
    submit(&store, 1, &files).await;
    let ingest = consume(&broker, &group(), &store);

    let mut s = ScoutSettings::from_config(&Default::default(), TOPIC).unwrap();
    s.nodes = vec![node.url().parse().unwrap()];
    s.username = SimSettings::default().username;
    s.password = SimSettings::default().password;
    let scout = ScoutClient::new(s).unwrap();
    let paths: Vec<String> = files.iter().map(|s| s.to_string()).collect();
    scout.stage(&paths, "1").await.unwrap();
    settle(&ingest, 4).await;
    let job = store.job_summary(1).await.unwrap().unwrap();
    assert_eq!(job.ready_files, 4);
    assert_eq!(sim.counters().published, 4);
    assert_eq!(sim.file_state("t/2"), FileState::Online);
    ingest.stop().await;
    store.close().await;
}

/// Production's client: SASL_SSL with SCRAM-SHA-512, from the TOML. No SCRAM broker runs
/// here, so this checks that the configured client is accepted by librdkafka as built.
#[test]
fn sasl_ssl_scram_client_from_config() {
    let config = Config::parse(
        r#"
[kafka]
brokers = ["kafka.example.org:9093"]
topic = "mwa-staging"
group_id = "staged-test"
security_protocol = "SASL_SSL"
sasl_mechanism = "SCRAM-SHA-512"
username = "mwa"
password = "not-a-real-password"
extra = { "socket.timeout.ms" = "5000" }
"#,
    )
    .unwrap();
    let features = kafka::builtin_features().unwrap();
    assert!(features.split(',').any(|f| f == "sasl_scram"), "{features}");
    assert!(features.split(',').any(|f| f == "ssl"), "{features}");
    let client = kafka::client_config(&config.kafka);
    assert_eq!(client.get("security.protocol"), Some("SASL_SSL"));
    assert_eq!(client.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
    assert_eq!(client.get("sasl.username"), Some("mwa"));
    assert_eq!(client.get("socket.timeout.ms"), Some("5000"));
    // librdkafka refuses SASL_SSL at creation when built without OpenSSL or SCRAM.
    let consumer: BaseConsumer = client.create().expect("librdkafka accepts the client");
    drop(consumer);

    // Without a group id, the section is refused, naming the key.
    let err = Config::parse("[kafka]\nbrokers = [\"k:9093\"]\ntopic = \"t\"\n").unwrap_err();
    assert!(format!("{err:#}").contains("kafka.group_id"), "{err:#}");
    let err = Config::parse(
        "[kafka]\nbrokers = [\"k:9093\"]\ntopic = \"t\"\ngroup_id = \"g\"\nsasl_mechanism = \"GSSAPI\"\n",
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("sasl_mechanism"), "{err:#}");
}

#[test]
fn the_message_format_is_the_productions() {
    let t = chrono::DateTime::parse_from_rfc3339("2022-02-04T03:02:32Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let m: serde_json::Value =
        serde_json::from_str(&recall_message("nfs/file1", t, t, "")).unwrap();
    assert_eq!(m["Filename"], "nfs/file1");
    assert_eq!(m["CompleteTime"], "2022-02-04 03:02:32 +0000 GMT");
    assert_eq!(m["Error"], "");
    assert!(m["Inode"].is_u64());
}
