//! Compiling: one policy's YAML → a [`Policy`], or every error in it. Parse, don't validate: a
//! compiled policy holds parsed matchers, templates and ttls, so deciding never re-reads text.
//! Pure: what it knows of the broker config comes in a [`LoadContext`].

use super::file::{
    AwsGrantFile, GithubGrantFile, GithubPermissionLevel, JwtGrantFile, PolicyFile, PostgresGrantFile, RenewFile,
    SshGrantFile, TtlFile, parse_yaml,
};
use super::load::{IssuerFacts, LoadContext, PolicyError};
use super::matcher::Matcher;
use super::template::{Template, TemplateValue};
use super::{CredentialSpec, GrantSpec, Policy, Rule, delegation, lint};
use crate::claims::{CIRCLECI_SSH_RERUN, Platform};
use crate::clock::{format_duration, parse_duration};
use crate::names::{is_claim_name, is_name};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// Claims a broker JWT sets itself; a grant may not override them. `act`, `tool` and
/// `lease_chain` are a token exchange's (they say who acts, for which tool, under which leases);
/// `may_act` is a grant's to set (who may exchange the JWT further at `POST /oauth/token`).
const RESERVED_JWT_CLAIMS: [&str; 12] =
    ["iss", "sub", "aud", "exp", "nbf", "iat", "jti", "lease_id", "policy", "act", "tool", "lease_chain"];

/// Parse, don't validate: a file becomes a compiled [`Policy`] or a list of every error in it.
/// A file that is not YAML of the policy format is that one error; otherwise each step below
/// reports what it finds and the next step runs anyway.
pub(super) fn compile(name: &str, file: &Path, text: &str, ctx: &LoadContext) -> Result<Policy, Vec<PolicyError>> {
    let raw: PolicyFile = parse_yaml(text).map_err(|e| vec![PolicyError::new(file.to_path_buf(), String::new(), e)])?;
    let mut errors = Errors::new(file);
    check_issuer(&raw.issuer, ctx, &mut errors);
    let match_rules = compile_rules("match", &raw.match_rules, &mut errors);
    let mut deny_rules = compile_rules("deny", &raw.deny, &mut errors);
    if let Some(facts) = ctx.issuers.get(&raw.issuer) {
        deny_rules.extend(implied_deny_rules(facts.platform, &match_rules, &deny_rules));
        check_immutable_binding(&match_rules, facts, "match", &mut errors);
    }
    let (ttl_default_secs, ttl_max_secs) = compile_ttl(&raw.ttl, &mut errors);
    let grants = compile_grants(&raw.grants, ctx, ttl_max_secs, &mut errors);
    let data = delegation::compile_data(&raw.data, &mut errors);
    let tools = delegation::compile_tools(&raw.tools, &data, ctx, ttl_max_secs, &mut errors);
    let actors = delegation::compile_actors(&raw.actors, &tools, ctx, &mut errors);
    if grants.is_empty() && tools.is_empty() {
        errors.push("grants", "a policy must grant at least one credential, or list a tool under `tools`");
    }
    let renew_max_lease_secs = raw.renew.as_ref().map(|r| compile_renew(r, ttl_max_secs, ctx, &mut errors));
    errors.finish()?;
    Ok(Policy {
        name: Arc::from(name),
        source: file.to_path_buf(),
        description: raw.description,
        issuer: raw.issuer,
        match_rules,
        deny_rules,
        ttl_default_secs,
        ttl_max_secs,
        renew_max_lease_secs,
        grants,
        actors,
        tools,
        data,
        text: Arc::from(text),
        digest: Policy::digest_of(name, text),
    })
}

/// One file's errors, in the order [`compile`] finds them; the errors that are also lints (under
/// the lint's rule id) are reported after all the others.
pub(super) struct Errors<'a> {
    file: &'a Path,
    invalid: Vec<PolicyError>,
    lints: Vec<PolicyError>,
}

impl Errors<'_> {
    fn new(file: &Path) -> Errors<'_> {
        Errors { file, invalid: Vec::new(), lints: Vec::new() }
    }

    /// An error reported under [`lint::INVALID`].
    pub(super) fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.invalid.push(PolicyError::new(self.file.to_path_buf(), field.into(), message.into()));
    }

    /// An error that is also the lint `rule`, which the loader enforces.
    pub(super) fn lint(&mut self, rule: &'static str, field: impl Into<String>, message: String) {
        self.lints.push(PolicyError { file: self.file.to_path_buf(), field: field.into(), message, rule });
    }

    fn finish(mut self) -> Result<(), Vec<PolicyError>> {
        self.invalid.append(&mut self.lints);
        if self.invalid.is_empty() { Ok(()) } else { Err(self.invalid) }
    }
}

