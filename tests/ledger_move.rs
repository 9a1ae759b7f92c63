//! Moving a live broker from the file journal to PostgreSQL: `ephemera ledger export` on the
//! stopped broker's journal, `ephemera ledger import` into a fresh database on a real server.
//! Every lease arrives in its state, every replay key with it, and a second import adds nothing.
// Test helpers outside `#[test]` functions: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::dev_broker::{DevBroker, client, dev_token, revoke};
use common::replicas::{create_database, pg_connect, pg_server_url};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

fn ephemera(args: &[&str], stdin_file: Option<&Path>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ephemera"));
    command.args(args).env("RUST_LOG", "warn");
    if let Some(file) = stdin_file {
        command.stdin(std::fs::File::open(file).unwrap());
    }
    command.output().expect("run the ephemera binary")
}

async fn exchange(client: &reqwest::Client, url: &str) -> String {
    let token = dev_token(client, url).await;
    let resp = client.post(format!("{url}/v1/exchange")).bearer_auth(&token).json(&json!({"policy": "dev"})).send();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 201);
    let body: Value = resp.json().await.unwrap();
    body["lease_id"].as_str().unwrap().to_string()
}

/// lease id → state, from export records.
fn states(records: &[Value]) -> BTreeMap<String, String> {
    records
        .iter()
        .filter(|r| r["t"] == "created")
        .map(|r| (r["lease"]["id"].as_str().unwrap().to_string(), r["lease"]["state"].as_str().unwrap().to_string()))
        .collect()
}

#[tokio::test]
async fn a_file_journal_moves_into_postgres_with_every_lease_in_its_state_and_every_replay_key() {
    // A dev broker with two revoked leases and one live one, then stopped.
    let data = tempfile::tempdir().unwrap();
    let http = client();
    let mut broker = DevBroker::start(data.path());
    broker.wait_ready(&http).await;
    let url = broker.url().to_string();
    let ended = [exchange(&http, &url).await, exchange(&http, &url).await];
    let reply = revoke(&http, &url, &dev_token(&http, &url).await).await;
    assert_eq!(reply["revoked"].as_array().unwrap().len(), 2, "{reply}");
    let live = exchange(&http, &url).await;
    broker.sigterm();
    assert!(broker.wait_exit().await.success());

    // Export from the journal.
    let work = tempfile::tempdir().unwrap();
    let from = work.path().join("file.toml");
    std::fs::write(&from, format!("data_dir = {:?}\n", data.path())).unwrap();
    let out = ephemera(&["ledger", "export", "--config", from.to_str().unwrap()], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let export = work.path().join("leases.jsonl");
    std::fs::write(&export, &out.stdout).unwrap();
    let records: Vec<Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let expected: BTreeMap<String, String> = [
        (ended[0].clone(), "revoked".to_string()),
        (ended[1].clone(), "revoked".to_string()),
        (live.clone(), "active".to_string()),
    ]
    .into();
    assert_eq!(states(&records), expected);
    assert_eq!(records.iter().filter(|r| r["t"] == "jti_used").count(), 3, "one per exchange (a revoke uses none)");

    // Import into a fresh database.
    let db = create_database(&pg_server_url()).await;
    let to = work.path().join("pg.toml");
    let key = work.path().join("jwt.pk8");
    let toml = format!(
        "replica_id = \"mover\"\ndata_dir = {:?}\n[ledger]\nstore = \"postgres\"\nurl = {db:?}\n\
         [backends.jwt]\ntype = \"jwt\"\nsigning_key_file = {key:?}\n",
        work.path().join("data")
    );
    std::fs::write(&to, toml).unwrap();
    let import = |file: &Path| ephemera(&["ledger", "import", "--config", to.to_str().unwrap()], Some(file));
    let out = import(&export);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("imported 6 records, 3 new leases"));

    let pg = pg_connect(&db).await;
    let rows = pg
        .query(
            "SELECT l.id, s.state FROM ephemera_leases l JOIN ephemera_lease_state s ON s.id = l.id ORDER BY l.id",
            &[],
        )
        .await
        .unwrap();
    let in_db: BTreeMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(in_db, expected);
    let keys: i64 = pg.query_one("SELECT count(*) FROM ephemera_replay_keys", &[]).await.unwrap().get(0);
    assert_eq!(keys, 3);

    // Again: nothing new. A damaged line stops the import and names its line.
    let out = import(&export);
    assert!(String::from_utf8_lossy(&out.stderr).contains("imported 6 records, 0 new leases"));
    let damaged = work.path().join("damaged.jsonl");
    std::fs::write(&damaged, "{\"t\":\"jti_used\",\"key\":\"x\",\"exp\":1}\n{\"t\":\"created\",\"lease\":{}}\n")
        .unwrap();
    let out = import(&damaged);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 2: not a ledger record"), "{stderr}");
    let keys: i64 = pg.query_one("SELECT count(*) FROM ephemera_replay_keys", &[]).await.unwrap().get(0);
    assert_eq!(keys, 3, "nothing of the damaged chunk was written");
}
