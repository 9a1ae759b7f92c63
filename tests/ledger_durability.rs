//! The lease ledger across restarts and faults: durable before the reply, resumed after a
//! restart, retried with backoff, irrevocable but never dropped, replay-protected.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use ephemera::ledger::{Event, LeaseFilter, LeaseState};
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

fn token(issuer: &FakeIssuer, now: i64) -> String {
    issuer.sign(&issuer.claims("github-environment-deploy.json", now))
}

fn jwt_of(body: &serde_json::Value) -> String {
    body["credentials"]["api"]["token"].as_str().unwrap().to_string()
}

/// A broker whose every backend fails its first `failures` revocations (`u32::MAX`: forever), and
/// the handle to inspect that fake.
async fn flaky_broker(issuer: &FakeIssuer, failures: u32) -> (Broker, Arc<Mutex<Option<Arc<FlakyRevoke>>>>) {
    let flaky = Arc::new(Mutex::new(None));
    let faults = flaky_backends(flaky.clone(), failures);
    let broker = Broker::start_with_faults(
        &[("ci", "github-actions", issuer)],
        &[("deploy", DEPLOY_POLICY)],
        &Extra::default(),
        Some(faults),
    )
    .await;
    (broker, flaky)
}

/// A broker whose journal's disk is full while the flag it returns is set.
async fn full_disk_broker(issuer: &FakeIssuer) -> (Broker, Arc<AtomicBool>) {
    let full = Arc::new(AtomicBool::new(false));
    let broker = Broker::start_with_faults(
        &[("ci", "github-actions", issuer)],
        &[("deploy", DEPLOY_POLICY)],
        &Extra::default(),
        Some(full_disk(full.clone())),
    )
    .await;
    (broker, full)
}

#[tokio::test]
async fn a_lease_survives_a_restart_and_can_still_be_revoked() {
    let issuer = FakeIssuer::start().await;
    let broker = Broker::start(&issuer, &[("deploy", DEPLOY_POLICY)]).await;
    let t = token(&issuer, NOW);
    let (status, body) = broker.exchange(&t, "deploy").await;
    assert_eq!(status, 201, "{body}");
    let jwt = jwt_of(&body);
    let broker = broker.restart(None).await;
    assert_eq!(broker.introspect(&jwt).await["active"], true, "the lease was lost in the restart");
    let lease = broker.running.app.lease(body["lease_id"].as_str().unwrap()).await.unwrap().unwrap();
    assert_eq!(lease.claims.get("repository_id"), Some(json!("74")), "the claims snapshot was not kept");
    let (_, reply) = broker.revoke(&t, json!({})).await;
    assert_eq!(reply["revoked"], json!([body["lease_id"]]));
    let broker = broker.restart(None).await;
    assert_eq!(broker.introspect(&jwt).await["active"], false, "the revocation was lost in the restart");
}

#[tokio::test]
async fn an_unrecordable_lease_gets_503_and_its_credentials_are_revoked() {
    let issuer = FakeIssuer::start().await;
    let full = Arc::new(AtomicBool::new(false));
    let flaky = Arc::new(Mutex::new(None));
    let mut faults = full_disk(full.clone());
    faults.backend = flaky_backends(flaky.clone(), 0).backend;
    let broker = Broker::start_with_faults(
        &[("ci", "github-actions", &issuer)],
        &[("deploy", DEPLOY_POLICY)],
        &Extra::default(),
        Some(faults),
    )
    .await;
    full.store(true, Ordering::SeqCst);
    let reply = broker.exchange(&token(&issuer, NOW), "deploy").await;
    assert_error(&reply, 503, "unavailable");
    assert!(!reply.1.to_string().contains("eyJ"), "a credential escaped: {}", reply.1);
    let backend = flaky.lock().unwrap().clone().unwrap();
    assert_eq!(backend.revoke_calls.load(Ordering::SeqCst), 1, "the minted JWT was not revoked");
    assert!(broker.running.app.store().counts().await.unwrap().total() == 0, "an unrecorded lease is in memory");
    // The disk recovers: exchanges work again, and the half-written batch did not corrupt the file.
    full.store(false, Ordering::SeqCst);
    let (status, body) = broker.exchange(&token(&issuer, NOW), "deploy").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(broker.journal_events().iter().filter(|e| matches!(e, Event::Created { .. })).count(), 1);
}

