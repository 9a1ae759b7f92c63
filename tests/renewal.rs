//! Job-bound leases (issue 15): a policy with `renew: {max_lease}` gives the exchange a renew
//! token; `POST /v1/leases/{id}/renew` with it mints fresh short-lived credentials under the same
//! lease until its end, and ending the lease revokes every one of them. Against a broker serving
//! real HTTP with a real issuer, its clock moved by the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use ephemera::clock::rfc3339;
use ephemera::ledger::LeaseState;
use serde_json::{Value, json};

const RENEWABLE: &str = r#"
issuer: ci
match:
  repository_id: "74"
ttl: {default: 2m, max: 5m}
renew: {max_lease: 1h}
grants:
  api: {backend: jwt, audience: https://api.internal.example}
"#;

const NOT_RENEWABLE: &str = r#"
issuer: ci
match:
  repository_id: "74"
ttl: {default: 2m, max: 5m}
grants:
  api: {backend: jwt, audience: https://api.internal.example}
"#;

async fn broker(issuer: &FakeIssuer) -> Broker {
    let extra = Extra { hooks_toml: "[reload]\nwatch = false\n".into(), ..Extra::default() };
    Broker::start_custom(
        &[("ci", "github-actions", issuer)],
        &[("deploy", RENEWABLE), ("plain", NOT_RENEWABLE)],
        &extra,
    )
    .await
}

async fn renew(broker: &Broker, lease_id: &str, token: &str) -> (u16, Value) {
    let resp =
        broker.http.post(format!("{}/v1/leases/{lease_id}/renew", broker.url)).bearer_auth(token).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

fn jwt(body: &Value) -> String {
    body["credentials"]["api"]["token"].as_str().unwrap().to_string()
}

/// The `exp` of a broker JWT, read without verifying it (introspection verifies).
fn exp(jwt: &str) -> i64 {
    use base64::Engine;
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(jwt.split('.').nth(1).unwrap()).unwrap();
    serde_json::from_slice::<Value>(&claims).unwrap()["exp"].as_i64().unwrap()
}

async fn exchange(broker: &Broker, issuer: &FakeIssuer, policy: &str) -> Value {
    let token = issuer.sign(&issuer.claims("github-environment-deploy.json", NOW));
    let (status, body) = broker.exchange(&token, policy).await;
    assert_eq!(status, 201, "{body}");
    body
}

#[tokio::test]
async fn a_renewable_lease_gets_fresh_short_credentials_until_its_end_and_ending_it_revokes_them_all() {
    let issuer = FakeIssuer::start().await;
    let broker = broker(&issuer).await;
    let body = exchange(&broker, &issuer, "deploy").await;
    let lease_id = body["lease_id"].as_str().unwrap().to_string();
    let token = body["renew"]["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("ephr_") && token.len() > 40, "{token}");
    assert_eq!(body["renew"]["until"], rfc3339(NOW + 3600), "the lease lasts max_lease");
    assert_eq!(body["expires_at"], rfc3339(NOW + 3600));
    let first = jwt(&body);
    assert_eq!(exp(&first), NOW + 120, "each credential keeps its own short ttl");

    // Past the first credential's ttl, the job renews: a new credential, the old one still
    // listed (and dead on its own).
    broker.clock.advance(100);
    let (status, renewed) = renew(&broker, &lease_id, &token).await;
    assert_eq!(status, 200, "{renewed}");
    assert_eq!(renewed["lease_id"], lease_id.as_str());
    let second = jwt(&renewed);
    assert_ne!(first, second);
    assert_eq!(exp(&second), NOW + 100 + 120);
    assert_eq!(broker.introspect(&second).await["active"], true);
    let lease = broker.running.app.lease(&lease_id).await.unwrap().unwrap();
    assert_eq!(lease.credentials.len(), 2);
    assert_eq!(lease.renewal.as_ref().map(|r| (r.count, r.last_at)), Some((1, NOW + 100)));
    assert!(!serde_json::to_string(&lease).unwrap().contains(&token), "the ledger keeps only the token's digest");

    // Near the end, a credential never outlives the lease.
    broker.clock.set(NOW + 3600 - 30);
    let (status, last) = renew(&broker, &lease_id, &token).await;
    assert_eq!(status, 200, "{last}");
    assert_eq!(exp(&jwt(&last)), NOW + 3600);
    let metrics = broker.get("/metrics").await.1;
    assert!(metrics.contains("ephemera_renewals_total{policy=\"deploy\",outcome=\"renewed\"} 2"), "{metrics}");

    // Ending the lease (the job's own revoke) revokes every credential minted under it.
    broker.clock.set(NOW + 200);
    let job_token = issuer.sign(&issuer.claims("github-environment-deploy.json", NOW + 200));
    let (status, _) = broker.revoke(&job_token, json!({"lease_id": lease_id})).await;
    assert_eq!(status, 200);
    for credential in [&first, &second] {
        assert_eq!(broker.introspect(credential).await["active"], false);
    }
    let ended = renew(&broker, &lease_id, &token).await;
    assert_error(&ended, 409, "lease_not_renewable");
    assert!(ended.1["error"]["message"].as_str().unwrap().contains("it has ended (revoked)"), "{}", ended.1);
    assert!(captured_logs().contains("\"renewed\""), "without an audit file the log records each renewal");
    assert_not_logged(&[&token, &first, &second]);
}

#[tokio::test]
async fn a_renewal_with_another_token_or_for_an_unknown_lease_gets_one_answer_and_changes_nothing() {
    let issuer = FakeIssuer::start().await;
    let broker = broker(&issuer).await;
    let body = exchange(&broker, &issuer, "deploy").await;
    let lease_id = body["lease_id"].as_str().unwrap();
    let token = body["renew"]["token"].as_str().unwrap();
    let other = exchange(&broker, &issuer, "deploy").await;
    let others_token = other["renew"]["token"].as_str().unwrap();

    let wrong = renew(&broker, lease_id, others_token).await;
    assert_error(&wrong, 401, "invalid_token");
    let unknown = renew(&broker, "lse_00000000000000000000000000", token).await;
    assert_error(&unknown, 401, "invalid_token");
    assert_eq!(wrong.1["error"]["message"], unknown.1["error"]["message"], "no oracle of lease ids");
    assert_error(&renew(&broker, lease_id, "").await, 401, "invalid_token");
    let lease = broker.running.app.lease(lease_id).await.unwrap().unwrap();
    assert_eq!((lease.credentials.len(), lease.renewal.map(|r| r.count)), (1, Some(0)));

    // A lease of a policy without `renew` has no token, and nothing renews it.
    let plain = exchange(&broker, &issuer, "plain").await;
    assert!(plain.get("renew").is_none(), "{plain}");
    assert_eq!(plain["expires_at"], rfc3339(NOW + 120), "it ends with its credentials");
    assert_error(&renew(&broker, plain["lease_id"].as_str().unwrap(), token).await, 401, "invalid_token");
}

#[tokio::test]
async fn a_renewal_past_the_lease_end_is_refused_and_the_lease_ends_at_max_lease() {
    let issuer = FakeIssuer::start().await;
    let broker = broker(&issuer).await;
    let body = exchange(&broker, &issuer, "deploy").await;
    let lease_id = body["lease_id"].as_str().unwrap();
    let token = body["renew"]["token"].as_str().unwrap();
    broker.clock.set(NOW + 3600);
    let late = renew(&broker, lease_id, token).await;
    assert_error(&late, 409, "lease_not_renewable");
    assert!(late.1["error"]["message"].as_str().unwrap().contains("reached its end"), "{}", late.1);
    broker.running.app.reap_once().await;
    let lease = broker.running.app.lease(lease_id).await.unwrap().unwrap();
    assert_eq!(lease.state, LeaseState::Expired);
}

#[tokio::test]
async fn a_policy_change_is_decided_at_each_renewal_and_renewals_survive_a_restart() {
    let issuer = FakeIssuer::start().await;
    let broker = broker(&issuer).await;
    let body = exchange(&broker, &issuer, "deploy").await;
    let lease_id = body["lease_id"].as_str().unwrap().to_string();
    let token = body["renew"]["token"].as_str().unwrap().to_string();
    let (status, _) = renew(&broker, &lease_id, &token).await;
    assert_eq!(status, 200);

    // A restart keeps the lease, its renewal and every credential.
    let broker = broker.restart(None).await;
    let lease = broker.running.app.lease(&lease_id).await.unwrap().unwrap();
    assert_eq!((lease.credentials.len(), lease.renewal.as_ref().map(|r| r.count)), (2, Some(1)));

    // The policy drops `renew` but still admits the job: the lease lives on, not renewable.
    std::fs::write(broker.dir.path().join("policies/deploy.yaml"), NOT_RENEWABLE).unwrap();
    broker.running.app.reload_policies(true).await;
    let refused = renew(&broker, &lease_id, &token).await;
    assert_error(&refused, 409, "lease_not_renewable");
    assert!(refused.1["error"]["message"].as_str().unwrap().contains("no longer allows renewal"), "{}", refused.1);
    let lease = broker.running.app.lease(&lease_id).await.unwrap().unwrap();
    assert_eq!((lease.state, lease.credentials.len()), (LeaseState::Active, 2), "changes nothing");

    // The policy no longer admits the job: the lease ends (the reload ends it, and a renewal
    // after that is told so).
    std::fs::write(broker.dir.path().join("policies/deploy.yaml"), RENEWABLE.replace("\"74\"", "\"75\"")).unwrap();
    broker.running.app.reload_policies(true).await;
    let ended = renew(&broker, &lease_id, &token).await;
    assert_error(&ended, 409, "lease_not_renewable");
    let lease = broker.running.app.lease(&lease_id).await.unwrap().unwrap();
    assert_eq!((lease.state, lease.reason.as_deref()), (LeaseState::Revoked, Some("policy-changed")));
}

#[tokio::test]
async fn a_fresh_ci_token_of_the_same_job_renews_and_another_jobs_does_not() {
    let issuer = FakeIssuer::start().await;
    let broker = broker(&issuer).await;
    let body = exchange(&broker, &issuer, "deploy").await;
    let lease_id = body["lease_id"].as_str().unwrap();
    let plain = exchange(&broker, &issuer, "plain").await;
    broker.clock.advance(600);

    // The job asks its platform for a new ID token (GitHub allows it at any time) and renews
    // with it; the exchange's token has expired by now.
    let fresh = issuer.sign(&issuer.claims("github-environment-deploy.json", NOW + 600));
    let (status, renewed) = renew(&broker, lease_id, &fresh).await;
    assert_eq!(status, 200, "{renewed}");
    assert_eq!(exp(&jwt(&renewed)), NOW + 600 + 120);

    // Another job's token (another check run) is told what an unknown lease is told.
    let mut other = issuer.claims("github-environment-deploy.json", NOW + 600);
    other.insert("check_run_id".into(), json!("999"));
    let foreign = renew(&broker, lease_id, &issuer.sign(&other)).await;
    assert_error(&foreign, 401, "invalid_token");
    let unknown = renew(&broker, "lse_00000000000000000000000000", &fresh).await;
    assert_eq!(foreign.1["error"]["message"], unknown.1["error"]["message"]);
    // A token that does not verify is refused before the lease is looked at.
    assert_error(&renew(&broker, lease_id, "not.a.jwt").await, 401, "invalid_token");

    // The job's own token on a lease its policy did not make renewable: told why.
    let refused = renew(&broker, plain["lease_id"].as_str().unwrap(), &fresh).await;
    assert_error(&refused, 409, "lease_not_renewable");
    assert!(refused.1["error"]["message"].as_str().unwrap().contains("did not make it renewable"), "{}", refused.1);
    let lease = broker.running.app.lease(lease_id).await.unwrap().unwrap();
    assert_eq!(lease.renewal.map(|r| r.count), Some(1));
}
