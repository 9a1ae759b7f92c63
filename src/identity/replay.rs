//! Replay protection, in one place: a verified token serves one exchange per policy.
//!
//! The attack: a token copied out of a job's log, or sniffed by a step that runs after the
//! exchange, is replayed by someone else while it is still valid (GitHub's live 5–10 minutes,
//! GitLab's up to hours) to mint a second set of credentials. The defence has three parts:
//!
//! 1. **Here** (identity, which holds the issuer's config): the token's `jti`, the issuer's name
//!    and the policy make a [`ReplayKey`], kept until the token could no longer be accepted
//!    (`exp` + the issuer's leeway). An issuer with `replay_protection = false` yields none; a
//!    token without a `jti` from an issuer that has it on is refused ([`Replay::NoJti`]).
//! 2. **The lease store** records the key in the same step as the lease it issued
//!    (`LeaseStore::issue`), so two racing exchanges of one token cannot both be recorded: the
//!    loser's credentials are revoked before anything leaves. `LeaseStore::replay_seen` is the
//!    cheap check before minting, so a plain replay mints nothing.
//! 3. **The exchange** (`app`) turns either refusal into the `policy_denied` answer naming `jti`.
//!
//! Revocation is not an exchange: a job may revoke with a token whose `jti` was already used.

use crate::clock::UnixSeconds;
use crate::secret::sha256_hex;

/// One use of one token under one policy: a digest (the `jti` itself is not kept) and how long
/// it must be remembered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayKey {
    key: String,
    until: UnixSeconds,
}

impl ReplayKey {
    /// A key as a store recorded it (replayed from its own records).
    pub fn new(key: String, until: UnixSeconds) -> ReplayKey {
        ReplayKey { key, until }
    }

    /// SHA-256 of issuer, policy and `jti`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Until when a second use must be refused: the token's `exp` plus the issuer's leeway.
    pub fn until(&self) -> UnixSeconds {
        self.until
    }
}

/// What replay protection asks of one exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replay {
    /// The issuer has replay protection off.
    Off,
    /// Record this key with the lease; refuse if it was recorded before.
    Once(ReplayKey),
    /// Protection is on and the token has no `jti`: refuse.
    NoJti,
}

/// The rule for one identity: `leeway` is `Some` when its issuer has protection on.
pub(super) fn replay(
    issuer: &str,
    jti: Option<&str>,
    expires_at: UnixSeconds,
    leeway: Option<i64>,
    policy: &str,
) -> Replay {
    let Some(leeway) = leeway else { return Replay::Off };
    let Some(jti) = jti else { return Replay::NoJti };
    let key = sha256_hex(format!("{issuer}\0{policy}\0{jti}").as_bytes());
    Replay::Once(ReplayKey { key, until: expires_at + leeway })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_key_per_issuer_policy_and_jti_kept_for_the_token_life_plus_leeway() {
        let Replay::Once(a) = replay("github", Some("j1"), 100, Some(30), "deploy") else { panic!() };
        assert_eq!(a.until(), 130);
        assert_eq!(a.key().len(), 64, "a digest, not the jti");
        assert!(!a.key().contains("j1"));
        let other_policy = replay("github", Some("j1"), 100, Some(30), "other");
        let other_issuer = replay("gitlab", Some("j1"), 100, Some(30), "deploy");
        assert!(other_policy != Replay::Once(a.clone()) && other_issuer != Replay::Once(a.clone()));
        assert_eq!(replay("github", None, 100, Some(30), "deploy"), Replay::NoJti);
        assert_eq!(replay("github", Some("j1"), 100, None, "deploy"), Replay::Off);
    }
}
