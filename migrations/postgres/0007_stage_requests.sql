-- Stage requests of the WLCG Tape REST API ([tape_rest]) are jobs without a callback: the
-- same rows, timers and ingest, found by the request's UUID. They keep their rows after
-- completion (the client polls for the result) until the retention sweep forgets them.
ALTER TABLE jobs ADD COLUMN request_id TEXT;
CREATE UNIQUE INDEX jobs_request_id ON jobs (request_id) WHERE request_id IS NOT NULL;
-- The first time the tape system accepted the job's files (a request's `startedAt`).
ALTER TABLE jobs ADD COLUMN started_ms BIGINT;
-- Finished requests by completion time, for the retention sweep.
CREATE INDEX jobs_requests_done ON jobs (updated_ms) WHERE request_id IS NOT NULL AND state = 'done';
-- A file a request cancelled: settled (and counted failed) so the request can complete, and
-- no longer wanted from the tape system on its account.
ALTER TABLE job_files ADD COLUMN cancelled BOOLEAN NOT NULL DEFAULT FALSE;
-- A file a request released: its disk copy is no longer wanted on the request's account.
ALTER TABLE job_files ADD COLUMN released BOOLEAN NOT NULL DEFAULT FALSE;
-- When a file failed (a request's per-file `finishedAt`).
ALTER TABLE job_files ADD COLUMN error_ms BIGINT;
-- The request a history row is of (none for ASVO's jobs): the dashboard shows its id, and
-- no failure report link, since requests have none.
ALTER TABLE job_history ADD COLUMN request_id TEXT;
