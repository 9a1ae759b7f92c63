//! The ledger's schema, embedded and versioned. At start every replica takes one advisory lock,
//! applies the versions the database lacks (each in its own transaction) and lets go: replicas
//! starting together on an empty database apply each version once, and all become ready.
//! A database at a version newer than this binary knows refuses the start: an older binary would
//! write rows a newer schema does not expect, or miss columns it relies on.

use deadpool_postgres::Pool;

/// Every version, in order. Never edit a shipped one: add the next.
const VERSIONS: &[(i32, &str)] =
    &[(1, include_str!("schema/v1.sql")), (2, include_str!("schema/v2.sql")), (3, include_str!("schema/v3.sql"))];

/// The newest version this binary knows.
pub const LATEST: i32 = 3;

/// The advisory lock all replicas migrate under ("ephemera" in ASCII, as a number).
const MIGRATION_LOCK: i64 = 0x6570_6865_6d65_7261;

/// Brings the database to [`LATEST`]; returns the version it was at (0: empty).
pub async fn migrate(pool: &Pool, replica: &str) -> Result<i32, String> {
    migrate_to(pool, replica, LATEST).await
}

/// Brings the database to version `upto` (tests make older databases with it).
async fn migrate_to(pool: &Pool, replica: &str, upto: i32) -> Result<i32, String> {
    let mut client = pool.get().await.map_err(|e| format!("connecting: {}", super::pool_error(&e)))?;
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await.map_err(|e| super::db_error(&e))?;
    let result = apply(&mut client, replica, upto).await;
    // The lock is the session's: it is also released if this connection dies.
    let unlock = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await;
    let found = result?;
    unlock.map_err(|e| super::db_error(&e))?;
    Ok(found)
}

