//! Store side of Kafka ingest: one batch of recall events in, what it did out.
//!
//! Invariants:
//! - A batch's changes, and the callbacks of the jobs it completed, are written in one
//!   transaction ([`Store::apply_ingest_batch`]); re-applying a batch changes nothing.
//! - What the batch's rows are, and how the files it changed move each job's counts, is
//!   decided by pure functions ([`fold_events`], [`job_deltas`]); the SQL decides which
//!   files change.
//! - On the ingest path, an event that completed before a job asked for the file (its
//!   `CompleteTime` older than the job's creation by more than the allowed clock skew) does
//!   not settle that job's file: a replayed topic (a new consumer group, expired or lost
//!   offsets) must not pass an old recall off as this job's. The job's own stage request,
//!   made after it was stored, makes the tape system report the file again with a fresh
//!   time (at once when it is still on disk), and that event settles it.
//! - The counts of events about paths no job holds, and of stale events, are figures for
//!   metrics only: they are read after the transaction, and only for the paths that changed
//!   nothing, so they never decide what is written and cost nothing when every event was
//!   wanted.

use std::collections::{BTreeMap, HashSet};

use super::{
    Backend, FileEvent, JobState, Store, StoreError, codes, in_tx, json_rows, json_values, now_ms,
    requests,
};

const DONE: &str = JobState::Done.as_str();

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
    /// Events that changed nothing because they completed before a job waiting for the
    /// path asked for it.
    pub stale: u64,
}

/// A batch of events as its statements read them: one row per path, in path order (index
/// probes in order).
#[derive(Debug, Default, PartialEq, Eq)]
struct Folded<'a> {
    /// Paths reported staged: (path, earliest time, latest time).
    ready: Vec<(&'a str, i64, i64)>,
    /// Paths reported failed: (path, the first event's message, latest time).
    failed: Vec<(&'a str, &'a str, i64)>,
}

/// Folds a batch into its rows. A path's events in one batch travel as their earliest and
/// latest times (whatever their order): the latest decides whether the event is stale for a
/// job, the earliest that is not becomes the file's ready time. A failed path keeps one of
/// its messages. A path both staged and failed in one batch is in both lists; the staged
/// row is applied first, and a ready file ignores failures.
fn fold_events(events: &[FileEvent]) -> Folded<'_> {
    let mut ready: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    let mut failed: BTreeMap<&str, (&str, i64)> = BTreeMap::new();
    for e in events {
        match &e.error {
            None => {
                ready
                    .entry(e.path.as_str())
                    .and_modify(|(first, last)| {
                        *first = (*first).min(e.at_ms);
                        *last = (*last).max(e.at_ms);
                    })
                    .or_insert((e.at_ms, e.at_ms));
            }
            Some(message) => {
                failed
                    .entry(e.path.as_str())
                    .and_modify(|(_, last)| *last = (*last).max(e.at_ms))
                    .or_insert((message.as_str(), e.at_ms));
            }
        }
    }
    Folded {
        ready: ready
            .into_iter()
            .map(|(p, (first, last))| (p, first, last))
            .collect(),
        failed: failed
            .into_iter()
            .map(|(p, (m, last))| (p, m, last))
            .collect(),
    }
}

/// What a batch did to one job file, as the statements report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileChange {
    /// The file became ready; `had_failed`: it had been reported failed before.
    Ready { had_failed: bool },
    /// The waiting file failed.
    Failed,
}

/// How a batch moves one job's counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct JobDelta {
    /// Files newly settled (ready or failed, from waiting).
    settled: i64,
    /// Change in failed files.
    failed: i64,
}

/// The change in each job's counts from the files a batch changed, by job id. A file made
/// ready was either waiting (now settled) or failed (settled already, failed no more); a
/// file made failed was waiting. A job none of whose files changed is absent.
fn job_deltas(changes: impl IntoIterator<Item = (i64, FileChange)>) -> BTreeMap<i64, JobDelta> {
    let mut deltas: BTreeMap<i64, JobDelta> = BTreeMap::new();
    for (job_id, change) in changes {
        let d = deltas.entry(job_id).or_default();
        match change {
            FileChange::Ready { had_failed: false } => d.settled += 1,
            FileChange::Ready { had_failed: true } => d.failed -= 1,
            FileChange::Failed => {
                d.settled += 1;
                d.failed += 1;
            }
        }
    }
    deltas
}

