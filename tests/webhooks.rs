//! The platform webhooks over real HTTP: a job-completed delivery ends that job's leases (and no
//! other job's), and nothing unauthenticated, replayed, unfinished or malformed ends anything.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{Value, json};
use std::path::Path;

const GITHUB_SECRET: &str = "github-webhook-secret-for-tests";
const GITLAB_TOKEN: &str = "gitlab-webhook-token-for-tests";
/// The job key of `github-environment-deploy.json`.
const GITHUB_JOB: (u64, u64, u64, u64) = (74, 7_712_340_001, 2, 96_193_868_770);

/// A broker trusting one GitHub issuer (`ci`), with both hooks on. The secret files end in a
/// newline, as `echo` writes them; the broker must drop it.
async fn setup_github() -> (FakeIssuer, Broker, tempfile::TempDir) {
    let issuer = FakeIssuer::start().await;
    let secrets = write_secrets();
    let extra = Extra { hooks_toml: hooks_toml(secrets.path(), &[GITHUB_FILE], ""), ..Extra::default() };
    let broker = Broker::start_custom(&[("ci", "github-actions", &issuer)], &[("deploy", DEPLOY_POLICY)], &extra).await;
    (issuer, broker, secrets)
}

/// A broker trusting one GitLab issuer (`gitlab`) with the example release policy.
async fn setup_gitlab() -> (FakeIssuer, Broker, tempfile::TempDir) {
    let issuer = FakeIssuer::start().await;
    let secrets = write_secrets();
    let yaml = std::fs::read_to_string(repo_path("policies/gitlab-release.yaml")).unwrap();
    let extra = Extra { hooks_toml: hooks_toml(secrets.path(), &[GITLAB_FILE], ""), ..Extra::default() };
    let broker = Broker::start_custom(&[("gitlab", "gitlab-ci", &issuer)], &[("gitlab-release", &yaml)], &extra).await;
    (issuer, broker, secrets)
}

fn write_secrets() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("github-secret"), format!("{GITHUB_SECRET}\n")).unwrap();
    std::fs::write(dir.path().join("gitlab-token"), format!("{GITLAB_TOKEN}\n")).unwrap();
    dir
}

/// A `[hooks]` table naming the secret files in `dir` that `files` lists, plus `more` lines.
fn hooks_toml(dir: &Path, files: &[(&str, &str)], more: &str) -> String {
    let mut toml = String::from("[hooks]\n");
    for (key, file) in files {
        toml.push_str(&format!("{key} = {:?}\n", dir.join(file).display().to_string()));
    }
    toml + more
}

const GITHUB_FILE: (&str, &str) = ("github_secret_file", "github-secret");
const GITLAB_FILE: (&str, &str) = ("gitlab_token_file", "gitlab-token");

/// Exchanges a fresh token of `claims` for the deploy policy; returns (lease id, broker JWT).
async fn lease(
    broker: &Broker,
    issuer: &FakeIssuer,
    claims: &serde_json::Map<String, Value>,
    policy: &str,
) -> (String, String) {
    let (status, body) = broker.exchange(&issuer.sign(claims), policy).await;
    assert_eq!(status, 201, "{body}");
    let jwt = body["credentials"].as_object().unwrap().values().next().unwrap()["token"].as_str().unwrap();
    (body["lease_id"].as_str().unwrap().to_string(), jwt.to_string())
}

async fn active(broker: &Broker, jwt: &str) -> bool {
    broker.introspect(jwt).await["active"] == true
}

fn workflow_job(action: &str, (repo, run, attempt, job): (u64, u64, u64, u64)) -> String {
    json!({
        "action": action,
        "workflow_job": {
            "id": job, "run_id": run, "run_attempt": attempt, "status": action,
            "conclusion": "success", "name": "deploy", "labels": ["ubuntu-latest"],
        },
        "repository": {"id": repo, "full_name": "octo-org/octo-repo"},
        "sender": {"login": "octocat"},
    })
    .to_string()
}

fn signature(secret: &str, body: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    format!("sha256={}", ephemera::secret::hex(ring::hmac::sign(&key, body.as_bytes()).as_ref()))
}

