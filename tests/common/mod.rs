//! Test parts shared by the integration tests: a real OIDC issuer served in process
//! ([`FakeIssuer`]: real RSA keys, discovery and JWKS over HTTP on 127.0.0.1) and an in-process
//! broker ([`Broker`]) with a manual clock, driven over real HTTP.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod dev_broker;
pub mod fake_github;
pub mod moto;
pub mod replicas;
pub mod sshd;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ephemera::clock::ManualClock;
use ephemera::config::Config;
use ephemera::ids::b64url;
use ephemera::ledger::journal::Storage;
use ephemera::mint::{Backend, BoxFuture, MintContext, MintError, Minted, Revocation, RevokeHandle};
use ephemera::policy::{Grant, GrantedCredential};
use ephemera::server::{Faults, Options, Running, start};
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use serde_json::{Map, Value, json};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// The fixtures' own clock: `iat` of github-push-immutable-sub.json.
pub const NOW: i64 = 1_787_166_757;
pub const AUDIENCE: &str = "https://ephemera.example.com";

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A claim set from `../shared/fixtures/claims/`.
pub fn fixture(name: &str) -> Map<String, Value> {
    let path = repo_path(&format!("../shared/fixtures/claims/{name}"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

// ---- FakeIssuer ---------------------------------------------------------------------------

#[derive(Clone)]
pub struct TestKey {
    pub kid: String,
    pair: Arc<RsaKeyPair>,
    n: String,
    pub pkcs8: Arc<Vec<u8>>,
}

impl TestKey {
    /// One of the committed test keys: `rsa-a`, `rsa-b` or `rsa-c`.
    pub fn load(name: &str) -> TestKey {
        let pkcs8 = std::fs::read(repo_path(&format!("tests/fixtures/keys/{name}.pk8"))).unwrap();
        let n =
            std::fs::read_to_string(repo_path(&format!("tests/fixtures/keys/{name}.n"))).unwrap().trim().to_string();
        TestKey {
            kid: name.to_string(),
            pair: Arc::new(RsaKeyPair::from_pkcs8(&pkcs8).unwrap()),
            n,
            pkcs8: Arc::new(pkcs8),
        }
    }

    pub fn jwk(&self) -> Value {
        json!({"kty": "RSA", "kid": self.kid, "use": "sig", "alg": "RS256", "n": self.n, "e": "AQAB"})
    }

    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        let mut sig = vec![0; self.pair.public().modulus_len()];
        self.pair.sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), message, &mut sig).unwrap();
        sig
    }
}

/// How the fake issuer answers.
#[derive(Clone, Debug, PartialEq)]
pub enum Mode {
    Normal,
    /// 503 on every request.
    Down,
    /// 200 with bytes that are not JSON.
    Garbage,
    /// A JWKS document larger than the broker's 64 KiB cap.
    Huge,
    /// 302 to another URL (which must not be followed).
    Redirect(String),
    /// Answers normally, after this many milliseconds.
    Slow(u64),
}

struct FakeState {
    url: String,
    published: Mutex<Vec<TestKey>>,
    signing: Mutex<TestKey>,
    mode: Mutex<Mode>,
    discovery_hits: AtomicUsize,
    jwks_hits: AtomicUsize,
}

pub struct FakeIssuer {
    pub url: String,
    state: Arc<FakeState>,
}

