-- Pushes and what became of each one on each device.
CREATE TABLE messages (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- the client's Idempotency-Key: the same key gives the same message
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
    -- how many devices have their final row: counted as rows are written, once each
    recorded BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    finished_at BIGINT
);

CREATE TABLE deliveries (
    message_id BIGINT NOT NULL REFERENCES messages (id),
    registration_id TEXT COLLATE "C" NOT NULL,
    outcome TEXT NOT NULL CHECK (outcome IN ('accepted', 'rejected', 'failed', 'not_attempted')),
    c2dm_message_id TEXT,
    error TEXT,
    attempts BIGINT NOT NULL,
    possible_duplicates BIGINT NOT NULL,
    at BIGINT NOT NULL,
    PRIMARY KEY (message_id, registration_id)
);

CREATE INDEX deliveries_by_outcome ON deliveries (message_id, outcome, registration_id);
