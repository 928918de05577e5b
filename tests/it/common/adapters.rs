//! Shared by the adapter tests: the freshly built components (host/build.rs builds them into
//! `STAGED_ADAPTERS_DIR`), configs pointing at them, and the testkit's simulator of the MWA
//! metadata service with the answers these tests look for.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use staged::config::AdapterConfig;
use staged_testkit::metadata::{self, Answer, Answers, Queries};

pub fn wasm(name: &str) -> PathBuf {
    PathBuf::from(env!("STAGED_ADAPTERS_DIR")).join(format!("adapter_{name}.wasm"))
}

/// Tight bounds so that hostile calls end quickly in tests.
pub fn adapter_config(name: &str) -> AdapterConfig {
    AdapterConfig {
        wasm: Some(wasm(name)),
        call_timeout_ms: 1000,
        memory_limit_bytes: 16 * 1024 * 1024,
        max_output_bytes: 1024 * 1024,
        http_timeout_ms: 500,
        http_max_response_bytes: 64 * 1024,
        ..AdapterConfig::default()
    }
}

pub fn settings(pairs: &[(&str, &str)]) -> toml::Table {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), toml::Value::String(v.to_string())))
        .collect()
}

/// The metadata service simulator. Observation ids pick the answer:
/// - 1000: four files covering bucket/folder nulls and a leading slash in folder;
/// - 2000: one VCS file (the query's time window is what is checked);
/// - 404 / 500: that status; 777: a body over the tests' response limit; 888: too slow;
/// - 999 (and any other): a 200 that is not JSON; 555: `{}` (no files).
pub struct MetadataSim {
    /// The `data_files_url` to configure.
    pub base: String,
    pub queries: Queries,
    sim: metadata::MetadataSim,
}

impl MetadataSim {
    pub async fn start() -> MetadataSim {
        let sim = Answers::default()
            .observation(
                1000,
                Answer::Json(json!({
                    "1000_ch001.fits": {"bucket": "mwaingest-1000", "folder": "/mwa/ingest/1000", "size": 1},
                    "1000_flags.zip": {"bucket": null, "folder": "1000"},
                    "1000_metafits.fits": {"bucket": "mwaingest-1000", "folder": null},
                    "1000_orphan.dat": {"bucket": null, "folder": null}
                })),
            )
            .observation(
                2000,
                Answer::Json(json!({
                    "2000_1200_ch1.sub": {"bucket": "vcs", "folder": "2000/1200"}
                })),
            )
            .observation(555, Answer::Json(json!({})))
            .observation(404, Answer::not_found())
            .observation(500, Answer::Status(500, "database down".into()))
            .observation(777, Answer::Text("x".repeat(200 * 1024)))
            .observation(
                888,
                Answer::Delayed(Duration::from_secs(5), Box::new(Answer::Json(json!({})))),
            )
            .otherwise(Answer::Text("not json".into()))
            .start()
            .await
            .expect("starting the metadata simulator");
        MetadataSim {
            base: sim.data_files_url(),
            queries: sim.queries.clone(),
            sim,
        }
    }

    /// The allow-list entry for this simulator (host and port).
    pub fn allow(&self) -> String {
        self.sim.allow()
    }

    pub fn last_query(&self) -> HashMap<String, String> {
        self.sim.last_query()
    }
}
