//! The audit events `app` writes: one per exchange (issued, denied, or failed), per revocation
//! and per reload. Fingerprints of secrets only, never a secret; claims only from the
//! configured allowlist.

use super::ExchangeReply;
use crate::audit::Audit;
use crate::error::Error;
use crate::identity::VerifiedIdentity;
use serde::Serialize;
use std::collections::BTreeMap;

/// One exchange's audit event, serialised straight from borrowed parts (building it as nested
/// `serde_json::Value` maps was a tenth of the broker's CPU per exchange).
#[derive(Serialize)]
pub(super) struct ExchangeEvent<'a> {
    time: String,
    /// `exchange`, `renewal` or `denial`.
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
    /// A token exchange's actor chain (its `act` claim: `sub` and `iss` of each actor).
    #[serde(skip_serializing_if = "Option::is_none")]
    act: Option<&'a serde_json::Value>,
    /// A token exchange's tool, resource and granted scope.
    #[serde(skip_serializing_if = "Option::is_none")]
    tool: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resource: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'a str>,
    /// The actor rule that admitted the actor.
    #[serde(skip_serializing_if = "Option::is_none")]
    actor_rule: Option<&'a str>,
    /// SHA-256 of a token exchange's issued token.
    #[serde(skip_serializing_if = "Option::is_none")]
    access_token_sha256: Option<&'a str>,
}

/// A credential in an audit event: its kind and the SHA-256 of each secret field.
#[derive(Serialize)]
struct CredentialAudit {
    kind: &'static str,
    sha256: BTreeMap<&'static str, String>,
}

impl<'a> ExchangeEvent<'a> {
    /// The event for an exchange's outcome: `exchange` (issued, or failed in the broker or a
    /// backend) or `denial` (invalid token, policy said no).
    pub(super) fn new(
        time: String,
        request_id: &'a str,
        policy: &'a str,
        identity: Option<&'a VerifiedIdentity>,
        result: &'a Result<ExchangeReply, Error>,
        audit: &'a Audit,
    ) -> ExchangeEvent<'a> {
        let mut event = ExchangeEvent::outcome(time, request_id, policy, identity, result.as_ref().map(|_| ()), audit);
        if let Ok(reply) = result {
            event.issued(reply);
        }
        event
    }

    /// The event of a token exchange at `POST /oauth/token` (`token-exchange`, or `denial`);
    /// [`ExchangeEvent::with_delegation`] adds what was decided.
    pub(super) fn for_token_exchange(
        time: String,
        request_id: &'a str,
        policy: &'a str,
        identity: Option<&'a VerifiedIdentity>,
        result: Result<(), &'a Error>,
        audit: &'a Audit,
    ) -> ExchangeEvent<'a> {
        let mut event = ExchangeEvent::outcome(time, request_id, policy, identity, result, audit);
        if event.event == "exchange" {
            event.event = "token-exchange";
        }
        event
    }

    /// The actor chain, tool, resource, scope, lease and token fingerprint of a token exchange,
    /// as far as it got.
    pub(super) fn with_delegation(mut self, audit: &'a super::token_exchange::TokenExchangeAudit) -> ExchangeEvent<'a> {
        self.act = audit.act.as_ref();
        if let Some(d) = &audit.delegated {
            self.tool = Some(&d.tool);
            self.resource = Some(&d.resource);
            self.scope = Some(&d.scope);
            self.actor_rule = d.actor_rule.as_deref();
        }
        if self.decision == "allow" {
            self.lease_id = audit.lease_id.as_deref();
            self.access_token_sha256 = audit.token_sha256.as_deref();
        }
        self
    }

    /// The fields every outcome has: who, which policy, and allow, deny or error.
    fn outcome(
        time: String,
        request_id: &'a str,
        policy: &'a str,
        identity: Option<&'a VerifiedIdentity>,
        result: Result<(), &'a Error>,
        audit: &'a Audit,
    ) -> ExchangeEvent<'a> {
        let mut event = ExchangeEvent {
            time,
            event: "exchange",
            request_id,
            // The caller's text when the policy is unknown: bounded, JSON-escaped.
            policy: crate::clock::truncate(policy, 64),
            issuer: identity.map(VerifiedIdentity::issuer),
            job: identity.map(VerifiedIdentity::job),
            token_sha256: identity.map(VerifiedIdentity::token_sha256),
            claims: identity.map(|i| audit.selected(i.claims())),
            decision: "allow",
            code: None,
            deciding_claim: None,
            reason: None,
            lease_id: None,
            ttl_secs: None,
            expires_at: None,
            credentials: None,
            act: None,
            tool: None,
            resource: None,
            scope: None,
            actor_rule: None,
            access_token_sha256: None,
        };
        match result {
            Ok(()) => {}
            Err(Error::Denied(d)) => {
                (event.event, event.decision, event.code) = ("denial", "deny", Some("policy_denied"));
                event.deciding_claim = Some(&d.claim);
                event.reason = Some(crate::clock::truncate(&d.log_detail(), 200).to_string());
            }
            Err(e @ (Error::InvalidToken(_) | Error::OAuth { .. })) => {
                (event.event, event.decision, event.code) = ("denial", "deny", Some(e.code()));
                event.reason = Some(e.log_detail());
            }
            Err(e) => (event.decision, event.code) = ("error", Some(e.code())),
        }
        event
    }

    /// The same event for a renewal (`renewal`, or `denial` when refused), always naming the
    /// lease.
    pub(super) fn for_renewal(mut self, lease_id: &'a str) -> ExchangeEvent<'a> {
        if self.event == "exchange" {
            self.event = "renewal";
        }
        self.lease_id = Some(lease_id);
        self
    }

    fn issued(&mut self, reply: &'a ExchangeReply) {
        self.lease_id = Some(&reply.lease_id);
        self.ttl_secs = Some(reply.ttl_secs);
        self.expires_at = Some(&reply.expires_at);
        self.credentials = Some(
            reply
                .credentials
                .iter()
                .map(|(name, c)| (name.as_str(), CredentialAudit { kind: c.kind, sha256: c.fingerprints() }))
                .collect(),
        );
    }
}

/// A limit refusing a key (`crate::limits`): written for the first refusal of each key in an
/// audit window, with the number of refusals since the last event.
#[derive(Serialize)]
pub(super) struct RateLimitEvent<'a> {
    time: String,
    event: &'static str,
    request_id: &'a str,
    limit: &'static str,
    key: &'a str,
    refused: u64,
    retry_after_secs: i64,
}

impl<'a> RateLimitEvent<'a> {
    pub(super) fn new(
        time: String,
        request_id: &'a str,
        refusal: &'a crate::limits::Refusal,
        refused: u64,
    ) -> RateLimitEvent<'a> {
        RateLimitEvent {
            time,
            event: "rate-limited",
            request_id,
            limit: refusal.limit.as_str(),
            key: &refusal.key,
            refused,
            retry_after_secs: refusal.retry_after_secs,
        }
    }
}
