//! A FAKE of GitHub's REST API for App installation tokens, served in process on 127.0.0.1.
//!
//! Why a fake: GitHub's API cannot run here (no network, and no GitHub Enterprise Server image
//! to start), and a real App could not be made to fail on cue anyway. The fake is strict where
//! GitHub is: it checks every App JWT's RS256 signature against the App's public key and its
//! `iss`, `iat` and `exp` (at most 10 minutes ahead) on its own clock, refuses a token request
//! for a repository outside the installation or a permission the installation lacks (422),
//! answers a revoked or unknown installation token with 401, and sends GitHub's rate-limit
//! headers. It records what it was asked (the requested repositories and permissions, each App
//! JWT seen), and injects faults on demand: a status for the next N requests of a route, a spent
//! rate limit, a token reply wider than the request.
//!
//! The shapes follow docs.github.com/rest/apps/apps (installation lookups,
//! `POST /app/installations/{id}/access_tokens`) and docs.github.com/rest/apps/installations
//! (`DELETE /installation/token`).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::result_large_err)]

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use ring::signature::{KeyPair, RSA_PKCS1_2048_8192_SHA256, RsaKeyPair, UnparsedPublicKey};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

pub type Now = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The App the fake knows.
pub const APP_ID: u64 = 4242;

/// The committed test App key (PKCS#1 PEM, as GitHub hands one out).
pub fn app_key_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keys/github-app.pem")
}

#[derive(Clone, Debug)]
pub struct FakeInstallation {
    pub id: u64,
    pub owner: String,
    /// `Organization` or `User`: which lookup path finds it.
    pub organization: bool,
    pub permissions: BTreeMap<String, String>,
    /// `None`: every repository of the owner (`repository_selection: all`).
    pub selected: Option<Vec<String>>,
    /// Repositories the owner has (a token request for another one is a 422).
    pub repositories: Vec<String>,
    pub suspended: bool,
}

impl FakeInstallation {
    /// An organisation installation on all of `repositories`, with `permissions`.
    pub fn org(id: u64, owner: &str, repositories: &[&str], permissions: &[(&str, &str)]) -> FakeInstallation {
        FakeInstallation {
            id,
            owner: owner.into(),
            organization: true,
            permissions: permissions.iter().map(|(p, l)| (p.to_string(), l.to_string())).collect(),
            selected: None,
            repositories: repositories.iter().map(|r| r.to_string()).collect(),
            suspended: false,
        }
    }
}

/// One token request as the fake received it.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenRequest {
    pub installation: u64,
    pub repositories: Vec<String>,
    pub permissions: BTreeMap<String, String>,
    /// The token it answered with (when it answered 201).
    pub token: Option<String>,
}

#[derive(Clone, Debug)]
struct Issued {
    installation: u64,
    expires_at: i64,
    revoked: bool,
}

/// A fault for the next `count` requests whose path starts with `prefix` (and method matches).
#[derive(Clone, Debug)]
struct Fault {
    method: Method,
    prefix: String,
    status: u16,
    count: usize,
}

struct FakeState {
    now: Now,
    public_key: Vec<u8>,
    installations: Mutex<Vec<FakeInstallation>>,
    tokens: Mutex<HashMap<String, Issued>>,
    token_requests: Mutex<Vec<TokenRequest>>,
    app_jwts: Mutex<HashSet<String>>,
    requests: Mutex<Vec<(Method, String)>>,
    faults: Mutex<Vec<Fault>>,
    /// App budget: remaining calls, and the reset time sent with every reply.
    remaining: Mutex<i64>,
    reset_at: Mutex<i64>,
    /// A secondary limit: every App call answers 403 with this `retry-after`.
    retry_after: Mutex<Option<i64>>,
    /// Adds this permission to every token reply (a GitHub that grants more than asked).
    widen: Mutex<Option<(String, String)>>,
    next_token: Mutex<u64>,
    /// When set, token requests wait here for a permit (the test hands them out), so a test
    /// sees how many the broker has in flight at once.
    gate: Mutex<Option<Arc<tokio::sync::Semaphore>>>,
    in_flight: std::sync::atomic::AtomicUsize,
    max_in_flight: std::sync::atomic::AtomicUsize,
}

