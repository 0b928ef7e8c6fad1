-- The server's tables on PostgreSQL. Times are milliseconds since the Unix epoch.

-- The device registry, in registration order (`id` is a device's position: what listings and
-- the walk of an audience page by).
CREATE TABLE devices (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    registration_id TEXT COLLATE "C" NOT NULL UNIQUE,
    device_id TEXT,
    user_id TEXT,
    app_version TEXT,
    -- 'active', 'unregistered' (by the app) or 'gone' (by C2DM)
    state TEXT NOT NULL CHECK (state IN ('active', 'unregistered', 'gone')),
    -- the C2DM code that made it gone
    reason TEXT,
    -- which service sends to it: 'c2dm' (its registration id) or 'fcm' (its FCM token)
    provider TEXT NOT NULL DEFAULT 'c2dm' CHECK (provider IN ('c2dm', 'fcm')),
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    state_changed_at BIGINT NOT NULL
);
CREATE INDEX devices_by_user ON devices (user_id, id);
CREATE INDEX devices_by_state ON devices (state, id);

CREATE TABLE device_tags (
    tag TEXT NOT NULL,
    device BIGINT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    PRIMARY KEY (tag, device)
);
CREATE INDEX device_tags_by_device ON device_tags (device);

-- Pushes.
CREATE TABLE pushes (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- the client's Idempotency-Key: the same key gives the same push
    idempotency_key TEXT UNIQUE,
    -- JSON: {"registration_ids": [...]}, {"user_id": ...}, {"tag": ...} or "all"
    audience TEXT NOT NULL,
    collapse_key TEXT NOT NULL,
    -- JSON: [[key, value], ...]
    data TEXT NOT NULL,
    delay_while_idle BOOLEAN NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'sending', 'done', 'cancelled')),
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    -- how many devices the audience has: set when it has been walked
    total BIGINT,
    -- where the walk of the audience goes on from, and how many devices it has enqueued
    walk_after BIGINT,
    walked BIGINT NOT NULL DEFAULT 0,
    -- devices with their final row, and those by outcome, counted as rows are written
    recorded BIGINT NOT NULL DEFAULT 0,
    accepted BIGINT NOT NULL DEFAULT 0,
    rejected BIGINT NOT NULL DEFAULT 0,
    failed BIGINT NOT NULL DEFAULT 0,
    not_attempted BIGINT NOT NULL DEFAULT 0,
    -- the last store error a batch met, when, and since when batches have been failing
    last_error TEXT,
    last_error_at BIGINT,
    failing_since BIGINT,
    created_at BIGINT NOT NULL,
    finished_at BIGINT
);

-- What became of each push on each device: one row each, in the key's order (a page of a
-- push's rows reads it in that order). Rows are written only by a run of one of the push's
-- batches, which finds the batch's mark (referencing the push) still there: no reference is
-- checked row by row.
CREATE TABLE deliveries (
    push_id BIGINT NOT NULL,
    registration_id TEXT COLLATE "C" NOT NULL,
    outcome TEXT NOT NULL CHECK (outcome IN ('accepted', 'rejected', 'failed', 'not_attempted')),
    message_id TEXT,
    error TEXT,
    attempts BIGINT NOT NULL,
    possible_duplicates BIGINT NOT NULL,
    at BIGINT NOT NULL,
    PRIMARY KEY (push_id, registration_id)
);
-- Only the rows not accepted: the few a list by outcome looks for.
CREATE INDEX deliveries_by_outcome ON deliveries (push_id, outcome, registration_id)
    WHERE outcome <> 'accepted';
-- Only the rows with an error: what a list by error reads, in the key's order.
CREATE INDEX deliveries_by_error ON deliveries (push_id, error, registration_id)
    WHERE error IS NOT NULL;

-- What every worker of every process shares about one sender account.
CREATE TABLE sender_accounts (
    account TEXT PRIMARY KEY,
    -- no worker sends before this time: a 503 or QuotaExceeded seen by one
    paused_until BIGINT,
    -- why: the answer that began or last extended the pause
    pause_reason TEXT,
    -- the day (days since the epoch, UTC) budget_used counts
    budget_day BIGINT NOT NULL DEFAULT 0,
    -- messages reserved that day by the batches of every worker
    budget_used BIGINT NOT NULL DEFAULT 0
);

-- Each batch of a push: its latest run (only that one may mark or write), how far down its
-- list a run marked before sending, how many runs marked it and the last that did, and
-- whether a run finished it. A push's marks go when it finishes.
CREATE TABLE batch_marks (
    push_id BIGINT NOT NULL REFERENCES pushes (id),
    batch TEXT NOT NULL,
    sent_through BIGINT NOT NULL,
    run BIGINT NOT NULL DEFAULT 0,
    finished BOOLEAN NOT NULL DEFAULT FALSE,
    sending_runs BIGINT NOT NULL DEFAULT 0,
    marked_run BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (push_id, batch)
);

-- The devices of each batch, kept beside the queue rather than in its job (the queue rewrites
-- a job's row each time its state changes). A push's lists go when it finishes.
CREATE TABLE batch_lists (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    push_id BIGINT NOT NULL REFERENCES pushes (id),
    -- JSON: the batch job with its devices
    job TEXT NOT NULL
);
CREATE INDEX batch_lists_by_push ON batch_lists (push_id);

-- Every process learns at once that a push finished or was asked to cancel, whichever process
-- wrote it: its status requests waiting (`?wait=`) and its batches under way listen.
CREATE FUNCTION c2dm_push_news() RETURNS TRIGGER AS $$
BEGIN
    PERFORM pg_notify('c2dm_push_news', NEW.id::text);
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER pushes_news AFTER UPDATE OF state, cancel_requested ON pushes
    FOR EACH ROW
    WHEN (NEW.state IS DISTINCT FROM OLD.state AND NEW.state IN ('done', 'cancelled')
          OR NEW.cancel_requested AND NOT OLD.cancel_requested)
    EXECUTE FUNCTION c2dm_push_news();
