//! Policies are parsed and checked at load: every error, with file and field, and the server
//! refuses to start on any. `ephemera policy check` runs the same code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use ephemera::config::Config;
use ephemera::policy::{LoadContext, PolicySet};

fn ctx() -> LoadContext {
    LoadContext::from_config(&Config::defaults())
}

/// Loads one file of tests/fixtures/policies/invalid alone; returns its errors as text.
fn errors_of(file: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(repo_path(&format!("tests/fixtures/policies/invalid/{file}")), dir.path().join(file)).unwrap();
    let errors = PolicySet::load(Some(dir.path()), &[], &ctx()).expect_err(file);
    let prefix = dir.path().join(file).display().to_string();
    errors
        .iter()
        .map(|e| {
            let text = e.to_string();
            assert!(text.starts_with(&prefix), "error does not name its file: {text}");
            text[prefix.len()..].to_string()
        })
        .collect()
}

fn assert_has(errors: &[String], want: &str) {
    assert!(errors.iter().any(|e| e.contains(want)), "no error containing {want:?} in {errors:#?}");
}

#[test]
fn an_invalid_regex_is_refused_at_load_with_its_field() {
    assert_has(&errors_of("bad-regex.yaml"), ": match.ref: invalid pattern");
}

#[test]
fn an_unknown_matcher_is_refused_at_load_with_its_field() {
    assert_has(&errors_of("unknown-matcher.yaml"), ": match.ref: unknown matcher `regx`");
}

#[test]
fn an_unknown_top_level_field_is_refused_with_its_line() {
    assert_has(&errors_of("unknown-field.yaml"), "line 2 column 1: unknown field `mach`");
}

#[test]
fn a_policy_bound_only_to_names_or_a_regex_on_an_id_fails_the_immutable_check() {
    assert_has(&errors_of("names-only.yaml"), ": match: binds no immutable identity claim");
}

#[test]
fn a_duplicate_key_is_refused_rather_than_silently_overriding() {
    assert_has(&errors_of("duplicate-key.yaml"), "duplicate mapping key: repository_id");
}

#[test]
fn a_ttl_above_the_backend_max_is_refused() {
    assert_has(&errors_of("ttl-above-backend.yaml"), ": grants.api: ttl.max 2h is above backend `jwt`'s max_ttl 1h");
}

#[test]
fn a_file_name_that_is_not_a_policy_name_is_refused() {
    assert_has(&errors_of("Bad Name.yaml"), "a policy file name must match");
}

#[test]
fn every_error_of_a_file_is_reported_at_once() {
    let errors = errors_of("many-errors.yaml");
    for want in [
        ": issuer: `nope` is not an issuer",
        ": match.environment: an empty list matches nothing",
        ": deny.event_name: `exists` takes true or false",
        ": ttl.default: is above ttl.max",
        ": grants.api: unknown field `audiance`",
        ": grants.db.backend: `vault` is not a backend",
    ] {
        assert_has(&errors, want);
    }
}

#[test]
fn template_and_reserved_claim_errors_name_their_field() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = r#"
issuer: github
match: {repository_id: "74"}
ttl: {default: 5m, max: 10m}
grants:
  api: {backend: jwt, audience: "${unclosed", claims: {sub: overridden, ok: "${a b}"}}
"#;
    std::fs::write(dir.path().join("p.yaml"), yaml).unwrap();
    let errors: Vec<String> =
        PolicySet::load(Some(dir.path()), &[], &ctx()).unwrap_err().iter().map(|e| e.to_string()).collect();
    assert_has(&errors, ": grants.api.audience: unclosed `${`");
    assert_has(&errors, ": grants.api.claims.sub: is set by the broker");
    assert_has(&errors, ": grants.api.claims.ok: `${a b}` does not name a claim");
}