pub struct FakeGithub {
    pub url: String,
    state: Arc<FakeState>,
}

impl FakeGithub {
    /// Serves the fake on a free loopback port, knowing `installations`, with its clock `now`.
    pub async fn start(now: Now, installations: Vec<FakeInstallation>) -> FakeGithub {
        let pem = std::fs::read(app_key_path()).unwrap();
        let der = ephemera::mint::keys::pem_to_der(&pem).unwrap();
        let pair = RsaKeyPair::from_der(&der).unwrap();
        let reset = now() + 3600;
        let state = Arc::new(FakeState {
            now,
            public_key: pair.public_key().as_ref().to_vec(),
            installations: Mutex::new(installations),
            tokens: Mutex::new(HashMap::new()),
            token_requests: Mutex::new(Vec::new()),
            app_jwts: Mutex::new(HashSet::new()),
            requests: Mutex::new(Vec::new()),
            faults: Mutex::new(Vec::new()),
            remaining: Mutex::new(5000),
            reset_at: Mutex::new(reset),
            retry_after: Mutex::new(None),
            widen: Mutex::new(None),
            next_token: Mutex::new(0),
            gate: Mutex::new(None),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            max_in_flight: std::sync::atomic::AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/orgs/{owner}/installation", get(org_installation))
            .route("/users/{owner}/installation", get(user_installation))
            .route("/repos/{owner}/{repo}/installation", get(repo_installation))
            .route("/app/installations/{id}/access_tokens", post(access_tokens))
            .route("/installation/token", delete(revoke_token))
            .layer(axum::middleware::from_fn_with_state(state.clone(), record_and_fault))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        FakeGithub { url, state }
    }

    /// Config lines for a `github-app` backend named `name` talking to this fake.
    pub fn backend_toml(&self, name: &str) -> String {
        format!(
            "[backends.{name}]\ntype = \"github-app\"\napp_id = {APP_ID}\nprivate_key_file = {:?}\napi_url = \"{}\"\n",
            app_key_path().display().to_string(),
            self.url
        )
    }

    /// Every token request so far, in order.
    pub fn token_requests(&self) -> Vec<TokenRequest> {
        self.state.token_requests.lock().unwrap().clone()
    }

    /// Distinct App JWTs the fake has accepted or refused.
    pub fn app_jwts_seen(&self) -> usize {
        self.state.app_jwts.lock().unwrap().len()
    }

    /// Every request so far: (method, path).
    pub fn requests(&self) -> Vec<(Method, String)> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Requests so far whose path starts with `prefix`.
    pub fn count(&self, method: Method, prefix: &str) -> usize {
        self.requests().iter().filter(|(m, p)| *m == method && p.starts_with(prefix)).count()
    }

    /// Is `token` still accepted by the fake (issued, not revoked, not expired)?
    pub fn is_live(&self, token: &str) -> bool {
        let now = (self.state.now)();
        self.state.tokens.lock().unwrap().get(token).is_some_and(|t| !t.revoked && t.expires_at > now)
    }

    /// Every token the fake would still accept now (issued, not revoked, not expired), with its
    /// expiry.
    pub fn live_tokens(&self) -> Vec<(String, i64)> {
        let now = (self.state.now)();
        let tokens = self.state.tokens.lock().unwrap();
        tokens
            .iter()
            .filter(|(_, t)| !t.revoked && t.expires_at > now)
            .map(|(k, t)| (k.clone(), t.expires_at))
            .collect()
    }

    /// How many tokens the fake has issued.
    pub fn tokens_issued(&self) -> usize {
        self.state.tokens.lock().unwrap().len()
    }

    /// The next `count` requests of `method` whose path starts with `prefix` answer `status`.
    pub fn fail_next(&self, method: Method, prefix: &str, status: u16, count: usize) {
        self.state.faults.lock().unwrap().push(Fault { method, prefix: prefix.into(), status, count });
    }

    /// The App's budget: `remaining` calls until `reset_at`; at 0 every App call is a 403.
    pub fn set_rate_limit(&self, remaining: i64, reset_at: i64) {
        *self.state.remaining.lock().unwrap() = remaining;
        *self.state.reset_at.lock().unwrap() = reset_at;
    }

    /// A secondary rate limit: every App call answers 403 with `retry-after` (or stops with `None`).
    pub fn set_retry_after(&self, secs: Option<i64>) {
        *self.state.retry_after.lock().unwrap() = secs;
    }

    /// Token replies claim this extra permission (a GitHub that grants more than asked).
    pub fn widen_replies(&self, permission: &str, level: &str) {
        *self.state.widen.lock().unwrap() = Some((permission.into(), level.into()));
    }

    /// Token requests and revocations wait at a gate until the test adds permits to it.
    pub fn close_gate(&self) -> Arc<tokio::sync::Semaphore> {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        *self.state.gate.lock().unwrap() = Some(gate.clone());
        gate
    }

    /// Requests waiting at the gate now, and the most that ever were at once.
    pub fn in_flight(&self) -> (usize, usize) {
        use std::sync::atomic::Ordering::SeqCst;
        (self.state.in_flight.load(SeqCst), self.state.max_in_flight.load(SeqCst))
    }

    pub fn installations_mut(&self, f: impl FnOnce(&mut Vec<FakeInstallation>)) {
        f(&mut self.state.installations.lock().unwrap());
    }
}

fn github_error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({"message": message, "documentation_url": "https://docs.github.com/rest"})))
        .into_response()
}

