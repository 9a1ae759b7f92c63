//! End to end, crashes and shutdowns: the real `ephemera serve --dev` binary killed with SIGKILL
//! mid-stream, stopped with SIGTERM mid-request, and started on a damaged journal.
//!
//! The promise under test: a lease whose exchange got a 201 is durable. Whatever happens to the
//! process afterwards, the next start on the same data directory knows it (its JWT introspects
//! active, the job's revoke ends it) and keeps its expiry. Each test has its own broker, port and
//! data directory, so the tests run in parallel without sharing anything.
// Test helpers outside `#[test]` functions: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::dev_broker::introspect_at as introspect;
use common::dev_broker::{DEV_JOB, DevBroker, LINE_TIMEOUT, client_with_timeout, dev_token, revoke};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP request (a revoke of a few hundred leases is one request with an fsync per step).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The SIGKILL stream: this many concurrent tasks, each with this many pre-fetched tokens …
const STREAM_TASKS: usize = 4;
const STREAM_PER_TASK: usize = 200;
/// … killed once this many exchanges got their 201.
const KILL_AFTER: usize = 100;

fn client() -> reqwest::Client {
    client_with_timeout(REQUEST_TIMEOUT)
}

/// `count` fresh dev tokens, fetched by a few concurrent tasks.
async fn dev_tokens(client: &reqwest::Client, url: &str, count: usize) -> Vec<String> {
    let mut tasks = Vec::new();
    for part in 0..STREAM_TASKS {
        let (client, url) = (client.clone(), url.to_string());
        let n = count / STREAM_TASKS + usize::from(part < count % STREAM_TASKS);
        tasks.push(tokio::spawn(async move {
            let mut tokens = Vec::with_capacity(n);
            for _ in 0..n {
                tokens.push(dev_token(&client, &url).await);
            }
            tokens
        }));
    }
    let mut all = Vec::with_capacity(count);
    for task in tasks {
        all.extend(task.await.expect("token task"));
    }
    all
}

/// One exchange; transport failures (the broker died) are an `Err`, not a panic.
async fn try_exchange(client: &reqwest::Client, url: &str, bearer: &str, body: &Value) -> Result<(u16, Value), String> {
    let resp = client
        .post(format!("{url}/v1/exchange"))
        .bearer_auth(bearer)
        .json(body)
        .send()
        .await
        .map_err(|e| format!("POST /v1/exchange: {e:?}"))?;
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.map_err(|e| format!("the {status} reply's body: {e:?}"))?;
    Ok((status, body))
}

/// An exchange that must get its 201; returns (lease id, broker JWT).
async fn exchange(client: &reqwest::Client, url: &str, body: &Value) -> (String, String) {
    let token = dev_token(client, url).await;
    let (status, reply) = try_exchange(client, url, &token, body).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, 201, "{reply}");
    check_exchange_reply(&reply)
}

/// A successful dev exchange's reply, checked for shape; returns (lease id, broker JWT).
fn check_exchange_reply(body: &Value) -> (String, String) {
    let lease_id = body["lease_id"].as_str().unwrap_or_else(|| panic!("no lease_id: {body}")).to_string();
    assert!(lease_id.starts_with("lse_"), "{lease_id}");
    assert_eq!(body["policy"], "dev", "{body}");
    assert_eq!(body["job"], DEV_JOB, "{body}");
    let jwt = body["credentials"]["api"]["token"].as_str().unwrap_or_else(|| panic!("no api token: {body}"));
    assert_eq!(jwt.split('.').count(), 3, "{jwt}");
    (lease_id, jwt.to_string())
}

async fn assert_active(client: &reqwest::Client, url: &str, lease_id: &str, jwt: &str, when: &str) {
    let reply = introspect(client, url, jwt).await;
    assert_eq!(reply["active"], true, "{when}: the JWT of lease {lease_id} is not active: {reply}");
    assert_eq!(reply["lease_id"], lease_id, "{when}: {reply}");
    assert_eq!(reply["sub"], DEV_JOB, "{when}: {reply}");
}

/// The job's revoke with a fresh dev token: ends every live lease of [`DEV_JOB`].
async fn revoke_all(client: &reqwest::Client, url: &str) -> Value {
    let token = dev_token(client, url).await;
    revoke(client, url, &token).await
}

async fn metrics(client: &reqwest::Client, url: &str) -> String {
    let resp = client.get(format!("{url}/metrics")).send().await.expect("GET /metrics");
    assert_eq!(resp.status(), 200);
    resp.text().await.expect("metrics text")
}

fn has_metric_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l.trim() == line)
}

