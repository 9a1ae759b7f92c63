//! The audit sink: one JSON line per exchange, denial, revocation and reload; fingerprints, never
//! secrets; an allowlist of claims; and failing closed when the sink cannot be written.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use ephemera::ledger::LeaseState;
use serde_json::{Value, json};

async fn broker_with_audit(issuer: &FakeIssuer, audit_toml: &str) -> Broker {
    let extra = Extra { hooks_toml: format!("[reload]\nwatch = false\n[audit]\n{audit_toml}\n"), ..Extra::default() };
    Broker::start_custom(&[("ci", "github-actions", issuer)], &[("deploy", DEPLOY_POLICY)], &extra).await
}

fn events(broker: &Broker) -> Vec<Value> {
    std::fs::read_to_string(broker.dir.path().join("audit.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON event per line: {e}: {l}")))
        .collect()
}

#[tokio::test]
async fn every_exchange_denial_and_revocation_is_one_audit_event_with_fingerprints_only() {
    let issuer = FakeIssuer::start().await;
    let broker = broker_with_audit(&issuer, "file = \"audit.jsonl\"").await;
    let token = issuer.sign(&issuer.claims("github-environment-deploy.json", NOW));
    let (status, issued) = broker.exchange(&token, "deploy").await;
    assert_eq!(status, 201, "{issued}");
    let mut wrong_ref = issuer.claims("github-environment-deploy.json", NOW);
    wrong_ref.insert("ref".into(), json!("refs/heads/feature"));
    let (denied_status, denied) = broker.exchange(&issuer.sign(&wrong_ref), "deploy").await;
    assert_eq!(denied_status, 403);
    let (invalid_status, _) = broker.exchange("not.a.token", "deploy").await;
    assert_eq!(invalid_status, 401);
    let (revoke_status, _) = broker.revoke(&token, json!({})).await;
    assert_eq!(revoke_status, 200);

    let events = events(&broker);
    let kinds: Vec<&str> = events.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["exchange", "denial", "denial", "revocation"], "{events:#?}");

    let exchange = &events[0];
    let jwt = issued["credentials"]["api"]["token"].as_str().unwrap();
    assert_eq!(exchange["decision"], "allow");
    assert_eq!(exchange["lease_id"], issued["lease_id"]);
    assert_eq!(exchange["policy"], "deploy");
    assert_eq!(exchange["issuer"], "ci");
    assert_eq!(exchange["job"], issued["job"]);
    assert_eq!(exchange["ttl_secs"], 900);
    assert_eq!(exchange["credentials"]["api"]["kind"], "jwt");
    assert_eq!(exchange["credentials"]["api"]["sha256"]["token"], ephemera::secret::sha256_hex(jwt.as_bytes()));
    assert_eq!(exchange["token_sha256"], ephemera::secret::sha256_hex(token.as_bytes()));
    assert_eq!(exchange["claims"]["repository_id"], "74");
    assert_eq!(exchange["claims"]["ref"], "refs/heads/main");
    assert!(exchange["request_id"].as_str().unwrap().starts_with("req_"));

    let denial = &events[1];
    assert_eq!((denial["decision"].as_str(), denial["deciding_claim"].as_str()), (Some("deny"), Some("ref")));
    // The operator finds the caller's request by the id in the 403 body.
    assert_eq!(denial["request_id"], denied["error"]["request_id"]);
    assert_eq!(denial["claims"]["ref"], "refs/heads/feature");
    assert_eq!(events[2]["code"], "invalid_token");
    assert!(events[2].get("job").is_none(), "no identity for an invalid token");

    let revocation = &events[3];
    assert_eq!(revocation["lease_id"], issued["lease_id"]);
    assert_eq!((revocation["reason"].as_str(), revocation["outcome"].as_str()), (Some("job"), Some("revoked")));

    let raw = std::fs::read_to_string(broker.dir.path().join("audit.jsonl")).unwrap();
    assert!(!raw.contains(jwt) && !raw.contains(&token), "a secret reached the audit file");
}

