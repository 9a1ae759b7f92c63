//! `POST /v1/leases/{id}/renew` (issue 15): fresh credentials for a renewable lease, until the
//! lease's end, for whoever holds its renew token or presents a fresh CI token of the same job
//! (GitHub lets a job ask for one at any time).
//!
//! A renewal is an exchange without a CI token: the lease's claims snapshot, recorded when a
//! token was verified, stands in for it. Every renewal re-decides the lease's policy on those
//! claims against the policies in force now; a policy that no longer admits them ends the lease
//! (a mover, as a reload would). The new credentials join the lease ([`LeaseStore::renew`])
//! before they leave the broker, so ending the lease revokes every credential minted under it.
//!
//! [`LeaseStore::renew`]: crate::ledger::LeaseStore::renew

use super::App;
use super::audit_event::ExchangeEvent;
use super::exchange::{ExchangeReply, Minted, RENEW_TOKEN_PREFIX, RenewInfo};
use super::policies::REASON_POLICY_CHANGED;
use crate::clock::{UnixSeconds, rfc3339};
use crate::error::Error;
use crate::identity::{IdentityError, VerifiedIdentity};
use crate::ledger::{Lease, LeaseCredential, LeaseState, MAX_RENEWALS};
use crate::mint::RevokeHandle;
use crate::secret::{constant_time_eq, sha256_hex};
use std::time::Instant;

impl App {
    /// `POST /v1/leases/{id}/renew` with the lease's renew token. Audited (fail closed: when
    /// the event cannot be written, the lease ends, and with it every credential minted under it)
    /// and counted in metrics.
    pub async fn renew(&self, lease_id: &str, token: &str, request_id: &str) -> Result<ExchangeReply, Error> {
        let started = Instant::now();
        let now = self.now();
        let (policy, identity, result) = match self.renewable_lease(lease_id, token, now).await {
            Err(e) => (String::new(), None, Err(e)),
            Ok((lease, identity)) => {
                let result = match self.admit_identity(&identity, request_id).await {
                    Ok(()) => self.renew_lease(&lease, &identity, token, now).await,
                    Err(e) => Err(e),
                };
                (lease.policy.to_string(), Some(identity), result)
            }
        };
        let result = self.record_renewal(request_id, lease_id, &policy, identity.as_ref(), result).await;
        // Bounded label: a policy name the ledger recorded, or `unknown` before the token checked out.
        let label = if policy.is_empty() { "unknown" } else { policy.as_str() };
        let outcome = match &result {
            Ok(_) => "renewed",
            Err(e) => e.code(),
        };
        self.metrics.renewal(label, outcome);
        tracing::debug!(lease_id, micros = started.elapsed().as_micros() as u64, outcome, "renewal");
        result
    }

    /// The lease, if `token` may renew it, and the identity it was granted to. Either its renew
    /// token (the digests compared in constant time), or a CI token that verifies and names the
    /// lease's job at the lease's issuer. An unknown lease, another lease's token and another
    /// job's CI token get the same answer (no oracle of lease ids). Only a caller who passed is
    /// told why a lease cannot be renewed.
    async fn renewable_lease(
        &self,
        lease_id: &str,
        token: &str,
        now: UnixSeconds,
    ) -> Result<(Lease, VerifiedIdentity), Error> {
        // A CI token is verified before the ledger is read: a bad one costs no store round trip.
        let presented = match token.starts_with(RENEW_TOKEN_PREFIX) {
            true => None,
            false => Some(self.verifier.verify(token, now).await?),
        };
        let digest = match &presented {
            None => sha256_hex(token.as_bytes()),
            Some(identity) => identity.token_sha256().to_string(),
        };
        let lease = self.store.get(lease_id).await.map_err(|e| Error::Unavailable(e.0))?;
        let may_renew = |l: &Lease| match &presented {
            None => l.renewal.as_ref().is_some_and(|r| constant_time_eq(r.token_sha256.as_bytes(), digest.as_bytes())),
            Some(identity) => *l.job == *identity.job() && *l.issuer == *identity.issuer(),
        };
        let Some(lease) = lease.filter(may_renew) else { return Err(IdentityError::RenewTokenRejected.into()) };
        if lease.renewal.is_none() {
            return Err(Error::NotRenewable(format!(
                "lease {} cannot be renewed: policy `{}` did not make it renewable when it was issued",
                lease.id, lease.policy
            )));
        }
        if !lease.is_renewable(now) {
            let why = match lease.state {
                LeaseState::Active if lease.is_live(now) => {
                    format!("it was renewed {MAX_RENEWALS} times, the most a lease may be; exchange again")
                }
                LeaseState::Active => "it has reached its end (renew.until)".to_string(),
                state => format!("it has ended ({})", state.as_str()),
            };
            return Err(Error::NotRenewable(format!("lease {} cannot be renewed: {why}", lease.id)));
        }
        let platform = self.verifier.issuers().find(|i| *i.config.name == *lease.issuer).map(|i| i.config.platform);
        let Some(platform) = platform else {
            return Err(Error::NotRenewable(format!(
                "lease {} cannot be renewed: its issuer `{}` is no longer configured",
                lease.id, lease.issuer
            )));
        };
        let claims = lease.claims.to_claims();
        let identity =
            VerifiedIdentity::remembered(&lease.issuer, platform, &lease.job, claims, lease.expires_at, &digest);
        Ok((lease, identity))
    }

