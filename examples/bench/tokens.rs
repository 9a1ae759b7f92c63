//! GitHub-shaped CI tokens, signed RS256 with the committed test key `rsa-a`
//! (tests/fixtures/keys), from the claims fixture copied next to this file. Everything is
//! compiled in: the bench reads nothing outside the repository at run time.

use ephemera::claims::Claims;
use ephemera::ids::b64url;
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use serde_json::{Value, json};

pub const KID: &str = "rsa-a";
const PKCS8: &[u8] = include_bytes!("../../tests/fixtures/keys/rsa-a.pk8");
const MODULUS: &str = include_str!("../../tests/fixtures/keys/rsa-a.n");
const FIXTURE: &str = include_str!("github-environment-deploy.json");

/// `repository_id` and `run_attempt` of the fixture: with `run_id` and `check_run_id` they make
/// the job key `github:74:{run_id}:2:{check_run_id}`.
pub const REPOSITORY_ID: u64 = 74;
pub const RUN_ATTEMPT: u64 = 2;

pub struct Issuer {
    pub url: String,
    pub audience: String,
    key: RsaKeyPair,
}

/// The fixture's claims (~1 KB when encoded).
pub fn fixture_claims() -> Claims {
    serde_json::from_str(FIXTURE).unwrap()
}

/// The JWKS document publishing the test key.
pub fn jwks() -> Value {
    json!({"keys": [{"kty": "RSA", "kid": KID, "use": "sig", "alg": "RS256", "n": MODULUS.trim(), "e": "AQAB"}]})
}

/// The public key as the broker holds it (`DecodingKey::from_rsa_components`).
pub fn decoding_key() -> jsonwebtoken::DecodingKey {
    jsonwebtoken::DecodingKey::from_rsa_components(MODULUS.trim(), "AQAB").unwrap()
}

/// The job key the broker derives from token `i`'s claims (and a webhook for that job ends).
pub fn job_ids(i: u64) -> (u64, u64) {
    (1_000_000_000 + i, 90_000_000_000 + i)
}

impl Issuer {
    pub fn new(url: &str, audience: &str) -> Issuer {
        Issuer { url: url.to_string(), audience: audience.to_string(), key: RsaKeyPair::from_pkcs8(PKCS8).unwrap() }
    }

    /// Token `i`'s claims: the fixture re-stamped for this issuer at `now`, with its own `jti`
    /// and job (`run_id`, `check_run_id`), as the platform mints them.
    pub fn claims(&self, i: u64, now: i64) -> Claims {
        let (run_id, check_run_id) = job_ids(i);
        let mut c = fixture_claims();
        for (k, v) in [
            ("iss", json!(self.url)),
            ("aud", json!(self.audience)),
            ("iat", json!(now)),
            ("nbf", json!(now)),
            ("exp", json!(now + 3300)),
            ("jti", json!(b64url(&ephemera::ids::random::<16>()))),
            ("run_id", json!(run_id.to_string())),
            ("check_run_id", json!(check_run_id.to_string())),
        ] {
            c.insert(k.to_string(), v);
        }
        c
    }

    /// Signs RS256 with the test key.
    pub fn sign(&self, header: &Value, claims: &Claims) -> String {
        let message =
            format!("{}.{}", b64url(header.to_string().as_bytes()), b64url(&serde_json::to_vec(claims).unwrap()));
        let mut sig = vec![0; self.key.public().modulus_len()];
        self.key.sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), message.as_bytes(), &mut sig).unwrap();
        format!("{message}.{}", b64url(&sig))
    }

    pub fn token(&self, i: u64, now: i64) -> String {
        self.sign(&json!({"alg": "RS256", "typ": "JWT", "kid": KID}), &self.claims(i, now))
    }

    /// Tokens `first..first + n`, signed on every core (RSA signing is ~1 ms each).
    pub fn tokens(&self, first: u64, n: usize, now: i64) -> Vec<String> {
        let threads = std::thread::available_parallelism().map_or(2, |p| p.get());
        let per = n.div_ceil(threads).max(1);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let start = t * per;
                    let end = ((t + 1) * per).min(n);
                    s.spawn(move || (start..end).map(|i| self.token(first + i as u64, now)).collect::<Vec<_>>())
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        })
    }
}
