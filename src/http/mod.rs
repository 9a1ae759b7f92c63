//! http: the wire (DESIGN §2). Routes, body limits, bearer extraction, request ids, and the one
//! place where an [`Error`] becomes a response body and a log line.

use crate::app::App;
use crate::error::{Error, Level};
use crate::identity::IdentityError;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{Next, from_fn};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

mod admin;
mod console;
mod deadline;
mod hooks;
mod oauth;
mod serve;
mod ssh;

pub use serve::{Bounds, Peer, serve};

/// Largest request body accepted on any endpoint.
pub const BODY_LIMIT: usize = 64 * 1024;

type AppState = State<Arc<App>>;
type AppRouter = Router<Arc<App>>;

pub fn router(app: Arc<App>) -> Router {
    let mut router = Router::new()
        .route("/v1/exchange", post(exchange))
        .route("/v1/revoke", post(revoke))
        .route("/v1/leases/{id}/renew", post(renew))
        .route("/v1/introspect", post(introspect))
        .route("/.well-known/openid-configuration", get(openid_configuration))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(admin::routes())
        .merge(ssh::routes())
        .merge(oauth::routes())
        .merge(hooks::routes(app.hooks()));
    // The operator console: only where the admin API it drives is on.
    if app.admin_enabled() {
        router = router.merge(console::routes());
    }
    if app.dev().is_some() {
        router = router
            .route("/dev/{platform}/.well-known/openid-configuration", get(dev_discovery))
            .route("/dev/{platform}/jwks", get(dev_jwks))
            .route("/dev/token", post(dev_token));
    }
    router
        .route_layer(from_fn(mark_route))
        .fallback(|| async { Error::NotFound })
        .method_not_allowed_fallback(|| async { Error::MethodNotAllowed })
        .layer(axum::middleware::from_fn_with_state(app.clone(), deadline::bound_body))
        .layer(from_fn(request_context))
        .with_state(app)
}

// ---- errors and request context -----------------------------------------------------------

/// An error on its way out; `request_context` renders it with the request id and logs it.
#[derive(Clone)]
struct ErrorReport {
    status: u16,
    code: &'static str,
    message: String,
    detail: String,
    level: Level,
    bearer_challenge: bool,
    retry_after_secs: Option<i64>,
    /// Rendered as RFC 6749 §5.2 asks (`POST /oauth/token`), not in the API's shape.
    oauth: bool,
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = status.into_response();
        response.extensions_mut().insert(ErrorReport {
            status: self.status(),
            code: self.code(),
            message: self.public_message(),
            detail: self.log_detail(),
            level: self.level(),
            bearer_challenge: matches!(self, Error::InvalidToken(_)),
            retry_after_secs: self.retry_after_secs(),
            oauth: false,
        });
        response
    }
}

/// The matched route template, so logs never carry a raw path (which could hold anything).
#[derive(Clone)]
struct Route(String);

async fn mark_route(req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string());
    let mut response = next.run(req).await;
    if let Some(r) = route {
        response.extensions_mut().insert(Route(r));
    }
    response
}

/// The request's id, for handlers that put it in an audit event.
#[derive(Clone)]
pub(crate) struct RequestId(pub String);

async fn request_context(mut req: Request, next: Next) -> Response {
    let request_id = crate::ids::request_id();
    req.extensions_mut().insert(RequestId(request_id.clone()));
    let method = req.method().clone();
    // `lease_id` is filled in by an exchange that issues one, so the request's own log line
    // names the lease (the audit event has the rest).
    let span = tracing::info_span!("request", request_id = %request_id, lease_id = tracing::field::Empty);
    let started = Instant::now();
    let mut response = next.run(req).instrument(span.clone()).await;
    let route = response.extensions_mut().remove::<Route>().map_or_else(|| "<unmatched>".to_string(), |r| r.0);
    if let Some(report) = response.extensions_mut().remove::<ErrorReport>() {
        let _enter = span.enter();
        match report.level {
            Level::Error => {
                tracing::error!(code = report.code, status = report.status, detail = %report.detail, "request failed")
            }
            Level::Warn => {
                tracing::warn!(code = report.code, status = report.status, detail = %report.detail, "request refused")
            }
            Level::Info => {
                tracing::info!(code = report.code, status = report.status, detail = %report.detail, "request refused")
            }
        }
        let body = match report.oauth {
            false => json!({"error": {"code": report.code, "message": report.message, "request_id": request_id}}),
            true => json!({"error": report.code, "error_description": report.message, "request_id": request_id}),
        };
        if report.oauth {
            oauth::no_store(response.headers_mut());
        }
        *response.body_mut() = Body::from(body.to_string());
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response.headers_mut().remove(header::CONTENT_LENGTH);
        if let Some(secs) = report.retry_after_secs {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        if report.bearer_challenge {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer error=\"invalid_token\""));
        }
    }
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", v);
    }
    span.in_scope(|| {
        tracing::info!(method = %method, route = %route, status = response.status().as_u16(), micros = started.elapsed().as_micros() as u64, "request");
    });
    response
}

