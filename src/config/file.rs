//! The config file as written: the raw TOML structs (`deny_unknown_fields`, so a misspelt key
//! is an error, not a silently ignored setting) and their validation into a [`Config`], with
//! every error collected and reported at once.

use super::{
    AuditConfig, AwsBackendConfig, AwsRevocation, BackendConfig, Config, DEFAULT_AUDIT_CLAIMS, DEFAULT_GITHUB_API_URL,
    DEFAULT_LISTEN, GITHUB_TOKEN_LIFETIME_SECS, GithubAppBackendConfig, HookConfig, HooksConfig, IssuerConfig,
    JwtBackendConfig, OwnedObjects, PostgresRolesConfig, SshBackendConfig, SshRevocation, check_url, parse_sha256_hex,
};
use crate::claims::{JobKeyRule, Platform, intern};
use crate::clock::parse_duration;
use crate::names::is_name;
use crate::secret::SecretString;
use jsonwebtoken::Algorithm;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

const MAX_LEEWAY_SECS: i64 = 60;
/// A renewable lease lasts a week at most: no CI job runs longer (GitHub stops a job at 6 h on
/// its runners and 5 days on self-hosted ones, GitLab at the project's timeout, one month at most
/// but rarely above a day).
const MAX_RENEW_LEASE_SECS: i64 = 7 * 24 * 3600;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    public_url: Option<String>,
    policies: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    replica_id: Option<String>,
    #[serde(default)]
    issuers: Vec<RawIssuer>,
    #[serde(default)]
    backends: BTreeMap<String, RawBackend>,
    #[serde(default)]
    ledger: super::ledger::RawLedger,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    hooks: RawHooks,
    #[serde(default)]
    reload: RawReload,
    #[serde(default)]
    renew: RawRenew,
    #[serde(default)]
    limits: super::limits::RawLimits,
    audit: Option<RawAudit>,
}

