//! `staged-bench engine`: how fast a finished job reaches its requester.
//!
//! Against the release `staged serve` as a child process, with the Scout simulator, a
//! Kafka-protocol broker (librdkafka's mock cluster) and a callback receiver in this process:
//!
//! 1. **Last event to callback.** N one-file jobs are posted and staged; then this program
//!    publishes each file's recall message itself, a few milliseconds apart, and times from
//!    just before the publish to the callback's arrival. The callback rate limit is lifted
//!    for this run (it is a policy, not a cost); everything else is the daemon's default.
//! 2. **A 100,000-file job.** After a one-file warm-up job (so that the consumer is in its
//!    group, as in a daemon already running), one POST naming 100,000 files; the simulator
//!    publishes one message per file as Scout would; the clock runs from the POST to the
//!    callback, and the daemon's peak RSS is read from /proc.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use serde_json::{Value, json};
use staged_testkit::scout::{ScoutSim, SimNode, SimSettings, recall_message};
use tokio::sync::Notify;

use super::{BackendChoice, Server, locate_staged};

const TOPIC: &str = "bench-engine";

#[derive(clap::Args, Clone)]
pub struct EngineArgs {
    /// Database backend(s) to measure.
    #[arg(long, value_enum, default_value_t = BackendChoice::Sqlite)]
    backend: BackendChoice,
    /// One-file jobs timed from last event to callback.
    #[arg(long, default_value_t = 1_000)]
    jobs: u64,
    /// Files in the big job.
    #[arg(long, default_value_t = 100_000)]
    big_files: u64,
    /// Recall messages per second for other jobs' files, streamed while the one-file jobs
    /// are timed (0: none). Those files belong to jobs posted beforehand, so each message
    /// changes the store as a real one would.
    #[arg(long, default_value_t = 0)]
    background_rate: u64,
    /// The `staged` binary; default: `staged` next to this program.
    #[arg(long)]
    staged: Option<std::path::PathBuf>,
}

pub async fn run(args: EngineArgs) -> anyhow::Result<()> {
    let staged = locate_staged(args.staged.as_deref())?;
    for backend in args.backend.backends() {
        println!("\n=== engine, {backend} ===");
        let dir = super::temp_dir()?;
        let db = super::RunDb::create(backend).await?;
        let url = |name: &str| db.url(dir.path(), name);
        let r1 = latency(&staged, dir.path(), &url("latency.db"), &args).await;
        // A fresh database for the second run (PostgreSQL: the same one, emptied by run 1's
        // callbacks, which remove their jobs).
        let r2 = big_job(&staged, dir.path(), &url("big.db"), &args).await;
        db.drop().await?;
        r1?;
        r2?;
    }
    Ok(())
}

/// Callbacks received: job id -> arrival.
#[derive(Clone, Default)]
pub(super) struct Arrivals {
    pub(super) at: Arc<Mutex<HashMap<i64, (Instant, Value)>>>,
    changed: Arc<Notify>,
}

impl Arrivals {
    pub(super) async fn serve(&self) -> anyhow::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let me = self.clone();
        let app = axum::Router::new().route(
            "/cb",
            axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
                let me = me.clone();
                async move {
                    let id = body["job_id"].as_i64().unwrap_or(-1);
                    me.at
                        .lock()
                        .unwrap()
                        .entry(id)
                        .or_insert((Instant::now(), body));
                    me.changed.notify_waiters();
                    axum::http::StatusCode::OK
                }
            }),
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(addr)
    }

    pub(super) async fn wait_for(&self, n: usize, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let changed = self.changed.notified();
            if self.at.lock().unwrap().len() >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "only {} of {n} callbacks within {limit:?}",
                    self.at.lock().unwrap().len()
                );
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), changed).await;
        }
    }
}

