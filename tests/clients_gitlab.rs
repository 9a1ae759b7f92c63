//! The GitLab CI template (`actions/gitlab/ephemera.gitlab-ci.yml`) and the example deployment
//! script (`scripts/deploy-example.sh`), run with `sh` and `curl` against the real broker binary
//! in `serve --dev`.
//!
//! The template's `before_script` and `after_script` are taken from the YAML itself, so a change
//! to the template's shape (job name, `id_tokens`, script keys) breaks these tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::dev_broker::{DevBroker, client, introspect};
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;
use tempfile::TempDir;

/// One run of a script (its curl calls retry at most a few seconds on a dead broker).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(90);

/// A policy the default GitLab dev token (project 200001) satisfies.
const GITLAB_DEV_POLICY: &str = "issuer: gitlab
match: {project_id: \"200001\"}
ttl: {default: 15m, max: 1h}
grants: {api: {backend: jwt, audience: https://api.example}}
";

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A ready dev broker whose policies directory holds only `gitlab-dev` (it runs in a directory of
/// its own, where `./policies` is looked up), plus the directories to keep alive.
async fn gitlab_broker(client: &reqwest::Client) -> (DevBroker, TempDir, TempDir) {
    let data = tempfile::tempdir().expect("data dir");
    let cwd = tempfile::tempdir().expect("broker cwd");
    std::fs::create_dir(cwd.path().join("policies")).unwrap();
    std::fs::write(cwd.path().join("policies/gitlab-dev.yaml"), GITLAB_DEV_POLICY).unwrap();
    let mut broker = DevBroker::start_in(data.path(), cwd.path());
    broker.wait_ready(client).await;
    (broker, data, cwd)
}

/// A fresh token from the dev broker's stand-in GitLab issuer.
async fn gitlab_token(client: &reqwest::Client, broker: &DevBroker) -> String {
    let resp = client
        .post(broker.endpoint("/dev/token"))
        .header("content-type", "application/json")
        .body(r#"{"issuer":"gitlab"}"#)
        .send()
        .await
        .expect("POST /dev/token");
    assert_eq!(resp.status(), 200);
    let token = resp.text().await.unwrap().trim().to_string();
    assert_eq!(token.split('.').count(), 3, "a compact JWS: {token}");
    token
}

async fn introspect_active(client: &reqwest::Client, broker: &DevBroker, jwt: &str) -> bool {
    let body = introspect(client, broker, jwt).await;
    body["active"].as_bool().unwrap_or_else(|| panic!("no `active` in {body}"))
}

/// The template's hidden job, checked for the shape users rely on: `.ephemera` with an ID token
/// whose audience is the broker URL, and a `before_script` and `after_script` of strings.
/// Returns the two scripts, each as one `sh` text (the lines joined as GitLab runs them).
fn template_scripts() -> (String, String) {
    let path = repo_path("actions/gitlab/ephemera.gitlab-ci.yml");
    let text = std::fs::read_to_string(&path).unwrap();
    let doc: Value = serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let job = doc.get(".ephemera").unwrap_or_else(|| panic!("no hidden job `.ephemera` in the template: {doc}"));
    assert_eq!(
        job["id_tokens"]["EPHEMERA_ID_TOKEN"]["aud"], "$EPHEMERA_BROKER_URL",
        "the ID token's audience must be the broker URL: {job}"
    );
    let lines = |key: &str| -> String {
        let list = job[key].as_array().unwrap_or_else(|| panic!("`.ephemera.{key}` is not a list: {job}"));
        assert!(!list.is_empty(), "`.ephemera.{key}` is empty");
        list.iter()
            .map(|l| l.as_str().unwrap_or_else(|| panic!("`.ephemera.{key}` holds a non-string: {l}")))
            .collect::<Vec<_>>()
            .join("\n")
    };
    (lines("before_script"), lines("after_script"))
}

/// Runs `script` with `sh -c` in `dir` with only PATH and `env` in its environment (no proxy
/// settings, nothing from the runner), bounded by [`SCRIPT_TIMEOUT`].
async fn run_sh(script: &str, dir: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(SCRIPT_TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("the script ran longer than {SCRIPT_TIMEOUT:?}:\n{script}"))
        .expect("run sh")
}

fn text(out: &Output) -> String {
    format!("stdout:\n{}\nstderr:\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The single-quoted value of `export NAME='…'` in an env reply.
fn env_value(env: &str, name: &str) -> String {
    let prefix = format!("export {name}='");
    let line = env.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no {name} in the env file"));
    line[prefix.len()..].strip_suffix('\'').expect("a single-quoted value").to_string()
}

fn assert_no_secret(out: &Output, secret: &str) {
    let all = text(out);
    for piece in secret.split('.').filter(|p| p.len() > 16) {
        assert!(!all.contains(piece), "a secret fragment reached the output: {}…", &piece[..16]);
    }
}

#[tokio::test]
async fn template_exchanges_in_before_script_and_revokes_in_after_script() {
    let client = client();
    let (broker, _data, _cwd) = gitlab_broker(&client).await;
    let (before, after) = template_scripts();
    let project = tempfile::tempdir().unwrap();
    let project_dir = project.path().to_str().unwrap();
    let token = gitlab_token(&client, &broker).await;
    let env = [
        ("EPHEMERA_BROKER_URL", broker.url()),
        ("EPHEMERA_POLICY", "gitlab-dev"),
        ("EPHEMERA_TTL", "10m"),
        ("EPHEMERA_ID_TOKEN", token.as_str()),
        ("CI_PROJECT_DIR", project_dir),
    ];

    // before_script, then the job's `script` in the same shell (as GitLab runs them): the
    // credentials are exported to the commands it runs.
    let job = format!(
        "set -e\n{before}\nsh -c 'test -n \"$EPHEMERA_API_TOKEN\" && test \"$EPHEMERA_API_KIND\" = jwt'\n\
         echo \"script sees lease $EPHEMERA_LEASE_ID\""
    );
    let out = run_sh(&job, project.path(), &env).await;
    assert!(out.status.success(), "before_script failed:\n{}", text(&out));

    let env_file = project.path().join(".ephemera.env");
    let mode = std::fs::metadata(&env_file).expect("the env file exists").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the env file's mode is {:o}", mode & 0o777);
    let reply = std::fs::read_to_string(&env_file).unwrap();
    let lease = env_value(&reply, "EPHEMERA_LEASE_ID");
    let jwt = env_value(&reply, "EPHEMERA_API_TOKEN");
    assert!(lease.starts_with("lse_"), "{lease}");
    assert_eq!(env_value(&reply, "EPHEMERA_POLICY"), "gitlab-dev");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&format!("ephemera: lease {lease}")), "the lease id is printed:\n{}", text(&out));
    assert!(stdout.contains(&format!("script sees lease {lease}")), "{}", text(&out));
    assert_no_secret(&out, &jwt);
    assert!(introspect_active(&client, &broker, &jwt).await, "the lease is live after before_script");

    // The same token again is a replay: refused, and the failure leaves the live lease's file
    // alone, so after_script can still revoke it.
    let out = run_sh(&format!("set -e\n{before}"), project.path(), &env).await;
    assert!(!out.status.success(), "a replayed exchange must fail:\n{}", text(&out));
    assert!(text(&out).contains("policy_denied"), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(&env_file).unwrap(), reply, "a failed exchange clobbered the env file");
    assert!(!project.path().join(".ephemera.env.tmp").exists(), "the failed reply is removed");

    // after_script: a new shell with the job's variables (the same ID token, its jti already used).
    let out = run_sh(&after, project.path(), &env).await;
    assert!(out.status.success(), "after_script failed:\n{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("ephemera: lease {lease} revoked")),
        "{}",
        text(&out)
    );
    assert_no_secret(&out, &jwt);
    assert!(!introspect_active(&client, &broker, &jwt).await, "the lease is revoked after after_script");
    assert!(!env_file.exists(), "after_script removes the env file");

    // A second after_script (a retried job step) finds nothing to do and does not fail.
    let out = run_sh(&after, project.path(), &env).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to revoke"), "{}", text(&out));
}

#[tokio::test]
async fn template_fails_the_job_on_a_denial_and_names_the_code() {
    let client = client();
    let (broker, _data, _cwd) = gitlab_broker(&client).await;
    let (before, after) = template_scripts();
    let project = tempfile::tempdir().unwrap();
    let token = gitlab_token(&client, &broker).await;
    let env = [
        ("EPHEMERA_BROKER_URL", broker.url()),
        ("EPHEMERA_POLICY", "nope"),
        ("EPHEMERA_ID_TOKEN", token.as_str()),
        ("CI_PROJECT_DIR", project.path().to_str().unwrap()),
    ];
    let out = run_sh(&format!("set -e\n{before}\necho SCRIPT-RAN"), project.path(), &env).await;
    assert!(!out.status.success(), "a denied exchange must fail the job:\n{}", text(&out));
    let all = text(&out);
    assert!(all.contains("policy_denied"), "the output names the error code:\n{all}");
    assert!(all.contains("HTTP 403"), "{all}");
    assert!(!all.contains("SCRIPT-RAN"), "the job's script must not run:\n{all}");
    assert!(!project.path().join(".ephemera.env").exists(), "no env file is left behind");

    // after_script still runs in GitLab after a failed before_script: it must cope.
    let out = run_sh(&after, project.path(), &env).await;
    assert!(out.status.success(), "{}", text(&out));

    // An unverifiable token (401) fails the same way.
    let env = [
        ("EPHEMERA_BROKER_URL", broker.url()),
        ("EPHEMERA_POLICY", "gitlab-dev"),
        ("EPHEMERA_ID_TOKEN", "not.a.token"),
        ("CI_PROJECT_DIR", project.path().to_str().unwrap()),
    ];
    let out = run_sh(&format!("set -e\n{before}"), project.path(), &env).await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("invalid_token"), "{}", text(&out));
}

#[tokio::test]
async fn template_refuses_plain_http_to_a_remote_broker_without_sending_the_token() {
    let (before, _) = template_scripts();
    let project = tempfile::tempdir().unwrap();
    let env = [
        ("EPHEMERA_BROKER_URL", "http://ephemera.example.com"),
        ("EPHEMERA_POLICY", "gitlab-dev"),
        ("EPHEMERA_ID_TOKEN", "x.y.z"),
        ("CI_PROJECT_DIR", project.path().to_str().unwrap()),
    ];
    let out = run_sh(&format!("set -e\n{before}"), project.path(), &env).await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("must be an https:// URL"), "{}", text(&out));
}

#[tokio::test]
async fn template_reports_a_broker_that_is_down() {
    let (before, _) = template_scripts();
    let project = tempfile::tempdir().unwrap();
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let env = [
        ("EPHEMERA_BROKER_URL", url.as_str()),
        ("EPHEMERA_POLICY", "gitlab-dev"),
        ("EPHEMERA_ID_TOKEN", "x.y.z"),
        ("CI_PROJECT_DIR", project.path().to_str().unwrap()),
    ];
    let out = run_sh(&format!("set -e\n{before}"), project.path(), &env).await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("could not be reached"), "{}", text(&out));
    assert!(!project.path().join(".ephemera.env").exists());
}

// ---- scripts/deploy-example.sh ------------------------------------------------------------

/// Runs the deploy script with `deploy` (an `sh -c` text) as its deploy command.
async fn run_deploy(dir: &Path, env: &[(&str, &str)], deploy: &str) -> Output {
    let script = repo_path("scripts/deploy-example.sh");
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg(&script)
        .args(["sh", "-c", deploy])
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TMPDIR", dir)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(SCRIPT_TIMEOUT, cmd.output()).await.expect("the deploy script timed out").expect("run sh")
}

#[tokio::test]
async fn deploy_script_revokes_when_the_deploy_fails_and_keeps_its_status() {
    let client = client();
    let (broker, _data, _cwd) = gitlab_broker(&client).await;
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen-token");
    let token = gitlab_token(&client, &broker).await;
    let env = [
        ("EPHEMERA_BROKER_URL", broker.url()),
        ("EPHEMERA_POLICY", "gitlab-dev"),
        ("EPHEMERA_ID_TOKEN", token.as_str()),
        ("SEEN", seen.to_str().unwrap()),
    ];
    // The deploy sees the credentials (and keeps a copy for the test), not the ID token, then fails.
    let deploy = "test -n \"$EPHEMERA_API_TOKEN\" && test -z \"${EPHEMERA_ID_TOKEN:-}\" && \
                  printf %s \"$EPHEMERA_API_TOKEN\" > \"$SEEN\" && exit 7";
    let out = run_deploy(dir.path(), &env, deploy).await;
    assert_eq!(out.status.code(), Some(7), "the deploy's status is the script's:\n{}", text(&out));
    let jwt = std::fs::read_to_string(&seen).expect("the deploy ran with the credentials");
    assert_no_secret(&out, &jwt);
    assert!(text(&out).contains("revoked"), "{}", text(&out));
    assert!(!introspect_active(&client, &broker, &jwt).await, "the trap revoked the lease on failure");
    // Nothing left in the private temporary directory's parent but the test's own file.
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("seen-token")], "temporary files left: {left:?}");
}

