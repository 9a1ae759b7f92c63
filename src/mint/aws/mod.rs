//! The `aws` backend: job-scoped STS credentials that really die when the job ends.
//!
//! Minting is `AssumeRole` from the broker's own AWS identity, with `SourceIdentity` set to the
//! lease id. STS sessions cannot be revoked one by one, so revocation (`deny-policy`) puts an
//! inline policy `ephemera-revoked` on the role that denies everything to sessions whose
//! `aws:SourceIdentity` is a revoked lease id, until those sessions have expired anyway.
//! Updates to one role's policy are serialised and batched, so two concurrent revocations never
//! lose each other in a read-modify-write race; with replicas on a shared store, also across
//! processes (`mint::Exclusive`, a PostgreSQL advisory lock per role).

use super::{Backend, BoxFuture, Credential, Exclusive, MintContext, MintError, Minted, Revocation, RevokeHandle};
use crate::aws_format::{self, deny};
use crate::claims::{GithubClaims, GitlabClaims};
use crate::clock::{Clock, UnixSeconds, rfc3339};
use crate::config::{AwsBackendConfig, AwsRevocation};
use crate::identity::VerifiedIdentity;
use crate::policy::{Grant, GrantedCredential, ResolvedSpec};
use crate::secret::SecretString;
use aws_sdk_iam::error::ProvideErrorMetadata;
use dashmap::DashMap;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

pub struct AwsBackend {
    name: String,
    region: String,
    sts: aws_sdk_sts::Client,
    iam: aws_sdk_iam::Client,
    revocation: Revocation,
    max_ttl_secs: i64,
    clock: Arc<dyn Clock>,
    /// One queue per role: revocations wait here and are written in batches.
    roles: DashMap<String, Arc<RoleQueue>>,
    /// Roles holding deny entries, with the time the earliest entry can be dropped. In memory
    /// only: after a restart it is rebuilt from the ledger's credentials ([`Backend::adopt`]).
    cleanup: DashMap<String, UnixSeconds>,
    /// The lock replicas on one store share: a role's deny policy is read, merged and written
    /// by one replica at a time. `None` for a single broker (the role queue suffices).
    exclusive: Option<Arc<dyn Exclusive>>,
}

/// A revocation waiting for its role's writer: (lease id, session expiry, where the outcome goes).
type PendingDeny = (String, UnixSeconds, oneshot::Sender<Result<(), String>>);

#[derive(Default)]
struct RoleQueue {
    pending: std::sync::Mutex<Vec<PendingDeny>>,
    writer: tokio::sync::Mutex<()>,
}

