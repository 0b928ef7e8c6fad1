-- What went wrong with a push's batches: the last store error a batch met (retried until it
-- passed), when it last happened, and since when they have been failing (cleared once a batch
-- that failed writes again). Times in milliseconds since the Unix epoch.
ALTER TABLE messages ADD COLUMN last_error TEXT;
ALTER TABLE messages ADD COLUMN last_error_at BIGINT;
ALTER TABLE messages ADD COLUMN failing_since BIGINT;
