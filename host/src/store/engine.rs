//! What the job engine asks of the store: claiming work, recording results, the callback
//! outbox and the history of finished jobs.
//!
//! Invariants:
//! - Work is claimed with a lease (`lease_owner`, `lease_until_ms`) by one conditional
//!   UPDATE that also moves the due time (`next_stage_ms`, `next_attempt_ms`) to the lease's
//!   end: claimed work is not due to anyone, and a dead daemon's claims come due again when
//!   the lease lapses. On PostgreSQL the candidate rows are picked `FOR UPDATE SKIP LOCKED`,
//!   so several daemons never claim the same row. New jobs are born claimed by the daemon
//!   that accepted them (see `intake`).
//! - A job's result is decided once: the outbox row is keyed by job id and inserted with
//!   `ON CONFLICT DO NOTHING`; the job moves to state `done` in the same transaction.
//! - Finishing a delivery (history row, removal of the job and its files, removal of the
//!   outbox row) happens in one transaction and only while the lease is still ours, so a
//!   callback is finalized once even if two daemons raced to deliver it.
//! - A callback is claimed only when it is about to be attempted: the claim passes over the
//!   rows of a destination that is busy or backing off (see [`Store::claim_callbacks`]),
//!   so they hold no lease and no slot, and a bad destination cannot fill the claim.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use serde::Serialize;

use super::{
    Backend, JobState, Store, StoreError, in_tx, json_rows, json_values, now_ms, with_pool,
};

// The states the statements below name, spelled as the column holds them.
const RESOLVING: &str = JobState::Resolving.as_str();
const STAGING: &str = JobState::Staging.as_str();
const WAITING: &str = JobState::Waiting.as_str();
const DONE: &str = JobState::Done.as_str();

/// Return codes of the callback (compat.md).
pub mod codes {
    pub const SUCCESS: i64 = 0;
    pub const FILE_ERRORS: i64 = 5;
    pub const EXPIRED: i64 = 10;
    pub const LOOKUP_FAILED: i64 = 100;
    pub const NO_FILES: i64 = 101;
    pub const SCOUT_FAILED: i64 = 102;
    pub const INTERNAL: i64 = 199;
}

/// A job the engine must resolve or (re)stage now.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StageWork {
    pub job_id: i64,
    #[sqlx(try_from = "String")]
    pub state: JobState,
    pub request_obs: Option<String>,
    pub stage_attempts: i64,
}

/// The stage worker's claims of jobs, in their order: first the jobs this daemon accepted
/// and has not started (born claimed, handed over in memory at intake, so taking them costs
/// no query), then due jobs from the store (`Store::claim_due_stage_work`).
///
/// Jobs this daemon accepted come through the handoff; the store holds only work that is
/// due by a timer or left by another (or a crashed) daemon, which waits for the poll
/// interval anyway. So the store is searched only when the handoff gave nothing, when the
/// last search filled its share (more may be due at once), or once a poll interval:
/// searching it on every wake-up (about 30 a second under a burst of POSTs) cost a planned
/// query and a round trip each, almost always finding nothing.
pub struct StageClaims {
    store: Store,
    poll: Duration,
    /// When the store was last searched for due work.
    searched: Option<Instant>,
    /// Whether that search filled its share of the claim.
    search_full: bool,
}

/// What one claim of stage work took.
#[derive(Debug)]
pub struct StageClaim {
    /// The jobs claimed, handed-over ones first.
    pub work: Vec<StageWork>,
    /// The store's search failed; `work` still holds the handed-over jobs.
    pub search_error: Option<StoreError>,
}

impl StageClaims {
    /// Claims up to `limit` jobs.
    pub async fn claim(&mut self, limit: i64) -> StageClaim {
        let mut work = self.store.take_handed_over(limit);
        let room = limit - work.len() as i64;
        let search = room > 0
            && (work.is_empty()
                || self.search_full
                || self.searched.is_none_or(|at| at.elapsed() >= self.poll));
        let mut search_error = None;
        if search {
            match self.store.claim_due_stage_work(room).await {
                Ok(due) => {
                    self.search_full = due.len() as i64 == room;
                    work.extend(due);
                }
                Err(e) => {
                    self.search_full = false;
                    search_error = Some(e);
                }
            }
            self.searched = Some(Instant::now());
        }
        StageClaim { work, search_error }
    }
}

