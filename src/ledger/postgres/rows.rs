//! Leases as rows, and back. A lease is two rows (schema version 3): what it is born with in
//! `ephemera_leases` (`l`), what changes in `ephemera_lease_state` (`s`), so that a revocation's
//! updates write a narrow row and leave the claims where they are. One column per field the
//! store queries by; the credentials and the claims snapshot as JSON (the shapes the journal's
//! first format used), parsed only when a whole lease is read.

use crate::claims::scalar_text;
use crate::ledger::lease::name;
use crate::ledger::{ClaimSnapshot, Lease, LeaseCredential, LeaseState, Renewal, RevokeWork, StoreError};
use std::sync::Arc;
use tokio_postgres::Row;

/// A whole lease: both of its rows.
pub const LEASE_TABLES: &str = "ephemera_leases l JOIN ephemera_lease_state s ON s.id = l.id";

/// The columns [`lease`] reads from [`LEASE_TABLES`], in its order.
pub const LEASE_COLUMNS: &str = "l.id, l.job, l.policy, l.issuer, l.created_at, l.expires_at, s.state, s.reason, \
                                 s.attempts, s.next_attempt_at, s.last_error, s.credentials::text, l.claims::text, \
                                 s.renewal::text";

/// `update`, a statement that updates lease state rows (no `RETURNING`), made to return what a
/// revocation and its audit event need ([`work`]): the state row's columns, the policy and the
/// issuer from the lease's other row (joined to what was updated, never a table walk).
pub fn returning_work(update: &str) -> String {
    format!(
        "WITH w AS ({update} RETURNING id, credentials::text AS credentials, job, reason, state) \
         SELECT w.id, w.credentials, w.job, w.reason, l.policy, l.issuer, w.state \
         FROM w LEFT JOIN ephemera_leases l ON l.id = w.id"
    )
}

pub fn lease(row: &Row) -> Result<Lease, StoreError> {
    let state: &str = get(row, 6)?;
    let attempts: i32 = get(row, 8)?;
    Ok(Lease {
        id: Arc::from(get::<&str>(row, 0)?),
        job: Arc::from(get::<&str>(row, 1)?),
        policy: name::intern(get(row, 2)?),
        issuer: name::intern(get(row, 3)?),
        created_at: get(row, 4)?,
        expires_at: get(row, 5)?,
        state: LeaseState::parse(state).ok_or_else(|| bad("state"))?,
        reason: get::<Option<&str>>(row, 7)?.map(name::intern),
        attempts: u32::try_from(attempts).unwrap_or(0),
        next_attempt_at: get(row, 9)?,
        last_error: get::<Option<&str>>(row, 10)?.map(Into::into),
        credentials: credentials(get(row, 11)?)?,
        claims: serde_json::from_str::<ClaimSnapshot>(get(row, 12)?).map_err(|_| bad("claims"))?,
        renewal: get::<Option<&str>>(row, 13)?
            .map(|json| serde_json::from_str::<Renewal>(json).map(Box::new).map_err(|_| bad("renewal")))
            .transpose()?,
    })
}

pub fn work(row: &Row) -> Result<RevokeWork, StoreError> {
    Ok(RevokeWork {
        lease_id: Arc::from(get::<&str>(row, 0)?),
        credentials: credentials(get(row, 1)?)?,
        job: Arc::from(get::<&str>(row, 2)?),
        reason: get::<Option<&str>>(row, 3)?.map(name::intern),
        policy: get::<Option<&str>>(row, 4)?.map(name::intern),
        issuer: get::<Option<&str>>(row, 5)?.map(name::intern),
    })
}

pub fn credentials(json: &str) -> Result<Box<[LeaseCredential]>, StoreError> {
    serde_json::from_str::<Vec<LeaseCredential>>(json).map(Vec::into_boxed_slice).map_err(|_| bad("credentials"))
}

