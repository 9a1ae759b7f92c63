//! The client side of the broker, for deployment scripts: `ephemera exchange` and
//! `ephemera revoke` (DESIGN §5, docs/cli.md), and for renewable leases (issue 15) the lease file
//! `exchange --lease-file` writes, which `ephemera credential-process` and `ephemera token` renew
//! from.
//!
//! Every failure is a [`Failure`] carrying the process exit code ([`EXIT_DENIED`],
//! [`EXIT_INVALID_TOKEN`], [`EXIT_UNREACHABLE`], [`EXIT_OTHER`]) and a one-line message that
//! never contains the caller's token.

mod platform;

use crate::env_format::env_vars;
pub use platform::platform_token;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Anything not covered by the codes below (bad reply, missing token, no `aws` credential, …).
pub const EXIT_OTHER: u8 = 1;
/// Usage errors: clap's own exit code.
pub const EXIT_USAGE: u8 = 2;
/// The policy denied the exchange (403 `policy_denied`).
pub const EXIT_DENIED: u8 = 3;
/// The broker refused the token (401).
pub const EXIT_INVALID_TOKEN: u8 = 4;
/// The broker could not be reached, or answered 5xx or 429: worth retrying later.
pub const EXIT_UNREACHABLE: u8 = 5;

/// The environment variable `--token-env` reads by default.
pub const DEFAULT_TOKEN_ENV: &str = "EPHEMERA_ID_TOKEN";

/// One request's bound, connect included.
const TIMEOUT: Duration = Duration::from_secs(30);
/// How much of a non-JSON error body goes into a message.
const BODY_EXCERPT: usize = 200;

/// A failed command: its exit code and the message for stderr (without the `ephemera: ` prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub exit: u8,
    pub message: String,
}

impl Failure {
    pub(crate) fn other(message: impl Into<String>) -> Failure {
        Failure { exit: EXIT_OTHER, message: message.into() }
    }
}

/// Where the caller's OIDC ID token comes from.
#[derive(Debug, Clone)]
pub enum TokenSource {
    Env(String),
    File(PathBuf),
}

impl TokenSource {
    /// The job's ID token for `audience`: from the environment variable or file, or, when the
    /// default variable is unset, asked of the CI platform the way it hands tokens over
    /// ([`platform_token`]). The error names the source and what is missing, never the content.
    pub async fn job_token(&self, audience: &str) -> Result<String, Failure> {
        if let TokenSource::Env(var) = self
            && var == DEFAULT_TOKEN_ENV
            && std::env::var_os(var).is_none()
        {
            return platform_token(audience).await;
        }
        self.read()
    }

    /// The token, trimmed. The error names the source, never the content.
    pub fn read(&self) -> Result<String, Failure> {
        let (token, from) = match self {
            TokenSource::Env(var) => {
                let value = std::env::var(var).map_err(|_| {
                    Failure::other(format!("no ID token: environment variable {var} is not set (or not UTF-8)"))
                })?;
                (value, format!("environment variable {var}"))
            }
            TokenSource::File(path) => {
                let value = std::fs::read_to_string(path)
                    .map_err(|e| Failure::other(format!("no ID token: cannot read {}: {e}", path.display())))?;
                (value, path.display().to_string())
            }
        };
        let token = token.trim();
        if token.is_empty() {
            return Err(Failure::other(format!("no ID token: {from} is empty")));
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Failure::other(format!("no ID token: {from} holds more than one word")));
        }
        Ok(token.to_string())
    }
}

/// `--format` of `ephemera exchange`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Env,
    CredentialProcess,
    GithubEnv,
    GitCredential,
}

impl Format {
    pub fn parse(text: &str) -> Result<Format, String> {
        match text {
            "json" => Ok(Format::Json),
            "env" => Ok(Format::Env),
            "credential-process" => Ok(Format::CredentialProcess),
            "github-env" => Ok(Format::GithubEnv),
            "git-credential" => Ok(Format::GitCredential),
            other => Err(format!("`{other}` is not one of json, env, credential-process, github-env, git-credential")),
        }
    }
}

