//! `serve --dev`: an in-process development OIDC issuer, like `vault server -dev`.
//!
//! It stands in for an issuer of every platform, at `{broker}/dev/github`, `{broker}/dev/gitlab`,
//! `{broker}/dev/buildkite` and so on ([`DEV_ISSUERS`]), and for an identity provider of AI
//! agents (`{broker}/dev/agents`, a `generic` issuer keyed by `sub`), serving discovery
//! and JWKS over HTTP like a real issuer, so the broker verifies dev tokens through exactly the
//! code path it uses for real ones. Loopback only.

use crate::claims::{JobKeyRule, Platform};
use crate::clock::UnixSeconds;
use crate::config::IssuerConfig;
use crate::ids::{b64url, random};
use crate::mint::jwt::JwtSigner;
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value, json};
use std::path::Path;

/// The built-in `dev` policy: the default `ephemera dev token` satisfies it and gets a broker
/// JWT named `api`.
pub const DEV_POLICY: &str = r#"
description: Development policy. The default `ephemera dev token` satisfies it and gets a broker JWT named `api`.
issuer: github
match:
  repository_id: "100001"
  ref: refs/heads/main
deny:
  event_name: [pull_request, pull_request_target, workflow_run]
  runner_environment: self-hosted
ttl: {default: 15m, max: 1h}
grants:
  api:
    backend: jwt
    audience: https://api.dev.ephemera.invalid
    claims:
      scope: dev
      repository: "${repository}"
      ref: "${ref}"
# Token exchange (POST /oauth/token): the default `ephemera dev token --issuer agents` is the
# assistant, which may get tokens for the dev tool server on the job's behalf.
actors:
  assistant:
    issuer: agents
    match: {sub: "spiffe://dev.ephemera.invalid/agent/assistant"}
tools:
  mcp:
    resource: https://mcp.dev.ephemera.invalid
    backend: jwt
    scopes: ["repo:read", "repo:write"]
    data: [own-repo]
data:
  own-repo: {repositories: ["${repository}"]}
"#;

/// The `sub` of the default dev agent token (`ephemera dev token --issuer agents`).
pub const DEV_AGENT: &str = "spiffe://dev.ephemera.invalid/agent/assistant";

/// How long dev tokens live: long enough for the README walkthrough.
const DEV_TOKEN_SECS: i64 = 600;

pub struct DevIssuer {
    signer: JwtSigner,
    base_url: String,
}

impl DevIssuer {
    /// Loads (or creates) the dev issuer's ES256 key in `data_dir`, so a restart with the same
    /// `--data-dir` keeps issuing tokens the broker still trusts.
    pub fn load_or_generate(data_dir: &Path, base_url: &str) -> Result<DevIssuer, String> {
        let signer = JwtSigner::load_or_generate(&data_dir.join("dev-issuer.pk8"), base_url)?;
        Ok(DevIssuer { signer, base_url: base_url.trim_end_matches('/').to_string() })
    }

    /// The platform of the stand-in issuer `name` (`/dev/{name}`).
    pub fn platform_named(&self, name: &str) -> Option<Platform> {
        DEV_ISSUERS.iter().find(|(n, _)| *n == name).map(|(_, p)| *p)
    }

    pub fn issuer_names(&self) -> Vec<&'static str> {
        DEV_ISSUERS.iter().map(|(n, _)| *n).collect()
    }

    pub fn issuer_url(&self, platform: Platform) -> String {
        format!("{}/dev/{}", self.base_url, dev_issuer_name(platform))
    }

    /// The stand-in issuers, configured like real ones (pinned ES256, fetched over HTTP).
    pub fn issuer_configs(&self, audience: &str) -> Vec<IssuerConfig> {
        DEV_ISSUERS
            .into_iter()
            .map(|(name, platform)| {
                // As a config file without `job_key_claims`/`identity_claims` gets them; the
                // agents' issuer names each agent by its `sub` (a SPIFFE ID).
                let (job_key_claims, identity_claims) = match platform {
                    Platform::Generic => (&["sub"][..], &["sub"][..]),
                    other => other.default_configured_claims(),
                };
                IssuerConfig {
                    name: name.into(),
                    platform,
                    job_key: JobKeyRule { platform, claims: job_key_claims.to_vec() },
                    identity_claims: identity_claims.iter().map(|c| c.to_string()).collect(),
                    url: self.issuer_url(platform),
                    audiences: vec![audience.to_string()],
                    algorithms: vec![Algorithm::ES256],
                    max_token_lifetime_secs: 3600,
                    leeway_secs: 30,
                    jwks_file: None,
                    jwks_url: None,
                    jwks_refresh_secs: 900,
                    unknown_kid_cooldown_secs: 60,
                    fetch_timeout_secs: 5,
                    replay_protection: platform.sends_jti(),
                }
            })
            .collect()
    }

    pub fn discovery(&self, platform: Platform) -> Value {
        let iss = self.issuer_url(platform);
        json!({
            "issuer": iss,
            "jwks_uri": format!("{iss}/jwks"),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
        })
    }

    pub fn jwks(&self) -> Value {
        json!({"keys": [self.signer.public_jwk()]})
    }

    /// A token for the default dev job, with `overrides` laid over the default claims. The
    /// issuer always sets `iss`, `aud`, `iat`, `nbf`, `exp` and `jti` itself.
    pub fn token(
        &self,
        platform: Platform,
        audience: &str,
        overrides: Option<&Map<String, Value>>,
        now: UnixSeconds,
    ) -> Result<String, String> {
        let mut claims = match platform {
            Platform::GithubActions => default_github_claims(),
            Platform::GitlabCi => default_gitlab_claims(),
            Platform::Buildkite => default_buildkite_claims(),
            // The claim fixtures shaped like each platform's real tokens (their README cites
            // the platforms' pages).
            Platform::Circleci => fixture(include_str!("../../policies/tests/claims/circleci-main-deploy.json")),
            Platform::AzurePipelines => fixture(include_str!("../../policies/tests/claims/azure-pipelines-run.json")),
            Platform::Bitbucket => fixture(include_str!("../../policies/tests/claims/bitbucket-deployment-step.json")),
            Platform::Jenkins => fixture(include_str!("../../policies/tests/claims/jenkins-folder-build.json")),
            Platform::Generic => json!({"sub": DEV_AGENT}).as_object().cloned().unwrap_or_default(),
        };
        if let Some(extra) = overrides {
            for (k, v) in extra {
                claims.insert(k.clone(), v.clone());
            }
        }
        for (k, v) in [
            ("iss", json!(self.issuer_url(platform))),
            ("aud", json!(audience)),
            ("iat", json!(now)),
            ("nbf", json!(now)),
            ("exp", json!(now + DEV_TOKEN_SECS)),
            ("jti", json!(b64url(&random::<16>()))),
        ] {
            claims.insert(k.into(), v);
        }
        self.signer.sign(&claims)
    }
}

