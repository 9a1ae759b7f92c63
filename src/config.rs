//! The broker config: TOML → validated [`Config`]. Unknown keys are errors; every validation
//! error is reported at once; secrets live in files, never inline.

use crate::claims::Platform;
use crate::clock::parse_duration;
use crate::names::is_name;
use crate::secret::SecretString;
use jsonwebtoken::Algorithm;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
const MAX_LEEWAY_SECS: i64 = 60;

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// `iss` of broker-signed JWTs and the default audience of CI tokens.
    pub public_url: String,
    pub policies_dir: PathBuf,
    pub data_dir: PathBuf,
    pub issuers: Vec<IssuerConfig>,
    pub backends: BTreeMap<String, BackendConfig>,
    pub reap_interval_secs: i64,
    /// The journal is compacted once this many bytes were appended since the last compaction.
    pub compact_bytes: u64,
    /// SHA-256 of the admin bearer token; admin endpoints are off without it.
    pub admin_token_sha256: Option<[u8; 32]>,
    /// Platform webhooks; each is off unless its secret is configured.
    pub hooks: HooksConfig,
    /// Poll the policies directory for changes this often (`None`: only SIGHUP reloads).
    pub reload_watch_secs: Option<i64>,
    /// The audit sink; without it, exchanges are audited to nowhere (a warning at start).
    pub audit: Option<AuditConfig>,
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
    pub max_ttl_secs: i64,
}

impl BackendConfig {
    /// The default `jwt` backend: a key generated into the data directory.
    pub fn default_jwt() -> BackendConfig {
        BackendConfig::Jwt(JwtBackendConfig {
            signing_key_file: PathBuf::from("keys/jwt.pk8"),
            previous_signing_key_files: Vec::new(),
            max_ttl_secs: 3600,
        })
    }

    pub fn kind(&self) -> &'static str {
        match self {
            BackendConfig::Jwt(_) => "jwt",
            BackendConfig::Aws(_) => "aws",
        }
    }

    pub fn max_ttl_secs(&self) -> i64 {
        match self {
            BackendConfig::Jwt(j) => j.max_ttl_secs,
            BackendConfig::Aws(a) => a.max_ttl_secs,
        }
    }
}

// ---- the file as written -------------------------------------------------------------------

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    public_url: Option<String>,
    policies: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    #[serde(default)]
    issuers: Vec<RawIssuer>,
    #[serde(default)]
    backends: BTreeMap<String, RawBackend>,
    #[serde(default)]
    ledger: RawLedger,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    hooks: RawHooks,
    #[serde(default)]
    reload: RawReload,
    audit: Option<RawAudit>,
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
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLedger {
    reap_interval: Option<String>,
    compact_bytes: Option<u64>,
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
    github_issuer: Option<String>,
    gitlab_issuer: Option<String>,
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
        let raw: RawConfig = toml::from_str(text).map_err(|e| vec![e.to_string().trim_end().to_string()])?;
        raw.validate(base)
    }

    /// No config file: policies in `./policies`, the public GitHub and GitLab issuers, a `jwt`
    /// backend — so `policy check` works in a policy repository with no config at all.
    pub fn defaults() -> Config {
        let raw = RawConfig {
            issuers: vec![
                default_issuer("github", Platform::GithubActions, "https://token.actions.githubusercontent.com"),
                default_issuer("gitlab", Platform::GitlabCi, "https://gitlab.com"),
            ],
            ..RawConfig::default()
        };
        // Invariant: the built-in defaults are valid (tested by `defaults_are_valid`).
        #[allow(clippy::expect_used)]
        raw.validate(Path::new("")).expect("built-in defaults are valid")
    }
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
    }
}

/// Collects every validation error instead of stopping at the first.
#[derive(Default)]
struct Errors(Vec<String>);

impl Errors {
    fn duration(&mut self, field: &str, value: Option<&str>, default: i64) -> i64 {
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
        let issuers = self.validate_issuers(&public_url, base, &mut errs);
        let hooks = self.hooks.validate(&issuers, base, &mut errs);
        let backends = self.validate_backends(base, &mut errs);
        let reap_interval_secs = errs.duration("ledger.reap_interval", self.ledger.reap_interval.as_deref(), 5);
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
        let audit = self.audit.map(|a| AuditConfig {
            file: base.join(a.file),
            claims: a.claims.unwrap_or_else(|| DEFAULT_AUDIT_CLAIMS.iter().map(|c| (*c).to_string()).collect()),
        });
        if let Some(bad) = audit.iter().flat_map(|a| &a.claims).find(|c| !crate::names::is_claim_name(c)) {
            errs.0.push(format!("audit.claims: `{}` is not a claim name", crate::clock::truncate(bad, 40)));
        }
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
            reap_interval_secs,
            compact_bytes: self.ledger.compact_bytes.unwrap_or(64 * 1024 * 1024),
            admin_token_sha256,
            hooks,
            reload_watch_secs,
            audit,
        })
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
            out.push(IssuerConfig {
                name: raw.name.clone(),
                platform: raw.platform,
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
                replay_protection: raw.replay_protection.unwrap_or(true),
            });
        }
        out
    }

    fn validate_backends(&self, base: &Path, errs: &mut Errors) -> BTreeMap<String, BackendConfig> {
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
            };
            out.insert(name.clone(), backend);
        }
        out
    }
}

impl RawHooks {
    fn validate(&self, issuers: &[IssuerConfig], base: &Path, errs: &mut Errors) -> HooksConfig {
        let github = (self.github_secret_file.as_deref(), "github_secret_file");
        let gitlab = (self.gitlab_token_file.as_deref(), "gitlab_token_file");
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
        }
    }
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

impl HooksConfig {
    /// Reads each enabled hook's secret from its file. The server calls this at start and refuses
    /// to start on an error, so a broken file stops the start, not the first delivery.
    pub fn load_secrets(&mut self) -> Result<(), Vec<String>> {
        let mut errs = Vec::new();
        for (hook, field) in [(&mut self.github, "github_secret_file"), (&mut self.gitlab, "gitlab_token_file")] {
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
    fn defaults_are_valid() {
        let c = Config::defaults();
        assert_eq!(c.issuers.len(), 2);
        assert!(c.backends.contains_key("jwt"));
        assert_eq!(c.policies_dir, PathBuf::from("policies"));
    }

    #[test]
    fn the_annotated_example_config_parses() {
        let text = include_str!("../docs/ephemera.example.toml");
        let c = Config::parse(text, Path::new("/etc/ephemera")).unwrap();
        assert_eq!(c.issuers.len(), 2);
        assert_eq!(c.issuers[1].max_token_lifetime_secs, 3 * 3600);
        assert_eq!(c.policies_dir, PathBuf::from("/etc/ephemera/policies"));
        assert!(c.backends.contains_key("internal-jwt") && !c.backends.contains_key("jwt"));
        assert!(c.admin_token_sha256.is_some());
    }

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
