//! `POST /oauth/token`: OAuth 2.0 Token Exchange (RFC 8693 §2) on the wire, and the
//! authorization server metadata that points clients at it (RFC 8414).
//!
//! The request is `application/x-www-form-urlencoded`; unrecognised parameters are ignored and
//! no parameter but `resource` and `audience` may repeat (RFC 6749 §3.2). Errors are RFC 6749
//! §5.2 bodies (`error`, `error_description`) with the request id beside them; the status and
//! code come from [`oauth_error`]. Replies are never cached (RFC 6749 §5.1).

use super::{AppRouter, AppState, RequestId};
use crate::app::TokenExchangeRequest;
use crate::error::Error;
use crate::policy::DenialReason;
use crate::policy::delegation::{MAX_RESOURCE_BYTES, is_resource, is_scope};
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

pub const GRANT_TYPE_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const TOKEN_TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
pub const TOKEN_TYPE_ID_TOKEN: &str = "urn:ietf:params:oauth:token-type:id_token";

/// Token types a subject or actor token may be: every one of them is a JWT here (a CI ID token,
/// or an access token this broker issued).
const INPUT_TOKEN_TYPES: [&str; 3] = [TOKEN_TYPE_ID_TOKEN, TOKEN_TYPE_JWT, TOKEN_TYPE_ACCESS_TOKEN];

pub(super) fn routes() -> AppRouter {
    AppRouter::new().route("/oauth/token", post(token)).route("/.well-known/oauth-authorization-server", get(metadata))
}

/// An error rendered as RFC 6749 §5.2 asks (`request_context` writes the body).
pub(super) struct OAuthFailure(pub Error);

impl From<Error> for OAuthFailure {
    fn from(e: Error) -> Self {
        OAuthFailure(e)
    }
}

impl IntoResponse for OAuthFailure {
    fn into_response(self) -> Response {
        let (code, status) = oauth_error(&self.0);
        let mut response = self.0.into_response();
        *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
        if let Some(report) = response.extensions_mut().get_mut::<super::ErrorReport>() {
            report.status = status;
            report.code = code;
            report.oauth = true;
            report.bearer_challenge = false;
        }
        response
    }
}

/// The RFC 6749 §5.2 / RFC 8693 §2.2.2 code and the status of an error: `invalid_request` for
/// the request and its tokens (invalid, or unacceptable to the policy), `invalid_target` for a
/// resource or audience no tool answers to, `invalid_scope` for a scope not granted.
pub fn oauth_error(e: &Error) -> (&'static str, u16) {
    match e {
        Error::OAuth { code, .. } => (code, 400),
        Error::Denied(d) => match d.reason {
            DenialReason::NoTools
            | DenialReason::TargetNotListed
            | DenialReason::TargetAmbiguous
            | DenialReason::ToolChanged { .. } => ("invalid_target", 400),
            DenialReason::ScopeNotGranted { .. }
            | DenialReason::ScopeNotForActor { .. }
            | DenialReason::ScopeWidened { .. } => ("invalid_scope", 400),
            _ => ("invalid_request", 400),
        },
        Error::BadRequest(_) | Error::InvalidToken(_) => ("invalid_request", 400),
        Error::PayloadTooLarge => ("invalid_request", 413),
        // RFC 6749 has no code for a rate limit: the status (429) and `Retry-After` say it.
        Error::RateLimited { .. } => ("temporarily_unavailable", 429),
        Error::RequestTimeout => ("invalid_request", 408),
        Error::Unavailable(_) | Error::Overloaded(_) | Error::Backend { retry_after_secs: Some(_), .. } => {
            ("temporarily_unavailable", 503)
        }
        Error::Backend { .. } => ("server_error", 502),
        _ => ("server_error", 500),
    }
}

fn refuse(code: &'static str, message: impl Into<String>) -> OAuthFailure {
    let message = message.into();
    OAuthFailure(Error::OAuth { code, detail: message.clone(), message })
}

