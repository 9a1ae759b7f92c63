//! Several real `ephemera serve` processes ("replicas") on one shared PostgreSQL database
//! ([`Cluster`], [`Replica`]): each replica has its own config file, data directory, audit file
//! and port; all share one fresh database, one policies directory, one [`FakeIssuer`] (issuer
//! `ci`), one jwt signing key file, one admin token and one GitHub webhook secret.
//!
//! The PostgreSQL server is the one `scripts/test` exports as `EPHEMERA_PG_URL`, or else the one
//! `scripts/pg` starts (or finds running) under `target/pg-test` ([`pg_server_url`]); a test that
//! stops its server starts its own ([`OwnPg`]).
// Compiled into every test binary that has `mod common;`; a failed expectation is a failed test.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::{AUDIENCE, FakeIssuer};
use serde_json::{Map, Value, json};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tempfile::TempDir;

/// The admin bearer every replica accepts (the configs hold only its SHA-256).
pub const ADMIN_TOKEN: &str = "replicas-admin-token-for-tests-0123456789";
/// The GitHub webhook secret every replica is given (in a file, with a trailing newline).
pub const GITHUB_SECRET: &str = "replicas-github-webhook-secret";
/// How long to wait for a replica's `listening` line.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long to wait for a replica's `/readyz` to say 200.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How often conditions are polled.
pub const POLL: Duration = Duration::from_millis(20);
/// The timeout of one HTTP request made by [`http_client`].
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);

const PROXY_VARS: [&str; 8] =
    ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"];
const AWS_VARS: [&str; 8] = [
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_REGION",
];

// ---- PostgreSQL -----------------------------------------------------------------------------

/// The shared test server's superuser URL: `EPHEMERA_PG_URL`, else `scripts/pg start
/// <crate>/target/pg-test` (as src/ledger/postgres/testing.rs does).
pub fn pg_server_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("EPHEMERA_PG_URL") {
            return url;
        }
        let root = env!("CARGO_MANIFEST_DIR");
        let out = Command::new(format!("{root}/scripts/pg"))
            .args(["start", &format!("{root}/target/pg-test")])
            .output()
            .expect("scripts/pg runs");
        assert!(out.status.success(), "scripts/pg start failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    })
    .clone()
}

/// `server` (a superuser URL) with its database replaced by `db`.
pub fn database_url(server: &str, db: &str) -> String {
    let mut url = url::Url::parse(server).unwrap_or_else(|e| panic!("not a URL: {server}: {e}"));
    url.set_path(&format!("/{db}"));
    url.to_string()
}

/// The server's roles whose names start with `prefix` (a `postgres` backend's `role_prefix`).
pub async fn roles_with(db: &tokio_postgres::Client, prefix: &str) -> Vec<String> {
    let rows = db.query("SELECT rolname FROM pg_roles WHERE starts_with(rolname, $1)", &[&prefix]).await.unwrap();
    rows.iter().map(|r| r.get::<_, String>(0)).collect()
}

/// A client connected to `url` (its connection driven by a spawned task).
pub async fn pg_connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Creates a new, empty database on `server`; returns its URL.
pub async fn create_database(server: &str) -> String {
    let name = format!("ephemera_replicas_{}", ephemera::secret::hex(&ephemera::ids::random::<8>()));
    pg_connect(server).await.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
    database_url(server, &name)
}

/// A PostgreSQL server of the test's own (`scripts/pg start <tempdir>`), for tests that stop
/// it; stopped on drop. A restart reuses its port (the directory's `port` file).
pub struct OwnPg {
    pub dir: TempDir,
    /// The superuser URL.
    pub url: String,
    env: Vec<(String, PathBuf)>,
}

impl OwnPg {
    pub async fn start() -> OwnPg {
        OwnPg::start_with(&[]).await
    }

    /// Started with `scripts/pg`'s environment options (`EPHEMERA_PG_TLS_DIR`, …).
    pub async fn start_with(env: &[(&str, &Path)]) -> OwnPg {
        let dir = tempfile::tempdir().unwrap();
        // Built before anything can panic, so Drop stops the server on every path.
        let mut pg =
            OwnPg { dir, url: String::new(), env: env.iter().map(|(k, v)| (k.to_string(), v.to_path_buf())).collect() };
        pg.url = pg.run("start").await;
        pg
    }

    /// `scripts/pg stop`: a fast shutdown, waited for.
    pub async fn stop(&self) {
        self.run("stop").await;
    }

