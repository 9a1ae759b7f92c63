//! The file store's in-process half: leases by id ([`LeaseMap`]), an index by job, and ordered
//! indexes of expiries, revocation retries and forget times, so ending a job's leases or reaping
//! never scans the rest. Synchronous, and never holds a map guard across an `.await` (there is
//! none here); [`super::FileStore`] orders these changes with its journal.
//!
//! Lock order: a `leases` entry first, then an index, never the reverse.

use super::lease::name;
use super::sharded::{JtiMap, LeaseMap, SHARDS, UsedJti};
use super::{
    ENDED_RETENTION_SECS, Event, Lease, LeaseCredential, LeaseFilter, LeaseState, LiveLease, RetryPolicy, RevokeWork,
    STALLED_ATTEMPT_SECS,
};
use crate::clock::UnixSeconds;
use crate::mint::RevokeHandle;
use dashmap::DashMap;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// Ids by the second something is due: a few thousand distinct seconds hold a million ids, so
/// an insert compares integers in a small, cache-resident tree and pushes onto a vector.
#[derive(Default)]
struct TimeIndex(Mutex<BTreeMap<UnixSeconds, Vec<Arc<str>>>>);

impl TimeIndex {
    fn insert(&self, at: UnixSeconds, id: Arc<str>) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).entry(at).or_default().push(id);
    }

    /// Removes every entry due at `now` and returns their ids, each once (a lease can have stale
    /// entries: the index is cleaned lazily, and callers re-check the lease itself).
    fn take_due(&self, now: UnixSeconds) -> Vec<Arc<str>> {
        let mut due: Vec<Arc<str>> = {
            let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            let later = map.split_off(&now.saturating_add(1));
            std::mem::replace(&mut *map, later).into_values().flatten().collect()
        };
        // Sorted and deduplicated outside the lock (a lease can be listed twice).
        due.sort_unstable();
        due.dedup();
        due
    }
}

pub(super) struct Memory {
    /// Behind an `Arc`: a map slot is then 24 bytes (a hash table keeps up to half its slots
    /// empty), and a compaction takes references to the leases a shard at a time and encodes
    /// them with no map lock held ([`Memory::leases_of_shard`]); a change to a lease the
    /// compaction still holds copies it first ([`Arc::make_mut`]).
    leases: LeaseMap,
    /// Sharded as the leases are ([`SHARDS`]: a shard grows by doubling under its write lock).
    by_job: DashMap<Arc<str>, Vec<Arc<str>>>,
    expiries: TimeIndex,
    retries: TimeIndex,
    forget_at: TimeIndex,
    /// Sharded as the leases are, and taken by a compaction a shard at a time as they are.
    jtis: JtiMap,
    jti_expiries: TimeIndex,
    counts: [AtomicUsize; 5],
    /// Active leases per backend (a lease with credentials from two backends counts in both).
    active_by_backend: DashMap<String, usize>,
}

impl Default for Memory {
    fn default() -> Memory {
        Memory {
            leases: LeaseMap::default(),
            by_job: DashMap::with_shard_amount(SHARDS),
            expiries: TimeIndex::default(),
            retries: TimeIndex::default(),
            forget_at: TimeIndex::default(),
            jtis: JtiMap::default(),
            jti_expiries: TimeIndex::default(),
            counts: Default::default(),
            active_by_backend: DashMap::default(),
        }
    }
}

impl Memory {
    /// Sized for `leases` (a replay of that many records), so the maps do not grow by doubling
    /// while it runs, and split into [`SHARDS`] shards.
    pub(super) fn with_capacity(leases: usize) -> Memory {
        Memory {
            leases: LeaseMap::with_capacity(leases),
            by_job: DashMap::with_capacity_and_shard_amount(leases, SHARDS),
            ..Memory::default()
        }
    }

    // ---- records -----------------------------------------------------------------------