/// A broker base URL, checked: `http` or `https`, no query, no trailing slash.
fn base_url(broker: &str) -> Result<String, Failure> {
    let url = url::Url::parse(broker).map_err(|e| Failure::other(format!("--broker `{broker}`: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.query().is_some() || url.fragment().is_some() {
        return Err(Failure::other(format!("--broker `{broker}`: expected http(s)://host[:port][/path]")));
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

pub(crate) fn http_client() -> Result<reqwest::Client, Failure> {
    crate::identity::provider::install_crypto();
    reqwest::Client::builder()
        .timeout(TIMEOUT)
        // A redirect would carry the job's token somewhere the caller did not name.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("ephemera-cli/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| Failure::other(format!("cannot build the HTTP client: {e}")))
}

/// POSTs `body` with the bearer token; returns the body text of a 2xx reply, else the failure
/// the broker's error JSON (or the transport) describes.
async fn post(url: &str, token: &str, body: &Value, accept: &str) -> Result<String, Failure> {
    let (status, header_id, text) = send(url, token, body, accept).await?;
    if status.is_success() {
        return Ok(text);
    }
    Err(failure(status, header_id, &text, url, token))
}

/// POSTs `body` with the bearer token: the status, the `x-request-id` header and the body text,
/// whatever the status; only a transport failure is a [`Failure`] (worth retrying).
async fn send(
    url: &str,
    token: &str,
    body: &Value,
    accept: &str,
) -> Result<(reqwest::StatusCode, Option<String>, String), Failure> {
    let unreachable = |what: &str, e: &reqwest::Error| Failure {
        exit: EXIT_UNREACHABLE,
        message: format!("unreachable: {url}{what}: {}", error_chain(e)),
    };
    let resp = http_client()?
        .post(url)
        .bearer_auth(token)
        .header(reqwest::header::ACCEPT, accept)
        .json(body)
        .send()
        .await
        .map_err(|e| unreachable("", &e))?;
    let status = resp.status();
    let header_id = resp.headers().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_string);
    let text = resp.text().await.map_err(|e| unreachable(": reading the reply", &e))?;
    Ok((status, header_id, text))
}

/// The failure a non-2xx reply describes (the broker's error JSON, or an excerpt of the body).
fn failure(status: reqwest::StatusCode, header_id: Option<String>, text: &str, url: &str, token: &str) -> Failure {
    let exit = match status.as_u16() {
        403 => EXIT_DENIED,
        401 => EXIT_INVALID_TOKEN,
        429 | 500..=599 => EXIT_UNREACHABLE,
        _ => EXIT_OTHER,
    };
    let parsed: Option<Value> = serde_json::from_str(text).ok();
    let error = parsed.as_ref().and_then(|v| v.get("error"));
    let field = |k: &str| error.and_then(|e| e.get(k)).and_then(Value::as_str).map(str::to_string);
    let request_id = field("request_id").or(header_id).unwrap_or_else(|| "unknown".into());
    let message = match (field("code"), field("message")) {
        (Some(code), Some(message)) => format!("{code}: {message} (request {request_id})"),
        _ => {
            let excerpt: String = text.trim().chars().take(BODY_EXCERPT).collect();
            format!("http_{}: {url} answered {status}: {excerpt} (request {request_id})", status.as_u16())
        }
    };
    // The broker never echoes the token; a proxy in between might. Belt and braces.
    Failure { exit, message: message.replace(token, "<token>") }
}

/// `ephemera policy diff`: sends the policy files of `dir` (the candidate set, whole) to admin
/// `POST /v1/policies/diff` and prints the live leases rolling them out would end. Exit 0 when
/// the candidate is valid (whatever it would end), 1 when the broker would refuse it.
pub async fn policy_diff(
    broker: &str,
    dir: &std::path::Path,
    admin: &TokenSource,
    json_out: bool,
) -> Result<String, Failure> {
    let url = format!("{}/v1/policies/diff", base_url(broker)?);
    let token = admin.read().map_err(|f| Failure::other(f.message.replace("no ID token", "no admin token")))?;
    let mut sources = Vec::new();
    let mut errors = Vec::new();
    crate::policy::read_policy_files(dir, &mut sources, &mut errors);
    if let Some(e) = errors.first() {
        return Err(Failure::other(e.to_string()));
    }
    let policies: serde_json::Map<String, Value> = sources.into_iter().map(|s| (s.name, json!(s.text))).collect();
    let (status, header_id, text) = send(&url, &token, &json!({"policies": policies}), "application/json").await?;
    if !(status.is_success() || status.as_u16() == 422) {
        return Err(failure(status, header_id, &text, &url, &token));
    }
    let reply: Value =
        serde_json::from_str(&text).map_err(|e| Failure::other(format!("the broker's diff reply is not JSON: {e}")))?;
    if json_out {
        return match reply["valid"] == true {
            true => Ok(with_newline(text)),
            false => Err(Failure::other(format!("the broker would refuse this policy set: {text}"))),
        };
    }
    render_diff(&reply, dir)
}

fn render_diff(reply: &Value, dir: &std::path::Path) -> Result<String, Failure> {
    let list = |k: &str| reply.get(k).and_then(Value::as_array).cloned().unwrap_or_default();
    if reply["valid"] != true {
        let errors: Vec<String> = list("errors").iter().filter_map(Value::as_str).map(|e| format!("  {e}")).collect();
        return Err(Failure::other(format!(
            "the broker would refuse the policies in {} ({} error(s)); nothing would change:\n{}",
            dir.display(),
            errors.len(),
            errors.join("\n")
        )));
    }
    let ending = list("would_end");
    let mut out = match ending.len() {
        0 => format!("rolling out {} ends no live lease\n", dir.display()),
        n => format!("rolling out {} would end {n} live lease(s) (reason policy-changed):\n", dir.display()),
    };
    for e in &ending {
        let field = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
        out.push_str(&format!(
            "  {}  policy {}  job {}  {}\n",
            field("lease_id"),
            field("policy"),
            field("job"),
            field("reason")
        ));
    }
    Ok(out)
}

/// `e: cause: cause`, so "connection refused" is not hidden behind "error sending request".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// `ephemera exchange`: the text to print on stdout. With `lease_file`, a renewable lease is
/// also written there (mode 0600) for `credential-process` and `token` to renew from.
pub async fn exchange(request: &ExchangeArgs<'_>, format: Format) -> Result<String, Failure> {
    let ExchangeArgs { broker, policy, token, ttl, lease_file, ssh_public_key } = *request;
    let base = base_url(broker)?;
    let url = format!("{base}/v1/exchange");
    let token = token.job_token(&base).await?;
    let mut body = json!({"policy": policy});
    if let Some(ttl) = ttl {
        body["ttl"] = json!(ttl);
    }
    if let Some(path) = ssh_public_key {
        body["ssh_public_key"] = json!(read_public_key(path)?);
    }
    // The env format is the broker's own (one implementation of the quoting rules); a lease
    // file needs the JSON reply, rendered here with the same function.
    let accept = if format == Format::Env && lease_file.is_none() { "text/plain" } else { "application/json" };
    let text = post(&url, &token, &body, accept).await?;
    if accept == "text/plain" {
        return Ok(with_newline(text));
    }
    let reply: Value = serde_json::from_str(&text)
        .map_err(|e| Failure::other(format!("the broker's exchange reply is not JSON: {e}")))?;
    if let Some(path) = lease_file {
        LeaseFile::from_reply(&base, &reply)?.write(path)?;
    }
    render(format, text, &reply)
}

fn render(format: Format, text: String, reply: &Value) -> Result<String, Failure> {
    match format {
        Format::Json => Ok(with_newline(text)),
        Format::Env => Ok(crate::env_format::render(reply)),
        Format::CredentialProcess => credential_process(reply),
        Format::GithubEnv => github_env(reply),
        Format::GitCredential => git_credential(reply),
    }
}

/// A renewable lease, as `exchange --lease-file` writes it: where to renew it and the renew
/// token (a secret: the file is created 0600, and never printed).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseFile {
    pub broker: String,
    pub lease_id: String,
    pub policy: String,
    pub renew_token: String,
    pub until: String,
}

impl LeaseFile {
    fn from_reply(broker: &str, reply: &Value) -> Result<LeaseFile, Failure> {
        let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let policy = text(reply, "policy").unwrap_or_default();
        let Some(renew) = reply.get("renew") else {
            return Err(Failure::other(format!(
                "--lease-file: policy `{policy}` does not make leases renewable (no `renew` in it); the \
                 lease was issued, and ends with its credentials"
            )));
        };
        let missing = |k: &str| Failure::other(format!("--lease-file: the broker's reply has no `{k}`"));
        Ok(LeaseFile {
            broker: broker.to_string(),
            lease_id: text(reply, "lease_id").ok_or_else(|| missing("lease_id"))?,
            policy,
            renew_token: text(renew, "token").ok_or_else(|| missing("renew.token"))?,
            until: text(renew, "until").ok_or_else(|| missing("renew.until"))?,
        })
    }

    /// Written whole or not at all: a new file (0600) beside `path`, then renamed over it.
    fn write(&self, path: &Path) -> Result<(), Failure> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let fail = |e: std::io::Error| Failure::other(format!("--lease-file {}: {e}", path.display()));
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let bytes = serde_json::to_vec(self).map_err(|e| Failure::other(format!("--lease-file: {e}")))?;
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(fail)?;
        f.write_all(&bytes).and_then(|()| f.sync_all()).map_err(fail)?;
        std::fs::rename(&tmp, path).map_err(fail)
    }

    fn read(path: &Path) -> Result<LeaseFile, Failure> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Failure::other(format!("--lease-file {}: {e}", path.display())))?;
        // The parse error names the line and column only, never the file's text (a secret).
        serde_json::from_str(&text).map_err(|e| {
            Failure::other(format!(
                "--lease-file {}: not a lease file (line {}, column {})",
                path.display(),
                e.line(),
                e.column()
            ))
        })
    }
}

