//! The Murchison Widefield Array adapter: the original staging service's MWA logic behind
//! `staging:adapter@1.1.0`.
//!
//! A metadata service that cannot be asked now (no connection, no answer in time, a 5xx)
//! is `unavailable`, so the job waits for it; only an answer that says no or cannot be
//! read is `lookup-failed`.
//!
//! Invariant: a job path is `mwa/<bucket>/<folder>/<file>` (empty parts skipped), whichever
//! way it was reached: from an observation lookup, or from a tape-system event name, which
//! may be relative to the tape mount point (`mount_prefix`). `stage-paths` gives Scout the
//! same path under the mount prefix, so Scout's events map back onto the job's paths.
//!
//! Settings (`[adapter.settings]`):
//! - `data_files_url` (string, required to resolve observations): the MWA metadata
//!   service's `data_files` endpoint (the original's DATA_FILES_URL).
//! - `mount_prefix` (string, default none): the tape system's mount point, e.g. `/vss`;
//!   Scout is sent `<mount_prefix>/<job path>` and events under it are mapped back.

#[path = "../../common/report.rs"]
mod report;

use serde::Deserialize;

wit_bindgen::generate!({ path: "../../wit", world: "adapter" });

use staging::adapter::host::{self, Level};

struct Mwa;

const SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "title": "MWA observation",
  "description": "An MWA observation: every file of obs_id, or for a VCS observation only those between start_time and start_time + duration (GPS seconds) when both are non-zero.",
  "type": "object",
  "properties": {
    "obs_id": {"type": "integer", "minimum": 1, "description": "Observation id (GPS seconds of its start)"},
    "start_time": {"type": "integer", "minimum": 0, "default": 0, "description": "VCS only: first GPS second wanted, 0 = unset"},
    "duration": {"type": "integer", "minimum": 0, "default": 0, "description": "VCS only: seconds wanted from start_time, 0 = unset"}
  },
  "required": ["obs_id"]
}"#;

#[derive(Deserialize)]
struct Obs {
    obs_id: u64,
    #[serde(default)]
    start_time: u64,
    #[serde(default)]
    duration: u64,
}

#[derive(Deserialize, Default)]
struct Settings {
    data_files_url: Option<String>,
    mount_prefix: Option<String>,
}

/// One entry of the `data_files` answer; other fields are ignored.
#[derive(Deserialize)]
struct DataFile {
    bucket: Option<String>,
    folder: Option<String>,
}

fn settings() -> Settings {
    // The host hands over a JSON object; unknown keys are someone else's business.
    serde_json::from_str(&host::settings()).unwrap_or_default()
}

/// The mount prefix without trailing slashes; `None` when unset or just "/".
fn mount_prefix(s: &Settings) -> Option<String> {
    let p = s.mount_prefix.as_deref()?.trim_end_matches('/');
    (!p.is_empty()).then(|| p.to_string())
}

fn job_path(file: &str, f: &DataFile) -> String {
    let folder = f.folder.as_deref().map(|d| d.trim_start_matches('/'));
    let parts = [
        "mwa",
        f.bucket.as_deref().unwrap_or(""),
        folder.unwrap_or(""),
        file,
    ];
    parts
        .iter()
        .map(|p| p.trim_matches('/'))
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("/")
}

/// Percent-encodes a query value (the URL already holds the endpoint's own query, if any).
fn query_url(base: &str, obs: &Obs) -> String {
    let sep = if base.contains('?') { '&' } else { '?' };
    let mut url = format!("{base}{sep}obs_id={}&location=3", obs.obs_id);
    if obs.start_time != 0 && obs.duration != 0 {
        let max = obs.start_time.saturating_add(obs.duration);
        url.push_str(&format!("&mintime={}&maxtime={max}", obs.start_time));
    }
    url.push_str("&terse=true&all_files=false");
    url
}

impl Guest for Mwa {
    fn info() -> Info {
        Info {
            name: "mwa".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            telescope: "Murchison Widefield Array".into(),
        }
    }

    fn observation_schema() -> String {
        SCHEMA.into()
    }

    fn resolve_observation(obs: String) -> Result<Vec<String>, ResolveError> {
        let obs: Obs = serde_json::from_str(&obs)
            .map_err(|e| ResolveError::Invalid(format!("not an MWA observation: {e}")))?;
        let Some(base) = settings().data_files_url else {
            return Err(ResolveError::LookupFailed(
                "the adapter setting data_files_url is not configured".into(),
            ));
        };
        let url = query_url(&base, &obs);
        let answer = host::http_get(&url).map_err(|e| {
            let why = format!("data_files lookup for {}: {e}", obs.obs_id);
            if e.starts_with("refused: ") {
                ResolveError::LookupFailed(why)
            } else {
                ResolveError::Unavailable(why)
            }
        })?;
        match answer.status {
            200 => {}
            404 => {
                return Err(ResolveError::NotFound(format!(
                    "no files found for observation {}",
                    obs.obs_id
                )));
            }
            s @ 500..=599 => {
                return Err(ResolveError::Unavailable(format!(
                    "data_files lookup for {} answered HTTP {s}",
                    obs.obs_id
                )));
            }
            s => {
                return Err(ResolveError::LookupFailed(format!(
                    "data_files lookup for {} answered HTTP {s}",
                    obs.obs_id
                )));
            }
        }
        let files: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&answer.body).map_err(|e| {
                ResolveError::LookupFailed(format!(
                    "data_files answer for {} is not a JSON object: {e}",
                    obs.obs_id
                ))
            })?;
        let mut paths = Vec::with_capacity(files.len());
        for (name, entry) in files {
            let entry: DataFile = serde_json::from_value(entry).map_err(|e| {
                ResolveError::LookupFailed(format!("data_files entry {name:?}: {e}"))
            })?;
            paths.push(job_path(&name, &entry));
        }
        if paths.is_empty() {
            return Err(ResolveError::NotFound(format!(
                "no files found for observation {}",
                obs.obs_id
            )));
        }
        host::log(
            Level::Debug,
            &format!("observation {} has {} files", obs.obs_id, paths.len()),
        );
        Ok(paths)
    }

    fn map_event_paths(names: Vec<String>) -> Vec<Option<String>> {
        let prefix = mount_prefix(&settings());
        names
            .into_iter()
            .map(|name| {
                // Absolute under the mount point, or already relative to it.
                let rel = match &prefix {
                    Some(p) => name
                        .strip_prefix(p.as_str())
                        .and_then(|r| r.strip_prefix('/'))
                        .unwrap_or(&name),
                    None => &name,
                };
                let rel = rel.trim_start_matches('/');
                rel.starts_with("mwa/").then(|| rel.to_string())
            })
            .collect()
    }

    fn stage_paths(paths: Vec<String>) -> Vec<String> {
        match mount_prefix(&settings()) {
            Some(p) => paths
                .into_iter()
                .map(|path| format!("{p}/{}", path.trim_start_matches('/')))
                .collect(),
            None => paths,
        }
    }

    fn failure_report(job: JobSummary) -> String {
        report::failure_report(&job)
    }

    fn callback_comment(job: JobSummary) -> String {
        report::callback_comment(&job)
    }
}

export!(Mwa);
