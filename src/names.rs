//! Name rules shared by the config, the policies and the audit allowlist. A leaf.

/// Names of issuers, backends and policies: `[a-z0-9][a-z0-9-_]*`, at most 64 characters.
pub fn is_name(text: &str) -> bool {
    let mut bytes = text.bytes();
    text.len() <= 64
        && bytes.next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// A claim name as policies, templates and the audit allowlist may name it: ASCII letters,
/// digits, `_`, `-`, `.` and `/` (CircleCI's claims are `oidc.circleci.com/project-id`), at most
/// 128 characters.
pub fn is_claim_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_lowercase_slugs_and_claim_names_allow_dots() {
        assert!(is_name("deploy-web_2") && !is_name("Deploy") && !is_name("-x") && !is_name(&"a".repeat(65)));
        assert!(is_claim_name("groups_direct") && is_claim_name("a.b") && !is_claim_name("a b") && !is_claim_name(""));
        assert!(is_claim_name("oidc.circleci.com/project-id") && !is_claim_name("a:b") && !is_claim_name("a}"));
    }
}
