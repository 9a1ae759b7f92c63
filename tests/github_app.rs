//! Issue 16: GitHub App installation tokens, end to end through the broker's HTTP API, against a
//! FAKE GitHub API (tests/common/fake_github.rs says why a fake, and what it checks as GitHub
//! does: the App JWT's signature and times, the installation's repositories and permissions).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use axum::http::Method;
use common::fake_github::{FakeGithub, FakeInstallation};
use common::replicas::unix_now;
use common::*;
use ephemera::clock::Clock;
use serde_json::{Value, json};
use std::sync::Arc;

/// The push fixture's repository is `octo-org/octo-repo` (id 74). The grant reaches it and the
/// `config` repository of the same organisation, to push and open pull requests.
const POLICY: &str = r#"
issuer: ci
match:
  repository_id: "74"
  ref: refs/heads/main
ttl: {default: 10m, max: 1h}
grants:
  gh:
    backend: gh
    owner: octo-org
    repositories: ["${repository}", config]
    permissions: {contents: write, pull_requests: write}
"#;

struct Setup {
    github: FakeGithub,
    issuer: FakeIssuer,
    broker: Broker,
}

fn installation() -> FakeInstallation {
    FakeInstallation::org(
        7,
        "octo-org",
        &["octo-repo", "config", "infra"],
        &[("contents", "write"), ("pull_requests", "write"), ("issues", "read"), ("metadata", "read")],
    )
}

async fn setup_with(installations: Vec<FakeInstallation>, policies: &[(&str, &str)]) -> Setup {
    setup_with_backend(installations, policies, "").await
}

async fn setup_with_backend(installations: Vec<FakeInstallation>, policies: &[(&str, &str)], backend: &str) -> Setup {
    let issuer = FakeIssuer::start().await;
    // The fake's clock is the broker's: App JWT times and token expiries are checked on it.
    let clock = Arc::new(ephemera::clock::ManualClock::new(NOW));
    let now_clock = clock.clone();
    let github = FakeGithub::start(Arc::new(move || ephemera::clock::Clock::now(&*now_clock)), installations).await;
    let extra = Extra { backend_toml: format!("{}{backend}", github.backend_toml("gh")), ..Extra::default() };
    let broker = Broker::start_custom_clock(&[("ci", "github-actions", &issuer)], policies, &extra, clock).await;
    Setup { github, issuer, broker }
}

async fn setup() -> Setup {
    setup_with(vec![installation()], &[("push", POLICY)]).await
}

impl Setup {
    fn token(&self) -> String {
        self.issuer.sign(&self.issuer.claims("github-push-immutable-sub.json", self.broker.clock.now()))
    }

    async fn exchange(&self, policy: &str) -> (u16, Value) {
        self.broker.exchange(&self.token(), policy).await
    }
}

#[tokio::test]
async fn the_token_carries_exactly_the_grants_repositories_and_permissions_and_never_rests_in_the_ledger() {
    let s = setup().await;
    let (status, body) = s.exchange("push").await;
    assert_eq!(status, 201, "{body}");
    let gh = &body["credentials"]["gh"];
    assert_eq!(gh["kind"], "github");
    assert_eq!(gh["revocation"], "immediate");
    assert_eq!(gh["owner"], "octo-org");
    assert_eq!(gh["repositories"], json!(["octo-repo", "config"]));
    assert_eq!(gh["permissions"], json!({"contents": "write", "pull_requests": "write"}));
    assert_eq!(gh["api_url"], s.github.url);
    // The lease ends in 10 minutes, so does the token (revoked then), not at GitHub's hour.
    assert_eq!(gh["expires_at"], body["expires_at"]);
    let token = gh["token"].as_str().unwrap().to_string();
    assert!(s.github.is_live(&token));

    let requests = s.github.token_requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].installation, 7);
    assert_eq!(requests[0].repositories, ["octo-repo", "config"], "never the installation's every repository");
    let permissions: Vec<(&str, &str)> =
        requests[0].permissions.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(permissions, [("contents", "write"), ("pull_requests", "write")], "never the App's full scope");

    // The revoke handle needs the token itself, but the ledger holds it sealed only.
    let journal = std::fs::read(s.broker.journal_path()).unwrap();
    assert!(!journal.windows(token.len()).any(|w| w == token.as_bytes()), "the token is in the journal in clear");
    assert_not_logged(&[&token]);
}

