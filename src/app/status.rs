//! What callers may read through the façade: leases, introspection of broker JWTs, readiness,
//! metrics, the admin token check, the explain trace, and the broker's own keys.

use super::App;
use crate::claims::Claims;
use crate::error::Error;
use crate::ledger::{Health, Lease, LeaseFilter, LeaseState};
use crate::metrics::Gauges;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

impl App {
    /// One lease as the store has it now.
    pub async fn lease(&self, id: &str) -> Result<Option<Lease>, Error> {
        self.store.get(id).await.map_err(|e| Error::Unavailable(e.0))
    }

    /// Leases matching `filter`, oldest first, at most `limit`.
    pub async fn leases(&self, filter: &LeaseFilter, limit: usize) -> Result<Vec<Lease>, Error> {
        self.store.list(filter, limit).await.map_err(|e| Error::Unavailable(e.0))
    }

    /// RFC 7662 introspection of a broker-signed JWT: active only if the signature is ours, it
    /// has not expired, and its lease is live and lists this token's `jti`.
    pub async fn introspect(&self, token: &str) -> Value {
        let now = self.now();
        let inactive = json!({"active": false});
        let Some(signer) = self.backends.signers().iter().find(|s| s.owns(token)) else { return inactive };
        // Signature, `exp`, its lease live and listing its `jti`, and for a token exchange's
        // token every lease above it (`lease_chain`) live. Any failure, a store that cannot
        // answer included, is not a yes.
        let Ok(super::token_exchange::Issued { claims, .. }) = self.issued_token(signer, token, "token", now).await
        else {
            return inactive;
        };
        let mut out = json!({"active": true, "token_type": "Bearer"});
        for k in ["iss", "sub", "aud", "exp", "iat", "nbf", "jti", "lease_id", "policy", "scope", "act", "tool", "data"]
        {
            if let (Some(v), Some(obj)) = (claims.get(k), out.as_object_mut()) {
                obj.insert(k.to_string(), v.clone());
            }
        }
        out
    }

