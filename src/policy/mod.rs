//! policy: YAML files → compiled, immutable policies; `decide()` → [`Grant`] or [`Denial`].
//! Reads identity's `VerifiedIdentity`; knows backends only as names and kinds from the config.
//! `ephemera policy check` and the server call the same [`PolicySet::load`].
//!
//! Here: the compiled types and the decision. `load` reads policy files into [`Source`]s and
//! sources into a [`PolicySet`]; `compile` turns one source into a [`Policy`]; `file` is the
//! YAML format as written.

mod compile;
mod decision;
pub mod delegation;
pub mod explain;
mod file;
pub mod lint;
mod load;
pub mod matcher;
pub mod template;
pub mod testing;

pub use decision::{Denial, DenialReason, Grant, GrantedCredential, ResolvedSpec};
pub use file::policy_schema;
pub use load::{IssuerFacts, LoadContext, PolicyError, Source, read_policy_files};

use crate::claims::Claims;
use crate::claims::Platform;
use crate::clock::UnixSeconds;
use crate::config::IssuerConfig;
use crate::identity::VerifiedIdentity;
use matcher::Matcher;
use ring::digest;
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use template::{Template, TemplateValue};

/// The largest policy file, and policy-test file, read.
const MAX_POLICY_BYTES: u64 = 256 * 1024;

// ---- compiled ------------------------------------------------------------------------------

#[derive(Debug)]
pub struct Policy {
    pub name: Arc<str>,
    /// The file it was loaded from (`<built-in NAME>` for built-ins), for lint and reload reports.
    pub source: PathBuf,
    pub description: String,
    pub issuer: String,
    pub match_rules: Vec<Rule>,
    pub deny_rules: Vec<Rule>,
    pub ttl_default_secs: i64,
    pub ttl_max_secs: i64,
    /// `renew.max_lease`: present when a lease of this policy may be renewed.
    pub renew_max_lease_secs: Option<i64>,
    pub grants: Vec<GrantSpec>,
    /// `actors`: agents admitted to act for the job at `POST /oauth/token`.
    pub actors: Vec<delegation::ActorRule>,
    /// `tools`: the tool servers its tokens may be for.
    pub tools: Vec<delegation::Tool>,
    /// `data`: named data scopes, values whose strings are templates.
    pub data: Vec<(String, TemplateValue)>,
    /// The YAML exactly as read (the console's policy preview edits it).
    pub text: Arc<str>,
    /// [`Policy::digest`], computed once by compile.
    digest: [u8; 32],
}

#[derive(Debug)]
pub struct Rule {
    pub claim: String,
    pub matcher: Matcher,
}

#[derive(Debug)]
pub struct GrantSpec {
    pub name: String,
    pub backend: String,
    pub spec: CredentialSpec,
}

#[derive(Debug)]
pub enum CredentialSpec {
    Jwt {
        audience: Template,
        claims: Vec<(String, TemplateValue)>,
    },
    Aws {
        role_arn: String,
        session_policy: Option<String>,
        policy_arns: Vec<String>,
        external_id: Option<String>,
        session_tags: Vec<(String, Template)>,
    },
    Github {
        owner: Template,
        repositories: Vec<Template>,
        /// (permission, level), sorted by permission; levels are `read`, `write`, `admin`.
        permissions: Vec<(String, &'static str)>,
    },
    Postgres {
        roles: Vec<String>,
        database: Option<String>,
    },
    Ssh {
        principals: Vec<Template>,
        force_command: Option<String>,
        source_address: Option<String>,
        extensions: Vec<String>,
    },
}

/// Every loaded policy, by name. Immutable once built.
#[derive(Debug, Default)]
pub struct PolicySet {
    policies: HashMap<String, Arc<Policy>>,
}

impl PolicySet {
    /// Loads every `*.yaml`/`*.yml` file in `dir` (when given) plus `builtin` (name, YAML)
    /// pairs, and reports every error of every file at once.
    pub fn load(
        dir: Option<&Path>,
        builtin: &[(&str, &str)],
        ctx: &LoadContext,
    ) -> Result<PolicySet, Vec<PolicyError>> {
        let mut errors = Vec::new();
        let mut sources: Vec<Source> = Vec::new();
        if let Some(dir) = dir {
            read_policy_files(dir, &mut sources, &mut errors);
        }
        load::compile_sources(sources, builtin, ctx, errors)
    }

