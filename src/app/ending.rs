//! Every way a lease ends — the job's own revoke, a platform webhook, an admin call, a policy
//! change, its expiry — goes through [`App::end_leases`] or the reaper's pass, and each attempt
//! through [`App::run_revocation`]: revoke at every backend first, then record the outcome, so
//! the ledger never says revoked while a credential still works.

use super::App;
use super::exchange::REASON_PARENT_ENDED;
use crate::clock::{UnixSeconds, rfc3339};
use crate::error::Error;
use crate::identity::VerifiedIdentity;
use crate::ledger::{LeaseFilter, LeaseState, REASON_EXPIRED, RevokeWork};
use crate::mint::{MintError, RevokeHandle};
use serde::Serialize;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// Revocations the reaper (and the resume at start) runs at once: enough to overlap the store's
/// round trips, half of PostgreSQL's default pool (16), so exchanges still find a connection
/// during a burst of expiries.
const REAP_CONCURRENCY: usize = 8;
/// Revocations the reaper records in one go at most.
const RECORD_BATCH: usize = 512;

#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct RevokeReply {
    pub revoked: Vec<String>,
    pub pending: Vec<String>,
}

impl App {
    /// `POST /v1/revoke`: the job's own token ends its leases. A lease of another job, or an
    /// unknown id, is neither revoked nor reported (no oracle). Works with a token whose `jti`
    /// was already used for an exchange.
    pub async fn revoke(&self, token: &str, lease: Option<&str>) -> Result<RevokeReply, Error> {
        let now = self.now();
        let identity = self.verifier.verify(token, now).await?;
        let ids = match lease {
            Some(id) if crate::ids::is_lease_id(id) => self.own_lease(&identity, id).await?.into_iter().collect(),
            Some(_) => Vec::new(),
            None => self.store_ids(self.store.live_of_job(identity.job(), now).await)?,
        };
        let reply = self.end_leases(ids, "job").await;
        tracing::info!(job = %identity.job(), revoked = ?reply.revoked, pending = ?reply.pending, "revoke by job");
        Ok(reply)
    }

    async fn own_lease(&self, identity: &VerifiedIdentity, id: &str) -> Result<Option<String>, Error> {
        let lease = self.store.get(id).await.map_err(|e| Error::Unavailable(e.0))?;
        Ok(lease.filter(|l| *l.job == *identity.job()).map(|l| l.id.to_string()))
    }

    fn store_ids(&self, ids: Result<Vec<Arc<str>>, crate::ledger::StoreError>) -> Result<Vec<String>, Error> {
        let ids = ids.map_err(|e| Error::Unavailable(e.0))?;
        Ok(ids.iter().map(|id| id.to_string()).collect())
    }

    /// Was this webhook delivery acted on already by a replica sharing the store? A store that
    /// cannot answer is a no: acting on a delivery twice ends nothing more.
    pub async fn delivery_seen(&self, hook: &str, id: &str) -> bool {
        self.store.delivery_seen(hook, id).await.unwrap_or_else(|e| {
            tracing::warn!(hook, error = %e, "webhook delivery not checked against the shared store");
            false
        })
    }

    /// Remembers a delivery acted on, for every replica sharing the store.
    pub async fn record_delivery(&self, hook: &str, id: &str) {
        if let Err(e) = self.store.record_delivery(hook, id, self.now()).await {
            tracing::warn!(hook, error = %e, "webhook delivery not recorded in the shared store; a redelivery acts again");
        }
    }

    /// Every live lease of `job` (webhooks, admin).
    pub async fn end_job(&self, job: &str, reason: &str) -> Result<RevokeReply, Error> {
        let ids = self.store_ids(self.store.live_of_job(job, self.now()).await)?;
        Ok(self.end_leases(ids, reason).await)
    }

    /// Every live lease matching `filter` (admin: a policy, a repository, an actor).
    pub async fn end_matching(&self, filter: &LeaseFilter, reason: &str) -> Result<RevokeReply, Error> {
        let now = self.now();
        let leases = self.store.list(filter, usize::MAX).await.map_err(|e| Error::Unavailable(e.0))?;
        let ids = leases.into_iter().filter(|l| l.is_live(now)).map(|l| l.id.to_string()).collect();
        Ok(self.end_leases(ids, reason).await)
    }

    /// Ends each lease: revoked at its backends, then recorded. Already-ended leases are
    /// reported as they stand (revoke is idempotent); a lease is reported `revoked` only once
    /// the store has recorded it so.
    ///
    /// Leases derived from them by token exchange end with them (reason
    /// [`REASON_PARENT_ENDED`]), and are reported too.
    pub async fn end_leases(&self, ids: Vec<String>, reason: &str) -> RevokeReply {
        let derived = self.derived_from(&ids).await;
        let mut reply = self.end_listed(ids, reason).await;
        if !derived.is_empty() {
            let more = self.end_listed(derived, REASON_PARENT_ENDED).await;
            reply.revoked.extend(more.revoked);
            reply.pending.extend(more.pending);
        }
        reply
    }

