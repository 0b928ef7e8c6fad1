-- How far each batch of a push had got down its list of devices, written before its sends:
-- a batch run again after its worker died sends again to the devices below the mark that
-- have no row, and counts each such row one possible duplicate more. One row a batch, not
-- one a device (which the `attempts` table held, and which cost a fifth of a push's time).
-- A push's marks go when it finishes.
DROP TABLE attempts;
CREATE TABLE batch_marks (
    message_id INTEGER NOT NULL REFERENCES messages (id),
    batch TEXT NOT NULL,
    sent_through INTEGER NOT NULL,
    PRIMARY KEY (message_id, batch)
);
