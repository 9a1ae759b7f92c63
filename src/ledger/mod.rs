//! ledger: every lease ephemera ever issued, until its credentials are certainly dead.
//!
//! In memory: leases by id ([`DashMap`]), an index by job, and ordered indexes of expiries,
//! revocation retries and forget times, so ending a job's leases or reaping never scans the rest.
//! On disk: the [`journal`], where every state change is recorded; a restart replays it.
//! Methods never hold a map guard across an `.await`.

mod codec;
pub mod journal;
pub mod snapshot;
pub mod strings;

use crate::clock::UnixSeconds;
use crate::mint::{Revocation, RevokeHandle};
use dashmap::DashMap;
use journal::{Journal, JournalError};
use serde::{Deserialize, Serialize};
pub use snapshot::ClaimSnapshot;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LeaseState {
    Active,
    /// Ending: a backend has not confirmed every credential dead yet. Retried with backoff.
    Revoking,
    Revoked,
    Expired,
    /// Revocation failed [`RetryPolicy::max_attempts`] times. Still retried, slowly, forever;
    /// counted in metrics and listed by the admin API. Never dropped.
    Irrevocable,
}

impl LeaseState {
    const ALL: [LeaseState; 5] =
        [LeaseState::Active, LeaseState::Revoking, LeaseState::Revoked, LeaseState::Expired, LeaseState::Irrevocable];

    fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LeaseState::Active => "active",
            LeaseState::Revoking => "revoking",
            LeaseState::Revoked => "revoked",
            LeaseState::Expired => "expired",
            LeaseState::Irrevocable => "irrevocable",
        }
    }

    pub fn parse(text: &str) -> Option<LeaseState> {
        LeaseState::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Still holding credentials that need ending.
    pub fn is_pending(self) -> bool {
        matches!(self, LeaseState::Revoking | LeaseState::Irrevocable)
    }
}

/// One credential of a lease: what revoking it needs. Names are interned ([`name`]); the revoke
/// handle's data is kept as compact JSON text (a `serde_json` map costs ~600 bytes even with
/// one entry) and parsed back only when the credential is revoked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "CredentialJson", into = "CredentialJson")]
pub struct LeaseCredential {
    pub name: Arc<str>,
    pub kind: Arc<str>,
    pub revocation: Revocation,
    pub backend: Arc<str>,
    /// The handle's data, as JSON text.
    pub data: Box<str>,
}

impl LeaseCredential {
    pub fn new(name: &str, kind: &str, revocation: Revocation, handle: &RevokeHandle) -> LeaseCredential {
        LeaseCredential {
            name: name::intern(name),
            kind: name::intern(kind),
            revocation,
            backend: name::intern(&handle.backend),
            data: handle.data.to_string().into_boxed_str(),
        }
    }

    /// The handle its backend revokes with.
    pub fn handle(&self) -> RevokeHandle {
        RevokeHandle { backend: self.backend.to_string(), data: self.data() }
    }

    /// The handle's data (e.g. a broker JWT's `jti`).
    pub fn data(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).unwrap_or_default()
    }
}

/// The JSON shape of a credential in journal records (`handle: {backend, data}`), unchanged
/// since the first journal format so old journals replay.
#[derive(Serialize, Deserialize)]
struct CredentialJson {
    name: String,
    kind: String,
    revocation: Revocation,
    handle: RevokeHandle,
}

impl From<CredentialJson> for LeaseCredential {
    fn from(c: CredentialJson) -> Self {
        LeaseCredential::new(&c.name, &c.kind, c.revocation, &c.handle)
    }
}

impl From<LeaseCredential> for CredentialJson {
    fn from(c: LeaseCredential) -> Self {
        CredentialJson {
            handle: c.handle(),
            name: c.name.to_string(),
            kind: c.kind.to_string(),
            revocation: c.revocation,
        }
    }
}

