//! The durable state of the daemon: jobs, their files, the callback outbox and history.
//!
//! One `Store` fronts either SQLite (the embedded default) or PostgreSQL (production, and
//! several daemons sharing the work); the database URL picks. All SQL lives in this module
//! and its children. One query text serves both dialects (see `with_pool!` and
//! `in_tx!`); where they differ, a `Backend` method supplies the fragment: batches of
//! rows travel as one bound JSON array that `json_rows` and `json_values` read (with
//! `json_each` on SQLite, `jsonb_array_elements` on PostgreSQL), and
//! `Backend::skip_locked` is the row lock of a pick several daemons may race for. The
//! exceptions are the intake writer's insert (see `intake`: on PostgreSQL one statement
//! that `UNNEST`s bound arrays, on a connection the writer keeps) and PostgreSQL's planner
//! settings for the ingest transaction (see `ingest`).
//!
//! What only tests need (applying events with no staleness check, reading the history and
//! the outbox's size, claiming callbacks with no destination gate) is compiled with the
//! `test-support` feature, which the integration tests turn on: the daemon itself never
//! takes those paths, so they are not part of its surface.
//!
//! Invariants:
//! - A job is acknowledged only after the transaction that wrote it (and all its files)
//!   committed: see [`intake`], which groups concurrent submissions into one transaction.
//! - `job_id` is the primary key: a duplicate submission loses atomically, even under
//!   concurrent posts and several daemons.
//! - File events are applied by path to every job holding that path; `ready` is sticky.
//! - A job's state is one of [`JobState`]; the column holds its [`JobState::as_str`].
//! - No connection is reused after a failed statement or commit while it may still be
//!   inside a transaction: see [`hygiene`], the `after_release` hook of every pool.
//! - On SQLite, one connection outside the pool stays open from `open` to `close` (see
//!   `SqliteAnchor`), so that the pool's connections closing never makes SQLite rebuild
//!   its WAL index from the file while the daemon runs.

mod board;
mod engine;
mod hygiene;
mod ingest;
mod intake;
mod requests;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use thiserror::Error;

use crate::config::{DatabaseConfig, JobsConfig, PgSslMode, SqliteSync, redact_url};
pub use board::{FlightRow, OutboxHead, OutboxTotals};
pub use engine::HistoryRow;
pub use engine::{
    CallbackGate, OVERDUE_AFTER, OutboxRow, OutboxStats, StageClaim, StageClaims, StageWork,
    callback_origin, codes,
};
pub use ingest::IngestOutcome;
pub use intake::{Intake, IntakeMetrics};
pub use requests::{CancelOutcome, RequestFile, RequestView};

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");
/// The newest migration applied, as sqlx records it (both backends).
const MIGRATED_VERSION: &str = "SELECT max(version) FROM _sqlx_migrations WHERE success";

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("invalid database URL {url}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("the database has migrations up to {applied} applied; this build needs {wanted}")]
    NotMigrated { applied: i64, wanted: i64 },
    #[error("the store is shutting down")]
    Closed,
    /// A write reported success but its connection was still inside a transaction after
    /// it, so nothing proves it committed; the connection is closed, which rolls it back.
    #[error(
        "the database connection was still inside a transaction after a commit; the write was rolled back"
    )]
    Unsettled,
    /// A commit reported an error and yet took effect: stored, but not proven durable.
    #[error(
        "the database reported a failed commit that nonetheless took effect; the job's outcome is unknown"
    )]
    CommitUnknown,
}

/// Where a job is in its life: the `jobs.state` column (the engine's module doc draws the
/// moves between them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    /// An observation, still to be turned into files by the telescope adapter.
    Resolving,
    /// Files still to be requested from the tape system (or to be asked again after a
    /// failed request).
    Staging,
    /// Requested; waiting for the tape system's events, and asked again now and then.
    Waiting,
    /// Decided: its callback is in the outbox, and nothing changes it any more.
    Done,
}

impl JobState {
    pub const ALL: [JobState; 4] = [
        JobState::Resolving,
        JobState::Staging,
        JobState::Waiting,
        JobState::Done,
    ];

    /// The state as the `jobs.state` column holds it.
    pub const fn as_str(self) -> &'static str {
        match self {
            JobState::Resolving => "resolving",
            JobState::Staging => "staging",
            JobState::Waiting => "waiting",
            JobState::Done => "done",
        }
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `jobs.state` value that is none of [`JobState`]'s (a newer daemon's, or a damaged row).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown job state {0:?} in the store")]
pub struct UnknownJobState(pub String);

impl FromStr for JobState {
    type Err = UnknownJobState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownJobState(s.to_string()))
    }
}

