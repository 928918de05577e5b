//! The job engine end to end: real HTTP to the Scout simulator, a real Kafka-protocol broker
//! (librdkafka's mock cluster) carrying the simulator's recall messages, the real ingest, and
//! a callback receiver on loopback; SQLite and PostgreSQL.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::common::pipeline::{PIPELINE, quick};
use crate::common::pipeline::{Receiver, Tape};
use crate::common::{Kind, TestApp};
use crate::common::{files_job, obs_job, poll_until, wait_for};
use serde_json::{Value, json};
use staged::adapter::AllowList;
use staged::store::FileEvent;

fn job(id: i64, files: &[&str], receiver: &Receiver) -> Value {
    files_job(id, files, receiver.url())
}

both_backends!(
    file_list_job_is_staged_and_called_back,
    failing_files_give_code_5_and_a_report
);

async fn file_list_job_is_staged_and_called_back(kind: Kind) {
    let tape = Tape::start(|_| {}).await;
    let receiver = Receiver::start().await;
    let app = TestApp::start_with(kind, |c| {
        quick(c);
        tape.configure(c);
    })
    .await;
    let (status, _) = app
        .post_job(job(
            1,
            &["mwa/1/a.fits", "mwa/1/b.fits", "mwa/1/c.fits"],
            &receiver,
        ))
        .await;
    assert_eq!(status, 202);

    let got = receiver.wait_delivered(1, PIPELINE).await;
    assert_eq!(
        got.len(),
        1,
        "one callback; attempts {}; {}",
        receiver.attempts(),
        app.describe(1).await
    );
    let cb = &got[0];
    assert_eq!(
        cb.body,
        json!({"job_id": 1, "return_code": 0, "total_files": 3, "ready_files": 3,
               "error_files": 0, "comment": "All 3 files staged successfully"})
    );
    // Basic auth asvo:cb-pw.
    assert_eq!(cb.auth.as_deref(), Some("Basic YXN2bzpjYi1wdw=="));
    assert_eq!(tape.sim.counters().staged_paths, 3);

    // Delivered: the job is gone, as in the original, and remembered in the history.
    wait_for(
        "the job's removal after its callback",
        Duration::from_secs(5),
        async || app.get("/staging/?job_id=1").await.0 == 404,
    )
    .await;
    let history = app.store().history(10).await.unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(
        (
            history[0].job_id,
            history[0].return_code,
            history[0].delivered
        ),
        (1, 0, true)
    );
    assert!(
        !app.db.dir.path().join("reports/failed/1.txt").exists(),
        "no report for code 0"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.attempts(), 1, "delivered once");
    app.stop().await;
}

async fn failing_files_give_code_5_and_a_report(kind: Kind) {
    let tape = Tape::start(|s| s.error_fraction = 1.0).await;
    let receiver = Receiver::start().await;
    let app = TestApp::start_with(kind, |c| {
        quick(c);
        tape.configure(c);
    })
    .await;
    assert_eq!(
        app.post_job(job(2, &["x/1", "x/2"], &receiver)).await.0,
        202
    );
    let got = receiver.wait_delivered(1, PIPELINE).await;
    assert_eq!(got.len(), 1, "{}", app.describe(2).await);
    assert_eq!(got[0].body["return_code"], 5);
    assert_eq!(got[0].body["error_files"], 2);
    assert_eq!(got[0].body["ready_files"], 0);
    assert_eq!(
        got[0].body["comment"],
        "Out of 2 files in total, 0 were staged successfully, but 2 files had errors"
    );
    let report = wait_for_file(&app.db.dir.path().join("reports/failed/2.txt")).await;
    assert!(report.starts_with("Job failure report for job 2: Out of a total of 2 files, 2 had errors and 0 failed to transfer."), "{report}");
    let (status, failed) = app.get("/get_failed_job/?job_id=2").await;
    assert_eq!(status, 200);
    assert_eq!(failed["error_files"], 2);
    app.stop().await;
}

async fn wait_for_file(path: &std::path::Path) -> String {
    let mut text = None;
    wait_for(
        &format!("{} to be written", path.display()),
        Duration::from_secs(10),
        async || {
            text = std::fs::read_to_string(path).ok();
            text.is_some()
        },
    )
    .await;
    text.unwrap()
}