/// Interned names (policies, issuers, reasons, credential names, kinds, backends): a handful of
/// distinct values shared by every lease. Never freed; the sets are bounded by the config and the
/// code.
pub mod name {
    use std::collections::HashSet;
    use std::sync::{Arc, LazyLock, Mutex, PoisonError};

    static NAMES: LazyLock<Mutex<HashSet<Arc<str>>>> = LazyLock::new(|| Mutex::new(HashSet::new()));

    pub fn intern(text: &str) -> Arc<str> {
        let mut names = NAMES.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(found) = names.get(text) {
            return found.clone();
        }
        let new: Arc<str> = Arc::from(text);
        names.insert(new.clone());
        new
    }
}

/// One lease, as the ledger keeps it: compact, because a broker may hold a million (issue 7's
/// goal is ≤ 1 KiB each, claims included). The id and the job are shared with the indexes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    pub id: Arc<str>,
    pub job: Arc<str>,
    pub policy: Arc<str>,
    pub issuer: Arc<str>,
    pub created_at: UnixSeconds,
    pub expires_at: UnixSeconds,
    pub state: LeaseState,
    /// Why it is ending: `job`, `webhook`, `admin`, `expired`, …
    #[serde(default)]
    pub reason: Option<Arc<str>>,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub next_attempt_at: UnixSeconds,
    #[serde(default)]
    pub last_error: Option<Box<str>>,
    pub credentials: Box<[LeaseCredential]>,
    /// The verified claims it was granted on: for re-evaluation, filters and the audit trail.
    pub claims: ClaimSnapshot,
}

impl Lease {
    pub fn is_live(&self, now: UnixSeconds) -> bool {
        self.state == LeaseState::Active && now < self.expires_at
    }

    fn ends_with_expiry(&self) -> bool {
        self.reason.as_deref() == Some(REASON_EXPIRED)
    }
}

pub const REASON_EXPIRED: &str = "expired";

/// One journal record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Event {
    Created {
        lease: Box<Lease>,
    },
    RevokeRequested {
        id: String,
        reason: String,
        at: UnixSeconds,
    },
    Revoked {
        id: String,
        at: UnixSeconds,
    },
    Expired {
        id: String,
        at: UnixSeconds,
    },
    RevokeFailed {
        id: String,
        at: UnixSeconds,
        attempts: u32,
        next_at: UnixSeconds,
        error: String,
    },
    Irrevocable {
        id: String,
        at: UnixSeconds,
        attempts: u32,
        next_at: UnixSeconds,
        error: String,
    },
    /// A token's `jti` was used for an exchange under a policy (replay protection).
    JtiUsed {
        key: String,
        exp: UnixSeconds,
    },
}

/// What a revocation must undo, handed out when a lease leaves `Active` (or is retried).
#[derive(Debug, Clone)]
pub struct RevokeWork {
    pub lease_id: Arc<str>,
    pub credentials: Box<[LeaseCredential]>,
}

/// Backoff for failed revocations.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Failures before a lease is declared irrevocable.
    pub max_attempts: u32,
    pub base_secs: i64,
    pub cap_secs: i64,
    /// How often an irrevocable lease is still tried.
    pub irrevocable_every_secs: i64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max_attempts: 8, base_secs: 2, cap_secs: 300, irrevocable_every_secs: 600 }
    }
}

impl RetryPolicy {
    /// Exponential backoff with ±25 % jitter, so many failing leases do not retry in lockstep.
    fn delay(&self, attempts: u32) -> i64 {
        let exp = self.base_secs.saturating_mul(1i64 << attempts.min(30)).min(self.cap_secs);
        let jitter_range = (exp / 2).max(1);
        let r = i64::from(u16::from_le_bytes(crate::ids::random::<2>())) % jitter_range;
        (exp - exp / 4 + r).max(1)
    }
}

/// When a started revocation has not reported back after this long, the reaper tries again.
const STALLED_ATTEMPT_SECS: i64 = 60;

/// How long an ended lease stays visible (introspection answers, operators) before it is forgotten.
pub const ENDED_RETENTION_SECS: i64 = 3600;

