-- The devices of each batch, kept beside the queue rather than in its job: the queue rewrites
-- a job's row each time the job changes state (taken, running, done), so a list of a thousand
-- registration ids in its body was copied again and again. The job names its list; a push's
-- lists go when it finishes.
CREATE TABLE batch_lists (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id BIGINT NOT NULL REFERENCES messages (id),
    -- JSON: the batch job with its devices
    job TEXT NOT NULL
);
CREATE INDEX batch_lists_by_message ON batch_lists (message_id);
