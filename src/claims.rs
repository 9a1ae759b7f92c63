//! Claims and platforms: the claim set of a verified token, the CI platforms, typed views of
//! each platform's tokens, and the job key. A leaf: every room reads claims
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

/// A CI platform whose OIDC tokens ephemera understands (docs/platforms.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Platform {
    GithubActions,
    GitlabCi,
    /// Buildkite agents' tokens (`https://agent.buildkite.com`): one issuer shared by every
    /// Buildkite organisation.
    Buildkite,
    /// CircleCI jobs' `$CIRCLE_OIDC_TOKEN_V2` (`https://oidc.circleci.com/org/<org id>`).
    Circleci,
    /// Azure Pipelines' pipeline tokens (`https://vstoken.dev.azure.com/<org id>`), asked for
    /// without a service connection.
    AzurePipelines,
    /// Bitbucket Pipelines steps' `$BITBUCKET_STEP_OIDC_TOKEN` (one issuer per workspace).
    Bitbucket,
    /// Jenkins' OpenID Connect Provider plugin: claim templates are the controller's to choose,
    /// so the issuer's config names the job-key claims.
    Jenkins,
    /// Any other OIDC issuer: the config names the job-key and the identity claims.
    Generic,
}

impl Platform {
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::GithubActions => "github-actions",
            Platform::GitlabCi => "gitlab-ci",
            Platform::Buildkite => "buildkite",
            Platform::Circleci => "circleci",
            Platform::AzurePipelines => "azure-pipelines",
            Platform::Bitbucket => "bitbucket",
            Platform::Jenkins => "jenkins",
            Platform::Generic => "generic",
        }
    }

    /// Does the issuer's config name the job-key claims (`job_key_claims`) and the identity
    /// claims a policy must bind (`identity_claims`)? Only where the platform lets the operator
    /// choose the claim set.
    pub fn configured_claims(self) -> bool {
        matches!(self, Platform::Jenkins | Platform::Generic)
    }

    /// Does every token carry a `jti`? Replay protection defaults to on only where it does: a
    /// Buildkite token has none (its `job_id` and a lifetime of minutes bound a replay instead),
    /// nor do CircleCI's, Bitbucket's or the Jenkins plugin's.
    pub fn sends_jti(self) -> bool {
        matches!(self, Platform::GithubActions | Platform::GitlabCi | Platform::AzurePipelines)
    }

    /// The `job_key_claims` and `identity_claims` an issuer of this platform has when its config
    /// names none. Jenkins': the OpenID Connect Provider plugin's default build claim templates,
    /// `sub` = `${JOB_URL}` and `build_number` = `${BUILD_NUMBER}`, so a build is its job's URL and
    /// number, and a policy binds the job's URL (the plugin sends no id that survives a rename;
    /// the issuer, a controller or a folder, is the boundary). Empty for every other platform.
    pub fn default_configured_claims(self) -> (&'static [&'static str], &'static [&'static str]) {
        match self {
            Platform::Jenkins => (&["sub", "build_number"], &["sub"]),
            _ => (&[], &[]),
        }
    }

    /// The claims a policy must bind to an exact value or a list (ids never reused), for the
    /// platforms that have them; a `jenkins` or `generic` issuer's config names its own.
    pub fn identity_claims(self) -> &'static [&'static str] {
        match self {
            Platform::GithubActions => &["repository_id", "repository_owner_id"],
            Platform::GitlabCi => &["project_id", "namespace_id"],
            // The issuer is shared by every organisation: the ids also pin the organisation.
            Platform::Buildkite => &["organization_id", "pipeline_id"],
            // The issuer is the organisation's (its UUID is in the URL).
            Platform::Circleci => &[CIRCLECI_PROJECT_ID, CIRCLECI_PIPELINE_DEFINITION_ID],
            // The issuer is the organisation's; a definition id is unique only in its project.
            Platform::AzurePipelines => &["prj_id"],
            // The issuer names the workspace by its slug, which can be renamed and taken again.
            Platform::Bitbucket => &["workspaceUuid", "repositoryUuid"],
            Platform::Jenkins | Platform::Generic => &[],
        }
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

/// Is `json` a JSON object (leading whitespace aside)? serde reads a struct from an object, and
/// also from an array of all its fields in order: a JWKS `[[key, …]]` as `{"keys": [key, …]}`.
/// A JOSE header and a JWT's claims (RFC 7519 §7.2: "a completely valid JSON object"), a JWKS
/// (RFC 7517 §5), a webhook body and a request body are objects, so the array form is refused
/// before serde sees it: nothing should parse that its own spec says is not there.
pub fn is_json_object(json: &[u8]) -> bool {
    json.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

/// Why [`from_json_body`] refused a body.
#[derive(Debug)]
pub enum BodyError {
    /// Not well-formed JSON, or a field missing or of the wrong type.
    Json(serde_json::Error),
    /// Well-formed JSON, but not an object (see [`is_json_object`]).
    NotAnObject,
}

/// A request or webhook body into `T`: a JSON object, where an empty or all-whitespace body
/// reads as `{}` (so a `T` with only optional fields takes no body at all).
pub fn from_json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, BodyError> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) { b"{}" } else { body };
    if !is_json_object(body) {
        // Which of the two: broken JSON is told as such, wherever it breaks.
        return match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
            Ok(_) => Err(BodyError::NotAnObject),
            Err(e) => Err(BodyError::Json(e)),
        };
    }
    serde_json::from_slice(body).map_err(BodyError::Json)
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

