//! PostgreSQL for tests and the bench: a database that exists for one run, on the server
//! named by `STAGED_TEST_PG_URL` (an account allowed to create databases) or, when that is
//! unset, on a throwaway server of this process's own ([`Cluster`]).
//!
//! The invariants: a database is created under a name no other run uses, and
//! [`PgDatabase::drop_database`] removes it even while sessions a failed daemon left behind
//! are still connected; a throwaway server and its files are gone once the process that
//! started it has ended, however it ended. A server that cannot be reached or started is an
//! error saying why (password masked, the package to install), never a reason to skip.

use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use sqlx::Connection;

/// Longest wait for the server to accept the admin connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Distinguishes the databases of one process.
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// This process's throwaway server, started by the first [`admin_url`] that needs it.
static SHARED: OnceLock<Result<Cluster, String>> = OnceLock::new();

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error(
        "PostgreSQL's server programs (initdb, pg_ctl) are not installed: install the package \
         `postgresql` (Debian and Ubuntu: apt-get install postgresql), or set \
         STAGED_TEST_PG_URL to a server's admin URL"
    )]
    NotInstalled,
    #[error("running {what} for a throwaway PostgreSQL server: {detail}")]
    Cluster { what: String, detail: String },
    #[error("the throwaway PostgreSQL server did not start: {0}")]
    Shared(String),
    #[error("STAGED_TEST_PG_URL ({url}) is not a URL")]
    NotUrl {
        url: String,
        #[source]
        source: url::ParseError,
    },
    #[error("PostgreSQL is not reachable at {url} (set STAGED_TEST_PG_URL to an admin URL)")]
    Unreachable {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("PostgreSQL at {url} did not answer within {} s", CONNECT_TIMEOUT.as_secs())]
    NoAnswer { url: String },
    #[error("creating the database {name}")]
    Create {
        name: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("dropping the database {name}")]
    Drop {
        name: String,
        #[source]
        source: sqlx::Error,
    },
}

/// `STAGED_TEST_PG_URL`, else the URL of this process's throwaway server, which the first
/// call starts (a few seconds; it blocks). The server lives until the process ends.
pub fn admin_url() -> Result<String, PgError> {
    if let Ok(url) = std::env::var("STAGED_TEST_PG_URL") {
        return Ok(url);
    }
    match SHARED.get_or_init(|| Cluster::start().map_err(|e| error_chain(&e))) {
        Ok(cluster) => Ok(cluster.url()),
        Err(why) => Err(PgError::Shared(why.clone())),
    }
}

/// [`admin_url`] off the async runtime's threads, for async callers.
async fn admin_url_async() -> Result<String, PgError> {
    match tokio::task::spawn_blocking(admin_url).await {
        Ok(url) => url,
        Err(e) => Err(PgError::Shared(format!("starting it panicked: {e}"))),
    }
}

/// A database created for one run; drop it with [`PgDatabase::drop_database`].
#[derive(Debug)]
pub struct PgDatabase {
    admin_url: String,
    name: String,
    /// The new database's URL, for the daemon.
    pub url: String,
}

impl PgDatabase {
    /// Creates `<prefix>_<pid>_<n>_<random>` on the server of [`admin_url`]. `prefix` must
    /// be a plain SQL identifier (it is not quoted).
    pub async fn create(prefix: &str) -> Result<PgDatabase, PgError> {
        let admin_url = admin_url_async().await?;
        let name = format!(
            "{prefix}_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        let mut url = url::Url::parse(&admin_url).map_err(|source| PgError::NotUrl {
            url: redact(&admin_url),
            source,
        })?;
        url.set_path(&format!("/{name}"));
        let mut conn = connect(&admin_url).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .map_err(|source| PgError::Create {
                name: name.clone(),
                source,
            })?;
        let _ = conn.close().await;
        Ok(PgDatabase {
            admin_url,
            name,
            url: url.to_string(),
        })
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Ends every session on this database, as a server restart would; returns how many
    /// there were.
    pub async fn terminate_sessions(&self) -> Result<i64, PgError> {
        let mut conn = connect(&self.admin_url).await?;
        let ended = sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&self.name)
        .fetch_one(&mut conn)
        .await
        .map_err(|source| PgError::Unreachable {
            url: redact(&self.admin_url),
            source,
        });
        let _ = conn.close().await;
        ended
    }

    /// Drops the database, ending any session still on it.
    pub async fn drop_database(self) -> Result<(), PgError> {
        let mut conn = connect(&self.admin_url).await?;
        // FORCE ends sessions a failed daemon left behind, but it may not signal an
        // autovacuum worker (a freshly filled table often has one) and then fails; a plain
        // DROP stops such a worker itself (waiting for it).
        let force = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let dropped = match sqlx::raw_sql(sqlx::AssertSqlSafe(force))
            .execute(&mut conn)
            .await
        {
            Ok(done) => Ok(done),
            Err(_) => {
                let plain = format!("DROP DATABASE IF EXISTS {}", self.name);
                sqlx::raw_sql(sqlx::AssertSqlSafe(plain))
                    .execute(&mut conn)
                    .await
            }
        };
        let _ = conn.close().await;
        dropped.map_err(|source| PgError::Drop {
            name: self.name,
            source,
        })?;
        Ok(())
    }
}