pub fn get<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a Row, i: usize) -> Result<T, StoreError> {
    row.try_get(i).map_err(|e| StoreError(format!("ledger: reading a lease row: {e}")))
}

fn bad(column: &str) -> StoreError {
    StoreError(format!("ledger: a lease row's {column} does not parse"))
}

/// One lease, in whatever state another store left it (`ledger import`); its state row only
/// when its lease row is new. The rows written: 1 or 0.
pub const IMPORT_LEASE: &str = "
WITH lease AS (
    INSERT INTO ephemera_leases (id, job, policy, issuer, created_at, expires_at, claims, repository_id, project_id,
                                 actor_id, user_id)
    VALUES ($1, $2, $3, $4, $5, $6, $14::text::jsonb, $15, $16, $17, $18)
    ON CONFLICT (id) DO NOTHING
    RETURNING id, job, created_at, expires_at
)
INSERT INTO ephemera_lease_state (id, job, created_at, expires_at, state, reason, attempts, next_attempt_at, last_error,
                                  backends, credentials, renewal)
SELECT id, job, created_at, expires_at, $7::text, $8::text, $9::integer, $10::bigint, $11::text,
       string_to_array($12, ','), $13::text::jsonb, $19::text::jsonb
FROM lease";

/// The parameters of [`IMPORT_LEASE`] for one lease.
pub struct ImportRow {
    rows: NewRows,
    state: &'static str,
    reason: Option<String>,
    attempts: i32,
    next_attempt_at: i64,
    last_error: Option<String>,
}

pub fn import_params(lease: &Lease) -> Result<ImportRow, StoreError> {
    let mut rows = NewRows::default();
    rows.push(lease, None)?;
    Ok(ImportRow {
        rows,
        state: lease.state.as_str(),
        reason: lease.reason.as_deref().map(String::from),
        attempts: i32::try_from(lease.attempts).unwrap_or(i32::MAX),
        next_attempt_at: lease.next_attempt_at,
        last_error: lease.last_error.as_deref().map(String::from),
    })
}

impl ImportRow {
    pub fn as_params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 19] {
        let r = &self.rows;
        [
            &r.id[0],
            &r.job[0],
            &r.policy[0],
            &r.issuer[0],
            &r.created_at[0],
            &r.expires_at[0],
            &self.state,
            &self.reason,
            &self.attempts,
            &self.next_attempt_at,
            &self.last_error,
            &r.backends[0],
            &r.credentials[0],
            &r.claims[0],
            &r.repository_id[0],
            &r.project_id[0],
            &r.actor_id[0],
            &r.user_id[0],
            &r.renewal[0],
        ]
    }
}

/// A renewal's credentials join an active, renewable lease that has not reached its end; the
/// renewal is counted. The state row's lock makes it atomic with `begin_revoke`'s conditional
/// update, which returns the credentials from the same row.
pub const RENEW: &str = "
UPDATE ephemera_lease_state SET
    credentials = credentials || $2::text::jsonb,
    backends = ARRAY(SELECT DISTINCT b FROM unnest(backends || string_to_array($3, ',')) AS b ORDER BY b),
    renewal = renewal || jsonb_build_object('count', (renewal->>'count')::int + 1, 'last_at', $4::bigint)
WHERE id = $1 AND state = 'active' AND renewal IS NOT NULL AND expires_at > $4
  AND (renewal->>'count')::int < $5";

/// The distinct backends of `credentials`, sorted and comma-joined, as the `backends` parameter
/// of the statements above wants them (backend names never hold a comma: `names::is_name`).
pub fn backends_of(credentials: &[LeaseCredential]) -> String {
    let mut backends: Vec<&str> = credentials.iter().map(|c| &*c.backend).collect();
    backends.sort_unstable();
    backends.dedup();
    backends.join(",")
}

