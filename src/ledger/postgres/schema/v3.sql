-- ephemera ledger schema, version 3: what changes in a lease apart from what never does.
--
-- Until version 2 a lease was one row: its claims snapshot (about a kilobyte of JSON) beside its
-- state. `state` is in the key or the predicate of four indexes, so no update could be HOT:
-- each revocation's two updates wrote a whole new row version, claims included, and an entry
-- in every one of the table's eleven indexes. A soak measured 98 % of updates not HOT and
-- 4.5-6.2 KiB of WAL per exchange (docs/benchmarks.md, "The soak").
--
-- Now `ephemera_leases` keeps what a lease is born with and never changes (job, policy, issuer,
-- claims and the claim values operators filter by); `ephemera_lease_state` keeps what the
-- revocation path and renewals change (state, attempts, claims of work, credentials, renewal),
-- a few hundred bytes a row, with the indexes the reaper and the state filter need. A lease is
-- both rows: written in one statement, forgotten in one statement (no foreign key: its check
-- would lock the lease row on every write of the state row).
--
-- Brokers older than version 3 cannot run against this schema (their statements name columns
-- that are gone): upgrade all replicas together (docs/postgres.md, "Upgrading").

CREATE TABLE ephemera_lease_state (
    id              text COLLATE "C" PRIMARY KEY,
    -- Copies of the lease's own (never changed), for the indexes below: the reaper's, and the
    -- job's live leases, found without a join (a join planned on a young table's statistics
    -- walked every active lease per job ended, until autovacuum's first analyze).
    job             text NOT NULL,
    created_at      bigint NOT NULL,
    expires_at      bigint NOT NULL,
    state           text NOT NULL CHECK (state IN ('active', 'revoking', 'revoked', 'expired', 'irrevocable')),
    reason          text,
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at bigint NOT NULL DEFAULT 0,
    last_error      text,
    -- The replica that last claimed this lease's revocation (start-up reclaims its own at once).
    claimed_by      text,
    -- The distinct backends of `credentials`: per-backend counts and start-up adoption.
    backends        text[] NOT NULL,
    -- A renewal adds credentials; a revocation reads them under the same row lock.
    credentials     jsonb NOT NULL,
    renewal         jsonb
);

INSERT INTO ephemera_lease_state (id, job, created_at, expires_at, state, reason, attempts, next_attempt_at,
                                  last_error, claimed_by, backends, credentials, renewal)
SELECT id, job, created_at, expires_at, state, reason, attempts, next_attempt_at, last_error, claimed_by, backends,
       credentials, renewal
FROM ephemera_leases;

CREATE INDEX ephemera_lease_state_state ON ephemera_lease_state (state, id);
-- Ending a job: its active leases. Partial, so a revocation's updates add no entry to it.
CREATE INDEX ephemera_lease_state_job ON ephemera_lease_state (job) WHERE state = 'active';
-- The reaper: due expiries, due retries, ended leases to forget. Each index holds only the
-- rows its query can want.
CREATE INDEX ephemera_lease_state_expiry ON ephemera_lease_state (expires_at) WHERE state = 'active';
CREATE INDEX ephemera_lease_state_retry ON ephemera_lease_state (next_attempt_at) WHERE state IN ('revoking', 'irrevocable');
CREATE INDEX ephemera_lease_state_ended ON ephemera_lease_state ((greatest(expires_at, created_at))) WHERE state IN ('revoked', 'expired');

-- Their indexes (state, expiry, retry, ended) go with them.
ALTER TABLE ephemera_leases
    DROP COLUMN state,
    DROP COLUMN reason,
    DROP COLUMN attempts,
    DROP COLUMN next_attempt_at,
    DROP COLUMN last_error,
    DROP COLUMN claimed_by,
    DROP COLUMN backends,
    DROP COLUMN credentials,
    DROP COLUMN renewal;