    /// `scripts/pg start` again, on the same port; returns the URL (the same as before).
    pub async fn restart(&self) -> String {
        self.run("start").await
    }

    async fn run(&self, cmd: &str) -> String {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pg");
        let out = tokio::process::Command::new(&script)
            .arg(cmd)
            .arg(self.dir.path())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap_or_else(|e| panic!("running scripts/pg {cmd}: {e}"));
        assert!(
            out.status.success(),
            "scripts/pg {cmd} {} failed ({}): {}",
            self.dir.path().display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }
}

impl Drop for OwnPg {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pg");
        let _ = Command::new(script).arg("stop").arg(self.dir.path()).stdin(Stdio::null()).output();
    }
}

// ---- the cluster ----------------------------------------------------------------------------

/// What one replica's config adds to the shared shape.
#[derive(Default, Clone)]
pub struct ReplicaExtra {
    /// Lines inside `[ledger]` (after store, url, reap_interval).
    pub ledger_toml: String,
    /// Tables after `[backends.jwt]` (e.g. a `[backends.aws]`).
    pub backends_toml: String,
    /// Appended at the end (e.g. [`Cluster::github_hooks_toml`]).
    pub tail_toml: String,
    /// The embedded file store under the data directory instead of the shared database (a
    /// single broker; with [`ReplicaExtra::home`], restarts keep its journal).
    pub file_store: bool,
    /// This directory as the replica's home (config, data directory, logs), kept across
    /// restarts, instead of a fresh temporary one.
    pub home: Option<PathBuf>,
}

/// What every replica of a test shares.
pub struct Cluster {
    pub issuer: FakeIssuer,
    /// The shared database's URL.
    pub db_url: String,
    /// `policies/`, `jwt-es256.pk8`, `github-secret`.
    pub dir: TempDir,
    pub http: reqwest::Client,
}

