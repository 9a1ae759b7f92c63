//! Issue 17: OpenSSH user certificates (`type = "ssh"`), end to end through the broker's HTTP API
//! and judged by the real OpenSSH tools: `ssh-keygen -L` reads back every field the grant asked
//! for, `ssh-keygen -Q` checks the broker's KRL, and a real `sshd` lets the certificate in, then
//! refuses it once the lease is revoked and the KRL fetched again (tests/common/sshd.rs). The CA
//! keys are made as an operator makes them (`ssh-keygen -t ed25519 -f ca`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::replicas::{Cluster, ReplicaExtra, pg_server_url, unix_now};
use common::sshd::{Sshd, ssh_keygen, ssh_keygen_output, write_private};
use common::*;
use ephemera::clock::Clock;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The push fixture (`octo-org/octo-repo`, id 74, main) gets a certificate for `deploy` and
/// `ci-octo-org`, that may only run one command, from loopback.
const POLICY: &str = r#"
issuer: ci
match: {repository_id: "74", ref: refs/heads/main, runner_environment: github-hosted}
deny: {event_name: [pull_request_target, workflow_run]}
ttl: {default: 10m, max: 1h}
grants:
  shell:
    backend: BACKEND
    principals: [deploy, "ci-${repository_owner}"]
    critical_options: {force-command: "echo forced by ephemera", source-address: "127.0.0.1/32,::1"}
    extensions: [permit-pty]
"#;
const FIXTURE: &str = "github-push-immutable-sub.json";
const JOB: &str = "github:74:32291736541:1:96193868771";

struct Setup {
    issuer: FakeIssuer,
    broker: Broker,
    /// The CA keys (`ca-NAME`) and whatever a test writes (keys, certificates, KRLs).
    dir: tempfile::TempDir,
}

/// One `ssh` backend per (name, `ssh-keygen -t` type, revocation), each with its CA key made by
/// `ssh-keygen`, and a policy of the same name granting [`POLICY`] from it.
async fn setup(backends: &[(&str, &str, &str)]) -> Setup {
    let issuer = FakeIssuer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut toml = String::new();
    let mut policies = Vec::new();
    for (name, kind, revocation) in backends {
        let ca = dir.path().join(format!("ca-{name}"));
        ssh_keygen(&["-q", "-t", kind, "-N", "", "-C", "ci-ca", "-f", &ca.display().to_string()]);
        toml.push_str(&format!(
            "[backends.{name}]\ntype = \"ssh\"\nca_key_file = {:?}\nrevocation = \"{revocation}\"\nmax_ttl = \"1h\"\n",
            ca.display().to_string()
        ));
        policies.push((name.to_string(), POLICY.replace("BACKEND", name)));
    }
    let policies: Vec<(&str, &str)> = policies.iter().map(|(n, p)| (n.as_str(), p.as_str())).collect();
    let extra = Extra { backend_toml: toml, ..Extra::default() };
    let broker = Broker::start_custom(&[("ci", "github-actions", &issuer)], &policies, &extra).await;
    Setup { issuer, broker, dir }
}

impl Setup {
    fn token(&self) -> String {
        self.issuer.sign(&self.issuer.claims(FIXTURE, self.broker.clock.now()))
    }

    /// An exchange under `policy`, with the job's own public key line when given; asserts 201
    /// and returns (lease id, the `shell` credential).
    async fn exchange(&self, policy: &str, public_key: Option<&str>) -> (String, Value) {
        let mut body = json!({"policy": policy});
        if let Some(key) = public_key {
            body["ssh_public_key"] = json!(key);
        }
        let (status, reply) = self.broker.exchange_raw(&self.token(), &body.to_string()).await;
        assert_eq!(status, 201, "{reply}");
        (reply["lease_id"].as_str().unwrap().to_string(), reply["credentials"]["shell"].clone())
    }

    async fn revoke(&self, lease: &str) {
        let (status, reply) = self.broker.revoke(&self.token(), json!({"lease_id": lease})).await;
        assert_eq!((status, reply["revoked"].clone()), (200, json!([lease])), "{reply}");
    }

    /// `GET path` without credentials: (status, body bytes).
    async fn get_bytes(&self, path: &str) -> (u16, Vec<u8>) {
        let resp = self.broker.http.get(format!("{}{path}", self.broker.url)).send().await.unwrap();
        (resp.status().as_u16(), resp.bytes().await.unwrap().to_vec())
    }

