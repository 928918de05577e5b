//! `staged-bench ingest`: Kafka recall messages applied to the store, per second.
//!
//! For each backend: a fresh database holding jobs for every file, a Kafka-protocol broker in
//! this process (librdkafka's mock cluster) holding one message per file in the production
//! format, then the daemon's own consumer (`staged::kafka`) reading them in batches, one
//! transaction per batch, committing after each. The clock runs from the first message read
//! to the last batch committed (the consumer group's join, seconds on the mock, is printed
//! apart); afterwards every file must be ready in the database.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use staged::config::KafkaConfig;
use staged::kafka::{self, IdentityMapper, IngestSettings};
use staged::store::{NewJob, Store, StoreOptions};

use super::{Backend, BackendChoice};

pub(super) const TOPIC: &str = "bench-recalls";

#[derive(clap::Args, Clone)]
pub struct IngestArgs {
    /// Database backend(s) to measure.
    #[arg(long, value_enum, default_value_t = BackendChoice::Both)]
    backend: BackendChoice,
    /// Messages (one per file) to ingest.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Files per job (jobs are created to hold every file).
    #[arg(long, default_value_t = 1_000)]
    files_per_job: u64,
    /// Most messages per batch (one transaction each).
    #[arg(long, default_value_t = 5_000)]
    batch: usize,
    /// Partitions of the topic. The mock broker keeps about 5 MB per partition and drops
    /// older messages beyond that, so 100,000 messages need several.
    #[arg(long, default_value_t = 8)]
    partitions: i32,
}

pub async fn run(args: IngestArgs) -> anyhow::Result<()> {
    let mut failed = Vec::new();
    for backend in args.backend.backends() {
        println!("\n=== ingest, {backend}: starting ===");
        match bench(backend, &args).await {
            Ok(()) => println!("=== ingest, {backend}: passed ==="),
            Err(e) => {
                eprintln!("=== ingest, {backend}: FAILED: {e:#} ===");
                failed.push(backend.to_string());
            }
        }
    }
    if !failed.is_empty() {
        bail!("ingest benchmark failed for: {}", failed.join(", "));
    }
    Ok(())
}

async fn bench(backend: Backend, args: &IngestArgs) -> anyhow::Result<()> {
    let dir = super::temp_dir()?;
    let db = super::RunDb::create(backend).await?;
    let result = measure(backend, &db.url(dir.path(), "bench.db"), args).await;
    db.drop().await?;
    result
}

async fn measure(backend: Backend, url: &str, args: &IngestArgs) -> anyhow::Result<()> {
    let mut db = staged::config::DatabaseConfig {
        url: url.to_string(),
        ..Default::default()
    };
    db.max_connections = 8;
    let jobs = staged::config::JobsConfig {
        expiry_secs: 86_400,
        ..Default::default()
    };
    let store = Store::open(&StoreOptions::from_config(&db, &jobs))
        .await
        .context("opening the store")?;
    let n = args.messages;
    let paths: Vec<String> = (0..n).map(|i| format!("mwa/bench/{i:09}.fits")).collect();
    let t = Instant::now();
    for (j, chunk) in paths.chunks(args.files_per_job.max(1) as usize).enumerate() {
        store
            .submit(NewJob {
                job_id: j as i64 + 1,
                notify_url: "http://127.0.0.1:9/".into(),
                files: chunk.to_vec(),
                obs: None,
                submitted_by: None,
                ..Default::default()
            })
            .await?;
    }
    println!(
        "jobs holding {n} files written in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let timed = timed_ingest(&store, &paths, args.partitions, args.batch, true).await?;
    let c = timed.counters;
    let stats = store.stats().await?;
    store.close().await;
    let secs = timed.secs;
    println!(
        "group join and first fetch: {:.2} s (not counted)",
        timed.join_secs
    );
    // Half of what the store itself applies here (SQLite ~500k rows/s, PostgreSQL
    // ~170-190k with batched updates).
    let target = match backend {
        Backend::Sqlite => "200,000",
        Backend::Postgres => "100,000",
    };
    println!(
        "ingested {} messages in {} batches in {secs:.2} s: {:.0} events applied/s \
         (target >= {target}/s); {} job files changed, {} store failures",
        c.handled,
        c.batches,
        c.events as f64 / secs,
        c.changed,
        c.store_failures
    );
    if stats.ready_files != n as i64 || c.changed != n {
        bail!(
            "expected {n} ready files, the store has {} ({} changed)",
            stats.ready_files,
            c.changed
        );
    }
    Ok(())
}

/// What one timed run of the daemon's consumer saw.
pub(super) struct Timed {
    pub counters: kafka::IngestCounters,
    /// From the consumer's start to its first message (the group's join; not counted).
    pub join_secs: f64,
    /// From the first message read to the last one handled.
    pub secs: f64,
}

/// Puts one message per path on a fresh in-process broker's topic (`partitions` of it),
/// then runs the daemon's consumer, `batch` messages at most a transaction, until every one
/// is handled. `progress`: print the counters every 5 s meanwhile.
pub(super) async fn timed_ingest(
    store: &Store,
    paths: &[String],
    partitions: i32,
    batch: usize,
    progress: bool,
) -> anyhow::Result<Timed> {
    let n = paths.len() as u64;
    let cluster = MockCluster::new(1)?;
    cluster.create_topic(TOPIC, partitions, 1)?;
    let servers = cluster.bootstrap_servers();
    produce(&servers, paths).await?;

    let config = KafkaConfig {
        brokers: vec![servers],
        topic: TOPIC.into(),
        group_id: "staged-bench".into(),
        batch_max_messages: batch,
        batch_max_wait_ms: 200,
        ..KafkaConfig::default()
    };
    let mut client = kafka::client_config(&config);
    client.set("session.timeout.ms", "6000");
    let started = Instant::now();
    let ingest = kafka::start_with(
        client,
        IngestSettings::from_config(&config),
        store.clone(),
        Arc::new(IdentityMapper),
    )?;
    let status = ingest.status();
    let first = loop {
        if status.counters().messages > 0 {
            break Instant::now();
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("no message read within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let mut report = Instant::now();
    let done = loop {
        if status.counters().handled >= n {
            break Instant::now();
        }
        if progress && report.elapsed() > Duration::from_secs(5) {
            println!("  ... {:?}", status.counters());
            report = Instant::now();
        }
        if first.elapsed() > Duration::from_secs(600) {
            bail!(
                "not every message applied within 600 s: {:?}",
                status.counters()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let counters = status.counters();
    ingest.stop().await;
    Ok(Timed {
        counters,
        join_secs: (first - started).as_secs_f64(),
        secs: (done - first).as_secs_f64(),
    })
}

/// Puts one production-format message per path on the topic; not timed.
pub(super) async fn produce(servers: &str, paths: &[String]) -> anyhow::Result<()> {
    let t = Instant::now();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000")
        .set("batch.num.messages", "10000")
        .create()?;
    let now = chrono::Utc::now();
    let mut deliveries = Vec::with_capacity(paths.len());
    for p in paths {
        let payload = staged_testkit::scout::recall_message(p, now, now, "");
        let record = FutureRecord::to(TOPIC).payload(&payload).key(p);
        match producer.send_result(record) {
            Ok(d) => deliveries.push(d),
            Err((e, _)) => bail!("queueing a message: {e}"),
        }
    }
    for d in futures::future::join_all(deliveries).await {
        match d {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => bail!("delivering a message: {e}"),
            Err(_) => bail!("a delivery was cancelled"),
        }
    }
    producer.flush(Duration::from_secs(30))?;
    println!(
        "{} messages produced in {:.1} s",
        paths.len(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
