//! Store faults: a statement or a commit fails under the daemon, on both backends.
//!
//! Each test posts jobs through the real HTTP API from concurrent clients while the fault is
//! on, takes the fault away, posts again, and then counts from a connection of its own (and
//! after the daemon stopped) which acknowledged jobs the database really holds. The promise:
//! every 202 is stored with all its files, a failed write is never answered 202, and the
//! daemon takes new jobs again as soon as the fault is gone, without a restart.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use sqlx::Connection;

use super::failing_vfs;
use super::ledger::{self, Row};
use crate::common::pipeline::{Receiver, Tape, quick};
use crate::common::{Kind, NO_CALLBACK, TestApp};
use staged_testkit::pg::Cluster;

const FILES_PER_JOB: usize = 20;
const CLIENTS: usize = 8;
/// The longest a round of posts may take.
const ROUND_LIMIT: Duration = Duration::from_secs(30);

/// What the clients heard: each job id with the status its POST got (0: no answer).
#[derive(Default)]
struct Answers {
    by_job: HashMap<i64, u16>,
}

impl Answers {
    fn acknowledged(&self) -> HashSet<i64> {
        self.by_job
            .iter()
            .filter(|(_, s)| **s == 202)
            .map(|(id, _)| *id)
            .collect()
    }

    fn histogram(&self) -> std::collections::BTreeMap<u16, usize> {
        let mut h = std::collections::BTreeMap::new();
        for s in self.by_job.values() {
            *h.entry(*s).or_default() += 1;
        }
        h
    }

    fn count(&self, status: u16) -> usize {
        self.by_job.values().filter(|s| **s == status).count()
    }
}

fn job_body(id: i64, notify_url: &str) -> serde_json::Value {
    let files: Vec<String> = (0..FILES_PER_JOB)
        .map(|i| format!("mwa/{id:010}/{id:010}_ch{i:03}_a_longer_name_to_fill_pages.fits"))
        .collect();
    serde_json::json!({
        "job_id": id,
        "files": files,
        "notify_url": notify_url,
    })
}

/// `CLIENTS` clients posting `per_client` new jobs each, one after another, ids from
/// `next_id`. Every request is bounded in time; one that gets no answer counts as status 0.
async fn post_round(app: &TestApp, next_id: &Arc<AtomicI64>, per_client: usize) -> Answers {
    post_round_to(app, next_id, per_client, NO_CALLBACK).await
}

/// [`post_round`] with callbacks to `notify_url`.
async fn post_round_to(
    app: &TestApp,
    next_id: &Arc<AtomicI64>,
    per_client: usize,
    notify_url: &str,
) -> Answers {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(12))
        .build()
        .unwrap();
    // A round ends after this however slow the daemon answers, so that a daemon wedged by
    // the fault fails the test instead of hanging it.
    let deadline = tokio::time::Instant::now() + ROUND_LIMIT;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let http = http.clone();
        let url = app.url("/staging/");
        let next_id = next_id.clone();
        let notify_url = notify_url.to_string();
        clients.push(tokio::spawn(async move {
            let mut seen = Vec::with_capacity(per_client);
            for _ in 0..per_client {
                if tokio::time::Instant::now() > deadline {
                    break;
                }
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                let status = match http
                    .post(&url)
                    .json(&job_body(id, &notify_url))
                    .send()
                    .await
                {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        if status != 202 {
                            let body = r.text().await.unwrap_or_default();
                            assert!(
                                body.contains("errormsg"),
                                "a {status} without a JSON errormsg: {body:?}"
                            );
                        }
                        status
                    }
                    Err(_) => 0,
                };
                seen.push((id, status));
            }
            seen
        }));
    }
    let mut answers = Answers::default();
    for c in clients {
        answers.by_job.extend(c.await.unwrap());
    }
    answers
}

/// A read-only connection of the test's own to the SQLite file at `path`.
async fn sqlite_reader(path: &Path) -> sqlx::SqliteConnection {
    let url = format!("sqlite://{}?mode=ro", path.display());
    sqlx::SqliteConnection::connect(&url)
        .await
        .expect("opening the test's own connection to the SQLite file")
}