#[tokio::test]
async fn a_grant_outside_the_installation_is_refused_before_any_token_is_minted() {
    let mut selected = installation();
    selected.selected = Some(vec!["octo-repo".into()]); // `config` is not among them
    let s = setup_with(vec![selected], &[("push", POLICY)]).await;
    let reply = s.exchange("push").await;
    assert_error(&reply, 502, "backend_error");
    let message = reply.1["error"]["message"].as_str().unwrap();
    assert!(message.contains("`octo-org/config` is outside the App's installation on `octo-org`"), "{message}");
    assert!(s.github.token_requests().is_empty(), "no token was asked for");

    // A permission the installation lacks: named, with the fix, and again no token.
    let s = setup_with(
        vec![FakeInstallation::org(7, "octo-org", &["octo-repo", "config"], &[("contents", "read")])],
        &[("push", POLICY)],
    )
    .await;
    let reply = s.exchange("push").await;
    assert_error(&reply, 502, "backend_error");
    let message = reply.1["error"]["message"].as_str().unwrap();
    assert!(message.contains("not granted `contents: write` on `octo-org`"), "{message}");
    assert!(message.contains("has `contents: read`"), "{message}");
    assert!(s.github.token_requests().is_empty());

    // Not installed on the owner at all (neither organisation nor user).
    let s = setup_with(vec![FakeInstallation::org(9, "another-org", &["x"], &[])], &[("push", POLICY)]).await;
    let reply = s.exchange("push").await;
    assert_error(&reply, 502, "backend_error");
    let message = reply.1["error"]["message"].as_str().unwrap();
    assert!(message.contains("not installed on `octo-org`"), "{message}");
    assert_eq!(s.github.count(Method::GET, "/orgs/octo-org/installation"), 1);
    assert_eq!(s.github.count(Method::GET, "/users/octo-org/installation"), 1);
    // A retrying job does not make the broker ask GitHub again within the minute.
    assert_error(&s.exchange("push").await, 502, "backend_error");
    assert_eq!(s.github.count(Method::GET, "/orgs/"), 1, "the miss is cached");
}

#[tokio::test]
async fn ending_the_lease_revokes_the_token_at_github_by_revoke_and_by_expiry() {
    let s = setup().await;
    let (_, body) = s.exchange("push").await;
    let token = body["credentials"]["gh"]["token"].as_str().unwrap().to_string();
    let lease = body["lease_id"].as_str().unwrap();
    let (status, reply) = s.broker.revoke(&s.token(), json!({"lease_id": lease})).await;
    assert_eq!((status, &reply["revoked"]), (200, &json!([lease])), "{reply}");
    assert!(!s.github.is_live(&token), "the job's own revoke reached GitHub");

    // The lease's ttl passes with no revoke: the reaper ends it, and the token with it.
    let (_, body) = s.exchange("push").await;
    let token = body["credentials"]["gh"]["token"].as_str().unwrap().to_string();
    s.broker.clock.advance(10 * 60 + 1);
    s.broker.running.app.reap_once().await;
    assert!(!s.github.is_live(&token), "revoked at the lease's expiry, 50 minutes before GitHub's");
    assert_eq!(s.github.count(Method::DELETE, "/installation/token"), 2);
}

