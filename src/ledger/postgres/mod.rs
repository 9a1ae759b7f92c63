//! The shared store: every replica's leases in one PostgreSQL database, so that any replica can
//! issue, read, revoke and reap any lease, and none is the leader.
//!
//! Each guarantee of [`LeaseStore`] is one statement the database makes atomic across replicas:
//!
//! - **issue**: a batch insert that takes the replay keys first and writes only the leases
//!   whose key was free ([`writer`], [`rows::INSERT_BATCH`]); the reply waits for its commit.
//! - **end**: `UPDATE … WHERE state = 'active'` hands a revocation to one caller; due expiries and
//!   retries are claimed with `FOR UPDATE SKIP LOCKED`, their next attempt pushed out by the
//!   claim timeout (`ledger.claim_timeout`), so work held by a replica that died is taken over
//!   by another when that time has passed.
//! - **read**: read-through, every time: a revoke on one replica is seen by the next read on any
//!   other, with no cache to go stale.
//!
//! The store is unreachable when a statement cannot reach the database (refused, reset, timed
//! out): [`Health::Unreachable`] until a statement or the once-a-second probe gets through again.
//! Nothing is kept in memory meanwhile: an issue fails (no credential without a durable lease) and
//! the reaper finds the due work in the database when it is back.

mod reaper;
mod rows;
mod schema;
mod shared;
#[cfg(test)]
pub mod testing;
mod writer;

pub use schema::LATEST as SCHEMA_VERSION;

use super::store::{Counts, Due, Health, IssueError, LeaseStore, LiveLease, Maintained, StoreError};
use super::{
    ClaimSnapshot, ENDED_RETENTION_SECS, Event, Lease, LeaseCredential, LeaseFilter, LeaseState, RetryPolicy,
    RevokeWork, name,
};
use crate::clock::UnixSeconds;
use crate::config::PostgresConfig;
use crate::identity::ReplayKey;
use crate::mint::{BoxFuture, Exclusive, RevokeHandle};
use crate::secret::SecretString;
use deadpool_postgres::{Pool, PoolError};
use reaper::PRUNE_BATCH;
use rows::{LEASE_COLUMNS, LEASE_TABLES};
use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio_postgres::types::ToSql;

/// A revocation every backend confirmed, recorded (`WHERE …` follows): the lease is revoked, or
/// expired if its expiry ended it; one someone else already ended keeps its state.
const FINISHED: &str = "UPDATE ephemera_lease_state SET claimed_by = NULL, state = CASE \
                            WHEN state IN ('revoked', 'expired') THEN state \
                            WHEN reason = 'expired' THEN 'expired' ELSE 'revoked' END";

/// Webhook deliveries are remembered this long (GitHub redelivers for up to 3 days on request;
/// automatic redeliveries come within hours).
pub const DELIVERY_RETENTION_SECS: i64 = 3 * 24 * 3600;

/// Pruning statements per table and reaper pass: 100,000 rows a pass at most.
const PRUNE_BATCHES: usize = 20;
/// The ledger's tables that are read by key on every request, analyzed by the broker itself
/// once they reach [`YOUNG_TABLE_BYTES`] if nothing analyzed them yet ([`analyze_young_tables`]).
const KEYED_TABLES: [&str; 3] = ["ephemera_leases", "ephemera_lease_state", "ephemera_replay_keys"];
/// A few hundred leases: enough for the planner to tell a key lookup from an index walk.
const YOUNG_TABLE_BYTES: i64 = 64 * 1024;

pub struct PgStore {
    shared: Arc<Shared>,
    queue: writer::Queue,
    probe: tokio::task::JoinHandle<()>,
    /// The last count of the leases and when it was taken ([`COUNTS_MAX_AGE`]); the lock is
    /// held while counting, so callers arriving meanwhile take that count instead of another.
    counted: tokio::sync::Mutex<Option<(std::time::Instant, Counts)>>,
    counts_max_age: Duration,
}

/// How old a count of the leases by state and backend may be before [`LeaseStore::counts`]
/// counts again. A count reads the whole state table (~0.3 s of the server's CPU at ~550k
/// leases, growing with them): a Prometheus scraping every replica and an operator's console
/// polling the health view would each have run it every few seconds. Now one replica counts at
/// most once per this interval, however many ask; the gauges are at most this old.
pub const COUNTS_MAX_AGE: Duration = Duration::from_secs(15);

/// What the store's tasks share: the pool, who this replica is, and its health.
pub struct Shared {
    pool: Pool,
    replica: String,
    retry: RetryPolicy,
    health: AtomicU8,
    /// `ledger.claim_timeout`: a claimed revocation is due again this long after its claim.
    claim_timeout: i64,
    /// Longer than the server's `statement_timeout`, so the server gives up first; this one
    /// covers a server that stopped answering altogether.
    timeout: Duration,
}

/// Why a statement failed, before it is told as a [`StoreError`].
pub enum PgError {
    Pool(PoolError),
    Db(tokio_postgres::Error),
    Timeout,
    Data(StoreError),
}

