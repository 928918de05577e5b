//! The store's contract, run against a real SQLite file and a real PostgreSQL database.

use std::collections::HashSet;
use std::time::Duration;

use crate::common::{Kind, TestDb};
use staged::config::JobsConfig;
use staged::store::{CallbackGate, FileEvent, Intake, NewJob, Store, StoreOptions};

fn opts(db: &TestDb) -> StoreOptions {
    let jobs = JobsConfig {
        expiry_secs: 3600,
        ..Default::default()
    };
    StoreOptions::from_config(&db.config().database, &jobs)
}

fn job(id: i64, files: &[&str]) -> NewJob {
    NewJob {
        job_id: id,
        notify_url: "http://127.0.0.1:9/cb".into(),
        files: files.iter().map(|s| s.to_string()).collect(),
        obs: None,
        submitted_by: None,
        ..Default::default()
    }
}

/// The ids of the jobs `store` claims (up to `limit`), by the engine's own claim: first the
/// jobs handed over at intake, then due jobs from the store.
async fn claimed_ids(store: &Store, limit: i64) -> Vec<i64> {
    // A fresh claimer has never searched the store, so it searches whenever there is room.
    let claim = store
        .stage_claims(Duration::from_secs(3600))
        .claim(limit)
        .await;
    if let Some(e) = claim.search_error {
        panic!("claiming due jobs failed: {e}");
    }
    claim.work.iter().map(|w| w.job_id).collect()
}

fn ready(path: &str, at_ms: i64) -> FileEvent {
    FileEvent {
        path: path.into(),
        at_ms,
        error: None,
    }
}

fn failed(path: &str, at_ms: i64, msg: &str) -> FileEvent {
    FileEvent {
        path: path.into(),
        at_ms,
        error: Some(msg.into()),
    }
}

both_backends!(
    submit_then_read,
    concurrent_submissions_one_winner_per_id,
    events_apply_to_every_job_holding_the_path,
    delete_leaves_shared_paths_of_other_jobs,
    stats_and_job_list,
    stats_agree_with_the_files_in_every_state,
    a_backlog_of_expired_jobs_is_expired_in_one_sweep,
    survives_reopen,
    bad_job_does_not_fail_its_batch,
    hundred_thousand_file_job,
    observation_job_is_stored,
    completion_is_queued_with_the_counts,
    new_jobs_are_born_claimed_by_their_daemon,
    a_clean_close_gives_claims_up,
    callback_claim_passes_over_blocked_destinations,
    cancels_beside_other_writers_are_never_refused,
);

/// A cancel reads the request's files before it writes. On SQLite a transaction begun
/// deferred could not take the write lock once another connection had committed, and
/// failed at once with "database is locked", whatever the busy timeout: code 517
/// (SQLITE_BUSY_SNAPSHOT) in a full run of the suite, where the Tape REST API answered a
/// 500 while the engine recorded a stage request, and code 5 here, where the cancels also
/// contend with each other. Cancels now run beside a writer that never pauses, and every
/// one of them must go through.
async fn cancels_beside_other_writers_are_never_refused(kind: Kind) {
    const REQUESTS: i64 = 60;
    let db = TestDb::new(kind).await;
    let store = Store::open(&opts(&db)).await.unwrap();
    for i in 1..=REQUESTS {
        let (a, b) = (format!("c/{i}/a"), format!("c/{i}/b"));
        store
            .submit(NewJob {
                notify_url: String::new(),
                request_id: Some(format!("r{i}")),
                ..job(-i, &[&a, &b])
            })
            .await
            .unwrap();
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (store, stop) = (store.clone(), stop.clone());
        tokio::spawn(async move {
            let mut k = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                k += 1;
                let path = format!("w/{k}");
                store.submit(job(10_000 + k, &[&path])).await.unwrap();
                store
                    .apply_file_events(&[ready(&path, 1_000)])
                    .await
                    .unwrap();
            }
            k
        })
    };
    let cancels = (1..=REQUESTS).map(|i| {
        let store = store.clone();
        async move {
            store
                .cancel_request_files(&format!("r{i}"), &[format!("c/{i}/a")])
                .await
        }
    });
    let outcomes = futures::future::join_all(cancels).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.await.unwrap();
    let refused: Vec<String> = outcomes
        .iter()
        .filter_map(|o| o.as_ref().err().map(|e| e.to_string()))
        .collect();
    assert!(
        refused.is_empty(),
        "{} of {REQUESTS} cancels failed beside {written} writes: {:?}",
        refused.len(),
        refused.first()
    );
    for (i, o) in (1..=REQUESTS).zip(&outcomes) {
        match o.as_ref().unwrap() {
            staged::store::CancelOutcome::Cancelled { unwanted, .. } => {
                assert_eq!(unwanted, &vec![format!("c/{i}/a")])
            }
            other => panic!("request r{i}: {other:?}"),
        }
    }
    store.close().await;
}

