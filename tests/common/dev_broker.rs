//! The real `ephemera` binary in `serve --dev`, spawned as a child process on a free loopback
//! port with its own data directory ([`DevBroker`]), and the request helpers the end-to-end tests
//! share.
// Compiled into every test binary that has `mod common;`; a failed expectation is a failed test.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::{Value, json};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use tempfile::TempDir;

/// How long to wait for one line of the broker's stdout.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(20);
/// Readiness polling: at most this many tries, this far apart.
const READY_TRIES: u32 = 200;
const READY_INTERVAL: Duration = Duration::from_millis(50);
/// Waiting for the process to exit: at most this many tries, this far apart (20 s).
const EXIT_TRIES: u32 = 400;
const EXIT_INTERVAL: Duration = Duration::from_millis(50);
/// The default timeout of one HTTP request made by [`client`].
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);

/// The job key the default dev token maps to.
pub const DEV_JOB: &str = "github:100001:1:1:1";

/// A running (or exited) `ephemera serve --dev`, killed on drop.
pub struct DevBroker {
    child: Child,
    /// `http://127.0.0.1:PORT`, empty until the `listening` line is read ([`DevBroker::start`]).
    url: String,
    data_dir: PathBuf,
    stderr_path: PathBuf,
    /// Lines of the broker's stdout, read on a background thread.
    stdout: mpsc::Receiver<String>,
    /// Stdout lines read so far (after [`DevBroker::start`], the first is the `listening` line).
    seen: Vec<String>,
    _logs: TempDir,
}

impl DevBroker {
    /// Spawns a dev broker with `data_dir`, in the crate's directory, without waiting for anything.
    pub fn spawn(data_dir: &Path) -> DevBroker {
        DevBroker::spawn_in(data_dir, Path::new(env!("CARGO_MANIFEST_DIR")))
    }

    /// Spawns in working directory `cwd` (where `./policies` is looked up), without waiting.
    pub fn spawn_in(data_dir: &Path, cwd: &Path) -> DevBroker {
        let logs = tempfile::tempdir().expect("a temp dir for the broker's stderr");
        let stderr_path = logs.path().join("stderr.log");
        let stderr = File::create(&stderr_path).expect("create the stderr file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_ephemera"))
            .args(["serve", "--dev", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .current_dir(cwd)
            // Proxies that lead nowhere: the broker must never route issuer fetches through the
            // environment's proxy settings, or its dev issuers' keys would never load.
            .env("HTTP_PROXY", "http://127.0.0.1:9")
            .env("http_proxy", "http://127.0.0.1:9")
            .env("HTTPS_PROXY", "http://127.0.0.1:9")
            .env("ALL_PROXY", "http://127.0.0.1:9")
            .env("all_proxy", "http://127.0.0.1:9")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("spawn the ephemera binary");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Built before anything can panic, so Drop kills the child on every path.
        DevBroker {
            child,
            url: String::new(),
            data_dir: data_dir.to_path_buf(),
            stderr_path,
            stdout: rx,
            seen: Vec::new(),
            _logs: logs,
        }
    }

    /// Starts a dev broker with `data_dir` and waits for its `listening` line (not for
    /// readiness: see [`DevBroker::wait_ready`]).
    pub fn start(data_dir: &Path) -> DevBroker {
        DevBroker::start_in(data_dir, Path::new(env!("CARGO_MANIFEST_DIR")))
    }

    /// Starts in working directory `cwd` (where `./policies` is looked up).
    pub fn start_in(data_dir: &Path, cwd: &Path) -> DevBroker {
        let mut broker = DevBroker::spawn_in(data_dir, cwd);
        let first = broker
            .next_line()
            .unwrap_or_else(|| panic!("the broker printed no first line; stderr:\n{}", broker.stderr()));
        let url = first
            .strip_prefix("ephemera listening on ")
            .unwrap_or_else(|| panic!("unexpected first stdout line: {first:?}"));
        assert!(url.starts_with("http://127.0.0.1:"), "dev mode must listen on loopback, got {url}");
        assert!(!url.ends_with(":0"), "the printed URL must carry the real port, got {url}");
        broker.url = url.to_string();
        broker
    }

    /// The next stdout line, or `None` at end of output or after [`LINE_TIMEOUT`].
    pub fn next_line(&mut self) -> Option<String> {
        let line = self.stdout.recv_timeout(LINE_TIMEOUT).ok()?;
        self.seen.push(line.clone());
        Some(line)
    }

    /// The stdout lines read so far.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// `http://127.0.0.1:PORT`, as the `listening` line printed it.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        self.url.strip_prefix("http://").expect("an http URL")
    }