/// How rows read from the column become states (`#[sqlx(try_from = "String")]`).
impl TryFrom<String> for JobState {
    type Error = UnknownJobState;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// A job as accepted from a client, before it is written.
#[derive(Debug, Clone, Default)]
pub struct NewJob {
    pub job_id: i64,
    pub notify_url: String,
    /// Paths to stage, without duplicates. Empty when the job names an observation.
    pub files: Vec<String>,
    /// The request's observation, as JSON text, when it gave one and no files.
    pub obs: Option<String>,
    /// The name of the API token that submitted it (none with auth off).
    pub submitted_by: Option<String>,
    /// A Tape REST stage request's id: the job has no callback and is kept after it
    /// completes, for the client to poll (`notify_url` is empty).
    pub request_id: Option<String>,
    /// Files of a stage request that cannot be staged, with the reason: stored failed, so
    /// the request reports them per file instead of being refused.
    pub failed: Vec<(String, String)>,
}

impl NewJob {
    /// Every file the job holds, to stage or already failed.
    pub fn total_files(&self) -> usize {
        self.files.len() + self.failed.len()
    }
}

/// Counts for one job, as `GET /staging/` and `/get_joblist/` report them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSummary {
    pub job_id: i64,
    pub created_ms: i64,
    pub total_files: i64,
    pub ready_files: i64,
    /// Files that reported an error and are not ready.
    pub error_files: i64,
    pub last_ready_ms: Option<i64>,
    /// One of the job's paths (the original's `filename` column of the job list).
    pub sample_path: Option<String>,
}

impl JobSummary {
    /// Every file is either ready or failed (and there is at least one file).
    pub fn completed(&self) -> bool {
        self.total_files > 0 && self.ready_files + self.error_files >= self.total_files
    }
}

/// One file of a job.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct FileRow {
    pub path: String,
    pub ready: bool,
    pub error: bool,
    pub ready_ms: Option<i64>,
}

/// Totals across all jobs, for `/get_stats/`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub completed_jobs: i64,
    pub incomplete_jobs: i64,
    pub ready_files: i64,
    pub error_files: i64,
    pub waiting_files: i64,
}

/// What the tape system said about one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEvent {
    pub path: String,
    pub at_ms: i64,
    /// `None`: staged. `Some(message)`: the recall failed.
    pub error: Option<String>,
}

/// How the store behaves; taken from `[database]` and `[jobs]`.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub url: String,
    pub password: Option<String>,
    pub max_connections: u32,
    pub sqlite_synchronous: SqliteSync,
    pub intake_batch_max: usize,
    pub intake_writers: usize,
    /// SQLite's `max_page_count` for every connection; 0: SQLite's own limit.
    pub sqlite_max_pages: u64,
    /// How long an unfinished job lives (`jobs.expiry_secs`).
    pub expiry: Duration,
    /// How long a claim on a job or callback lasts (`jobs.lease_secs`); a daemon that dies
    /// holding one loses it after this.
    pub lease: Duration,
    /// PostgreSQL: how the server's certificate is checked (`database.sslmode`).
    pub pg_sslmode: PgSslMode,
    /// PostgreSQL: the CA file for that check (`database.ca_file`).
    pub pg_ca_file: Option<std::path::PathBuf>,
}

impl StoreOptions {
    /// The options `[database]` and `[jobs]` give.
    pub fn from_config(db: &DatabaseConfig, jobs: &JobsConfig) -> Self {
        Self {
            url: db.url.clone(),
            password: db.password.as_ref().map(|s| s.expose().to_string()),
            max_connections: db.max_connections,
            sqlite_synchronous: db.sqlite_synchronous,
            intake_batch_max: db.intake_batch_max,
            intake_writers: db.intake_writers,
            sqlite_max_pages: db.sqlite_max_pages,
            expiry: Duration::from_secs(jobs.expiry_secs),
            lease: Duration::from_secs(jobs.lease_secs),
            pg_sslmode: db.sslmode,
            pg_ca_file: db.ca_file.clone(),
        }
    }

    /// The same options with claims lasting `lease`, for a lease finer than the whole
    /// seconds `jobs.lease_secs` can give (tests of the lease itself).
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }
}