/// Files stored per job, read over a connection of the test's own.
async fn stored_files_sqlite(path: &Path) -> HashMap<i64, i64> {
    stored_files(&mut sqlite_reader(path).await).await
}

/// `PRAGMA integrity_check` of the SQLite file at `path`, through a connection of the
/// test's own: "ok", or what SQLite found wrong.
async fn sqlite_integrity(path: &Path) -> String {
    match sqlx::query_scalar::<_, String>("PRAGMA integrity_check")
        .fetch_all(&mut sqlite_reader(path).await)
        .await
    {
        Ok(lines) => lines.join("; "),
        Err(e) => format!("integrity_check failed: {e}"),
    }
}

const STORED_FILES: &str = "SELECT j.job_id, \
     (SELECT count(*) FROM job_files f WHERE f.job_id = j.job_id) FROM jobs j";

/// The test's count races the daemon's writers for SQLite's locks (and, just after an I/O
/// fault, the kernel's page cache): a failed read is retried for a bounded time, each
/// failure printed, before the test gives up.
async fn stored_files(conn: &mut sqlx::SqliteConnection) -> HashMap<i64, i64> {
    let until = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match sqlx::query_as::<_, (i64, i64)>(STORED_FILES)
            .fetch_all(&mut *conn)
            .await
        {
            Ok(rows) => return rows.into_iter().collect(),
            Err(e) if std::time::Instant::now() < until => {
                eprintln!("counting stored jobs failed, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("counting stored jobs: {e}"),
        }
    }
}

async fn stored_files_pg(url: &str) -> HashMap<i64, i64> {
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .expect("opening the test's own connection to PostgreSQL");
    let rows: Vec<(i64, i64)> = sqlx::query_as(STORED_FILES)
        .fetch_all(&mut conn)
        .await
        .expect("counting stored jobs");
    rows.into_iter().collect()
}

/// How many acknowledged jobs a store holds completely (the job and every one of its files).
fn complete(acknowledged: &HashSet<i64>, stored: &HashMap<i64, i64>) -> u64 {
    acknowledged
        .iter()
        .filter(|id| stored.get(id) == Some(&(FILES_PER_JOB as i64)))
        .count() as u64
}

/// A tmpfs of the test's own, unmounted when dropped (also when the test fails).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts one of `size_kb` KiB, or says why it could not.
    fn mount(size_kb: u64) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size_kb}k"), "tmpfs"])
                .arg(dir.path()),
        )?;
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let plain = Command::new("umount").arg(self.dir.path()).status();
        if !matches!(plain, Ok(s) if s.success()) {
            // Something still holds a file open (a daemon a failed test left running):
            // detach now, the kernel frees it when the last file closes.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// Takes all free space of the file system holding `dir` but `slack` bytes, in a file that
/// deleting gives back.
fn fill(dir: &Path, slack: u64) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("creating the filler file");
    let chunk = vec![0u8; 64 * 1024];
    let mut written: u64 = 0;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling the file system: {e}"),
        }
    }
    f.set_len(written.saturating_sub(slack))
        .expect("shrinking the filler file");
    f.sync_all().ok();
    path
}

