//! The `aws` backend against a FAKE STS endpoint, for what a real implementation cannot be made to
//! do on cue: throttle, fail with 5xx, and show us the exact AssumeRole parameters it received.
//! (The real-API tests are in aws_backend.rs, against moto_server.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use common::*;
use serde_json::json;
use std::sync::{Arc, Mutex};

const POLICY: &str = r#"
issuer: ci
match:
  repository_id: "74"
ttl: {default: 5m, max: 1h}
grants:
  aws:
    backend: aws
    role_arn: arn:aws:iam::123456789012:role/deploy
    session_tags: {repository: "${repository}", environment: "${environment}"}
"#;

#[derive(Default)]
struct Fake {
    /// Answers to give, in order; when empty, success.
    script: Mutex<Vec<u16>>,
    /// Every request body (form-encoded AWS Query parameters).
    seen: Mutex<Vec<String>>,
}

async fn sts(State(fake): State<Arc<Fake>>, body: String) -> Response {
    fake.seen.lock().unwrap().push(body);
    let next = {
        let mut script = fake.script.lock().unwrap();
        if script.is_empty() { None } else { Some(script.remove(0)) }
    };
    match next {
        Some(400) => (StatusCode::BAD_REQUEST, [("content-type", "text/xml")], THROTTLED).into_response(),
        Some(code) => (StatusCode::from_u16(code).unwrap(), [("content-type", "text/xml")], INTERNAL).into_response(),
        None => (StatusCode::OK, [("content-type", "text/xml")], ASSUMED).into_response(),
    }
}

const THROTTLED: &str = r#"<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded</Message></Error><RequestId>r1</RequestId></ErrorResponse>"#;
const INTERNAL: &str = r#"<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Receiver</Type><Code>InternalFailure</Code><Message>secret upstream detail 10.1.2.3</Message></Error><RequestId>r2</RequestId></ErrorResponse>"#;
const ASSUMED: &str = r#"<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><AssumeRoleResult><Credentials><AccessKeyId>ASIAFAKEFAKEFAKE</AccessKeyId><SecretAccessKey>fake-secret-access-key</SecretAccessKey><SessionToken>fake-session-token</SessionToken><Expiration>2030-01-01T00:00:00Z</Expiration></Credentials><AssumedRoleUser><AssumedRoleId>AROAFAKE:s</AssumedRoleId><Arn>arn:aws:sts::123456789012:assumed-role/deploy/s</Arn></AssumedRoleUser></AssumeRoleResult><ResponseMetadata><RequestId>r3</RequestId></ResponseMetadata></AssumeRoleResponse>"#;

struct Setup {
    fake: Arc<Fake>,
    issuer: FakeIssuer,
    broker: Broker,
    _creds: tempfile::TempDir,
}

async fn setup(script: Vec<u16>) -> Setup {
    let fake = Arc::new(Fake { script: Mutex::new(script), ..Fake::default() });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = Router::new().route("/", post(sts)).with_state(fake.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let (backend_toml, creds) = aws_backend(&url, "deny-policy");
    let issuer = FakeIssuer::start().await;
    let extra = Extra { backend_toml, ..Extra::default() };
    let broker = Broker::start_custom(&[("ci", "github-actions", &issuer)], &[("deploy", POLICY)], &extra).await;
    Setup { fake, issuer, broker, _creds: creds }
}

fn params(body: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(body.as_bytes()).into_owned().collect()
}

fn param<'a>(p: &'a [(String, String)], name: &str) -> Option<&'a str> {
    p.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn sts_throttling_is_retried_with_backoff_until_it_succeeds() {
    let s = setup(vec![400, 400]).await;
    let (status, body) =
        s.broker.exchange(&s.issuer.sign(&s.issuer.claims("github-environment-deploy.json", NOW)), "deploy").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["credentials"]["aws"]["access_key_id"], "ASIAFAKEFAKEFAKE");
    assert_eq!(s.fake.seen.lock().unwrap().len(), 3, "two throttled attempts, then the one that worked");
}

#[tokio::test]
async fn sts_failing_is_a_502_with_nothing_recorded_and_no_upstream_text() {
    let s = setup(vec![500; 10]).await;
    let reply =
        s.broker.exchange(&s.issuer.sign(&s.issuer.claims("github-environment-deploy.json", NOW)), "deploy").await;
    assert_error(&reply, 502, "backend_error");
    assert!(!reply.1.to_string().contains("10.1.2.3"), "upstream text reached the caller: {}", reply.1);
    assert!(s.broker.running.app.store().counts().await.unwrap().total() == 0);
    assert_eq!(s.fake.seen.lock().unwrap().len(), 4, "the SDK's standard retries: 4 attempts");
}

#[tokio::test]
async fn a_long_repository_and_a_dirty_claim_are_made_safe_before_they_reach_sts() {
    let s = setup(vec![]).await;
    let mut claims = s.issuer.claims("github-environment-deploy.json", NOW);
    claims.insert("repository".into(), json!(format!("octo-org/{}", "very-long-repository-name-".repeat(5))));
    claims.insert("environment".into(), json!(format!("prod;\nrm -rf /{}", "x".repeat(300))));
    let (status, body) = s.broker.exchange(&s.issuer.sign(&claims), "deploy").await;
    assert_eq!(status, 201, "{body}");
    let seen = s.fake.seen.lock().unwrap().clone();
    let p = params(&seen[0]);
    assert_eq!(param(&p, "Action"), Some("AssumeRole"));
    let session = param(&p, "RoleSessionName").unwrap();
    assert!(session.len() <= 64, "{session}");
    assert!(session.ends_with("7712340001.2"), "the run id and attempt must survive truncation: {session}");
    assert_eq!(param(&p, "SourceIdentity"), body["lease_id"].as_str());
    assert_eq!(param(&p, "DurationSeconds"), Some("900"), "a 5-minute lease still gets STS's 15-minute minimum");
    let tag = |name: &str| {
        let i = p
            .iter()
            .find(|(k, v)| k.ends_with(".Key") && v == name)
            .map(|(k, _)| k.trim_end_matches(".Key").to_string())
            .unwrap();
        param(&p, &format!("{i}.Value")).unwrap().to_string()
    };
    let env = tag("environment");
    assert_eq!(env.chars().count(), 256, "over-long value not truncated");
    assert!(env.starts_with("prod__rm -rf /"), "forbidden characters not replaced: {env:?}");
    assert!(tag("repository").starts_with("octo-org/very-long"));
}
