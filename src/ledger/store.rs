//! The lease-store seam: what `app` and the reaper need from wherever leases live.
//!
//! Every method is one step a store does atomically — on a shared SQL database, one statement or
//! one transaction — so that the guarantees below hold across replicas, not just inside one
//! process:
//!
//! - **issue**: a lease and the [`ReplayKey`] of the token it was issued for are recorded
//!   together, durably, before the lease is visible; a key recorded before refuses the lease.
//! - **end**: [`LeaseStore::begin_revoke`] hands a lease's revocation to exactly one caller
//!   (a conditional state change, `active` → `revoking`); [`LeaseStore::claim_due`] hands each
//!   due expiry and each due retry out once, and pushes the claimed lease's next attempt out
//!   by [`STALLED_ATTEMPT_SECS`], so an attempt that never reports back is tried again.
//!   [`LeaseStore::finish_revoke`] records the outcome; until it is durable the lease stays
//!   pending (and so is retried), never reported revoked.
//! - **read**: what a lease looks like now.
//! - **lifecycle**: forgetting ended leases and spent replay keys, compaction, health, flush.
//!
//! A method that returns `Err` changed nothing the caller can rely on.
//!
//! [`STALLED_ATTEMPT_SECS`]: super::STALLED_ATTEMPT_SECS

use super::{ClaimSnapshot, Event, Lease, LeaseCredential, LeaseFilter, LeaseState, RevokeWork};
use crate::clock::UnixSeconds;
use crate::identity::ReplayKey;
use crate::mint::{BoxFuture, Exclusive, RevokeHandle};
use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

/// The store could not do what was asked (a disk or database failure). Never holds a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError(pub String);

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a lease was not issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IssueError {
    /// Its replay key was recorded before: the token was already used under this policy.
    Replayed,
    Store(StoreError),
}

/// The work due at one reaper pass, each item handed to this caller alone.
#[derive(Debug, Default)]
pub struct Due {
    /// Active leases whose expiry has come, now `revoking` with reason `expired`.
    pub expired: Vec<RevokeWork>,
    /// Active leases whose expiry has come and whose every credential ends with them (of a
    /// backend in the claim's `quiet` set): already `expired`, ended by the claim itself, with
    /// nothing left to revoke. Handed out for their audit events and metrics.
    pub ended: Vec<RevokeWork>,
    /// Pending revocations whose retry time has come.
    pub retries: Vec<RevokeWork>,
}

/// No backend's credentials end with their lease: every expiry goes through a revocation.
pub static NO_QUIET_BACKENDS: BTreeSet<String> = BTreeSet::new();

/// Lease counts, for `/metrics`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts {
    /// By state, in [`LeaseState::ALL`] order.
    pub by_state: [usize; 5],
    /// Active leases per backend name, sorted (a lease with credentials of two backends counts
    /// in both).
    pub active_by_backend: Vec<(String, usize)>,
}

impl Counts {
    pub fn of(&self, state: LeaseState) -> usize {
        self.by_state[state.index()]
    }

    pub fn total(&self) -> usize {
        self.by_state.iter().sum()
    }
}

/// Whether the store can take writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Open,
    /// A write failed in a way the store cannot undo; every issue fails until it is restarted.
    Broken,
    /// The shared database does not answer; every issue fails until it does again.
    Unreachable,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Open => "open",
            Health::Broken => "journal-broken",
            Health::Unreachable => "store-unreachable",
        }
    }
}

/// A live lease as a policy reload re-decides it: who, under which policy, on which claims.
/// No credentials: a reload never needs them.
#[derive(Debug, Clone)]
pub struct LiveLease {
    pub id: Arc<str>,
    pub job: Arc<str>,
    pub policy: Arc<str>,
    pub issuer: Arc<str>,
    pub claims: ClaimSnapshot,
}

