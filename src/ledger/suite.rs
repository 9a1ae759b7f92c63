//! The lease-store suite: every guarantee of [`LeaseStore`], written once against the trait and
//! run against each store (`stores!` at the bottom instantiates every case per store). A new
//! store adds one line there and must pass all of it.

use super::*;
use crate::identity::ReplayKey;
use std::sync::Arc;

pub(super) fn lease(id: &str, job: &str, expires_at: i64) -> Lease {
    Lease {
        id: id.into(),
        job: job.into(),
        policy: "p".into(),
        issuer: "i".into(),
        created_at: 0,
        expires_at,
        state: LeaseState::Active,
        reason: None,
        attempts: 0,
        next_attempt_at: 0,
        last_error: None,
        credentials: Box::new([]),
        claims: ClaimSnapshot::default(),
        renewal: None,
    }
}

fn ids(v: Vec<Arc<str>>) -> Vec<String> {
    let mut out: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    out.sort();
    out
}

fn work_ids(v: &[RevokeWork]) -> Vec<String> {
    let mut out: Vec<String> = v.iter().map(|w| w.lease_id.to_string()).collect();
    out.sort();
    out
}

async fn state(s: &dyn LeaseStore, id: &str) -> Option<LeaseState> {
    s.get(id).await.unwrap().map(|l| l.state)
}

const RETRY: RetryPolicy = RetryPolicy { max_attempts: 3, base_secs: 10, cap_secs: 1000, irrevocable_every_secs: 600 };

// ---- the cases ------------------------------------------------------------------------------

async fn a_revocation_is_handed_to_one_caller_and_expiry_follows_the_clock(s: &dyn LeaseStore) {
    for (id, job) in [("a", "job1"), ("b", "job1"), ("c", "job2")] {
        s.issue(lease(id, job, 100), None).await.unwrap();
    }
    assert_eq!(ids(s.live_of_job("job1", 10).await.unwrap()), ["a", "b"]);
    assert!(s.begin_revoke("a", "job", 10).await.unwrap().is_some());
    assert!(s.begin_revoke("a", "job", 10).await.unwrap().is_none(), "second revoke gets no work");
    assert_eq!(s.finish_revoke("a", None, 10).await.unwrap(), Some(LeaseState::Revoked));
    assert_eq!(ids(s.live_of_job("job1", 10).await.unwrap()), ["b"]);
    assert!(s.claim_due(99, &NO_QUIET_BACKENDS).await.unwrap().expired.is_empty(), "nothing expires early");
    let due = s.claim_due(100, &NO_QUIET_BACKENDS).await.unwrap();
    assert_eq!(work_ids(&due.expired), ["b", "c"]);
    assert_eq!(s.get("b").await.unwrap().unwrap().reason.as_deref(), Some(REASON_EXPIRED));
    assert!(s.claim_due(100, &NO_QUIET_BACKENDS).await.unwrap().expired.is_empty(), "expiry work is handed out once");
    assert!(s.begin_revoke("c", "job", 100).await.unwrap().is_none(), "an expiring lease is already claimed");
    assert_eq!(s.finish_revoke("c", None, 100).await.unwrap(), Some(LeaseState::Expired));
    assert_eq!(s.finish_revoke("b", None, 100).await.unwrap(), Some(LeaseState::Expired));
    assert_eq!(s.maintain(100 + ENDED_RETENTION_SECS - 1).await.unwrap().forgotten, 0);
    assert_eq!(s.maintain(100 + ENDED_RETENTION_SECS).await.unwrap().forgotten, 3, "a (revoked), b and c (expired)");
    assert!(s.get("c").await.unwrap().is_none());
    assert!(s.live_of_job("job2", 0).await.unwrap().is_empty());
    assert_eq!(s.counts().await.unwrap().total(), 0);
}

