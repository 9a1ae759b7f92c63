//! A lease and what belongs to it: its states, its credentials' revoke handles, the claims it
//! was granted on, the work a revocation hands out, the retry policy and the filters operators
//! list and end leases by. Plain data: every store keeps these.

use super::ClaimSnapshot;
use crate::claims::scalar_text;
use crate::clock::UnixSeconds;
use crate::identity::VerifiedIdentity;
use crate::mint::{Revocation, RevokeHandle};
use crate::policy::Grant;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LeaseState {
    Active,
    /// Ending: a backend has not confirmed every credential dead yet. Retried with backoff.
    Revoking,
    Revoked,
    Expired,
    /// Revocation failed [`RetryPolicy::max_attempts`] times. Still retried, slowly, forever;
    /// counted in metrics and listed by the admin API. Never dropped.
    Irrevocable,
}

impl LeaseState {
    pub const ALL: [LeaseState; 5] =
        [LeaseState::Active, LeaseState::Revoking, LeaseState::Revoked, LeaseState::Expired, LeaseState::Irrevocable];

    pub(super) fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LeaseState::Active => "active",
            LeaseState::Revoking => "revoking",
            LeaseState::Revoked => "revoked",
            LeaseState::Expired => "expired",
            LeaseState::Irrevocable => "irrevocable",
        }
    }

    pub fn parse(text: &str) -> Option<LeaseState> {
        LeaseState::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Still holding credentials that need ending.
    pub fn is_pending(self) -> bool {
        matches!(self, LeaseState::Revoking | LeaseState::Irrevocable)
    }
}

/// One credential of a lease: what revoking it needs. Names are interned ([`name`]); the revoke
/// handle's data is kept as compact JSON text (a `serde_json` map costs ~600 bytes even with
/// one entry) and parsed back only when the credential is revoked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "CredentialJson", into = "CredentialJson")]
pub struct LeaseCredential {
    pub name: Arc<str>,
    pub kind: Arc<str>,
    pub revocation: Revocation,
    pub backend: Arc<str>,
    /// The handle's data, as JSON text.
    pub data: Box<str>,
}

impl LeaseCredential {
    pub fn new(name: &str, kind: &str, revocation: Revocation, handle: &RevokeHandle) -> LeaseCredential {
        LeaseCredential {
            name: name::intern(name),
            kind: name::intern(kind),
            revocation,
            backend: name::intern(&handle.backend),
            data: handle.data.to_string().into_boxed_str(),
        }
    }

    /// The handle its backend revokes with.
    pub fn handle(&self) -> RevokeHandle {
        RevokeHandle { backend: self.backend.to_string(), data: self.data() }
    }

    /// The handle's data (e.g. a broker JWT's `jti`).
    pub fn data(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).unwrap_or_default()
    }
}

/// The JSON shape of a credential in journal records (`handle: {backend, data}`), unchanged
/// since the first journal format so old journals replay.
#[derive(Serialize, Deserialize)]
struct CredentialJson {
    name: String,
    kind: String,
    revocation: Revocation,
    handle: RevokeHandle,
}

impl From<CredentialJson> for LeaseCredential {
    fn from(c: CredentialJson) -> Self {
        LeaseCredential::new(&c.name, &c.kind, c.revocation, &c.handle)
    }
}

impl From<LeaseCredential> for CredentialJson {
    fn from(c: LeaseCredential) -> Self {
        CredentialJson {
            handle: c.handle(),
            name: c.name.to_string(),
            kind: c.kind.to_string(),
            revocation: c.revocation,
        }
    }
}

/// Interned names (policies, issuers, reasons, credential names, kinds, backends): a handful of
/// distinct values shared by every lease. Never freed; the sets are bounded by the config and the
/// code.
pub mod name {
    use std::collections::HashSet;
    use std::sync::{Arc, LazyLock, Mutex, PoisonError};

    static NAMES: LazyLock<Mutex<HashSet<Arc<str>>>> = LazyLock::new(|| Mutex::new(HashSet::new()));

    pub fn intern(text: &str) -> Arc<str> {
        let mut names = NAMES.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(found) = names.get(text) {
            return found.clone();
        }
        let new: Arc<str> = Arc::from(text);
        names.insert(new.clone());
        new
    }
}

