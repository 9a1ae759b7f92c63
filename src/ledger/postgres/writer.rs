//! Group commit for new leases: exchanges hand their lease to a queue, and the writer task
//! ([`WRITERS`]) takes whatever has queued up (up to [`MAX_BATCH`]) and records it with one statement
//! ([`super::rows::INSERT_BATCH`]), so one round trip and one commit carry every lease that
//! arrived meanwhile. An exchange gets its answer only after that commit (persist before reply).
//!
//! Within one batch a replay key may appear twice (one token, two concurrent exchanges on this
//! replica): only the first goes to the database, the second shares its fate — refused as a
//! replay when the first was recorded or refused, failed when the batch failed.

use super::rows::{self, INSERT_BATCH, NewRows};
use super::{PgError, Shared};
use crate::ledger::{IssueError, Lease, StoreError};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_postgres::types::ToSql;

/// Leases per statement at most: large enough that a burst commits in a few round trips, small
/// enough that one statement stays well under the statement timeout.
pub const MAX_BATCH: usize = 256;

/// Writer tasks: batches in flight at once. One: its next batch is everything that queued while
/// its last one committed, so a busy broker commits a few large batches instead of many small
/// ones. Four writers split a queue of 32 exchanges in flight into batches of 1.5–3.5 leases;
/// one writer measured +10–20 % exchanges/s and about 40 µs less database CPU per exchange
/// (`scripts/bench --only postgres`, rows 6a–6d, docs/benchmarks.md), for a p99 at half load
/// about 1–2 ms higher. A batch that waits on another replica's uncommitted replay key waits at
/// most that transaction's commit (milliseconds), bounded by the statement timeout.
pub const WRITERS: usize = 1;

/// Queued leases at most before `issue` waits (back-pressure, not unbounded memory).
const QUEUE: usize = 8192;

pub struct Pending {
    pub lease: Lease,
    pub replay: Option<(String, i64)>,
    pub reply: oneshot::Sender<Result<(), IssueError>>,
}

pub type Queue = mpsc::Sender<Pending>;

/// Starts the writers; they end when every [`Queue`] sender is dropped.
pub fn start(shared: Arc<Shared>) -> Queue {
    let (tx, rx) = mpsc::channel(QUEUE);
    let rx = Arc::new(Mutex::new(rx));
    for _ in 0..WRITERS {
        let (rx, shared) = (rx.clone(), shared.clone());
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(MAX_BATCH);
            loop {
                {
                    let mut rx = rx.lock().await;
                    if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
                        return; // every sender is gone: the store was dropped
                    }
                }
                write(&shared, &mut batch).await;
            }
        });
    }
    tx
}

async fn write(shared: &Shared, batch: &mut Vec<Pending>) {
    // The first lease of each replay key goes to the database; later ones wait for its fate.
    let mut first_of_key: HashMap<&str, usize> = HashMap::new();
    let mut follows: Vec<Option<usize>> = Vec::with_capacity(batch.len());
    for (i, p) in batch.iter().enumerate() {
        let earlier = p.replay.as_ref().and_then(|(k, _)| first_of_key.get(k.as_str()).copied());
        if earlier.is_none()
            && let Some((k, _)) = &p.replay
        {
            first_of_key.insert(k, i);
        }
        follows.push(earlier);
    }
    let mut rows = NewRows::default();
    let mut encoded: Vec<Result<(), StoreError>> = Vec::with_capacity(batch.len());
    for (p, follows) in batch.iter().zip(&follows) {
        encoded.push(match follows {
            Some(_) => Ok(()),
            None => rows.push(&p.lease, p.replay.as_ref().map(|(k, u)| (k.as_str(), *u))),
        });
    }
    let result: Result<HashSet<String>, StoreError> =
        if rows.id.is_empty() { Ok(HashSet::new()) } else { insert(shared, &rows).await };
    let outcomes: Vec<Result<(), IssueError>> = batch
        .iter()
        .zip(&encoded)
        .map(|(p, encoded)| match (&result, encoded) {
            (_, Err(e)) => Err(IssueError::Store(e.clone())),
            (Err(e), _) => Err(IssueError::Store(e.clone())),
            (Ok(written), Ok(())) if written.contains(&*p.lease.id) => Ok(()),
            (Ok(_), Ok(())) => Err(IssueError::Replayed),
        })
        .collect();
    for ((p, follows), mut outcome) in batch.drain(..).zip(follows).zip(outcomes.clone()) {
        if let Some(first) = follows {
            // A second use of a key within the batch is a replay whenever the first one was
            // decided; when the batch failed, it failed too.
            outcome = match &outcomes[first] {
                Err(IssueError::Store(e)) => Err(IssueError::Store(e.clone())),
                _ => Err(IssueError::Replayed),
            };
        }
        // The exchange may have given up waiting (its client went away): nothing to tell it.
        let _ = p.reply.send(outcome);
    }
}

/// Runs the batch insert; the ids of the leases it wrote.
async fn insert(shared: &Shared, rows: &NewRows) -> Result<HashSet<String>, StoreError> {
    shared
        .timed("recording new leases", async {
            let client = shared.client().await?;
            let statement = client.prepare_cached(INSERT_BATCH).await?;
            let params: [&(dyn ToSql + Sync); 16] = [
                &rows.replay_key,
                &rows.replay_until,
                &rows.id,
                &rows.job,
                &rows.policy,
                &rows.issuer,
                &rows.created_at,
                &rows.expires_at,
                &rows.backends,
                &rows.credentials,
                &rows.claims,
                &rows.repository_id,
                &rows.project_id,
                &rows.actor_id,
                &rows.user_id,
                &rows.renewal,
            ];
            let written = client.query(&statement, &params).await?;
            written.iter().map(|r| rows::get::<String>(r, 0)).collect::<Result<_, _>>().map_err(PgError::from)
        })
        .await
}