async fn failures_back_off_then_become_irrevocable_and_are_still_retried(s: &dyn LeaseStore) {
    s.issue(lease("a", "j", 1000), None).await.unwrap();
    s.begin_revoke("a", "job", 0).await.unwrap().unwrap();
    assert!(
        s.claim_due(0, &NO_QUIET_BACKENDS).await.unwrap().retries.is_empty(),
        "the caller of begin_revoke makes the first attempt"
    );
    let stalled = s.get("a").await.unwrap().unwrap().next_attempt_at;
    assert_eq!(stalled, STALLED_ATTEMPT_SECS, "an attempt that never reports back is retried");
    assert_eq!(s.finish_revoke("a", Some("boom".into()), 0).await.unwrap(), Some(LeaseState::Revoking));
    let next = s.get("a").await.unwrap().unwrap().next_attempt_at;
    assert!((15..=25).contains(&next), "10 s × 2 ± 25 %: {next}");
    assert!(s.claim_due(next - 1, &NO_QUIET_BACKENDS).await.unwrap().retries.is_empty());
    assert_eq!(s.claim_due(next, &NO_QUIET_BACKENDS).await.unwrap().retries.len(), 1);
    assert!(s.claim_due(next, &NO_QUIET_BACKENDS).await.unwrap().retries.is_empty(), "a retry is handed out once");
    s.finish_revoke("a", Some("boom".into()), next).await.unwrap();
    assert_eq!(s.finish_revoke("a", Some("boom".into()), next).await.unwrap(), Some(LeaseState::Irrevocable));
    assert_eq!(s.counts().await.unwrap().of(LeaseState::Irrevocable), 1);
    let at = s.get("a").await.unwrap().unwrap().next_attempt_at;
    assert_eq!(at, next + 600);
    assert_eq!(
        s.claim_due(at, &NO_QUIET_BACKENDS).await.unwrap().retries.len(),
        1,
        "irrevocable leases are retried, never dropped"
    );
    assert_eq!(s.finish_revoke("a", None, at).await.unwrap(), Some(LeaseState::Revoked));
    assert_eq!(s.counts().await.unwrap().of(LeaseState::Irrevocable), 0);
}

async fn a_claimed_retry_that_never_reports_back_is_due_again_after_the_stall_time(s: &dyn LeaseStore) {
    s.issue(lease("a", "j", 1000), None).await.unwrap();
    s.begin_revoke("a", "job", 0).await.unwrap().unwrap();
    assert_eq!(s.claim_due(STALLED_ATTEMPT_SECS, &NO_QUIET_BACKENDS).await.unwrap().retries.len(), 1);
    let again = 2 * STALLED_ATTEMPT_SECS;
    assert!(s.claim_due(again - 1, &NO_QUIET_BACKENDS).await.unwrap().retries.is_empty());
    assert_eq!(s.claim_due(again, &NO_QUIET_BACKENDS).await.unwrap().retries.len(), 1);
    assert_eq!(work_ids(&s.claim_all_pending(again).await.unwrap()), ["a"], "start-up claims it whatever is due");
}

async fn finishing_an_unknown_lease_reports_no_state_and_records_nothing(s: &dyn LeaseStore) {
    // It was reported `revoked` before: a caller would have told a job its credentials were dead
    // on the word of a store that had never heard of them.
    assert_eq!(s.finish_revoke("lse_unknown", None, 5).await.unwrap(), None);
    assert_eq!(s.finish_revoke("lse_unknown", Some("boom".into()), 5).await.unwrap(), None);
    assert!(s.get("lse_unknown").await.unwrap().is_none());
    assert_eq!(s.counts().await.unwrap().total(), 0);
}

async fn a_replay_key_admits_one_lease_until_the_token_expires(s: &dyn LeaseStore) {
    let key = ReplayKey::new("k".into(), 50);
    assert!(!s.replay_seen(&key).await.unwrap());
    s.issue(lease("a", "j", 100), Some(&key)).await.unwrap();
    assert!(s.replay_seen(&key).await.unwrap());
    assert_eq!(s.issue(lease("b", "j", 100), Some(&key)).await, Err(IssueError::Replayed));
    assert!(s.get("b").await.unwrap().is_none(), "a refused lease is not recorded");
    s.maintain(49).await.unwrap();
    assert_eq!(s.issue(lease("c", "j", 100), Some(&key)).await, Err(IssueError::Replayed));
    s.maintain(50).await.unwrap();
    s.issue(lease("d", "j", 100), Some(&ReplayKey::new("k".into(), 80))).await.unwrap();
}

async fn of_two_racing_issues_with_one_replay_key_exactly_one_is_recorded(s: &dyn LeaseStore) {
    let key = ReplayKey::new("race".into(), 500);
    let (a, b) = tokio::join!(s.issue(lease("a", "j", 100), Some(&key)), s.issue(lease("b", "j", 100), Some(&key)));
    let outcomes = [a.is_ok(), b.is_ok()];
    assert_eq!(outcomes.iter().filter(|ok| **ok).count(), 1, "{a:?} {b:?}");
    assert!([a, b].contains(&Err(IssueError::Replayed)));
    assert_eq!(s.counts().await.unwrap().of(LeaseState::Active), 1);
}