    /// Like [`PolicySet::load`], from files already read (name, path shown in errors, YAML):
    /// what admin `POST /v1/policies/diff` receives. Names are checked as file stems are.
    pub fn load_sources(
        sources: Vec<Source>,
        builtin: &[(&str, &str)],
        ctx: &LoadContext,
    ) -> Result<PolicySet, Vec<PolicyError>> {
        let mut errors = Vec::new();
        let checked = load::check_sources(sources, &mut errors);
        load::compile_sources(checked, builtin, ctx, errors)
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Policy>> {
        self.policies.get(name)
    }

    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.policies.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Every policy, in name order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Policy>> {
        let mut all: Vec<&Arc<Policy>> = self.policies.values().collect();
        all.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        all.into_iter()
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The names of the policies in `old` whose decisions this set may make differently: those
    /// missing here, and those whose [`Policy::digest`] differs. A reload re-evaluates the live
    /// leases of these policies only. A policy new in this set is not listed: no lease was
    /// granted under it yet.
    pub fn changed_since(&self, old: &PolicySet) -> BTreeSet<String> {
        old.policies
            .iter()
            .filter(|(name, was)| self.policies.get(*name).is_none_or(|now| now.digest != was.digest))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// The decision (DESIGN §1 step 2): [`PolicySet::decide_claims`] on the verified identity,
    /// then the lease's expiry. Pure: `now` is an argument.
    pub fn decide(
        &self,
        name: &str,
        identity: &VerifiedIdentity,
        requested_ttl: Option<i64>,
        now: UnixSeconds,
    ) -> Result<Grant, Denial> {
        let Allowed { policy, ttl_secs, renew_max_lease_secs, credentials } =
            self.decide_claims(name, identity.issuer(), identity.claims(), requested_ttl)?;
        // GitLab sets a job token's `exp` to the job timeout: a lease never outlives its job.
        let job_end = |at: UnixSeconds| match identity.platform() {
            Platform::GitlabCi => at.min(identity.expires_at()),
            _ => at,
        };
        let expires_at = job_end(now + ttl_secs);
        let renew_until = renew_max_lease_secs.map(|max| job_end(now + max).max(expires_at));
        Ok(Grant { policy, identity: identity.clone(), ttl_secs, expires_at, renew_until, credentials })
    }

    /// Everything [`PolicySet::decide`] decides, from an issuer name and a claim set: the named
    /// policy's issuer, deny rules, then every match rule, then the ttl, then the grants'
    /// templates. `ephemera policy test` runs this, so a test passes only if an exchange would.
    pub fn decide_claims(
        &self,
        name: &str,
        issuer: &str,
        claims: &Claims,
        requested_ttl: Option<i64>,
    ) -> Result<Allowed, Denial> {
        // The name is only a map key: no file is opened for it, so `../x` is just an unknown name.
        let policy = self.policies.get(name).ok_or_else(|| Denial::new(name, "iss", DenialReason::UnknownPolicy))?;
        policy.evaluate(issuer, claims)?;
        let ttl_secs = requested_ttl.unwrap_or(policy.ttl_default_secs);
        if ttl_secs > policy.ttl_max_secs {
            // Denied, not clamped: a caller that asked for 2h and silently got 1h would find out
            // the hard way, mid-deploy.
            return Err(Denial::new(
                name,
                "ttl",
                DenialReason::TtlAboveMax { requested: ttl_secs, max: policy.ttl_max_secs },
            ));
        }
        let credentials = policy.grants.iter().map(|g| g.resolve(name, claims)).collect::<Result<Vec<_>, _>>()?;
        Ok(Allowed {
            policy: policy.name.clone(),
            ttl_secs,
            renew_max_lease_secs: policy.renew_max_lease_secs,
            credentials,
        })
    }
}

/// The name of the configured issuer whose `url` is the claims' `iss`.
fn configured_issuer<'a>(claims: &Claims, issuers: impl IntoIterator<Item = &'a IssuerConfig>) -> Option<String> {
    let iss = claims.get("iss").and_then(Value::as_str)?;
    issuers.into_iter().find(|i| i.url == iss).map(|i| i.name.clone())
}

/// The configured issuer an actor's claim set comes from: the one whose `url` is its `iss`, else
/// the `iss` itself (which no actor rule names, so nothing admits it).
pub fn issuer_of<'a>(claims: &Claims, issuers: impl IntoIterator<Item = &'a IssuerConfig>) -> String {
    configured_issuer(claims, issuers)
        .unwrap_or_else(|| claims.get("iss").and_then(Value::as_str).unwrap_or("(no iss)").to_string())
}

/// What a policy allows a claim set, before it becomes a [`Grant`] (which also needs the
/// [`VerifiedIdentity`] the claims came from).
#[derive(Debug, Clone)]
pub struct Allowed {
    pub policy: Arc<str>,
    pub ttl_secs: i64,
    /// The policy's `renew.max_lease`, if its leases may be renewed.
    pub renew_max_lease_secs: Option<i64>,
    /// Every grant's credential, templates resolved.
    pub credentials: Vec<GrantedCredential>,
}

impl Policy {
    /// A fingerprint of what decides this policy's grants: SHA-256 over its name and its source
    /// text, the YAML exactly as read. Compiling also reads the [`LoadContext`] (issuers and
    /// backends from the broker config), but that is fixed for the life of a process, so within
    /// one process equal digests mean equal decisions for every claim set. (The file a policy
    /// was read from is not part of it: moving a file changes no decision.)
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    /// [`Policy::digest`]: the name's length (8 bytes, big-endian), the name, then the text, so
    /// no (name, text) pair hashes as another does.
    fn digest_of(name: &str, text: &str) -> [u8; 32] {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(&(name.len() as u64).to_be_bytes());
        ctx.update(name.as_bytes());
        ctx.update(text.as_bytes());
        let mut out = [0u8; 32];
        // SHA-256 is 32 bytes, so the lengths match.
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }

