-- A push's rows are kept in the order of their key, (message_id, registration_id), and
-- nowhere else: a table WITHOUT ROWID is that key's b-tree, so a row written is one b-tree
-- insert, not two (the table's, and its key's index). The index by outcome keeps only the
-- outcomes other than `accepted`: the few rows a list by outcome or by error looks for, where
-- the rows of a push are almost all accepted. A list of accepted rows reads the key's order,
-- where nearly every row is one. Each row written to a push of a million devices cost three
-- b-tree inserts; it costs one, and a second for the few that were not accepted.
-- Nor is a row's push looked up as it is written: rows are written only by a run of one of the
-- push's batches, in the transaction that finds the batch's mark (which references the push)
-- still there, and pushes are never deleted. The check was a lookup per row, and on PostgreSQL
-- a trigger per row as well.
CREATE TABLE deliveries_by_key (
    message_id INTEGER NOT NULL,
    registration_id TEXT NOT NULL,
    outcome TEXT NOT NULL CHECK (outcome IN ('accepted', 'rejected', 'failed', 'not_attempted')),
    c2dm_message_id TEXT,
    error TEXT,
    attempts INTEGER NOT NULL,
    possible_duplicates INTEGER NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (message_id, registration_id)
) WITHOUT ROWID;
INSERT INTO deliveries_by_key (message_id, registration_id, outcome, c2dm_message_id, error,
    attempts, possible_duplicates, at)
    SELECT message_id, registration_id, outcome, c2dm_message_id, error, attempts,
        possible_duplicates, at
    FROM deliveries;
DROP TABLE deliveries;
ALTER TABLE deliveries_by_key RENAME TO deliveries;
CREATE INDEX deliveries_by_outcome ON deliveries (message_id, outcome, registration_id)
    WHERE outcome <> 'accepted';
