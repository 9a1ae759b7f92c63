//! End to end: the real `ephemera` binary in `serve --dev`, driven over HTTP like a user would.
//!
//! Each test spawns its own broker on a free loopback port with its own data directory, so the
//! tests run in parallel without sharing anything.
// Test helpers outside `#[test]` functions: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::dev_broker::{DEV_JOB, DevBroker, client, dev_token, introspect, revoke};
use serde_json::{Value, json};
use std::fs::File;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// The banner's sh script gets this long before it is killed.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

/// A dev broker with a fresh data dir, ready to serve.
async fn ready_broker(client: &reqwest::Client) -> (DevBroker, TempDir) {
    let data = tempfile::tempdir().expect("data dir");
    let mut broker = DevBroker::start(data.path());
    broker.wait_ready(client).await;
    (broker, data)
}

async fn exchange(client: &reqwest::Client, broker: &DevBroker, bearer: &str, body: &Value) -> (u16, Value) {
    let resp = client
        .post(broker.endpoint("/v1/exchange"))
        .bearer_auth(bearer)
        .json(body)
        .send()
        .await
        .expect("POST /v1/exchange");
    let status = resp.status().as_u16();
    let request_id = resp.headers().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_string);
    let body: Value = resp.json().await.expect("exchange reply is JSON");
    if status >= 400 {
        assert_error_shape(&body, request_id.as_deref());
    }
    (status, body)
}

/// `{"error":{"code","message","request_id"}}`, with the id the `x-request-id` header carries.
fn assert_error_shape(body: &Value, request_id: Option<&str>) {
    let err = body["error"].as_object().unwrap_or_else(|| panic!("not an error body: {body}"));
    let mut keys: Vec<&str> = err.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["code", "message", "request_id"], "{body}");
    assert!(err["code"].as_str().is_some_and(|c| !c.is_empty()), "{body}");
    assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    let id = err["request_id"].as_str().unwrap_or_default();
    assert!(!id.is_empty(), "{body}");
    assert_eq!(Some(id), request_id, "the body's request_id is the x-request-id header");
}

/// Decodes one JSON segment of a JWT (0: header, 1: claims) without verifying it.
fn jwt_part(jwt: &str, n: usize) -> Value {
    use base64::Engine;
    let segment = jwt.split('.').nth(n).unwrap_or_else(|| panic!("JWT segment {n}"));
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(segment).expect("base64url segment");
    serde_json::from_slice(&bytes).expect("JSON segment")
}

/// A successful dev exchange's reply, checked for shape; returns (lease id, broker JWT).
fn check_exchange_reply(body: &Value) -> (String, String) {
    let lease_id = body["lease_id"].as_str().unwrap_or_else(|| panic!("no lease_id: {body}")).to_string();
    assert!(lease_id.starts_with("lse_"), "{lease_id}");
    assert_eq!(body["policy"], "dev", "{body}");
    assert_eq!(body["job"], DEV_JOB, "{body}");
    assert!(body["expires_at"].as_str().is_some_and(|s| s.ends_with('Z') && s.contains('T')), "{body}");
    let creds = body["credentials"].as_object().unwrap_or_else(|| panic!("no credentials: {body}"));
    assert_eq!(creds.keys().collect::<Vec<_>>(), ["api"], "{body}");
    let api = &creds["api"];
    assert_eq!(api["kind"], "jwt", "{body}");
    assert_eq!(api["revocation"], "immediate", "{body}");
    assert!(api["expires_at"].is_string(), "{body}");
    let jwt = api["token"].as_str().unwrap_or_else(|| panic!("no api token: {body}")).to_string();
    assert_eq!(jwt.split('.').count(), 3, "{jwt}");
    (lease_id, jwt)
}