    /// The configured issuer a claim set comes from when nobody says: the one whose `url` is the
    /// claims' `iss` ([`issuer_of`]), else this policy's own (`policy explain`, admin explain, `policy test`).
    pub fn claims_issuer<'a>(&self, claims: &Claims, issuers: impl IntoIterator<Item = &'a IssuerConfig>) -> String {
        configured_issuer(claims, issuers).unwrap_or_else(|| self.issuer.clone())
    }

    /// Issuer, deny rules (any that holds denies), then match rules (all must hold).
    pub fn evaluate(&self, issuer: &str, claims: &Claims) -> Result<(), Denial> {
        if issuer != self.issuer {
            return Err(Denial::new(&self.name, "iss", DenialReason::WrongIssuer));
        }
        if let Some(rule) = self.deny_rules.iter().find(|r| r.matcher.matches(claims.get(&r.claim))) {
            return Err(Denial::new(&self.name, &rule.claim, DenialReason::DenyRule));
        }
        if let Some(rule) = self.match_rules.iter().find(|r| !r.matcher.matches(claims.get(&r.claim))) {
            return Err(Denial::new(&self.name, &rule.claim, DenialReason::MatchFailed));
        }
        Ok(())
    }
}

impl GrantSpec {
    fn resolve(&self, policy: &str, claims: &Claims) -> Result<GrantedCredential, Denial> {
        let missing = |claim: String| {
            Denial::new(policy, &claim, DenialReason::TemplateClaimMissing { grant: self.name.clone() })
        };
        let spec = match &self.spec {
            CredentialSpec::Aws { role_arn, session_policy, policy_arns, external_id, session_tags } => {
                ResolvedSpec::Aws {
                    role_arn: role_arn.clone(),
                    session_policy: session_policy.clone(),
                    policy_arns: policy_arns.clone(),
                    external_id: external_id.clone(),
                    session_tags: session_tags
                        .iter()
                        .map(|(k, t)| Ok((k.clone(), t.render(claims).map_err(missing)?)))
                        .collect::<Result<_, Denial>>()?,
                }
            }
            CredentialSpec::Github { owner: owner_template, repositories, permissions } => {
                // Attack: a template renders claim text; text that is no account or repository
                // name (a `/`, `..`, `%2f`) must never reach GitHub's URL paths, nor a
                // repository of another owner the token request.
                let out_of_scope = |template: &Template| {
                    let claim = template.claims().next().unwrap_or("owner").to_string();
                    Denial::new(policy, &claim, DenialReason::GrantOutOfScope { grant: self.name.clone() })
                };
                let owner = owner_template.render(claims).map_err(missing)?;
                crate::github_format::check_owner(&owner).map_err(|_| out_of_scope(owner_template))?;
                let mut names: Vec<String> = Vec::with_capacity(repositories.len());
                for template in repositories {
                    let entry = template.render(claims).map_err(missing)?;
                    let name = crate::github_format::repository_in_owner(&owner, &entry)
                        .map_err(|_| out_of_scope(template))?;
                    if !names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
                        names.push(name.to_string());
                    }
                }
                ResolvedSpec::Github { owner, repositories: names, permissions: permissions.clone() }
            }
            CredentialSpec::Postgres { roles, database } => {
                ResolvedSpec::Postgres { roles: roles.clone(), database: database.clone() }
            }
            CredentialSpec::Ssh { principals, force_command, source_address, extensions } => {
                let mut rendered: Vec<String> = Vec::with_capacity(principals.len());
                for template in principals {
                    let principal = template.render(claims).map_err(missing)?;
                    // Attack: claim text with a comma, a space or a control character would
                    // name more principals, or other users, than the grant does.
                    if !crate::ssh_format::is_principal(&principal) {
                        let claim = template.claims().next().unwrap_or("principals").to_string();
                        return Err(Denial::new(
                            policy,
                            &claim,
                            DenialReason::GrantOutOfScope { grant: self.name.clone() },
                        ));
                    }
                    if !rendered.contains(&principal) {
                        rendered.push(principal);
                    }
                }
                ResolvedSpec::Ssh {
                    principals: rendered,
                    force_command: force_command.clone(),
                    source_address: source_address.clone(),
                    extensions: extensions.clone(),
                }
            }
            CredentialSpec::Jwt { audience, claims: extra } => ResolvedSpec::Jwt {
                audience: audience.render(claims).map_err(missing)?,
                claims: extra
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), v.render(claims).map_err(missing)?)))
                    .collect::<Result<_, Denial>>()?,
            },
        };
        Ok(GrantedCredential { name: self.name.clone(), backend: self.backend.clone(), spec })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
