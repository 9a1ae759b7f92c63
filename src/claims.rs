//! Claims and platforms: the claim set of a verified token, the CI platforms, typed views of
//! GitHub Actions and GitLab CI tokens, and the job key. A leaf: every room reads claims
//! (identity verifies them, policy matches them, mint stamps them, ledger keeps a snapshot), so
//! they live below all of them and import nothing of the crate.
//!
//! GitHub sends every custom claim as a string (ids and booleans too); GitLab sends ids as
//! strings but `runner_id` as a number. The views accept either form for ids and booleans and
//! refuse anything else, so a job key is built from digits only and cannot be forged with `:`.

use serde::Deserialize;
use serde_json::{Map, Value};
use std::fmt;

pub type Claims = Map<String, Value>;

/// A CI platform whose OIDC tokens ephemera understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Platform {
    GithubActions,
    GitlabCi,
    /// Buildkite agents' tokens (`https://agent.buildkite.com`): one issuer shared by every
    /// Buildkite organisation.
    Buildkite,
}

impl Platform {
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::GithubActions => "github-actions",
            Platform::GitlabCi => "gitlab-ci",
            Platform::Buildkite => "buildkite",
        }
    }

    /// Does every token carry a `jti`? Replay protection defaults to on only where it does: a
    /// Buildkite token has none (its `job_id` and a lifetime of minutes bound a replay instead).
    pub fn sends_jti(self) -> bool {
        matches!(self, Platform::GithubActions | Platform::GitlabCi)
    }
}

/// Why a claim set does not fit its platform's view. No variant carries claim values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimError {
    Missing(&'static str),
    BadType(&'static str),
}

impl fmt::Display for ClaimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClaimError::Missing(c) => write!(f, "required claim `{c}` is missing"),
            ClaimError::BadType(c) => write!(f, "claim `{c}` has the wrong type"),
        }
    }
}

/// The text of a scalar claim; arrays, objects and null have none.
pub fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    }
}

/// A GitHub Actions job, as far as ephemera cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GithubClaims {
    pub repository: String,
    pub repository_id: u64,
    pub repository_owner_id: u64,
    pub run_id: u64,
    pub run_attempt: u64,
    /// Absent from some tokens (older runners, GHES); the job key then covers the run attempt.
    pub check_run_id: Option<u64>,
    pub event_name: Option<String>,
    pub git_ref: Option<String>,
    pub ref_protected: Option<bool>,
    pub runner_environment: Option<String>,
    pub actor_id: Option<u64>,
}

/// A GitLab CI job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitlabClaims {
    pub project_id: u64,
    pub project_path: Option<String>,
    pub namespace_id: Option<u64>,
    pub job_id: u64,
    pub pipeline_source: Option<String>,
    pub git_ref: Option<String>,
    pub ref_protected: Option<bool>,
    pub runner_id: Option<u64>,
    pub user_id: Option<u64>,
    /// Differs from `project_id` in fork merge-request pipelines.
    pub job_project_id: Option<u64>,
}

/// A Buildkite job. `organization_id` and `pipeline_id` (UUIDs) are sent only when the job asks
/// for them (`buildkite-agent oidc request-token --claim organization_id,pipeline_id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildkiteClaims {
    pub organization_slug: String,
    pub organization_id: Option<String>,
    pub pipeline_slug: String,
    pub pipeline_id: Option<String>,
    /// A UUID, unique across Buildkite: the job key.
    pub job_id: String,
    pub build_number: Option<u64>,
    pub build_branch: Option<String>,
    pub build_source: Option<String>,
    pub runner_environment: Option<String>,
}

impl BuildkiteClaims {
    pub fn from_claims(c: &Claims) -> Result<Self, ClaimError> {
        Ok(BuildkiteClaims {
            organization_slug: string(c, "organization_slug")?.ok_or(ClaimError::Missing("organization_slug"))?,
            organization_id: uuid(c, "organization_id")?,
            pipeline_slug: string(c, "pipeline_slug")?.ok_or(ClaimError::Missing("pipeline_slug"))?,
            pipeline_id: uuid(c, "pipeline_id")?,
            job_id: uuid(c, "job_id")?.ok_or(ClaimError::Missing("job_id"))?,
            build_number: id(c, "build_number")?,
            build_branch: string(c, "build_branch")?,
            build_source: string(c, "build_source")?,
            runner_environment: string(c, "runner_environment")?,
        })
    }

    /// `buildkite:{job_id}`: a job id is a UUID no other job of any organisation has.
    pub fn job_key(&self) -> String {
        format!("buildkite:{}", self.job_id)
    }
}

/// A UUID claim (hex digits and `-`, 36 characters): what goes into a job key can hold no `:`.
fn uuid(c: &Claims, name: &'static str) -> Result<Option<String>, ClaimError> {
    match string(c, name)? {
        None => Ok(None),
        Some(v) if v.len() == 36 && v.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') => {
            Ok(Some(v.to_ascii_lowercase()))
        }
        Some(_) => Err(ClaimError::BadType(name)),
    }
}

impl GithubClaims {
    pub fn from_claims(c: &Claims) -> Result<Self, ClaimError> {
        Ok(GithubClaims {
            repository: string(c, "repository")?.ok_or(ClaimError::Missing("repository"))?,
            repository_id: id(c, "repository_id")?.ok_or(ClaimError::Missing("repository_id"))?,
            repository_owner_id: id(c, "repository_owner_id")?.ok_or(ClaimError::Missing("repository_owner_id"))?,
            run_id: id(c, "run_id")?.ok_or(ClaimError::Missing("run_id"))?,
            run_attempt: id(c, "run_attempt")?.ok_or(ClaimError::Missing("run_attempt"))?,
            check_run_id: id(c, "check_run_id")?,
            event_name: string(c, "event_name")?,
            git_ref: string(c, "ref")?,
            ref_protected: boolean(c, "ref_protected")?,
            runner_environment: string(c, "runner_environment")?,
            actor_id: id(c, "actor_id")?,
        })
    }