impl From<PoolError> for PgError {
    fn from(e: PoolError) -> Self {
        PgError::Pool(e)
    }
}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> Self {
        PgError::Db(e)
    }
}

impl From<StoreError> for PgError {
    fn from(e: StoreError) -> Self {
        PgError::Data(e)
    }
}

const OPEN: u8 = 0;
const UNREACHABLE: u8 = 1;

impl Shared {
    async fn client(&self) -> Result<deadpool_postgres::Object, PgError> {
        Ok(self.pool.get().await?)
    }

    /// Runs `work` with the client-side timeout, and tells its failure as a [`StoreError`]
    /// (marking the store unreachable when the database could not be reached).
    async fn timed<T>(&self, what: &str, work: impl Future<Output = Result<T, PgError>>) -> Result<T, StoreError> {
        let outcome = match tokio::time::timeout(self.timeout, work).await {
            Ok(outcome) => outcome,
            Err(_) => Err(PgError::Timeout),
        };
        match outcome {
            Ok(value) => {
                self.health.store(OPEN, Ordering::Release);
                Ok(value)
            }
            Err(PgError::Data(e)) => Err(e),
            Err(e) => {
                let (unreachable, text) = describe(&e);
                if unreachable {
                    self.health.store(UNREACHABLE, Ordering::Release);
                }
                Err(StoreError(format!("ledger: {what}: {text}")))
            }
        }
    }
}

/// Whether the failure means the database is out of reach, and what to say about it. Never the
/// statement's parameters (claims, credentials' handles): only PostgreSQL's code and message,
/// or the connection's error.
fn describe(e: &PgError) -> (bool, String) {
    match e {
        PgError::Db(e) => db_failure(e),
        PgError::Pool(PoolError::Backend(e)) => db_failure(e),
        PgError::Pool(PoolError::Timeout(_)) => (true, "no database connection within the statement timeout".into()),
        PgError::Pool(e) => (true, format!("database connection: {e}")),
        PgError::Timeout => (true, "the database did not answer within the statement timeout".into()),
        PgError::Data(e) => (false, e.0.clone()),
    }
}

fn db_failure(e: &tokio_postgres::Error) -> (bool, String) {
    match e.as_db_error() {
        // Class 08 (connection exception) and 57 (operator intervention: shutdown, restart,
        // statement cancelled by the timeout) say the server is going away or overloaded.
        Some(db) => {
            let code = db.code().code();
            (code.starts_with("08") || code.starts_with("57"), format!("postgres {code}: {}", db.message()))
        }
        // The driver's own text is one line ("error performing TLS handshake"); the cause
        // (rustls: "invalid peer certificate: UnknownIssuer", an I/O error) is in its sources.
        // Neither ever holds the password: it is sent only inside the SCRAM exchange.
        None => {
            // A value that would not convert to or from its column is this broker's fault (or a
            // row's), found before or after the round trip: the database was reached, and
            // readiness must not flap for it. Everything else here is the connection's.
            let own = e.to_string();
            let reached = own.starts_with("error serializing") || own.starts_with("error deserializing");
            let mut text = if reached { own } else { format!("database unreachable: {own}") };
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            (!reached, text)
        }
    }
}

pub(super) fn db_error(e: &tokio_postgres::Error) -> String {
    db_failure(e).1
}

pub(super) fn pool_error(e: &PoolError) -> String {
    match e {
        PoolError::Backend(e) => db_error(e),
        e => e.to_string(),
    }
}

impl PgStore {
    /// Connects, brings the schema to this binary's version (or refuses a newer one), and
    /// starts the writers and the health probe. Fails when the database cannot be reached: a
    /// broker that cannot record leases must not start serving.
    pub async fn open(
        cfg: &PostgresConfig,
        password: Option<&SecretString>,
        replica: &str,
        retry: RetryPolicy,
    ) -> Result<PgStore, String> {
        let where_ = cfg.display();
        let pool = crate::pg_connect::pool(cfg, password, "ledger")?;
        let found = schema::migrate(&pool, replica).await.map_err(|e| format!("ledger {where_}: {e}"))?;
        let shared = Arc::new(Shared {
            pool,
            replica: replica.to_string(),
            retry,
            claim_timeout: cfg.claim_timeout_secs,
            health: AtomicU8::new(OPEN),
            timeout: Duration::from_millis(cfg.statement_timeout_ms) + Duration::from_secs(1),
        });
        let queue = writer::start(shared.clone());
        let probe = tokio::spawn(probe(Arc::downgrade(&shared)));
        tracing::info!(store = %where_, schema = schema::LATEST, was = found, replica, "ledger on postgres");
        Ok(PgStore { shared, queue, probe, counted: tokio::sync::Mutex::new(None), counts_max_age: COUNTS_MAX_AGE })
    }

    /// Counts anew when the last count is older than `max_age` (tests that check every
    /// change take `Duration::ZERO`).
    pub fn with_counts_max_age(mut self, max_age: Duration) -> PgStore {
        self.counts_max_age = max_age;
        self
    }

