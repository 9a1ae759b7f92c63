//! The exchange path, end to end: verify → decide → mint → record → audit; and every way a
//! lease ends. Knows no HTTP. [`policies`] holds the live policy set and its reloads.

pub mod policies;

use crate::audit::Audit;
use crate::clock::{Clock, UnixSeconds, rfc3339};
use crate::dev::DevIssuer;
use crate::error::Error;
use crate::identity::{VerifiedIdentity, Verifier};
use crate::ids::lease_id;
use crate::ledger::{LeaseCredential, LeaseFilter, LeaseState, Ledger, REASON_EXPIRED, RevokeWork};
use crate::metrics::{Gauges, Metrics};
use crate::mint::{Backends, Credential, MintContext, RevokeHandle};
use crate::policy::{Denial, Grant, PolicySet};
use policies::LivePolicies;
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

pub struct App {
    pub verifier: Verifier,
    pub policies: LivePolicies,
    pub backends: Backends,
    pub ledger: Ledger,
    pub clock: Arc<dyn Clock>,
    pub metrics: Metrics,
    pub public_url: String,
    pub admin_token_sha256: Option<[u8; 32]>,
    /// Present only in `serve --dev`.
    pub dev: Option<Arc<DevIssuer>>,
    /// Journal replayed and every pending revocation and passed expiry resumed.
    pub resumed: AtomicBool,
    /// Compact the journal after this many appended bytes.
    pub compact_bytes: u64,
    pub hooks: crate::config::HooksConfig,
    pub audit: Audit,
}

/// The 201 body of `POST /v1/exchange` (DESIGN §2).
#[derive(Debug, Serialize)]
pub struct ExchangeReply {
    pub lease_id: String,
    pub policy: String,
    pub job: String,
    pub expires_at: String,
    pub credentials: BTreeMap<String, Credential>,
    /// For the audit event; not part of the reply.
    #[serde(skip)]
    pub ttl_secs: i64,
}

impl ExchangeReply {
    /// The reply as POSIX `sh` assignments (`crate::env_format`): every field single-quoted, so no
    /// character in a value is ever interpreted by the shell.
    pub fn to_env(&self) -> String {
        crate::env_format::render(&serde_json::to_value(self).unwrap_or_default())
    }
}

/// One exchange's audit event, serialised straight from borrowed parts (building it as nested
/// `serde_json::Value` maps was a tenth of the broker's CPU per exchange).
#[derive(Serialize)]
struct ExchangeEvent<'a> {
    time: String,
    /// `exchange` or `denial`.
    event: &'static str,
    request_id: &'a str,
    policy: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    issuer: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    job: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_sha256: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    claims: Option<crate::audit::Selected<'a>>,
    /// `allow`, `deny` or `error`.
    decision: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deciding_claim: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lease_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl_secs: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    credentials: Option<BTreeMap<&'a str, CredentialAudit>>,
}

/// A credential in an audit event: its kind and the SHA-256 of each secret field.
#[derive(Serialize)]
struct CredentialAudit {
    kind: &'static str,
    sha256: BTreeMap<&'static str, String>,
}

/// Why a lease ended when its exchange could not be audited.
pub const REASON_AUDIT_UNAVAILABLE: &str = "audit-unavailable";

#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct RevokeReply {
    pub revoked: Vec<String>,
    pub pending: Vec<String>,
}

impl App {
    pub fn now(&self) -> UnixSeconds {
        self.clock.now()
    }

    // ---- issuing -----------------------------------------------------------------------

    /// `POST /v1/exchange`. Audited (fail closed) and counted in metrics.
    pub async fn exchange(
        &self,
        token: &str,
        policy: &str,
        ttl_secs: Option<i64>,
        request_id: &str,
    ) -> Result<ExchangeReply, Error> {
        let started = Instant::now();
        // The set in use now; a reload during this exchange does not change its decision.
        let policies = self.policies.current();
        let mut identity = None;
        let result = self.exchange_inner(&policies, token, policy, ttl_secs, &mut identity).await;
        let result = self.audit_exchange(request_id, policy, identity.as_ref(), result).await;
        // Bounded label: only loaded policy names, so callers cannot mint new series.
        let label = if policies.get(policy).is_some() { policy } else { "unknown" };
        let outcome = match &result {
            Ok(_) => "issued",
            Err(e) => e.code(),
        };
        self.metrics.exchange(label, outcome, started.elapsed().as_secs_f64());
        result
    }