async fn submit_then_read(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = Store::open(&opts(&db)).await.unwrap();
    assert_eq!(
        store.submit(job(7, &["a/1", "a/2"])).await.unwrap(),
        Intake::Created
    );
    assert_eq!(
        store.submit(job(7, &["a/3"])).await.unwrap(),
        Intake::Duplicate
    );
    assert!(store.job_exists(7).await.unwrap());
    assert!(!store.job_exists(8).await.unwrap());

    let s = store.job_summary(7).await.unwrap().unwrap();
    assert_eq!((s.total_files, s.ready_files, s.error_files), (2, 0, 0));
    assert!(!s.completed());
    assert_eq!(s.last_ready_ms, None);
    let now = staged::store::now_ms();
    assert!((now - s.created_ms).abs() < 60_000, "created_ms is now-ish");

    // The duplicate did not add its file.
    let files = store.job_files(7).await.unwrap();
    assert_eq!(
        files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
        vec!["a/1", "a/2"]
    );
    assert!(store.job_summary(8).await.unwrap().is_none());
    store.close().await;
}

async fn concurrent_submissions_one_winner_per_id(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = Store::open(&opts(&db)).await.unwrap();
    // 100 ids, each submitted 4 times at once: batches will hold repeats and races.
    let mut tasks = Vec::new();
    for round in 0..4 {
        for id in 0..100i64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let path = format!("p/{id}/{round}");
                (id, store.submit(job(id, &[&path])).await.unwrap())
            }));
        }
    }
    let mut created = HashSet::new();
    let mut duplicates = 0;
    for t in tasks {
        let (id, outcome) = t.await.unwrap();
        match outcome {
            Intake::Created => assert!(created.insert(id), "job {id} created twice"),
            Intake::Duplicate => duplicates += 1,
        }
    }
    assert_eq!(created.len(), 100);
    assert_eq!(duplicates, 300);
    for id in 0..100 {
        let files = store.job_files(id).await.unwrap();
        assert_eq!(files.len(), 1, "job {id} holds exactly the winner's file");
    }
    store.close().await;
}

async fn events_apply_to_every_job_holding_the_path(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = Store::open(&opts(&db)).await.unwrap();
    store
        .submit(job(1, &["shared", "only1", "err1"]))
        .await
        .unwrap();
    store.submit(job(2, &["shared", "only2"])).await.unwrap();

    let changed = store
        .apply_file_events(&[
            ready("shared", 5_000),
            failed("err1", 5_000, "tape error"),
            ready("unknown/path", 5_000),
        ])
        .await
        .unwrap();
    assert_eq!(changed, 3, "shared in two jobs, plus err1");
    // Re-applying the same batch (a Kafka redelivery) changes nothing.
    let again = store
        .apply_file_events(&[ready("shared", 9_000), failed("err1", 9_000, "tape error")])
        .await
        .unwrap();
    assert_eq!(again, 0);

    for id in [1, 2] {
        let f = store.job_files(id).await.unwrap();
        let shared = f.iter().find(|f| f.path == "shared").unwrap();
        assert!(shared.ready && !shared.error);
        assert_eq!(shared.ready_ms, Some(5_000), "first ready time kept");
    }
    let s1 = store.job_summary(1).await.unwrap().unwrap();
    assert_eq!((s1.ready_files, s1.error_files), (1, 1));
    assert_eq!(s1.last_ready_ms, Some(5_000));

    // An error after ready does not undo it; a ready after an error wins.
    store
        .apply_file_events(&[failed("shared", 6_000, "late"), ready("err1", 7_000)])
        .await
        .unwrap();
    let f1 = store.job_files(1).await.unwrap();
    let shared = f1.iter().find(|f| f.path == "shared").unwrap();
    assert!(shared.ready && !shared.error);
    let err1 = f1.iter().find(|f| f.path == "err1").unwrap();
    assert!(err1.ready && !err1.error);
    assert_eq!(err1.ready_ms, Some(7_000));

    // Error and ready for one path in one batch: ready wins whatever the order.
    store
        .apply_file_events(&[ready("only1", 8_000), failed("only1", 8_001, "x")])
        .await
        .unwrap();
    let s1 = store.job_summary(1).await.unwrap().unwrap();
    assert_eq!((s1.ready_files, s1.error_files, s1.total_files), (3, 0, 3));
    assert!(s1.completed());
    let s2 = store.job_summary(2).await.unwrap().unwrap();
    assert!(!s2.completed());
    store
        .apply_file_events(&[failed("only2", 9_000, "gone")])
        .await
        .unwrap();
    let s2 = store.job_summary(2).await.unwrap().unwrap();
    assert_eq!((s2.ready_files, s2.error_files), (1, 1));
    assert!(s2.completed(), "every file ready or failed");
    store.close().await;
}

