//! The wire shapes of the ASVO-compatible API (see `shared/spec/compat.md` and the original's
//! OpenAPI document). Field names, types and nesting are part of the contract.

use std::collections::BTreeMap;

use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::store::FileRow;

/// A new staging job.
#[derive(Debug, Deserialize, ToSchema)]
pub struct NewJob {
    /// Integer job id, chosen by the client.
    pub job_id: i64,
    /// Paths to stage. Wins over `obs` when both are given.
    #[serde(default)]
    pub files: Option<Vec<String>>,
    /// URL called with the job's result.
    pub notify_url: String,
    /// Telescope-specific observation whose files should be staged.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub obs: Option<Map<String, Value>>,
}

/// The state of one job.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobStatus {
    pub job_id: i64,
    /// Unix seconds when the job was created.
    pub created: i64,
    /// Every file is either staged or failed.
    pub completed: bool,
    pub total_files: i64,
    pub ready_files: i64,
    pub error_files: i64,
    /// Unix seconds of the newest ready file, 0 if none.
    pub last_readytime: i64,
    /// path -> [ready, error, readytime or null]; empty unless `include_files`.
    #[schema(value_type = Object)]
    pub files: FilesMap,
}

/// Serialized as a JSON object in row order, without building a map in memory (jobs can
/// hold 100,000 files).
#[derive(Debug, Default)]
pub enum FilesMap {
    #[default]
    Empty,
    /// Rows from the store; the time is in milliseconds.
    Rows(Vec<FileRow>),
    /// Rows built from a failure report: (path, ready, error, readytime seconds).
    Report(Vec<(String, bool, bool, Option<i64>)>),
}

impl Serialize for FilesMap {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            FilesMap::Empty => s.serialize_map(Some(0))?.end(),
            FilesMap::Rows(rows) => {
                let mut m = s.serialize_map(Some(rows.len()))?;
                for r in rows {
                    let t = r.ready_ms.map(|ms| ms / 1000);
                    m.serialize_entry(&r.path, &(r.ready, r.error, t))?;
                }
                m.end()
            }
            FilesMap::Report(rows) => {
                let mut m = s.serialize_map(Some(rows.len()))?;
                for (path, ready, error, t) in rows {
                    m.serialize_entry(path, &(ready, error, t))?;
                }
                m.end()
            }
        }
    }
}

/// All jobs: job id -> [job_id, created, ready_files, total_files, completed,
/// last_readytime, error_files, sample_filename].
#[derive(Debug, Serialize, ToSchema)]
pub struct JobList {
    #[schema(value_type = Object)]
    pub jobs: BTreeMap<i64, Vec<Value>>,
}

/// Job and file totals, Kafka liveness and the tape cache's state.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct GlobalStatistics {
    /// Unix seconds when the Kafka consumer last answered; null when unknown.
    pub kafkad_heartbeat: Option<f64>,
    pub kafka_alive: bool,
    /// Unix seconds of the last message about a known file; null when none.
    pub last_message: Option<f64>,
    pub completed_jobs: i64,
    pub incomplete_jobs: i64,
    pub ready_files: i64,
    pub error_files: i64,
    pub waiting_files: i64,
    /// Scout cache figures; null when Scout does not answer.
    pub availdatasz: Option<i64>,
    pub health: Option<i64>,
    pub healthstatus: Option<String>,
    pub releaseable: Option<i64>,
    pub totdatasz: Option<i64>,
    pub nonreleaseable: Option<i64>,
    pub pending: Option<i64>,
    /// Not in the original: where the Kafka consumer stands (null without Kafka). What
    /// `kafka_alive` is decided from.
    pub kafka_consumer: Option<KafkaConsumerStats>,
}

/// The Kafka consumer's group membership, lag and stalls (an addition to the original's
/// statistics).
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct KafkaConsumerStats {
    /// A settled member of its consumer group.
    pub in_group: bool,
    /// Partitions assigned to this daemon; null until known.
    pub assigned_partitions: Option<i64>,
    /// Messages waiting on those partitions past the committed offsets; null until known.
    pub lag: Option<i64>,
    /// Unix seconds since when the consumer is stalled (messages wait and none is
    /// committed, or no settled group membership, for `kafka.stall_secs`); null when not.
    pub stalled_since: Option<f64>,
    /// Stalls since the daemon started.
    pub stalls: u64,
    /// Recall messages not taken as a job's recall because they completed before the job
    /// asked for the file.
    pub stale_messages: u64,
    /// Malformed messages skipped since the daemon started.
    pub malformed_messages: u64,
    /// Offset commits that failed since the daemon started (their messages are read again,
    /// which changes nothing).
    pub commit_failures: u64,
}

/// Every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorResult {
    pub errormsg: String,
}