/// One new lease as the columns of the batch insert (see [`super::writer`]).
#[derive(Default)]
pub struct NewRows {
    pub replay_key: Vec<Option<String>>,
    pub replay_until: Vec<Option<i64>>,
    pub id: Vec<String>,
    pub job: Vec<String>,
    pub policy: Vec<String>,
    pub issuer: Vec<String>,
    pub created_at: Vec<i64>,
    pub expires_at: Vec<i64>,
    /// Comma-joined (backend names never hold a comma: `names::is_name`).
    pub backends: Vec<String>,
    pub credentials: Vec<String>,
    pub claims: Vec<String>,
    pub repository_id: Vec<Option<String>>,
    pub project_id: Vec<Option<String>>,
    pub actor_id: Vec<Option<String>>,
    pub user_id: Vec<Option<String>>,
    pub renewal: Vec<Option<String>>,
}

impl NewRows {
    pub fn push(&mut self, lease: &Lease, replay: Option<(&str, i64)>) -> Result<(), StoreError> {
        let encode = |what: &str, r: serde_json::Result<String>| {
            r.map_err(|e| StoreError(format!("ledger: encoding a lease's {what}: {e}")))
        };
        let credentials = encode("credentials", serde_json::to_string(&lease.credentials))?;
        let claims = encode("claims", serde_json::to_string(&lease.claims))?;
        let renewal = lease.renewal.as_ref().map(|r| encode("renewal", serde_json::to_string(r))).transpose()?;
        let claim = |name: &str| lease.claims.get(name).as_ref().and_then(scalar_text);
        self.replay_key.push(replay.map(|(k, _)| k.to_string()));
        self.replay_until.push(replay.map(|(_, u)| u));
        self.id.push(lease.id.to_string());
        self.job.push(lease.job.to_string());
        self.policy.push(lease.policy.to_string());
        self.issuer.push(lease.issuer.to_string());
        self.created_at.push(lease.created_at);
        self.expires_at.push(lease.expires_at);
        self.backends.push(backends_of(&lease.credentials));
        self.credentials.push(credentials);
        self.claims.push(claims);
        self.repository_id.push(claim("repository_id"));
        self.project_id.push(claim("project_id"));
        self.actor_id.push(claim("actor_id"));
        self.user_id.push(claim("user_id"));
        self.renewal.push(renewal);
        Ok(())
    }
}

/// The batch insert: replay keys first, then the leases whose key was free (or who had none),
/// in one statement, so one round trip and one commit carry every lease of the batch. A key
/// another transaction holds makes this one wait for it, then skip: of two replicas racing
/// with one token, exactly one lease is written. Each lease written is two rows (what it is born
/// with, what changes); the ids returned are those of the state rows.
pub const INSERT_BATCH: &str = "
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[],
                         $8::bigint[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[],
                         $15::text[], $16::text[])
        AS t(rkey, runtil, id, job, policy, issuer, created_at, expires_at, backends, credentials, claims,
             repository_id, project_id, actor_id, user_id, renewal)
), taken AS (
    INSERT INTO ephemera_replay_keys (key, until)
    SELECT rkey, runtil FROM input WHERE rkey IS NOT NULL
    ON CONFLICT (key) DO NOTHING
    RETURNING key
), leases AS (
    INSERT INTO ephemera_leases (id, job, policy, issuer, created_at, expires_at, claims, repository_id, project_id,
                                 actor_id, user_id)
    SELECT id, job, policy, issuer, created_at, expires_at, claims::jsonb, repository_id, project_id, actor_id, user_id
    FROM input
    WHERE rkey IS NULL OR rkey IN (SELECT key FROM taken)
    RETURNING id
)
INSERT INTO ephemera_lease_state (id, job, created_at, expires_at, state, backends, credentials, renewal)
SELECT i.id, i.job, i.created_at, i.expires_at, 'active', string_to_array(i.backends, ','), i.credentials::jsonb, i.renewal::jsonb
FROM input i JOIN leases USING (id)
RETURNING id";
