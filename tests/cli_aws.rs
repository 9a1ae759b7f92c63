//! The real AWS CLI (v1, installed into `.venv` by scripts/test) with a profile whose
//! `credential_process` is `ephemera exchange … --format credential-process`, against a dev broker
//! whose `aws` backend talks to moto.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::dev_broker::{client, dev_token};
use common::moto::Moto;
use serde_json::Value;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const PROXY_VARS: [&str; 8] =
    ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"];
const AWS_VARS: [&str; 6] = [
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
];

/// `serve --dev --config <file>` on a free loopback port, killed on drop.
struct ConfiguredDevBroker {
    child: Child,
    url: String,
    stderr_path: PathBuf,
}

impl ConfiguredDevBroker {
    fn start(config: &Path, data_dir: &Path, logs: &Path) -> ConfiguredDevBroker {
        let stderr_path = logs.join("broker.stderr");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ephemera"));
        cmd.args(["serve", "--dev", "--listen", "127.0.0.1:0", "--config"])
            .arg(config)
            .arg("--data-dir")
            .arg(data_dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr_path).unwrap());
        for var in PROXY_VARS.iter().chain(&AWS_VARS) {
            cmd.env_remove(var);
        }
        let mut child = cmd.spawn().expect("spawn the broker");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).unwrap();
        // Keep draining: the banner goes on, and a closed pipe would kill the broker mid-println.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        let mut broker = ConfiguredDevBroker { child, url: String::new(), stderr_path };
        let url = first
            .trim()
            .strip_prefix("ephemera listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}; stderr:\n{}", broker.stderr()));
        broker.url = url.to_string();
        broker
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    async fn wait_ready(&mut self, http: &reqwest::Client) {
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the broker exited with {status}; stderr:\n{}", self.stderr());
            }
            if let Ok(resp) = http.get(format!("{}/readyz", self.url)).send().await
                && resp.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the broker was not ready in time; stderr:\n{}", self.stderr());
    }
}

impl Drop for ConfiguredDevBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `<crate>/.venv/bin/aws`, next to the moto_server scripts/test installs.
fn aws_cli() -> PathBuf {
    let from_moto =
        std::env::var_os("EPHEMERA_MOTO_SERVER").map(PathBuf::from).and_then(|p| Some(p.parent()?.join("aws")));
    let in_venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/aws");
    from_moto.into_iter().chain([in_venv.clone()]).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "the AWS CLI is not installed: run scripts/test (it installs awscli into .venv); looked at {}",
            in_venv.display()
        )
    })
}

#[tokio::test]
async fn aws_cli_uses_ephemera_as_its_credential_process() {
    let role = "cli-deploy";
    let AwsDevBroker { moto, dir, data, http, broker } = AwsDevBroker::start(
        role,
        "aws-deploy",
        "description: The default dev token gets an AWS session\nttl: {default: 15m, max: 1h}\n",
    )
    .await;

    let aws_config = dir.path().join("aws-config");
    std::fs::write(
        &aws_config,
        format!(
            "[profile ephemera]\nregion = us-east-1\ncredential_process = \"{}\" exchange --broker {} --policy aws-deploy \
             --token-env EPHEMERA_ID_TOKEN --format credential-process\n",
            env!("CARGO_BIN_EXE_ephemera"),
            broker.url
        ),
    )
    .unwrap();

    let token = dev_token(&http, &broker.url).await;
    let out = aws_whoami(&aws_config, "ephemera", &moto.endpoint, Some(&token));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "aws sts get-caller-identity failed ({}):\n{stderr}\nbroker stderr:\n{}",
        out.status,
        broker.stderr()
    );
    assert!(!stderr.contains(&token), "the ID token leaked: {stderr}");
    let identity: Value = serde_json::from_slice(&out.stdout).expect("get-caller-identity prints JSON");
    let arn = identity["Arn"].as_str().unwrap_or_else(|| panic!("no Arn: {identity}"));
    assert!(arn.contains(&format!("assumed-role/{role}/")), "{arn}");

    // The session is one lease at the broker: the credential process exchanged exactly once.
    let leases = admin_get(&http, &broker, &data, "/v1/leases").await;
    let list = leases["leases"].as_array().unwrap_or_else(|| panic!("{leases}"));
    assert_eq!(list.len(), 1, "{leases}");
    assert_eq!(list[0]["policy"], "aws-deploy", "{leases}");
    assert_eq!(list[0]["state"], "active", "{leases}");
    assert_eq!(list[0]["credentials"][0]["kind"], "aws", "{leases}");
}

/// Runs `aws sts get-caller-identity` with `profile` of `aws_config` (and `token` in
/// `EPHEMERA_ID_TOKEN`, for a profile that exchanges one).
fn aws_whoami(aws_config: &Path, profile: &str, endpoint: &str, token: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(aws_cli());
    cmd.args(["sts", "get-caller-identity", "--profile", profile, "--output", "json", "--endpoint-url", endpoint])
        .env("AWS_CONFIG_FILE", aws_config)
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdin(Stdio::null());
    for var in PROXY_VARS.iter().chain(&AWS_VARS) {
        cmd.env_remove(var);
    }
    if let Some(token) = token {
        cmd.env("EPHEMERA_ID_TOKEN", token);
    }
    cmd.output().expect("run the AWS CLI")
}

