//! Shared test fixtures: a fresh database per test (a SQLite file in a temporary directory,
//! or a PostgreSQL database created for the test and dropped after it), and the service
//! started in-process on a free loopback port.
//!
//! PostgreSQL tests take the server from `STAGED_TEST_PG_URL` (an account allowed to create
//! databases) or, when it is unset, from a throwaway server this test process starts
//! (`staged_testkit::pg`). A server that cannot be reached or started fails the test: it is
//! never skipped.
#![allow(dead_code)]

pub mod adapters;
pub mod certs;
pub mod daemon;
// The tape REST facade's tests drive the real gfal2 client through it.
#[allow(dead_code)]
pub mod gfal2;
pub mod pipeline;

use std::time::{Duration, Instant};

use staged::app::{self, Server};
use staged::config::Config;
use staged_testkit::pg::PgDatabase;
use tempfile::TempDir;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
}

impl Kind {
    /// The backend's name in test output and the fault ledger.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Sqlite => "sqlite",
            Kind::Postgres => "postgres",
        }
    }
}

/// How often a waiting test looks again.
const POLL: Duration = Duration::from_millis(20);

/// Waits until `condition` holds, looking every 20 ms; fails the test naming `what` after
/// `limit`. A limit bounds a wait for something that must happen, and is never a timing
/// assertion: make it generous.
pub async fn wait_for(what: &str, limit: Duration, condition: impl AsyncFnMut() -> bool) {
    assert!(
        poll_until(limit, condition).await,
        "timed out after {limit:?} waiting for {what}"
    );
}

/// Whether `condition` came to hold within `limit`, looking every 20 ms; for a test that
/// reports a timeout in its own words.
pub async fn poll_until(limit: Duration, mut condition: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A callback URL nothing listens on (the discard port), for jobs whose callback the test
/// does not read.
pub const NO_CALLBACK: &str = "http://127.0.0.1:9/cb";

/// A job body as ASVO posts it: a list of files.
pub fn files_job(
    id: impl serde::Serialize,
    files: impl serde::Serialize,
    notify_url: impl std::fmt::Display,
) -> serde_json::Value {
    serde_json::json!({"job_id": id, "files": files, "notify_url": notify_url.to_string()})
}

/// A job body as ASVO posts it: a telescope observation.
pub fn obs_job(
    id: impl serde::Serialize,
    obs: serde_json::Value,
    notify_url: impl std::fmt::Display,
) -> serde_json::Value {
    serde_json::json!({"job_id": id, "obs": obs, "notify_url": notify_url.to_string()})
}

/// A database that exists for one test.
pub struct TestDb {
    pub kind: Kind,
    pub url: String,
    /// Holds the SQLite file and anything else the test writes (reports, configs).
    pub dir: TempDir,
    pg: Option<PgDatabase>,
}

impl TestDb {
    pub async fn new(kind: Kind) -> TestDb {
        let dir = tempfile::tempdir().expect("temporary directory");
        match kind {
            Kind::Sqlite => TestDb {
                kind,
                url: format!("sqlite://{}", dir.path().join("staged.db").display()),
                dir,
                pg: None,
            },
            Kind::Postgres => {
                let pg = PgDatabase::create("staged_t")
                    .await
                    .unwrap_or_else(|e| panic!("{}", staged::error_text::chain(&e)));
                TestDb {
                    kind,
                    url: pg.url.clone(),
                    dir,
                    pg: Some(pg),
                }
            }
        }
    }

    /// A config for this database: port 0 on loopback, reports inside the test directory.
    pub fn config(&self) -> Config {
        let mut c = Config::default();
        c.server.listen = "127.0.0.1:0".parse().unwrap();
        c.database.url = self.url.clone();
        c.reports.dir = self.dir.path().join("reports");
        c
    }

    /// Ends every PostgreSQL session on this test's database, as a database restart would;
    /// returns how many there were.
    pub async fn terminate_pg_sessions(&self) -> i64 {
        let pg = self.pg.as_ref().expect("a PostgreSQL test database");
        pg.terminate_sessions()
            .await
            .expect("terminating the test database's sessions")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(pg) = self.pg.take() else {
            return;
        };
        // Drop runs inside a test's runtime: do the async clean-up on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            if let Err(e) = rt.block_on(pg.drop_database()) {
                eprintln!("{}", staged::error_text::chain(&e));
            }
        })
        .join();
    }
}

/// Sends the daemon's logs to the test harness, which shows them only for a failing test:
/// a failure on a CI machine then says what the daemon was doing. `RUST_LOG` overrides the
/// default level.
pub fn capture_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("staged=debug,warn"));
    // Fails harmlessly when an earlier test of this binary already installed it.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .with_ansi(false)
        .try_init();
}

/// The service, started in-process, with an HTTP client pointed at it.
pub struct TestApp {
    pub server: Option<Server>,
    pub base: String,
    pub http: reqwest::Client,
    pub db: TestDb,
}

impl TestApp {
    pub async fn start(kind: Kind) -> TestApp {
        Self::start_with(kind, |_| {}).await
    }

    pub async fn start_with(kind: Kind, tweak: impl FnOnce(&mut Config)) -> TestApp {
        capture_logs();
        let db = TestDb::new(kind).await;
        let mut config = db.config();
        tweak(&mut config);
        let server = app::start(&config).await.expect("service starts");
        TestApp {
            base: format!("http://{}", server.addr),
            server: Some(server),
            http: reqwest::Client::new(),
            db,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn store(&self) -> &staged::store::Store {
        &self.server.as_ref().unwrap().store
    }

    pub async fn post_job(&self, body: serde_json::Value) -> (u16, serde_json::Value) {
        let r = self
            .http
            .post(self.url("/staging/"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let r = self.http.get(self.url(path)).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("GET {path}: body is not JSON: {text:?}"));
        (status, json)
    }

    /// The job and the daemon's statistics as the API shows them, for a failure message.
    pub async fn describe(&self, job_id: i64) -> String {
        let (status, job) = self.get(&format!("/staging/?job_id={job_id}")).await;
        let (_, stats) = self.get("/get_stats/").await;
        format!("job {job_id}: {status} {job}; stats: {stats}")
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await.unwrap();
        }
    }
}

/// Declares `mod $name { sqlite, postgres }` running `$name(Kind)` on each backend.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::common::Kind::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::common::Kind::Postgres).await
            }
        }
    )*};
}