/// Partitions enough for `messages` recall messages published at once. The mock broker
/// keeps about 5 MB per partition and evicts older messages beyond that (real Kafka retains
/// by time), and the simulator publishes a big job's recalls faster than the daemon applies
/// them: at ~8,000 of these messages a partition, none is evicted before it is read.
fn partitions_for(messages: u64) -> i32 {
    i32::try_from(messages.div_ceil(8_000))
        .unwrap_or(i32::MAX)
        .clamp(8, 1_000)
}

/// The daemon's peers in this process: the Scout simulator on one node and a Kafka-protocol
/// broker (librdkafka's mock cluster) with the recall topic.
pub(super) struct Peers {
    pub(super) sim: ScoutSim,
    node: SimNode,
    pub(super) cluster: MockCluster<'static, DefaultProducerContext>,
    pub(super) topic: String,
}

impl Peers {
    pub(super) async fn start(publish: bool, messages: u64) -> anyhow::Result<Peers> {
        Peers::start_with(TOPIC, partitions_for(messages), |s, brokers| {
            s.kafka_brokers = publish.then(|| brokers.to_string());
            s.recall_delay = Duration::ZERO;
        })
        .await
    }

    /// Peers with `partitions` partitions of `topic`; `tweak` adjusts the simulator's
    /// settings, given the broker's bootstrap servers (for `kafka_brokers`; by default the
    /// simulator publishes nothing).
    pub(super) async fn start_with(
        topic: &str,
        partitions: i32,
        tweak: impl FnOnce(&mut SimSettings, &str),
    ) -> anyhow::Result<Peers> {
        let cluster = MockCluster::new(1)?;
        cluster.create_topic(topic, partitions, 1)?;
        let mut settings = SimSettings {
            default_topic: topic.into(),
            ..SimSettings::default()
        };
        tweak(&mut settings, &cluster.bootstrap_servers());
        let sim = ScoutSim::new(settings)?;
        let node = sim.serve_loopback().await?;
        Ok(Peers {
            sim,
            node,
            cluster,
            topic: topic.into(),
        })
    }

    /// The `[scout]`, `[kafka]` and `[callbacks]` tables that point the daemon at them.
    pub(super) fn config(&self) -> String {
        format!(
            r#"[scout]
nodes = ["{scout}"]
username = "scout"
password = "scout-pw"

[kafka]
brokers = ["{brokers}"]
topic = "{topic}"
group_id = "bench"
extra = {{ "session.timeout.ms" = "6000", "heartbeat.interval.ms" = "300", "fetch.wait.max.ms" = "10" }}

[callbacks]
per_minute = 1000000
concurrency = 64
error_delay_secs = 0
"#,
            scout = self.node.url(),
            brokers = self.cluster.bootstrap_servers(),
            topic = self.topic,
        )
    }
}

pub(super) async fn start_server(
    staged: &std::path::Path,
    dir: &std::path::Path,
    db: &str,
    extra: &str,
    name: &str,
) -> anyhow::Result<Server> {
    let sub = dir.join(name);
    std::fs::create_dir_all(&sub)?;
    let mut server = Server::start_with(staged, &sub, db, extra)?;
    if let Err(e) = server.wait_ready().await {
        server.print_log_tail(30);
        return Err(e);
    }
    Ok(server)
}

