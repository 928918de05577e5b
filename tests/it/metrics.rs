//! `/metrics` after a real job went through the pipeline (Scout simulator, mock Kafka
//! cluster, callback receiver): the OpenMetrics text carries the figures the work moved,
//! counters and histograms alike. Histograms are checked by their counts and presence only:
//! a duration never decides a test. A scrape answers while the store's tables are locked,
//! so it cannot be scanning them.

use std::time::Duration;

use serde_json::json;
use sqlx::Connection;
use staged::adapter::AllowList;

use crate::common::adapters::{adapter_config, wasm};
use crate::common::pipeline::{PIPELINE, Receiver, Tape, quick};
use crate::common::{Kind, TestApp, files_job, obs_job, wait_for};

async fn scrape(app: &TestApp) -> (String, String) {
    let r = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    (ct, r.text().await.unwrap())
}

/// The value of the sample line starting with `series` (name and labels as written).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// One sample of the exposition.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// Every sample line of `text`, parsed (label values here hold no escaped quotes).
fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("{l:?}"));
            let value = value.parse().unwrap_or_else(|_| panic!("{l:?}"));
            let (name, labels) = match series.split_once('{') {
                None => (series, Vec::new()),
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("{l:?}"));
                    let labels = body
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once("=\"").unwrap_or_else(|| panic!("{l:?}"));
                            (k.to_string(), v.trim_end_matches('"').to_string())
                        })
                        .collect();
                    (name, labels)
                }
            };
            Sample {
                name: name.to_string(),
                labels,
                value,
            }
        })
        .collect()
}

/// The value of the one sample named `name` whose labels include `with`; `None` if there
/// is none. Two such samples is a test error: `with` must pick one.
fn sample(text: &str, name: &str, with: &[(&str, &str)]) -> Option<f64> {
    let found: Vec<Sample> = samples(text)
        .into_iter()
        .filter(|s| {
            s.name == name
                && with
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
        })
        .collect();
    assert!(found.len() <= 1, "{name} {with:?} is ambiguous: {found:?}");
    found.first().map(|s| s.value)
}

/// Whether `text` declares a metric family `name` (it may have no samples yet).
fn declares(text: &str, name: &str, kind: &str) -> bool {
    text.lines().any(|l| l == format!("# TYPE {name} {kind}"))
}

/// A histogram's count for the labels `with`, checked against its `+Inf` bucket.
fn histogram_count(text: &str, name: &str, with: &[(&str, &str)]) -> f64 {
    let count = sample(text, &format!("{name}_count"), with)
        .unwrap_or_else(|| panic!("no {name}_count {with:?} in:\n{text}"));
    let mut inf = with.to_vec();
    inf.push(("le", "+Inf"));
    assert_eq!(
        sample(text, &format!("{name}_bucket"), &inf),
        Some(count),
        "{name}: +Inf bucket and count differ"
    );
    count
}

