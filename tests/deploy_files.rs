//! The files in `deploy/` (docs/deploy.md) are read by what reads them for real wherever that is
//! possible here: the shared broker config by the broker's own config loader, the policies it
//! mounts by the broker's own policy loader. The compose file, the load balancer's config and the
//! Containerfile cannot be run here (no container engine), so they are parsed and held to what
//! the deployment relies on: three replicas told apart by host name, each on a healthy database
//! and given every secret the config names, no secret inline, every mounted file present.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ephemera::config::{BackendConfig, Config, StoreConfig};
use ephemera::policy::{LoadContext, PolicySet};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Where the image's ENTRYPOINT reads the config.
const CONFIG_IN_CONTAINER: &str = "/etc/ephemera/ephemera.toml";
const SECRETS_DIR: &str = "/run/secrets/";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn config() -> Config {
    let path = deploy_dir().join("ephemera.toml");
    let (config, _) = Config::load(Some(&path)).unwrap_or_else(|errs| panic!("{}", errs.join("\n")));
    config
}

fn compose() -> Value {
    serde_saphyr::from_str(&read(&deploy_dir().join("compose.yaml"))).unwrap_or_else(|e| panic!("compose.yaml: {e}"))
}

fn services(compose: &Value) -> Vec<(&str, &Value)> {
    let services = compose["services"].as_object().expect("compose.yaml has services");
    services.iter().map(|(name, service)| (name.as_str(), service)).collect()
}

/// The services that run the broker image (built from deploy/Containerfile).
fn brokers(compose: &Value) -> Vec<(&str, &Value)> {
    services(compose)
        .into_iter()
        .filter(|(_, s)| s["build"]["dockerfile"].as_str() == Some("deploy/Containerfile"))
        .collect()
}

/// `source:target[:mode]` (short syntax) or `{source, target}` (long syntax).
fn volumes(service: &Value) -> Vec<(String, String)> {
    let list = service["volumes"].as_array().map(Vec::as_slice).unwrap_or_default();
    list.iter()
        .map(|v| match v {
            Value::String(short) => {
                let mut parts = short.splitn(3, ':');
                let source = parts.next().unwrap_or_default().to_string();
                let target = parts.next().unwrap_or_else(|| panic!("volume `{short}` has no target"));
                (source, target.to_string())
            }
            long => (
                long["source"].as_str().unwrap_or_default().to_string(),
                long["target"].as_str().expect("a long-syntax volume has a target").to_string(),
            ),
        })
        .collect()
}

/// Where a service's secrets appear in its container: `/run/secrets/<name>` unless a target says.
fn secret_paths(service: &Value) -> BTreeSet<String> {
    let list = service["secrets"].as_array().map(Vec::as_slice).unwrap_or_default();
    list.iter()
        .map(|s| match s {
            Value::String(name) => format!("{SECRETS_DIR}{name}"),
            long => match long["target"].as_str() {
                Some(t) if t.starts_with('/') => t.to_string(),
                Some(t) => format!("{SECRETS_DIR}{t}"),
                None => format!("{SECRETS_DIR}{}", long["source"].as_str().expect("a secret has a source")),
            },
        })
        .collect()
}

/// `KEY: value` (map) or `KEY=value` (list).
fn environment(service: &Value) -> Vec<(String, String)> {
    match &service["environment"] {
        Value::Object(map) => {
            map.iter().map(|(k, v)| (k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_string))).collect()
        }
        Value::Array(list) => list
            .iter()
            .filter_map(Value::as_str)
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k.to_string(), v.to_string())
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Every file the config names under /run/secrets, to be mounted into every replica.
fn secret_files_of(config: &Config) -> BTreeSet<PathBuf> {
    let mut files = BTreeSet::new();
    if let StoreConfig::Postgres(pg) = &config.ledger.store {
        files.extend(pg.password_file.clone());
        files.extend(pg.ca_file.clone());
    }
    for backend in config.backends.values() {
        if let BackendConfig::Jwt(jwt) = backend {
            files.insert(jwt.signing_key_file.clone());
            files.extend(jwt.previous_signing_key_files.iter().cloned());
        }
    }
    files.extend(config.hooks.github.iter().chain(&config.hooks.gitlab).map(|h| h.secret_file.clone()));
    files
}