/// Records the request, applies an injected fault, and stamps the rate-limit headers.
async fn record_and_fault(
    State(state): State<Arc<FakeState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    state.requests.lock().unwrap().push((method.clone(), path.clone()));
    let app_call = path != "/installation/token";
    let fault = {
        let mut faults = state.faults.lock().unwrap();
        let hit = faults.iter_mut().find(|f| f.method == method && path.starts_with(&f.prefix) && f.count > 0);
        hit.map(|f| {
            f.count -= 1;
            f.status
        })
    };
    let reset = *state.reset_at.lock().unwrap();
    let mut response = if let Some(status) = fault {
        github_error(StatusCode::from_u16(status).unwrap(), "injected fault")
    } else if let (true, Some(secs)) = (app_call, *state.retry_after.lock().unwrap()) {
        let mut r = github_error(StatusCode::FORBIDDEN, "You have exceeded a secondary rate limit.");
        r.headers_mut().insert("retry-after", secs.to_string().parse().unwrap());
        r
    } else if app_call && *state.remaining.lock().unwrap() <= 0 {
        github_error(StatusCode::FORBIDDEN, "API rate limit exceeded for app.")
    } else {
        if app_call {
            *state.remaining.lock().unwrap() -= 1;
        }
        next.run(req).await
    };
    if app_call {
        let remaining = (*state.remaining.lock().unwrap()).max(0);
        let headers = response.headers_mut();
        headers.insert("x-ratelimit-limit", "5000".parse().unwrap());
        headers.insert("x-ratelimit-remaining", remaining.to_string().parse().unwrap());
        headers.insert("x-ratelimit-reset", reset.to_string().parse().unwrap());
        headers.insert("x-ratelimit-resource", "core".parse().unwrap());
    }
    response
}

