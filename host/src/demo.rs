//! `staged demo`: the whole pipeline on one machine with nothing installed.
//!
//! A temporary SQLite store, the Scout simulator on three nodes (one of them flaky), a
//! Kafka-protocol broker from librdkafka's mock cluster carrying the simulator's recall
//! messages, a metadata-service simulator, the MWA adapter (built with the daemon and
//! embedded in it) and a callback receiver standing in for ASVO. The daemon is the real one
//! (`app::start`); the demo submits sample jobs to its HTTP API like any client, shows their
//! progress, reports each callback, and keeps serving until Ctrl-C or SIGTERM.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::routing::post;
use rdkafka::mocking::MockCluster;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use staged_testkit::TempDir;
use staged_testkit::metadata::{MetadataSim, ObsFiles};
use staged_testkit::scout::{FileState, ScoutSim, SimNode, SimSettings};

use crate::allow_list::AllowList;
use crate::app;
use crate::config::{Config, LogFormat, Secret};

/// The MWA adapter, compiled for wasm32-wasip2 by the build script.
static MWA_ADAPTER: &[u8] =
    include_bytes!(concat!(env!("STAGED_ADAPTERS_DIR"), "/adapter_mwa.wasm"));

const TOPIC: &str = "staging-demo";
const OBS_OK: i64 = 1_234_567_890;
const OBS_UNKNOWN: i64 = 1_000_000_001;

fn secret(value: &str) -> Secret {
    toml::Value::String(value.into())
        .try_into()
        .expect("an inline secret always parses")
}

pub async fn run(listen: SocketAddr) -> anyhow::Result<()> {
    let dir = TempDir::new("staged-demo").context("creating the demo's temporary directory")?;
    let out = Out::new();

    let cluster = MockCluster::new(1).context("starting the mock Kafka cluster")?;
    cluster
        .create_topic(TOPIC, 2, 1)
        .context("creating the demo topic")?;
    let brokers = cluster.bootstrap_servers();

    let sim = ScoutSim::new(SimSettings {
        kafka_brokers: Some(brokers.clone()),
        default_topic: TOPIC.into(),
        recall_delay: Duration::from_secs(2),
        recall_spread: Duration::from_secs(8),
        ..SimSettings::default()
    })?;
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(sim.serve_loopback().await?);
    }
    // The third node fails a third of its requests; the client fails over around it.
    nodes[2].set_failure_fraction(0.35);

    let metadata = MetadataSim::start(sample_observations()).await?;
    let adapter = dir.path().join("adapter_mwa.wasm");
    std::fs::write(&adapter, MWA_ADAPTER).context("writing the MWA adapter")?;
    let receiver = CallbackReceiver::start().await?;

    let config = demo_config(dir.path(), listen, &nodes, &brokers, &adapter, &metadata);
    crate::telemetry::init(&config.logging);
    let server = app::start(&config).await.context("starting the daemon")?;
    let base = format!("http://{}", server.addr);

    out.line(&format!("staged demo: the daemon is serving {base}"));
    out.line(&format!("  dashboard: {base}/"));
    out.line(&format!("  API docs:  {base}/docs"));
    out.line(&format!("  jobs:      {base}/get_joblist/"));
    out.line(&format!(
        "  Tape REST: {base}/.well-known/wlcg-tape-rest-api (WLCG Tape REST API v1, for FTS and gfal2)"
    ));
    out.line(&format!(
        "  peers:     Scout simulator on {} nodes ({} flaky), Kafka mock broker {brokers}, metadata service {}",
        nodes.len(),
        nodes[2].url(),
        metadata.data_files_url()
    ));
    out.line("");

    // Files the tape system has on disk already, and two it does not have at all.
    sim.set_file("mwa/1234567890/1234567890_metafits.fits", FileState::Online);
    sim.set_file("mwa/demo/ready_already.fits", FileState::Online);
    sim.set_file("mwa/demo/lost_1.fits", FileState::Missing);
    sim.set_file("mwa/demo/lost_2.fits", FileState::Missing);

    let samples = sample_jobs(&receiver.url());
    let http = reqwest::Client::new();
    for (what, body) in &samples {
        let r = http
            .post(format!("{base}/staging/"))
            .json(body)
            .send()
            .await
            .context("submitting a sample job")?;
        out.line(&format!(
            "submitted job {} ({what}): HTTP {}",
            body["job_id"],
            r.status().as_u16()
        ));
    }
    // The other way in: a WLCG Tape REST stage request, as FTS or gfal2 would send it.
    let stage = json!({ "files": [
        { "path": "/mwa/demo/tape_1.fits" },
        { "path": "/mwa/demo/tape_2.fits" },
        { "path": "/mwa/demo/tape_3.fits" },
    ]});
    let r = http
        .post(format!("{base}/api/v1/stage"))
        .json(&stage)
        .send()
        .await
        .context("submitting the sample stage request")?;
    let status = r.status().as_u16();
    let location = r
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    out.line(&format!(
        "submitted a Tape REST stage request of 3 files: HTTP {status}{}",
        location
            .as_deref()
            .map(|l| format!(", poll it at {l}"))
            .unwrap_or_default()
    ));
    out.line("");

    let result = watch(&out, &http, &base, receiver, samples.len(), location).await;
    out.line("stopping...");
    server.stop().await?;
    // The simulator's producer must go before the broker it publishes to, or it logs the
    // broker's loss as errors: the nodes' tasks share it, so they must have ended.
    for node in nodes {
        node.shutdown().await;
    }
    drop(sim);
    drop(cluster);
    result
}

