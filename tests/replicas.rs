//! Several broker replicas on one shared PostgreSQL database (issue 14), each a real `ephemera
//! serve` process with its own config, data directory, audit file and port: a lease issued on
//! one is seen, revoked and ended on any other; a token replayed to two at once mints once; a
//! webhook may land on any; replicas starting together migrate once; the database going away
//! fails closed and comes back with nothing lost; and a replica killed while it holds a
//! revocation has it finished, once, by the others.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::moto::Moto;
use common::replicas::*;
use common::{DEPLOY_POLICY, aws_backend};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The claims `DEPLOY_POLICY` allows.
const FIXTURE: &str = "github-environment-deploy.json";
/// The job key of [`FIXTURE`].
const JOB: &str = "github:74:7712340001:2:96193868770";

/// Polls `cond` (an expression, `.await` allowed) every [`POLL`] until it holds; panics with
/// `what` (evaluated only then) after `limit`. Evaluates to the time it took.
macro_rules! wait_until {
    ($limit:expr, $cond:expr, $($what:tt)+) => {{
        let start = Instant::now();
        let limit: Duration = $limit;
        loop {
            if $cond {
                break start.elapsed();
            }
            if start.elapsed() > limit {
                panic!("not within {limit:?}: {}", format!($($what)+));
            }
            tokio::time::sleep(POLL).await;
        }
    }};
}

/// Spawns r1, r2 and r3 at once, then waits for each to listen and be ready.
async fn start_three(cluster: &Cluster, extra: &ReplicaExtra) -> [Replica; 3] {
    let mut replicas = ["r1", "r2", "r3"].map(|id| cluster.spawn(id, extra));
    for r in &mut replicas {
        r.wait_listening().await;
    }
    for r in &mut replicas {
        r.wait_ready().await;
    }
    replicas
}

/// Exchanges `token` for the deploy policy on `replica`; returns (lease id, broker JWT).
async fn deploy_lease(replica: &Replica, token: &str) -> (String, String) {
    let (status, body) = replica.exchange(token, "deploy").await;
    assert_eq!(status, 201, "replica {}: exchange: {body}\nstderr:\n{}", replica.id, replica.stderr());
    let lease = body["lease_id"].as_str().unwrap().to_string();
    let jwt = body["credentials"]["api"]["token"].as_str().unwrap().to_string();
    (lease, jwt)
}

async fn lease_state(replica: &Replica, lease: &str) -> String {
    replica.lease(lease).await["state"].as_str().unwrap().to_string()
}

/// Polls introspection on `replica` until the JWT is inactive (at most 1 s); returns the time
/// from `since` to the first inactive answer.
async fn first_inactive(replica: &Replica, jwt: &str, since: Instant) -> Duration {
    let limit = Duration::from_secs(1);
    loop {
        let got = replica.introspect(jwt).await;
        if got["active"] == false {
            assert_eq!(got, json!({"active": false}), "an inactive answer says nothing more");
            return since.elapsed();
        }
        assert!(
            since.elapsed() < limit,
            "replica {} still says active {:?} after the revoke reply: {got}",
            replica.id,
            since.elapsed()
        );
        tokio::time::sleep(POLL).await;
    }
}

// ---- 1. cross-replica introspection -----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_issued_on_one_replica_introspects_active_on_the_others() {
    let cluster = Cluster::new(&pg_server_url(), &[("deploy", DEPLOY_POLICY)]).await;
    let [r1, r2, r3] = start_three(&cluster, &ReplicaExtra::default()).await;
    let (lease, jwt) = deploy_lease(&r1, &cluster.token(FIXTURE)).await;

    for r in [&r2, &r3, &r1] {
        let got = r.introspect(&jwt).await;
        assert_eq!(got["active"], true, "replica {}: {got}\nstderr:\n{}", r.id, r.stderr());
        assert_eq!(got["lease_id"], lease.as_str(), "replica {}: {got}", r.id);
        assert_eq!(got["policy"], "deploy", "replica {}: {got}", r.id);
        let view = r.lease(&lease).await;
        assert_eq!((view["state"].as_str(), view["job"].as_str()), (Some("active"), Some(JOB)), "{view}");
    }
    // Introspection is an admin call outside dev mode, on every replica.
    let resp = r2
        .http
        .post(r2.endpoint("/v1/introspect"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={jwt}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    // One key set, served alike by every replica.
    let jwks = r1.jwks().await;
    assert!(jwks["keys"].as_array().is_some_and(|k| !k.is_empty()), "{jwks}");
    assert_eq!(r2.jwks().await, jwks, "r2 serves another key set than r1");
    assert_eq!(r3.jwks().await, jwks, "r3 serves another key set than r1");

    let db = cluster.db().await;
    let rows = db.query("SELECT id FROM ephemera_leases", &[]).await.unwrap();
    let ids: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, vec![lease], "the shared database holds the one lease");
}

