//! Rows 8 (issue 16): exchanging for a GitHub App installation token beside exchanging for a
//! broker JWT, against the same broker in the same run, rounds alternating so a noisy moment hits
//! both alike.
//!
//! GitHub is the FAKE of tests/common/fake_github.rs on loopback (no GitHub is reachable here),
//! run on its own thread so its CPU is never the broker's: the broker's CPU per exchange counts
//! what it does for a token (the installation from its cache, the App JWT reused, one HTTP call
//! out, the reply checked, the token sealed into the revoke handle), not what GitHub does.
//! The App JWT is signed once and reused (an RSA-2048 signature costs about as much as the
//! whole JWT exchange): row 8b counts the App JWTs the fake saw.

use crate::broker::{Broker, POLICY_YAML, Setup};
use crate::exchange::{Plan, SAT_ROUNDS, Tokens, over_rounds, requests, requests_for, saturation_round_of};
use crate::fake_github::{APP_ID, FakeGithub, FakeInstallation, app_key_path};
use crate::load::closed_loop;
use crate::table::Row;
use std::path::Path;
use std::sync::Arc;

const GITHUB_POLICY: &str = "bench-github";

pub async fn run(binary: &Path, plan: &Plan, dir: &Path) -> Vec<Row> {
    ephemera::install_crypto();
    let github = start_fake_github();
    // A real App may create a few thousand tokens an hour (GitHub's limit, not the broker's);
    // the fake's budget is lifted so the broker's own cost is what saturates.
    github.set_rate_limit(i64::MAX / 2, ephemera::clock::Clock::now(&ephemera::clock::SystemClock) + 3600);
    let mut tokens = Tokens::new();
    let per_round = plan.saturation / SAT_ROUNDS;
    let warmup = requests(&tokens.take(plan.warmup).1);
    let warmup_github = requests_for(&tokens.take(plan.warmup).1, GITHUB_POLICY);
    let jwt_rounds: Vec<_> = (0..SAT_ROUNDS).map(|_| requests(&tokens.take(per_round).1)).collect();
    let github_rounds: Vec<_> =
        (0..SAT_ROUNDS).map(|_| requests_for(&tokens.take(per_round).1, GITHUB_POLICY)).collect();

    let grant = "grants:\n  gh:\n    backend: gh\n    owner: octo-org\n    repositories: [\"${repository}\"]\n    \
                 permissions: {contents: write, pull_requests: write}\n";
    let policy = format!("{}{grant}", POLICY_YAML.split("grants:").next().unwrap());
    let backend = format!(
        "[backends.gh]\ntype = \"github-app\"\napp_id = {APP_ID}\nprivate_key_file = \"{}\"\napi_url = \"{}\"\n",
        app_key_path().display(),
        github.url
    );
    let policies = [(GITHUB_POLICY, policy)];
    let setup = Setup { extra: &backend, policies: &policies, ..Setup::default() };
    let broker = Broker::start_with(binary, &dir.join("github"), &setup).await;
    let addr = broker.addr;
    closed_loop(addr, warmup, plan.saturation_conns, 201).await.check("warm-up");
    closed_loop(addr, warmup_github, plan.saturation_conns, 201).await.check("warm-up (github)");

    let pids = [broker.pid.to_string()];
    let (mut jwt, mut gh) = (Vec::new(), Vec::new());
    for (jwt_requests, github_requests) in jwt_rounds.into_iter().zip(github_rounds) {
        jwt.push(
            saturation_round_of("exchange (jwt)", &[addr], &pids, &[], jwt_requests, plan.saturation_conns, 201).await,
        );
        gh.push(
            saturation_round_of("exchange (github)", &[addr], &pids, &[], github_requests, plan.saturation_conns, 201)
                .await,
        );
    }
    drop(broker);
    let minted: usize = github.token_requests().iter().filter(|r| r.token.is_some()).count();
    let app_jwts = github.app_jwts_seen();

    let (jwt_cpu, ..) = over_rounds(&jwt, |r| r.cpu_us);
    let (gh_cpu, gh_lo, gh_hi) = over_rounds(&gh, |r| r.cpu_us);
    let (jwt_rate, ..) = over_rounds(&jwt, |r| r.rate);
    let (gh_rate, gh_rate_lo, gh_rate_hi) = over_rounds(&gh, |r| r.rate);
    let sign_us = app_jwt_signature_us();
    vec![
        Row::new(
            "8a",
            "**broker CPU per GitHub-token exchange at saturation ÷ per JWT exchange** (/proc; GitHub: the fake on loopback, its CPU not counted)",
            format!("{gh_cpu:.0} µs (median of {SAT_ROUNDS} rounds: {gh_lo:.0}–{gh_hi:.0}; {per_round} each)"),
            format!("{jwt_cpu:.0} µs per JWT exchange, rounds in turn on the same broker"),
        )
        .ratio(gh_cpu / jwt_cpu),
        Row::new(
            "8b",
            "GitHub-token exchanges/s at saturation; App JWTs signed for them",
            format!(
                "{gh_rate:.0}/s (median: {gh_rate_lo:.0}–{gh_rate_hi:.0}); {app_jwts} App JWT(s) for {minted} tokens"
            ),
            format!("{jwt_rate:.0}/s, JWT exchanges"),
        )
        .ratio(gh_rate / jwt_rate)
        .goal("one App JWT per 8 minutes, not per token", app_jwts as u64 <= 1 + minted as u64 / 100_000),
        Row::new(
            "8c",
            "what signing an App JWT per token would add (RS256 with the App's 2048-bit key, in process, one core)",
            format!("{sign_us:.0} µs per signature"),
            format!("{gh_cpu:.0} µs, the whole GitHub-token exchange (8a)"),
        )
        .ratio(sign_us / gh_cpu),
    ]
}

/// CPU µs of one RS256 signature with the App's key (the median of 5 batches).
fn app_jwt_signature_us() -> f64 {
    use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
    let pem = std::fs::read(app_key_path()).unwrap();
    let key = RsaKeyPair::from_der(&ephemera::mint::keys::pem_to_der(&pem).unwrap()).unwrap();
    let rng = ring::rand::SystemRandom::new();
    let mut signature = vec![0u8; key.public().modulus_len()];
    let message = [b'x'; 160]; // header.claims of an App JWT
    let mut batches: Vec<f64> = (0..5)
        .map(|_| {
            let started = crate::procfs::thread_cpu_seconds();
            for _ in 0..50 {
                key.sign(&RSA_PKCS1_SHA256, &rng, &message, &mut signature).unwrap();
            }
            (crate::procfs::thread_cpu_seconds() - started) / 50.0 * 1e6
        })
        .collect();
    batches.sort_by(f64::total_cmp);
    batches[2]
}

/// The fake GitHub on a thread of its own, with the real clock; it lives until the process ends.
fn start_fake_github() -> Arc<FakeGithub> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let now = Arc::new(|| ephemera::clock::Clock::now(&ephemera::clock::SystemClock));
            let installation = FakeInstallation::org(
                7,
                "octo-org",
                &["octo-repo"],
                &[("contents", "write"), ("pull_requests", "write"), ("metadata", "read")],
            );
            tx.send(Arc::new(FakeGithub::start(now, vec![installation]).await)).unwrap();
            std::future::pending::<()>().await;
        });
    });
    rx.recv().unwrap()
}
