//! `ephemera exchange` and `ephemera revoke`: the real binary as a client of a real
//! `serve --dev` broker (each test its own broker, data directory and port).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::dev_broker::{DevBroker, client, dev_token, introspect};
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::{Command, Output, Stdio};
use tempfile::TempDir;

async fn ready_broker(client: &reqwest::Client) -> (DevBroker, TempDir) {
    let data = tempfile::tempdir().expect("data dir");
    let mut broker = DevBroker::start(data.path());
    broker.wait_ready(client).await;
    (broker, data)
}

/// Runs `ephemera <args>` with `token` in `EPHEMERA_ID_TOKEN` (the default `--token-env`).
fn cli(args: &[&str], token: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ephemera"));
    cmd.args(args).stdin(Stdio::null()).env_remove("EPHEMERA_ID_TOKEN");
    for proxy in ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"] {
        cmd.env_remove(proxy);
    }
    if let Some(token) = token {
        cmd.env("EPHEMERA_ID_TOKEN", token);
    }
    let out = cmd.output().expect("run the ephemera binary");
    if let Some(token) = token {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains(token), "the token leaked to stderr: {stderr}");
    }
    out
}

fn stdout(out: &Output) -> String {
    assert!(out.status.success(), "ephemera failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).expect("UTF-8 stdout")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn is_jwt(text: &str) -> bool {
    text.split('.').count() == 3 && text.split('.').all(|p| !p.is_empty())
}

/// Parses `$GITHUB_ENV` content: every entry must be `NAME<<DELIM` … `DELIM`.
fn parse_github_env(text: &str) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    let mut lines = text.lines();
    while let Some(head) = lines.next() {
        let (name, delim) = head.split_once("<<").unwrap_or_else(|| panic!("not a heredoc entry: {head:?}"));
        assert!(delim.starts_with("ghadelimiter_") && delim.len() > 20, "weak delimiter {delim:?}");
        let mut value = Vec::new();
        loop {
            let line = lines.next().unwrap_or_else(|| panic!("unterminated entry {name}"));
            if line == delim {
                break;
            }
            value.push(line);
        }
        assert!(vars.insert(name.to_string(), value.join("\n")).is_none(), "{name} twice");
    }
    vars
}

#[tokio::test]
async fn json_exchange_then_revoke_ends_the_lease() {
    let http = client();
    let (broker, _data) = ready_broker(&http).await;
    let token = dev_token(&http, broker.url()).await;
    let out = cli(&["exchange", "--broker", broker.url(), "--policy", "dev", "--ttl", "5m"], Some(&token));
    let reply: Value = serde_json::from_str(&stdout(&out)).expect("json format is one JSON document");
    let lease = reply["lease_id"].as_str().expect("lease_id").to_string();
    assert!(lease.starts_with("lse_"), "{reply}");
    assert_eq!(reply["policy"], "dev");
    let jwt = reply["credentials"]["api"]["token"].as_str().expect("api token").to_string();
    assert!(is_jwt(&jwt));
    assert_eq!(introspect(&http, &broker, &jwt).await["active"], true);

    // Revoke by lease id, with a fresh token read from a file this time.
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("id-token");
    let revoke_token = dev_token(&http, broker.url()).await;
    std::fs::write(&token_file, format!("{revoke_token}\n")).unwrap();
    let out = cli(
        &["revoke", "--broker", broker.url(), "--lease", &lease, "--token-file", token_file.to_str().unwrap()],
        None,
    );
    assert!(!stderr(&out).contains(&revoke_token));
    let revoked: Value = serde_json::from_str(&stdout(&out)).expect("revoke prints JSON");
    assert_eq!(revoked["revoked"], serde_json::json!([lease]), "{revoked}");
    assert_eq!(introspect(&http, &broker, &jwt).await["active"], false);
}

#[tokio::test]
async fn revoke_without_a_lease_ends_every_lease_of_the_job() {
    let http = client();
    let (broker, _data) = ready_broker(&http).await;
    let mut jwts = Vec::new();
    for _ in 0..2 {
        let token = dev_token(&http, broker.url()).await;
        let out = cli(&["exchange", "--broker", broker.url(), "--policy", "dev"], Some(&token));
        let reply: Value = serde_json::from_str(&stdout(&out)).unwrap();
        jwts.push(reply["credentials"]["api"]["token"].as_str().unwrap().to_string());
    }
    let token = dev_token(&http, broker.url()).await;
    let out = cli(&["revoke", "--broker", &format!("{}/", broker.url())], Some(&token));
    let revoked: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(revoked["revoked"].as_array().map(Vec::len), Some(2), "{revoked}");
    for jwt in &jwts {
        assert_eq!(introspect(&http, &broker, jwt).await["active"], false);
    }
}

