//! `POST /v1/exchange`, end to end: verify → decide → (replay check) → mint → record → audit.
//!
//! Nothing is minted until the policy has returned a `Grant`; nothing leaves until the lease is
//! durable in the store and the exchange is audited. When either fails, whatever was minted is
//! revoked first.

use super::App;
use super::audit_event::ExchangeEvent;
use crate::clock::{UnixSeconds, rfc3339};
use crate::error::Error;
use crate::identity::{Replay, ReplayKey, VerifiedIdentity};
use crate::ids::lease_id;
use crate::ledger::{IssueError, Lease, LeaseCredential};
use crate::mint::{Credential, MintContext, RevokeHandle};
use crate::policy::{Denial, Grant, PolicySet};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Instant;

/// The 201 body of `POST /v1/exchange` (DESIGN §2).
#[derive(Debug, Serialize)]
pub struct ExchangeReply {
    pub lease_id: String,
    pub policy: String,
    pub job: String,
    pub expires_at: String,
    pub credentials: BTreeMap<String, Credential>,
    /// Present when the lease may be renewed (its policy's `renew`): the token that renews it,
    /// and when the lease ends at the latest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub renew: Option<RenewInfo>,
    /// For the audit event; not part of the reply.
    #[serde(skip)]
    pub ttl_secs: i64,
}

/// `"renew": {"token": "…", "until": "<rfc3339>"}` in an exchange or renewal reply.
#[derive(Serialize)]
pub struct RenewInfo {
    pub token: String,
    pub until: String,
}

/// Never the token: a reply printed with `{:?}` must not leak it.
impl std::fmt::Debug for RenewInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RenewInfo").field("until", &self.until).finish_non_exhaustive()
    }
}

/// What every renew token starts with: secret scanners can match it, and a renewal tells it
/// from a CI token (a JWT) at a glance.
pub(super) const RENEW_TOKEN_PREFIX: &str = "ephr_";

/// A renew token: 256 random bits behind [`RENEW_TOKEN_PREFIX`].
fn renew_token() -> String {
    format!("{RENEW_TOKEN_PREFIX}{}", crate::ids::b64url(&crate::ids::random::<32>()))
}

impl ExchangeReply {
    /// The reply as POSIX `sh` assignments (`crate::env_format`): every field single-quoted, so no
    /// character in a value is ever interpreted by the shell. An `Err` must not be answered
    /// with an empty body while the lease is live: the caller withdraws the lease
    /// ([`App::withdraw`]).
    pub fn to_env(&self) -> Result<String, Error> {
        let value = serde_json::to_value(self)
            .map_err(|e| Error::Internal(format!("exchange reply not rendered as env: {e}")))?;
        Ok(crate::env_format::render(&value))
    }
}

/// Why a lease ended when its exchange could not be audited.
pub const REASON_AUDIT_UNAVAILABLE: &str = "audit-unavailable";
/// Why a lease derived by token exchange ended: a lease above it in its chain ended.
pub const REASON_PARENT_ENDED: &str = "parent-ended";
/// Why a lease ended when its reply could not be rendered.
pub const REASON_REPLY_FAILED: &str = "reply-failed";

/// A refusal by a rate limit is audited once per key and window (`App::admit_identity`), not
/// once per request: a flood must not become a flood of audit lines.
pub(super) fn audited_by_its_limit<R>(result: &Result<R, Error>) -> bool {
    matches!(result, Err(Error::RateLimited { .. }))
}

/// What one credential of an exchange is while it is being minted.
pub(super) struct Minted {
    pub(super) name: String,
    pub(super) kind: &'static str,
    pub(super) credential: Credential,
    pub(super) handle: RevokeHandle,
}

impl Minted {
    /// The lease's record of it: no secret, only what revokes it.
    pub(super) fn lease_credential(&self) -> LeaseCredential {
        LeaseCredential::new(&self.name, self.kind, self.credential.revocation, &self.handle)
    }
}

/// What an exchange asks for besides the CI token: the policy, a ttl, and for an `ssh` grant
/// the job's own public key (without one the broker generates a key pair for the job).
#[derive(Debug, Clone, Copy)]
pub struct ExchangeRequest<'a> {
    pub policy: &'a str,
    pub ttl_secs: Option<i64>,
    pub ssh_public_key: Option<&'a str>,
}