impl AwsBackend {
    pub async fn new(
        name: &str,
        cfg: &AwsBackendConfig,
        clock: Arc<dyn Clock>,
        exclusive: Option<Arc<dyn Exclusive>>,
    ) -> Result<AwsBackend, String> {
        use aws_config::{BehaviorVersion, Region, retry::RetryConfig, timeout::TimeoutConfig};
        use aws_smithy_http_client::tls;
        // One TLS stack: rustls with ring, like the rest of the broker.
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
            .build_https();
        let timeout = Duration::from_secs(u64::try_from(cfg.timeout_secs).unwrap_or(10));
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(cfg.region.clone()))
            .http_client(http)
            .timeout_config(TimeoutConfig::builder().operation_timeout(timeout).build())
            // Throttling and 5xx are retried with exponential backoff and jitter by the SDK.
            .retry_config(RetryConfig::standard().with_max_attempts(4));
        if let Some(url) = &cfg.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        if let Some(file) = &cfg.credentials_file {
            loader = loader.profile_files(credentials_only(file));
        }
        if let Some(profile) = &cfg.profile {
            loader = loader.profile_name(profile);
        }
        let shared = loader.load().await;
        Ok(AwsBackend {
            name: name.to_string(),
            region: cfg.region.clone(),
            sts: aws_sdk_sts::Client::new(&shared),
            iam: aws_sdk_iam::Client::new(&shared),
            revocation: match cfg.revocation {
                AwsRevocation::DenyPolicy => Revocation::DenyPolicy,
                AwsRevocation::Expiry => Revocation::Expiry,
            },
            max_ttl_secs: cfg.max_ttl_secs,
            clock,
            roles: DashMap::new(),
            cleanup: DashMap::new(),
            exclusive,
        })
    }

    async fn mint_now(
        &self,
        grant: &Grant,
        cred: &GrantedCredential,
        ctx: MintContext<'_>,
    ) -> Result<Minted, MintError> {
        let ResolvedSpec::Aws { role_arn, session_policy, policy_arns, external_id, session_tags } = &cred.spec else {
            return Err(MintError::new(format!("grant `{}` is not an aws grant", cred.name)));
        };
        let duration = aws_format::duration_seconds(grant.ttl_secs(), self.max_ttl_secs);
        let mut request = self
            .sts
            .assume_role()
            .role_arn(role_arn)
            .role_session_name(session_name(grant.identity()))
            // The lease id, visible in CloudTrail and matched by the revocation deny policy.
            .source_identity(ctx.lease_id)
            .duration_seconds(i32::try_from(duration).unwrap_or(900))
            .set_policy(session_policy.clone())
            .set_external_id(external_id.clone());
        for arn in policy_arns {
            request = request.policy_arns(aws_sdk_sts::types::PolicyDescriptorType::builder().arn(arn).build());
        }
        for (key, value) in session_tags {
            let clean = aws_format::sanitize_tag_value(value);
            if aws_format::tag_value_was_changed(value, &clean) {
                tracing::info!(backend = %self.name, tag = %key, "session tag value sanitised to AWS's character set and length");
            }
            let tag = aws_sdk_sts::types::Tag::builder()
                .key(key)
                .value(clean)
                .build()
                .map_err(|e| MintError::new(e.to_string()))?;
            request = request.tags(tag);
        }
        let output =
            request.send().await.map_err(|e| MintError::new(aws_error(&format!("sts:AssumeRole {role_arn}"), &e)))?;
        let creds = output.credentials().ok_or_else(|| MintError::new("sts:AssumeRole returned no credentials"))?;
        let expires_at = creds.expiration().secs();
        Ok(Minted {
            credential: Credential {
                kind: "aws",
                revocation: self.revocation,
                expires_at,
                public: vec![("region", json!(self.region)), ("expiration", json!(rfc3339(expires_at)))],
                secrets: vec![
                    ("access_key_id", SecretString::new(creds.access_key_id().to_string())),
                    ("secret_access_key", SecretString::new(creds.secret_access_key().to_string())),
                    ("session_token", SecretString::new(creds.session_token().to_string())),
                ],
            },
            handle: RevokeHandle {
                backend: cred.backend.clone(),
                data: json!({
                    "role_name": role_name(role_arn),
                    "source_identity": ctx.lease_id,
                    "session_expires_at": expires_at,
                }),
            },
        })
    }

    async fn revoke_now(&self, handle: &RevokeHandle) -> Result<(), MintError> {
        if self.revocation == Revocation::Expiry {
            return Ok(()); // honest: the reply said `expiry`; the session lives until it expires
        }
        let field = |k: &str| handle.data.get(k).cloned().unwrap_or(Value::Null);
        let (Some(role), Some(id), Some(expires)) = (
            field("role_name").as_str().map(str::to_string),
            field("source_identity").as_str().map(str::to_string),
            field("session_expires_at").as_i64(),
        ) else {
            return Err(MintError::new("malformed aws revoke handle"));
        };
        if expires <= self.clock.now() {
            return Ok(()); // the session is already dead
        }
        self.deny(&role, id, expires).await.map_err(MintError::new)
    }

    /// Adds (lease id, session expiry) to the role's deny policy. Concurrent callers for one role
    /// queue up; whoever holds the writer applies every queued entry in one read-modify-write.
    async fn deny(&self, role: &str, id: String, expires: UnixSeconds) -> Result<(), String> {
        let queue = self.roles.entry(role.to_string()).or_default().clone();
        let (done, result) = oneshot::channel();
        lock(&queue.pending).push((id, expires, done));
        {
            let _writer = queue.writer.lock().await;
            let batch: Vec<_> = std::mem::take(&mut *lock(&queue.pending));
            if !batch.is_empty() {
                let adds: Vec<(String, UnixSeconds)> = batch.iter().map(|(i, e, _)| (i.clone(), *e)).collect();
                let outcome = self.write_deny_policy(role, &adds).await;
                for (_, _, tx) in batch {
                    let _ = tx.send(outcome.clone());
                }
            }
        }
        result.await.unwrap_or_else(|_| Err("the deny-policy writer went away".into()))
    }

    /// Read, merge (dropping entries whose sessions have expired), check the size, write. With
    /// replicas, under their shared lock on this role: another replica's read-merge-write between
    /// our read and our write would otherwise be overwritten, and its revocations silently undone.
    async fn write_deny_policy(&self, role: &str, adds: &[(String, UnixSeconds)]) -> Result<(), String> {
        let _replicas = match &self.exclusive {
            Some(lock) => Some(
                lock.acquire(&format!("aws-deny:{}:{role}", self.name))
                    .await
                    .map_err(|e| format!("role {role}: the replicas' lock on its deny policy: {e}"))?,
            ),
            None => None,
        };
        let now = self.clock.now();
        let existing = self.read_deny_policy(role).await?;
        let merged = deny::merge_deny_entries(existing, adds, now);
        let Some(doc) = deny::deny_policy_document(&merged) else {
            self.cleanup.remove(role);
            return self.delete_deny_policy(role).await;
        };
        let others = self.other_inline_chars(role).await?;
        if !deny::fits_inline_limit(&doc, others) {
            // Never dropped: the revocation stays pending and is retried by the ledger.
            return Err(format!(
                "role {role}: the deny policy would exceed the {}-character limit on a role's inline policies; revocation stays pending",
                deny::MAX_ROLE_INLINE_POLICY_CHARS
            ));
        }
        self.iam
            .put_role_policy()
            .role_name(role)
            .policy_name(deny::DENY_POLICY_NAME)
            .policy_document(doc.to_string())
            .send()
            .await
            .map_err(|e| aws_error(&format!("iam:PutRolePolicy {role}"), &e))?;
        if let Some(earliest) = merged.iter().map(|(_, e)| *e).min() {
            self.cleanup.insert(role.to_string(), earliest);
        }
        Ok(())
    }

    async fn read_deny_policy(&self, role: &str) -> Result<Vec<(String, UnixSeconds)>, String> {
        let result = self.iam.get_role_policy().role_name(role).policy_name(deny::DENY_POLICY_NAME).send().await;
        let output = match result {
            Ok(o) => o,
            Err(e) if e.as_service_error().is_some_and(|s| s.code() == Some("NoSuchEntity")) => return Ok(Vec::new()),
            Err(e) => return Err(aws_error(&format!("iam:GetRolePolicy {role}"), &e)),
        };
        let doc = decode_policy_document(output.policy_document())?;
        deny::parse_deny_policy(&doc)
    }

    async fn delete_deny_policy(&self, role: &str) -> Result<(), String> {
        match self.iam.delete_role_policy().role_name(role).policy_name(deny::DENY_POLICY_NAME).send().await {
            Ok(_) => Ok(()),
            Err(e) if e.as_service_error().is_some_and(|s| s.code() == Some("NoSuchEntity")) => Ok(()),
            Err(e) => Err(aws_error(&format!("iam:DeleteRolePolicy {role}"), &e)),
        }
    }

    /// The packed size of the role's other inline policies (IAM limits their sum).
    async fn other_inline_chars(&self, role: &str) -> Result<usize, String> {
        let names = self
            .iam
            .list_role_policies()
            .role_name(role)
            .send()
            .await
            .map_err(|e| aws_error(&format!("iam:ListRolePolicies {role}"), &e))?;
        let mut total = 0;
        for name in names.policy_names().iter().filter(|n| *n != deny::DENY_POLICY_NAME) {
            let out = self
                .iam
                .get_role_policy()
                .role_name(role)
                .policy_name(name)
                .send()
                .await
                .map_err(|e| aws_error(&format!("iam:GetRolePolicy {role}/{name}"), &e))?;
            total += decode_policy_document(out.policy_document())?.to_string().len();
        }
        Ok(total)
    }

    /// Drops deny entries whose sessions have expired (and the policy once it is empty).
    async fn maintain_now(&self, now: UnixSeconds) {
        let due: Vec<String> = self.cleanup.iter().filter(|e| *e.value() <= now).map(|e| e.key().clone()).collect();
        for role in due {
            let queue = self.roles.entry(role.clone()).or_default().clone();
            let _writer = queue.writer.lock().await;
            if let Err(e) = self.write_deny_policy(&role, &[]).await {
                tracing::warn!(backend = %self.name, role = %role, error = %e, "deny policy cleanup failed; will retry");
            }
        }
    }
}