    /// Applies a record (at start, for every replayed record, and after each durable write).
    /// Idempotent: applying a record twice leaves the same state.
    pub(super) fn apply(&self, event: Event) {
        match event {
            Event::Created { lease } => {
                // One lookup of the id, not two: a replay applies a million of these. A lease
                // already known (the same record twice) is kept as it is.
                self.leases.insert_new(lease, |lease| self.index(lease));
            }
            Event::RevokeRequested { id, reason, .. } => self.update(&id, |l| {
                if l.state == LeaseState::Active {
                    l.state = LeaseState::Revoking;
                    l.reason = Some(name::intern(&reason));
                }
            }),
            Event::Revoked { id, .. } => self.update(&id, |l| l.state = LeaseState::Revoked),
            Event::Expired { id, .. } => self.update(&id, |l| l.state = LeaseState::Expired),
            Event::RevokeFailed { id, attempts, next_at, error, .. } => self.update(&id, |l| {
                l.state = LeaseState::Revoking;
                (l.attempts, l.next_attempt_at, l.last_error) = (attempts, next_at, Some(error.into()));
            }),
            Event::Irrevocable { id, attempts, next_at, error, .. } => self.update(&id, |l| {
                l.state = LeaseState::Irrevocable;
                (l.attempts, l.next_attempt_at, l.last_error) = (attempts, next_at, Some(error.into()));
            }),
            Event::Renewed { id, at, count, credentials } => self.add_credentials(&id, credentials, count, at),
            Event::JtiUsed { key, exp } => {
                let key: Arc<str> = key.into();
                self.jtis.insert(UsedJti { key: key.clone(), exp });
                self.jti_expiries.insert(exp, key);
            }
        }
    }

    /// The record of an attempt's outcome on lease `id`: every backend confirmed (revoked, or
    /// expired if expiry started it), or not (retry later with backoff; irrevocable after too
    /// many). `None` for an unknown lease.
    pub(super) fn outcome(
        &self,
        id: &str,
        error: Option<String>,
        now: UnixSeconds,
        retry: &RetryPolicy,
    ) -> Option<Event> {
        let lease = self.leases.get(id)?;
        let id = id.to_string();
        Some(match error {
            None if lease.ends_with_expiry() => Event::Expired { id, at: now },
            None => Event::Revoked { id, at: now },
            Some(error) => {
                let attempts = lease.attempts.saturating_add(1);
                match retry.after_failure(attempts, now) {
                    (LeaseState::Irrevocable, next_at) => Event::Irrevocable { id, at: now, attempts, next_at, error },
                    (_, next_at) => Event::RevokeFailed { id, at: now, attempts, next_at, error },
                }
            }
        })
    }

    /// Everything a fresh journal needs: every remembered lease in its current state, and the
    /// `jti`s still guarded.
    pub(super) fn snapshot(&self) -> Vec<Event> {
        let mut events: Vec<Event> = Vec::with_capacity(self.leases.len() + self.jtis.len());
        self.leases.for_each(|l| events.push(Event::Created { lease: Arc::clone(l) }));
        self.jtis.for_each(|j| events.push(Event::JtiUsed { key: j.key.to_string(), exp: j.exp }));
        events
    }

    /// A reference to every remembered lease of shard `i` (of [`SHARDS`]), for a compaction to
    /// encode with no map lock held. The shard's read lock is held while its entries are counted
    /// out (a reference count each, nothing copied); a lease changed afterwards is copied by the
    /// change, not here.
    pub(super) fn leases_of_shard(&self, i: usize) -> Vec<Arc<Lease>> {
        self.leases.shard(i)
    }

    /// Every guarded `jti` of shard `i` (of [`SHARDS`]) and its expiry, for a compaction, as
    /// [`Memory::leases_of_shard`] takes the leases.
    pub(super) fn jtis_of_shard(&self, i: usize) -> Vec<UsedJti> {
        self.jtis.shard(i)
    }

    // ---- issuing -----------------------------------------------------------------------

    pub(super) fn jti_seen(&self, key: &str) -> bool {
        self.jtis.get(key).is_some()
    }

