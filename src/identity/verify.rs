//! Token verification, step by step (DESIGN §1 step 1). The order matters: nothing about the
//! token is trusted, and no network request is made, before its `iss` selects a configured
//! issuer; no claim is trusted before the signature verifies.

use super::jwks::Jwks;
use super::{IdentityError, Inner, VerifiedIdentity};
use crate::claims::Claims;
use crate::claims::Platform;
use crate::clock::{Clock, UnixSeconds};
use crate::config::IssuerConfig;
use crate::ids::b64url_decode;
use crate::secret::sha256_hex;
use jsonwebtoken::Algorithm;
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;

/// Real CI tokens are 1–3 KB; anything far larger is refused before it is decoded.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// One configured issuer at run time.
pub struct Issuer {
    pub config: IssuerConfig,
    pub jwks: Arc<Jwks>,
    /// Set when more than one issuer of this platform is configured (DESIGN §3).
    job_prefix: Option<String>,
}

pub struct Verifier {
    by_url: HashMap<String, Arc<Issuer>>,
}

/// The JOSE header fields we read. Unknown fields are ignored (RFC 7515 allows them), but the
/// dangerous registered ones are captured so they can be refused.
#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
    jwk: Option<Value>,
    jku: Option<Value>,
    x5u: Option<Value>,
    x5c: Option<Value>,
    crit: Option<Value>,
}

impl Verifier {
    pub fn new(configs: &[IssuerConfig], http: &reqwest::Client, clock: &Arc<dyn Clock>) -> Result<Verifier, String> {
        let mut by_url = HashMap::new();
        for config in configs {
            let same_platform = configs.iter().filter(|c| c.platform == config.platform).count();
            let issuer = Issuer {
                config: config.clone(),
                jwks: Arc::new(Jwks::new(config, http.clone(), clock.clone())?),
                job_prefix: (same_platform > 1).then(|| config.name.clone()),
            };
            by_url.insert(config.url.clone(), Arc::new(issuer));
        }
        Ok(Verifier { by_url })
    }

    pub fn issuers(&self) -> impl Iterator<Item = &Arc<Issuer>> {
        self.by_url.values()
    }

    /// The configured issuer named `name`.
    pub fn issuer(&self, name: &str) -> Option<&Arc<Issuer>> {
        self.by_url.values().find(|i| i.config.name == name)
    }

    /// Verifies `token` at time `now`.
    pub async fn verify(&self, token: &str, now: UnixSeconds) -> Result<VerifiedIdentity, IdentityError> {
        if token.is_empty() {
            return Err(IdentityError::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(IdentityError::TooLarge(token.len()));
        }
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(IdentityError::Malformed("not three dot-separated parts"));
        };
        let header = parse_header(header_b64)?;
        let alg = parse_alg(&header.alg)?;
        // The payload is parsed once, here, before the signature check; it is trusted only after
        // the signature over exactly these bytes verifies below.
        let claims: Claims = b64url_decode(payload_b64)
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or(IdentityError::Malformed("payload is not a base64url JSON object"))?;
        // SSRF / confused deputy: the unverified `iss` only *selects* among configured issuers.
        // An unknown issuer is refused here, before any key lookup, so no request leaves.
        let iss = claims.get("iss").and_then(Value::as_str).ok_or(IdentityError::MissingClaim("iss"))?;
        let issuer = self.by_url.get(iss).ok_or_else(|| IdentityError::UnknownIssuer(iss.to_string()))?;
        // Algorithm confusion: the algorithm comes from the config; the token's `alg` must be one
        // of the pinned ones, never the other way round.
        if !issuer.config.algorithms.contains(&alg) {
            return Err(IdentityError::AlgorithmNotAllowed(header.alg));
        }
        let kid = header.kid.ok_or(IdentityError::MissingKid)?;
        let key = issuer.jwks.key(&kid).await.ok_or_else(|| IdentityError::UnknownKid(kid.clone()))?;
        if key.family != alg.family() || key.alg.is_some_and(|a| a != alg) {
            return Err(IdentityError::KeyAlgorithmMismatch);
        }
        let message = &token[..header_b64.len() + 1 + payload_b64.len()];
        let valid = jsonwebtoken::crypto::verify(signature_b64, message.as_bytes(), &key.key, alg).unwrap_or(false);
        if !valid {
            return Err(IdentityError::BadSignature);
        }
        issuer.check_claims(&claims, now)?;
        issuer.identity(claims, token)
    }
}

fn parse_header(header_b64: &str) -> Result<Header, IdentityError> {
    let bytes = b64url_decode(header_b64).ok_or(IdentityError::Malformed("header is not base64url"))?;
    // A header as an array of its fields (`["RS256", "k1"]`) would parse into `Header`: refused,
    // as RFC 7519 §7.2 says, rather than read in a form no issuer writes.
    if !crate::claims::is_json_object(&bytes) {
        return Err(IdentityError::Malformed("header is not a JSON object with `alg`"));
    }
    let header: Header = serde_json::from_slice(&bytes)
        .map_err(|_| IdentityError::Malformed("header is not a JSON object with `alg`"))?;
    // Key injection: `jwk`/`jku`/`x5u`/`x5c` let a token name its own verification key. We
    // never use them; refusing them outright keeps a future refactor from starting to.
    for (name, present) in [
        ("jwk", header.jwk.is_some()),
        ("jku", header.jku.is_some()),
        ("x5u", header.x5u.is_some()),
        ("x5c", header.x5c.is_some()),
    ] {
        if present {
            return Err(IdentityError::ForbiddenHeader(name));
        }
    }
    // RFC 7515 §4.1.11: a recipient that does not understand a `crit` extension must reject.
    if header.crit.is_some() {
        return Err(IdentityError::ForbiddenHeader("crit"));
    }
    Ok(header)
}