    async fn issue_now(&self, lease: Lease, replay: Option<&ReplayKey>) -> Result<(), IssueError> {
        let (reply, answer) = oneshot::channel();
        let pending = writer::Pending { lease, replay: replay.map(|k| (k.key().to_string(), k.until())), reply };
        let gone = || IssueError::Store(StoreError("ledger: the lease writer has stopped".into()));
        self.queue.send(pending).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    async fn renew_now(&self, id: &str, credentials: &[LeaseCredential], now: UnixSeconds) -> Result<bool, StoreError> {
        let json = serde_json::to_string(credentials)
            .map_err(|e| StoreError(format!("ledger: encoding a renewal's credentials: {e}")))?;
        let backends = rows::backends_of(credentials);
        let s = &self.shared;
        s.timed("recording a renewal", async {
            let client = s.client().await?;
            let statement = client.prepare_cached(rows::RENEW).await?;
            let max = i32::try_from(super::MAX_RENEWALS).unwrap_or(i32::MAX);
            Ok(client.execute(&statement, &[&id, &json, &backends, &now, &max]).await? == 1)
        })
        .await
    }

    async fn begin_now(&self, id: &str, reason: &str, now: UnixSeconds) -> Result<Option<RevokeWork>, StoreError> {
        let s = &self.shared;
        s.timed("starting a revocation", async {
            let client = s.client().await?;
            let statement = client
                .prepare_cached(&rows::returning_work(
                    "UPDATE ephemera_lease_state SET state = 'revoking', reason = $2, next_attempt_at = $3, claimed_by = $4 \
                     WHERE id = $1 AND state = 'active'",
                ))
                .await?;
            let stalled = now + s.claim_timeout;
            let row = client.query_opt(&statement, &[&id, &reason, &stalled, &s.replica]).await?;
            Ok(row.as_ref().map(rows::work).transpose()?)
        })
        .await
    }

    async fn finish_now(
        &self,
        id: &str,
        error: Option<String>,
        now: UnixSeconds,
    ) -> Result<Option<LeaseState>, StoreError> {
        let s = &self.shared;
        s.timed("recording a revocation's outcome", async {
            let client = s.client().await?;
            let Some(error) = error else {
                let statement = client.prepare_cached(&format!("{FINISHED} WHERE id = $1 RETURNING state")).await?;
                let row = client.query_opt(&statement, &[&id]).await?;
                return Ok(row.as_ref().map(state_of).transpose()?);
            };
            // A failure: the next attempt's time depends on how many failed before. Read, then
            // write only if no one else counted an attempt meanwhile (optimistic, no lock held
            // across the round trips); a lost race reads again.
            let read = client.prepare_cached("SELECT state, attempts FROM ephemera_lease_state WHERE id = $1").await?;
            let write = client
                .prepare_cached(
                    "UPDATE ephemera_lease_state SET state = $2, attempts = $3, next_attempt_at = $4, last_error = $5, \
                         claimed_by = NULL \
                     WHERE id = $1 AND attempts = $6 AND state NOT IN ('revoked', 'expired')",
                )
                .await?;
            loop {
                let Some(row) = client.query_opt(&read, &[&id]).await? else { return Ok(None) };
                let state = state_of(&row)?;
                if matches!(state, LeaseState::Revoked | LeaseState::Expired) {
                    // Another replica's attempt succeeded: a late failure does not bring it back.
                    return Ok(Some(state));
                }
                let before: i32 = rows::get(&row, 1)?;
                let attempts = u32::try_from(before).unwrap_or(0).saturating_add(1);
                let (next, next_at) = s.retry.after_failure(attempts, now);
                let attempts_col = i32::try_from(attempts).unwrap_or(i32::MAX);
                let changed =
                    client.execute(&write, &[&id, &next.as_str(), &attempts_col, &next_at, &error, &before]).await?;
                if changed == 1 {
                    return Ok(Some(next));
                }
            }
        })
        .await
    }

    async fn finish_revoked_now(&self, ids: &[Arc<str>]) -> Result<Vec<Option<LeaseState>>, StoreError> {
        let wanted: Vec<&str> = ids.iter().map(|id| &**id).collect();
        let s = &self.shared;
        s.timed("recording revocations' outcomes", async {
            let client = s.client().await?;
            // Through the primary key the rows are locked in key order (a btree scan sorts its
            // array), so two replicas finishing overlapping batches (a stalled claim taken over)
            // wait for each other rather than deadlock; were PostgreSQL ever to find a deadlock,
            // the statement fails, the leases stay pending and their retry records them.
            let statement =
                client.prepare_cached(&format!("{FINISHED} WHERE id = ANY($1) RETURNING id, state")).await?;
            let found = client.query(&statement, &[&wanted]).await?;
            let mut states = std::collections::HashMap::with_capacity(found.len());
            for row in &found {
                states.insert(rows::get::<&str>(row, 0)?, state_at(row, 1)?);
            }
            Ok(ids.iter().map(|id| states.get(&**id).copied()).collect())
        })
        .await
    }

    /// Claims revocation work with `FOR UPDATE SKIP LOCKED`: rows another replica is claiming
    /// at this moment are skipped, not waited for, and each row is handed to one claimer.
    async fn claim(&self, what: &str, sql: &str, now: UnixSeconds) -> Result<Vec<RevokeWork>, StoreError> {
        let claimed = self.claim_rows(what, sql, now, None).await?;
        Ok(claimed.into_iter().map(|(work, _)| work).collect())
    }

    /// [`PgStore::claim`]'s rows with the state each was left in; `quiet` is the expiry
    /// claim's `$4`.
    async fn claim_rows(
        &self,
        what: &str,
        sql: &str,
        now: UnixSeconds,
        quiet: Option<&BTreeSet<String>>,
    ) -> Result<Vec<(RevokeWork, LeaseState)>, StoreError> {
        let s = &self.shared;
        s.timed(what, async {
            let client = s.client().await?;
            let statement = client.prepare_cached(sql).await?;
            let stalled = now + s.claim_timeout;
            let found = match quiet {
                Some(quiet) => {
                    let quiet: Vec<&str> = quiet.iter().map(String::as_str).collect();
                    client.query(&statement, &[&now, &stalled, &s.replica, &quiet]).await?
                }
                None => client.query(&statement, &[&now, &stalled, &s.replica]).await?,
            };
            Ok(found
                .iter()
                .map(|row| Ok((rows::work(row)?, state_at(row, 6)?)))
                .collect::<Result<Vec<_>, StoreError>>()?)
        })
        .await
    }

    async fn claim_due_now(&self, now: UnixSeconds, quiet: &BTreeSet<String>) -> Result<Due, StoreError> {
        let claimed = self.claim_rows("claiming due expiries", &reaper::claim_expired(), now, Some(quiet)).await?;
        let (ended, expired): (Vec<_>, Vec<_>) =
            claimed.into_iter().partition(|(_, state)| *state == LeaseState::Expired);
        let retries = self.claim("claiming due retries", &reaper::claim_retries(), now).await?;
        Ok(Due {
            expired: expired.into_iter().map(|(work, _)| work).collect(),
            ended: ended.into_iter().map(|(work, _)| work).collect(),
            retries,
        })
    }

    async fn claim_all_pending_now(&self, now: UnixSeconds) -> Result<Vec<RevokeWork>, StoreError> {
        self.claim("claiming pending revocations", &reaper::claim_all_pending(), now).await
    }

    async fn get_now(&self, id: &str) -> Result<Option<Lease>, StoreError> {
        let s = &self.shared;
        s.timed("reading a lease", async {
            let client = s.client().await?;
            let statement =
                client.prepare_cached(&format!("SELECT {LEASE_COLUMNS} FROM {LEASE_TABLES} WHERE l.id = $1")).await?;
            let row = client.query_opt(&statement, &[&id]).await?;
            Ok(row.as_ref().map(rows::lease).transpose()?)
        })
        .await
    }

    async fn list_now(&self, filter: &LeaseFilter, limit: usize) -> Result<Vec<Lease>, StoreError> {
        // Only placeholders carry the filter's values; the SQL text is built from constants.
        let mut values: Vec<String> = Vec::new();
        let mut sql = format!("SELECT {LEASE_COLUMNS} FROM {LEASE_TABLES} WHERE true");
        let mut add = |column: &str, value: Option<&str>| {
            if let Some(value) = value {
                values.push(value.to_string());
                let n = values.len();
                if column == "actor" {
                    sql.push_str(&format!(" AND (l.actor_id = ${n} OR l.user_id = ${n})"));
                } else {
                    sql.push_str(&format!(" AND {column} = ${n}"));
                }
            }
        };
        add("l.job", filter.job.as_deref());
        add("l.policy", filter.policy.as_deref());
        add("s.state", filter.state.map(LeaseState::as_str));
        add("l.repository_id", filter.repository_id.as_deref());
        add("l.project_id", filter.project_id.as_deref());
        add("actor", filter.actor_id.as_deref());
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        sql.push_str(&format!(" ORDER BY l.id LIMIT {limit}"));
        let s = &self.shared;
        s.timed("listing leases", async {
            let client = s.client().await?;
            let params: Vec<&(dyn ToSql + Sync)> = values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
            let found = client.query(&sql, &params).await?;
            Ok(found.iter().map(rows::lease).collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn live_of_job_now(&self, job: &str, now: UnixSeconds) -> Result<Vec<Arc<str>>, StoreError> {
        let s = &self.shared;
        s.timed("reading a job's leases", async {
            let client = s.client().await?;
            let statement = client
                .prepare_cached(
                    "SELECT id FROM ephemera_lease_state WHERE job = $1 AND state = 'active' AND expires_at > $2 \
                     ORDER BY id",
                )
                .await?;
            let found = client.query(&statement, &[&job, &now]).await?;
            Ok(found.iter().map(|r| rows::get::<&str>(r, 0).map(Arc::from)).collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn live_leases_now(
        &self,
        policies: Option<&BTreeSet<String>>,
        now: UnixSeconds,
    ) -> Result<Vec<LiveLease>, StoreError> {
        let policies: Option<Vec<&str>> = policies.map(|p| p.iter().map(String::as_str).collect());
        let s = &self.shared;
        s.timed("reading live leases", async {
            let client = s.client().await?;
            let statement = client
                .prepare_cached(&format!(
                    "SELECT l.id, l.job, l.policy, l.issuer, l.claims::text FROM {LEASE_TABLES} \
                     WHERE s.state = 'active' AND s.expires_at > $1 AND ($2::text[] IS NULL OR l.policy = ANY($2)) \
                     ORDER BY l.id"
                ))
                .await?;
            let found = client.query(&statement, &[&now, &policies]).await?;
            let live = found.iter().map(|r| {
                Ok(LiveLease {
                    id: Arc::from(rows::get::<&str>(r, 0)?),
                    job: Arc::from(rows::get::<&str>(r, 1)?),
                    policy: name::intern(rows::get(r, 2)?),
                    issuer: name::intern(rows::get(r, 3)?),
                    claims: serde_json::from_str::<ClaimSnapshot>(rows::get(r, 4)?)
                        .map_err(|_| StoreError("ledger: a lease row's claims do not parse".into()))?,
                })
            });
            Ok(live.collect::<Result<Vec<_>, StoreError>>()?)
        })
        .await
    }

    async fn handles_of_now(&self, backends: &BTreeSet<String>) -> Result<Vec<RevokeHandle>, StoreError> {
        self.handles_where(
            backends,
            "SELECT credentials::text FROM ephemera_lease_state WHERE backends && $1::text[] ORDER BY id",
        )
        .await
    }

    /// Ended leases only: the state index finds them (`ephemera_lease_state_state`).
    async fn ended_handles_of_now(&self, backends: &BTreeSet<String>) -> Result<Vec<RevokeHandle>, StoreError> {
        let sql = "SELECT credentials::text FROM ephemera_lease_state \
                   WHERE state IN ('revoking', 'revoked', 'expired', 'irrevocable') AND backends && $1::text[] ORDER BY id";
        self.handles_where(backends, sql).await
    }

    /// The handles of `backends`' credentials in the rows `sql` selects (`$1`: the backends).
    async fn handles_where(&self, backends: &BTreeSet<String>, sql: &str) -> Result<Vec<RevokeHandle>, StoreError> {
        let wanted: Vec<&str> = backends.iter().map(String::as_str).collect();
        let s = &self.shared;
        s.timed("reading revoke handles", async {
            let client = s.client().await?;
            let statement = client.prepare_cached(sql).await?;
            let found = client.query(&statement, &[&wanted]).await?;
            let mut handles = Vec::new();
            for row in &found {
                for c in rows::credentials(rows::get(row, 0)?)?.iter() {
                    if backends.contains(&*c.backend) {
                        handles.push(c.handle());
                    }
                }
            }
            Ok(handles)
        })
        .await
    }

    /// The last count while it is young and the database reachable (an unreachable store
    /// reports nothing rather than a figure it cannot check), otherwise a new one.
    async fn counts_recent(&self) -> Result<Counts, StoreError> {
        let mut counted = self.counted.lock().await;
        let reachable = self.shared.health.load(Ordering::Acquire) == OPEN;
        if let Some((at, counts)) = &*counted
            && reachable
            && at.elapsed() < self.counts_max_age
        {
            return Ok(counts.clone());
        }
        let counts = self.counts_now().await?;
        *counted = Some((std::time::Instant::now(), counts.clone()));
        Ok(counts)
    }

    async fn counts_now(&self) -> Result<Counts, StoreError> {
        let s = &self.shared;
        s.timed("counting leases", async {
            let client = s.client().await?;
            let by_state =
                client.prepare_cached("SELECT state, count(*) FROM ephemera_lease_state GROUP BY state").await?;
            let by_backend = client
                .prepare_cached(
                    "SELECT b, count(*) FROM ephemera_lease_state, unnest(backends) AS b WHERE state = 'active' \
                     GROUP BY b ORDER BY b",
                )
                .await?;
            let mut counts = Counts::default();
            for row in client.query(&by_state, &[]).await? {
                let state = state_of(&row)?;
                counts.by_state[state.index()] = usize::try_from(rows::get::<i64>(&row, 1)?).unwrap_or(0);
            }
            for row in client.query(&by_backend, &[]).await? {
                let n = usize::try_from(rows::get::<i64>(&row, 1)?).unwrap_or(0);
                counts.active_by_backend.push((rows::get::<String>(&row, 0)?, n));
            }
            Ok(counts)
        })
        .await
    }

    /// Forgets ended leases, spent replay keys and old webhook deliveries, in batches of
    /// [`PRUNE_BATCH`] rows, each its own statement, at most [`PRUNE_BATCHES`] per table and
    /// pass.
    ///
    /// One `DELETE` of everything due was one transaction as large as the backlog: after an
    /// outage, or at a million exchanges an hour (a replay key each), it held its row locks and
    /// wrote its WAL in one piece while exchanges and other replicas' passes waited on the same
    /// table. A batch is found through an index on its cut-off (`ephemera_lease_state_ended`,
    /// `ephemera_replay_keys_until`, `ephemera_deliveries_seen`), so its cost is the rows it
    /// deletes, not the rows the table keeps ([`reaper`]'s test holds each statement to it).
    /// What a pass leaves is taken by the next one (`reap_interval`).
    async fn maintain_now(&self, now: UnixSeconds) -> Result<Maintained, StoreError> {
        let s = &self.shared;
        s.timed("forgetting ended leases", async {
            let client = s.client().await?;
            let leases = client.prepare_cached(&reaper::prune_leases()).await?;
            let keys = client.prepare_cached(&reaper::prune_replay_keys()).await?;
            let deliveries = client.prepare_cached(&reaper::prune_deliveries()).await?;
            analyze_young_tables(&client).await?;
            let forgotten = prune(&client, &leases, now - ENDED_RETENTION_SECS).await?;
            prune(&client, &keys, now).await?;
            prune(&client, &deliveries, now - DELIVERY_RETENTION_SECS).await?;
            Ok(Maintained { forgotten: usize::try_from(forgotten).unwrap_or(usize::MAX), compacted: 0 })
        })
        .await
    }

    async fn export_now(&self) -> Result<Vec<Event>, StoreError> {
        let s = &self.shared;
        s.timed("exporting the ledger", async {
            let client = s.client().await?;
            let leases =
                client.query(&format!("SELECT {LEASE_COLUMNS} FROM {LEASE_TABLES} ORDER BY l.id"), &[]).await?;
            let keys = client.query("SELECT key, until FROM ephemera_replay_keys ORDER BY key", &[]).await?;
            let mut out = Vec::with_capacity(leases.len() + keys.len());
            for row in &leases {
                out.push(Event::Created { lease: std::sync::Arc::new(rows::lease(row)?) });
            }
            for row in &keys {
                out.push(Event::JtiUsed { key: rows::get(row, 0)?, exp: rows::get(row, 1)? });
            }
            Ok(out)
        })
        .await
    }

    /// One transaction: all of it or none. A lease or key already here is kept (a re-run).
    async fn import_now(&self, records: &[Event]) -> Result<usize, StoreError> {
        super::file_store::check_importable(records)?;
        let s = &self.shared;
        let mut client = s.client().await.map_err(|e| StoreError(format!("ledger import: {}", describe(&e).1)))?;
        // No client-side timeout around the whole: a large import takes longer than one
        // statement may; each statement still has the server's.
        let work = async {
            let tx = client.transaction().await?;
            let lease = tx.prepare(rows::IMPORT_LEASE).await?;
            let key = tx
                .prepare("INSERT INTO ephemera_replay_keys (key, until) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .await?;
            let mut new = 0;
            for record in records {
                match record {
                    Event::Created { lease: l } => {
                        new += tx.execute(&lease, &rows::import_params(l)?.as_params()).await?
                    }
                    Event::JtiUsed { key: k, exp } => {
                        tx.execute(&key, &[k, exp]).await?;
                    }
                    _ => {}
                }
            }
            tx.commit().await?;
            Ok::<_, PgError>(usize::try_from(new).unwrap_or(usize::MAX))
        };
        work.await.map_err(|e| StoreError(format!("ledger import: {}", describe(&e).1)))
    }

    async fn replay_seen_now(&self, key: &ReplayKey) -> Result<bool, StoreError> {
        let s = &self.shared;
        s.timed("checking a replay key", async {
            let client = s.client().await?;
            let statement =
                client.prepare_cached("SELECT EXISTS (SELECT 1 FROM ephemera_replay_keys WHERE key = $1)").await?;
            Ok(rows::get::<bool>(&client.query_one(&statement, &[&key.key()]).await?, 0)?)
        })
        .await
    }
}

/// Analyzes each of [`KEYED_TABLES`] that was never analyzed (`reltuples < 0`) and has reached
/// [`YOUNG_TABLE_BYTES`]. Each pooled connection caches its statements' plans, and a generic plan
/// made while a table was nearly empty is kept until the table's first `ANALYZE`: on an empty
/// `ephemera_lease_state` PostgreSQL 15 planned `begin_revoke` as a walk of the whole expiry
/// index and a job's end as a walk of every active lease. From a fresh database at 1,500
/// requests/s, the soak fell 18 s behind in the minute before autovacuum's first analyze (it
/// naps a minute between rounds). An `ANALYZE` invalidates the table's cached plans; after the
/// first, autovacuum keeps the statistics fresh. A pass finds nothing to do from then on.
async fn analyze_young_tables(client: &deadpool_postgres::Object) -> Result<(), PgError> {
    let young = client
        .prepare_cached(
            "SELECT relname::text FROM pg_class WHERE oid = ANY($1::text[]::regclass[]) AND reltuples < 0 \
             AND pg_relation_size(oid) >= $2",
        )
        .await?;
    let tables: Vec<&str> = KEYED_TABLES.to_vec();
    for row in client.query(&young, &[&tables, &YOUNG_TABLE_BYTES]).await? {
        let name: &str = rows::get(&row, 0)?;
        // Only a name of the constant list is ever put into the statement's text.
        if let Some(table) = KEYED_TABLES.iter().find(|t| **t == name) {
            client.batch_execute(&format!("ANALYZE {table}")).await?;
            tracing::info!(table, "ledger: analyzed a young table, so its statements are planned for its size");
        }
    }
    Ok(())
}

/// Runs a pruning `statement` (its one parameter: `before`) until a batch deletes fewer than
/// [`PRUNE_BATCH`] rows, at most [`PRUNE_BATCHES`] times. Rows deleted.
async fn prune(
    client: &tokio_postgres::Client,
    statement: &tokio_postgres::Statement,
    before: i64,
) -> Result<u64, PgError> {
    let mut deleted = 0;
    for _ in 0..PRUNE_BATCHES {
        let batch = client.execute(statement, &[&before]).await?;
        deleted += batch;
        if batch < PRUNE_BATCH {
            break;
        }
    }
    Ok(deleted)
}

/// The state in a row's first column.
fn state_of(row: &tokio_postgres::Row) -> Result<LeaseState, StoreError> {
    state_at(row, 0)
}

fn state_at(row: &tokio_postgres::Row, column: usize) -> Result<LeaseState, StoreError> {
    let text: &str = rows::get(row, column)?;
    LeaseState::parse(text).ok_or_else(|| StoreError(format!("ledger: unknown lease state {text:?} in the database")))
}

/// Once a second: can the database be reached? Readiness follows the answer, so a load balancer
/// stops sending exchanges to a replica that cannot record them, and sends them again when it can.
async fn probe(shared: Weak<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(s) = shared.upgrade() else { return };
        let was = s.health.load(Ordering::Acquire);
        let result = s
            .timed("health probe", async {
                let client = s.client().await?;
                client.simple_query("SELECT 1").await?;
                Ok(())
            })
            .await;
        match (&result, was) {
            (Err(e), OPEN) => {
                tracing::error!(error = %e, "ledger store unreachable: exchanges fail closed until it is back")
            }
            (Ok(()), UNREACHABLE) => tracing::info!("ledger store reachable again"),
            _ => {}
        }
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.probe.abort();
    }
}

impl LeaseStore for PgStore {
    fn replay_seen<'a>(&'a self, key: &'a ReplayKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(self.replay_seen_now(key))
    }

    fn issue<'a>(&'a self, lease: Lease, replay: Option<&'a ReplayKey>) -> BoxFuture<'a, Result<(), IssueError>> {
        Box::pin(self.issue_now(lease, replay))
    }

    fn renew<'a>(
        &'a self,
        id: &'a str,
        credentials: &'a [LeaseCredential],
        now: UnixSeconds,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(self.renew_now(id, credentials, now))
    }

    fn begin_revoke<'a>(
        &'a self,
        id: &'a str,
        reason: &'a str,
        now: UnixSeconds,
    ) -> BoxFuture<'a, Result<Option<RevokeWork>, StoreError>> {
        Box::pin(self.begin_now(id, reason, now))
    }

    fn finish_revoke<'a>(
        &'a self,
        id: &'a str,
        error: Option<String>,
        now: UnixSeconds,
    ) -> BoxFuture<'a, Result<Option<LeaseState>, StoreError>> {
        Box::pin(self.finish_now(id, error, now))
    }

    fn finish_revoked<'a>(
        &'a self,
        ids: &'a [Arc<str>],
        _now: UnixSeconds,
    ) -> BoxFuture<'a, Result<Vec<Option<LeaseState>>, StoreError>> {
        Box::pin(self.finish_revoked_now(ids))
    }

    fn claim_due<'a>(
        &'a self,
        now: UnixSeconds,
        quiet: &'a BTreeSet<String>,
    ) -> BoxFuture<'a, Result<Due, StoreError>> {
        Box::pin(self.claim_due_now(now, quiet))
    }

    fn claim_all_pending(&self, now: UnixSeconds) -> BoxFuture<'_, Result<Vec<RevokeWork>, StoreError>> {
        Box::pin(self.claim_all_pending_now(now))
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Lease>, StoreError>> {
        Box::pin(self.get_now(id))
    }

    fn list<'a>(&'a self, filter: &'a LeaseFilter, limit: usize) -> BoxFuture<'a, Result<Vec<Lease>, StoreError>> {
        Box::pin(self.list_now(filter, limit))
    }

    fn live_of_job<'a>(&'a self, job: &'a str, now: UnixSeconds) -> BoxFuture<'a, Result<Vec<Arc<str>>, StoreError>> {
        Box::pin(self.live_of_job_now(job, now))
    }

    fn live_leases<'a>(
        &'a self,
        policies: Option<&'a BTreeSet<String>>,
        now: UnixSeconds,
    ) -> BoxFuture<'a, Result<Vec<LiveLease>, StoreError>> {
        Box::pin(self.live_leases_now(policies, now))
    }

    fn handles_of<'a>(
        &'a self,
        backends: &'a BTreeSet<String>,
    ) -> BoxFuture<'a, Result<Vec<RevokeHandle>, StoreError>> {
        Box::pin(self.handles_of_now(backends))
    }

    fn ended_handles_of<'a>(
        &'a self,
        backends: &'a BTreeSet<String>,
    ) -> BoxFuture<'a, Result<Vec<RevokeHandle>, StoreError>> {
        Box::pin(self.ended_handles_of_now(backends))
    }

    fn counts(&self) -> BoxFuture<'_, Result<Counts, StoreError>> {
        Box::pin(self.counts_recent())
    }

    fn export(&self) -> BoxFuture<'_, Result<Vec<Event>, StoreError>> {
        Box::pin(self.export_now())
    }

    fn import<'a>(&'a self, records: &'a [Event]) -> BoxFuture<'a, Result<usize, StoreError>> {
        Box::pin(self.import_now(records))
    }

    fn maintain(&self, now: UnixSeconds) -> BoxFuture<'_, Result<Maintained, StoreError>> {
        Box::pin(self.maintain_now(now))
    }

    fn delivery_seen<'a>(&'a self, hook: &'a str, id: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(self.shared.delivery_seen(hook, id))
    }

    fn record_delivery<'a>(
        &'a self,
        hook: &'a str,
        id: &'a str,
        now: UnixSeconds,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.shared.record_delivery(hook, id, now))
    }

    fn exclusive(&self) -> Option<Arc<dyn Exclusive>> {
        Some(Arc::new(shared::AdvisoryLocks(self.shared.clone())))
    }

    fn health(&self) -> Health {
        // The writer task gone (it cannot end while the store lives, short of a bug): no lease
        // can be issued, so the replica must not say it is ready.
        if self.queue.is_closed() {
            return Health::Broken;
        }
        match self.shared.health.load(Ordering::Acquire) {
            OPEN => Health::Open,
            _ => Health::Unreachable,
        }
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        // Every write was committed before its caller heard back: nothing is buffered here.
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_value_that_does_not_convert_fails_its_statement_but_leaves_the_store_reachable() {
        let cfg = testing::fresh_database().await;
        let store = PgStore::open(&cfg, None, "t", RetryPolicy::default()).await.unwrap();
        let s = &store.shared;
        let failed = s
            .timed("a statement with a bad parameter", async {
                let client = s.client().await?;
                // Text for an integer parameter: the driver refuses to send it.
                client.query("SELECT $1::int", &[&"seven"]).await?;
                Ok(())
            })
            .await
            .unwrap_err();
        assert!(failed.0.contains("error serializing") && !failed.0.contains("unreachable"), "{failed}");
        assert_eq!(store.health(), Health::Open, "readiness does not flap for a bug of ours");
    }

    #[tokio::test]
    async fn a_count_of_the_leases_is_taken_once_per_interval_however_many_ask() {
        let cfg = testing::fresh_database().await;
        let store = PgStore::open(&cfg, None, "t", RetryPolicy::default()).await.unwrap();
        let issue = |id: &'static str| {
            let store = &store;
            async move { store.issue(crate::ledger::suite::lease(id, id, 100), None).await.unwrap() }
        };
        issue("lse_a").await;
        let first = store.counts().await.unwrap();
        assert_eq!(first.of(LeaseState::Active), 1);
        issue("lse_b").await;
        // Within the interval: the same count, the new lease not yet in it, for every caller.
        let again = futures_util::future::join_all((0..4).map(|_| store.counts())).await;
        assert!(again.iter().all(|c| c.as_ref().unwrap() == &first), "{again:?}");
        // Past it (an interval of zero): counted anew.
        let store = store.with_counts_max_age(Duration::ZERO);
        assert_eq!(store.counts().await.unwrap().of(LeaseState::Active), 2);
    }

    #[tokio::test]
    async fn a_young_table_is_analyzed_once_it_holds_a_few_hundred_leases_and_not_before() {
        let cfg = testing::fresh_database().await;
        let store = PgStore::open(&cfg, None, "t", RetryPolicy::default()).await.unwrap();
        let client = store.shared.pool.get().await.unwrap();
        let analyzed = |table: &'static str| {
            let client = &client;
            async move {
                let sql = "SELECT reltuples >= 0 FROM pg_class WHERE oid = $1::text::regclass";
                client.query_one(sql, &[&table]).await.unwrap().get::<_, bool>(0)
            }
        };
        let issue = |from: usize, to: usize| {
            let store = &store;
            futures_util::future::join_all((from..to).map(move |i| async move {
                let lease = crate::ledger::suite::lease(&format!("lse_{i:05}"), &format!("job-{i}"), 100);
                store.issue(lease, None).await.unwrap();
            }))
        };
        issue(0, 10).await;
        store.maintain(1).await.unwrap();
        assert!(!analyzed("ephemera_lease_state").await, "ten leases: left to autovacuum");
        issue(10, 2000).await;
        store.maintain(2).await.unwrap();
        for table in ["ephemera_leases", "ephemera_lease_state"] {
            assert!(analyzed(table).await, "{table} analyzed at 2,000 leases");
        }
    }
}
