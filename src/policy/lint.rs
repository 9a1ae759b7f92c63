//! `ephemera policy check`'s lints: what a policy lets through that its author probably did not
//! mean to, each finding with its file, policy, rule id, severity, field and a concrete fix.
//!
//! [`lint`] is pure and runs on a loaded [`PolicySet`]; the server runs it on every (re)load and
//! refuses a set with any [`Severity::Error`], so an error is only what is plainly exploitable.
//! Anything that depends on what the broker cannot see (branch protection, environment rules,
//! who may push) is a [`Severity::Warning`]. Two lints are enforced by the loader itself and
//! reach the report as load errors: [`IMMUTABLE_ID`] and [`TTL_ABOVE_BACKEND_MAX`].
//!
//! "Can a job with this claim value get the grant?" is always answered by running the policy's
//! own compiled matchers on probe values ([`admits`]), never by comparing YAML text, so a lint
//! and [`Policy::evaluate`] cannot disagree about what a rule matches.

use super::explain::describe;
use super::matcher::Matcher;
use super::{CredentialSpec, LoadContext, Policy, PolicyError, PolicySet, Rule, Source, read_policy_files};
use crate::claims::{CIRCLECI_PIPELINE_DEFINITION_ID, CIRCLECI_PROJECT_ID, CIRCLECI_SSH_RERUN, Platform};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// A load error that is no specific lint (bad YAML, unknown field, unknown backend …).
pub const INVALID: &str = "invalid";
/// No exact/list match on `repository_id`/`repository_owner_id` (`project_id`/`namespace_id`).
pub const IMMUTABLE_ID: &str = "immutable-id";
/// `ttl.max` above a granting backend's `max_ttl`.
pub const TTL_ABOVE_BACKEND_MAX: &str = "ttl-above-backend-max";
pub const NAME_WITHOUT_ID: &str = "name-without-id";
pub const SUB_MATCHES_UNTRUSTED: &str = "sub-matches-untrusted";
pub const UNTRUSTED_TRIGGER: &str = "untrusted-trigger";
pub const RUNNER_UNPINNED: &str = "runner-unpinned";
pub const WORKFLOW_REF_WITHOUT_REPOSITORY: &str = "workflow-ref-without-repository";
pub const GITHUB_REPOSITORY_TEMPLATE: &str = "github-repository-template";
pub const GITHUB_DANGEROUS_PERMISSION: &str = "github-dangerous-permission";
pub const GITHUB_UNKNOWN_PERMISSION: &str = "github-unknown-permission";
pub const SSH_PRINCIPAL_TEMPLATE: &str = "ssh-principal-template";
pub const SSH_FORWARDING_EXTENSION: &str = "ssh-forwarding-extension";
pub const SSH_RERUN_ADMITTED: &str = "ssh-rerun-admitted";
pub const BITBUCKET_UUID_BRACES: &str = "bitbucket-uuid-braces";
pub const SUB_PER_STEP: &str = "sub-per-step";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Plainly exploitable: the server refuses to load a set with one.
    Error,
    /// Probably not what was meant; the server logs it and loads.
    Warning,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub file: PathBuf,
    /// The policy's name (empty when the finding is about no single policy, e.g. an unreadable
    /// policies directory).
    pub policy: String,
    pub rule: &'static str,
    /// Where the fix goes, e.g. `match.repository` or `deny.event_name` (empty: the whole file).
    pub field: String,
    /// What is wrong and why it matters.
    pub message: String,
    /// What to change, often the YAML to add.
    pub fix: String,
}

/// Every finding of every policy in `set`, sorted by file, then field, then rule id.
pub fn lint(set: &PolicySet, ctx: &LoadContext) -> Vec<Finding> {
    let mut findings: Vec<Finding> = set.iter().flat_map(|p| lint_policy(p, ctx)).collect();
    sort(&mut findings);
    findings
}

/// One policy's findings. A policy whose issuer is not in `ctx` has none: the loader refuses it.
pub fn lint_policy(policy: &Policy, ctx: &LoadContext) -> Vec<Finding> {
    let Some(platform) = ctx.issuers.get(&policy.issuer).map(|facts| facts.platform) else {
        return Vec::new();
    };
    let checks: [fn(&Policy, Platform) -> Vec<Finding>; 12] = [
        name_without_id,
        sub_matches_untrusted,
        untrusted_trigger,
        runner_unpinned,
        workflow_ref_without_repository,
        github_repository_template,
        github_permissions,
        ssh_principal_template,
        ssh_forwarding_extensions,
        ssh_rerun_admitted,
        bitbucket_uuid_braces,
        sub_per_step,
    ];
    checks.iter().flat_map(|check| check(policy, platform)).collect()
}

fn sort(findings: &mut [Finding]) {
    findings.sort_by(|a, b| (&a.file, &a.field, a.rule).cmp(&(&b.file, &b.field, b.rule)));
}

