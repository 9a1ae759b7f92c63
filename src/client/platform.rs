//! The job's ID token, found the way its CI platform hands it over, for `ephemera exchange` and
//! `revoke` when no token is given (`EPHEMERA_ID_TOKEN` unset). Every error names what is
//! missing and how to give it; none carries a token.

use super::{Failure, http_client};
use serde::Deserialize;
use std::time::Duration;

/// How long a platform's token helper or token endpoint may take (`buildkite-agent oidc
/// request-token` and Azure's `SYSTEM_OIDCREQUESTURI` call the platform's API).
const PLATFORM_TOKEN_TIMEOUT: Duration = Duration::from_secs(30);
/// The Azure DevOps REST API version of the OIDC token request.
const AZURE_API_VERSION: &str = "7.1";

/// The token of the CI platform this runs in, asked the way the platform hands it over, for
/// `audience` (the broker's URL, the audience brokers accept by default):
/// - Buildkite (`BUILDKITE_AGENT_ACCESS_TOKEN` set): `buildkite-agent oidc request-token
///   --audience AUD --claim organization_id,pipeline_id` (the ids a Buildkite policy must pin);
/// - CircleCI: `$CIRCLE_OIDC_TOKEN_V2` (its audience is the organisation's id, always);
/// - Azure Pipelines (`SYSTEM_OIDCREQUESTURI` set): the pipeline's own token, `POST
///   $SYSTEM_OIDCREQUESTURI?api-version=7.1` with `$SYSTEM_ACCESSTOKEN` (no service connection:
///   the pipeline token names the run, a connection's does not);
/// - Bitbucket Pipelines: `$BITBUCKET_STEP_OIDC_TOKEN` (a step with `oidc: true`).
///
/// Jenkins hands a token only through a credentials binding the job names; elsewhere too the
/// error says which variable was looked for.
pub async fn platform_token(audience: &str) -> Result<String, Failure> {
    let set = |var: &str| std::env::var_os(var).is_some_and(|v| !v.is_empty());
    if set("BUILDKITE_AGENT_ACCESS_TOKEN") {
        let args = ["oidc", "request-token", "--audience", audience, "--claim", "organization_id,pipeline_id"];
        return helper_token("buildkite-agent", &args).await;
    }
    if set("CIRCLECI") || set("CIRCLE_OIDC_TOKEN_V2") {
        return env_token(
            "CIRCLE_OIDC_TOKEN_V2",
            "in a CircleCI job, CIRCLE_OIDC_TOKEN_V2 is not set: CircleCI gives OIDC tokens to jobs that use a \
             context (and to a fork's pull request only when passing secrets to forks is on)",
        );
    }
    if set("SYSTEM_OIDCREQUESTURI") {
        return azure_token().await;
    }
    if set("BITBUCKET_BUILD_NUMBER") || set("BITBUCKET_STEP_OIDC_TOKEN") {
        return env_token(
            "BITBUCKET_STEP_OIDC_TOKEN",
            "in a Bitbucket Pipelines step, BITBUCKET_STEP_OIDC_TOKEN is not set: add `oidc: true` to the step",
        );
    }
    if set("JENKINS_URL") {
        return Err(Failure::other(
            "no ID token: in a Jenkins build, EPHEMERA_ID_TOKEN is not set: bind the \"OpenID Connect id token\" \
             credential to it, e.g. withCredentials([string(credentialsId: 'ephemera-id-token', variable: \
             'EPHEMERA_ID_TOKEN')])",
        ));
    }
    if set("TF_BUILD") {
        return Err(Failure::other(
            "no ID token: in Azure Pipelines, SYSTEM_OIDCREQUESTURI is not set (an agent too old for OIDC, or a \
             classic release); pass --token-env VAR or --token-file F",
        ));
    }
    Err(Failure::other(format!(
        "no ID token: environment variable {} is not set, and this is no job of a platform the CLI asks by \
         itself (Buildkite: BUILDKITE_AGENT_ACCESS_TOKEN, CircleCI: CIRCLE_OIDC_TOKEN_V2, Azure Pipelines: \
         SYSTEM_OIDCREQUESTURI, Bitbucket: BITBUCKET_STEP_OIDC_TOKEN); pass --token-env VAR or --token-file F",
        super::DEFAULT_TOKEN_ENV
    )))
}

/// A token a platform put in the environment; `missing` when it did not.
fn env_token(var: &str, missing: &str) -> Result<String, Failure> {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => one_token(v.trim(), &format!("environment variable {var}")),
        _ => Err(Failure::other(format!("no ID token: {missing}"))),
    }
}