/// SQLite on a full disk: the file system under the database fills up while eight clients
/// post 20-file jobs, then space comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_disk_full() {
    let fs = match Tmpfs::mount(6 * 1024) {
        Ok(fs) => fs,
        Err(why) => {
            // Not root (CI is): the same fault through SQLite's page cap instead.
            eprintln!("no tmpfs ({why}); filling the database through max_page_count");
            return sqlite_page_cap_full("sqlite disk full").await;
        }
    };
    let db_path = fs.path().join("staged.db");
    let url = format!("sqlite://{}", db_path.display());
    let app = TestApp::start_with(Kind::Sqlite, |c| c.database.url = url.clone()).await;
    let next_id = Arc::new(AtomicI64::new(1));

    // A first round with room to spare, so the store has pages in use when the disk fills.
    let before = post_round(&app, &next_id, 4).await;
    assert_eq!(before.count(202), CLIENTS * 4, "posts before the fault");

    let filler = fill(fs.path(), 192 * 1024);
    let during = post_round(&app, &next_id, 40).await;
    let refused = during.by_job.len() - during.count(202);
    assert!(
        refused > 0,
        "the disk never filled up: every one of {} posts was acknowledged",
        during.by_job.len()
    );

    std::fs::remove_file(&filler).expect("giving the space back");
    let after = post_round(&app, &next_id, 10).await;

    let mut acknowledged = before.acknowledged();
    acknowledged.extend(during.acknowledged());
    acknowledged.extend(after.acknowledged());

    // Read by another connection while the daemon runs: a job held in a transaction that
    // never commits is invisible here.
    let live = stored_files_sqlite(&db_path).await;
    app.stop().await;
    let stored = stored_files_sqlite(&db_path).await;

    let stored_live = complete(&acknowledged, &live);
    let stored_n = complete(&acknowledged, &stored);
    let row = Row {
        fault: "sqlite disk full",
        backend: "sqlite",
        acknowledged: acknowledged.len() as u64,
        stored: stored_n,
        called_back: 0,
        lost: acknowledged.len() as u64 - stored_n.min(stored_live),
    };
    ledger::record(&row);
    eprintln!(
        "sqlite disk full: during the fault {} of {} posts got 202, {refused} were refused \
         ({} with 500); after it {} of {}; {row:?}",
        during.count(202),
        during.by_job.len(),
        during.count(500),
        after.count(202),
        after.by_job.len()
    );
    assert_eq!(row.lost, 0, "acknowledged jobs lost: {row:?}");
    assert_eq!(
        after.count(202),
        after.by_job.len(),
        "the daemon did not take jobs again once space came back"
    );
}

/// PostgreSQL refusing commits: a deferred constraint trigger fails the commit of every
/// transaction that inserts a job whose id is a multiple of four. The statement itself
/// succeeds; only `COMMIT` (here the end of intake's one-statement transaction) fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_commit_fails() {
    let app = TestApp::start(Kind::Postgres).await;
    let refuse = |id: i64| id % 4 == 0;
    let mut admin = sqlx::PgConnection::connect(&app.db.url).await.unwrap();
    sqlx::raw_sql(
        "CREATE FUNCTION fault_refuse_commit() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN \
             IF NEW.job_id % 4 = 0 THEN \
                 RAISE EXCEPTION 'injected fault: job % refused at commit', NEW.job_id; \
             END IF; \
             RETURN NULL; \
         END $$; \
         CREATE CONSTRAINT TRIGGER fault_refuse_commit AFTER INSERT ON jobs \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fault_refuse_commit();",
    )
    .execute(&mut admin)
    .await
    .expect("installing the failing constraint trigger");

    let next_id = Arc::new(AtomicI64::new(1));
    let during = post_round(&app, &next_id, 30).await;
    sqlx::raw_sql("DROP TRIGGER fault_refuse_commit ON jobs")
        .execute(&mut admin)
        .await
        .unwrap();
    let after = post_round(&app, &next_id, 10).await;

    let mut acknowledged = during.acknowledged();
    acknowledged.extend(after.acknowledged());
    let live = stored_files_pg(&app.db.url).await;
    let url = app.db.url.clone();
    let db = {
        let TestApp { server, db, .. } = app;
        server.unwrap().stop().await.unwrap();
        db
    };
    let stored = stored_files_pg(&url).await;
    drop(db);

    let stored_n = complete(&acknowledged, &stored).min(complete(&acknowledged, &live));
    let row = Row {
        fault: "postgres commit fails",
        backend: "postgres",
        acknowledged: acknowledged.len() as u64,
        stored: stored_n,
        called_back: 0,
        lost: acknowledged.len() as u64 - stored_n,
    };
    ledger::record(&row);
    let refused_acked: Vec<i64> = during
        .acknowledged()
        .into_iter()
        .filter(|id| refuse(*id))
        .collect();
    let others_refused = during
        .by_job
        .iter()
        .filter(|(id, s)| !refuse(**id) && **s != 202)
        .count();
    eprintln!(
        "postgres commit fails: {} of {} posts got 202 during the fault ({} with 500), \
         {others_refused} of them refused though their commit could succeed; {row:?}",
        during.count(202),
        during.by_job.len(),
        during.count(500)
    );
    assert_eq!(row.lost, 0, "acknowledged jobs lost: {row:?}");
    assert!(
        refused_acked.is_empty(),
        "jobs whose commit failed were answered 202: {refused_acked:?}"
    );
    assert_eq!(
        others_refused, 0,
        "jobs that could commit were refused with their failing batch-mates"
    );
    assert_eq!(
        after.count(202),
        after.by_job.len(),
        "the daemon did not take jobs again once commits succeeded"
    );
}