// ---- 2. revoke seen everywhere ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_on_one_replica_is_seen_inactive_on_the_others_within_a_second() {
    let cluster = Cluster::new(&pg_server_url(), &[("deploy", DEPLOY_POLICY)]).await;
    let [r1, r2, r3] = start_three(&cluster, &ReplicaExtra::default()).await;
    let token = cluster.token(FIXTURE);
    let (lease, jwt) = deploy_lease(&r1, &token).await;
    for r in [&r1, &r3] {
        assert_eq!(r.introspect(&jwt).await["active"], true, "replica {} before the revoke", r.id);
    }

    // The job's own token (its jti already used for the exchange) revokes, on another replica.
    let reply = r2.revoke(&token, &json!({"lease_id": lease})).await;
    let replied = Instant::now();
    assert_eq!(reply, (200, json!({"revoked": [lease], "pending": []})), "stderr:\n{}", r2.stderr());

    let (on_r1, on_r3) = tokio::join!(first_inactive(&r1, &jwt, replied), first_inactive(&r3, &jwt, replied));
    eprintln!("revoke visibility latency (revoke reply on r2 → first inactive answer): r1 {on_r1:?}, r3 {on_r3:?}");
    assert!(on_r1 < Duration::from_secs(1) && on_r3 < Duration::from_secs(1));
    for r in [&r1, &r3] {
        let view = r.lease(&lease).await;
        assert_eq!((view["state"].as_str(), view["reason"].as_str()), (Some("revoked"), Some("job")), "{view}");
    }
}

