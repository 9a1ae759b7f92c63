//! A ring-backed [`CryptoProvider`] for jsonwebtoken 11 (it ships only aws-lc-rs and RustCrypto
//! ones; the RustCrypto RSA path measured 10× slower here). Verification only: the broker signs
//! its own JWTs with ring keys parsed once (`mint::jwt`), so nothing signs through jsonwebtoken.
//! HMAC is refused here too, as a second wall behind the algorithm pin in the config.

use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::{Error, ErrorKind};
use jsonwebtoken::jwk::ThumbprintHash;
use jsonwebtoken::signature::{self, Verifier};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind, EncodingKey};
use ring::signature as sig;

/// Installs the process-wide crypto providers exactly once: ring for rustls (the JWKS client) and
/// ring for jsonwebtoken. Without this, both crates compile and then panic at first use.
pub fn install_crypto() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Both calls fail only if a provider is already installed, which is what we want anyway.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let _ = RING_PROVIDER.install_default();
    });
}

pub static RING_PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: no_signer,
    verifier_factory: new_verifier,
    key_utils: KeyUtils {
        rsa_pub_components_from_private_key: |_| Err(ErrorKind::InvalidKeyFormat.into()),
        rsa_pub_components_from_public_key: |_| Err(ErrorKind::InvalidKeyFormat.into()),
        ec_pub_components_from_private_key: |_, _| Err(ErrorKind::InvalidKeyFormat.into()),
        ed_pub_components_from_private_key: |_, _| Err(ErrorKind::InvalidKeyFormat.into()),
        compute_digest,
    },
};

fn no_signer(_: &Algorithm, _: &EncodingKey) -> Result<Box<dyn JwtSigner>, Error> {
    Err(ErrorKind::InvalidAlgorithm.into())
}

fn compute_digest(data: &[u8], hash: ThumbprintHash) -> Result<Vec<u8>, Error> {
    let alg = match hash {
        ThumbprintHash::SHA256 => &ring::digest::SHA256,
        ThumbprintHash::SHA384 => &ring::digest::SHA384,
        ThumbprintHash::SHA512 => &ring::digest::SHA512,
        _ => return Err(ErrorKind::InvalidAlgorithm.into()),
    };
    Ok(ring::digest::digest(alg, data).as_ref().to_vec())
}

/// The ring verification algorithm for a JWS `alg`, or `None` for HMAC (refused).
fn ring_algorithm(alg: Algorithm) -> Option<(AlgorithmFamily, &'static dyn sig::VerificationAlgorithm)> {
    Some(match alg {
        Algorithm::RS256 => (AlgorithmFamily::Rsa, &sig::RSA_PKCS1_2048_8192_SHA256),
        Algorithm::RS384 => (AlgorithmFamily::Rsa, &sig::RSA_PKCS1_2048_8192_SHA384),
        Algorithm::RS512 => (AlgorithmFamily::Rsa, &sig::RSA_PKCS1_2048_8192_SHA512),
        Algorithm::PS256 => (AlgorithmFamily::Rsa, &sig::RSA_PSS_2048_8192_SHA256),
        Algorithm::PS384 => (AlgorithmFamily::Rsa, &sig::RSA_PSS_2048_8192_SHA384),
        Algorithm::PS512 => (AlgorithmFamily::Rsa, &sig::RSA_PSS_2048_8192_SHA512),
        Algorithm::ES256 => (AlgorithmFamily::Ec, &sig::ECDSA_P256_SHA256_FIXED),
        Algorithm::ES384 => (AlgorithmFamily::Ec, &sig::ECDSA_P384_SHA384_FIXED),
        Algorithm::EdDSA => (AlgorithmFamily::Ed, &sig::ED25519),
        // HMAC (and anything a future jsonwebtoken adds) is refused.
        _ => return None,
    })
}

fn new_verifier(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, Error> {
    let (family, ring_alg) = ring_algorithm(*alg).ok_or(ErrorKind::InvalidAlgorithm)?;
    // Key/algorithm confusion: an RSA key must never verify an EC token and so on.
    if key.family() != family {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    Ok(Box::new(RingVerifier { alg: *alg, ring_alg, key: key.clone() }))
}

struct RingVerifier {
    alg: Algorithm,
    ring_alg: &'static dyn sig::VerificationAlgorithm,
    key: DecodingKey,
}

impl Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        let ok = match self.key.kind() {
            DecodingKeyKind::SecretOrDer(bytes) => {
                sig::UnparsedPublicKey::new(self.ring_alg, bytes).verify(msg, signature)
            }
            DecodingKeyKind::RsaModulusExponent { n, e } => {
                let params = rsa_params(self.alg).ok_or_else(signature::Error::new)?;
                sig::RsaPublicKeyComponents { n, e }.verify(params, msg, signature)
            }
        };
        ok.map_err(|_| signature::Error::new())
    }
}

fn rsa_params(alg: Algorithm) -> Option<&'static sig::RsaParameters> {
    Some(match alg {
        Algorithm::RS256 => &sig::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &sig::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &sig::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &sig::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &sig::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &sig::RSA_PSS_2048_8192_SHA512,
        _ => return None,
    })
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, KeyPair};

    #[test]
    fn verifies_es256_and_refuses_hmac_and_family_confusion() {
        crate::identity::provider::install_crypto();
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&sig::ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let kp = EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
        let msg = b"header.payload";
        let s = crate::ids::b64url(kp.sign(&rng, msg).unwrap().as_ref());
        let key = DecodingKey::from_ec_der(kp.public_key().as_ref());
        assert!(jsonwebtoken::crypto::verify(&s, msg, &key, Algorithm::ES256).unwrap());
        assert!(!jsonwebtoken::crypto::verify(&s, b"header.other", &key, Algorithm::ES256).unwrap());
        assert!(jsonwebtoken::crypto::verify(&s, msg, &key, Algorithm::HS256).is_err());
        assert!(jsonwebtoken::crypto::verify(&s, msg, &key, Algorithm::RS256).is_err());
        assert!(jsonwebtoken::crypto::verify(&s, msg, &DecodingKey::from_secret(b"k"), Algorithm::HS256).is_err());
    }
}
