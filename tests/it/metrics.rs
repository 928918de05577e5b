//! `/metrics` after a real job went through the pipeline (Scout simulator, mock Kafka
//! cluster, callback receiver): the OpenMetrics text carries the figures the work moved.

use std::time::Duration;

use crate::common::pipeline::{PIPELINE, Receiver, Tape, quick};
use crate::common::{Kind, TestApp, files_job, wait_for};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_a_job_through_the_pipeline() {
    let tape = Tape::start(|_| {}).await;
    let receiver = Receiver::start().await;
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
