//! Property tests of everything that parses outside input: the `POST /staging/` body, the
//! query strings of `/staging/` and `/get_failed_job/`, Kafka message bodies, what a
//! telescope adapter returns (through the real WebAssembly boundary) and config files.
//!
//! Each property says what the daemon promises for any input, not for chosen examples:
//! - the API answers a documented status with a JSON body, `errormsg` on every error, never
//!   a panic or a 500 for bad input, and a job it acknowledged reads back with its exact
//!   files;
//! - a Kafka message is an event or a malformed message (which the consumer counts and
//!   skips), never a panic, and a well-formed one reads back as what was sent;
//! - an adapter's answer is accepted as documented or refused with a typed error;
//! - a config file parses, or fails with an error naming the offending key; one that parses
//!   can be turned into the daemon's settings without a panic.
//!
//! Each property runs 64 cases by default (a few seconds in CI); `PROPTEST_CASES=N` runs N.
//! A failing case is shrunk and printed by proptest; no regression file is written.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request};
use http_body_util::BodyExt;
use proptest::prelude::*;
use proptest::test_runner::{Config as PropConfig, TestCaseError, TestRunner};
use serde_json::{Value, json};
use staged::api::{AppState, router};
use staged::config::Config;
use staged::store::{Store, StoreOptions};
use tower::ServiceExt;

use crate::common::{Kind, TestDb};

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

fn runner() -> TestRunner {
    TestRunner::new(PropConfig {
        cases: cases(),
        failure_persistence: None,
        ..PropConfig::default()
    })
}