/// The totals, read from the jobs' counters, are what counting the files gives, through
/// every way a file changes: ready, failed, failed then ready, shared by two jobs, failed at
/// submission, cancelled, an observation job with no files yet, a redelivered event.
async fn stats_agree_with_the_files_in_every_state(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = Store::open(&opts(&db)).await.unwrap();
    store.submit(job(1, &["a", "b", "c"])).await.unwrap();
    store.submit(job(2, &["b", "d"])).await.unwrap();
    store
        .submit(NewJob {
            obs: Some("{\"obs_id\": 1}".into()),
            ..job(3, &[])
        })
        .await
        .unwrap();
    store
        .submit(NewJob {
            notify_url: String::new(),
            request_id: Some("req-1".into()),
            failed: vec![("bad/..".into(), "a `..` segment".into())],
            ..job(-4, &["e", "f", "g"])
        })
        .await
        .unwrap();
    let counted = async || {
        let (mut ready, mut error, mut waiting) = (0, 0, 0);
        for id in [1, 2, 3, -4] {
            for f in store.job_files(id).await.unwrap() {
                match (f.ready, f.error) {
                    (true, _) => ready += 1,
                    (false, true) => error += 1,
                    (false, false) => waiting += 1,
                }
            }
        }
        (ready, error, waiting)
    };
    let check = async |when: &str| {
        let s = store.stats().await.unwrap();
        assert_eq!(
            (s.ready_files, s.error_files, s.waiting_files),
            counted().await,
            "{when}: {s:?}"
        );
        s
    };
    check("at submission").await;
    store
        .apply_file_events(&[
            ready("a", 1_000),
            failed("b", 2_000, "x"),
            ready("e", 1_000),
        ])
        .await
        .unwrap();
    check("after ready and failed").await;
    store
        .apply_file_events(&[
            ready("b", 3_000),
            ready("b", 3_000),
            failed("d", 3_000, "y"),
        ])
        .await
        .unwrap();
    check("after failed then ready, redelivered").await;
    store
        .cancel_request_files("req-1", &["f".to_string()])
        .await
        .unwrap();
    check("after a cancel").await;
    store
        .apply_file_events(&[ready("c", 4_000), ready("g", 4_000)])
        .await
        .unwrap();
    let s = check("with jobs complete").await;
    assert_eq!((s.completed_jobs, s.incomplete_jobs), (3, 1), "{s:?}");
    store.close().await;
}

/// More jobs due to expire than one expiry transaction takes (1,000): one sweep expires them
/// all, each with its callback queued once, and a second sweep finds nothing.
async fn a_backlog_of_expired_jobs_is_expired_in_one_sweep(kind: Kind) {
    const JOBS: i64 = 2_500;
    let db = TestDb::new(kind).await;
    let jobs = JobsConfig {
        expiry_secs: 0,
        ..Default::default()
    };
    let store = Store::open(&StoreOptions::from_config(&db.config().database, &jobs))
        .await
        .unwrap();
    let submitted = futures::future::join_all((1..=JOBS).map(|id| {
        let store = &store;
        async move { store.submit(job(id, &[&format!("exp/{id}")])).await }
    }))
    .await;
    assert!(submitted.iter().all(|r| matches!(r, Ok(Intake::Created))));
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(store.expire_due(0).await.unwrap(), JOBS as u64);
    assert_eq!(store.pending_callbacks().await.unwrap(), JOBS);
    // Every one is done: a second sweep finds none unfinished and due.
    assert_eq!(
        store.expire_due(0).await.unwrap(),
        0,
        "nothing left to expire"
    );
    assert_eq!(
        store.pending_callbacks().await.unwrap(),
        JOBS,
        "queued once"
    );
    store.close().await;
}