    /// Reserves a `jti` key; `false` if it is taken (a replay).
    pub(super) fn reserve_jti(&self, key: &str, exp: UnixSeconds) -> bool {
        let key: Arc<str> = key.into();
        self.jtis.insert_new(UsedJti { key, exp }, |used| self.jti_expiries.insert(exp, used.key.clone()))
    }

    /// Gives a reserved key back (its lease was not recorded).
    pub(super) fn release_jti(&self, key: &str) {
        self.jtis.remove_if(key, |_| true);
    }

    pub(super) fn insert(&self, lease: Arc<Lease>) {
        self.index(&lease);
        self.leases.insert(lease);
    }

    // ---- ending ------------------------------------------------------------------------

    /// Claims an active lease's revocation: `Revoking` with `reason`, and a safety net (if the
    /// attempt about to run never reports back, the lease is due for a retry). `None` if it is
    /// not active: only one caller gets the work.
    pub(super) fn begin(&self, id: &str, reason: &str, now: UnixSeconds) -> Option<RevokeWork> {
        let work = {
            let mut entry = self.leases.get_mut(id)?;
            if entry.state != LeaseState::Active {
                return None;
            }
            let lease = Arc::make_mut(&mut entry);
            lease.state = LeaseState::Revoking;
            lease.reason = Some(name::intern(reason));
            lease.next_attempt_at = now + STALLED_ATTEMPT_SECS;
            self.retries.insert(lease.next_attempt_at, lease.id.clone());
            self.count_backends(lease, false);
            RevokeWork::of(lease)
        };
        self.counts[LeaseState::Active.index()].fetch_sub(1, Ordering::Relaxed);
        self.counts[LeaseState::Revoking.index()].fetch_add(1, Ordering::Relaxed);
        Some(work)
    }

    /// Active leases whose expiry has come (each handed out once: taken from the index).
    pub(super) fn take_due_expiries(&self, now: UnixSeconds) -> Vec<Arc<str>> {
        let due = self.expiries.take_due(now);
        due.into_iter()
            .filter(|id| self.leases.get(id).is_some_and(|l| l.state == LeaseState::Active && l.expires_at <= now))
            .collect()
    }

    /// Pending revocations whose retry time has come, claimed: each is due again only
    /// [`STALLED_ATTEMPT_SECS`] later, unless its attempt reports back first.
    pub(super) fn claim_due_retries(&self, now: UnixSeconds) -> Vec<RevokeWork> {
        self.retries.take_due(now).into_iter().filter_map(|id| self.claim_retry(&id, now, now)).collect()
    }

    /// Every pending revocation, due or not, claimed.
    pub(super) fn claim_all_pending(&self, now: UnixSeconds) -> Vec<RevokeWork> {
        let ids = self.leases.filter_map(|l| l.state.is_pending().then(|| l.id.clone()));
        ids.iter().filter_map(|id| self.claim_retry(id, UnixSeconds::MAX, now)).collect()
    }

    fn claim_retry(&self, id: &str, due_by: UnixSeconds, now: UnixSeconds) -> Option<RevokeWork> {
        let mut entry = self.leases.get_mut(id)?;
        if !entry.state.is_pending() || entry.next_attempt_at > due_by {
            return None;
        }
        let lease = Arc::make_mut(&mut entry);
        lease.next_attempt_at = now + STALLED_ATTEMPT_SECS;
        self.retries.insert(lease.next_attempt_at, lease.id.clone());
        Some(RevokeWork::of(lease))
    }

    /// Forgets leases that ended more than [`ENDED_RETENTION_SECS`] ago, and used `jti`s whose
    /// tokens have expired. Never a pending lease.
    pub(super) fn forget_ended(&self, now: UnixSeconds) -> usize {
        let mut forgotten = 0;
        for id in self.forget_at.take_due(now) {
            let removed = self.leases.remove_if(&id, |l| matches!(l.state, LeaseState::Revoked | LeaseState::Expired));
            if let Some(lease) = removed {
                self.counts[lease.state.index()].fetch_sub(1, Ordering::Relaxed);
                if let Some(mut ids) = self.by_job.get_mut(&lease.job) {
                    ids.retain(|i| *i != id);
                }
                self.by_job.remove_if(&lease.job, |_, ids| ids.is_empty());
                forgotten += 1;
            }
        }
        for key in self.jti_expiries.take_due(now) {
            self.jtis.remove_if(&key, |used| used.exp <= now);
        }
        forgotten
    }

