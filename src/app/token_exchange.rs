//! `POST /oauth/token` (RFC 8693 token exchange, issue 19), end to end: the subject (a CI token,
//! or a token this broker issued: its lease, chain and bounds) → the actor (verified by a
//! configured issuer; `may_act`) → the policy's decision ([`PolicySet::decide_delegation`]) →
//! replay check → mint and record one tool token under a lease of the job → audit.
//!
//! Every token derived from a job is a lease of that job, so ending the job (its revoke, a
//! webhook, an admin call, the lease's ttl) ends every token of the chain. A derived token also
//! carries the ids of the leases above it (`lease_chain`): introspection, and any further
//! exchange, find it inactive as soon as one of them has ended.

use super::App;
use super::audit_event::ExchangeEvent;
use crate::claims::Claims;
use crate::clock::{UnixSeconds, rfc3339};
use crate::error::Error;
use crate::identity::{IdentityError, VerifiedIdentity};
use crate::ledger::Lease;
use crate::mint::jwt::JwtSigner;
use crate::policy::delegation::{Actor, BROKER_ACTOR_ISSUER, Delegated, Delegation, Parent};
use crate::policy::{Denial, PolicySet};
use crate::secret::{SecretString, sha256_hex};
use serde_json::{Map, Value, json};
use std::collections::BTreeSet;

/// The deepest chain of actors (`act` inside `act` …) a token may name. A chain is a job's
/// agents delegating to each other; anything deeper is more likely a loop than a design.
pub const MAX_DELEGATION_DEPTH: usize = 4;

/// One token exchange request, parsed (the wire is `http::oauth`'s).
#[derive(Debug, Clone, Copy)]
pub struct TokenExchangeRequest<'a> {
    /// The policy: the `policy` parameter, else `audience`.
    pub policy: &'a str,
    pub subject_token: &'a str,
    pub actor_token: Option<&'a str>,
    /// `resource`: the tool server's URI.
    pub resource: Option<&'a str>,
    /// `audience` naming a tool, when `policy` named the policy.
    pub tool: Option<&'a str>,
    /// `scope`, split on spaces; `None` when absent.
    pub scopes: Option<&'a [String]>,
}

/// What a token exchange issued.
pub struct TokenExchangeReply {
    pub access_token: SecretString,
    pub expires_in: i64,
    /// Granted scopes, space-separated.
    pub scope: String,
    pub lease_id: String,
    pub tool: String,
    pub resource: String,
}

impl super::exchange::LeaseReply for TokenExchangeReply {
    fn lease_id(&self) -> &str {
        &self.lease_id
    }
}

impl std::fmt::Debug for TokenExchangeReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenExchangeReply")
            .field("lease_id", &self.lease_id)
            .field("tool", &self.tool)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// The subject token, understood: whose job it is, and when it is a token this broker issued,
/// what bounds a child of it.
struct Subject {
    identity: VerifiedIdentity,
    /// `Some` for a token this broker issued.
    parent: Option<Parent>,
    /// Its `act` claim: the actors so far.
    act: Option<Value>,
    /// The leases above the token to issue, root first.
    chain: Vec<String>,
    /// Its `may_act` claim, when it has one.
    may_act: Option<Value>,
}

/// An `invalid_request` about the caller's own request or tokens.
fn invalid_request(message: impl Into<String>, detail: impl Into<String>) -> Error {
    Error::OAuth { code: "invalid_request", message: message.into(), detail: detail.into() }
}

/// A token that does not verify: which one, never why (that goes to the log).
fn invalid_token(which: &str, e: &IdentityError) -> Error {
    invalid_request(format!("the {which} is not valid for this broker"), format!("{which}: {e}"))
}

impl App {
    /// `POST /oauth/token`. Audited (fail closed) and counted in metrics.
    pub async fn token_exchange(
        &self,
        request: &TokenExchangeRequest<'_>,
        request_id: &str,
    ) -> Result<TokenExchangeReply, Error> {
        let policies = self.policies.current();
        let now = self.now();
        let mut audit = TokenExchangeAudit::default();
        let result = match self.subject(request, now).await {
            Err(e) => Err(e),
            Ok(subject) => {
                let result = match self.admit_identity(&subject.identity, request_id).await {
                    Ok(()) => self.delegate(&policies, &subject, request, now, &mut audit).await,
                    Err(e) => Err(e),
                };
                audit.identity = Some(subject.identity);
                result
            }
        };
        let result = self.record_token_exchange(request_id, request, &audit, result).await;
        let outcome = result.as_ref().map(|_| ());
        self.remember_outcome(request_id, "token-exchange", request.policy, audit.identity.as_ref(), outcome);
        let label = if policies.get(request.policy).is_some() { request.policy } else { "unknown" };
        self.metrics.token_exchange(
            label,
            match &result {
                Ok(_) => "issued",
                Err(e) => e.code(),
            },
        );
        result
    }