pub const CIRCLECI_PROJECT_ID: &str = "oidc.circleci.com/project-id";
pub const CIRCLECI_PIPELINE_DEFINITION_ID: &str = "oidc.circleci.com/pipeline-definition-id";
pub const CIRCLECI_JOB_ID: &str = "oidc.circleci.com/job-id";
/// `true` when a person re-ran the job with SSH access: they hold a shell in it.
pub const CIRCLECI_SSH_RERUN: &str = "oidc.circleci.com/ssh-rerun";

/// A CircleCI job (`$CIRCLE_OIDC_TOKEN_V2`). The issuer is the organisation's. `job-id` came to
/// the tokens in 2025; a token without it names no job, and is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CircleciClaims {
    pub project_id: String,
    pub pipeline_definition_id: Option<String>,
    /// A UUID per job run: the job key.
    pub job_id: String,
    pub ssh_rerun: Option<bool>,
}

impl CircleciClaims {
    pub fn from_claims(c: &Claims) -> Result<Self, ClaimError> {
        Ok(CircleciClaims {
            project_id: uuid(c, CIRCLECI_PROJECT_ID)?.ok_or(ClaimError::Missing(CIRCLECI_PROJECT_ID))?,
            pipeline_definition_id: uuid(c, CIRCLECI_PIPELINE_DEFINITION_ID)?,
            job_id: uuid(c, CIRCLECI_JOB_ID)?.ok_or(ClaimError::Missing(CIRCLECI_JOB_ID))?,
            ssh_rerun: boolean(c, CIRCLECI_SSH_RERUN)?,
        })
    }

    /// `circleci:{job-id}`.
    pub fn job_key(&self) -> String {
        format!("circleci:{}", self.job_id)
    }
}

/// An Azure Pipelines run: the pipeline's own token (`$SYSTEM_OIDCREQUESTURI` asked without a
/// `serviceConnectionId`). A service-connection token names only the connection (`sc://…`, by
/// name) and no run, so it has no job key and is refused for want of `run_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AzurePipelinesClaims {
    pub org_id: String,
    pub prj_id: String,
    pub def_id: Option<u64>,
    /// The build (run) id. Azure names no job: the run is the finest scope a token shows.
    pub run_id: u64,
}

impl AzurePipelinesClaims {
    pub fn from_claims(c: &Claims) -> Result<Self, ClaimError> {
        Ok(AzurePipelinesClaims {
            org_id: uuid(c, "org_id")?.ok_or(ClaimError::Missing("org_id"))?,
            prj_id: uuid(c, "prj_id")?.ok_or(ClaimError::Missing("prj_id"))?,
            def_id: id(c, "def_id")?,
            run_id: id(c, "run_id")?.ok_or(ClaimError::Missing("run_id"))?,
        })
    }

    /// `azure-pipelines:{org_id}:{run_id}`: run ids count per organisation.
    pub fn job_key(&self) -> String {
        format!("azure-pipelines:{}:{}", self.org_id, self.run_id)
    }
}

/// A Bitbucket Pipelines step (`$BITBUCKET_STEP_OIDC_TOKEN`). Its UUIDs come in braces
/// (`{2b4d…}`); `sub` holds the step's UUID, so it changes with every run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitbucketClaims {
    pub workspace_uuid: String,
    pub repository_uuid: String,
    /// The job key: a step of one run.
    pub step_uuid: String,
    pub deployment_environment_uuid: Option<String>,
    pub branch_name: Option<String>,
}