async fn live_leases_are_listed_by_policy_without_ended_ones(s: &dyn LeaseStore) {
    let mut other = lease("b", "j", 100);
    other.policy = "q".into();
    s.issue(lease("a", "j", 100), None).await.unwrap();
    s.issue(other, None).await.unwrap();
    s.issue(lease("c", "j", 100), None).await.unwrap();
    s.begin_revoke("c", "job", 1).await.unwrap();
    let only_p: std::collections::BTreeSet<String> = ["p".to_string()].into();
    let live: Vec<String> = s.live_leases(Some(&only_p), 1).await.unwrap().iter().map(|l| l.id.to_string()).collect();
    assert_eq!(live, ["a"]);
    assert_eq!(s.live_leases(None, 1).await.unwrap().len(), 2);
    assert!(s.live_leases(None, 100).await.unwrap().is_empty(), "expired leases are not live");
    let listed = s.list(&LeaseFilter { policy: Some("q".into()), ..LeaseFilter::default() }, 10).await.unwrap();
    assert_eq!(listed.len(), 1);
}

async fn counts_follow_each_state_and_backend(s: &dyn LeaseStore) {
    let mut l = lease("a", "j", 100);
    let handle = crate::mint::RevokeHandle { backend: "jwt".into(), data: serde_json::json!({"jti": "x"}) };
    l.credentials = Box::new([LeaseCredential::new("api", "jwt", crate::mint::Revocation::Immediate, &handle)]);
    s.issue(l, None).await.unwrap();
    s.issue(lease("b", "j", 100), None).await.unwrap();
    assert_eq!(s.counts().await.unwrap().active_by_backend, [("jwt".to_string(), 1)]);
    let jwt: std::collections::BTreeSet<String> = ["jwt".to_string()].into();
    assert_eq!(s.handles_of(&jwt).await.unwrap(), std::slice::from_ref(&handle));
    assert!(s.handles_of(&["aws".to_string()].into()).await.unwrap().is_empty());
    assert!(s.ended_handles_of(&jwt).await.unwrap().is_empty(), "lease a is active");
    s.begin_revoke("a", "job", 1).await.unwrap();
    assert_eq!(s.ended_handles_of(&jwt).await.unwrap(), std::slice::from_ref(&handle), "lease a is ending");
    assert!(s.ended_handles_of(&["aws".to_string()].into()).await.unwrap().is_empty());
    let counts = s.counts().await.unwrap();
    assert_eq!((counts.of(LeaseState::Active), counts.of(LeaseState::Revoking)), (1, 1));
    assert!(counts.active_by_backend.iter().all(|(_, n)| *n == 0), "{:?}", counts.active_by_backend);
    assert_eq!(s.health(), Health::Open);
    s.flush().await.unwrap();
}

async fn what_one_store_exports_another_imports_in_the_same_state(s: &dyn LeaseStore) {
    let source = FileStore::in_memory(FileStoreOptions { retry: RETRY, ..FileStoreOptions::default() });
    let key = ReplayKey::new("k".into(), 90);
    source.issue(lease("a", "j", 100), Some(&key)).await.unwrap();
    for id in ["b", "c"] {
        source.issue(lease(id, "j", 100), None).await.unwrap();
        source.begin_revoke(id, "job", 1).await.unwrap().unwrap();
    }
    source.finish_revoke("b", Some("boom".into()), 1).await.unwrap();
    source.finish_revoke("c", None, 1).await.unwrap();
    let records = source.export().await.unwrap();

    assert_eq!(s.import(&records).await.unwrap(), 3);
    assert_eq!(s.import(&records).await.unwrap(), 0, "a second run imports nothing new");
    assert_eq!(state(s, "a").await, Some(LeaseState::Active));
    let b = s.get("b").await.unwrap().unwrap();
    assert_eq!((b.state, b.attempts, b.last_error.as_deref()), (LeaseState::Revoking, 1, Some("boom")));
    assert_eq!(state(s, "c").await, Some(LeaseState::Revoked));
    assert_eq!(s.issue(lease("d", "j", 100), Some(&key)).await, Err(IssueError::Replayed), "replay keys move too");
    assert_eq!(
        work_ids(&s.claim_due(b.next_attempt_at, &NO_QUIET_BACKENDS).await.unwrap().retries),
        ["b"],
        "pending work moves too"
    );

    let sorted = |mut v: Vec<Event>| {
        v.sort_by_key(|e| format!("{e:?}"));
        v
    };
    let mut exported = s.export().await.unwrap();
    exported.retain(|e| !matches!(e, Event::Created { lease } if &*lease.id == "b"));
    let mut expected = records.clone();
    expected.retain(|e| !matches!(e, Event::Created { lease } if &*lease.id == "b"));
    assert_eq!(sorted(exported), sorted(expected), "what was imported is exported as it was");
    let later = [Event::Revoked { id: "a".into(), at: 5 }];
    assert!(s.import(&later).await.is_err(), "only leases and replay keys are imported");
    assert_eq!(state(s, "a").await, Some(LeaseState::Active));
}