impl Finding {
    fn new(severity: Severity, policy: &Policy, rule: &'static str, field: &str, message: String, fix: String) -> Self {
        Finding {
            severity,
            file: policy.source.clone(),
            policy: policy.name.to_string(),
            rule,
            field: field.to_string(),
            message,
            fix,
        }
    }
}

/// A load error as a finding: always an error, under the rule id the loader gave it.
impl From<&PolicyError> for Finding {
    fn from(e: &PolicyError) -> Finding {
        Finding {
            severity: Severity::Error,
            file: e.file.clone(),
            policy: policy_name_of(&e.file),
            rule: e.rule,
            field: e.field.clone(),
            message: e.message.clone(),
            fix: load_error_fix(e),
        }
    }
}

/// The policy a file defines: its stem, or NAME of `<built-in NAME>`; none for a directory.
fn policy_name_of(file: &Path) -> String {
    let text = file.to_string_lossy();
    if let Some(name) = text.strip_prefix("<built-in ").and_then(|t| t.strip_suffix('>')) {
        return name.to_string();
    }
    match file.extension().and_then(|e| e.to_str()) {
        Some("yaml" | "yml") => file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        _ => String::new(),
    }
}

fn load_error_fix(e: &PolicyError) -> String {
    match e.rule {
        IMMUTABLE_ID => "bind one of the claims the message lists to its exact id (quoted), e.g. for GitHub:\n\
                         match:\n  repository_id: \"74\"\n\
                         or for GitLab:\n\
                         match:\n  project_id: \"20\"\n\
                         (docs/platforms.md names every platform's)"
            .into(),
        TTL_ABOVE_BACKEND_MAX => {
            "lower `ttl.max` (and `ttl.default`) to the backend's max_ttl or below, or raise that backend's \
             `max_ttl` in the broker config"
                .into()
        }
        _ if e.field.is_empty() => "correct the file as the message says (docs/policy.md describes every field)".into(),
        _ => format!("correct `{}` as the message says (docs/policy.md describes every field)", e.field),
    }
}

// ---- probes: the policy's own matchers on made-up claim values ------------------------------

/// A claim and its value in a made-up token; `None` is a claim the token lacks.
type Probe<'a> = (&'a str, Option<&'a str>);

/// Would a token carrying these claim values get past every deny and match rule on those
/// claims? Rules on other claims are taken as passable: the lints ask what a job *can* reach,
/// and most other claims (branch names, environments, actors, workflow paths) are chosen by
/// whoever pushes the workflow.
fn admits(policy: &Policy, probe: &[Probe<'_>]) -> bool {
    probe.iter().all(|(claim, value)| {
        let value = value.map(|v| Value::String(v.to_string()));
        let on_claim = |r: &&Rule| r.claim == *claim;
        !policy.deny_rules.iter().filter(on_claim).any(|r| r.matcher.matches(value.as_ref()))
            && policy.match_rules.iter().filter(on_claim).all(|r| r.matcher.matches(value.as_ref()))
    })
}

fn match_rule<'a>(policy: &'a Policy, claim: &str) -> Option<&'a Rule> {
    policy.match_rules.iter().find(|r| r.claim == claim)
}

/// Pinned to known values (exact or list) by a match rule.
fn bound(policy: &Policy, claim: &str) -> bool {
    match_rule(policy, claim).is_some_and(|r| r.matcher.is_binding())
}

fn mentioned(policy: &Policy, claim: &str) -> bool {
    policy.match_rules.iter().chain(&policy.deny_rules).any(|r| r.claim == claim)
}

/// The exact value a match rule pins `claim` to, for a fix text; else `placeholder`.
fn bound_value(policy: &Policy, claim: &str, placeholder: &str) -> String {
    match match_rule(policy, claim).map(|r| &r.matcher) {
        Some(Matcher::Exact(v)) => v.clone(),
        _ => placeholder.to_string(),
    }
}

// ---- name-without-id ----------------------------------------------------------------------

/// (name claim, the id claims that pin what the name means). A bound repository id pins its
/// owner too, so it also covers a rule on the owner's name.
const GITHUB_NAMES: [(&str, &[&str]); 2] =
    [("repository", &["repository_id"]), ("repository_owner", &["repository_owner_id", "repository_id"])];
const GITLAB_NAMES: [(&str, &[&str]); 2] =
    [("project_path", &["project_id"]), ("namespace_path", &["namespace_id", "project_id"])];
/// A pipeline id pins its organisation too.
const BUILDKITE_NAMES: [(&str, &[&str]); 2] =
    [("organization_slug", &["organization_id", "pipeline_id"]), ("pipeline_slug", &["pipeline_id"])];
/// `vcs-origin` is `github.com/acme/web`: a repository's name, which the project id pins.
const CIRCLECI_NAMES: [(&str, &[&str]); 1] =
    [("oidc.circleci.com/vcs-origin", &[CIRCLECI_PROJECT_ID, CIRCLECI_PIPELINE_DEFINITION_ID])];
/// `sub` is `p://<org>/<project>/<pipeline>`, by name.
const AZURE_NAMES: [(&str, &[&str]); 1] = [("sub", &["prj_id"])];

