//! The exchange path, end to end: verify → decide → mint → record. Knows no HTTP.

use crate::clock::{Clock, UnixSeconds, rfc3339};
use crate::dev::DevIssuer;
use crate::error::Error;
use crate::identity::{VerifiedIdentity, Verifier};
use crate::ids::lease_id;
use crate::ledger::{Lease, LeaseCredential, LeaseState, Ledger, RevokeWork};
use crate::metrics::{Gauges, Metrics};
use crate::mint::{Backends, Credential, MintContext, RevokeHandle};
use crate::policy::PolicySet;
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

pub struct App {
    pub verifier: Verifier,
    pub policies: PolicySet,
    pub backends: Backends,
    pub ledger: Ledger,
    pub clock: Arc<dyn Clock>,
    pub metrics: Metrics,
    pub public_url: String,
    pub admin_token_sha256: Option<[u8; 32]>,
    /// Present only in `serve --dev`.
    pub dev: Option<Arc<DevIssuer>>,
}

/// The 201 body of `POST /v1/exchange` (DESIGN §2).
#[derive(Debug, Serialize)]
pub struct ExchangeReply {
    pub lease_id: String,
    pub policy: String,
    pub job: String,
    pub expires_at: String,
    pub credentials: BTreeMap<String, Credential>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct RevokeReply {
    pub revoked: Vec<String>,
    pub pending: Vec<String>,
}

impl App {
    pub fn now(&self) -> UnixSeconds {
        self.clock.now()
    }

    /// `POST /v1/exchange`. Counts the outcome and latency in metrics.
    pub async fn exchange(&self, token: &str, policy: &str, ttl_secs: Option<i64>) -> Result<ExchangeReply, Error> {
        let started = Instant::now();
        let result = self.exchange_inner(token, policy, ttl_secs).await;
        // Bounded label: only loaded policy names, so callers cannot mint new series.
        let label = if self.policies.get(policy).is_some() { policy } else { "unknown" };
        let outcome = match &result {
            Ok(_) => "issued",
            Err(e) => e.code(),
        };
        self.metrics.exchange(label, outcome, started.elapsed().as_secs_f64());
        result
    }

