//! A stand-in for the MWA metadata service's `data_files` endpoint, for `staged demo` and
//! benchmarks: it answers `GET /metadata/data_files?obs_id=N&...` with the files of the
//! observations it was given, in the production shape (a JSON object keyed by file name,
//! each with `bucket` and `folder`), 400 for the observations it was told to refuse, and
//! 404 for any other. It can be started on a given address, so that a test can take the
//! service away and bring it back where the adapter expects it.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;

/// One observation's files: (file name, bucket, folder).
pub type ObsFiles = Vec<(String, Option<String>, Option<String>)>;

pub struct MetadataSim {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

struct Known {
    observations: HashMap<i64, ObsFiles>,
    refused: HashSet<i64>,
}

impl MetadataSim {
    pub async fn start(observations: HashMap<i64, ObsFiles>) -> std::io::Result<MetadataSim> {
        Self::start_at("127.0.0.1:0".parse().expect("an address"), observations, []).await
    }

    /// Serves on `addr`, answering 400 for the observations in `refused`.
    pub async fn start_at(
        addr: SocketAddr,
        observations: HashMap<i64, ObsFiles>,
        refused: impl IntoIterator<Item = i64>,
    ) -> std::io::Result<MetadataSim> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let known = Known {
            observations,
            refused: refused.into_iter().collect(),
        };
        let app = Router::new()
            .route("/metadata/data_files", get(data_files))
            .with_state(Arc::new(known));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(MetadataSim { addr, task })
    }

    /// The URL to configure as the MWA adapter's `data_files_url`.
    pub fn data_files_url(&self) -> String {
        format!("http://{}/metadata/data_files", self.addr)
    }
}

impl Drop for MetadataSim {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn data_files(
    State(known): State<Arc<Known>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let Some(id) = q.get("obs_id").and_then(|v| v.parse::<i64>().ok()) else {
        return (StatusCode::BAD_REQUEST, "obs_id is required").into_response();
    };
    if known.refused.contains(&id) {
        return (StatusCode::BAD_REQUEST, "observation refused").into_response();
    }
    match known.observations.get(&id) {
        Some(files) => {
            let body: Map<String, Value> = files
                .iter()
                .map(|(name, bucket, folder)| {
                    (name.clone(), json!({"bucket": bucket, "folder": folder}))
                })
                .collect();
            axum::Json(Value::Object(body)).into_response()
        }
        None => (StatusCode::NOT_FOUND, "no such observation").into_response(),
    }
}