/// Attack: `acme/web` is deleted (or renamed, or its owner renames), and someone else registers
/// the name; their jobs now send `repository: acme/web` and match. Ids are never reused.
fn name_without_id(policy: &Policy, platform: Platform) -> Vec<Finding> {
    let pairs: &[(&str, &[&str])] = match platform {
        Platform::GithubActions => &GITHUB_NAMES,
        Platform::GitlabCi => &GITLAB_NAMES,
        Platform::Buildkite => &BUILDKITE_NAMES,
        Platform::Circleci => &CIRCLECI_NAMES,
        Platform::AzurePipelines => &AZURE_NAMES,
        // Bitbucket names nothing but a branch; Jenkins and generic issuers name their own ids.
        Platform::Bitbucket | Platform::Jenkins | Platform::Generic => &[],
    };
    pairs
        .iter()
        .filter_map(|(name, ids)| {
            let rule = match_rule(policy, name)?;
            if ids.iter().any(|id| bound(policy, id)) {
                return None;
            }
            let message = format!(
                "`{name}` is matched by name ({}) but `{}` is not bound: a repository, project, owner or group can be \
                 deleted or renamed and its name registered by someone else, whose jobs would then match",
                describe(&rule.matcher),
                ids[0]
            );
            let named = bound_value(policy, name, name);
            let fix = format!("bind the id too (it never changes hands):\nmatch:\n  {}: \"<id of {named}>\"", ids[0]);
            Some(Finding::new(Severity::Warning, policy, NAME_WITHOUT_ID, &format!("match.{name}"), message, fix))
        })
        .collect()
}

// ---- sub-matches-untrusted ----------------------------------------------------------------

/// What a pull request's job sends besides its subject and environment.
const PULL_REQUEST_CLAIMS: [Probe<'static>; 2] =
    [("event_name", Some("pull_request")), ("ref", Some("refs/pull/1/merge"))];
/// An environment name nobody configured: a workflow that names a missing environment gets one
/// created on the fly, with no protection rules.
const PROBE_ENVIRONMENT: &str = "ephemera-lint-probe";
/// Owner/repository for patterns with no literal `repo:OWNER/REPO:` prefix.
const GENERIC_REPO: &str = "repo:octo-org/octo-repo:";

/// Attack: `sub: {glob: "repo:acme/web:*"}` is meant for pushes (`repo:acme/web:ref:…`) but also
/// matches `repo:acme/web:pull_request`, the subject of a job run for a pull request (unreviewed
/// code, from anyone who can open one), and `repo:acme/web:environment:NAME` for an environment
/// the pull request's workflow names itself. An error unless something else in the policy
/// (a deny or match rule on `event_name`, `ref` or `sub`) turns a pull request's job away; then
/// there is no finding, as the probe shows the hole closed.
fn sub_matches_untrusted(policy: &Policy, platform: Platform) -> Vec<Finding> {
    if platform != Platform::GithubActions {
        return Vec::new();
    }
    let Some(rule) = match_rule(policy, "sub") else {
        return Vec::new();
    };
    let literal = match &rule.matcher {
        Matcher::Glob { source, .. } => glob_literal_prefix(source),
        Matcher::Regex { source, .. } => regex_literal_prefix(source),
        _ => return Vec::new(),
    };
    let reached: Vec<String> = subject_probes(&literal)
        .into_iter()
        .filter(|(subject, environment)| {
            let mut probe = vec![("sub", Some(subject.as_str())), ("environment", *environment)];
            probe.extend(PULL_REQUEST_CLAIMS);
            admits(policy, &probe)
        })
        .map(|(subject, _)| format!("`{subject}`"))
        .collect();
    if reached.is_empty() {
        return Vec::new();
    }
    let message = format!(
        "the {} on `sub` also matches a pull request's job ({}) and no rule turns such a job away: any pull \
         request's unreviewed code gets this grant",
        describe(&rule.matcher),
        reached.join(", ")
    );
    // The repository the pattern names, when its literal prefix names one whole.
    let repo = repo_prefix(&literal)
        .filter(|p| literal.starts_with(p.as_str()))
        .map_or("repo:OWNER/REPO".to_string(), |p| p.trim_end_matches(':').to_string());
    let fix = format!(
        "match the subject you mean exactly, e.g. `sub: \"{repo}:ref:refs/heads/main\"`, or turn pull requests \
         away:\nmatch:\n  ref: refs/heads/main\ndeny:\n  event_name: [pull_request, pull_request_target, workflow_run]"
    );
    vec![Finding::new(Severity::Error, policy, SUB_MATCHES_UNTRUSTED, "match.sub", message, fix)]
}

/// Subjects of a pull request's job in the repositories the pattern's literal prefix names,
/// each with the job's `environment` claim: none, or one the workflow names itself.
fn subject_probes(literal: &str) -> Vec<(String, Option<&'static str>)> {
    let mut prefixes = BTreeSet::from([GENERIC_REPO.to_string()]);
    if let Some(prefix) = repo_prefix(literal) {
        prefixes.insert(prefix);
    }
    prefixes
        .iter()
        .flat_map(|p| {
            [
                (format!("{p}pull_request"), None),
                (format!("{p}environment:{PROBE_ENVIRONMENT}"), Some(PROBE_ENVIRONMENT)),
            ]
        })
        .collect()
}

/// `repo:OWNER/REPO:` from a pattern's literal prefix, completing a partial one (`repo:acme/`
/// → `repo:acme/probe:`) so that a wildcard repository is probed in the named owner.
fn repo_prefix(literal: &str) -> Option<String> {
    let rest = literal.strip_prefix("repo:")?;
    Some(match rest.find(':') {
        Some(i) => format!("repo:{}", &rest[..=i]),
        None if rest.contains('/') => format!("{literal}probe:"),
        None => format!("{literal}/probe:"),
    })
}

/// The characters before a glob's first `*` (everything else in a glob is literal).
fn glob_literal_prefix(glob: &str) -> String {
    glob.split('*').next().unwrap_or_default().to_string()
}

/// The literal characters a regex starts with: up to the first metacharacter, dropping the last
/// literal when a quantifier that can make it optional (`?`, `*`, `{`) follows.
fn regex_literal_prefix(regex: &str) -> String {
    let mut out = String::new();
    let mut chars = regex.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(e) if !e.is_ascii_alphanumeric() => out.push(e),
                _ => break, // \d, \w, \b …: a class or an assertion
            },
            '?' | '*' | '{' => {
                out.pop();
                break;
            }
            '.' | '^' | '$' | '+' | '(' | ')' | '[' | ']' | '}' | '|' => break,
            c => out.push(c),
        }
    }
    out
}

