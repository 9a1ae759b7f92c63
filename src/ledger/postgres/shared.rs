//! What replicas share beyond leases: webhook deliveries already acted on, and an advisory lock
//! per key for read-modify-writes of upstream state ([`Exclusive`]).

use super::{PgError, Shared};
use crate::clock::UnixSeconds;
use crate::ledger::StoreError;
use crate::mint::{BoxFuture, Exclusive, ExclusiveGuard};
use std::sync::Arc;

impl Shared {
    pub(super) async fn delivery_seen(&self, hook: &str, id: &str) -> Result<bool, StoreError> {
        self.timed("reading a webhook delivery", async {
            let client = self.client().await?;
            let statement = client
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM ephemera_deliveries WHERE hook = $1 AND id = $2)")
                .await?;
            Ok(super::rows::get::<bool>(&client.query_one(&statement, &[&hook, &id]).await?, 0)?)
        })
        .await
    }

    pub(super) async fn record_delivery(&self, hook: &str, id: &str, now: UnixSeconds) -> Result<(), StoreError> {
        self.timed("recording a webhook delivery", async {
            let client = self.client().await?;
            let statement = client
                .prepare_cached(
                    "INSERT INTO ephemera_deliveries (hook, id, seen_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                )
                .await?;
            client.execute(&statement, &[&hook, &id, &now]).await?;
            Ok(())
        })
        .await
    }
}

/// Session-level advisory locks, one per key (hashed to PostgreSQL's 64-bit lock space). The
/// waiting is bounded by the server's `statement_timeout`: a lock held longer than that makes
/// the caller fail (and its work be retried), never go ahead unlocked.
pub struct AdvisoryLocks(pub(super) Arc<Shared>);

impl Exclusive for AdvisoryLocks {
    fn acquire<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<ExclusiveGuard, String>> {
        Box::pin(async move {
            let s = &self.0;
            let (client, lock) = s
                .timed("taking an advisory lock", async {
                    let client = s.client().await?;
                    let row = client
                        .query_one("SELECT pg_advisory_lock(hashtextextended($1, 0)), hashtextextended($1, 0)", &[&key])
                        .await?;
                    let lock: i64 = super::rows::get(&row, 1).map_err(PgError::from)?;
                    Ok((client, lock))
                })
                .await
                .map_err(|e| e.0)?;
            Ok(ExclusiveGuard::new(Box::new(Held { client: Some(client), lock })))
        })
    }
}

/// A held advisory lock: its connection, kept out of the pool until the lock is let go.
struct Held {
    client: Option<deadpool_postgres::Object>,
    lock: i64,
}

impl Drop for Held {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else { return };
        let lock = self.lock;
        // A connection whose unlock did not go through is closed, not pooled: the server lets go
        // of a session's locks when the session ends, and the next user must not inherit one.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if client.execute("SELECT pg_advisory_unlock($1)", &[&lock]).await.is_err() {
                        drop(deadpool_postgres::Object::take(client));
                    }
                });
            }
            Err(_) => drop(deadpool_postgres::Object::take(client)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{PgStore, testing};
    use crate::ledger::{LeaseStore, RetryPolicy};
    use std::time::Duration;

    /// `pg_try_advisory_lock` from a session of the test's own: can anyone else take `key` now?
    async fn free(client: &tokio_postgres::Client, key: &str) -> bool {
        let row = client.query_one("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", &[&key]).await.unwrap();
        let taken: bool = row.get(0);
        if taken {
            client.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", &[&key]).await.unwrap();
        }
        taken
    }

    #[tokio::test]
    async fn a_lock_is_held_by_one_replica_at_a_time_until_its_guard_drops() {
        let cfg = testing::fresh_database().await;
        let a = PgStore::open(&cfg, None, "a", RetryPolicy::default()).await.unwrap();
        let b = PgStore::open(&cfg, None, "b", RetryPolicy::default()).await.unwrap();
        let (client, connection) =
            crate::pg_connect::settings(&cfg, None).connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        let key = "aws-deny:aws:deploy";

        let held = a.exclusive().unwrap().acquire(key).await.unwrap();
        assert!(!free(&client, key).await, "held by replica a");
        assert!(free(&client, "aws-deny:aws:other-role").await, "one lock per key");
        // Replica b waits for it, and gets it once a lets go.
        let waiting = tokio::spawn(async move {
            let guard = b.exclusive().unwrap().acquire(key).await.unwrap();
            (b, guard)
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(held);
        let (_b, guard) = tokio::time::timeout(Duration::from_secs(10), waiting).await.unwrap().unwrap();
        assert!(!free(&client, key).await, "held by replica b now");
        drop(guard);
        // The unlock runs on the guard's connection, in a task of its own.
        for _ in 0..500 {
            if free(&client, key).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the lock was never let go after its guard dropped");
    }
}