#[test]
fn a_whole_directory_reports_every_file_and_the_binary_exits_1() {
    let invalid = repo_path("tests/fixtures/policies/invalid");
    let errors = PolicySet::load(Some(&invalid), &[], &ctx()).unwrap_err();
    let files: std::collections::BTreeSet<String> =
        errors.iter().map(|e| e.file.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(
        files.len(),
        std::fs::read_dir(&invalid).unwrap().count(),
        "a file's errors were not reported: {files:?}"
    );

    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("ephemera.toml");
    std::fs::write(&config, format!("policies = {:?}\n", invalid.display().to_string())).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ephemera"))
        .args(["policy", "check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for file in &files {
        assert!(stdout.contains(file.as_str()), "{file} missing from:\n{stdout}");
    }
    assert!(stdout.contains("match.ref: unknown matcher `regx`"), "{stdout}");
}

/// `policies/ephemera.toml` is the broker config the examples are written for: one issuer of
/// every platform (the per-organisation ones cannot be defaults).
#[test]
fn the_example_policies_load_with_their_config() {
    let (config, _) = Config::load(Some(&repo_path("policies/ephemera.toml"))).unwrap();
    let set = PolicySet::load(Some(&config.policies_dir), &[], &LoadContext::from_config(&config)).unwrap();
    for name in
        ["deploy-web", "buildkite-deploy", "circleci-deploy", "azure-deploy", "bitbucket-deploy", "jenkins-deploy"]
    {
        assert!(set.names().contains(&name), "{name} missing from {:?}", set.names());
    }
}

#[tokio::test]
async fn the_server_refuses_to_start_on_a_policy_error() {
    let issuer = FakeIssuer::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::copy(
        repo_path("tests/fixtures/policies/invalid/bad-regex.yaml"),
        dir.path().join("policies/bad-regex.yaml"),
    )
    .unwrap();
    let toml = format!(
        "listen = \"127.0.0.1:0\"\n[[issuers]]\nname = \"github\"\nplatform = \"github-actions\"\nurl = \"{}\"\n",
        issuer.url
    );
    let config = Config::parse(&toml, dir.path()).unwrap();
    let clock = std::sync::Arc::new(ephemera::clock::ManualClock::new(NOW));
    let err = ephemera::server::start(ephemera::server::Options::new(config, false, clock))
        .await
        .err()
        .expect("the server started");
    assert!(err.contains("refusing to start") && err.contains("match.ref: invalid pattern"), "{err}");
}

/// The shipped example policy, exercised with the shared fixtures through the real API.
#[tokio::test]
async fn example_deploy_web_admits_the_environment_deploy_and_refuses_the_fork_pr() {
    let issuer = FakeIssuer::start().await;
    let yaml =
        std::fs::read_to_string(repo_path("policies/deploy-web.yaml")).unwrap().replace("issuer: github", "issuer: ci");
    let broker = Broker::start(&issuer, &[("deploy-web", &yaml)]).await;
    let ok = issuer.sign(&issuer.claims("github-environment-deploy.json", NOW));
    let (status, body) = broker.exchange(&ok, "deploy-web").await;
    assert_eq!(status, 201, "{body}");
    let fork = issuer.sign(&issuer.claims("github-pull-request-from-fork.json", NOW));
    let reply = broker.exchange(&fork, "deploy-web").await;
    assert_error(&reply, 403, "policy_denied");
    assert!(reply.1["error"]["message"].as_str().unwrap().contains("`event_name`"), "{}", reply.1);
}

#[test]
fn a_github_policy_binding_only_a_gitlab_id_fails_the_immutable_check() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = "issuer: github\nmatch: {project_id: \"20\"}\nttl: {default: 5m, max: 10m}\ngrants:\n  api: {backend: jwt, audience: x}\n";
    std::fs::write(dir.path().join("p.yaml"), yaml).unwrap();
    let errors: Vec<String> =
        PolicySet::load(Some(dir.path()), &[], &ctx()).unwrap_err().iter().map(|e| e.to_string()).collect();
    assert_has(
        &errors,
        "binds no immutable identity claim: add an exact value or list for one of repository_id, repository_owner_id",
    );
}

#[test]
fn a_case_insensitive_regex_loads() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = "issuer: github\nmatch: {repository_id: \"74\", actor: {regex: \"(?i)octocat\"}}\nttl: {default: 5m, max: 10m}\ngrants:\n  api: {backend: jwt, audience: x}\n";
    std::fs::write(dir.path().join("p.yaml"), yaml).unwrap();
    PolicySet::load(Some(dir.path()), &[], &ctx()).unwrap();
}

