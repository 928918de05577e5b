-- Jobs, their files, the callback outbox and the history of finished jobs.
-- Times are Unix epoch milliseconds (UTC). Booleans are BOOLEAN.

CREATE TABLE jobs (
    job_id          BIGINT  PRIMARY KEY,        -- chosen by the client (ASVO)
    notify_url      TEXT    NOT NULL,
    request_obs     TEXT,                       -- the request's observation as JSON, if it named one
    state           TEXT    NOT NULL,           -- 'resolving' (obs to look up), 'staging', 'waiting', 'done'
    total_files     BIGINT  NOT NULL DEFAULT 0,
    created_ms      BIGINT  NOT NULL,
    updated_ms      BIGINT  NOT NULL,
    next_stage_ms   BIGINT,                     -- next (re)stage call to Scout; NULL: none due
    expires_ms      BIGINT  NOT NULL,
    return_code     BIGINT,                     -- set when the job's result is decided
    stage_attempts  BIGINT  NOT NULL DEFAULT 0, -- consecutive failed Scout calls, for backoff
    last_error      TEXT,                       -- why the last stage or resolve attempt failed
    lease_owner     TEXT,                       -- daemon currently working on the job
    lease_until_ms  BIGINT
);
CREATE INDEX jobs_next_stage ON jobs (next_stage_ms) WHERE next_stage_ms IS NOT NULL;
CREATE INDEX jobs_expires ON jobs (expires_ms) WHERE state <> 'done';

-- A path may belong to many jobs; Kafka events are applied by path.
CREATE TABLE job_files (
    job_id    BIGINT  NOT NULL,
    path      TEXT    NOT NULL,
    ready     BOOLEAN NOT NULL DEFAULT FALSE,
    error     BOOLEAN NOT NULL DEFAULT FALSE,
    ready_ms  BIGINT, 
    error_msg TEXT,
    PRIMARY KEY (job_id, path)
);
CREATE INDEX job_files_path ON job_files (path);

-- Callbacks to deliver, at least once, surviving restarts.
CREATE TABLE notify_outbox (
    job_id          BIGINT  PRIMARY KEY,
    notify_url      TEXT    NOT NULL,
    return_code     BIGINT  NOT NULL,
    total_files     BIGINT  NOT NULL,
    ready_files     BIGINT  NOT NULL,
    error_files     BIGINT  NOT NULL,
    comment         TEXT    NOT NULL DEFAULT '', -- empty: worded at delivery from the counts
    attempts        BIGINT  NOT NULL DEFAULT 0,
    next_attempt_ms BIGINT  NOT NULL,
    give_up_ms      BIGINT,                     -- expired jobs: remove even if undelivered after this
    last_error      TEXT,
    lease_owner     TEXT,
    lease_until_ms  BIGINT, 
    created_ms      BIGINT  NOT NULL
);
CREATE INDEX notify_outbox_due ON notify_outbox (next_attempt_ms);

-- One row per finished job, for the dashboard; pruned by age.
CREATE TABLE job_history (
    job_id        BIGINT  NOT NULL,
    created_ms    BIGINT  NOT NULL,
    finished_ms   BIGINT  NOT NULL,
    return_code   BIGINT  NOT NULL,
    total_files   BIGINT  NOT NULL,
    ready_files   BIGINT  NOT NULL,
    error_files   BIGINT  NOT NULL,
    delivered     BOOLEAN NOT NULL,
    comment       TEXT    NOT NULL
);
CREATE INDEX job_history_finished ON job_history (finished_ms);

-- Small shared facts (Kafka heartbeat and the like), one row per key.
CREATE TABLE service_state (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_ms BIGINT  NOT NULL
);