impl FakeIssuer {
    /// Starts on a free loopback port, publishing and signing with `rsa-a`.
    pub async fn start() -> FakeIssuer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let key = TestKey::load("rsa-a");
        let state = Arc::new(FakeState {
            url: url.clone(),
            published: Mutex::new(vec![key.clone()]),
            signing: Mutex::new(key),
            mode: Mutex::new(Mode::Normal),
            discovery_hits: AtomicUsize::new(0),
            jwks_hits: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/.well-known/jwks", get(jwks))
            .with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        FakeIssuer { url, state }
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    /// Publishes `keys` (replacing the set) without changing the signing key.
    pub fn publish(&self, keys: &[&str]) {
        *self.state.published.lock().unwrap() = keys.iter().map(|k| TestKey::load(k)).collect();
    }

    /// Signs future tokens with `key` (published or not).
    pub fn sign_with(&self, key: &str) {
        *self.state.signing.lock().unwrap() = TestKey::load(key);
    }

    pub fn signing_key(&self) -> TestKey {
        self.state.signing.lock().unwrap().clone()
    }

    pub fn jwks_fetches(&self) -> usize {
        self.state.jwks_hits.load(Ordering::SeqCst)
    }

    /// Every request the issuer has served (discovery and JWKS).
    pub fn requests(&self) -> usize {
        self.state.jwks_hits.load(Ordering::SeqCst) + self.state.discovery_hits.load(Ordering::SeqCst)
    }

    /// A fixture's claims re-stamped for this issuer at `now`: `iss`, `aud`, times, and a fresh
    /// `jti` (as the platforms mint a new one for every token).
    pub fn claims(&self, fixture_name: &str, now: i64) -> Map<String, Value> {
        let mut c = fixture(fixture_name);
        c.insert("jti".into(), json!(ephemera::ids::b64url(&ephemera::ids::random::<12>())));
        c.insert("iss".into(), json!(self.url));
        c.insert("aud".into(), json!(AUDIENCE));
        c.insert("iat".into(), json!(now));
        c.insert("nbf".into(), json!(now));
        c.insert("exp".into(), json!(now + 300));
        c
    }

    /// RS256 with the current signing key and a normal header.
    pub fn sign(&self, claims: &Map<String, Value>) -> String {
        let kid = self.signing_key().kid;
        self.sign_with_header(&json!({"alg": "RS256", "typ": "JWT", "kid": kid}), claims)
    }

    /// Any header, signed RS256 with the current signing key (for header attacks).
    pub fn sign_with_header(&self, header: &Value, claims: &Map<String, Value>) -> String {
        let message = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(Value::Object(claims.clone()).to_string().as_bytes())
        );
        let signature = self.signing_key().sign(message.as_bytes());
        format!("{message}.{}", b64url(&signature))
    }

    /// The RS256→HS256 confusion: HMAC-SHA256 keyed with the issuer's *public* key.
    pub fn sign_hs256_with_public_key(&self, claims: &Map<String, Value>) -> String {
        let key = self.signing_key();
        let header = json!({"alg": "HS256", "typ": "JWT", "kid": key.kid});
        let message = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(Value::Object(claims.clone()).to_string().as_bytes())
        );
        let public = key.pair.public().as_ref().to_vec();
        let tag = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &public), message.as_bytes());
        format!("{message}.{}", b64url(tag.as_ref()))
    }
}

async fn misbehave(state: &FakeState) -> Option<Response> {
    let mode = state.mode.lock().unwrap().clone();
    match mode {
        Mode::Normal | Mode::Huge => None,
        Mode::Slow(ms) => {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            None
        }
        Mode::Down => Some(StatusCode::SERVICE_UNAVAILABLE.into_response()),
        Mode::Garbage => Some((StatusCode::OK, "<html>not json</html>").into_response()),
        Mode::Redirect(to) => Some((StatusCode::FOUND, [("location", to)]).into_response()),
    }
}

async fn discovery(State(state): State<Arc<FakeState>>) -> Response {
    state.discovery_hits.fetch_add(1, Ordering::SeqCst);
    if let Some(r) = misbehave(&state).await {
        return r;
    }
    axum::Json(json!({"issuer": state.url, "jwks_uri": format!("{}/.well-known/jwks", state.url)})).into_response()
}

async fn jwks(State(state): State<Arc<FakeState>>) -> Response {
    state.jwks_hits.fetch_add(1, Ordering::SeqCst);
    if let Some(r) = misbehave(&state).await {
        return r;
    }
    let keys: Vec<Value> = state.published.lock().unwrap().iter().map(TestKey::jwk).collect();
    let mut doc = json!({"keys": keys});
    if *state.mode.lock().unwrap() == Mode::Huge {
        doc["padding"] = json!("x".repeat(70 * 1024));
    }
    axum::Json(doc).into_response()
}

