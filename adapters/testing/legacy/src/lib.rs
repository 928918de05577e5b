//! An adapter built against `staging:adapter@1.0.0` (`wit/1.0.0/adapter.wit`), so that the
//! host's tests prove that components built before 1.1.0 still load and work: every export
//! is called through the host's 1.0.0 bindings, with the host's current `host` interface
//! serving the 1.0.0 imports.
//!
//! It resolves an observation from the observation itself: `{"files": [...]}` gives those
//! files, `{"fail": "invalid" | "not-found" | "lookup-failed"}` each error case of 1.0.0
//! (it has no `unavailable`). Paths under `legacy/` are its own; the others are not.

#[path = "../../../common/report.rs"]
mod report;

use serde::Deserialize;

wit_bindgen::generate!({ path: "../../../wit/1.0.0", world: "adapter" });

use staging::adapter::host::{self, Level};

struct Legacy;

const SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "title": "Legacy observation",
  "type": "object",
  "properties": {
    "files": {"type": "array", "items": {"type": "string"}},
    "fail": {"enum": ["invalid", "not-found", "lookup-failed"]}
  }
}"#;

#[derive(Deserialize)]
struct Obs {
    #[serde(default)]
    files: Vec<String>,
    fail: Option<String>,
}

impl Guest for Legacy {
    fn info() -> Info {
        Info {
            name: "legacy".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            telescope: "a telescope whose adapter predates contract 1.1".into(),
        }
    }

    fn observation_schema() -> String {
        SCHEMA.into()
    }

    fn resolve_observation(obs: String) -> Result<Vec<String>, ResolveError> {
        let obs: Obs = serde_json::from_str(&obs)
            .map_err(|e| ResolveError::Invalid(format!("not a legacy observation: {e}")))?;
        match obs.fail.as_deref() {
            Some("invalid") => Err(ResolveError::Invalid("asked to be invalid".into())),
            Some("not-found") => Err(ResolveError::NotFound("asked to find nothing".into())),
            Some(other) => Err(ResolveError::LookupFailed(format!(
                "asked to fail: {other}"
            ))),
            None if obs.files.is_empty() => Err(ResolveError::NotFound("no files given".into())),
            None => {
                host::log(Level::Info, &format!("resolved {} files", obs.files.len()));
                Ok(obs.files)
            }
        }
    }

    fn map_event_paths(names: Vec<String>) -> Vec<Option<String>> {
        names
            .into_iter()
            .map(|n| n.starts_with("legacy/").then_some(n))
            .collect()
    }

    fn stage_paths(paths: Vec<String>) -> Vec<String> {
        paths
    }

    fn failure_report(job: JobSummary) -> String {
        report::failure_report(&job)
    }

    fn callback_comment(job: JobSummary) -> String {
        report::callback_comment(&job)
    }
}

export!(Legacy);
