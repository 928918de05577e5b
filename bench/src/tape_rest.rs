//! `staged-bench tape-rest`: the WLCG Tape REST API facade at WLCG's sizing.
//!
//! Against the release `staged serve` as a child process with `[tape_rest]` on, the Scout
//! simulator and a Kafka-protocol broker (librdkafka's mock cluster) in this process (see
//! [`super::engine::Peers`]), for each backend:
//!
//! 1. **Submission.** `--requests` stage requests (`POST /api/v1/stage`) of
//!    `--files-per-request` files each (default 5,000 of 200: a million files), from
//!    `--concurrency` clients on keep-alive connections. Every answer must be 201 with a
//!    `requestId`. Printed: requests/s, files/s, POST latency, and the rate in the first and
//!    last 20% of the phase (a step would show the cost of the files already waiting).
//! 2. **Holding.** The daemon stages every file at the simulator, which never completes one
//!    (its recall delay is a day and it publishes no messages); with the million files
//!    waiting, the daemon's RSS (peak and current, from /proc) and, as a baseline, the poll
//!    latency with no ingest.
//! 3. **Poll under ingest.** This program publishes one recall message per file, in random
//!    order, at `--ingest-rate` messages/s (default 50,000) in the production format, while
//!    `--poll-clients` clients poll `GET /api/v1/stage/{id}` of random requests at
//!    `--poll-rate` polls/s in all. Poll latency is given from when a poll was due (so a
//!    stalled daemon is not hidden by a client waiting on it) and from its send (the
//!    daemon's part alone); the messages are queued on a thread of their own, away from the
//!    poll clients' runtime. The events applied per second come
//!    from the daemon's `/metrics` (`staged_kafka_events_total`, sampled every 100 ms),
//!    over the whole phase and in its first and last 20% (a million files waiting, then a
//!    fifth of that).
//! 4. **archiveinfo.** One `POST /api/v1/archiveinfo` of `--archiveinfo-paths` paths
//!    (`tape_rest.archiveinfo_max_paths` is set to match), each a Scout file-status call
//!    that the simulator answers after `--file-status-delay-ms`; its time and the most
//!    file-status calls the simulator saw in flight.
//! 5. **Durability.** Every acknowledged request must answer its poll with all its files.
//!
//! A table of every figure, with the targets (poll p99 under 50 ms, RSS under 300 MB, no
//! step in the intake or ingest rate while the million files wait), ends the run. Timings
//! never fail it; errors do: an answer other than 201 or 200, a request not found
//! afterwards, the daemon exiting.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hyper::StatusCode;
use hyper::body::Bytes;
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use staged_testkit::scout::recall_message;

use super::engine::{Peers, publish_to, start_server};
use super::{
    Backend, BackendChoice, CpuSample, LoadResult, MAX_RECONNECTS, REQUEST_TIMEOUT, Server,
    TaskResult, connect, get_on, http_get, locate_staged, micros, percentile_us, post_json,
    print_cpu, truncate,
};

const TOPIC: &str = "bench-tape-rest";
/// Longest wait for the daemon to stage every file at the simulator.
const STAGE_TIMEOUT: Duration = Duration::from_secs(900);
/// Longest the ingest may go without applying an event once publishing has started.
const INGEST_STALL: Duration = Duration::from_secs(60);
/// Longest one archiveinfo call may take.
const ARCHIVEINFO_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest `GET /get_stats/` may take (it counts every file).
const STATS_TIMEOUT: Duration = Duration::from_secs(120);
/// How often `/metrics` is read during the ingest.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Clients reading every request back in the durability check.
const CHECK_CLIENTS: u32 = 16;
/// A rate within this factor of another is no step.
const STEP_FACTOR: f64 = 1.25;

#[derive(clap::Args, Clone)]
pub struct TapeRestArgs {
    /// Database backend(s) to measure.
    #[arg(long, value_enum, default_value_t = BackendChoice::Sqlite)]
    backend: BackendChoice,
    /// Stage requests submitted.
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    requests: u64,
    /// Files named in each stage request.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    files_per_request: u32,
    /// Concurrent submitting clients, each on its own keep-alive connection.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    concurrency: u32,
    /// Concurrent polling clients, each on its own keep-alive connection.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    poll_clients: u32,
    /// Polls per second, all clients together (0: each client polls again as soon as it has
    /// its answer).
    #[arg(long, default_value_t = 200)]
    poll_rate: u64,
    /// Recall messages published per second while the requests are polled.
    #[arg(long, default_value_t = 50_000, value_parser = clap::value_parser!(u64).range(1..))]
    ingest_rate: u64,
    /// Seconds the files are held waiting (RSS and the idle poll latency are read then).
    #[arg(long, default_value_t = 10)]
    hold_secs: u64,
    /// Paths in the archiveinfo call (and `tape_rest.archiveinfo_max_paths`).
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    archiveinfo_paths: u64,
    /// How long the simulator takes to answer one file-status call, in milliseconds.
    #[arg(long, default_value_t = 10)]
    file_status_delay_ms: u64,
    /// Partitions of the recall topic. The mock broker keeps about 5 MB (and at most
    /// 100,000 messages) per partition and drops older messages beyond that, so a million
    /// messages not yet read need some 64.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(i32).range(1..=1_000))]
    partitions: i32,
    /// The `staged` binary; default: `staged` next to this program.
    #[arg(long)]
    staged: Option<std::path::PathBuf>,
}

impl TapeRestArgs {
    fn files(&self) -> u64 {
        self.requests * u64::from(self.files_per_request)
    }
}

pub async fn run(args: TapeRestArgs) -> anyhow::Result<()> {
    let staged = locate_staged(args.staged.as_deref())?;
    println!("staged binary: {}", staged.display());
    let mut all = Vec::new();
    for backend in args.backend.backends() {
        println!("\n=== tape-rest, {backend}: starting ===");
        let mut fig = Figures::new(backend);
        let started = Instant::now();
        if let Err(e) = bench(backend, &staged, &args, &mut fig).await {
            fig.failures.push(format!("{e:#}"));
        }
        fig.wall = Some(started.elapsed().as_secs_f64());
        if fig.failures.is_empty() {
            println!("=== tape-rest, {backend}: passed ===");
        } else {
            eprintln!(
                "=== tape-rest, {backend}: FAILED: {} ===",
                fig.failures.join("; ")
            );
        }
        all.push(fig);
    }
    print_table(&args, &all);
    let failed: Vec<String> = all
        .iter()
        .filter(|f| !f.failures.is_empty())
        .map(|f| f.backend.to_string())
        .collect();
    if !failed.is_empty() {
        bail!("tape-rest benchmark failed for: {}", failed.join(", "));
    }
    Ok(())
}