    pub fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Everything the broker wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Polls `/readyz` until 200 (bounded), failing fast if the broker exits.
    pub async fn wait_ready(&mut self, client: &reqwest::Client) {
        let mut last = String::new();
        for _ in 0..READY_TRIES {
            if let Some(status) = self.try_wait() {
                panic!("the broker exited with {status} before it was ready; stderr:\n{}", self.stderr());
            }
            match client.get(self.endpoint("/readyz")).send().await {
                Ok(resp) if resp.status() == 200 => {
                    let body: Value = resp.json().await.expect("readyz JSON");
                    assert_eq!(body["ready"], true, "{body}");
                    assert_eq!(body["ledger"], "open", "{body}");
                    assert_eq!(
                        body["issuer_keys"],
                        json!({
                            "github": true, "gitlab": true, "buildkite": true, "circleci": true,
                            "azure-pipelines": true, "bitbucket": true, "jenkins": true, "agents": true,
                        }),
                        "{body}"
                    );
                    return;
                }
                Ok(resp) => last = format!("{} {}", resp.status(), resp.text().await.unwrap_or_default()),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(READY_INTERVAL).await;
        }
        panic!("the broker was not ready in time (last: {last}); stderr:\n{}", self.stderr());
    }

    /// SIGKILL (what `Child::kill` sends on Unix), then reaps the process, so its stderr is
    /// complete.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM through kill(1): no `libc` among the dependencies.
    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Sends a signal (`TERM`, `HUP`, ...) through kill(1).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill(1)");
        assert!(status.success(), "kill -{name} {} failed: {status}", self.child.id());
    }

    /// Waits (bounded) for the process to exit on its own.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        for _ in 0..EXIT_TRIES {
            if let Some(status) = self.try_wait() {
                return status;
            }
            tokio::time::sleep(EXIT_INTERVAL).await;
        }
        panic!("the broker did not exit within {:?}; stderr:\n{}", EXIT_INTERVAL * EXIT_TRIES, self.stderr());
    }
}

impl Drop for DevBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An HTTP client for a dev broker: no proxy, each request bounded by [`CLIENT_TIMEOUT`].
pub fn client() -> reqwest::Client {
    client_with_timeout(CLIENT_TIMEOUT)
}

/// An HTTP client for a dev broker: no proxy, each request bounded by `timeout`.
pub fn client_with_timeout(timeout: Duration) -> reqwest::Client {
    ephemera::install_crypto();
    reqwest::Client::builder().no_proxy().timeout(timeout).build().expect("reqwest client")
}

/// A fresh dev token from the broker at `url` (a fresh random `jti`: replay protection allows one
/// exchange per token).
pub async fn dev_token(client: &reqwest::Client, url: &str) -> String {
    let resp = client.post(format!("{url}/dev/token")).send().await.expect("POST /dev/token");
    assert_eq!(resp.status(), 200);
    let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    assert!(ct.starts_with("text/plain"), "dev token content-type: {ct}");
    let token = resp.text().await.expect("token text").trim().to_string();
    assert_eq!(token.split('.').count(), 3, "a dev token is a compact JWS: {token}");
    token
}

/// The job's revoke (`POST /v1/revoke` with an empty body) under `bearer`; must get a 200.
pub async fn revoke(client: &reqwest::Client, url: &str, bearer: &str) -> Value {
    let resp = client
        .post(format!("{url}/v1/revoke"))
        .bearer_auth(bearer)
        .json(&json!({}))
        .send()
        .await
        .expect("POST /v1/revoke");
    assert_eq!(resp.status(), 200);
    resp.json().await.expect("revoke reply is JSON")
}

/// POST /v1/introspect (no authentication in dev mode) for a broker JWT.
pub async fn introspect(client: &reqwest::Client, broker: &DevBroker, jwt: &str) -> serde_json::Value {
    introspect_at(client, broker.url(), jwt).await
}

/// As [`introspect`], for a broker known by its URL only.
pub async fn introspect_at(client: &reqwest::Client, url: &str, jwt: &str) -> serde_json::Value {
    let form = form_urlencoded::Serializer::new(String::new()).append_pair("token", jwt).finish();
    let resp = client
        .post(format!("{url}/v1/introspect"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .expect("POST /v1/introspect");
    assert_eq!(resp.status(), 200);
    resp.json().await.expect("introspect reply is JSON")
}
