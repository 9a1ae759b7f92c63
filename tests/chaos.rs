//! Chaos (issue 21): the real `ephemera serve` binary killed with SIGKILL at a random point of a
//! storm of exchanges and revocations, round after round, on the file store and on PostgreSQL,
//! with every kind of credential among the leases: broker JWTs, AWS sessions (moto: a real AWS
//! API), GitHub App installation tokens (a FAKE GitHub API: none can run here;
//! tests/common/fake_github.rs), login roles on a real PostgreSQL server, and OpenSSH
//! certificates judged by the real `ssh-keygen` against the broker's KRL.
//!
//! The promise under test, every round: after the restart, no lease that got a 201 is lost; a
//! revocation that got its 200 stays done; and once each job revokes, every lease the ledger
//! knows (also those whose 201 the kill cut off) ends revoked, counted upstream, not in the
//! ledger's own words: each AWS session's lease listed in the role's deny policy at AWS, each
//! GitHub token refused by GitHub, no login role of the broker's left at PostgreSQL (also those
//! whose lease the kill kept from being recorded: the reaper drops orphan roles), and each
//! certificate a job got REVOKED by the KRL as `ssh-keygen -Q` reads it. What the kill can leave
//! behind, by design: a GitHub token minted in the milliseconds before its lease was durable has
//! no record to revoke it by; it lives out GitHub's hour (docs/github.md). The test bounds those
//! by the requests in flight at the kill.
//!
//! `scripts/test` runs 2 rounds of 200 leases per store; `scripts/chaos` runs the 10
//! rounds of 1,000 (`EPHEMERA_CHAOS_ROUNDS`, `EPHEMERA_CHAOS_LEASES`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::fake_github::{FakeGithub, FakeInstallation};
use common::moto::Moto;
use common::replicas::{Cluster, Replica, ReplicaExtra, pg_server_url, roles_with, unix_now};
use common::sshd::{ssh_keygen, ssh_keygen_output};
use common::{REPO_74_JWT_POLICY, aws_backend};
use ephemera::aws_format::deny::{DENY_POLICY_NAME, parse_deny_policy};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Which policy job `i` exchanges under: in each 20 jobs, two under each of the AWS, GitHub,
/// PostgreSQL and SSH policies (an even one, whose lease the storm leaves to the end of the round,
/// and an odd one, which the storm revokes at once: so a kill finds revocations of every kind
/// pending), the rest broker JWTs. One job in ten is AWS: a role's deny policy holds ~300
/// revoked sessions at most (IAM's 10,240-character limit), so each round has a role of its own.
fn policy_of(i: usize, aws: &str) -> String {
    match i % 20 {
        0 | 1 => aws.to_string(),
        2 | 3 => "gh".into(),
        4 | 5 => "db".into(),
        6 | 7 => "ssh".into(),
        _ => "jwt".into(),
    }
}
/// Concurrent clients of the storm.
const CLIENTS: usize = 16;
/// How long the ledger may take to finish every revocation after the round's revokes.
const SETTLE: Duration = Duration::from_secs(120);

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn aws_policy(arn: &str) -> String {
    format!(
        "issuer: ci\nmatch: {{repository_id: \"74\"}}\nttl: {{default: 10m, max: 1h}}\ngrants:\n  \
         api: {{backend: jwt, audience: https://api.internal.example}}\n  \
         aws:\n    backend: aws\n    role_arn: {arn}\n    \
         session_policy: {{Version: \"2012-10-17\", Statement: [{{Effect: Allow, Action: \"s3:GetObject\", Resource: \"*\"}}]}}\n"
    )
}

const GH_POLICY: &str = "issuer: ci\nmatch: {repository_id: \"74\"}\nttl: {default: 10m, max: 1h}\ngrants:\n  \
    gh: {backend: gh, owner: octo-org, repositories: [octo-repo], permissions: {contents: read}}\n";
const SSH_POLICY: &str = "issuer: ci\nmatch: {repository_id: \"74\"}\nttl: {default: 10m, max: 1h}\ngrants:\n  \
    shell: {backend: ssh, principals: [deploy]}\n";

