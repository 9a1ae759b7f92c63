//! Platform webhooks (DESIGN §2): a job-completed event ends every lease of that job.
//!
//! Each hook is off — its route does not exist, so 404 — unless its secret is configured. A
//! delivery is authenticated over the raw body before a byte of it is parsed; only then is it
//! deduplicated, read, and acted on. Job keys are built from JSON numbers only, so a payload
//! cannot forge a key with `:`.

use super::{AppRouter, describe_json_error, detached, json_response, read_body};
use crate::app::App;
use crate::config::{HookConfig, HooksConfig};
use crate::error::Error;
use crate::hook_format::{self, HookAction, HookError};
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use ring::{digest, hmac};
use serde_json::json;
use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

/// How many delivery ids each hook remembers for deduplication.
const REMEMBERED_DELIVERIES: usize = 10_000;
/// Delivery ids are GUIDs (36 characters); anything far longer is not one.
const MAX_DELIVERY_ID: usize = 128;
/// Why every lease ends here, in the ledger and the audit trail.
const REASON: &str = "webhook";

pub(super) fn routes(config: &HooksConfig) -> AppRouter {
    let mut router = Router::new();
    if let Some(c) = &config.github {
        let hook = Arc::new(Hook::github(c));
        router = router.route(
            "/v1/hooks/github",
            post(move |State(app): State<Arc<App>>, headers: HeaderMap, body: Body| {
                github(app, hook.clone(), headers, body)
            }),
        );
    }
    if let Some(c) = &config.gitlab {
        let hook = Arc::new(Hook::gitlab(c));
        router = router.route(
            "/v1/hooks/gitlab",
            post(move |State(app): State<Arc<App>>, headers: HeaderMap, body: Body| {
                gitlab(app, hook.clone(), headers, body)
            }),
        );
    }
    if let Some(c) = &config.buildkite {
        let hook = Arc::new(Hook::buildkite(c, config.buildkite_signed));
        router = router.route(
            "/v1/hooks/buildkite",
            post(move |State(app): State<Arc<App>>, headers: HeaderMap, body: Body| {
                buildkite(app, hook.clone(), headers, body)
            }),
        );
    }
    router
}

// ---- the platforms ----------------------------------------------------------------------------
// What a body asks for is read by the pure functions of `hook_format` (fuzzed by examples/fuzz);
// each handler authenticates, claims the delivery, then acts on their answer.

async fn github(app: Arc<App>, hook: Arc<Hook>, headers: HeaderMap, body: Body) -> Result<Response, Error> {
    let bytes = read_body(&headers, body).await?;
    hook.authenticate(&headers, &bytes, app.now())?;
    let delivery = delivery_id(&headers, "x-github-delivery")?;
    let Some(claim) = claim(&app, &hook, delivery).await else { return Ok(duplicate(&hook, delivery)) };
    let event = headers.get("x-github-event").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let action = hook_format::github(event, &bytes).map_err(bad_body)?;
    act(app, &hook, delivery, claim, action).await
}

async fn gitlab(app: Arc<App>, hook: Arc<Hook>, headers: HeaderMap, body: Body) -> Result<Response, Error> {
    let bytes = read_body(&headers, body).await?;
    hook.authenticate(&headers, &bytes, app.now())?;
    let delivery = delivery_id(&headers, "x-gitlab-event-uuid")?;
    let Some(claim) = claim(&app, &hook, delivery).await else { return Ok(duplicate(&hook, delivery)) };
    let action = hook_format::gitlab(&bytes).map_err(bad_body)?;
    act(app, &hook, delivery, claim, action).await
}

/// `job.finished` (`X-Buildkite-Event`) ends the leases of `buildkite:<job.id>`. Buildkite sends
/// no delivery id: a redelivery ends the job again, which ends nothing more.
async fn buildkite(app: Arc<App>, hook: Arc<Hook>, headers: HeaderMap, body: Body) -> Result<Response, Error> {
    let bytes = read_body(&headers, body).await?;
    hook.authenticate(&headers, &bytes, app.now())?;
    let Some(claim) = claim(&app, &hook, None).await else { return Ok(duplicate(&hook, None)) };
    let event = headers.get("x-buildkite-event").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let action = hook_format::buildkite(event, &bytes).map_err(bad_body)?;
    act(app, &hook, None, claim, action).await
}