/// The pool gauges of `pool`: (in use, idle, most), each checked to be present.
fn pool(text: &str, pool: &str) -> (f64, f64, f64) {
    let get = |name: &str, with: &[(&str, &str)]| {
        sample(text, name, with).unwrap_or_else(|| panic!("no {name} {with:?} in:\n{text}"))
    };
    (
        get(
            "staged_store_connections",
            &[("pool", pool), ("state", "in_use")],
        ),
        get(
            "staged_store_connections",
            &[("pool", pool), ("state", "idle")],
        ),
        get("staged_store_connections_max", &[("pool", pool)]),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_a_job_through_the_pipeline() {
    let tape = Tape::start(|_| {}).await;
    let receiver = Receiver::start().await;
    // One failed attempt first: the delivery latency counts the callback once, at its
    // delivery, not per attempt.
    receiver
        .fail_first
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let app = TestApp::start_with(Kind::Sqlite, |c| {
        quick(c);
        tape.configure(c);
    })
    .await;
    let (ct, before) = scrape(&app).await;
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    assert!(before.ends_with("# EOF\n"), "{before}");
    assert!(
        before.contains(&format!(
            "staged_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{before}"
    );
    assert_eq!(
        value(&before, "staged_callbacks_delivered_total"),
        Some(0.0)
    );
    // Families with labels (Scout's by node and operation) show once they have a series.
    for (name, kind) in [
        ("staged_intake_batch_jobs", "histogram"),
        ("staged_intake_commit_seconds", "histogram"),
        ("staged_callback_delivery_seconds", "histogram"),
        ("staged_store_connections", "gauge"),
    ] {
        assert!(declares(&before, name, kind), "no {kind} {name}:\n{before}");
    }
    assert_eq!(
        sample(&before, "staged_callback_delivery_seconds_count", &[]),
        Some(0.0)
    );
    // No adapter configured, no adapter figures.
    assert!(!before.contains("staged_adapter_call"), "{before}");

    assert_eq!(
        app.post_job(files_job(1, ["m/1", "m/2"], receiver.url()))
            .await
            .0,
        202
    );
    assert_eq!(receiver.wait_delivered(1, PIPELINE).await.len(), 1);
    let mut text = String::new();
    wait_for(
        "the store's totals and the delivery in /metrics",
        Duration::from_secs(30),
        async || {
            text = scrape(&app).await.1;
            value(&text, "staged_callbacks_delivered_total") == Some(1.0)
                && value(&text, "staged_jobs{state=\"incomplete\"}") == Some(0.0)
        },
    )
    .await;
    assert!(
        value(&text, "staged_kafka_messages_total").unwrap() >= 2.0,
        "{text}"
    );
    assert_eq!(
        value(&text, "staged_stage_calls_ok_total"),
        Some(1.0),
        "{text}"
    );
    let node = tape.node.url();
    let node = node.trim_end_matches('/');
    let ok = text
        .lines()
        .find(|l| l.starts_with("staged_scout_calls_total") && l.contains("outcome=\"success\""))
        .unwrap_or_else(|| panic!("no Scout calls: {text}"));
    assert!(ok.contains(node), "{ok} does not name {node}");

    // The histograms saw the work: one intake transaction at least (the job), the stage
    // request and the login on the configured node, the one callback delivered.
    assert!(histogram_count(&text, "staged_intake_batch_jobs", &[]) >= 1.0);
    assert!(histogram_count(&text, "staged_intake_commit_seconds", &[]) >= 1.0);
    let labelled = samples(&text)
        .into_iter()
        .filter(|s| s.name == "staged_scout_request_seconds_count")
        .map(|s| s.labels)
        .collect::<Vec<_>>();
    let node_label = labelled
        .iter()
        .flatten()
        .find(|(k, _)| k == "node")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("no Scout request latency: {text}"));
    assert!(node_label.contains(node), "{node_label} is not {node}");
    for op in ["login", "stage"] {
        let n = histogram_count(
            &text,
            "staged_scout_request_seconds",
            &[("node", &node_label), ("operation", op)],
        );
        assert!(n >= 1.0, "{op}: {n}");
    }
    assert_eq!(
        histogram_count(&text, "staged_callback_delivery_seconds", &[]),
        1.0
    );
    assert_eq!(
        sample(&text, "staged_callback_attempts_failed_total", &[]),
        Some(1.0)
    );
    // The pool gauges: present and consistent. SQLite's intake writer uses the shared pool.
    let (in_use, idle, max) = pool(&text, "shared");
    assert!(
        max >= 1.0 && in_use >= 0.0 && idle >= 0.0,
        "{in_use} {idle} {max}"
    );
    assert!(in_use + idle <= max, "{in_use} + {idle} > {max}");
    assert_eq!(
        sample(&text, "staged_store_connections_max", &[("pool", "intake")]),
        None
    );
    // The outbox totals come with the job totals; nothing is overdue.
    assert!(sample(&text, "staged_callbacks_pending", &[]).is_some_and(|v| v >= 0.0));
    assert_eq!(sample(&text, "staged_callbacks_overdue", &[]), Some(0.0));
    assert!(
        matches!(value(&text, "staged_kafka_alive"), Some(v) if v == 0.0 || v == 1.0),
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            "staged_http_responses_total{method=\"POST\",route=\"/staging\",status=\"202\"}"
        ),
        Some(1.0),
        "{text}"
    );
    // An unknown path is counted under one label, whatever it is.
    assert_eq!(app.get("/no/such/job/42").await.0, 404);
    let text = scrape(&app).await.1;
    assert_eq!(
        value(
            &text,
            "staged_http_responses_total{method=\"GET\",route=\"other\",status=\"404\"}"
        ),
        Some(1.0),
        "{text}"
    );
    // No label grows with the data.
    assert!(
        !text.contains("m/1") && !text.contains("job_id") && !text.contains("/42"),
        "{text}"
    );
    app.stop().await;
}

/// An observation through the MWA adapter and the pipeline: every export the work called
/// has a count in the call-time histogram, under the export's WIT name, and no failure was
/// counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_time_each_adapter_export_called() {
    use staged_testkit::metadata::MetadataSim;
    let metadata = MetadataSim::start(std::collections::HashMap::from([(
        1_234_567_890,
        vec![(
            "a.fits".to_string(),
            Some("bkt".to_string()),
            Some("/1234567890".to_string()),
        )],
    )]))
    .await
    .unwrap();
    let tape = Tape::start(|_| {}).await;
    let receiver = Receiver::start().await;
    let app = TestApp::start_with(Kind::Sqlite, |c| {
        quick(c);
        tape.configure(c);
        c.adapter.wasm = Some(wasm("mwa"));
        c.adapter.http_allow = AllowList::parse(&[metadata.addr.to_string()]).unwrap();
        c.adapter
            .settings
            .insert("data_files_url".into(), metadata.data_files_url().into());
    })
    .await;
    let (status, body) = app
        .post_job(obs_job(
            20,
            json!({"obs_id": 1_234_567_890}),
            receiver.url(),
        ))
        .await;
    assert_eq!(status, 202, "{body}");
    let got = receiver.wait_delivered(1, PIPELINE).await;
    assert_eq!(got[0].body["return_code"], 0, "{}", got[0].body);

    let text = scrape(&app).await.1;
    // `info` and `observation-schema` at load; then the job: resolved, staged (the paths
    // Scout is asked for), its recall messages mapped back, its callback worded.
    for export in [
        "info",
        "observation-schema",
        "resolve-observation",
        "stage-paths",
        "map-event-paths",
        "callback-comment",
    ] {
        let n = histogram_count(&text, "staged_adapter_call_seconds", &[("export", export)]);
        assert!(n >= 1.0, "{export}: {n}");
    }
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("staged_adapter_call_failures_total")),
        "{text}"
    );
    app.stop().await;
}