async fn leases_are_listed_by_job_state_and_the_claims_operators_filter_by(s: &dyn LeaseStore) {
    let with_claims = |id: &str, job: &str, claims: serde_json::Value| {
        let mut l = lease(id, job, 100);
        let serde_json::Value::Object(map) = claims else { panic!("claims are an object") };
        l.claims = ClaimSnapshot::new(&map.into_iter().collect());
        l
    };
    // GitHub sends ids as strings, GitLab as numbers: both filter by their text.
    s.issue(with_claims("a", "j1", serde_json::json!({"repository_id": "74", "actor_id": "9"})), None).await.unwrap();
    s.issue(with_claims("b", "j2", serde_json::json!({"repository_id": "75", "actor_id": "9"})), None).await.unwrap();
    s.issue(with_claims("c", "j3", serde_json::json!({"project_id": 42, "user_id": 9})), None).await.unwrap();
    s.begin_revoke("b", "job", 1).await.unwrap();
    let list = |filter: LeaseFilter| async move {
        let mut ids: Vec<String> = s.list(&filter, 10).await.unwrap().iter().map(|l| l.id.to_string()).collect();
        ids.sort();
        ids
    };
    let by = LeaseFilter::default;
    assert_eq!(list(LeaseFilter { job: Some("j2".into()), ..by() }).await, ["b"]);
    assert_eq!(list(LeaseFilter { state: Some(LeaseState::Active), ..by() }).await, ["a", "c"]);
    assert_eq!(list(LeaseFilter { repository_id: Some("74".into()), ..by() }).await, ["a"]);
    assert_eq!(list(LeaseFilter { project_id: Some("42".into()), ..by() }).await, ["c"]);
    assert_eq!(list(LeaseFilter { actor_id: Some("9".into()), ..by() }).await, ["a", "b", "c"], "actor_id or user_id");
    let both = LeaseFilter { actor_id: Some("9".into()), state: Some(LeaseState::Revoking), ..by() };
    assert_eq!(list(both).await, ["b"], "filters combine");
    assert!(list(LeaseFilter { repository_id: Some("7".into()), ..by() }).await.is_empty(), "exact, not a prefix");
    assert_eq!(s.list(&by(), 2).await.unwrap().len(), 2, "at most the limit");
}

async fn a_renewal_adds_credentials_until_the_lease_ends_and_its_revocation_takes_them_all(s: &dyn LeaseStore) {
    use crate::mint::{Revocation, RevokeHandle};
    let renewable = |id: &str| {
        let mut l = lease(id, "j", 100);
        l.renewal = Some(Box::new(Renewal { token_sha256: "ab".repeat(32).into(), count: 0, last_at: 0 }));
        l
    };
    let cred = |jti: &str| {
        let handle = RevokeHandle { backend: "jwt".into(), data: serde_json::json!({"jti": jti}) };
        LeaseCredential::new("api", "jwt", Revocation::Immediate, &handle)
    };
    s.issue(renewable("a"), None).await.unwrap();
    s.issue(lease("b", "j", 100), None).await.unwrap();
    assert!(s.renew("a", &[cred("r1")], 10).await.unwrap());
    assert!(s.renew("a", &[cred("r2")], 20).await.unwrap());
    let a = s.get("a").await.unwrap().unwrap();
    assert_eq!(a.credentials.len(), 2);
    assert_eq!(a.renewal.as_ref().map(|r| (r.count, r.last_at)), Some((2, 20)));
    assert_eq!(s.counts().await.unwrap().active_by_backend, [("jwt".to_string(), 1)], "one lease, one backend");

    assert!(!s.renew("b", &[cred("x")], 10).await.unwrap(), "a lease its policy did not make renewable");
    assert!(!s.renew("lse_unknown", &[cred("x")], 10).await.unwrap(), "an unknown lease");
    assert!(!s.renew("a", &[cred("late")], 100).await.unwrap(), "a lease at its end");
    let work = s.begin_revoke("a", "job", 30).await.unwrap().unwrap();
    assert_eq!(work.credentials.len(), 2, "the revocation takes every renewal's credentials");
    assert!(!s.renew("a", &[cred("r3")], 31).await.unwrap(), "an ending lease takes no renewal");
    let a = s.get("a").await.unwrap().unwrap();
    assert_eq!((a.credentials.len(), a.renewal.as_ref().map(|r| r.count)), (2, Some(2)));
    let exported = s.export().await.unwrap();
    let moved = exported.iter().find_map(|e| match e {
        Event::Created { lease } if &*lease.id == "a" => Some(lease.clone()),
        _ => None,
    });
    assert_eq!(moved.map(|l| (l.credentials.len(), l.renewal.clone())), Some((2, a.renewal)), "an export keeps it");

    // A lease renewed MAX_RENEWALS times takes no more: a job renewing in a loop cannot grow it
    // without end.
    let mut worn = renewable("c");
    worn.renewal =
        Some(Box::new(Renewal { token_sha256: "ab".repeat(32).into(), count: MAX_RENEWALS - 1, last_at: 0 }));
    s.issue(worn, None).await.unwrap();
    assert!(s.renew("c", &[cred("last")], 10).await.unwrap());
    assert!(!s.renew("c", &[cred("one-too-many")], 11).await.unwrap());
    let c = s.get("c").await.unwrap().unwrap();
    assert_eq!((c.credentials.len(), c.renewal.map(|r| r.count)), (1, Some(MAX_RENEWALS)));
}