fn check_issuer(issuer: &str, ctx: &LoadContext, errors: &mut Errors<'_>) {
    if !ctx.issuers.contains_key(issuer) {
        let known = join(ctx.issuers.keys());
        errors.push("issuer", format!("`{issuer}` is not an issuer in the broker config (known: {known})"));
    }
}

/// The `match` or `deny` section: claim name → matcher.
pub(super) fn compile_rules(section: &str, map: &BTreeMap<String, Value>, errors: &mut Errors<'_>) -> Vec<Rule> {
    let mut out = Vec::new();
    for (claim, value) in map {
        let field = format!("{section}.{claim}");
        if !is_claim_name(claim) {
            errors.push(field.clone(), "not a claim name");
        }
        match Matcher::parse(value) {
            Ok(matcher) => out.push(Rule { claim: claim.clone(), matcher }),
            Err(e) => errors.push(field, e),
        }
    }
    out
}

/// [`lint::IMMUTABLE_ID`], enforced: some match rule must bind one of the issuer's identity
/// claims ([`IssuerFacts::identity_claims`]: ids never reused) to an exact value or a list.
pub(super) fn check_immutable_binding(match_rules: &[Rule], facts: &IssuerFacts, field: &str, errors: &mut Errors<'_>) {
    let immutable = facts.identity_claims();
    if match_rules.iter().any(|r| immutable.contains(&r.claim.as_str()) && r.matcher.is_binding()) {
        return;
    }
    let why = match facts.platform {
        Platform::GithubActions | Platform::GitlabCi => "names like `repository` can be re-registered by someone else",
        // Attack: every Buildkite organisation's jobs get tokens from the same issuer; a policy
        // that pins no organisation admits all of Buildkite's customers.
        Platform::Buildkite => {
            "Buildkite's issuer is shared by every Buildkite organisation, so without it any organisation's \
             job matches; the job asks for the claim with `buildkite-agent oidc request-token --claim \
             organization_id,pipeline_id`"
        }
        // Attack: the issuer is the organisation's; every project in it gets its tokens, and a
        // project's name can be taken again after it is removed.
        Platform::Circleci => "every project of the CircleCI organisation gets tokens from this issuer",
        // Attack: the issuer is the organisation's, and `sub` names the project and pipeline
        // by name only; a definition id repeats across projects.
        Platform::AzurePipelines => {
            "every pipeline of the Azure DevOps organisation gets tokens from this issuer, and `sub` names \
             the project and pipeline only by name"
        }
        // Attack: the issuer is the workspace's; every repository in it gets its tokens, and
        // `sub` changes with every step, so it pins nothing durable.
        Platform::Bitbucket => {
            "every repository of the Bitbucket workspace gets tokens from this issuer; `sub` changes with every \
             step and pins nothing"
        }
        Platform::Jenkins | Platform::Generic => "the issuer's config names these as its ids (identity_claims)",
    };
    errors.lint(
        lint::IMMUTABLE_ID,
        field,
        format!(
            "binds no immutable identity claim: add an exact value or list for one of {} ({why})",
            immutable.join(", ")
        ),
    );
}

/// Deny rules a platform's policies have unless they name the claim themselves.
///
/// Attack (CircleCI): "Rerun job with SSH" hands whoever clicks it a shell inside the job, with
/// its token; the grant's credentials would be theirs to copy. Denied unless the policy decides
/// about `oidc.circleci.com/ssh-rerun` itself (and then the `ssh-rerun-admitted` lint speaks).
fn implied_deny_rules(platform: Platform, match_rules: &[Rule], deny_rules: &[Rule]) -> Vec<Rule> {
    let named = |claim: &str| match_rules.iter().chain(deny_rules).any(|r| r.claim == claim);
    match platform {
        Platform::Circleci if !named(CIRCLECI_SSH_RERUN) => {
            vec![Rule { claim: CIRCLECI_SSH_RERUN.to_string(), matcher: Matcher::Exact("true".into()) }]
        }
        _ => Vec::new(),
    }
}

