//! Calls to GitHub's REST API: one configured origin, no redirects, no proxy from the
//! environment, a timeout and a size cap on every reply, a bounded number in flight, and
//! GitHub's rate-limit headers obeyed. When GitHub says the App's budget is spent (or asks to
//! wait), no call leaves until the time it named: hammering a rate-limited API gets an App's
//! limits cut further, and the caller is better served by "retry at HH:MM:SS" than by a timeout.

use crate::clock::UnixSeconds;
use reqwest::Method;
use serde_json::Value;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;
use tokio::sync::Semaphore;

/// The largest reply read. A token reply for 500 repositories lists each one in full (a few
/// KiB apiece); nothing GitHub sends here is larger.
const MAX_REPLY_BYTES: usize = 8 * 1024 * 1024;
/// The REST API version this code was written against (GitHub's `X-GitHub-Api-Version`).
const API_VERSION: &str = "2022-11-28";

/// How a request authenticates, which also says whose rate-limit budget it spends.
#[derive(Clone, Copy)]
pub(super) enum Auth<'a> {
    /// The App's JWT: lookups and token requests (the App's budget, which the gauge shows).
    App(&'a str),
    /// An installation token itself (its revocation; the installation's own budget).
    Installation(&'a str),
}

#[derive(Debug)]
pub(super) enum ApiError {
    /// GitHub's rate limit: no call before `until`.
    RateLimited { until: UnixSeconds },
    /// Not sent or no complete reply: network, timeout, size cap.
    Transport(String),
}

pub(super) struct Reply {
    pub status: u16,
    /// The JSON body, or `Null` when there is none or it is not JSON.
    pub body: Value,
}

pub(super) struct Api {
    base: String,
    http: reqwest::Client,
    timeout: Duration,
    in_flight: Semaphore,
    /// `x-ratelimit-remaining` of the App's budget as last seen; -1 before the first reply.
    remaining: AtomicI64,
    /// No App call before this (unix seconds); 0 when not limited.
    blocked_until: AtomicI64,
}

impl Api {
    pub(super) fn new(base: &str, timeout_secs: i64, max_in_flight: usize) -> Api {
        crate::identity::provider::install_crypto();
        let timeout = Duration::from_secs(u64::try_from(timeout_secs).unwrap_or(10));
        let http = reqwest::Client::builder()
            // Attack: a redirect would carry the App JWT or a token to wherever it points.
            .redirect(reqwest::redirect::Policy::none())
            // HTTP(S)_PROXY from the environment would choose where App credentials go.
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("ephemera/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Api {
            base: base.to_string(),
            http,
            timeout,
            in_flight: Semaphore::new(max_in_flight),
            remaining: AtomicI64::new(-1),
            blocked_until: AtomicI64::new(0),
        }
    }

    /// The App budget's remaining calls as GitHub last said (`None` before any reply).
    pub(super) fn remaining(&self) -> Option<u64> {
        u64::try_from(self.remaining.load(Ordering::Relaxed)).ok()
    }

    /// One call to `path` (which the caller built from checked names only). A rate-limited
    /// App budget refuses at once, without a request.
    pub(super) async fn call(
        &self,
        method: Method,
        path: &str,
        auth: Auth<'_>,
        body: Option<&Value>,
        now: UnixSeconds,
    ) -> Result<Reply, ApiError> {
        let app = matches!(auth, Auth::App(_));
        let until = self.blocked_until.load(Ordering::Relaxed);
        if app && until > now {
            return Err(ApiError::RateLimited { until });
        }
        let _permit = self.in_flight.acquire().await.map_err(|_| ApiError::Transport("shutting down".into()))?;
        let bearer = match auth {
            Auth::App(t) | Auth::Installation(t) => t,
        };
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .timeout(self.timeout)
            .bearer_auth(bearer)
            .header("accept", "application/vnd.github+json")
            .header("x-github-api-version", API_VERSION);
        if let Some(body) = body {
            request = request.json(body);
        }
        let mut response = request.send().await.map_err(|e| ApiError::Transport(transport(&e)))?;
        let status = response.status().as_u16();
        let header = |name: &str| -> Option<i64> {
            response.headers().get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok())
        };
        let (remaining, reset, retry_after) =
            (header("x-ratelimit-remaining"), header("x-ratelimit-reset"), header("retry-after"));
        if let (true, Some(r)) = (app, remaining) {
            self.remaining.store(r, Ordering::Relaxed);
        }
        // GitHub's primary limit (403 or 429 with the remaining count at 0, until
        // `x-ratelimit-reset`) and its secondary limits (403 or 429 with `retry-after`).
        if matches!(status, 403 | 429) && (retry_after.is_some() || remaining == Some(0)) {
            let until = match retry_after {
                Some(secs) => now + secs.clamp(1, 3600),
                None => reset.unwrap_or(now + 60).clamp(now + 1, now + 3600),
            };
            if app {
                self.blocked_until.fetch_max(until, Ordering::Relaxed);
            }
            return Err(ApiError::RateLimited { until });
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| ApiError::Transport(transport(&e)))? {
            if bytes.len() + chunk.len() > MAX_REPLY_BYTES {
                return Err(ApiError::Transport(format!("reply larger than {MAX_REPLY_BYTES} bytes")));
            }
            bytes.extend_from_slice(&chunk);
        }
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Reply { status, body })
    }
}

/// A reqwest error as a kind, without the URL (which holds nothing secret here, but the kind is
/// what an operator needs) or the error's source chain.
fn transport(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "connection failed".into()
    } else {
        "request failed".into()
    }
}