/// GitHub's checks on an App JWT: RS256 by the App's key, `iss` the App, `iat` not in the
/// future (60 s of drift), `exp` in the future and at most 10 minutes ahead.
fn check_app_jwt(state: &FakeState, headers: &HeaderMap) -> Result<(), Response> {
    let refuse = |why: &str| Err(github_error(StatusCode::UNAUTHORIZED, why));
    let Some(jwt) = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "))
    else {
        return refuse("Requires authentication");
    };
    state.app_jwts.lock().unwrap().insert(jwt.to_string());
    let parts: Vec<&str> = jwt.split('.').collect();
    if parts.len() != 3 {
        return refuse("A JSON web token could not be decoded");
    }
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let (Ok(header), Ok(payload), Ok(signature)) = (b64.decode(parts[0]), b64.decode(parts[1]), b64.decode(parts[2]))
    else {
        return refuse("A JSON web token could not be decoded");
    };
    let header: Value = serde_json::from_slice(&header).unwrap_or(Value::Null);
    if header["alg"] != "RS256" {
        return refuse("'alg' must be RS256");
    }
    let key = UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &state.public_key);
    if key.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature).is_err() {
        return refuse("A JSON web token could not be decoded");
    }
    let claims: Value = serde_json::from_slice(&payload).unwrap_or(Value::Null);
    let iss = match &claims["iss"] {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    };
    if iss != APP_ID.to_string() {
        return refuse("'Issuer' claim ('iss') must be an Integer or the app's client ID");
    }
    let now = (state.now)();
    let (Some(iat), Some(exp)) = (claims["iat"].as_i64(), claims["exp"].as_i64()) else {
        return refuse("'Issued at' and 'Expiration time' claims are required");
    };
    if iat > now + 60 {
        return refuse("'Issued at' claim ('iat') must be an Integer representing a time in the past");
    }
    if exp <= now || exp > now + 600 {
        return refuse("'Expiration time' claim ('exp') is too far in the future");
    }
    Ok(())
}

fn installation_json(i: &FakeInstallation) -> Value {
    json!({
        "id": i.id,
        "app_id": APP_ID,
        "account": {"login": i.owner, "type": if i.organization { "Organization" } else { "User" }},
        "target_type": if i.organization { "Organization" } else { "User" },
        "repository_selection": if i.selected.is_some() { "selected" } else { "all" },
        "permissions": i.permissions,
        "suspended_at": if i.suspended { json!("2026-01-01T00:00:00Z") } else { Value::Null },
    })
}

fn find_installation(state: &FakeState, owner: &str, organization: bool) -> Option<FakeInstallation> {
    let all = state.installations.lock().unwrap();
    all.iter().find(|i| i.owner.eq_ignore_ascii_case(owner) && i.organization == organization).cloned()
}

async fn org_installation(State(s): State<Arc<FakeState>>, headers: HeaderMap, Path(owner): Path<String>) -> Response {
    lookup(&s, &headers, &owner, true)
}

async fn user_installation(State(s): State<Arc<FakeState>>, headers: HeaderMap, Path(owner): Path<String>) -> Response {
    lookup(&s, &headers, &owner, false)
}

fn lookup(state: &FakeState, headers: &HeaderMap, owner: &str, organization: bool) -> Response {
    if let Err(r) = check_app_jwt(state, headers) {
        return r;
    }
    match find_installation(state, owner, organization) {
        Some(i) => axum::Json(installation_json(&i)).into_response(),
        None => github_error(StatusCode::NOT_FOUND, "Not Found"),
    }
}

async fn repo_installation(
    State(state): State<Arc<FakeState>>,
    headers: HeaderMap,
    Path((owner, repo)): Path<(String, String)>,
) -> Response {
    if let Err(r) = check_app_jwt(&state, &headers) {
        return r;
    }
    let all = state.installations.lock().unwrap();
    let found = all.iter().find(|i| {
        i.owner.eq_ignore_ascii_case(&owner)
            && i.repositories.iter().any(|r| r.eq_ignore_ascii_case(&repo))
            && i.selected.as_ref().is_none_or(|s| s.iter().any(|r| r.eq_ignore_ascii_case(&repo)))
    });
    match found {
        Some(i) => axum::Json(installation_json(i)).into_response(),
        None => github_error(StatusCode::NOT_FOUND, "Not Found"),
    }
}