impl Cluster {
    /// A fresh database on `server`, a started issuer, the policies written, a fresh ES256 key.
    pub async fn new(server: &str, policies: &[(&str, &str)]) -> Cluster {
        let db_url = create_database(server).await;
        let issuer = FakeIssuer::start().await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        for (name, yaml) in policies {
            std::fs::write(dir.path().join(format!("policies/{name}.yaml")), yaml).unwrap();
        }
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &ring::rand::SystemRandom::new(),
        )
        .unwrap();
        std::fs::write(dir.path().join("jwt-es256.pk8"), pkcs8.as_ref()).unwrap();
        std::fs::write(dir.path().join("github-secret"), format!("{GITHUB_SECRET}\n")).unwrap();
        Cluster { issuer, db_url, dir, http: http_client(CLIENT_TIMEOUT) }
    }

    /// The `[hooks]` table turning the GitHub webhook on with the shared secret.
    pub fn github_hooks_toml(&self) -> String {
        format!("[hooks]\ngithub_secret_file = {}\n", toml_path(&self.dir.path().join("github-secret")))
    }

    /// Replica `id`'s config text, its data directory, audit file and policies under `home`.
    pub fn config(&self, id: &str, home: &Path, extra: &ReplicaExtra) -> String {
        let admin_sha =
            ephemera::secret::hex(ring::digest::digest(&ring::digest::SHA256, ADMIN_TOKEN.as_bytes()).as_ref());
        let store = match extra.file_store {
            true => String::new(),
            false => format!("store = \"postgres\"\nurl = \"{}\"", self.db_url),
        };
        format!(
            "listen = \"127.0.0.1:0\"\n\
             public_url = \"{AUDIENCE}\"\n\
             policies = {policies}\n\
             data_dir = {data}\n\
             replica_id = \"{id}\"\n\
             \n\
             [ledger]\n\
             {store}\n\
             reap_interval = \"1s\"\n\
             {ledger}\n\
             \n\
             [[issuers]]\n\
             name = \"ci\"\n\
             platform = \"github-actions\"\n\
             url = \"{issuer}\"\n\
             audiences = [\"{AUDIENCE}\"]\n\
             max_token_lifetime = \"1h\"\n\
             leeway = \"30s\"\n\
             unknown_kid_cooldown = \"60s\"\n\
             replay_protection = true\n\
             \n\
             [backends.jwt]\n\
             type = \"jwt\"\n\
             signing_key_file = {key}\n\
             max_ttl = \"1h\"\n\
             \n\
             {backends}\n\
             \n\
             [admin]\n\
             token_sha256 = \"{admin_sha}\"\n\
             \n\
             [audit]\n\
             file = {audit}\n\
             \n\
             {tail}\n",
            policies = toml_path(&self.dir.path().join("policies")),
            data = toml_path(&home.join("data")),
            ledger = extra.ledger_toml,
            issuer = self.issuer.url,
            key = toml_path(&self.dir.path().join("jwt-es256.pk8")),
            backends = extra.backends_toml,
            audit = toml_path(&home.join("audit.jsonl")),
            tail = extra.tail_toml,
        )
    }

    /// Spawns replica `id` without waiting for anything.
    pub fn spawn(&self, id: &str, extra: &ReplicaExtra) -> Replica {
        let temp = extra.home.is_none().then(|| tempfile::tempdir().unwrap());
        let home_path = extra.home.clone().unwrap_or_else(|| temp.as_ref().unwrap().path().to_path_buf());
        std::fs::create_dir_all(&home_path).unwrap();
        let home = home_path.as_path();
        let config_path = home.join("ephemera.toml");
        std::fs::write(&config_path, self.config(id, home, extra)).unwrap();
        let stderr_path = home.join("stderr.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ephemera"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&config_path)
            .current_dir(home)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr_path).unwrap());
        for var in PROXY_VARS.iter().chain(&AWS_VARS) {
            cmd.env_remove(var);
        }
        let mut child = cmd.spawn().expect("spawn the ephemera binary");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // Keeps draining stdout for the process's whole life: a closed pipe would kill it mid-println.
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        Replica {
            id: id.to_string(),
            child,
            url: String::new(),
            stderr_path,
            audit_path: home.join("audit.jsonl"),
            stdout: rx,
            http: self.http.clone(),
            _home: temp,
        }
    }

    /// Spawns replica `id` and waits for its `listening` line and a 200 from `/readyz`.
    pub async fn start(&self, id: &str, extra: &ReplicaExtra) -> Replica {
        let mut replica = self.spawn(id, extra);
        replica.wait_listening().await;
        replica.wait_ready().await;
        replica
    }

    /// A fixture's claims, re-stamped for the issuer at the current time, with a fresh `jti`.
    pub fn claims(&self, fixture: &str) -> Map<String, Value> {
        self.issuer.claims(fixture, unix_now())
    }

    /// A freshly signed token of `fixture` (a new `jti` each time).
    pub fn token(&self, fixture: &str) -> String {
        self.issuer.sign(&self.claims(fixture))
    }

    /// A new connection to the shared database.
    pub async fn db(&self) -> tokio_postgres::Client {
        pg_connect(&self.db_url).await
    }
}

/// A path as a TOML basic string.
fn toml_path(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

pub fn unix_now() -> i64 {
    i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()).unwrap()
}

/// An HTTP client: no proxy, each request bounded by `timeout`.
pub fn http_client(timeout: Duration) -> reqwest::Client {
    ephemera::install_crypto();
    reqwest::Client::builder().no_proxy().timeout(timeout).build().expect("reqwest client")
}

// ---- one replica ----------------------------------------------------------------------------

/// A running (or exited) `ephemera serve --config …`, killed (SIGKILL) on drop.
pub struct Replica {
    pub id: String,
    child: Child,
    /// `http://127.0.0.1:PORT`, empty until [`Replica::wait_listening`].
    url: String,
    stderr_path: PathBuf,
    audit_path: PathBuf,
    stdout: tokio::sync::mpsc::UnboundedReceiver<String>,
    pub http: reqwest::Client,
    _home: Option<TempDir>,
}

impl Replica {
    /// Waits (bounded) for the first stdout line, `ephemera listening on http://127.0.0.1:PORT`.
    pub async fn wait_listening(&mut self) {
        let line = match tokio::time::timeout(LINE_TIMEOUT, self.stdout.recv()).await {
            Ok(Some(line)) => line,
            Ok(None) => panic!("replica {} closed stdout before its first line; stderr:\n{}", self.id, self.stderr()),
            Err(_) => {
                panic!("replica {} printed nothing within {LINE_TIMEOUT:?}; stderr:\n{}", self.id, self.stderr())
            }
        };
        let url = line.strip_prefix("ephemera listening on ").unwrap_or_else(|| {
            panic!("replica {}: unexpected first stdout line {line:?}; stderr:\n{}", self.id, self.stderr())
        });
        assert!(url.starts_with("http://127.0.0.1:") && !url.ends_with(":0"), "replica {}: {url}", self.id);
        self.url = url.to_string();
    }

