-- Where the walk of a push's audience is: the position after which it goes on (set with each
-- page's batch job, in one transaction), and how many devices it has enqueued.
ALTER TABLE messages ADD COLUMN walk_after BIGINT;
ALTER TABLE messages ADD COLUMN walked BIGINT NOT NULL DEFAULT 0;