/// A callback to deliver.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct OutboxRow {
    pub job_id: i64,
    pub notify_url: String,
    pub return_code: i64,
    pub total_files: i64,
    pub ready_files: i64,
    pub error_files: i64,
    pub comment: String,
    pub attempts: i64,
    pub give_up_ms: Option<i64>,
    /// The destination, as [`callback_origin`] gives it.
    pub origin: String,
    /// When the callback was queued: the job's result was decided then.
    pub created_ms: i64,
}

/// The callback outbox's size, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Callbacks queued and not yet delivered or given up.
    pub pending: i64,
    /// Of those, the ones due for longer than [`OVERDUE_AFTER`] that no one is attempting
    /// (an attempt's claim moves the due time to the claim's end): starved by busy slots or
    /// destinations, or left by a daemon that died holding them.
    pub overdue: i64,
}

/// How long past its due time a callback that no one attempts counts as overdue.
pub const OVERDUE_AFTER: Duration = Duration::from_secs(60);

/// The destination of a callback: scheme, host and port (the default port spelled out),
/// lower case. Per-destination limits, backoff and budgets are keyed by it. A URL that does
/// not parse (intake refuses those) is its own destination, so it costs only itself.
pub fn callback_origin(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => match (u.host_str(), u.port_or_known_default()) {
            (Some(host), Some(port)) => format!("{}://{}:{}", u.scheme(), host, port),
            (Some(host), None) => format!("{}://{}", u.scheme(), host),
            _ => url.to_string(),
        },
        Err(_) => url.to_string(),
    }
}

/// Which callbacks a claim may take, by destination ([`callback_origin`]).
#[derive(Debug, Clone)]
pub struct CallbackGate {
    /// Destinations with no room now (as many attempts in flight as allowed, or their
    /// budget spent): none of their rows is claimed.
    pub busy: Vec<String>,
    /// Destinations backing off after failures: only their rows past the grace period
    /// are claimed, to be removed without another attempt.
    pub backing_off: Vec<String>,
    /// Rows each destination may take now, for those with less than `default_room`.
    pub room: HashMap<String, usize>,
    /// Rows any other destination may take.
    pub default_room: usize,
}

impl Default for CallbackGate {
    fn default() -> Self {
        Self {
            busy: Vec::new(),
            backing_off: Vec::new(),
            room: HashMap::new(),
            default_room: usize::MAX,
        }
    }
}

/// A finished job, as [`Store::history`] reads it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct HistoryRow {
    pub job_id: i64,
    pub created_ms: i64,
    pub finished_ms: i64,
    pub return_code: i64,
    pub total_files: i64,
    pub ready_files: i64,
    pub error_files: i64,
    pub delivered: bool,
    pub comment: String,
    /// A Tape REST stage request's id (none for ASVO's jobs).
    pub request_id: Option<String>,
}

/// Most jobs one transaction of the expiry sweep decides.
const EXPIRE_BATCH: usize = 1_000;

/// Reads of the outbox one callback claim may make (see [`Store::claim_callbacks`]).
const CLAIM_READS: usize = 8;

// Counts of a job's files, as a SELECT list over `jobs j`.
const COUNTS: &str = "(SELECT count(*) FROM job_files f WHERE f.job_id = j.job_id AND f.ready), \
     (SELECT count(*) FROM job_files f WHERE f.job_id = j.job_id AND f.error AND NOT f.ready)";

impl Store {
    /// The stage worker's claims of jobs, searching the store for due ones at least once a
    /// `poll` interval.
    pub fn stage_claims(&self, poll: Duration) -> StageClaims {
        StageClaims {
            store: self.clone(),
            poll,
            searched: None,
            search_full: false,
        }
    }

    /// Up to `limit` of the jobs this daemon accepted and has not started yet: they are
    /// born claimed, so taking them needs no query.
    fn take_handed_over(&self, limit: i64) -> Vec<StageWork> {
        // A job handed over too close to its lease's end is left to the store's claim.
        self.handoff
            .take(limit.max(0) as usize, now_ms() + self.lease_ms / 4)
    }