/// Completion is event-driven: the callback follows the last file's event at once, not
/// after a polling interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callback_follows_the_last_event_quickly() {
    let receiver = Receiver::start().await;
    let app = TestApp::start_with(Kind::Sqlite, |c| {
        quick(c);
        c.jobs.sweep_interval_secs = 3600;
    })
    .await;
    assert_eq!(
        app.post_job(job(3, &["p/1", "p/2"], &receiver)).await.0,
        202
    );
    let ev = |p: &str| FileEvent {
        path: p.into(),
        at_ms: 1_700_000_000_000,
        error: None,
    };
    app.store().apply_file_events(&[ev("p/1")]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.attempts(), 0, "not complete yet");
    let last_event = Instant::now();
    app.store().apply_file_events(&[ev("p/2")]).await.unwrap();
    let got = receiver.wait_delivered(1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    let latency = got[0].at.duration_since(last_event);
    assert!(
        latency < Duration::from_secs(1),
        "callback {latency:?} after the last event"
    );
    app.stop().await;
}

both_backends!(expired_job_gets_code_10_and_a_report);
async fn expired_job_gets_code_10_and_a_report(kind: Kind) {
    let receiver = Receiver::start().await;
    let app = TestApp::start_with(kind, |c| {
        quick(c);
        c.jobs.expiry_secs = 1;
    })
    .await;
    assert_eq!(
        app.post_job(job(4, &["e/1", "e/2"], &receiver)).await.0,
        202
    );
    app.store()
        .apply_file_events(&[FileEvent {
            path: "e/1".into(),
            at_ms: 1,
            error: None,
        }])
        .await
        .unwrap();
    let got = receiver.wait_delivered(1, PIPELINE).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body["return_code"], 10);
    assert_eq!(got[0].body["ready_files"], 1);
    assert!(
        got[0].body["comment"]
            .as_str()
            .unwrap()
            .starts_with("Job timed out after 1 seconds.")
    );
    let report = wait_for_file(&app.db.dir.path().join("reports/failed/4.txt")).await;
    assert!(
        report.contains("Files that failed to transfer:\n  e/2\n"),
        "{report}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_job_with_a_dead_callback_is_removed_after_the_grace_period() {
    let receiver = Receiver::start().await;
    receiver.status.store(503, Ordering::SeqCst);
    let app = TestApp::start_with(Kind::Sqlite, |c| {
        quick(c);
        c.jobs.expiry_secs = 1;
        c.callbacks.expired_grace_secs = 2;
    })
    .await;
    assert_eq!(app.post_job(job(5, &["d/1"], &receiver)).await.0, 202);
    wait_for(
        "the expired job's removal",
        Duration::from_secs(20),
        async || app.get("/staging/?job_id=5").await.0 == 404,
    )
    .await;
    assert!(receiver.attempts() >= 2, "retried during the grace period");
    assert!(receiver.delivered().is_empty());
    let history = app.store().history(10).await.unwrap();
    assert_eq!(
        (
            history[0].job_id,
            history[0].return_code,
            history[0].delivered
        ),
        (5, 10, false)
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callback_endpoint_down_then_up_is_delivered_once() {
    let receiver = Receiver::start().await;
    receiver.fail_first.store(2, Ordering::SeqCst);
    let app = TestApp::start_with(Kind::Sqlite, quick).await;
    assert_eq!(app.post_job(job(6, &["u/1"], &receiver)).await.0, 202);
    app.store()
        .apply_file_events(&[FileEvent {
            path: "u/1".into(),
            at_ms: 1,
            error: None,
        }])
        .await
        .unwrap();
    let got = receiver.wait_delivered(1, PIPELINE).await;
    assert_eq!(got.len(), 1);
    assert_eq!(receiver.attempts(), 3, "two failures, then the delivery");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(receiver.attempts(), 3, "nothing after the delivery");
    assert_eq!(app.store().pending_callbacks().await.unwrap(), 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_respect_the_rate_limit() {
    let receiver = Receiver::start().await;
    let app = TestApp::start_with(Kind::Sqlite, |c| {
        quick(c);
        c.callbacks.per_minute = 5;
    })
    .await;
    for id in 0..8 {
        let path = format!("r/{id}");
        assert_eq!(app.post_job(job(id, &[&path], &receiver)).await.0, 202);
    }
    let events: Vec<FileEvent> = (0..8)
        .map(|id| FileEvent {
            path: format!("r/{id}"),
            at_ms: 1,
            error: None,
        })
        .collect();
    app.store().apply_file_events(&events).await.unwrap();
    receiver.wait_delivered(5, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(receiver.attempts(), 5, "at most 5 in the first minute");
    assert_eq!(
        app.store().pending_callbacks().await.unwrap(),
        3,
        "the rest wait their turn"
    );
    app.stop().await;
}

/// Restaging re-asks Scout only for the files still waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restage_asks_only_for_waiting_files() {
    // No Kafka publishing: the test decides which files arrive.
    let tape = Tape::start(|s| s.kafka_brokers = None).await;
    let receiver = Receiver::start().await;
    let app = TestApp::start_with(Kind::Sqlite, |c| {
        quick(c);
        tape.configure(c);
        c.jobs.restage_interval_secs = 2;
    })
    .await;
    assert_eq!(
        app.post_job(job(7, &["w/1", "w/2", "w/3"], &receiver))
            .await
            .0,
        202
    );
    wait_for(
        "the first stage request",
        Duration::from_secs(10),
        async || tape.sim.counters().stage_requests >= 1,
    )
    .await;
    assert_eq!(tape.sim.counters().staged_paths, 3);
    app.store()
        .apply_file_events(&[
            FileEvent {
                path: "w/1".into(),
                at_ms: 1,
                error: None,
            },
            FileEvent {
                path: "w/2".into(),
                at_ms: 1,
                error: Some("bad".into()),
            },
        ])
        .await
        .unwrap();
    wait_for("a restage", Duration::from_secs(10), async || {
        tape.sim.counters().stage_requests >= 2
    })
    .await;
    let c = tape.sim.counters();
    assert_eq!(c.staged_paths, 4, "the restage named only w/3");
    assert_eq!(c.largest_stage_paths, 3);
    app.stop().await;
}

/// DELETE cancels at Scout only the paths no other job wants, and sends no callback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_cancels_only_unshared_paths() {
    // Recalls that never finish within the test: a recall completed before the cancel
    // leaves nothing to cancel (a loaded machine took 200 ms between the two stages).
    let tape = Tape::start(|s| {
        s.kafka_brokers = None;
        s.recall_delay = Duration::from_secs(600);
    })
    .await;
    let receiver = Receiver::start().await;
    let app = TestApp::start_with(Kind::Sqlite, |c| {
        quick(c);
        tape.configure(c);
    })
    .await;
    assert_eq!(
        app.post_job(job(8, &["s/shared", "s/mine"], &receiver))
            .await
            .0,
        202
    );
    assert_eq!(
        app.post_job(job(9, &["s/shared", "s/theirs"], &receiver))
            .await
            .0,
        202
    );
    // Both jobs staged first: a stage that reaches Scout after the cancel renews the
    // recall, as it should, and would make this test a race.
    wait_for("both jobs staged", Duration::from_secs(10), async || {
        tape.sim.counters().stage_requests >= 2
    })
    .await;
    let r = app
        .http
        .delete(app.url("/staging/?job_id=8"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let c = tape.sim.counters();
    assert_eq!(c.cancel_requests, 1);
    assert!(tape.sim.was_cancelled("s/mine"));
    assert!(!tape.sim.was_cancelled("s/shared"), "job 9 still wants it");
    assert_eq!(app.get("/staging/?job_id=9").await.0, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.attempts(), 0, "no callback on delete");
    app.stop().await;
}

/// Scout refusing the request (a 4xx other than 403) for good ends the job with code 102:
/// a body too large is first sent in halves, but one path too large alone is a refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scout_refusal_gives_code_102() {
    // The simulator refuses bodies over 200 bytes with 413; the client allows larger ones.
    let tape = Tape::start(|s| {
        s.kafka_brokers = None;
        s.max_body_bytes = 200;
    })
    .await;
    let receiver = Receiver::start().await;
    let app = TestApp::start_with(Kind::Sqlite, |c| {
        quick(c);
        tape.configure(c);
    })
    .await;
    let long: Vec<String> = (0..10)
        .map(|i| format!("mwa/a/{}/number/{i}.fits", "rather-long-".repeat(20)))
        .collect();
    let (status, _) = app.post_job(files_job(10, long, receiver.url())).await;
    assert_eq!(status, 202);
    let got = receiver.wait_delivered(1, PIPELINE).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body["return_code"], 102);
    assert!(
        got[0].body["comment"]
            .as_str()
            .unwrap()
            .contains("Scout refused")
    );
    app.stop().await;
}

/// Scout down: the job waits and is staged when Scout returns; nothing is lost or failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scout_outage_delays_staging() {
    let tape = Tape::start(|_| {}).await;
    tape.node.set_failure_fraction(1.0);
    let receiver = Receiver::start().await;
    let app = TestApp::start_with(Kind::Sqlite, |c| {
        quick(c);
        tape.configure(c);
    })
    .await;
    assert_eq!(app.post_job(job(11, &["o/1"], &receiver)).await.0, 202);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(receiver.attempts(), 0, "an outage is not a failure");
    assert_eq!(app.get("/staging/?job_id=11").await.0, 200);
    tape.node.set_failure_fraction(0.0);
    let got = receiver.wait_delivered(1, PIPELINE).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body["return_code"], 0);
    app.stop().await;
}

/// A job due again in the store is restaged while new jobs keep arriving: the engine takes
/// new jobs from the daemon's own handoff without asking the store, so this checks that it
/// still searches the store at least once a poll interval under a steady stream of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_job_is_restaged_under_a_stream_of_new_jobs() {
    let tape = Tape::start(|_| {}).await;
    tape.node.set_failure_fraction(1.0);
    let receiver = Receiver::start().await;
    let app = std::sync::Arc::new(
        TestApp::start_with(Kind::Sqlite, |c| {
            quick(c);
            tape.configure(c);
        })
        .await,
    );
    assert_eq!(app.post_job(job(11, &["d/due"], &receiver)).await.0, 202);
    // Its first stage fails (the client tries twice) and the engine stores the retry,
    // due 1-2 s later.
    wait_for(
        "the first stage's two tries",
        Duration::from_secs(10),
        async || tape.node.hits() >= 2,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    tape.node.set_failure_fraction(0.0);
    let stream = {
        let (app, receiver) = (app.clone(), receiver.clone());
        tokio::spawn(async move {
            for id in 1000.. {
                let path = format!("d/new{id}");
                assert_eq!(app.post_job(job(id, &[&path], &receiver)).await.0, 202);
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };
    let found = poll_until(Duration::from_secs(15), async || {
        receiver
            .delivered()
            .iter()
            .any(|r| r.body["job_id"] == 11 && r.body["return_code"] == 0)
    })
    .await;
    stream.abort();
    let _ = stream.await;
    assert!(
        found,
        "the due job was never restaged while new jobs kept coming"
    );
    // Completed: called back, or decided and waiting for its turn at the destination
    // (callbacks to one destination go a few at a time).
    let completed =
        receiver.delivered().len() as i64 + app.store().pending_callbacks().await.unwrap();
    assert!(
        completed > 10,
        "new jobs kept arriving and completing meanwhile"
    );
    match std::sync::Arc::try_unwrap(app) {
        Ok(app) => app.stop().await,
        Err(_) => panic!("the stream still holds the app"),
    }
}

/// An observation through the MWA adapter, with the tape system mounted under a prefix:
/// the adapter resolves the observation over HTTP, `stage-paths` adds the mount prefix for
/// Scout, the recall messages name the prefixed files, and `map-event-paths` maps them back
/// to the job's paths, so the job completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observation_through_the_mwa_adapter_with_a_mount_prefix() {
    use staged_testkit::metadata::MetadataSim;
    let metadata = MetadataSim::start(std::collections::HashMap::from([(
        1_234_567_890,
        vec![
            (
                "a.fits".to_string(),
                Some("bkt".to_string()),
                Some("/1234567890".to_string()),
            ),
            ("b.fits".to_string(), None, Some("1234567890".to_string())),
        ],
    )]))
    .await
    .unwrap();
    let tape = Tape::start(|_| {}).await;
    let receiver = Receiver::start().await;
    let app = TestApp::start_with(Kind::Sqlite, |c| {
        quick(c);
        tape.configure(c);
        c.adapter.wasm =
            Some(std::path::PathBuf::from(env!("STAGED_ADAPTERS_DIR")).join("adapter_mwa.wasm"));
        c.adapter.http_allow = AllowList::parse(&[metadata.addr.to_string()]).unwrap();
        c.adapter
            .settings
            .insert("data_files_url".into(), metadata.data_files_url().into());
        c.adapter
            .settings
            .insert("mount_prefix".into(), "/vss".into());
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
    assert_eq!(got.len(), 1, "attempts {}", receiver.attempts());
    assert_eq!(got[0].body["return_code"], 0, "{}", got[0].body);
    assert_eq!(got[0].body["total_files"], 2);
    assert_eq!(got[0].body["ready_files"], 2);
    // Scout was asked for the prefixed paths.
    assert!(
        tape.sim.file_state("/vss/mwa/bkt/1234567890/a.fits")
            == staged_testkit::scout::FileState::Online
    );
    assert!(
        tape.sim.file_state("/vss/mwa/1234567890/b.fits")
            == staged_testkit::scout::FileState::Online
    );
    app.stop().await;
}

/// An observation the metadata service does not know: callback 101; one it refuses (a
/// definite answer, not an outage): callback 100. An outage delays the job instead (see
/// the fault suite).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observation_lookup_failures_give_101_and_100() {
    use staged_testkit::metadata::MetadataSim;
    let metadata = MetadataSim::start_at(
        "127.0.0.1:0".parse().unwrap(),
        std::collections::HashMap::new(),
        [43],
    )
    .await
    .unwrap();
    let receiver = Receiver::start().await;
    let app = TestApp::start_with(Kind::Sqlite, |c| {
        quick(c);
        c.adapter.wasm =
            Some(std::path::PathBuf::from(env!("STAGED_ADAPTERS_DIR")).join("adapter_mwa.wasm"));
        c.adapter.http_allow = AllowList::parse(&[metadata.addr.to_string()]).unwrap();
        c.adapter
            .settings
            .insert("data_files_url".into(), metadata.data_files_url().into());
    })
    .await;
    let (status, _) = app
        .post_job(obs_job(21, json!({"obs_id": 42}), receiver.url()))
        .await;
    assert_eq!(status, 202);
    let got = receiver.wait_delivered(1, PIPELINE).await;
    assert_eq!(got[0].body["return_code"], 101, "{}", got[0].body);
    assert_eq!(got[0].body["comment"], "No files to stage.");
    let (status, _) = app
        .post_job(obs_job(22, json!({"obs_id": 43}), receiver.url()))
        .await;
    assert_eq!(status, 202);
    let got = receiver.wait_delivered(2, PIPELINE).await;
    let second = got
        .iter()
        .find(|r| r.body["job_id"] == 22)
        .expect("callback for job 22");
    assert_eq!(second.body["return_code"], 100, "{}", second.body);
    assert!(
        second.body["comment"]
            .as_str()
            .unwrap()
            .contains("HTTP 400"),
        "{}",
        second.body
    );
    drop(metadata);
    app.stop().await;
}

/// A misbehaving adapter costs the one job (code 199), not the daemon: a trap and an
/// endless loop while resolving each end their job, and the daemon keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_failure_while_resolving_gives_199() {
    let receiver = Receiver::start().await;
    let app = TestApp::start_with(Kind::Sqlite, |c| {
        quick(c);
        c.adapter.wasm = Some(
            std::path::PathBuf::from(env!("STAGED_ADAPTERS_DIR")).join("adapter_hostile.wasm"),
        );
        c.adapter.call_timeout_ms = 1000;
    })
    .await;
    for (id, mode) in [(30, "trap"), (31, "loop")] {
        let (status, body) = app
            .post_job(obs_job(id, json!({"do": mode}), receiver.url()))
            .await;
        assert_eq!(status, 202, "{body}");
    }
    let got = receiver.wait_delivered(2, PIPELINE).await;
    assert_eq!(got.len(), 2);
    for r in &got {
        assert_eq!(r.body["return_code"], 199, "{}", r.body);
        assert!(
            r.body["comment"]
                .as_str()
                .unwrap()
                .starts_with("Exception while trying to create job")
        );
    }
    assert_eq!(
        app.get("/ping/").await.0,
        200,
        "the daemon is still serving"
    );
    app.stop().await;
}

/// A callback to a host name goes through the checked resolver and arrives (IP literals,
/// which every other test uses, never reach a resolver).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_to_a_host_name_is_resolved_and_delivered() {
    let receiver = Receiver::start().await;
    let app = TestApp::start_with(Kind::Sqlite, quick).await;
    let url = format!("http://localhost:{}/cb", receiver.addr.port());
    assert_eq!(app.post_job(files_job(30, ["n/1"], url)).await.0, 202);
    app.store()
        .apply_file_events(&[FileEvent {
            path: "n/1".into(),
            at_ms: 1_700_000_000_000,
            error: None,
        }])
        .await
        .unwrap();
    let got = receiver.wait_delivered(1, PIPELINE).await;
    assert_eq!(got.len(), 1, "{}", app.describe(30).await);
    assert_eq!(got[0].body["return_code"], 0);
    app.stop().await;
}

/// `[[callbacks.credentials]]`: a destination with credentials of its own gets those, every
/// other one the `[callbacks]` pair, so one leaked pair does not open every endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_destination_gets_its_own_credentials() {
    let special = Receiver::start().await;
    let plain = Receiver::start().await;
    let entry = format!(
        "hosts = [\"127.0.0.1:{}\"]\nusername = \"special\"\npassword = \"sp-pw\"\n",
        special.addr.port()
    );
    let app = TestApp::start_with(Kind::Sqlite, |c| {
        quick(c);
        c.callbacks.credentials = vec![toml::from_str(&entry).unwrap()];
    })
    .await;
    assert_eq!(app.post_job(job(40, &["c/1"], &special)).await.0, 202);
    assert_eq!(app.post_job(job(41, &["c/2"], &plain)).await.0, 202);
    let events: Vec<FileEvent> = ["c/1", "c/2"]
        .map(|p| FileEvent {
            path: p.into(),
            at_ms: 1_700_000_000_000,
            error: None,
        })
        .into();
    app.store().apply_file_events(&events).await.unwrap();
    let s = special.wait_delivered(1, PIPELINE).await;
    let p = plain.wait_delivered(1, PIPELINE).await;
    assert_eq!((s.len(), p.len()), (1, 1), "{}", app.describe(40).await);
    // special:sp-pw and asvo:cb-pw.
    assert_eq!(s[0].auth.as_deref(), Some("Basic c3BlY2lhbDpzcC1wdw=="));
    assert_eq!(p[0].auth.as_deref(), Some("Basic YXN2bzpjYi1wdw=="));
    app.stop().await;
}

/// A job larger than one path-mapping call reaches the adapter in bounded calls, at intake
/// and when staged: with the adapter's input limit below the job's paths but above one
/// call's, the job still completes (one call for all of them would be refused as too
/// large, and the job failed), and Scout gets stage requests of at most 10,000 paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_larger_than_one_adapter_call_is_mapped_in_bounded_calls() {
    const FILES: usize = 15_000;
    let tape = Tape::start(|_| {}).await;
    let receiver = Receiver::start().await;
    let app = TestApp::start_with(Kind::Sqlite, |c| {
        quick(c);
        tape.configure(c);
        c.adapter = crate::common::adapters::adapter_config("mwa");
        // 10,000 of these paths are ~360 kB, all of them ~540 kB.
        c.adapter.max_input_bytes = 450 * 1024;
        c.adapter.max_output_bytes = 450 * 1024;
    })
    .await;
    let paths: Vec<String> = (0..FILES)
        .map(|i| format!("mwa/1234567890/1234567890_{i:05}.fits"))
        .collect();
    let bytes: usize = paths.iter().map(String::len).sum();
    assert!(bytes > 450 * 1024, "the job's paths are over the limit");
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    let (status, body) = app.post_job(job(1, &refs, &receiver)).await;
    assert_eq!(status, 202, "{body}");
    let got = receiver.wait_delivered(1, PIPELINE).await;
    assert_eq!(
        (
            got[0].body["return_code"].as_i64(),
            got[0].body["ready_files"].as_u64()
        ),
        (Some(0), Some(FILES as u64)),
        "{}",
        got[0].body
    );
    let c = tape.sim.counters();
    assert_eq!(c.staged_paths, FILES as u64);
    assert!(c.largest_stage_paths <= 10_000, "{c:?}");
    app.stop().await;
}
