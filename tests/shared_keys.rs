//! One key set for every replica on a shared store: a JWT minted on any replica must verify
//! against every replica's JWKS, so with `store = "postgres"` each jwt backend names its key file
//! (a mounted secret) and a missing file refuses the start. A key generated per replica would
//! split the key set without a word.
// Test helpers outside `#[test]` functions: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::replicas::{create_database, pg_server_url};
use ephemera::clock::{Clock, SystemClock};
use ephemera::config::Config;
use ephemera::server::{Options, start};
use std::sync::Arc;

fn shared_config(db: &str, backend: &str) -> String {
    format!("replica_id = \"r1\"\nlisten = \"127.0.0.1:0\"\n[ledger]\nstore = \"postgres\"\nurl = {db:?}\n{backend}")
}

#[test]
fn a_shared_store_refuses_a_jwt_backend_without_a_named_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let toml = shared_config("postgres://e@127.0.0.1/x?sslmode=disable", "[backends.api]\ntype = \"jwt\"\n");
    let errs = Config::parse(&toml, dir.path()).unwrap_err();
    assert!(
        errs.iter().any(|e| e.contains("backends.api.signing_key_file: required with store = \"postgres\"")),
        "{errs:?}"
    );
    let errs = Config::parse(&shared_config("postgres://e@127.0.0.1/x?sslmode=disable", ""), dir.path()).unwrap_err();
    assert!(errs.iter().any(|e| e.contains("configure the jwt backend with a signing_key_file")), "{errs:?}");
}

#[tokio::test]
async fn a_replica_whose_key_file_is_missing_refuses_to_start_and_generates_none() {
    ephemera::install_crypto();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    let key = dir.path().join("secrets/jwt.pk8");
    let db = create_database(&pg_server_url()).await;
    let backend = format!("[backends.api]\ntype = \"jwt\"\nsigning_key_file = {key:?}\n");
    let config = Config::parse(&shared_config(&db, &backend), dir.path()).unwrap();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let Err(e) = start(Options::new(config, false, clock)).await else { panic!("the replica started without its key") };
    assert!(e.contains("backend api") && e.contains("jwt.pk8"), "{e}");
    assert!(!key.exists(), "no key was generated in its place");
}