    /// The KRL as the broker serves it now, written to a fresh file.
    async fn krl_file(&self, name: &str) -> PathBuf {
        let (status, krl) = self.get_bytes("/v1/ssh/krl").await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&krl));
        let path = self.path(name);
        std::fs::write(&path, krl).unwrap();
        path
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A key pair made by the job with `ssh-keygen`; returns (private key path, public key line).
    fn job_key(&self, name: &str, kind: &str) -> (PathBuf, String) {
        let path = self.path(name);
        ssh_keygen(&["-q", "-t", kind, "-N", "", "-C", "job", "-f", &path.display().to_string()]);
        let line = std::fs::read_to_string(path.with_extension("pub")).unwrap();
        (path, line)
    }

    /// The credential's certificate in `NAME-cert.pub`, and a generated private key (if any) in
    /// `NAME` (mode 0600).
    fn write_credential(&self, name: &str, cred: &Value) -> (PathBuf, PathBuf) {
        let key = self.path(name);
        if let Some(private) = cred["private_key"].as_str() {
            write_private(&key, private);
        }
        let cert = self.path(&format!("{name}-cert.pub"));
        std::fs::write(&cert, format!("{}\n", cred["certificate"].as_str().unwrap())).unwrap();
        (key, cert)
    }
}

/// `ssh-keygen -L -f cert`: each `Name: value` line, and the indented lines of the list fields
/// (Principals, Critical Options, Extensions) under their name.
fn keygen_listing(cert: &Path) -> BTreeMap<String, Vec<String>> {
    let text = ssh_keygen(&["-L", "-f", &cert.display().to_string()]);
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current = String::new();
    for line in text.lines().skip(1) {
        let indent = line.len() - line.trim_start().len();
        let line = line.trim();
        if indent <= 8 {
            let (name, value) = line.split_once(':').unwrap();
            current = name.to_string();
            let value = value.trim();
            out.insert(current.clone(), if value.is_empty() { vec![] } else { vec![value.to_string()] });
        } else {
            out.get_mut(&current).unwrap().push(line.to_string());
        }
    }
    out
}

/// `SHA256:…` of a public key file, as `ssh-keygen -l` prints it.
fn fingerprint_of(public_key: &Path) -> String {
    ssh_keygen(&["-l", "-f", &public_key.display().to_string()]).split_whitespace().nth(1).unwrap().to_string()
}