/// What one maintenance pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Maintained {
    /// Ended leases forgotten.
    pub forgotten: usize,
    /// Records written by a compaction (0: none ran).
    pub compacted: usize,
}

pub use crate::metrics::CompactionStats;

/// Where leases live. See the module docs for the guarantee of each group.
pub trait LeaseStore: Send + Sync {
    // ---- issue ---------------------------------------------------------------------------

    /// Was this key recorded already? The cheap check before minting; [`LeaseStore::issue`]
    /// is the one that decides.
    fn replay_seen<'a>(&'a self, key: &'a ReplayKey) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Records `lease` (new, active) and `replay` in one step, durably, then makes the lease
    /// visible. Nothing is recorded on `Err`.
    fn issue<'a>(&'a self, lease: Lease, replay: Option<&'a ReplayKey>) -> BoxFuture<'a, Result<(), IssueError>>;

    /// Adds the credentials a renewal minted to a lease that is renewable at `now` (active,
    /// with a `Renewal`, not past its end), durably, before they may leave the broker; counts
    /// the renewal. `false` when it is not: nothing recorded, and the caller revokes what it
    /// minted. Atomic with [`LeaseStore::begin_revoke`]: a revocation that starts after a
    /// renewal takes its credentials too, and one that started before refuses the renewal.
    fn renew<'a>(
        &'a self,
        id: &'a str,
        credentials: &'a [LeaseCredential],
        now: UnixSeconds,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    // ---- end -----------------------------------------------------------------------------