async fn apply(client: &mut deadpool_postgres::Object, replica: &str, upto: i32) -> Result<i32, String> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS ephemera_schema (
                 version    integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now(),
                 applied_by text NOT NULL
             )",
        )
        .await
        .map_err(|e| super::db_error(&e))?;
    let row = client
        .query_one("SELECT coalesce(max(version), 0) FROM ephemera_schema", &[])
        .await
        .map_err(|e| super::db_error(&e))?;
    let found: i32 = row.get(0);
    if found > LATEST {
        return Err(format!(
            "the database's ledger schema is version {found}, newer than this broker knows ({LATEST}): \
             run a broker at least as new as the one that upgraded it"
        ));
    }
    for (version, sql) in VERSIONS.iter().filter(|(v, _)| *v > found && *v <= upto) {
        let tx = client.transaction().await.map_err(|e| super::db_error(&e))?;
        tx.batch_execute(sql).await.map_err(|e| format!("schema version {version}: {}", super::db_error(&e)))?;
        tx.execute("INSERT INTO ephemera_schema (version, applied_by) VALUES ($1, $2)", &[version, &replica])
            .await
            .map_err(|e| super::db_error(&e))?;
        tx.commit().await.map_err(|e| super::db_error(&e))?;
        tracing::info!(version, replica, "ledger schema migrated");
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{NO_QUIET_BACKENDS, PgStore, RetryPolicy};
    use std::sync::Arc;

    #[tokio::test]
    async fn a_database_migrated_by_a_newer_broker_refuses_this_one_and_says_why() {
        let cfg = super::super::testing::fresh_database().await;
        drop(PgStore::open(&cfg, None, "old", RetryPolicy::default()).await.unwrap());
        let opened = PgStore::open(&cfg, None, "again", RetryPolicy::default()).await;
        assert!(opened.is_ok(), "a database at this version opens again, migrating nothing");
        let (client, connection) =
            crate::pg_connect::settings(&cfg, None).connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client
            .execute("INSERT INTO ephemera_schema (version, applied_by) VALUES ($1, 'newer')", &[&(LATEST + 1)])
            .await
            .unwrap();
        let Err(e) = PgStore::open(&cfg, None, "old", RetryPolicy::default()).await else {
            panic!("a newer schema must refuse the start")
        };
        assert!(e.contains(&format!("version {}, newer than this broker knows ({LATEST})", LATEST + 1)), "{e}");
        let rows: i64 = client.query_one("SELECT count(*) FROM ephemera_schema", &[]).await.unwrap().get(0);
        assert_eq!(rows, i64::from(LATEST) + 1, "each version recorded once");
    }

    /// How version 2 wrote a lease (`rows::IMPORT_LEASE` before version 3): one row.
    const V2_LEASE: &str = "
        INSERT INTO ephemera_leases (id, job, policy, issuer, created_at, expires_at, state, reason, attempts,
                                     next_attempt_at, last_error, backends, credentials, claims, repository_id,
                                     project_id, actor_id, user_id, renewal)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, string_to_array($12, ','), $13::text::jsonb,
                $14::text::jsonb, $15, $16, $17, $18, $19::text::jsonb)";

    #[tokio::test]
    async fn a_version_2_database_with_leases_in_every_state_migrates_to_3_and_keeps_every_field() {
        use crate::ledger::{ClaimSnapshot, LeaseCredential, LeaseState, LeaseStore, Renewal};
        use crate::mint::{Revocation, RevokeHandle};
        let cfg = super::super::testing::fresh_database().await;
        let pool = crate::pg_connect::pool(&cfg, None, "ledger").unwrap();
        assert_eq!(migrate_to(&pool, "old", 2).await, Ok(0));
        let cred = |jti: &str| {
            let handle = RevokeHandle { backend: "jwt".into(), data: serde_json::json!({"jti": jti}) };
            LeaseCredential::new("api", "jwt", Revocation::Immediate, &handle)
        };
        let lease = |id: &str, state: LeaseState| {
            let mut l = crate::ledger::suite::lease(id, "job-1", 100);
            l.state = state;
            l.credentials = vec![cred(&format!("{id}-1"))].into_boxed_slice();
            let claims = serde_json::json!({"repository_id": "74", "actor_id": "9", "ref": "refs/heads/main"});
            let serde_json::Value::Object(map) = claims else { unreachable!() };
            l.claims = ClaimSnapshot::new(&map.into_iter().collect());
            if state != LeaseState::Active {
                l.reason = Some(crate::ledger::name::intern("job"));
            }
            l
        };
        let mut renewed = lease("a", LeaseState::Active);
        renewed.credentials = vec![cred("a-1"), cred("a-2")].into_boxed_slice();
        renewed.renewal = Some(Box::new(Renewal { token_sha256: "ab".repeat(32).into(), count: 1, last_at: 7 }));
        let mut retrying = lease("b", LeaseState::Revoking);
        (retrying.attempts, retrying.next_attempt_at, retrying.last_error) = (2, 50, Some("boom".into()));
        let mut irrevocable = lease("e", LeaseState::Irrevocable);
        (irrevocable.attempts, irrevocable.next_attempt_at, irrevocable.last_error) = (9, 70, Some("gone".into()));
        let leases = [renewed, retrying, lease("c", LeaseState::Revoked), lease("d", LeaseState::Expired), irrevocable];
        {
            let client = pool.get().await.unwrap();
            for l in &leases {
                client.execute(V2_LEASE, &super::super::rows::import_params(l).unwrap().as_params()).await.unwrap();
            }
        }

        let store = PgStore::open(&cfg, None, "new", RetryPolicy::default()).await.unwrap();
        for l in &leases {
            assert_eq!(store.get(&l.id).await.unwrap().as_ref(), Some(l), "lease {} after the migration", l.id);
        }
        // What the narrow table serves: claims of work, revocations, renewals, counts, pruning.
        let retries: Vec<_> =
            store.claim_due(60, &NO_QUIET_BACKENDS).await.unwrap().retries.iter().map(|w| w.lease_id.clone()).collect();
        assert_eq!(retries, [Arc::from("b")], "the retry due by now, not the one due at 70");
        assert!(store.renew("a", &[cred("a-3")], 8).await.unwrap());
        let work = store.begin_revoke("a", "job", 9).await.unwrap().unwrap();
        assert_eq!(work.credentials.len(), 3, "both old credentials and the renewal's");
        let counts = store.counts().await.unwrap();
        assert_eq!(counts.by_state[LeaseState::Revoking.index()], 2);
        let forget_at = 100 + crate::ledger::ENDED_RETENTION_SECS;
        assert_eq!(store.maintain(forget_at).await.unwrap().forgotten, 2, "c and d");
        let client = pool.get().await.unwrap();
        for table in ["ephemera_leases", "ephemera_lease_state"] {
            let ids = client.query(&format!("SELECT id FROM {table} ORDER BY id"), &[]).await.unwrap();
            let ids: Vec<String> = ids.iter().map(|r| r.get(0)).collect();
            assert_eq!(ids, ["a", "b", "e"], "{table}: a lease is forgotten whole");
        }
    }

    #[test]
    fn versions_are_numbered_one_by_one_up_to_the_latest() {
        for (i, (version, sql)) in VERSIONS.iter().enumerate() {
            assert_eq!(*version, i32::try_from(i).unwrap() + 1);
            assert!(sql.contains("CREATE TABLE") || sql.contains("ALTER TABLE"), "version {version} is empty");
        }
        assert_eq!(VERSIONS.last().map(|(v, _)| *v), Some(LATEST));
    }
}
