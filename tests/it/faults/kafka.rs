//! Kafka faults, each injected for real against the daemon in-process: librdkafka's mock
//! cluster as the broker (taken down and brought back up), recall messages from before the
//! jobs (a replayed topic), and a consumer stalled behind a failing store.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use staged::config::Config;
use staged_testkit::scout::recall_message;

use super::ledger::{self, Row};
use crate::common::pipeline::quick;
use crate::common::pipeline::{Receiver, TOPIC, Tape};
use crate::common::{Kind, TestApp, TestDb};
use crate::common::{files_job, poll_until, wait_for};

crate::both_backends!(
    old_recalls_do_not_complete_new_jobs,
    broker_gone_for_a_while,
    stalled_consumer_is_reported_and_not_restaged,
    stopping_while_the_broker_is_gone,
);

fn producer(tape: &Tape) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", tape.cluster.bootstrap_servers())
        .set("linger.ms", "1")
        .create()
        .unwrap()
}

async fn send(producer: &FutureProducer, path: &str, payload: &str) {
    producer
        .send(
            FutureRecord::to(TOPIC).payload(payload).key(path),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
}

/// The simulator answering recalls after `recall_delay`, a callback receiver, and the
/// daemon on `kind` wired to both (then `tweak`), once its consumer reads.
async fn start_reading(
    kind: Kind,
    recall_delay: Duration,
    tweak: impl FnOnce(&mut Config),
) -> (Tape, Receiver, TestApp) {
    let tape = Tape::start(|s| s.recall_delay = recall_delay).await;
    let receiver = Receiver::start().await;
    let app = TestApp::start_with(kind, |c| {
        quick(c);
        tape.configure(c);
        tweak(c);
    })
    .await;
    wait_alive(&app, true, Duration::from_secs(30)).await;
    (tape, receiver, app)
}

async fn stats(app: &TestApp) -> Value {
    app.get("/get_stats/").await.1
}

async fn wait_alive(app: &TestApp, want: bool, limit: Duration) {
    wait_for(&format!("kafka_alive = {want}"), limit, async || {
        stats(app).await["kafka_alive"] == json!(want)
    })
    .await;
}

/// Posts `ids` with `files(id)` each; returns the ids answered 202 and, of those, the ids
/// found in the store right after.
async fn post_jobs(
    app: &TestApp,
    receiver: &Receiver,
    ids: impl Iterator<Item = i64>,
    files: impl Fn(i64) -> Vec<String>,
) -> (Vec<i64>, u64) {
    let mut acked = Vec::new();
    let mut stored = 0;
    for id in ids {
        let (status, _) = app.post_job(files_job(id, files(id), receiver.url())).await;
        if status == 202 {
            acked.push(id);
            // A callback may already have removed it: that too proves it was stored.
            let (s, _) = app.get(&format!("/staging/?job_id={id}")).await;
            let called = receiver
                .delivered()
                .iter()
                .any(|r| r.body["job_id"] == json!(id));
            if s == 200 || called {
                stored += 1;
            }
        }
    }
    (acked, stored)
}

/// Delivered callbacks per job id.
fn deliveries(receiver: &Receiver) -> HashMap<i64, Vec<Value>> {
    let mut by_job: HashMap<i64, Vec<Value>> = HashMap::new();
    for r in receiver.delivered() {
        by_job
            .entry(r.body["job_id"].as_i64().unwrap())
            .or_default()
            .push(r.body);
    }
    by_job
}

/// Waits until every job of `acked` has a callback (or `limit` passes), then a moment more
/// to catch repeats.
async fn wait_called_back(receiver: &Receiver, acked: &[i64], limit: Duration) {
    poll_until(limit, async || {
        let got = deliveries(receiver);
        acked.iter().all(|id| got.contains_key(id))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// Jobs of `acked` called back exactly once, with `ok` saying the callback was right.
fn called_back_once(receiver: &Receiver, acked: &[i64], ok: impl Fn(&Value) -> bool) -> u64 {
    let got = deliveries(receiver);
    acked
        .iter()
        .filter(|id| got.get(id).is_some_and(|c| c.len() == 1 && ok(&c[0])))
        .count() as u64
}

/// A replayed topic (a new consumer group, expired offsets) delivers recalls that finished
/// before the jobs asked for their files, successes and failures alike. None of them may
/// settle a job: each job completes on the recall its own stage request brings, with code
/// 0, and the old messages are counted as stale.
async fn old_recalls_do_not_complete_new_jobs(kind: Kind) {
    // Fresh recalls take 2 s: the old messages arrive well before them.
    let (tape, receiver, app) = start_reading(kind, Duration::from_secs(2), |_| {}).await;
    let files = |id: i64| (0..3).map(|k| format!("old/{id}/{k}.fits")).collect();
    let p = producer(&tape);
    // A first job completed by a recall the test publishes: the consumer is reading.
    let (mut acked, mut stored) = post_jobs(&app, &receiver, 0..=0, files).await;
    for path in files(0) {
        let now = chrono::Utc::now();
        send(&p, &path, &recall_message(&path, now, now, "")).await;
    }
    wait_called_back(&receiver, &acked, Duration::from_secs(20)).await;
    let posted = Instant::now();
    let (more, more_stored) = post_jobs(&app, &receiver, 1..=10, files).await;
    acked.extend(&more);
    stored += more_stored;

    // What the topic held from two days ago: every file recalled, one in three failed.
    let long_ago = chrono::Utc::now() - chrono::Duration::days(2);
    for &id in &more {
        for (k, path) in files(id).iter().enumerate() {
            let error = if k == 2 { "media error" } else { "" };
            send(&p, path, &recall_message(path, long_ago, long_ago, error)).await;
        }
    }
    wait_called_back(&receiver, &acked, Duration::from_secs(30)).await;

    let all_staged = |cb: &Value| {
        cb["return_code"] == json!(0)
            && cb["ready_files"] == json!(3)
            && cb["error_files"] == json!(0)
    };
    let called_back = called_back_once(&receiver, &acked, all_staged);
    let row = Row {
        fault: "kafka old recalls replayed",
        backend: kind.name(),
        acknowledged: acked.len() as u64,
        stored,
        called_back,
        lost: acked.len() as u64 - called_back,
    };
    ledger::record(&row);
    let got = deliveries(&receiver);
    assert_eq!(
        row.lost, 0,
        "{row:?}: every job must complete on its own recall, once: {got:?}"
    );
    assert_eq!(row.stored, row.acknowledged, "{row:?}");
    // Each callback came after the job's own recall, 2 s after its stage request.
    for r in receiver
        .delivered()
        .iter()
        .filter(|r| r.body["job_id"] != json!(0))
    {
        let after = r.at.saturating_duration_since(posted);
        assert!(
            after >= Duration::from_millis(1500),
            "job {} called back {after:?} after it was posted, before its recall",
            r.body["job_id"]
        );
    }
    let s = stats(&app).await;
    assert!(
        s["kafka_consumer"]["stale_messages"].as_u64().unwrap_or(0) >= 30,
        "old messages counted as stale: {s}"
    );
    app.stop().await;
}

/// The broker goes away for a while and comes back. The API keeps taking jobs meanwhile
/// and says Kafka is not alive; once the broker is back, the consumer reads again within
/// seconds (reconnect back-off capped, reads not paused for long) and every job completes.
async fn broker_gone_for_a_while(kind: Kind) {
    // The simulator's own recalls come too late for this test: the test publishes them.
    let (tape, receiver, app) = start_reading(kind, Duration::from_secs(120), |_| {}).await;
    let files = |id: i64| (0..2).map(|k| format!("gone/{id}/{k}.fits")).collect();
    let p = producer(&tape);

    // Before: one job goes through.
    let (mut acked, mut stored) = post_jobs(&app, &receiver, 1..=1, files).await;
    for path in files(1) {
        let now = chrono::Utc::now();
        send(&p, &path, &recall_message(&path, now, now, "")).await;
    }
    wait_called_back(&receiver, &acked, Duration::from_secs(20)).await;

    tape.cluster.broker_down(1).unwrap();
    wait_alive(&app, false, Duration::from_secs(15)).await;
    let (more, more_stored) = post_jobs(&app, &receiver, 2..=11, files).await;
    assert_eq!(
        more.len(),
        10,
        "the API takes jobs while the broker is gone"
    );
    acked.extend(&more);
    stored += more_stored;
    // Gone long enough for every back-off to grow to its cap.
    tokio::time::sleep(Duration::from_secs(15)).await;
    tape.cluster.broker_up(1).unwrap();
    let back = Instant::now();

    // Their recalls, published as soon as the broker is back (a fresh producer connects at once).
    let p = producer(&tape);
    for &id in &more {
        for path in files(id) {
            let now = chrono::Utc::now();
            send(&p, &path, &recall_message(&path, now, now, "")).await;
        }
    }
    let published = back.elapsed();
    wait_called_back(&receiver, &acked, Duration::from_secs(30)).await;
    let got = deliveries(&receiver);
    let last = receiver
        .delivered()
        .iter()
        .map(|r| r.at)
        .max()
        .expect("some callback");
    let recovery = last.saturating_duration_since(back);

    let called_back = called_back_once(&receiver, &acked, |cb| cb["return_code"] == json!(0));
    let row = Row {
        fault: "kafka broker down 15 s",
        backend: kind.name(),
        acknowledged: acked.len() as u64,
        stored,
        called_back,
        lost: acked.len() as u64 - called_back,
    };
    ledger::record(&row);
    let s = stats(&app).await;
    assert_eq!(row.lost, 0, "{row:?}: {got:?}; stats {s}");
    assert_eq!(row.stored, row.acknowledged, "{row:?}");
    eprintln!(
        "broker back: recalls published after {published:?}, every job called back after {recovery:?}"
    );
    // Usually 4-5 s here; 13-14 s when librdkafka stays out of its group after the outage
    // and the client is re-created (8 s after the broker answers, then its join). Before
    // the fix nothing was read within 25 s.
    assert!(
        recovery < published + Duration::from_secs(25),
        "the consumer took {recovery:?} after the broker came back (messages there after {published:?})"
    );
    wait_alive(&app, true, Duration::from_secs(10)).await;
    app.stop().await;
}

/// SIGTERM while the broker is gone: the daemon stops within its grace period and a few
/// seconds for the consumer, not when librdkafka gives up on leaving its group or on a
/// commit it cannot send. Then the same with the broker gone for good (the cluster
/// destroyed), which is also what a failing test leaves behind.
async fn stopping_while_the_broker_is_gone(kind: Kind) {
    for destroyed in [false, true] {
        let (tape, receiver, app) = start_reading(kind, Duration::from_secs(120), |_| {}).await;
        let files = |id: i64| vec![format!("stop/{id}.fits")];
        let (acked, _) = post_jobs(&app, &receiver, 1..=3, files).await;
        assert_eq!(acked.len(), 3);
        // Read (and held uncommitted) by the consumer when the broker goes.
        let p = producer(&tape);
        let now = chrono::Utc::now();
        send(
            &p,
            "stop/1.fits",
            &recall_message("stop/1.fits", now, now, ""),
        )
        .await;
        drop(p);
        tape.cluster.broker_down(1).unwrap();
        wait_alive(&app, false, Duration::from_secs(15)).await;
        let tape = if destroyed {
            drop(tape);
            None
        } else {
            Some(tape)
        };
        let broker = if destroyed { "destroyed" } else { "down" };
        let started = Instant::now();
        let stopped = tokio::time::timeout(Duration::from_secs(30), app.stop()).await;
        let took = started.elapsed();
        eprintln!("stopped with the broker {broker}: {took:?}");
        assert!(
            stopped.is_ok(),
            "the daemon had not stopped 30 s after it was asked to, the broker {broker}"
        );
        drop(tape);
    }
}

/// Makes every update of `job_files` fail inside the database until [`heal`]: the ingest's
/// transactions really fail, so its batches are retried and nothing is committed.
async fn break_store(db: &TestDb) {
    for sql in match db.kind {
        Kind::Sqlite => vec![
            "CREATE TRIGGER break_updates BEFORE UPDATE ON job_files \
             BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
        ],
        Kind::Postgres => vec![
            "CREATE FUNCTION break_updates() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$",
            "CREATE TRIGGER break_updates BEFORE UPDATE ON job_files \
             FOR EACH ROW EXECUTE FUNCTION break_updates()",
        ],
    } {
        raw_sql(db, sql).await;
    }
}

async fn heal(db: &TestDb) {
    match db.kind {
        Kind::Sqlite => raw_sql(db, "DROP TRIGGER break_updates").await,
        Kind::Postgres => raw_sql(db, "DROP TRIGGER break_updates ON job_files").await,
    }
}

async fn raw_sql(db: &TestDb, sql: &'static str) {
    use sqlx::Connection;
    match db.kind {
        Kind::Sqlite => {
            let mut c = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
        }
        Kind::Postgres => {
            let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
        }
    }
}

/// The consumer reads but cannot commit (every batch fails in the store): messages wait
/// and nothing advances. `/get_stats/` must say so (kafka_alive false, the stall's start),
/// and restages must not ask Scout again for files whose messages are queued. Once the
/// store works again the consumer catches up by itself and every job completes once.
async fn stalled_consumer_is_reported_and_not_restaged(kind: Kind) {
    let (tape, receiver, app) = start_reading(kind, Duration::from_millis(100), |c| {
        c.kafka.stall_secs = 2;
        c.jobs.restage_interval_secs = 1;
    })
    .await;
    break_store(&app.db).await;
    let files = |id: i64| (0..4).map(|k| format!("stall/{id}/{k}.fits")).collect();
    let (acked, stored) = post_jobs(&app, &receiver, 1..=5, files).await;

    wait_alive(&app, false, Duration::from_secs(20)).await;
    let s = stats(&app).await;
    assert!(
        s["kafka_consumer"]["stalled_since"].is_f64(),
        "the stall is shown: {s}"
    );
    assert!(
        s["kafka_consumer"]["lag"].as_i64().unwrap_or(0) > 0,
        "the waiting messages are shown: {s}"
    );
    // Three restage intervals while stalled: Scout is not asked again.
    let before = tape.sim.counters().stage_requests;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let restaged = tape.sim.counters().stage_requests - before;

    heal(&app.db).await;
    wait_called_back(&receiver, &acked, Duration::from_secs(30)).await;
    let called_back = called_back_once(&receiver, &acked, |cb| cb["return_code"] == json!(0));
    let row = Row {
        fault: "kafka consumer stalled",
        backend: kind.name(),
        acknowledged: acked.len() as u64,
        stored,
        called_back,
        lost: acked.len() as u64 - called_back,
    };
    ledger::record(&row);
    let got = deliveries(&receiver);
    assert_eq!(row.lost, 0, "{row:?}: {got:?}");
    assert_eq!(row.stored, row.acknowledged, "{row:?}");
    assert_eq!(
        restaged, 0,
        "restages while the consumer was stalled with the messages queued"
    );
    wait_alive(&app, true, Duration::from_secs(15)).await;
    assert!(stats(&app).await["kafka_consumer"]["stalls"].as_u64() >= Some(1));
    app.stop().await;
}