// ---- untrusted-trigger --------------------------------------------------------------------

/// GitHub events that run in the base repository (its secrets, `ref` = its default branch) but
/// are started by a pull request, a fork's included.
const UNTRUSTED_GITHUB_EVENTS: [&str; 2] = ["pull_request_target", "workflow_run"];

/// Attack (GitHub): a fork opens a pull request; a `pull_request_target` workflow (or a
/// `workflow_run` one after the PR's CI) checks out the PR's head and runs it with the base
/// repository's token, whose `ref` is `refs/heads/main`, so `ref` rules do not stop it.
/// Attack (GitLab): in a fork's merge-request pipeline `project_id` is the target project but
/// the code is the fork's (`job_project_id`), so `project_id` rules do not stop it.
fn untrusted_trigger(policy: &Policy, platform: Platform) -> Vec<Finding> {
    match platform {
        Platform::GithubActions => github_untrusted_trigger(policy),
        Platform::GitlabCi => gitlab_untrusted_trigger(policy),
        Platform::AzurePipelines => azure_untrusted_trigger(policy),
        // Buildkite sends no claim that tells a pull request's build from a branch's (its
        // `build_source` says `webhook` for both), nor do CircleCI, Bitbucket or the Jenkins
        // plugin by default: the policy's branch or ref rule is the guard.
        Platform::Buildkite | Platform::Circleci | Platform::Bitbucket | Platform::Jenkins | Platform::Generic => {
            Vec::new()
        }
    }
}

/// Attack (Azure): a pull request's validation build runs the pull request's code, with
/// `rpo_ref` `refs/pull/<n>/merge`, in the target repository's pipeline.
fn azure_untrusted_trigger(policy: &Policy) -> Vec<Finding> {
    if !admits(policy, &[("rpo_ref", Some("refs/pull/1/merge"))]) {
        return Vec::new();
    }
    let message = "a pull request's validation build (`rpo_ref: refs/pull/<n>/merge`) can get this grant: it runs \
                   the pull request's code in this pipeline"
        .to_string();
    let fix = "match:\n  rpo_ref: refs/heads/main\n(or `deny: {rpo_ref: {glob: \"refs/pull/*\"}}`)".to_string();
    vec![Finding::new(Severity::Warning, policy, UNTRUSTED_TRIGGER, "match.rpo_ref", message, fix)]
}

fn github_untrusted_trigger(policy: &Policy) -> Vec<Finding> {
    let reached: Vec<&str> =
        UNTRUSTED_GITHUB_EVENTS.into_iter().filter(|e| admits(policy, &[("event_name", Some(e))])).collect();
    if reached.is_empty() {
        return Vec::new();
    }
    let message = format!(
        "a job triggered by {} can get this grant: these events run with the base repository's identity \
         (`ref` is its default branch) but are started by pull requests, forks' included, and a workflow that \
         checks out the pull request's head runs its code",
        reached.iter().map(|e| format!("`{e}`")).collect::<Vec<_>>().join(" or ")
    );
    let fix = format!(
        "deny:\n  event_name: [{}]\n(or match only the events you mean, e.g. `match: {{event_name: [push, workflow_dispatch]}}`)",
        reached.join(", ")
    );
    vec![Finding::new(Severity::Warning, policy, UNTRUSTED_TRIGGER, "deny.event_name", message, fix)]
}