    // ---- reading -----------------------------------------------------------------------

    pub(super) fn get(&self, id: &str) -> Option<Lease> {
        self.leases.get(id).map(|l| Lease::clone(&l))
    }

    pub(super) fn state(&self, id: &str) -> Option<LeaseState> {
        self.leases.get(id).map(|l| l.state)
    }

    fn is_live(&self, id: &str, now: UnixSeconds) -> bool {
        self.leases.get(id).is_some_and(|l| l.is_live(now))
    }

    pub(super) fn live_of_job(&self, job: &str, now: UnixSeconds) -> Vec<Arc<str>> {
        let ids = self.by_job.get(job).map(|ids| ids.clone()).unwrap_or_default();
        ids.into_iter().filter(|id| self.is_live(id, now)).collect()
    }

    /// Leases matching `filter`, oldest first, at most `limit`. A job filter uses the job index;
    /// other filters scan (admin queries, not the hot path).
    pub(super) fn list(&self, filter: &LeaseFilter, limit: usize) -> Vec<Lease> {
        let mut out: Vec<Lease> = match &filter.job {
            Some(job) => {
                let ids = self.by_job.get(job.as_str()).map(|ids| ids.clone()).unwrap_or_default();
                ids.iter().filter_map(|id| self.get(id)).filter(|l| filter.matches(l)).collect()
            }
            None => self.leases.filter_map(|l| filter.matches(l).then(|| Lease::clone(l))),
        };
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out.truncate(limit);
        out
    }

    /// Live leases of `policies` (or all), without their credentials: each entry costs a few
    /// reference counts, not a copy of the lease.
    pub(super) fn live_leases(&self, policies: Option<&BTreeSet<String>>, now: UnixSeconds) -> Vec<LiveLease> {
        self.leases.filter_map(|l| {
            (l.is_live(now) && policies.is_none_or(|p| p.contains(&*l.policy))).then(|| LiveLease {
                id: l.id.clone(),
                job: l.job.clone(),
                policy: l.policy.clone(),
                issuer: l.issuer.clone(),
                claims: l.claims.clone(),
            })
        })
    }

    /// Handles of every credential minted by one of `backends`, in any lease: only those are
    /// copied out.
    pub(super) fn handles_of(&self, backends: &BTreeSet<String>) -> Vec<RevokeHandle> {
        self.handles_where(backends, |_| true)
    }

    /// [`Memory::handles_of`] for leases that have ended (any state but active).
    pub(super) fn ended_handles_of(&self, backends: &BTreeSet<String>) -> Vec<RevokeHandle> {
        self.handles_where(backends, |lease| lease.state != LeaseState::Active)
    }

    fn handles_where(&self, backends: &BTreeSet<String>, wanted: impl Fn(&Lease) -> bool) -> Vec<RevokeHandle> {
        let mut out = Vec::new();
        self.leases.for_each(|lease| {
            if wanted(lease) {
                let ours = lease.credentials.iter().filter(|c| backends.contains(&*c.backend));
                out.extend(ours.map(|c| c.handle()));
            }
        });
        out
    }

    pub(super) fn count(&self, state: LeaseState) -> usize {
        self.counts[state.index()].load(Ordering::Relaxed)
    }

    /// Active leases per backend, by backend name.
    pub(super) fn active_by_backend(&self) -> Vec<(String, usize)> {
        let mut rows: Vec<(String, usize)> =
            self.active_by_backend.iter().map(|e| (e.key().clone(), *e.value())).collect();
        rows.sort();
        rows
    }

