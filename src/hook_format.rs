//! Platform webhook bodies as pure functions: an authenticated delivery's event name and body →
//! the job it reports finished (its job key, before the issuer's prefix), or why it is ignored.
//! `http::hooks` authenticates, deduplicates and acts; this only reads (and the fuzzer,
//! `examples/fuzz`, feeds it hostile bodies).
//!
//! Job keys are built from JSON numbers, or for Buildkite from a UUID, only: a payload cannot
//! forge another job's key with `:`.

use crate::claims::BodyError;
use serde::Deserialize;

/// What a delivery asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookAction {
    /// Nothing to do, and why (the reply says it).
    Ignore(&'static str),
    /// End the leases of this job (`github:…`, `gitlab:…`, `buildkite:…`).
    EndJob(String),
}

/// Why a body is refused (a 400).
#[derive(Debug)]
pub enum HookError {
    /// Not well-formed JSON, or a field missing or of the wrong type.
    Json(serde_json::Error),
    /// `job.id` is not a UUID, so no job key is made of it.
    NotABuildkiteJobId,
    /// Valid JSON, but not an object: every platform sends an object.
    NotAnObject,
}

/// A body as `http::parse_json` reads one (`claims::from_json_body`): an object, where all
/// whitespace (or empty) reads as `{}`. serde would read a struct from an array of its fields
/// too; no platform sends one.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, HookError> {
    crate::claims::from_json_body(body).map_err(|e| match e {
        BodyError::Json(e) => HookError::Json(e),
        BodyError::NotAnObject => HookError::NotAnObject,
    })
}

// ---- GitHub ---------------------------------------------------------------------------------

#[derive(Deserialize)]
struct GithubAction {
    action: String,
}

/// The parts of a `workflow_job` event that make the job key (DESIGN §3). Unknown fields are
/// ignored: the platform adds fields to its payloads at will.
#[derive(Deserialize)]
struct GithubCompleted {
    repository: GithubRepository,
    workflow_job: WorkflowJob,
}

#[derive(Deserialize)]
struct GithubRepository {
    id: u64,
}

#[derive(Deserialize)]
struct WorkflowJob {
    /// The job's `check_run_id`.
    id: u64,
    run_id: u64,
    run_attempt: u64,
}

/// A GitHub delivery (`X-GitHub-Event` is `event`): a completed `workflow_job` ends
/// `github:{repository.id}:{run_id}:{run_attempt}:{workflow_job.id}`.
pub fn github(event: &str, body: &[u8]) -> Result<HookAction, HookError> {
    match event {
        "ping" => return Ok(HookAction::Ignore("ping")),
        "workflow_job" => {}
        _ => return Ok(HookAction::Ignore("not a workflow_job event")),
    }
    if parse::<GithubAction>(body)?.action != "completed" {
        return Ok(HookAction::Ignore("workflow_job action is not completed"));
    }
    let e: GithubCompleted = parse(body)?;
    let w = e.workflow_job;
    Ok(HookAction::EndJob(format!("github:{}:{}:{}:{}", e.repository.id, w.run_id, w.run_attempt, w.id)))
}

// ---- GitLab ---------------------------------------------------------------------------------

#[derive(Deserialize)]
struct GitlabKind {
    object_kind: String,
}

#[derive(Deserialize)]
struct GitlabBuild {
    build_status: String,
    project_id: u64,
    build_id: u64,
}

/// The job statuses after which a GitLab job no longer runs.
const GITLAB_FINAL: [&str; 3] = ["success", "failed", "canceled"];

/// A GitLab delivery: a `build` event in a final status ends `gitlab:{project_id}:{build_id}`.
pub fn gitlab(body: &[u8]) -> Result<HookAction, HookError> {
    if parse::<GitlabKind>(body)?.object_kind != "build" {
        return Ok(HookAction::Ignore("object_kind is not build"));
    }
    let build: GitlabBuild = parse(body)?;
    if !GITLAB_FINAL.contains(&build.build_status.as_str()) {
        return Ok(HookAction::Ignore("build_status is not final"));
    }
    Ok(HookAction::EndJob(format!("gitlab:{}:{}", build.project_id, build.build_id)))
}

// ---- Buildkite --------------------------------------------------------------------------------

#[derive(Deserialize)]
struct BuildkiteFinished {
    job: BuildkiteJob,
}

#[derive(Deserialize)]
struct BuildkiteJob {
    id: String,
}

/// A Buildkite delivery (`X-Buildkite-Event` is `event`): `job.finished` ends
/// `buildkite:{job.id}` (the UUID in lower case).
pub fn buildkite(event: &str, body: &[u8]) -> Result<HookAction, HookError> {
    match event {
        "ping" => return Ok(HookAction::Ignore("ping")),
        "job.finished" => {}
        _ => return Ok(HookAction::Ignore("not a job.finished event")),
    }
    let job = parse::<BuildkiteFinished>(body)?.job;
    // Attack: the job key is built from this text; only a UUID (no `:`) may form one.
    if job.id.len() != 36 || !job.id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        return Err(HookError::NotABuildkiteJobId);
    }
    Ok(HookAction::EndJob(format!("buildkite:{}", job.id.to_ascii_lowercase())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_id_holding_a_colon_is_refused_not_made_into_a_key() {
        let forged = br#"{"job": {"id": "x:github:74:1:2:3-aaaaaaaaaaaaaaaaaaaa"}}"#;
        assert!(matches!(buildkite("job.finished", forged), Err(HookError::NotABuildkiteJobId)));
        let string_ids = br#"{"action": "completed", "workflow_job": {"id": "1:2", "run_id": 2, "run_attempt": 1},
                              "repository": {"id": 74}}"#;
        assert!(matches!(github("workflow_job", string_ids), Err(HookError::Json(_))));
        assert_eq!(
            gitlab(br#"{"object_kind": "build", "build_status": "failed", "project_id": 20, "build_id": 302}"#)
                .unwrap(),
            HookAction::EndJob("gitlab:20:302".into())
        );
    }

    #[test]
    fn a_body_written_as_an_array_of_its_fields_is_refused() {
        // serde would otherwise try it as the body's fields, all of them, in order.
        let array = br#"["build", "failed", 20, 302]"#;
        assert!(matches!(gitlab(array), Err(HookError::NotAnObject)));
        assert!(matches!(gitlab(b" [1"), Err(HookError::Json(_))), "broken JSON is still a JSON error");
        let object = br#"{"object_kind": "build", "build_status": "failed", "project_id": 20, "build_id": 302}"#;
        assert_eq!(gitlab(object).unwrap(), HookAction::EndJob("gitlab:20:302".into()));
    }
}