#[tokio::test]
async fn env_format_sources_in_sh_and_github_env_uses_the_same_names() {
    let http = client();
    let (broker, _data) = ready_broker(&http).await;

    let token = dev_token(&http, broker.url()).await;
    let env = stdout(&cli(&["exchange", "--broker", broker.url(), "--policy", "dev", "--format", "env"], Some(&token)));
    assert!(env.lines().all(|l| l.starts_with("export ")), "{env}");
    let sourced = Command::new("sh")
        .arg("-c")
        .arg("eval \"$1\" && printf '%s\\n%s\\n' \"$EPHEMERA_API_TOKEN\" \"$EPHEMERA_LEASE_ID\"")
        .arg("sh")
        .arg(&env)
        .output()
        .expect("run sh");
    assert!(sourced.status.success(), "{}", String::from_utf8_lossy(&sourced.stderr));
    let sourced = String::from_utf8(sourced.stdout).unwrap();
    let mut lines = sourced.lines();
    let jwt = lines.next().unwrap();
    assert!(is_jwt(jwt), "EPHEMERA_API_TOKEN is not a JWT: {jwt:?}");
    assert!(lines.next().unwrap().starts_with("lse_"));
    assert_eq!(introspect(&http, &broker, jwt).await["active"], true);
    let env_names: Vec<String> =
        env.lines().map(|l| l.strip_prefix("export ").unwrap().split_once('=').unwrap().0.to_string()).collect();

    let token = dev_token(&http, broker.url()).await;
    let gh = stdout(&cli(
        &["exchange", "--broker", broker.url(), "--policy", "dev", "--format", "github-env"],
        Some(&token),
    ));
    let vars = parse_github_env(&gh);
    let mut gh_names: Vec<String> = vars.keys().cloned().collect();
    let mut env_sorted = env_names.clone();
    gh_names.sort();
    env_sorted.sort();
    assert_eq!(gh_names, env_sorted, "github-env and env name the same variables");
    assert!(is_jwt(&vars["EPHEMERA_API_TOKEN"]));
    assert!(vars["EPHEMERA_LEASE_ID"].starts_with("lse_"));
    assert_eq!(vars["EPHEMERA_POLICY"], "dev");
    assert_eq!(introspect(&http, &broker, &vars["EPHEMERA_API_TOKEN"]).await["active"], true);

    // No `aws` credential in the `dev` grant: credential-process fails clearly, exit code 1.
    let token = dev_token(&http, broker.url()).await;
    let out =
        cli(&["exchange", "--broker", broker.url(), "--policy", "dev", "--format", "credential-process"], Some(&token));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    assert!(stderr(&out).contains("no `aws` credential"), "{}", stderr(&out));
}