/// The stand-in issuers: `{broker}/dev/{name}`, one per platform; the `generic` one issues
/// agents' identity tokens (actor tokens at `POST /oauth/token`).
const DEV_ISSUERS: [(&str, Platform); 8] = [
    ("github", Platform::GithubActions),
    ("gitlab", Platform::GitlabCi),
    ("buildkite", Platform::Buildkite),
    ("circleci", Platform::Circleci),
    ("azure-pipelines", Platform::AzurePipelines),
    ("bitbucket", Platform::Bitbucket),
    ("jenkins", Platform::Jenkins),
    ("agents", Platform::Generic),
];

/// The stand-in issuer of `platform`.
fn dev_issuer_name(platform: Platform) -> &'static str {
    DEV_ISSUERS.iter().find(|(_, p)| *p == platform).map_or("none", |(name, _)| name)
}

/// A built-in claim fixture, less the claims the dev issuer sets itself.
fn fixture(text: &str) -> Map<String, Value> {
    let mut claims: Map<String, Value> = serde_json::from_str(text).unwrap_or_default();
    for k in ["iss", "aud", "iat", "nbf", "exp", "jti"] {
        claims.remove(k);
    }
    claims
}

fn default_github_claims() -> Map<String, Value> {
    let v = json!({
        "sub": "repo:ephemera-dev/demo:ref:refs/heads/main",
        "actor": "dev", "actor_id": "100002",
        "base_ref": "", "head_ref": "",
        "check_run_id": "1", "event_name": "push",
        "job_workflow_ref": "ephemera-dev/demo/.github/workflows/deploy.yml@refs/heads/main",
        "ref": "refs/heads/main", "ref_protected": "true", "ref_type": "branch",
        "repository": "ephemera-dev/demo", "repository_id": "100001",
        "repository_owner": "ephemera-dev", "repository_owner_id": "100000",
        "repository_visibility": "private",
        "run_attempt": "1", "run_id": "1", "run_number": "1",
        "runner_environment": "github-hosted",
        "sha": "0000000000000000000000000000000000000000",
        "workflow": "deploy", "workflow_ref": "ephemera-dev/demo/.github/workflows/deploy.yml@refs/heads/main",
    });
    v.as_object().cloned().unwrap_or_default()
}

/// A Buildkite job's claims, shaped like `buildkite-agent oidc request-token --claim
/// organization_id,pipeline_id` gives them (buildkite.com/docs/agent/v3/cli-oidc).
fn default_buildkite_claims() -> Map<String, Value> {
    let v = json!({
        "sub": "organization:ephemera-dev:pipeline:demo:ref:refs/heads/main:commit:0000000000000000000000000000000000000000:step:deploy",
        "organization_slug": "ephemera-dev", "organization_id": "0190a1b2-0000-4000-8000-000000000001",
        "pipeline_slug": "demo", "pipeline_id": "0190a1b2-0000-4000-8000-000000000002",
        "build_number": 1, "build_branch": "main", "build_tag": null,
        "build_commit": "0000000000000000000000000000000000000000", "build_source": "ui",
        "step_key": "deploy", "job_id": "0190a1b2-0000-4000-8000-000000000003",
        "agent_id": "0190a1b2-0000-4000-8000-000000000004", "runner_environment": "buildkite-hosted",
    });
    v.as_object().cloned().unwrap_or_default()
}

fn default_gitlab_claims() -> Map<String, Value> {
    let v = json!({
        "sub": "project_path:ephemera-dev/demo:ref_type:branch:ref:main",
        "namespace_id": "200000", "namespace_path": "ephemera-dev",
        "project_id": "200001", "project_path": "ephemera-dev/demo",
        "user_id": "200002", "user_login": "dev",
        "pipeline_id": "1", "pipeline_source": "push", "job_id": "1",
        "ref": "main", "ref_type": "branch", "ref_path": "refs/heads/main", "ref_protected": "true",
        "runner_id": 1, "runner_environment": "gitlab-hosted",
        "sha": "0000000000000000000000000000000000000000",
        "project_visibility": "private",
        "job_project_id": "200001", "job_project_path": "ephemera-dev/demo",
    });
    v.as_object().cloned().unwrap_or_default()
}
