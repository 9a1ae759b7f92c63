//! Secrets that cannot leak by accident: `Debug` shows a SHA-256 fingerprint, never the value.

use ring::digest;
use std::fmt;

/// Hex SHA-256 of a value: what logs and audit records carry instead of a secret.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, data).as_ref())
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

/// A secret string (a token, a key, a credential). Only [`SecretString::expose`] reads it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn fingerprint(&self) -> String {
        sha256_hex(self.0.as_bytes())
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretString(sha256:{})", self.fingerprint())
    }
}

/// Constant-time equality for secrets compared against attacker input (timing attacks).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // Accumulate every byte difference; no early exit on the first mismatch.
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    a.len() == b.len() && std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_of_a_secret_shows_only_its_fingerprint() {
        let s = SecretString::new("hunter2".into());
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"));
        assert!(shown.contains(&sha256_hex(b"hunter2")));
    }
}
