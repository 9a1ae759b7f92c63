//! Issuer keys: OIDC discovery and JWKS over HTTP, cached per issuer.
//!
//! Every byte from the network is bounded (size cap, timeout, no redirects); only the configured
//! issuer's origin is contacted; a failed refresh keeps the last good key set; an unknown `kid`
//! refetches at most once per cooldown per issuer, however many requests ask.

use crate::clock::{Clock, UnixSeconds, truncate};
use crate::config::IssuerConfig;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use serde_json::Value;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// Discovery and JWKS documents larger than this are refused (a hostile or broken issuer could
/// otherwise make the broker buffer without bound).
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024;
/// More keys than this in one JWKS is not a real issuer.
const MAX_KEYS: usize = 64;

/// One verification key, with what it may verify.
pub struct VerifyKey {
    pub(super) key: DecodingKey,
    pub(super) family: AlgorithmFamily,
    /// The JWK's own `alg`, when it states one: the token's `alg` must then equal it.
    pub(super) alg: Option<Algorithm>,
}

#[derive(Default)]
pub struct KeySet {
    by_kid: HashMap<String, Arc<VerifyKey>>,
}

impl KeySet {
    /// Parses a JWKS, keeping only keys usable with the pinned algorithms. `oct` (symmetric) keys
    /// are never loaded: a shared secret published in a JWKS would let anyone sign.
    pub fn parse(bytes: &[u8], allowed: &[Algorithm]) -> Result<KeySet, FetchError> {
        #[derive(serde::Deserialize)]
        struct Doc {
            keys: Vec<Value>,
        }
        // `[[key, …]]` would parse into `Doc` as `{"keys": [key, …]}` (serde reads a struct from
        // an array of its fields); a JWKS is an object (RFC 7517 §5).
        if !crate::claims::is_json_object(bytes) {
            return Err(FetchError::Invalid("JWKS is not a JSON object with `keys`".into()));
        }
        let doc: Doc =
            serde_json::from_slice(bytes).map_err(|e| FetchError::Invalid(format!("JWKS is not valid JSON: {e}")))?;
        if doc.keys.len() > MAX_KEYS {
            return Err(FetchError::Invalid(format!("JWKS holds {} keys (at most {MAX_KEYS})", doc.keys.len())));
        }
        let mut by_kid = HashMap::new();
        for jwk in &doc.keys {
            if let Some((kid, key)) = parse_jwk(jwk, allowed) {
                by_kid.insert(kid, Arc::new(key));
            }
        }
        if by_kid.is_empty() {
            return Err(FetchError::Invalid("JWKS holds no key usable with the configured algorithms".into()));
        }
        Ok(KeySet { by_kid })
    }

    pub fn len(&self) -> usize {
        self.by_kid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_kid.is_empty()
    }
}

fn parse_jwk(jwk: &Value, allowed: &[Algorithm]) -> Option<(String, VerifyKey)> {
    let field = |name: &str| jwk.get(name).and_then(Value::as_str);
    let kid = field("kid")?.to_string();
    if field("use").is_some_and(|u| u != "sig") {
        return None;
    }
    let alg = match field("alg") {
        Some(a) => Some(a.parse::<Algorithm>().ok()?),
        None => None,
    };
    let (key, family) = match (field("kty")?, field("crv")) {
        ("RSA", _) => (DecodingKey::from_rsa_components(field("n")?, field("e")?).ok()?, AlgorithmFamily::Rsa),
        ("EC", Some("P-256" | "P-384")) => {
            (DecodingKey::from_ec_components(field("x")?, field("y")?).ok()?, AlgorithmFamily::Ec)
        }
        ("OKP", Some("Ed25519")) => (DecodingKey::from_ed_components(field("x")?).ok()?, AlgorithmFamily::Ed),
        // `oct` and anything unknown: never loaded.
        _ => return None,
    };
    let usable = allowed.iter().any(|a| a.family() == family && alg.is_none_or(|k| k == *a));
    usable.then_some((kid, VerifyKey { key, family, alg }))
}