async fn bench(
    backend: Backend,
    staged: &Path,
    args: &TapeRestArgs,
    fig: &mut Figures,
) -> anyhow::Result<()> {
    let dir = super::temp_dir()?;
    let db = super::RunDb::create(backend).await?;
    let url = db.url(dir.path(), "bench.db");
    let outcome = with_server(staged, dir.path(), &url, args, fig).await;
    let dropped = db.drop().await;
    outcome.and(dropped)
}

/// Starts the peers and the daemon, runs the phases, and stops the daemon (which must exit
/// cleanly); on failure prints the daemon's log.
async fn with_server(
    staged: &Path,
    dir: &Path,
    url: &str,
    args: &TapeRestArgs,
    fig: &mut Figures,
) -> anyhow::Result<()> {
    let delay = Duration::from_millis(args.file_status_delay_ms);
    let peers = Peers::start_with(TOPIC, args.partitions, |s, _| {
        // Staged files are never recalled by the simulator within the run, and it publishes
        // nothing: only this program's messages complete files.
        s.recall_delay = Duration::from_secs(86_400);
        s.file_status_delay = delay;
    })
    .await?;
    let extra = format!(
        "{}\n[tape_rest]\nenabled = true\narchiveinfo_max_paths = {}\nmax_files_per_request = {}\n",
        peers.config(),
        args.archiveinfo_paths,
        args.files_per_request.max(10_000),
    );
    let mut server = start_server(staged, dir, url, &extra, "tape-rest").await?;
    let outcome = phases(&mut server, &peers, args, fig).await;
    let stopped = server.stop().await;
    if outcome.is_err() || stopped.is_err() || !fig.failures.is_empty() {
        server.print_log_tail(40);
    }
    outcome.and(stopped)
}

