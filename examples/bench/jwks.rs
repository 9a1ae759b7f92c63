//! Row 4, the JWKS storm: 10k tokens with made-up `kid`s against an issuer whose discovery and
//! JWKS are served over real HTTP on loopback (an axum server here, counting every GET),
//! verified by the broker's own `Verifier` from 64 concurrent tasks. The clock is a manual one
//! moved 1 s per 1,000 verifications, so the storm spans 10 s: two unknown-`kid` cooldowns of 5 s.

use crate::table::Row;
use axum::Router;
use axum::routing::get;
use ephemera::clock::{Clock, ManualClock};
use ephemera::ids::b64url;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

const TOKENS: usize = 10_000;
const COOLDOWN_SECS: i64 = 5;
const VERIFICATIONS_PER_SECOND: usize = 1_000;
const TASKS: usize = 64;

#[derive(Default)]
struct Hits {
    discovery: AtomicUsize,
    jwks: AtomicUsize,
}

pub async fn storm() -> Row {
    ephemera::install_crypto();
    let hits = Arc::new(Hits::default());
    let url = serve_issuer(hits.clone()).await;
    let toml = format!(
        "public_url = \"https://ephemera.bench.invalid\"\n[[issuers]]\nname = \"storm\"\nplatform = \"github-actions\"\n\
         url = \"{url}\"\nunknown_kid_cooldown = \"{COOLDOWN_SECS}s\"\n"
    );
    let config = ephemera::config::Config::parse(&toml, std::path::Path::new(".")).unwrap();
    let start_time = 1_800_000_000;
    let manual = Arc::new(ManualClock::new(start_time));
    let clock: Arc<dyn Clock> = manual.clone();
    let verifier = Arc::new(
        ephemera::identity::Verifier::new(&config.issuers, &ephemera::identity::jwks::http_client(), &clock).unwrap(),
    );
    // As at start-up (`Jwks::run_refresh`): the first fetch, not part of the storm.
    for issuer in verifier.issuers() {
        issuer.jwks.refresh().await.unwrap();
    }
    let before = (hits.discovery.load(Ordering::SeqCst), hits.jwks.load(Ordering::SeqCst));

    let tokens: Arc<Vec<String>> = Arc::new((0..TOKENS).map(|i| unknown_kid_token(&url, i, start_time)).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let (tokens, next, refused, verifier, manual) =
                (tokens.clone(), next.clone(), refused.clone(), verifier.clone(), manual.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(token) = tokens.get(i) else { break };
                    if verifier.verify(token, manual.now()).await.is_err() {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    if (i + 1) % VERIFICATIONS_PER_SECOND == 0 {
                        manual.advance(1);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let wall = started.elapsed().as_secs_f64();
    let jwks = hits.jwks.load(Ordering::SeqCst) - before.1;
    let discovery = hits.discovery.load(Ordering::SeqCst) - before.0;
    let span = manual.now() - start_time;
    let windows = (span + COOLDOWN_SECS - 1) / COOLDOWN_SECS;
    assert_eq!(refused.load(Ordering::Relaxed), TOKENS, "every unknown-kid token is refused");
    let per_window = jwks as f64 / windows as f64;
    Row::new(
        "4",
        "JWKS storm: 10k unknown-`kid` tokens, 64 concurrent, keys over loopback HTTP",
        format!(
            "{jwks} JWKS + {discovery} discovery GETs in {span} s of clock ({:.0} verifications/s)",
            TOKENS as f64 / wall
        ),
        format!("{windows} cooldown windows ({COOLDOWN_SECS} s each)"),
    )
    .ratio(per_window)
    .goal("≤ 1 fetch per cooldown", per_window <= 1.0)
}

/// Serves discovery and the JWKS (the bench's test key) on a free loopback port.
async fn serve_issuer(hits: Arc<Hits>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let discovery = json!({"issuer": url, "jwks_uri": format!("{url}/jwks")});
    let (h1, h2) = (hits.clone(), hits);
    let app = Router::new()
        .route(
            "/.well-known/openid-configuration",
            get(move || {
                h1.discovery.fetch_add(1, Ordering::SeqCst);
                let d = discovery.clone();
                async move { axum::Json(d) }
            }),
        )
        .route(
            "/jwks",
            get(move || {
                h2.jwks.fetch_add(1, Ordering::SeqCst);
                async move { axum::Json(crate::tokens::jwks()) }
            }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// A token of the configured issuer naming a `kid` the issuer never published. Its signature is
/// never checked: the key lookup refuses it first.
fn unknown_kid_token(url: &str, i: usize, now: i64) -> String {
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": format!("rotated-{i}")});
    let claims = json!({"iss": url, "aud": "https://ephemera.bench.invalid", "iat": now, "exp": now + 300, "sub": "x"});
    format!(
        "{}.{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes()),
        b64url(&[0u8; 256])
    )
}
