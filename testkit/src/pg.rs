//! A PostgreSQL database that exists for one run, on the server named by
//! `STAGED_TEST_PG_URL` (an account allowed to create databases; default
//! [`DEFAULT_ADMIN_URL`], the local cluster CI sets up).
//!
//! The invariant: a database is created under a name no other run uses, and
//! [`PgDatabase::drop_database`] removes it even while sessions a failed daemon left behind
//! are still connected. An unreachable server is an error naming the URL (password masked),
//! never a reason to skip.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use sqlx::Connection;

/// The admin URL when `STAGED_TEST_PG_URL` is unset.
pub const DEFAULT_ADMIN_URL: &str = "postgres://staged:staged@127.0.0.1:5432/postgres";

/// Longest wait for the server to accept the admin connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Distinguishes the databases of one process.
static COUNTER: AtomicU32 = AtomicU32::new(0);

#[derive(Debug, thiserror::Error)]
pub enum PgError {
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

/// `STAGED_TEST_PG_URL`, else [`DEFAULT_ADMIN_URL`].
pub fn admin_url() -> String {
    std::env::var("STAGED_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.into())
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
        let admin_url = admin_url();
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
        let mut admin = sqlx::PgConnection::connect(&admin_url()).await.unwrap();
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
            .bind(&name)
            .fetch_one(&mut admin)
            .await
            .unwrap();
        assert_eq!(left, 0);
        drop(conn);
    }
}