fn one_token(token: &str, from: &str) -> Result<String, Failure> {
    if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Failure::other(format!("no ID token: {from} holds no single token")));
    }
    Ok(token.to_string())
}

#[derive(Deserialize)]
struct AzureReply {
    #[serde(rename = "oidcToken")]
    oidc_token: Option<String>,
}

/// Azure Pipelines: the pipeline's ID token from the agent's request URI. The job's access
/// token authorises the request; it is mapped into a step's environment only on request.
async fn azure_token() -> Result<String, Failure> {
    let uri = std::env::var("SYSTEM_OIDCREQUESTURI").unwrap_or_default();
    let mut url = url::Url::parse(&uri)
        .map_err(|e| Failure::other(format!("no ID token: SYSTEM_OIDCREQUESTURI is not a URL: {e}")))?;
    // Attack: a job's environment variable pointing the request (with the access token) at a
    // server of someone else's over plain HTTP. Plain HTTP only to this machine.
    let loopback = matches!(url.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"));
    if url.scheme() != "https" && !(url.scheme() == "http" && loopback) {
        return Err(Failure::other("no ID token: SYSTEM_OIDCREQUESTURI is not an https URL"));
    }
    let access = std::env::var("SYSTEM_ACCESSTOKEN").ok().filter(|t| !t.trim().is_empty()).ok_or_else(|| {
        Failure::other(
            "no ID token: in Azure Pipelines, SYSTEM_ACCESSTOKEN is not set: map it into the step with \
             `env: SYSTEM_ACCESSTOKEN: $(System.AccessToken)`",
        )
    })?;
    url.query_pairs_mut().append_pair("api-version", AZURE_API_VERSION);
    let request = http_client()?
        .post(url)
        .bearer_auth(access.trim())
        .header("Content-Type", "application/json")
        // Without it Azure DevOps answers a bad token with a redirect to its sign-in page.
        .header("X-TFS-FedAuthRedirect", "Suppress")
        .body("");
    let what = "the Azure Pipelines OIDC token request (SYSTEM_OIDCREQUESTURI)";
    let resp = match tokio::time::timeout(PLATFORM_TOKEN_TIMEOUT, request.send()).await {
        Err(_) => return Err(Failure::other(format!("no ID token: {what} did not answer within 30 s"))),
        Ok(Err(e)) => return Err(Failure::other(format!("no ID token: {what} failed: {e}"))),
        Ok(Ok(resp)) => resp,
    };
    let status = resp.status();
    if !status.is_success() {
        let hint = match status.as_u16() {
            401 | 403 => ": SYSTEM_ACCESSTOKEN was refused (is it the job's $(System.AccessToken)?)",
            _ => "",
        };
        return Err(Failure::other(format!("no ID token: {what} answered {status}{hint}")));
    }
    let body = resp.bytes().await.map_err(|e| Failure::other(format!("no ID token: {what}: {e}")))?;
    let reply: AzureReply = serde_json::from_slice(&body)
        .map_err(|_| Failure::other(format!("no ID token: {what} answered no JSON with `oidcToken`")))?;
    let token =
        reply.oidc_token.ok_or_else(|| Failure::other(format!("no ID token: {what} answered no `oidcToken`")))?;
    one_token(token.trim(), what)
}

/// The one-line token a platform's helper program prints. Its stderr's first line (never
/// stdout, which is the token) goes into the error when it fails.
async fn helper_token(program: &str, args: &[&str]) -> Result<String, Failure> {
    let what = format!("{program} {}", args[..2].join(" "));
    let run = tokio::process::Command::new(program).args(args).stdin(std::process::Stdio::null()).output();
    let out = match tokio::time::timeout(PLATFORM_TOKEN_TIMEOUT, run).await {
        Err(_) => return Err(Failure::other(format!("no ID token: `{what}` did not answer within 30 s"))),
        Ok(Err(e)) => return Err(Failure::other(format!("no ID token: cannot run `{what}`: {e}"))),
        Ok(Ok(out)) => out,
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let first = stderr.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("no message");
        return Err(Failure::other(format!(
            "no ID token: `{what}` failed ({}): {}",
            out.status,
            crate::clock::truncate(first, 200)
        )));
    }
    let token =
        String::from_utf8(out.stdout).map_err(|_| Failure::other(format!("no ID token: `{what}` printed no text")))?;
    one_token(token.trim(), &format!("the output of `{what}`"))
}