fn aws_ctx() -> LoadContext {
    let mut ctx = ctx();
    ctx.backends.insert("aws".into(), ("aws", 3600));
    ctx
}

fn aws_errors(grant: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "issuer: github\nmatch: {{repository_id: \"74\"}}\nttl: {{default: 5m, max: 1h}}\ngrants:\n  aws:\n{grant}"
    );
    std::fs::write(dir.path().join("p.yaml"), yaml).unwrap();
    match PolicySet::load(Some(dir.path()), &[], &aws_ctx()) {
        Ok(_) => Vec::new(),
        Err(errors) => errors.iter().map(|e| e.to_string()).collect(),
    }
}

const ROLE: &str = "    backend: aws\n    role_arn: arn:aws:iam::111111111111:role/deploy-web\n";

#[test]
fn a_valid_aws_grant_loads() {
    let grant = format!(
        "{ROLE}    session_policy: {{Version: \"2012-10-17\", Statement: [{{Effect: Allow, Action: \"s3:*\", Resource: \"*\"}}]}}\n    policy_arns: [arn:aws:iam::aws:policy/ReadOnlyAccess]\n    session_tags: {{repository: \"${{repository}}\"}}\n"
    );
    assert_eq!(aws_errors(&grant), Vec::<String>::new());
}

#[test]
fn a_session_policy_above_the_packed_limit_is_refused_at_load() {
    let resources: Vec<String> = (0..100).map(|i| format!("\"arn:aws:s3:::bucket-number-{i}/*\"")).collect();
    let grant = format!(
        "{ROLE}    session_policy: {{Version: \"2012-10-17\", Statement: [{{Effect: Allow, Action: \"s3:GetObject\", Resource: [{}]}}]}}\n",
        resources.join(", ")
    );
    assert_has(&aws_errors(&grant), "grants.aws.session_policy:");
    assert_has(&aws_errors(&grant), "2,048 characters");
}

#[test]
fn a_session_policy_that_is_not_a_policy_document_is_refused_at_load() {
    assert_has(&aws_errors(&format!("{ROLE}    session_policy: \"not json at all\"\n")), "grants.aws.session_policy:");
    assert_has(&aws_errors(&format!("{ROLE}    session_policy: {{Statement: []}}\n")), "grants.aws.session_policy:");
}

#[test]
fn a_role_arn_that_is_not_an_arn_is_refused_at_load() {
    for arn in [
        "deploy-web",
        "arn:aws:iam::11111111111:role/deploy",
        "arn:aws:s3:::bucket",
        "arn:aws:iam::111111111111:user/bob",
    ] {
        let grant = format!("    backend: aws\n    role_arn: \"{arn}\"\n");
        assert_has(&aws_errors(&grant), "grants.aws.role_arn:");
    }
}

#[test]
fn too_many_policy_arns_or_bad_tag_keys_are_refused_at_load() {
    let arns: Vec<String> = (0..11).map(|i| format!("arn:aws:iam::aws:policy/P{i}")).collect();
    assert_has(&aws_errors(&format!("{ROLE}    policy_arns: [{}]\n", arns.join(", "))), "grants.aws.policy_arns:");
    assert_has(
        &aws_errors(&format!("{ROLE}    session_tags: {{\"bad;key\": x}}\n")),
        "grants.aws.session_tags.bad;key:",
    );
    assert_has(
        &aws_errors(&format!("{ROLE}    session_tags: {{Repo: \"a\", repo: \"b\"}}\n")),
        "grants.aws.session_tags:",
    );
    assert_has(&aws_errors(&format!("{ROLE}    roles_arn: x\n")), "unknown field `roles_arn`");
}

