-- ephemera ledger schema, version 2: renewable leases (issue 15). A lease's renewal (the SHA-256
-- of its renew token, how often it was renewed, when last) as JSON; NULL for a lease that cannot
-- be renewed, which is every lease written by version 1.

ALTER TABLE ephemera_leases ADD COLUMN renewal jsonb;