/// A hostile adapter's failures are counted by export and kind: a timeout, memory over the
/// limit, a trap, output over the limit and a malformed result, one each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_adapter_failures_by_kind() {
    let app = TestApp::start_with(Kind::Sqlite, |c| c.adapter = adapter_config("hostile")).await;
    let a = app.server.as_ref().unwrap().adapters.current().unwrap();
    for mode in ["loop", "bomb", "trap", "huge", "wrong-count"] {
        let e = a.map_event_paths(&[mode.to_string()]).await.unwrap_err();
        assert!(e.to_string().starts_with("adapter hostile:"), "{e}");
    }
    let text = scrape(&app).await.1;
    for reason in [
        "timeout",
        "memory_exceeded",
        "trap",
        "output_too_large",
        "bad_output",
    ] {
        assert_eq!(
            sample(
                &text,
                "staged_adapter_call_failures_total",
                &[("export", "map-event-paths"), ("reason", reason)]
            ),
            Some(1.0),
            "{reason}:\n{text}"
        );
    }
    // Every one of those calls ran, and was timed.
    assert!(
        histogram_count(
            &text,
            "staged_adapter_call_seconds",
            &[("export", "map-event-paths")]
        ) >= 5.0
    );
    app.stop().await;
}

/// With the store's tables locked, a scrape still answers at once with every histogram and
/// the pool gauges (both pools on PostgreSQL): it reads nothing from the tables. The job
/// totals arrive once the background refresh, which waited on the lock, gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_answers_while_the_tables_are_locked() {
    let app = TestApp::start(Kind::Postgres).await;
    assert_eq!(
        app.post_job(files_job(1, ["m/1"], crate::common::NO_CALLBACK))
            .await
            .0,
        202
    );
    let mut admin = sqlx::PgConnection::connect(&app.db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut admin).await.unwrap();
    sqlx::query("LOCK TABLE jobs, job_files, notify_outbox IN ACCESS EXCLUSIVE MODE")
        .execute(&mut admin)
        .await
        .unwrap();
    // The first scrape starts the refresh, which now waits on the lock; scrapes meanwhile
    // answer without the totals. A scrape that waited on the lock would wait until the
    // ROLLBACK below, which never comes: the bound turns that into a failure.
    let unlocked = async || {
        tokio::time::timeout(Duration::from_secs(30), scrape(&app))
            .await
            .expect("a scrape waited on the locked tables")
            .1
    };
    let text = unlocked().await;
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert_eq!(
        sample(&text, "staged_jobs", &[("state", "incomplete")]),
        None
    );
    assert!(histogram_count(&text, "staged_intake_batch_jobs", &[]) >= 1.0);
    let mut waiting = String::new();
    wait_for(
        "the blocked refresh to show as a connection in use",
        Duration::from_secs(30),
        async || {
            waiting = unlocked().await;
            pool(&waiting, "shared").0 >= 1.0
        },
    )
    .await;
    assert_eq!(
        sample(&waiting, "staged_jobs", &[("state", "incomplete")]),
        None
    );
    let (in_use, idle, max) = pool(&waiting, "intake");
    assert!(in_use + idle <= max && max >= 1.0, "{in_use} {idle} {max}");
    sqlx::query("ROLLBACK").execute(&mut admin).await.unwrap();
    wait_for(
        "the totals after the lock",
        Duration::from_secs(30),
        async || {
            let text = scrape(&app).await.1;
            sample(&text, "staged_jobs", &[("state", "incomplete")]) == Some(1.0)
        },
    )
    .await;
    app.stop().await;
}

/// Every job written is in exactly one intake transaction's count: forty jobs posted at
/// once sum to forty however the writer grouped them, and every transaction was timed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intake_histograms_count_each_job_once() {
    let app = TestApp::start(Kind::Sqlite).await;
    let posts = (0..40).map(|id| app.post_job(files_job(id, ["m/1"], crate::common::NO_CALLBACK)));
    for (status, body) in futures::future::join_all(posts).await {
        assert_eq!(status, 202, "{body}");
    }
    let text = scrape(&app).await.1;
    let batches = histogram_count(&text, "staged_intake_batch_jobs", &[]);
    assert_eq!(
        sample(&text, "staged_intake_batch_jobs_sum", &[]),
        Some(40.0)
    );
    assert!((1.0..=40.0).contains(&batches), "{batches}");
    assert_eq!(
        histogram_count(&text, "staged_intake_commit_seconds", &[]),
        batches
    );
    app.stop().await;
}
