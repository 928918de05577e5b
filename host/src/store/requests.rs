//! Stage requests of the WLCG Tape REST API (`[tape_rest]`): jobs without a callback.
//!
//! A request is a `jobs` row with `request_id` set and an empty `notify_url`, written by the
//! same intake (so a 201 means committed, as a 202 does), staged, restaged, expired and
//! completed by the same engine and ingest. What differs is its end and its afterlife.
//!
//! Invariants:
//! - A request never gets an outbox row. Every path that decides a job (the ingest's
//!   completion, the engine's decision, expiry, a cancel that settles the last file) marks a
//!   request `done` in the same transaction, writes its history row, and keeps its rows: the
//!   client polls for the result. `updated_ms` of a done request is its completion time.
//! - A cancel is all or nothing: if any path is not in the request, nothing changes.
//! - A cancelled file is settled (counted failed, `error_msg` "cancelled") so that its
//!   request can complete; a cancelled or released file no longer counts as wanted when
//!   another job's DELETE or cancel decides what to cancel at the tape system.
//! - A done request is forgotten `keep` after it completed, in bounded batches; DELETE
//!   forgets it at once.

use std::collections::HashSet;

use super::{Backend, JobState, Store, StoreError, codes, in_tx, json_values, now_ms, with_pool};

const DONE: &str = JobState::Done.as_str();

/// Rows deleted per statement by the retention sweep, so that no one statement holds the
/// store for long however many requests are due.
const FORGET_BATCH: i64 = 1_000;

/// The return code of a request whose files are all settled, as SQL over `jobs` (alias j).
fn settled_code() -> String {
    format!(
        "CASE WHEN j.failed_files > 0 THEN {} ELSE {} END",
        codes::FILE_ERRORS,
        codes::SUCCESS
    )
}

/// Records the history rows of the requests among the job ids bound at `$1` that are
/// complete (every file settled) and not yet done; `$2` is now. Runs before
/// [`complete_sql`] in the same transaction.
pub(super) fn completed_history_sql(b: &Backend) -> String {
    format!(
        "INSERT INTO job_history (job_id, created_ms, finished_ms, return_code, total_files, \
             ready_files, error_files, delivered, comment, request_id) \
         SELECT j.job_id, j.created_ms, $2, {code}, j.total_files, \
             j.settled_files - j.failed_files, j.failed_files, TRUE, 'Tape REST stage request complete', \
             j.request_id \
         FROM jobs j WHERE j.job_id IN {ids} AND j.request_id IS NOT NULL AND j.state <> '{DONE}' \
             AND j.total_files > 0 AND j.settled_files >= j.total_files",
        code = settled_code(),
        ids = json_values(b, "$1", "bigint"),
    )
}

/// Marks done the requests among the job ids bound at `$1` whose files are all settled;
/// `$2` is now.
pub(super) fn complete_sql(b: &Backend) -> String {
    format!(
        "UPDATE jobs SET state = '{DONE}', \
             return_code = CASE WHEN failed_files > 0 THEN {failed} ELSE {ok} END, \
             next_stage_ms = NULL, updated_ms = $2, lease_owner = NULL, lease_until_ms = NULL \
         WHERE job_id IN {ids} AND request_id IS NOT NULL AND state <> '{DONE}' \
             AND total_files > 0 AND settled_files >= total_files",
        failed = codes::FILE_ERRORS,
        ok = codes::SUCCESS,
        ids = json_values(b, "$1", "bigint"),
    )
}

/// Records the history row of a request about to be decided with code `$2` and comment
/// `$3` (job `$1`, now `$4`); nothing for an ASVO job or one already done.
pub(super) const DECIDED_HISTORY: &str = "INSERT INTO job_history (job_id, created_ms, \
         finished_ms, return_code, total_files, ready_files, error_files, delivered, comment, \
         request_id) \
     SELECT j.job_id, j.created_ms, $4, $2, j.total_files, j.settled_files - j.failed_files, \
         j.failed_files, TRUE, $3, j.request_id \
     FROM jobs j WHERE j.job_id = $1 AND j.request_id IS NOT NULL AND j.state <> 'done'";

/// The same for every unfinished request past its expiry (`$1` now), decided code 10.
pub(super) fn expired_history_sql() -> String {
    format!(
        "INSERT INTO job_history (job_id, created_ms, finished_ms, return_code, total_files, \
             ready_files, error_files, delivered, comment, request_id) \
         SELECT j.job_id, j.created_ms, $1, {expired}, j.total_files, \
             j.settled_files - j.failed_files, j.failed_files, TRUE, '{why}', j.request_id \
         FROM jobs j WHERE j.request_id IS NOT NULL AND j.state <> '{DONE}' AND j.expires_ms <= $1",
        expired = codes::EXPIRED,
        why = EXPIRED_WHY,
    )
}

/// Why the files of an expired request that never arrived failed.
pub const EXPIRED_WHY: &str = "the file was not staged before the request expired";