/// One lease, as the ledger keeps it: compact, because a broker may hold a million (issue 7's
/// goal is ≤ 1 KiB each, claims included). The id and the job are shared with the indexes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    pub id: Arc<str>,
    pub job: Arc<str>,
    pub policy: Arc<str>,
    pub issuer: Arc<str>,
    pub created_at: UnixSeconds,
    pub expires_at: UnixSeconds,
    pub state: LeaseState,
    /// Why it is ending: `job`, `webhook`, `admin`, `expired`, …
    #[serde(default)]
    pub reason: Option<Arc<str>>,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub next_attempt_at: UnixSeconds,
    #[serde(default)]
    pub last_error: Option<Box<str>>,
    /// Every credential minted under it: the exchange's, then each renewal's.
    pub credentials: Box<[LeaseCredential]>,
    /// The verified claims it was granted on: for re-evaluation, filters and the audit trail.
    pub claims: ClaimSnapshot,
    /// Present when its policy lets the job renew it (issue 15): the lease lasts until
    /// `expires_at`, its credentials each their own short ttl, renewed on the way. Boxed: most
    /// leases have none, and a million leases pay 8 bytes each for it.
    #[serde(default)]
    pub renewal: Option<Box<Renewal>>,
}

/// What makes a lease renewable, and how often it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Renewal {
    /// SHA-256 (hex) of the renew token the exchange handed out: the token itself is never
    /// stored, so a copy of the ledger renews nothing.
    pub token_sha256: Box<str>,
    /// Renewals so far.
    pub count: u32,
    /// When the last one was recorded (0: never).
    pub last_at: UnixSeconds,
}

impl Lease {
    /// Does one of its credentials carry this broker JWT `jti` (an empty one never matches)?
    pub fn lists_jti(&self, jti: &str) -> bool {
        !jti.is_empty()
            && self.credentials.iter().any(|c| c.data().get("jti").and_then(serde_json::Value::as_str) == Some(jti))
    }

    /// A new, active lease for what one exchange minted: the job and claims of the verified
    /// identity, the policy and expiry of the grant, and each credential's revoke handle. With
    /// `renew_token_sha256` (the grant's policy allows renewal) it lasts until the grant's
    /// `renew_until`, renewable by whoever holds that token.
    pub fn new(
        id: &str,
        identity: &VerifiedIdentity,
        grant: &Grant,
        credentials: Box<[LeaseCredential]>,
        renew_token_sha256: Option<&str>,
        now: UnixSeconds,
    ) -> Lease {
        let renewal = match (renew_token_sha256, grant.renew_until()) {
            (Some(digest), Some(_)) => Some(Box::new(Renewal { token_sha256: digest.into(), count: 0, last_at: 0 })),
            _ => None,
        };
        let expires_at = match &renewal {
            Some(_) => grant.renew_until().unwrap_or(grant.expires_at()),
            None => grant.expires_at(),
        };
        Lease {
            id: id.into(),
            job: identity.job().into(),
            policy: name::intern(grant.policy()),
            issuer: name::intern(identity.issuer()),
            created_at: now,
            expires_at,
            state: LeaseState::Active,
            reason: None,
            attempts: 0,
            next_attempt_at: 0,
            last_error: None,
            credentials,
            claims: ClaimSnapshot::new(identity.claims()),
            renewal,
        }
    }

    pub fn is_live(&self, now: UnixSeconds) -> bool {
        self.state == LeaseState::Active && now < self.expires_at
    }

    /// Can a renewal add credentials to it at `now`? Active, renewable, not past its end, and
    /// renewed fewer than [`MAX_RENEWALS`] times.
    pub fn is_renewable(&self, now: UnixSeconds) -> bool {
        self.renewal.as_ref().is_some_and(|r| r.count < MAX_RENEWALS) && self.is_live(now)
    }

    pub(super) fn ends_with_expiry(&self) -> bool {
        self.reason.as_deref() == Some(REASON_EXPIRED)
    }
}

pub const REASON_EXPIRED: &str = "expired";

/// What a revocation must undo, handed out when a lease leaves `Active` (or is retried), with
/// what its audit event tells of the lease, so that recording a revocation reads nothing more.
#[derive(Debug, Clone)]
pub struct RevokeWork {
    pub lease_id: Arc<str>,
    pub credentials: Box<[LeaseCredential]>,
    pub job: Arc<str>,
    /// `None` only if a shared store lost the lease's other row (never written apart).
    pub policy: Option<Arc<str>>,
    pub issuer: Option<Arc<str>>,
    pub reason: Option<Arc<str>>,
}