impl BitbucketClaims {
    pub fn from_claims(c: &Claims) -> Result<Self, ClaimError> {
        let braced = |name: &'static str| -> Result<Option<String>, ClaimError> {
            match string(c, name)? {
                None => Ok(None),
                Some(v) => match v.strip_prefix('{').and_then(|v| v.strip_suffix('}')) {
                    Some(inner) if is_uuid(inner) => Ok(Some(inner.to_ascii_lowercase())),
                    _ => Err(ClaimError::BadType(name)),
                },
            }
        };
        Ok(BitbucketClaims {
            workspace_uuid: braced("workspaceUuid")?.ok_or(ClaimError::Missing("workspaceUuid"))?,
            repository_uuid: braced("repositoryUuid")?.ok_or(ClaimError::Missing("repositoryUuid"))?,
            step_uuid: braced("stepUuid")?.ok_or(ClaimError::Missing("stepUuid"))?,
            deployment_environment_uuid: braced("deploymentEnvironmentUuid")?,
            branch_name: string(c, "branchName")?,
        })
    }

    /// `bitbucket:{stepUuid}` (without the braces).
    pub fn job_key(&self) -> String {
        format!("bitbucket:{}", self.step_uuid)
    }
}

fn is_uuid(v: &str) -> bool {
    v.len() == 36 && v.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// A UUID claim (hex digits and `-`, 36 characters): what goes into a job key can hold no `:`.
fn uuid(c: &Claims, name: &'static str) -> Result<Option<String>, ClaimError> {
    match string(c, name)? {
        None => Ok(None),
        Some(v) if is_uuid(&v) => Ok(Some(v.to_ascii_lowercase())),
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

/// How an issuer's tokens name their job: the platform's own rule, or, for a `jenkins` or
/// `generic` issuer, the claims its config names (`job_key_claims`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobKeyRule {
    pub platform: Platform,
    /// Empty for the platforms with a rule of their own.
    pub claims: Vec<&'static str>,
}

impl JobKeyRule {
    pub fn of(platform: Platform) -> JobKeyRule {
        JobKeyRule { platform, claims: Vec::new() }
    }

    /// The job key of a verified token's claims.
    pub fn job_key(&self, claims: &Claims) -> Result<String, ClaimError> {
        Ok(match self.platform {
            Platform::GithubActions => GithubClaims::from_claims(claims)?.job_key(),
            Platform::GitlabCi => GitlabClaims::from_claims(claims)?.job_key(),
            Platform::Buildkite => BuildkiteClaims::from_claims(claims)?.job_key(),
            Platform::Circleci => CircleciClaims::from_claims(claims)?.job_key(),
            Platform::AzurePipelines => AzurePipelinesClaims::from_claims(claims)?.job_key(),
            Platform::Bitbucket => BitbucketClaims::from_claims(claims)?.job_key(),
            Platform::Jenkins | Platform::Generic => configured_job_key(self.platform, &self.claims, claims)?,
        })
    }
}

/// The job key of a token from `platform`, for the platforms with a rule of their own.
pub fn job_key(platform: Platform, claims: &Claims) -> Result<String, ClaimError> {
    JobKeyRule::of(platform).job_key(claims)
}

/// At most this many bytes of one claim value go into a configured job key.
const MAX_JOB_CLAIM_BYTES: usize = 512;

/// `<platform>:<value>:<value>…` of the configured claims. Every byte but `[A-Za-z0-9._~/-]` of a
/// value is percent-encoded: a value holding `:` (a URL, `a:b`) cannot pose as two values and
/// collide with another job's key.
fn configured_job_key(platform: Platform, names: &[&'static str], c: &Claims) -> Result<String, ClaimError> {
    const KEEP: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'.').remove(b'_').remove(b'~').remove(b'/').remove(b'-');
    if names.is_empty() {
        return Err(ClaimError::Missing("job_key_claims"));
    }
    let mut key = platform.as_str().to_string();
    for &name in names {
        let text = match c.get(name) {
            None | Some(Value::Null) => return Err(ClaimError::Missing(name)),
            Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_JOB_CLAIM_BYTES => s.clone(),
            Some(Value::Number(n)) if n.is_u64() || n.is_i64() => n.to_string(),
            Some(_) => return Err(ClaimError::BadType(name)),
        };
        key.push(':');
        key.extend(percent_encoding::utf8_percent_encode(&text, KEEP));
    }
    Ok(key)
}

/// A claim name from the config, for the life of the process. Names are few and a config is read
/// once (tests read many; each distinct name is kept once), and a [`ClaimError`] can name them.
pub fn intern(name: &str) -> &'static str {
    static NAMES: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&known) = names.iter().find(|&&n| n == name) {
        return known;
    }
    let leaked: &'static str = Box::leak(name.to_string().into_boxed_str());
    names.push(leaked);
    leaked
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

    #[test]
    fn a_generic_job_key_joins_the_configured_claims_and_a_colon_cannot_forge_one() {
        let rule = JobKeyRule { platform: Platform::Generic, claims: vec![intern("project"), intern("run")] };
        let mut c: Claims = serde_json::from_value(serde_json::json!({"project": "a", "run": 7})).unwrap();
        assert_eq!(rule.job_key(&c).unwrap(), "generic:a:7");
        // "a:7" + "" would read as the key above if `:` were kept.
        c.insert("project".into(), serde_json::json!("a:7"));
        c.insert("run".into(), serde_json::json!("https://ci.example/job/1/"));
        assert_eq!(rule.job_key(&c).unwrap(), "generic:a%3A7:https%3A//ci.example/job/1/");
        c.insert("run".into(), serde_json::json!(["7"]));
        assert_eq!(rule.job_key(&c), Err(ClaimError::BadType("run")));
        c.insert("run".into(), serde_json::json!(""));
        assert_eq!(rule.job_key(&c), Err(ClaimError::BadType("run")));
        c.remove("run");
        assert_eq!(rule.job_key(&c), Err(ClaimError::Missing("run")));
        assert!(std::ptr::eq(intern("run"), intern(&String::from("run"))));
    }

    /// A claim set from `policies/tests/claims/` (shaped like each platform's real tokens).
    fn platform_fixture(name: &str) -> Claims {
        let path = format!("{}/policies/tests/claims/{name}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn a_circleci_job_key_is_its_job_id_and_a_token_without_one_is_refused() {
        let mut c = platform_fixture("circleci-main-deploy.json");
        let view = CircleciClaims::from_claims(&c).unwrap();
        assert_eq!(view.ssh_rerun, Some(false));
        assert_eq!(job_key(Platform::Circleci, &c).unwrap(), "circleci:0b6e2f4a-8c1d-4e3f-a5b7-9c0d1e2f3a4b");
        c.insert(CIRCLECI_SSH_RERUN.into(), serde_json::json!("yes"));
        assert_eq!(job_key(Platform::Circleci, &c), Err(ClaimError::BadType(CIRCLECI_SSH_RERUN)));
        c.remove(CIRCLECI_SSH_RERUN);
        // Tokens from before 2025 (and CircleCI Server's) name no job.
        c.remove(CIRCLECI_JOB_ID);
        assert_eq!(job_key(Platform::Circleci, &c), Err(ClaimError::Missing(CIRCLECI_JOB_ID)));
    }

    #[test]
    fn an_azure_job_key_is_the_run_and_a_service_connection_token_has_none() {
        let c = platform_fixture("azure-pipelines-run.json");
        assert_eq!(
            job_key(Platform::AzurePipelines, &c).unwrap(),
            "azure-pipelines:4e7a1c9b-2d3f-4b5a-8e6c-0f1a2b3c4d5e:1187"
        );
        assert_eq!(AzurePipelinesClaims::from_claims(&c).unwrap().def_id, Some(42));
        let sc = platform_fixture("azure-pipelines-service-connection.json");
        assert_eq!(job_key(Platform::AzurePipelines, &sc), Err(ClaimError::Missing("org_id")));
        assert!(Platform::AzurePipelines.sends_jti() && sc.contains_key("jti"));
    }

    #[test]
    fn a_bitbucket_job_key_is_the_step_without_braces_and_bare_uuids_are_refused() {
        let mut c = platform_fixture("bitbucket-deployment-step.json");
        assert_eq!(job_key(Platform::Bitbucket, &c).unwrap(), "bitbucket:e1d2c3b4-a5f6-4e7d-8c9b-0a1f2e3d4c5b");
        let view = BitbucketClaims::from_claims(&c).unwrap();
        assert_eq!(view.deployment_environment_uuid.as_deref(), Some("9c8b7a6f-5e4d-4c3b-a2f1-0e9d8c7b6a5f"));
        c.insert("stepUuid".into(), serde_json::json!("e1d2c3b4-a5f6-4e7d-8c9b-0a1f2e3d4c5b"));
        assert_eq!(job_key(Platform::Bitbucket, &c), Err(ClaimError::BadType("stepUuid")));
        c.insert("stepUuid".into(), serde_json::json!("{e1d2c3b4:github:1:1:1:1:1:1:1:1:1:1:1}"));
        assert_eq!(job_key(Platform::Bitbucket, &c), Err(ClaimError::BadType("stepUuid")));
    }

    #[test]
    fn a_jenkins_job_key_is_the_job_url_and_build_number() {
        let c = platform_fixture("jenkins-folder-build.json");
        let rule = JobKeyRule { platform: Platform::Jenkins, claims: vec!["sub", "build_number"] };
        assert_eq!(
            rule.job_key(&c).unwrap(),
            "jenkins:https%3A//jenkins.example.com/job/platform/job/web-deploy/job/main/:1042"
        );
        assert!(!Platform::Jenkins.sends_jti() && !c.contains_key("jti"));
    }
}
