//! The broker config: TOML → validated [`Config`]. Unknown keys are errors; every validation
//! error is reported at once; secrets live in files, never inline.
//!
//! This module holds the validated types and their entry points ([`Config::load`],
//! [`Config::parse`], [`Config::defaults`], [`HooksConfig::load_secrets`]); `file` holds the
//! file as written (the `deny_unknown_fields` TOML structs) and its validation into a [`Config`].

mod file;
mod ledger;
mod limits;

pub use ledger::{LedgerConfig, PostgresConfig, StoreConfig};
pub use limits::{LimitsConfig, Network, Rate};

use crate::claims::{JobKeyRule, Platform};
use crate::secret::SecretString;
use jsonwebtoken::Algorithm;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// `iss` of broker-signed JWTs and the default audience of CI tokens.
    pub public_url: String,
    pub policies_dir: PathBuf,
    pub data_dir: PathBuf,
    pub issuers: Vec<IssuerConfig>,
    pub backends: BTreeMap<String, BackendConfig>,
    /// `[ledger]`: where leases live.
    pub ledger: LedgerConfig,
    /// This process among the replicas on one store: in audit lines, and on the work it claims.
    pub replica_id: String,
    /// SHA-256 of the admin bearer token; admin endpoints are off without it.
    pub admin_token_sha256: Option<[u8; 32]>,
    /// Platform webhooks; each is off unless its secret is configured.
    pub hooks: HooksConfig,
    /// Poll the policies directory for changes this often (`None`: only SIGHUP reloads).
    pub reload_watch_secs: Option<i64>,
    /// `[renew] max_lease`: the longest any policy may let a renewable lease last.
    pub renew_max_lease_secs: i64,
    /// The audit sink; without it, exchanges are audited to nowhere (a warning at start).
    pub audit: Option<AuditConfig>,
    /// `[limits]`: abuse limits and the bounds on what the broker holds at once.
    pub limits: LimitsConfig,
}

/// `[audit]`: one JSON line per exchange, denial, revocation and reload.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub file: PathBuf,
    /// The claims copied into each event (an allowlist: a claim not named here never appears).
    pub claims: Vec<String>,
}

/// Claims an audit event carries by default: who and what ran, never anything secret-shaped.
pub const DEFAULT_AUDIT_CLAIMS: [&str; 22] = [
    "sub",
    "repository",
    "repository_id",
    "repository_owner_id",
    "ref",
    "sha",
    "environment",
    "event_name",
    "workflow_ref",
    "job_workflow_ref",
    "run_id",
    "run_attempt",
    "actor",
    "actor_id",
    "runner_environment",
    "project_path",
    "project_id",
    "namespace_id",
    "pipeline_id",
    "pipeline_source",
    "job_id",
    "user_id",
];

/// `[hooks]`: the platform webhooks that end a job's leases when the platform says it completed.
#[derive(Debug, Clone, Default)]
pub struct HooksConfig {
    /// `POST /v1/hooks/github`, authenticated by HMAC-SHA256 with this secret.
    pub github: Option<HookConfig>,
    /// `POST /v1/hooks/gitlab`, authenticated by this token in `X-Gitlab-Token`.
    pub gitlab: Option<HookConfig>,
    /// `POST /v1/hooks/buildkite`, authenticated by this token in `X-Buildkite-Token`, or, when
    /// `buildkite_signed`, by `X-Buildkite-Signature` (HMAC-SHA256 with this secret).
    pub buildkite: Option<HookConfig>,
    /// The Buildkite webhook's secret signs (`buildkite_signing_secret_file`) instead of being
    /// sent as a token (`buildkite_token_file`).
    pub buildkite_signed: bool,
}

/// One enabled webhook.
#[derive(Debug, Clone)]
pub struct HookConfig {
    /// Read from `secret_file` at server start ([`HooksConfig::load_secrets`]), not when the config
    /// is parsed: `ephemera policy check` must work where the secrets are not.
    pub secret: SecretString,
    pub secret_file: PathBuf,
    /// The configured issuer whose job keys the hook ends (named, or the only one of its platform).
    pub issuer: String,
}

