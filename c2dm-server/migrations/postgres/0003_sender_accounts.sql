-- What every worker of every process shares about one sender account.
CREATE TABLE sender_accounts (
    account TEXT PRIMARY KEY,
    -- no worker sends before this time (ms since the epoch): a 503 or QuotaExceeded seen by one
    paused_until BIGINT,
    -- the day (days since the epoch, UTC) budget_used counts
    budget_day BIGINT NOT NULL DEFAULT 0,
    -- messages reserved today by the batches of every worker
    budget_used BIGINT NOT NULL DEFAULT 0
);
