//! Bad tokens, each one a scenario, against a real issuer (FakeIssuer: RSA keys, discovery and
//! JWKS over HTTP) and the broker's real HTTP API. Every rejection is 401 `invalid_token` with
//! one fixed message, and no token reaches the logs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use ephemera::ids::b64url;
use serde_json::{Value, json};

async fn setup() -> (FakeIssuer, Broker) {
    let issuer = FakeIssuer::start().await;
    let broker = Broker::start(&issuer, &[("deploy", DEPLOY_POLICY), ("push", PUSH_POLICY)]).await;
    (issuer, broker)
}

fn deploy_claims(issuer: &FakeIssuer) -> serde_json::Map<String, Value> {
    issuer.claims("github-environment-deploy.json", NOW)
}

/// Exchanges `token` for the deploy policy and asserts the fixed 401.
async fn assert_rejected(broker: &Broker, token: &str) {
    let reply = broker.exchange(token, "deploy").await;
    assert_error(&reply, 401, "invalid_token");
    assert_eq!(reply.1["error"]["message"], "the token is not valid for this broker", "one fixed message, no detail");
    assert_not_logged(&[token]);
}

#[tokio::test]
async fn a_valid_github_token_is_accepted() {
    let (issuer, broker) = setup().await;
    let token = issuer.sign(&deploy_claims(&issuer));
    let (status, body) = broker.exchange(&token, "deploy").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["job"], "github:74:7712340001:2:96193868770");
    assert_not_logged(&[&token, body["credentials"]["api"]["token"].as_str().unwrap()]);
}

