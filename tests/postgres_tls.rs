//! The shared store's connection to a real PostgreSQL server with TLS and password
//! authentication (scripts/pg with `EPHEMERA_PG_TLS_DIR` and `EPHEMERA_PG_PASSWORD_FILE`;
//! certificates made by the openssl CLI): `sslmode=verify-full` checks the server's certificate
//! against `ca_file` alone and its name against the URL's host, the password comes from
//! `password_file`, and no failure message carries the password.
// Test helpers outside `#[test]` functions: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::replicas::OwnPg;
use ephemera::config::PostgresConfig;
use ephemera::ledger::{PgStore, RetryPolicy};
use std::path::{Path, PathBuf};
use std::process::Command;

const PASSWORD: &str = "correct-horse-battery-staple-7f3a";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA (`<name>.crt`, `<name>.key`) in `dir`.
fn ca(dir: &Path, name: &str) -> PathBuf {
    let (crt, key) = (format!("{name}.crt"), format!("{name}.key"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &key,
            "-out",
            &crt,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    dir.join(crt)
}

/// `server.crt` / `server.key` in `dir`, signed by CA `ca`, for the given subject alternative names.
fn server_cert(dir: &Path, ca: &str, names: &str) {
    std::fs::write(dir.join("san.ext"), format!("subjectAltName={names}\n")).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=postgres",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ],
    );
}

fn config(url: &str, ca_file: &Path, password_file: &Path) -> PostgresConfig {
    let mut cfg = PostgresConfig::from_url(url).unwrap();
    cfg.ca_file = Some(ca_file.to_path_buf());
    cfg.password_file = Some(password_file.to_path_buf());
    cfg.statement_timeout_ms = 3000;
    cfg
}

async fn open(cfg: &PostgresConfig) -> Result<PgStore, String> {
    let password = cfg.read_password()?;
    PgStore::open(cfg, password.as_ref(), "tls-test", RetryPolicy::default()).await
}

fn refused(outcome: Result<PgStore, String>, what: &str) -> String {
    let Err(e) = outcome else { panic!("{what}: the store opened") };
    assert!(!e.contains(PASSWORD), "{what}: the password is in the error: {e}");
    eprintln!("{what}: {e}");
    e
}

#[tokio::test]
async fn the_store_reaches_postgres_only_over_tls_verified_against_its_ca_file_and_with_its_password() {
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path();
    let right_ca = ca(dir, "database-ca");
    let other_ca = ca(dir, "someone-else");
    server_cert(dir, "database-ca", "IP:127.0.0.1,DNS:db.internal");
    // One trailing newline, as `echo` writes it: not part of the password.
    let password_file = dir.join("pg-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let wrong_password = dir.join("wrong-password");
    std::fs::write(&wrong_password, "not-the-password\n").unwrap();
    let pg = OwnPg::start_with(&[("EPHEMERA_PG_TLS_DIR", dir), ("EPHEMERA_PG_PASSWORD_FILE", &password_file)]).await;
    assert!(pg.url.ends_with("sslmode=verify-full"), "{}", pg.url);

    // The right CA and password: the store opens (migrating the schema over TLS).
    let good = config(&pg.url, &right_ca, &password_file);
    assert!(good.tls);
    let store = open(&good).await.unwrap_or_else(|e| panic!("the store should open: {e}"));
    drop(store);

    // A certificate from a CA the config does not name is refused, whoever signed it.
    let e = refused(open(&config(&pg.url, &other_ca, &password_file)).await, "another CA");
    assert!(e.to_lowercase().contains("certificate"), "{e}");

    // The right CA but another host name than the certificate's: refused (verify-full).
    let by_name = pg.url.replace("127.0.0.1", "localhost");
    let e = refused(open(&config(&by_name, &right_ca, &password_file)).await, "a host name the certificate lacks");
    assert!(e.to_lowercase().contains("certificate") || e.contains("NotValidForName"), "{e}");

    // The wrong password: refused by the server, and the error says so without either password.
    let e = refused(open(&config(&pg.url, &right_ca, &wrong_password)).await, "the wrong password");
    assert!(e.contains("28P01") || e.contains("password authentication failed"), "{e}");
    assert!(!e.contains("not-the-password"), "{e}");

    // Without TLS the server refuses the connection (hostssl only): nothing goes in plain text.
    let plain = config(&pg.url.replace("sslmode=verify-full", "sslmode=disable"), &right_ca, &password_file);
    assert!(!plain.tls);
    refused(open(&plain).await, "no TLS");
}