#[tokio::test]
async fn a_backend_failing_three_times_then_succeeding_is_revoked_with_the_retries_in_the_journal() {
    let issuer = FakeIssuer::start().await;
    let (broker, flaky) = flaky_broker(&issuer, 3).await;
    let t = token(&issuer, NOW);
    let (_, body) = broker.exchange(&t, "deploy").await;
    let id = body["lease_id"].as_str().unwrap().to_string();
    let (_, reply) = broker.revoke(&t, json!({})).await;
    assert_eq!(reply, json!({"revoked": [], "pending": [id]}));
    // Retries follow the injected clock: step it until the backend gives in.
    for _ in 0..20 {
        if broker.running.app.lease(&id).await.unwrap().map(|l| l.state) == Some(LeaseState::Revoked) {
            break;
        }
        broker.clock.advance(30);
        broker.running.app.reap_once().await;
    }
    assert_eq!(broker.running.app.lease(&id).await.unwrap().map(|l| l.state), Some(LeaseState::Revoked));
    assert_eq!(flaky.lock().unwrap().clone().unwrap().revoke_calls.load(Ordering::SeqCst), 4);
    let events = broker.journal_events();
    let failed: Vec<u32> = events
        .iter()
        .filter_map(|e| if let Event::RevokeFailed { attempts, .. } = e { Some(*attempts) } else { None })
        .collect();
    assert_eq!(failed, [1, 2, 3], "{events:?}");
    assert!(matches!(events.last(), Some(Event::Revoked { .. })), "{events:?}");
}

#[tokio::test]
async fn a_backend_failing_forever_leaves_the_lease_irrevocable_listed_counted_and_retried() {
    let issuer = FakeIssuer::start().await;
    let (broker, flaky) = flaky_broker(&issuer, u32::MAX).await;
    let t = token(&issuer, NOW);
    let (_, body) = broker.exchange(&t, "deploy").await;
    let id = body["lease_id"].as_str().unwrap().to_string();
    broker.revoke(&t, json!({})).await;
    for _ in 0..40 {
        broker.clock.advance(300);
        broker.running.app.reap_once().await;
    }
    let app = &broker.running.app;
    assert_eq!(app.lease(&id).await.unwrap().map(|l| l.state), Some(LeaseState::Irrevocable));
    let listed =
        app.leases(&LeaseFilter { state: Some(LeaseState::Irrevocable), ..LeaseFilter::default() }, 10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].last_error.as_deref().unwrap().contains("injected"), "{:?}", listed[0].last_error);
    assert!(app.metrics_text().await.contains("ephemera_leases_irrevocable 1"));
    let calls = flaky.lock().unwrap().clone().unwrap().revoke_calls.load(Ordering::SeqCst);
    broker.clock.advance(601);
    app.reap_once().await;
    assert_eq!(
        flaky.lock().unwrap().clone().unwrap().revoke_calls.load(Ordering::SeqCst),
        calls + 1,
        "no longer retried"
    );
    // Never dropped, not even long after its expiry.
    broker.clock.advance(30 * 24 * 3600);
    app.reap_once().await;
    assert_eq!(app.lease(&id).await.unwrap().map(|l| l.state), Some(LeaseState::Irrevocable));
}