/// The `exp` claim of a JWT, read without verifying it.
fn jwt_exp(jwt: &str) -> i64 {
    use base64::Engine;
    let segment = jwt.split('.').nth(1).expect("a claims segment");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(segment).expect("base64url claims");
    let claims: Value = serde_json::from_slice(&bytes).expect("JSON claims");
    claims["exp"].as_i64().unwrap_or_else(|| panic!("no exp: {claims}"))
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs_f64()
}

/// How one stream task ended.
#[derive(Debug)]
enum StreamEnd {
    /// Every token was used.
    Exhausted,
    /// A request failed in transport after the kill (in flight, or sent to a dead broker).
    CutByKill(String),
}

/// Exchanges each token in turn, recording every 201. A reply other than 201 fails the test:
/// a SIGKILL can cut a request, never make the broker answer it with an error. A transport error
/// before the kill fails the test too.
async fn stream(
    client: reqwest::Client,
    url: String,
    tokens: Vec<String>,
    successes: Arc<AtomicUsize>,
    killed: Arc<AtomicBool>,
) -> (Vec<(String, String)>, StreamEnd) {
    let mut issued = Vec::new();
    for token in tokens {
        match try_exchange(&client, &url, &token, &json!({"policy": "dev"})).await {
            Ok((201, body)) => {
                issued.push(check_exchange_reply(&body));
                successes.fetch_add(1, Ordering::SeqCst);
            }
            Ok((status, body)) => panic!("an exchange was answered {status}: {body}"),
            Err(e) if killed.load(Ordering::SeqCst) => return (issued, StreamEnd::CutByKill(e)),
            Err(e) => panic!("an exchange failed before the kill: {e}"),
        }
    }
    (issued, StreamEnd::Exhausted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_stream_loses_no_lease_that_got_a_201() {
    let started = Instant::now();
    let client = client();
    let data = tempfile::tempdir().expect("data dir");
    let mut first = DevBroker::start(data.path());
    first.wait_ready(&client).await;

    // Tokens first, so the stream is nothing but exchanges.
    let mut tokens = dev_tokens(&client, first.url(), STREAM_TASKS * STREAM_PER_TASK).await;
    let successes = Arc::new(AtomicUsize::new(0));
    let killed = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..STREAM_TASKS {
        let chunk = tokens.split_off(tokens.len() - STREAM_PER_TASK);
        tasks.push(tokio::spawn(stream(
            client.clone(),
            first.url().to_string(),
            chunk,
            successes.clone(),
            killed.clone(),
        )));
    }

    // Wait (bounded) for enough 201s; a task that ends before that has failed, so stop waiting.
    for _ in 0..12_000 {
        if successes.load(Ordering::SeqCst) >= KILL_AFTER || tasks.iter().any(|t| t.is_finished()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let at_kill = successes.load(Ordering::SeqCst);
    killed.store(true, Ordering::SeqCst);
    first.kill();
    let stream_secs = started.elapsed().as_secs_f64();

    let mut issued: Vec<(String, String)> = Vec::new();
    let mut cut = Vec::new();
    for task in tasks {
        let (mut got, end) = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("a stream task did not end after the kill")
            .unwrap_or_else(|e| panic!("a stream task failed: {e}; broker stderr:\n{}", first.stderr()));
        issued.append(&mut got);
        if let StreamEnd::CutByKill(e) = end {
            cut.push(e);
        }
    }
    assert!(at_kill >= KILL_AFTER, "only {at_kill} exchanges succeeded before the wait ended");
    assert!(!cut.is_empty(), "every task used all its tokens: the kill did not land mid-stream");
    assert_eq!(issued.len(), successes.load(Ordering::SeqCst));
    let unique: BTreeSet<&str> = issued.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(unique.len(), issued.len(), "a lease id was issued twice");
    drop(first);

    // Restart on the same data directory: every lease that got a 201 is there and live.
    let mut second = DevBroker::start(data.path());
    second.wait_ready(&client).await;
    let stderr = second.stderr();
    for (lease_id, jwt) in &issued {
        assert_active(&client, second.url(), lease_id, jwt, "after kill -9 and restart").await;
    }

    // The job's revoke finds and ends every one of them (and maybe leases cut in flight).
    let reply = revoke_all(&client, second.url()).await;
    let revoked: BTreeSet<&str> = reply["revoked"]
        .as_array()
        .unwrap_or_else(|| panic!("no revoked list: {reply}"))
        .iter()
        .map(|v| v.as_str().expect("lease ids are strings"))
        .collect();
    let missing: Vec<&&str> = unique.difference(&revoked).collect();
    assert!(missing.is_empty(), "the revoke after the restart did not end {missing:?}: {reply}");
    assert_eq!(reply["pending"], json!([]), "{reply}");
    let extra = revoked.len() - unique.len();
    assert!(extra <= STREAM_TASKS, "{extra} leases were revoked that no task saw a 201 for: {reply}");
    for (lease_id, jwt) in &issued {
        let after = introspect(&client, second.url(), jwt).await;
        assert_eq!(after, json!({"active": false}), "lease {lease_id} is still active after the revoke");
    }
    eprintln!(
        "kill -9: {} leases got a 201 ({at_kill} seen at the kill, {} tasks cut, {extra} in-flight leases \
         recorded anyway); killed after {stream_secs:.2}s, test took {:.2}s; restart log:\n{}",
        issued.len(),
        cut.len(),
        started.elapsed().as_secs_f64(),
        stderr.lines().filter(|l| l.contains("journal")).collect::<Vec<_>>().join("\n"),
    );
}

#[tokio::test]
async fn expiry_still_works_after_a_kill_9() {
    let started = Instant::now();
    let client = client();
    let data = tempfile::tempdir().expect("data dir");
    let mut first = DevBroker::start(data.path());
    first.wait_ready(&client).await;
    let (lease_id, jwt) = exchange(&client, first.url(), &json!({"policy": "dev", "ttl": "2s"})).await;
    let exp = jwt_exp(&jwt);
    first.kill();
    drop(first);

    let mut second = DevBroker::start(data.path());
    second.wait_ready(&client).await;

    // Right after the restart: active if surely before `exp`, inactive if surely after; in
    // between (the request straddled `exp`) either answer is right.
    let before = unix_now();
    let reply = introspect(&client, second.url(), &jwt).await;
    let after = unix_now();
    let checked_active = if after < exp as f64 {
        assert_eq!(reply["active"], true, "the 2s lease was lost across kill -9: {reply}");
        assert_eq!(reply["lease_id"], lease_id.as_str(), "{reply}");
        true
    } else {
        if before >= exp as f64 {
            assert_eq!(reply, json!({"active": false}), "introspected active after its expiry");
        }
        false
    };

    // It ends within the bound …
    let mut inactive = false;
    for _ in 0..100 {
        if introspect(&client, second.url(), &jwt).await == json!({"active": false}) {
            inactive = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(inactive, "the 2s lease {lease_id} was still active 10 s after the restart");
    assert!(unix_now() >= exp as f64, "inactive before its expiry");

    // … and the restarted broker's reaper ended it as expired (the expiry was resumed, not just
    // compared against the clock at introspection). The reaper ticks every 5 s.
    let mut last = String::new();
    let mut reaped = false;
    for _ in 0..200 {
        last = metrics(&client, second.url()).await;
        if has_metric_line(&last, "ephemera_leases_live 0")
            && has_metric_line(&last, r#"ephemera_revocations_total{outcome="expired"} 1"#)
        {
            reaped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reaped, "the restarted broker never ended the expired lease {lease_id}:\n{last}");
    let reply = revoke_all(&client, second.url()).await;
    assert_eq!(reply, json!({"revoked": [], "pending": []}), "an expired lease is not the job's to revoke");
    eprintln!(
        "expiry after kill -9: active right after the restart checked: {checked_active}; test took {:.2}s",
        started.elapsed().as_secs_f64()
    );
}

/// Opens a raw HTTP/1.1 exchange and sends only its head with `Expect: 100-continue`, then waits
/// for the broker's `100 Continue`: hyper sends it only once the handler reads the body, so the
/// request is provably in flight inside the broker when this returns. The body is still unsent.
async fn begin_exchange(addr: &str, bearer: &str, body: &str) -> tokio::net::TcpStream {
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect to the broker");
    let head = format!(
        "POST /v1/exchange HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {bearer}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.expect("send the request head");
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(LINE_TIMEOUT, conn.read(&mut buf))
            .await
            .expect("no 100 Continue in time")
            .expect("read the interim response");
        assert!(n > 0, "the broker closed the connection: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, b"HTTP/1.1 100 Continue\r\n\r\n", "{:?}", String::from_utf8_lossy(&got));
    conn
}

/// Sends the body and reads the whole response (the request said `Connection: close`).
async fn finish_exchange(mut conn: tokio::net::TcpStream, body: &str) -> (u16, Value) {
    conn.write_all(body.as_bytes()).await.expect("send the request body");
    let mut raw = Vec::new();
    tokio::time::timeout(REQUEST_TIMEOUT, conn.read_to_end(&mut raw))
        .await
        .expect("no complete response in time")
        .expect("read the response");
    assert!(!raw.is_empty(), "the broker closed the in-flight exchange without answering it");
    let text = String::from_utf8(raw).expect("a UTF-8 response");
    let (head, payload) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no response head: {text:?}"));
    let status: u16 = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    let json: Value = serde_json::from_str(payload).unwrap_or_else(|e| panic!("body not JSON ({e}): {text:?}"));
    (status, json)
}

#[tokio::test]
async fn sigterm_finishes_in_flight_requests_flushes_and_exits_0() {
    let started = Instant::now();
    let client = client();
    let data = tempfile::tempdir().expect("data dir");
    let mut first = DevBroker::start(data.path());
    first.wait_ready(&client).await;
    let mut leases = Vec::new();
    for _ in 0..3 {
        leases.push(exchange(&client, first.url(), &json!({"policy": "dev"})).await);
    }

    // One exchange is inside the broker, its body not yet sent, when SIGTERM arrives.
    let body = json!({"policy": "dev"}).to_string();
    let token = dev_token(&client, first.url()).await;
    let in_flight = begin_exchange(first.addr(), &token, &body).await;
    first.sigterm();

    // The broker stops accepting (its listener is closed) while the exchange is still open.
    let mut closed = false;
    for _ in 0..500 {
        if first.try_wait().is_some() {
            break; // exited already: the in-flight exchange below will show it was dropped
        }
        match tokio::net::TcpStream::connect(first.addr()).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                closed = true;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let (status, reply) = finish_exchange(in_flight, &body).await;
    assert!(closed, "the broker kept accepting connections after SIGTERM; stderr:\n{}", first.stderr());
    assert_eq!(status, 201, "the in-flight exchange was not finished: {reply}");
    leases.push(check_exchange_reply(&reply));

    let exit = first.wait_exit().await;
    let stderr = first.stderr();
    assert_eq!(exit.code(), Some(0), "SIGTERM must end the broker with exit code 0, got {exit}; stderr:\n{stderr}");
    assert!(stderr.contains("shutting down: finishing in-flight requests"), "no shutdown log:\n{stderr}");
    assert!(!stderr.contains("journal flush at shutdown failed"), "{stderr}");
    drop(first);

    // Graceful shutdown keeps live leases live, the one finished during shutdown included.
    let mut second = DevBroker::start(data.path());
    second.wait_ready(&client).await;
    for (lease_id, jwt) in &leases {
        assert_active(&client, second.url(), lease_id, jwt, "after SIGTERM and restart").await;
    }
    let text = metrics(&client, second.url()).await;
    assert!(has_metric_line(&text, "ephemera_leases_live 4"), "expected 4 live leases:\n{text}");
    eprintln!("sigterm: exit {exit}; test took {:.2}s", started.elapsed().as_secs_f64());
}

#[tokio::test]
async fn a_corrupt_journal_stops_the_start_with_a_clear_error() {
    let started = Instant::now();
    let client = client();
    let data = tempfile::tempdir().expect("data dir");
    let mut first = DevBroker::start(data.path());
    first.wait_ready(&client).await;
    exchange(&client, first.url(), &json!({"policy": "dev"})).await;
    exchange(&client, first.url(), &json!({"policy": "dev"})).await;
    first.kill();
    drop(first);

    // Byte 20 lies in the payload of the first record (8 bytes of magic, 8 of record header).
    let journal = data.path().join("ledger").join("journal");
    let mut bytes = std::fs::read(&journal).expect("read the journal");
    assert!(bytes.len() > 100, "the journal is too short to hold two exchanges: {} bytes", bytes.len());
    assert_eq!(&bytes[..8], b"EPHJRNL1", "not a journal");
    bytes[20] ^= 0xff;
    std::fs::write(&journal, &bytes).expect("write the damaged journal");

    let mut second = DevBroker::spawn(data.path());
    let exit = second.wait_exit().await;
    let stderr = second.stderr();
    assert!(!exit.success(), "the broker started on a corrupt journal; stderr:\n{stderr}");
    assert_eq!(exit.code(), Some(1), "a start failure exits 1, got {exit}; stderr:\n{stderr}");
    let message = stderr
        .lines()
        .find(|l| l.starts_with("ephemera: "))
        .unwrap_or_else(|| panic!("no `ephemera: ` error line on stderr:\n{stderr}"));
    assert!(message.contains("corrupt record at byte 8"), "unclear error: {message}");
    // The process has exited, so its stdout reaches end of file: read it all (bounded).
    let mut stdout = Vec::new();
    while let Some(line) = second.next_line() {
        stdout.push(line);
    }
    assert!(!stdout.iter().any(|l| l.starts_with("ephemera listening")), "it listened: {stdout:?}");
    // The failed start left the evidence alone: no repair, no truncation.
    assert_eq!(std::fs::read(&journal).expect("read the journal again"), bytes, "the failed start changed the journal");
    eprintln!("corrupt journal: {message}; test took {:.2}s", started.elapsed().as_secs_f64());
}
