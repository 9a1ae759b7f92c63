//! Identifiers: lease ids (`lse_` + ULID), request ids (`req_`), JWT ids (`jti_`).

use crate::clock::UnixSeconds;
use ring::rand::{SecureRandom, SystemRandom};

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// Random bytes from the OS. Failure of the system RNG is unrecoverable for a broker.
pub fn random<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    // Invariant: ring's SystemRandom only fails if the OS has no entropy source at all.
    #[allow(clippy::expect_used)]
    SystemRandom::new().fill(&mut buf).expect("the OS random number generator failed");
    buf
}

/// A ULID (48-bit millisecond time, 80 random bits), Crockford base32: sortable by creation.
pub fn ulid(now: UnixSeconds) -> String {
    let millis = u128::try_from(now).unwrap_or(0).saturating_mul(1000) & ((1 << 48) - 1);
    let rand = random::<10>();
    let mut value = millis << 80;
    for (i, b) in rand.iter().enumerate() {
        value |= u128::from(*b) << (8 * (9 - i));
    }
    let mut out = [0u8; 26];
    for (i, slot) in out.iter_mut().enumerate() {
        let shift = 5 * (25 - i);
        *slot = CROCKFORD[((value >> shift) & 0x1f) as usize];
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn lease_id(now: UnixSeconds) -> String {
    format!("lse_{}", ulid(now))
}

pub fn request_id() -> String {
    format!("req_{}", b64url(&random::<12>()))
}

pub fn jwt_id() -> String {
    format!("jti_{}", b64url(&random::<16>()))
}

pub fn b64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

pub fn b64url_decode(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text).ok()
}

/// A lease id as the API accepts it: `lse_` and 26 Crockford characters, nothing else.
pub fn is_lease_id(text: &str) -> bool {
    text.strip_prefix("lse_").is_some_and(|rest| rest.len() == 26 && rest.bytes().all(|b| CROCKFORD.contains(&b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_ids_sort_by_creation_time_and_validate() {
        let a = lease_id(1_000);
        let b = lease_id(2_000);
        assert!(a < b, "{a} < {b}");
        assert!(is_lease_id(&a));
        assert!(!is_lease_id("lse_../../etc/passwd"));
        assert_ne!(lease_id(1_000), lease_id(1_000));
    }
}
