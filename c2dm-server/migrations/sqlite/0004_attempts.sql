-- Devices a batch is about to send a push to, written before the sends: a batch run again
-- after its worker died sends to these again, and marks their rows as possible duplicates.
-- A push's marks go when it finishes.
CREATE TABLE attempts (
    message_id INTEGER NOT NULL REFERENCES messages (id),
    registration_id TEXT NOT NULL,
    PRIMARY KEY (message_id, registration_id)
);
