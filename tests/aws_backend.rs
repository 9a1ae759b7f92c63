//! The `aws` backend against a real AWS API implementation on loopback (`moto_server`, installed
//! by scripts/test): AssumeRole, the credentials used, revocation read back from IAM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::moto::Moto;
use common::*;
use ephemera::ledger::LeaseState;
use serde_json::{Value, json};

const POLICY: &str = r#"
issuer: ci
match:
  repository_id: "74"
ttl: {default: 5m, max: 1h}
grants:
  aws:
    backend: aws
    role_arn: ROLE_ARN
    session_policy: {Version: "2012-10-17", Statement: [{Effect: Allow, Action: "s3:GetObject", Resource: "*"}]}
    session_tags: {repository: "${repository}", environment: "${environment}"}
"#;

struct Setup {
    moto: Moto,
    issuer: FakeIssuer,
    broker: Broker,
    role: String,
    _creds: tempfile::TempDir,
}

async fn setup(revocation: &str) -> Setup {
    setup_with(revocation, "").await
}

/// As [`setup`], with `extra` lines added to the policy (e.g. `renew`).
async fn setup_with(revocation: &str, extra_policy: &str) -> Setup {
    let moto = Moto::start();
    let role = format!("deploy-{}", ephemera::secret::hex(&ephemera::ids::random::<4>()));
    let arn = moto.create_role(&role);
    let (backend_toml, creds) = aws_backend(&moto.endpoint, revocation);
    let issuer = FakeIssuer::start().await;
    let policy = format!("{}{extra_policy}", POLICY.replace("ROLE_ARN", &arn));
    let extra = Extra { backend_toml, ..Extra::default() };
    let broker = Broker::start_custom(&[("ci", "github-actions", &issuer)], &[("deploy", &policy)], &extra).await;
    Setup { moto, issuer, broker, role, _creds: creds }
}

fn deploy_token(s: &Setup) -> String {
    s.issuer.sign(&s.issuer.claims("github-environment-deploy.json", NOW))
}

/// An STS client using the credentials an exchange returned.
async fn sts_with(endpoint: &str, aws: &Value) -> aws_sdk_sts::Client {
    let creds = aws_sdk_sts::config::Credentials::new(
        aws["access_key_id"].as_str().unwrap(),
        aws["secret_access_key"].as_str().unwrap(),
        aws["session_token"].as_str().map(str::to_string),
        None,
        "exchange",
    );
    let config = aws_sdk_sts::Config::builder()
        .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
        .region(aws_sdk_sts::config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(creds)
        .http_client(
            aws_smithy_http_client::Builder::new()
                .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                    aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                ))
                .build_https(),
        )
        .build();
    aws_sdk_sts::Client::from_conf(config)
}

#[tokio::test]
async fn an_aws_grant_returns_working_credentials_for_a_traceable_session() {
    let s = setup("deny-policy").await;
    let (status, body) = s.broker.exchange(&deploy_token(&s), "deploy").await;
    assert_eq!(status, 201, "{body}");
    let aws = &body["credentials"]["aws"];
    assert_eq!(aws["kind"], "aws");
    assert_eq!(aws["revocation"], "deny-policy");
    assert_eq!(aws["region"], "us-east-1");
    for field in ["access_key_id", "secret_access_key", "session_token", "expiration", "expires_at"] {
        assert!(aws[field].as_str().is_some_and(|v| !v.is_empty()), "{field} missing: {aws}");
    }
    let me = sts_with(&s.moto.endpoint, aws).await.get_caller_identity().send().await.unwrap();
    let arn = me.arn().unwrap();
    assert!(arn.contains(&format!("assumed-role/{}/", s.role)), "{arn}");
    assert!(
        arn.contains("octo-org") && arn.contains("7712340001"),
        "the session name does not lead back to the job: {arn}"
    );
    assert_not_logged(&[aws["secret_access_key"].as_str().unwrap(), aws["session_token"].as_str().unwrap()]);
}

#[tokio::test]
async fn revoke_writes_a_deny_for_the_lease_s_source_identity_read_back_from_iam() {
    let s = setup("deny-policy").await;
    let token = deploy_token(&s);
    let (_, body) = s.broker.exchange(&token, "deploy").await;
    let lease = body["lease_id"].as_str().unwrap().to_string();
    assert!(s.moto.get_role_policy(&s.role, "ephemera-revoked").is_none());
    let (_, reply) = s.broker.revoke(&token, json!({})).await;
    assert_eq!(reply["revoked"], json!([lease]));
    let doc = s.moto.get_role_policy(&s.role, "ephemera-revoked").expect("no deny policy on the role");
    let statements = doc["Statement"].as_array().unwrap();
    assert_eq!(statements.len(), 1, "{doc}");
    let st = &statements[0];
    assert_eq!(st["Effect"], "Deny");
    assert_eq!(st["Action"], "*");
    assert_eq!(st["Resource"], "*");
    assert_eq!(st["Condition"]["StringEquals"]["aws:SourceIdentity"], json!([lease]), "{doc}");
}