/// `[renew]`: renewable leases (a policy opts in with `renew: {max_lease: …}`).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRenew {
    /// The longest a policy may let a renewable lease last (default 12h).
    max_lease: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawReload {
    /// Poll the policies directory (default true). SIGHUP reloads either way.
    watch: Option<bool>,
    /// How often (default 2s).
    interval: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    file: PathBuf,
    claims: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIssuer {
    name: String,
    platform: Platform,
    url: String,
    audiences: Option<Vec<String>>,
    algorithms: Option<Vec<String>>,
    max_token_lifetime: Option<String>,
    leeway: Option<String>,
    jwks_file: Option<PathBuf>,
    jwks_url: Option<String>,
    jwks_refresh: Option<String>,
    unknown_kid_cooldown: Option<String>,
    fetch_timeout: Option<String>,
    replay_protection: Option<bool>,
    /// `jenkins` and `generic` only: the claims whose values together name one job.
    job_key_claims: Option<Vec<String>>,
    /// `jenkins` and `generic` only: the claims a policy must bind (ids never reused).
    identity_claims: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
enum RawBackend {
    Jwt {
        signing_key_file: Option<PathBuf>,
        #[serde(default)]
        previous_signing_key_files: Vec<PathBuf>,
        max_ttl: Option<String>,
    },
    Aws {
        region: String,
        endpoint_url: Option<String>,
        revocation: Option<AwsRevocation>,
        max_ttl: Option<String>,
        credentials_file: Option<PathBuf>,
        profile: Option<String>,
        timeout: Option<String>,
    },
    GithubApp {
        app_id: u64,
        private_key_file: PathBuf,
        api_url: Option<String>,
        max_ttl: Option<String>,
        timeout: Option<String>,
        max_concurrent_requests: Option<usize>,
    },
    Postgres {
        url: String,
        password_file: Option<PathBuf>,
        ca_file: Option<PathBuf>,
        max_ttl: Option<String>,
        timeout: Option<String>,
        role_prefix: Option<String>,
        connection_limit: Option<i32>,
        dsn_host: Option<String>,
        owned_objects: Option<OwnedObjects>,
        orphan_grace: Option<String>,
    },
    Ssh {
        ca_key_file: PathBuf,
        max_ttl: Option<String>,
        revocation: Option<SshRevocation>,
    },
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    token_sha256: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHooks {
    github_secret_file: Option<PathBuf>,
    gitlab_token_file: Option<PathBuf>,
    buildkite_token_file: Option<PathBuf>,
    buildkite_signing_secret_file: Option<PathBuf>,
    github_issuer: Option<String>,
    gitlab_issuer: Option<String>,
    buildkite_issuer: Option<String>,
}

/// [`Config::parse`]: the TOML as written, then validated.
pub(super) fn parse(text: &str, base: &Path) -> Result<Config, Vec<String>> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| vec![e.to_string().trim_end().to_string()])?;
    raw.validate(base)
}

/// [`Config::defaults`], validated as a file is: the public GitHub, GitLab and Buildkite
/// issuers, nothing else set.
pub(super) fn defaults() -> Result<Config, Vec<String>> {
    let raw = RawConfig {
        issuers: vec![
            default_issuer("github", Platform::GithubActions, "https://token.actions.githubusercontent.com"),
            default_issuer("gitlab", Platform::GitlabCi, "https://gitlab.com"),
            default_issuer("buildkite", Platform::Buildkite, "https://agent.buildkite.com"),
        ],
        ..RawConfig::default()
    };
    raw.validate(Path::new(""))
}

fn default_issuer(name: &str, platform: Platform, url: &str) -> RawIssuer {
    RawIssuer {
        name: name.into(),
        platform,
        url: url.into(),
        audiences: None,
        algorithms: None,
        max_token_lifetime: None,
        leeway: None,
        jwks_file: None,
        jwks_url: None,
        jwks_refresh: None,
        unknown_kid_cooldown: None,
        fetch_timeout: None,
        replay_protection: None,
        job_key_claims: None,
        identity_claims: None,
    }
}

/// The host name, so replicas in a cluster tell themselves apart with no config; `None` when it
/// cannot be read or is not a usable id.
fn host_name_replica_id() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name = name.trim();
    is_replica_id(name).then(|| name.to_string())
}