    /// Re-decides, mints, and records the new credentials with the lease.
    async fn renew_lease(
        &self,
        lease: &Lease,
        identity: &VerifiedIdentity,
        token: &str,
        now: UnixSeconds,
    ) -> Result<ExchangeReply, Error> {
        let policies = self.policies.current();
        // The credentials' ttl: the policy's default, but never past the lease's own end.
        let ttl = policies.get(&lease.policy).map(|p| p.ttl_default_secs.min(lease.expires_at - now));
        let grant = match policies.decide(&lease.policy, identity, ttl, now) {
            Ok(grant) => grant,
            Err(denial) => {
                // The policy in force no longer admits the claims the lease was granted on: the
                // lease ends, as a reload that noticed it first would have ended it.
                self.end_leases(vec![lease.id.to_string()], REASON_POLICY_CHANGED).await;
                return Err(denial.into());
            }
        };
        if grant.renew_until().is_none() {
            return Err(Error::NotRenewable(format!(
                "lease {} cannot be renewed: policy `{}` no longer allows renewal (the lease lasts until {})",
                lease.id,
                lease.policy,
                rfc3339(lease.expires_at)
            )));
        }
        let minted = self.mint_all(&grant, &lease.id, now, None).await?;
        let credentials: Vec<LeaseCredential> = minted.iter().map(Minted::lease_credential).collect();
        // Recorded with the lease before anything leaves; if the lease ended meanwhile (or the
        // store cannot say), nothing minted may escape: revoke it.
        let recorded = self.store.renew(&lease.id, &credentials, now).await;
        if !matches!(recorded, Ok(true)) {
            let handles: Vec<RevokeHandle> = minted.into_iter().map(|m| m.handle).collect();
            let revoked = self.revoke_handles(&handles).await.is_none();
            return Err(match recorded {
                Ok(_) => Error::NotRenewable(format!(
                    "lease {} cannot be renewed: it ended while the renewal was minted",
                    lease.id
                )),
                Err(e) => Error::Unavailable(format!(
                    "renewal of lease {} not recorded ({e}); minted credentials revoked: {revoked}",
                    lease.id
                )),
            });
        }
        Ok(ExchangeReply {
            lease_id: lease.id.to_string(),
            policy: lease.policy.to_string(),
            job: lease.job.to_string(),
            expires_at: rfc3339(lease.expires_at),
            credentials: minted.into_iter().map(|m| (m.name, m.credential)).collect(),
            renew: Some(RenewInfo { token: token.to_string(), until: rfc3339(lease.expires_at) }),
            ttl_secs: grant.ttl_secs(),
        })
    }

    /// The audit event of a renewal (fail closed, as an exchange's: when it cannot be written,
    /// the lease is ended before the renewal's credentials leave).
    async fn record_renewal(
        &self,
        request_id: &str,
        lease_id: &str,
        policy: &str,
        identity: Option<&VerifiedIdentity>,
        result: Result<ExchangeReply, Error>,
    ) -> Result<ExchangeReply, Error> {
        if !self.audit.is_enabled() || super::exchange::audited_by_its_limit(&result) {
            // Without an audit file, this line is the record of what the renewal issued.
            if let Ok(reply) = &result {
                let fingerprints: Vec<(&str, std::collections::BTreeMap<&str, String>)> =
                    reply.credentials.iter().map(|(n, c)| (n.as_str(), c.fingerprints())).collect();
                tracing::info!(
                    lease_id, job = %reply.job, policy = %reply.policy, ttl_secs = reply.ttl_secs,
                    credentials = ?fingerprints, "renewed"
                );
            }
            return result;
        }
        let event = ExchangeEvent::new(rfc3339(self.now()), request_id, policy, identity, &result, &self.audit)
            .for_renewal(lease_id);
        let written = self.audit.write(&event).await;
        self.fail_closed(written, result, "renewal").await
    }
}
