-- The expiry sweep reads the whole table once a sweep interval instead of an index: every
-- new job and every (re)stage of one, a new row version each, paid an entry in this index,
-- which was about a quarter of the cost of the engine's batched stage update on PostgreSQL.
-- A scan a minute over the unfinished jobs is cheap next to that.
DROP INDEX jobs_expires;