    /// Starts ending an active lease: `revoking` with `reason`, the work handed to this caller
    /// alone. `None` if it is not active (unknown, or someone else ended it).
    fn begin_revoke<'a>(
        &'a self,
        id: &'a str,
        reason: &'a str,
        now: UnixSeconds,
    ) -> BoxFuture<'a, Result<Option<RevokeWork>, StoreError>>;

    /// Records the outcome of an attempt: `error` `None` when every backend confirmed. Returns
    /// the lease's state afterwards, `None` for a lease the store does not know (nothing is
    /// recorded for it).
    fn finish_revoke<'a>(
        &'a self,
        id: &'a str,
        error: Option<String>,
        now: UnixSeconds,
    ) -> BoxFuture<'a, Result<Option<LeaseState>, StoreError>>;

    /// [`LeaseStore::finish_revoke`] of attempts every backend confirmed, several at once: the
    /// state of each afterwards, in `ids`' order (`None` for one the store does not know). The
    /// reaper's way: on a shared store one statement and one commit for them all, where one
    /// each made a statement per expiry. Here, all at once, so a journal's group commit takes
    /// them together. Each runs to its end (none is dropped halfway when another fails); the
    /// first error, if any, is the answer.
    fn finish_revoked<'a>(
        &'a self,
        ids: &'a [Arc<str>],
        now: UnixSeconds,
    ) -> BoxFuture<'a, Result<Vec<Option<LeaseState>>, StoreError>> {
        Box::pin(async move {
            let all = futures_util::future::join_all(ids.iter().map(|id| self.finish_revoke(id, None, now))).await;
            all.into_iter().collect()
        })
    }

    /// The expiries and retries due at `now`, claimed for this caller. An expired lease whose
    /// every credential is of a backend in `quiet` (one whose credentials die with the lease
    /// at its expiry, with nothing to call upstream: `Backend::quiet_at_expiry`) is ended in the
    /// same step, `expired`, and handed out in [`Due::ended`]: one write to the store where a
    /// claim and then a finish made two.
    fn claim_due<'a>(&'a self, now: UnixSeconds, quiet: &'a BTreeSet<String>)
    -> BoxFuture<'a, Result<Due, StoreError>>;

    /// Every pending revocation, due or not, claimed for this caller (start-up resumes them all).
    fn claim_all_pending(&self, now: UnixSeconds) -> BoxFuture<'_, Result<Vec<RevokeWork>, StoreError>>;

    // ---- read ----------------------------------------------------------------------------

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Lease>, StoreError>>;

    /// Leases matching `filter`, oldest first (by id), at most `limit`.
    fn list<'a>(&'a self, filter: &'a LeaseFilter, limit: usize) -> BoxFuture<'a, Result<Vec<Lease>, StoreError>>;

    /// Ids of the job's live leases.
    fn live_of_job<'a>(&'a self, job: &'a str, now: UnixSeconds) -> BoxFuture<'a, Result<Vec<Arc<str>>, StoreError>>;

    /// The live leases of the named policies (`None`: of every policy), without credentials.
    fn live_leases<'a>(
        &'a self,
        policies: Option<&'a BTreeSet<String>>,
        now: UnixSeconds,
    ) -> BoxFuture<'a, Result<Vec<LiveLease>, StoreError>>;

    /// The revoke handles of every remembered credential (any state) minted by one of
    /// `backends`: start-up hands them back to their backends (`Backend::adopt`).
    fn handles_of<'a>(&'a self, backends: &'a BTreeSet<String>)
    -> BoxFuture<'a, Result<Vec<RevokeHandle>, StoreError>>;

    /// The revoke handles of every remembered credential minted by one of `backends` whose lease
    /// has ended (any state but active): a backend that keeps what revoking did in memory learns
    /// them (`Backend::learn_ended`) at start-up and, from the other replicas, at every reaper pass.
    fn ended_handles_of<'a>(
        &'a self,
        backends: &'a BTreeSet<String>,
    ) -> BoxFuture<'a, Result<Vec<RevokeHandle>, StoreError>>;

    /// Lease counts (a store may answer from a figure it keeps up to date, or, where counting
    /// reads every lease, from a recent count: PostgreSQL's is up to `COUNTS_MAX_AGE` old). A
    /// backend with no active lease may be missing from `active_by_backend`.
    fn counts(&self) -> BoxFuture<'_, Result<Counts, StoreError>>;

    // ---- shared with other replicas ---------------------------------------------------------

    /// Was this webhook delivery acted on already, by any replica sharing this store? A store
    /// that no other process shares answers `false`: the hook's own memory covers one process.
    fn delivery_seen<'a>(&'a self, _hook: &'a str, _id: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async { Ok(false) })
    }

    /// Remembers a delivery that was acted on, so a redelivery to any replica is a duplicate.
    fn record_delivery<'a>(
        &'a self,
        _hook: &'a str,
        _id: &'a str,
        _now: UnixSeconds,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }

    /// The lock replicas sharing this store take around shared upstream state (`None`: no
    /// other process shares it).
    fn exclusive(&self) -> Option<Arc<dyn Exclusive>> {
        None
    }

    // ---- moving between stores ------------------------------------------------------------

    /// Everything this store remembers, as records a store imports: each lease in its current
    /// state ([`Event::Created`]) and each replay key still guarded ([`Event::JtiUsed`]).
    fn export(&self) -> BoxFuture<'_, Result<Vec<Event>, StoreError>>;

    /// Takes what another store exported (only [`Event::Created`] and [`Event::JtiUsed`]),
    /// durably; a lease or key already here is kept as it is, so an import can be run again.
    /// Returns how many leases were new.
    fn import<'a>(&'a self, records: &'a [Event]) -> BoxFuture<'a, Result<usize, StoreError>>;

    // ---- lifecycle -----------------------------------------------------------------------

    /// Forgets leases ended more than [`super::ENDED_RETENTION_SECS`] ago and replay keys whose
    /// tokens have expired; compacts when the store has grown.
    fn maintain(&self, now: UnixSeconds) -> BoxFuture<'_, Result<Maintained, StoreError>>;

    fn health(&self) -> Health;

    /// Journal compactions so far (`None`: a store without a journal to compact).
    fn compactions(&self) -> Option<CompactionStats> {
        None
    }

    /// Waits until everything recorded so far is durable (shutdown).
    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>>;
}
