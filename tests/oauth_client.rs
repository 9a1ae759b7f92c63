//! `POST /oauth/token` driven by a real third-party RFC 8693 client: google-auth's
//! `google.oauth2.sts.Client` (installed into `.venv` by scripts/test), against an in-process
//! broker trusting a CI issuer (the job's token) and an agent issuer (the actor's token).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{AGENTS_POLICY, AUDIENCE, Broker, Extra, FakeIssuer, GITHUB_MCP, NOW, REVIEWER, agents_issuer_toml};
use serde_json::{Map, Value, json};
use std::path::{Path, PathBuf};

const POLICY: &str = "review";
/// One `exchange_token` call, its arguments from the environment; prints `{"reply": …}` (the
/// response as the library parsed it) or `{"oauth_error": [args…]}` (the `OAuthError` it raised).
const STS_SCRIPT: &str = r#"
import json, os
from google.auth import exceptions
from google.auth.transport.requests import Request
from google.oauth2 import sts
env = os.environ
try:
    reply = sts.Client(env["STS_ENDPOINT"]).exchange_token(
        Request(),
        grant_type="urn:ietf:params:oauth:grant-type:token-exchange",
        subject_token=env["STS_SUBJECT_TOKEN"],
        subject_token_type="urn:ietf:params:oauth:token-type:id_token",
        resource=env["STS_RESOURCE"],
        audience=env["STS_AUDIENCE"],
        scopes=env["STS_SCOPES"].split(),
        actor_token=env["STS_ACTOR_TOKEN"],
        actor_token_type="urn:ietf:params:oauth:token-type:jwt",
    )
    print(json.dumps({"reply": reply}))
except exceptions.OAuthError as e:
    print(json.dumps({"oauth_error": [str(a) for a in e.args]}))
"#;

/// The broker, its CI issuer (the job) and the agent identity provider, and one token of each.
struct Setup {
    _ci: FakeIssuer,
    agents: FakeIssuer,
    broker: Broker,
    ci_token: String,
    agent_token: String,
}

impl Setup {
    async fn start() -> Setup {
        let ci = FakeIssuer::start().await;
        let agents = FakeIssuer::start().await;
        let hooks_toml = agents_issuer_toml("agents", &agents.url);
        let broker = Broker::start_custom(
            &[("ci", "github-actions", &ci)],
            &[(POLICY, AGENTS_POLICY)],
            &Extra { hooks_toml, ..Extra::default() },
        )
        .await;
        let ci_token = ci.sign(&ci.claims("github-environment-deploy.json", NOW));
        let mut agent = Map::new();
        agent.insert("iss".into(), json!(agents.url));
        agent.insert("aud".into(), json!(AUDIENCE));
        agent.insert("sub".into(), json!(REVIEWER));
        agent.insert("iat".into(), json!(NOW));
        agent.insert("exp".into(), json!(NOW + 300));
        let agent_token = agents.sign(&agent);
        Setup { _ci: ci, agents, broker, ci_token, agent_token }
    }

    /// google-auth's `exchange_token` for the job's CI token on behalf of the agent, with
    /// `audience` naming the policy (the client has no `policy` parameter).
    async fn exchange(&self, resource: &str, scopes: &str) -> Value {
        run_sts(&[
            ("STS_ENDPOINT", &format!("{}/oauth/token", self.broker.url)),
            ("STS_SUBJECT_TOKEN", &self.ci_token),
            ("STS_ACTOR_TOKEN", &self.agent_token),
            ("STS_AUDIENCE", POLICY),
            ("STS_RESOURCE", resource),
            ("STS_SCOPES", scopes),
        ])
        .await
    }
}

/// The venv's python: beside `$EPHEMERA_MOTO_SERVER`, else `<crate>/.venv/bin/python`.
fn python() -> PathBuf {
    let from_moto =
        std::env::var_os("EPHEMERA_MOTO_SERVER").map(PathBuf::from).and_then(|p| Some(p.parent()?.join("python")));
    let in_venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    from_moto.into_iter().chain([in_venv.clone()]).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "the project venv is missing: run scripts/test (it installs google-auth into .venv); looked at {}",
            in_venv.display()
        )
    })
}

