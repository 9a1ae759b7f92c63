//! app: the broker's one façade. It ties the rooms together and knows no HTTP:
//!
//! - [`exchange`]: verify → decide → mint → record → audit (`App::exchange`);
//! - [`renewal`]: a renewable lease's fresh credentials (`App::renew`);
//! - [`ending`]: every way a lease ends — the job's revoke, a webhook, an admin call, a policy
//!   change, expiry — and the reaper's pass;
//! - [`status`]: what callers may read: leases, introspection, readiness, metrics, explain;
//! - [`policies`]: the live policy set, its reloads, and what a change ends;
//! - [`ssh`]: the `ssh` backends' CA public key and KRL.
//!
//! Its fields are private: `http` and the server reach the rooms only through the methods here.

mod audit_event;
mod ending;
mod exchange;
pub mod policies;
pub mod recent;
mod renewal;
mod ssh;
mod status;
mod token_exchange;

pub use ending::RevokeReply;
pub use exchange::{ExchangeReply, ExchangeRequest, REASON_AUDIT_UNAVAILABLE, RenewInfo};
pub use token_exchange::{MAX_DELEGATION_DEPTH, TokenExchangeReply, TokenExchangeRequest};

use crate::audit::Audit;
use crate::clock::{Clock, UnixSeconds, rfc3339};
use crate::config::HooksConfig;
use crate::dev::DevIssuer;
use crate::error::Error;
use crate::identity::{VerifiedIdentity, Verifier};
use crate::ledger::LeaseStore;
use crate::limits::{Limits, Refusal};
use crate::metrics::Metrics;
use crate::mint::Backends;
use policies::LivePolicies;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

pub struct App {
    verifier: Verifier,
    policies: LivePolicies,
    backends: Backends,
    store: Box<dyn LeaseStore>,
    clock: Arc<dyn Clock>,
    metrics: Metrics,
    public_url: String,
    admin_token_sha256: Option<[u8; 32]>,
    /// Present only in `serve --dev`.
    dev: Option<Arc<DevIssuer>>,
    /// The store opened and every pending revocation and passed expiry resumed.
    resumed: AtomicBool,
    hooks: HooksConfig,
    audit: Audit,
    /// Recent refusals and per-minute outcomes, for the operator console.
    recent: recent::Recent,
    /// Abuse limits and the bound on requests issuing at once.
    limits: Limits,
}

/// Everything an [`App`] is built from (the server assembles it).
pub struct Parts {
    pub verifier: Verifier,
    pub policies: LivePolicies,
    pub backends: Backends,
    pub store: Box<dyn LeaseStore>,
    pub clock: Arc<dyn Clock>,
    pub public_url: String,
    pub admin_token_sha256: Option<[u8; 32]>,
    pub dev: Option<Arc<DevIssuer>>,
    pub hooks: HooksConfig,
    pub audit: Audit,
    pub limits: Limits,
}

impl App {
    pub fn new(parts: Parts) -> App {
        let Parts {
            verifier,
            policies,
            backends,
            store,
            clock,
            public_url,
            admin_token_sha256,
            dev,
            hooks,
            audit,
            limits,
        } = parts;
        App {
            verifier,
            policies,
            backends,
            store,
            clock,
            metrics: Metrics::default(),
            public_url,
            admin_token_sha256,
            dev,
            resumed: AtomicBool::new(false),
            hooks,
            audit,
            recent: recent::Recent::default(),
            limits,
        }
    }

    pub fn now(&self) -> UnixSeconds {
        self.clock.now()
    }

    /// `iss` of broker-signed JWTs.
    pub fn public_url(&self) -> &str {
        &self.public_url
    }

    /// The configured webhooks (the router mounts only those).
    pub fn hooks(&self) -> &HooksConfig {
        &self.hooks
    }

    /// `serve --dev`'s issuer.
    pub fn dev(&self) -> Option<&DevIssuer> {
        self.dev.as_deref()
    }

    /// The configured issuers and their key caches (the server starts their refreshers; tests
    /// and the bench drive them directly).
    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    pub fn audit(&self) -> &Audit {
        &self.audit
    }

    pub fn policies(&self) -> &LivePolicies {
        &self.policies
    }

    /// Counts an exchange's or a token exchange's outcome for the console, and keeps the record
    /// of a refusal (with the claims it was decided on).
    pub(crate) fn remember_outcome(
        &self,
        request_id: &str,
        endpoint: &'static str,
        policy: &str,
        identity: Option<&VerifiedIdentity>,
        result: Result<(), &crate::error::Error>,
    ) {
        let now = self.now();
        match result {
            Ok(()) => self.recent.count(now, Some(true)),
            Err(e) if recent::is_refusal(e) => {
                self.recent.count(now, Some(false));
                self.recent.refused(recent::Refusal::new(now, request_id, endpoint, policy, identity, e));
            }
            Err(_) => self.recent.count(now, None),
        }
    }

    /// The abuse limits (`http` checks the client's before any work, and takes an issuing slot).
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Before any work for a request from `client`: outside a cool-off, within the address's
    /// bucket. A refusal is audited once per key and window.
    pub async fn admit_client(&self, client: Option<std::net::IpAddr>, request_id: &str) -> Result<(), Error> {
        let refused = self.limits.admit_client(client, self.clock.now_micros());
        self.refused_by_limit(refused, request_id).await
    }

    /// A request from `client` failed as an attacker's would: charged to its failure budget.
    pub fn client_failed(&self, client: Option<std::net::IpAddr>, error: &Error) {
        if matches!(error, Error::InvalidToken(_) | Error::Denied(_) | Error::BadRequest(_) | Error::OAuth { .. }) {
            self.limits.failed(client, self.clock.now_micros());
        }
    }

    /// After verification: the repository's and the issuer's buckets.
    pub(crate) async fn admit_identity(&self, identity: &VerifiedIdentity, request_id: &str) -> Result<(), Error> {
        let refused = self.limits.admit_identity(identity, self.clock.now_micros());
        self.refused_by_limit(refused, request_id).await
    }

    async fn refused_by_limit(&self, refused: Result<(), Refusal>, request_id: &str) -> Result<(), Error> {
        let Err(refusal) = refused else { return Ok(()) };
        if let Some(count) = refusal.audit {
            // Not fail-closed: nothing was issued, and the refusal stands either way.
            let event = audit_event::RateLimitEvent::new(rfc3339(self.now()), request_id, &refusal, count);
            if let Err(e) = self.audit.write(&event).await {
                tracing::error!(error = %e, "rate-limit audit event not written");
            }
            tracing::warn!(limit = refusal.limit.as_str(), key = %refusal.key, refused = count, "rate limit engaged");
        }
        Err(refusal.error())
    }

    /// The lease store (shutdown flushes it; tests read it).
    pub fn store(&self) -> &dyn LeaseStore {
        &*self.store
    }
}