/// Renews the lease of `lease_file` (`POST /v1/leases/{id}/renew`): its reply, in the exchange
/// reply's shape.
async fn renew(lease_file: &Path) -> Result<Value, Failure> {
    let lease = LeaseFile::read(lease_file)?;
    let base = base_url(&lease.broker)?;
    let id: String = lease.lease_id.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
    let url = format!("{base}/v1/leases/{id}/renew");
    let text = post(&url, &lease.renew_token, &json!({}), "application/json").await?;
    serde_json::from_str(&text).map_err(|e| Failure::other(format!("the broker's renewal reply is not JSON: {e}")))
}

/// `ephemera credential-process --lease-file F`: a fresh AWS session of the lease, as the AWS
/// CLI and SDKs read it from a profile's `credential_process` (they run it again when it expires).
pub async fn credential_process_renewed(lease_file: &Path) -> Result<String, Failure> {
    credential_process(&renew(lease_file).await?)
}

/// `ephemera token --lease-file F --credential NAME`: the named credential of a fresh renewal,
/// its `token` field alone (a broker JWT), or the whole credential as JSON for other kinds.
pub async fn token(lease_file: &Path, credential: &str) -> Result<String, Failure> {
    let reply = renew(lease_file).await?;
    let Some(cred) = reply.get("credentials").and_then(|c| c.get(credential)) else {
        let names: Vec<&str> = reply
            .get("credentials")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .map(|(n, _)| n.as_str())
            .collect();
        return Err(Failure::other(format!(
            "token: the lease has no credential `{}` (it has: {})",
            crate::clock::truncate(credential, 64),
            names.join(", ")
        )));
    };
    match cred.get("token").and_then(Value::as_str) {
        Some(token) => Ok(format!("{token}\n")),
        None => Ok(format!("{cred}\n")),
    }
}

