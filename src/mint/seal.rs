//! Secrets a revoke handle must carry, sealed: AES-256-GCM under a key derived (HKDF-SHA256) from
//! a secret the backend already holds, bound to the lease by the associated data.
//!
//! Some credentials can only be revoked with themselves: GitHub ends an installation token by
//! `DELETE /installation/token` authenticated *with that token*. The handle that revokes it
//! lives in the ledger (the journal file, or the shared PostgreSQL table, and every export and
//! backup of either) for as long as the lease does. Attack: whoever reads a ledger backup or has
//! read access to the database gets live tokens. Sealed, the handle is useless without the
//! backend's own key (the App's private key, which mints tokens anyway, so holding it grants
//! nothing new); every replica given that key can still revoke what any other minted.
//!
//! Attack: a ledger writer swapping sealed handles between leases, so ending one lease revokes
//! another's token and leaves its own alive: the lease id is the associated data, so a handle
//! opens only under its own lease.

use crate::ids::b64url;
use crate::secret::SecretString;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf::{HKDF_SHA256, Salt};
use ring::rand::{SecureRandom, SystemRandom};

/// Domain separation: a key derived here is never the key of anything else derived from the
/// same secret.
const SALT: &[u8] = b"ephemera revoke-handle seal v1";

pub struct Sealer {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl Sealer {
    /// The sealing key derived from `secret` (high-entropy key material, e.g. a private key's
    /// DER bytes) for `purpose` (which backend, which App).
    pub fn derive(secret: &[u8], purpose: &str) -> Sealer {
        let prk = Salt::new(HKDF_SHA256, SALT).extract(secret);
        let info = [purpose.as_bytes()];
        let mut bytes = [0u8; 32];
        // Invariant: 32 bytes is AES-256's key length and within HKDF-SHA256's output limit
        // (255 × 32), so neither call can fail.
        #[allow(clippy::expect_used)]
        prk.expand(&info, &AES_256_GCM).expect("32-byte okm").fill(&mut bytes).expect("32-byte okm");
        #[allow(clippy::expect_used)]
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &bytes).expect("a 32-byte AES-256 key"));
        Sealer { key, rng: SystemRandom::new() }
    }

    /// `plaintext` sealed for `lease`: base64url of a random 96-bit nonce, the ciphertext and the
    /// tag. A random nonce per seal: 2^32 seals under one key stay far below GCM's collision bound.
    pub fn seal(&self, plaintext: &str, lease: &str) -> Result<String, String> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| "no randomness for a nonce".to_string())?;
        let mut buf = plaintext.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(lease.as_bytes()), &mut buf)
            .map_err(|_| "sealing failed".to_string())?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(b64url(&out))
    }

    /// What [`Sealer::seal`] sealed for `lease`; an error (never the plaintext of something
    /// else) when the text was sealed under another key, for another lease, or altered.
    pub fn open(&self, sealed: &str, lease: &str) -> Result<SecretString, String> {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sealed)
            .map_err(|_| "the sealed value is not base64url".to_string())?;
        if bytes.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err("the sealed value is too short".into());
        }
        let (nonce, rest) = bytes.split_at(NONCE_LEN);
        let mut buf = rest.to_vec();
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| "bad nonce".to_string())?;
        let plain = self.key.open_in_place(nonce, Aad::from(lease.as_bytes()), &mut buf).map_err(|_| {
            "the sealed value does not open under this key for this lease (another key, another lease, or altered)"
                .to_string()
        })?;
        let text = std::str::from_utf8(plain).map_err(|_| "the sealed value is not text".to_string())?;
        Ok(SecretString::new(text.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_secret_opens_only_with_its_key_for_its_lease_and_unaltered() {
        let sealer = Sealer::derive(b"app private key bytes", "github-app gh 1");
        let sealed = sealer.seal("ghs_secret", "lse_a").unwrap();
        assert!(!sealed.contains("ghs_secret"));
        assert_eq!(sealer.open(&sealed, "lse_a").unwrap().expose(), "ghs_secret");
        assert_ne!(sealer.seal("ghs_secret", "lse_a").unwrap(), sealed, "a fresh nonce every time");
        assert!(sealer.open(&sealed, "lse_b").is_err(), "another lease's handle");
        let other = Sealer::derive(b"another key", "github-app gh 1");
        assert!(other.open(&sealed, "lse_a").is_err(), "another key");
        let purpose = Sealer::derive(b"app private key bytes", "github-app gh 2");
        assert!(purpose.open(&sealed, "lse_a").is_err(), "another purpose");
        let mut altered = sealed.clone().into_bytes();
        let last = altered.len() - 2;
        altered[last] = if altered[last] == b'A' { b'B' } else { b'A' };
        assert!(sealer.open(std::str::from_utf8(&altered).unwrap(), "lse_a").is_err(), "altered");
        assert!(sealer.open("", "lse_a").is_err() && sealer.open("!!", "lse_a").is_err());
    }
}