fn is_replica_id(text: &str) -> bool {
    (1..=64).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Collects every validation error instead of stopping at the first.
#[derive(Default)]
pub(super) struct Errors(pub(super) Vec<String>);

impl Errors {
    pub(super) fn duration(&mut self, field: &str, value: Option<&str>, default: i64) -> i64 {
        match value.map(parse_duration) {
            None => default,
            Some(Ok(v)) => v,
            Some(Err(e)) => {
                self.0.push(format!("{field}: {e}"));
                default
            }
        }
    }
}

impl RawConfig {
    fn validate(self, base: &Path) -> Result<Config, Vec<String>> {
        let mut errs = Errors::default();
        let listen_text = self.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen = SocketAddr::from_str(listen_text).unwrap_or_else(|_| {
            errs.0.push(format!("listen: `{listen_text}` is not an address like 0.0.0.0:8080"));
            SocketAddr::from(([127, 0, 0, 1], 8080))
        });
        let public_url = self.public_url.clone().unwrap_or_else(|| format!("http://{listen}"));
        if let Err(e) = check_url(&public_url) {
            errs.0.push(format!("public_url: {e}"));
        }
        let public_url = public_url.trim_end_matches('/').to_string();
        let data_dir = base.join(self.data_dir.clone().unwrap_or_else(|| PathBuf::from("data")));
        let ledger = self.ledger.validate(base, &mut errs);
        if ledger.store.is_shared() {
            self.check_shared_keys(&mut errs);
        }
        let issuers = self.validate_issuers(&public_url, base, &mut errs);
        let hooks = self.hooks.validate(&issuers, base, &mut errs);
        let backends = self.validate_backends(base, ledger.store.is_shared(), &mut errs);
        let replica_id = match (&self.replica_id, host_name_replica_id()) {
            (Some(id), _) => id.clone(),
            (None, Some(host)) => host,
            // Replicas on one store must be told apart: a replica takes back the work claimed
            // under its own id at start, so two sharing a made-up id would take each other's.
            (None, None) if ledger.store.is_shared() => {
                errs.0.push(
                    "replica_id: required with store = \"postgres\" when the host name is not a usable id".into(),
                );
                String::new()
            }
            (None, None) => "ephemera".to_string(),
        };
        if !replica_id.is_empty() && !is_replica_id(&replica_id) {
            errs.0.push("replica_id: 1 to 64 characters of [A-Za-z0-9._-]".into());
        }
        let admin_token_sha256 = self.admin.token_sha256.as_deref().and_then(|h| {
            parse_sha256_hex(h).or_else(|| {
                errs.0.push("admin.token_sha256: expected 64 hex characters (the SHA-256 of the admin token)".into());
                None
            })
        });
        let watch_interval = errs.duration("reload.interval", self.reload.interval.as_deref(), 2);
        if watch_interval < 1 {
            errs.0.push("reload.interval: at least 1s".into());
        }
        let reload_watch_secs = self.reload.watch.unwrap_or(true).then_some(watch_interval);
        let renew_max_lease_secs = errs.duration("renew.max_lease", self.renew.max_lease.as_deref(), 12 * 3600);
        if !(60..=MAX_RENEW_LEASE_SECS).contains(&renew_max_lease_secs) {
            errs.0.push("renew.max_lease: between 1m and 7d".into());
        }
        let audit = self.audit.map(|a| AuditConfig {
            file: base.join(a.file),
            claims: a.claims.unwrap_or_else(|| DEFAULT_AUDIT_CLAIMS.iter().map(|c| (*c).to_string()).collect()),
        });
        if let Some(bad) = audit.iter().flat_map(|a| &a.claims).find(|c| !crate::names::is_claim_name(c)) {
            errs.0.push(format!("audit.claims: `{}` is not a claim name", crate::clock::truncate(bad, 40)));
        }
        let limits = self.limits.validate(&mut errs);
        if !errs.0.is_empty() {
            return Err(errs.0);
        }
        Ok(Config {
            listen,
            public_url,
            policies_dir: base.join(self.policies.unwrap_or_else(|| PathBuf::from("policies"))),
            data_dir,
            issuers,
            backends,
            ledger,
            replica_id,
            admin_token_sha256,
            hooks,
            reload_watch_secs,
            renew_max_lease_secs,
            audit,
            limits,
        })
    }

    /// Replicas on one store must sign with one key set: a JWT minted on any replica has to
    /// verify against the JWKS of every replica. A key generated per replica would split it
    /// silently, so each key is named (a mounted secret) and must exist at start.
    fn check_shared_keys(&self, errs: &mut Errors) {
        if self.backends.is_empty() {
            errs.0.push(
                "backends: with store = \"postgres\", configure the jwt backend with a signing_key_file every \
                 replica is given (the default backend would generate a key per replica)"
                    .into(),
            );
        }
        for (name, raw) in &self.backends {
            if let RawBackend::Jwt { signing_key_file: None, .. } = raw {
                errs.0.push(format!(
                    "backends.{name}.signing_key_file: required with store = \"postgres\" (the same key file on every replica)"
                ));
            }
        }
    }

    fn validate_issuers(&self, public_url: &str, base: &Path, errs: &mut Errors) -> Vec<IssuerConfig> {
        let mut names = BTreeSet::new();
        let mut urls = BTreeSet::new();
        let mut out = Vec::new();
        for (i, raw) in self.issuers.iter().enumerate() {
            let at = format!("issuers[{i}] ({})", raw.name);
            if !is_name(&raw.name) {
                errs.0.push(format!("{at}.name: must match [a-z0-9][a-z0-9-_]*"));
            }
            if !names.insert(raw.name.clone()) {
                errs.0.push(format!("{at}.name: issuer `{}` is configured twice", raw.name));
            }
            if !urls.insert(raw.url.clone()) {
                errs.0.push(format!("{at}.url: two issuers share the url {}", raw.url));
            }
            if let Err(e) = check_url(&raw.url) {
                errs.0.push(format!("{at}.url: {e}"));
            }
            if let Some(Err(e)) = raw.jwks_url.as_deref().map(check_url) {
                errs.0.push(format!("{at}.jwks_url: {e}"));
            }
            let algorithms = parse_algorithms(raw.algorithms.as_deref(), &at, errs);
            let audiences = raw.audiences.clone().unwrap_or_else(|| vec![public_url.to_string()]);
            if audiences.is_empty() || audiences.iter().any(String::is_empty) {
                errs.0.push(format!("{at}.audiences: at least one non-empty audience is required"));
            }
            let leeway_secs = errs.duration(&format!("{at}.leeway"), raw.leeway.as_deref(), 30);
            if leeway_secs > MAX_LEEWAY_SECS {
                errs.0.push(format!("{at}.leeway: at most 60s (a larger skew window lets expired tokens through)"));
            }
            let (job_key, identity_claims) = issuer_claims(raw, &at, errs);
            out.push(IssuerConfig {
                name: raw.name.clone(),
                platform: raw.platform,
                job_key,
                identity_claims,
                url: raw.url.clone(),
                audiences,
                algorithms,
                max_token_lifetime_secs: errs.duration(
                    &format!("{at}.max_token_lifetime"),
                    raw.max_token_lifetime.as_deref(),
                    3600,
                ),
                leeway_secs,
                jwks_file: raw.jwks_file.as_ref().map(|p| base.join(p)),
                jwks_url: raw.jwks_url.clone(),
                jwks_refresh_secs: errs.duration(&format!("{at}.jwks_refresh"), raw.jwks_refresh.as_deref(), 900),
                unknown_kid_cooldown_secs: errs.duration(
                    &format!("{at}.unknown_kid_cooldown"),
                    raw.unknown_kid_cooldown.as_deref(),
                    60,
                ),
                fetch_timeout_secs: errs.duration(&format!("{at}.fetch_timeout"), raw.fetch_timeout.as_deref(), 5),
                replay_protection: raw.replay_protection.unwrap_or(raw.platform.sends_jti()),
            });
        }
        out
    }

    fn validate_backends(&self, base: &Path, shared: bool, errs: &mut Errors) -> BTreeMap<String, BackendConfig> {
        let mut out = BTreeMap::new();
        // With no backend configured at all, a `jwt` backend is there (DESIGN §5).
        if self.backends.is_empty() {
            out.insert("jwt".to_string(), BackendConfig::default_jwt());
        }
        for (name, raw) in &self.backends {
            if !is_name(name) {
                errs.0.push(format!("backends.{name}: name must match [a-z0-9][a-z0-9-_]*"));
            }
            let backend = match raw {
                RawBackend::Jwt { signing_key_file, previous_signing_key_files, max_ttl } => {
                    BackendConfig::Jwt(JwtBackendConfig {
                        signing_key_file: signing_key_file
                            .clone()
                            .unwrap_or_else(|| PathBuf::from(format!("keys/{name}.pk8"))),
                        previous_signing_key_files: previous_signing_key_files.clone(),
                        generate_missing: !shared,
                        max_ttl_secs: errs.duration(&format!("backends.{name}.max_ttl"), max_ttl.as_deref(), 3600),
                    })
                }
                RawBackend::Aws { region, endpoint_url, revocation, max_ttl, credentials_file, profile, timeout } => {
                    let max_ttl_secs = errs.duration(&format!("backends.{name}.max_ttl"), max_ttl.as_deref(), 3600);
                    if let Err(e) = crate::aws_format::check_backend_max_ttl(max_ttl_secs) {
                        errs.0.push(format!("backends.{name}.max_ttl: {e}"));
                    }
                    if let Some(Err(e)) = endpoint_url.as_deref().map(check_url) {
                        errs.0.push(format!("backends.{name}.endpoint_url: {e}"));
                    }
                    if region.is_empty() || !region.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                        errs.0.push(format!("backends.{name}.region: `{region}` is not a region like eu-west-1"));
                    }
                    BackendConfig::Aws(AwsBackendConfig {
                        region: region.clone(),
                        endpoint_url: endpoint_url.clone(),
                        revocation: revocation.unwrap_or(AwsRevocation::DenyPolicy),
                        max_ttl_secs,
                        credentials_file: credentials_file.as_ref().map(|p| base.join(p)),
                        profile: profile.clone(),
                        timeout_secs: errs.duration(&format!("backends.{name}.timeout"), timeout.as_deref(), 10),
                    })
                }
                RawBackend::GithubApp {
                    app_id,
                    private_key_file,
                    api_url,
                    max_ttl,
                    timeout,
                    max_concurrent_requests,
                } => {
                    let at = format!("backends.{name}");
                    BackendConfig::GithubApp(validate_github_app(
                        &at,
                        base,
                        (*app_id, private_key_file, api_url.as_deref()),
                        (max_ttl.as_deref(), timeout.as_deref(), *max_concurrent_requests),
                        errs,
                    ))
                }
                RawBackend::Postgres { .. } => {
                    match validate_postgres_roles(&format!("backends.{name}"), raw, base, errs) {
                        Some(p) => BackendConfig::Postgres(p),
                        None => continue,
                    }
                }
                RawBackend::Ssh { ca_key_file, max_ttl, revocation } => BackendConfig::Ssh(SshBackendConfig {
                    ca_key_file: base.join(ca_key_file),
                    max_ttl_secs: errs.duration(&format!("backends.{name}.max_ttl"), max_ttl.as_deref(), 3600),
                    revocation: revocation.unwrap_or(SshRevocation::Expiry),
                }),
            };
            out.insert(name.clone(), backend);
        }
        out
    }
}