    async fn exchange_inner(&self, token: &str, policy: &str, ttl_secs: Option<i64>) -> Result<ExchangeReply, Error> {
        let now = self.now();
        let identity = self.verifier.verify(token, now).await?;
        let grant = self.policies.decide(policy, &identity, ttl_secs, now)?;
        let id = lease_id(now);
        let ctx = MintContext { lease_id: &id, now };
        let mut minted: Vec<(String, &'static str, Credential, RevokeHandle)> = Vec::new();
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
        for (cred, backend) in plan {
            match backend.mint(&grant, cred, ctx).await {
                Ok(m) => minted.push((cred.name.clone(), backend.kind(), m.credential, m.handle)),
                Err(e) => {
                    // All or nothing: what was already minted for this exchange is revoked.
                    let handles: Vec<RevokeHandle> = minted.into_iter().map(|(_, _, _, h)| h).collect();
                    self.revoke_handles(&handles).await;
                    return Err(Error::Backend { backend: cred.backend.clone(), detail: e.detail });
                }
            }
        }
        let lease = Lease {
            id: id.clone(),
            job: identity.job().to_string(),
            policy: grant.policy().to_string(),
            issuer: identity.issuer().to_string(),
            created_at: now,
            expires_at: grant.expires_at(),
            state: LeaseState::Active,
            credentials: minted
                .iter()
                .map(|(name, kind, c, h)| LeaseCredential {
                    name: name.clone(),
                    kind,
                    revocation: c.revocation,
                    handle: h.clone(),
                })
                .collect(),
        };
        self.ledger.insert(lease);
        let fingerprints: BTreeMap<&str, BTreeMap<&str, String>> =
            minted.iter().map(|(n, _, c, _)| (n.as_str(), c.fingerprints())).collect();
        tracing::info!(
            lease_id = %id, job = %identity.job(), policy = %grant.policy(), issuer = %identity.issuer(),
            token_sha256 = %identity.token_sha256(), ttl_secs = grant.ttl_secs(),
            credentials = %serde_json::to_string(&fingerprints).unwrap_or_default(),
            "issued"
        );
        Ok(ExchangeReply {
            lease_id: id,
            policy: grant.policy().to_string(),
            job: identity.job().to_string(),
            expires_at: rfc3339(grant.expires_at()),
            credentials: minted.into_iter().map(|(n, _, c, _)| (n, c)).collect(),
        })
    }

    /// `POST /v1/revoke`: the job's own token ends its leases. A lease of another job, or an
    /// unknown id, is neither revoked nor reported (no oracle).
    pub async fn revoke(&self, token: &str, lease: Option<&str>) -> Result<RevokeReply, Error> {
        let now = self.now();
        let identity = self.verifier.verify(token, now).await?;
        let ids = match lease {
            Some(id) if crate::ids::is_lease_id(id) => self.own_lease(&identity, id).into_iter().collect(),
            Some(_) => Vec::new(),
            None => self.ledger.live_of_job(identity.job(), now),
        };
        let mut reply = RevokeReply { revoked: Vec::new(), pending: Vec::new() };
        for id in ids {
            match self.ledger.begin_revoke(&id) {
                Some(work) => {
                    if self.run_revocation(work, "job").await {
                        reply.revoked.push(id);
                    } else {
                        reply.pending.push(id);
                    }
                }
                // Idempotent: already ended by an earlier call, a webhook or expiry.
                None => match self.ledger.state(&id) {
                    Some(LeaseState::Revoking) => reply.pending.push(id),
                    _ => reply.revoked.push(id),
                },
            }
        }
        tracing::info!(job = %identity.job(), revoked = ?reply.revoked, pending = ?reply.pending, "revoke by job");
        Ok(reply)
    }

    fn own_lease(&self, identity: &VerifiedIdentity, id: &str) -> Option<String> {
        self.ledger.get(id).filter(|l| l.job == identity.job()).map(|l| l.id)
    }

    /// Revokes every credential of a lease at its backend, then records the outcome (the backend
    /// first, so the ledger never says revoked while a credential still works).
    async fn run_revocation(&self, work: RevokeWork, reason: &str) -> bool {
        let handles: Vec<RevokeHandle> = work.credentials.iter().map(|c| c.handle.clone()).collect();
        let all_ok = self.revoke_handles(&handles).await;
        self.ledger.finish_revoke(&work.lease_id, all_ok);
        self.metrics.revocation(if all_ok { "revoked" } else { "pending" });
        tracing::info!(lease_id = %work.lease_id, reason, all_ok, "lease revocation");
        all_ok
    }

    async fn revoke_handles(&self, handles: &[RevokeHandle]) -> bool {
        let mut all_ok = true;
        for handle in handles {
            let result = match self.backends.get(&handle.backend) {
                Some(b) => b.revoke(handle).await,
                None => Err(crate::mint::MintError { detail: format!("backend `{}` is not loaded", handle.backend) }),
            };
            if let Err(e) = result {
                tracing::warn!(backend = %handle.backend, detail = %e.detail, "credential revocation failed; will retry");
                all_ok = false;
            }
        }
        all_ok
    }

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
        let listed = lease.credentials.iter().any(|c| c.handle.data.get("jti").and_then(Value::as_str) == Some(jti));
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

    /// One reaper pass: leases past their expiry are revoked at their backends (a credential may
    /// outlive its lease: STS sessions last at least 15 minutes), then pending revocations are
    /// retried.
    pub async fn reap_once(&self) {
        let (expired, pending) = self.ledger.reap(self.now());
        for work in expired {
            let handles: Vec<RevokeHandle> = work.credentials.iter().map(|c| c.handle.clone()).collect();
            let all_ok = self.revoke_handles(&handles).await;
            self.ledger.finish_expiry(&work.lease_id, all_ok);
            self.metrics.revocation(if all_ok { "expired" } else { "pending" });
        }
        for id in pending {
            if let Some(work) = self.ledger.retry_work(&id) {
                self.run_revocation(work, "retry").await;
            }
        }
    }

    /// `/readyz`: policies loaded (the server does not start otherwise) and every issuer's keys
    /// fetched at least once.
    pub fn readiness(&self) -> (bool, Value) {
        let issuers: BTreeMap<&str, bool> =
            self.verifier.issuers().map(|i| (i.config.name.as_str(), i.jwks.is_loaded())).collect();
        let ready = issuers.values().all(|ok| *ok);
        (ready, json!({"ready": ready, "policies": self.policies.len(), "ledger": "open", "issuer_keys": issuers}))
    }

    pub fn metrics_text(&self) -> String {
        let now = self.now();
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
        self.metrics.render(&Gauges {
            live_leases: self.ledger.live_count(now),
            pending_revocations: self.ledger.count_state(LeaseState::Revoking),
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
