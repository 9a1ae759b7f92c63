//! Issue 21: the fuzzer's inputs, replayed. Every file under `tests/fuzz/regressions/<target>/`
//! (an input the fuzzer, `examples/fuzz` via `scripts/fuzz`, once found a panic or a broken
//! invariant with, fixed since) and every seed the fuzzer starts from runs through the same
//! target functions (`examples/fuzz/targets.rs`), on the stack size the fuzzer gives them: no
//! panic, no broken invariant. The seeds must also still reach past the parsers (a token signed
//! for every platform verifies, a policy loads, a webhook ends a job …), or the fuzzer would be
//! fuzzing the first `if`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[allow(dead_code)]
#[path = "../examples/fuzz/targets.rs"]
mod targets;

use std::collections::BTreeSet;
use std::path::PathBuf;

/// The fuzzer's (and a tokio worker's) stack: an input that overflows it in the broker must
/// overflow here too.
const STACK: usize = 2 * 1024 * 1024;

fn on_worker_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new().stack_size(STACK).spawn(f).unwrap().join().unwrap()
}

/// The saved inputs of `target`, sorted.
fn regressions(target: &str) -> Vec<PathBuf> {
    let dir = targets::repo_path(&format!("tests/fuzz/regressions/{target}"));
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect())
        .unwrap_or_default();
    files.sort();
    files
}

/// Runs every input through `target`; each must come out `Ok(label)`. Returns the labels.
fn replay_all(target: &'static str, inputs: Vec<(String, Vec<u8>)>) -> BTreeSet<String> {
    on_worker_stack(move || {
        let t = targets::target(target).unwrap();
        let mut labels = BTreeSet::new();
        for (name, input) in inputs {
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| t.run(&input))) {
                Ok(Ok(label)) => {
                    labels.insert(label);
                }
                Ok(Err(why)) => panic!("{target} {name}: invariant broken: {why}"),
                Err(_) => panic!("{target} {name}: panicked"),
            }
        }
        labels
    })
}

#[test]
fn every_saved_fuzz_finding_replays_without_a_panic_or_a_broken_invariant() {
    let mut replayed = 0;
    for target in targets::NAMES {
        let inputs: Vec<(String, Vec<u8>)> =
            regressions(target).into_iter().map(|p| (p.display().to_string(), std::fs::read(&p).unwrap())).collect();
        replayed += inputs.len();
        replay_all(target, inputs);
    }
    assert!(replayed > 0, "no saved input under tests/fuzz/regressions/");
}

#[test]
fn every_fuzz_seed_runs_clean_and_reaches_past_the_parsers() {
    let mut labels = std::collections::BTreeMap::new();
    for target in targets::NAMES {
        let seeds = on_worker_stack(move || targets::target(target).unwrap().seeds());
        assert!(seeds.len() >= 3, "{target}: {} seeds", seeds.len());
        let inputs = seeds.into_iter().enumerate().map(|(i, s)| (format!("seed {i}"), s)).collect();
        labels.insert(target, replay_all(target, inputs));
    }
    let has = |target: &str, label: &str| labels[target].iter().any(|l| l.contains(label));
    // A structured token of every platform's issuer gets past the signature, the claim checks
    // and the job key; so does a raw RS256 token signed with the test key.
    for platform in
        ["github-actions", "gitlab-ci", "buildkite", "circleci", "azure-pipelines", "bitbucket", "jenkins", "generic"]
    {
        assert!(
            has("token", &format!("S ok {platform}")),
            "no seed token of {platform} verifies: {:?}",
            labels["token"]
        );
    }
    assert!(has("token", "T ok github-actions"), "{:?}", labels["token"]);
    assert!(has("token", "ForbiddenHeader(jku)") && has("token", "KeyAlgorithmMismatch"), "{:?}", labels["token"]);
    assert!(has("jwks", "ok"), "{:?}", labels["jwks"]);
    assert!(has("policy", "ok ") && has("policy", "err "), "{:?}", labels["policy"]);
    assert!(has("config", "ok "), "{:?}", labels["config"]);
    for platform in ["github", "gitlab", "buildkite"] {
        assert!(has("webhook", &format!("{platform} end")), "{:?}", labels["webhook"]);
    }
    // The journals the FileStore wrote hold every kind of record it writes.
    assert!(
        has(
            "journal",
            r#""created", "created+renewal", "jti_used", "renewed", "revoke_failed", "revoke_requested", "revoked""#
        ),
        "{:?}",
        labels["journal"]
    );
}

/// Found by the fuzzer (policy target, `tests/fuzz/regressions/policy/7f5e1c7a29346cec.bin`: the
/// example CircleCI policy with a `github-app` grant templated from `${repository}`): the
/// `github-repository-template` lint's fix text named the platform's first repository-naming
/// claim by index, and CircleCI, Azure Pipelines, Bitbucket, Jenkins and generic issuers have
/// none. `policy check`, a broker start and a reload panicked on such a policy instead of
/// reporting it.
#[test]
fn a_github_grant_templated_from_an_unpinned_claim_on_a_platform_without_repository_claims_is_linted() {
    use ephemera::policy::lint::{GITHUB_REPOSITORY_TEMPLATE, lint_policy};
    use ephemera::policy::{PolicySet, Source};
    let input = std::fs::read(targets::repo_path("tests/fuzz/regressions/policy/7f5e1c7a29346cec.bin")).unwrap();
    let labels = replay_all("policy", vec![("7f5e1c7a29346cec.bin".into(), input)]);
    assert!(labels.iter().all(|l| l.starts_with("ok ")), "{labels:?}");

    let ctx = targets::Policy::context(&targets::example_config());
    let yaml = r#"
issuer: jenkins
match:
  sub: https://jenkins.example.com/job/platform/job/deploy/
ttl: {default: 5m, max: 1h}
grants:
  code: {backend: gh, owner: acme, repositories: ["${repo}"], permissions: {contents: read}}
"#;
    let source = Source { name: "jenkins-code".into(), file: PathBuf::from("jenkins-code.yaml"), text: yaml.into() };
    let set = PolicySet::load_sources(vec![source], &[], &ctx).unwrap();
    let findings = lint_policy(set.get("jenkins-code").unwrap(), &ctx);
    let finding = findings.iter().find(|f| f.rule == GITHUB_REPOSITORY_TEMPLATE).expect("the grant is linted");
    assert_eq!(finding.field, "grants.code.repositories[0]");
    assert!(finding.fix.starts_with("name the repositories, or pin `repo` with a match rule"), "{}", finding.fix);
}