// ---- request helpers ----------------------------------------------------------------------

/// The client a request comes from, for the per-address limits: its TCP peer, or, when the peer
/// is a trusted proxy, the address it forwarded for. `None` for a request that came through no
/// socket (in-process tests).
pub(crate) fn client(app: &App, peer: Option<axum::Extension<Peer>>, headers: &HeaderMap) -> Option<std::net::IpAddr> {
    let axum::Extension(Peer(peer)) = peer?;
    let forwarded = headers.get_all("x-forwarded-for").into_iter().filter_map(|v| v.to_str().ok());
    Some(app.limits().client(peer.ip(), forwarded))
}

/// `work` on the request's body, for a request that issues or renews credentials, under the
/// abuse limits: the client is admitted before anything is read (a cooled-off address costs no
/// signature check), the body is read before an issuing slot is taken (a slow body holds its
/// connection until `body_read_timeout`, never one of the `max_issuing` slots), the work holds
/// the slot, and a failure an attacker would cause is charged to the client's failure budget.
pub(crate) async fn limited<T, F: Future<Output = Result<T, Error>>>(
    app: &App,
    client: Option<std::net::IpAddr>,
    request_id: &str,
    headers: &HeaderMap,
    body: Body,
    work: impl FnOnce(Bytes) -> F,
) -> Result<T, Error> {
    app.admit_client(client, request_id).await?;
    let result = async {
        let bytes = read_body(headers, body).await?;
        let _slot = app.limits().issuing_slot().await?;
        work(bytes).await
    }
    .await;
    if let Err(e) = &result {
        app.client_failed(client, e);
    }
    result
}

/// Reads the body, refusing more than [`BODY_LIMIT`] bytes while reading (a declared length is
/// refused before reading anything).
pub(crate) async fn read_body(headers: &HeaderMap, body: Body) -> Result<Bytes, Error> {
    read_body_up_to(headers, body, BODY_LIMIT).await
}

/// [`read_body`] with another limit (admin endpoints that take a whole policy set).
pub(crate) async fn read_body_up_to(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, Error> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(Error::PayloadTooLarge);
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(Error::PayloadTooLarge),
        Err(e) if deadline::is_timeout(e.as_ref()) => Err(Error::RequestTimeout),
        Err(_) => Err(Error::BadRequest("the request body could not be read".into())),
    }
}

/// A JSON body into `T` (which denies unknown fields). An empty body reads as `{}` where `T`
/// allows it.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    // serde would read `T` from an array of all its fields in order too: an API of named
    // fields takes them by name only (`claims::from_json_body` refuses any other form).
    crate::claims::from_json_body(bytes).map_err(|e| {
        Error::BadRequest(match e {
            crate::claims::BodyError::NotAnObject => "the body is JSON, but not an object".into(),
            crate::claims::BodyError::Json(e) => describe_json_error(&e),
        })
    })
}

/// What was wrong with a JSON body, without quoting the caller's values: serde_json's own text
/// quotes string values, which may be anything a caller pasted (a token, say), and the message is
/// both returned and logged.
fn describe_json_error(e: &serde_json::Error) -> String {
    let at = format!("line {}, column {}", e.line(), e.column());
    let text = e.to_string();
    if e.is_data() {
        // `unknown field `x`, expected …` and `missing field `x`` name fields, not values; the
        // unknown name is repeated only when it looks like a field name.
        if let Some(rest) = text.strip_prefix("unknown field `") {
            let (name, expected) = rest.split_once('`').unwrap_or((rest, ""));
            let expected = expected.split(" at line").next().unwrap_or_default();
            let safe = name.len() <= 40 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            return match safe {
                true => format!("invalid JSON body: unknown field `{name}`{expected} ({at})"),
                false => format!("invalid JSON body: unknown field{expected} ({at})"),
            };
        }
        if text.starts_with("missing field `") {
            return format!("invalid JSON body: {}", text.split(" at line").next().unwrap_or(&text));
        }
        return format!("invalid JSON body: a field has the wrong type or value ({at})");
    }
    format!("invalid JSON body: not well-formed JSON ({at})")
}