#[derive(Clone, Debug)]
pub(crate) enum Backend {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs the same code against whichever pool the store has.
macro_rules! with_pool {
    ($backend:expr, $pool:ident => $body:expr) => {
        match $backend {
            Backend::Sqlite($pool) => $body,
            Backend::Postgres($pool) => $body,
        }
    };
}
pub(crate) use with_pool;

/// Runs `$body` in a transaction `$tx` on whichever pool the store has, committing after;
/// an error (`?` in `$body`) drops the transaction, which rolls it back. Every transaction
/// on a pool is opened here, so the pool's release check ([`hygiene`]) sees each
/// connection after it. The intake writer's transactions on the connection it keeps are the
/// one exception, checked after their commit (see [`intake`]).
///
/// On SQLite the transaction takes the write lock when it begins (`BEGIN IMMEDIATE`): every
/// transaction here writes, and one begun deferred that reads first cannot take the lock
/// later once another connection has committed (SQLite answers "database is locked" at
/// once, whatever the busy timeout). 51 of 60 Tape REST cancels failed so beside one
/// writer; waiting for the lock at the start is what the busy timeout is for.
macro_rules! in_tx {
    ($backend:expr, $tx:ident => $body:expr) => {
        match $backend {
            Backend::Sqlite(p) => {
                let mut $tx = p.begin_with("BEGIN IMMEDIATE").await?;
                let out = $body;
                $tx.commit().await?;
                out
            }
            Backend::Postgres(p) => {
                let mut $tx = p.begin().await?;
                let out = $body;
                $tx.commit().await?;
                out
            }
        }
    };
}
pub(crate) use in_tx;

/// A subquery yielding one row per element of the JSON array of arrays bound at `param`,
/// with the given (name, SQL type) columns in order. Batches of rows travel this way on
/// both backends: one parameter, one round trip, whatever the batch size.
pub(crate) fn json_rows(backend: &Backend, param: &str, columns: &[(&str, &str)]) -> String {
    let cols: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, (name, ty))| match backend {
            Backend::Sqlite(_) => format!("json_extract(value, '$[{i}]') AS {name}"),
            Backend::Postgres(_) => format!("(value->>{i})::{ty} AS {name}"),
        })
        .collect();
    match backend {
        Backend::Sqlite(_) => format!("(SELECT {} FROM json_each({param}))", cols.join(", ")),
        Backend::Postgres(_) => format!(
            "(SELECT {} FROM jsonb_array_elements({param}::jsonb))",
            cols.join(", ")
        ),
    }
}

/// Like [`json_rows`] for a flat JSON array of scalars, as column `v` of SQL type `ty`.
pub(crate) fn json_values(backend: &Backend, param: &str, ty: &str) -> String {
    match backend {
        Backend::Sqlite(_) => format!("(SELECT value AS v FROM json_each({param}))"),
        Backend::Postgres(_) => {
            format!("(SELECT value::{ty} AS v FROM jsonb_array_elements_text({param}::jsonb))")
        }
    }
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    intake: Arc<intake::IntakeQueue>,
    signals: Arc<Signals>,
    /// This daemon's name in leases: jobs it accepts are born claimed by it.
    owner: Arc<str>,
    lease_ms: i64,
    /// Jobs this daemon accepted and has not yet started work on (see [`intake`]).
    handoff: Arc<intake::Handoff>,
    /// What the intake writers measure (shared with them).
    intake_metrics: IntakeMetrics,
    /// SQLite only: the connection that keeps the database open (see [`SqliteAnchor`]).
    anchor: Arc<std::sync::Mutex<Option<SqliteAnchor>>>,
}

/// A SQLite connection opened when the store opens and closed after its pool, doing
/// nothing in between.
///
/// SQLite keeps a WAL database's index (which frames of the log hold committed pages) in
/// shared memory for as long as any connection in the process has the database open. When
/// the last one closes it tries a checkpoint, and if that fails it leaves the log as it
/// is; the next connection opened then rebuilds the index from the log file, taking every
/// frame whose checksum chain is intact as committed. After a commit whose fsync failed
/// the log still holds that transaction's frames, intact as far as the page cache goes:
/// the rebuild makes the failed transaction committed, and later commits are written on
/// top of it. Its pages never reached the disk: a page whose writeback failed is clean,
/// only in memory, and once reclaimed reads back from the disk as zeros or an older
/// version. A later rebuild then stops at the first such frame and drops every transaction
/// after it, acknowledged ones included, and a checkpoint copies whatever it reads into
/// the database file.
///
/// The pool can drop to no connections at all under such a fault: [`hygiene`] closes each
/// connection a failed commit leaves inside a transaction, and every commit fails. In the
/// fault suite's I/O-error test the index was rebuilt over a hundred times in a 2-second
/// run, turning a third of the refused jobs into stored ones; about one run in a hundred
/// lost an acknowledged job when a rebuild found fewer frames than the one before (216
/// then 149, 359 then 166), or left a database image SQLite called malformed. With this
/// connection open the index lives as long as the store: a failed commit's frames lie past
/// the index's last frame and the next commit overwrites them, so only transactions whose
/// own fsync succeeded are ever committed.
struct SqliteAnchor(sqlx::SqliteConnection);

