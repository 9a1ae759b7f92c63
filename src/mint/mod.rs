//! mint: credential backends. A [`Backend`] turns one [`GrantedCredential`] of a [`Grant`] into a
//! credential plus a [`RevokeHandle`], and later revokes by that handle. Backends say honestly
//! what revoking does ([`Revocation`]). `jwt` lives here; `aws`, `github` and `ssh` beside it.

pub mod aws;
mod bounded;
pub mod github;
pub mod jwt;
pub mod keys;
pub mod postgres;
pub mod seal;
pub mod ssh;

use crate::clock::{UnixSeconds, rfc3339};
use crate::policy::{Grant, GrantedCredential};
use crate::secret::SecretString;
use serde::Serialize;
use serde::ser::SerializeMap;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Mutual exclusion across every replica that shares one lease store, for read-modify-writes of
/// upstream state the replicas share, such as an AWS role's deny policy: two replicas merging
/// their entries into one document at once would each write back the other's loss. A single
/// broker needs none (its backends serialise in process); the shared store provides one (a
/// PostgreSQL advisory lock).
pub trait Exclusive: Send + Sync {
    /// Waits until this caller alone holds `key` among all replicas; it holds it until the
    /// guard drops. `Err` when the lock cannot be had now (the store is unreachable, or the
    /// wait outlasted its timeout): the caller must not go ahead without it.
    fn acquire<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<ExclusiveGuard, String>>;
}

/// Held while a [`Exclusive`] lock is held; dropping it lets go.
pub struct ExclusiveGuard {
    _held: Box<dyn Send + Sync>,
}

impl ExclusiveGuard {
    /// A guard that lets go when `inner` drops.
    pub fn new(inner: Box<dyn Send + Sync>) -> ExclusiveGuard {
        ExclusiveGuard { _held: inner }
    }
}

/// Replaces a named backend with a wrapper around it (fault injection in tests).
pub type BackendWrap = dyn Fn(&str, Arc<dyn Backend>) -> Arc<dyn Backend> + Send + Sync;

/// What ending a lease does to a credential (DESIGN §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Revocation {
    /// Dead at once (e.g. a broker JWT: introspection answers inactive).
    Immediate,
    /// Dead once an IAM deny propagates (seconds).
    DenyPolicy,
    /// Lives until it expires; the backend cannot revoke.
    Expiry,
}

/// A minted credential as the caller receives it. Secret fields are [`SecretString`]s, so a
/// `Debug` of this never prints them; only the reply body (via `Serialize`) does.
#[derive(Debug, Clone)]
pub struct Credential {
    pub kind: &'static str,
    pub revocation: Revocation,
    pub expires_at: UnixSeconds,
    pub public: Vec<(&'static str, Value)>,
    pub secrets: Vec<(&'static str, SecretString)>,
}

impl Credential {
    /// SHA-256 of every secret field, for logs and audit.
    pub fn fingerprints(&self) -> BTreeMap<&'static str, String> {
        self.secrets.iter().map(|(k, v)| (*k, v.fingerprint())).collect()
    }
}

impl Serialize for Credential {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(3 + self.public.len() + self.secrets.len()))?;
        map.serialize_entry("kind", self.kind)?;
        map.serialize_entry("revocation", &self.revocation)?;
        map.serialize_entry("expires_at", &rfc3339(self.expires_at))?;
        for (k, v) in &self.public {
            map.serialize_entry(k, v)?;
        }
        for (k, v) in &self.secrets {
            map.serialize_entry(k, v.expose())?;
        }
        map.end()
    }
}

/// What a backend needs to revoke a credential later. Serializable: the ledger journals it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RevokeHandle {
    pub backend: String,
    pub data: Value,
}

#[derive(Debug)]
pub struct Minted {
    pub credential: Credential,
    pub handle: RevokeHandle,
}

/// A credential found upstream (see [`Backend::orphans`]): the lease it was made for, and how
/// to revoke it.
#[derive(Debug, Clone)]
pub struct Orphan {
    pub lease_id: String,
    pub handle: RevokeHandle,
}

/// Per-exchange facts a backend may stamp into what it mints.
#[derive(Debug, Clone, Copy)]
pub struct MintContext<'a> {
    pub lease_id: &'a str,
    pub now: UnixSeconds,
    /// The job's own public key for an `ssh` grant (`None`: the backend generates a key pair).
    pub ssh_public_key: Option<&'a str>,
}

/// A backend failure. `detail` is for the log only (it may hold upstream text).
#[derive(Debug, Clone)]
pub struct MintError {
    pub detail: String,
    /// What the caller may read: what is wrong and what to fix, in the broker's own words (the
    /// account or repository the grant names, never upstream text and never a secret).
    pub advice: Option<String>,
    /// The upstream asked to be left alone (a rate limit) for this many seconds.
    pub retry_after_secs: Option<i64>,
}

impl MintError {
    /// A failure with detail for the log only.
    pub fn new(detail: impl Into<String>) -> MintError {
        MintError { detail: detail.into(), advice: None, retry_after_secs: None }
    }

