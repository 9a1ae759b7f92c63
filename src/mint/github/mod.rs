//! The `github-app` backend: installation tokens of the operator's own GitHub App, for exactly
//! the repositories and permissions a grant names, revoked the moment the lease ends.
//!
//! Minting: the App's installation on the grant's owner (looked up once, cached), a check that
//! the installation holds every permission asked for and reaches every repository named (so a
//! grant outside it is refused before any token exists, with an error that says what to fix),
//! then `POST /app/installations/{id}/access_tokens` naming those repositories and permissions.
//! A reply carrying more than was asked is revoked on the spot: the token must be exactly the
//! grant. Revocation (`immediate`): `DELETE /installation/token`, authenticated with the token
//! itself, which the revoke handle therefore carries, sealed ([`super::seal`]).

mod api;
mod app_jwt;

use super::seal::Sealer;
use super::{Backend, BoxFuture, Credential, MintContext, MintError, Minted, Revocation, RevokeHandle};
use crate::clock::{Clock, UnixSeconds, rfc3339};
use crate::config::GithubAppBackendConfig;
use crate::github_format::level_rank;
use crate::policy::{Grant, GrantedCredential, ResolvedSpec};
use crate::secret::SecretString;
use api::{Api, ApiError, Auth, Reply};
use app_jwt::AppJwt;
use dashmap::DashMap;
use reqwest::Method;
use serde_json::{Map, Value, json};
use std::sync::Arc;

/// How long a found installation (its id, permissions, repository selection) is trusted before
/// it is looked up again: an owner may change what the App may do at any time, and a stale
/// answer only delays the error GitHub then gives.
const INSTALLATION_TTL_SECS: i64 = 300;
/// How long "not installed" (or "repository not in the installation") is remembered: short, so
/// installing the App takes effect within a minute, yet a job retrying in a loop costs GitHub
/// one lookup a minute, not one per try.
const MISS_TTL_SECS: i64 = 60;

pub struct GithubAppBackend {
    app_id: u64,
    api_url: String,
    api: Api,
    jwt: AppJwt,
    sealer: Sealer,
    clock: Arc<dyn Clock>,
    /// Owner (lowercase) → (trusted until, installation or `None` for not installed).
    installations: DashMap<String, (UnixSeconds, Option<Arc<Installation>>)>,
    /// `owner/repo` (lowercase) → (trusted until, is it in the owner's installation).
    repositories: DashMap<String, (UnixSeconds, bool)>,
}

#[derive(Debug)]
struct Installation {
    id: u64,
    /// Permission → level the owner granted the App.
    permissions: Map<String, Value>,
    /// `all` repositories of the owner, or only `selected` ones.
    all_repositories: bool,
}

impl GithubAppBackend {
    pub fn new(cfg: &GithubAppBackendConfig, clock: Arc<dyn Clock>) -> Result<GithubAppBackend, String> {
        let file = &cfg.private_key_file;
        let bytes = std::fs::read(file).map_err(|e| format!("private_key_file {}: {e}", file.display()))?;
        let (jwt, der) =
            AppJwt::from_key(&bytes, cfg.app_id).map_err(|e| format!("private_key_file {}: {e}", file.display()))?;
        Ok(GithubAppBackend {
            app_id: cfg.app_id,
            api_url: cfg.api_url.clone(),
            api: Api::new(&cfg.api_url, cfg.timeout_secs, cfg.max_concurrent_requests),
            jwt,
            // Every replica given the App's key derives the same sealing key, so any replica
            // revokes what another minted; the App id keeps two Apps' keys apart.
            sealer: Sealer::derive(&der, &format!("github-app {}", cfg.app_id)),
            clock,
            installations: DashMap::new(),
            repositories: DashMap::new(),
        })
    }

    /// The App JWTs this process has signed (tests: reused, not signed per mint).
    pub fn app_jwts_signed(&self) -> u64 {
        self.jwt.signed()
    }

