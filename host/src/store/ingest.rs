//! Store side of Kafka ingest: one batch of recall events in, what it did out.
//!
//! Invariants:
//! - A batch's changes, and the callbacks of the jobs it completed, are written in one
//!   transaction ([`Store::apply_file_events`]); re-applying a batch changes nothing.
//! - The count of events about paths no job holds is a figure for metrics only: it is read
//!   after the transaction, and only for the paths that changed nothing, so it never decides
//!   what is written and costs nothing when every event was wanted.

use std::collections::{BTreeMap, HashSet};

use super::{Backend, FileEvent, Store, StoreError, codes, in_tx, json_rows, json_values, now_ms};

/// A batch names a few thousand paths of a table that may hold millions. Matched by index,
/// each costs one probe; but the planner, misled by the default row estimate of a JSON
/// function (100) and by statistics that lag a freshly filled table (a path seemed to match
/// 300 rows), chose a hash join that read every file of every job for each batch: 50 ms at
/// 100,000 files, and growing with the table. Only this transaction is told.
const PG_PROBE_BY_INDEX: &str = "SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off";

/// What one applied batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngestOutcome {
    /// Job files whose state changed.
    pub changed: u64,
    /// Events whose path no job holds.
    pub unknown: u64,
}

/// What applying events did to the store.
struct Applied {
    /// Job files whose state changed.
    changed: u64,
    /// Paths that changed at least one job file.
    matched: HashSet<String>,
}

impl Store {
    /// Applies `events` (one transaction) and counts those about paths no job holds.
    pub async fn apply_ingest_batch(
        &self,
        events: &[FileEvent],
    ) -> Result<IngestOutcome, StoreError> {
        let applied = self.apply(events).await?;
        // A path that changed nothing is either held by no job or already settled (a
        // duplicate or a redelivery); only those need looking up.
        let idle: HashSet<&str> = events
            .iter()
            .map(|e| e.path.as_str())
            .filter(|p| !applied.matched.contains(*p))
            .collect();
        let unknown = if idle.is_empty() {
            0
        } else {
            let idle: Vec<&str> = idle.into_iter().collect();
            let unknown = self.unknown_paths(&idle).await?;
            events
                .iter()
                .filter(|e| unknown.contains(e.path.as_str()))
                .count() as u64
        };
        Ok(IngestOutcome {
            changed: applied.changed,
            unknown,
        })
    }