// ---- 3. one token replayed to two replicas at once mints once ---------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_sent_to_two_replicas_at_the_same_moment_mints_once() {
    const ROUNDS: usize = 20;
    let cluster = Cluster::new(&pg_server_url(), &[("deploy", DEPLOY_POLICY)]).await;
    let [r1, r2, r3] = start_three(&cluster, &ReplicaExtra::default()).await;

    let mut issued = Vec::new();
    let mut wins = [0usize; 2];
    let mut last_token = String::new();
    for round in 0..ROUNDS {
        let token = cluster.token(FIXTURE);
        let (a, b) = tokio::join!(r1.exchange(&token, "deploy"), r2.exchange(&token, "deploy"));
        let (winner, loser) = match (a.0, b.0) {
            (201, 403) => {
                wins[0] += 1;
                (a, b)
            }
            (403, 201) => {
                wins[1] += 1;
                (b, a)
            }
            _ => panic!(
                "round {round}: the same token on r1 and r2 at once must mint exactly once: r1 {a:?}, r2 {b:?}\n\
                 r1 stderr:\n{}\nr2 stderr:\n{}",
                r1.stderr(),
                r2.stderr()
            ),
        };
        assert_eq!(loser.1["error"]["code"], "policy_denied", "round {round}: {}", loser.1);
        issued.push(winner.1["lease_id"].as_str().unwrap().to_string());
        last_token = token;
    }
    eprintln!("replay race: r1 won {} rounds, r2 won {}", wins[0], wins[1]);
    // And later, on the third replica.
    let (status, body) = r3.exchange(&last_token, "deploy").await;
    assert_eq!((status, &body["error"]["code"]), (403, &json!("policy_denied")), "{body}");

    let issued_set: BTreeSet<String> = issued.iter().cloned().collect();
    assert_eq!(issued_set.len(), ROUNDS, "lease ids repeat: {issued:?}");
    let (status, list) = r3.admin_get(&format!("/v1/leases?job={JOB}")).await;
    assert_eq!(status, 200, "{list}");
    let listed: BTreeSet<String> =
        list["leases"].as_array().unwrap().iter().map(|l| l["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(listed, issued_set, "r3 lists exactly the leases the winners reported");

    let db = cluster.db().await;
    let leases: i64 = db.query_one("SELECT count(*) FROM ephemera_leases", &[]).await.unwrap().get(0);
    let keys: i64 = db.query_one("SELECT count(*) FROM ephemera_replay_keys", &[]).await.unwrap().get(0);
    assert_eq!((leases, keys), (ROUNDS as i64, ROUNDS as i64), "one lease and one replay key per token");
}

// ---- 4. a webhook on any replica --------------------------------------------------------------

fn workflow_job_completed() -> String {
    json!({
        "action": "completed",
        "workflow_job": {
            "id": 96_193_868_770u64, "run_id": 7_712_340_001u64, "run_attempt": 2, "status": "completed",
            "conclusion": "success", "name": "deploy", "labels": ["ubuntu-latest"],
        },
        "repository": {"id": 74, "full_name": "octo-org/octo-repo"},
        "sender": {"login": "octocat"},
    })
    .to_string()
}

/// A correctly signed `workflow_job` delivery to `replica`.
async fn github_delivery(replica: &Replica, delivery: &str, body: &str) -> (u16, Value) {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, GITHUB_SECRET.as_bytes());
    let signature = format!("sha256={}", ephemera::secret::hex(ring::hmac::sign(&key, body.as_bytes()).as_ref()));
    let resp = replica
        .http
        .post(replica.endpoint("/v1/hooks/github"))
        .header("x-github-event", "workflow_job")
        .header("x-github-delivery", delivery)
        .header("x-hub-signature-256", signature)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    status_json(resp).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_delivered_to_any_replica_ends_the_job_and_a_redelivery_elsewhere_is_a_duplicate() {
    let cluster = Cluster::new(&pg_server_url(), &[("deploy", DEPLOY_POLICY)]).await;
    let hooks = ReplicaExtra { tail_toml: cluster.github_hooks_toml(), ..ReplicaExtra::default() };
    let [r1, r2, r3] = start_three(&cluster, &hooks).await;
    let (first, first_jwt) = deploy_lease(&r1, &cluster.token(FIXTURE)).await;

    let delivery = format!("d-{}", ephemera::secret::hex(&ephemera::ids::random::<8>()));
    let body = workflow_job_completed();
    let reply = github_delivery(&r3, &delivery, &body).await;
    assert_eq!(reply, (200, json!({"revoked": [first], "pending": []})), "stderr:\n{}", r3.stderr());
    let view = r2.lease(&first).await;
    assert_eq!((view["state"].as_str(), view["reason"].as_str()), (Some("revoked"), Some("webhook")), "{view}");
    assert_eq!(r2.introspect(&first_jwt).await["active"], false);

    // A new lease of the same job; the same delivery, redelivered to another replica, must not
    // touch it.
    let (second, second_jwt) = deploy_lease(&r1, &cluster.token(FIXTURE)).await;
    let redelivered = github_delivery(&r2, &delivery, &body).await;
    let second_state = lease_state(&r3, &second).await;
    assert_eq!(
        redelivered,
        (200, json!({"duplicate": true})),
        "the delivery id r3 acted on is not known to r2 (delivery ids are not shared across replicas)"
    );
    assert_eq!(second_state, "active", "a redelivered webhook ended another lease");
    assert_eq!(r1.introspect(&second_jwt).await["active"], true);
}

// ---- 5. replicas starting together migrate once -----------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_starting_together_on_an_empty_database_apply_each_schema_version_once() {
    let server = pg_server_url();
    for round in 0..3 {
        let cluster = Cluster::new(&server, &[("deploy", DEPLOY_POLICY)]).await;
        // Both processes exist before either is waited for.
        let mut a = cluster.spawn("r1", &ReplicaExtra::default());
        let mut b = cluster.spawn("r2", &ReplicaExtra::default());
        a.wait_listening().await;
        b.wait_listening().await;
        a.wait_ready().await;
        b.wait_ready().await;

        let db = cluster.db().await;
        let row = db
            .query_one("SELECT count(*), max(version), count(DISTINCT version) FROM ephemera_schema", &[])
            .await
            .unwrap();
        let (rows, max, distinct): (i64, Option<i32>, i64) = (row.get(0), row.get(1), row.get(2));
        let latest = ephemera::ledger::SCHEMA_VERSION;
        assert_eq!(
            (rows, max, distinct),
            (i64::from(latest), Some(latest), i64::from(latest)),
            "round {round}: one row per schema version\nr1 stderr:\n{}\nr2 stderr:\n{}",
            a.stderr(),
            b.stderr()
        );
        let by: Vec<String> =
            db.query("SELECT applied_by FROM ephemera_schema", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
        assert!(by.iter().all(|r| r == "r1" || r == "r2"), "round {round}: applied by {by:?}");

        // Both work on the schema: a lease from one, introspected on the other.
        let (lease, jwt) = deploy_lease(&a, &cluster.token(FIXTURE)).await;
        assert_eq!(b.introspect(&jwt).await["lease_id"], lease.as_str());
    }
}

// ---- 6. PostgreSQL stopped and restarted mid-storm --------------------------------------------

struct Outcome {
    sent: Instant,
    answered: Instant,
    status: u16,
    body: Value,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_and_restarted_mid_storm_fails_closed_recovers_and_loses_no_lease() {
    const TASKS: usize = 4;
    const ENOUGH: usize = 8;
    let pg = OwnPg::start().await;
    let cluster = Arc::new(Cluster::new(&pg.url, &[("deploy", DEPLOY_POLICY)]).await);
    let extra = ReplicaExtra { ledger_toml: "statement_timeout = \"2s\"\n".into(), ..ReplicaExtra::default() };
    let mut r1 = cluster.start("r1", &extra).await;

    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(Mutex::new(Vec::<Outcome>::new()));
    let url = r1.endpoint("/v1/exchange");
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (cluster, stop, outcomes, url) = (cluster.clone(), stop.clone(), outcomes.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let http = http_client(Duration::from_secs(15));
            while !stop.load(Ordering::SeqCst) {
                let token = cluster.token(FIXTURE);
                let sent = Instant::now();
                let result = http.post(&url).bearer_auth(&token).json(&json!({"policy": "deploy"})).send().await;
                let (status, body) = match result {
                    Ok(resp) => status_json(resp).await,
                    Err(e) => (0, Value::String(e.to_string())),
                };
                outcomes.lock().unwrap().push(Outcome { sent, answered: Instant::now(), status, body });
            }
        }));
    }
    let count = |pred: &dyn Fn(&Outcome) -> bool| outcomes.lock().unwrap().iter().filter(|o| pred(o)).count();

    wait_until!(Duration::from_secs(20), count(&|o| o.status == 201) >= ENOUGH, "{ENOUGH} exchanges before the stop");
    let stop_begin = Instant::now();
    pg.stop().await;
    let stopped = Instant::now();
    eprintln!("scripts/pg stop took {:?}", stopped - stop_begin);

    let unready = wait_until!(
        Duration::from_secs(10),
        r1.readyz().await.0 != 200,
        "/readyz still 200 with the database stopped: {:?}",
        r1.readyz().await
    );
    let (status, readyz) = r1.readyz().await;
    assert_eq!(status, 503, "{readyz}");
    eprintln!("readyz non-ready {unready:?} after the stop returned: {readyz}");
    wait_until!(
        Duration::from_secs(10),
        count(&|o| o.sent >= stopped) >= ENOUGH,
        "{ENOUGH} exchanges answered while the database is down; stderr:\n{}",
        r1.stderr()
    );

    let restart_begin = Instant::now();
    let url_again = pg.restart().await;
    assert_eq!(url_again, pg.url, "the restarted server is on the same port");
    let back = r1.wait_ready_within(Duration::from_secs(20)).await;
    let ready_again = Instant::now();
    eprintln!("readyz 200 again {back:?} after the restart returned");
    wait_until!(
        Duration::from_secs(20),
        count(&|o| o.sent >= ready_again && o.status == 201) >= ENOUGH,
        "{ENOUGH} exchanges after the database came back; stderr:\n{}",
        r1.stderr()
    );
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.unwrap();
    }

    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    let describe = |o: &Outcome| format!("{} {}", o.status, o.body);
    for o in &outcomes {
        assert!(o.status == 201 || o.status == 503, "an exchange answered {}", describe(o));
        if o.status == 503 {
            assert_eq!(o.body["error"]["code"], "unavailable", "{}", describe(o));
        }
    }
    let before: Vec<&Outcome> = outcomes.iter().filter(|o| o.answered < stop_begin).collect();
    let down: Vec<&Outcome> = outcomes.iter().filter(|o| o.sent >= stopped && o.answered <= restart_begin).collect();
    let after: Vec<&Outcome> = outcomes.iter().filter(|o| o.sent >= ready_again).collect();
    assert!(before.iter().all(|o| o.status == 201), "a 503 while the database was up");
    assert!(!down.is_empty(), "no exchange was answered while the database was down");
    assert!(down.iter().all(|o| o.status == 503), "a 201 while the database was down");
    assert!(after.iter().all(|o| o.status == 201), "a 503 after /readyz said ready again");
    eprintln!(
        "storm: {} exchanges ({} before the stop, {} while down, {} after ready), {} issued",
        outcomes.len(),
        before.len(),
        down.len(),
        after.len(),
        outcomes.iter().filter(|o| o.status == 201).count()
    );

    // Nothing lost: every 201 is a lease in the database.
    let issued: Vec<String> =
        outcomes.iter().filter(|o| o.status == 201).map(|o| o.body["lease_id"].as_str().unwrap().to_string()).collect();
    let db = cluster.db().await;
    let rows = db.query("SELECT id FROM ephemera_leases WHERE id = ANY($1)", &[&issued]).await.unwrap();
    let stored: BTreeSet<String> = rows.iter().map(|r| r.get(0)).collect();
    let missing: Vec<&String> = issued.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} issued leases are not in the database: {missing:?}",
        missing.len(),
        issued.len()
    );
    drop(r1);
}

