//! `ephemera policy test`: policy test cases (`policies/tests/*.yaml`) run through the decision
//! the exchange makes, with a report that names the case, the expected and the actual outcome and
//! the deciding claim; exit 0 only when every case passes and every file loads.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::repo_path;
use ephemera::config::Config;
use ephemera::policy::testing::{Context, Suite};
use ephemera::policy::{LoadContext, PolicySet};
use std::path::Path;
use std::process::Output;

const CONFIG: &str = r#"policies = "policies"

[[issuers]]
name = "github"
platform = "github-actions"
url = "https://token.actions.githubusercontent.com"

[[issuers]]
name = "gitlab"
platform = "gitlab-ci"
url = "https://gitlab.example.com"

[backends.jwt]
type = "jwt"
"#;

/// A policy repository in a temp dir: a config, the shipped `deploy-web` policy, a fixture in
/// `policies/tests/claims/` and the given test files.
fn repository(tests: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(root.join("ephemera.toml"), CONFIG).unwrap();
    std::fs::create_dir_all(root.join("policies/tests/claims")).unwrap();
    std::fs::copy(repo_path("policies/deploy-web.yaml"), root.join("policies/deploy-web.yaml")).unwrap();
    for fixture in ["github-environment-deploy.json", "github-pull-request-from-fork.json"] {
        std::fs::copy(
            repo_path(&format!("policies/tests/claims/{fixture}")),
            root.join(format!("policies/tests/claims/{fixture}")),
        )
        .unwrap();
    }
    for (name, text) in tests {
        std::fs::write(root.join("policies/tests").join(name), text).unwrap();
    }
    dir
}

fn policy_test(root: &Path, extra: &[&str]) -> (Option<i32>, String, String) {
    let Output { status, stdout, stderr } = std::process::Command::new(env!("CARGO_BIN_EXE_ephemera"))
        .args(["policy", "test", "--config"])
        .arg(root.join("ephemera.toml"))
        .args(extra)
        .output()
        .unwrap();
    (status.code(), String::from_utf8_lossy(&stdout).into_owned(), String::from_utf8_lossy(&stderr).into_owned())
}

const PASSING: &str = r#"# yaml-language-server: $schema=./schema.json
policy: deploy-web
claims_file: claims/github-environment-deploy.json
cases:
  - name: deploy from main in prod is allowed
    expect: allow
  - name: a fork pull request is denied on event_name
    claims_file: claims/github-pull-request-from-fork.json
    expect: {deny: event_name}
  - name: another branch is denied on ref
    claims: {ref: refs/heads/dev}
    expect: {deny: ref}
  - name: a removed claim fails its match rule
    claims: {environment: null}
    expect: {deny: environment}
  - name: overrides turn the fork token into an allowed one
    claims_file: claims/github-pull-request-from-fork.json
    claims: {event_name: push, environment: prod, job_workflow_ref: "octo-org/octo-automation/.github/workflows/x.yml@refs/heads/main"}
    expect: allow
  - name: a ttl above the max is denied on ttl
    ttl: 2h
    expect: {deny: ttl}
  - name: another configured issuer is denied on iss
    issuer: gitlab
    expect: {deny: iss}
"#;

#[test]
fn a_passing_suite_exits_0() {
    let repo = repository(&[("deploy-web.yaml", PASSING)]);
    let (code, stdout, stderr) = policy_test(repo.path(), &[]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("ok    ") && stdout.contains("deploy from main in prod is allowed"), "{stdout}");
    assert!(stdout.ends_with("7 passed, 0 failed\n"), "{stdout}");
}

#[test]
fn a_wrong_expectation_exits_1_naming_the_case_expected_actual_and_the_deciding_claim() {
    let wrong = "policy: deploy-web\ncases:\n  - name: the fork is (wrongly) expected to pass\n    claims_file: claims/github-pull-request-from-fork.json\n    expect: allow\n";
    let repo = repository(&[("deploy-web.yaml", PASSING), ("wrong.yaml", wrong)]);
    let (code, stdout, _) = policy_test(repo.path(), &[]);
    assert_eq!(code, Some(1), "{stdout}");
    let failure = stdout.split("FAIL  ").nth(1).expect("a FAIL line");
    for want in [
        "wrong.yaml: the fork is (wrongly) expected to pass",
        "expected: allow",
        "actual:   deny (deciding claim `event_name`): claim `event_name` matched a deny rule of policy `deploy-web`",
    ] {
        assert!(failure.contains(want), "{want:?} missing from:\n{stdout}");
    }
    assert!(stdout.contains("FAIL  deny  event_name = \"pull_request_target\""), "the failed rule's trace: {stdout}");
    assert!(stdout.contains("FAIL  match environment = (missing)"), "every failed rule's trace: {stdout}");
    assert!(!stdout.contains("pass  deny  runner_environment"), "only failed rules are shown: {stdout}");
    assert!(stdout.ends_with("7 passed, 1 failed\n"), "{stdout}");
}