#[tokio::test]
async fn deploy_script_runs_the_deploy_with_a_live_lease_and_revokes_after_success() {
    let client = client();
    let (broker, _data, _cwd) = gitlab_broker(&client).await;
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen-token");
    // The token from a file this time.
    let token_file = dir.path().join("id-token");
    std::fs::write(&token_file, gitlab_token(&client, &broker).await).unwrap();
    let env = [
        ("EPHEMERA_BROKER_URL", broker.url()),
        ("EPHEMERA_POLICY", "gitlab-dev"),
        ("EPHEMERA_ID_TOKEN_FILE", token_file.to_str().unwrap()),
        ("SEEN", seen.to_str().unwrap()),
    ];
    // During the deploy, the broker reports the credential live.
    let deploy = "printf %s \"$EPHEMERA_API_TOKEN\" > \"$SEEN\" && \
                  curl -sS --fail --data-urlencode \"token=$EPHEMERA_API_TOKEN\" \"$EPHEMERA_BROKER_URL/v1/introspect\" \
                  | grep -q '\"active\":true'";
    let out = run_deploy(dir.path(), &env, deploy).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let jwt = std::fs::read_to_string(&seen).expect("the deploy ran with the credentials");
    assert_no_secret(&out, &jwt);
    assert!(!introspect_active(&client, &broker, &jwt).await, "the trap revoked the lease after success");
}