pub(crate) fn bearer(headers: &HeaderMap) -> Result<&str, Error> {
    let value = headers.get(header::AUTHORIZATION).ok_or(IdentityError::Missing)?;
    let text = value.to_str().map_err(|_| IdentityError::Malformed("Authorization header is not text"))?;
    let (scheme, token) = text.split_once(' ').ok_or(IdentityError::Missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(IdentityError::Missing.into());
    }
    Ok(token.trim())
}

/// Runs `work` on its own task: a client that hangs up must not cut a revocation off halfway
/// (the request future is dropped on disconnect; a spawned task is not).
pub(crate) async fn detached<T: Send + 'static>(work: impl Future<Output = T> + Send + 'static) -> Result<T, Error> {
    tokio::spawn(work).await.map_err(|e| Error::Internal(format!("revocation task failed: {e}")))
}

pub(crate) fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response {
    (status, axum::Json(body)).into_response()
}

// ---- the job's endpoints ------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExchangeBody {
    policy: String,
    ttl: Option<String>,
    /// An `ssh` grant's key to certify (`ssh-ed25519 AAAA… comment`).
    ssh_public_key: Option<String>,
}

/// Does the caller want the `env` format (`Accept: text/plain` or `?format=env`)?
fn wants_env(headers: &HeaderMap, uri: &axum::http::Uri) -> bool {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or_default();
    accept.contains("text/plain")
        || uri.query().is_some_and(|q| form_urlencoded::parse(q.as_bytes()).any(|(k, v)| k == "format" && v == "env"))
}