    async fn exchange_inner(
        &self,
        policies: &PolicySet,
        token: &str,
        policy: &str,
        ttl_secs: Option<i64>,
        verified: &mut Option<VerifiedIdentity>,
    ) -> Result<ExchangeReply, Error> {
        let now = self.now();
        let identity = verified.insert(self.verifier.verify(token, now).await?);
        let grant = policies.decide(policy, identity, ttl_secs, now)?;
        let identity = &*identity;
        let jti = self.reserve_jti(identity, grant.policy())?;
        let result = self.mint_and_record(identity, &grant, jti.as_ref(), now).await;
        if let (Err(_), Some((key, _))) = (&result, &jti) {
            self.ledger.release_jti(key);
        }
        result
    }

    /// Replay protection: a token's `jti` serves one exchange per policy (per issuer setting).
    fn reserve_jti(&self, identity: &VerifiedIdentity, policy: &str) -> Result<Option<(String, UnixSeconds)>, Error> {
        let Some(issuer) = self.verifier.issuer(identity.issuer()) else { return Ok(None) };
        if !issuer.config.replay_protection {
            return Ok(None);
        }
        let jti = identity.jti().ok_or_else(|| Denial::replayed(policy, true))?;
        let key = crate::secret::sha256_hex(format!("{}\0{policy}\0{jti}", identity.issuer()).as_bytes());
        // Kept as long as the token could still be accepted.
        let exp = identity.expires_at() + issuer.config.leeway_secs;
        if !self.ledger.reserve_jti(&key, exp) {
            return Err(Denial::replayed(policy, false).into());
        }
        Ok(Some((key, exp)))
    }

    async fn mint_and_record(
        &self,
        identity: &VerifiedIdentity,
        grant: &Grant,
        jti: Option<&(String, UnixSeconds)>,
        now: UnixSeconds,
    ) -> Result<ExchangeReply, Error> {
        let id = lease_id(now);
        let minted = self.mint_all(grant, &id, now).await?;
        let lease = crate::ledger::Lease {
            id: id.as_str().into(),
            job: identity.job().into(),
            policy: crate::ledger::name::intern(grant.policy()),
            issuer: crate::ledger::name::intern(identity.issuer()),
            created_at: now,
            expires_at: grant.expires_at(),
            state: LeaseState::Active,
            reason: None,
            attempts: 0,
            next_attempt_at: 0,
            last_error: None,
            credentials: minted
                .iter()
                .map(|(name, kind, c, h)| LeaseCredential::new(name, kind, c.revocation, h))
                .collect(),
            claims: crate::ledger::ClaimSnapshot::new(identity.claims()),
        };
        // Durable before the reply. If it cannot be recorded, nothing minted may escape: revoke.
        if let Err(e) = self.ledger.record_created(lease, jti.map(|(k, exp)| (k.as_str(), *exp))).await {
            let handles: Vec<RevokeHandle> = minted.into_iter().map(|(_, _, _, h)| h).collect();
            let revoked = self.revoke_handles(&handles).await.is_none();
            return Err(Error::Unavailable(format!(
                "lease {id} not recorded ({e}); minted credentials revoked: {revoked}"
            )));
        }
        tracing::Span::current().record("lease_id", tracing::field::display(&id));
        // The audit event is the record of what was issued (job, policy, token and credential
        // fingerprints). Without an audit file this line is; with one, writing the same again
        // cost a tenth of the broker's CPU per exchange (docs/benchmarks.md).
        if !self.audit.is_enabled() {
            let fingerprints: BTreeMap<&str, BTreeMap<&str, String>> =
                minted.iter().map(|(n, _, c, _)| (n.as_str(), c.fingerprints())).collect();
            tracing::info!(
                lease_id = %id, job = %identity.job(), policy = %grant.policy(), issuer = %identity.issuer(),
                token_sha256 = %identity.token_sha256(), ttl_secs = grant.ttl_secs(),
                credentials = %serde_json::to_string(&fingerprints).unwrap_or_default(),
                "issued"
            );
        }
        Ok(ExchangeReply {
            lease_id: id,
            policy: grant.policy().to_string(),
            job: identity.job().to_string(),
            expires_at: rfc3339(grant.expires_at()),
            credentials: minted.into_iter().map(|(n, _, c, _)| (n, c)).collect(),
            ttl_secs: grant.ttl_secs(),
        })
    }

