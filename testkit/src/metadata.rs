//! A stand-in for the MWA metadata service's `data_files` endpoint, on a real loopback
//! socket.
//!
//! It answers `GET /metadata/data_files?obs_id=N&...` with the [`Answer`] it was given for
//! observation `N`: by default the files of an observation in the production shape (a JSON
//! object keyed by file name, each with `bucket` and `folder`), 400 for an observation it was
//! told to refuse, and 404 for any other; a test can also have it answer any status, any
//! JSON, a body that is not JSON, or answer late. A query without an integer `obs_id` is 400.
//! Every query is recorded, in order, before it is answered. It can be started on a given
//! address, so that a test can take the service away and bring it back where the adapter
//! expects it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;

/// The path the service answers on.
const PATH: &str = "/metadata/data_files";

/// One observation's files: (file name, bucket, folder).
pub type ObsFiles = Vec<(String, Option<String>, Option<String>)>;

/// Every query the simulator received, in order.
pub type Queries = Arc<Mutex<Vec<HashMap<String, String>>>>;

/// What the simulator answers for one observation.
#[derive(Debug, Clone)]
pub enum Answer {
    /// 200 with these files in the production shape.
    Files(ObsFiles),
    /// 200 with this JSON body as it is.
    Json(Value),
    /// 200 with this body, sent as text (for answers that are not JSON).
    Text(String),
    /// This status with this text body.
    Status(u16, String),
    /// The answer, after this delay.
    Delayed(Duration, Box<Answer>),
}

impl Answer {
    /// 400 "observation refused", as the service answers for an observation it rejects.
    pub fn refused() -> Answer {
        Answer::Status(400, "observation refused".into())
    }

    /// 404 "no such observation", the answer for an observation it does not know.
    pub fn not_found() -> Answer {
        Answer::Status(404, "no such observation".into())
    }
}

/// The answers, by observation, a simulator is started with.
#[derive(Debug, Clone)]
pub struct Answers {
    by_obs: HashMap<i64, Answer>,
    otherwise: Answer,
}

impl Default for Answers {
    fn default() -> Self {
        Answers {
            by_obs: HashMap::new(),
            otherwise: Answer::not_found(),
        }
    }
}

impl Answers {
    /// Answers `answer` for observation `obs_id`.
    pub fn observation(mut self, obs_id: i64, answer: Answer) -> Answers {
        self.by_obs.insert(obs_id, answer);
        self
    }

    /// Answers `answer` for every observation not given (default: [`Answer::not_found`]).
    pub fn otherwise(mut self, answer: Answer) -> Answers {
        self.otherwise = answer;
        self
    }

    /// Serves these answers on a free loopback port.
    pub async fn start(self) -> std::io::Result<MetadataSim> {
        self.start_at(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Serves these answers on `addr`.
    pub async fn start_at(self, addr: SocketAddr) -> std::io::Result<MetadataSim> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let queries = Queries::default();
        let app = Router::new()
            .route(PATH, get(data_files))
            .with_state(Arc::new(Known {
                answers: self,
                queries: queries.clone(),
            }));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(MetadataSim {
            addr,
            queries,
            task,
        })
    }
}

/// A running simulator; it stops serving when dropped.
pub struct MetadataSim {
    pub addr: SocketAddr,
    /// Every query received, in order.
    pub queries: Queries,
    task: tokio::task::JoinHandle<()>,
}

struct Known {
    answers: Answers,
    queries: Queries,
}

impl MetadataSim {
    /// Answers with these observations' files, 404 for any other.
    pub async fn start(observations: HashMap<i64, ObsFiles>) -> std::io::Result<MetadataSim> {
        Self::start_at(SocketAddr::from(([127, 0, 0, 1], 0)), observations, []).await
    }

