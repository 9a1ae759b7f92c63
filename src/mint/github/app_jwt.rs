//! The App's own JWT (RS256, signed with its private key): what authenticates the broker as the
//! App for installation lookups and token requests. GitHub accepts one for up to 10 minutes, so
//! it is signed once and reused until a minute before it expires, not per request (an RSA-2048
//! signature costs about a millisecond of CPU; oidcx signs one per mint). Concurrent callers
//! that find it stale wait for one signer, not each sign their own.

use crate::clock::UnixSeconds;
use crate::ids::b64url;
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// GitHub refuses an App JWT whose `exp` is more than 10 minutes ahead; `iat` is back-dated a
/// minute against clock drift (GitHub's own advice), so one lives `LIFETIME` in all.
const BACKDATE_SECS: i64 = 60;
const AHEAD_SECS: i64 = 9 * 60;
/// Renewed this long before `exp`: a JWT handed out is good for at least a minute more.
const RENEW_BEFORE_SECS: i64 = 60;

pub(super) struct AppJwt {
    app_id: u64,
    key: RsaKeyPair,
    rng: SystemRandom,
    /// (token, renew at).
    cached: Mutex<Option<(String, UnixSeconds)>>,
    /// One signer at a time: whoever finds the JWT stale signs; the others wait and reuse.
    signing: tokio::sync::Mutex<()>,
    signed: AtomicU64,
}

impl AppJwt {
    /// The App's key: PEM as GitHub hands it out (`BEGIN RSA PRIVATE KEY`, PKCS#1) or PKCS#8
    /// (`BEGIN PRIVATE KEY`), or either as DER. Also returns the key's DER bytes (for deriving
    /// the key that seals revoke handles).
    pub(super) fn from_key(bytes: &[u8], app_id: u64) -> Result<(AppJwt, Vec<u8>), String> {
        let der = crate::mint::keys::pem_to_der(bytes).ok_or("not PEM or DER")?;
        let key = RsaKeyPair::from_pkcs8(&der)
            .or_else(|_| RsaKeyPair::from_der(&der))
            .map_err(|e| format!("not an RSA private key (PKCS#1 or PKCS#8): {e}"))?;
        let jwt = AppJwt {
            app_id,
            key,
            rng: SystemRandom::new(),
            cached: Mutex::new(None),
            signing: tokio::sync::Mutex::new(()),
            signed: AtomicU64::new(0),
        };
        Ok((jwt, der))
    }

    /// A JWT good for at least another minute at `now`.
    pub(super) async fn get(&self, now: UnixSeconds) -> Result<String, String> {
        if let Some(token) = self.fresh(now) {
            return Ok(token);
        }
        let _one_signer = self.signing.lock().await;
        if let Some(token) = self.fresh(now) {
            return Ok(token); // another caller signed while this one waited
        }
        let token = self.sign(now)?;
        *lock(&self.cached) = Some((token.clone(), now + AHEAD_SECS - RENEW_BEFORE_SECS));
        Ok(token)
    }

    /// Drops the cached JWT (GitHub refused it: a clock jump, a revoked key), so the next call
    /// signs a fresh one.
    pub(super) fn forget(&self) {
        *lock(&self.cached) = None;
    }

    /// How many JWTs this process has signed.
    pub(super) fn signed(&self) -> u64 {
        self.signed.load(Ordering::Relaxed)
    }

    fn fresh(&self, now: UnixSeconds) -> Option<String> {
        let cached = lock(&self.cached);
        // A clock that went backwards past the signing time also re-signs (`iat` would be ahead).
        cached.as_ref().filter(|(_, renew_at)| now < *renew_at && now + AHEAD_SECS > *renew_at).map(|(t, _)| t.clone())
    }

    fn sign(&self, now: UnixSeconds) -> Result<String, String> {
        let header = b64url(br#"{"alg":"RS256","typ":"JWT"}"#);
        let claims = serde_json::json!({
            "iat": now - BACKDATE_SECS,
            "exp": now + AHEAD_SECS,
            "iss": self.app_id.to_string(),
        });
        let message = format!("{header}.{}", b64url(claims.to_string().as_bytes()));
        let mut signature = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(&RSA_PKCS1_SHA256, &self.rng, message.as_bytes(), &mut signature)
            .map_err(|_| "signing the App JWT failed".to_string())?;
        self.signed.fetch_add(1, Ordering::Relaxed);
        Ok(format!("{message}.{}", b64url(&signature)))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Vec<u8> {
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/keys/github-app.pem")).unwrap()
    }

    fn claims(token: &str) -> serde_json::Value {
        use base64::Engine;
        let payload = token.split('.').nth(1).unwrap();
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn the_app_jwt_is_signed_once_and_reused_until_a_minute_before_it_expires() {
        let (jwt, _) = AppJwt::from_key(&key(), 4242).unwrap();
        let first = jwt.get(1_000_000).await.unwrap();
        let c = claims(&first);
        assert_eq!(
            (c["iss"].as_str(), c["iat"].as_i64(), c["exp"].as_i64()),
            (Some("4242"), Some(999_940), Some(1_000_540))
        );
        assert!(c["exp"].as_i64().unwrap() - 1_000_000 <= 600, "GitHub refuses exp more than 10 minutes ahead");
        assert_eq!(jwt.get(1_000_000 + 479).await.unwrap(), first, "reused for 8 minutes");
        assert_eq!(jwt.signed(), 1);
        let second = jwt.get(1_000_000 + 480).await.unwrap();
        assert_ne!(second, first, "renewed a minute before exp");
        assert_eq!(jwt.signed(), 2);
        assert_ne!(jwt.get(1_000_000).await.unwrap(), second, "a clock that went back re-signs");
        jwt.forget();
        jwt.get(1_000_000).await.unwrap();
        assert_eq!(jwt.signed(), 4, "forget drops the cached JWT");
    }

    #[test]
    fn a_key_that_is_not_rsa_is_refused() {
        assert!(
            AppJwt::from_key(b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n", 1).is_err()
        );
        let ec = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &SystemRandom::new(),
        )
        .unwrap();
        let err = AppJwt::from_key(ec.as_ref(), 1).err().unwrap();
        assert!(err.contains("not an RSA private key"), "{err}");
    }
}