/// One file of a request, as the poll reports it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RequestFile {
    /// The path as the store holds it (the tape system's namespace).
    pub path: String,
    pub ready: bool,
    pub error: bool,
    pub cancelled: bool,
    pub error_msg: Option<String>,
    pub ready_ms: Option<i64>,
    pub error_ms: Option<i64>,
}

/// A request and its files.
#[derive(Debug, Clone)]
pub struct RequestView {
    pub job_id: i64,
    pub created_ms: i64,
    /// When the tape system first accepted its files.
    pub started_ms: Option<i64>,
    pub state: JobState,
    /// The completion time once `state` is done.
    pub updated_ms: i64,
    pub return_code: Option<i64>,
    /// Why the request ended early (a refusal, an expiry), if it did.
    pub last_error: Option<String>,
    /// Who submitted it: a token's name or a token identity (none with auth off).
    pub submitted_by: Option<String>,
    pub files: Vec<RequestFile>,
}

#[derive(sqlx::FromRow)]
struct RequestRow {
    job_id: i64,
    created_ms: i64,
    started_ms: Option<i64>,
    #[sqlx(try_from = "String")]
    state: JobState,
    updated_ms: i64,
    return_code: Option<i64>,
    last_error: Option<String>,
    submitted_by: Option<String>,
}

/// What a cancel did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    NoSuchRequest,
    /// These paths are not in the request; nothing was changed.
    NotInRequest(Vec<String>),
    /// Done: the request's job, and the paths cancelled now that no other unfinished job
    /// or request wants (what may be cancelled at the tape system).
    Cancelled {
        job_id: i64,
        unwanted: Vec<String>,
    },
}

impl Store {
    /// The request with this id and its files, or `None`.
    pub async fn request(&self, request_id: &str) -> Result<Option<RequestView>, StoreError> {
        const JOB: &str = "SELECT job_id, created_ms, started_ms, state, updated_ms, return_code, \
                 last_error, submitted_by FROM jobs WHERE request_id = $1";
        const FILES: &str = "SELECT path, ready, error, cancelled, error_msg, ready_ms, error_ms \
             FROM job_files WHERE job_id = $1 ORDER BY path";
        let (row, files) = with_pool!(&self.backend, p => {
            let row: Option<RequestRow> =
                sqlx::query_as(JOB).bind(request_id).fetch_optional(p).await?;
            let files: Vec<RequestFile> = match &row {
                Some(r) => sqlx::query_as(FILES).bind(r.job_id).fetch_all(p).await?,
                None => Vec::new(),
            };
            (row, files)
        });
        Ok(row.map(|r| RequestView {
            job_id: r.job_id,
            created_ms: r.created_ms,
            started_ms: r.started_ms,
            state: r.state,
            updated_ms: r.updated_ms,
            return_code: r.return_code,
            last_error: r.last_error,
            submitted_by: r.submitted_by,
            files,
        }))
    }

    /// Who submitted a request: `None` if there is no such request.
    pub async fn request_owner(
        &self,
        request_id: &str,
    ) -> Result<Option<(i64, Option<String>)>, StoreError> {
        const SQL: &str = "SELECT job_id, submitted_by FROM jobs WHERE request_id = $1";
        Ok(with_pool!(&self.backend, p =>
            sqlx::query_as(SQL).bind(request_id).fetch_optional(p).await?))
    }