/// A body `hook_format` refused: a 400 that does not quote it (`describe_json_error`).
fn bad_body(e: HookError) -> Error {
    match e {
        HookError::Json(e) => Error::BadRequest(describe_json_error(&e)),
        HookError::NotABuildkiteJobId => Error::BadRequest("`job.id` is not a Buildkite job id".into()),
        HookError::NotAnObject => Error::BadRequest("the body is JSON, but not an object".into()),
    }
}

async fn act(
    app: Arc<App>,
    hook: &Hook,
    delivery: Option<&str>,
    claim: Claim<'_>,
    action: HookAction,
) -> Result<Response, Error> {
    match action {
        HookAction::Ignore(reason) => Ok(ignored(hook, delivery, claim, reason)),
        HookAction::EndJob(key) => end_job(app, hook, delivery, claim, key).await,
    }
}

// ---- shared -----------------------------------------------------------------------------------

/// One enabled webhook.
struct Hook {
    name: &'static str,
    issuer: String,
    auth: Auth,
    deliveries: Deliveries,
}

enum Auth {
    /// GitHub: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256(secret, body)>`.
    Hmac(hmac::Key),
    /// GitLab (`X-Gitlab-Token`), Buildkite (`X-Buildkite-Token`): the token in this header;
    /// only its SHA-256 is kept.
    Token(&'static str, digest::Digest),
    /// Buildkite's signed mode: `X-Buildkite-Signature: timestamp=<unix>,signature=<hex
    /// HMAC-SHA256(secret, "<timestamp>.<body>")>`. The secret never travels.
    BuildkiteSignature(hmac::Key),
}

/// How far a signed Buildkite delivery's timestamp may be from now. Attack: a captured delivery
/// replayed later; within the window a replay only ends a job that ended anyway.
const SIGNATURE_WINDOW_SECS: i64 = 300;

impl Hook {
    fn github(c: &HookConfig) -> Hook {
        let key = hmac::Key::new(hmac::HMAC_SHA256, c.secret.expose().as_bytes());
        Hook::new("github", c, Auth::Hmac(key))
    }

    fn gitlab(c: &HookConfig) -> Hook {
        let token = digest::digest(&digest::SHA256, c.secret.expose().as_bytes());
        Hook::new("gitlab", c, Auth::Token("x-gitlab-token", token))
    }

    fn buildkite(c: &HookConfig, signed: bool) -> Hook {
        let auth = if signed {
            Auth::BuildkiteSignature(hmac::Key::new(hmac::HMAC_SHA256, c.secret.expose().as_bytes()))
        } else {
            Auth::Token("x-buildkite-token", digest::digest(&digest::SHA256, c.secret.expose().as_bytes()))
        };
        Hook::new("buildkite", c, auth)
    }

    fn new(name: &'static str, c: &HookConfig, auth: Auth) -> Hook {
        Hook { name, issuer: c.issuer.clone(), auth, deliveries: Deliveries::default() }
    }