/// Runs a property, turning proptest's shrunk failure into a test failure.
fn check<S: Strategy>(what: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    if let Err(e) = runner().run(&strategy, test) {
        panic!("property {what:?} does not hold: {e}");
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The real router on a real store (no Scout, no Kafka, no adapter), called in-process.
struct Api {
    app: axum::Router,
    _db: TestDb,
    store: Store,
}

impl Api {
    async fn new(kind: Kind) -> Api {
        let db = TestDb::new(kind).await;
        let mut config = db.config();
        // Small enough that arbitrary bodies reach the limit now and then.
        config.server.max_body_bytes = 4096;
        config.server.max_files_per_job = 50;
        config.server.max_path_bytes = 200;
        config.jobs.expiry_secs = 3600;
        let store = Store::open(&StoreOptions::from_config(&config.database, &config.jobs))
            .await
            .expect("opening the store");
        let app = router(AppState::new(store.clone(), &config));
        Api {
            app,
            _db: db,
            store,
        }
    }

    /// One request; the answer's status and its body as JSON (`Err` with the raw body when
    /// it is not JSON).
    async fn call(&self, method: Method, uri: &str, body: Vec<u8>) -> (u16, Result<Value, String>) {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json")
            .body(Body::from(body))
            .expect("a valid request");
        let res = self.app.clone().oneshot(req).await.expect("infallible");
        let status = res.status().as_u16();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes)
            .map_err(|_| String::from_utf8_lossy(&bytes).into_owned());
        (status, json)
    }
}

/// Every error carries a string `errormsg`; a success is JSON too.
fn documented(
    status: u16,
    body: &Result<Value, String>,
    allowed: &[u16],
) -> Result<(), TestCaseError> {
    prop_assert!(
        allowed.contains(&status),
        "status {} is not one of {:?}; body {:?}",
        status,
        allowed,
        body
    );
    let body = body.as_ref().map_err(|raw| {
        TestCaseError::fail(format!("status {status}: body is not JSON: {raw:?}"))
    })?;
    if status >= 400 {
        prop_assert!(
            body["errormsg"].is_string(),
            "status {} without errormsg: {}",
            status,
            body
        );
    }
    Ok(())
}

const POST_STATUSES: &[u16] = &[202, 400, 403, 413, 422];

/// Any JSON value, with a bias towards the keys a `NewJob` has.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        any::<String>().prop_map(Value::String),
        Just(json!("http://127.0.0.1:9/cb")),
    ];
    leaf.prop_recursive(4, 48, 8, |inner| {
        let key = prop_oneof![
            Just("job_id".to_string()),
            Just("files".to_string()),
            Just("notify_url".to_string()),
            Just("obs".to_string()),
            any::<String>(),
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(key, inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// What the API must say about a job that was acknowledged: it reads back with exactly
/// the files posted (each once).
async fn reads_back(api: &Api, job_id: i64, files: &[String]) -> Result<(), TestCaseError> {
    let (status, body) = api
        .call(
            Method::GET,
            &format!("/staging/?job_id={job_id}&include_files=true"),
            Vec::new(),
        )
        .await;
    prop_assert_eq!(status, 200, "job {} acknowledged but not readable", job_id);
    let body = body.map_err(TestCaseError::fail)?;
    let want: HashSet<&str> = files.iter().map(String::as_str).collect();
    let got: HashSet<&str> = body["files"]
        .as_object()
        .map(|m| m.keys().map(String::as_str).collect())
        .unwrap_or_default();
    prop_assert_eq!(&got, &want, "job {}'s files", job_id);
    prop_assert_eq!(body["total_files"].as_u64(), Some(want.len() as u64));
    Ok(())
}

#[test]
fn post_staging_answers_any_json_value_as_documented() {
    let rt = rt();
    let api = rt.block_on(Api::new(Kind::Sqlite));
    check("POST /staging/ with any JSON value", json_value(), |v| {
        rt.block_on(async {
            let (status, body) = api
                .call(Method::POST, "/staging/", v.to_string().into_bytes())
                .await;
            documented(status, &body, POST_STATUSES)?;
            if status == 202 {
                let id = v["job_id"].as_i64().expect("a 202 job has an integer id");
                let files: Vec<String> = v["files"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|f| f.as_str().map(str::to_string))
                    .collect();
                reads_back(&api, id, &files).await?;
            }
            Ok(())
        })
    });
    rt.block_on(api.store.close());
}

#[test]
fn post_staging_answers_any_bytes_as_documented() {
    let rt = rt();
    let api = rt.block_on(Api::new(Kind::Sqlite));
    let bytes = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..600),
        // Nearly JSON: a valid job cut short or with a byte changed.
        (any::<prop::sample::Index>(), any::<u8>(), any::<bool>()).prop_map(|(at, b, cut)| {
            let mut v =
                br#"{"job_id": 7, "files": ["a/b", "c"], "notify_url": "http://127.0.0.1:9/cb"}"#
                    .to_vec();
            let i = at.index(v.len());
            if cut {
                v.truncate(i);
            } else {
                v[i] = b;
            }
            v
        }),
        // Over the body limit.
        (4000usize..6000).prop_map(|n| vec![b' '; n]),
    ];
    check("POST /staging/ with any bytes", bytes, |b| {
        rt.block_on(async {
            let (status, body) = api.call(Method::POST, "/staging/", b).await;
            documented(status, &body, POST_STATUSES)
        })
    });
    rt.block_on(api.store.close());
}

/// A well-formed job with arbitrary paths and id: 202 and it reads back exactly, 403 for an
/// id already taken, or 400 for a path the daemon refuses (empty, too long, control
/// characters, or not one the adapter would recognise); never anything else.
fn well_formed_jobs_round_trip(kind: Kind) {
    let rt = rt();
    let api = rt.block_on(Api::new(kind));
    let taken = Mutex::new(HashSet::new());
    let path = prop_oneof![
        3 => "[A-Za-z0-9_./-]{1,64}",
        1 => any::<String>(),
        1 => "[ -~]{0,220}",
    ];
    let job = (
        any::<i64>(),
        prop::collection::vec(path, 1..8),
        prop::option::of(json_value()),
    );
    check("well-formed jobs round-trip", job, |(id, files, obs)| {
        rt.block_on(async {
            let mut body =
                json!({"job_id": id, "files": files, "notify_url": "http://127.0.0.1:9/cb"});
            if let Some(obs) = obs {
                // `files` wins over `obs`, whatever `obs` holds, as long as it is an object.
                if obs.is_object() {
                    body["obs"] = obs;
                }
            }
            let (status, answer) = api
                .call(Method::POST, "/staging/", body.to_string().into_bytes())
                .await;
            let ordinary = files.iter().all(|f| {
                !f.is_empty()
                    && f.len() <= 200
                    && f.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_./-".contains(&b))
            });
            let already = taken.lock().unwrap().contains(&id);
            if already {
                documented(status, &answer, &[403])?;
                return Ok(());
            }
            if ordinary {
                documented(status, &answer, &[202])?;
            } else {
                documented(status, &answer, &[202, 400])?;
            }
            if status == 202 {
                taken.lock().unwrap().insert(id);
                reads_back(&api, id, &files).await?;
            }
            Ok(())
        })
    });
    rt.block_on(api.store.close());
}

#[test]
fn well_formed_jobs_round_trip_sqlite() {
    well_formed_jobs_round_trip(Kind::Sqlite);
}

#[test]
fn well_formed_jobs_round_trip_postgres() {
    well_formed_jobs_round_trip(Kind::Postgres);
}

/// Query strings: key=value pairs with the parameters' names and arbitrary values,
/// form-encoded, or raw characters that a URI may hold (bad escapes included).
fn query() -> impl Strategy<Value = String> {
    let name = prop_oneof![
        Just("job_id".to_string()),
        Just("include_files".to_string()),
        "[a-z_]{0,12}",
    ];
    let value = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<i128>().prop_map(|n| n.to_string()),
        "[ +-]?[0-9]{0,25}[ ]?",
        "(true|false|yes|no|on|off|1|0|t|f|y|n|TRUE|Yes)",
        any::<String>(),
    ];
    prop_oneof![
        prop::collection::vec((name, value), 0..5).prop_map(|pairs| {
            let mut q = url::form_urlencoded::Serializer::new(String::new());
            for (k, v) in pairs {
                q.append_pair(&k, &v);
            }
            q.finish()
        }),
        "[A-Za-z0-9%=&+;._~!$'()*,:@/?-]{0,80}",
    ]
}

#[test]
fn query_strings_are_answered_as_documented() {
    let rt = rt();
    let api = rt.block_on(Api::new(Kind::Sqlite));
    // A job and a failure report to find, so that the successful paths are taken too.
    rt.block_on(async {
        let body = json!({"job_id": 5, "files": ["q/a"], "notify_url": "http://127.0.0.1:9/cb"});
        let (status, _) = api
            .call(Method::POST, "/staging/", body.to_string().into_bytes())
            .await;
        assert_eq!(status, 202);
        staged::reports::write(
            &api._db.dir.path().join("reports"),
            5,
            &staged::reports::render(5, 2, &["q/a".into()], &["q/b".into()]),
        )
        .unwrap();
    });
    let target = (
        prop_oneof![
            Just((Method::GET, "/staging/", &[200u16, 404, 422][..])),
            Just((Method::GET, "/get_failed_job/", &[200u16, 404, 422][..])),
            Just((Method::DELETE, "/staging/", &[200u16, 404, 422][..])),
        ],
        query(),
    );
    check("query strings", target, |((method, path, allowed), q)| {
        rt.block_on(async {
            let uri = format!("{path}?{q}");
            if uri.parse::<axum::http::Uri>().is_err() {
                // Not a request line hyper would hand over.
                return Ok(());
            }
            let deleting = method == Method::DELETE;
            let (status, body) = api.call(method, &uri, Vec::new()).await;
            documented(status, &body, allowed)?;
            if deleting && status == 200 {
                // Put the job back for the next cases.
                let body =
                    json!({"job_id": 5, "files": ["q/a"], "notify_url": "http://127.0.0.1:9/cb"});
                let (status, _) = api
                    .call(Method::POST, "/staging/", body.to_string().into_bytes())
                    .await;
                prop_assert_eq!(status, 202, "putting job 5 back");
            }
            Ok(())
        })
    });
    rt.block_on(api.store.close());
}

/// Any job id in any spelling pydantic accepts finds the job it names.
#[test]
fn job_ids_are_read_as_integers() {
    let rt = rt();
    let api = rt.block_on(Api::new(Kind::Sqlite));
    check(
        "job ids",
        (any::<i64>(), "[ ]{0,2}", "[ ]{0,2}", any::<bool>()),
        |(id, pre, post, plus)| {
            rt.block_on(async {
                let body =
                    json!({"job_id": id, "files": ["x"], "notify_url": "http://127.0.0.1:9/cb"});
                let (status, _) = api
                    .call(Method::POST, "/staging/", body.to_string().into_bytes())
                    .await;
                prop_assert!(status == 202 || status == 403);
                let sign = if plus && id >= 0 { "+" } else { "" };
                let raw = format!("{pre}{sign}{id}{post}");
                let q: String = url::form_urlencoded::Serializer::new(String::new())
                    .append_pair("job_id", &raw)
                    .finish();
                let (status, body) = api
                    .call(Method::GET, &format!("/staging/?{q}"), Vec::new())
                    .await;
                prop_assert_eq!(status, 200, "job_id {:?}: {:?}", raw, body);
                prop_assert_eq!(body.unwrap()["job_id"].as_i64(), Some(id));
                Ok(())
            })
        },
    );
    rt.block_on(api.store.close());
}

/// Kafka bodies: any bytes are an event or a malformed message, never a panic; the shape of
/// a recall message that is not valid is malformed, and a valid one reads back as sent.
#[test]
fn kafka_bodies_parse_to_an_event_or_a_malformed_message() {
    use staged::kafka::{Parsed, parse};
    let bytes = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        // Recall-shaped objects with fields of any type.
        prop::collection::btree_map(
            prop_oneof![
                Just("Filename".to_string()),
                Just("Error".to_string()),
                Just("CompleteTime".to_string()),
                Just("RequestTime".to_string()),
                Just("Inode".to_string()),
            ],
            json_value(),
            0..4
        )
        .prop_map(|m| Value::Object(m.into_iter().collect())
            .to_string()
            .into_bytes()),
        // The same fields by position, as a JSON array.
        (any::<String>(), prop::collection::vec(json_value(), 0..3)).prop_map(|(name, rest)| {
            let mut v = vec![json!(name)];
            v.extend(rest);
            Value::Array(v).to_string().into_bytes()
        }),
    ];
    check("Kafka bodies", (bytes, any::<bool>()), |(b, none)| {
        let payload = if none && b.is_empty() {
            None
        } else {
            Some(&b[..])
        };
        match parse(payload, 256, 42) {
            Parsed::Event { name, at_ms, .. } => {
                prop_assert!(!name.is_empty());
                prop_assert!(b.len() <= 256);
                let v: Value = serde_json::from_slice(&b).map_err(|e| {
                    TestCaseError::fail(format!("an event from a body that is not JSON: {e}"))
                })?;
                prop_assert_eq!(v["Filename"].as_str(), Some(name.as_str()));
                prop_assert!(
                    at_ms == 42 || v["CompleteTime"].is_string() || v["RequestTime"].is_string()
                );
            }
            Parsed::Malformed(why) => prop_assert!(!why.is_empty()),
        }
        Ok(())
    });

    let recall = (
        any::<String>().prop_filter("a name", |s| !s.is_empty()),
        prop::option::of(any::<String>()),
        // Any second from 1970 to 2200 for each time, and whether the message gives it.
        prop::option::of(0i64..7_258_118_400),
        prop::option::of(0i64..7_258_118_400),
        any::<u64>(),
    );
    check(
        "well-formed recall messages",
        recall,
        |(name, error, complete, request, inode)| {
            let mut m = json!({"Inode": inode, "Filename": name});
            if let Some(e) = &error {
                m["Error"] = json!(e);
            }
            for (key, at) in [("CompleteTime", complete), ("RequestTime", request)] {
                if let Some(secs) = at {
                    let t = chrono::DateTime::from_timestamp(secs, 0).unwrap();
                    m[key] = json!(t.format("%Y-%m-%d %H:%M:%S +0000 GMT").to_string());
                }
            }
            // The event's time is the later of the two.
            let at = complete.max(request);
            let body = m.to_string();
            match parse(Some(body.as_bytes()), 1 << 20, -1) {
                Parsed::Event {
                    name: got,
                    error: got_error,
                    at_ms,
                } => {
                    prop_assert_eq!(got, name);
                    prop_assert_eq!(got_error, error.filter(|e| !e.is_empty()));
                    prop_assert_eq!(at_ms, at.map_or(-1, |s| s * 1000));
                }
                Parsed::Malformed(why) => {
                    return Err(TestCaseError::fail(format!("{body} is malformed: {why}")));
                }
            }
            Ok(())
        },
    );
}

