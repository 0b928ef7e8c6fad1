-- The index by outcome keeps only the outcomes other than `accepted`: the few rows a list by
-- outcome or by error looks for, where the rows of a push are almost all accepted. A list of
-- accepted rows reads the key's order, where nearly every row is one. Each row written cost
-- an entry in this index; now only the few that were not accepted do.
DROP INDEX deliveries_by_outcome;
CREATE INDEX deliveries_by_outcome ON deliveries (message_id, outcome, registration_id)
    WHERE outcome <> 'accepted';