#[derive(Debug, Clone)]
pub struct IssuerConfig {
    pub name: String,
    pub platform: Platform,
    /// How a token's claims name its job.
    pub job_key: JobKeyRule,
    /// `jenkins` and `generic`: the claims a policy must bind (empty: the platform's own).
    pub identity_claims: Vec<String>,
    /// Compared byte for byte with the token's `iss`.
    pub url: String,
    pub audiences: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    pub max_token_lifetime_secs: i64,
    pub leeway_secs: i64,
    /// Static keys (air-gapped instances): never fetched.
    pub jwks_file: Option<PathBuf>,
    /// Overrides discovery's `jwks_uri`.
    pub jwks_url: Option<String>,
    pub jwks_refresh_secs: i64,
    pub unknown_kid_cooldown_secs: i64,
    /// Whole-request timeout for discovery and JWKS fetches.
    pub fetch_timeout_secs: i64,
    /// A token's `jti` may be used for at most one exchange per policy.
    pub replay_protection: bool,
}

#[derive(Debug, Clone)]
pub enum BackendConfig {
    Jwt(JwtBackendConfig),
    Aws(AwsBackendConfig),
    GithubApp(GithubAppBackendConfig),
    Postgres(PostgresRolesConfig),
    Ssh(SshBackendConfig),
}

/// `type = "postgres"`: a login role per lease, in the operator's database.
#[derive(Debug, Clone)]
pub struct PostgresRolesConfig {
    /// The broker's admin connection (a role with `CREATEROLE` and `ADMIN OPTION` on the group
    /// roles it hands out); the password from `password_file`, read at start.
    pub connection: PostgresConfig,
    pub max_ttl_secs: i64,
    /// Roles the broker creates are named `<prefix><lease id>`; the reaper drops a role with the
    /// prefix that no live lease owns.
    pub role_prefix: String,
    /// `CONNECTION LIMIT` of each role.
    pub connection_limit: i32,
    /// The `host:port` the credential's `dsn` names (default: the admin URL's), for a database
    /// the jobs reach under another name than the broker does.
    pub dsn_host: Option<String>,
    /// What revoking does with objects the role created: `drop` them, or `reassign` them to the
    /// broker's own role.
    pub owned_objects: OwnedObjects,
    /// A role whose lease the ledger does not know is dropped only this long after it was
    /// made: an exchange (on any replica) may be between `CREATE ROLE` and recording its lease.
    pub orphan_grace_secs: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OwnedObjects {
    Drop,
    Reassign,
}

/// `type = "ssh"`: OpenSSH user certificates signed by the broker's CA.
#[derive(Debug, Clone)]
pub struct SshBackendConfig {
    /// The CA's private key (OpenSSH or PKCS#8, Ed25519 or ECDSA P-256), read at start.
    pub ca_key_file: PathBuf,
    pub max_ttl_secs: i64,
    /// `expiry`: a certificate lives its validity; `krl`: servers fetch the broker's KRL
    /// (`GET /v1/ssh/krl`), so a revoked lease's certificate is refused at once.
    pub revocation: SshRevocation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SshRevocation {
    Expiry,
    Krl,
}

/// `api_url` when the config names none: github.com's REST API.
pub const DEFAULT_GITHUB_API_URL: &str = "https://api.github.com";
/// GitHub ends an installation token one hour after creating it; no request can ask for longer.
pub const GITHUB_TOKEN_LIFETIME_SECS: i64 = 3600;

/// `type = "github-app"`: installation tokens of the operator's own GitHub App.
#[derive(Debug, Clone)]
pub struct GithubAppBackendConfig {
    pub app_id: u64,
    /// The App's private key (PEM as GitHub hands it out, PKCS#1 or PKCS#8). Read when the server
    /// starts, not when the config is parsed: `ephemera policy check` must work without it.
    pub private_key_file: PathBuf,
    /// Without a trailing slash; `https://HOST/api/v3` for GitHub Enterprise Server.
    pub api_url: String,
    pub max_ttl_secs: i64,
    /// Whole-request timeout of every call to GitHub.
    pub timeout_secs: i64,
    /// Calls to GitHub in flight at once, from this process.
    pub max_concurrent_requests: usize,
}

/// `type = "aws"`: STS AssumeRole from the broker's own AWS identity.
#[derive(Debug, Clone)]
pub struct AwsBackendConfig {
    pub region: String,
    /// Overrides the STS and IAM endpoints (tests, private endpoints).
    pub endpoint_url: Option<String>,
    /// `deny-policy` needs `iam:PutRolePolicy` on the roles; `expiry` is honest about not having it.
    pub revocation: AwsRevocation,
    pub max_ttl_secs: i64,
    /// A shared credentials file instead of the SDK's default chain (env, profile, IMDS, …).
    pub credentials_file: Option<PathBuf>,
    pub profile: Option<String>,
    pub timeout_secs: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AwsRevocation {
    DenyPolicy,
    Expiry,
}

#[derive(Debug, Clone)]
pub struct JwtBackendConfig {
    /// PKCS#8 (DER or PEM), ES256 or EdDSA; generated when absent. Relative to `data_dir`.
    pub signing_key_file: PathBuf,
    /// Keys this backend signed with before a rotation: still published in the JWKS and honoured
    /// by introspection, never used to sign. They must exist.
    pub previous_signing_key_files: Vec<PathBuf>,
    /// Generate `signing_key_file` when it is absent (one broker). Off on a shared store: every
    /// replica must be given the same key.
    pub generate_missing: bool,
    pub max_ttl_secs: i64,
}

impl BackendConfig {
    /// The default `jwt` backend: a key generated into the data directory.
    pub fn default_jwt() -> BackendConfig {
        BackendConfig::Jwt(JwtBackendConfig {
            signing_key_file: PathBuf::from("keys/jwt.pk8"),
            previous_signing_key_files: Vec::new(),
            generate_missing: true,
            max_ttl_secs: 3600,
        })
    }