/// The consumer itself, on a mock cluster: a run of arbitrary bodies (as many as
/// `PROPTEST_CASES`, 64 by default) is read to the end, every malformed one is counted,
/// the well-formed ones are handed to the store, and a recall after them still lands.
#[test]
fn the_consumer_counts_every_malformed_body_and_goes_on() {
    use proptest::strategy::ValueTree;
    use rdkafka::ClientConfig;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use staged::kafka::{IdentityMapper, Parsed, parse};

    let body = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        (any::<String>(), prop::option::of(any::<String>())).prop_map(|(name, error)| {
            json!({"Filename": name, "Error": error})
                .to_string()
                .into_bytes()
        }),
        (any::<String>(), json_value())
            .prop_map(|(name, v)| json!([name, v]).to_string().into_bytes()),
    ];
    let mut runner = runner();
    let bodies: Vec<Vec<u8>> = (0..cases())
        .map(|_| body.new_tree(&mut runner).unwrap().current())
        .collect();
    let max_bytes = staged::config::KafkaConfig::default().max_message_bytes;
    let malformed = bodies
        .iter()
        .filter(|b| matches!(parse(Some(b), max_bytes, 0), Parsed::Malformed(_)))
        .count() as u64;

    rt().block_on(async {
        let db = TestDb::new(Kind::Sqlite).await;
        let mut config = db.config();
        config.jobs.expiry_secs = 3600;
        let store = Store::open(&StoreOptions::from_config(&config.database, &config.jobs))
            .await
            .unwrap();
        store
            .submit(staged::store::NewJob {
                job_id: 1,
                notify_url: "http://127.0.0.1:9/cb".into(),
                files: vec!["props/last".into()],
                obs: None,
                submitted_by: None,
                ..Default::default()
            })
            .await
            .unwrap();
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("recalls", 1, 1).unwrap();
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("linger.ms", "1")
            .create()
            .unwrap();
        let last = json!({"Filename": "props/last", "Error": ""}).to_string();
        for b in bodies.iter().chain([&last.clone().into_bytes()]) {
            producer
                .send(
                    FutureRecord::<(), _>::to("recalls").payload(b),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
        let config = crate::common::pipeline::kafka_config(
            &cluster.bootstrap_servers(),
            &format!("props-{}", rand::random::<u32>()),
        );
        let ingest =
            staged::kafka::start(&config, store.clone(), Arc::new(IdentityMapper)).unwrap();
        let status = ingest.status();
        let past = crate::common::poll_until(Duration::from_secs(30), async || {
            let ready = store.job_files(1).await.unwrap()[0].ready;
            ready && status.counters().handled > bodies.len() as u64
        })
        .await;
        assert!(
            past,
            "the consumer did not get past the arbitrary bodies: {:?}",
            status.counters()
        );
        let c = status.counters();
        assert_eq!(c.malformed, malformed, "{c:?}");
        assert_eq!(c.events, bodies.len() as u64 + 1 - malformed, "{c:?}");
        ingest.stop().await;
        drop(producer);
        store.close().await;
    });
}

/// Adapter results through the real WebAssembly boundary. The hostile test adapter
/// answers `map-event-paths` and `stage-paths` with what it was given, so arbitrary names
/// are arbitrary results: accepted exactly when they fit the byte bounds, refused with
/// the bound's typed error otherwise. The MWA adapter turns whatever the metadata service
/// answers into paths: arbitrary answers give valid paths or a typed error.
#[test]
fn adapter_results_are_accepted_as_documented_or_refused_typed() {
    use staged::adapter::{AdapterError, Adapters, AllowList, ResolveError};
    use staged::config::AdapterConfig;

    const LIMIT: usize = 2048;
    let rt = rt();
    let wasm = |name: &str| {
        std::path::PathBuf::from(env!("STAGED_ADAPTERS_DIR")).join(format!("adapter_{name}.wasm"))
    };
    let config = |name: &str| AdapterConfig {
        wasm: Some(wasm(name)),
        call_timeout_ms: 5000,
        memory_limit_bytes: 32 * 1024 * 1024,
        max_input_bytes: LIMIT,
        max_output_bytes: LIMIT,
        http_timeout_ms: 2000,
        http_max_response_bytes: 64 * 1024,
        ..AdapterConfig::default()
    };
    let hostile = rt
        .block_on(Adapters::from_config(&config("hostile")))
        .expect("the hostile adapter loads")
        .current()
        .unwrap();
    // The hostile adapter misbehaves on purpose when a batch is one of these names.
    let modes = [
        "loop",
        "bomb",
        "trap",
        "forbidden-http",
        "huge",
        "wrong-count",
        "fs",
        "env",
        "socket",
        "clock",
    ];
    let names = prop::collection::vec(
        prop_oneof![any::<String>(), "[a-z/._-]{0,40}", "[a-z]{0,300}"],
        0..24,
    )
    .prop_filter("not a misbehaviour request", move |n| {
        !(n.len() == 1 && modes.contains(&n[0].as_str()))
    });
    let size = |list: &[String]| list.iter().map(|s| s.len() + 8).sum::<usize>();
    check("map-event-paths and stage-paths results", names, |names| {
        rt.block_on(async {
            let input = size(&names);
            let mapped = hostile.map_event_paths(&names).await;
            let mapped_out: usize = names.iter().map(|n| n.len() + 8).sum();
            match mapped {
                Ok(m) => {
                    prop_assert!(input <= LIMIT && mapped_out <= LIMIT);
                    let want: Vec<Option<String>> = names.iter().cloned().map(Some).collect();
                    prop_assert_eq!(m, want);
                }
                Err(AdapterError::InputTooLarge { bytes, limit, .. }) => {
                    prop_assert_eq!((bytes, limit), (input, LIMIT));
                    prop_assert!(input > LIMIT);
                }
                Err(AdapterError::OutputTooLarge { bytes, limit, .. }) => {
                    prop_assert_eq!((bytes, limit), (mapped_out, LIMIT));
                    prop_assert!(input <= LIMIT && mapped_out > LIMIT);
                }
                Err(e) => return Err(TestCaseError::fail(format!("map-event-paths: {e}"))),
            }
            match hostile.stage_paths(&names).await {
                Ok(s) => {
                    prop_assert!(input <= LIMIT);
                    prop_assert_eq!(s, names);
                }
                Err(AdapterError::InputTooLarge { bytes, .. }) => {
                    prop_assert_eq!(bytes, input);
                    prop_assert!(input > LIMIT);
                }
                Err(e) => return Err(TestCaseError::fail(format!("stage-paths: {e}"))),
            }
            Ok(())
        })
    });

    // The metadata service answers with whatever the case says.
    let answer: Arc<Mutex<(u16, Vec<u8>)>> = Arc::new(Mutex::new((200, b"{}".to_vec())));
    let addr = rt.block_on(async {
        let answer = answer.clone();
        let app = axum::Router::new().route(
            "/metadata/data_files",
            axum::routing::get(move || {
                let (status, body) = answer.lock().unwrap().clone();
                async move { (axum::http::StatusCode::from_u16(status).unwrap(), body) }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    });
    let mut mwa_config = config("mwa");
    mwa_config.max_output_bytes = 64 * 1024;
    mwa_config.http_allow = AllowList::parse(&[format!("127.0.0.1:{}", addr.port())]).unwrap();
    mwa_config.settings = [(
        "data_files_url".to_string(),
        toml::Value::String(format!("http://{addr}/metadata/data_files")),
    )]
    .into_iter()
    .collect();
    let mwa = rt
        .block_on(Adapters::from_config(&mwa_config))
        .expect("the MWA adapter loads")
        .current()
        .unwrap();
    let name = prop_oneof![any::<String>(), "[a-z0-9_.]{1,30}"];
    let folder = prop::option::of(prop_oneof![any::<String>(), "/?[a-z0-9/]{0,20}"]);
    let files = prop::collection::btree_map(name, (folder.clone(), folder), 0..12).prop_map(
        |m: BTreeMap<String, (Option<String>, Option<String>)>| {
            let v: serde_json::Map<String, Value> = m
                .into_iter()
                .map(|(n, (bucket, folder))| (n, json!({"bucket": bucket, "folder": folder})))
                .collect();
            Value::Object(v).to_string().into_bytes()
        },
    );
    let body = prop_oneof![
        3 => files,
        1 => json_value().prop_map(|v| v.to_string().into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..200),
    ];
    let status = prop_oneof![4 => Just(200u16), 1 => prop::sample::select(vec![204u16, 301, 400, 404, 500, 503])];
    check(
        "resolve-observation results",
        (status, body),
        |(status, body)| {
            *answer.lock().unwrap() = (status, body.clone());
            rt.block_on(async {
                let obs = json!({"obs_id": 1234567890, "start_time": 0, "duration": 0});
                match mwa.resolve_observation(&obs).await {
                    Ok(paths) => {
                        prop_assert_eq!(status, 200);
                        for p in &paths {
                            prop_assert!(!p.is_empty() && !p.contains('\0'), "path {:?}", p);
                        }
                    }
                    Err(
                        ResolveError::Invalid(_)
                        | ResolveError::NotFound(_)
                        | ResolveError::LookupFailed(_)
                        | ResolveError::Adapter(
                            AdapterError::BadOutput { .. } | AdapterError::OutputTooLarge { .. },
                        ),
                    ) => {}
                    // The service answered: only a 5xx says it is unavailable for now.
                    Err(ResolveError::Unavailable(why)) => {
                        prop_assert!(status >= 500, "unavailable on a {}: {}", status, why);
                    }
                    Err(ResolveError::Adapter(e)) => {
                        return Err(TestCaseError::fail(format!(
                            "the adapter failed instead of answering: {e}"
                        )));
                    }
                }
                Ok(())
            })
        },
    );
}

/// The example config with its secrets inline (so that no environment is needed), as a
/// table to mutate.
fn example_config() -> toml::Table {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/staged.example.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let mut table: toml::Table = text.parse().expect("the example config is TOML");
    fn inline_secrets(t: &mut toml::Table) {
        for (_, v) in t.iter_mut() {
            match v {
                toml::Value::Table(inner) => match inner.get("env") {
                    // Unique and long enough for an API token's secret.
                    Some(toml::Value::String(env)) if inner.len() == 1 => {
                        *v = toml::Value::String(format!("secret-of-{env}"));
                    }
                    _ => inline_secrets(inner),
                },
                toml::Value::Array(items) => {
                    for item in items {
                        if let toml::Value::Table(inner) = item {
                            inline_secrets(inner);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    inline_secrets(&mut table);
    Config::parse(&toml::to_string(&table).unwrap())
        .unwrap_or_else(|e| panic!("the example config with inline secrets: {e:#}"));
    table
}

/// Every leaf key of a table, as (section, key) pairs, for the first two levels.
fn leaves(t: &toml::Table) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (section, v) in t {
        if let toml::Value::Table(inner) = v {
            for (key, v) in inner {
                if !matches!(v, toml::Value::Table(_)) {
                    out.push((section.clone(), key.clone()));
                }
            }
        }
    }
    out
}

fn toml_value() -> impl Strategy<Value = toml::Value> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(toml::Value::Boolean),
        any::<i64>().prop_map(toml::Value::Integer),
        prop_oneof![Just(0i64), Just(1), Just(-1), Just(2)].prop_map(toml::Value::Integer),
        any::<f64>().prop_map(toml::Value::Float),
        prop_oneof![Just(1e300f64), Just(-0.0), Just(f64::INFINITY), Just(1e19)]
            .prop_map(toml::Value::Float),
        any::<String>().prop_map(toml::Value::String),
        Just(toml::Value::String("127.0.0.1:1".into())),
        Just(toml::Value::String("http://127.0.0.1:1".into())),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(toml::Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..3)
                .prop_map(|m| toml::Value::Table(m.into_iter().collect())),
        ]
    })
}

/// A config that parses is turned into the daemon's settings the way `serve` does, which
/// must not panic on any value parsing let through.
fn settings_from(config: &Config) -> Result<(), String> {
    staged::engine::EngineTimings::from_config(&config.jobs);
    staged::kafka::IngestSettings::from_config(&config.kafka);
    StoreOptions::from_config(&config.database, &config.jobs);
    staged::adapter::Limits::from_config(&config.adapter);
    staged::scout::ScoutSettings::from_config(&config.scout, &config.kafka.topic)
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn parses_or_names(text: &str, keys: &[String]) -> Result<(), TestCaseError> {
    let outcome = std::panic::catch_unwind(|| Config::parse(text));
    let parsed =
        outcome.map_err(|_| TestCaseError::fail(format!("parsing panicked on:\n{text}")))?;
    match parsed {
        Ok(config) => {
            let built = std::panic::catch_unwind(|| settings_from(&config));
            match built {
                Ok(_) => {}
                Err(_) => {
                    return Err(TestCaseError::fail(format!(
                        "a config that parses panics when it is used:\n{text}"
                    )));
                }
            }
        }
        Err(e) => {
            let msg = format!("{e:#}");
            prop_assert!(
                keys.iter().any(|k| msg.contains(k.as_str())),
                "the error names none of {:?}: {}\n{}",
                keys,
                msg,
                text
            );
        }
    }
    Ok(())
}

#[test]
fn config_files_parse_or_name_the_key() {
    let example = example_config();
    let spots = leaves(&example);
    let sections: Vec<String> = example.keys().cloned().collect();

    // Every number of the example at the edges of its type: each either parses and builds,
    // or is refused naming its key.
    let edges = [
        toml::Value::Integer(0),
        toml::Value::Integer(-1),
        toml::Value::Integer(i64::MAX),
        toml::Value::Float(0.0),
        toml::Value::Float(1e300),
        toml::Value::Float(f64::INFINITY),
        toml::Value::Float(f64::NAN),
    ];
    for (section, key) in &spots {
        let value = &example[section][key];
        if !(value.is_integer() || value.is_float()) {
            continue;
        }
        for edge in &edges {
            let mut table = example.clone();
            table[section]
                .as_table_mut()
                .unwrap()
                .insert(key.clone(), edge.clone());
            let text = toml::to_string(&table).unwrap();
            if let Err(e) = parses_or_names(&text, std::slice::from_ref(key)) {
                panic!("{section}.{key} = {edge}: {e}");
            }
        }
    }

    // Arbitrary documents over the real sections and keys (and others).
    let section = prop_oneof![prop::sample::select(sections.clone()), "[a-z_]{1,10}",];
    let key = prop_oneof![
        prop::sample::select(spots.iter().map(|(_, k)| k.clone()).collect::<Vec<_>>()),
        "[a-z_]{1,10}",
    ];
    let doc = prop::collection::btree_map(
        section,
        prop::collection::btree_map(key, toml_value(), 0..4),
        0..4,
    );
    check("arbitrary config documents", doc, |doc| {
        let mut table = toml::Table::new();
        let mut keys = Vec::new();
        for (s, kv) in doc {
            keys.push(s.clone());
            let mut inner = toml::Table::new();
            for (k, v) in kv {
                keys.push(k.clone());
                if let toml::Value::Table(t) = &v {
                    keys.extend(t.keys().cloned());
                }
                inner.insert(k, v);
            }
            table.insert(s, toml::Value::Table(inner));
        }
        let Ok(text) = toml::to_string(&table) else {
            // Not every value tree is a TOML document (e.g. NaN keys); nothing to parse.
            return Ok(());
        };
        parses_or_names(&text, &keys)
    });

    // The example with one key changed: renamed, or given another value of any type.
    let mutation = (
        prop::sample::select(spots),
        prop_oneof!["[a-z_]{1,6}".prop_map(Err), toml_value().prop_map(Ok),],
    );
    check(
        "mutated example config",
        mutation,
        |((section, key), change)| {
            let mut table = example.clone();
            let inner = table[&section].as_table_mut().unwrap();
            let named = match change {
                Err(suffix) => {
                    let value = inner.remove(&key).unwrap();
                    let renamed = format!("{key}{suffix}");
                    inner.insert(renamed.clone(), value);
                    renamed
                }
                Ok(value) => {
                    inner.insert(key.clone(), value);
                    key
                }
            };
            let text = toml::to_string(&table).map_err(|e| TestCaseError::reject(e.to_string()))?;
            parses_or_names(&text, &[named])
        },
    );
}
