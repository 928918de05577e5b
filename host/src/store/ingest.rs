//! Store side of Kafka ingest: one batch of recall events in, what it did out.
//!
//! Invariant: the batch's changes are written by [`Store::apply_file_events`] in one
//! transaction; the count of events about paths no job holds is a separate read taken just
//! before it, so it is a figure for metrics only and never decides what is written.

use std::collections::HashSet;

use super::{Backend, FileEvent, Store, StoreError};

/// What one applied batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngestOutcome {
    /// Job files whose state changed.
    pub changed: u64,
    /// Events whose path no job holds.
    pub unknown: u64,
}

impl Store {
    /// Applies `events` (one transaction) and counts those about paths no job holds.
    pub async fn apply_ingest_batch(
        &self,
        events: &[FileEvent],
    ) -> Result<IngestOutcome, StoreError> {
        let unknown = self.unknown_paths(events).await?;
        let unknown = if unknown.is_empty() {
            0
        } else {
            events
                .iter()
                .filter(|e| unknown.contains(e.path.as_str()))
                .count() as u64
        };
        let changed = self.apply_file_events(events).await?;
        Ok(IngestOutcome { changed, unknown })
    }

    /// The distinct paths among `events` that no job holds.
    pub async fn unknown_paths(&self, events: &[FileEvent]) -> Result<HashSet<String>, StoreError> {
        if events.is_empty() {
            return Ok(HashSet::new());
        }
        let rows: Vec<String> = match &self.backend {
            Backend::Sqlite(p) => {
                const SQL: &str = "SELECT e.p FROM (SELECT DISTINCT value AS p FROM json_each($1)) e \
                     WHERE NOT EXISTS (SELECT 1 FROM job_files f WHERE f.path = e.p)";
                let paths: Vec<&str> = events.iter().map(|e| e.path.as_str()).collect();
                let json = serde_json::to_string(&paths).expect("strings serialize");
                sqlx::query_scalar(SQL).bind(json).fetch_all(p).await?
            }
            Backend::Postgres(p) => {
                const SQL: &str = "SELECT e.p FROM (SELECT DISTINCT p FROM UNNEST($1::text[]) AS u(p)) e \
                     WHERE NOT EXISTS (SELECT 1 FROM job_files f WHERE f.path = e.p)";
                let paths: Vec<&str> = events.iter().map(|e| e.path.as_str()).collect();
                sqlx::query_scalar(SQL).bind(paths).fetch_all(p).await?
            }
        };
        Ok(rows.into_iter().collect())
    }
}