    /// The distinct `paths` that no job holds.
    pub async fn unknown_paths(&self, paths: &[&str]) -> Result<HashSet<String>, StoreError> {
        if paths.is_empty() {
            return Ok(HashSet::new());
        }
        let sql = format!(
            "SELECT DISTINCT e.v FROM {} AS e \
             WHERE NOT EXISTS (SELECT 1 FROM job_files f WHERE f.path = e.v)",
            json_values(&self.backend, "$1", "text")
        );
        let json = serde_json::to_string(paths).expect("strings serialize");
        let rows: Vec<String> = super::with_pool!(&self.backend, p =>
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).bind(json).fetch_all(p).await?);
        Ok(rows.into_iter().collect())
    }

    /// Applies a batch of tape-system events in one transaction, to every job holding each
    /// path. A staged event makes the file ready (once: the first ready time stays); an
    /// error marks it failed unless it is already ready. Re-applying a batch changes nothing.
    ///
    /// In the same transaction, every job the batch made complete (all files ready or
    /// failed) gets its callback queued (code 0, or 5 when a file failed), so completion
    /// never waits for a periodic sweep. Returns the number of job files whose state changed.
    pub async fn apply_file_events(&self, events: &[FileEvent]) -> Result<u64, StoreError> {
        Ok(self.apply(events).await?.changed)
    }

    async fn apply(&self, events: &[FileEvent]) -> Result<Applied, StoreError> {
        let (ready, failed): (Vec<&FileEvent>, Vec<&FileEvent>) =
            events.iter().partition(|e| e.error.is_none());
        let b = &self.backend;
        // Each statement reads its events as one JSON array of rows, one row per path
        // ([path, time] for READY, [path, message] for FAILED).
        // A failed file keeps its (never empty) message when it later becomes ready, so
        // `error_msg IS NOT NULL` on a row READY changed means it had been settled already.
        let ready_sql = format!(
            "UPDATE job_files SET ready = TRUE, error = FALSE, \
                 ready_ms = coalesce(job_files.ready_ms, e.t) \
             FROM {} AS e \
             WHERE job_files.path = e.p AND NOT job_files.ready \
             RETURNING job_files.job_id, job_files.path, job_files.error_msg IS NOT NULL",
            json_rows(b, "$1", &[("p", "text"), ("t", "bigint")])
        );
        let failed_sql = format!(
            "UPDATE job_files SET error = TRUE, error_msg = coalesce(e.m, '') \
             FROM {} AS e \
             WHERE job_files.path = e.p AND NOT job_files.ready AND NOT job_files.error \
             RETURNING job_files.job_id, job_files.path",
            json_rows(b, "$1", &[("p", "text"), ("m", "text")])
        );
        // Each job's counts move by what the batch did to its files; the jobs that are now
        // complete come back.
        let settle_sql = format!(
            "UPDATE jobs SET settled_files = settled_files + d.settled, \
                 failed_files = failed_files + d.failed \
             FROM {} AS d WHERE jobs.job_id = d.id \
             RETURNING jobs.job_id, \
                 jobs.state <> 'done' AND jobs.total_files > 0 \
                 AND jobs.settled_files >= jobs.total_files",
            json_rows(
                b,
                "$1",
                &[
                    ("id", "bigint"),
                    ("settled", "bigint"),
                    ("failed", "bigint")
                ]
            )
        );
        // Their callbacks, decided once (the outbox is keyed by job).
        let complete_sql = format!(
            "INSERT INTO notify_outbox (job_id, notify_url, return_code, total_files, \
                 ready_files, error_files, comment, attempts, next_attempt_ms, created_ms) \
             SELECT j.job_id, j.notify_url, \
                    CASE WHEN j.failed_files > 0 THEN {failed} ELSE {ok} END, j.total_files, \
                    j.settled_files - j.failed_files, j.failed_files, '', 0, $2, $2 \
             FROM jobs j WHERE j.job_id IN {ids} AND j.state <> 'done' AND j.total_files > 0 \
                 AND j.settled_files >= j.total_files \
             ON CONFLICT (job_id) DO NOTHING RETURNING job_id",
            failed = codes::FILE_ERRORS,
            ok = codes::SUCCESS,
            ids = json_values(b, "$1", "bigint"),
        );
        let done_sql = format!(
            "UPDATE jobs SET state = 'done', return_code = o.return_code, next_stage_ms = NULL, \
                 updated_ms = $2, lease_owner = NULL, lease_until_ms = NULL \
             FROM notify_outbox o \
             WHERE o.job_id = jobs.job_id AND jobs.state <> 'done' AND jobs.job_id IN {}",
            json_values(b, "$1", "bigint")
        );
        // One row per path, in path order (index probes in order): the earliest ready
        // time, and one of the error messages.
        let mut ready_rows: BTreeMap<&str, i64> = BTreeMap::new();
        for e in &ready {
            ready_rows
                .entry(e.path.as_str())
                .and_modify(|t| *t = (*t).min(e.at_ms))
                .or_insert(e.at_ms);
        }
        let mut failed_rows: BTreeMap<&str, &str> = BTreeMap::new();
        for e in &failed {
            failed_rows
                .entry(e.path.as_str())
                .or_insert(e.error.as_deref().unwrap_or(""));
        }
        let ready_json = serde_json::to_string(&ready_rows.into_iter().collect::<Vec<_>>())
            .expect("strings and integers always serialize");
        let failed_json = serde_json::to_string(&failed_rows.into_iter().collect::<Vec<_>>())
            .expect("strings always serialize");
        let now = now_ms();

        let (changed, completed) = in_tx!(b, tx => {
            // (job, path, made ready, had failed before)
            let mut changed: Vec<(i64, String, bool, bool)> = Vec::new();
            if matches!(b, Backend::Postgres(_)) {
                sqlx::raw_sql(PG_PROBE_BY_INDEX).execute(&mut *tx).await?;
            }
            if !ready.is_empty() {
                let rows = sqlx::query_as::<_, (i64, String, bool)>(sqlx::AssertSqlSafe(ready_sql))
                    .bind(ready_json)
                    .fetch_all(&mut *tx)
                    .await?;
                changed.extend(rows.into_iter().map(|(j, p, was)| (j, p, true, was)));
            }
            if !failed.is_empty() {
                let rows = sqlx::query_as::<_, (i64, String)>(sqlx::AssertSqlSafe(failed_sql))
                    .bind(failed_json)
                    .fetch_all(&mut *tx)
                    .await?;
                changed.extend(rows.into_iter().map(|(j, p)| (j, p, false, false)));
            }
            // Per job: (files newly settled, change in failed files). A file READY changed
            // was either waiting (now settled) or failed (settled already, failed no more);
            // a file FAILED changed was waiting.
            let mut deltas: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
            for (job_id, _, ready, was_failed) in &changed {
                let d = deltas.entry(*job_id).or_default();
                match (ready, was_failed) {
                    (true, false) => d.0 += 1,
                    (true, true) => d.1 -= 1,
                    (false, _) => {
                        d.0 += 1;
                        d.1 += 1;
                    }
                }
            }
            let mut completed = Vec::new();
            if !deltas.is_empty() {
                let deltas: Vec<(i64, i64, i64)> =
                    deltas.into_iter().map(|(id, (s, f))| (id, s, f)).collect();
                let deltas = serde_json::to_string(&deltas).expect("integers serialize");
                let now_complete: Vec<i64> =
                    sqlx::query_as::<_, (i64, bool)>(sqlx::AssertSqlSafe(settle_sql))
                        .bind(deltas)
                        .fetch_all(&mut *tx)
                        .await?
                        .into_iter()
                        .filter_map(|(job_id, complete)| complete.then_some(job_id))
                        .collect();
                if !now_complete.is_empty() {
                    let ids = serde_json::to_string(&now_complete).expect("integers serialize");
                    completed = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(complete_sql))
                        .bind(ids)
                        .bind(now)
                        .fetch_all(&mut *tx)
                        .await?;
                }
                if !completed.is_empty() {
                    let done = serde_json::to_string(&completed).expect("integers serialize");
                    sqlx::query(sqlx::AssertSqlSafe(done_sql))
                        .bind(done)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            (changed, completed)
        });
        if !completed.is_empty() {
            self.signals.outbox.notify_one();
        }
        Ok(Applied {
            changed: changed.len() as u64,
            matched: changed.into_iter().map(|(_, path, _, _)| path).collect(),
        })
    }
}
