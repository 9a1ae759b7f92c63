//! The admin API (DESIGN §2): list, inspect and end leases — one, a job's, or every live lease
//! of a policy, a repository or project id, or an actor (the "leaver" event). Bearer admin
//! token, compared as a SHA-256 digest in constant time; without a configured token every admin
//! call is refused.

use super::{AppRouter, AppState, bearer, detached, json_response, parse_json, read_body};
use crate::app::App;
use crate::clock::rfc3339;
use crate::error::Error;
use crate::ledger::{Lease, LeaseFilter, LeaseState};
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

/// Longest list one call returns; `truncated` says when there was more.
const MAX_LIST: usize = 1000;

pub(super) fn routes() -> AppRouter {
    Router::new()
        .route("/v1/leases", get(list))
        .route("/v1/leases/revoke", post(revoke_matching))
        .route("/v1/leases/{id}", get(show).delete(revoke_one))
        .route("/v1/jobs/revoke", post(revoke_job))
        .route("/v1/explain", post(explain))
        .route("/v1/policies/reload", post(reload_policies))
        .route("/v1/policies/diff", post(diff_policies))
        .route("/v1/leases/{id}/audit", get(lease_audit))
        .route("/v1/policies", get(policies))
        .route("/v1/refusals", get(refusals))
        .route("/v1/overview", get(overview))
}