/// Connects to the admin database, with a clear error when PostgreSQL is not there.
async fn connect(admin_url: &str) -> Result<sqlx::PgConnection, PgError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, sqlx::PgConnection::connect(admin_url)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(source)) => Err(PgError::Unreachable {
            url: redact(admin_url),
            source,
        }),
        Err(_) => Err(PgError::NoAnswer {
            url: redact(admin_url),
        }),
    }
}

/// A PostgreSQL server of its own: `initdb` into a temporary directory, started on a free
/// loopback port with trust authentication for the superuser `staged`. Run as root, the
/// server runs as the `postgres` user (PostgreSQL refuses root). Its files are removed by a
/// watchdog process that waits for this process's end (or this value's drop), so a test
/// that panics or is killed leaves nothing behind.
pub struct Cluster {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
    run_as: Option<&'static str>,
    /// Closing it tells the watchdog to stop the server and remove `dir`.
    watchdog_stdin: Option<ChildStdin>,
    watchdog: Option<Child>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("dir", &self.dir)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Creates and starts a server; blocks for the seconds that takes.
    pub fn start() -> Result<Cluster, PgError> {
        Self::start_with(None)
    }

    /// Like [`start`](Self::start), serving TLS (`ssl = on`) with this certificate chain and
    /// private key (PEM).
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Result<Cluster, PgError> {
        Self::start_with(Some((cert_pem, key_pem)))
    }