    /// `github:{repository_id}:{run_id}:{run_attempt}:{check_run_id}` (DESIGN §3).
    pub fn job_key(&self) -> String {
        match self.check_run_id {
            Some(check) => format!("github:{}:{}:{}:{check}", self.repository_id, self.run_id, self.run_attempt),
            None => format!("github:{}:{}:{}", self.repository_id, self.run_id, self.run_attempt),
        }
    }
}

impl GitlabClaims {
    pub fn from_claims(c: &Claims) -> Result<Self, ClaimError> {
        Ok(GitlabClaims {
            project_id: id(c, "project_id")?.ok_or(ClaimError::Missing("project_id"))?,
            project_path: string(c, "project_path")?,
            namespace_id: id(c, "namespace_id")?,
            job_id: id(c, "job_id")?.ok_or(ClaimError::Missing("job_id"))?,
            pipeline_source: string(c, "pipeline_source")?,
            git_ref: string(c, "ref")?,
            ref_protected: boolean(c, "ref_protected")?,
            runner_id: id(c, "runner_id")?,
            user_id: id(c, "user_id")?,
            job_project_id: id(c, "job_project_id")?,
        })
    }

    /// `gitlab:{project_id}:{job_id}` (DESIGN §3).
    pub fn job_key(&self) -> String {
        format!("gitlab:{}:{}", self.project_id, self.job_id)
    }
}

/// The job key of a token from `platform`.
pub fn job_key(platform: Platform, claims: &Claims) -> Result<String, ClaimError> {
    Ok(match platform {
        Platform::GithubActions => GithubClaims::from_claims(claims)?.job_key(),
        Platform::GitlabCi => GitlabClaims::from_claims(claims)?.job_key(),
        Platform::Buildkite => BuildkiteClaims::from_claims(claims)?.job_key(),
    })
}

/// A numeric id sent as a string of digits (GitHub, GitLab) or as a JSON integer.
fn id(c: &Claims, name: &'static str) -> Result<Option<u64>, ClaimError> {
    match c.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse().map(Some).map_err(|_| ClaimError::BadType(name))
        }
        Some(Value::Number(n)) => n.as_u64().map(Some).ok_or(ClaimError::BadType(name)),
        Some(_) => Err(ClaimError::BadType(name)),
    }
}

fn string(c: &Claims, name: &'static str) -> Result<Option<String>, ClaimError> {
    match c.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ClaimError::BadType(name)),
    }
}

/// A boolean sent as `"true"`/`"false"` (GitHub) or as a JSON boolean.
fn boolean(c: &Claims, name: &'static str) -> Result<Option<bool>, ClaimError> {
    match c.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::String(s)) if s == "true" => Ok(Some(true)),
        Some(Value::String(s)) if s == "false" => Ok(Some(false)),
        Some(_) => Err(ClaimError::BadType(name)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A claim set from `../shared/fixtures/claims/` (shared with other modules' tests).
    pub(crate) fn fixture(name: &str) -> Claims {
        let path = format!("{}/../shared/fixtures/claims/{name}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn github_environment_deploy_gives_the_design_job_key() {
        let g = GithubClaims::from_claims(&fixture("github-environment-deploy.json")).unwrap();
        assert_eq!(g.job_key(), "github:74:7712340001:2:96193868770");
        assert_eq!(g.ref_protected, Some(true));
        assert_eq!(g.repository_owner_id, 65);
    }

    #[test]
    fn github_token_without_check_run_id_keys_the_run_attempt() {
        let mut c = fixture("github-push-immutable-sub.json");
        c.remove("check_run_id");
        assert_eq!(job_key(Platform::GithubActions, &c).unwrap(), "github:74:32291736541:1");
    }

    #[test]
    fn gitlab_runner_id_is_a_number_and_fork_project_differs() {
        let g = GitlabClaims::from_claims(&fixture("gitlab-fork-merge-request.json")).unwrap();
        assert_eq!(g.runner_id, Some(4));
        assert_eq!(g.job_project_id, Some(21));
        assert_eq!(g.job_key(), "gitlab:20:303");
    }

    #[test]
    fn an_id_with_a_colon_cannot_forge_a_job_key() {
        let mut c = fixture("github-push-immutable-sub.json");
        c.insert("run_id".into(), Value::String("1:2".into()));
        assert!(matches!(job_key(Platform::GithubActions, &c), Err(ClaimError::BadType("run_id"))));
    }

    #[test]
    fn a_buildkite_job_key_is_its_job_uuid_and_a_forged_one_is_refused() {
        let mut c: Claims = serde_json::from_value(serde_json::json!({
            "organization_slug": "acme-inc", "pipeline_slug": "web", "build_number": 7,
            "job_id": "0184990A-477B-4FA8-9968-496074483CEE",
        }))
        .unwrap();
        assert_eq!(job_key(Platform::Buildkite, &c).unwrap(), "buildkite:0184990a-477b-4fa8-9968-496074483cee");
        c.insert("job_id".into(), serde_json::json!("x:github:74:1:1:1:1:1:1:1:1:1:1:1:1:1:1"));
        assert!(matches!(job_key(Platform::Buildkite, &c), Err(ClaimError::BadType("job_id"))));
        c.remove("job_id");
        assert!(matches!(job_key(Platform::Buildkite, &c), Err(ClaimError::Missing("job_id"))));
        assert!(!Platform::Buildkite.sends_jti() && Platform::GithubActions.sends_jti());
    }
}
