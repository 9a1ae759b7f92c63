//! The admin API over real HTTP: listing, inspecting and ending leases, and its authentication.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{Value, json};

const ADMIN: &str = "admin-secret-for-tests";

async fn setup() -> (FakeIssuer, Broker) {
    let issuer = FakeIssuer::start().await;
    let sha = ephemera::secret::sha256_hex(ADMIN.as_bytes());
    let extra = Extra { backend_toml: format!("[admin]\ntoken_sha256 = \"{sha}\""), ..Extra::default() };
    let broker = Broker::start_custom(
        &[("ci", "github-actions", &issuer)],
        &[("deploy", DEPLOY_POLICY), ("push", PUSH_POLICY)],
        &extra,
    )
    .await;
    (issuer, broker)
}

async fn admin(broker: &Broker, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    admin_as(broker, ADMIN, method, path, body).await
}

async fn admin_as(
    broker: &Broker,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = broker.http.request(method, format!("{}{path}", broker.url)).bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// One lease of the deploy fixture's job and one of the push fixture's job.
async fn two_jobs(issuer: &FakeIssuer, broker: &Broker) -> (Value, Value) {
    let (_, deploy) =
        broker.exchange(&issuer.sign(&issuer.claims("github-environment-deploy.json", NOW)), "deploy").await;
    let (_, push) = broker.exchange(&issuer.sign(&issuer.claims("github-push-immutable-sub.json", NOW)), "push").await;
    (deploy, push)
}

async fn active(broker: &Broker, body: &Value) -> bool {
    broker.introspect(body["credentials"]["api"]["token"].as_str().unwrap()).await["active"] == true
}

#[tokio::test]
async fn admin_calls_without_the_admin_token_are_refused() {
    let (issuer, broker) = setup().await;
    let (deploy, _) = two_jobs(&issuer, &broker).await;
    let ci_token = issuer.sign(&issuer.claims("github-environment-deploy.json", NOW));
    for token in ["", "wrong", ci_token.as_str()] {
        let (status, body) = admin_as(&broker, token, reqwest::Method::GET, "/v1/leases", None).await;
        assert_eq!(status, 401, "{token:?}: {body}");
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    let path = format!("/v1/leases/{}", deploy["lease_id"].as_str().unwrap());
    assert_eq!(admin_as(&broker, "wrong", reqwest::Method::DELETE, &path, None).await.0, 401);
    assert!(active(&broker, &deploy).await, "a refused admin call ended a lease");
}

#[tokio::test]
async fn leases_are_listed_by_job_policy_and_state_with_their_claims() {
    let (issuer, broker) = setup().await;
    let (deploy, push) = two_jobs(&issuer, &broker).await;
    let (status, all) = admin(&broker, reqwest::Method::GET, "/v1/leases", None).await;
    assert_eq!(status, 200);
    assert_eq!(all["leases"].as_array().unwrap().len(), 2);
    assert_eq!(all["truncated"], false);
    let job = "github:74:7712340001:2:96193868770";
    let (_, by_job) =
        admin(&broker, reqwest::Method::GET, &format!("/v1/leases?job={}", job.replace(':', "%3A")), None).await;
    assert_eq!(by_job["leases"].as_array().unwrap().len(), 1);
    let lease = &by_job["leases"][0];
    assert_eq!(lease["id"], deploy["lease_id"]);
    assert_eq!(lease["state"], "active");
    assert_eq!(lease["claims"]["environment"], "prod", "the claims snapshot is shown");
    assert_eq!(lease["credentials"][0]["kind"], "jwt");
    assert!(!lease.to_string().contains("eyJ"), "a credential leaked into the admin view");
    let (_, by_policy) = admin(&broker, reqwest::Method::GET, "/v1/leases?policy=push", None).await;
    assert_eq!(by_policy["leases"][0]["id"], push["lease_id"]);
    let (_, none) = admin(&broker, reqwest::Method::GET, "/v1/leases?state=revoked", None).await;
    assert_eq!(none["leases"], json!([]));
    let (status, bad) = admin(&broker, reqwest::Method::GET, "/v1/leases?stat=active", None).await;
    assert_eq!((status, &bad["error"]["code"]), (400, &json!("bad_request")));
    let (status, _) = admin(&broker, reqwest::Method::GET, "/v1/leases?state=dead", None).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn one_lease_is_shown_and_ended_by_id_and_an_unknown_id_is_404() {
    let (issuer, broker) = setup().await;
    let (deploy, push) = two_jobs(&issuer, &broker).await;
    let path = format!("/v1/leases/{}", deploy["lease_id"].as_str().unwrap());
    let (status, shown) = admin(&broker, reqwest::Method::GET, &path, None).await;
    assert_eq!((status, &shown["policy"]), (200, &json!("deploy")));
    let (status, reply) = admin(&broker, reqwest::Method::DELETE, &path, None).await;
    assert_eq!(status, 200);
    assert_eq!(reply, json!({"revoked": [deploy["lease_id"]], "pending": []}));
    assert!(!active(&broker, &deploy).await);
    assert!(active(&broker, &push).await, "another lease was ended");
    let (_, shown) = admin(&broker, reqwest::Method::GET, &path, None).await;
    assert_eq!((shown["state"].as_str(), shown["reason"].as_str()), (Some("revoked"), Some("admin")));
    assert_eq!(admin(&broker, reqwest::Method::GET, "/v1/leases/lse_00000000000000000000000000", None).await.0, 404);
    assert_eq!(admin(&broker, reqwest::Method::DELETE, "/v1/leases/nope", None).await.0, 404);
}

#[tokio::test]
async fn a_job_is_ended_by_its_key() {
    let (issuer, broker) = setup().await;
    let (deploy, push) = two_jobs(&issuer, &broker).await;
    let (status, reply) = admin(
        &broker,
        reqwest::Method::POST,
        "/v1/jobs/revoke",
        Some(json!({"job": "github:74:32291736541:1:96193868771"})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(reply["revoked"], json!([push["lease_id"]]));
    assert!(!active(&broker, &push).await);
    assert!(active(&broker, &deploy).await);
    let (status, _) = admin(&broker, reqwest::Method::POST, "/v1/jobs/revoke", Some(json!({"jobs": "x"}))).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn the_leaver_event_ends_every_live_lease_of_an_actor_policy_or_repository() {
    let (issuer, broker) = setup().await;
    let (deploy, push) = two_jobs(&issuer, &broker).await;
    // Both fixtures' actor is octocat (actor_id 12): a person leaves.
    let (_, reply) = admin(&broker, reqwest::Method::POST, "/v1/leases/revoke", Some(json!({"actor_id": "12"}))).await;
    let mut ended: Vec<Value> = reply["revoked"].as_array().unwrap().clone();
    ended.sort_by_key(|v| v.as_str().unwrap().to_string());
    let mut want = vec![deploy["lease_id"].clone(), push["lease_id"].clone()];
    want.sort_by_key(|v| v.as_str().unwrap().to_string());
    assert_eq!(ended, want);
    // A policy withdrawn and a repository archived, on fresh leases.
    let (deploy, push) = two_jobs(&issuer, &broker).await;
    let (_, reply) = admin(&broker, reqwest::Method::POST, "/v1/leases/revoke", Some(json!({"policy": "push"}))).await;
    assert_eq!(reply["revoked"], json!([push["lease_id"]]));
    assert!(active(&broker, &deploy).await);
    let (_, reply) =
        admin(&broker, reqwest::Method::POST, "/v1/leases/revoke", Some(json!({"repository_id": "74"}))).await;
    assert_eq!(reply["revoked"], json!([deploy["lease_id"]]));
    let (_, reply) =
        admin(&broker, reqwest::Method::POST, "/v1/leases/revoke", Some(json!({"project_id": "20"}))).await;
    assert_eq!(reply, json!({"revoked": [], "pending": []}));
}

#[tokio::test]
async fn an_empty_filter_is_refused_rather_than_ending_everything() {
    let (issuer, broker) = setup().await;
    let (deploy, _) = two_jobs(&issuer, &broker).await;
    let (status, body) = admin(&broker, reqwest::Method::POST, "/v1/leases/revoke", Some(json!({}))).await;
    assert_eq!(status, 400, "{body}");
    assert!(active(&broker, &deploy).await);
}

#[tokio::test]
async fn explain_traces_a_policy_against_claims_without_minting() {
    let (_issuer, broker) = setup().await;
    let claims = fixture("github-pull-request-from-fork.json");
    let (status, trace) = admin(
        &broker,
        reqwest::Method::POST,
        "/v1/explain",
        Some(json!({"policy": "push", "claims": claims, "issuer": "ci"})),
    )
    .await;
    assert_eq!(status, 200, "{trace}");
    assert_eq!(trace["decision"], "deny");
    assert_eq!(trace["deciding_claim"], "event_name");
    assert!(trace["rules"].as_array().unwrap().iter().any(|r| r["claim"] == "ref" && r["pass"] == true));
    assert!(broker.running.app.store().counts().await.unwrap().total() == 0, "explain minted something");
    assert_eq!(
        admin(&broker, reqwest::Method::POST, "/v1/explain", Some(json!({"policy": "nope", "claims": {}}))).await.0,
        404
    );
    assert_eq!(
        admin_as(&broker, "wrong", reqwest::Method::POST, "/v1/explain", Some(json!({"policy": "push", "claims": {}})))
            .await
            .0,
        401
    );
}

/// Issue 20: the console is served only where the admin API is on, from the binary itself,
/// under a strict Content-Security-Policy; its script is a file of this origin (no inline script).
#[tokio::test]
async fn the_console_is_served_with_a_strict_csp_only_where_an_admin_token_is_configured() {
    let (_issuer, broker) = setup().await;
    let resp = broker.http.get(format!("{}/ui/", broker.url)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let header = |name: &str| resp.headers().get(name).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let csp = header("content-security-policy");
    for directive in
        ["default-src 'none'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'", "connect-src 'self'"]
    {
        assert!(csp.contains(directive), "{csp} lacks {directive}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!((header("x-content-type-options"), header("x-frame-options")), ("nosniff".into(), "DENY".into()));
    let html = resp.text().await.unwrap();
    assert!(html.contains(r#"<script type="module" src="/ui/app.js"></script>"#), "{html}");
    assert_eq!(html.matches("<script").count(), 1, "no inline script");
    assert!(!html.contains(" style="), "no inline style");
    let (status, js) = broker.get("/ui/app.js").await;
    assert_eq!(status, 200);
    assert!(js.contains("textContent") && !js.contains("innerHTML"), "data reaches the page only as text");
    assert_eq!(broker.get("/ui").await.0, 200, "/ui redirects to /ui/");

    let issuer = FakeIssuer::start().await;
    let without = Broker::start(&issuer, &[("deploy", DEPLOY_POLICY)]).await;
    assert_eq!(without.get("/ui/").await.0, 404, "no admin token, no console");
    assert_eq!(without.get("/ui/app.js").await.0, 404);
}

/// The console ends exactly the leases it listed and counted: `lease_ids`, never mixed with a
/// filter, only lease ids, at most 1,000.
#[tokio::test]
async fn listed_leases_end_by_their_ids_and_a_malformed_list_ends_nothing() {
    let (issuer, broker) = setup().await;
    let token = issuer.sign(&issuer.claims("github-environment-deploy.json", NOW));
    let (_, lease) = broker.exchange(&token, "deploy").await;
    let id = lease["lease_id"].as_str().unwrap();
    let post = |body: Value| admin(&broker, reqwest::Method::POST, "/v1/leases/revoke", Some(body));
    for bad in [
        json!({"lease_ids": []}),
        json!({"lease_ids": [id], "policy": "deploy"}),
        json!({"lease_ids": [id, "<script>"]}),
        json!({"lease_ids": vec![id; 1001]}),
    ] {
        let reply = post(bad.clone()).await;
        assert_error(&reply, 400, "bad_request");
        assert!(!reply.1.to_string().contains("<script>"), "the ids are not echoed: {}", reply.1);
    }
    let (_, still) = admin(&broker, reqwest::Method::GET, &format!("/v1/leases/{id}"), None).await;
    assert_eq!(still["state"], "active", "a refused list ended nothing");
    let (status, reply) = post(json!({"lease_ids": [id]})).await;
    assert_eq!((status, reply["revoked"].clone()), (200, json!([id])));
}

/// Issue 20: what the console reads besides leases. Recent refusals keep the claims a policy
/// decided on (for explain); the overview counts this hour's outcomes by minute; the policy
/// list carries each file's text (for the preview). Each needs the admin token.
#[tokio::test]
async fn refusals_overview_and_policy_texts_are_admin_only_and_say_what_happened() {
    let (issuer, broker) = setup().await;
    let ok = issuer.sign(&issuer.claims("github-environment-deploy.json", NOW));
    assert_eq!(broker.exchange(&ok, "deploy").await.0, 201);
    let fork = issuer.sign(&issuer.claims("github-pull-request-from-fork.json", NOW));
    let (status, denied) = broker.exchange(&fork, "push").await;
    assert_eq!(status, 403);
    assert_eq!(broker.exchange("not-a-token", "deploy").await.0, 401);
    for path in ["/v1/refusals", "/v1/overview", "/v1/policies"] {
        let reply = admin_as(&broker, "wrong", reqwest::Method::GET, path, None).await;
        assert_error(&reply, 401, "unauthorized");
    }
    let (_, refusals) = admin(&broker, reqwest::Method::GET, "/v1/refusals", None).await;
    let list = refusals["refusals"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{refusals}");
    assert_eq!(list[0]["code"], "invalid_token", "newest first");
    assert!(list[0].get("claims").is_none(), "an unverified token's claims are not kept");
    assert_eq!(list[1]["request_id"], denied["error"]["request_id"]);
    assert_eq!((list[1]["deciding_claim"].as_str(), list[1]["policy"].as_str()), (Some("event_name"), Some("push")));
    assert_eq!(list[1]["claims"]["event_name"], "pull_request_target");
    let (_, overview) = admin(&broker, reqwest::Method::GET, "/v1/overview", None).await;
    let minutes = overview["minutes"].as_array().unwrap();
    assert_eq!(minutes.len(), 60);
    assert_eq!((minutes[59]["issued"].as_u64(), minutes[59]["denied"].as_u64()), (Some(1), Some(2)), "{overview}");
    assert_eq!((overview["ready"].as_bool(), overview["leases"]["active"].as_u64()), (Some(true), Some(1)));
    assert_eq!(overview["issuers"][0]["name"], "ci");
    assert!(overview["issuers"][0]["keys"].as_u64().unwrap() >= 1, "{overview}");
    assert_eq!(overview["backends"][0], json!({"name": "jwt", "kind": "jwt", "revocation": "immediate", "live": 1}));
    let (_, policies) = admin(&broker, reqwest::Method::GET, "/v1/policies", None).await;
    let deploy = policies["policies"].as_array().unwrap().iter().find(|p| p["name"] == "deploy").unwrap();
    assert_eq!(deploy["text"], DEPLOY_POLICY);
    assert_eq!(deploy["builtin"], false);
}