fn gitlab_untrusted_trigger(policy: &Policy) -> Vec<Finding> {
    let code_pinned = bound(policy, "job_project_id") || bound(policy, "job_namespace_id");
    if code_pinned || !admits(policy, &[("pipeline_source", Some("merge_request_event"))]) {
        return Vec::new();
    }
    let message = "a merge-request pipeline can get this grant while `job_project_id` is not bound: in a fork's \
                   merge-request pipeline `project_id` is this project but the code is the fork's (`job_project_id`)"
        .to_string();
    let project = bound_value(policy, "project_id", "<project id>");
    let fix = format!(
        "deny:\n  pipeline_source: merge_request_event\n(or bind where the code comes from: `match: {{job_project_id: \"{project}\"}}`)"
    );
    vec![Finding::new(Severity::Warning, policy, UNTRUSTED_TRIGGER, "deny.pipeline_source", message, fix)]
}

// ---- runner-unpinned ----------------------------------------------------------------------

/// Attack: a self-hosted runner can be shared or persistent; an earlier job on it (another
/// repository's, a pull request's) can leave a backdoor that reads this job's credentials.
fn runner_unpinned(policy: &Policy, platform: Platform) -> Vec<Finding> {
    if mentioned(policy, "runner_environment") {
        return Vec::new();
    }
    let hosted = match platform {
        Platform::GithubActions => "github-hosted",
        Platform::GitlabCi => "gitlab-hosted",
        Platform::Buildkite => "buildkite-hosted",
        // No runner claim in these platforms' tokens.
        _ => return Vec::new(),
    };
    let message = "no rule on `runner_environment`: the job may run on a self-hosted runner, which can be shared or \
                   persistent, so what ran on it before may read this job's credentials"
        .to_string();
    let fix = format!(
        "match:\n  runner_environment: {hosted}\n(a match rule fails closed when the claim is missing; \
         `deny: {{runner_environment: self-hosted}}` does not)"
    );
    vec![Finding::new(Severity::Warning, policy, RUNNER_UNPINNED, "match.runner_environment", message, fix)]
}

// ---- workflow-ref-without-repository ------------------------------------------------------

/// Attack: `job_workflow_ref: acme/deploy/.github/workflows/deploy.yml@…` with only the owner
/// bound lets every repository of the owner that calls the reusable workflow get the grant, with
/// its own inputs: a compromised or throwaway repository deploys production.
fn workflow_ref_without_repository(policy: &Policy, platform: Platform) -> Vec<Finding> {
    let (workflow, repository) = match platform {
        Platform::GithubActions => ("job_workflow_ref", "repository_id"),
        Platform::GitlabCi => ("ci_config_ref_uri", "project_id"),
        // No reusable workflow in the other platforms' tokens.
        _ => return Vec::new(),
    };
    if match_rule(policy, workflow).is_none() || bound(policy, repository) {
        return Vec::new();
    }
    let message = format!(
        "`{workflow}` is matched but `{repository}` is not bound: any repository or project of the owner that \
         runs this workflow gets the grant, with its own inputs"
    );
    let fix = format!("bind the callers:\nmatch:\n  {repository}: [\"<id>\", \"<id>\"]");
    let field = format!("match.{workflow}");
    vec![Finding::new(Severity::Warning, policy, WORKFLOW_REF_WITHOUT_REPOSITORY, &field, message, fix)]
}

// ---- github-repository-template, github-dangerous-permission, github-unknown-permission ----

/// Claims a GitHub token's owner and repositories may be rendered from: the platform names the
/// job's own repository with them, and the policy's id binding pins which one that is.
fn repository_naming_claims(platform: Platform) -> &'static [&'static str] {
    match platform {
        Platform::GithubActions => &["repository", "repository_owner"],
        Platform::GitlabCi => &["project_path", "namespace_path"],
        Platform::Buildkite => &["organization_slug", "pipeline_slug"],
        // No claim of these names an `owner/repository` of GitHub by itself.
        Platform::Circleci | Platform::AzurePipelines | Platform::Bitbucket | Platform::Jenkins | Platform::Generic => {
            &[]
        }
    }
}

/// Attack: `repositories: ["${ref_name}"]` (or `environment`, `actor`, `workflow` …): whoever
/// pushes a branch named `infra` gets a token for the `infra` repository. Only claims that name
/// the job's own repository, or claims a match rule pins to known values, may choose what a
/// token reaches; anything else widens the grant to whatever the job says.
fn github_repository_template(policy: &Policy, platform: Platform) -> Vec<Finding> {
    let trusted = repository_naming_claims(platform);
    let mut findings = Vec::new();
    for grant in &policy.grants {
        let CredentialSpec::Github { owner, repositories, .. } = &grant.spec else { continue };
        let fields = std::iter::once(("owner".to_string(), owner))
            .chain(repositories.iter().enumerate().map(|(i, t)| (format!("repositories[{i}]"), t)));
        for (field, template) in fields {
            for claim in template.claims() {
                if trusted.contains(&claim) || bound(policy, claim) {
                    continue;
                }
                let message = format!(
                    "`{claim}` chooses what the token of grant `{}` reaches, and the job chooses `{claim}` (nothing \
                     pins it): a job that sets it to another repository's name gets a token for that repository",
                    grant.name
                );
                // CircleCI, Azure, Bitbucket, Jenkins and generic tokens have no claim naming the
                // job's own repository: the fix cannot offer one (an index here panicked on them).
                let own = trusted
                    .first()
                    .map(|c| format!(", or use `${{{c}}}` (the job's own repository)"))
                    .unwrap_or_default();
                let fix = format!(
                    "name the repositories{own}, or pin `{claim}` with a match rule:\nmatch:\n  {claim}: [<value>, \
                     <value>]"
                );
                let at = format!("grants.{}.{field}", grant.name);
                findings.push(Finding::new(Severity::Error, policy, GITHUB_REPOSITORY_TEMPLATE, &at, message, fix));
            }
        }
    }
    findings
}