    /// The subject token: a token this broker issued (its signature, its lease and every lease
    /// above it live, issued under this policy, meant to be exchanged), or a CI token.
    async fn subject(&self, request: &TokenExchangeRequest<'_>, now: UnixSeconds) -> Result<Subject, Error> {
        let token = request.subject_token;
        let Some(signer) = self.backends.signers().iter().find(|s| s.owns(token)) else {
            let identity = self.verifier.verify(token, now).await.map_err(|e| invalid_token("subject_token", &e))?;
            let may_act = identity.claims().get("may_act").cloned();
            return Ok(Subject { identity, parent: None, act: None, chain: Vec::new(), may_act });
        };
        let Issued { claims, exp, lease, chain } = self.issued_token(signer, token, "subject_token", now).await?;
        // A chain stays under the policy it started with: its tools, scopes and data are that
        // policy's, and only that policy's actors may extend it. Worded like any policy refusal.
        if claims.get("policy").and_then(Value::as_str) != Some(request.policy) {
            return Err(Denial::not_matched(request.policy, "policy").into());
        }
        let tool = claims.get("tool").and_then(Value::as_str).map(str::to_string);
        // Attack (confused deputy): a service handed a broker JWT for itself exchanging it for
        // tokens elsewhere. Only tool tokens (on behalf of an actor) and grant tokens minted for
        // this broker itself (`aud` = its URL) are exchanged.
        if tool.is_none() && claims.get("aud").and_then(Value::as_str) != Some(self.public_url()) {
            return Err(invalid_request(
                format!(
                    "the subject_token is for another audience; a grant's JWT is exchanged only when its `audience` is this broker ({})",
                    self.public_url()
                ),
                "subject aud is not the broker",
            ));
        }
        let scopes = tool.as_ref().map(|_| {
            let scope = claims.get("scope").and_then(Value::as_str).unwrap_or_default();
            scope.split(' ').filter(|s| !s.is_empty()).map(str::to_string).collect::<BTreeSet<String>>()
        });
        let platform = self.verifier.issuer(&lease.issuer).map(|i| i.platform()).ok_or_else(|| {
            invalid_request(
                "the subject_token's job came from an issuer that is no longer configured",
                format!("issuer {} of lease {} not configured", lease.issuer, lease.id),
            )
        })?;
        let identity = VerifiedIdentity::remembered(
            &lease.issuer,
            platform,
            &lease.job,
            lease.claims.to_claims(),
            lease.expires_at,
            &sha256_hex(token.as_bytes()),
        );
        let mut chain = chain;
        chain.push(lease.id.to_string());
        Ok(Subject {
            identity,
            parent: Some(Parent { tool, scopes, expires_at: exp.min(lease.expires_at) }),
            act: claims.get("act").cloned(),
            chain,
            may_act: claims.get("may_act").cloned(),
        })
    }

    /// A token one of the broker's signers issued, still good: its signature, its `exp`, its
    /// lease live and listing its `jti`, every lease in its `lease_chain` live. `which` names it
    /// in errors (`subject_token`, `actor_token`).
    pub(super) async fn issued_token(
        &self,
        signer: &JwtSigner,
        token: &str,
        which: &str,
        now: UnixSeconds,
    ) -> Result<Issued, Error> {
        let claims = signer.verify(token).ok_or_else(|| invalid_token(which, &IdentityError::BadSignature))?;
        let exp = claims.get("exp").and_then(Value::as_i64).unwrap_or(0);
        if now >= exp {
            return Err(invalid_token(which, &IdentityError::Expired { exp, now }));
        }
        let lease_id = claims.get("lease_id").and_then(Value::as_str).unwrap_or_default();
        let jti = claims.get("jti").and_then(Value::as_str).unwrap_or_default();
        let chain: Vec<String> = match claims.get("lease_chain") {
            None => Vec::new(),
            Some(list) => serde_json::from_value(list.clone())
                .map_err(|_| invalid_request(format!("the {which} is not valid for this broker"), "lease_chain"))?,
        };
        // Attack: a token whose lease (or an ancestor's) was revoked, replayed to get a fresh
        // one. Ended anywhere up the chain is ended here.
        let lease = self.store.get(lease_id).await.map_err(|e| Error::Unavailable(e.0))?;
        let lease = lease.filter(|l| l.is_live(now) && l.lists_jti(jti));
        let Some(lease) = lease else {
            return Err(invalid_request(
                format!("the {which} is no longer active: its lease has ended"),
                format!("{which} lease {lease_id} not live or not listing the token"),
            ));
        };
        if let Some(ended) = self.first_ended(&chain, now).await? {
            return Err(invalid_request(
                format!("the {which} is no longer active: a lease it was derived from has ended"),
                format!("ancestor lease {ended} not live"),
            ));
        }
        Ok(Issued { claims, exp, lease, chain })
    }