    /// Serves on `addr`, answering 400 for the observations in `refused` (even if they also
    /// have files).
    pub async fn start_at(
        addr: SocketAddr,
        observations: HashMap<i64, ObsFiles>,
        refused: impl IntoIterator<Item = i64>,
    ) -> std::io::Result<MetadataSim> {
        let mut answers = Answers::default();
        for (id, files) in observations {
            answers = answers.observation(id, Answer::Files(files));
        }
        for id in refused {
            answers = answers.observation(id, Answer::refused());
        }
        answers.start_at(addr).await
    }

    /// The URL to configure as the MWA adapter's `data_files_url`.
    pub fn data_files_url(&self) -> String {
        format!("http://{}{PATH}", self.addr)
    }

    /// The adapter's HTTP allow-list entry for this simulator (host and port).
    pub fn allow(&self) -> String {
        self.addr.to_string()
    }

    /// The last query received.
    ///
    /// # Panics
    /// If there was none: a test asking for it expected one.
    pub fn last_query(&self) -> HashMap<String, String> {
        self.queries
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the metadata simulator received no query")
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
    known.queries.lock().unwrap().push(q.clone());
    let Some(id) = q.get("obs_id").and_then(|v| v.parse::<i64>().ok()) else {
        return (StatusCode::BAD_REQUEST, "obs_id is required").into_response();
    };
    let answer = known
        .answers
        .by_obs
        .get(&id)
        .unwrap_or(&known.answers.otherwise);
    respond(answer).await
}

async fn respond(mut answer: &Answer) -> Response {
    loop {
        return match answer {
            Answer::Delayed(delay, then) => {
                tokio::time::sleep(*delay).await;
                answer = then;
                continue;
            }
            Answer::Files(files) => {
                let body: Map<String, Value> = files
                    .iter()
                    .map(|(name, bucket, folder)| {
                        (name.clone(), json!({"bucket": bucket, "folder": folder}))
                    })
                    .collect();
                axum::Json(Value::Object(body)).into_response()
            }
            Answer::Json(v) => axum::Json(v.clone()).into_response(),
            Answer::Text(body) => body.clone().into_response(),
            Answer::Status(code, body) => {
                let code = StatusCode::from_u16(*code).expect("an HTTP status code (100..=999)");
                (code, body.clone()).into_response()
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(sim: &MetadataSim, query: &str) -> (u16, String) {
        let r = reqwest::get(format!("{}?{query}", sim.data_files_url()))
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    #[tokio::test]
    async fn answers_files_refusals_and_unknowns_and_records_every_query() {
        let files = vec![("a.fits".to_string(), Some("b".to_string()), None)];
        let sim = MetadataSim::start_at(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            HashMap::from([(1, files.clone()), (2, files)]),
            [2],
        )
        .await
        .unwrap();
        let (status, body) = get(&sim, "obs_id=1&x=y").await;
        assert_eq!(status, 200);
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap(),
            json!({"a.fits": {"bucket": "b", "folder": null}})
        );
        assert_eq!(sim.last_query()["x"], "y");
        assert_eq!(
            get(&sim, "obs_id=2").await.0,
            400,
            "refused wins over files"
        );
        assert_eq!(get(&sim, "obs_id=3").await.0, 404);
        assert_eq!(get(&sim, "obs_id=soon").await.0, 400);
        assert_eq!(sim.queries.lock().unwrap().len(), 4);
        assert_eq!(sim.allow(), sim.addr.to_string());
    }

    #[tokio::test]
    async fn delayed_and_raw_answers() {
        let sim = Answers::default()
            .observation(
                1,
                Answer::Delayed(
                    Duration::from_millis(200),
                    Box::new(Answer::Status(503, "busy".into())),
                ),
            )
            .otherwise(Answer::Text("not json".into()))
            .start()
            .await
            .unwrap();
        let started = std::time::Instant::now();
        assert_eq!(get(&sim, "obs_id=1").await, (503, "busy".into()));
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(get(&sim, "obs_id=9").await, (200, "not json".into()));
    }
}