    /// The live leases of the same jobs whose tokens were exchanged from one of `ids`, however
    /// deep (a derived token's revoke handle names every lease above it). Best effort: a store
    /// that cannot answer leaves them to their own short ttl, and introspection already answers
    /// inactive for them, since it checks the chain.
    async fn derived_from(&self, ids: &[String]) -> Vec<String> {
        let now = self.now();
        let mut jobs = std::collections::BTreeSet::new();
        for id in ids {
            if let Ok(Some(lease)) = self.store.get(id).await {
                jobs.insert(lease.job.to_string());
            }
        }
        let mut derived = Vec::new();
        for job in jobs {
            let Ok(live) = self.store.live_of_job(&job, now).await else { continue };
            for id in live.iter().filter(|id| !ids.iter().any(|i| **i == ***id)) {
                let Ok(Some(lease)) = self.store.get(id).await else { continue };
                let below = lease.credentials.iter().any(|c| {
                    let data = c.data();
                    let chain = data.get("lease_chain").and_then(serde_json::Value::as_array);
                    chain.is_some_and(|chain| {
                        chain.iter().any(|p| p.as_str().is_some_and(|p| ids.iter().any(|i| i == p)))
                    })
                });
                if below {
                    derived.push(id.to_string());
                }
            }
        }
        derived
    }

    /// [`App::end_leases`] of exactly these leases.
    async fn end_listed(&self, ids: Vec<String>, reason: &str) -> RevokeReply {
        let mut reply = RevokeReply::default();
        for id in ids {
            let state = match self.begin_ending(&id, reason, self.now()).await {
                Ok(Some(work)) => self.run_revocation(work).await,
                Ok(None) => match self.store.get(&id).await {
                    Ok(Some(lease)) => Some(lease.state),
                    Ok(None) => continue,
                    Err(_) => None,
                },
                Err(e) => {
                    tracing::error!(lease_id = %id, error = %e, "the lease store did not take a revocation; the lease is not ended yet");
                    None
                }
            };
            // `None`: the store could not say, so the job must not be told its credentials died.
            if state.is_none_or(LeaseState::is_pending) { reply.pending.push(id) } else { reply.revoked.push(id) }
        }
        reply
    }

    /// Starts ending an active lease (`None` if it is not active: someone else ended it), and
    /// counts it under its reason.
    async fn begin_ending(
        &self,
        id: &str,
        reason: &str,
        now: UnixSeconds,
    ) -> Result<Option<RevokeWork>, crate::ledger::StoreError> {
        let work = self.store.begin_revoke(id, reason, now).await?;
        if work.is_some() {
            self.metrics.leases_ended(reason, 1);
        }
        Ok(work)
    }

    /// Revokes every credential of a lease at its backend first, then records the outcome.
    /// `None` when the outcome could not be recorded: the lease stays pending in the store and
    /// its stalled-attempt retry runs this again.
    async fn run_revocation(&self, work: RevokeWork) -> Option<LeaseState> {
        let error = self.revoke_work(&work).await;
        let recorded = self.store.finish_revoke(&work.lease_id, error.clone(), self.now()).await;
        self.revocation_recorded(&work, error.as_deref(), recorded).await
    }

    /// Every credential of a lease revoked at its backend: the first error, if any.
    async fn revoke_work(&self, work: &RevokeWork) -> Option<String> {
        let handles: Vec<RevokeHandle> = work.credentials.iter().map(|c| c.handle()).collect();
        self.revoke_handles(&handles).await
    }

    /// What follows an attempt's recording: the metric, the audit event, the log line. The
    /// lease's state afterwards, `None` if it was not recorded.
    async fn revocation_recorded(
        &self,
        work: &RevokeWork,
        error: Option<&str>,
        recorded: Result<Option<LeaseState>, crate::ledger::StoreError>,
    ) -> Option<LeaseState> {
        let id = &*work.lease_id;
        let state = match recorded {
            Ok(Some(state)) => Some(state),
            Ok(None) => {
                tracing::error!(lease_id = %id, "the lease store no longer knows a lease whose revocation just ran");
                None
            }
            Err(e) => {
                tracing::error!(lease_id = %id, error = %e, "revocation outcome not recorded; the lease stays pending and is retried");
                None
            }
        };
        let outcome = state.map_or("unrecorded", LeaseState::as_str);
        self.metrics.revocation(outcome);
        self.audit_revocation(work, outcome, error).await;
        match error {
            None => tracing::info!(lease_id = %id, state = outcome, "lease ended"),
            Some(e) => {
                tracing::warn!(lease_id = %id, state = outcome, error = %e, "lease revocation failed; will retry")
            }
        }
        state
    }