    /// The actor: a configured issuer's token, or an agent's identity token this broker issued
    /// (a grant's JWT for the broker itself, from the agent's own exchange: actor rules name
    /// its issuer `broker`).
    async fn actor(&self, token: &str, now: UnixSeconds) -> Result<ActorIdentity, Error> {
        let Some(signer) = self.backends.signers().iter().find(|s| s.owns(token)) else {
            let identity = self.verifier.verify(token, now).await.map_err(|e| invalid_token("actor_token", &e))?;
            return Ok(ActorIdentity { issuer: identity.issuer().to_string(), claims: identity.claims().clone() });
        };
        let Issued { claims, .. } = self.issued_token(signer, token, "actor_token", now).await?;
        // Attack: a tool server (or any service) replaying a broker JWT it was handed, as if it
        // named an agent. An identity token for acting here is one minted for the broker itself.
        if claims.contains_key("tool") || claims.get("aud").and_then(Value::as_str) != Some(self.public_url()) {
            return Err(invalid_request(
                format!(
                    "the actor_token is a token this broker issued for another audience; an agent's identity token from this broker is a grant's JWT whose `audience` is the broker ({})",
                    self.public_url()
                ),
                "actor aud is not the broker",
            ));
        }
        Ok(ActorIdentity { issuer: BROKER_ACTOR_ISSUER.to_string(), claims })
    }

    /// The first of `leases` that is not live (or not known), if any.
    pub(super) async fn first_ended(&self, leases: &[String], now: UnixSeconds) -> Result<Option<String>, Error> {
        for id in leases {
            let lease = self.store.get(id).await.map_err(|e| Error::Unavailable(e.0))?;
            if !lease.is_some_and(|l| l.is_live(now)) {
                return Ok(Some(id.clone()));
            }
        }
        Ok(None)
    }

    /// The actor, the decision, and the token.
    async fn delegate(
        &self,
        policies: &PolicySet,
        subject: &Subject,
        request: &TokenExchangeRequest<'_>,
        now: UnixSeconds,
        audit: &mut TokenExchangeAudit,
    ) -> Result<TokenExchangeReply, Error> {
        let actor = match request.actor_token {
            None => None,
            Some(token) => Some(self.actor(token, now).await?),
        };
        if subject.parent.is_some() && actor.is_none() {
            return Err(invalid_request(
                "a token this broker issued is exchanged further only on behalf of an actor: send `actor_token`",
                "broker subject without actor",
            ));
        }
        if let Some(may_act) = &subject.may_act {
            check_may_act(may_act, actor.as_ref())?;
        }
        let act = actor.as_ref().map(|a| act_claim(a, subject.act.as_ref()));
        if act.as_ref().is_some_and(|a| act_depth(a) > MAX_DELEGATION_DEPTH) {
            return Err(invalid_request(
                format!("delegation chains are at most {MAX_DELEGATION_DEPTH} actors deep"),
                "act chain too deep",
            ));
        }
        audit.act = act.clone();
        let mut carry = Map::new();
        if let Some(act) = act {
            carry.insert("act".into(), act);
        }
        if !subject.chain.is_empty() {
            carry.insert("lease_chain".into(), json!(subject.chain));
        }
        let ask = Delegation {
            resource: request.resource,
            tool: request.tool,
            scopes: request.scopes,
            actor: actor.as_ref().map(|a| Actor { issuer: &a.issuer, claims: &a.claims }),
            parent: subject.parent.as_ref(),
            carry,
        };
        let (grant, delegated) = policies.decide_delegation(request.policy, &subject.identity, ask, now)?;
        if grant.expires_at() <= now {
            return Err(invalid_request("the subject_token has no life left to delegate", "parent expires now"));
        }
        audit.delegated = Some(delegated.clone());
        // One use of a CI token per policy *and tool*: a job gets a token for each of its
        // tools, and a replayed token gets none (identity::replay).
        let use_of = format!("{}\0tool\0{}", request.policy, delegated.tool);
        let replay = self.replay_check(&subject.identity, &use_of, &grant).await?;
        let (lease_id, minted, _) =
            self.mint_and_record(&subject.identity, &grant, replay.as_ref(), None, None, now).await?;
        let Delegated { tool, resource, scope, .. } = delegated;
        let mut minted = minted.into_iter();
        let token = minted.next().and_then(|m| m.credential.secrets.into_iter().next()).map(|(_, t)| t);
        let Some(access_token) = token else {
            let ended = self.end_leases(vec![lease_id.clone()], super::exchange::REASON_REPLY_FAILED).await;
            return Err(Error::Internal(format!(
                "tool `{tool}` minted no token; lease {lease_id} ended: {}",
                ended.pending.is_empty()
            )));
        };
        audit.lease_id = Some(lease_id.clone());
        audit.token_sha256 = Some(access_token.fingerprint());
        Ok(TokenExchangeReply { access_token, expires_in: grant.expires_at() - now, scope, lease_id, tool, resource })
    }