async fn delete_leaves_shared_paths_of_other_jobs(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = Store::open(&opts(&db)).await.unwrap();
    store.submit(job(1, &["s", "x"])).await.unwrap();
    store.submit(job(2, &["s", "y"])).await.unwrap();
    assert!(store.delete_job(1).await.unwrap());
    assert!(!store.delete_job(1).await.unwrap());
    assert!(store.job_summary(1).await.unwrap().is_none());
    assert!(store.job_files(1).await.unwrap().is_empty());
    assert_eq!(store.job_files(2).await.unwrap().len(), 2);
    // The id is free again, as in the original.
    assert_eq!(store.submit(job(1, &["z"])).await.unwrap(), Intake::Created);
    store.close().await;
}

async fn stats_and_job_list(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = Store::open(&opts(&db)).await.unwrap();
    store.submit(job(3, &["a", "b"])).await.unwrap();
    store.submit(job(1, &["c"])).await.unwrap();
    store.submit(job(2, &["d", "e", "f"])).await.unwrap();
    store
        .apply_file_events(&[
            ready("c", 1_000),
            ready("a", 2_000),
            failed("d", 3_000, "x"),
        ])
        .await
        .unwrap();
    let s = store.stats().await.unwrap();
    assert_eq!(s.completed_jobs, 1);
    assert_eq!(s.incomplete_jobs, 2);
    assert_eq!((s.ready_files, s.error_files, s.waiting_files), (2, 1, 3));

    let list = store.job_list().await.unwrap();
    assert_eq!(
        list.iter().map(|j| j.job_id).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    let j2 = &list[1];
    assert_eq!((j2.total_files, j2.ready_files, j2.error_files), (3, 0, 1));
    assert_eq!(j2.last_ready_ms, None);
    assert_eq!(j2.sample_path.as_deref(), Some("d"));
    assert_eq!(list[2].last_ready_ms, Some(2_000));
    store.close().await;
}

async fn survives_reopen(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = Store::open(&opts(&db)).await.unwrap();
    store.submit(job(42, &["f/1"])).await.unwrap();
    store.close().await;
    // Migrations on an up-to-date database are a no-op.
    Store::migrate_only(&opts(&db)).await.unwrap();
    let store = Store::open(&opts(&db)).await.unwrap();
    assert_eq!(store.job_files(42).await.unwrap().len(), 1);
    assert_eq!(
        store.submit(job(42, &["f/2"])).await.unwrap(),
        Intake::Duplicate
    );
    store.close().await;
}

async fn bad_job_does_not_fail_its_batch(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = Store::open(&opts(&db)).await.unwrap();
    // PostgreSQL refuses NUL in text; SQLite stores it. Either way only that job may fail.
    let mut tasks = Vec::new();
    for id in 0..40i64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut j = job(id, &["p"]);
            if id == 17 {
                j.notify_url = "http://h/\0bad".into();
            }
            (id, store.submit(j).await)
        }));
    }
    for t in tasks {
        let (id, outcome) = t.await.unwrap();
        match (id, kind) {
            (17, Kind::Postgres) => assert!(outcome.is_err(), "NUL refused by PostgreSQL"),
            _ => assert_eq!(outcome.unwrap(), Intake::Created, "job {id}"),
        }
    }
    store.close().await;
}