fn db_policy(group: &str) -> String {
    format!(
        "issuer: ci\nmatch: {{repository_id: \"74\"}}\nttl: {{default: 10m, max: 1h}}\ngrants:\n  \
         db: {{backend: db, roles: [{group}]}}\n"
    )
}

/// What the clients saw in one round.
#[derive(Default)]
struct Seen {
    /// (job, policy, lease id, credentials) of every 201.
    issued: Vec<(usize, String, String, Value)>,
    /// Lease ids whose revocation got a 200 naming them.
    revoked: BTreeSet<String>,
}

/// Job `i`'s token in round `round`: its own run, so its own job key.
fn job_token(cluster: &Cluster, round: usize, i: usize) -> String {
    let mut claims = cluster.claims("github-environment-deploy.json");
    claims.insert("run_id".into(), json!(format!("{}", 7_000_000 + round * 100_000 + i)));
    claims.insert("check_run_id".into(), json!(format!("{}", 9_000_000 + round * 100_000 + i)));
    cluster.issuer.sign(&claims)
}

/// Leases of the ledger matching `query` (the admin list: fewer than its cap of 1,000).
async fn leases_in(replica: &Replica, query: &str) -> Vec<Value> {
    let (status, body) = replica.admin_get(&format!("/v1/leases?{query}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["truncated"], false, "more leases ({query}) than one list shows");
    body["leases"].as_array().unwrap().clone()
}

async fn chaos(store: &str) {
    let rounds = knob("EPHEMERA_CHAOS_ROUNDS", 2);
    let leases = knob("EPHEMERA_CHAOS_LEASES", 200);
    let moto = Moto::start();
    let github = FakeGithub::start(
        Arc::new(unix_now),
        vec![FakeInstallation::org(7, "octo-org", &["octo-repo"], &[("contents", "read"), ("metadata", "read")])],
    )
    .await;
    github.set_rate_limit(1_000_000, unix_now() + 3600);
    // The PostgreSQL backend's roles and group, named for this test alone (roles are the
    // server's, not one database's).
    let tag = ephemera::secret::hex(&ephemera::ids::random::<3>());
    let (prefix, group) = (format!("eph{tag}_"), format!("chaos_{tag}"));
    let cluster = Cluster::new(
        &pg_server_url(),
        &[("jwt", REPO_74_JWT_POLICY), ("gh", GH_POLICY), ("db", &db_policy(&group)), ("ssh", SSH_POLICY)],
    )
    .await;
    let db = cluster.db().await;
    db.batch_execute(&format!("CREATE ROLE {group} NOLOGIN")).await.unwrap();
    let ca = cluster.dir.path().join("ssh-ca");
    ssh_keygen(&["-q", "-t", "ed25519", "-N", "", "-C", "chaos-ca", "-f", &ca.display().to_string()]);
    let (aws_toml, _creds) = aws_backend(&moto.endpoint, "deny-policy");
    let home = tempfile::tempdir().unwrap();
    let extra = ReplicaExtra {
        backends_toml: format!(
            "{aws_toml}\n{github}\n[backends.db]\ntype = \"postgres\"\nurl = \"{url}\"\nrole_prefix = \"{prefix}\"\n\
             orphan_grace = \"1s\"\n\n[backends.ssh]\ntype = \"ssh\"\nca_key_file = {ca:?}\nrevocation = \"krl\"\n\
             max_ttl = \"1h\"\n",
            github = github.backend_toml("gh"),
            url = cluster.db_url,
            ca = ca.display().to_string(),
        ),
        file_store: store == "file",
        home: Some(PathBuf::from(home.path())),
        // One client address and one repository: the storm is not what the limits are for.
        tail_toml: "[limits]\naddress = { per_second = 100000, burst = 100000 }\n\
                    repository = { per_second = 100000, burst = 100000 }\n\
                    issuer = { per_second = 100000, burst = 100000 }\n"
            .into(),
        ..ReplicaExtra::default()
    };
    let (mut checked, mut aws_checked, mut gh_checked, mut roles_checked, mut certs_checked, mut gh_orphans) =
        (0, 0, 0, 0, 0, 0);
    let (mut orphaned, mut roles_before) = (BTreeSet::new(), 0);
    for round in 0..rounds {
        // This round's role, and the policy that assumes it (loaded by the next start).
        let role = format!("chaos-{store}-{round}");
        let arn = moto.create_role(&role);
        let aws = format!("aws{round}");
        std::fs::write(cluster.dir.path().join(format!("policies/{aws}.yaml")), aws_policy(&arn)).unwrap();
        let tokens: Arc<Vec<(String, String)>> =
            Arc::new((0..leases).map(|i| (policy_of(i, &aws), job_token(&cluster, round, i))).collect());
        let mut replica = cluster.start("chaos", &extra).await;
        // Killed after a random number of 201s, between a tenth of the storm and nine tenths.
        let kill_after = leases / 10 + usize::from(ephemera::ids::random::<2>()[0]) * leases * 8 / 10 / 256;
        let (seen, ok) = (Arc::new(Mutex::new(Seen::default())), Arc::new(AtomicUsize::new(0)));
        let storming = tokio::spawn({
            let (tokens, seen, ok) = (tokens.clone(), seen.clone(), ok.clone());
            let handle = ReplicaHandle::of(&replica);
            async move { storm(handle, tokens, seen, ok).await }
        });
        let deadline = Instant::now() + Duration::from_secs(300);
        while ok.load(Ordering::SeqCst) < kill_after {
            assert!(
                Instant::now() < deadline,
                "round {round}: the storm stalled at {} of {kill_after}",
                ok.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        replica.kill();
        storming.await.unwrap();
        drop(replica);

        let replica = cluster.start("chaos", &extra).await;
        let (issued, revoked) = {
            let seen = seen.lock().unwrap();
            (seen.issued.clone(), seen.revoked.clone())
        };
        assert!(issued.len() >= kill_after, "round {round}: {} issued before the kill", issued.len());
        // No 201 is lost, and no confirmed revocation comes undone.
        for (job, _, lease, _) in &issued {
            let view = replica.lease(lease).await;
            let state = view["state"].as_str().unwrap();
            assert!(
                ["active", "revoking", "revoked"].contains(&state),
                "round {round}, job {job}: lease {lease} is {state}"
            );
            if revoked.contains(lease) {
                assert_eq!(state, "revoked", "round {round}: lease {lease} was revoked (200) before the kill");
            }
        }
        // Every job revokes (also those whose 201 the kill cut off): nothing stays live.
        for (job, (_, token)) in tokens.iter().enumerate() {
            let (status, body) = replica.revoke(token, &json!({})).await;
            assert_eq!(status, 200, "round {round}, job {job}: revoke: {body}");
        }
        let settled = Instant::now() + SETTLE;
        loop {
            let open =
                leases_in(&replica, "state=active").await.len() + leases_in(&replica, "state=revoking").await.len();
            if open == 0 {
                break;
            }
            assert!(
                Instant::now() < settled,
                "round {round}: {open} leases still open {SETTLE:?} after every job revoked"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(leases_in(&replica, "state=irrevocable").await.is_empty(), "round {round}: irrevocable leases");
        // Counted at AWS: every lease of the round with a session is denied by the role's policy.
        let ledger_aws: BTreeSet<String> = leases_in(&replica, &format!("state=revoked&policy={aws}"))
            .await
            .iter()
            .map(|l| l["id"].as_str().unwrap().to_string())
            .collect();
        let denied: BTreeSet<String> = match moto.get_role_policy(&role, DENY_POLICY_NAME) {
            Some(doc) => parse_deny_policy(&doc).unwrap().into_iter().map(|(lease, _)| lease).collect(),
            None => BTreeSet::new(),
        };
        for (_, policy, lease, _) in issued.iter().filter(|(_, p, _, _)| *p == aws) {
            assert!(
                ledger_aws.contains(lease),
                "round {round}: AWS lease {lease} ({policy}) not revoked in the ledger"
            );
        }
        let missing: Vec<_> = ledger_aws.difference(&denied).collect();
        assert!(missing.is_empty(), "round {round}: revoked in the ledger but not denied at AWS: {missing:?}");
        // Counted at GitHub: every token a job got is refused. A token GitHub issued that no
        // job got and GitHub still takes was minted in the moment before the kill, its lease
        // never durable: at most one per request in flight, and it ends with GitHub's hour.
        let given: BTreeSet<String> = of_policy(&issued, "gh", "/gh/token");
        let live = github.live_tokens();
        for token in &given {
            assert!(!live.iter().any(|(t, _)| t == token), "round {round}: a revoked lease's GitHub token still works");
        }
        // (Those of earlier rounds are still live: GitHub's hour has not passed.)
        let new_orphans: Vec<String> =
            live.iter().map(|(t, _)| t.clone()).filter(|t| !given.contains(t) && !orphaned.contains(t)).collect();
        let orphans = new_orphans.len();
        orphaned.extend(new_orphans);
        assert!(orphans <= CLIENTS, "round {round}: {orphans} GitHub tokens outlived the round (more than in flight)");
        assert!(live.iter().all(|(_, expires)| *expires <= unix_now() + 3600), "a live GitHub token outlives its hour");
        // Counted at PostgreSQL: no role of the broker's is left, also none whose lease the
        // kill kept from being recorded (the reaper's orphan sweep drops those).
        let mut left = roles_with(&db, &prefix).await;
        while !left.is_empty() {
            assert!(
                Instant::now() < settled,
                "round {round}: roles {left:?} still exist {SETTLE:?} after every job revoked"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            left = roles_with(&db, &prefix).await;
        }
        // The ledger keeps ended leases for an hour: this round's are the ones it did not hold before.
        let revoked_roles = leases_in(&replica, "state=revoked&policy=db").await.len();
        let ledger_roles = revoked_roles - roles_before;
        roles_before = revoked_roles;
        // Judged by OpenSSH: every certificate a job got is REVOKED by the broker's KRL.
        let certs = of_policy(&issued, "ssh", "/shell/certificate");
        let krl = replica_krl(&replica, &home.path().join(format!("krl-{round}"))).await;
        assert_revoked_by_krl(&krl, &certs, &home.path().join(format!("certs-{round}")));
        checked += issued.len();
        aws_checked += ledger_aws.len();
        gh_checked += given.len();
        gh_orphans += orphans;
        roles_checked += ledger_roles;
        certs_checked += certs.len();
        eprintln!(
            "chaos {store} round {round}: killed after {kill_after} (of {leases}) 201s; {} issued, {} revoked before the kill; \
             {} AWS sessions denied at AWS; {} GitHub tokens refused at GitHub ({orphans} minted unrecorded, live until \
             GitHub's hour); {ledger_roles} roles revoked, none left at PostgreSQL; {} certificates REVOKED by the KRL",
            issued.len(),
            revoked.len(),
            ledger_aws.len(),
            given.len(),
            certs.len(),
        );
        drop(replica);
    }
    db.batch_execute(&format!("DROP ROLE {group}")).await.unwrap();
    eprintln!(
        "chaos {store}: {rounds} rounds, {checked} leases that got a 201 checked; counted upstream: {aws_checked} AWS \
         sessions, {gh_checked} GitHub tokens ({gh_orphans} minted unrecorded at a kill), {roles_checked} PostgreSQL \
         roles, {certs_checked} SSH certificates"
    );
}

/// The credential field at `pointer` of every issued lease under `policy`.
fn of_policy(issued: &[(usize, String, String, Value)], policy: &str, pointer: &str) -> BTreeSet<String> {
    issued
        .iter()
        .filter(|(_, p, _, _)| p == policy)
        .map(|(_, _, _, credentials)| credentials.pointer(pointer).and_then(Value::as_str).unwrap().to_string())
        .collect()
}

/// The KRL `replica` serves now, written to `path`.
async fn replica_krl(replica: &Replica, path: &std::path::Path) -> PathBuf {
    let response = replica.http.get(replica.endpoint("/v1/ssh/krl")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    std::fs::write(path, response.bytes().await.unwrap()).unwrap();
    path.to_path_buf()
}

/// `ssh-keygen -Q -f krl` over every certificate (written under `dir`): each one REVOKED.
fn assert_revoked_by_krl(krl: &std::path::Path, certs: &BTreeSet<String>, dir: &std::path::Path) {
    if certs.is_empty() {
        return;
    }
    std::fs::create_dir_all(dir).unwrap();
    let files: Vec<String> = certs
        .iter()
        .enumerate()
        .map(|(n, cert)| {
            let path = dir.join(format!("{n}-cert.pub"));
            std::fs::write(&path, format!("{cert}\n")).unwrap();
            path.display().to_string()
        })
        .collect();
    let mut args = vec!["-Q".to_string(), "-f".to_string(), krl.display().to_string()];
    args.extend(files.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ssh_keygen_output(&args);
    let text = String::from_utf8_lossy(&out.stdout);
    let not_revoked: Vec<&str> = text.lines().filter(|line| !line.ends_with("REVOKED")).collect();
    assert!(
        not_revoked.is_empty() && text.lines().count() == files.len(),
        "ssh-keygen -Q: {} of {} certificates not revoked: {not_revoked:?} {}",
        not_revoked.len(),
        files.len(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the storm needs of a replica, detached from it so the test can kill the replica
/// meanwhile.
struct ReplicaHandle {
    http: reqwest::Client,
    exchange: String,
    revoke: String,
}

impl ReplicaHandle {
    fn of(replica: &Replica) -> ReplicaHandle {
        ReplicaHandle {
            http: replica.http.clone(),
            exchange: replica.endpoint("/v1/exchange"),
            revoke: replica.endpoint("/v1/revoke"),
        }
    }
}

/// The storm: every job exchanges once, every other one revokes its lease at once, until the
/// tokens run out or the broker dies (a request that gets no answer ends its client).
async fn storm(
    handle: ReplicaHandle,
    tokens: Arc<Vec<(String, String)>>,
    seen: Arc<Mutex<Seen>>,
    ok: Arc<AtomicUsize>,
) {
    let next = Arc::new(AtomicUsize::new(0));
    let handle = Arc::new(handle);
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (tokens, seen, ok, next, handle) =
                (tokens.clone(), seen.clone(), ok.clone(), next.clone(), handle.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some((policy, token)) = tokens.get(i) else { return };
                    let sent = handle
                        .http
                        .post(&handle.exchange)
                        .bearer_auth(token)
                        .json(&json!({"policy": policy}))
                        .send()
                        .await;
                    let Ok(response) = sent else { return };
                    let status = response.status().as_u16();
                    let Ok(body) = response.json::<Value>().await else { return };
                    assert_eq!(status, 201, "job {i}: exchange: {body}");
                    let lease = body["lease_id"].as_str().unwrap().to_string();
                    let credentials = match policy.as_str() {
                        "gh" | "ssh" => body["credentials"].clone(),
                        _ => Value::Null,
                    };
                    seen.lock().unwrap().issued.push((i, policy.clone(), lease.clone(), credentials));
                    ok.fetch_add(1, Ordering::SeqCst);
                    if i % 2 == 1 {
                        let sent = handle
                            .http
                            .post(&handle.revoke)
                            .bearer_auth(token)
                            .json(&json!({"lease_id": lease}))
                            .send()
                            .await;
                        let Ok(response) = sent else { return };
                        let Ok(body) = response.json::<Value>().await else { return };
                        if body["revoked"].as_array().is_some_and(|l| l.iter().any(|id| id == lease.as_str())) {
                            seen.lock().unwrap().revoked.insert(lease);
                        }
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_a_lease_storm_on_the_file_store_loses_nothing_and_every_lease_ends_revoked() {
    chaos("file").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_a_lease_storm_on_postgres_loses_nothing_and_every_lease_ends_revoked() {
    chaos("postgres").await;
}