/// `type = "github-app"`: the App's id and key, the API (GitHub Enterprise Server has its own),
/// and ceilings GitHub fixes: an installation token lives one hour.
fn validate_github_app(
    at: &str,
    base: &Path,
    (app_id, private_key_file, api_url): (u64, &Path, Option<&str>),
    (max_ttl, timeout, max_concurrent): (Option<&str>, Option<&str>, Option<usize>),
    errs: &mut Errors,
) -> GithubAppBackendConfig {
    if app_id == 0 {
        errs.0.push(format!("{at}.app_id: must be the App's numeric ID (Settings → Developer settings → GitHub Apps)"));
    }
    let api_url = api_url.unwrap_or(DEFAULT_GITHUB_API_URL).trim_end_matches('/').to_string();
    if let Err(e) = check_url(&api_url) {
        errs.0.push(format!("{at}.api_url: {e}"));
    }
    let max_ttl_secs = errs.duration(&format!("{at}.max_ttl"), max_ttl, GITHUB_TOKEN_LIFETIME_SECS);
    if max_ttl_secs > GITHUB_TOKEN_LIFETIME_SECS {
        errs.0.push(format!(
            "{at}.max_ttl: at most 1h (GitHub ends every installation token one hour after it is created)"
        ));
    }
    let max_concurrent_requests = max_concurrent.unwrap_or(8);
    if !(1..=256).contains(&max_concurrent_requests) {
        errs.0.push(format!("{at}.max_concurrent_requests: 1 to 256"));
    }
    GithubAppBackendConfig {
        app_id,
        private_key_file: base.join(private_key_file),
        api_url,
        max_ttl_secs,
        timeout_secs: errs.duration(&format!("{at}.timeout"), timeout, 10),
        max_concurrent_requests,
    }
}