async fn hundred_thousand_file_job(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = Store::open(&opts(&db)).await.unwrap();
    let paths: Vec<String> = (0..100_000)
        .map(|i| format!("mwa/big/{i:06}.fits"))
        .collect();
    let j = NewJob {
        job_id: 1,
        notify_url: "http://127.0.0.1:9/cb".into(),
        files: paths.clone(),
        obs: None,
        submitted_by: None,
        ..Default::default()
    };
    assert_eq!(store.submit(j).await.unwrap(), Intake::Created);
    let s = store.job_summary(1).await.unwrap().unwrap();
    assert_eq!(s.total_files, 100_000);
    for chunk in paths.chunks(10_000) {
        let events: Vec<FileEvent> = chunk.iter().map(|p| ready(p, 1_000)).collect();
        assert_eq!(store.apply_file_events(&events).await.unwrap(), 10_000);
    }
    let s = store.job_summary(1).await.unwrap().unwrap();
    assert_eq!(s.ready_files, 100_000);
    assert!(s.completed());
    assert_eq!(store.job_files(1).await.unwrap().len(), 100_000);
    assert!(store.delete_job(1).await.unwrap());
    store.close().await;
}

async fn observation_job_is_stored(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = Store::open(&opts(&db)).await.unwrap();
    let j = NewJob {
        job_id: 5,
        notify_url: "http://127.0.0.1:9/cb".into(),
        files: vec![],
        obs: Some(r#"{"obs_id":1234567890}"#.into()),
        submitted_by: None,
        ..Default::default()
    };
    assert_eq!(store.submit(j).await.unwrap(), Intake::Created);
    let s = store.job_summary(5).await.unwrap().unwrap();
    assert_eq!(s.total_files, 0);
    assert!(!s.completed(), "an unresolved observation is not complete");

    // Its daemon resolves it into files, once.
    assert_eq!(claimed_ids(&store, 10).await, vec![5]);
    let paths = vec!["obs/1".to_string(), "obs/2".to_string()];
    assert!(store.set_resolved_files(5, &paths).await.unwrap());
    assert!(
        !store.set_resolved_files(5, &paths).await.unwrap(),
        "already resolved"
    );
    let files: Vec<String> = store
        .job_files(5)
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.path)
        .collect();
    assert_eq!(files, paths);
    assert_eq!(store.job_summary(5).await.unwrap().unwrap().total_files, 2);
    store.close().await;
}

/// The batch that settles a job's last file queues its callback with the job's counts, and
/// an error later cured by a ready counts as ready.
async fn completion_is_queued_with_the_counts(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = Store::open(&opts(&db)).await.unwrap();
    store.submit(job(1, &["a", "b", "c"])).await.unwrap();
    store.submit(job(2, &["a", "d"])).await.unwrap();

    store
        .apply_file_events(&[failed("a", 1_000, "tape"), failed("b", 1_000, "tape")])
        .await
        .unwrap();
    // A redelivery of the same errors, then "a" arrives after all.
    store
        .apply_file_events(&[failed("a", 1_000, "tape"), ready("a", 2_000)])
        .await
        .unwrap();
    assert_eq!(store.pending_callbacks().await.unwrap(), 0, "c and d wait");
    store
        .apply_file_events(&[ready("c", 3_000), ready("d", 3_000), ready("c", 3_001)])
        .await
        .unwrap();

    let mut rows = store.claim_due_callbacks("test", 60_000, 10).await.unwrap();
    rows.sort_by_key(|r| r.job_id);
    let got: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                r.job_id,
                r.return_code,
                r.total_files,
                r.ready_files,
                r.error_files,
            )
        })
        .collect();
    assert_eq!(got, vec![(1, 5, 3, 2, 1), (2, 0, 2, 2, 0)]);
    // Nothing more happens to a decided job.
    store.apply_file_events(&[ready("b", 4_000)]).await.unwrap();
    assert_eq!(store.pending_callbacks().await.unwrap(), 2);
    store.close().await;
}