// ---- the broker, in process ---------------------------------------------------------------

/// A policy that the `github-environment-deploy.json` fixture satisfies.
pub const DEPLOY_POLICY: &str = r#"
description: Deploy octo-repo to prod from main
issuer: ci
match:
  repository_id: "74"
  ref: refs/heads/main
  environment: [prod, staging]
  job_workflow_ref: {glob: "octo-org/octo-automation/.github/workflows/*.yml@refs/heads/main"}
deny:
  event_name: [pull_request, pull_request_target]
  runner_environment: self-hosted
ttl: {default: 15m, max: 1h}
grants:
  api:
    backend: jwt
    audience: https://api.internal.example
    claims: {scope: "deploy:web", repository: "${repository}", environment: "${environment}"}
"#;

/// A policy the push fixtures satisfy (any event on main of repository 74, except PRs).
pub const PUSH_POLICY: &str = r#"
issuer: ci
match:
  repository_id: "74"
  ref: refs/heads/main
deny:
  event_name: [pull_request, pull_request_target]
ttl: {default: 10m, max: 30m}
grants:
  api: {backend: jwt, audience: https://api.internal.example}
"#;

/// Any job of repository 74 gets one broker JWT, for 10 minutes by default (the chaos and disk
/// tests: what the credential is matters less than that it is recorded).
pub const REPO_74_JWT_POLICY: &str = r#"
issuer: ci
match: {repository_id: "74"}
ttl: {default: 10m, max: 1h}
grants:
  api: {backend: jwt, audience: https://api.internal.example}
"#;

/// Config lines for an `aws` backend named `aws` talking to `endpoint`, and the directory holding
/// the static test credentials it reads (keep it alive as long as the broker).
pub fn aws_backend(endpoint: &str, revocation: &str) -> (String, tempfile::TempDir) {
    let creds = tempfile::tempdir().unwrap();
    let file = creds.path().join("credentials");
    std::fs::write(&file, "[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n").unwrap();
    let toml = format!(
        "[backends.aws]\ntype = \"aws\"\nregion = \"us-east-1\"\nendpoint_url = \"{endpoint}\"\n\
         credentials_file = {:?}\nrevocation = \"{revocation}\"\nmax_ttl = \"1h\"\n",
        file.display().to_string()
    );
    (toml, creds)
}

/// Extra config lines for [`Broker::start_custom`].
#[derive(Default)]
pub struct Extra {
    pub issuer_toml: String,
    pub backend_toml: String,
    pub ledger_toml: String,
    /// Appended verbatim at the end of the config (e.g. a `[hooks]` table).
    pub hooks_toml: String,
}

// ---- token exchange (issue 19) --------------------------------------------------------------

/// The `agents` issuer's agents and the tools of [`AGENTS_POLICY`].
pub const GITHUB_MCP: &str = "https://mcp.example.com/github";
pub const SEARCH: &str = "https://search.example.com/mcp";
pub const REVIEWER: &str = "spiffe://ci.example/agent/reviewer";
pub const HELPER: &str = "spiffe://ci.example/agent/helper";

/// A policy for the job of repository 74 on main (the `ci` issuer): agents of the `agents`
/// issuer ([`agents_issuer_toml`]) act for it through two tools; its `delegate` grant is a JWT
/// for the broker that only the reviewer may exchange (`may_act`), its `api` grant one for
/// another service.
pub const AGENTS_POLICY: &str = r#"
issuer: ci
match: {repository_id: "74", ref: refs/heads/main}
ttl: {default: 10m, max: 30m}
actors:
  reviewer:
    issuer: agents
    match: {sub: "spiffe://ci.example/agent/reviewer"}
  helper:
    issuer: agents
    match: {sub: "spiffe://ci.example/agent/helper"}
    tools: [github]
  bot:
    issuer: broker
    match: {policy: agent-job}
tools:
  github:
    resource: https://mcp.example.com/github
    backend: jwt
    scopes: ["issues:read", "pulls:read", "pulls:write"]
    data: [own-repo]
  search:
    resource: https://search.example.com/mcp
    backend: jwt
    scopes: [search]
data:
  own-repo: {repositories: ["${repository}"], paths: ["src/**"]}
grants:
  delegate:
    backend: jwt
    audience: "http://127.0.0.1:1"
    claims: {may_act: {sub: "spiffe://ci.example/agent/reviewer"}}
  api:
    backend: jwt
    audience: https://api.internal.example
"#;

/// A `[[issuers]]` block for a `generic` issuer keyed and identified by `sub`, as an agents'
/// identity provider is (token exchange's actor tokens), for [`Extra::hooks_toml`].
pub fn agents_issuer_toml(name: &str, url: &str) -> String {
    format!(
        "[[issuers]]\nname = \"{name}\"\nplatform = \"generic\"\nurl = \"{url}\"\naudiences = [\"{AUDIENCE}\"]\n\
         max_token_lifetime = \"1h\"\nleeway = \"30s\"\nunknown_kid_cooldown = \"60s\"\n\
         job_key_claims = [\"sub\"]\nidentity_claims = [\"sub\"]\n"
    )
}

// ---- fakes for faults real parts cannot produce on demand ----------------------------------

/// A backend wrapper whose revocations fail a set number of times (or forever, with `u32::MAX`)
/// before reaching the real backend. A fake: no real backend fails on cue.
pub struct FlakyRevoke {
    inner: Arc<dyn Backend>,
    failures_left: AtomicU32,
    pub revoke_calls: AtomicUsize,
}

impl FlakyRevoke {
    pub fn new(inner: Arc<dyn Backend>, failures: u32) -> Arc<FlakyRevoke> {
        Arc::new(FlakyRevoke { inner, failures_left: AtomicU32::new(failures), revoke_calls: AtomicUsize::new(0) })
    }
}

impl Backend for FlakyRevoke {
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
        self.inner.mint(grant, cred, ctx)
    }
    fn revoke<'a>(&'a self, handle: &'a RevokeHandle) -> BoxFuture<'a, Result<(), MintError>> {
        self.revoke_calls.fetch_add(1, Ordering::SeqCst);
        let left = self.failures_left.load(Ordering::SeqCst);
        if left > 0 {
            if left != u32::MAX {
                self.failures_left.store(left - 1, Ordering::SeqCst);
            }
            return Box::pin(async { Err(MintError::new("injected: upstream 503")) });
        }
        self.inner.revoke(handle)
    }
}

/// Faults that wrap every backend in `flaky`.
pub fn flaky_backends(flaky: Arc<std::sync::Mutex<Option<Arc<FlakyRevoke>>>>, failures: u32) -> Faults {
    Faults {
        backend: Some(Arc::new(move |_name: &str, inner: Arc<dyn Backend>| -> Arc<dyn Backend> {
            let wrapped = FlakyRevoke::new(inner, failures);
            *flaky.lock().unwrap() = Some(wrapped.clone());
            wrapped
        })),
        storage: None,
    }
}

/// Journal storage whose writes fail with ENOSPC once `full` is set, like a full disk. A fake:
/// filling a real disk in a test would take the machine down with it.
pub struct FullDisk {
    inner: Box<dyn Storage>,
    full: Arc<AtomicBool>,
}

impl Storage for FullDisk {
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.full.load(Ordering::SeqCst) {
            // Like a real ENOSPC mid-write: part of the batch lands first.
            let _ = self.inner.append(&bytes[..bytes.len() / 2]);
            return Err(std::io::Error::from_raw_os_error(28));
        }
        self.inner.append(bytes)
    }
    fn sync(&mut self) -> std::io::Result<()> {
        self.inner.sync()
    }
    fn truncate(&mut self, len: u64) -> std::io::Result<()> {
        self.inner.truncate(len)
    }
    fn reader(&mut self) -> std::io::Result<Box<dyn ephemera::ledger::journal::JournalReader>> {
        self.inner.reader()
    }
    fn start_replacement(&mut self) -> std::io::Result<Box<dyn ephemera::ledger::journal::Replacement>> {
        self.inner.start_replacement()
    }
    fn install(&mut self, replacement: Box<dyn ephemera::ledger::journal::Replacement>) -> std::io::Result<()> {
        self.inner.install(replacement)
    }
    fn read_range(&mut self, from: u64, to: u64) -> std::io::Result<Vec<u8>> {
        self.inner.read_range(from, to)
    }
}