/// Does the KRL at `krl` revoke the certificate at `cert`? (`ssh-keygen -Q`: exit 1 and
/// `REVOKED` when it does, 0 and `ok` when not.)
fn revoked_by(krl: &Path, cert: &Path) -> bool {
    let out = ssh_keygen_output(&["-Q", "-f", &krl.display().to_string(), &cert.display().to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    match out.status.code() {
        Some(1) if text.contains("REVOKED") => true,
        Some(0) if text.trim_end().ends_with(": ok") => false,
        _ => panic!("ssh-keygen -Q: {:?} {text} {}", out.status, String::from_utf8_lossy(&out.stderr)),
    }
}

/// `2026-12-06T10:43:58Z` → `2026-12-06T10:43:58`, as `ssh-keygen -L` prints times in UTC.
fn keygen_time(rfc3339: &Value) -> String {
    rfc3339.as_str().unwrap().trim_end_matches('Z').to_string()
}

#[tokio::test]
async fn ssh_keygen_reads_back_every_field_the_grant_asked_for() {
    let s = setup(&[("ed", "ed25519", "krl"), ("ec", "ecdsa", "expiry")]).await;
    for (policy, ca_type, key_type) in
        [("ed", "ED25519", "ed25519"), ("ec", "ECDSA", "ecdsa"), ("ed", "ED25519", "ecdsa")]
    {
        let scenario = format!("CA {ca_type}, job key {key_type}");
        let (job_key, line) = s.job_key(&format!("job-{policy}-{key_type}"), key_type);
        let (lease, cred) = s.exchange(policy, Some(&line)).await;
        assert!(cred.get("private_key").is_none(), "{scenario}: the job's own key needs no private key back");
        let (_, cert) = s.write_credential(&format!("job-{policy}-{key_type}"), &cred);
        let listing = keygen_listing(&cert);
        let one = |field: &str| listing[field].join("\n");
        let cert_type = if key_type == "ed25519" { "ssh-ed25519" } else { "ecdsa-sha2-nistp256" };
        assert_eq!(one("Type"), format!("{cert_type}-cert-v01@openssh.com user certificate"), "{scenario}");
        let key_id = format!("ephemera {lease} {JOB}");
        assert_eq!(one("Key ID"), format!("\"{key_id}\""), "{scenario}");
        assert_eq!(cred["key_id"], key_id.as_str());
        assert_eq!(one("Serial"), cred["serial"].as_str().unwrap(), "{scenario}");
        assert_ne!(one("Serial"), "0");
        let valid = format!("from {} to {}", keygen_time(&cred["valid_after"]), keygen_time(&cred["valid_before"]));
        assert_eq!(one("Valid"), valid, "{scenario}");
        assert_eq!(cred["valid_before"], cred["expires_at"]);
        let after = humantime::parse_rfc3339(cred["valid_after"].as_str().unwrap()).unwrap();
        let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(s.broker.clock.now() as u64);
        assert_eq!(now.duration_since(after).unwrap().as_secs(), 60, "{scenario}: a minute back for clock skew");
        assert_eq!(listing["Principals"], ["deploy", "ci-octo-org"], "{scenario}");
        assert_eq!(cred["principals"], json!(["deploy", "ci-octo-org"]));
        assert_eq!(
            listing["Critical Options"],
            ["force-command echo forced by ephemera", "source-address 127.0.0.1/32,::1"],
            "{scenario}"
        );
        assert_eq!(listing["Extensions"], ["permit-pty"], "{scenario}: none of the permit-* the grant left out");
        let ca_pub = s.path(&format!("ca-{policy}.pub"));
        assert_eq!(
            one("Signing CA"),
            format!("{ca_type} {} (using {})", fingerprint_of(&ca_pub), ca_algorithm(ca_type))
        );
        let job_fp = fingerprint_of(&job_key.with_extension("pub"));
        assert_eq!(
            one("Public key"),
            format!("{}-CERT {job_fp}", if key_type == "ed25519" { "ED25519" } else { "ECDSA" })
        );
        assert_eq!(cred["public_key"].as_str().unwrap(), line.rsplit_once(' ').unwrap().0, "{scenario}");
        let revocation = if policy == "ed" { "immediate" } else { "expiry" };
        assert_eq!((cred["kind"].as_str(), cred["revocation"].as_str()), (Some("ssh"), Some(revocation)));
    }
}

fn ca_algorithm(ca_type: &str) -> &'static str {
    if ca_type == "ED25519" { "ssh-ed25519" } else { "ecdsa-sha2-nistp256" }
}

#[tokio::test]
async fn a_generated_key_logs_in_to_a_real_sshd_and_its_revoked_lease_is_refused_once_the_krl_is_refetched() {
    let s = setup(&[("ssh", "ed25519", "krl")]).await;
    // sshd checks the certificate's validity with the real clock.
    s.broker.clock.set(unix_now());
    let (lease, cred) = s.exchange("ssh", None).await;
    assert_eq!(cred["revocation"], "immediate");
    let (key, cert) = s.write_credential("generated", &cred);
    let private = cred["private_key"].as_str().unwrap();
    assert!(private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\n"));
    // The real tool reads the private key the broker wrote, and derives the certified key.
    let derived = ssh_keygen(&["-y", "-f", &key.display().to_string()]);
    let comment = cred["key_id"].as_str().unwrap();
    assert_eq!(derived.trim(), format!("{} {comment}", cred["public_key"].as_str().unwrap()));

    let (status, ca_pub) = s.get_bytes("/v1/ssh/ca.pub").await;
    assert_eq!(status, 200);
    let krl_before = s.krl_file("before.krl").await;
    assert!(!revoked_by(&krl_before, &cert));
    let sshd = Sshd::start(std::str::from_utf8(&ca_pub).unwrap(), &std::fs::read(&krl_before).unwrap(), &["deploy"]);

    let out = sshd.login(&key, "true");
    assert!(out.status.success(), "login refused: {}\nsshd log:\n{}", String::from_utf8_lossy(&out.stderr), sshd.log());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "forced by ephemera\n", "force-command ran instead of `true`");
    let serial = cred["serial"].as_str().unwrap();
    assert!(sshd.log().contains(&format!("ID ephemera {lease} {JOB} (serial {serial})")), "{}", sshd.log());

    s.revoke(&lease).await;
    // Honest about what `immediate` means here: until the server fetches the KRL again, the
    // certificate still works.
    assert!(sshd.login(&key, "true").status.success(), "the server still has the old KRL");
    let krl_after = s.krl_file("after.krl").await;
    assert!(revoked_by(&krl_after, &cert), "ssh-keygen -Q finds the serial in the broker's KRL");
    sshd.write_krl(&std::fs::read(&krl_after).unwrap());
    let out = sshd.login(&key, "true");
    assert_eq!(out.status.code(), Some(255), "a revoked certificate got in: {}", String::from_utf8_lossy(&out.stdout));
    assert!(sshd.log().contains("revoked by file"), "{}", sshd.log());
    // Never the private key in the broker's log.
    let logs = captured_logs();
    for line in private.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!logs.contains(line), "a line of the generated private key reached the log");
    }
}