#[tokio::test]
async fn deploy_script_fails_before_the_deploy_on_a_denial() {
    let client = client();
    let (broker, _data, _cwd) = gitlab_broker(&client).await;
    let dir = tempfile::tempdir().unwrap();
    let token = gitlab_token(&client, &broker).await;
    let env =
        [("EPHEMERA_BROKER_URL", broker.url()), ("EPHEMERA_POLICY", "nope"), ("EPHEMERA_ID_TOKEN", token.as_str())];
    let out = run_deploy(dir.path(), &env, "echo DEPLOY-RAN").await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("policy_denied"), "{}", text(&out));
    assert!(!text(&out).contains("DEPLOY-RAN"), "{}", text(&out));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "temporary files left behind");
}

#[tokio::test]
async fn deploy_script_revokes_when_the_job_is_cancelled() {
    let client = client();
    let (broker, _data, _cwd) = gitlab_broker(&client).await;
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen-token");
    let token = gitlab_token(&client, &broker).await;
    // A cancelled job: the runner sends SIGTERM to the whole process group mid-deploy.
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg(repo_path("scripts/deploy-example.sh"))
        .args([
            "sh",
            "-c",
            "printf %s \"$EPHEMERA_API_TOKEN\" > \"$SEEN.part\" && mv \"$SEEN.part\" \"$SEEN\"; sleep 60",
        ])
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TMPDIR", dir.path())
        .env("EPHEMERA_BROKER_URL", broker.url())
        .env("EPHEMERA_POLICY", "gitlab-dev")
        .env("EPHEMERA_ID_TOKEN", &token)
        .env("SEEN", &seen)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().expect("spawn the deploy script");
    let pgid = child.id().expect("a running child");
    for _ in 0..200 {
        if seen.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let jwt = std::fs::read_to_string(&seen).expect("the deploy started with the credentials");
    assert!(introspect_active(&client, &broker, &jwt).await, "the lease is live during the deploy");
    let status = std::process::Command::new("kill").args(["-TERM", "--", &format!("-{pgid}")]).status().unwrap();
    assert!(status.success(), "kill -TERM -{pgid}");
    let out = tokio::time::timeout(SCRIPT_TIMEOUT, child.wait_with_output()).await.expect("exited").unwrap();
    assert_eq!(out.status.code(), Some(143), "128 + SIGTERM:\n{}", text(&out));
    assert_no_secret(&out, &jwt);
    assert!(!introspect_active(&client, &broker, &jwt).await, "the trap revoked the lease on SIGTERM");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("seen-token")], "temporary files left: {left:?}");
}
