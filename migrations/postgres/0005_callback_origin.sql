-- The destination (scheme, host and port) of each queued callback, filled in by the
-- notifier the first time it sees the row (the URL is parsed in Rust, not SQL), so that the
-- claim can pass over the rows of a destination that is busy or backing off without
-- claiming them: one bad endpoint then holds neither the delivery slots nor the claim.
-- NULL until the notifier has seen the row.
ALTER TABLE notify_outbox ADD COLUMN origin TEXT;