#[tokio::test]
async fn sshd_refuses_a_certificate_for_a_principal_it_does_not_list_and_takes_it_once_listed() {
    let s = setup(&[("ssh", "ed25519", "krl")]).await;
    s.broker.clock.set(unix_now());
    let (_, cred) = s.exchange("ssh", None).await;
    let (key, _) = s.write_credential("job", &cred);
    let (_, ca_pub) = s.get_bytes("/v1/ssh/ca.pub").await;
    let krl = std::fs::read(s.krl_file("krl").await).unwrap();
    let sshd = Sshd::start(std::str::from_utf8(&ca_pub).unwrap(), &krl, &["ops", "root"]);
    let out = sshd.login(&key, "true");
    assert_eq!(out.status.code(), Some(255), "granted deploy, ci-octo-org; root takes ops, root");
    assert!(sshd.log().contains("Certificate does not contain an authorized principal"), "{}", sshd.log());
    // sshd reads AuthorizedPrincipalsFile at every authentication: listing `deploy` lets it in.
    std::fs::write(sshd.dir.path().join("principals"), "ops\ndeploy\n").unwrap();
    let out = sshd.login(&key, "true");
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), sshd.log());
}

#[tokio::test]
async fn sshd_refuses_an_expired_certificate_and_takes_a_current_one() {
    let s = setup(&[("ssh", "ed25519", "krl")]).await;
    let now = unix_now();
    // Minted an hour ago with a 10-minute ttl: expired 50 minutes ago by sshd's clock.
    s.broker.clock.set(now - 3600);
    let (_, old) = s.exchange("ssh", None).await;
    assert_eq!(keygen_time(&old["valid_before"]), keygen_time(&json!(ephemera::clock::rfc3339(now - 3000))));
    s.broker.clock.set(now);
    let (_, current) = s.exchange("ssh", None).await;
    let (old_key, _) = s.write_credential("old", &old);
    let (key, _) = s.write_credential("current", &current);
    let (_, ca_pub) = s.get_bytes("/v1/ssh/ca.pub").await;
    let krl = std::fs::read(s.krl_file("krl").await).unwrap();
    let sshd = Sshd::start(std::str::from_utf8(&ca_pub).unwrap(), &krl, &["deploy"]);
    let out = sshd.login(&old_key, "true");
    assert_eq!(out.status.code(), Some(255), "an expired certificate got in");
    assert!(sshd.log().contains("expired"), "{}", sshd.log());
    assert!(sshd.login(&key, "true").status.success(), "{}", sshd.log());
}

#[tokio::test]
async fn a_revoked_lease_stays_in_the_krl_across_a_restart_until_its_certificate_expires() {
    let mut s = setup(&[("ssh", "ed25519", "krl")]).await;
    let (_, line) = s.job_key("job", "ed25519");
    let (ended, ended_cred) = s.exchange("ssh", Some(&line)).await;
    let (_, live_cred) = s.exchange("ssh", Some(&line)).await;
    let (_, ended_cert) = s.write_credential("ended", &ended_cred);
    let (_, live_cert) = s.write_credential("live", &live_cred);
    s.revoke(&ended).await;
    let krl = s.krl_file("1.krl").await;
    assert!(revoked_by(&krl, &ended_cert) && !revoked_by(&krl, &live_cert));

    s.broker = s.broker.restart(None).await;
    let krl = s.krl_file("2.krl").await;
    assert!(revoked_by(&krl, &ended_cert), "the restarted broker forgot a revoked certificate that is still valid");
    assert!(!revoked_by(&krl, &live_cert), "a lease still active is not revoked by a restart");

    // Past the certificate's end sshd refuses it anyway: it leaves the list.
    s.broker.clock.advance(10 * 60 + 1);
    let krl = s.krl_file("3.krl").await;
    assert!(!revoked_by(&krl, &ended_cert));
    let listing = ssh_keygen(&["-Q", "-l", "-f", &krl.display().to_string()]);
    assert!(!listing.contains("serial:"), "{listing}");
}