#[tokio::test]
async fn dev_broker_exchanges_introspects_and_revokes_over_http() {
    let client = client();
    let (broker, _data) = ready_broker(&client).await;

    let token = dev_token(&client, broker.url()).await;
    let (status, body) = exchange(&client, &broker, &token, &json!({"policy": "dev"})).await;
    assert_eq!(status, 201, "{body}");
    let (lease_id, jwt) = check_exchange_reply(&body);

    // The minted JWT names the job and the lease, and is issued by this broker.
    let claims = jwt_part(&jwt, 1);
    assert_eq!(claims["sub"], DEV_JOB, "{claims}");
    assert_eq!(claims["lease_id"], lease_id.as_str(), "{claims}");
    assert_eq!(claims["iss"], broker.url(), "{claims}");
    assert_eq!(claims["aud"], "https://api.dev.ephemera.invalid", "{claims}");
    assert_eq!(claims["scope"], "dev", "{claims}");
    assert_eq!(claims["repository"], "ephemera-dev/demo", "{claims}");

    // Its signing key is published.
    let jwks: Value = client
        .get(broker.endpoint("/.well-known/jwks.json"))
        .send()
        .await
        .expect("jwks")
        .json()
        .await
        .expect("jwks JSON");
    let header: Value = jwt_part(&jwt, 0);
    let kids: Vec<&Value> = jwks["keys"].as_array().expect("keys").iter().map(|k| &k["kid"]).collect();
    assert!(kids.contains(&&header["kid"]), "the JWT's kid {} is not in the JWKS {jwks}", header["kid"]);

    let active = introspect(&client, &broker, &jwt).await;
    assert_eq!(active["active"], true, "{active}");
    assert_eq!(active["sub"], DEV_JOB, "{active}");
    assert_eq!(active["lease_id"], lease_id.as_str(), "{active}");
    assert_eq!(active["policy"], "dev", "{active}");

    let revoked = revoke(&client, broker.url(), &token).await;
    assert_eq!(revoked, json!({"revoked": [lease_id], "pending": []}));

    let inactive = introspect(&client, &broker, &jwt).await;
    assert_eq!(inactive, json!({"active": false}));

    // Idempotent: nothing live is left, so a second revoke reports nothing.
    let again = revoke(&client, broker.url(), &token).await;
    assert_eq!(again, json!({"revoked": [], "pending": []}));

    let metrics = client.get(broker.endpoint("/metrics")).send().await.expect("metrics");
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.expect("metrics text");
    assert!(
        text.lines().any(|l| l.trim() == r#"ephemera_exchanges_total{policy="dev",outcome="issued"} 1"#),
        "metrics do not count the one issued exchange:\n{text}"
    );

    // Dev mode audits into its data directory: the exchange and the revocation, no secret.
    let audit = std::fs::read_to_string(broker.data_dir().join("audit.jsonl")).expect("dev audit file");
    let events: Vec<Value> = audit.lines().map(|l| serde_json::from_str(l).expect("one JSON event per line")).collect();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(kinds, ["exchange", "revocation"], "{audit}");
    assert_eq!(events[0]["lease_id"], lease_id.as_str());
    assert!(!audit.contains(&jwt) && !audit.contains(&token), "a secret reached the audit file");
}

#[tokio::test]
async fn printed_banner_commands_do_a_real_exchange_and_revoke() {
    let client = client();
    let (mut broker, _data) = ready_broker(&client).await;

    // Read the banner up to the end of its "Try it" command block (bounded by LINE_TIMEOUT
    // per line and by the banner ending).
    let mut in_block = false;
    let mut commands: Vec<String> = Vec::new();
    while let Some(line) = broker.next_line() {
        if line.starts_with("Try it") {
            in_block = true;
        } else if in_block {
            match line.strip_prefix("  ") {
                Some(cmd) => commands.push(cmd.to_string()),
                None => break,
            }
        }
    }
    assert!(in_block, "no `Try it` section in the banner:\n{}", broker.seen().join("\n"));
    assert_eq!(commands.len(), 6, "expected six commands:\n{}", commands.join("\n"));
    assert!(commands[0].starts_with("TOKEN=$("), "{}", commands[0]);
    for cmd in &commands[1..] {
        assert!(
            cmd.contains(broker.url()) || cmd.starts_with("JWT="),
            "a command that does not talk to this broker: {cmd}"
        );
    }

    let work = tempfile::tempdir().expect("script dir");
    // The banner writes the reply (a live JWT) into the broker's private data directory.
    let exchange_file = broker.data_dir().join("exchange.json");
    let script = commands.join("\n");
    assert!(
        script.contains(&exchange_file.display().to_string()) && !script.contains("/tmp/ephemera-exchange.json"),
        "the banner must write the live JWT into the data directory:\n{script}"
    );
    let out_path = work.path().join("stdout");
    let err_path = work.path().join("stderr");
    let mut sh = Command::new("sh")
        .arg("-c")
        .arg(format!("set -e\n{script}\n"))
        .current_dir(work.path())
        .env("RUST_LOG", "info")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("stdout file"))
        .stderr(File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("spawn sh");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = sh.try_wait().expect("try_wait sh") {
            break status;
        }
        if started.elapsed() > SCRIPT_TIMEOUT {
            let _ = sh.kill();
            let _ = sh.wait();
            panic!("the banner script did not finish in {SCRIPT_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let context =
        format!("script:\n{script}\nstdout:\n{stdout}\nstderr:\n{stderr}\nbroker stderr:\n{}", broker.stderr());
    assert!(status.success(), "the banner script failed ({status})\n{context}");

    // The exchange reply went through tee to our file, not to /tmp.
    let saved: Value = serde_json::from_str(std::fs::read_to_string(&exchange_file).expect("exchange file").trim())
        .expect("exchange JSON");
    let (lease_id, _) = check_exchange_reply(&saved);

    let active_at = stdout.find(r#""active":true"#).unwrap_or_else(|| panic!("no active introspection\n{context}"));
    let revoked_marker = format!(r#""revoked":["{lease_id}"]"#);
    let revoked_at = stdout.find(&revoked_marker).unwrap_or_else(|| panic!("no {revoked_marker}\n{context}"));
    assert!(stdout[revoked_at..].starts_with(r#""revoked":["lse_"#));
    assert!(active_at < revoked_at, "introspection was not active before the revoke\n{context}");
    assert!(stdout.trim_end().ends_with(r#"{"active":false}"#), "the final introspection is not inactive\n{context}");
}

#[tokio::test]
async fn no_token_or_jwt_appears_in_the_broker_logs() {
    let client = client();
    let (mut broker, _data) = ready_broker(&client).await;

    let token = dev_token(&client, broker.url()).await;
    let (status, body) = exchange(&client, &broker, &token, &json!({"policy": "dev"})).await;
    assert_eq!(status, 201, "{body}");
    let (lease_id, jwt) = check_exchange_reply(&body);

    // Failures log their detail; the detail must not carry the token either.
    let (status, body) = exchange(&client, &broker, "not.a.token", &json!({"policy": "dev"})).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "invalid_token", "{body}");
    let (status, body) = exchange(&client, &broker, &token, &json!({"policy": "nope"})).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "policy_denied", "{body}");
    // The broker's own JWT presented as a CI token is refused, and must not be logged.
    let (status, body) = exchange(&client, &broker, &jwt, &json!({"policy": "dev"})).await;
    assert_eq!(status, 401, "{body}");
    let introspected = introspect(&client, &broker, &jwt).await;
    assert_eq!(introspected["active"], true, "{introspected}");

    let revoked = revoke(&client, broker.url(), &token).await;
    assert_eq!(revoked["revoked"], json!([lease_id]), "{revoked}");

    broker.kill();
    let logs = broker.stderr();
    assert!(!logs.trim().is_empty(), "the broker logged nothing");
    for (n, line) in logs.lines().enumerate() {
        let parsed: Result<Value, _> = serde_json::from_str(line);
        assert!(parsed.is_ok_and(|v| v.is_object()), "stderr line {} is not a JSON object: {line:?}", n + 1);
    }
    // The logs are about this exchange (so the absence checks below are not vacuous).
    // Dev mode audits, so the exchange's own request line is where its lease is named.
    assert!(
        logs.lines().any(|l| l.contains(r#""message":"request""#) && l.contains(&lease_id)),
        "the exchange's request line does not name the issued lease:\n{logs}"
    );
    assert!(logs.contains("policy_denied") && logs.contains("invalid_token"), "the refusals are not logged:\n{logs}");

    // Key material too: the private scalar of each key in the data directory, in every encoding a
    // log might use. In ring's P-256 PKCS#8 document the 32-byte scalar sits at bytes 36..68.
    let mut encodings = Vec::new();
    for file in ["keys/jwt.pk8", "dev-issuer.pk8"] {
        use base64::Engine;
        let der = std::fs::read(broker.data_dir().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(der[34..36], [0x04, 0x20], "{file}: the scalar is not where ring's PKCS#8 layout puts it");
        let scalar = &der[36..68];
        encodings.push((file, base64::engine::general_purpose::STANDARD.encode(scalar)[..40].to_string()));
        encodings.push((file, base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(scalar)[..40].to_string()));
        encodings.push((file, scalar.iter().map(|b| format!("{b:02x}")).collect()));
        // As it would appear inside a base64 dump of the whole file (36 is a multiple of 3).
        encodings.push((file, base64::engine::general_purpose::STANDARD.encode(&der)[48..90].to_string()));
    }
    for (file, encoded) in &encodings {
        assert!(!logs.contains(encoded.as_str()), "the private key of {file} appears in the broker log");
    }

    for (what, secret) in [("CI token", &token), ("broker JWT", &jwt)] {
        assert!(!logs.contains(secret.as_str()), "the {what} appears in the broker log");
        for (i, segment) in secret.split('.').enumerate() {
            if segment.len() > 20 {
                assert!(!logs.contains(segment), "segment {i} of the {what} appears in the broker log: {segment}");
            }
        }
    }
}

#[tokio::test]
async fn restart_with_the_same_data_dir_keeps_the_signing_keys() {
    let client = client();
    let data = tempfile::tempdir().expect("data dir");

    async fn get_json(client: &reqwest::Client, url: String) -> Value {
        let resp = client.get(&url).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert_eq!(resp.status(), 200, "GET {url}");
        resp.json().await.expect("JSON body")
    }

    let mut first = DevBroker::start(data.path());
    first.wait_ready(&client).await;
    let before = get_json(&client, first.endpoint("/.well-known/jwks.json")).await;
    let dev_before = get_json(&client, first.endpoint("/dev/github/jwks")).await;
    first.kill();
    drop(first);

    let mut second = DevBroker::start(data.path());
    second.wait_ready(&client).await;
    let after = get_json(&client, second.endpoint("/.well-known/jwks.json")).await;
    let dev_after = get_json(&client, second.endpoint("/dev/github/jwks")).await;

    let keys = before["keys"].as_array().unwrap_or_else(|| panic!("no keys: {before}"));
    assert!(!keys.is_empty(), "{before}");
    let kid = keys[0]["kid"].as_str().unwrap_or_else(|| panic!("no kid: {before}"));
    assert!(!kid.is_empty());
    assert_eq!(after["keys"][0]["kid"], kid, "the signing key changed across a restart: {before} vs {after}");
    assert_eq!(before, after, "the published keys changed across a restart");
    // The dev issuer's key is kept too, as `DevIssuer::load_or_generate` promises.
    assert!(dev_before["keys"][0]["kid"].is_string(), "{dev_before}");
    assert_eq!(dev_before, dev_after, "the dev issuer's key changed across a restart");

    // The restarted broker still mints with that key.
    let token = dev_token(&client, second.url()).await;
    let (status, body) = exchange(&client, &second, &token, &json!({"policy": "dev"})).await;
    assert_eq!(status, 201, "{body}");
    let (_, jwt) = check_exchange_reply(&body);
    let header: Value = jwt_part(&jwt, 0);
    assert_eq!(header["kid"], kid, "the restarted broker signs with another key");
}

#[tokio::test]
async fn dev_mode_from_a_directory_without_policies_serves_the_dev_policy_alone() {
    let client = client();
    let data = tempfile::tempdir().expect("data dir");
    let empty = tempfile::tempdir().expect("empty cwd");
    let mut broker = DevBroker::start_in(data.path(), empty.path());
    broker.wait_ready(&client).await;
    let token = dev_token(&client, broker.url()).await;
    let (status, body) = exchange(&client, &broker, &token, &json!({"policy": "dev"})).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = exchange(&client, &broker, &token, &json!({"policy": "deploy-web"})).await;
    assert_eq!(status, 403, "the example policies must not be there: {body}");
}

/// The claims of `policies/tests/claims/{name}` (shaped like a real token of its platform; the
/// folder's README cites the platforms' pages).
fn claims_fixture(name: &str) -> Value {
    let path = format!("{}/policies/tests/claims/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn buildkite_fixture() -> Value {
    claims_fixture("buildkite-main-deploy.json")
}

/// A token of the dev broker's stand-in issuer `issuer` carrying `claims` (its `iss`, `aud`
/// and times are the stand-in's).
async fn stand_in_token(client: &reqwest::Client, broker: &DevBroker, issuer: &str, claims: &Value) -> String {
    let body = json!({"issuer": issuer, "claims": claims});
    let resp = client.post(broker.endpoint("/dev/token")).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap().trim().to_string()
}

async fn buildkite_token(client: &reqwest::Client, broker: &DevBroker, claims: &Value) -> String {
    stand_in_token(client, broker, "buildkite", claims).await
}

/// Issue 18: a Buildkite-shaped token (the dev broker's stand-in `buildkite` issuer signs the
/// claims of `policies/tests/claims/buildkite-main-deploy.json`) is exchanged and revoked through
/// the real binary under the example policy `buildkite-deploy`; its lease's job is the job UUID.
/// The same claims from another Buildkite organisation are denied on `organization_id`.
#[tokio::test]
async fn a_buildkite_job_exchanges_and_revokes_through_the_real_binary() {
    let client = client();
    let (broker, _data) = ready_broker(&client).await;
    let fixture = buildkite_fixture();
    let job_token = buildkite_token(&client, &broker, &fixture).await;
    let (status, body) = exchange(&client, &broker, &job_token, &json!({"policy": "buildkite-deploy"})).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["job"], "buildkite:0184990a-477b-4fa8-9968-496074483cee");
    let lease = body["lease_id"].as_str().unwrap();
    let revoked = revoke(&client, broker.url(), &job_token).await;
    assert_eq!(revoked["revoked"], json!([lease]), "{revoked}");

    let mut other_org = fixture.clone();
    other_org["organization_id"] = json!("11111111-2222-4333-8444-555555555555");
    let (status, body) = exchange(
        &client,
        &broker,
        &buildkite_token(&client, &broker, &other_org).await,
        &json!({"policy": "buildkite-deploy"}),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["message"], "claim `organization_id` did not match policy `buildkite-deploy`");
}

/// `ephemera exchange` and `revoke` without a token in a Buildkite job ask the agent for one,
/// as Buildkite hands tokens over: `buildkite-agent oidc request-token --audience <broker>
/// --claim organization_id,pipeline_id`. The agent here is a FAKE (a shell script on PATH that
/// records its arguments and prints a token of the dev broker's Buildkite stand-in): the real
/// agent needs Buildkite's API. A failing agent's message reaches the error, its token never.
#[tokio::test]
async fn in_a_buildkite_job_the_cli_asks_the_agent_for_the_token() {
    let client = client();
    let (broker, _data) = ready_broker(&client).await;
    let fixture = buildkite_fixture();
    let token = buildkite_token(&client, &broker, &fixture).await;
    let bin = tempfile::tempdir().unwrap();
    let agent = bin.path().join("buildkite-agent");
    let script = format!(
        "#!/bin/sh\necho \"$@\" > '{}/args'\n[ -f '{}/fail' ] && {{ echo 'fatal: access token invalid' >&2; exit 3; }}\necho '{token}'\n",
        bin.path().display(),
        bin.path().display()
    );
    std::fs::write(&agent, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.path().display(), std::env::var("PATH").unwrap_or_default());
    let run = |args: Vec<String>| {
        let env = vec![("BUILDKITE_AGENT_ACCESS_TOKEN", "agent-session-token".to_string()), ("PATH", path.clone())];
        cli_in(env, args)
    };
    let url = broker.url().to_string();
    let out = run(["exchange", "--broker", &url, "--policy", "buildkite-deploy"].map(String::from).to_vec()).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["job"], "buildkite:0184990a-477b-4fa8-9968-496074483cee");
    let args = std::fs::read_to_string(bin.path().join("args")).unwrap();
    assert_eq!(args.trim(), format!("oidc request-token --audience {url} --claim organization_id,pipeline_id"));

    let out = run(["revoke", "--broker", &url].map(String::from).to_vec()).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let revoked: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(revoked["revoked"], json!([reply["lease_id"]]));

    std::fs::write(bin.path().join("fail"), "").unwrap();
    let out = run(["exchange", "--broker", &url, "--policy", "buildkite-deploy"].map(String::from).to_vec()).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("`buildkite-agent oidc request-token` failed") && stderr.contains("access token invalid"),
        "{stderr}"
    );
    assert!(!stderr.contains(&token));
}

/// One platform's end-to-end case: its stand-in issuer, claim fixture, example policy and the
/// job key the fixture gives; then the platform's trap, as a change to the fixture and the
/// status and message it must get.
struct PlatformCase {
    issuer: &'static str,
    fixture: &'static str,
    policy: &'static str,
    job: &'static str,
    trap: (&'static str, Value),
    trap_status: u16,
    trap_message: &'static str,
}

fn platform_cases() -> Vec<PlatformCase> {
    vec![
        PlatformCase {
            issuer: "circleci",
            fixture: "circleci-main-deploy.json",
            policy: "circleci-deploy",
            job: "circleci:0b6e2f4a-8c1d-4e3f-a5b7-9c0d1e2f3a4b",
            // A person re-ran the job with SSH: denied by default, though the policy never says so.
            trap: ("oidc.circleci.com/ssh-rerun", json!(true)),
            trap_status: 403,
            trap_message: "claim `oidc.circleci.com/ssh-rerun` matched a deny rule of policy `circleci-deploy`",
        },
        PlatformCase {
            issuer: "azure-pipelines",
            fixture: "azure-pipelines-run.json",
            policy: "azure-deploy",
            job: "azure-pipelines:4e7a1c9b-2d3f-4b5a-8e6c-0f1a2b3c4d5e:1187",
            // The same pipeline number in another project of the organisation.
            trap: ("prj_id", json!("0d0d0d0d-e5f6-4a7b-8c9d-0e1f2a3b4c5d")),
            trap_status: 403,
            trap_message: "claim `prj_id` did not match policy `azure-deploy`",
        },
        PlatformCase {
            issuer: "bitbucket",
            fixture: "bitbucket-deployment-step.json",
            policy: "bitbucket-deploy",
            job: "bitbucket:e1d2c3b4-a5f6-4e7d-8c9b-0a1f2e3d4c5b",
            // Another repository of the workspace.
            trap: ("repositoryUuid", json!("{0b0b0b0b-1c3e-4a5b-9d7f-0e2a4c6e8b1d}")),
            trap_status: 403,
            trap_message: "claim `repositoryUuid` did not match policy `bitbucket-deploy`",
        },
        PlatformCase {
            issuer: "jenkins",
            fixture: "jenkins-folder-build.json",
            policy: "jenkins-deploy",
            job: "jenkins:https%3A//jenkins.example.com/job/platform/job/web-deploy/job/main/:1042",
            // A job whose name only starts like the deploy job's.
            trap: ("sub", json!("https://jenkins.example.com/job/platform/job/web-deploy-copy/job/main/")),
            trap_status: 403,
            trap_message: "claim `sub` did not match policy `jenkins-deploy`",
        },
    ]
}

/// Issue 18: for CircleCI, Azure Pipelines, Bitbucket and Jenkins, a token shaped like the
/// platform's (the dev broker's stand-in issuer signs the claim fixture) is exchanged under the
/// platform's example policy and revoked by the job's own call, through the real binary; the
/// lease's job is the platform's job key. Each platform's trap is turned away.
#[tokio::test]
async fn each_platform_s_job_exchanges_and_revokes_and_its_trap_is_turned_away() {
    let client = client();
    let (broker, _data) = ready_broker(&client).await;
    for case in platform_cases() {
        let fixture = claims_fixture(case.fixture);
        let token = stand_in_token(&client, &broker, case.issuer, &fixture).await;
        let (status, body) = exchange(&client, &broker, &token, &json!({"policy": case.policy})).await;
        assert_eq!(status, 201, "{}: {body}", case.issuer);
        assert_eq!(body["job"], case.job, "{}", case.issuer);
        let lease = body["lease_id"].as_str().unwrap().to_string();
        let revoked = revoke(&client, broker.url(), &token).await;
        assert_eq!(revoked["revoked"], json!([lease]), "{}: {revoked}", case.issuer);

        let mut trapped = fixture.clone();
        trapped[case.trap.0] = case.trap.1.clone();
        let token = stand_in_token(&client, &broker, case.issuer, &trapped).await;
        let (status, body) = exchange(&client, &broker, &token, &json!({"policy": case.policy})).await;
        assert_eq!(status, case.trap_status, "{}: {body}", case.issuer);
        assert_eq!(body["error"]["message"], case.trap_message, "{}", case.issuer);
    }
}

/// An Azure service-connection token names a connection (`sc://…`, by name) and no run: it has
/// no job key, so it is refused as a token, and the broker's log names the claim it lacks.
#[tokio::test]
async fn an_azure_service_connection_token_is_refused_for_want_of_a_run() {
    let client = client();
    let (broker, _data) = ready_broker(&client).await;
    let mut fixture = claims_fixture("azure-pipelines-service-connection.json");
    // The stand-in lays the claims over its default (a pipeline token's): take away what a
    // service-connection token lacks.
    for (claim, _) in claims_fixture("azure-pipelines-run.json").as_object().unwrap() {
        if fixture.get(claim).is_none() {
            fixture[claim] = Value::Null;
        }
    }
    let token = stand_in_token(&client, &broker, "azure-pipelines", &fixture).await;
    let (status, body) = exchange(&client, &broker, &token, &json!({"policy": "azure-deploy"})).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "invalid_token");
    // The reply says no more than for any refused token; the broker's log names the claim.
    assert!(broker.stderr().contains("required claim `org_id` is missing"), "{}", broker.stderr());
}

/// Runs the real CLI with the environment a platform's job has (and nothing of the caller's
/// token variables).
async fn cli_in(env: Vec<(&'static str, String)>, args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ephemera"));
        cmd.args(&args);
        for var in [
            "EPHEMERA_ID_TOKEN",
            "BUILDKITE_AGENT_ACCESS_TOKEN",
            "CIRCLECI",
            "CIRCLE_OIDC_TOKEN_V2",
            "SYSTEM_OIDCREQUESTURI",
            "SYSTEM_ACCESSTOKEN",
            "TF_BUILD",
            "BITBUCKET_BUILD_NUMBER",
            "BITBUCKET_STEP_OIDC_TOKEN",
            "JENKINS_URL",
            "HTTP_PROXY",
            "http_proxy",
        ] {
            cmd.env_remove(var);
        }
        cmd.envs(env).output().unwrap()
    })
    .await
    .unwrap()
}

/// `ephemera exchange` and `revoke` without a token find the job's token where CircleCI and
/// Bitbucket put it (`$CIRCLE_OIDC_TOKEN_V2`, `$BITBUCKET_STEP_OIDC_TOKEN`), and say what to add
/// to the job when it is not there.
#[tokio::test]
async fn in_circleci_and_bitbucket_jobs_the_cli_reads_the_platform_s_variable() {
    let client = client();
    let (broker, _data) = ready_broker(&client).await;
    let url = broker.url().to_string();
    let exchange_args = |policy: &str| ["exchange", "--broker", &url, "--policy", policy].map(String::from).to_vec();
    for (issuer, fixture, policy, marker, var) in [
        ("circleci", "circleci-main-deploy.json", "circleci-deploy", ("CIRCLECI", "true"), "CIRCLE_OIDC_TOKEN_V2"),
        (
            "bitbucket",
            "bitbucket-deployment-step.json",
            "bitbucket-deploy",
            ("BITBUCKET_BUILD_NUMBER", "7"),
            "BITBUCKET_STEP_OIDC_TOKEN",
        ),
    ] {
        let token = stand_in_token(&client, &broker, issuer, &claims_fixture(fixture)).await;
        let env = vec![(marker.0, marker.1.to_string()), (var, token.clone())];
        let out = cli_in(env.clone(), exchange_args(policy)).await;
        assert!(out.status.success(), "{issuer}: {}", String::from_utf8_lossy(&out.stderr));
        let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(reply["job"].as_str().unwrap().starts_with(&format!("{issuer}:")), "{reply}");
        let out = cli_in(env, ["revoke", "--broker", &url].map(String::from).to_vec()).await;
        let revoked: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(revoked["revoked"], json!([reply["lease_id"]]), "{issuer}");

        let out = cli_in(vec![(marker.0, marker.1.to_string())], exchange_args(policy)).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(&format!("{var} is not set")), "{stderr}");
    }
    let out = cli_in(vec![("BITBUCKET_BUILD_NUMBER", "7".into())], exchange_args("bitbucket-deploy")).await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("add `oidc: true` to the step"));
    let out =
        cli_in(vec![("JENKINS_URL", "https://jenkins.example.com/".into())], exchange_args("jenkins-deploy")).await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("withCredentials"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the FAKE Azure DevOps token endpoint saw: Azure's API cannot run here, so a loopback
/// server answers `POST $SYSTEM_OIDCREQUESTURI` as Azure documents it (`{"oidcToken": …}`).
#[derive(Default)]
struct AzureSeen {
    authorization: Option<String>,
    query: Option<String>,
}

async fn fake_azure(token: String, seen: std::sync::Arc<std::sync::Mutex<AzureSeen>>) -> String {
    use axum::extract::RawQuery;
    use axum::http::{HeaderMap, StatusCode};
    let app = axum::Router::new().route(
        "/acme/_apis/distributedtask/hubs/build/plans/p1/jobs/j1/oidctoken",
        axum::routing::post(move |headers: HeaderMap, RawQuery(query): RawQuery| {
            let (token, seen) = (token.clone(), seen.clone());
            async move {
                let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);
                let mut s = seen.lock().unwrap();
                s.authorization = auth.clone();
                s.query = query;
                if auth.as_deref() != Some("Bearer job-access-token") {
                    return (StatusCode::UNAUTHORIZED, String::new());
                }
                (StatusCode::OK, json!({"oidcToken": token}).to_string())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/acme/_apis/distributedtask/hubs/build/plans/p1/jobs/j1/oidctoken")
}

/// In Azure Pipelines the CLI asks `$SYSTEM_OIDCREQUESTURI` for the pipeline's token with the
/// job's access token (API version 7.1, no service connection), exchanges and revokes with it;
/// without `SYSTEM_ACCESSTOKEN` mapped, or with one Azure refuses, the error says what to do.
#[tokio::test]
async fn in_azure_pipelines_the_cli_asks_the_oidc_request_uri_for_the_token() {
    let client = client();
    let (broker, _data) = ready_broker(&client).await;
    let url = broker.url().to_string();
    let token = stand_in_token(&client, &broker, "azure-pipelines", &claims_fixture("azure-pipelines-run.json")).await;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(AzureSeen::default()));
    let request_uri = fake_azure(token.clone(), seen.clone()).await;
    let exchange_args = ["exchange", "--broker", &url, "--policy", "azure-deploy"].map(String::from).to_vec();
    let env = |access: &str| {
        vec![
            ("TF_BUILD", "True".to_string()),
            ("SYSTEM_OIDCREQUESTURI", request_uri.clone()),
            ("SYSTEM_ACCESSTOKEN", access.to_string()),
        ]
    };
    let out = cli_in(env("job-access-token"), exchange_args.clone()).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["job"], "azure-pipelines:4e7a1c9b-2d3f-4b5a-8e6c-0f1a2b3c4d5e:1187");
    {
        let s = seen.lock().unwrap();
        assert_eq!(s.authorization.as_deref(), Some("Bearer job-access-token"));
        assert_eq!(s.query.as_deref(), Some("api-version=7.1"), "no service connection is asked for");
    }
    let out = cli_in(env("job-access-token"), ["revoke", "--broker", &url].map(String::from).to_vec()).await;
    let revoked: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(revoked["revoked"], json!([reply["lease_id"]]));

    let out = cli_in(env("stale-token"), exchange_args.clone()).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("answered 401") && stderr.contains("SYSTEM_ACCESSTOKEN was refused"), "{stderr}");
    assert!(!stderr.contains("stale-token"), "{stderr}");

    let mut without = env("");
    without.pop();
    let out = cli_in(without, exchange_args).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("env: SYSTEM_ACCESSTOKEN: $(System.AccessToken)"), "{stderr}");
}

/// Issue 19 through the real binary: the banner's token-exchange command (the job's dev token as
/// the subject, the `agents` stand-in's token as the actor) gets a token for the dev tool server
/// naming the agent, and the job's own revoke ends it.
#[tokio::test]
async fn the_banner_s_agent_command_gets_a_tool_token_that_ends_with_the_job() {
    let client = client();
    let (mut broker, _data) = ready_broker(&client).await;
    let mut command = None;
    let mut heading_seen = false;
    while let Some(line) = broker.next_line() {
        if heading_seen {
            command = line.strip_prefix("  ").map(str::to_string);
            break;
        }
        heading_seen = line.starts_with("An AI agent");
    }
    let command = command.unwrap_or_else(|| panic!("no agent command in the banner:\n{}", broker.seen().join("\n")));
    assert!(command.contains(&format!("{}/oauth/token", broker.url())), "{command}");
    let script = format!("set -e\n{command}\n");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .args(["60", "sh", "-c", &script])
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env("no_proxy", "127.0.0.1,localhost")
            .stdin(Stdio::null())
            .output()
            .expect("run sh")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{}", stdout, String::from_utf8_lossy(&out.stderr));
    let reply: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!((reply["token_type"].as_str(), reply["scope"].as_str()), (Some("Bearer"), Some("repo:read")), "{reply}");
    let token = reply["access_token"].as_str().unwrap();
    let claims = jwt_part(token, 1);
    assert_eq!(claims["aud"], "https://mcp.dev.ephemera.invalid");
    assert_eq!(claims["act"]["sub"], "spiffe://dev.ephemera.invalid/agent/assistant");
    assert_eq!(claims["act"]["iss"], format!("{}/dev/agents", broker.url()));
    assert_eq!(claims["sub"], DEV_JOB);
    assert!(claims.get("data").is_none(), "only `repo:read` was asked for, no data scope: {claims}");
    assert_eq!(introspect(&client, &broker, token).await["active"], true);
    let ended = revoke(&client, broker.url(), &dev_token(&client, broker.url()).await).await;
    assert_eq!(ended["revoked"], json!([reply["lease_id"]]), "{ended}");
    assert_eq!(introspect(&client, &broker, token).await["active"], false);
}
