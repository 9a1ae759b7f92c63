//! A SCRAM-SHA-256 verifier (RFC 5802, RFC 7677), in the form PostgreSQL stores in
//! `pg_authid.rolpassword`: `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, base64.
//! `CREATE ROLE … PASSWORD '<verifier>'` stores it as it is, so the password never reaches the
//! server, nor its statement log.

use base64::Engine;
use ring::{digest, hmac, pbkdf2};
use std::num::NonZeroU32;

/// PostgreSQL's default (`scram_iterations`).
const ITERATIONS: u32 = 4096;

/// The verifier of `password` with a fresh random 16-byte salt.
pub fn verifier(password: &str) -> String {
    verifier_with_salt(password, &crate::ids::random::<16>())
}

fn verifier_with_salt(password: &str, salt: &[u8]) -> String {
    let mut salted = [0u8; 32];
    let iterations = NonZeroU32::new(ITERATIONS).unwrap_or(NonZeroU32::MIN);
    pbkdf2::derive(pbkdf2::PBKDF2_HMAC_SHA256, iterations, salt, password.as_bytes(), &mut salted);
    let key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
    let client_key = hmac::sign(&key, b"Client Key");
    let stored_key = digest::digest(&digest::SHA256, client_key.as_ref());
    let server_key = hmac::sign(&key, b"Server Key");
    let b64 = base64::engine::general_purpose::STANDARD;
    format!(
        "SCRAM-SHA-256${ITERATIONS}:{}${}:{}",
        b64.encode(salt),
        b64.encode(stored_key.as_ref()),
        b64.encode(server_key.as_ref())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677's example: password `pencil`, salt `W22ZaJ0SNY7soEsUEjb6gQ==`, 4096 iterations.
    /// The keys were computed independently (Python's hashlib.pbkdf2_hmac and hmac); the
    /// integration tests log in to a real PostgreSQL with passwords stored this way.
    #[test]
    fn the_verifier_matches_the_rfc_7677_vector() {
        let salt = base64::engine::general_purpose::STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let v = verifier_with_salt("pencil", &salt);
        assert_eq!(
            v,
            "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
        );
        assert_ne!(verifier("pencil"), verifier("pencil"), "a fresh salt every time");
    }
}
