//! The `jwt` backend: broker-signed JWTs for internal services, ES256 or EdDSA with a key parsed
//! once at start (jsonwebtoken's `encode` would re-parse it per token). Revocation is
//! `immediate`: relying services introspect, and the ledger answers inactive once revoked.

use super::keys::{FileKeys, KeySource};
use super::{Backend, BoxFuture, Credential, MintContext, MintError, Minted, Revocation, RevokeHandle};
use crate::clock::UnixSeconds;
use crate::ids::{b64url, b64url_decode, jwt_id};
use crate::policy::{Grant, GrantedCredential, ResolvedSpec};
use crate::secret::SecretString;
use ring::rand::SystemRandom;
use ring::signature::{self as sig, EcdsaKeyPair, Ed25519KeyPair, KeyPair};
use serde_json::{Map, Value, json};
use std::path::Path;
use std::sync::Arc;

enum SigningKey {
    Es256(EcdsaKeyPair),
    EdDsa(Ed25519KeyPair),
}

/// A signing key with its public half, `kid` (RFC 7638 thumbprint) and pre-encoded header.
pub struct JwtSigner {
    key: SigningKey,
    rng: SystemRandom,
    issuer: String,
    kid: String,
    header_b64: String,
    public_jwk: Value,
}

impl JwtSigner {
    /// The key named `name` from `keys` (PKCS#8, DER or PEM); with `generate`, a fresh ES256
    /// key is made and kept there first when there is none.
    pub fn from_source(keys: &dyn KeySource, name: &Path, generate: bool, issuer: &str) -> Result<JwtSigner, String> {
        let bytes = keys.pkcs8(name, generate)?;
        let der = super::keys::pem_to_der(&bytes)
            .ok_or_else(|| format!("signing key {}: not PKCS#8 DER or PEM", name.display()))?;
        JwtSigner::from_pkcs8(&der, issuer).map_err(|e| format!("signing key {}: {e}", name.display()))
    }

    /// The key file at `path`, generated (ES256, mode 0600) when absent.
    pub fn load_or_generate(path: &Path, issuer: &str) -> Result<JwtSigner, String> {
        JwtSigner::from_source(&FileKeys::new(""), path, true, issuer)
    }

    pub fn from_pkcs8(der: &[u8], issuer: &str) -> Result<JwtSigner, String> {
        let rng = SystemRandom::new();
        let (key, alg, jwk) = if let Ok(kp) = EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
        {
            let point = kp.public_key().as_ref();
            let (x, y) = point[1..].split_at(32);
            let jwk = json!({"crv": "P-256", "kty": "EC", "x": b64url(x), "y": b64url(y)});
            (SigningKey::Es256(kp), "ES256", jwk)
        } else if let Ok(kp) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
            let x = b64url(kp.public_key().as_ref());
            (SigningKey::EdDsa(kp), "EdDSA", json!({"crv": "Ed25519", "kty": "OKP", "x": x}))
        } else {
            return Err("not an ECDSA P-256 or Ed25519 PKCS#8 key".into());
        };
        // RFC 7638: the thumbprint hashes the required members in lexicographic order, which is
        // how serde_json's (sorted) map serializes them.
        let kid = b64url(ring::digest::digest(&ring::digest::SHA256, jwk.to_string().as_bytes()).as_ref());
        let mut public_jwk = jwk;
        if let Some(obj) = public_jwk.as_object_mut() {
            obj.insert("kid".into(), json!(kid));
            obj.insert("alg".into(), json!(alg));
            obj.insert("use".into(), json!("sig"));
        }
        let header_b64 = b64url(json!({"alg": alg, "kid": kid, "typ": "JWT"}).to_string().as_bytes());
        Ok(JwtSigner { key, rng, issuer: issuer.to_string(), kid, header_b64, public_jwk })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn public_jwk(&self) -> &Value {
        &self.public_jwk
    }

    /// Signs claims into a compact JWS.
    pub fn sign(&self, claims: &Map<String, Value>) -> Result<String, String> {
        let payload = serde_json::to_vec(claims).map_err(|e| e.to_string())?;
        let mut token = format!("{}.{}", self.header_b64, b64url(&payload));
        let signature = match &self.key {
            SigningKey::Es256(kp) => {
                kp.sign(&self.rng, token.as_bytes()).map_err(|_| "ECDSA signing failed".to_string())?.as_ref().to_vec()
            }
            SigningKey::EdDsa(kp) => kp.sign(token.as_bytes()).as_ref().to_vec(),
        };
        token.push('.');
        token.push_str(&b64url(&signature));
        Ok(token)
    }