impl RevokeWork {
    pub(super) fn of(lease: &Lease) -> RevokeWork {
        RevokeWork {
            lease_id: lease.id.clone(),
            credentials: lease.credentials.clone(),
            job: lease.job.clone(),
            policy: Some(lease.policy.clone()),
            issuer: Some(lease.issuer.clone()),
            reason: lease.reason.clone(),
        }
    }

    /// Is every credential of a backend in `quiet` (`LeaseStore::claim_due`)? Then its expiry
    /// needs nothing upstream. `false` for a lease with no credential: it takes the usual way.
    pub fn is_quiet(&self, quiet: &std::collections::BTreeSet<String>) -> bool {
        !self.credentials.is_empty() && self.credentials.iter().all(|c| quiet.contains(&*c.backend))
    }
}

/// Backoff for failed revocations.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Failures before a lease is declared irrevocable.
    pub max_attempts: u32,
    pub base_secs: i64,
    pub cap_secs: i64,
    /// How often an irrevocable lease is still tried.
    pub irrevocable_every_secs: i64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max_attempts: 8, base_secs: 2, cap_secs: 300, irrevocable_every_secs: 600 }
    }
}

impl RetryPolicy {
    /// Where a lease stands after its `attempts`-th failed attempt (counted from 1): still
    /// `revoking` with a backoff, or `irrevocable` and tried every so often.
    pub(super) fn after_failure(&self, attempts: u32, now: UnixSeconds) -> (LeaseState, UnixSeconds) {
        if attempts >= self.max_attempts {
            (LeaseState::Irrevocable, now + self.irrevocable_every_secs)
        } else {
            (LeaseState::Revoking, now + self.delay(attempts))
        }
    }

    /// Exponential backoff with ±25 % jitter, so many failing leases do not retry in lockstep.
    pub(super) fn delay(&self, attempts: u32) -> i64 {
        let exp = self.base_secs.saturating_mul(1i64 << attempts.min(30)).min(self.cap_secs);
        let jitter_range = (exp / 2).max(1);
        let r = i64::from(u16::from_le_bytes(crate::ids::random::<2>())) % jitter_range;
        (exp - exp / 4 + r).max(1)
    }
}

/// Renewals one lease may have. Each adds its credentials to the lease (every one is revoked when
/// it ends), so a job renewing in a loop would grow its lease without end: this bounds a lease's
/// size (about 100 bytes a credential) while leaving room for real jobs (a renewal every minute
/// for 16 hours, or every 10 minutes for a week).
pub const MAX_RENEWALS: u32 = 1000;

/// When a started revocation has not reported back after this long, the reaper tries again.
pub const STALLED_ATTEMPT_SECS: i64 = 60;

/// How long an ended lease stays visible (introspection answers, operators) before it is forgotten.
pub const ENDED_RETENTION_SECS: i64 = 3600;

/// Filters for listing and bulk revocation. Every given field must match.
#[derive(Debug, Default, Clone)]
pub struct LeaseFilter {
    pub job: Option<String>,
    pub policy: Option<String>,
    pub state: Option<LeaseState>,
    pub repository_id: Option<String>,
    pub project_id: Option<String>,
    /// GitHub `actor_id` or GitLab `user_id`.
    pub actor_id: Option<String>,
}

impl LeaseFilter {
    pub fn matches(&self, lease: &Lease) -> bool {
        let claim = |name: &str, want: &Option<String>| {
            want.as_ref().is_none_or(|w| lease.claims.get(name).as_ref().and_then(scalar_text).as_ref() == Some(w))
        };
        self.job.as_ref().is_none_or(|j| **j == *lease.job)
            && self.policy.as_ref().is_none_or(|p| **p == *lease.policy)
            && self.state.is_none_or(|s| s == lease.state)
            && claim("repository_id", &self.repository_id)
            && claim("project_id", &self.project_id)
            && self.actor_id.as_ref().is_none_or(|a| {
                ["actor_id", "user_id"]
                    .iter()
                    .any(|c| lease.claims.get(c).as_ref().and_then(scalar_text).as_ref() == Some(a))
            })
    }

    pub fn is_empty(&self) -> bool {
        self.job.is_none()
            && self.policy.is_none()
            && self.state.is_none()
            && self.repository_id.is_none()
            && self.project_id.is_none()
            && self.actor_id.is_none()
    }
}
