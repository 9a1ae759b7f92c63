//! SIGHUP against the real binary: the policies directory is reloaded and the audit file is
//! reopened (logrotate moved the old one away).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::dev_broker::*;
use serde_json::{Value, json};

const TWO: &str = r#"
issuer: github
match:
  repository_id: "100001"
  ref: refs/heads/main
deny:
  event_name: [pull_request, pull_request_target, workflow_run]
  runner_environment: self-hosted
ttl: {default: 15m, max: 1h}
grants:
  api: {backend: jwt, audience: https://two.example}
"#;

async fn exchange(client: &reqwest::Client, broker: &DevBroker, policy: &str) -> u16 {
    let token = dev_token(client, broker.url()).await;
    let resp = client
        .post(broker.endpoint("/v1/exchange"))
        .bearer_auth(token)
        .json(&json!({"policy": policy}))
        .send()
        .await
        .unwrap();
    resp.status().as_u16()
}

async fn readyz(client: &reqwest::Client, broker: &DevBroker) -> Value {
    client.get(broker.endpoint("/readyz")).send().await.unwrap().json().await.unwrap()
}

fn audit_events(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[tokio::test]
async fn sighup_reloads_the_policies_and_reopens_the_audit_file() {
    let client = client();
    let data = tempfile::tempdir().unwrap();
    let cwd = tempfile::tempdir().unwrap();
    // The watch is off: only the signal can make this reload happen.
    std::fs::write(cwd.path().join("ephemera.toml"), "[reload]\nwatch = false\n[audit]\nfile = \"audit.jsonl\"\n")
        .unwrap();
    std::fs::create_dir(cwd.path().join("policies")).unwrap();
    let mut broker = DevBroker::start_in(data.path(), cwd.path());
    broker.wait_ready(&client).await;
    assert_eq!(exchange(&client, &broker, "two").await, 403);

    std::fs::write(cwd.path().join("policies/two.yaml"), TWO).unwrap();
    std::fs::rename(cwd.path().join("audit.jsonl"), cwd.path().join("audit.jsonl.1")).unwrap();
    broker.signal("HUP");

    let mut ready = Value::Null;
    for _ in 0..200 {
        ready = readyz(&client, &broker).await;
        if ready["policies"]["generation"] == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(ready["policies"]["generation"], 2, "no reload after SIGHUP: {ready}\n{}", broker.stderr());
    assert_eq!(ready["policies"]["loaded"], 2, "dev + two: {ready}");
    assert_eq!(exchange(&client, &broker, "two").await, 201);
    assert!(broker.try_wait().is_none(), "SIGHUP must not stop the broker");

    let rotated = audit_events(&cwd.path().join("audit.jsonl.1"));
    assert_eq!(rotated.len(), 1, "{rotated:?}");
    assert_eq!(rotated[0]["event"], "denial");
    let fresh = audit_events(&cwd.path().join("audit.jsonl"));
    let kinds: Vec<&str> = fresh.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["reload", "exchange"], "{fresh:?}");
}
