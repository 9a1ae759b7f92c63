//! Hot reload of the policy directory, re-evaluation of live leases after a change, and the
//! dry run (`POST /v1/policies/diff`), against a broker serving real HTTP with a real issuer.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use ephemera::ledger::LeaseState;
use serde_json::{Value, json};
use std::sync::Arc;

const ADMIN: &str = "admin-secret-for-reload-tests";

/// The deploy fixture's job with `ref` set: the lever the tightening tests pull.
fn deploy_claims(issuer: &FakeIssuer, git_ref: &str) -> serde_json::Map<String, Value> {
    let mut c = issuer.claims("github-environment-deploy.json", NOW);
    c.insert("ref".into(), json!(git_ref));
    // A job of its own (the job key comes from run/attempt/check run ids).
    c.insert("check_run_id".into(), json!(format!("{}", 1000 + git_ref.len())));
    c
}

const OPEN: &str = r#"
issuer: ci
match:
  repository_id: "74"
ttl: {default: 15m, max: 1h}
grants:
  api: {backend: jwt, audience: https://api.internal.example}
"#;

const MAIN_ONLY: &str = r#"
issuer: ci
match:
  repository_id: "74"
  ref: refs/heads/main
ttl: {default: 15m, max: 1h}
grants:
  api: {backend: jwt, audience: https://api.internal.example}
"#;

/// A broker whose policies directory the test edits, with the file watch off (reloads are
/// triggered by the test, deterministically) unless `watch` is given.
async fn broker(issuer: &FakeIssuer, policies: &[(&str, &str)], watch: Option<&str>) -> Broker {
    let sha = ephemera::secret::sha256_hex(ADMIN.as_bytes());
    let reload = match watch {
        Some(interval) => format!("[reload]\nwatch = true\ninterval = \"{interval}\"\n"),
        None => "[reload]\nwatch = false\n".to_string(),
    };
    let extra = Extra { hooks_toml: format!("[admin]\ntoken_sha256 = \"{sha}\"\n{reload}"), ..Extra::default() };
    Broker::start_custom(&[("ci", "github-actions", issuer)], policies, &extra).await
}

fn write_policy(broker: &Broker, name: &str, yaml: &str) {
    std::fs::write(broker.dir.path().join(format!("policies/{name}.yaml")), yaml).unwrap();
}

fn jwt(body: &Value) -> &str {
    body["credentials"]["api"]["token"].as_str().unwrap()
}

async fn lease(broker: &Broker, body: &Value) -> ephemera::ledger::Lease {
    broker.running.app.lease(body["lease_id"].as_str().unwrap()).await.unwrap().unwrap()
}

async fn admin_post(broker: &Broker, path: &str, body: Value) -> (u16, Value) {
    let resp = broker.http.post(format!("{}{path}", broker.url)).bearer_auth(ADMIN).json(&body).send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

async fn metric(broker: &Broker, line_prefix: &str) -> String {
    let text = broker.running.app.metrics_text().await;
    text.lines().find(|l| l.starts_with(line_prefix)).unwrap_or_else(|| panic!("no {line_prefix} in\n{text}")).into()
}

#[tokio::test]
async fn a_reload_that_tightens_a_policy_revokes_only_the_leases_it_no_longer_allows() {
    let issuer = FakeIssuer::start().await;
    let broker = broker(&issuer, &[("deploy", OPEN)], None).await;
    let (s1, main) = broker.exchange(&issuer.sign(&deploy_claims(&issuer, "refs/heads/main")), "deploy").await;
    let (s2, feature) = broker.exchange(&issuer.sign(&deploy_claims(&issuer, "refs/heads/feature")), "deploy").await;
    assert_eq!((s1, s2), (201, 201), "{main} {feature}");

    write_policy(&broker, "deploy", MAIN_ONLY);
    let report = broker.running.app.reload_policies(true).await;

    assert_eq!(report.outcome, "ok", "{report:?}");
    assert_eq!(report.ended.len(), 1, "{report:?}");
    assert_eq!(report.ended[0].lease_id, feature["lease_id"].as_str().unwrap());
    assert_eq!(report.ended[0].claim.as_deref(), Some("ref"));
    let ended = lease(&broker, &feature).await;
    assert_eq!((ended.state, ended.reason.as_deref()), (LeaseState::Revoked, Some("policy-changed")));
    assert_eq!(broker.introspect(jwt(&feature)).await["active"], false);
    // The lease the new set still allows is untouched.
    assert_eq!(lease(&broker, &main).await.state, LeaseState::Active);
    assert_eq!(broker.introspect(jwt(&main)).await["active"], true);
    assert_eq!(
        metric(&broker, "ephemera_leases_ended_total{reason=\"policy-changed\"}").await,
        "ephemera_leases_ended_total{reason=\"policy-changed\"} 1"
    );
    assert_eq!(
        metric(&broker, "ephemera_policy_reloads_total{outcome=\"ok\"}").await,
        "ephemera_policy_reloads_total{outcome=\"ok\"} 1"
    );
    // And new exchanges are decided by the new set.
    let (status, _) = broker.exchange(&issuer.sign(&deploy_claims(&issuer, "refs/heads/feature")), "deploy").await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn removing_a_policy_ends_its_leases_and_no_others() {
    let issuer = FakeIssuer::start().await;
    let broker = broker(&issuer, &[("deploy", OPEN), ("other", OPEN)], None).await;
    let (_, gone) = broker.exchange(&issuer.sign(&deploy_claims(&issuer, "refs/heads/main")), "deploy").await;
    let (_, kept) = broker.exchange(&issuer.sign(&deploy_claims(&issuer, "refs/heads/x")), "other").await;

    std::fs::remove_file(broker.dir.path().join("policies/deploy.yaml")).unwrap();
    let report = broker.running.app.reload_policies(true).await;

    assert_eq!((report.outcome, report.policies), ("ok", 1));
    assert_eq!(report.ended.len(), 1);
    assert_eq!(report.ended[0].reason, "policy removed");
    assert_eq!(lease(&broker, &gone).await.state, LeaseState::Revoked);
    assert_eq!(lease(&broker, &kept).await.state, LeaseState::Active);
}

#[tokio::test]
async fn a_reload_with_one_broken_file_among_good_ones_keeps_the_last_good_set() {
    let issuer = FakeIssuer::start().await;
    let broker = broker(&issuer, &[("deploy", OPEN)], None).await;
    let (_, live) = broker.exchange(&issuer.sign(&deploy_claims(&issuer, "refs/heads/feature")), "deploy").await;

    // A good change (that would end the live lease) next to a broken new file.
    write_policy(&broker, "deploy", MAIN_ONLY);
    write_policy(&broker, "broken", "issuer: ci\nmatch: {repository_id: [}\n");
    let report = broker.running.app.reload_policies(true).await;

    assert_eq!(report.outcome, "failed");
    assert!(report.errors.iter().any(|e| e.contains("broken.yaml")), "{:?}", report.errors);
    assert!(report.ended.is_empty());
    // Nothing of the change applies: the old set still decides, the live lease stays live.
    assert_eq!(lease(&broker, &live).await.state, LeaseState::Active);
    let (status, second) = broker.exchange(&issuer.sign(&deploy_claims(&issuer, "refs/heads/other")), "deploy").await;
    assert_eq!(status, 201, "the last good set (OPEN) is still in use");
    // Visible: /readyz detail (still ready: the broker serves the last good set) and /metrics.
    let (status, ready) = broker.get("/readyz").await;
    let ready: Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["policies"]["last_reload"], "failed");
    assert_eq!(ready["policies"]["generation"], 1);
    assert!(ready["policies"]["errors"][0].as_str().unwrap().contains("broken.yaml"), "{ready}");
    assert_eq!(metric(&broker, "ephemera_policy_reload_failing ").await, "ephemera_policy_reload_failing 1");
    assert_eq!(
        metric(&broker, "ephemera_policy_reloads_total{outcome=\"failed\"}").await,
        "ephemera_policy_reloads_total{outcome=\"failed\"} 1"
    );
    assert!(captured_logs().contains("policy reload refused"));

    // Fixing the file applies the whole change, including the re-evaluation.
    std::fs::remove_file(broker.dir.path().join("policies/broken.yaml")).unwrap();
    let report = broker.running.app.reload_policies(true).await;
    assert_eq!((report.outcome, report.ended.len()), ("ok", 2), "{report:?}");
    assert_eq!(lease(&broker, &live).await.state, LeaseState::Revoked);
    assert_eq!(lease(&broker, &second).await.state, LeaseState::Revoked);
    assert_eq!(metric(&broker, "ephemera_policy_reload_failing ").await, "ephemera_policy_reload_failing 0");
}

#[tokio::test]
async fn reloads_while_exchanges_run_fail_no_exchange() {
    let issuer = Arc::new(FakeIssuer::start().await);
    let broker = Arc::new(broker(&issuer, &[("deploy", OPEN)], None).await);
    let tokens: Vec<String> =
        (0..60).map(|i| issuer.sign(&deploy_claims(&issuer, &format!("refs/heads/b{i}")))).collect();
    let mut exchanges = Vec::new();
    for token in tokens {
        let broker = broker.clone();
        exchanges.push(tokio::spawn(async move { broker.exchange(&token, "deploy").await }));
    }
    // Reload the (equivalent) policy again and again while the exchanges run.
    for i in 0..20 {
        write_policy(&broker, "deploy", &format!("{OPEN}\ndescription: revision {i}\n"));
        assert_eq!(broker.running.app.reload_policies(true).await.outcome, "ok");
        tokio::task::yield_now().await;
    }
    for e in exchanges {
        let (status, body) = e.await.unwrap();
        assert_eq!(status, 201, "{body}");
    }
    assert_eq!(broker.running.app.policies().status().generation, 21);
}

#[tokio::test]
async fn diff_lists_the_leases_a_change_would_end_and_changes_nothing() {
    let issuer = FakeIssuer::start().await;
    let broker = broker(&issuer, &[("deploy", OPEN), ("other", OPEN)], None).await;
    let (_, main) = broker.exchange(&issuer.sign(&deploy_claims(&issuer, "refs/heads/main")), "deploy").await;
    let (_, feature) = broker.exchange(&issuer.sign(&deploy_claims(&issuer, "refs/heads/feature")), "deploy").await;
    let (_, other) = broker.exchange(&issuer.sign(&deploy_claims(&issuer, "refs/heads/y")), "other").await;

    // The candidate: deploy tightened, other removed.
    let (status, diff) = admin_post(&broker, "/v1/policies/diff", json!({"policies": {"deploy": MAIN_ONLY}})).await;

    assert_eq!(status, 200, "{diff}");
    assert_eq!(diff["valid"], true);
    let mut ids: Vec<&str> =
        diff["would_end"].as_array().unwrap().iter().map(|e| e["lease_id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    let mut want = vec![feature["lease_id"].as_str().unwrap(), other["lease_id"].as_str().unwrap()];
    want.sort_unstable();
    assert_eq!(ids, want, "{diff}");
    let by_id =
        |id: &Value| diff["would_end"].as_array().unwrap().iter().find(|e| e["lease_id"] == *id).unwrap().clone();
    assert_eq!(by_id(&feature["lease_id"])["claim"], "ref");
    assert_eq!(by_id(&other["lease_id"])["reason"], "policy removed");
    // Nothing changed.
    for body in [&main, &feature, &other] {
        assert_eq!(lease(&broker, body).await.state, LeaseState::Active);
    }
    assert_eq!(broker.running.app.policies().status().generation, 1);

    // Rolling the same change out ends exactly what the diff said.
    write_policy(&broker, "deploy", MAIN_ONLY);
    std::fs::remove_file(broker.dir.path().join("policies/other.yaml")).unwrap();
    let report = broker.running.app.reload_policies(true).await;
    let mut ended: Vec<&str> = report.ended.iter().map(|e| e.lease_id.as_str()).collect();
    ended.sort_unstable();
    assert_eq!(ended, want);
}

#[tokio::test]
async fn diff_of_a_broken_candidate_answers_422_with_every_error_and_needs_the_admin_token() {
    let issuer = FakeIssuer::start().await;
    let broker = broker(&issuer, &[("deploy", OPEN)], None).await;
    let candidate = json!({"policies": {
        "deploy": "issuer: nope\nttl: {default: 15m, max: 1h}\ngrants: {}\n",
        "Bad Name": OPEN,
    }});

    let (status, diff) = admin_post(&broker, "/v1/policies/diff", candidate.clone()).await;

    assert_eq!(status, 422, "{diff}");
    assert_eq!(diff["valid"], false);
    let errors = diff["errors"].to_string();
    assert!(errors.contains("deploy.yaml") && errors.contains("issuer"), "{errors}");
    assert!(errors.contains("Bad Name.yaml"), "{errors}");
    let resp = broker.http.post(format!("{}/v1/policies/diff", broker.url)).json(&candidate).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 401);
}

#[tokio::test]
async fn admin_reload_endpoint_reloads_and_reports_a_refused_set_as_422() {
    let issuer = FakeIssuer::start().await;
    let broker = broker(&issuer, &[("deploy", OPEN)], None).await;
    write_policy(&broker, "second", OPEN);
    let (status, report) = admin_post(&broker, "/v1/policies/reload", json!({})).await;
    assert_eq!((status, report["outcome"].as_str(), report["policies"].as_u64()), (200, Some("ok"), Some(2)));

    write_policy(&broker, "second", "grants: [");
    let (status, report) = admin_post(&broker, "/v1/policies/reload", json!({})).await;
    assert_eq!((status, report["outcome"].as_str()), (422, Some("failed")), "{report}");
    assert!(report["errors"][0].as_str().unwrap().contains("second.yaml"), "{report}");
}

#[tokio::test]
async fn the_file_watch_reloads_when_the_directory_changes() {
    let issuer = FakeIssuer::start().await;
    let broker = broker(&issuer, &[("deploy", OPEN)], Some("1s")).await;
    let (status, _) = broker.exchange(&issuer.sign(&deploy_claims(&issuer, "refs/heads/main")), "second").await;
    assert_eq!(status, 403);

    write_policy(&broker, "second", OPEN);

    // Waits for the condition (the watch polls every second), not for a fixed time.
    let mut generation = 1;
    for _ in 0..300 {
        generation = broker.running.app.policies().status().generation;
        if generation > 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(generation, 2, "the watch did not pick up the new file");
    let (status, body) = broker.exchange(&issuer.sign(&deploy_claims(&issuer, "refs/heads/main")), "second").await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test]
async fn policy_diff_cli_prints_the_leases_a_directory_would_end() {
    let issuer = FakeIssuer::start().await;
    let broker = broker(&issuer, &[("deploy", OPEN)], None).await;
    let (_, feature) = broker.exchange(&issuer.sign(&deploy_claims(&issuer, "refs/heads/feature")), "deploy").await;
    let candidate = tempfile::tempdir().unwrap();
    std::fs::write(candidate.path().join("deploy.yaml"), MAIN_ONLY).unwrap();
    std::fs::write(candidate.path().join("README.md"), "not a policy").unwrap();

    let url = broker.url.clone();
    let run = move |dir: &std::path::Path, token: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ephemera"));
        cmd.args(["policy", "diff", "--broker", &url, "--dir"]).arg(dir).env_remove("EPHEMERA_ADMIN_TOKEN");
        if let Some(t) = token {
            cmd.env("EPHEMERA_ADMIN_TOKEN", t);
        }
        cmd.output().unwrap()
    };
    let dir = candidate.path().to_path_buf();
    let run2 = run.clone();
    let out = tokio::task::spawn_blocking(move || run2(&dir, Some(ADMIN))).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("would end 1 live lease"), "{stdout}");
    assert!(stdout.contains(feature["lease_id"].as_str().unwrap()), "{stdout}");
    assert_eq!(lease(&broker, &feature).await.state, LeaseState::Active, "a diff changes nothing");

    // No admin token: a clear message, exit 1; the wrong one: 401 (exit 4).
    let dir = candidate.path().to_path_buf();
    let run2 = run.clone();
    let (missing, wrong) =
        tokio::task::spawn_blocking(move || (run2(&dir, None), run2(&dir, Some("nope")))).await.unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no admin token"));
    assert_eq!(wrong.status.code(), Some(4), "{}", String::from_utf8_lossy(&wrong.stderr));

    // A candidate the broker would refuse: exit 1 with the errors.
    std::fs::write(candidate.path().join("deploy.yaml"), "issuer: [").unwrap();
    let dir = candidate.path().to_path_buf();
    let refused = tokio::task::spawn_blocking(move || run(&dir, Some(ADMIN))).await.unwrap();
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("would refuse") && stderr.contains("deploy.yaml"), "{stderr}");
}

#[tokio::test]
async fn a_reload_whose_lint_finds_an_error_is_refused_like_a_parse_error() {
    let issuer = FakeIssuer::start().await;
    let broker = broker(&issuer, &[("deploy", OPEN)], None).await;
    // Parses fine, but any pull request of the repository would get the grant.
    write_policy(
        &broker,
        "deploy",
        "issuer: ci\nmatch:\n  repository_id: \"74\"\n  sub: {glob: \"repo:octo-org/octo-repo:*\"}\nttl: {default: 5m, max: 10m}\ngrants:\n  api: {backend: jwt, audience: x}\n",
    );
    let report = broker.running.app.reload_policies(true).await;
    assert_eq!(report.outcome, "failed");
    assert!(report.errors.iter().any(|e| e.contains("sub-matches-untrusted")), "{:?}", report.errors);
    assert_eq!(broker.running.app.policies().status().generation, 1);
}

#[tokio::test]
async fn a_reload_whose_grant_now_needs_a_claim_the_lease_lacks_ends_that_lease() {
    let issuer = FakeIssuer::start().await;
    let broker = broker(&issuer, &[("deploy", OPEN)], None).await;
    let mut no_env = deploy_claims(&issuer, "refs/heads/main");
    no_env.remove("environment");
    let (_, without) = broker.exchange(&issuer.sign(&no_env), "deploy").await;
    let (_, with) = broker.exchange(&issuer.sign(&deploy_claims(&issuer, "refs/heads/feature")), "deploy").await;

    write_policy(
        &broker,
        "deploy",
        &OPEN.replace(
            "audience: https://api.internal.example",
            "audience: https://api.internal.example, claims: {env: \"${environment}\"}",
        ),
    );
    let report = broker.running.app.reload_policies(true).await;

    assert_eq!(report.outcome, "ok", "{report:?}");
    let ended: Vec<&str> = report.ended.iter().map(|e| e.lease_id.as_str()).collect();
    assert_eq!(ended, [without["lease_id"].as_str().unwrap()]);
    assert_eq!(report.ended[0].claim.as_deref(), Some("environment"));
    assert_eq!(lease(&broker, &with).await.state, LeaseState::Active);
}

#[tokio::test]
async fn a_reload_re_decides_only_the_leases_of_the_policies_it_changed() {
    // Before: every reload re-decided (and cloned) every live lease of every policy, however
    // small the change.
    let issuer = FakeIssuer::start().await;
    let broker = broker(&issuer, &[("deploy", OPEN), ("other", OPEN)], None).await;
    let (_, changed) = broker.exchange(&issuer.sign(&deploy_claims(&issuer, "refs/heads/feature")), "deploy").await;
    for r in ["refs/heads/a", "refs/heads/bb", "refs/heads/ccc"] {
        let (status, body) = broker.exchange(&issuer.sign(&deploy_claims(&issuer, r)), "other").await;
        assert_eq!(status, 201, "{body}");
    }
    // Nothing changed: nothing is re-decided.
    let report = broker.running.app.reload_policies(true).await;
    assert_eq!((report.outcome, report.reevaluated), ("ok", 0));
    // One policy tightened: its one lease is re-decided (and ended), the other three are not.
    write_policy(&broker, "deploy", MAIN_ONLY);
    let report = broker.running.app.reload_policies(true).await;
    assert_eq!((report.outcome, report.reevaluated, report.ended.len()), ("ok", 1, 1));
    assert_eq!(lease(&broker, &changed).await.state, LeaseState::Revoked);
}
