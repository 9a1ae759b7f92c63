//! `ephemera policy check`'s lints: for each lint, policies that trigger it and close variants
//! that do not. A finding of severity error makes the server refuse the policy set, so the
//! near misses matter as much as the hits.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ephemera::claims::Platform;
use ephemera::config::Config;
use ephemera::policy::lint::{self, Finding, Severity};
use ephemera::policy::{IssuerFacts, LoadContext, PolicySet};
use serde_json::{Map, Value};
use std::path::Path;

/// The default issuers (github, gitlab, buildkite) and one of every other platform, named by it;
/// the generic one's config names `project_uuid` as its identity claim.
fn ctx() -> LoadContext {
    let mut ctx = LoadContext::from_config(&Config::defaults());
    for (name, platform) in [
        ("circleci", Platform::Circleci),
        ("azure-pipelines", Platform::AzurePipelines),
        ("bitbucket", Platform::Bitbucket),
        ("jenkins", Platform::Jenkins),
    ] {
        ctx.issuers.insert(name.into(), platform.into());
    }
    ctx.issuers.get_mut("jenkins").unwrap().identity_claims = vec!["sub".into()];
    let generic = IssuerFacts { platform: Platform::Generic, identity_claims: vec!["project_uuid".into()] };
    ctx.issuers.insert("generic".into(), generic);
    // AI agents' identity provider (actor rules, token exchange): policies/agent-review.yaml and
    // the dev policy name it.
    let agents = IssuerFacts { platform: Platform::Generic, identity_claims: vec!["sub".into()] };
    ctx.issuers.insert("agents".into(), agents);
    ctx
}

/// A policy named `p` with these `match` and `deny` maps (YAML flow maps).
fn policy(issuer: &str, match_rules: &str, deny: &str) -> String {
    format!(
        "issuer: {issuer}\nmatch: {match_rules}\ndeny: {deny}\nttl: {{default: 5m, max: 10m}}\ngrants:\n  api: {{backend: jwt, audience: x}}\n"
    )
}

/// Every finding for one policy: load errors when it does not load, else its lints.
fn findings(yaml: &str) -> Vec<Finding> {
    match PolicySet::load(None, &[("p", yaml)], &ctx()) {
        Ok(set) => lint::lint(&set, &ctx()),
        Err(errors) => errors.iter().map(Finding::from).collect(),
    }
}

