//! policy: YAML files → compiled, immutable policies; `decide()` → [`Grant`] or [`Denial`].
//! Reads identity's `VerifiedIdentity`; knows backends only as names and kinds from the config.
//! `ephemera policy check` and the server call the same [`PolicySet::load`].

mod decision;
pub mod explain;
mod file;
pub mod lint;
pub mod matcher;
pub mod template;
pub mod testing;

pub use decision::{Denial, DenialReason, Grant, GrantedCredential, ResolvedSpec};
pub use file::policy_schema;

use crate::claims::Claims;
use crate::claims::Platform;
use crate::clock::{UnixSeconds, format_duration, parse_duration};
use crate::config::{Config, IssuerConfig};
use crate::identity::VerifiedIdentity;
use crate::names::is_claim_name;
use crate::names::is_name;
use file::{AwsGrantFile, JwtGrantFile, PolicyFile};
use matcher::Matcher;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use template::{Template, TemplateValue};

/// Claims that identify a repository or project by an id that is never reused. A policy must
/// bind one of its platform's: names (`acme/web`) can be deleted and re-registered by someone
/// else, and another platform's id claim never appears in the token.
pub const IMMUTABLE_CLAIMS: [&str; 4] = ["repository_id", "repository_owner_id", "project_id", "namespace_id"];

fn immutable_claims(platform: Option<Platform>) -> &'static [&'static str] {
    match platform {
        Some(Platform::GithubActions) => &IMMUTABLE_CLAIMS[..2],
        Some(Platform::GitlabCi) => &IMMUTABLE_CLAIMS[2..],
        None => &IMMUTABLE_CLAIMS,
    }
}
/// Claims a broker JWT sets itself; a grant may not override them.
const RESERVED_JWT_CLAIMS: [&str; 9] = ["iss", "sub", "aud", "exp", "nbf", "iat", "jti", "lease_id", "policy"];
const MAX_POLICY_BYTES: u64 = 256 * 1024;

/// What policy loading needs to know of the broker config.
#[derive(Debug, Clone, Default)]
pub struct LoadContext {
    pub issuers: BTreeMap<String, Platform>,
    /// Backend name → (kind, max ttl in seconds).
    pub backends: BTreeMap<String, (&'static str, i64)>,
}

impl LoadContext {
    pub fn from_config(config: &Config) -> LoadContext {
        LoadContext {
            issuers: config.issuers.iter().map(|i| (i.name.clone(), i.platform)).collect(),
            backends: config.backends.iter().map(|(n, b)| (n.clone(), (b.kind(), b.max_ttl_secs()))).collect(),
        }
    }
}

/// One error in one policy file, with the field it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub file: PathBuf,
    pub field: String,
    pub message: String,
    /// The lint rule id `policy check` reports it under: [`lint::INVALID`], or the id of the lint
    /// the load check enforces ([`lint::IMMUTABLE_ID`], [`lint::TTL_ABOVE_BACKEND_MAX`]).
    pub rule: &'static str,
}

impl PolicyError {
    /// An error reported under [`lint::INVALID`].
    pub fn new(file: PathBuf, field: String, message: String) -> PolicyError {
        PolicyError { file, field, message, rule: lint::INVALID }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.field, self.message)
        }
    }
}

// ---- compiled ------------------------------------------------------------------------------

#[derive(Debug)]
pub struct Policy {
    pub name: Arc<str>,
    /// The file it was loaded from (`<built-in NAME>` for built-ins), for lint and reload reports.
    pub source: PathBuf,
    pub description: String,
    pub issuer: String,
    pub match_rules: Vec<Rule>,
    pub deny_rules: Vec<Rule>,
    pub ttl_default_secs: i64,
    pub ttl_max_secs: i64,
    pub grants: Vec<GrantSpec>,
}

#[derive(Debug)]
pub struct Rule {
    pub claim: String,
    pub matcher: Matcher,
}

#[derive(Debug)]
pub struct GrantSpec {
    pub name: String,
    pub backend: String,
    pub spec: CredentialSpec,
}

#[derive(Debug)]
pub enum CredentialSpec {
    Jwt {
        audience: Template,
        claims: Vec<(String, TemplateValue)>,
    },
    Aws {
        role_arn: String,
        session_policy: Option<String>,
        policy_arns: Vec<String>,
        external_id: Option<String>,
        session_tags: Vec<(String, Template)>,
    },
}

/// One policy file's text: its name (the file stem), where it came from, the YAML.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub file: PathBuf,
    pub text: String,
}