#[derive(Debug)]
pub enum FetchError {
    Network(String),
    Status(u16),
    TooLarge,
    Invalid(String),
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::Network(e) => write!(f, "network error: {e}"),
            FetchError::Status(s) => write!(f, "HTTP status {s} (redirects are not followed)"),
            FetchError::TooLarge => write!(f, "response larger than {MAX_DOCUMENT_BYTES} bytes"),
            FetchError::Invalid(e) => write!(f, "{e}"),
        }
    }
}

/// The HTTP client for issuer documents: no redirects (a redirect could lead anywhere), short
/// timeouts, and no proxy: reqwest otherwise honours HTTP_PROXY / HTTPS_PROXY / ALL_PROXY from
/// the environment, which would hand every issuer request (and the choice of where it goes) to
/// whatever those variables say.
pub fn http_client() -> reqwest::Client {
    crate::identity::provider::install_crypto();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(5))
        .user_agent(concat!("ephemera/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_else(|_| reqwest::Client::new())
}

/// GET with a whole-request timeout and a size cap enforced while streaming, not after.
async fn get_capped(http: &reqwest::Client, url: &str, timeout: Duration) -> Result<Vec<u8>, FetchError> {
    let mut resp = http.get(url).timeout(timeout).send().await.map_err(|e| FetchError::Network(without_url(&e)))?;
    if !resp.status().is_success() {
        return Err(FetchError::Status(resp.status().as_u16()));
    }
    if resp.content_length().is_some_and(|n| n > MAX_DOCUMENT_BYTES as u64) {
        return Err(FetchError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| FetchError::Network(without_url(&e)))? {
        if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
            return Err(FetchError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    kind.to_string()
}

/// The key cache of one issuer.
pub struct Jwks {
    issuer_url: String,
    issuer_name: String,
    algorithms: Vec<Algorithm>,
    explicit_jwks_url: Option<String>,
    is_static: bool,
    discovered_jwks_url: Mutex<Option<String>>,
    current: RwLock<Arc<KeySet>>,
    loaded: AtomicBool,
    http: reqwest::Client,
    clock: Arc<dyn Clock>,
    cooldown_secs: i64,
    refresh_secs: i64,
    timeout: Duration,
    /// Time of the last unknown-`kid` refetch; the async mutex also makes concurrent refetches
    /// wait for one fetch instead of each starting their own (singleflight).
    refetch_gate: tokio::sync::Mutex<Option<i64>>,
    pub fetches: AtomicU64,
    pub fetch_failures: AtomicU64,
    /// When the current key set was fetched (or read from its file); 0 before.
    loaded_at: AtomicI64,
}

impl Jwks {
    pub fn new(config: &IssuerConfig, http: reqwest::Client, clock: Arc<dyn Clock>) -> Result<Jwks, String> {
        let mut jwks = Jwks {
            issuer_url: config.url.clone(),
            issuer_name: config.name.clone(),
            algorithms: config.algorithms.clone(),
            explicit_jwks_url: config.jwks_url.clone(),
            is_static: config.jwks_file.is_some(),
            discovered_jwks_url: Mutex::new(None),
            current: RwLock::new(Arc::new(KeySet::default())),
            loaded: AtomicBool::new(false),
            http,
            clock,
            cooldown_secs: config.unknown_kid_cooldown_secs,
            refresh_secs: config.jwks_refresh_secs,
            timeout: Duration::from_secs(u64::try_from(config.fetch_timeout_secs).unwrap_or(5)),
            refetch_gate: tokio::sync::Mutex::new(None),
            fetches: AtomicU64::new(0),
            fetch_failures: AtomicU64::new(0),
            loaded_at: AtomicI64::new(0),
        };
        if let Some(path) = &config.jwks_file {
            let bytes = std::fs::read(path)
                .map_err(|e| format!("issuer {}: jwks_file {}: {e}", config.name, path.display()))?;
            let set = KeySet::parse(&bytes, &config.algorithms)
                .map_err(|e| format!("issuer {}: jwks_file {}: {e}", config.name, path.display()))?;
            jwks.install(set);
        }
        Ok(jwks)
    }

    /// True once a key set has been fetched (or loaded from a file) at least once.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    pub fn is_static(&self) -> bool {
        self.is_static
    }

    /// When the current key set was fetched or read (`None`: never), and how many keys it has.
    pub fn loaded(&self) -> (Option<UnixSeconds>, usize) {
        let at = self.loaded_at.load(Ordering::Acquire);
        let keys = self.current.read().map(|s| s.len()).unwrap_or(0);
        ((at > 0).then_some(at), keys)
    }

    fn lookup(&self, kid: &str) -> Option<Arc<VerifyKey>> {
        let set = self.current.read().ok()?.clone();
        set.by_kid.get(kid).cloned()
    }

    fn install(&mut self, set: KeySet) {
        *self.current.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(set);
        self.loaded_at.store(self.clock.now().max(1), Ordering::Release);
        self.loaded.store(true, Ordering::Release);
    }

    /// The key for `kid`. An unknown `kid` (a key rotation we have not seen yet) triggers one
    /// refetch, unless one happened within the cooldown: a flood of tokens with made-up `kid`s
    /// must not turn the broker into an amplifier against the issuer.
    pub async fn key(&self, kid: &str) -> Option<Arc<VerifyKey>> {
        if let Some(k) = self.lookup(kid) {
            return Some(k);
        }
        if self.is_static {
            return None;
        }
        let mut last = self.refetch_gate.lock().await;
        if let Some(k) = self.lookup(kid) {
            return Some(k);
        }
        let now = self.clock.now();
        if last.is_some_and(|t| now - t < self.cooldown_secs) {
            return None;
        }
        *last = Some(now);
        if let Err(e) = self.refresh().await {
            tracing::warn!(issuer = %self.issuer_name, error = %e, "JWKS refetch for an unknown kid failed; keeping the last good keys");
        }
        self.lookup(kid)
    }

    /// Fetches the key set (after discovery, when needed) and swaps it in. On failure the last
    /// good key set stays.
    pub async fn refresh(&self) -> Result<usize, FetchError> {
        if self.is_static {
            return Ok(self.current.read().map(|s| s.len()).unwrap_or(0));
        }
        let result = self.fetch().await;
        match &result {
            Ok(set) => {
                let n = set.len();
                tracing::info!(issuer = %self.issuer_name, keys = n, "fetched issuer keys");
            }
            Err(_) => {
                self.fetch_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        let set = result?;
        let n = set.len();
        if let Ok(mut slot) = self.current.write() {
            *slot = Arc::new(set);
        }
        self.loaded_at.store(self.clock.now().max(1), Ordering::Release);
        self.loaded.store(true, Ordering::Release);
        Ok(n)
    }

    async fn fetch(&self) -> Result<KeySet, FetchError> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let url = match self.jwks_url() {
            Some(u) => u,
            None => self.discover().await?,
        };
        let result = match get_capped(&self.http, &url, self.timeout).await {
            Ok(bytes) => KeySet::parse(&bytes, &self.algorithms),
            Err(e) => Err(e),
        };
        if result.is_err() {
            // The issuer may have moved its keys: rediscover on the next attempt.
            if let Ok(mut slot) = self.discovered_jwks_url.lock() {
                *slot = None;
            }
        }
        result
    }

    fn jwks_url(&self) -> Option<String> {
        self.explicit_jwks_url.clone().or_else(|| self.discovered_jwks_url.lock().ok()?.clone())
    }

    async fn discover(&self) -> Result<String, FetchError> {
        let url = format!("{}/.well-known/openid-configuration", self.issuer_url.trim_end_matches('/'));
        let bytes = get_capped(&self.http, &url, self.timeout).await?;
        let doc: Value = serde_json::from_slice(&bytes)
            .map_err(|_| FetchError::Invalid("discovery document is not valid JSON".into()))?;
        // OIDC Discovery §4.3: the document must name the issuer we asked; otherwise one issuer's
        // keys could be served as another's.
        if doc.get("issuer").and_then(Value::as_str) != Some(self.issuer_url.as_str()) {
            return Err(FetchError::Invalid("discovery `issuer` differs from the configured issuer url".into()));
        }
        let jwks_uri = doc
            .get("jwks_uri")
            .and_then(Value::as_str)
            .ok_or_else(|| FetchError::Invalid("discovery has no `jwks_uri`".into()))?;
        // SSRF: a tampered discovery document must not point the broker at another host
        // (an internal service, a metadata endpoint). Only the issuer's own origin is contacted.
        if !same_origin(jwks_uri, &self.issuer_url) {
            return Err(FetchError::Invalid(format!(
                "discovery `jwks_uri` {} is not on the issuer's origin; set jwks_url in the config to allow it",
                truncate(jwks_uri, 200)
            )));
        }
        if let Ok(mut slot) = self.discovered_jwks_url.lock() {
            *slot = Some(jwks_uri.to_string());
        }
        Ok(jwks_uri.to_string())
    }

    /// Refreshes on a schedule forever: at once, then every `jwks_refresh`; after a failure,
    /// sooner (with backoff) until a fetch succeeds.
    pub async fn run_refresh(self: Arc<Self>) {
        if self.is_static {
            return;
        }
        let mut failures: u32 = 0;
        loop {
            let wait = match self.refresh().await {
                Ok(_) => {
                    failures = 0;
                    self.refresh_secs
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(issuer = %self.issuer_name, error = %e, "issuer key refresh failed; keeping the last good keys");
                    (1i64 << failures.min(6)).min(self.refresh_secs)
                }
            };
            tokio::time::sleep(Duration::from_secs(u64::try_from(wait.max(1)).unwrap_or(1))).await;
        }
    }
}

fn same_origin(a: &str, b: &str) -> bool {
    match (reqwest::Url::parse(a), reqwest::Url::parse(b)) {
        (Ok(a), Ok(b)) => a.origin() == b.origin(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oct_keys_and_unusable_keys_are_never_loaded() {
        let doc = serde_json::json!({"keys": [
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "EC", "kid": "enc", "use": "enc", "crv": "P-256", "x": "AA", "y": "AA"},
        ]});
        let err = KeySet::parse(doc.to_string().as_bytes(), &[Algorithm::RS256]).err().unwrap();
        assert!(err.to_string().contains("no key usable"));
    }

    #[test]
    fn a_key_set_written_as_an_array_of_its_fields_is_refused() {
        let key = serde_json::json!({"kty": "EC", "kid": "k1", "crv": "P-256", "alg": "ES256",
            "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"});
        let object = serde_json::json!({"keys": [key.clone()]}).to_string();
        assert_eq!(KeySet::parse(object.as_bytes(), &[Algorithm::ES256]).unwrap().len(), 1);
        let array = serde_json::json!([[key]]).to_string();
        let err = KeySet::parse(array.as_bytes(), &[Algorithm::ES256]).err().unwrap();
        assert!(err.to_string().contains("not a JSON object"), "{err}");
    }

    #[test]
    fn origin_check_rejects_other_hosts_and_schemes() {
        assert!(same_origin("https://gitlab.com/oauth/discovery/keys", "https://gitlab.com"));
        assert!(!same_origin("https://169.254.169.254/latest", "https://gitlab.com"));
        assert!(!same_origin("http://gitlab.com/keys", "https://gitlab.com"));
    }
}