#[test]
fn a_wrong_deciding_claim_fails_too_and_the_json_report_says_so() {
    let wrong = "policy: deploy-web\nclaims_file: claims/github-environment-deploy.json\ncases:\n  - name: denied, but on ref not on environment\n    claims: {ref: refs/heads/dev}\n    expect: {deny: environment}\n";
    let repo = repository(&[("wrong.yaml", wrong)]);
    let (code, stdout, _) = policy_test(repo.path(), &["--format", "json"]);
    assert_eq!(code, Some(1), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!((report["passed"].as_u64(), report["failed"].as_u64()), (Some(0), Some(1)), "{report:#}");
    let case = &report["cases"][0];
    assert_eq!(case["name"], "denied, but on ref not on environment");
    assert_eq!(case["pass"], false);
    assert_eq!(case["expected"], serde_json::json!({"deny": "environment"}));
    assert_eq!((case["actual"]["decision"].as_str(), case["actual"]["claim"].as_str()), (Some("deny"), Some("ref")));
    assert_eq!(
        case["failed_rules"],
        serde_json::json!(["FAIL  match ref = \"refs/heads/dev\" — rule \"refs/heads/main\""])
    );
}

#[test]
fn load_errors_name_their_file_and_case_and_exit_1() {
    let unknown_policy = "cases:\n  - name: no such policy\n    policy: deploy-wbe\n    claims: {ref: refs/heads/main}\n    expect: allow\n";
    let not_json =
        "policy: deploy-web\ncases:\n  - name: broken claims\n    claims_file: claims/broken.json\n    expect: allow\n";
    let missing =
        "policy: deploy-web\ncases:\n  - name: missing claims\n    claims_file: claims/nope.json\n    expect: allow\n";
    let unknown_field =
        "policy: deploy-web\ncases:\n  - name: typo\n    claims: {ref: refs/heads/main}\n    expcet: allow\n";
    let bad_yaml = "policy: deploy-web\ncases: [\n";
    let repo = repository(&[
        ("deploy-web.yaml", PASSING),
        ("unknown-policy.yaml", unknown_policy),
        ("not-json.yaml", not_json),
        ("missing.yaml", missing),
        ("unknown-field.yaml", unknown_field),
        ("bad-yaml.yaml", bad_yaml),
    ]);
    std::fs::write(repo.path().join("policies/tests/claims/broken.json"), "{\"ref\": ").unwrap();
    let (code, stdout, _) = policy_test(repo.path(), &[]);
    assert_eq!(code, Some(1), "{stdout}");
    for want in [
        "unknown-policy.yaml: case `no such policy`: unknown policy `deploy-wbe` (loaded: deploy-web)",
        "not-json.yaml: case `broken claims`: claims file ",
        "broken.json: not a JSON object of claims",
        "missing.yaml: case `missing claims`: claims file ",
        "nope.json: cannot read",
        "unknown-field.yaml: line 5 column 5: unknown field `expcet`",
        "bad-yaml.yaml: line 2 column 8: ",
    ] {
        assert!(stdout.contains(want), "{want:?} missing from:\n{stdout}");
    }
    assert!(stdout.lines().filter(|l| l.starts_with("error ")).count() == 5, "{stdout}");
    assert!(stdout.ends_with("7 passed, 0 failed, 5 error(s)\n"), "the loadable cases still run: {stdout}");
}

#[test]
fn no_test_files_is_an_error_not_a_pass() {
    let repo = repository(&[]);
    let (code, stdout, stderr) = policy_test(repo.path(), &[]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stderr.contains("no policy tests: no *.yaml file in") && stderr.contains("tests"), "{stderr}");
    let (code, _, stderr) = policy_test(repo.path(), &["--dir", "/nonexistent/policy-tests"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("no policy tests: /nonexistent/policy-tests does not exist"), "{stderr}");
}

#[test]
fn dir_points_at_another_test_directory() {
    let repo = repository(&[]);
    let elsewhere = repo.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let case = "policy: deploy-web\ncases:\n  - name: elsewhere\n    claims_file: ../policies/tests/claims/github-environment-deploy.json\n    expect: allow\n";
    std::fs::write(elsewhere.join("t.yml"), case).unwrap();
    let (code, stdout, stderr) = policy_test(repo.path(), &["--dir", elsewhere.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("1 passed, 0 failed"), "{stdout}");
}

/// The shipped example tests (policies/tests/) pass against the shipped policies, with the
/// config `scripts/test` runs them under (`policies/ephemera.toml`: an issuer of every platform).
#[test]
fn the_shipped_example_tests_pass() {
    let (config, _) = Config::load(Some(&repo_path("policies/ephemera.toml"))).unwrap();
    let policies = PolicySet::load(Some(&config.policies_dir), &[], &LoadContext::from_config(&config)).unwrap();
    let ctx = Context { policies: &policies, issuers: &config.issuers };
    let suite = Suite::load(&repo_path("policies/tests"), &ctx).unwrap();
    let report = suite.run(&policies);
    assert!(report.is_success(), "{}", report.render_text());
    for policy in policies.names() {
        let cases: Vec<_> = report.results.iter().filter(|r| r.policy == policy).collect();
        let allowed = cases.iter().filter(|r| r.actual.decision == "allow").count();
        assert!(allowed >= 1 && cases.len() - allowed >= 5, "policy {policy}: {allowed} allow of {}", cases.len());
    }
}
