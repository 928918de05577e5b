//! The HTTP contract ASVO depends on (shared/spec/compat.md), over real HTTP on loopback,
//! against SQLite and PostgreSQL.

use std::collections::BTreeSet;
use std::io::{Read, Write};

use crate::common::{Kind, TestApp};
use crate::common::{NO_CALLBACK, files_job, obs_job};
use serde_json::{Value, json};
use staged::store::FileEvent;

both_backends!(
    post_get_delete_round_trip,
    every_path_answers_with_and_without_trailing_slash,
    duplicate_is_403,
    fifty_concurrent_posts_of_one_id_give_one_202,
    neither_files_nor_obs_is_400_unless_duplicate,
    unparsable_and_mistyped_bodies_are_422,
    bad_query_parameters_are_422,
    oversized_body_is_413,
    bad_files_and_notify_url_are_400,
    file_states_are_reported,
    job_list_and_stats,
    failure_reports_are_served,
    observation_jobs_need_an_adapter,
    unknown_paths_and_methods_are_json,
);

fn new_job(id: i64, files: &[&str]) -> Value {
    files_job(id, files, NO_CALLBACK)
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

fn assert_errormsg(v: &Value, contains: &str) {
    let msg = v["errormsg"]
        .as_str()
        .unwrap_or_else(|| panic!("no errormsg in {v}"));
    assert!(
        msg.contains(contains),
        "{msg:?} should contain {contains:?}"
    );
}

async fn post_get_delete_round_trip(kind: Kind) {
    let app = TestApp::start(kind).await;
    let (status, body) = app
        .post_job(new_job(10, &["mwa/a/1", "mwa/a/2", "mwa/a/1"]))
        .await;
    assert_eq!((status, body), (202, Value::Null));

    let (status, s) = app.get("/staging/?job_id=10").await;
    assert_eq!(status, 200);
    assert_eq!(
        keys(&s),
        [
            "job_id",
            "created",
            "completed",
            "total_files",
            "ready_files",
            "error_files",
            "last_readytime",
            "files"
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    );
    assert_eq!(s["job_id"], 10);
    assert_eq!(s["total_files"], 2, "a path named twice counts once");
    assert_eq!(s["ready_files"], 0);
    assert_eq!(s["error_files"], 0);
    assert_eq!(s["completed"], false);
    assert_eq!(s["last_readytime"], 0);
    assert_eq!(s["files"], json!({}));
    let created = s["created"].as_i64().unwrap();
    let now = staged::store::now_ms() / 1000;
    assert!((now - created).abs() < 60);

    let (_, s) = app.get("/staging/?job_id=10&include_files=true").await;
    assert_eq!(
        s["files"],
        json!({"mwa/a/1": [false, false, null], "mwa/a/2": [false, false, null]})
    );

    let r = app
        .http
        .delete(app.url("/staging/?job_id=10"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), Value::Null);
    let (status, body) = app.get("/staging/?job_id=10").await;
    assert_eq!(status, 404);
    assert_errormsg(&body, "Job 10 not found");
    let r = app
        .http
        .delete(app.url("/staging?job_id=10"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_errormsg(&r.json().await.unwrap(), "Job 10 not found");
    app.stop().await;
}

async fn every_path_answers_with_and_without_trailing_slash(kind: Kind) {
    let app = TestApp::start(kind).await;
    let (status, _) = app.post_job(new_job(1, &["x"])).await;
    assert_eq!(status, 202);
    let r = app
        .http
        .post(app.url("/staging"))
        .json(&new_job(2, &["y"]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    for (path, expected) in [
        ("/ping", 200),
        ("/get_stats", 200),
        ("/get_joblist", 200),
        ("/get_failed_joblist", 200),
        ("/get_failed_job?job_id=1", 404),
        ("/staging?job_id=1", 200),
        ("/staging?job_id=99", 404),
    ] {
        let slashed = path.replacen('?', "/?", 1);
        let slashed = if slashed.contains('?') {
            slashed
        } else {
            format!("{path}/")
        };
        let (a, body_a) = app.get(path).await;
        let (b, body_b) = app.get(&slashed).await;
        assert_eq!((a, b), (expected, expected), "{path} vs {slashed}");
        if !path.starts_with("/get_stats") && !path.starts_with("/staging?job_id=1") {
            assert_eq!(body_a, body_b, "{path}");
        }
    }
    let (_, ping) = app.get("/ping/").await;
    assert_eq!(ping, Value::Null);
    let r = app
        .http
        .delete(app.url("/staging?job_id=2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    app.stop().await;
}

async fn duplicate_is_403(kind: Kind) {
    let app = TestApp::start(kind).await;
    assert_eq!(app.post_job(new_job(5, &["a"])).await.0, 202);
    let (status, body) = app.post_job(new_job(5, &["b"])).await;
    assert_eq!(status, 403);
    assert_eq!(
        body,
        json!({"errormsg": "Can't create job 5, because it already exists."})
    );
    let (_, s) = app.get("/staging/?job_id=5&include_files=1").await;
    assert_eq!(
        s["files"],
        json!({"a": [false, false, null]}),
        "the loser changed nothing"
    );
    app.stop().await;
}

async fn fifty_concurrent_posts_of_one_id_give_one_202(kind: Kind) {
    let app = TestApp::start(kind).await;
    let url = app.url("/staging/");
    let mut tasks = Vec::new();
    for i in 0..50 {
        let http = app.http.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let path = format!("f/{i}");
            let r = http
                .post(url)
                .json(&new_job(77, &[&path]))
                .send()
                .await
                .unwrap();
            r.status().as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 202).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 403).count(),
        49,
        "{statuses:?}"
    );
    let (_, s) = app.get("/staging/?job_id=77").await;
    assert_eq!(s["total_files"], 1);
    app.stop().await;
}

async fn neither_files_nor_obs_is_400_unless_duplicate(kind: Kind) {
    let app = TestApp::start(kind).await;
    for body in [
        json!({"job_id": 3, "notify_url": "http://h/cb"}),
        files_job(3, Vec::<String>::new(), "http://h/cb"),
        json!({"job_id": 3, "notify_url": "http://h/cb", "files": null, "obs": null}),
        obs_job(3, json!({}), "http://h/cb"),
    ] {
        let (status, err) = app.post_job(body.clone()).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(
            err["errormsg"],
            "Error for job 3: Must specify either an observation, or a list of files"
        );
    }
    assert_eq!(app.get("/staging/?job_id=3").await.0, 404, "nothing stored");
    // The original checks for an existing id first.
    assert_eq!(app.post_job(new_job(3, &["a"])).await.0, 202);
    let (status, _) = app
        .post_job(json!({"job_id": 3, "notify_url": "http://h/cb"}))
        .await;
    assert_eq!(status, 403);
    app.stop().await;
}

async fn unparsable_and_mistyped_bodies_are_422(kind: Kind) {
    let app = TestApp::start(kind).await;
    let cases: &[(&str, &str)] = &[
        ("{not json", "body"),
        ("", "body"),
        ("[]", "body"),
        (
            r#"{"job_id": "x", "notify_url": "http://h/cb", "files": ["a"]}"#,
            "job_id",
        ),
        (
            r#"{"job_id": 1.5, "notify_url": "http://h/cb", "files": ["a"]}"#,
            "job_id",
        ),
        (
            r#"{"job_id": 1, "notify_url": "http://h/cb", "files": "a"}"#,
            "files",
        ),
        (
            r#"{"job_id": 1, "notify_url": "http://h/cb", "files": ["a", 2]}"#,
            "files",
        ),
        (r#"{"job_id": 1, "files": ["a"]}"#, "notify_url"),
        (r#"{"notify_url": "http://h/cb", "files": ["a"]}"#, "job_id"),
        (
            r#"{"job_id": 1, "notify_url": "http://h/cb", "obs": 5}"#,
            "obs",
        ),
        (
            r#"{"job_id": 99999999999999999999, "notify_url": "http://h/cb", "files": ["a"]}"#,
            "job_id",
        ),
    ];
    for (body, field) in cases {
        let r = app
            .http
            .post(app.url("/staging/"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 422, "{body}");
        let v: Value = r.json().await.unwrap();
        assert!(
            v["errormsg"].as_str().unwrap().contains(field),
            "{body}: {v}"
        );
        let detail = &v["detail"][0];
        assert!(detail["loc"].is_array() && detail["msg"].is_string(), "{v}");
    }
    let (_, list) = app.get("/get_joblist/").await;
    assert_eq!(list, json!({"jobs": {}}), "nothing stored");
    app.stop().await;
}

async fn bad_query_parameters_are_422(kind: Kind) {
    let app = TestApp::start(kind).await;
    assert_eq!(app.post_job(new_job(1, &["a"])).await.0, 202);
    for path in [
        "/staging/",
        "/staging/?job_id=",
        "/staging/?job_id=abc",
        "/staging/?job_id=1.0",
        "/staging/?job_id=1&include_files=maybe",
        "/get_failed_job/?job_id=x",
        "/get_failed_job/",
    ] {
        let (status, v) = app.get(path).await;
        assert_eq!(status, 422, "{path}");
        assert!(
            v["errormsg"].is_string() && v["detail"].is_array(),
            "{path}: {v}"
        );
    }
    for spelling in ["true", "True", "1", "yes", "on"] {
        let (status, v) = app
            .get(&format!("/staging/?job_id=1&include_files={spelling}"))
            .await;
        assert_eq!(status, 200);
        assert_eq!(v["files"], json!({"a": [false, false, null]}), "{spelling}");
    }
    let r = app
        .http
        .delete(app.url("/staging/?job_id=zz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    app.stop().await;
}

async fn oversized_body_is_413(kind: Kind) {
    let app = TestApp::start_with(kind, |c| c.server.max_body_bytes = 2048).await;
    let big: Vec<String> = (0..200)
        .map(|i| format!("mwa/some/long/path/{i}"))
        .collect();
    let body = files_job(1, big, "http://h/cb");
    let (status, v) = app.post_job(body).await;
    assert_eq!(status, 413);
    assert_errormsg(&v, "2048");

    // Chunked, with no Content-Length: the limit still holds and the answer is JSON.
    let addr = app.server.as_ref().unwrap().addr;
    let response = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let chunk = "x".repeat(1000);
        let mut req = String::from(
            "POST /staging/ HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        );
        for _ in 0..5 {
            req.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
        }
        req.push_str("0\r\n\r\n");
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    })
    .await
    .unwrap();
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains("errormsg"), "{response}");
    assert_eq!(app.get("/staging/?job_id=1").await.0, 404);
    // The daemon still serves.
    assert_eq!(app.post_job(new_job(2, &["ok"])).await.0, 202);
    app.stop().await;
}

async fn bad_files_and_notify_url_are_400(kind: Kind) {
    let app = TestApp::start_with(kind, |c| {
        c.server.max_files_per_job = 10;
        c.server.max_path_bytes = 64;
    })
    .await;
    let long = "p".repeat(65);
    let eleven: Vec<String> = (0..11).map(|i| format!("f{i}")).collect();
    let cases = [
        (files_job(1, ["ok", ""], "http://h/cb"), "empty"),
        (files_job(1, [long], "http://h/cb"), "longer than 64"),
        (files_job(1, ["a\u{0}b"], "http://h/cb"), "NUL"),
        // A newline would forge lines in the failure report, which lists paths one a line.
        (
            files_job(1, ["mwa/a.fits\n  mwa/forged.fits"], "http://h/cb"),
            "control character U+000A",
        ),
        (
            files_job(1, ["ok", "a\rb"], "http://h/cb"),
            "file 1 contains the control character U+000D",
        ),
        (files_job(1, ["a\u{7f}b"], "http://h/cb"), "U+007F"),
        (files_job(1, ["a\u{85}b"], "http://h/cb"), "U+0085"),
        (files_job(1, eleven, "http://h/cb"), "limit of 10"),
        (files_job(1, ["a"], "ftp://h/cb"), "notify_url"),
        (files_job(1, ["a"], "not a url"), "notify_url"),
        (files_job(1, ["a"], "http://h/\u{0}"), "notify_url"),
        (files_job(1, ["a"], ""), "notify_url"),
        // Where a cloud's metadata service answers, or the local host by another name: the
        // callback credentials must never be sent there.
        (
            files_job(1, ["a"], "http://169.254.169.254/latest/meta-data/"),
            "points at 169.254.169.254, a link-local, metadata-service",
        ),
        (
            files_job(1, ["a"], "http://[fe80::1]:8080/cb"),
            "points at fe80::1",
        ),
        (
            files_job(1, ["a"], "http://[fd00:ec2::254]/cb"),
            "points at fd00:ec2::254",
        ),
        (
            files_job(1, ["a"], "http://0.0.0.0:9/cb"),
            "points at 0.0.0.0",
        ),
        (files_job(1, ["a"], "http://[::]:9/cb"), "points at ::"),
        (
            files_job(1, ["a"], "http://[::ffff:169.254.169.254]/cb"),
            "metadata-service",
        ),
        (
            files_job(1, ["a"], "http://0xA9FEA9FE/cb"),
            "points at 169.254.169.254",
        ),
    ];
    for (body, msg) in cases {
        let (status, v) = app.post_job(body.clone()).await;
        assert_eq!(status, 400, "{body}");
        assert_errormsg(&v, msg);
    }
    assert_eq!(app.get("/staging/?job_id=1").await.0, 404, "nothing stored");
    let ten: Vec<String> = (0..10).map(|i| format!("f{i}")).collect();
    let (status, _) = app
        .post_job(files_job(1, ten, "https://h:8443/cb?x=1"))
        .await;
    assert_eq!(status, 202, "at the limit is fine");
    app.stop().await;
}

async fn file_states_are_reported(kind: Kind) {
    let app = TestApp::start(kind).await;
    assert_eq!(app.post_job(new_job(4, &["f1", "f2", "f3"])).await.0, 202);
    app.store()
        .apply_file_events(&[
            FileEvent {
                path: "f1".into(),
                at_ms: 1_700_000_000_500,
                error: None,
            },
            FileEvent {
                path: "f2".into(),
                at_ms: 1_700_000_001_000,
                error: Some("bad tape".into()),
            },
        ])
        .await
        .unwrap();
    let (_, s) = app.get("/staging/?job_id=4&include_files=true").await;
    assert_eq!(s["ready_files"], 1);
    assert_eq!(s["error_files"], 1);
    assert_eq!(s["completed"], false);
    assert_eq!(s["last_readytime"], 1_700_000_000);
    assert_eq!(
        s["files"],
        json!({
            "f1": [true, false, 1_700_000_000],
            "f2": [false, true, null],
            "f3": [false, false, null],
        })
    );
    app.store()
        .apply_file_events(&[FileEvent {
            path: "f3".into(),
            at_ms: 1_700_000_002_000,
            error: None,
        }])
        .await
        .unwrap();
    let (_, s) = app.get("/staging/?job_id=4").await;
    assert_eq!(s["completed"], true);
    assert_eq!(s["last_readytime"], 1_700_000_002);
    app.stop().await;
}

async fn job_list_and_stats(kind: Kind) {
    let app = TestApp::start(kind).await;
    assert_eq!(app.post_job(new_job(2, &["b1", "b2"])).await.0, 202);
    assert_eq!(app.post_job(new_job(1, &["a1"])).await.0, 202);
    app.store()
        .apply_file_events(&[
            FileEvent {
                path: "a1".into(),
                at_ms: 1_700_000_000_250,
                error: None,
            },
            FileEvent {
                path: "b2".into(),
                at_ms: 1_700_000_000_000,
                error: Some("x".into()),
            },
        ])
        .await
        .unwrap();
    let (status, list) = app.get("/get_joblist/").await;
    assert_eq!(status, 200);
    let jobs = list["jobs"].as_object().unwrap();
    assert_eq!(jobs.keys().collect::<Vec<_>>(), vec!["1", "2"]);
    let j1 = jobs["1"].as_array().unwrap();
    assert_eq!(j1.len(), 8);
    // [job_id, created, ready_files, total_files, completed, last_readytime, error_files, sample]
    assert_eq!(j1[0], 1);
    assert!(j1[1].as_f64().unwrap() > 1.7e9);
    assert_eq!(
        (&j1[2], &j1[3], &j1[4]),
        (&json!(1), &json!(1), &json!(true))
    );
    assert_eq!(j1[5].as_f64().unwrap(), 1_700_000_000.25);
    assert_eq!((&j1[6], &j1[7]), (&json!(0), &json!("a1")));
    let j2 = jobs["2"].as_array().unwrap();
    assert_eq!(
        (&j2[2], &j2[3], &j2[4], &j2[5], &j2[6]),
        (&json!(0), &json!(2), &json!(false), &Value::Null, &json!(1))
    );

    let (status, stats) = app.get("/get_stats/").await;
    assert_eq!(status, 200);
    assert_eq!(stats["completed_jobs"], 1);
    assert_eq!(stats["incomplete_jobs"], 1);
    assert_eq!(stats["ready_files"], 1);
    assert_eq!(stats["error_files"], 1);
    assert_eq!(stats["waiting_files"], 1);
    assert_eq!(stats["kafka_alive"], false);
    for scout in [
        "availdatasz",
        "health",
        "healthstatus",
        "releaseable",
        "totdatasz",
        "nonreleaseable",
        "pending",
    ] {
        assert_eq!(stats[scout], Value::Null, "{scout} is null without Scout");
    }
    app.stop().await;
}

async fn failure_reports_are_served(kind: Kind) {
    let app = TestApp::start(kind).await;
    let dir = app.db.dir.path().join("reports");
    let text = staged::reports::render(
        31,
        4,
        &["mwa/e1".into()],
        &["mwa/m1".into(), "mwa/m2".into()],
    );
    staged::reports::write(&dir, 31, &text).unwrap();
    staged::reports::write(
        &dir,
        30,
        &staged::reports::render(30, 1, &[], &["z".into()]),
    )
    .unwrap();

    let (status, list) = app.get("/get_failed_joblist/").await;
    assert_eq!(status, 200);
    let jobs = list["jobs"].as_object().unwrap();
    assert_eq!(jobs.keys().collect::<Vec<_>>(), vec!["30", "31"]);
    let row = jobs["31"].as_array().unwrap();
    assert_eq!(row.len(), 7);
    assert_eq!(row[0], 31);
    let mtime = row[1].as_i64().unwrap();
    assert!(mtime > 1_700_000_000);

    let (status, s) = app.get("/get_failed_job/?job_id=31").await;
    assert_eq!(status, 200);
    assert_eq!(s["job_id"], 31);
    assert_eq!(s["total_files"], 4);
    assert_eq!(s["error_files"], 3);
    assert_eq!(s["ready_files"], 0);
    assert_eq!(s["completed"], false);
    assert_eq!(s["last_readytime"], mtime);
    assert_eq!(
        s["files"],
        json!({"mwa/e1": [false, true, mtime], "mwa/m1": [false, true, mtime], "mwa/m2": [false, true, mtime]})
    );
    let (status, v) = app.get("/get_failed_job?job_id=32").await;
    assert_eq!(status, 404);
    assert_errormsg(&v, "Failed job 32 not found");
    app.stop().await;
}

/// Without a telescope adapter an observation cannot be looked up (the `adapter_daemon` module
/// covers jobs with `obs` and an adapter).
async fn observation_jobs_need_an_adapter(kind: Kind) {
    let app = TestApp::start(kind).await;
    let (status, body) = app
        .post_job(obs_job(
            8,
            json!({"obs_id": 1234567890, "start_time": 0, "duration": 0}),
            "http://h/cb",
        ))
        .await;
    assert_eq!(status, 400);
    assert_errormsg(&body, "no telescope adapter configured");
    let (status, _) = app.get("/staging/?job_id=8").await;
    assert_eq!(status, 404);
    // files wins over obs.
    let (status, _) = app
        .post_job(
            json!({"job_id": 9, "notify_url": "http://h/cb", "files": ["a"], "obs": {"obs_id": 1}}),
        )
        .await;
    assert_eq!(status, 202);
    let (_, s) = app.get("/staging/?job_id=9").await;
    assert_eq!(s["total_files"], 1);
    app.stop().await;
}

async fn unknown_paths_and_methods_are_json(kind: Kind) {
    let app = TestApp::start(kind).await;
    let (status, v) = app.get("/no/such/path").await;
    assert_eq!(status, 404);
    assert_errormsg(&v, "Not Found");
    let r = app.http.put(app.url("/ping/")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert!(r.json::<Value>().await.unwrap()["errormsg"].is_string());
    app.stop().await;
}

/// The documented API covers the original's paths and schemas (from its OpenAPI document),
/// and `/docs` serves the interactive page with no internet.
#[tokio::test]
async fn openapi_matches_the_original_and_docs_work_offline() {
    let app = TestApp::start(Kind::Sqlite).await;
    let reference: Value =
        serde_json::from_str(include_str!("fixtures/mwa_staging-openapi.json")).unwrap();
    let (status, ours) = app.get("/openapi.json").await;
    assert_eq!(status, 200);

    // Paths the foundation serves; Scout-facing ones arrive with the Scout integration,
    // and /v1/* and /jobresult/ were the original's test doubles.
    let served = [
        "/staging/",
        "/ping/",
        "/get_stats/",
        "/get_joblist/",
        "/get_failed_joblist/",
        "/get_failed_job/",
    ];
    for path in served {
        let theirs = reference["paths"][path].as_object().unwrap();
        let mine = ours["paths"][path]
            .as_object()
            .unwrap_or_else(|| panic!("{path} missing from /openapi.json"));
        for (method, op) in theirs {
            let my_op = mine
                .get(method)
                .unwrap_or_else(|| panic!("{method} {path} missing"));
            let their_params: BTreeSet<&str> = op["parameters"]
                .as_array()
                .map(|ps| ps.iter().map(|p| p["name"].as_str().unwrap()).collect())
                .unwrap_or_default();
            let my_params: BTreeSet<&str> = my_op["parameters"]
                .as_array()
                .map(|ps| ps.iter().map(|p| p["name"].as_str().unwrap()).collect())
                .unwrap_or_default();
            assert_eq!(their_params, my_params, "{method} {path} parameters");
        }
    }
    // Fields this service adds to the original's schemas; clients that know only the
    // original's fields ignore them.
    let added = |schema: &str| -> BTreeSet<String> {
        match schema {
            "GlobalStatistics" => ["kafka_consumer".to_string()].into(),
            _ => BTreeSet::new(),
        }
    };
    for schema in [
        "NewJob",
        "JobStatus",
        "GlobalStatistics",
        "JobList",
        "ErrorResult",
    ] {
        let mut theirs: BTreeSet<String> = reference["components"]["schemas"][schema]["properties"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        theirs.extend(added(schema));
        let mine: BTreeSet<String> = ours["components"]["schemas"][schema]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("schema {schema} missing"))
            .keys()
            .cloned()
            .collect();
        assert_eq!(theirs, mine, "schema {schema}");
    }

    // A real response carries exactly the reference schema's fields, and the additions.
    let (_, stats) = app.get("/get_stats/").await;
    let mut theirs: BTreeSet<String> =
        reference["components"]["schemas"]["GlobalStatistics"]["properties"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
    theirs.extend(added("GlobalStatistics"));
    assert_eq!(keys(&stats), theirs);

    let r = app.http.get(app.url("/docs/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let html = r.text().await.unwrap();
    assert!(html.contains("swagger-ui"), "{html}");
    assert!(
        !html.contains("cdn.") && !html.contains("unpkg.com"),
        "no CDN assets"
    );
    let r = app
        .http
        .get(app.url("/docs/swagger-ui-bundle.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the UI's script is served locally");
    let r = app
        .http
        .get(app.url("/docs/swagger-initializer.js"))
        .send()
        .await
        .unwrap();
    assert!(r.text().await.unwrap().contains("/openapi.json"));
    app.stop().await;
}

/// With `callbacks.allow` set, a job whose notify_url names another host is refused at
/// intake, so the callback credentials can only go where the operator said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_url_must_be_allowed_when_a_list_is_set() {
    let app = TestApp::start_with(Kind::Sqlite, |c| {
        c.callbacks.allow = toml::from_str::<toml::Table>("v = [\"127.0.0.1\"]").unwrap()["v"]
            .clone()
            .try_into()
            .unwrap();
    })
    .await;
    let (status, v) = app
        .post_job(files_job(1, ["a"], "http://attacker.example.net/cb"))
        .await;
    assert_eq!(status, 400, "{v}");
    assert_errormsg(
        &v,
        "attacker.example.net: its host is not in callbacks.allow",
    );
    assert_eq!(app.get("/staging/?job_id=1").await.0, 404, "nothing stored");
    let (status, v) = app.post_job(files_job(1, ["a"], NO_CALLBACK)).await;
    assert_eq!(status, 202, "{v}");
    app.stop().await;
}