    /// `/readyz`: policies loaded (the server does not start otherwise), the store opened and
    /// resumed and writable, and every issuer's keys fetched at least once.
    pub fn readiness(&self) -> (bool, Value) {
        let issuers: BTreeMap<&str, bool> =
            self.verifier.issuers().map(|i| (i.config.name.as_str(), i.jwks.is_loaded())).collect();
        let resumed = self.resumed.load(Ordering::Acquire);
        let health = self.store.health();
        let ready = resumed && health == Health::Open && issuers.values().all(|ok| *ok);
        let ledger = if resumed { health.as_str() } else { "resuming" };
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

    pub async fn metrics_text(&self) -> String {
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
        // A store that cannot count reports nothing live rather than a stale figure; /readyz
        // says why.
        let mut counts = self.store.counts().await.unwrap_or_default();
        // Every backend has a line, 0 included, whether or not the store listed it.
        for name in self.backends.names() {
            if !counts.active_by_backend.iter().any(|(b, _)| b == name) {
                counts.active_by_backend.push((name.to_string(), 0));
            }
        }
        counts.active_by_backend.sort();
        self.metrics.render(&Gauges {
            live_leases: counts.of(LeaseState::Active),
            pending_revocations: counts.of(LeaseState::Revoking),
            irrevocable: counts.of(LeaseState::Irrevocable),
            live_by_backend: counts.active_by_backend,
            policies_loaded: self.policies.current().len(),
            policy_generation: status.generation,
            policies_reload_failing: status.last_outcome == "failed",
            audit_failures: self.audit.failures.load(Ordering::Relaxed),
            jwks,
            github_rate_limit: self.backends.rate_limits(),
            rate_limited: self.limits.refused(),
            overloaded: self.limits.overloaded(),
            limits_tracked: self.limits.tracked(),
            compactions: self.store.compactions(),
        })
    }

    /// Is an admin token configured (the admin API, and the console that drives it, are on)?
    pub fn admin_enabled(&self) -> bool {
        self.admin_token_sha256.is_some()
    }

    /// Is this the admin token? Compared as SHA-256 digests in constant time.
    pub fn is_admin(&self, bearer: &str) -> bool {
        let Some(want) = &self.admin_token_sha256 else { return false };
        let got = ring::digest::digest(&ring::digest::SHA256, bearer.as_bytes());
        crate::secret::constant_time_eq(got.as_ref(), want)
    }

    /// The rule-by-rule trace of `policy` against `claims` from `issuer` (default: the
    /// configured issuer whose url is `claims.iss`, else the policy's own). Nothing is minted.
    /// `NotFound` for an unknown policy.
    /// With `actor` (its issuer, if named, and claims), the actor rules are evaluated too.
    pub fn explain(
        &self,
        policy: &str,
        issuer: Option<String>,
        claims: &Claims,
        actor: Option<(Option<String>, &Claims)>,
    ) -> Result<Value, Error> {
        let policies = self.policies.current();
        let policy = policies.get(policy).ok_or(Error::NotFound)?;
        let configs = || self.verifier.issuers().map(|i| &i.config);
        let issuer = issuer.unwrap_or_else(|| policy.claims_issuer(claims, configs()));
        let actor = actor.map(|(named, c)| (named.unwrap_or_else(|| crate::policy::issuer_of(c, configs())), c));
        let trace = policy.explain_with_actor(&issuer, claims, actor.as_ref().map(|(i, c)| (i.as_str(), *c)));
        serde_json::to_value(trace).map_err(|e| Error::Internal(e.to_string()))
    }

    /// The audit events of a lease, read back from the end of the audit file (the last 16 MiB,
    /// the latest 200 events); `None` when no audit file is configured.
    pub async fn lease_audit(&self, lease_id: &str) -> Result<Option<crate::audit::Found>, Error> {
        let Some(path) = self.audit.path().map(std::path::Path::to_path_buf) else { return Ok(None) };
        let id = lease_id.to_string();
        let found = tokio::task::spawn_blocking(move || crate::audit::events_of_lease(&path, &id, 16 << 20, 200))
            .await
            .map_err(|e| Error::Internal(format!("audit read failed: {e}")))?;
        found.map(Some).map_err(Error::Unavailable)
    }

    /// The console's recent refusals, newest first.
    pub fn recent_refusals(&self) -> Vec<super::recent::Refusal> {
        self.recent.refusals()
    }

    /// Every loaded policy with its text, in name order (the console's policy preview).
    pub fn policy_texts(&self) -> Value {
        let set = self.policies.current();
        let list: Vec<Value> = set
            .iter()
            .map(|p| {
                let file = p.source.display().to_string();
                // Built into the binary (`serve --dev`'s `dev`): not a file a change could edit.
                let builtin = file.starts_with("<built-in");
                json!({"name": &*p.name, "issuer": p.issuer, "file": file, "builtin": builtin, "text": &*p.text})
            })
            .collect();
        json!({"policies": list})
    }

    /// What the console's health view shows: readiness, the leases by state, each issuer's key
    /// set and its age, each backend with its guarantee and live leases, and the outcomes of
    /// the last hour by minute.
    pub async fn overview(&self) -> Value {
        let now = self.now();
        let (ready, readiness) = self.readiness();
        let counts = self.store.counts().await.ok();
        let by_state: BTreeMap<&str, usize> = match &counts {
            Some(c) => LeaseState::ALL.iter().map(|s| (s.as_str(), c.of(*s))).collect(),
            None => BTreeMap::new(),
        };
        let mut issuers: Vec<Value> = self
            .verifier
            .issuers()
            .map(|i| {
                let (loaded_at, keys) = i.jwks.loaded();
                json!({
                    "name": i.config.name,
                    "platform": i.config.platform.as_str(),
                    "url": i.config.url,
                    "keys": keys,
                    "static": i.jwks.is_static(),
                    "loaded_at": loaded_at.map(crate::clock::rfc3339),
                    "age_secs": loaded_at.map(|at| now - at),
                    "fetch_failures": i.jwks.fetch_failures.load(Ordering::Relaxed),
                })
            })
            .collect();
        issuers.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        let live = |name: &str| {
            counts
                .as_ref()
                .and_then(|c| c.active_by_backend.iter().find(|(b, _)| b == name).map(|(_, n)| *n))
                .unwrap_or(0)
        };
        let backends: Vec<Value> = self
            .backends
            .names()
            .filter_map(|name| self.backends.get(name).map(|b| (name, b)))
            .map(|(name, b)| json!({"name": name, "kind": b.kind(), "revocation": b.revocation(), "live": live(name)}))
            .collect();
        json!({
            "ready": ready,
            "readiness": readiness,
            "leases": by_state,
            "store_answered": counts.is_some(),
            "issuers": issuers,
            "backends": backends,
            "policies": self.policies.current().names(),
            "minutes": self.recent.series(now),
        })
    }

    /// A platform job key (`github:…`) as the leases of issuer `issuer` carry it (webhooks).
    pub fn job_key(&self, issuer: &str, key: String) -> String {
        match self.verifier.issuer(issuer) {
            Some(issuer) => issuer.job_key(key),
            None => key,
        }
    }

    /// The broker's JWKS: the public key of every JWT backend.
    pub fn jwks(&self) -> Value {
        self.backends.jwks()
    }
}