fn parse_alg(alg: &str) -> Result<Algorithm, IdentityError> {
    // `none` is not an algorithm jsonwebtoken knows, so it fails here; HMAC fails the pin.
    alg.parse::<Algorithm>().map_err(|_| IdentityError::AlgorithmNotAllowed(alg.to_string()))
}

/// A NumericDate claim: a JSON number, nothing else (a string `exp` is a type confusion that
/// some libraries silently skip).
fn time_claim(claims: &Claims, name: &'static str) -> Result<Option<UnixSeconds>, IdentityError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            let v =
                n.as_i64().or_else(|| n.as_f64().filter(|f| f.is_finite() && f.abs() < 1e15).map(|f| f.floor() as i64));
            v.map(Some).ok_or(IdentityError::BadClaimType(name))
        }
        Some(_) => Err(IdentityError::BadClaimType(name)),
    }
}

impl Issuer {
    /// Times, audience and required claims, against the injected `now` (jsonwebtoken's own time
    /// checks read the system clock, so they are not used).
    fn check_claims(&self, claims: &Claims, now: UnixSeconds) -> Result<(), IdentityError> {
        let leeway = self.config.leeway_secs;
        let exp = time_claim(claims, "exp")?.ok_or(IdentityError::MissingClaim("exp"))?;
        let iat = time_claim(claims, "iat")?.ok_or(IdentityError::MissingClaim("iat"))?;
        if now - leeway >= exp {
            return Err(IdentityError::Expired { exp, now });
        }
        if let Some(nbf) = time_claim(claims, "nbf")?
            && now + leeway < nbf
        {
            return Err(IdentityError::NotYetValid { nbf, now });
        }
        if iat > now + leeway {
            return Err(IdentityError::IssuedInFuture { iat, now });
        }
        // A stolen long-lived token is worth more; the issuer's tokens must be short.
        let lifetime = exp - iat;
        if lifetime > self.config.max_token_lifetime_secs || now - iat > self.config.max_token_lifetime_secs + leeway {
            return Err(IdentityError::LifetimeTooLong { lifetime, max: self.config.max_token_lifetime_secs });
        }
        // Audience: a token minted for another relying party must not work here.
        let audience_ok = match claims.get("aud") {
            Some(Value::String(a)) => self.config.audiences.contains(a),
            Some(Value::Array(list)) => {
                list.iter().filter_map(Value::as_str).any(|a| self.config.audiences.iter().any(|c| c == a))
            }
            None => return Err(IdentityError::MissingClaim("aud")),
            Some(_) => return Err(IdentityError::BadClaimType("aud")),
        };
        if !audience_ok {
            return Err(IdentityError::WrongAudience);
        }
        match claims.get("sub") {
            Some(Value::String(s)) if !s.is_empty() => Ok(()),
            Some(Value::String(_)) | None => Err(IdentityError::MissingClaim("sub")),
            Some(_) => Err(IdentityError::BadClaimType("sub")),
        }
    }

    fn identity(&self, claims: Claims, token: &str) -> Result<VerifiedIdentity, IdentityError> {
        let job = self.job_key(self.config.job_key.job_key(&claims)?);
        let text = |name: &str| claims.get(name).and_then(Value::as_str).map(str::to_string);
        Ok(VerifiedIdentity(Arc::new(Inner {
            issuer: self.config.name.clone(),
            platform: self.config.platform,
            subject: text("sub").unwrap_or_default(),
            jti: text("jti"),
            expires_at: time_claim(&claims, "exp")?.unwrap_or_default(),
            job,
            claims: Arc::new(claims),
            token_sha256: sha256_hex(token.as_bytes()),
            replay_leeway: self.config.replay_protection.then_some(self.config.leeway_secs),
        })))
    }

    pub fn platform(&self) -> Platform {
        self.config.platform
    }

    /// A platform job key (`github:…`, `gitlab:…`) as this issuer's leases carry it: prefixed
    /// with the issuer's name where more than one issuer of the platform is configured
    /// (DESIGN §3). Tokens and webhooks both go through here, so their keys always agree.
    pub fn job_key(&self, key: String) -> String {
        match &self.job_prefix {
            Some(prefix) => format!("{prefix}:{key}"),
            None => key,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// serde reads `Header` from an array of all its fields in order, so `["RS256", "k1", null,
    /// null, null, null, null]` would be `{"alg": "RS256", "kid": "k1"}`: only the object form is
    /// a JOSE header (RFC 7519 §7.2).
    #[test]
    fn a_header_written_as_an_array_of_its_fields_is_refused() {
        let encode = |json: &str| crate::ids::b64url(json.as_bytes());
        assert!(parse_header(&encode(r#"["RS256", "k1", null, null, null, null, null]"#)).is_err());
        let header = parse_header(&encode(r#" {"alg": "RS256", "kid": "k1"}"#)).unwrap();
        assert_eq!((header.alg.as_str(), header.kid.as_deref()), ("RS256", Some("k1")));
    }
}