/// An admin GET on the dev broker, with the admin token it keeps in its data directory.
async fn admin_get(
    http: &reqwest::Client,
    broker: &ConfiguredDevBroker,
    data: &tempfile::TempDir,
    path: &str,
) -> Value {
    let admin = std::fs::read_to_string(data.path().join(ephemera::server::DEV_ADMIN_TOKEN_FILE)).unwrap();
    let resp = http.get(format!("{}{path}", broker.url)).bearer_auth(admin.trim()).send().await.unwrap();
    resp.json().await.unwrap()
}

/// moto with one role, and a dev broker whose `aws` backend talks to it, serving one policy
/// `name` for the default dev token: `head` (ttl, renew, …) and a grant of that role.
struct AwsDevBroker {
    moto: Moto,
    /// The config, policies and moto credentials (and whatever the test writes beside them).
    dir: tempfile::TempDir,
    data: tempfile::TempDir,
    http: reqwest::Client,
    broker: ConfiguredDevBroker,
}

impl AwsDevBroker {
    async fn start(role: &str, name: &str, head: &str) -> AwsDevBroker {
        let moto = Moto::start();
        let role_arn = moto.create_role(role);
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("aws-credentials");
        std::fs::write(&creds, "[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n").unwrap();
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        std::fs::write(
            dir.path().join(format!("policies/{name}.yaml")),
            format!(
                "{head}issuer: github\nmatch:\n  repository_id: \"100001\"\n\
                 grants:\n  aws:\n    backend: aws\n    role_arn: {role_arn}\n"
            ),
        )
        .unwrap();
        let config = dir.path().join("ephemera.toml");
        std::fs::write(
            &config,
            format!(
                "policies = \"policies\"\n\n[backends.aws]\ntype = \"aws\"\nregion = \"us-east-1\"\n\
                 endpoint_url = \"{}\"\ncredentials_file = {:?}\n",
                moto.endpoint,
                creds.display().to_string()
            ),
        )
        .unwrap();
        let data = tempfile::tempdir().unwrap();
        let http = client();
        let mut broker = ConfiguredDevBroker::start(&config, data.path(), dir.path());
        broker.wait_ready(&http).await;
        AwsDevBroker { moto, dir, data, http, broker }
    }
}

#[tokio::test]
async fn aws_cli_renews_its_session_through_the_lease_file_until_the_job_revokes_the_lease() {
    let role = "cli-renew";
    let AwsDevBroker { moto, dir, data, http, broker } =
        AwsDevBroker::start(role, "aws-renew", "ttl: {default: 15m, max: 15m}\nrenew: {max_lease: 1h}\n").await;

    // The job's main step: one exchange, the lease file, and a profile that renews from it.
    let token = dev_token(&http, &broker.url).await;
    let lease_file = dir.path().join("lease.json");
    let ephemera = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_ephemera"))
            .args(args)
            .env("EPHEMERA_ID_TOKEN", &token)
            .envs(PROXY_VARS.iter().map(|v| (*v, "")))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "ephemera {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let exchanged = ephemera(&[
        "exchange",
        "--broker",
        &broker.url,
        "--policy",
        "aws-renew",
        "--lease-file",
        lease_file.to_str().unwrap(),
    ]);
    let lease_id = exchanged["lease_id"].as_str().unwrap().to_string();
    let aws_config = dir.path().join("aws-config");
    std::fs::write(
        &aws_config,
        format!(
            "[profile job]\nregion = us-east-1\ncredential_process = \"{}\" credential-process --lease-file \"{}\"\n",
            env!("CARGO_BIN_EXE_ephemera"),
            lease_file.display()
        ),
    )
    .unwrap();

    // Every AWS CLI run asks the credential process, and so renews the lease: a fresh session
    // each time, all of them under the one lease.
    for _ in 0..3 {
        let out = aws_whoami(&aws_config, "job", &moto.endpoint, None);
        assert!(out.status.success(), "{}\nbroker:\n{}", String::from_utf8_lossy(&out.stderr), broker.stderr());
        let identity: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(identity["Arn"].as_str().unwrap().contains(&format!("assumed-role/{role}/")), "{identity}");
    }
    let lease = admin_get(&http, &broker, &data, &format!("/v1/leases/{lease_id}")).await;
    // At least one renewal per run (the AWS CLI v1 may ask its credential process more than once
    // per run: it asked twice in every run seen here).
    assert!(lease["renewal"]["count"].as_u64().is_some_and(|n| n >= 3), "{lease}");
    assert_eq!(lease["renewal"]["until"], lease["expires_at"], "{lease}");
    assert!(lease["renewal"].get("token_sha256").is_none(), "{lease}");
    // Sessions of one lease revoke alike (one deny on its SourceIdentity): the ledger keeps
    // each distinct revoke handle once, so two renewals within one second share an entry.
    let kept = lease["credentials"].as_array().map_or(0, Vec::len) as u64;
    assert!(kept >= 2 && kept <= 1 + lease["renewal"]["count"].as_u64().unwrap(), "{lease}");

    // The post step ends the lease: one deny covers every session, and the next run fails.
    ephemera(&["revoke", "--broker", &broker.url, "--lease", &lease_id]);
    let doc = moto.get_role_policy(role, "ephemera-revoked").expect("a deny policy on the role");
    assert!(doc.to_string().contains(&lease_id), "{doc}");
    let after = aws_whoami(&aws_config, "job", &moto.endpoint, None);
    assert!(!after.status.success(), "the AWS CLI still got credentials after the lease ended");
    let stderr = String::from_utf8_lossy(&after.stderr);
    assert!(stderr.contains("lease_not_renewable"), "{stderr}");
    let renew_token = exchanged["renew"]["token"].as_str().unwrap();
    assert!(!stderr.contains(renew_token) && !broker.stderr().contains(renew_token), "the renew token leaked");
}
