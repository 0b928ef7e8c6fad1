-- The devices of each batch, kept beside the queue rather than in its job: the queue rewrites
-- a job's whole row each time the job changes state (taken, running, done), and reads it
-- through to the columns after the job's body, so a list of a thousand registration ids in
-- the body (18 KB with the benchmark's short ids, over 100 KB with real ones) was copied
-- again and again. The job names its list; a push's lists go when it finishes.
CREATE TABLE batch_lists (
    id INTEGER PRIMARY KEY,
    message_id INTEGER NOT NULL REFERENCES messages (id),
    -- JSON: the batch job with its devices
    job TEXT NOT NULL
);
CREATE INDEX batch_lists_by_message ON batch_lists (message_id);