#[tokio::test]
async fn a_pending_revocation_is_resumed_by_the_next_start_before_ready() {
    let issuer = FakeIssuer::start().await;
    let (broker, _flaky) = flaky_broker(&issuer, u32::MAX).await;
    let t = token(&issuer, NOW);
    let (_, body) = broker.exchange(&t, "deploy").await;
    let id = body["lease_id"].as_str().unwrap().to_string();
    broker.revoke(&t, json!({})).await;
    assert_eq!(broker.running.app.lease(&id).await.unwrap().map(|l| l.state), Some(LeaseState::Revoking));
    let healthy = Arc::new(Mutex::new(None));
    let broker = broker.restart(Some(flaky_backends(healthy.clone(), 0))).await;
    // `restart` returns once /readyz is 200, so the resumption happened before ready.
    assert_eq!(broker.running.app.lease(&id).await.unwrap().map(|l| l.state), Some(LeaseState::Revoked));
    assert_eq!(healthy.lock().unwrap().clone().unwrap().revoke_calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_expiry_that_passed_while_the_broker_was_down_fires_at_start() {
    let issuer = FakeIssuer::start().await;
    let broker = Broker::start(&issuer, &[("deploy", DEPLOY_POLICY)]).await;
    let (_, body) = broker.exchange_raw(&token(&issuer, NOW), r#"{"policy":"deploy","ttl":"5m"}"#).await;
    let id = body["lease_id"].as_str().unwrap().to_string();
    broker.clock.advance(600);
    let broker = broker.restart(None).await;
    assert_eq!(broker.running.app.lease(&id).await.unwrap().map(|l| l.state), Some(LeaseState::Expired));
    assert!(broker.journal_events().iter().any(|e| matches!(e, Event::Expired { id: i, .. } if *i == id)));
}

#[tokio::test]
async fn a_clock_jump_forward_fires_expiries_and_a_jump_backward_expires_nothing_early() {
    let issuer = FakeIssuer::start().await;
    let broker = Broker::start(&issuer, &[("deploy", DEPLOY_POLICY)]).await;
    let (_, body) = broker.exchange_raw(&token(&issuer, NOW), r#"{"policy":"deploy","ttl":"10m"}"#).await;
    let id = body["lease_id"].as_str().unwrap().to_string();
    let app = &broker.running.app;
    broker.clock.set(NOW - 3600);
    app.reap_once().await;
    assert_eq!(
        app.lease(&id).await.unwrap().map(|l| l.state),
        Some(LeaseState::Active),
        "expired early after a backward jump"
    );
    broker.clock.set(NOW + 599);
    app.reap_once().await;
    assert_eq!(app.lease(&id).await.unwrap().map(|l| l.state), Some(LeaseState::Active));
    broker.clock.set(NOW + 1_800);
    app.reap_once().await;
    assert_eq!(
        app.lease(&id).await.unwrap().map(|l| l.state),
        Some(LeaseState::Expired),
        "a forward jump did not fire the expiry"
    );
    // A jump past the retention too: expired, recorded, then forgotten.
    broker.clock.set(NOW + 86_400);
    app.reap_once().await;
    assert_eq!(app.lease(&id).await.unwrap().map(|l| l.state), None);
    assert!(broker.journal_events().iter().any(|e| matches!(e, Event::Expired { id: i, .. } if *i == id)));
}

#[tokio::test]
async fn a_torn_journal_tail_is_cut_at_start_and_the_leases_before_it_survive() {
    let issuer = FakeIssuer::start().await;
    let broker = Broker::start(&issuer, &[("deploy", DEPLOY_POLICY)]).await;
    let (_, body) = broker.exchange(&token(&issuer, NOW), "deploy").await;
    let path = broker.journal_path();
    let dir = broker.dir.clone();
    broker.running.shutdown().await;
    // The records end before the file does: it is grown ahead in zeros, where appends land.
    let (_, good) = ephemera::ledger::journal::decode(&std::fs::read(&path).unwrap()).unwrap();
    assert!(std::fs::metadata(&path).unwrap().len() > good, "the journal has no room after its records");
    // A crash mid-append: a header promising 500 bytes, and only 10 of them, then the zeros.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(
        &f,
        &[244, 1, 0, 0, 1, 2, 3, 4, b'{', b'"', b't', b'"', b':', b'"', b'c', b'r', b'e', b'a'],
        good,
    )
    .unwrap();
    drop(f);
    let running = restart_in(&issuer, &dir).await;
    assert!(running.app.lease(body["lease_id"].as_str().unwrap()).await.unwrap().is_some());
    assert_eq!(std::fs::metadata(&path).unwrap().len(), good, "the torn tail was not cut");
}

#[tokio::test]
async fn a_corrupt_record_before_the_tail_stops_the_start_with_its_offset() {
    let issuer = FakeIssuer::start().await;
    let broker = Broker::start(&issuer, &[("deploy", DEPLOY_POLICY)]).await;
    broker.exchange(&token(&issuer, NOW), "deploy").await;
    broker.exchange(&token(&issuer, NOW), "deploy").await;
    let path = broker.journal_path();
    let dir = broker.dir.clone();
    broker.running.shutdown().await;
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[20] ^= 0xff; // inside the first record
    std::fs::write(&path, &bytes).unwrap();
    let config = ephemera::config::Config::parse(&broker_toml(&issuer), dir.path()).unwrap();
    let clock = Arc::new(ephemera::clock::ManualClock::new(NOW));
    let err = ephemera::server::start(ephemera::server::Options::new(config, false, clock))
        .await
        .err()
        .expect("started anyway");
    assert!(err.contains("corrupt record at byte 8"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "a corrupt journal must be left as it is for an operator");
}

fn broker_toml(issuer: &FakeIssuer) -> String {
    format!(
        "listen = \"127.0.0.1:0\"\n[[issuers]]\nname = \"ci\"\nplatform = \"github-actions\"\nurl = \"{}\"\naudiences = [\"{AUDIENCE}\"]\n\
         [backends.jwt]\ntype = \"jwt\"\n",
        issuer.url
    )
}

async fn restart_in(issuer: &FakeIssuer, dir: &tempfile::TempDir) -> ephemera::server::Running {
    let config = ephemera::config::Config::parse(&broker_toml(issuer), dir.path()).unwrap();
    let clock = Arc::new(ephemera::clock::ManualClock::new(NOW));
    ephemera::server::start(ephemera::server::Options::new(config, false, clock)).await.unwrap()
}

#[tokio::test]
async fn a_token_serves_one_exchange_per_policy_and_still_revokes() {
    let issuer = FakeIssuer::start().await;
    let broker =
        Broker::start(&issuer, &[("deploy", DEPLOY_POLICY), ("other", &DEPLOY_POLICY.replace("15m", "5m"))]).await;
    let t = token(&issuer, NOW);
    let (status, first) = broker.exchange(&t, "deploy").await;
    assert_eq!(status, 201);
    let replay = broker.exchange(&t, "deploy").await;
    assert_error(&replay, 403, "policy_denied");
    assert!(replay.1["error"]["message"].as_str().unwrap().contains("already used"), "{}", replay.1);
    assert_eq!(broker.exchange(&t, "other").await.0, 201, "another policy is another exchange");
    let (_, reply) = broker.revoke(&t, json!({"lease_id": first["lease_id"]})).await;
    assert_eq!(reply["revoked"], json!([first["lease_id"]]), "a used token must still revoke");
    // Persisted: a restart does not forget the used jti.
    let broker = broker.restart(None).await;
    assert_error(&broker.exchange(&t, "deploy").await, 403, "policy_denied");
}

#[tokio::test]
async fn a_denied_or_failed_exchange_does_not_use_up_the_token() {
    let issuer = FakeIssuer::start().await;
    let broker = Broker::start(&issuer, &[("deploy", DEPLOY_POLICY)]).await;
    let t = token(&issuer, NOW);
    assert_error(&broker.exchange_raw(&t, r#"{"policy":"deploy","ttl":"9h"}"#).await, 403, "policy_denied");
    assert_eq!(broker.exchange(&t, "deploy").await.0, 201);
}

#[tokio::test]
async fn replay_protection_can_be_turned_off_per_issuer() {
    let issuer = FakeIssuer::start().await;
    let extra = Extra { issuer_toml: "replay_protection = false".into(), ..Extra::default() };
    let broker = Broker::start_custom(&[("ci", "github-actions", &issuer)], &[("deploy", DEPLOY_POLICY)], &extra).await;
    let t = token(&issuer, NOW);
    assert_eq!(broker.exchange(&t, "deploy").await.0, 201);
    assert_eq!(broker.exchange(&t, "deploy").await.0, 201);
}

#[tokio::test]
async fn a_gitlab_lease_never_outlives_the_job_token() {
    let issuer = FakeIssuer::start().await;
    let yaml = std::fs::read_to_string(repo_path("policies/gitlab-release.yaml")).unwrap();
    let broker = Broker::start_issuers(&[("gitlab", "gitlab-ci", &issuer)], &[("gitlab-release", &yaml)]).await;
    let mut claims = issuer.claims("gitlab-protected-branch.json", NOW);
    claims.insert("exp".into(), json!(NOW + 120)); // the job times out in two minutes
    let (status, body) = broker.exchange(&issuer.sign(&claims), "gitlab-release").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["expires_at"], ephemera::clock::rfc3339(NOW + 120), "the 10m default ttl outlived the job");
}

#[tokio::test]
async fn compaction_keeps_every_remembered_lease_and_drops_history() {
    let issuer = FakeIssuer::start().await;
    let extra = Extra { ledger_toml: "compact_bytes = 1".into(), ..Extra::default() };
    let broker = Broker::start_custom(&[("ci", "github-actions", &issuer)], &[("deploy", DEPLOY_POLICY)], &extra).await;
    let t = token(&issuer, NOW);
    let (_, a) = broker.exchange(&t, "deploy").await;
    let (_, b) = broker.exchange(&token(&issuer, NOW), "deploy").await;
    broker.revoke(&t, json!({"lease_id": a["lease_id"]})).await;
    // compact_bytes = 1: every reap compacts. A compaction waits until every record already in
    // the journal is in memory, so its snapshot holds them all and nothing is carried over.
    broker.running.app.reap_once().await;
    broker.running.app.store().flush().await.unwrap(); // the compaction runs in the background
    let events = broker.journal_events();
    assert_eq!(events.len(), 4, "snapshot (2 leases, 2 jtis) and nothing else: {events:?}");
    let (_, c) = broker.exchange(&token(&issuer, NOW), "deploy").await;
    broker.running.app.reap_once().await;
    broker.running.app.store().flush().await.unwrap();
    let events = broker.journal_events();
    // The revocation's records are gone: the snapshot holds its outcome.
    assert!(events.iter().all(|e| matches!(e, Event::Created { .. } | Event::JtiUsed { .. })), "{events:?}");
    assert_eq!(events.len(), 3 + 3, "{events:?}");
    assert!(c["lease_id"].is_string());
    let claims_before =
        broker.running.app.lease(b["lease_id"].as_str().unwrap()).await.unwrap().unwrap().claims.to_claims();
    let broker = broker.restart(None).await;
    let app = &broker.running.app;
    assert_eq!(app.lease(a["lease_id"].as_str().unwrap()).await.unwrap().unwrap().state, LeaseState::Revoked);
    assert_eq!(app.lease(b["lease_id"].as_str().unwrap()).await.unwrap().unwrap().state, LeaseState::Active);
    // The compacted journal writes claims through its string dictionary; they come back whole
    // (re-evaluation on a policy change decides on them).
    let claims_after = app.lease(b["lease_id"].as_str().unwrap()).await.unwrap().unwrap().claims.to_claims();
    assert!(claims_after.len() > 20, "{claims_after:?}");
    assert_eq!(claims_after, claims_before);
    assert_error(&broker.exchange(&t, "deploy").await, 403, "policy_denied");
}

#[tokio::test]
async fn an_expired_token_cannot_revoke_and_the_lease_stays_until_its_own_end() {
    let issuer = FakeIssuer::start().await;
    let broker = Broker::start(&issuer, &[("deploy", DEPLOY_POLICY)]).await;
    let t = token(&issuer, NOW);
    let (_, body) = broker.exchange(&t, "deploy").await;
    broker.clock.advance(300 + 31); // the token's exp (NOW + 300) plus the leeway
    let reply = broker.revoke(&t, json!({})).await;
    assert_error(&reply, 401, "invalid_token");
    assert_eq!(broker.introspect(&jwt_of(&body)).await["active"], true, "an expired token ended a lease");
    // A fresh token of the same job still can.
    let fresh = token(&issuer, NOW + 331);
    assert_eq!(broker.revoke(&fresh, json!({})).await.1["revoked"], json!([body["lease_id"]]));
}

#[tokio::test]
async fn a_revocation_the_disk_did_not_record_is_reported_pending_and_recorded_once_the_disk_recovers() {
    // Before: the lease was marked revoked in memory, the failed journal write only logged, and
    // the job told `revoked`; after a restart the journal still said active, and the revoked
    // JWT introspected active again.
    let issuer = FakeIssuer::start().await;
    let (broker, full) = full_disk_broker(&issuer).await;
    let t = token(&issuer, NOW);
    let (_, body) = broker.exchange(&t, "deploy").await;
    let id = body["lease_id"].as_str().unwrap().to_string();
    let jwt = jwt_of(&body);
    full.store(true, Ordering::SeqCst);
    let (status, reply) = broker.revoke(&t, json!({})).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply, json!({"revoked": [], "pending": [id]}), "told revoked on a record the disk never took");
    assert_eq!(broker.introspect(&jwt).await["active"], false, "the credential must still die at once");
    let app = &broker.running.app;
    assert_eq!(app.lease(&id).await.unwrap().unwrap().state, LeaseState::Revoking);
    // The disk recovers; the stalled-attempt retry runs the revocation again and records it.
    full.store(false, Ordering::SeqCst);
    broker.clock.advance(ephemera::ledger::STALLED_ATTEMPT_SECS);
    app.reap_once().await;
    assert_eq!(app.lease(&id).await.unwrap().unwrap().state, LeaseState::Revoked);
    let broker = broker.restart(None).await;
    assert_eq!(broker.running.app.lease(&id).await.unwrap().unwrap().state, LeaseState::Revoked);
    assert_eq!(broker.introspect(&jwt).await["active"], false, "the revocation was lost in the restart");
}

#[tokio::test]
async fn a_quiet_expiry_the_disk_did_not_record_stays_pending_and_ends_once_the_disk_recovers() {
    // A lease of broker JWTs only ends in its expiry claim (nothing to revoke upstream). If the
    // disk refuses that claim's record, the lease must not read expired on the strength of it.
    let issuer = FakeIssuer::start().await;
    let (broker, full) = full_disk_broker(&issuer).await;
    let (_, body) = broker.exchange_raw(&token(&issuer, NOW), r#"{"policy":"deploy","ttl":"5m"}"#).await;
    let id = body["lease_id"].as_str().unwrap().to_string();
    let jwt = jwt_of(&body);
    let app = &broker.running.app;
    full.store(true, Ordering::SeqCst);
    broker.clock.advance(300);
    app.reap_once().await;
    assert_eq!(app.lease(&id).await.unwrap().unwrap().state, LeaseState::Revoking, "expired on an unrecorded claim");
    assert_eq!(broker.introspect(&jwt).await["active"], false, "past its expiry the JWT is dead all the same");
    full.store(false, Ordering::SeqCst);
    broker.clock.advance(ephemera::ledger::STALLED_ATTEMPT_SECS);
    app.reap_once().await;
    assert_eq!(app.lease(&id).await.unwrap().unwrap().state, LeaseState::Expired);
    let broker = broker.restart(None).await;
    assert_eq!(broker.running.app.lease(&id).await.unwrap().unwrap().state, LeaseState::Expired, "lost in the restart");
    assert!(broker.journal_events().iter().any(|e| matches!(e, Event::Expired { id: i, .. } if *i == id)));
}
