//! Abuse limits and bounds (issue 21) over real HTTP and real sockets: a flood of bad tokens is
//! cooled off before any signature check while the job's revoke still works; repositories and
//! issuers have their own buckets; `X-Forwarded-For` counts only from a trusted proxy; a
//! slowloris connection, a slow body and oversized headers are cut off; past `max_issuing` a
//! request gets 503 while revocation still answers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use ephemera::mint::{Backend, BoxFuture, MintContext, MintError, Minted, Revocation, RevokeHandle};
use ephemera::policy::{Grant, GrantedCredential};
use ephemera::server::Faults;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn broker_with(issuer: &FakeIssuer, limits: &str, faults: Option<Faults>) -> Broker {
    let extra = Extra {
        hooks_toml: format!("[reload]\nwatch = false\n[audit]\nfile = \"audit.jsonl\"\n[limits]\n{limits}\n"),
        ..Extra::default()
    };
    let policies = [("push", PUSH_POLICY), ("other", OTHER_REPO_POLICY)];
    Broker::start_with_faults(&[("ci", "github-actions", issuer)], &policies, &extra, faults).await
}

/// Repository 75's policy, so two repositories exchange side by side.
const OTHER_REPO_POLICY: &str = r#"
issuer: ci
match: {repository_id: "75", ref: refs/heads/main}
ttl: {default: 10m, max: 30m}
grants:
  api: {backend: jwt, audience: https://api.internal.example}
"#;

fn push_token(issuer: &FakeIssuer) -> String {
    issuer.sign(&issuer.claims("github-push-immutable-sub.json", NOW))
}

fn other_repo_token(issuer: &FakeIssuer) -> String {
    let mut claims = issuer.claims("github-push-immutable-sub.json", NOW);
    claims.insert("repository_id".into(), json!("75"));
    issuer.sign(&claims)
}

/// A token whose signature is wrong (its last bytes changed).
fn forged(token: &str) -> String {
    let (head, sig) = token.rsplit_once('.').unwrap();
    let flipped: String = sig.chars().rev().collect();
    format!("{head}.{flipped}")
}

async fn post_exchange(broker: &Broker, token: &str, policy: &str, forwarded_for: Option<&str>) -> reqwest::Response {
    let mut request =
        broker.http.post(format!("{}/v1/exchange", broker.url)).bearer_auth(token).json(&json!({"policy": policy}));
    if let Some(xff) = forwarded_for {
        request = request.header("x-forwarded-for", xff);
    }
    request.send().await.unwrap()
}

fn audit_events(broker: &Broker, event: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(broker.dir.path().join("audit.jsonl")).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()).filter(|e| e["event"] == event).collect()
}

fn metric(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
}

#[tokio::test]
async fn a_flood_of_bad_tokens_is_cooled_off_before_any_check_while_the_jobs_revoke_still_works() {
    let issuer = FakeIssuer::start().await;
    let broker = broker_with(&issuer, "failures = { per_second = 1, burst = 5 }\ncool_off = \"30s\"", None).await;
    let token = push_token(&issuer);
    let (status, lease) = broker.exchange(&token, "push").await;
    assert_eq!(status, 201, "{lease}");
    // Six bad signatures: five fit the failure budget, the sixth starts the cool-off. Each is
    // answered as what it is.
    for _ in 0..6 {
        assert_error(&broker.exchange(&forged(&push_token(&issuer)), "push").await, 401, "invalid_token");
    }
    // In the cool-off even a valid token is refused before it is looked at: nothing is minted.
    let leases_before = broker.running.app.store().list(&Default::default(), usize::MAX).await.unwrap().len();
    for _ in 0..10 {
        let response = post_exchange(&broker, &push_token(&issuer), "push", None).await;
        assert_eq!(response.status().as_u16(), 429);
        assert_eq!(response.headers()["retry-after"], "30");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "rate_limited", "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("repeated failures"), "{body}");
    }
    let leases_after = broker.running.app.store().list(&Default::default(), usize::MAX).await.unwrap().len();
    assert_eq!(leases_after, leases_before, "a refused request minted something");
    // The job that holds a lease can still end it: revocation is never limited.
    let (status, revoked) = broker.revoke(&token, json!({})).await;
    assert_eq!(status, 200, "{revoked}");
    assert_eq!(revoked["revoked"], json!([lease["lease_id"]]));
    // Ten refusals, one audit event; every one counted in the metrics.
    let events = audit_events(&broker, "rate-limited");
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!((events[0]["limit"].as_str(), events[0]["key"].as_str()), (Some("cool-off"), Some("127.0.0.1")));
    assert_eq!(audit_events(&broker, "denial").len(), 6, "the six bad tokens are audited one by one");
    let (_, metrics) = broker.get("/metrics").await;
    assert_eq!(metric(&metrics, "ephemera_rate_limited_total{limit=\"cool-off\"}"), 10);
    // When the cool-off ends, the address is served again.
    broker.clock.advance(30);
    let (status, body) = broker.exchange(&push_token(&issuer), "push").await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test]