fn sample_observations() -> HashMap<i64, ObsFiles> {
    let mut files = vec![(
        format!("{OBS_OK}_metafits.fits"),
        None,
        Some(format!("/{OBS_OK}")),
    )];
    for ch in 1..=8 {
        files.push((
            format!("{OBS_OK}_20260101000000_ch{ch:03}_000.fits"),
            Some("mwa-vis".to_string()),
            Some(format!("/{OBS_OK}")),
        ));
    }
    HashMap::from([(OBS_OK, files)])
}

fn sample_jobs(notify_url: &str) -> Vec<(&'static str, Value)> {
    vec![
        (
            "a list of files",
            json!({"job_id": 101, "notify_url": notify_url, "files": [
                "mwa/demo/a.fits", "mwa/demo/b.fits", "mwa/demo/c.fits",
                "mwa/demo/d.fits", "mwa/demo/ready_already.fits"]}),
        ),
        (
            "an MWA observation",
            json!({"job_id": 102, "notify_url": notify_url, "obs": {"obs_id": OBS_OK}}),
        ),
        (
            "files, two of them lost on tape",
            json!({"job_id": 103, "notify_url": notify_url, "files": [
                "mwa/demo/e.fits", "mwa/demo/lost_1.fits", "mwa/demo/lost_2.fits"]}),
        ),
        (
            "an observation the metadata service does not know",
            json!({"job_id": 104, "notify_url": notify_url, "obs": {"obs_id": OBS_UNKNOWN}}),
        ),
    ]
}

fn demo_config(
    dir: &Path,
    listen: SocketAddr,
    nodes: &[SimNode],
    brokers: &str,
    adapter: &Path,
    metadata: &MetadataSim,
) -> Config {
    let mut c = Config::default();
    c.server.listen = listen;
    c.database.url = format!("sqlite://{}", dir.join("staged.db").display());
    c.reports.dir = dir.join("reports");
    c.logging.format = LogFormat::Text;
    // The demo narrates; the daemon only speaks up when something is wrong.
    c.logging.level = "warn".into();
    c.scout.nodes = nodes.iter().map(|n| n.url()).collect();
    c.scout.username = "scout".into();
    c.scout.password = Some(secret("scout-pw"));
    c.scout.backoff_initial_ms = 100;
    c.scout.eject_secs = 5.0;
    c.kafka.brokers = vec![brokers.to_string()];
    c.kafka.topic = TOPIC.into();
    c.kafka.group_id = "staged-demo".into();
    c.adapter.wasm = Some(adapter.to_path_buf());
    c.adapter.http_allow = AllowList::parse(&[metadata.allow()])
        .expect("the simulator's address is an allow-list entry");
    c.adapter.settings.insert(
        "data_files_url".into(),
        toml::Value::String(metadata.data_files_url()),
    );
    c.callbacks.username = "asvo".into();
    c.callbacks.password = Some(secret("demo"));
    // The callback receiver is on loopback: allowed by name, as a production ASVO would be.
    c.callbacks.allow =
        AllowList::parse(&["127.0.0.1".to_string()]).expect("an address is an allow-list entry");
    c.callbacks.error_delay_secs = 1;
    c.jobs.restage_interval_secs = 120;
    c.jobs.sweep_interval_secs = 5;
    // Both ways in: the WLCG Tape REST API beside ASVO's (loopback, no authentication).
    c.tape_rest.enabled = true;
    c.tape_rest.sitename = "STAGED-DEMO".into();
    c
}

