//! Issue 17: a PostgreSQL login role per lease, against a real PostgreSQL server (scripts/pg):
//! the role logs in with its password (the server checks it: scram-sha-256), reads only what its
//! group role may, and is gone, with its open session, once the lease ends. A broker killed
//! between `CREATE ROLE` and recording the lease leaves no role behind after a restart.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::replicas::{Cluster, OwnPg, ReplicaExtra, pg_server_url, roles_with, unix_now};
use common::*;
use ephemera::clock::Clock;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

const POLICY: &str = r#"
issuer: ci
match:
  repository_id: "74"
  ref: refs/heads/main
ttl: {default: 10m, max: 1h}
grants:
  db:
    backend: db
    roles: [app_readonly]
    database: app
"#;

const SUPERUSER_PASSWORD: &str = "superuser-password-for-tests";
const ADMIN_PASSWORD: &str = "broker-admin-password-for-tests";

struct Setup {
    _pg: OwnPg,
    /// The server's port.
    port: u16,
    issuer: FakeIssuer,
    broker: Broker,
    _dir: tempfile::TempDir,
}

/// A client logged in as `user` with `password` to `db`.
async fn login(
    port: u16,
    user: &str,
    password: &str,
    db: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config.host("127.0.0.1").port(port).user(user).password(password).dbname(db);
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

async fn superuser(port: u16, db: &str) -> tokio_postgres::Client {
    login(port, "ephemera", SUPERUSER_PASSWORD, db).await.unwrap()
}

/// Its own server with password authentication, the operator's set-up (docs/postgres.md): a
/// database `app` with a table the group role `app_readonly` may read and one it may not, the
/// broker's admin role with only CREATEROLE, `pg_signal_backend` and `app_readonly WITH ADMIN
/// OPTION`; and a broker (clock at the real time: the server checks `VALID UNTIL` on its own).
async fn setup(policies: &[(&str, &str)]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let pwfile = dir.path().join("superuser-password");
    std::fs::write(&pwfile, SUPERUSER_PASSWORD).unwrap();
    let pg = OwnPg::start_with(&[("EPHEMERA_PG_PASSWORD_FILE", &pwfile)]).await;
    let port: u16 = url::Url::parse(&pg.url).unwrap().port().unwrap();
    superuser(port, "postgres").await.batch_execute("CREATE DATABASE app").await.unwrap();
    superuser(port, "app")
        .await
        .batch_execute(&format!(
            "CREATE TABLE reports (id int); INSERT INTO reports VALUES (1), (2);
             CREATE TABLE payroll (salary int); INSERT INTO payroll VALUES (100000);
             CREATE ROLE app_readonly NOLOGIN;
             GRANT USAGE ON SCHEMA public TO app_readonly;
             GRANT SELECT ON reports TO app_readonly;
             CREATE ROLE file_readers NOLOGIN; GRANT pg_read_server_files TO file_readers;
             CREATE ROLE role_makers NOLOGIN CREATEROLE;
             CREATE ROLE ephemera_admin LOGIN CREATEROLE PASSWORD '{ADMIN_PASSWORD}';
             GRANT pg_signal_backend TO ephemera_admin;
             GRANT app_readonly, file_readers, role_makers TO ephemera_admin WITH ADMIN OPTION;"
        ))
        .await
        .unwrap();
    let admin_pw = dir.path().join("admin-password");
    std::fs::write(&admin_pw, format!("{ADMIN_PASSWORD}\n")).unwrap();
    let backend = format!(
        "[backends.db]\ntype = \"postgres\"\nurl = \"postgres://ephemera_admin@127.0.0.1:{port}/app?sslmode=disable\"\n\
         password_file = {:?}\nmax_ttl = \"1h\"\n",
        admin_pw.display().to_string()
    );
    let issuer = FakeIssuer::start().await;
    let clock = Arc::new(ephemera::clock::ManualClock::new(unix_now()));
    let extra = Extra { backend_toml: backend, ..Extra::default() };
    let broker = Broker::start_custom_clock(&[("ci", "github-actions", &issuer)], policies, &extra, clock).await;
    Setup { _pg: pg, port, issuer, broker, _dir: dir }
}

impl Setup {
    fn token(&self) -> String {
        self.issuer.sign(&self.issuer.claims("github-push-immutable-sub.json", self.broker.clock.now()))
    }

    /// The roles of this backend that exist now.
    async fn ephemera_roles(&self) -> Vec<String> {
        let rows = superuser(self.port, "app")
            .await
            .query("SELECT rolname FROM pg_roles WHERE starts_with(rolname, 'ephemera_lse') ORDER BY 1", &[])
            .await
            .unwrap();
        rows.iter().map(|r| r.get(0)).collect()
    }
}

fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_else(|| e.to_string())
}

