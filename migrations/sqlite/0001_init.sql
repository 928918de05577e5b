-- Jobs, their files, the callback outbox and the history of finished jobs.
-- Times are Unix epoch milliseconds (UTC). Booleans are 0/1.

CREATE TABLE jobs (
    job_id          INTEGER PRIMARY KEY,        -- chosen by the client (ASVO)
    notify_url      TEXT    NOT NULL,
    request_obs     TEXT,                       -- the request's observation as JSON, if it named one
    state           TEXT    NOT NULL,           -- 'resolving' (obs to look up), 'staging', 'waiting', 'done'
    total_files     INTEGER NOT NULL DEFAULT 0,
    created_ms      INTEGER NOT NULL,
    updated_ms      INTEGER NOT NULL,
    next_stage_ms   INTEGER,                    -- next (re)stage call to Scout; NULL: none due
    expires_ms      INTEGER NOT NULL,
    return_code     INTEGER,                    -- set when the job's result is decided
    stage_attempts  INTEGER NOT NULL DEFAULT 0, -- consecutive failed Scout calls, for backoff
    last_error      TEXT,                       -- why the last stage or resolve attempt failed
    lease_owner     TEXT,                       -- daemon currently working on the job
    lease_until_ms  INTEGER
);
CREATE INDEX jobs_next_stage ON jobs (next_stage_ms) WHERE next_stage_ms IS NOT NULL;
CREATE INDEX jobs_expires ON jobs (expires_ms) WHERE state <> 'done';

-- A path may belong to many jobs; Kafka events are applied by path.
CREATE TABLE job_files (
    job_id    INTEGER NOT NULL,
    path      TEXT    NOT NULL,
    ready     INTEGER NOT NULL DEFAULT 0,
    error     INTEGER NOT NULL DEFAULT 0,
    ready_ms  INTEGER,
    error_msg TEXT,
    PRIMARY KEY (job_id, path)
) WITHOUT ROWID;
CREATE INDEX job_files_path ON job_files (path);

-- Callbacks to deliver, at least once, surviving restarts.
CREATE TABLE notify_outbox (
    job_id          INTEGER PRIMARY KEY,
    notify_url      TEXT    NOT NULL,
    return_code     INTEGER NOT NULL,
    total_files     INTEGER NOT NULL,
    ready_files     INTEGER NOT NULL,
    error_files     INTEGER NOT NULL,
    comment         TEXT    NOT NULL DEFAULT '', -- empty: worded at delivery from the counts
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    give_up_ms      INTEGER,                    -- expired jobs: remove even if undelivered after this
    last_error      TEXT,
    lease_owner     TEXT,
    lease_until_ms  INTEGER,
    created_ms      INTEGER NOT NULL
);
CREATE INDEX notify_outbox_due ON notify_outbox (next_attempt_ms);

-- One row per finished job, for the dashboard; pruned by age.
CREATE TABLE job_history (
    job_id        INTEGER NOT NULL,
    created_ms    INTEGER NOT NULL,
    finished_ms   INTEGER NOT NULL,
    return_code   INTEGER NOT NULL,
    total_files   INTEGER NOT NULL,
    ready_files   INTEGER NOT NULL,
    error_files   INTEGER NOT NULL,
    delivered     INTEGER NOT NULL,
    comment       TEXT    NOT NULL
);
CREATE INDEX job_history_finished ON job_history (finished_ms);

-- Small shared facts (Kafka heartbeat and the like), one row per key.
CREATE TABLE service_state (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_ms INTEGER NOT NULL
);