/// `type = "postgres"`: the admin connection (the ledger's URL rules), and the roles' shape. The
/// prefix is what the reaper trusts to tell the broker's roles from everyone else's, so it must
/// be distinctive: letters, digits and `_`, 3 to 20 characters, ending in `_`.
fn validate_postgres_roles(at: &str, raw: &RawBackend, base: &Path, errs: &mut Errors) -> Option<PostgresRolesConfig> {
    let RawBackend::Postgres {
        url,
        password_file,
        ca_file,
        max_ttl,
        timeout,
        role_prefix,
        connection_limit,
        dsn_host,
        owned_objects,
        orphan_grace,
    } = raw
    else {
        return None;
    };
    let max_ttl_secs = errs.duration(&format!("{at}.max_ttl"), max_ttl.as_deref(), 3600);
    let timeout_secs = errs.duration(&format!("{at}.timeout"), timeout.as_deref(), 10);
    let role_prefix = role_prefix.clone().unwrap_or_else(|| "ephemera_".into());
    let prefix_ok = (3..=20).contains(&role_prefix.len())
        && role_prefix.ends_with('_')
        && role_prefix.starts_with(|c: char| c.is_ascii_lowercase())
        && role_prefix.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !prefix_ok {
        errs.0.push(format!("{at}.role_prefix: 3 to 20 of [a-z0-9_], starting with a letter and ending in `_`"));
    }
    let connection_limit = connection_limit.unwrap_or(4);
    if !(1..=1000).contains(&connection_limit) {
        errs.0.push(format!("{at}.connection_limit: 1 to 1000"));
    }
    if let Some(host) = dsn_host {
        let ok = !host.is_empty()
            && host.len() <= 255
            && host.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
        if !ok {
            errs.0.push(format!("{at}.dsn_host: a host or host:port"));
        }
    }
    let connection = super::ledger::backend_connection(
        at,
        url,
        (password_file.as_deref(), ca_file.as_deref()),
        timeout_secs,
        base,
        errs,
    )?;
    Some(PostgresRolesConfig {
        connection,
        max_ttl_secs,
        role_prefix,
        connection_limit,
        dsn_host: dsn_host.clone(),
        owned_objects: owned_objects.unwrap_or(OwnedObjects::Drop),
        orphan_grace_secs: errs.duration(&format!("{at}.orphan_grace"), orphan_grace.as_deref(), 300),
    })
}