#[tokio::test]
async fn a_minted_role_reads_only_what_its_group_may_and_dies_with_its_session_at_revoke() {
    let s = setup(&[("push", POLICY)]).await;
    let (status, body) = s.broker.exchange(&s.token(), "push").await;
    assert_eq!(status, 201, "{body}");
    let db = &body["credentials"]["db"];
    assert_eq!((db["kind"].as_str(), db["revocation"].as_str()), (Some("postgres"), Some("immediate")));
    let (user, password) = (db["username"].as_str().unwrap(), db["password"].as_str().unwrap());
    let lease = body["lease_id"].as_str().unwrap();
    assert!(user.starts_with("ephemera_lse_") && user.len() <= 63, "{user}");
    assert_eq!(db["dsn"], format!("postgresql://{user}:{password}@127.0.0.1:{}/app?sslmode=disable", s.port));

    // The ready dsn logs in; the server checked the password (scram-sha-256 everywhere).
    let (job, connection) = tokio_postgres::connect(db["dsn"].as_str().unwrap(), tokio_postgres::NoTls).await.unwrap();
    let session = tokio::spawn(connection);
    let rows = job.query("SELECT count(*) FROM reports", &[]).await.unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), 2, "the group role's SELECT");
    let denied = job.query("SELECT * FROM payroll", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&denied), "42501", "a table its group may not read");
    let denied = job.batch_execute("CREATE TABLE mine (x int)").await.unwrap_err();
    assert_eq!(sqlstate(&denied), "42501", "no CREATE in public");
    assert!(login(s.port, user, "not-the-password", "app").await.is_err(), "a wrong password");

    // What the role is: LOGIN and nothing else, its connection limit, its end, a SCRAM verifier.
    let admin = superuser(s.port, "app").await;
    let row = admin
        .query_one(
            "SELECT rolsuper OR rolcreaterole OR rolcreatedb OR rolreplication OR rolbypassrls, rolconnlimit, \
             extract(epoch FROM rolvaliduntil)::bigint, rolpassword FROM pg_authid WHERE rolname = $1",
            &[&user],
        )
        .await
        .unwrap();
    assert!(!row.get::<_, bool>(0), "no attribute beyond LOGIN");
    assert_eq!(row.get::<_, i32>(1), 4);
    assert_eq!(row.get::<_, i64>(2), s.broker.clock.now() + 600, "VALID UNTIL the lease's end");
    let stored: String = row.get(3);
    assert!(stored.starts_with("SCRAM-SHA-256$4096:") && !stored.contains(password), "{stored}");

    let (status, reply) = s.broker.revoke(&s.token(), json!({"lease_id": lease})).await;
    assert_eq!((status, &reply["revoked"]), (200, &json!([lease])), "{reply}");
    assert!(job.query("SELECT 1", &[]).await.is_err(), "the open session was terminated");
    assert!(session.await.unwrap().is_err() || job.is_closed());
    let err = login(s.port, user, password, "app").await.unwrap_err();
    assert_eq!(sqlstate(&err), "28P01", "the role is gone: password authentication fails");
    assert!(s.ephemera_roles().await.is_empty(), "dropped");
    assert_not_logged(&[password]);
}

#[tokio::test]
async fn a_grant_reaching_a_powerful_or_missing_role_is_refused_and_creates_nothing() {
    let policy = |role: &str| POLICY.replace("[app_readonly]", &format!("[{role}]"));
    let (files, makers, missing) = (policy("file_readers"), policy("role_makers"), policy("no_such_group"));
    let s = setup(&[("files", &files), ("makers", &makers), ("missing", &missing)]).await;
    for (policy, says) in [
        ("files", "reach `pg_read_server_files` (reads or writes any file the server can)"),
        ("makers", "reach `role_makers` (CREATEROLE)"),
        ("missing", "the group role `no_such_group` does not exist"),
    ] {
        let reply = s.broker.exchange(&s.token(), policy).await;
        assert_error(&reply, 502, "backend_error");
        let message = reply.1["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{policy}: {message}");
    }
    assert!(s.ephemera_roles().await.is_empty(), "nothing was created");
}

#[tokio::test]
async fn the_leases_expiry_drops_its_role() {
    let s = setup(&[("push", POLICY)]).await;
    let (_, body) = s.broker.exchange(&s.token(), "push").await;
    let user = body["credentials"]["db"]["username"].as_str().unwrap().to_string();
    assert_eq!(s.ephemera_roles().await, std::slice::from_ref(&user));
    s.broker.clock.advance(601);
    s.broker.running.app.reap_once().await;
    assert!(s.ephemera_roles().await.is_empty(), "the reaper ended the lease and dropped {user}");
}