/// What `ephemera exchange` sends.
#[derive(Clone, Copy)]
pub struct ExchangeArgs<'a> {
    pub broker: &'a str,
    pub policy: &'a str,
    pub token: &'a TokenSource,
    pub ttl: Option<&'a str>,
    /// Also write the lease's renewal details here.
    pub lease_file: Option<&'a Path>,
    /// An `ssh` grant certifies this key (an OpenSSH `.pub` file) instead of a generated one.
    pub ssh_public_key: Option<&'a Path>,
}

/// The one line of an OpenSSH public key file (the broker checks the key itself). A private key
/// given by mistake is refused here, before it leaves the machine.
fn read_public_key(path: &Path) -> Result<String, Failure> {
    let text = std::fs::read_to_string(path).map_err(|e| Failure::other(format!("{}: {e}", path.display())))?;
    if text.contains("PRIVATE KEY") {
        return Err(Failure::other(format!(
            "{}: this is a private key; pass the public one (the `.pub` file)",
            path.display()
        )));
    }
    let line = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#')).unwrap_or_default();
    if line.is_empty() || line.len() > 8 * 1024 {
        return Err(Failure::other(format!("{}: not an OpenSSH public key line", path.display())));
    }
    Ok(line.to_string())
}

/// `ephemera revoke`: the broker's JSON reply.
pub async fn revoke(broker: &str, lease: Option<&str>, token: &TokenSource) -> Result<String, Failure> {
    let base = base_url(broker)?;
    let url = format!("{base}/v1/revoke");
    let token = token.job_token(&base).await?;
    let body = match lease {
        Some(id) => json!({"lease_id": id}),
        None => json!({}),
    };
    post(&url, &token, &body, "application/json").await.map(with_newline)
}