    pub(super) fn len(&self) -> usize {
        self.leases.len()
    }

    /// A renewal of lease `id` at `now`, if it is renewable then: its credentials join the
    /// lease here, under the lease's entry lock, so a revocation that starts afterwards takes
    /// them too. Returns the record to journal; `None` (nothing changed) when the lease is
    /// unknown, not active, not renewable or past its end.
    pub(super) fn renew(&self, id: &str, credentials: &[LeaseCredential], now: UnixSeconds) -> Option<Event> {
        let mut entry = self.leases.get_mut(id)?;
        if !entry.is_renewable(now) {
            return None;
        }
        let lease = Arc::make_mut(&mut entry);
        let count = lease.renewal.as_ref().map_or(0, |r| r.count).saturating_add(1);
        self.append_credentials(lease, credentials, count, now);
        Some(Event::Renewed { id: id.to_string(), at: now, count, credentials: credentials.to_vec() })
    }

    /// Applies a recorded renewal, whatever the lease's state (module docs of `Event::Renewed`).
    /// Idempotent: a credential already listed is not added again.
    fn add_credentials(&self, id: &str, credentials: Vec<LeaseCredential>, count: u32, at: UnixSeconds) {
        let Some(mut entry) = self.leases.get_mut(id) else { return };
        self.append_credentials(Arc::make_mut(&mut entry), &credentials, count, at);
    }

    fn append_credentials(&self, lease: &mut Lease, credentials: &[LeaseCredential], count: u32, at: UnixSeconds) {
        let active = lease.state == LeaseState::Active;
        if active {
            self.count_backends(lease, false);
        }
        let mut all = std::mem::take(&mut lease.credentials).into_vec();
        for c in credentials {
            if !all.contains(c) {
                all.push(c.clone());
            }
        }
        lease.credentials = all.into_boxed_slice();
        if let Some(r) = lease.renewal.as_mut() {
            r.count = r.count.max(count);
            r.last_at = r.last_at.max(at);
        }
        if active {
            self.count_backends(lease, true);
        }
    }

    // ---- keeping the indexes in step ---------------------------------------------------

    /// Changes one lease, keeping the per-state counts and the time indexes in step.
    fn update(&self, id: &str, change: impl FnOnce(&mut Lease)) {
        let Some(mut entry) = self.leases.get_mut(id) else { return };
        let lease = Arc::make_mut(&mut entry);
        let before = lease.state;
        change(lease);
        let after = lease.state;
        if before != after {
            self.counts[before.index()].fetch_sub(1, Ordering::Relaxed);
            self.counts[after.index()].fetch_add(1, Ordering::Relaxed);
            if before == LeaseState::Active {
                self.count_backends(lease, false);
            }
        }
        if after.is_pending() {
            self.retries.insert(lease.next_attempt_at, lease.id.clone());
        }
        if matches!(after, LeaseState::Revoked | LeaseState::Expired) && before != after {
            self.forget_at.insert(lease.expires_at.max(lease.created_at) + ENDED_RETENTION_SECS, lease.id.clone());
        }
    }

    /// Adds (or removes) an active lease to the per-backend counts.
    fn count_backends(&self, lease: &Lease, add: bool) {
        for (i, c) in lease.credentials.iter().enumerate() {
            let backend = &*c.backend;
            if lease.credentials[..i].iter().any(|earlier| *earlier.backend == *backend) {
                continue; // counted once per lease
            }
            // `get_mut` first: the entry exists for every lease but the first of a backend, and
            // `entry` would allocate the key each time.
            match self.active_by_backend.get_mut(backend) {
                Some(mut n) => *n = if add { *n + 1 } else { n.saturating_sub(1) },
                None if add => {
                    *self.active_by_backend.entry(backend.to_string()).or_default() += 1;
                }
                None => {}
            }
        }
    }