#[test]
fn an_aws_backend_max_ttl_outside_what_sts_allows_is_a_config_error() {
    let toml = "[backends.aws]\ntype = \"aws\"\nregion = \"eu-west-1\"\nmax_ttl = \"13h\"\n";
    let errors = Config::parse(toml, std::path::Path::new("")).unwrap_err().join("\n");
    assert!(errors.contains("backends.aws.max_ttl"), "{errors}");
    let toml = "[backends.aws]\ntype = \"aws\"\nregion = \"eu west\"\n";
    assert!(Config::parse(toml, std::path::Path::new("")).unwrap_err().join("\n").contains("backends.aws.region"));
}

#[test]
fn policy_explain_traces_the_shipped_policy_against_the_shared_fixtures() {
    let run = |fixture: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ephemera"))
            .args(["policy", "explain", "--policy", "deploy-web", "--claims"])
            .arg(repo_path(&format!("../shared/fixtures/claims/{fixture}")))
            .args(["--config", "policies/ephemera.toml"])
            .current_dir(repo_path(""))
            .output()
            .unwrap()
    };
    let ok = run("github-environment-deploy.json");
    let text = String::from_utf8_lossy(&ok.stdout);
    assert_eq!(ok.status.code(), Some(0), "{text}");
    assert!(text.contains("decision: allow") && text.contains("pass  match repository_id = \"74\""), "{text}");
    let denied = run("github-pull-request-from-fork.json");
    let text = String::from_utf8_lossy(&denied.stdout);
    assert_eq!(denied.status.code(), Some(3), "{text}");
    assert!(text.contains("decision: deny (deciding claim `event_name`)"), "{text}");
    assert!(text.contains("FAIL  match environment = (missing)"), "every rule is shown: {text}");
}

// ---- hostile input: refused after bounded work, with an error that names the limit ----------
//
// None of these tests time anything: each asserts the error names the limit that stopped the
// parse, which the parser reports as soon as it crosses it (so the work done is bounded by the
// limit, not by what the document would expand to).

/// The errors of one policy file, written to a fresh directory.
fn errors_of_text(yaml: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.yaml"), yaml).unwrap();
    PolicySet::load(Some(dir.path()), &[], &ctx()).unwrap_err().iter().map(|e| e.to_string()).collect()
}

const POLICY_HEAD: &str = "issuer: github\nmatch: {repository_id: \"74\"}\nttl: {default: 5m, max: 10m}\ngrants:\n  api:\n    backend: jwt\n    audience: x\n    claims:\n";

#[test]
fn a_yaml_alias_bomb_is_refused_by_the_alias_expansion_limit() {
    // Billion laughs: nine levels of nine aliases would expand ~400 bytes into 9^9 scalars.
    let mut yaml = String::from(POLICY_HEAD);
    yaml.push_str("      l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..9 {
        let p = i - 1;
        yaml.push_str(&format!("      l{i}: &l{i} [*l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}]\n"));
    }
    assert!(yaml.len() < 1024);
    let errors = errors_of_text(&yaml);
    assert_has(&errors, "budget breached: RecordedAnchorEvents");
    assert_has(&errors, "10000 events replayed from aliases");
}

#[test]
fn a_wide_alias_fan_out_is_refused_by_the_alias_count_limit() {
    // One anchor, used more often than any policy would: every use replays the subtree.
    let mut yaml = String::from(POLICY_HEAD);
    yaml.push_str("      a: &a [x]\n      b: [");
    yaml.push_str(&vec!["*a"; 1_500].join(", "));
    yaml.push_str("]\n");
    assert_has(&errors_of_text(&yaml), "budget breached: Aliases { aliases: 1001 }");
}