async fn a_backlog_larger_than_a_pruning_batch_is_forgotten_in_one_pass(s: &dyn LeaseStore) {
    // 12,000 ended leases and as many spent replay keys (PostgreSQL deletes 5,000 a statement,
    // so one pass takes three statements per table), and one live lease, which stays.
    let mut records = Vec::new();
    for i in 0..12_000 {
        let mut ended = lease(&format!("e{i}"), "j", 100);
        ended.state = LeaseState::Revoked;
        ended.reason = Some("job".into());
        records.push(Event::Created { lease: Arc::new(ended) });
        records.push(Event::JtiUsed { key: format!("k{i}"), exp: 50 });
    }
    records.push(Event::Created { lease: Arc::new(lease("live", "j", 1_000_000)) });
    assert_eq!(s.import(&records).await.unwrap(), 12_001);
    assert_eq!(s.maintain(100 + ENDED_RETENTION_SECS).await.unwrap().forgotten, 12_000);
    assert_eq!(s.counts().await.unwrap().total(), 1);
    assert_eq!(state(s, "live").await, Some(LeaseState::Active));
    let kept = s.export().await.unwrap();
    assert!(!kept.iter().any(|e| matches!(e, Event::JtiUsed { .. })), "spent replay keys are forgotten too");
}

async fn revocations_confirmed_together_are_each_recorded_in_their_own_state(s: &dyn LeaseStore) {
    for (id, job, expires_at) in [("a", "job1", 100), ("b", "job2", 100), ("c", "job3", 1000), ("d", "job4", 1000)] {
        s.issue(lease(id, job, expires_at), None).await.unwrap();
    }
    let mut expired = s.claim_due(100, &NO_QUIET_BACKENDS).await.unwrap().expired;
    expired.sort_by(|x, y| x.lease_id.cmp(&y.lease_id));
    let a = &expired[0];
    assert_eq!((&*a.lease_id, &*a.job, a.reason.as_deref()), ("a", "job1", Some(REASON_EXPIRED)));
    assert_eq!((a.policy.as_deref(), a.issuer.as_deref()), (Some("p"), Some("i")), "the work tells its audit event");
    let c = s.begin_revoke("c", "job", 100).await.unwrap().unwrap();
    assert_eq!((&*c.job, c.reason.as_deref()), ("job3", Some("job")));
    s.begin_revoke("d", "webhook", 100).await.unwrap().unwrap();
    assert_eq!(s.finish_revoke("d", None, 100).await.unwrap(), Some(LeaseState::Revoked));
    let ids: Vec<Arc<str>> = ["a", "c", "nope", "d", "b"].into_iter().map(Arc::from).collect();
    let states = s.finish_revoked(&ids, 101).await.unwrap();
    use LeaseState::{Expired, Revoked};
    assert_eq!(states, [Some(Expired), Some(Revoked), None, Some(Revoked), Some(Expired)], "in the order asked");
    assert_eq!(state(s, "b").await, Some(Expired));
    assert_eq!(state(s, "c").await, Some(Revoked));
    assert!(s.get("nope").await.unwrap().is_none(), "nothing recorded for an unknown lease");
    assert!(s.claim_due(10_000, &NO_QUIET_BACKENDS).await.unwrap().retries.is_empty(), "no attempt left pending");
}