/// `GET /v1/leases/{id}/audit`: the audit events naming the lease (its exchange, renewals,
/// revocation), from the end of the audit file.
async fn lease_audit(State(app): AppState, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, Error> {
    require_admin(&app, &headers)?;
    if !crate::ids::is_lease_id(&id) {
        return Err(Error::NotFound);
    }
    Ok(match app.lease_audit(&id).await? {
        Some(found) => json_response(StatusCode::OK, &json!({"audit": true, "found": found})),
        None => json_response(StatusCode::OK, &json!({"audit": false})),
    })
}

/// `GET /v1/policies`: every loaded policy with its YAML (the console's policy preview).
async fn policies(State(app): AppState, headers: HeaderMap) -> Result<Response, Error> {
    require_admin(&app, &headers)?;
    Ok(json_response(StatusCode::OK, &app.policy_texts()))
}

/// `GET /v1/refusals`: the most recent refused exchanges and token exchanges of this replica,
/// newest first, with the claims each was decided on.
async fn refusals(State(app): AppState, headers: HeaderMap) -> Result<Response, Error> {
    require_admin(&app, &headers)?;
    Ok(json_response(StatusCode::OK, &json!({"refusals": app.recent_refusals()})))
}

/// `GET /v1/overview`: readiness, leases by state, issuers' key sets, backends, the last hour.
async fn overview(State(app): AppState, headers: HeaderMap) -> Result<Response, Error> {
    require_admin(&app, &headers)?;
    Ok(json_response(StatusCode::OK, &app.overview().await))
}

/// Largest policy set `POST /v1/policies/diff` takes (each file is capped at 256 KiB on its own).
const DIFF_BODY_LIMIT: usize = 4 * 1024 * 1024;

/// `POST /v1/policies/reload`: what SIGHUP does (for brokers no one can send a signal to).
async fn reload_policies(State(app): AppState, headers: HeaderMap) -> Result<Response, Error> {
    require_admin(&app, &headers)?;
    let report = detached(async move { app.reload_policies(true).await }).await?;
    let status = if report.outcome == "failed" { StatusCode::UNPROCESSABLE_ENTITY } else { StatusCode::OK };
    Ok(json_response(status, &report))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiffBody {
    /// The candidate policy set, whole: policy name (file stem) → YAML text.
    policies: std::collections::BTreeMap<String, String>,
}

/// `POST /v1/policies/diff`: the live leases a candidate policy set would end, before it is
/// rolled out. Nothing changes. A candidate a reload would refuse answers 422 with every error.
async fn diff_policies(State(app): AppState, headers: HeaderMap, body: Body) -> Result<Response, Error> {
    require_admin(&app, &headers)?;
    let request: DiffBody = parse_json(&super::read_body_up_to(&headers, body, DIFF_BODY_LIMIT).await?)?;
    let sources = request
        .policies
        .into_iter()
        .map(|(name, text)| crate::policy::Source {
            file: std::path::PathBuf::from(format!("{}.yaml", crate::clock::truncate(&name, 64))),
            name,
            text,
        })
        .collect();
    let result = app.diff_policies(sources).await;
    Ok(match result {
        Ok(ending) => json_response(StatusCode::OK, &json!({"valid": true, "would_end": ending})),
        Err(errors) => json_response(StatusCode::UNPROCESSABLE_ENTITY, &json!({"valid": false, "errors": errors})),
    })
}

fn require_admin(app: &App, headers: &HeaderMap) -> Result<(), Error> {
    match bearer(headers) {
        Ok(token) if app.is_admin(token) => Ok(()),
        _ => Err(Error::Unauthorized),
    }
}

/// A lease as operators see it: everything but the revoke handles' internals.
pub(crate) fn lease_view(lease: &Lease) -> Value {
    json!({
        "id": lease.id,
        "job": lease.job,
        "policy": lease.policy,
        "issuer": lease.issuer,
        "state": lease.state.as_str(),
        "created_at": rfc3339(lease.created_at),
        "expires_at": rfc3339(lease.expires_at),
        "reason": lease.reason,
        "attempts": lease.attempts,
        "next_attempt_at": (lease.state.is_pending()).then(|| rfc3339(lease.next_attempt_at)),
        "last_error": lease.last_error,
        "credentials": lease.credentials.iter().map(|c| json!({
            "name": &*c.name, "kind": &*c.kind, "revocation": c.revocation, "backend": &*c.backend,
        })).collect::<Vec<_>>(),
        "claims": &lease.claims,
        // Renewable leases: how often renewed, and when last (never the token's digest).
        "renewal": lease.renewal.as_ref().map(|r| json!({
            "count": r.count,
            "last_at": (r.last_at > 0).then(|| rfc3339(r.last_at)),
            "until": rfc3339(lease.expires_at),
        })),
    })
}

/// `GET /v1/leases?job=&policy=&state=&repository_id=&project_id=&actor_id=`
async fn list(State(app): AppState, headers: HeaderMap, uri: Uri) -> Result<Response, Error> {
    require_admin(&app, &headers)?;
    let filter = parse_filter(uri.query().unwrap_or_default())?;
    let mut leases = app.leases(&filter, MAX_LIST + 1).await?;
    let truncated = leases.len() > MAX_LIST;
    leases.truncate(MAX_LIST);
    let views: Vec<Value> = leases.iter().map(lease_view).collect();
    Ok(json_response(StatusCode::OK, &json!({"leases": views, "truncated": truncated})))
}

fn parse_filter(query: &str) -> Result<LeaseFilter, Error> {
    let mut filter = LeaseFilter::default();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let value = value.into_owned();
        let slot = match key.as_ref() {
            "job" => &mut filter.job,
            "policy" => &mut filter.policy,
            "repository_id" => &mut filter.repository_id,
            "project_id" => &mut filter.project_id,
            "actor_id" => &mut filter.actor_id,
            "state" => {
                let state = LeaseState::parse(&value).ok_or_else(|| {
                    Error::BadRequest("`state` is one of active, revoking, revoked, expired, irrevocable".into())
                })?;
                filter.state = Some(state);
                continue;
            }
            _ => {
                return Err(Error::BadRequest(
                    "unknown query parameter (use job, policy, state, repository_id, project_id, actor_id)".into(),
                ));
            }
        };
        *slot = Some(value);
    }
    Ok(filter)
}

/// `GET /v1/leases/{id}`
async fn show(State(app): AppState, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, Error> {
    require_admin(&app, &headers)?;
    let lease = app.lease(&id).await?.ok_or(Error::NotFound)?;
    Ok(json_response(StatusCode::OK, &lease_view(&lease)))
}

/// `DELETE /v1/leases/{id}`
async fn revoke_one(State(app): AppState, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, Error> {
    require_admin(&app, &headers)?;
    if app.lease(&id).await?.is_none() {
        return Err(Error::NotFound);
    }
    let lease = id.clone();
    let reply = detached(async move { app.end_leases(vec![lease], "admin").await }).await?;
    tracing::info!(lease_id = %id, revoked = ?reply.revoked, pending = ?reply.pending, "admin revoked a lease");
    Ok(json_response(StatusCode::OK, &reply))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExplainBody {
    policy: String,
    claims: crate::claims::Claims,
    /// The configured issuer the claims come from; default: the one whose url is `claims.iss`,
    /// else the policy's own.
    issuer: Option<String>,
    /// An agent's claims (its actor token's): the actor rules are evaluated against them.
    actor_claims: Option<crate::claims::Claims>,
    /// The configured issuer of `actor_claims`; default: the one whose url is their `iss`.
    actor_issuer: Option<String>,
}

/// `POST /v1/explain`: the rule-by-rule trace of a policy against a claim set; nothing is minted.
async fn explain(State(app): AppState, headers: HeaderMap, body: Body) -> Result<Response, Error> {
    require_admin(&app, &headers)?;
    let request: ExplainBody = parse_json(&read_body(&headers, body).await?)?;
    let actor = request.actor_claims.as_ref().map(|c| (request.actor_issuer.clone(), c));
    let trace = app.explain(&request.policy, request.issuer, &request.claims, actor)?;
    Ok(json_response(StatusCode::OK, &trace))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobBody {
    job: String,
}

/// `POST /v1/jobs/revoke {"job": "…"}`
async fn revoke_job(State(app): AppState, headers: HeaderMap, body: Body) -> Result<Response, Error> {
    require_admin(&app, &headers)?;
    let request: JobBody = parse_json(&read_body(&headers, body).await?)?;
    let (job, app2) = (request.job.clone(), app.clone());
    let reply = detached(async move { app2.end_job(&job, "admin").await }).await??;
    tracing::info!(job = %request.job, revoked = ?reply.revoked, pending = ?reply.pending, "admin revoked a job");
    Ok(json_response(StatusCode::OK, &reply))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MatchBody {
    policy: Option<String>,
    repository_id: Option<String>,
    project_id: Option<String>,
    actor_id: Option<String>,
    /// Instead of a filter: exactly these leases (at most [`MAX_LIST`]), as the console listed
    /// and counted them for the operator. Those no longer live are reported as they stand.
    lease_ids: Option<Vec<String>>,
}

/// `POST /v1/leases/revoke {"lease_ids": […]}`: the leases the operator saw and counted. Not
/// combined with a filter (which would make the count shown a lie); every id a lease id.
async fn revoke_listed(
    app: std::sync::Arc<App>,
    ids: Vec<String>,
    filter: [&Option<String>; 4],
) -> Result<Response, Error> {
    if filter.iter().any(|f| f.is_some()) {
        return Err(Error::BadRequest("`lease_ids` is not combined with a filter: send one or the other".into()));
    }
    if ids.is_empty() || ids.len() > MAX_LIST {
        return Err(Error::BadRequest(format!("`lease_ids` names 1 to {MAX_LIST} leases")));
    }
    // The ids are not echoed: whatever a caller sent stays out of the reply and the log.
    if !ids.iter().all(|id| crate::ids::is_lease_id(id)) {
        return Err(Error::BadRequest("`lease_ids` holds something that is not a lease id".into()));
    }
    let count = ids.len();
    let reply = detached(async move { app.end_leases(ids, "admin").await }).await?;
    tracing::info!(count, revoked = reply.revoked.len(), pending = reply.pending.len(), "admin revoked listed leases");
    Ok(json_response(StatusCode::OK, &reply))
}

/// `POST /v1/leases/revoke {"policy"?, "repository_id"?, "project_id"?, "actor_id"?}`: every
/// live lease matching all the given fields (a policy withdrawn, a repository archived, a person
/// gone). At least one field: an empty filter would end every lease.
async fn revoke_matching(State(app): AppState, headers: HeaderMap, body: Body) -> Result<Response, Error> {
    require_admin(&app, &headers)?;
    let request: MatchBody = parse_json(&read_body(&headers, body).await?)?;
    if let Some(ids) = request.lease_ids {
        return revoke_listed(
            app,
            ids,
            [&request.policy, &request.repository_id, &request.project_id, &request.actor_id],
        )
        .await;
    }
    let filter = LeaseFilter {
        policy: request.policy,
        repository_id: request.repository_id,
        project_id: request.project_id,
        actor_id: request.actor_id,
        ..LeaseFilter::default()
    };
    if filter.is_empty() {
        return Err(Error::BadRequest(
            "name at least one of policy, repository_id, project_id, actor_id (an empty filter would end every lease)"
                .into(),
        ));
    }
    let (f, app2) = (filter.clone(), app.clone());
    let reply = detached(async move { app2.end_matching(&f, "admin").await }).await??;
    tracing::info!(filter = ?filter, revoked = reply.revoked.len(), pending = reply.pending.len(), "admin revoked by filter");
    Ok(json_response(StatusCode::OK, &reply))
}