/// What applying events did to the store.
struct Applied {
    /// Job files whose state changed.
    changed: u64,
    /// Paths that changed at least one job file.
    matched: HashSet<String>,
}

/// Queues the callbacks of the ASVO jobs among the job ids bound at `$1` whose files are
/// all settled and that are not yet done (once: the outbox is keyed by job); `$2` is now.
/// Returns the jobs queued.
fn queue_callbacks_sql(b: &Backend) -> String {
    format!(
        "INSERT INTO notify_outbox (job_id, notify_url, return_code, total_files, \
             ready_files, error_files, comment, attempts, next_attempt_ms, created_ms) \
         SELECT j.job_id, j.notify_url, \
                CASE WHEN j.failed_files > 0 THEN {failed} ELSE {ok} END, j.total_files, \
                j.settled_files - j.failed_files, j.failed_files, '', 0, $2, $2 \
         FROM jobs j WHERE j.job_id IN {ids} AND j.state <> '{DONE}' AND j.total_files > 0 \
             AND j.settled_files >= j.total_files AND j.request_id IS NULL \
         ON CONFLICT (job_id) DO NOTHING RETURNING job_id",
        failed = codes::FILE_ERRORS,
        ok = codes::SUCCESS,
        ids = json_values(b, "$1", "bigint"),
    )
}

/// Marks done the jobs bound at `$1` whose callbacks are queued; `$2` is now.
fn callbacks_queued_sql(b: &Backend) -> String {
    format!(
        "UPDATE jobs SET state = '{DONE}', return_code = o.return_code, next_stage_ms = NULL, \
             updated_ms = $2, lease_owner = NULL, lease_until_ms = NULL \
         FROM notify_outbox o \
         WHERE o.job_id = jobs.job_id AND jobs.state <> '{DONE}' AND jobs.job_id IN {}",
        json_values(b, "$1", "bigint")
    )
}