/// When the server last started, as it says.
async fn start_time(cluster: &Cluster) -> String {
    let mut conn = sqlx::PgConnection::connect(&cluster.url()).await.unwrap();
    sqlx::query_scalar("SELECT pg_postmaster_start_time()::text")
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

/// PostgreSQL restarted under load: the server of a cluster of the test's own crashes
/// (immediate stop) and comes back while eight clients post.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart() {
    let cluster = Cluster::start().expect("a PostgreSQL server of the test's own");
    let url = cluster.url();
    let app = TestApp::start_with(Kind::Sqlite, |c| c.database.url = url.clone()).await;
    let next_id = Arc::new(AtomicI64::new(1));

    let started = start_time(&cluster).await;
    let load = post_round(&app, &next_id, 40);
    let restarts = async {
        // Restart twice while the clients are posting (ids are handed out as they post).
        for at in [60, 200] {
            while next_id.load(Ordering::Relaxed) < at {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let c = &cluster;
            tokio::task::block_in_place(|| c.restart()).expect("restarting the server");
        }
    };
    let (during, ()) = tokio::join!(load, restarts);
    let after = post_round(&app, &next_id, 10).await;
    assert_ne!(
        start_time(&cluster).await,
        started,
        "the server was not restarted"
    );

    let mut acknowledged = during.acknowledged();
    acknowledged.extend(after.acknowledged());
    app.stop().await;
    let stored = stored_files_pg(&url).await;
    let stored_n = complete(&acknowledged, &stored);
    let row = Row {
        fault: "postgres restart",
        backend: "postgres",
        acknowledged: acknowledged.len() as u64,
        stored: stored_n,
        called_back: 0,
        lost: acknowledged.len() as u64 - stored_n,
    };
    ledger::record(&row);
    eprintln!(
        "postgres restart: {} of {} posts got 202 across two restarts ({} with 500, {} with 503); \
         after them {} of {}; {row:?}",
        during.count(202),
        during.by_job.len(),
        during.count(500),
        during.count(503),
        after.count(202),
        after.by_job.len()
    );
    assert_eq!(row.lost, 0, "acknowledged jobs lost: {row:?}");
    assert_eq!(
        after.count(202),
        after.by_job.len(),
        "the daemon did not take jobs again once the server was back"
    );
    drop(cluster);
}

/// SQLite on a full disk with the whole pipeline running: the disk fills while jobs are
/// being staged, recall events ingested and callbacks recorded, so the engine's, the
/// ingest's and the outbox's writes fail as well as intake's. Once space is back, every
/// acknowledged job must reach exactly one delivered callback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_disk_full_pipeline() {
    let fs = Tmpfs::mount(6 * 1024).unwrap_or_else(|why| {
        panic!("the disk-full test mounts a tmpfs and needs root to do it: {why}")
    });
    let db_path = fs.path().join("staged.db");
    let url = format!("sqlite://{}", db_path.display());
    let tape = Tape::start(|_| {}).await;
    let receiver = Receiver::start().await;
    let app = TestApp::start_with(Kind::Sqlite, |c| {
        quick(c);
        c.database.url = url.clone();
        c.callbacks.per_minute = 6000;
        tape.configure(c);
    })
    .await;
    let cb = receiver.url();
    let next_id = Arc::new(AtomicI64::new(1));

    let before = post_round_to(&app, &next_id, 2, &cb).await;
    assert_eq!(before.count(202), CLIENTS * 2, "posts before the fault");
    let filler = fill(fs.path(), 192 * 1024);
    let during = post_round_to(&app, &next_id, 15, &cb).await;
    // Leave the engine, the ingest and the notifier a moment on the full disk.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    std::fs::remove_file(&filler).expect("giving the space back");
    let after = post_round_to(&app, &next_id, 4, &cb).await;

    let mut acknowledged = before.acknowledged();
    acknowledged.extend(during.acknowledged());
    acknowledged.extend(after.acknowledged());

    // Every acknowledged job is staged and called back; bounded wait.
    let delivered_ids = |r: &Receiver| -> Vec<i64> {
        r.delivered()
            .iter()
            .filter_map(|c| c.body["job_id"].as_i64())
            .collect()
    };
    crate::common::poll_until(Duration::from_secs(40), async || {
        let got: HashSet<i64> = delivered_ids(&receiver).into_iter().collect();
        acknowledged.is_subset(&got)
    })
    .await;
    // A repeat would show up within a retry interval.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let delivered = delivered_ids(&receiver);
    let mut times: HashMap<i64, usize> = HashMap::new();
    for id in &delivered {
        *times.entry(*id).or_default() += 1;
    }
    let repeated: Vec<i64> = times
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| *id)
        .collect();
    let not_ok: Vec<i64> = receiver
        .delivered()
        .iter()
        .filter(|c| c.body["return_code"].as_i64() != Some(0))
        .filter_map(|c| c.body["job_id"].as_i64())
        .collect();

    app.stop().await;
    let stored = stored_files_sqlite(&db_path).await;
    let called_back: HashSet<i64> = acknowledged
        .iter()
        .copied()
        .filter(|id| times.contains_key(id))
        .collect();
    let stored_ids: HashSet<i64> = acknowledged
        .iter()
        .copied()
        .filter(|id| stored.contains_key(id))
        .collect();
    let row = Row {
        fault: "sqlite disk full, pipeline",
        backend: "sqlite",
        acknowledged: acknowledged.len() as u64,
        stored: stored_ids.len() as u64,
        called_back: called_back.len() as u64,
        lost: acknowledged
            .iter()
            .filter(|id| !called_back.contains(id) && !stored_ids.contains(id))
            .count() as u64,
    };
    ledger::record(&row);
    eprintln!(
        "sqlite disk full, pipeline: during the fault {} of {} posts got 202; after it {} of \
         {}; {} callbacks delivered; {row:?}",
        during.count(202),
        during.by_job.len(),
        after.count(202),
        after.by_job.len(),
        delivered.len()
    );
    assert_eq!(row.lost, 0, "acknowledged jobs lost: {row:?}");
    assert_eq!(
        row.called_back, row.acknowledged,
        "acknowledged jobs never called back: {row:?}"
    );
    assert!(
        repeated.is_empty(),
        "jobs called back more than once: {repeated:?}"
    );
    assert!(
        not_ok.is_empty(),
        "jobs called back with a failure: {not_ok:?}"
    );
    assert_eq!(
        after.count(202),
        after.by_job.len(),
        "the daemon did not take jobs again once space came back"
    );
    drop(tape);
}