/// POST /v1/hooks/github with the given event, delivery id and signature header.
async fn github_hook(
    broker: &Broker,
    event: &str,
    delivery: &str,
    signature: Option<&str>,
    body: &str,
) -> (u16, Value) {
    let mut request = broker
        .http
        .post(format!("{}/v1/hooks/github", broker.url))
        .header("x-github-event", event)
        .header("x-github-delivery", delivery)
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(s) = signature {
        request = request.header("x-hub-signature-256", s);
    }
    status_json(request.send().await.unwrap()).await
}

/// A correctly signed delivery.
async fn github_signed(broker: &Broker, event: &str, delivery: &str, body: &str) -> (u16, Value) {
    github_hook(broker, event, delivery, Some(&signature(GITHUB_SECRET, body)), body).await
}

fn gitlab_build(status: &str, project: u64, build: u64) -> String {
    json!({
        "object_kind": "build", "ref": "main", "tag": false, "build_id": build, "build_name": "release",
        "build_stage": "deploy", "build_status": status, "pipeline_id": 574, "project_id": project,
        "project_name": "my-group / my-project", "repository": {"name": "my-project"},
    })
    .to_string()
}

async fn gitlab_hook(broker: &Broker, token: Option<&str>, uuid: &str, body: &str) -> (u16, Value) {
    let mut request = broker
        .http
        .post(format!("{}/v1/hooks/gitlab", broker.url))
        .header("x-gitlab-event", "Job Hook")
        .header("x-gitlab-event-uuid", uuid)
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(t) = token {
        request = request.header("x-gitlab-token", t);
    }
    status_json(request.send().await.unwrap()).await
}

