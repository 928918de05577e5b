//! Shared by the adapter tests: the freshly built components (host/build.rs builds them into
//! `STAGED_ADAPTERS_DIR`), configs pointing at them, and a simulator of the MWA metadata
//! service's `data_files` endpoint on a real loopback socket.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use staged::config::AdapterConfig;

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

/// Every query the simulator received, in order.
pub type Queries = Arc<Mutex<Vec<HashMap<String, String>>>>;

/// The metadata service simulator. Observation ids pick the answer:
/// - 1000: four files covering bucket/folder nulls and a leading slash in folder;
/// - 2000: one VCS file (the query's time window is what is checked);
/// - 404 / 500: that status; 777: a body over the tests' response limit; 888: too slow;
/// - 999: a 200 that is not JSON; 555: `{}` (no files).
pub struct MetadataSim {
    pub base: String,
    pub queries: Queries,
    task: tokio::task::JoinHandle<()>,
}

impl MetadataSim {
    pub async fn start() -> MetadataSim {
        let queries: Queries = Arc::default();
        let app = axum::Router::new()
            .route("/metadata/data_files", axum::routing::get(data_files))
            .with_state(queries.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        MetadataSim {
            base: format!("http://{addr}/metadata/data_files"),
            queries,
            task,
        }
    }

    /// The allow-list entry for this simulator (host and port).
    pub fn allow(&self) -> String {
        let url = url::Url::parse(&self.base).unwrap();
        format!("{}:{}", url.host_str().unwrap(), url.port().unwrap())
    }

    pub fn last_query(&self) -> HashMap<String, String> {
        self.queries
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a query")
    }
}

impl Drop for MetadataSim {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn data_files(
    State(queries): State<Queries>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    queries.lock().unwrap().push(q.clone());
    let obs = q.get("obs_id").map(String::as_str).unwrap_or("");
    match obs {
        "1000" => axum::Json(json!({
            "1000_ch001.fits": {"bucket": "mwaingest-1000", "folder": "/mwa/ingest/1000", "size": 1},
            "1000_flags.zip": {"bucket": null, "folder": "1000"},
            "1000_metafits.fits": {"bucket": "mwaingest-1000", "folder": null},
            "1000_orphan.dat": {"bucket": null, "folder": null}
        }))
        .into_response(),
        "2000" => axum::Json(json!({
            "2000_1200_ch1.sub": {"bucket": "vcs", "folder": "2000/1200"}
        }))
        .into_response(),
        "555" => axum::Json(json!({})).into_response(),
        "404" => (StatusCode::NOT_FOUND, "no such observation").into_response(),
        "500" => (StatusCode::INTERNAL_SERVER_ERROR, "database down").into_response(),
        "777" => "x".repeat(200 * 1024).into_response(),
        "888" => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            axum::Json(json!({})).into_response()
        }
        _ => "not json".into_response(),
    }
}