    /// Counts a new lease and adds it to the job and time indexes. May run while its `leases`
    /// entry is held (lock order: `leases` first).
    fn index(&self, lease: &Lease) {
        self.counts[lease.state.index()].fetch_add(1, Ordering::Relaxed);
        match lease.state {
            LeaseState::Active => {
                self.count_backends(lease, true);
                self.expiries.insert(lease.expires_at, lease.id.clone());
            }
            LeaseState::Revoking | LeaseState::Irrevocable => {
                self.retries.insert(lease.next_attempt_at, lease.id.clone());
            }
            LeaseState::Revoked | LeaseState::Expired => {
                self.forget_at.insert(lease.expires_at + ENDED_RETENTION_SECS, lease.id.clone());
            }
        }
        self.by_job.entry(lease.job.clone()).or_default().push(lease.id.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(i: usize) -> Event {
        let lease = serde_json::json!({
            "id": format!("lse_{i}"), "job": format!("github:74:{i}:1:{i}"), "policy": "deploy", "issuer": "github",
            "created_at": 10, "expires_at": 600, "state": "active", "credentials": [
                {"name": "api", "kind": "jwt", "revocation": "immediate", "handle": {"backend": "jwt", "data": {"jti": "j"}}},
            ],
            "claims": {"repository": "octo-org/octo-repo"},
        });
        serde_json::from_value(serde_json::json!({"t": "created", "lease": lease})).unwrap()
    }

    #[test]
    fn a_lease_changed_while_a_compaction_holds_it_is_copied_and_the_compaction_sees_it_as_taken() {
        let memory = Memory::default();
        let Event::Created { lease: taken } = lease(1) else { unreachable!() };
        let id = taken.id.to_string();
        memory.apply(Event::Created { lease: taken });
        let held: Vec<Arc<Lease>> = (0..SHARDS).flat_map(|i| memory.leases_of_shard(i)).collect();
        // The revocation's write to the lease's shard does not wait for the compaction, which
        // holds no map lock, only a reference: the change lands on a copy.
        memory.apply(Event::RevokeRequested { id: id.clone(), reason: "job".into(), at: 20 });
        memory.apply(Event::Revoked { id: id.clone(), at: 21 });
        assert_eq!(held[0].state, LeaseState::Active, "the compaction writes the lease as it took it");
        assert_eq!(memory.state(&id), Some(LeaseState::Revoked), "memory has the change");
        assert_eq!(memory.count(LeaseState::Revoked), 1);
        assert_eq!(Arc::strong_count(&held[0]), 1, "the copy is memory's own; the compaction's is let go alone");
    }

    #[test]
    fn a_compaction_taking_the_jti_shards_in_turn_gets_every_guarded_key_once_and_no_expired_or_released_one() {
        let memory = Memory::default();
        // Keys 0..3000: even ones valid until 500, odd ones until 100.
        for i in 0..3000 {
            assert!(memory.reserve_jti(&format!("iss|jti-{i}"), if i % 2 == 0 { 500 } else { 100 }));
        }
        assert!(!memory.reserve_jti("iss|jti-4", 900), "a replay of a guarded key was admitted");
        memory.release_jti("iss|jti-6");
        memory.forget_ended(100);
        memory.apply(Event::JtiUsed { key: "iss|replayed".into(), exp: 700 });
        let mut taken: Vec<(String, UnixSeconds)> =
            (0..=SHARDS).flat_map(|i| memory.jtis_of_shard(i)).map(|j| (j.key.to_string(), j.exp)).collect();
        taken.sort();
        let mut expected: Vec<(String, UnixSeconds)> =
            (0..3000).filter(|i| i % 2 == 0 && *i != 6).map(|i| (format!("iss|jti-{i}"), 500)).collect();
        expected.push(("iss|replayed".into(), 700));
        expected.sort();
        assert_eq!(taken, expected);
        assert!(memory.jti_seen("iss|jti-0") && !memory.jti_seen("iss|jti-1") && !memory.jti_seen("iss|jti-6"));
        assert!(memory.reserve_jti("iss|jti-6", 900), "a released key is free again");
        assert!(memory.reserve_jti("iss|jti-1", 900), "an expired key is free again");
    }
}