/// `ttl.default` and `ttl.max`, in seconds (0 for one that does not parse); the default at most
/// the max.
fn compile_ttl(ttl: &TtlFile, errors: &mut Errors<'_>) -> (i64, i64) {
    let mut parse = |field: &str, text: &str| {
        parse_duration(text).unwrap_or_else(|e| {
            errors.push(field, e);
            0
        })
    };
    let default_secs = parse("ttl.default", &ttl.default);
    let max_secs = parse("ttl.max", &ttl.max);
    if default_secs > max_secs {
        errors.push("ttl.default", "is above ttl.max");
    }
    (default_secs, max_secs)
}

/// `renew.max_lease`: at least `ttl.max` (a renewal gets credentials of `ttl`, and a lease shorter
/// than one of them would make renewing pointless), at most the broker's cap.
fn compile_renew(renew: &RenewFile, ttl_max_secs: i64, ctx: &LoadContext, errors: &mut Errors<'_>) -> i64 {
    let secs = match parse_duration(&renew.max_lease) {
        Ok(secs) => secs,
        Err(e) => {
            errors.push("renew.max_lease", e);
            return 0;
        }
    };
    if secs < ttl_max_secs {
        errors.push("renew.max_lease", "is below ttl.max");
    }
    if secs > ctx.renew_max_lease_secs {
        errors.push(
            "renew.max_lease",
            format!(
                "{} is above the broker's [renew] max_lease {}",
                format_duration(secs),
                format_duration(ctx.renew_max_lease_secs)
            ),
        );
    }
    secs
}

/// The `grants` section: at least one; each named, within its backend's max ttl
/// ([`lint::TTL_ABOVE_BACKEND_MAX`], enforced) and compiled for its backend's kind.
fn compile_grants(
    grants: &BTreeMap<String, Value>,
    ctx: &LoadContext,
    ttl_max_secs: i64,
    errors: &mut Errors<'_>,
) -> Vec<GrantSpec> {
    let mut out = Vec::new();
    for (grant_name, value) in grants {
        let field = format!("grants.{grant_name}");
        if !is_name(grant_name) {
            errors.push(field.clone(), "a grant name must match [a-z0-9][a-z0-9-_]*");
        }
        if let Some(message) = ttl_above_backend_max(value, ctx, ttl_max_secs) {
            errors.lint(lint::TTL_ABOVE_BACKEND_MAX, field.clone(), message);
        }
        match compile_grant(grant_name, value, ctx) {
            Ok(g) => out.push(g),
            Err(list) => {
                for (sub, message) in list {
                    errors.push(if sub.is_empty() { field.clone() } else { format!("{field}.{sub}") }, message);
                }
            }
        }
    }
    out
}

/// A grant's ttl ceiling is its backend's: a policy cannot promise a lease the backend will not
/// honour (or, for AWS, one STS would cut short).
fn ttl_above_backend_max(grant: &Value, ctx: &LoadContext, ttl_max: i64) -> Option<String> {
    let backend = grant.get("backend").and_then(Value::as_str)?;
    let (_, backend_max) = ctx.backends.get(backend)?;
    (ttl_max > *backend_max).then(|| {
        format!(
            "ttl.max {} is above backend `{backend}`'s max_ttl {}",
            format_duration(ttl_max),
            format_duration(*backend_max)
        )
    })
}

/// One grant, for its backend's kind; errors are (field within the grant, message).
fn compile_grant(name: &str, value: &Value, ctx: &LoadContext) -> Result<GrantSpec, Vec<(String, String)>> {
    let backend = value.get("backend").and_then(Value::as_str).ok_or_else(|| {
        vec![("backend".to_string(), "required: the name of a backend from the broker config".to_string())]
    })?;
    let Some((kind, _)) = ctx.backends.get(backend) else {
        return Err(vec![(
            "backend".into(),
            format!("`{backend}` is not a backend in the broker config (known: {})", join(ctx.backends.keys())),
        )]);
    };
    let mut errors = Vec::new();
    let spec = match *kind {
        "jwt" => grant_fields(value, &mut errors).and_then(|file| compile_jwt_grant(file, &mut errors)),
        "aws" => grant_fields(value, &mut errors).and_then(|file| compile_aws_grant(file, &mut errors)),
        "github-app" => grant_fields(value, &mut errors).and_then(|file| compile_github_grant(file, &mut errors)),
        "postgres" => grant_fields(value, &mut errors).and_then(|file| compile_postgres_grant(file, &mut errors)),
        "ssh" => grant_fields(value, &mut errors).and_then(|file| compile_ssh_grant(file, &mut errors)),
        other => {
            errors.push(("backend".into(), format!("backend kind `{other}` has no grant fields defined")));
            None
        }
    };
    match spec {
        Some(spec) if errors.is_empty() => Ok(GrantSpec { name: name.to_string(), backend: backend.to_string(), spec }),
        _ => Err(errors),
    }
}