    /// A failure the caller can act on: `advice` is returned to them.
    pub fn advise(detail: impl Into<String>, advice: impl Into<String>) -> MintError {
        MintError { detail: detail.into(), advice: Some(advice.into()), retry_after_secs: None }
    }
}

pub trait Backend: Send + Sync {
    fn kind(&self) -> &'static str;
    /// The guarantee revoking gives, as reported to callers.
    fn revocation(&self) -> Revocation;
    fn mint<'a>(
        &'a self,
        grant: &'a Grant,
        credential: &'a GrantedCredential,
        ctx: MintContext<'a>,
    ) -> BoxFuture<'a, Result<Minted, MintError>>;
    fn revoke<'a>(&'a self, handle: &'a RevokeHandle) -> BoxFuture<'a, Result<(), MintError>>;
    /// Periodic housekeeping (the reaper calls it), e.g. dropping deny entries of sessions that
    /// have expired on their own.
    fn maintain<'a>(&'a self, _now: UnixSeconds) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
    /// A credential this backend minted before the process started is still remembered by the
    /// ledger (in any state). Called at start-up, before the first reaper pass, so a backend can
    /// rebuild housekeeping it keeps only in memory, e.g. which roles hold aws deny entries.
    fn adopt(&self, _handle: &RevokeHandle) {}

    /// Does [`Backend::adopt`] do anything here? Only then are the ledger's handles read for it
    /// at start-up (a million leases are not walked for nothing).
    fn adopts(&self) -> bool {
        false
    }

    /// Credentials this backend finds upstream that it made for a lease and may have lost track
    /// of (a crash between minting and recording the lease), old enough that no exchange can
    /// still be recording them. The reaper revokes each whose lease the ledger does not know.
    fn orphans<'a>(&'a self, _now: UnixSeconds) -> BoxFuture<'a, Vec<Orphan>> {
        Box::pin(async { Vec::new() })
    }

    /// A credential this backend minted whose lease has ended, where this process did not end
    /// it: before the process started, or on another replica sharing the store. Its
    /// [`Backend::revoke`] may never have run here. A backend that keeps what revoking did in
    /// memory rebuilds it from this: the `ssh` backend lists the certificate in its KRL.
    fn learn_ended(&self, _handle: &RevokeHandle) {}

    /// Does [`Backend::learn_ended`] do anything here? Only then are ended leases' handles read
    /// for it: at start-up, and on a shared store at every reaper pass.
    fn learns_ended(&self) -> bool {
        false
    }

    /// Do this backend's credentials die with their lease at its expiry, with nothing to call
    /// upstream (its [`Backend::revoke`] does nothing then)? A broker JWT does: introspection
    /// reads the lease's state, and its revoke is a no-op. The reaper then
    /// ends an expired lease whose every credential is of such a backend in the claim itself:
    /// one write to the store, no revocation round (`LeaseStore::claim_due`). `false` unless a
    /// backend is sure.
    fn quiet_at_expiry(&self) -> bool {
        false
    }

    /// The upstream's remaining API budget as it last said (GitHub's `x-ratelimit-remaining`),
    /// for `/metrics`; `None` where there is none or nothing was called yet.
    fn rate_limit_remaining(&self) -> Option<u64> {
        None
    }
}

/// Every configured backend, by name, plus the JWT signers (for JWKS and introspection).
#[derive(Default, Clone)]
pub struct Backends {
    by_name: BTreeMap<String, Arc<dyn Backend>>,
    signers: Vec<Arc<jwt::JwtSigner>>,
    /// The `ssh` backends (their CA public key and KRL are served over HTTP).
    ssh: Vec<Arc<ssh::SshBackend>>,
}

