//! Shared test fixtures: a fresh database per test (a SQLite file in a temporary directory,
//! or a PostgreSQL database created for the test and dropped after it), and the service
//! started in-process on a free loopback port.
//!
//! PostgreSQL tests take the server from `STAGED_TEST_PG_URL` (an account allowed to create
//! databases), defaulting to the local cluster CI sets up. An unreachable server fails the
//! test: it is never skipped.
#![allow(dead_code)]

pub mod adapters;
pub mod pipeline;

use std::sync::atomic::{AtomicU32, Ordering};

use staged::app::{self, Server};
use staged::config::Config;
use tempfile::TempDir;

pub const DEFAULT_PG_URL: &str = "postgres://staged:staged@127.0.0.1:5432/postgres";

pub fn pg_admin_url() -> String {
    std::env::var("STAGED_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
}

/// A database that exists for one test.
pub struct TestDb {
    pub kind: Kind,
    pub url: String,
    /// Holds the SQLite file and anything else the test writes (reports, configs).
    pub dir: TempDir,
    pg_name: Option<String>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl TestDb {
    pub async fn new(kind: Kind) -> TestDb {
        let dir = tempfile::tempdir().expect("temporary directory");
        match kind {
            Kind::Sqlite => TestDb {
                kind,
                url: format!("sqlite://{}", dir.path().join("staged.db").display()),
                dir,
                pg_name: None,
            },
            Kind::Postgres => {
                let admin = pg_admin_url();
                let name = format!(
                    "staged_t_{}_{}_{}",
                    std::process::id(),
                    COUNTER.fetch_add(1, Ordering::Relaxed),
                    rand::random::<u32>()
                );
                let mut conn = connect_admin(&admin).await;
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await
                    .expect("creating the test database");
                let mut url = url::Url::parse(&admin).expect("STAGED_TEST_PG_URL is a URL");
                url.set_path(&format!("/{name}"));
                TestDb {
                    kind,
                    url: url.to_string(),
                    dir,
                    pg_name: Some(name),
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
}

async fn connect_admin(admin: &str) -> sqlx::PgConnection {
    use sqlx::Connection;
    match sqlx::PgConnection::connect(admin).await {
        Ok(c) => c,
        Err(e) => panic!(
            "PostgreSQL is required for these tests and is unreachable at {admin}: {e}. \
             Start it (see README, `bash .ci/pg-setup`) or set STAGED_TEST_PG_URL."
        ),
    }
}

impl TestDb {
    /// Ends every PostgreSQL session on this test's database, as a database restart would;
    /// returns how many there were.
    pub async fn terminate_pg_sessions(&self) -> i64 {
        let name = self.pg_name.as_deref().expect("a PostgreSQL test database");
        let mut conn = connect_admin(&pg_admin_url()).await;
        sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(name)
        .fetch_one(&mut conn)
        .await
        .expect("terminating the test database's sessions")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.pg_name.take() else {
            return;
        };
        let admin = pg_admin_url();
        // Drop runs inside a test's runtime: do the async clean-up on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                use sqlx::Connection;
                if let Ok(mut c) = sqlx::PgConnection::connect(&admin).await {
                    // FORCE may not signal an autovacuum worker and then fails; a plain
                    // DROP stops such a worker itself.
                    for sql in [
                        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                        format!("DROP DATABASE IF EXISTS {name}"),
                    ] {
                        let dropped = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut c).await;
                        if dropped.is_ok() {
                            break;
                        }
                    }
                }
            });
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
