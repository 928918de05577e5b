-- The name of the API token that submitted each job ([server.auth]), so that a log and the
-- store say who submitted it and a DELETE can be limited to its submitter. NULL for jobs
-- submitted with auth off.
ALTER TABLE jobs ADD COLUMN submitted_by TEXT;