/// One case: a scenario, a policy, and the finding of `rule` it must raise (severity, field),
/// or `None` when it must raise no finding of that rule.
type Case<'a> = (&'a str, String, Option<(Severity, &'a str)>);

fn check_table(rule: &str, cases: &[Case<'_>]) {
    for (scenario, yaml, want) in cases {
        let all = findings(yaml);
        let got: Vec<(Severity, &str)> =
            all.iter().filter(|f| f.rule == rule).map(|f| (f.severity, f.field.as_str())).collect();
        let want: Vec<(Severity, &str)> = want.iter().copied().collect();
        assert_eq!(got, want, "{rule}: {scenario}\n{yaml}\nall findings: {all:#?}");
        for f in all.iter().filter(|f| f.rule == rule) {
            assert!(!f.message.is_empty() && !f.fix.is_empty(), "{scenario}: {f:?}");
            assert_eq!(f.policy, "p", "{scenario}");
        }
    }
}

const WARN: Severity = Severity::Warning;
const ERROR: Severity = Severity::Error;

#[test]
fn immutable_id_is_a_load_error_reported_under_its_own_rule() {
    check_table(
        "immutable-id",
        &[
            ("bound only by name", policy("github", r#"{repository: acme/web}"#, "{}"), Some((ERROR, "match"))),
            (
                "a glob on the id binds nothing",
                policy("github", r#"{repository_id: {glob: "7*"}}"#, "{}"),
                Some((ERROR, "match")),
            ),
            ("a GitLab id on a GitHub policy", policy("github", r#"{project_id: "20"}"#, "{}"), Some((ERROR, "match"))),
            ("the repository id bound", policy("github", r#"{repository_id: "74"}"#, "{}"), None),
            ("the project id bound", policy("gitlab", r#"{project_id: "20"}"#, "{}"), None),
        ],
    );
}

#[test]
fn ttl_above_backend_max_is_a_load_error_reported_under_its_own_rule() {
    let ttl =
        |max: &str| policy("github", r#"{repository_id: "74"}"#, "{}").replace("max: 10m", &format!("max: {max}"));
    check_table(
        "ttl-above-backend-max",
        &[
            ("2h over the jwt backend's 1h", ttl("2h"), Some((ERROR, "grants.api"))),
            ("exactly the backend's 1h", ttl("1h"), None),
        ],
    );
}

#[test]
fn name_without_id_fires_on_a_name_whose_id_is_not_bound() {
    check_table(
        "name-without-id",
        &[
            (
                "repository name under a bound owner",
                policy("github", r#"{repository_owner_id: "65", repository: acme/web}"#, "{}"),
                Some((WARN, "match.repository")),
            ),
            (
                "owner glob beside a bound repository id",
                policy("github", r#"{repository_id: "74", repository_owner: {glob: "acme*"}}"#, "{}"),
                None,
            ),
            (
                "owner name beside its repository id (the repository pins its owner)",
                policy("github", r#"{repository_id: "74", repository_owner: acme}"#, "{}"),
                None,
            ),
            (
                "repository name beside its id",
                policy("github", r#"{repository_id: "74", repository: acme/web}"#, "{}"),
                None,
            ),
            (
                "repository id only by a glob",
                policy(
                    "github",
                    r#"{repository_owner_id: "65", repository_id: {glob: "7*"}, repository: acme/web}"#,
                    "{}",
                ),
                Some((WARN, "match.repository")),
            ),
            (
                "GitLab project path under a bound group",
                policy("gitlab", r#"{namespace_id: "72", project_path: my-group/my-project}"#, "{}"),
                Some((WARN, "match.project_path")),
            ),
            (
                "GitLab group path beside the project id",
                policy("gitlab", r#"{project_id: "20", namespace_path: my-group}"#, "{}"),
                None,
            ),
            (
                "a name only in deny narrows, it does not grant",
                policy("github", r#"{repository_owner_id: "65"}"#, "{repository: acme/legacy}"),
                None,
            ),
        ],
    );
}

#[test]
fn sub_matches_untrusted_is_an_error_unless_something_turns_pull_requests_away() {
    let repo = r#"repository_id: "74""#;
    let sub = |rule: &str, extra_match: &str, deny: &str| {
        policy("github", &format!("{{{repo}, sub: {rule}{extra_match}}}"), deny)
    };
    check_table(
        "sub-matches-untrusted",
        &[
            (
                "glob on every subject of the repository",
                sub(r#"{glob: "repo:acme/web:*"}"#, "", "{}"),
                Some((ERROR, "match.sub")),
            ),
            (
                "regex on every subject of the repository",
                sub(r#"{regex: "repo:acme/web:.*"}"#, "", "{}"),
                Some((ERROR, "match.sub")),
            ),
            (
                "regex alternation that names pull_request",
                sub(r#"{regex: "repo:acme/web:(ref:refs/heads/main|pull_request)"}"#, "", "{}"),
                Some((ERROR, "match.sub")),
            ),
            (
                "glob on every repository of the owner",
                sub(r#"{glob: "repo:acme/*:*"}"#, "", "{}"),
                Some((ERROR, "match.sub")),
            ),
            ("regex with no literal prefix", sub(r#"{regex: ".*"}"#, "", "{}"), Some((ERROR, "match.sub"))),
            (
                "glob on every environment (a pull request can name a new, unprotected one)",
                sub(r#"{glob: "repo:acme/web:environment:*"}"#, "", "{}"),
                Some((ERROR, "match.sub")),
            ),
            (
                "the same glob with ref bound to main",
                sub(r#"{glob: "repo:acme/web:*"}"#, ", ref: refs/heads/main", "{}"),
                None,
            ),
            (
                "the same glob with pull requests denied by event",
                sub(r#"{glob: "repo:acme/web:*"}"#, "", "{event_name: [pull_request]}"),
                None,
            ),
            (
                "the same glob matching only push and dispatch events",
                sub(r#"{glob: "repo:acme/web:*"}"#, ", event_name: [push, workflow_dispatch]", "{}"),
                None,
            ),
            (
                "a deny on pull_request_target alone leaves pull_request open",
                sub(r#"{glob: "repo:acme/web:*"}"#, "", "{event_name: [pull_request_target]}"),
                Some((ERROR, "match.sub")),
            ),
            (
                "environment glob with the environment pinned (left to its protection rules)",
                sub(r#"{glob: "repo:acme/web:environment:*"}"#, ", environment: production", "{}"),
                None,
            ),
            ("glob on branches only", sub(r#"{glob: "repo:acme/web:ref:refs/heads/*"}"#, "", "{}"), None),
            ("exact subject", sub(r#""repo:acme/web:ref:refs/heads/main""#, "", "{}"), None),
            (
                "GitLab subjects are not GitHub's",
                policy("gitlab", r#"{project_id: "20", sub: {glob: "project_path:my-group/my-project:*"}}"#, "{}"),
                None,
            ),
        ],
    );
}

#[test]
fn untrusted_trigger_fires_while_pull_request_target_workflow_run_or_fork_mrs_reach_the_grant() {
    let gh = |match_rules: &str, deny: &str| policy("github", match_rules, deny);
    let gl = |match_rules: &str, deny: &str| policy("gitlab", match_rules, deny);
    check_table(
        "untrusted-trigger",
        &[
            ("no rule on event_name", gh(r#"{repository_id: "74"}"#, "{}"), Some((WARN, "deny.event_name"))),
            (
                "ref bound to main does not stop pull_request_target (its ref is the base branch)",
                gh(r#"{repository_id: "74", ref: refs/heads/main}"#, "{}"),
                Some((WARN, "deny.event_name")),
            ),
            (
                "deny covers pull_request_target only",
                gh(r#"{repository_id: "74"}"#, "{event_name: pull_request_target}"),
                Some((WARN, "deny.event_name")),
            ),
            (
                "match excludes only pull_request",
                gh(r#"{repository_id: "74", event_name: {not: pull_request}}"#, "{}"),
                Some((WARN, "deny.event_name")),
            ),
            (
                "deny covers both",
                gh(r#"{repository_id: "74"}"#, "{event_name: [pull_request, pull_request_target, workflow_run]}"),
                None,
            ),
            (
                "deny by a glob covering both",
                gh(r#"{repository_id: "74"}"#, r#"{event_name: {regex: "pull_request.*|workflow_run"}}"#),
                None,
            ),
            ("match only push", gh(r#"{repository_id: "74", event_name: push}"#, "{}"), None),
            (
                "GitLab: merge-request pipelines reach the grant",
                gl(r#"{project_id: "20"}"#, "{}"),
                Some((WARN, "deny.pipeline_source")),
            ),
            (
                "GitLab: ref_protected does not pin where the code comes from",
                gl(r#"{project_id: "20", ref_protected: "true"}"#, "{}"),
                Some((WARN, "deny.pipeline_source")),
            ),
            ("GitLab: job_project_id bound", gl(r#"{project_id: "20", job_project_id: "20"}"#, "{}"), None),
            (
                "GitLab: job_project_id only by a glob",
                gl(r#"{project_id: "20", job_project_id: {glob: "*"}}"#, "{}"),
                Some((WARN, "deny.pipeline_source")),
            ),
            (
                "GitLab: merge-request pipelines denied",
                gl(r#"{project_id: "20"}"#, "{pipeline_source: merge_request_event}"),
                None,
            ),
            ("GitLab: match only push", gl(r#"{project_id: "20", pipeline_source: push}"#, "{}"), None),
        ],
    );
}

#[test]
fn runner_unpinned_fires_when_no_rule_mentions_runner_environment() {
    check_table(
        "runner-unpinned",
        &[
            (
                "GitHub, no rule",
                policy("github", r#"{repository_id: "74"}"#, "{}"),
                Some((WARN, "match.runner_environment")),
            ),
            (
                "GitLab, no rule",
                policy("gitlab", r#"{project_id: "20"}"#, "{}"),
                Some((WARN, "match.runner_environment")),
            ),
            (
                "GitHub, matched to github-hosted",
                policy("github", r#"{repository_id: "74", runner_environment: github-hosted}"#, "{}"),
                None,
            ),
            (
                "GitLab, self-hosted denied",
                policy("gitlab", r#"{project_id: "20"}"#, "{runner_environment: self-hosted}"),
                None,
            ),
        ],
    );
}

#[test]
fn workflow_ref_without_repository_fires_on_an_owner_wide_reusable_workflow_grant() {
    let wf = r#"job_workflow_ref: {glob: "acme/deploy/.github/workflows/*.yml@refs/heads/main"}"#;
    let ci = r#"ci_config_ref_uri: "gitlab.com/my-group/ci//deploy.yml@refs/heads/main""#;
    check_table(
        "workflow-ref-without-repository",
        &[
            (
                "GitHub, owner bound only",
                policy("github", &format!(r#"{{repository_owner_id: "65", {wf}}}"#), "{}"),
                Some((WARN, "match.job_workflow_ref")),
            ),
            (
                "GitHub, repositories bound by a list",
                policy("github", &format!(r#"{{repository_id: ["74", "75"], {wf}}}"#), "{}"),
                None,
            ),
            (
                "GitHub, workflow ref only in deny",
                policy("github", r#"{repository_owner_id: "65"}"#, &format!("{{{wf}}}")),
                None,
            ),
            (
                "GitLab, group bound only",
                policy("gitlab", &format!(r#"{{namespace_id: "72", {ci}}}"#), "{}"),
                Some((WARN, "match.ci_config_ref_uri")),
            ),
            ("GitLab, project bound", policy("gitlab", &format!(r#"{{project_id: "20", {ci}}}"#), "{}"), None),
        ],
    );
}

// ---- the lints agree with the decision ------------------------------------------------------

fn fixture(name: &str) -> Map<String, Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/claims").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The lint's verdict, and whether the real decision admits the fixture's token.
fn verdict_and_decision(yaml: &str, rule: &str, issuer: &str, claims: &str) -> (bool, bool) {
    let set = PolicySet::load(None, &[("p", yaml)], &ctx()).unwrap();
    let flagged = lint::lint(&set, &ctx()).iter().any(|f| f.rule == rule);
    (flagged, set.get("p").unwrap().evaluate(issuer, &fixture(claims)).is_ok())
}

#[test]
fn a_policy_flagged_for_untrusted_triggers_admits_the_fork_fixtures_and_its_fixed_variant_does_not() {
    let github = |deny: &str| policy("github", r#"{repository_id: "74", ref: refs/heads/main}"#, deny);
    let gitlab = |deny: &str| policy("gitlab", r#"{project_id: "20"}"#, deny);
    let fork_pr = "github-pull-request-from-fork.json";
    let fork_mr = "gitlab-fork-merge-request.json";
    assert_eq!(verdict_and_decision(&github("{}"), "untrusted-trigger", "github", fork_pr), (true, true));
    assert_eq!(
        verdict_and_decision(
            &github("{event_name: [pull_request_target, workflow_run]}"),
            "untrusted-trigger",
            "github",
            fork_pr
        ),
        (false, false)
    );
    assert_eq!(verdict_and_decision(&gitlab("{}"), "untrusted-trigger", "gitlab", fork_mr), (true, true));
    assert_eq!(
        verdict_and_decision(&gitlab("{pipeline_source: merge_request_event}"), "untrusted-trigger", "gitlab", fork_mr),
        (false, false)
    );
}

#[test]
fn the_example_policies_lint_clean() {
    let set = PolicySet::load(Some(&Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")), &[], &ctx()).unwrap();
    assert_eq!(lint::lint(&set, &ctx()), Vec::<Finding>::new());
}

#[test]
fn findings_are_sorted_by_file_then_field_and_render_as_text_and_json() {
    let noisy = policy("github", r#"{repository_owner_id: "65", repository: acme/web}"#, "{}");
    let quiet = policy(
        "github",
        r#"{repository_id: "74", runner_environment: github-hosted}"#,
        "{event_name: [pull_request_target, workflow_run]}",
    );
    let set = PolicySet::load(None, &[("b-noisy", &noisy), ("a-quiet", &quiet)], &ctx()).unwrap();
    let findings = lint::lint(&set, &ctx());
    let keys: Vec<(String, &str)> = findings.iter().map(|f| (f.policy.clone(), f.field.as_str())).collect();
    assert_eq!(
        keys,
        [
            ("b-noisy".to_string(), "deny.event_name"),
            ("b-noisy".to_string(), "match.repository"),
            ("b-noisy".to_string(), "match.runner_environment"),
        ]
    );
    let report = lint::Report::new(set.len(), findings, false);
    assert!(report.ok);
    let text = report.render_text();
    assert!(
        text.contains(
            "<built-in b-noisy>: warning[runner-unpinned]: policy `b-noisy`: match.runner_environment: no rule"
        ),
        "{text}"
    );
    assert!(text.contains("\n  fix: match:\n         runner_environment: github-hosted"), "{text}");
    assert!(text.ends_with("ok: 2 policies, 0 errors, 3 warnings\n"), "{text}");
    let json: Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["findings"][0]["severity"], "warning");
    assert_eq!(json["findings"][0]["rule"], "untrusted-trigger");
    assert_eq!((json["ok"].as_bool(), json["warnings"].as_u64()), (Some(true), Some(3)));
    assert!(!lint::Report::new(2, lint::lint(&set, &ctx()), true).ok, "--strict fails on warnings");
}

#[test]
fn the_built_in_dev_policy_lints_without_findings() {
    let all = findings(ephemera::dev::DEV_POLICY);
    assert!(all.is_empty(), "serve --dev would log these at every start: {all:#?}");
}

// ---- github-app grants (issue 16) ----------------------------------------------------------

/// The defaults plus a `github-app` backend named `gh`.
fn github_ctx() -> LoadContext {
    let mut ctx = ctx();
    ctx.backends.insert("gh".into(), ("github-app", 3600));
    ctx
}

fn github_findings(grant: &str, extra_match: &str) -> Vec<Finding> {
    let yaml = format!(
        "issuer: github\nmatch: {{repository_id: \"74\", ref: refs/heads/main, runner_environment: github-hosted{extra_match}}}\n\
         deny: {{event_name: [pull_request_target, workflow_run]}}\nttl: {{default: 5m, max: 10m}}\ngrants:\n  gh: {grant}\n"
    );
    match PolicySet::load(None, &[("p", &yaml)], &github_ctx()) {
        Ok(set) => lint::lint(&set, &github_ctx()),
        Err(errors) => errors.iter().map(Finding::from).collect(),
    }
}

fn rules_and_fields(findings: &[Finding]) -> Vec<(&str, Severity, &str)> {
    findings.iter().map(|f| (f.rule, f.severity, f.field.as_str())).collect()
}

#[test]
fn a_github_grant_whose_repositories_the_job_chooses_is_an_error_and_its_own_repository_is_not() {
    let grant = |repos: &str| {
        format!("{{backend: gh, owner: octo-org, repositories: {repos}, permissions: {{contents: write}}}}")
    };
    assert_eq!(
        rules_and_fields(&github_findings(&grant("[web, \"${repository}\"]"), "")),
        [],
        "names and the job's own repository"
    );
    assert_eq!(
        rules_and_fields(&github_findings(&grant("[\"${ref_name}\"]"), "")),
        [("github-repository-template", ERROR, "grants.gh.repositories[0]")],
        "a branch named like another repository would get a token for it"
    );
    assert_eq!(
        rules_and_fields(&github_findings(&grant("[\"deploy-${environment}\"]"), "")),
        [("github-repository-template", ERROR, "grants.gh.repositories[0]")]
    );
    assert_eq!(
        rules_and_fields(&github_findings(&grant("[\"deploy-${environment}\"]"), ", environment: [prod, staging]")),
        [],
        "a claim the policy pins to known values chooses among those only"
    );
    let owner = "{backend: gh, owner: \"${actor}\", repositories: [web], permissions: {contents: read}}";
    assert_eq!(
        rules_and_fields(&github_findings(owner, "")),
        [("github-repository-template", ERROR, "grants.gh.owner")]
    );
    let own = "{backend: gh, owner: \"${repository_owner}\", repositories: [web], permissions: {contents: read}}";
    assert_eq!(rules_and_fields(&github_findings(own, "")), []);
}

#[test]
fn dangerous_and_unknown_github_permissions_are_warnings_with_a_reason() {
    let grant = "{backend: gh, owner: octo-org, repositories: [web], permissions: \
                 {contents: write, workflows: write, administration: read, organization_secrets: read, contnets: read}}";
    let all = github_findings(grant, "");
    assert_eq!(
        rules_and_fields(&all),
        [
            ("github-dangerous-permission", WARN, "grants.gh.permissions.administration"),
            ("github-unknown-permission", WARN, "grants.gh.permissions.contnets"),
            ("github-dangerous-permission", WARN, "grants.gh.permissions.organization_secrets"),
            ("github-dangerous-permission", WARN, "grants.gh.permissions.workflows"),
        ]
    );
    let workflows = all.iter().find(|f| f.field.ends_with("workflows")).unwrap();
    assert!(workflows.message.contains("runs code of its choosing with every secret"), "{}", workflows.message);
}

#[test]
fn a_github_grant_must_name_its_repositories_and_permissions_and_stay_in_its_owner() {
    let cases = [
        (
            "no repositories: never the installation's every repository by omission",
            "{backend: gh, owner: o, repositories: [], permissions: {contents: read}}",
            "grants.gh.repositories",
        ),
        ("no permissions", "{backend: gh, owner: o, repositories: [web], permissions: {}}", "grants.gh.permissions"),
        (
            "another owner's repository",
            "{backend: gh, owner: o, repositories: [evil/web], permissions: {contents: read}}",
            "grants.gh.repositories[0]",
        ),
        (
            "a path in a name",
            "{backend: gh, owner: o, repositories: [\"..\"], permissions: {contents: read}}",
            "grants.gh.repositories[0]",
        ),
        (
            "an owner that is no login",
            "{backend: gh, owner: \"o/x\", repositories: [web], permissions: {contents: read}}",
            "grants.gh.owner",
        ),
        (
            "a level GitHub has not",
            "{backend: gh, owner: o, repositories: [web], permissions: {contents: all}}",
            "grants.gh",
        ),
        (
            "a field of another kind",
            "{backend: gh, owner: o, repositories: [web], permissions: {contents: read}, role_arn: x}",
            "grants.gh",
        ),
    ];
    for (scenario, grant, field) in cases {
        let all = github_findings(grant, "");
        assert!(
            all.iter().any(|f| f.rule == "invalid" && f.severity == ERROR && f.field == field),
            "{scenario}: {all:#?}"
        );
    }
    let above = "{backend: gh, owner: o, repositories: [web], permissions: {contents: read}}";
    let yaml = format!(
        "issuer: github\nmatch: {{repository_id: \"74\"}}\nttl: {{default: 5m, max: 2h}}\ngrants:\n  gh: {above}\n"
    );
    let errors = PolicySet::load(None, &[("p", &yaml)], &github_ctx()).unwrap_err();
    assert!(errors.iter().any(|e| e.rule == "ttl-above-backend-max"), "GitHub's hour: {errors:?}");
}

// ---- postgres grants (issue 17) ------------------------------------------------------------

#[test]
fn a_postgres_grant_of_a_superuser_like_role_or_a_bad_name_never_loads() {
    let mut ctx = ctx();
    ctx.backends.insert("db".into(), ("postgres", 3600));
    let load = |grant: &str| {
        let yaml = format!(
            "issuer: github\nmatch: {{repository_id: \"74\"}}\nttl: {{default: 5m, max: 10m}}\ngrants:\n  db: {grant}\n"
        );
        match PolicySet::load(None, &[("p", &yaml)], &ctx) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>(),
        }
    };
    assert!(load("{backend: db, roles: [app_readonly], database: app}").is_empty());
    for (grant, says) in [
        ("{backend: db, roles: [postgres]}", "grants.db.roles[0]: `postgres` is the bootstrap superuser"),
        ("{backend: db, roles: [pg_execute_server_program]}", "runs programs on the database server"),
        ("{backend: db, roles: [pg_write_server_files]}", "reads or writes any file the server can"),
        ("{backend: db, roles: [rds_superuser]}", "managed database's administrator role"),
        ("{backend: db, roles: [\"app\\\"; DROP TABLE x; --\"]}", "is not a role or database name"),
        ("{backend: db, roles: [App_RO]}", "is not a role or database name"),
        ("{backend: db, roles: []}", "name 1 to 16 group roles"),
        ("{backend: db, roles: [a], database: \"x y\"}", "grants.db.database"),
        ("{backend: db, roles: [a], role_arn: x}", "unknown field"),
    ] {
        let errors = load(grant);
        assert!(errors.iter().any(|e| e.contains(says)), "{grant}: {errors:?}");
    }
}

// ---- ssh grants (issue 17) -------------------------------------------------------------------

/// The defaults plus an `ssh` backend named `ssh`.
fn ssh_ctx() -> LoadContext {
    let mut ctx = ctx();
    ctx.backends.insert("ssh".into(), ("ssh", 3600));
    ctx
}

fn ssh_findings(issuer: &str, grant: &str, extra_match: &str) -> Vec<Finding> {
    let id = if issuer == "github" { "repository_id: \"74\"" } else { "project_id: \"20\"" };
    let yaml = format!(
        "issuer: {issuer}\nmatch: {{{id}, ref: refs/heads/main, runner_environment: {issuer}-hosted{extra_match}}}\n\
         deny: {{event_name: [pull_request_target, workflow_run], pipeline_source: merge_request_event}}\n\
         ttl: {{default: 5m, max: 10m}}\ngrants:\n  ssh: {grant}\n"
    );
    match PolicySet::load(None, &[("p", &yaml)], &ssh_ctx()) {
        Ok(set) => lint::lint(&set, &ssh_ctx()),
        Err(errors) => errors.iter().map(Finding::from).collect(),
    }
}

#[test]
fn an_ssh_grant_whose_principals_the_job_chooses_is_an_error_and_its_own_repository_owner_is_not() {
    let grant = |principals: &str| format!("{{backend: ssh, principals: {principals}}}");
    type Want = Vec<(&'static str, Severity, &'static str)>;
    let cases: [(&str, &str, String, &str, Want); 7] = [
        (
            "names and the job's own owner and ids",
            "github",
            grant(r#"[deploy, "deploy-${repository_owner}", "r${repository_id}"]"#),
            "",
            vec![],
        ),
        (
            "an actor named root would log in as root",
            "github",
            grant(r#"["${actor}"]"#),
            "",
            vec![("ssh-principal-template", ERROR, "grants.ssh.principals[0]")],
        ),
        (
            "a branch name chooses the user",
            "github",
            grant(r#"[deploy, "deploy-${ref_name}"]"#),
            "",
            vec![("ssh-principal-template", ERROR, "grants.ssh.principals[1]")],
        ),
        (
            "a claim the policy pins to known values chooses among those only",
            "github",
            grant(r#"["deploy-${environment}"]"#),
            ", environment: [prod, staging]",
            vec![],
        ),
        (
            "a glob pins nothing",
            "github",
            grant(r#"["deploy-${environment}"]"#),
            ", environment: {glob: \"prod*\"}",
            vec![("ssh-principal-template", ERROR, "grants.ssh.principals[0]")],
        ),
        ("GitLab: the job's own namespace", "gitlab", grant(r#"["deploy-${namespace_path}"]"#), "", vec![]),
        (
            "GitLab: the user who started the pipeline",
            "gitlab",
            grant(r#"["${user_login}"]"#),
            "",
            vec![("ssh-principal-template", ERROR, "grants.ssh.principals[0]")],
        ),
    ];
    for (scenario, issuer, grant, extra, want) in cases {
        let all = ssh_findings(issuer, &grant, extra);
        let got: Vec<_> = rules_and_fields(&all).into_iter().filter(|(rule, ..)| rule.starts_with("ssh-")).collect();
        assert_eq!(got, want, "{scenario}: {all:#?}");
        for f in all.iter().filter(|f| f.rule == "ssh-principal-template") {
            assert!(f.message.contains("logs in as") && f.fix.contains("match:"), "{scenario}: {f:?}");
        }
    }
}

#[test]
fn forwarding_and_user_rc_extensions_are_warnings_and_permit_pty_is_not() {
    let grant = "{backend: ssh, principals: [deploy], extensions: \
                 [permit-pty, permit-agent-forwarding, permit-port-forwarding, permit-X11-forwarding, permit-user-rc]}";
    let all = ssh_findings("github", grant, "");
    let warned: Vec<&str> = all
        .iter()
        .filter(|f| f.rule == "ssh-forwarding-extension" && f.severity == WARN)
        .map(|f| f.message.as_str())
        .collect();
    assert_eq!(warned.len(), 4, "{all:#?}");
    for name in ["permit-agent-forwarding", "permit-port-forwarding", "permit-X11-forwarding", "permit-user-rc"] {
        assert!(warned.iter().any(|m| m.contains(name)), "{name}: {warned:?}");
    }
    assert!(!warned.iter().any(|m| m.contains("permit-pty")));
    let quiet = ssh_findings("github", "{backend: ssh, principals: [deploy], extensions: [permit-pty]}", "");
    assert_eq!(rules_and_fields(&quiet), [], "{quiet:#?}");
}

#[test]
fn an_ssh_grant_whose_fields_could_say_more_than_meant_does_not_load() {
    let cases = [
        ("no principals", "{backend: ssh, principals: []}"),
        ("a list in one principal", "{backend: ssh, principals: [\"deploy,root\"]}"),
        (
            "a line break in the command",
            "{backend: ssh, principals: [d], critical_options: {force-command: \"a\\nb\"}}",
        ),
        (
            "a host name is no address",
            "{backend: ssh, principals: [d], critical_options: {source-address: example.com}}",
        ),
        ("an extension OpenSSH does not have", "{backend: ssh, principals: [d], extensions: [permit-everything]}"),
        (
            "a critical option ephemera does not set",
            "{backend: ssh, principals: [d], critical_options: {verify-required: \"\"}}",
        ),
    ];
    for (scenario, grant) in cases {
        let all = ssh_findings("github", grant, "");
        assert!(
            all.iter().any(|f| f.rule == "invalid" && f.severity == ERROR && f.field.starts_with("grants.ssh")),
            "{scenario}: {all:#?}"
        );
    }
}

// ---- Buildkite (issue 18) ------------------------------------------------------------------

fn buildkite(match_rules: &str) -> Vec<Finding> {
    findings(&format!(
        "issuer: buildkite\nmatch: {match_rules}\nttl: {{default: 5m, max: 10m}}\ngrants:\n  api: {{backend: jwt, audience: x}}\n"
    ))
}

/// Attack: Buildkite's issuer is shared by every Buildkite organisation; a policy that pins the
/// organisation by its slug only (or not at all) admits any organisation whose jobs say so.
#[test]
fn a_buildkite_policy_must_pin_the_organisation_or_pipeline_by_id() {
    let unpinned =
        buildkite(r#"{organization_slug: acme-inc, pipeline_slug: web, runner_environment: buildkite-hosted}"#);
    let error = unpinned.iter().find(|f| f.rule == "immutable-id").expect("refused");
    assert_eq!(error.severity, ERROR);
    assert!(error.message.contains("organization_id, pipeline_id"), "{}", error.message);
    assert!(error.message.contains("shared by every Buildkite organisation"), "{}", error.message);
    for pinned in [
        r#"{organization_id: 0184990a-4770-4e0d-8c0d-2a6c4f5d9e01, runner_environment: buildkite-hosted}"#,
        r#"{pipeline_id: [0184990a-477a-4c52-9a1b-7d3e9f6a2b02], runner_environment: buildkite-hosted}"#,
    ] {
        assert!(buildkite(pinned).is_empty(), "{pinned}: {:#?}", buildkite(pinned));
    }
    let slug = buildkite(
        r#"{organization_id: 0184990a-4770-4e0d-8c0d-2a6c4f5d9e01, pipeline_slug: web, runner_environment: buildkite-hosted}"#,
    );
    let rules: Vec<(&str, &str)> = slug.iter().map(|f| (f.rule, f.field.as_str())).collect();
    assert_eq!(rules, [("name-without-id", "match.pipeline_slug")], "a renamed pipeline's slug can be reused");
    let runner = buildkite(r#"{organization_id: 0184990a-4770-4e0d-8c0d-2a6c4f5d9e01}"#);
    assert_eq!(runner.iter().map(|f| f.rule).collect::<Vec<_>>(), ["runner-unpinned"]);
    assert!(runner[0].fix.contains("buildkite-hosted"));
}

// ---- CircleCI, Azure Pipelines, Bitbucket, Jenkins, generic (issue 18) -----------------------

const CIRCLECI_PROJECT: &str = r#""oidc.circleci.com/project-id": 3d9e5b27-6c14-4f8a-b0d2-71a4c8e9f561"#;

fn rules_of(findings: &[Finding]) -> Vec<(&'static str, Severity, &str)> {
    findings.iter().map(|f| (f.rule, f.severity, f.field.as_str())).collect()
}

/// Each platform's ids a policy must bind, and why, in the load error; what binds one loads.
#[test]
fn every_platform_s_policy_must_bind_its_own_ids() {
    for (issuer, unbound, names, why, bound) in [
        (
            "circleci",
            r#"{"oidc.circleci.com/vcs-origin": github.com/acme/web}"#,
            "oidc.circleci.com/project-id, oidc.circleci.com/pipeline-definition-id",
            "every project of the CircleCI organisation",
            format!("{{{CIRCLECI_PROJECT}}}"),
        ),
        (
            "azure-pipelines",
            r#"{def_id: "42"}"#,
            "prj_id",
            "Azure DevOps organisation",
            r#"{prj_id: a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d}"#.to_string(),
        ),
        (
            "bitbucket",
            r#"{branchName: main}"#,
            "workspaceUuid, repositoryUuid",
            "`sub` changes with every step",
            r#"{repositoryUuid: "{2b4d6f8a-1c3e-4a5b-9d7f-0e2a4c6e8b1d}"}"#.to_string(),
        ),
        (
            "jenkins",
            r#"{sub: {glob: "https://jenkins.example.com/job/platform/*"}}"#,
            "sub",
            "identity_claims",
            r#"{sub: "https://jenkins.example.com/job/platform/job/web-deploy/job/main/"}"#.to_string(),
        ),
        ("generic", r#"{project: web}"#, "project_uuid", "identity_claims", r#"{project_uuid: "u-1"}"#.to_string()),
    ] {
        let refused = findings(&policy(issuer, unbound, "{}"));
        let error =
            refused.iter().find(|f| f.rule == "immutable-id").unwrap_or_else(|| panic!("{issuer}: {refused:#?}"));
        assert_eq!(error.severity, ERROR, "{issuer}");
        assert!(error.message.contains(names) && error.message.contains(why), "{issuer}: {}", error.message);
        let loaded = findings(&policy(issuer, &bound, "{}"));
        assert!(loaded.iter().all(|f| f.rule != "immutable-id" && f.severity == WARN), "{issuer}: {loaded:#?}");
    }
}

/// Attack (CircleCI): "Rerun job with SSH" gives a person a shell in the job. A policy that says
/// nothing of it denies such a job; one that admits it is warned about.
#[test]
fn a_circleci_policy_denies_an_ssh_rerun_unless_it_decides_itself_and_is_warned_when_it_admits_one() {
    let silent = policy("circleci", &format!("{{{CIRCLECI_PROJECT}}}"), "{}");
    let set = PolicySet::load(None, &[("p", &silent)], &ctx()).unwrap();
    let claims = |rerun: bool| -> Map<String, Value> {
        serde_json::from_value(serde_json::json!({
            "oidc.circleci.com/project-id": "3d9e5b27-6c14-4f8a-b0d2-71a4c8e9f561",
            "oidc.circleci.com/ssh-rerun": rerun,
        }))
        .unwrap()
    };
    let denial = set.decide_claims("p", "circleci", &claims(true), None).unwrap_err();
    assert_eq!(denial.public_message(), "claim `oidc.circleci.com/ssh-rerun` matched a deny rule of policy `p`");
    assert!(set.decide_claims("p", "circleci", &claims(false), None).is_ok());
    assert!(findings(&silent).is_empty(), "{:#?}", findings(&silent));

    let admits = policy(
        "circleci",
        &format!(r#"{{{CIRCLECI_PROJECT}, "oidc.circleci.com/ssh-rerun": {{exists: true}}}}"#),
        "{}",
    );
    assert_eq!(rules_of(&findings(&admits)), [("ssh-rerun-admitted", WARN, "match.oidc.circleci.com/ssh-rerun")]);
    let refuses = policy("circleci", &format!("{{{CIRCLECI_PROJECT}}}"), r#"{"oidc.circleci.com/ssh-rerun": true}"#);
    assert!(findings(&refuses).is_empty());
}

/// Bitbucket: UUIDs come in braces (a bare one never matches), and `sub` holds the step's UUID.
#[test]
fn bitbucket_bare_uuids_and_a_bound_sub_are_reported() {
    let bare = policy(
        "bitbucket",
        r#"{repositoryUuid: 2b4d6f8a-1c3e-4a5b-9d7f-0e2a4c6e8b1d, workspaceUuid: "{6f1e3c2a-9b8d-4e7f-a1c2-3d4e5f6a7b8c}"}"#,
        "{}",
    );
    let found = findings(&bare);
    assert_eq!(rules_of(&found), [("bitbucket-uuid-braces", WARN, "match.repositoryUuid")]);
    assert!(found[0].fix.contains("\"{2b4d6f8a-1c3e-4a5b-9d7f-0e2a4c6e8b1d}\""), "{}", found[0].fix);
    let sub = policy(
        "bitbucket",
        r#"{workspaceUuid: "{6f1e3c2a-9b8d-4e7f-a1c2-3d4e5f6a7b8c}", sub: "{2b4d6f8a-1c3e-4a5b-9d7f-0e2a4c6e8b1d}:{e1d2c3b4-a5f6-4e7d-8c9b-0a1f2e3d4c5b}"}"#,
        "{}",
    );
    assert_eq!(rules_of(&findings(&sub)), [("sub-per-step", WARN, "match.sub")]);
}

/// Azure: a pull request's validation build runs its code in the pipeline; `sub` names the
/// pipeline by name only.
#[test]
fn azure_pull_request_builds_and_names_without_the_project_id_are_reported() {
    let prj = "prj_id: a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d";
    let open = policy("azure-pipelines", &format!("{{{prj}}}"), "{}");
    assert_eq!(rules_of(&findings(&open)), [("untrusted-trigger", WARN, "match.rpo_ref")]);
    let main = policy("azure-pipelines", &format!("{{{prj}, rpo_ref: refs/heads/main}}"), "{}");
    assert!(findings(&main).is_empty(), "{:#?}", findings(&main));
    let named = policy(
        "azure-pipelines",
        r#"{org_id: 4e7a1c9b-2d3f-4b5a-8e6c-0f1a2b3c4d5e, prj_id: {glob: "*"}, sub: "p://acme-inc/web-platform/web-deploy", rpo_ref: refs/heads/main}"#,
        "{}",
    );
    let found = findings(&named);
    assert!(found.iter().any(|f| f.rule == "immutable-id"), "{found:#?}");
}
