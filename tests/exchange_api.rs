//! The exchange API over real HTTP: decisions, bodies, revocation, introspection, metrics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::json;

async fn setup() -> (FakeIssuer, Broker) {
    let issuer = FakeIssuer::start().await;
    let broker = Broker::start(&issuer, &[("deploy", DEPLOY_POLICY), ("push", PUSH_POLICY)]).await;
    (issuer, broker)
}

#[tokio::test]
async fn exchange_returns_201_with_the_design_body_and_a_verifiable_jwt() {
    let (issuer, broker) = setup().await;
    let token = issuer.sign(&issuer.claims("github-environment-deploy.json", NOW));
    let (status, body) = broker.exchange(&token, "deploy").await;
    assert_eq!(status, 201, "{body}");
    assert!(body["lease_id"].as_str().unwrap().starts_with("lse_"));
    assert_eq!(body["policy"], "deploy");
    assert_eq!(body["expires_at"], ephemera::clock::rfc3339(NOW + 900), "default ttl 15m");
    let api = &body["credentials"]["api"];
    assert_eq!(api["kind"], "jwt");
    assert_eq!(api["revocation"], "immediate");
    let jwt = api["token"].as_str().unwrap();
    let intro = broker.introspect(jwt).await;
    assert_eq!(intro["active"], true, "{intro}");
    assert_eq!(intro["sub"], "github:74:7712340001:2:96193868770");
    assert_eq!(intro["aud"], "https://api.internal.example");
    assert_eq!(intro["lease_id"], body["lease_id"]);
    // The grant's templated claims come from verified claims.
    let payload: serde_json::Value =
        serde_json::from_slice(&ephemera::ids::b64url_decode(jwt.split('.').nth(1).unwrap()).unwrap()).unwrap();
    assert_eq!(payload["repository"], "octo-org/octo-repo");
    assert_eq!(payload["environment"], "prod");
    assert_eq!(payload["iss"], broker.running.app.public_url());
    assert_eq!(payload["exp"], NOW + 900);
    // The published JWKS verifies it (kid matches).
    let (_, jwks) = broker.get("/.well-known/jwks.json").await;
    let jwks: serde_json::Value = serde_json::from_str(&jwks).unwrap();
    let header: serde_json::Value =
        serde_json::from_slice(&ephemera::ids::b64url_decode(jwt.split('.').next().unwrap()).unwrap()).unwrap();
    assert_eq!(jwks["keys"][0]["kid"], header["kid"]);
    assert_eq!(header["alg"], "ES256");
}

#[tokio::test]
async fn a_pull_request_target_token_is_denied_naming_the_claim_not_the_value() {
    let (issuer, broker) = setup().await;
    let token = issuer.sign(&issuer.claims("github-pull-request-from-fork.json", NOW));
    let reply = broker.exchange(&token, "push").await;
    assert_error(&reply, 403, "policy_denied");
    let message = reply.1["error"]["message"].as_str().unwrap();
    assert!(message.contains("`event_name`"), "{message}");
    assert!(!message.contains("pull_request"), "the rule's values leaked: {message}");
}

#[tokio::test]
async fn a_failed_match_rule_names_the_claim() {
    let (issuer, broker) = setup().await;
    let mut claims = issuer.claims("github-environment-deploy.json", NOW);
    claims.insert("environment".into(), json!("dev"));
    let reply = broker.exchange(&issuer.sign(&claims), "deploy").await;
    assert_error(&reply, 403, "policy_denied");
    assert_eq!(reply.1["error"]["message"], "claim `environment` did not match policy `deploy`");
}

#[tokio::test]
async fn a_self_hosted_runner_hits_the_deny_rule() {
    let (issuer, broker) = setup().await;
    let mut claims = issuer.claims("github-environment-deploy.json", NOW);
    claims.insert("runner_environment".into(), json!("self-hosted"));
    let reply = broker.exchange(&issuer.sign(&claims), "deploy").await;
    assert_error(&reply, 403, "policy_denied");
    assert!(reply.1["error"]["message"].as_str().unwrap().contains("`runner_environment` matched a deny rule"));
}

