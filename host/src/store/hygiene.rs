//! No connection is reused in an unknown transaction state.
//!
//! sqlx counts each connection's transaction depth itself and picks its statements from that
//! count: `BEGIN` at depth 0 and `SAVEPOINT` above it, `COMMIT` at depth 1 and `RELEASE
//! SAVEPOINT` above it. The count and the database can disagree. SQLite may roll a whole
//! transaction back on its own when a statement fails with `SQLITE_FULL` or `SQLITE_IOERR`
//! ("Response to errors within a transaction" in its documentation); the `ROLLBACK` sqlx
//! sends when the failed `Transaction` drops then fails too ("no transaction is active"),
//! and sqlx's count stays at 1. The next `begin()` on that connection sends `SAVEPOINT`, which
//! SQLite takes as the start of a transaction, and the next failure's `ROLLBACK TO SAVEPOINT`
//! leaves that transaction open. From then on every "transaction" is a savepoint released
//! inside an outer transaction nothing ever commits: writes report success, other
//! connections never see them, the write lock is held (everyone else gets `database is
//! locked`) and closing the connection discards them all. That is how a full disk lost
//! acknowledged jobs.
//!
//! Invariants kept here, for every writer (intake, engine, ingest, outbox):
//! - A connection goes back into a pool only when sqlx's count is zero and the database
//!   itself says it is outside any transaction (SQLite's `sqlite3_get_autocommit`); any other
//!   connection is closed, which rolls back whatever it held. Every pool has this check as
//!   its `after_release` hook, so it covers `pool.begin()` and kept connections alike once
//!   they are given back.
//! - The intake writer, which keeps its connection between batches, reports a batch
//!   committed only when the connection is outside a transaction after the commit, and keeps
//!   the connection only then.
//!
//! PostgreSQL does not end a transaction behind the client's back without saying so: every
//! ReadyForQuery carries the transaction status, a failed statement or `COMMIT` leaves the
//! transaction aborted or ended, and sqlx's queued `ROLLBACK` (sent before the connection is
//! lent again) settles either. sqlx keeps that status to itself, so for PostgreSQL the check
//! is its transaction count.

use std::time::Duration;

use sqlx::pool::PoolConnectionMetadata;
use sqlx::{Connection, PgConnection, SqliteConnection};

/// Whether a SQLite connection is outside any transaction, as both sqlx and SQLite see it.
pub(crate) async fn sqlite_settled(conn: &mut SqliteConnection) -> Result<bool, sqlx::Error> {
    if conn.is_in_transaction() {
        return Ok(false);
    }
    // Taking the handle waits for the connection's worker to finish every command queued
    // before it, including the ROLLBACK a dropped transaction queued.
    let mut handle = conn.lock_handle().await?;
    let raw = handle.as_raw_handle();
    // SAFETY: `lock_handle` gives this task the handle alone until `handle` drops, and
    // `sqlite3_get_autocommit` only reads a flag of that connection.
    let autocommit = unsafe { libsqlite3_sys::sqlite3_get_autocommit(raw.as_ptr()) };
    Ok(autocommit != 0)
}

/// Whether a PostgreSQL connection is outside any transaction, as sqlx counts it.
pub(crate) fn pg_settled(conn: &PgConnection) -> bool {
    !conn.is_in_transaction()
}

/// The SQLite pool's `after_release` hook: `Ok(false)` makes the pool close the connection.
pub(crate) fn sqlite_after_release<'c>(
    conn: &'c mut SqliteConnection,
    meta: PoolConnectionMetadata,
) -> futures::future::BoxFuture<'c, Result<bool, sqlx::Error>> {
    Box::pin(async move {
        let settled = sqlite_settled(conn).await?;
        if !settled {
            log_unsettled("sqlite", meta.age);
        }
        Ok(settled)
    })
}

/// The PostgreSQL pools' `after_release` hook: `Ok(false)` makes the pool close the
/// connection.
pub(crate) fn pg_after_release<'c>(
    conn: &'c mut PgConnection,
    meta: PoolConnectionMetadata,
) -> futures::future::BoxFuture<'c, Result<bool, sqlx::Error>> {
    let settled = pg_settled(conn);
    if !settled {
        log_unsettled("postgres", meta.age);
    }
    Box::pin(std::future::ready(Ok(settled)))
}

fn log_unsettled(backend: &'static str, age: Duration) {
    tracing::warn!(
        backend,
        connection_age_secs = age.as_secs(),
        "a database connection came back inside a transaction after an error; closing it \
         (rolling back what it held) instead of reusing it"
    );
}