    async fn mint_now(
        &self,
        grant: &Grant,
        cred: &GrantedCredential,
        ctx: MintContext<'_>,
    ) -> Result<Minted, MintError> {
        let ResolvedSpec::Github { owner, repositories, permissions } = &cred.spec else {
            return Err(MintError::new(format!("grant `{}` is not a github-app grant", cred.name)));
        };
        let now = ctx.now;
        let installation = self.installation(owner, now).await?;
        check_permissions(self.app_id, owner, &installation, permissions)?;
        if !installation.all_repositories {
            for repository in repositories {
                self.check_repository(owner, repository, &installation, now).await?;
            }
        }
        let asked: Map<String, Value> = permissions.iter().map(|(p, l)| (p.clone(), json!(l))).collect();
        let body = json!({"repositories": repositories, "permissions": asked});
        let path = format!("/app/installations/{}/access_tokens", installation.id);
        let reply = self.app_call(Method::POST, &path, Some(&body), now).await?;
        match reply.status {
            201 => {}
            404 => {
                self.installations.remove(&owner.to_ascii_lowercase());
                return Err(not_installed(self.app_id, owner, "the installation is gone (404 on its token request)"));
            }
            422 => {
                return Err(MintError::advise(
                    format!("POST {path}: 422 {}", message_of(&reply)),
                    format!(
                        "GitHub refused the token request: a repository of `{owner}` the grant names does not \
                         exist or is outside the App's installation, or the installation lacks a permission the \
                         grant asks for"
                    ),
                ));
            }
            status => return Err(MintError::new(format!("POST {path}: {status} {}", message_of(&reply)))),
        }
        let token = reply.body.get("token").and_then(Value::as_str).filter(|t| !t.is_empty());
        let expires = reply.body.get("expires_at").and_then(Value::as_str).and_then(parse_time);
        let (Some(token), Some(token_expires_at)) = (token, expires) else {
            return Err(MintError::new(format!("POST {path}: 201 without a token and its expiry")));
        };
        let token = SecretString::new(token.to_string());
        let sealed = self.sealer.seal(token.expose(), ctx.lease_id);
        // Fail closed: a token wider than the grant, or one whose revoke handle cannot be made,
        // must not leave the broker, nor live on.
        let refused = excess_scope(&reply.body, permissions, repositories).or_else(|| sealed.clone().err());
        if let Some(why) = refused {
            let revoked = match self.delete_token(&token, now).await {
                Ok(()) => "revoked".to_string(),
                Err(e) => format!("NOT revoked ({e}); it expires at {}", rfc3339(token_expires_at)),
            };
            return Err(MintError::new(format!("installation token refused, {revoked}: {why}")));
        }
        let sealed = sealed.map_err(MintError::new)?;
        // The token dies when the lease ends (revocation is immediate), or at GitHub's hour.
        let lease_end = grant.renew_until().unwrap_or(grant.expires_at());
        Ok(Minted {
            credential: Credential {
                kind: "github",
                revocation: Revocation::Immediate,
                expires_at: token_expires_at.min(lease_end),
                public: vec![
                    ("owner", json!(owner)),
                    ("repositories", json!(repositories)),
                    ("permissions", Value::Object(asked)),
                    ("api_url", json!(self.api_url)),
                ],
                secrets: vec![("token", token)],
            },
            handle: RevokeHandle {
                backend: cred.backend.clone(),
                data: json!({
                    "installation_id": installation.id,
                    "token_expires_at": token_expires_at,
                    "lease": ctx.lease_id,
                    "sealed_token": sealed,
                }),
            },
        })
    }

