-- Each run of a batch claims it: a worker taken for dead (its heartbeats late) may be alive
-- and still sending when its batch runs again elsewhere. Only the latest run may move the
-- batch's mark or write its rows, so the earlier one stops at its next mark, and every
-- device it may have sent to is below the mark the new run read: counted as a possible
-- duplicate, never sent twice unmarked.
ALTER TABLE batch_marks ADD COLUMN run INTEGER NOT NULL DEFAULT 0;
-- Set by the run's last write, with its last rows and the jobs of the devices it put back for
-- later: a run after that (its worker died before the queue heard) does nothing, so nothing
-- is put back twice.
ALTER TABLE batch_marks ADD COLUMN finished BOOLEAN NOT NULL DEFAULT 0;
-- How many runs moved the mark (each may have sent to the devices below it), and the last
-- that did: a device below the mark without a row counts that many possible duplicates.
ALTER TABLE batch_marks ADD COLUMN sending_runs INTEGER NOT NULL DEFAULT 0;
ALTER TABLE batch_marks ADD COLUMN marked_run INTEGER NOT NULL DEFAULT 0;