/// Attack: a token with `workflows: write` rewrites a workflow that then runs with every secret
/// of the repository; `administration` turns off the branch protection the policy's `ref` rule
/// relies on; organisation permissions reach past the repositories the grant names. Warnings:
/// a release job may need one, and says so by keeping it. A permission GitHub may not know is a
/// warning too (GitHub refuses the token request; the typo shows here first).
fn github_permissions(policy: &Policy, _: Platform) -> Vec<Finding> {
    let mut findings = Vec::new();
    for grant in &policy.grants {
        let CredentialSpec::Github { permissions, .. } = &grant.spec else { continue };
        for (name, level) in permissions {
            let at = format!("grants.{}.permissions.{name}", grant.name);
            if let Some(why) = crate::github_format::dangerous_permission(name) {
                let message = format!("`{name}: {level}` {why}: a job holding it can reach past this grant");
                let fix = format!(
                    "drop `{name}` unless this job must have it; keep such a grant in its own policy bound to one \
                     protected ref or environment"
                );
                findings.push(Finding::new(Severity::Warning, policy, GITHUB_DANGEROUS_PERMISSION, &at, message, fix));
            }
            if crate::github_format::KNOWN_PERMISSIONS.binary_search(&name.as_str()).is_err() {
                let message =
                    format!("`{name}` is not a GitHub App permission ephemera knows; GitHub refuses unknown ones");
                let fix =
                    "check the spelling against GitHub's list (e.g. `contents`, `pull_requests`, `issues`)".into();
                findings.push(Finding::new(Severity::Warning, policy, GITHUB_UNKNOWN_PERMISSION, &at, message, fix));
            }
        }
    }
    findings
}

// ---- ssh-principal-template, ssh-forwarding-extension ----------------------------------------

/// May a principal be rendered from `claim` without a match rule pinning it? The names
/// `github-repository-template` trusts (the job's own repository, project or owner:
/// `deploy-${repository_owner}`), and the ids the immutable-claim rule binds: the platform sets
/// them, and the policy's id binding pins which ones they are.
fn principal_may_use(platform: Platform, claim: &str) -> bool {
    const IDS: [&str; 4] = ["repository_id", "repository_owner_id", "project_id", "namespace_id"];
    repository_naming_claims(platform).contains(&claim) || IDS.contains(&claim)
}

/// Attack: `principals: ["${actor}"]` (or `ref_name`, `environment` …): a job whose actor or
/// branch is named `root`, or like another user, gets a certificate that logs in as that user
/// on every server trusting the CA. Only claims naming the job's own repository, or claims a
/// match rule pins to known values, may choose the users a certificate names.
fn ssh_principal_template(policy: &Policy, platform: Platform) -> Vec<Finding> {
    let owner = repository_naming_claims(platform).last().copied().unwrap_or("repository_owner");
    let mut findings = Vec::new();
    for grant in &policy.grants {
        let CredentialSpec::Ssh { principals, .. } = &grant.spec else { continue };
        for (i, template) in principals.iter().enumerate() {
            for claim in template.claims() {
                if principal_may_use(platform, claim) || bound(policy, claim) {
                    continue;
                }
                let message = format!(
                    "`{claim}` chooses which users the certificate of grant `{}` logs in as, and the job chooses \
                     `{claim}` (nothing pins it): a job that sets it to `root` or another user's name logs in as that \
                     user on every server trusting the CA",
                    grant.name
                );
                let fix = format!(
                    "name the principals, or build them from the job's own repository (`deploy-${{{}}}`), or pin \
                     `{claim}` with a match rule:\nmatch:\n  {claim}: [<value>, <value>]",
                    owner
                );
                let at = format!("grants.{}.principals[{i}]", grant.name);
                findings.push(Finding::new(Severity::Error, policy, SSH_PRINCIPAL_TEMPLATE, &at, message, fix));
            }
        }
    }
    findings
}