/// A role's objects go with it (`owned_objects = "drop"`, the default): a role that created a
/// table in a schema it was given does not block its own `DROP ROLE`.
#[tokio::test]
async fn a_role_that_made_objects_is_still_dropped() {
    let s = setup(&[("push", POLICY)]).await;
    superuser(s.port, "app")
        .await
        .batch_execute("CREATE SCHEMA scratch; GRANT USAGE, CREATE ON SCHEMA scratch TO app_readonly;")
        .await
        .unwrap();
    let (_, body) = s.broker.exchange(&s.token(), "push").await;
    let db = &body["credentials"]["db"];
    let job = login(s.port, db["username"].as_str().unwrap(), db["password"].as_str().unwrap(), "app").await.unwrap();
    job.batch_execute("CREATE TABLE scratch.left_behind (x int)").await.unwrap();
    drop(job);
    let lease = body["lease_id"].as_str().unwrap();
    let (_, reply) = s.broker.revoke(&s.token(), json!({"lease_id": lease})).await;
    assert_eq!(reply["revoked"], json!([lease]), "{reply}");
    assert!(s.ephemera_roles().await.is_empty());
    let gone =
        superuser(s.port, "app").await.query("SELECT to_regclass('scratch.left_behind')::text", &[]).await.unwrap();
    assert_eq!(gone[0].get::<_, Option<String>>(0), None, "its table went with it");
}

/// kill -9 of the real broker binary between `CREATE ROLE` and recording the lease: the test
/// holds a lock on the shared ledger's lease table, so the exchange waits right there, with its
/// role created. After a restart, the reaper finds the role's lease unknown and drops it.
#[tokio::test]
async fn a_broker_killed_between_create_role_and_the_lease_leaves_no_role_after_restart() {
    let cluster = Cluster::new(&pg_server_url(), &[("push", POLICY)]).await;
    let tag = ephemera::secret::hex(&ephemera::ids::random::<3>());
    let (prefix, group) = (format!("eph{tag}_"), format!("app_readonly_{tag}"));
    let db = cluster.db().await;
    db.batch_execute(&format!("CREATE ROLE {group} NOLOGIN")).await.unwrap();
    let policy = POLICY.replace("[app_readonly]", &format!("[{group}]"));
    std::fs::write(cluster.dir.path().join("policies/push.yaml"), policy).unwrap();
    let extra = ReplicaExtra {
        backends_toml: format!(
            "[backends.db]\ntype = \"postgres\"\nurl = \"{}\"\nrole_prefix = \"{prefix}\"\norphan_grace = \"1s\"\n",
            cluster.db_url
        ),
        ..ReplicaExtra::default()
    };
    let mut first = cluster.start("a", &extra).await;
    let mut lock = cluster.db().await;
    let tx = lock.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE ephemera_leases IN ACCESS EXCLUSIVE MODE").await.unwrap();
    let (url, token, http) =
        (first.endpoint("/v1/exchange"), cluster.token("github-push-immutable-sub.json"), cluster.http.clone());
    let exchange =
        tokio::spawn(async move { common::replicas::post_json(&http, &url, &token, &json!({"policy": "push"})).await });
    let deadline = Instant::now() + Duration::from_secs(30);
    let made = loop {
        let found = roles_with(&db, &prefix).await;
        if !found.is_empty() {
            break found;
        }
        assert!(Instant::now() < deadline, "no role was created");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    first.kill();
    tx.rollback().await.unwrap();
    let _ = exchange.await;
    assert_eq!(roles_with(&db, &prefix).await, made, "the role outlived the broker");
    let leases: i64 = db.query_one("SELECT count(*) FROM ephemera_leases", &[]).await.unwrap().get(0);
    assert_eq!(leases, 0, "its lease was never recorded");

    let _second = cluster.start("b", &extra).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !roles_with(&db, &prefix).await.is_empty() {
        assert!(Instant::now() < deadline, "the orphan role {made:?} was not dropped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    db.batch_execute(&format!("DROP ROLE {group}")).await.unwrap();
}

/// A renewable lease gets a fresh role at each renewal (each with its own name); ending the lease
/// drops every one of them.
#[tokio::test]
async fn every_role_a_renewed_lease_got_is_dropped_when_it_ends() {
    let renewable = format!("{POLICY}renew: {{max_lease: 2h}}\n");
    let s = setup(&[("push", &renewable)]).await;
    let (_, body) = s.broker.exchange(&s.token(), "push").await;
    let lease = body["lease_id"].as_str().unwrap();
    let renew_token = body["renew"]["token"].as_str().unwrap();
    let renewed = s
        .broker
        .http
        .post(format!("{}/v1/leases/{lease}/renew", s.broker.url))
        .bearer_auth(renew_token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(renewed.status(), 200);
    let renewed: serde_json::Value = renewed.json().await.unwrap();
    let (first, second) = (&body["credentials"]["db"]["username"], &renewed["credentials"]["db"]["username"]);
    assert_ne!(first, second, "a role of its own");
    assert_eq!(s.ephemera_roles().await.len(), 2);
    let (_, reply) = s.broker.revoke(&s.token(), json!({"lease_id": lease})).await;
    assert_eq!(reply["revoked"], json!([lease]), "{reply}");
    assert!(s.ephemera_roles().await.is_empty(), "both roles dropped");
}