    /// Claims up to `limit` due jobs from the store. A claim moves `next_stage_ms` to the
    /// lease's end, so a claimed job is simply not due to anyone else until its lease
    /// lapses; the pick is then one range of one index, cheap whatever the statistics say.
    async fn claim_due_stage_work(&self, limit: i64) -> Result<Vec<StageWork>, StoreError> {
        if limit <= 0 {
            return Ok(Vec::new());
        }
        let now = now_ms();
        const PICK: &str = "SELECT job_id FROM jobs \
             WHERE next_stage_ms <= $3 ORDER BY next_stage_ms LIMIT $4";
        let lock = self.backend.skip_locked();
        let sql = format!(
            "UPDATE jobs SET lease_owner = $1, lease_until_ms = $2, next_stage_ms = $2 \
             WHERE job_id IN ({PICK} {lock}) \
             RETURNING job_id, state, request_obs, stage_attempts"
        );
        Ok(with_pool!(&self.backend, p =>
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(&*self.owner)
                .bind(now + self.lease_ms)
                .bind(now)
                .bind(limit)
                .fetch_all(p)
                .await?))
    }

    /// Gives up every claim this daemon holds on jobs (those handed over at intake and not
    /// started, and any the stopped engine left unfinished), so that they are due at once.
    /// Used at shutdown, after the engine stopped.
    pub(crate) async fn release_unstarted(&self) -> Result<u64, StoreError> {
        self.handoff.clear();
        let sql = format!(
            "UPDATE jobs SET next_stage_ms = $2, lease_owner = NULL, lease_until_ms = NULL \
             WHERE lease_owner = $1 AND state <> '{DONE}'"
        );
        Ok(
            with_pool!(&self.backend, p => sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&*self.owner).bind(now_ms())
            .execute(p).await?.rows_affected()),
        )
    }

    /// Paths of each job that are neither ready nor failed, in one query for all of them.
    /// Jobs with no such path are absent from the map.
    pub async fn waiting_paths(
        &self,
        job_ids: &[i64],
    ) -> Result<HashMap<i64, Vec<String>>, StoreError> {
        if job_ids.is_empty() {
            return Ok(HashMap::new());
        }
        let ids = serde_json::to_string(job_ids).expect("integers serialize");
        let sql = format!(
            "SELECT f.job_id, f.path FROM job_files f JOIN {} AS u ON f.job_id = u.v \
             WHERE NOT f.ready AND NOT f.error ORDER BY f.job_id, f.path",
            json_values(&self.backend, "$1", "bigint")
        );
        // Read as a stream into the map: a 500,000-file job's rows, all held before being
        // sorted into it, were a second copy of its paths.
        let mut by_job: HashMap<i64, Vec<String>> = HashMap::new();
        with_pool!(&self.backend, p => {
            let mut rows = sqlx::query_as::<_, (i64, String)>(sqlx::AssertSqlSafe(sql))
                .bind(ids)
                .fetch(p);
            while let Some((job_id, path)) = rows.try_next().await? {
                by_job.entry(job_id).or_default().push(path);
            }
        });
        Ok(by_job)
    }

    /// Of the waiting paths of `job_ids`, those another job has already had accepted by
    /// Scout and still waits for: a first stage leaves them out, since one recall marks
    /// every job holding the path, so a path shared by several jobs is recalled once.
    pub async fn requested_elsewhere(
        &self,
        job_ids: &[i64],
    ) -> Result<HashMap<i64, HashSet<String>>, StoreError> {
        if job_ids.is_empty() {
            return Ok(HashMap::new());
        }
        let ids = serde_json::to_string(job_ids).expect("integers serialize");
        let sql = format!(
            "SELECT f.job_id, f.path FROM job_files f JOIN {} AS u ON f.job_id = u.v \
             WHERE NOT f.ready AND NOT f.error AND EXISTS ( \
                 SELECT 1 FROM job_files g JOIN jobs k ON k.job_id = g.job_id \
                 WHERE g.path = f.path AND g.job_id <> f.job_id AND k.state = '{WAITING}' \
                     AND NOT g.ready AND NOT g.error)",
            json_values(&self.backend, "$1", "bigint")
        );
        let rows: Vec<(i64, String)> = with_pool!(&self.backend, p =>
            sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(ids).fetch_all(p).await?);
        let mut by_job: HashMap<i64, HashSet<String>> = HashMap::new();
        for (job_id, path) in rows {
            by_job.entry(job_id).or_default().insert(path);
        }
        Ok(by_job)
    }

    /// Paths of a job that no other unfinished job holds (what DELETE may cancel at Scout).
    pub async fn exclusive_paths(&self, job_id: i64) -> Result<Vec<String>, StoreError> {
        let sql = format!(
            "SELECT f.path FROM job_files f WHERE f.job_id = $1 \
             AND NOT EXISTS (SELECT 1 FROM job_files g JOIN jobs k ON k.job_id = g.job_id \
                             WHERE g.path = f.path AND g.job_id <> f.job_id AND k.state <> '{DONE}' \
                                 AND NOT g.cancelled AND NOT g.released) \
             ORDER BY f.path"
        );
        Ok(with_pool!(&self.backend, p =>
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).bind(job_id).fetch_all(p).await?))
    }

    /// Stores the files an observation resolved to and makes the job due for staging.
    /// Does nothing (returns false) if this daemon's lease on the job has lapsed.
    pub async fn set_resolved_files(
        &self,
        job_id: i64,
        paths: &[String],
    ) -> Result<bool, StoreError> {
        // The job takes its files only while it is still ours and still unresolved. It
        // stays claimed (not due to others) until this daemon has staged it or the lease
        // lapses.
        let resolved = format!(
            "UPDATE jobs SET state = '{STAGING}', total_files = $3, \
                 next_stage_ms = coalesce(lease_until_ms, $4), updated_ms = $4, \
                 stage_attempts = 0, last_error = NULL \
             WHERE job_id = $1 AND lease_owner = $2 AND state = '{RESOLVING}'"
        );
        // `WHERE true` lets SQLite tell the upsert from a join condition.
        let files_sql = format!(
            "INSERT INTO job_files (job_id, path) SELECT $1, u.v FROM {} AS u WHERE true \
             ON CONFLICT DO NOTHING",
            json_values(&self.backend, "$2", "text")
        );
        let files = serde_json::to_string(paths).expect("strings serialize");
        let now = now_ms();
        let ok = in_tx!(&self.backend, tx => {
            let n = sqlx::query(sqlx::AssertSqlSafe(resolved))
                .bind(job_id)
                .bind(&*self.owner)
                .bind(paths.len() as i64)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if n == 1 {
                sqlx::query(sqlx::AssertSqlSafe(files_sql))
                    .bind(job_id)
                    .bind(files)
                    .execute(&mut *tx)
                    .await?;
            }
            n == 1
        });
        Ok(ok)
    }

    /// Scout accepted these jobs' waiting paths: each waits for events and is asked again
    /// at its `next_ms`. Jobs whose lease is no longer this daemon's are left alone.
    pub async fn mark_staged(&self, jobs: &[(i64, i64)]) -> Result<(), StoreError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "UPDATE jobs SET state = '{WAITING}', next_stage_ms = u.next_ms, updated_ms = $2, \
                 stage_attempts = 0, last_error = NULL, lease_owner = NULL, lease_until_ms = NULL, \
                 started_ms = coalesce(started_ms, $2) \
             FROM {} AS u \
             WHERE jobs.job_id = u.id AND jobs.lease_owner = $3 AND jobs.state <> '{DONE}'",
            json_rows(
                &self.backend,
                "$1",
                &[("id", "bigint"), ("next_ms", "bigint")]
            )
        );
        let rows = serde_json::to_string(jobs).expect("integers serialize");
        with_pool!(&self.backend, p => sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(rows).bind(now_ms()).bind(&*self.owner)
            .execute(p).await?.rows_affected());
        Ok(())
    }

    /// Resolve or stage attempts that failed transiently: each job is tried again at its
    /// `next_ms`, and its error is kept for the operator.
    pub async fn mark_stage_retry(&self, jobs: &[(i64, i64, String)]) -> Result<(), StoreError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "UPDATE jobs SET next_stage_ms = u.next_ms, updated_ms = $2, \
                 stage_attempts = stage_attempts + 1, last_error = u.error, \
                 lease_owner = NULL, lease_until_ms = NULL \
             FROM {} AS u \
             WHERE jobs.job_id = u.id AND jobs.lease_owner = $3 AND jobs.state <> '{DONE}'",
            json_rows(
                &self.backend,
                "$1",
                &[("id", "bigint"), ("next_ms", "bigint"), ("error", "text")]
            )
        );
        let rows = serde_json::to_string(jobs).expect("strings and integers serialize");
        with_pool!(&self.backend, p => sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(rows).bind(now_ms()).bind(&*self.owner)
            .execute(p).await?.rows_affected());
        Ok(())
    }

    /// Decides a job's result and queues its callback, once. `comment` empty means "word it
    /// from the counts at delivery". Returns false if the job is gone or already decided.
    pub async fn decide(
        &self,
        job_id: i64,
        code: i64,
        comment: &str,
        deliver_at_ms: i64,
        give_up_ms: Option<i64>,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let insert = format!(
            "INSERT INTO notify_outbox (job_id, notify_url, return_code, total_files, \
                 ready_files, error_files, comment, attempts, next_attempt_ms, give_up_ms, created_ms) \
             SELECT j.job_id, j.notify_url, $2, j.total_files, {COUNTS}, $3, 0, $4, $5, $6 \
             FROM jobs j WHERE j.job_id = $1 AND j.state <> '{DONE}' AND j.request_id IS NULL \
             ON CONFLICT (job_id) DO NOTHING"
        );
        // A stage request (no callback) keeps the comment as its reason, for its poll.
        let done = format!(
            "UPDATE jobs SET state = '{DONE}', return_code = $2, next_stage_ms = NULL, \
                 updated_ms = $3, lease_owner = NULL, lease_until_ms = NULL, \
                 last_error = CASE WHEN request_id IS NULL THEN last_error ELSE $4 END \
             WHERE job_id = $1 AND state <> '{DONE}'"
        );
        let (queued, decided) = in_tx!(&self.backend, tx => {
            let n = sqlx::query(sqlx::AssertSqlSafe(insert))
                .bind(job_id).bind(code).bind(comment).bind(deliver_at_ms).bind(give_up_ms).bind(now)
                .execute(&mut *tx).await?.rows_affected();
            sqlx::query(super::requests::DECIDED_HISTORY)
                .bind(job_id).bind(code).bind(comment).bind(now).execute(&mut *tx).await?;
            let decided = sqlx::query(sqlx::AssertSqlSafe(done))
                .bind(job_id).bind(code).bind(now).bind(comment).execute(&mut *tx).await?
                .rows_affected();
            (n == 1, decided == 1)
        });
        if queued {
            self.signals.outbox.notify_one();
        }
        Ok(decided)
    }

    /// Decides every unfinished job past its expiry (code 10); their callbacks may be
    /// retried until `now + grace_ms`, then the job is removed anyway.
    ///
    /// The jobs due are found first by a read outside any transaction: it reads every
    /// unfinished job (the expiry index was dropped, see migration 0003), and inside the
    /// write transaction that scan would hold SQLite's write lock, stalling intake and ingest,
    /// for a time that grows with the number of waiting jobs. The transaction then takes
    /// only those jobs, by id, checking again that each is unfinished and due.
    pub async fn expire_due(&self, grace_ms: i64) -> Result<u64, StoreError> {
        let now = now_ms();
        let pick = format!(
            "SELECT job_id FROM jobs WHERE state <> '{DONE}' AND expires_ms <= $1 ORDER BY job_id"
        );
        let due: Vec<i64> = with_pool!(&self.backend, p =>
            sqlx::query_scalar(sqlx::AssertSqlSafe(pick)).bind(now).fetch_all(p).await?);
        if due.is_empty() {
            return Ok(0);
        }
        let (mut queued, mut total) = (0, 0);
        // In bounded transactions: a backlog (after an outage, say) would otherwise hold the
        // write lock for all of its jobs' file counts at once.
        for chunk in due.chunks(EXPIRE_BATCH) {
            let ids = serde_json::to_string(chunk).expect("integers serialize");
            let insert = format!(
                "INSERT INTO notify_outbox (job_id, notify_url, return_code, total_files, \
                     ready_files, error_files, comment, attempts, next_attempt_ms, give_up_ms, created_ms) \
                 SELECT j.job_id, j.notify_url, {expired}, j.total_files, {COUNTS}, '', 0, $1, $2, $1 \
                 FROM jobs j WHERE j.state <> '{DONE}' AND j.expires_ms <= $1 AND j.request_id IS NULL \
                     AND j.job_id IN {due} \
                 ON CONFLICT (job_id) DO NOTHING",
                expired = codes::EXPIRED,
                due = json_values(&self.backend, "$3", "bigint"),
            );
            let done = format!(
                "UPDATE jobs SET state = '{DONE}', return_code = {expired}, next_stage_ms = NULL, \
                     updated_ms = $1, lease_owner = NULL, lease_until_ms = NULL, \
                     last_error = CASE WHEN request_id IS NULL THEN last_error ELSE '{why}' END \
                 WHERE state <> '{DONE}' AND expires_ms <= $1 AND job_id IN {due}",
                expired = codes::EXPIRED,
                why = super::requests::EXPIRED_WHY,
                due = json_values(&self.backend, "$2", "bigint"),
            );
            let history = format!(
                "{} AND j.job_id IN {}",
                super::requests::expired_history_sql(),
                json_values(&self.backend, "$2", "bigint")
            );
            let (q, n) = in_tx!(&self.backend, tx => {
                let queued = sqlx::query(sqlx::AssertSqlSafe(insert))
                    .bind(now).bind(now + grace_ms).bind(&ids)
                    .execute(&mut *tx).await?.rows_affected();
                sqlx::query(sqlx::AssertSqlSafe(history)).bind(now).bind(&ids)
                    .execute(&mut *tx).await?;
                let n = sqlx::query(sqlx::AssertSqlSafe(done)).bind(now).bind(&ids)
                    .execute(&mut *tx).await?.rows_affected();
                (queued, n)
            });
            queued += q;
            total += n;
        }
        if queued > 0 {
            self.signals.outbox.notify_one();
        }
        Ok(total)
    }

    /// Claims up to `limit` callbacks that are due, whatever their destination.
    #[cfg(any(test, feature = "test-support"))]
    pub async fn claim_due_callbacks(
        &self,
        owner: &str,
        lease_ms: i64,
        limit: i64,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        self.claim_callbacks(owner, lease_ms, limit, &CallbackGate::default())
            .await
    }

    /// Claims up to `limit` due callbacks that `gate` lets through, in due order.
    ///
    /// Only rows about to be attempted are claimed: a row whose destination is busy or
    /// backing off stays unclaimed and due, costing neither a delivery slot nor a lease
    /// (another daemon, or this one once the destination has room, takes it). The
    /// exception is a row of a destination that is backing off whose grace period is over:
    /// it is claimed so that the caller can remove it without another attempt.
    ///
    /// The candidates are read first and claimed by a second, conditional UPDATE that
    /// only takes rows still due, so two daemons never both claim a row. A claimed row gets
    /// its destination (`origin`) recorded. When a read is full of rows none of which may
    /// go, their destinations are recorded too and the read repeated, so that it leaves a
    /// blocked destination's rows out in SQL: they cannot starve the rows behind them.
    pub async fn claim_callbacks(
        &self,
        owner: &str,
        lease_ms: i64,
        limit: i64,
        gate: &CallbackGate,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        if limit <= 0 {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let b = &self.backend;
        let candidates_sql = format!(
            "SELECT job_id, notify_url, origin, give_up_ms FROM notify_outbox \
             WHERE next_attempt_ms <= $1 AND (origin IS NULL OR origin NOT IN {blocked} \
                 OR (give_up_ms <= $1 AND origin IN {backing_off})) \
             ORDER BY next_attempt_ms LIMIT $4",
            blocked = json_values(b, "$2", "text"),
            backing_off = json_values(b, "$3", "text"),
        );
        let backing_off = serde_json::to_string(&gate.backing_off).expect("strings serialize");
        let classify_sql = format!(
            "UPDATE notify_outbox SET origin = u.o FROM {} AS u \
             WHERE notify_outbox.job_id = u.id AND notify_outbox.origin IS NULL",
            json_rows(b, "$1", &[("id", "bigint"), ("o", "text")])
        );
        let blocked: Vec<&String> = gate.busy.iter().chain(gate.backing_off.iter()).collect();
        let blocked = serde_json::to_string(&blocked).expect("strings serialize");
        let mut room: HashMap<String, usize> = HashMap::new();
        let mut take: Vec<(i64, String)> = Vec::new();
        // Read more than we may take: some candidates belong to destinations with less
        // room than rows.
        let mut window = (limit * 4).max(64);
        // A read full of rows none of which may go (a blocked destination's, not yet known
        // to be its) records their destination, a write, and reads again, a bounded number
        // of times; otherwise the rows are only read.
        for _ in 0..CLAIM_READS {
            let candidates: Vec<(i64, String, Option<String>, Option<i64>)> = with_pool!(b, p =>
                sqlx::query_as(sqlx::AssertSqlSafe(candidates_sql.as_str()))
                    .bind(now).bind(&blocked).bind(&backing_off).bind(window)
                    .fetch_all(p).await?);
            let full = candidates.len() as i64 == window;
            let mut classify: Vec<(i64, String)> = Vec::new();
            for (job_id, url, origin, give_up_ms) in candidates {
                let known = origin.is_some();
                let origin = origin.unwrap_or_else(|| callback_origin(&url));
                let expired = give_up_ms.is_some_and(|g| g <= now);
                let wanted = if gate.backing_off.contains(&origin) {
                    expired
                } else if gate.busy.contains(&origin) {
                    false
                } else {
                    let left = room.entry(origin.clone()).or_insert_with(|| {
                        gate.room.get(&origin).copied().unwrap_or(gate.default_room)
                    });
                    let fits = *left > 0;
                    *left = left.saturating_sub(1);
                    fits
                };
                if wanted && (take.len() as i64) < limit {
                    take.push((job_id, origin));
                } else if !known {
                    classify.push((job_id, origin));
                }
            }
            if !take.is_empty() || !full || classify.is_empty() {
                break;
            }
            let rows = serde_json::to_string(&classify).expect("strings and integers serialize");
            with_pool!(b, p => sqlx::query(sqlx::AssertSqlSafe(classify_sql.as_str()))
                .bind(rows).execute(p).await?.rows_affected());
            window = window.max(512);
        }
        if take.is_empty() {
            return Ok(Vec::new());
        }
        // As with jobs, a claim moves the due time to the lease's end; a row claimed by
        // someone else since it was read is no longer due and is left alone.
        let sql = format!(
            "UPDATE notify_outbox SET lease_owner = $2, lease_until_ms = $3, \
                 next_attempt_ms = $3, origin = u.o \
             FROM {} AS u \
             WHERE notify_outbox.job_id = u.id AND notify_outbox.next_attempt_ms <= $4 \
             RETURNING job_id, notify_url, return_code, total_files, ready_files, error_files, \
                 comment, attempts, give_up_ms, origin, created_ms",
            json_rows(b, "$1", &[("id", "bigint"), ("o", "text")])
        );
        let rows = serde_json::to_string(&take).expect("strings and integers serialize");
        let mut claimed: Vec<OutboxRow> = with_pool!(b, p =>
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(rows).bind(owner).bind(now + lease_ms).bind(now)
                .fetch_all(p).await?);
        // RETURNING gives no order; keep the due order of the read.
        let order: HashMap<i64, usize> = take
            .iter()
            .enumerate()
            .map(|(i, (id, _))| (*id, i))
            .collect();
        claimed.sort_by_key(|r| order.get(&r.job_id).copied().unwrap_or(usize::MAX));
        Ok(claimed)
    }

    /// A delivery attempt failed: try again at `next_ms`.
    pub async fn callback_retry(
        &self,
        job_id: i64,
        owner: &str,
        next_ms: i64,
        error: &str,
    ) -> Result<(), StoreError> {
        const SQL: &str = "UPDATE notify_outbox SET attempts = attempts + 1, next_attempt_ms = $3, \
                 last_error = $4, lease_owner = NULL, lease_until_ms = NULL \
             WHERE job_id = $1 AND lease_owner = $2";
        with_pool!(&self.backend, p => sqlx::query(SQL)
            .bind(job_id).bind(owner).bind(next_ms).bind(error)
            .execute(p).await?.rows_affected());
        Ok(())
    }

    /// The files a failure report lists: (with errors, never arrived).
    pub async fn report_lists(
        &self,
        job_id: i64,
    ) -> Result<(Vec<String>, Vec<String>), StoreError> {
        const SQL: &str = "SELECT path, error FROM job_files \
             WHERE job_id = $1 AND NOT ready ORDER BY path";
        let rows: Vec<(String, bool)> = with_pool!(&self.backend, p =>
            sqlx::query_as(SQL).bind(job_id).fetch_all(p).await?);
        let (errors, missing): (Vec<_>, Vec<_>) = rows.into_iter().partition(|(_, e)| *e);
        Ok((
            errors.into_iter().map(|(p, _)| p).collect(),
            missing.into_iter().map(|(p, _)| p).collect(),
        ))
    }

    /// Ends a callback: records the history row and removes the job, its files and the
    /// outbox row, in one transaction, if we still hold the lease. Returns whether it did.
    pub async fn finish_callback(
        &self,
        row: &OutboxRow,
        owner: &str,
        delivered: bool,
        comment: &str,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        const CLAIM: &str = "DELETE FROM notify_outbox WHERE job_id = $1 AND lease_owner = $2";
        const HISTORY: &str = "INSERT INTO job_history (job_id, created_ms, finished_ms, return_code, \
                 total_files, ready_files, error_files, delivered, comment) \
             SELECT $1, coalesce((SELECT created_ms FROM jobs WHERE job_id = $1), $2), $2, $3, $4, $5, $6, $7, $8";
        let finished = in_tx!(&self.backend, tx => {
            let n = sqlx::query(CLAIM).bind(row.job_id).bind(owner)
                .execute(&mut *tx).await?.rows_affected();
            if n == 1 {
                sqlx::query(HISTORY)
                    .bind(row.job_id).bind(now).bind(row.return_code).bind(row.total_files)
                    .bind(row.ready_files).bind(row.error_files).bind(delivered).bind(comment)
                    .execute(&mut *tx).await?;
                sqlx::query("DELETE FROM job_files WHERE job_id = $1")
                    .bind(row.job_id).execute(&mut *tx).await?;
                sqlx::query("DELETE FROM jobs WHERE job_id = $1")
                    .bind(row.job_id).execute(&mut *tx).await?;
            }
            n == 1
        });
        Ok(finished)
    }

    /// Finished jobs, newest first.
    pub async fn history(&self, limit: i64) -> Result<Vec<HistoryRow>, StoreError> {
        const SQL: &str = "SELECT job_id, created_ms, finished_ms, return_code, total_files, \
                 ready_files, error_files, delivered, comment, request_id \
             FROM job_history ORDER BY finished_ms DESC, job_id DESC LIMIT $1";
        Ok(with_pool!(&self.backend, p =>
            sqlx::query_as(SQL).bind(limit).fetch_all(p).await?))
    }

    /// Removes history rows older than `before_ms`.
    pub async fn prune_history(&self, before_ms: i64) -> Result<u64, StoreError> {
        Ok(with_pool!(&self.backend, p =>
            sqlx::query("DELETE FROM job_history WHERE finished_ms < $1")
                .bind(before_ms).execute(p).await?.rows_affected()))
    }

    /// The outbox's pending and overdue callbacks. One pass over the outbox, which holds
    /// only undelivered callbacks; `/metrics` reads it in the background with the job
    /// totals, never per scrape.
    pub async fn outbox_stats(&self) -> Result<OutboxStats, StoreError> {
        const SQL: &str = "SELECT count(*), count(*) FILTER (WHERE next_attempt_ms <= $1) \
             FROM notify_outbox";
        let due_before = now_ms() - OVERDUE_AFTER.as_millis() as i64;
        let (pending, overdue): (i64, i64) = with_pool!(&self.backend, p =>
            sqlx::query_as(SQL).bind(due_before).fetch_one(p).await?);
        Ok(OutboxStats { pending, overdue })
    }

    /// Outbox rows still to deliver.
    #[cfg(any(test, feature = "test-support"))]
    pub async fn pending_callbacks(&self) -> Result<i64, StoreError> {
        Ok(with_pool!(&self.backend, p =>
            sqlx::query_scalar("SELECT count(*) FROM notify_outbox").fetch_one(p).await?))
    }
}