    /// Each lease's credentials revoked at their backends, [`REAP_CONCURRENCY`] leases at a
    /// time, on this task; the outcomes recorded as they come, those every backend confirmed
    /// together (`LeaseStore::finish_revoked`, up to [`RECORD_BATCH`] at once), failures one by
    /// one.
    ///
    /// One at a time, the expiry pass was as fast as the store's round trips allowed: on
    /// PostgreSQL (an `UPDATE` and the audit's lookup per lease) it fell behind at ~1,200
    /// expiries/s in the first soak, so a burst of expiries waited in line past their TTL.
    /// Overlapping them, then recording them together, took the store's statements per expiry
    /// from two to a fraction of one. It adds no load past the backends' own bounds: each
    /// backend caps its calls in flight (`mint::bounded`), and the rest wait there.
    async fn run_revocations(&self, work: impl IntoIterator<Item = RevokeWork>) {
        use futures_util::StreamExt;
        futures_util::stream::iter(work)
            .map(|work| async move {
                let error = self.revoke_work(&work).await;
                (work, error)
            })
            .buffer_unordered(REAP_CONCURRENCY)
            .ready_chunks(RECORD_BATCH)
            .for_each(|attempts| self.record_revocations(attempts))
            .await;
    }

    /// Outcomes of [`App::run_revocations`]' attempts recorded: the confirmed ones in one go,
    /// what follows each (audit event, log line) side by side, so the audit writer takes them
    /// together too.
    async fn record_revocations(&self, attempts: Vec<(RevokeWork, Option<String>)>) {
        use futures_util::future::join_all;
        let now = self.now();
        let (done, failed): (Vec<_>, Vec<_>) = attempts.into_iter().partition(|(_, error)| error.is_none());
        if !done.is_empty() {
            let ids: Vec<Arc<str>> = done.iter().map(|(work, _)| work.lease_id.clone()).collect();
            let recorded: Vec<_> = match self.store.finish_revoked(&ids, now).await {
                Ok(states) => states.into_iter().map(Ok).collect(),
                Err(e) => vec![Err(e); done.len()],
            };
            join_all(done.iter().zip(recorded).map(|((work, _), r)| self.revocation_recorded(work, None, r))).await;
        }
        join_all(failed.iter().map(|(work, error)| async move {
            let recorded = self.store.finish_revoke(&work.lease_id, error.clone(), now).await;
            self.revocation_recorded(work, error.as_deref(), recorded).await
        }))
        .await;
    }

    /// A revocation's audit event, told from its work (no read of the lease: on a shared store
    /// that read was a statement per revocation). Never blocks the revocation: a failure is
    /// logged.
    async fn audit_revocation(&self, work: &RevokeWork, outcome: &str, error: Option<&str>) {
        if !self.audit.is_enabled() {
            return;
        }
        let event = json!({
            "time": rfc3339(self.now()),
            "event": "revocation",
            "lease_id": &*work.lease_id,
            "job": &*work.job,
            "policy": work.policy.as_deref(),
            "issuer": work.issuer.as_deref(),
            "reason": work.reason.as_deref(),
            "outcome": outcome,
            "credentials": work.credentials.iter().map(|c| json!({"name": &*c.name, "kind": &*c.kind})).collect::<Vec<_>>(),
            "error": error,
        });
        if let Err(e) = self.audit.write(&event).await {
            tracing::error!(error = %e, lease_id = %work.lease_id, "audit event for a revocation not written (the revocation itself went ahead)");
        }
    }

    /// Revokes each handle at its backend; the first error, if any.
    pub(super) async fn revoke_handles(&self, handles: &[RevokeHandle]) -> Option<String> {
        let mut first_error = None;
        for handle in handles {
            let result = match self.backends.get(&handle.backend) {
                Some(b) => b.revoke(handle).await,
                None => Err(MintError::new(format!("backend `{}` is not loaded", handle.backend))),
            };
            if let Err(e) = result {
                first_error.get_or_insert(format!("backend {}: {}", handle.backend, e.detail));
            }
        }
        first_error
    }

    /// One reaper pass: [`App::reap_due`], then [`App::housekeep`].
    pub async fn reap_once(&self) {
        self.reap_due().await;
        self.housekeep().await;
    }