#[tokio::test]
async fn renewed_aws_sessions_share_the_lease_s_source_identity_so_one_deny_ends_them_all() {
    let s = setup_with("deny-policy", "renew: {max_lease: 2h}\n").await;
    let token = deploy_token(&s);
    let (status, body) = s.broker.exchange(&token, "deploy").await;
    assert_eq!(status, 201, "{body}");
    let lease = body["lease_id"].as_str().unwrap().to_string();
    let renew_token = body["renew"]["token"].as_str().unwrap();
    s.broker.clock.advance(240);
    let resp = s
        .broker
        .http
        .post(format!("{}/v1/leases/{lease}/renew", s.broker.url))
        .bearer_auth(renew_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let renewed: Value = resp.json().await.unwrap();
    let (first, second) = (&body["credentials"]["aws"], &renewed["credentials"]["aws"]);
    assert_ne!(first["access_key_id"], second["access_key_id"], "a fresh session");
    for aws in [first, second] {
        let me = sts_with(&s.moto.endpoint, aws).await.get_caller_identity().send().await.unwrap();
        assert!(me.arn().unwrap().contains(&format!("assumed-role/{}/", s.role)), "{:?}", me.arn());
    }
    let (_, reply) = s.broker.revoke(&token, json!({})).await;
    assert_eq!(reply["revoked"], json!([lease]));
    let doc = s.moto.get_role_policy(&s.role, "ephemera-revoked").expect("no deny policy on the role");
    let denied: Vec<&Value> = doc["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|st| st["Condition"]["StringEquals"]["aws:SourceIdentity"].as_array().unwrap())
        .collect();
    assert_eq!(denied, [&json!(lease)], "one entry, the lease's SourceIdentity, covers both sessions: {doc}");
}

#[tokio::test]
async fn concurrent_revocations_on_one_role_lose_no_entry() {
    let s = setup("deny-policy").await;
    let mut leases = Vec::new();
    let mut tokens = Vec::new();
    for i in 0..8 {
        let mut claims = s.issuer.claims("github-environment-deploy.json", NOW);
        claims.insert("run_id".into(), json!(format!("{}", 1000 + i)));
        let token = s.issuer.sign(&claims);
        let (status, body) = s.broker.exchange(&token, "deploy").await;
        assert_eq!(status, 201, "{body}");
        leases.push(body["lease_id"].as_str().unwrap().to_string());
        tokens.push(token);
    }
    let tasks: Vec<_> = tokens
        .iter()
        .map(|t| {
            let (http, url, t) = (s.broker.http.clone(), s.broker.url.clone(), t.clone());
            tokio::spawn(async move {
                http.post(format!("{url}/v1/revoke"))
                    .bearer_auth(t)
                    .json(&json!({}))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let doc = s.moto.get_role_policy(&s.role, "ephemera-revoked").unwrap();
    let mut listed: Vec<String> = doc["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|st| st["Condition"]["StringEquals"]["aws:SourceIdentity"].as_array().unwrap().clone())
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    listed.sort();
    leases.sort();
    assert_eq!(listed, leases, "a read-modify-write race lost a revocation");
}

#[tokio::test]
async fn the_deny_entry_goes_away_once_the_session_has_expired() {
    let s = setup("deny-policy").await;
    let token = deploy_token(&s);
    let (_, body) = s.broker.exchange(&token, "deploy").await;
    s.broker.revoke(&token, json!({})).await;
    assert!(s.moto.get_role_policy(&s.role, "ephemera-revoked").is_some());
    let lease = s.broker.running.app.lease(body["lease_id"].as_str().unwrap()).await.unwrap().unwrap();
    let session_end = lease.credentials[0].data()["session_expires_at"].as_i64().unwrap();
    // Before the session could have expired, the entry stays.
    s.broker.clock.set(session_end - 1);
    s.broker.running.app.reap_once().await;
    assert!(s.moto.get_role_policy(&s.role, "ephemera-revoked").is_some(), "dropped while the session was alive");
    // The entry lives until its hour bucket (plus a skew margin) has passed, then goes.
    s.broker.clock.set(session_end + 2 * 3600);
    s.broker.running.app.reap_once().await;
    assert!(s.moto.get_role_policy(&s.role, "ephemera-revoked").is_none(), "an expired entry was kept");
}

#[tokio::test]
async fn a_deny_entry_written_before_a_restart_goes_away_once_the_session_has_expired() {
    let Setup { moto, issuer, broker, role, _creds } = setup("deny-policy").await;
    let token = issuer.sign(&issuer.claims("github-environment-deploy.json", NOW));
    let (_, body) = broker.exchange(&token, "deploy").await;
    broker.revoke(&token, json!({})).await;
    assert!(moto.get_role_policy(&role, "ephemera-revoked").is_some());
    let lease = broker.running.app.lease(body["lease_id"].as_str().unwrap()).await.unwrap().unwrap();
    let session_end = lease.credentials[0].data()["session_expires_at"].as_i64().unwrap();
    // Same data dir, same clock, same config (the aws backend included): only memory is lost.
    let broker = broker.restart(None).await;
    assert!(moto.get_role_policy(&role, "ephemera-revoked").is_some(), "dropped while the session was alive");
    broker.clock.set(session_end + 2 * 3600);
    broker.running.app.reap_once().await;
    assert!(
        moto.get_role_policy(&role, "ephemera-revoked").is_none(),
        "a deny entry written before the restart was never cleaned up"
    );
}

#[tokio::test]
async fn a_backend_without_iam_write_says_expiry_and_writes_nothing() {
    let s = setup("expiry").await;
    let token = deploy_token(&s);
    let (_, body) = s.broker.exchange(&token, "deploy").await;
    assert_eq!(body["credentials"]["aws"]["revocation"], "expiry");
    s.broker.revoke(&token, json!({})).await;
    assert!(s.moto.list_role_policies(&s.role).is_empty());
}

#[tokio::test]
async fn iam_refusing_the_deny_update_leaves_the_lease_pending_and_visible() {
    let s = setup("deny-policy").await;
    let token = deploy_token(&s);
    let (_, body) = s.broker.exchange(&token, "deploy").await;
    let lease = body["lease_id"].as_str().unwrap().to_string();
    s.moto.reset(); // the role is gone: PutRolePolicy now fails with NoSuchEntity
    let (_, reply) = s.broker.revoke(&token, json!({})).await;
    assert_eq!(reply["pending"], json!([lease]), "{reply}");
    let state = s.broker.running.app.lease(&lease).await.unwrap().unwrap();
    assert_eq!(state.state, LeaseState::Revoking);
    let error = state.last_error.unwrap();
    assert!(error.starts_with("backend aws: iam:") && error.contains("NoSuchEntity"), "{error}");
    assert!(error.len() < 400, "the AWS error is not condensed: {error}");
    assert!(s.broker.running.app.metrics_text().await.contains("ephemera_revocations_pending 1"));
}

#[tokio::test]
async fn sts_down_is_a_502_with_nothing_recorded_or_leaked() {
    let s = setup("deny-policy").await;
    let token = deploy_token(&s);
    drop(s.moto); // the AWS endpoint goes away
    let reply = s.broker.exchange(&token, "deploy").await;
    assert_error(&reply, 502, "backend_error");
    assert!(s.broker.running.app.store().counts().await.unwrap().total() == 0, "a lease was recorded for nothing");
    assert!(!reply.1.to_string().contains("127.0.0.1"), "upstream detail reached the caller: {}", reply.1);
}

#[tokio::test]
async fn a_role_whose_inline_policies_are_full_keeps_the_revocation_pending_and_visible() {
    let s = setup("deny-policy").await;
    // Another inline policy already uses nearly all of the role's 10,240 characters.
    let resources: Vec<String> = (0..437).map(|i| format!("\"arn:aws:s3:::b{i:04}/*\"")).collect();
    let big = format!(
        r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Action":"s3:GetObject","Resource":[{}]}}]}}"#,
        resources.join(",")
    );
    assert!(big.len() > 10_000 && big.len() < 10_240, "{}", big.len());
    s.moto.boto3(
        "iam.put_role_policy(RoleName=sys.argv[2], PolicyName='app', PolicyDocument=sys.argv[3])",
        &[&s.role, &big],
    );
    let token = deploy_token(&s);
    let (_, body) = s.broker.exchange(&token, "deploy").await;
    let lease = body["lease_id"].as_str().unwrap().to_string();
    let (_, reply) = s.broker.revoke(&token, json!({})).await;
    assert_eq!(reply["pending"], json!([lease]), "{reply}");
    let error = s.broker.running.app.lease(&lease).await.unwrap().unwrap().last_error.unwrap();
    assert!(error.contains("10240-character limit"), "{error}");
    assert!(s.moto.get_role_policy(&s.role, "ephemera-revoked").is_none(), "an over-limit policy was written");
}