fn with_newline(mut text: String) -> String {
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text
}

/// The AWS CLI / SDK external-process document for the reply's single `aws` credential.
/// `Expiration` is the earlier of the STS session's end and the lease's, so the SDK asks again
/// before the broker revokes the session.
pub fn credential_process(reply: &Value) -> Result<String, Failure> {
    let (name, cred) = only_credential_of(reply, "aws", "credential-process")?;
    let field = |k: &str| {
        cred.get(k)
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| Failure::other(format!("credential-process: credential `{name}` has no `{k}`")))
    };
    let session_end = field("expiration")?;
    let expiration = match cred.get("expires_at").and_then(Value::as_str) {
        Some(lease_end) if earlier(lease_end, session_end) => lease_end,
        _ => session_end,
    };
    let doc = json!({
        "Version": 1,
        "AccessKeyId": field("access_key_id")?,
        "SecretAccessKey": field("secret_access_key")?,
        "SessionToken": field("session_token")?,
        "Expiration": expiration,
    });
    Ok(format!("{doc}\n"))
}

/// git's credential-helper output for the reply's single `github` credential (an App
/// installation token): `username=x-access-token`, `password=<token>`, and
/// `password_expiry_utc` so git (2.41+) stops using it once the lease ends.
pub fn git_credential(reply: &Value) -> Result<String, Failure> {
    let (name, cred) = only_credential_of(reply, "github", "git-credential")?;
    let token = cred.get("token").and_then(Value::as_str).filter(|t| !t.is_empty());
    let Some(token) = token else {
        return Err(Failure::other(format!("git-credential: credential `{name}` has no `token`")));
    };
    // Attack: a value with a line break (or NUL) would add attributes of its own choosing to
    // what git reads, e.g. another `url=`.
    if token.contains(['\n', '\r', '\0']) {
        return Err(Failure::other(format!("git-credential: the token of `{name}` holds a line break")));
    }
    let mut out = format!("username=x-access-token\npassword={token}\n");
    let expiry = cred.get("expires_at").and_then(Value::as_str).and_then(|t| humantime::parse_rfc3339(t).ok());
    if let Some(secs) = expiry.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()) {
        out.push_str(&format!("password_expiry_utc={}\n", secs.as_secs()));
    }
    Ok(out)
}

/// The reply's one credential of `kind` (its grant name and fields), for a `format` that can
/// render only one: none, or several (which one would be a guess), is an error naming them.
fn only_credential_of<'a>(reply: &'a Value, kind: &str, format: &str) -> Result<(&'a String, &'a Value), Failure> {
    let credentials = reply.get("credentials").and_then(Value::as_object);
    let of_kind: Vec<(&String, &Value)> = credentials
        .into_iter()
        .flatten()
        .filter(|(_, c)| c.get("kind").and_then(Value::as_str) == Some(kind))
        .collect();
    match of_kind.as_slice() {
        [one] => Ok(*one),
        [] => Err(Failure::other(format!(
            "{format}: the policy granted no `{kind}` credential (use --format json to see the grant)"
        ))),
        several => {
            let names: Vec<&str> = several.iter().map(|(n, _)| n.as_str()).collect();
            Err(Failure::other(format!(
                "{format}: the policy granted {} `{kind}` credentials ({}); it needs exactly one",
                names.len(),
                names.join(", ")
            )))
        }
    }
}

/// Is RFC 3339 time `a` before `b`? False when either does not parse.
fn earlier(a: &str, b: &str) -> bool {
    match (humantime::parse_rfc3339(a), humantime::parse_rfc3339(b)) {
        (Ok(a), Ok(b)) => a < b,
        _ => false,
    }
}