fn level_rank(level: &str) -> u8 {
    match level {
        "read" => 1,
        "write" => 2,
        "admin" => 3,
        _ => 0,
    }
}

async fn access_tokens(
    State(state): State<Arc<FakeState>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    body: Bytes,
) -> Response {
    if let Err(r) = check_app_jwt(&state, &headers) {
        return r;
    }
    wait_at_gate(&state).await;
    let Some(installation) = state.installations.lock().unwrap().iter().find(|i| i.id == id).cloned() else {
        return github_error(StatusCode::NOT_FOUND, "Not Found");
    };
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let repositories: Vec<String> = body["repositories"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default();
    let permissions: BTreeMap<String, String> = body["permissions"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string())).collect())
        .unwrap_or_default();
    let mut request = TokenRequest {
        installation: id,
        repositories: repositories.clone(),
        permissions: permissions.clone(),
        token: None,
    };
    let reachable = |r: &String| {
        installation.repositories.iter().any(|x| x.eq_ignore_ascii_case(r))
            && installation.selected.as_ref().is_none_or(|s| s.iter().any(|x| x.eq_ignore_ascii_case(r)))
    };
    if !repositories.iter().all(reachable) {
        state.token_requests.lock().unwrap().push(request);
        return github_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "There is at least one repository that does not exist or is not accessible to the parent installation.",
        );
    }
    let granted = |(p, l): (&String, &String)| {
        installation.permissions.get(p).is_some_and(|held| level_rank(held) >= level_rank(l) && level_rank(l) > 0)
    };
    if !permissions.iter().all(granted) {
        state.token_requests.lock().unwrap().push(request);
        return github_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "The permissions requested are not granted to this installation.",
        );
    }
    let now = (state.now)();
    let token = {
        let mut n = state.next_token.lock().unwrap();
        *n += 1;
        format!("ghs_fake{:032}", *n)
    };
    let expires_at = now + 3600;
    state.tokens.lock().unwrap().insert(token.clone(), Issued { installation: id, expires_at, revoked: false });
    request.token = Some(token.clone());
    state.token_requests.lock().unwrap().push(request);
    let mut reply_permissions: Map<String, Value> = permissions.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    reply_permissions.insert("metadata".into(), json!("read"));
    if let Some((p, l)) = state.widen.lock().unwrap().clone() {
        reply_permissions.insert(p, json!(l));
    }
    let reply = json!({
        "token": token,
        "expires_at": ephemera::clock::rfc3339(expires_at),
        "permissions": reply_permissions,
        "repository_selection": "selected",
        "repositories": repositories.iter().map(|r| json!({"name": r, "full_name": format!("{}/{r}", installation.owner)})).collect::<Vec<_>>(),
    });
    (StatusCode::CREATED, axum::Json(reply)).into_response()
}

/// Holds a token request or revocation at the gate while one is closed ([`FakeGithub::close_gate`]).
async fn wait_at_gate(state: &FakeState) {
    let gate = state.gate.lock().unwrap().clone();
    if let Some(gate) = gate {
        use std::sync::atomic::Ordering::SeqCst;
        let now_in = state.in_flight.fetch_add(1, SeqCst) + 1;
        state.max_in_flight.fetch_max(now_in, SeqCst);
        gate.acquire().await.unwrap().forget();
        state.in_flight.fetch_sub(1, SeqCst);
    }
}

async fn revoke_token(State(state): State<Arc<FakeState>>, headers: HeaderMap, _uri: Uri) -> Response {
    wait_at_gate(&state).await;
    let token = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let now = (state.now)();
    let mut tokens = state.tokens.lock().unwrap();
    match token.and_then(|t| tokens.get_mut(t)) {
        Some(t) if !t.revoked && t.expires_at > now => {
            t.revoked = true;
            StatusCode::NO_CONTENT.into_response()
        }
        _ => github_error(StatusCode::UNAUTHORIZED, "Bad credentials"),
    }
}
