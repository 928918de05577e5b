//! A generic adapter for a telescope whose clients only ever send lists of files: it has no
//! observations to look up, and maps between job paths and tape paths by prefix rewriting.
//!
//! Invariant: `map-event-paths` is the inverse of `stage-paths` on job paths: an event for
//! `stage-paths([p])[0]` maps back to `p`. Names under no configured prefix are not ours.
//!
//! Settings (`[adapter.settings]`):
//! - `job_prefix` (string, default ""): job paths start with it, e.g. `ska/`; an event
//!   must map to a path under it to be ours ("" accepts every name).
//! - `stage_prefix` (string, default ""): replaces `job_prefix` in the path sent to Scout,
//!   e.g. `/archive/ska/`.
//! - `event_prefixes` (list of strings, default `[stage_prefix]`): prefixes the tape system
//!   may report names under; the first one that matches is replaced by `job_prefix`.

#[path = "../../common/report.rs"]
mod report;

use serde::Deserialize;

wit_bindgen::generate!({ path: "../../wit", world: "adapter" });

use staging::adapter::host;

struct FileList;

#[derive(Deserialize, Default)]
#[serde(default)]
struct Settings {
    job_prefix: String,
    stage_prefix: String,
    event_prefixes: Option<Vec<String>>,
}

fn settings() -> Settings {
    serde_json::from_str(&host::settings()).unwrap_or_default()
}

const SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "title": "No observations",
  "description": "This telescope has no observation lookup: send a list of files instead.",
  "not": {}
}"#;

impl Guest for FileList {
    fn info() -> Info {
        Info {
            name: "filelist".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            telescope: "any telescope sending file lists".into(),
        }
    }

    fn observation_schema() -> String {
        SCHEMA.into()
    }

    fn resolve_observation(_obs: String) -> Result<Vec<String>, ResolveError> {
        Err(ResolveError::Invalid(
            "this telescope has no observations; send a list of files".into(),
        ))
    }

    fn map_event_paths(names: Vec<String>) -> Vec<Option<String>> {
        let s = settings();
        let event_prefixes = s
            .event_prefixes
            .clone()
            .unwrap_or_else(|| vec![s.stage_prefix.clone()]);
        names
            .into_iter()
            .map(|name| {
                let rest = event_prefixes
                    .iter()
                    .find_map(|p| name.strip_prefix(p.as_str()))?;
                let path = format!("{}{rest}", s.job_prefix);
                (!rest.is_empty()).then_some(path)
            })
            .collect()
    }

    fn stage_paths(paths: Vec<String>) -> Vec<String> {
        let s = settings();
        paths
            .into_iter()
            .map(|p| match p.strip_prefix(s.job_prefix.as_str()) {
                Some(rest) => format!("{}{rest}", s.stage_prefix),
                // Not under the job prefix: the client named a tape path itself.
                None => p,
            })
            .collect()
    }

    fn failure_report(job: JobSummary) -> String {
        report::failure_report(&job)
    }

    fn callback_comment(job: JobSummary) -> String {
        report::callback_comment(&job)
    }
}

export!(FileList);