impl<'a> ExchangeRequest<'a> {
    /// Under `policy`, with its default ttl.
    pub fn policy(policy: &'a str) -> ExchangeRequest<'a> {
        ExchangeRequest { policy, ttl_secs: None, ssh_public_key: None }
    }
}

impl App {
    /// `POST /v1/exchange`. Audited (fail closed) and counted in metrics.
    pub async fn exchange(
        &self,
        token: &str,
        request: &ExchangeRequest<'_>,
        request_id: &str,
    ) -> Result<ExchangeReply, Error> {
        let policy = request.policy;
        let started = Instant::now();
        // The set in use now; a reload during this exchange does not change its decision.
        let policies = self.policies.current();
        let now = self.now();
        let (identity, result) = match self.verifier.verify(token, now).await {
            Err(e) => (None, Err(e.into())),
            Ok(identity) => {
                let result = match self.admit_identity(&identity, request_id).await {
                    Ok(()) => self.issue(&policies, &identity, request, now).await,
                    Err(e) => Err(e),
                };
                (Some(identity), result)
            }
        };
        let result = self.record_exchange(request_id, policy, identity.as_ref(), result).await;
        self.remember_outcome(request_id, "exchange", policy, identity.as_ref(), result.as_ref().map(|_| ()));
        // Bounded label: only loaded policy names, so callers cannot mint new series.
        let label = if policies.get(policy).is_some() { policy } else { "unknown" };
        let outcome = match &result {
            Ok(_) => "issued",
            Err(e) => e.code(),
        };
        self.metrics.exchange(label, outcome, started.elapsed().as_secs_f64());
        result
    }

    async fn issue(
        &self,
        policies: &PolicySet,
        identity: &VerifiedIdentity,
        request: &ExchangeRequest<'_>,
        now: UnixSeconds,
    ) -> Result<ExchangeReply, Error> {
        let grant = policies.decide(request.policy, identity, request.ttl_secs, now)?;
        if grant.credentials().is_empty() {
            // Told only to a job the policy admitted.
            return Err(Error::BadRequest(format!(
                "policy `{}` grants no credentials here: it issues tool tokens at POST /oauth/token",
                grant.policy()
            )));
        }
        let replay = self.replay_check(identity, grant.policy(), &grant).await?;
        let renew = grant.renew_until().map(|until| (renew_token(), until));
        let digest = renew.as_ref().map(|(token, _)| crate::secret::sha256_hex(token.as_bytes()));
        let (id, minted, expires_at) = self
            .mint_and_record(identity, &grant, replay.as_ref(), digest.as_deref(), request.ssh_public_key, now)
            .await?;
        Ok(ExchangeReply {
            lease_id: id,
            policy: grant.policy().to_string(),
            job: identity.job().to_string(),
            expires_at: rfc3339(expires_at),
            credentials: minted.into_iter().map(|m| (m.name, m.credential)).collect(),
            renew: renew.map(|(token, until)| RenewInfo { token, until: rfc3339(until) }),
            ttl_secs: grant.ttl_secs(),
        })
    }

    /// Mints every credential of `grant` under a new lease and records the lease, with
    /// `replay`'s key and the renew token's digest, durably: the lease id, what was minted and
    /// when the lease ends. Whatever was minted is revoked when it cannot be recorded.
    pub(super) async fn mint_and_record(
        &self,
        identity: &VerifiedIdentity,
        grant: &Grant,
        replay: Option<&ReplayKey>,
        renew_token_sha256: Option<&str>,
        ssh_public_key: Option<&str>,
        now: UnixSeconds,
    ) -> Result<(String, Vec<Minted>, UnixSeconds), Error> {
        let id = lease_id(now);
        let minted = self.mint_all(grant, &id, now, ssh_public_key).await?;
        let credentials = minted.iter().map(Minted::lease_credential);
        let lease = Lease::new(&id, identity, grant, credentials.collect(), renew_token_sha256, now);
        let expires_at = lease.expires_at;
        // Durable before the reply. If it cannot be recorded, nothing minted may escape: revoke.
        if let Err(e) = self.store.issue(lease, replay).await {
            let handles: Vec<RevokeHandle> = minted.into_iter().map(|m| m.handle).collect();
            let revoked = self.revoke_handles(&handles).await.is_none();
            return Err(match e {
                // Another exchange of the same token was recorded while this one minted.
                IssueError::Replayed => Denial::replayed(grant.policy(), false).into(),
                IssueError::Store(e) => {
                    Error::Unavailable(format!("lease {id} not recorded ({e}); minted credentials revoked: {revoked}"))
                }
            });
        }
        tracing::Span::current().record("lease_id", tracing::field::display(&id));
        Ok((id, minted, expires_at))
    }

    /// Replay protection (`identity::replay` tells the whole story): the key this exchange
    /// records with its lease, after the cheap check that it was not used before, so a plain
    /// replay mints nothing. `scope` is what one use is of: the policy, or for a token exchange
    /// the policy and the tool.
    pub(super) async fn replay_check(
        &self,
        identity: &VerifiedIdentity,
        scope: &str,
        grant: &Grant,
    ) -> Result<Option<ReplayKey>, Error> {
        match identity.replay(scope) {
            Replay::Off => Ok(None),
            Replay::NoJti => Err(Denial::replayed(grant.policy(), true).into()),
            Replay::Once(key) => {
                let seen = self.store.replay_seen(&key).await.map_err(|e| Error::Unavailable(e.0))?;
                if seen { Err(Denial::replayed(grant.policy(), false).into()) } else { Ok(Some(key)) }
            }
        }
    }

