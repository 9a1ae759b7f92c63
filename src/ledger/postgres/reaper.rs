//! The reaper's statements: claiming due expiries and retries, and forgetting what has ended.
//!
//! Each one reaches its rows through an index and touches only those. The rows are picked by a
//! subquery ordered by its index's column and handed to the outer statement as an array
//! (`id = ANY(ARRAY(…))`), which PostgreSQL looks up by key, never as a join (`id IN (…)`).
//! Given `IN`, the planner hash-joined the picked ids against the whole table: a sequential scan
//! of every lease on every pass, 247 ms on ~130,000 leases where the key lookup took 44 ms
//! (`EXPLAIN ANALYZE` mid-soak), growing with the table, and every exchange's tail with it. A
//! `LIMIT` without `ORDER BY` let the planner scan the table for the first matches, which reads
//! all of it while nothing is due. The test below holds every statement to its index.

use super::rows::returning_work;

/// Claimed per statement at most, so one reaper pass holds a bounded number of row locks; the
/// next pass takes the rest.
pub const CLAIM_LIMIT: i64 = 5000;
/// Rows one pruning statement deletes at most.
pub const PRUNE_BATCH: u64 = 5000;

/// A lease whose every credential is of a quiet backend (`$4`): its expiry needs nothing
/// upstream. A lease with no credential at all takes the usual way.
const QUIET: &str = "(cardinality(backends) > 0 AND backends <@ $4::text[])";

/// `$1` now, `$2` when a claim counts as stalled, `$3` the claiming replica, `$4` the quiet
/// backends (`LeaseStore::claim_due`): active leases past their expiry start revoking, claimed by
/// this replica; those whose credentials are all quiet end here, `expired`, in the same write.
pub fn claim_expired() -> String {
    returning_work(&format!(
        "UPDATE ephemera_lease_state SET reason = 'expired', next_attempt_at = $2, \
             state = CASE WHEN {QUIET} THEN 'expired' ELSE 'revoking' END, \
             claimed_by = CASE WHEN {QUIET} THEN NULL ELSE $3 END \
         WHERE id = ANY(ARRAY(SELECT id FROM ephemera_lease_state WHERE state = 'active' AND expires_at <= $1 \
                              ORDER BY expires_at LIMIT {CLAIM_LIMIT} FOR UPDATE SKIP LOCKED)) \
           AND state = 'active'"
    ))
}

/// As [`claim_expired`]: pending revocations whose next attempt is due.
pub fn claim_retries() -> String {
    returning_work(&format!(
        "UPDATE ephemera_lease_state SET next_attempt_at = $2, claimed_by = $3 \
         WHERE id = ANY(ARRAY(SELECT id FROM ephemera_lease_state \
                              WHERE state IN ('revoking', 'irrevocable') AND next_attempt_at <= $1 \
                              ORDER BY next_attempt_at LIMIT {CLAIM_LIMIT} FOR UPDATE SKIP LOCKED)) \
           AND state IN ('revoking', 'irrevocable')"
    ))
}

/// As [`claim_expired`]: at start-up, every due pending revocation and whatever this replica had
/// claimed before it restarted; never work another live replica is in the middle of (it is due
/// again if that replica died). Unlimited: start-up resumes them all.
pub fn claim_all_pending() -> String {
    returning_work(
        "UPDATE ephemera_lease_state SET next_attempt_at = $2, claimed_by = $3 \
         WHERE id = ANY(ARRAY(SELECT id FROM ephemera_lease_state \
                              WHERE state IN ('revoking', 'irrevocable') AND (next_attempt_at <= $1 OR claimed_by = $3) \
                              ORDER BY next_attempt_at FOR UPDATE SKIP LOCKED)) \
           AND state IN ('revoking', 'irrevocable')",
    )
}

/// `$1` the cut-off: ended leases whose end is older, both rows of each
/// (`ephemera_lease_state_ended`).
pub fn prune_leases() -> String {
    format!(
        "WITH gone AS (DELETE FROM ephemera_lease_state \
             WHERE id = ANY(ARRAY(SELECT id FROM ephemera_lease_state \
                                  WHERE state IN ('revoked', 'expired') AND greatest(expires_at, created_at) <= $1 \
                                  ORDER BY greatest(expires_at, created_at) LIMIT {PRUNE_BATCH})) \
               AND state IN ('revoked', 'expired') RETURNING id) \
         DELETE FROM ephemera_leases WHERE id = ANY(ARRAY(SELECT id FROM gone))"
    )
}

/// `$1` now: replay keys whose token has expired (`ephemera_replay_keys_until`).
pub fn prune_replay_keys() -> String {
    format!(
        "DELETE FROM ephemera_replay_keys \
         WHERE key = ANY(ARRAY(SELECT key FROM ephemera_replay_keys WHERE until <= $1 ORDER BY until LIMIT {PRUNE_BATCH})) \
           AND until <= $1"
    )
}