issuer: github
match: {repository_id: "74", ref: refs/heads/main}
ttl: {default: 5m, max: 10m}
grants: {api: {backend: jwt, audience: x}}
"#;

    fn ctx() -> LoadContext {
        LoadContext {
            issuers: [("github".to_string(), Platform::GithubActions.into())].into(),
            backends: [("jwt".to_string(), ("jwt", 3600))].into(),
            renew_max_lease_secs: 12 * 3600,
        }
    }

    fn set(policies: &[(&str, &str)]) -> PolicySet {
        PolicySet::load(None, policies, &ctx()).unwrap()
    }

    fn digest(set: &PolicySet, name: &str) -> [u8; 32] {
        set.get(name).unwrap().digest()
    }

    #[test]
    fn the_digest_is_of_the_name_and_the_text_exactly() {
        let one_byte_off = POLICY.replace("5m", "6m");
        let base = set(&[("a", POLICY), ("b", POLICY)]);
        let again = set(&[("a", POLICY), ("c", &one_byte_off)]);
        assert_eq!(digest(&base, "a"), digest(&again, "a"), "same name, same text");
        assert_ne!(digest(&base, "a"), digest(&base, "b"), "the name is part of it");
        assert_ne!(digest(&base, "a"), digest(&set(&[("a", &one_byte_off)]), "a"), "one byte of text");
        let mut direct = [0u8; 32];
        direct.copy_from_slice(
            ring::digest::digest(&ring::digest::SHA256, &[&1u64.to_be_bytes()[..], b"a", POLICY.as_bytes()].concat())
                .as_ref(),
        );
        assert_eq!(digest(&base, "a"), direct, "SHA-256 over len(name), name, text");
    }

    #[test]
    fn changed_since_lists_changed_and_removed_policies_but_not_new_ones() {
        let one_byte_off = POLICY.replace("\"74\"", "\"75\"");
        let old = set(&[("same", POLICY), ("edited", POLICY), ("removed", POLICY)]);
        let new = set(&[("same", POLICY), ("edited", &one_byte_off), ("added", POLICY)]);
        let changed: Vec<String> = new.changed_since(&old).into_iter().collect();
        assert_eq!(changed, ["edited", "removed"]);
        assert!(
            set(&[("same", POLICY)]).changed_since(&set(&[("same", POLICY)])).is_empty(),
            "a reload of the same text"
        );
        assert!(old.changed_since(&PolicySet::default()).is_empty(), "nothing was live before");
    }
}