    /// Writes the exchange's audit event: `exchange` (issued, or failed in the broker or a
    /// backend) or `denial` (invalid token, policy said no). Fail closed: when the event cannot
    /// be written, an issued lease is revoked before anything leaves, and a denial becomes 503.
    async fn audit_exchange(
        &self,
        request_id: &str,
        policy: &str,
        identity: Option<&VerifiedIdentity>,
        result: Result<ExchangeReply, Error>,
    ) -> Result<ExchangeReply, Error> {
        if !self.audit.is_enabled() {
            return result;
        }
        let mut event = ExchangeEvent {
            time: rfc3339(self.now()),
            event: "exchange",
            request_id,
            // The caller's text when the policy is unknown: bounded, JSON-escaped.
            policy: crate::clock::truncate(policy, 64),
            issuer: identity.map(VerifiedIdentity::issuer),
            job: identity.map(VerifiedIdentity::job),
            token_sha256: identity.map(VerifiedIdentity::token_sha256),
            claims: identity.map(|i| self.audit.selected(i.claims())),
            decision: "allow",
            code: None,
            deciding_claim: None,
            reason: None,
            lease_id: None,
            ttl_secs: None,
            expires_at: None,
            credentials: None,
        };
        match &result {
            Ok(reply) => {
                event.lease_id = Some(&reply.lease_id);
                event.ttl_secs = Some(reply.ttl_secs);
                event.expires_at = Some(&reply.expires_at);
                event.credentials = Some(
                    reply
                        .credentials
                        .iter()
                        .map(|(name, c)| (name.as_str(), CredentialAudit { kind: c.kind, sha256: c.fingerprints() }))
                        .collect(),
                );
            }
            Err(Error::Denied(d)) => {
                (event.event, event.decision, event.code) = ("denial", "deny", Some("policy_denied"));
                event.deciding_claim = Some(&d.claim);
                event.reason = Some(crate::clock::truncate(&d.log_detail(), 200).to_string());
            }
            Err(e @ Error::InvalidToken(_)) => {
                (event.event, event.decision, event.code) = ("denial", "deny", Some(e.code()));
                event.reason = Some(e.log_detail());
            }
            Err(e) => (event.decision, event.code) = ("error", Some(e.code())),
        }
        let Err(e) = self.audit.write(&event).await else { return result };
        tracing::error!(error = %e, "audit event not written; failing the exchange closed");
        match result {
            Ok(reply) => {
                // Recorded but not audited: revoke before a single credential leaves.
                let ended = self.end_leases(vec![reply.lease_id.clone()], REASON_AUDIT_UNAVAILABLE).await;
                Err(Error::Unavailable(format!(
                    "{e}; lease {} revoked: {}",
                    reply.lease_id,
                    if ended.pending.is_empty() { "yes" } else { "pending (retried)" }
                )))
            }
            Err(Error::Denied(_) | Error::InvalidToken(_)) => Err(Error::Unavailable(e)),
            Err(other) => Err(other),
        }
    }