async fn phases(
    server: &mut Server,
    peers: &Peers,
    args: &TapeRestArgs,
    fig: &mut Figures,
) -> anyhow::Result<()> {
    let addr = server.addr;
    let base = discover(addr).await?;
    println!("discovery: endpoint {base}");

    // Warm-up: one request through the whole path, so that the consumer has joined its
    // group (seconds on a fresh start) as in a daemon already running.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", peers.cluster.bootstrap_servers())
        .set("linger.ms", "0")
        .create()?;
    let warm = stage_one(addr, &base, "/warm/0").await?;
    wait_staged(peers, 1, Duration::from_secs(60)).await?;
    publish_to(&producer, &peers.topic, "warm/0").await?;
    wait_completed(
        addr,
        &format!("{base}/stage/{warm}"),
        Duration::from_secs(60),
    )
    .await
    .context("the warm-up request")?;
    println!("warm-up: one request staged and completed through Kafka");

    // 1. Submission.
    println!(
        "submitting: {} requests of {} files ({} files), {} clients",
        args.requests,
        args.files_per_request,
        args.files(),
        args.concurrency
    );
    let cpu_before = CpuSample::take(server.child.id());
    let sub = submit(addr, &base, args).await?;
    let cpu = cpu_before.and_then(|b| CpuSample::take(server.child.id()).map(|a| a.since(&b)));
    let secs = sub.load.wall.as_secs_f64();
    fig.accepted = sub.load.accepted;
    fig.submit_errors = sub.load.errors;
    fig.submit_secs = Some(secs);
    fig.post = Latency::of(&sub.load.latencies_us, sub.load.accepted, secs);
    fig.intake_split = Some(split_rates(&sub.done_ms, secs));
    println!(
        "  {} accepted in {secs:.2} s: {:.0} requests/s, {:.0} files/s; POST {}",
        sub.load.accepted,
        sub.load.accepted as f64 / secs,
        sub.load.accepted as f64 * f64::from(args.files_per_request) / secs,
        fig.post.text()
    );
    print_cpu(cpu, sub.load.accepted);
    if let Some((first, last)) = fig.intake_split {
        println!(
            "  requests/s in the first 20%: {first:.0}, last 20%: {last:.0} ({})",
            step(first, last)
        );
    }
    if sub.load.errors > 0 {
        for e in &sub.load.error_samples {
            eprintln!("  {e}");
        }
        fig.failures.push(format!(
            "{} stage requests were not answered 201",
            sub.load.errors
        ));
    }
    server.ensure_running()?;
    let accepted: Vec<(u64, String)> = sub
        .ids
        .iter()
        .enumerate()
        .filter_map(|(i, id)| id.clone().map(|id| (i as u64, id)))
        .collect();
    let files = accepted.len() as u64 * u64::from(args.files_per_request);
    let uris: Arc<Vec<String>> = Arc::new(
        accepted
            .iter()
            .map(|(_, id)| format!("{base}/stage/{id}"))
            .collect(),
    );
    if uris.is_empty() {
        bail!("no stage request was accepted");
    }

    // 2. Holding: every file staged at the simulator and none completed.
    let t = Instant::now();
    match wait_staged(peers, 1 + files, STAGE_TIMEOUT).await {
        Ok(()) => {
            fig.staged_secs = Some(t.elapsed().as_secs_f64());
            println!(
                "  every file staged at the simulator {:.1} s after the last 201",
                t.elapsed().as_secs_f64()
            );
        }
        // Slow staging is a figure, not an error: the files wait either way.
        Err(e) => println!("  warning: {e:#}"),
    }
    server.ensure_running()?;
    let events_before = kafka_events(addr).await?;
    fig.waiting_files = Some(waiting_files(addr).await?);
    println!(
        "holding {} s with {} files waiting (get_stats)",
        args.hold_secs,
        fig.waiting_files.unwrap_or(0)
    );
    let polls = Polls::start(addr, &uris, args);
    let hold_end = Instant::now() + Duration::from_secs(args.hold_secs);
    let mut rss_max = 0;
    while Instant::now() < hold_end {
        rss_max = rss_max.max(server.current_rss_kib().unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let PollResult {
        load: idle,
        sent_us: idle_sent,
    } = polls.stop().await?;
    fig.hold_rss_peak = server.peak_rss_kib();
    fig.hold_rss_now = server.current_rss_kib();
    fig.idle_poll = Latency::of(&idle.latencies_us, idle.accepted, idle.wall.as_secs_f64());
    fig.idle_poll_sent = Latency::of(&idle_sent, idle.accepted, idle.wall.as_secs_f64());
    fig.poll_errors += idle.errors;
    report_errors("idle polls", &idle, fig);
    println!(
        "  daemon RSS: peak {}, now {} (highest sampled while holding {}); polls {}; from \
         their send: {}",
        mib(fig.hold_rss_peak),
        mib(fig.hold_rss_now),
        mib(Some(rss_max)),
        fig.idle_poll.text(),
        fig.idle_poll_sent.text()
    );
    let events_held = kafka_events(addr).await?;
    if events_held != events_before || peers.sim.counters().published > 0 {
        fig.failures.push(format!(
            "files were completed while held ({} events applied, {} published by the \
             simulator)",
            events_held - events_before,
            peers.sim.counters().published
        ));
    }
    server.ensure_running()?;

    // 3. Poll under ingest.
    println!(
        "ingest: {files} recall messages at {}/s; {} poll clients at {}",
        args.ingest_rate,
        args.poll_clients,
        rate_text(args.poll_rate)
    );
    let mut paths: Vec<String> = accepted
        .iter()
        .flat_map(|(i, _)| (0..args.files_per_request).map(move |j| store_path(*i, j)))
        .collect();
    shuffle(&mut paths, 0x5eed);
    let target = events_before + files;
    let sampler = Sampler::start(addr, target);
    let polls = Polls::start(addr, &uris, args);
    let servers = peers.cluster.bootstrap_servers();
    let producing = tokio::spawn(produce(
        servers,
        peers.topic.clone(),
        paths,
        args.ingest_rate,
    ));
    let applied = wait_events(addr, target).await;
    let (sent, produce_secs) = producing.await.context("the producer panicked")??;
    let PollResult {
        load: under,
        sent_us: under_sent,
    } = polls.stop().await?;
    let samples = sampler.stop().await;
    applied?;
    fig.published = Some((sent, sent as f64 / produce_secs));
    fig.ingest_poll = Latency::of(
        &under.latencies_us,
        under.accepted,
        under.wall.as_secs_f64(),
    );
    fig.ingest_poll_sent = Latency::of(&under_sent, under.accepted, under.wall.as_secs_f64());
    fig.poll_errors += under.errors;
    report_errors("polls under ingest", &under, fig);
    fig.ingest = ingest_rates(&samples, events_before, target);
    if let Some(r) = &fig.ingest {
        println!(
            "  published {sent} in {produce_secs:.1} s ({:.0}/s); applied in {:.1} s: \
             {:.0} events/s, first 20% {:.0}/s, last 20% {:.0}/s ({})",
            sent as f64 / produce_secs,
            r.secs,
            r.overall,
            r.first,
            r.last,
            step(r.first, r.last)
        );
    }
    println!(
        "  polls {}; from their send: {}",
        fig.ingest_poll.text(),
        fig.ingest_poll_sent.text()
    );
    server.ensure_running()?;

    // 4. archiveinfo.
    let asked: Vec<String> = accepted
        .iter()
        .flat_map(|(i, _)| (0..args.files_per_request).map(move |j| client_path(*i, j)))
        .take(args.archiveinfo_paths as usize)
        .collect();
    let before = peers.sim.counters().file_status_requests;
    let t = Instant::now();
    let answer = archive_info(addr, &base, &asked).await;
    let secs = t.elapsed().as_secs_f64();
    match answer {
        Ok(on_tape) => {
            let c = peers.sim.counters();
            fig.archive = Some((
                asked.len(),
                secs,
                c.most_file_status_in_flight,
                c.file_status_requests - before,
            ));
            println!(
                "archiveinfo: {} paths in {secs:.3} s ({on_tape} on tape); {} file-status \
                 calls, at most {} in flight",
                asked.len(),
                c.file_status_requests - before,
                c.most_file_status_in_flight
            );
        }
        Err(e) => fig.failures.push(format!("archiveinfo: {e:#}")),
    }
    server.ensure_running()?;

    // 5. Durability: every acknowledged request answers with all its files.
    let check = read_back(addr, &uris, args.files_per_request).await?;
    println!(
        "durability: {} of {} acknowledged requests found ({} completed), {} of {files} \
         files COMPLETED",
        check.found,
        uris.len(),
        check.completed_requests,
        check.completed_files
    );
    if check.found != uris.len() as u64 {
        for e in &check.samples {
            eprintln!("  {e}");
        }
        fig.failures.push(format!(
            "{} acknowledged requests were lost or incomplete",
            uris.len() as u64 - check.found
        ));
    }
    fig.durability = Some(check);
    fig.run_rss_peak = server.peak_rss_kib();
    server.ensure_running()
}

// ---------------------------------------------------------------------------------------------
// Paths and small requests
// ---------------------------------------------------------------------------------------------

/// File `j` of request `i` as the client names it.
fn client_path(i: u64, j: u32) -> String {
    format!("/bench/r{i}/f{j}.fits")
}

/// The same file in the tape system's namespace (the default `strip_prefix` of `/`), as
/// recall messages name it.
fn store_path(i: u64, j: u32) -> String {
    format!("bench/r{i}/f{j}.fits")
}

/// The body of stage request `i`.
fn stage_body(i: u64, files: u32) -> Bytes {
    let mut body = String::with_capacity(files as usize * 40 + 16);
    body.push_str("{\"files\":[");
    for j in 0..files {
        if j > 0 {
            body.push(',');
        }
        body.push_str("{\"path\":\"");
        body.push_str(&client_path(i, j));
        body.push_str("\"}");
    }
    body.push_str("]}");
    Bytes::from(body)
}

/// The endpoint's path from the discovery document, checked to be this daemon's.
async fn discover(addr: SocketAddr) -> anyhow::Result<String> {
    let (status, body) = http_get(addr, "/.well-known/wlcg-tape-rest-api", REQUEST_TIMEOUT).await?;
    if status != StatusCode::OK {
        bail!("discovery answered {status}");
    }
    let doc: Value = serde_json::from_slice(&body).context("discovery: not JSON")?;
    let uri = doc["endpoints"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["version"] == "v1"))
        .and_then(|e| e["uri"].as_str())
        .context("discovery: no v1 endpoint")?;
    let path = uri
        .strip_prefix(&format!("http://{addr}"))
        .with_context(|| format!("discovery: endpoint {uri} is not http://{addr}"))?;
    Ok(path.to_string())
}

/// Submits one request for `path` on a fresh connection; its id.
async fn stage_one(addr: SocketAddr, base: &str, path: &str) -> anyhow::Result<String> {
    let mut sender = connect(addr).await?;
    let body = format!("{{\"files\":[{{\"path\":\"{path}\"}}]}}");
    let (status, body) = post_json(&mut sender, &format!("{base}/stage"), body.into()).await?;
    request_id(status, &body)
}

/// The `requestId` of a 201.
fn request_id(status: StatusCode, body: &[u8]) -> anyhow::Result<String> {
    if status != StatusCode::CREATED {
        bail!(
            "{status}: {}",
            truncate(&String::from_utf8_lossy(body), 300)
        );
    }
    let v: Value = serde_json::from_slice(body).context("a 201 that is not JSON")?;
    Ok(v["requestId"]
        .as_str()
        .context("a 201 without requestId")?
        .to_string())
}

async fn wait_completed(addr: SocketAddr, uri: &str, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let (status, body) = http_get(addr, uri, REQUEST_TIMEOUT).await?;
        if status == StatusCode::OK {
            let v: Value = serde_json::from_slice(&body)?;
            if v.get("completedAt").is_some() {
                return Ok(());
            }
        } else {
            bail!("GET {uri}: {status}");
        }
        if Instant::now() > deadline {
            bail!("not completed within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the simulator has been asked to stage `paths` paths, printing progress.
async fn wait_staged(peers: &Peers, paths: u64, limit: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut report = Instant::now();
    loop {
        let staged = peers.sim.counters().staged_paths;
        if staged >= paths {
            return Ok(());
        }
        if started.elapsed() > limit {
            bail!("only {staged} of {paths} paths staged within {limit:?}");
        }
        if report.elapsed() > Duration::from_secs(10) {
            println!("  ... {staged} of {paths} paths staged at the simulator");
            report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `waiting_files` from `GET /get_stats/`.
async fn waiting_files(addr: SocketAddr) -> anyhow::Result<u64> {
    let (status, body) = http_get(addr, "/get_stats/", STATS_TIMEOUT).await?;
    if status != StatusCode::OK {
        bail!("GET /get_stats/ answered {status}");
    }
    let v: Value = serde_json::from_slice(&body).context("GET /get_stats/: not JSON")?;
    v["waiting_files"]
        .as_u64()
        .context("GET /get_stats/ has no waiting_files")
}

/// `staged_kafka_events_total` from `/metrics`.
async fn kafka_events(addr: SocketAddr) -> anyhow::Result<u64> {
    let (status, body) = http_get(addr, "/metrics", REQUEST_TIMEOUT).await?;
    if status != StatusCode::OK {
        bail!("GET /metrics answered {status}");
    }
    events_of(&body).context("/metrics has no staged_kafka_events_total")
}

fn events_of(metrics: &[u8]) -> Option<u64> {
    String::from_utf8_lossy(metrics)
        .lines()
        .find_map(|l| l.strip_prefix("staged_kafka_events_total "))
        .and_then(|v| v.trim().parse().ok())
}

// ---------------------------------------------------------------------------------------------
// 1. Submission
// ---------------------------------------------------------------------------------------------

struct Submission {
    load: LoadResult,
    /// Each request's id, by index; `None` for one not accepted.
    ids: Vec<Option<String>>,
    /// When each 201 arrived, in milliseconds from the start.
    done_ms: Vec<u32>,
}

struct SubmitTask {
    result: TaskResult,
    ids: Vec<(u64, String)>,
    done_ms: Vec<u32>,
}

async fn submit(addr: SocketAddr, base: &str, args: &TapeRestArgs) -> anyhow::Result<Submission> {
    let next = Arc::new(AtomicU64::new(0));
    let uri: Arc<str> = format!("{base}/stage").into();
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|_| {
            tokio::spawn(submit_task(
                addr,
                uri.clone(),
                next.clone(),
                args.requests,
                args.files_per_request,
                started,
            ))
        })
        .collect();
    let mut out = Submission {
        load: LoadResult::default(),
        ids: vec![None; args.requests as usize],
        done_ms: Vec::with_capacity(args.requests as usize),
    };
    for task in tasks {
        let t = task.await.context("a client task panicked")?;
        merge(&mut out.load, t.result);
        for (i, id) in t.ids {
            out.ids[i as usize] = Some(id);
        }
        out.done_ms.extend(t.done_ms);
    }
    out.load.wall = started.elapsed();
    out.load.latencies_us.sort_unstable();
    out.done_ms.sort_unstable();
    Ok(out)
}

fn merge(into: &mut LoadResult, t: TaskResult) {
    into.accepted += t.accepted;
    into.errors += t.errors;
    into.latencies_us.extend(t.latencies_us);
    for e in t.error_samples {
        if into.error_samples.len() < super::KEPT_ERRORS {
            into.error_samples.push(e);
        }
    }
}

async fn submit_task(
    addr: SocketAddr,
    uri: Arc<str>,
    next: Arc<AtomicU64>,
    end: u64,
    files: u32,
    started: Instant,
) -> SubmitTask {
    let mut out = SubmitTask {
        result: TaskResult::default(),
        ids: Vec::new(),
        done_ms: Vec::new(),
    };
    let mut conn = None;
    let mut reconnects = 0u32;
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= end || reconnects > MAX_RECONNECTS {
            break;
        }
        let sender = match conn.as_mut() {
            Some(s) => s,
            None => match connect(addr).await {
                Ok(s) => conn.insert(s),
                Err(e) => {
                    out.result
                        .error(format!("request {i}: cannot connect: {e:#}"));
                    reconnects += 1;
                    continue;
                }
            },
        };
        let body = stage_body(i, files);
        let t = Instant::now();
        match tokio::time::timeout(REQUEST_TIMEOUT, post_json(sender, &uri, body)).await {
            Ok(Ok((status, body))) => {
                out.result.latencies_us.push(micros(t.elapsed()));
                match request_id(status, &body) {
                    Ok(id) => {
                        out.result.accepted += 1;
                        out.ids.push((i, id));
                        out.done_ms.push(started.elapsed().as_millis() as u32);
                    }
                    Err(e) => out.result.error(format!("request {i}: {e:#}")),
                }
            }
            Ok(Err(e)) => {
                out.result.error(format!("request {i}: {e:#}"));
                conn = None;
                reconnects += 1;
            }
            Err(_) => {
                out.result
                    .error(format!("request {i}: no answer within {REQUEST_TIMEOUT:?}"));
                conn = None;
                reconnects += 1;
            }
        }
    }
    if reconnects > MAX_RECONNECTS {
        out.result
            .error(format!("giving up after {MAX_RECONNECTS} reconnects"));
    }
    out
}

/// Events (arrival times in ms, sorted) per second in the first and the last 20% of a
/// phase of `secs` seconds.
fn split_rates(done_ms: &[u32], secs: f64) -> (f64, f64) {
    let fifth = secs * 0.2;
    if fifth <= 0.0 {
        return (0.0, 0.0);
    }
    let first = done_ms
        .iter()
        .filter(|&&t| f64::from(t) / 1000.0 <= fifth)
        .count();
    let last = done_ms
        .iter()
        .filter(|&&t| f64::from(t) / 1000.0 >= secs - fifth)
        .count();
    (first as f64 / fifth, last as f64 / fifth)
}

// ---------------------------------------------------------------------------------------------
// Polls
// ---------------------------------------------------------------------------------------------

/// Poll clients running until stopped.
struct Polls {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<(TaskResult, Vec<u32>)>>,
    started: Instant,
}

/// What the poll clients saw: latencies from when each poll was due (in `load`), and from
/// when it was sent (the daemon's part, without this program's own delays).
struct PollResult {
    load: LoadResult,
    sent_us: Vec<u32>,
}

impl Polls {
    fn start(addr: SocketAddr, uris: &Arc<Vec<String>>, args: &TapeRestArgs) -> Polls {
        let stop = Arc::new(AtomicBool::new(false));
        // Each client's share of the rate, as the interval between its polls.
        let interval = (args.poll_rate > 0)
            .then(|| Duration::from_secs_f64(f64::from(args.poll_clients) / args.poll_rate as f64));
        let tasks = (0..args.poll_clients)
            .map(|c| {
                tokio::spawn(poll_task(
                    addr,
                    uris.clone(),
                    interval,
                    stop.clone(),
                    0x9e37_79b9_7f4a_7c15 ^ u64::from(c),
                ))
            })
            .collect();
        Polls {
            stop,
            tasks,
            started: Instant::now(),
        }
    }

    async fn stop(self) -> anyhow::Result<PollResult> {
        self.stop.store(true, Ordering::Relaxed);
        let mut out = LoadResult::default();
        let mut sent_us = Vec::new();
        for t in self.tasks {
            let (result, sent) = t.await.context("a poll client panicked")?;
            merge(&mut out, result);
            sent_us.extend(sent);
        }
        out.wall = self.started.elapsed();
        out.latencies_us.sort_unstable();
        sent_us.sort_unstable();
        Ok(PollResult { load: out, sent_us })
    }
}

/// One poll client: `GET` of random requests on a keep-alive connection, every `interval`
/// (latency from when the poll was due) or back to back (latency from its send).
async fn poll_task(
    addr: SocketAddr,
    uris: Arc<Vec<String>>,
    interval: Option<Duration>,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> (TaskResult, Vec<u32>) {
    let mut out = TaskResult::default();
    let mut sent_us = Vec::new();
    let mut rng = SplitMix(seed);
    let mut conn = None;
    let mut reconnects = 0u32;
    let started = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && reconnects <= MAX_RECONNECTS {
        let due = match interval {
            Some(every) => {
                let due = started + every.mul_f64(n as f64);
                tokio::time::sleep_until(due.into()).await;
                due
            }
            None => Instant::now(),
        };
        n += 1;
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let uri = &uris[(rng.next() % uris.len() as u64) as usize];
        let sender = match conn.as_mut() {
            Some(s) => s,
            None => match connect(addr).await {
                Ok(s) => conn.insert(s),
                Err(e) => {
                    out.error(format!("GET {uri}: cannot connect: {e:#}"));
                    reconnects += 1;
                    continue;
                }
            },
        };
        let sent = Instant::now();
        match tokio::time::timeout(REQUEST_TIMEOUT, get_on(sender, uri)).await {
            Ok(Ok((StatusCode::OK, _))) => {
                out.accepted += 1;
                out.latencies_us.push(micros(due.elapsed()));
                sent_us.push(micros(sent.elapsed()));
            }
            Ok(Ok((status, body))) => {
                out.latencies_us.push(micros(due.elapsed()));
                let text = String::from_utf8_lossy(&body);
                out.error(format!("GET {uri}: {status}: {}", truncate(&text, 300)));
            }
            Ok(Err(e)) => {
                out.error(format!("GET {uri}: {e:#}"));
                conn = None;
                reconnects += 1;
            }
            Err(_) => {
                out.error(format!("GET {uri}: no answer within {REQUEST_TIMEOUT:?}"));
                conn = None;
                reconnects += 1;
            }
        }
    }
    (out, sent_us)
}

fn report_errors(what: &str, run: &LoadResult, fig: &mut Figures) {
    if run.errors == 0 {
        return;
    }
    eprintln!("{what}: {} errors; first ones:", run.errors);
    for e in &run.error_samples {
        eprintln!("  {e}");
    }
    fig.failures
        .push(format!("{} {what} were not answered 200", run.errors));
}

// ---------------------------------------------------------------------------------------------
// 3. Ingest
// ---------------------------------------------------------------------------------------------

/// Publishes one recall message per path at `rate` a second (evenly, in 5 ms steps, catching
/// up when late); how many were delivered, and over how many seconds they were queued.
/// Messages are queued on a thread of their own, so that a burst never holds up the poll
/// clients' async runtime.
async fn produce(
    servers: String,
    topic: String,
    paths: Vec<String>,
    rate: u64,
) -> anyhow::Result<(u64, f64)> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &servers)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .set("batch.num.messages", "10000")
        .create()?;
    let queue = move || -> anyhow::Result<_> {
        let started = Instant::now();
        let mut deliveries = Vec::with_capacity(paths.len());
        let mut sent = 0usize;
        while sent < paths.len() {
            let due = ((started.elapsed().as_secs_f64() * rate as f64) as usize).min(paths.len());
            let now = chrono::Utc::now();
            while sent < due {
                let path = &paths[sent];
                let payload = recall_message(path, now, now, "");
                let record = FutureRecord::to(&topic).payload(&payload).key(path);
                match producer.send_result(record) {
                    Ok(d) => {
                        deliveries.push(d);
                        sent += 1;
                    }
                    // The producer's queue is full: the rest of this step waits for the next.
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        break;
                    }
                    Err((e, _)) => bail!("queueing a recall message: {e}"),
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok((deliveries, started.elapsed().as_secs_f64(), producer))
    };
    let (deliveries, secs, _producer) = tokio::task::spawn_blocking(queue)
        .await
        .context("the producer thread panicked")??;
    let mut delivered = 0u64;
    for d in futures::future::join_all(deliveries).await {
        match d {
            Ok(Ok(_)) => delivered += 1,
            Ok(Err((e, _))) => bail!("delivering a recall message: {e}"),
            Err(_) => bail!("a recall message's delivery was cancelled"),
        }
    }
    Ok((delivered, secs))
}

/// Waits until the daemon has applied `target` events in all, failing if it applies none
/// for [`INGEST_STALL`].
async fn wait_events(addr: SocketAddr, target: u64) -> anyhow::Result<()> {
    let mut last = (0, Instant::now());
    let mut report = Instant::now();
    loop {
        let events = kafka_events(addr).await?;
        if events >= target {
            return Ok(());
        }
        if events != last.0 {
            last = (events, Instant::now());
        } else if last.1.elapsed() > INGEST_STALL {
            bail!("the ingest applied no event for {INGEST_STALL:?}: {events} of {target}");
        }
        if report.elapsed() > Duration::from_secs(10) {
            println!("  ... {events} of {target} events applied");
            report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `/metrics` read every [`SAMPLE_EVERY`]: (time from the start, events applied).
struct Sampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<(f64, u64)>>,
}

impl Sampler {
    /// Samples until stopped, and after that until a sample has reached `until` (for at
    /// most 5 s more), so that the phase's end is among the samples.
    fn start(addr: SocketAddr, until: u64) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut out: Vec<(f64, u64)> = Vec::new();
            let mut conn = None;
            let mut halted: Option<Instant> = None;
            loop {
                if halted.is_none() && halt.load(Ordering::Relaxed) {
                    halted = Some(Instant::now());
                }
                if let Some(h) = halted {
                    let reached = out.last().is_some_and(|(_, e)| *e >= until);
                    if reached || h.elapsed() > Duration::from_secs(5) {
                        break;
                    }
                }
                if conn.is_none() {
                    conn = connect(addr).await.ok();
                }
                if let Some(sender) = conn.as_mut() {
                    match get_on(sender, "/metrics").await {
                        Ok((StatusCode::OK, body)) => {
                            if let Some(e) = events_of(&body) {
                                out.push((started.elapsed().as_secs_f64(), e));
                            }
                        }
                        _ => conn = None,
                    }
                }
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
            out
        });
        Sampler { stop, task }
    }

    async fn stop(self) -> Vec<(f64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}

/// The ingest's rates: over the whole phase, its first and its last 20%.
struct IngestRates {
    /// From the first message published to the last event applied.
    secs: f64,
    overall: f64,
    first: f64,
    last: f64,
}

/// Rates from the samples: the phase runs from the start to the first sample at `target`.
fn ingest_rates(samples: &[(f64, u64)], before: u64, target: u64) -> Option<IngestRates> {
    let end = samples.iter().find(|(_, e)| *e >= target)?.0;
    if end <= 0.0 {
        return None;
    }
    let at = |t: f64| -> f64 {
        // Linear between the samples around t; `before` at the start.
        let mut prev = (0.0, before as f64);
        for &(ts, e) in samples {
            if ts >= t {
                let span = ts - prev.0;
                return if span <= 0.0 {
                    e as f64
                } else {
                    prev.1 + (e as f64 - prev.1) * (t - prev.0) / span
                };
            }
            prev = (ts, e as f64);
        }
        prev.1
    };
    let fifth = end * 0.2;
    Some(IngestRates {
        secs: end,
        overall: (target - before) as f64 / end,
        first: (at(fifth) - before as f64) / fifth,
        last: (at(end) - at(end - fifth)) / fifth,
    })
}

// ---------------------------------------------------------------------------------------------
// 4. archiveinfo, 5. read back
// ---------------------------------------------------------------------------------------------

/// One archiveinfo call; every path must be answered with a locality. How many are on tape.
async fn archive_info(addr: SocketAddr, base: &str, paths: &[String]) -> anyhow::Result<usize> {
    let body = serde_json::json!({ "paths": paths }).to_string();
    let call = async {
        let mut sender = connect(addr).await?;
        post_json(&mut sender, &format!("{base}/archiveinfo"), body.into()).await
    };
    let (status, body) = match tokio::time::timeout(ARCHIVEINFO_TIMEOUT, call).await {
        Ok(r) => r?,
        Err(_) => bail!("no answer within {ARCHIVEINFO_TIMEOUT:?}"),
    };
    if status != StatusCode::OK {
        bail!(
            "answered {status}: {}",
            truncate(&String::from_utf8_lossy(&body), 300)
        );
    }
    let v: Value = serde_json::from_slice(&body).context("not JSON")?;
    let items = v.as_array().context("not a JSON array")?;
    if items.len() != paths.len() {
        bail!("{} answers for {} paths", items.len(), paths.len());
    }
    if let Some(bad) = items.iter().find(|i| !i["locality"].is_string()) {
        bail!("a path without a locality: {bad}");
    }
    Ok(items.iter().filter(|i| i["locality"] == "TAPE").count())
}

/// What reading every request back found.
#[derive(Default)]
struct ReadBack {
    /// Requests answered 200 with all their files.
    found: u64,
    completed_requests: u64,
    completed_files: u64,
    samples: Vec<String>,
}

async fn read_back(
    addr: SocketAddr,
    uris: &Arc<Vec<String>>,
    files: u32,
) -> anyhow::Result<ReadBack> {
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..CHECK_CLIENTS)
        .map(|_| {
            let (uris, next) = (uris.clone(), next.clone());
            tokio::spawn(async move {
                let mut out = ReadBack::default();
                let mut conn = None;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(uri) = uris.get(i) else { break };
                    let mut tries = 0;
                    let answer = loop {
                        if conn.is_none() {
                            conn = connect(addr).await.ok();
                        }
                        let r = match conn.as_mut() {
                            Some(s) => get_on(s, uri).await,
                            None => Err(anyhow::anyhow!("cannot connect")),
                        };
                        match r {
                            Err(e) if tries < 3 => {
                                conn = None;
                                tries += 1;
                                let _ = e;
                            }
                            r => break r,
                        }
                    };
                    match check_request(answer, files) {
                        Ok(done) => {
                            out.found += 1;
                            out.completed_files += done;
                            out.completed_requests += u64::from(done == u64::from(files));
                        }
                        Err(e) => {
                            if out.samples.len() < super::KEPT_ERRORS {
                                out.samples.push(format!("GET {uri}: {e:#}"));
                            }
                        }
                    }
                }
                out
            })
        })
        .collect();
    let mut all = ReadBack::default();
    for t in tasks {
        let t = t.await.context("a read-back client panicked")?;
        all.found += t.found;
        all.completed_requests += t.completed_requests;
        all.completed_files += t.completed_files;
        all.samples.extend(t.samples);
    }
    all.samples.truncate(super::KEPT_ERRORS);
    Ok(all)
}

/// A poll answer holding all `files` files; how many are COMPLETED.
fn check_request(answer: anyhow::Result<(StatusCode, Bytes)>, files: u32) -> anyhow::Result<u64> {
    let (status, body) = answer?;
    if status != StatusCode::OK {
        bail!(
            "{status}: {}",
            truncate(&String::from_utf8_lossy(&body), 300)
        );
    }
    let v: Value = serde_json::from_slice(&body).context("not JSON")?;
    let list = v["files"].as_array().context("no files array")?;
    if list.len() != files as usize {
        bail!("{} files, expected {files}", list.len());
    }
    Ok(list.iter().filter(|f| f["state"] == "COMPLETED").count() as u64)
}

// ---------------------------------------------------------------------------------------------
// Figures and the table
// ---------------------------------------------------------------------------------------------

/// Latency percentiles (ms) and a rate.
#[derive(Default, Clone, Copy)]
struct Latency {
    count: u64,
    p50: f64,
    p99: f64,
    max: f64,
    per_sec: f64,
}

impl Latency {
    fn of(sorted_us: &[u32], count: u64, secs: f64) -> Latency {
        let ms = |q: f64| f64::from(percentile_us(sorted_us, q)) / 1000.0;
        Latency {
            count,
            p50: ms(0.50),
            p99: ms(0.99),
            max: ms(1.0),
            per_sec: if secs > 0.0 { count as f64 / secs } else { 0.0 },
        }
    }

    fn text(&self) -> String {
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} at {:.0}/s)",
            self.p50, self.p99, self.max, self.count, self.per_sec
        )
    }
}

struct Figures {
    backend: Backend,
    accepted: u64,
    submit_errors: u64,
    submit_secs: Option<f64>,
    post: Latency,
    /// Requests/s in the first and last 20% of the submission.
    intake_split: Option<(f64, f64)>,
    staged_secs: Option<f64>,
    waiting_files: Option<u64>,
    hold_rss_peak: Option<u64>,
    hold_rss_now: Option<u64>,
    idle_poll: Latency,
    idle_poll_sent: Latency,
    /// Messages delivered, and the rate they were published at.
    published: Option<(u64, f64)>,
    ingest: Option<IngestRates>,
    ingest_poll: Latency,
    ingest_poll_sent: Latency,
    poll_errors: u64,
    /// Paths, seconds, most file-status calls in flight, file-status calls made.
    archive: Option<(usize, f64, usize, u64)>,
    durability: Option<ReadBack>,
    run_rss_peak: Option<u64>,
    wall: Option<f64>,
    failures: Vec<String>,
}

impl Figures {
    fn new(backend: Backend) -> Figures {
        Figures {
            backend,
            accepted: 0,
            submit_errors: 0,
            submit_secs: None,
            post: Latency::default(),
            intake_split: None,
            staged_secs: None,
            waiting_files: None,
            hold_rss_peak: None,
            hold_rss_now: None,
            idle_poll: Latency::default(),
            idle_poll_sent: Latency::default(),
            published: None,
            ingest: None,
            ingest_poll: Latency::default(),
            ingest_poll_sent: Latency::default(),
            poll_errors: 0,
            archive: None,
            durability: None,
            run_rss_peak: None,
            wall: None,
            failures: Vec::new(),
        }
    }
}

fn mib(kib: Option<u64>) -> String {
    kib.map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
        .unwrap_or_else(|| "unknown".into())
}

fn rate_text(rate: u64) -> String {
    match rate {
        0 => "back to back".into(),
        r => format!("{r} polls/s"),
    }
}

/// Whether `last` is a step from `first`.
fn step(first: f64, last: f64) -> String {
    if first <= 0.0 || last <= 0.0 {
        return "no figure".into();
    }
    let ratio = last / first;
    let verdict = if (1.0 / STEP_FACTOR..=STEP_FACTOR).contains(&ratio) {
        "no step"
    } else {
        "STEP"
    };
    format!("last/first {ratio:.2}: {verdict}")
}

fn print_table(args: &TapeRestArgs, all: &[Figures]) {
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let lat =
        |l: &Latency| (l.count > 0).then(|| format!("{:.1} / {:.1} / {:.1}", l.p50, l.p99, l.max));
    type Row<'a> = (
        &'a str,
        &'a str,
        Box<dyn Fn(&Figures) -> Option<String> + 'a>,
    );
    let files = f64::from(args.files_per_request);
    let ingest_target = args.ingest_rate.to_string();
    let rows: Vec<Row> = vec![
        (
            "stage requests answered 201",
            "all",
            Box::new(|f| {
                Some(format!(
                    "{} of {} ({} errors)",
                    f.accepted, args.requests, f.submit_errors
                ))
            }),
        ),
        (
            "submission: requests/s",
            "",
            Box::new(|f| {
                f.submit_secs
                    .map(|s| format!("{:.0}", f.accepted as f64 / s))
            }),
        ),
        (
            "submission: files/s",
            "",
            Box::new(|f| {
                f.submit_secs
                    .map(|s| format!("{:.0}", f.accepted as f64 * files / s))
            }),
        ),
        (
            "POST latency ms p50/p99/max",
            "",
            Box::new(|f| lat(&f.post)),
        ),
        (
            "intake requests/s first/last 20%",
            "no step",
            Box::new(|f| {
                f.intake_split
                    .map(|(a, b)| format!("{a:.0} / {b:.0} ({})", step(a, b)))
            }),
        ),
        (
            "all files staged at Scout after",
            "",
            Box::new(|f| f.staged_secs.map(|s| format!("{s:.1} s"))),
        ),
        (
            "files waiting while held",
            "",
            Box::new(|f| f.waiting_files.map(|w| w.to_string())),
        ),
        (
            "daemon RSS held: peak / now",
            "< 300 MB",
            Box::new(|f| {
                f.hold_rss_now
                    .map(|_| format!("{} / {}", mib(f.hold_rss_peak), mib(f.hold_rss_now)))
            }),
        ),
        (
            "poll ms p50/p99/max, no ingest",
            "",
            Box::new(|f| lat(&f.idle_poll)),
        ),
        (
            "  the same from each poll's send",
            "",
            Box::new(|f| lat(&f.idle_poll_sent)),
        ),
        (
            "recall messages published/s",
            &ingest_target,
            Box::new(|f| f.published.map(|(n, r)| format!("{r:.0} ({n} messages)"))),
        ),
        (
            "events applied/s",
            "",
            Box::new(|f| f.ingest.as_ref().map(|r| format!("{:.0}", r.overall))),
        ),
        (
            "events/s first/last 20%",
            "no step",
            Box::new(|f| {
                f.ingest
                    .as_ref()
                    .map(|r| format!("{:.0} / {:.0} ({})", r.first, r.last, step(r.first, r.last)))
            }),
        ),
        (
            "poll ms p50/p99/max, ingest",
            "p99 < 50",
            Box::new(|f| lat(&f.ingest_poll)),
        ),
        (
            "  the same from each poll's send",
            "p99 < 50",
            Box::new(|f| lat(&f.ingest_poll_sent)),
        ),
        (
            "polls/s under ingest",
            "",
            Box::new(|f| {
                (f.ingest_poll.count > 0).then(|| format!("{:.0}", f.ingest_poll.per_sec))
            }),
        ),
        (
            "archiveinfo: one call",
            "",
            Box::new(|f| {
                f.archive
                    .map(|(n, s, _, _)| format!("{n} paths in {:.0} ms", s * 1000.0))
            }),
        ),
        (
            "file-status calls in flight, most",
            "",
            Box::new(|f| f.archive.map(|(_, _, m, c)| format!("{m} ({c} calls)"))),
        ),
        (
            "requests found afterwards",
            "all",
            Box::new(|f| {
                f.durability
                    .as_ref()
                    .map(|d| format!("{} of {}", d.found, f.accepted))
            }),
        ),
        (
            "files COMPLETED afterwards",
            "all",
            Box::new(|f| {
                f.durability
                    .as_ref()
                    .map(|d| format!("{}", d.completed_files))
            }),
        ),
        (
            "daemon peak RSS, whole run",
            "",
            Box::new(|f| f.run_rss_peak.map(|k| mib(Some(k)))),
        ),
        (
            "poll errors",
            "0",
            Box::new(|f| Some(f.poll_errors.to_string())),
        ),
        (
            "run time",
            "",
            Box::new(|f| f.wall.map(|s| format!("{s:.0} s"))),
        ),
        (
            "result",
            "",
            Box::new(|f| {
                Some(if f.failures.is_empty() {
                    "passed".into()
                } else {
                    "FAILED".into()
                })
            }),
        ),
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|(_, _, v)| all.iter().map(|f| opt(v(f))).collect())
        .collect();
    let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let w1 = rows.iter().map(|r| r.1.len()).max().unwrap_or(0).max(6);
    let wc: Vec<usize> = (0..all.len())
        .map(|i| {
            cells
                .iter()
                .map(|c| c[i].len())
                .max()
                .unwrap_or(0)
                .max(all[i].backend.to_string().len())
        })
        .collect();
    println!(
        "\ntape-rest: {} requests x {} files, {} submitting clients, ingest at {}/s, {} poll \
         clients at {}",
        args.requests,
        args.files_per_request,
        args.concurrency,
        args.ingest_rate,
        args.poll_clients,
        rate_text(args.poll_rate)
    );
    let mut head = format!("{:w0$}  {:w1$}", "", "target");
    for (i, f) in all.iter().enumerate() {
        head.push_str(&format!("  {:w$}", f.backend.to_string(), w = wc[i]));
    }
    println!("{head}");
    println!("{}", "-".repeat(head.len()));
    for (r, row) in rows.iter().zip(&cells) {
        let mut line = format!("{:w0$}  {:w1$}", r.0, r.1);
        for (i, c) in row.iter().enumerate() {
            line.push_str(&format!("  {:w$}", c, w = wc[i]));
        }
        println!("{}", line.trim_end());
    }
    for f in all.iter().filter(|f| !f.failures.is_empty()) {
        println!("{} failures:", f.backend);
        for e in &f.failures {
            println!("  {e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A small deterministic random source (no cryptographic use)
// ---------------------------------------------------------------------------------------------

/// SplitMix64.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Fisher-Yates with [`SplitMix`].
fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut rng = SplitMix(seed);
    for i in (1..items.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingest_rates_split_the_phase() {
        // 1,000 events/s for 10 s after 5 events before.
        let samples: Vec<(f64, u64)> = (1..=100).map(|i| (i as f64 * 0.1, 5 + i * 100)).collect();
        let r = ingest_rates(&samples, 5, 10_005).unwrap();
        assert!((r.secs - 10.0).abs() < 1e-9);
        assert!((r.overall - 1000.0).abs() < 1e-6);
        assert!((r.first - 1000.0).abs() < 1e-6);
        assert!((r.last - 1000.0).abs() < 1e-6);
    }

    #[test]
    fn split_rates_count_the_first_and_last_fifth() {
        // One arrival a millisecond over one second: 0..=200 ms and 800..=999 ms.
        let done: Vec<u32> = (0..1000).collect();
        let (a, b) = split_rates(&done, 1.0);
        assert!(
            (a - 1005.0).abs() < 1e-6 && (b - 1000.0).abs() < 1e-6,
            "{a} {b}"
        );
    }

    #[test]
    fn metrics_give_the_events_counter() {
        let text = b"# TYPE staged_kafka_events counter\nstaged_kafka_events_total 42\n";
        assert_eq!(events_of(text), Some(42));
    }

    #[test]
    fn a_shuffle_keeps_every_item() {
        let mut v: Vec<u32> = (0..1000).collect();
        shuffle(&mut v, 7);
        assert_ne!(v, (0..1000).collect::<Vec<_>>());
        v.sort_unstable();
        assert_eq!(v, (0..1000).collect::<Vec<_>>());
    }
}