#[test]
fn the_shared_config_loads_with_the_brokers_own_loader_as_a_postgres_replica() {
    let config = config();
    let StoreConfig::Postgres(pg) = &config.ledger.store else { panic!("deploy/ephemera.toml: store is not postgres") };
    assert_eq!(pg.password_file.as_deref(), Some(Path::new("/run/secrets/pg-password")));
    let text = read(&deploy_dir().join("ephemera.toml"));
    if !pg.tls {
        // The demo runs without TLS on a private network; the file must say what production uses.
        assert!(text.contains("sslmode=verify-full") && text.contains("ca_file"), "no word of verify-full + ca_file");
    }
    // One key set for all replicas: named, mounted, never generated per replica.
    let jwt: Vec<_> = config
        .backends
        .values()
        .filter_map(|b| match b {
            BackendConfig::Jwt(j) => Some(j),
            _ => None,
        })
        .collect();
    assert!(!jwt.is_empty(), "no jwt backend");
    for j in jwt {
        assert!(!j.generate_missing, "a replica would generate its own key");
        assert!(j.signing_key_file.starts_with(SECRETS_DIR), "{}: not a mounted secret", j.signing_key_file.display());
    }
    // Every replica shares this file, so it must not pin a replica id: each takes its host name.
    let raw: toml::Table = toml::from_str(&text).unwrap();
    assert!(!raw.contains_key("replica_id"), "replica_id is set in the shared config");
    assert!(config.hooks.github.is_some() && config.hooks.gitlab.is_some());
    assert!(config.admin_token_sha256.is_some() && config.audit.is_some());
    assert_eq!(config.policies_dir, Path::new("/etc/ephemera/policies"), "policies must be an in-container path");
    assert_eq!(config.listen.port(), 8080);
}

#[test]
fn compose_runs_three_brokers_told_apart_by_host_name_on_a_healthy_postgres() {
    let compose = compose();
    let config = config();
    let StoreConfig::Postgres(pg) = &config.ledger.store else { panic!("not postgres") };
    let brokers = brokers(&compose);
    assert_eq!(brokers.len(), 3, "{:?}", brokers.iter().map(|(n, _)| n).collect::<Vec<_>>());
    let mut hostnames = BTreeSet::new();
    for (name, service) in &brokers {
        let host = service["hostname"].as_str().unwrap_or_else(|| panic!("{name}: no hostname (its replica_id)"));
        assert!(
            (1..=64).contains(&host.len())
                && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')),
            "{name}: hostname `{host}` is not a valid replica_id"
        );
        assert!(hostnames.insert(host), "{name}: hostname `{host}` is not unique");
        assert_eq!(
            service["depends_on"][&pg.host]["condition"].as_str(),
            Some("service_healthy"),
            "{name} must wait for a healthy `{}`",
            pg.host
        );
    }
    // The config's database host is the compose service, and it has a real readiness check.
    let postgres = &compose["services"][&pg.host];
    assert!(postgres["image"].as_str().is_some_and(|i| i.starts_with("postgres:")), "no postgres service");
    let check = postgres["healthcheck"]["test"].to_string();
    assert!(check.contains("pg_isready"), "postgres healthcheck: {check}");
}

#[test]
fn every_secret_the_config_names_is_mounted_into_every_broker_and_none_is_inline() {
    let compose = compose();
    let config = config();
    let wanted = secret_files_of(&config);
    assert!(wanted.len() >= 4, "{wanted:?}");
    for path in &wanted {
        assert!(path.starts_with(SECRETS_DIR), "{}: secrets are mounted under {SECRETS_DIR}", path.display());
    }
    for (name, service) in brokers(&compose) {
        let mounted = secret_paths(service);
        for path in &wanted {
            assert!(mounted.contains(path.to_str().unwrap()), "{name}: {} is not mounted", path.display());
        }
    }
    for (name, service) in services(&compose) {
        for (key, value) in environment(service) {
            let upper = key.to_ascii_uppercase();
            if ["PASSWORD", "SECRET", "TOKEN", "KEY"].iter().any(|w| upper.contains(w)) {
                assert!(
                    upper.ends_with("_FILE") && value.starts_with(SECRETS_DIR),
                    "{name}: {key} holds a secret inline; point a *_FILE variable at {SECRETS_DIR} instead"
                );
            }
        }
    }
    // Each secret is a local file: generated per docs/deploy.md, kept out of Git.
    let docs = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/deploy.md"));
    let ignored = read(&deploy_dir().join(".gitignore"));
    assert!(ignored.lines().any(|l| l.trim() == "secrets/"), "deploy/.gitignore must ignore secrets/");
    let secrets = compose["secrets"].as_object().expect("top-level secrets");
    for (name, secret) in secrets {
        let file = secret["file"].as_str().unwrap_or_else(|| panic!("secret {name}: not from a file"));
        let file = file.trim_start_matches("./");
        assert!(file.starts_with("secrets/"), "secret {name}: {file} is outside deploy/secrets/");
        assert!(docs.contains(file), "docs/deploy.md does not say how to create {file}");
    }
}