/// A grant's fields as its backend kind defines them (unknown fields are errors).
fn grant_fields<T: DeserializeOwned>(value: &Value, errors: &mut Vec<(String, String)>) -> Option<T> {
    serde_json::from_value(value.clone()).map_err(|e| errors.push((String::new(), e.to_string()))).ok()
}

fn compile_jwt_grant(file: JwtGrantFile, errors: &mut Vec<(String, String)>) -> Option<CredentialSpec> {
    let audience = Template::parse(&file.audience).map_err(|e| errors.push(("audience".into(), e))).ok();
    if file.audience.is_empty() {
        errors.push(("audience".into(), "must not be empty".into()));
    }
    let mut claims = Vec::new();
    for (k, v) in &file.claims {
        if RESERVED_JWT_CLAIMS.contains(&k.as_str()) {
            errors.push((format!("claims.{k}"), "is set by the broker and cannot be overridden".into()));
            continue;
        }
        match TemplateValue::parse(v) {
            Ok(t) => claims.push((k.clone(), t)),
            Err(e) => errors.push((format!("claims.{k}"), e)),
        }
    }
    Some(CredentialSpec::Jwt { audience: audience?, claims })
}

/// An `aws` grant, checked against the limits AWS would otherwise enforce (or, with moto in
/// tests and some private endpoints, silently not): the format rules live in `aws_format`,
/// pure functions with no client behind them.
fn compile_aws_grant(file: AwsGrantFile, errors: &mut Vec<(String, String)>) -> Option<CredentialSpec> {
    use crate::aws_format as rules;
    let mut err = |field: &str, e: String| errors.push((field.to_string(), e));
    if let Err(e) = rules::check_role_arn(&file.role_arn) {
        err("role_arn", e);
    }
    let session_policy = match file.session_policy.as_ref().map(rules::pack_session_policy) {
        Some(Ok(packed)) => Some(packed),
        Some(Err(e)) => {
            err("session_policy", e);
            None
        }
        None => None,
    };
    if let Err(e) = rules::check_policy_arns(&file.policy_arns) {
        err("policy_arns", e);
    }
    if file.session_tags.len() > rules::MAX_SESSION_TAGS {
        err("session_tags", format!("at most {} session tags", rules::MAX_SESSION_TAGS));
    }
    let keys: Vec<&str> = file.session_tags.keys().map(String::as_str).collect();
    if let Err(e) = rules::check_tag_keys_unique(&keys) {
        err("session_tags", e);
    }
    let mut session_tags = Vec::new();
    for (key, value) in &file.session_tags {
        if let Err(e) = rules::check_tag_key(key) {
            err(&format!("session_tags.{key}"), e);
        }
        match Template::parse(value) {
            Ok(t) => session_tags.push((key.clone(), t)),
            Err(e) => err(&format!("session_tags.{key}"), e),
        }
    }
    if file.external_id.as_ref().is_some_and(|x| x.len() < 2 || x.len() > 1224) {
        err("external_id", "must be 2 to 1,224 characters".into());
    }
    Some(CredentialSpec::Aws {
        role_arn: file.role_arn,
        session_policy,
        policy_arns: file.policy_arns,
        external_id: file.external_id,
        session_tags,
    })
}

