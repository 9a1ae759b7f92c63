//! identity: turns a CI platform's OIDC ID token into a [`VerifiedIdentity`], which nothing
//! outside this module can construct. Knows no policy, no backend, no HTTP.

pub mod jwks;
pub mod provider;
mod replay;
mod verify;

pub use replay::{Replay, ReplayKey};
pub use verify::{Issuer, MAX_TOKEN_BYTES, Verifier};

use crate::claims::{ClaimError, Claims, Platform};
use crate::clock::UnixSeconds;
use std::fmt;
use std::sync::Arc;

/// Proof that a token was verified: signature, issuer, audience, times, required claims.
#[derive(Clone)]
pub struct VerifiedIdentity(Arc<Inner>);

struct Inner {
    issuer: String,
    platform: Platform,
    job: String,
    subject: String,
    jti: Option<String>,
    expires_at: UnixSeconds,
    claims: Arc<Claims>,
    token_sha256: String,
    /// The issuer's leeway when it has replay protection on.
    replay_leeway: Option<i64>,
}

impl VerifiedIdentity {
    /// The configured issuer's name (not its URL).
    pub fn issuer(&self) -> &str {
        &self.0.issuer
    }

    pub fn platform(&self) -> Platform {
        self.0.platform
    }

    /// The job key (DESIGN §3), built from verified claims only.
    pub fn job(&self) -> &str {
        &self.0.job
    }

    pub fn subject(&self) -> &str {
        &self.0.subject
    }

    pub fn jti(&self) -> Option<&str> {
        self.0.jti.as_deref()
    }

    pub fn expires_at(&self) -> UnixSeconds {
        self.0.expires_at
    }

    /// Every verified claim: what policies match against and templates read from.
    pub fn claims(&self) -> &Claims {
        &self.0.claims
    }

    /// The claims, shared (a lease keeps them without copying).
    pub fn claims_shared(&self) -> Arc<Claims> {
        self.0.claims.clone()
    }

    /// SHA-256 of the raw token, for logs and audit (the token itself is never kept).
    pub fn token_sha256(&self) -> &str {
        &self.0.token_sha256
    }

    /// What replay protection asks of an exchange of this token under `policy` ([`replay`]).
    pub fn replay(&self, policy: &str) -> Replay {
        replay::replay(&self.0.issuer, self.jti(), self.0.expires_at, self.0.replay_leeway, policy)
    }
}

impl VerifiedIdentity {
    /// The identity an earlier exchange verified, as its lease remembers it: for that lease's
    /// renewals only (issue 15), which re-decide its policy on the same claims and mint under
    /// the same job. The caller has proved it holds the lease's renew token; the claims are the
    /// broker's own record, not anything the caller sent. `token_sha256` names what was
    /// presented (the renew token's digest), for the audit trail.
    pub fn remembered(
        issuer: &str,
        platform: Platform,
        job: &str,
        claims: Claims,
        expires_at: UnixSeconds,
        token_sha256: &str,
    ) -> VerifiedIdentity {
        let subject = claims.get("sub").and_then(serde_json::Value::as_str).unwrap_or_default().to_string();
        VerifiedIdentity(Arc::new(Inner {
            issuer: issuer.to_string(),
            platform,
            job: job.to_string(),
            subject,
            // No token was exchanged: replay protection has nothing to guard.
            jti: None,
            expires_at,
            claims: Arc::new(claims),
            token_sha256: token_sha256.to_string(),
            replay_leeway: None,
        }))
    }
}

impl fmt::Debug for VerifiedIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedIdentity")
            .field("issuer", &self.0.issuer)
            .field("job", &self.0.job)
            .field("subject", &self.0.subject)
            .field("token_sha256", &self.0.token_sha256)
            .finish_non_exhaustive()
    }
}

/// Why a token was refused. Public callers see one fixed message; this goes to the log. No
/// variant carries token bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityError {
    Missing,
    TooLarge(usize),
    Malformed(&'static str),
    /// A header that would let the token pick its own key (`jwk`, `jku`, `x5u`, `x5c`) or
    /// demand extensions we do not implement (`crit`).
    ForbiddenHeader(&'static str),
    AlgorithmNotAllowed(String),
    UnknownIssuer(String),
    MissingKid,
    UnknownKid(String),
    KeyAlgorithmMismatch,
    BadSignature,
    Expired {
        exp: UnixSeconds,
        now: UnixSeconds,
    },
    NotYetValid {
        nbf: UnixSeconds,
        now: UnixSeconds,
    },
    IssuedInFuture {
        iat: UnixSeconds,
        now: UnixSeconds,
    },
    LifetimeTooLong {
        lifetime: i64,
        max: i64,
    },
    WrongAudience,
    MissingClaim(&'static str),
    BadClaimType(&'static str),
    /// A renew token that is not the one the lease was issued with, or a lease that is not
    /// known: the same error for both, so a caller cannot probe which lease ids exist.
    RenewTokenRejected,
}

impl From<ClaimError> for IdentityError {
    fn from(e: ClaimError) -> Self {
        match e {
            ClaimError::Missing(c) => IdentityError::MissingClaim(c),
            ClaimError::BadType(c) => IdentityError::BadClaimType(c),
        }
    }
}

impl fmt::Display for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use IdentityError::*;
        match self {
            Missing => write!(f, "no bearer token in the Authorization header"),
            TooLarge(n) => write!(f, "token of {n} bytes is above the {MAX_TOKEN_BYTES}-byte limit"),
            Malformed(what) => write!(f, "malformed token: {what}"),
            ForbiddenHeader(h) => write!(f, "token header carries `{h}`, which is refused"),
            AlgorithmNotAllowed(a) => {
                write!(f, "algorithm `{}` is not pinned for this issuer", crate::clock::truncate(a, 16))
            }
            UnknownIssuer(iss) => {
                write!(f, "issuer `{}` is not configured (nothing was fetched)", crate::clock::truncate(iss, 200))
            }
            MissingKid => write!(f, "token header has no `kid`"),
            UnknownKid(kid) => write!(
                f,
                "no issuer key with kid `{}` (after at most one refetch per cooldown)",
                crate::clock::truncate(kid, 100)
            ),
            KeyAlgorithmMismatch => write!(f, "the key for this kid does not fit the token's algorithm"),
            BadSignature => write!(f, "signature does not verify"),
            Expired { exp, now } => write!(f, "token expired at {exp} (now {now})"),
            NotYetValid { nbf, now } => write!(f, "token not valid before {nbf} (now {now})"),
            IssuedInFuture { iat, now } => write!(f, "token issued in the future at {iat} (now {now})"),
            LifetimeTooLong { lifetime, max } => {
                write!(f, "token lifetime {lifetime}s is above the issuer's max_token_lifetime {max}s")
            }
            WrongAudience => write!(f, "no token audience is configured for this issuer"),
            MissingClaim(c) => write!(f, "required claim `{c}` is missing"),
            BadClaimType(c) => write!(f, "claim `{c}` has the wrong type"),
            RenewTokenRejected => write!(f, "renew token rejected (unknown lease, or not its token)"),
        }
    }
}