#[test]
fn every_file_compose_mounts_or_builds_from_exists() {
    let compose = compose();
    let dir = deploy_dir();
    let named: BTreeSet<&str> =
        compose["volumes"].as_object().map(|v| v.keys().map(String::as_str).collect()).unwrap_or_default();
    for (name, service) in services(&compose) {
        for (source, target) in volumes(service) {
            assert!(!source.starts_with('/'), "{name}: {source} is an absolute host path, not one in deploy/");
            if source.starts_with('.') {
                assert!(dir.join(&source).exists(), "{name}: {source} (for {target}) does not exist in deploy/");
            } else {
                assert!(named.contains(source.as_str()), "{name}: volume {source} is not declared");
            }
        }
        if let Some(context) = service["build"]["context"].as_str() {
            let dockerfile = service["build"]["dockerfile"].as_str().unwrap_or("Dockerfile");
            assert!(dir.join(context).join(dockerfile).is_file(), "{name}: no {context}/{dockerfile}");
        }
    }
    // Each broker gets the shared config where the image reads it, and the policies where the
    // config says they are.
    let config = config();
    for (name, service) in brokers(&compose) {
        let mounts = volumes(service);
        let at = |target: &Path| mounts.iter().find(|(_, t)| Path::new(t) == target).map(|(s, _)| s.clone());
        assert_eq!(at(Path::new(CONFIG_IN_CONTAINER)).as_deref(), Some("./ephemera.toml"), "{name}: config mount");
        assert!(at(&config.policies_dir).is_some(), "{name}: nothing mounted at {}", config.policies_dir.display());
    }
}

#[test]
fn the_policies_compose_mounts_load_against_the_shared_config() {
    let compose = compose();
    let config = config();
    let (_, broker) = brokers(&compose)[0];
    let (source, _) = volumes(broker)
        .into_iter()
        .find(|(_, target)| Path::new(target) == config.policies_dir)
        .expect("a policies mount");
    let dir = deploy_dir().join(source);
    let set = PolicySet::load(Some(&dir), &[], &LoadContext::from_config(&config))
        .unwrap_or_else(|errs| panic!("{}: the server would refuse to start: {errs:#?}", dir.display()));
    assert!(!set.names().is_empty(), "{}: no policies", dir.display());
}

#[test]
fn the_load_balancer_checks_readiness_on_every_broker() {
    let compose = compose();
    let port = config().listen.port();
    let haproxy = read(&deploy_dir().join("haproxy.cfg"));
    assert!(haproxy.contains("uri /readyz") && haproxy.contains("expect status 200"), "no /readyz check");
    for (name, service) in brokers(&compose) {
        let host = service["hostname"].as_str().unwrap();
        let server = haproxy.lines().map(str::trim).find(|l| l.starts_with(&format!("server {host} ")));
        let server = server.unwrap_or_else(|| panic!("haproxy.cfg: no server line for {name}"));
        assert!(server.contains(&format!("{name}:{port}")), "haproxy.cfg: {server}");
    }
}

/// The instructions, `\` continuations joined, comments dropped.
fn instructions(containerfile: &str) -> Vec<String> {
    let joined = containerfile.replace("\\\n", " ");
    joined.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string).collect()
}

/// The instructions of the final stage (the image that runs).
fn final_stage(containerfile: &str) -> Vec<String> {
    let all = instructions(containerfile);
    let last_from = all.iter().rposition(|l| l.to_ascii_uppercase().starts_with("FROM ")).expect("a FROM");
    all[last_from..].to_vec()
}

#[test]
fn the_brokers_believe_x_forwarded_for_from_the_load_balancer_alone() {
    // Behind an unlisted load balancer every client is one address: one client's bad tokens
    // would cool off everyone. Listed, only its header counts, and it appends the real peer.
    let compose = compose();
    let lb = &compose["services"]["loadbalancer"];
    let address = lb["networks"]["front"]["ipv4_address"].as_str().expect("the load balancer has a fixed address");
    let ip: std::net::IpAddr = address.parse().unwrap();
    let trusted = config().limits.trusted_proxies;
    assert!(trusted.iter().any(|n| n.contains(ip)), "[limits] trusted_proxies does not name {address}");
    assert!(
        !trusted.iter().any(|n| n.contains("172.30.80.11".parse().unwrap())),
        "more than the load balancer is trusted"
    );
    let haproxy = read(&deploy_dir().join("haproxy.cfg"));
    assert!(haproxy.lines().any(|l| l.trim() == "option forwardfor"), "haproxy.cfg does not send X-Forwarded-For");
}

#[test]
fn the_image_runs_as_an_unprivileged_user_and_builds_exactly_the_locked_dependencies() {
    let text = read(&deploy_dir().join("Containerfile"));
    let runtime = final_stage(&text);
    let user = runtime
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the runtime stage sets USER")
        .trim()
        .to_string();
    let uid = user.split(':').next().unwrap_or_default();
    assert!(!["", "root", "0"].contains(&uid), "USER {user} is root");
    let all = instructions(&text);
    let build = all.iter().find(|l| l.starts_with("RUN ") && l.contains("cargo build")).expect("a cargo build");
    assert!(build.contains("--release") && build.contains("--locked"), "{build}");
    let entrypoint = runtime.iter().find(|l| l.starts_with("ENTRYPOINT")).expect("an ENTRYPOINT");
    assert!(entrypoint.contains("\"serve\"") && entrypoint.contains(CONFIG_IN_CONTAINER), "{entrypoint}");
    let expose = format!("EXPOSE {}", config().listen.port());
    assert!(runtime.contains(&expose), "the runtime stage lacks `{expose}` (the config's listen port)");
}
