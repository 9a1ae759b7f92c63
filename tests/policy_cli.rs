//! `ephemera policy check` and `policy explain`, run as the real binary against a temporary
//! broker config and policies directory.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Output;

const CONFIG: &str = r#"policies = "policies"

[[issuers]]
name = "github"
platform = "github-actions"
url = "https://token.actions.githubusercontent.com"

[[issuers]]
name = "gitlab"
platform = "gitlab-ci"
url = "https://gitlab.com"
"#;

/// Bound by id, pinned to GitHub-hosted runners, untrusted events denied: no finding.
const CLEAN: &str = r#"issuer: github
match: {repository_id: "74", ref: refs/heads/main, runner_environment: github-hosted}
deny: {event_name: [pull_request, pull_request_target, workflow_run]}
ttl: {default: 5m, max: 10m}
grants: {api: {backend: jwt, audience: x}}
"#;

/// Two warnings: runner-unpinned, untrusted-trigger.
const WARNS: &str = r#"issuer: github
match: {repository_id: "74", ref: refs/heads/main}
ttl: {default: 5m, max: 10m}
grants: {api: {backend: jwt, audience: x}}
"#;

/// An error: a pull request's job matches the subject glob.
const SUB_GLOB: &str = r#"issuer: github
match: {repository_id: "74", sub: {glob: "repo:acme/web:*"}, runner_environment: github-hosted}
deny: {event_name: [pull_request_target, workflow_run]}
ttl: {default: 5m, max: 10m}
grants: {api: {backend: jwt, audience: x}}
"#;

/// A temporary broker directory: `ephemera.toml` and `policies/NAME.yaml` for each policy.
struct Broker {
    dir: tempfile::TempDir,
}

impl Broker {
    fn with(policies: &[(&str, &str)]) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ephemera.toml"), CONFIG).unwrap();
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        for (name, yaml) in policies {
            std::fs::write(dir.path().join(format!("policies/{name}.yaml")), yaml).unwrap();
        }
        Broker { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ephemera"));
        command.args(args).arg("--config").arg(self.path("ephemera.toml"));
        command.output().unwrap()
    }

    fn check_json(&self, extra: &[&str]) -> (Option<i32>, Value) {
        let mut args = vec!["policy", "check", "--format", "json"];
        args.extend(extra);
        let out = self.run(&args);
        let json = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
        (out.status.code(), json)
    }
}

fn rules(report: &Value) -> Vec<&str> {
    report["findings"].as_array().unwrap().iter().map(|f| f["rule"].as_str().unwrap()).collect()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn check_json_lists_rule_ids_and_exits_0_with_only_warnings() {
    let broker = Broker::with(&[("clean", CLEAN), ("warns", WARNS)]);
    let (code, report) = broker.check_json(&[]);
    assert_eq!(code, Some(0), "{report:#}");
    assert_eq!(rules(&report), ["untrusted-trigger", "runner-unpinned"], "sorted by file, then field: {report:#}");
    assert_eq!(
        (&report["ok"], &report["policies"], &report["errors"], &report["warnings"]),
        (&Value::Bool(true), &Value::from(2), &Value::from(0), &Value::from(2))
    );
    let finding = &report["findings"][1];
    assert_eq!(finding["severity"], "warning");
    assert_eq!(finding["policy"], "warns");
    assert_eq!(finding["field"], "match.runner_environment");
    assert!(finding["file"].as_str().unwrap().ends_with("warns.yaml"), "{finding}");
    assert!(finding["fix"].as_str().unwrap().contains("runner_environment: github-hosted"), "{finding}");
}

#[test]
fn check_strict_exits_1_on_warnings() {
    let broker = Broker::with(&[("warns", WARNS)]);
    let (code, report) = broker.check_json(&["--strict"]);
    assert_eq!((code, &report["ok"], &report["errors"]), (Some(1), &Value::Bool(false), &Value::from(0)));
    let out = broker.run(&["policy", "check", "--strict"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).ends_with("failed (--strict: warnings fail): 1 policy, 0 errors, 2 warnings\n"));
}

#[test]
fn check_strict_exits_0_on_clean_policies() {
    let broker = Broker::with(&[("clean", CLEAN)]);
    let out = broker.run(&["policy", "check", "--strict"]);
    assert_eq!((out.status.code(), text(&out.stdout)), (Some(0), "ok: 1 policy, 0 errors, 0 warnings\n".into()));
}

#[test]
fn check_exits_1_on_a_lint_error_and_names_file_policy_rule_and_field() {
    let broker = Broker::with(&[("clean", CLEAN), ("sub-glob", SUB_GLOB)]);
    let out = broker.run(&["policy", "check"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("sub-glob.yaml: error[sub-matches-untrusted]: policy `sub-glob`: match.sub: the glob"),
        "{stdout}"
    );
    assert!(stdout.contains("\n  fix: "), "{stdout}");
    assert!(stdout.ends_with("failed: 2 policies, 1 error, 0 warnings\n"), "{stdout}");
}

#[test]
fn check_reports_load_errors_and_still_lints_the_files_that_load() {
    let names_only = WARNS.replace(r#"repository_id: "74""#, "repository: acme/web");
    let broker = Broker::with(&[("broken", &names_only), ("warns", WARNS)]);
    let (code, report) = broker.check_json(&[]);
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(rules(&report), ["immutable-id", "untrusted-trigger", "runner-unpinned"], "{report:#}");
    assert_eq!(report["findings"][0]["severity"], "error");
    assert_eq!(report["findings"][0]["policy"], "broken");
    let yaml_error = Broker::with(&[("bad", "issuer: github\nmach: {}\n")]);
    let (code, report) = yaml_error.check_json(&[]);
    assert_eq!((code, rules(&report)), (Some(1), vec!["invalid"]), "{report:#}");
}

#[test]
fn the_example_policies_lint_clean_under_strict() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ephemera"))
        .args(["policy", "check", "--strict", "--config", "policies/ephemera.toml"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
}

// ---- policy explain --claims with a bad file -----------------------------------------------

fn explain_with_claims(broker: &Broker, claims: &Path) -> Output {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ephemera"))
        .args(["policy", "explain", "--policy", "clean", "--claims"])
        .arg(claims)
        .arg("--config")
        .arg(broker.path("ephemera.toml"))
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    out
}

#[test]
fn explain_exits_1_naming_the_file_when_the_claims_are_not_json_or_not_an_object() {
    let broker = Broker::with(&[("clean", CLEAN)]);
    for (file, content) in [
        ("not-json.json", "repository_id: 74\n"),
        ("array.json", r#"["repository_id", "74"]"#),
        ("string.json", r#""74""#),
        ("empty.json", ""),
        ("binary.json", "\u{0}\u{1}\u{2}"),
    ] {
        let path = broker.path(file);
        std::fs::write(&path, content).unwrap();
        let out = explain_with_claims(&broker, &path);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{file}: {stderr}");
        assert!(stderr.contains(&path.display().to_string()), "{file}: the message does not name the file: {stderr}");
        assert!(out.stdout.is_empty(), "{file}: {}", text(&out.stdout));
    }
    let missing = broker.path("missing.json");
    let out = explain_with_claims(&broker, &missing);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains(&missing.display().to_string()), "{}", text(&out.stderr));
}