impl SqliteAnchor {
    /// Opens the anchor of a SQLite store (none for PostgreSQL). After the migrations, so
    /// that the database is in WAL mode and not empty: a connection holds the database open
    /// (a shared lock on the file, the log and its index mapped) only once it has read a
    /// WAL database, and keeps it until it closes. It holds no transaction, so it never
    /// keeps a checkpoint from completing.
    async fn open(backend: &Backend) -> Result<Option<SqliteAnchor>, StoreError> {
        let Backend::Sqlite(pool) = backend else {
            return Ok(None);
        };
        let mut conn = sqlx::ConnectOptions::connect(&*pool.connect_options()).await?;
        let _: i64 = sqlx::query_scalar("SELECT count(*) FROM sqlite_master")
            .fetch_one(&mut conn)
            .await?;
        Ok(Some(SqliteAnchor(conn)))
    }

    /// Closes the anchor, if there is one, once the whole log is checkpointed into the
    /// database file and the log emptied: the next daemon then starts from the file alone
    /// and never rebuilds the log's index from the log (see above). The checkpoint that
    /// SQLite makes by itself at the last close is not enough: when it fails nothing says
    /// so, and after an I/O fault its first fsync of the database file can fail for an
    /// earlier writeback error of the file (the kernel reports each error once to every
    /// descriptor open when it happened) although its own writes reached the disk. A
    /// repeated checkpoint copies the frames again and syncs them again.
    async fn close(anchor: Option<SqliteAnchor>) {
        let Some(SqliteAnchor(mut conn)) = anchor else {
            return;
        };
        // Another process reading the database (an operator's shell) holds the checkpoint
        // back; each attempt waits for it only briefly, so the stop stays short.
        if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(format!(
            "PRAGMA busy_timeout = {}",
            CLOSE_CHECKPOINT_PAUSE.as_millis()
        )))
        .execute(&mut conn)
        .await
        {
            tracing::warn!(error = %e, "setting the shutdown checkpoint's busy timeout failed");
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome = sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(TRUNCATE)")
                .fetch_one(&mut conn)
                .await;
            let why = match outcome {
                Ok((0, _, _)) => {
                    if attempt > 1 {
                        tracing::info!(attempt, "the shutdown checkpoint completed");
                    }
                    break;
                }
                Ok((_, log, done)) => format!("busy: {done} of {log} frames copied"),
                Err(e) => e.to_string(),
            };
            if attempt >= CLOSE_CHECKPOINT_ATTEMPTS {
                tracing::error!(
                    attempt,
                    error = %why,
                    "the shutdown checkpoint failed; the log stays beside the database and the next start reads it"
                );
                break;
            }
            tracing::warn!(attempt, error = %why, "the shutdown checkpoint failed; trying again");
            tokio::time::sleep(CLOSE_CHECKPOINT_PAUSE).await;
        }
        if let Err(e) = sqlx::Connection::close(conn).await {
            tracing::warn!(error = %e, "closing the SQLite anchor connection failed");
        }
    }
}

/// How often the store tries its shutdown checkpoint, how long each waits for readers and
/// the pause between them: about 2 s in all, within the shutdown's grace period.
const CLOSE_CHECKPOINT_ATTEMPTS: u32 = 5;
const CLOSE_CHECKPOINT_PAUSE: Duration = Duration::from_millis(200);

/// One connection pool's connections now, as sqlx counts them (no query).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// `shared` (everything but intake), or `intake` (PostgreSQL's intake writers; on
    /// SQLite they use the shared pool).
    pub pool: &'static str,
    pub in_use: u64,
    pub idle: u64,
    /// The most the pool opens.
    pub max: u64,
}

/// Wake-ups for the engine's loops within this process; other daemons sharing the
/// database find the same work by polling.
#[derive(Default)]
pub struct Signals {
    /// A callback was queued.
    pub outbox: tokio::sync::Notify,
    /// A job became due for resolving or staging.
    pub work: tokio::sync::Notify,
}

fn daemon_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "staged".into());
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

impl Store {
    /// Connects, applies pending migrations and starts the intake writers.
    pub async fn open(opts: &StoreOptions) -> Result<Store, StoreError> {
        let (backend, intake_backend) = connect(opts).await?;
        migrate(&backend).await?;
        let anchor = SqliteAnchor::open(&backend).await?;
        let signals = Arc::new(Signals::default());
        let owner: Arc<str> = daemon_name().into();
        let handoff = Arc::new(intake::Handoff::default());
        let intake_metrics = IntakeMetrics::default();
        let intake = intake::IntakeQueue::start(
            intake_backend,
            opts,
            owner.clone(),
            handoff.clone(),
            signals.clone(),
            intake_metrics.clone(),
        );
        Ok(Store {
            backend,
            intake: Arc::new(intake),
            signals,
            owner,
            lease_ms: opts.lease.as_millis() as i64,
            handoff,
            intake_metrics,
            anchor: Arc::new(std::sync::Mutex::new(anchor)),
        })
    }

