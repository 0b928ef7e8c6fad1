-- A push's rows counted by outcome as they are written, in the transaction that writes them
-- (beside `recorded`): what a list of pushes shows without counting their rows each time.
ALTER TABLE messages ADD COLUMN accepted BIGINT NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN rejected BIGINT NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN failed BIGINT NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN not_attempted BIGINT NOT NULL DEFAULT 0;
UPDATE messages SET
    accepted = (SELECT COUNT(*) FROM deliveries d WHERE d.message_id = messages.id AND d.outcome = 'accepted'),
    rejected = (SELECT COUNT(*) FROM deliveries d WHERE d.message_id = messages.id AND d.outcome = 'rejected'),
    failed = (SELECT COUNT(*) FROM deliveries d WHERE d.message_id = messages.id AND d.outcome = 'failed'),
    not_attempted = (SELECT COUNT(*) FROM deliveries d WHERE d.message_id = messages.id AND d.outcome = 'not_attempted');