pub fn full_disk(full: Arc<AtomicBool>) -> Faults {
    Faults {
        storage: Some(Box::new(move |inner| Box::new(FullDisk { inner, full }) as Box<dyn Storage>)),
        backend: None,
    }
}

pub struct Broker {
    pub running: Running,
    pub clock: Arc<ManualClock>,
    pub http: reqwest::Client,
    pub url: String,
    /// The config's folder; the data directory is `dir/data`. Shared so a restart reuses it.
    pub dir: Arc<tempfile::TempDir>,
    toml: String,
}

impl Broker {
    /// A broker trusting `issuer` (as GitHub issuer `ci`), with the given (name, yaml) policies,
    /// started on a free port with a manual clock at [`NOW`]; returns once `/readyz` is 200.
    pub async fn start(issuer: &FakeIssuer, policies: &[(&str, &str)]) -> Broker {
        Broker::start_issuers(&[("ci", "github-actions", issuer)], policies).await
    }

    /// A broker trusting each (name, platform, issuer).
    pub async fn start_issuers(issuers: &[(&str, &str, &FakeIssuer)], policies: &[(&str, &str)]) -> Broker {
        Broker::start_custom(issuers, policies, &Extra::default()).await
    }

    /// As [`Broker::start_issuers`], with extra TOML lines for every issuer and the jwt backend.
    pub async fn start_custom(
        issuers: &[(&str, &str, &FakeIssuer)],
        policies: &[(&str, &str)],
        extra: &Extra,
    ) -> Broker {
        Broker::start_with_faults(issuers, policies, extra, None).await
    }