async fn status_json(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

// ---- GitHub ---------------------------------------------------------------------------------

#[tokio::test]
async fn a_github_workflow_job_completed_ends_that_jobs_leases_and_not_another_jobs() {
    let (issuer, broker, _secrets) = setup_github().await;
    let (lease_a, jwt_a) =
        lease(&broker, &issuer, &issuer.claims("github-environment-deploy.json", NOW), "deploy").await;
    let mut other = issuer.claims("github-environment-deploy.json", NOW);
    other.insert("check_run_id".into(), json!("96193868771"));
    let (_, jwt_b) = lease(&broker, &issuer, &other, "deploy").await;
    assert!(active(&broker, &jwt_a).await && active(&broker, &jwt_b).await);

    let reply = github_signed(&broker, "workflow_job", "d-1", &workflow_job("completed", GITHUB_JOB)).await;
    assert_eq!(reply, (200, json!({"revoked": [lease_a], "pending": []})));
    assert!(!active(&broker, &jwt_a).await, "the completed job's lease ended");
    assert!(active(&broker, &jwt_b).await, "another job of the same run is untouched");
    let ended = broker.running.app.lease(&lease_a).await.unwrap().unwrap();
    assert_eq!(ended.reason.as_deref(), Some("webhook"));
    let logs = captured_logs();
    assert!(logs.contains("webhook ended job") && logs.contains("github:74:7712340001:2:96193868770"));
    assert_not_logged(&[GITHUB_SECRET]);
}

#[tokio::test]
async fn a_github_delivery_with_a_wrong_signature_is_401_and_the_lease_stays_live() {
    let (issuer, broker, _secrets) = setup_github().await;
    let (_, jwt) = lease(&broker, &issuer, &issuer.claims("github-environment-deploy.json", NOW), "deploy").await;
    let body = workflow_job("completed", GITHUB_JOB);
    let reply = github_hook(&broker, "workflow_job", "d-1", Some(&signature("not-the-secret", &body)), &body).await;
    assert_error(&reply, 401, "unauthorized");
    assert!(active(&broker, &jwt).await);
    // The rejected delivery id was not remembered: the genuine delivery still works.
    let reply = github_signed(&broker, "workflow_job", "d-1", &body).await;
    assert_eq!(reply.0, 200, "{}", reply.1);
    assert!(!active(&broker, &jwt).await);
}

#[tokio::test]
async fn a_github_delivery_without_a_usable_signature_is_401() {
    let (issuer, broker, _secrets) = setup_github().await;
    let (_, jwt) = lease(&broker, &issuer, &issuer.claims("github-environment-deploy.json", NOW), "deploy").await;
    let body = workflow_job("completed", GITHUB_JOB);
    let good = signature(GITHUB_SECRET, &body);
    let hex = good.trim_start_matches("sha256=");
    for header in
        [None, Some(""), Some(hex), Some(&*format!("sha1={hex}")), Some("sha256=zz"), Some(&good[..good.len() - 2])]
    {
        let reply = github_hook(&broker, "workflow_job", "d-1", header, &body).await;
        assert_error(&reply, 401, "unauthorized");
    }
    assert!(active(&broker, &jwt).await);
}

#[tokio::test]
async fn a_github_signature_over_a_different_body_is_401() {
    let (issuer, broker, _secrets) = setup_github().await;
    let (_, jwt) = lease(&broker, &issuer, &issuer.claims("github-environment-deploy.json", NOW), "deploy").await;
    // A genuine signature of another job's delivery, replayed onto a body naming this job.
    let signed = workflow_job("completed", (74, 7_712_340_001, 2, 1));
    let body = workflow_job("completed", GITHUB_JOB);
    let reply = github_hook(&broker, "workflow_job", "d-1", Some(&signature(GITHUB_SECRET, &signed)), &body).await;
    assert_error(&reply, 401, "unauthorized");
    assert!(active(&broker, &jwt).await);
}

#[tokio::test]
async fn a_replayed_github_delivery_is_a_duplicate_and_ends_nothing() {
    let (issuer, broker, _secrets) = setup_github().await;
    let claims = issuer.claims("github-environment-deploy.json", NOW);
    let (_, first) = lease(&broker, &issuer, &claims, "deploy").await;
    let body = workflow_job("completed", GITHUB_JOB);
    assert_eq!(github_signed(&broker, "workflow_job", "d-1", &body).await.0, 200);
    assert!(!active(&broker, &first).await);
    // A new lease of the same job (a fresh token); the replay must not touch it.
    let (second_id, second) =
        lease(&broker, &issuer, &issuer.claims("github-environment-deploy.json", NOW), "deploy").await;
    let reply = github_signed(&broker, "workflow_job", "d-1", &body).await;
    assert_eq!(reply, (200, json!({"duplicate": true})));
    assert!(active(&broker, &second).await, "a replayed delivery did something");
    // A new delivery is acted on.
    let reply = github_signed(&broker, "workflow_job", "d-2", &body).await;
    assert_eq!(reply, (200, json!({"revoked": [second_id], "pending": []})));
}

#[tokio::test]
async fn a_github_workflow_job_still_in_progress_is_ignored() {
    let (issuer, broker, _secrets) = setup_github().await;
    let (_, jwt) = lease(&broker, &issuer, &issuer.claims("github-environment-deploy.json", NOW), "deploy").await;
    for (i, action) in ["queued", "in_progress", "waiting"].iter().enumerate() {
        let reply = github_signed(&broker, "workflow_job", &format!("d-{i}"), &workflow_job(action, GITHUB_JOB)).await;
        assert_eq!(reply, (200, json!({"ignored": "workflow_job action is not completed"})));
    }
    assert!(active(&broker, &jwt).await);
}

#[tokio::test]
async fn a_github_ping_and_other_events_are_ignored() {
    let (issuer, broker, _secrets) = setup_github().await;
    let (_, jwt) = lease(&broker, &issuer, &issuer.claims("github-environment-deploy.json", NOW), "deploy").await;
    let ping = json!({"zen": "Design for failure.", "hook_id": 1, "hook": {"events": ["workflow_job"]}}).to_string();
    assert_eq!(github_signed(&broker, "ping", "d-ping", &ping).await, (200, json!({"ignored": "ping"})));
    // A completed-looking body under another event name ends nothing either.
    let body = workflow_job("completed", GITHUB_JOB);
    let reply = github_signed(&broker, "workflow_run", "d-run", &body).await;
    assert_eq!(reply, (200, json!({"ignored": "not a workflow_job event"})));
    assert!(active(&broker, &jwt).await);
}

#[tokio::test]
async fn a_malformed_github_body_with_a_valid_signature_is_400_without_echoing_it() {
    let (issuer, broker, _secrets) = setup_github().await;
    let (_, jwt) = lease(&broker, &issuer, &issuer.claims("github-environment-deploy.json", NOW), "deploy").await;
    let string_ids = json!({
        "action": "completed",
        "workflow_job": {"id": "96193868770:x", "run_id": 7_712_340_001u64, "run_attempt": 2},
        "repository": {"id": 74},
    });
    let cases = [
        "not json at all: ghp_supersecretvalue".to_string(),
        String::new(),
        json!({"action": "completed"}).to_string(),
        json!({"action": "completed", "workflow_job": {"id": 1, "run_id": 2}, "repository": {"id": 74}}).to_string(),
        string_ids.to_string(),
    ];
    for (i, body) in cases.iter().enumerate() {
        let reply = github_signed(&broker, "workflow_job", &format!("d-{i}"), body).await;
        assert_error(&reply, 400, "bad_request");
        let message = reply.1["error"]["message"].as_str().unwrap();
        assert!(!message.contains("ghp_") && !message.contains("96193868770"), "{message}");
    }
    assert!(active(&broker, &jwt).await);
}

#[tokio::test]
async fn hooks_that_are_not_configured_are_404() {
    let issuer = FakeIssuer::start().await;
    let broker = Broker::start(&issuer, &[("deploy", DEPLOY_POLICY)]).await;
    let body = workflow_job("completed", GITHUB_JOB);
    let reply = github_signed(&broker, "workflow_job", "d-1", &body).await;
    assert_error(&reply, 404, "not_found");
    let reply = gitlab_hook(&broker, Some(GITLAB_TOKEN), "u-1", &gitlab_build("success", 20, 302)).await;
    assert_error(&reply, 404, "not_found");
}

#[tokio::test]
async fn one_configured_hook_does_not_turn_on_the_other() {
    let issuer = FakeIssuer::start().await;
    let gitlab = FakeIssuer::start().await;
    let secrets = write_secrets();
    let extra = Extra { hooks_toml: hooks_toml(secrets.path(), &[GITHUB_FILE], ""), ..Extra::default() };
    let broker = Broker::start_custom(
        &[("ci", "github-actions", &issuer), ("gitlab", "gitlab-ci", &gitlab)],
        &[("deploy", DEPLOY_POLICY)],
        &extra,
    )
    .await;
    let reply = gitlab_hook(&broker, Some(GITLAB_TOKEN), "u-1", &gitlab_build("success", 20, 302)).await;
    assert_error(&reply, 404, "not_found");
}

#[tokio::test]
async fn with_two_github_issuers_the_named_one_has_its_prefixed_job_key_ended() {
    let ci = FakeIssuer::start().await;
    let ghes = FakeIssuer::start().await;
    let secrets = write_secrets();
    let extra = Extra {
        hooks_toml: hooks_toml(secrets.path(), &[GITHUB_FILE], "github_issuer = \"ghes\"\n"),
        ..Extra::default()
    };
    let ghes_policy = DEPLOY_POLICY.replace("issuer: ci", "issuer: ghes");
    let broker = Broker::start_custom(
        &[("ci", "github-actions", &ci), ("ghes", "github-actions", &ghes)],
        &[("deploy", DEPLOY_POLICY), ("deploy-ghes", &ghes_policy)],
        &extra,
    )
    .await;
    let (_, jwt_ci) = lease(&broker, &ci, &ci.claims("github-environment-deploy.json", NOW), "deploy").await;
    let (lease_ghes, jwt_ghes) =
        lease(&broker, &ghes, &ghes.claims("github-environment-deploy.json", NOW), "deploy-ghes").await;
    assert_eq!(
        broker.running.app.lease(&lease_ghes).await.unwrap().unwrap().job.as_ref(),
        "ghes:github:74:7712340001:2:96193868770"
    );

    let reply = github_signed(&broker, "workflow_job", "d-1", &workflow_job("completed", GITHUB_JOB)).await;
    assert_eq!(reply, (200, json!({"revoked": [lease_ghes], "pending": []})));
    assert!(!active(&broker, &jwt_ghes).await);
    assert!(active(&broker, &jwt_ci).await, "the same ids under the other issuer are another job");
}

// ---- GitLab ---------------------------------------------------------------------------------

#[tokio::test]
async fn a_finished_gitlab_build_ends_the_jobs_lease() {
    let (issuer, broker, _secrets) = setup_gitlab().await;
    for (i, status) in ["success", "failed", "canceled"].iter().enumerate() {
        let (lease_id, jwt) =
            lease(&broker, &issuer, &issuer.claims("gitlab-protected-branch.json", NOW), "gitlab-release").await;
        assert_eq!(broker.running.app.lease(&lease_id).await.unwrap().unwrap().job.as_ref(), "gitlab:20:302");
        let reply = gitlab_hook(&broker, Some(GITLAB_TOKEN), &format!("u-{i}"), &gitlab_build(status, 20, 302)).await;
        assert_eq!(reply, (200, json!({"revoked": [lease_id], "pending": []})), "{status}");
        assert!(!active(&broker, &jwt).await, "{status}");
    }
    assert_not_logged(&[GITLAB_TOKEN]);
}

#[tokio::test]
async fn a_gitlab_delivery_with_a_wrong_or_missing_token_is_401() {
    let (issuer, broker, _secrets) = setup_gitlab().await;
    let (_, jwt) = lease(&broker, &issuer, &issuer.claims("gitlab-protected-branch.json", NOW), "gitlab-release").await;
    let body = gitlab_build("success", 20, 302);
    let long = format!("{GITLAB_TOKEN}x");
    for token in [None, Some(""), Some("wrong"), Some(&GITLAB_TOKEN[..GITLAB_TOKEN.len() - 1]), Some(long.as_str())] {
        assert_error(&gitlab_hook(&broker, token, "u-1", &body).await, 401, "unauthorized");
    }
    assert!(active(&broker, &jwt).await);
}

#[tokio::test]
async fn a_gitlab_build_that_has_not_finished_is_ignored() {
    let (issuer, broker, _secrets) = setup_gitlab().await;
    let (_, jwt) = lease(&broker, &issuer, &issuer.claims("gitlab-protected-branch.json", NOW), "gitlab-release").await;
    for (i, status) in ["created", "pending", "running"].iter().enumerate() {
        let reply = gitlab_hook(&broker, Some(GITLAB_TOKEN), &format!("u-{i}"), &gitlab_build(status, 20, 302)).await;
        assert_eq!(reply, (200, json!({"ignored": "build_status is not final"})), "{status}");
    }
    let pipeline = json!({"object_kind": "pipeline", "object_attributes": {"id": 574, "status": "success"}});
    let reply = gitlab_hook(&broker, Some(GITLAB_TOKEN), "u-pipeline", &pipeline.to_string()).await;
    assert_eq!(reply, (200, json!({"ignored": "object_kind is not build"})));
    assert!(active(&broker, &jwt).await);
}

#[tokio::test]
async fn a_replayed_gitlab_delivery_is_a_duplicate() {
    let (issuer, broker, _secrets) = setup_gitlab().await;
    let body = gitlab_build("success", 20, 302);
    lease(&broker, &issuer, &issuer.claims("gitlab-protected-branch.json", NOW), "gitlab-release").await;
    assert_eq!(gitlab_hook(&broker, Some(GITLAB_TOKEN), "u-1", &body).await.0, 200);
    let (_, jwt) = lease(&broker, &issuer, &issuer.claims("gitlab-protected-branch.json", NOW), "gitlab-release").await;
    assert_eq!(gitlab_hook(&broker, Some(GITLAB_TOKEN), "u-1", &body).await, (200, json!({"duplicate": true})));
    assert!(active(&broker, &jwt).await);
}

#[tokio::test]
async fn a_malformed_gitlab_body_is_400() {
    let (issuer, broker, _secrets) = setup_gitlab().await;
    let (_, jwt) = lease(&broker, &issuer, &issuer.claims("gitlab-protected-branch.json", NOW), "gitlab-release").await;
    let cases = [
        "{not json".to_string(),
        json!({"build_status": "success", "project_id": 20, "build_id": 302}).to_string(),
        json!({"object_kind": "build", "build_status": "success", "project_id": 20}).to_string(),
        json!({"object_kind": "build", "build_status": "success", "project_id": "20", "build_id": 302}).to_string(),
    ];
    for (i, body) in cases.iter().enumerate() {
        assert_error(&gitlab_hook(&broker, Some(GITLAB_TOKEN), &format!("u-{i}"), body).await, 400, "bad_request");
    }
    assert!(active(&broker, &jwt).await);
}

// ---- config -----------------------------------------------------------------------------------

fn config_with(issuers: &[(&str, &str)], hooks: &str, base: &Path) -> Result<ephemera::config::Config, String> {
    let mut toml = String::new();
    for (i, (name, platform)) in issuers.iter().enumerate() {
        toml.push_str(&format!(
            "[[issuers]]\nname = \"{name}\"\nplatform = \"{platform}\"\nurl = \"https://issuer{i}.example\"\n"
        ));
    }
    toml.push_str(hooks);
    let mut config = ephemera::config::Config::parse(&toml, base).map_err(|e| e.join("\n"))?;
    // What the server does at start (the secrets are not read when the config is parsed).
    config.hooks.load_secrets().map_err(|e| e.join("\n"))?;
    Ok(config)
}

#[test]
fn parsing_the_config_does_not_read_hook_secrets_so_policy_check_works_without_them() {
    let dir = tempfile::tempdir().unwrap();
    let toml = "[[issuers]]\nname = \"ci\"\nplatform = \"github-actions\"\nurl = \"https://issuer.example\"\n\
                [hooks]\ngithub_secret_file = \"not-here\"\n";
    let mut config = ephemera::config::Config::parse(toml, dir.path()).unwrap();
    assert!(config.hooks.load_secrets().unwrap_err()[0].contains("hooks.github_secret_file: cannot read"));
}

#[test]
fn two_github_issuers_and_no_github_issuer_named_is_a_config_error() {
    let secrets = write_secrets();
    let hooks = hooks_toml(secrets.path(), &[GITHUB_FILE, GITLAB_FILE], "");
    let two = [("ci", "github-actions"), ("ghes", "github-actions"), ("gitlab", "gitlab-ci")];
    let errs = config_with(&two, &hooks, secrets.path()).unwrap_err();
    assert!(errs.contains("hooks.github_issuer") && errs.contains("ci, ghes"), "{errs}");
    let named = hooks_toml(secrets.path(), &[GITHUB_FILE, GITLAB_FILE], "github_issuer = \"ghes\"\n");
    let config = config_with(&two, &named, secrets.path()).unwrap();
    assert_eq!(config.hooks.github.unwrap().issuer, "ghes");
    assert_eq!(config.hooks.gitlab.unwrap().issuer, "gitlab", "the only gitlab-ci issuer");
}

#[test]
fn hook_config_errors_are_reported_at_start() {
    let secrets = write_secrets();
    let one = [("ci", "github-actions")];
    let cases = [
        ("[hooks]\ngithub_secret_file = \"missing\"\n", "hooks.github_secret_file: cannot read"),
        (
            "[hooks]\ngithub_secret_file = \"github-secret\"\ngithub_issuer = \"nope\"\n",
            "no github-actions issuer is named `nope`",
        ),
        (
            "[hooks]\ngithub_secret_file = \"github-secret\"\ngithub_issuer = \"ci\"\ngitlab_issuer = \"ci\"\n",
            "hooks.gitlab_issuer: no gitlab-ci issuer is named `ci`",
        ),
        (
            "[hooks]\ngitlab_token_file = \"gitlab-token\"\n",
            "hooks.gitlab_token_file: no gitlab-ci issuer is configured",
        ),
        ("[hooks]\ngithub_secret = \"inline\"\n", "unknown field"),
        (
            "[hooks]\nbuildkite_token_file = \"gitlab-token\"\n",
            "hooks.buildkite_token_file: no buildkite issuer is configured",
        ),
        (
            "[hooks]\nbuildkite_token_file = \"gitlab-token\"\nbuildkite_signing_secret_file = \"gitlab-token\"\n",
            "set it or buildkite_token_file, not both",
        ),
    ];
    for (hooks, needle) in cases {
        let errs = config_with(&one, hooks, secrets.path()).unwrap_err();
        assert!(errs.contains(needle), "{needle:?} not in {errs}");
        assert!(!errs.contains(GITHUB_SECRET), "{errs}");
    }
    std::fs::write(secrets.path().join("empty"), "\n").unwrap();
    let errs = config_with(&one, "[hooks]\ngithub_secret_file = \"empty\"\n", secrets.path()).unwrap_err();
    assert!(errs.contains("is empty"), "{errs}");
    // Relative to the config's folder; one trailing newline dropped; Debug never shows it.
    let config = config_with(&one, "[hooks]\ngithub_secret_file = \"github-secret\"\n", secrets.path()).unwrap();
    let github = config.hooks.github.as_ref().unwrap();
    assert_eq!(github.secret.expose(), GITHUB_SECRET);
    assert_eq!(github.secret_file, secrets.path().join("github-secret"));
    assert!(config.hooks.gitlab.is_none());
    assert!(!format!("{config:?}").contains(GITHUB_SECRET));
}

// ---- Buildkite (issue 18) ------------------------------------------------------------------

const BUILDKITE_TOKEN: &str = "buildkite-webhook-token-for-tests";
const BUILDKITE_JOB: &str = "0184990a-477b-4fa8-9968-496074483cee";

/// A broker trusting one Buildkite issuer (`buildkite`) with the example deploy policy and the
/// `job.finished` hook on; the fixture's claims restamped for the issuer.
async fn setup_buildkite() -> (FakeIssuer, Broker, tempfile::TempDir, serde_json::Map<String, Value>) {
    setup_buildkite_with("buildkite_token_file").await
}

/// [`setup_buildkite`] with the webhook's secret under `key` (`buildkite_token_file` or
/// `buildkite_signing_secret_file`).
async fn setup_buildkite_with(key: &str) -> (FakeIssuer, Broker, tempfile::TempDir, serde_json::Map<String, Value>) {
    let issuer = FakeIssuer::start().await;
    let secrets = write_secrets();
    std::fs::write(secrets.path().join("buildkite-token"), format!("{BUILDKITE_TOKEN}\n")).unwrap();
    let yaml = std::fs::read_to_string(repo_path("policies/buildkite-deploy.yaml")).unwrap();
    let hooks = hooks_toml(secrets.path(), &[(key, "buildkite-token")], "");
    let extra = Extra { hooks_toml: hooks, ..Extra::default() };
    let broker =
        Broker::start_custom(&[("buildkite", "buildkite", &issuer)], &[("buildkite-deploy", &yaml)], &extra).await;
    let text = std::fs::read_to_string(repo_path("policies/tests/claims/buildkite-main-deploy.json")).unwrap();
    let mut claims: serde_json::Map<String, Value> = serde_json::from_str(&text).unwrap();
    claims.insert("iss".into(), json!(issuer.url));
    claims.insert("aud".into(), json!(AUDIENCE));
    claims.insert("iat".into(), json!(NOW));
    claims.insert("nbf".into(), json!(NOW));
    claims.insert("exp".into(), json!(NOW + 300));
    (issuer, broker, secrets, claims)
}

async fn buildkite_hook(broker: &Broker, token: Option<&str>, event: &str, body: &str) -> (u16, Value) {
    let mut req = broker.http.post(format!("{}/v1/hooks/buildkite", broker.url)).header("x-buildkite-event", event);
    if let Some(token) = token {
        req = req.header("x-buildkite-token", token);
    }
    status_json(req.body(body.to_string()).send().await.unwrap()).await
}

fn job_finished(job: &str) -> String {
    json!({"event": "job.finished", "job": {"id": job, "state": "passed", "exit_status": 0},
           "build": {"number": 1042}, "pipeline": {"slug": "web-deploy"}, "sender": {"name": "Buildkite"}})
    .to_string()
}

#[tokio::test]
async fn a_buildkite_job_finished_ends_the_jobs_lease_and_a_forged_or_other_event_does_not() {
    let (issuer, broker, _secrets, claims) = setup_buildkite().await;
    let (lease_id, jwt) = lease(&broker, &issuer, &claims, "buildkite-deploy").await;
    assert_eq!(
        broker.running.app.lease(&lease_id).await.unwrap().unwrap().job.as_ref(),
        format!("buildkite:{BUILDKITE_JOB}")
    );
    for token in [None, Some("wrong"), Some(&BUILDKITE_TOKEN[1..])] {
        assert_error(
            &buildkite_hook(&broker, token, "job.finished", &job_finished(BUILDKITE_JOB)).await,
            401,
            "unauthorized",
        );
    }
    let started = buildkite_hook(&broker, Some(BUILDKITE_TOKEN), "job.started", &job_finished(BUILDKITE_JOB)).await;
    assert_eq!(started, (200, json!({"ignored": "not a job.finished event"})));
    let other = buildkite_hook(
        &broker,
        Some(BUILDKITE_TOKEN),
        "job.finished",
        &job_finished("0184990a-0000-4000-8000-000000000009"),
    )
    .await;
    assert_eq!(other, (200, json!({"revoked": [], "pending": []})), "another job's end ends nothing of this one");
    assert!(active(&broker, &jwt).await);

    let finished = buildkite_hook(&broker, Some(BUILDKITE_TOKEN), "job.finished", &job_finished(BUILDKITE_JOB)).await;
    assert_eq!(finished, (200, json!({"revoked": [lease_id], "pending": []})));
    assert!(!active(&broker, &jwt).await);
    // Buildkite sends no delivery id: a redelivery ends the job again, which ends nothing more.
    let again = buildkite_hook(&broker, Some(BUILDKITE_TOKEN), "job.finished", &job_finished(BUILDKITE_JOB)).await;
    assert_eq!(again, (200, json!({"revoked": [], "pending": []})));
    // A job id that could forge another key is refused, not turned into one.
    let forged =
        buildkite_hook(&broker, Some(BUILDKITE_TOKEN), "job.finished", &job_finished("x:github:74:1:2:3")).await;
    assert_error(&forged, 400, "bad_request");
    assert_not_logged(&[BUILDKITE_TOKEN]);
}

/// `X-Buildkite-Signature: timestamp=T,signature=hex(HMAC-SHA256(secret, "T.body"))`.
fn buildkite_signature(secret: &str, timestamp: i64, body: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, format!("{timestamp}.{body}").as_bytes());
    format!("timestamp={timestamp},signature={}", ephemera::secret::hex(tag.as_ref()))
}