/// Every loaded policy, by name. Immutable once built.
#[derive(Debug, Default)]
pub struct PolicySet {
    policies: HashMap<String, Arc<Policy>>,
}

impl PolicySet {
    /// Loads every `*.yaml`/`*.yml` file in `dir` (when given) plus `builtin` (name, YAML)
    /// pairs, and reports every error of every file at once.
    pub fn load(
        dir: Option<&Path>,
        builtin: &[(&str, &str)],
        ctx: &LoadContext,
    ) -> Result<PolicySet, Vec<PolicyError>> {
        let mut errors = Vec::new();
        let mut sources: Vec<Source> = Vec::new();
        if let Some(dir) = dir {
            read_policy_files(dir, &mut sources, &mut errors);
        }
        Self::compile_sources(sources, builtin, ctx, errors)
    }

    /// Like [`PolicySet::load`], from files already read (name, path shown in errors, YAML):
    /// what admin `POST /v1/policies/diff` receives. Names are checked as file stems are.
    pub fn load_sources(
        sources: Vec<Source>,
        builtin: &[(&str, &str)],
        ctx: &LoadContext,
    ) -> Result<PolicySet, Vec<PolicyError>> {
        let mut errors = Vec::new();
        let mut checked = Vec::new();
        for source in sources {
            if !is_name(&source.name) {
                let message = "a policy name must match [a-z0-9][a-z0-9-_]* (it is the file stem)".to_string();
                errors.push(PolicyError::new(source.file, String::new(), message));
            } else if source.text.len() as u64 > MAX_POLICY_BYTES {
                let message = format!("larger than {MAX_POLICY_BYTES} bytes");
                errors.push(PolicyError::new(source.file, String::new(), message));
            } else {
                checked.push(source);
            }
        }
        Self::compile_sources(checked, builtin, ctx, errors)
    }