/// Extensions that reach past the login itself: a forwarded agent lends the job's keys to the
/// server (and whoever is root there), port forwarding turns the server into a tunnel into its
/// network, X11 forwarding exposes the client's display, and `permit-user-rc` runs `~/.ssh/rc`
/// at login. Warnings: a job may need one, and says so by keeping it.
fn ssh_forwarding_extensions(policy: &Policy, _: Platform) -> Vec<Finding> {
    const REACHING: [(&str, &str); 4] = [
        ("permit-agent-forwarding", "lends the job's SSH agent to the server, and to whoever is root there"),
        ("permit-port-forwarding", "makes the server a tunnel into every network it reaches"),
        ("permit-X11-forwarding", "opens the client's X display to the server"),
        ("permit-user-rc", "runs the user's `~/.ssh/rc` at every login, past any `force-command`"),
    ];
    let mut findings = Vec::new();
    for grant in &policy.grants {
        let CredentialSpec::Ssh { extensions, .. } = &grant.spec else { continue };
        for (name, why) in REACHING.iter().filter(|(name, _)| extensions.iter().any(|e| e == name)) {
            let message = format!("extension `{name}` {why}");
            let fix = format!("drop `{name}` unless this job must have it (`permit-pty` alone serves most jobs)");
            let at = format!("grants.{}.extensions", grant.name);
            findings.push(Finding::new(Severity::Warning, policy, SSH_FORWARDING_EXTENSION, &at, message, fix));
        }
    }
    findings
}

// ---- the report -----------------------------------------------------------------------------

/// What `ephemera policy check` prints, as text or JSON.
#[derive(Debug, Serialize)]
pub struct Report {
    /// No error, and under `--strict` no warning either: the exit status is 0 exactly when true.
    pub ok: bool,
    /// Policy files checked.
    pub policies: usize,
    pub errors: usize,
    pub warnings: usize,
    pub findings: Vec<Finding>,
    #[serde(skip)]
    strict: bool,
}

/// Loads every policy in `dir` with the server's loader and lints it. When some file does not
/// load, the set is refused as a whole (as the server would), and every file that loads on its
/// own is still linted, so one broken file does not hide the others' findings.
pub fn check_dir(dir: &Path, ctx: &LoadContext, strict: bool) -> Report {
    let mut read_errors = Vec::new();
    let mut sources: Vec<Source> = Vec::new();
    read_policy_files(dir, &mut sources, &mut read_errors);
    let files: BTreeSet<&Path> =
        sources.iter().map(|s| s.file.as_path()).chain(read_errors.iter().map(|e| e.file.as_path())).collect();
    let policies = files.into_iter().filter(|f| *f != dir).count();
    let mut findings: Vec<Finding> = read_errors.iter().map(Finding::from).collect();
    match PolicySet::load_sources(sources.clone(), &[], ctx) {
        Ok(set) => findings.extend(lint(&set, ctx)),
        Err(errors) => {
            findings.extend(errors.iter().map(Finding::from));
            for source in sources {
                if let Ok(alone) = PolicySet::load_sources(vec![source], &[], ctx) {
                    findings.extend(lint(&alone, ctx));
                }
            }
        }
    }
    sort(&mut findings);
    Report::new(policies, findings, strict)
}

impl Report {
    pub fn new(policies: usize, findings: Vec<Finding>, strict: bool) -> Report {
        let errors = findings.iter().filter(|f| f.severity == Severity::Error).count();
        let warnings = findings.len() - errors;
        let ok = errors == 0 && !(strict && warnings > 0);
        Report { ok, policies, errors, warnings, findings, strict }
    }

    /// One block per finding, then a summary line.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        for f in &self.findings {
            out.push_str(&render_finding(f));
        }
        let verdict = match (self.ok, self.errors) {
            (true, _) => "ok",
            (false, 0) if self.strict => "failed (--strict: warnings fail)",
            (false, _) => "failed",
        };
        out.push_str(&format!(
            "{verdict}: {}, {}, {}\n",
            plural(self.policies, "policy", "policies"),
            plural(self.errors, "error", "errors"),
            plural(self.warnings, "warning", "warnings")
        ));
        out
    }

    pub fn to_json(&self) -> String {
        // Serializing plain strings, numbers and paths cannot fail; an empty object is never
        // printed in practice, and would fail a consumer's parse rather than pass as "ok".
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }
}