async fn an_expired_lease_whose_credentials_are_all_quiet_ends_in_its_claim(s: &dyn LeaseStore) {
    use crate::mint::{Revocation, RevokeHandle};
    let with = |id: &str, expires_at: i64, backends: &[&str]| {
        let mut l = lease(id, &format!("job-{id}"), expires_at);
        l.credentials = backends
            .iter()
            .map(|b| {
                let handle = RevokeHandle { backend: (*b).into(), data: serde_json::json!({"id": id}) };
                LeaseCredential::new("c", b, Revocation::Immediate, &handle)
            })
            .collect();
        l
    };
    // a: only quiet credentials; b: one that needs its backend; c: none at all; d: not due.
    for l in [
        with("a", 100, &["jwt", "jwt"]),
        with("b", 100, &["jwt", "aws"]),
        with("c", 100, &[]),
        with("d", 500, &["jwt"]),
    ] {
        s.issue(l, None).await.unwrap();
    }
    let quiet = std::collections::BTreeSet::from(["jwt".to_string()]);
    let due = s.claim_due(100, &quiet).await.unwrap();
    assert_eq!(work_ids(&due.ended), ["a"], "ended in the claim");
    assert_eq!(work_ids(&due.expired), ["b", "c"], "revoked the usual way");
    let a = &due.ended[0];
    assert_eq!((&*a.job, a.reason.as_deref(), a.credentials.len()), ("job-a", Some(REASON_EXPIRED), 2));
    assert_eq!((a.policy.as_deref(), a.issuer.as_deref()), (Some("p"), Some("i")), "the work tells its audit event");
    let stored = s.get("a").await.unwrap().unwrap();
    assert_eq!((stored.state, stored.reason.as_deref()), (LeaseState::Expired, Some(REASON_EXPIRED)));
    assert_eq!(state(s, "b").await, Some(LeaseState::Revoking));
    assert_eq!(state(s, "d").await, Some(LeaseState::Active));
    let again = s.claim_due(100, &quiet).await.unwrap();
    assert!(again.ended.is_empty() && again.expired.is_empty(), "handed out once");
    assert!(s.begin_revoke("a", "job", 101).await.unwrap().is_none(), "an ended lease is not revoked again");
    let stalled = s.claim_due(100 + STALLED_ATTEMPT_SECS, &quiet).await.unwrap();
    assert_eq!(work_ids(&stalled.retries), ["b", "c"], "only the revocations that were handed out are pending");
    assert_eq!(s.finish_revoke("b", None, 101).await.unwrap(), Some(LeaseState::Expired));
    let counts = s.counts().await.unwrap();
    assert_eq!((counts.of(LeaseState::Expired), counts.of(LeaseState::Active)), (2, 1), "a and b ended, d live");
    assert_eq!(
        s.maintain(100 + ENDED_RETENTION_SECS).await.unwrap().forgotten,
        2,
        "a is forgotten like any ended lease"
    );
}

// ---- the stores -----------------------------------------------------------------------------

/// A store kind for the suite, with what it needs to stay alive (a temporary directory).
type Made = (Box<dyn LeaseStore>, Option<tempfile::TempDir>);

fn memory_store() -> Made {
    (Box::new(FileStore::in_memory(FileStoreOptions { retry: RETRY, ..FileStoreOptions::default() })), None)
}

fn journaled_store() -> Made {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path(), FileStoreOptions { retry: RETRY, ..FileStoreOptions::default() }, None);
    (Box::new(store.unwrap()), Some(dir))
}

/// A fresh database on the test PostgreSQL server (see [`super::postgres::testing`]).
async fn postgres_store() -> Made {
    let cfg = super::postgres::testing::fresh_database().await;
    (
        Box::new(
            PgStore::open(&cfg, None, "suite", RETRY).await.unwrap().with_counts_max_age(std::time::Duration::ZERO),
        ),
        None,
    )
}

macro_rules! stores {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test]
            async fn $case() {
                let (store, _dir) = super::memory_store();
                super::$case(&*store).await;
            })*
        }
        mod journaled {
            $(#[tokio::test]
            async fn $case() {
                let (store, _dir) = super::journaled_store();
                super::$case(&*store).await;
            })*
        }
        mod postgres {
            $(#[tokio::test]
            async fn $case() {
                let (store, _dir) = super::postgres_store().await;
                super::$case(&*store).await;
            })*
        }
    };
}

stores!(
    a_revocation_is_handed_to_one_caller_and_expiry_follows_the_clock,
    failures_back_off_then_become_irrevocable_and_are_still_retried,
    a_claimed_retry_that_never_reports_back_is_due_again_after_the_stall_time,
    finishing_an_unknown_lease_reports_no_state_and_records_nothing,
    a_replay_key_admits_one_lease_until_the_token_expires,
    of_two_racing_issues_with_one_replay_key_exactly_one_is_recorded,
    live_leases_are_listed_by_policy_without_ended_ones,
    counts_follow_each_state_and_backend,
    what_one_store_exports_another_imports_in_the_same_state,
    leases_are_listed_by_job_state_and_the_claims_operators_filter_by,
    a_renewal_adds_credentials_until_the_lease_ends_and_its_revocation_takes_them_all,
    a_backlog_larger_than_a_pruning_batch_is_forgotten_in_one_pass,
    revocations_confirmed_together_are_each_recorded_in_their_own_state,
    an_expired_lease_whose_credentials_are_all_quiet_ends_in_its_claim,
);

// ---- the file store's own --------------------------------------------------------------------

