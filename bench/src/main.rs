//! `staged-bench`: measures the intake path of a real `staged` daemon.
//!
//! For each chosen backend (SQLite and/or PostgreSQL) it prepares a fresh database, starts the
//! release `staged serve` binary as a child process on a free 127.0.0.1 port, sends 1,000
//! warm-up jobs (not counted), then drives `POST /staging/` with `--concurrency` tasks, each on
//! its own keep-alive HTTP/1.1 connection, until `--jobs` jobs have been sent. It reports the
//! accepted jobs per second, the per-request latency (p50/p99/max), the errors (every answer
//! must be 202) and the server's peak RSS, then checks durability: `GET /get_stats/` must count
//! every acknowledged job as incomplete. Finally it stops the daemon with SIGTERM, requires a
//! clean exit, and removes the temporary directory and the PostgreSQL database.
//!
//! Run it with (the daemon it measures is the `staged` binary next to this one, so build
//! both):
//!
//! ```text
//! cargo build --release --bins && ./target/release/staged-bench intake --backend both
//! ```
//!
//! PostgreSQL is reached through `STAGED_TEST_PG_URL` (an admin URL whose role may create
//! databases) or, when it is unset, a throwaway server of the bench's own (see
//! `staged_testkit::pg`). All traffic goes to 127.0.0.1.
//!
//! `staged-bench ingest --backend both` measures Kafka ingest instead: see [`ingest`];
//! `staged-bench tape-rest` the WLCG Tape REST API facade at WLCG's sizing: see
//! [`tape_rest`].

mod engine;
mod ingest;
mod scale;
mod tape_rest;

use std::fmt;
use std::fmt::Write as _;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use staged_testkit::TempDir;
use staged_testkit::pg::PgDatabase;
use tokio::net::TcpStream;

/// Warm-up jobs sent before measuring; their ids come from [`WARMUP_ID_BASE`] upwards.
const WARMUP_JOBS: u64 = 1_000;
/// First warm-up job id; measured jobs use ids 1..=N, which must stay below this.
const WARMUP_ID_BASE: u64 = 1_000_000_000_000;
/// The callback address in every job (the discard port; never called during the bench).
const NOTIFY_URL: &str = "http://127.0.0.1:9/cb";
/// Longest wait for the daemon to answer `/ping/` after it is started.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for the daemon to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a single request (connect included) may take before it counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest `GET /get_stats/` may take (it scans every job).
const STATS_TIMEOUT: Duration = Duration::from_secs(120);
/// Times one task may reconnect after a broken connection before it gives up.
const MAX_RECONNECTS: u32 = 10;
/// Error answers kept (per task, and printed in total) to show what went wrong.
const KEPT_ERRORS: usize = 5;

#[derive(Parser)]
#[command(
    name = "staged-bench",
    about = "Benchmarks a release `staged` binary over HTTP"
)]
struct Cli {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Throughput and latency of `POST /staging/`, with a durability check afterwards.
    Intake(IntakeArgs),
    /// Kafka recall messages applied to the store per second (in-process broker).
    Ingest(ingest::IngestArgs),
    /// Last file event to callback latency, and a 100,000-file job from POST to callback.
    Engine(engine::EngineArgs),
    /// Intake, ingest, callback latency, RSS and sweeps against 10^4..10^7 waiting files.
    Scale(scale::ScaleArgs),
    /// The WLCG Tape REST API: stage requests for a million files, polls while Kafka
    /// completes them, archiveinfo; RSS with the million waiting.
    TapeRest(tape_rest::TapeRestArgs),
}

#[derive(clap::Args, Clone)]
struct IntakeArgs {
    /// Database backend(s) to measure.
    #[arg(long, value_enum, default_value_t = BackendChoice::Sqlite)]
    backend: BackendChoice,
    /// Jobs sent in the measured run (the 1,000 warm-up jobs come on top).
    #[arg(long, default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..WARMUP_ID_BASE))]
    jobs: u64,
    /// Concurrent clients, each on its own keep-alive connection.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    concurrency: u32,
    /// Files named in each job.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    files_per_job: u32,
    /// The `staged` binary; default: `staged` next to this program.
    #[arg(long)]
    staged: Option<PathBuf>,
    /// `database.intake_writers` for the daemon (default: the daemon's own).
    #[arg(long)]
    intake_writers: Option<usize>,
    /// `database.intake_batch_max` for the daemon (default: the daemon's own).
    #[arg(long)]
    intake_batch_max: Option<usize>,
}

