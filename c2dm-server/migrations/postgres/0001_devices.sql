-- The device registry. Times are milliseconds since the Unix epoch, as in the SQLite schema.
CREATE TABLE devices (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- byte order, as in SQLite: what listings page by
    registration_id TEXT COLLATE "C" NOT NULL UNIQUE,
    device_id TEXT,
    user_id TEXT,
    app_version TEXT,
    -- 'active', 'unregistered' (by the app) or 'gone' (by C2DM)
    state TEXT NOT NULL CHECK (state IN ('active', 'unregistered', 'gone')),
    -- the C2DM code that made it gone
    reason TEXT,
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
