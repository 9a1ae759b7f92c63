//! Loading: policy files (or texts already read) → [`Source`]s → a [`PolicySet`], with every
//! error of every file in one list. What loading knows of the broker config is a
//! [`LoadContext`]; what it reports is [`PolicyError`]s. Compiling one source is
//! [`compile`](super::compile::compile)'s.

use super::compile::compile;
use super::{MAX_POLICY_BYTES, PolicySet, lint};
use crate::claims::Platform;
use crate::config::Config;
use crate::names::is_name;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What policy loading needs to know of the broker config.
#[derive(Debug, Clone, Default)]
pub struct LoadContext {
    pub issuers: BTreeMap<String, IssuerFacts>,
    /// Backend name → (kind, max ttl in seconds).
    pub backends: BTreeMap<String, (&'static str, i64)>,
    /// The config's cap on a policy's `renew.max_lease` (`[renew] max_lease`).
    pub renew_max_lease_secs: i64,
}

impl LoadContext {
    pub fn from_config(config: &Config) -> LoadContext {
        LoadContext {
            issuers: config
                .issuers
                .iter()
                .map(|i| {
                    (i.name.clone(), IssuerFacts { platform: i.platform, identity_claims: i.identity_claims.clone() })
                })
                .collect(),
            backends: config.backends.iter().map(|(n, b)| (n.clone(), (b.kind(), b.max_ttl_secs()))).collect(),
            renew_max_lease_secs: config.renew_max_lease_secs,
        }
    }
}

/// What a policy's issuer tells its compiler and its lints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerFacts {
    pub platform: Platform,
    /// A `jenkins` or `generic` issuer's configured `identity_claims`; empty for the others.
    pub identity_claims: Vec<String>,
}

impl From<Platform> for IssuerFacts {
    fn from(platform: Platform) -> IssuerFacts {
        IssuerFacts { platform, identity_claims: Vec::new() }
    }
}

impl IssuerFacts {
    /// The claims a policy of this issuer must bind to an exact value or a list: ids that are never
    /// reused (the platform's, or the ones the issuer's config names).
    pub fn identity_claims(&self) -> Vec<&str> {
        if self.platform.configured_claims() {
            self.identity_claims.iter().map(String::as_str).collect()
        } else {
            self.platform.identity_claims().to_vec()
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

/// One policy file's text: its name (the file stem), where it came from, the YAML.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub file: PathBuf,
    pub text: String,
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

/// The checks [`read_policy_file`] makes of a file, made of sources that did not come from one
/// (admin `POST /v1/policies/diff`): the name, as a file stem's, and the size. A source that
/// fails is an error and is left out.
pub(super) fn check_sources(sources: Vec<Source>, errors: &mut Vec<PolicyError>) -> Vec<Source> {
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
    checked
}

/// `sources`, then the `builtin` (name, YAML) pairs, compiled into one set: a name defined twice
/// is an error, and so is anything [`compile`] finds. Any error in `errors` (from reading) or
/// found here fails the whole set, with every error listed.
pub(super) fn compile_sources(
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