/// A shared credentials file as the only profile source.
// The aliases are deprecated in favour of aws-runtime's own names for the same types; naming those
// would need a direct dependency on aws-runtime.
#[allow(deprecated)]
fn credentials_only(file: &std::path::Path) -> aws_config::profile::profile_file::ProfileFiles {
    use aws_config::profile::profile_file::{ProfileFileKind, ProfileFiles};
    ProfileFiles::builder().with_file(ProfileFileKind::Credentials, file).build()
}

/// An AWS error as one line for the log and the ledger: the operation, the AWS error code and
/// message, or the transport failure — not the whole response dump.
fn aws_error<E, R>(operation: &str, e: &aws_sdk_sts::error::SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let text = match e.as_service_error() {
        Some(s) => format!("{}: {}", s.code().unwrap_or("error"), s.message().unwrap_or("no message")),
        None => aws_sdk_sts::error::DisplayErrorContext(e).to_string(),
    };
    format!("{operation}: {}", crate::clock::truncate(&text, 300))
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// IAM returns policy documents URL-encoded (RFC 3986); some endpoints return plain JSON.
fn decode_policy_document(raw: &str) -> Result<Value, String> {
    let text = if raw.trim_start().starts_with('{') {
        raw.to_string()
    } else {
        percent_encoding::percent_decode_str(raw).decode_utf8().map_err(|e| e.to_string())?.into_owned()
    };
    serde_json::from_str(&text).map_err(|e| format!("role policy is not JSON: {e}"))
}

/// `arn:aws:iam::123456789012:role/path/name` → `name` (IAM's role-name parameter).
fn role_name(arn: &str) -> String {
    arn.rsplit('/').next().unwrap_or(arn).to_string()
}

/// A session name a person can trace to the job in CloudTrail: repository (or project) and the
/// run/job ids.
fn session_name(identity: &VerifiedIdentity) -> String {
    let claims = identity.claims();
    if let Ok(g) = GithubClaims::from_claims(claims) {
        let (run, attempt) = (g.run_id.to_string(), g.run_attempt.to_string());
        return aws_format::role_session_name(&[&g.repository, &run, &attempt]);
    }
    if let Ok(g) = GitlabClaims::from_claims(claims) {
        let (project, job) = (g.project_path.unwrap_or_else(|| g.project_id.to_string()), g.job_id.to_string());
        return aws_format::role_session_name(&[&project, &job]);
    }
    aws_format::role_session_name(&[identity.job()])
}

impl Backend for AwsBackend {
    fn kind(&self) -> &'static str {
        "aws"
    }

    fn revocation(&self) -> Revocation {
        self.revocation
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

    fn maintain<'a>(&'a self, now: UnixSeconds) -> BoxFuture<'a, ()> {
        Box::pin(self.maintain_now(now))
    }

    /// The role of a credential minted before a restart may hold deny entries nobody would
    /// otherwise drop: it is due for cleanup at once. The next `maintain` reads its deny policy,
    /// drops what has expired (deleting the policy when nothing is left) and records the earliest
    /// remaining expiry. A role with no deny policy costs one read and one no-op delete.
    fn adopts(&self) -> bool {
        self.revocation == Revocation::DenyPolicy
    }

    fn adopt(&self, handle: &RevokeHandle) {
        if self.revocation != Revocation::DenyPolicy {
            return; // `expiry` never writes a deny policy (and may lack the IAM permissions to read one)
        }
        if let Some(role) = handle.data.get("role_name").and_then(Value::as_str) {
            self.cleanup.insert(role.to_string(), UnixSeconds::MIN);
        }
    }
}