    fn start_with(tls: Option<(&str, &str)>) -> Result<Cluster, PgError> {
        let bin = server_bin_dir().ok_or(PgError::NotInstalled)?;
        let run_as = running_as_root().then_some("postgres");
        let dir = std::env::temp_dir().join(format!(
            "staged-pg-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir(&dir).map_err(|e| cluster_error("mkdir", e))?;
        let mut cluster = Cluster {
            dir,
            port: 0,
            bin,
            run_as,
            watchdog_stdin: None,
            watchdog: None,
        };
        // The watchdog first, so that a failure below still leaves nothing behind.
        cluster.spawn_watchdog()?;
        if let Some(user) = run_as {
            run(Command::new("chown").arg(user).arg(&cluster.dir))?;
        }
        run(cluster.tool("initdb").args([
            "-D",
            &cluster.data(),
            "-A",
            "trust",
            "-U",
            "staged",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]))?;
        if let Some((cert, key)) = tls {
            cluster.enable_tls(cert, key)?;
        }
        // A free port may be taken between looking and binding: try a few.
        let mut last = None;
        for _ in 0..5 {
            cluster.port = free_port().map_err(|e| cluster_error("bind", e))?;
            match cluster.pg_ctl("start") {
                Ok(()) => return Ok(cluster),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one try"))
    }

    /// The superuser's URL, on the `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://staged@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server at once, as a crash would (`pg_ctl stop -m immediate`).
    pub fn crash(&self) -> Result<(), PgError> {
        self.pg_ctl("stop")
    }

    /// Restarts the server on the same port (stopping it at once first if it runs).
    pub fn restart(&self) -> Result<(), PgError> {
        self.pg_ctl("restart")
    }

    /// Writes the certificate and key into the data directory (the key readable by the
    /// server's user only, as PostgreSQL demands) and turns `ssl` on.
    fn enable_tls(&self, cert: &str, key: &str) -> Result<(), PgError> {
        use std::os::unix::fs::PermissionsExt;
        let data = self.dir.join("data");
        let write = |name: &str, text: &str| -> Result<(), PgError> {
            let path = data.join(name);
            std::fs::write(&path, text).map_err(|e| cluster_error("writing the TLS files", e))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| cluster_error("chmod of the TLS files", e))?;
            if let Some(user) = self.run_as {
                run(Command::new("chown").arg(user).arg(&path))?;
            }
            Ok(())
        };
        write("server.crt", cert)?;
        write("server.key", key)?;
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf)
            .map_err(|e| cluster_error("reading postgresql.conf", e))?;
        text.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        std::fs::write(&conf, text).map_err(|e| cluster_error("writing postgresql.conf", e))?;
        Ok(())
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn tool(&self, name: &str) -> Command {
        let program = self.bin.join(name);
        match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// `start`, `stop` or `restart`; every stop is immediate.
    fn pg_ctl(&self, action: &str) -> Result<(), PgError> {
        // fsync off: a test crashes the server, never the machine, and the page cache
        // survives a server crash.
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log").display().to_string();
        run(self.tool("pg_ctl").args([
            action,
            "-D",
            &self.data(),
            "-m",
            "immediate",
            "-w",
            "-t",
            "60",
            "-l",
            &log,
            "-o",
            &opts,
        ]))
        .map_err(|e| match e {
            PgError::Cluster { what, detail } => PgError::Cluster {
                what,
                detail: format!("{detail}; server log: {}", self.log_tail()),
            },
            other => other,
        })
    }

    /// The server log's last 2 kB.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
        let cut = text.len().saturating_sub(2048);
        let cut = (cut..text.len())
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(text.len());
        text[cut..].to_string()
    }

    /// A shell that waits for its stdin to close (this value dropped, or the process gone),
    /// then stops the server and removes the directory. It ignores the terminal's signals:
    /// Ctrl-C on a test run must still clean up.
    fn spawn_watchdog(&mut self) -> Result<(), PgError> {
        let stop = {
            let mut c = vec![];
            if let Some(user) = self.run_as {
                c.extend(["runuser".to_string(), "-u".into(), user.into(), "--".into()]);
            }
            c.push(self.bin.join("pg_ctl").display().to_string());
            c.extend(["stop", "-D"].map(String::from));
            c.push(self.data());
            c.extend(["-m", "immediate", "-w"].map(String::from));
            c.iter()
                .map(|a| shell_quote(a))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let script = format!(
            "trap '' INT TERM HUP; read _; if [ -f {pid} ]; then {stop} >/dev/null 2>&1; fi; rm -rf {dir}",
            pid = shell_quote(&format!("{}/postmaster.pid", self.data())),
            dir = shell_quote(&self.dir.display().to_string()),
        );
        let mut child = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| cluster_error("sh (the clean-up watchdog)", e))?;
        self.watchdog_stdin = child.stdin.take();
        self.watchdog = Some(child);
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.watchdog_stdin.take() {
            let _ = stdin.write_all(b"\n");
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.wait();
        }
    }
}

/// The directory of `initdb` and `pg_ctl`: `STAGED_TEST_PG_BIN`, else Debian's newest
/// `/usr/lib/postgresql/<version>/bin`, else wherever `PATH` has `initdb`.
fn server_bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("STAGED_TEST_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|versions| {
            versions
                .filter_map(Result::ok)
                .filter_map(|v| {
                    let n: u32 = v.file_name().to_str()?.parse().ok()?;
                    let bin = v.path().join("bin");
                    bin.join("initdb").is_file().then_some((n, bin))
                })
                .max_by_key(|(n, _)| *n)
                .map(|(_, bin)| bin)
        });
    debian.or_else(|| {
        std::env::split_paths(&std::env::var_os("PATH")?)
            .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
    })
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn run(cmd: &mut Command) -> Result<(), PgError> {
    let what = format!("{:?}", cmd.get_program());
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| cluster_error(&what, e))?;
    if out.status.success() {
        return Ok(());
    }
    Err(PgError::Cluster {
        what: format!("{cmd:?}"),
        detail: format!(
            "{}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    })
}

fn cluster_error(what: &str, e: std::io::Error) -> PgError {
    PgError::Cluster {
        what: what.into(),
        detail: e.to_string(),
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// An error with its causes on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A URL with any password masked.
fn redact(s: &str) -> String {
    match url::Url::parse(s) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("***"));
            }
            url.to_string()
        }
        Err(_) => "<unparsable URL>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_masks_only_the_password() {
        assert_eq!(
            redact("postgres://staged:secret@db:5432/postgres"),
            "postgres://staged:***@db:5432/postgres"
        );
        assert_eq!(redact("postgres://db/x"), "postgres://db/x");
        assert_eq!(redact("not a url"), "<unparsable URL>");
    }

    #[tokio::test]
    async fn a_database_is_created_reachable_and_dropped() {
        let db = PgDatabase::create("staged_testkit").await.unwrap();
        let name = db.name().to_string();
        let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
        let here: String = sqlx::query_scalar("SELECT current_database()")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(here, name);
        // A session still open, as a failed daemon leaves one: dropping must end it.
        db.drop_database().await.unwrap();
        let mut admin = sqlx::PgConnection::connect(&admin_url().unwrap())
            .await
            .unwrap();
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
            .bind(&name)
            .fetch_one(&mut admin)
            .await
            .unwrap();
        assert_eq!(left, 0);
        drop(conn);
    }

    #[test]
    fn a_cluster_crashes_restarts_and_leaves_nothing_behind() {
        let cluster = Cluster::start().unwrap();
        let dir = cluster.dir.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let answers = |url: String| {
            rt.block_on(async move {
                let mut c = sqlx::PgConnection::connect(&url).await?;
                sqlx::query_scalar::<_, i32>("SELECT 1")
                    .fetch_one(&mut c)
                    .await
            })
        };
        assert_eq!(answers(cluster.url()).unwrap(), 1);
        cluster.crash().unwrap();
        assert!(answers(cluster.url()).is_err(), "a crashed server answered");
        cluster.restart().unwrap();
        assert_eq!(answers(cluster.url()).unwrap(), 1);
        assert!(dir.join("data/PG_VERSION").is_file());
        drop(cluster);
        assert!(!dir.exists(), "{} left behind", dir.display());
    }

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}