async fn latency(
    staged: &std::path::Path,
    dir: &std::path::Path,
    db: &str,
    args: &EngineArgs,
) -> anyhow::Result<()> {
    let peers = Peers::start(false, 0).await?;
    let arrivals = Arrivals::default();
    let cb = arrivals.serve().await?;
    let mut server = start_server(staged, dir, db, &peers.config(), "latency").await?;
    let base = format!("http://{}", server.addr);
    let http = reqwest::Client::new();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", peers.cluster.bootstrap_servers())
        .set("linger.ms", "0")
        .create()?;
    let notify_url = format!("http://{cb}/cb");

    // Warm-up: one job through the whole path, so the consumer has joined its group.
    post(&http, &base, -1, &["warm/0".into()], &notify_url).await?;
    wait_staged(&peers.sim, 1).await?;
    publish(&producer, "warm/0").await?;
    arrivals
        .wait_for(1, Duration::from_secs(60))
        .await
        .context("warm-up job")?;

    let n = args.jobs as usize;
    futures::future::try_join_all((0..args.jobs as i64).map(|i| {
        let (http, base, url) = (http.clone(), base.clone(), notify_url.clone());
        async move { post(&http, &base, i, &[format!("lat/{i}")], &url).await }
    }))
    .await?;
    wait_staged(&peers.sim, n as u64 + 1).await?;

    let background = match args.background_rate {
        0 => None,
        rate => Some(Background::start(&http, &base, &peers, rate, n).await?),
    };

    let mut sent = HashMap::with_capacity(n);
    for i in 0..n as i64 {
        sent.insert(i, Instant::now());
        publish(&producer, &format!("lat/{i}")).await?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    arrivals.wait_for(n + 1, Duration::from_secs(120)).await?;
    let streamed = match background {
        Some(b) => Some(b.stop().await?),
        None => None,
    };
    let at = arrivals.at.lock().unwrap().clone();
    let mut lat: Vec<Duration> = sent
        .iter()
        .map(|(id, t)| at[id].0.duration_since(*t))
        .collect();
    lat.sort();
    let pct = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize];
    match streamed {
        Some((events, secs)) => println!(
            "last event -> callback, {n} one-file jobs (events ~200/s), while {events} other jobs' \
             events streamed in at {:.0}/s:",
            events as f64 / secs
        ),
        None => println!("last event -> callback, {n} one-file jobs (events ~200/s):"),
    }
    println!(
        "  p50 {:.1} ms   p99 {:.1} ms   max {:.1} ms",
        ms(pct(0.5)),
        ms(pct(0.99)),
        ms(lat[lat.len() - 1])
    );
    if let Some(bad) = at.values().find(|(_, b)| b["return_code"] != 0) {
        bail!("a callback did not report success: {}", bad.1);
    }
    server.stop().await
}

/// Recall messages for the files of other jobs, published at a steady rate while the
/// latency is measured.
struct Background {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<(u64, f64)>>,
}

impl Background {
    /// Posts jobs holding enough files for the measurement at `rate` (the mock broker keeps
    /// about 5 MB per partition, so at most 150,000), waits for them to be staged, and
    /// starts publishing.
    async fn start(
        http: &reqwest::Client,
        base: &str,
        peers: &Peers,
        rate: u64,
        timed_jobs: usize,
    ) -> anyhow::Result<Background> {
        let seconds = timed_jobs as f64 * 0.006 + 3.0;
        let files = ((rate as f64 * seconds) as u64).min(150_000);
        const PER_JOB: u64 = 10_000;
        let sink = Arrivals::default().serve().await?;
        let staged_before = peers.sim.counters().staged_paths;
        let mut paths = Vec::with_capacity(files as usize);
        for j in 0..files.div_ceil(PER_JOB) {
            let job: Vec<String> = (j * PER_JOB..((j + 1) * PER_JOB).min(files))
                .map(|f| format!("bg/{j}/{f}.fits"))
                .collect();
            post(
                http,
                base,
                1_000_000 + j as i64,
                &job,
                &format!("http://{sink}/cb"),
            )
            .await?;
            paths.extend(job);
        }
        wait_staged(&peers.sim, staged_before + files).await?;
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", peers.cluster.bootstrap_servers())
            .set("linger.ms", "5")
            .set("queue.buffering.max.messages", "1000000")
            .create()?;
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let tick = Duration::from_millis(10);
            let per_tick = (rate / 100).max(1) as usize;
            let mut sent = 0usize;
            let mut next = Instant::now();
            while sent < paths.len() {
                if stopped.try_recv().is_ok() {
                    break;
                }
                let chunk = &paths[sent..(sent + per_tick).min(paths.len())];
                futures::future::try_join_all(chunk.iter().map(|p| publish(&producer, p))).await?;
                sent += chunk.len();
                next += tick;
                tokio::time::sleep_until(next.into()).await;
            }
            Ok((sent as u64, started.elapsed().as_secs_f64()))
        });
        Ok(Background { stop, task })
    }

    /// Stops publishing; how many messages went out, over how many seconds.
    async fn stop(self) -> anyhow::Result<(u64, f64)> {
        let _ = self.stop.send(());
        self.task.await?
    }
}

