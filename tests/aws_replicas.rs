//! Two replicas' AWS backends revoking sessions of one role at the same time, against moto (a
//! real AWS API) and a real PostgreSQL: a revocation merges its entry into the role's one deny
//! policy (read, merge, write). Each backend serialises its own writers in process; across
//! replicas only the shared store's advisory lock stops one replica's write from overwriting
//! what the other just wrote, which would silently bring a revoked session back to life.
// Test helpers outside `#[test]` functions: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::moto::Moto;
use common::replicas::{create_database, pg_server_url};
use ephemera::aws_format::deny::{DENY_POLICY_NAME, parse_deny_policy};
use ephemera::clock::{Clock, SystemClock};
use ephemera::config::{BackendConfig, Config, PostgresConfig};
use ephemera::ledger::{LeaseStore, PgStore, RetryPolicy};
use ephemera::mint::aws::AwsBackend;
use ephemera::mint::{Backend, RevokeHandle};
use serde_json::json;
use std::collections::BTreeSet;
use std::sync::Arc;

/// Revocations per replica, all at once.
const PER_REPLICA: usize = 12;

fn handle(role: &str, lease: &str, expires: i64) -> RevokeHandle {
    RevokeHandle {
        backend: "aws".into(),
        data: json!({"role_name": role, "source_identity": lease, "session_expires_at": expires}),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_revoking_sessions_of_one_role_at_once_keep_every_deny_entry() {
    ephemera::install_crypto();
    let moto = Moto::start();
    moto.create_role("deploy");
    let (toml, _creds) = common::aws_backend(&moto.endpoint, "deny-policy");
    let dir = tempfile::tempdir().unwrap();
    let config = Config::parse(&toml, dir.path()).unwrap();
    let Some(BackendConfig::Aws(aws)) = config.backends.get("aws") else { panic!("an aws backend") };
    let db = PostgresConfig::from_url(&create_database(&pg_server_url()).await).unwrap();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);

    let mut replicas = Vec::new();
    for name in ["r1", "r2"] {
        let store = PgStore::open(&db, None, name, RetryPolicy::default()).await.unwrap();
        let backend = AwsBackend::new("aws", aws, clock.clone(), store.exclusive()).await.unwrap();
        replicas.push((Arc::new(backend), store));
    }
    let expires = clock.now() + 3600;
    let mut revocations = Vec::new();
    let mut leases = BTreeSet::new();
    for i in 0..PER_REPLICA {
        for (r, (backend, _)) in replicas.iter().enumerate() {
            let lease = format!("lse_r{r}_{i:02}");
            leases.insert(lease.clone());
            let (backend, handle) = (backend.clone(), handle("deploy", &lease, expires));
            revocations.push(tokio::spawn(async move { backend.revoke(&handle).await }));
        }
    }
    for revocation in revocations {
        revocation.await.unwrap().unwrap_or_else(|e| panic!("a revocation failed: {}", e.detail));
    }

    let doc = moto.get_role_policy("deploy", DENY_POLICY_NAME).expect("the deny policy exists");
    let denied: BTreeSet<String> = parse_deny_policy(&doc).unwrap().into_iter().map(|(id, _)| id).collect();
    let lost: Vec<&String> = leases.difference(&denied).collect();
    assert!(lost.is_empty(), "deny entries overwritten by the other replica: {lost:?}");
}