/// SQLite full without a file system of its own: `database.sqlite_max_pages` caps the
/// database a little above what it holds, eight clients post until it is full, and deleting
/// jobs through the API gives pages back. Runs everywhere (no root needed); the disk-full
/// test falls back to it where it cannot mount a tmpfs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_page_cap() {
    sqlite_page_cap_full("sqlite page cap").await
}

async fn sqlite_page_cap_full(fault: &'static str) {
    let next_id = Arc::new(AtomicI64::new(1));
    // The jobs whose deletion gives space back, written before the cap.
    let app = TestApp::start(Kind::Sqlite).await;
    let before = post_round(&app, &next_id, 8).await;
    assert_eq!(before.count(202), CLIENTS * 8, "posts before the fault");
    let TestApp { server, db, .. } = app;
    server.unwrap().stop().await.unwrap();
    let db_path = db.dir.path().join("staged.db");
    let pages: i64 = {
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db_path.display()))
            .await
            .unwrap();
        sqlx::query_scalar("PRAGMA page_count")
            .fetch_one(&mut conn)
            .await
            .unwrap()
    };
    let mut config = db.config();
    config.database.sqlite_max_pages = pages as u64 + 48;
    let server = staged::app::start(&config).await.expect("service starts");
    let app = TestApp {
        base: format!("http://{}", server.addr),
        server: Some(server),
        http: reqwest::Client::new(),
        db,
    };

    let during = post_round(&app, &next_id, 40).await;
    let refused = during.by_job.len() - during.count(202);
    assert!(
        refused > 0,
        "the database never filled up: every one of {} posts was acknowledged",
        during.by_job.len()
    );
    let stored_before = complete(&before.acknowledged(), &stored_files_sqlite(&db_path).await);
    for id in before.acknowledged() {
        let r = app
            .http
            .delete(app.url(&format!("/staging/?job_id={id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "deleting job {id} to free pages");
    }
    let after = post_round(&app, &next_id, 2).await;

    let mut acknowledged = during.acknowledged();
    acknowledged.extend(after.acknowledged());
    let live = stored_files_sqlite(&db_path).await;
    let TestApp { server, db, .. } = app;
    server.unwrap().stop().await.unwrap();
    let stored = stored_files_sqlite(&db_path).await;
    drop(db);

    let stored_n =
        complete(&acknowledged, &stored).min(complete(&acknowledged, &live)) + stored_before;
    let total = acknowledged.len() as u64 + before.acknowledged().len() as u64;
    let row = Row {
        fault,
        backend: "sqlite",
        acknowledged: total,
        stored: stored_n,
        called_back: 0,
        lost: total - stored_n,
    };
    ledger::record(&row);
    eprintln!(
        "{fault}: cap {} pages; during the fault {} of {} posts got 202, {refused} refused; \
         after deleting {} jobs {} of {}; {row:?}",
        pages + 48,
        during.count(202),
        during.by_job.len(),
        before.by_job.len(),
        after.count(202),
        after.by_job.len()
    );
    assert_eq!(row.lost, 0, "acknowledged jobs lost: {row:?}");
    assert_eq!(
        after.count(202),
        after.by_job.len(),
        "the daemon did not take jobs again once pages were free"
    );
}

/// A file system whose device fails writes: ext4 (no journal, `errors=continue`, so it
/// neither aborts nor turns read-only) on a loop device whose backing file lives, sparse,
/// on a small tmpfs. Filling the tmpfs makes every write of a new block to the device fail,
/// which the file system above reports as an I/O error, at `write` or, for data it had
/// cached, at `fsync`: SQLite's commit. Deleting the filler ends the fault. Unmounted and
/// detached when dropped.
///
/// The file system maps blocks without extents (as ext2/ext3 did). With extents, the kernel
/// this was written on (6.18) loses data after such a fault: blocks whose writeback failed
/// keep their extents marked unwritten even after they are written again and `fsync`
/// returns 0, so the device gives zeros for them once their pages leave the cache (all 100
/// of 100 blocks in a reproduction without SQLite; none without extents). SQLite then finds
/// its log or database "malformed", which failed this test about once in 100-200 runs under
/// load. Without extents it still happens, more rarely (once in 1,261 loaded runs): the
/// kernel's loss after a failed writeback is not only the extents'. Neither staged nor
/// SQLite can see that from inside, so the test reads the database back from the device
/// after the stop and says so when what reached it is damaged.
struct FailingDisk {
    outer: Tmpfs,
    loop_dev: String,
    mnt: PathBuf,
}

impl FailingDisk {
    fn mount() -> Result<FailingDisk, String> {
        let outer = Tmpfs::mount(32 * 1024)?;
        let img = outer.path().join("disk.img");
        run_ok(Command::new("truncate").args(["-s", "64m"]).arg(&img))?;
        run_ok(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-O", "^has_journal,^extent,^64bit"])
                .args(["-E", "nodiscard"])
                .arg(&img),
        )?;
        let loop_dev = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(&img))?;
        let mnt = outer.path().join("mnt");
        std::fs::create_dir(&mnt).map_err(|e| e.to_string())?;
        let disk = FailingDisk {
            outer,
            loop_dev,
            mnt,
        };
        disk.mount_fs()?;
        Ok(disk)
    }

    fn mount_fs(&self) -> Result<(), String> {
        run_ok(
            Command::new("mount")
                .args(["-o", "errors=continue", &self.loop_dev])
                .arg(&self.mnt),
        )
        .map(drop)
    }

    /// Unmounts and mounts the file system again, which drops its pages from the kernel's
    /// cache: what is read after this is what reached the device, as after a power cut.
    fn remount(&self) -> Result<(), String> {
        run_ok(Command::new("umount").arg(&self.mnt))?;
        self.mount_fs()
    }
}

/// Runs `c`, returning its trimmed stdout, or its stderr as the error.
fn run_ok(c: &mut Command) -> Result<String, String> {
    let out = c.output().map_err(|e| format!("{c:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "{c:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Drop for FailingDisk {
    fn drop(&mut self) {
        let plain = Command::new("umount").arg(&self.mnt).status();
        if !matches!(plain, Ok(s) if s.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        let _ = Command::new("losetup")
            .args(["-d", &self.loop_dev])
            .status();
        // `outer` unmounts itself after this.
    }
}

/// How an I/O-error test makes its database's writes fail, and end failing.
trait WriteFault {
    /// Writes (and the syncs of commits) fail from now on.
    fn start(&mut self);
    /// Writes work again.
    fn stop(&mut self);
    /// After the daemon stopped, before the test reads the database back: make what it
    /// reads be what reached the storage.
    fn settle(&mut self) {}
}

impl WriteFault for failing_vfs::Faults {
    fn start(&mut self) {
        failing_vfs::Faults::start(self);
    }

    fn stop(&mut self) {
        failing_vfs::Faults::stop(self);
    }
}

/// [`FailingDisk`] filled to make writes fail, its filler deleted to end that.
struct DiskFault {
    disk: FailingDisk,
    filler: Option<PathBuf>,
}

impl WriteFault for DiskFault {
    fn start(&mut self) {
        self.filler = Some(fill(self.disk.outer.path(), 0));
    }

    fn stop(&mut self) {
        if let Some(filler) = self.filler.take() {
            std::fs::remove_file(&filler).expect("ending the fault");
        }
    }

    fn settle(&mut self) {
        self.disk.remount().expect("remounting the device");
    }
}

/// SQLite whose writes fail (I/O errors, including at commit) while eight clients post,
/// through a VFS that fails them exactly when told: the daemon must answer 202 only for
/// what it stored, and take jobs again once writes work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut faults = failing_vfs::Faults::register(dir.path());
    let db_path = dir.path().join("staged.db");
    let url = format!("sqlite://{}?vfs={}", db_path.display(), failing_vfs::NAME);
    sqlite_write_fault("sqlite I/O error", &db_path, &url, &mut faults).await;
    let failed = faults.failed();
    eprintln!("sqlite I/O error: the VFS failed {failed:?}");
    assert!(
        failed.writes > 0 && failed.syncs > 0,
        "the fault did not fail both writes and commits' syncs: {failed:?}"
    );
}

/// [`sqlite_io_error`] on a real device that fails writes, as the kernel reports them.
/// Not run by default: about once in 1,000 loaded runs the kernel loses data that `fsync`
/// called written (see [`FailingDisk`]), and the test rightly says the database read back
/// is damaged. Run it with `--ignored` to try a kernel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the kernel may lose data after a failed writeback; see FailingDisk"]
async fn sqlite_device_io_error() {
    let disk = FailingDisk::mount().unwrap_or_else(|why| {
        panic!("the device I/O-error test needs root, tmpfs and loop devices: {why}")
    });
    let db_path = disk.mnt.join("staged.db");
    let url = format!("sqlite://{}", db_path.display());
    let mut fault = DiskFault { disk, filler: None };
    sqlite_write_fault("sqlite device I/O error", &db_path, &url, &mut fault).await;
}

/// Eight clients post before, during and after `fault`, against a daemon whose database is
/// at `url` (the file `db_path`); then, after the daemon stopped, every acknowledged job
/// must be stored whole, the database intact and its log checkpointed away.
async fn sqlite_write_fault(
    name: &'static str,
    db_path: &Path,
    url: &str,
    fault: &mut impl WriteFault,
) {
    let app = TestApp::start_with(Kind::Sqlite, |c| c.database.url = url.to_string()).await;
    let next_id = Arc::new(AtomicI64::new(1));

    let before = post_round(&app, &next_id, 4).await;
    assert_eq!(before.count(202), CLIENTS * 4, "posts before the fault");
    fault.start();
    let during = post_round(&app, &next_id, 40).await;
    let refused = during.by_job.len() - during.count(202);
    assert!(
        refused > 0,
        "the writes never failed: every one of {} posts was acknowledged",
        during.by_job.len()
    );
    fault.stop();
    // The kernel reports a failed writeback once more, to the next fsync of the file: the
    // first commit after the fault may fail for it (and must not be answered 202).
    let settle = post_round(&app, &next_id, 1).await;
    let after = post_round(&app, &next_id, 10).await;

    let mut acknowledged = before.acknowledged();
    acknowledged.extend(during.acknowledged());
    acknowledged.extend(settle.acknowledged());
    acknowledged.extend(after.acknowledged());
    let live = stored_files_sqlite(db_path).await;
    app.stop().await;
    // A clean stop leaves nothing in the log: the next start must not rebuild the log's
    // index from the log after an I/O fault (see the store's shutdown checkpoint). Before
    // the checkpoint was checked and repeated, every run of this test left 2 MB of log.
    let log_left = std::fs::metadata(db_path.with_extension("db-wal")).map(|m| m.len());
    fault.settle();
    let integrity = sqlite_integrity(db_path).await;
    let stored = stored_files_sqlite(db_path).await;
    let stored_n = complete(&acknowledged, &stored).min(complete(&acknowledged, &live));
    for (phase, answers) in [
        ("before", &before),
        ("during", &during),
        ("settling", &settle),
        ("after", &after),
    ] {
        for id in answers.acknowledged() {
            let (l, s) = (live.get(&id), stored.get(&id));
            if l != Some(&(FILES_PER_JOB as i64)) || s != Some(&(FILES_PER_JOB as i64)) {
                eprintln!(
                    "{name}: job {id}, acknowledged {phase} the fault: files stored while running {l:?}, after the stop {s:?}"
                );
            }
        }
    }
    let row = Row {
        fault: name,
        backend: "sqlite",
        acknowledged: acknowledged.len() as u64,
        stored: stored_n,
        called_back: 0,
        lost: acknowledged.len() as u64 - stored_n,
    };
    ledger::record(&row);
    eprintln!(
        "{name}: during the fault {} of {} posts got 202, {refused} refused \
         (statuses {:?}); settling {} of {}; after it {} of {}; {row:?}",
        during.count(202),
        during.by_job.len(),
        during.histogram(),
        settle.count(202),
        settle.by_job.len(),
        after.count(202),
        after.by_job.len()
    );
    assert_eq!(row.lost, 0, "acknowledged jobs lost: {row:?}");
    assert_eq!(
        integrity, "ok",
        "the database read back after the stop is damaged"
    );
    assert!(
        !matches!(log_left, Ok(n) if n > 0),
        "the stop left {log_left:?} bytes of log beside the database: its checkpoint failed"
    );
    assert_eq!(
        during.count(403),
        0,
        "jobs posted once were answered 403 (the id exists)"
    );
    assert_eq!(
        after.count(202),
        after.by_job.len(),
        "the daemon did not take jobs again once writes worked"
    );
}
