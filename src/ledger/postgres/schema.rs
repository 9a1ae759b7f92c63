//! The ledger's schema, embedded and versioned. At start every replica takes one advisory lock,
//! applies the versions the database lacks (each in its own transaction) and lets go: replicas
//! starting together on an empty database apply each version once, and all become ready.
//! A database at a version newer than this binary knows refuses the start: an older binary would
//! write rows a newer schema does not expect, or miss columns it relies on.

use deadpool_postgres::Pool;

/// Every version, in order. Never edit a shipped one: add the next.
const VERSIONS: &[(i32, &str)] = &[(1, include_str!("schema/v1.sql")), (2, include_str!("schema/v2.sql"))];

/// The newest version this binary knows.
pub const LATEST: i32 = 2;

/// The advisory lock all replicas migrate under ("ephemera" in ASCII, as a number).
const MIGRATION_LOCK: i64 = 0x6570_6865_6d65_7261;

/// Brings the database to [`LATEST`]; returns the version it was at (0: empty).
pub async fn migrate(pool: &Pool, replica: &str) -> Result<i32, String> {
    let mut client = pool.get().await.map_err(|e| format!("connecting: {}", super::pool_error(&e)))?;
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await.map_err(|e| super::db_error(&e))?;
    let result = apply(&mut client, replica).await;
    // The lock is the session's: it is also released if this connection dies.
    let unlock = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await;
    let found = result?;
    unlock.map_err(|e| super::db_error(&e))?;
    Ok(found)
}

async fn apply(client: &mut deadpool_postgres::Object, replica: &str) -> Result<i32, String> {
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
    for (version, sql) in VERSIONS.iter().filter(|(v, _)| *v > found) {
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
    use crate::ledger::{PgStore, RetryPolicy};

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

    #[test]
    fn versions_are_numbered_one_by_one_up_to_the_latest() {
        for (i, (version, sql)) in VERSIONS.iter().enumerate() {
            assert_eq!(*version, i32::try_from(i).unwrap() + 1);
            assert!(sql.contains("CREATE TABLE") || sql.contains("ALTER TABLE"), "version {version} is empty");
        }
        assert_eq!(VERSIONS.last().map(|(v, _)| *v), Some(LATEST));
    }
}