    fn compile_sources(
        mut sources: Vec<Source>,
        builtin: &[(&str, &str)],
        ctx: &LoadContext,
        mut errors: Vec<PolicyError>,
    ) -> Result<PolicySet, Vec<PolicyError>> {
        for (name, yaml) in builtin {
            sources.push(Source {
                name: (*name).to_string(),
                file: PathBuf::from(format!("<built-in {name}>")),
                text: (*yaml).to_string(),
            });
        }
        let mut policies = HashMap::new();
        for Source { name, file, text } in sources {
            if policies.contains_key(&name) {
                errors.push(PolicyError::new(file, String::new(), format!("a policy named `{name}` is defined twice")));
                continue;
            }
            match compile(&name, &file, &text, ctx) {
                Ok(p) => {
                    policies.insert(name, Arc::new(p));
                }
                Err(mut errs) => errors.append(&mut errs),
            }
        }
        if errors.is_empty() { Ok(PolicySet { policies }) } else { Err(errors) }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Policy>> {
        self.policies.get(name)
    }

    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.policies.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Every policy, in name order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Policy>> {
        let mut all: Vec<&Arc<Policy>> = self.policies.values().collect();
        all.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        all.into_iter()
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The decision (DESIGN §1 step 2): [`PolicySet::decide_claims`] on the verified identity,
    /// then the lease's expiry. Pure: `now` is an argument.
    pub fn decide(
        &self,
        name: &str,
        identity: &VerifiedIdentity,
        requested_ttl: Option<i64>,
        now: UnixSeconds,
    ) -> Result<Grant, Denial> {
        let Allowed { policy, ttl_secs, credentials } =
            self.decide_claims(name, identity.issuer(), identity.claims(), requested_ttl)?;
        // GitLab sets a job token's `exp` to the job timeout: a lease never outlives its job.
        let expires_at = match identity.platform() {
            Platform::GitlabCi => (now + ttl_secs).min(identity.expires_at()),
            Platform::GithubActions => now + ttl_secs,
        };
        Ok(Grant { policy, identity: identity.clone(), ttl_secs, expires_at, credentials })
    }

    /// Everything [`PolicySet::decide`] decides, from an issuer name and a claim set: the named
    /// policy's issuer, deny rules, then every match rule, then the ttl, then the grants'
    /// templates. `ephemera policy test` runs this, so a test passes only if an exchange would.
    pub fn decide_claims(
        &self,
        name: &str,
        issuer: &str,
        claims: &Claims,
        requested_ttl: Option<i64>,
    ) -> Result<Allowed, Denial> {
        // The name is only a map key: no file is opened for it, so `../x` is just an unknown name.
        let policy = self.policies.get(name).ok_or_else(|| Denial::new(name, "iss", DenialReason::UnknownPolicy))?;
        policy.evaluate(issuer, claims)?;
        let ttl_secs = requested_ttl.unwrap_or(policy.ttl_default_secs);
        if ttl_secs > policy.ttl_max_secs {
            // Denied, not clamped: a caller that asked for 2h and silently got 1h would find out
            // the hard way, mid-deploy.
            return Err(Denial::new(
                name,
                "ttl",
                DenialReason::TtlAboveMax { requested: ttl_secs, max: policy.ttl_max_secs },
            ));
        }
        let credentials = policy.grants.iter().map(|g| g.resolve(name, claims)).collect::<Result<Vec<_>, _>>()?;
        Ok(Allowed { policy: policy.name.clone(), ttl_secs, credentials })
    }
}

/// What a policy allows a claim set, before it becomes a [`Grant`] (which also needs the
/// [`VerifiedIdentity`] the claims came from).
#[derive(Debug, Clone)]
pub struct Allowed {
    pub policy: Arc<str>,
    pub ttl_secs: i64,
    /// Every grant's credential, templates resolved.
    pub credentials: Vec<GrantedCredential>,
}

impl Policy {
    /// The configured issuer a claim set comes from when nobody says: the one whose `url` is the
    /// claims' `iss`, else this policy's own (`policy explain`, admin explain, `policy test`).
    pub fn claims_issuer<'a>(&self, claims: &Claims, issuers: impl IntoIterator<Item = &'a IssuerConfig>) -> String {
        let iss = claims.get("iss").and_then(Value::as_str);
        let configured = iss.and_then(|iss| issuers.into_iter().find(|i| i.url == iss));
        configured.map_or_else(|| self.issuer.clone(), |i| i.name.clone())
    }

    /// Issuer, deny rules (any that holds denies), then match rules (all must hold).
    pub fn evaluate(&self, issuer: &str, claims: &Claims) -> Result<(), Denial> {
        if issuer != self.issuer {
            return Err(Denial::new(&self.name, "iss", DenialReason::WrongIssuer));
        }
        if let Some(rule) = self.deny_rules.iter().find(|r| r.matcher.matches(claims.get(&r.claim))) {
            return Err(Denial::new(&self.name, &rule.claim, DenialReason::DenyRule));
        }
        if let Some(rule) = self.match_rules.iter().find(|r| !r.matcher.matches(claims.get(&r.claim))) {
            return Err(Denial::new(&self.name, &rule.claim, DenialReason::MatchFailed));
        }
        Ok(())
    }
}

impl GrantSpec {
    fn resolve(&self, policy: &str, claims: &Claims) -> Result<GrantedCredential, Denial> {
        let missing = |claim: String| {
            Denial::new(policy, &claim, DenialReason::TemplateClaimMissing { grant: self.name.clone() })
        };
        let spec = match &self.spec {
            CredentialSpec::Aws { role_arn, session_policy, policy_arns, external_id, session_tags } => {
                ResolvedSpec::Aws {
                    role_arn: role_arn.clone(),
                    session_policy: session_policy.clone(),
                    policy_arns: policy_arns.clone(),
                    external_id: external_id.clone(),
                    session_tags: session_tags
                        .iter()
                        .map(|(k, t)| Ok((k.clone(), t.render(claims).map_err(missing)?)))
                        .collect::<Result<_, Denial>>()?,
                }
            }
            CredentialSpec::Jwt { audience, claims: extra } => ResolvedSpec::Jwt {
                audience: audience.render(claims).map_err(missing)?,
                claims: extra
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), v.render(claims).map_err(missing)?)))
                    .collect::<Result<_, Denial>>()?,
            },
        };
        Ok(GrantedCredential { name: self.name.clone(), backend: self.backend.clone(), spec })
    }
}

/// Reads every policy file in `dir` into `out`; a file that cannot be read is an error, and
/// reading goes on with the next file.
pub fn read_policy_files(dir: &Path, out: &mut Vec<Source>, errors: &mut Vec<PolicyError>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            let message = format!("cannot read the policies directory: {e}");
            errors.push(PolicyError::new(dir.to_path_buf(), String::new(), message));
            return;
        }
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths {
        let ext = path.extension().and_then(|e| e.to_str());
        if path.is_dir() || !matches!(ext, Some("yaml" | "yml")) {
            continue; // tests/, README.md, schema.json …
        }
        match read_policy_file(&path) {
            Ok((name, text)) => out.push(Source { name, file: path, text }),
            Err(message) => errors.push(PolicyError::new(path, String::new(), message)),
        }
    }
}