    pub fn kind(&self) -> &'static str {
        match self {
            BackendConfig::Jwt(_) => "jwt",
            BackendConfig::Aws(_) => "aws",
            BackendConfig::GithubApp(_) => "github-app",
            BackendConfig::Postgres(_) => "postgres",
            BackendConfig::Ssh(_) => "ssh",
        }
    }

    pub fn max_ttl_secs(&self) -> i64 {
        match self {
            BackendConfig::Jwt(j) => j.max_ttl_secs,
            BackendConfig::Aws(a) => a.max_ttl_secs,
            BackendConfig::GithubApp(g) => g.max_ttl_secs,
            BackendConfig::Postgres(p) => p.max_ttl_secs,
            BackendConfig::Ssh(s) => s.max_ttl_secs,
        }
    }
}

/// Where a config came from, for relative paths and messages.
#[derive(Debug, Clone)]
pub enum Source {
    File(PathBuf),
    Defaults,
}

impl Config {
    /// `--config F`, else `./ephemera.toml` when it exists, else the defaults.
    pub fn load(explicit: Option<&Path>) -> Result<(Config, Source), Vec<String>> {
        let path = match explicit {
            Some(p) => Some(p.to_path_buf()),
            None => Some(PathBuf::from("ephemera.toml")).filter(|p| p.exists()),
        };
        let Some(path) = path else {
            return Ok((Config::defaults(), Source::Defaults));
        };
        let text = std::fs::read_to_string(&path).map_err(|e| vec![format!("{}: cannot read: {e}", path.display())])?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let config = Config::parse(&text, &base)
            .map_err(|errs| errs.into_iter().map(|e| format!("{}: {e}", path.display())).collect::<Vec<_>>())?;
        Ok((config, Source::File(path)))
    }

    /// Parses TOML; relative paths resolve against `base` (the config file's folder).
    pub fn parse(text: &str, base: &Path) -> Result<Config, Vec<String>> {
        file::parse(text, base)
    }