/// A `github-app` grant: an owner, at least one repository (never the installation's every
/// repository by omission), at least one permission. Names are checked here when literal and
/// again when a template renders ([`crate::github_format`]); which claims a template may read is
/// a lint ([`lint::GITHUB_REPOSITORY_TEMPLATE`]).
fn compile_github_grant(file: GithubGrantFile, errors: &mut Vec<(String, String)>) -> Option<CredentialSpec> {
    use crate::github_format as rules;
    let mut err = |field: &str, message: String| errors.push((field.to_string(), message));
    let owner = match Template::parse(&file.owner) {
        Ok(t) => Some(t),
        Err(e) => {
            err("owner", e);
            None
        }
    };
    if let (false, Err(e)) = (file.owner.contains("${"), rules::check_owner(&file.owner)) {
        err("owner", format!("`{}` {e}", crate::clock::truncate(&file.owner, 40)));
    }
    if file.repositories.is_empty() {
        err(
            "repositories",
            "name at least one repository: a token for every repository of the installation is never granted by omission"
                .into(),
        );
    }
    if file.repositories.len() > 500 {
        err("repositories", "at most 500 (GitHub's limit for one token)".into());
    }
    let mut repositories = Vec::new();
    for (i, entry) in file.repositories.iter().enumerate() {
        let field = format!("repositories[{i}]");
        match Template::parse(entry) {
            Ok(t) => repositories.push(t),
            Err(e) => err(&field, e),
        }
        let literal = !entry.contains("${") && !file.owner.contains("${");
        if let (true, Err(e)) = (literal, rules::repository_in_owner(&file.owner, entry)) {
            err(&field, format!("`{}` {e}", crate::clock::truncate(entry, 120)));
        }
    }
    if file.permissions.is_empty() {
        err("permissions", "name at least one permission, e.g. `contents: read`".into());
    }
    let mut permissions = Vec::new();
    for (name, level) in &file.permissions {
        if !rules::is_permission_name(name) {
            err(&format!("permissions.{name}"), "is not a permission name (lowercase words joined by `_`)".into());
        }
        let level = match level {
            GithubPermissionLevel::Read => "read",
            GithubPermissionLevel::Write => "write",
            GithubPermissionLevel::Admin => "admin",
        };
        permissions.push((name.clone(), level));
    }
    Some(CredentialSpec::Github { owner: owner?, repositories, permissions })
}

/// A `postgres` grant: group role names (literal: they reach SQL, quoted, but a policy never
/// chooses them from claims) and an optional database name. Roles that are superuser-equivalent
/// by name are refused here; the backend checks the attributes the database says they have.
fn compile_postgres_grant(file: PostgresGrantFile, errors: &mut Vec<(String, String)>) -> Option<CredentialSpec> {
    use crate::pg_names as rules;
    if file.roles.is_empty() || file.roles.len() > 16 {
        errors.push(("roles".into(), "name 1 to 16 group roles".into()));
    }
    for (i, role) in file.roles.iter().enumerate() {
        if let Err(e) = rules::check_identifier(role) {
            errors.push((format!("roles[{i}]"), format!("`{}` {e}", crate::clock::truncate(role, 70))));
        } else if let Some(why) = rules::forbidden_group_role(role) {
            errors.push((format!("roles[{i}]"), format!("`{role}` {why}: a job must never hold it")));
        }
    }
    if let Some(Err(e)) = file.database.as_deref().map(rules::check_identifier) {
        errors.push(("database".into(), e));
    }
    let mut roles = file.roles;
    roles.dedup();
    Some(CredentialSpec::Postgres { roles, database: file.database })
}

/// An `ssh` grant: principals (templates allowed; what a job may choose is a lint), critical
/// options and extensions in OpenSSH's names.
fn compile_ssh_grant(file: SshGrantFile, errors: &mut Vec<(String, String)>) -> Option<CredentialSpec> {
    use crate::ssh_format as rules;
    if file.principals.is_empty() || file.principals.len() > 32 {
        errors.push(("principals".into(), "name 1 to 32 principals".into()));
    }
    let mut principals = Vec::new();
    for (i, entry) in file.principals.iter().enumerate() {
        match Template::parse(entry) {
            Ok(t) => principals.push(t),
            Err(e) => errors.push((format!("principals[{i}]"), e)),
        }
        if !entry.contains("${") && !rules::is_principal(entry) {
            errors.push((
                format!("principals[{i}]"),
                format!(
                    "`{}` is not a principal (letters, digits, `.`, `_`, `-`, `@`; at most 128)",
                    crate::clock::truncate(entry, 40)
                ),
            ));
        }
    }
    let options = file.critical_options;
    if let Some(Err(e)) = options.force_command.as_deref().map(rules::check_force_command) {
        errors.push(("critical_options.force-command".into(), e));
    }
    if let Some(Err(e)) = options.source_address.as_deref().map(rules::check_source_address) {
        errors.push(("critical_options.source-address".into(), e));
    }
    let mut extensions = file.extensions;
    extensions.sort();
    extensions.dedup();
    for extension in &extensions {
        if !rules::EXTENSIONS.contains(&extension.as_str()) {
            errors.push((
                "extensions".into(),
                format!("`{}` is not one of {}", crate::clock::truncate(extension, 40), rules::EXTENSIONS.join(", ")),
            ));
        }
    }
    Some(CredentialSpec::Ssh {
        principals,
        force_command: options.force_command,
        source_address: options.source_address,
        extensions,
    })
}

fn join<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let list: Vec<&str> = names.map(String::as_str).collect();
    if list.is_empty() { "none".into() } else { list.join(", ") }
}