#[test]
fn replaying_records_twice_gives_the_same_state() {
    let s = FileStore::in_memory(FileStoreOptions::default());
    let events = [
        Event::Created { lease: Arc::new(lease("a", "j", 100)) },
        Event::RevokeRequested { id: "a".into(), reason: "job".into(), at: 5 },
        Event::RevokeFailed { id: "a".into(), at: 5, attempts: 1, next_at: 7, error: "x".into() },
    ];
    for e in events.iter().chain(events.iter()) {
        s.apply(e.clone());
    }
    let counts = s.counts_now();
    assert_eq!((counts.of(LeaseState::Revoking), counts.of(LeaseState::Active)), (1, 0));
}

#[tokio::test]
async fn a_lease_ended_in_its_claim_reopens_expired() {
    use crate::mint::{Revocation, RevokeHandle};
    let dir = tempfile::tempdir().unwrap();
    let handle = RevokeHandle { backend: "jwt".into(), data: serde_json::json!({"jti": "x"}) };
    let mut l = lease("a", "j", 100);
    l.credentials = Box::new([LeaseCredential::new("api", "jwt", Revocation::Immediate, &handle)]);
    {
        let s = FileStore::open(dir.path(), FileStoreOptions::default(), None).unwrap();
        s.issue(l, None).await.unwrap();
        let quiet = std::collections::BTreeSet::from(["jwt".to_string()]);
        assert_eq!(work_ids(&s.claim_due(100, &quiet).await.unwrap().ended), ["a"]);
    }
    // Dropped without a flush: the claim's append was durable before the lease read expired.
    let reopened = FileStore::open(dir.path(), FileStoreOptions::default(), None).unwrap();
    let a = reopened.get("a").await.unwrap().unwrap();
    assert_eq!((a.state, a.reason.as_deref()), (LeaseState::Expired, Some(REASON_EXPIRED)));
    assert!(reopened.claim_all_pending(200).await.unwrap().is_empty(), "nothing left to revoke after the restart");
}

#[tokio::test]
async fn a_renewed_lease_reopens_and_compacts_with_every_credential_and_its_count() {
    use crate::mint::{Revocation, RevokeHandle};
    let dir = tempfile::tempdir().unwrap();
    let cred = |jti: &str| {
        let handle = RevokeHandle { backend: "jwt".into(), data: serde_json::json!({"jti": jti}) };
        LeaseCredential::new("api", "jwt", Revocation::Immediate, &handle)
    };
    let mut l = lease("a", "j", 100);
    l.renewal = Some(Box::new(Renewal { token_sha256: "cd".repeat(32).into(), count: 0, last_at: 0 }));
    l.credentials = Box::new([cred("first")]);
    {
        let s = FileStore::open(dir.path(), FileStoreOptions::default(), None).unwrap();
        s.issue(l, None).await.unwrap();
        assert!(s.renew("a", &[cred("second")], 5).await.unwrap());
        s.flush().await.unwrap();
    }
    let reopened = FileStore::open(dir.path(), FileStoreOptions::default(), None).unwrap();
    let a = reopened.get("a").await.unwrap().unwrap();
    assert_eq!((a.credentials.len(), a.renewal.as_ref().map(|r| (r.count, r.last_at))), (2, Some((1, 5))));
    // Replaying the renewal again (a compaction carries records over) changes nothing.
    for e in reopened.export().await.unwrap() {
        reopened.apply(e);
    }
    reopened.apply(Event::Renewed { id: "a".into(), at: 5, count: 1, credentials: vec![cred("second")] });
    let again = reopened.get("a").await.unwrap().unwrap();
    assert_eq!((again.credentials.len(), again.renewal.map(|r| r.count)), (2, Some(1)));
}

#[tokio::test]
async fn a_journaled_store_reopens_with_every_lease_in_its_last_recorded_state() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = FileStore::open(dir.path(), FileStoreOptions::default(), None).unwrap();
        s.issue(lease("a", "j", 100), Some(&ReplayKey::new("k".into(), 90))).await.unwrap();
        s.issue(lease("b", "j", 100), None).await.unwrap();
        s.begin_revoke("b", "job", 1).await.unwrap().unwrap();
        s.finish_revoke("b", Some("boom".into()), 1).await.unwrap();
        s.flush().await.unwrap();
    }
    let s = FileStore::open(dir.path(), FileStoreOptions::default(), None).unwrap();
    assert_eq!(state(&s, "a").await, Some(LeaseState::Active));
    let b = s.get("b").await.unwrap().unwrap();
    assert_eq!((b.state, b.attempts, b.last_error.as_deref()), (LeaseState::Revoking, 1, Some("boom")));
    assert_eq!(s.issue(lease("c", "j", 100), Some(&ReplayKey::new("k".into(), 90))).await, Err(IssueError::Replayed));
}

