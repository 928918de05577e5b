//! Group commit for new jobs.
//!
//! Each accepted `POST /staging/` must be durable before it is acknowledged, and one commit
//! (one fsync) per job caps intake at a few hundred jobs a second. So submissions go into a
//! queue; a writer takes everything waiting (up to a bound), writes the whole batch in one
//! transaction and answers every submitter after the commit. Under light load a batch is one
//! job and nothing waits; under heavy load batches grow and the fsync is shared.
//!
//! A new job is born claimed by the daemon that accepted it (`lease_owner`, with
//! `next_stage_ms` at the lease's end) and handed to that daemon's engine in memory, so the
//! engine starts on it without a claim query. Should the daemon die first, the lease lapses
//! and any daemon's ordinary claim picks the job up.
//!
//! Invariants:
//! - A submitter hears `Created` only after the transaction holding its job committed.
//! - A duplicate id (already stored, or earlier in the same batch) is `Duplicate`, decided
//!   by the primary key, so concurrent daemons agree. A job that a failed batch stored
//!   anyway (its commit erred yet took effect) is neither: its submitter hears an error.
//! - One bad job cannot fail its batch-mates: if a batch fails, its jobs are retried one
//!   transaction each, and only the job that still fails gets the error.
//! - A writer keeps its connection only after a batch that committed and left it outside
//!   any transaction; after any failure the connection goes back to the pool, whose
//!   release check closes it unless it is settled ([`super::hygiene`]).
//! - [`IntakeMetrics`] sees every transaction that committed (a batch, or one job of a
//!   failed batch retried alone), once: its jobs and the time it took.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use sqlx::pool::PoolConnection;
use sqlx::{Connection, PgConnection, Postgres, Sqlite, SqliteConnection};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{
    Backend, JobState, NewJob, Signals, StageWork, StoreError, StoreOptions, now_ms, with_pool,
};
use crate::histograms::{self, Histogram};

/// Files per batch beyond which a writer stops taking more jobs into the batch.
const BATCH_FILES_SOFT_MAX: usize = 200_000;
/// Job files per SQLite insert statement. A statement's rows travel as one JSON text that
/// SQLite parses whole; a 500,000-file job in one statement held the text and SQLite's parse
/// of it at once (tens of MB). All of a batch's statements are one transaction.
const SQLITE_FILES_PER_STATEMENT: usize = 20_000;
/// Queue length; submitters wait (backpressure) when it is full.
const QUEUE_DEPTH: usize = 16_384;

/// The outcome of a submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intake {
    Created,
    Duplicate,
}

/// What the intake writers measure, for `/metrics`. Cheap to clone; clones share figures.
#[derive(Clone)]
pub struct IntakeMetrics {
    /// Jobs per committed transaction: how much of the fsync the group commit shares.
    pub batch_jobs: Histogram,
    /// Seconds from taking a connection for a transaction to its commit returning.
    pub commit_seconds: Histogram,
}

impl Default for IntakeMetrics {
    fn default() -> Self {
        Self {
            batch_jobs: histograms::batch_sizes(),
            commit_seconds: histograms::request_seconds(),
        }
    }
}

/// Jobs this daemon accepted, born claimed by it, waiting for its engine.
#[derive(Default)]
pub(crate) struct Handoff {
    /// Each job with the end of its birth lease.
    queue: std::sync::Mutex<VecDeque<(StageWork, i64)>>,
}

impl Handoff {
    fn push(&self, work: impl IntoIterator<Item = (StageWork, i64)>) {
        self.queue
            .lock()
            .expect("handoff lock poisoned")
            .extend(work);
    }

    /// Takes up to `limit` jobs whose birth lease still holds at `now`. Jobs whose lease
    /// lapsed while they waited are dropped here: the store's claim finds them, and this
    /// daemon must not work on a job another may have claimed meanwhile.
    pub(crate) fn take(&self, limit: usize, now: i64) -> Vec<StageWork> {
        let mut queue = self.queue.lock().expect("handoff lock poisoned");
        let mut taken = Vec::new();
        while taken.len() < limit {
            match queue.pop_front() {
                Some((work, until)) if until > now => taken.push(work),
                Some(_) => {}
                None => break,
            }
        }
        taken
    }

    /// Forgets every waiting job (their leases are being released).
    pub(crate) fn clear(&self) {
        self.queue.lock().expect("handoff lock poisoned").clear();
    }
}

struct Request {
    job: NewJob,
    reply: oneshot::Sender<Result<Intake, StoreError>>,
}