/// The parameters, each singleton at most once.
#[derive(Default)]
struct Params {
    grant_type: Option<String>,
    subject_token: Option<String>,
    subject_token_type: Option<String>,
    actor_token: Option<String>,
    actor_token_type: Option<String>,
    requested_token_type: Option<String>,
    scope: Option<String>,
    policy: Option<String>,
    resource: Vec<String>,
    audience: Vec<String>,
}

impl Params {
    fn parse(body: &[u8]) -> Result<Params, OAuthFailure> {
        let mut p = Params::default();
        for (key, value) in form_urlencoded::parse(body) {
            let slot = match &*key {
                "grant_type" => &mut p.grant_type,
                "subject_token" => &mut p.subject_token,
                "subject_token_type" => &mut p.subject_token_type,
                "actor_token" => &mut p.actor_token,
                "actor_token_type" => &mut p.actor_token_type,
                "requested_token_type" => &mut p.requested_token_type,
                "scope" => &mut p.scope,
                "policy" => &mut p.policy,
                "resource" => {
                    p.resource.push(value.into_owned());
                    continue;
                }
                "audience" => {
                    p.audience.push(value.into_owned());
                    continue;
                }
                // RFC 6749 §3.2: unrecognised parameters are ignored (`client_id`, a library's
                // `options`).
                _ => continue,
            };
            if slot.is_some() {
                // The name is one of ours, so it is safe to repeat; the values are not.
                return Err(refuse("invalid_request", format!("`{key}` is given more than once")));
            }
            *slot = Some(value.into_owned());
        }
        Ok(p)
    }
}

fn required<'a>(value: &'a Option<String>, name: &str) -> Result<&'a str, OAuthFailure> {
    match value.as_deref() {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(refuse("invalid_request", format!("`{name}` is required"))),
    }
}

fn token_type(value: &str, name: &str) -> Result<(), OAuthFailure> {
    if INPUT_TOKEN_TYPES.contains(&value) {
        return Ok(());
    }
    Err(refuse(
        "invalid_request",
        format!("`{name}` must be one of {} (every token here is a JWT)", INPUT_TOKEN_TYPES.join(", ")),
    ))
}