#[tokio::test]
async fn alg_none_is_refused() {
    let (issuer, broker) = setup().await;
    let header = b64url(br#"{"alg":"none","typ":"JWT","kid":"rsa-a"}"#);
    let payload = b64url(Value::Object(deploy_claims(&issuer)).to_string().as_bytes());
    assert_rejected(&broker, &format!("{header}.{payload}.")).await;
}

#[tokio::test]
async fn hs256_signed_with_the_issuers_public_key_is_refused() {
    let (issuer, broker) = setup().await;
    assert_rejected(&broker, &issuer.sign_hs256_with_public_key(&deploy_claims(&issuer))).await;
}

/// RFC 7519 §7.2: the header is a JSON object. serde reads a struct from an array of its fields
/// too (all of them, in order), and the signature covers whatever the header's bytes are. A
/// correctly signed `["RS256", "rsa-a", null, …]` header passed our own header parse before the
/// object check, and was refused only because jsonwebtoken's header struct orders its fields
/// differently (`typ` first, so its `alg` read "rsa-a"); now it is refused by rule
/// (`identity::verify`'s unit test shows the check itself).
#[tokio::test]
async fn a_signed_header_written_as_an_array_of_its_fields_is_refused() {
    let (issuer, broker) = setup().await;
    let kid = issuer.signing_key().kid.clone();
    let token = issuer.sign_with_header(&json!(["RS256", kid, null, null, null, null, null]), &deploy_claims(&issuer));
    assert_rejected(&broker, &token).await;
    let token = issuer.sign_with_header(&json!({"alg": "RS256", "kid": kid}), &deploy_claims(&issuer));
    assert_eq!(broker.exchange(&token, "deploy").await.0, 201, "the same header as an object is taken");
}

#[tokio::test]
async fn a_jwk_header_naming_its_own_key_is_refused() {
    let (issuer, broker) = setup().await;
    let jwk = issuer.signing_key().jwk();
    let token = issuer.sign_with_header(&json!({"alg": "RS256", "kid": "rsa-a", "jwk": jwk}), &deploy_claims(&issuer));
    assert_rejected(&broker, &token).await;
}

#[tokio::test]
async fn a_jku_header_is_refused_and_never_fetched() {
    let (issuer, broker) = setup().await;
    let elsewhere = FakeIssuer::start().await;
    let jku = format!("{}/.well-known/jwks", elsewhere.url);
    let token = issuer.sign_with_header(&json!({"alg": "RS256", "kid": "rsa-a", "jku": jku}), &deploy_claims(&issuer));
    assert_rejected(&broker, &token).await;
    assert_eq!(elsewhere.requests(), 0, "the jku URL was contacted");
}

#[tokio::test]
async fn an_unknown_kid_refetches_once_then_not_again_within_the_cooldown() {
    let (issuer, broker) = setup().await;
    let baseline = issuer.jwks_fetches();
    issuer.sign_with("rsa-b"); // not published
    let token = issuer.sign(&deploy_claims(&issuer));
    assert_rejected(&broker, &token).await;
    assert_eq!(issuer.jwks_fetches(), baseline + 1, "exactly one refetch for the unknown kid");
    assert_rejected(&broker, &token).await;
    assert_eq!(issuer.jwks_fetches(), baseline + 1, "a second request within the cooldown fetched again");
    // After the cooldown, a rotation that has since been published is picked up.
    issuer.publish(&["rsa-a", "rsa-b"]);
    broker.clock.advance(61);
    let fresh = issuer.sign(&issuer.claims("github-environment-deploy.json", NOW + 61));
    let (status, body) = broker.exchange(&fresh, "deploy").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(issuer.jwks_fetches(), baseline + 2);
}

#[tokio::test]
async fn a_storm_of_unknown_kids_causes_one_fetch() {
    let (issuer, broker) = setup().await;
    let baseline = issuer.jwks_fetches();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let claims = deploy_claims(&issuer);
        let token = issuer.sign_with_header(&json!({"alg": "RS256", "kid": format!("made-up-{i}")}), &claims);
        let (http, url) = (broker.http.clone(), broker.url.clone());
        tasks.push(tokio::spawn(async move {
            let body = json!({"policy": "deploy"}).to_string();
            http.post(format!("{url}/v1/exchange"))
                .bearer_auth(token)
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 401);
    }
    assert_eq!(issuer.jwks_fetches(), baseline + 1);
}

#[tokio::test]
async fn an_issuer_not_in_the_config_is_refused_with_no_request_leaving_the_broker() {
    let (issuer, broker) = setup().await;
    let stranger = FakeIssuer::start().await;
    let before = issuer.requests();
    let token = stranger.sign(&stranger.claims("github-environment-deploy.json", NOW));
    assert_rejected(&broker, &token).await;
    assert_eq!(stranger.requests(), 0, "the unconfigured issuer was contacted");
    assert_eq!(issuer.requests(), before, "the configured issuer was contacted for a stranger's token");
}

#[tokio::test]
async fn an_expired_token_is_refused() {
    let (issuer, broker) = setup().await;
    let mut c = deploy_claims(&issuer);
    c.insert("iat".into(), json!(NOW - 400));
    c.insert("nbf".into(), json!(NOW - 400));
    c.insert("exp".into(), json!(NOW - 31)); // beyond the 30 s leeway
    assert_rejected(&broker, &issuer.sign(&c)).await;
}

#[tokio::test]
async fn a_token_within_the_leeway_of_its_expiry_is_accepted() {
    let (issuer, broker) = setup().await;
    let mut c = deploy_claims(&issuer);
    c.insert("iat".into(), json!(NOW - 300));
    c.insert("exp".into(), json!(NOW - 10));
    assert_eq!(broker.exchange(&issuer.sign(&c), "deploy").await.0, 201);
}

#[tokio::test]
async fn a_token_not_yet_valid_is_refused() {
    let (issuer, broker) = setup().await;
    let mut c = deploy_claims(&issuer);
    c.insert("nbf".into(), json!(NOW + 120));
    assert_rejected(&broker, &issuer.sign(&c)).await;
}

#[tokio::test]
async fn a_token_issued_in_the_future_is_refused() {
    let (issuer, broker) = setup().await;
    let mut c = deploy_claims(&issuer);
    c.insert("iat".into(), json!(NOW + 120));
    c.insert("exp".into(), json!(NOW + 400));
    assert_rejected(&broker, &issuer.sign(&c)).await;
}

#[tokio::test]
async fn a_token_whose_lifetime_is_above_the_max_is_refused() {
    let (issuer, broker) = setup().await;
    let mut c = deploy_claims(&issuer);
    c.insert("exp".into(), json!(NOW + 3601));
    assert_rejected(&broker, &issuer.sign(&c)).await;
}

#[tokio::test]
async fn a_token_for_another_audience_is_refused() {
    let (issuer, broker) = setup().await;
    let mut c = deploy_claims(&issuer);
    c.insert("aud".into(), json!("https://vault.example.com"));
    assert_rejected(&broker, &issuer.sign(&c)).await;
}

#[tokio::test]
async fn an_audience_array_holding_our_audience_is_accepted() {
    let (issuer, broker) = setup().await;
    let mut c = deploy_claims(&issuer);
    c.insert("aud".into(), json!(["https://vault.example.com", AUDIENCE]));
    let (status, body) = broker.exchange(&issuer.sign(&c), "deploy").await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test]
async fn a_string_typed_exp_is_refused() {
    let (issuer, broker) = setup().await;
    let mut c = deploy_claims(&issuer);
    c.insert("exp".into(), json!((NOW + 300).to_string()));
    assert_rejected(&broker, &issuer.sign(&c)).await;
}

#[tokio::test]
async fn a_claim_set_missing_sub_is_refused() {
    let (issuer, broker) = setup().await;
    let mut c = deploy_claims(&issuer);
    c.remove("sub");
    assert_rejected(&broker, &issuer.sign(&c)).await;
}

#[tokio::test]
async fn a_claim_set_missing_iat_is_refused() {
    let (issuer, broker) = setup().await;
    let mut c = deploy_claims(&issuer);
    c.remove("iat");
    assert_rejected(&broker, &issuer.sign(&c)).await;
}

#[tokio::test]
async fn a_tampered_payload_fails_the_signature() {
    let (issuer, broker) = setup().await;
    let token = issuer.sign(&deploy_claims(&issuer));
    let mut forged = deploy_claims(&issuer);
    forged.insert("repository_id".into(), json!("75"));
    let parts: Vec<&str> = token.split('.').collect();
    let tampered = format!("{}.{}.{}", parts[0], b64url(Value::Object(forged).to_string().as_bytes()), parts[2]);
    assert_rejected(&broker, &tampered).await;
}

#[tokio::test]
async fn malformed_tokens_are_refused() {
    let (_issuer, broker) = setup().await;
    for token in ["not-a-jwt", "a.b", "a.b.c.d", "!!!.???.***", "e30.e30.", "eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.c2ln"] {
        assert_rejected(&broker, token).await;
    }
}

#[tokio::test]
async fn a_40_kib_token_is_refused_before_decoding() {
    let (issuer, broker) = setup().await;
    let mut c = deploy_claims(&issuer);
    c.insert("padding".into(), json!("x".repeat(40 * 1024)));
    assert_rejected(&broker, &issuer.sign(&c)).await;
}

#[tokio::test]
async fn a_missing_or_non_bearer_authorization_is_refused() {
    let (_issuer, broker) = setup().await;
    let resp =
        broker.http.post(format!("{}/v1/exchange", broker.url)).body(r#"{"policy":"deploy"}"#).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer error=\"invalid_token\"");
    let resp = broker
        .http
        .post(format!("{}/v1/exchange", broker.url))
        .basic_auth("u", Some("p"))
        .body(r#"{"policy":"deploy"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
}

#[tokio::test]
async fn a_rotated_key_is_picked_up_by_the_unknown_kid_refetch() {
    let (issuer, broker) = setup().await;
    issuer.publish(&["rsa-a", "rsa-b"]);
    issuer.sign_with("rsa-b");
    let (status, body) = broker.exchange(&issuer.sign(&deploy_claims(&issuer)), "deploy").await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test]
async fn when_the_issuer_goes_down_the_last_good_keys_keep_working() {
    let (issuer, broker) = setup().await;
    issuer.set_mode(Mode::Down);
    let jwks = &broker.running.app.verifier().issuers().next().unwrap().jwks;
    assert!(jwks.refresh().await.is_err(), "a refresh against a down issuer must fail");
    let (status, body) = broker.exchange(&issuer.sign(&deploy_claims(&issuer)), "deploy").await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test]
async fn garbage_oversized_or_redirected_jwks_never_replace_the_last_good_keys() {
    let (issuer, broker) = setup().await;
    let elsewhere = FakeIssuer::start().await;
    let jwks = broker.running.app.verifier().issuers().next().unwrap().jwks.clone();
    for mode in [Mode::Garbage, Mode::Huge, Mode::Redirect(format!("{}/.well-known/jwks", elsewhere.url))] {
        issuer.set_mode(mode.clone());
        let err = jwks.refresh().await.expect_err(&format!("{mode:?} must fail the refresh"));
        let text = err.to_string();
        match mode {
            Mode::Huge => assert!(text.contains("larger than"), "{text}"),
            Mode::Redirect(_) => assert!(text.contains("302"), "{text}"),
            _ => assert!(text.contains("JSON"), "{text}"),
        }
    }
    assert_eq!(elsewhere.requests(), 0, "a redirect was followed");
    issuer.set_mode(Mode::Normal);
    let (status, body) = broker.exchange(&issuer.sign(&deploy_claims(&issuer)), "deploy").await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test]
async fn a_slow_issuer_times_out_and_the_last_good_keys_stay() {
    let issuer = FakeIssuer::start().await;
    let extra = Extra { issuer_toml: "fetch_timeout = \"1s\"".into(), ..Extra::default() };
    let broker = Broker::start_custom(&[("ci", "github-actions", &issuer)], &[("deploy", DEPLOY_POLICY)], &extra).await;
    issuer.set_mode(Mode::Slow(3_000));
    let jwks = broker.running.app.verifier().issuers().next().unwrap().jwks.clone();
    let err = jwks.refresh().await.expect_err("a 3 s answer must not beat a 1 s timeout");
    assert!(err.to_string().contains("timed out"), "{err}");
    let (status, body) = broker.exchange(&issuer.sign(&deploy_claims(&issuer)), "deploy").await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test]
async fn static_jwks_file_keys_verify_with_no_network_at_all() {
    let issuer = FakeIssuer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, json!({"keys": [issuer.signing_key().jwk()]}).to_string()).unwrap();
    let extra = Extra { issuer_toml: format!("jwks_file = {:?}", file.display().to_string()), ..Extra::default() };
    let broker = Broker::start_custom(&[("ci", "github-actions", &issuer)], &[("deploy", DEPLOY_POLICY)], &extra).await;
    let (status, body) = broker.exchange(&issuer.sign(&deploy_claims(&issuer)), "deploy").await;
    assert_eq!(status, 201, "{body}");
    issuer.sign_with("rsa-b");
    assert_rejected(&broker, &issuer.sign(&deploy_claims(&issuer))).await;
    assert_eq!(issuer.requests(), 0, "an issuer with static keys was contacted");
}