/// `$1` the cut-off: webhook deliveries seen before it (`ephemera_deliveries_seen`). Their key is
/// two columns, so the rows are handed over by their physical address; the repeated condition
/// makes sure a slot reused since then is not taken with it.
pub fn prune_deliveries() -> String {
    format!(
        "DELETE FROM ephemera_deliveries \
         WHERE ctid = ANY(ARRAY(SELECT ctid FROM ephemera_deliveries WHERE seen_at <= $1 \
                                ORDER BY seen_at LIMIT {PRUNE_BATCH})) \
           AND seen_at <= $1"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::postgres::testing;
    use crate::ledger::{PgStore, RetryPolicy};

    const ROWS: i64 = 150_000;

    /// Leases, a third each active, ended and revoking (both rows), as many replay keys and
    /// deliveries: tables the planner knows are large. Row `i` expires (is due, ended, seen) at
    /// `2000 + i`.
    fn fill() -> String {
        format!(
            "INSERT INTO ephemera_leases (id, job, policy, issuer, created_at, expires_at, claims)
             SELECT 'lse_' || i, 'job-' || i, 'p', 'https://issuer.test', 1000 + i, 2000 + i, '{{}}'
             FROM generate_series(1, {ROWS}) i;
             INSERT INTO ephemera_lease_state (id, job, created_at, expires_at, state, next_attempt_at, backends, credentials)
             SELECT 'lse_' || i, 'job-' || i, 1000 + i, 2000 + i,
                    (ARRAY['active', 'expired', 'revoking'])[1 + i % 3], 2000 + i, ARRAY['jwt'], '[]'
             FROM generate_series(1, {ROWS}) i;
             INSERT INTO ephemera_replay_keys (key, until) SELECT 'k' || i, 2000 + i FROM generate_series(1, {ROWS}) i;
             INSERT INTO ephemera_deliveries (hook, id, seen_at)
             SELECT 'github', 'd' || i, 2000 + i FROM generate_series(1, {ROWS}) i;
             ANALYZE;"
        )
    }

    /// Each statement run (and rolled back) with a cut-off that selects ten rows, on a generic
    /// plan (what a pooled connection's prepared statement settles on) and on a custom one: the
    /// pages it touches stay a handful, where a walk of the table, or of every active lease in
    /// an index, touches thousands (but for the start-up claim, which walks the pending ones). With a cut-off that selects every row, no plan reads a table
    /// whole either.
    #[tokio::test]
    async fn every_reaper_statement_reaches_its_rows_through_an_index_on_a_large_table() {
        let cfg = testing::fresh_database().await;
        let store = PgStore::open(&cfg, None, "t", RetryPolicy::default()).await.unwrap();
        let (client, connection) =
            crate::pg_connect::settings(&cfg, None).connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client.batch_execute(&fill()).await.unwrap();
        let statements = [
            ("claim_expired", claim_expired(), "$1, 0, 'r', ARRAY['jwt']"),
            ("claim_retries", claim_retries(), "$1, 0, 'r'"),
            ("prune_leases", prune_leases(), "$1"),
            ("prune_replay_keys", prune_replay_keys(), "$1"),
            ("prune_deliveries", prune_deliveries(), "$1"),
            // Once, at start-up: it walks the pending revocations (its own claims are found
            // among them), never the table.
            ("claim_all_pending", claim_all_pending(), "$1, 0, 'r'"),
        ];
        let lines = |sql: String| {
            let client = &client;
            async move {
                let rows = client.simple_query(&sql).await.unwrap();
                let text = rows.iter().filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                    _ => None,
                });
                text.collect::<Vec<_>>().join("\n")
            }
        };
        for (name, sql, args) in &statements {
            client.batch_execute(&format!("PREPARE {name} AS {sql}")).await.unwrap();
            for mode in ["force_generic_plan", "force_custom_plan"] {
                client.batch_execute(&format!("SET plan_cache_mode = {mode}")).await.unwrap();
                let run = |cut_off: i64| format!("EXECUTE {name}({})", args.replace("$1", &cut_off.to_string()));
                client.batch_execute("BEGIN").await.unwrap();
                let plan = lines(format!("EXPLAIN (ANALYZE, BUFFERS) {}", run(2010))).await;
                client.batch_execute("ROLLBACK").await.unwrap();
                assert!(
                    *name == "claim_all_pending" || pages_touched(&plan) < 200,
                    "{name} ({mode}) touched too many pages for ten rows:\n{plan}"
                );
                let plan = lines(format!("EXPLAIN {}", run(ROWS + 3000))).await;
                assert!(!plan.contains("Seq Scan"), "{name} ({mode}, every row due) reads a table whole:\n{plan}");
            }
        }
        drop(store);
    }

    /// The pages the whole statement touched: the first `Buffers:` line, its top node's, which
    /// counts its children's.
    fn pages_touched(plan: &str) -> u64 {
        let line = plan.lines().find(|l| l.trim_start().starts_with("Buffers:")).unwrap_or_default();
        let count = |what: &str| {
            line.split_whitespace().find_map(|w| w.strip_prefix(what)).map_or(0, |n| n.parse::<u64>().unwrap())
        };
        count("hit=") + count("read=")
    }
}
