//! The broker under test: a config directory as an operator would write it, and the real
//! release binary started on it (`ephemera serve --config …`, not `--dev`).
//!
//! The config: one GitHub issuer on a loopback url with static keys (`jwks_file`: nothing is
//! fetched), replay protection on, a `jwt` backend, one policy shaped like a production deploy
//! policy, the journal in a temporary data directory (real fsyncs), the audit file, the GitHub
//! webhook and an admin token (only its SHA-256 in the config).

use crate::http::{Conn, request};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ISSUER_URL: &str = "http://127.0.0.1:9";
pub const AUDIENCE: &str = "https://ephemera.bench.invalid";
pub const POLICY: &str = "bench";
/// The same policy, its leases renewable (issue 15): the renewal rows exchange under it.
pub const RENEW_POLICY: &str = "bench-renew";
pub const ADMIN_TOKEN: &str = "bench-admin-token-0123456789abcdef";
pub const WEBHOOK_SECRET: &str = "bench-webhook-secret-0123456789";

pub const POLICY_YAML: &str = r#"# The shape of a production deploy policy (policies/deploy-web.yaml).
description: Bench - deploy octo-repo from main
issuer: github
match:
  repository_id: "74"
  repository_owner_id: "65"
  ref: refs/heads/main
  environment: [production, staging, prod]
  job_workflow_ref: {glob: "octo-org/octo-automation/.github/workflows/*.yml@refs/heads/main"}
deny:
  event_name: [pull_request, pull_request_target, workflow_run]
  runner_environment: self-hosted
ttl: {default: 15m, max: 1h}
grants:
  api:
    backend: jwt
    audience: https://deploy-api.internal.example
    claims:
      scope: "deploy:web"
      repository: "${repository}"
      environment: "${environment}"
"#;

/// What a config adds to the one above. The default is the operator's single broker: the jwt
/// backend's key generated under `data_dir`, the replica named by the host name, the file store.
#[derive(Default)]
pub struct Setup<'a> {
    /// `replica_id` (a top-level key): required with `store = "postgres"`, one per replica.
    pub replica_id: Option<&'a str>,
    /// The jwt backend's `signing_key_file`: required with `store = "postgres"`, the same file
    /// for every replica (a JWT minted by one must verify on all).
    pub signing_key_file: Option<&'a Path>,
    /// TOML tables appended at the end (`[ledger]`, …).
    pub extra: &'a str,
    /// More policies: (name, YAML).
    pub policies: &'a [(&'a str, String)],
    /// The `[limits]` table's body instead of [`OUT_OF_REACH`].
    pub limits: Option<&'a str>,
    /// The `[[issuers]]` block instead of the static-keys one (the soak's issuer serves and
    /// rotates its keys over HTTP).
    pub issuer: Option<&'a str>,
}

/// The bench's `[limits]`: one client address and one repository at saturation, so every limit
/// is checked on every request (its cost is in the numbers) but set above what the bench reaches.
pub const OUT_OF_REACH: &str = "address = { per_second = 10000000, burst = 10000000 }
issuer = { per_second = 10000000, burst = 10000000 }
repository = { per_second = 10000000, burst = 10000000 }
failures = { per_second = 10000000, burst = 10000000 }
";

impl<'a> Setup<'a> {
    pub fn extra(extra: &'a str) -> Setup<'a> {
        Setup { extra, ..Setup::default() }
    }
}

/// Writes the config directory; returns the config file's path.
pub fn write_setup(dir: &Path, setup: &Setup) -> PathBuf {
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(dir.join("policies").join(format!("{POLICY}.yaml")), POLICY_YAML).unwrap();
    let renewable = format!("{POLICY_YAML}renew: {{max_lease: 2h}}\n");
    std::fs::write(dir.join("policies").join(format!("{RENEW_POLICY}.yaml")), renewable).unwrap();
    for (name, yaml) in setup.policies {
        std::fs::write(dir.join("policies").join(format!("{name}.yaml")), yaml).unwrap();
    }
    std::fs::write(dir.join("issuer-jwks.json"), crate::tokens::jwks().to_string()).unwrap();
    std::fs::write(dir.join("github-secret"), format!("{WEBHOOK_SECRET}\n")).unwrap();
    let admin_sha256 = ephemera::secret::sha256_hex(ADMIN_TOKEN.as_bytes());
    let replica_id = setup.replica_id.map(|id| format!("replica_id = \"{id}\"\n")).unwrap_or_default();
    let signing_key =
        setup.signing_key_file.map(|f| format!("signing_key_file = \"{}\"\n", f.display())).unwrap_or_default();
    let extra = setup.extra;
    let limits = setup.limits.unwrap_or(OUT_OF_REACH);
    let static_issuer = format!(
        "[[issuers]]\nname = \"github\"\nplatform = \"github-actions\"\nurl = \"{ISSUER_URL}\"\naudiences = [\"{AUDIENCE}\"]\n\
         algorithms = [\"RS256\"]\nmax_token_lifetime = \"1h\"\njwks_file = \"issuer-jwks.json\"\nreplay_protection = true\n"
    );
    let issuer = setup.issuer.unwrap_or(&static_issuer);
    let toml = format!(
        r#"listen = "127.0.0.1:0"
public_url = "{AUDIENCE}"
policies = "policies"
data_dir = "data"
{replica_id}
{issuer}
[backends.jwt]
type = "jwt"
max_ttl = "1h"
{signing_key}
[hooks]
github_secret_file = "github-secret"

[admin]
token_sha256 = "{admin_sha256}"

[limits]
{limits}
[audit]
file = "audit.jsonl"
{extra}"#
    );
    let path = dir.join("bench.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

/// A running `ephemera serve`, killed on drop.
pub struct Broker {
    child: Child,
    pub pid: u32,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl Broker {
    /// Starts `binary serve --config <dir>/bench.toml` with JSON logs (default `info`) going to
    /// `<dir>/broker.log`, and waits until `/readyz` answers 200.
    pub async fn start(binary: &Path, dir: &Path) -> Broker {
        Broker::start_with(binary, dir, &Setup::default()).await
    }

    /// [`Broker::start`] with the config's additions.
    pub async fn start_with(binary: &Path, dir: &Path, setup: &Setup<'_>) -> Broker {
        let config = write_setup(dir, setup);
        let log = dir.join("broker.log");
        let mut child = Command::new(binary)
            .args(["serve", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let pid = child.id();
        let stdout = child.stdout.take().unwrap();
        let addr = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|line| line.split("listening on http://").nth(1).and_then(|a| a.trim().parse().ok()));
        let Some(addr) = addr else {
            let _ = child.kill();
            panic!("the broker did not start; its log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        };
        let broker = Broker { child, pid, addr, log };
        broker.wait_ready().await;
        broker
    }

    async fn wait_ready(&self) {
        let started = Instant::now();
        let ready = request("GET", "/readyz", &[], "", b"");
        while started.elapsed() < Duration::from_secs(30) {
            if let Ok(mut conn) = Conn::open(self.addr).await
                && conn.send(&ready).await.is_ok_and(|r| r.status == 200)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the broker did not become ready; its log: {}", self.log.display());
    }

    /// The broker process's CPU time so far, by thread (see [`crate::procfs::Cpu`]).
    pub fn cpu(&self) -> crate::procfs::Cpu {
        crate::procfs::cpu(&self.pid.to_string())
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