#[tokio::test]
async fn a_certificate_garbage_or_rsa_as_ssh_public_key_is_a_400_that_quotes_none_of_it() {
    let s = setup(&[("ssh", "ed25519", "krl")]).await;
    let (job_key, line) = s.job_key("job", "ed25519");
    let (_, cred) = s.exchange("ssh", Some(&line)).await;
    let leases_before = s.broker.running.app.store().counts().await.unwrap().total();
    let (_, rsa) = s.job_key("rsa", "rsa");
    let cases = [
        (cred["certificate"].as_str().unwrap().to_string(), "is a certificate"),
        (rsa.clone(), "is a ssh-rsa key"),
        (std::fs::read_to_string(&job_key).unwrap(), "public key line"),
        ("ssh-ed25519 AAAA!!!!".to_string(), "not base64"),
    ];
    for (sent, says) in cases {
        let body = json!({"policy": "ssh", "ssh_public_key": sent}).to_string();
        let reply = s.broker.exchange_raw(&s.token(), &body).await;
        assert_error(&reply, 400, "bad_request");
        let message = reply.1["error"]["message"].as_str().unwrap();
        assert!(message.starts_with("`ssh_public_key` ") && message.contains(says), "{message}");
        if let Some(middle) = sent.get(sent.len() / 2..sent.len() / 2 + 12) {
            assert!(!message.contains(middle), "the message quotes the key: {message}");
        }
    }
    let leases_after = s.broker.running.app.store().counts().await.unwrap().total();
    assert_eq!(leases_after, leases_before, "nothing was minted for a refused key");
}

#[tokio::test]
async fn the_ca_key_and_krl_endpoints_need_no_credentials_and_name_their_backend() {
    let s = setup(&[("ed", "ed25519", "krl"), ("ec", "ecdsa", "expiry")]).await;
    let (status, body) = s.get_bytes("/v1/ssh/ca.pub").await;
    assert_eq!(status, 400, "two ssh backends and none named: {}", String::from_utf8_lossy(&body));
    for name in ["ed", "ec"] {
        let (status, line) = s.get_bytes(&format!("/v1/ssh/ca.pub?backend={name}")).await;
        assert_eq!(status, 200);
        let line = String::from_utf8(line).unwrap();
        let operator = std::fs::read_to_string(s.path(&format!("ca-{name}.pub"))).unwrap();
        let key = |l: &str| l.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        assert_eq!(key(&line), key(&operator), "{name}: the public half of the key ssh-keygen made");
        assert!(line.ends_with(&format!(" ephemera-{name}\n")), "{line}");
    }
    for unknown in ["jwt", "nope"] {
        assert_eq!(s.get_bytes(&format!("/v1/ssh/ca.pub?backend={unknown}")).await.0, 404);
    }
    // One KRL, for the backends that revoke through it (here `ed`); the ecdsa one revokes by expiry.
    let krl = s.krl_file("krl").await;
    let listing = ssh_keygen(&["-Q", "-l", "-f", &krl.display().to_string()]);
    assert!(listing.starts_with("# KRL version"), "{listing}");

    let expiry_only = setup(&[("ec", "ecdsa", "expiry")]).await;
    assert_eq!(expiry_only.get_bytes("/v1/ssh/krl").await.0, 404, "no KRL to fetch: servers must fail loudly");
    assert_eq!(expiry_only.get_bytes("/v1/ssh/ca.pub").await.0, 200, "the only one needs no name");
    let (lease, cred) = expiry_only.exchange("ec", None).await;
    assert_eq!(cred["revocation"], "expiry");
    expiry_only.revoke(&lease).await;

    let none = setup(&[]).await;
    assert_eq!((none.get_bytes("/v1/ssh/ca.pub").await.0, none.get_bytes("/v1/ssh/krl").await.0), (404, 404));
}