/// Lines to append to `$GITHUB_ENV`: every variable in the multi-line (heredoc) form with a
/// random delimiter, so no value, whatever it holds, can end its entry early or add another.
pub fn github_env(reply: &Value) -> Result<String, Failure> {
    let mut out = String::new();
    for (name, value) in env_vars(reply) {
        let delimiter = loop {
            let candidate = format!("ghadelimiter_{}", crate::secret::hex(&crate::ids::random::<16>()));
            if !value.contains(&candidate) {
                break candidate;
            }
        };
        if value.contains('\r') {
            return Err(Failure::other(format!("github-env: the value of {name} holds a carriage return")));
        }
        out.push_str(&format!("{name}<<{delimiter}\n{value}\n{delimiter}\n"));
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn aws_reply(names: &[&str]) -> Value {
        let mut creds = serde_json::Map::new();
        for n in names {
            creds.insert(
                (*n).to_string(),
                json!({"kind": "aws", "revocation": "deny-policy", "expires_at": "2026-11-25T17:10:00Z",
                       "access_key_id": "ASIA1", "secret_access_key": "s'e\ncret", "session_token": "tok",
                       "expiration": "2026-11-25T17:20:00Z", "region": "us-east-1"}),
            );
        }
        json!({"lease_id": "lse_1", "policy": "p", "job": "github:1:1:1:1", "expires_at": "2026-11-25T17:10:00Z",
               "credentials": creds})
    }

    #[test]
    fn credential_process_takes_the_earlier_expiry() {
        let doc: Value = serde_json::from_str(&credential_process(&aws_reply(&["aws"])).unwrap()).unwrap();
        assert_eq!(doc["Version"], 1);
        assert_eq!(doc["AccessKeyId"], "ASIA1");
        assert_eq!(doc["SecretAccessKey"], "s'e\ncret");
        assert_eq!(doc["Expiration"], "2026-11-25T17:10:00Z");
    }

    #[test]
    fn credential_process_needs_exactly_one_aws_credential() {
        assert_eq!(credential_process(&aws_reply(&[])).unwrap_err().exit, EXIT_OTHER);
        let e = credential_process(&aws_reply(&["a", "b"])).unwrap_err();
        assert!(e.message.contains("a, b"), "{}", e.message);
    }

    #[test]
    fn github_env_uses_heredocs_for_multiline_values() {
        let out = github_env(&aws_reply(&["aws"])).unwrap();
        assert!(out.contains("AWS_SECRET_ACCESS_KEY<<ghadelimiter_"), "{out}");
        let mut lines = out.lines();
        let mut seen = 0;
        while let Some(head) = lines.next() {
            let (name, delim) = head.split_once("<<").unwrap();
            let mut value = Vec::new();
            for line in lines.by_ref() {
                if line == delim {
                    break;
                }
                value.push(line);
            }
            if name == "EPHEMERA_AWS_SECRET_ACCESS_KEY" {
                assert_eq!(value.join("\n"), "s'e\ncret");
            }
            seen += 1;
        }
        assert_eq!(seen, env_vars(&aws_reply(&["aws"])).len());
    }

    #[test]
    fn git_credential_needs_exactly_one_github_credential_and_refuses_line_breaks() {
        let gh = |token: &str| json!({"kind": "github", "expires_at": "2030-01-01T00:00:00Z", "token": token});
        let reply = json!({"credentials": {"gh": gh("ghs_abc"), "api": {"kind": "jwt", "token": "eyJ"}}});
        assert_eq!(
            git_credential(&reply).unwrap(),
            "username=x-access-token\npassword=ghs_abc\npassword_expiry_utc=1893456000\n"
        );
        let none = json!({"credentials": {"api": {"kind": "jwt", "token": "eyJ"}}});
        assert!(git_credential(&none).unwrap_err().message.contains("no `github` credential"));
        let two = json!({"credentials": {"a": gh("x"), "b": gh("y")}});
        assert!(git_credential(&two).unwrap_err().message.contains("2 `github` credentials (a, b)"));
        let hostile = json!({"credentials": {"gh": gh("ghs_x\nurl=https://evil.example")}});
        assert!(git_credential(&hostile).unwrap_err().message.contains("line break"));
    }

    #[test]
    fn a_private_key_is_never_sent_as_the_public_one() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("id_ed25519");
        std::fs::write(
            &private,
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaA==\n-----END OPENSSH PRIVATE KEY-----\n",
        )
        .unwrap();
        assert!(read_public_key(&private).unwrap_err().message.contains("this is a private key"));
        let public = dir.path().join("id_ed25519.pub");
        std::fs::write(&public, "\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB me@host\n").unwrap();
        assert_eq!(read_public_key(&public).unwrap(), "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB me@host");
    }

    #[test]
    fn formats_parse() {
        assert_eq!(Format::parse("credential-process"), Ok(Format::CredentialProcess));
        assert!(Format::parse("yaml").is_err());
    }
}
