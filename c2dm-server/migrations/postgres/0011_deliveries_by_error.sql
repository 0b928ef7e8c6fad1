-- A list of a push's rows by error (a C2DM code, or why a device was not sent to) reads the
-- rows with that error, in the key's order, from this index: before, it read the push's rows
-- in the key's order, all of them when the error was rare. Only the rows with an error have an
-- entry: no accepted row has one.
CREATE INDEX deliveries_by_error ON deliveries (message_id, error, registration_id)
    WHERE error IS NOT NULL;
