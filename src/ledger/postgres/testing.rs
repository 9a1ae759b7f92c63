//! A fresh database per test, on a real PostgreSQL server: the one `scripts/test` starts and
//! exports as `EPHEMERA_PG_URL`, or else one `scripts/pg` starts (or finds running) under
//! `target/pg-test`, so a plain `cargo test` works too.
// Test support: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::config::PostgresConfig;
use std::sync::OnceLock;

/// The test server's superuser URL.
pub fn server_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("EPHEMERA_PG_URL") {
            return url;
        }
        let root = env!("CARGO_MANIFEST_DIR");
        let out = std::process::Command::new(format!("{root}/scripts/pg"))
            .args(["start", &format!("{root}/target/pg-test")])
            .output()
            .expect("scripts/pg runs");
        assert!(out.status.success(), "scripts/pg start failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    })
    .clone()
}

/// A new, empty database on the test server, as the store's config.
pub async fn fresh_database() -> PostgresConfig {
    let server = PostgresConfig::from_url(&server_url()).unwrap();
    let name = format!("ephemera_test_{}", crate::secret::hex(&crate::ids::random::<8>()));
    let (client, connection) = crate::pg_connect::settings(&server, None)
        .connect(tokio_postgres::NoTls)
        .await
        .expect("the test server answers");
    tokio::spawn(connection);
    client.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
    // The suite expects the file store's stall time.
    PostgresConfig { dbname: name, pool_size: 8, claim_timeout_secs: crate::ledger::STALLED_ATTEMPT_SECS, ..server }
}