    /// No config file: policies in `./policies`, the public GitHub, GitLab and Buildkite issuers, a `jwt`
    /// backend — so `policy check` works in a policy repository with no config at all.
    pub fn defaults() -> Config {
        // Invariant: the built-in defaults are valid (tested by `defaults_are_valid`).
        #[allow(clippy::expect_used)]
        file::defaults().expect("built-in defaults are valid")
    }
}

impl HooksConfig {
    /// Reads each enabled hook's secret from its file. The server calls this at start and refuses
    /// to start on an error, so a broken file stops the start, not the first delivery.
    pub fn load_secrets(&mut self) -> Result<(), Vec<String>> {
        let mut errs = Vec::new();
        for (hook, field) in [
            (&mut self.github, "github_secret_file"),
            (&mut self.gitlab, "gitlab_token_file"),
            (
                &mut self.buildkite,
                if self.buildkite_signed { "buildkite_signing_secret_file" } else { "buildkite_token_file" },
            ),
        ] {
            if let Some(hook) = hook.as_mut() {
                match read_secret_file(&hook.secret_file) {
                    Ok(secret) => hook.secret = secret,
                    Err(e) => errs.push(format!("hooks.{field}: {e}")),
                }
            }
        }
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }
}

/// A secret from a file: the whole file, less one trailing newline (as `echo` writes it).
fn read_secret_file(path: &Path) -> Result<SecretString, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let text = text.strip_suffix('\n').map_or(text.as_str(), |t| t.strip_suffix('\r').unwrap_or(t));
    if text.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(SecretString::new(text.to_string()))
}

/// Issuer and broker URLs must be https, except loopback, which may be plain http (tests, dev).
pub fn check_url(text: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(text).map_err(|e| format!("`{text}` is not a URL ({e})"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("credentials in a URL are not allowed".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("a query or fragment is not allowed here".into());
    }
    match url.scheme() {
        "https" => Ok(()),
        "http" if is_loopback(&url) => Ok(()),
        _ => Err(format!("`{text}` must be https:// (plain http only for loopback addresses)")),
    }
}

pub fn is_loopback(url: &reqwest::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

pub fn parse_sha256_hex(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renew_max_lease_caps_policies_at_12h_by_default_and_stays_between_a_minute_and_a_week() {
        let base = Path::new("/etc/ephemera");
        assert_eq!(Config::defaults().renew_max_lease_secs, 12 * 3600);
        assert_eq!(Config::parse("[renew]\nmax_lease = \"2d\"\n", base).unwrap().renew_max_lease_secs, 2 * 86400);
        for bad in ["30s", "8d"] {
            let errs = Config::parse(&format!("[renew]\nmax_lease = \"{bad}\"\n"), base).unwrap_err();
            assert!(errs.iter().any(|e| e.contains("renew.max_lease: between 1m and 7d")), "{bad}: {errs:?}");
        }
        let errs = Config::parse("[renew]\nmax_leases = \"1h\"\n", base).unwrap_err();
        assert!(errs.join(" ").contains("max_leases"), "{errs:?}");
    }

    #[test]
    fn a_github_app_backend_defaults_to_github_com_and_github_caps_its_ttl_at_an_hour() {
        let base = Path::new("/etc/ephemera");
        let toml = "[backends.gh]\ntype = \"github-app\"\napp_id = 4242\nprivate_key_file = \"keys/app.pem\"\n";
        let c = Config::parse(toml, base).unwrap();
        let BackendConfig::GithubApp(g) = &c.backends["gh"] else { panic!("not github-app") };
        assert_eq!(g.api_url, "https://api.github.com");
        assert_eq!(g.private_key_file, Path::new("/etc/ephemera/keys/app.pem"), "relative to the config");
        assert_eq!((g.max_ttl_secs, g.max_concurrent_requests, c.backends["gh"].kind()), (3600, 8, "github-app"));
        let ghes = format!("{toml}api_url = \"https://ghe.example.com/api/v3/\"\n");
        let BackendConfig::GithubApp(g) = &Config::parse(&ghes, base).unwrap().backends["gh"] else { panic!() };
        assert_eq!(g.api_url, "https://ghe.example.com/api/v3", "Enterprise Server, no trailing slash");
        for (bad, says) in [
            ("app_id = 0\nprivate_key_file = \"k\"\n", "backends.gh.app_id"),
            ("app_id = 1\nprivate_key_file = \"k\"\nmax_ttl = \"2h\"\n", "backends.gh.max_ttl: at most 1h"),
            ("app_id = 1\nprivate_key_file = \"k\"\napi_url = \"http://ghe.example.com\"\n", "backends.gh.api_url"),
            ("app_id = 1\nprivate_key_file = \"k\"\nmax_concurrent_requests = 0\n", "max_concurrent_requests"),
            ("app_id = 1\n", "private_key_file"),
            ("app_id = 1\nprivate_key_file = \"k\"\nprivate_key = \"inline\"\n", "private_key"),
        ] {
            let errs = Config::parse(&format!("[backends.gh]\ntype = \"github-app\"\n{bad}"), base).unwrap_err();
            assert!(errs.iter().any(|e| e.contains(says)), "{bad}: {errs:?}");
        }
    }

    #[test]
    fn a_postgres_backend_takes_the_ledgers_url_rules_and_a_distinctive_role_prefix() {
        let base = Path::new("/etc/ephemera");
        let head = "[backends.db]\ntype = \"postgres\"\n";
        let ok =
            format!("{head}url = \"postgres://admin@db.internal:5433/app?sslmode=disable\"\npassword_file = \"pw\"\n");
        let c = Config::parse(&ok, base).unwrap();
        let BackendConfig::Postgres(p) = &c.backends["db"] else { panic!("not postgres") };
        assert_eq!(
            (p.connection.host.as_str(), p.connection.port, p.connection.dbname.as_str()),
            ("db.internal", 5433, "app")
        );
        assert_eq!(p.connection.password_file.as_deref(), Some(Path::new("/etc/ephemera/pw")));
        assert_eq!((p.role_prefix.as_str(), p.connection_limit, p.orphan_grace_secs), ("ephemera_", 4, 300));
        assert_eq!(p.owned_objects, OwnedObjects::Drop);
        for (bad, says) in [
            ("url = \"postgres://admin:secret@db/app?sslmode=disable\"\n", "a password in the URL is not allowed"),
            ("url = \"postgres://admin@db/app\"\n", "backends.db.ca_file: required with sslmode=verify-full"),
            ("url = \"postgres://admin@db/app?sslmode=require\"\n", "does not verify the database"),
            ("url = \"postgres://a@db/app?sslmode=disable\"\nrole_prefix = \"x\"\n", "backends.db.role_prefix"),
            ("url = \"postgres://a@db/app?sslmode=disable\"\nrole_prefix = \"Ephemera_\"\n", "backends.db.role_prefix"),
            ("url = \"postgres://a@db/app?sslmode=disable\"\nconnection_limit = 0\n", "connection_limit"),
            (
                "url = \"postgres://a@db/app?sslmode=disable\"\nowned_objects = \"keep\"\n",
                "expected `drop` or `reassign`",
            ),
        ] {
            let errs = Config::parse(&format!("{head}{bad}"), base).unwrap_err();
            assert!(errs.iter().any(|e| e.contains(says)), "{bad}: {errs:?}");
        }
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::defaults();
        assert_eq!(c.issuers.len(), 3);
        let buildkite = c.issuers.iter().find(|i| i.name == "buildkite").unwrap();
        assert!(!buildkite.replay_protection, "Buildkite tokens carry no jti");
        assert!(c.backends.contains_key("jwt"));
        assert_eq!(c.policies_dir, PathBuf::from("policies"));
    }

    #[test]
    fn the_annotated_example_config_parses() {
        let text = include_str!("../../docs/ephemera.example.toml");
        let c = Config::parse(text, Path::new("/etc/ephemera")).unwrap();
        assert_eq!(c.issuers.len(), 7, "one issuer of every platform but Buildkite");
        assert_eq!(c.issuers[1].max_token_lifetime_secs, 3 * 3600);
        let generic = c.issuers.iter().find(|i| i.platform == Platform::Generic).unwrap();
        assert_eq!(
            (generic.job_key.claims.as_slice(), generic.identity_claims.as_slice()),
            (&["project_id", "build_id"][..], &["project_id".to_string()][..])
        );
        assert_eq!(c.policies_dir, PathBuf::from("/etc/ephemera/policies"));
        assert!(c.backends.contains_key("internal-jwt") && !c.backends.contains_key("jwt"));
        assert!(c.admin_token_sha256.is_some());
    }

    #[test]
    fn loopback_may_use_plain_http_but_nothing_else_may() {
        assert!(check_url("http://127.0.0.1:9000").is_ok());
        assert!(check_url("http://[::1]:9000").is_ok());
        assert!(check_url("http://localhost").is_ok());
        assert!(check_url("http://10.0.0.1").is_err());
        assert!(check_url("http://localhost.evil.example").is_err());
        assert!(check_url("https://user:pw@gitlab.com").is_err());
        assert!(check_url("file:///etc/passwd").is_err());
    }
}