pub(crate) struct IntakeQueue {
    /// The writers' pool: PostgreSQL's is theirs alone; SQLite's is the shared one.
    backend: Backend,
    tx: std::sync::Mutex<Option<mpsc::Sender<Request>>>,
    writers: Mutex<Vec<JoinHandle<()>>>,
}

impl IntakeQueue {
    pub(crate) fn start(
        backend: Backend,
        opts: &StoreOptions,
        owner: Arc<str>,
        handoff: Arc<Handoff>,
        signals: Arc<Signals>,
        metrics: IntakeMetrics,
    ) -> IntakeQueue {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let rx = Arc::new(Mutex::new(rx));
        // SQLite has one writer at a time anyway; PostgreSQL overlaps several batches.
        let writers = match backend {
            Backend::Sqlite(_) => 1,
            Backend::Postgres(_) => opts.intake_writers,
        };
        // A writer keeps one connection for all its batches when it can: taking one from the
        // pool and giving it back for every batch cost about as much of the daemon's CPU as
        // the batch's own statement. PostgreSQL writers have a pool of their own, one
        // connection each; SQLite's writer shares the pool, so only if it can spare one.
        let keep_connection = match backend {
            Backend::Sqlite(_) => opts.max_connections as usize >= writers + RESERVED_CONNECTIONS,
            Backend::Postgres(_) => true,
        };
        let handles = (0..writers)
            .map(|_| {
                let writer = Writer {
                    backend: backend.clone(),
                    keep_connection,
                    pg: None,
                    sqlite: None,
                    rx: rx.clone(),
                    batch_max: opts.intake_batch_max,
                    expiry_ms: opts.expiry.as_millis() as i64,
                    lease_ms: opts.lease.as_millis() as i64,
                    owner: owner.clone(),
                    handoff: handoff.clone(),
                    signals: signals.clone(),
                    metrics: metrics.clone(),
                };
                tokio::spawn(writer.run())
            })
            .collect();
        IntakeQueue {
            backend,
            tx: std::sync::Mutex::new(Some(tx)),
            writers: Mutex::new(handles),
        }
    }

    /// The writers' pool (on SQLite the store's shared one).
    pub(crate) fn backend(&self) -> &Backend {
        &self.backend
    }