    /// Leases past their expiry are revoked at their backends (a credential may outlive its
    /// lease: STS sessions last at least 15 minutes), and due retries run. The reaper does this
    /// every second, whatever `reap_interval` says, so a lease ends within about a second of its
    /// expiry (not up to `reap_interval` after it); with nothing due it costs the store an index
    /// probe per kind.
    pub async fn reap_due(&self) {
        let quiet = self.backends.quiet_at_expiry();
        match self.store.claim_due(self.now(), &quiet).await {
            Ok(due) => {
                self.metrics.leases_ended(REASON_EXPIRED, due.expired.len() + due.ended.len());
                // Ended by the claim itself (nothing upstream to call): what follows a confirmed
                // revocation follows them too, the metric, the audit event and the log line.
                let ended =
                    due.ended.iter().map(|work| self.revocation_recorded(work, None, Ok(Some(LeaseState::Expired))));
                futures_util::future::join_all(ended).await;
                self.run_revocations(due.expired.into_iter().chain(due.retries)).await;
            }
            Err(e) => tracing::error!(error = %e, "the lease store did not hand out due expiries and retries"),
        }
    }

    /// Every `reap_interval`: the store and the backends do their housekeeping (pruning,
    /// compaction, the backends' cleanup) and orphaned credentials are revoked.
    pub async fn housekeep(&self) {
        let now = self.now();
        if let Err(e) = self.store.maintain(now).await {
            tracing::error!(error = %e, "lease store maintenance failed");
        }
        // Other replicas sharing the store end leases too; a single broker ends them all itself.
        if self.store.exclusive().is_some() {
            self.learn_ended().await;
        }
        self.backends.maintain(now).await;
        self.revoke_orphans(now).await;
    }

    /// Credentials a backend made for a lease the ledger never recorded (the broker died between
    /// minting and recording): nobody received them, nobody will revoke them otherwise.
    async fn revoke_orphans(&self, now: UnixSeconds) {
        for orphan in self.backends.orphans(now).await {
            match self.store.get(&orphan.lease_id).await {
                Ok(Some(_)) => {} // its lease ends it
                Ok(None) => {
                    let outcome = self.revoke_handles(std::slice::from_ref(&orphan.handle)).await;
                    tracing::warn!(
                        lease_id = %orphan.lease_id,
                        backend = %orphan.handle.backend,
                        revoked = outcome.is_none(),
                        "revoked a credential made for a lease that was never recorded"
                    );
                }
                Err(e) => tracing::error!(error = %e.0, "orphan check skipped: the lease store did not answer"),
            }
        }
    }

    /// At start, once the store is open: every pending revocation is tried at once (whatever
    /// its backoff said) and every expiry that passed while the broker was down fires. Only then
    /// does `/readyz` say ready.
    pub async fn resume(&self) {
        let now = self.now();
        self.adopt_remembered().await;
        self.learn_ended().await;
        let pending = self.store.claim_all_pending(now).await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "pending revocations not resumed; the reaper retries them");
            Vec::new()
        });
        let resumed = pending.len();
        self.run_revocations(pending).await;
        self.reap_once().await;
        self.resumed.store(true, Ordering::Release);
        let leases = self.store.counts().await.map(|c| c.total()).unwrap_or_default();
        tracing::info!(leases, resumed_revocations = resumed, "ledger resumed");
    }

    /// Backends rebuild their in-memory housekeeping (the aws deny-entry cleanup) from every
    /// credential the ledger remembers, in any state: an ended lease's deny entry may still be in
    /// force. That covers every session still alive: an STS session lasts at most max(ttl, 900 s),
    /// so it ends within 900 s of its lease's expiry, and an ended lease is forgotten only
    /// ENDED_RETENTION_SECS (1 h) after that expiry (a pending one never). A dead entry stays in
    /// the document until its hour bucket plus 300 s of skew has passed, up to 1,199 s after its
    /// lease is forgotten; the next cleanup or write on its role drops it. Runs before the first
    /// reap, which forgets.
    async fn adopt_remembered(&self) {
        let adopting = self.backends.adopting();
        if adopting.is_empty() {
            return;
        }
        match self.store.handles_of(&adopting).await {
            Ok(handles) => handles.iter().for_each(|h| self.backends.adopt(h)),
            Err(e) => tracing::error!(error = %e, "remembered credentials not handed to their backends"),
        }
    }

    /// Backends that keep what revoking did in memory (the `ssh` backend's KRL) learn the
    /// credentials of every ended lease the store remembers: at start-up, those ended before it;
    /// on a shared store, at every reaper pass, those the other replicas ended. A lease is
    /// remembered until ENDED_RETENTION_SECS (1 h) after its end, past every certificate's
    /// validity (a certificate ends at its credentials' end, never after the lease's).
    async fn learn_ended(&self) {
        let learning = self.backends.learning_ended();
        if learning.is_empty() {
            return;
        }
        match self.store.ended_handles_of(&learning).await {
            Ok(handles) => handles.iter().for_each(|h| self.backends.learn_ended(h)),
            Err(e) => {
                tracing::error!(error = %e, "ended leases not read for the backends that list them; the next pass tries again")
            }
        }
    }
}