async fn a_repository_past_its_bucket_is_refused_while_another_repository_goes_on() {
    let issuer = FakeIssuer::start().await;
    let broker = broker_with(&issuer, "repository = { per_second = 1, burst = 2 }", None).await;
    for _ in 0..2 {
        assert_eq!(broker.exchange(&push_token(&issuer), "push").await.0, 201);
    }
    let response = post_exchange(&broker, &push_token(&issuer), "push", None).await;
    assert_eq!(response.status().as_u16(), 429);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(response.json::<Value>().await.unwrap()["error"]["code"], "rate_limited");
    // Its neighbour has a bucket of its own.
    let (status, body) = broker.exchange(&other_repo_token(&issuer), "other").await;
    assert_eq!(status, 201, "{body}");
    // The refused exchange is one `rate-limited` event naming the repository by its ids, not an
    // exchange event, and the bucket refills with time.
    let events = audit_events(&broker, "rate-limited");
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["limit"], "repository");
    assert!(events[0]["key"].as_str().unwrap().starts_with("ci:74:"), "{events:?}");
    assert_eq!(audit_events(&broker, "exchange").len(), 3);
    broker.clock.advance(1);
    assert_eq!(broker.exchange(&push_token(&issuer), "push").await.0, 201);
}

#[tokio::test]
async fn an_issuer_past_its_bucket_is_refused_for_every_repository() {
    let issuer = FakeIssuer::start().await;
    let broker = broker_with(
        &issuer,
        "repository = { per_second = 0, burst = 1 }\nissuer = { per_second = 1, burst = 2 }",
        None,
    )
    .await;
    assert_eq!(broker.exchange(&push_token(&issuer), "push").await.0, 201);
    assert_eq!(broker.exchange(&other_repo_token(&issuer), "other").await.0, 201);
    let refused = broker.exchange(&other_repo_token(&issuer), "other").await;
    assert_error(&refused, 429, "rate_limited");
    assert!(refused.1["error"]["message"].as_str().unwrap().contains("token issuer"), "{}", refused.1);
}

#[tokio::test]
async fn x_forwarded_for_names_the_client_only_behind_a_trusted_proxy() {
    let issuer = FakeIssuer::start().await;
    // Anyone may send the header; from an untrusted peer it changes nothing.
    let broker =
        broker_with(&issuer, "address = { per_second = 1, burst = 1 }\nfailures = { per_second = 0, burst = 1 }", None)
            .await;
    assert_eq!(post_exchange(&broker, "x", "push", Some("203.0.113.1")).await.status().as_u16(), 401);
    assert_eq!(post_exchange(&broker, "x", "push", Some("203.0.113.2")).await.status().as_u16(), 429);
    // Behind a trusted proxy (the test's own loopback), each forwarded-for client has its own bucket.
    let broker = broker_with(
        &issuer,
        "address = { per_second = 1, burst = 1 }\nfailures = { per_second = 0, burst = 1 }\ntrusted_proxies = [\"127.0.0.1\"]",
        None,
    )
    .await;
    assert_eq!(post_exchange(&broker, "x", "push", Some("203.0.113.1")).await.status().as_u16(), 401);
    assert_eq!(post_exchange(&broker, "x", "push", Some("203.0.113.2")).await.status().as_u16(), 401);
    // A client cannot escape its bucket by prepending a hop of its choosing.
    let response = post_exchange(&broker, "x", "push", Some("6.6.6.6, 203.0.113.1")).await;
    assert_eq!(response.status().as_u16(), 429);
    let events = audit_events(&broker, "rate-limited");
    assert_eq!(events[0]["key"], "203.0.113.1", "{events:?}");
}

/// Reads until the server closes the connection; what it sent before closing.
async fn read_until_closed(stream: &mut tokio::net::TcpStream) -> String {
    let mut out = Vec::new();
    // A bound on the test itself, not a timing assertion: the server closes well before.
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut out))
        .await
        .expect("the server never closed the connection")
        .ok();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_slowloris_connection_and_an_idle_keep_alive_are_closed_after_the_header_timeout() {
    let issuer = FakeIssuer::start().await;
    let broker = broker_with(&issuer, "header_read_timeout = \"1s\"", None).await;
    let addr = broker.running.addr;
    // Half a request head, then nothing.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"POST /v1/exchange HTTP/1.1\r\nHost: broker\r\nX-Slow: ").await.unwrap();
    let said = read_until_closed(&mut slow).await;
    assert!(!said.contains("201") && !said.contains("200 OK"), "{said}");
    // One whole request answered, then idle on a keep-alive connection: closed too.
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: broker\r\n\r\n").await.unwrap();
    let said = read_until_closed(&mut idle).await;
    assert!(said.starts_with("HTTP/1.1 200"), "{said}");
    // The broker still serves everyone else.
    assert_eq!(broker.get("/healthz").await.0, 200);
}