/// A job is claimed by the daemon that accepted it: that daemon starts on it without
/// waiting, another daemon sharing the database only once the lease lapsed.
async fn new_jobs_are_born_claimed_by_their_daemon(kind: Kind) {
    let db = TestDb::new(kind).await;
    let lease = Duration::from_millis(1_500);
    let ours = Store::open(&opts(&db).with_lease(lease)).await.unwrap();
    let other = Store::open(&opts(&db).with_lease(lease)).await.unwrap();
    assert_ne!(ours.owner(), other.owner());

    ours.submit(job(1, &["a"])).await.unwrap();
    ours.submit(job(2, &["b"])).await.unwrap();
    assert!(claimed_ids(&other, 10).await.is_empty());
    let mine = claimed_ids(&ours, 1).await;
    assert_eq!(mine, vec![1]);

    // Job 2 was never started; once its lease lapsed the other daemon takes it, and only
    // one of the two gets it.
    tokio::time::sleep(lease + Duration::from_millis(300)).await;
    let theirs = claimed_ids(&other, 10).await;
    assert!(theirs.contains(&2), "lapsed job taken over: {theirs:?}");
    let again = claimed_ids(&ours, 10).await;
    assert!(!again.contains(&2), "claimed twice: {again:?}");
    ours.close().await;
    other.close().await;
}

/// A daemon that stops cleanly gives up the jobs it accepted and had not started, so the
/// next daemon starts on them at once rather than after the lease.
async fn a_clean_close_gives_claims_up(kind: Kind) {
    let db = TestDb::new(kind).await;
    let long = Duration::from_secs(3600);
    let first = Store::open(&opts(&db).with_lease(long)).await.unwrap();
    first.submit(job(1, &["a"])).await.unwrap();
    first.close().await;

    let second = Store::open(&opts(&db).with_lease(long)).await.unwrap();
    assert_eq!(claimed_ids(&second, 10).await, vec![1]);
    second.close().await;
}

/// The intake writer keeps its connection between batches; when the database drops it, the
/// next job is still written (on a fresh connection), not refused.
#[tokio::test]
async fn intake_survives_its_connection_being_dropped_postgres() {
    let db = TestDb::new(Kind::Postgres).await;
    let store = Store::open(&opts(&db)).await.unwrap();
    assert_eq!(store.submit(job(1, &["a"])).await.unwrap(), Intake::Created);
    assert!(db.terminate_pg_sessions().await > 0);
    assert_eq!(store.submit(job(2, &["b"])).await.unwrap(), Intake::Created);
    assert_eq!(
        store.submit(job(2, &["b"])).await.unwrap(),
        Intake::Duplicate
    );
    assert!(store.job_summary(2).await.unwrap().is_some());
    store.close().await;
}

/// A destination with no room is left out of the callback claim: its rows, however many
/// and however early due, are neither claimed nor in the way of another destination's; one
/// with some room gets no more than that; and a backing-off destination gives only rows
/// past their grace.
async fn callback_claim_passes_over_blocked_destinations(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = Store::open(&opts(&db)).await.unwrap();
    let at = |id: i64, host: &str| NewJob {
        notify_url: format!("http://{host}/cb/{id}"),
        ..job(id, &[&format!("p/{id}")])
    };
    // 600 rows for a, due first (more than one read of the claim takes); then 3 for b and
    // 3 for c.
    const A: i64 = 600;
    let mut posts = tokio::task::JoinSet::new();
    for id in 0..A + 6 {
        let host = match id {
            _ if id < A => "a",
            _ if id < A + 3 => "b:8080",
            _ => "C",
        };
        let (store, j) = (store.clone(), at(id, host));
        posts.spawn(async move { store.submit(j).await.unwrap() });
    }
    posts.join_all().await;
    let paths: Vec<FileEvent> = (0..A + 6).map(|id| ready(&format!("p/{id}"), 1)).collect();
    store.apply_file_events(&paths[..A as usize]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    store.apply_file_events(&paths[A as usize..]).await.unwrap();

    let gate = CallbackGate {
        busy: vec!["http://a:80".into()],
        backing_off: vec!["http://c:80".into()],
        room: [("http://b:8080".to_string(), 2)].into(),
        default_room: 10,
    };
    let rows = store.claim_callbacks("t", 60_000, 10, &gate).await.unwrap();
    let mut ids: Vec<_> = rows.iter().map(|r| (r.job_id, r.origin.clone())).collect();
    ids.sort();
    assert_eq!(
        ids,
        vec![
            (A, "http://b:8080".to_string()),
            (A + 1, "http://b:8080".to_string())
        ],
        "only b, and only as many as its room"
    );
    // With nothing blocked, a's rows come first again.
    let rows = store.claim_due_callbacks("t", 60_000, 3).await.unwrap();
    assert!(rows.iter().all(|r| r.origin == "http://a:80"), "{rows:?}");
    store.close().await;
}