#[tokio::test]
async fn a_github_outage_during_revocation_is_retried_until_it_lands() {
    let s = setup().await;
    let (_, body) = s.exchange("push").await;
    let token = body["credentials"]["gh"]["token"].as_str().unwrap().to_string();
    let lease = body["lease_id"].as_str().unwrap().to_string();
    s.github.fail_next(Method::DELETE, "/installation/token", 503, 2);
    let (status, reply) = s.broker.revoke(&s.token(), json!({"lease_id": lease})).await;
    assert_eq!((status, &reply["pending"]), (200, &json!([lease])), "{reply}");
    assert!(s.github.is_live(&token));
    for _ in 0..10 {
        if !s.github.is_live(&token) {
            break;
        }
        s.broker.clock.advance(120);
        s.broker.running.app.reap_once().await;
    }
    assert!(!s.github.is_live(&token), "the retry landed once GitHub was back");
    assert_eq!(s.github.count(Method::DELETE, "/installation/token"), 3, "two failures, then the one that landed");
    let lease = s.broker.running.app.lease(&lease).await.unwrap().unwrap();
    assert_eq!(lease.state.as_str(), "revoked");
}

#[tokio::test]
async fn a_token_github_already_ended_counts_as_revoked() {
    let s = setup().await;
    let (_, body) = s.exchange("push").await;
    let lease = body["lease_id"].as_str().unwrap().to_string();
    s.github.fail_next(Method::DELETE, "/installation/token", 401, 1);
    let (_, reply) = s.broker.revoke(&s.token(), json!({"lease_id": lease})).await;
    assert_eq!(reply["revoked"], json!([lease]), "401: GitHub no longer knows the token: {reply}");
}

#[tokio::test]
async fn the_app_jwt_and_the_installation_are_reused_across_mints() {
    let s = setup().await;
    for _ in 0..5 {
        assert_eq!(s.exchange("push").await.0, 201);
    }
    assert_eq!(s.github.app_jwts_seen(), 1, "one App JWT signed for five mints");
    assert_eq!(s.github.count(Method::GET, "/orgs/octo-org/installation"), 1, "one installation lookup");
    assert_eq!(s.github.count(Method::POST, "/app/installations/7/access_tokens"), 5);
    // Eight minutes on, the JWT (good for ten) is renewed before GitHub would refuse it.
    s.broker.clock.advance(8 * 60);
    assert_eq!(s.exchange("push").await.0, 201);
    assert_eq!(s.github.app_jwts_seen(), 2);
}