    /// Batch sizes and commit times of the intake writers.
    pub fn intake_metrics(&self) -> &IntakeMetrics {
        &self.intake_metrics
    }

    /// The connections of each pool, from the pools' own counts: no query, no lock held
    /// past the call, so `/metrics` may read them on every scrape.
    pub fn pool_stats(&self) -> Vec<PoolStats> {
        let mut out = vec![self.backend.pool_stats("shared")];
        if let Backend::Postgres(_) = self.intake.backend() {
            out.push(self.intake.backend().pool_stats("intake"));
        }
        out
    }

    /// This daemon's name in leases: host, process and a random part, so that two daemons
    /// (or one restarted) never share one.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Connects and applies pending migrations, nothing else (`staged migrate`).
    pub async fn migrate_only(opts: &StoreOptions) -> Result<&'static str, StoreError> {
        // The intake pool is lazy (PostgreSQL) or the shared one (SQLite): nothing to close.
        let (backend, _) = connect(opts).await?;
        migrate(&backend).await?;
        let name = backend.name();
        with_pool!(&backend, p => p.close().await);
        Ok(name)
    }

    pub fn signals(&self) -> &Signals {
        &self.signals
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// Writes a new job durably. Returns once its transaction committed.
    pub async fn submit(&self, job: NewJob) -> Result<Intake, StoreError> {
        self.intake.submit(job).await
    }

    /// Stops intake (waiting for batches in flight) and closes the pool.
    pub async fn close(&self) {
        self.intake.close().await;
        // Jobs accepted but not yet worked on were born claimed by this daemon: give them
        // up so that a restarted daemon (or another one) takes them at once instead of
        // after the lease.
        if let Err(e) = self.release_unstarted().await {
            tracing::warn!(error = %e, "releasing unstarted jobs at shutdown failed; they wait for their lease to lapse");
        }
        with_pool!(&self.backend, p => p.close().await);
        // Last, so that its close is the database's last: SQLite checkpoints the log into
        // the database file then, as it always did at shutdown.
        let anchor = self.anchor.lock().expect("anchor lock poisoned").take();
        SqliteAnchor::close(anchor).await;
    }

    /// Whether the store answers and has every migration this build knows applied (a
    /// daemon pointed at a database another, older build migrated is not ready).
    pub async fn check_ready(&self) -> Result<(), StoreError> {
        let (migrator, applied): (&sqlx::migrate::Migrator, Option<i64>) = match &self.backend {
            Backend::Sqlite(p) => (
                &SQLITE_MIGRATIONS,
                sqlx::query_scalar(MIGRATED_VERSION).fetch_one(p).await?,
            ),
            Backend::Postgres(p) => (
                &POSTGRES_MIGRATIONS,
                sqlx::query_scalar(MIGRATED_VERSION).fetch_one(p).await?,
            ),
        };
        let wanted = migrator.iter().map(|m| m.version).max().unwrap_or(0);
        let applied = applied.unwrap_or(0);
        if applied < wanted {
            return Err(StoreError::NotMigrated { applied, wanted });
        }
        Ok(())
    }

    pub async fn job_exists(&self, job_id: i64) -> Result<bool, StoreError> {
        let n: i64 = with_pool!(&self.backend, p =>
            sqlx::query_scalar("SELECT count(*) FROM jobs WHERE job_id = $1")
                .bind(job_id)
                .fetch_one(p)
                .await?);
        Ok(n > 0)
    }

    /// Which token submitted a job: `None` if there is no such job, `Some(None)` if it was
    /// submitted with auth off.
    pub async fn job_owner(&self, job_id: i64) -> Result<Option<Option<String>>, StoreError> {
        let owner: Option<Option<String>> = with_pool!(&self.backend, p =>
            sqlx::query_scalar("SELECT submitted_by FROM jobs WHERE job_id = $1")
                .bind(job_id)
                .fetch_optional(p)
                .await?);
        Ok(owner)
    }

    /// The counts of one job, or `None` if there is no such job.
    pub async fn job_summary(&self, job_id: i64) -> Result<Option<JobSummary>, StoreError> {
        const SQL: &str = "SELECT j.job_id, j.created_ms, j.total_files, \
                 (SELECT count(*) FROM job_files f WHERE f.job_id = j.job_id AND f.ready), \
                 (SELECT count(*) FROM job_files f WHERE f.job_id = j.job_id AND f.error AND NOT f.ready), \
                 (SELECT max(f.ready_ms) FROM job_files f WHERE f.job_id = j.job_id), \
                 NULL \
             FROM jobs j WHERE j.job_id = $1";
        let row: Option<SummaryRow> = with_pool!(&self.backend, p =>
            sqlx::query_as(SQL).bind(job_id).fetch_optional(p).await?);
        Ok(row.map(SummaryRow::into_summary))
    }

    /// Every file of a job, ordered by path.
    pub async fn job_files(&self, job_id: i64) -> Result<Vec<FileRow>, StoreError> {
        const SQL: &str = "SELECT path, ready, error, ready_ms FROM job_files \
                           WHERE job_id = $1 ORDER BY path";
        Ok(with_pool!(&self.backend, p =>
            sqlx::query_as(SQL).bind(job_id).fetch_all(p).await?))
    }

    /// A summary of every job, ordered by job id.
    pub async fn job_list(&self) -> Result<Vec<JobSummary>, StoreError> {
        const SQL: &str = "SELECT j.job_id, j.created_ms, j.total_files, \
                 coalesce(a.ready, 0), coalesce(a.err, 0), a.last_ready, a.sample \
             FROM jobs j LEFT JOIN ( \
                 SELECT job_id, \
                        count(*) FILTER (WHERE ready) AS ready, \
                        count(*) FILTER (WHERE error AND NOT ready) AS err, \
                        max(ready_ms) AS last_ready, \
                        min(path) AS sample \
                 FROM job_files GROUP BY job_id) a ON a.job_id = j.job_id \
             ORDER BY j.job_id";
        let rows: Vec<SummaryRow> = with_pool!(&self.backend, p =>
            sqlx::query_as(SQL).fetch_all(p).await?);
        Ok(rows.into_iter().map(SummaryRow::into_summary).collect())
    }

    /// Job and file totals across the store, from each job's own counters (kept with its
    /// files by every writer, as the dashboard and completion already rely on): one pass
    /// over the jobs, where counting the files took 1.5 s at ten million.
    pub async fn stats(&self) -> Result<Stats, StoreError> {
        const SQL: &str = "SELECT \
                 count(*) FILTER (WHERE total_files > 0 AND settled_files >= total_files), \
                 count(*) FILTER (WHERE NOT (total_files > 0 AND settled_files >= total_files)), \
                 CAST(coalesce(sum(settled_files - failed_files), 0) AS BIGINT), \
                 CAST(coalesce(sum(failed_files), 0) AS BIGINT), \
                 CAST(coalesce(sum(total_files - settled_files), 0) AS BIGINT) \
             FROM jobs";
        let (completed_jobs, incomplete_jobs, ready_files, error_files, waiting_files): (
            i64,
            i64,
            i64,
            i64,
            i64,
        ) = with_pool!(&self.backend, p => sqlx::query_as(SQL).fetch_one(p).await?);
        Ok(Stats {
            completed_jobs,
            incomplete_jobs,
            ready_files,
            error_files,
            waiting_files,
        })
    }

    /// Removes a job and its files (and any pending callback). Returns whether it existed.
    pub async fn delete_job(&self, job_id: i64) -> Result<bool, StoreError> {
        let deleted = in_tx!(&self.backend, tx => {
            sqlx::query("DELETE FROM job_files WHERE job_id = $1")
                .bind(job_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM notify_outbox WHERE job_id = $1")
                .bind(job_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM jobs WHERE job_id = $1")
                .bind(job_id)
                .execute(&mut *tx)
                .await?
                .rows_affected()
        });
        Ok(deleted > 0)
    }
}

#[derive(sqlx::FromRow)]
struct SummaryRow(i64, i64, i64, i64, i64, Option<i64>, Option<String>);

impl SummaryRow {
    fn into_summary(self) -> JobSummary {
        let SummaryRow(job_id, created_ms, total_files, ready_files, error_files, last, sample) =
            self;
        JobSummary {
            job_id,
            created_ms,
            total_files,
            ready_files,
            error_files,
            last_ready_ms: last,
            sample_path: sample,
        }
    }
}

impl Backend {
    fn pool_stats(&self, pool: &'static str) -> PoolStats {
        let (size, idle, max) = with_pool!(self, p => (
            p.size(),
            p.num_idle(),
            p.options().get_max_connections(),
        ));
        // `size` counts idle connections too; read apart, the two may disagree by one.
        let idle = (idle as u64).min(u64::from(size));
        PoolStats {
            pool,
            in_use: u64::from(size) - idle,
            idle,
            max: u64::from(max),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// The row lock that ends a pick of rows several daemons may claim at once: on
    /// PostgreSQL each skips the rows another's claim holds, so two never take the same
    /// row; SQLite has one writer at a time, so nothing is needed.
    pub(crate) fn skip_locked(&self) -> &'static str {
        match self {
            Backend::Sqlite(_) => "",
            Backend::Postgres(_) => "FOR UPDATE SKIP LOCKED",
        }
    }
}

/// Opens the pools: the shared one, and the one the intake writers use (on SQLite the same).
async fn connect(opts: &StoreOptions) -> Result<(Backend, Backend), StoreError> {
    let bad_url = |reason: String| StoreError::BadUrl {
        url: redact_url(&opts.url),
        reason,
    };
    if opts.url.starts_with("sqlite:") {
        let mut connect = SqliteConnectOptions::from_str(&opts.url)
            .map_err(|e| bad_url(e.to_string()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match opts.sqlite_synchronous {
                SqliteSync::Full => SqliteSynchronous::Full,
                SqliteSync::Normal => SqliteSynchronous::Normal,
            })
            .busy_timeout(Duration::from_secs(10));
        if opts.sqlite_max_pages > 0 {
            // A per-connection setting: every connection the pool opens gets it.
            connect = connect.pragma("max_page_count", opts.sqlite_max_pages.to_string());
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(opts.max_connections.clamp(2, 8))
            .after_release(hygiene::sqlite_after_release)
            .connect_with(connect)
            .await?;
        Ok((Backend::Sqlite(pool.clone()), Backend::Sqlite(pool)))
    } else if opts.url.starts_with("postgres://") || opts.url.starts_with("postgresql://") {
        let mut connect =
            PgConnectOptions::from_str(&opts.url).map_err(|e| bad_url(e.to_string()))?;
        if let Some(pw) = &opts.password {
            connect = connect.password(pw);
        }
        connect = pg_tls(
            connect,
            &opts.url,
            opts.pg_sslmode,
            opts.pg_ca_file.as_deref(),
        )?;
        tracing::info!(
            host = connect.get_host(),
            sslmode = ?connect.get_ssl_mode(),
            "PostgreSQL connection"
        );
        // Tables here swing from empty to hundreds of thousands of rows within minutes. A
        // generic plan cached while a table was small keeps its sequential scans after it
        // grew (a 64-row update by key took 10 ms on 100,000 jobs); planning every execution
        // with its real parameters and the table's current size costs far less than that.
        let shared = connect
            .clone()
            .options([("plan_cache_mode", "force_custom_plan")]);
        let pool = PgPoolOptions::new()
            .max_connections(opts.max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .after_release(hygiene::pg_after_release)
            .connect_with(shared)
            .await?;
        // The intake writers run one statement, whose plan depends on no table's contents
        // (it inserts, probing only primary keys). Planning it afresh for every batch took a
        // fifth of a writer's PostgreSQL time, so their connections, one per writer and
        // apart from the shared pool, keep the generic plan instead.
        let intake = PgPoolOptions::new()
            .max_connections(u32::try_from(opts.intake_writers).unwrap_or(u32::MAX))
            .acquire_timeout(Duration::from_secs(10))
            .after_release(hygiene::pg_after_release)
            .connect_lazy_with(connect.options([("plan_cache_mode", "force_generic_plan")]));
        Ok((Backend::Postgres(pool), Backend::Postgres(intake)))
    } else {
        Err(bad_url("expected sqlite:// or postgres://".into()))
    }
}

/// Applies `database.sslmode` and `database.ca_file` to the connection options (see
/// [`PgSslMode`]): "auto" verifies the certificate of any server that is not on this
/// machine.
fn pg_tls(
    connect: PgConnectOptions,
    url: &str,
    mode: PgSslMode,
    ca_file: Option<&std::path::Path>,
) -> Result<PgConnectOptions, StoreError> {
    use sqlx::postgres::PgSslMode as Sqlx;
    let in_url = url::Url::parse(url)
        .map(|u| u.query_pairs().any(|(k, _)| k == "sslmode"))
        .unwrap_or(false);
    let chosen = match (mode, in_url) {
        (PgSslMode::Auto, true) => None,
        (_, true) => {
            return Err(StoreError::BadUrl {
                url: redact_url(url),
                reason: "it gives an sslmode and so does database.sslmode: give one".into(),
            });
        }
        (PgSslMode::Auto, false) if pg_host_is_local(&connect) => Some(Sqlx::Prefer),
        (PgSslMode::Auto, false) => Some(Sqlx::VerifyFull),
        (PgSslMode::Disable, _) => Some(Sqlx::Disable),
        (PgSslMode::Prefer, _) => Some(Sqlx::Prefer),
        (PgSslMode::Require, _) => Some(Sqlx::Require),
        (PgSslMode::VerifyCa, _) => Some(Sqlx::VerifyCa),
        (PgSslMode::VerifyFull, _) => Some(Sqlx::VerifyFull),
    };
    let mut connect = match chosen {
        Some(m) => connect.ssl_mode(m),
        None => connect,
    };
    if let Some(ca) = ca_file {
        connect = connect.ssl_root_cert(ca);
    }
    Ok(connect)
}

/// A Unix socket, `localhost` or a loopback address: a link no one else is on.
fn pg_host_is_local(connect: &PgConnectOptions) -> bool {
    if connect.get_socket().is_some() {
        return true;
    }
    let host = connect.get_host();
    host.starts_with('/')
        || host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

async fn migrate(backend: &Backend) -> Result<(), StoreError> {
    match backend {
        Backend::Sqlite(p) => SQLITE_MIGRATIONS.run(p).await?,
        Backend::Postgres(p) => POSTGRES_MIGRATIONS.run(p).await?,
    }
    Ok(())
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection;

    #[test]
    fn every_state_reads_back_from_its_column_value() {
        for state in JobState::ALL {
            assert_eq!(state.as_str().parse::<JobState>(), Ok(state));
            assert_eq!(JobState::try_from(state.to_string()), Ok(state));
        }
    }

    #[test]
    fn column_values_are_distinct() {
        let values: std::collections::HashSet<_> =
            JobState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(values.len(), JobState::ALL.len());
    }

    /// A SQLite store in `dir` holding one one-file job, `job_id`; and its database's URL.
    async fn sqlite_store_with_a_job(dir: &std::path::Path, job_id: i64) -> (Store, String) {
        let url = format!("sqlite://{}", dir.join("staged.db").display());
        let opts = StoreOptions::from_config(
            &DatabaseConfig {
                url: url.clone(),
                ..DatabaseConfig::default()
            },
            &JobsConfig::default(),
        );
        let store = Store::open(&opts).await.unwrap();
        let job = NewJob {
            job_id,
            notify_url: "http://127.0.0.1:9/cb".into(),
            files: vec!["a.fits".into()],
            ..Default::default()
        };
        assert_eq!(store.submit(job).await.unwrap(), Intake::Created);
        (store, url)
    }

    /// The failure this guards against needs writes that fail (the fault suite's
    /// `sqlite_io_error`); what makes it possible can be seen on any disk: when the last
    /// connection to a WAL database closes, SQLite checkpoints and deletes the log, and the
    /// next connection starts from the file. While the store is open, its pool giving back
    /// every connection must not be that last close.
    #[tokio::test]
    async fn the_pool_closing_every_connection_leaves_the_database_open() {
        let dir = tempfile::tempdir().unwrap();
        let (store, url) = sqlite_store_with_a_job(dir.path(), 1).await;
        let wal = dir.path().join("staged.db-wal");
        assert!(wal.exists(), "the job went to the log");

        store.intake.close().await;
        with_pool!(&store.backend, p => p.close().await);
        assert!(
            wal.exists(),
            "the pool's last connection closed the database (checkpointed and deleted the log)"
        );

        store.close().await;
        assert!(!wal.exists(), "the store's close is the database's last");
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(n, 1, "the job was checkpointed into the database file");
    }

    /// A reader in another process (an operator's shell inside a transaction) keeps the
    /// shutdown checkpoint from emptying the log: the stop waits for it only briefly, and
    /// what the log holds is still there for the next start.
    #[tokio::test]
    async fn a_reader_holding_the_log_delays_the_stop_only_briefly() {
        let dir = tempfile::tempdir().unwrap();
        let (store, url) = sqlite_store_with_a_job(dir.path(), 7).await;
        let mut reader = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::query("BEGIN").execute(&mut reader).await.unwrap();
        let _: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
            .fetch_one(&mut reader)
            .await
            .unwrap();

        let started = std::time::Instant::now();
        store.close().await;
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(5),
            "the stop waited {took:?} for a reader"
        );
        sqlx::query("COMMIT").execute(&mut reader).await.unwrap();
        reader.close().await.unwrap();
        let mut next = sqlx::SqliteConnection::connect(&url).await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE job_id = 7")
            .fetch_one(&mut next)
            .await
            .unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn an_unknown_column_value_is_an_error_naming_it() {
        let err = "Done".parse::<JobState>().unwrap_err();
        assert_eq!(err, UnknownJobState("Done".into()));
        assert!(err.to_string().contains("\"Done\""), "{err}");
    }
}