#[tokio::test]
async fn compactions_are_spaced_in_proportion_to_the_last_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let options = FileStoreOptions { compact_bytes: 1, compact_ratio: 2.0, ..FileStoreOptions::default() };
    let s = FileStore::open(dir.path(), options, None).unwrap();
    for i in 0..50 {
        s.issue(lease(&format!("a{i}"), "j", 1000), None).await.unwrap();
    }
    assert_eq!(s.maintain(1).await.unwrap().compacted, 0, "started, in the background");
    s.flush().await.unwrap();
    assert_eq!(s.maintain(1).await.unwrap().compacted, 50, "the first compaction wrote every lease");
    let figures = s.compactions().unwrap();
    assert_eq!((figures.compactions, figures.running, figures.last_records), (1, false, 50));
    assert!(figures.appended_bytes > 0 && figures.last_snapshot_bytes > 0, "{figures:?}");
    // 50 appends awaited one after another: a batch, and an fsync, each (and the flush's).
    assert!((50..=52).contains(&figures.fsyncs), "one fsync per batch of appends: {figures:?}");
    // The journal's records, not the file's length: the file runs on in zeros (its room).
    let records =
        |dir: &std::path::Path| crate::ledger::journal::decode(&std::fs::read(dir.join("journal")).unwrap()).unwrap().1;
    let snapshot = records(dir.path());
    // Appends short of twice the snapshot: no compaction.
    let mut i = 0;
    let appended = |dir: &std::path::Path| records(dir) - snapshot;
    while appended(dir.path()) < snapshot {
        s.issue(lease(&format!("b{i}"), "j", 1000), None).await.unwrap();
        i += 1;
    }
    s.maintain(2).await.unwrap();
    s.flush().await.unwrap();
    assert_eq!(
        s.maintain(2).await.unwrap().compacted,
        0,
        "compacted after {} of {snapshot} bytes",
        appended(dir.path())
    );
    while appended(dir.path()) < 2 * snapshot {
        s.issue(lease(&format!("b{i}"), "j", 1000), None).await.unwrap();
        i += 1;
    }
    s.maintain(3).await.unwrap();
    s.flush().await.unwrap();
    assert_eq!(s.maintain(3).await.unwrap().compacted, 50 + i, "twice the snapshot appended: compacted");
    drop(s);
    let reopened = FileStore::open(dir.path(), FileStoreOptions::default(), None).unwrap();
    assert_eq!(reopened.len(), 50 + i);
}

#[tokio::test]
async fn leases_issued_and_ended_while_compactions_stream_the_snapshot_all_survive_a_restart() {
    // The snapshot is read from memory lease by lease while exchanges go on: a lease added,
    // revoked or forgotten meanwhile must come back from the records carried over.
    let dir = tempfile::tempdir().unwrap();
    let options = FileStoreOptions { compact_bytes: 1, compact_ratio: 0.01, ..FileStoreOptions::default() };
    let s = Arc::new(FileStore::open(dir.path(), options, None).unwrap());
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let s = s.clone();
            tokio::spawn(async move {
                for i in 0..300 {
                    let id = format!("w{w}-{i}");
                    s.issue(lease(&id, &format!("job{w}"), 1000), Some(&ReplayKey::new(id.clone(), 2000)))
                        .await
                        .unwrap();
                    if i % 3 == 0 {
                        s.begin_revoke(&id, "job", 5).await.unwrap().unwrap();
                        s.finish_revoke(&id, None, 5).await.unwrap();
                    }
                }
            })
        })
        .collect();
    let mut compacted = 0;
    while writers.iter().any(|w| !w.is_finished()) {
        compacted += s.maintain(5).await.unwrap().compacted;
        tokio::task::yield_now().await;
    }
    for w in writers {
        w.await.unwrap();
    }
    s.flush().await.unwrap();
    compacted += s.maintain(5).await.unwrap().compacted;
    assert!(compacted > 0, "no compaction ran while the writers did");
    drop(s);
    let reopened = FileStore::open(dir.path(), FileStoreOptions::default(), None).unwrap();
    assert_eq!(reopened.len(), 1200);
    for w in 0..4 {
        for i in 0..300 {
            let id = format!("w{w}-{i}");
            let expected = if i % 3 == 0 { LeaseState::Revoked } else { LeaseState::Active };
            assert_eq!(state(&reopened, &id).await, Some(expected), "{id}");
            let replayed = reopened.issue(lease("again", "j", 1000), Some(&ReplayKey::new(id.clone(), 2000))).await;
            assert_eq!(replayed, Err(IssueError::Replayed), "{id}'s replay key was lost");
        }
    }
}