    /// Polls `/readyz` until 200 (bounded by [`READY_TIMEOUT`]), failing fast if the process exits.
    pub async fn wait_ready(&mut self) {
        self.wait_ready_within(READY_TIMEOUT).await;
    }

    /// Polls `/readyz` until 200, at most `limit`; returns how long it took.
    pub async fn wait_ready_within(&mut self, limit: Duration) -> Duration {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < limit {
            if let Some(status) = self.try_wait() {
                panic!("replica {} exited with {status} before it was ready; stderr:\n{}", self.id, self.stderr());
            }
            match self.http.get(self.endpoint("/readyz")).send().await {
                Ok(resp) if resp.status() == 200 => {
                    let body: Value = resp.json().await.expect("readyz JSON");
                    assert_eq!(body["ready"], true, "{body}");
                    assert_eq!(body["ledger"], "open", "{body}");
                    return start.elapsed();
                }
                Ok(resp) => last = format!("{} {}", resp.status(), resp.text().await.unwrap_or_default()),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(POLL).await;
        }
        panic!("replica {} was not ready within {limit:?} (last: {last}); stderr:\n{}", self.id, self.stderr());
    }

    /// `GET /readyz`: the status and the body.
    pub async fn readyz(&self) -> (u16, Value) {
        let resp = self.http.get(self.endpoint("/readyz")).send().await.expect("GET /readyz");
        status_json(resp).await
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn endpoint(&self, path: &str) -> String {
        assert!(!self.url.is_empty(), "replica {}: wait_listening first", self.id);
        format!("{}{path}", self.url)
    }

    /// Everything the replica wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The replica's audit events so far (one JSON object a line).
    pub fn audit_events(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.audit_path).unwrap_or_default();
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("replica {}: audit line {l:?}: {e}", self.id)))
            .collect()
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// SIGKILL (what `Child::kill` sends on Unix), then reaps the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    // ---- requests ----

    /// `POST /v1/exchange {"policy": …}` with `token`.
    pub async fn exchange(&self, token: &str, policy: &str) -> (u16, Value) {
        post_json(&self.http, &self.endpoint("/v1/exchange"), token, &json!({"policy": policy})).await
    }

    /// `POST /v1/revoke` with `token` and `body`.
    pub async fn revoke(&self, token: &str, body: &Value) -> (u16, Value) {
        post_json(&self.http, &self.endpoint("/v1/revoke"), token, body).await
    }

    /// `POST /v1/introspect` (with the admin bearer, as outside dev mode it must); asserts 200.
    pub async fn introspect(&self, jwt: &str) -> Value {
        let form = form_urlencoded::Serializer::new(String::new()).append_pair("token", jwt).finish();
        let resp = self
            .http
            .post(self.endpoint("/v1/introspect"))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await
            .expect("POST /v1/introspect");
        let (status, body) = status_json(resp).await;
        assert_eq!(status, 200, "replica {}: introspect: {body}", self.id);
        body
    }

    /// An admin `GET` (admin bearer).
    pub async fn admin_get(&self, path: &str) -> (u16, Value) {
        let resp = self.http.get(self.endpoint(path)).bearer_auth(ADMIN_TOKEN).send().await.expect("admin GET");
        status_json(resp).await
    }

    /// `GET /v1/leases/{id}` (admin): the lease's view; panics unless 200.
    pub async fn lease(&self, id: &str) -> Value {
        let (status, body) = self.admin_get(&format!("/v1/leases/{id}")).await;
        assert_eq!(status, 200, "replica {}: GET /v1/leases/{id}: {body}", self.id);
        body
    }

    /// `GET /.well-known/jwks.json`.
    pub async fn jwks(&self) -> Value {
        let resp = self.http.get(self.endpoint("/.well-known/jwks.json")).send().await.expect("GET jwks");
        let (status, body) = status_json(resp).await;
        assert_eq!(status, 200, "replica {}: jwks: {body}", self.id);
        body
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// POST `body` as JSON with a bearer token; returns (status, JSON body or the text as a string).
pub async fn post_json(http: &reqwest::Client, url: &str, bearer: &str, body: &Value) -> (u16, Value) {
    let resp = http.post(url).bearer_auth(bearer).json(body).send().await.unwrap_or_else(|e| panic!("POST {url}: {e}"));
    status_json(resp).await
}

pub async fn status_json(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}