    /// The sender holds the secret. Nothing of the body is read before this passes. `now` is
    /// what a signed timestamp is checked against.
    fn authenticate(&self, headers: &HeaderMap, body: &[u8], now: i64) -> Result<(), Error> {
        let result = match &self.auth {
            Auth::Hmac(key) => github_signature(headers).and_then(|tag| {
                // Constant time: `ring` compares the tags without an early exit.
                hmac::verify(key, body, &tag).map_err(|_| "signature does not match the body")
            }),
            Auth::Token(header, expected) => match headers.get(*header) {
                None => Err("no token header"),
                // Digests of both, so neither the comparison's time nor its length check says
                // anything about the token's length.
                Some(given) => {
                    let given = digest::digest(&digest::SHA256, given.as_bytes());
                    match crate::secret::constant_time_eq(given.as_ref(), expected.as_ref()) {
                        true => Ok(()),
                        false => Err("the token header does not match"),
                    }
                }
            },
            Auth::BuildkiteSignature(key) => buildkite_signature(headers).and_then(|(timestamp, tag)| {
                let mut signed = format!("{timestamp}.").into_bytes();
                signed.extend_from_slice(body);
                hmac::verify(key, &signed, &tag).map_err(|_| "signature does not match the body")?;
                let at: i64 = timestamp.parse().map_err(|_| "the signature's timestamp is not a number")?;
                if (now - at).abs() > SIGNATURE_WINDOW_SECS {
                    return Err("the signature's timestamp is more than 5 minutes away");
                }
                Ok(())
            }),
        };
        result.map_err(|reason| {
            tracing::warn!(hook = self.name, reason, "webhook delivery not authenticated");
            Error::Unauthorized
        })
    }

    /// The job key as the verifier builds it for this hook's issuer (`Issuer::job_key`). The
    /// issuer always exists: config validation checks the name, and dev mode's stand-ins keep it.
    fn job_key(&self, app: &App, key: String) -> String {
        app.job_key(&self.issuer, key)
    }
}

/// `sha256=<64 hex digits>`.
fn github_signature(headers: &HeaderMap) -> Result<[u8; 32], &'static str> {
    let value = headers.get("x-hub-signature-256").ok_or("no X-Hub-Signature-256 header")?;
    let text = value.to_str().map_err(|_| "X-Hub-Signature-256 is not text")?;
    let hex = text.strip_prefix("sha256=").ok_or("X-Hub-Signature-256 does not start with sha256=")?;
    crate::config::parse_sha256_hex(hex).ok_or("X-Hub-Signature-256 is not 64 hex digits")
}

/// `timestamp=<digits>,signature=<64 hex digits>` → (timestamp text, tag).
fn buildkite_signature(headers: &HeaderMap) -> Result<(String, [u8; 32]), &'static str> {
    let value = headers.get("x-buildkite-signature").ok_or("no X-Buildkite-Signature header")?;
    let text = value.to_str().map_err(|_| "X-Buildkite-Signature is not text")?;
    let (mut timestamp, mut signature) = (None, None);
    for part in text.split(',') {
        match part.trim().split_once('=') {
            Some(("timestamp", t)) if !t.is_empty() && t.len() <= 12 && t.bytes().all(|b| b.is_ascii_digit()) => {
                timestamp = Some(t.to_string());
            }
            Some(("signature", s)) => signature = crate::config::parse_sha256_hex(s),
            _ => return Err("X-Buildkite-Signature is not timestamp=…,signature=…"),
        }
    }
    match (timestamp, signature) {
        (Some(t), Some(s)) => Ok((t, s)),
        _ => Err("X-Buildkite-Signature lacks a timestamp or a 64-hex-digit signature"),
    }
}

/// The delivery's id, when the platform sent one.
fn delivery_id<'h>(headers: &'h HeaderMap, name: &str) -> Result<Option<&'h str>, Error> {
    let Some(value) = headers.get(name) else { return Ok(None) };
    match value.to_str() {
        Ok(id) if !id.is_empty() && id.len() <= MAX_DELIVERY_ID => Ok(Some(id)),
        _ => Err(Error::BadRequest(format!("the {name} header is not a delivery id"))),
    }
}

/// Claims the delivery: `None` when it is a duplicate, seen by this process or, through the
/// shared store, by another replica. A concurrent delivery to two replicas may be acted on by
/// both, which is harmless: a lease's revocation is handed to one caller, and ending a job twice
/// ends nothing more.
async fn claim<'h>(app: &App, hook: &'h Hook, delivery: Option<&str>) -> Option<Claim<'h>> {
    let claim = hook.deliveries.claim(delivery)?;
    if let Some(id) = delivery
        && app.delivery_seen(hook.name, id).await
    {
        claim.keep();
        return None;
    }
    Some(claim)
}