    /// Mints every credential of the grant, all or nothing.
    pub(super) async fn mint_all(
        &self,
        grant: &Grant,
        lease_id: &str,
        now: UnixSeconds,
        ssh_public_key: Option<&str>,
    ) -> Result<Vec<Minted>, Error> {
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
        let ctx = MintContext { lease_id, now, ssh_public_key };
        let mut minted: Vec<Minted> = Vec::new();
        for (cred, backend) in plan {
            match backend.mint(grant, cred, ctx).await {
                Ok(m) => minted.push(Minted {
                    name: cred.name.clone(),
                    kind: backend.kind(),
                    credential: m.credential,
                    handle: m.handle,
                }),
                Err(e) => {
                    let handles: Vec<RevokeHandle> = minted.into_iter().map(|m| m.handle).collect();
                    self.revoke_handles(&handles).await;
                    return Err(Error::Backend {
                        backend: cred.backend.clone(),
                        detail: e.detail,
                        advice: e.advice,
                        retry_after_secs: e.retry_after_secs,
                    });
                }
            }
        }
        Ok(minted)
    }

    /// Ends a lease whose reply could not be sent (its rendering failed): a lease must never be
    /// live while its caller got nothing. Returns the error to answer with.
    pub async fn withdraw(&self, reply: &ExchangeReply, why: Error) -> Error {
        let ended = self.end_leases(vec![reply.lease_id.clone()], REASON_REPLY_FAILED).await;
        let state = if ended.pending.is_empty() { "revoked" } else { "revocation pending (retried)" };
        Error::Internal(format!("{}; lease {} {state}", why.log_detail(), reply.lease_id))
    }

    /// The one record of an exchange's outcome: the audit event when an audit file is
    /// configured (fail closed: when it cannot be written, an issued lease is revoked before
    /// anything leaves, and a denial becomes 503), else an `issued` log line for what was issued.
    async fn record_exchange(
        &self,
        request_id: &str,
        policy: &str,
        identity: Option<&VerifiedIdentity>,
        result: Result<ExchangeReply, Error>,
    ) -> Result<ExchangeReply, Error> {
        if !self.audit.is_enabled() || audited_by_its_limit(&result) {
            if let (Ok(reply), Some(identity)) = (&result, identity) {
                log_issued(reply, identity);
            }
            return result;
        }
        let event = ExchangeEvent::new(rfc3339(self.now()), request_id, policy, identity, &result, &self.audit);
        let written = self.audit.write(&event).await;
        self.fail_closed(written, result, "exchange").await
    }

    /// An outcome whose audit event was `written`, or not: then an issued (or renewed) lease is
    /// ended before a single credential leaves, and a denial becomes 503 (the record of a refusal
    /// is lost otherwise). `what` names the request in the log.
    pub(super) async fn fail_closed<R: LeaseReply>(
        &self,
        written: Result<(), String>,
        result: Result<R, Error>,
        what: &str,
    ) -> Result<R, Error> {
        let Err(e) = written else { return result };
        tracing::error!(error = %e, "audit event not written; failing the {what} closed");
        match result {
            Ok(reply) => {
                let ended = self.end_leases(vec![reply.lease_id().to_string()], REASON_AUDIT_UNAVAILABLE).await;
                Err(Error::Unavailable(format!(
                    "{e}; lease {} revoked: {}",
                    reply.lease_id(),
                    if ended.pending.is_empty() { "yes" } else { "pending (retried)" }
                )))
            }
            Err(Error::Denied(_) | Error::InvalidToken(_) | Error::OAuth { .. }) => Err(Error::Unavailable(e)),
            Err(other) => Err(other),
        }
    }
}

/// A reply that issued a lease: what [`App::fail_closed`] ends when the audit event is lost.
pub(super) trait LeaseReply {
    fn lease_id(&self) -> &str;
}

impl LeaseReply for ExchangeReply {
    fn lease_id(&self) -> &str {
        &self.lease_id
    }
}

/// Without an audit file, this line is the record of what was issued (job, policy, token and
/// credential fingerprints). With one, the audit event is, and writing the same again cost a
/// tenth of the broker's CPU per exchange (docs/benchmarks.md).
fn log_issued(reply: &ExchangeReply, identity: &VerifiedIdentity) {
    let fingerprints: BTreeMap<&str, BTreeMap<&str, String>> =
        reply.credentials.iter().map(|(n, c)| (n.as_str(), c.fingerprints())).collect();
    tracing::info!(
        lease_id = %reply.lease_id, job = %reply.job, policy = %reply.policy, issuer = %identity.issuer(),
        token_sha256 = %identity.token_sha256(), ttl_secs = reply.ttl_secs,
        credentials = %serde_json::to_string(&fingerprints).unwrap_or_default(),
        "issued"
    );
}