    /// The audit event of a token exchange (fail closed: an issued token's lease is ended when
    /// it cannot be written), or without an audit file, an `issued` log line.
    async fn record_token_exchange(
        &self,
        request_id: &str,
        request: &TokenExchangeRequest<'_>,
        audit: &TokenExchangeAudit,
        result: Result<TokenExchangeReply, Error>,
    ) -> Result<TokenExchangeReply, Error> {
        if !self.audit.is_enabled() || super::exchange::audited_by_its_limit(&result) {
            if let (Ok(reply), Some(identity)) = (&result, &audit.identity) {
                tracing::info!(
                    lease_id = %reply.lease_id, job = %identity.job(), policy = %request.policy, tool = %reply.tool,
                    resource = %reply.resource, scope = %reply.scope, act = %audit.act.as_ref().map(|a| a.to_string()).unwrap_or_default(),
                    token_sha256 = %identity.token_sha256(), access_token_sha256 = %reply.access_token.fingerprint(),
                    "token issued"
                );
            }
            return result;
        }
        let outcome: Result<(), &Error> = result.as_ref().map(|_| ());
        let event = ExchangeEvent::for_token_exchange(
            rfc3339(self.now()),
            request_id,
            request.policy,
            audit.identity.as_ref(),
            outcome,
            &self.audit,
        )
        .with_delegation(audit);
        let written = self.audit.write(&event).await;
        self.fail_closed(written, result, "token exchange").await
    }
}

/// What the audit event of a token exchange adds to an exchange's: the actor chain, the tool,
/// resource and scope, the token's fingerprint.
#[derive(Default)]
pub(super) struct TokenExchangeAudit {
    pub(super) identity: Option<VerifiedIdentity>,
    pub(super) act: Option<Value>,
    pub(super) delegated: Option<Delegated>,
    pub(super) lease_id: Option<String>,
    pub(super) token_sha256: Option<String>,
}

/// A verified actor token: its issuer's name in the config (or [`BROKER_ACTOR_ISSUER`]) and
/// its claims.
struct ActorIdentity {
    issuer: String,
    claims: Claims,
}

impl ActorIdentity {
    fn subject(&self) -> &str {
        self.claims.get("sub").and_then(Value::as_str).unwrap_or_default()
    }
}

/// A token this broker issued, checked ([`App::issued_token`]).
pub(super) struct Issued {
    pub(super) claims: Claims,
    exp: UnixSeconds,
    lease: Lease,
    /// Its `lease_chain`.
    chain: Vec<String>,
}

/// `act` for a token the verified `actor` acts with: `{"sub", "iss"}` of the actor, the chain
/// so far nested inside (RFC 8693 §4.1: the outermost is the current actor).
fn act_claim(actor: &ActorIdentity, previous: Option<&Value>) -> Value {
    let mut act = Map::new();
    act.insert("sub".into(), json!(actor.subject()));
    if let Some(iss) = actor.claims.get("iss") {
        act.insert("iss".into(), iss.clone());
    }
    if let Some(previous) = previous {
        act.insert("act".into(), previous.clone());
    }
    Value::Object(act)
}

/// How many actors an `act` claim names.
fn act_depth(act: &Value) -> usize {
    let mut depth = 0;
    let mut at = Some(act);
    while let Some(a) = at {
        depth += 1;
        at = a.get("act");
    }
    depth
}

/// RFC 8693 §4.4: the subject token names who may act for it; the actor token must be that
/// party: every member of `may_act` equals the actor's claim of that name (`sub`, `iss`, …).
/// Attack: a token meant for one agent, taken by another, exchanged under its own identity.
fn check_may_act(may_act: &Value, actor: Option<&ActorIdentity>) -> Result<(), Error> {
    let Some(actor) = actor else {
        return Err(invalid_request(
            "the subject_token names who may act for it (`may_act`): send that party's `actor_token`",
            "may_act without actor",
        ));
    };
    let matches = match may_act.as_object() {
        Some(wanted) if !wanted.is_empty() => wanted.iter().all(|(k, v)| actor.claims.get(k) == Some(v)),
        // Anything but a non-empty object names nobody: fail closed.
        _ => false,
    };
    if matches {
        Ok(())
    } else {
        Err(invalid_request(
            "the actor_token is not the party the subject_token allows to act for it (`may_act`)",
            format!("may_act mismatch for actor {}", crate::clock::truncate(actor.subject(), 200)),
        ))
    }
}
