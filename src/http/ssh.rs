//! The `ssh` backends' public endpoints (docs/ssh.md): the CA public key servers trust
//! (`TrustedUserCAKeys`) and the KRL of certificates whose leases ended (`RevokedKeys`). No
//! authentication: neither is secret, and servers fetch them from cron.

use super::{AppRouter, AppState};
use crate::error::Error;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

pub(super) fn routes() -> AppRouter {
    Router::new().route("/v1/ssh/ca.pub", get(ca_public_key)).route("/v1/ssh/krl", get(krl))
}

/// `GET /v1/ssh/ca.pub[?backend=NAME]`: one line, `ssh-ed25519 AAAA… ephemera-NAME`.
async fn ca_public_key(State(app): AppState, uri: Uri) -> Result<Response, Error> {
    let backend = uri
        .query()
        .and_then(|q| form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "backend").map(|(_, v)| v.into_owned()));
    let line = app.ssh_ca_public_key(backend.as_deref())?;
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"))], line).into_response())
}

/// `GET /v1/ssh/krl`: OpenSSH's binary KRL, never cached (it changes with every revocation).
async fn krl(State(app): AppState) -> Result<Response, Error> {
    let body = app.ssh_krl()?;
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream")),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
    ];
    Ok((headers, body).into_response())
}