    /// Verifies a token this signer issued and returns its claims. Used by introspection, so a
    /// forged JWT naming a live lease id is never reported active.
    pub fn verify(&self, token: &str) -> Option<Map<String, Value>> {
        let mut parts = token.splitn(3, '.');
        let (header, payload, signature) = (parts.next()?, parts.next()?, parts.next()?);
        if header != self.header_b64 {
            return None;
        }
        let alg: &dyn sig::VerificationAlgorithm = match self.key {
            SigningKey::Es256(_) => &sig::ECDSA_P256_SHA256_FIXED,
            SigningKey::EdDsa(_) => &sig::ED25519,
        };
        let public = match &self.key {
            SigningKey::Es256(kp) => kp.public_key().as_ref(),
            SigningKey::EdDsa(kp) => kp.public_key().as_ref(),
        };
        let message = &token[..header.len() + 1 + payload.len()];
        sig::UnparsedPublicKey::new(alg, public).verify(message.as_bytes(), &b64url_decode(signature)?).ok()?;
        serde_json::from_slice(&b64url_decode(payload)?).ok()
    }

    /// Is `header_b64` (the first part of a token) this signer's?
    pub fn owns(&self, token: &str) -> bool {
        token.split('.').next() == Some(self.header_b64.as_str())
    }
}

pub struct JwtBackend {
    signer: Arc<JwtSigner>,
}

impl JwtBackend {
    pub fn new(signer: Arc<JwtSigner>) -> JwtBackend {
        JwtBackend { signer }
    }

    fn mint_now(
        &self,
        grant: &Grant,
        credential: &GrantedCredential,
        ctx: MintContext<'_>,
    ) -> Result<Minted, MintError> {
        let ResolvedSpec::Jwt { audience, claims: extra } = &credential.spec else {
            return Err(MintError::new(format!("grant `{}` is not a jwt grant", credential.name)));
        };
        let jti = jwt_id();
        let expires_at: UnixSeconds = grant.expires_at();
        let mut claims = extra.clone();
        for (k, v) in [
            ("iss", json!(self.signer.issuer)),
            ("sub", json!(grant.identity().job())),
            ("aud", json!(audience)),
            ("exp", json!(expires_at)),
            ("nbf", json!(ctx.now)),
            ("iat", json!(ctx.now)),
            ("jti", json!(jti)),
            ("lease_id", json!(ctx.lease_id)),
            ("policy", json!(grant.policy())),
        ] {
            claims.insert(k.to_string(), v);
        }
        let token = self.signer.sign(&claims).map_err(MintError::new)?;
        Ok(Minted {
            credential: Credential {
                kind: "jwt",
                revocation: Revocation::Immediate,
                expires_at,
                public: Vec::new(),
                secrets: vec![("token", SecretString::new(token))],
            },
            // A token exchange's token also names the leases above it, so ending one of them
            // finds it (`App::end_leases`).
            handle: RevokeHandle {
                backend: credential.backend.clone(),
                data: match extra.get("lease_chain") {
                    Some(chain) => json!({"jti": jti, "lease_chain": chain}),
                    None => json!({"jti": jti}),
                },
            },
        })
    }
}

impl Backend for JwtBackend {
    fn kind(&self) -> &'static str {
        "jwt"
    }

    fn revocation(&self) -> Revocation {
        Revocation::Immediate
    }

    fn mint<'a>(
        &'a self,
        grant: &'a Grant,
        credential: &'a GrantedCredential,
        ctx: MintContext<'a>,
    ) -> BoxFuture<'a, Result<Minted, MintError>> {
        Box::pin(async move { self.mint_now(grant, credential, ctx) })
    }

    /// Nothing to call: a broker JWT is dead once the ledger marks its lease revoked, because
    /// introspection consults the ledger.
    fn revoke<'a>(&'a self, _handle: &'a RevokeHandle) -> BoxFuture<'a, Result<(), MintError>> {
        Box::pin(async { Ok(()) })
    }

    /// Introspection answers from the lease's state, and revoking does nothing more: at expiry
    /// there is nothing to do.
    fn quiet_at_expiry(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_signs_tokens_it_verifies_and_refuses_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/jwt.pk8");
        let signer = JwtSigner::load_or_generate(&path, "http://127.0.0.1:8080").unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let again = JwtSigner::load_or_generate(&path, "http://127.0.0.1:8080").unwrap();
        assert_eq!(signer.kid(), again.kid(), "the key is loaded, not regenerated");
        let mut claims = Map::new();
        claims.insert("sub".into(), json!("job"));
        let token = signer.sign(&claims).unwrap();
        assert_eq!(signer.verify(&token).unwrap()["sub"], "job");
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = b64url(br#"{"sub":"other"}"#);
        parts[1] = &forged;
        assert!(signer.verify(&parts.join(".")).is_none());
    }
}