/// Filters for listing and bulk revocation. Every given field must match.
#[derive(Debug, Default, Clone)]
pub struct LeaseFilter {
    pub job: Option<String>,
    pub policy: Option<String>,
    pub state: Option<LeaseState>,
    pub repository_id: Option<String>,
    pub project_id: Option<String>,
    /// GitHub `actor_id` or GitLab `user_id`.
    pub actor_id: Option<String>,
}

impl LeaseFilter {
    pub fn matches(&self, lease: &Lease) -> bool {
        let claim = |name: &str, want: &Option<String>| {
            want.as_ref().is_none_or(|w| {
                lease.claims.get(name).as_ref().and_then(crate::claims::scalar_text).as_ref() == Some(w)
            })
        };
        self.job.as_ref().is_none_or(|j| **j == *lease.job)
            && self.policy.as_ref().is_none_or(|p| **p == *lease.policy)
            && self.state.is_none_or(|s| s == lease.state)
            && claim("repository_id", &self.repository_id)
            && claim("project_id", &self.project_id)
            && self.actor_id.as_ref().is_none_or(|a| {
                ["actor_id", "user_id"]
                    .iter()
                    .any(|c| lease.claims.get(c).as_ref().and_then(crate::claims::scalar_text).as_ref() == Some(a))
            })
    }

    pub fn is_empty(&self) -> bool {
        self.job.is_none()
            && self.policy.is_none()
            && self.state.is_none()
            && self.repository_id.is_none()
            && self.project_id.is_none()
            && self.actor_id.is_none()
    }
}

/// Ids by the second something is due: a few thousand distinct seconds hold a million ids, so
/// an insert compares integers in a small, cache-resident tree and pushes onto a vector.
#[derive(Default)]
struct TimeIndex(Mutex<BTreeMap<UnixSeconds, Vec<Arc<str>>>>);

impl TimeIndex {
    fn insert(&self, at: UnixSeconds, id: Arc<str>) {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entry(at).or_default().push(id);
    }
}

#[derive(Default)]
pub struct Ledger {
    /// Boxed: a map slot is then 24 bytes, and a hash table keeps up to half its slots empty.
    leases: DashMap<Arc<str>, Box<Lease>>,
    by_job: DashMap<Arc<str>, Vec<Arc<str>>>,
    expiries: TimeIndex,
    retries: TimeIndex,
    forget_at: TimeIndex,
    jtis: DashMap<Arc<str>, UnixSeconds>,
    jti_expiries: TimeIndex,
    counts: [AtomicUsize; 5],
    /// Active leases per backend (a lease with credentials from two backends counts in both).
    active_by_backend: DashMap<String, usize>,
    journal: Option<Journal>,
    retry: RetryPolicy,
}

/// Removes every entry of `index` due at `now` and returns their ids, each once (a lease can
/// have stale entries: the index is cleaned lazily, and callers re-check the lease itself).
fn take_due(index: &TimeIndex, now: UnixSeconds) -> Vec<Arc<str>> {
    let mut due: Vec<Arc<str>> = {
        let mut map = index.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let later = map.split_off(&now.saturating_add(1));
        std::mem::replace(&mut *map, later).into_values().flatten().collect()
    };
    // Sorted and deduplicated outside the lock (a lease can be listed twice).
    due.sort_unstable();
    due.dedup();
    due
}

impl Ledger {
    /// A ledger recording to `journal` (or, with `None`, in memory only).
    pub fn new(journal: Option<Journal>, retry: RetryPolicy) -> Ledger {
        Ledger { journal, retry, ..Ledger::default() }
    }

    /// An empty ledger sized for `leases`, without a journal yet: replay fills it, then
    /// [`Ledger::attach`] gives it the journal it was replayed from.
    pub fn with_capacity(leases: usize, retry: RetryPolicy) -> Ledger {
        Ledger {
            leases: DashMap::with_capacity(leases),
            by_job: DashMap::with_capacity(leases),
            retry,
            ..Ledger::default()
        }
    }