impl Store {
    /// Completes the jobs among `job_ids` whose files are all settled and that are not yet
    /// done, as the ingest would have: for a job every file of which was settled without an
    /// event (a stage request whose files all failed at submission).
    pub async fn complete_settled(&self, job_ids: &[i64]) -> Result<(), StoreError> {
        if job_ids.is_empty() {
            return Ok(());
        }
        let b = &self.backend;
        let ids = serde_json::to_string(job_ids).expect("integers serialize");
        let now = now_ms();
        let queued = in_tx!(b, tx => {
            let queued: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(queue_callbacks_sql(b)))
                .bind(&ids).bind(now).fetch_all(&mut *tx).await?;
            if !queued.is_empty() {
                sqlx::query(sqlx::AssertSqlSafe(callbacks_queued_sql(b)))
                    .bind(&ids).bind(now).execute(&mut *tx).await?;
            }
            sqlx::query(sqlx::AssertSqlSafe(requests::completed_history_sql(b)))
                .bind(&ids).bind(now).execute(&mut *tx).await?;
            sqlx::query(sqlx::AssertSqlSafe(requests::complete_sql(b)))
                .bind(&ids).bind(now).execute(&mut *tx).await?;
            queued.len()
        });
        if queued > 0 {
            self.signals.outbox.notify_one();
        }
        Ok(())
    }

    /// Applies `events` (one transaction) as the ingest does: an event older than a job's
    /// creation by more than `skew_ms` does not settle that job's file. Counts the events
    /// about paths no job holds, and the stale ones.
    pub async fn apply_ingest_batch(
        &self,
        events: &[FileEvent],
        skew_ms: i64,
    ) -> Result<IngestOutcome, StoreError> {
        let applied = self.apply(events, Some(skew_ms.max(0))).await?;
        // A path that changed nothing is held by no job, already settled (a duplicate or a
        // redelivery), or waited for by jobs younger than the event; only those need
        // looking up.
        let mut idle: BTreeMap<&str, i64> = BTreeMap::new();
        for e in events {
            if !applied.matched.contains(e.path.as_str()) {
                idle.entry(e.path.as_str())
                    .and_modify(|t| *t = (*t).max(e.at_ms))
                    .or_insert(e.at_ms);
            }
        }
        if idle.is_empty() {
            return Ok(IngestOutcome {
                changed: applied.changed,
                ..IngestOutcome::default()
            });
        }
        let idle: Vec<(&str, i64)> = idle.into_iter().collect();
        let (unknown, stale) = self.idle_paths(&idle, skew_ms.max(0)).await?;
        let count = |set: &HashSet<String>| {
            events
                .iter()
                .filter(|e| set.contains(e.path.as_str()))
                .count() as u64
        };
        Ok(IngestOutcome {
            changed: applied.changed,
            unknown: count(&unknown),
            stale: count(&stale),
        })
    }

    /// Of `paths` (each with its newest event time), those no job holds, and those a job
    /// still waits for that was created after that time (less `skew_ms`).
    async fn idle_paths(
        &self,
        paths: &[(&str, i64)],
        skew_ms: i64,
    ) -> Result<(HashSet<String>, HashSet<String>), StoreError> {
        let sql = format!(
            "SELECT e.p, \
                 NOT EXISTS (SELECT 1 FROM job_files f WHERE f.path = e.p), \
                 EXISTS (SELECT 1 FROM job_files f JOIN jobs j ON j.job_id = f.job_id \
                         WHERE f.path = e.p AND NOT f.ready AND e.t < j.created_ms - $2) \
             FROM {} AS e",
            json_rows(&self.backend, "$1", &[("p", "text"), ("t", "bigint")])
        );
        let json = serde_json::to_string(paths).expect("strings and integers serialize");
        let rows: Vec<(String, bool, bool)> = super::with_pool!(&self.backend, p =>
            sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(json).bind(skew_ms).fetch_all(p).await?);
        let mut unknown = HashSet::new();
        let mut stale = HashSet::new();
        for (path, is_unknown, is_stale) in rows {
            if is_unknown {
                unknown.insert(path);
            } else if is_stale {
                stale.insert(path);
            }
        }
        Ok((unknown, stale))
    }

    /// Applies a batch of tape-system events in one transaction, to every job holding each
    /// path. A staged event makes the file ready (once: the first ready time stays); an
    /// error marks it failed unless it is already ready. Re-applying a batch changes nothing.
    ///
    /// In the same transaction, every job the batch made complete (all files ready or
    /// failed) gets its callback queued (code 0, or 5 when a file failed), so completion
    /// never waits for a periodic sweep. Returns the number of job files whose state changed.
    ///
    /// Every event counts, whatever its time; the ingest uses [`Store::apply_ingest_batch`],
    /// which ignores events older than the jobs they would settle.
    #[cfg(any(test, feature = "test-support"))]
    pub async fn apply_file_events(&self, events: &[FileEvent]) -> Result<u64, StoreError> {
        Ok(self.apply(events, None).await?.changed)
    }

    /// `skew_ms`: when given, an event settles only the files of jobs created no later
    /// than `skew_ms` after it.
    async fn apply(
        &self,
        events: &[FileEvent],
        skew_ms: Option<i64>,
    ) -> Result<Applied, StoreError> {
        let folded = fold_events(events);
        let b = &self.backend;
        // Each statement reads its events as one JSON array of rows, one row per path
        // (see `fold_events`).
        // A failed file keeps its (never empty) message when it later becomes ready, so
        // `error_msg IS NOT NULL` on a row READY changed means it had been settled already.
        // With a skew, each file's job is joined (one primary-key probe per file changed)
        // for its creation time.
        let ready_cols = [("p", "text"), ("t", "bigint"), ("t1", "bigint")];
        let ready_sql = match skew_ms {
            None => format!(
                "UPDATE job_files SET ready = TRUE, error = FALSE, \
                     ready_ms = coalesce(job_files.ready_ms, e.t) \
                 FROM {} AS e \
                 WHERE job_files.path = e.p AND NOT job_files.ready \
                 RETURNING job_files.job_id, job_files.path, job_files.error_msg IS NOT NULL",
                json_rows(b, "$1", &ready_cols)
            ),
            Some(_) => format!(
                "UPDATE job_files SET ready = TRUE, error = FALSE, \
                     ready_ms = coalesce(job_files.ready_ms, \
                         CASE WHEN e.t >= j.created_ms - $2 THEN e.t ELSE e.t1 END) \
                 FROM {} AS e, jobs AS j \
                 WHERE job_files.path = e.p AND NOT job_files.ready \
                     AND j.job_id = job_files.job_id AND e.t1 >= j.created_ms - $2 \
                 RETURNING job_files.job_id, job_files.path, job_files.error_msg IS NOT NULL",
                json_rows(b, "$1", &ready_cols)
            ),
        };
        let failed_cols = [("p", "text"), ("m", "text"), ("t1", "bigint")];
        let failed_sql = match skew_ms {
            None => format!(
                "UPDATE job_files SET error = TRUE, error_msg = coalesce(e.m, ''), error_ms = e.t1 \
                 FROM {} AS e \
                 WHERE job_files.path = e.p AND NOT job_files.ready AND NOT job_files.error \
                 RETURNING job_files.job_id, job_files.path",
                json_rows(b, "$1", &failed_cols)
            ),
            Some(_) => format!(
                "UPDATE job_files SET error = TRUE, error_msg = coalesce(e.m, ''), error_ms = e.t1 \
                 FROM {} AS e, jobs AS j \
                 WHERE job_files.path = e.p AND NOT job_files.ready AND NOT job_files.error \
                     AND j.job_id = job_files.job_id AND e.t1 >= j.created_ms - $2 \
                 RETURNING job_files.job_id, job_files.path",
                json_rows(b, "$1", &failed_cols)
            ),
        };
        // Each job's counts move by what the batch did to its files; the jobs that are now
        // complete come back.
        let settle_sql = format!(
            "UPDATE jobs SET settled_files = settled_files + d.settled, \
                 failed_files = failed_files + d.failed \
             FROM {} AS d WHERE jobs.job_id = d.id \
             RETURNING jobs.job_id, \
                 jobs.state <> '{DONE}' AND jobs.total_files > 0 \
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
        let complete_sql = queue_callbacks_sql(b);
        let done_sql = callbacks_queued_sql(b);
        let ready_json =
            serde_json::to_string(&folded.ready).expect("strings and integers always serialize");
        let failed_json =
            serde_json::to_string(&folded.failed).expect("strings and integers always serialize");
        let skew = skew_ms.unwrap_or(0);
        let now = now_ms();

        let (changed, completed) = in_tx!(b, tx => {
            let mut changed: Vec<(i64, String, FileChange)> = Vec::new();
            if matches!(b, Backend::Postgres(_)) {
                sqlx::raw_sql(PG_PROBE_BY_INDEX).execute(&mut *tx).await?;
            }
            if !folded.ready.is_empty() {
                let mut q = sqlx::query_as::<_, (i64, String, bool)>(sqlx::AssertSqlSafe(ready_sql))
                    .bind(ready_json);
                if skew_ms.is_some() {
                    q = q.bind(skew);
                }
                let rows = q.fetch_all(&mut *tx).await?;
                changed.extend(
                    rows.into_iter()
                        .map(|(j, p, had_failed)| (j, p, FileChange::Ready { had_failed })),
                );
            }
            if !folded.failed.is_empty() {
                let mut q = sqlx::query_as::<_, (i64, String)>(sqlx::AssertSqlSafe(failed_sql))
                    .bind(failed_json);
                if skew_ms.is_some() {
                    q = q.bind(skew);
                }
                let rows = q.fetch_all(&mut *tx).await?;
                changed.extend(rows.into_iter().map(|(j, p)| (j, p, FileChange::Failed)));
            }
            let deltas = job_deltas(changed.iter().map(|(job_id, _, change)| (*job_id, *change)));
            let mut completed = Vec::new();
            if !deltas.is_empty() {
                let deltas: Vec<(i64, i64, i64)> =
                    deltas.into_iter().map(|(id, d)| (id, d.settled, d.failed)).collect();
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
                if !now_complete.is_empty() && completed.len() < now_complete.len() {
                    let ids = serde_json::to_string(&now_complete).expect("integers serialize");
                    sqlx::query(sqlx::AssertSqlSafe(requests::complete_sql(b)))
                        .bind(&ids).bind(now).execute(&mut *tx).await?;
                    sqlx::query(sqlx::AssertSqlSafe(requests::completed_history_sql(b)))
                        .bind(&ids).bind(now).execute(&mut *tx).await?;
                }
            }
            (changed, completed)
        });
        if !completed.is_empty() {
            self.signals.outbox.notify_one();
        }
        Ok(Applied {
            changed: changed.len() as u64,
            matched: changed.into_iter().map(|(_, path, _)| path).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(path: &str, at_ms: i64) -> FileEvent {
        FileEvent {
            path: path.into(),
            at_ms,
            error: None,
        }
    }

    fn failed(path: &str, at_ms: i64, message: &str) -> FileEvent {
        FileEvent {
            path: path.into(),
            at_ms,
            error: Some(message.into()),
        }
    }

    #[test]
    fn an_empty_batch_has_no_rows() {
        assert_eq!(fold_events(&[]), Folded::default());
    }

    #[test]
    fn rows_are_one_per_path_in_path_order() {
        let events = [
            ready("c", 1),
            ready("a", 2),
            failed("b", 3, "x"),
            ready("b/1", 4),
        ];
        let folded = fold_events(&events);
        assert_eq!(folded.ready, vec![("a", 2, 2), ("b/1", 4, 4), ("c", 1, 1)]);
        assert_eq!(folded.failed, vec![("b", "x", 3)]);
    }

    #[test]
    fn a_redelivered_event_adds_no_row() {
        let events = [
            ready("a", 5),
            ready("a", 5),
            failed("b", 6, "x"),
            failed("b", 6, "x"),
        ];
        let folded = fold_events(&events);
        assert_eq!(folded.ready, vec![("a", 5, 5)]);
        assert_eq!(folded.failed, vec![("b", "x", 6)]);
    }

    #[test]
    fn a_path_travels_as_its_earliest_and_latest_time_whatever_the_order() {
        let events = [ready("a", 30), ready("a", 10), ready("a", 20)];
        assert_eq!(fold_events(&events).ready, vec![("a", 10, 30)]);
        let events = [failed("b", 30, "late"), failed("b", 10, "early")];
        assert_eq!(
            fold_events(&events).failed,
            vec![("b", "late", 30)],
            "the first event's message, the latest time"
        );
    }

    #[test]
    fn a_path_staged_and_failed_in_one_batch_is_in_both_lists() {
        let events = [failed("a", 2, "x"), ready("a", 1)];
        let folded = fold_events(&events);
        assert_eq!(folded.ready, vec![("a", 1, 1)]);
        assert_eq!(folded.failed, vec![("a", "x", 2)]);
    }

    #[test]
    fn no_changed_file_moves_no_job() {
        // Unknown paths, stale events and files settled already change no file: the
        // statements report nothing for them.
        assert!(job_deltas([]).is_empty());
    }

    #[test]
    fn a_waiting_file_made_ready_is_settled() {
        let d = job_deltas([(1, FileChange::Ready { had_failed: false })]);
        assert_eq!(
            d[&1],
            JobDelta {
                settled: 1,
                failed: 0
            }
        );
    }

    #[test]
    fn a_waiting_file_failed_is_settled_and_failed() {
        let d = job_deltas([(1, FileChange::Failed)]);
        assert_eq!(
            d[&1],
            JobDelta {
                settled: 1,
                failed: 1
            }
        );
    }

    #[test]
    fn a_failed_file_made_ready_was_settled_already() {
        let d = job_deltas([(1, FileChange::Ready { had_failed: true })]);
        assert_eq!(
            d[&1],
            JobDelta {
                settled: 0,
                failed: -1
            }
        );
    }

    #[test]
    fn changes_add_up_per_job() {
        let d = job_deltas([
            (2, FileChange::Failed),
            (1, FileChange::Ready { had_failed: false }),
            (2, FileChange::Ready { had_failed: true }),
            (1, FileChange::Failed),
            // A shared path changes a file of each job holding it.
            (3, FileChange::Ready { had_failed: false }),
            (2, FileChange::Ready { had_failed: false }),
        ]);
        assert_eq!(
            d.into_iter().collect::<Vec<_>>(),
            vec![
                (
                    1,
                    JobDelta {
                        settled: 2,
                        failed: 1
                    }
                ),
                (
                    2,
                    JobDelta {
                        settled: 2,
                        failed: 0
                    }
                ),
                (
                    3,
                    JobDelta {
                        settled: 1,
                        failed: 0
                    }
                ),
            ]
        );
    }
}
