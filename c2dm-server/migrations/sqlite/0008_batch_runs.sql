-- Each run of a batch claims it: a worker taken for dead (its heartbeats late) may be alive
-- and still sending when its batch runs again elsewhere. Only the latest run may move the
-- batch's mark or write its rows, so the earlier one stops at its next mark, and every
-- device it may have sent to is below the mark the new run read: counted as a possible
-- duplicate, never sent twice unmarked.
ALTER TABLE batch_marks ADD COLUMN run INTEGER NOT NULL DEFAULT 0;