    pub(crate) async fn submit(&self, job: NewJob) -> Result<Intake, StoreError> {
        let sender = self
            .tx
            .lock()
            .expect("intake sender lock poisoned")
            .clone()
            .ok_or(StoreError::Closed)?;
        let (reply, answer) = oneshot::channel();
        sender
            .send(Request { job, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Refuses new submissions and waits until every queued one has been answered.
    pub(crate) async fn close(&self) {
        self.tx.lock().expect("intake sender lock poisoned").take();
        let handles = std::mem::take(&mut *self.writers.lock().await);
        for h in handles {
            let _ = h.await;
        }
        if let Backend::Postgres(pool) = &self.backend {
            pool.close().await;
        }
    }
}

/// SQLite pool connections left to everything but the intake writer before it may keep a
/// connection of its own: the engine, the ingest, the notifier and the API's reads.
const RESERVED_CONNECTIONS: usize = 4;

struct Writer {
    backend: Backend,
    keep_connection: bool,
    /// The connection this writer keeps, once it has one.
    pg: Option<PoolConnection<Postgres>>,
    sqlite: Option<PoolConnection<Sqlite>>,
    rx: Arc<Mutex<mpsc::Receiver<Request>>>,
    batch_max: usize,
    expiry_ms: i64,
    lease_ms: i64,
    owner: Arc<str>,
    handoff: Arc<Handoff>,
    signals: Arc<Signals>,
    metrics: IntakeMetrics,
}

/// When a job was written: its times and its birth lease.
struct Stamp<'a> {
    now: i64,
    expires: i64,
    owner: &'a str,
    lease_until: i64,
}

/// Runs `$write` (an expression that uses the connection `$conn` and yields a future of a
/// `Result`) on the connection a writer keeps in `$kept`, taking one from `$pool` if it has
/// none, and keeps it afterwards if `$keep`. A kept connection may have died since the last
/// batch (a database restart, an idle timeout): that costs one attempt, then `$write` runs
/// on a fresh connection from the pool, which checks a connection before lending it.
/// A connection is kept only if `$settled` says it is outside any transaction; one whose
/// write failed goes back to the pool, whose release hook closes it unless it is settled
/// (see [`super::hygiene`]).
/// (A macro, not a generic function: a closure borrowing the connection makes the
/// writer's task lose `Send`.)
macro_rules! on_kept_connection {
    ($kept:expr, $pool:expr, $keep:expr, $settled:expr, $conn:ident => $write:expr) => {{
        let mut done = None;
        if let Some(mut $conn) = $kept.take() {
            match $write.await {
                Ok(out) => done = Some((out, $conn)),
                Err(e) => {
                    tracing::debug!(error = %e, "intake batch failed on its kept connection; trying a fresh one");
                }
            }
        }
        let (out, $conn) = match done {
            Some(done) => done,
            None => {
                let mut $conn = $pool.acquire().await?;
                ($write.await?, $conn)
            }
        };
        if $keep && $settled(&$conn) {
            *$kept = Some($conn);
        }
        out
    }};
}

impl Writer {
    async fn run(mut self) {
        while let Some(batch) = self.next_batch().await {
            self.write(batch).await;
            // New jobs are due for resolving or staging at once.
            self.signals.work.notify_one();
        }
    }

    /// Waits for one request, then takes whatever else is already queued.
    async fn next_batch(&self) -> Option<Vec<Request>> {
        let mut rx = self.rx.lock().await;
        let first = rx.recv().await?;
        let mut files = first.job.files.len();
        let mut batch = vec![first];
        while batch.len() < self.batch_max && files < BATCH_FILES_SOFT_MAX {
            match rx.try_recv() {
                Ok(req) => {
                    files += req.job.files.len();
                    batch.push(req);
                }
                Err(_) => break,
            }
        }
        Some(batch)
    }

    async fn write(&mut self, batch: Vec<Request>) {
        // A repeated id inside the batch loses to its first occurrence without a round trip.
        let mut seen = HashSet::with_capacity(batch.len());
        let (unique, repeats): (Vec<Request>, Vec<Request>) =
            batch.into_iter().partition(|r| seen.insert(r.job.job_id));
        let jobs: Vec<&NewJob> = unique.iter().map(|r| &r.job).collect();

        let now = now_ms();
        match self.insert(&jobs, now).await {
            Ok(created) => {
                for r in unique {
                    let outcome = if created.contains(&r.job.job_id) {
                        Intake::Created
                    } else {
                        Intake::Duplicate
                    };
                    let _ = r.reply.send(Ok(outcome));
                }
            }
            Err(e) if jobs.len() > 1 => {
                tracing::warn!(error = %e, jobs = jobs.len(), "intake batch failed; retrying its jobs one by one");
                for r in unique {
                    // A later millisecond than the failed batch's, so that its rows can be
                    // told from the retry's.
                    let retry_now = now_ms().max(now + 1);
                    let outcome = match self.insert(&[&r.job], retry_now).await {
                        Ok(created) if !created.is_empty() => Ok(Intake::Created),
                        Ok(_) => self.duplicate_or_unknown(r.job.job_id, now).await,
                        Err(e) => Err(e),
                    };
                    let _ = r.reply.send(outcome);
                }
            }
            Err(e) => {
                if let Some(r) = unique.into_iter().next() {
                    let _ = r.reply.send(Err(e));
                }
            }
        }
        // Answered after the batch so that the first occurrence is known to exist.
        for r in repeats {
            let _ = r.reply.send(Ok(Intake::Duplicate));
        }
    }

    /// Writes the jobs (and the files of those that are new) in one transaction, hands the
    /// created ones to this daemon's engine and returns their ids.
    async fn insert(&mut self, jobs: &[&NewJob], now: i64) -> Result<HashSet<i64>, StoreError> {
        let stamp = Stamp {
            now,
            expires: now + self.expiry_ms,
            owner: &self.owner,
            lease_until: now + self.lease_ms,
        };
        let started = Instant::now();
        let created = match &self.backend {
            // insert_sqlite checked its connection after the commit (a round trip to the
            // connection's thread), so nothing is left to check here.
            Backend::Sqlite(p) => on_kept_connection!(&mut self.sqlite, p, self.keep_connection,
                |_: &PoolConnection<Sqlite>| true,
                conn => insert_sqlite(&mut conn, jobs, &stamp)),
            Backend::Postgres(p) => on_kept_connection!(&mut self.pg, p, self.keep_connection,
                |c: &PoolConnection<Postgres>| super::hygiene::pg_settled(c),
                conn => insert_postgres(&mut conn, jobs, &stamp)),
        };
        // Only here, after the `?`s above: a failed transaction is retried job by job,
        // and each retry that commits is a transaction of its own.
        self.metrics.batch_jobs.observe(jobs.len() as f64);
        self.metrics
            .commit_seconds
            .observe(histograms::since(started));
        self.handoff.push(
            jobs.iter()
                .filter(|j| created.contains(&j.job_id))
                .map(|j| {
                    let work = StageWork {
                        job_id: j.job_id,
                        state: initial_state(j),
                        request_obs: j.obs.clone(),
                        stage_attempts: 0,
                    };
                    (work, stamp.lease_until)
                }),
        );
        Ok(created)
    }
}

impl Writer {
    /// A job already exists when its retry comes: stored before (a duplicate) or by the
    /// failed batch itself, whose commit reported an error and yet took effect (SQLite
    /// after an I/O error at commit, a connection lost while PostgreSQL committed). The
    /// latter was not proven durable, so it is not acknowledged, nor called a duplicate of
    /// a job the client never posted twice: its outcome is unknown.
    async fn duplicate_or_unknown(
        &self,
        job_id: i64,
        batch_now: i64,
    ) -> Result<Intake, StoreError> {
        const SQL: &str = "SELECT count(*) FROM jobs \
             WHERE job_id = $1 AND created_ms = $2 AND lease_owner = $3";
        let by_batch: i64 = with_pool!(&self.backend, p =>
            sqlx::query_scalar(SQL)
                .bind(job_id)
                .bind(batch_now)
                .bind(&*self.owner)
                .fetch_one(p)
                .await?);
        if by_batch > 0 {
            tracing::warn!(
                job_id,
                "a failed intake commit took effect anyway; the job is stored but not acknowledged"
            );
            Err(StoreError::CommitUnknown)
        } else {
            Ok(Intake::Duplicate)
        }
    }
}

/// The state a new job starts in: an observation must first be resolved into files. A
/// stage request whose every file failed at submission has nothing to stage, and the
/// engine completes it when it finds nothing waiting.
fn initial_state(job: &NewJob) -> JobState {
    if job.files.is_empty() && job.obs.is_some() {
        JobState::Resolving
    } else {
        JobState::Staging
    }
}

async fn insert_sqlite(
    conn: &mut SqliteConnection,
    jobs: &[&NewJob],
    stamp: &Stamp<'_>,
) -> Result<HashSet<i64>, StoreError> {
    // The batch travels as one JSON array per statement: one round trip however large.
    const JOBS: &str = "INSERT INTO jobs (job_id, notify_url, request_obs, state, total_files, \
                                          created_ms, updated_ms, next_stage_ms, expires_ms, \
                                          lease_owner, lease_until_ms, submitted_by, \
                                          request_id, settled_files, failed_files) \
         SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), \
                json_extract(value, '$[2]'), json_extract(value, '$[3]'), \
                json_extract(value, '$[4]'), $2, $2, $5, $3, $4, $5, \
                json_extract(value, '$[5]'), json_extract(value, '$[6]'), \
                json_extract(value, '$[7]'), json_extract(value, '$[7]') \
         FROM json_each($1) WHERE true \
         ON CONFLICT (job_id) DO NOTHING RETURNING job_id";
    const FILES: &str = "INSERT INTO job_files (job_id, path) \
         SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each($1)";
    // Files a stage request names that cannot be staged: stored failed, with the reason.
    const FAILED: &str = "INSERT INTO job_files (job_id, path, error, error_msg, error_ms) \
         SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), 1, \
                json_extract(value, '$[2]'), $2 FROM json_each($1)";

    let rows: Vec<_> = jobs
        .iter()
        .map(|j| {
            (
                j.job_id,
                &j.notify_url,
                &j.obs,
                initial_state(j).as_str(),
                j.total_files(),
                &j.submitted_by,
                &j.request_id,
                j.failed.len(),
            )
        })
        .collect();
    let rows = serde_json::to_string(&rows).expect("plain values always serialize");

    let mut tx = conn.begin().await?;
    let created: HashSet<i64> = sqlx::query_scalar(JOBS)
        .bind(rows)
        .bind(stamp.now)
        .bind(stamp.expires)
        .bind(stamp.owner)
        .bind(stamp.lease_until)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
    let files: Vec<(i64, &String)> = jobs
        .iter()
        .filter(|j| created.contains(&j.job_id))
        .flat_map(|j| j.files.iter().map(move |f| (j.job_id, f)))
        .collect();
    for chunk in files.chunks(SQLITE_FILES_PER_STATEMENT) {
        let chunk = serde_json::to_string(chunk).expect("plain values always serialize");
        sqlx::query(FILES).bind(chunk).execute(&mut *tx).await?;
    }
    let failed: Vec<(i64, &String, &String)> = jobs
        .iter()
        .filter(|j| created.contains(&j.job_id))
        .flat_map(|j| j.failed.iter().map(move |(f, why)| (j.job_id, f, why)))
        .collect();
    for chunk in failed.chunks(SQLITE_FILES_PER_STATEMENT) {
        let chunk = serde_json::to_string(chunk).expect("plain values always serialize");
        sqlx::query(FAILED)
            .bind(chunk)
            .bind(stamp.now)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    // A commit that reported success on a connection sqlx had lost count of may have only
    // released a savepoint inside a transaction that never commits: proven committed only
    // if the connection is outside any transaction now.
    if !super::hygiene::sqlite_settled(conn).await? {
        return Err(StoreError::Unsettled);
    }
    Ok(created)
}

async fn insert_postgres(
    conn: &mut PgConnection,
    jobs: &[&NewJob],
    stamp: &Stamp<'_>,
) -> Result<HashSet<i64>, StoreError> {
    // One statement, so one round trip and one implicit transaction: the jobs that are new
    // come back from the first insert and gate the files of the second (a duplicate's files
    // are dropped by the join).
    const SQL: &str = "WITH j AS ( \
             INSERT INTO jobs (job_id, notify_url, request_obs, state, total_files, \
                               created_ms, updated_ms, next_stage_ms, expires_ms, \
                               lease_owner, lease_until_ms, submitted_by, \
                               request_id, settled_files, failed_files) \
             SELECT u.id, u.url, u.obs, u.state, u.total, $6, $6, $11, $7, $10, $11, u.owner, \
                    u.req, u.failed, u.failed \
             FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bigint[], \
                         $12::text[], $13::text[], $14::bigint[]) \
                  AS u(id, url, obs, state, total, owner, req, failed) \
             ON CONFLICT (job_id) DO NOTHING RETURNING job_id), \
         f AS ( \
             INSERT INTO job_files (job_id, path) \
             SELECT v.id, v.p FROM UNNEST($8::bigint[], $9::text[]) AS v(id, p) \
             JOIN j ON j.job_id = v.id), \
         g AS ( \
             INSERT INTO job_files (job_id, path, error, error_msg, error_ms) \
             SELECT v.id, v.p, TRUE, v.m, $6 \
             FROM UNNEST($15::bigint[], $16::text[], $17::text[]) AS v(id, p, m) \
             JOIN j ON j.job_id = v.id) \
         SELECT job_id FROM j";

    let ids: Vec<i64> = jobs.iter().map(|j| j.job_id).collect();
    let urls: Vec<&str> = jobs.iter().map(|j| j.notify_url.as_str()).collect();
    let obs: Vec<Option<&str>> = jobs.iter().map(|j| j.obs.as_deref()).collect();
    let states: Vec<&str> = jobs.iter().map(|j| initial_state(j).as_str()).collect();
    let totals: Vec<i64> = jobs.iter().map(|j| j.total_files() as i64).collect();
    let requests: Vec<Option<&str>> = jobs.iter().map(|j| j.request_id.as_deref()).collect();
    let failed_counts: Vec<i64> = jobs.iter().map(|j| j.failed.len() as i64).collect();
    let mut failed_jobs = Vec::new();
    let mut failed_paths = Vec::new();
    let mut failed_why = Vec::new();
    for j in jobs {
        for (path, why) in &j.failed {
            failed_jobs.push(j.job_id);
            failed_paths.push(path.as_str());
            failed_why.push(why.as_str());
        }
    }
    let owners: Vec<Option<&str>> = jobs.iter().map(|j| j.submitted_by.as_deref()).collect();
    let (file_jobs, file_paths): (Vec<i64>, Vec<&str>) = jobs
        .iter()
        .flat_map(|j| j.files.iter().map(move |f| (j.job_id, f.as_str())))
        .unzip();

    let created: HashSet<i64> = sqlx::query_scalar(SQL)
        .bind(ids)
        .bind(urls)
        .bind(obs)
        .bind(states)
        .bind(totals)
        .bind(stamp.now)
        .bind(stamp.expires)
        .bind(file_jobs)
        .bind(file_paths)
        .bind(stamp.owner)
        .bind(stamp.lease_until)
        .bind(owners)
        .bind(requests)
        .bind(failed_counts)
        .bind(failed_jobs)
        .bind(failed_paths)
        .bind(failed_why)
        .fetch_all(conn)
        .await?
        .into_iter()
        .collect();
    Ok(created)
}
