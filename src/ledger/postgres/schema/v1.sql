-- ephemera ledger schema, version 1: leases, used replay keys, webhook deliveries.
-- Applied by the broker at start under an advisory lock (schema.rs); never edit a shipped
-- version: add the next file instead.

CREATE TABLE ephemera_leases (
    id              text COLLATE "C" PRIMARY KEY,
    job             text NOT NULL,
    policy          text NOT NULL,
    issuer          text NOT NULL,
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
    credentials     jsonb NOT NULL,
    claims          jsonb NOT NULL,
    -- Claim values operators filter by, as text (LeaseFilter).
    repository_id   text,
    project_id      text,
    actor_id        text,
    user_id         text
);

-- Ending a job, and the admin filters.
CREATE INDEX ephemera_leases_job ON ephemera_leases (job);
CREATE INDEX ephemera_leases_policy ON ephemera_leases (policy, id);
CREATE INDEX ephemera_leases_state ON ephemera_leases (state, id);
CREATE INDEX ephemera_leases_repository ON ephemera_leases (repository_id) WHERE repository_id IS NOT NULL;
CREATE INDEX ephemera_leases_project ON ephemera_leases (project_id) WHERE project_id IS NOT NULL;
CREATE INDEX ephemera_leases_actor ON ephemera_leases (actor_id) WHERE actor_id IS NOT NULL;
CREATE INDEX ephemera_leases_user ON ephemera_leases (user_id) WHERE user_id IS NOT NULL;
-- The reaper: due expiries, due retries, ended leases to forget. Each index holds only the
-- rows its query can want.
CREATE INDEX ephemera_leases_expiry ON ephemera_leases (expires_at) WHERE state = 'active';
CREATE INDEX ephemera_leases_retry ON ephemera_leases (next_attempt_at) WHERE state IN ('revoking', 'irrevocable');
CREATE INDEX ephemera_leases_ended ON ephemera_leases ((greatest(expires_at, created_at))) WHERE state IN ('revoked', 'expired');

-- A token's jti under one policy mints once, on any replica; pruned once the token has expired.
CREATE TABLE ephemera_replay_keys (
    key   text COLLATE "C" PRIMARY KEY,
    until bigint NOT NULL
);
CREATE INDEX ephemera_replay_keys_until ON ephemera_replay_keys (until);

-- Webhook deliveries already acted on, by any replica (platforms redeliver).
CREATE TABLE ephemera_deliveries (
    hook    text NOT NULL,
    id      text NOT NULL,
    seen_at bigint NOT NULL,
    PRIMARY KEY (hook, id)
);
CREATE INDEX ephemera_deliveries_seen ON ephemera_deliveries (seen_at);