#[tokio::test]
async fn a_spent_rate_limit_is_obeyed_and_said_and_exported() {
    let s = setup().await;
    assert_eq!(s.exchange("push").await.0, 201);
    let (_, metrics) = s.broker.get("/metrics").await;
    assert!(metrics.contains("ephemera_github_rate_limit_remaining{backend=\"gh\"} 4998"), "{metrics}");

    let reset = s.broker.clock.now() + 120;
    s.github.set_rate_limit(0, reset);
    let response = s
        .broker
        .http
        .post(format!("{}/v1/exchange", s.broker.url))
        .bearer_auth(s.token())
        .json(&json!({"policy": "push"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers().get("retry-after").unwrap(), "120");
    let reply = (response.status().as_u16(), response.json::<Value>().await.unwrap());
    assert_error(&reply, 503, "backend_rate_limited");
    let message = reply.1["error"]["message"].as_str().unwrap();
    assert!(message.contains("rate limit") && message.contains("in 120 s"), "{message}");
    let calls = s.github.requests().len();
    assert_error(&s.exchange("push").await, 503, "backend_rate_limited");
    assert_eq!(s.github.requests().len(), calls, "no call to GitHub before its reset time");
    let (_, metrics) = s.broker.get("/metrics").await;
    assert!(metrics.contains("ephemera_github_rate_limit_remaining{backend=\"gh\"} 0"), "{metrics}");

    s.github.set_rate_limit(5000, reset + 3600);
    s.broker.clock.set(reset);
    assert_eq!(s.exchange("push").await.0, 201, "calls resume at the reset time");

    // A secondary limit's `retry-after` is obeyed the same way.
    s.github.set_retry_after(Some(30));
    s.broker.clock.advance(600); // past the cached installation, so GitHub is asked
    assert_error(&s.exchange("push").await, 503, "backend_rate_limited");
}

#[tokio::test]
async fn a_token_wider_than_the_request_is_revoked_and_never_handed_out() {
    let s = setup().await;
    s.github.widen_replies("administration", "write");
    let reply = s.exchange("push").await;
    assert_error(&reply, 502, "backend_error");
    let issued = s.github.token_requests()[0].token.clone().unwrap();
    assert!(!s.github.is_live(&issued), "the over-wide token was revoked on the spot");
}

#[tokio::test]
async fn a_template_naming_another_owners_repository_is_denied_before_github_is_asked() {
    let policy = POLICY.replace("owner: octo-org", "owner: other-org");
    let s = setup_with(vec![installation()], &[("push", &policy)]).await;
    let reply = s.exchange("push").await;
    assert_error(&reply, 403, "policy_denied");
    let message = reply.1["error"]["message"].as_str().unwrap();
    assert!(message.contains("claim `repository`") && message.contains("grant `gh`"), "{message}");
    assert!(s.github.requests().is_empty());
}

#[tokio::test]
async fn every_replica_can_revoke_what_another_minted_and_a_restart_resumes_revocation() {
    // The sealing key comes from the App's key, so a restarted broker (or another replica with
    // the same key file) opens the handles it finds in the ledger.
    let s = setup().await;
    let (_, body) = s.exchange("push").await;
    let token = body["credentials"]["gh"]["token"].as_str().unwrap().to_string();
    let lease = body["lease_id"].as_str().unwrap().to_string();
    s.github.fail_next(Method::DELETE, "/installation/token", 500, 1);
    let (_, reply) = s.broker.revoke(&s.token(), json!({"lease_id": lease})).await;
    assert_eq!(reply["pending"], json!([lease]));
    let Setup { github, broker, issuer: _issuer } = s;
    let broker = broker.restart(None).await;
    assert!(!github.is_live(&token), "the restarted broker resumed the pending revocation");
    let lease = broker.running.app.lease(&lease).await.unwrap().unwrap();
    assert_eq!(lease.state.as_str(), "revoked");
}

/// The real CLI's `--format git-credential` output, read by real git through its credential
/// helper protocol (`git credential fill`, what `git push` runs): git gets the token GitHub
/// issued, and the user name GitHub expects with it.
#[tokio::test]
async fn git_reads_the_token_through_the_clis_git_credential_output() {
    let s = setup().await;
    // git drops a credential whose `password_expiry_utc` has passed by its own (real) clock, so
    // this test's clock is the real one.
    let real_now = unix_now();
    s.broker.clock.set(real_now);
    let dir = tempfile::tempdir().unwrap();
    let url = s.broker.url.clone();
    let out =
        run_cli(&["exchange", "--broker", &url, "--policy", "push", "--format", "git-credential"], &s.token()).await;
    assert!(
        out.status.success(),
        "{:?} {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let cred = dir.path().join("gh.cred");
    std::fs::write(&cred, &out.stdout).unwrap();
    let issued = s.github.token_requests()[0].token.clone().unwrap();
    let written = String::from_utf8(out.stdout.clone()).unwrap();
    assert!(written.ends_with(&format!("password_expiry_utc={}\n", real_now + 600)), "the lease's end: {written}");

    let helper = format!("!f() {{ test \"$1\" = get && cat '{}'; }}; f", cred.display());
    let mut git = std::process::Command::new("git")
        .args(["-c", &format!("credential.helper={helper}"), "credential", "fill"])
        .env("HOME", dir.path())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    git.stdin.take().unwrap().write_all(b"protocol=https\nhost=github.com\npath=octo-org/config.git\n\n").unwrap();
    let filled = git.wait_with_output().unwrap();
    let text = String::from_utf8(filled.stdout).unwrap();
    assert!(text.contains("username=x-access-token\n"), "{text}");
    assert!(text.contains(&format!("password={issued}\n")), "{text}");
    assert!(s.github.is_live(&issued));
}

#[tokio::test]
async fn a_missing_or_non_rsa_app_key_stops_the_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    let not_rsa = dir.path().join("not-rsa.pem");
    std::fs::write(&not_rsa, "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n").unwrap();
    for (file, says) in [("missing.pem", "No such file"), ("not-rsa.pem", "not an RSA private key")] {
        let toml = format!(
            "listen = \"127.0.0.1:0\"\n[backends.gh]\ntype = \"github-app\"\napp_id = 1\nprivate_key_file = \"{file}\"\n"
        );
        let config = ephemera::config::Config::parse(&toml, dir.path()).unwrap();
        let clock = Arc::new(ephemera::clock::ManualClock::new(NOW));
        let err = match ephemera::server::start(ephemera::server::Options::new(config, false, clock)).await {
            Ok(_) => panic!("started with {file}"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("backend gh: private_key_file") && err.contains(file) && err.contains(says), "{err}");
    }
}

/// `max_concurrent_requests` bounds the calls in flight to GitHub: the fake holds every token
/// request at a gate, so the count waiting there is the count the broker let out at once.
#[tokio::test]
async fn calls_to_github_in_flight_are_bounded_by_max_concurrent_requests() {
    let s = setup_with_backend(vec![installation()], &[("push", POLICY)], "max_concurrent_requests = 2\n").await;
    assert_eq!(s.exchange("push").await.0, 201, "the installation is looked up and cached first");
    let gate = s.github.close_gate();
    let s = Arc::new(s);
    let exchanges: Vec<_> = (0..6)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.exchange("push").await.0 })
        })
        .collect();
    // Wait until two requests are held, then give the others every chance to arrive.
    while s.github.in_flight().0 < 2 {
        tokio::task::yield_now().await;
    }
    for _ in 0..1000 {
        tokio::task::yield_now().await;
    }
    assert_eq!(s.github.in_flight(), (2, 2), "two in flight, the other four wait in the broker");
    gate.add_permits(6);
    for exchange in exchanges {
        assert_eq!(exchange.await.unwrap(), 201);
    }
    assert_eq!(s.github.in_flight().1, 2, "never more than two at once");
}