#[tokio::test]
async fn exit_codes_tell_denied_invalid_and_unreachable_apart() {
    let http = client();
    let (broker, _data) = ready_broker(&http).await;

    // 3: denied by the policy (an unknown policy is a denial too).
    let token = dev_token(&http, broker.url()).await;
    let out = cli(&["exchange", "--broker", broker.url(), "--policy", "nope"], Some(&token));
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.starts_with("ephemera: policy_denied: "), "{err}");
    assert!(err.contains("(request ") && !err.contains("(request unknown)"), "{err}");
    assert!(out.stdout.is_empty());

    // 3 as well: the same token again (replay protection: one exchange per token and policy).
    let token = dev_token(&http, broker.url()).await;
    let first = cli(&["exchange", "--broker", broker.url(), "--policy", "dev"], Some(&token));
    assert!(first.status.success(), "{}", stderr(&first));
    let again = cli(&["exchange", "--broker", broker.url(), "--policy", "dev"], Some(&token));
    assert_eq!(again.status.code(), Some(3), "{}", stderr(&again));
    assert!(stderr(&again).starts_with("ephemera: policy_denied: "), "{}", stderr(&again));

    // 4: a token the broker cannot verify.
    let garbage = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl";
    let out = cli(&["exchange", "--broker", broker.url(), "--policy", "dev"], Some(garbage));
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).starts_with("ephemera: invalid_token: "), "{}", stderr(&out));
    let out = cli(&["revoke", "--broker", broker.url()], Some(garbage));
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));

    // 5: nothing listening.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let token = dev_token(&http, broker.url()).await;
    let out = cli(&["exchange", "--broker", &closed, "--policy", "dev"], Some(&token));
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).starts_with("ephemera: unreachable: "), "{}", stderr(&out));
    let out = cli(&["revoke", "--broker", &closed], Some(&token));
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));

    // 1: no token at all; 2: usage.
    let out = cli(&["exchange", "--broker", broker.url(), "--policy", "dev"], None);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("EPHEMERA_ID_TOKEN is not set"), "{}", stderr(&out));
    let out = cli(&["exchange", "--broker", broker.url(), "--policy", "dev", "--format", "yaml"], Some(&token));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = cli(
        &["exchange", "--broker", broker.url(), "--policy", "dev", "--token-env", "X", "--token-file", "/dev/null"],
        Some(&token),
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

/// A renewable policy for the dev token, in a working directory of the test's own.
const RENEWABLE: &str = r#"
issuer: github
match:
  repository_id: "100001"
ttl: {default: 2m, max: 5m}
renew: {max_lease: 1h}
grants:
  api: {backend: jwt, audience: https://api.dev.ephemera.invalid}
"#;

#[tokio::test]
async fn a_lease_file_renews_fresh_tokens_until_the_lease_is_revoked() {
    use std::os::unix::fs::PermissionsExt;
    let http = client();
    let work = tempfile::tempdir().unwrap();
    std::fs::create_dir(work.path().join("policies")).unwrap();
    std::fs::write(work.path().join("policies/renewable.yaml"), RENEWABLE).unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut broker = DevBroker::start_in(data.path(), work.path());
    broker.wait_ready(&http).await;
    let url = broker.url().to_string();
    let token = dev_token(&http, &url).await;
    let lease_file = work.path().join("lease.json");
    let file = lease_file.to_str().unwrap();

    let reply: Value = serde_json::from_str(&stdout(&cli(
        &["exchange", "--broker", &url, "--policy", "renewable", "--lease-file", file],
        Some(&token),
    )))
    .unwrap();
    let lease_id = reply["lease_id"].as_str().unwrap();
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&lease_file).unwrap()).unwrap();
    assert_eq!(written["lease_id"], lease_id);
    assert_eq!(written["renew_token"], reply["renew"]["token"]);
    assert_eq!(std::fs::metadata(&lease_file).unwrap().permissions().mode() & 0o777, 0o600);

    // Each call renews: a fresh, live JWT each time, every one of the lease.
    let first = reply["credentials"]["api"]["token"].as_str().unwrap().to_string();
    let mut seen = vec![first];
    for _ in 0..2 {
        let out = cli(&["token", "--lease-file", file, "--credential", "api"], None);
        let jwt = stdout(&out).trim().to_string();
        assert!(is_jwt(&jwt) && !seen.contains(&jwt), "{jwt}");
        assert_eq!(introspect(&http, &broker, &jwt).await["lease_id"], lease_id);
        seen.push(jwt);
    }
    let unknown = cli(&["token", "--lease-file", file, "--credential", "aws"], None);
    assert!(!unknown.status.success() && stderr(&unknown).contains("has no credential `aws` (it has: api)"));
    let no_aws = cli(&["credential-process", "--lease-file", file], None);
    assert!(stderr(&no_aws).contains("granted no `aws` credential"), "{}", stderr(&no_aws));

    // The job ends its lease: every credential is dead, and the lease file renews nothing.
    stdout(&cli(&["revoke", "--broker", &url, "--lease", lease_id], Some(&token)));
    for jwt in &seen {
        assert_eq!(introspect(&http, &broker, jwt).await["active"], false);
    }
    let after = cli(&["token", "--lease-file", file, "--credential", "api"], None);
    assert_eq!(after.status.code(), Some(1));
    assert!(stderr(&after).contains("lease_not_renewable"), "{}", stderr(&after));
    let renew_token = written["renew_token"].as_str().unwrap();
    for out in [&unknown, &no_aws, &after] {
        assert!(!stderr(out).contains(renew_token), "the renew token leaked: {}", stderr(out));
    }

    // A policy without `renew` gets no lease file, and says why.
    let plain = cli(
        &["exchange", "--broker", &url, "--policy", "dev", "--lease-file", file],
        Some(&dev_token(&http, &url).await),
    );
    assert!(stderr(&plain).contains("does not make leases renewable"), "{}", stderr(&plain));
}