    pub async fn start_with_faults(
        issuers: &[(&str, &str, &FakeIssuer)],
        policies: &[(&str, &str)],
        extra: &Extra,
        faults: Option<Faults>,
    ) -> Broker {
        Broker::start_full(issuers, policies, extra, faults, Arc::new(ManualClock::new(NOW))).await
    }

    /// As [`Broker::start_custom`], on a clock the test also hands to a fake upstream.
    pub async fn start_custom_clock(
        issuers: &[(&str, &str, &FakeIssuer)],
        policies: &[(&str, &str)],
        extra: &Extra,
        clock: Arc<ManualClock>,
    ) -> Broker {
        Broker::start_full(issuers, policies, extra, None, clock).await
    }

    async fn start_full(
        issuers: &[(&str, &str, &FakeIssuer)],
        policies: &[(&str, &str)],
        extra: &Extra,
        faults: Option<Faults>,
        clock: Arc<ManualClock>,
    ) -> Broker {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        for (name, yaml) in policies {
            std::fs::write(dir.path().join(format!("policies/{name}.yaml")), yaml).unwrap();
        }
        let mut toml = String::from("listen = \"127.0.0.1:0\"\npublic_url = \"http://127.0.0.1:1\"\n");
        toml.push_str(&format!("[ledger]\n{}\n", extra.ledger_toml));
        for (name, platform, issuer) in issuers {
            toml.push_str(&format!(
                "[[issuers]]\nname = \"{name}\"\nplatform = \"{platform}\"\nurl = \"{}\"\naudiences = [\"{AUDIENCE}\"]\n\
                 max_token_lifetime = \"1h\"\nleeway = \"30s\"\nunknown_kid_cooldown = \"60s\"\n{}\n",
                issuer.url, extra.issuer_toml
            ));
        }
        toml.push_str(&format!("[backends.jwt]\ntype = \"jwt\"\nmax_ttl = \"1h\"\n{}\n", extra.backend_toml));
        toml.push_str(&format!("{}\n", extra.hooks_toml));
        Broker::launch(dir, toml, clock, faults).await
    }