    /// The owner's installation of the App, from the cache or GitHub (organisations first, then
    /// users: one login is never both).
    async fn installation(&self, owner: &str, now: UnixSeconds) -> Result<Arc<Installation>, MintError> {
        let key = owner.to_ascii_lowercase();
        if let Some(entry) = self.installations.get(&key).filter(|e| e.0 > now) {
            return entry.1.clone().ok_or_else(|| not_installed(self.app_id, owner, "cached"));
        }
        let mut found = None;
        for kind in ["orgs", "users"] {
            let path = format!("/{kind}/{owner}/installation");
            let reply = self.app_call(Method::GET, &path, None, now).await?;
            match reply.status {
                200 => {
                    found = Some(Arc::new(parse_installation(&reply.body, owner, self.app_id)?));
                    break;
                }
                404 => continue,
                status => return Err(MintError::new(format!("GET {path}: {status} {}", message_of(&reply)))),
            }
        }
        let ttl = if found.is_some() { INSTALLATION_TTL_SECS } else { MISS_TTL_SECS };
        self.installations.insert(key, (now + ttl, found.clone()));
        found.ok_or_else(|| not_installed(self.app_id, owner, "404 for the organisation and the user"))
    }

    /// For an installation on selected repositories: is `repository` one of them?
    /// (`GET /repos/{owner}/{repo}/installation` answers 404 for a repository outside it.)
    async fn check_repository(
        &self,
        owner: &str,
        repository: &str,
        installation: &Installation,
        now: UnixSeconds,
    ) -> Result<(), MintError> {
        let key = format!("{owner}/{repository}").to_ascii_lowercase();
        let inside = match self.repositories.get(&key).filter(|e| e.0 > now).map(|e| e.1) {
            Some(inside) => inside,
            None => {
                let path = format!("/repos/{owner}/{repository}/installation");
                let reply = self.app_call(Method::GET, &path, None, now).await?;
                let inside = match reply.status {
                    200 => reply.body.get("id").and_then(Value::as_u64) == Some(installation.id),
                    404 => false,
                    status => return Err(MintError::new(format!("GET {path}: {status} {}", message_of(&reply)))),
                };
                let ttl = if inside { INSTALLATION_TTL_SECS } else { MISS_TTL_SECS };
                self.repositories.insert(key, (now + ttl, inside));
                inside
            }
        };
        if inside {
            return Ok(());
        }
        Err(MintError::advise(
            format!("{owner}/{repository}: not in installation {}", installation.id),
            format!(
                "repository `{owner}/{repository}` is outside the App's installation on `{owner}` (it is installed \
                 on selected repositories only): add the repository to the installation in `{owner}`'s settings \
                 (Settings → GitHub Apps → Configure), or change the policy's grant"
            ),
        ))
    }

    /// A call as the App: its JWT, and GitHub's answer to a spent budget turned into advice.
    async fn app_call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        now: UnixSeconds,
    ) -> Result<Reply, MintError> {
        let jwt = self.jwt.get(now).await.map_err(MintError::new)?;
        match self.api.call(method.clone(), path, Auth::App(&jwt), body, now).await {
            Ok(reply) if reply.status == 401 => {
                // A JWT GitHub no longer takes (clock skew, a revoked key): sign afresh next time.
                self.jwt.forget();
                Err(MintError::advise(
                    format!("{method} {path}: 401 {}", message_of(&reply)),
                    format!(
                        "GitHub did not accept the App's credentials (App ID {}): check `app_id`, that \
                         `private_key_file` is a current key of the App, and the broker's clock",
                        self.app_id
                    ),
                ))
            }
            Ok(reply) => Ok(reply),
            Err(ApiError::RateLimited { until }) => Err(rate_limited(until, now)),
            Err(ApiError::Transport(e)) => Err(MintError::new(format!("{method} {path}: {e}"))),
        }
    }

    async fn delete_token(&self, token: &SecretString, now: UnixSeconds) -> Result<(), String> {
        let reply = self
            .api
            .call(Method::DELETE, "/installation/token", Auth::Installation(token.expose()), None, now)
            .await
            .map_err(|e| match e {
                ApiError::RateLimited { until } => {
                    format!("DELETE /installation/token: rate-limited until {}", rfc3339(until))
                }
                ApiError::Transport(e) => format!("DELETE /installation/token: {e}"),
            })?;
        match reply.status {
            // 401: GitHub no longer knows the token (expired, or revoked before): dead either way.
            204 | 401 => Ok(()),
            status => Err(format!("DELETE /installation/token: {status} {}", message_of(&reply))),
        }
    }

    async fn revoke_now(&self, handle: &RevokeHandle) -> Result<(), MintError> {
        let data = &handle.data;
        let (Some(expires), Some(lease), Some(sealed)) = (
            data.get("token_expires_at").and_then(Value::as_i64),
            data.get("lease").and_then(Value::as_str),
            data.get("sealed_token").and_then(Value::as_str),
        ) else {
            return Err(MintError::new("malformed github-app revoke handle"));
        };
        let now = self.clock.now();
        if expires <= now {
            return Ok(()); // GitHub has ended it already
        }
        // A handle that does not open (the App's key was replaced) cannot be revoked; it stays
        // pending and is retried until the token's hour is up, then counts as done above.
        let token = self
            .sealer
            .open(sealed, lease)
            .map_err(|e| MintError::new(format!("{e}; the token expires by itself at {}", rfc3339(expires))))?;
        self.delete_token(&token, now).await.map_err(MintError::new)
    }
}

