-- How many of a job's files are settled (ready, or failed and not ready) and how many of
-- those failed, kept by the ingest in the same transaction as the files, so that finding
-- the jobs a batch completed, and their counts, costs one row per job rather than a count
-- over all its files.
ALTER TABLE jobs ADD COLUMN settled_files INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN failed_files INTEGER NOT NULL DEFAULT 0;
UPDATE jobs SET
    settled_files = (SELECT count(*) FROM job_files f
                     WHERE f.job_id = jobs.job_id AND (f.ready OR f.error)),
    failed_files = (SELECT count(*) FROM job_files f
                    WHERE f.job_id = jobs.job_id AND f.error AND NOT f.ready);