async fn token(
    State(app): AppState,
    axum::Extension(RequestId(request_id)): axum::Extension<RequestId>,
    peer: Option<axum::Extension<super::Peer>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, OAuthFailure> {
    let client = super::client(&app, peer, &headers);
    let (app_ref, id_ref, headers_ref) = (&app, &request_id, &headers);
    let work = move |bytes| async move { token_request(app_ref, id_ref, headers_ref, bytes).await.map_err(|f| f.0) };
    Ok(super::limited(&app, client, &request_id, &headers, body, work).await?)
}

async fn token_request(
    app: &crate::app::App,
    request_id: &str,
    headers: &HeaderMap,
    bytes: axum::body::Bytes,
) -> Result<Response, OAuthFailure> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !content_type.to_ascii_lowercase().starts_with("application/x-www-form-urlencoded") {
        return Err(refuse("invalid_request", "the body must be application/x-www-form-urlencoded (RFC 8693 §2.1)"));
    }
    let p = Params::parse(&bytes)?;
    let grant_type = required(&p.grant_type, "grant_type")?;
    if grant_type != GRANT_TYPE_TOKEN_EXCHANGE {
        return Err(refuse(
            "unsupported_grant_type",
            format!("the only grant_type here is {GRANT_TYPE_TOKEN_EXCHANGE}"),
        ));
    }
    let subject_token = required(&p.subject_token, "subject_token")?;
    token_type(required(&p.subject_token_type, "subject_token_type")?, "subject_token_type")?;
    // RFC 8693 §2.1: `actor_token_type` is required with an actor token and forbidden without.
    match (&p.actor_token, &p.actor_token_type) {
        (Some(_), Some(t)) => token_type(t, "actor_token_type")?,
        (Some(_), None) => return Err(refuse("invalid_request", "`actor_token_type` is required with `actor_token`")),
        (None, Some(_)) => return Err(refuse("invalid_request", "`actor_token_type` is given without `actor_token`")),
        (None, None) => {}
    }
    let issued_token_type = match p.requested_token_type.as_deref() {
        None | Some(TOKEN_TYPE_ACCESS_TOKEN) => TOKEN_TYPE_ACCESS_TOKEN,
        Some(TOKEN_TYPE_JWT) => TOKEN_TYPE_JWT,
        Some(_) => {
            return Err(refuse(
                "invalid_request",
                format!("`requested_token_type` must be {TOKEN_TYPE_ACCESS_TOKEN} or {TOKEN_TYPE_JWT}"),
            ));
        }
    };
    // One token per tool server: never one token that several servers would all accept.
    if p.resource.len() > 1 {
        return Err(refuse(
            "invalid_target",
            "ask for one `resource` per request: each tool server gets its own token",
        ));
    }
    if p.audience.len() > 1 {
        return Err(refuse(
            "invalid_target",
            "ask for one `audience` per request: each tool server gets its own token",
        ));
    }
    let resource = p.resource.first().map(String::as_str);
    if resource.is_some_and(|r| !is_resource(r)) {
        return Err(refuse(
            "invalid_target",
            format!(
                "`resource` must be an absolute URI without a fragment, at most {MAX_RESOURCE_BYTES} bytes (RFC 8707)"
            ),
        ));
    }
    let audience = p.audience.first().map(String::as_str);
    // The policy is `policy`, else `audience` (RFC 8693's logical name of the target); with
    // `policy` given, `audience` names a tool.
    let (policy, tool) = match (p.policy.as_deref(), audience) {
        (Some(policy), tool) => (policy, tool),
        (None, Some(audience)) => (audience, None),
        (None, None) => {
            return Err(refuse("invalid_request", "name the policy with `policy` or, when that is absent, `audience`"));
        }
    };
    let scopes: Option<Vec<String>> = match p.scope.as_deref() {
        None => None,
        Some(text) => {
            let list: Vec<String> = text.split(' ').filter(|s| !s.is_empty()).map(str::to_string).collect();
            if list.is_empty() || !list.iter().all(|s| is_scope(s)) {
                return Err(refuse(
                    "invalid_scope",
                    "`scope` must be scope tokens separated by spaces (RFC 6749 §3.3), at most 128 bytes each",
                ));
            }
            Some(list)
        }
    };
    let request = TokenExchangeRequest {
        policy,
        subject_token,
        actor_token: p.actor_token.as_deref(),
        resource,
        tool,
        scopes: scopes.as_deref(),
    };
    let reply = app.token_exchange(&request, request_id).await?;
    let body = json!({
        "access_token": reply.access_token.expose(),
        "issued_token_type": issued_token_type,
        "token_type": "Bearer",
        "expires_in": reply.expires_in,
        "scope": reply.scope,
        "lease_id": reply.lease_id,
    });
    let mut response = super::json_response(StatusCode::OK, &body);
    no_store(response.headers_mut());
    Ok(response)
}

/// RFC 6749 §5.1: a reply carrying a token is never cached.
pub(super) fn no_store(headers: &mut HeaderMap) {
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

/// RFC 8414 authorization server metadata: where the token endpoint is and what it takes.
async fn metadata(State(app): AppState) -> Response {
    let iss = app.public_url();
    super::json_response(
        StatusCode::OK,
        &json!({
            "issuer": iss,
            "token_endpoint": format!("{iss}/oauth/token"),
            "jwks_uri": format!("{iss}/.well-known/jwks.json"),
            "introspection_endpoint": format!("{iss}/v1/introspect"),
            "grant_types_supported": [GRANT_TYPE_TOKEN_EXCHANGE],
            "token_endpoint_auth_methods_supported": ["none"],
        }),
    )
}