impl Backends {
    /// Every configured backend; JWT signing keys come from `keys`.
    /// `exclusive` is the lock replicas share (`None` for a single broker).
    pub async fn from_config(
        config: &crate::config::Config,
        keys: &dyn keys::KeySource,
        clock: &Arc<dyn crate::clock::Clock>,
        exclusive: Option<Arc<dyn Exclusive>>,
    ) -> Result<Backends, String> {
        let mut out = Backends::default();
        for (name, backend) in &config.backends {
            match backend {
                crate::config::BackendConfig::Jwt(j) => {
                    let load = |name: &std::path::Path, generate: bool| {
                        jwt::JwtSigner::from_source(keys, name, generate, &config.public_url).map(Arc::new)
                    };
                    let signer =
                        load(&j.signing_key_file, j.generate_missing).map_err(|e| format!("backend {name}: {e}"))?;
                    out.signers.push(signer.clone());
                    // Previous keys verify (JWKS, introspection) but never sign.
                    for previous in &j.previous_signing_key_files {
                        out.signers.push(load(previous, false).map_err(|e| format!("backend {name}: {e}"))?);
                    }
                    out.by_name.insert(name.clone(), Arc::new(jwt::JwtBackend::new(signer)));
                }
                crate::config::BackendConfig::Aws(a) => {
                    let backend = aws::AwsBackend::new(name, a, clock.clone(), exclusive.clone())
                        .await
                        .map_err(|e| format!("backend {name}: {e}"))?;
                    out.by_name.insert(name.clone(), Arc::new(backend));
                }
                crate::config::BackendConfig::Postgres(p) => {
                    let backend =
                        postgres::PostgresBackend::new(name, p).map_err(|e| format!("backend {name}: {e}"))?;
                    out.by_name.insert(name.clone(), Arc::new(backend));
                }
                crate::config::BackendConfig::Ssh(s) => {
                    let backend = Arc::new(
                        ssh::SshBackend::new(name, s, clock.clone()).map_err(|e| format!("backend {name}: {e}"))?,
                    );
                    out.ssh.push(backend.clone());
                    out.by_name.insert(name.clone(), backend);
                }
                crate::config::BackendConfig::GithubApp(g) => {
                    let backend =
                        github::GithubAppBackend::new(g, clock.clone()).map_err(|e| format!("backend {name}: {e}"))?;
                    out.by_name.insert(name.clone(), Arc::new(backend));
                }
            }
        }
        // Backends that call an upstream get a bound on calls in flight; `jwt` and `ssh` sign
        // in process.
        let wait = std::time::Duration::from_millis(config.limits.issuing_wait_ms);
        for backend in out.by_name.values_mut() {
            if matches!(backend.kind(), "aws" | "github" | "postgres") {
                let max = config.limits.backend_max_outstanding;
                *backend = Arc::new(bounded::Bounded::new(backend.clone(), max, wait));
            }
        }
        Ok(out)
    }

    /// Replaces every backend with `wrap(name, backend)` (fault injection in tests).
    pub fn wrap(&mut self, wrap: &BackendWrap) {
        for (name, backend) in self.by_name.iter_mut() {
            *backend = wrap(name, backend.clone());
        }
    }

    /// Every backend's [`Backend::orphans`].
    /// The backends whose credentials end quietly with their lease's expiry
    /// ([`Backend::quiet_at_expiry`]).
    pub fn quiet_at_expiry(&self) -> BTreeSet<String> {
        self.by_name.iter().filter(|(_, b)| b.quiet_at_expiry()).map(|(name, _)| name.clone()).collect()
    }

    pub async fn orphans(&self, now: UnixSeconds) -> Vec<Orphan> {
        let mut out = Vec::new();
        for backend in self.by_name.values() {
            out.extend(backend.orphans(now).await);
        }
        out
    }

    /// Every backend's housekeeping.
    pub async fn maintain(&self, now: UnixSeconds) {
        for backend in self.by_name.values() {
            backend.maintain(now).await;
        }
    }

    /// Hands a credential the ledger remembers to the backend that minted it ([`Backend::adopt`]);
    /// a backend no longer configured has nothing to rebuild.
    pub fn adopt(&self, handle: &RevokeHandle) {
        if let Some(backend) = self.by_name.get(&handle.backend) {
            backend.adopt(handle);
        }
    }

    /// The backends that adopt remembered credentials at start-up.
    pub fn adopting(&self) -> std::collections::BTreeSet<String> {
        self.by_name.iter().filter(|(_, b)| b.adopts()).map(|(name, _)| name.clone()).collect()
    }

    /// Hands the credential of an ended lease to the backend that minted it
    /// ([`Backend::learn_ended`]); a backend no longer configured has nothing to learn.
    pub fn learn_ended(&self, handle: &RevokeHandle) {
        if let Some(backend) = self.by_name.get(&handle.backend) {
            backend.learn_ended(handle);
        }
    }

    /// The backends that learn of ended leases ([`Backend::learns_ended`]).
    pub fn learning_ended(&self) -> std::collections::BTreeSet<String> {
        self.by_name.iter().filter(|(_, b)| b.learns_ended()).map(|(name, _)| name.clone()).collect()
    }

    /// (backend, remaining calls) of every backend whose upstream reported a rate-limit budget.
    pub fn rate_limits(&self) -> Vec<(String, u64)> {
        self.by_name.iter().filter_map(|(n, b)| Some((n.clone(), b.rate_limit_remaining()?))).collect()
    }

    /// The configured backends' names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Backend>> {
        self.by_name.get(name)
    }

    /// The configured `ssh` backends, by name order.
    pub fn ssh(&self) -> &[Arc<ssh::SshBackend>] {
        &self.ssh
    }

    /// The KRL of every `ssh` backend with `revocation = "krl"` (`None`: there is none).
    pub fn ssh_krl(&self, now: crate::clock::UnixSeconds) -> Option<Vec<u8>> {
        ssh::krl(&self.ssh, now)
    }

    pub fn signers(&self) -> &[Arc<jwt::JwtSigner>] {
        &self.signers
    }

    /// The broker's JWKS: the public key of every JWT backend.
    pub fn jwks(&self) -> Value {
        serde_json::json!({"keys": self.signers.iter().map(|s| s.public_jwk().clone()).collect::<Vec<_>>()})
    }
}
