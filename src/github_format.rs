//! GitHub's names and permission levels, as pure functions: what a policy may name (checked when
//! it loads) and what the `github-app` backend puts in a URL path or a token request (checked
//! again there, since a template renders claim text at decision time).

/// App permissions a token request may name, as GitHub's REST API spells them (the
/// `permissions` object of `POST /app/installations/{id}/access_tokens`). A name outside this
/// list is allowed with a warning: GitHub adds permissions, and refuses one it does not know.
pub const KNOWN_PERMISSIONS: [&str; 52] = [
    "actions",
    "administration",
    "artifact_metadata",
    "attestations",
    "checks",
    "codespaces",
    "contents",
    "custom_properties_for_organizations",
    "dependabot_secrets",
    "deployments",
    "discussions",
    "email_addresses",
    "environments",
    "followers",
    "git_ssh_keys",
    "gpg_keys",
    "interaction_limits",
    "issues",
    "members",
    "merge_queues",
    "metadata",
    "organization_administration",
    "organization_announcement_banners",
    "organization_copilot_seat_management",
    "organization_custom_org_roles",
    "organization_custom_properties",
    "organization_custom_roles",
    "organization_events",
    "organization_hooks",
    "organization_packages",
    "organization_personal_access_token_requests",
    "organization_personal_access_tokens",
    "organization_plan",
    "organization_projects",
    "organization_secrets",
    "organization_self_hosted_runners",
    "organization_user_blocking",
    "packages",
    "pages",
    "profile",
    "pull_requests",
    "repository_custom_properties",
    "repository_hooks",
    "repository_projects",
    "secret_scanning_alerts",
    "secrets",
    "security_events",
    "single_file",
    "starring",
    "statuses",
    "vulnerability_alerts",
    "workflows",
];

/// Permissions that hand a job more than its own code: repository settings and branch
/// protection (`administration`), the workflows that run with every secret (`workflows`),
/// secrets themselves, and anything organisation-wide. The lint says why for each.
pub fn dangerous_permission(name: &str) -> Option<&'static str> {
    Some(match name {
        "administration" => "changes repository settings, branch protection and rulesets, and deletes repositories",
        "workflows" => "edits .github/workflows, so it runs code of its choosing with every secret of the repository",
        "secrets" | "dependabot_secrets" | "organization_secrets" => "writes (and so replaces) secrets",
        "members" => "manages organisation members and teams",
        "repository_hooks" | "organization_hooks" => "adds webhooks that send every event to any URL",
        _ if name.starts_with("organization_") => "acts on the whole organisation, not one repository",
        _ => return None,
    })
}

/// `read` < `write` < `admin`; 0 for anything else.
pub fn level_rank(level: &str) -> u8 {
    match level {
        "read" => 1,
        "write" => 2,
        "admin" => 3,
        _ => 0,
    }
}

/// A permission name as GitHub spells them: lowercase words joined by `_`.
pub fn is_permission_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
}

/// A user or organisation login: letters, digits and `-` (GitHub Enterprise Server also allows
/// `_`), not starting with `-`, at most 100 characters. Safe in a URL path as it is.
pub fn check_owner(owner: &str) -> Result<(), String> {
    let ok = (1..=100).contains(&owner.len())
        && !owner.starts_with('-')
        && owner.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok { Ok(()) } else { Err("is not a GitHub account name (letters, digits, `-`, `_`; at most 100)".into()) }
}

/// A repository name: letters, digits, `.`, `-`, `_`, at most 100 characters, not `.` or `..`.
/// Safe in a URL path as it is.
pub fn check_repository_name(name: &str) -> Result<(), String> {
    let ok = (1..=100).contains(&name.len())
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err("is not a GitHub repository name (letters, digits, `.`, `-`, `_`; at most 100)".into())
    }
}

/// A grant's repository entry as rendered (`web`, or `octo-org/web` from `${repository}`) → the
/// bare name, which the token request takes. A full name must belong to `owner` (GitHub logins
/// compare without case): attack, a template that renders another owner's repository would
/// otherwise be requested under this owner's installation, or silently mean a different one.
pub fn repository_in_owner<'a>(owner: &str, entry: &'a str) -> Result<&'a str, String> {
    let name = match entry.split_once('/') {
        Some((of, name)) if of.eq_ignore_ascii_case(owner) => name,
        Some(_) => return Err("names a repository of another owner".into()),
        None => entry,
    };
    check_repository_name(name)?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_change_a_url_path_are_refused() {
        for bad in ["", "a/b", "..", ".", "a%2fb", "a?b", "a b", &"x".repeat(101)] {
            assert!(check_repository_name(bad).is_err(), "{bad:?}");
        }
        for bad in ["", "-x", "a/b", "a.b", "a%b", &"x".repeat(101)] {
            assert!(check_owner(bad).is_err(), "{bad:?}");
        }
        assert!(check_repository_name(".github").is_ok() && check_repository_name("web-app_2.0").is_ok());
        assert!(check_owner("octo-org").is_ok() && check_owner("ghe_user").is_ok());
    }

    #[test]
    fn a_full_name_must_belong_to_the_owner_case_insensitively() {
        assert_eq!(repository_in_owner("octo-org", "web"), Ok("web"));
        assert_eq!(repository_in_owner("octo-org", "Octo-Org/web"), Ok("web"));
        assert!(repository_in_owner("octo-org", "evil/web").is_err());
        assert!(repository_in_owner("octo-org", "octo-org/a/b").is_err(), "a name with a slash");
    }

    #[test]
    fn levels_order_and_dangerous_permissions_are_named() {
        assert!(level_rank("read") < level_rank("write") && level_rank("write") < level_rank("admin"));
        assert_eq!(level_rank("none"), 0);
        for p in ["administration", "workflows", "secrets", "organization_plan", "members"] {
            assert!(dangerous_permission(p).is_some(), "{p}");
        }
        assert!(dangerous_permission("contents").is_none() && dangerous_permission("pull_requests").is_none());
        assert!(KNOWN_PERMISSIONS.windows(2).all(|w| w[0] < w[1]), "sorted, so a binary search works");
        assert!(KNOWN_PERMISSIONS.iter().all(|p| is_permission_name(p)));
    }
}