#[test]
fn a_deeply_nested_flow_document_is_refused_by_the_depth_limit() {
    let yaml = format!("issuer: github\nmatch: {{repository_id: \"74\", x: {}", "[".repeat(100_000));
    let errors = errors_of_text(&yaml);
    assert_has(&errors, "recursion limit exceeded");
    assert_has(&errors, "nesting depth 32");
    // Refused at the 32nd `[` (the `{` is the first level): columns 1-32 hold `match: {…, x: `.
    assert_has(&errors, "line 2 column 64: ");
}

#[test]
fn a_deeply_nested_block_document_is_refused_by_the_depth_limit() {
    let mut yaml = String::from(POLICY_HEAD);
    for depth in 0..200 {
        yaml.push_str(&format!("{}k:\n", "  ".repeat(depth + 3)));
    }
    let errors = errors_of_text(&yaml);
    assert_has(&errors, "budget breached: Depth { depth: 33 }");
}

#[test]
fn a_file_just_over_the_size_cap_is_refused_before_it_is_parsed() {
    let mut yaml = format!("{POLICY_HEAD}      scope: deploy\n");
    // A valid policy padded with a comment to one byte over 256 KiB.
    yaml.push_str("# ");
    yaml.push_str(&"x".repeat(256 * 1024 + 1 - yaml.len() - 1));
    yaml.push('\n');
    assert_eq!(yaml.len(), 256 * 1024 + 1);
    let errors = errors_of_text(&yaml);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_has(&errors, "p.yaml: larger than 262144 bytes");
    // At the cap exactly, it loads.
    let at_cap = &yaml[..yaml.len() - 2];
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.yaml"), format!("{at_cap}\n")).unwrap();
    PolicySet::load(Some(dir.path()), &[], &ctx()).unwrap();
}

#[test]
fn a_huge_regex_is_refused_at_load() {
    let long = "a".repeat(1025);
    let yaml = format!(
        "issuer: github\nmatch: {{repository_id: \"74\", ref: {{regex: \"a{{1000}}{{1000}}{{1000}}\"}}, sha: {{regex: {long}}}}}\nttl: {{default: 5m, max: 10m}}\ngrants:\n  api: {{backend: jwt, audience: x}}\n"
    );
    let errors = errors_of_text(&yaml);
    assert_has(&errors, ": match.ref: invalid pattern");
    assert_has(&errors, ": match.sha: `regex` pattern is longer than 1024 characters");
}

/// A policy with this `renew` line (and `ttl.max` 1h), loaded with a broker cap of `cap_secs`.
fn renew_errors(renew: &str, cap_secs: i64) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "issuer: github\nmatch: {{repository_id: \"74\"}}\nttl: {{default: 5m, max: 1h}}\n{renew}\ngrants:\n  api: {{backend: jwt, audience: x}}\n"
    );
    std::fs::write(dir.path().join("p.yaml"), yaml).unwrap();
    let mut ctx = ctx();
    ctx.renew_max_lease_secs = cap_secs;
    match PolicySet::load(Some(dir.path()), &[], &ctx) {
        Ok(set) => {
            assert_eq!(set.get("p").unwrap().renew_max_lease_secs.is_some(), renew.contains("max_lease"));
            Vec::new()
        }
        Err(errors) => errors.iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn renew_max_lease_is_at_least_ttl_max_and_at_most_the_brokers_cap() {
    assert_eq!(renew_errors("renew: {max_lease: 6h}", 12 * 3600), Vec::<String>::new());
    assert_eq!(renew_errors("", 12 * 3600), Vec::<String>::new(), "renew is optional");
    assert_has(&renew_errors("renew: {max_lease: 30m}", 12 * 3600), "renew.max_lease: is below ttl.max");
    assert_has(
        &renew_errors("renew: {max_lease: 6h}", 3 * 3600),
        "renew.max_lease: 6h is above the broker's [renew] max_lease 3h",
    );
    assert_has(&renew_errors("renew: {max_lease: soon}", 12 * 3600), "renew.max_lease:");
    assert_has(&renew_errors("renew: {max_lease: 6h, forever: true}", 12 * 3600), "unknown field");
}