#[tokio::test]
async fn an_unknown_policy_is_denied_exactly_like_a_policy_of_another_issuer() {
    let (issuer, broker) = setup().await;
    let token = issuer.sign(&issuer.claims("github-push-immutable-sub.json", NOW));
    let unknown = broker.exchange(&token, "no-such-policy").await;
    assert_error(&unknown, 403, "policy_denied");
    assert_eq!(unknown.1["error"]["message"], "claim `iss` did not match policy `no-such-policy`");
    let traversal = broker.exchange(&token, "../../etc/passwd").await;
    assert_error(&traversal, 403, "policy_denied");
    assert_eq!(traversal.1["error"]["message"], "claim `iss` did not match policy `../../etc/passwd`");
}

#[tokio::test]
async fn a_ttl_above_the_policy_max_is_denied_not_clamped() {
    let (issuer, broker) = setup().await;
    let token = issuer.sign(&issuer.claims("github-environment-deploy.json", NOW));
    let reply = broker.exchange_raw(&token, r#"{"policy":"deploy","ttl":"2h"}"#).await;
    assert_error(&reply, 403, "policy_denied");
    assert!(reply.1["error"]["message"].as_str().unwrap().contains("above the maximum 1h"));
    let (status, body) = broker.exchange_raw(&token, r#"{"policy":"deploy","ttl":"5m"}"#).await;
    assert_eq!(status, 201);
    assert_eq!(body["expires_at"], ephemera::clock::rfc3339(NOW + 300));
}

#[tokio::test]
async fn bad_bodies_get_400_or_413_with_the_error_shape() {
    let (issuer, broker) = setup().await;
    let token = issuer.sign(&issuer.claims("github-environment-deploy.json", NOW));
    assert_error(&broker.exchange_raw(&token, "{not json").await, 400, "bad_request");
    let unknown_field = broker.exchange_raw(&token, r#"{"policy":"deploy","polcy":"x"}"#).await;
    assert_error(&unknown_field, 400, "bad_request");
    assert!(unknown_field.1["error"]["message"].as_str().unwrap().contains("unknown field `polcy`"));
    assert_error(&broker.exchange_raw(&token, r#"{"ttl":"5m"}"#).await, 400, "bad_request");
    // The fields in order, as an array: serde would read the request from it; named fields only.
    let array = broker.exchange_raw(&token, r#"["deploy", "5m"]"#).await;
    assert_error(&array, 400, "bad_request");
    assert_eq!(array.1["error"]["message"], "the body is JSON, but not an object");
    let bad_ttl = broker.exchange_raw(&token, r#"{"policy":"deploy","ttl":"eyJsecret-looking"}"#).await;
    assert_error(&bad_ttl, 400, "bad_request");
    assert!(!bad_ttl.1.to_string().contains("eyJsecret"), "the ttl value was echoed");
    assert_error(&broker.exchange_raw(&token, r#"{"policy":"deploy","ttl":"0s"}"#).await, 400, "bad_request");
    // A pasted secret in a value (or as an odd key) is never echoed back, nor logged.
    for body in [
        r#""eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LXBheWxvYWQ.c2ln""#,
        r#"{"policy":["eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LXBheWxvYWQ"]}"#,
        r#"{"eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LXBheWxvYWQ":1}"#,
    ] {
        let reply = broker.exchange_raw(&token, body).await;
        assert_error(&reply, 400, "bad_request");
        assert!(!reply.1.to_string().contains("c2VjcmV0LXBheWxvYWQ"), "echoed: {}", reply.1);
    }
    assert_not_logged(&["x.c2VjcmV0LXBheWxvYWQ.y"]);
    let two_mib = format!(r#"{{"policy":"deploy","x":"{}"}}"#, "a".repeat(2 * 1024 * 1024));
    assert_error(&broker.exchange_raw(&token, &two_mib).await, 413, "payload_too_large");
}

#[tokio::test]
async fn a_chunked_body_without_length_is_cut_off_at_the_limit() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_issuer, broker) = setup().await;
    let mut stream = tokio::net::TcpStream::connect(broker.running.addr).await.unwrap();
    let head =
        "POST /v1/exchange HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer x\r\nTransfer-Encoding: chunked\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("1000\r\n{}\r\n", " ".repeat(4096));
    for _ in 0..40 {
        // The broker may answer and stop reading before all 160 KiB are sent; that is the point.
        if stream.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut response = vec![0u8; 1024];
    let n = stream.read(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
}

#[tokio::test]
async fn revoke_ends_the_callers_leases_and_introspection_goes_inactive() {
    let (issuer, broker) = setup().await;
    let token = issuer.sign(&issuer.claims("github-environment-deploy.json", NOW));
    let (_, first) = broker.exchange(&token, "deploy").await;
    let again = issuer.sign(&issuer.claims("github-environment-deploy.json", NOW));
    let (_, second) = broker.exchange(&again, "deploy").await;
    let jwt = first["credentials"]["api"]["token"].as_str().unwrap();
    let (status, reply) = broker.revoke(&token, json!({})).await;
    assert_eq!(status, 200);
    let mut revoked: Vec<String> = serde_json::from_value(reply["revoked"].clone()).unwrap();
    revoked.sort();
    let mut want =
        vec![first["lease_id"].as_str().unwrap().to_string(), second["lease_id"].as_str().unwrap().to_string()];
    want.sort();
    assert_eq!(revoked, want);
    assert_eq!(broker.introspect(jwt).await["active"], false);
    // Idempotent, and nothing left to end.
    assert_eq!(broker.revoke(&token, json!({})).await.1, json!({"revoked": [], "pending": []}));
    let (status, again) = broker.revoke(&token, json!({"lease_id": first["lease_id"]})).await;
    assert_eq!((status, &again["revoked"][0]), (200, &first["lease_id"]));
}

#[tokio::test]
async fn another_jobs_lease_or_an_unknown_id_is_neither_revoked_nor_reported() {
    let (issuer, broker) = setup().await;
    let victim = issuer.sign(&issuer.claims("github-environment-deploy.json", NOW));
    let (_, lease) = broker.exchange(&victim, "deploy").await;
    let jwt = lease["credentials"]["api"]["token"].as_str().unwrap();
    let attacker = issuer.sign(&issuer.claims("github-push-immutable-sub.json", NOW));
    for body in
        [json!({"lease_id": lease["lease_id"]}), json!({"lease_id": "lse_00000000000000000000000000"}), json!({})]
    {
        let (status, reply) = broker.revoke(&attacker, body).await;
        assert_eq!((status, reply), (200, json!({"revoked": [], "pending": []})));
    }
    assert_eq!(broker.introspect(jwt).await["active"], true, "another job's revoke ended the lease");
}

#[tokio::test]
async fn one_lease_can_be_revoked_by_id_leaving_the_others() {
    let (issuer, broker) = setup().await;
    let token = issuer.sign(&issuer.claims("github-environment-deploy.json", NOW));
    let (_, a) = broker.exchange(&token, "deploy").await;
    let (_, b) = broker.exchange(&issuer.sign(&issuer.claims("github-environment-deploy.json", NOW)), "deploy").await;
    let (_, reply) = broker.revoke(&token, json!({"lease_id": a["lease_id"]})).await;
    assert_eq!(reply["revoked"], json!([a["lease_id"]]));
    assert_eq!(broker.introspect(a["credentials"]["api"]["token"].as_str().unwrap()).await["active"], false);
    assert_eq!(broker.introspect(b["credentials"]["api"]["token"].as_str().unwrap()).await["active"], true);
    // Revoking it again reports it, but it ended once.
    let (_, again) = broker.revoke(&token, json!({"lease_id": a["lease_id"]})).await;
    assert_eq!(again["revoked"], json!([a["lease_id"]]));
    let metrics = broker.running.app.metrics_text().await;
    assert!(metrics.lines().any(|l| l == r#"ephemera_leases_ended_total{reason="job"} 1"#), "{metrics}");
}

#[tokio::test]
async fn a_lease_expires_by_the_injected_clock() {
    let (issuer, broker) = setup().await;
    let token = issuer.sign(&issuer.claims("github-environment-deploy.json", NOW));
    let (_, body) = broker.exchange_raw(&token, r#"{"policy":"deploy","ttl":"5m"}"#).await;
    let jwt = body["credentials"]["api"]["token"].as_str().unwrap();
    broker.clock.advance(299);
    assert_eq!(broker.introspect(jwt).await["active"], true);
    broker.clock.advance(1);
    assert_eq!(broker.introspect(jwt).await["active"], false);
    broker.running.app.reap_once().await;
    let lease = broker.running.app.lease(body["lease_id"].as_str().unwrap()).await.unwrap().unwrap();
    assert_eq!(lease.state, ephemera::ledger::LeaseState::Expired);
    let metrics = broker.running.app.metrics_text().await;
    assert!(metrics.lines().any(|l| l == r#"ephemera_leases_ended_total{reason="expired"} 1"#), "{metrics}");
}

#[tokio::test]
async fn a_forged_or_foreign_jwt_is_never_active() {
    let (issuer, broker) = setup().await;
    let token = issuer.sign(&issuer.claims("github-environment-deploy.json", NOW));
    let (_, body) = broker.exchange(&token, "deploy").await;
    let jwt = body["credentials"]["api"]["token"].as_str().unwrap();
    let parts: Vec<&str> = jwt.split('.').collect();
    let mut payload: serde_json::Value =
        serde_json::from_slice(&ephemera::ids::b64url_decode(parts[1]).unwrap()).unwrap();
    payload["exp"] = json!(NOW + 99_999);
    let forged = format!("{}.{}.{}", parts[0], ephemera::ids::b64url(payload.to_string().as_bytes()), parts[2]);
    assert_eq!(broker.introspect(&forged).await["active"], false);
    assert_eq!(broker.introspect(&token).await["active"], false, "a CI token is not a broker JWT");
    assert_eq!(broker.introspect("garbage").await["active"], false);
}

#[tokio::test]
async fn introspection_outside_dev_mode_needs_the_admin_token() {
    let (_issuer, broker) = setup().await;
    let resp = broker.http.post(format!("{}/v1/introspect", broker.url)).body("token=x").send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
}

#[tokio::test]
async fn metrics_count_exchanges_by_policy_and_outcome_with_bounded_labels() {
    let (issuer, broker) = setup().await;
    let token = issuer.sign(&issuer.claims("github-environment-deploy.json", NOW));
    broker.exchange(&token, "deploy").await;
    broker.exchange(&token, "made-up-name-1").await;
    broker.exchange("garbage", "deploy").await;
    let (status, text) = broker.get("/metrics").await;
    assert_eq!(status, 200);
    assert!(text.contains(r#"ephemera_exchanges_total{policy="deploy",outcome="issued"} 1"#), "{text}");
    assert!(text.contains(r#"ephemera_exchanges_total{policy="deploy",outcome="invalid_token"} 1"#), "{text}");
    assert!(text.contains(r#"ephemera_exchanges_total{policy="unknown",outcome="policy_denied"} 1"#), "{text}");
    assert!(!text.contains("made-up-name"), "a caller-chosen name became a label");
    assert!(text.contains("ephemera_exchange_duration_seconds_count 3"), "{text}");
    assert!(text.contains("ephemera_leases_live 1"), "{text}");
}

#[tokio::test]
async fn operational_endpoints_answer_and_unknown_routes_get_the_error_shape() {
    let (_issuer, broker) = setup().await;
    assert_eq!(broker.get("/healthz").await.0, 200);
    let (status, ready) = broker.get("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert!(ready.contains(r#""ci":true"#), "{ready}");
    let (status, body) = broker.get("/nope").await;
    assert_eq!(status, 404);
    assert!(body.contains(r#""code":"not_found""#));
    let (status, body) = broker.get("/v1/exchange").await;
    assert_eq!(status, 405);
    assert!(body.contains(r#""code":"method_not_allowed""#));
    let (status, discovery) = broker.get("/.well-known/openid-configuration").await;
    assert_eq!(status, 200);
    assert!(discovery.contains("/.well-known/jwks.json"));
}

#[tokio::test]
async fn a_gitlab_protected_branch_job_gets_the_example_release_grant_and_a_fork_mr_does_not() {
    let issuer = FakeIssuer::start().await;
    let yaml = std::fs::read_to_string(repo_path("policies/gitlab-release.yaml")).unwrap();
    let broker = Broker::start_issuers(&[("gitlab", "gitlab-ci", &issuer)], &[("gitlab-release", &yaml)]).await;
    let token = issuer.sign(&issuer.claims("gitlab-protected-branch.json", NOW));
    let (status, body) = broker.exchange(&token, "gitlab-release").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["job"], "gitlab:20:302");
    assert_eq!(body["credentials"]["registry"]["kind"], "jwt");
    // Fork MR pipeline: `aud` is an array, config claims are null, job_project_id differs.
    let mut fork = issuer.claims("gitlab-fork-merge-request.json", NOW);
    fork.insert("aud".into(), json!(["https://vault.example.com", AUDIENCE]));
    let reply = broker.exchange(&issuer.sign(&fork), "gitlab-release").await;
    assert_error(&reply, 403, "policy_denied");
    assert!(
        reply.1["error"]["message"].as_str().unwrap().contains("`pipeline_source` matched a deny rule"),
        "{}",
        reply.1
    );
}

#[tokio::test]
async fn two_issuers_of_one_platform_prefix_the_job_key_with_the_issuer_name() {
    let public = FakeIssuer::start().await;
    let enterprise = FakeIssuer::start().await;
    let policy = PUSH_POLICY.replace("issuer: ci", "issuer: ghes");
    let broker = Broker::start_issuers(
        &[("github", "github-actions", &public), ("ghes", "github-actions", &enterprise)],
        &[("push", &policy)],
    )
    .await;
    let token = enterprise.sign(&enterprise.claims("github-push-immutable-sub.json", NOW));
    let (status, body) = broker.exchange(&token, "push").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["job"], "ghes:github:74:32291736541:1:96193868771");
    // The same claims from the other issuer are another job, and the policy is bound to `ghes`.
    let other = public.sign(&public.claims("github-push-immutable-sub.json", NOW));
    let reply = broker.exchange(&other, "push").await;
    assert_error(&reply, 403, "policy_denied");
    assert_eq!(broker.revoke(&other, json!({})).await.1, json!({"revoked": [], "pending": []}));
}

#[tokio::test]
async fn previous_signing_keys_are_published_but_never_sign() {
    let issuer = FakeIssuer::start().await;
    let keys = tempfile::tempdir().unwrap();
    let old_path = keys.path().join("old.pk8");
    let old = ephemera::mint::jwt::JwtSigner::load_or_generate(&old_path, "x").unwrap();
    let extra = Extra {
        backend_toml: format!("previous_signing_key_files = [{:?}]", old_path.display().to_string()),
        ..Extra::default()
    };
    let broker = Broker::start_custom(&[("ci", "github-actions", &issuer)], &[("deploy", DEPLOY_POLICY)], &extra).await;
    let (_, jwks) = broker.get("/.well-known/jwks.json").await;
    let jwks: serde_json::Value = serde_json::from_str(&jwks).unwrap();
    let kids: Vec<&str> = jwks["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap()).collect();
    assert_eq!(kids.len(), 2, "{jwks}");
    assert_eq!(kids[1], old.kid(), "the previous key is published after the current one");
    let token = issuer.sign(&issuer.claims("github-environment-deploy.json", NOW));
    let (_, body) = broker.exchange(&token, "deploy").await;
    let jwt = body["credentials"]["api"]["token"].as_str().unwrap();
    let header: serde_json::Value =
        serde_json::from_slice(&ephemera::ids::b64url_decode(jwt.split('.').next().unwrap()).unwrap()).unwrap();
    assert_eq!(header["kid"], kids[0], "a previous key signed");
}

#[tokio::test]
async fn a_missing_previous_signing_key_stops_the_start() {
    let issuer = FakeIssuer::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    let toml = format!(
        "listen = \"127.0.0.1:0\"\n[[issuers]]\nname = \"ci\"\nplatform = \"github-actions\"\nurl = \"{}\"\n\
         [backends.jwt]\ntype = \"jwt\"\nprevious_signing_key_files = [\"gone.pk8\"]\n",
        issuer.url
    );
    let config = ephemera::config::Config::parse(&toml, dir.path()).unwrap();
    let clock = std::sync::Arc::new(ephemera::clock::ManualClock::new(NOW));
    let err = ephemera::server::start(ephemera::server::Options::new(config, false, clock)).await.err().unwrap();
    assert!(err.contains("gone.pk8"), "{err}");
}

#[tokio::test]
async fn the_env_format_is_sourceable_by_sh_and_carries_the_credentials() {
    let (issuer, broker) = setup().await;
    let token = issuer.sign(&issuer.claims("github-environment-deploy.json", NOW));
    let resp = broker
        .http
        .post(format!("{}/v1/exchange", broker.url))
        .bearer_auth(&token)
        .header("accept", "text/plain")
        .body(r#"{"policy":"deploy"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let env = resp.text().await.unwrap();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{env}\nprintf '%s\\n%s\\n%s' \"$EPHEMERA_LEASE_ID\" \"$EPHEMERA_API_KIND\" \"$EPHEMERA_API_TOKEN\""
        ))
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("lse_"), "{env}");
    assert_eq!(lines[1], "jwt");
    assert_eq!(broker.introspect(lines[2]).await["active"], true);
    // `?format=env` works too, and errors stay JSON.
    let fresh = issuer.sign(&issuer.claims("github-environment-deploy.json", NOW));
    let resp = broker
        .http
        .post(format!("{}/v1/exchange?format=env", broker.url))
        .bearer_auth(&fresh)
        .body(r#"{"policy":"deploy"}"#)
        .send()
        .await
        .unwrap();
    assert!(resp.text().await.unwrap().contains("export EPHEMERA_API_TOKEN='eyJ"));
    let resp = broker
        .http
        .post(format!("{}/v1/exchange?format=env", broker.url))
        .bearer_auth("bad")
        .body(r#"{"policy":"deploy"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    assert!(resp.text().await.unwrap().contains(r#""code":"invalid_token""#));
}

/// Issue 18: a `generic` issuer (any OIDC issuer) whose config names its job-key claims
/// (`job_key_claims`) and the id a policy must bind (`identity_claims`). Its jobs get leases keyed
/// by those claims' values (a `:` in a value cannot pose as two values), revoke their own
/// leases and not another run's, and a token lacking a job-key claim is refused (the log names it).
#[tokio::test]
async fn a_generic_issuer_keys_jobs_by_the_claims_its_config_names() {
    let issuer = FakeIssuer::start().await;
    let policy = "issuer: ci\nmatch: {project_uuid: \"7f1c\"}\nttl: {default: 5m, max: 10m}\n\
                  grants:\n  api: {backend: jwt, audience: https://api.example}\n";
    let extra = Extra {
        issuer_toml: "job_key_claims = [\"project_uuid\", \"run\"]\nidentity_claims = [\"project_uuid\"]".into(),
        ..Extra::default()
    };
    init_log_capture();
    let broker = Broker::start_custom(&[("ci", "generic", &issuer)], &[("deploy", policy)], &extra).await;
    let job = |run: &str| {
        let mut c = issuer.claims("github-push-immutable-sub.json", NOW);
        c.insert("project_uuid".into(), json!("7f1c"));
        c.insert("run".into(), json!(run));
        issuer.sign(&c)
    };
    let (first, second) = (job("https://ci.example/runs/1"), job("https://ci.example/runs/1:2"));
    let (status, body) = broker.exchange(&first, "deploy").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["job"], "generic:7f1c:https%3A//ci.example/runs/1");
    let (status, other) = broker.exchange(&second, "deploy").await;
    assert_eq!(status, 201, "{other}");
    assert_eq!(other["job"], "generic:7f1c:https%3A//ci.example/runs/1%3A2");
    let (_, revoked) = broker.revoke(&first, json!({})).await;
    assert_eq!(revoked["revoked"], json!([body["lease_id"]]), "only the first run's lease ends");

    let mut without_run = issuer.claims("github-push-immutable-sub.json", NOW);
    without_run.insert("project_uuid".into(), json!("7f1c"));
    let reply = broker.exchange(&issuer.sign(&without_run), "deploy").await;
    assert_error(&reply, 401, "invalid_token");
    // The reply says no more than any refused token's; the log names the claim.
    assert!(captured_logs().contains("required claim `run` is missing"), "{}", captured_logs());
}