impl IntakeArgs {
    /// The `[database]` keys these arguments set, as TOML lines.
    fn database_toml(&self) -> String {
        let mut text = String::new();
        if let Some(n) = self.intake_writers {
            let _ = writeln!(text, "intake_writers = {n}");
        }
        if let Some(n) = self.intake_batch_max {
            let _ = writeln!(text, "intake_batch_max = {n}");
        }
        text
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendChoice {
    Sqlite,
    Postgres,
    Both,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        })
    }
}

impl BackendChoice {
    fn backends(self) -> Vec<Backend> {
        match self {
            BackendChoice::Sqlite => vec![Backend::Sqlite],
            BackendChoice::Postgres => vec![Backend::Postgres],
            BackendChoice::Both => vec![Backend::Sqlite, Backend::Postgres],
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The intake load generator shares the machine with the daemon and the database, so its
    // own cost is taken from what is measured. On one thread its requests never wake another
    // thread: about 20 us of CPU per request instead of 30. The other benches run their
    // peers in this process and need the threads.
    let runtime = match &cli.command {
        BenchCommand::Intake(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Runtime::new(),
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let run = match cli.command {
        BenchCommand::Intake(args) => runtime.block_on(intake(args)),
        BenchCommand::Ingest(args) => runtime.block_on(ingest::run(args)),
        BenchCommand::Engine(args) => runtime.block_on(engine::run(args)),
        BenchCommand::Scale(args) => runtime.block_on(scale::run(args)),
        BenchCommand::TapeRest(args) => runtime.block_on(tape_rest::run(args)),
    };
    match run {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the intake benchmark for every chosen backend; fails if any of them failed.
async fn intake(args: IntakeArgs) -> anyhow::Result<()> {
    let staged = locate_staged(args.staged.as_deref())?;
    println!("staged binary: {}", staged.display());
    let mut failed = Vec::new();
    for backend in args.backend.backends() {
        println!("\n=== {backend}: starting ===");
        match bench_backend(backend, &staged, &args).await {
            Ok(()) => println!("=== {backend}: passed ==="),
            Err(e) => {
                eprintln!("=== {backend}: FAILED: {e:#} ===");
                failed.push(backend.to_string());
            }
        }
    }
    if !failed.is_empty() {
        bail!("benchmark failed for: {}", failed.join(", "));
    }
    Ok(())
}

/// Finds the `staged` binary: `--staged`, else the file next to this program.
fn locate_staged(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()
            .context("cannot find this program's own path")?
            .with_file_name("staged"),
    };
    if !path.is_file() {
        bail!(
            "the staged binary {} does not exist; run `cargo build --release --bins` first \
             (or pass --staged PATH)",
            path.display()
        );
    }
    Ok(path)
}

// ---------------------------------------------------------------------------------------------
// One backend, from fresh database to cleanup
// ---------------------------------------------------------------------------------------------

/// Prepares the database, runs the daemon and the load, and always cleans up.
async fn bench_backend(backend: Backend, staged: &Path, args: &IntakeArgs) -> anyhow::Result<()> {
    let dir = temp_dir()?;
    let db = RunDb::create(backend).await?;
    let url = db.url(dir.path(), "bench.db");
    let outcome = run_with_server(backend, staged, &dir, &url, args).await;
    let dropped = db.drop().await;
    match (outcome, dropped) {
        (Err(e), Err(drop)) => {
            eprintln!("also: {drop:#}");
            Err(e)
        }
        (outcome, dropped) => outcome.and(dropped),
    }
}

/// Starts the daemon, benchmarks it and stops it; on failure prints the daemon's log.
async fn run_with_server(
    backend: Backend,
    staged: &Path,
    dir: &TempDir,
    url: &str,
    args: &IntakeArgs,
) -> anyhow::Result<()> {
    let mut server = Server::start_full(staged, dir.path(), url, &args.database_toml(), "")?;
    let outcome = match server.wait_ready().await {
        Ok(()) => measure(backend, &mut server, args).await,
        Err(e) => Err(e),
    };
    let outcome = match outcome {
        Ok(()) => server.stop().await,
        Err(e) => {
            // Stop it anyway (killed on drop if SIGTERM does not work) and keep the first error.
            if let Err(stop) = server.stop().await {
                eprintln!("also: {stop:#}");
            }
            Err(e)
        }
    };
    if outcome.is_err() {
        server.print_log_tail(60);
    }
    outcome
}

/// Warm-up, measured run, result block and durability check against a ready daemon.
async fn measure(backend: Backend, server: &mut Server, args: &IntakeArgs) -> anyhow::Result<()> {
    let addr = server.addr;
    let load = |first: u64, count: u64| LoadSpec {
        addr,
        first_id: first,
        count,
        concurrency: args.concurrency,
        files_per_job: args.files_per_job,
    };
    println!("warm-up: {WARMUP_JOBS} jobs");
    let warm = run_load(load(WARMUP_ID_BASE, WARMUP_JOBS)).await?;
    if warm.errors > 0 {
        print_errors(&warm);
        bail!("{} of the warm-up requests failed", warm.errors);
    }
    println!(
        "measuring: {} jobs, concurrency {}, {} file(s)/job",
        args.jobs, args.concurrency, args.files_per_job
    );
    let cpu_before = CpuSample::take(server.child.id());
    let run = run_load(load(1, args.jobs)).await?;
    let cpu = cpu_before.and_then(|b| CpuSample::take(server.child.id()).map(|a| a.since(&b)));
    let peak_rss = server.peak_rss_kib();
    print_result(backend, args, &run, peak_rss);
    print_cpu(cpu, run.accepted);
    print_errors(&run);
    let expected = args.jobs + WARMUP_JOBS;
    let stored = incomplete_jobs(addr).await?;
    println!("durability: get_stats incomplete_jobs = {stored} (expected {expected})");
    if stored != expected {
        bail!("get_stats reports {stored} incomplete jobs, expected {expected}");
    }
    if run.errors > 0 {
        bail!("{} requests were not answered 202", run.errors);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Temporary directory and PostgreSQL database
// ---------------------------------------------------------------------------------------------

/// A directory for one run's files (SQLite database, config, daemon log, reports).
fn temp_dir() -> anyhow::Result<TempDir> {
    Ok(TempDir::new("staged-bench")?)
}

/// A fresh PostgreSQL database for one run.
/// A run's database: a fresh PostgreSQL database, or none (SQLite files go in the run's
/// directory).
struct RunDb(Option<PgDatabase>);

impl RunDb {
    async fn create(backend: Backend) -> anyhow::Result<RunDb> {
        Ok(RunDb(match backend {
            Backend::Postgres => Some(create_pg().await?),
            Backend::Sqlite => None,
        }))
    }

    /// The store's URL: the PostgreSQL database, or the SQLite file `name` in `dir`.
    fn url(&self, dir: &Path, name: &str) -> String {
        match &self.0 {
            Some(pg) => pg.url.clone(),
            None => format!("sqlite://{}", dir.join(name).display()),
        }
    }

    /// Drops the PostgreSQL database, if there is one.
    async fn drop(self) -> anyhow::Result<()> {
        match self.0 {
            Some(pg) => drop_pg(pg).await,
            None => Ok(()),
        }
    }
}

async fn create_pg() -> anyhow::Result<PgDatabase> {
    let db = PgDatabase::create("staged_bench").await?;
    println!("postgres: created database {}", db.name());
    Ok(db)
}

/// Drops a run's PostgreSQL database.
async fn drop_pg(db: PgDatabase) -> anyhow::Result<()> {
    let name = db.name().to_string();
    db.drop_database().await?;
    println!("postgres: dropped database {name}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The daemon as a child process
// ---------------------------------------------------------------------------------------------

/// A running `staged serve`; killed on drop if it is still running.
struct Server {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    exited: bool,
}

impl Server {
    /// Writes the config into `dir` (with `extra`, more TOML such as peers and timers,
    /// appended) and starts the daemon with its output in `dir/staged.log`.
    fn start_with(staged: &Path, dir: &Path, db_url: &str, extra: &str) -> anyhow::Result<Server> {
        Self::start_full(staged, dir, db_url, "", extra)
    }

    /// [`Server::start_with`] with more keys (TOML lines) in its `[database]` table.
    fn start_full(
        staged: &Path,
        dir: &Path,
        db_url: &str,
        database: &str,
        extra: &str,
    ) -> anyhow::Result<Server> {
        let addr = free_port()?;
        let config = dir.join("staged.toml");
        let text = config_text(addr, db_url, database, &dir.join("reports")) + "\n" + extra;
        std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        let log = dir.join("staged.log");
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new(staged)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env_remove("RUST_LOG")
            .env_remove("STAGED_CONFIG")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", staged.display()))?;
        println!("server: pid {} on {addr}", child.id());
        Ok(Server {
            child,
            addr,
            log,
            exited: false,
        })
    }

    /// Polls `GET /ping/` until it answers 200, the daemon exits, or the timeout passes.
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                self.exited = true;
                bail!("staged exited during startup with {status}");
            }
            if let Ok((StatusCode::OK, _)) = http_get(self.addr, "/ping/", REQUEST_TIMEOUT).await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "staged did not answer GET /ping/ within {} s",
            STARTUP_TIMEOUT.as_secs()
        )
    }

    /// The daemon's peak resident set size (`VmHWM`), in KiB.
    fn peak_rss_kib(&self) -> Option<u64> {
        self.status_kib("VmHWM:")
    }

    /// The daemon's resident set size now (`VmRSS`), in KiB.
    fn current_rss_kib(&self) -> Option<u64> {
        self.status_kib("VmRSS:")
    }

    /// A KiB figure of `/proc/PID/status`, by its key.
    fn status_kib(&self, key: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// Fails if the daemon has exited (a crash, since only [`Server::stop`] stops it).
    fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            self.exited = true;
            bail!("staged exited unexpectedly with {status}");
        }
        Ok(())
    }

    /// Sends SIGTERM and waits for a clean exit.
    async fn stop(&mut self) -> anyhow::Result<()> {
        if self.exited {
            return Ok(());
        }
        if let Some(status) = self.child.try_wait()? {
            self.exited = true;
            bail!("staged had already exited with {status}");
        }
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: kill(2) with the id of our own, not yet reaped, child.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            bail!("SIGTERM: {}", std::io::Error::last_os_error());
        }
        let started = Instant::now();
        while started.elapsed() < STOP_TIMEOUT {
            if let Some(status) = self.child.try_wait()? {
                self.exited = true;
                println!(
                    "server: stopped in {:.2} s ({status})",
                    started.elapsed().as_secs_f64()
                );
                if !status.success() {
                    bail!("staged exited with {status} after SIGTERM");
                }
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "staged did not exit within {} s of SIGTERM",
            STOP_TIMEOUT.as_secs()
        )
    }

    /// Prints the last `lines` lines of the daemon's output to stderr.
    fn print_log_tail(&self, lines: usize) {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let start = all.len().saturating_sub(lines);
        eprintln!(
            "--- last {} line(s) of {} ---",
            all.len() - start,
            self.log.display()
        );
        for line in &all[start..] {
            eprintln!("{line}");
        }
        eprintln!("--- end of log ---");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.exited && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A 127.0.0.1 port that was free a moment ago.
fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?)
}

/// The daemon's configuration file.
fn config_text(addr: SocketAddr, db_url: &str, database: &str, reports: &Path) -> String {
    let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
    let mut text = String::new();
    let _ = writeln!(text, "[server]\nlisten = {}\n", quote(&addr.to_string()));
    let _ = writeln!(text, "[database]\nurl = {}\n{database}", quote(db_url));
    let _ = writeln!(text, "[logging]\nlevel = \"warn\"\n");
    let _ = writeln!(
        text,
        "[reports]\ndir = {}",
        quote(&reports.display().to_string())
    );
    text
}

// ---------------------------------------------------------------------------------------------
// Load generation
// ---------------------------------------------------------------------------------------------

/// One batch of jobs to send.
#[derive(Clone, Copy)]
struct LoadSpec {
    addr: SocketAddr,
    first_id: u64,
    count: u64,
    concurrency: u32,
    files_per_job: u32,
}

/// What one batch gave.
#[derive(Default)]
struct LoadResult {
    wall: Duration,
    accepted: u64,
    errors: u64,
    /// Latency of every answered request, in microseconds, sorted.
    latencies_us: Vec<u32>,
    /// The first few error descriptions.
    error_samples: Vec<String>,
}

/// What one client task saw.
#[derive(Default)]
struct TaskResult {
    accepted: u64,
    errors: u64,
    latencies_us: Vec<u32>,
    error_samples: Vec<String>,
}

impl TaskResult {
    fn error(&mut self, what: String) {
        self.errors += 1;
        if self.error_samples.len() < KEPT_ERRORS {
            self.error_samples.push(what);
        }
    }
}

/// Sends `spec.count` jobs from `spec.concurrency` tasks sharing one id counter.
async fn run_load(spec: LoadSpec) -> anyhow::Result<LoadResult> {
    let next = Arc::new(AtomicU64::new(spec.first_id));
    let end = spec.first_id + spec.count;
    let started = Instant::now();
    let tasks: Vec<_> = (0..spec.concurrency)
        .map(|_| tokio::spawn(client_task(spec, end, Arc::clone(&next))))
        .collect();
    let mut result = LoadResult::default();
    for task in tasks {
        let t = task.await.context("a client task panicked")?;
        result.accepted += t.accepted;
        result.errors += t.errors;
        result.latencies_us.extend(t.latencies_us);
        for e in t.error_samples {
            if result.error_samples.len() < KEPT_ERRORS {
                result.error_samples.push(e);
            }
        }
    }
    result.wall = started.elapsed();
    result.latencies_us.sort_unstable();
    Ok(result)
}

/// One client: a keep-alive connection, reopened (a bounded number of times) if it breaks.
async fn client_task(spec: LoadSpec, end: u64, next: Arc<AtomicU64>) -> TaskResult {
    let mut out = TaskResult {
        latencies_us: Vec::with_capacity((spec.count / u64::from(spec.concurrency)) as usize + 16),
        ..TaskResult::default()
    };
    let mut conn: Option<SendRequest<Full<Bytes>>> = None;
    let mut reconnects = 0u32;
    loop {
        let id = next.fetch_add(1, Ordering::Relaxed);
        if id >= end {
            break;
        }
        let sender = match conn.as_mut() {
            Some(s) => s,
            None => match connect(spec.addr).await {
                Ok(s) => conn.insert(s),
                Err(e) => {
                    out.error(format!("job {id}: cannot connect: {e:#}"));
                    reconnects += 1;
                    if reconnects > MAX_RECONNECTS {
                        out.error(format!("giving up after {MAX_RECONNECTS} reconnects"));
                        break;
                    }
                    continue;
                }
            },
        };
        let body = job_body(id, spec.files_per_job);
        let started = Instant::now();
        match tokio::time::timeout(REQUEST_TIMEOUT, post_json(sender, "/staging/", body)).await {
            Ok(Ok((StatusCode::ACCEPTED, _))) => {
                out.accepted += 1;
                out.latencies_us.push(micros(started.elapsed()));
            }
            Ok(Ok((status, body))) => {
                out.latencies_us.push(micros(started.elapsed()));
                let text = String::from_utf8_lossy(&body);
                out.error(format!("job {id}: {status}: {}", truncate(&text, 300)));
            }
            Ok(Err(e)) => {
                out.error(format!("job {id}: {e:#}"));
                conn = None;
                reconnects += 1;
            }
            Err(_) => {
                out.error(format!("job {id}: no answer within {REQUEST_TIMEOUT:?}"));
                conn = None;
                reconnects += 1;
            }
        }
        if reconnects > MAX_RECONNECTS {
            out.error(format!("giving up after {MAX_RECONNECTS} reconnects"));
            break;
        }
    }
    out
}

/// The JSON body of job `id`.
fn job_body(id: u64, files: u32) -> Bytes {
    let files: Vec<String> = (0..files).map(|i| format!("mwa/bench/{id}/f{i}")).collect();
    let body = serde_json::json!({ "job_id": id, "files": files, "notify_url": NOTIFY_URL });
    Bytes::from(body.to_string())
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 client
// ---------------------------------------------------------------------------------------------

/// Opens a keep-alive HTTP/1.1 connection; the connection is driven by a spawned task.
async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        // An error here also shows up as a failed request on `sender`.
        let _ = connection.await;
    });
    Ok(sender)
}

/// Sends one request on `sender` and reads the whole answer.
async fn send(
    sender: &mut SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> anyhow::Result<(StatusCode, Bytes)> {
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

async fn post_json(
    sender: &mut SendRequest<Full<Bytes>>,
    path: &str,
    body: Bytes,
) -> anyhow::Result<(StatusCode, Bytes)> {
    let req = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::HOST, "127.0.0.1")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))?;
    send(sender, req).await
}

/// A GET on an open connection.
async fn get_on(
    sender: &mut SendRequest<Full<Bytes>>,
    path: &str,
) -> anyhow::Result<(StatusCode, Bytes)> {
    let req = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header(header::HOST, "127.0.0.1")
        .body(Full::new(Bytes::new()))?;
    send(sender, req).await
}

/// A GET on a fresh connection, bounded by `timeout`.
async fn http_get(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<(StatusCode, Bytes)> {
    let get = async {
        let mut sender = connect(addr).await?;
        get_on(&mut sender, path).await
    };
    match tokio::time::timeout(timeout, get).await {
        Ok(r) => r,
        Err(_) => bail!("GET {path}: no answer within {timeout:?}"),
    }
}

/// `incomplete_jobs` from `GET /get_stats/`.
async fn incomplete_jobs(addr: SocketAddr) -> anyhow::Result<u64> {
    let (status, body) = http_get(addr, "/get_stats/", STATS_TIMEOUT).await?;
    if status != StatusCode::OK {
        bail!(
            "GET /get_stats/ answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let stats: serde_json::Value =
        serde_json::from_slice(&body).context("GET /get_stats/ did not answer JSON")?;
    stats["incomplete_jobs"]
        .as_u64()
        .context("GET /get_stats/ has no numeric incomplete_jobs")
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn print_result(backend: Backend, args: &IntakeArgs, run: &LoadResult, peak_rss_kib: Option<u64>) {
    let secs = run.wall.as_secs_f64();
    let rate = if secs > 0.0 {
        run.accepted as f64 / secs
    } else {
        0.0
    };
    let ms = |q: f64| percentile_us(&run.latencies_us, q) as f64 / 1000.0;
    let rss = match peak_rss_kib {
        Some(kib) => format!("{:.1} MiB", kib as f64 / 1024.0),
        None => "unknown".into(),
    };
    println!("------------------------------------------------------------");
    println!("backend          {backend}");
    println!("jobs             {}", args.jobs);
    println!("concurrency      {}", args.concurrency);
    println!("files/job        {}", args.files_per_job);
    println!("wall time        {secs:.2} s");
    println!("accepted         {} ({rate:.0} jobs/s)", run.accepted);
    println!(
        "latency ms       p50 {:.2}  p99 {:.2}  max {:.2}",
        ms(0.50),
        ms(0.99),
        ms(1.0)
    );
    println!("errors           {}", run.errors);
    println!("server peak RSS  {rss}");
    println!("------------------------------------------------------------");
}

/// CPU time, from `/proc`, in clock ticks: the daemon's, this load generator's, and the
/// whole machine's.
#[derive(Debug, Clone, Copy)]
struct CpuSample {
    daemon: u64,
    client: u64,
    busy: u64,
    total: u64,
}

/// User plus system time of a process, in clock ticks.
fn process_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at the state, field 3;
    // utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

impl CpuSample {
    fn take(pid: u32) -> Option<CpuSample> {
        let daemon = process_ticks(&pid.to_string())?;
        let client = process_ticks("self")?;
        let machine = std::fs::read_to_string("/proc/stat").ok()?;
        let cpu: Vec<u64> = machine
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal ...
        let total: u64 = cpu.iter().take(8).sum();
        let idle = cpu.get(3)? + cpu.get(4)?;
        Some(CpuSample {
            daemon,
            client,
            busy: total - idle,
            total,
        })
    }

    fn since(&self, before: &CpuSample) -> CpuSample {
        CpuSample {
            daemon: self.daemon - before.daemon,
            client: self.client - before.client,
            busy: self.busy - before.busy,
            total: self.total - before.total,
        }
    }
}

/// Where the CPU went during the measured run: steadier than jobs/s on a shared machine.
fn print_cpu(cpu: Option<CpuSample>, jobs: u64) {
    let Some(cpu) = cpu else {
        println!("cpu              unknown (no /proc)");
        return;
    };
    // SAFETY: sysconf only reads a constant of the system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let per_job_us = |t: u64| t as f64 / ticks * 1e6 / jobs.max(1) as f64;
    // The rest of the machine's busy time is mostly the database (and, with PostgreSQL,
    // its background processes).
    let rest = cpu.busy.saturating_sub(cpu.daemon + cpu.client);
    println!(
        "cpu per job      daemon {:.0} us, load generator {:.0} us, rest of machine {:.0} us \
         (machine {:.0}% busy)",
        per_job_us(cpu.daemon),
        per_job_us(cpu.client),
        per_job_us(rest),
        100.0 * cpu.busy as f64 / cpu.total.max(1) as f64
    );
}

fn print_errors(run: &LoadResult) {
    if run.errors == 0 {
        return;
    }
    eprintln!("first {} error(s):", run.error_samples.len());
    for e in &run.error_samples {
        eprintln!("  {e}");
    }
}

/// The `q` quantile (0..=1) of sorted microsecond values, nearest-rank; 0 when empty.
fn percentile_us(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
