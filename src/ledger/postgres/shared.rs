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