#[tokio::test]
async fn a_missing_encrypted_or_rsa_ca_key_stops_the_start_naming_the_file_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    ssh_keygen(&["-q", "-t", "ed25519", "-N", "a passphrase", "-f", &path("encrypted")]);
    ssh_keygen(&["-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", &path("rsa")]);
    let cases = [
        ("missing", "No such file"),
        ("encrypted", "ssh-keygen -p -N ''"),
        ("rsa", "the CA key must be ssh-ed25519 or ecdsa-sha2-nistp256"),
        ("rsa.pub", "is not a PEM private key"),
    ];
    for (file, says) in cases {
        let toml = format!("listen = \"127.0.0.1:0\"\n[backends.ssh]\ntype = \"ssh\"\nca_key_file = \"{file}\"\n");
        let config = ephemera::config::Config::parse(&toml, dir.path()).unwrap();
        let clock = std::sync::Arc::new(ephemera::clock::ManualClock::new(NOW));
        let err = match ephemera::server::start(ephemera::server::Options::new(config, false, clock)).await {
            Ok(_) => panic!("started with {file}"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("backend ssh: ca_key_file") && err.contains(&path(file)) && err.contains(says), "{err}");
    }
}

/// Two real replicas on one PostgreSQL database: a lease revoked on one is in the other's KRL
/// by its next reaper pass (1 s here), because each replica learns the ledger's ended leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_revoked_on_one_replica_is_in_the_other_replicas_krl() {
    let policy = POLICY.replace("BACKEND", "ssh");
    let cluster = Cluster::new(&pg_server_url(), &[("ssh", policy.as_str())]).await;
    let ca = cluster.dir.path().join("ca");
    ssh_keygen(&["-q", "-t", "ed25519", "-N", "", "-C", "ci-ca", "-f", &ca.display().to_string()]);
    let backends_toml =
        format!("[backends.ssh]\ntype = \"ssh\"\nca_key_file = {:?}\nrevocation = \"krl\"\n", ca.display().to_string());
    let extra = ReplicaExtra { backends_toml, ..ReplicaExtra::default() };
    let (a, b) = (cluster.start("a", &extra).await, cluster.start("b", &extra).await);
    let token = cluster.token(FIXTURE);
    let (status, reply) = a.exchange(&token, "ssh").await;
    assert_eq!(status, 201, "{reply}");
    let lease = reply["lease_id"].as_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("job-cert.pub");
    std::fs::write(&cert, reply["credentials"]["shell"]["certificate"].as_str().unwrap()).unwrap();
    let krl_of = |replica: &common::replicas::Replica, name: &str| {
        let url = replica.endpoint("/v1/ssh/krl");
        let path = dir.path().join(name);
        let http = cluster.http.clone();
        async move {
            let resp = http.get(url).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            std::fs::write(&path, resp.bytes().await.unwrap()).unwrap();
            path
        }
    };
    assert!(!revoked_by(&krl_of(&b, "b0.krl").await, &cert));

    let (status, ended) = a.revoke(&cluster.token(FIXTURE), &json!({"lease_id": lease})).await;
    assert_eq!((status, &ended["revoked"]), (200, &json!([lease])), "{ended}");
    assert!(revoked_by(&krl_of(&a, "a1.krl").await, &cert), "the replica that revoked lists it at once");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if revoked_by(&krl_of(&b, "b1.krl").await, &cert) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "replica b never listed the revoked certificate:\n{}",
            b.stderr()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// `ephemera exchange --ssh-public-key FILE` (the real CLI) sends the job's own key: the
/// certificate certifies exactly that key, and no private key comes back.
#[tokio::test]
async fn the_cli_sends_the_jobs_own_public_key_and_the_certificate_certifies_it() {
    let s = setup(&[("ssh-ed", "ed25519", "expiry")]).await;
    let (key, _) = s.job_key("job", "ed25519");
    let public = key.with_extension("pub");
    let (url, public_arg) = (s.broker.url.clone(), public.display().to_string());
    let out =
        run_cli(&["exchange", "--broker", &url, "--policy", "ssh-ed", "--ssh-public-key", &public_arg], &s.token())
            .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    let cred = &reply["credentials"]["shell"];
    assert!(cred.get("private_key").is_none(), "the job keeps its own private key");
    let (_, cert) = s.write_credential("job", cred);
    let listing = keygen_listing(&cert);
    let certified = listing["Public key"][0].split_whitespace().nth(1).unwrap().to_string();
    assert_eq!(certified, fingerprint_of(&public), "the certificate is for the job's key");
}