/// `FILE: SEVERITY[RULE]: policy `NAME`: FIELD: MESSAGE`, then the fix, indented.
fn render_finding(f: &Finding) -> String {
    let mut head = format!("{}: {}[{}]: ", f.file.display(), f.severity.as_str(), f.rule);
    if !f.policy.is_empty() {
        head.push_str(&format!("policy `{}`: ", f.policy));
    }
    if !f.field.is_empty() {
        head.push_str(&format!("{}: ", f.field));
    }
    let fix = f.fix.lines().collect::<Vec<_>>().join("\n       ");
    format!("{head}{}\n  fix: {fix}\n", f.message)
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

// ---- ssh-rerun-admitted, bitbucket-uuid-braces, sub-per-step --------------------------------

/// Attack (CircleCI): "Rerun job with SSH" gives whoever clicks it a shell inside the job, with
/// the job's token: the grant's credentials are theirs to copy. A CircleCI policy denies such a
/// job unless it names the claim itself; one that admits it is reported.
fn ssh_rerun_admitted(policy: &Policy, platform: Platform) -> Vec<Finding> {
    if platform != Platform::Circleci || !admits(policy, &[(CIRCLECI_SSH_RERUN, Some("true"))]) {
        return Vec::new();
    }
    let message = format!(
        "a job re-run with SSH (`{CIRCLECI_SSH_RERUN}: true`) can get this grant: the person who re-ran it holds a \
         shell in the job and can copy its credentials"
    );
    let fix = format!(
        "remove the rule on `{CIRCLECI_SSH_RERUN}` (CircleCI policies deny it by default), or\ndeny:\n  {CIRCLECI_SSH_RERUN}: true"
    );
    vec![Finding::new(
        Severity::Warning,
        policy,
        SSH_RERUN_ADMITTED,
        &format!("match.{CIRCLECI_SSH_RERUN}"),
        message,
        fix,
    )]
}

/// Bitbucket sends every UUID claim in braces (`{2b4d…}`): a rule with a bare UUID matches no
/// token at all. Not a hole (it fails closed) but a policy that can never grant is a mistake
/// the author should hear about before a deploy fails.
fn bitbucket_uuid_braces(policy: &Policy, platform: Platform) -> Vec<Finding> {
    if platform != Platform::Bitbucket {
        return Vec::new();
    }
    let braced = |v: &str| v.starts_with('{') && v.ends_with('}');
    let sections = [("match", &policy.match_rules), ("deny", &policy.deny_rules)];
    sections
        .into_iter()
        .flat_map(|(section, rules)| rules.iter().map(move |r| (section, r)))
        .filter(|(_, r)| r.claim.ends_with("Uuid"))
        .filter_map(|(section, r)| {
            let values: Vec<&String> = match &r.matcher {
                Matcher::Exact(v) => vec![v],
                Matcher::AnyOf(vs) => vs.iter().collect(),
                _ => return None,
            };
            let bare = values.into_iter().find(|v| !braced(v))?;
            let message = format!(
                "`{}` is compared with `{bare}`, but Bitbucket sends its UUIDs in braces, so this rule never matches",
                r.claim
            );
            let fix = format!("{section}:\n  {}: \"{{{bare}}}\"", r.claim);
            Some(Finding::new(
                Severity::Warning,
                policy,
                BITBUCKET_UUID_BRACES,
                &format!("{section}.{}", r.claim),
                message,
                fix,
            ))
        })
        .collect()
}

/// Bitbucket's `sub` is `{repository}:{step}` (with the deployment environment between them):
/// the step's UUID is new in every run, so binding `sub` matches one step of one run and nothing
/// after it. The stable UUID claims say what was meant.
fn sub_per_step(policy: &Policy, platform: Platform) -> Vec<Finding> {
    if platform != Platform::Bitbucket || !bound(policy, "sub") {
        return Vec::new();
    }
    let message = "`sub` is bound, but Bitbucket's `sub` holds the step's UUID, which is new in every run: the rule \
                   matches one step of one run"
        .to_string();
    let fix = "match the stable claims instead:\nmatch:\n  repositoryUuid: \"{<repository uuid>}\"\n  \
               deploymentEnvironmentUuid: \"{<environment uuid>}\""
        .to_string();
    vec![Finding::new(Severity::Warning, policy, SUB_PER_STEP, "match.sub", message, fix)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_prefixes_stop_at_the_first_wildcard() {
        let cases = [
            (regex_literal_prefix("repo:acme/web:.*"), "repo:acme/web:"),
            (regex_literal_prefix(r"repo:acme/web\.io:(ref|pull_request).*"), "repo:acme/web.io:"),
            (regex_literal_prefix("repo:acme/webs?:.*"), "repo:acme/web"),
            (regex_literal_prefix(r"repo:\w+/web:.*"), "repo:"),
            (regex_literal_prefix("(?i)repo:acme"), ""),
            (glob_literal_prefix("repo:acme/*:*"), "repo:acme/"),
            (glob_literal_prefix("repo:acme/web:ref:refs/heads/main"), "repo:acme/web:ref:refs/heads/main"),
        ];
        for (got, want) in cases {
            assert_eq!(got, want);
        }
    }

    #[test]
    fn repo_prefixes_are_completed_to_owner_and_repository() {
        assert_eq!(repo_prefix("repo:acme/web:ref:x").as_deref(), Some("repo:acme/web:"));
        assert_eq!(repo_prefix("repo:acme/").as_deref(), Some("repo:acme/probe:"));
        assert_eq!(repo_prefix("repo:acme").as_deref(), Some("repo:acme/probe:"));
        assert_eq!(repo_prefix("project_path:x"), None);
    }

    #[test]
    fn a_load_error_names_its_policy_from_the_file() {
        assert_eq!(policy_name_of(Path::new("policies/deploy-web.yaml")), "deploy-web");
        assert_eq!(policy_name_of(Path::new("<built-in dev>")), "dev");
        assert_eq!(policy_name_of(Path::new("policies")), "");
    }
}