#[tokio::test]
async fn only_allowlisted_claims_reach_the_audit_event() {
    let issuer = FakeIssuer::start().await;
    let broker = broker_with_audit(&issuer, "file = \"audit.jsonl\"\nclaims = [\"repository\", \"actor\"]").await;
    let (status, _) =
        broker.exchange(&issuer.sign(&issuer.claims("github-environment-deploy.json", NOW)), "deploy").await;
    assert_eq!(status, 201);
    let claims = events(&broker)[0]["claims"].clone();
    let keys: Vec<&String> = claims.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["actor", "repository"], "{claims}");
}

#[tokio::test]
async fn an_unwritable_audit_sink_fails_the_exchange_closed_and_revokes_what_was_minted() {
    let issuer = FakeIssuer::start().await;
    // /dev/full: a real file whose every write fails with ENOSPC, like a full log volume.
    let broker = broker_with_audit(&issuer, "file = \"/dev/full\"").await;
    let (status, body) =
        broker.exchange(&issuer.sign(&issuer.claims("github-environment-deploy.json", NOW)), "deploy").await;

    assert_error(&(status, body.clone()), 503, "unavailable");
    assert!(body.get("credentials").is_none() && !body.to_string().contains("eyJ"), "{body}");
    // The lease was recorded, then revoked before the reply.
    let leases = broker.running.app.leases(&ephemera::ledger::LeaseFilter::default(), 10).await.unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!((leases[0].state, leases[0].reason.as_deref()), (LeaseState::Revoked, Some("audit-unavailable")));
    let jwt_jti = leases[0].credentials[0].data()["jti"].clone();
    assert!(jwt_jti.is_string());

    // A denial cannot be audited either: 503 rather than an unaudited answer.
    let mut wrong_ref = issuer.claims("github-environment-deploy.json", NOW);
    wrong_ref.insert("ref".into(), json!("refs/heads/feature"));
    let denied = broker.exchange(&issuer.sign(&wrong_ref), "deploy").await;
    assert_error(&denied, 503, "unavailable");
    let metrics = broker.running.app.metrics_text().await;
    assert!(
        metrics.lines().any(|l| l.starts_with("ephemera_audit_write_failures_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    assert!(captured_logs().contains("failing the exchange closed"));
}

#[tokio::test]
async fn a_reload_is_audited() {
    let issuer = FakeIssuer::start().await;
    let broker = broker_with_audit(&issuer, "file = \"audit.jsonl\"").await;
    std::fs::write(broker.dir.path().join("policies/broken.yaml"), "issuer: [").unwrap();
    broker.running.app.reload_policies(true).await;
    let events = events(&broker);
    assert_eq!(events.len(), 1);
    assert_eq!((events[0]["event"].as_str(), events[0]["outcome"].as_str()), (Some("reload"), Some("failed")));
    assert!(events[0]["errors"][0].as_str().unwrap().contains("broken.yaml"));
}

#[tokio::test]
async fn an_audit_file_that_cannot_be_opened_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    let toml =
        "listen = \"127.0.0.1:0\"\n[backends.jwt]\ntype = \"jwt\"\n[audit]\nfile = \"no/such/dir/audit.jsonl\"\n";
    let config = ephemera::config::Config::parse(toml, dir.path()).unwrap();
    let clock = std::sync::Arc::new(ephemera::clock::ManualClock::new(NOW));
    let err = match ephemera::server::start(ephemera::server::Options::new(config, false, clock)).await {
        Ok(_) => panic!("started without its audit file"),
        Err(e) => e,
    };
    assert!(err.contains("audit file") && err.contains("no/such/dir/audit.jsonl"), "{err}");
}

#[tokio::test]
async fn every_renewal_is_audited_with_its_lease_and_fingerprints_and_never_the_renew_token() {
    let issuer = FakeIssuer::start().await;
    let renewable = format!("{DEPLOY_POLICY}renew: {{max_lease: 2h}}\n");
    let extra =
        Extra { hooks_toml: "[reload]\nwatch = false\n[audit]\nfile = \"audit.jsonl\"\n".into(), ..Extra::default() };
    let broker = Broker::start_custom(&[("ci", "github-actions", &issuer)], &[("deploy", &renewable)], &extra).await;
    let token = issuer.sign(&issuer.claims("github-environment-deploy.json", NOW));
    let (status, issued) = broker.exchange(&token, "deploy").await;
    assert_eq!(status, 201, "{issued}");
    let lease_id = issued["lease_id"].as_str().unwrap();
    let renew_token = issued["renew"]["token"].as_str().unwrap();
    let renew = |bearer: String| {
        let url = format!("{}/v1/leases/{lease_id}/renew", broker.url);
        let http = broker.http.clone();
        async move {
            let resp = http.post(url).bearer_auth(bearer).send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };
    let (status, renewed) = renew(renew_token.to_string()).await;
    assert_eq!(status, 200, "{renewed}");
    let (status, _) = renew("ephr_not-the-token".to_string()).await;
    assert_eq!(status, 401);

    let events = events(&broker);
    let kinds: Vec<&str> = events.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["exchange", "renewal", "denial"], "{events:#?}");
    let renewal = &events[1];
    let jwt = renewed["credentials"]["api"]["token"].as_str().unwrap();
    assert_eq!((renewal["lease_id"].as_str(), renewal["decision"].as_str()), (Some(lease_id), Some("allow")));
    assert_eq!(renewal["credentials"]["api"]["sha256"]["token"], ephemera::secret::sha256_hex(jwt.as_bytes()));
    assert_eq!(renewal["job"], issued["job"]);
    assert_eq!(renewal["claims"]["repository_id"], "74", "the claims the lease was granted on");
    assert_eq!((events[2]["lease_id"].as_str(), events[2]["code"].as_str()), (Some(lease_id), Some("invalid_token")));
    let raw = std::fs::read_to_string(broker.dir.path().join("audit.jsonl")).unwrap();
    assert!(!raw.contains(renew_token) && !raw.contains(jwt), "a secret reached the audit file");
}

#[tokio::test]
async fn a_renewal_that_cannot_be_audited_fails_closed_and_ends_the_lease() {
    let issuer = FakeIssuer::start().await;
    let renewable = format!("{DEPLOY_POLICY}renew: {{max_lease: 2h}}\n");
    let extra =
        Extra { hooks_toml: "[reload]\nwatch = false\n[audit]\nfile = \"audit.jsonl\"\n".into(), ..Extra::default() };
    let broker = Broker::start_custom(&[("ci", "github-actions", &issuer)], &[("deploy", &renewable)], &extra).await;
    let (status, issued) =
        broker.exchange(&issuer.sign(&issuer.claims("github-environment-deploy.json", NOW)), "deploy").await;
    assert_eq!(status, 201, "{issued}");
    // The log volume fills up: the audit file is now /dev/full (every write fails with ENOSPC).
    let file = broker.dir.path().join("audit.jsonl");
    std::fs::remove_file(&file).unwrap();
    std::os::unix::fs::symlink("/dev/full", &file).unwrap();
    broker.running.app.audit().reopen().await.unwrap();

    let lease_id = issued["lease_id"].as_str().unwrap();
    let resp = broker
        .http
        .post(format!("{}/v1/leases/{lease_id}/renew", broker.url))
        .bearer_auth(issued["renew"]["token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    let answer = (resp.status().as_u16(), resp.json::<Value>().await.unwrap());
    assert_error(&answer, 503, "unavailable");
    let lease = broker.running.app.lease(lease_id).await.unwrap().unwrap();
    assert_eq!((lease.state, lease.reason.as_deref()), (LeaseState::Revoked, Some("audit-unavailable")));
    assert_eq!(broker.introspect(issued["credentials"]["api"]["token"].as_str().unwrap()).await["active"], false);
    assert!(captured_logs().contains("failing the renewal closed"));
}