/// Prints progress until the sample jobs are done, then keeps serving until a signal.
async fn watch(
    out: &Out,
    http: &reqwest::Client,
    base: &str,
    mut receiver: CallbackReceiver,
    expected: usize,
    mut stage_request: Option<String>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut received = 0;
    let mut last_board = String::new();
    let mut last_plain = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let shutdown = app::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            Some(cb) = receiver.rx.recv() => {
                received += 1;
                out.clear_board();
                out.line(&format!(
                    "[{:5.1}s] callback for job {}: return_code {} ({}/{} ready, {} errors): {}",
                    started.elapsed().as_secs_f64(),
                    cb["job_id"], cb["return_code"], cb["ready_files"], cb["total_files"],
                    cb["error_files"], cb["comment"].as_str().unwrap_or("")
                ));
                last_board.clear();
                if received == expected {
                    out.line("");
                    out.line(&format!("all {expected} sample jobs have called back. The daemon keeps serving {base} (try {base}/docs); Ctrl-C to stop."));
                }
            }
            _ = tick.tick() => {
                if let Some(url) = stage_request.clone()
                    && let Some(summary) = stage_request_done(http, &url).await
                {
                    out.clear_board();
                    out.line(&format!("[{:5.1}s] Tape REST stage request complete: {summary}", started.elapsed().as_secs_f64()));
                    last_board.clear();
                    stage_request = None;
                }
                // Without a terminal to redraw on, a line every few seconds is enough.
                let due = out.tty || last_plain.elapsed() >= Duration::from_secs(3);
                if received < expected && due {
                    let board = progress_board(http, base).await;
                    last_plain = Instant::now();
                    if board != last_board {
                        out.board(&board);
                        last_board = board;
                    }
                }
            }
        }
    }
}

/// The stage request's file states once it has completed (`completedAt`), else `None`.
async fn stage_request_done(http: &reqwest::Client, url: &str) -> Option<String> {
    let body: Value = http.get(url).send().await.ok()?.json().await.ok()?;
    body.get("completedAt")?;
    let files = body["files"].as_array()?;
    let states: Vec<String> = files
        .iter()
        .map(|f| {
            format!(
                "{} {}",
                f["path"].as_str().unwrap_or("?"),
                f["state"].as_str().unwrap_or("?")
            )
        })
        .collect();
    Some(states.join(", "))
}

async fn progress_board(http: &reqwest::Client, base: &str) -> String {
    let list: Value = match http.get(format!("{base}/get_joblist/")).send().await {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => return String::new(),
    };
    let Some(jobs) = list["jobs"].as_object() else {
        return String::new();
    };
    let mut lines = Vec::new();
    for row in jobs.values() {
        let (id, ready, total, errors) = (
            &row[0],
            row[2].as_i64().unwrap_or(0),
            row[3].as_i64().unwrap_or(0),
            row[6].as_i64().unwrap_or(0),
        );
        let width = 30usize;
        let done = if total > 0 {
            ((ready + errors) as usize * width) / total as usize
        } else {
            0
        };
        let bar: String = "#".repeat(done) + &".".repeat(width - done);
        let what = if total == 0 {
            "  (looking up the observation)".to_string()
        } else {
            String::new()
        };
        lines.push(format!(
            "  job {id:>4} [{bar}] {ready}/{total} ready, {errors} errors{what}"
        ));
    }
    lines.join("\n")
}

/// Where progress goes: redrawn in place on a terminal, plain lines otherwise.
struct Out {
    tty: bool,
    board_lines: std::sync::Mutex<usize>,
}

impl Out {
    fn new() -> Out {
        Out {
            tty: std::io::stdout().is_terminal(),
            board_lines: std::sync::Mutex::new(0),
        }
    }

    fn line(&self, s: &str) {
        self.clear_board();
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "{s}");
        let _ = o.flush();
    }

    fn board(&self, s: &str) {
        if s.is_empty() {
            return;
        }
        self.clear_board();
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "{s}");
        let _ = o.flush();
        if self.tty {
            *self.board_lines.lock().unwrap() = s.lines().count();
        }
    }

    /// Erases the progress block drawn last (terminal only).
    fn clear_board(&self) {
        let mut n = self.board_lines.lock().unwrap();
        if *n > 0 {
            let mut o = std::io::stdout().lock();
            let _ = write!(o, "\x1b[{}A\x1b[J", *n);
            let _ = o.flush();
            *n = 0;
        }
    }
}

/// Stands in for ASVO: accepts callbacks (HTTP basic auth asvo/demo) and hands them over.
struct CallbackReceiver {
    addr: SocketAddr,
    rx: mpsc::UnboundedReceiver<Value>,
}

impl CallbackReceiver {
    async fn start() -> anyhow::Result<CallbackReceiver> {
        let (tx, rx) = mpsc::unbounded_channel();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = axum::Router::new().route(
            "/asvo/notify",
            post(move |axum::Json(body): axum::Json<Value>| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(body);
                    axum::http::StatusCode::OK
                }
            }),
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(CallbackReceiver { addr, rx })
    }

    fn url(&self) -> String {
        format!("http://{}/asvo/notify", self.addr)
    }
}
