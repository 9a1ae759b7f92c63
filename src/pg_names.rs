//! PostgreSQL's identifiers as the `postgres` backend and its policies use them, as pure
//! functions: what a grant may name, which group roles a job must never hold, the login role's
//! name for a lease, and quoting for SQL.

/// The longest identifier PostgreSQL keeps (NAMEDATALEN − 1); a longer one is silently cut,
/// which could make two names one.
pub const MAX_IDENTIFIER: usize = 63;

/// A group role or database name a policy may write: lowercase letters, digits, `_` and `-`,
/// starting with a letter or `_`, at most 63 bytes. Quoted wherever it reaches SQL anyway
/// ([`quote_ident`]); the narrow set keeps what a policy says and what the database does the
/// same (no case folding, no look-alike characters).
pub fn check_identifier(name: &str) -> Result<(), String> {
    let ok = (1..=MAX_IDENTIFIER).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err("is not a role or database name (lowercase letters, digits, `_`, `-`; at most 63)".into())
    }
}

/// Why a group role is never granted to a job by its name alone: the bootstrap superuser,
/// PostgreSQL's predefined roles that read or write the server's files or run programs as the
/// server (superuser in all but name), and the managed clouds' administrator roles. The backend
/// also refuses any role whose attributes (or whose own memberships') make it superuser-like.
pub fn forbidden_group_role(name: &str) -> Option<&'static str> {
    Some(match name {
        "postgres" => "is the bootstrap superuser",
        "pg_read_server_files" | "pg_write_server_files" => "reads or writes any file the server can",
        "pg_execute_server_program" => "runs programs on the database server",
        "pg_signal_backend" => "cancels and terminates other sessions",
        "pg_database_owner" => "owns the database",
        "rds_superuser" | "azure_pg_admin" | "cloudsqlsuperuser" | "alloydbsuperuser" => {
            "is a managed database's administrator role"
        }
        _ if name.starts_with("pg_") => return None,
        _ => return None,
    })
}

/// `"name"`, with every `"` doubled: safe for any text, though names here are checked first.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'`, with every `'` doubled, for a literal PostgreSQL does not take as a parameter
/// (`PASSWORD`, `VALID UNTIL` in `CREATE ROLE`). Refuses a NUL, which PostgreSQL cannot hold.
pub fn quote_literal(text: &str) -> Option<String> {
    (!text.contains('\0')).then(|| format!("'{}'", text.replace('\'', "''")))
}

/// A login role of a lease: the backend's prefix, the lease id and `suffix` (which tells apart
/// the roles a renewed lease gets), lowercased (PostgreSQL folds unquoted names, and `psql -U`
/// users type them), `-` as `_`. Derived from the lease id only, never from claim text; at most
/// 63 bytes, or `None`.
pub fn login_role(prefix: &str, lease_id: &str, suffix: &str) -> Option<String> {
    let name: String = format!("{prefix}{lease_id}_{suffix}")
        .chars()
        .map(|c| if c == '-' { '_' } else { c.to_ascii_lowercase() })
        .collect();
    let ok =
        name.len() <= MAX_IDENTIFIER && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    ok.then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_a_policy_may_write_and_roles_it_may_never_grant() {
        for ok in ["app_readonly", "_x", "reports-ro", "a1"] {
            assert!(check_identifier(ok).is_ok(), "{ok}");
        }
        for bad in ["", "App", "1x", "a\"b", "a b", "a;drop", "ümlaut", &"x".repeat(64)] {
            assert!(check_identifier(bad).is_err(), "{bad:?}");
        }
        for role in ["postgres", "pg_execute_server_program", "pg_write_server_files", "rds_superuser"] {
            assert!(forbidden_group_role(role).is_some(), "{role}");
        }
        assert!(forbidden_group_role("pg_read_all_data").is_none() && forbidden_group_role("app_rw").is_none());
    }

    #[test]
    fn quoting_doubles_the_quote_and_a_login_role_comes_from_the_lease_id_only() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's").unwrap(), "'it''s'");
        assert!(quote_literal("a\0b").is_none());
        assert_eq!(login_role("ephemera_", "lse_01JD4X-ab", "1f").unwrap(), "ephemera_lse_01jd4x_ab_1f");
        assert!(login_role("ephemera_", &"x".repeat(60), "1f").is_none(), "too long for PostgreSQL");
        assert!(login_role("ephemera_", "lse_\"x", "1f").is_none());
    }
}