    /// Starts recording to `journal` (after a replay).
    pub fn attach(&mut self, journal: Journal) {
        self.journal = Some(journal);
    }

    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_ref()
    }

    async fn record(&self, events: &[Event]) -> Result<(), JournalError> {
        match &self.journal {
            Some(j) => j.append(events).await,
            None => Ok(()),
        }
    }

    /// Records a change that already happened in memory; a failure is logged, not returned: the
    /// revocation itself must go on even when the disk does not.
    async fn record_or_log(&self, event: Event) {
        if let Err(e) = self.record(std::slice::from_ref(&event)).await {
            tracing::error!(error = %e, "journal write failed for a lease state change; the journal is behind memory until it recovers");
        }
    }

    // ---- replay ------------------------------------------------------------------------

    /// Applies a journal event to memory (at start, and for every snapshot record). Idempotent:
    /// applying an event twice leaves the same state.
    pub fn apply(&self, event: Event) {
        match event {
            Event::Created { lease } => {
                // One lookup of the id, not two: a replay applies a million of these. A lease
                // already known (the same record twice) is kept as it is.
                if let dashmap::Entry::Vacant(slot) = self.leases.entry(lease.id.clone()) {
                    self.index(&lease);
                    slot.insert(lease);
                }
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
            Event::JtiUsed { key, exp } => {
                let key: Arc<str> = key.into();
                self.jtis.insert(key.clone(), exp);
                self.jti_expiries.insert(exp, key);
            }
        }
    }

    /// Changes one lease, keeping the per-state counts and the time indexes in step.
    fn update(&self, id: &str, change: impl FnOnce(&mut Lease)) {
        let Some(mut lease) = self.leases.get_mut(id) else { return };
        let before = lease.state;
        change(&mut lease);
        let after = lease.state;
        if before != after {
            self.counts[before.index()].fetch_sub(1, Ordering::Relaxed);
            self.counts[after.index()].fetch_add(1, Ordering::Relaxed);
            if before == LeaseState::Active {
                self.count_backends(&lease, false);
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

    /// Active leases per backend, by backend name.
    pub fn active_by_backend(&self) -> Vec<(String, usize)> {
        let mut rows: Vec<(String, usize)> =
            self.active_by_backend.iter().map(|e| (e.key().clone(), *e.value())).collect();
        rows.sort();
        rows
    }

    fn insert_memory(&self, lease: Box<Lease>) {
        self.index(&lease);
        self.leases.insert(lease.id.clone(), lease);
    }

    /// Counts a new lease and adds it to the job and time indexes. May run while its `leases`
    /// entry is held: the lock order is `leases` first, then an index, never the reverse.
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

    // ---- issuing -----------------------------------------------------------------------

    /// Reserves a `jti` for one exchange; `false` if it was already used (a replay).
    pub fn reserve_jti(&self, key: &str, exp: UnixSeconds) -> bool {
        let key: Arc<str> = key.into();
        match self.jtis.entry(key.clone()) {
            dashmap::Entry::Occupied(_) => false,
            dashmap::Entry::Vacant(v) => {
                v.insert(exp);
                self.jti_expiries.insert(exp, key);
                true
            }
        }
    }

    /// Gives a reserved `jti` back after an exchange that issued nothing.
    pub fn release_jti(&self, key: &str) {
        self.jtis.remove(key);
    }

    /// Makes a new lease durable, then visible. Nothing is in memory unless it is on disk.
    pub async fn record_created(&self, lease: Lease, jti: Option<(&str, UnixSeconds)>) -> Result<(), JournalError> {
        let mut events = Vec::with_capacity(2);
        if let Some((key, exp)) = jti {
            events.push(Event::JtiUsed { key: key.to_string(), exp });
        }
        let lease = Box::new(lease);
        events.push(Event::Created { lease: lease.clone() });
        self.record(&events).await?;
        self.insert_memory(lease);
        Ok(())
    }

    // ---- ending ------------------------------------------------------------------------

    /// Starts ending an active lease: `Revoking` in memory and in the journal (so a crash
    /// mid-revocation resumes it), and hands out the work. `None` if it is not active (revoke is
    /// idempotent: only one caller gets the work).
    pub async fn begin_revoke(&self, id: &str, reason: &str, now: UnixSeconds) -> Option<RevokeWork> {
        let work = {
            let mut lease = self.leases.get_mut(id)?;
            if lease.state != LeaseState::Active {
                return None;
            }
            lease.state = LeaseState::Revoking;
            lease.reason = Some(name::intern(reason));
            // A safety net: if the attempt about to run never reports back, the reaper retries.
            lease.next_attempt_at = now + STALLED_ATTEMPT_SECS;
            self.retries.insert(lease.next_attempt_at, lease.id.clone());
            self.count_backends(&lease, false);
            RevokeWork { lease_id: lease.id.clone(), credentials: lease.credentials.clone() }
        };
        self.counts[LeaseState::Active.index()].fetch_sub(1, Ordering::Relaxed);
        self.counts[LeaseState::Revoking.index()].fetch_add(1, Ordering::Relaxed);
        self.record_or_log(Event::RevokeRequested { id: id.to_string(), reason: reason.to_string(), at: now }).await;
        Some(work)
    }

    /// Records the outcome of a revocation attempt: every backend confirmed (revoked, or expired
    /// if expiry started it), or not (retry later with backoff; irrevocable after too many).
    pub async fn finish_revoke(&self, id: &str, error: Option<String>, now: UnixSeconds) -> LeaseState {
        let Some(lease) = self.get(id) else { return LeaseState::Revoked };
        let event = match error {
            None if lease.ends_with_expiry() => Event::Expired { id: id.to_string(), at: now },
            None => Event::Revoked { id: id.to_string(), at: now },
            Some(error) => {
                let attempts = lease.attempts.saturating_add(1);
                if attempts >= self.retry.max_attempts {
                    let next_at = now + self.retry.irrevocable_every_secs;
                    Event::Irrevocable { id: id.to_string(), at: now, attempts, next_at, error }
                } else {
                    let next_at = now + self.retry.delay(attempts);
                    Event::RevokeFailed { id: id.to_string(), at: now, attempts, next_at, error }
                }
            }
        };
        self.apply(event.clone());
        self.record_or_log(event).await;
        self.state(id).unwrap_or(LeaseState::Revoked)
    }

    /// Active leases whose expiry has come (ids; each handed out once).
    pub fn due_expiries(&self, now: UnixSeconds) -> Vec<String> {
        take_due(&self.expiries, now)
            .into_iter()
            .filter(|id| self.leases.get(id).is_some_and(|l| l.state == LeaseState::Active && l.expires_at <= now))
            .map(|id| id.to_string())
            .collect()
    }

    /// Pending revocations whose retry time has come.
    pub fn due_retries(&self, now: UnixSeconds) -> Vec<RevokeWork> {
        take_due(&self.retries, now).into_iter().filter_map(|id| self.retry_work(&id, now)).collect()
    }

    /// Every pending revocation, due or not (start-up resumes them all at once).
    pub fn all_pending(&self) -> Vec<RevokeWork> {
        let ids: Vec<Arc<str>> = self.leases.iter().filter(|l| l.state.is_pending()).map(|l| l.id.clone()).collect();
        ids.iter().filter_map(|id| self.retry_work(id, i64::MAX)).collect()
    }

    fn retry_work(&self, id: &str, now: UnixSeconds) -> Option<RevokeWork> {
        let lease = self.leases.get(id)?;
        (lease.state.is_pending() && lease.next_attempt_at <= now)
            .then(|| RevokeWork { lease_id: lease.id.clone(), credentials: lease.credentials.clone() })
    }

    /// Forgets leases that ended more than [`ENDED_RETENTION_SECS`] ago, and used `jti`s whose
    /// tokens have expired. Never a pending lease.
    pub fn forget_ended(&self, now: UnixSeconds) -> usize {
        let mut forgotten = 0;
        for id in take_due(&self.forget_at, now) {
            let removed =
                self.leases.remove_if(&id, |_, l| matches!(l.state, LeaseState::Revoked | LeaseState::Expired));
            if let Some((_, lease)) = removed {
                self.counts[lease.state.index()].fetch_sub(1, Ordering::Relaxed);
                if let Some(mut ids) = self.by_job.get_mut(&lease.job) {
                    ids.retain(|i| *i != id);
                }
                self.by_job.remove_if(&lease.job, |_, ids| ids.is_empty());
                forgotten += 1;
            }
        }
        for key in take_due(&self.jti_expiries, now) {
            self.jtis.remove_if(&key, |_, exp| *exp <= now);
        }
        forgotten
    }

    /// Everything a fresh journal needs: every remembered lease in its current state, and the
    /// `jti`s still guarded.
    pub fn snapshot(&self) -> Vec<Event> {
        let mut events: Vec<Event> = Vec::with_capacity(self.leases.len() + self.jtis.len());
        events.extend(self.leases.iter().map(|l| Event::Created { lease: l.value().clone() }));
        events.extend(self.jtis.iter().map(|e| Event::JtiUsed { key: e.key().to_string(), exp: *e.value() }));
        events
    }

    // ---- reading -----------------------------------------------------------------------

    pub fn get(&self, id: &str) -> Option<Lease> {
        self.leases.get(id).map(|l| Lease::clone(&l))
    }

    pub fn state(&self, id: &str) -> Option<LeaseState> {
        self.leases.get(id).map(|l| l.state)
    }

    pub fn is_live(&self, id: &str, now: UnixSeconds) -> bool {
        self.leases.get(id).is_some_and(|l| l.is_live(now))
    }

    /// Ids of the job's leases that are still active.
    pub fn live_of_job(&self, job: &str, now: UnixSeconds) -> Vec<String> {
        let ids = self.by_job.get(job).map(|ids| ids.clone()).unwrap_or_default();
        ids.into_iter().filter(|id| self.is_live(id, now)).map(|id| id.to_string()).collect()
    }

    /// Leases matching `filter`, oldest first, at most `limit`. A job filter uses the job index;
    /// other filters scan (admin queries, not the hot path).
    pub fn list(&self, filter: &LeaseFilter, limit: usize) -> Vec<Lease> {
        let mut out: Vec<Lease> = match &filter.job {
            Some(job) => {
                let ids = self.by_job.get(job.as_str()).map(|ids| ids.clone()).unwrap_or_default();
                ids.iter().filter_map(|id| self.get(id)).filter(|l| filter.matches(l)).collect()
            }
            None => self.leases.iter().filter(|l| filter.matches(l)).map(|l| Lease::clone(&l)).collect(),
        };
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out.truncate(limit);
        out
    }

    pub fn count(&self, state: LeaseState) -> usize {
        self.counts[state.index()].load(Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(id: &str, job: &str, expires_at: i64) -> Lease {
        Lease {
            id: id.into(),
            job: job.into(),
            policy: "p".into(),
            issuer: "i".into(),
            created_at: 0,
            expires_at,
            state: LeaseState::Active,
            reason: None,
            attempts: 0,
            next_attempt_at: 0,
            last_error: None,
            credentials: Box::new([]),
            claims: ClaimSnapshot::default(),
        }
    }

    #[tokio::test]
    async fn revoke_is_handed_out_once_and_expiry_follows_the_clock() {
        let l = Ledger::default();
        for (id, job) in [("a", "job1"), ("b", "job1"), ("c", "job2")] {
            l.record_created(lease(id, job, 100), None).await.unwrap();
        }
        assert_eq!(l.live_of_job("job1", 10), vec!["a", "b"]);
        assert!(l.begin_revoke("a", "job", 10).await.is_some());
        assert!(l.begin_revoke("a", "job", 10).await.is_none(), "second revoke gets no work");
        assert_eq!(l.finish_revoke("a", None, 10).await, LeaseState::Revoked);
        assert_eq!(l.live_of_job("job1", 10), vec!["b"]);
        assert!(l.due_expiries(99).is_empty(), "nothing expires early");
        let mut due = l.due_expiries(100);
        due.sort();
        assert_eq!(due, ["b", "c"]);
        assert!(l.due_expiries(100).is_empty(), "expiry work is handed out once");
        l.begin_revoke("c", REASON_EXPIRED, 100).await.unwrap();
        assert_eq!(l.finish_revoke("c", None, 100).await, LeaseState::Expired);
        assert_eq!(l.forget_ended(100 + ENDED_RETENTION_SECS - 1), 0);
        assert_eq!(l.forget_ended(100 + ENDED_RETENTION_SECS), 2, "a (revoked) and c (expired)");
        assert!(l.get("c").is_none());
        assert!(l.live_of_job("job2", 0).is_empty());
        assert_eq!(l.count(LeaseState::Active), 1);
    }

    #[tokio::test]
    async fn failures_back_off_then_become_irrevocable_and_are_still_retried() {
        let l = Ledger::new(
            None,
            RetryPolicy { max_attempts: 3, base_secs: 10, cap_secs: 1000, irrevocable_every_secs: 600 },
        );
        l.record_created(lease("a", "j", 1000), None).await.unwrap();
        l.begin_revoke("a", "job", 0).await.unwrap();
        assert!(l.due_retries(0).is_empty(), "the caller of begin_revoke makes the first attempt");
        assert_eq!(l.get("a").unwrap().next_attempt_at, STALLED_ATTEMPT_SECS, "a stalled attempt is retried");
        assert_eq!(l.finish_revoke("a", Some("boom".into()), 0).await, LeaseState::Revoking);
        let next = l.get("a").unwrap().next_attempt_at;
        assert!((15..=25).contains(&next), "10 s × 2 ± 25 %: {next}");
        assert!(l.due_retries(next - 1).is_empty());
        assert_eq!(l.due_retries(next).len(), 1);
        l.finish_revoke("a", Some("boom".into()), next).await;
        assert_eq!(l.finish_revoke("a", Some("boom".into()), next).await, LeaseState::Irrevocable);
        assert_eq!(l.count(LeaseState::Irrevocable), 1);
        let at = l.get("a").unwrap().next_attempt_at;
        assert_eq!(at, next + 600);
        assert_eq!(l.due_retries(at).len(), 1, "irrevocable leases are retried, never dropped");
        assert_eq!(l.finish_revoke("a", None, at).await, LeaseState::Revoked);
        assert_eq!(l.count(LeaseState::Irrevocable), 0);
    }

    #[test]
    fn replaying_events_twice_gives_the_same_state() {
        let l = Ledger::default();
        let events = [
            Event::Created { lease: Box::new(lease("a", "j", 100)) },
            Event::RevokeRequested { id: "a".into(), reason: "job".into(), at: 5 },
            Event::RevokeFailed { id: "a".into(), at: 5, attempts: 1, next_at: 7, error: "x".into() },
        ];
        for e in events.iter().chain(events.iter()) {
            l.apply(e.clone());
        }
        let a = l.get("a").unwrap();
        assert_eq!((a.state, a.attempts, a.next_attempt_at), (LeaseState::Revoking, 1, 7));
        assert_eq!(l.count(LeaseState::Revoking), 1);
        assert_eq!(l.count(LeaseState::Active), 0);
    }

    #[test]
    fn a_jti_is_used_once_until_it_expires() {
        let l = Ledger::default();
        assert!(l.reserve_jti("k", 50));
        assert!(!l.reserve_jti("k", 50));
        l.forget_ended(49);
        assert!(!l.reserve_jti("k", 50));
        l.forget_ended(50);
        assert!(l.reserve_jti("k", 80), "the entry went away with the token");
    }
}