/// Ends the job's leases. The revocation runs in its own task, so a platform that stops waiting
/// for the reply (GitHub gives up after 10 s) does not cut it short.
async fn end_job(
    app: Arc<App>,
    hook: &Hook,
    delivery: Option<&str>,
    claim: Claim<'_>,
    key: String,
) -> Result<Response, Error> {
    let job = hook.job_key(&app, key);
    let ended = job.clone();
    let ending = app.clone();
    let reply = detached(async move { ending.end_job(&ended, REASON).await }).await??;
    if let Some(id) = delivery {
        app.record_delivery(hook.name, id).await;
    }
    claim.keep();
    tracing::info!(hook = hook.name, delivery, job = %job, revoked = ?reply.revoked, pending = ?reply.pending, "webhook ended job");
    Ok(json_response(StatusCode::OK, &reply))
}

fn ignored(hook: &Hook, delivery: Option<&str>, claim: Claim<'_>, reason: &'static str) -> Response {
    claim.keep();
    tracing::info!(hook = hook.name, delivery, reason, "webhook ignored");
    json_response(StatusCode::OK, &json!({"ignored": reason}))
}

fn duplicate(hook: &Hook, delivery: Option<&str>) -> Response {
    tracing::info!(hook = hook.name, delivery, "webhook duplicate delivery ignored");
    json_response(StatusCode::OK, &json!({"duplicate": true}))
}

/// The last [`REMEMBERED_DELIVERIES`] delivery ids, oldest first. In memory only: a restart
/// forgets them, which is safe because ending a job's leases twice ends nothing more.
#[derive(Default)]
struct Deliveries(Mutex<(VecDeque<String>, HashSet<String>)>);

impl Deliveries {
    /// `None` when `id` was seen already; otherwise a claim on it that is released again unless
    /// the delivery is handled ([`Claim::keep`]), so a failed delivery can be redelivered.
    fn claim<'d>(&'d self, id: Option<&str>) -> Option<Claim<'d>> {
        let Some(id) = id else { return Some(Claim { deliveries: self, id: None }) };
        let mut guard = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let (order, seen) = &mut *guard;
        if !seen.insert(id.to_string()) {
            return None;
        }
        order.push_back(id.to_string());
        if order.len() > REMEMBERED_DELIVERIES
            && let Some(oldest) = order.pop_front()
        {
            seen.remove(&oldest);
        }
        Some(Claim { deliveries: self, id: Some(id.to_string()) })
    }

    fn release(&self, id: &str) {
        let mut guard = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let (order, seen) = &mut *guard;
        if seen.remove(id) {
            order.retain(|o| o != id);
        }
    }
}

/// A delivery id being handled; forgotten again on drop (an error, a cancelled request) unless
/// kept.
struct Claim<'d> {
    deliveries: &'d Deliveries,
    id: Option<String>,
}

impl Claim<'_> {
    fn keep(mut self) {
        self.id = None;
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.deliveries.release(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_remember_a_bounded_window_and_release_unhandled_ones() {
        let d = Deliveries::default();
        d.claim(Some("a")).unwrap().keep();
        assert!(d.claim(Some("a")).is_none(), "a kept delivery is a duplicate");
        drop(d.claim(Some("b")).unwrap());
        assert!(d.claim(Some("b")).is_some(), "a dropped claim is released");
        assert!(d.claim(None).is_some() && d.claim(None).is_some(), "no id: never a duplicate");
        for i in 0..REMEMBERED_DELIVERIES {
            d.claim(Some(&i.to_string())).unwrap().keep();
        }
        assert!(d.claim(Some("a")).is_some(), "the oldest id was forgotten");
        assert!(d.claim(Some(&(REMEMBERED_DELIVERIES - 1).to_string())).is_none());
        let (order, seen) = &*d.0.lock().unwrap();
        assert!(order.len() <= REMEMBERED_DELIVERIES && seen.len() == order.len());
    }
}