    /// Cancels `paths` of a request, all or nothing: the files not yet settled become
    /// cancelled (settled), and the request completes if that settled its last file.
    pub async fn cancel_request_files(
        &self,
        request_id: &str,
        paths: &[String],
    ) -> Result<CancelOutcome, StoreError> {
        let b = &self.backend;
        let present_sql = format!(
            "SELECT path FROM job_files WHERE job_id = $1 AND path IN {}",
            json_values(b, "$2", "text")
        );
        let cancel_sql = format!(
            "UPDATE job_files SET cancelled = TRUE, error = TRUE, error_msg = 'cancelled', \
                 error_ms = $3 \
             WHERE job_id = $1 AND path IN {} AND NOT ready AND NOT error \
             RETURNING path",
            json_values(b, "$2", "text")
        );
        const COUNTS: &str = "UPDATE jobs SET settled_files = settled_files + $2, \
             failed_files = failed_files + $2, updated_ms = $3 WHERE job_id = $1";
        let wanted: HashSet<&str> = paths.iter().map(String::as_str).collect();
        let list = serde_json::to_string(&wanted).expect("strings serialize");
        let now = now_ms();
        let outcome = in_tx!(b, tx => {
            let job: Option<i64> = sqlx::query_scalar("SELECT job_id FROM jobs WHERE request_id = $1")
                .bind(request_id).fetch_optional(&mut *tx).await?;
            match job {
                None => CancelOutcome::NoSuchRequest,
                Some(job_id) => {
                    let present: HashSet<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(present_sql))
                        .bind(job_id).bind(&list).fetch_all(&mut *tx).await?
                        .into_iter().collect();
                    let mut missing: Vec<String> = wanted.iter()
                        .filter(|p| !present.contains(**p))
                        .map(|p| p.to_string())
                        .collect();
                    if !missing.is_empty() {
                        missing.sort();
                        CancelOutcome::NotInRequest(missing)
                    } else {
                        let cancelled: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(cancel_sql))
                            .bind(job_id).bind(&list).bind(now).fetch_all(&mut *tx).await?;
                        if !cancelled.is_empty() {
                            sqlx::query(COUNTS).bind(job_id).bind(cancelled.len() as i64).bind(now)
                                .execute(&mut *tx).await?;
                            let ids = serde_json::to_string(&[job_id]).expect("integers serialize");
                            sqlx::query(sqlx::AssertSqlSafe(completed_history_sql(b)))
                                .bind(&ids).bind(now).execute(&mut *tx).await?;
                            sqlx::query(sqlx::AssertSqlSafe(complete_sql(b)))
                                .bind(&ids).bind(now).execute(&mut *tx).await?;
                        }
                        CancelOutcome::Cancelled { job_id, unwanted: cancelled }
                    }
                }
            }
        });
        match outcome {
            CancelOutcome::Cancelled { job_id, unwanted } => {
                let unwanted = self.unwanted_elsewhere(job_id, &unwanted).await?;
                Ok(CancelOutcome::Cancelled { job_id, unwanted })
            }
            other => Ok(other),
        }
    }

    /// Of `paths` (of job `job_id`), those no other unfinished job or request wants: held
    /// there neither ready, failed, cancelled nor released.
    pub async fn unwanted_elsewhere(
        &self,
        job_id: i64,
        paths: &[String],
    ) -> Result<Vec<String>, StoreError> {
        if paths.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT u.v FROM {} AS u WHERE NOT EXISTS ( \
                 SELECT 1 FROM job_files g JOIN jobs k ON k.job_id = g.job_id \
                 WHERE g.path = u.v AND g.job_id <> $2 AND k.state <> '{DONE}' \
                     AND NOT g.ready AND NOT g.error AND NOT g.released) \
             ORDER BY u.v",
            json_values(&self.backend, "$1", "text")
        );
        let list = serde_json::to_string(paths).expect("strings serialize");
        Ok(with_pool!(&self.backend, p =>
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).bind(list).bind(job_id).fetch_all(p).await?))
    }

    /// Marks `paths` of a request released. Returns false if there is no such request;
    /// paths not in it are ignored (a release is fire-and-forget).
    pub async fn release_request_files(
        &self,
        request_id: &str,
        paths: &[String],
    ) -> Result<bool, StoreError> {
        let sql = format!(
            "UPDATE job_files SET released = TRUE \
             WHERE job_id = $1 AND path IN {} AND NOT released",
            json_values(&self.backend, "$2", "text")
        );
        let list = serde_json::to_string(paths).expect("strings serialize");
        let Some((job_id, _)) = self.request_owner(request_id).await? else {
            return Ok(false);
        };
        with_pool!(&self.backend, p =>
            sqlx::query(sqlx::AssertSqlSafe(sql)).bind(job_id).bind(list).execute(p).await?.rows_affected());
        Ok(true)
    }

    /// Forgets finished requests that completed before `before_ms`, in bounded batches.
    /// Returns how many it forgot.
    pub async fn forget_finished_requests(&self, before_ms: i64) -> Result<u64, StoreError> {
        let pick = format!(
            "SELECT job_id FROM jobs WHERE request_id IS NOT NULL AND state = '{DONE}' \
                 AND updated_ms < $1 ORDER BY updated_ms LIMIT {FORGET_BATCH}"
        );
        let mut forgotten = 0;
        loop {
            let ids: Vec<i64> = with_pool!(&self.backend, p =>
                sqlx::query_scalar(sqlx::AssertSqlSafe(pick.as_str()))
                    .bind(before_ms).fetch_all(p).await?);
            if ids.is_empty() {
                return Ok(forgotten);
            }
            let list = serde_json::to_string(&ids).expect("integers serialize");
            let values = json_values(&self.backend, "$1", "bigint");
            let files = format!("DELETE FROM job_files WHERE job_id IN {values}");
            let jobs = format!(
                "DELETE FROM jobs WHERE job_id IN {values} AND request_id IS NOT NULL \
                 AND state = '{DONE}'"
            );
            let n = in_tx!(&self.backend, tx => {
                sqlx::query(sqlx::AssertSqlSafe(files)).bind(&list).execute(&mut *tx).await?;
                sqlx::query(sqlx::AssertSqlSafe(jobs)).bind(&list).execute(&mut *tx).await?
                    .rows_affected()
            });
            forgotten += n;
            if (ids.len() as i64) < FORGET_BATCH {
                return Ok(forgotten);
            }
        }
    }
}