impl RawHooks {
    fn validate(&self, issuers: &[IssuerConfig], base: &Path, errs: &mut Errors) -> HooksConfig {
        let github = (self.github_secret_file.as_deref(), "github_secret_file");
        let gitlab = (self.gitlab_token_file.as_deref(), "gitlab_token_file");
        if self.buildkite_token_file.is_some() && self.buildkite_signing_secret_file.is_some() {
            errs.0.push(
                "hooks.buildkite_signing_secret_file: set it or buildkite_token_file, not both (the webhook has one secret)"
                    .into(),
            );
        }
        let buildkite = match &self.buildkite_signing_secret_file {
            Some(file) => (Some(file.as_path()), "buildkite_signing_secret_file"),
            None => (self.buildkite_token_file.as_deref(), "buildkite_token_file"),
        };
        HooksConfig {
            github: hook(
                github,
                (self.github_issuer.as_deref(), "github_issuer"),
                Platform::GithubActions,
                issuers,
                base,
                errs,
            ),
            gitlab: hook(
                gitlab,
                (self.gitlab_issuer.as_deref(), "gitlab_issuer"),
                Platform::GitlabCi,
                issuers,
                base,
                errs,
            ),
            buildkite_signed: self.buildkite_signing_secret_file.is_some(),
            buildkite: hook(
                buildkite,
                (self.buildkite_issuer.as_deref(), "buildkite_issuer"),
                Platform::Buildkite,
                issuers,
                base,
                errs,
            ),
        }
    }
}

/// Claims that name no job and no owner (the broker checks them itself), so neither a job key
/// nor a policy's identity binding may rest on them.
const NOT_IDENTIFYING: [&str; 6] = ["iss", "aud", "exp", "iat", "nbf", "azp"];

/// At most this many claims in `job_key_claims` or `identity_claims`.
const MAX_CONFIGURED_CLAIMS: usize = 8;