async fn buildkite_signed(broker: &Broker, signature: &str, body: &str) -> (u16, Value) {
    let req = broker
        .http
        .post(format!("{}/v1/hooks/buildkite", broker.url))
        .header("x-buildkite-event", "job.finished")
        .header("x-buildkite-signature", signature);
    status_json(req.body(body.to_string()).send().await.unwrap()).await
}

/// Buildkite's signed mode: the secret never travels; a signature over another body, with
/// another secret, a timestamp outside five minutes, or a token header instead, is refused.
#[tokio::test]
async fn a_signed_buildkite_delivery_ends_the_job_and_a_stale_or_forged_one_does_not() {
    let (issuer, broker, _secrets, claims) = setup_buildkite_with("buildkite_signing_secret_file").await;
    let (lease_id, jwt) = lease(&broker, &issuer, &claims, "buildkite-deploy").await;
    let body = job_finished(BUILDKITE_JOB);
    for signature in [
        buildkite_signature("another-secret", NOW, &body),
        buildkite_signature(BUILDKITE_TOKEN, NOW, &job_finished("0184990a-0000-4000-8000-000000000009")),
        buildkite_signature(BUILDKITE_TOKEN, NOW - 301, &body),
        buildkite_signature(BUILDKITE_TOKEN, NOW + 301, &body),
        format!("signature={}", "0".repeat(64)),
        "timestamp=1,signature=zz".to_string(),
    ] {
        assert_error(&buildkite_signed(&broker, &signature, &body).await, 401, "unauthorized");
    }
    let token_mode = buildkite_hook(&broker, Some(BUILDKITE_TOKEN), "job.finished", &body).await;
    assert_error(&token_mode, 401, "unauthorized");
    assert!(active(&broker, &jwt).await);
    let signed = buildkite_signed(&broker, &buildkite_signature(BUILDKITE_TOKEN, NOW - 299, &body), &body).await;
    assert_eq!(signed, (200, json!({"revoked": [lease_id], "pending": []})));
    assert!(!active(&broker, &jwt).await);
}
