//! ledger: one lease per exchange, indexed by id and by job. In memory for now (the durable
//! journal is issue 3). Every method is synchronous and returns owned data, so no map guard is
//! ever held across an `.await`.

use crate::clock::UnixSeconds;
use crate::mint::{Revocation, RevokeHandle};
use dashmap::DashMap;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LeaseState {
    Active,
    /// Revocation started; a backend has not confirmed yet.
    Revoking,
    Revoked,
    Expired,
}

#[derive(Debug, Clone, Serialize)]
pub struct LeaseCredential {
    pub name: String,
    pub kind: &'static str,
    pub revocation: Revocation,
    pub handle: RevokeHandle,
}

#[derive(Debug, Clone, Serialize)]
pub struct Lease {
    pub id: String,
    pub job: String,
    pub policy: String,
    pub issuer: String,
    pub created_at: UnixSeconds,
    pub expires_at: UnixSeconds,
    pub state: LeaseState,
    pub credentials: Vec<LeaseCredential>,
}

impl Lease {
    pub fn is_live(&self, now: UnixSeconds) -> bool {
        self.state == LeaseState::Active && now < self.expires_at
    }
}

/// What a revocation must undo, handed out when a lease leaves `Active`.
#[derive(Debug, Clone)]
pub struct RevokeWork {
    pub lease_id: String,
    pub credentials: Vec<LeaseCredential>,
}

#[derive(Default)]
pub struct Ledger {
    leases: DashMap<String, Lease>,
    by_job: DashMap<String, Vec<String>>,
}

/// How long an ended lease stays visible (for introspection answers and operators) before the
/// reaper forgets it.
const ENDED_RETENTION_SECS: i64 = 3600;

impl Ledger {
    pub fn insert(&self, lease: Lease) {
        self.by_job.entry(lease.job.clone()).or_default().push(lease.id.clone());
        self.leases.insert(lease.id.clone(), lease);
    }

    pub fn get(&self, id: &str) -> Option<Lease> {
        self.leases.get(id).map(|l| l.clone())
    }

    pub fn is_live(&self, id: &str, now: UnixSeconds) -> bool {
        self.leases.get(id).is_some_and(|l| l.is_live(now))
    }

    /// Ids of the job's leases that are still active.
    pub fn live_of_job(&self, job: &str, now: UnixSeconds) -> Vec<String> {
        let ids = self.by_job.get(job).map(|ids| ids.clone()).unwrap_or_default();
        ids.into_iter().filter(|id| self.is_live(id, now)).collect()
    }

    /// Moves an active lease to `Revoking` and hands out its credentials; `None` if the lease is
    /// unknown or not active (revoke is idempotent: only one caller gets the work).
    pub fn begin_revoke(&self, id: &str) -> Option<RevokeWork> {
        let mut lease = self.leases.get_mut(id)?;
        if lease.state != LeaseState::Active {
            return None;
        }
        lease.state = LeaseState::Revoking;
        Some(RevokeWork { lease_id: lease.id.clone(), credentials: lease.credentials.clone() })
    }

    /// Records the outcome: `Revoked` when every backend confirmed, else it stays `Revoking`
    /// (pending; retried by the reaper until it succeeds).
    pub fn finish_revoke(&self, id: &str, all_ok: bool) {
        if let Some(mut lease) = self.leases.get_mut(id)
            && all_ok
        {
            lease.state = LeaseState::Revoked;
        }
    }

    /// Records an expiry: `Expired` once every backend confirmed, else pending like a revocation.
    pub fn finish_expiry(&self, id: &str, all_ok: bool) {
        if let Some(mut lease) = self.leases.get_mut(id)
            && all_ok
        {
            lease.state = LeaseState::Expired;
        }
    }

    pub fn state(&self, id: &str) -> Option<LeaseState> {
        self.leases.get(id).map(|l| l.state)
    }

    /// Hands out leases past their expiry (moved to `Revoking`, so their credentials are revoked
    /// at the backend before the lease is recorded `Expired`), lists pending revocations to retry,
    /// and forgets ended leases after the retention. (A full scan; the expiry index is issue 3.)
    pub fn reap(&self, now: UnixSeconds) -> (Vec<RevokeWork>, Vec<String>) {
        let mut expired = Vec::new();
        let mut pending = Vec::new();
        let mut forget = Vec::new();
        for mut lease in self.leases.iter_mut() {
            match lease.state {
                LeaseState::Active if now >= lease.expires_at => {
                    lease.state = LeaseState::Revoking;
                    expired.push(RevokeWork { lease_id: lease.id.clone(), credentials: lease.credentials.clone() });
                }
                LeaseState::Revoking => pending.push(lease.id.clone()),
                LeaseState::Revoked | LeaseState::Expired if now >= lease.expires_at + ENDED_RETENTION_SECS => {
                    forget.push((lease.id.clone(), lease.job.clone()));
                }
                _ => {}
            }
        }
        for (id, job) in forget {
            self.leases.remove(&id);
            if let Some(mut ids) = self.by_job.get_mut(&job) {
                ids.retain(|i| *i != id);
            }
            self.by_job.remove_if(&job, |_, ids| ids.is_empty());
        }
        (expired, pending)
    }

    /// Re-arms a pending revocation for a retry.
    pub fn retry_work(&self, id: &str) -> Option<RevokeWork> {
        let lease = self.leases.get(id)?;
        (lease.state == LeaseState::Revoking)
            .then(|| RevokeWork { lease_id: lease.id.clone(), credentials: lease.credentials.clone() })
    }

    pub fn count_state(&self, state: LeaseState) -> usize {
        self.leases.iter().filter(|l| l.state == state).count()
    }

    pub fn live_count(&self, now: UnixSeconds) -> usize {
        self.leases.iter().filter(|l| l.is_live(now)).count()
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
            credentials: vec![],
        }
    }

    #[test]
    fn revoke_is_handed_out_once_and_expiry_is_by_the_injected_clock() {
        let l = Ledger::default();
        l.insert(lease("a", "job1", 100));
        l.insert(lease("b", "job1", 100));
        l.insert(lease("c", "job2", 100));
        assert_eq!(l.live_of_job("job1", 10), vec!["a", "b"]);
        assert!(l.begin_revoke("a").is_some());
        assert!(l.begin_revoke("a").is_none(), "second revoke gets no work");
        l.finish_revoke("a", true);
        assert_eq!(l.state("a"), Some(LeaseState::Revoked));
        assert_eq!(l.live_of_job("job1", 10), vec!["b"]);
        assert!(l.is_live("c", 99));
        assert!(!l.is_live("c", 100));
        let mut expired: Vec<String> = l.reap(100).0.into_iter().map(|w| w.lease_id).collect();
        expired.sort();
        assert_eq!(expired, ["b", "c"], "b and c expire; a was revoked");
        assert_eq!(l.state("c"), Some(LeaseState::Revoking), "revoked at the backend before it is recorded expired");
        assert!(l.reap(100).0.is_empty(), "expiry work is handed out once");
        l.finish_expiry("b", true);
        l.finish_expiry("c", true);
        assert_eq!(l.state("c"), Some(LeaseState::Expired));
        l.reap(100 + ENDED_RETENTION_SECS);
        assert!(l.get("c").is_none());
        assert!(l.live_of_job("job2", 0).is_empty());
    }
}