    async fn launch(
        dir: Arc<tempfile::TempDir>,
        toml: String,
        clock: Arc<ManualClock>,
        faults: Option<Faults>,
    ) -> Broker {
        init_log_capture();
        let config = Config::parse(&toml, dir.path()).unwrap();
        let mut options = Options::new(config, false, clock.clone());
        options.faults = faults;
        let running = start(options).await.unwrap();
        let url = running.url();
        let broker = Broker { running, clock, http: reqwest::Client::new(), url, dir, toml };
        broker.wait_ready().await;
        broker
    }

    /// Shuts down gracefully and starts again on the same data directory and clock.
    pub async fn restart(self, faults: Option<Faults>) -> Broker {
        let Broker { running, clock, dir, toml, .. } = self;
        running.shutdown().await;
        Broker::launch(dir, toml, clock, faults).await
    }

    pub fn journal_path(&self) -> PathBuf {
        self.dir.path().join("data/ledger/journal")
    }

    /// The journal's events, read from disk.
    pub fn journal_events(&self) -> Vec<ephemera::ledger::Event> {
        ephemera::ledger::journal::decode(&std::fs::read(self.journal_path()).unwrap()).unwrap().0
    }

    async fn wait_ready(&self) {
        for _ in 0..200 {
            if self.running.app.readiness().0 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("broker did not become ready: {}", self.running.app.readiness().1);
    }

    /// POST /v1/exchange with a bearer token and a raw body; returns (status, JSON body).
    pub async fn exchange_raw(&self, token: &str, body: &str) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{}/v1/exchange", self.url))
            .bearer_auth(token)
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        status_json(resp).await
    }

    pub async fn exchange(&self, token: &str, policy: &str) -> (u16, Value) {
        self.exchange_raw(token, &json!({"policy": policy}).to_string()).await
    }

    pub async fn revoke(&self, token: &str, body: Value) -> (u16, Value) {
        let resp =
            self.http.post(format!("{}/v1/revoke", self.url)).bearer_auth(token).json(&body).send().await.unwrap();
        status_json(resp).await
    }

    /// Introspection needs the admin token outside dev mode; tests read the app directly.
    pub async fn introspect(&self, jwt: &str) -> Value {
        self.running.app.introspect(jwt).await
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let resp = self.http.get(format!("{}{path}", self.url)).send().await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }
}

async fn status_json(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Runs the real `ephemera` binary with `args` and the job's ID token in `EPHEMERA_ID_TOKEN`
/// (no proxy from the environment), off the async runtime.
pub async fn run_cli(args: &[&str], token: &str) -> std::process::Output {
    let (args, token): (Vec<String>, String) = (args.iter().map(|a| a.to_string()).collect(), token.to_string());
    tokio::task::spawn_blocking(move || {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ephemera"));
        cmd.args(&args).env("EPHEMERA_ID_TOKEN", token);
        for proxy in ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"] {
            cmd.env_remove(proxy);
        }
        cmd.output().expect("run the ephemera binary")
    })
    .await
    .unwrap()
}

/// Asserts the DESIGN §2 error shape and code.
pub fn assert_error(status_body: &(u16, Value), status: u16, code: &str) {
    let (got_status, body) = status_body;
    assert_eq!(*got_status, status, "status for {body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["request_id"].as_str().is_some_and(|r| r.starts_with("req_")), "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
}

// ---- log capture --------------------------------------------------------------------------

static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures every log line of this test binary (JSON, as the broker writes them).
pub fn init_log_capture() {
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = Capture(buf.clone());
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(ephemera::log_format::JsonFields)
            .event_format(ephemera::log_format::JsonLine)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        buf
    });
}

pub fn captured_logs() -> String {
    String::from_utf8_lossy(&LOGS.get().unwrap().lock().unwrap()).into_owned()
}

/// No secret, nor any long piece of one, in any log line captured so far.
pub fn assert_not_logged(secrets: &[&str]) {
    let logs = captured_logs();
    assert!(!logs.is_empty(), "no logs were captured");
    for secret in secrets {
        for piece in secret.split('.').filter(|p| p.len() > 16) {
            assert!(!logs.contains(piece), "a secret fragment reached the logs: {}…", &piece[..16]);
        }
    }
}
