//! The WLCG Tape REST API, from a client written from the specification: real HTTP on
//! loopback, the Scout simulator publishing recall messages to the mock Kafka cluster, the
//! real ingest, SQLite and PostgreSQL. gfal2 itself drives it in `tape_rest_gfal2`.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use staged::config::Config;
use staged_testkit::scout::FileState;

use crate::common::pipeline::{PIPELINE, Receiver, Tape, quick};
use crate::common::{Kind, TestApp, files_job, poll_until};

/// A Tape REST client as the specification describes one: it finds the endpoint through
/// the discovery document and speaks JSON.
pub struct Client {
    pub http: reqwest::Client,
    pub endpoint: String,
    pub bearer: Option<String>,
}

/// An answer: status, content type and body (JSON, or `Null` when empty).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub content_type: String,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Client {
    pub async fn discover(root: &str) -> Client {
        let http = reqwest::Client::new();
        let doc: Value = http
            .get(format!("{root}/.well-known/wlcg-tape-rest-api"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let endpoint = doc["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["version"] == "v1")
            .expect("a v1 endpoint")["uri"]
            .as_str()
            .unwrap()
            .to_string();
        Client {
            http,
            endpoint,
            bearer: None,
        }
    }

    pub async fn send(&self, method: reqwest::Method, path: &str, body: Option<&str>) -> Answer {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.endpoint));
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        if let Some(t) = &self.bearer {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let content_type = headers
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let text = resp.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{path}: not JSON: {text:?}"))
        };
        Answer {
            status,
            content_type,
            headers,
            body,
        }
    }

    pub async fn post(&self, path: &str, body: Value) -> Answer {
        self.send(reqwest::Method::POST, path, Some(&body.to_string()))
            .await
    }

    /// Submits a stage request for `paths`; returns its id.
    pub async fn stage(&self, paths: &[&str]) -> String {
        let files: Vec<Value> = paths.iter().map(|p| json!({ "path": p })).collect();
        let a = self.post("/stage", json!({ "files": files })).await;
        assert_eq!(a.status, 201, "{a:?}");
        a.body["requestId"].as_str().unwrap().to_string()
    }

    pub async fn poll(&self, id: &str) -> Answer {
        self.send(reqwest::Method::GET, &format!("/stage/{id}"), None)
            .await
    }

    /// Each file's state by path.
    pub async fn states(&self, id: &str) -> Vec<(String, String)> {
        let a = self.poll(id).await;
        assert_eq!(a.status, 200, "{a:?}");
        let mut out: Vec<(String, String)> = a.body["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["path"].as_str().unwrap().to_string(),
                    f["state"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        out.sort();
        out
    }

    /// Polls until the request has completed (`completedAt`), or panics after `limit`.
    pub async fn wait_completed(&self, id: &str, limit: Duration) -> Value {
        let mut last = Value::Null;
        let done = poll_until(limit, async || {
            last = self.poll(id).await.body;
            last.get("completedAt").is_some()
        })
        .await;
        assert!(done, "request {id} did not complete: {last}");
        last
    }
}

/// Checks an answer is an RFC 7807 problem with this status.
pub fn assert_problem(a: &Answer, status: u16) {
    assert_eq!(a.status.as_u16(), status, "{a:?}");
    assert_eq!(a.content_type, "application/problem+json", "{a:?}");
    assert_eq!(a.body["status"], status, "{a:?}");
    assert!(a.body["title"].is_string(), "{a:?}");
}

/// The facade on, loopback, no auth.
pub fn tape_rest_on(c: &mut Config) {
    c.tape_rest.enabled = true;
    c.tape_rest.sitename = "TEST-SITE".into();
}

async fn start(kind: Kind, tape: &Tape, tweak: impl FnOnce(&mut Config)) -> (TestApp, Client) {
    let app = TestApp::start_with(kind, |c| {
        quick(c);
        tape.configure(c);
        tape_rest_on(c);
        tweak(c);
    })
    .await;
    let client = Client::discover(&app.base).await;
    (app, client)
}

both_backends!(
    a_stage_request_completes_with_per_file_results,
    cancel_is_all_or_nothing_and_completes_the_request,
    a_path_in_an_asvo_job_and_a_stage_request_is_marked_in_both,
);

async fn a_stage_request_completes_with_per_file_results(kind: Kind) {
    let tape = Tape::start(|_| {}).await;
    let (app, client) = start(kind, &tape, |_| {}).await;
    assert_eq!(client.endpoint, format!("{}/api/v1", app.base));
    let doc: Value = reqwest::get(format!("{}/.well-known/wlcg-tape-rest-api", app.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["sitename"], "TEST-SITE");

    let before = chrono::Utc::now().timestamp();
    // A duplicate, a path with `..`, duplicate slashes, unknown keys, another site's
    // metadata and a diskLifetime: all tolerated; the bad path fails in the result.
    let body = json!({
        "files": [
            { "path": "/mwa/1/a.fits", "diskLifetime": "PT1H", "targetedMetadata": { "OTHER-SITE": { "x": 1 } } },
            { "path": "//mwa//1/b.fits", "colour": "blue" },
            { "path": "/mwa/1/a.fits" },
            { "path": "/mwa/1/../etc/passwd" },
        ],
        "unknownTopLevel": true,
    });
    let a = client.post("/stage/", body).await;
    assert_eq!(a.status, 201, "{a:?}");
    let id = a.body["requestId"].as_str().unwrap().to_string();
    assert!(id.len() < 128, "gfal2 holds ids of up to 127 characters");
    assert_eq!(
        a.headers["location"].to_str().unwrap(),
        format!("{}/stage/{id}", client.endpoint)
    );

    let done = client.wait_completed(&id, PIPELINE).await;
    assert_eq!(done["id"], id.as_str());
    let created = done["createdAt"].as_i64().unwrap();
    assert!(
        (before - 1..=before + 60).contains(&created),
        "createdAt is Unix seconds: {done}"
    );
    assert!(done["startedAt"].as_i64().unwrap() >= created, "{done}");
    assert!(done["completedAt"].as_i64().unwrap() >= created, "{done}");
    let files = done["files"].as_array().unwrap();
    assert_eq!(files.len(), 3, "duplicates removed: {done}");
    for f in files {
        match f["path"].as_str().unwrap() {
            "/mwa/1/a.fits" | "/mwa/1/b.fits" => {
                assert_eq!(f["state"], "COMPLETED", "{f}");
                assert!(f.get("error").is_none(), "{f}");
                assert!(f["finishedAt"].as_i64().unwrap() >= created, "{f}");
            }
            "/mwa/1/../etc/passwd" => {
                assert_eq!(f["state"], "FAILED", "{f}");
                assert!(f["error"].as_str().unwrap().contains(".."), "{f}");
            }
            other => panic!("unexpected path {other}: {done}"),
        }
    }
    // Staged under the tape system's names, the bad path never asked for.
    let staged = tape.sim.counters().staged_paths;
    assert_eq!(staged, 2, "{done}");
    // Kept after completion, for the client to poll again.
    assert_eq!(client.poll(&id).await.status, 200);
    app.stop().await;
}

async fn cancel_is_all_or_nothing_and_completes_the_request(kind: Kind) {
    // Recalls that take an hour: the files stay waiting until the test cancels them.
    let tape = Tape::start(|s| s.recall_delay = Duration::from_secs(3600)).await;
    let (app, client) = start(kind, &tape, |_| {}).await;
    let id = client.stage(&["/mwa/2/a.fits", "/mwa/2/b.fits"]).await;
    // Started once Scout has the files.
    assert!(
        poll_until(PIPELINE, async || client
            .states(&id)
            .await
            .iter()
            .all(|(_, s)| s == "STARTED"))
        .await,
        "{:?}",
        client.states(&id).await
    );

    // One path not in the request: 400, and nothing changed.
    let a = client
        .post(
            &format!("/stage/{id}/cancel"),
            json!({ "paths": ["/mwa/2/a.fits", "/mwa/2/zzz.fits"] }),
        )
        .await;
    assert_problem(&a, 400);
    assert!(
        a.body["detail"]
            .as_str()
            .unwrap()
            .contains("/mwa/2/zzz.fits"),
        "{a:?}"
    );
    assert_eq!(
        client.states(&id).await,
        vec![
            ("/mwa/2/a.fits".to_string(), "STARTED".to_string()),
            ("/mwa/2/b.fits".to_string(), "STARTED".to_string())
        ]
    );
    assert_eq!(tape.sim.counters().cancel_requests, 0);

    // One of them, with a trailing slash on the route: cancelled at Scout too (nobody else
    // wants it); the request goes on.
    let a = client
        .post(
            &format!("/stage/{id}/cancel/"),
            json!({ "paths": ["/mwa/2/a.fits"] }),
        )
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body, Value::Null, "an empty body");
    let polled = client.poll(&id).await.body;
    assert!(polled.get("completedAt").is_none(), "{polled}");
    assert_eq!(
        client.states(&id).await,
        vec![
            ("/mwa/2/a.fits".to_string(), "CANCELED".to_string()),
            ("/mwa/2/b.fits".to_string(), "STARTED".to_string())
        ]
    );
    assert_eq!(tape.sim.counters().cancel_requests, 1);

    // The last one: the request is complete.
    let a = client
        .post(
            &format!("/stage/{id}/cancel"),
            json!({ "paths": ["/mwa/2/b.fits"] }),
        )
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    let done = client.wait_completed(&id, Duration::from_secs(5)).await;
    assert!(
        done["files"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["state"] == "CANCELED" && f.get("error").is_none()),
        "{done}"
    );

    // Cancelling an unknown request: 404.
    let a = client
        .post(
            "/stage/00000000-0000-4000-8000-000000000000/cancel",
            json!({ "paths": ["/mwa/2/a.fits"] }),
        )
        .await;
    assert_problem(&a, 404);
    app.stop().await;
}

/// ... and recalled once: the request's first stage leaves out the path the ASVO job has
/// asked for already.
async fn a_path_in_an_asvo_job_and_a_stage_request_is_marked_in_both(kind: Kind) {
    let tape = Tape::start(|s| s.recall_delay = Duration::from_secs(2)).await;
    let receiver = Receiver::start().await;
    let (app, client) = start(kind, &tape, |_| {}).await;
    let (status, _) = app
        .post_job(files_job(
            7,
            ["mwa/3/shared.fits", "mwa/3/asvo.fits"],
            receiver.url(),
        ))
        .await;
    assert_eq!(status, 202);
    let waiting = poll_until(PIPELINE, async || {
        let (_, board) = app.get("/dashboard.json").await;
        board["jobs"].as_array().is_some_and(|jobs| {
            jobs.iter()
                .any(|j| j["job_id"] == 7 && j["state"] == "waiting")
        })
    })
    .await;
    assert!(waiting, "{}", app.describe(7).await);
    let id = client
        .stage(&["/mwa/3/shared.fits", "/mwa/3/own.fits"])
        .await;
    let got = receiver.wait_delivered(1, PIPELINE).await;
    assert_eq!(got.len(), 1, "{}", app.describe(7).await);
    assert_eq!(got[0].body["return_code"], 0);
    let done = client.wait_completed(&id, PIPELINE).await;
    assert!(
        done["files"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["state"] == "COMPLETED"),
        "{done}"
    );
    assert_eq!(
        tape.sim.counters().staged_paths,
        3,
        "the shared path is asked for once: {:?}",
        tape.sim.counters()
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_is_a_problem() {
    let tape = Tape::start(|s| s.recall_delay = Duration::from_secs(3600)).await;
    let (app, client) = start(Kind::Sqlite, &tape, |c| {
        c.tape_rest.max_files_per_request = 3;
        c.server.max_body_bytes = 1 << 20;
    })
    .await;
    use reqwest::Method;
    for (method, path, body, status) in [
        (Method::POST, "/stage", Some(""), 400),
        (Method::POST, "/stage", Some("{not json"), 400),
        (Method::POST, "/stage", Some("{}"), 400),
        (Method::POST, "/stage", Some(r#"{"files": []}"#), 400),
        (Method::POST, "/stage", Some(r#"{"files": "x"}"#), 400),
        (
            Method::POST,
            "/stage",
            Some(r#"{"files": [{"nopath": 1}]}"#),
            400,
        ),
        (
            Method::POST,
            "/stage",
            Some(r#"{"files": [{"path": "/a"}, {"path": "/b"}, {"path": "/c"}, {"path": "/d"}]}"#),
            400,
        ),
        (Method::GET, "/stage/no-such-id", None, 404),
        (Method::GET, "/stage/no-such-id/", None, 404),
        (Method::DELETE, "/stage/no-such-id", None, 404),
        (
            Method::POST,
            "/stage/no-such-id/cancel",
            Some(r#"{"paths": ["/a"]}"#),
            404,
        ),
        (Method::POST, "/archiveinfo", Some(r#"{"paths": []}"#), 400),
        (Method::POST, "/archiveinfo", Some("[]"), 400),
        (Method::GET, "/nothing/here", None, 404),
        (Method::PUT, "/stage", Some("{}"), 405),
        (Method::GET, "/archiveinfo", None, 405),
    ] {
        let a = client.send(method.clone(), path, body).await;
        assert_problem(&a, status);
        if status == 405 {
            assert!(a.headers.contains_key("allow"), "{method} {path}: {a:?}");
        }
    }
    let a = client.send(Method::PUT, "/stage/some-id", Some("{}")).await;
    assert_problem(&a, 405);
    assert_eq!(a.headers["allow"], "GET, DELETE");
    // An oversized body, refused by the server's own reader, is a problem too.
    let huge = format!(r#"{{"files": [{{"path": "/{}"}}]}}"#, "x".repeat(2 << 20));
    let a = client.send(Method::POST, "/stage", Some(&huge)).await;
    assert_problem(&a, 413);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_forgets_and_release_always_answers_200() {
    let tape = Tape::start(|s| s.recall_delay = Duration::from_secs(3600)).await;
    let (app, client) = start(Kind::Sqlite, &tape, |_| {}).await;
    let id = client.stage(&["/mwa/4/a.fits", "/mwa/4/b.fits"]).await;

    // gfal2 releases with a placeholder id when it has none; unknown ids are fine.
    for rid in ["gfal2-placeholder-id", "not-a-request"] {
        let a = client
            .post(
                &format!("/release/{rid}"),
                json!({ "paths": ["/mwa/4/a.fits"] }),
            )
            .await;
        assert_eq!(a.status, 200, "{rid}: {a:?}");
    }
    let a = client
        .post(
            &format!("/release/{id}/"),
            json!({ "paths": ["/mwa/4/a.fits", "/mwa/4/not-in-it.fits"] }),
        )
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(
        client.poll(&id).await.status,
        200,
        "a release keeps the request"
    );

    let a = client
        .send(reqwest::Method::DELETE, &format!("/stage/{id}"), None)
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body, Value::Null);
    assert_problem(&client.poll(&id).await, 404);
    assert_problem(
        &client
            .send(reqwest::Method::DELETE, &format!("/stage/{id}"), None)
            .await,
        404,
    );
    // Both files were cancelled at Scout: no other job wanted them.
    assert!(
        poll_until(Duration::from_secs(10), async || tape
            .sim
            .counters()
            .cancel_requests
            >= 1)
        .await
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archiveinfo_reports_locality_and_answers_a_long_list_in_part() {
    let tape = Tape::start(|_| {}).await;
    let (app, client) = start(Kind::Sqlite, &tape, |c| {
        c.tape_rest.archiveinfo_max_paths = 4;
    })
    .await;
    tape.sim.set_file("mwa/5/online.fits", FileState::Online);
    tape.sim.set_file("mwa/5/gone.fits", FileState::Missing);
    let a = client
        .post(
            "/archiveinfo/",
            json!({ "paths": [
                "/mwa/5/online.fits",
                "/mwa/5/offline.fits",
                "/mwa/5/gone.fits",
                "/mwa/5/../x",
                "/mwa/5/left-out.fits",
            ]}),
        )
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    let got = a.body.as_array().unwrap();
    assert_eq!(got.len(), 4, "the first four, never an error: {a:?}");
    assert_eq!(
        got[0],
        json!({ "path": "/mwa/5/online.fits", "locality": "DISK_AND_TAPE" })
    );
    assert_eq!(
        got[1],
        json!({ "path": "/mwa/5/offline.fits", "locality": "TAPE" })
    );
    assert_eq!(got[2]["path"], "/mwa/5/gone.fits");
    assert!(got[2]["error"].is_string(), "{a:?}");
    assert!(got[2].get("locality").is_none(), "{a:?}");
    assert!(got[3]["error"].as_str().unwrap().contains(".."), "{a:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_tokens_decide_who_may_stage_and_poll() {
    let tape = Tape::start(|s| s.recall_delay = Duration::from_secs(3600)).await;
    let (app, mut client) = start(Kind::Sqlite, &tape, |c| {
        let toml = [
            ("fts", "fts-secret-0123456789", "submit"),
            ("rucio", "rucio-secret-0123456789", "submit"),
            ("monitor", "monitor-secret-0123456789", "read"),
        ]
        .iter()
        .map(|(name, secret, scope)| {
            format!("[[server.auth.tokens]]\nname = {name:?}\nsecret = {secret:?}\nscopes = [{scope:?}]\n")
        })
        .collect::<String>()
            + "[[server.auth.tokens]]\nname = \"bursty\"\nsecret = \"bursty-secret-0123456789\"\nscopes = [\"submit\"]\nsubmit_rate = 0.1\nsubmit_burst = 2\n";
        c.server.auth = Config::parse(&toml).unwrap().server.auth;
    })
    .await;
    // No token: 401 with a challenge; a wrong one: 401.
    let a = client
        .post("/stage", json!({"files": [{"path": "/mwa/6/a"}]}))
        .await;
    assert_problem(&a, 401);
    assert!(
        a.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    client.bearer = Some("not-a-token-0123456789".into());
    assert_problem(
        &client
            .post("/stage", json!({"files": [{"path": "/mwa/6/a"}]}))
            .await,
        401,
    );
    // A read token may not stage.
    client.bearer = Some("monitor-secret-0123456789".into());
    assert_problem(
        &client
            .post("/stage", json!({"files": [{"path": "/mwa/6/a"}]}))
            .await,
        403,
    );
    // fts stages; rucio (another submitter) neither sees nor cancels its request; the
    // read token sees it.
    client.bearer = Some("fts-secret-0123456789".into());
    let id = client.stage(&["/mwa/6/a"]).await;
    assert_eq!(client.poll(&id).await.status, 200);
    client.bearer = Some("rucio-secret-0123456789".into());
    assert_problem(&client.poll(&id).await, 404);
    assert_problem(
        &client
            .post(
                &format!("/stage/{id}/cancel"),
                json!({"paths": ["/mwa/6/a"]}),
            )
            .await,
        404,
    );
    client.bearer = Some("monitor-secret-0123456789".into());
    assert_eq!(client.poll(&id).await.status, 200);
    assert_problem(
        &client
            .send(reqwest::Method::DELETE, &format!("/stage/{id}"), None)
            .await,
        403,
    );
    // Stage requests count against a token's submission rate, as ASVO's jobs do.
    client.bearer = Some("bursty-secret-0123456789".into());
    client.stage(&["/mwa/6/b"]).await;
    client.stage(&["/mwa/6/c"]).await;
    let a = client
        .post("/stage", json!({"files": [{"path": "/mwa/6/d"}]}))
        .await;
    assert_problem(&a, 429);
    assert!(a.headers.contains_key("retry-after"), "{a:?}");
    // The discovery document stays open.
    let doc = reqwest::get(format!("{}/.well-known/wlcg-tape-rest-api", app.base))
        .await
        .unwrap();
    assert_eq!(doc.status(), 200);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auth_only_loopback_clients_are_served() {
    use tower::ServiceExt;
    let db = crate::common::TestDb::new(Kind::Sqlite).await;
    let mut config = db.config();
    tape_rest_on(&mut config);
    let store = staged::store::Store::open(&staged::store::StoreOptions::from_config(
        &config.database,
        &config.jobs,
    ))
    .await
    .unwrap();
    let mut parts = staged::api::AppParts::new(store, &config);
    parts.tape_rest = staged::api::tape_rest::Facade::from_config(&config, config.server.listen)
        .unwrap()
        .map(std::sync::Arc::new);
    let router = staged::api::router(parts.into());
    let ask = |addr: &str| {
        let mut req = axum::http::Request::get("/api/v1/stage/x")
            .body(axum::body::Body::empty())
            .unwrap();
        req.extensions_mut()
            .insert(staged::api::tape_rest::principal::PeerAddr(
                addr.parse().unwrap(),
            ));
        router.clone().oneshot(req)
    };
    assert_eq!(ask("10.1.2.3:4000").await.unwrap().status(), 403);
    assert_eq!(ask("127.0.0.1:4000").await.unwrap().status(), 404);
    assert_eq!(ask("[::1]:4000").await.unwrap().status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_on_one_postgres_serve_the_same_requests() {
    let tape = Tape::start(|_| {}).await;
    let (a, client_a) = start(Kind::Postgres, &tape, |_| {}).await;
    let url = a.db.url.clone();
    let b = TestApp::start_with(Kind::Postgres, |c| {
        quick(c);
        tape.configure(c);
        tape_rest_on(c);
        c.database.url = url;
    })
    .await;
    let client_b = Client::discover(&b.base).await;
    let id = client_a.stage(&["/mwa/8/a.fits", "/mwa/8/b.fits"]).await;
    let done = client_b.wait_completed(&id, PIPELINE).await;
    assert!(
        done["files"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["state"] == "COMPLETED"),
        "{done}"
    );
    let id = client_b.stage(&["/mwa/8/c.fits"]).await;
    client_a.wait_completed(&id, PIPELINE).await;
    b.stop().await;
    a.stop().await;
}

both_backends!(gfal2_stages_polls_archives_aborts_and_releases_through_the_facade);

/// gfal2 itself, as FTS calls it: `bring_online` of several files through the facade,
/// `bring_online_poll` until the simulator's recall messages make them online,
/// `archive_poll` for their locality, `abort_bring_online` of a second request's file that
/// never arrives, and `release`.
async fn gfal2_stages_polls_archives_aborts_and_releases_through_the_facade(kind: Kind) {
    // Files on disk are reported at once; a recall from tape takes an hour, so the abort
    // below finds its file still on the way.
    let tape = Tape::start(|s| s.recall_delay = Duration::from_secs(3600)).await;
    let (app, client) = start(kind, &tape, |_| {}).await;
    let url = |p: &str| format!("{}{p}", app.base);
    let files = ["/mwa/9/a.fits", "/mwa/9/b.fits", "/mwa/9/c.fits"];
    let urls: Vec<String> = files.iter().map(|p| url(p)).collect();
    // Online on disk and archived once recalled, as Scout says.
    for p in files {
        tape.sim
            .set_file(p.trim_start_matches('/'), FileState::Online);
    }
    // A file whose recall never comes, for the abort.
    let slow = url("/mwa/9/never.fits");
    tape.sim.set_file("mwa/9/never.fits", FileState::Offline);
    let results = crate::common::gfal2::run_async(json!({ "ops": [
        { "op": "bring_online", "urls": urls, "pintime": 3600, "timeout": 60, "async": true },
        { "op": "poll_until_online", "urls": urls, "token": "$0", "timeout_s": 60, "interval_s": 0.2 },
        { "op": "archive_poll", "urls": urls },
        { "op": "release", "urls": urls, "token": "$0" },
        { "op": "release", "urls": [urls[0].clone()] },
    ]}))
    .await;
    let r = results.as_array().unwrap();
    assert_eq!(r[0]["rc"], 0, "bring_online: {results}");
    let token = r[0]["token"].as_str().unwrap().to_string();
    assert!(!token.is_empty(), "{results}");
    assert_eq!(r[1]["rc"], 1, "every file online: {results}");
    assert_eq!(r[1]["timed_out"], false, "{results}");
    assert!(
        r[1]["files"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["state"] == "online"),
        "{results}"
    );
    assert!(
        r[2]["files"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["state"] == "archived"),
        "archive_poll: {results}"
    );
    assert_eq!(r[3]["rc"], 0, "release: {results}");
    assert_eq!(r[4]["rc"], 0, "release without an id: {results}");
    // What gfal2 staged is the request the facade holds, under the same paths.
    let states = client.states(&token).await;
    assert_eq!(
        states,
        files
            .iter()
            .map(|p| (p.to_string(), "COMPLETED".to_string()))
            .collect::<Vec<_>>()
    );

    // Abort: a file still on its way is cancelled, and gfal2 sees the cancellation.
    let results = crate::common::gfal2::run_async(json!({ "ops": [
        { "op": "bring_online", "urls": [slow.clone()], "pintime": 0, "timeout": 60, "async": true },
        { "op": "poll", "urls": [slow.clone()], "token": "$0" },
        { "op": "abort", "urls": [slow.clone()], "token": "$0" },
        { "op": "poll", "urls": [slow.clone()], "token": "$0" },
    ]}))
    .await;
    let r = results.as_array().unwrap();
    assert_eq!(r[0]["rc"], 0, "{results}");
    assert_eq!(r[1]["files"][0]["state"], "pending", "{results}");
    assert_eq!(r[2]["rc"], 0, "abort: {results}");
    assert_eq!(r[3]["files"][0]["state"], "error", "{results}");
    assert_eq!(
        r[3]["files"][0]["error"]["errno"], "ECANCELED",
        "gfal2 reads the cancellation as one: {results}"
    );
    app.stop().await;
}

/// WLCG tokens, verified offline: the right scope passes; a wrong audience, an expired
/// token, another key, a path outside the scope and no token are refused; a request is
/// seen by the identity that made it and by `storage.stage:/`, not by another identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wlcg_tokens_are_verified_and_scoped_by_path() {
    use staged_testkit::jwt::{TestIssuer, now};
    let keys = tempfile::tempdir().unwrap();
    let iam = TestIssuer::rsa("https://iam.example.org/", keys.path()).unwrap();
    // Another key claiming the same issuer, and a second issuer with an EC key in a PEM file.
    let other = TestIssuer::ec("https://iam.example.org/", keys.path()).unwrap();
    let ec = TestIssuer::ec("https://ec.example.org/", keys.path()).unwrap();
    let aud = "https://tape.example.org";
    let tape = Tape::start(|s| s.recall_delay = Duration::from_secs(3600)).await;
    let jwks = iam.jwks_file().to_path_buf();
    let pem = ec.pem_file().to_path_buf();
    let (app, mut client) = start(Kind::Sqlite, &tape, |c| {
        c.tape_rest.issuers = vec![
            staged::wlcg_token::IssuerConfig {
                issuer: "https://iam.example.org/".into(),
                audiences: vec![aud.into()],
                jwks_file: Some(jwks),
                pem_files: vec![],
            },
            staged::wlcg_token::IssuerConfig {
                issuer: "https://ec.example.org/".into(),
                audiences: vec![aud.into()],
                jwks_file: None,
                pem_files: vec![pem],
            },
        ];
    })
    .await;
    let hour = Duration::from_secs(3600);
    let stage = json!({ "files": [{ "path": "/mwa/10/a.fits" }] });

    // No token, then tokens that must not pass.
    assert_problem(&client.post("/stage", stage.clone()).await, 401);
    let expired = iam.mint(json!({
        "iss": iam.issuer(), "sub": "fts", "aud": aud, "scope": "storage.stage:/mwa",
        "exp": now() - 3600, "iat": now() - 7200,
    }));
    for (why, token) in [
        (
            "wrong audience",
            iam.token("fts", "https://elsewhere.org", "storage.stage:/mwa", hour),
        ),
        ("expired", expired),
        (
            "another key",
            other.token("fts", aud, "storage.stage:/mwa", hour),
        ),
    ] {
        client.bearer = Some(token);
        let a = client.post("/stage", stage.clone()).await;
        assert_problem(&a, 401);
        assert!(a.headers.contains_key("www-authenticate"), "{why}");
    }
    // A path outside the token's scope: 403.
    client.bearer = Some(iam.token("fts", aud, "storage.stage:/mwa/11", hour));
    assert_problem(&client.post("/stage", stage.clone()).await, 403);
    // Read scope may ask for archive info, not stage.
    client.bearer = Some(iam.token("reader", aud, "storage.read:/mwa", hour));
    assert_problem(&client.post("/stage", stage.clone()).await, 403);
    assert_eq!(
        client
            .post("/archiveinfo", json!({ "paths": ["/mwa/10/a.fits"] }))
            .await
            .status,
        200
    );

    // The right scope passes; the request is its maker's.
    client.bearer = Some(iam.token("fts", aud, "storage.stage:/mwa/10", hour));
    let id = client.stage(&["/mwa/10/a.fits"]).await;
    assert_eq!(client.poll(&id).await.status, 200);
    client.bearer = Some(iam.token("rucio", aud, "storage.stage:/mwa/10", hour));
    assert_problem(&client.poll(&id).await, 404);
    assert_problem(
        &client
            .post(
                &format!("/stage/{id}/cancel"),
                json!({ "paths": ["/mwa/10/a.fits"] }),
            )
            .await,
        404,
    );
    client.bearer = Some(iam.token("ops", aud, "storage.stage:/", hour));
    assert_eq!(client.poll(&id).await.status, 200);
    // ES256, from the second issuer.
    client.bearer = Some(ec.token("fts", aud, "storage.stage:/mwa", hour));
    let ec_id = client.stage(&["/mwa/10/b.fits"]).await;
    assert_eq!(client.poll(&ec_id).await.status, 200);
    client.bearer = Some(iam.token("fts", aud, "storage.stage:/mwa/10", hour));
    assert_problem(&client.poll(&ec_id).await, 404);
    let a = client
        .post(
            &format!("/stage/{id}/cancel"),
            json!({ "paths": ["/mwa/10/a.fits"] }),
        )
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    app.stop().await;
}

both_backends!(a_stage_request_survives_kill_9_after_its_201);

/// The real binary, killed with SIGKILL right after answering 201: the request is there
/// after the restart, and completes once its files arrive.
async fn a_stage_request_survives_kill_9_after_its_201(kind: Kind) {
    use crate::common::daemon::{Daemon, free_port, write_pipeline_config};
    // Recalls that take a few seconds, so the kill comes before any file arrives.
    let tape = Tape::start(|s| s.recall_delay = Duration::from_secs(3)).await;
    let db = crate::common::TestDb::new(kind).await;
    let port = free_port();
    let config = write_pipeline_config(
        db.dir.path(),
        &db.url,
        port,
        &tape,
        &format!("g{}", rand::random::<u32>()),
        2,
        "[tape_rest]\nenabled = true\n",
    );
    let mut daemon = Daemon::start(&config, port).await;
    let client = Client::discover(&daemon.base).await;
    let paths: Vec<String> = (0..50).map(|i| format!("/mwa/12/f{i}.fits")).collect();
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    let id = client.stage(&refs).await;
    daemon.kill();
    daemon.wait_exit(Duration::from_secs(10));

    let daemon = Daemon::start(&config, port).await;
    let client = Client::discover(&daemon.base).await;
    let a = client.poll(&id).await;
    assert_eq!(a.status, 200, "the acknowledged request survives: {a:?}");
    assert_eq!(a.body["files"].as_array().unwrap().len(), 50, "{a:?}");
    let done = client.wait_completed(&id, PIPELINE).await;
    assert!(
        done["files"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["state"] == "COMPLETED"),
        "{done}\nlog:\n{}",
        daemon.log_text()
    );
    daemon.kill();
}

/// A request whose files never arrive expires like a job, its files failed with the
/// reason; a finished request is kept for `keep_finished_secs`, then forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_expire_and_are_forgotten_after_their_keep_time() {
    let tape = Tape::start(|s| s.recall_delay = Duration::from_secs(3600)).await;
    let (app, client) = start(Kind::Sqlite, &tape, |c| {
        c.jobs.expiry_secs = 2;
        c.tape_rest.keep_finished_secs = 3;
    })
    .await;
    let id = client.stage(&["/mwa/13/a.fits", "/mwa/13/b.fits"]).await;
    let done = client.wait_completed(&id, Duration::from_secs(30)).await;
    for f in done["files"].as_array().unwrap() {
        assert_eq!(f["state"], "FAILED", "{done}");
        assert!(f["error"].as_str().unwrap().contains("expired"), "{done}");
    }
    // Kept a while for its client, then gone.
    assert_eq!(client.poll(&id).await.status, 200);
    assert!(
        poll_until(Duration::from_secs(30), async || client
            .poll(&id)
            .await
            .status
            == 404)
        .await,
        "the finished request was never forgotten"
    );
    app.stop().await;
}

/// A request none of whose files can be staged is accepted (the files fail, not the
/// request) and completes at once, every file failed with its own reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_of_only_unstageable_files_completes_failed() {
    let tape = Tape::start(|_| {}).await;
    let (app, client) = start(Kind::Sqlite, &tape, |c| {
        c.tape_rest.strip_prefix = "/mwa/".into();
        c.tape_rest.add_prefix = "mwa/".into();
    })
    .await;
    let id = client
        .stage(&["/elsewhere/a.fits", "/mwa/../b.fits", "/mwa/dir/"])
        .await;
    let done = client.wait_completed(&id, Duration::from_secs(10)).await;
    let files = done["files"].as_array().unwrap();
    assert_eq!(files.len(), 3, "{done}");
    for f in files {
        assert_eq!(f["state"], "FAILED", "{done}");
        let why = f["error"].as_str().unwrap();
        let expected = match f["path"].as_str().unwrap() {
            "/elsewhere/a.fits" => "outside",
            "/mwa/../b.fits" => "segment",
            "/mwa/dir/" => "directory",
            other => panic!("unexpected path {other}: {done}"),
        };
        assert!(why.contains(expected), "{done}");
    }
    assert_eq!(
        tape.sim.counters().stage_requests,
        0,
        "nothing to ask Scout for"
    );
    // The history says it finished as a stage request, with no failure report to link.
    let (_, board) = app.get("/dashboard.json").await;
    let finished = &board["finished"][0];
    assert_eq!(finished["request_id"], id.as_str(), "{board}");
    assert!(finished["report"].is_null(), "{board}");
    app.stop().await;
}

/// `instance` is valid against the schema `name` of the OpenAPI document `doc`.
fn assert_matches_schema(doc: &Value, name: &str, instance: &Value) {
    let schema = json!({
        "$ref": format!("#/components/schemas/{name}"),
        "components": doc["components"],
    });
    let validator = jsonschema::validator_for(&schema)
        .unwrap_or_else(|e| panic!("schema {name} does not compile: {e}"));
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{instance} is not a {name}: {errors:?}");
}

/// With the facade on, `/openapi.json` documents its operations under the base path, and
/// what the facade really answers matches the schemas it gives; off, it has none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_the_facade_as_it_answers() {
    let tape = Tape::start(|_| {}).await;
    let (app, client) = start(Kind::Sqlite, &tape, |c| {
        c.tape_rest.base_path = "/tape/v1".into()
    })
    .await;
    let (status, doc) = app.get("/openapi.json").await;
    assert_eq!(status, 200);
    for (path, method) in [
        ("/.well-known/wlcg-tape-rest-api", "get"),
        ("/tape/v1/stage", "post"),
        ("/tape/v1/stage/{id}", "get"),
        ("/tape/v1/stage/{id}", "delete"),
        ("/tape/v1/stage/{id}/cancel", "post"),
        ("/tape/v1/release/{id}", "post"),
        ("/tape/v1/archiveinfo", "post"),
    ] {
        let op = &doc["paths"][path][method];
        assert!(op.is_object(), "{method} {path} missing from /openapi.json");
        assert!(
            op["security"].is_array(),
            "{method} {path} says who may call it"
        );
    }

    let discovery: Value = reqwest::get(format!("{}/.well-known/wlcg-tape-rest-api", app.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_matches_schema(&doc, "Discovery", &discovery);
    tape.sim.set_file("mwa/7/online.fits", FileState::Online);
    let a = client
        .post(
            "/stage",
            json!({ "files": [{ "path": "/mwa/7/a.fits", "diskLifetime": "PT1H" }, { "path": "/mwa/7/../b" }] }),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    assert_matches_schema(&doc, "StageCreated", &a.body);
    let id = a.body["requestId"].as_str().unwrap().to_string();
    let done = client.wait_completed(&id, PIPELINE).await;
    assert_matches_schema(&doc, "StageStatus", &done);
    let a = client
        .post(
            "/archiveinfo",
            json!({ "paths": ["/mwa/7/online.fits", "/mwa/7/../x"] }),
        )
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_matches_schema(&doc, "ArchiveInfo", &a.body[0]);
    assert_matches_schema(&doc, "ArchiveInfo", &a.body[1]);
    let missing = client.poll("no-such-request").await;
    assert_problem(&missing, 404);
    assert_matches_schema(&doc, "ProblemBody", &missing.body);
    // A schema that does not fit is told apart: the check above can fail.
    let mut wrong = done.clone();
    wrong["files"][0]["state"] = "CANCELLED".into();
    let schema =
        json!({ "$ref": "#/components/schemas/StageStatus", "components": doc["components"] });
    assert!(!jsonschema::validator_for(&schema).unwrap().is_valid(&wrong));
    app.stop().await;

    let plain = TestApp::start(Kind::Sqlite).await;
    let (_, doc) = plain.get("/openapi.json").await;
    let paths = doc["paths"].as_object().unwrap();
    assert!(
        !paths
            .keys()
            .any(|p| p.contains("stage") || p.contains("wlcg")),
        "no facade, nothing of it documented: {:?}",
        paths.keys().collect::<Vec<_>>()
    );
    plain.stop().await;
}