    /// Mints every credential of the grant, all or nothing.
    async fn mint_all(
        &self,
        grant: &Grant,
        lease_id: &str,
        now: UnixSeconds,
    ) -> Result<Vec<(String, &'static str, Credential, RevokeHandle)>, Error> {
        // Every backend is resolved before anything is minted, so a missing one cannot strand
        // credentials minted earlier in this exchange.
        let plan = grant
            .credentials()
            .iter()
            .map(|cred| {
                let backend = self.backends.get(&cred.backend).ok_or_else(|| {
                    Error::Internal(format!("policy names backend `{}` that is not loaded", cred.backend))
                })?;
                Ok((cred, backend))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let ctx = MintContext { lease_id, now };
        let mut minted = Vec::new();
        for (cred, backend) in plan {
            match backend.mint(grant, cred, ctx).await {
                Ok(m) => minted.push((cred.name.clone(), backend.kind(), m.credential, m.handle)),
                Err(e) => {
                    let handles: Vec<RevokeHandle> = minted.into_iter().map(|(_, _, _, h)| h).collect();
                    self.revoke_handles(&handles).await;
                    return Err(Error::Backend { backend: cred.backend.clone(), detail: e.detail });
                }
            }
        }
        Ok(minted)
    }

    // ---- ending ------------------------------------------------------------------------

    /// `POST /v1/revoke`: the job's own token ends its leases. A lease of another job, or an
    /// unknown id, is neither revoked nor reported (no oracle). Works with a token whose `jti`
    /// was already used for an exchange.
    pub async fn revoke(&self, token: &str, lease: Option<&str>) -> Result<RevokeReply, Error> {
        let now = self.now();
        let identity = self.verifier.verify(token, now).await?;
        let ids = match lease {
            Some(id) if crate::ids::is_lease_id(id) => self.own_lease(&identity, id).into_iter().collect(),
            Some(_) => Vec::new(),
            None => self.ledger.live_of_job(identity.job(), now),
        };
        let reply = self.end_leases(ids, "job").await;
        tracing::info!(job = %identity.job(), revoked = ?reply.revoked, pending = ?reply.pending, "revoke by job");
        Ok(reply)
    }

    fn own_lease(&self, identity: &VerifiedIdentity, id: &str) -> Option<String> {
        self.ledger.get(id).filter(|l| *l.job == *identity.job()).map(|l| l.id.to_string())
    }

    /// Every live lease of `job` (webhooks, admin).
    pub async fn end_job(&self, job: &str, reason: &str) -> RevokeReply {
        let ids = self.ledger.live_of_job(job, self.now());
        self.end_leases(ids, reason).await
    }

    /// Every live lease matching `filter` (admin: a policy, a repository, an actor).
    pub async fn end_matching(&self, filter: &LeaseFilter, reason: &str) -> RevokeReply {
        let now = self.now();
        let ids: Vec<String> = self
            .ledger
            .list(filter, usize::MAX)
            .into_iter()
            .filter(|l| l.is_live(now))
            .map(|l| l.id.to_string())
            .collect();
        self.end_leases(ids, reason).await
    }

    /// Ends each lease: revoked at its backends, then recorded. Already-ended leases are
    /// reported as they stand (revoke is idempotent).
    pub async fn end_leases(&self, ids: Vec<String>, reason: &str) -> RevokeReply {
        let mut reply = RevokeReply::default();
        for id in ids {
            let state = match self.begin_ending(&id, reason, self.now()).await {
                Some(work) => self.run_revocation(work).await,
                None => match self.ledger.state(&id) {
                    Some(state) => state,
                    None => continue,
                },
            };
            if state.is_pending() { reply.pending.push(id) } else { reply.revoked.push(id) }
        }
        reply
    }

    /// Starts ending an active lease (`None` if it is not active: someone else ended it), and
    /// counts it under its reason: the one place every way a lease ends goes through.
    async fn begin_ending(&self, id: &str, reason: &str, now: UnixSeconds) -> Option<RevokeWork> {
        let work = self.ledger.begin_revoke(id, reason, now).await?;
        self.metrics.leases_ended(reason, 1);
        Some(work)
    }

    /// Revokes every credential of a lease at its backend first, then records the outcome, so the
    /// ledger never says revoked while a credential still works.
    async fn run_revocation(&self, work: RevokeWork) -> LeaseState {
        let handles: Vec<RevokeHandle> = work.credentials.iter().map(|c| c.handle()).collect();
        let error = self.revoke_handles(&handles).await;
        let state = self.ledger.finish_revoke(&work.lease_id, error.clone(), self.now()).await;
        self.metrics.revocation(state.as_str());
        self.audit_revocation(&work.lease_id, state, error.as_deref()).await;
        match &error {
            None => tracing::info!(lease_id = %work.lease_id, state = state.as_str(), "lease ended"),
            Some(e) => {
                tracing::warn!(lease_id = %work.lease_id, state = state.as_str(), error = %e, "lease revocation failed; will retry")
            }
        }
        state
    }

    /// A revocation's audit event. Never blocks the revocation: a failure is logged.
    async fn audit_revocation(&self, lease_id: &str, state: LeaseState, error: Option<&str>) {
        if !self.audit.is_enabled() {
            return;
        }
        let lease = self.ledger.get(lease_id);
        let event = json!({
            "time": rfc3339(self.now()),
            "event": "revocation",
            "lease_id": lease_id,
            "job": lease.as_ref().map(|l| &*l.job),
            "policy": lease.as_ref().map(|l| &*l.policy),
            "issuer": lease.as_ref().map(|l| &*l.issuer),
            "reason": lease.as_ref().and_then(|l| l.reason.as_deref()),
            "outcome": state.as_str(),
            "credentials": lease.as_ref().map(|l| l.credentials.iter().map(|c| json!({"name": &*c.name, "kind": &*c.kind})).collect::<Vec<_>>()),
            "error": error,
        });
        if let Err(e) = self.audit.write(&event).await {
            tracing::error!(error = %e, lease_id, "audit event for a revocation not written (the revocation itself went ahead)");
        }
    }

    /// Revokes each handle at its backend; the first error, if any.
    async fn revoke_handles(&self, handles: &[RevokeHandle]) -> Option<String> {
        let mut first_error = None;
        for handle in handles {
            let result = match self.backends.get(&handle.backend) {
                Some(b) => b.revoke(handle).await,
                None => Err(crate::mint::MintError { detail: format!("backend `{}` is not loaded", handle.backend) }),
            };
            if let Err(e) = result {
                first_error.get_or_insert(format!("backend {}: {}", handle.backend, e.detail));
            }
        }
        first_error
    }

    /// One reaper pass: leases past their expiry are revoked at their backends (a credential may
    /// outlive its lease: STS sessions last at least 15 minutes), due retries run, ended leases
    /// and spent `jti`s are forgotten, and the journal is compacted when it has grown.
    pub async fn reap_once(&self) {
        let now = self.now();
        for id in self.ledger.due_expiries(now) {
            if let Some(work) = self.begin_ending(&id, REASON_EXPIRED, now).await {
                self.run_revocation(work).await;
            }
        }
        for work in self.ledger.due_retries(now) {
            self.run_revocation(work).await;
        }
        self.ledger.forget_ended(now);
        self.backends.maintain(now).await;
        self.compact_if_grown().await;
    }

    async fn compact_if_grown(&self) {
        let Some(journal) = self.ledger.journal() else { return };
        if journal.stats().bytes_since_compaction.load(Ordering::Relaxed) < self.compact_bytes {
            return;
        }
        let snapshot = self.ledger.snapshot();
        let records = snapshot.len();
        match journal.compact(snapshot).await {
            Ok(()) => tracing::info!(records, "journal compacted"),
            Err(e) => tracing::error!(error = %e, "journal compaction failed; appends continue on the old journal"),
        }
    }

    /// At start, after the journal replay: every pending revocation is tried at once (whatever
    /// its backoff said) and every expiry that passed while the broker was down fires. Only then
    /// does `/readyz` say ready.
    pub async fn resume(&self) {
        // Backends rebuild their in-memory housekeeping (the aws deny-entry cleanup) from every
        // credential the ledger remembers, in any state: an ended lease's deny entry may still be
        // in force. That covers every session still alive: an STS session lasts at most
        // max(ttl, 900 s), so it ends within 900 s of its lease's expiry, and an ended lease is
        // forgotten only ENDED_RETENTION_SECS (1 h) after that expiry (a pending one never). A
        // dead entry stays in the document until its hour bucket plus 300 s of skew has passed,
        // up to 1,199 s after its lease is forgotten; the next cleanup or write on its role drops
        // it. Adopt before the reap below, which forgets.
        for lease in self.ledger.list(&LeaseFilter::default(), usize::MAX) {
            lease.credentials.iter().for_each(|c| self.backends.adopt(&c.handle()));
        }
        let pending = self.ledger.all_pending();
        let resumed = pending.len();
        for work in pending {
            self.run_revocation(work).await;
        }
        self.reap_once().await;
        self.resumed.store(true, Ordering::Release);
        tracing::info!(leases = self.ledger.len(), resumed_revocations = resumed, "ledger resumed");
    }

    // ---- reading -----------------------------------------------------------------------

    /// RFC 7662 introspection of a broker-signed JWT: active only if the signature is ours, it
    /// has not expired, and its lease is live and lists this token's `jti`.
    pub fn introspect(&self, token: &str) -> Value {
        let now = self.now();
        let inactive = json!({"active": false});
        let Some(signer) = self.backends.signers().iter().find(|s| s.owns(token)) else { return inactive };
        let Some(claims) = signer.verify(token) else { return inactive };
        let exp = claims.get("exp").and_then(Value::as_i64).unwrap_or(0);
        let lease_id = claims.get("lease_id").and_then(Value::as_str).unwrap_or_default();
        let jti = claims.get("jti").and_then(Value::as_str).unwrap_or_default();
        let Some(lease) = self.ledger.get(lease_id) else { return inactive };
        let listed = lease.credentials.iter().any(|c| c.data().get("jti").and_then(Value::as_str) == Some(jti));
        if now >= exp || !lease.is_live(now) || !listed {
            return inactive;
        }
        let mut out = json!({"active": true, "token_type": "Bearer"});
        for k in ["iss", "sub", "aud", "exp", "iat", "nbf", "jti", "lease_id", "policy"] {
            if let (Some(v), Some(obj)) = (claims.get(k), out.as_object_mut()) {
                obj.insert(k.to_string(), v.clone());
            }
        }
        out
    }

    /// `/readyz`: policies loaded (the server does not start otherwise), the ledger replayed and
    /// resumed, the journal writable, and every issuer's keys fetched at least once.
    pub fn readiness(&self) -> (bool, Value) {
        let issuers: BTreeMap<&str, bool> =
            self.verifier.issuers().map(|i| (i.config.name.as_str(), i.jwks.is_loaded())).collect();
        let resumed = self.resumed.load(Ordering::Acquire);
        let journal_ok = self.ledger.journal().is_none_or(|j| !j.stats().broken.load(Ordering::Acquire));
        let ready = resumed && journal_ok && issuers.values().all(|ok| *ok);
        let ledger = match (resumed, journal_ok) {
            (false, _) => "resuming",
            (true, false) => "journal-broken",
            (true, true) => "open",
        };
        let status = self.policies.status();
        let policies = json!({
            "loaded": self.policies.current().len(),
            "generation": status.generation,
            "loaded_at": status.loaded_at,
            "last_reload": status.last_outcome,
            "last_reload_at": status.last_attempt_at,
            "errors": status.errors,
        });
        // A failed reload does not make the broker unready: it keeps serving the last good set.
        (ready, json!({"ready": ready, "policies": policies, "ledger": ledger, "issuer_keys": issuers}))
    }

    pub fn metrics_text(&self) -> String {
        let jwks = self
            .verifier
            .issuers()
            .map(|i| {
                (
                    i.config.name.clone(),
                    i.jwks.fetches.load(Ordering::Relaxed),
                    i.jwks.fetch_failures.load(Ordering::Relaxed),
                )
            })
            .collect();
        let status = self.policies.status();
        self.metrics.render(&Gauges {
            live_leases: self.ledger.count(LeaseState::Active),
            pending_revocations: self.ledger.count(LeaseState::Revoking),
            irrevocable: self.ledger.count(LeaseState::Irrevocable),
            live_by_backend: self.ledger.active_by_backend(),
            policies_loaded: self.policies.current().len(),
            policy_generation: status.generation,
            policies_reload_failing: status.last_outcome == "failed",
            audit_failures: self.audit.failures.load(Ordering::Relaxed),
            jwks,
        })
    }

    /// Is this the admin token? Compared as SHA-256 digests in constant time.
    pub fn is_admin(&self, bearer: &str) -> bool {
        let Some(want) = &self.admin_token_sha256 else { return false };
        let got = ring::digest::digest(&ring::digest::SHA256, bearer.as_bytes());
        crate::secret::constant_time_eq(got.as_ref(), want)
    }
}