// ---- 7. kill -9 of a replica holding claimed work ---------------------------------------------

const AWS_POLICY: &str = r#"
issuer: ci
match:
  repository_id: "74"
ttl: {default: 5m, max: 1h}
grants:
  aws:
    backend: aws
    role_arn: ROLE_ARN
"#;

/// A TCP listener that accepts connections and never answers; counts what it accepted.
async fn black_hole() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            held.push(stream);
        }
    });
    (endpoint, accepted)
}

fn revocation_events(replica: &Replica, lease: &str) -> Vec<Value> {
    replica.audit_events().into_iter().filter(|e| e["event"] == "revocation" && e["lease_id"] == lease).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_while_holding_a_revocation_has_it_finished_once_by_the_others() {
    let moto = tokio::task::spawn_blocking(Moto::start).await.unwrap();
    let role = format!("deploy-{}", ephemera::secret::hex(&ephemera::ids::random::<4>()));
    let arn = tokio::task::block_in_place(|| moto.create_role(&role));
    let policy = AWS_POLICY.replace("ROLE_ARN", &arn);
    let cluster = Cluster::new(&pg_server_url(), &[("deploy-aws", &policy)]).await;
    let (hole, accepted) = black_hole().await;

    let ledger_toml = "claim_timeout = \"2s\"\n".to_string();
    let (hole_toml, _hole_creds) = aws_backend(&hole, "deny-policy");
    let (moto_toml, _moto_creds) = aws_backend(&moto.endpoint, "deny-policy");
    let stuck = ReplicaExtra {
        ledger_toml: ledger_toml.clone(),
        backends_toml: format!("{hole_toml}timeout = \"30s\"\n"),
        ..ReplicaExtra::default()
    };
    let healthy = ReplicaExtra { ledger_toml, backends_toml: moto_toml, ..ReplicaExtra::default() };
    let mut r1 = cluster.spawn("r1", &stuck);
    let mut r2 = cluster.spawn("r2", &healthy);
    let mut r3 = cluster.spawn("r3", &healthy);
    for r in [&mut r1, &mut r2, &mut r3] {
        r.wait_listening().await;
    }
    for r in [&mut r1, &mut r2, &mut r3] {
        r.wait_ready().await;
    }

    let token = cluster.token(FIXTURE);
    let (status, body) = r2.exchange(&token, "deploy-aws").await;
    assert_eq!(status, 201, "{body}\nstderr:\n{}", r2.stderr());
    assert_eq!(body["credentials"]["aws"]["revocation"], "deny-policy", "{body}");
    let lease = body["lease_id"].as_str().unwrap().to_string();

    // r1 claims the revocation and hangs on the black hole.
    let revoke = {
        let (http, url, token, lease) = (r1.http.clone(), r1.endpoint("/v1/revoke"), token.clone(), lease.clone());
        tokio::spawn(async move { http.post(url).bearer_auth(token).json(&json!({"lease_id": lease})).send().await })
    };
    wait_until!(
        Duration::from_secs(10),
        lease_state(&r2, &lease).await == "revoking",
        "the lease is not `revoking` as seen from r2: {}\nr1 stderr:\n{}",
        r2.lease(&lease).await,
        r1.stderr()
    );
    wait_until!(
        Duration::from_secs(10),
        accepted.load(Ordering::SeqCst) >= 1,
        "r1 never connected to its (black-hole) AWS endpoint; r1 stderr:\n{}",
        r1.stderr()
    );
    assert!(!revoke.is_finished(), "r1 answered the revoke although its backend never answers");
    let db = cluster.db().await;
    let row =
        db.query_one("SELECT state, claimed_by FROM ephemera_lease_state WHERE id = $1", &[&lease]).await.unwrap();
    let (state, claimed_by): (String, Option<String>) = (row.get(0), row.get(1));
    assert_eq!((state.as_str(), claimed_by.as_deref()), ("revoking", Some("r1")), "r1 holds the claim");
    r1.kill();
    let killed = Instant::now();
    let _ = revoke.await;

    let taken_over = wait_until!(
        Duration::from_secs(30),
        lease_state(&r2, &lease).await == "revoked",
        "the lease was not revoked by the survivors: {}\nr2 stderr:\n{}\nr3 stderr:\n{}",
        r2.lease(&lease).await,
        r2.stderr(),
        r3.stderr()
    );
    eprintln!(
        "survivors finished the dead replica's revocation {:?} after kill -9 (claim_timeout 2s; {taken_over:?} of polling)",
        killed.elapsed()
    );
    assert_eq!(lease_state(&r3, &lease).await, "revoked");

    // The deny policy on the role names the lease (the session's source identity).
    let doc = tokio::task::block_in_place(|| moto.get_role_policy(&role, "ephemera-revoked"))
        .expect("no ephemera-revoked policy on the role");
    let denied: Vec<&Value> = doc["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|st| st["Effect"] == "Deny")
        .flat_map(|st| st["Condition"]["StringEquals"]["aws:SourceIdentity"].as_array().unwrap())
        .collect();
    assert!(denied.contains(&&json!(lease)), "the deny policy does not list {lease}: {doc}");

    // Done exactly once by the survivors.
    wait_until!(
        Duration::from_secs(10),
        revocation_events(&r2, &lease).len() + revocation_events(&r3, &lease).len() >= 1,
        "no revocation audit event on r2 or r3"
    );
    let events: Vec<Value> = [&r2, &r3].iter().flat_map(|r| revocation_events(r, &lease)).collect();
    let successes = events.iter().filter(|e| e["outcome"] == "revoked").count();
    assert_eq!(successes, 1, "revocation successes across r2 and r3: {events:#?}");
    eprintln!(
        "revocation events: r2 {}, r3 {}; r1 (killed) {}",
        revocation_events(&r2, &lease).len(),
        revocation_events(&r3, &lease).len(),
        revocation_events(&r1, &lease).len()
    );
}