/// The job-key rule and identity claims of one issuer. A `jenkins` or `generic` issuer's come
/// from its config (`generic` must name both; `jenkins` defaults to the plugin's default claim
/// templates); any other platform has its own, and naming them is an error rather than silently
/// ignored.
fn issuer_claims(raw: &RawIssuer, at: &str, errs: &mut Errors) -> (JobKeyRule, Vec<String>) {
    let platform = raw.platform;
    if !platform.configured_claims() {
        for (field, set) in [("job_key_claims", &raw.job_key_claims), ("identity_claims", &raw.identity_claims)] {
            if set.is_some() {
                errs.0.push(format!(
                    "{at}.{field}: platform `{}` has its own job key and identity claims (docs/platforms.md); \
                     {field} is for jenkins and generic issuers",
                    platform.as_str()
                ));
            }
        }
        return (JobKeyRule::of(platform), Vec::new());
    }
    let defaults = platform.default_configured_claims();
    let mut list = |field: &str, set: &Option<Vec<String>>, default: &[&str]| -> Vec<String> {
        let names: Vec<String> = match set {
            Some(names) => names.clone(),
            None => default.iter().map(|n| n.to_string()).collect(),
        };
        if names.is_empty() {
            errs.0.push(format!(
                "{at}.{field}: a {} issuer must name at least one claim (see docs/platforms.md)",
                platform.as_str()
            ));
        }
        if names.len() > MAX_CONFIGURED_CLAIMS {
            errs.0.push(format!("{at}.{field}: at most {MAX_CONFIGURED_CLAIMS} claims"));
        }
        let mut seen = BTreeSet::new();
        for name in &names {
            if !crate::names::is_claim_name(name) {
                errs.0.push(format!("{at}.{field}: `{}` is not a claim name", crate::clock::truncate(name, 40)));
            } else if NOT_IDENTIFYING.contains(&name.as_str()) {
                errs.0.push(format!("{at}.{field}: `{name}` identifies no job or owner (the broker checks it itself)"));
            } else if !seen.insert(name) {
                errs.0.push(format!("{at}.{field}: `{name}` is named twice"));
            }
        }
        names
    };
    let job = list("job_key_claims", &raw.job_key_claims, defaults.0);
    let identity = list("identity_claims", &raw.identity_claims, defaults.1);
    let rule = JobKeyRule { platform, claims: job.iter().map(|n| intern(n)).collect() };
    (rule, identity)
}

/// One webhook: its secret file and the issuer whose job keys it ends.
fn hook(
    (file, file_field): (Option<&Path>, &str),
    (named, issuer_field): (Option<&str>, &str),
    platform: Platform,
    issuers: &[IssuerConfig],
    base: &Path,
    errs: &mut Errors,
) -> Option<HookConfig> {
    let candidates: Vec<&str> = issuers.iter().filter(|i| i.platform == platform).map(|i| i.name.as_str()).collect();
    let issuer = match named {
        Some(name) if candidates.contains(&name) => Some(name.to_string()),
        Some(name) => {
            errs.0.push(format!("hooks.{issuer_field}: no {} issuer is named `{name}`", platform.as_str()));
            None
        }
        None if file.is_none() => None,
        None => match candidates.as_slice() {
            [only] => Some((*only).to_string()),
            [] => {
                errs.0.push(format!("hooks.{file_field}: no {} issuer is configured", platform.as_str()));
                None
            }
            many => {
                errs.0.push(format!(
                    "hooks.{issuer_field}: {} {} issuers are configured ({}); name the one whose jobs the webhook ends",
                    many.len(),
                    platform.as_str(),
                    many.join(", ")
                ));
                None
            }
        },
    };
    let secret_file = base.join(file?);
    Some(HookConfig { secret: SecretString::new(String::new()), secret_file, issuer: issuer? })
}