/// The reaper runs the revocations of a burst of expiries 8 at a time
/// (`app::ending::REAP_CONCURRENCY`), not one GitHub round trip after another, and not all at
/// once either. The fake holds every revocation at a gate, so the count waiting there is the
/// count the reaper let out at once (the backend's own bound is raised past it).
#[tokio::test]
async fn the_reaper_revokes_a_burst_of_expired_leases_eight_at_a_time() {
    let s = setup_with_backend(vec![installation()], &[("push", POLICY)], "max_concurrent_requests = 32\n").await;
    let mut tokens = Vec::new();
    for _ in 0..12 {
        let (status, body) = s.exchange("push").await;
        assert_eq!(status, 201, "{body}");
        tokens.push(body["credentials"]["gh"]["token"].as_str().unwrap().to_string());
    }
    s.broker.clock.advance(10 * 60 + 1);
    let gate = s.github.close_gate();
    let s = Arc::new(s);
    let reaping = tokio::spawn({
        let s = s.clone();
        async move { s.broker.running.app.reap_once().await }
    });
    // Until eight are held (a reaper running them one by one never gets there), then every
    // chance for more to arrive.
    for _ in 0..100_000 {
        if s.github.in_flight().0 >= 8 {
            break;
        }
        tokio::task::yield_now().await;
    }
    for _ in 0..1000 {
        tokio::task::yield_now().await;
    }
    assert_eq!(s.github.in_flight(), (8, 8), "eight revocations at GitHub at once, four waiting in the broker");
    gate.add_permits(12);
    reaping.await.unwrap();
    assert_eq!(s.github.in_flight().1, 8, "never more than eight at once");
    assert!(tokens.iter().all(|t| !s.github.is_live(t)), "every expired lease's token is revoked");
}