async fn big_job(
    staged: &std::path::Path,
    dir: &std::path::Path,
    db: &str,
    args: &EngineArgs,
) -> anyhow::Result<()> {
    let peers = Peers::start(true, args.big_files).await?;
    let arrivals = Arrivals::default();
    let cb = arrivals.serve().await?;
    let mut server = start_server(staged, dir, db, &peers.config(), "big").await?;
    let base = format!("http://{}", server.addr);
    let http = reqwest::Client::new();
    // Warm-up: one job through the whole path, so that the consumer has joined its group
    // (seconds on a fresh start) as in a daemon already running.
    post(
        &http,
        &base,
        -1,
        &["warm/0".into()],
        &format!("http://{cb}/cb"),
    )
    .await?;
    arrivals
        .wait_for(1, Duration::from_secs(60))
        .await
        .context("warm-up job")?;
    let files: Vec<String> = (0..args.big_files)
        .map(|i| format!("mwa/1234567890/1234567890_{i:07}.fits"))
        .collect();
    let started = Instant::now();
    post(&http, &base, 1, &files, &format!("http://{cb}/cb")).await?;
    let accepted = started.elapsed();
    if let Err(e) = arrivals.wait_for(2, Duration::from_secs(300)).await {
        let c = peers.sim.counters();
        eprintln!("Scout simulator: {c:?}");
        server.print_log_tail(40);
        return Err(e);
    }
    let total = started.elapsed();
    let body = arrivals.at.lock().unwrap()[&1].1.clone();
    if body["return_code"] != 0 || body["ready_files"] != args.big_files {
        bail!("unexpected callback: {body}");
    }
    let rss = server.peak_rss_kib();
    println!("{}-file job:", args.big_files);
    println!(
        "  POST accepted in {:.2} s, callback after {:.2} s; server peak RSS {}",
        accepted.as_secs_f64(),
        total.as_secs_f64(),
        rss.map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
            .unwrap_or_else(|| "unknown".into())
    );
    let c = peers.sim.counters();
    println!(
        "  Scout: {} stage requests (largest {} paths, {} bytes), {} messages published",
        c.stage_requests, c.largest_stage_paths, c.largest_stage_body, c.published
    );
    server.stop().await
}

pub(super) async fn post(
    http: &reqwest::Client,
    base: &str,
    id: i64,
    files: &[String],
    notify_url: &str,
) -> anyhow::Result<()> {
    let r = http
        .post(format!("{base}/staging/"))
        .json(&json!({"job_id": id, "files": files, "notify_url": notify_url}))
        .send()
        .await?;
    if r.status() != 202 {
        bail!(
            "POST job {id}: {} {}",
            r.status(),
            r.text().await.unwrap_or_default()
        );
    }
    Ok(())
}

pub(super) async fn wait_staged(sim: &ScoutSim, paths: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while sim.counters().staged_paths < paths {
        if Instant::now() > deadline {
            bail!(
                "only {} of {paths} paths staged",
                sim.counters().staged_paths
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

pub(super) async fn publish(producer: &FutureProducer, path: &str) -> anyhow::Result<()> {
    publish_to(producer, TOPIC, path).await
}

/// Publishes the recall message of `path` (recalled now) and waits for its delivery.
pub(super) async fn publish_to(
    producer: &FutureProducer,
    topic: &str,
    path: &str,
) -> anyhow::Result<()> {
    let now = chrono::Utc::now();
    let msg = recall_message(path, now, now, "");
    producer
        .send(
            FutureRecord::to(topic).payload(&msg).key(path),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
    Ok(())
}

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