fn parse_algorithms(raw: Option<&[String]>, at: &str, errs: &mut Errors) -> Vec<Algorithm> {
    let names: Vec<String> = raw.map_or_else(|| vec!["RS256".to_string()], <[String]>::to_vec);
    if names.is_empty() {
        errs.0.push(format!("{at}.algorithms: at least one algorithm is required"));
    }
    let mut out = Vec::new();
    for name in names {
        match Algorithm::from_str(&name) {
            // HMAC would make the issuer's *public* key a shared secret (the classic RS256→HS256
            // confusion attack); `none` is not a signature at all.
            Ok(Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) | Err(_) => {
                errs.0.push(format!("{at}.algorithms: `{name}` is not allowed (use RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 or EdDSA)"));
            }
            Ok(alg) => out.push(alg),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_errors() {
        let errs = Config::parse("listen = \"127.0.0.1:1\"\nlisen = 1\n", Path::new("")).unwrap_err();
        assert!(errs[0].contains("lisen"), "{errs:?}");
    }

    #[test]
    fn every_validation_error_is_reported_at_once() {
        let toml = r#"
            [[issuers]]
            name = "Bad Name"
            platform = "github-actions"
            url = "http://token.example.com"
            algorithms = ["HS256", "none"]
            leeway = "5m"
        "#;
        let errs = Config::parse(toml, Path::new("")).unwrap_err().join("\n");
        for needle in [
            "name: must match",
            "must be https",
            "`HS256` is not allowed",
            "`none` is not allowed",
            "leeway: at most 60s",
        ] {
            assert!(errs.contains(needle), "missing {needle:?} in {errs}");
        }
    }

    fn issuer(platform: &str, extra: &str) -> String {
        format!("[[issuers]]\nname = \"ci\"\nplatform = \"{platform}\"\nurl = \"https://ci.example.com\"\n{extra}\n")
    }

    #[test]
    fn a_generic_issuer_names_its_job_key_and_identity_claims() {
        let toml = issuer("generic", "job_key_claims = [\"project\", \"run\"]\nidentity_claims = [\"project_uuid\"]");
        let config = Config::parse(&toml, Path::new("")).unwrap();
        let ci = &config.issuers[0];
        assert_eq!(ci.job_key.claims, ["project", "run"]);
        assert_eq!(ci.identity_claims, ["project_uuid"]);
        assert!(!ci.replay_protection, "a generic issuer's tokens may carry no jti");
        let errs = Config::parse(&issuer("generic", ""), Path::new("")).unwrap_err().join("\n");
        assert!(errs.contains("job_key_claims: a generic issuer must name at least one claim"), "{errs}");
        assert!(errs.contains("identity_claims: a generic issuer must name at least one claim"), "{errs}");
    }

    #[test]
    fn a_jenkins_issuer_defaults_to_the_plugin_s_job_url_and_build_number() {
        let config = Config::parse(&issuer("jenkins", ""), Path::new("")).unwrap();
        assert_eq!(config.issuers[0].job_key.claims, ["sub", "build_number"]);
        assert_eq!(config.issuers[0].identity_claims, ["sub"]);
    }

    #[test]
    fn configured_claims_are_refused_where_the_platform_has_its_own_or_they_identify_nothing() {
        let errs = Config::parse(&issuer("github-actions", "job_key_claims = [\"run_id\"]"), Path::new(""))
            .unwrap_err()
            .join("\n");
        assert!(errs.contains("platform `github-actions` has its own job key"), "{errs}");
        let toml =
            issuer("generic", "job_key_claims = [\"exp\", \"a b\", \"run\", \"run\"]\nidentity_claims = [\"aud\"]");
        let errs = Config::parse(&toml, Path::new("")).unwrap_err().join("\n");
        for needle in
            ["`exp` identifies no job", "`a b` is not a claim name", "`run` is named twice", "`aud` identifies no job"]
        {
            assert!(errs.contains(needle), "missing {needle:?} in {errs}");
        }
        let many: Vec<String> = (0..9).map(|i| format!("\"c{i}\"")).collect();
        let toml = issuer("generic", &format!("job_key_claims = [{}]\nidentity_claims = [\"c0\"]", many.join(", ")));
        let errs = Config::parse(&toml, Path::new("")).unwrap_err().join("\n");
        assert!(errs.contains("job_key_claims: at most 8 claims"), "{errs}");
    }
}