/// Every permission asked for, at a level the installation holds. Attack surface: none (GitHub
/// would refuse too), but the caller gets "grant the App `contents: write`" instead of a 422.
fn check_permissions(
    app_id: u64,
    owner: &str,
    installation: &Installation,
    asked: &[(String, &'static str)],
) -> Result<(), MintError> {
    for (permission, level) in asked {
        let held = installation.permissions.get(permission).and_then(Value::as_str).unwrap_or("none");
        if level_rank(held) < level_rank(level) {
            return Err(MintError::advise(
                format!("installation {}: {permission} is {held}, {level} asked", installation.id),
                format!(
                    "the App (ID {app_id}) is not granted `{permission}: {level}` on `{owner}` (its installation has \
                     `{permission}: {held}`): add the permission in the App's settings and have `{owner}` accept \
                     it, or lower the policy's grant"
                ),
            ));
        }
    }
    Ok(())
}

/// What a token reply grants beyond the request, if anything: a permission not asked for (other
/// than the `metadata: read` GitHub adds to every token), a higher level, `repository_selection`
/// `all`, or a repository not named.
fn excess_scope(body: &Value, asked: &[(String, &'static str)], repositories: &[String]) -> Option<String> {
    if let Some(granted) = body.get("permissions").and_then(Value::as_object) {
        for (permission, level) in granted {
            let level = level.as_str().unwrap_or("?");
            let allowed = asked.iter().find(|(p, _)| p == permission).map(|(_, l)| *l);
            let allowed = allowed.or((permission == "metadata").then_some("read"));
            if allowed.is_none_or(|a| level_rank(level) > level_rank(a)) || level_rank(level) == 0 {
                return Some(format!("GitHub granted `{permission}: {level}`, which was not asked for"));
            }
        }
    }
    if body.get("repository_selection").and_then(Value::as_str) == Some("all") {
        return Some("GitHub granted every repository of the installation".into());
    }
    if let Some(list) = body.get("repositories").and_then(Value::as_array) {
        for repo in list {
            let name = repo.get("name").and_then(Value::as_str).unwrap_or("?");
            if !repositories.iter().any(|r| r.eq_ignore_ascii_case(name)) {
                return Some(format!("GitHub granted repository `{name}`, which was not asked for"));
            }
        }
    }
    None
}

fn parse_installation(body: &Value, owner: &str, app_id: u64) -> Result<Installation, MintError> {
    let id = body.get("id").and_then(Value::as_u64).ok_or_else(|| MintError::new("installation without an id"))?;
    if body.get("suspended_at").is_some_and(|s| !s.is_null()) {
        return Err(MintError::advise(
            format!("installation {id} is suspended"),
            format!("the App's installation on `{owner}` (App ID {app_id}) is suspended: `{owner}` must unsuspend it"),
        ));
    }
    Ok(Installation {
        id,
        permissions: body.get("permissions").and_then(Value::as_object).cloned().unwrap_or_default(),
        all_repositories: body.get("repository_selection").and_then(Value::as_str) == Some("all"),
    })
}

fn not_installed(app_id: u64, owner: &str, detail: &str) -> MintError {
    MintError::advise(
        format!("App {app_id} not installed on {owner}: {detail}"),
        format!(
            "the App (ID {app_id}) is not installed on `{owner}`: install it on the organisation or user (GitHub → \
             the App's page → Install), or correct the grant's `owner`"
        ),
    )
}

fn rate_limited(until: UnixSeconds, now: UnixSeconds) -> MintError {
    let wait = (until - now).max(1);
    MintError {
        detail: format!("GitHub rate limit: no calls before {}", rfc3339(until)),
        advice: Some(format!(
            "GitHub's API rate limit for the App is spent; the broker will not call GitHub before {} (in {wait} s). \
             Retry after that",
            rfc3339(until)
        )),
        retry_after_secs: Some(wait),
    }
}

/// GitHub's `message` field, truncated, for the log only.
fn message_of(reply: &Reply) -> String {
    let text = reply.body.get("message").and_then(Value::as_str).unwrap_or("");
    crate::clock::truncate(text, 200).to_string()
}

fn parse_time(text: &str) -> Option<UnixSeconds> {
    let t = humantime::parse_rfc3339(text).ok()?;
    let secs = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
    i64::try_from(secs).ok()
}

impl Backend for GithubAppBackend {
    fn kind(&self) -> &'static str {
        "github"
    }

    fn revocation(&self) -> Revocation {
        Revocation::Immediate
    }

    fn mint<'a>(
        &'a self,
        grant: &'a Grant,
        cred: &'a GrantedCredential,
        ctx: MintContext<'a>,
    ) -> BoxFuture<'a, Result<Minted, MintError>> {
        Box::pin(self.mint_now(grant, cred, ctx))
    }

    fn revoke<'a>(&'a self, handle: &'a RevokeHandle) -> BoxFuture<'a, Result<(), MintError>> {
        Box::pin(self.revoke_now(handle))
    }

    fn rate_limit_remaining(&self) -> Option<u64> {
        self.api.remaining()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_reply_wider_than_the_request_is_caught() {
        let asked = [("contents".to_string(), "write")];
        let repos = ["web".to_string()];
        let exact = json!({"permissions": {"contents": "write", "metadata": "read"}, "repository_selection": "selected",
                           "repositories": [{"name": "Web"}]});
        assert_eq!(excess_scope(&exact, &asked, &repos), None);
        let lower = json!({"permissions": {"contents": "read"}});
        assert_eq!(excess_scope(&lower, &asked, &repos), None, "less than asked is not more");
        for wider in [
            json!({"permissions": {"contents": "write", "issues": "write"}}),
            json!({"permissions": {"contents": "admin"}}),
            json!({"permissions": {"metadata": "write"}}),
            json!({"permissions": {"contents": "bogus"}}),
            json!({"repository_selection": "all"}),
            json!({"repositories": [{"name": "web"}, {"name": "infra"}]}),
        ] {
            assert!(excess_scope(&wider, &asked, &repos).is_some(), "{wider}");
        }
    }

    #[test]
    fn a_missing_permission_names_what_to_grant() {
        let installation = Installation {
            id: 7,
            permissions: json!({"contents": "read"}).as_object().unwrap().clone(),
            all_repositories: true,
        };
        let err = check_permissions(42, "octo-org", &installation, &[("contents".into(), "write")]).unwrap_err();
        let advice = err.advice.unwrap();
        assert!(advice.contains("`contents: write`") && advice.contains("`contents: read`"), "{advice}");
        assert!(check_permissions(42, "o", &installation, &[("contents".into(), "read")]).is_ok());
        let err = check_permissions(42, "o", &installation, &[("issues".into(), "read")]).unwrap_err();
        assert!(err.advice.unwrap().contains("`issues: none`"));
    }
}