/// [`STS_SCRIPT`] with `env` (no proxy from the environment), off the async runtime; its JSON.
async fn run_sts(env: &[(&str, &str)]) -> Value {
    let python = python();
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = std::process::Command::new(&python);
        cmd.args(["-c", STS_SCRIPT]).envs(env);
        for proxy in
            ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"]
        {
            cmd.env_remove(proxy);
        }
        cmd.output().unwrap_or_else(|e| panic!("run {}: {e}", python.display()))
    })
    .await
    .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "python failed ({}); is google-auth installed? run scripts/test\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}\nstderr:\n{stderr}"))
}

/// A JWT's payload (not verified: the broker's introspection is the verdict).
fn payload(jwt: &str) -> Value {
    let part = jwt.split('.').nth(1).unwrap_or_else(|| panic!("not a JWT: {jwt}"));
    serde_json::from_slice(&ephemera::ids::b64url_decode(part).unwrap()).unwrap()
}

/// The `OAuthError` google-auth raised: its message (parsed from the error body) and the raw body.
fn oauth_error(result: &Value) -> (String, Value) {
    let args = result["oauth_error"].as_array().unwrap_or_else(|| panic!("expected an OAuthError, got {result}"));
    let message = args[0].as_str().unwrap().to_string();
    (message, serde_json::from_str(args[1].as_str().unwrap()).unwrap())
}

#[tokio::test]
async fn google_auth_exchanges_a_ci_token_for_a_tool_token_on_behalf_of_an_agent() {
    let s = Setup::start().await;
    let result = s.exchange(GITHUB_MCP, "issues:read").await;
    let reply = &result["reply"];
    assert_eq!(reply["issued_token_type"], "urn:ietf:params:oauth:token-type:access_token", "{result}");
    assert_eq!(reply["token_type"], "Bearer", "{result}");
    assert_eq!(reply["expires_in"], 600, "the policy's ttl.default: {result}");
    assert_eq!(reply["scope"], "issues:read", "only the scope asked, not the tool's every scope: {result}");
    let token = reply["access_token"].as_str().unwrap_or_else(|| panic!("no access_token: {result}"));

    let claims = payload(token);
    assert_eq!(claims["aud"], GITHUB_MCP, "{claims}");
    assert_eq!(claims["act"]["sub"], REVIEWER, "{claims}");
    assert_eq!(claims["act"]["iss"], s.agents.url, "{claims}");
    assert_eq!(claims["scope"], "issues:read", "{claims}");
    assert_eq!(claims["tool"], "github", "{claims}");
    assert_eq!(claims["policy"], POLICY, "{claims}");
    assert_eq!(claims["lease_id"], reply["lease_id"], "the reply's lease is the token's: {claims}");
    assert!(claims.get("data").is_none(), "no data scope was asked: {claims}");
    assert_eq!(claims["exp"], NOW + 600, "{claims}");

    let introspected = s.broker.introspect(token).await;
    assert_eq!(introspected["active"], true, "{introspected}");
}

#[tokio::test]
async fn google_auth_reports_invalid_target_for_a_resource_no_tool_has() {
    let s = Setup::start().await;
    let result = s.exchange("https://mcp.example.com/gitlab", "issues:read").await;
    let (message, body) = oauth_error(&result);
    assert!(message.starts_with("Error code invalid_target: "), "the library parsed no RFC 6749 §5.2 body: {message}");
    assert_eq!(body["error"], "invalid_target", "{body}");
    assert!(body["request_id"].as_str().is_some_and(|r| r.starts_with("req_")), "{body}");
}

#[tokio::test]
async fn google_auth_reports_invalid_scope_for_a_scope_the_tool_lacks() {
    // Two scopes, so the library's space-joined (form-encoded `+`) list reaches the broker as two.
    let s = Setup::start().await;
    let result = s.exchange(GITHUB_MCP, "issues:read admin:org").await;
    let (message, body) = oauth_error(&result);
    assert!(message.starts_with("Error code invalid_scope: "), "the library parsed no RFC 6749 §5.2 body: {message}");
    assert!(message.contains("admin:org"), "the description names the scope refused: {message}");
    assert_eq!(body["error"], "invalid_scope", "{body}");
    assert!(body["request_id"].as_str().is_some_and(|r| r.starts_with("req_")), "{body}");
}