async fn exchange(
    State(app): AppState,
    axum::Extension(RequestId(request_id)): axum::Extension<RequestId>,
    peer: Option<axum::Extension<Peer>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Error> {
    let client = client(&app, peer, &headers);
    let work = |bytes| exchange_request(&app, &request_id, &uri, &headers, bytes);
    limited(&app, client, &request_id, &headers, body, work).await
}

async fn exchange_request(
    app: &Arc<App>,
    request_id: &str,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    bytes: Bytes,
) -> Result<Response, Error> {
    let request: ExchangeBody = parse_json(&bytes)?;
    // The value is not echoed: a caller who pasted something secret into `ttl` gets it back
    // nowhere.
    let ttl = request
        .ttl
        .as_deref()
        .map(crate::clock::parse_duration)
        .transpose()
        .map_err(|_| Error::BadRequest("`ttl` must be a duration like 10m or 1h".into()))?;
    // The job's own key, refused here (400) before a token is verified or anything minted; the
    // `ssh` backend checks it with the same function. The message quotes no part of it.
    if let Some(key) = request.ssh_public_key.as_deref() {
        crate::ssh_format::parse_public_key(key).map_err(|e| Error::BadRequest(format!("`ssh_public_key` {e}")))?;
    }
    let token = bearer(headers)?;
    let exchange = crate::app::ExchangeRequest {
        policy: &request.policy,
        ttl_secs: ttl,
        ssh_public_key: request.ssh_public_key.as_deref(),
    };
    let reply = app.exchange(token, &exchange, request_id).await?;
    credentials_response(app, StatusCode::CREATED, reply, headers, uri).await
}

/// An exchange's or a renewal's reply: JSON, or the `env` format when asked for. A reply that
/// cannot be rendered withdraws its lease: never a 2xx with empty variables while the
/// credentials are live.
async fn credentials_response(
    app: &App,
    status: StatusCode,
    reply: crate::app::ExchangeReply,
    headers: &HeaderMap,
    uri: &axum::http::Uri,
) -> Result<Response, Error> {
    if !wants_env(headers, uri) {
        return Ok(json_response(status, &reply));
    }
    match reply.to_env() {
        Ok(body) => Ok((status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()),
        Err(e) => Err(app.withdraw(&reply, e).await),
    }
}

/// A renewal takes no parameters: the lease decides what is minted. An empty body or `{}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RenewBody {}

/// `POST /v1/leases/{id}/renew` (issue 15) with `Authorization: Bearer <renew token>`: 200 with
/// fresh credentials in the exchange reply's shape.
async fn renew(
    State(app): AppState,
    Path(id): Path<String>,
    axum::Extension(RequestId(request_id)): axum::Extension<RequestId>,
    peer: Option<axum::Extension<Peer>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Error> {
    let client = client(&app, peer, &headers);
    let (app_ref, id_ref, request_id_ref, headers_ref, uri_ref) = (&app, &id, &request_id, &headers, &uri);
    let work = move |bytes: Bytes| async move {
        let RenewBody {} = parse_json(&bytes)?;
        let token = bearer(headers_ref)?;
        let reply = app_ref.renew(id_ref, token, request_id_ref).await?;
        credentials_response(app_ref, StatusCode::OK, reply, headers_ref, uri_ref).await
    };
    limited(&app, client, &request_id, &headers, body, work).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    lease_id: Option<String>,
}

async fn revoke(State(app): AppState, headers: HeaderMap, body: Body) -> Result<Response, Error> {
    let bytes = read_body(&headers, body).await?;
    let request: RevokeBody = parse_json(&bytes)?;
    let token = bearer(&headers)?.to_string();
    let reply = detached(async move { app.revoke(&token, request.lease_id.as_deref()).await }).await??;
    Ok(json_response(StatusCode::OK, &reply))
}

/// RFC 7662. Outside dev mode it needs the admin token (a relying service holds it); every
/// token problem answers `{"active": false}`, never an error that says why.
async fn introspect(State(app): AppState, headers: HeaderMap, body: Body) -> Result<Response, Error> {
    if app.dev().is_none() && !bearer(&headers).is_ok_and(|t| app.is_admin(t)) {
        return Err(Error::Unauthorized);
    }
    let bytes = read_body(&headers, body).await?;
    let token = form_urlencoded::parse(&bytes).find(|(k, _)| k == "token").map(|(_, v)| v.into_owned());
    let Some(token) = token else {
        return Err(Error::BadRequest("expected a form body `token=…` (RFC 7662)".into()));
    };
    Ok(json_response(StatusCode::OK, &app.introspect(&token).await))
}

// ---- broker JWT discovery -----------------------------------------------------------------

async fn openid_configuration(State(app): AppState) -> Response {
    let iss = app.public_url();
    json_response(
        StatusCode::OK,
        &json!({
            "issuer": iss,
            "jwks_uri": format!("{iss}/.well-known/jwks.json"),
            "introspection_endpoint": format!("{iss}/v1/introspect"),
            "token_endpoint": format!("{iss}/oauth/token"),
            "grant_types_supported": [oauth::GRANT_TYPE_TOKEN_EXCHANGE],
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256", "EdDSA"],
        }),
    )
}

async fn jwks(State(app): AppState) -> Response {
    json_response(StatusCode::OK, &app.jwks())
}

// ---- operations ---------------------------------------------------------------------------

async fn healthz() -> Response {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

async fn readyz(State(app): AppState) -> Response {
    let (ready, detail) = app.readiness();
    json_response(if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, &detail)
}

async fn metrics(State(app): AppState) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics_text().await).into_response()
}

// ---- dev mode -----------------------------------------------------------------------------

async fn dev_discovery(State(app): AppState, Path(platform): Path<String>) -> Result<Response, Error> {
    let dev = app.dev().ok_or(Error::NotFound)?;
    Ok(json_response(StatusCode::OK, &dev.discovery(dev.platform_named(&platform).ok_or(Error::NotFound)?)))
}

async fn dev_jwks(State(app): AppState, Path(platform): Path<String>) -> Result<Response, Error> {
    let dev = app.dev().ok_or(Error::NotFound)?;
    dev.platform_named(&platform).ok_or(Error::NotFound)?;
    Ok(json_response(StatusCode::OK, &dev.jwks()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DevTokenBody {
    issuer: Option<String>,
    claims: Option<serde_json::Map<String, Value>>,
}

async fn dev_token(State(app): AppState, headers: HeaderMap, body: Body) -> Result<Response, Error> {
    let dev = app.dev().ok_or(Error::NotFound)?;
    let bytes = read_body(&headers, body).await?;
    let request: DevTokenBody = parse_json(&bytes)?;
    let platform = dev
        .platform_named(request.issuer.as_deref().unwrap_or("github"))
        .ok_or_else(|| Error::BadRequest(format!("`issuer` is one of {}", dev.issuer_names().join(", "))))?;
    let token = dev.token(platform, app.public_url(), request.claims.as_ref(), app.now()).map_err(Error::Internal)?;
    Ok(([(header::CONTENT_TYPE, "text/plain")], format!("{token}\n")).into_response())
}