fn read_policy_file(path: &Path) -> Result<(String, String), String> {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
    // The file stem is the policy's name, which callers send: keep it to a plain, safe alphabet.
    if !is_name(&stem) {
        return Err("a policy file name must match [a-z0-9][a-z0-9-_]*.yaml (it is the policy's name)".into());
    }
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if meta.len() > MAX_POLICY_BYTES {
        return Err(format!("larger than {MAX_POLICY_BYTES} bytes"));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    Ok((stem, text))
}

/// Parse, don't validate: a file becomes a compiled [`Policy`] or a list of every error in it.
fn compile(name: &str, file: &Path, text: &str, ctx: &LoadContext) -> Result<Policy, Vec<PolicyError>> {
    let mut errors = Vec::new();
    let mut err = |field: String, message: String| errors.push(PolicyError::new(file.to_path_buf(), field, message));
    // Errors that are also lints, under the lint's rule id (pushed to `errors` at the end).
    let mut lint_errors = Vec::new();
    let raw: PolicyFile = match file::parse_yaml(text) {
        Ok(raw) => raw,
        Err(e) => {
            err(String::new(), e);
            return Err(errors);
        }
    };
    if !ctx.issuers.contains_key(&raw.issuer) {
        err(
            "issuer".into(),
            format!("`{}` is not an issuer in the broker config (known: {})", raw.issuer, join(ctx.issuers.keys())),
        );
    }
    let mut rules = |section: &str, map: &BTreeMap<String, Value>| -> Vec<Rule> {
        let mut out = Vec::new();
        for (claim, value) in map {
            let field = format!("{section}.{claim}");
            if !is_claim_name(claim) {
                err(field.clone(), "not a claim name".into());
            }
            match Matcher::parse(value) {
                Ok(matcher) => out.push(Rule { claim: claim.clone(), matcher }),
                Err(e) => err(field, e),
            }
        }
        out
    };
    let match_rules = rules("match", &raw.match_rules);
    let deny_rules = rules("deny", &raw.deny);
    let immutable = immutable_claims(ctx.issuers.get(&raw.issuer).copied());
    if !match_rules.iter().any(|r| immutable.contains(&r.claim.as_str()) && r.matcher.is_binding()) {
        lint_errors.push(PolicyError {
            file: file.to_path_buf(),
            field: "match".into(),
            message: format!(
                "binds no immutable identity claim: add an exact value or list for one of {} (names like `repository` can be re-registered by someone else)",
                immutable.join(", ")
            ),
            rule: lint::IMMUTABLE_ID,
        });
    }
    let ttl_default_secs = parse_duration(&raw.ttl.default).unwrap_or_else(|e| {
        err("ttl.default".into(), e);
        0
    });
    let ttl_max_secs = parse_duration(&raw.ttl.max).unwrap_or_else(|e| {
        err("ttl.max".into(), e);
        0
    });
    if ttl_default_secs > ttl_max_secs {
        err("ttl.default".into(), "is above ttl.max".into());
    }
    if raw.grants.is_empty() {
        err("grants".into(), "a policy must grant at least one credential".into());
    }
    let mut grants = Vec::new();
    for (grant_name, value) in &raw.grants {
        let field = format!("grants.{grant_name}");
        if !is_name(grant_name) {
            err(field.clone(), "a grant name must match [a-z0-9][a-z0-9-_]*".into());
        }
        if let Some(message) = ttl_above_backend_max(value, ctx, ttl_max_secs) {
            let rule = lint::TTL_ABOVE_BACKEND_MAX;
            lint_errors.push(PolicyError { file: file.to_path_buf(), field: field.clone(), message, rule });
        }
        match compile_grant(grant_name, value, ctx) {
            Ok(g) => grants.push(g),
            Err(list) => list
                .into_iter()
                .for_each(|(sub, m)| err(if sub.is_empty() { field.clone() } else { format!("{field}.{sub}") }, m)),
        }
    }
    errors.append(&mut lint_errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Policy {
        name: Arc::from(name),
        source: file.to_path_buf(),
        description: raw.description,
        issuer: raw.issuer,
        match_rules,
        deny_rules,
        ttl_default_secs,
        ttl_max_secs,
        grants,
    })
}

fn compile_grant(name: &str, value: &Value, ctx: &LoadContext) -> Result<GrantSpec, Vec<(String, String)>> {
    let backend = value.get("backend").and_then(Value::as_str).ok_or_else(|| {
        vec![("backend".to_string(), "required: the name of a backend from the broker config".to_string())]
    })?;
    let Some((kind, _)) = ctx.backends.get(backend) else {
        return Err(vec![(
            "backend".into(),
            format!("`{backend}` is not a backend in the broker config (known: {})", join(ctx.backends.keys())),
        )]);
    };
    let mut errors = Vec::new();
    let spec = match *kind {
        "jwt" => match serde_json::from_value::<JwtGrantFile>(value.clone()) {
            Ok(file) => compile_jwt_grant(file, &mut errors),
            Err(e) => {
                errors.push((String::new(), e.to_string()));
                None
            }
        },
        "aws" => match serde_json::from_value::<AwsGrantFile>(value.clone()) {
            Ok(file) => compile_aws_grant(file, &mut errors),
            Err(e) => {
                errors.push((String::new(), e.to_string()));
                None
            }
        },
        other => {
            errors.push(("backend".into(), format!("backend kind `{other}` has no grant fields defined")));
            None
        }
    };
    match spec {
        Some(spec) if errors.is_empty() => Ok(GrantSpec { name: name.to_string(), backend: backend.to_string(), spec }),
        _ => Err(errors),
    }
}

/// A grant's ttl ceiling is its backend's: a policy cannot promise a lease the backend will not
/// honour (or, for AWS, one STS would cut short).
fn ttl_above_backend_max(grant: &Value, ctx: &LoadContext, ttl_max: i64) -> Option<String> {
    let backend = grant.get("backend").and_then(Value::as_str)?;
    let (_, backend_max) = ctx.backends.get(backend)?;
    (ttl_max > *backend_max).then(|| {
        format!(
            "ttl.max {} is above backend `{backend}`'s max_ttl {}",
            format_duration(ttl_max),
            format_duration(*backend_max)
        )
    })
}

fn compile_jwt_grant(file: JwtGrantFile, errors: &mut Vec<(String, String)>) -> Option<CredentialSpec> {
    let audience = Template::parse(&file.audience).map_err(|e| errors.push(("audience".into(), e))).ok();
    if file.audience.is_empty() {
        errors.push(("audience".into(), "must not be empty".into()));
    }
    let mut claims = Vec::new();
    for (k, v) in &file.claims {
        if RESERVED_JWT_CLAIMS.contains(&k.as_str()) {
            errors.push((format!("claims.{k}"), "is set by the broker and cannot be overridden".into()));
            continue;
        }
        match TemplateValue::parse(v) {
            Ok(t) => claims.push((k.clone(), t)),
            Err(e) => errors.push((format!("claims.{k}"), e)),
        }
    }
    Some(CredentialSpec::Jwt { audience: audience?, claims })
}

/// An `aws` grant, checked against the limits AWS would otherwise enforce (or, with moto in
/// tests and some private endpoints, silently not): the format rules live in `aws_format`,
/// pure functions with no client behind them.
fn compile_aws_grant(file: AwsGrantFile, errors: &mut Vec<(String, String)>) -> Option<CredentialSpec> {
    use crate::aws_format as rules;
    let mut err = |field: &str, e: String| errors.push((field.to_string(), e));
    if let Err(e) = rules::check_role_arn(&file.role_arn) {
        err("role_arn", e);
    }
    let session_policy = match file.session_policy.as_ref().map(rules::pack_session_policy) {
        Some(Ok(packed)) => Some(packed),
        Some(Err(e)) => {
            err("session_policy", e);
            None
        }
        None => None,
    };
    if let Err(e) = rules::check_policy_arns(&file.policy_arns) {
        err("policy_arns", e);
    }
    if file.session_tags.len() > rules::MAX_SESSION_TAGS {
        err("session_tags", format!("at most {} session tags", rules::MAX_SESSION_TAGS));
    }
    let keys: Vec<&str> = file.session_tags.keys().map(String::as_str).collect();
    if let Err(e) = rules::check_tag_keys_unique(&keys) {
        err("session_tags", e);
    }
    let mut session_tags = Vec::new();
    for (key, value) in &file.session_tags {
        if let Err(e) = rules::check_tag_key(key) {
            err(&format!("session_tags.{key}"), e);
        }
        match Template::parse(value) {
            Ok(t) => session_tags.push((key.clone(), t)),
            Err(e) => err(&format!("session_tags.{key}"), e),
        }
    }
    if file.external_id.as_ref().is_some_and(|x| x.len() < 2 || x.len() > 1224) {
        err("external_id", "must be 2 to 1,224 characters".into());
    }
    Some(CredentialSpec::Aws {
        role_arn: file.role_arn,
        session_policy,
        policy_arns: file.policy_arns,
        external_id: file.external_id,
        session_tags,
    })
}

fn join<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let list: Vec<&str> = names.map(String::as_str).collect();
    if list.is_empty() { "none".into() } else { list.join(", ") }
}