#[tokio::test]
async fn a_body_sent_too_slowly_gets_408_and_oversized_headers_get_431() {
    let issuer = FakeIssuer::start().await;
    let broker = broker_with(&issuer, "body_read_timeout = \"1s\"\nmax_header_bytes = 8192", None).await;
    let mut slow = tokio::net::TcpStream::connect(broker.running.addr).await.unwrap();
    slow.write_all(
        b"POST /v1/exchange HTTP/1.1\r\nHost: broker\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"pol",
    )
    .await
    .unwrap();
    let said = read_until_closed(&mut slow).await;
    assert!(said.starts_with("HTTP/1.1 408"), "{said}");
    assert!(said.contains("\"code\":\"request_timeout\""), "{said}");
    let big = "a".repeat(9000);
    let response = broker.http.get(format!("{}/healthz", broker.url)).header("x-big", big).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 431);
}

/// A `jwt` backend whose mints wait at a gate the test opens. A fake: it holds an exchange in
/// flight for as long as the test needs, which no real backend does on cue.
struct Gated {
    inner: Arc<dyn Backend>,
    gate: Arc<tokio::sync::Semaphore>,
}

impl Backend for Gated {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn revocation(&self) -> Revocation {
        self.inner.revocation()
    }
    fn mint<'a>(
        &'a self,
        grant: &'a Grant,
        cred: &'a GrantedCredential,
        ctx: MintContext<'a>,
    ) -> BoxFuture<'a, Result<Minted, MintError>> {
        Box::pin(async move {
            let _pass = self.gate.acquire().await.unwrap();
            self.inner.mint(grant, cred, ctx).await
        })
    }
    fn revoke<'a>(&'a self, handle: &'a RevokeHandle) -> BoxFuture<'a, Result<(), MintError>> {
        self.inner.revoke(handle)
    }
}

#[tokio::test]
async fn past_max_issuing_a_request_gets_503_while_revocation_still_answers() {
    let issuer = FakeIssuer::start().await;
    let gate = Arc::new(tokio::sync::Semaphore::new(1));
    let faults = Faults {
        backend: Some(Arc::new({
            let gate = gate.clone();
            move |_: &str, inner: Arc<dyn Backend>| -> Arc<dyn Backend> {
                Arc::new(Gated { inner, gate: gate.clone() })
            }
        })),
        storage: None,
    };
    let broker = broker_with(&issuer, "max_issuing = 1\nissuing_wait = \"1s\"", Some(faults)).await;
    // A lease issued while the gate is open.
    let token = push_token(&issuer);
    let (status, lease) = broker.exchange(&token, "push").await;
    assert_eq!(status, 201, "{lease}");
    // Close the gate: the next exchange holds the one issuing slot.
    let held = gate.clone().acquire_owned().await.unwrap();
    let url = broker.url.clone();
    let stuck_token = other_repo_token(&issuer);
    let stuck = tokio::spawn(async move {
        reqwest::Client::new()
            .post(format!("{url}/v1/exchange"))
            .bearer_auth(stuck_token)
            .json(&json!({"policy": "other"}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    });
    // Wait (on the broker's own count, not the clock) until that exchange holds the slot.
    tokio::time::timeout(Duration::from_secs(20), async {
        while broker.running.app.limits().issuing_in_flight() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the held exchange never started");
    let response = post_exchange(&broker, &push_token(&issuer), "push", None).await;
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(response.json::<Value>().await.unwrap()["error"]["code"], "overloaded");
    // Revocation takes no issuing slot.
    let (status, revoked) = broker.revoke(&token, json!({})).await;
    assert_eq!(status, 200, "{revoked}");
    assert_eq!(revoked["revoked"], json!([lease["lease_id"]]));
    drop(held);
    assert_eq!(stuck.await.unwrap(), 201, "the held exchange completes once its backend answers");
    let (_, metrics) = broker.get("/metrics").await;
    assert_eq!(metric(&metrics, "ephemera_overloaded_total"), 1);
}

#[tokio::test]
async fn a_slow_body_holds_its_connection_but_never_an_issuing_slot() {
    let issuer = FakeIssuer::start().await;
    let broker =
        broker_with(&issuer, "max_issuing = 1\nissuing_wait = \"1s\"\nbody_read_timeout = \"60s\"", None).await;
    // Two clients send their headers and then dribble: with the one slot taken by either, every
    // exchange would be refused for as long as they keep it.
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut conn = tokio::net::TcpStream::connect(broker.running.addr).await.unwrap();
        conn.write_all(b"POST /v1/exchange HTTP/1.1\r\nHost: broker\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
            .await
            .unwrap();
        slow.push(conn);
    }
    let (status, body) = broker.exchange(&push_token(&issuer), "push").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(broker.running.app.limits().issuing_in_flight(), 0);
    drop(slow);
}
